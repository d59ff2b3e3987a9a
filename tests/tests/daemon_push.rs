//! Push mode end to end: the daemon copies the snapshot itself (a full image, update-img
//! of an existing image, a delta file) and the backup ends by itself with its event.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tidemark_formats::delta::{DeltaReader, ExtentKind};
use tidemark_tests::daemon::{Daemon, Model};
use tidemark_tests::peers::qemu_io;

const SIZE: usize = 8 << 20;

/// Apply every extent of the delta file at `delta` onto `image`.
fn apply_delta(delta: &Path, image: &mut [u8]) -> (Option<String>, String) {
    let file = std::fs::File::open(delta).unwrap();
    let mut reader = DeltaReader::open(file, delta).unwrap();
    let header = reader.header().clone();
    let extents = reader.extents().to_vec();
    let mut data = Vec::new();
    for extent in &extents {
        let range = extent.offset as usize..extent.end() as usize;
        match extent.kind {
            ExtentKind::Zero => image[range].fill(0),
            _ => {
                reader.read_extent(extent, &mut data).unwrap();
                image[range].copy_from_slice(&data);
            }
        }
    }
    (header.from.map(|c| c.name), header.to.name)
}

#[test]
fn full_then_update_img_then_delta_pushes_each_end_by_themselves() {
    let daemon = Daemon::start();
    daemon.create_volume("v", SIZE as u64);
    let live = daemon.uri("v");
    let mut model = Model::new(SIZE);
    qemu_io(
        &live,
        &[model.write(0, 3 << 20, 1), model.write(5 << 20, 4096, 2)],
    );
    let mut watcher = daemon.control();
    let image = daemon.dir.path().join("pushed.raw");
    let image_arg = image.to_str().unwrap();

    // Full image.
    let done = daemon.cli_json(&[
        "backup",
        "begin",
        "v",
        "--checkpoint",
        "c1",
        "--push",
        image_arg,
    ]);
    assert_eq!(done["state"], json!("completed"), "{done}");
    assert_eq!(done["mode"], json!("push"));
    model.assert_equals_file(&image, "full push");
    let event = watcher
        .wait_event("BACKUP_COMPLETED", Duration::from_secs(10))
        .unwrap();
    assert_eq!(event["data"]["id"], done["id"]);
    assert_eq!(done["progress"]["done"], done["progress"]["total"]);

    // update-img of that image with the changes since c1.
    qemu_io(
        &live,
        &[
            model.write(1 << 20, 100_000, 3),
            model.write(7 << 20, 512, 4),
        ],
    );
    let done = daemon.cli_json(&[
        "backup",
        "begin",
        "v",
        "--incremental",
        "c1",
        "--checkpoint",
        "c2",
        "--push",
        image_arg,
    ]);
    assert_eq!(done["state"], json!("completed"), "{done}");
    model.assert_equals_file(&image, "update-img push");
    // Only the changed blocks were copied: the 100000 bytes at 1 MiB touch two 64 KiB
    // blocks, the 512 bytes at 7 MiB one.
    assert_eq!(done["progress"]["total"], json!(3 * 65536), "{done}");

    // A delta of the changes since c2.
    let before = std::fs::read(&image).unwrap();
    qemu_io(&live, &[model.write(2 << 20, 8192, 5)]);
    let delta = daemon.dir.path().join("c2-c3.delta");
    let done = daemon.cli_json(&[
        "backup",
        "begin",
        "v",
        "--incremental",
        "c2",
        "--checkpoint",
        "c3",
        "--push",
        delta.to_str().unwrap(),
        "--push-format",
        "delta",
    ]);
    assert_eq!(done["state"], json!("completed"), "{done}");
    let mut restored = before;
    let (from, to) = apply_delta(&delta, &mut restored);
    assert_eq!((from.as_deref(), to.as_str()), (Some("c2"), "c3"));
    assert!(
        restored == model.0,
        "base image + delta differs from the volume"
    );
    let status = daemon.cli_json(&["backup", "status"]);
    assert_eq!(status["running"], json!([]));
}

#[test]
fn a_push_is_a_point_in_time_copy_while_the_volume_is_written() {
    let daemon = Daemon::start();
    let size = 64usize << 20;
    daemon.create_volume("v", size as u64);
    let live = daemon.uri("v");
    let mut model = Model::new(size);
    qemu_io(&live, &[model.write(0, size, 0x33)]);
    let snapshot = model.clone();
    let mut watcher = daemon.control();
    let image = daemon.dir.path().join("pit.raw");
    let started = daemon.cli_json(&[
        "backup",
        "begin",
        "v",
        "--push",
        image.to_str().unwrap(),
        "--no-wait",
    ]);
    assert_eq!(started["state"], json!("running"));
    let writes: Vec<String> = (0..32)
        .map(|i| model.write(i * (2 << 20), 1 << 20, 0x44))
        .collect();
    qemu_io(&live, &writes);
    let event = watcher
        .wait_event("BACKUP_COMPLETED", Duration::from_secs(60))
        .unwrap();
    assert_eq!(event["data"]["id"], started["id"]);
    snapshot.assert_equals_file(&image, "push taken before the writes");
}

