//! The dirty bitmap file: one bit per tracking block of a volume, since one checkpoint.
//!
//! ```text
//! byte 0                                                    4096
//! +---------------------------------------------------------+--------------------------+
//! | header (360 bytes of fields, then zeros up to 4096)      | payload: payload_len     |
//! | magic "TDMKBMAP", version, features, header crc32,       | bytes = ceil(blocks/64)  |
//! | state, volume uuid, granularity, checkpoint name,        | little-endian u64 words  |
//! | volume size, generation, block count, payload len/crc    |                          |
//! +---------------------------------------------------------+--------------------------+
//! ```
//!
//! Block `i` (covering volume bytes `i*granularity .. (i+1)*granularity`) is bit `i % 64` of
//! the little-endian u64 word `i / 64`. The payload starts at byte [`HEADER_LEN`] = 4096 so
//! the engine can memory-map it page-aligned and set bits in place as `&[AtomicU64]`.
//! Bits past `block_count` in the last word are always zero.
//!
//! # States and write order
//!
//! The header's `state` says whether the payload can be trusted:
//!
//! - `Clean`: the payload is complete and `payload_crc` is its crc32. Only written after the
//!   payload is on stable storage (msync / fsync of the payload first, then the header, then
//!   fsync again), so a Clean header never describes a payload that did not reach the disk.
//! - `InUse`: the engine has the file open and sets bits in place; `payload_crc` is stale.
//!   The engine writes and syncs this state *before* it sets the first bit, so a crash while
//!   open leaves InUse on disk. In durable mode every set bit is synced before the data write
//!   it covers is issued, so an InUse bitmap found after a crash is still a superset of the
//!   changes and may be used (its payload crc cannot be checked).
//! - `Inconsistent`: the payload is known to miss changes (fast mode after an unclean stop).
//!   The next backup from this checkpoint must be a full one.
//!
//! Whole-file replacement ([`write_bitmap_file`], [`write_bitmap_pages`]) goes through
//! [`crate::atomic_replace`].
//!
//! # Paged layout (incompatible feature [`INCOMPAT_PAGE_CRCS`], version 1.1)
//!
//! ```text
//! 0        4096                                   T = 4096 + 4096 * pages     T + 4 * pages
//! +--------+--------------------------------------+-----------------------------+
//! | header | payload: `pages` pages of 4096 bytes | page crc table: one u32 per |
//! |        | (clean pages are holes)              | payload page (mostly holes) |
//! +--------+--------------------------------------+-----------------------------+
//! ```
//!
//! `pages = ceil(payload_len / 4096)`; the bits are numbered as in the flat layout (the
//! last page's bytes past `payload_len` are zero). Entry `p` of the table is
//! `crc32(page p) ^ crc32(4096 zero bytes)`, so a clean page's entry is 0 and a file whose
//! clean pages and table pages are holes verifies without reading them. `payload_crc` is the
//! crc32 of the whole table (small: 1/1024 of the payload). A reader reads the header, the
//! table (Clean files only), and only the payload's data extents (SEEK_DATA/SEEK_HOLE),
//! checks each page read against its entry, and refuses a nonzero entry whose page is a
//! hole. Memory and disk then grow with the dirty pages, not with the volume. Files without
//! the feature (the flat layout of version 1.0) are still read, with the whole-payload crc.

use std::fs::File;
use std::io::{self, Read};
use std::mem::{offset_of, size_of};
use std::num::NonZeroU64;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{FormatError, FormatErrorKind, InvalidField};
use crate::header::{self, HeaderFormat, RawHeaderPrefix};

mod paged;
pub use paged::{Page, PagedBits, PAGE_BITS, PAGE_BYTES, PAGE_WORDS};

/// Length of the header; the payload starts here (page-aligned for mmap).
pub const HEADER_LEN: usize = 4096;
/// The first 8 bytes of every bitmap file.
pub const MAGIC: [u8; 8] = *b"TDMKBMAP";
/// Major format version: a reader refuses any other major version.
pub const MAJOR_VERSION: u16 = 1;
/// Minor format version: additions a version-1 reader may ignore (1: the paged layout).
pub const MINOR_VERSION: u16 = 1;
/// Incompatible feature: the paged layout (see the module doc); `payload_crc` is the crc32
/// of the page crc table.
pub const INCOMPAT_PAGE_CRCS: u64 = 1;
/// Incompatible feature bits this build understands.
pub const KNOWN_INCOMPAT_FEATURES: u64 = INCOMPAT_PAGE_CRCS;
/// Smallest tracking block (4 KiB).
pub const MIN_GRANULARITY: u32 = 4096;
/// Largest tracking block (1 MiB).
pub const MAX_GRANULARITY: u32 = 1 << 20;
/// Longest checkpoint name in bytes (UTF-8).
pub const MAX_CHECKPOINT_NAME: usize = 255;
/// Largest volume a bitmap may describe (64 PiB); bounds every size computed from a header.
pub const MAX_VOLUME_SIZE: u64 = 1 << 56;

/// The shared header prefix as this format fills it.
const FORMAT: HeaderFormat = HeaderFormat {
    what: "bitmap file",
    header: "bitmap header",
    magic: MAGIC,
    major: MAJOR_VERSION,
    minor: MINOR_VERSION,
    known_incompat: KNOWN_INCOMPAT_FEATURES,
};

/// The header's on-disk layout; all integers little-endian.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawBitmapHeader {
    prefix: RawHeaderPrefix, // 0: "TDMKBMAP" 1.0, header_len 4096 (where the payload starts), crc
    state: U32,              // 36: 0 clean, 1 in use, 2 inconsistent
    volume_uuid: [u8; 16],   // 40: the volume's uuid (RFC 4122 byte order)
    granularity: U32,        // 56: bytes per tracking block, power of two 4 KiB..=1 MiB
    checkpoint_len: U32,     // 60: length of the checkpoint name, 1..=255
    volume_size: U64,        // 64: volume size in bytes
    generation: U64,         // 72: checkpoint generation
    block_count: U64,        // 80: ceil(volume_size / granularity)
    payload_len: U64,        // 88: ceil(block_count / 64) * 8
    payload_crc: U32,        // 96: crc32 of the payload (meaningful when clean)
    reserved: U32,           // 100: zero
    checkpoint: [u8; 256],   // 104: checkpoint name, UTF-8, zero padded
}
const _: () = assert!(size_of::<RawBitmapHeader>() == 360);
const _: () = assert!(size_of::<RawBitmapHeader>() <= HEADER_LEN);

/// Whether the payload can be trusted; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitmapState {
    /// Closed cleanly; the payload crc is valid.
    Clean,
    /// Open in the engine (or the engine crashed); the payload crc is stale.
    InUse,
    /// Known to miss changes; the next backup from this checkpoint must be full.
    Inconsistent,
}

