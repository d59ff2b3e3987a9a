//! The write pause of a group `backup begin` while writers run, end to end. The pause no
//! longer waits for the bitmap syncs of the writes in flight, and the chain naming the
//! new checkpoint is synced after it: a write that straddles the pause must land in the
//! new checkpoint's bitmap and keep the snapshot as it was, and the new checkpoint must
//! be what a restart after kill -9 finds.

use std::io::{BufRead, BufReader};

use serde_json::Value;
use tidemark_tests::daemon::Daemon;
use tidemark_tests::peers::qemu_img_convert;

fn files_equal(a: &std::path::Path, b: &std::path::Path, what: &str) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at offset {at}");
    }
}

fn export_uri(backup: &Value, index: usize) -> String {
    backup["volumes"][index]["uri"]["unix"]
        .as_str()
        .expect("backup export uri")
        .to_string()
}

/// Three volumes, a writer on each (one write at a time, each acknowledged write
/// printed): a group begin with a new checkpoint while they write, each snapshot pulled
/// with qemu-img while they go on, then kill -9. After the restart, an incremental since
/// the group's checkpoint applied to what was pulled gives every volume's content: no
/// write after (or across) the pause was missed, none before it was counted twice into
/// the snapshot, and the checkpoint survived.
#[test]
fn writes_racing_a_group_begin_are_in_its_checkpoint_after_kill_9() {
    let mut daemon = Daemon::start();
    let names = ["g0", "g1", "g2"];
    let backings: Vec<_> = names
        .iter()
        .map(|name| daemon.create_volume(name, 16 << 20))
        .collect();
    let first = daemon.cli_json(&["backup", "begin", "g0", "g1", "g2", "--checkpoint", "c0"]);
    assert_eq!(first["volumes"].as_array().unwrap().len(), 3, "{first}");
    daemon.cli_json(&["backup", "end", "g0"]);

    let mut writers: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut writer =
                daemon.nbd_tool_spawn(&["pattern", &daemon.uri(name), &(11 + i).to_string()]);
            let acked = BufReader::new(writer.stdout.take().unwrap());
            (writer, acked)
        })
        .collect();
    let wait_acks = |writers: &mut Vec<(_, BufReader<std::process::ChildStdout>)>, n: usize| {
        let mut line = String::new();
        for (_, acked) in writers.iter_mut() {
            for _ in 0..n {
                line.clear();
                acked.read_line(&mut line).unwrap();
                assert!(!line.is_empty(), "a writer stopped early");
            }
        }
    };
    wait_acks(&mut writers, 10);
    let begun = daemon.cli_json(&[
        "backup",
        "begin",
        "g0",
        "g1",
        "g2",
        "--incremental",
        "c0",
        "--checkpoint",
        "c1",
    ]);
    let phases = &begun["write_pause_phases_us"];
    for phase in ["drain", "volumes", "bitmaps", "cow_stores", "checkpoints"] {
        assert!(phases[phase].as_u64().is_some(), "{phase}: {begun}");
    }
    assert!(
        phases["drain"].as_u64().unwrap() <= begun["write_pause_us"].as_u64().unwrap(),
        "{begun}"
    );
    let pulled: Vec<_> = (0..names.len())
        .map(|i| {
            let image = daemon.dir.path().join(format!("pulled-{i}.raw"));
            qemu_img_convert(&export_uri(&begun, i), &image);
            image
        })
        .collect();
    // Writes after the pause, then the daemon dies under them.
    wait_acks(&mut writers, 10);
    daemon.kill();
    for (mut writer, _) in writers {
        let _ = writer.wait();
    }

    daemon.restart();
    for (i, name) in names.iter().enumerate() {
        // c1 was never confirmed (its backup never ended): this client knows it pulled
        // the whole snapshot, and says so with --force.
        let backup = daemon.cli_json(&["backup", "begin", name, "--incremental", "c1", "--force"]);
        daemon.nbd_tool(&[
            "apply",
            &export_uri(&backup, 0),
            "c1",
            pulled[i].to_str().unwrap(),
        ]);
        daemon.cli_json(&["backup", "end", name]);
        files_equal(
            &pulled[i],
            &backings[i],
            &format!("{name}: snapshot at c1 + incremental since c1 after kill -9"),
        );
    }
}
