//! The control socket's server side: accept connections, read one request per line,
//! run it, write its reply, and forward events to every connection meanwhile.
//!
//! Each connection is handled in order (a reply is sent before the next request is read,
//! as QMP does), and nothing a client sends can take the daemon down: a malformed line
//! gets a `ProtocolError` reply, an over-long line is discarded up to its newline and
//! answered the same way.
//!
//! Commands touch disks, so each runs on a thread of its own (`control-N`), never on
//! tokio's blocking pool: however many NBD connections or other blocking work the daemon
//! has, a control command starts at once. A thread that cannot be started fails the
//! command with an error.
//!
//! What a client is sent is bounded: replies and events go through a queue of
//! [`OUTGOING`] messages to the connection's writer. A client that does not read fills
//! its socket and then that queue; from then on its events wait in the daemon's shared
//! event ring (1024 events, the same memory for every client) and the oldest are dropped
//! for that client. When it reads again it is sent one `EVENTS_LOST` event with the
//! `count` it missed before the events that follow. Its own replies are never dropped:
//! the next request is not read until the reply is queued.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch};

use crate::protocol::{
    self, Command, CommandError, ErrorClass, Event, Request, Returned, MAX_REQUEST_LINE,
};

/// Identifies one control connection (leases are tied to it).
pub type ConnectionId = u64;

/// What the server needs from the daemon: run a command, and learn that a connection
/// went away.
pub trait Handler: Send + Sync + 'static {
    /// Run one command from connection `conn`. Called on a blocking thread.
    fn execute(&self, conn: ConnectionId, command: Command) -> Result<Returned, CommandError>;
    /// Connection `conn` closed (its client exited or crashed).
    fn disconnected(&self, conn: ConnectionId);
}

/// Messages queued for one connection's writer (replies and events) before the
/// producers wait (see the module doc).
pub const OUTGOING: usize = 64;

/// Run `execute` on a thread of its own (see the module doc).
async fn run_command<F, T>(name: String, execute: F) -> Result<T, CommandError>
where
    F: FnOnce() -> Result<T, CommandError> + Send + 'static,
    T: Send + 'static,
{
    static NEXT_COMMAND: AtomicU64 = AtomicU64::new(1);
    let (done, result) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!(
            "control-{}",
            NEXT_COMMAND.fetch_add(1, Ordering::Relaxed)
        ))
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(execute));
            let _ = done.send(outcome);
        });
    if let Err(err) = spawned {
        return Err(CommandError::new(
            ErrorClass::GenericError,
            format!(
                "cannot start a thread to run {name}: {err}; the host is out of threads or \
                 memory, retry when load is lower"
            ),
        ));
    }
    match result.await {
        Ok(Ok(outcome)) => outcome,
        _ => {
            tracing::error!(command = %name, "command panicked");
            Err(CommandError::new(
                ErrorClass::GenericError,
                format!("internal error running {name}; the daemon logged it, please report it"),
            ))
        }
    }
}

/// Accept connections on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    events: broadcast::Sender<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let conn = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn, "control connection opened");
                    let handler = Arc::clone(&handler);
                    let events = events.subscribe();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(err) =
                            connection(stream, conn, Arc::clone(&handler), events, shutdown).await
                        {
                            tracing::debug!(conn, "control connection ended: {err}");
                        }
                        handler.disconnected(conn);
                    });
                }
                Err(err) => {
                    // EMFILE and friends: keep serving the connections we have.
                    tracing::warn!("accepting a control connection failed: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

/// One line read from a client.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A complete line (without its newline).
    Complete(Vec<u8>),
    /// A line longer than the limit; its bytes were discarded up to the newline.
    TooLong,
    /// The client closed the connection.
    Eof,
}

/// Read one line of at most `limit` bytes, discarding (not buffering) longer ones.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, limit: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            // A last line without a newline still counts; an empty tail is the end.
            return Ok(if too_long {
                Line::TooLong
            } else if line.is_empty() {
                Line::Eof
            } else {
                Line::Complete(line)
            });
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (&available[..at], Some(at + 1)),
            None => (available, None),
        };
        if !too_long {
            if line.len() + chunk.len() > limit {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = found.unwrap_or(available.len());
        reader.consume(used);
        if found.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete(line)
            });
        }
    }
}