impl BitmapState {
    fn to_raw(self) -> u32 {
        match self {
            Self::Clean => 0,
            Self::InUse => 1,
            Self::Inconsistent => 2,
        }
    }

    fn from_raw(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Clean),
            1 => Some(Self::InUse),
            2 => Some(Self::Inconsistent),
            _ => None,
        }
    }
}

/// A validated bitmap file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapHeader {
    /// The volume this bitmap tracks.
    pub volume_uuid: Uuid,
    /// The checkpoint whose changes since it was taken this bitmap records (1..=255 bytes).
    pub checkpoint: String,
    /// Bytes per tracking block: a power of two in 4096..=1 MiB.
    pub granularity: u32,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// The checkpoint's generation.
    pub generation: u64,
    /// Whether the payload can be trusted.
    pub state: BitmapState,
    /// crc32 of the payload; meaningful only when `state` is Clean.
    pub payload_crc: u32,
    /// Incompatible feature bits (a reader refuses unknown ones).
    pub incompat_features: u64,
    /// Compatible feature bits (unknown ones are kept and ignored).
    pub compat_features: u64,
    /// The minor version: [`MINOR_VERSION`] for a header made here, the file's own for one
    /// read (kept, so a header re-encodes to the bytes it was read from).
    pub minor_version: u16,
}

impl BitmapHeader {
    /// A Clean header for an all-zero payload, after validating every argument.
    pub fn new(
        volume_uuid: Uuid,
        checkpoint: &str,
        granularity: u32,
        volume_size: u64,
        generation: u64,
    ) -> Result<Self, InvalidField> {
        validate_checkpoint_name(checkpoint)?;
        validate_granularity(granularity)?;
        validate_volume_size(volume_size)?;
        let mut h = Self {
            volume_uuid,
            checkpoint: checkpoint.to_owned(),
            granularity,
            volume_size,
            generation,
            state: BitmapState::Clean,
            payload_crc: 0,
            incompat_features: 0,
            compat_features: 0,
            minor_version: MINOR_VERSION,
        };
        h.payload_crc = crc32_of_zeros(h.payload_len());
        Ok(h)
    }

    /// Number of tracking blocks: `ceil(volume_size / granularity)`.
    pub fn block_count(&self) -> u64 {
        self.volume_size
            .div_ceil(u64::from(self.granularity.max(1)))
    }

    /// Payload length in bytes: `block_count` rounded up to whole u64 words.
    pub fn payload_len(&self) -> u64 {
        self.block_count().div_ceil(64) * 8
    }

    /// Number of u64 words in the payload.
    pub fn word_count(&self) -> usize {
        (self.payload_len() / 8) as usize
    }

    /// Whether the file has the paged layout ([`INCOMPAT_PAGE_CRCS`]).
    pub fn is_paged(&self) -> bool {
        self.incompat_features & INCOMPAT_PAGE_CRCS != 0
    }

    /// Payload pages of the paged layout: `ceil(payload_len / 4096)`.
    pub fn payload_pages(&self) -> u64 {
        self.payload_len().div_ceil(PAGE_BYTES as u64)
    }

    /// Where the page crc table of the paged layout starts.
    pub fn page_table_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.payload_pages() * PAGE_BYTES as u64
    }

    /// The file's exact length in its layout.
    pub fn file_len(&self) -> u64 {
        if self.is_paged() {
            self.page_table_offset() + self.payload_pages() * 4
        } else {
            HEADER_LEN as u64 + self.payload_len()
        }
    }

    /// The header as exactly [`HEADER_LEN`] bytes, header crc included.
    pub fn encode(&self) -> Vec<u8> {
        let mut checkpoint = [0u8; 256];
        let name = self.checkpoint.as_bytes();
        let n = name.len().min(MAX_CHECKPOINT_NAME);
        checkpoint[..n].copy_from_slice(&name[..n]);
        let mut prefix = FORMAT.prefix(HEADER_LEN, self.incompat_features, self.compat_features);
        prefix.minor = U16::new(self.minor_version);
        let raw = RawBitmapHeader {
            prefix,
            state: U32::new(self.state.to_raw()),
            volume_uuid: *self.volume_uuid.as_bytes(),
            granularity: U32::new(self.granularity),
            checkpoint_len: U32::new(n as u32),
            volume_size: U64::new(self.volume_size),
            generation: U64::new(self.generation),
            block_count: U64::new(self.block_count()),
            payload_len: U64::new(self.payload_len()),
            payload_crc: U32::new(self.payload_crc),
            reserved: U32::new(0),
            checkpoint,
        };
        let mut out = vec![0u8; HEADER_LEN];
        out[..size_of::<RawBitmapHeader>()].copy_from_slice(raw.as_bytes());
        header::seal(&mut out);
        out
    }

    /// Parses and validates a header from the first [`HEADER_LEN`] bytes of `bytes`.
    ///
    /// Checks, in this order: length, magic, major version, header crc, incompatible
    /// features, then every field. `file` only names the file in errors.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Self, FormatError> {
        let truncated = || {
            FormatError::new(
                file,
                0,
                FormatErrorKind::Truncated {
                    what: "bitmap header",
                    needed: HEADER_LEN as u64,
                    available: bytes.len() as u64,
                },
            )
        };
        let header = bytes.get(..HEADER_LEN).ok_or_else(truncated)?;
        let (raw, _) = RawBitmapHeader::read_from_prefix(header).map_err(|_| truncated())?;
        FORMAT.check(header, file)?;
        let field = |off: usize, e: InvalidField| FormatError::invalid(file, off as u64, e);
        if raw.prefix.header_len.get() != HEADER_LEN as u32 {
            return Err(field(
                header::HEADER_LEN_AT,
                InvalidField::new(
                    "header_len",
                    format!("{} (must be {HEADER_LEN})", raw.prefix.header_len.get()),
                ),
            ));
        }
        let state = BitmapState::from_raw(raw.state.get()).ok_or_else(|| {
            field(
                offset_of!(RawBitmapHeader, state),
                InvalidField::new("state", format!("unknown state {}", raw.state.get())),
            )
        })?;
        let granularity = raw.granularity.get();
        validate_granularity(granularity)
            .map_err(|e| field(offset_of!(RawBitmapHeader, granularity), e))?;
        let volume_size = raw.volume_size.get();
        validate_volume_size(volume_size)
            .map_err(|e| field(offset_of!(RawBitmapHeader, volume_size), e))?;
        let name_len = raw.checkpoint_len.get() as usize;
        if name_len == 0 || name_len > MAX_CHECKPOINT_NAME {
            return Err(field(
                offset_of!(RawBitmapHeader, checkpoint_len),
                InvalidField::new(
                    "checkpoint_len",
                    format!("{name_len} (must be 1..={MAX_CHECKPOINT_NAME})"),
                ),
            ));
        }
        let checkpoint_off = offset_of!(RawBitmapHeader, checkpoint);
        let (name, padding) = raw.checkpoint.split_at(name_len);
        let checkpoint = std::str::from_utf8(name).map_err(|e| {
            field(
                checkpoint_off + e.valid_up_to(),
                InvalidField::new("checkpoint", "name is not UTF-8"),
            )
        })?;
        validate_checkpoint_name(checkpoint).map_err(|e| field(checkpoint_off, e))?;
        if let Some(i) = padding.iter().position(|&b| b != 0) {
            return Err(field(
                checkpoint_off + name_len + i,
                InvalidField::new("checkpoint", "non-zero bytes after the name"),
            ));
        }
        if raw.reserved.get() != 0 {
            return Err(field(
                offset_of!(RawBitmapHeader, reserved),
                InvalidField::new("reserved", "must be zero"),
            ));
        }
        if let Some(i) = header[size_of::<RawBitmapHeader>()..]
            .iter()
            .position(|&b| b != 0)
        {
            return Err(field(
                size_of::<RawBitmapHeader>() + i,
                InvalidField::new("reserved", "header padding must be zero"),
            ));
        }
        let h = Self {
            volume_uuid: Uuid::from_bytes(raw.volume_uuid),
            checkpoint: checkpoint.to_owned(),
            granularity,
            volume_size,
            generation: raw.generation.get(),
            state,
            payload_crc: raw.payload_crc.get(),
            incompat_features: raw.prefix.incompat_features.get(),
            compat_features: raw.prefix.compat_features.get(),
            minor_version: raw.prefix.minor.get(),
        };
        if raw.block_count.get() != h.block_count() {
            return Err(field(
                offset_of!(RawBitmapHeader, block_count),
                InvalidField::new(
                    "block_count",
                    format!(
                        "{} does not match volume size / granularity = {}",
                        raw.block_count.get(),
                        h.block_count()
                    ),
                ),
            ));
        }
        if raw.payload_len.get() != h.payload_len() {
            return Err(field(
                offset_of!(RawBitmapHeader, payload_len),
                InvalidField::new(
                    "payload_len",
                    format!(
                        "{} does not match the block count (expected {})",
                        raw.payload_len.get(),
                        h.payload_len()
                    ),
                ),
            ));
        }
        Ok(h)
    }
}

