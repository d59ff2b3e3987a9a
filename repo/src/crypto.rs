//! Client-side encryption of a repository: a key file, the subkeys derived from it, keyed
//! chunk ids and sealed objects. Layouts: docs/FORMATS.md ("Repository encryption").
//!
//! A key file holds a random 256-bit master key. From it HKDF-SHA256 (salt
//! [`HKDF_SALT`]) derives three independent subkeys, each under its own label:
//! - the chunk id key: a chunk's id is the keyed hash of its plaintext under it (keyed
//!   BLAKE3, or HMAC-SHA256 in a repository that hashes with SHA-256: [`ChunkHash`]), so
//!   equal plaintext gets unrelated ids under two keys and an id tells nothing to one
//!   without the key; each hash has its own label, so the two never share a key;
//! - the sealing key: AES-256-GCM over every chunk blob (after compression) and every index
//!   object (pack and point indexes);
//! - the check key: the repository's config records HMAC-SHA256(check key, repository id),
//!   so a wrong key is refused when the repository is opened, never at a chunk.
//!
//! Nonces are 96 random bits per sealed object from the operating system's generator, not
//! derived from the content: objects are sealed independently by several pack workers,
//! repacking and index writers, with no counter they could share, and a random nonce needs
//! no argument about which plaintexts may repeat. The birthday bound keeps the chance of any
//! repeat under 2^-32 up to 2^32 sealed objects per key (NIST SP 800-38D, 8.3): 16 PiB of
//! 4 MiB chunks. The associated data binds each sealed object to where it is used: a chunk
//! blob to its chunk id (a blob moved under another id fails to open), an index object to
//! its object path (a point index copied to another point's name fails to open).

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{KeyType, Salt, HKDF_SHA256};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::format::{self, ChunkId};
use crate::hash::ChunkHash;

/// The cipher every sealed object uses (as the config names it).
pub const CIPHER: &str = "aes-256-gcm";
/// Salt of the HKDF extraction of the master key.
pub const HKDF_SALT: &[u8] = b"tidemark-repo-key-v1";
/// Magic of a sealed index object (its first 8 bytes).
pub const SEALED_MAGIC: &[u8; 8] = b"TMSEAL01";
/// Bytes a sealed chunk blob adds to the compressed chunk: the nonce and the tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const TAG_LEN: usize = 16;
/// Largest key file read.
const MAX_KEY_FILE: u64 = 4096;
/// `kind` of a key file.
const KEY_KIND: &str = "tidemark-repo-key";

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("{0}")]
    KeyFile(String),
    #[error("the system's random generator failed")]
    Random,
}

/// The key file (JSON): see docs/FORMATS.md.
#[derive(Debug, Serialize, Deserialize)]
struct KeyFileBody {
    kind: String,
    version: u32,
    created_unix: u64,
    /// The 32-byte master key, 64 lower-case hex digits.
    key: String,
}

/// A master key read from a key file.
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A master key from its 32 bytes (a key kept elsewhere than in a key file; the fuzz
    /// targets use a fixed one).
    pub fn from_bytes(key: [u8; 32]) -> MasterKey {
        MasterKey(key)
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.0 = [0; 32];
    }
}

/// Write a new key file at `path` (mode 0600, never over an existing file); its key id.
pub fn generate_key_file(path: &Path) -> Result<String, CryptoError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = MasterKey([0; 32]);
    SystemRandom::new()
        .fill(&mut key.0)
        .map_err(|_| CryptoError::Random)?;
    let body = KeyFileBody {
        kind: KEY_KIND.into(),
        version: 1,
        created_unix: crate::now_unix(),
        key: format::hex(&key.0),
    };
    let mut text = serde_json::to_string_pretty(&body).unwrap_or_default();
    text.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            CryptoError::KeyFile(format!(
                "creating the key file {}: {e} (it is never overwritten; pick a new name)",
                path.display()
            ))
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| CryptoError::KeyFile(format!("writing {}: {e}", path.display())))?;
    Ok(key_id(&key))
}

