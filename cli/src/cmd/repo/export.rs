//! `tidemark repo export`: serve a point read-only over NBD straight from the repository
//! (instant restore), through the same server, sockets and TLS as `tidemark export`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tidemark_nbd::export::{
    Capabilities, Errno, Export, ExportError, ExportResult, Extent, MetaContext, ZeroFlags,
    STATE_HOLE, STATE_ZERO,
};
use tidemark_repo::lock::SharedLock;
use tidemark_repo::reader::{PointReader, ReaderOptions};
use tidemark_repo::{RepoError, Repository, StoreOptions};

use crate::ui;

/// Serve a point over NBD, read-only, straight from the repository: nothing is restored
/// first. Chunks are fetched with ranged GETs of their packs as clients read them, checked
/// (CRC and id hash) and kept in a bounded cache; zero chunks and the zero runs the backup
/// recorded inside chunks are holes in `base:allocation`, read without a fetch (a sparse copy
/// stays sparse). A chunk that fails its checks is an EIO for the client. Listens on a
/// Unix socket (default <state-dir>/nbd.sock) or with --listen on TCP, and prints the URI.
///
/// Examples:
///
///   tidemark repo export /srv/backups vm1@latest --socket /tmp/vm1.sock
///
///   nbdcopy 'nbd+unix:///vm1@c2?socket=/tmp/vm1.sock' vm1.img
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `[URL] POINT`: the repository (or $TIDEMARK_REPO) and VOLUME@CHECKPOINT or VOLUME@latest.
    #[arg(num_args = 1..=2, required = true, value_name = "URL POINT")]
    pub args: Vec<String>,

    /// The export name clients ask for (default: the point, VOLUME@CHECKPOINT).
    #[arg(long)]
    pub name: Option<String>,

    /// Listen on this Unix socket (default: <state-dir>/nbd.sock).
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,

    /// Listen on TCP, e.g. `127.0.0.1:10809` (needs --tls-creds or --listen-insecure).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,

    #[command(flatten)]
    pub tls: crate::cmd::serve::TlsArgs,

    /// Memory for inflated chunks (at least two chunks), e.g. 256M or 1G.
    #[arg(long, value_name = "SIZE", default_value = "256M",
          value_parser = |s: &str| ui::parse_size(s).map_err(|e| e.to_string()))]
    pub cache_size: u64,

    /// Chunks fetched ahead of a client that reads sequentially (0: none).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub readahead: u64,

    /// Connections served at once.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Close a connection idle for this long: 90s, 15m, 1h.
    #[arg(long, value_name = "DURATION", default_value = "15m",
          value_parser = crate::cmd::serve::parse_duration)]
    pub idle_timeout: Duration,

    /// Print the ready line as JSON: {"uri", "name", "size", "socket" or "address"}.
    #[arg(long)]
    pub json: bool,
}

/// A point as an NBD export.
#[derive(Debug)]
pub struct PointExport {
    reader: PointReader,
    description: String,
}

impl PointExport {
    /// The description names the volume the way a backup export does, so that `tidemark
    /// pull` of this export (into another repository, say) knows the volume and its uuid.
    pub fn new(reader: PointReader) -> PointExport {
        let point = reader.point();
        let description = tidemark_daemon::export::describe_origin(
            &format!(
                "tidemark repository point {} of volume {}",
                point.name(),
                point.volume
            ),
            uuid::Uuid::from_bytes(point.volume_uuid),
            point.granularity,
        );
        PointExport {
            reader,
            description,
        }
    }
}

fn read_only() -> ExportError {
    ExportError::new(
        Errno::Perm,
        "a repository point is read-only: restore it (`tidemark repo restore`) to change it",
    )
}

fn repo_error(err: RepoError) -> ExportError {
    tracing::warn!("{err}");
    let errno = match err {
        RepoError::Invalid(_) => Errno::Inval,
        RepoError::Corrupt { .. } | RepoError::Store { .. } => Errno::Io,
    };
    ExportError::new(errno, err.to_string())
}

impl Export for PointExport {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            flush: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            cache: true,
            multi_conn: true,
            knows_holes: true,
        }
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        self.reader.read(offset, buf).map_err(repo_error)
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> ExportResult<()> {
        Err(read_only())
    }

    fn flush(&self) -> ExportResult<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> ExportResult<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> ExportResult<()> {
        Err(read_only())
    }

    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.reader.prefetch(offset, len).map_err(repo_error)
    }

    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> ExportResult<Vec<Extent>> {
        if *context != MetaContext::BaseAllocation {
            return Err(ExportError::new(
                Errno::Inval,
                format!(
                    "a repository point offers only base:allocation, not {}",
                    context.wire_name()
                ),
            ));
        }
        Ok(self
            .reader
            .allocation(offset, len)
            .into_iter()
            .map(|(length, zero)| Extent {
                length,
                flags: if zero { STATE_HOLE | STATE_ZERO } else { 0 },
            })
            .collect())
    }
}

/// Open the point and serve it until SIGINT or SIGTERM.
pub async fn run(
    args: Args,
    url: String,
    point: String,
    options: StoreOptions,
) -> anyhow::Result<()> {
    let repo = Repository::open(&url, &options).await?;
    // Held while serving: prune and gc refuse to delete packs under a live reader.
    let lock = SharedLock::acquire(&repo, &format!("repo export of {point}")).await?;
    let served = serve(args, &repo, &url, &point).await;
    lock.release().await?;
    served
}

async fn serve(args: Args, repo: &Repository, url: &str, point: &str) -> anyhow::Result<()> {
    let reader_options = ReaderOptions {
        cache_bytes: args.cache_size,
        readahead: args.readahead,
    };
    let reader = PointReader::open(
        repo,
        point,
        tokio::runtime::Handle::current(),
        reader_options,
    )
    .await?;
    let name = args.name.unwrap_or_else(|| reader.point().name());
    let export: Arc<dyn Export> = Arc::new(PointExport::new(reader.clone()));
    let served = crate::cmd::export::Args {
        file: Some(PathBuf::from(format!(
            "{} from {url}",
            reader.point().name()
        ))),
        chain: Vec::new(),
        overlay: None,
        read_only: true,
        socket: args.socket,
        listen: args.listen,
        tls: args.tls,
        name,
        bitmap: Vec::new(),
        max_connections: args.max_connections,
        idle_timeout: args.idle_timeout,
        json: args.json,
    };
    crate::cmd::export::serve(served, export).await?;
    tracing::info!(
        "served {}: {} chunks fetched from {url}",
        reader.point().name(),
        reader.fetched_chunks()
    );
    Ok(())
}