fn validate_checkpoint_name(name: &str) -> Result<(), InvalidField> {
    if name.is_empty() || name.len() > MAX_CHECKPOINT_NAME {
        return Err(InvalidField::new(
            "checkpoint",
            format!(
                "name is {} bytes (must be 1..={MAX_CHECKPOINT_NAME})",
                name.len()
            ),
        ));
    }
    if name.bytes().any(|b| b == 0) {
        return Err(InvalidField::new("checkpoint", "name contains a NUL byte"));
    }
    Ok(())
}

fn validate_granularity(g: u32) -> Result<(), InvalidField> {
    if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
        return Err(InvalidField::new(
            "granularity",
            format!("{g} (must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY})"),
        ));
    }
    Ok(())
}

fn validate_volume_size(size: u64) -> Result<(), InvalidField> {
    if size == 0 || size > MAX_VOLUME_SIZE {
        return Err(InvalidField::new(
            "volume_size",
            format!("{size} (must be 1..={MAX_VOLUME_SIZE})"),
        ));
    }
    Ok(())
}

/// crc32 of `len` zero bytes in O(log len), without allocating them.
fn crc32_of_zeros(len: u64) -> u32 {
    const CHUNK: u64 = 4096;
    let mut total = crc32fast::Hasher::new();
    total.update(&[0u8; CHUNK as usize][..(len % CHUNK) as usize]);
    // `piece` covers CHUNK << k zeros; all bytes are zero, so the combine order is free.
    let mut piece = crc32fast::Hasher::new();
    piece.update(&[0u8; CHUNK as usize]);
    let mut chunks = len / CHUNK;
    while chunks != 0 {
        if chunks & 1 == 1 {
            total.combine(&piece);
        }
        let copy = piece.clone();
        piece.combine(&copy);
        chunks >>= 1;
    }
    total.finalize()
}

/// crc32 of a bitmap payload (the bytes after the header, words little-endian).
pub fn payload_crc(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// crc32 of a payload given as words, as [`payload_crc`] of their little-endian bytes.
pub fn words_crc(words: &[u64]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut buf = [0u8; 8 * 512];
    for chunk in words.chunks(512) {
        for (dst, w) in buf.chunks_exact_mut(8).zip(chunk) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 8]);
    }
    h.finalize()
}

/// Reads and fully validates a bitmap file of either layout: header, exact file length,
/// zero bits past `block_count`, and the crcs when the state is Clean.
///
/// Allocates only after the header validated and the file's real length matched it. The
/// words are flat (`ceil(block_count / 64)` of them); [`read_bitmap_pages`] keeps them paged.
pub fn read_bitmap_file(path: &Path) -> Result<(BitmapHeader, Vec<u64>), FormatError> {
    let (mut f, header, file_len) = open_bitmap(path)?;
    if header.is_paged() {
        let bits = read_pages(&f, &header, path)?;
        return Ok((header, bits.to_words()));
    }
    let words = read_flat_payload(&mut f, &header, file_len, path)?;
    Ok((header, words))
}

/// Reads and fully validates a bitmap file of either layout into [`PagedBits`]: a paged
/// file costs the reads and the memory of its dirty pages only (its holes are skipped with
/// SEEK_DATA/SEEK_HOLE, never read); a flat file is read whole, as before.
pub fn read_bitmap_pages(path: &Path) -> Result<(BitmapHeader, PagedBits), FormatError> {
    let (mut f, header, file_len) = open_bitmap(path)?;
    if header.is_paged() {
        let bits = read_pages(&f, &header, path)?;
        return Ok((header, bits));
    }
    let words = read_flat_payload(&mut f, &header, file_len, path)?;
    let bits = PagedBits::from_words(&words, header.block_count());
    Ok((header, bits))
}

/// Opens a bitmap file and validates its header and its exact length.
fn open_bitmap(path: &Path) -> Result<(File, BitmapHeader, u64), FormatError> {
    let mut f = File::open(path).map_err(|e| FormatError::io(path, 0, e))?;
    let file_len = f.metadata().map_err(|e| FormatError::io(path, 0, e))?.len();
    let mut header_bytes = vec![0u8; HEADER_LEN.min(file_len as usize)];
    f.read_exact(&mut header_bytes)
        .map_err(|e| FormatError::io(path, 0, e))?;
    let header = BitmapHeader::parse(&header_bytes, path)?;
    check_file_len(&header, file_len, path)?;
    Ok((f, header, file_len))
}

