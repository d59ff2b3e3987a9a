//! The files `tidemark copy`, `update-img`, `delta create` and `restore` write: created
//! 0640 at most whatever the umask (as the daemon's push targets), never written through
//! a symlink planted at the destination (a link to a block device is followed).

#![allow(clippy::single_range_in_vec_init)] // extents really are lists of ranges

use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

use tidemark_tests::image::{cmp_equal, random_image, MIB};
use tidemark_tests::paths::{p, scratch};
use tidemark_tests::peers::LoopDevice;
use tidemark_tests::{tidemark, tidemark_with_input, Output, COMMAND_LIMIT};

const SIZE: u64 = 8 * MIB;
const UUID: &str = "00000000-0000-4000-8000-000000000020";

/// A shell with the usual umask (the test process's; the commands inherit it).
fn usual_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
}

fn mode(path: &str) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o777
}

/// A full delta of `snap` at `out`.
fn full_delta(snap: &str, out: &str) -> Output {
    tidemark(
        &[
            "delta",
            "create",
            "--from",
            snap,
            "--full",
            "--volume-uuid",
            UUID,
            "--to-checkpoint",
            "c1",
            "--out",
            out,
        ],
        COMMAND_LIMIT,
    )
}

/// The command failed, saying that `path` is a symlink, and `victim` is untouched.
fn refused(out: &Output, path: &str, victim: &Path) {
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains(path) && out.stderr.contains("is a symlink"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(victim).unwrap(), b"precious");
}

#[test]
fn files_the_cli_creates_are_private_under_umask_022() {
    usual_umask();
    let dir = scratch();
    let snap = p(&dir, "snap");
    random_image(&snap, SIZE, &[0..2 * MIB, 5 * MIB..6 * MIB], &[], 20);
    let copied = p(&dir, "copied.img");
    tidemark(&["copy", &snap, &copied], COMMAND_LIMIT).ok();
    let delta = p(&dir, "full.delta");
    full_delta(&snap, &delta).ok();
    let restored = p(&dir, "restored.img");
    tidemark(&["restore", "--into", &restored, &delta], COMMAND_LIMIT).ok();
    for made in [&copied, &delta, &restored] {
        let m = mode(made);
        assert_eq!(m & 0o037, 0, "{made} has mode {m:o} under umask 022");
    }
    assert!(cmp_equal(&snap, &copied, None).expect("cmp runs"));
    assert!(cmp_equal(&snap, &restored, None).expect("cmp runs"));
    // An existing image keeps the mode its owner gave it.
    let shared = p(&dir, "shared.img");
    std::fs::write(&shared, b"").unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    tidemark(&["copy", &snap, &shared], COMMAND_LIMIT).ok();
    assert_eq!(mode(&shared), 0o644);
    assert!(cmp_equal(&snap, &shared, None).expect("cmp runs"));
}

#[test]
fn a_symlink_planted_at_a_destination_is_refused_and_its_target_untouched() {
    let dir = scratch();
    let snap = p(&dir, "snap");
    random_image(&snap, SIZE, &[0..SIZE], &[], 21);
    let delta = p(&dir, "full.delta");
    full_delta(&snap, &delta).ok();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let link = |name: &str| {
        let path = p(&dir, name);
        symlink(&victim, &path).unwrap();
        path
    };

    let dst = link("copy.img");
    refused(
        &tidemark(&["copy", &snap, &dst], COMMAND_LIMIT),
        &dst,
        &victim,
    );

    let image = link("image.img");
    let out = tidemark_with_input(
        &["update-img", &snap, "-", &image],
        b"0 65536\n",
        COMMAND_LIMIT,
    );
    refused(&out, &image, &victim);

    let into = link("restored.img");
    refused(
        &tidemark(&["restore", "--into", &into, &delta], COMMAND_LIMIT),
        &into,
        &victim,
    );

    // delta create stages OUT.partial: a link there is refused, and so is one at OUT
    // (the rename would replace it).
    let staged = link("staged.delta.partial");
    refused(
        &full_delta(&snap, &p(&dir, "staged.delta")),
        &staged,
        &victim,
    );
    let out = link("linked.delta");
    refused(&full_delta(&snap, &out), &out, &victim);
    assert!(!dir.path().join("linked.delta.partial").exists());

    // A partial file an interrupted run left is replaced.
    let rerun = p(&dir, "rerun.delta");
    std::fs::write(format!("{rerun}.partial"), b"half a delta").unwrap();
    full_delta(&snap, &rerun).ok();
    assert!(!Path::new(&format!("{rerun}.partial")).exists());
    let into = p(&dir, "from-rerun.img");
    tidemark(&["restore", "--into", &into, &rerun], COMMAND_LIMIT).ok();
    assert!(cmp_equal(&snap, &into, None).expect("cmp runs"));
}

#[test]
fn a_symlink_to_a_block_device_is_followed() {
    let dir = scratch();
    let snap = p(&dir, "snap");
    random_image(&snap, SIZE, &[0..SIZE / 2], &[], 22);
    let backing = p(&dir, "backing");
    random_image(&backing, SIZE, &[0..SIZE], &[], 23);
    let device = LoopDevice::attach(&backing);
    let link = p(&dir, "vol");
    symlink(&device.device, &link).unwrap();
    tidemark(&["copy", &snap, &link], COMMAND_LIMIT).ok();
    assert!(cmp_equal(&snap, &device.device, Some(SIZE)).expect("cmp runs"));
    let out = tidemark_with_input(
        &["update-img", &snap, "-", &link],
        b"0 65536\n",
        COMMAND_LIMIT,
    );
    out.ok();
    assert!(Path::new(&link).is_symlink());
}
