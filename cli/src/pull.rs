//! The pull client behind `tidemark pull`: copy an NBD export, in full or only the ranges
//! its dirty bitmap reports, into an image and/or a delta file.
//!
//! Three steps, each its own module:
//! 1. [`source`]: ask the export for its `base:allocation` map and, for an incremental
//!    pull, its `qemu:dirty-bitmap:NAME` map (NBD_CMD_BLOCK_STATUS);
//! 2. [`plan`]: merge the maps into spans to copy or zero; everything else is skipped;
//! 3. [`transfer`]: read the copy spans with many requests in flight over one or more
//!    connections and hand them, in offset order, to a [`sink::Sink`] (the copy engine's
//!    image writer and/or a delta writer).
//!
//! An incremental pull whose bitmap the export does not offer fails with
//! [`MissingBitmap`]: copying everything instead would silently turn a small backup into a
//! full one (and hide a broken checkpoint chain), so that takes an explicit `--full`.
//!
//! A delta file records its volume's uuid, so it is never applied to another volume: a
//! tidemark backup export names the uuid (and granularity) in its NBD description
//! ([`tidemark_daemon::export::describe_origin`]); from any other export a delta needs `--volume-uuid`, and a pull
//! without one is refused before anything is written, never recorded as the nil uuid.

pub mod plan;
pub mod repo;
pub mod sink;
pub mod source;
pub mod transfer;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use tidemark_formats::delta::{CheckpointRef, DeltaHeader};
use uuid::Uuid;

use tidemark_daemon::export::parse_origin;

use self::plan::{Plan, Run};
use self::source::Connection;
use self::transfer::Shape;
use crate::ui;

/// The allocation context every NBD server with block status offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The granularity a delta records when the caller does not know the bitmap's.
pub const DEFAULT_GRANULARITY: u32 = 64 << 10;

/// How long connecting and negotiating may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an extra connection may take to open before the pull goes on without it
/// (a server that allows one client at a time never answers the second).
const EXTRA_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);

/// Full or incremental.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Every byte of the export.
    Full,
    /// The ranges `qemu:dirty-bitmap:<bitmap>` reports dirty.
    Incremental { bitmap: String },
}

impl Mode {
    fn dirty_context(&self) -> Option<String> {
        match self {
            Mode::Full => None,
            Mode::Incremental { bitmap } => Some(format!("qemu:dirty-bitmap:{bitmap}")),
        }
    }
}

/// What to pull and how hard.
#[derive(Debug, Clone)]
pub struct PullRequest {
    /// The export's NBD URI.
    pub uri: String,
    pub mode: Mode,
    /// Connections to use when the server allows several.
    pub connections: usize,
    /// Reads in flight per connection.
    pub queue_depth: usize,
    /// Largest single read in bytes.
    pub request_size: u64,
}

/// Where the pulled bytes go (at least one of `image` and `delta`), and what a delta
/// file's header says about them.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    /// The image: created (full) or updated in place (incremental).
    pub image: Option<PathBuf>,
    /// A delta file with the pulled ranges.
    pub delta: Option<PathBuf>,
    /// The point the delta brings a volume to (default `pull-<unix time>`).
    pub checkpoint: Option<String>,
    /// The volume's uuid (a pull with a delta finds it in a tidemark export's description,
    /// or refuses without it).
    pub volume_uuid: Option<Uuid>,
    /// The tracking granularity recorded in the delta (default: the tidemark export's, else
    /// 64 KiB).
    pub granularity: Option<u32>,
    /// Generations of the checkpoints the delta goes from and to (0 when unknown).
    pub from_generation: u64,
    pub to_generation: u64,
    /// A repository to store the pull in as the point `VOLUME@CHECKPOINT`.
    pub repo: Option<repo::RepoTarget>,
}

impl Targets {
    /// The header of the delta file a pull of `mode` from an export of `size` bytes writes:
    /// from the bitmap's checkpoint (none for a full pull) to `checkpoint`.
    pub fn delta_header(&self, mode: &Mode, size: u64) -> DeltaHeader {
        let created_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let to = self
            .checkpoint
            .clone()
            .unwrap_or_else(|| format!("pull-{created_unix}"));
        DeltaHeader {
            volume_uuid: self.volume_uuid.unwrap_or(Uuid::nil()),
            volume_size: size,
            granularity: self.granularity.unwrap_or(DEFAULT_GRANULARITY),
            from: match mode {
                Mode::Full => None,
                Mode::Incremental { bitmap } => Some(CheckpointRef {
                    name: bitmap.clone(),
                    generation: self.from_generation,
                }),
            },
            to: CheckpointRef {
                name: to,
                generation: self.to_generation,
            },
            created_unix,
        }
    }
}

