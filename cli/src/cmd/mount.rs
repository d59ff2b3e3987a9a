//! `tidemark mount` and `tidemark umount`: a restore point's filesystems, read-only.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context};
use tidemark_daemon::point_mount::{self, MountRecord, PointMount};
use tidemark_repo::reader::{PointReader, ReaderOptions};
use tidemark_repo::{Repository, StoreOptions};

use crate::cmd::repo::export::PointExport;

/// Mount a restore point's filesystems read-only, to pick files out of a backup.
///
/// POINT is what `tidemark restore` takes: a base (an image or a full delta) and its
/// deltas, oldest first; the chain is checked as restore checks it. Or a repository
/// point, `repo:URL VOLUME@CHECKPOINT` (URL a directory or s3://BUCKET/PREFIX), read
/// straight from the repository (chunks fetched as read, checked and cached). The point is served
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
///   tidemark mount repo:/srv/backups vm1@tue /mnt/vm1
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// BASE [DELTA...] DIR (or repo:URL VOLUME@CHECKPOINT DIR): the restore point, then
    /// the directory to mount it at.
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

/// A repository point opened for reading from threads outside any async runtime (FUSE,
/// NBD transmission), with the runtime its reads block on: keep it while it is served.
pub(crate) struct RepoPoint {
    pub(crate) export: std::sync::Arc<PointExport>,
    /// `repo:URL` (a directory made absolute) and `VOLUME@CHECKPOINT`.
    pub(crate) named: [String; 2],
    _runtime: tokio::runtime::Runtime,
}

impl RepoPoint {
    /// `POINT...` as given: a repository point when it starts with `repo:URL`
    /// (then exactly one VOLUME@CHECKPOINT follows), opened; `None` for files.
    pub(crate) fn open(point: &[PathBuf]) -> anyhow::Result<Option<RepoPoint>> {
        let Some(url) = point
            .first()
            .and_then(|p| p.to_str())
            .and_then(|p| p.strip_prefix("repo:"))
        else {
            return Ok(None);
        };
        let [_, name] = point else {
            bail!("a repository point is `repo:URL VOLUME@CHECKPOINT` (one point after repo:URL)");
        };
        let name = name.to_string_lossy().to_string();
        let url = super::repo::absolute_repo_url(url);
        // Its own runtime, started outside any other: reads block on it from other threads.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tidemark-repo-read")
            .enable_all()
            .build()
            .context("starting the repository reader")?;
        let reader = runtime
            .block_on(async {
                let repo = Repository::open(&url, &StoreOptions::default()).await?;
                PointReader::open(
                    &repo,
                    &name,
                    runtime.handle().clone(),
                    ReaderOptions::default(),
                )
                .await
            })
            .with_context(|| format!("opening the point {name} of the repository {url}"))?;
        Ok(Some(RepoPoint {
            export: std::sync::Arc::new(PointExport::new(reader)),
            named: [format!("repo:{url}"), name],
            _runtime: runtime,
        }))
    }
}

/// Serve `point` (files, or a repository point) and mount its filesystems at `dir`.
fn mount(
    state: &std::path::Path,
    point: &[PathBuf],
    dir: &std::path::Path,
) -> anyhow::Result<(PointMount, Option<RepoPoint>)> {
    if let Some(repo) = RepoPoint::open(point)? {
        let named = repo.named.iter().map(PathBuf::from).collect();
        let mounted = PointMount::mount_export(state, named, repo.export.clone(), dir)?;
        return Ok((mounted, Some(repo)));
    }
    let Some((base, deltas)) = point.split_first() else {
        bail!("give the restore point: BASE [DELTA...]");
    };
    Ok((PointMount::mount(state, base, deltas, dir)?, None))
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
    // Installed before anything is mounted: `tidemark umount` may signal at once.
    let (mut terminate, mut interrupt) = runtime.block_on(async {
        anyhow::Ok((
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        ))
    })?;
    // Mounted outside the runtime: a repository point's reads block on a runtime of their
    // own, which they may not do from inside this one.
    let (mut mounted, _repo) = mount(state, point, dir)
        .with_context(|| format!("mounting the restore point at {}", dir.display()))?;
    report(mounted.record(), json)?;
    runtime.block_on(async {
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
    });
    Ok(ExitCode::SUCCESS)
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
