//! `tidemark bench` on files: figures, the JSON schema, --verify against an injected
//! corruption, the --force guard, and clear errors for bad input.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use serde_json::Value;
use tidemark_tests::run::{number, tidemark};

const LIMIT: Duration = Duration::from_secs(120);

fn path_text(path: &std::path::Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

#[test]
fn json_report_follows_the_documented_schema() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    let run = tidemark(
        &[
            "bench",
            "--rw",
            "randrw",
            "--bs",
            "16K",
            "--qd",
            "8",
            "--size",
            "4M",
            "--json",
            path_text(&target),
        ],
        LIMIT,
    );
    let report = run.ok().json();
    assert_eq!(report["schema"], "tidemark-bench/1");
    assert_eq!(report["target_kind"], "file");
    assert_eq!(report["rw"], "randrw");
    assert_eq!(report["bs"], 16384);
    assert_eq!(report["qd"], 8);
    assert_eq!(report["conns"], 1);
    assert_eq!(report["submit_batch"], 1);
    assert!(number(&report, "/huge_page_bytes") <= (128 << 10) as f64);
    assert_eq!(report["region_bytes"], 4 << 20);
    assert!(
        matches!(report["engine"].as_str(), Some("io_uring" | "threads")),
        "{report}"
    );
    assert_eq!(report["time_limit_secs"], Value::Null);
    // One pass over 4 MiB in 16 KiB blocks, split between reads and writes.
    assert_eq!(report["ops"], 256);
    assert_eq!(report["bytes"], 4 << 20);
    let reads = number(&report, "/read/ops");
    let writes = number(&report, "/write/ops");
    assert_eq!(reads + writes, 256.0);
    for side in ["/read", "/write"] {
        let latency = |name: &str| number(&report, &format!("{side}/latency_ns/{name}"));
        assert!(latency("min") > 0.0);
        assert!(latency("min") <= latency("p50"));
        assert!(latency("p50") <= latency("p99"));
        assert!(latency("p99") <= latency("p99.9"));
        assert!(latency("p99.9") <= latency("max"));
        assert!(number(&report, &format!("{side}/mb_per_sec")) > 0.0);
        assert!(number(&report, &format!("{side}/iops")) > 0.0);
    }
    assert!(number(&report, "/elapsed_secs") > 0.0);
    assert!(
        number(&report, "/flush_secs") >= 0.0,
        "writes end with an fsync"
    );
    let mb = number(&report, "/mb_per_sec");
    let expected = (4 << 20) as f64 / number(&report, "/elapsed_secs") / 1e6;
    assert!(
        (mb - expected).abs() < expected * 1e-6,
        "{mb} vs {expected}"
    );
    assert!(number(&report, "/cpu/user_secs") >= 0.0);
    assert!(number(&report, "/cpu/system_secs") >= 0.0);
    assert!(number(&report, "/cpu/percent") >= 0.0);
    assert_eq!(report["verify"], Value::Null);
    assert_eq!(
        File::open(&target).unwrap().metadata().unwrap().len(),
        4 << 20
    );
}

#[test]
fn text_report_shows_rates_percentiles_and_cpu_and_stays_quiet_when_piped() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    let run = tidemark(
        &[
            "bench",
            "--rw",
            "write",
            "--bs",
            "64K",
            "--size",
            "2M",
            path_text(&target),
        ],
        LIMIT,
    );
    let run = run.ok();
    for needle in [
        "MB/s", "IOPS", "p50", "p99", "p99.9", "max", "cpu", "user", "sys",
    ] {
        assert!(
            run.stdout.contains(needle),
            "{needle:?} missing from:\n{}",
            run.stdout
        );
    }
    assert_eq!(
        run.stderr, "",
        "no progress line when stderr is not a terminal"
    );
}

#[test]
fn time_limit_bounds_the_run_and_direct_reads_work() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let target = dir.path().join("disk.img");
    tidemark(
        &[
            "bench",
            "--rw",
            "write",
            "--bs",
            "1M",
            "--size",
            "32M",
            "--direct",
            path_text(&target),
        ],
        LIMIT,
    )
    .ok();
    let run = tidemark(
        &[
            "bench",
            "--rw",
            "randread",
            "--bs",
            "4K",
            "--qd",
            "16",
            "--time",
            "1",
            "--direct",
            "--json",
            path_text(&target),
        ],
        LIMIT,
    );
    let report = run.ok().json();
    let elapsed = number(&report, "/elapsed_secs");
    assert!((1.0..3.0).contains(&elapsed), "elapsed {elapsed}");
    assert_eq!(number(&report, "/time_limit_secs"), 1.0);
    // A time-based run repeats passes: many more requests than the 8192 blocks.
    assert!(number(&report, "/read/ops") > 0.0);
    assert_eq!(report["direct"], true, "/var/tmp is a real file system");
}

