//! Jobs against plain models: the destination must equal the source (or the source with
//! only the changed extents applied), holes must stay holes, failures must be named.

#![allow(clippy::single_range_in_vec_init)] // extents really are lists of ranges

use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};

use super::*;
use crate::io::{EngineChoice, EngineConfig};

const MIB: u64 = 1 << 20;

fn options(choice: EngineChoice) -> JobOptions {
    JobOptions {
        direct: true,
        engine: EngineConfig {
            choice,
            queue_depth: 8,
            buf_size: 256 << 10,
            ..EngineConfig::default()
        },
        progress: None,
    }
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

/// A sparse file: random data in `data` ranges, zeros written in `zeros`, holes elsewhere.
fn make_image(
    path: &Path,
    size: u64,
    data: &[Range<u64>],
    zeros: &[Range<u64>],
    seed: u64,
) -> Vec<u8> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];
    for range in data {
        let bytes = &mut model[range.start as usize..range.end as usize];
        rng.fill_bytes(bytes);
        file.write_all_at(bytes, range.start).unwrap();
    }
    for range in zeros {
        let zeros = vec![0u8; (range.end - range.start) as usize];
        model[range.start as usize..range.end as usize].fill(0);
        file.write_all_at(&zeros, range.start).unwrap();
    }
    model
}

/// Panics naming the first differing offset (not megabytes of bytes) unless equal.
fn assert_same(path: &Path, model: &[u8]) {
    let got = std::fs::read(path).unwrap();
    if got != model {
        let at = got
            .iter()
            .zip(model)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(model.len()));
        panic!(
            "{} differs from the model at offset {at} (sizes {} and {})",
            path.display(),
            got.len(),
            model.len()
        );
    }
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn copy_is_exact_and_keeps_thin_images_thin() {
    for choice in [EngineChoice::Uring, EngineChoice::Threads] {
        let dir = scratch();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let size = 64 * MIB + 1234;
        let model = make_image(
            &src,
            size,
            &[0..MIB, 10 * MIB..10 * MIB + 300_000, 64 * MIB..size],
            &[20 * MIB..30 * MIB],
            1,
        );
        let mut source = FileSource::open(&src, true).unwrap();
        let report = copy_image(&mut source, &dst, &options(choice)).unwrap();
        assert!(
            report.failed_extents.is_empty(),
            "{:?}",
            report.failed_extents
        );
        assert_same(&dst, &model);
        // The 10 MiB of written zeros and the holes are not allocated in the copy.
        assert!(
            allocated(&dst) < 3 * MIB,
            "{choice:?}: {} bytes allocated",
            allocated(&dst)
        );
        assert_eq!(report.bytes_skipped_zero, 10 * MIB, "{report:?}");
        assert!(report.bytes_skipped_holes > 40 * MIB, "{report:?}");
    }
}

#[test]
fn copying_again_over_a_dirty_destination_ends_correct() {
    let dir = scratch();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let model = make_image(&src, 8 * MIB, &[0..8 * MIB], &[], 2);
    // A destination left half-written (as after kill -9) with other bytes.
    make_image(&dst, 3 * MIB, &[0..3 * MIB], &[], 3);
    let report = copy_image(
        &mut FileSource::open(&src, true).unwrap(),
        &dst,
        &options(EngineChoice::Auto),
    )
    .unwrap();
    assert!(report.failed_extents.is_empty());
    assert_same(&dst, &model);
}

