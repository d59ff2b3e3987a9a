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

use std::fmt;

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

// ---------------------------------------------------------------------------------------
// Handshake

/// The server's greeting: NBDMAGIC, IHAVEOPT and the handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Parse the server's greeting (client side); returns the handshake flags.
pub fn parse_greeting(bytes: &[u8]) -> Result<u16, ProtoError> {
    let mut r = Reader::new(bytes, "server greeting");
    let magic = r.u64()?;
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "server greeting",
            found: magic,
            expected: NBD_MAGIC,
        });
    }
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        // 0x00420281861253 is oldstyle, which we do not speak.
        return Err(ProtoError::BadMagic {
            what: "server greeting (oldstyle servers are not supported)",
            found: magic,
            expected: IHAVEOPT,
        });
    }
    r.u16()
}

// ---------------------------------------------------------------------------------------
// Options (client -> server)

/// The fixed part of an option: which option and how many payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code (see [`opt`]).
    pub option: u32,
    /// Payload length.
    pub length: u32,
}

/// Parse the 16-byte option header.
pub fn parse_option_header(bytes: &[u8]) -> Result<OptionHeader, ProtoError> {
    let mut r = Reader::new(bytes, "option header");
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option header",
            found: magic,
            expected: IHAVEOPT,
        });
    }
    Ok(OptionHeader {
        option: r.u32()?,
        length: r.u32()?,
    })
}

/// An export name and the information items a client asks for (INFO and GO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name.
    pub name: String,
    /// Requested information types (see [`info`]).
    pub items: Vec<u16>,
}

/// An export name and context queries (LIST_META_CONTEXT and SET_META_CONTEXT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export name.
    pub name: String,
    /// Queries such as `base:allocation`, `qemu:dirty-bitmap:` or `base:`.
    pub queries: Vec<String>,
}

/// A parsed option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// NBD_OPT_EXPORT_NAME.
    ExportName(String),
    /// NBD_OPT_ABORT.
    Abort,
    /// NBD_OPT_LIST.
    List,
    /// NBD_OPT_STARTTLS.
    StartTls,
    /// NBD_OPT_INFO.
    Info(InfoRequest),
    /// NBD_OPT_GO.
    Go(InfoRequest),
    /// NBD_OPT_STRUCTURED_REPLY.
    StructuredReply,
    /// NBD_OPT_LIST_META_CONTEXT.
    ListMetaContext(MetaRequest),
    /// NBD_OPT_SET_META_CONTEXT.
    SetMetaContext(MetaRequest),
    /// NBD_OPT_EXTENDED_HEADERS.
    ExtendedHeaders,
    /// Any other option code.
    Unknown(u32),
}

fn expect_empty(data: &[u8], what: &'static str) -> Result<(), ProtoError> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(invalid(
            what,
            format!("takes no payload but {} bytes were sent", data.len()),
        ))
    }
}

