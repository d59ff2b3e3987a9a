//! tidemark-repo: the backup repository on a directory or S3-compatible object storage.
//!
//! One code path for both through `object_store` (LocalFileSystem, AmazonS3). A point (one
//! volume at one checkpoint) is a list of fixed-size chunk slots, each a chunk, in an
//! incremental point with pieces (the changed extents, chunks of their own size) laid over
//! the previous point's chunk ([`format::Piece`]); each chunk is content-addressed
//! by the hash of its plaintext (BLAKE3, or SHA-256 in a repository made before BLAKE3 or
//! with `--hash sha256`: [`ChunkHash`]), zstd-compressed with a CRC, and packed with others into
//! pack objects of about [`PACK_TARGET`] bytes, each with its own index object. All-zero
//! chunks are a marker in the point index, never stored. Every object is written once
//! (create-only puts), and a point's index is written last, after all its packs and pack
//! indexes: a point exists only when all its data does. Layout: docs/FORMATS.md.
//!
//! Objects:
//! - `config`: JSON (format version, chunk size, repository id, hash, and for an encrypted
//!   repository its cipher, key id and key check value: [`crypto`]);
//! - `data/XX/<pack id>`: packs, named by the hash of their bytes;
//! - `index/<pack id>`: the pack's index ([`format::PackIndex`]);
//! - `points/<volume>/<checkpoint>`: point indexes ([`format::PointIndex`]);
//! - `lock`: the repository lock (JSON: owner, host, pid, lease).
#![forbid(unsafe_code)]

pub mod builder;
pub mod crypto;
pub mod fetch;
pub mod format;
pub mod hash;
pub mod local;
pub mod lock;
pub mod maint;
pub mod reader;
pub mod store;
pub mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

pub use format::{ChunkId, ChunkRef, FormatError, PackEntry, PackIndex, Piece, PointIndex};
pub use hash::ChunkHash;
pub use store::StoreOptions;

/// Default chunk size: 4 MiB (a multiple of every tracking granularity, 4 KiB..1 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// A pack is flushed once it holds this many compressed bytes.
pub const PACK_TARGET: usize = 16 << 20;
/// Largest object the reader loads whole (indexes, config).
const MAX_INDEX_OBJECT: u64 = 256 << 20;
/// Length of a pack's magic.
pub const PACK_MAGIC_LEN: usize = 8;

/// What went wrong, naming the object or the step.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{object} is corrupt: {why}")]
    Corrupt { object: String, why: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

fn store_err(what: impl Into<String>) -> impl FnOnce(object_store::Error) -> RepoError {
    let what = what.into();
    move |source| RepoError::Store { what, source }
}

/// The `config` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    /// "tidemark-repo".
    pub kind: String,
    /// What a reader must understand ([`ChunkHash::config_version`]): 1 a plain SHA-256
    /// repository, 2 an encrypted one (which a tidemark without encryption refuses), 3 a
    /// BLAKE3 one, plain or encrypted (which a tidemark without BLAKE3 refuses).
    pub version: u32,
    pub chunk_size: u32,
    pub id: String,
    /// The hash of chunk and pack ids ([`ChunkHash::name`]); absent in configs written
    /// before BLAKE3, which all hash with SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Present in an encrypted repository only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

impl Config {
    /// The config of a new repository.
    fn new(chunk_size: u32, id: String, hash: ChunkHash, encryption: Option<Encryption>) -> Config {
        Config {
            kind: "tidemark-repo".into(),
            version: hash.config_version(encryption.is_some()),
            chunk_size,
            id,
            hash: Some(hash.name().into()),
            encryption,
        }
    }

    /// Check a config read from a repository; the hash it names. A reader that got the
    /// hash wrong would call every chunk corrupt, so every field that decides it must agree.
    pub fn check(&self) -> std::result::Result<ChunkHash, String> {
        if self.kind != "tidemark-repo" {
            return Err(format!("kind {:?} is not \"tidemark-repo\"", self.kind));
        }
        if !self.chunk_size.is_power_of_two()
            || !(format::MIN_CHUNK..=format::MAX_CHUNK).contains(&self.chunk_size)
        {
            return Err(format!(
                "chunk size {} is not a power of two from 64K to 64M",
                self.chunk_size
            ));
        }
        if !(1..=hash::BLAKE3_VERSION).contains(&self.version) {
            return Err(format!(
                "version {} is not supported (this tidemark reads 1 to {}): a newer tidemark \
                 made it",
                self.version,
                hash::BLAKE3_VERSION
            ));
        }
        let hash = match &self.hash {
            None if self.version == hash::BLAKE3_VERSION => {
                return Err(format!("version {} names no hash", self.version))
            }
            // Written before BLAKE3: SHA-256.
            None => ChunkHash::Sha256,
            Some(name) => ChunkHash::from_name(name).ok_or_else(|| {
                format!(
                    "hash {name:?} is not supported (this tidemark knows {}): a newer \
                     tidemark made it",
                    ChunkHash::ALL.map(ChunkHash::name).join(", ")
                )
            })?,
        };
        let encrypted = self.encryption.is_some();
        let version = hash.config_version(encrypted);
        if self.version != version {
            return Err(format!(
                "version {} does not go with hash {:?}: an {} {hash} repository is version \
                 {version}",
                self.version,
                hash.name(),
                if encrypted {
                    "encrypted"
                } else {
                    "unencrypted"
                },
            ));
        }
        if let Some(enc) = &self.encryption {
            if enc.cipher != crypto::CIPHER || enc.chunk_id != hash.keyed_name() {
                return Err(format!(
                    "cipher {:?} with chunk ids {:?} is not supported in a {hash} repository \
                     (this tidemark seals with {} and names chunks with {})",
                    enc.cipher,
                    enc.chunk_id,
                    crypto::CIPHER,
                    hash.keyed_name()
                ));
            }
        }
        Ok(hash)
    }
}

/// How an encrypted repository is sealed, and which key opens it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Encryption {
    /// [`crypto::CIPHER`].
    pub cipher: String,
    /// The keyed hash of chunk ids ([`ChunkHash::keyed_name`]).
    pub chunk_id: String,
    /// The key's public id ([`crypto::RepoCrypto::key_id`]).
    pub key_id: String,
    /// HMAC-SHA256 of the repository id under the key's check subkey.
    pub key_check: String,
}

