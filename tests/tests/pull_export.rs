//! `tidemark pull` against `tidemark export FILE --bitmap NAME=BITMAPFILE`: the export
//! serves a file with a dirty bitmap from a tidemark bitmap file. An incremental pull must
//! copy exactly the blocks the bitmap marks (a change outside them is not copied), and a
//! full pull must equal the file (compared with `cmp`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use tidemark_formats::bitmap::{set_dirty_range, write_bitmap_file, BitmapHeader};
use tidemark_tests::image::{allocated, cmp_equal};
use tidemark_tests::paths::arg;
use tidemark_tests::peers::{nbdinfo_map, serve, unix_uri};
use tidemark_tests::{run, tidemark_bin, ChildGuard, Output};

const SIZE: u64 = 32 << 20;
const GRANULARITY: u64 = 64 << 10;
const LIMIT: Duration = Duration::from_secs(120);

fn pull(args: &[&str]) -> anyhow::Result<Output> {
    run(Command::new(tidemark_bin()).arg("pull").args(args), LIMIT)
}

/// `tidemark export FILE --read-only --socket S [--bitmap NAME=FILE]`, killed on drop.
fn export(
    file: &Path,
    socket: &Path,
    bitmap: Option<(&str, &Path)>,
) -> anyhow::Result<(ChildGuard, String)> {
    let mut cmd = Command::new(tidemark_bin());
    cmd.arg("export")
        .arg(file)
        .arg("--read-only")
        .arg("--socket")
        .arg(socket)
        .args(["--name", "disk"]);
    if let Some((name, path)) = bitmap {
        cmd.arg("--bitmap")
            .arg(format!("{name}={}", path.display()));
    }
    let server = serve(&mut cmd, socket, Duration::from_secs(10))?;
    Ok((server, unix_uri("disk", socket)))
}

fn write_file(path: &Path, data: &[u8]) -> anyhow::Result<PathBuf> {
    std::fs::write(path, data)?;
    Ok(path.to_path_buf())
}

#[test]
fn incremental_pull_from_tidemark_export_copies_exactly_the_marked_blocks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut old = vec![0u8; SIZE as usize];
    // Data in the first half, a hole in the second.
    rng.fill_bytes(&mut old[..(SIZE / 2) as usize]);

    // The new state: changed blocks, some marked in the bitmap, one change left unmarked
    // (a pull must not copy it: it copies what the bitmap says, nothing more).
    let mut new = old.clone();
    let blocks = SIZE / GRANULARITY;
    let mut marked = Vec::new();
    for _ in 0..20 {
        let first = rng.gen_range(0..blocks - 4);
        let count = rng.gen_range(1..4);
        marked.push(first..first + count);
    }
    for range in &marked {
        let bytes = (range.start * GRANULARITY) as usize..(range.end * GRANULARITY) as usize;
        rng.fill_bytes(&mut new[bytes]);
    }
    // A marked block that became zero: the pull must zero it in the image.
    let zeroed_block = blocks / 4;
    new[(zeroed_block * GRANULARITY) as usize..((zeroed_block + 1) * GRANULARITY) as usize].fill(0);
    marked.push(zeroed_block..zeroed_block + 1);
    // An unmarked change.
    let unmarked = blocks - 1;
    new[(unmarked * GRANULARITY) as usize] = 0xee;

    let header = BitmapHeader::new(uuid::Uuid::new_v4(), "mon", GRANULARITY as u32, SIZE, 1)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut words = vec![0u64; header.word_count()];
    for range in &marked {
        set_dirty_range(&mut words, range.clone());
    }
    let bitmap = dir.path().join("mon.bitmap");
    write_bitmap_file(&bitmap, &header, &words)?;

    let mut expected = old.clone();
    for range in &marked {
        let bytes = (range.start * GRANULARITY) as usize..(range.end * GRANULARITY) as usize;
        expected[bytes.clone()].copy_from_slice(&new[bytes]);
    }
    let image = write_file(&dir.path().join("image.img"), &old)?;
    let expected = write_file(&dir.path().join("expected.img"), &expected)?;
    let served = write_file(&dir.path().join("new.img"), &new)?;

    let (_server, uri) = export(
        &served,
        &dir.path().join("nbd.sock"),
        Some(("mon", &bitmap)),
    )?;
    let dirty_map = nbdinfo_map(&uri, "qemu:dirty-bitmap:mon")?;
    let dirty_bytes: u64 = dirty_map.iter().filter(|r| r.2 & 1 != 0).map(|r| r.1).sum();
    let report = pull(&["--bitmap", "mon", &uri, "--into", &arg(&image), "--json"])?
        .ok()
        .json();
    assert_eq!(report["bytes_dirty"], dirty_bytes, "{report}");
    assert!(
        report["bytes_pulled"].as_u64().unwrap_or(u64::MAX) <= dirty_bytes,
        "{report}"
    );
    assert!(
        cmp_equal(&image, &expected, None)?,
        "the image is not the old image plus the marked blocks"
    );
    Ok(())
}

#[test]
fn full_pull_from_tidemark_export_equals_the_file_and_stays_sparse() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut data = vec![0u8; SIZE as usize];
    rng.fill_bytes(&mut data[(4 << 20)..(6 << 20)]);
    rng.fill_bytes(&mut data[(20 << 20)..(20 << 20) + 4096]);
    let served = write_file(&dir.path().join("disk.img"), &data)?;
    let image = dir.path().join("backup.img");
    let (_server, uri) = export(&served, &dir.path().join("nbd.sock"), None)?;
    let report = pull(&["--full", &uri, "--into", &arg(&image), "--json"])?
        .ok()
        .json();
    assert_eq!(report["size"], SIZE);
    assert!(
        cmp_equal(&image, &served, None)?,
        "the full pull differs from the exported file"
    );

    let allocated = allocated(&image);
    assert!(
        allocated <= 4 << 20,
        "the image is not sparse: {allocated} bytes allocated"
    );
    Ok(())
}

#[test]
fn missing_bitmap_on_a_tidemark_export_is_an_explicit_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let served = write_file(&dir.path().join("disk.img"), &vec![1u8; 1 << 20])?;
    let (_server, uri) = export(&served, &dir.path().join("nbd.sock"), None)?;
    let image = dir.path().join("backup.img");
    let out = pull(&["--bitmap", "mon", &uri, "--into", &arg(&image)])?;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("no dirty bitmap \"mon\""),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--full"), "{}", out.stderr);
    assert!(!image.exists(), "a failed pull created the image");
    Ok(())
}
