//! Rollback of a volume to a point taken at one of its checkpoints, writing back only the
//! blocks changed since that checkpoint (the EVE design's rollback).
//!
//! A rollback to checkpoint C from a point (a base and deltas, as `tidemark restore` takes
//! them) writes the blocks of the changes since C (the OR of the dirty bitmaps since C,
//! [`crate::checkpoint`]) with their content at the point; every other block is unchanged
//! since C, so the volume then equals the point. Afterwards the checkpoints after C are
//! dropped and C starts afresh, so the next incremental is taken from C.
//!
//! # Checked before anything is written
//!
//! - The point follows on as restore checks it (same volume, each delta from where the
//!   previous one ends), and its last link ends at C of this volume: the same volume uuid
//!   and size, C's name and generation. A bare image carries no such metadata and is
//!   refused. A repository point (opened by the caller, [`PointRead`]) records the volume
//!   uuid, size and checkpoint name but no generation: it must also have been stored no
//!   earlier than C was created (else it is of an earlier checkpoint of that name).
//! - C exists and the changes since it are known (consistent bitmaps); otherwise only a
//!   full restore can bring the volume back, and the error says so.
//! - No snapshot of the volume is alive (a running backup would see the rollback's writes
//!   in its copy-before-write and its checkpoint would be dropped under it).
//!
//! # Write order (crash safety)
//!
//! Writes to the volume are paused for the whole rollback ([`Volume::exclusive`]).
//!
//! 1. The marker `rollback.json` in the volume's directory, naming C and the point, is
//!    written durably (temp file, fsync, rename, fsync of the directory).
//! 2. The changed blocks are resolved against the point ([`crate::point_map`]: which
//!    delta record, zeros or the base holds each byte) and written to the backing store by
//!    [`WORKERS`] threads ([`write_back`]): many reads in flight, adjacent blocks read
//!    together, every delta record read and checked once however many changed blocks
//!    fall in it, the volume written through its O_DIRECT descriptor.
//! 3. The backing store is fdatasync'ed.
//! 4. The chain switch ([`crate::checkpoint`]'s `rollback_to`): the later checkpoints
//!    dropped, C's bitmap emptied and made the active one, in one chain replace.
//! 5. The marker is removed and the directory fsync'ed.
//!
//! The marker also lists the byte ranges to write back. While it exists, [`Volume::open`]
//! refuses the volume (no reads, no export) with [`VolumeError::RollbackIncomplete`],
//! which names the command that finishes it. A rerun to the same checkpoint finishes it:
//! nothing can have written to the volume since, so it writes the ranges the marker lists
//! again (whatever the bitmaps say now: a crash in fast tracking mode leaves them
//! untrusted), then does steps 3 to 5 (the switch is harmless to repeat).
//!
//! The environment variable `TIDEMARK_TEST_ROLLBACK_DELAY_MS` (tests only) pauses that
//! long after each piece written in step 2, so a test can kill a rollback in the middle.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidemark_formats::delta::{CheckpointRef, DeltaHeader, DeltaReader, IndexEntry};
use uuid::Uuid;

use crate::checkpoint::CheckpointError;
use crate::copy::delta::{check_chain, open_delta, ChainBase};
use crate::copy::{CopyError, FileSource, Source};
use crate::point_map::{resolve, Origin};
use crate::status::unix_now;
use crate::volume::backing::{AlignedBuf, BackingFile, DIRECT_ALIGN as ALIGN};
use crate::volume::{Volume, VolumeError};

/// The marker of a rollback in progress, in the volume's directory.
pub const MARKER_FILE: &str = "rollback.json";

/// The marker's format version.
const MARKER_VERSION: u32 = 1;

/// Largest marker file read (a changed range takes about 30 bytes).
const MAX_MARKER_LEN: u64 = 256 << 20;

/// Most bytes one task copies from a base image.
const PIECE: u64 = 1 << 20;

/// Threads of the write-back: enough reads in flight to keep a disk busy on scattered
/// blocks, few enough that their records (up to 4 MiB each, twice) stay small in memory.
const WORKERS: usize = 8;

/// The test knob of the module doc.
const DELAY_ENV: &str = "TIDEMARK_TEST_ROLLBACK_DELAY_MS";

/// What to roll a volume back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The checkpoint the point was taken at.
    pub checkpoint: String,
    /// The point's base: a full delta, or an image (then at least one delta follows).
    pub base: PathBuf,
    /// The point's incremental deltas, oldest first.
    pub deltas: Vec<PathBuf>,
    /// A repository point instead of files (`base` and `deltas` are then empty): the
    /// caller opens it and hands it to [`Volume::rollback_from`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepositoryPoint>,
}

/// A point of a backup repository, as `repo restore` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryPoint {
    /// The repository (a directory or `s3://BUCKET/PREFIX`).
    pub url: String,
    /// `VOLUME@CHECKPOINT`.
    pub point: String,
}

/// What a point opened by the caller ([`PointRead`]) records about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointIdentity {
    /// The point for messages (`repo:URL VOLUME@CHECKPOINT`).
    pub describe: String,
    /// The uuid of the volume it was taken of.
    pub volume_uuid: Uuid,
    /// The volume's size then.
    pub size: u64,
    /// The checkpoint it was taken at (a repository records no generation).
    pub checkpoint: String,
    /// When it was stored, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// A point the engine does not open itself (a repository point), read by many threads
