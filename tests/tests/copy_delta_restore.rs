//! Deltas and restore end to end: a week of backups (a full delta, then incremental deltas
//! cut from dirty bitmaps) restores byte-identical to the volume (cmp); verify checks a
//! chain against an image; broken chains are refused naming the break.

#![allow(clippy::single_range_in_vec_init)] // extents really are lists of ranges

use std::ops::Range;
use std::time::Duration;

use tidemark_formats::bitmap::{set_dirty_range, write_bitmap_file, BitmapHeader};
use tidemark_tests::image::{cmp_equal, random_extents, random_image, scribble, MIB};
use tidemark_tests::paths::{p, scratch};
use tidemark_tests::{tidemark, tidemark_bin, tidemark_with_input, ChildGuard, COMMAND_LIMIT};

const SIZE: u64 = 64 * MIB;
const UUID: &str = "5a1e0000-0000-4000-8000-000000000001";

fn bitmap(path: &str, checkpoint: &str, generation: u64, changed: &[Range<u64>]) {
    let header =
        BitmapHeader::new(UUID.parse().unwrap(), checkpoint, 65536, SIZE, generation).unwrap();
    let mut words = vec![0u64; header.word_count()];
    for range in changed {
        set_dirty_range(&mut words, range.start / 65536..range.end.div_ceil(65536));
    }
    write_bitmap_file(path.as_ref(), &header, &words).unwrap();
}

/// The volume on Monday (full delta) and after Tuesday and Wednesday (incrementals), with
/// a snapshot copy of each day kept for comparison.
struct Week {
    dir: tempfile::TempDir,
}

impl Week {
    fn new() -> Week {
        let dir = scratch();
        let vol = p(&dir, "vol");
        random_image(&vol, SIZE, &[0..20 * MIB, 40 * MIB..48 * MIB], &[], 100);
        tidemark(
            &[
                "delta",
                "create",
                "--json",
                "--from",
                &vol,
                "--full",
                "--volume-uuid",
                UUID,
                "--to-checkpoint",
                "mon:1",
                "--out",
                &p(&dir, "mon.delta"),
            ],
            COMMAND_LIMIT,
        )
        .ok();
        tidemark(&["copy", &vol, &p(&dir, "mon.img")], COMMAND_LIMIT).ok();
        for (day, from, generation, seed) in [("tue", "mon", 1, 200), ("wed", "tue", 2, 300)] {
            let changed = random_extents(SIZE, 30, seed);
            scribble(&vol, &changed, seed + 1);
            let map = p(&dir, &format!("{from}.bitmap"));
            bitmap(&map, from, generation, &changed);
            let out = tidemark(
                &[
                    "delta",
                    "create",
                    "--json",
                    "--from",
                    &vol,
                    "--changed",
                    &map,
                    "--to-checkpoint",
                    day,
                    "--out",
                    &p(&dir, &format!("{day}.delta")),
                ],
                COMMAND_LIMIT,
            )
            .ok();
            assert_eq!(out.json()["from"], from);
            tidemark(
                &["copy", &vol, &p(&dir, &format!("{day}.img"))],
                COMMAND_LIMIT,
            )
            .ok();
        }
        Week { dir }
    }

    fn p(&self, name: &str) -> String {
        p(&self.dir, name)
    }
}

#[test]
fn a_restored_week_is_identical_to_the_volume() {
    let week = Week::new();
    let out = week.p("restored");
    tidemark(
        &[
            "restore",
            "--json",
            "--into",
            &out,
            &week.p("mon.delta"),
            &week.p("tue.delta"),
            &week.p("wed.delta"),
        ],
        COMMAND_LIMIT,
    )
    .ok();
    assert!(cmp_equal(&out, week.p("vol"), None).expect("cmp runs"));
    // From Monday's image instead of Monday's delta.
    let out2 = week.p("restored2");
    tidemark(
        &[
            "restore",
            "--into",
            &out2,
            &week.p("mon.img"),
            &week.p("tue.delta"),
        ],
        COMMAND_LIMIT,
    )
    .ok();
    assert!(cmp_equal(&out2, week.p("tue.img"), None).expect("cmp runs"));
    let info = tidemark(
        &["delta", "info", "--json", &week.p("wed.delta")],
        COMMAND_LIMIT,
    )
    .ok()
    .json();
    assert_eq!(info["from"], "tue");
    assert_eq!(info["to"], "wed");
    assert_eq!(info["volume_uuid"], UUID);
}

