//! The copy-on-write store of a snapshot: a header and index records mapping a volume
//! chunk to where its preserved (pre-write) contents lie in the store.
//!
//! ```text
//! store header, 4096 bytes:                    index record, 32 bytes each:
//! +------------------------------------+       +-----------------------------------+
//! | magic "TDMKCOWS", version, features |       | magic "TDCR", reserved             |
//! | header crc32, chunk size,           |       | chunk number                       |
//! | snapshot uuid, volume uuid,         |       | store offset (4 KiB aligned)       |
//! | volume size, creation time          |       | crc32 of the chunk's preserved data|
//! | zeros up to 4096                    |       | record crc32                       |
//! +------------------------------------+       +-----------------------------------+
//! ```
//!
//! The engine decides where header, records and chunk data live (one file or several); this
//! module only fixes their bytes. Write order for a preserved chunk: write the chunk's old
//! data at its store offset, then append its index record, and only then let the volume
//! write proceed; a reader trusts a chunk only through a record whose crcs verify. Chunk
//! `c` covers volume bytes `c*chunk_size .. min((c+1)*chunk_size, volume_size)`; the
//! record's `data_crc` covers exactly those bytes (shorter for the last chunk).

use std::collections::HashSet;
use std::mem::{offset_of, size_of};
use std::ops::Range;
use std::path::Path;

use uuid::Uuid;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::bitmap::MAX_VOLUME_SIZE;
use crate::error::{FormatError, FormatErrorKind, InvalidField};
use crate::header::{self, crc32_with_zeroed_field, HeaderFormat, RawHeaderPrefix};

/// Length of the store header.
pub const HEADER_LEN: usize = 4096;
/// Length of one index record.
pub const RECORD_LEN: usize = size_of::<RawCowRecord>();
/// The first 8 bytes of a COW store header.
pub const MAGIC: [u8; 8] = *b"TDMKCOWS";
/// Major format version.
pub const MAJOR_VERSION: u16 = 1;
/// Minor format version.
pub const MINOR_VERSION: u16 = 0;
/// Incompatible feature bits this build understands (none yet).
pub const KNOWN_INCOMPAT_FEATURES: u64 = 0;
/// Smallest COW chunk (4 KiB).
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest COW chunk (4 MiB).
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// Store offsets are multiples of this, so chunks can be read and written with O_DIRECT.
pub const STORE_ALIGN: u64 = 4096;

const RECORD_MAGIC: [u8; 4] = *b"TDCR";
/// The shared header prefix as this format fills it.
const FORMAT: HeaderFormat = HeaderFormat {
    what: "COW store",
    header: "COW store header",
    magic: MAGIC,
    major: MAJOR_VERSION,
    minor: MINOR_VERSION,
    known_incompat: KNOWN_INCOMPAT_FEATURES,
};

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawCowHeader {
    prefix: RawHeaderPrefix, // 0: "TDMKCOWS" 1.0, header_len 4096, features, header crc
    chunk_size: U32,         // 36: bytes per COW chunk, power of two 4 KiB..=4 MiB
    snapshot_uuid: [u8; 16], // 40: the snapshot this store belongs to
    volume_uuid: [u8; 16],   // 56: the volume it was taken of
    volume_size: U64,        // 72: volume size at snapshot time
    created_unix: U64,       // 80: creation time, seconds since the Unix epoch
}
const _: () = assert!(size_of::<RawCowHeader>() == 88);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawCowRecord {
    magic: [u8; 4],    // 0: b"TDCR"
    reserved: U32,     // 4: zero
    chunk: U64,        // 8: chunk number in the volume
    store_offset: U64, // 16: where the chunk's preserved data lies in the store
    data_crc: U32,     // 24: crc32 of the preserved chunk data
    record_crc: U32,   // 28: crc32 of bytes 0..32 with this field zeroed
}
const _: () = assert!(size_of::<RawCowRecord>() == 32);

const RECORD_CRC: Range<usize> =
    offset_of!(RawCowRecord, record_crc)..offset_of!(RawCowRecord, record_crc) + 4;

/// A validated COW store header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowStoreHeader {
    /// The snapshot this store preserves data for.
    pub snapshot_uuid: Uuid,
    /// The volume the snapshot was taken of.
    pub volume_uuid: Uuid,
    /// Volume size at snapshot time.
    pub volume_size: u64,
    /// Bytes per COW chunk.
    pub chunk_size: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Incompatible feature bits.
    pub incompat_features: u64,
    /// Compatible feature bits.
    pub compat_features: u64,
}