#[test]
fn buffers_are_huge_pages_by_default_and_small_pages_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench", "--rw", "write", "--bs", "1M", "--qd", "4", "--size", "8M", "--force",
            "--json",
        ];
        args.extend_from_slice(extra);
        args.push(path_text(&target));
        tidemark(&args, LIMIT).ok().json()
    };
    // 4 x 1 MiB buffers: whether the kernel backs them with huge pages depends on its
    // THP setting, but the report never counts more than the pool.
    let default = bench(&[]);
    assert!(
        number(&default, "/huge_page_bytes") <= (4 << 20) as f64,
        "{default}"
    );
    // --small-pages asks the kernel for base pages only (MADV_NOHUGEPAGE).
    let small = bench(&["--small-pages"]);
    assert_eq!(small["huge_page_bytes"], 0, "{small}");
    assert_eq!(small["bytes"], 8 << 20);
    let text = tidemark(
        &[
            "bench",
            "--rw",
            "read",
            "--bs",
            "1M",
            "--qd",
            "4",
            "--size",
            "8M",
            "--small-pages",
            path_text(&target),
        ],
        LIMIT,
    );
    let out = &text.ok().stdout;
    assert!(out.contains("buffers in 4 KiB pages"), "{out}");
}

#[test]
fn threads_engine_measures_too() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    let run = tidemark(
        &[
            "bench",
            "--engine",
            "threads",
            "--rw",
            "randwrite",
            "--size",
            "1M",
            "--json",
            path_text(&target),
        ],
        LIMIT,
    );
    let report = run.ok().json();
    assert_eq!(report["engine"], "threads");
    assert_eq!(report["write"]["ops"], 256);
}

#[test]
fn verify_round_trip_checks_every_written_block() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    let run = tidemark(
        &[
            "bench",
            "--rw",
            "randwrite",
            "--bs",
            "8K",
            "--size",
            "2M",
            "--verify",
            "--json",
            path_text(&target),
        ],
        LIMIT,
    );
    let report = run.ok().json();
    assert_eq!(report["verify"]["checked_blocks"], 256);
    assert_eq!(report["verify"]["mismatched_blocks"], 0);
    assert!(number(&report, "/verify/readback_secs") > 0.0);
    // A later read run with another block size checks the same pattern.
    let reread = tidemark(
        &[
            "bench",
            "--rw",
            "read",
            "--bs",
            "64K",
            "--verify",
            "--json",
            path_text(&target),
        ],
        LIMIT,
    );
    let report = reread.ok().json();
    assert_eq!(report["verify"]["checked_blocks"], 32);
    assert_eq!(report["verify"]["mismatched_blocks"], 0);
}

#[test]
fn verify_finds_an_injected_corruption_and_names_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    tidemark(
        &[
            "bench",
            "--rw",
            "write",
            "--bs",
            "4K",
            "--size",
            "1M",
            "--verify",
            "--seed",
            "99",
            path_text(&target),
        ],
        LIMIT,
    )
    .ok();
    let corrupt_at: u64 = 300_001;
    let file = File::options()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, corrupt_at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], corrupt_at).unwrap();
    file.sync_all().unwrap();

    let run = tidemark(
        &[
            "bench",
            "--rw",
            "randread",
            "--bs",
            "4K",
            "--verify",
            "--seed",
            "99",
            "--json",
            path_text(&target),
        ],
        LIMIT,
    );
    assert_eq!(run.code(), 1, "mismatches exit with 1:\n{run:#?}");
    assert!(
        run.stderr.contains("do not hold the pattern"),
        "{}",
        run.stderr
    );
    let report = run.json();
    assert_eq!(report["verify"]["checked_blocks"], 256);
    assert_eq!(report["verify"]["mismatched_blocks"], 1);
    let mismatch = &report["verify"]["mismatches"][0];
    assert_eq!(mismatch["offset"], corrupt_at);
    assert_eq!(mismatch["block_offset"], corrupt_at / 4096 * 4096);
    assert_eq!(mismatch["found"], byte[0] ^ 0x10);
    assert_eq!(mismatch["expected"], byte[0]);

    // The text report lists it too, and another seed sees every block as wrong.
    let text = tidemark(
        &[
            "bench",
            "--rw",
            "read",
            "--verify",
            "--seed",
            "99",
            path_text(&target),
        ],
        LIMIT,
    );
    assert_eq!(text.code(), 1);
    assert!(
        text.stdout.contains(&format!("byte {corrupt_at}")),
        "{}",
        text.stdout
    );
    let wrong_seed = tidemark(
        &[
            "bench",
            "--rw",
            "read",
            "--verify",
            "--seed",
            "98",
            "--json",
            path_text(&target),
        ],
        LIMIT,
    );
    assert_eq!(wrong_seed.json()["verify"]["mismatched_blocks"], 256);
}