/// Parse an option's payload. Errors mean NBD_REP_ERR_INVALID (the framing is intact).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
    match option {
        opt::EXPORT_NAME => {
            let mut r = Reader::new(data, "NBD_OPT_EXPORT_NAME");
            Ok(ClientOption::ExportName(r.string(data.len())?))
        }
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => expect_empty(data, "NBD_OPT_LIST").map(|()| ClientOption::List),
        opt::STARTTLS => Ok(ClientOption::StartTls),
        opt::INFO | opt::GO => {
            let what = if option == opt::INFO {
                "NBD_OPT_INFO"
            } else {
                "NBD_OPT_GO"
            };
            let mut r = Reader::new(data, what);
            let name = r.string32()?;
            let count = r.u16()? as usize;
            if r.remaining() != count * 2 {
                return Err(invalid(
                    what,
                    format!(
                        "{count} information requests need {} bytes, {} sent",
                        count * 2,
                        r.remaining()
                    ),
                ));
            }
            let items = (0..count).map(|_| r.u16()).collect::<Result<Vec<_>, _>>()?;
            let request = InfoRequest { name, items };
            Ok(if option == opt::INFO {
                ClientOption::Info(request)
            } else {
                ClientOption::Go(request)
            })
        }
        opt::STRUCTURED_REPLY => {
            expect_empty(data, "NBD_OPT_STRUCTURED_REPLY").map(|()| ClientOption::StructuredReply)
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            let what = if option == opt::LIST_META_CONTEXT {
                "NBD_OPT_LIST_META_CONTEXT"
            } else {
                "NBD_OPT_SET_META_CONTEXT"
            };
            let mut r = Reader::new(data, what);
            let name = r.string32()?;
            let count = r.u32()? as usize;
            // Each query takes at least its 4-byte length: bound the count before allocating.
            if count > r.remaining() / 4 {
                return Err(invalid(
                    what,
                    format!("{count} queries do not fit in {} bytes", r.remaining()),
                ));
            }
            let mut queries = Vec::with_capacity(count);
            for _ in 0..count {
                queries.push(r.string32()?);
            }
            r.finish()?;
            let request = MetaRequest { name, queries };
            Ok(if option == opt::LIST_META_CONTEXT {
                ClientOption::ListMetaContext(request)
            } else {
                ClientOption::SetMetaContext(request)
            })
        }
        opt::EXTENDED_HEADERS => {
            expect_empty(data, "NBD_OPT_EXTENDED_HEADERS").map(|()| ClientOption::ExtendedHeaders)
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Encode an option (client side): header and payload.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    put_u64(&mut out, IHAVEOPT);
    put_u32(&mut out, option);
    put_u32(&mut out, data.len() as u32);
    out.extend_from_slice(data);
    out
}

/// The payload of INFO/GO.
pub fn encode_info_request(request: &InfoRequest) -> Vec<u8> {
    let mut out = Vec::new();
    put_string32(&mut out, &request.name);
    put_u16(&mut out, request.items.len() as u16);
    for item in &request.items {
        put_u16(&mut out, *item);
    }
    out
}

/// The payload of LIST_META_CONTEXT/SET_META_CONTEXT.
pub fn encode_meta_request(request: &MetaRequest) -> Vec<u8> {
    let mut out = Vec::new();
    put_string32(&mut out, &request.name);
    put_u32(&mut out, request.queries.len() as u32);
    for query in &request.queries {
        put_string32(&mut out, query);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Option replies (server -> client)

/// Append an option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply);
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option replied to.
    pub option: u32,
    /// The reply type (see [`rep`]).
    pub reply: u32,
    /// Payload length.
    pub length: u32,
}

/// Parse a 20-byte option reply header (client side).
pub fn parse_option_reply_header(bytes: &[u8]) -> Result<OptionReplyHeader, ProtoError> {
    let mut r = Reader::new(bytes, "option reply header");
    let magic = r.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply header",
            found: magic,
            expected: OPTION_REPLY_MAGIC,
        });
    }
    Ok(OptionReplyHeader {
        option: r.u32()?,
        reply: r.u32()?,
        length: r.u32()?,
    })
}

/// The payload of NBD_REP_SERVER.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_string32(&mut out, name);
    out.extend_from_slice(description.as_bytes());
    out
}

/// Parse NBD_REP_SERVER: the export name and its (possibly empty) description.
pub fn parse_rep_server(data: &[u8]) -> Result<(String, String), ProtoError> {
    let mut r = Reader::new(data, "NBD_REP_SERVER");
    let name = r.string32()?;
    let rest = r.remaining();
    let description = r.string(rest)?;
    Ok((name, description))
}

/// The payload of NBD_REP_META_CONTEXT.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    put_u32(&mut out, id);
    out.extend_from_slice(name.as_bytes());
    out
}

/// Parse NBD_REP_META_CONTEXT: the context id and name.
pub fn parse_rep_meta_context(data: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut r = Reader::new(data, "NBD_REP_META_CONTEXT");
    let id = r.u32()?;
    let rest = r.remaining();
    Ok((id, r.string(rest)?))
}

/// NBD_INFO_EXPORT.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    put_u16(&mut out, info::EXPORT);
    put_u64(&mut out, size);
    put_u16(&mut out, flags);
    out
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
pub fn encode_info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    put_u16(&mut out, kind);
    out.extend_from_slice(text.as_bytes());
    out
}

/// NBD_INFO_BLOCK_SIZE.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    put_u16(&mut out, info::BLOCK_SIZE);
    put_u32(&mut out, minimum);
    put_u32(&mut out, preferred);
    put_u32(&mut out, maximum);
    out
}

