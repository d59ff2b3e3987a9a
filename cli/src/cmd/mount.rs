//! `tidemark mount` and `tidemark umount`: a restore point's filesystems, read-only.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context};
use tidemark_daemon::point_mount::{self, MountRecord, PointMount};

/// Mount a restore point's filesystems read-only, to pick files out of a backup.
///
/// POINT is what `tidemark restore` takes: a base (an image or a full delta) and its
/// deltas, oldest first; the chain is checked as restore checks it. The point is served
/// without copying it (FUSE + loop; a partition table, MBR or GPT, is read from the point
/// and each partition gets its own loop device): a disk image with a partition table gets each partition's filesystem mounted at DIR/pN, an image holding a single
/// filesystem gets it mounted at DIR. Journals are not replayed (ext3/4 noload, xfs
/// norecovery). tidemark keeps serving in the background (log in
/// <state-dir>/mounts/) until `tidemark umount DIR`.
///
/// Examples:
///   tidemark mount mon.delta tue.delta wed.delta /mnt/restore
///   cp /mnt/restore/etc/fstab /tmp/ && tidemark umount /mnt/restore
///   tidemark mount vm1-disk.img vm1-tue.delta /mnt/vm1     # /mnt/vm1/p1, /mnt/vm1/p2
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// BASE [DELTA...] DIR: the restore point, then the directory to mount it at.
    #[arg(required = true, num_args = 2.., value_name = "POINT... DIR")]
    pub paths: Vec<PathBuf>,

    /// Serve in the foreground until SIGTERM or SIGINT (then unmount and detach) instead
    /// of in the background.
    #[arg(long)]
    pub foreground: bool,

    /// Where mount records and logs go (<state-dir>/mounts). Default: $TIDEMARK_STATE_DIR,
    /// else /var/lib/tidemark as root, else $XDG_STATE_HOME/tidemark.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Print what was mounted where as one line of JSON.
    #[arg(long)]
    pub json: bool,
}

/// Unmount a restore point mounted by `tidemark mount`, and stop serving it.
///
/// Refused while a program has files open under DIR (nothing changes; close them and run
/// it again).
#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    /// The directory given to `tidemark mount`.
    pub dir: PathBuf,

    /// The state directory `tidemark mount` used (default as for mount).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Print what was unmounted as one line of JSON.
    #[arg(long)]
    pub json: bool,
}

fn state_dir(given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir.clone(),
        None => tidemark_daemon::default_state_dir()?,
    };
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    std::fs::create_dir_all(point_mount::records_dir(&dir))
        .with_context(|| format!("creating {}", point_mount::records_dir(&dir).display()))?;
    Ok(dir)
}

fn report(record: &MountRecord, json: bool) -> anyhow::Result<()> {
    if json {
        return crate::ui::print_json(record);
    }
    for mounted in &record.mounts {
        println!(
            "mounted {} ({}, read-only) at {}",
            mounted.device.display(),
            mounted.fstype,
            mounted.dir.display()
        );
    }
    for skipped in &record.skipped {
        println!("skipped {skipped}");
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let state = state_dir(&args.state_dir)?;
    let Some((dir, point)) = args.paths.split_last() else {
        bail!("give the restore point (BASE [DELTA...]) and the directory to mount it at");
    };
    if args.foreground {
        return serve(&state, point, dir, args.json);
    }
    let log_path = point_mount::log_path(&state, dir)?;
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating the log {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the tidemark binary")?;
    let mut child = Command::new(exe)
        .arg("mount")
        .arg("--foreground")
        .arg("--json")
        .arg("--state-dir")
        .arg(&state)
        .args(&args.paths)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Out of the terminal's process group: a Ctrl-C there does not stop the server.
        .process_group(0)
        .spawn()
        .context("starting the serving process")?;
    let stdout = child
        .stdout
        .take()
        .context("no stdout from the serving process")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the serving process's ready line")?;
    if line.trim().is_empty() {
        let status = child.wait().context("waiting for the serving process")?;
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_file(&log_path);
        let why = log
            .lines()
            .rev()
            .find(|l| l.contains("error"))
            .unwrap_or(log.trim())
            .trim_start_matches("tidemark: error: ")
            .to_string();
        bail!("{why} (the serving process exited: {status})");
    }
    let record: MountRecord = serde_json::from_str(line.trim())
        .with_context(|| format!("the serving process's ready line is not JSON: {line:?}"))?;
    report(&record, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Mount in this process, print the record, serve until SIGTERM/SIGINT, then unmount.
fn serve(
    state: &std::path::Path,
    point: &[PathBuf],
    dir: &std::path::Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Installed before anything is mounted: `tidemark umount` may signal at once.
        let mut terminate =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut interrupt =
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let Some((base, deltas)) = point.split_first() else {
            bail!("give the restore point: BASE [DELTA...]");
        };
        let mut mounted = PointMount::mount(state, base, deltas, dir)
            .with_context(|| format!("mounting the restore point at {}", dir.display()))?;
        report(mounted.record(), json)?;
        loop {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            match mounted.unmount() {
                Ok(()) => break,
                Err(err) => eprintln!("tidemark mount: cannot stop yet: {err}"),
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_umount(args: UmountArgs) -> anyhow::Result<ExitCode> {
    let state = state_dir(&args.state_dir)?;
    let log_path = point_mount::log_path(&state, &args.dir).ok();
    let record = point_mount::umount(&state, &args.dir)?;
    if let Some(log) = log_path {
        let _ = std::fs::remove_file(log);
    }
    if args.json {
        crate::ui::print_json(&record)?;
    } else {
        println!("unmounted {}", record.dir.display());
    }
    Ok(ExitCode::SUCCESS)
}
