//! Structured reply chunk payloads (NONE, ERROR, OFFSET_HOLE, BLOCK_STATUS), encoded by
//! the server and parsed by the client.

use super::*;

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
    use crate::proto::*;

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
}