/// One NBD_REP_INFO item, parsed (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// Size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Canonical name.
    Name(String),
    /// Description.
    Description(String),
    /// Block size constraints.
    BlockSize {
        /// Minimum.
        minimum: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum.
        maximum: u32,
    },
    /// An information type this client does not know (ignored, as the spec says).
    Unknown(u16),
}

/// Parse an NBD_REP_INFO payload.
pub fn parse_info_reply(data: &[u8]) -> Result<InfoReply, ProtoError> {
    let mut r = Reader::new(data, "NBD_REP_INFO");
    let kind = r.u16()?;
    let reply = match kind {
        info::EXPORT => InfoReply::Export {
            size: r.u64()?,
            flags: r.u16()?,
        },
        info::NAME | info::DESCRIPTION => {
            let rest = r.remaining();
            let text = r.string(rest)?;
            if kind == info::NAME {
                InfoReply::Name(text)
            } else {
                InfoReply::Description(text)
            }
        }
        info::BLOCK_SIZE => InfoReply::BlockSize {
            minimum: r.u32()?,
            preferred: r.u32()?,
            maximum: r.u32()?,
        },
        other => return Ok(InfoReply::Unknown(other)),
    };
    r.finish()?;
    Ok(reply)
}

// ---------------------------------------------------------------------------------------
// Requests (client -> server)

/// Command codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_DISC.
    Disc,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_CACHE.
    Cache,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
    /// Anything else (answered with EINVAL).
    Unknown(u16),
}

impl Command {
    /// From the wire value.
    pub fn from_wire(value: u16) -> Command {
        match value {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(other) => other,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disc => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::Cache => "CACHE",
            Command::WriteZeroes => "WRITE_ZEROES",
            Command::BlockStatus => "BLOCK_STATUS",
            Command::Unknown(code) => return write!(f, "unknown command {code}"),
        };
        f.write_str(name)
    }
}

/// A request header, compact or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (see [`cflags`]).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length (32 bits in compact headers).
    pub length: u64,
}

/// Parse a request header; `extended` selects the 32-byte form.
pub fn parse_request(bytes: &[u8], extended: bool) -> Result<Request, ProtoError> {
    let mut r = Reader::new(bytes, "request header");
    let magic = r.u32()?;
    let expected = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Err(ProtoError::BadMagic {
            what: "request header",
            found: magic.into(),
            expected: expected.into(),
        });
    }
    let flags = r.u16()?;
    let command = Command::from_wire(r.u16()?);
    let cookie = r.u64()?;
    let offset = r.u64()?;
    let length = if extended { r.u64()? } else { r.u32()?.into() };
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}

/// Append a request header (client side); the length must fit 32 bits unless `extended`.
pub fn encode_request(out: &mut Vec<u8>, request: &Request, extended: bool) {
    put_u32(
        out,
        if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        },
    );
    put_u16(out, request.flags);
    put_u16(out, request.command.to_wire());
    put_u64(out, request.cookie);
    put_u64(out, request.offset);
    if extended {
        put_u64(out, request.length);
    } else {
        put_u32(out, request.length as u32);
    }
}

// ---------------------------------------------------------------------------------------
// Replies (server -> client)

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

/// Append a simple reply header.
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    put_u32(out, SIMPLE_REPLY_MAGIC);
    put_u32(out, error);
    put_u64(out, cookie);
}

/// Write a chunk header into `out[..mode.chunk_header_len()]` (structured or extended).
/// `offset` is the request's offset (extended headers echo it).
pub fn write_chunk_header(
    out: &mut [u8],
    mode: HeaderMode,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) {
    if mode == HeaderMode::Extended {
        out[..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&kind.to_be_bytes());
        out[8..16].copy_from_slice(&cookie.to_be_bytes());
        out[16..24].copy_from_slice(&offset.to_be_bytes());
        out[24..32].copy_from_slice(&length.to_be_bytes());
    } else {
        out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&kind.to_be_bytes());
        out[8..16].copy_from_slice(&cookie.to_be_bytes());
        out[16..20].copy_from_slice(&(length as u32).to_be_bytes());
    }
}

/// Append a chunk header.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) {
    let start = out.len();
    out.resize(start + mode.chunk_header_len(), 0);
    write_chunk_header(&mut out[start..], mode, flags, kind, cookie, offset, length);
}

