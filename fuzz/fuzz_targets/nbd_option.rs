//! Any bytes as a client's option stream: every option is parsed and run through the
//! server's negotiation state machine. Nothing may panic, and every reply the machine
//! writes must be a well-formed option reply.
//!
//! Input: repeated `[u32 option][u16 length][length bytes]` (truncated at the end).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tidemark_nbd::export::{Capabilities, Export, ExportResult, Extent, MetaContext, ZeroFlags};
use tidemark_nbd::negotiate::{ExportDirectory, Negotiation, Step};
use tidemark_nbd::proto;
use tidemark_nbd::tls::Scope;

struct Disk;

impl Export for Disk {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            flush: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            knows_holes: true,
        }
    }
    fn description(&self) -> String {
        "fuzz disk".into()
    }
    fn read(&self, _: u64, _: &mut [u8]) -> ExportResult<()> {
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> ExportResult<()> {
        Ok(())
    }
    fn flush(&self) -> ExportResult<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> ExportResult<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> ExportResult<()> {
        Ok(())
    }
    fn dirty_bitmaps(&self) -> Vec<String> {
        vec!["ck".into()]
    }
    fn block_status(&self, _: &MetaContext, _: u64, len: u64) -> ExportResult<Vec<Extent>> {
        Ok(vec![Extent { length: len, flags: 0 }])
    }
}

struct Directory(Arc<dyn Export>);

impl ExportDirectory for Directory {
    fn lookup(&self, name: &str) -> Option<(String, Arc<dyn Export>)> {
        (name.is_empty() || name == "disk").then(|| ("disk".to_string(), self.0.clone()))
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("disk".into(), "fuzz disk".into())]
    }
}

fn check_replies(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let header = proto::parse_option_reply_header(&bytes[..proto::OPTION_REPLY_HEADER_LEN.min(bytes.len())])
            .expect("the server wrote a malformed option reply header");
        let end = proto::OPTION_REPLY_HEADER_LEN + header.length as usize;
        assert!(end <= bytes.len(), "option reply length runs past what was written");
        bytes = &bytes[end..];
    }
}

fuzz_target!(|data: &[u8]| {
    let directory = Directory(Arc::new(Disk));
    let Ok(mut negotiation) = Negotiation::start(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) else {
        return;
    };
    let mut rest = data;
    while rest.len() >= 6 {
        let option = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let len = usize::from(u16::from_be_bytes([rest[4], rest[5]])).min(rest.len() - 6);
        let payload = &rest[6..6 + len];
        rest = &rest[6 + len..];
        // The plain parser first, then the state machine on the same bytes.
        let _ = proto::parse_option(option, payload);
        let mut out = Vec::new();
        match negotiation.handle(option, payload, &directory, &mut out) {
            Step::Options(next) => {
                check_replies(&out);
                negotiation = next;
            }
            Step::Transmit(session) => {
                assert!(session.flags & proto::tflags::HAS_FLAGS != 0);
                return;
            }
            Step::Close => return,
            // As if the TLS handshake succeeded: the state machine goes on encrypted.
            Step::StartTls(next) => {
                check_replies(&out);
                negotiation = next.tls_established(Scope::All);
            }
        }
    }
});
