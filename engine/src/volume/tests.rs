//! Volume behaviour: lifecycle, write path, checkpoints, snapshots, COW failure, and a
//! model-based property test against a plain in-memory disk.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::status::SnapshotState;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    fn volume(&self, name: &str, size: u64, options: VolumeOptions) -> Volume {
        let image = self.image(&format!("{name}.img"), size);
        Volume::create(&self.state(), name, &image, options).unwrap()
    }
}

fn small(granularity: u32) -> VolumeOptions {
    VolumeOptions {
        granularity,
        ..VolumeOptions::default()
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

/// Ten thousand volumes must not cost thirty thousand descriptors: the volumes of a state
/// dir share one owner lock, and an idle volume holds one descriptor, its backing.
#[test]
fn volumes_of_a_state_dir_share_one_lock_and_hold_one_descriptor_each() {
    let fx = Fixture::new();
    let vols: Vec<Volume> = (0..3)
        .map(|i| fx.volume(&format!("v{i}"), 1 << 20, VolumeOptions::default()))
        .collect();
    let lock = fs::canonicalize(fx.state().join("volumes/.lock")).unwrap();
    let open_on = |wanted: &dyn Fn(&std::path::Path) -> bool| {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|fd| fs::read_link(fd.path()).is_ok_and(|target| wanted(&target)))
            .count()
    };
    assert_eq!(open_on(&|target| target == lock), 1);
    let images = fs::canonicalize(fx.dir.path()).unwrap();
    for vol in &vols {
        vol.write(0, &[1u8; 4096], false).unwrap();
    }
    let backing = open_on(&|target| {
        target.starts_with(&images) && target.extension().is_some_and(|e| e == "img")
    });
    assert_eq!(backing, 3, "one descriptor per idle volume");
    drop(vols);
    assert_eq!(open_on(&|target| target == lock), 0);
    let again = Volume::open(&fx.state(), "v0").unwrap();
    assert_eq!(open_on(&|target| target == lock), 1);
    drop(again);
}

#[test]
fn create_open_lock_and_reopen() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 1 << 20, VolumeOptions::default());
    assert_eq!(vol.size(), 1 << 20);
    assert_eq!(vol.granularity(), DEFAULT_GRANULARITY);
    match Volume::open(&fx.state(), "v") {
        Err(VolumeError::Locked { holder, .. }) => {
            assert!(holder.contains(&std::process::id().to_string()))
        }
        other => panic!("second open must fail with Locked, got {other:?}"),
    }
    let uuid = vol.uuid();
    vol.close().unwrap();
    let vol = Volume::open(&fx.state(), "v").unwrap();
    assert_eq!(vol.uuid(), uuid);
    assert_eq!(Volume::list(&fx.state()).unwrap(), vec!["v".to_string()]);
    assert!(matches!(
        Volume::open(&fx.state(), "nope"),
        Err(VolumeError::NotFound { .. })
    ));
    let image = fx.image("w.img", 4096);
    assert!(matches!(
        Volume::create(&fx.state(), "v", &image, VolumeOptions::default()),
        Err(VolumeError::Exists { .. })
    ));
    assert!(matches!(
        Volume::create(&fx.state(), "w", &image, small(3000)),
        Err(VolumeError::Invalid(_))
    ));
    drop(vol);
    Volume::remove(&fx.state(), "v").unwrap();
    assert!(Volume::list(&fx.state()).unwrap().is_empty());
}

#[test]
fn create_extends_a_short_file_and_refuses_a_long_one() {
    let fx = Fixture::new();
    let image = fx.image("a.img", 4096);
    let options = VolumeOptions {
        size: Some(1 << 20),
        ..VolumeOptions::default()
    };
    let vol = Volume::create(&fx.state(), "a", &image, options).unwrap();
    assert_eq!(vol.size(), 1 << 20);
    assert_eq!(fs::metadata(&image).unwrap().len(), 1 << 20);
    let options = VolumeOptions {
        size: Some(4096),
        ..VolumeOptions::default()
    };
    assert!(matches!(
        Volume::create(&fx.state(), "b", &image, options),
        Err(VolumeError::Invalid(_))
    ));
}

#[test]
fn io_round_trips_and_is_bounds_checked() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 1 << 20, small(4096));
    let data = pattern(1, 10000);
    vol.write(777, &data, true).unwrap();
    let mut back = vec![0u8; 10000];
    vol.read(777, &mut back).unwrap();
    assert_eq!(back, data);
    vol.write_zeroes(1000, 100, false, false).unwrap();
    vol.trim(8192, 4096, false).unwrap();
    vol.read(777, &mut back).unwrap();
    assert!(back[223..323].iter().all(|&b| b == 0));
    assert!(back[8192 - 777..].iter().all(|&b| b == 0));
    assert!(matches!(
        vol.write((1 << 20) - 1, &[0, 0], false),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.read(u64::MAX, &mut [0]),
        Err(VolumeError::OutOfRange { .. })
    ));
    vol.flush().unwrap();
}

#[test]
fn checkpoints_track_changes_and_reload_after_a_clean_stop() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 1 << 20, small(65536));
    vol.write(0, &[1; 4096], false).unwrap();
    assert_eq!(vol.status().tracking, TrackingStatus::Off);
    vol.checkpoint_create("a").unwrap();
    vol.write(65536 * 3 + 5, &[2; 10], false).unwrap();
    vol.checkpoint_create("b").unwrap();
    vol.write_zeroes(65536 * 8, 65536 * 2, true, false).unwrap();
    assert_eq!(
        vol.changed_extents("a").unwrap(),
        vec![65536 * 3..65536 * 4, 65536 * 8..65536 * 10]
    );
    assert_eq!(
        vol.changed_extents("b").unwrap(),
        vec![65536 * 8..65536 * 10]
    );
    let chain = vol.chain_uuid();
    assert_eq!(vol.generation(), 2);
    vol.close().unwrap();
    let vol = Volume::open(&fx.state(), "v").unwrap();
    assert_eq!(vol.chain_uuid(), chain);
    assert_eq!(
        vol.changed_extents("a").unwrap(),
        vec![65536 * 3..65536 * 4, 65536 * 8..65536 * 10]
    );
    let status = vol.status();
    assert_eq!(status.tracking, TrackingStatus::Durable);
    assert_eq!(
        status
            .checkpoints
            .iter()
            .map(|c| c.changed_blocks)
            .collect::<Vec<_>>(),
        vec![3, 2]
    );
    assert!(status.events.is_empty(), "{:?}", status.events);
    vol.checkpoint_delete("a").unwrap();
    assert!(vol.changed_extents("a").is_err());
    assert!(matches!(
        vol.checkpoint_create("b"),
        Err(VolumeError::Checkpoint(CheckpointError::Exists { .. }))
    ));
    assert!(matches!(
        vol.checkpoint_create("bad name"),
        Err(VolumeError::Checkpoint(CheckpointError::InvalidName { .. }))
    ));
}