fn check_file_len(header: &BitmapHeader, file_len: u64, path: &Path) -> Result<(), FormatError> {
    let expected = header.file_len();
    if file_len < expected {
        let what = if header.is_paged() && file_len >= header.page_table_offset() {
            "bitmap page crc table"
        } else {
            "bitmap payload"
        };
        return Err(FormatError::new(
            path,
            file_len,
            FormatErrorKind::Truncated {
                what,
                needed: expected - HEADER_LEN as u64,
                available: file_len.saturating_sub(HEADER_LEN as u64),
            },
        ));
    }
    if file_len > expected {
        return Err(FormatError::new(
            path,
            expected,
            FormatErrorKind::TrailingBytes {
                what: if header.is_paged() {
                    "bitmap page crc table"
                } else {
                    "bitmap payload"
                },
                extra: file_len - expected,
            },
        ));
    }
    Ok(())
}

fn read_flat_payload(
    f: &mut File,
    header: &BitmapHeader,
    file_len: u64,
    path: &Path,
) -> Result<Vec<u64>, FormatError> {
    debug_assert_eq!(file_len, header.file_len());
    let mut payload = vec![0u8; header.payload_len() as usize];
    f.read_exact(&mut payload)
        .map_err(|e| FormatError::io(path, HEADER_LEN as u64, e))?;
    parse_payload(header, &payload, path)
}

/// crc32 of a page of 4096 zero bytes: the term that makes a clean page's entry 0.
fn zero_page_crc() -> u32 {
    static CRC: OnceLock<u32> = OnceLock::new();
    *CRC.get_or_init(|| crc32fast::hash(&[0u8; PAGE_BYTES]))
}

/// The page crc table entry of a payload page (see the module doc): 0 for a clean page.
pub fn page_table_entry(page: &Page) -> u32 {
    crc32fast::hash(page_bytes(page).as_slice()) ^ zero_page_crc()
}

/// The whole page crc table of `bits` (4 bytes per page, little-endian): entries of
/// unallocated pages are 0. Its crc32 is the header's `payload_crc` in the paged layout.
pub fn page_table(bits: &PagedBits) -> Vec<u8> {
    let mut table = vec![0u8; bits.page_count() as usize * 4];
    for (p, page) in bits.pages() {
        let at = p as usize * 4;
        table[at..at + 4].copy_from_slice(&page_table_entry(page).to_le_bytes());
    }
    table
}

