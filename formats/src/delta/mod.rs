//! The delta file: a full or incremental backup of a volume as a stream of extent records,
//! closed by an index and a trailer so a reader can find any offset without scanning.
//!
//! ```text
//! +--------------------+ 0
//! | header (616 bytes) |  magic "TDMKDLTA", version, features, header crc32, volume uuid
//! |                    |  and size, granularity, from/to checkpoints + generations, time
//! +--------------------+ 616
//! | record 0 header    |  40 bytes: magic "TDXR", kind (data/zero), encoding (raw/zstd),
//! | record 0 payload   |  volume offset, length, stored length, crc32 of the uncompressed
//! | record 1 header    |  data, crc32 of the stored bytes, record crc32; then the stored
//! | ...                |  bytes (none for a zero extent)
//! +--------------------+ index_offset
//! | index header       |  16 bytes: magic "TDXI", reserved, extent count
//! | index entries      |  40 bytes each: offset, length, record offset, stored length,
//! |                    |  both crcs, kind, encoding
//! +--------------------+ file length - 48
//! | trailer (48 bytes) |  magic "TDMKDEND", index offset, extent count, data bytes,
//! |                    |  index crc32, copy of the header crc32, trailer crc32
//! +--------------------+
//! ```
//!
//! Records are contiguous and in strictly increasing, non-overlapping volume order, so every
//! byte of a valid file is covered by exactly one checksum: the header, a record header, a
//! record's stored bytes, the index, or the trailer. A data record holds at most
//! [`MAX_RECORD_DATA`] bytes (larger writes are split); it is zstd-compressed when that makes
//! it smaller and stored raw otherwise. Zero extents carry no payload.
//!
//! The writer never seeks: records stream out as they come, the index is kept in memory
//! (40 bytes per extent) and written at the end. Identical input gives byte-identical output
//! (single-threaded zstd at a fixed level, no timestamps besides the header's).
//!
//! Crash consistency: a delta file is complete only once the trailer is written. A writer that
//! dies midway leaves a file with no trailer, which every reader refuses ("cut short"). Write
//! to a temporary name and rename once [`DeltaWriter::finish`] returned and the file was
//! fsynced, if the name must only ever show complete files.
//!
//! The code follows the file's seams: `header` (the file header), `record` (the record, index
//! and trailer codec both readers share), `writer`, `reader` (random access, seeks) and
//! `stream` (sequential, never seeks).

use std::mem::size_of;

mod header;
mod reader;
mod record;
mod stream;
#[cfg(test)]
mod tests;
mod writer;

pub use header::{CheckpointRef, DeltaHeader};
pub use reader::DeltaReader;
pub use record::{Encoding, ExtentKind, IndexEntry};
pub use stream::{DeltaStreamReader, StreamExtent};
pub use writer::{DeltaWriteError, DeltaWriter};

use header::RawDeltaHeader;
use record::{RawIndexEntry, RawIndexHeader, RawRecordHeader, RawTrailer};

/// The first 8 bytes of every delta file.
pub const MAGIC: [u8; 8] = *b"TDMKDLTA";
/// Major format version: a reader refuses any other.
pub const MAJOR_VERSION: u16 = 1;
/// Minor format version.
pub const MINOR_VERSION: u16 = 0;
/// Incompatible feature bits this build understands (none yet).
pub const KNOWN_INCOMPAT_FEATURES: u64 = 0;
/// Length of the file header; the first record starts here.
pub const HEADER_LEN: usize = size_of::<RawDeltaHeader>();
/// Length of a record header (the stored bytes follow it).
pub const RECORD_HEADER_LEN: usize = size_of::<RawRecordHeader>();
/// Length of the index header.
pub const INDEX_HEADER_LEN: usize = size_of::<RawIndexHeader>();
/// Length of one index entry.
pub const INDEX_ENTRY_LEN: usize = size_of::<RawIndexEntry>();
/// Length of the trailer at the very end of the file.
pub const TRAILER_LEN: usize = size_of::<RawTrailer>();
/// Most uncompressed bytes in one data record; [`DeltaWriter::write_data`] splits larger writes.
pub const MAX_RECORD_DATA: usize = 4 << 20;
/// Most extents one delta file may hold; bounds the index before it is read.
pub const MAX_EXTENTS: u64 = 1 << 28;
/// Longest checkpoint name in bytes.
pub const MAX_CHECKPOINT_NAME: usize = 255;