#[test]
fn live_dirty_runs_skip_clean_pages_and_match_the_frozen_bitmap() {
    // 4 KiB granularity: one 4 KiB bitmap page covers 128 MiB, so 1 GiB spans 8 pages.
    let fx = Fixture::new();
    let vol = fx.volume("v", 1 << 30, small(4096));
    vol.checkpoint_create("a").unwrap();
    vol.write(5 << 20, &[1; 8192], false).unwrap();
    vol.checkpoint_create("b").unwrap();
    vol.write_zeroes((128 << 20) - 4096, 12288, true, false)
        .unwrap();
    vol.write(900 << 20, &[2; 4096], false).unwrap();
    vol.write((1 << 30) - 4096, &[3; 4096], false).unwrap();
    for since in ["a", "b"] {
        let frozen = vol.dirty_bitmap(since).unwrap();
        for (offset, len) in [
            (0, u64::MAX),
            (1 << 20, 200 << 20),
            ((128 << 20) - 100, 4096),
            (600 << 20, 300 << 20),
        ] {
            let all = frozen.runs(offset, len);
            assert_eq!(
                vol.dirty_runs(since, offset, len, usize::MAX).unwrap(),
                all,
                "{since} {offset}+{len}"
            );
            let capped = vol.dirty_runs(since, offset, len, 3).unwrap();
            assert_eq!(
                capped[..],
                all[..all.len().min(3)],
                "{since} {offset}+{len} capped"
            );
        }
    }
}

#[test]
fn durable_rewrites_of_dirty_blocks_cost_no_sync() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 1 << 20, small(65536));
    vol.checkpoint_create("a").unwrap();
    vol.write(0, &[1; 4096], false).unwrap();
    let syncs = vol.tracking_syncs();
    assert_eq!(syncs, 1);
    for i in 0..10 {
        vol.write(i * 4096, &[2; 4096], false).unwrap();
    }
    assert_eq!(vol.tracking_syncs(), syncs);
}

/// Many writers first-writing distinct blocks at once share the durable syncs (fewer syncs
/// than newly dirtied blocks), and every write's bit would survive a power loss before its
/// data write is issued (checked inside the write path in test builds).
#[test]
fn concurrent_first_writes_share_durable_syncs() {
    const THREADS: u64 = 32;
    const WRITES: u64 = 16;
    let fx = Fixture::new();
    let vol = Arc::new(fx.volume("v", 64 << 20, small(65536)));
    vol.checkpoint_create("a").unwrap();
    let start = Arc::new(std::sync::Barrier::new(THREADS as usize));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (vol, start) = (vol.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..WRITES {
                    let block = i * THREADS + t;
                    vol.write(
                        block * 65536 + t % 16 * 4096,
                        &pattern(t as u8, 4096),
                        false,
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let blocks = THREADS * WRITES;
    let syncs = vol.tracking_syncs();
    assert!(
        syncs < blocks,
        "{syncs} syncs for {blocks} newly dirtied blocks"
    );
    let dirty: u64 = vol
        .changed_extents("a")
        .unwrap()
        .iter()
        .map(|r| (r.end - r.start) / 65536)
        .sum();
    assert_eq!(dirty, blocks);
}

#[test]
fn snapshot_keeps_its_content_and_freezes_the_bitmap() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 1 << 20, small(4096));
    vol.write(0, &pattern(1, 1 << 20), false).unwrap();
    vol.checkpoint_create("c1").unwrap();
    vol.write(4096 * 10, &[9; 4096], false).unwrap();
    let spec = SnapshotSpec {
        name: "s".into(),
        checkpoint: Some("c2".into()),
        since: Some("c1".into()),
        cow: CowOptions::default(),
    };
    let (snap, pause) = vol.snapshot(spec).unwrap();
    assert!(pause < Duration::from_secs(5));
    let before = {
        let mut b = vec![0u8; 1 << 20];
        vol.read(0, &mut b).unwrap();
        b
    };
    // Overwrite, partially and wholly, zero and trim after the snapshot.
    vol.write(100, &[7; 5000], false).unwrap();
    vol.write(65536, &[8; 65536], false).unwrap();
    vol.write_zeroes(200_000, 100_000, true, false).unwrap();
    vol.trim(400_000, 200_000, false).unwrap();
    let mut back = vec![0u8; 1 << 20];
    snap.read(0, &mut back).unwrap();
    assert!(back == before, "snapshot content changed");
    let bitmap = snap.dirty_bitmap().unwrap();
    assert_eq!(bitmap.name(), "c1");
    assert_eq!(bitmap.changed_extents(), vec![4096 * 10..4096 * 11]);
    // The new checkpoint starts at the snapshot instant.
    assert!(vol
        .changed_extents("c2")
        .unwrap()
        .contains(&(65536..131072)));
    assert_eq!(vol.status().snapshots[0].state, SnapshotState::Active);
    assert!(vol.status().snapshots[0].cow_bytes_used > 0);
    vol.drop_snapshot("s").unwrap();
    assert!(matches!(
        snap.read(0, &mut back[..10]),
        Err(SnapshotError::Dropped { .. })
    ));
    assert!(vol.status().snapshots.is_empty());
    assert!(matches!(
        vol.drop_snapshot("s"),
        Err(VolumeError::SnapshotNotFound { .. })
    ));
}

#[test]
fn a_group_snapshot_is_one_instant_for_all_volumes_and_all_or_nothing() {
    let fx = Fixture::new();
    let a = fx.volume("a", 1 << 20, small(65536));
    let b = fx.volume("b", 1 << 20, small(65536));
    a.checkpoint_create("base").unwrap();
    let spec = |name: &str, since: Option<&str>| SnapshotSpec {
        name: name.into(),
        checkpoint: Some("next".into()),
        since: since.map(str::to_string),
        cow: CowOptions::default(),
    };
    // b has no checkpoint "base": the whole group fails and nothing changes on a.
    let err =
        Volume::snapshot_group(&[(&a, spec("s", Some("base"))), (&b, spec("s", Some("base")))]);
    assert!(err.is_err());
    assert_eq!(a.checkpoints().len(), 1);
    assert!(a.snapshots().is_empty() && b.snapshots().is_empty());
    // The new checkpoints' files, written before the pause, were removed again.
    let bitmap_files = |v: &Volume| {
        std::fs::read_dir(v.state_path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".bitmap"))
            .count()
    };
    assert_eq!(bitmap_files(&a), 1);
    assert_eq!(bitmap_files(&b), 0);
    let group =
        Volume::snapshot_group(&[(&a, spec("s", Some("base"))), (&b, spec("s", None))]).unwrap();
    assert_eq!(group.snapshots.len(), 2);
    assert_eq!(group.snapshots[0].volume(), "a");
    assert_eq!(a.checkpoints().len(), 2);
    assert_eq!(b.checkpoints().len(), 1);
    assert_eq!(bitmap_files(&a), 2);
    assert_eq!(bitmap_files(&b), 1);
    // A checkpoint name that is taken fails before the pause and leaves no file behind.
    assert!(a.checkpoint_create("next").is_err());
    assert_eq!(bitmap_files(&a), 2);
    assert!(Volume::snapshot_group(&[(&a, spec("t", None)), (&a, spec("u", None))]).is_err());
}

