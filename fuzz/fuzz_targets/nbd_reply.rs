//! Any bytes as what a server sends the client: greeting, option replies, info items,
//! reply headers and chunk payloads. The client's parsers never panic and never accept
//! a chunk that contradicts its own length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_nbd::proto::{self, ChunkPayload, ReplyHeader};

fuzz_target!(|data: &[u8]| {
    let _ = proto::parse_greeting(data);
    let _ = proto::parse_option_reply_header(data);
    let _ = proto::parse_info_reply(data);
    let _ = proto::parse_rep_server(data);
    let _ = proto::parse_rep_meta_context(data);
    // A reply header, then its payload, as the client reads them.
    if data.len() >= 4 {
        let magic = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        if let Ok(rest) = proto::reply_header_rest(magic) {
            let header_len = 4 + rest;
            if data.len() >= header_len {
                let header = proto::parse_reply_header(&data[..header_len]).expect("a complete header parses");
                if let ReplyHeader::Chunk { kind, length, .. } = header {
                    let payload = &data[header_len..];
                    if length as usize == payload.len() && kind != proto::chunk::OFFSET_DATA {
                        let _ = proto::parse_chunk_payload(kind, payload);
                    }
                }
            }
        }
    }
    // Every chunk type against the whole input as payload.
    if data.len() >= 2 {
        let kind = u16::from_be_bytes([data[0], data[1]]);
        match proto::parse_chunk_payload(kind, &data[2..]) {
            Ok(ChunkPayload::BlockStatus { extents, .. }) => assert!(!extents.is_empty()),
            Ok(ChunkPayload::Hole { length, .. }) => assert!(length > 0),
            Ok(ChunkPayload::Error { error, .. }) => assert!(error != 0),
            _ => {}
        }
    }
});
