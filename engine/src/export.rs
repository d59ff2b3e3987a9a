//! NBD exports of a live volume (read-write) and of a snapshot (read-only), as
//! implementations of `tidemark_nbd`'s export trait.
//!
//! - [`VolumeExport`]: FLUSH and FUA fdatasync the one backing descriptor every connection
//!   shares, so a flush on one connection covers writes completed on all: multi-conn is
//!   safe. Dirty bitmaps offered: one per checkpoint (`qemu:dirty-bitmap:<checkpoint>`,
//!   live: the changes since it, as of the query).
//! - [`SnapshotExport`]: read-only; TRIM releases the COW space of chunks the backup
//!   client is done with; `base:allocation` reports holes of the volume that no write has
//!   filled since the snapshot; the dirty bitmap frozen with the snapshot is offered as
//!   `qemu:dirty-bitmap:<name>`.

use std::sync::Arc;

use tidemark_nbd::export::{
    Capabilities, Errno, Export, ExportError, ExportResult, Extent, MetaContext, ZeroFlags,
    STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};

use crate::checkpoint::CheckpointError;
use crate::snapshot::{Snapshot, SnapshotError};
use crate::tracking::DirtyBitmap;
use crate::volume::{Volume, VolumeError};

impl From<VolumeError> for ExportError {
    fn from(err: VolumeError) -> Self {
        let errno = match &err {
            VolumeError::OutOfRange { .. } => Errno::Inval,
            VolumeError::Closed(_) => Errno::Shutdown,
            VolumeError::Checkpoint(CheckpointError::NotFound { .. }) => Errno::Inval,
            VolumeError::Snapshot(e) => return snapshot_error(e),
            e => match e.io_error().and_then(|io| io.raw_os_error()) {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => Errno::NoSpc,
                _ => Errno::Io,
            },
        };
        ExportError::new(errno, err.to_string())
    }
}

fn snapshot_error(err: &SnapshotError) -> ExportError {
    let errno = match err {
        SnapshotError::OutOfRange { .. } => Errno::Inval,
        SnapshotError::Dropped { .. } => Errno::Shutdown,
        _ => Errno::Io,
    };
    ExportError::new(errno, err.to_string())
}

impl From<SnapshotError> for ExportError {
    fn from(err: SnapshotError) -> Self {
        snapshot_error(&err)
    }
}

/// Extents of a dirty bitmap for BLOCK_STATUS.
fn bitmap_extents(bitmap: &DirtyBitmap, offset: u64, len: u64) -> Vec<Extent> {
    bitmap
        .runs(offset, len)
        .into_iter()
        .map(|(length, dirty)| Extent {
            length,
            flags: if dirty { STATE_DIRTY } else { 0 },
        })
        .collect()
}

fn allocation_extents(runs: Vec<(u64, bool)>) -> Vec<Extent> {
    runs.into_iter()
        .filter(|(l, _)| *l > 0)
        .map(|(length, hole)| Extent {
            length,
            flags: if hole { STATE_HOLE | STATE_ZERO } else { 0 },
        })
        .collect()
}

/// Guard against an empty reply (the protocol forbids zero-length extents lists).
fn non_empty(extents: Vec<Extent>, len: u64) -> Vec<Extent> {
    if extents.is_empty() {
        vec![Extent {
            length: len.max(1),
            flags: 0,
        }]
    } else {
        extents
    }
}

/// The live volume, read-write.
#[derive(Debug, Clone)]
pub struct VolumeExport {
    volume: Arc<Volume>,
}

impl VolumeExport {
    /// Export `volume`.
    pub fn new(volume: Arc<Volume>) -> VolumeExport {
        VolumeExport { volume }
    }

    /// The exported volume.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            flush: true,
            trim: true,
            write_zeroes: true,
            fast_zero: false,
            cache: false,
            multi_conn: true,
            knows_holes: !self.volume.backing_is_device(),
        }
    }

    fn description(&self) -> String {
        format!(
            "tidemark volume {} ({})",
            self.volume.name(),
            self.volume.backing().display()
        )
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        Ok(self.volume.read(offset, buf)?)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        Ok(self.volume.write(offset, data, fua)?)
    }

    fn flush(&self) -> ExportResult<()> {
        Ok(self.volume.flush()?)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        Ok(self.volume.trim(offset, len, fua)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        if flags.fast {
            return Err(ExportError::new(
                Errno::NotSup,
                "fast zeroing is not offered",
            ));
        }
        Ok(self
            .volume
            .write_zeroes(offset, len, !flags.no_hole, flags.fua)?)
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.volume
            .checkpoints()
            .into_iter()
            .map(|c| c.name)
            .collect()
    }

    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> ExportResult<Vec<Extent>> {
        match context {
            MetaContext::BaseAllocation => {
                let runs = self
                    .volume
                    .allocation(offset, len)
                    .unwrap_or_else(|| vec![(len, false)]);
                Ok(non_empty(allocation_extents(runs), len))
            }
            MetaContext::DirtyBitmap(name) => {
                let bitmap = self.volume.dirty_bitmap(name)?;
                Ok(non_empty(bitmap_extents(&bitmap, offset, len), len))
            }
        }
    }
}

/// A snapshot, read-only.
#[derive(Debug, Clone)]
pub struct SnapshotExport {
    snapshot: Snapshot,
}

impl SnapshotExport {
    /// Export `snapshot`.
    pub fn new(snapshot: Snapshot) -> SnapshotExport {
        SnapshotExport { snapshot }
    }

    /// The exported snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl Export for SnapshotExport {
    fn size(&self) -> u64 {
        self.snapshot.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            flush: true,
            trim: true,
            write_zeroes: false,
            fast_zero: false,
            cache: false,
            multi_conn: true,
            knows_holes: true,
        }
    }

    fn description(&self) -> String {
        format!(
            "tidemark snapshot {} of volume {}",
            self.snapshot.name(),
            self.snapshot.volume()
        )
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        Ok(self.snapshot.read(offset, buf)?)
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> ExportResult<()> {
        Err(ExportError::new(
            Errno::Perm,
            "snapshot exports are read-only",
        ))
    }

    fn flush(&self) -> ExportResult<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> ExportResult<()> {
        Ok(self.snapshot.release(offset, len)?)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> ExportResult<()> {
        Err(ExportError::new(
            Errno::Perm,
            "snapshot exports are read-only",
        ))
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.snapshot
            .dirty_bitmap()
            .map(|b| vec![b.name().to_string()])
            .unwrap_or_default()
    }

    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> ExportResult<Vec<Extent>> {
        match context {
            MetaContext::BaseAllocation => Ok(non_empty(
                allocation_extents(self.snapshot.allocation(offset, len)?),
                len,
            )),
            MetaContext::DirtyBitmap(name) => match self.snapshot.dirty_bitmap() {
                Some(bitmap) if bitmap.name() == name => {
                    Ok(non_empty(bitmap_extents(bitmap, offset, len), len))
                }
                _ => Err(ExportError::new(
                    Errno::Inval,
                    format!("no dirty bitmap {name:?} on this export"),
                )),
            },
        }
    }
}