fn random_extents(rng: &mut impl Rng, size: u64, count: usize) -> Vec<Range<u64>> {
    (0..count)
        .map(|_| {
            let start = rng.gen_range(0..size);
            let len = rng.gen_range(1..=(size - start).min(3 * MIB));
            start..start + len
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// update-img writes the snapshot's bytes in the changed extents (widened to 4 KiB)
    /// and leaves every other byte of the image alone, with either engine.
    #[test]
    fn update_img_applies_exactly_the_changed_extents(seed in any::<u64>(), threads in any::<bool>()) {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let dir = scratch();
        let (snap, image) = (dir.path().join("snap"), dir.path().join("image"));
        let size = rng.gen_range(1..16 * MIB);
        let data = random_extents(&mut rng, size, 6);
        let zeros = random_extents(&mut rng, size, 2);
        let snap_model = make_image(&snap, size, &data, &zeros, seed);
        let mut image_model = make_image(&image, size, &[0..size], &[], seed ^ 1);
        let changed = random_extents(&mut rng, size, 10);
        for range in extents::normalize(changed.clone(), size) {
            let (s, e) = (range.start as usize, range.end as usize);
            image_model[s..e].copy_from_slice(&snap_model[s..e]);
        }
        let choice = if threads { EngineChoice::Threads } else { EngineChoice::Uring };
        let report = update_image(&mut FileSource::open(&snap, true).unwrap(), changed, &image, &options(choice)).unwrap();
        prop_assert!(report.failed_extents.is_empty());
        prop_assert!(std::fs::read(&image).unwrap() == image_model, "image differs from the model");
    }
}

/// A source held in memory whose reads fail in one range: the fault-injection double.
struct FaultySource {
    data: Vec<u8>,
    bad: Range<u64>,
}

impl Source for FaultySource {
    fn describe(&self) -> String {
        "faulty".into()
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn data_extents(&mut self, range: Range<u64>) -> Result<Vec<Range<u64>>, CopyError> {
        Ok(vec![range])
    }
    fn engine_file(&self) -> Option<(Arc<std::fs::File>, bool)> {
        None
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && self.bad.start < end {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf.copy_from_slice(&self.data[offset as usize..end as usize]);
        Ok(())
    }
}

#[test]
fn an_unreadable_range_is_reported_and_the_rest_is_copied() {
    let dir = scratch();
    let dst = dir.path().join("dst");
    let mut data = vec![0u8; 4 * MIB as usize];
    rand::rngs::SmallRng::seed_from_u64(4).fill_bytes(&mut data);
    let bad = 1_100_000..1_100_001;
    let mut source = FaultySource {
        data: data.clone(),
        bad: bad.clone(),
    };
    let report = copy_image(&mut source, &dst, &options(EngineChoice::Auto)).unwrap();
    assert_eq!(
        report.failed_extents.len(),
        1,
        "{:?}",
        report.failed_extents
    );
    let failed = &report.failed_extents[0];
    // Narrowed down to the one 4 KiB block holding the bad byte.
    assert_eq!(
        (failed.offset, failed.length),
        (bad.start / 4096 * 4096, 4096),
        "{failed}"
    );
    assert_eq!(failed.during, "reading");
    let copied = std::fs::read(&dst).unwrap();
    let (s, e) = (
        failed.offset as usize,
        (failed.offset + failed.length) as usize,
    );
    assert_eq!(copied[..s], data[..s]);
    assert_eq!(copied[e..], data[e..]);
}

#[test]
fn zero_blocks_are_punched_in_an_existing_image() {
    let dir = scratch();
    let (snap, image) = (dir.path().join("snap"), dir.path().join("image"));
    make_image(&snap, 8 * MIB, &[0..MIB], &[MIB..8 * MIB], 5);
    make_image(&image, 8 * MIB, &[0..8 * MIB], &[], 6);
    let report = update_image(
        &mut FileSource::open(&snap, true).unwrap(),
        vec![0..8 * MIB],
        &image,
        &options(EngineChoice::Auto),
    )
    .unwrap();
    assert_eq!(report.bytes_zeroed, 7 * MIB, "{report:?}");
    assert!(allocated(&image) < 2 * MIB);
    assert_eq!(
        std::fs::read(&image).unwrap(),
        std::fs::read(&snap).unwrap()
    );
}

fn pair(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join("a"), dir.join("b"));
    make_image(&a, size, &[0..size / 2], &[], 7);
    std::fs::copy(&a, &b).unwrap();
    (a, b)
}

#[test]
fn verify_finds_the_first_difference() {
    let dir = scratch();
    let (a, b) = pair(dir.path(), 8 * MIB);
    let open = |p: &Path| FileSource::open(p, true).unwrap();
    let same = verify_images(&mut open(&a), &mut open(&b), &options(EngineChoice::Auto)).unwrap();
    assert!(same.equal && same.first_difference.is_none());
    let file = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    file.write_all_at(&[0xff], 6 * MIB + 17).unwrap();
    file.write_all_at(&[0xff], 7 * MIB).unwrap();
    let differ = verify_images(&mut open(&a), &mut open(&b), &options(EngineChoice::Auto)).unwrap();
    assert!(!differ.equal);
    assert_eq!(differ.first_difference, Some(6 * MIB + 17));
    file.set_len(9 * MIB).unwrap();
    let longer = verify_images(
        &mut open(&a),
        &mut open(&a),
        &options(EngineChoice::Threads),
    )
    .unwrap();
    assert!(longer.equal);
}

mod deltas {
    use super::*;
    use crate::copy::delta::{create_delta, restore_chain, ChainBase, ChainSource};
    use tidemark_formats::delta::{CheckpointRef, DeltaHeader};

    fn header(size: u64, from: Option<(&str, u64)>, to: (&str, u64)) -> DeltaHeader {
        let checkpoint = |(name, generation): (&str, u64)| CheckpointRef {
            name: name.into(),
            generation,
        };
        DeltaHeader {
            volume_uuid: uuid::Uuid::from_u128(0x1234),
            volume_size: size,
            granularity: 65536,
            from: from.map(checkpoint),
            to: checkpoint(to),
            created_unix: 1,
        }
    }

    /// Day 0 full backup, then two days of changes: restoring the chain gives day 2.
    #[test]
    fn a_restored_chain_equals_the_last_day() {
        let dir = scratch();
        let p = |name: &str| dir.path().join(name);
        let size = 24 * MIB + 8192;
        let mut model = make_image(
            &p("vol"),
            size,
            &[0..4 * MIB, 9 * MIB..12 * MIB],
            &[5 * MIB..6 * MIB],
            10,
        );
        let opts = options(EngineChoice::Auto);
        let full = create_delta(
            &mut FileSource::open(&p("vol"), true).unwrap(),
            None,
            &header(size, None, ("d0", 1)),
            &p("d0"),
            1,
            &opts,
        )
        .unwrap();
        assert!(full.failed_extents.is_empty());
        assert!(
            full.file_bytes < 8 * MIB,
            "holes and zeros cost nothing: {full:?}"
        );
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let mut day = |name: &str, from: (&str, u64), to: (&str, u64), model: &mut Vec<u8>| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(p("vol"))
                .unwrap();
            let mut changed = Vec::new();
            for _ in 0..20 {
                let at = rng.gen_range(0..size / 65536) * 65536;
                let len = (65536 * rng.gen_range(1..4u64)).min(size - at);
                let mut bytes = vec![0u8; len as usize];
                if rng.gen_bool(0.8) {
                    rng.fill_bytes(&mut bytes);
                }
                file.write_all_at(&bytes, at).unwrap();
                model[at as usize..(at + len) as usize].copy_from_slice(&bytes);
                changed.push(at..at + len);
            }
            let report = create_delta(
                &mut FileSource::open(&p("vol"), true).unwrap(),
                Some(changed),
                &header(size, Some(from), to),
                &p(name),
                3,
                &opts,
            )
            .unwrap();
            assert!(report.failed_extents.is_empty());
        };
        day("d1", ("d0", 1), ("d1", 2), &mut model);
        day("d2", ("d1", 2), ("d2", 3), &mut model);
        assert_same(&p("vol"), &model);

        let chain = [p("d1"), p("d2")];
        let report =
            restore_chain(&ChainBase::Delta(p("d0")), &chain, &p("restored"), &opts).unwrap();
        assert!(
            report.failed_extents.is_empty(),
            "{:?}",
            report.failed_extents
        );
        assert_same(&p("restored"), &model);

        // Restoring over yesterday's image (an image base) gives the same.
        restore_chain(&ChainBase::Delta(p("d0")), &[], &p("day0"), &opts).unwrap();
        let report =
            restore_chain(&ChainBase::Image(p("day0")), &chain, &p("restored2"), &opts).unwrap();
        assert!(report.failed_extents.is_empty());
        assert_same(&p("restored2"), &model);

        // The chain read as a virtual image verifies against the volume.
        let mut virtual_image = ChainSource::open(&ChainBase::Delta(p("d0")), &chain).unwrap();
        let verdict = verify_images(
            &mut FileSource::open(&p("vol"), true).unwrap(),
            &mut virtual_image,
            &opts,
        )
        .unwrap();
        assert!(verdict.equal, "{verdict:?}");
    }

    #[test]
    fn a_chain_with_a_missing_link_is_refused_naming_the_break() {
        let dir = scratch();
        let p = |name: &str| dir.path().join(name);
        let size = 4 * MIB;
        make_image(&p("vol"), size, &[0..MIB], &[], 12);
        let opts = options(EngineChoice::Auto);
        let make = |name: &str, h: DeltaHeader| {
            create_delta(
                &mut FileSource::open(&p("vol"), true).unwrap(),
                Some(vec![0..65536]),
                &h,
                &p(name),
                1,
                &opts,
            )
            .unwrap();
        };
        make("d0", header(size, None, ("d0", 1)));
        make("d2", header(size, Some(("d1", 2)), ("d2", 3)));
        let err = restore_chain(&ChainBase::Delta(p("d0")), &[p("d2")], &p("out"), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chain break") && err.contains("\"d0\"") && err.contains("\"d1\""),
            "{err}"
        );
        assert!(
            !p("out").exists(),
            "nothing may be written before the chain is checked"
        );
        let mut other = header(size, Some(("d0", 1)), ("d1", 2));
        other.volume_uuid = uuid::Uuid::from_u128(0x999);
        make("other", other);
        let err = restore_chain(&ChainBase::Delta(p("d0")), &[p("other")], &p("out"), &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("volume"), "{err}");
        let err = restore_chain(&ChainBase::Delta(p("d2")), &[], &p("out"), &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("full backup"), "{err}");
    }

    #[test]
    fn a_delta_with_an_unreadable_range_is_not_published() {
        let dir = scratch();
        let out = dir.path().join("d0");
        let mut data = vec![0u8; 2 * MIB as usize];
        rand::rngs::SmallRng::seed_from_u64(13).fill_bytes(&mut data);
        let mut source = FaultySource {
            data,
            bad: 70_000..70_001,
        };
        let report = create_delta(
            &mut source,
            None,
            &header(2 * MIB, None, ("d0", 1)),
            &out,
            1,
            &options(EngineChoice::Auto),
        )
        .unwrap();
        assert_eq!(report.failed_extents.len(), 1);
        assert!(!out.exists());
        assert!(report.delta.ends_with(".partial"));
    }
}
