//! The 36-byte prefix every binary tidemark file header starts with, and its one check.
//!
//! The bitmap file, the delta file and the COW store share these bytes (docs/FORMATS.md,
//! "Common rules"); each format's own fields follow at offset 36.
//!
//! ```text
//! | Offset | Size | Field             | Meaning                                          |
//! |-------:|-----:|-------------------|--------------------------------------------------|
//! |      0 |    8 | magic             | the format's magic, e.g. "TDMKBMAP"              |
//! |      8 |    2 | major             | a reader refuses any major version but its own   |
//! |     10 |    2 | minor             | additions a reader of the same major may ignore  |
//! |     12 |    4 | header_len        | length of the whole header (checked per format)  |
//! |     16 |    8 | incompat_features | unknown bits: refuse the file                    |
//! |     24 |    8 | compat_features   | unknown bits: ignore (and keep)                  |
//! |     32 |    4 | header_crc        | CRC-32 of bytes 0..header_len, this field zeroed |
//! ```
//!
//! [`HeaderFormat::check`] runs the checks in the order docs/FORMATS.md fixes: magic, major
//! version, header crc, incompatible features. The crc comes before the feature bits so a
//! flipped feature bit reads as damage, not as a newer file. The caller has checked the
//! length before and checks its own fields (header_len first) after.

use std::mem::{offset_of, size_of};
use std::ops::Range;
use std::path::Path;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{FormatError, FormatErrorKind};

/// The prefix's on-disk layout; every format's raw header embeds it at offset 0.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawHeaderPrefix {
    magic: [u8; 8],                    // 0: the format's magic
    major: U16,                        // 8: major version
    pub(crate) minor: U16,             // 10: minor version
    pub(crate) header_len: U32,        // 12: length of the whole header
    pub(crate) incompat_features: U64, // 16: unknown bits refuse to open
    pub(crate) compat_features: U64,   // 24: unknown bits are ignored
    header_crc: U32,                   // 32: crc32 of the header with this field zeroed
}
const _: () = assert!(size_of::<RawHeaderPrefix>() == 36);

/// Where `header_len` lies in every header.
pub(crate) const HEADER_LEN_AT: usize = offset_of!(RawHeaderPrefix, header_len);
/// Where the header crc lies in every header.
pub(crate) const HEADER_CRC: Range<usize> =
    offset_of!(RawHeaderPrefix, header_crc)..offset_of!(RawHeaderPrefix, header_crc) + 4;

/// What one format expects of its header prefix.
#[derive(Debug)]
pub(crate) struct HeaderFormat {
    /// The file type, as errors name it ("bitmap file").
    pub(crate) what: &'static str,
    /// The header, as checksum errors name it ("bitmap header").
    pub(crate) header: &'static str,
    /// The first 8 bytes of every file of this format.
    pub(crate) magic: [u8; 8],
    /// The major version this build reads and writes.
    pub(crate) major: u16,
    /// The minor version this build writes.
    pub(crate) minor: u16,
    /// Incompatible feature bits this build understands.
    pub(crate) known_incompat: u64,
}

impl HeaderFormat {
    /// The prefix of a header `header_len` bytes long; its crc is zero until [`seal`].
    pub(crate) fn prefix(&self, header_len: usize, incompat: u64, compat: u64) -> RawHeaderPrefix {
        RawHeaderPrefix {
            magic: self.magic,
            major: U16::new(self.major),
            minor: U16::new(self.minor),
            header_len: U32::new(header_len as u32),
            incompat_features: U64::new(incompat),
            compat_features: U64::new(compat),
            header_crc: U32::new(0),
        }
    }

