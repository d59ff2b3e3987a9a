//! `tidemark volume`: a client of the daemon's control socket.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::Value;
use tidemark_daemon::protocol::{
    Command as Request, NoArguments, Tracking, VolumeCreateArgs, VolumeNameArgs,
};

use crate::control::{self, ClientArgs};
use crate::ui;

/// Create, list, inspect and remove volumes (the daemon must run: `tidemark serve`).
///
/// Exit status: 0 success; 2 the command failed (the reason on stderr, and with --json
/// as {"error": {"class", "desc"}} on stdout); 3 the daemon cannot be reached.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Put a block device or raw image under management and export it live over NBD.
    ///
    /// The volume is served read-write as nbd+unix:///NAME?socket=<state-dir>/nbd.sock;
    /// every write through it is tracked for incremental backups.
    ///
    /// Examples:
    ///   tidemark volume create vm1 --backing /srv/vm1.raw --size 20G
    ///   tidemark volume create data --backing /dev/vg0/data --granularity 256K
    #[command(verbatim_doc_comment)]
    Create {
        /// The volume's name (A-Z a-z 0-9 - _ .), also its NBD export name.
        name: String,
        /// The raw image file or block device holding the data.
        #[arg(long, value_name = "PATH")]
        backing: PathBuf,
        /// Create the image file with this size if it does not exist (e.g. 10G); an
        /// existing file keeps its size, which must then match.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: Option<u64>,
        /// Tracking granularity: a power of two from 4K to 1M (default 64K).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        granularity: Option<u64>,
        /// How changes are tracked: `durable` (default: a changed block is on disk in the
        /// bitmap before its data write, so tracking survives kill -9 and power loss) or
        /// `fast` (bitmaps saved at clean stops only; after a crash the next backup must
        /// be full, and tidemark says so instead of trusting a stale bitmap).
        #[arg(long, value_name = "MODE", value_parser = ["durable", "fast"])]
        tracking: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the volumes with their exports and running backups.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one volume: size, granularity, checkpoints, export, backup, tracking state.
    Info {
        /// The volume's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop managing a volume: drop its export, checkpoints and tracking state.
    /// The backing file or device and its data are left untouched.
    Remove {
        /// The volume's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn parse_size(text: &str) -> Result<u64, String> {
    ui::parse_size(text).map_err(|e| e.to_string())
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let json_output = match &command {
        Command::Create { client, .. }
        | Command::List { client }
        | Command::Info { client, .. }
        | Command::Remove { client, .. } => client.json,
    };
    control::finish(json_output, run_inner(command))
}

fn run_inner(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Create {
            name,
            backing,
            size,
            granularity,
            tracking,
            client,
        } => {
            let backing = std::path::absolute(&backing).unwrap_or(backing);
            let arguments = VolumeCreateArgs {
                name: name.clone(),
                backing,
                size,
                granularity,
                tracking: tracking.as_deref().map(|tracking| match tracking {
                    "fast" => Tracking::Fast,
                    _ => Tracking::Durable,
                }),
            };
            let volume = client
                .connect()?
                .execute(&Request::VolumeCreate(arguments))?;
            if client.json {
                ui::print_json(&volume)?;
            } else {
                println!("created volume {name}");
                print_volume(&volume);
            }
        }
        Command::List { client } => {
            let volumes = client
                .connect()?
                .execute(&Request::VolumeList(NoArguments {}))?;
            if client.json {
                ui::print_json(&volumes)?;
            } else {
                print_volume_table(&volumes);
            }
        }
        Command::Info { name, client } => {
            let volume = client
                .connect()?
                .execute(&Request::VolumeInfo(VolumeNameArgs { name }))?;
            if client.json {
                ui::print_json(&volume)?;
            } else {
                print_volume(&volume);
            }
        }
        Command::Remove { name, client } => {
            let removed = client
                .connect()?
                .execute(&Request::VolumeRemove(VolumeNameArgs {
                    name: name.clone(),
                }))?;
            if client.json {
                ui::print_json(&removed)?;
            } else {
                println!(
                    "removed volume {name}; its data stays in {}",
                    removed["backing"].as_str().unwrap_or("its backing file")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `12.0 GiB`-style sizes for people.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn size_text(value: &Value) -> String {
    value
        .as_u64()
        .map(human_size)
        .unwrap_or_else(|| text(value))
}

/// One volume, for people.
pub fn print_volume(volume: &Value) {
    let checkpoints: Vec<String> = volume["checkpoints"]
        .as_array()
        .map(|list| list.iter().map(|c| text(&c["name"])).collect())
        .unwrap_or_default();
    println!("volume       {}", text(&volume["name"]));
    println!("  uuid         {}", text(&volume["uuid"]));
    println!("  backing      {}", text(&volume["backing"]));
    println!("  size         {}", size_text(&volume["size"]));
    println!("  granularity  {}", size_text(&volume["granularity"]));
    println!("  tracking     {}", text(&volume["tracking"]));
    println!(
        "  checkpoints  {}",
        if checkpoints.is_empty() {
            "-".to_string()
        } else {
            checkpoints.join(" -> ")
        }
    );
    println!("  export       {}", text(&volume["uri"]["unix"]));
    if let Some(tcp) = volume["uri"]["tcp"].as_str() {
        println!("               {tcp}");
    }
    println!("  backup       {}", text(&volume["backup"]));
}

fn print_volume_table(volumes: &Value) {
    let Some(list) = volumes.as_array() else {
        return;
    };
    if list.is_empty() {
        println!("no volumes; add one with `tidemark volume create NAME --backing PATH`");
        return;
    }
    println!(
        "{:<20} {:>10} {:>8} {:<24} {:<10} EXPORT",
        "NAME", "SIZE", "GRAN", "LAST CHECKPOINT", "BACKUP"
    );
    for volume in list {
        let last = volume["checkpoints"]
            .as_array()
            .and_then(|l| l.last())
            .map(|c| text(&c["name"]))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:>10} {:>8} {:<24} {:<10} {}",
            text(&volume["name"]),
            size_text(&volume["size"]),
            size_text(&volume["granularity"]),
            last,
            text(&volume["backup"]),
            text(&volume["uri"]["unix"]),
        );
    }
}
