//! `tidemark export`: serve a plain file or block device over NBD, as qemu-nbd does.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use tidemark_daemon::chain_export::{ChainExport, Overlay};
use tidemark_formats::bitmap::{read_bitmap_file, BitmapState};
use tidemark_nbd::export::Export;
use tidemark_nbd::file::{DirtyBitmap, FileExport};
use tidemark_nbd::server::{NbdListener, Server, ServerConfig};

/// Serve a plain file or block device over NBD, as qemu-nbd does.
///
/// The export speaks the full NBD protocol (structured replies, extended headers, block
/// status for `base:allocation` and `qemu:dirty-bitmap:NAME`), so qemu-img, qemu-io,
/// nbdinfo, nbdcopy and libnbd scripts can use it. By default it listens on the Unix socket
/// `<state-dir>/nbd.sock` (mode 0600); TCP only with --listen. Once listening it prints the
/// export's NBD URI on stdout. SIGINT or SIGTERM stop it after in-flight requests finish.
///
/// Examples:
///
///   tidemark export disk.img --socket /tmp/nbd.sock
///   qemu-img info 'nbd+unix:///?socket=/tmp/nbd.sock'
///
///   tidemark export /dev/vg/snap --read-only --name snap --bitmap ckpt1=ckpt1.bitmap
///   nbdinfo --map=qemu:dirty-bitmap:ckpt1 'nbd+unix:///snap?socket=...'
///
/// A restore point (what `tidemark restore` takes: a base image or full delta, then
/// deltas oldest first) is served with --chain, without copying it: reads resolve through
/// the deltas' indexes, newest first, then the base. It is read-only unless --overlay
/// gives it a writable overlay (the backup files are never written):
///
///   tidemark export --chain mon.delta tue.delta wed.delta --name vm1 --socket /tmp/r.sock
///   tidemark export --chain mon.img tue.delta --overlay vm1.overlay --socket /tmp/r.sock
///   tidemark export --chain repo:/srv/backups vm1@tue --socket /tmp/r.sock
///   qemu-system-x86_64 -drive file=nbd+unix:///?socket=/tmp/r.sock,format=raw ...
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The regular file or block device to serve.
    #[arg(required_unless_present = "chain", conflicts_with = "chain")]
    pub file: Option<PathBuf>,

    /// Serve a restore point instead of a file: BASE (an image or a full delta) then its
    /// DELTAs, oldest first. The chain is checked as `tidemark restore` checks it. Or a
    /// repository point: `repo:URL VOLUME@CHECKPOINT`, read straight from the repository.
    #[arg(long, num_args = 1.., value_name = "BASE DELTA", conflicts_with = "bitmap")]
    pub chain: Vec<PathBuf>,

    /// Make the --chain export writable: writes go to FILE (a sparse file, created if
    /// missing) and FILE.map (which blocks it holds); reads take written blocks from it,
    /// the rest from the chain. Give the same FILE and chain again to continue.
    #[arg(
        long,
        value_name = "FILE",
        requires = "chain",
        conflicts_with = "read_only"
    )]
    pub overlay: Option<PathBuf>,

    /// Refuse writes, trims and write-zeroes (EPERM); lets clients open several connections.
    #[arg(long, short = 'r')]
    pub read_only: bool,

    /// Listen on this Unix socket (default: <state-dir>/nbd.sock; a stale socket file is
    /// replaced, a live one is an error).
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,

    /// Listen on TCP instead, e.g. `127.0.0.1:10809` (port 0 picks a free port). Needs
    /// --tls-creds, or --listen-insecure to serve in the clear.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,

    #[command(flatten)]
    pub tls: super::serve::TlsArgs,

    /// The export name clients ask for (`nbd+unix:///NAME?socket=...`). Clients that ask
    /// for the empty name get this export too.
    #[arg(long, default_value = "")]
    pub name: String,

    /// Offer a tidemark dirty-bitmap file as the context `qemu:dirty-bitmap:NAME`
    /// (set bits are reported dirty, as QEMU does). Repeatable.
    /// Example: --bitmap ckpt1=/var/lib/tidemark/vm1/ckpt1.bitmap
    #[arg(long, value_name = "NAME=BITMAPFILE")]
    pub bitmap: Vec<String>,

    /// Connections served at once; a client past it is refused (NBD_REP_ERR_POLICY on its
    /// first option) and the refusal is logged.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Close a connection that sends no request for this long (nothing in flight):
    /// seconds, or with a unit: 90s, 15m, 1h.
    #[arg(long, value_name = "DURATION", default_value = "15m",
          value_parser = crate::cmd::serve::parse_duration)]
    pub idle_timeout: Duration,

    /// Print the ready line as JSON: {"uri", "name", "size", "socket" or "address"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Ready {
    uri: String,
    name: String,
    size: u64,
    read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    bitmaps: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let repo = super::mount::RepoPoint::open(&args.chain)?;
    if repo.is_some() && args.overlay.is_some() {
        bail!(
            "--overlay takes a point of files (BASE DELTA...), not a repository point; \
             restore the point (`tidemark repo restore URL POINT --into FILE`) and serve \
             FILE, or serve the repository point read-only"
        );
    }
    let (export, chain): (Arc<dyn Export>, _) = match (&args.file, args.chain.split_first()) {
        (_, Some(_)) if repo.is_some() => {
            let export = repo.as_ref().map(|r| r.export.clone());
            (export.context("the repository point")?, None)
        }
        (_, Some((base, deltas))) => {
            let chain = Arc::new(open_chain(base, deltas, args.overlay.as_deref())?);
            (chain.clone(), Some(chain))
        }
        (Some(file), None) => {
            let mut export = FileExport::open(file, args.read_only)
                .with_context(|| format!("opening {} for export", file.display()))?;
            for spec in &args.bitmap {
                let bitmap = load_bitmap(spec, export.size())?;
                export.add_bitmap(bitmap);
            }
            (Arc::new(export), None)
        }
        (None, None) => bail!("give a FILE to serve, or --chain BASE DELTA..."),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tidemark-nbd")
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(serve(args, export));
    if let Some(chain) = chain {
        // Sync the overlay and mark its map cleanly closed.
        chain
            .close()
            .map_err(|err| anyhow::anyhow!("closing the overlay: {err}"))?;
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

/// The restore point `base` + `deltas`, over `overlay` when given.
fn open_chain(
    base: &Path,
    deltas: &[PathBuf],
    overlay: Option<&Path>,
) -> anyhow::Result<ChainExport> {
    let chain = ChainExport::open(base, deltas)
        .with_context(|| format!("opening the restore point {}", base.display()))?;
    let Some(path) = overlay else {
        return Ok(chain);
    };
    let overlay = Overlay::open(path, chain.size(), &chain.point())
        .with_context(|| format!("opening the overlay {}", path.display()))?;
    Ok(chain.with_overlay(overlay))
}

fn load_bitmap(spec: &str, export_size: u64) -> anyhow::Result<DirtyBitmap> {
    let Some((name, path)) = spec.split_once('=') else {
        bail!("--bitmap {spec:?}: expected NAME=BITMAPFILE, e.g. --bitmap ckpt1=ckpt1.bitmap");
    };
    let (header, words) = read_bitmap_file(Path::new(path))
        .with_context(|| format!("reading dirty bitmap {name:?} from {path}"))?;
    if header.state == BitmapState::Inconsistent {
        bail!("bitmap {path} is marked inconsistent (it may miss changes); take a full backup instead of exporting it");
    }
    if header.volume_size != export_size {
        bail!(
            "bitmap {path} tracks a {}-byte volume but the export is {export_size} bytes; is it the bitmap of this volume?",
            header.volume_size
        );
    }
    Ok(DirtyBitmap::new(
        name,
        header.granularity.into(),
        words,
        export_size,
    )?)
}

/// `<state-dir>/nbd.sock`: `$TIDEMARK_STATE_DIR`, else /var/lib/tidemark as root, else
/// `$XDG_STATE_HOME/tidemark` (or ~/.local/state/tidemark).
fn default_socket() -> anyhow::Result<PathBuf> {
    let dir = if let Some(dir) = std::env::var_os("TIDEMARK_STATE_DIR") {
        PathBuf::from(dir)
    } else if std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
    {
        PathBuf::from("/var/lib/tidemark")
    } else if let Some(state) = std::env::var_os("XDG_STATE_HOME") {
        PathBuf::from(state).join("tidemark")
    } else if let Some(home) = std::env::var_os("HOME") {
        PathBuf::from(home).join(".local/state/tidemark")
    } else {
        bail!("no state directory: set TIDEMARK_STATE_DIR or pass --socket PATH");
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    Ok(dir.join("nbd.sock"))
}

/// Percent-encode what an NBD URI cannot carry literally.
fn uri_escape(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) async fn serve(args: Args, export: Arc<dyn Export>) -> anyhow::Result<()> {
    let signals = StopSignals::install()?;
    let server = Server::with_config(ServerConfig {
        max_connections: args.max_connections as usize,
        idle_timeout: args.idle_timeout,
        ..ServerConfig::default()
    });
    let tls = tidemark_daemon::Config {
        listen: match &args.listen {
            Some(addr) => Some(tcp_addr(addr)?),
            None => None,
        },
        tls: args.tls.config(),
        listen_insecure: args.tls.listen_insecure,
        ..tidemark_daemon::Config::new(PathBuf::new())
    }
    .nbd_tls()?;
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    match tls {
        Some(tls) => server.set_tls(tls, true),
        None if args.listen.is_some() => eprintln!(
            "tidemark export: warning: serving NBD over TCP without TLS (--listen-insecure)"
        ),
        None => {}
    }
    let size = export.size();
    let read_only = export.capabilities().read_only;
    let served = export.description();
    let bitmaps = export.dirty_bitmaps();
    server.add_export(&args.name, export)?;
    let (listener, ready) = if let Some(addr) = &args.listen {
        let listener = server.bind_tcp(addr).await?;
        let local = listener
            .tcp_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| addr.clone());
        let uri = format!("{scheme}://{local}/{}", uri_escape(&args.name));
        (listener, (uri, None, Some(local)))
    } else {
        let path = match &args.socket {
            Some(path) => path.clone(),
            None => default_socket()?,
        };
        let listener = server.bind_unix(&path)?;
        let shown = path.display().to_string();
        let uri = format!(
            "{scheme}+unix:///{}?socket={}",
            uri_escape(&args.name),
            uri_escape(&shown)
        );
        (listener, (uri, Some(shown), None))
    };
    let (uri, socket, address) = ready;
    if args.json {
        crate::ui::print_json(&Ready {
            uri,
            name: args.name.clone(),
            size,
            read_only,
            socket,
            address,
            bitmaps,
        })?;
    } else {
        println!(
            "serving {served} ({size} bytes{}) at {uri}",
            if read_only { ", read-only" } else { "" }
        );
    }
    wait_and_serve(server, listener, signals).await
}

/// SIGINT and SIGTERM, caught from before the socket exists: a signal sent as soon as a
/// client sees the socket must stop the server cleanly, not kill it.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }
}

async fn wait_and_serve(
    server: Server,
    listener: NbdListener,
    mut signals: StopSignals,
) -> anyhow::Result<()> {
    let serving = tokio::spawn({
        let server = server.clone();
        async move { server.serve(listener).await }
    });
    tokio::select! {
        _ = signals.interrupt.recv() => {}
        _ = signals.terminate.recv() => {}
    }
    tracing::info!("stopping: finishing in-flight requests");
    server.shutdown();
    if !server.wait_idle(Duration::from_secs(10)).await {
        tracing::warn!(
            "{} connections still busy after 10 s; exiting anyway",
            server.connections()
        );
    }
    match serving.await {
        Ok(result) => result?,
        Err(join) => bail!("the NBD server task failed: {join}"),
    }
    Ok(())
}

/// `--listen` as a socket address (the port may be 0), resolving a host name.
fn tcp_addr(addr: &str) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .with_context(|| format!("--listen {addr}: expected HOST:PORT, e.g. 127.0.0.1:10809"))?
        .next()
        .with_context(|| format!("--listen {addr}: the host name has no address"))
}
