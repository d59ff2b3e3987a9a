//! Any bytes as a whole dirty bitmap file: parse must return a value or an error, never panic,
//! and a file that parses must re-encode to the same header bytes.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::bitmap::{self, BitmapHeader, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let file = Path::new("fuzz.bitmap");
    if let Ok(header) = BitmapHeader::parse(data, file) {
        assert_eq!(header.encode(), data[..HEADER_LEN]);
    }
    if let Ok((header, words)) = bitmap::parse_bitmap_file(data, file) {
        assert_eq!(words.len(), header.word_count());
        let runs: u64 = bitmap::dirty_runs(&words, header.block_count())
            .map(|r| r.end - r.start)
            .sum();
        let ones: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(
            runs, ones,
            "bits past block_count are refused, so runs cover every set bit"
        );
    }
});