impl CowStoreHeader {
    /// A header after validating the sizes.
    pub fn new(
        snapshot_uuid: Uuid,
        volume_uuid: Uuid,
        volume_size: u64,
        chunk_size: u32,
        created_unix: u64,
    ) -> Result<Self, InvalidField> {
        let h = Self {
            snapshot_uuid,
            volume_uuid,
            volume_size,
            chunk_size,
            created_unix,
            incompat_features: 0,
            compat_features: 0,
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), InvalidField> {
        let c = self.chunk_size;
        if !c.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) {
            return Err(InvalidField::new(
                "chunk_size",
                format!("{c} (must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE})"),
            ));
        }
        if self.volume_size == 0 || self.volume_size > MAX_VOLUME_SIZE {
            return Err(InvalidField::new(
                "volume_size",
                format!("{} (must be 1..={MAX_VOLUME_SIZE})", self.volume_size),
            ));
        }
        Ok(())
    }

    /// Number of chunks: `ceil(volume_size / chunk_size)`.
    pub fn chunk_count(&self) -> u64 {
        self.volume_size.div_ceil(u64::from(self.chunk_size.max(1)))
    }

    /// Volume bytes chunk `chunk` covers (shorter for the last chunk; empty past the end).
    pub fn chunk_range(&self, chunk: u64) -> Range<u64> {
        let size = u64::from(self.chunk_size);
        let start = chunk.saturating_mul(size).min(self.volume_size);
        start..start.saturating_add(size).min(self.volume_size)
    }

    /// The header as exactly [`HEADER_LEN`] bytes, header crc included.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawCowHeader {
            prefix: FORMAT.prefix(HEADER_LEN, self.incompat_features, self.compat_features),
            chunk_size: U32::new(self.chunk_size),
            snapshot_uuid: *self.snapshot_uuid.as_bytes(),
            volume_uuid: *self.volume_uuid.as_bytes(),
            volume_size: U64::new(self.volume_size),
            created_unix: U64::new(self.created_unix),
        };
        let mut out = vec![0u8; HEADER_LEN];
        out[..size_of::<RawCowHeader>()].copy_from_slice(raw.as_bytes());
        header::seal(&mut out);
        out
    }

    /// Parses and validates a header from the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Self, FormatError> {
        let truncated = || {
            FormatError::new(
                file,
                bytes.len() as u64,
                FormatErrorKind::Truncated {
                    what: "COW store header",
                    needed: HEADER_LEN as u64,
                    available: bytes.len() as u64,
                },
            )
        };
        let header = bytes.get(..HEADER_LEN).ok_or_else(truncated)?;
        let (raw, _) = RawCowHeader::read_from_prefix(header).map_err(|_| truncated())?;
        FORMAT.check(header, file)?;
        if raw.prefix.header_len.get() != HEADER_LEN as u32 {
            return Err(FormatError::invalid(
                file,
                header::HEADER_LEN_AT as u64,
                InvalidField::new("header_len", "must be 4096"),
            ));
        }
        if let Some(i) = header[size_of::<RawCowHeader>()..]
            .iter()
            .position(|&b| b != 0)
        {
            return Err(FormatError::invalid(
                file,
                (size_of::<RawCowHeader>() + i) as u64,
                InvalidField::new("reserved", "header padding must be zero"),
            ));
        }
        let h = Self {
            snapshot_uuid: Uuid::from_bytes(raw.snapshot_uuid),
            volume_uuid: Uuid::from_bytes(raw.volume_uuid),
            volume_size: raw.volume_size.get(),
            chunk_size: raw.chunk_size.get(),
            created_unix: raw.created_unix.get(),
            incompat_features: raw.prefix.incompat_features.get(),
            compat_features: raw.prefix.compat_features.get(),
        };
        h.validate().map_err(|e| {
            let off = if e.field == "chunk_size" {
                offset_of!(RawCowHeader, chunk_size)
            } else {
                offset_of!(RawCowHeader, volume_size)
            };
            FormatError::invalid(file, off as u64, e)
        })?;
        Ok(h)
    }
}