/// The targets with the volume uuid and granularity a delta header needs: given, or read
/// from a tidemark export's description. A delta of an unknown volume is refused rather
/// than written with a nil uuid.
fn resolve_origin(targets: &Targets, uri: &str, description: &str) -> anyhow::Result<Targets> {
    let mut resolved = targets.clone();
    if targets.delta.is_none() {
        return Ok(resolved);
    }
    let origin = parse_origin(description);
    if resolved.volume_uuid.is_none() {
        match origin {
            Some((uuid, _)) => resolved.volume_uuid = Some(uuid),
            None => anyhow::bail!(
                "--volume-uuid is needed: {uri} does not say which volume it is (it is not a \
                 tidemark backup export; its description is {description:?}), and a delta \
                 file records its volume's uuid so it is never applied to another volume; \
                 pass the uuid of the disk this export serves, e.g. --volume-uuid $(uuidgen) \
                 once and the same uuid for every later delta of it"
            ),
        }
    }
    if resolved.granularity.is_none() {
        resolved.granularity = origin.map(|(_, granularity)| granularity);
    }
    Ok(resolved)
}

/// The names of the point a `--repo` pull stores: the volume's name and uuid from a
/// tidemark export's description (or `--volume`, `--volume-uuid`), the checkpoint from
/// `--checkpoint` (default `pull-<unix time>`), the base from the bitmap.
fn repo_names(
    targets: &Targets,
    target: &repo::RepoTarget,
    mode: &Mode,
    uri: &str,
    description: &str,
) -> anyhow::Result<repo::PointNames> {
    let origin = parse_origin(description);
    let volume = match target
        .volume
        .clone()
        .or_else(|| repo::described_volume(description))
    {
        Some(volume) => volume,
        None => anyhow::bail!(
            "--volume is needed: {uri} does not name its volume (it is not a tidemark backup \
             export; its description is {description:?}); a repository point is VOLUME@CHECKPOINT"
        ),
    };
    if !tidemark_repo::format::valid_name(&volume) {
        anyhow::bail!("--volume {volume:?}: a volume name is 1-128 of A-Z a-z 0-9 . _ - +");
    }
    let uuid = match targets.volume_uuid.or(origin.map(|(uuid, _)| uuid)) {
        Some(uuid) => uuid,
        None => anyhow::bail!(
            "--volume-uuid is needed: {uri} is not a tidemark backup export, and a repository \
             point records its volume's uuid; pass the same uuid for every point of this disk"
        ),
    };
    let checkpoint = targets
        .checkpoint
        .clone()
        .unwrap_or_else(|| format!("pull-{}", tidemark_repo::now_unix()));
    if !tidemark_repo::format::valid_name(&checkpoint) || checkpoint == "latest" {
        anyhow::bail!("--checkpoint {checkpoint:?}: a checkpoint name is 1-128 of A-Z a-z 0-9 . _ - + (not `latest`)");
    }
    Ok(repo::PointNames {
        volume,
        uuid: *uuid.as_bytes(),
        checkpoint,
        parent: match mode {
            Mode::Full => None,
            Mode::Incremental { bitmap } => Some(bitmap.clone()),
        },
        granularity: targets
            .granularity
            .or(origin.map(|(_, granularity)| granularity))
            .unwrap_or(DEFAULT_GRANULARITY),
    })
}

/// The export offers no dirty bitmap of the requested name.
#[derive(Debug)]
pub struct MissingBitmap {
    pub uri: String,
    pub bitmap: String,
}

impl fmt::Display for MissingBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the export {uri} has no dirty bitmap {bitmap:?} (the server did not select the \
             context qemu:dirty-bitmap:{bitmap}; `nbdinfo '{uri}'` lists the contexts it \
             offers). Check the bitmap name (qemu-nbd: -B NAME; tidemark: the checkpoint given \
             to `backup begin --incremental`), or copy everything with --full",
            uri = self.uri,
            bitmap = self.bitmap,
        )
    }
}

impl std::error::Error for MissingBitmap {}

/// What a pull did: the `--json` report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub export: String,
    /// `full` or `incremental`.
    pub mode: &'static str,
    pub bitmap: Option<String>,
    pub image: Option<PathBuf>,
    pub delta: Option<PathBuf>,
    /// The repository point stored (`--repo`), `VOLUME@CHECKPOINT`.
    pub repo_point: Option<String>,
    /// Export size in bytes.
    pub size: u64,
    /// Bytes the dirty bitmap reported changed (incremental only).
    pub bytes_dirty: Option<u64>,
    /// Bytes read from the export.
    pub bytes_pulled: u64,
    /// Bytes not read: clean ranges and ranges the server reported as zero.
    pub bytes_skipped: u64,
    /// Bytes written as zero / holes (reported zero, or read back as all zero).
    pub bytes_zeroed: u64,
    pub requests: u64,
    pub connections: usize,
    /// Time to read the block-status maps.
    pub map_seconds: f64,
    /// Time of the whole pull, maps and final sync included.
    pub seconds: f64,
    /// Bytes pulled per second of the whole pull, in MB/s (10^6).
    pub mb_per_sec: f64,
}

