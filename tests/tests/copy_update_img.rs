//! `tidemark update-img` end to end: from a bitmap, a text list on stdin or a delta, the
//! image ends byte-identical to the snapshot (cmp); kill -9 and a rerun end correct.

#![allow(clippy::single_range_in_vec_init)] // extents really are lists of ranges

use std::ops::Range;
use std::time::Duration;

use tidemark_formats::bitmap::{set_dirty_range, write_bitmap_file, BitmapHeader, BitmapState};
use tidemark_tests::image::{cmp_equal, random_extents, random_image, scribble, text_list, MIB};
use tidemark_tests::paths::{p, scratch};
use tidemark_tests::{tidemark, tidemark_bin, tidemark_with_input, ChildGuard, COMMAND_LIMIT};

const SIZE: u64 = 96 * MIB;
const GRANULARITY: u64 = 65536;

/// Yesterday's image (a copy of the volume then) and today's snapshot, which differs from
/// it exactly in `changed` (some ranges rewritten with data, one zeroed).
fn day_pair(dir: &tempfile::TempDir, seed: u64) -> (String, String, Vec<Range<u64>>) {
    let (snap, image) = (p(dir, "snap"), p(dir, "image"));
    random_image(&snap, SIZE, &[0..40 * MIB, 60 * MIB..SIZE], &[], seed);
    tidemark(&["copy", &snap, &image], COMMAND_LIMIT).ok();
    let mut changed = random_extents(SIZE, 40, seed + 1);
    scribble(&snap, &changed, seed + 2);
    // A range that becomes zeros, and one in a hole that gains data.
    let zeroed = 10 * MIB..10 * MIB + 3 * GRANULARITY;
    let file = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &file,
        &vec![0u8; 3 * GRANULARITY as usize],
        zeroed.start,
    )
    .unwrap();
    changed.push(zeroed);
    let filled = 50 * MIB..50 * MIB + GRANULARITY;
    scribble(&snap, std::slice::from_ref(&filled), seed + 3);
    changed.push(filled);
    assert!(!cmp_equal(&snap, &image, None).expect("cmp runs"));
    (snap, image, changed)
}

fn write_bitmap(path: &str, changed: &[Range<u64>], state: BitmapState) {
    let mut header = BitmapHeader::new(
        uuid::Uuid::from_u128(7),
        "monday",
        GRANULARITY as u32,
        SIZE,
        3,
    )
    .unwrap();
    header.state = state;
    let mut words = vec![0u64; header.word_count()];
    for range in changed {
        set_dirty_range(
            &mut words,
            range.start / GRANULARITY..range.end.div_ceil(GRANULARITY),
        );
    }
    write_bitmap_file(path.as_ref(), &header, &words).unwrap();
}

#[test]
fn update_img_from_a_bitmap_makes_the_image_equal_the_snapshot() {
    let dir = scratch();
    let (snap, image, changed) = day_pair(&dir, 10);
    let bitmap = p(&dir, "changed.bitmap");
    write_bitmap(&bitmap, &changed, BitmapState::Clean);
    let report = tidemark(
        &["update-img", "--json", &snap, &bitmap, &image],
        COMMAND_LIMIT,
    )
    .ok()
    .json();
    assert!(cmp_equal(&snap, &image, None).expect("cmp runs"));
    let unchanged = report["bytes_unchanged"].as_u64().unwrap();
    assert!(
        unchanged > SIZE / 2 && unchanged < SIZE,
        "only the dirty blocks are copied: {report}"
    );
    assert!(
        report["bytes_zeroed"].as_u64().unwrap() >= 3 * GRANULARITY,
        "{report}"
    );
}

#[test]
fn update_img_reads_a_text_list_from_stdin() {
    let dir = scratch();
    let (snap, image, changed) = day_pair(&dir, 20);
    tidemark_with_input(
        &["update-img", &snap, "-", &image],
        text_list(&changed).as_bytes(),
        COMMAND_LIMIT,
    )
    .ok();
    assert!(cmp_equal(&snap, &image, None).expect("cmp runs"));
}

