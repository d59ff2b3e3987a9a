//! Encrypted repositories end to end (`tidemark repo key generate`, `repo init --encryption`,
//! `--key`, `--repo-key`, $TIDEMARK_REPO_KEY): points stored by `tidemark pull --repo` from
//! `tidemark export` and restored equal; a wrong key, no key, a key file others can read, or
//! a key for a plain repository is refused when the repository is opened; a tampered sealed
//! chunk or point index is named by `repo verify --read-data` and refused at restore; equal
//! plaintext under two keys gets unrelated chunk ids, neither of them its SHA-256. The full
//! + incremental + prune runs on a directory and on SeaweedFS are in repo_backup.rs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::Value;
use tidemark_tests::point::{full_pull_args, repo_point_at};
use tidemark_tests::run::tidemark_env;
use tidemark_tests::{Output, MIB};

const LIMIT: Duration = Duration::from_secs(120);
const KEY_ENV: &str = "TIDEMARK_REPO_KEY";

/// `tidemark ARGS` with `env`, and never a key from the caller's environment.
fn tm(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = vec![(KEY_ENV, "")];
    all.extend(env);
    tidemark_env(args, &all, LIMIT)
}

fn ok(args: &[&str], env: &[(&str, &str)]) -> Output {
    tm(args, env).ok()
}

/// `tidemark ARGS`, which must fail with a message containing `want`.
fn refused(args: &[&str], env: &[(&str, &str)], want: &str) -> String {
    let out = tm(args, env);
    assert!(!out.status.success(), "tidemark {args:?} succeeded");
    assert!(
        out.stderr.contains(want),
        "tidemark {args:?}: {:?} lacks {want:?}",
        out.stderr
    );
    out.stderr
}

fn new_key(dir: &Path, name: &str) -> String {
    let key = dir.join(name).to_str().expect("utf-8 path").to_string();
    ok(&["repo", "key", "generate", &key], &[]);
    key
}

/// An image of `size` bytes: random first half, zeros after.
fn image(path: &Path, size: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut data = vec![0u8; size];
    rng.fill(&mut data[..size / 2]);
    std::fs::write(path, &data).expect("writing the image");
    data
}

/// Store `vol` as `point` of a new repository `url` (1 MiB chunks) with `key` (none: plain).
fn store(dir: &Path, vol: &Path, url: &Path, point: &str, key: Option<&str>) {
    let env: Vec<(&str, &str)> = key.map(|k| (KEY_ENV, k)).into_iter().collect();
    repo_point_at(vol, dir, url.to_str().unwrap(), point, &env);
}

fn restore(url: &str, point: &str, dest: &Path, key_args: &[&str]) -> Output {
    let mut args = vec![
        "repo",
        "restore",
        url,
        point,
        "--into",
        dest.to_str().unwrap(),
    ];
    args.extend(key_args);
    tm(&args, &[])
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("listing").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("reading");
    bytes[at] ^= 0x20;
    std::fs::write(path, bytes).expect("writing");
}

