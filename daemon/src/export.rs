//! NBD exports of a live volume (read-write) and of a snapshot (read-only), as
//! implementations of `tidemark_nbd`'s export trait.
//!
//! - [`VolumeExport`]: FLUSH and FUA fdatasync the one backing descriptor every connection
//!   shares, so a flush on one connection covers writes completed on all: multi-conn is
//!   safe. Dirty bitmaps offered: one per checkpoint (`qemu:dirty-bitmap:<checkpoint>`,
//!   live: the changes since it, as of the query).
//!   WRITE payloads are read into buffers the export lends from huge-page pools
//!   (`VolumePayloads`): the volume writes them with O_DIRECT as they are, and a 1 MiB
//!   write reaches the disk as one physically contiguous request, not 256 pages.
//! - [`SnapshotExport`]: read-only; TRIM releases the COW space of chunks the backup
//!   client is done with; `base:allocation` reports holes of the volume that no write has
//!   filled since the snapshot; the dirty bitmap frozen with the snapshot is offered as
//!   `qemu:dirty-bitmap:<name>`.
//!
//! A backup's snapshot export says which volume it is of in its NBD description
//! ([`describe_origin`]), which `tidemark pull --delta` reads back ([`parse_origin`]).

use std::sync::{Arc, OnceLock};

use tidemark_nbd::export::{
    Capabilities, Errno, Export, ExportError, ExportResult, Extent, MetaContext, PayloadBuf,
    PayloadPool, ZeroFlags, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};

use tidemark_engine::checkpoint::CheckpointError;
use tidemark_engine::io::{BufPool, IoBuf};
use tidemark_engine::snapshot::{Snapshot, SnapshotError};
use tidemark_engine::volume::{Volume, VolumeError};
use uuid::Uuid;

/// The NBD error of a volume failure: its errno, and the message with its causes.
fn volume_error(err: VolumeError) -> ExportError {
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
    ExportError::new(errno, crate::error_chain(&err))
}

/// The NBD error of a snapshot failure.
fn snapshot_error(err: &SnapshotError) -> ExportError {
    let errno = match err {
        SnapshotError::OutOfRange { .. } => Errno::Inval,
        SnapshotError::Dropped { .. } => Errno::Shutdown,
        _ => Errno::Io,
    };
    ExportError::new(errno, crate::error_chain(err))
}

/// An NBD description that also says which volume a tidemark export is of:
/// `PREFIX (volume uuid UUID, granularity BYTES)`. [`parse_origin`] reads it back.
pub fn describe_origin(prefix: &str, uuid: Uuid, granularity: u32) -> String {
    format!("{prefix} (volume uuid {uuid}, granularity {granularity})")
}

/// The volume uuid and granularity a tidemark export's description names, if it does.
/// Anything else (another server's description, a malformed one) is `None`.
pub fn parse_origin(description: &str) -> Option<(Uuid, u32)> {
    if !description.starts_with("tidemark ") {
        return None;
    }
    let at = description.rfind("(volume uuid ")?;
    let inner = description[at..]
        .strip_prefix("(volume uuid ")?
        .strip_suffix(')')?;
    let (uuid, granularity) = inner.split_once(", granularity ")?;
    let uuid = Uuid::parse_str(uuid).ok().filter(|u| !u.is_nil())?;
    let granularity = granularity
        .parse::<u32>()
        .ok()
        .filter(|g| g.is_power_of_two() && (4096..=1 << 20).contains(g))?;
    Some((uuid, granularity))
}

/// Extents computed per BLOCK_STATUS reply, for `base:allocation` and dirty bitmaps alike
/// (the server keeps at most this many; the client asks again from where the reply ends),
/// like nbd-export's `FileExport`: the work of a call is bounded by this, not by the range.
///
/// A live volume's dirty bitmap is not cached per export: each call ORs, along the
/// checkpoint chain, only the bitmap words of the range its extents cover, a window at a
/// time ([`Volume::dirty_runs`]), so there is nothing to invalidate when a write sets a
/// bit or a checkpoint changes the chain, and nothing to hold in memory per export.
/// `huge_dirty_bitmap_ranges_cost_the_cap_not_the_range` measures it on a fragmented
/// 1 TiB volume at 64 KiB with a 13-checkpoint chain: 12 ms per capped call against
/// 315 ms to OR the whole bitmap (debug build, load average 24).
pub const EXTENTS_PER_CALL: usize = 1024;

