//! `tidemark export` against QEMU's NBD client: qemu-img (info, convert, compare, map) and
//! qemu-io (patterned writes and reads, write -z, discard).

use std::process::Command;

use anyhow::Result;
use tidemark_tests::export::export;
use tidemark_tests::image::pattern_image;
use tidemark_tests::{pattern, run, run_ok, tidemark_bin, ChildGuard};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const DATA: &[(u64, u64)] = &[(MIB, MIB), (8 * MIB, 64 * 1024), (40 * MIB, 8 * MIB)];

#[test]
fn qemu_img_info_convert_compare_and_map() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src.img");
    pattern_image(&src, SIZE, DATA)?;
    let e = export(dir.path(), &src, &["--read-only", "--name", "disk"])?;

    let info: serde_json::Value = serde_json::from_str(&run_ok(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "-f",
        "raw",
        &e.uri,
    ]))?)?;
    assert_eq!(info["virtual-size"].as_u64(), Some(SIZE), "{info}");

    let out = dir.path().join("out.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &e.uri])
            .arg(&out),
    )?;
    assert!(
        std::fs::read(&out)? == std::fs::read(&src)?,
        "converted image differs"
    );

    let compared = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &e.uri])
            .arg(&src),
    )?;
    assert!(compared.contains("identical"), "{compared}");

    // The map shows exactly the written ranges as data, everything else as zero.
    let map: serde_json::Value = serde_json::from_str(&run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &e.uri,
    ]))?)?;
    let mut data = Vec::new();
    let mut covered = 0;
    for entry in map.as_array().expect("map is a list") {
        let (start, length) = (
            entry["start"].as_u64().unwrap(),
            entry["length"].as_u64().unwrap(),
        );
        assert_eq!(start, covered, "map has a gap: {map}");
        covered += length;
        if entry["data"].as_bool() == Some(true) {
            match data.last_mut() {
                Some((s, l)) if *s + *l == start => *l += length,
                _ => data.push((start, length)),
            }
        } else {
            assert_eq!(
                entry["zero"].as_bool(),
                Some(true),
                "a hole that is not zero: {entry}"
            );
        }
    }
    assert_eq!(covered, SIZE);
    assert_eq!(data, DATA, "qemu-img map: {map}");
    Ok(())
}

#[test]
fn qemu_io_patterned_writes_zeroes_and_discard() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("rw.img");
    pattern_image(&img, 16 * MIB, &[(4 * MIB, MIB)])?;
    let e = export(dir.path(), &img, &[])?;
    let commands = [
        "write -P 0x5a 0 1M",
        "write -P 0xa5 3M 64k",
        "read -P 0x5a 0 1M",
        "read -P 0xa5 3M 64k",
        "write -z 512k 64k",
        "read -P 0 512k 64k",
        "write -z -u 576k 64k",
        "read -P 0 576k 64k",
        "read -P 0x5a 640k 384k",
        "discard 3M 64k",
        "aio_write -P 0x11 8M 4k",
        "aio_write -P 0x22 9M 4k",
        "aio_flush",
        "read -P 0x11 8M 4k",
        "read -P 0x22 9M 4k",
        "write -f -P 0x33 10M 4k",
        "flush",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(&e.uri);
    let out = run_ok(&mut cmd)?;
    assert!(
        !out.contains("verification failed") && !out.contains("error"),
        "{out}"
    );
    assert_eq!(out.matches("read ").count(), 7, "{out}");

    // What the client wrote is in the file.
    let status = e.terminate()?;
    assert!(status.success(), "tidemark export exited with {status}");
    let bytes = std::fs::read(&img)?;
    assert!(bytes[..512 * 1024].iter().all(|&b| b == 0x5a));
    assert!(bytes[512 * 1024..640 * 1024].iter().all(|&b| b == 0));
    assert!(bytes[8 * MIB as usize..8 * MIB as usize + 4096]
        .iter()
        .all(|&b| b == 0x11));
    assert!(bytes[10 * MIB as usize..10 * MIB as usize + 4096]
        .iter()
        .all(|&b| b == 0x33));
    let untouched = 4 * MIB as usize;
    assert!((untouched..untouched + MIB as usize).all(|o| bytes[o] == pattern(o as u64)));
    Ok(())
}

#[test]
fn read_only_export_refuses_qemu_io_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("ro.img");
    pattern_image(&img, 4 * MIB, &[(0, MIB)])?;
    let e = export(dir.path(), &img, &["--read-only"])?;
    let out = run(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4k", &e.uri]),
        std::time::Duration::from_secs(60),
    )?;
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        !text.contains("wrote "),
        "a write succeeded on a read-only export: {text}"
    );
    // Still serving, data unchanged.
    let out =
        run_ok(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -v 0 16", &e.uri]))?;
    assert!(out.contains("read 16/16"), "{out}");
    assert_eq!(std::fs::read(&img)?[0], pattern(0));
    Ok(())
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("t.img");
    pattern_image(&img, MIB, &[])?;
    let e = export(dir.path(), &img, &[])?;
    let socket = e.socket.clone();
    assert!(socket.exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket must be private");
    let status = e.terminate()?;
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "socket file left behind");
    Ok(())
}

#[test]
fn tcp_listen_serves_qemu_img_on_loopback() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("tcp.img");
    pattern_image(&img, 4 * MIB, &[(0, MIB)])?;
    let mut child = Command::new(tidemark_bin())
        .arg("export")
        .arg(&img)
        .args([
            "--read-only",
            "--listen",
            "127.0.0.1:0",
            "--listen-insecure",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let guard = ChildGuard::new(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(std::time::Duration::from_secs(30))?;
    let ready: serde_json::Value = serde_json::from_str(line.trim())?;
    let uri = ready["uri"].as_str().expect("uri").to_string();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let info: serde_json::Value = serde_json::from_str(&run_ok(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "-f",
        "raw",
        &uri,
    ]))?)?;
    assert_eq!(info["virtual-size"].as_u64(), Some(4 * MIB));
    let out =
        run_ok(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0 1M 1M", &uri]))?;
    assert!(out.contains("read 1048576/1048576"), "{out}");
    drop(guard);
    Ok(())
}
