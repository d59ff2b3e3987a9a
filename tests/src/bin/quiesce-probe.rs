//! A test driver for `tidemark_engine::quiesce` (until `tidemark backup begin --freeze`
//! wires it into the daemon): `quiesce-probe SPEC_JSON` quiesces, prints
//! `{"quiesced": SUMMARY}` (or `{"error": ..}` and exits 2), then waits for a line `thaw`
//! on stdin (or EOF), thaws and prints `{"thawed": REPORT}`. The watchdog is the real
//! tidemark binary, named by `watchdog_exe` in the spec.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tidemark_engine::quiesce::{self, QuiesceError, QuiesceSpec};

fn paths(spec: &Value, key: &str) -> Vec<PathBuf> {
    spec[key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(PathBuf::from)
        .collect()
}

fn millis(spec: &Value, key: &str, default: Duration) -> Duration {
    spec[key]
        .as_u64()
        .map(Duration::from_millis)
        .unwrap_or(default)
}

fn main() -> anyhow::Result<ExitCode> {
    let arg = std::env::args()
        .nth(1)
        .context("usage: quiesce-probe SPEC_JSON")?;
    let spec: Value = serde_json::from_str(&arg).context("SPEC_JSON is not JSON")?;
    let defaults = QuiesceSpec::default();
    let spec = QuiesceSpec {
        hooks_dirs: paths(&spec, "hooks_dirs"),
        mountpoints: paths(&spec, "mountpoints"),
        guest_agent: spec["guest_agent"].as_str().map(PathBuf::from),
        guest_mountpoints: spec["guest_mountpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        protected_paths: paths(&spec, "protected_paths"),
        hook_timeout: millis(&spec, "hook_timeout_ms", defaults.hook_timeout),
        agent_timeout: millis(&spec, "agent_timeout_ms", defaults.agent_timeout),
        window_limit: millis(&spec, "window_limit_ms", defaults.window_limit),
        watchdog_exe: spec["watchdog_exe"].as_str().map(PathBuf::from),
    };
    let quiesced = match quiesce::quiesce(&spec) {
        Ok(quiesced) => quiesced,
        Err(error) => {
            let report = match &error {
                QuiesceError::Aborted { report, .. } => serde_json::to_value(report)?,
                _ => Value::Null,
            };
            println!("{}", json!({"error": error.to_string(), "report": report}));
            return Ok(ExitCode::from(2));
        }
    };
    println!("{}", json!({ "quiesced": quiesced.summary() }));
    for line in std::io::stdin().lock().lines() {
        if line?.trim() == "thaw" {
            break;
        }
    }
    let report = quiesced.thaw();
    println!("{}", json!({ "thawed": report }));
    Ok(ExitCode::SUCCESS)
}
