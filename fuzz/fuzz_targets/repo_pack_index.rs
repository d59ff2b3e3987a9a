//! Any bytes (and the same bytes with their CRC fixed up) as a repository pack index:
//! decoding never panics, every entry it accepts lies inside its pack, and what decodes
//! encodes back to exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "crc_fixup.rs"]
mod crc_fixup;
use crc_fixup::with_crc;
use tidemark_repo::format::{PackIndex, MAX_CHUNK, PACK_MAGIC};

fuzz_target!(|data: &[u8]| {
    let _ = PackIndex::decode(data);
    let data = &with_crc(data)[..];
    let Ok(index) = PackIndex::decode(data) else {
        return;
    };
    for entry in &index.entries {
        assert!(entry.offset >= PACK_MAGIC.len() as u64);
        assert!(entry.offset + u64::from(entry.stored_len) <= index.pack_len);
        assert!(entry.raw_len > 0 && entry.raw_len <= MAX_CHUNK);
    }
    assert_eq!(index.encode(), data);
});
