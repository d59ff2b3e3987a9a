//! The daemon's lifecycle and control protocol, against the real binary: malformed input
//! gets protocol errors (never a crash), one daemon per state dir, SIGTERM stops cleanly,
//! exit codes scripts can rely on.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use serde_json::json;
use tidemark_tests::daemon::{Control, Daemon};

#[test]
fn malformed_lines_get_protocol_errors_and_the_daemon_keeps_serving() {
    let daemon = Daemon::start();
    let mut control = daemon.control();
    assert_eq!(control.greeting["tidemark"]["protocol"], json!(1));
    for garbage in [
        &b"this is not json\n"[..],
        b"{\"execute\": \n",
        b"\x00\xff\xfe\n",
        b"42\n",
        b"{\"arguments\": {}}\n",
        b"{\"execute\": [\"volume-list\"]}\n",
        b"{\"execute\": \"volume-list\", \"arguments\": \"x\"}\n",
    ] {
        control.send_raw(garbage).unwrap();
        let reply = control.reply().unwrap();
        assert_eq!(
            reply["error"]["class"],
            json!("ProtocolError"),
            "{garbage:?} -> {reply}"
        );
        assert!(!reply["error"]["desc"].as_str().unwrap().is_empty());
    }
    // An over-long line is discarded and answered, the next request still works.
    let mut long = vec![b'{'; 2 << 20];
    long.push(b'\n');
    control.send_raw(&long).unwrap();
    assert_eq!(
        control.reply().unwrap()["error"]["class"],
        json!("ProtocolError")
    );

    let reply = control.execute("no-such-command", json!({}));
    assert_eq!(reply["error"]["class"], json!("CommandNotFound"));
    let reply = control.execute("volume-info", json!({"nmae": "x"}));
    assert_eq!(reply["error"]["class"], json!("InvalidParameter"));
    let reply = control.execute("volume-info", json!({"name": 5}));
    assert_eq!(reply["error"]["class"], json!("InvalidParameter"));
    let reply = control.execute("volume-info", json!({"name": "absent"}));
    assert_eq!(reply["error"]["class"], json!("NotFound"));
    assert_eq!(control.ok("volume-list", json!({})), json!([]));

    // A client that vanishes mid-line does not disturb the daemon either.
    {
        let mut half = UnixStream::connect(daemon.control_socket()).unwrap();
        half.write_all(b"{\"execute\": \"volume-li").unwrap();
    }
    let mut again = daemon.control();
    assert_eq!(again.ok("query-version", json!({}))["protocol"], json!(1));
}

#[test]
fn request_ids_are_echoed() {
    let daemon = Daemon::start();
    let mut control = daemon.control();
    control
        .send_raw(b"{\"execute\": \"query-version\", \"id\": {\"n\": 1}}\n")
        .unwrap();
    let reply = control.reply().unwrap();
    assert_eq!(reply["id"], json!({"n": 1}));
    control
        .send_raw(b"{\"execute\": \"nope\", \"id\": \"x\"}\n")
        .unwrap();
    assert_eq!(control.reply().unwrap()["id"], json!("x"));
}

#[test]
fn sockets_are_private_and_a_second_daemon_is_refused() {
    let daemon = Daemon::start();
    for socket in [daemon.control_socket(), daemon.nbd_socket()] {
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", socket.display());
    }
    let second = daemon.cli(&["serve"]);
    assert_eq!(second.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another `tidemark serve`"), "{stderr}");
    assert!(stderr.contains(&daemon.pid().to_string()), "{stderr}");
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_sockets() {
    let mut daemon = Daemon::start();
    let mut watcher = daemon.control();
    let status = daemon.stop();
    assert!(status.success(), "{status}: {}", daemon.log());
    let event = watcher
        .wait_event("SHUTDOWN", std::time::Duration::from_secs(5))
        .unwrap();
    assert_eq!(event["data"]["signal"], json!("SIGTERM"));
    assert!(!daemon.control_socket().exists());
    assert!(!daemon.nbd_socket().exists());
    // The state dir is reusable at once.
    daemon.restart();
    assert!(daemon.cli(&["info"]).status.success());
}

#[test]
fn a_stale_socket_from_a_killed_daemon_does_not_block_a_restart() {
    let mut daemon = Daemon::start();
    daemon.kill();
    assert!(
        daemon.control_socket().exists(),
        "kill -9 leaves the socket file behind"
    );
    daemon.restart();
    assert!(Control::connect(&daemon.control_socket()).is_ok());
}

#[test]
fn cli_exit_codes_distinguish_failure_from_an_absent_daemon() {
    let mut daemon = Daemon::start();
    let missing = daemon.cli(&["volume", "info", "absent", "--json"]);
    assert_eq!(missing.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&missing.stdout).unwrap();
    assert_eq!(report["error"]["class"], json!("NotFound"));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("tidemark volume list"));

    let info = daemon.cli_json(&["info"]);
    assert_eq!(info["pid"], json!(daemon.pid()));

    daemon.stop();
    let absent = daemon.cli(&["volume", "list"]);
    assert_eq!(absent.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&absent.stderr).contains("tidemark serve"));
}