/// The volumes of a group do their paused work on threads of their own: a failure on one
/// volume still undoes every other, and a group that succeeds gives each volume its own
/// snapshot, frozen bitmap and checkpoint, in request order.
#[test]
fn a_large_group_is_undone_on_one_failure_and_each_volume_gets_its_own_snapshot() {
    let fx = Fixture::new();
    let names: Vec<String> = (0..8).map(|i| format!("v{i}")).collect();
    let volumes: Vec<Volume> = names
        .iter()
        .map(|name| fx.volume(name, 1 << 20, small(4096)))
        .collect();
    for (i, vol) in volumes.iter().enumerate() {
        if i != 5 {
            vol.checkpoint_create("base").unwrap();
        }
        vol.write(4096 * (i as u64 + 1), &[i as u8 + 1; 4096], false)
            .unwrap();
    }
    let spec = |since: &str| SnapshotSpec {
        name: "s".into(),
        checkpoint: Some("next".into()),
        since: Some(since.into()),
        cow: CowOptions::default(),
    };
    // v5 has no checkpoint "base": the group fails inside the pause and nothing stays.
    let requests: Vec<(&Volume, SnapshotSpec)> =
        volumes.iter().map(|vol| (vol, spec("base"))).collect();
    assert!(Volume::snapshot_group(&requests).is_err());
    for (i, vol) in volumes.iter().enumerate() {
        assert!(vol.snapshots().is_empty(), "{} kept a snapshot", names[i]);
        assert_eq!(vol.checkpoints().len(), usize::from(i != 5), "{}", names[i]);
        // Neither the marker nor the COW store file (made before the pause) is left.
        let left: Vec<_> = fs::read_dir(vol.state_path().join("snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{}: {left:?} left behind", names[i]);
    }
    volumes[5].checkpoint_create("base").unwrap();
    volumes[5].write(4096 * 6, &[6; 4096], false).unwrap();
    let group = Volume::snapshot_group(&requests).unwrap();
    assert_eq!(group.snapshots.len(), volumes.len());
    for (i, (vol, snap)) in volumes.iter().zip(&group.snapshots).enumerate() {
        assert_eq!(snap.volume(), names[i]);
        let block = 4096 * (i as u64 + 1);
        assert_eq!(
            snap.dirty_bitmap().unwrap().changed_extents(),
            vec![block..block + 4096],
            "{}'s frozen bitmap",
            names[i]
        );
        assert_eq!(vol.checkpoints().len(), 2);
        vol.write(block, &[0xee; 4096], false).unwrap();
        let mut back = vec![0u8; 4096];
        snap.read(block, &mut back).unwrap();
        assert_eq!(back, vec![i as u8 + 1; 4096], "{}'s snapshot", names[i]);
        assert_eq!(
            vol.changed_extents("next").unwrap(),
            vec![block..block + 4096]
        );
    }
}

/// Snapshot `s` with a COW store of at most `limit` bytes.
fn limited(limit: u64) -> SnapshotSpec {
    SnapshotSpec {
        name: "s".into(),
        cow: CowOptions {
            limit: Some(limit),
            ..CowOptions::default()
        },
        ..SnapshotSpec::default()
    }
}

/// The gates of a group close at once, on threads of their own, yet the group is one
/// instant: one writer issues writes one after another across the volumes (each
/// acknowledged before the next is issued) while group snapshots are taken, and each
/// group holds exactly the volumes' state after some write of that sequence (never a
/// later write without every earlier one, on whichever volume).
#[test]
fn group_snapshots_taken_while_a_writer_crosses_volumes_hold_a_prefix_of_its_writes() {
    const VOLUMES: u64 = 6;
    const BLOCKS: u64 = 16;
    let fx = Fixture::new();
    let volumes: Vec<Arc<Volume>> = (0..VOLUMES)
        .map(|i| Arc::new(fx.volume(&format!("v{i}"), BLOCKS * 4096, small(4096))))
        .collect();
    for v in &volumes {
        v.checkpoint_create("c").unwrap();
    }
    // Write k: volume k % VOLUMES, block k / VOLUMES % BLOCKS, filled with k + 1.
    let place = |k: u64| (k % VOLUMES, k / VOLUMES % BLOCKS * 4096);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (volumes, stop) = (volumes.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (v, offset) = place(k);
                let fill = (k as u32 + 1).to_le_bytes().repeat(1024);
                volumes[v as usize].write(offset, &fill, false).unwrap();
                k += 1;
            }
        })
    };
    let mut cuts = Vec::new();
    for round in 0..12 {
        let spec = SnapshotSpec {
            name: format!("s{round}"),
            checkpoint: Some(format!("c{round}")),
            ..SnapshotSpec::default()
        };
        let requests: Vec<(&Volume, SnapshotSpec)> =
            volumes.iter().map(|v| (&**v, spec.clone())).collect();
        let group = Volume::snapshot_group(&requests).unwrap();
        // What each block holds: the number of the last write to it, 0 for none.
        let mut block = vec![0u8; 4096];
        let mut held = BTreeMap::new();
        for v in 0..VOLUMES {
            for b in 0..BLOCKS {
                group.snapshots[v as usize]
                    .read(b * 4096, &mut block)
                    .unwrap();
                let n = u32::from_le_bytes(block[..4].try_into().unwrap());
                assert!(
                    block.chunks(4).all(|w| w == n.to_le_bytes()),
                    "round {round}: a torn block"
                );
                held.insert((v, b * 4096), u64::from(n));
            }
        }
        // The cut: the last write in the snapshot. Every block must hold exactly the
        // last write to it at or before the cut.
        let cut = held.values().copied().max().unwrap_or(0);
        let mut expected: BTreeMap<(u64, u64), u64> = held.keys().map(|&p| (p, 0)).collect();
        for k in 0..cut {
            expected.insert(place(k), k + 1);
        }
        assert_eq!(
            held, expected,
            "round {round}: not the state after write {cut}"
        );
        cuts.push(cut);
        for v in &volumes {
            v.drop_snapshot(&spec.name).unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        cuts.windows(2).all(|w| w[0] <= w[1]),
        "cuts go back: {cuts:?}"
    );
    let mut distinct = cuts.clone();
    distinct.dedup();
    assert!(
        distinct.len() > 1,
        "the writer did not run during the snapshots: {cuts:?}"
    );
}