/// A page as its 4096 little-endian bytes.
pub fn page_bytes(page: &Page) -> Box<[u8; PAGE_BYTES]> {
    let mut out = Box::new([0u8; PAGE_BYTES]);
    for (dst, w) in out.chunks_exact_mut(8).zip(page) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Checks the page crc table of a Clean paged file against `payload_crc`.
fn check_page_table(header: &BitmapHeader, table: &[u8], path: &Path) -> Result<(), FormatError> {
    let computed = crc32fast::hash(table);
    if computed != header.payload_crc {
        return Err(FormatError::new(
            path,
            header.page_table_offset(),
            FormatErrorKind::ChecksumMismatch {
                what: "bitmap page crc table",
                stored: header.payload_crc,
                computed,
            },
        ));
    }
    Ok(())
}

fn table_entry(table: &[u8], p: u64) -> u32 {
    let at = p as usize * 4;
    u32::from_le_bytes([table[at], table[at + 1], table[at + 2], table[at + 3]])
}

/// Validates payload page `p` (its 4096 bytes): its table entry when the file is Clean,
/// and no bit past the last block. Returns its words.
fn check_page(
    header: &BitmapHeader,
    table: Option<&[u8]>,
    p: u64,
    bytes: &[u8],
    path: &Path,
) -> Result<Box<Page>, FormatError> {
    let offset = HEADER_LEN as u64 + p * PAGE_BYTES as u64;
    let mut page = Box::new([0u64; PAGE_WORDS]);
    for (w, c) in page.iter_mut().zip(bytes.chunks_exact(8)) {
        *w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    }
    if let Some(table) = table {
        let stored = table_entry(table, p);
        let computed = page_table_entry(&page);
        if stored != computed {
            return Err(FormatError::new(
                path,
                offset,
                FormatErrorKind::ChecksumMismatch {
                    what: "bitmap payload page",
                    stored,
                    computed,
                },
            ));
        }
    }
    let valid = header.block_count() - p * PAGE_BITS;
    if valid < PAGE_BITS {
        let word = (valid / 64) as usize;
        let tail = if valid % 64 == 0 {
            0
        } else {
            page[word] >> (valid % 64)
        };
        let start = word + usize::from(valid % 64 != 0);
        if tail != 0 || page[start.min(PAGE_WORDS)..].iter().any(|&w| w != 0) {
            return Err(FormatError::invalid(
                path,
                offset + word as u64 * 8,
                InvalidField::new("payload", "bits set past the last block of the volume"),
            ));
        }
    }
    Ok(page)
}

/// A nonzero table entry for a page that was not read (a hole, or missing) is a lost page.
fn check_holes(
    table: &[u8],
    read: &[Range<u64>],
    header: &BitmapHeader,
    path: &Path,
) -> Result<(), FormatError> {
    let mut extents = read.iter().peekable();
    for p in 0..header.payload_pages() {
        while extents.next_if(|r| r.end <= p).is_some() {}
        let in_data = extents.peek().is_some_and(|r| r.start <= p);
        let stored = table_entry(table, p);
        if !in_data && stored != 0 {
            return Err(FormatError::new(
                path,
                HEADER_LEN as u64 + p * PAGE_BYTES as u64,
                FormatErrorKind::ChecksumMismatch {
                    what: "bitmap payload page (a hole where the table says data)",
                    stored,
                    computed: 0,
                },
            ));
        }
    }
    Ok(())
}

/// Next data (or hole, `data == false`) offset at or after `offset`; `None` past the end.
fn seek_extent(f: &File, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data {
        rustix::fs::SeekFrom::Data(offset)
    } else {
        rustix::fs::SeekFrom::Hole(offset)
    };
    match rustix::fs::seek(f, whence) {
        Ok(at) => Ok(Some(at)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads a paged file's data extents (its holes are clean pages) and validates them.
fn read_pages(f: &File, header: &BitmapHeader, path: &Path) -> Result<PagedBits, FormatError> {
    /// Pages read per pread.
    const READ_PAGES: u64 = 256;
    let io = |offset, e| FormatError::io(path, offset, e);
    let table = match header.state {
        BitmapState::Clean => {
            // Bounded: the file's length matched the validated header.
            let mut table = vec![0u8; header.payload_pages() as usize * 4];
            f.read_exact_at(&mut table, header.page_table_offset())
                .map_err(|e| io(header.page_table_offset(), e))?;
            check_page_table(header, &table, path)?;
            Some(table)
        }
        _ => None,
    };
    let mut bits = PagedBits::new(header.block_count());
    let payload_end = header.page_table_offset();
    let page_offset = |p: u64| HEADER_LEN as u64 + p * PAGE_BYTES as u64;
    // First the data extents (page ranges), each announced to the kernel as it is found:
    // pages that are not cached (the active bitmap is written with O_DIRECT, so after a
    // restart none of its pages are) are then read from the disk all at once, not one
    // synchronous read after another.
    let mut read: Vec<Range<u64>> = Vec::new();
    let mut pos = HEADER_LEN as u64;
    while pos < payload_end {
        let Some(data) = seek_extent(f, pos, true).map_err(|e| io(pos, e))? else {
            break;
        };
        if data >= payload_end {
            break;
        }
        let hole = seek_extent(f, data, false)
            .map_err(|e| io(data, e))?
            .unwrap_or(payload_end)
            .min(payload_end);
        let first = (data - HEADER_LEN as u64) / PAGE_BYTES as u64;
        let end = (hole - HEADER_LEN as u64).div_ceil(PAGE_BYTES as u64);
        let len = NonZeroU64::new((end - first) * PAGE_BYTES as u64);
        // Only advice: a kernel that ignores it still gets the reads below.
        let _ = rustix::fs::fadvise(f, page_offset(first), len, rustix::fs::Advice::WillNeed);
        read.push(first..end);
        pos = page_offset(end);
    }
    let mut buf = vec![0u8; READ_PAGES as usize * PAGE_BYTES];
    for extent in &read {
        let mut p = extent.start;
        while p < extent.end {
            let n = (extent.end - p).min(READ_PAGES);
            let chunk = &mut buf[..n as usize * PAGE_BYTES];
            let offset = page_offset(p);
            f.read_exact_at(chunk, offset).map_err(|e| io(offset, e))?;
            for (i, bytes) in chunk.chunks_exact(PAGE_BYTES).enumerate() {
                let page = check_page(header, table.as_deref(), p + i as u64, bytes, path)?;
                bits.or_page(p + i as u64, &page);
            }
            p += n;
        }
    }
    if let Some(table) = &table {
        check_holes(table, &read, header, path)?;
    }
    Ok(bits)
}

/// Writes a bitmap file in the paged layout atomically: created sparse (`set_len`), only
/// the allocated pages of `bits` and the table pages holding a nonzero entry are written,
/// then fsync, rename, fsync of the directory ([`crate::atomic_replace_with`]). Returns the
/// header as written (feature bit set, `payload_crc` the table's crc).
pub fn write_bitmap_pages(
    path: &Path,
    header: &BitmapHeader,
    bits: &PagedBits,
) -> Result<BitmapHeader, FormatError> {
    if bits.bit_len() != header.block_count() {
        return Err(FormatError::invalid(
            path,
            HEADER_LEN as u64,
            InvalidField::new(
                "payload",
                format!(
                    "{} bits given, the header needs {}",
                    bits.bit_len(),
                    header.block_count()
                ),
            ),
        ));
    }
    let mut h = header.clone();
    h.incompat_features |= INCOMPAT_PAGE_CRCS;
    h.minor_version = h.minor_version.max(MINOR_VERSION);
    let table = page_table(bits);
    h.payload_crc = crc32fast::hash(&table);
    crate::atomic_replace_with(path, |f| {
        f.write_all_at(&h.encode(), 0)?;
        f.set_len(h.file_len())?;
        for (p, page) in bits.pages() {
            f.write_all_at(
                page_bytes(page).as_slice(),
                HEADER_LEN as u64 + p * PAGE_BYTES as u64,
            )?;
        }
        write_table_pages(f, &h, &table, |_| false)
    })
    .map_err(|e| FormatError::io(path, 0, e))?;
    Ok(h)
}

/// Writes the 4 KiB pages of a page crc `table` that hold a nonzero entry, or for which
/// `also(table page index)` says so (pages whose entries may have changed to zero), at the
/// table's place in a paged file.
pub fn write_table_pages(
    f: &File,
    header: &BitmapHeader,
    table: &[u8],
    also: impl Fn(u64) -> bool,
) -> io::Result<()> {
    for (c, chunk) in table.chunks(PAGE_BYTES).enumerate() {
        if chunk.iter().any(|&b| b != 0) || also(c as u64) {
            f.write_all_at(chunk, header.page_table_offset() + (c * PAGE_BYTES) as u64)?;
        }
    }
    Ok(())
}

/// Parses a whole bitmap file of either layout held in memory, with the checks of
/// [`read_bitmap_file`].
pub fn parse_bitmap_file(
    bytes: &[u8],
    file: &Path,
) -> Result<(BitmapHeader, Vec<u64>), FormatError> {
    let header = BitmapHeader::parse(bytes, file)?;
    if header.is_paged() {
        check_file_len(&header, bytes.len() as u64, file)?;
        let payload = &bytes[HEADER_LEN..header.page_table_offset() as usize];
        let table = &bytes[header.page_table_offset() as usize..];
        let table = match header.state {
            BitmapState::Clean => {
                check_page_table(&header, table, file)?;
                Some(table)
            }
            _ => None,
        };
        let mut bits = PagedBits::new(header.block_count());
        for (p, page) in payload.chunks_exact(PAGE_BYTES).enumerate() {
            let page = check_page(&header, table, p as u64, page, file)?;
            bits.or_page(p as u64, &page);
        }
        return Ok((header, bits.to_words()));
    }
    let expected = HEADER_LEN as u64 + header.payload_len();
    let len = bytes.len() as u64;
    if len > expected {
        return Err(FormatError::new(
            file,
            expected,
            FormatErrorKind::TrailingBytes {
                what: "bitmap payload",
                extra: len - expected,
            },
        ));
    }
    let words = parse_payload(&header, &bytes[HEADER_LEN..], file)?;
    Ok((header, words))
}

/// Validates a payload against its header and returns its words.
///
/// `payload` must be exactly `header.payload_len()` bytes; the crc is checked when the
/// header is Clean, and bits past `block_count` must be zero.
pub fn parse_payload(
    header: &BitmapHeader,
    payload: &[u8],
    file: &Path,
) -> Result<Vec<u64>, FormatError> {
    if payload.len() as u64 != header.payload_len() {
        return Err(FormatError::new(
            file,
            HEADER_LEN as u64 + payload.len() as u64,
            FormatErrorKind::Truncated {
                what: "bitmap payload",
                needed: header.payload_len(),
                available: payload.len() as u64,
            },
        ));
    }
    if header.state == BitmapState::Clean {
        let computed = payload_crc(payload);
        if computed != header.payload_crc {
            return Err(FormatError::new(
                file,
                HEADER_LEN as u64,
                FormatErrorKind::ChecksumMismatch {
                    what: "bitmap payload",
                    stored: header.payload_crc,
                    computed,
                },
            ));
        }
    }
    let words: Vec<u64> = payload
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let tail_bits = header.block_count() % 64;
    if tail_bits != 0 {
        if let Some(&last) = words.last() {
            if last >> tail_bits != 0 {
                return Err(FormatError::invalid(
                    file,
                    HEADER_LEN as u64 + header.payload_len() - 8,
                    InvalidField::new("payload", "bits set past the last block of the volume"),
                ));
            }
        }
    }
    Ok(words)
}

/// Writes a whole bitmap file in the flat layout (version 1.0's, read by every version)
/// atomically ([`crate::atomic_replace`]); [`write_bitmap_pages`] writes the paged one.
///
/// The stored payload crc is computed here from `words` (whatever `header.payload_crc`
/// says), so a Clean file written by this function always verifies.
pub fn write_bitmap_file(
    path: &Path,
    header: &BitmapHeader,
    words: &[u64],
) -> Result<(), FormatError> {
    if words.len() != header.word_count() {
        return Err(FormatError::invalid(
            path,
            HEADER_LEN as u64,
            InvalidField::new(
                "payload",
                format!(
                    "{} words given, the header needs {}",
                    words.len(),
                    header.word_count()
                ),
            ),
        ));
    }
    let tail_bits = header.block_count() % 64;
    if tail_bits != 0 && words.last().is_some_and(|w| w >> tail_bits != 0) {
        return Err(FormatError::invalid(
            path,
            HEADER_LEN as u64 + header.payload_len() - 8,
            InvalidField::new("payload", "bits set past the last block of the volume"),
        ));
    }
    let mut h = header.clone();
    h.incompat_features &= !INCOMPAT_PAGE_CRCS;
    h.payload_crc = words_crc(words);
    let mut bytes = h.encode();
    bytes.reserve(words.len() * 8);
    for w in words {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    crate::atomic_replace(path, &bytes).map_err(|e| FormatError::io(path, 0, e))
}

/// Whether block `block` is set in `words` (false past the end).
pub fn is_dirty(words: &[u64], block: u64) -> bool {
    words
        .get((block / 64) as usize)
        .is_some_and(|w| w >> (block % 64) & 1 == 1)
}

/// Sets block `block` in `words`; blocks past the end are ignored.
pub fn set_dirty(words: &mut [u64], block: u64) {
    if let Some(w) = words.get_mut((block / 64) as usize) {
        *w |= 1 << (block % 64);
    }
}

/// Sets every block in `blocks` (clamped to `words`).
pub fn set_dirty_range(words: &mut [u64], blocks: Range<u64>) {
    let end = blocks.end.min(words.len() as u64 * 64);
    let mut b = blocks.start;
    while b < end {
        let bit = b % 64;
        let n = (64 - bit).min(end - b);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        words[(b / 64) as usize] |= mask;
        b += n;
    }
}

/// Runs of set bits below `block_count`, in block units, in increasing order.
///
/// Zero words are skipped a word at a time, and runs inside a word are found with
/// trailing-zero counts, so the cost is proportional to the words plus the runs.
pub fn dirty_runs(words: &[u64], block_count: u64) -> DirtyRuns<'_> {
    DirtyRuns {
        words,
        limit: block_count.min(words.len() as u64 * 64),
        pos: 0,
    }
}

/// Iterator returned by [`dirty_runs`].
#[derive(Debug, Clone)]
pub struct DirtyRuns<'a> {
    words: &'a [u64],
    limit: u64,
    pos: u64,
}

impl DirtyRuns<'_> {
    /// First block >= `self.pos` whose bit equals `set`, or `limit`.
    fn seek(&self, from: u64, set: bool) -> u64 {
        let mut w = (from / 64) as usize;
        if from >= self.limit {
            return self.limit;
        }
        let flip = if set { 0 } else { u64::MAX };
        let mut word = (self.words[w] ^ flip) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let found = w as u64 * 64 + u64::from(word.trailing_zeros());
                return found.min(self.limit);
            }
            w += 1;
            match self.words.get(w) {
                Some(&next) if (w as u64) * 64 < self.limit => word = next ^ flip,
                _ => return self.limit,
            }
        }
    }
}

