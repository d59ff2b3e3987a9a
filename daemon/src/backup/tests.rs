//! Backup jobs driven in process through [`Daemon::execute`]: begin (full, incremental, a
//! group), end, status, the failure paths, and ids across a restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::broadcast;

use crate::protocol::{
    BackupBeginArgs, BackupEndArgs, CheckpointArgs, Command, ErrorClass, Event, NoArguments,
    PushFormat, VolumeCreateArgs,
};
use crate::{Config, Daemon};

const SIZE: u64 = 1 << 20;

/// A daemon on a temporary state dir, with images beside it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn open(&self) -> std::sync::Arc<Daemon> {
        Daemon::open(Config::new(self.path("state"))).unwrap()
    }

    /// A daemon with one 1 MiB volume per name.
    fn daemon(&self, volumes: &[&str]) -> std::sync::Arc<Daemon> {
        let daemon = self.open();
        for name in volumes {
            run(
                &daemon,
                Command::VolumeCreate(VolumeCreateArgs {
                    name: name.to_string(),
                    backing: self.path(&format!("{name}.img")),
                    size: Some(SIZE),
                    granularity: Some(65536),
                    tracking: None,
                }),
            );
        }
        daemon
    }
}

fn run(daemon: &std::sync::Arc<Daemon>, command: Command) -> serde_json::Value {
    daemon.execute(1, command).unwrap()
}

fn begin(volumes: &[&str]) -> BackupBeginArgs {
    BackupBeginArgs {
        volumes: volumes.iter().map(|v| v.to_string()).collect(),
        hooks: Some(Vec::new()),
        ..BackupBeginArgs::default()
    }
}

fn end_volume(volume: &str) -> Command {
    Command::BackupEnd(BackupEndArgs {
        volume: Some(volume.into()),
        id: None,
        failed: false,
    })
}

fn status(daemon: &std::sync::Arc<Daemon>) -> serde_json::Value {
    run(daemon, Command::BackupStatus(NoArguments {}))
}

/// The names of the events received so far, waiting up to 10 s for one named `until`.
fn events_until(events: &mut broadcast::Receiver<Event>, until: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut names = Vec::new();
    while Instant::now() < deadline {
        match events.try_recv() {
            Ok(event) => {
                names.push(event.event.clone());
                if event.event == until {
                    return names;
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    panic!("no {until} event within 10 s; got {names:?}");
}

fn write(daemon: &Daemon, volume: &str, offset: u64, len: usize) {
    daemon
        .volume(volume)
        .unwrap()
        .live_export()
        .write(offset, &vec![7; len], false)
        .unwrap();
}

#[test]
fn a_full_pull_backup_exports_its_snapshot_until_backup_end() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v"]);
    let mut events = daemon.subscribe();
    let report = run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            checkpoint: Some("c1".into()),
            ..begin(&["v"])
        }),
    );
    assert_eq!(report["state"], json!("running"));
    assert_eq!(report["mode"], json!("pull"));
    assert_eq!(report["checkpoint"], json!("c1"));
    assert_eq!(report["volumes"][0]["export"], json!("v@backup"));
    assert_eq!(report["volumes"][0]["size"], json!(SIZE));
    assert!(daemon.nbd.has_export("v@backup"));
    assert_eq!(status(&daemon)["running"][0]["id"], report["id"]);
    assert_eq!(
        run(&daemon, Command::VolumeList(NoArguments {}))[0]["backup"],
        report["id"]
    );

    let ended = run(&daemon, end_volume("v"));
    assert_eq!(ended["state"], json!("completed"));
    assert!(!daemon.nbd.has_export("v@backup"));
    let status = status(&daemon);
    assert_eq!(status["running"], json!([]));
    assert_eq!(status["finished"][0]["state"], json!("completed"));
    assert_eq!(
        events_until(&mut events, "BACKUP_COMPLETED"),
        ["BACKUP_STARTED", "BACKUP_COMPLETED"]
    );
}