/// A thread writing `data` at `offset` of `vol` that stops at the write path's `hook`:
/// the test and the writer meet at the returned barrier once when the writer arrives
/// there, and once more to let it go on.
fn parked_writer(
    vol: &Arc<Volume>,
    hook: &'static std::thread::LocalKey<data::WriteHook>,
    offset: u64,
    data: Vec<u8>,
) -> (std::thread::JoinHandle<()>, Arc<std::sync::Barrier>) {
    let meet = Arc::new(std::sync::Barrier::new(2));
    let (vol, parked) = (vol.clone(), meet.clone());
    let writer = std::thread::spawn(move || {
        hook.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move || {
                parked.wait();
                parked.wait();
            }));
        });
        vol.write(offset, &data, false).unwrap();
    });
    (writer, meet)
}

/// The gates of a group close at once: while a write in flight holds the last volume's
/// gate (its drain), the first volume's gate is already held (a reader of it waits),
/// rather than the group closing one gate after the other.
#[test]
fn a_group_closes_every_gate_while_one_volume_still_drains() {
    let fx = Fixture::new();
    let a = Arc::new(fx.volume("a", 1 << 20, small(65536)));
    let b = Arc::new(fx.volume("b", 1 << 20, small(65536)));
    let (writer, meet) = parked_writer(&b, &data::BEFORE_DATA_WRITE, 0, vec![1; 4096]);
    meet.wait();
    let group = {
        let (a, b) = (a.clone(), b.clone());
        std::thread::spawn(move || {
            let spec = SnapshotSpec {
                name: "s".into(),
                ..SnapshotSpec::default()
            };
            Volume::snapshot_group(&[(&a, spec.clone()), (&b, spec)])
                .unwrap()
                .snapshots
                .len()
        })
    };
    // A reader of a that does not get through means a's gate is held while b's write
    // is still parked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let blocked = loop {
        let (done, finished) = std::sync::mpsc::channel();
        let a = a.clone();
        let probe = std::thread::spawn(move || {
            let _ = a.snapshots();
            let _ = done.send(());
        });
        if finished
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err()
        {
            break probe;
        }
        probe.join().unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "a's gate was not closed while b was still draining"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    meet.wait();
    writer.join().unwrap();
    assert_eq!(group.join().unwrap(), 2);
    blocked.join().unwrap();
}

/// Writes wait for their bit syncs with the write gate open, so a pause does not wait for
/// them and can run between a write's marking and its data write. Such a write must still
/// preserve its block for the snapshot taken in that pause and be in the new
/// checkpoint's bitmap, also after a reopen.
#[test]
fn a_write_whose_bit_sync_straddles_a_pause_is_in_the_new_checkpoint_not_the_snapshot() {
    let fx = Fixture::new();
    let vol = Arc::new(fx.volume("v", 1 << 20, small(65536)));
    vol.write(0, &[1; 65536], false).unwrap();
    vol.checkpoint_create("a").unwrap();
    // Block 0's first write since "a": its bit is synced, then it waits.
    let (writer, meet) = parked_writer(&vol, &data::AFTER_BIT_SYNC, 0, vec![2; 65536]);
    meet.wait();
    let (done, taken) = std::sync::mpsc::channel();
    {
        let vol = vol.clone();
        std::thread::spawn(move || {
            let snapshot = vol.snapshot(SnapshotSpec {
                name: "s".into(),
                checkpoint: Some("b".into()),
                ..SnapshotSpec::default()
            });
            let _ = done.send(snapshot);
        });
    }
    let (snap, _) = taken
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the pause waited for a write's bit sync")
        .unwrap();
    let mut back = vec![0u8; 65536];
    snap.read(0, &mut back).unwrap();
    assert!(
        back == [1; 65536],
        "the snapshot holds a write that came after it"
    );
    meet.wait();
    writer.join().unwrap();
    snap.read(0, &mut back).unwrap();
    assert!(
        back == [1; 65536],
        "the snapshot changed: the block was not preserved"
    );
    vol.read(0, &mut back).unwrap();
    assert!(back == [2; 65536]);
    assert_eq!(vol.changed_extents("b").unwrap(), vec![0..65536]);
    assert_eq!(vol.changed_extents("a").unwrap(), vec![0..65536]);
    drop(snap);
    let state = fx.state();
    drop(Arc::try_unwrap(vol).unwrap());
    let vol = Volume::open(&state, "v").unwrap();
    assert_eq!(vol.changed_extents("b").unwrap(), vec![0..65536]);
}