#[test]
fn an_incremental_push_without_a_base_image_fails_cleanly() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    daemon.cli_json(&["checkpoint", "create", "v", "c1"]);
    let missing = daemon.dir.path().join("missing.raw");
    let out = daemon.cli(&[
        "backup",
        "begin",
        "v",
        "--incremental",
        "c1",
        "--push",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("full backup there first"), "{stderr}");
    assert!(!missing.exists());
    let status = daemon.cli_json(&["backup", "status"]);
    assert_eq!(status["running"], json!([]));
    assert_eq!(status["finished"][0]["state"], json!("failed"));
}

#[test]
fn two_volumes_push_to_their_own_targets() {
    let daemon = Daemon::start();
    let mut models = Vec::new();
    for (name, byte) in [("a", 7u8), ("b", 9u8)] {
        daemon.create_volume(name, 2 << 20);
        let mut model = Model::new(2 << 20);
        qemu_io(&daemon.uri(name), &[model.write(4096, 65536, byte)]);
        models.push(model);
    }
    let target = daemon.dir.path().join("{volume}.pushed.raw");
    let template = daemon.cli(&["backup", "begin", "a", "b", "--push", "/tmp/same.raw"]);
    assert_eq!(
        template.status.code(),
        Some(2),
        "several volumes need {{volume}} in the target"
    );
    let done: Value = daemon.cli_json(&[
        "backup",
        "begin",
        "a",
        "b",
        "--push",
        target.to_str().unwrap(),
    ]);
    assert_eq!(done["state"], json!("completed"));
    models[0].assert_equals_file(&daemon.dir.path().join("a.pushed.raw"), "volume a");
    models[1].assert_equals_file(&daemon.dir.path().join("b.pushed.raw"), "volume b");
}

#[test]
fn a_push_onto_a_volume_backing_or_into_the_state_dir_is_refused() {
    let daemon = Daemon::start();
    let backing = daemon.create_volume("v", 1 << 20);
    let mut model = Model::new(1 << 20);
    qemu_io(&daemon.uri("v"), &[model.write(0, 4096, 1)]);
    for target in [backing.clone(), daemon.state_dir.join("x.raw")] {
        let out = daemon.cli(&[
            "backup",
            "begin",
            "v",
            "--push",
            target.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(2));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["error"]["class"],
            json!("InvalidParameter"),
            "{report}"
        );
    }
    model.assert_equals_file(&backing, "the volume after refused pushes");
}

/// A full push that fails (here: the second volume's image cannot grow past the daemon's
/// file size limit) leaves no target behind, leaves a target that existed untouched, and
/// leaves no partial file in the way of the retry.
#[test]
fn a_failed_full_push_removes_what_it_created_and_keeps_what_existed() {
    let limit = 4u64 << 20;
    let mut daemon = Daemon::start_with_file_size_limit(limit);
    let dir = daemon.dir.path().to_path_buf();
    let sizes = [("a", 1usize << 20), ("b", 8usize << 20)];
    let mut control = daemon.control();
    let mut models = Vec::new();
    for (at, (name, size)) in sizes.iter().enumerate() {
        // Created here: the daemon could not make b's backing that large.
        let backing = dir.join(format!("{name}.backing"));
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(*size as u64)
            .unwrap();
        control.ok(
            "volume-create",
            json!({"name": name, "backing": backing.to_str().unwrap()}),
        );
        let mut model = Model::new(*size);
        // Data only below the limit, where the daemon may write b's backing.
        qemu_io(&daemon.uri(name), &[model.write(0, 1 << 20, 1 + at as u8)]);
        models.push(model);
    }
    // a's target is an older backup that must survive; b's target is new.
    let old = vec![0x77u8; 1 << 20];
    let target_a = dir.join("a.img");
    let target_b = dir.join("b.img");
    std::fs::write(&target_a, &old).unwrap();
    let template = dir.join("{volume}.img");
    let begun = control.ok(
        "backup-begin",
        json!({"volumes": ["a", "b"], "push": template.to_str().unwrap()}),
    );
    let failed = control
        .wait_event("BACKUP_FAILED", Duration::from_secs(20))
        .unwrap();
    assert_eq!(failed["data"]["id"], begun["id"]);
    assert!(
        failed["data"]["error"].as_str().unwrap().contains("b.img"),
        "{failed}"
    );
    assert!(
        std::fs::read(&target_a).unwrap() == old,
        "the failed push changed a's old image"
    );
    assert!(
        !target_b.exists(),
        "the failed push left {}",
        target_b.display()
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");

    // Without the limit the same push succeeds and replaces a's old image.
    drop(control);
    daemon.stop();
    daemon.file_size_limit = None;
    daemon.restart();
    let mut control = daemon.control();
    control.ok(
        "backup-begin",
        json!({"volumes": ["a", "b"], "push": template.to_str().unwrap()}),
    );
    control
        .wait_event("BACKUP_COMPLETED", Duration::from_secs(20))
        .unwrap();
    models[0].assert_equals_file(&target_a, "a after the retried push");
    models[1].assert_equals_file(&target_b, "b after the retried push");
}
