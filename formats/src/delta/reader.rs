//! The random-access delta reader: index and trailer checked at open, any extent on demand.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::mem::offset_of;
use std::path::{Path, PathBuf};

use super::record::{
    new_decompressor, parse_index_entry, parse_index_header, parse_record_header, parse_trailer,
    read_and_decode, read_struct, ExtentKind, IndexEntry, RawIndexHeader, RawTrailer, Sequence,
};
use super::{
    DeltaHeader, HEADER_LEN, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, MAX_EXTENTS, RECORD_HEADER_LEN,
    TRAILER_LEN,
};
use crate::error::{FormatError, FormatErrorKind, InvalidField};

/// Random-access reader: validates header, trailer and index at open, then reads any
/// extent (checksums verified on every read).
pub struct DeltaReader<R: Read + Seek> {
    r: R,
    file: PathBuf,
    header: DeltaHeader,
    entries: Vec<IndexEntry>,
    data_bytes: u64,
    dec: zstd::bulk::Decompressor<'static>,
    stored: Vec<u8>,
    /// The last data extent decoded by `read_at`: (index in `entries`, bytes).
    cache: Option<(usize, Vec<u8>)>,
}

impl<R: Read + Seek> fmt::Debug for DeltaReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeltaReader")
            .field("file", &self.file)
            .field("header", &self.header)
            .field("extents", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl<R: Read + Seek> DeltaReader<R> {
    /// Opens a delta: checks header, trailer and index (every checksum and every extent's
    /// bounds and order). Record payloads are checked when read. `file` names it in errors.
    pub fn open(mut r: R, file: &Path) -> Result<Self, FormatError> {
        let io = |at: u64| move |e: io::Error| FormatError::io(file, at, e);
        let file_len = r.seek(SeekFrom::End(0)).map_err(io(0))?;
        r.seek(SeekFrom::Start(0)).map_err(io(0))?;
        let mut hbuf = vec![0u8; HEADER_LEN];
        read_struct(&mut r, &mut hbuf, 0, "delta header", file)?;
        let (header, header_crc) = DeltaHeader::parse_with_crc(&hbuf, file)?;
        let min_len = (HEADER_LEN + INDEX_HEADER_LEN + TRAILER_LEN) as u64;
        if file_len < min_len {
            return Err(FormatError::new(
                file,
                file_len,
                FormatErrorKind::Truncated {
                    what: "delta index and trailer",
                    needed: min_len - HEADER_LEN as u64,
                    available: file_len - HEADER_LEN as u64,
                },
            ));
        }
        let trailer_at = file_len - TRAILER_LEN as u64;
        let mut tbuf = [0u8; TRAILER_LEN];
        r.seek(SeekFrom::Start(trailer_at))
            .map_err(io(trailer_at))?;
        read_struct(&mut r, &mut tbuf, trailer_at, "delta trailer", file)?;
        let (index_offset, count, data_bytes, index_crc, trailer_header_crc) =
            parse_trailer(&tbuf, trailer_at, file)?;
        let bad_trailer = |field: &'static str, off: usize, why: String| {
            FormatError::invalid(file, trailer_at + off as u64, InvalidField::new(field, why))
        };
        if trailer_header_crc != header_crc {
            return Err(bad_trailer(
                "header_crc",
                offset_of!(RawTrailer, header_crc),
                "the trailer belongs to a different header".into(),
            ));
        }
        if count > MAX_EXTENTS {
            return Err(bad_trailer(
                "extent_count",
                offset_of!(RawTrailer, extent_count),
                format!("{count} exceeds {MAX_EXTENTS}"),
            ));
        }
        let index_len = INDEX_HEADER_LEN as u64 + count * INDEX_ENTRY_LEN as u64;
        if index_offset < HEADER_LEN as u64
            || index_offset.checked_add(index_len) != Some(trailer_at)
        {
            return Err(bad_trailer(
                "index_offset",
                offset_of!(RawTrailer, index_offset),
                format!(
                    "index at {index_offset} with {count} entries does not end at the trailer \
                     ({trailer_at})"
                ),
            ));
        }
        // Read the index growing the buffer only as bytes arrive, then checksum it before
        // parsing a single entry.
        r.seek(SeekFrom::Start(index_offset))
            .map_err(io(index_offset))?;
        let mut index = Vec::new();
        (&mut r)
            .take(index_len)
            .read_to_end(&mut index)
            .map_err(io(index_offset))?;
        if (index.len() as u64) < index_len {
            return Err(FormatError::new(
                file,
                index_offset + index.len() as u64,
                FormatErrorKind::Truncated {
                    what: "delta index",
                    needed: index_len,
                    available: index.len() as u64,
                },
            ));
        }
        let computed = crc32fast::hash(&index);
        if computed != index_crc {
            return Err(FormatError::new(
                file,
                index_offset,
                FormatErrorKind::ChecksumMismatch {
                    what: "delta index",
                    stored: index_crc,
                    computed,
                },
            ));
        }
        let (ih, body) = index.split_at(INDEX_HEADER_LEN);
        let mut ih_arr = [0u8; INDEX_HEADER_LEN];
        ih_arr.copy_from_slice(ih);
        let index_count = parse_index_header(&ih_arr, index_offset, file)?;
        if index_count != count {
            return Err(FormatError::invalid(
                file,
                index_offset + offset_of!(RawIndexHeader, count) as u64,
                InvalidField::new(
                    "count",
                    format!("index holds {index_count} entries, the trailer says {count}"),
                ),
            ));
        }
        let mut seq = Sequence::new(header.volume_size);
        let mut entries = Vec::new();
        for (i, raw) in body.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
            let at = index_offset + (INDEX_HEADER_LEN + i * INDEX_ENTRY_LEN) as u64;
            let e = parse_index_entry(raw, at, file)?;
            seq.accept(&e)
                .map_err(|f| FormatError::invalid(file, at, f))?;
            entries.push(e);
        }
        if seq.next_record != index_offset {
            return Err(bad_trailer(
                "index_offset",
                offset_of!(RawTrailer, index_offset),
                format!(
                    "the records end at {} but the index starts at {index_offset}",
                    seq.next_record
                ),
            ));
        }
        if seq.data_bytes != data_bytes {
            return Err(bad_trailer(
                "data_bytes",
                offset_of!(RawTrailer, data_bytes),
                format!("{data_bytes}, but the index sums to {}", seq.data_bytes),
            ));
        }
        Ok(Self {
            r,
            file: file.to_path_buf(),
            header,
            entries,
            data_bytes,
            dec: new_decompressor(file)?,
            stored: Vec::new(),
            cache: None,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    /// Every extent, in increasing volume order.
    pub fn extents(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Total bytes of data extents (what a restore copies besides zeros).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// The extents overlapping volume bytes `offset..offset+len`, found by binary search.
    pub fn extents_overlapping(&self, offset: u64, len: u64) -> &[IndexEntry] {
        let end = offset.saturating_add(len);
        let first = self.entries.partition_point(|e| e.end() <= offset);
        let last = first + self.entries[first..].partition_point(|e| e.offset < end);
        &self.entries[first..last]
    }

    /// Reads extent `e` into `out`: record header checked against `e`, payload crc, then
    /// decompression and data crc. A zero extent leaves `out` empty (it reads as
    /// `e.length` zeros; write zeros or punch a hole).
    pub fn read_extent(&mut self, e: &IndexEntry, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let at = e.record_offset;
        self.r
            .seek(SeekFrom::Start(at))
            .map_err(|err| FormatError::io(&self.file, at, err))?;
        let mut hbuf = [0u8; RECORD_HEADER_LEN];
        read_struct(
            &mut self.r,
            &mut hbuf,
            at,
            "delta record header",
            &self.file,
        )?;
        let rec = parse_record_header(&hbuf, at, &self.file)?;
        if rec != *e {
            return Err(FormatError::invalid(
                &self.file,
                at,
                InvalidField::new("record", "the record header does not match its index entry"),
            ));
        }
        read_and_decode(
            &mut self.r,
            &mut self.dec,
            e,
            &mut self.stored,
            out,
            &self.file,
        )
    }

    /// Reads the `i`th extent of [`DeltaReader::extents`] into `out`, as `read_extent`.
    pub fn read_extent_at(&mut self, i: usize, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let e = *self.entries.get(i).ok_or_else(|| {
            FormatError::invalid(
                &self.file,
                0,
                InvalidField::new("extent", format!("no extent number {i}")),
            )
        })?;
        self.read_extent(&e, out)
    }

    /// Fills the parts of `buf` (volume bytes `offset..offset+buf.len()`) that this delta
    /// covers, data or zero; bytes it does not cover are left untouched. Returns true when
    /// every byte of the range was covered. The last data extent read is cached, so small
    /// sequential reads (an NBD client) decompress each record once.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<bool, FormatError> {
        let end = offset.saturating_add(buf.len() as u64);
        let first = self.entries.partition_point(|e| e.end() <= offset);
        let mut covered = 0u64;
        let mut i = first;
        while let Some(e) = self.entries.get(i).copied() {
            if e.offset >= end {
                break;
            }
            let lo = e.offset.max(offset);
            let hi = e.end().min(end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match e.kind {
                ExtentKind::Zero => dst.fill(0),
                ExtentKind::Data => {
                    if self.cache.as_ref().is_none_or(|(ci, _)| *ci != i) {
                        let mut data = self.cache.take().map(|(_, v)| v).unwrap_or_default();
                        self.read_extent(&e, &mut data)?;
                        self.cache = Some((i, data));
                    }
                    if let Some((_, data)) = &self.cache {
                        let from = (lo - e.offset) as usize;
                        dst.copy_from_slice(&data[from..from + dst.len()]);
                    }
                }
            }
            covered += hi - lo;
            i += 1;
        }
        Ok(covered == buf.len() as u64)
    }

    /// Gives back the underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }
}
