//! The backup repository end to end: `tidemark pull --repo` from the daemon's backup exports
//! (qemu-io writing the live volume between backups) into a directory and into SeaweedFS's
//! S3 server started on 127.0.0.1; every point restored equal to its snapshot; prune keeps
//! exactly the points asked for; a corrupt pack is named by verify and refused at restore;
//! a kill -9 mid-backup or mid-prune leaves a repository that verifies, and a rerun works;
//! an S3 server stopped mid-upload gives a clear error and no point. `tidemark repo export`
//! serves a point straight from SeaweedFS (read by nbdcopy and nbdinfo), maps the zero runs
//! inside chunks as holes (a sparse copy stays sparse) and turns a corrupt chunk into an NBD
//! EIO.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;
use tidemark_tests::daemon::{Daemon, Model};
use tidemark_tests::export::{export, Exported};
use tidemark_tests::peers::{have, nbdinfo_map, qemu_io, serve, unix_uri};
use tidemark_tests::point::full_pull_args;
use tidemark_tests::seaweed::{Seaweed, S3_ENV};
use tidemark_tests::{run, tidemark_bin, ChildGuard, Output};

const MIB: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(180);

fn tidemark(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(tidemark_bin());
    command.args(args).stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    run(&mut command, LIMIT).expect("running tidemark")
}

fn ok(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = tidemark(args, env);
    assert!(
        out.status.success(),
        "tidemark {args:?} failed: {}{}",
        out.stderr,
        out.stdout
    );
    out
}

fn json(args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(ok(&all, env).stdout.trim()).expect("JSON report")
}

fn random_writes(model: &mut Model, rng: &mut impl Rng, count: usize) -> Vec<String> {
    let size = model.0.len();
    (0..count)
        .map(|_| {
            let len = rng.gen_range(1..=48) * 4096;
            let offset = rng.gen_range(0..(size - len) / 512) * 512;
            model.write(offset, len, rng.gen_range(1..=255u8))
        })
        .collect()
}

/// `count` writes of 64 KiB at 64 KiB-aligned offsets scattered over the volume: the
/// dirty blocks of an incremental are single tracking blocks, far apart.
fn scattered_64k_writes(model: &mut Model, rng: &mut impl Rng, count: usize) -> Vec<String> {
    let blocks = model.0.len() / (64 << 10);
    (0..count)
        .map(|_| {
            let offset = rng.gen_range(0..blocks) * (64 << 10);
            model.write(offset, 64 << 10, rng.gen_range(1..=255u8))
        })
        .collect()
}

type Writes = fn(&mut Model, &mut rand::rngs::StdRng, usize) -> Vec<String>;

/// A full point and five incrementals of a daemon volume into `url`, each restored equal
/// to its snapshot; then prune --keep-last 2 keeps exactly the last two, which restore.
fn six_points_restore_and_prune(url: &str, extra: &[&str], env: &[(&str, &str)]) {
    six_points_with(url, extra, env, 24 * MIB, "1M", random_writes);
}

