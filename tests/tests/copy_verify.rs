//! `tidemark verify A B` end to end: exit 0 when equal, 1 with the first differing
//! offset when not, 2 when it cannot compare.

#![allow(clippy::single_range_in_vec_init)] // extents really are lists of ranges

use std::os::unix::fs::FileExt;

use tidemark_tests::image::{random_image, MIB};
use tidemark_tests::paths::{p, scratch};
use tidemark_tests::{tidemark, COMMAND_LIMIT};

#[test]
fn verify_reports_the_first_difference() {
    let dir = scratch();
    let (a, b) = (p(&dir, "a"), p(&dir, "b"));
    random_image(&a, 32 * MIB, &[0..10 * MIB, 20 * MIB..21 * MIB], &[], 1);
    tidemark(&["copy", &a, &b], COMMAND_LIMIT).ok();
    let equal = tidemark(&["verify", &a, &b], COMMAND_LIMIT);
    assert_eq!(equal.code(), 0, "{equal:?}");
    assert!(equal.stdout.contains("identical"));
    let file = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    file.write_all_at(b"x", 25 * MIB + 3).unwrap();
    file.write_all_at(b"y", 30 * MIB).unwrap();
    let differ = tidemark(&["verify", &a, &b], COMMAND_LIMIT);
    assert_eq!(differ.code(), 1, "{differ:?}");
    assert!(
        differ.stdout.contains(&format!("offset {}", 25 * MIB + 3)),
        "{differ:?}"
    );
    let json = tidemark(&["verify", "--json", &a, &b], COMMAND_LIMIT).json();
    assert_eq!(json["first_difference"], 25 * MIB + 3);
    file.set_len(33 * MIB).unwrap();
    file.write_all_at(&[0], 25 * MIB + 3).unwrap();
    file.write_all_at(&[0], 30 * MIB).unwrap();
    let longer = tidemark(&["verify", &a, &b], COMMAND_LIMIT);
    assert_eq!(longer.code(), 1);
    assert!(longer.stdout.contains("differ in size"), "{longer:?}");
    let missing = tidemark(&["verify", &a, &p(&dir, "missing")], COMMAND_LIMIT);
    assert_eq!(missing.code(), 2);
}
