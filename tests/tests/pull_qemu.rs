//! `tidemark pull` against qemu-nbd: a qcow2 image with a persistent dirty bitmap
//! (`qemu-img bitmap --add`), exported with `qemu-nbd -B`, the way a QEMU VM's pull-mode
//! backup export looks. Truth comes from `qemu-img convert`, comparison from `cmp`, and the
//! expected dirty ranges from `nbdinfo --map`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use tidemark_tests::image::{allocated, cmp_equal};
use tidemark_tests::paths::arg;
use tidemark_tests::peers::{nbdinfo_map, overlap_bytes, serve, unix_uri};
use tidemark_tests::{run, tidemark_bin, ChildGuard, Output};

const SIZE: u64 = 64 << 20;
const LIMIT: Duration = Duration::from_secs(120);

/// A qcow2 disk in a temporary directory.
struct Disk {
    dir: tempfile::TempDir,
    qcow2: PathBuf,
}

impl Disk {
    fn new() -> anyhow::Result<Disk> {
        let dir = tempfile::tempdir()?;
        let qcow2 = dir.path().join("disk.qcow2");
        run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&qcow2)
                .arg(SIZE.to_string()),
            LIMIT,
        )?
        .ok();
        Ok(Disk { dir, qcow2 })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run qemu-io commands (`write -P 0x11 0 1M`, `write -z 8M 64k`) on the image.
    fn io(&self, commands: &[&str]) -> anyhow::Result<()> {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for c in commands {
            cmd.arg("-c").arg(c);
        }
        run(cmd.arg(&self.qcow2), LIMIT)?.ok();
        Ok(())
    }

    fn bitmap(&self, op: &str, name: &str) -> anyhow::Result<()> {
        run(
            Command::new("qemu-img")
                .args(["bitmap", op])
                .arg(&self.qcow2)
                .arg(name),
            LIMIT,
        )?
        .ok();
        Ok(())
    }

    /// The image's contents as raw bytes in a file, by qemu-img.
    fn truth(&self, name: &str) -> anyhow::Result<PathBuf> {
        let out = self.path(name);
        run(
            Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(&self.qcow2)
                .arg(&out),
            LIMIT,
        )?
        .ok();
        Ok(out)
    }

    /// `qemu-nbd -r` on a fresh socket, optionally exporting `bitmap`; killed on drop.
    fn serve(&self, tag: &str, bitmap: Option<&str>) -> anyhow::Result<(ChildGuard, String)> {
        let socket = self.path(&format!("{tag}.sock"));
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-r", "-f", "qcow2", "-e", "8", "-t"])
            .arg(format!("--socket={}", socket.display()));
        if let Some(bitmap) = bitmap {
            cmd.args(["-B", bitmap]);
        }
        let server = serve(cmd.arg(&self.qcow2), &socket, Duration::from_secs(10))?;
        Ok((server, unix_uri("", &socket)))
    }
}

fn pull(args: &[&str]) -> anyhow::Result<Output> {
    run(Command::new(tidemark_bin()).arg("pull").args(args), LIMIT)
}

#[test]
fn full_then_incremental_pull_from_qemu_nbd_equals_the_truth() -> anyhow::Result<()> {
    let disk = Disk::new()?;
    disk.io(&[
        "write -P 0x11 0 1M",
        "write -P 0x12 8M 512k",
        "write -P 0x13 40M 3M",
    ])?;
    disk.bitmap("--add", "b0")?;

    // Full pull of the state the bitmap starts from.
    let image = disk.path("backup.img");
    let truth0 = disk.truth("truth0.raw")?;
    {
        let (_server, uri) = disk.serve("full", None)?;
        let report = pull(&["--full", &uri, "--into", &arg(&image), "--json"])?
            .ok()
            .json();
        assert_eq!(report["mode"], "full");
        assert_eq!(report["size"], SIZE);
        assert_eq!(
            report["bytes_pulled"],
            (1 << 20) + (512 << 10) + (3 << 20),
            "{report}"
        );
        assert_eq!(
            report["bytes_skipped"],
            SIZE - report["bytes_pulled"].as_u64().unwrap_or(0)
        );
    }
    assert!(
        cmp_equal(&image, &truth0, None)?,
        "the full pull differs from qemu-img convert"
    );
    let allocated = allocated(&image);
    assert!(
        allocated < 8 << 20,
        "the full pull is not sparse: {allocated} bytes allocated"
    );

    // Changes after the checkpoint: data, a 10-byte write, zeroes over old data, a big run.
    disk.io(&[
        "write -P 0x22 4M 128k",
        "write -P 0x23 10485860 10",
        "write -z 8M 64k",
        "write -P 0x24 41M 1M",
    ])?;
    disk.bitmap("--disable", "b0")?;
    let truth1 = disk.truth("truth1.raw")?;

    let (_server, uri) = disk.serve("inc", Some("b0"))?;
    // What the real peer tool says the export holds.
    let dirty = nbdinfo_map(&uri, "qemu:dirty-bitmap:b0")?;
    let alloc = nbdinfo_map(&uri, "base:allocation")?;
    let dirty_bytes: u64 = dirty.iter().filter(|r| r.2 & 1 != 0).map(|r| r.1).sum();
    assert_eq!(
        dirty_bytes,
        (128 << 10) + (64 << 10) + (64 << 10) + (1 << 20)
    );
    let dirty_data = overlap_bytes(&dirty, |f| f & 1 != 0, &alloc, |f| f & 2 == 0);

    let report = pull(&["--bitmap", "b0", &uri, "--into", &arg(&image), "--json"])?
        .ok()
        .json();
    assert_eq!(report["mode"], "incremental");
    assert_eq!(report["bitmap"], "b0");
    assert_eq!(report["bytes_dirty"], dirty_bytes, "{report}");
    assert_eq!(
        report["bytes_pulled"], dirty_data,
        "pulled more or less than dirty data: {report}"
    );
    assert!(
        cmp_equal(&image, &truth1, None)?,
        "the incremental pull differs from qemu-img convert"
    );
    Ok(())
}