/// Append a final NBD_REPLY_TYPE_ERROR chunk with a message (truncated to fit).
pub fn encode_error_chunk(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    cookie: u64,
    offset: u64,
    error: u32,
    message: &str,
) {
    let mut text = message.as_bytes();
    if text.len() > MAX_STRING {
        text = &text[..MAX_STRING];
    }
    // Keep whole UTF-8 characters when truncating.
    while std::str::from_utf8(text).is_err() {
        text = &text[..text.len() - 1];
    }
    encode_chunk_header(
        out,
        mode,
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        offset,
        6 + text.len() as u64,
    );
    put_u32(out, error);
    put_u16(out, text.len() as u16);
    out.extend_from_slice(text);
}

/// Append a final NBD_REPLY_TYPE_NONE chunk.
pub fn encode_none_chunk(out: &mut Vec<u8>, mode: HeaderMode, cookie: u64, offset: u64) {
    encode_chunk_header(out, mode, chunk::FLAG_DONE, chunk::NONE, cookie, offset, 0);
}

/// Append an OFFSET_HOLE chunk.
pub fn encode_hole_chunk(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    flags: u16,
    cookie: u64,
    request_offset: u64,
    offset: u64,
    length: u32,
) {
    encode_chunk_header(
        out,
        mode,
        flags,
        chunk::OFFSET_HOLE,
        cookie,
        request_offset,
        12,
    );
    put_u64(out, offset);
    put_u32(out, length);
}

/// Append a block status chunk for one context: BLOCK_STATUS (32-bit descriptors)
/// unless `mode` is extended (BLOCK_STATUS_EXT). Extents must fit 32 bits in the former.
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    flags: u16,
    cookie: u64,
    offset: u64,
    context_id: u32,
    extents: &[(u64, u32)],
) {
    if mode == HeaderMode::Extended {
        let length = 8 + 16 * extents.len() as u64;
        encode_chunk_header(
            out,
            mode,
            flags,
            chunk::BLOCK_STATUS_EXT,
            cookie,
            offset,
            length,
        );
        put_u32(out, context_id);
        put_u32(out, extents.len() as u32);
        for &(len, state) in extents {
            put_u64(out, len);
            put_u64(out, state.into());
        }
    } else {
        let length = 4 + 8 * extents.len() as u64;
        encode_chunk_header(
            out,
            mode,
            flags,
            chunk::BLOCK_STATUS,
            cookie,
            offset,
            length,
        );
        put_u32(out, context_id);
        for &(len, state) in extents {
            put_u32(out, len as u32);
            put_u32(out, state);
        }
    }
}

/// A reply header as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (READ data of the request's length follows on success).
    Simple {
        /// Errno, 0 for success.
        error: u32,
        /// Cookie of the request.
        cookie: u64,
    },
    /// A structured or extended chunk with `length` payload bytes following.
    Chunk {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Cookie of the request.
        cookie: u64,
        /// Payload length.
        length: u64,
    },
}

/// How many header bytes follow the 4-byte magic of a reply, or an error for a bad magic.
pub fn reply_header_rest(magic: u32) -> Result<usize, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN - 4),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN - 4),
        EXTENDED_REPLY_MAGIC => Ok(EXTENDED_REPLY_LEN - 4),
        other => Err(ProtoError::BadMagic {
            what: "reply header",
            found: other.into(),
            expected: SIMPLE_REPLY_MAGIC.into(),
        }),
    }
}

/// Parse a whole reply header (magic included).
pub fn parse_reply_header(bytes: &[u8]) -> Result<ReplyHeader, ProtoError> {
    let mut r = Reader::new(bytes, "reply header");
    let magic = r.u32()?;
    let rest = reply_header_rest(magic)?;
    let mut r = Reader::new(r.take(rest)?, "reply header");
    let header = match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: r.u32()?,
            cookie: r.u64()?,
        },
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            length: r.u32()?.into(),
        },
        _ => {
            let flags = r.u16()?;
            let kind = r.u16()?;
            let cookie = r.u64()?;
            let _offset = r.u64()?;
            ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                length: r.u64()?,
            }
        }
    };
    r.finish()?;
    Ok(header)
}

