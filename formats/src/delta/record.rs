//! The record codec both readers share: record headers, the index, the trailer, the order
//! rule extents follow, and reading and decoding one record's payload.

use std::io::{self, Read};
use std::mem::offset_of;
use std::ops::Range;
use std::path::Path;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{
    HEADER_LEN, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, MAX_EXTENTS, MAX_RECORD_DATA, RECORD_HEADER_LEN,
    TRAILER_LEN,
};
use crate::error::{FormatError, FormatErrorKind, InvalidField};
use crate::header::crc32_with_zeroed_field;

pub(super) const RECORD_MAGIC: [u8; 4] = *b"TDXR";
pub(super) const INDEX_MAGIC: [u8; 4] = *b"TDXI";
pub(super) const TRAILER_MAGIC: [u8; 8] = *b"TDMKDEND";
/// zstd window log bound for decompression: records are at most 4 MiB (2^22).
const WINDOW_LOG_MAX: u32 = 23;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawRecordHeader {
    magic: [u8; 4],    // 0: b"TDXR"
    kind: u8,          // 4: 1 data, 2 zero
    encoding: u8,      // 5: 0 raw, 1 zstd (0 for zero extents)
    reserved: [u8; 2], // 6: zero
    offset: U64,       // 8: volume offset of the extent
    length: U64,       // 16: extent length in bytes (uncompressed)
    stored_len: U32,   // 24: bytes of payload following this header
    data_crc: U32,     // 28: crc32 of the uncompressed data (0 for zero extents)
    stored_crc: U32,   // 32: crc32 of the stored payload bytes
    record_crc: U32,   // 36: crc32 of bytes 0..40 with this field zeroed
}
const _: () = assert!(size_of::<RawRecordHeader>() == 40);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawIndexHeader {
    pub(super) magic: [u8; 4], // 0: b"TDXI"
    pub(super) reserved: U32,  // 4: zero
    pub(super) count: U64,     // 8: number of entries that follow
}
const _: () = assert!(size_of::<RawIndexHeader>() == 16);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawIndexEntry {
    offset: U64,        // 0: volume offset of the extent
    length: U64,        // 8: extent length in bytes
    record_offset: U64, // 16: file offset of the record header
    stored_len: U32,    // 24: stored payload bytes
    data_crc: U32,      // 28: crc32 of the uncompressed data
    stored_crc: U32,    // 32: crc32 of the stored bytes
    kind: u8,           // 36: 1 data, 2 zero
    encoding: u8,       // 37: 0 raw, 1 zstd
    reserved: [u8; 2],  // 38: zero
}
const _: () = assert!(size_of::<RawIndexEntry>() == 40);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawTrailer {
    pub(super) magic: [u8; 8],    // 0: b"TDMKDEND"
    pub(super) index_offset: U64, // 8: file offset of the index header
    pub(super) extent_count: U64, // 16: number of extents (= index entries)
    pub(super) data_bytes: U64,   // 24: sum of the lengths of data extents
    pub(super) index_crc: U32,    // 32: crc32 of the index header and entries
    pub(super) header_crc: U32,   // 36: copy of the file header's crc32
    pub(super) reserved: U32,     // 40: zero
    pub(super) trailer_crc: U32,  // 44: crc32 of bytes 0..48 with this field zeroed
}
const _: () = assert!(size_of::<RawTrailer>() == 48);

const RECORD_CRC: Range<usize> =
    offset_of!(RawRecordHeader, record_crc)..offset_of!(RawRecordHeader, record_crc) + 4;
pub(super) const TRAILER_CRC: Range<usize> =
    offset_of!(RawTrailer, trailer_crc)..offset_of!(RawTrailer, trailer_crc) + 4;

/// What an extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Bytes, stored in the record's payload.
    Data,
    /// All zeros; no payload.
    Zero,
}

/// How a data record's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The bytes as they are (zero extents, and data zstd could not shrink).
    Raw,
    /// One zstd frame decompressing to exactly `length` bytes.
    Zstd,
}