impl Iterator for DirtyRuns<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.seek(self.pos, true);
        if start >= self.limit {
            self.pos = self.limit;
            return None;
        }
        let end = self.seek(start, false);
        self.pos = end;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(volume_size: u64, granularity: u32) -> BitmapHeader {
        BitmapHeader::new(
            Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788),
            "ckpt-1",
            granularity,
            volume_size,
            7,
        )
        .unwrap()
    }

    #[test]
    fn encode_is_header_len_and_parses_back() {
        let h = header(10 << 20, 65536);
        let bytes = h.encode();
        assert_eq!(bytes.len(), HEADER_LEN);
        assert_eq!(BitmapHeader::parse(&bytes, Path::new("x")).unwrap(), h);
    }

    #[test]
    fn block_count_and_payload_len_round_up() {
        let h = header(65536 * 64 + 1, 65536);
        assert_eq!(h.block_count(), 65);
        assert_eq!(h.payload_len(), 16);
        let h = header(4096, 4096);
        assert_eq!(h.block_count(), 1);
        assert_eq!(h.payload_len(), 8);
    }

    #[test]
    fn new_refuses_bad_fields() {
        let u = Uuid::nil();
        assert_eq!(
            BitmapHeader::new(u, "", 4096, 1, 0).unwrap_err().field,
            "checkpoint"
        );
        let long = "x".repeat(256);
        assert!(BitmapHeader::new(u, &long, 4096, 1, 0).is_err());
        assert!(BitmapHeader::new(u, "a\0b", 4096, 1, 0).is_err());
        assert_eq!(
            BitmapHeader::new(u, "a", 3000, 1, 0).unwrap_err().field,
            "granularity"
        );
        assert!(BitmapHeader::new(u, "a", 2048, 1, 0).is_err());
        assert!(BitmapHeader::new(u, "a", 1 << 21, 1, 0).is_err());
        assert_eq!(
            BitmapHeader::new(u, "a", 4096, 0, 0).unwrap_err().field,
            "volume_size"
        );
        assert!(BitmapHeader::new(u, "a", 4096, MAX_VOLUME_SIZE + 1, 0).is_err());
    }

    #[test]
    fn parse_refuses_unknown_incompat_feature_even_with_valid_crc() {
        let mut h = header(1 << 20, 4096);
        h.incompat_features = 1 << 3;
        let err = BitmapHeader::parse(&h.encode(), Path::new("f.bitmap")).unwrap_err();
        assert!(matches!(
            err.kind,
            FormatErrorKind::UnknownIncompatFeatures { bits: 8, .. }
        ));
        assert_eq!(err.offset, 16);
    }

    #[test]
    fn parse_keeps_unknown_compat_features() {
        let mut h = header(1 << 20, 4096);
        h.compat_features = 1 << 40;
        assert_eq!(BitmapHeader::parse(&h.encode(), Path::new("x")).unwrap(), h);
    }

    #[test]
    fn a_header_of_any_minor_version_re_encodes_to_its_own_bytes() {
        // Files of format 1.0 (minor 0, written before the paged layout) and of a later
        // minor version keep their minor version when their header is written back.
        for minor in [0u16, MINOR_VERSION, 7] {
            let mut bytes = header(1 << 20, 4096).encode();
            bytes[10..12].copy_from_slice(&minor.to_le_bytes());
            header::seal(&mut bytes);
            let parsed = BitmapHeader::parse(&bytes, Path::new("x")).unwrap();
            assert_eq!(parsed.minor_version, minor);
            assert_eq!(parsed.encode(), bytes, "minor {minor}");
        }
    }

    #[test]
    fn parse_refuses_other_major_version() {
        let mut bytes = header(1 << 20, 4096).encode();
        bytes[8] = 2;
        let err = BitmapHeader::parse(&bytes, Path::new("x")).unwrap_err();
        assert!(matches!(
            err.kind,
            FormatErrorKind::UnsupportedVersion { major: 2, .. }
        ));
    }

    #[test]
    fn file_round_trip_with_bits_set() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bitmap");
        let h = header(1 << 30, 65536);
        let mut words = vec![0u64; h.word_count()];
        set_dirty_range(&mut words, 5..300);
        set_dirty(&mut words, h.block_count() - 1);
        write_bitmap_file(&p, &h, &words).unwrap();
        let (h2, w2) = read_bitmap_file(&p).unwrap();
        assert_eq!(w2, words);
        assert_eq!(h2.payload_crc, words_crc(&words));
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            HEADER_LEN as u64 + h.payload_len()
        );
    }

    #[test]
    fn write_refuses_bits_past_the_end_and_wrong_length() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bitmap");
        let h = header(65536 * 3, 65536);
        assert!(write_bitmap_file(&p, &h, &[0b1000]).is_err());
        assert!(write_bitmap_file(&p, &h, &[0, 0]).is_err());
        write_bitmap_file(&p, &h, &[0b111]).unwrap();
    }

    #[test]
    fn crc_of_zeros_matches_direct_hash() {
        for len in [0u64, 1, 8, 4095, 4096, 4097, 3 * 4096 + 5, 100_000] {
            assert_eq!(
                crc32_of_zeros(len),
                payload_crc(&vec![0u8; len as usize]),
                "{len}"
            );
        }
    }

    #[test]
    fn new_header_for_huge_volume_is_cheap_and_clean() {
        let h = header(MAX_VOLUME_SIZE, 4096);
        assert_eq!(h.state, BitmapState::Clean);
        assert_eq!(h.payload_len(), MAX_VOLUME_SIZE / 4096 / 8);
    }

    #[test]
    fn in_use_payload_is_not_crc_checked() {
        let mut h = header(1 << 20, 4096);
        h.state = BitmapState::InUse;
        h.payload_crc = 0xdead_beef;
        let words = parse_payload(&h, &[0xff; 32], Path::new("x")).unwrap();
        assert_eq!(words, vec![u64::MAX; 4]);
    }

    /// Every truncation and every single-bit flip of a small valid Clean file is refused.
    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.bitmap");
        let h = header(65536 * 200, 65536);
        let mut words = vec![0u64; h.word_count()];
        set_dirty_range(&mut words, 3..17);
        set_dirty_range(&mut words, 150..199);
        write_bitmap_file(&good, &h, &words).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let (parsed, parsed_words) = parse_bitmap_file(&bytes, Path::new("ok")).unwrap();
        assert_eq!(parsed_words, words);
        let expected = BitmapHeader {
            payload_crc: words_crc(&words),
            ..h.clone()
        };
        assert_eq!(parsed, expected);
        let bad = dir.path().join("bad.bitmap");
        for len in 0..bytes.len() {
            std::fs::write(&bad, &bytes[..len]).unwrap();
            let err = read_bitmap_file(&bad).expect_err("truncated file accepted");
            assert!(err.offset <= len as u64, "len {len}: {err}");
        }
        // Header and payload checks work on bytes; run them in memory for speed.
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                parse_bitmap_file(&b, Path::new("flip")).is_err(),
                "bit flip {bit} accepted"
            );
        }
    }

    #[test]
    fn extra_bytes_are_refused_at_the_payload_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bitmap");
        let h = header(1 << 20, 4096);
        write_bitmap_file(&p, &h, &vec![0; h.word_count()]).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.push(0);
        std::fs::write(&p, &bytes).unwrap();
        let err = read_bitmap_file(&p).unwrap_err();
        assert_eq!(err.offset, HEADER_LEN as u64 + h.payload_len());
        assert!(err.to_string().contains("a.bitmap: at byte 4128"), "{err}");
    }

    #[test]
    fn dirty_runs_spanning_words() {
        let mut w = vec![0u64; 4];
        set_dirty_range(&mut w, 60..130);
        set_dirty(&mut w, 200);
        set_dirty_range(&mut w, 250..256);
        let runs: Vec<_> = dirty_runs(&w, 256).collect();
        assert_eq!(runs, vec![60..130, 200..201, 250..256]);
        let runs: Vec<_> = dirty_runs(&w, 253).collect();
        assert_eq!(runs, vec![60..130, 200..201, 250..253]);
        assert_eq!(dirty_runs(&w, 0).count(), 0);
        assert_eq!(dirty_runs(&[], 100).count(), 0);
    }

    fn model_runs(bits: &[bool]) -> Vec<Range<u64>> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < bits.len() {
            if bits[i] {
                let s = i;
                while i < bits.len() && bits[i] {
                    i += 1;
                }
                runs.push(s as u64..i as u64);
            } else {
                i += 1;
            }
        }
        runs
    }

    proptest! {
        #[test]
        fn dirty_runs_matches_a_vec_bool_model(
            bits in proptest::collection::vec(any::<bool>(), 0..700),
            extra_words in 0usize..3,
        ) {
            let mut words = vec![0u64; bits.len().div_ceil(64) + extra_words];
            for (i, &b) in bits.iter().enumerate() {
                if b { set_dirty(&mut words, i as u64); }
            }
            for (i, &b) in bits.iter().enumerate() {
                prop_assert_eq!(is_dirty(&words, i as u64), b);
            }
            let runs: Vec<_> = dirty_runs(&words, bits.len() as u64).collect();
            prop_assert_eq!(runs, model_runs(&bits));
        }

        #[test]
        fn set_dirty_range_matches_model(start in 0u64..300, len in 0u64..300) {
            let mut words = vec![0u64; 5];
            set_dirty_range(&mut words, start..start + len);
            for b in 0..320u64 {
                prop_assert_eq!(is_dirty(&words, b), b >= start && b < start + len);
            }
        }

        #[test]
        fn header_round_trips(
            uuid in any::<u128>(),
            name in "[a-zA-Z0-9_.:-]{1,255}",
            gshift in 12u32..=20,
            size in 1u64..=MAX_VOLUME_SIZE,
            generation in any::<u64>(),
            state in 0u32..3,
            crc in any::<u32>(),
            compat in any::<u64>(),
        ) {
            let mut h = BitmapHeader::new(Uuid::from_u128(uuid), &name, 1 << gshift, size, generation).unwrap();
            h.state = BitmapState::from_raw(state).unwrap();
            h.payload_crc = crc;
            h.compat_features = compat;
            prop_assert_eq!(BitmapHeader::parse(&h.encode(), Path::new("x")).unwrap(), h);
        }

        #[test]
        fn parse_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = BitmapHeader::parse(&bytes, Path::new("x"));
        }
    }

    /// The bytes main's writer (format 1.0, before the paged layout) produced for `h` and
    /// `words`: the flat layout, minor version 0. Kept as the fixture generator for files
    /// written by earlier builds.
    fn version_1_0_file(h: &BitmapHeader, words: &[u64]) -> Vec<u8> {
        let mut h = h.clone();
        h.incompat_features = 0;
        h.minor_version = 0;
        h.payload_crc = words_crc(words);
        let mut bytes = h.encode();
        for w in words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        bytes
    }

    /// Disk blocks (512 bytes) a file really holds.
    fn allocated_bytes(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn files_of_version_1_0_still_open() {
        let h = header(1000 * 65536, 65536);
        let mut words = vec![0u64; h.word_count()];
        set_dirty_range(&mut words, 3..70);
        set_dirty_range(&mut words, 999..1000);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.bitmap");
        let bytes = version_1_0_file(&h, &words);
        std::fs::write(&p, &bytes).unwrap();
        let (h2, w2) = read_bitmap_file(&p).unwrap();
        assert_eq!(w2, words);
        assert!(!h2.is_paged());
        let (_, bits) = read_bitmap_pages(&p).unwrap();
        assert_eq!(bits.to_words(), words);
        assert_eq!(parse_bitmap_file(&bytes, &p).unwrap().1, words);
    }

    #[test]
    fn a_64_tib_paged_file_holds_only_its_dirty_pages() {
        // 64 TiB at 64 KiB: 1 Gi bits, a 128 MiB payload in the flat layout.
        let h = header(64 << 40, 65536);
        let mut bits = PagedBits::new(h.block_count());
        bits.set_range(5..9);
        bits.set_range(700 * PAGE_BITS - 3..700 * PAGE_BITS + 2);
        bits.set_range(h.block_count() - 1..h.block_count());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.bitmap");
        let written = write_bitmap_pages(&p, &h, &bits).unwrap();
        assert!(written.is_paged());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), written.file_len());
        assert!(
            allocated_bytes(&p) <= 64 << 10,
            "{} bytes allocated for 4 dirty pages",
            allocated_bytes(&p)
        );
        let (h2, b2) = read_bitmap_pages(&p).unwrap();
        assert_eq!(h2, written);
        assert_eq!(b2, bits);
        assert_eq!(b2.allocated_pages(), 4);
    }

    #[test]
    fn paged_files_refuse_damaged_lost_and_extra_pages() {
        let h = header(3 * PAGE_BITS * 4096 - 4096 * 7, 4096);
        let mut bits = PagedBits::new(h.block_count());
        bits.set_range(10..20);
        bits.set_range(2 * PAGE_BITS + 1..2 * PAGE_BITS + 3);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.bitmap");
        let written = write_bitmap_pages(&p, &h, &bits).unwrap();
        let good = std::fs::read(&p).unwrap();
        assert_eq!(parse_bitmap_file(&good, &p).unwrap().1, bits.to_words());
        let refused = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            let file = read_bitmap_pages(&p).is_err();
            let mem = parse_bitmap_file(bytes, &p).is_err();
            file && mem
        };
        // A flipped bit in a dirty page, in a clean page, in the table.
        for at in [
            HEADER_LEN + 2,
            HEADER_LEN + PAGE_BYTES + 100,
            written.page_table_offset() as usize + 1,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            assert!(refused(&bad), "flip at {at}");
        }
        // A dirty page lost (reads as zeros).
        let mut lost = good.clone();
        lost[HEADER_LEN..HEADER_LEN + PAGE_BYTES].fill(0);
        assert!(refused(&lost));
        // Bits past the last block, even in an InUse file (no crc to catch them).
        let mut past = good.clone();
        let mut in_use = written.clone();
        in_use.state = BitmapState::InUse;
        past[..HEADER_LEN].copy_from_slice(&in_use.encode());
        let last = written.page_table_offset() as usize - 1;
        past[last] = 0x80;
        assert!(refused(&past));
        assert!(refused(&good[..good.len() - 1]));
        let mut longer = good.clone();
        longer.push(0);
        assert!(refused(&longer));
        std::fs::write(&p, &good).unwrap();
        assert_eq!(read_bitmap_pages(&p).unwrap().1, bits);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// A bitmap written with random bits reads back exactly, header and words.
        /// (Few cases: each one fsyncs a file and its directory.)
        #[test]
        fn file_round_trips_random_bits(
            blocks in 1u64..2000,
            seeds in proptest::collection::vec(any::<u64>(), 32),
            state in 0u32..3,
        ) {
            let mut h = header(blocks * 4096, 4096);
            h.state = BitmapState::from_raw(state).unwrap();
            let tail = blocks % 64;
            let mut words: Vec<u64> = (0..h.word_count()).map(|i| seeds[i % seeds.len()]).collect();
            if let (Some(last), true) = (words.last_mut(), tail != 0) {
                *last &= (1u64 << tail) - 1;
            }
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("r.bitmap");
            write_bitmap_file(&p, &h, &words).unwrap();
            let (h2, w2) = read_bitmap_file(&p).unwrap();
            prop_assert_eq!(w2, words.clone());
            prop_assert_eq!(h2, BitmapHeader { payload_crc: words_crc(&words), ..h });
        }
    }
}