/// at once.
pub trait PointRead: Sync {
    /// What the point records about itself, checked against the volume and checkpoint.
    fn identity(&self) -> PointIdentity;
    /// Fill `buf` with the point's bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl RollbackRequest {
    /// The command line that runs this rollback on volume `volume`.
    pub fn command(&self, volume: &str) -> String {
        format!(
            "tidemark volume rollback {volume} --checkpoint {} --from {}",
            self.checkpoint,
            point_text(self)
        )
    }
}

/// `rollback.json`: a rollback started and not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackMarker {
    /// [`MARKER_VERSION`].
    pub format_version: u32,
    /// What was asked.
    pub request: RollbackRequest,
    /// The checkpoint's generation.
    pub generation: u64,
    /// When it started, seconds since the Unix epoch.
    pub started_unix: u64,
    /// The byte ranges to write back, `[offset, length]`: the changes since the
    /// checkpoint when it started. A rerun writes these, so it needs no trustworthy
    /// tracking (a crash in fast tracking mode leaves the bitmaps inconsistent).
    pub changed: Vec<[u64; 2]>,
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RollbackReport {
    /// The volume.
    pub volume: String,
    /// The checkpoint it is back at.
    pub checkpoint: String,
    /// That checkpoint's generation (unchanged: deltas from it keep following on).
    pub generation: u64,
    /// The checkpoints after it, dropped (oldest first).
    pub dropped_checkpoints: Vec<String>,
    /// Whether this run finished an interrupted rollback.
    pub resumed: bool,
    /// Bytes of the volume rolled back (the changes since the checkpoint).
    pub bytes_rolled_back: u64,
    /// Of those, bytes written as data.
    pub bytes_written: u64,
    /// Of those, bytes that are zero at the point (written as zeros or holes).
    pub bytes_zeroed: u64,
    /// The volume's size.
    pub size: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Why a rollback was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// Opening or checking the point failed.
    #[error("the point {point}: {reason}")]
    Point {
        /// The point as given.
        point: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The point is not the volume's data at the checkpoint.
    #[error("{0}")]
    Mismatch(String),
    /// The changes since the checkpoint are unknown.
    #[error(
        "volume {volume}: the changes since checkpoint {checkpoint:?} are not known ({reason}), \
         so a rollback cannot tell which blocks to write back; do a full restore instead \
         (`tidemark restore --into BACKING BASE DELTA...` while nothing uses the volume)"
    )]
    Inconsistent {
        /// The volume.
        volume: String,
        /// The checkpoint.
        checkpoint: String,
        /// Why.
        reason: String,
    },
    /// Something holds the volume.
    #[error("{0}")]
    Busy(String),
    /// Another rollback is unfinished.
    #[error(
        "volume {volume}: a rollback to checkpoint {other:?} is incomplete; finish it first \
         with `{rerun}`"
    )]
    OtherIncomplete {
        /// The volume.
        volume: String,
        /// The checkpoint of the unfinished rollback.
        other: String,
        /// The command that finishes it.
        rerun: String,
    },
    /// Reading the point or writing the volume failed; the marker stays.
    #[error(
        "volume {volume}: {what} at volume offset {offset}; the rollback is incomplete: fix \
         the cause and rerun `{rerun}`"
    )]
    Io {
        /// The volume.
        volume: String,
        /// What failed.
        what: String,
        /// Where.
        offset: u64,
        /// The command that finishes it.
        rerun: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing or removing the marker failed.
    #[error("volume {volume}: {action} the rollback marker {}", path.display())]
    Marker {
        /// The volume.
        volume: String,
        /// What was being done.
        action: &'static str,
        /// The marker.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A volume operation failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// The marker of an interrupted rollback in volume directory `dir`, if there is one.
/// A marker that cannot be read still counts (with no details): the data is suspect.
pub fn marker(dir: &Path) -> Option<Result<RollbackMarker, String>> {
    let path = dir.join(MARKER_FILE);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return None,
        Err(err) => return Some(Err(format!("{}: {err}", path.display()))),
    };
    let mut bytes = Vec::new();
    if let Err(err) = (&mut file).take(MAX_MARKER_LEN).read_to_end(&mut bytes) {
        return Some(Err(format!("{}: {err}", path.display())));
    }
    Some(
        serde_json::from_slice::<RollbackMarker>(&bytes)
            .map_err(|err| format!("{}: {err}", path.display()))
            .and_then(|m| match m.format_version {
                MARKER_VERSION => Ok(m),
                v => Err(format!(
                    "{}: format version {v}, this build knows {MARKER_VERSION}",
                    path.display()
                )),
            }),
    )
}

/// The command that finishes the rollback a marker describes.
fn rerun_command(volume: &str, marker: &Result<RollbackMarker, String>) -> String {
    match marker {
        Ok(m) => m.request.command(volume),
        Err(_) => format!("tidemark volume rollback {volume} --checkpoint C --from POINT..."),
    }
}

/// [`VolumeError::RollbackIncomplete`] when volume directory `dir` holds a marker.
pub(crate) fn refuse_if_incomplete(name: &str, dir: &Path) -> Result<(), VolumeError> {
    match marker(dir) {
        None => Ok(()),
        Some(m) => Err(VolumeError::RollbackIncomplete {
            name: name.to_string(),
            rerun: rerun_command(name, &m),
        }),
    }
}

/// The point's chain, checked to follow on.
struct CheckedPoint {
    /// The last link: where it is and its header.
    last_path: PathBuf,
    last: DeltaHeader,
    /// Every delta, oldest first, with its index.
    layers: Vec<(PathBuf, Vec<IndexEntry>)>,
    /// The base image, when the chain starts with one.
    image: Option<PathBuf>,
}

/// Open the point's deltas and check that they follow on, as restore checks them.
fn check_point(request: &RollbackRequest) -> Result<CheckedPoint, RollbackError> {
    let failed = |reason: String| RollbackError::Point {
        point: point_text(request),
        reason,
    };
    let base = ChainBase::detect(&request.base);
    let mut paths = Vec::new();
    if let ChainBase::Delta(path) = &base {
        paths.push(path.clone());
    }
    paths.extend(request.deltas.iter().cloned());
    let mut links = Vec::new();
    let mut layers = Vec::new();
    for path in paths {
        let delta = open_delta(&path).map_err(|e| failed(crate::error::chain(&e)))?;
        links.push((path.clone(), delta.header().clone()));
        layers.push((path, delta.extents().to_vec()));
    }
    check_chain(&links, matches!(base, ChainBase::Image(_)))
        .map_err(|e| failed(crate::error::chain(&e)))?;
    let (last_path, last) = links.pop().ok_or_else(|| {
        failed(format!(
            "{} is a plain image, which does not record the volume or checkpoint it was taken \
             at; give the point as a full delta (`backup begin --push FILE --push-format \
             delta`) or as an image followed by the deltas up to the checkpoint",
            request.base.display()
        ))
    })?;
    let image = match base {
        ChainBase::Image(path) => {
            let size = FileSource::open(&path, false)
                .map_err(|e: CopyError| failed(crate::error::chain(&e)))?
                .size();
            if size != last.volume_size {
                return Err(failed(format!(
                    "the chain's base {} holds {size} bytes but {} describes {} bytes",
                    path.display(),
                    last_path.display(),
                    last.volume_size
                )));
            }
            Some(path)
        }
        ChainBase::Delta(_) => None,
    };
    Ok(CheckedPoint {
        last_path,
        last,
        layers,
        image,
    })
}

/// The point as checked before the pause.
enum Checked {
    /// Files: the last link, whose end is checked against the checkpoint in the pause.
    Files {
        last_path: PathBuf,
        last: DeltaHeader,
    },
    /// A point the caller opened.
    Reader(PointIdentity),
}

/// A point the caller opened must be of volume `volume` at checkpoint `wanted`, and
/// stored no earlier than that checkpoint was created (`created_unix`): a point stored
/// before was taken at an earlier checkpoint of the same name (a repository records no
/// generation).
fn check_reader_point(
    volume: &str,
    identity: &PointIdentity,
    wanted: &CheckpointRef,
    created_unix: u64,
) -> Result<(), RollbackError> {
    if identity.checkpoint != wanted.name {
        return Err(RollbackError::Mismatch(format!(
            "the point {} was taken at checkpoint {:?} but volume {volume} is to be rolled \
             back to {}: give the point taken at {:?}",
            identity.describe,
            identity.checkpoint,
            describe(wanted),
            wanted.name
        )));
    }
    if identity.created_unix < created_unix {
        return Err(RollbackError::Mismatch(format!(
            "the point {} was stored at {} (Unix time), before volume {volume}'s {} was \
             created ({created_unix}): it was taken at an earlier checkpoint of that name; \
             give the point stored when {:?} was created",
            identity.describe,
            identity.created_unix,
            describe(wanted),
            wanted.name
        )));
    }
    Ok(())
}

impl Volume {
    /// A point the caller opened must be of this volume (uuid and size).
    fn check_identity(&self, identity: &PointIdentity) -> Result<(), RollbackError> {
        let name = self.name();
        if identity.volume_uuid != self.uuid() {
            return Err(RollbackError::Mismatch(format!(
                "the point {} is of volume uuid {} but volume {name} has uuid {}: give a \
                 point of this volume",
                identity.describe,
                identity.volume_uuid,
                self.uuid()
            )));
        }
        if identity.size != self.size() {
            return Err(RollbackError::Mismatch(format!(
                "the point {} holds {} bytes but volume {name} has {}",
                identity.describe,
                identity.size,
                self.size()
            )));
        }
        Ok(())
    }
}

/// Open the base image for the write-back: with O_DIRECT when the file system allows it
/// (scattered reads then fetch exactly their blocks, no readahead), and buffered.
fn open_base(path: &Path) -> io::Result<(Option<File>, File)> {
    let buffered = File::open(path)?;
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok();
    Ok((direct, buffered))
}

/// The point as given: `BASE DELTA...`.
fn point_text(request: &RollbackRequest) -> String {
    if let Some(RepositoryPoint { url, point }) = &request.repository {
        return format!("repo:{url} {point}");
    }
    std::iter::once(&request.base)
        .chain(&request.deltas)
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe(c: &CheckpointRef) -> String {
    format!("checkpoint {:?} (generation {})", c.name, c.generation)
}

impl Volume {
    /// Roll the volume back to `request.checkpoint` from the point `request` names, or
    /// finish an interrupted rollback (see the module doc). Nothing may use the volume
    /// meanwhile (the caller makes sure: no export connection, no attachment); writes
    /// are paused throughout.
    pub fn rollback(&self, request: &RollbackRequest) -> Result<RollbackReport, RollbackError> {
        if request.repository.is_some() {
            return Err(RollbackError::Point {
                point: point_text(request),
                reason: "a repository point is opened by the daemon: roll back through \
                         `tidemark volume rollback`"
                    .into(),
            });
        }
        self.rollback_inner(request, None)
    }

    /// [`Volume::rollback`] from a point the caller opened (a repository point, named by
    /// `request.repository`): its identity must be this volume's, at the checkpoint.
    pub fn rollback_from(
        &self,
        request: &RollbackRequest,
        point: &dyn PointRead,
    ) -> Result<RollbackReport, RollbackError> {
        self.rollback_inner(request, Some(point))
    }

    fn rollback_inner(
        &self,
        request: &RollbackRequest,
        reader: Option<&dyn PointRead>,
    ) -> Result<RollbackReport, RollbackError> {
        let started = Instant::now();
        let name = self.name().to_string();
        let dir = self.state_path().to_path_buf();
        let existing = marker(&dir);
        if let Some(Ok(m)) = &existing {
            if m.request.checkpoint != request.checkpoint {
                return Err(RollbackError::OtherIncomplete {
                    volume: name,
                    other: m.request.checkpoint.clone(),
                    rerun: m.request.command(self.name()),
                });
            }
        }
        let (checked, files) = match reader {
            Some(point) => {
                let identity = point.identity();
                self.check_identity(&identity)?;
                let described = identity.describe.clone();
                (
                    Checked::Reader(identity),
                    PointFiles {
                        base: Base::Reader(point),
                        layers: Vec::new(),
                        describe: described,
                    },
                )
            }
            None => {
                let CheckedPoint {
                    last_path,
                    last,
                    layers,
                    image,
                } = check_point(request)?;
                if last.volume_uuid != self.uuid() {
                    return Err(RollbackError::Mismatch(format!(
                        "the point is of volume uuid {} ({}) but volume {name} has uuid {}: \
                         give a point of this volume",
                        last.volume_uuid,
                        last_path.display(),
                        self.uuid()
                    )));
                }
                if last.volume_size != self.size() {
                    return Err(RollbackError::Mismatch(format!(
                        "the point describes {} bytes ({}) but volume {name} has {}",
                        last.volume_size,
                        last_path.display(),
                        self.size()
                    )));
                }
                let base = match &image {
                    Some(path) => {
                        let (direct, buffered) =
                            open_base(path).map_err(|err| RollbackError::Point {
                                point: point_text(request),
                                reason: format!("opening {}: {err}", path.display()),
                            })?;
                        Base::Image { direct, buffered }
                    }
                    None => Base::Zero,
                };
                (
                    Checked::Files { last_path, last },
                    PointFiles {
                        base,
                        layers,
                        describe: point_text(request).replace(' ', " + "),
                    },
                )
            }
        };
        let rerun = request.command(&name);
        let delay = std::env::var(DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        self.exclusive(|ex| {
            let generation = ex
                .chain
                .generation_of(&request.checkpoint)
                .map_err(VolumeError::from)?;
            let wanted = CheckpointRef {
                name: request.checkpoint.clone(),
                generation,
            };
            match &checked {
                Checked::Files { last_path, last } if last.to != wanted => {
                    return Err(RollbackError::Mismatch(format!(
                        "the point ends at {} ({}) but volume {name} is to be rolled back to \
                         {}: give the point taken at {:?} (its last delta ends there)",
                        describe(&last.to),
                        last_path.display(),
                        describe(&wanted),
                        request.checkpoint
                    )));
                }
                Checked::Reader(identity) => {
                    let created = ex
                        .chain
                        .list(ex.active.as_deref())
                        .into_iter()
                        .find(|c| c.name == request.checkpoint)
                        .map_or(0, |c| c.created_unix);
                    check_reader_point(&name, identity, &wanted, created)?;
                }
                Checked::Files { .. } => {}
            }
            if ex.snapshots > 0 {
                return Err(RollbackError::Busy(format!(
                    "volume {name} has {} live snapshot(s): end its backup first",
                    ex.snapshots
                )));
            }
            let changed: Vec<Range<u64>> = match &existing {
                // A rerun writes what the interrupted run set out to write: nothing
                // could change the volume since, and its bitmaps may be gone or untrusted.
                Some(Ok(m)) => m.changed.iter().map(|[o, l]| *o..o + l).collect(),
                _ => match ex
                    .chain
                    .bitmap_since(&request.checkpoint, ex.active.as_deref())
                {
                    Ok(bitmap) => bitmap.changed_extents(),
                    Err(CheckpointError::Inconsistent { reason, .. }) => {
                        return Err(RollbackError::Inconsistent {
                            volume: name.clone(),
                            checkpoint: request.checkpoint.clone(),
                            reason,
                        })
                    }
                    Err(e) => return Err(VolumeError::from(e).into()),
                },
            };
            // 1. The marker, durably, before the first block.
            let marker_path = dir.join(MARKER_FILE);
            let marker_err = |action, source| RollbackError::Marker {
                volume: name.clone(),
                action,
                path: marker_path.clone(),
                source,
            };
            let record = RollbackMarker {
                format_version: MARKER_VERSION,
                request: request.clone(),
                generation,
                started_unix: unix_now(),
                changed: changed.iter().map(|r| [r.start, r.end - r.start]).collect(),
            };
            let bytes = serde_json::to_vec_pretty(&record)
                .map_err(|e| marker_err("encoding", io::Error::other(e)))?;
            tidemark_formats::atomic_replace(&marker_path, &bytes)
                .map_err(|e| marker_err("writing", e))?;
            // 2, 3. The blocks, then their sync.
            let (written, zeroed) =
                write_back(ex.backing, &files, &changed, delay).map_err(|f| RollbackError::Io {
                    volume: name.clone(),
                    what: f.what,
                    offset: f.offset,
                    rerun: rerun.clone(),
                    source: f.source,
                })?;
            ex.backing.sync_data().map_err(|source| RollbackError::Io {
                volume: name.clone(),
                what: "fdatasync of the backing store".into(),
                offset: 0,
                rerun: rerun.clone(),
                source,
            })?;
            // 4. The chain switch.
            let dropped = ex
                .chain
                .rollback_to(&request.checkpoint, &mut *ex.active)
                .map_err(VolumeError::from)?;
            // 5. The marker goes last.
            std::fs::remove_file(&marker_path).map_err(|e| marker_err("removing", e))?;
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| marker_err("syncing the directory of", e))?;
            Ok(RollbackReport {
                volume: name.clone(),
                checkpoint: request.checkpoint.clone(),
                generation,
                dropped_checkpoints: dropped,
                resumed: existing.is_some(),
                bytes_rolled_back: changed.iter().map(|r| r.end - r.start).sum(),
                bytes_written: written,
                bytes_zeroed: zeroed,
                size: self.size(),
                seconds: started.elapsed().as_secs_f64(),
            })
        })?
    }
}

/// Where and what failed in [`write_back`].
#[derive(Debug)]
struct WriteFailure {
    offset: u64,
    what: String,
    source: io::Error,
}

/// One unit of work of [`write_back`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Task {
    /// Copy this range (at most [`PIECE`]) from the base image.
    Base(Range<u64>),
    /// Zero this range.
    Zero(Range<u64>),
    /// Decode one data record once and write these ranges of it.
    Record {
        layer: usize,
        entry: usize,
        ranges: Vec<Range<u64>>,
    },
}

/// The tasks that write `changed` back from the point: adjacent base and zero pieces
/// merged (base pieces up to [`PIECE`]), every record's pieces gathered into one task so
/// it is read and checked once, in the order their first byte comes in the volume.
fn plan(changed: &[Range<u64>], layers: &[Vec<IndexEntry>], image_base: bool) -> Vec<Task> {
    let base = if image_base {
        Origin::Base
    } else {
        Origin::Zero
    };
    let mut pieces = Vec::new();
    for range in changed {
        resolve(range.clone(), layers, base, &mut pieces);
    }
    let mut tasks: Vec<Task> = Vec::new();
    let mut records: HashMap<(usize, usize), usize> = HashMap::new();
    for (range, origin) in pieces {
        match origin {
            Origin::Zero => push_run(&mut tasks, range, Task::Zero),
            Origin::Base => push_run(&mut tasks, range, Task::Base),
            Origin::Record { layer, entry } => match records.get(&(layer, entry)) {
                Some(&i) => {
                    if let Task::Record { ranges, .. } = &mut tasks[i] {
                        match ranges.last_mut() {
                            Some(last) if last.end == range.start => last.end = range.end,
                            _ => ranges.push(range),
                        }
                    }
                }
                None => {
                    records.insert((layer, entry), tasks.len());
                    tasks.push(Task::Record {
                        layer,
                        entry,
                        ranges: vec![range],
                    });
                }
            },
        }
    }
    tasks
}

/// Append `range` to `tasks` as tasks made by `make`, each at most [`PIECE`] long, the
/// first merged into the last task when that is of the same kind and ends where it starts.
fn push_run(tasks: &mut Vec<Task>, range: Range<u64>, make: fn(Range<u64>) -> Task) {
    let mut at = range.start;
    if let Some(last) = tasks.last_mut() {
        if let (Task::Base(open), Task::Base(_)) | (Task::Zero(open), Task::Zero(_)) =
            (last, make(0..0))
        {
            if open.end == at && open.end - open.start < PIECE {
                open.end = range.end.min(open.start + PIECE);
                at = open.end;
            }
        }
    }
    while at < range.end {
        let end = range.end.min(at + PIECE);
        tasks.push(make(at..end));
        at = end;
    }
}

/// What the point's bytes under its deltas read from.
enum Base<'a> {
    /// A base image: an O_DIRECT descriptor when the file system allows one, and a
    /// buffered one (for unaligned pieces).
    Image {
        direct: Option<File>,
        buffered: File,
    },
    /// A point the caller opened (no deltas over it).
    Reader(&'a dyn PointRead),
    /// Zeros (a full-delta base: what it does not cover is zero).
    Zero,
}

/// The point as the write-back reads it.
struct PointFiles<'a> {
    base: Base<'a>,
    /// The deltas, oldest first: path and index.
    layers: Vec<(PathBuf, Vec<IndexEntry>)>,
    describe: String,
}