#[test]
fn writes_to_a_file_with_data_are_refused_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("precious.img");
    let precious: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&target, &precious).unwrap();
    for rw in ["write", "randwrite", "rw", "randrw"] {
        let run = tidemark(&["bench", "--rw", rw, path_text(&target)], LIMIT);
        assert_eq!(run.code(), 2, "{rw}: {run:#?}");
        assert!(run.stderr.contains("holds data"), "{rw}: {}", run.stderr);
        assert!(run.stderr.contains("--force"), "{rw}: {}", run.stderr);
        assert!(
            std::fs::read(&target).unwrap() == precious,
            "{rw} changed the file"
        );
    }
    // Reads are always allowed, and --force allows the write.
    tidemark(&["bench", "--rw", "read", path_text(&target)], LIMIT).ok();
    tidemark(
        &["bench", "--rw", "write", "--force", path_text(&target)],
        LIMIT,
    )
    .ok();
    assert!(std::fs::read(&target).unwrap() != precious);
}

#[test]
fn sparse_all_hole_and_empty_files_may_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("sparse.img");
    File::create(&sparse).unwrap().set_len(8 << 20).unwrap();
    let report = tidemark(
        &[
            "bench",
            "--rw",
            "write",
            "--bs",
            "1M",
            "--json",
            path_text(&sparse),
        ],
        LIMIT,
    )
    .ok()
    .json();
    assert_eq!(
        report["region_bytes"],
        8 << 20,
        "the whole sparse file is the region"
    );
    let empty = dir.path().join("empty.img");
    File::create(&empty).unwrap();
    let run = tidemark(&["bench", "--rw", "write", path_text(&empty)], LIMIT);
    assert_eq!(run.code(), 2);
    assert!(
        run.stderr.contains("--size"),
        "an empty file needs --size: {}",
        run.stderr
    );
    tidemark(
        &["bench", "--rw", "write", "--size", "1M", path_text(&empty)],
        LIMIT,
    )
    .ok();
}

#[test]
fn bad_arguments_get_clear_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("disk.img");
    std::fs::write(&existing, vec![1u8; 64 << 10]).unwrap();
    let missing = dir.path().join("missing.img");
    let cases: &[(&[&str], &str)] = &[
        (&["--bs", "0"], "--bs"),
        (&["--direct", "--bs", "1000"], "multiple of 512"),
        (&["--size", "1M"], "larger than the target"),
        (&["--bs", "1M"], "smaller than one --bs block"),
        (&["--conns", "2"], "--conns is for NBD"),
        (&["--time", "0"], "invalid duration"),
        (&["--rw", "sideways"], "invalid value"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["bench"];
        args.extend_from_slice(extra);
        args.push(path_text(&existing));
        let run = tidemark(&args, LIMIT);
        assert_eq!(run.code(), 2, "{extra:?}: {run:#?}");
        assert!(run.stderr.contains(needle), "{extra:?}: {}", run.stderr);
        assert!(
            !run.stderr.contains("panicked"),
            "{extra:?}: {}",
            run.stderr
        );
    }
    let run = tidemark(&["bench", "--rw", "read", path_text(&missing)], LIMIT);
    assert_eq!(run.code(), 2);
    assert!(run.stderr.contains("needs existing data"), "{}", run.stderr);
    let run = tidemark(&["bench", "http://example.invalid/disk"], LIMIT);
    assert_eq!(run.code(), 2);
    assert!(run.stderr.contains("NBD URI"), "{}", run.stderr);
}
