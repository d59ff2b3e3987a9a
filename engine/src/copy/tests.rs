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
        assert_eq!(std::fs::read(&dst).unwrap(), model, "{choice:?}");
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
    assert_eq!(std::fs::read(&dst).unwrap(), model);
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
    assert!(
        failed.offset <= bad.start && bad.end <= failed.offset + failed.length,
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