/// What the workers share.
struct Shared<'a, 'b> {
    files: &'a PointFiles<'b>,
    backing: &'a BackingFile,
    tasks: &'a [Task],
    next: AtomicUsize,
    stop: AtomicBool,
    written: AtomicU64,
    zeroed: AtomicU64,
    /// Serialises the test delay, so a test sees the same pace at any parallelism.
    delay: Option<Mutex<Duration>>,
    /// The failpoint `rollback.write_back`, armed on the caller's thread (failpoints are
    /// per thread): the first task to end takes it and fails.
    injected: Mutex<Option<io::Error>>,
}

/// One worker's buffers and open delta readers.
struct Worker<'a, 'b, 'c> {
    shared: &'c Shared<'a, 'b>,
    readers: Vec<Option<DeltaReader<File>>>,
    buf: AlignedBuf,
    record: Vec<u8>,
}

impl Worker<'_, '_, '_> {
    fn run(&mut self, task: &Task) -> Result<(), WriteFailure> {
        let shared = self.shared;
        let reading = |offset, source| WriteFailure {
            offset,
            what: format!("reading the point ({})", shared.files.describe),
            source,
        };
        match task {
            Task::Zero(range) => {
                shared
                    .backing
                    .zero(range.start, range.end - range.start, true)
                    .map_err(|source| WriteFailure {
                        offset: range.start,
                        what: "zeroing the volume".into(),
                        source,
                    })?;
                shared
                    .zeroed
                    .fetch_add(range.end - range.start, Ordering::Relaxed);
            }
            Task::Base(range) => {
                let len = (range.end - range.start) as usize;
                let buf = self.buf.get(len);
                let aligned = range.start % ALIGN as u64 == 0 && len % ALIGN == 0;
                let read = match &shared.files.base {
                    Base::Image {
                        direct: Some(direct),
                        ..
                    } if aligned => direct.read_exact_at(buf, range.start),
                    Base::Image { buffered, .. } => buffered.read_exact_at(buf, range.start),
                    Base::Reader(point) => point.read(range.start, buf),
                    Base::Zero => {
                        buf.fill(0);
                        Ok(())
                    }
                };
                read.map_err(|e| reading(range.start, e))?;
                store(shared, range.start, buf)?;
            }
            Task::Record {
                layer,
                entry,
                ranges,
            } => {
                let (path, entries) = &shared.files.layers[*layer];
                let e = entries[*entry];
                let reader = match &mut self.readers[*layer] {
                    Some(reader) => reader,
                    slot => {
                        let file = File::open(path).map_err(|err| reading(e.offset, err))?;
                        let opened = DeltaReader::open(file, path)
                            .map_err(|err| reading(e.offset, io::Error::other(err)))?;
                        slot.insert(opened)
                    }
                };
                reader
                    .read_extent(&e, &mut self.record)
                    .map_err(|err| reading(e.offset, io::Error::other(err)))?;
                for range in ranges {
                    let from = (range.start - e.offset) as usize;
                    let to = (range.end - e.offset) as usize;
                    let Some(data) = self.record.get(from..to) else {
                        return Err(reading(
                            range.start,
                            io::Error::other(format!(
                                "{}: the record at volume offset {} holds {} bytes, fewer than \
                                 its index says",
                                path.display(),
                                e.offset,
                                self.record.len()
                            )),
                        ));
                    };
                    store(shared, range.start, data)?;
                }
            }
        }
        let injected = shared
            .injected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(source) = injected {
            return Err(WriteFailure {
                offset: task_start(task),
                what: "the test".into(),
                source,
            });
        }
        if let Some(delay) = &shared.delay {
            let pace = delay.lock().unwrap_or_else(|e| e.into_inner());
            std::thread::sleep(*pace);
        }
        Ok(())
    }
}