#[test]
fn a_wrong_key_no_key_or_a_key_others_can_read_is_refused_at_open_and_a_plain_repository_refuses_a_key(
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (k1, k2) = (new_key(dir.path(), "k1"), new_key(dir.path(), "k2"));
    refused(&["repo", "key", "generate", &k1], &[], "never overwritten");
    let vol = dir.path().join("disk.img");
    let data = image(&vol, 8 * MIB as usize);
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    let out = ok(
        &[
            "repo",
            "init",
            url,
            "--chunk-size",
            "1M",
            "--encryption",
            &k1,
        ],
        &[],
    );
    assert!(
        out.stdout.contains("encrypted with aes-256-gcm"),
        "{}",
        out.stdout
    );
    let exported = tidemark_tests::export::export(dir.path(), &vol, &["--read-only"]).unwrap();
    let pull = |checkpoint: &str, key_args: &[&str], env: &[(&str, &str)]| {
        let mut args = full_pull_args(&exported.uri, url, "disk", checkpoint);
        args.extend(key_args);
        ok(&args, env);
    };
    pull("a", &["--repo-key", &k1], &[]);
    let config = std::fs::read_to_string(repo.join("config")).unwrap();
    assert!(config.contains("\"key_check\""), "{config}");

    let dest = dir.path().join("out.img");
    let out = restore(url, "disk@a", &dest, &["--key", &k1]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        std::fs::read(&dest).unwrap() == data,
        "restored bytes differ"
    );

    let err = refused(
        &["repo", "list", url, "--key", &k2],
        &[],
        "does not open repository",
    );
    assert!(err.contains(url) && err.contains(&k2), "{err}");
    refused(
        &["repo", "verify", url],
        &[(KEY_ENV, &k2)],
        "does not open repository",
    );
    refused(&["repo", "list", url], &[], "is encrypted");
    std::fs::remove_file(&dest).unwrap();
    let out = restore(url, "disk@a", &dest, &["--key", &k2]);
    assert!(!out.status.success() && out.stderr.contains("does not open repository"));
    assert!(!dest.exists(), "a refused restore left {}", dest.display());

    std::fs::set_permissions(&k1, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    refused(&["repo", "list", url, "--key", &k1], &[], "chmod 600");
    std::fs::set_permissions(&k1, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // A second point with $TIDEMARK_REPO_KEY, and everything checks with it.
    pull("b", &[], &[(KEY_ENV, &k1)]);
    let report = ok(
        &["repo", "verify", url, "--read-data", "--json"],
        &[(KEY_ENV, &k1)],
    );
    let report: Value = serde_json::from_str(report.stdout.trim()).unwrap();
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
    assert_eq!(report["points"], 2);

    let plain = dir.path().join("plain");
    store(dir.path(), &vol, &plain, "disk@a", None);
    let plain = plain.to_str().unwrap();
    ok(&["repo", "list", plain], &[]);
    refused(
        &["repo", "list", plain, "--key", &k1],
        &[],
        "is not encrypted",
    );
}

#[test]
fn a_tampered_sealed_chunk_or_point_index_is_named_by_verify_and_refused_at_restore() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = new_key(dir.path(), "k");
    let vol = dir.path().join("disk.img");
    image(&vol, 8 * MIB as usize);
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap();
    store(dir.path(), &vol, &repo, "disk@a", Some(&key));
    let env = [(KEY_ENV, key.as_str())];
    let verify = || {
        let out = tm(&["repo", "verify", url, "--read-data", "--json"], &env);
        let report: Value = serde_json::from_str(out.stdout.trim()).expect("verify's report");
        (out.status.code(), report)
    };
    assert_eq!(verify().0, Some(0));

    // A byte inside the first sealed blob of a pack (after the magic and the nonce).
    let pack = files(&repo.join("data"))
        .into_iter()
        .next()
        .expect("a pack");
    flip(&pack, 8 + 12 + 40);
    let (code, report) = verify();
    assert_eq!(code, Some(2), "{report}");
    let problems = report["problems"].as_array().unwrap();
    let pack_name = pack.strip_prefix(&repo).unwrap().to_str().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["object"] == pack_name && p["problem"].as_str().unwrap().contains("disk@a")),
        "{report}"
    );
    let dest = dir.path().join("out.img");
    let out = restore(url, "disk@a", &dest, &["--key", &key]);
    assert!(!out.status.success(), "restored a tampered point");
    assert!(out.stderr.contains("corrupt"), "{}", out.stderr);
    flip(&pack, 8 + 12 + 40);
    assert_eq!(verify().0, Some(0));

    // The sealed point index has no CRC of its own outside the seal: AES-GCM catches it.
    let index = repo.join("points/disk/a");
    flip(&index, 40);
    let (code, report) = verify();
    assert_eq!(code, Some(2), "{report}");
    assert_eq!(report["problems"][0]["object"], "points/disk/a", "{report}");
    let problem = report["problems"][0]["problem"].as_str().unwrap();
    assert!(problem.contains("authentication failed"), "{report}");
    refused(
        &[
            "repo",
            "restore",
            url,
            "disk@a",
            "--into",
            dest.to_str().unwrap(),
        ],
        &env,
        "corrupt",
    );
    flip(&index, 40);

    // A point index copied under another point's name does not open (its path is sealed in).
    std::fs::copy(&index, repo.join("points/disk/copy")).unwrap();
    let (code, report) = verify();
    assert_eq!(code, Some(2), "{report}");
    assert_eq!(
        report["problems"][0]["object"], "points/disk/copy",
        "{report}"
    );
}

/// Every chunk id of `repo`, as `repo verify --read-data` names them once every byte of
/// every pack after its magic is overwritten (so every blob fails its CRC).
fn ids_named_by_verify(repo: &Path, env: &[(&str, &str)]) -> HashSet<String> {
    for pack in files(&repo.join("data")) {
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[8..].fill(0x55);
        std::fs::write(&pack, bytes).unwrap();
    }
    let out = tm(
        &[
            "repo",
            "verify",
            repo.to_str().unwrap(),
            "--read-data",
            "--json",
        ],
        env,
    );
    let report: Value = serde_json::from_str(out.stdout.trim()).expect("verify's report");
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            let text = p["problem"].as_str()?;
            let id = text.strip_prefix("chunk ")?.get(..64)?;
            Some(id.to_string())
        })
        .collect()
}

#[test]
fn equal_plaintext_under_two_keys_gets_unrelated_chunk_ids_nor_the_plain_ids() {
    let dir = tempfile::tempdir().expect("temp dir");
    let vol = dir.path().join("disk.img");
    image(&vol, 8 * MIB as usize);
    let (k1, k2) = (new_key(dir.path(), "k1"), new_key(dir.path(), "k2"));
    let mut named = Vec::new();
    for (name, key) in [("plain", None), ("a", Some(&k1)), ("b", Some(&k2))] {
        let repo = dir.path().join(name);
        store(dir.path(), &vol, &repo, "disk@a", key.map(String::as_str));
        let env: Vec<(&str, &str)> = key.map(|k| (KEY_ENV, k.as_str())).into_iter().collect();
        let ids = ids_named_by_verify(&repo, &env);
        // 4 MiB of random data in 1 MiB chunks; the zero half is not stored.
        assert_eq!(ids.len(), 4, "{name}: {ids:?}");
        named.push(ids);
    }
    assert!(
        named[0].is_disjoint(&named[1]),
        "key 1 stored the plain repository's (unkeyed BLAKE3) chunk ids"
    );
    assert!(
        named[0].is_disjoint(&named[2]),
        "key 2 stored the plain repository's (unkeyed BLAKE3) chunk ids"
    );
    assert!(
        named[1].is_disjoint(&named[2]),
        "two keys gave equal chunk ids"
    );
}
