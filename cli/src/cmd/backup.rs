//! `tidemark backup`: a client of the daemon's control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tidemark_daemon::client::Client;
use tidemark_daemon::protocol::{
    BackupBeginArgs, BackupEndArgs, Command as Request, Event, NoArguments, PushFormat,
};

use crate::control::{self, ClientArgs};
use crate::ui;

/// Begin, end and inspect backup jobs (the daemon must run: `tidemark serve`).
///
/// Exit status: 0 success; 2 the command failed (the reason on stderr, and with --json
/// as {"error": {"class", "desc"}} on stdout); 3 the daemon cannot be reached.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Begin(Box<BeginArgs>),
    /// End a pull backup: drop its export and snapshot (or cancel a running push).
    ///
    /// Example: tidemark backup end vm1
    End {
        /// A volume of the backup to end.
        #[arg(required_unless_present = "id")]
        volume: Option<String>,
        /// The backup's id instead (as `backup begin` and `backup status` print it).
        #[arg(long, conflicts_with = "volume")]
        id: Option<String>,
        /// The pull failed: end the backup as failed, leaving the checkpoint it created
        /// unconfirmed (an incremental from it is then refused unless --force).
        #[arg(long)]
        failed: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show running backups (exports, progress, write pause, freeze-to-thaw time) and the
    /// ones that ended recently.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Snapshot one or more volumes (one write pause for all) and back them up.
///
/// Pull mode (default): each snapshot is exported read-only over NBD as VOLUME@backup,
/// with base:allocation and, for --incremental CKPT, the context
/// qemu:dirty-bitmap:CKPT listing exactly the blocks changed since CKPT (frozen at
/// backup start). Read it with any NBD client, then `tidemark backup end VOLUME`.
///
/// Push mode (--push TARGET): the daemon copies the snapshot to TARGET itself: a full
/// image, or with --incremental an update of the existing image TARGET (only changed
/// blocks are written), or with --push-format delta a delta file; the backup then ends
/// by itself. This command waits for it (with a progress bar) unless --no-wait.
///
/// Examples:
///   tidemark backup begin vm1 --checkpoint c1                    # full, starts c1
///   qemu-img convert -O raw 'nbd+unix:///vm1@backup?socket=/var/lib/tidemark/nbd.sock' full.raw
///   tidemark backup end vm1
///   tidemark backup begin vm1 --incremental c1 --checkpoint c2   # changes since c1
///   tidemark backup begin db --freeze /srv/db --push /backup/db.raw
///   tidemark backup begin vm1 --incremental c1 --checkpoint c2 --push repo:/srv/backups
///   tidemark backup begin vm1 vm2 --checkpoint nightly           # consistent pair
///   tidemark backup begin vm1 --hold | my-backup-tool            # lease (see --hold)
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct BeginArgs {
    /// The volumes to back up together (one snapshot instant for all).
    #[arg(required = true, value_name = "VOLUME")]
    volumes: Vec<String>,

    /// Create this new checkpoint at the snapshot instant (the base of the next incremental).
    #[arg(long, value_name = "NEW")]
    checkpoint: Option<String>,

    /// Back up only what changed since checkpoint CKPT (exported as
    /// qemu:dirty-bitmap:CKPT in pull mode).
    #[arg(long, value_name = "CKPT")]
    incremental: Option<String>,

    /// Allow --incremental from an unconfirmed checkpoint (one whose backup failed or
    /// never ended): only when you know the data at that checkpoint was stored.
    #[arg(long, requires = "incremental")]
    force: bool,

    /// Name of each snapshot's NBD export; {volume} is replaced by the volume's name.
    #[arg(long, value_name = "TEMPLATE", default_value = "{volume}@backup")]
    export_name: String,

    /// Push mode: copy the snapshot to this path ({volume} is replaced by the volume's
    /// name; required with several volumes), or with `repo:URL` store it as the point
    /// VOLUME@CHECKPOINT of that repository (a directory or s3://BUCKET/PREFIX; needs
    /// --checkpoint; the daemon's AWS_* environment reaches S3).
    #[arg(long, value_name = "TARGET")]
    push: Option<PathBuf>,

    /// What a push writes: `image` (a full raw image, or update-img of the existing image
    /// for --incremental) or `delta` (a delta file of the changed extents).
    #[arg(long, value_name = "FORMAT", requires = "push", value_parser = ["image", "delta"])]
    push_format: Option<String>,

    /// Cap each snapshot's copy-on-write store (e.g. 2G); if the live volume overwrites
    /// more than this during the backup, the backup fails (the volume does not).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cow_limit: Option<u64>,

    /// Hold the backup as a lease: print the export URIs, close stdout once the snapshot
    /// is ready, and end the backup when stdin closes (or this process dies).
    #[arg(long, conflicts_with = "push")]
    hold: bool,

    /// Freeze this mounted filesystem (FIFREEZE) around the snapshot; repeatable.
    #[arg(long, value_name = "MOUNTPOINT")]
    freeze: Vec<PathBuf>,

    /// Run the freeze/thaw hooks of this directory instead of the default one
    /// (/usr/lib/tidemark/writers.d, when it exists); repeatable. The guest-side
    /// /etc/qemu/fsfreeze-hooks.d runs on the host only when named here. Hooks run in
    /// name order with `freeze MOUNTPOINT...` before the snapshot and in reverse with
    /// `thaw` after it. A directory or hook not owned by root (or the daemon's user), or
    /// writable by group or others, is refused.
    #[arg(long, value_name = "DIR")]
    hooks: Vec<PathBuf>,

    /// Run no freeze/thaw hooks, not even the default ones.
    #[arg(long, conflicts_with = "hooks")]
    no_hooks: bool,

    /// Freeze a VM's filesystems through its qemu-guest-agent socket.
    #[arg(long, value_name = "SOCKET")]
    guest_agent: Option<PathBuf>,

    /// Hard limit on the whole freeze-to-thaw window, in seconds (default 10).
    #[arg(long, value_name = "SECONDS")]
    quiesce_timeout: Option<f64>,

    /// Push mode: return once the backup started instead of waiting for it to end.
    #[arg(long, requires = "push")]
    no_wait: bool,

    #[command(flatten)]
    client: ClientArgs,
}

fn parse_size(text: &str) -> Result<u64, String> {
    ui::parse_size(text).map_err(|e| e.to_string())
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let json_output = match &command {
        Command::Begin(args) => args.client.json,
        Command::End { client, .. } | Command::Status { client } => client.json,
    };
    control::finish(json_output, run_inner(command))
}

fn run_inner(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Begin(args) => begin(*args),
        Command::End {
            volume,
            id,
            failed,
            client,
        } => {
            let arguments = match (volume, id) {
                (_, Some(id)) => BackupEndArgs {
                    id: Some(id),
                    volume: None,
                    failed,
                },
                (Some(volume), None) => BackupEndArgs {
                    volume: Some(volume),
                    id: None,
                    failed,
                },
                (None, None) => anyhow::bail!("name the backup's volume or pass --id"),
            };
            let ended = client.connect()?.execute(&Request::BackupEnd(arguments))?;
            if client.json {
                ui::print_json(&ended)?;
            } else {
                println!("{} {}", text(&ended["id"]), text(&ended["state"]));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { client } => {
            let status = client
                .connect()?
                .execute(&Request::BackupStatus(NoArguments {}))?;
            if client.json {
                ui::print_json(&status)?;
                return Ok(ExitCode::SUCCESS);
            }
            let running = status["running"].as_array().cloned().unwrap_or_default();
            let finished = status["finished"].as_array().cloned().unwrap_or_default();
            if running.is_empty() {
                println!("no backup running");
            }
            for backup in &running {
                print_backup(backup);
            }
            if !finished.is_empty() {
                println!("\nrecently ended:");
                for backup in &finished {
                    let error = backup["error"].as_str().map(|e| format!(": {e}"));
                    println!(
                        "  {} {} {} ({}){}",
                        text(&backup["id"]),
                        text(&backup["mode"]),
                        text(&backup["state"]),
                        volume_names(backup),
                        error.unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn volume_names(backup: &Value) -> String {
    backup["volumes"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|v| text(&v["volume"]))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// One backup, for people.
pub fn print_backup(backup: &Value) {
    println!(
        "backup {} ({} {}, {})",
        text(&backup["id"]),
        text(&backup["mode"]),
        if backup["incremental"].is_null() {
            "full".to_string()
        } else {
            format!("incremental since {}", text(&backup["incremental"]))
        },
        text(&backup["state"]),
    );
    if let Some(checkpoint) = backup["checkpoint"].as_str() {
        println!("  new checkpoint  {checkpoint}");
    }
    let phases = &backup["write_pause_phases_us"];
    match (phases["drain"].as_u64(), phases["volumes"].as_u64()) {
        (Some(drain), Some(work)) => println!(
            "  write pause     {} us (writes drained in {drain} us, volumes' work {work} us)",
            text(&backup["write_pause_us"])
        ),
        _ => println!("  write pause     {} us", text(&backup["write_pause_us"])),
    }
    if let Some(window) = backup["quiesce"]["freeze_to_thaw_ms"].as_f64() {
        let summary = &backup["quiesce"]["summary"];
        let mut frozen: Vec<String> = Vec::new();
        for fs in summary["filesystems"].as_array().into_iter().flatten() {
            frozen.push(text(fs));
        }
        for hook in summary["hooks"].as_array().into_iter().flatten() {
            frozen.push(format!("hook {}", text(hook)));
        }
        if let Some(agent) = summary["agent"].as_object() {
            frozen.push(format!(
                "guest agent ({} filesystems)",
                agent.get("frozen").map(text).unwrap_or_default()
            ));
        }
        println!("  freeze-to-thaw  {window:.1} ms ({})", frozen.join(", "));
    }
    for volume in backup["volumes"].as_array().into_iter().flatten() {
        match volume["uri"]["unix"].as_str() {
            Some(uri) => {
                println!("  {}  {uri}", text(&volume["volume"]));
                if let Some(tcp) = volume["uri"]["tcp"].as_str() {
                    println!("  {}  {tcp}", text(&volume["volume"]));
                }
                if let Some(bitmap) = volume["bitmap"].as_str() {
                    println!("    changed blocks: qemu:dirty-bitmap:{bitmap}");
                }
            }
            None => println!(
                "  {} -> {}",
                text(&volume["volume"]),
                text(&volume["target"])
            ),
        }
    }
    let done = backup["progress"]["done"].as_u64().unwrap_or(0);
    let total = backup["progress"]["total"].as_u64().unwrap_or(0);
    if total > 0 {
        println!("  progress        {done} / {total} bytes");
    }
}

fn begin(args: BeginArgs) -> anyhow::Result<ExitCode> {
    let absolute = |path: &PathBuf| std::path::absolute(path).unwrap_or_else(|_| path.clone());
    let push = match &args.push {
        Some(push) if push.to_string_lossy().starts_with("repo:") => {
            let text = push.to_string_lossy();
            let url = &text["repo:".len()..];
            Some(if url.contains("://") {
                text.to_string()
            } else {
                format!("repo:{}", absolute(&PathBuf::from(url)).display())
            })
        }
        Some(push) => Some(
            absolute(push)
                .into_os_string()
                .into_string()
                .map_err(|path| {
                    anyhow::anyhow!("--push {}: the path is not UTF-8", path.to_string_lossy())
                })?,
        ),
        None => None,
    };
    let quiesce_timeout_ms = quiesce_timeout_ms(args.quiesce_timeout)?;
    let arguments = BackupBeginArgs {
        volumes: args.volumes.clone(),
        checkpoint: args.checkpoint.clone(),
        incremental: args.incremental.clone(),
        export_name: Some(args.export_name.clone()),
        push,
        push_format: args.push_format.as_deref().map(|format| match format {
            "delta" => PushFormat::Delta,
            _ => PushFormat::Image,
        }),
        cow_limit: args.cow_limit,
        lease: args.hold,
        freeze: args.freeze.iter().map(absolute).collect(),
        hooks: (args.no_hooks || !args.hooks.is_empty())
            .then(|| args.hooks.iter().map(absolute).collect()),
        guest_agent: args.guest_agent.as_ref().map(absolute),
        quiesce_timeout_ms,
        force: args.force,
    };

    let mut client = args.client.connect()?;
    let backup = client.execute(&Request::BackupBegin(arguments))?;
    let id = text(&backup["id"]);
    if args.hold {
        return hold(client, &backup, args.client.json);
    }
    if args.push.is_none() || args.no_wait {
        if args.client.json {
            ui::print_json(&backup)?;
        } else {
            print_backup(&backup);
            if args.push.is_none() {
                println!("end it with: tidemark backup end {}", args.volumes[0]);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    wait_for_push(&mut client, &id, args.client.json)
}

/// `--quiesce-timeout SECONDS` in milliseconds, as `backup-begin` takes it.
pub(crate) fn quiesce_timeout_ms(seconds: Option<f64>) -> anyhow::Result<Option<u64>> {
    match seconds {
        Some(seconds) => {
            anyhow::ensure!(
                seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0,
                "--quiesce-timeout must be between 0 and 3600 seconds"
            );
            Ok(Some((seconds * 1000.0).ceil() as u64))
        }
        None => Ok(None),
    }
}

fn is_end_of(event: &Event, id: &str) -> bool {
    matches!(event.event.as_str(), "BACKUP_COMPLETED" | "BACKUP_FAILED")
        && event.data["id"].as_str() == Some(id)
}

/// Wait for push backup `id` to end, showing its progress on a terminal.
fn wait_for_push(client: &mut Client, id: &str, json_output: bool) -> anyhow::Result<ExitCode> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let event = loop {
        if let Some(event) = client.next_event(Some(Duration::from_millis(250)))? {
            if is_end_of(&event, id) {
                break event;
            }
            continue;
        }
        let status = client.execute(&Request::BackupStatus(NoArguments {}))?;
        let running = status["running"]
            .as_array()
            .and_then(|l| l.iter().find(|b| b["id"].as_str() == Some(id)).cloned());
        if let Some(running) = running {
            let total = running["progress"]["total"].as_u64().unwrap_or(0);
            let done = running["progress"]["done"].as_u64().unwrap_or(0);
            if total > 0 {
                let bar = bar.get_or_insert_with(|| ui::byte_progress(total, "push"));
                bar.set_length(total);
                bar.set_position(done);
            }
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if json_output {
        ui::print_json(&event.data)?;
    }
    if event.event == "BACKUP_COMPLETED" {
        if !json_output {
            print_backup(&event.data);
        }
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!("backup {id} failed: {}", text(&event.data["error"]))
    }
}

/// The lease: the backup lives while this process does and its stdin stays open.
fn hold(mut client: Client, backup: &Value, json_output: bool) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let id = text(&backup["id"]);
    {
        let mut stdout = std::io::stdout().lock();
        if json_output {
            writeln!(stdout, "{}", backup)?;
        } else {
            for volume in backup["volumes"].as_array().into_iter().flatten() {
                writeln!(stdout, "{}", text(&volume["uri"]["unix"]))?;
            }
        }
        stdout.flush()?;
    }
    // Closing stdout tells the reader the snapshot is ready: replace fd 1 by /dev/null,
    // which drops this process's write end of whatever stdout was.
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    nix::unistd::dup2_stdout(&null).context("closing stdout")?;
    drop(null);
    eprintln!("tidemark: holding backup {id}; close stdin to end it");

    let (closed_tx, closed_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = closed_tx.send(());
        })
        .context("watching stdin")?;
    loop {
        if closed_rx.try_recv().is_ok() {
            break;
        }
        if let Some(event) = client.next_event(Some(Duration::from_millis(100)))? {
            if is_end_of(&event, &id) {
                anyhow::bail!(
                    "backup {id} ended while held: {}",
                    event.data["error"].as_str().unwrap_or("it completed")
                );
            }
        }
    }
    client.execute(&Request::BackupEnd(BackupEndArgs {
        id: Some(id.to_string()),
        volume: None,
        failed: false,
    }))?;
    eprintln!("tidemark: stdin closed; backup {id} ended");
    Ok(ExitCode::SUCCESS)
}
