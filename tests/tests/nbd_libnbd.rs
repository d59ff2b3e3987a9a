//! `tidemark export` against libnbd's tools: nbdinfo (--list, --json, --map for both
//! contexts, --can), nbdcopy in both directions, and a python3-libnbd script with block
//! status and many concurrent aio reads.

use std::process::Command;

use anyhow::{Context, Result};
use tidemark_tests::export::{export, Exported};
use tidemark_tests::image::{make_bitmap, pattern_image};
use tidemark_tests::{run, run_ok};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const DATA: &[(u64, u64)] = &[(MIB, MIB), (20 * MIB, 4 * MIB)];
const GRANULARITY: u32 = 65536;
/// Dirty tracking blocks (64 KiB each): 3, 4, 5 and 300.
const DIRTY: &[u64] = &[3, 4, 5, 300];

fn setup(dir: &std::path::Path, extra: &[&str]) -> Result<(std::path::PathBuf, Exported)> {
    let img = dir.join("disk.img");
    pattern_image(&img, SIZE, DATA)?;
    let bitmap = dir.join("ck.bitmap");
    make_bitmap(&bitmap, "ck", GRANULARITY, SIZE, DIRTY)?;
    let spec = format!("ck={}", bitmap.display());
    let mut args = vec!["--name", "disk", "--bitmap", &spec];
    args.extend_from_slice(extra);
    let e = export(dir, &img, &args)?;
    Ok((img, e))
}

fn nbdinfo_map(uri: &str, context: &str) -> Result<Vec<(u64, u64, u64)>> {
    let out = run_ok(Command::new("nbdinfo").args(["--json", &format!("--map={context}"), uri]))?;
    let map: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("nbdinfo --map output: {out}"))?;
    Ok(map
        .as_array()
        .context("map is a list")?
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect())
}

#[test]
fn nbdinfo_lists_describes_and_maps_both_contexts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (img, e) = setup(dir.path(), &["--read-only"])?;

    let list: serde_json::Value = serde_json::from_str(&run_ok(
        Command::new("nbdinfo").args(["--list", "--json", &e.uri]),
    )?)?;
    let exports = list["exports"].as_array().context("exports")?;
    assert_eq!(exports.len(), 1, "{list}");
    assert_eq!(exports[0]["export-name"], "disk");
    assert_eq!(exports[0]["description"], img.display().to_string());
    assert_eq!(exports[0]["export-size"].as_u64(), Some(SIZE));
    let contexts: Vec<&str> = exports[0]["contexts"]
        .as_array()
        .context("contexts")?
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(
        contexts.contains(&"base:allocation") && contexts.contains(&"qemu:dirty-bitmap:ck"),
        "{list}"
    );
    assert_eq!(exports[0]["is_read_only"], true);
    assert_eq!(exports[0]["can_multi_conn"], true);
    assert_eq!(exports[0]["block_size_preferred"].as_u64(), Some(4096));
    assert_eq!(exports[0]["block_size_maximum"].as_u64(), Some(32 * MIB));

    let single: serde_json::Value =
        serde_json::from_str(&run_ok(Command::new("nbdinfo").args(["--json", &e.uri]))?)?;
    assert_eq!(single["protocol"], "newstyle-fixed");
    assert_eq!(single["structured"], true);

    // base:allocation: holes are 3 (hole|zero), data 0, exactly over the written ranges.
    let alloc = nbdinfo_map(&e.uri, "base:allocation")?;
    let data: Vec<(u64, u64)> = alloc
        .iter()
        .filter(|e| e.2 == 0)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(data, DATA, "{alloc:?}");
    assert!(alloc.iter().all(|e| e.2 == 0 || e.2 == 3));
    assert_eq!(alloc.iter().map(|e| e.1).sum::<u64>(), SIZE);

    // The dirty bitmap: blocks 3-5 and 300 dirty (1), the rest clean (0).
    let g = u64::from(GRANULARITY);
    let dirty = nbdinfo_map(&e.uri, "qemu:dirty-bitmap:ck")?;
    assert_eq!(
        dirty,
        vec![
            (0, 3 * g, 0),
            (3 * g, 3 * g, 1),
            (6 * g, 294 * g, 0),
            (300 * g, g, 1),
            (301 * g, SIZE - 301 * g, 0)
        ]
    );
    Ok(())
}

#[test]
fn nbdinfo_can_reports_capabilities() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_img, rw) = setup(dir.path(), &[])?;
    let can = |uri: &str, what: &str| -> Result<bool> {
        let out = run(
            Command::new("nbdinfo").args(["--can", what, uri]),
            std::time::Duration::from_secs(30),
        )?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(2) => Ok(false),
            other => anyhow::bail!("nbdinfo --can {what} exited {other:?}: {}", out.stderr),
        }
    };
    for what in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "df",
        "cache",
        "multi-conn",
    ] {
        assert!(can(&rw.uri, what)?, "writable export cannot {what}");
    }
    let dir2 = tempfile::tempdir()?;
    let (_img2, ro) = setup(dir2.path(), &["--read-only"])?;
    for what in ["write", "trim", "zero"] {
        assert!(!can(&ro.uri, what)?, "read-only export claims {what}");
    }
    assert!(can(&ro.uri, "multi-conn")?);
    Ok(())
}