/// Durable mode: the pause renames the next chain into place and leaves its directory
/// sync to after the pause. No write after the pause reaches the volume before that
/// sync succeeded: with the sync failing, the checkpoint's finish reports it and the
/// write fails without touching the volume; once it succeeds the write goes through and
/// the checkpoint survives a reopen.
#[test]
fn no_write_after_a_checkpoint_reaches_the_volume_before_its_chain_is_synced() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 1 << 20, small(65536));
    vol.checkpoint_create("a").unwrap();
    vol.write(0, &[1; 4096], false).unwrap();
    {
        let _armed = crate::failpoint::arm("tracking.dir_sync");
        vol.checkpoint_create("b").unwrap();
        assert!(vol
            .status()
            .events
            .iter()
            .any(|e| e.message.contains("checkpoint chain naming it")));
        let err = vol.write(65536, &[2; 4096], false).unwrap_err();
        assert!(
            error::chain(&err).contains("injected failure"),
            "{}",
            error::chain(&err)
        );
        let mut back = [9u8; 4096];
        vol.read(65536, &mut back).unwrap();
        assert_eq!(back, [0; 4096], "the data write was issued");
    }
    vol.write(65536, &[2; 4096], false).unwrap();
    assert_eq!(vol.changed_extents("b").unwrap(), vec![65536..131072]);
    let state = fx.state();
    drop(vol);
    let vol = Volume::open(&state, "v").unwrap();
    assert_eq!(vol.changed_extents("a").unwrap(), vec![0..131072]);
    assert_eq!(vol.changed_extents("b").unwrap(), vec![65536..131072]);
}

#[test]
fn cow_limit_fails_the_snapshot_not_the_volume() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 4 << 20, small(65536));
    vol.write(0, &pattern(3, 4 << 20), false).unwrap();
    let (snap, _) = vol.snapshot(limited(256 << 10)).unwrap();
    let new = pattern(4, 4 << 20);
    vol.write(0, &new, false).unwrap();
    let mut back = vec![0u8; 4 << 20];
    vol.read(0, &mut back).unwrap();
    assert!(back == new, "the volume must hold exactly the new data");
    let err = snap.read(0, &mut back[..4096]).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    let status = vol.status();
    assert_eq!(status.snapshots[0].state, SnapshotState::Failed);
    assert!(status
        .events
        .iter()
        .any(|e| e.message.contains("snapshot s failed")));
    vol.drop_snapshot("s").unwrap();
}

/// First writes over holes copy nothing, so they need no COW space: a 64 KiB store
/// takes a whole sparse volume being written, and the snapshot still reads zeroes.
#[test]
fn first_writes_over_holes_need_no_cow_space() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 4 << 20, small(65536));
    let (snap, _) = vol.snapshot(limited(64 << 10)).unwrap();
    vol.write(0, &pattern(6, 4 << 20), false).unwrap();
    snap.wait_idle();
    assert_eq!(snap.status().state, SnapshotState::Active);
    assert_eq!(snap.status().cow_bytes_used, 0);
    let mut back = vec![1u8; 4 << 20];
    snap.read(0, &mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "the snapshot's holes read as zeroes"
    );
}

#[test]
fn trimming_the_snapshot_releases_cow_space_and_later_copies() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 1 << 20, small(65536));
    vol.write(0, &pattern(5, 1 << 20), false).unwrap();
    let (snap, _) = vol
        .snapshot(SnapshotSpec {
            name: "s".into(),
            ..SnapshotSpec::default()
        })
        .unwrap();
    vol.write(0, &[1; 131072], false).unwrap();
    assert_eq!(snap.status().cow_bytes_used, 131072);
    snap.release(0, 1 << 20).unwrap();
    snap.wait_idle();
    assert_eq!(snap.status().cow_bytes_used, 0);
    let copies = snap.copies();
    vol.write(65536 * 5, &[1; 4096], false).unwrap();
    snap.wait_idle();
    assert_eq!(snap.copies(), copies, "released chunks need no copy");
}

/// A snapshot's allocation asked for in capped pieces (each starting where the previous
/// one ended, as an NBD client does) is the allocation asked for whole, whatever the cap;
/// and every hole it reports reads as zeroes.
#[test]
fn snapshot_allocation_in_capped_pieces_is_the_whole_allocation() {
    const SIZE: u64 = 8 << 20;
    let fx = Fixture::new();
    let vol = fx.volume("v", SIZE, small(65536));
    // Data islands not aligned to chunks, and one run across several chunks.
    for i in 0..40u64 {
        vol.write(
            i * 200 * 1024 + (i % 3) * 4096,
            &pattern(i as u8, 4096),
            false,
        )
        .unwrap();
    }
    vol.write(5 << 20, &pattern(9, 192 << 10), false).unwrap();
    let (snap, _) = vol
        .snapshot(SnapshotSpec {
            name: "s".into(),
            ..SnapshotSpec::default()
        })
        .unwrap();
    // Preserved chunks (over data), zero chunks (over holes), released chunks.
    for chunk in [0u64, 3, 4, 17, 33, 80, 81, 82, 90, 127] {
        vol.write(chunk * 65536 + 8192, &[0xee; 4096], false)
            .unwrap();
    }
    snap.release(60 * 65536, 12 * 65536).unwrap();
    snap.wait_idle();
    let whole = snap.allocation(0, SIZE).unwrap();
    assert_eq!(whole.iter().map(|r| r.0).sum::<u64>(), SIZE);
    assert!(whole.len() > 40, "{whole:?}");
    for cap in [1usize, 2, 3, 7, 64] {
        let mut pieces: Vec<(u64, bool)> = Vec::new();
        let mut pos = 0;
        while pos < SIZE {
            let runs = snap.allocation_capped(pos, SIZE - pos, cap).unwrap();
            assert!(!runs.is_empty() && runs.len() <= cap, "cap {cap}: {runs:?}");
            for (len, hole) in runs {
                pos += len;
                match pieces.last_mut() {
                    Some((l, h)) if *h == hole => *l += len,
                    _ => pieces.push((len, hole)),
                }
            }
        }
        assert_eq!(pieces, whole, "cap {cap}");
    }
    let mut pos = 0;
    for (len, hole) in whole {
        if hole {
            let mut buf = vec![1u8; len as usize];
            snap.read(pos, &mut buf).unwrap();
            assert!(
                buf.iter().all(|&b| b == 0),
                "hole at {pos}+{len} holds data"
            );
        }
        pos += len;
    }
    vol.drop_snapshot("s").unwrap();
}

