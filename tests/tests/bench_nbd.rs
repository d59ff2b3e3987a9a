//! `tidemark bench` against NBD servers other than tidemark (nbdkit, qemu-nbd): figures,
//! --verify, multi-conn, the --force guard, and proof that the figures come from real
//! completions: a throttled server gives the rate it was throttled to, a delayed one the
//! latency it was delayed by.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use tidemark_tests::peers::start_server;
use tidemark_tests::run::{number, tidemark};

const LIMIT: Duration = Duration::from_secs(120);

fn nbdkit(args: &[&str]) -> tidemark_tests::peers::Server {
    let mut all = vec!["-f", "-U", "{socket}", "-e", "bench"];
    all.extend_from_slice(args);
    start_server("nbdkit", &all, "bench")
}

#[test]
fn nbdkit_memory_write_verify_and_read_back() {
    let server = nbdkit(&["memory", "64M"]);
    let report = tidemark(
        &[
            "bench",
            "--rw",
            "randwrite",
            "--bs",
            "64K",
            "--qd",
            "16",
            "--size",
            "16M",
            "--verify",
            "--json",
            &server.uri,
        ],
        LIMIT,
    )
    .ok()
    .json();
    assert_eq!(report["target_kind"], "nbd");
    assert_eq!(report["engine"], "nbd");
    assert_eq!(report["region_bytes"], 16 << 20);
    assert_eq!(report["write"]["ops"], 256);
    assert_eq!(report["verify"]["checked_blocks"], 256);
    assert_eq!(report["verify"]["mismatched_blocks"], 0);
    assert!(
        number(&report, "/flush_secs") >= 0.0,
        "writes end with NBD_CMD_FLUSH"
    );

    // The whole export is the default region; a read pass checks the 16 MiB written and
    // finds the rest (never written, all zero) not holding the pattern.
    let report = tidemark(
        &[
            "bench",
            "--rw",
            "read",
            "--bs",
            "1M",
            "--size",
            "16M",
            "--verify",
            "--json",
            &server.uri,
        ],
        LIMIT,
    )
    .ok()
    .json();
    assert_eq!(report["verify"]["checked_blocks"], 16);
    assert_eq!(report["verify"]["mismatched_blocks"], 0);
    let whole = tidemark(
        &[
            "bench",
            "--rw",
            "read",
            "--bs",
            "1M",
            "--verify",
            "--json",
            &server.uri,
        ],
        LIMIT,
    );
    assert_eq!(whole.code(), 1);
    assert_eq!(whole.json()["verify"]["mismatched_blocks"], 48);
}

#[test]
fn multi_conn_spreads_requests_over_connections() {
    let server = nbdkit(&["memory", "64M"]);
    let report = tidemark(
        &[
            "bench",
            "--rw",
            "randrw",
            "--bs",
            "4K",
            "--qd",
            "32",
            "--conns",
            "4",
            "--size",
            "8M",
            "--verify",
            "--json",
            &server.uri,
        ],
        LIMIT,
    )
    .ok()
    .json();
    assert_eq!(report["conns"], 4);
    assert_eq!(report["ops"], 2048);
    assert_eq!(report["verify"]["mismatched_blocks"], 0);
}

#[test]
fn qemu_nbd_file_export_write_verify_and_injected_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    File::create(&image).unwrap().set_len(32 << 20).unwrap();
    let image_text = image.to_str().unwrap();
    let server = start_server(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-x",
            "bench",
            "-k",
            "{socket}",
            "--shared=4",
            "-t",
            image_text,
        ],
        "bench",
    );
    // A sparse image is all holes: writing it needs no --force.
    tidemark(
        &[
            "bench",
            "--rw",
            "write",
            "--bs",
            "256K",
            "--qd",
            "8",
            "--verify",
            "--seed",
            "5",
            &server.uri,
        ],
        LIMIT,
    )
    .ok();
    // Now it holds data: another write needs --force, and says why.
    let refused = tidemark(&["bench", "--rw", "randwrite", &server.uri], LIMIT);
    assert_eq!(refused.code(), 2, "{refused:#?}");
    assert!(refused.stderr.contains("holds data"), "{}", refused.stderr);
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);

    let corrupt_at: u64 = (7 << 20) + 4097;
    let file = File::options().read(true).write(true).open(&image).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, corrupt_at).unwrap();
    file.write_all_at(&[!byte[0]], corrupt_at).unwrap();
    file.sync_all().unwrap();
    let run = tidemark(
        &[
            "bench",
            "--rw",
            "randread",
            "--bs",
            "4K",
            "--qd",
            "8",
            "--verify",
            "--seed",
            "5",
            "--json",
            &server.uri,
        ],
        LIMIT,
    );
    assert_eq!(run.code(), 1, "{run:#?}");
    let report = run.json();
    assert_eq!(report["verify"]["mismatched_blocks"], 1);
    assert_eq!(report["verify"]["mismatches"][0]["offset"], corrupt_at);
}

