//! The sequential delta reader, for pipes: records in file order, then index and trailer
//! matched against what was read. Never seeks.

use std::fmt;
use std::io::Read;
use std::mem::offset_of;
use std::path::{Path, PathBuf};

use super::record::{
    new_decompressor, parse_index_header, parse_record_header, parse_trailer, read_and_decode,
    read_full, read_struct, IndexEntry, RawIndexHeader, RawTrailer, Sequence, INDEX_MAGIC,
};
use super::{
    DeltaHeader, HEADER_LEN, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, RECORD_HEADER_LEN, TRAILER_LEN,
};
use crate::error::{FormatError, FormatErrorKind, InvalidField};

/// One extent yielded by [`DeltaStreamReader::next_extent`].
pub type StreamExtent<'a> = (IndexEntry, &'a [u8]);

/// Sequential reader for pipes and streams: yields extents in file order, verifying every
/// checksum as it goes, and at the end checks that the index and trailer describe exactly
/// the records that were read. Never seeks.
pub struct DeltaStreamReader<R: Read> {
    r: R,
    file: PathBuf,
    header: DeltaHeader,
    header_crc: u32,
    pos: u64,
    seq: Sequence,
    entries: Vec<IndexEntry>,
    dec: zstd::bulk::Decompressor<'static>,
    stored: Vec<u8>,
    data: Vec<u8>,
    done: bool,
}

impl<R: Read> fmt::Debug for DeltaStreamReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeltaStreamReader")
            .field("file", &self.file)
            .field("header", &self.header)
            .field("pos", &self.pos)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<R: Read> DeltaStreamReader<R> {
    /// Reads and validates the header. `file` names the stream in errors.
    pub fn new(mut r: R, file: &Path) -> Result<Self, FormatError> {
        let mut hbuf = vec![0u8; HEADER_LEN];
        read_struct(&mut r, &mut hbuf, 0, "delta header", file)?;
        let (header, header_crc) = DeltaHeader::parse_with_crc(&hbuf, file)?;
        Ok(Self {
            r,
            file: file.to_path_buf(),
            seq: Sequence::new(header.volume_size),
            header,
            header_crc,
            pos: HEADER_LEN as u64,
            entries: Vec::new(),
            dec: new_decompressor(file)?,
            stored: Vec::new(),
            data: Vec::new(),
            done: false,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    /// The next extent and its data (empty for a zero extent), or `None` after the index
    /// and trailer were read and matched every record.
    pub fn next_extent(&mut self) -> Result<Option<StreamExtent<'_>>, FormatError> {
        if self.done {
            return Ok(None);
        }
        let at = self.pos;
        let mut magic = [0u8; 4];
        read_struct(
            &mut self.r,
            &mut magic,
            at,
            "delta record or index",
            &self.file,
        )?;
        if magic == INDEX_MAGIC {
            self.finish_stream(magic)?;
            return Ok(None);
        }
        let mut hbuf = [0u8; RECORD_HEADER_LEN];
        hbuf[..4].copy_from_slice(&magic);
        read_struct(
            &mut self.r,
            &mut hbuf[4..],
            at + 4,
            "delta record header",
            &self.file,
        )?;
        let e = parse_record_header(&hbuf, at, &self.file)?;
        self.seq
            .accept(&e)
            .map_err(|f| FormatError::invalid(&self.file, at, f))?;
        read_and_decode(
            &mut self.r,
            &mut self.dec,
            &e,
            &mut self.stored,
            &mut self.data,
            &self.file,
        )?;
        self.pos = e.record_end();
        self.entries.push(e);
        Ok(Some((e, &self.data)))
    }

    fn finish_stream(&mut self, magic: [u8; 4]) -> Result<(), FormatError> {
        let file = self.file.clone();
        let index_offset = self.pos;
        let mut ih = [0u8; INDEX_HEADER_LEN];
        ih[..4].copy_from_slice(&magic);
        read_struct(
            &mut self.r,
            &mut ih[4..],
            index_offset + 4,
            "delta index header",
            &file,
        )?;
        let count = parse_index_header(&ih, index_offset, &file)?;
        if count != self.entries.len() as u64 {
            return Err(FormatError::invalid(
                &file,
                index_offset + offset_of!(RawIndexHeader, count) as u64,
                InvalidField::new(
                    "count",
                    format!(
                        "index holds {count} entries, {} records were read",
                        self.entries.len()
                    ),
                ),
            ));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&ih);
        let mut at = index_offset + INDEX_HEADER_LEN as u64;
        for expected in &self.entries {
            let mut eb = [0u8; INDEX_ENTRY_LEN];
            read_struct(&mut self.r, &mut eb, at, "delta index entry", &file)?;
            crc.update(&eb);
            if eb != expected.index_entry() {
                return Err(FormatError::invalid(
                    &file,
                    at,
                    InvalidField::new("index", "the index entry does not match its record"),
                ));
            }
            at += INDEX_ENTRY_LEN as u64;
        }
        let mut tbuf = [0u8; TRAILER_LEN];
        read_struct(&mut self.r, &mut tbuf, at, "delta trailer", &file)?;
        let (t_index_offset, t_count, t_data_bytes, t_index_crc, t_header_crc) =
            parse_trailer(&tbuf, at, &file)?;
        let index_crc = crc.finalize();
        let checks: [(bool, &'static str, usize); 5] = [
            (
                t_index_offset == index_offset,
                "index_offset",
                offset_of!(RawTrailer, index_offset),
            ),
            (
                t_count == count,
                "extent_count",
                offset_of!(RawTrailer, extent_count),
            ),
            (
                t_data_bytes == self.seq.data_bytes,
                "data_bytes",
                offset_of!(RawTrailer, data_bytes),
            ),
            (
                t_index_crc == index_crc,
                "index_crc",
                offset_of!(RawTrailer, index_crc),
            ),
            (
                t_header_crc == self.header_crc,
                "header_crc",
                offset_of!(RawTrailer, header_crc),
            ),
        ];
        for (ok, field, off) in checks {
            if !ok {
                return Err(FormatError::invalid(
                    &file,
                    at + off as u64,
                    InvalidField::new(field, "does not match the records and index read"),
                ));
            }
        }
        let end = at + TRAILER_LEN as u64;
        let mut extra = [0u8; 1];
        if read_full(&mut self.r, &mut extra).map_err(|e| FormatError::io(&file, end, e))? != 0 {
            return Err(FormatError::new(
                &file,
                end,
                FormatErrorKind::TrailingBytes {
                    what: "delta trailer",
                    extra: 1,
                },
            ));
        }
        self.done = true;
        self.pos = end;
        Ok(())
    }
}
