//! NBD wire codecs without I/O: every message of doc/proto.md as bytes <-> types.
//!
//! Parsers take byte slices that the caller has already read (a fixed-size header, or a
//! payload whose length the header announced and the caller bounded), and never panic:
//! every length is checked before a field is read. Encoders append to a `Vec<u8>`.
//!
//! ```text
//! handshake   S: u64 NBDMAGIC  u64 IHAVEOPT  u16 handshake flags
//!             C: u32 client flags
//! option      C: u64 IHAVEOPT  u32 option  u32 length  [length bytes]
//! opt reply   S: u64 0x3e889045565a9  u32 option  u32 reply type  u32 length  [bytes]
//! request     C: u32 0x25609513  u16 flags  u16 type  u64 cookie  u64 offset  u32 length
//! ext request C: u32 0x21e41c71  u16 flags  u16 type  u64 cookie  u64 offset  u64 length
//! simple      S: u32 0x67446698  u32 error  u64 cookie  [read data]
//! structured  S: u32 0x668e33ef  u16 flags  u16 type  u64 cookie  u32 length  [payload]
//! extended    S: u32 0x6e8a278c  u16 flags  u16 type  u64 cookie  u64 offset  u64 length
//! ```
//! All integers are big-endian.
//!
//! - `option`: the greeting, client options and the server's option replies;
//! - `request`: transmission requests (compact and extended headers);
//! - `reply`: reply headers, simple and chunked, both ways;
//! - `structured`: structured reply chunk payloads, both ways.
//!
//! Every item is re-exported here, so `proto::X` names each of them.

mod option;
mod reply;
mod request;
mod structured;

pub use option::*;
pub use reply::*;
pub use request::*;
pub use structured::*;

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle handshake magic, also the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// The magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (sent with the export size).
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export refuses writes.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The FUA flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF flag is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// RESIZE is supported.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// WRITE_ZEROES with FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// BLOCK_STATUS accepts a payload (extended headers).
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
}

/// Option codes.
pub mod opt {
    /// Enter transmission with a name, no way to fail softly.
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Ask about an export and enter transmission.
    pub const GO: u32 = 7;
    /// Structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// The option succeeded (final reply).
    pub const ACK: u32 = 1;
    /// One export in a LIST.
    pub const SERVER: u32 = 2;
    /// One information item of INFO/GO.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// Block size negotiation required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    /// The option payload is too big.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
    /// Extended headers required (or already negotiated).
    pub const ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

    /// Whether a reply type is an error.
    pub fn is_error(reply: u32) -> bool {
        reply & (1 << 31) != 0
    }
}

/// Information types of INFO/GO.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// A description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags.
pub mod cflags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES: keep the range allocated.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ: do not fragment the reply.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail unless fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types.
pub mod chunk {
    /// No payload; final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A run of zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// 32-bit block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// 64-bit block status descriptors (extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// An error for the whole request.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
    /// Flag: this is the last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;

    /// Whether a chunk type is an error chunk.
    pub fn is_error(kind: u16) -> bool {
        kind & (1 << 15) != 0
    }
}

/// Strings (export names, context names, messages) are at most this long (doc/proto.md).
pub const MAX_STRING: usize = 4096;
/// The largest option payload the server reads; longer ones are refused with ERR_TOO_BIG.
pub const MAX_OPTION_LENGTH: u32 = 64 * 1024;
/// The largest READ/WRITE payload (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The preferred block size advertised in NBD_INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK: u32 = 4096;
/// At most this many extents in one block status chunk (as QEMU sends).
pub const MAX_EXTENTS: usize = 131_072;

/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number is wrong: the peer does not speak NBD, or the stream is out of sync.
    #[error("bad magic {found:#x} in {what} (expected {expected:#x}): the peer is not speaking NBD or the stream lost sync")]
    BadMagic {
        /// The message being parsed.
        what: &'static str,
        /// The magic found.
        found: u64,
        /// The magic expected.
        expected: u64,
    },
    /// A message is shorter than its fields.
    #[error("{what} is truncated: {needed} bytes needed, {found} present")]
    Truncated {
        /// The message being parsed.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// A message is well framed but its contents are invalid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The message being parsed.
        what: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

fn invalid(what: &'static str, reason: impl Into<String>) -> ProtoError {
    ProtoError::Invalid {
        what,
        reason: reason.into(),
    }
}

/// A bounds-checked big-endian reader over a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Read `bytes`, naming the message `what` in errors.
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, what }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.bytes.len() < n {
            return Err(ProtoError::Truncated {
                what: self.what,
                needed: n,
                found: self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string of `len` bytes: UTF-8, no NUL, at most [`MAX_STRING`].
    pub fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(invalid(
                self.what,
                format!("string of {len} bytes exceeds {MAX_STRING}"),
            ));
        }
        let bytes = self.take(len)?;
        if bytes.contains(&0) {
            return Err(invalid(self.what, "string contains NUL"));
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| invalid(self.what, "string is not UTF-8"))
    }

    /// A u32 length followed by a string.
    pub fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        self.string(len)
    }

    /// Fails unless everything was consumed.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(invalid(
                self.what,
                format!("{} unexpected trailing bytes", self.bytes.len()),
            ))
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_string32(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

/// Which reply headers a connection uses, fixed by negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HeaderMode {
    /// Simple replies only.
    Simple,
    /// Structured replies (NBD_OPT_STRUCTURED_REPLY).
    Structured,
    /// Extended headers (NBD_OPT_EXTENDED_HEADERS): 64-bit requests and replies.
    Extended,
}

impl HeaderMode {
    /// Length of a request header in this mode.
    pub fn request_len(self) -> usize {
        if self == HeaderMode::Extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Length of a chunk header in this mode (structured or extended).
    pub fn chunk_header_len(self) -> usize {
        if self == HeaderMode::Extended {
            EXTENDED_REPLY_LEN
        } else {
            STRUCTURED_REPLY_LEN
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::*;

    #[test]
    fn bad_magic_is_reported() {
        assert!(matches!(
            parse_option_header(&[0u8; 16]),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(matches!(
            parse_reply_header(&[0u8; 16]),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(matches!(
            parse_greeting(&[0u8; 18]),
            Err(ProtoError::BadMagic { .. })
        ));
    }
}
