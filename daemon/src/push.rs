//! Push mode: the daemon copies a backup's snapshots to their targets with the copy
//! engine, then the backup ends by itself.
//!
//! - image, full backup: [`copy::copy_image`] writes the whole snapshot (holes stay holes)
//!   into a new or truncated raw image;
//! - image, incremental: [`copy::update_image`] writes only the extents of the frozen dirty
//!   bitmap into the existing image (dattobd's update-img);
//! - delta: a delta file of the changed extents (all allocated extents for a full backup);
//! - repository (`repo:URL`): a point of a tidemark repository ([`push_repo`]).
//!
//! The snapshot is read through [`SnapshotSource`], a copy-engine [`Source`]. The copy
//! engine collects failed extents instead of stopping; any failed extent (the snapshot
//! failed, the backup was cancelled, the target broke) fails the push.

use std::fs::File;
use std::io::{self, BufWriter};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tidemark_engine::copy::target::{self as copy_target, TargetError};
use tidemark_engine::copy::{self, CopyError, JobOptions, JobReport, Source};
use tidemark_engine::snapshot::Snapshot;
use tidemark_formats::delta::{CheckpointRef, DeltaHeader, DeltaWriter};
use tidemark_nbd::export::{Export, MetaContext, STATE_DIRTY, STATE_HOLE};
use tidemark_repo::builder::{PointBuilder, PointNames};
use tidemark_repo::{PointIndex, Repository, StoreOptions};

use crate::backup::Progress;

/// A snapshot as a copy-engine source.
pub struct SnapshotSource {
    snapshot: Snapshot,
    progress: Arc<Progress>,
}

impl SnapshotSource {
    pub fn new(snapshot: Snapshot, progress: Arc<Progress>) -> SnapshotSource {
        SnapshotSource { snapshot, progress }
    }
}

impl Source for SnapshotSource {
    fn describe(&self) -> String {
        format!(
            "snapshot {} of volume {}",
            self.snapshot.name(),
            self.snapshot.volume()
        )
    }

    fn size(&self) -> u64 {
        self.snapshot.size()
    }

    fn data_extents(&mut self, range: Range<u64>) -> Result<Vec<Range<u64>>, CopyError> {
        let runs = self
            .snapshot
            .allocation(range.start, range.end - range.start)
            .map_err(|err| CopyError::Input(crate::error_chain(&err)))?;
        let mut extents = Vec::new();
        let mut at = range.start;
        for (length, hole) in runs {
            let end = (at + length).min(range.end);
            if !hole && end > at {
                extents.push(at..end);
            }
            at = end;
            if at >= range.end {
                break;
            }
        }
        if at < range.end {
            // The snapshot did not describe the tail: treat it as data.
            extents.push(at..range.end);
        }
        Ok(extents)
    }

    fn engine_file(&self) -> Option<(Arc<File>, bool)> {
        None
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.progress.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the backup was cancelled",
            ));
        }
        self.snapshot.read(offset, buf).map_err(io::Error::other)
    }
}

/// The extents of the snapshot's frozen dirty bitmap, or `None` for a full backup.
pub fn changed_extents(snapshot: &Snapshot) -> Option<Vec<Range<u64>>> {
    let bitmap = snapshot.dirty_bitmap()?;
    let size = snapshot.size();
    let mut extents: Vec<Range<u64>> = Vec::new();
    let mut at = 0;
    while at < size {
        let runs = bitmap.runs(at, size - at);
        if runs.is_empty() {
            break;
        }
        for (length, dirty) in runs {
            let end = (at + length).min(size);
            if dirty {
                match extents.last_mut() {
                    Some(last) if last.end == at => last.end = end,
                    _ => extents.push(at..end),
                }
            }
            at = end;
        }
    }
    Some(extents)
}

fn job_options(progress: &Arc<Progress>) -> JobOptions {
    let counter = Arc::clone(progress);
    JobOptions {
        direct: true,
        progress: Some(Arc::new(move |bytes| {
            counter.done.fetch_add(bytes, Ordering::Relaxed);
        })),
        ..JobOptions::default()
    }
}

fn check_report(report: &JobReport) -> Result<(), String> {
    match report.failed_extents.first() {
        None => Ok(()),
        Some(first) => Err(format!(
            "{} extent(s) could not be copied, the first at offset {} ({} bytes) while {}: {}",
            report.failed_extents.len(),
            first.offset,
            first.length,
            first.during,
            first.error
        )),
    }
}

/// Write `snapshot` into the raw image `target`: a full copy, or the changed extents into
/// the existing image for an incremental backup.
/// `target` is the path the engine opens (see [`handle_path`]); errors name `shown`.
pub fn push_image(
    snapshot: &Snapshot,
    target: &Path,
    shown: &Path,
    progress: &Arc<Progress>,
) -> Result<JobReport, String> {
    let mut source = SnapshotSource::new(snapshot.clone(), Arc::clone(progress));
    let report = match changed_extents(snapshot) {
        None => {
            progress.total.fetch_add(snapshot.size(), Ordering::Relaxed);
            copy::copy_image(&mut source, target, &job_options(progress))
        }
        Some(changed) => {
            if !target.exists() {
                return Err(format!(
                    "{} does not exist: an incremental push updates the image of a previous \
                     full push; push a full backup there first",
                    shown.display()
                ));
            }
            let bytes: u64 = changed.iter().map(|r| r.end - r.start).sum();
            progress.total.fetch_add(bytes, Ordering::Relaxed);
            copy::update_image(&mut source, changed, target, &job_options(progress))
        }
    }
    .map_err(|err| format!("copying to {}: {err}", shown.display()))?;
    let report = JobReport {
        destination: shown.display().to_string(),
        ..report
    };
    check_report(&report)?;
    Ok(report)
}

