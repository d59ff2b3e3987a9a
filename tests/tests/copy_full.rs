//! `tidemark copy` end to end: exact, thin, onto a block device, with either engine.

#![allow(clippy::single_range_in_vec_init)] // extents really are lists of ranges

use tidemark_tests::image::{allocated, cmp_equal, random_image, MIB};
use tidemark_tests::paths::{p, scratch};
use tidemark_tests::peers::LoopDevice;
use tidemark_tests::{tidemark, COMMAND_LIMIT};

#[test]
fn copy_makes_an_identical_thin_image() {
    let dir = scratch();
    let (src, dst) = (p(&dir, "src"), p(&dir, "dst"));
    let size = 256 * MIB + 4096 + 100;
    random_image(
        &src,
        size,
        &[0..3 * MIB, 100 * MIB..101 * MIB, 256 * MIB..size],
        &[40 * MIB..60 * MIB],
        1,
    );
    let out = tidemark(&["copy", "--json", &src, &dst], COMMAND_LIMIT).ok();
    assert!(
        out.stderr.is_empty(),
        "piped runs stay quiet: {:?}",
        out.stderr
    );
    let report = out.json();
    assert!(cmp_equal(&src, &dst, None).expect("cmp runs"));
    assert_eq!(
        report["bytes_copied"],
        3 * MIB + MIB + 4096 + 100,
        "{report}"
    );
    assert_eq!(report["bytes_skipped_zero"], 20 * MIB, "{report}");
    assert!(
        report["bytes_skipped_holes"].as_u64().unwrap() > 200 * MIB,
        "{report}"
    );
    assert_eq!(report["failed_extents"].as_array().unwrap().len(), 0);
    assert!(
        report["seconds"].as_f64().unwrap() > 0.0 && report["mb_per_sec"].as_f64().unwrap() > 0.0
    );
    // Thin stays thin: the 20 MiB of written zeros and the holes are not allocated.
    assert!(
        allocated(&dst) <= 6 * MIB,
        "{} bytes allocated",
        allocated(&dst)
    );
}

#[test]
fn the_thread_pool_engine_makes_the_same_image() {
    let dir = scratch();
    let (src, a, b) = (p(&dir, "src"), p(&dir, "a"), p(&dir, "b"));
    random_image(&src, 48 * MIB, &[MIB..30 * MIB], &[], 2);
    let uring = tidemark(
        &["copy", "--json", "--engine", "uring", &src, &a],
        COMMAND_LIMIT,
    )
    .ok()
    .json();
    let threads = tidemark(
        &[
            "copy",
            "--json",
            "--engine",
            "threads",
            "--queue-depth",
            "4",
            &src,
            &b,
        ],
        COMMAND_LIMIT,
    )
    .ok()
    .json();
    assert_eq!(uring["engine"], "uring");
    assert_eq!(threads["engine"], "threads");
    assert!(
        cmp_equal(&src, &a, None).expect("cmp runs")
            && cmp_equal(&src, &b, None).expect("cmp runs")
    );
}

#[test]
fn copy_onto_a_block_device_zeroes_what_the_source_does_not_hold() {
    let dir = scratch();
    let (src, backing) = (p(&dir, "src"), p(&dir, "backing"));
    random_image(
        &src,
        40 * MIB,
        &[0..8 * MIB, 20 * MIB..24 * MIB],
        &[30 * MIB..32 * MIB],
        3,
    );
    // The device starts full of old data, which holes and zeros must not let through.
    random_image(&backing, 64 * MIB, &[0..64 * MIB], &[], 4);
    let device = LoopDevice::attach(&backing);
    let report = tidemark(&["copy", "--json", &src, &device.device], COMMAND_LIMIT)
        .ok()
        .json();
    assert!(
        report["bytes_zeroed"].as_u64().unwrap() >= 26 * MIB,
        "{report}"
    );
    assert!(cmp_equal(&src, &device.device, Some(40 * MIB)).expect("cmp runs"));
}

#[test]
fn a_bad_source_or_option_is_a_clear_error() {
    let dir = scratch();
    let out = tidemark(
        &["copy", "/nonexistent/disk.img", &p(&dir, "dst")],
        COMMAND_LIMIT,
    );
    assert_eq!(out.code(), 2);
    assert!(out.stderr.contains("/nonexistent/disk.img"), "{out:?}");
    let src = p(&dir, "src");
    random_image(&src, MIB, &[0..MIB], &[], 5);
    let out = tidemark(
        &["copy", "--block-size", "3000", &src, &p(&dir, "dst")],
        COMMAND_LIMIT,
    );
    assert_eq!(out.code(), 2);
    assert!(out.stderr.contains("multiple of 4K"), "{out:?}");
}
