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
//!   refused. (A repository point is not taken yet.)
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
//! 2. The changed blocks are read from the point and written to the backing store.
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

use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidemark_formats::delta::{CheckpointRef, DeltaHeader};

use crate::checkpoint::CheckpointError;
use crate::copy::delta::{check_chain, open_delta, ChainBase, ChainSource};
use crate::copy::{CopyError, Source};
use crate::status::unix_now;
use crate::volume::{Exclusive, Volume, VolumeError};

/// The marker of a rollback in progress, in the volume's directory.
pub const MARKER_FILE: &str = "rollback.json";

/// The marker's format version.
const MARKER_VERSION: u32 = 1;

/// Largest marker file read (a changed range takes about 30 bytes).
const MAX_MARKER_LEN: u64 = 256 << 20;

/// Bytes read from the point and written to the volume per step.
const PIECE: u64 = 1 << 20;

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
}

impl RollbackRequest {
    /// The command line that runs this rollback on volume `volume`.
    pub fn command(&self, volume: &str) -> String {
        let mut command = format!(
            "tidemark volume rollback {volume} --checkpoint {} --from {}",
            self.checkpoint,
            self.base.display()
        );
        for delta in &self.deltas {
            command.push(' ');
            command.push_str(&delta.display().to_string());
        }
        command
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

/// The point's last link and where it is, checked to follow on.
fn check_point(request: &RollbackRequest) -> Result<(PathBuf, DeltaHeader), RollbackError> {
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
    for path in paths {
        let header = open_delta(&path)
            .map_err(|e| failed(crate::error::chain(&e)))?
            .header()
            .clone();
        links.push((path, header));
    }
    check_chain(&links, matches!(base, ChainBase::Image(_)))
        .map_err(|e| failed(crate::error::chain(&e)))?;
    links.pop().ok_or_else(|| {
        failed(format!(
            "{} is a plain image, which does not record the volume or checkpoint it was taken \
             at; give the point as a full delta (`backup begin --push FILE --push-format \
             delta`) or as an image followed by the deltas up to the checkpoint",
            request.base.display()
        ))
    })
}

/// The point as given: `BASE DELTA...`.
fn point_text(request: &RollbackRequest) -> String {
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
        let (last_path, last) = check_point(request)?;
        if last.volume_uuid != self.uuid() {
            return Err(RollbackError::Mismatch(format!(
                "the point is of volume uuid {} ({}) but volume {name} has uuid {}: give a \
                 point of this volume",
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
        let mut source = ChainSource::open(&ChainBase::detect(&request.base), &request.deltas)
            .map_err(|e: CopyError| RollbackError::Point {
                point: point_text(request),
                reason: crate::error::chain(&e),
            })?;
        let rerun = request.command(&name);
        let delay = std::env::var(DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        self.exclusive(|mut ex| {
            let generation = ex
                .chain
                .generation_of(&request.checkpoint)
                .map_err(VolumeError::from)?;
            let wanted = CheckpointRef {
                name: request.checkpoint.clone(),
                generation,
            };
            if last.to != wanted {
                return Err(RollbackError::Mismatch(format!(
                    "the point ends at {} ({}) but volume {name} is to be rolled back to {}: \
                     give the point taken at {:?} (its last delta ends there)",
                    describe(&last.to),
                    last_path.display(),
                    describe(&wanted),
                    request.checkpoint
                )));
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
                write_back(&mut ex, &mut source, &changed, delay).map_err(|f| {
                    RollbackError::Io {
                        volume: name.clone(),
                        what: f.what,
                        offset: f.offset,
                        rerun: rerun.clone(),
                        source: f.source,
                    }
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
struct WriteFailure {
    offset: u64,
    what: String,
    source: io::Error,
}

/// Step 2: copy `changed` from the point to the backing store, a piece at a time; all-zero
/// pieces become zeros (a hole in a file). Returns the bytes written and zeroed.
fn write_back(
    ex: &mut Exclusive<'_>,
    source: &mut ChainSource,
    changed: &[Range<u64>],
    delay: Option<Duration>,
) -> Result<(u64, u64), WriteFailure> {
    let fail = |offset, what: &'static str| {
        move |source| WriteFailure {
            offset,
            what: what.to_string(),
            source,
        }
    };
    let described = source.describe();
    let mut buf = vec![0u8; PIECE as usize];
    let (mut written, mut zeroed) = (0, 0);
    for range in changed {
        let mut at = range.start;
        while at < range.end {
            let len = (range.end - at).min(PIECE);
            let piece = &mut buf[..len as usize];
            source.read_at(at, piece).map_err(|source| WriteFailure {
                offset: at,
                what: format!("reading the point ({described})"),
                source,
            })?;
            if piece.iter().all(|&b| b == 0) {
                ex.backing
                    .zero(at, len, true)
                    .map_err(fail(at, "zeroing the volume"))?;
                zeroed += len;
            } else {
                ex.backing
                    .write_at(at, piece)
                    .map_err(fail(at, "writing the volume"))?;
                written += len;
            }
            at += len;
            crate::failpoint::check("rollback.write_back").map_err(fail(at, "the test"))?;
            if let Some(delay) = delay {
                std::thread::sleep(delay);
            }
        }
    }
    Ok((written, zeroed))
}

#[cfg(test)]
mod tests {
    use std::io::BufWriter;

    use tidemark_formats::delta::DeltaWriter;

    use super::*;
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
            })
            .unwrap();
        assert!(report.resumed);
        assert!(contents(&volume) == at_c);
        drop(volume);
        let volume = Volume::open(&state, "v").unwrap();
        assert!(contents(&volume) == at_c);
        assert_eq!(volume.checkpoint_names(), ["c"]);
    }
}
