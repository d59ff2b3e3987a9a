//! Any bytes as a stored chunk blob read from a pack: checking and inflating it never
//! panics and never returns anything but exactly `raw_len` bytes whose hash is the chunk id.
//!
//! Input: raw_len (u32 LE, taken modulo 1 MiB, +1, to keep runs fast), a 32-byte chunk id,
//! then the blob. The entry's CRC is computed over the blob so that the fuzzer reaches the
//! zstd frame and the id check behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_repo::format::{ChunkId, PackEntry};
use tidemark_repo::{check_blob, sha256};

fuzz_target!(|data: &[u8]| {
    if data.len() < 36 {
        return;
    }
    let raw_len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) % (1 << 20) + 1;
    let mut id = [0u8; 32];
    id.copy_from_slice(&data[4..36]);
    let id = ChunkId(id);
    let blob = &data[36..];
    let entry = PackEntry {
        id,
        offset: 8,
        stored_len: blob.len() as u32,
        raw_len,
        crc: crc32fast::hash(blob),
    };
    if let Ok(plain) = check_blob(blob, &id, &entry, None) {
        assert_eq!(plain.len(), raw_len as usize);
        assert_eq!(sha256(&plain), id.0);
    }
});