async fn connection(
    stream: UnixStream,
    conn: ConnectionId,
    handler: Arc<dyn Handler>,
    mut events: broadcast::Receiver<Event>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let (read_half, mut write_half) = stream.into_split();
    // Lines of JSON text, serialized where they are produced (a large reply on the
    // command's own thread).
    let (out_tx, mut out_rx) = mpsc::channel::<String>(OUTGOING);

    // The writer: replies and events in the order they were produced.
    let writer = tokio::spawn(async move {
        while let Some(mut line) = out_rx.recv().await {
            line.push('\n');
            if write_half.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });

    let _ = out_tx.send(protocol::greeting().to_string()).await;
    let events_tx = out_tx.clone();
    let forwarder = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => {
                    let Ok(value) = serde_json::to_string(&event) else {
                        continue;
                    };
                    // Waits while the client does not read: its events then pile up in
                    // the shared ring, and it lags.
                    if events_tx.send(value).await.is_err() {
                        break;
                    }
                }
                // A client too slow to read its events loses the oldest ones; say so.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        conn,
                        "a control client does not read: {missed} events dropped"
                    );
                    let warning = Event::new("EVENTS_LOST", serde_json::json!({"count": missed}));
                    if let Ok(value) = serde_json::to_string(&warning) {
                        if events_tx.send(value).await.is_err() {
                            break;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });

    let mut reader = BufReader::new(read_half);
    let result = loop {
        let line = tokio::select! {
            line = read_line(&mut reader, MAX_REQUEST_LINE) => line,
            _ = shutdown.changed() => break Ok(()),
        };
        let reply = match line {
            Err(err) => break Err(err),
            Ok(Line::Eof) => break Ok(()),
            Ok(Line::TooLong) => protocol::reply_error(
                &CommandError::new(
                    ErrorClass::ProtocolError,
                    format!(
                        "the request line is longer than {MAX_REQUEST_LINE} bytes; it was ignored"
                    ),
                ),
                None,
            )
            .to_string(),
            Ok(Line::Complete(bytes)) if bytes.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Line::Complete(bytes)) => match Request::parse(&bytes) {
                Err((err, id)) => protocol::reply_error(&err, id).to_string(),
                Ok(request) => {
                    let id = request.id.clone();
                    let error_id = id.clone();
                    let name = request.execute.clone();
                    let handler = Arc::clone(&handler);
                    // The reply line is serialized on the command's thread too.
                    let result = run_command(name.clone(), move || {
                        let returned = handler.execute(conn, Command::from_request(&request)?)?;
                        Ok(protocol::reply_return_line(returned, id))
                    })
                    .await;
                    match result {
                        Ok(line) => line,
                        Err(err) => {
                            tracing::info!(conn, command = %name, "command failed: {}", err.desc);
                            protocol::reply_error(&err, error_id).to_string()
                        }
                    }
                }
            },
        };
        tokio::select! {
            sent = out_tx.send(reply) => if sent.is_err() { break Ok(()) },
            _ = shutdown.changed() => break Ok(()),
        }
    };
    forwarder.abort();
    drop(out_tx);
    let _ = writer.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::sync::Mutex;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn read_line_splits_discards_and_ends() {
        let input: &[u8] = b"abc\n0123456789\nxy\nlast";
        let mut reader = BufReader::with_capacity(4, input);
        assert_eq!(
            read_line(&mut reader, 5).await.unwrap(),
            Line::Complete(b"abc".to_vec())
        );
        assert_eq!(read_line(&mut reader, 5).await.unwrap(), Line::TooLong);
        assert_eq!(
            read_line(&mut reader, 5).await.unwrap(),
            Line::Complete(b"xy".to_vec())
        );
        assert_eq!(
            read_line(&mut reader, 5).await.unwrap(),
            Line::Complete(b"last".to_vec())
        );
        assert_eq!(read_line(&mut reader, 5).await.unwrap(), Line::Eof);
    }

    /// Echoes the volume of `volume-info`, panics on `query-status`, refuses the rest.
    #[derive(Default)]
    struct Echo {
        gone: Mutex<Vec<ConnectionId>>,
    }

    impl Handler for Echo {
        fn execute(&self, _conn: ConnectionId, command: Command) -> Result<Returned, CommandError> {
            match command {
                Command::VolumeInfo(args) => Ok(json!({"name": args.name}).into()),
                Command::VolumeList(_) => Ok(Returned::Json(r#"[{"name":"a"}]"#.into())),
                Command::QueryStatus(_) => panic!("a handler bug"),
                _ => Err(CommandError::new(ErrorClass::GenericError, "not here")),
            }
        }
        fn disconnected(&self, conn: ConnectionId) {
            self.gone.lock().unwrap().push(conn);
        }
    }

    async fn start() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Arc<Echo>,
        watch::Sender<bool>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let echo = Arc::new(Echo::default());
        let (events, _) = broadcast::channel(16);
        let (stop, stopped) = watch::channel(false);
        let handler: Arc<dyn Handler> = echo.clone();
        tokio::spawn(serve(listener, handler, events, stopped));
        (dir, path, echo, stop)
    }

    async fn exchange(path: &std::path::Path, input: &[u8]) -> Vec<Value> {
        let mut stream = UnixStream::connect(path).await.unwrap();
        stream.write_all(input).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_lines_get_protocol_errors_and_the_connection_survives() {
        let (_dir, path, echo, _stop) = start().await;
        let mut input = Vec::new();
        input.extend_from_slice(b"not json\n");
        input.extend_from_slice(b"\xff\xff\xff\n");
        input.extend_from_slice(b"[]\n\n   \n");
        input.extend_from_slice(&vec![b'x'; MAX_REQUEST_LINE + 10]);
        input.extend_from_slice(b"\n{\"execute\": \"query-status\", \"id\": 1}\n");
        input.extend_from_slice(
            b"{\"execute\": \"volume-info\", \"arguments\": {\"name\": \"a\"}, \"id\": 2}\n",
        );
        input.extend_from_slice(b"{\"execute\": \"volume-list\", \"id\": [3]}\n");
        input.extend_from_slice(b"{\"execute\": \"volume-list\"}\n");
        let replies = exchange(&path, &input).await;
        assert_eq!(
            replies[0]["tidemark"]["protocol"],
            json!(protocol::PROTOCOL_VERSION)
        );
        for reply in &replies[1..5] {
            assert_eq!(reply["error"]["class"], json!("ProtocolError"), "{reply}");
        }
        assert_eq!(replies[5]["error"]["class"], json!("GenericError"));
        assert_eq!(replies[5]["id"], json!(1));
        assert_eq!(replies[6], json!({"return": {"name": "a"}, "id": 2}));
        // Text serialized by the handler is carried as it is, with or without an id.
        assert_eq!(replies[7], json!({"return": [{"name": "a"}], "id": [3]}));
        assert_eq!(replies[8], json!({"return": [{"name": "a"}]}));
        assert_eq!(replies.len(), 9);
        // The server noticed the close (after its task finished).
        for _ in 0..100 {
            if !echo.gone.lock().unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the handler never heard that the connection closed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_commands_and_arguments_are_errors_with_the_request_id() {
        let (_dir, path, _echo, _stop) = start().await;
        let replies = exchange(
            &path,
            b"{\"execute\": \"nope\", \"id\": \"x\"}\n\
              {\"execute\": \"volume-info\", \"arguments\": {\"nmae\": \"a\"}, \"id\": 3}\n",
        )
        .await;
        assert_eq!(replies[1]["error"]["class"], json!("CommandNotFound"));
        assert_eq!(replies[1]["id"], json!("x"));
        assert_eq!(replies[2]["error"]["class"], json!("InvalidParameter"));
        assert_eq!(replies[2]["id"], json!(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_reads_costs_bounded_memory_and_hears_events_lost() {
        const EVENTS: usize = 20_000;
        const PAYLOAD: usize = 8 << 10;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handler: Arc<dyn Handler> = Arc::new(Echo::default());
        // The daemon's ring size.
        let (events, _) = broadcast::channel(1024);
        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, handler, events.clone(), stopped));

        let stream = UnixStream::connect(&path).await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).await.unwrap();
        // Wait until the server subscribed this connection to the events.
        while events.receiver_count() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // 160 MiB of events while the client reads nothing; paced, so a forwarder that
        // queues without bound keeps up and never lags.
        let blob = "x".repeat(PAYLOAD);
        for n in 0..EVENTS {
            let _ = events.send(Event::new("E", json!({"n": n, "blob": blob})));
            if n % 256 == 255 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        let _ = events.send(Event::new("MARK", json!({})));
        // Now it reads: the events it missed are counted, the rest arrive.
        let (mut delivered, mut lost) = (0, 0);
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                reader.read_line(&mut line),
            )
            .await
            .expect("the events arrive")
            .unwrap();
            assert!(read > 0, "the server closed the connection");
            let event: Value = serde_json::from_str(&line).unwrap();
            match event["event"].as_str().unwrap() {
                "E" => delivered += 1,
                "EVENTS_LOST" => lost += event["data"]["count"].as_u64().unwrap(),
                "MARK" => break,
                other => panic!("unexpected event {other}"),
            }
        }
        assert!(
            lost > 0,
            "EVENTS_LOST never came though {EVENTS} events were queued"
        );
        assert_eq!(delivered + lost, EVENTS as u64);
        // What was held for it (delivered) fits the ring, the queue and the socket's
        // buffer: memory for a client that does not read is bounded, whatever it misses.
        assert!(
            delivered < 1024 + OUTGOING as u64 + 512,
            "{delivered} delivered"
        );
    }
}