/// One preserved chunk: its number, where its old data lies in the store, and its crc32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CowIndexRecord {
    /// Chunk number in the volume.
    pub chunk: u64,
    /// Byte offset of the preserved data in the store (a multiple of [`STORE_ALIGN`]).
    pub store_offset: u64,
    /// crc32 of the preserved bytes ([`CowStoreHeader::chunk_range`] of `chunk`).
    pub data_crc: u32,
}

impl CowIndexRecord {
    /// The record as exactly [`RECORD_LEN`] bytes, record crc included.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let raw = RawCowRecord {
            magic: RECORD_MAGIC,
            reserved: U32::new(0),
            chunk: U64::new(self.chunk),
            store_offset: U64::new(self.store_offset),
            data_crc: U32::new(self.data_crc),
            record_crc: U32::new(0),
        };
        let mut out = [0u8; RECORD_LEN];
        out.copy_from_slice(raw.as_bytes());
        let crc = crc32_with_zeroed_field(&out, RECORD_CRC);
        out[RECORD_CRC].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses one record from the first [`RECORD_LEN`] bytes of `bytes`, found at file
    /// offset `at`, and checks it against `header` (chunk in range, aligned store offset).
    pub fn parse(
        bytes: &[u8],
        at: u64,
        header: &CowStoreHeader,
        file: &Path,
    ) -> Result<Self, FormatError> {
        let Some(rec) = bytes.get(..RECORD_LEN) else {
            return Err(FormatError::new(
                file,
                at + bytes.len() as u64,
                FormatErrorKind::Truncated {
                    what: "COW index record",
                    needed: RECORD_LEN as u64,
                    available: bytes.len() as u64,
                },
            ));
        };
        let (raw, _) = RawCowRecord::read_from_prefix(rec).map_err(|_| {
            FormatError::new(
                file,
                at,
                FormatErrorKind::Truncated {
                    what: "COW index record",
                    needed: RECORD_LEN as u64,
                    available: bytes.len() as u64,
                },
            )
        })?;
        if raw.magic != RECORD_MAGIC {
            return Err(FormatError::new(
                file,
                at,
                FormatErrorKind::BadMagic {
                    what: "COW index record",
                    found: raw.magic.to_vec(),
                    expected: RECORD_MAGIC.to_vec(),
                },
            ));
        }
        let computed = crc32_with_zeroed_field(rec, RECORD_CRC);
        if computed != raw.record_crc.get() {
            return Err(FormatError::new(
                file,
                at + RECORD_CRC.start as u64,
                FormatErrorKind::ChecksumMismatch {
                    what: "COW index record",
                    stored: raw.record_crc.get(),
                    computed,
                },
            ));
        }
        let field = |off: usize, name: &'static str, why: String| {
            FormatError::invalid(file, at + off as u64, InvalidField::new(name, why))
        };
        if raw.reserved.get() != 0 {
            return Err(field(
                offset_of!(RawCowRecord, reserved),
                "reserved",
                "must be zero".into(),
            ));
        }
        let r = Self {
            chunk: raw.chunk.get(),
            store_offset: raw.store_offset.get(),
            data_crc: raw.data_crc.get(),
        };
        if r.chunk >= header.chunk_count() {
            return Err(field(
                offset_of!(RawCowRecord, chunk),
                "chunk",
                format!(
                    "{} (the volume has {} chunks)",
                    r.chunk,
                    header.chunk_count()
                ),
            ));
        }
        if r.store_offset % STORE_ALIGN != 0 {
            return Err(field(
                offset_of!(RawCowRecord, store_offset),
                "store_offset",
                format!("{} is not a multiple of {STORE_ALIGN}", r.store_offset),
            ));
        }
        Ok(r)
    }
}

