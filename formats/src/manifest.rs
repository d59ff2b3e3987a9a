//! Small state as JSON: the volume manifest and the checkpoint chain of a volume.
//!
//! Both files carry `"format_version": 1` next to their fields. A reader refuses any other
//! version and ignores fields it does not know (later minor additions). Files are replaced
//! with [`atomic_replace`] (temp file, fsync, rename, fsync dir), so a crash leaves the old
//! or the new file, never a torn one.
//!
//! ```json
//! { "format_version": 1, "name": "db", "uuid": "…", "backing": "/dev/vdb",
//!   "size": 10737418240, "granularity": 65536, "tracking": "durable",
//!   "created_unix": 1700000000 }
//! { "format_version": 1, "chain_uuid": "…", "checkpoints": [
//!   { "name": "mon", "generation": 1, "created_unix": 1700000000, "bitmap_file": "mon.bitmap",
//!     "confirmed": true } ] }
//! ```

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::atomic::atomic_replace;
use crate::bitmap::{MAX_GRANULARITY, MAX_VOLUME_SIZE, MIN_GRANULARITY};
use crate::error::{FormatError, FormatErrorKind, InvalidField};

/// The JSON format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest manifest or chain file read (bounds the allocation before reading).
pub const MAX_JSON_LEN: u64 = 16 << 20;
/// Longest volume name in bytes.
pub const MAX_VOLUME_NAME: usize = 128;
/// Most checkpoints in one chain.
pub const MAX_CHECKPOINTS: usize = 65536;

/// How the volume's dirty tracking reaches stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackingMode {
    /// A bit is on stable storage before the data write it covers is issued.
    Durable,
    /// Bits are flushed lazily; an unclean stop marks bitmaps inconsistent.
    Fast,
}

/// A volume under tidemark's management.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeManifest {
    /// Volume name: 1..=128 bytes of `[A-Za-z0-9_.:+-]`, not starting with `.` or `-`.
    pub name: String,
    /// The volume's uuid.
    pub uuid: Uuid,
    /// The backing file or block device.
    pub backing: PathBuf,
    /// Volume size in bytes.
    pub size: u64,
    /// Tracking block size: a power of two from 4 KiB to 1 MiB.
    pub granularity: u32,
    /// Durable or fast dirty tracking.
    pub tracking: TrackingMode,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// One checkpoint in a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointEntry {
    /// Checkpoint name (1..=255 bytes, no NUL, no `/`), unique in the chain.
    pub name: String,
    /// Generation, strictly increasing along the chain.
    pub generation: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The bitmap file's name, relative to the volume's directory (no `/`).
    pub bitmap_file: String,
    /// Whether the data at this checkpoint is known to be stored: false while the backup
    /// that created it has not been seen through (absent in older files: true).
    #[serde(default = "confirmed_by_default")]
    pub confirmed: bool,
}

/// Chains written before the `confirmed` field knew only confirmed checkpoints.
fn confirmed_by_default() -> bool {
    true
}

/// The checkpoints of a volume, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointChain {
    /// Identifies this chain; a new chain (after a forced full backup) gets a new uuid.
    pub chain_uuid: Uuid,
    /// Checkpoints, oldest first.
    pub checkpoints: Vec<CheckpointEntry>,
    /// The generation the next checkpoint gets, above every generation in `checkpoints`:
    /// generations of checkpoints a rollback dropped (or that were deleted) are never
    /// handed out again (absent in older files: one past the highest in the chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_generation: Option<u64>,
}

/// Checks a volume name: 1..=128 bytes of `[A-Za-z0-9_.:+-]`, not starting with `.` or `-`.
pub fn validate_volume_name(name: &str) -> Result<(), InvalidField> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "_.:+-".contains(c);
    if name.is_empty()
        || name.len() > MAX_VOLUME_NAME
        || name.starts_with(['.', '-'])
        || !name.chars().all(ok_char)
    {
        return Err(InvalidField::new(
            "name",
            format!(
                "{name:?}: a volume name is 1 to {MAX_VOLUME_NAME} characters of A-Z a-z 0-9 \
                 _ . : + -, not starting with '.' or '-'"
            ),
        ));
    }
    Ok(())
}