#[test]
fn an_incremental_backup_offers_the_bitmap_since_its_checkpoint() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v"]);
    run(
        &daemon,
        Command::CheckpointCreate(CheckpointArgs {
            volume: "v".into(),
            name: "c1".into(),
        }),
    );
    write(&daemon, "v", 0, 4096);
    let report = run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            checkpoint: Some("c2".into()),
            incremental: Some("c1".into()),
            ..begin(&["v"])
        }),
    );
    assert_eq!(report["incremental"], json!("c1"));
    assert_eq!(report["volumes"][0]["bitmap"], json!("c1"));
    run(
        &daemon,
        Command::BackupEnd(BackupEndArgs {
            id: report["id"].as_str().map(str::to_string),
            volume: None,
            failed: false,
        }),
    );
    let unknown = daemon
        .execute(
            1,
            Command::BackupBegin(BackupBeginArgs {
                incremental: Some("nope".into()),
                ..begin(&["v"])
            }),
        )
        .unwrap_err();
    assert_eq!(unknown.class, ErrorClass::NotFound, "{}", unknown.desc);
}

#[test]
fn a_group_backup_snapshots_every_volume_under_one_id() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["a", "b"]);
    let report = run(&daemon, Command::BackupBegin(begin(&["a", "b"])));
    let exports: Vec<_> = report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["export"].clone())
        .collect();
    assert_eq!(exports, [json!("a@backup"), json!("b@backup")]);
    // Ending by either volume ends the whole backup.
    let ended = run(&daemon, end_volume("b"));
    assert_eq!(ended["id"], report["id"]);
    assert!(!daemon.nbd.has_export("a@backup"));
}

#[test]
fn begin_refuses_an_unknown_volume_and_a_volume_already_in_a_backup() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v"]);
    let unknown = daemon
        .execute(1, Command::BackupBegin(begin(&["nope"])))
        .unwrap_err();
    assert_eq!(unknown.class, ErrorClass::NotFound);
    let running = run(&daemon, Command::BackupBegin(begin(&["v"])));
    let again = daemon
        .execute(1, Command::BackupBegin(begin(&["v"])))
        .unwrap_err();
    assert_eq!(again.class, ErrorClass::Conflict);
    assert!(
        again.desc.contains(running["id"].as_str().unwrap()),
        "{}",
        again.desc
    );
    let no_backup = daemon.execute(1, end_volume("nope")).unwrap_err();
    assert_eq!(no_backup.class, ErrorClass::NotFound);
}

#[test]
fn a_full_cow_store_fails_the_backup_not_the_volume() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v"]);
    // Data to preserve: first writes over holes copy nothing and need no COW space.
    write(&daemon, "v", 0, SIZE as usize);
    let mut events = daemon.subscribe();
    run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            cow_limit: Some(65536),
            ..begin(&["v"])
        }),
    );
    // Overwriting the whole volume needs 1 MiB of COW space; the store holds 64 KiB.
    write(&daemon, "v", 0, SIZE as usize);
    let err = daemon.execute(1, end_volume("v")).unwrap_err();
    assert_eq!(err.class, ErrorClass::GenericError);
    assert!(err.desc.contains("failed"), "{}", err.desc);
    assert_eq!(status(&daemon)["finished"][0]["state"], json!("failed"));
    let seen = events_until(&mut events, "BACKUP_FAILED");
    assert!(seen.contains(&"SNAPSHOT_FAILED".to_string()), "{seen:?}");
    // The live volume still serves, and a new backup starts.
    write(&daemon, "v", 0, 4096);
    run(&daemon, Command::BackupBegin(begin(&["v"])));
}

#[test]
fn a_lease_ends_the_backup_when_its_connection_closes() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v"]);
    daemon
        .execute(
            9,
            Command::BackupBegin(BackupBeginArgs {
                lease: true,
                ..begin(&["v"])
            }),
        )
        .unwrap();
    daemon.connection_closed(8);
    assert_eq!(status(&daemon)["running"].as_array().unwrap().len(), 1);
    daemon.connection_closed(9);
    assert_eq!(status(&daemon)["running"], json!([]));
    assert_eq!(status(&daemon)["finished"][0]["state"], json!("failed"));
}

fn assert_absent(path: &Path) {
    assert!(!path.exists(), "{} exists", path.display());
}

