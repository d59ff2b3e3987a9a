//! Many or careless NBD clients cannot exhaust the daemon: connections are capped
//! (`--max-connections`, refused with NBD_REP_ERR_POLICY past it), idle ones are closed
//! (`--idle-timeout`), TCP connections use keepalive, and control commands answer however
//! many NBD clients there are. Clients are python3-libnbd (and raw sockets).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_tests::daemon::Daemon;
use tidemark_tests::{tidemark_bin, ChildGuard};

/// Connect `COUNT` libnbd clients to `URI` one after another and hold them; print one JSON
/// line with how many connected and the refusals, then wait for stdin to close.
const HOLD: &str = r#"
import json, sys
import nbd
uri, count = sys.argv[1], int(sys.argv[2])
held, refusals = [], []
for _ in range(count):
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        h.pread(512, 0)
        held.append(h)
    except nbd.Error as e:
        refusals.append(str(e))
print(json.dumps({"connected": len(held), "refused": len(refusals),
                  "first_refusal": refusals[0] if refusals else None}), flush=True)
sys.stdin.read()
"#;

/// Connect to `URI`, read, sleep `IDLE` seconds, read again: print `open` or `closed`.
/// A second client reads every 0.5 s meanwhile and must stay open.
const IDLE: &str = r#"
import json, sys, time
import nbd
uri, idle = sys.argv[1], float(sys.argv[2])
quiet, busy = nbd.NBD(), nbd.NBD()
quiet.connect_uri(uri)
busy.connect_uri(uri)
quiet.pread(512, 0)
end = time.time() + idle
while time.time() < end:
    busy.pread(512, 0)
    time.sleep(0.5)
def state(h):
    try:
        h.pread(512, 0)
        return "open"
    except nbd.Error:
        return "closed"
print(json.dumps({"quiet": state(quiet), "busy": state(busy)}), flush=True)
"#;

fn python(script: &str, args: &[&str]) -> ChildGuard {
    let child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running /usr/bin/python3");
    ChildGuard::new(child)
}

/// The first stdout line of `child` as JSON, within `limit`.
fn first_line(child: &mut ChildGuard, limit: Duration) -> Value {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(limit).expect("the client reports in time");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads line")
}

#[test]
fn a_thousand_clients_are_capped_refused_and_control_still_answers() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 8 << 20);
    let pid = daemon.pid();
    let started = Instant::now();
    let mut clients = python(HOLD, &[&daemon.uri("v"), "1000"]);
    // Control commands answer while the clients connect.
    let mut control = daemon.control();
    let asked = Instant::now();
    control.ok("query-status", json!({}));
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "query-status took {:?} while clients connect",
        asked.elapsed()
    );
    let report = first_line(&mut clients, Duration::from_secs(240));
    eprintln!("1000 clients in {:?}: {report}", started.elapsed());
    // The default cap, and everyone else refused with the reason.
    assert_eq!(report["connected"], json!(64), "{report}");
    assert_eq!(report["refused"], json!(936), "{report}");
    // libnbd reports the error class, not the server's text (the raw client of the
    // export test reads that).
    let refusal = report["first_refusal"].as_str().unwrap_or_default();
    assert!(refusal.contains("server policy prevents"), "{refusal}");

    // With 64 clients held, the daemon's threads stay bounded (8 per connection) and a
    // backup begins at once.
    let count = threads(pid);
    eprintln!("daemon threads with 64 connections held: {count}");
    assert!(count < 64 * 8 + 64, "{count} threads with 64 connections");
    let asked = Instant::now();
    let begun = daemon.cli(&["backup", "begin", "v", "--json"]);
    assert!(
        begun.status.success(),
        "{}",
        String::from_utf8_lossy(&begun.stderr)
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "backup begin took {:?} with 64 NBD clients held",
        asked.elapsed()
    );
    let ended = daemon.cli(&["backup", "end", "v"]);
    assert!(ended.status.success());

    // Once they leave, new clients are served again.
    drop(clients.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("nbdinfo")
            .arg("--size")
            .arg(daemon.uri("v"))
            .output()
            .expect("nbdinfo");
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "8388608");
            break;
        }
        assert!(Instant::now() < deadline, "the daemon never served again");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = daemon.log();
    assert!(log.contains("refused"), "no refusal logged: {log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn idle_connections_are_closed_and_busy_ones_are_not() {
    let daemon = Daemon::start_with(&["--idle-timeout", "2s"]);
    daemon.create_volume("v", 1 << 20);
    let mut client = python(IDLE, &[&daemon.uri("v"), "5"]);
    let report = first_line(&mut client, Duration::from_secs(60));
    assert_eq!(report, json!({"quiet": "closed", "busy": "open"}));
    let log = daemon.log();
    assert!(
        log.contains("--idle-timeout"),
        "no idle close logged: {log}"
    );
}

#[test]
fn export_refuses_past_max_connections_and_keeps_tcp_alive() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let mut export = ChildGuard::new(
        Command::new(tidemark_bin())
            .arg("export")
            .arg(&image)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--listen-insecure",
                "--max-connections",
                "2",
                "--json",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let ready = first_line(&mut export, Duration::from_secs(20));
    let address = ready["address"].as_str().expect("address").to_string();
    let port = address.rsplit(':').next().unwrap().to_string();
    let uri = format!("nbd://{address}/");
    let mut clients = python(HOLD, &[&uri, "3"]);
    let report = first_line(&mut clients, Duration::from_secs(60));
    assert_eq!(report["connected"], json!(2), "{report}");
    assert_eq!(report["refused"], json!(1), "{report}");
    assert!(
        report["first_refusal"]
            .as_str()
            .unwrap_or_default()
            .contains("server policy prevents"),
        "{report}"
    );
    // The accepted sockets have keepalive on: ss shows the keepalive timer (once no
    // retransmission timer, which it shows first, is pending).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ss = Command::new("ss")
            .args([
                "-tno",
                "state",
                "established",
                "sport",
                "=",
                &format!(":{port}"),
            ])
            .output()
            .expect("ss");
        let ss = String::from_utf8_lossy(&ss.stdout).to_string();
        if ss.matches("keepalive").count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no keepalive on both: {ss}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A raw client that never finishes a handshake is refused too (it cannot hold a slot:
    // the two held ones have them).
    let mut raw = std::net::TcpStream::connect(&address).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut raw, &mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    raw.write_all(&1u32.to_be_bytes()).unwrap();
    // NBD_OPT_LIST: answered with NBD_REP_ERR_POLICY (2^31 + 2).
    let mut option = Vec::new();
    option.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    option.extend_from_slice(&3u32.to_be_bytes());
    option.extend_from_slice(&0u32.to_be_bytes());
    raw.write_all(&option).unwrap();
    let mut reply = [0u8; 20];
    std::io::Read::read_exact(&mut raw, &mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        (1 << 31) + 2
    );
    let length = u32::from_be_bytes(reply[16..20].try_into().unwrap());
    let mut message = vec![0u8; length as usize];
    std::io::Read::read_exact(&mut raw, &mut message).unwrap();
    let message = String::from_utf8_lossy(&message);
    assert!(
        message.contains("maximum of 2 connections (--max-connections)"),
        "{message}"
    );
    drop(clients.stdin.take());
    drop(export);
}
