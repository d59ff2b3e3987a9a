//! `tidemark checkpoint`: a client of the daemon's control socket.

use std::process::ExitCode;

use serde_json::Value;
use tidemark_daemon::protocol::{CheckpointArgs, CheckpointListArgs, Command as Request};

use crate::control::{self, ClientArgs};
use crate::ui;

/// Create, list and delete checkpoints of a volume (the daemon must run: `tidemark serve`).
///
/// A checkpoint is a named point in time from which a volume's changes are tracked.
/// Checkpoints form a chain: deleting one merges its changes into its predecessor, so
/// an incremental backup from any remaining checkpoint still sees every change.
///
/// Exit status: 0 success; 2 the command failed (the reason on stderr, and with --json
/// as {"error": {"class", "desc"}} on stdout); 3 the daemon cannot be reached.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Start tracking changes from now under NAME.
    ///
    /// Usually `tidemark backup begin VOLUME --checkpoint NAME` is what you want: it
    /// creates the checkpoint atomically with the backup's snapshot.
    ///
    /// Example: tidemark checkpoint create vm1 before-upgrade
    Create {
        /// The volume.
        volume: String,
        /// The new checkpoint's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List a volume's checkpoints, oldest first.
    List {
        /// The volume.
        volume: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a checkpoint (its changes merge into the one before it).
    Delete {
        /// The volume.
        volume: String,
        /// The checkpoint to delete.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let json_output = match &command {
        Command::Create { client, .. }
        | Command::List { client, .. }
        | Command::Delete { client, .. } => client.json,
    };
    control::finish(json_output, run_inner(command))
}

fn run_inner(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Create {
            volume,
            name,
            client,
        } => {
            let created =
                client
                    .connect()?
                    .execute(&Request::CheckpointCreate(CheckpointArgs {
                        volume: volume.clone(),
                        name: name.clone(),
                    }))?;
            if client.json {
                ui::print_json(&created)?;
            } else {
                println!("created checkpoint {name} of volume {volume}");
            }
        }
        Command::List { volume, client } => {
            let list = client
                .connect()?
                .execute(&Request::CheckpointList(CheckpointListArgs {
                    volume: volume.clone(),
                }))?;
            if client.json {
                ui::print_json(&list)?;
            } else {
                print_checkpoints(&volume, &list);
            }
        }
        Command::Delete {
            volume,
            name,
            client,
        } => {
            let deleted =
                client
                    .connect()?
                    .execute(&Request::CheckpointDelete(CheckpointArgs {
                        volume: volume.clone(),
                        name: name.clone(),
                    }))?;
            if client.json {
                ui::print_json(&deleted)?;
            } else {
                println!("deleted checkpoint {name} of volume {volume}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_checkpoints(volume: &str, list: &Value) {
    let Some(list) = list.as_array() else { return };
    if list.is_empty() {
        println!(
            "volume {volume} has no checkpoints; `tidemark backup begin {volume} --checkpoint \
             NAME` makes a full backup and starts one"
        );
        return;
    }
    println!(
        "{:<24} {:>4} {:>12} {:>16} {:>9}  CONSISTENT",
        "NAME", "GEN", "AGE", "CHANGED BLOCKS", "CONFIRMED"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for checkpoint in list {
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        };
        let age = checkpoint["created_unix"]
            .as_u64()
            .map(|t| human_age(now.saturating_sub(t)))
            .unwrap_or_else(|| "-".into());
        let consistent = match checkpoint["consistent"].as_bool() {
            Some(true) => "yes".to_string(),
            Some(false) => format!("NO: {}", text(&checkpoint["problem"])),
            None => "-".to_string(),
        };
        // An unconfirmed checkpoint's backup was never seen through (see CONTROL.md).
        let confirmed = match checkpoint["confirmed"].as_bool() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "{:<24} {:>4} {:>12} {:>16} {:>9}  {consistent}",
            text(&checkpoint["name"]),
            text(&checkpoint["generation"]),
            age,
            text(&checkpoint["changed_blocks"]),
            confirmed,
        );
    }
}

/// `3d 4h`-style ages for people.
fn human_age(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86400 => format!("{}h {}m ago", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h ago", s / 86400, s % 86400 / 3600),
    }
}