#[test]
fn many_writers_and_snapshot_readers_on_the_same_chunks() {
    let fx = Fixture::new();
    const SIZE: u64 = 1 << 20;
    let vol = Arc::new(fx.volume("v", SIZE, small(65536)));
    let original = pattern(7, SIZE as usize);
    vol.write(0, &original, false).unwrap();
    vol.checkpoint_create("c").unwrap();
    let (snap, _) = vol
        .snapshot(SnapshotSpec {
            name: "s".into(),
            ..SnapshotSpec::default()
        })
        .unwrap();
    let writers: Vec<_> = (0..6u64)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                for i in 0..150u64 {
                    // Offsets collide across threads on purpose; sizes straddle chunks.
                    let offset = ((i * 7919 + t * 104_729) % (SIZE / 512 - 300)) * 512;
                    let len = [512usize, 4096, 70_000, 131_072][(i % 4) as usize];
                    vol.write(offset, &vec![t as u8 + 1; len], false).unwrap();
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..3u64)
        .map(|t| {
            let snap = snap.clone();
            let original = original.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 200_000];
                for i in 0..100u64 {
                    let offset = ((i * 31 + t * 977) * 4096) % (SIZE - buf.len() as u64);
                    snap.read(offset, &mut buf).unwrap();
                    assert!(buf[..] == original[offset as usize..offset as usize + buf.len()]);
                }
            })
        })
        .collect();
    for h in writers.into_iter().chain(readers) {
        h.join().unwrap();
    }
    let mut back = vec![0u8; SIZE as usize];
    snap.read(0, &mut back).unwrap();
    assert!(back == original);
}

/// A first write preserves only the 4 KiB blocks it covers, in the store's log; later
/// writes to other blocks of the chunk preserve theirs in the chunk's 64 KiB slot, and the
/// snapshot reads each block from wherever its old contents are (memory, the log run, the
/// slot, the volume).
#[test]
fn a_first_write_preserves_only_the_blocks_it_covers() {
    let fx = Fixture::new();
    let vol = fx.volume("v", 1 << 20, small(65536));
    let original = pattern(11, 1 << 20);
    vol.write(0, &original, false).unwrap();
    let (snap, _) = vol
        .snapshot(SnapshotSpec {
            name: "s".into(),
            ..SnapshotSpec::default()
        })
        .unwrap();
    assert_eq!(snap.chunk_size(), 65536);
    let chunk = 65536u64;
    let check = |what: &str| {
        let mut back = vec![0u8; 3 * chunk as usize];
        snap.read(0, &mut back).unwrap();
        assert!(
            back == original[..back.len()],
            "{what}: snapshot content changed"
        );
        // Unaligned reads that start and end inside blocks.
        let mut part = vec![0u8; 70_001];
        snap.read(chunk - 5, &mut part).unwrap();
        let from = chunk as usize - 5;
        assert!(
            part == original[from..from + part.len()],
            "{what}: unaligned read"
        );
    };
    vol.write(chunk + 8192, &[1; 4096], false).unwrap();
    check("block 2 in memory or stored");
    snap.wait_idle();
    assert_eq!(snap.copied_bytes(), 4096);
    assert_eq!(snap.status().cow_bytes_used, 4096, "one block in the log");
    // Another block of the same chunk, a partial one and a write across two chunks.
    vol.write(chunk + 40_960, &[2; 4096], false).unwrap();
    vol.write(chunk + 1000, &[3; 100], false).unwrap();
    vol.write(2 * chunk - 4096, &[4; 8192], false).unwrap();
    check("four more blocks");
    snap.wait_idle();
    assert_eq!(snap.copied_bytes(), 5 * 4096);
    // Chunk 1's later blocks took its slot; chunk 2's first block went to the log.
    assert_eq!(snap.status().cow_bytes_used, 4096 + chunk + 4096);
    // Rewrites copy nothing more.
    vol.write(chunk + 8192, &[5; 4096], false).unwrap();
    vol.write(chunk, &[6; 4096], false).unwrap();
    snap.wait_idle();
    assert_eq!(snap.copied_bytes(), 5 * 4096);
    check("rewrites");
    // Preserved or not, the blocks are data in the snapshot's allocation.
    assert_eq!(snap.allocation(0, 1 << 20).unwrap(), vec![(1 << 20, false)]);
}

/// Writers race on distinct 4 KiB blocks of the same 64 KiB chunks (each block first
/// written while its neighbours are being preserved, stored, or still only in the volume)
/// while readers read whole and partial chunks: every read sees the old contents, every
/// block is copied exactly once, and the volume ends with the last write of each block.
#[test]
fn writers_on_other_blocks_of_a_chunk_race_snapshot_readers() {
    let fx = Fixture::new();
    const SIZE: u64 = 2 << 20;
    const THREADS: u64 = 4;
    let vol = Arc::new(fx.volume("v", SIZE, small(65536)));
    let original = pattern(13, SIZE as usize);
    vol.write(0, &original, false).unwrap();
    let (snap, _) = vol
        .snapshot(SnapshotSpec {
            name: "s".into(),
            ..SnapshotSpec::default()
        })
        .unwrap();
    let blocks = SIZE / 4096;
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                // Thread t owns the blocks b with b % THREADS == t, visited in a scattered
                // order, twice.
                let mine: Vec<u64> = (0..blocks / THREADS)
                    .map(|i| ((i * 97 + t * 13) % (blocks / THREADS)) * THREADS + t)
                    .collect();
                for pass in 0..2u8 {
                    for &b in &mine {
                        vol.write(b * 4096, &[t as u8 + 10 * pass + 1; 4096], false)
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..3u64)
        .map(|t| {
            let snap = snap.clone();
            let original = original.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let len = [4096usize, 65536, 100_000, 3000][(i % 4) as usize];
                    let offset = ((i * 7919 + t * 104_729) * 512) % (SIZE - len as u64);
                    let mut buf = vec![0u8; len];
                    snap.read(offset, &mut buf).unwrap();
                    assert!(buf[..] == original[offset as usize..offset as usize + len]);
                }
            })
        })
        .collect();
    for h in writers.into_iter().chain(readers) {
        h.join().unwrap();
    }
    snap.wait_idle();
    assert_eq!(snap.copied_bytes(), SIZE, "every block copied exactly once");
    let mut back = vec![0u8; SIZE as usize];
    snap.read(0, &mut back).unwrap();
    assert!(back == original);
    vol.read(0, &mut back).unwrap();
    for (b, block) in back.chunks(4096).enumerate() {
        let want = (b as u64 % THREADS) as u8 + 11;
        assert!(block.iter().all(|&x| x == want), "volume block {b}");
    }
}