/// Parses a run of index records (`bytes` found at file offset `base`): every record must
/// verify, and no chunk or store offset may appear twice. A partial record at the end is
/// an error naming its offset.
pub fn parse_cow_index(
    bytes: &[u8],
    base: u64,
    header: &CowStoreHeader,
    file: &Path,
) -> Result<Vec<CowIndexRecord>, FormatError> {
    let mut out = Vec::new();
    let mut chunks = HashSet::new();
    let mut offsets = HashSet::new();
    for (i, rec) in bytes.chunks(RECORD_LEN).enumerate() {
        let at = base + (i * RECORD_LEN) as u64;
        let r = CowIndexRecord::parse(rec, at, header, file)?;
        if !chunks.insert(r.chunk) {
            return Err(FormatError::invalid(
                file,
                at + offset_of!(RawCowRecord, chunk) as u64,
                InvalidField::new("chunk", format!("chunk {} is preserved twice", r.chunk)),
            ));
        }
        if !offsets.insert(r.store_offset) {
            return Err(FormatError::invalid(
                file,
                at + offset_of!(RawCowRecord, store_offset) as u64,
                InvalidField::new(
                    "store_offset",
                    format!("store offset {} is used twice", r.store_offset),
                ),
            ));
        }
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> CowStoreHeader {
        CowStoreHeader::new(
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            (1 << 20) + 100,
            65536,
            9,
        )
        .unwrap()
    }

    #[test]
    fn header_round_trips_and_counts_chunks() {
        let h = header();
        assert_eq!(h.chunk_count(), 17);
        assert_eq!(h.chunk_range(16), (1 << 20)..(1 << 20) + 100);
        assert_eq!(h.chunk_range(99), h.volume_size..h.volume_size);
        assert_eq!(
            CowStoreHeader::parse(&h.encode(), Path::new("x")).unwrap(),
            h
        );
    }

    #[test]
    fn new_refuses_bad_chunk_size_and_volume_size() {
        let u = Uuid::nil();
        assert!(CowStoreHeader::new(u, u, 1 << 20, 1000, 0).is_err());
        assert!(CowStoreHeader::new(u, u, 1 << 20, 8 << 20, 0).is_err());
        assert!(CowStoreHeader::new(u, u, 0, 65536, 0).is_err());
    }

    #[test]
    fn index_round_trips() {
        let h = header();
        let recs: Vec<_> = (0..5)
            .map(|i| CowIndexRecord {
                chunk: 16 - i,
                store_offset: 4096 + i * 65536,
                data_crc: i as u32 * 77,
            })
            .collect();
        let bytes: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
        assert_eq!(
            parse_cow_index(&bytes, 4096, &h, Path::new("x")).unwrap(),
            recs
        );
    }

    #[test]
    fn index_refuses_duplicates_range_and_alignment() {
        let h = header();
        let enc = |c, o| {
            CowIndexRecord {
                chunk: c,
                store_offset: o,
                data_crc: 0,
            }
            .encode()
        };
        let dup: Vec<u8> = [enc(1, 4096), enc(1, 8192)].concat();
        let e = parse_cow_index(&dup, 0, &h, Path::new("x")).unwrap_err();
        assert_eq!(e.offset, 32 + 8);
        let dup_off: Vec<u8> = [enc(1, 4096), enc(2, 4096)].concat();
        assert!(parse_cow_index(&dup_off, 0, &h, Path::new("x")).is_err());
        assert!(parse_cow_index(&enc(17, 0), 0, &h, Path::new("x")).is_err());
        assert!(parse_cow_index(&enc(1, 100), 0, &h, Path::new("x")).is_err());
    }

    #[test]
    fn every_truncation_and_bit_flip_of_an_index_is_refused() {
        let h = header();
        let bytes: Vec<u8> = (0..3)
            .flat_map(|i| {
                CowIndexRecord {
                    chunk: i,
                    store_offset: i * 65536,
                    data_crc: 5,
                }
                .encode()
            })
            .collect();
        for len in 1..bytes.len() {
            if len % RECORD_LEN != 0 {
                let e = parse_cow_index(&bytes[..len], 0, &h, Path::new("x")).unwrap_err();
                assert_eq!(e.offset, len as u64);
            }
        }
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                parse_cow_index(&b, 0, &h, Path::new("x")).is_err(),
                "flip {bit}"
            );
        }
    }

    #[test]
    fn every_bit_flip_of_a_header_is_refused() {
        let bytes = header().encode();
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                CowStoreHeader::parse(&b, Path::new("x")).is_err(),
                "flip {bit}"
            );
        }
        for len in 0..bytes.len() {
            assert!(CowStoreHeader::parse(&bytes[..len], Path::new("x")).is_err());
        }
    }

    proptest! {
        #[test]
        fn record_round_trips(chunk in 0u64..17, page in 0u64..(1 << 40), crc in any::<u32>()) {
            let r = CowIndexRecord { chunk, store_offset: page * STORE_ALIGN, data_crc: crc };
            prop_assert_eq!(CowIndexRecord::parse(&r.encode(), 0, &header(), Path::new("x")).unwrap(), r);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_cow_index(&bytes, 0, &header(), Path::new("x"));
            let _ = CowStoreHeader::parse(&bytes, Path::new("x"));
        }
    }
}
