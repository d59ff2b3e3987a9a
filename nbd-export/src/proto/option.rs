//! The handshake phase: the greeting, client options and the server's option replies.

use super::*;

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

#[cfg(test)]
mod tests {
    use crate::proto::*;

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
