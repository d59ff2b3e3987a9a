//! `tidemark serve --metrics`: the endpoint is scraped over HTTP and parsed by the
//! Prometheus project's own Python parsers (python3-prometheus-client: the OpenMetrics
//! parser, strict, and the classic text-format parser), and its figures follow real I/O:
//! qemu-io writing and reading through a volume's live export, a pull backup with a
//! libnbd client connected to its export, and the backup's end.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tidemark_tests::daemon::Daemon;
use tidemark_tests::peers::qemu_io;
use tidemark_tests::ChildGuard;

const MIB: u64 = 1 << 20;

const SCRAPER: &str = r#"
import json, sys, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as classic

if sys.argv[1] == "scrape":
    with urllib.request.urlopen(sys.argv[2], timeout=10) as reply:
        content_type = reply.headers["Content-Type"]
        text = reply.read().decode()
    samples = {}
    for family in openmetrics(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    classic_names = sorted({s.name for family in classic(text) for s in family.samples})
    print(json.dumps({"content_type": content_type, "samples": samples, "classic": classic_names}))
elif sys.argv[1] == "hold":
    import nbd
    h = nbd.NBD()
    h.connect_uri(sys.argv[2])
    print("connected", flush=True)
    sys.stdin.read()
    h.shutdown()
"#;

struct Scraper {
    script: std::path::PathBuf,
    url: String,
}

impl Scraper {
    fn new(daemon: &Daemon, port: u16) -> Scraper {
        let script = daemon.dir.path().join("scrape.py");
        std::fs::write(&script, SCRAPER).unwrap();
        Scraper {
            script,
            url: format!("http://127.0.0.1:{port}/metrics"),
        }
    }

    /// Every sample, as `name{labels}` -> value.
    fn scrape(&self, daemon: &Daemon) -> BTreeMap<String, f64> {
        let out = Command::new("/usr/bin/python3")
            .arg(&self.script)
            .args(["scrape", &self.url])
            .output()
            .expect("running /usr/bin/python3");
        assert!(
            out.status.success(),
            "scraping {}: {}\n{}",
            self.url,
            String::from_utf8_lossy(&out.stderr),
            daemon.log()
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["content_type"],
            json!("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        let classic = report["classic"].as_array().unwrap();
        assert!(
            classic.contains(&json!("tidemark_nbd_written_bytes_total")),
            "the classic parser read {classic:?}"
        );
        serde_json::from_value(report["samples"].clone()).unwrap()
    }

    fn hold(&self, uri: &str) -> ChildGuard {
        let child = Command::new("/usr/bin/python3")
            .arg(&self.script)
            .args(["hold", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("running /usr/bin/python3");
        let mut child = ChildGuard::new(child);
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "connected");
        child
    }
}

fn sample(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {samples:#?}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn metrics_parse_and_follow_writes_reads_connections_and_backups() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = Daemon::start_with(&["--metrics", &addr]);
    let scraper = Scraper::new(&daemon, port);
    daemon.create_volume("disk", 16 * MIB);
    daemon.cli_json(&["checkpoint", "create", "disk", "c0"]);

    let before = scraper.scrape(&daemon);
    assert_eq!(
        sample(&before, "tidemark_volume_dirty_blocks{volume=\"disk\"}"),
        0.0
    );
    assert_eq!(
        sample(&before, "tidemark_volume_size_bytes{volume=\"disk\"}"),
        (16 * MIB) as f64
    );
    assert_eq!(
        sample(&before, "tidemark_nbd_written_bytes_total{export=\"disk\"}"),
        0.0
    );
    assert_eq!(
        sample(&before, "tidemark_backup_jobs{state=\"running\"}"),
        0.0
    );

    // 1 MiB written at 1 MiB: 16 tracking blocks of 64 KiB; then 3 MiB read.
    let live = daemon.uri("disk");
    qemu_io(&live, &["write -P 7 1M 1M".to_string()]);
    qemu_io(&live, &["read 0 3M".to_string()]);
    let after_io = scraper.scrape(&daemon);
    assert_eq!(
        sample(
            &after_io,
            "tidemark_nbd_written_bytes_total{export=\"disk\"}"
        ),
        MIB as f64
    );
    assert_eq!(
        sample(&after_io, "tidemark_nbd_read_bytes_total{export=\"disk\"}"),
        (3 * MIB) as f64
    );
    assert_eq!(
        sample(&after_io, "tidemark_volume_dirty_blocks{volume=\"disk\"}"),
        16.0
    );
    assert_eq!(
        sample(&after_io, "tidemark_volume_dirty_bytes{volume=\"disk\"}"),
        MIB as f64
    );

    // A pull backup: a snapshot, a running job, a connection on its export; a write to
    // the live volume is preserved in the COW store first.
    let backup = daemon.cli_json(&["backup", "begin", "disk", "--checkpoint", "c1"]);
    let export = backup["volumes"][0]["export"].as_str().unwrap().to_string();
    let uri = backup["volumes"][0]["uri"]["unix"]
        .as_str()
        .unwrap()
        .to_string();
    let mut holder = scraper.hold(&uri);
    // Over data written before the snapshot (a hole needs no preserving).
    qemu_io(&live, &["write -P 9 1M 64k".to_string()]);
    let during = scraper.scrape(&daemon);
    assert_eq!(
        sample(&during, "tidemark_backup_jobs{state=\"running\"}"),
        1.0
    );
    assert_eq!(
        sample(&during, "tidemark_volume_snapshots{volume=\"disk\"}"),
        1.0
    );
    let cow = sample(&during, "tidemark_volume_cow_used_bytes{volume=\"disk\"}");
    assert!(
        cow >= 65536.0,
        "COW store use {cow} after a 64 KiB overwrite"
    );
    assert_eq!(
        sample(
            &during,
            &format!("tidemark_nbd_connections{{export=\"{export}\"}}")
        ),
        1.0
    );
    // The new checkpoint c1 starts clean; the 64 KiB write dirtied one block of it.
    assert_eq!(
        sample(&during, "tidemark_volume_dirty_blocks{volume=\"disk\"}"),
        1.0
    );
    drop(holder.stdin.take());
    holder.wait().unwrap();

    let ended = daemon.cli_json(&["backup", "end", "disk"]);
    assert_eq!(ended["state"], json!("completed"), "{ended}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut after = scraper.scrape(&daemon);
    for _ in 0..50 {
        if after.contains_key("tidemark_volume_last_backup_success{volume=\"disk\"}") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        after = scraper.scrape(&daemon);
    }
    assert_eq!(
        sample(&after, "tidemark_backup_jobs{state=\"running\"}"),
        0.0
    );
    assert_eq!(
        sample(
            &after,
            "tidemark_backup_jobs_ended_total{state=\"completed\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "tidemark_volume_last_backup_success{volume=\"disk\"}"
        ),
        1.0
    );
    let ended_at = sample(
        &after,
        "tidemark_volume_last_backup_timestamp_seconds{volume=\"disk\"}",
    );
    assert!(
        (now - ended_at).abs() < 60.0,
        "ended at {ended_at}, now {now}"
    );
    assert_eq!(
        sample(&after, "tidemark_volume_snapshots{volume=\"disk\"}"),
        0.0
    );
    assert!(
        !after.keys().any(|k| k.contains(&export)),
        "the ended backup's export is gone: {after:#?}"
    );
    // Counters never go back.
    assert!(
        sample(&after, "tidemark_nbd_written_bytes_total{export=\"disk\"}") >= (MIB + 65536) as f64
    );
}

/// GET `path` over a Unix socket; the status line and the body.
fn get_unix(socket: &std::path::Path, request: &str) -> (String, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

#[test]
fn metrics_on_a_private_unix_socket_answer_only_get_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("metrics.sock");
    let daemon = Daemon::start_with(&["--metrics", socket.to_str().unwrap()]);
    daemon.create_volume("v", 4 * MIB);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the metrics socket is private");

    let (status, body) = get_unix(&socket, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.contains("tidemark_volume_size_bytes{volume=\"v\"} 4194304\n"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let (status, _) = get_unix(&socket, "GET /nothing HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = get_unix(&socket, "DELETE /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, _) = get_unix(&socket, "\x16\x03\x01garbage\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
}

#[test]
fn serve_refuses_a_metrics_address_that_is_neither_host_port_nor_path() {
    let out = tidemark_tests::run::tidemark(
        &[
            "serve",
            "--metrics",
            "localhost",
            "--state-dir",
            "/nonexistent",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), 2, "a usage error");
    assert!(out.stderr.contains("neither HOST:PORT"), "{out:#?}");
}

/// Leaves no loop device or FUSE mount behind if the test fails before `volume detach`.
struct AttachedDevice {
    device: String,
    fuse_mount: String,
}

impl Drop for AttachedDevice {
    fn drop(&mut self) {
        let name = self.device.trim_start_matches("/dev/");
        let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"));
        if backing.is_ok_and(|file| file.starts_with(&self.fuse_mount)) {
            let _ = Command::new("losetup").args(["-d", &self.device]).output();
        }
        let _ = Command::new("umount")
            .args(["-l", &self.fuse_mount])
            .output();
    }
}

fn dd(args: &[&str]) {
    let out = Command::new("dd").args(args).output().expect("running dd");
    assert!(
        out.status.success(),
        "dd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn io_through_an_attached_device_is_counted_once_under_the_device() {
    let port = free_port();
    let daemon = Daemon::start_with(&["--metrics", &format!("127.0.0.1:{port}")]);
    let scraper = Scraper::new(&daemon, port);
    daemon.create_volume("disk", 16 * MIB);
    let attached = daemon.cli_json(&["volume", "attach", "disk", "--via", "fuse"]);
    let guard = AttachedDevice {
        device: attached["device"].as_str().expect("device").to_string(),
        fuse_mount: attached["fuse_mount"]
            .as_str()
            .expect("fuse_mount")
            .to_string(),
    };
    let labels = format!(
        "{{device=\"{}\",via=\"fuse\",volume=\"disk\"}}",
        guard.device
    );
    let before = scraper.scrape(&daemon);
    assert_eq!(
        sample(
            &before,
            &format!("tidemark_attach_written_bytes_total{labels}")
        ),
        0.0
    );

    let of = format!("of={}", guard.device);
    dd(&["if=/dev/urandom", &of, "bs=1M", "count=3", "oflag=direct"]);
    let input = format!("if={}", guard.device);
    dd(&["of=/dev/null", &input, "bs=1M", "count=2", "iflag=direct"]);

    let after = scraper.scrape(&daemon);
    let written = sample(
        &after,
        &format!("tidemark_attach_written_bytes_total{labels}"),
    );
    let read = sample(&after, &format!("tidemark_attach_read_bytes_total{labels}"));
    assert_eq!(written, (3 * MIB) as f64, "exactly what dd wrote");
    assert!(
        read >= (2 * MIB) as f64,
        "at least what dd read, got {read}"
    );
    assert_eq!(
        sample(&after, &format!("tidemark_attach_errors_total{labels}")),
        0.0
    );
    // Counted once: the device's I/O is not also an NBD export's.
    let nbd_written: f64 = after
        .iter()
        .filter(|(key, _)| key.starts_with("tidemark_nbd_written_bytes_total"))
        .map(|(_, value)| value)
        .sum();
    assert_eq!(nbd_written, 0.0, "{after:#?}");

    daemon.cli_json(&["volume", "detach", "disk"]);
    let detached = scraper.scrape(&daemon);
    assert!(
        !detached
            .keys()
            .any(|key| key.starts_with("tidemark_attach_")),
        "a detached device has no samples: {detached:#?}"
    );
    drop(guard);
}
