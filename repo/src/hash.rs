//! The hash that names a repository's chunks and packs, as its config's `hash` names it.
//!
//! A repository created by this tidemark hashes with BLAKE3: on a CPU with AVX-512 or AVX2
//! it hashes a 4 MiB chunk several times faster than SHA-256 with the SHA instructions,
//! and every chunk a backup stores, and every chunk a reader uses, is hashed once (and
//! every pack once more by the backup). Repositories written before (config version 1
//! plain, 2 encrypted) hash with SHA-256 and keep it: their chunk ids are SHA-256 (keyed:
//! HMAC-SHA256), so a backup into one must hash the same way to deduplicate against them.
//! An encrypted repository's chunk ids are keyed ([`crate::crypto::RepoCrypto::chunk_id`]);
//! pack ids never are (a pack of an encrypted repository holds sealed bytes only).

use sha2::{Digest, Sha256};

/// The config version of a BLAKE3 repository, plain or encrypted: a tidemark before BLAKE3
/// reads versions 1 and 2 only, so it refuses such a repository with its version error
/// instead of calling every chunk corrupt.
pub const BLAKE3_VERSION: u32 = 3;

/// A repository's hash of chunks and packs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkHash {
    /// SHA-256 (HMAC-SHA256 for an encrypted repository's chunk ids): config versions 1
    /// and 2, what every tidemark reads.
    Sha256,
    /// BLAKE3 (keyed BLAKE3 for an encrypted repository's chunk ids): config version 3.
    Blake3,
}

impl ChunkHash {
    /// Every hash, in the order `--help` and errors list them.
    pub const ALL: [ChunkHash; 2] = [ChunkHash::Blake3, ChunkHash::Sha256];

    /// Its name in the config (`hash`) and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ChunkHash::Sha256 => "sha256",
            ChunkHash::Blake3 => "blake3",
        }
    }

    /// The hash a config or command line names, if this tidemark knows it.
    pub fn from_name(name: &str) -> Option<ChunkHash> {
        ChunkHash::ALL.into_iter().find(|h| h.name() == name)
    }

    /// The name of its keyed form, an encrypted repository's chunk ids (config
    /// `encryption.chunk_id`, and the HKDF label of the chunk id key).
    pub fn keyed_name(self) -> &'static str {
        match self {
            ChunkHash::Sha256 => "hmac-sha256",
            ChunkHash::Blake3 => "blake3-keyed",
        }
    }

    /// The config version of a repository with this hash.
    pub fn config_version(self, encrypted: bool) -> u32 {
        match (self, encrypted) {
            (ChunkHash::Sha256, false) => 1,
            (ChunkHash::Sha256, true) => 2,
            (ChunkHash::Blake3, _) => BLAKE3_VERSION,
        }
    }

    /// The unkeyed hash of `data`: a plain repository's chunk id, any repository's pack id.
    pub fn digest(self, data: &[u8]) -> [u8; 32] {
        match self {
            ChunkHash::Sha256 => Sha256::digest(data).into(),
            ChunkHash::Blake3 => *blake3::hash(data).as_bytes(),
        }
    }
}

/// Its usual written name ("SHA-256", "BLAKE3"), for messages.
impl std::fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkHash::Sha256 => "SHA-256",
            ChunkHash::Blake3 => "BLAKE3",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_the_published_known_answers() {
        // BLAKE3's and SHA-256's digests of "abc" (the BLAKE3 and FIPS 180-2 test vectors).
        assert_eq!(
            crate::format::hex(&ChunkHash::Blake3.digest(b"abc")),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(
            crate::format::hex(&ChunkHash::Sha256.digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let big: Vec<u8> = (0..(1 << 20) + 7).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            ChunkHash::Blake3.digest(&big),
            *blake3::Hasher::new().update(&big).finalize().as_bytes()
        );
        assert_ne!(
            ChunkHash::Blake3.digest(&big),
            ChunkHash::Sha256.digest(&big)
        );
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for hash in ChunkHash::ALL {
            assert_eq!(ChunkHash::from_name(hash.name()), Some(hash));
        }
        for bad in ["", "SHA256", "sha-256", "blake2b", "md5"] {
            assert_eq!(ChunkHash::from_name(bad), None, "{bad}");
        }
        assert_eq!(ChunkHash::Sha256.config_version(false), 1);
        assert_eq!(ChunkHash::Sha256.config_version(true), 2);
        assert_eq!(ChunkHash::Blake3.config_version(false), 3);
        assert_eq!(ChunkHash::Blake3.config_version(true), 3);
    }

    type HashFn<'a> = dyn Fn(&[u8]) -> [u8; 32] + 'a;

    /// Hashing speed of a 4 MiB chunk, 256 times (1 GiB), with each hash: a printout, not
    /// an assertion. `cargo test --release -p tidemark-repo hash_speed -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a timing printout; run it in release mode"]
    fn hash_speed() {
        let chunk: Vec<u8> = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let keyed = |key: &[u8; 32], data: &[u8]| *blake3::keyed_hash(key, data).as_bytes();
        let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[3; 32]);
        let hmac = |data: &[u8]| {
            let mut out = [0u8; 32];
            out.copy_from_slice(ring::hmac::sign(&hmac_key, data).as_ref());
            out
        };
        let runs: [(&str, &HashFn<'_>); 4] = [
            ("sha256 (sha2)", &|d| ChunkHash::Sha256.digest(d)),
            ("hmac-sha256 (ring)", &hmac),
            ("blake3", &|d| ChunkHash::Blake3.digest(d)),
            ("blake3 keyed", &|d| keyed(&[3; 32], d)),
        ];
        for (name, hash) in runs {
            let start = std::time::Instant::now();
            let mut acc = 0u8;
            for _ in 0..256 {
                acc ^= hash(&chunk)[0];
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{name:20} 256 x 4 MiB: {secs:.3} s, {:.2} GB/s (xor {acc})",
                (256u64 << 22) as f64 / secs / 1e9
            );
        }
    }
}
