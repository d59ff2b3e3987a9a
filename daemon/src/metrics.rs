//! `serve --metrics ADDR`: the daemon's state as Prometheus metrics, in the OpenMetrics
//! text format (prometheus-client encodes it), over HTTP on 127.0.0.1:PORT (or any TCP
//! address given) or a Unix socket of mode 0600.
//!
//! Every scrape reads the state afresh; nothing is sampled in between:
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `tidemark_volume_size_bytes` | volume | the volume's size |
//! | `tidemark_volume_dirty_blocks` | volume | tracking blocks changed since the latest checkpoint (volumes with one) |
//! | `tidemark_volume_dirty_bytes` | volume | the same in bytes (blocks times granularity, at most the size) |
//! | `tidemark_volume_snapshots` | volume | snapshots held (backups running) |
//! | `tidemark_volume_cow_used_bytes` | volume | preserved data in their COW stores |
//! | `tidemark_volume_last_backup_timestamp_seconds` | volume | when its last backup ended (since this daemon started) |
//! | `tidemark_volume_last_backup_success` | volume | 1 if that backup completed, 0 if it failed |
//! | `tidemark_nbd_read_bytes_total` | export | bytes of successful NBD READs (a volume's live export has its name) |
//! | `tidemark_nbd_written_bytes_total` | export | bytes of successful NBD WRITEs |
//! | `tidemark_nbd_connections` | export | NBD connections transmitting on the export |
//! | `tidemark_attach_read_bytes_total` | volume, device, via | bytes read through a volume's block device (`volume attach`) |
//! | `tidemark_attach_written_bytes_total` | volume, device, via | bytes written through it |
//! | `tidemark_attach_errors_total` | volume, device, via | requests through it that failed |
//! | `tidemark_backup_jobs` | state | backups running now (`state="running"`) |
//! | `tidemark_backup_jobs_ended_total` | state | backups ended since start, `completed` or `failed` |
//!
//! NBD byte counts cover the NBD sockets (Unix and TCP); I/O through a block device made
//! by `volume attach` (kernel NBD or FUSE) is counted once, under `attach_*`, with the
//! counters `volume info` shows; they start at zero with each attachment. Last backups come from the daemon's
//! BACKUP_COMPLETED and BACKUP_FAILED events, so they start empty with each daemon.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tidemark_engine::status::VolumeStatus;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, watch, Semaphore};

use crate::attach::Attachment;
use crate::daemon::Daemon;
use crate::protocol::Event;

/// Where `--metrics` listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// HOST:PORT.
    Tcp(SocketAddr),
    /// A Unix socket path (mode 0600).
    Unix(PathBuf),
}

impl FromStr for MetricsAddr {
    type Err = String;

    /// A path (it holds a `/`) is a Unix socket; anything else must be HOST:PORT.
    fn from_str(text: &str) -> Result<Self, String> {
        if text.contains('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(text)));
        }
        text.parse().map(MetricsAddr::Tcp).map_err(|_| {
            format!(
                "{text:?} is neither HOST:PORT (e.g. 127.0.0.1:9470) nor a Unix socket path \
                 (e.g. /run/tidemark/metrics.sock)"
            )
        })
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Tcp(addr) => write!(f, "http://{addr}/metrics"),
            MetricsAddr::Unix(path) => write!(f, "{} (HTTP, /metrics)", path.display()),
        }
    }
}

/// How the last backup of a volume ended.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LastBackup {
    /// Seconds since the Unix epoch.
    ended: f64,
    completed: bool,
}

/// What the metrics learn from events: ended backups.
#[derive(Debug, Default)]
struct History {
    last: BTreeMap<String, LastBackup>,
    ended: BTreeMap<&'static str, u64>,
}

impl History {
    fn record(&mut self, event: &Event) {
        let completed = match event.event.as_str() {
            "BACKUP_COMPLETED" => true,
            "BACKUP_FAILED" => false,
            _ => return,
        };
        *self
            .ended
            .entry(if completed { "completed" } else { "failed" })
            .or_default() += 1;
        let ended = event.timestamp.seconds as f64 + f64::from(event.timestamp.microseconds) / 1e6;
        let volumes = event.data["volumes"].as_array().into_iter().flatten();
        for volume in volumes.filter_map(|v| v["volume"].as_str()) {
            self.last
                .insert(volume.to_string(), LastBackup { ended, completed });
        }
    }
}

type Labels = Vec<(String, String)>;

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