impl Report {
    /// Two human lines for the terminal.
    pub fn summary(&self) -> String {
        let what = match &self.bitmap {
            Some(bitmap) => format!("incremental pull (bitmap {bitmap})"),
            None => "full pull".to_string(),
        };
        format!(
            "{what} of {} done in {:.2} s: {} pulled at {:.1} MB/s, {} skipped, {} zeroed \
             ({} requests on {} connection{})",
            self.export,
            self.seconds,
            human_bytes(self.bytes_pulled),
            self.mb_per_sec,
            human_bytes(self.bytes_skipped),
            human_bytes(self.bytes_zeroed),
            self.requests,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
        )
    }
}

/// `12.3 MiB`-style sizes for people.
pub fn human_bytes(bytes: u64) -> String {
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

/// Run one pull to completion (a tokio runtime of its own; call from synchronous code).
/// `progress` shows a bar on a terminal.
pub fn pull(request: &PullRequest, targets: &Targets, progress: bool) -> anyhow::Result<Report> {
    if targets.image.is_none() && targets.delta.is_none() && targets.repo.is_none() {
        anyhow::bail!("a pull needs a target: --into IMAGE, --delta FILE and/or --repo URL");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the pull's async runtime")?;
    runtime.block_on(pull_async(request, targets, progress))
}

async fn pull_async(
    request: &PullRequest,
    targets: &Targets,
    progress: bool,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let dirty_context = request.mode.dirty_context();
    let mut contexts = vec![BASE_ALLOCATION.to_string()];
    contexts.extend(dirty_context.clone());
    let primary = Connection::open(
        &request.uri,
        &contexts,
        1,
        request.queue_depth,
        CONNECT_TIMEOUT,
    )
    .await?;
    let size = primary.size();
    let targets = match resolve_origin(targets, &request.uri, primary.description()) {
        Ok(resolved) => resolved,
        Err(err) => {
            primary.close().await;
            return Err(err);
        }
    };
    let targets = &targets;

    if let (Some(context), Mode::Incremental { bitmap }) = (&dirty_context, &request.mode) {
        if !primary.has_context(context) {
            primary.close().await;
            return Err(MissingBitmap {
                uri: request.uri.clone(),
                bitmap: bitmap.clone(),
            }
            .into());
        }
    }

    // The maps, gathered together (one request answers for every context). A server
    // without base:allocation (nbd-server) describes nothing: every byte is data.
    let has_allocation = primary.has_context(BASE_ALLOCATION);
    let mut wanted: Vec<&str> = Vec::new();
    if has_allocation {
        wanted.push(BASE_ALLOCATION);
    }
    wanted.extend(dirty_context.as_deref());
    let mut maps = source::gather(&primary, &wanted, size).await?.into_iter();
    let allocation = if has_allocation {
        maps.next().unwrap_or_default()
    } else {
        vec![Run {
            offset: 0,
            length: size,
            flags: 0,
        }]
    };
    let (plan, bytes_dirty) = match maps.next() {
        None => (Plan::full(&allocation), None),
        Some(dirty) => {
            let dirty_bytes = dirty
                .iter()
                .filter(|r| r.flags & tidemark_nbd::export::STATE_DIRTY != 0)
                .map(|r| r.length)
                .sum();
            (Plan::incremental(&allocation, &dirty), Some(dirty_bytes))
        }
    };
    let map_seconds = started.elapsed().as_secs_f64();
    let request_size = request.request_size.min(primary.max_request()).max(1);

    let mut sink: Box<dyn sink::Sink + Send> = if targets.image.is_some() || targets.delta.is_some()
    {
        sink::open(targets, &request.mode, size, request_size)
            .with_context(|| format!("preparing the pull target for {}", request.uri))?
    } else {
        Box::new(sink::Tee(Vec::new()))
    };
    let mut repo_point = None;
    if let Some(target) = &targets.repo {
        let names = repo_names(
            targets,
            target,
            &request.mode,
            &request.uri,
            primary.description(),
        );
        let opened = match names {
            Ok(names) => {
                repo_point = Some(format!("{}@{}", names.volume, names.checkpoint));
                repo::RepoSink::open(target, &names, size).await
            }
            Err(err) => Err(err),
        };
        match opened {
            Ok(repo_sink) => sink = Box::new(sink::Tee(vec![sink, Box::new(repo_sink)])),
            Err(err) => {
                primary.close().await;
                return Err(err.context(format!("opening the repository {}", target.url)));
            }
        }
    }

    // Every connection appears once in `readers`; the transfer runs `queue_depth` tasks
    // per entry, and the client spreads each one's requests over its connections.
    let mut readers = vec![Arc::new(primary.clone())];
    let mut extra = None;
    if request.connections > 1 && primary.can_multi_conn() && plan.copy_bytes() > request_size {
        match Connection::open(
            &request.uri,
            &[],
            request.connections - 1,
            request.queue_depth,
            EXTRA_CONNECTION_TIMEOUT,
        )
        .await
        {
            Ok(more) => {
                let more = Arc::new(more);
                readers.extend((0..more.connections()).map(|_| Arc::clone(&more)));
                extra = Some(more);
            }
            Err(err) => {
                tracing::warn!("going on with one connection: {err:#}");
            }
        }
    }

    let bar = if progress {
        ui::byte_progress(plan.copy_bytes() + plan.zero_bytes(), "pull")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let shape = Shape {
        queue_depth: request.queue_depth,
        request_size,
    };
    let moved = transfer::run(&readers, &plan, &mut *sink, shape, &bar).await;
    let connections = readers.len();
    drop(readers);
    if let Some(extra) = extra {
        extra.close().await;
    }
    primary.close().await;
    let moved = moved?;
    tokio::task::block_in_place(|| sink.finish()).context("finishing the pull target")?;
    bar.finish_and_clear();

    let seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        export: request.uri.clone(),
        mode: match request.mode {
            Mode::Full => "full",
            Mode::Incremental { .. } => "incremental",
        },
        bitmap: match &request.mode {
            Mode::Full => None,
            Mode::Incremental { bitmap } => Some(bitmap.clone()),
        },
        image: targets.image.clone(),
        delta: targets.delta.clone(),
        repo_point,
        size,
        bytes_dirty,
        bytes_pulled: moved.read,
        bytes_skipped: size - moved.read,
        bytes_zeroed: moved.zeroed,
        requests: moved.requests,
        connections,
        map_seconds,
        seconds,
        mb_per_sec: ui::mb_per_sec(moved.read, seconds),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_daemon::export::describe_origin;

    #[test]
    fn missing_bitmap_error_says_what_to_do() {
        let err = MissingBitmap {
            uri: "nbd+unix:///vm?socket=/s".into(),
            bitmap: "mon".into(),
        };
        let text = err.to_string();
        assert!(text.contains("no dirty bitmap \"mon\""), "{text}");
        assert!(
            text.contains("nbdinfo 'nbd+unix:///vm?socket=/s'"),
            "{text}"
        );
        assert!(text.contains("--full"), "{text}");
    }

    #[test]
    fn origin_descriptions_round_trip_and_others_are_refused() {
        let uuid = Uuid::new_v4();
        let text = describe_origin("tidemark snapshot backup-7 of volume vm (1)", uuid, 4096);
        assert_eq!(parse_origin(&text), Some((uuid, 4096)));
        for other in [
            "",
            "/srv/disk.qcow2",
            &text.replace("tidemark ", "qemu "),
            &text.replace("4096", "4095"),
            &text.replace("4096", "99999999999"),
            &text.replace(&uuid.to_string(), "not-a-uuid"),
            &text.replace(&uuid.to_string(), &Uuid::nil().to_string()),
            &text[..text.len() - 1],
        ] {
            assert_eq!(parse_origin(other), None, "{other:?}");
        }
    }

    #[test]
    fn a_delta_of_an_unknown_volume_needs_a_uuid() {
        let targets = Targets {
            delta: Some(PathBuf::from("/x.delta")),
            ..Targets::default()
        };
        let err = resolve_origin(&targets, "nbd://h/e", "some disk").unwrap_err();
        assert!(err.to_string().contains("--volume-uuid"), "{err}");
        let uuid = Uuid::new_v4();
        let given = Targets {
            volume_uuid: Some(uuid),
            ..targets.clone()
        };
        let resolved = resolve_origin(&given, "nbd://h/e", "some disk").unwrap();
        assert_eq!(resolved.volume_uuid, Some(uuid));
        assert_eq!(resolved.granularity, None);
        let described = describe_origin("tidemark snapshot b of volume v", uuid, 1 << 20);
        let resolved = resolve_origin(&targets, "nbd://h/e", &described).unwrap();
        assert_eq!(resolved.volume_uuid, Some(uuid));
        assert_eq!(resolved.granularity, Some(1 << 20));
        // An image-only pull needs neither.
        let image = Targets {
            image: Some(PathBuf::from("/x.img")),
            ..Targets::default()
        };
        assert!(resolve_origin(&image, "nbd://h/e", "").is_ok());
    }

    #[test]
    fn human_bytes_picks_a_readable_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