#[test]
fn missing_bitmap_is_an_explicit_error_and_touches_nothing() -> anyhow::Result<()> {
    let disk = Disk::new()?;
    disk.io(&["write -P 0x31 0 256k"])?;
    disk.bitmap("--add", "b0")?;
    disk.bitmap("--disable", "b0")?;
    let image = disk.path("backup.img");
    std::fs::write(&image, b"yesterday")?;

    let (_server, uri) = disk.serve("missing", Some("b0"))?;
    let out = pull(&["--bitmap", "nope", &uri, "--into", &arg(&image)])?;
    assert_eq!(out.code(), 2, "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("no dirty bitmap \"nope\""),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("--full"),
        "the error must name the way out: {}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(&image)?,
        b"yesterday",
        "a failed pull changed the image"
    );
    Ok(())
}

#[test]
fn pull_without_bitmap_or_full_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("x.img");
    let out = pull(&["nbd+unix:///?socket=/nonexistent", "--into", &arg(&image)])?;
    assert_eq!(out.code(), 2);
    assert!(
        out.stderr.contains("--bitmap") && out.stderr.contains("--full"),
        "{}",
        out.stderr
    );
    assert!(!image.exists());
    Ok(())
}

#[test]
fn pull_uses_several_connections_when_the_server_allows_them() -> anyhow::Result<()> {
    let disk = Disk::new()?;
    disk.io(&["write -P 0x41 0 16M"])?;
    let (_server, uri) = disk.serve("multi", None)?;
    let info = run(Command::new("nbdinfo").args(["--json", &uri]), LIMIT)?
        .ok()
        .json();
    let multi = info["exports"][0]["can_multi_conn"]
        .as_bool()
        .context("nbdinfo can_multi_conn")?;
    let image = disk.path("multi.img");
    let report = pull(&[
        "--full",
        &uri,
        "--into",
        &arg(&image),
        "--connections",
        "4",
        "--request-size",
        "256K",
        "--json",
    ])?
    .ok()
    .json();
    assert_eq!(report["connections"], if multi { 4 } else { 1 }, "{report}");
    assert!(cmp_equal(&image, &disk.truth("truth.raw")?, None)?);
    Ok(())
}

#[test]
fn a_delta_from_a_foreign_export_needs_the_volume_uuid_and_never_records_nil() -> anyhow::Result<()>
{
    let disk = Disk::new()?;
    disk.io(&["write -P 0x51 0 256k"])?;
    let (_server, uri) = disk.serve("uuid", None)?;
    let delta = disk.path("full.delta");
    let out = pull(&["--full", &uri, "--delta", &arg(&delta)])?;
    assert_eq!(out.code(), 2, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("--volume-uuid"), "{}", out.stderr);
    assert!(!delta.exists(), "a refused pull wrote {}", delta.display());

    let uuid = "6f1c2a3e-8d4b-4c5a-9e7f-0123456789ab";
    pull(&[
        "--full",
        &uri,
        "--delta",
        &arg(&delta),
        "--volume-uuid",
        uuid,
    ])?
    .ok();
    let file = std::fs::File::open(&delta)?;
    let reader = tidemark_formats::delta::DeltaReader::open(file, &delta)?;
    assert_eq!(reader.header().volume_uuid.to_string(), uuid);
    assert_eq!(reader.header().granularity, 64 << 10);
    Ok(())
}