/// One extent of a delta: where it lies in the volume and where its record lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IndexEntry {
    /// Volume offset of the extent.
    pub offset: u64,
    /// Extent length in bytes (uncompressed).
    pub length: u64,
    /// Data or zeros.
    pub kind: ExtentKind,
    /// File offset of the extent's record header.
    pub record_offset: u64,
    /// How the payload is stored.
    pub encoding: Encoding,
    /// Payload bytes following the record header.
    pub stored_len: u32,
    /// crc32 of the uncompressed data (0 for zero extents).
    pub data_crc: u32,
    /// crc32 of the stored payload bytes.
    pub stored_crc: u32,
}

impl IndexEntry {
    /// Volume offset just past the extent.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// The extent's volume range.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.end()
    }

    /// File offset just past this record's payload.
    pub(super) fn record_end(&self) -> u64 {
        self.record_offset + RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }

    fn kind_raw(&self) -> u8 {
        match self.kind {
            ExtentKind::Data => 1,
            ExtentKind::Zero => 2,
        }
    }

    fn encoding_raw(&self) -> u8 {
        match self.encoding {
            Encoding::Raw => 0,
            Encoding::Zstd => 1,
        }
    }

    pub(super) fn record_header(&self) -> [u8; RECORD_HEADER_LEN] {
        let raw = RawRecordHeader {
            magic: RECORD_MAGIC,
            kind: self.kind_raw(),
            encoding: self.encoding_raw(),
            reserved: [0; 2],
            offset: U64::new(self.offset),
            length: U64::new(self.length),
            stored_len: U32::new(self.stored_len),
            data_crc: U32::new(self.data_crc),
            stored_crc: U32::new(self.stored_crc),
            record_crc: U32::new(0),
        };
        let mut out = [0u8; RECORD_HEADER_LEN];
        out.copy_from_slice(raw.as_bytes());
        let crc = crc32_with_zeroed_field(&out, RECORD_CRC);
        out[RECORD_CRC].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub(super) fn index_entry(&self) -> [u8; INDEX_ENTRY_LEN] {
        let raw = RawIndexEntry {
            offset: U64::new(self.offset),
            length: U64::new(self.length),
            record_offset: U64::new(self.record_offset),
            stored_len: U32::new(self.stored_len),
            data_crc: U32::new(self.data_crc),
            stored_crc: U32::new(self.stored_crc),
            kind: self.kind_raw(),
            encoding: self.encoding_raw(),
            reserved: [0; 2],
        };
        let mut out = [0u8; INDEX_ENTRY_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Builds an entry from raw fields, checking the ones that stand on their own.
    #[allow(clippy::too_many_arguments)]
    fn from_raw(
        offset: u64,
        length: u64,
        record_offset: u64,
        stored_len: u32,
        data_crc: u32,
        stored_crc: u32,
        kind: u8,
        encoding: u8,
    ) -> Result<Self, InvalidField> {
        let kind = match kind {
            1 => ExtentKind::Data,
            2 => ExtentKind::Zero,
            k => {
                return Err(InvalidField::new(
                    "kind",
                    format!("unknown extent kind {k}"),
                ))
            }
        };
        let encoding = match encoding {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            e => {
                return Err(InvalidField::new(
                    "encoding",
                    format!("unknown encoding {e}"),
                ))
            }
        };
        if length == 0 {
            return Err(InvalidField::new("length", "an extent cannot be empty"));
        }
        match kind {
            ExtentKind::Zero => {
                if encoding != Encoding::Raw || stored_len != 0 || data_crc != 0 || stored_crc != 0
                {
                    return Err(InvalidField::new(
                        "kind",
                        "a zero extent has no payload, encoding or checksums",
                    ));
                }
            }
            ExtentKind::Data => {
                if length > MAX_RECORD_DATA as u64 {
                    return Err(InvalidField::new(
                        "length",
                        format!("data record of {length} bytes exceeds {MAX_RECORD_DATA}"),
                    ));
                }
                let stored_ok = match encoding {
                    Encoding::Raw => u64::from(stored_len) == length && data_crc == stored_crc,
                    Encoding::Zstd => stored_len > 0 && u64::from(stored_len) < length,
                };
                if !stored_ok {
                    return Err(InvalidField::new(
                        "stored_len",
                        format!("{stored_len} stored bytes (or their crc) impossible for {length} bytes {encoding:?}"),
                    ));
                }
            }
        }
        Ok(Self {
            offset,
            length,
            kind,
            record_offset,
            encoding,
            stored_len,
            data_crc,
            stored_crc,
        })
    }
}

/// Checks that extents arrive in order, inside the volume, with contiguous records.
#[derive(Debug)]
pub(super) struct Sequence {
    pub(super) volume_size: u64,
    pub(super) prev_end: u64,
    pub(super) next_record: u64,
    pub(super) count: u64,
    pub(super) data_bytes: u64,
}

impl Sequence {
    pub(super) fn new(volume_size: u64) -> Self {
        Self {
            volume_size,
            prev_end: 0,
            next_record: HEADER_LEN as u64,
            count: 0,
            data_bytes: 0,
        }
    }

    pub(super) fn accept(&mut self, e: &IndexEntry) -> Result<(), InvalidField> {
        if e.offset < self.prev_end {
            return Err(InvalidField::new(
                "offset",
                format!(
                    "extent at {} overlaps or precedes the previous one ending at {}",
                    e.offset, self.prev_end
                ),
            ));
        }
        match e.offset.checked_add(e.length) {
            Some(end) if end <= self.volume_size => self.prev_end = end,
            _ => {
                return Err(InvalidField::new(
                    "length",
                    format!(
                        "extent {}+{} runs past the volume size {}",
                        e.offset, e.length, self.volume_size
                    ),
                ))
            }
        }
        if e.record_offset != self.next_record {
            return Err(InvalidField::new(
                "record_offset",
                format!(
                    "{} (records are contiguous; expected {})",
                    e.record_offset, self.next_record
                ),
            ));
        }
        if self.count >= MAX_EXTENTS {
            return Err(InvalidField::new(
                "extent_count",
                format!("more than {MAX_EXTENTS} extents"),
            ));
        }
        self.next_record = e.record_end();
        self.count += 1;
        if e.kind == ExtentKind::Data {
            self.data_bytes += e.length;
        }
        Ok(())
    }
}

/// Reads exactly `buf.len()` bytes unless the input ends first; returns the bytes read.
pub(super) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads exactly `buf.len()` bytes at file position `at`, or reports where the file ends.
pub(super) fn read_struct(
    r: &mut impl Read,
    buf: &mut [u8],
    at: u64,
    what: &'static str,
    file: &Path,
) -> Result<(), FormatError> {
    let n = read_full(r, buf).map_err(|e| FormatError::io(file, at, e))?;
    if n < buf.len() {
        return Err(FormatError::new(
            file,
            at + n as u64,
            FormatErrorKind::Truncated {
                what,
                needed: buf.len() as u64,
                available: n as u64,
            },
        ));
    }
    Ok(())
}

/// Parses a record header read at file offset `at`.
pub(super) fn parse_record_header(
    bytes: &[u8; RECORD_HEADER_LEN],
    at: u64,
    file: &Path,
) -> Result<IndexEntry, FormatError> {
    let (raw, _) = RawRecordHeader::read_from_prefix(bytes.as_slice()).map_err(|_| {
        FormatError::new(
            file,
            at,
            FormatErrorKind::Truncated {
                what: "record header",
                needed: RECORD_HEADER_LEN as u64,
                available: 0,
            },
        )
    })?;
    if raw.magic != RECORD_MAGIC {
        return Err(FormatError::new(
            file,
            at,
            FormatErrorKind::BadMagic {
                what: "delta record",
                found: raw.magic.to_vec(),
                expected: RECORD_MAGIC.to_vec(),
            },
        ));
    }
    let computed = crc32_with_zeroed_field(bytes, RECORD_CRC);
    if computed != raw.record_crc.get() {
        return Err(FormatError::new(
            file,
            at + RECORD_CRC.start as u64,
            FormatErrorKind::ChecksumMismatch {
                what: "delta record header",
                stored: raw.record_crc.get(),
                computed,
            },
        ));
    }
    if raw.reserved != [0; 2] {
        return Err(FormatError::invalid(
            file,
            at + offset_of!(RawRecordHeader, reserved) as u64,
            InvalidField::new("reserved", "must be zero"),
        ));
    }
    IndexEntry::from_raw(
        raw.offset.get(),
        raw.length.get(),
        at,
        raw.stored_len.get(),
        raw.data_crc.get(),
        raw.stored_crc.get(),
        raw.kind,
        raw.encoding,
    )
    .map_err(|e| FormatError::invalid(file, at + offset_of!(RawRecordHeader, kind) as u64, e))
}

/// Checks that `stored` (the payload of `e`) matches its stored crc.
fn check_stored_crc(e: &IndexEntry, stored: &[u8], file: &Path) -> Result<(), FormatError> {
    let computed = crc32fast::hash(stored);
    if computed != e.stored_crc {
        return Err(FormatError::new(
            file,
            e.record_offset + RECORD_HEADER_LEN as u64,
            FormatErrorKind::ChecksumMismatch {
                what: "delta record payload",
                stored: e.stored_crc,
                computed,
            },
        ));
    }
    Ok(())
}

/// Reads the `e.stored_len` payload bytes that follow a record header into `buf`.
fn read_payload(
    r: &mut impl Read,
    e: &IndexEntry,
    buf: &mut Vec<u8>,
    file: &Path,
) -> Result<(), FormatError> {
    let at = e.record_offset + RECORD_HEADER_LEN as u64;
    buf.clear();
    // stored_len was bounded by MAX_RECORD_DATA when the entry was parsed.
    buf.resize(e.stored_len as usize, 0);
    read_struct(r, buf, at, "delta record payload", file)
}

/// Reads a record's payload and leaves the extent's data in `out` (empty for a zero
/// extent), checking the stored crc before decompressing and the data crc after. Raw
/// payloads are read straight into `out`; their two crcs are equal, so one pass checks both.
pub(super) fn read_and_decode(
    r: &mut impl Read,
    dec: &mut zstd::bulk::Decompressor<'static>,
    e: &IndexEntry,
    stored: &mut Vec<u8>,
    out: &mut Vec<u8>,
    file: &Path,
) -> Result<(), FormatError> {
    out.clear();
    match (e.kind, e.encoding) {
        (ExtentKind::Zero, _) => Ok(()),
        (ExtentKind::Data, Encoding::Raw) => {
            read_payload(r, e, out, file)?;
            check_stored_crc(e, out, file).inspect_err(|_| out.clear())
        }
        (ExtentKind::Data, Encoding::Zstd) => {
            read_payload(r, e, stored, file)?;
            check_stored_crc(e, stored, file)?;
            let payload_at = e.record_offset + RECORD_HEADER_LEN as u64;
            // `length` was bounded by MAX_RECORD_DATA when the entry was parsed.
            out.reserve_exact(e.length as usize);
            let n = dec
                .decompress_to_buffer(stored.as_slice(), out)
                .map_err(|err| {
                    FormatError::new(
                        file,
                        payload_at,
                        FormatErrorKind::Decompress(err.to_string()),
                    )
                })?;
            if n as u64 != e.length {
                out.clear();
                return Err(FormatError::new(
                    file,
                    payload_at,
                    FormatErrorKind::Decompress(format!(
                        "decompressed to {n} bytes, the record says {}",
                        e.length
                    )),
                ));
            }
            let computed = crc32fast::hash(out);
            if computed != e.data_crc {
                out.clear();
                return Err(FormatError::new(
                    file,
                    payload_at,
                    FormatErrorKind::ChecksumMismatch {
                        what: "delta extent data",
                        stored: e.data_crc,
                        computed,
                    },
                ));
            }
            Ok(())
        }
    }
}

pub(super) fn new_decompressor(
    file: &Path,
) -> Result<zstd::bulk::Decompressor<'static>, FormatError> {
    let mut dec = zstd::bulk::Decompressor::new().map_err(|e| FormatError::io(file, 0, e))?;
    dec.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))
        .map_err(|e| FormatError::io(file, 0, e))?;
    Ok(dec)
}