// ---- the model-based property test ----

const MODEL_SIZE: u64 = 256 << 10;
const MODEL_GRAN: u32 = 4096;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    CheckpointCreate,
    CheckpointDelete(usize),
    SnapshotCreate {
        since: Option<usize>,
        checkpoint: bool,
        /// 64 KiB COW chunks (most writes then cover part of a chunk) instead of 8 KiB.
        big_chunks: bool,
    },
    SnapshotRead {
        which: usize,
        offset: u64,
        len: u64,
    },
    SnapshotRelease(usize),
    SnapshotDrop(usize),
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..MODEL_SIZE, 1..40_000u64).prop_map(|(o, l)| (o, l.min(MODEL_SIZE - o).max(1)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        1 => range().prop_map(|(offset, len)| Op::Zero { offset, len }),
        1 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        2 => Just(Op::CheckpointCreate),
        1 => (0..4usize).prop_map(Op::CheckpointDelete),
        2 => (prop::option::of(0..4usize), any::<bool>(), any::<bool>())
            .prop_map(|(since, checkpoint, big_chunks)| Op::SnapshotCreate { since, checkpoint, big_chunks }),
        3 => (0..3usize, range()).prop_map(|(which, (offset, len))| Op::SnapshotRead { which, offset, len }),
        1 => (0..3usize).prop_map(Op::SnapshotRelease),
        1 => (0..3usize).prop_map(Op::SnapshotDrop),
        1 => Just(Op::Reopen),
    ]
}

/// A checkpoint in the model: the blocks touched since it was created.
struct ModelCheckpoint {
    name: String,
    touched: Vec<bool>,
}

struct ModelSnapshot {
    name: String,
    content: Vec<u8>,
    bitmap: Option<(String, Vec<bool>)>,
    /// COW chunk size.
    chunk: usize,
    /// Per chunk: released by a TRIM on the snapshot (its content is unspecified).
    released: Vec<bool>,
    /// Per 4 KiB block: written since the snapshot (copy-before-write may copy it once).
    written: Vec<bool>,
}

/// Mark the 4 KiB blocks of `[offset, offset + len)` written in every snapshot.
fn written(snapshots: &mut [ModelSnapshot], offset: u64, len: u64) {
    for s in snapshots {
        for b in offset / 4096..(offset + len).div_ceil(4096) {
            s.written[b as usize] = true;
        }
    }
}

fn touch(checkpoints: &mut [ModelCheckpoint], offset: u64, len: u64) {
    let blocks = crate::tracking::blocks_of(offset, len, MODEL_GRAN);
    for c in checkpoints {
        for b in blocks.clone() {
            c.touched[b as usize] = true;
        }
    }
}

