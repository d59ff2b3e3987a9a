//! One error message per crate, pinned as users read it: what failed, then each cause once.
//!
//! Library errors carry their cause as `source()` and do not print it themselves; the CLI
//! prints the chain with `{:#}`. A variant that also spelled out its source would show the
//! cause twice ("...: No such file or directory: No such file or directory"), and one that
//! dropped it would show none. Each test runs the real binary and checks stderr exactly.

use std::process::Command;
use std::time::Duration;

use tidemark_tests::paths::scratch;
use tidemark_tests::{run, tidemark_bin};

const LIMIT: Duration = Duration::from_secs(30);

/// Run tidemark with `args` in `dir`; its exit code and the one line it printed on stderr.
fn fails(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = run(
        Command::new(tidemark_bin()).args(args).current_dir(dir),
        LIMIT,
    )
    .expect("tidemark runs");
    assert!(out.stdout.is_empty(), "nothing on stdout: {out:#?}");
    (out.code(), out.stderr.trim_end().to_string())
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn formats_a_damaged_delta_is_named_with_its_offset() {
    let dir = scratch();
    std::fs::write(dir.path().join("base.img"), vec![0u8; 65536]).unwrap();
    std::fs::write(dir.path().join("bad.delta"), [0x5au8; 4096]).unwrap();
    let (code, err) = fails(
        dir.path(),
        &["restore", "--into", "out.img", "base.img", "bad.delta"],
    );
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "tidemark: error: bad.delta: at byte 0: bad magic for a delta file: found \
         0x5a5a5a5a5a5a5a5a, expected 0x54444d4b444c5441 (wrong file, or the file is damaged)"
    );
}

#[test]
fn engine_a_missing_copy_source_says_its_cause_once() {
    let dir = scratch();
    let (code, err) = fails(dir.path(), &["copy", "/nonexistent/src.img", "out.img"]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "tidemark: error: cannot open /nonexistent/src.img: No such file or directory (os error 2)"
    );
}

#[test]
fn nbd_an_unreachable_export_names_the_uri_once() {
    let dir = scratch();
    let uri = format!(
        "nbd+unix:///vm1?socket={}",
        dir.path().join("none.sock").display()
    );
    let (code, err) = fails(dir.path(), &["pull", "--full", &uri, "--into", "out.img"]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        format!("tidemark: error: NBD connection to {uri} failed: No such file or directory (os error 2)")
    );
    assert_eq!(count(&err, &uri), 1, "{err}");
}

#[test]
fn daemon_an_absent_daemon_says_how_to_start_it() {
    let dir = scratch();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let state = state.to_str().unwrap();
    let (code, err) = fails(dir.path(), &["volume", "list", "--state-dir", state]);
    assert_eq!(code, 3, "no daemon has its own exit code");
    assert_eq!(
        err,
        format!(
            "tidemark: error: cannot reach the tidemark daemon at {state}/control.sock; start it \
             with `tidemark serve` (same --state-dir), or point --control / --state-dir / \
             TIDEMARK_STATE_DIR at the running one: No such file or directory (os error 2)"
        )
    );
    assert_eq!(count(&err, "No such file or directory"), 1, "{err}");
}