pub(super) fn parse_trailer(
    bytes: &[u8; TRAILER_LEN],
    at: u64,
    file: &Path,
) -> Result<(u64, u64, u64, u32, u32), FormatError> {
    let (raw, _) = RawTrailer::read_from_prefix(bytes.as_slice()).map_err(|_| {
        FormatError::new(
            file,
            at,
            FormatErrorKind::Truncated {
                what: "delta trailer",
                needed: TRAILER_LEN as u64,
                available: 0,
            },
        )
    })?;
    if raw.magic != TRAILER_MAGIC {
        return Err(FormatError::new(
            file,
            at,
            FormatErrorKind::MissingTrailer {
                what: "delta file",
                found: raw.magic.to_vec(),
            },
        ));
    }
    let computed = crc32_with_zeroed_field(bytes, TRAILER_CRC);
    if computed != raw.trailer_crc.get() {
        return Err(FormatError::new(
            file,
            at + TRAILER_CRC.start as u64,
            FormatErrorKind::ChecksumMismatch {
                what: "delta trailer",
                stored: raw.trailer_crc.get(),
                computed,
            },
        ));
    }
    if raw.reserved.get() != 0 {
        return Err(FormatError::invalid(
            file,
            at + offset_of!(RawTrailer, reserved) as u64,
            InvalidField::new("reserved", "must be zero"),
        ));
    }
    Ok((
        raw.index_offset.get(),
        raw.extent_count.get(),
        raw.data_bytes.get(),
        raw.index_crc.get(),
        raw.header_crc.get(),
    ))
}