/// The state of the daemon as it is now.
struct Snapshot {
    volumes: Vec<VolumeStatus>,
    exports: Vec<tidemark_nbd::server::ExportStats>,
    attachments: Vec<Attachment>,
    running: usize,
}

impl Snapshot {
    fn take(daemon: &Daemon) -> Snapshot {
        let (handles, running) = {
            let registry = daemon.registry();
            let handles: Vec<_> = registry.volumes.values().cloned().collect();
            (handles, registry.backups.len())
        };
        let volumes = handles.iter().map(|handle| handle.status()).collect();
        Snapshot {
            volumes,
            exports: daemon.nbd.export_stats(),
            attachments: daemon.attachments.records(),
            running,
        }
    }
}

/// Encode `snapshot` and `history` in the OpenMetrics text format.
fn render(snapshot: &Snapshot, history: &History) -> String {
    let mut registry = Registry::with_prefix("tidemark");
    let gauge = |registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>| {
        let family = Family::<Labels, Gauge>::default();
        match unit {
            Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
            None => registry.register(name, help, family.clone()),
        }
        family
    };
    let size = gauge(
        &mut registry,
        "volume_size",
        "The volume's size",
        Some(Unit::Bytes),
    );
    let dirty_blocks = gauge(
        &mut registry,
        "volume_dirty_blocks",
        "Tracking blocks changed since the volume's latest checkpoint",
        None,
    );
    let dirty_bytes = gauge(
        &mut registry,
        "volume_dirty",
        "Bytes in tracking blocks changed since the volume's latest checkpoint",
        Some(Unit::Bytes),
    );
    let snapshots = gauge(
        &mut registry,
        "volume_snapshots",
        "Snapshots of the volume held now",
        None,
    );
    let cow_used = gauge(
        &mut registry,
        "volume_cow_used",
        "Preserved data in the COW stores of the volume's snapshots",
        Some(Unit::Bytes),
    );
    for volume in &snapshot.volumes {
        let labels = label("volume", &volume.name);
        size.get_or_create(&labels).set(saturating_i64(volume.size));
        if let Some(latest) = volume.checkpoints.last() {
            dirty_blocks
                .get_or_create(&labels)
                .set(saturating_i64(latest.changed_blocks));
            let bytes = latest
                .changed_blocks
                .saturating_mul(u64::from(volume.granularity))
                .min(volume.size);
            dirty_bytes
                .get_or_create(&labels)
                .set(saturating_i64(bytes));
        }
        snapshots
            .get_or_create(&labels)
            .set(saturating_i64(volume.snapshots.len() as u64));
        let used = volume.snapshots.iter().map(|s| s.cow_bytes_used).sum();
        cow_used.get_or_create(&labels).set(saturating_i64(used));
    }

    let last_time = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    registry.register_with_unit(
        "volume_last_backup_timestamp",
        "When the volume's last backup ended, since the Unix epoch",
        Unit::Seconds,
        last_time.clone(),
    );
    let last_success = gauge(
        &mut registry,
        "volume_last_backup_success",
        "1 if the volume's last backup completed, 0 if it failed",
        None,
    );
    for (volume, last) in &history.last {
        let labels = label("volume", volume);
        last_time.get_or_create(&labels).set(last.ended);
        last_success
            .get_or_create(&labels)
            .set(i64::from(last.completed));
    }

    let counter = |registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>| {
        let family = Family::<Labels, Counter>::default();
        match unit {
            Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
            None => registry.register(name, help, family.clone()),
        }
        family
    };
    let read = counter(
        &mut registry,
        "nbd_read",
        "Bytes of successful NBD READs on the export",
        Some(Unit::Bytes),
    );
    let written = counter(
        &mut registry,
        "nbd_written",
        "Bytes of successful NBD WRITEs on the export",
        Some(Unit::Bytes),
    );
    let connections = gauge(
        &mut registry,
        "nbd_connections",
        "NBD connections transmitting on the export",
        None,
    );
    for export in &snapshot.exports {
        let labels = label("export", &export.name);
        read.get_or_create(&labels).inc_by(export.bytes_read);
        written.get_or_create(&labels).inc_by(export.bytes_written);
        connections
            .get_or_create(&labels)
            .set(saturating_i64(export.connections as u64));
    }

    let attach_read = counter(
        &mut registry,
        "attach_read",
        "Bytes read through the volume's block device",
        Some(Unit::Bytes),
    );
    let attach_written = counter(
        &mut registry,
        "attach_written",
        "Bytes written through the volume's block device",
        Some(Unit::Bytes),
    );
    let attach_errors = counter(
        &mut registry,
        "attach_errors",
        "Requests through the volume's block device that failed",
        None,
    );
    for attachment in &snapshot.attachments {
        let labels = vec![
            ("volume".to_string(), attachment.volume.clone()),
            (
                "device".to_string(),
                attachment.device.display().to_string(),
            ),
            ("via".to_string(), attachment.via().to_string()),
        ];
        let io = &attachment.io;
        attach_read.get_or_create(&labels).inc_by(io.read_bytes);
        attach_written.get_or_create(&labels).inc_by(io.write_bytes);
        attach_errors.get_or_create(&labels).inc_by(io.errors);
    }

    let jobs = gauge(&mut registry, "backup_jobs", "Backup jobs by state", None);
    jobs.get_or_create(&label("state", "running"))
        .set(saturating_i64(snapshot.running as u64));
    let ended = counter(
        &mut registry,
        "backup_jobs_ended",
        "Backup jobs ended since the daemon started, by how they ended",
        None,
    );
    for state in ["completed", "failed"] {
        let count = history.ended.get(state).copied().unwrap_or(0);
        ended.get_or_create(&label("state", state)).inc_by(count);
    }

    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Scrapes served at once; more wait for a turn.
const SCRAPES_AT_ONCE: usize = 8;

/// A scraper must send its request within this time.
const REQUEST_TIME: Duration = Duration::from_secs(5);

/// The longest request head read.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// The metrics endpoint's listener.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

/// The running endpoint.
pub(crate) struct MetricsTask {
    task: tokio::task::JoinHandle<()>,
    events: tokio::task::JoinHandle<()>,
}

impl MetricsTask {
    /// Wait for the endpoint to stop (after the stop signal) and remove its socket file.
    pub(crate) async fn stopped(self) {
        let _ = self.task.await;
        self.events.abort();
    }
}

/// Bind `addr` and serve metrics until `stop` turns true.
pub(crate) async fn serve(
    daemon: Arc<Daemon>,
    addr: &MetricsAddr,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<MetricsTask> {
    let listener = match addr {
        MetricsAddr::Tcp(addr) => Listener::Tcp(tokio::net::TcpListener::bind(addr).await?),
        MetricsAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            let listener = tidemark_nbd::server::bind_private(path)?;
            listener.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(listener)?, path.clone())
        }
    };
    let history = Arc::new(Mutex::new(History::default()));
    let events = tokio::spawn(record_events(daemon.subscribe(), history.clone()));
    let task = tokio::spawn(async move {
        let turns = Arc::new(Semaphore::new(SCRAPES_AT_ONCE));
        loop {
            let served = match &listener {
                Listener::Tcp(l) => tokio::select! {
                    _ = stop.changed() => break,
                    r = l.accept() => r.map(|(s, _)| spawn_scrape(s, &daemon, &history, &turns)),
                },
                Listener::Unix(l, _) => tokio::select! {
                    _ = stop.changed() => break,
                    r = l.accept() => r.map(|(s, _)| spawn_scrape(s, &daemon, &history, &turns)),
                },
            };
            if let Err(err) = served {
                tracing::warn!("accepting a metrics scrape failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let Listener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
    });
    Ok(MetricsTask { task, events })
}

async fn record_events(mut events: broadcast::Receiver<Event>, history: Arc<Mutex<History>>) {
    loop {
        match events.recv().await {
            Ok(event) => history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(&event),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!("metrics missed {missed} daemon events; last backups may be stale")
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn spawn_scrape<S>(
    stream: S,
    daemon: &Arc<Daemon>,
    history: &Arc<Mutex<History>>,
    turns: &Arc<Semaphore>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let daemon = Arc::clone(daemon);
    let history = Arc::clone(history);
    let turns = Arc::clone(turns);
    tokio::spawn(async move {
        let Ok(_turn) = turns.acquire().await else {
            return;
        };
        if let Err(err) = scrape(stream, daemon, history).await {
            tracing::debug!("metrics scrape: {err}");
        }
    });
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics { head_only: bool },
    NotFound,
    BadMethod,
    Malformed,
}

fn parse_request(head: &[u8]) -> Request {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Request::Malformed;
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Request::Malformed;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Malformed;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => Request::Metrics {
            head_only: method == "HEAD",
        },
        ("GET" | "HEAD", _) => Request::NotFound,
        _ => Request::BadMethod,
    }
}

/// Read the request head (to the blank line), bounded in size and time.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.ends_with(b"\n\n") {
            if head.len() > MAX_REQUEST_HEAD {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "request head too long",
                ));
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    match tokio::time::timeout(REQUEST_TIME, read).await {
        Ok(result) => result.map(|()| head),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no request within 5 s",
        )),
    }
}

async fn scrape<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    daemon: Arc<Daemon>,
    history: Arc<Mutex<History>>,
) -> std::io::Result<()> {
    let head = read_head(&mut stream).await?;
    let (status, content_type, body, head_only) = match parse_request(&head) {
        Request::Metrics { head_only } => {
            // Volume status takes the volumes' locks: off the async threads.
            let body = tokio::task::spawn_blocking(move || {
                let snapshot = Snapshot::take(&daemon);
                let history = history.lock().unwrap_or_else(PoisonError::into_inner);
                render(&snapshot, &history)
            })
            .await
            .map_err(std::io::Error::other)?;
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
                head_only,
            )
        }
        Request::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "tidemark serves its metrics at /metrics\n".to_string(),
            false,
        ),
        Request::BadMethod => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD are served\n".to_string(),
            false,
        ),
        Request::Malformed => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "not an HTTP/1 request\n".to_string(),
            false,
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Timestamp;
    use serde_json::json;

    #[test]
    fn addresses_are_paths_or_host_ports() {
        assert_eq!(
            "127.0.0.1:9470".parse(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9470".parse().unwrap()))
        );
        assert_eq!(
            "/run/m.sock".parse(),
            Ok(MetricsAddr::Unix("/run/m.sock".into()))
        );
        assert!("localhost".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics { head_only: false }
        );
        assert_eq!(
            parse_request(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics { head_only: true }
        );
        assert_eq!(
            parse_request(b"GET /other HTTP/1.1\r\n\r\n"),
            Request::NotFound
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::BadMethod
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"\xff\xfe",
            b"GET / SPDY/3\r\n\r\n",
        ] {
            assert_eq!(parse_request(bad), Request::Malformed);
        }
    }

    #[test]
    fn ended_backups_set_each_volumes_last_backup() {
        let mut history = History::default();
        let event = |name: &str, seconds, volumes: &[&str]| Event {
            event: name.to_string(),
            data: json!({"volumes": volumes.iter().map(|v| json!({"volume": v})).collect::<Vec<_>>()}),
            timestamp: Timestamp {
                seconds,
                microseconds: 500_000,
            },
        };
        history.record(&event("BACKUP_COMPLETED", 100, &["a", "b"]));
        history.record(&event("BACKUP_FAILED", 200, &["b"]));
        history.record(&event("ATTACHMENT_LOST", 300, &["a"]));
        assert_eq!(
            history.last["a"],
            LastBackup {
                ended: 100.5,
                completed: true
            }
        );
        assert_eq!(
            history.last["b"],
            LastBackup {
                ended: 200.5,
                completed: false
            }
        );
        assert_eq!(history.ended["completed"], 1);
        assert_eq!(history.ended["failed"], 1);
        let text = render(
            &Snapshot {
                volumes: Vec::new(),
                exports: Vec::new(),
                attachments: Vec::new(),
                running: 2,
            },
            &history,
        );
        assert!(text.contains("tidemark_volume_last_backup_success{volume=\"b\"} 0\n"));
        assert!(text.contains("tidemark_backup_jobs{state=\"running\"} 2\n"));
        assert!(text.contains("tidemark_backup_jobs_ended_total{state=\"failed\"} 1\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn attachments_count_their_io_under_their_device() {
        use crate::attach::{IoStats, Resources};
        let attachment = Attachment {
            volume: "data".into(),
            device: "/dev/loop3".into(),
            read_only: false,
            since: 1_700_000_000,
            pid: 1,
            resources: Resources::Fuse {
                mount: "/run/tidemark/attach/data".into(),
            },
            io: IoStats {
                read_bytes: 4096,
                write_bytes: 1 << 20,
                errors: 2,
                ..IoStats::default()
            },
        };
        let text = render(
            &Snapshot {
                volumes: Vec::new(),
                exports: Vec::new(),
                attachments: vec![attachment],
                running: 0,
            },
            &History::default(),
        );
        let labels = "{volume=\"data\",device=\"/dev/loop3\",via=\"fuse\"}";
        for line in [
            format!("tidemark_attach_read_bytes_total{labels} 4096\n"),
            format!("tidemark_attach_written_bytes_total{labels} 1048576\n"),
            format!("tidemark_attach_errors_total{labels} 2\n"),
        ] {
            assert!(text.contains(&line), "{line:?} missing from\n{text}");
        }
    }
}