fn task_start(task: &Task) -> u64 {
    match task {
        Task::Base(r) | Task::Zero(r) => r.start,
        Task::Record { ranges, .. } => ranges.first().map_or(0, |r| r.start),
    }
}

/// Write `data` to the volume at `at`; all zeros become zeros (a hole in a file).
fn store(shared: &Shared<'_, '_>, at: u64, data: &[u8]) -> Result<(), WriteFailure> {
    let len = data.len() as u64;
    let result = if data.iter().all(|&b| b == 0) {
        shared.zeroed.fetch_add(len, Ordering::Relaxed);
        shared.backing.zero(at, len, true)
    } else {
        shared.written.fetch_add(len, Ordering::Relaxed);
        shared.backing.write_at(at, data)
    };
    result.map_err(|source| WriteFailure {
        offset: at,
        what: "writing the volume".into(),
        source,
    })
}

/// Step 2: copy `changed` from the point to the backing store with [`WORKERS`] threads,
/// each taking the next task of [`plan`]: many reads of the point in flight, each record
/// decoded once, the volume written through its O_DIRECT descriptor. The first failure
/// stops the others. Returns the bytes written and zeroed.
fn write_back(
    backing: &BackingFile,
    files: &PointFiles<'_>,
    changed: &[Range<u64>],
    delay: Option<Duration>,
) -> Result<(u64, u64), WriteFailure> {
    let entries: Vec<Vec<IndexEntry>> = files.layers.iter().map(|(_, e)| e.clone()).collect();
    let tasks = plan(changed, &entries, !matches!(files.base, Base::Zero));
    let shared = Shared {
        files,
        backing,
        tasks: &tasks,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        written: AtomicU64::new(0),
        zeroed: AtomicU64::new(0),
        delay: delay.map(Mutex::new),
        injected: Mutex::new(crate::failpoint::check("rollback.write_back").err()),
    };
    let failure: Mutex<Option<WriteFailure>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS.min(tasks.len()) {
            scope.spawn(|| {
                let mut worker = Worker {
                    shared: &shared,
                    readers: files.layers.iter().map(|_| None).collect(),
                    buf: AlignedBuf::default(),
                    record: Vec::new(),
                };
                while !shared.stop.load(Ordering::Relaxed) {
                    let Some(task) = shared
                        .tasks
                        .get(shared.next.fetch_add(1, Ordering::Relaxed))
                    else {
                        break;
                    };
                    if let Err(failed) = worker.run(task) {
                        shared.stop.store(true, Ordering::Relaxed);
                        let mut first = failure.lock().unwrap_or_else(|e| e.into_inner());
                        if first.as_ref().is_none_or(|f| f.offset > failed.offset) {
                            *first = Some(failed);
                        }
                        break;
                    }
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(failed) => Err(failed),
        None => Ok((shared.written.into_inner(), shared.zeroed.into_inner())),
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufWriter;

    use tidemark_formats::delta::DeltaWriter;

    use super::*;
    use crate::point_map::tests::entry;
    use crate::volume::VolumeOptions;

    const SIZE: u64 = 1 << 20;

    struct Setup {
        _dir: tempfile::TempDir,
        state: PathBuf,
        point: PathBuf,
        at_c: Vec<u8>,
        volume: Volume,
    }

    /// A volume with data, checkpoint "c" and a full delta of it at "c" (the point);
    /// then checkpoint "d" and changes since "c" on both sides of it.
    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let backing = dir.path().join("v.raw");
        File::create(&backing).unwrap();
        let options = VolumeOptions {
            size: Some(SIZE),
            granularity: 4096,
            ..VolumeOptions::default()
        };
        let volume = Volume::create(&state, "v", &backing, options).unwrap();
        volume.write(0, &[1u8; 300_000], false).unwrap();
        volume.write(600_000, &[2u8; 5000], false).unwrap();
        let c = volume.checkpoint_create("c").unwrap();
        let mut at_c = vec![0u8; SIZE as usize];
        volume.read(0, &mut at_c).unwrap();
        let point = dir.path().join("c.delta");
        let header = DeltaHeader {
            volume_uuid: volume.uuid(),
            volume_size: SIZE,
            granularity: 4096,
            from: None,
            to: CheckpointRef {
                name: "c".into(),
                generation: c.generation,
            },
            created_unix: 1,
        };
        let mut writer =
            DeltaWriter::new(BufWriter::new(File::create(&point).unwrap()), &header, 1).unwrap();
        writer.write_data(0, &at_c).unwrap();
        writer.finish().unwrap();
        volume.write(8192, &[3u8; 4096], false).unwrap();
        volume.checkpoint_create("d").unwrap();
        volume.write_zeroes(100_000, 50_000, true, false).unwrap();
        volume.write(900_000, &[4u8; 10], false).unwrap();
        Setup {
            _dir: dir,
            state,
            point,
            at_c,
            volume,
        }
    }

    fn request(s: &Setup, checkpoint: &str) -> RollbackRequest {
        RollbackRequest {
            checkpoint: checkpoint.into(),
            base: s.point.clone(),
            deltas: Vec::new(),
            repository: None,
        }
    }

    fn contents(volume: &Volume) -> Vec<u8> {
        let mut data = vec![0u8; SIZE as usize];
        volume.read(0, &mut data).unwrap();
        data
    }

    #[test]
    fn a_rollback_writes_only_the_changes_and_equals_the_point() {
        let s = setup();
        let report = s.volume.rollback(&request(&s, "c")).unwrap();
        assert!(contents(&s.volume) == s.at_c, "the volume equals the point");
        assert_eq!(report.dropped_checkpoints, ["d"]);
        assert!(!report.resumed);
        // Blocks 2, 24..=36 and 219: the three changes at 4 KiB granularity.
        assert_eq!(report.bytes_rolled_back, (1 + 13 + 1) * 4096);
        assert_eq!(s.volume.checkpoint_names(), ["c"]);
        assert!(s.volume.changed_extents("c").unwrap().is_empty());
        // The next incremental from "c" holds what is written from now on.
        s.volume.write(500_000, &[5u8; 1], false).unwrap();
        assert_eq!(
            s.volume.changed_extents("c").unwrap(),
            vec![499_712..503_808]
        );
        assert!(!s.volume.state_path().join(MARKER_FILE).exists());
    }

    #[test]
    fn a_point_of_another_checkpoint_is_refused_naming_both() {
        let s = setup();
        let before = contents(&s.volume);
        let err = s.volume.rollback(&request(&s, "d")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, RollbackError::Mismatch(_)), "{text}");
        assert!(
            text.contains("checkpoint \"c\"") && text.contains("checkpoint \"d\""),
            "{text}"
        );
        assert!(contents(&s.volume) == before, "nothing was written");
        assert!(!s.volume.state_path().join(MARKER_FILE).exists());
        assert!(matches!(
            s.volume.rollback(&RollbackRequest {
                deltas: vec![s.point.clone()],
                repository: None,
                ..request(&s, "c")
            }),
            Err(RollbackError::Point { .. })
        ));
    }

    #[test]
    fn a_bare_image_is_refused() {
        let s = setup();
        let image = s.state.join("image.raw");
        std::fs::write(&image, &s.at_c).unwrap();
        let err = s
            .volume
            .rollback(&RollbackRequest {
                checkpoint: "c".into(),
                base: image,
                deltas: Vec::new(),
                repository: None,
            })
            .unwrap_err();
        assert!(err.to_string().contains("plain image"), "{err}");
    }

    #[test]
    fn an_interrupted_rollback_refuses_opens_until_a_rerun_finishes_it() {
        let s = setup();
        let result = {
            let _armed = crate::failpoint::arm("rollback.write_back");
            s.volume.rollback(&request(&s, "c"))
        };
        let err = result.unwrap_err();
        assert!(
            err.to_string()
                .contains("rerun `tidemark volume rollback v"),
            "{err}"
        );
        let Setup {
            _dir,
            state,
            point,
            at_c,
            volume,
        } = s;
        // kill -9 now: nothing more is written, the marker stays.
        drop(volume);
        match Volume::open(&state, "v") {
            Err(VolumeError::RollbackIncomplete { rerun, .. }) => assert_eq!(
                rerun,
                format!(
                    "tidemark volume rollback v --checkpoint c --from {}",
                    point.display()
                )
            ),
            other => panic!("expected RollbackIncomplete, got {other:?}"),
        }
        let volume = Volume::open_for_rollback(&state, "v").unwrap();
        let other = RollbackRequest {
            checkpoint: "d".into(),
            base: point.clone(),
            deltas: Vec::new(),
            repository: None,
        };
        assert!(matches!(
            volume.rollback(&other),
            Err(RollbackError::OtherIncomplete { .. })
        ));
        let report = volume
            .rollback(&RollbackRequest {
                checkpoint: "c".into(),
                base: point,
                deltas: Vec::new(),
                repository: None,
            })
            .unwrap();
        assert!(report.resumed);
        assert!(contents(&volume) == at_c);
        drop(volume);
        let volume = Volume::open(&state, "v").unwrap();
        assert!(contents(&volume) == at_c);
        assert_eq!(volume.checkpoint_names(), ["c"]);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a task's ranges really are a list
    fn the_plan_reads_each_record_once_newest_layer_first() {
        const K: u64 = 1024;
        let layers = vec![
            vec![
                entry(0, 64 * K, true),
                entry(64 * K, 64 * K, false),
                entry(128 * K, 896 * K, true),
            ],
            vec![entry(8 * K, 4 * K, true), entry(200 * K, 4 * K, false)],
        ];
        let changed = [
            0..16 * K,
            60 * K..70 * K,
            130 * K..140 * K,
            196 * K..208 * K,
        ];
        let record = |layer, entry, ranges: &[Range<u64>]| Task::Record {
            layer,
            entry,
            ranges: ranges.to_vec(),
        };
        assert_eq!(
            plan(&changed, &layers, false),
            [
                record(0, 0, &[0..8 * K, 12 * K..16 * K, 60 * K..64 * K]),
                record(1, 0, &[8 * K..12 * K]),
                Task::Zero(64 * K..70 * K),
                record(
                    0,
                    2,
                    &[130 * K..140 * K, 196 * K..200 * K, 204 * K..208 * K]
                ),
                Task::Zero(200 * K..204 * K),
            ]
        );
        // Over an image, what no delta covers reads from the image, a piece at a time.
        let image = plan(
            &[0..3 * PIECE + 5],
            &[vec![entry(PIECE, 4 * K, true)]],
            true,
        );
        assert_eq!(
            image,
            [
                Task::Base(0..PIECE),
                record(0, 0, &[PIECE..PIECE + 4 * K]),
                Task::Base(PIECE + 4 * K..2 * PIECE + 4 * K),
                Task::Base(2 * PIECE + 4 * K..3 * PIECE + 5),
            ]
        );
    }

    #[test]
    fn a_rollback_from_an_image_and_a_delta_equals_the_point() {
        let s = setup();
        // The point as an image of the volume at "c" plus the delta of "c" -> "e" over it.
        let image = s.state.join("c.raw");
        std::fs::write(&image, &s.at_c).unwrap();
        let e = s.volume.checkpoint_create("e").unwrap();
        let at_e = contents(&s.volume);
        let delta = s.state.join("c-e.delta");
        let c = s
            .volume
            .checkpoints()
            .into_iter()
            .find(|i| i.name == "c")
            .unwrap();
        let header = DeltaHeader {
            volume_uuid: s.volume.uuid(),
            volume_size: SIZE,
            granularity: 4096,
            from: Some(CheckpointRef {
                name: "c".into(),
                generation: c.generation,
            }),
            to: CheckpointRef {
                name: "e".into(),
                generation: e.generation,
            },
            created_unix: 1,
        };
        let mut writer =
            DeltaWriter::new(BufWriter::new(File::create(&delta).unwrap()), &header, 1).unwrap();
        // The changes c -> e (blocks 2, 24..=36 and 219) as data records and a zero run.
        for (from, to) in [(8192, 12_288), (98_304, 102_400)] {
            writer.write_data(from, &at_e[from as usize..to]).unwrap();
        }
        writer.write_zero(102_400, 45_056).unwrap();
        for (from, to) in [(147_456, 151_552), (897_024, 901_120)] {
            writer.write_data(from, &at_e[from as usize..to]).unwrap();
        }
        writer.finish().unwrap();
        // Changes after "e", then the rollback to "e".
        s.volume.write(0, &[6u8; 12_000], false).unwrap();
        s.volume.write(120_000, &[7u8; 10_000], false).unwrap();
        s.volume.write(890_000, &[8u8; 15_000], false).unwrap();
        let report = s
            .volume
            .rollback(&RollbackRequest {
                checkpoint: "e".into(),
                base: image,
                deltas: vec![delta],
                repository: None,
            })
            .unwrap();
        assert!(contents(&s.volume) == at_e, "the volume equals the point");
        assert_eq!(s.volume.checkpoint_names(), ["c", "d", "e"]);
        assert!(report.bytes_written > 0);
    }
}
