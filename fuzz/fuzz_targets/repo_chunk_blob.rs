//! Any bytes as a stored chunk blob read from a pack: checking and inflating it never
//! panics and never returns anything but exactly `raw_len` bytes whose (keyed) hash is the
//! chunk id.
//!
//! Input: a mode byte, raw_len (u32 LE, taken modulo 1 MiB, +1, to keep runs fast), a
//! 32-byte chunk id, then the blob. Mode (low two bits): 0 a plain repository's blob;
//! 1 an encrypted repository's blob sealed here with a fixed key and the chunk id's AAD, so
//! the fuzzer reaches the zstd frame and the keyed-hash check behind the AEAD; 2 the bytes
//! given to an encrypted repository as they are (they must fail to open, cleanly). The
//! entry's CRC is computed over the stored blob so the fuzzer gets past it.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tidemark_repo::crypto::{MasterKey, RepoCrypto};
use tidemark_repo::format::{ChunkId, PackEntry};
use tidemark_repo::{check_blob, sha256};

fn crypto() -> &'static RepoCrypto {
    static CRYPTO: OnceLock<RepoCrypto> = OnceLock::new();
    CRYPTO.get_or_init(|| RepoCrypto::new(&MasterKey::from_bytes([7; 32])))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 37 {
        return;
    }
    let mode = data[0] & 3;
    let raw_len = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) % (1 << 20) + 1;
    let mut id = [0u8; 32];
    id.copy_from_slice(&data[5..37]);
    let id = ChunkId(id);
    let input = &data[37..];
    let (blob, key) = match mode {
        1 => {
            let Ok(sealed) = crypto().seal(&RepoCrypto::chunk_aad(&id), input) else {
                return;
            };
            (sealed, Some(crypto()))
        }
        2 => (input.to_vec(), Some(crypto())),
        _ => (input.to_vec(), None),
    };
    let entry = PackEntry {
        id,
        offset: 8,
        stored_len: blob.len() as u32,
        raw_len,
        crc: crc32fast::hash(&blob),
    };
    let result = check_blob(&blob, &id, &entry, key);
    if mode == 2 {
        assert!(result.is_err(), "unsealed bytes opened under the key");
    }
    if let Ok(plain) = result {
        assert_eq!(plain.len(), raw_len as usize);
        match key {
            Some(c) => assert_eq!(c.chunk_id(&plain), id),
            None => assert_eq!(sha256(&plain), id.0),
        }
    }
});
