//! The delta writer: header, records in volume order, then index and trailer. Never seeks.

use std::fmt;
use std::io::{self, Write};

use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

use super::record::{
    Encoding, ExtentKind, IndexEntry, RawIndexHeader, RawTrailer, Sequence, INDEX_MAGIC,
    TRAILER_CRC, TRAILER_MAGIC,
};
use super::{DeltaHeader, HEADER_LEN, INDEX_ENTRY_LEN, MAX_RECORD_DATA, TRAILER_LEN};
use crate::error::InvalidField;
use crate::header::crc32_with_zeroed_field;

/// Misuse of a [`DeltaWriter`] or a failure of its output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaWriteError {
    /// Writing to the output failed.
    #[error("writing the delta failed")]
    Io(#[from] io::Error),
    /// The header given to [`DeltaWriter::new`] is invalid.
    #[error("invalid delta header")]
    Header(#[source] InvalidField),
    /// zstd refused the compression level.
    #[error("zstd compression level {level} is not usable")]
    Level {
        /// The level asked for.
        level: i32,
        /// zstd's error.
        #[source]
        source: io::Error,
    },
    /// An extent was empty, overlapped or preceded the previous one, or ran past the volume.
    #[error("extent {offset}+{length} refused: {reason}")]
    Extent {
        /// Volume offset given.
        offset: u64,
        /// Length given.
        length: u64,
        /// Why it was refused.
        reason: String,
    },
}

/// Writes a delta file as a stream: header, then one record per extent in volume order,
/// then index and trailer on [`DeltaWriter::finish`]. Never seeks.
///
/// Wrap a `File` in a `BufWriter`: record headers are small writes.
pub struct DeltaWriter<W: Write> {
    out: W,
    pos: u64,
    header_crc: u32,
    seq: Sequence,
    entries: Vec<IndexEntry>,
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl<W: Write> fmt::Debug for DeltaWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeltaWriter")
            .field("pos", &self.pos)
            .field("extents", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl<W: Write> DeltaWriter<W> {
    /// Validates `header`, writes it, and prepares zstd at `zstd_level` (1..=22; 1 and 3
    /// are the sensible ones for backups).
    pub fn new(mut out: W, header: &DeltaHeader, zstd_level: i32) -> Result<Self, DeltaWriteError> {
        header.validate().map_err(DeltaWriteError::Header)?;
        let compressor =
            zstd::bulk::Compressor::new(zstd_level).map_err(|source| DeltaWriteError::Level {
                level: zstd_level,
                source,
            })?;
        let (bytes, header_crc) = header.encode_with_crc();
        out.write_all(&bytes)?;
        Ok(Self {
            out,
            pos: HEADER_LEN as u64,
            header_crc,
            seq: Sequence::new(header.volume_size),
            entries: Vec::new(),
            compressor,
            scratch: Vec::with_capacity(zstd::zstd_safe::compress_bound(MAX_RECORD_DATA)),
        })
    }

    /// Appends `data` as the contents of the volume at `offset`.
    ///
    /// `offset` must not precede the end of the previous extent, and the extent must end
    /// inside the volume. Writes over [`MAX_RECORD_DATA`] become several records.
    pub fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<(), DeltaWriteError> {
        self.check_extent(offset, data.len() as u64)?;
        let mut at = offset;
        for chunk in data.chunks(MAX_RECORD_DATA) {
            self.write_data_record(at, chunk)?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Appends a zero extent: `length` bytes at `offset` read as zeros. No payload.
    pub fn write_zero(&mut self, offset: u64, length: u64) -> Result<(), DeltaWriteError> {
        self.check_extent(offset, length)?;
        let e = IndexEntry {
            offset,
            length,
            kind: ExtentKind::Zero,
            record_offset: self.pos,
            encoding: Encoding::Raw,
            stored_len: 0,
            data_crc: 0,
            stored_crc: 0,
        };
        self.push(e, &[])
    }

    /// The extents written so far.
    pub fn extents(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    /// Writes the index and trailer, flushes, and returns the output.
    pub fn finish(mut self) -> Result<W, DeltaWriteError> {
        let index_offset = self.pos;
        let count = self.entries.len() as u64;
        let index_header = RawIndexHeader {
            magic: INDEX_MAGIC,
            reserved: U32::new(0),
            count: U64::new(count),
        };
        let mut crc = crc32fast::Hasher::new();
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(index_header.as_bytes());
        for e in &self.entries {
            buf.extend_from_slice(&e.index_entry());
            if buf.len() >= 64 * 1024 - INDEX_ENTRY_LEN {
                crc.update(&buf);
                self.out.write_all(&buf)?;
                buf.clear();
            }
        }
        crc.update(&buf);
        self.out.write_all(&buf)?;
        let raw = RawTrailer {
            magic: TRAILER_MAGIC,
            index_offset: U64::new(index_offset),
            extent_count: U64::new(count),
            data_bytes: U64::new(self.seq.data_bytes),
            index_crc: U32::new(crc.finalize()),
            header_crc: U32::new(self.header_crc),
            reserved: U32::new(0),
            trailer_crc: U32::new(0),
        };
        let mut trailer = [0u8; TRAILER_LEN];
        trailer.copy_from_slice(raw.as_bytes());
        let tcrc = crc32_with_zeroed_field(&trailer, TRAILER_CRC);
        trailer[TRAILER_CRC].copy_from_slice(&tcrc.to_le_bytes());
        self.out.write_all(&trailer)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn check_extent(&self, offset: u64, length: u64) -> Result<(), DeltaWriteError> {
        let refuse = |reason: String| DeltaWriteError::Extent {
            offset,
            length,
            reason,
        };
        if length == 0 {
            return Err(refuse("empty extent".into()));
        }
        if offset < self.seq.prev_end {
            return Err(refuse(format!(
                "extents must be written in increasing order without overlap; the previous one ends at {}",
                self.seq.prev_end
            )));
        }
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.seq.volume_size)
        {
            return Err(refuse(format!(
                "runs past the volume size {}",
                self.seq.volume_size
            )));
        }
        Ok(())
    }

    fn write_data_record(&mut self, offset: u64, data: &[u8]) -> Result<(), DeltaWriteError> {
        let data_crc = crc32fast::hash(data);
        self.scratch.clear();
        // The buffer holds zstd's worst case, so compression itself never fails for lack
        // of room; the frame is kept only if strictly smaller than the data.
        let compressed = self
            .compressor
            .compress_to_buffer(data, &mut self.scratch)
            .is_ok_and(|n| n < data.len());
        let scratch = std::mem::take(&mut self.scratch);
        let (encoding, payload, stored_crc): (_, &[u8], _) = if compressed {
            (Encoding::Zstd, &scratch, crc32fast::hash(&scratch))
        } else {
            // Raw: the stored bytes are the data, so both crcs are the same value.
            (Encoding::Raw, data, data_crc)
        };
        let e = IndexEntry {
            offset,
            length: data.len() as u64,
            kind: ExtentKind::Data,
            record_offset: self.pos,
            encoding,
            stored_len: payload.len() as u32,
            data_crc,
            stored_crc,
        };
        let result = self.push(e, payload);
        self.scratch = scratch;
        result
    }

    fn push(&mut self, e: IndexEntry, payload: &[u8]) -> Result<(), DeltaWriteError> {
        self.seq.accept(&e).map_err(|f| DeltaWriteError::Extent {
            offset: e.offset,
            length: e.length,
            reason: f.to_string(),
        })?;
        self.out.write_all(&e.record_header())?;
        self.out.write_all(payload)?;
        self.pos = e.record_end();
        self.entries.push(e);
        Ok(())
    }
}