    /// Checks magic, major version, header crc and incompatible features of `header` (the
    /// whole header, crc field included), in that order. Returns the verified header crc.
    pub(crate) fn check(&self, header: &[u8], file: &Path) -> Result<u32, FormatError> {
        let (raw, _) = RawHeaderPrefix::ref_from_prefix(header).map_err(|_| {
            FormatError::new(
                file,
                header.len() as u64,
                FormatErrorKind::Truncated {
                    what: self.header,
                    needed: size_of::<RawHeaderPrefix>() as u64,
                    available: header.len() as u64,
                },
            )
        })?;
        if raw.magic != self.magic {
            return Err(FormatError::new(
                file,
                0,
                FormatErrorKind::BadMagic {
                    what: self.what,
                    found: raw.magic.to_vec(),
                    expected: self.magic.to_vec(),
                },
            ));
        }
        if raw.major.get() != self.major {
            return Err(FormatError::new(
                file,
                offset_of!(RawHeaderPrefix, major) as u64,
                FormatErrorKind::UnsupportedVersion {
                    what: self.what,
                    major: raw.major.get(),
                    minor: raw.minor.get(),
                    supported: self.major,
                },
            ));
        }
        let computed = crc32_with_zeroed_field(header, HEADER_CRC);
        if computed != raw.header_crc.get() {
            return Err(FormatError::new(
                file,
                HEADER_CRC.start as u64,
                FormatErrorKind::ChecksumMismatch {
                    what: self.header,
                    stored: raw.header_crc.get(),
                    computed,
                },
            ));
        }
        let unknown = raw.incompat_features.get() & !self.known_incompat;
        if unknown != 0 {
            return Err(FormatError::new(
                file,
                offset_of!(RawHeaderPrefix, incompat_features) as u64,
                FormatErrorKind::UnknownIncompatFeatures {
                    what: self.what,
                    bits: unknown,
                },
            ));
        }
        Ok(computed)
    }
}

/// Computes the crc of an encoded `header` (the whole header) and stores it in its field.
/// Returns the crc.
pub(crate) fn seal(header: &mut [u8]) -> u32 {
    let crc = crc32_with_zeroed_field(header, HEADER_CRC);
    header[HEADER_CRC].copy_from_slice(&crc.to_le_bytes());
    crc
}

/// crc32 of `bytes` as if the 4 bytes at `field` were zero.
pub(crate) fn crc32_with_zeroed_field(bytes: &[u8], field: Range<usize>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let (before, rest) = bytes.split_at(field.start.min(bytes.len()));
    let after = rest.get(field.len()..).unwrap_or(&[]);
    h.update(before);
    h.update(&[0u8; 4][..field.len().min(4)]);
    h.update(after);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: HeaderFormat = HeaderFormat {
        what: "test file",
        header: "test header",
        magic: *b"TDMKTEST",
        major: 1,
        minor: 0,
        known_incompat: 0b10,
    };

    fn sealed(incompat: u64) -> Vec<u8> {
        let mut header = FORMAT.prefix(64, incompat, 0).as_bytes().to_vec();
        header.resize(64, 0);
        seal(&mut header);
        header
    }

    #[test]
    fn sealed_prefix_passes_and_returns_its_crc() {
        let header = sealed(0b10);
        let crc = FORMAT.check(&header, Path::new("t")).unwrap();
        assert_eq!(header[HEADER_CRC], crc.to_le_bytes());
    }

    #[test]
    fn checks_run_magic_then_major_then_crc_then_features() {
        let mut header = sealed(0b1);
        let e = FORMAT.check(&header, Path::new("t")).unwrap_err();
        assert!(matches!(
            e.kind,
            FormatErrorKind::UnknownIncompatFeatures { bits: 1, .. }
        ));
        assert_eq!(e.offset, 16);
        header[40] ^= 1;
        let e = FORMAT.check(&header, Path::new("t")).unwrap_err();
        assert!(matches!(e.kind, FormatErrorKind::ChecksumMismatch { .. }));
        assert_eq!(e.offset, 32);
        header[8] = 2;
        let e = FORMAT.check(&header, Path::new("t")).unwrap_err();
        assert!(matches!(
            e.kind,
            FormatErrorKind::UnsupportedVersion { major: 2, .. }
        ));
        assert_eq!(e.offset, 8);
        header[0] = b'X';
        let e = FORMAT.check(&header, Path::new("t")).unwrap_err();
        assert!(matches!(e.kind, FormatErrorKind::BadMagic { .. }));
        assert_eq!(e.offset, 0);
    }

    #[test]
    fn short_input_is_truncated_not_a_panic() {
        let e = FORMAT.check(&sealed(0)[..20], Path::new("t")).unwrap_err();
        assert!(matches!(
            e.kind,
            FormatErrorKind::Truncated { needed: 36, .. }
        ));
    }
}