/// [`six_points_restore_and_prune`] on a volume of `size` bytes in a repository of
/// `chunk_size` chunks, the volume written with `writes`. Every incremental stores its
/// changes as pieces over earlier points' chunks, so the last two points kept by prune read
/// chunks only the dropped points stored.
fn six_points_with(
    url: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    size: usize,
    chunk_size: &str,
    writes: Writes,
) {
    let daemon = Daemon::start();
    daemon.create_volume("vm1", size as u64);
    let live = daemon.uri("vm1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut model = Model::new(size);
    qemu_io(&live, &writes(&mut model, &mut rng, 60));

    let mut init = vec!["repo", "init", url, "--chunk-size", chunk_size];
    init.extend(extra);
    ok(&init, env);
    let mut snapshots = Vec::new();
    for round in 0..6 {
        let checkpoint = format!("c{round}");
        let previous = format!("c{}", round.max(1) - 1);
        let mut begin = vec!["backup", "begin", "vm1", "--checkpoint", &checkpoint];
        if round > 0 {
            begin.extend(["--incremental", &previous]);
        }
        let backup = daemon.cli_json(&begin);
        let uri = backup["volumes"][0]["uri"]["unix"]
            .as_str()
            .expect("backup uri")
            .to_string();
        snapshots.push(model.clone());
        // The live volume keeps changing while the backup is pulled.
        qemu_io(&live, &writes(&mut model, &mut rng, 10));
        let mut pull = vec!["pull", &uri, "--repo", url, "--checkpoint", &checkpoint];
        if round == 0 {
            pull.push("--full");
        } else {
            pull.extend(["--bitmap", &previous]);
        }
        pull.extend(extra);
        let report = json(&pull, env);
        assert_eq!(
            report["repo_point"],
            Value::from(format!("vm1@{checkpoint}"))
        );
        if round > 0 {
            let dirty = report["bytes_dirty"].as_u64().expect("bytes_dirty");
            let pulled = report["bytes_pulled"].as_u64().expect("bytes_pulled");
            assert!(
                pulled <= dirty,
                "round {round}: pulled {pulled} > dirty {dirty}"
            );
            assert!(
                dirty < size as u64 / 2,
                "round {round}: {dirty} dirty bytes"
            );
        }
        daemon.cli_json(&["backup", "end", "vm1"]);
        qemu_io(&live, &writes(&mut model, &mut rng, 20));
    }

    let mut list = vec!["repo", "list", url];
    list.extend(extra);
    let listed = json(&list, env);
    let points: Vec<&str> = listed
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["point"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        points,
        ["vm1@c0", "vm1@c1", "vm1@c2", "vm1@c3", "vm1@c4", "vm1@c5"]
    );
    for point in &listed.as_array().expect("list")[1..] {
        // Every incremental stored the chunks its writes changed, and only those: qemu-io's
        // pattern writes compress to a few bytes per chunk.
        let new = point["new_bytes"].as_u64().unwrap_or(0);
        assert!(new > 0 && new < 64 << 10, "{point}: {new} new bytes");
        assert!(point["pieces"].as_u64() > Some(0), "{point}: no pieces");
        assert_eq!(
            point["parent"].as_str().map(|p| p.len()),
            Some(2),
            "{point}"
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let restore = |point: &str, snapshot: &Model| {
        let dest = dir.path().join(format!("{point}.img"));
        assert_restores_with(url, point, &dest, &snapshot.0, extra, env);
    };
    for (round, snapshot) in snapshots.iter().enumerate() {
        restore(&format!("vm1@c{round}"), snapshot);
    }
    restore("vm1@latest", &snapshots[5]);

    let mut verify = vec!["repo", "verify", url, "--read-data"];
    verify.extend(extra);
    let report = json(&verify, env);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
    assert_eq!(report["points"], 6);

    let mut prune = vec!["repo", "prune", url, "--keep-last", "2"];
    prune.extend(extra);
    let pruned = json(&prune, env);
    assert_eq!(
        pruned["removed_points"].as_array().map(Vec::len),
        Some(4),
        "{pruned}"
    );
    let listed = json(&list, env);
    let points: Vec<&str> = listed
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["point"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(points, ["vm1@c4", "vm1@c5"]);
    restore("vm1@c4", &snapshots[4]);
    restore("vm1@c5", &snapshots[5]);
    let report = json(&verify, env);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
}

#[test]
fn six_points_in_a_directory_restore_and_prune_keeps_the_last_two() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = dir.path().join("repo");
    six_points_restore_and_prune(url.to_str().unwrap(), &[], &[]);
}

#[test]
fn six_points_on_seaweedfs_s3_restore_and_prune_keeps_the_last_two() {
    let seaweed = Seaweed::start();
    let endpoint = seaweed.endpoint.clone();
    six_points_restore_and_prune("s3://bkt/vms", &["--s3-endpoint", &endpoint], &S3_ENV);
}

#[test]
fn six_points_with_the_default_chunk_size_and_scattered_64k_writes_in_a_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = dir.path().join("repo");
    six_points_with(
        url.to_str().unwrap(),
        &[],
        &[],
        64 * MIB,
        "4M",
        scattered_64k_writes,
    );
}

#[test]
fn six_points_with_the_default_chunk_size_and_scattered_64k_writes_on_seaweedfs_s3() {
    let seaweed = Seaweed::start();
    let endpoint = seaweed.endpoint.clone();
    six_points_with(
        "s3://bkt/vms",
        &["--s3-endpoint", &endpoint],
        &S3_ENV,
        64 * MIB,
        "4M",
        scattered_64k_writes,
    );
}

/// Back up the daemon volume `vm1` into `url` as `vm1@CHECKPOINT`, incrementally from
/// `parent`'s bitmap when given; the report of the pull.
fn backup_into(daemon: &Daemon, url: &str, checkpoint: &str, parent: Option<&str>) -> Value {
    let mut begin = vec!["backup", "begin", "vm1", "--checkpoint", checkpoint];
    let mut pull_mode = vec!["--full"];
    if let Some(parent) = parent {
        begin.extend(["--incremental", parent]);
        pull_mode = vec!["--bitmap", parent];
    }
    let backup = daemon.cli_json(&begin);
    let uri = backup["volumes"][0]["uri"]["unix"]
        .as_str()
        .expect("backup uri")
        .to_string();
    let mut pull = vec!["pull", &uri, "--repo", url, "--checkpoint", checkpoint];
    pull.extend(pull_mode);
    let report = json(&pull, &[]);
    daemon.cli_json(&["backup", "end", "vm1"]);
    report
}

#[test]
fn verify_read_data_names_a_corrupt_piece_and_restore_refuses_its_point_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    let daemon = Daemon::start();
    let size = 16 * MIB;
    daemon.create_volume("vm1", size as u64);
    let live = daemon.uri("vm1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(81);
    let mut model = Model::new(size);
    qemu_io(&live, &random_writes(&mut model, &mut rng, 40));
    ok(&["repo", "init", url], &[]);
    backup_into(&daemon, url, "c0", None);
    let full = model.clone();
    let before = packs(&repo);
    qemu_io(&live, &scattered_64k_writes(&mut model, &mut rng, 3));
    backup_into(&daemon, url, "c1", Some("c0"));
    let listed = listed_points(url);
    assert!(listed[1]["pieces"].as_u64() > Some(0), "{listed:?}");

    // The incremental's new packs hold only its pieces' chunks.
    let new: Vec<PathBuf> = packs(&repo)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(!new.is_empty());
    for pack in &new {
        let mut bytes = std::fs::read(pack).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x55;
        std::fs::write(pack, bytes).unwrap();
    }
    let out = tidemark(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stdout);
    assert!(
        out.stdout.contains("vm1@c1's piece at byte"),
        "the corrupt piece is not named: {}",
        out.stdout
    );
    let dest = dir.path().join("c1.img");
    let out = tidemark(
        &[
            "repo",
            "restore",
            url,
            "vm1@c1",
            "--into",
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(out.stderr.contains("corrupt"), "{}", out.stderr);
    assert_restores(url, "vm1@c0", &dir.path().join("c0.img"), &full.0);
}

/// The lower-case hex SHA-256 of the file at `path` (sha256sum).
fn sha256sum(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path), Duration::from_secs(30)).expect("sha256sum");
    out.stdout
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

#[test]
fn a_sha256_repository_made_with_hash_sha256_takes_a_full_and_an_incremental_backup_that_restore_equal(
) {
    let dir = tempfile::tempdir().expect("temp dir");
    // The default is BLAKE3, which older tidemarks refuse by its version.
    let default = dir.path().join("default");
    let config = json(&["repo", "init", default.to_str().unwrap()], &[]);
    assert_eq!(
        (&config["hash"], &config["version"]),
        (&"blake3".into(), &3.into())
    );
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    let config = json(&["repo", "init", url, "--hash", "sha256"], &[]);
    assert_eq!(
        (&config["hash"], &config["version"]),
        (&"sha256".into(), &1.into())
    );

    let daemon = Daemon::start();
    let size = 16 * MIB;
    daemon.create_volume("vm1", size as u64);
    let live = daemon.uri("vm1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(256);
    let mut model = Model::new(size);
    qemu_io(&live, &random_writes(&mut model, &mut rng, 40));
    backup_into(&daemon, url, "c0", None);
    let full = model.clone();
    qemu_io(&live, &scattered_64k_writes(&mut model, &mut rng, 3));
    backup_into(&daemon, url, "c1", Some("c0"));
    let listed = listed_points(url);
    assert!(listed[1]["pieces"].as_u64() > Some(0), "{listed:?}");

    // Packs are named by their SHA-256, as every tidemark before BLAKE3 names them.
    let packs = packs(&repo);
    assert!(!packs.is_empty());
    for pack in &packs {
        let name = pack.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, sha256sum(pack), "{}", pack.display());
    }
    let report = json(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
    assert_eq!(report["points"], 2);
    assert_restores(url, "vm1@c0", &dir.path().join("c0.img"), &full.0);
    assert_restores(url, "vm1@c1", &dir.path().join("c1.img"), &model.0);
}

/// The fixture's disk: 2 MiB + 4 KiB, a pattern with zeros in [1 MiB, 1.5 MiB).
fn fixture_disk() -> Vec<u8> {
    (0..2 * MIB + 4096)
        .map(|i| {
            if (MIB..MIB + MIB / 2).contains(&i) {
                0
            } else {
                ((i * 7) ^ (i >> 12)) as u8
            }
        })
        .collect()
}

#[test]
fn a_point_written_by_an_earlier_tidemark_in_index_version_1_still_restores_and_verifies() {
    // tests/fixtures/repo-v1: `repo init --chunk-size 64K` and `pull --full` of
    // [`fixture_disk`] as disk@old by tidemark bfe8186, before pieces (point index version 1).
    let dir = tempfile::tempdir().expect("temp dir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/repo-v1");
    let point = std::fs::read(fixture.join("points/disk/old")).unwrap();
    assert_eq!(&point[..12], b"TMPOINT1\x01\0\0\0", "not a version 1 index");
    let repo = dir.path().join("repo");
    copy_repo(&fixture, &repo);
    let url = repo.to_str().unwrap();
    let disk = fixture_disk();
    assert_restores(url, "disk@old", &dir.path().join("old.img"), &disk);
    let report = json(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
    assert_eq!(report["points"], 1);
    let (_export, uri) = repo_export(dir.path(), url, ("disk@old", "disk@old"), &[], &[]);
    assert_nbdcopy_reads(&uri, &dir.path().join("copy.img"), &disk);
}

/// A file of `size` bytes of incompressible data in its first half, zeros after.
fn data_file(path: &Path, size: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data[..size as usize / 2]);
    std::fs::write(path, data).expect("writing the data file");
}

fn packs(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(repo.join("data"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for file in std::fs::read_dir(sub.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            out.push(file.path());
        }
    }
    out
}

const UUID: &str = "6f1c3e0a-8d9b-4c1e-9f57-2a8b7c6d5e4f";

/// A data file in a temporary directory, served read-only by `tidemark export`, and an
/// empty directory repository initialised beside it.
struct DataRepo {
    dir: tempfile::TempDir,
    file: PathBuf,
    exported: Exported,
    repo: PathBuf,
}

fn data_and_repo(size: u64) -> DataRepo {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("disk.raw");
    data_file(&file, size);
    let exported = export(dir.path(), &file, &["--read-only"]).expect("export");
    let repo = dir.path().join("repo");
    ok(&["repo", "init", repo.to_str().unwrap()], &[]);
    DataRepo {
        dir,
        file,
        exported,
        repo,
    }
}

#[test]
fn a_corrupt_pack_byte_is_named_by_verify_and_refused_at_restore() {
    let DataRepo {
        dir,
        file,
        exported,
        repo,
    } = data_and_repo(40 * MIB as u64);
    let url = repo.to_str().unwrap();
    let pull = [
        "pull",
        "--full",
        &exported.uri,
        "--repo",
        url,
        "--volume",
        "disk",
        "--volume-uuid",
        UUID,
        "--checkpoint",
        "a",
    ];
    ok(&pull, &[]);
    let dest = dir.path().join("restored.img");
    ok(
        &[
            "repo",
            "restore",
            url,
            "disk@a",
            "--into",
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&file).unwrap());
    std::fs::remove_file(&dest).unwrap();

    let victim = packs(&repo).into_iter().next().expect("a pack");
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();

    // Without --read-data the indexes are fine; with it the pack is named.
    ok(&["repo", "verify", url], &[]);
    let out = tidemark(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let text = &out.stdout;
    assert!(
        text.contains(&format!("BROKEN data/{}/{name}", &name[..2])),
        "{text}"
    );

    let out = tidemark(
        &[
            "repo",
            "restore",
            url,
            "disk@a",
            "--into",
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "restore of a corrupt point succeeded"
    );
    let err = &out.stderr;
    assert!(err.contains(&name) && err.contains("corrupt"), "{err}");
    assert!(!dest.exists(), "a refused restore left {}", dest.display());
}

#[test]
fn kill_9_mid_backup_leaves_no_point_and_a_rerun_and_gc_work() {
    let DataRepo {
        dir,
        file,
        exported,
        repo,
    } = data_and_repo(192 * MIB as u64);
    let url = repo.to_str().unwrap();
    let pull = [
        "pull",
        "--full",
        &exported.uri,
        "--repo",
        url,
        "--volume",
        "disk",
        "--volume-uuid",
        UUID,
        "--checkpoint",
        "a",
    ];
    let mut child = ChildGuard::spawn(
        Command::new(tidemark_bin())
            .args(pull)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("starting the pull");
    kill_9_when(&mut child, &repo, "a pack is stored", || {
        !packs(&repo).is_empty()
    });

    let listed = json(&["repo", "list", url], &[]);
    assert_eq!(listed, Value::Array(vec![]), "a killed backup left a point");
    let report = json(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");

    // The rerun breaks the dead owner's lock with a warning and stores the point.
    let out = ok(&pull, &[]);
    assert!(out.stderr.contains("stale lock"), "{}", out.stderr);
    let dest = dir.path().join("restored.img");
    ok(
        &[
            "repo",
            "restore",
            url,
            "disk@a",
            "--into",
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&file).unwrap());
    ok(&["repo", "gc", url], &[]);
    let report = json(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
    assert_eq!(report["points"], 1);
    std::fs::remove_file(&dest).unwrap();
    ok(
        &[
            "repo",
            "restore",
            url,
            "disk@latest",
            "--into",
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&file).unwrap());

    // A second point of the same data stores nothing new.
    let again = [
        "pull",
        "--full",
        &exported.uri,
        "--repo",
        url,
        "--volume",
        "disk",
        "--volume-uuid",
        UUID,
        "--checkpoint",
        "b",
    ];
    ok(&again, &[]);
    let listed = json(&["repo", "list", url], &[]);
    assert_eq!(listed[1]["point"], "disk@b");
    assert_eq!(listed[1]["new_bytes"], 0, "{listed}");
}

#[test]
fn an_s3_server_stopped_mid_upload_gives_a_clear_error_and_no_point() {
    let mut seaweed = Seaweed::start();
    let endpoint = seaweed.endpoint.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("disk.raw");
    // Large enough that the upload is still under way when the server stops 0.8 s in,
    // even on a quiet machine (its 512 MiB of data take about 2 s at the 280 MB/s full
    // backups to SeaweedFS reach here).
    data_file(&file, 1024 * MIB as u64);
    let exported = export(dir.path(), &file, &["--read-only"]).expect("export");
    let url = "s3://bkt/stopped";
    ok(&["repo", "init", url, "--s3-endpoint", &endpoint], &S3_ENV);
    let mut command = Command::new(tidemark_bin());
    command
        .args([
            "pull",
            "--full",
            &exported.uri,
            "--repo",
            url,
            "--volume",
            "disk",
            "--volume-uuid",
            UUID,
            "--checkpoint",
            "a",
            "--s3-endpoint",
            &endpoint,
        ])
        .envs(S3_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().expect("starting the pull");
    std::thread::sleep(Duration::from_millis(800));
    seaweed.stop();
    let started = Instant::now();
    let out = child.wait_with_output().expect("waiting for the pull");
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "the pull hung"
    );
    assert!(
        !out.status.success(),
        "the pull succeeded against a stopped server"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bkt") || err.contains("127.0.0.1") || err.contains("data/"),
        "the error does not say what failed: {err}"
    );
    // Back up on the same data: no point exists, and the repository verifies.
    seaweed.launch();
    let s3 = ["--s3-endpoint", endpoint.as_str()];
    let listed = json(&["repo", "list", url, s3[0], s3[1]], &S3_ENV);
    assert_eq!(listed, Value::Array(vec![]), "a failed upload left a point");
    let report = json(&["repo", "verify", url, s3[0], s3[1]], &S3_ENV);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
}

/// Start `tidemark repo export URL POINT --socket DIR/repo.sock EXTRA...` and wait for its
/// socket; the URI of the export `name` (by default the point's VOLUME@CHECKPOINT).
fn repo_export(
    dir: &Path,
    url: &str,
    (point, name): (&str, &str),
    extra: &[&str],
    env: &[(&str, &str)],
) -> (ChildGuard, String) {
    let socket = dir.join("repo.sock");
    let mut command = Command::new(tidemark_bin());
    command
        .args(["repo", "export", url, point, "--socket"])
        .arg(&socket)
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = serve(&mut command, &socket, Duration::from_secs(60))
        .unwrap_or_else(|err| panic!("{err:#}"));
    (child, unix_uri(name, &socket))
}

/// 32 MiB: random data with zero holes at [8, 12) MiB and from 24 MiB on.
fn holey_file(path: &Path) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(33);
    let mut data = vec![0u8; 32 * MIB];
    rng.fill(&mut data[..8 * MIB]);
    rng.fill(&mut data[12 * MIB..24 * MIB]);
    std::fs::write(path, &data).expect("writing the image");
    data
}

/// `tidemark pull --full URI --repo URL` as the point `disk@CHECKPOINT` (volume uuid [`UUID`]).
fn pull_point(uri: &str, url: &str, checkpoint: &str, extra: &[&str], env: &[(&str, &str)]) {
    let mut pull = vec![
        "pull",
        "--full",
        uri,
        "--repo",
        url,
        "--volume",
        "disk",
        "--volume-uuid",
        UUID,
        "--checkpoint",
        checkpoint,
    ];
    pull.extend(extra);
    ok(&pull, env);
}

/// A copy of the directory repository `from` at `to`.
fn copy_repo(from: &Path, to: &Path) {
    let copied = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(
        copied.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// `tidemark repo prune URL --keep-last N` in the background, quiet, with `env`.
fn start_prune(url: &str, keep_last: &str, env: &[(&str, &str)]) -> ChildGuard {
    ChildGuard::spawn(
        Command::new(tidemark_bin())
            .args(["repo", "prune", url, "--keep-last", keep_last])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("starting the prune")
}

/// Wait (60 s at most) until `reached`, while `child` runs; then kill -9 it and check that it
/// died holding the lock of the directory repository `repo`.
fn kill_9_when(child: &mut ChildGuard, repo: &Path, what: &str, reached: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reached() {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child ended before {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    assert!(
        repo.join("lock").exists(),
        "killed outside its lock ({what})"
    );
}

/// Store `file` as the full point `disk@a` of `url` (1 MiB chunks).
fn store_point(dir: &Path, file: &Path, url: &str, extra: &[&str], env: &[(&str, &str)]) {
    let exported = export(dir, file, &["--read-only"]).expect("export");
    let mut init = vec!["repo", "init", url, "--chunk-size", "1M"];
    init.extend(extra);
    ok(&init, env);
    pull_point(&exported.uri, url, "a", extra, env);
}

/// nbdcopy of `uri` into `copy` equals `data`.
fn assert_nbdcopy_reads(uri: &str, copy: &Path, data: &[u8]) {
    assert_nbdcopy_reads_with(&[], uri, copy, data);
}

/// nbdcopy with the options `args` of `uri` into `copy` equals `data`.
fn assert_nbdcopy_reads_with(args: &[&str], uri: &str, copy: &Path, data: &[u8]) {
    let out = run(
        Command::new("nbdcopy").args(args).arg(uri).arg(copy),
        Duration::from_secs(120),
    )
    .expect("running nbdcopy");
    assert!(out.status.success(), "nbdcopy: {}", out.stderr);
    assert!(
        std::fs::read(copy).unwrap() == data,
        "nbdcopy of {uri} differs from the image"
    );
}

#[test]
fn repo_export_of_an_s3_point_reads_equal_with_nbdcopy_and_maps_its_holes() {
    assert!(
        have("nbdcopy") && have("nbdinfo"),
        "nbdcopy/nbdinfo are not installed: run scripts/install-deps.sh"
    );
    let seaweed = Seaweed::start();
    let s3 = ["--s3-endpoint", seaweed.endpoint.as_str()];
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("disk.raw");
    let data = holey_file(&file);
    let url = "s3://bkt/exported";
    store_point(dir.path(), &file, url, &s3, &S3_ENV);

    let mut extra = vec!["--cache-size", "8M"];
    extra.extend(s3);
    let (_server, uri) = repo_export(dir.path(), url, ("disk@latest", "disk@a"), &extra, &S3_ENV);
    assert_nbdcopy_reads(&uri, &dir.path().join("copy.raw"), &data);

    // Zero chunks are holes (flags 3: hole + zero), data chunks are data (0).
    let map = nbdinfo_map(&uri, "base:allocation").expect("nbdinfo --map");
    let mib = MIB as u64;
    assert_eq!(
        map,
        [
            (0, 8 * mib, 0),
            (8 * mib, 4 * mib, 3),
            (12 * mib, 12 * mib, 0),
            (24 * mib, 8 * mib, 3)
        ],
        "{map:?}"
    );
    // The description names the volume, so `tidemark pull --repo` needs no --volume.
    let info = run(
        Command::new("nbdinfo").arg("--json").arg(&uri),
        Duration::from_secs(30),
    )
    .expect("nbdinfo");
    assert!(
        info.stdout
            .contains("tidemark repository point disk@a of volume disk")
            && info.stdout.contains(UUID),
        "{}",
        info.stdout
    );
}

/// 64 MiB alternating 1 MiB of random data and 1 MiB of zeros (what benches/repo-export.sh
/// reads): every 4 MiB chunk mixes both.
fn striped_file(path: &Path) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut data = vec![0u8; 64 * MIB];
    for mib in (0..64).step_by(2) {
        rng.fill(&mut data[mib * MIB..(mib + 1) * MIB]);
    }
    std::fs::write(path, &data).expect("writing the image");
    data
}

#[test]
fn repo_export_maps_the_zero_mibs_inside_chunks_as_holes_and_nbdcopy_keeps_them_sparse() {
    assert!(
        have("nbdcopy") && have("nbdinfo"),
        "nbdcopy/nbdinfo are not installed: run scripts/install-deps.sh"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("disk.raw");
    let data = striped_file(&file);
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    let exported = export(dir.path(), &file, &["--read-only"]).expect("export");
    ok(&["repo", "init", url, "--chunk-size", "4M"], &[]);
    pull_point(&exported.uri, url, "a", &[], &[]);
    drop(exported);

    let (_server, uri) = repo_export(dir.path(), url, ("disk@a", "disk@a"), &[], &[]);
    let map = nbdinfo_map(&uri, "base:allocation").expect("nbdinfo --map");
    let mib = MIB as u64;
    let want: Vec<(u64, u64, u32)> = (0..64)
        .map(|k| (k * mib, mib, if k % 2 == 0 { 0 } else { 3 }))
        .collect();
    assert_eq!(map, want, "the zero MiBs are not holes (flags 3)");

    // -S 0: no zero detection of nbdcopy's own, so the copy's holes are the export's.
    let copy = dir.path().join("copy.raw");
    assert_nbdcopy_reads_with(&["-S", "0"], &uri, &copy, &data);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        (32 * mib..=36 * mib).contains(&allocated),
        "the copy allocates {allocated} bytes: the holes were written as data"
    );
    assert_restores(url, "disk@a", &dir.path().join("restored.raw"), &data);
    let listed = listed_points(url);
    assert_eq!(listed[0]["zero_bytes_in_chunks"], 32 * mib, "{listed:?}");
    let report = json(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
}

/// Reads every MiB of `uri` with python3-libnbd: `ok` or the errno's name, one line per MiB.
const READ_EVERY_MIB: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for off in range(0, h.get_size(), 1 << 20):
    try:
        h.pread(1 << 20, off)
        print("ok")
    except nbd.Error as e:
        print(e.errno)
h.shutdown()
"#;

#[test]
fn a_corrupt_chunk_read_through_repo_export_is_an_nbd_eio_and_the_rest_still_reads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("disk.raw");
    let data = holey_file(&file);
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    store_point(dir.path(), &file, url, &[], &[]);
    let victim = packs(&repo).into_iter().next().expect("a pack");
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();

    let (mut server, uri) = repo_export(dir.path(), url, ("disk@a", "disk@a"), &[], &[]);
    let out = run(
        Command::new("/usr/bin/python3")
            .args(["-c", READ_EVERY_MIB])
            .arg(&uri),
        Duration::from_secs(60),
    )
    .expect("running python3-libnbd");
    assert!(out.status.success(), "python3-libnbd: {}", out.stderr);
    let results: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(results.len(), 32, "{}", out.stdout);
    let failed: Vec<usize> = (0..32).filter(|&i| results[i] != "ok").collect();
    assert_eq!(failed.len(), 1, "one chunk is corrupt: {results:?}");
    assert_eq!(results[failed[0]], "EIO", "not EIO: {results:?}");
    assert!(
        server.try_wait().unwrap().is_none(),
        "repo export died on a corrupt chunk"
    );
    // Every other MiB still reads equal over a new connection.
    let copy = dir.path().join("copy.raw");
    let out = run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", "--salvage", &uri])
            .arg(&copy),
        Duration::from_secs(60),
    )
    .expect("qemu-img convert --salvage");
    assert!(out.status.success(), "qemu-img: {}", out.stderr);
    let copied = std::fs::read(&copy).unwrap();
    for i in (0..32).filter(|&i| i != failed[0]) {
        assert!(
            copied[i * MIB..(i + 1) * MIB] == data[i * MIB..(i + 1) * MIB],
            "MiB {i} differs"
        );
    }
}

#[test]
fn repo_export_reads_ahead_across_packs_for_four_nbdcopy_connections_and_a_corrupt_chunk_stays_eio()
{
    assert!(
        have("nbdcopy"),
        "nbdcopy is not installed: run scripts/install-deps.sh"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("disk.raw");
    let mut rng = rand::rngs::StdRng::seed_from_u64(48);
    let mut data = vec![0u8; 48 * MIB];
    rng.fill(&mut data[..20 * MIB]);
    rng.fill(&mut data[22 * MIB..]);
    std::fs::write(&file, &data).expect("writing the image");
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    store_point(dir.path(), &file, url, &[], &[]);
    let packs = packs(&repo);
    assert!(
        packs.len() >= 3,
        "46 MiB of 1 MiB chunks in {} packs",
        packs.len()
    );

    // Read-ahead runs of 8 chunks, a cache of 12: the four connections' runs cross packs.
    let extra = ["--readahead", "8", "--cache-size", "12M"];
    let (server, uri) = repo_export(dir.path(), url, ("disk@a", "disk@a"), &extra, &[]);
    let copy = dir.path().join("copy.raw");
    assert_nbdcopy_reads_with(&["--connections=4"], &uri, &copy, &data);
    drop(server);

    // A chunk in the middle of the second pack: only its MiB fails, with EIO, read after read.
    let victim = &packs[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(victim, bytes).unwrap();
    let (mut server, uri) = repo_export(dir.path(), url, ("disk@a", "disk@a"), &extra, &[]);
    for _ in 0..2 {
        let out = run(
            Command::new("/usr/bin/python3")
                .args(["-c", READ_EVERY_MIB])
                .arg(&uri),
            Duration::from_secs(60),
        )
        .expect("running python3-libnbd");
        assert!(out.status.success(), "python3-libnbd: {}", out.stderr);
        let failed: Vec<&str> = out.stdout.lines().filter(|l| *l != "ok").collect();
        assert_eq!(failed, ["EIO"], "{}", out.stdout);
    }
    let out = run(
        Command::new("nbdcopy").arg(&uri).arg(&copy),
        Duration::from_secs(120),
    )
    .expect("running nbdcopy");
    assert!(!out.status.success(), "nbdcopy read a corrupt chunk");
    assert!(
        server.try_wait().unwrap().is_none(),
        "repo export died on a corrupt chunk"
    );
}

/// `repo restore URL POINT --into DEST` writes `expected`; DEST is removed afterwards.
fn assert_restores(url: &str, point: &str, dest: &Path, expected: &[u8]) {
    assert_restores_with(url, point, dest, expected, &[], &[]);
}

/// [`assert_restores`] with EXTRA arguments and environment `env` (an S3 repository).
fn assert_restores_with(
    url: &str,
    point: &str,
    dest: &Path,
    expected: &[u8],
    extra: &[&str],
    env: &[(&str, &str)],
) {
    let mut restore = vec![
        "repo",
        "restore",
        url,
        point,
        "--into",
        dest.to_str().unwrap(),
    ];
    restore.extend(extra);
    ok(&restore, env);
    assert!(
        std::fs::read(dest).unwrap() == expected,
        "the restore of {point} differs"
    );
    std::fs::remove_file(dest).unwrap();
}

fn point_objects(repo: &Path) -> usize {
    std::fs::read_dir(repo.join("points/disk"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[test]
fn kill_9_during_prune_leaves_a_repository_that_verifies_and_a_rerun_prunes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("disk.raw");
    let pristine = dir.path().join("pristine");
    let url = pristine.to_str().unwrap();
    ok(&["repo", "init", url, "--chunk-size", "1M"], &[]);
    let mut images = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    std::fs::write(&file, vec![0u8; 8 * MIB]).expect("image");
    let exported = export(dir.path(), &file, &["--read-only"]).expect("export");
    for round in 0..6 {
        let mut data = vec![0u8; 8 * MIB];
        rng.fill(&mut data[..]);
        std::fs::write(&file, &data).expect("rewriting the image");
        images.push(data);
        pull_point(&exported.uri, url, &format!("c{round}"), &[], &[]);
    }
    let mut caught = false;
    for trial in 0..10 {
        let repo = dir.path().join(format!("trial{trial}"));
        copy_repo(&pristine, &repo);
        let url = repo.to_str().unwrap();
        let mut child = start_prune(url, "1", &[]);
        // Kill it as soon as it has deleted its first point index.
        let deadline = Instant::now() + Duration::from_secs(60);
        while point_objects(&repo) == 6 && child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the prune deleted nothing in 60 s"
            );
        }
        child.kill().expect("kill -9");
        let _ = child.wait();
        let killed_inside = repo.join("lock").exists();

        let report = json(&["repo", "verify", url, "--read-data"], &[]);
        assert_eq!(
            report["problems"],
            Value::Array(vec![]),
            "trial {trial}: {report}"
        );
        let listed = json(&["repo", "list", url], &[]);
        let points: Vec<&str> = listed
            .as_array()
            .expect("list")
            .iter()
            .map(|p| p["point"].as_str().unwrap_or(""))
            .collect();
        assert!(points.contains(&"disk@c5"), "trial {trial}: {points:?}");
        let dest = dir.path().join("restored.img");
        assert_restores(url, "disk@c5", &dest, &images[5]);

        // The rerun breaks the dead prune's lock and finishes its work.
        let out = ok(&["repo", "prune", url, "--keep-last", "1"], &[]);
        if killed_inside {
            assert!(out.stderr.contains("stale lock"), "{}", out.stderr);
        }
        let listed = json(&["repo", "list", url], &[]);
        assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
        assert_eq!(listed[0]["point"], "disk@c5");
        let report = json(&["repo", "verify", url, "--read-data"], &[]);
        assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
        assert_eq!(report["packs"].as_u64(), Some(packs(&repo).len() as u64));
        assert_restores(url, "disk@c5", &dest, &images[5]);
        std::fs::remove_dir_all(&repo).unwrap();
        if killed_inside {
            caught = true;
            break;
        }
    }
    assert!(caught, "no kill -9 landed inside a prune in 10 trials");
}

/// Points of `url`'s listing.
fn listed_points(url: &str) -> Vec<Value> {
    json(&["repo", "list", url], &[])
        .as_array()
        .cloned()
        .expect("list")
}

#[test]
fn daemon_push_to_a_repository_stores_points_and_confirms_the_checkpoint_only_after_the_index() {
    let daemon = Daemon::start();
    let size = 16 * MIB;
    daemon.create_volume("vm1", size as u64);
    let live = daemon.uri("vm1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut model = Model::new(size);
    qemu_io(&live, &random_writes(&mut model, &mut rng, 40));
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    ok(&["repo", "init", url, "--chunk-size", "1M"], &[]);
    let target = format!("repo:{url}");
    let restore_equals = |point: &str, model: &Model| {
        assert_restores(url, point, &dir.path().join("restored.img"), &model.0);
    };

    let report = daemon.cli_json(&[
        "backup",
        "begin",
        "vm1",
        "--checkpoint",
        "c0",
        "--push",
        &target,
    ]);
    assert_eq!(report["push_result"][0]["point"], "vm1@c0", "{report}");
    let full = model.clone();
    qemu_io(&live, &random_writes(&mut model, &mut rng, 10));
    let report = daemon.cli_json(&[
        "backup",
        "begin",
        "vm1",
        "--incremental",
        "c0",
        "--checkpoint",
        "c1",
        "--push",
        &target,
    ]);
    assert_eq!(report["push_result"][0]["point"], "vm1@c1", "{report}");
    assert_eq!(report["push_result"][0]["parent"], "c0", "{report}");
    let points = listed_points(url);
    assert_eq!(points.len(), 2, "{points:?}");
    // The incremental stored only the chunks the ten writes touched (1 MiB chunks).
    assert!(
        points[1]["new_bytes"].as_u64().unwrap_or(u64::MAX) <= 10 * 3 * MIB as u64,
        "{points:?}"
    );
    restore_equals("vm1@c0", &full);
    restore_equals("vm1@c1", &model);

    // A point index that cannot be written fails the backup, and its checkpoint stays
    // unconfirmed: the next incremental from it is refused without --force.
    std::fs::write(repo.join("points/vm1/c2"), b"in the way").unwrap();
    qemu_io(&live, &random_writes(&mut model, &mut rng, 5));
    let out = daemon.cli(&[
        "backup",
        "begin",
        "vm1",
        "--incremental",
        "c1",
        "--checkpoint",
        "c2",
        "--push",
        &target,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("vm1@c2"),
        "a push whose point could not be written succeeded: {stderr}"
    );
    let out = daemon.cli(&[
        "backup",
        "begin",
        "vm1",
        "--incremental",
        "c2",
        "--checkpoint",
        "c3",
        "--push",
        &target,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unconfirmed"),
        "an incremental from the failed push's checkpoint was accepted: {stderr}"
    );
    // From the confirmed c1 it works, and the repository verifies.
    std::fs::remove_file(repo.join("points/vm1/c2")).unwrap();
    let report = daemon.cli_json(&[
        "backup",
        "begin",
        "vm1",
        "--incremental",
        "c1",
        "--checkpoint",
        "c4",
        "--push",
        &target,
    ]);
    assert_eq!(report["push_result"][0]["point"], "vm1@c4", "{report}");
    restore_equals("vm1@c4", &model);
    let report = json(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
}

/// Four full points `disk@c0..c3` of a 32 MiB image (1 MiB chunks), each rewriting every
/// chunk of the previous one but two: once c0 and c1 are dropped, c0's packs are dead and
/// c1's packs hold 2 live chunks of 30 (at most a third of any pack: partly live). The
/// images, in order.
fn four_overlapping_points(
    dir: &Path,
    url: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<Vec<u8>> {
    let file = dir.join("disk.raw");
    let size = 32 * MIB;
    std::fs::write(&file, vec![0u8; size]).expect("image");
    let exported = export(dir, &file, &["--read-only"]).expect("export");
    let mut init = vec!["repo", "init", url, "--chunk-size", "1M"];
    init.extend(extra);
    ok(&init, env);
    let mut rng = rand::rngs::StdRng::seed_from_u64(50);
    let mut data = vec![0u8; size];
    let mut images = Vec::new();
    for (round, shared) in [[99, 99], [0, 17], [3, 20], [5, 22]].iter().enumerate() {
        for (i, chunk) in data.chunks_mut(MIB).enumerate() {
            if !shared.contains(&i) {
                rng.fill(chunk);
            }
        }
        std::fs::write(&file, &data).expect("rewriting the image");
        images.push(data.clone());
        pull_point(&exported.uri, url, &format!("c{round}"), extra, env);
    }
    images
}

/// Objects (files, with sizes) under `prefix` of the directory repository `repo`, sorted.
/// object_store's staging files of puts in progress (`NAME#N`, renamed into place when
/// complete) are not objects: the store never lists them.
fn objects(repo: &Path, prefix: &str) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![repo.join(prefix)];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                stack.push(entry.path());
            } else if !entry.file_name().to_string_lossy().contains('#') {
                out.push((entry.path(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// Prune --keep-last 2 of [`four_overlapping_points`] repacks c1's partly live packs: the
/// repository shrinks to about its live chunks, both kept points restore equal, verify is
/// clean. Returns the prune's report.
fn prune_repacks(
    url: &str,
    images: &[Vec<u8>],
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Value {
    let with = |args: &[&'static str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.insert(2, url);
        all.extend(extra);
        all
    };
    let before = json(&with(&["repo", "verify", "--read-data"]), env);
    assert_eq!(before["problems"], Value::Array(vec![]), "{before}");
    let pruned = json(&with(&["repo", "prune", "--keep-last", "2"]), env);
    assert_eq!(
        pruned["removed_points"],
        serde_json::json!(["disk@c0", "disk@c1"]),
        "{pruned}"
    );
    assert!(pruned["repacked_packs"].as_u64() >= Some(1), "{pruned}");
    // c1's two chunks still live (3 and 20) were copied once each.
    assert_eq!(pruned["repacked_chunks"], 2, "{pruned}");
    let after = json(&with(&["repo", "verify", "--read-data"]), env);
    assert_eq!(after["problems"], Value::Array(vec![]), "{after}");
    // 62 live chunks of 1 MiB of random data remain (c2's 30 new, c1's 2, c3's 30 new).
    assert_eq!(after["chunks_checked"], 62, "{after}");
    let dest = dir.join("restored.img");
    assert_restores_with(url, "disk@c2", &dest, &images[2], extra, env);
    assert_restores_with(url, "disk@c3", &dest, &images[3], extra, env);
    pruned
}

#[test]
fn prune_repacks_partly_live_packs_in_a_directory_and_the_repository_shrinks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    let images = four_overlapping_points(dir.path(), url, &[], &[]);
    let bytes = |repo: &Path| objects(repo, "data").iter().map(|o| o.1).sum::<u64>();
    let before = bytes(&repo);
    assert!(
        before > 120 * MIB as u64,
        "{before} bytes of packs for 4 points"
    );
    prune_repacks(url, &images, dir.path(), &[], &[]);
    let after = bytes(&repo);
    // Without repacking c1's partly live packs would stay whole (10 MiB or more each).
    assert!(
        after < 63 * MIB as u64,
        "{after} bytes of packs for 62 live chunks of 1 MiB (before: {before})"
    );
    assert_eq!(
        objects(&repo, "data").len(),
        objects(&repo, "index").len(),
        "a pack without an index (or an index without a pack) was left"
    );
}

#[test]
fn prune_repacks_partly_live_packs_on_seaweedfs_s3() {
    let seaweed = Seaweed::start();
    let s3 = ["--s3-endpoint", seaweed.endpoint.as_str()];
    let dir = tempfile::tempdir().expect("temp dir");
    let url = "s3://bkt/repacked";
    let images = four_overlapping_points(dir.path(), url, &s3, &S3_ENV);
    let pruned = prune_repacks(url, &images, dir.path(), &s3, &S3_ENV);
    // Every pack of c0 and every repacked pack of c1 went.
    assert!(pruned["removed_packs"].as_u64() >= Some(4), "{pruned}");
    assert!(
        pruned["written_bytes"].as_u64() < Some(3 * MIB as u64),
        "{pruned}"
    );
}

/// Where in a repack the kill -9 lands.
#[derive(Debug, Clone, Copy)]
enum RepackStep {
    /// A new pack is written (its index maybe not).
    NewPack,
    /// A new pack index is written: its chunks are in two indexed packs.
    NewIndex,
    /// An old pack's index is deleted (the pack itself maybe not).
    OldIndexGone,
}

#[test]
fn kill_9_inside_a_repack_leaves_a_repository_that_verifies_and_a_rerun_finishes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pristine = dir.path().join("pristine");
    let images = four_overlapping_points(dir.path(), pristine.to_str().unwrap(), &[], &[]);
    // The repacking prune deletes c0 and c1 first: the state it starts repacking from.
    let old_indexes = objects(&pristine, "index");
    let old_packs = objects(&pristine, "data");
    for step in [
        RepackStep::NewPack,
        RepackStep::NewIndex,
        RepackStep::OldIndexGone,
    ] {
        let repo = dir.path().join(format!("{step:?}"));
        copy_repo(&pristine, &repo);
        let url = repo.to_str().unwrap();
        // Each write or delete of the repack is followed by a pause long enough to observe
        // the state it leaves and kill the prune in it.
        let mut child = start_prune(url, "2", &[("TIDEMARK_TEST_REPACK_DELAY_MS", "400")]);
        let rebased = |objects: &[(PathBuf, u64)]| -> Vec<PathBuf> {
            objects
                .iter()
                .map(|(p, _)| repo.join(p.strip_prefix(&pristine).unwrap()))
                .collect()
        };
        let (old_indexes, old_packs) = (rebased(&old_indexes), rebased(&old_packs));
        let reached = || match step {
            RepackStep::NewPack => objects(&repo, "data")
                .iter()
                .any(|o| !old_packs.contains(&o.0)),
            RepackStep::NewIndex => objects(&repo, "index")
                .iter()
                .any(|o| !old_indexes.contains(&o.0)),
            RepackStep::OldIndexGone => old_indexes.iter().any(|p| !p.exists()),
        };
        kill_9_when(&mut child, &repo, &format!("{step:?}"), reached);

        let report = json(&["repo", "verify", url, "--read-data"], &[]);
        assert_eq!(
            report["problems"],
            Value::Array(vec![]),
            "{step:?}: {report}"
        );
        let dest = dir.path().join("restored.img");
        assert_restores(url, "disk@c2", &dest, &images[2]);
        assert_restores(url, "disk@c3", &dest, &images[3]);

        // The rerun breaks the dead prune's lock and finishes: the leftovers go.
        let out = ok(&["repo", "prune", url, "--keep-last", "2"], &[]);
        assert!(
            out.stderr.contains("stale lock"),
            "{step:?}: {}",
            out.stderr
        );
        let report = json(&["repo", "verify", url, "--read-data"], &[]);
        assert_eq!(
            report["problems"],
            Value::Array(vec![]),
            "{step:?}: {report}"
        );
        assert_eq!(report["chunks_checked"], 62, "{step:?}: {report}");
        let data = objects(&repo, "data");
        assert_eq!(
            data.len(),
            objects(&repo, "index").len(),
            "{step:?}: leftovers"
        );
        let bytes: u64 = data.iter().map(|o| o.1).sum();
        assert!(bytes < 63 * MIB as u64, "{step:?}: {bytes} bytes of packs");
        assert_restores(url, "disk@c2", &dest, &images[2]);
        assert_restores(url, "disk@c3", &dest, &images[3]);
        std::fs::remove_dir_all(&repo).unwrap();
    }
}

#[test]
fn prune_is_refused_while_a_repo_export_serves_and_runs_after_it_stops() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("disk.raw");
    let data = holey_file(&file);
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    ok(&["repo", "init", url, "--chunk-size", "1M"], &[]);
    let exported = export(dir.path(), &file, &["--read-only"]).expect("export");
    let pull = |checkpoint: &str| pull_point(&exported.uri, url, checkpoint, &[], &[]);
    pull("a");

    let (mut server, uri) = repo_export(dir.path(), url, ("disk@a", "disk@a"), &[], &[]);
    // A backup only adds objects: a reader does not hold it up.
    pull("b");
    for command in [
        vec!["repo", "prune", url, "--keep-last", "1"],
        vec!["repo", "gc", url],
    ] {
        let out = tidemark(&command, &[]);
        assert!(!out.status.success(), "{command:?} ran under a live export");
        let owner = format!("being read by repo export of disk@a (pid {}", server.id());
        assert!(out.stderr.contains(&owner), "{command:?}: {}", out.stderr);
    }
    assert!(!repo.join("lock").exists(), "a refused prune left its lock");
    // Nothing was deleted: the export still reads every byte.
    assert_nbdcopy_reads(&uri, &dir.path().join("copy.raw"), &data);

    // SIGTERM: the export stops and removes its shared lock; prune then runs.
    let stopped = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(stopped.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "repo export ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        std::fs::read_dir(repo.join("locks")).map_or(0, |d| d.count()) == 0,
        "the stopped export left its shared lock"
    );
    let out = ok(&["repo", "prune", url, "--keep-last", "1"], &[]);
    assert!(!out.stderr.contains("stale"), "{}", out.stderr);
    assert_eq!(listed_points(url).len(), 1);

    // An export killed with -9 leaves a stale shared lock: the next prune breaks it.
    std::fs::remove_file(dir.path().join("repo.sock")).ok();
    let (mut server, _) = repo_export(dir.path(), url, ("disk@b", "disk@b"), &[], &[]);
    server.kill().expect("kill -9");
    let _ = server.wait();
    let out = ok(&["repo", "gc", url], &[]);
    assert!(out.stderr.contains("stale shared lock"), "{}", out.stderr);
    assert_restores(url, "disk@b", &dir.path().join("restored.img"), &data);
}

/// Every object_store staging file (`NAME#N`, N decimal) under the directory repository `repo`.
fn staging_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![repo.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                dirs.push(path);
            } else if matches!(name.rsplit_once('#'), Some((_, n))
                if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn kill_9_inside_a_put_leaves_a_staging_file_that_gc_removes_once_older_than_the_lease() {
    let DataRepo {
        dir,
        file,
        exported,
        repo,
    } = data_and_repo(192 * MIB as u64);
    let url = repo.to_str().unwrap();
    // A real kill -9 the moment a staging file appears; the put may still finish between
    // the look and the kill, so a few tries.
    let mut tries = 0;
    while staging_files(&repo).is_empty() {
        tries += 1;
        assert!(tries <= 8, "no kill -9 landed inside a put in 8 tries");
        let checkpoint = format!("a{tries}");
        let mut child = ChildGuard::spawn(
            Command::new(tidemark_bin())
                .args(full_pull_args(&exported.uri, url, "disk", &checkpoint))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("starting the pull");
        // Packs and pack indexes only: a kill inside the lock's own put would die outside it.
        kill_9_when(&mut child, &repo, "a staging file is written", || {
            !staging_files(&repo.join("data")).is_empty()
        });
    }
    let staged = staging_files(&repo);
    eprintln!("kill -9 left {staged:?} after {tries} tries");

    // Younger than the lock lease: a live writer may own it, so gc only counts it.
    let report = json(&["repo", "gc", url], &[]);
    assert_eq!(report["removed_staging_files"], 0, "{report}");
    assert_eq!(report["young_staging_files"], staged.len(), "{report}");
    assert_eq!(staging_files(&repo), staged);

    // Past the lease (6 h): the writer is gone, gc deletes the files and says so.
    let past_lease = std::time::SystemTime::now() - Duration::from_secs(7 * 3600);
    let mut bytes = 0;
    for path in &staged {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(past_lease).unwrap();
        bytes += f.metadata().unwrap().len();
    }
    let report = json(&["repo", "gc", url], &[]);
    assert_eq!(report["removed_staging_files"], staged.len(), "{report}");
    assert_eq!(report["removed_staging_bytes"], bytes, "{report}");
    assert_eq!(report["young_staging_files"], 0, "{report}");
    assert!(staging_files(&repo).is_empty());
    let out = ok(&["repo", "gc", url], &[]);
    assert!(
        !out.stdout.contains("staging"),
        "a second gc found staging files again: {}",
        out.stdout
    );
    let report = json(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");

    // The rerun stores the point, and it restores.
    pull_point(&exported.uri, url, "b", &[], &[]);
    let dest = dir.path().join("restored.img");
    assert_restores(url, "disk@b", &dest, &std::fs::read(&file).unwrap());
}

/// A new key file in `dir` made by `tidemark repo key generate`.
fn new_key(dir: &Path, name: &str) -> String {
    let key = dir.join(name);
    let key = key.to_str().expect("utf-8 path").to_string();
    let out = ok(&["repo", "key", "generate", &key], &[]);
    assert!(out.stdout.contains("key id"), "{}", out.stdout);
    key
}

#[test]
fn six_points_in_an_encrypted_directory_restore_verify_and_prune_keeps_the_last_two() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = new_key(dir.path(), "repo.key");
    let url = dir.path().join("repo");
    let url = url.to_str().unwrap();
    six_points_restore_and_prune(url, &[], &[("TIDEMARK_REPO_KEY", &key)]);
    let out = tidemark(&["repo", "list", url], &[]);
    assert!(
        !out.status.success(),
        "listed an encrypted repository without its key"
    );
    assert!(out.stderr.contains("is encrypted"), "{}", out.stderr);
}

#[test]
fn six_points_in_an_encrypted_seaweedfs_bucket_restore_verify_and_prune_keeps_the_last_two() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = new_key(dir.path(), "repo.key");
    let seaweed = Seaweed::start();
    let endpoint = seaweed.endpoint.clone();
    let mut env = S3_ENV.to_vec();
    env.push(("TIDEMARK_REPO_KEY", &key));
    six_points_restore_and_prune("s3://bkt/vms", &["--s3-endpoint", &endpoint], &env);
}

#[test]
fn repo_export_of_an_encrypted_point_reads_equal_with_nbdcopy() {
    assert!(
        have("nbdcopy"),
        "nbdcopy is not installed: run scripts/install-deps.sh"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let key = new_key(dir.path(), "repo.key");
    let file = dir.path().join("disk.raw");
    let data = holey_file(&file);
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    let env = [("TIDEMARK_REPO_KEY", key.as_str())];
    store_point(dir.path(), &file, url, &[], &env);
    let (_server, uri) = repo_export(
        dir.path(),
        url,
        ("disk@latest", "disk@a"),
        &["--cache-size", "8M"],
        &env,
    );
    assert_nbdcopy_reads(&uri, &dir.path().join("copy.raw"), &data);
}

#[test]
fn a_directory_repository_on_tmpfs_restores_verifies_and_exports_equal() {
    assert!(
        have("nbdcopy"),
        "nbdcopy is not installed: run scripts/install-deps.sh"
    );
    // Pack reads use O_DIRECT: tmpfs takes it since Linux 6.6, and before it refused it at
    // open, so reads there fall back to buffered ones.
    let dir = tempfile::tempdir().expect("temp dir");
    let shm = tempfile::tempdir_in("/dev/shm").expect("a temp dir on tmpfs (/dev/shm)");
    let file = dir.path().join("disk.raw");
    let data = holey_file(&file);
    let repo = shm.path().join("repo");
    let url = repo.to_str().unwrap();
    store_point(dir.path(), &file, url, &[], &[]);
    assert_restores(url, "disk@a", &dir.path().join("restored.raw"), &data);
    let report = json(&["repo", "verify", url, "--read-data"], &[]);
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
    let (_server, uri) = repo_export(dir.path(), url, ("disk@a", "disk@a"), &[], &[]);
    assert_nbdcopy_reads(&uri, &dir.path().join("copy.raw"), &data);
}

#[test]
fn daemon_push_into_an_encrypted_repository_uses_the_daemons_key_and_restores_equal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = new_key(dir.path(), "repo.key");
    let daemon = Daemon::start_with_env(&[("TIDEMARK_REPO_KEY", &key)]);
    let size = 16 * MIB;
    daemon.create_volume("vm1", size as u64);
    let live = daemon.uri("vm1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut model = Model::new(size);
    qemu_io(&live, &random_writes(&mut model, &mut rng, 40));
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    let mut init = vec!["repo", "init", url, "--chunk-size", "1M"];
    init.extend(["--encryption", &key]);
    ok(&init, &[]);
    let target = format!("repo:{url}");
    let mut begin = vec!["backup", "begin", "vm1", "--checkpoint", "c0"];
    begin.extend(["--push", &target]);
    let report = daemon.cli_json(&begin);
    assert_eq!(report["push_result"][0]["point"], "vm1@c0", "{report}");
    let full = model.clone();
    qemu_io(&live, &random_writes(&mut model, &mut rng, 10));
    let mut begin = vec!["backup", "begin", "vm1", "--checkpoint", "c1"];
    begin.extend(["--incremental", "c0", "--push", &target]);
    let report = daemon.cli_json(&begin);
    assert_eq!(report["push_result"][0]["parent"], "c0", "{report}");
    let env = [("TIDEMARK_REPO_KEY", key.as_str())];
    for (point, model) in [("vm1@c0", &full), ("vm1@c1", &model)] {
        let dest = dir.path().join(format!("{point}.img"));
        assert_restores_with(url, point, &dest, &model.0, &[], &env);
    }
    let out = tidemark(&["repo", "list", url], &[]);
    assert!(out.stderr.contains("is encrypted"), "{}", out.stderr);
}