#[test]
fn several_connections_need_a_server_that_allows_multi_conn() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    File::create(&image).unwrap().set_len(8 << 20).unwrap();
    // The multi-conn filter in disable mode: the export does not promise multi-conn, so
    // the run uses one connection and says so.
    let server = nbdkit(&[
        "--filter=multi-conn",
        "file",
        image.to_str().unwrap(),
        "multi-conn-mode=disable",
    ]);
    for rw in ["write", "read"] {
        let run = tidemark(
            &["bench", "--rw", rw, "--conns", "2", "--json", &server.uri],
            LIMIT,
        );
        let run = run.ok();
        let report = run.json();
        assert_eq!(report["conns"], 1, "{rw}");
        assert!(run.stderr.contains("multi-conn"), "{rw}: {}", run.stderr);
    }
}

#[test]
fn a_throttled_server_gives_the_rate_it_was_throttled_to() {
    // 160 Mbit/s = 20 MB/s for the whole server (nbdkit's "M" would be 2^20) with a
    // bucket of 0.1 s. nbdkit lets the first run of each direction through about 10%
    // faster; a short warm-up run takes that out, so the measured run sees the steady rate.
    let server = nbdkit(&[
        "--filter=rate",
        "memory",
        "256M",
        "rate=160000000",
        "burstiness=0.1",
    ]);
    for rw in ["read", "write"] {
        let bench = |size: &str| {
            tidemark(
                &[
                    "bench",
                    "--rw",
                    rw,
                    "--bs",
                    "64K",
                    "--qd",
                    "8",
                    "--size",
                    size,
                    "--force",
                    "--json",
                    &server.uri,
                ],
                LIMIT,
            )
            .ok()
            .json()
        };
        bench("8M");
        let report = bench("60M");
        let mb = number(&report, "/mb_per_sec");
        assert!(
            (18.5..=21.5).contains(&mb),
            "{rw}: {mb} MB/s through a 20 MB/s limit"
        );
        let elapsed = number(&report, "/elapsed_secs");
        assert!(
            (2.9..=3.4).contains(&elapsed),
            "{rw}: 62.9 MB at 20 MB/s took {elapsed} s"
        );
    }
}

#[test]
fn a_delayed_server_shows_its_delay_in_latency_and_queue_depth_in_iops() {
    let server = nbdkit(&["--filter=delay", "memory", "64M", "rdelay=20ms"]);
    let run = |qd: &str| {
        tidemark(
            &[
                "bench",
                "--rw",
                "randread",
                "--bs",
                "4K",
                "--qd",
                qd,
                "--time",
                "1.5",
                "--json",
                &server.uri,
            ],
            LIMIT,
        )
        .ok()
        .json()
    };
    let one = run("1");
    let p50_ms = number(&one, "/read/latency_ns/p50") / 1e6;
    let min_ms = number(&one, "/read/latency_ns/min") / 1e6;
    assert!(
        min_ms >= 20.0,
        "no read can beat the 20 ms delay: min {min_ms} ms"
    );
    assert!(p50_ms < 30.0, "p50 {p50_ms} ms for a 20 ms delay");
    let iops_one = number(&one, "/iops");
    assert!(
        (30.0..=50.0).contains(&iops_one),
        "QD1 behind 20 ms: {iops_one} IOPS"
    );
    // nbdkit serves requests in parallel, so 4 in flight give about 4 times the IOPS.
    let iops_four = number(&run("4"), "/iops");
    let gain = iops_four / iops_one;
    assert!((3.0..=4.4).contains(&gain), "QD4/QD1 = {gain}");
}

#[test]
fn read_only_exports_and_bad_uris_get_clear_errors() {
    let server = nbdkit(&["-r", "memory", "8M"]);
    let run = tidemark(&["bench", "--rw", "write", "--force", &server.uri], LIMIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("read-only"), "{}", run.stderr);
    tidemark(&["bench", "--rw", "read", "--bs", "1M", &server.uri], LIMIT).ok();

    let missing = tidemark(
        &["bench", "nbd+unix:///x?socket=/nonexistent/nbd.sock"],
        LIMIT,
    );
    assert_eq!(missing.code(), 2);
    assert!(
        missing.stderr.contains("/nonexistent/nbd.sock"),
        "{}",
        missing.stderr
    );
    assert!(!missing.stderr.contains("panicked"), "{}", missing.stderr);
}