/// Extents of dirty-bitmap runs for BLOCK_STATUS.
fn bitmap_extents(runs: Vec<(u64, bool)>) -> Vec<Extent> {
    runs.into_iter()
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

/// Buffer sizes of the pooled WRITE payload classes of a connection to a volume: one for
/// small and medium writes (nbdcopy sends 256 KiB, so a connection's eight buffers share
/// one huge page) and one huge page each for writes up to 2 MiB (qemu-img convert's).
/// A larger write (up to the 32 MiB payload cap) gets a mapping of its own, unmapped once
/// written: rare, and bounded by the connection's in-flight budget.
const PAYLOAD_CLASSES: [usize; 2] = [256 << 10, 2 << 20];

/// WRITE payload memory for one connection to a volume: per size class, a pool of as
/// many aligned buffers as the connection has requests in flight, mapped on first use
/// and in transparent huge pages. The volume's O_DIRECT path writes such a buffer as it
/// is (an unaligned heap buffer costs a bounce copy), and a buffer inside one huge page is
/// physically contiguous, so a 1 MiB write reaches the disk in one segment instead of
/// 256 (on a virtio disk that halves large-write throughput, as for the copy engine).
/// Memory per connection: at most `in_flight` buffers of each class ever touched; a
/// request that finds its class empty (never while the server keeps to `in_flight`) or
/// cannot map memory gets the server's own buffer instead.
struct VolumePayloads {
    in_flight: usize,
    classes: [OnceLock<Option<BufPool>>; PAYLOAD_CLASSES.len()],
}

impl VolumePayloads {
    /// Pools for a connection with at most `in_flight` payloads at once (none mapped yet).
    fn new(in_flight: usize) -> VolumePayloads {
        VolumePayloads {
            in_flight: in_flight.max(1),
            classes: Default::default(),
        }
    }

    /// A buffer of exactly `len` bytes, aligned for O_DIRECT.
    fn buffer(&self, len: usize) -> Option<IoBuf> {
        let mut buf = match PAYLOAD_CLASSES.iter().position(|&size| len <= size) {
            Some(class) => self.classes[class]
                .get_or_init(|| {
                    BufPool::new(PAYLOAD_CLASSES[class], self.in_flight)
                        .inspect_err(|e| {
                            tracing::warn!(
                                "NBD write payloads use heap buffers: no buffer pool: {e}"
                            )
                        })
                        .ok()
                })
                .as_ref()?
                .take()?,
            None => BufPool::new(len, 1)
                .inspect_err(|e| {
                    tracing::warn!("a {len}-byte NBD write payload uses a heap buffer: {e}")
                })
                .ok()?
                .take()?,
        };
        buf.set_len(len);
        Some(buf)
    }
}

impl PayloadPool for VolumePayloads {
    fn take(&self, len: usize) -> Option<Box<dyn PayloadBuf>> {
        Some(Box::new(LentPayload(self.buffer(len)?)))
    }
}

/// A pooled buffer lent to the NBD server; dropping it returns it to its pool.
struct LentPayload(IoBuf);

impl PayloadBuf for LentPayload {
    fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
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
        self.volume.read(offset, buf).map_err(volume_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        self.volume.write(offset, data, fua).map_err(volume_error)
    }

    fn payload_pool(&self, in_flight: usize) -> Option<Box<dyn PayloadPool>> {
        Some(Box::new(VolumePayloads::new(in_flight)))
    }

    fn flush(&self) -> ExportResult<()> {
        self.volume.flush().map_err(volume_error)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        self.volume.trim(offset, len, fua).map_err(volume_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        if flags.fast {
            return Err(ExportError::new(
                Errno::NotSup,
                "fast zeroing is not offered",
            ));
        }
        self.volume
            .write_zeroes(offset, len, !flags.no_hole, flags.fua)
            .map_err(volume_error)
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.volume.checkpoint_names()
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
                    .allocation(offset, len, EXTENTS_PER_CALL)
                    .unwrap_or_else(|| vec![(len, false)]);
                Ok(non_empty(allocation_extents(runs), len))
            }
            MetaContext::DirtyBitmap(name) => {
                let runs = self
                    .volume
                    .dirty_runs(name, offset, len, EXTENTS_PER_CALL)
                    .map_err(volume_error)?;
                Ok(non_empty(bitmap_extents(runs), len))
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
        self.snapshot
            .read(offset, buf)
            .map_err(|e| snapshot_error(&e))
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
        self.snapshot
            .release(offset, len)
            .map_err(|e| snapshot_error(&e))
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
                allocation_extents(
                    self.snapshot
                        .allocation_capped(offset, len, EXTENTS_PER_CALL)
                        .map_err(|e| snapshot_error(&e))?,
                ),
                len,
            )),
            MetaContext::DirtyBitmap(name) => match self.snapshot.dirty_bitmap() {
                Some(bitmap) if bitmap.name() == name => {
                    let runs = bitmap.runs_capped(offset, len, EXTENTS_PER_CALL);
                    Ok(non_empty(bitmap_extents(runs), len))
                }
                _ => Err(ExportError::new(
                    Errno::Inval,
                    format!("no dirty bitmap {name:?} on this export"),
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_engine::volume::{SnapshotSpec, VolumeOptions};
    use tidemark_nbd::export::MetaContext;

    const HUGE_PAGE: usize = 2 << 20;

    #[test]
    fn payload_buffers_are_aligned_and_exactly_the_write_length() {
        let payloads = VolumePayloads::new(8);
        for len in [
            512,
            4096,
            256 << 10,
            (256 << 10) + 4096,
            1 << 20,
            2 << 20,
            32 << 20,
        ] {
            let mut buf = payloads.buffer(len).unwrap();
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0, "{len} bytes");
            buf.as_mut_slice().fill(0xa5);
            assert!(buf.as_slice().iter().all(|&b| b == 0xa5));
        }
        // Each class pool starts on a huge page (8 x 256 KiB fills exactly one).
        for len in [4096, 1 << 20] {
            let buf = payloads.buffer(len).unwrap();
            assert_eq!(buf.index(), 0);
            assert_eq!(
                buf.as_slice().as_ptr() as usize % HUGE_PAGE,
                0,
                "{len} bytes"
            );
        }
    }

    #[test]
    fn payload_buffers_return_to_their_pool_and_are_reused() {
        let payloads = VolumePayloads::new(4);
        let first = payloads.take(65536).unwrap();
        let at = first.as_slice().as_ptr();
        drop(first);
        let again = payloads.take(4096).unwrap();
        assert_eq!(again.as_slice().as_ptr(), at);
        assert_eq!(again.as_slice().len(), 4096);
    }

    #[test]
    fn a_connection_holds_at_most_in_flight_buffers_per_class() {
        let payloads = VolumePayloads::new(3);
        let small: Vec<IoBuf> = (0..3).map(|_| payloads.buffer(4096).unwrap()).collect();
        assert!(payloads.buffer(4096).is_none(), "a fourth small buffer");
        // The other class is a pool of its own.
        let large: Vec<IoBuf> = (0..3).map(|_| payloads.buffer(1 << 20).unwrap()).collect();
        assert!(payloads.buffer(2 << 20).is_none(), "a fourth large buffer");
        let pool_ids: std::collections::BTreeSet<u64> =
            small.iter().chain(&large).map(IoBuf::pool_id).collect();
        assert_eq!(pool_ids.len(), 2);
        drop(small);
        assert!(payloads.buffer(4096).is_some());
        drop(large);
    }

    #[test]
    fn huge_payloads_get_a_mapping_of_their_own_freed_after_the_write() {
        let payloads = VolumePayloads::new(1);
        let _small = payloads.buffer(4096).unwrap();
        let _large = payloads.buffer(2 << 20).unwrap();
        // Both classes are empty; writes past the largest class still get buffers.
        let mut a = payloads.buffer(32 << 20).unwrap();
        let b = payloads.buffer((2 << 20) + 4096).unwrap();
        assert_ne!(a.pool_id(), b.pool_id());
        assert_eq!(a.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
        a.as_mut_slice().fill(1);
        let id = a.pool_id();
        drop(a);
        let c = payloads.buffer(32 << 20).unwrap();
        assert_ne!(c.pool_id(), id, "a huge payload's mapping is not kept");
    }

    #[test]
    fn a_volume_writes_lent_payloads_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let export = VolumeExport::new(Arc::new(volume(dir.path())));
        let payloads = export
            .payload_pool(8)
            .expect("a volume lends payload buffers");
        let mut buf = payloads.take(128 << 10).unwrap();
        buf.as_mut_slice().fill(0x3c);
        export.write(65536, buf.as_slice(), true).unwrap();
        drop(buf);
        let mut back = vec![0u8; 128 << 10];
        export.read(65536, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0x3c));
    }

    /// A 1 MiB sparse volume tracked at 64 KiB.
    fn volume(dir: &std::path::Path) -> Volume {
        let image = dir.join("v.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let options = VolumeOptions {
            granularity: 65536,
            ..VolumeOptions::default()
        };
        Volume::create(&dir.join("state"), "v", &image, options).unwrap()
    }

    #[test]
    fn exports_serve_data_bitmaps_and_refuse_writes_to_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let vol = Arc::new(volume(dir.path()));
        let live = VolumeExport::new(vol.clone());
        assert!(!live.capabilities().read_only && live.capabilities().multi_conn);
        live.write(0, &[1; 512], false).unwrap();
        vol.checkpoint_create("c").unwrap();
        live.write(65536 * 2, &[1; 512], true).unwrap();
        assert_eq!(live.dirty_bitmaps(), vec!["c".to_string()]);
        let ext = live
            .block_status(&MetaContext::DirtyBitmap("c".into()), 0, 1 << 20)
            .unwrap();
        assert_eq!(ext[0].length, 65536 * 2);
        assert_eq!(ext[1].flags, STATE_DIRTY);
        let (snap, _) = vol
            .snapshot(SnapshotSpec {
                name: "s".into(),
                since: Some("c".into()),
                ..SnapshotSpec::default()
            })
            .unwrap();
        let export = SnapshotExport::new(snap);
        assert!(export.capabilities().read_only);
        // Read-only, yet TRIM is advertised: it releases COW space.
        let flags = tidemark_nbd::negotiate::transmission_flags(
            &export,
            tidemark_nbd::proto::HeaderMode::Structured,
        );
        let tflags =
            tidemark_nbd::proto::tflags::SEND_TRIM | tidemark_nbd::proto::tflags::READ_ONLY;
        assert_eq!(flags & tflags, tflags);
        assert_eq!(export.write(0, &[0], false).unwrap_err().errno, Errno::Perm);
        assert_eq!(export.dirty_bitmaps(), vec!["c".to_string()]);
        let ext = export
            .block_status(&MetaContext::DirtyBitmap("c".into()), 0, 1 << 20)
            .unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        assert_eq!(
            export
                .block_status(&MetaContext::DirtyBitmap("x".into()), 0, 10)
                .unwrap_err()
                .errno,
            Errno::Inval
        );
        // The image is sparse: the snapshot reports holes where nothing was ever written,
        // also after the live volume fills them.
        live.write(65536 * 8, &[5; 65536], false).unwrap();
        let alloc = export
            .block_status(&MetaContext::BaseAllocation, 65536 * 4, 65536 * 8)
            .unwrap();
        assert!(alloc.iter().all(|e| e.flags != 0), "{alloc:?}");
        let mut buf = vec![1u8; 65536];
        export.read(65536 * 8, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(
            live.read(u64::MAX - 1, &mut [0; 4]).unwrap_err().errno,
            Errno::Inval
        );
    }

    /// Every other 64 KiB tracking block of the first `blocks` written through `live`.
    fn fragment(live: &VolumeExport, blocks: u64) {
        for b in (0..blocks).step_by(2) {
            live.write(b * 65536, &[7; 512], false).unwrap();
        }
    }

    #[test]
    fn huge_dirty_bitmap_ranges_cost_the_cap_not_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("v.img");
        std::fs::File::create(&image).unwrap().set_len(TIB).unwrap();
        let options = VolumeOptions {
            granularity: 65536,
            tracking: tidemark_engine::volume::TrackingMode::Fast,
            ..VolumeOptions::default()
        };
        let vol =
            Arc::new(Volume::create(&dir.path().join("state"), "v", &image, options).unwrap());
        vol.checkpoint_create("c0").unwrap();
        let live = VolumeExport::new(vol.clone());
        fragment(&live, 8);
        vol.checkpoint_create("c").unwrap();
        // 3 * EXTENTS_PER_CALL runs, the older ones in the frozen bitmap of c0.
        fragment(&live, 3 * EXTENTS_PER_CALL as u64);
        let context = MetaContext::DirtyBitmap("c0".into());
        let ext = live.block_status(&context, 0, TIB).unwrap();
        assert_eq!(ext.len(), EXTENTS_PER_CALL);
        for (i, e) in ext.iter().enumerate() {
            assert_eq!(e.length, 65536);
            assert_eq!(e.flags, if i % 2 == 0 { STATE_DIRTY } else { 0 });
        }
        // Past the dirty region: one clean extent to the end of the volume.
        let tail = 3 * EXTENTS_PER_CALL as u64 * 65536;
        let ext = live.block_status(&context, tail, TIB).unwrap();
        assert_eq!(ext.len(), 1);
        assert_eq!((ext[0].length, ext[0].flags), (TIB - tail, 0));

        // One dirty block in every other 4 KiB bitmap page (2 GiB of volume each): the
        // whole OR'ed bitmap then holds all its 512 pages, 2 MiB, as a flat one always did.
        for page in 1..TIB / (65536 * 32768) {
            vol.write(page * 65536 * 32768 + 65536 * 7, &[1; 4096], false)
                .unwrap();
        }
        // A capped call copies a few words; the whole OR'ed bitmap is 2 MiB.
        let time = |f: &dyn Fn()| {
            let start = std::time::Instant::now();
            for _ in 0..20 {
                f();
            }
            start.elapsed()
        };
        let capped = time(&|| {
            live.block_status(&context, 0, TIB).unwrap();
        });
        let whole = time(&|| {
            vol.dirty_bitmap("c0").unwrap();
        });
        assert!(
            capped * 10 < whole,
            "a capped BLOCK_STATUS took {capped:?}, the whole bitmap {whole:?}"
        );
        // Along a 13-checkpoint chain the capped call still ORs only its range's words.
        for i in 0..11 {
            vol.checkpoint_create(&format!("c{}", i + 2)).unwrap();
            fragment(&live, 3 * EXTENTS_PER_CALL as u64);
        }
        let capped = time(&|| {
            live.block_status(&context, 0, TIB).unwrap();
        });
        let whole = time(&|| {
            vol.dirty_bitmap("c0").unwrap();
        });
        eprintln!(
            "13 checkpoints, 20 calls: capped BLOCK_STATUS {capped:?}, whole-bitmap OR {whole:?}"
        );
        assert!(
            capped * 10 < whole,
            "13 checkpoints: a capped BLOCK_STATUS took {capped:?}, the whole bitmap {whole:?}"
        );

        // The snapshot's frozen bitmap is capped too.
        let (snap, _) = vol
            .snapshot(SnapshotSpec {
                name: "s".into(),
                since: Some("c0".into()),
                ..SnapshotSpec::default()
            })
            .unwrap();
        let export = SnapshotExport::new(snap);
        let ext = export.block_status(&context, 0, TIB).unwrap();
        assert_eq!(ext.len(), EXTENTS_PER_CALL);
        assert!(ext.iter().all(|e| e.length == 65536));
    }

    const TIB: u64 = 1 << 40;

    /// A 1 TiB sparse volume tracked at 64 KiB (fast tracking: no bitmap syncs in the
    /// way) whose first `islands` 128 KiB steps each start with 4 KiB of data: twice as
    /// many allocation runs.
    fn fragmented_volume(dir: &std::path::Path, islands: u64) -> Arc<Volume> {
        use std::os::unix::fs::FileExt;
        let image = dir.join("v.img");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(TIB).unwrap();
        for i in 0..islands {
            file.write_all_at(&[7; 4096], i * 131072).unwrap();
        }
        let options = VolumeOptions {
            granularity: 65536,
            tracking: tidemark_engine::volume::TrackingMode::Fast,
            ..VolumeOptions::default()
        };
        Arc::new(Volume::create(&dir.join("state"), "v", &image, options).unwrap())
    }

    fn snapshot_of(vol: &Volume) -> SnapshotExport {
        let (snap, _) = vol
            .snapshot(SnapshotSpec {
                name: "s".into(),
                ..SnapshotSpec::default()
            })
            .unwrap();
        SnapshotExport::new(snap)
    }

    /// The fastest of five runs of `f`.
    fn fastest(f: &dyn Fn()) -> std::time::Duration {
        (0..5)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed()
            })
            .min()
            .unwrap()
    }

    #[test]
    fn huge_allocation_ranges_on_a_fragmented_snapshot_cost_the_cap_not_the_range() {
        let dir = tempfile::tempdir().unwrap();
        // 32 times the cap in allocation runs.
        let vol = fragmented_volume(dir.path(), 16 * EXTENTS_PER_CALL as u64);
        let export = snapshot_of(&vol);
        // The COW index is fragmented too: copied blocks over the first islands, blocks
        // that were holes after them (the volume now holds data there, the snapshot not).
        for i in 0..256u64 {
            vol.write(i * 131072, &[1; 512], false).unwrap();
            vol.write(i * 131072 + 65536, &[1; 512], false).unwrap();
        }
        export.snapshot().wait_idle();
        let ext = export
            .block_status(&MetaContext::BaseAllocation, 0, TIB)
            .unwrap();
        assert_eq!(ext.len(), EXTENTS_PER_CALL);
        // The snapshot keeps its own allocation everywhere: over the first 256 steps the
        // copied blocks read as data and the blocks that were holes when first written as
        // holes, although the volume now holds data in both.
        let hole = STATE_HOLE | STATE_ZERO;
        for (i, e) in ext.iter().enumerate() {
            let expected = if i % 2 == 0 {
                (4096, 0)
            } else {
                (131072 - 4096, hole)
            };
            assert_eq!((e.length, e.flags), expected, "extent {i}");
        }
        // The live volume's allocation is capped as well.
        let live = VolumeExport::new(vol.clone());
        let ext = live
            .block_status(&MetaContext::BaseAllocation, 0, TIB)
            .unwrap();
        assert_eq!(ext.len(), EXTENTS_PER_CALL);

        // Time proportional to the cap: the whole terabyte costs what the range holding
        // just the cap's extents costs.
        let just_the_cap = (EXTENTS_PER_CALL as u64 / 2) * 131072;
        for (what, export) in [
            ("snapshot", &export as &dyn Export),
            ("volume", &live as &dyn Export),
        ] {
            let capped = fastest(&|| {
                export
                    .block_status(&MetaContext::BaseAllocation, 0, just_the_cap)
                    .unwrap();
            });
            let huge = fastest(&|| {
                export
                    .block_status(&MetaContext::BaseAllocation, 0, TIB)
                    .unwrap();
            });
            eprintln!("{what} base:allocation: 1 TiB {huge:?}, the cap's range {capped:?}");
            assert!(
                huge < capped * 4,
                "{what}: 1 TiB took {huge:?}, the cap's range {capped:?}"
            );
        }
    }

    #[test]
    fn a_writer_is_not_stalled_by_allocation_queries_over_a_large_cow_index() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let vol = fragmented_volume(dir.path(), 0);
        let export = snapshot_of(&vol);
        // A backup client that TRIMs what it has read leaves an index entry per chunk:
        // 64 GiB of them, a million entries for every query over the range to pass.
        export.trim(0, 64 << 30, false).unwrap();
        let stop = AtomicBool::new(false);
        let calls = AtomicUsize::new(0);
        let (call_times, write_times) = std::thread::scope(|scope| {
            let querier = scope.spawn(|| {
                let mut times = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    export
                        .block_status(&MetaContext::BaseAllocation, 0, TIB)
                        .unwrap();
                    times.push(start.elapsed());
                    calls.fetch_add(1, Ordering::Relaxed);
                }
                times
            });
            // Each write claims a fresh chunk: copy-before-write takes the index lock.
            let started = Instant::now();
            let mut writes = Vec::new();
            let mut at = 128u64 << 30;
            while calls.load(Ordering::Relaxed) < 5 && started.elapsed() < Duration::from_secs(30) {
                let start = Instant::now();
                vol.write(at, &[3; 4096], false).unwrap();
                writes.push(start.elapsed());
                at += 65536;
            }
            stop.store(true, Ordering::Relaxed);
            (querier.join().unwrap(), writes)
        });
        // A writer that waits out a query's lock hold shows in the slow tail (the writes
        // that follow in the gap between two holds are fast): the 90th percentile.
        let percentile = |mut times: Vec<Duration>, p: usize| {
            times.sort();
            times[(times.len() - 1) * p / 100]
        };
        let (calls, writes) = (call_times.len(), write_times.len());
        let (call, write) = (percentile(call_times, 50), percentile(write_times, 90));
        eprintln!("p90 write {write:?} of {writes}, median query {call:?} of {calls}");
        assert!(calls >= 5, "{calls} queries in 30 s");
        assert!(
            write * 10 < call,
            "a write took {write:?} (90th percentile of {writes}) beside queries of {call:?} (median of {calls})"
        );
    }

    #[test]
    fn origin_descriptions_round_trip() {
        let uuid = Uuid::new_v4();
        let text = describe_origin("tidemark snapshot b of volume v", uuid, 65536);
        assert_eq!(parse_origin(&text), Some((uuid, 65536)));
        assert_eq!(parse_origin("nbdkit file plugin"), None);
    }
}