/// The variable that names a repository's key file when `--key` is not given.
pub const KEY_ENV: &str = "TIDEMARK_REPO_KEY";

/// An open repository.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    url: String,
    config: Config,
    /// The hash of chunk and pack ids (as the config names it).
    hash: ChunkHash,
    /// The subkeys of an encrypted repository (for the same hash).
    crypto: Option<Arc<crypto::RepoCrypto>>,
}

/// The key file to use: `key`, else $TIDEMARK_REPO_KEY (empty: none).
fn key_path(key: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    key.map(std::path::Path::to_path_buf).or_else(|| {
        std::env::var_os(KEY_ENV)
            .filter(|v| !v.is_empty())
            .map(Into::into)
    })
}

fn load_crypto(path: &std::path::Path, hash: ChunkHash) -> Result<crypto::RepoCrypto> {
    let key = crypto::load_key_file(path).map_err(|e| RepoError::Invalid(e.to_string()))?;
    Ok(crypto::RepoCrypto::new(&key, hash))
}

/// What computes and checks a repository's chunk ids: a plain repository's hash, or an
/// encrypted repository's keys (which hold its hash and open its blobs).
#[derive(Debug, Clone, Copy)]
pub enum ChunkKeys<'a> {
    Plain(ChunkHash),
    Sealed(&'a crypto::RepoCrypto),
}

impl<'a> ChunkKeys<'a> {
    /// The id of the chunk `data`: its hash, or in an encrypted repository its keyed hash.
    pub fn chunk_id(self, data: &[u8]) -> ChunkId {
        match self {
            ChunkKeys::Plain(hash) => ChunkId(hash.digest(data)),
            ChunkKeys::Sealed(crypto) => crypto.chunk_id(data),
        }
    }

    /// The keys that open sealed blobs, in an encrypted repository.
    fn crypto(self) -> Option<&'a crypto::RepoCrypto> {
        match self {
            ChunkKeys::Plain(_) => None,
            ChunkKeys::Sealed(crypto) => Some(crypto),
        }
    }
}

/// Where a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: [u8; 32],
    pub entry: PackEntry,
}

pub fn pack_path(pack: &[u8; 32]) -> Path {
    let hex = format::hex(pack);
    Path::from(format!("data/{}/{}", &hex[..2], hex))
}

pub fn pack_index_path(pack: &[u8; 32]) -> Path {
    Path::from(format!("index/{}", format::hex(pack)))
}

pub fn point_path(volume: &str, checkpoint: &str) -> Path {
    Path::from(format!("points/{volume}/{checkpoint}"))
}

