//! `tidemark`: block-level incremental backups with crash-proof change tracking,
//! copy-on-write snapshots, an io_uring copy engine and NBD export.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod cmd;
mod control;
mod pull;
mod ui;

/// Block-level incremental backups of Linux volumes and VM disks.
///
/// tidemark sits in a volume's I/O path, tracks changed blocks between checkpoints (and
/// keeps that tracking through kill -9 and power loss), takes copy-on-write snapshots of
/// the running volume, and exports them over NBD to pull-mode backup clients such as
/// qemu-img, nbdcopy and libnbd scripts.
///
/// Start with `tidemark demo`, which runs the whole job in a temporary directory.
#[derive(Debug, Parser)]
#[command(
    name = "tidemark",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Demo(cmd::demo::Args),
    Serve(cmd::serve::Args),
    Export(cmd::export::Args),
    #[command(subcommand)]
    Volume(cmd::volume::Command),
    #[command(subcommand)]
    Checkpoint(cmd::checkpoint::Command),
    #[command(subcommand)]
    Backup(cmd::backup::Command),
    Pull(cmd::pull::Args),
    Repo(cmd::repo::Args),
    Copy(cmd::copy::Args),
    UpdateImg(cmd::update_img::Args),
    #[command(subcommand)]
    Delta(cmd::delta::Command),
    Restore(cmd::restore::Args),
    Verify(cmd::verify::Args),
    Info(cmd::info::Args),
    Bench(cmd::bench::Args),
    Snapshot(cmd::snapshot::Args),
    Mount(cmd::mount::Args),
    Umount(cmd::mount::UmountArgs),
    #[command(name = "__quiesce-watchdog", hide = true)]
    QuiesceWatchdog(cmd::watchdog::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ui::init_logging();
    let result = match cli.command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Volume(command) => cmd::volume::run(command),
        Command::Checkpoint(command) => cmd::checkpoint::run(command),
        Command::Backup(command) => cmd::backup::run(command),
        Command::Pull(args) => cmd::pull::run(args),
        Command::Repo(args) => cmd::repo::run(args),
        Command::Copy(args) => cmd::copy::run(args),
        Command::UpdateImg(args) => cmd::update_img::run(args),
        Command::Delta(command) => cmd::delta::run(command),
        Command::Restore(args) => cmd::restore::run(args),
        Command::Verify(args) => cmd::verify::run(args),
        Command::Info(args) => cmd::info::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Snapshot(args) => cmd::snapshot::run(args),
        Command::Mount(args) => cmd::mount::run(args),
        Command::Umount(args) => cmd::mount::run_umount(args),
        Command::QuiesceWatchdog(args) => cmd::watchdog::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tidemark: error: {err:#}");
            ExitCode::from(ui::EXIT_FAILURE)
        }
    }
}