pub(super) fn parse_index_header(
    bytes: &[u8; INDEX_HEADER_LEN],
    at: u64,
    file: &Path,
) -> Result<u64, FormatError> {
    let (raw, _) = RawIndexHeader::read_from_prefix(bytes.as_slice()).map_err(|_| {
        FormatError::new(
            file,
            at,
            FormatErrorKind::Truncated {
                what: "delta index header",
                needed: INDEX_HEADER_LEN as u64,
                available: 0,
            },
        )
    })?;
    if raw.magic != INDEX_MAGIC {
        return Err(FormatError::new(
            file,
            at,
            FormatErrorKind::BadMagic {
                what: "delta index",
                found: raw.magic.to_vec(),
                expected: INDEX_MAGIC.to_vec(),
            },
        ));
    }
    if raw.reserved.get() != 0 {
        return Err(FormatError::invalid(
            file,
            at + offset_of!(RawIndexHeader, reserved) as u64,
            InvalidField::new("reserved", "must be zero"),
        ));
    }
    Ok(raw.count.get())
}

pub(super) fn parse_index_entry(
    bytes: &[u8],
    at: u64,
    file: &Path,
) -> Result<IndexEntry, FormatError> {
    let (raw, _) = RawIndexEntry::read_from_prefix(bytes).map_err(|_| {
        FormatError::new(
            file,
            at,
            FormatErrorKind::Truncated {
                what: "delta index entry",
                needed: INDEX_ENTRY_LEN as u64,
                available: bytes.len() as u64,
            },
        )
    })?;
    if raw.reserved != [0; 2] {
        return Err(FormatError::invalid(
            file,
            at + offset_of!(RawIndexEntry, reserved) as u64,
            InvalidField::new("reserved", "must be zero"),
        ));
    }
    IndexEntry::from_raw(
        raw.offset.get(),
        raw.length.get(),
        raw.record_offset.get(),
        raw.stored_len.get(),
        raw.data_crc.get(),
        raw.stored_crc.get(),
        raw.kind,
        raw.encoding,
    )
    .map_err(|e| FormatError::invalid(file, at, e))
}