/// A chunk payload other than OFFSET_DATA (whose data the client reads in place).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload {
    /// NBD_REPLY_TYPE_NONE.
    None,
    /// OFFSET_HOLE.
    Hole {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
    },
    /// BLOCK_STATUS or BLOCK_STATUS_EXT, widened.
    BlockStatus {
        /// The context id.
        context_id: u32,
        /// (length, flags) descriptors.
        extents: Vec<(u64, u64)>,
    },
    /// An error chunk.
    Error {
        /// The errno.
        error: u32,
        /// The message.
        message: String,
        /// ERROR_OFFSET's offset.
        offset: Option<u64>,
    },
}

/// Parse a chunk payload of type `kind` (not OFFSET_DATA).
pub fn parse_chunk_payload(kind: u16, data: &[u8]) -> Result<ChunkPayload, ProtoError> {
    let mut r = Reader::new(data, "reply chunk");
    let payload = match kind {
        chunk::NONE => ChunkPayload::None,
        chunk::OFFSET_HOLE => {
            let offset = r.u64()?;
            let length = r.u32()?;
            if length == 0 {
                return Err(invalid("OFFSET_HOLE chunk", "zero-length hole"));
            }
            ChunkPayload::Hole { offset, length }
        }
        chunk::BLOCK_STATUS => {
            let context_id = r.u32()?;
            if r.remaining() == 0 || r.remaining() % 8 != 0 {
                return Err(invalid(
                    "BLOCK_STATUS chunk",
                    format!(
                        "{} descriptor bytes is not a positive multiple of 8",
                        r.remaining()
                    ),
                ));
            }
            let mut extents = Vec::with_capacity(r.remaining() / 8);
            while r.remaining() > 0 {
                extents.push((r.u32()?.into(), r.u32()?.into()));
            }
            ChunkPayload::BlockStatus {
                context_id,
                extents,
            }
        }
        chunk::BLOCK_STATUS_EXT => {
            let context_id = r.u32()?;
            let count = r.u32()? as usize;
            if count == 0 || r.remaining() != count.saturating_mul(16) {
                return Err(invalid(
                    "BLOCK_STATUS_EXT chunk",
                    format!("{count} descriptors do not match {} bytes", r.remaining()),
                ));
            }
            let mut extents = Vec::with_capacity(count);
            for _ in 0..count {
                extents.push((r.u64()?, r.u64()?));
            }
            ChunkPayload::BlockStatus {
                context_id,
                extents,
            }
        }
        k if chunk::is_error(k) => {
            let error = r.u32()?;
            let len = r.u16()? as usize;
            let message = String::from_utf8_lossy(r.take(len)?).into_owned();
            let offset = if k == chunk::ERROR_OFFSET {
                Some(r.u64()?)
            } else {
                None
            };
            // Unknown error chunk types may carry more fields: ignore them.
            return Ok(ChunkPayload::Error {
                error: if error == 0 { 5 } else { error },
                message,
                offset,
            });
        }
        other => {
            return Err(invalid(
                "reply chunk",
                format!("unexpected chunk type {other}"),
            ))
        }
    };
    r.finish()?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_round_trips_through_the_codec() {
        let go = InfoRequest {
            name: "disk".into(),
            items: vec![info::BLOCK_SIZE, info::NAME],
        };
        let bytes = encode_option(opt::GO, &encode_info_request(&go));
        let header = parse_option_header(&bytes[..16]).unwrap();
        assert_eq!(
            header,
            OptionHeader {
                option: opt::GO,
                length: bytes.len() as u32 - 16
            }
        );
        assert_eq!(
            parse_option(header.option, &bytes[16..]).unwrap(),
            ClientOption::Go(go)
        );

        let meta = MetaRequest {
            name: "".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        let payload = encode_meta_request(&meta);
        assert_eq!(
            parse_option(opt::SET_META_CONTEXT, &payload).unwrap(),
            ClientOption::SetMetaContext(meta)
        );
    }

    #[test]
    fn option_parser_rejects_lies_about_lengths() {
        // Name length larger than the payload.
        let mut bad = Vec::new();
        put_u32(&mut bad, 100);
        bad.extend_from_slice(b"abc");
        assert!(parse_option(opt::GO, &bad).is_err());
        // Query count that cannot fit.
        let mut bad = Vec::new();
        put_string32(&mut bad, "x");
        put_u32(&mut bad, u32::MAX);
        assert!(parse_option(opt::LIST_META_CONTEXT, &bad).is_err());
        // Info count mismatch.
        let mut bad = Vec::new();
        put_string32(&mut bad, "x");
        put_u16(&mut bad, 3);
        put_u16(&mut bad, 0);
        assert!(parse_option(opt::INFO, &bad).is_err());
        // Payload on an option that takes none.
        assert!(parse_option(opt::STRUCTURED_REPLY, b"x").is_err());
        assert!(parse_option(opt::LIST, b"x").is_err());
        // NUL in a name.
        assert!(parse_option(opt::EXPORT_NAME, b"a\0b").is_err());
    }

    #[test]
    fn unknown_options_parse_as_unknown() {
        assert_eq!(
            parse_option(4242, b"whatever").unwrap(),
            ClientOption::Unknown(4242)
        );
    }

    #[test]
    fn requests_round_trip_in_both_header_modes() {
        let req = Request {
            flags: cflags::FUA,
            command: Command::Write,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        for extended in [false, true] {
            let mut out = Vec::new();
            encode_request(&mut out, &req, extended);
            assert_eq!(out.len(), if extended { 32 } else { 28 });
            assert_eq!(parse_request(&out, extended).unwrap(), req);
            // The other mode's magic is refused.
            assert!(matches!(
                parse_request(&out, !extended),
                Err(ProtoError::BadMagic { .. }) | Err(ProtoError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn chunks_round_trip_through_the_client_parser() {
        for mode in [HeaderMode::Structured, HeaderMode::Extended] {
            let mut out = Vec::new();
            encode_block_status_chunk(
                &mut out,
                mode,
                chunk::FLAG_DONE,
                9,
                0,
                3,
                &[(4096, 3), (8192, 0)],
            );
            let hlen = mode.chunk_header_len();
            let header = parse_reply_header(&out[..hlen]).unwrap();
            let ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                length,
            } = header
            else {
                panic!("not a chunk")
            };
            assert_eq!(
                (flags, cookie, length as usize),
                (chunk::FLAG_DONE, 9, out.len() - hlen)
            );
            assert_eq!(
                parse_chunk_payload(kind, &out[hlen..]).unwrap(),
                ChunkPayload::BlockStatus {
                    context_id: 3,
                    extents: vec![(4096, 3), (8192, 0)]
                }
            );

            let mut out = Vec::new();
            encode_error_chunk(&mut out, mode, 1, 0, 22, "bad");
            let ReplyHeader::Chunk { kind, .. } = parse_reply_header(&out[..hlen]).unwrap() else {
                panic!()
            };
            assert_eq!(
                parse_chunk_payload(kind, &out[hlen..]).unwrap(),
                ChunkPayload::Error {
                    error: 22,
                    message: "bad".into(),
                    offset: None
                }
            );
        }
    }

    #[test]
    fn error_messages_are_truncated_on_character_boundaries() {
        let long = "é".repeat(3000);
        let mut out = Vec::new();
        encode_error_chunk(&mut out, HeaderMode::Structured, 1, 0, 5, &long);
        let ReplyHeader::Chunk { kind, length, .. } = parse_reply_header(&out[..20]).unwrap()
        else {
            panic!()
        };
        assert_eq!(length as usize, out.len() - 20);
        let ChunkPayload::Error { message, .. } = parse_chunk_payload(kind, &out[20..]).unwrap()
        else {
            panic!()
        };
        assert!(message.len() <= MAX_STRING && !message.contains('\u{fffd}'));
    }

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

    #[test]
    fn info_replies_round_trip() {
        assert_eq!(
            parse_info_reply(&encode_info_export(1 << 30, 3)).unwrap(),
            InfoReply::Export {
                size: 1 << 30,
                flags: 3
            }
        );
        assert_eq!(
            parse_info_reply(&encode_info_block_size(1, 4096, MAX_PAYLOAD)).unwrap(),
            InfoReply::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_PAYLOAD
            }
        );
        assert_eq!(
            parse_info_reply(&encode_info_text(info::NAME, "n")).unwrap(),
            InfoReply::Name("n".into())
        );
    }
}