#[test]
fn a_push_writes_the_image_and_ends_by_itself() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v"]);
    write(&daemon, "v", 65536, 4096);
    let mut events = daemon.subscribe();
    let target = fx.path("v.backup");
    run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            push: Some(target.to_str().unwrap().into()),
            ..begin(&["v"])
        }),
    );
    events_until(&mut events, "BACKUP_COMPLETED");
    let image = std::fs::read(&target).unwrap();
    assert_eq!(image.len() as u64, SIZE);
    assert_eq!(&image[65536..65536 + 4096], &[7; 4096][..]);
    assert_absent(&crate::push::partial_path(&target));
}

#[test]
fn a_failed_push_leaves_no_partial_file() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v"]);
    run(
        &daemon,
        Command::CheckpointCreate(CheckpointArgs {
            volume: "v".into(),
            name: "c1".into(),
        }),
    );
    let mut events = daemon.subscribe();
    // An incremental image push updates an existing image; this one was never written.
    let target = fx.path("missing.img");
    run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            incremental: Some("c1".into()),
            push: Some(target.to_str().unwrap().into()),
            push_format: Some(PushFormat::Image),
            ..begin(&["v"])
        }),
    );
    events_until(&mut events, "BACKUP_FAILED");
    let finished = &status(&daemon)["finished"][0];
    assert_eq!(finished["state"], json!("failed"));
    assert!(
        finished["error"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{finished}"
    );
    assert_absent(&target);
    assert_absent(&crate::push::partial_path(&target));

    // A delta target inside the state dir is refused before anything starts.
    let inside = fx.path("state/v.delta");
    let refused = daemon
        .execute(
            1,
            Command::BackupBegin(BackupBeginArgs {
                push: Some(inside.to_str().unwrap().into()),
                push_format: Some(PushFormat::Delta),
                ..begin(&["v"])
            }),
        )
        .unwrap_err();
    assert_eq!(refused.class, ErrorClass::InvalidParameter);
    assert_absent(&crate::push::partial_path(&inside));
}

#[test]
fn backup_ids_stay_unique_across_a_restart() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v"]);
    let first = run(&daemon, Command::BackupBegin(begin(&["v"])));
    run(&daemon, end_volume("v"));
    drop(daemon);
    let daemon = fx.open();
    let second = run(&daemon, Command::BackupBegin(begin(&["v"])));
    assert_eq!(first["id"], json!("backup-1"));
    assert_eq!(second["id"], json!("backup-2"));
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let fx = Fixture::new();
    let _daemon = fx.open();
    let err = Daemon::open(Config::new(fx.path("state"))).unwrap_err();
    assert!(matches!(err, crate::DaemonError::Locked { .. }), "{err}");
}

#[test]
fn export_names_are_unique_across_volumes_and_backups() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v1", "v3"]);
    // A backup of v1 exported under the name a later volume wants.
    run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            export_name: Some("vm2".into()),
            ..begin(&["v1"])
        }),
    );
    let refused = daemon
        .execute(
            1,
            Command::VolumeCreate(VolumeCreateArgs {
                name: "vm2".into(),
                backing: fx.path("vm2.img"),
                size: Some(SIZE),
                granularity: Some(65536),
                tracking: None,
            }),
        )
        .unwrap_err();
    assert_eq!(refused.class, ErrorClass::Conflict);
    assert!(
        refused.desc.contains("vm2") && refused.desc.contains("backup"),
        "names the clash: {}",
        refused.desc
    );
    assert!(daemon.volume("vm2").is_err(), "no volume vm2 was made");
    assert_eq!(
        run(&daemon, Command::VolumeList(NoArguments {}))
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A backup whose export name is a volume's is refused the same way.
    let refused = daemon
        .execute(
            1,
            Command::BackupBegin(BackupBeginArgs {
                export_name: Some("v1".into()),
                ..begin(&["v3"])
            }),
        )
        .unwrap_err();
    assert_eq!(refused.class, ErrorClass::Conflict);
    assert!(
        refused.desc.contains("\"v1\"") && refused.desc.contains("volume"),
        "names the clash: {}",
        refused.desc
    );

    // Once the backup ends, the name is free for a volume.
    run(&daemon, end_volume("v1"));
    run(
        &daemon,
        Command::VolumeCreate(VolumeCreateArgs {
            name: "vm2".into(),
            backing: fx.path("vm2.img"),
            size: Some(SIZE),
            granularity: Some(65536),
            tracking: None,
        }),
    );
    assert!(daemon.nbd.has_export("vm2"));
}