/// What a delta file says about where it comes from.
pub struct DeltaOrigin {
    pub volume_uuid: uuid::Uuid,
    pub granularity: u32,
    pub from: Option<CheckpointRef>,
    pub to: CheckpointRef,
}

/// Write the changed extents of `snapshot` (all allocated extents for a full backup) as a
/// delta file at `target`, fsynced (the caller writes it under its [`partial_path`] and
/// renames it once the whole push succeeded).
pub fn push_delta(
    snapshot: &Snapshot,
    origin: &DeltaOrigin,
    file: File,
    target: &Path,
    progress: &Arc<Progress>,
) -> Result<u64, String> {
    let mut source = SnapshotSource::new(snapshot.clone(), Arc::clone(progress));
    let size = snapshot.size();
    let extents = match changed_extents(snapshot) {
        Some(changed) => changed,
        None => source
            .data_extents(0..size)
            .map_err(|e| crate::error_chain(&e))?,
    };
    let total: u64 = extents.iter().map(|r| r.end - r.start).sum();
    progress.total.fetch_add(total, Ordering::Relaxed);
    let partial = target;
    let header = DeltaHeader {
        volume_uuid: origin.volume_uuid,
        volume_size: size,
        granularity: origin.granularity,
        from: origin.from.clone(),
        to: origin.to.clone(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let mut writer = DeltaWriter::new(BufWriter::new(file), &header, 3)
        .map_err(|err| format!("writing {}: {err}", partial.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    for extent in &extents {
        let mut at = extent.start;
        while at < extent.end {
            let len = ((extent.end - at) as usize).min(buf.len());
            source
                .read_at(at, &mut buf[..len])
                .map_err(|err| format!("reading the snapshot at {at}: {err}"))?;
            if buf[..len].iter().all(|&b| b == 0) {
                writer.write_zero(at, len as u64)
            } else {
                writer.write_data(at, &buf[..len])
            }
            .map_err(|err| format!("writing {}: {err}", partial.display()))?;
            progress.done.fetch_add(len as u64, Ordering::Relaxed);
            at += len as u64;
        }
    }
    let out = writer
        .finish()
        .map_err(|err| format!("finishing {}: {err}", partial.display()))?;
    let file = out
        .into_inner()
        .map_err(|err| format!("flushing {}: {err}", partial.display()))?;
    file.sync_all()
        .map_err(|err| format!("syncing {}: {err}", partial.display()))?;
    Ok(total)
}

/// Where a push stages a new target until every volume of the backup is written:
/// `TARGET.partial` next to it.
pub fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    target.with_file_name(name)
}

/// Whether `path` is a block device (written in place: it cannot be staged and renamed).
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Create the staging file `partial` for `target`; never reuse a file that exists and
/// never follow a symlink (O_EXCL). Mode 0640 at most (the daemon's umask makes it 0600).
/// The handle returned is the file the push writes: it is never reopened by name.
pub fn create_partial(partial: &Path, target: &Path) -> Result<File, String> {
    match copy_target::create_new(partial) {
        Ok(file) => Ok(file),
        Err(TargetError::Exists { .. }) => Err(format!(
            "{} exists: an earlier push to {} did not finish, or the file is not tidemark's; \
             remove it or choose another target",
            partial.display(),
            target.display()
        )),
        Err(err) => Err(crate::error_chain(&err)),
    }
}

/// Open a target written in place (a block device, or the image an incremental push
/// updates) without following a symlink to a regular file: a planted link must not
/// make the daemon write someone else's file. A symlink is followed only to a block
/// device (`/dev/vg/lv`), checked on the opened handle.
pub fn open_target(target: &Path) -> Result<File, String> {
    match copy_target::open_in_place(target) {
        Ok(file) => Ok(file),
        Err(TargetError::NotFound { .. }) => Err(format!(
            "{} does not exist: an incremental push updates the image of a previous \
             full push; push a full backup there first",
            target.display()
        )),
        Err(err @ TargetError::LinkToFile { .. }) => Err(format!("push target {err}")),
        Err(err) => Err(crate::error_chain(&err)),
    }
}

/// A path that reopens exactly the file behind `file` (not whatever its name points to
/// now), for the copy engine, which opens its destination by path.
pub use copy_target::handle_path;

/// Move a staged file into place and make the rename durable.
pub fn commit_partial(partial: &Path, target: &Path) -> Result<(), String> {
    std::fs::rename(partial, target).map_err(|err| {
        format!(
            "renaming {} to {}: {err}",
            partial.display(),
            target.display()
        )
    })?;
    if let Some(dir) = target.parent() {
        let dir = File::open(dir).map_err(|err| format!("opening {}: {err}", dir.display()))?;
        dir.sync_all()
            .map_err(|err| format!("syncing the directory of {}: {err}", target.display()))?;
    }
    Ok(())
}

/// The prefix of a push target that is a repository: `repo:URL`.
pub const REPO_TARGET: &str = "repo:";

/// Store each snapshot of a push backup as the point `VOLUME@CHECKPOINT` of the repository
/// its target names (`repo:DIR` or `repo:s3://BUCKET/PREFIX`; S3 endpoint and credentials
/// from the daemon's AWS_* environment): a full point of the snapshot's allocated extents,
/// or an incremental one of its frozen dirty bitmap's extents on top of the point of that
/// bitmap's checkpoint. Each point's index is written last, so the backup (and with it the
/// checkpoint) completes only once every point exists. `jobs`: (volume, snapshot, target).
pub fn push_repo(
    jobs: &[(String, Arc<crate::volumes::SnapshotHandle>, PathBuf)],
    checkpoint: &str,
    progress: &Arc<Progress>,
) -> Result<serde_json::Value, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tidemark-repo-push")
        .enable_all()
        .build()
        .map_err(|err| format!("starting the repository uploader: {err}"))?;
    let mut reports = Vec::new();
    for (volume, handle, target) in jobs {
        let target = target.to_string_lossy();
        let url = target.strip_prefix(REPO_TARGET).unwrap_or(&target);
        let export = handle.export();
        let point = store_point(&runtime, &*export, volume, url, checkpoint, progress)
            .map_err(|err| format!("storing {volume}@{checkpoint} in {url}: {err}"))?;
        reports.push(serde_json::json!({
            "volume": volume,
            "target": target,
            "point": point.name(),
            "parent": (!point.parent.is_empty()).then_some(&point.parent),
            "new_bytes": point.new_bytes,
        }));
    }
    Ok(serde_json::Value::Array(reports))
}

/// The ranges of `export` a point must read: the dirty bitmap's (incremental) or the
/// allocated ones (full), with the bitmap's name.
fn point_ranges(export: &dyn Export) -> Result<(Option<String>, Vec<Range<u64>>), String> {
    let bitmap = export.dirty_bitmaps().into_iter().next();
    let context = match &bitmap {
        Some(name) => MetaContext::DirtyBitmap(name.clone()),
        None => MetaContext::BaseAllocation,
    };
    let wanted = |flags: u32| match &bitmap {
        Some(_) => flags & STATE_DIRTY != 0,
        None => flags & STATE_HOLE == 0,
    };
    let size = export.size();
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut at = 0;
    while at < size {
        let extents = export
            .block_status(&context, at, size - at)
            .map_err(|err| format!("mapping the snapshot at {at}: {err}"))?;
        if extents.is_empty() {
            return Err(format!("the snapshot describes nothing at {at}"));
        }
        for extent in extents {
            let end = at.saturating_add(extent.length).min(size);
            if wanted(extent.flags) && end > at {
                match ranges.last_mut() {
                    Some(last) if last.end == at => last.end = end,
                    _ => ranges.push(at..end),
                }
            }
            at = end;
            if at >= size {
                break;
            }
        }
    }
    Ok((bitmap, ranges))
}

fn store_point(
    runtime: &tokio::runtime::Runtime,
    export: &dyn Export,
    volume: &str,
    url: &str,
    checkpoint: &str,
    progress: &Arc<Progress>,
) -> Result<PointIndex, String> {
    let (uuid, granularity) = crate::export::parse_origin(&export.description())
        .ok_or_else(|| "the snapshot's export names no volume uuid".to_string())?;
    let (parent, ranges) = point_ranges(export)?;
    let names = PointNames {
        volume: volume.to_string(),
        uuid: *uuid.as_bytes(),
        checkpoint: checkpoint.to_string(),
        parent,
        granularity,
    };
    let size = export.size();
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    progress.total.fetch_add(total, Ordering::Relaxed);
    let mut builder = runtime
        .block_on(async {
            let repo = Repository::open(url, &StoreOptions::default()).await?;
            PointBuilder::open(&repo, &names, size, false, 2).await
        })
        .map_err(|err| err.to_string())?;
    let mut buf = vec![0u8; 4 << 20];
    for range in &ranges {
        let mut at = range.start;
        while at < range.end {
            if progress.cancel.load(Ordering::Relaxed) {
                return Err("the backup was cancelled".into());
            }
            let len = ((range.end - at) as usize).min(buf.len());
            export
                .read(at, &mut buf[..len])
                .map_err(|err| format!("reading the snapshot at {at}: {err}"))?;
            if buf[..len].iter().all(|&b| b == 0) {
                builder.zero(at, len as u64)
            } else {
                builder.write(at, &buf[..len])
            }
            .map_err(|err| err.to_string())?;
            progress.done.fetch_add(len as u64, Ordering::Relaxed);
            at += len as u64;
        }
    }
    builder.finish().map_err(|err| err.to_string())
}