#[test]
fn verify_checks_a_chain_against_an_image() {
    let week = Week::new();
    let chain = [week.p("mon.delta"), week.p("tue.delta")];
    let equal = tidemark(
        &["verify", &week.p("tue.img"), &chain[0], &chain[1]],
        COMMAND_LIMIT,
    );
    assert_eq!(equal.code(), 0, "{equal:?}");
    let differ = tidemark(
        &["verify", "--json", &week.p("wed.img"), &chain[0], &chain[1]],
        COMMAND_LIMIT,
    );
    assert_eq!(differ.code(), 1, "{differ:?}");
    let report = differ.json();
    assert_eq!(report["equal"], false);
    let at = report["first_difference"].as_u64().unwrap();
    // The reported offset really is the first difference.
    let (a, b) = (
        std::fs::read(week.p("wed.img")).unwrap(),
        std::fs::read(week.p("tue.img")).unwrap(),
    );
    assert_eq!(
        Some(at as usize),
        a.iter().zip(&b).position(|(x, y)| x != y)
    );
}

#[test]
fn a_broken_chain_is_refused_naming_the_break() {
    let week = Week::new();
    let out = week.p("restored");
    let skipped = tidemark(
        &[
            "restore",
            "--into",
            &out,
            &week.p("mon.delta"),
            &week.p("wed.delta"),
        ],
        COMMAND_LIMIT,
    );
    assert_eq!(skipped.code(), 2);
    assert!(
        skipped.stderr.contains("chain break")
            && skipped.stderr.contains("mon.delta")
            && skipped.stderr.contains("wed.delta"),
        "{skipped:?}"
    );
    assert!(
        !std::path::Path::new(&out).exists(),
        "nothing is written for a refused chain"
    );
    // A delta of another volume.
    let other = week.p("other.delta");
    tidemark_with_input(
        &[
            "delta",
            "create",
            "--from",
            &week.p("vol"),
            "--changed",
            "-",
            "--volume-uuid",
            "00000000-0000-4000-8000-00000000dead",
            "--from-checkpoint",
            "mon:1",
            "--to-checkpoint",
            "tue:2",
            "--out",
            &other,
        ],
        b"0 65536\n",
        COMMAND_LIMIT,
    )
    .ok();
    let foreign = tidemark(
        &["restore", "--into", &out, &week.p("mon.delta"), &other],
        COMMAND_LIMIT,
    );
    assert_eq!(foreign.code(), 2);
    assert!(foreign.stderr.contains("volume"), "{foreign:?}");
}

#[test]
fn a_restore_killed_midway_can_be_run_again() {
    let week = Week::new();
    let out = week.p("restored");
    let args = [
        "restore",
        "--queue-depth",
        "1",
        "--block-size",
        "4K",
        "--engine",
        "threads",
        "--into",
        &out,
        &week.p("mon.img"),
        &week.p("tue.delta"),
        &week.p("wed.delta"),
    ];
    let child = std::process::Command::new(tidemark_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard::new(child);
    std::thread::sleep(Duration::from_millis(300));
    let child = &mut *guard;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the slow restore finished before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    drop(guard);
    assert!(!cmp_equal(&out, week.p("vol"), None).expect("cmp runs"));
    tidemark(
        &[
            "restore",
            "--into",
            &out,
            &week.p("mon.img"),
            &week.p("tue.delta"),
            &week.p("wed.delta"),
        ],
        COMMAND_LIMIT,
    )
    .ok();
    assert!(cmp_equal(&out, week.p("vol"), None).expect("cmp runs"));
}
