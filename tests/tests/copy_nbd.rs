//! `tidemark copy NBD-URI DST` against qemu-nbd (the real peer): byte-identical, holes the
//! server reports are not read and stay holes.

#![allow(clippy::single_range_in_vec_init)] // extents really are lists of ranges

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidemark_tests::image::{allocated, cmp_equal, random_image, MIB};
use tidemark_tests::paths::{p, scratch};
use tidemark_tests::{tidemark, ChildGuard, COMMAND_LIMIT};

#[test]
fn copy_from_qemu_nbd_is_exact_and_thin() {
    let dir = scratch();
    let src = p(&dir, "src");
    random_image(
        &src,
        64 * MIB,
        &[0..5 * MIB, 40 * MIB..43 * MIB + 12345],
        &[],
        7,
    );
    let socket = dir.path().join("nbd.sock");
    let server = Command::new("qemu-nbd")
        .args(["-r", "-f", "raw", "-k"])
        .arg(&socket)
        .arg(&src)
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd starts (scripts/install-deps.sh installs qemu-utils)");
    let _server = ChildGuard::new(server);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-nbd did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let dst = p(&dir, "dst");
    let report = tidemark(&["copy", "--json", &uri, &dst], COMMAND_LIMIT)
        .ok()
        .json();
    assert!(cmp_equal(&src, &dst, None).expect("cmp runs"));
    assert!(
        report["bytes_skipped_holes"].as_u64().unwrap() >= 50 * MIB,
        "{report}"
    );
    assert!(
        allocated(&dst) < 12 * MIB,
        "{} bytes allocated",
        allocated(&dst)
    );

    let missing = format!(
        "nbd+unix:///?socket={}",
        dir.path().join("nope.sock").display()
    );
    let out = tidemark(&["copy", &missing, &p(&dir, "dst2")], COMMAND_LIMIT);
    assert_eq!(out.code(), 2);
    assert!(out.stderr.contains("nope.sock"), "{out:?}");
}
