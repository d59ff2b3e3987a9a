//! Any bytes as a stored chunk blob read from a pack: checking and inflating it never
//! panics and never returns anything but exactly `raw_len` bytes whose (keyed) hash is the
//! chunk id.
//!
//! Input: a mode byte, raw_len (u32 LE, taken modulo 1 MiB, +1, to keep runs fast), a
//! 32-byte chunk id, then the blob. Mode (low two bits): 0 a plain repository's blob;
//! 1 an encrypted repository's blob sealed here with a fixed key and the chunk id's AAD, so
//! the fuzzer reaches the zstd frame and the keyed-hash check behind the AEAD; 2 the bytes
//! given to an encrypted repository as they are (they must fail to open, cleanly). Bit 2 of
//! the mode picks the repository's hash: clear SHA-256 (HMAC-SHA256 keyed), set BLAKE3
//! (keyed BLAKE3). The entry's CRC is computed over the stored blob so the fuzzer gets past
//! it.
//!
//! Seeds (fuzz/corpus/repo_chunk_blob): `plain_*` and `sealed_*` are SHA-256 blobs of the
//! fixture repository (mode 0 and 1, the sealed ones' ids the fixed key's HMAC ids of their
//! plaintext); `blake3_plain_*` and `blake3_sealed_*` the same blobs with mode 4 and 5, ids
//! BLAKE3 and the fixed key's keyed BLAKE3 of their plaintext.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tidemark_repo::crypto::{MasterKey, RepoCrypto};
use tidemark_repo::format::{ChunkId, PackEntry};
use tidemark_repo::{check_blob, ChunkHash, ChunkKeys};

/// The fixed key's subkeys for `hash`.
fn crypto(hash: ChunkHash) -> &'static RepoCrypto {
    static SHA256: OnceLock<RepoCrypto> = OnceLock::new();
    static BLAKE3: OnceLock<RepoCrypto> = OnceLock::new();
    let cell = match hash {
        ChunkHash::Sha256 => &SHA256,
        ChunkHash::Blake3 => &BLAKE3,
    };
    cell.get_or_init(|| RepoCrypto::new(&MasterKey::from_bytes([7; 32]), hash))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 37 {
        return;
    }
    let mode = data[0] & 3;
    let hash = if data[0] & 4 == 0 {
        ChunkHash::Sha256
    } else {
        ChunkHash::Blake3
    };
    let raw_len = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) % (1 << 20) + 1;
    let mut id = [0u8; 32];
    id.copy_from_slice(&data[5..37]);
    let id = ChunkId(id);
    let input = &data[37..];
    let sealed = ChunkKeys::Sealed(crypto(hash));
    let (blob, keys) = match mode {
        1 => {
            let Ok(blob) = crypto(hash).seal(&RepoCrypto::chunk_aad(&id), input) else {
                return;
            };
            (blob, sealed)
        }
        2 => (input.to_vec(), sealed),
        _ => (input.to_vec(), ChunkKeys::Plain(hash)),
    };
    let entry = PackEntry {
        id,
        offset: 8,
        stored_len: blob.len() as u32,
        raw_len,
        crc: crc32fast::hash(&blob),
    };
    let result = check_blob(&blob, &id, &entry, keys);
    if mode == 2 {
        assert!(result.is_err(), "unsealed bytes opened under the key");
    }
    if let Ok(plain) = result {
        assert_eq!(plain.len(), raw_len as usize);
        let expected = match keys {
            ChunkKeys::Sealed(c) => c.chunk_id(&plain),
            ChunkKeys::Plain(hash) => ChunkId(hash.digest(&plain)),
        };
        assert_eq!(expected, id);
    }
});
