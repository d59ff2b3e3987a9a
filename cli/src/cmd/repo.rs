//! `tidemark repo`: the backup repository on a directory or S3-compatible storage.

pub(crate) mod export;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use tidemark_repo::fetch::{fetch_run, plan_runs, RunLimits};
use tidemark_repo::maint::{self, PruneReport};
use tidemark_repo::{ChunkHash, ChunkRef, Keep, Repository, StoreOptions, DEFAULT_CHUNK_SIZE};

use crate::pull::sink::{ImageSink, Sink};
use crate::pull::{human_bytes, Mode};
use crate::ui;

/// Keep points in a repository: deduplicated, compressed chunks in packs on a directory or
/// on S3-compatible object storage (s3://BUCKET/PREFIX; endpoint, region and credentials
/// from AWS_* variables and --s3-endpoint). Points are stored by `tidemark pull --repo URL`.
/// Every subcommand takes the repository URL first, or from $TIDEMARK_REPO.
///
/// Examples:
///
///   tidemark repo init /srv/backups
///
///   tidemark pull --full 'nbd+unix:///vm1@backup?socket=/var/lib/tidemark/nbd.sock' \
///       --repo /srv/backups --checkpoint c1
///
///   tidemark repo list /srv/backups
///
///   tidemark repo restore /srv/backups vm1@latest --into vm1.img
///
///   tidemark repo export /srv/backups vm1@latest --socket /tmp/vm1.sock
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: RepoCommand,

    /// The S3 endpoint of an s3:// repository, e.g. http://127.0.0.1:8333 (default:
    /// AWS_ENDPOINT_URL, else AWS). Plain http only to loopback.
    #[arg(long, global = true, value_name = "URL")]
    s3_endpoint: Option<String>,

    /// The key file of an encrypted repository (default: $TIDEMARK_REPO_KEY).
    #[arg(long, global = true, value_name = "FILE")]
    key: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum RepoCommand {
    /// Create an empty repository.
    Init {
        #[arg(env = "TIDEMARK_REPO", value_name = "URL")]
        url: String,
        /// Chunk size, a power of two from 64K to 64M and a multiple of every volume's
        /// tracking granularity.
        #[arg(long, default_value = "4M", value_parser = parse_chunk)]
        chunk_size: u32,
        /// Encrypt the repository with this key file (made by `tidemark repo key generate`):
        /// chunks and indexes sealed with AES-256-GCM, chunk ids keyed. Keep a copy of the
        /// key file apart from the repository: without it nothing can be restored. `--key`
        /// or $TIDEMARK_REPO_KEY do the same.
        #[arg(long, value_name = "KEYFILE")]
        encryption: Option<PathBuf>,
        /// The hash of chunk and pack ids: blake3 (several times faster to back up and to
        /// read back on a CPU with AVX2 or AVX-512), or sha256 where only SHA-256 is allowed
        /// (FIPS 180-4). tidemark builds from before BLAKE3 refuse a blake3 repository with
        /// a version error; they open a sha256 one but cannot read the points this build
        /// writes (version 3 point indexes): upgrade every tidemark that uses a repository.
        #[arg(long, default_value = "blake3", value_parser = parse_hash)]
        hash: ChunkHash,
        /// Print the new repository's config as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage key files of encrypted repositories.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// List the points, per volume: checkpoint, time, size, new data stored.
    List {
        #[arg(env = "TIDEMARK_REPO", value_name = "URL")]
        url: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a point into an image (holes stay holes): `repo restore [URL] VOLUME@CKPT --into DEST`.
    Restore {
        /// `[URL] POINT`: the repository (or $TIDEMARK_REPO) and VOLUME@CHECKPOINT or VOLUME@latest.
        #[arg(num_args = 1..=2, required = true, value_name = "URL POINT")]
        args: Vec<String>,
        #[arg(long, value_name = "DEST")]
        into: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Serve a point over NBD, read-only, straight from the repository (instant restore).
    Export(export::Args),
    /// Check every index (and with --read-data every chunk); names each broken object.
    Verify {
        #[arg(env = "TIDEMARK_REPO", value_name = "URL")]
        url: String,
        #[arg(long)]
        read_data: bool,
        #[arg(long)]
        json: bool,
    },
    /// Drop the points the policy does not keep, repack the packs that are mostly dead, then
    /// delete the packs no point needs.
    Prune {
        #[arg(env = "TIDEMARK_REPO", value_name = "URL")]
        url: String,
        /// Keep the newest N points of each volume.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_last: usize,
        /// Keep the newest point of each of the last N days that have points.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_daily: usize,
        /// Keep the newest point of each of the last N weeks that have points.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_weekly: usize,
        /// Repack packs less than PCT percent live: copy their live chunks into new packs and
        /// delete them (0: never repack; packs with no live chunk are always deleted).
        #[arg(long, value_name = "PCT", default_value_t = maint::DEFAULT_REPACK_BELOW,
              value_parser = clap::value_parser!(u32).range(0..=100))]
        repack_below: u32,
        /// Break the repository lock even if its owner may be alive (prints a warning).
        #[arg(long)]
        break_lock: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete packs no point references (left by an interrupted backup or a prune).
    Gc {
        #[arg(env = "TIDEMARK_REPO", value_name = "URL")]
        url: String,
        #[arg(long)]
        break_lock: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
enum KeyCommand {
    /// Write a new random key file (mode 0600; never over an existing file) and print its
    /// key id. Format: docs/FORMATS.md, "Repository encryption".
    Generate {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

fn parse_chunk(text: &str) -> Result<u32, String> {
    let size = ui::parse_size(text).map_err(|e| e.to_string())?;
    if !size.is_power_of_two() || !(64 << 10..=64 << 20).contains(&size) {
        return Err(format!(
            "{text}: a chunk size is a power of two from 64K to 64M"
        ));
    }
    Ok(size as u32)
}

fn parse_hash(text: &str) -> Result<ChunkHash, String> {
    ChunkHash::from_name(text).ok_or_else(|| {
        format!(
            "{text}: the hash is one of {}",
            ChunkHash::ALL.map(ChunkHash::name).join(", ")
        )
    })
}

#[derive(Debug, Serialize)]
struct ListedPoint {
    point: String,
    volume: String,
    volume_uuid: String,
    checkpoint: String,
    parent: Option<String>,
    created_unix: u64,
    size: u64,
    new_bytes: u64,
    chunks: usize,
    zero_chunks: usize,
    /// Bytes inside stored chunks that the point records as zero runs (holes to `repo
    /// export`).
    zero_bytes_in_chunks: u64,
    /// Pieces laid over the chunks (an incremental point's changed extents).
    pieces: usize,
}

#[derive(Debug, Serialize)]
struct RestoreReport {
    point: String,
    into: PathBuf,
    size: u64,
    bytes_written: u64,
    chunks_read: u64,
    seconds: f64,
    mb_per_sec: f64,
}

/// Runs of chunks `repo restore` fetches at once. Each GET costs an S3 server CPU of its own
/// (SeaweedFS on two cores is CPU-bound), and a run's GETs wait on the server, so 8 runs keep
/// both the server and the checking CPUs busy (4: 1.3x slower from SeaweedFS after 5
/// incrementals). Memory: at most 8 x (16 MiB of the run's span, its pieces' ranges, at most
/// 8 chunks' worth, and its 8 inflated chunks): with 4 MiB chunks under 8 x 80 MiB.
const RESTORE_RUNS: usize = 8;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the repository's async runtime")?;
    let options = StoreOptions {
        s3_endpoint: args.s3_endpoint,
        key: args.key,
    };
    runtime.block_on(run_async(args.command, options))
}

async fn run_async(command: RepoCommand, options: StoreOptions) -> anyhow::Result<ExitCode> {
    match command {
        RepoCommand::Init {
            url,
            chunk_size,
            encryption,
            hash,
            json,
        } => {
            if chunk_size < DEFAULT_CHUNK_SIZE {
                tracing::info!("chunk size {chunk_size}: smaller chunks mean more objects");
            }
            // `--key FILE` or $TIDEMARK_REPO_KEY at init encrypt as --encryption does.
            let key = encryption.or(options.key.clone()).or_else(|| {
                std::env::var_os(tidemark_repo::KEY_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            });
            let repo =
                Repository::init_with_key(&url, &options, chunk_size, key.as_deref(), hash).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(repo.config())?);
                return Ok(ExitCode::SUCCESS);
            }
            let sealed = match &repo.config().encryption {
                Some(enc) => format!(", encrypted with {} by key id {}", enc.cipher, enc.key_id),
                None => String::new(),
            };
            println!(
                "created the repository {url} (chunk size {}, {} ids{sealed})",
                human_bytes(u64::from(chunk_size)),
                repo.hash()
            );
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::Key {
            command: KeyCommand::Generate { file },
        } => {
            let key_id = tidemark_repo::crypto::generate_key_file(&file)?;
            println!(
                "wrote the key file {} (key id {key_id}); keep a copy apart from the repository",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::List { url, json } => {
            let repo = Repository::open(&url, &options).await?;
            let (points, broken) = repo.points().await?;
            for (object, why) in &broken {
                eprintln!("warning: {object} is unreadable: {why}");
            }
            let listed: Vec<ListedPoint> = points
                .iter()
                .map(|p| ListedPoint {
                    point: p.name(),
                    volume: p.volume.clone(),
                    volume_uuid: uuid::Uuid::from_bytes(p.volume_uuid).to_string(),
                    checkpoint: p.checkpoint.clone(),
                    parent: (!p.parent.is_empty()).then(|| p.parent.clone()),
                    created_unix: p.created_unix,
                    size: p.size,
                    new_bytes: p.new_bytes,
                    chunks: p.chunks.len(),
                    zero_chunks: p.chunks.iter().filter(|c| **c == ChunkRef::Zero).count(),
                    zero_bytes_in_chunks: p.zero_runs.iter().map(|r| u64::from(r.len)).sum(),
                    pieces: p.pieces.len(),
                })
                .collect();
            if json {
                ui::print_json(&listed)?;
            } else {
                println!(
                    "{:<40} {:>12} {:>12} {:>12}",
                    "POINT", "TIME", "SIZE", "NEW DATA"
                );
                for p in &listed {
                    println!(
                        "{:<40} {:>12} {:>12} {:>12}",
                        p.point,
                        p.created_unix,
                        human_bytes(p.size),
                        human_bytes(p.new_bytes)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::Restore { args, into, json } => {
            let (url, point) = url_and_point(&args, "restore")?;
            let report = restore(&url, &options, &point, &into).await;
            let report = match report {
                Ok(report) => report,
                Err(err) => {
                    let _ = std::fs::remove_file(&into);
                    return Err(err.context(format!(
                        "restoring {point} from {url} failed; {} was removed",
                        into.display()
                    )));
                }
            };
            if json {
                ui::print_json(&report)?;
            } else {
                println!(
                    "restored {} ({}) into {} in {:.2} s ({:.1} MB/s)",
                    report.point,
                    human_bytes(report.size),
                    report.into.display(),
                    report.seconds,
                    report.mb_per_sec
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::Export(args) => {
            let (url, point) = url_and_point(&args.args, "export")?;
            export::run(args, url, point, options).await?;
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::Verify {
            url,
            read_data,
            json,
        } => {
            let repo = Repository::open(&url, &options).await?;
            let report = maint::verify(&repo, read_data).await?;
            if json {
                ui::print_json(&report)?;
            } else {
                for problem in &report.problems {
                    println!("BROKEN {}: {}", problem.object, problem.problem);
                }
                println!(
                    "{} points, {} packs, {} chunks read: {}",
                    report.points,
                    report.packs,
                    report.chunks_checked,
                    if report.problems.is_empty() {
                        "no problems".to_string()
                    } else {
                        format!("{} problems", report.problems.len())
                    }
                );
            }
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        RepoCommand::Prune {
            url,
            keep_last,
            keep_daily,
            keep_weekly,
            repack_below,
            break_lock,
            json,
        } => {
            if keep_last + keep_daily + keep_weekly == 0 {
                anyhow::bail!(
                    "prune needs a policy: --keep-last N, --keep-daily N and/or --keep-weekly N \
                     (it never deletes every point)"
                );
            }
            let repo = Repository::open(&url, &options).await?;
            let keep = Keep {
                last: keep_last,
                daily: keep_daily,
                weekly: keep_weekly,
            };
            let report = maint::prune(&repo, keep, repack_below, break_lock).await?;
            print_prune(&report, json)?;
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::Gc {
            url,
            break_lock,
            json,
        } => {
            let repo = Repository::open(&url, &options).await?;
            let report = maint::gc(&repo, break_lock).await?;
            print_prune(&report, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `[URL] POINT` of `repo restore` and `repo export`: the URL defaults to $TIDEMARK_REPO.
/// A repository URL as the daemon (another working directory) must see it: an
/// `s3://...` URL as given, a directory made absolute.
pub(crate) fn absolute_repo_url(url: &str) -> String {
    if url.contains("://") {
        return url.to_string();
    }
    std::path::absolute(url)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| url.to_string())
}

fn url_and_point(args: &[String], command: &str) -> anyhow::Result<(String, String)> {
    match args {
        [url, point] => Ok((url.clone(), point.clone())),
        [point] => Ok((
            std::env::var("TIDEMARK_REPO").with_context(|| {
                format!("no repository: give `repo {command} URL POINT` or set $TIDEMARK_REPO")
            })?,
            point.clone(),
        )),
        _ => anyhow::bail!("repo {command} takes [URL] POINT"),
    }
}

fn print_prune(report: &PruneReport, json: bool) -> anyhow::Result<()> {
    if json {
        ui::print_json(report)?;
    } else {
        for point in &report.removed_points {
            println!("removed {point}");
        }
        for skipped in &report.repack_skipped {
            eprintln!(
                "warning: {} was kept whole: {}; run `tidemark repo verify --read-data`",
                skipped.object, skipped.problem
            );
        }
        if report.repacked_packs > 0 {
            println!(
                "repacked {} chunks of {} packs into {} new packs ({})",
                report.repacked_chunks,
                report.repacked_packs,
                report.written_packs,
                human_bytes(report.written_bytes)
            );
        }
        println!(
            "kept {} points; removed {} points and {} packs ({})",
            report.kept.len(),
            report.removed_points.len(),
            report.removed_packs,
            human_bytes(report.removed_bytes)
        );
        if report.removed_staging_files > 0 {
            println!(
                "removed {} staging files of killed writers ({})",
                report.removed_staging_files,
                human_bytes(report.removed_staging_bytes)
            );
        }
        if report.young_staging_files > 0 {
            println!(
                "left {} staging files younger than the lock lease (a writer may own them)",
                report.young_staging_files
            );
        }
    }
    Ok(())
}

async fn restore(
    url: &str,
    options: &StoreOptions,
    name: &str,
    into: &std::path::Path,
) -> anyhow::Result<RestoreReport> {
    let started = std::time::Instant::now();
    let repo = Repository::open(url, options).await?;
    let point = repo.point(name).await?;
    let (map, _, _) = repo.chunk_map().await?;
    let chunk = u64::from(point.chunk_size);
    let mut sink = ImageSink::open(into, &Mode::Full, point.size, chunk)?;
    for id in point.data_chunks() {
        if !map.contains_key(&id) {
            anyhow::bail!(
                "chunk {} of {name} is in no pack index: the repository is damaged; run \
                 `tidemark repo verify {url}`",
                id.hex()
            );
        }
    }
    // Slots that are not all zero: each is its chunk with the point's pieces laid over it.
    // Neighbouring slots in one pack are fetched with one ranged GET (a run), their pieces'
    // chunks with one GET per range of neighbours (not one per piece); RESTORE_RUNS runs are
    // in flight as tasks of their own, so the store and the CPUs that check and inflate keep
    // working while the previous run is written.
    let wanted: Vec<u64> = (0..point.chunks.len() as u64)
        .filter(|&i| !point.slot_is_zero(i))
        .collect();
    let runs = plan_runs(&point, &map, wanted.iter().copied(), RunLimits::default())?;
    let (repo, point, map) = (Arc::new(repo), Arc::new(point), Arc::new(map));
    let mut fetches = futures::stream::iter(runs)
        .map(|run| {
            let (repo, point, map) = (Arc::clone(&repo), Arc::clone(&point), Arc::clone(&map));
            tokio::spawn(async move {
                let slots = fetch_run(&repo, &point, &map, &run, &|| None).await?;
                Ok::<_, tidemark_repo::RepoError>((run.slots, slots))
            })
        })
        .buffered(RESTORE_RUNS);
    let mut written = 0u64;
    while let Some(fetched) = fetches.next().await {
        let (indexes, slots) = fetched.context("a restore task failed")??;
        for (i, data) in indexes.into_iter().zip(slots) {
            tokio::task::block_in_place(|| sink.write(i * chunk, &data))?;
            written += data.len() as u64;
        }
    }
    tokio::task::block_in_place(|| sink.finish())?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(RestoreReport {
        point: point.name(),
        into: into.to_path_buf(),
        size: point.size,
        bytes_written: written,
        chunks_read: wanted.len() as u64,
        seconds,
        mb_per_sec: ui::mb_per_sec(written, seconds),
    })
}