/// The `confirmed` flag of each checkpoint of `volume`, by name.
fn confirmed(daemon: &std::sync::Arc<Daemon>, volume: &str) -> Vec<(String, bool)> {
    run(
        daemon,
        Command::CheckpointList(crate::protocol::CheckpointListArgs {
            volume: volume.into(),
        }),
    )
    .as_array()
    .unwrap()
    .iter()
    .map(|c| {
        (
            c["name"].as_str().unwrap().to_string(),
            c["confirmed"].as_bool().unwrap(),
        )
    })
    .collect()
}

#[test]
fn a_checkpoint_is_confirmed_only_when_its_backup_is_seen_through() {
    let fx = Fixture::new();
    let daemon = fx.daemon(&["v"]);
    // A pull whose client knows it failed.
    run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            checkpoint: Some("c1".into()),
            ..begin(&["v"])
        }),
    );
    assert_eq!(
        confirmed(&daemon, "v"),
        [("c1".into(), false)],
        "while running"
    );
    let ended = run(
        &daemon,
        Command::BackupEnd(BackupEndArgs {
            volume: Some("v".into()),
            id: None,
            failed: true,
        }),
    );
    assert_eq!(ended["state"], json!("failed"));
    assert_eq!(status(&daemon)["finished"][0]["state"], json!("failed"));
    assert_eq!(confirmed(&daemon, "v"), [("c1".into(), false)]);
    let info = run(&daemon, Command::QueryStatus(NoArguments {}));
    assert!(
        info.to_string().contains("\"confirmed\":false"),
        "info shows it: {info}"
    );

    // An incremental from it would skip data no backup stored: refused, saying why.
    write(&daemon, "v", 0, 4096);
    let refused = daemon
        .execute(
            1,
            Command::BackupBegin(BackupBeginArgs {
                incremental: Some("c1".into()),
                checkpoint: Some("c2".into()),
                ..begin(&["v"])
            }),
        )
        .unwrap_err();
    assert_eq!(refused.class, ErrorClass::Conflict);
    assert!(
        refused.desc.contains("unconfirmed")
            && refused.desc.contains("missing")
            && refused.desc.contains("--force"),
        "{}",
        refused.desc
    );
    assert_eq!(confirmed(&daemon, "v").len(), 1, "nothing was created");

    // Forced, it runs; ended normally, the checkpoint it made is confirmed.
    run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            incremental: Some("c1".into()),
            checkpoint: Some("c2".into()),
            force: true,
            ..begin(&["v"])
        }),
    );
    run(&daemon, end_volume("v"));
    assert_eq!(
        confirmed(&daemon, "v"),
        [("c1".into(), false), ("c2".into(), true)]
    );

    // A push the daemon completed confirms; a failed push does not.
    let mut events = daemon.subscribe();
    run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            checkpoint: Some("c3".into()),
            push: Some(fx.path("full.img").to_str().unwrap().into()),
            ..begin(&["v"])
        }),
    );
    events_until(&mut events, "BACKUP_COMPLETED");
    run(
        &daemon,
        Command::BackupBegin(BackupBeginArgs {
            incremental: Some("c3".into()),
            checkpoint: Some("c4".into()),
            push: Some(fx.path("missing.img").to_str().unwrap().into()),
            push_format: Some(PushFormat::Image),
            ..begin(&["v"])
        }),
    );
    events_until(&mut events, "BACKUP_FAILED");
    assert_eq!(
        confirmed(&daemon, "v")[2..],
        [("c3".into(), true), ("c4".into(), false)]
    );

    // The flag survives a restart of the daemon.
    drop(events);
    drop(daemon);
    let daemon = fx.open();
    assert_eq!(
        confirmed(&daemon, "v"),
        [
            ("c1".into(), false),
            ("c2".into(), true),
            ("c3".into(), true),
            ("c4".into(), false)
        ]
    );
}