/// Read the key file at `path`: refused if others may read it, or if it is not a key file.
pub fn load_key_file(path: &Path) -> Result<MasterKey, CryptoError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let what = |why: String| CryptoError::KeyFile(format!("key file {}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| what(e.to_string()))?;
    let meta = file.metadata().map_err(|e| what(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(what(format!(
            "mode {mode:04o} lets other users read it; `chmod 600 {}` first",
            path.display()
        )));
    }
    if !meta.is_file() || meta.len() > MAX_KEY_FILE {
        return Err(what("not a key file (not a small regular file)".into()));
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(|e| what(e.to_string()))?;
    let body: KeyFileBody = serde_json::from_str(&text).map_err(|e| {
        what(format!(
            "not a key file ({e}); make one with `tidemark repo key generate FILE`"
        ))
    })?;
    if body.kind != KEY_KIND {
        return Err(what(format!("kind {:?} is not {KEY_KIND:?}", body.kind)));
    }
    if body.version != 1 {
        return Err(what(format!(
            "key file version {} is not supported (this tidemark reads 1)",
            body.version
        )));
    }
    let key = format::parse_hex32(&body.key)
        .ok_or_else(|| what("its key is not 64 hex digits".into()))?;
    Ok(MasterKey(key))
}

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The chunk id key, for the repository's hash.
enum IdKey {
    HmacSha256(hmac::Key),
    Blake3([u8; 32]),
}

impl Drop for IdKey {
    fn drop(&mut self) {
        if let IdKey::Blake3(key) = self {
            key.fill(0);
        }
    }
}

/// The HKDF extraction of a master key, from which every subkey is expanded.
struct Prk(ring::hkdf::Prk);

impl Prk {
    fn new(master: &MasterKey) -> Prk {
        Prk(Salt::new(HKDF_SHA256, HKDF_SALT).extract(&master.0))
    }

    /// The 32-byte subkey under `label`.
    fn derive(&self, label: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        // Expanding 32 bytes from SHA-256's PRK cannot fail (the limit is 255 * 32).
        if let Ok(okm) = self.0.expand(&[label], Len(32)) {
            let _ = okm.fill(&mut out);
        }
        out
    }
}

/// The public id of `master` (see [`RepoCrypto::key_id`]).
fn key_id(master: &MasterKey) -> String {
    format::hex(&Prk::new(master).derive(b"tidemark key id")[..8])
}

/// The HKDF label of the chunk id key of a repository that hashes with `hash`.
pub fn chunk_id_label(hash: ChunkHash) -> String {
    format!("tidemark chunk id {}", hash.keyed_name())
}

/// The subkeys of one master key, for a repository that hashes with one [`ChunkHash`].
pub struct RepoCrypto {
    id_key: IdKey,
    hash: ChunkHash,
    check_key: hmac::Key,
    seal_key: LessSafeKey,
    key_id: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for RepoCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoCrypto(key id {})", self.key_id)
    }
}

impl RepoCrypto {
    /// The subkeys of `master` for a repository whose chunk ids are the keyed form of `hash`.
    pub fn new(master: &MasterKey, hash: ChunkHash) -> RepoCrypto {
        let prk = Prk::new(master);
        let mut seal = prk.derive(b"tidemark seal aes-256-gcm");
        let mut id = prk.derive(chunk_id_label(hash).as_bytes());
        let mut check = prk.derive(b"tidemark key check");
        let seal_key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &seal).expect("a 32-byte AES-256 key is valid"),
        );
        let id_key = match hash {
            ChunkHash::Sha256 => IdKey::HmacSha256(hmac::Key::new(hmac::HMAC_SHA256, &id)),
            ChunkHash::Blake3 => IdKey::Blake3(id),
        };
        let crypto = RepoCrypto {
            id_key,
            hash,
            check_key: hmac::Key::new(hmac::HMAC_SHA256, &check),
            seal_key,
            key_id: key_id(master),
            rng: SystemRandom::new(),
        };
        seal.fill(0);
        id.fill(0);
        check.fill(0);
        crypto
    }

    /// A public name of the key (16 hex digits): which key a repository wants.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The key check value of the repository `repo_id` (64 hex digits).
    pub fn key_check(&self, repo_id: &str) -> String {
        format::hex(hmac::sign(&self.check_key, repo_id.as_bytes()).as_ref())
    }

    /// Whether `check` is this key's check value of `repo_id` (in constant time).
    pub fn opens(&self, repo_id: &str, check: &str) -> bool {
        format::parse_hex32(check)
            .is_some_and(|tag| hmac::verify(&self.check_key, repo_id.as_bytes(), &tag).is_ok())
    }

    /// The hash whose keyed form names this repository's chunks.
    pub fn hash(&self) -> ChunkHash {
        self.hash
    }

    /// The id of a chunk: the keyed hash of its plaintext under the chunk id key.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        match &self.id_key {
            IdKey::HmacSha256(key) => {
                let mut id = [0u8; 32];
                id.copy_from_slice(hmac::sign(key, data).as_ref());
                ChunkId(id)
            }
            IdKey::Blake3(key) => ChunkId(*blake3::keyed_hash(key, data).as_bytes()),
        }
    }

    /// `nonce || AES-256-GCM(plain) || tag` with `aad` authenticated.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .seal_key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| CryptoError::Random)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// The plaintext of `sealed` if it was sealed with this key and `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(format!(
                "{} bytes is too short for a sealed object",
                sealed.len()
            ));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| "the nonce has the wrong length".to_string())?;
        let mut buf = rest.to_vec();
        let plain_len = self
            .seal_key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| {
                "authentication failed (the object was changed, moved, or sealed with another key)"
                    .to_string()
            })?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }

    /// An index object stored at `path`: [`SEALED_MAGIC`] then the sealed bytes.
    pub fn seal_object(&self, path: &str, plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut out = SEALED_MAGIC.to_vec();
        out.extend_from_slice(&self.seal(path.as_bytes(), plain)?);
        Ok(out)
    }

    /// The plaintext of the index object read from `path`.
    pub fn open_object(&self, path: &str, stored: &[u8]) -> Result<Vec<u8>, String> {
        match stored.strip_prefix(SEALED_MAGIC.as_slice()) {
            Some(sealed) => self.open(path.as_bytes(), sealed),
            None => Err("not sealed, in an encrypted repository".into()),
        }
    }

    /// The associated data of a chunk blob: its id.
    pub fn chunk_aad(id: &ChunkId) -> [u8; 37] {
        let mut aad = [0u8; 37];
        aad[..5].copy_from_slice(b"chunk");
        aad[5..].copy_from_slice(&id.0);
        aad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> RepoCrypto {
        RepoCrypto::new(&MasterKey([n; 32]), ChunkHash::Blake3)
    }

    #[test]
    fn equal_plaintext_gets_different_chunk_ids_under_different_keys() {
        let data = vec![9u8; 5000];
        for hash in ChunkHash::ALL {
            let key = |n| RepoCrypto::new(&MasterKey([n; 32]), hash);
            assert_eq!(key(1).chunk_id(&data), key(1).chunk_id(&data));
            assert_ne!(key(1).chunk_id(&data), key(2).chunk_id(&data));
            for unkeyed in ChunkHash::ALL {
                assert_ne!(key(1).chunk_id(&data).0, unkeyed.digest(&data));
            }
            assert_ne!(key(1).key_id(), key(2).key_id());
        }
    }

    #[test]
    fn keyed_chunk_ids_are_the_hashes_keyed_by_the_hkdf_subkey_of_their_label() {
        let master = MasterKey([5; 32]);
        let data = b"a chunk's plaintext";
        let sub = |label: &str| Prk::new(&master).derive(label.as_bytes());
        // The label of SHA-256 repositories is the one encrypted repositories always used.
        assert_eq!(
            chunk_id_label(ChunkHash::Sha256),
            "tidemark chunk id hmac-sha256"
        );
        let hmac_key = hmac::Key::new(hmac::HMAC_SHA256, &sub("tidemark chunk id hmac-sha256"));
        assert_eq!(
            RepoCrypto::new(&master, ChunkHash::Sha256).chunk_id(data).0,
            hmac::sign(&hmac_key, data).as_ref()
        );
        assert_eq!(
            chunk_id_label(ChunkHash::Blake3),
            "tidemark chunk id blake3-keyed"
        );
        assert_eq!(
            RepoCrypto::new(&master, ChunkHash::Blake3).chunk_id(data).0,
            *blake3::keyed_hash(&sub("tidemark chunk id blake3-keyed"), data).as_bytes()
        );
        // One master key: the same key id and sealing key whatever the hash.
        let (a, b) = (
            RepoCrypto::new(&master, ChunkHash::Sha256),
            RepoCrypto::new(&master, ChunkHash::Blake3),
        );
        assert_eq!(a.key_id(), b.key_id());
        assert_eq!(
            b.open(b"x", &a.seal(b"x", b"sealed").unwrap()).unwrap(),
            b"sealed"
        );
        assert_ne!(a.chunk_id(data), b.chunk_id(data));
    }

    #[test]
    fn sealed_objects_open_only_with_their_key_aad_and_bytes() {
        let k = key(1);
        let sealed = k.seal(b"here", b"secret index").unwrap();
        assert_eq!(sealed.len(), 12 + SEAL_OVERHEAD);
        assert_eq!(k.open(b"here", &sealed).unwrap(), b"secret index");
        assert_ne!(
            sealed,
            k.seal(b"here", b"secret index").unwrap(),
            "fresh nonce"
        );
        assert!(k
            .open(b"there", &sealed)
            .unwrap_err()
            .contains("authentication"));
        assert!(key(2).open(b"here", &sealed).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(k.open(b"here", &bad).is_err(), "{i}");
        }
        for len in 0..sealed.len() {
            assert!(k.open(b"here", &sealed[..len]).is_err(), "{len}");
        }
        let object = k.seal_object("points/vm/c1", b"index").unwrap();
        assert_eq!(k.open_object("points/vm/c1", &object).unwrap(), b"index");
        assert!(k.open_object("points/vm/c2", &object).is_err());
        assert!(k
            .open_object("points/vm/c1", b"TMPOINT1....")
            .unwrap_err()
            .contains("not sealed"));
    }

    #[test]
    fn the_key_check_value_tells_the_right_key_from_a_wrong_one() {
        let check = key(1).key_check("repo-a");
        assert!(key(1).opens("repo-a", &check));
        assert!(!key(2).opens("repo-a", &check));
        assert!(!key(1).opens("repo-b", &check));
        assert!(!key(1).opens("repo-a", "zz"));
    }

    #[test]
    fn key_files_round_trip_and_are_refused_when_others_can_read_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo.key");
        let id = generate_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = load_key_file(&path).unwrap();
        assert_eq!(RepoCrypto::new(&loaded, ChunkHash::Blake3).key_id(), id);
        assert!(generate_key_file(&path).is_err(), "overwrote a key file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_key_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let bad = dir.path().join("bad.key");
        for text in [
            "{}",
            "not json",
            r#"{"kind":"tidemark-repo-key","version":2,"created_unix":0,"key":""}"#,
        ] {
            std::fs::write(&bad, text).unwrap();
            std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(load_key_file(&bad).is_err(), "{text}");
        }
    }
}