/// Checks a checkpoint name: 1..=255 bytes, no NUL, no `/`.
pub fn validate_checkpoint_name(name: &str) -> Result<(), InvalidField> {
    if name.is_empty() || name.len() > 255 || name.contains(['\0', '/']) {
        return Err(InvalidField::new(
            "checkpoint name",
            format!("{name:?}: must be 1 to 255 bytes without NUL or '/'"),
        ));
    }
    Ok(())
}

impl VolumeManifest {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), InvalidField> {
        validate_volume_name(&self.name)?;
        if self.backing.as_os_str().is_empty() {
            return Err(InvalidField::new("backing", "empty path"));
        }
        if self.size == 0 || self.size > MAX_VOLUME_SIZE {
            return Err(InvalidField::new(
                "size",
                format!("{} (must be 1..={MAX_VOLUME_SIZE})", self.size),
            ));
        }
        let g = self.granularity;
        if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
            return Err(InvalidField::new(
                "granularity",
                format!("{g} (must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY})"),
            ));
        }
        Ok(())
    }

    /// Parses and validates manifest JSON; `file` names it in errors.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Self, FormatError> {
        let m: Self = parse_versioned(bytes, file, "volume manifest")?;
        m.validate().map_err(|e| FormatError::invalid(file, 0, e))?;
        Ok(m)
    }

    /// Reads and validates a manifest file.
    pub fn read(path: &Path) -> Result<Self, FormatError> {
        Self::parse(&read_bounded(path)?, path)
    }

    /// The manifest as pretty JSON with its format version.
    pub fn to_json(&self) -> Vec<u8> {
        to_versioned_json(self)
    }

    /// Validates and atomically replaces `path` with this manifest.
    pub fn write(&self, path: &Path) -> Result<(), FormatError> {
        self.validate()
            .map_err(|e| FormatError::invalid(path, 0, e))?;
        atomic_replace(path, &self.to_json()).map_err(|e| FormatError::io(path, 0, e))
    }
}

impl CheckpointChain {
    /// An empty chain with a fresh uuid.
    pub fn new() -> Self {
        Self {
            chain_uuid: Uuid::new_v4(),
            checkpoints: Vec::new(),
            next_generation: None,
        }
    }

