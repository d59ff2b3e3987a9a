//! Reply headers, server to client: simple replies and structured or extended chunk
//! headers, encoded by the server and parsed by the client.

use super::*;

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
