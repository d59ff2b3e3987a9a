//! `tidemark volume`: a client of the daemon's control socket.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::Value;
use tidemark_daemon::attach::Via;
use tidemark_daemon::protocol::{
    Command as Request, NoArguments, Tracking, VolumeAttachArgs, VolumeCreateArgs, VolumeNameArgs,
    VolumeRollbackArgs,
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
    /// Give a volume a block device on this host and print its path.
    ///
    /// Put a filesystem on the device and mount it as on any disk: every write is
    /// tracked, and `tidemark backup begin NAME --freeze MOUNTPOINT` takes consistent
    /// backups of it. A running pull backup's snapshot (NAME@backup) attaches the same
    /// way, always read-only, to pick files from it.
    ///
    /// Front ends (--via):
    ///   nbd   /dev/nbdN over the kernel's nbd driver (modprobe nbd). The production
    ///         path: the daemon can restart (even after kill -9) under a mounted
    ///         filesystem, which only pauses (up to 120 s) until the daemon is back.
    ///   fuse  a loop device over a one-file FUSE filesystem, where nbd.ko is missing
    ///         (needs /dev/fuse and the loop driver). A FUSE server cannot outlive its
    ///         daemon: if the daemon dies the filesystem on it gets I/O errors (never
    ///         wrong data) and the next daemon start removes the device.
    /// The default is nbd when the kernel has the nbd driver, else fuse.
    ///
    /// The attachment is daemon state: `volume list/info` and `info --json` show it,
    /// and it is kept in <state-dir>/attachments/. Detach it before removing the volume.
    ///
    /// Examples:
    ///   tidemark volume attach data                 # prints e.g. /dev/nbd0
    ///   mkfs.ext4 $(tidemark volume attach data --via fuse)
    ///   tidemark volume attach data@backup          # a backup's snapshot, read-only
    #[command(verbatim_doc_comment)]
    Attach {
        /// The volume, or a running pull backup's snapshot export (e.g. data@backup).
        name: String,
        /// The front end: nbd (kernel NBD) or fuse (FUSE + loop).
        #[arg(long, value_name = "FRONTEND", value_parser = ["nbd", "fuse"])]
        via: Option<String>,
        /// Make the device refuse writes (EPERM).
        #[arg(long)]
        read_only: bool,
        /// Kernel NBD connections, 1-8 (default: the number of CPUs, at most 8).
        #[arg(long, value_name = "N")]
        queues: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove an attachment's block device.
    ///
    /// Refused while the device is in use (a filesystem is mounted on it or a program
    /// holds it open): unmount it first. The volume's data is untouched.
    Detach {
        /// The volume (or snapshot) whose device to remove.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Roll a volume back to a checkpoint, writing back only the blocks changed since it.
    ///
    /// POINT is the volume's data at the checkpoint, as `tidemark restore` takes it: a
    /// full delta, or an image, followed by the incremental deltas up to the checkpoint
    /// (oldest first). Its last link must end at CHECKPOINT of this volume (same volume
    /// uuid, checkpoint name and generation); anything else is refused, naming the
    /// mismatch. (A repository point is not accepted yet.) The blocks changed since the
    /// checkpoint (from the volume's dirty tracking) are read from the point and written
    /// to the volume: a small fraction of a full restore's work. When tracking since the
    /// checkpoint is not consistent, the rollback is refused: do a full restore.
    ///
    /// Nothing may use the volume meanwhile: it is refused while the volume is attached,
    /// in a backup, or while a client is connected to its live export (the error lists
    /// them), and new connections are refused while it runs. Afterwards the checkpoints
    /// after CHECKPOINT are dropped (their generations are never reused) and the next
    /// incremental backup is taken from CHECKPOINT.
    ///
    /// Crash-safe: if the rollback is interrupted (kill -9, power loss, an I/O error), the
    /// volume stays marked "rollback incomplete": it is not exported and cannot be read
    /// or attached until the same command is run again, which finishes it.
    ///
    /// Examples:
    ///   tidemark volume rollback vm1 --checkpoint tue --from mon.delta tue.delta
    ///   tidemark volume rollback data --checkpoint c2 --from base.raw c1-c2.delta
    #[command(verbatim_doc_comment)]
    Rollback {
        /// The volume.
        name: String,
        /// The checkpoint the point was taken at.
        #[arg(long, value_name = "CHECKPOINT")]
        checkpoint: String,
        /// The point: its base (a full delta or an image), then its deltas, oldest first;
        /// or a repository point: `repo:URL VOLUME@CHECKPOINT` (URL a directory or
        /// s3://BUCKET/PREFIX, as `backup begin --push repo:URL` stores points).
        #[arg(long = "from", value_name = "POINT", num_args = 1.., required = true)]
        from: Vec<PathBuf>,
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
        | Command::Remove { client, .. }
        | Command::Attach { client, .. }
        | Command::Detach { client, .. }
        | Command::Rollback { client, .. } => client.json,
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
        Command::Attach {
            name,
            via,
            read_only,
            queues,
            client,
        } => {
            let arguments = VolumeAttachArgs {
                name,
                via: via.as_deref().map(|via| match via {
                    "fuse" => Via::Fuse,
                    _ => Via::Nbd,
                }),
                read_only,
                queues,
            };
            let attached = client
                .connect()?
                .execute(&Request::VolumeAttach(arguments))?;
            if client.json {
                ui::print_json(&attached)?;
            } else {
                println!("{}", text(&attached["device"]));
            }
        }
        Command::Detach { name, client } => {
            let detached = client
                .connect()?
                .execute(&Request::VolumeDetach(VolumeNameArgs {
                    name: name.clone(),
                }))?;
            if client.json {
                ui::print_json(&detached)?;
            } else {
                println!("detached {name} ({})", text(&detached["device"]));
            }
        }
        Command::Rollback {
            name,
            checkpoint,
            from,
            client,
        } => {
            let arguments = rollback_arguments(name.clone(), checkpoint, from)?;
            let report = client
                .connect()?
                .execute(&Request::VolumeRollback(arguments))?;
            if client.json {
                ui::print_json(&report)?;
            } else {
                print_rollback(&name, &report);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--from`: `BASE DELTA...` (files, made absolute), or `repo:URL VOLUME@CHECKPOINT`
/// (a repository point, as `backup begin --push repo:URL` stores it).
fn rollback_arguments(
    name: String,
    checkpoint: String,
    from: Vec<PathBuf>,
) -> anyhow::Result<VolumeRollbackArgs> {
    let first = from.first().map(|p| p.to_string_lossy().to_string());
    if let Some(url) = first.as_deref().and_then(|f| f.strip_prefix("repo:")) {
        let [_, point] = &from[..] else {
            anyhow::bail!(
                "--from repo:URL takes one point after it: --from repo:{url} VOLUME@CHECKPOINT"
            );
        };
        let url = super::repo::absolute_repo_url(url);
        return Ok(VolumeRollbackArgs {
            name,
            checkpoint,
            base: PathBuf::new(),
            deltas: Vec::new(),
            repository: Some(url),
            point: Some(point.to_string_lossy().to_string()),
        });
    }
    let mut from = from
        .into_iter()
        .map(|path| std::path::absolute(&path).unwrap_or(path));
    let base = from.next().unwrap_or_default();
    Ok(VolumeRollbackArgs {
        name,
        checkpoint,
        base,
        deltas: from.collect(),
        repository: None,
        point: None,
    })
}

/// What a rollback did, for people.
fn print_rollback(name: &str, report: &Value) {
    let dropped: Vec<String> = report["dropped_checkpoints"]
        .as_array()
        .map(|list| list.iter().map(text).collect())
        .unwrap_or_default();
    println!(
        "{} volume {name} to checkpoint {}: {} of {} written back in {:.2} s",
        if report["resumed"].as_bool() == Some(true) {
            "finished rolling back"
        } else {
            "rolled back"
        },
        text(&report["checkpoint"]),
        size_text(&report["bytes_rolled_back"]),
        size_text(&report["size"]),
        report["seconds"].as_f64().unwrap_or(0.0),
    );
    if !dropped.is_empty() {
        println!("dropped checkpoints {}", dropped.join(", "));
    }
    println!(
        "the next incremental backup is taken from {}",
        text(&report["checkpoint"])
    );
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
    println!("  attached     {}", attachment_text(&volume["attachment"]));
}

/// `/dev/loop3 via fuse, read-write, since ..., 12 reads 3 writes` or `-`.
fn attachment_text(attachment: &Value) -> String {
    if attachment.is_null() {
        return "-".to_string();
    }
    let io = &attachment["io"];
    format!(
        "{} via {}, {}, since {} (unix time), {} reads ({}), {} writes ({}), {} flushes",
        text(&attachment["device"]),
        text(&attachment["via"]),
        if attachment["read_only"].as_bool() == Some(true) {
            "read-only"
        } else {
            "read-write"
        },
        text(&attachment["since"]),
        text(&io["reads"]),
        size_text(&io["read_bytes"]),
        text(&io["writes"]),
        size_text(&io["write_bytes"]),
        text(&io["flushes"]),
    )
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
    for volume in list.iter().filter(|v| !v["attachment"].is_null()) {
        println!(
            "{} attached as {}",
            text(&volume["name"]),
            attachment_text(&volume["attachment"])
        );
    }
    for volume in list.iter().filter(|v| v["hint"].is_string()) {
        println!(
            "{}: {}; {}",
            text(&volume["name"]),
            text(&volume["state"]),
            text(&volume["hint"])
        );
    }
}