fn expected_extents(touched: &[bool]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let g = u64::from(MODEL_GRAN);
    for (b, _) in touched.iter().enumerate().filter(|(_, t)| **t) {
        let r = b as u64 * g..((b as u64 + 1) * g).min(MODEL_SIZE);
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

fn run_model(ops: Vec<Op>) {
    let fx = Fixture::new();
    let mut vol = Some(fx.volume("m", MODEL_SIZE, small(MODEL_GRAN)));
    let mut disk = vec![0u8; MODEL_SIZE as usize];
    let mut checkpoints: Vec<ModelCheckpoint> = Vec::new();
    let mut snapshots: Vec<ModelSnapshot> = Vec::new();
    let mut snapshot_handles: BTreeMap<String, Snapshot> = BTreeMap::new();
    let mut counter = 0;
    let blocks = MODEL_SIZE.div_ceil(u64::from(MODEL_GRAN)) as usize;
    for op in ops {
        let v = vol.as_ref().unwrap();
        counter += 1;
        match op {
            Op::Write { offset, len, seed } => {
                let data = pattern(seed, len as usize);
                v.write(offset, &data, false).unwrap();
                disk[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                touch(&mut checkpoints, offset, len);
                written(&mut snapshots, offset, len);
            }
            Op::Zero { offset, len } => {
                v.write_zeroes(offset, len, counter % 2 == 0, false)
                    .unwrap();
                disk[offset as usize..(offset + len) as usize].fill(0);
                touch(&mut checkpoints, offset, len);
                written(&mut snapshots, offset, len);
            }
            Op::Trim { offset, len } => {
                // A file backing punches a hole: trimmed bytes read as zeroes.
                v.trim(offset, len, false).unwrap();
                disk[offset as usize..(offset + len) as usize].fill(0);
                touch(&mut checkpoints, offset, len);
                written(&mut snapshots, offset, len);
            }
            Op::CheckpointCreate => {
                let name = format!("c{counter}");
                v.checkpoint_create(&name).unwrap();
                checkpoints.push(ModelCheckpoint {
                    name,
                    touched: vec![false; blocks],
                });
            }
            Op::CheckpointDelete(i) => {
                if i < checkpoints.len() {
                    let c = checkpoints.remove(i);
                    v.checkpoint_delete(&c.name).unwrap();
                }
            }
            Op::SnapshotCreate {
                since,
                checkpoint,
                big_chunks,
            } => {
                let chunk = if big_chunks { 65536 } else { 8192 };
                let name = format!("s{counter}");
                let since = since.filter(|&i| i < checkpoints.len());
                let spec = SnapshotSpec {
                    name: name.clone(),
                    checkpoint: checkpoint.then(|| format!("k{counter}")),
                    since: since.map(|i| checkpoints[i].name.clone()),
                    cow: CowOptions {
                        chunk_size: Some(chunk as u32),
                        ..CowOptions::default()
                    },
                };
                let (snap, _) = v.snapshot(spec).unwrap();
                let bitmap =
                    since.map(|i| (checkpoints[i].name.clone(), checkpoints[i].touched.clone()));
                if checkpoint {
                    checkpoints.push(ModelCheckpoint {
                        name: format!("k{counter}"),
                        touched: vec![false; blocks],
                    });
                }
                snapshots.push(ModelSnapshot {
                    name: name.clone(),
                    content: disk.clone(),
                    bitmap,
                    chunk,
                    released: vec![false; MODEL_SIZE.div_ceil(chunk as u64) as usize],
                    written: vec![false; MODEL_SIZE.div_ceil(4096) as usize],
                });
                snapshot_handles.insert(name, snap);
            }
            Op::SnapshotRead { which, offset, len } => {
                if let Some(s) = snapshots.get(which) {
                    let mut buf = vec![0u8; len as usize];
                    let snap = &snapshot_handles[&s.name];
                    snap.read(offset, &mut buf).unwrap();
                    for (i, (got, want)) in
                        buf.iter().zip(&s.content[offset as usize..]).enumerate()
                    {
                        let pos = offset as usize + i;
                        if !s.released[pos / s.chunk] {
                            assert_eq!(got, want, "snapshot {} byte {pos}", s.name);
                        }
                    }
                    // Copies are made at the writes' size, each block at most once.
                    snap.wait_idle();
                    let written = s.written.iter().filter(|w| **w).count() as u64;
                    assert!(
                        snap.copied_bytes() <= written * 4096,
                        "snapshot {} copied {} bytes for {written} blocks written",
                        s.name,
                        snap.copied_bytes()
                    );
                    if let Some((name, touched)) = &s.bitmap {
                        let snap = &snapshot_handles[&s.name];
                        let bitmap = snap.dirty_bitmap().unwrap();
                        assert_eq!(bitmap.name(), name);
                        assert_eq!(bitmap.changed_extents(), expected_extents(touched));
                    }
                }
            }
            Op::SnapshotRelease(which) => {
                if let Some(s) = snapshots.get_mut(which) {
                    // Release the first half; chunks wholly inside it are unspecified now.
                    let end = MODEL_SIZE / 2;
                    snapshot_handles[&s.name].release(0, end).unwrap();
                    for c in 0..end as usize / s.chunk {
                        s.released[c] = true;
                    }
                }
            }
            Op::SnapshotDrop(which) => {
                if which < snapshots.len() {
                    let s = snapshots.remove(which);
                    v.drop_snapshot(&s.name).unwrap();
                    snapshot_handles.remove(&s.name);
                }
            }
            Op::Reopen => {
                vol.take().unwrap().close().unwrap();
                // Snapshots do not survive a stop.
                snapshots.clear();
                snapshot_handles.clear();
                vol = Some(Volume::open(&fx.state(), "m").unwrap());
            }
        }
        let v = vol.as_ref().unwrap();
        for c in &checkpoints {
            assert_eq!(
                v.changed_extents(&c.name).unwrap(),
                expected_extents(&c.touched),
                "since {}",
                c.name
            );
        }
    }
    let v = vol.as_ref().unwrap();
    let mut back = vec![0u8; MODEL_SIZE as usize];
    v.read(0, &mut back).unwrap();
    assert!(back == disk, "volume content differs from the model");
    let names: Vec<String> = v.checkpoints().into_iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        checkpoints
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn volume_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        run_model(ops);
    }
}

/// A tmpfs of a few hundred KiB, unmounted on drop.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(size: &str) -> TinyFs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tidemark-test",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount (the engine tests need root for a tiny tmpfs)");
        assert!(
            status.success(),
            "mount a tmpfs (the engine tests need root): {status}"
        );
        TinyFs { dir }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn cow_store_on_a_full_filesystem_fails_the_snapshot_cleanly() {
    let fx = Fixture::new();
    let tiny = TinyFs::mount("512k");
    let vol = fx.volume("v", 8 << 20, small(65536));
    let old = pattern(11, 8 << 20);
    vol.write(0, &old, false).unwrap();
    vol.checkpoint_create("c").unwrap();
    let spec = SnapshotSpec {
        name: "s".into(),
        cow: CowOptions {
            path: Some(tiny.dir.path().join("s.cow")),
            ..CowOptions::default()
        },
        ..SnapshotSpec::default()
    };
    let (snap, _) = vol.snapshot(spec).unwrap();
    // The first chunks fit: the snapshot serves them.
    vol.write(0, &[1; 65536], false).unwrap();
    let mut buf = vec![0u8; 65536];
    snap.read(0, &mut buf).unwrap();
    assert!(buf[..] == old[..65536]);
    // Then the store fills up: the snapshot fails, every write still lands.
    let new = pattern(12, 8 << 20);
    for (i, chunk) in new.chunks(1 << 20).enumerate() {
        vol.write(i as u64 * (1 << 20), chunk, false).unwrap();
    }
    let mut back = vec![0u8; 8 << 20];
    vol.read(0, &mut back).unwrap();
    assert!(back == new, "the volume must hold exactly what was written");
    let err = snap.read(0, &mut buf).unwrap_err();
    assert!(matches!(err, SnapshotError::Failed { .. }), "{err}");
    assert!(err.to_string().contains("full"), "{err}");
    let status = vol.status();
    assert_eq!(status.snapshots[0].state, SnapshotState::Failed);
    assert!(status
        .events
        .iter()
        .any(|e| e.level == crate::status::EventLevel::Error));
    assert_eq!(vol.changed_extents("c").unwrap(), vec![0..8 << 20]);
    vol.drop_snapshot("s").unwrap();
    assert!(!tiny.dir.path().join("s.cow").exists());
    // Writes after the drop need no COW store at all.
    vol.write(0, &[2; 4096], true).unwrap();
}