#[test]
fn nbdcopy_reads_and_writes_the_export() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (img, e) = setup(dir.path(), &[])?;
    let copy = dir.path().join("copy.img");
    run_ok(Command::new("nbdcopy").arg(&e.uri).arg(&copy))?;
    assert!(
        std::fs::read(&copy)? == std::fs::read(&img)?,
        "nbdcopy from the export differs"
    );

    // And back into a writable export: new content, several connections.
    let new = dir.path().join("new.img");
    pattern_image(&new, SIZE, &[(0, 3 * MIB), (30 * MIB, MIB)])?;
    run_ok(
        Command::new("nbdcopy")
            .args(["--flush", "-C", "4"])
            .arg(&new)
            .arg(&e.uri),
    )?;
    let status = e.terminate()?;
    assert!(status.success());
    assert!(
        std::fs::read(&img)? == std::fs::read(&new)?,
        "nbdcopy into the export left different content"
    );
    Ok(())
}

const LIBNBD_SCRIPT: &str = r#"
import json, sys
import nbd

uri = sys.argv[1]
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:ck")
h.connect_uri(uri)
size = h.get_size()
result = {"size": size, "contexts": {}}
for ctx in ["base:allocation", "qemu:dirty-bitmap:ck"]:
    assert h.can_meta_context(ctx), ctx
    extents = []
    offset = 0
    while offset < size:
        got = []
        def cb(metacontext, off, entries, err):
            if metacontext == ctx:
                got.extend(entries)
            return 0
        h.block_status(min(size - offset, 1 << 30), offset, cb)
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            if extents and extents[-1][1] == flags:
                extents[-1][0] += length
            else:
                extents.append([length, flags])
            offset += length
    result["contexts"][ctx] = extents

# Many concurrent aio reads: 256 reads of 64 KiB in flight at once, checked on completion.
bufs = {}
for i in range(256):
    off = (i * 131072) % (size - 65536)
    buf = nbd.Buffer(65536)
    bufs[i] = (off, buf, h.aio_pread(buf, off))
# aio_command_completed retires a command the first time it reports it done.
waiting = {c for (_, _, c) in bufs.values()}
max_in_flight = h.aio_in_flight()
while waiting:
    h.poll(-1)
    waiting = {c for c in waiting if not h.aio_command_completed(c)}
reads = []
for i, (off, buf, c) in sorted(bufs.items()):
    data = buf.to_bytearray()
    reads.append([off, data.hex()[:16], sum(data) % 65521])
result["reads"] = reads
result["in_flight_max"] = max_in_flight
h.shutdown()
print(json.dumps(result))
"#;

#[test]
fn python_libnbd_block_status_and_concurrent_aio_reads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (img, e) = setup(dir.path(), &["--read-only"])?;
    let script = dir.path().join("check.py");
    std::fs::write(&script, LIBNBD_SCRIPT)?;
    let out = run_ok(Command::new("/usr/bin/python3").arg(&script).arg(&e.uri))?;
    let result: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("script output: {out}"))?;
    assert_eq!(result["size"].as_u64(), Some(SIZE));

    let g = u64::from(GRANULARITY);
    let dirty: Vec<(u64, u64)> = result["contexts"]["qemu:dirty-bitmap:ck"]
        .as_array()
        .context("dirty extents")?
        .iter()
        .map(|x| (x[0].as_u64().unwrap(), x[1].as_u64().unwrap()))
        .collect();
    assert_eq!(
        dirty,
        vec![
            (3 * g, 0),
            (3 * g, 1),
            (294 * g, 0),
            (g, 1),
            (SIZE - 301 * g, 0)
        ]
    );
    let alloc: Vec<(u64, u64)> = result["contexts"]["base:allocation"]
        .as_array()
        .context("allocation extents")?
        .iter()
        .map(|x| (x[0].as_u64().unwrap(), x[1].as_u64().unwrap()))
        .collect();
    assert_eq!(
        alloc,
        vec![
            (MIB, 3),
            (MIB, 0),
            (18 * MIB, 3),
            (4 * MIB, 0),
            (8 * MIB, 3)
        ]
    );

    // Every concurrent read returned the file's bytes.
    let bytes = std::fs::read(&img)?;
    let reads = result["reads"].as_array().context("reads")?;
    assert_eq!(reads.len(), 256);
    assert!(
        result["in_flight_max"].as_u64().unwrap_or(0) > 16,
        "reads were not concurrent: {result}"
    );
    for r in reads {
        let off = r[0].as_u64().unwrap() as usize;
        let chunk = &bytes[off..off + 65536];
        let head: String = chunk[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(r[1].as_str(), Some(head.as_str()), "read at {off}");
        let sum = chunk.iter().map(|&b| u64::from(b)).sum::<u64>() % 65521;
        assert_eq!(r[2].as_u64(), Some(sum), "read at {off}");
    }
    Ok(())
}