#[test]
fn update_img_takes_the_extents_of_a_delta_file() {
    let dir = scratch();
    let (snap, image, changed) = day_pair(&dir, 30);
    let list = p(&dir, "list");
    std::fs::write(&list, text_list(&changed)).unwrap();
    let delta = p(&dir, "tue.delta");
    let uuid = "00000000-0000-0000-0000-000000000007";
    tidemark(
        &[
            "delta",
            "create",
            "--from",
            &snap,
            "--changed",
            &list,
            "--volume-uuid",
            uuid,
            "--from-checkpoint",
            "mon:1",
            "--to-checkpoint",
            "tue",
            "--out",
            &delta,
        ],
        COMMAND_LIMIT,
    )
    .ok();
    tidemark(&["update-img", &snap, &delta, &image], COMMAND_LIMIT).ok();
    assert!(cmp_equal(&snap, &image, None).expect("cmp runs"));
}

#[test]
fn an_inconsistent_bitmap_is_refused() {
    let dir = scratch();
    let (snap, image, changed) = day_pair(&dir, 40);
    let bitmap = p(&dir, "changed.bitmap");
    write_bitmap(&bitmap, &changed, BitmapState::Inconsistent);
    let out = tidemark(&["update-img", &snap, &bitmap, &image], COMMAND_LIMIT);
    assert_eq!(out.code(), 2);
    assert!(
        out.stderr.contains("inconsistent") && out.stderr.contains("full copy"),
        "{out:?}"
    );
    let out = tidemark_with_input(
        &["update-img", &snap, "-", &image],
        b"12 x\n",
        COMMAND_LIMIT,
    );
    assert_eq!(out.code(), 2);
    assert!(out.stderr.contains("stdin: line 1"), "{out:?}");
}

#[test]
fn an_update_img_killed_midway_can_be_run_again() {
    let dir = scratch();
    let (snap, image, _) = day_pair(&dir, 50);
    // Everything changed, copied 4 KiB at a time with one request in flight: slow enough
    // to be killed half way.
    let list = format!("0 {SIZE}\n");
    let list_path = p(&dir, "all");
    std::fs::write(&list_path, list).unwrap();
    let slow = [
        "update-img",
        "--queue-depth",
        "1",
        "--block-size",
        "4K",
        "--engine",
        "threads",
        &snap,
        &list_path,
        &image,
    ];
    let child = std::process::Command::new(tidemark_bin())
        .args(slow)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard::new(child);
    std::thread::sleep(Duration::from_millis(300));
    let child = &mut *guard;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the slow run finished before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    drop(guard);
    assert!(
        !cmp_equal(&snap, &image, None).expect("cmp runs"),
        "the killed run left the image half updated"
    );
    tidemark(&["update-img", &snap, &list_path, &image], COMMAND_LIMIT).ok();
    assert!(cmp_equal(&snap, &image, None).expect("cmp runs"));
}

#[test]
fn an_extent_past_the_end_of_the_snapshot_is_refused_and_nothing_is_written() {
    let dir = scratch();
    let (snap, image, changed) = day_pair(&dir, 60);
    let before = std::fs::read(&image).unwrap();
    // A real change first, then one that lies past the end of the 96 MiB snapshot: the
    // wrong list (or the wrong snapshot). Clipping it would copy less than was asked.
    let past = 100 * MIB..100 * MIB + GRANULARITY;
    let mut list = changed.clone();
    list.push(past.clone());
    let out = tidemark_with_input(
        &["update-img", &snap, "-", &image],
        text_list(&list).as_bytes(),
        COMMAND_LIMIT,
    );
    assert_ne!(out.code(), 0, "{out:?}");
    for needed in [
        past.start.to_string(),
        GRANULARITY.to_string(),
        SIZE.to_string(),
    ] {
        assert!(
            out.stderr.contains(&needed),
            "names the extent and the sizes ({needed}): {out:?}"
        );
    }
    assert!(
        std::fs::read(&image).unwrap() == before,
        "update-img wrote nothing"
    );

    // An extent that starts inside and runs past the end is refused as well.
    let straddling = format!("{} {}\n", SIZE - GRANULARITY, 2 * GRANULARITY);
    let delta = p(&dir, "refused.delta");
    let out = tidemark_with_input(
        &[
            "delta",
            "create",
            "--from",
            &snap,
            "--changed",
            "-",
            "--volume-uuid",
            "00000000-0000-0000-0000-000000000007",
            "--from-checkpoint",
            "mon",
            "--to-checkpoint",
            "tue",
            "--out",
            &delta,
        ],
        straddling.as_bytes(),
        COMMAND_LIMIT,
    );
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains(&(SIZE - GRANULARITY).to_string())
            && out.stderr.contains(&SIZE.to_string()),
        "names the extent and the size: {out:?}"
    );
    assert!(
        !std::path::Path::new(&delta).exists(),
        "delta create wrote no file: {out:?}"
    );
}
