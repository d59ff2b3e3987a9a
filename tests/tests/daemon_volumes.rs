//! Volume and checkpoint management through the CLI, as a script or a person uses it:
//! human output by default, `--json` on request, errors with classes and exit codes.

use serde_json::{json, Value};
use tidemark_tests::daemon::{Daemon, Model};
use tidemark_tests::peers::{qemu_img_convert, qemu_io};

fn error_class(out: &std::process::Output) -> Value {
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON error report");
    report["error"]["class"].clone()
}

#[test]
fn volumes_are_created_listed_inspected_and_removed() {
    let daemon = Daemon::start();
    let backing = daemon.dir.path().join("disk.raw");
    let backing_arg = backing.to_str().unwrap();
    let out = daemon.cli(&[
        "volume",
        "create",
        "disk",
        "--backing",
        backing_arg,
        "--size",
        "8M",
        "--granularity",
        "4K",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("created volume disk") && text.contains("4.0 KiB"),
        "{text}"
    );
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 8 << 20);

    let info = daemon.cli_json(&["volume", "info", "disk"]);
    assert_eq!(info["name"], json!("disk"));
    assert_eq!(info["size"], json!(8 << 20));
    assert_eq!(info["granularity"], json!(4096));
    assert_eq!(info["uri"]["unix"], json!(daemon.uri("disk")));
    assert_eq!(info["backup"], Value::Null);

    let list = daemon.cli(&["volume", "list"]);
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(
        table.lines().count() == 2 && table.contains("disk"),
        "{table}"
    );
    assert_eq!(
        daemon
            .cli_json(&["volume", "list"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let elsewhere = daemon.dir.path().join("elsewhere.raw");
    let elsewhere = elsewhere.to_str().unwrap();
    for (args, class) in [
        (
            vec![
                "volume",
                "create",
                "disk",
                "--backing",
                elsewhere,
                "--size",
                "1M",
            ],
            "Conflict",
        ),
        (
            vec!["volume", "create", "other", "--backing", backing_arg],
            "Conflict",
        ),
        (
            vec!["volume", "create", "bad/name", "--backing", backing_arg],
            "InvalidParameter",
        ),
        (
            vec![
                "volume",
                "create",
                "g",
                "--backing",
                elsewhere,
                "--size",
                "1M",
                "--granularity",
                "3K",
            ],
            "InvalidParameter",
        ),
        (vec!["volume", "info", "nope"], "NotFound"),
        (vec!["volume", "remove", "nope"], "NotFound"),
    ] {
        let mut args = args.clone();
        args.push("--json");
        let out = daemon.cli(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(error_class(&out), json!(class), "{args:?}");
    }

    assert!(
        !daemon.dir.path().join("elsewhere.raw").exists(),
        "a refused create leaves no file"
    );
    let mut model = Model::new(8 << 20);
    qemu_io(&daemon.uri("disk"), &[model.write(0, 4096, 9)]);
    let removed = daemon.cli_json(&["volume", "remove", "disk"]);
    assert_eq!(removed["backing_kept"], json!(true));
    model.assert_equals_file(&backing, "the backing after volume remove");
    assert_eq!(daemon.cli_json(&["volume", "list"]), json!([]));
    let gone = std::process::Command::new("nbdinfo")
        .arg("--size")
        .arg(daemon.uri("disk"))
        .output()
        .unwrap();
    assert!(!gone.status.success(), "the export must be gone");
    // The same backing can be managed again.
    daemon.cli_json(&["volume", "create", "disk2", "--backing", backing_arg]);
}

#[test]
fn checkpoints_are_created_listed_and_deleted_without_losing_changes() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 4 << 20);
    daemon.cli_json(&["checkpoint", "create", "v", "c1"]);
    qemu_io(&daemon.uri("v"), &["write -P 1 0 64k".to_string()]);
    daemon.cli_json(&["checkpoint", "create", "v", "c2"]);
    qemu_io(&daemon.uri("v"), &["write -P 2 1M 64k".to_string()]);
    let list = daemon.cli_json(&["checkpoint", "list", "v"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c1", "c2"]);
    let human = daemon.cli(&["checkpoint", "list", "v"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("c2"));

    let dup = daemon.cli(&["checkpoint", "create", "v", "c1", "--json"]);
    assert_eq!(error_class(&dup), json!("Conflict"));
    let missing = daemon.cli(&["checkpoint", "delete", "v", "nope", "--json"]);
    assert_eq!(error_class(&missing), json!("NotFound"));

    // Deleting c2 merges its changes into c1: the incremental from c1 still has both.
    daemon.cli_json(&["checkpoint", "delete", "v", "c2"]);
    let backup = daemon.cli_json(&["backup", "begin", "v", "--incremental", "c1"]);
    let uri = backup["volumes"][0]["uri"]["unix"]
        .as_str()
        .unwrap()
        .to_string();
    let dirty = daemon.nbd_tool(&["dirty", &uri, "c1"]);
    assert_eq!(dirty.trim(), "[[0, 65536], [1048576, 65536]]");
}

#[test]
fn volumes_survive_a_restart_and_tcp_is_served_only_when_asked() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut daemon = Daemon::start_with(&["--listen", &listen, "--listen-insecure"]);
    daemon.create_volume("v", 1 << 20);
    let mut model = Model::new(1 << 20);
    let tcp = format!("nbd://{listen}/v");
    qemu_io(&tcp, &[model.write(512, 1024, 4)]);
    assert_eq!(
        daemon.cli_json(&["volume", "info", "v"])["uri"]["tcp"],
        json!(tcp)
    );
    assert!(daemon.stop().success());

    daemon.serve_args.clear();
    daemon.restart();
    let info = daemon.cli_json(&["volume", "info", "v"]);
    assert_eq!(info["uri"]["tcp"], Value::Null);
    assert!(
        std::net::TcpStream::connect(&listen).is_err(),
        "no TCP without --listen"
    );
    let copy = daemon.dir.path().join("copy.raw");
    qemu_img_convert(&daemon.uri("v"), &copy);
    model.assert_equals_file(&copy, "the volume after a restart");
}