/// Split `VOLUME@CHECKPOINT`.
pub fn parse_point_name(text: &str) -> Result<(String, String)> {
    let (volume, checkpoint) = text.split_once('@').ok_or_else(|| {
        RepoError::Invalid(format!(
            "{text:?} is not a point name: write VOLUME@CHECKPOINT or VOLUME@latest"
        ))
    })?;
    if !format::valid_name(volume) || !format::valid_name(checkpoint) {
        return Err(RepoError::Invalid(format!(
            "{text:?} is not a point name: volume and checkpoint are 1-128 of A-Z a-z 0-9 . _ - +"
        )));
    }
    Ok((volume.to_string(), checkpoint.to_string()))
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Repository {
    /// Create a repository at `url` (a directory path or `s3://bucket/prefix`), hashing
    /// with BLAKE3.
    pub async fn init(url: &str, options: &StoreOptions, chunk_size: u32) -> Result<Repository> {
        Repository::init_with_key(url, options, chunk_size, None, ChunkHash::Blake3).await
    }

    /// Create a repository that hashes with `hash`, encrypted with the key file `key` if
    /// given. A SHA-256 one gets the config version older tidemarks read (1, or 2
    /// encrypted).
    pub async fn init_with_key(
        url: &str,
        options: &StoreOptions,
        chunk_size: u32,
        key: Option<&std::path::Path>,
        hash: ChunkHash,
    ) -> Result<Repository> {
        let crypto = key.map(|path| load_crypto(path, hash)).transpose()?;
        if !chunk_size.is_power_of_two()
            || !(format::MIN_CHUNK..=format::MAX_CHUNK).contains(&chunk_size)
        {
            return Err(RepoError::Invalid(format!(
                "chunk size {chunk_size} is not a power of two from 64K to 64M"
            )));
        }
        let store = store::open(url, options, true)?;
        let id = uuid::Uuid::new_v4().to_string();
        let encryption = crypto.as_ref().map(|c| Encryption {
            cipher: crypto::CIPHER.into(),
            chunk_id: hash.keyed_name().into(),
            key_id: c.key_id().to_string(),
            key_check: c.key_check(&id),
        });
        let config = Config::new(chunk_size, id, hash, encryption);
        let body = serde_json::to_vec_pretty(&config).unwrap_or_default();
        match store
            .put_opts(&Path::from("config"), body.into(), PutMode::Create.into())
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(RepoError::Invalid(format!(
                    "{url} already holds a repository (its config object exists)"
                )))
            }
            Err(source) => {
                return Err(RepoError::Store {
                    what: format!("writing the config of a new repository at {url}"),
                    source,
                })
            }
        }
        Ok(Repository {
            store,
            url: url.to_string(),
            config,
            hash,
            crypto: crypto.map(Arc::new),
        })
    }

    /// Open the repository at `url`; an encrypted one with the key file `options.key` (else
    /// $TIDEMARK_REPO_KEY). A wrong key is refused here, by the config's key check value.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Repository> {
        let store = store::open(url, options, false)?;
        let bytes = match store.get(&Path::from("config")).await {
            Ok(got) => got
                .bytes()
                .await
                .map_err(store_err(format!("reading {url}/config")))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RepoError::Invalid(format!(
                    "{url} is not a tidemark repository (no config object); create one with \
                     `tidemark repo init {url}`"
                )))
            }
            Err(source) => {
                return Err(RepoError::Store {
                    what: format!("opening the repository {url}"),
                    source,
                })
            }
        };
        let config: Config = serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt {
            object: "config".into(),
            why: e.to_string(),
        })?;
        let hash = config.check().map_err(|why| RepoError::Corrupt {
            object: format!("{url}/config"),
            why,
        })?;
        let crypto = match (&config.encryption, key_path(options.key.as_deref())) {
            (None, None) => None,
            (None, Some(path)) => {
                return Err(RepoError::Invalid(format!(
                    "{url} is not encrypted, but the key file {} was given (--key or \
                     ${KEY_ENV}); open it without a key",
                    path.display()
                )))
            }
            (Some(enc), None) => {
                return Err(RepoError::Invalid(format!(
                    "{url} is encrypted (key id {}): give its key file with --key FILE or \
                     ${KEY_ENV}",
                    enc.key_id
                )))
            }
            (Some(enc), Some(path)) => {
                let crypto = load_crypto(&path, hash)?;
                if !crypto.opens(&config.id, &enc.key_check) {
                    return Err(RepoError::Invalid(format!(
                        "this key ({}, key id {}) does not open repository {url} (it was \
                         created with key id {})",
                        path.display(),
                        crypto.key_id(),
                        enc.key_id
                    )));
                }
                Some(Arc::new(crypto))
            }
        };
        Ok(Repository {
            store,
            url: url.to_string(),
            config,
            hash,
            crypto,
        })
    }

    /// The subkeys of an encrypted repository.
    pub fn crypto(&self) -> Option<&crypto::RepoCrypto> {
        self.crypto.as_deref()
    }

    /// The hash of this repository's chunk and pack ids.
    pub fn hash(&self) -> ChunkHash {
        self.hash
    }

    /// What computes and checks this repository's chunk ids (and opens its sealed blobs).
    pub fn chunk_keys(&self) -> ChunkKeys<'_> {
        match self.crypto.as_deref() {
            Some(c) => ChunkKeys::Sealed(c),
            None => ChunkKeys::Plain(self.hash),
        }
    }

    /// The id of a chunk of this repository: the hash of its plaintext, or in an encrypted
    /// repository its keyed hash.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        self.chunk_keys().chunk_id(data)
    }

    /// The id of a pack of this repository (its object name): the hash of its bytes.
    pub fn pack_id(&self, pack: &[u8]) -> [u8; 32] {
        self.hash.digest(pack)
    }

    /// The stored form of a chunk's compressed blob (sealed in an encrypted repository).
    pub fn seal_blob(&self, id: &ChunkId, compressed: Vec<u8>) -> Result<Vec<u8>> {
        match &self.crypto {
            Some(c) => c
                .seal(&crypto::RepoCrypto::chunk_aad(id), &compressed)
                .map_err(|e| RepoError::Invalid(format!("sealing chunk {}: {e}", id.hex()))),
            None => Ok(compressed),
        }
    }

    /// The stored form of the index object `plain` at `path` (sealed in an encrypted
    /// repository).
    fn seal_index(&self, path: &Path, plain: Vec<u8>) -> Result<Bytes> {
        match &self.crypto {
            Some(c) => c
                .seal_object(path.as_ref(), &plain)
                .map(Bytes::from)
                .map_err(|e| RepoError::Invalid(format!("sealing {path}: {e}"))),
            None => Ok(plain.into()),
        }
    }

    /// The plaintext of the index object read from `path`.
    pub fn open_index(&self, path: &Path, stored: Bytes) -> std::result::Result<Bytes, String> {
        match &self.crypto {
            Some(c) => c.open_object(path.as_ref(), &stored).map(Bytes::from),
            None => Ok(stored),
        }
    }

    /// Write a pack's index (create-only, sealed in an encrypted repository).
    pub async fn put_pack_index(&self, index: &PackIndex) -> Result<bool> {
        let path = pack_index_path(&index.pack_id);
        let body = self.seal_index(&path, index.encode())?;
        self.put_create(&path, body).await
    }

    /// Check a chunk's blob read from `at`, open it and inflate it; a mismatch names the
    /// pack and offset.
    pub fn inflate_chunk(&self, blob: &[u8], id: &ChunkId, at: &Location) -> Result<Vec<u8>> {
        self.inflate_chunk_into(blob, id, at, Vec::new())
    }

    /// [`Repository::inflate_chunk`] into the memory of `out` (its contents are dropped):
    /// a recycled buffer spares the page faults of fresh memory on every chunk.
    pub fn inflate_chunk_into(
        &self,
        blob: &[u8],
        id: &ChunkId,
        at: &Location,
        out: Vec<u8>,
    ) -> Result<Vec<u8>> {
        check_blob_into(blob, id, &at.entry, self.chunk_keys(), out).map_err(|why| {
            RepoError::Corrupt {
                object: pack_path(&at.pack).to_string(),
                why: format!("chunk {} at offset {}: {why}", id.hex(), at.entry.offset),
            }
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The directory of a directory repository (None for S3): what gc walks to find the
    /// staging files object_store's listing hides.
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        if self.url.contains("://") && !self.url.starts_with("file://") {
            return None;
        }
        Some(self.url.strip_prefix("file://").unwrap_or(&self.url).into())
    }

    /// Paths (with sizes) of every object under `prefix`.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<(Path, u64)>> {
        let prefix = Path::from(prefix);
        self.store
            .list(Some(&prefix))
            .map_ok(|meta| (meta.location, meta.size))
            .try_collect()
            .await
            .map_err(store_err(format!("listing {}/{prefix}", self.url)))
    }

    /// Read a whole small object.
    pub async fn get_small(&self, path: &Path) -> Result<Bytes> {
        let got = self
            .store
            .get(path)
            .await
            .map_err(store_err(format!("reading {path}")))?;
        if got.meta.size > MAX_INDEX_OBJECT {
            return Err(RepoError::Corrupt {
                object: path.to_string(),
                why: format!("{} bytes is too large for an index", got.meta.size),
            });
        }
        got.bytes()
            .await
            .map_err(store_err(format!("reading {path}")))
    }

    /// Write `bytes` at `path` unless something is there already.
    pub async fn put_create(&self, path: &Path, bytes: Bytes) -> Result<bool> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(source) => Err(RepoError::Store {
                what: format!("writing {path} to {}", self.url),
                source,
            }),
        }
    }

    /// Every point index (parsed), and the objects that failed to parse.
    pub async fn points(&self) -> Result<(Vec<PointIndex>, Vec<(String, String)>)> {
        let objects = self.list_objects("points").await?;
        let mut points = Vec::new();
        let mut broken = Vec::new();
        for (path, _) in objects {
            let plain = self
                .get_small(&path)
                .await
                .map_err(|e| e.to_string())
                .and_then(|bytes| self.open_index(&path, bytes));
            match plain {
                Ok(bytes) => match PointIndex::decode(&bytes) {
                    Ok(point) if point_path(&point.volume, &point.checkpoint) == path => {
                        points.push(point)
                    }
                    Ok(point) => broken.push((
                        path.to_string(),
                        format!("names the point {} but is stored elsewhere", point.name()),
                    )),
                    Err(e) => broken.push((path.to_string(), e.to_string())),
                },
                Err(why) => broken.push((path.to_string(), why)),
            }
        }
        points.sort_by(|a, b| {
            (&a.volume, a.created_unix, &a.checkpoint).cmp(&(
                &b.volume,
                b.created_unix,
                &b.checkpoint,
            ))
        });
        Ok((points, broken))
    }

    /// The point `VOLUME@CHECKPOINT` (or `VOLUME@latest`: the newest of the volume). `latest`
    /// is refused while a point index of the volume cannot be read (damaged, or written by a
    /// newer tidemark): it may be the newest, and restoring an older point in its place
    /// without a word would hand back stale data.
    pub async fn point(&self, name: &str) -> Result<PointIndex> {
        let (volume, checkpoint) = parse_point_name(name)?;
        if checkpoint == "latest" {
            let (points, broken) = self.points().await?;
            let prefix = format!("points/{volume}/");
            if let Some((object, why)) = broken.iter().find(|(path, _)| path.starts_with(&prefix)) {
                return Err(RepoError::Invalid(format!(
                    "{name} is not certain in {}: the point index {object} cannot be read                      ({why}) and may be the newest; name the checkpoint (`tidemark repo list                      {}` lists the points this tidemark reads), or use a newer tidemark if a                      newer one wrote it",
                    self.url, self.url
                )));
            }
            return points
                .into_iter()
                .filter(|p| p.volume == volume)
                .max_by_key(|p| p.created_unix)
                .ok_or_else(|| {
                    RepoError::Invalid(format!("{} has no point of volume {volume}", self.url))
                });
        }
        let path = point_path(&volume, &checkpoint);
        let bytes = match self.store.get(&path).await {
            Ok(got) => got
                .bytes()
                .await
                .map_err(store_err(format!("reading {path}")))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RepoError::Invalid(format!(
                    "{} has no point {name} (`tidemark repo list {}` lists them)",
                    self.url, self.url
                )))
            }
            Err(source) => {
                return Err(RepoError::Store {
                    what: format!("reading {path}"),
                    source,
                })
            }
        };
        let corrupt = |why: String| RepoError::Corrupt {
            object: path.to_string(),
            why,
        };
        let plain = self.open_index(&path, bytes).map_err(corrupt)?;
        PointIndex::decode(&plain).map_err(|e| corrupt(e.to_string()))
    }

    /// Every pack index: chunk id -> location, plus the pack indexes that failed to parse.
    pub async fn chunk_map(
        &self,
    ) -> Result<(
        HashMap<ChunkId, Location>,
        Vec<PackIndex>,
        Vec<(String, String)>,
    )> {
        let objects = self.list_objects("index").await?;
        let store = self.clone();
        let loaded: Vec<(Path, Result<Bytes>)> = futures::stream::iter(objects)
            .map(|(path, _)| {
                let store = store.clone();
                async move {
                    let got = store.get_small(&path).await;
                    (path, got)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut map = HashMap::new();
        let mut indexes = Vec::new();
        let mut broken = Vec::new();
        for (path, got) in loaded {
            let parsed = got
                .map_err(|e| e.to_string())
                .and_then(|bytes| self.open_index(&path, bytes))
                .and_then(|bytes| PackIndex::decode(&bytes).map_err(|e| e.to_string()));
            match parsed {
                Ok(index) if pack_index_path(&index.pack_id) == path => {
                    for entry in &index.entries {
                        map.insert(
                            entry.id,
                            Location {
                                pack: index.pack_id,
                                entry: *entry,
                            },
                        );
                    }
                    indexes.push(index);
                }
                Ok(_) => broken.push((path.to_string(), "names another pack".to_string())),
                Err(why) => broken.push((path.to_string(), why)),
            }
        }
        Ok((map, indexes, broken))
    }

    /// Read, check and inflate one chunk.
    pub async fn read_chunk(&self, id: &ChunkId, at: &Location) -> Result<Vec<u8>> {
        let blob = self.read_blob(id, at).await?;
        self.inflate_chunk(&blob, id, at)
    }

    /// The compressed blob of one chunk, as stored (a ranged GET of its pack); check and
    /// inflate it with [`Repository::inflate_chunk`].
    pub async fn read_blob(&self, id: &ChunkId, at: &Location) -> Result<Bytes> {
        let path = pack_path(&at.pack);
        let start = at.entry.offset;
        self.store
            .get_range(&path, start..start + u64::from(at.entry.stored_len))
            .await
            .map_err(store_err(format!("reading chunk {} from {path}", id.hex())))
    }

    /// Bytes `range` of pack `pack` (several neighbouring blobs), with one ranged GET.
    pub async fn read_range(&self, pack: &[u8; 32], range: &std::ops::Range<u64>) -> Result<Bytes> {
        let path = pack_path(pack);
        self.store
            .get_range(&path, range.clone())
            .await
            .map_err(store_err(format!(
                "reading bytes {}..{} of {path}",
                range.start, range.end
            )))
    }
}

impl Repository {
    /// The bytes of chunk slot `index` of `point`: its chunk (or zeros) with its pieces laid
    /// over it, every chunk read, checked and inflated; `map` locates the chunks.
    pub async fn read_slot(
        &self,
        point: &PointIndex,
        index: u64,
        map: &HashMap<ChunkId, Location>,
    ) -> Result<Vec<u8>> {
        compose_slot(point, index, map, |id, at| async move {
            self.read_chunk(&id, &at).await
        })
        .await
    }
}

/// Slot `index` of `point` built from its chunks, each got with `fetch` (which checks it):
/// the slot's chunk (or zeros), then each piece's bytes over it. Every length is checked
/// against the pack index before a byte is copied, and the zero runs the point records for
/// the chunk are checked to be zero in it: `repo export` reports them as holes without
/// reading the chunk, so a wrong run would lose data on a sparse copy.
pub(crate) async fn compose_slot<F, Fut>(
    point: &PointIndex,
    index: u64,
    map: &HashMap<ChunkId, Location>,
    fetch: F,
) -> Result<Vec<u8>>
where
    F: Fn(ChunkId, Location) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>>>,
{
    let corrupt = |why: String| RepoError::Corrupt {
        object: point_path(&point.volume, &point.checkpoint).to_string(),
        why,
    };
    let locate = |id: &ChunkId, what: &str| {
        map.get(id).copied().ok_or_else(|| {
            corrupt(format!(
                "{what} ({}) is in no pack index; run `tidemark repo verify`",
                id.hex()
            ))
        })
    };
    let slot_len = point.slot_len(index);
    let mut data = match point.chunks.get(index as usize) {
        Some(ChunkRef::Data(id)) => {
            let at = locate(id, &format!("its chunk {index}"))?;
            if u64::from(at.entry.raw_len) != slot_len {
                return Err(corrupt(format!(
                    "its chunk {index} ({}) holds {} bytes, not {slot_len}",
                    id.hex(),
                    at.entry.raw_len
                )));
            }
            let data = fetch(*id, at).await?;
            if let Some(run) = format::wrong_zero_run(point.slot_zero_runs(index), &data) {
                return Err(corrupt(format!(
                    "it records bytes {}..{} of its chunk {index} ({}) as zero, but the chunk \
                     has data there: the point index is wrong; do not trust this point's \
                     holes (run `tidemark repo verify --read-data`)",
                    run.offset,
                    run.end(),
                    id.hex()
                )));
            }
            data
        }
        Some(ChunkRef::Zero) => vec![0; slot_len as usize],
        None => return Err(corrupt(format!("it has no chunk slot {index}"))),
    };
    let start = index * u64::from(point.chunk_size);
    for piece in point.slot_pieces(index) {
        let at = (piece.offset - start) as usize;
        let out = &mut data[at..at + piece.len as usize];
        let ChunkRef::Data(id) = piece.chunk else {
            out.fill(0);
            continue;
        };
        let what = format!("its piece at byte {}", piece.offset);
        let location = locate(&id, &what)?;
        let within = piece.within as usize;
        let end = within + piece.len as usize;
        if end > location.entry.raw_len as usize {
            return Err(corrupt(format!(
                "{what} wants bytes {within}..{end} of chunk {}, which holds {}",
                id.hex(),
                location.entry.raw_len
            )));
        }
        out.copy_from_slice(&fetch(id, location).await?[within..end]);
    }
    Ok(data)
}

impl Repository {
    /// Write a point index (create-only): the last step of a backup.
    pub async fn put_point(&self, point: &PointIndex) -> Result<()> {
        let path = point_path(&point.volume, &point.checkpoint);
        let body = self.seal_index(&path, point.encode())?;
        if !self.put_create(&path, body).await? {
            return Err(RepoError::Invalid(format!(
                "{} already holds the point {}: points are written once; use a new checkpoint name",
                self.url,
                point.name()
            )));
        }
        Ok(())
    }
}

/// Check a stored blob against its entry, open it (in an encrypted repository), inflate it
/// and check its id with `keys`.
pub fn check_blob(
    blob: &[u8],
    id: &ChunkId,
    entry: &PackEntry,
    keys: ChunkKeys<'_>,
) -> std::result::Result<Vec<u8>, String> {
    check_blob_into(blob, id, entry, keys, Vec::new())
}

/// [`check_blob`] inflating into the memory of `out` (its contents are dropped).
pub fn check_blob_into(
    blob: &[u8],
    id: &ChunkId,
    entry: &PackEntry,
    keys: ChunkKeys<'_>,
    mut out: Vec<u8>,
) -> std::result::Result<Vec<u8>, String> {
    if blob.len() != entry.stored_len as usize {
        return Err(format!(
            "{} bytes where {} were expected",
            blob.len(),
            entry.stored_len
        ));
    }
    if crc32fast::hash(blob) != entry.crc {
        return Err("CRC mismatch".into());
    }
    let opened;
    let blob = match keys.crypto() {
        Some(c) => {
            opened = c.open(&crypto::RepoCrypto::chunk_aad(id), blob)?;
            opened.as_slice()
        }
        None => blob,
    };
    // One call into a buffer of at least the plaintext length (a frame that inflates to more
    // than the buffer fails, one that inflates to more than the plaintext is caught below):
    // no streaming copies on the restore and `repo export` paths.
    out.clear();
    out.reserve_exact(entry.raw_len as usize);
    zstd::bulk::Decompressor::new()
        .and_then(|mut z| z.decompress_to_buffer(blob, &mut out))
        .map_err(|e| {
            format!(
                "zstd: {e} (the frame does not inflate to at most {} bytes)",
                entry.raw_len
            )
        })?;
    if out.len() != entry.raw_len as usize {
        return Err(format!(
            "inflates to {} bytes, not {}",
            out.len(),
            entry.raw_len
        ));
    }
    if keys.chunk_id(&out) != *id {
        return Err(match keys {
            ChunkKeys::Plain(hash) => format!("{hash} of the data does not match the chunk id"),
            ChunkKeys::Sealed(c) => format!(
                "the keyed hash ({}) of the data does not match the chunk id",
                c.hash().keyed_name()
            ),
        });
    }
    Ok(out)
}

/// A runtime for unit tests that drive the repository from plain threads.
#[cfg(test)]
pub(crate) fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A new plain repository of `chunk_size` chunks in `dir/repo`, for unit tests.
#[cfg(test)]
pub(crate) fn test_repository(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    chunk_size: u32,
) -> Repository {
    let url = dir.join("repo");
    rt.block_on(Repository::init(
        url.to_str().expect("a UTF-8 temp dir"),
        &StoreOptions::default(),
        chunk_size,
    ))
    .expect("a new repository")
}

/// A retention policy: which points `prune` keeps.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keep {
    pub last: usize,
    pub daily: usize,
    pub weekly: usize,
}

/// The points of `points` (one volume's or many) that `keep` keeps: per volume, the newest
/// `last`, the newest of each of the last `daily` days and of the last `weekly` weeks (UTC)
/// that have points.
pub fn select_kept(points: &[PointIndex], keep: Keep) -> HashSet<String> {
    let mut by_volume: BTreeMap<&str, Vec<&PointIndex>> = BTreeMap::new();
    for p in points {
        by_volume.entry(&p.volume).or_default().push(p);
    }
    let mut kept = HashSet::new();
    for (_, mut list) in by_volume {
        list.sort_by(|a, b| (b.created_unix, &b.checkpoint).cmp(&(a.created_unix, &a.checkpoint)));
        for p in list.iter().take(keep.last) {
            kept.insert(p.name());
        }
        for (period, count) in [(86_400u64, keep.daily), (7 * 86_400, keep.weekly)] {
            let mut seen = HashSet::new();
            for p in &list {
                if seen.len() >= count {
                    break;
                }
                // Weeks start on Monday: 1970-01-01 was a Thursday.
                let shift = if period == 86_400 { 0 } else { 3 * 86_400 };
                if seen.insert((p.created_unix + shift) / period) {
                    kept.insert(p.name());
                }
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(volume: &str, checkpoint: &str, t: u64) -> PointIndex {
        PointIndex {
            volume: volume.into(),
            volume_uuid: [1; 16],
            checkpoint: checkpoint.into(),
            parent: String::new(),
            created_unix: t,
            size: 0,
            chunk_size: DEFAULT_CHUNK_SIZE,
            granularity: 65536,
            new_bytes: 0,
            chunks: vec![],
            pieces: vec![],
            zero_runs: Vec::new(),
        }
    }

    #[test]
    fn keep_last_daily_weekly() {
        let day = 86_400;
        let points: Vec<_> = (0..10)
            .map(|i| p("vm", &format!("c{i}"), 1_700_000_000 + i * day / 2))
            .collect();
        let kept = select_kept(
            &points,
            Keep {
                last: 2,
                ..Keep::default()
            },
        );
        assert_eq!(
            kept,
            HashSet::from(["vm@c9".to_string(), "vm@c8".to_string()])
        );
        let kept = select_kept(
            &points,
            Keep {
                daily: 3,
                ..Keep::default()
            },
        );
        assert_eq!(kept.len(), 3);
        assert!(kept.contains("vm@c9"));
        let none = select_kept(&points, Keep::default());
        assert!(none.is_empty());
    }

    fn config(text: &str) -> Config {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn configs_round_trip_and_name_their_hash_and_version() {
        let encryption = |hash: ChunkHash| Encryption {
            cipher: crypto::CIPHER.into(),
            chunk_id: hash.keyed_name().into(),
            key_id: "0123456789abcdef".into(),
            key_check: "00".repeat(32),
        };
        for hash in ChunkHash::ALL {
            for enc in [None, Some(encryption(hash))] {
                let made = Config::new(DEFAULT_CHUNK_SIZE, "id".into(), hash, enc.clone());
                let text = serde_json::to_string_pretty(&made).unwrap();
                assert!(
                    text.contains(&format!("\"hash\": \"{}\"", hash.name())),
                    "{text}"
                );
                let read = config(&text);
                assert_eq!(read, made);
                assert_eq!(read.check(), Ok(hash));
                assert_eq!(read.version, hash.config_version(enc.is_some()));
            }
        }
        let blake3 = Config::new(DEFAULT_CHUNK_SIZE, "id".into(), ChunkHash::Blake3, None);
        assert_eq!(
            blake3.version, 3,
            "a tidemark before BLAKE3 refuses anything but 1 and 2"
        );
    }

    #[test]
    fn configs_an_older_tidemark_wrote_are_sha256_repositories() {
        let v1 = config(
            r#"{"kind": "tidemark-repo", "version": 1, "chunk_size": 65536,
                "id": "75d178c3-12c2-4a72-a0cd-83079ed98700"}"#,
        );
        assert_eq!(v1.hash, None);
        assert_eq!(v1.check(), Ok(ChunkHash::Sha256));
        let v2 = config(
            r#"{"kind": "tidemark-repo", "version": 2, "chunk_size": 4194304, "id": "x",
                "encryption": {"cipher": "aes-256-gcm", "chunk_id": "hmac-sha256",
                               "key_id": "0123456789abcdef", "key_check": "00"}}"#,
        );
        assert_eq!(v2.check(), Ok(ChunkHash::Sha256));
    }

    #[test]
    fn configs_with_an_unknown_hash_or_a_version_that_does_not_go_with_it_are_refused() {
        let refused = |text: &str, why: &str| {
            let err = config(text).check().unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        };
        let plain = |version: u32, hash: &str| {
            format!(
                r#"{{"kind": "tidemark-repo", "version": {version}, "chunk_size": 65536,
                    "id": "x"{hash}}}"#
            )
        };
        refused(
            &plain(3, r#", "hash": "sha3-256""#),
            "hash \"sha3-256\" is not supported (this tidemark knows blake3, sha256)",
        );
        refused(&plain(1, r#", "hash": "BLAKE3""#), "not supported");
        refused(&plain(3, ""), "version 3 names no hash");
        refused(
            &plain(1, r#", "hash": "blake3""#),
            "version 1 does not go with hash \"blake3\": an unencrypted BLAKE3 repository is version 3",
        );
        refused(
            &plain(3, r#", "hash": "sha256""#),
            "version 3 does not go with hash \"sha256\": an unencrypted SHA-256 repository is version 1",
        );
        refused(&plain(2, r#", "hash": "sha256""#), "is version 1");
        refused(
            &plain(4, r#", "hash": "blake3""#),
            "version 4 is not supported",
        );
        refused(&plain(0, ""), "version 0 is not supported");
        let encrypted = |version: u32, hash: &str, chunk_id: &str| {
            format!(
                r#"{{"kind": "tidemark-repo", "version": {version}, "chunk_size": 65536,
                    "id": "x", "hash": "{hash}", "encryption": {{"cipher": "aes-256-gcm",
                    "chunk_id": "{chunk_id}", "key_id": "k", "key_check": "c"}}}}"#
            )
        };
        assert_eq!(
            config(&encrypted(3, "blake3", "blake3-keyed")).check(),
            Ok(ChunkHash::Blake3)
        );
        refused(
            &encrypted(3, "blake3", "hmac-sha256"),
            "chunk ids \"hmac-sha256\" is not supported in a BLAKE3 repository",
        );
        refused(
            &encrypted(2, "sha256", "blake3-keyed"),
            "chunk ids \"blake3-keyed\" is not supported in a SHA-256 repository",
        );
        refused(
            &encrypted(1, "sha256", "hmac-sha256"),
            "version 1 does not go with hash \"sha256\": an encrypted SHA-256 repository is version 2",
        );
        refused(
            r#"{"kind": "other", "version": 3, "chunk_size": 65536, "id": "x", "hash": "blake3"}"#,
            "kind \"other\"",
        );
        refused(
            &plain(3, r#", "hash": "blake3""#).replace("65536", "1000"),
            "chunk size",
        );
    }

    #[test]
    fn opening_a_repository_with_a_refused_config_names_the_config_and_why() {
        let rt = test_runtime();
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().to_str().unwrap().to_string();
        std::fs::write(
            dir.path().join("config"),
            r#"{"kind": "tidemark-repo", "version": 3, "chunk_size": 65536, "id": "x",
                "hash": "sha3-256"}"#,
        )
        .unwrap();
        let err = rt
            .block_on(Repository::open(&url, &StoreOptions::default()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{url}/config is corrupt")), "{err}");
        assert!(err.contains("hash \"sha3-256\" is not supported"), "{err}");
    }

    #[test]
    fn point_names_parse() {
        assert_eq!(
            parse_point_name("vm1@c2").unwrap(),
            ("vm1".into(), "c2".into())
        );
        for bad in ["vm1", "@c", "vm@", "a/b@c", "vm@c@d"] {
            assert!(parse_point_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_sealed_blob_opens_only_under_its_key_and_id_even_with_a_valid_crc() {
        for hash in ChunkHash::ALL {
            a_sealed_blob_opens_only_under_its_key_and_id(hash);
        }
    }

    fn a_sealed_blob_opens_only_under_its_key_and_id(hash: ChunkHash) {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<crypto::RepoCrypto> = (0..2)
            .map(|i| {
                let path = dir.path().join(format!("k{i}"));
                crypto::generate_key_file(&path).unwrap();
                crypto::RepoCrypto::new(&crypto::load_key_file(&path).unwrap(), hash)
            })
            .collect();
        let data = vec![5u8; 100_000];
        let id = keys[0].chunk_id(&data);
        let sealed = keys[0]
            .seal(
                &crypto::RepoCrypto::chunk_aad(&id),
                &zstd::bulk::compress(&data, 1).unwrap(),
            )
            .unwrap();
        let entry = |blob: &[u8], id: ChunkId| PackEntry {
            id,
            offset: 8,
            stored_len: blob.len() as u32,
            raw_len: data.len() as u32,
            crc: crc32fast::hash(blob),
        };
        let ok = check_blob(
            &sealed,
            &id,
            &entry(&sealed, id),
            ChunkKeys::Sealed(&keys[0]),
        );
        assert_eq!(ok.unwrap(), data);
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        let err = check_blob(
            &tampered,
            &id,
            &entry(&tampered, id),
            ChunkKeys::Sealed(&keys[0]),
        );
        assert!(err.unwrap_err().contains("authentication failed"));
        let err = check_blob(
            &sealed,
            &id,
            &entry(&sealed, id),
            ChunkKeys::Sealed(&keys[1]),
        );
        assert!(err.unwrap_err().contains("authentication failed"));
        let other = keys[0].chunk_id(b"other");
        let err = check_blob(
            &sealed,
            &other,
            &entry(&sealed, other),
            ChunkKeys::Sealed(&keys[0]),
        );
        assert!(
            err.unwrap_err().contains("authentication failed"),
            "moved blob"
        );
        let err = check_blob(&sealed, &id, &entry(&sealed, id), ChunkKeys::Plain(hash));
        assert!(err.is_err(), "a sealed blob read as a plain one");
    }

    #[test]
    fn blobs_are_checked() {
        for hash in ChunkHash::ALL {
            blobs_are_checked_with(hash);
        }
    }

    fn blobs_are_checked_with(hash: ChunkHash) {
        let plain = ChunkKeys::Plain(hash);
        let data = vec![5u8; 100_000];
        let id = ChunkId(hash.digest(&data));
        assert_eq!(plain.chunk_id(&data), id);
        let blob = zstd::bulk::compress(&data, 1).unwrap();
        let entry = PackEntry {
            id,
            offset: 8,
            stored_len: blob.len() as u32,
            raw_len: data.len() as u32,
            crc: crc32fast::hash(&blob),
        };
        assert_eq!(check_blob(&blob, &id, &entry, plain).unwrap(), data);
        let mut bad = blob.clone();
        bad[3] ^= 1;
        assert!(check_blob(&bad, &id, &entry, plain)
            .unwrap_err()
            .contains("CRC"));
        let short = PackEntry {
            raw_len: entry.raw_len - 1,
            ..entry
        };
        assert!(check_blob(&blob, &id, &short, plain)
            .unwrap_err()
            .contains("zstd"));
        let long = PackEntry {
            raw_len: entry.raw_len + 1,
            ..entry
        };
        assert!(check_blob(&blob, &id, &long, plain)
            .unwrap_err()
            .contains("inflates to"));
        let other = ChunkId([0; 32]);
        assert!(check_blob(&blob, &other, &entry, plain)
            .unwrap_err()
            .contains(&format!("{hash} of the data does not match")));
        // A recycled buffer larger than the chunk, full of another chunk's bytes: the same
        // checks, none of its old bytes survive.
        let recycled = || vec![0xee; 300_000];
        assert_eq!(
            check_blob_into(&blob, &id, &entry, plain, recycled()).unwrap(),
            data
        );
        assert!(check_blob_into(&blob, &id, &short, plain, recycled())
            .unwrap_err()
            .contains("inflates to"));
        assert!(check_blob_into(&bad, &id, &entry, plain, recycled())
            .unwrap_err()
            .contains("CRC"));
    }
}