    /// Checks names (valid, unique), generations (strictly increasing) and bitmap file
    /// names (plain names inside the volume directory).
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.checkpoints.len() > MAX_CHECKPOINTS {
            return Err(InvalidField::new(
                "checkpoints",
                format!(
                    "{} checkpoints (at most {MAX_CHECKPOINTS})",
                    self.checkpoints.len()
                ),
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut files = std::collections::HashSet::new();
        let mut prev_gen: Option<u64> = None;
        for c in &self.checkpoints {
            validate_checkpoint_name(&c.name)?;
            if !names.insert(c.name.as_str()) {
                return Err(InvalidField::new(
                    "checkpoint name",
                    format!("{:?} appears twice in the chain", c.name),
                ));
            }
            if prev_gen.is_some_and(|p| c.generation <= p) {
                return Err(InvalidField::new(
                    "generation",
                    format!(
                        "checkpoint {:?} has generation {} after {} (must increase)",
                        c.name,
                        c.generation,
                        prev_gen.unwrap_or(0)
                    ),
                ));
            }
            prev_gen = Some(c.generation);
            let f = c.bitmap_file.as_str();
            if f.is_empty() || f == "." || f == ".." || f.contains(['/', '\0']) {
                return Err(InvalidField::new(
                    "bitmap_file",
                    format!("{f:?}: must be a plain file name inside the volume directory"),
                ));
            }
            if !files.insert(f) {
                return Err(InvalidField::new(
                    "bitmap_file",
                    format!("{f:?} is used by two checkpoints"),
                ));
            }
        }
        if let (Some(next), Some(last)) = (self.next_generation, prev_gen) {
            if next <= last {
                return Err(InvalidField::new(
                    "next_generation",
                    format!("{next} is not above the latest checkpoint's generation {last}"),
                ));
            }
        }
        Ok(())
    }

    /// The checkpoint named `name`.
    pub fn get(&self, name: &str) -> Option<&CheckpointEntry> {
        self.checkpoints.iter().find(|c| c.name == name)
    }

    /// The newest checkpoint.
    pub fn latest(&self) -> Option<&CheckpointEntry> {
        self.checkpoints.last()
    }

    /// Parses and validates chain JSON; `file` names it in errors.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Self, FormatError> {
        let c: Self = parse_versioned(bytes, file, "checkpoint chain")?;
        c.validate().map_err(|e| FormatError::invalid(file, 0, e))?;
        Ok(c)
    }

    /// Reads and validates a chain file.
    pub fn read(path: &Path) -> Result<Self, FormatError> {
        Self::parse(&read_bounded(path)?, path)
    }

    /// The chain as pretty JSON with its format version.
    pub fn to_json(&self) -> Vec<u8> {
        to_versioned_json(self)
    }

    /// Validates and atomically replaces `path` with this chain.
    pub fn write(&self, path: &Path) -> Result<(), FormatError> {
        self.validate()
            .map_err(|e| FormatError::invalid(path, 0, e))?;
        atomic_replace(path, &self.to_json()).map_err(|e| FormatError::io(path, 0, e))
    }
}

impl Default for CheckpointChain {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses a volume manifest (free-function form of [`VolumeManifest::parse`]).
pub fn parse_volume_manifest(bytes: &[u8], file: &Path) -> Result<VolumeManifest, FormatError> {
    VolumeManifest::parse(bytes, file)
}

/// Parses a checkpoint chain (free-function form of [`CheckpointChain::parse`]).
pub fn parse_checkpoint_chain(bytes: &[u8], file: &Path) -> Result<CheckpointChain, FormatError> {
    CheckpointChain::parse(bytes, file)
}

#[derive(Serialize)]
struct Versioned<'a, T> {
    format_version: u32,
    #[serde(flatten)]
    inner: &'a T,
}

#[derive(Deserialize)]
struct VersionProbe {
    format_version: Option<serde_json::Value>,
}

fn to_versioned_json<T: Serialize>(value: &T) -> Vec<u8> {
    let v = Versioned {
        format_version: FORMAT_VERSION,
        inner: value,
    };
    // Serializing these plain structs cannot fail: no maps with non-string keys, no
    // failing Serialize impls.
    let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
    out.push(b'\n');
    out
}

fn parse_versioned<T: DeserializeOwned>(
    bytes: &[u8],
    file: &Path,
    what: &'static str,
) -> Result<T, FormatError> {
    if bytes.len() as u64 > MAX_JSON_LEN {
        return Err(FormatError::new(
            file,
            MAX_JSON_LEN,
            FormatErrorKind::TrailingBytes {
                what,
                extra: bytes.len() as u64 - MAX_JSON_LEN,
            },
        ));
    }
    let json_err = |e: serde_json::Error| {
        FormatError::new(file, json_offset(bytes, &e), FormatErrorKind::Json(e))
    };
    let probe: VersionProbe = serde_json::from_slice(bytes).map_err(json_err)?;
    match probe.format_version {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(FORMAT_VERSION)) => {}
        other => {
            let found = other.map_or_else(|| "none".to_owned(), |v| v.to_string());
            return Err(FormatError::invalid(
                file,
                find(bytes, b"\"format_version\"").unwrap_or(0),
                InvalidField::new(
                    "format_version",
                    format!(
                        "{what} has format_version {found}; this build reads {FORMAT_VERSION} \
                         (upgrade tidemark, or the file is not a tidemark {what})"
                    ),
                ),
            ));
        }
    }
    serde_json::from_slice(bytes).map_err(json_err)
}

