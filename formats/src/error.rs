//! The one error every parser in this crate returns: which file, which byte, what is wrong.
//!
//! A [`FormatError`] always names the file and the byte offset where the problem was found,
//! so an operator can tell a truncated copy (offset near the end) from a flipped bit in a
//! header (offset < 4096) without a hex dump.

use std::error::Error;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A file (or part of one) failed to parse or validate.
///
/// Display: `"{file}: at byte {offset}: {kind}"`. The kind is part of the message, so the
/// error's source is the kind's own source (an I/O or JSON error), not the kind again.
#[derive(Debug)]
pub struct FormatError {
    /// The file being read (or the name the caller gave a stream).
    pub file: PathBuf,
    /// Byte offset in that file where the problem was found.
    pub offset: u64,
    /// What is wrong.
    pub kind: FormatErrorKind,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: at byte {}: {}",
            self.file.display(),
            self.offset,
            self.kind
        )
    }
}

impl Error for FormatError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.kind.source()
    }
}

impl FormatError {
    /// An error at `offset` of `file`.
    pub fn new(file: &Path, offset: u64, kind: FormatErrorKind) -> Self {
        Self {
            file: file.to_path_buf(),
            offset,
            kind,
        }
    }

    /// An I/O error while reading or writing `file` at `offset`.
    pub fn io(file: &Path, offset: u64, source: io::Error) -> Self {
        Self::new(file, offset, FormatErrorKind::Io(source))
    }

    /// A field at `offset` of `file` holds a value this version refuses.
    pub fn invalid(file: &Path, offset: u64, err: InvalidField) -> Self {
        Self::new(file, offset, FormatErrorKind::Invalid(err))
    }
}

/// What is wrong with the bytes at [`FormatError::offset`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatErrorKind {
    /// Reading or writing failed.
    #[error("I/O error")]
    Io(#[source] io::Error),
    /// The file ends before a structure it must contain.
    #[error(
        "file is cut short: {what} needs {needed} bytes here, only {available} are present \
         (the file was truncated; copy it again or use another backup)"
    )]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// Bytes the structure needs from the offset.
        needed: u64,
        /// Bytes actually present from the offset.
        available: u64,
    },
    /// The file continues past where its structure says it ends.
    #[error("{extra} unexpected bytes after the end of the {what} (the file is damaged or not this format)")]
    TrailingBytes {
        /// The structure that should have been last.
        what: &'static str,
        /// How many bytes follow it.
        extra: u64,
    },
    /// The magic number is not the one this file type starts with.
    #[error(
        "bad magic for a {what}: found {}, expected {} (wrong file, or the file is damaged)",
        Hex(found),
        Hex(expected)
    )]
    BadMagic {
        /// The file or record type expected here.
        what: &'static str,
        /// Bytes found.
        found: Vec<u8>,
        /// Bytes expected.
        expected: Vec<u8>,
    },
    /// The major version is one this build cannot read.
    #[error(
        "{what} format version {major}.{minor} is not supported (this build reads major \
         version {supported}; upgrade tidemark)"
    )]
    UnsupportedVersion {
        /// The file type.
        what: &'static str,
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
        /// The major version this build reads.
        supported: u16,
    },
    /// The file uses features this build does not know and must not ignore.
    #[error(
        "{what} uses incompatible features {bits:#x} this build does not know (upgrade tidemark)"
    )]
    UnknownIncompatFeatures {
        /// The file type.
        what: &'static str,
        /// The unknown incompatible feature bits.
        bits: u64,
    },
    /// A checksum does not match the bytes it covers.
    #[error(
        "{what} checksum mismatch: stored {stored:#010x}, computed {computed:#010x} (the file \
         is damaged; use another copy)"
    )]
    ChecksumMismatch {
        /// What the checksum covers.
        what: &'static str,
        /// The checksum stored in the file.
        stored: u32,
        /// The checksum of the bytes actually present.
        computed: u32,
    },
    /// The file does not end with the trailer its format requires.
    #[error(
        "no {what} trailer at the end of the file (found {}): the file was cut short while \
         being written or copied, or its end is damaged; write or copy it again",
        Hex(found)
    )]
    MissingTrailer {
        /// The file type.
        what: &'static str,
        /// The bytes found where the trailer magic should be.
        found: Vec<u8>,
    },
    /// A field holds a value that is out of range or contradicts another field.
    #[error(transparent)]
    Invalid(InvalidField),
    /// Compressed data failed to decompress to the length its record states.
    #[error("compressed payload is corrupt: {0}")]
    Decompress(String),
    /// A JSON file is not valid JSON or does not match its schema.
    #[error("invalid JSON")]
    Json(#[source] serde_json::Error),
}

/// A field value refused by validation, independent of any file.
///
/// Returned directly by constructors such as [`crate::bitmap::BitmapHeader::new`] and wrapped
/// in [`FormatErrorKind::Invalid`] by parsers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidField {
    /// The field name, as in docs/FORMATS.md.
    pub field: &'static str,
    /// Why the value is refused.
    pub reason: String,
}

impl InvalidField {
    /// `field` is invalid because `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Lowercase hex of a short byte string, for magic numbers in messages.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// An error and every source below it joined by ": ", as `main` prints it (anyhow's `{:#}`).
#[cfg(test)]
pub(crate) fn chain(err: &dyn Error) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_cause_is_printed_once_and_kept_in_the_chain() {
        let io = io::Error::new(io::ErrorKind::NotFound, "No such file or directory");
        let e = FormatError::io(Path::new("a.delta"), 0, io);
        assert_eq!(
            chain(&e),
            "a.delta: at byte 0: I/O error: No such file or directory"
        );
        assert!(e.source().is_some_and(|s| s.is::<io::Error>()));
    }

    #[test]
    fn invalid_field_is_printed_once() {
        let e = FormatError::invalid(
            Path::new("a.bitmap"),
            12,
            InvalidField::new("header_len", "must be 4096"),
        );
        assert_eq!(
            chain(&e),
            "a.bitmap: at byte 12: invalid header_len: must be 4096"
        );
    }

    #[test]
    fn json_cause_is_printed_once() {
        let json = serde_json::from_str::<u32>("x").unwrap_err();
        let cause = json.to_string();
        let e = FormatError::new(Path::new("m.json"), 0, FormatErrorKind::Json(json));
        assert_eq!(
            chain(&e),
            format!("m.json: at byte 0: invalid JSON: {cause}")
        );
    }

    #[test]
    fn display_names_file_and_offset() {
        let e = FormatError::new(
            Path::new("/var/lib/x.bitmap"),
            4096,
            FormatErrorKind::Truncated {
                what: "payload",
                needed: 8,
                available: 3,
            },
        );
        let s = e.to_string();
        assert!(
            s.starts_with("/var/lib/x.bitmap: at byte 4096: file is cut short"),
            "{s}"
        );
    }

    #[test]
    fn bad_magic_prints_hex() {
        let k = FormatErrorKind::BadMagic {
            what: "bitmap file",
            found: vec![0, 0xab],
            expected: b"TD".to_vec(),
        };
        assert!(
            k.to_string().contains("found 0x00ab, expected 0x5444"),
            "{k}"
        );
    }
}
