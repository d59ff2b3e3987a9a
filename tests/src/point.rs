//! Restore points for the tests: a volume image's full delta and its incremental deltas,
//! made with `tidemark delta create` as a backup would make them.

use std::ffi::OsStr;
use std::ops::Range;
use std::path::Path;

use crate::paths::arg;
use crate::{tidemark, tidemark_env, tidemark_with_input, COMMAND_LIMIT};

/// The volume uuid every test point records.
pub const POINT_UUID: &str = "5a1e0000-0000-4000-8000-0000000000e2";
/// The tracking block the deltas are cut at.
pub const BLOCK: u64 = 65536;

/// `tidemark delta create --full` of the image `vol` to checkpoint `to` (generation 1).
pub fn full_delta(vol: &Path, to: &str, out: &Path) {
    tidemark(
        &[
            "delta",
            "create",
            "--from",
            &arg(vol),
            "--full",
            "--volume-uuid",
            POINT_UUID,
            "--to-checkpoint",
            &format!("{to}:1"),
            "--out",
            &arg(out),
        ],
        COMMAND_LIMIT,
    )
    .ok();
}

/// `tidemark delta create` of the `changed` extents of `vol`, from checkpoint
/// `from` (generation `generation`) to `to` (the next generation).
pub fn incremental_delta(
    vol: &Path,
    changed: &[Range<u64>],
    from: &str,
    generation: u64,
    to: &str,
    out: &Path,
) {
    let list: String = changed
        .iter()
        .map(|r| format!("{} {}\n", r.start, r.end - r.start))
        .collect();
    tidemark_with_input(
        &[
            "delta",
            "create",
            "--from",
            &arg(vol),
            "--changed",
            "-",
            "--volume-uuid",
            POINT_UUID,
            "--from-checkpoint",
            &format!("{from}:{generation}"),
            "--to-checkpoint",
            &format!("{to}:{}", generation + 1),
            "--out",
            &arg(out),
        ],
        list.as_bytes(),
        COMMAND_LIMIT,
    )
    .ok();
}

/// The [`BLOCK`]s where the images `a` and `b` (of one size) differ, merged into ranges.
pub fn changed_blocks(a: &Path, b: &Path) -> Vec<Range<u64>> {
    let (a, b) = (
        std::fs::read(a).expect("read a"),
        std::fs::read(b).expect("read b"),
    );
    assert_eq!(a.len(), b.len(), "the images differ in size");
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, (x, y)) in a
        .chunks(BLOCK as usize)
        .zip(b.chunks(BLOCK as usize))
        .enumerate()
    {
        if x == y {
            continue;
        }
        let start = i as u64 * BLOCK;
        let end = start + x.len() as u64;
        match out.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => out.push(start..end),
        }
    }
    out
}

/// Store the image `vol` as the full point `VOLUME@CHECKPOINT` (`point`) of a new
/// directory repository `repo` (1 MiB chunks): served by `tidemark export`, read by
/// `tidemark pull --full --repo`. Returns the `repo:URL` that names the repository.
pub fn repo_point(vol: &Path, repo: &Path, point: &str) -> String {
    let dir = repo.parent().expect("the repository's parent directory");
    repo_point_at(vol, dir, &arg(repo), point, &[] as &[(&str, &str)])
}

/// Store the image `vol` as the full point `point` of a new repository at `url` (a
/// directory or s3://BUCKET/PREFIX, 1 MiB chunks), every command run with `env` (the S3
/// server's); `dir` holds the export's socket. Returns the `repo:URL`.
pub fn repo_point_at<K: AsRef<OsStr>, V: AsRef<OsStr>>(
    vol: &Path,
    dir: &Path,
    url: &str,
    point: &str,
    env: &[(K, V)],
) -> String {
    let (volume, checkpoint) = point.split_once('@').expect("VOLUME@CHECKPOINT");
    tidemark_env(
        &["repo", "init", url, "--chunk-size", "1M"],
        env,
        COMMAND_LIMIT,
    )
    .ok();
    let exported = crate::export::export(dir, vol, &["--read-only"]).expect("tidemark export");
    tidemark_env(
        &full_pull_args(&exported.uri, url, volume, checkpoint),
        env,
        COMMAND_LIMIT,
    )
    .ok();
    format!("repo:{url}")
}

/// `pull --full URI --repo URL --volume VOLUME --volume-uuid POINT_UUID --checkpoint C`: a
/// full point of an export into a repository.
pub fn full_pull_args<'a>(
    uri: &'a str,
    url: &'a str,
    volume: &'a str,
    checkpoint: &'a str,
) -> Vec<&'a str> {
    vec![
        "pull",
        "--full",
        uri,
        "--repo",
        url,
        "--volume",
        volume,
        "--volume-uuid",
        POINT_UUID,
        "--checkpoint",
        checkpoint,
    ]
}