/// Byte offset of a serde_json error position (line and column are 1-based).
fn json_offset(bytes: &[u8], e: &serde_json::Error) -> u64 {
    let mut line_start = 0usize;
    let mut line = 1usize;
    for (i, &b) in bytes.iter().enumerate() {
        if line == e.line() {
            break;
        }
        if b == b'\n' {
            line += 1;
            line_start = i + 1;
        }
    }
    (line_start + e.column().saturating_sub(1)).min(bytes.len()) as u64
}

fn find(hay: &[u8], needle: &[u8]) -> Option<u64> {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p as u64)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, FormatError> {
    let f = File::open(path).map_err(|e| FormatError::io(path, 0, e))?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FormatError::io(path, 0, e))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest() -> VolumeManifest {
        VolumeManifest {
            name: "db-1".into(),
            uuid: Uuid::from_u128(42),
            backing: "/dev/vdb".into(),
            size: 10 << 30,
            granularity: 65536,
            tracking: TrackingMode::Durable,
            created_unix: 1_700_000_000,
        }
    }

    fn chain() -> CheckpointChain {
        CheckpointChain {
            chain_uuid: Uuid::from_u128(7),
            checkpoints: vec![
                CheckpointEntry {
                    name: "mon".into(),
                    generation: 1,
                    created_unix: 10,
                    bitmap_file: "mon.bitmap".into(),
                    confirmed: true,
                },
                CheckpointEntry {
                    name: "tue".into(),
                    generation: 2,
                    created_unix: 20,
                    bitmap_file: "tue.bitmap".into(),
                    confirmed: false,
                },
            ],
            next_generation: None,
        }
    }

    #[test]
    fn a_chain_without_confirmed_fields_reads_as_confirmed() {
        let json = br#"{"format_version": 1, "chain_uuid": "00000000-0000-0000-0000-000000000007",
            "checkpoints": [{"name": "mon", "generation": 1, "created_unix": 10,
            "bitmap_file": "mon.bitmap"}]}"#;
        let old = CheckpointChain::parse(json, Path::new("c.json")).unwrap();
        assert!(old.checkpoints[0].confirmed);
        let round = CheckpointChain::parse(&chain().to_json(), Path::new("c.json")).unwrap();
        assert_eq!(round, chain());
        assert!(!round.checkpoints[1].confirmed);
    }

    #[test]
    fn manifest_round_trips_with_version_field() {
        let json = manifest().to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"format_version\": 1"), "{text}");
        assert!(text.contains("\"tracking\": \"durable\""), "{text}");
        assert_eq!(
            VolumeManifest::parse(&json, Path::new("m.json")).unwrap(),
            manifest()
        );
    }

    #[test]
    fn chain_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("checkpoints.json");
        chain().write(&p).unwrap();
        assert_eq!(CheckpointChain::read(&p).unwrap(), chain());
        assert_eq!(chain().latest().unwrap().name, "tue");
        assert_eq!(chain().get("mon").unwrap().generation, 1);
    }

    #[test]
    fn wrong_or_missing_version_is_refused() {
        let json = String::from_utf8(manifest().to_json()).unwrap();
        let v2 = json.replace("\"format_version\": 1", "\"format_version\": 2");
        let e = VolumeManifest::parse(v2.as_bytes(), Path::new("m.json")).unwrap_err();
        assert!(e.to_string().contains("format_version 2"), "{e}");
        assert_eq!(e.offset, v2.find("\"format_version\"").unwrap() as u64);
        let none = json.replace("\"format_version\": 1,", "");
        assert!(VolumeManifest::parse(none.as_bytes(), Path::new("m.json")).is_err());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let json = String::from_utf8(manifest().to_json()).unwrap();
        let extra = json.replacen('{', "{\"future\": [1, 2],", 1);
        assert_eq!(
            VolumeManifest::parse(extra.as_bytes(), Path::new("m")).unwrap(),
            manifest()
        );
    }

    #[test]
    fn json_errors_name_the_byte_offset() {
        let json = b"{\n  \"format_version\": 1,\n  \"name\": 5\n}";
        let e = VolumeManifest::parse(json, Path::new("/v/m.json")).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/v/m.json: at byte "), "{s}");
        assert!(e.offset > 20 && e.offset <= json.len() as u64, "{s}");
        let e = VolumeManifest::parse(b"{\"format_version\": 1, \"name\":", Path::new("m"))
            .unwrap_err();
        assert!(matches!(e.kind, FormatErrorKind::Json(_)));
    }

    #[test]
    fn invalid_manifest_fields_are_refused() {
        for bad in [
            VolumeManifest {
                name: "".into(),
                ..manifest()
            },
            VolumeManifest {
                name: "a/b".into(),
                ..manifest()
            },
            VolumeManifest {
                name: "x@backup".into(),
                ..manifest()
            },
            VolumeManifest {
                name: ".hidden".into(),
                ..manifest()
            },
            VolumeManifest {
                granularity: 1000,
                ..manifest()
            },
            VolumeManifest {
                size: 0,
                ..manifest()
            },
            VolumeManifest {
                backing: "".into(),
                ..manifest()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            assert!(VolumeManifest::parse(&bad.to_json(), Path::new("m")).is_err());
        }
    }

    #[test]
    fn invalid_chains_are_refused() {
        let mut c = chain();
        c.checkpoints[1].generation = 1;
        assert!(c.validate().is_err(), "generation must increase");
        let mut c = chain();
        c.checkpoints[1].name = "mon".into();
        assert!(c.validate().is_err(), "duplicate name");
        let mut c = chain();
        c.checkpoints[1].bitmap_file = "../etc/passwd".into();
        assert!(c.validate().is_err(), "path escape");
        let mut c = chain();
        c.checkpoints[1].bitmap_file = "mon.bitmap".into();
        assert!(c.validate().is_err(), "shared bitmap file");
        let dir = tempfile::tempdir().unwrap();
        assert!(c.write(&dir.path().join("c.json")).is_err());
    }

    #[test]
    fn a_next_generation_must_be_above_the_chain_and_round_trips() {
        let mut c = chain();
        c.next_generation = Some(2);
        assert!(c.validate().is_err(), "at or below the latest generation");
        c.next_generation = Some(5);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        c.write(&path).unwrap();
        assert_eq!(CheckpointChain::read(&path).unwrap(), c);
    }

    #[test]
    fn oversized_file_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.json");
        let f = File::create(&p).unwrap();
        f.set_len(MAX_JSON_LEN + 10).unwrap();
        let e = VolumeManifest::read(&p).unwrap_err();
        assert_eq!(e.offset, MAX_JSON_LEN);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = VolumeManifest::parse(&bytes, Path::new("m"));
            let _ = CheckpointChain::parse(&bytes, Path::new("c"));
        }

        #[test]
        fn manifest_round_trips(
            name in "[a-zA-Z0-9_][a-zA-Z0-9_.:+-]{0,40}",
            size in 1u64..=MAX_VOLUME_SIZE,
            shift in 12u32..=20,
            fast in any::<bool>(),
            created in any::<u64>(),
        ) {
            let m = VolumeManifest {
                name,
                uuid: Uuid::from_u128(u128::from(created)),
                backing: "/srv/disk.img".into(),
                size,
                granularity: 1 << shift,
                tracking: if fast { TrackingMode::Fast } else { TrackingMode::Durable },
                created_unix: created,
            };
            prop_assert_eq!(VolumeManifest::parse(&m.to_json(), Path::new("m")).unwrap(), m);
        }
    }
}
