//! `tidemark info`: a client of the daemon's control socket.

use std::process::ExitCode;

use serde_json::Value;
use tidemark_daemon::protocol::{Command as Request, NoArguments};

use crate::control::{self, ClientArgs};
use crate::ui;

/// Status of the daemon and every volume, like /proc/elastio-info.
///
/// Shows each volume's size, granularity, tracking state, checkpoints and export, and
/// each running or recent backup. `--json` prints everything the daemon knows, for
/// monitoring scripts.
///
/// Examples:
///   tidemark info
///   tidemark info --json | jq '.volumes[].name'
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    client: ClientArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let json_output = args.client.json;
    control::finish(json_output, run_inner(args))
}

fn run_inner(args: Args) -> anyhow::Result<ExitCode> {
    let status = args
        .client
        .connect()?
        .execute(&Request::QueryStatus(NoArguments {}))?;
    if args.client.json {
        ui::print_json(&status)?;
        return Ok(ExitCode::SUCCESS);
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!(
        "tidemark {} (pid {})",
        text(&status["version"]),
        text(&status["pid"])
    );
    println!("  state dir   {}", text(&status["state_dir"]));
    println!("  nbd socket  {}", text(&status["nbd_socket"]));
    println!("  control     {}", text(&status["control_socket"]));
    if let Some(listen) = status["listen"].as_str() {
        let warning = if status["listen_insecure"].as_bool() == Some(true) {
            "  (INSECURE: no TLS, --listen-insecure)"
        } else {
            ""
        };
        println!("  tcp         {listen}{warning}");
    }
    let volumes = status["volumes"].as_array().cloned().unwrap_or_default();
    if volumes.is_empty() {
        println!("no volumes");
    }
    for volume in &volumes {
        println!();
        super::volume::print_volume(volume);
    }
    let running = status["backups"]["running"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for backup in &running {
        println!();
        super::backup::print_backup(backup);
    }
    Ok(ExitCode::SUCCESS)
}
