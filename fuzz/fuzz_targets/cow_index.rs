//! Any bytes as a COW store: a header (first 4096 bytes) and index records after it.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::cow::{self, CowStoreHeader, HEADER_LEN};
use tidemark_formats::Uuid;

fuzz_target!(|data: &[u8]| {
    let file = Path::new("fuzz.cow");
    let header = match CowStoreHeader::parse(data, file) {
        Ok(h) => {
            assert_eq!(h.encode(), data[..HEADER_LEN]);
            h
        }
        // Still exercise the record parser against a fixed, valid header.
        Err(_) => CowStoreHeader::new(Uuid::nil(), Uuid::nil(), 1 << 30, 65536, 0)
            .expect("valid constant header"),
    };
    let records = data.get(HEADER_LEN..).unwrap_or(data);
    if let Ok(index) = cow::parse_cow_index(records, HEADER_LEN as u64, &header, file) {
        for r in index {
            assert!(r.chunk < header.chunk_count());
            assert_eq!(r.encode().len(), cow::RECORD_LEN);
        }
    }
});
