//! The daemon's control protocol: QMP-style JSON lines over a Unix socket, and a blocking
//! client for it.
//!
//! The wire format, every command, its arguments, replies and events are specified in
//! `docs/CONTROL.md`. In short, one JSON object per line in each direction:
//!
//! ```text
//! S: {"tidemark": {"version": "0.1.0", "protocol": 1}}          greeting, once
//! C: {"execute": "volume-list", "id": 7}
//! S: {"return": [...], "id": 7}
//! C: {"execute": "volume-info", "arguments": {"name": "nope"}}
//! S: {"error": {"class": "NotFound", "desc": "no volume named \"nope\"..."}}
//! S: {"event": "BACKUP_COMPLETED", "data": {...}, "timestamp": {"seconds": 1, "microseconds": 2}}
//! ```
//!
//! Events may arrive between any two lines; [`Client::execute`] queues them and
//! [`Client::next_event`] hands them out. Anything sent by other commands (`tidemark pull`,
//! `tidemark demo`) reaches the daemon through this client:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let mut client = control::Client::connect("/var/lib/tidemark/control.sock".as_ref())?;
//! let backup = client.execute("backup-begin", serde_json::json!({"volumes": ["vm1"]}))?;
//! # Ok(()) }
//! ```
// Some of the client's API exists for the pull and demo commands.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Version of the control protocol announced in the greeting. Additive changes (new
/// commands, new optional arguments, new reply fields, new events) keep the number.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest line either side accepts, in bytes (a request is a few hundred bytes; this
/// bounds what a misbehaving peer can make the other side buffer).
pub const MAX_LINE: usize = 1 << 20;

/// Exit code when the daemon cannot be reached (not running, wrong `--state-dir`).
pub const EXIT_NO_DAEMON: u8 = 3;

/// The error classes a reply may carry. Scripts may match on them; the description is
/// for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// The line was not a JSON object of the request shape.
    ProtocolError,
    /// No command of that name.
    CommandNotFound,
    /// An argument is missing, of the wrong type or out of range.
    InvalidParameter,
    /// The named volume, checkpoint or backup does not exist.
    NotFound,
    /// The object exists already, or is busy (a volume with a backup running).
    Conflict,
    /// The operation was tried and failed (I/O error, full store, quiesce failure).
    GenericError,
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::ProtocolError => "ProtocolError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::InvalidParameter => "InvalidParameter",
            ErrorClass::NotFound => "NotFound",
            ErrorClass::Conflict => "Conflict",
            ErrorClass::GenericError => "GenericError",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: a class for scripts and a description that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandError {
    /// What kind of failure; see [`ErrorClass`].
    pub class: ErrorClass,
    /// What failed and what to do about it.
    pub desc: String,
}

impl CommandError {
    /// An error of `class` described by `desc`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        CommandError {
            class,
            desc: desc.into(),
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for CommandError {}

/// One request line.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command name, e.g. `backup-begin`.
    pub execute: String,
    /// The arguments object (empty when the request had none).
    pub arguments: Map<String, Value>,
    /// Any JSON value the client chose; echoed in the reply.
    pub id: Option<Value>,
}

impl Request {
    /// Parse one line. Every malformed input is an error reply, never a panic.
    pub fn parse(line: &[u8]) -> Result<Request, (CommandError, Option<Value>)> {
        let protocol = |desc: String| CommandError::new(ErrorClass::ProtocolError, desc);
        let value: Value = serde_json::from_slice(line).map_err(|err| {
            (protocol(format!("the line is not valid JSON ({err}); send one JSON object per line, e.g. {{\"execute\": \"volume-list\"}}")), None)
        })?;
        let Value::Object(mut object) = value else {
            return Err((
                protocol("a request must be a JSON object with an \"execute\" member".into()),
                None,
            ));
        };
        let id = object.remove("id");
        let execute = match object.remove("execute") {
            Some(Value::String(name)) => name,
            Some(_) => {
                return Err((
                    protocol("\"execute\" must be a string naming a command".into()),
                    id,
                ))
            }
            None => {
                return Err((
                    protocol("the request has no \"execute\" member naming a command".into()),
                    id,
                ))
            }
        };
        let arguments = match object.remove("arguments") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(arguments)) => arguments,
            Some(_) => {
                return Err((protocol("\"arguments\" must be a JSON object".into()), id));
            }
        };
        if let Some(extra) = object.keys().next() {
            return Err((
                protocol(format!(
                    "unknown member {extra:?} in the request; only execute, arguments and id are allowed"
                )),
                id,
            ));
        }
        Ok(Request {
            execute,
            arguments,
            id,
        })
    }
}

/// The greeting line the daemon sends on every new connection.
pub fn greeting() -> Value {
    json!({"tidemark": {"version": env!("CARGO_PKG_VERSION"), "protocol": PROTOCOL_VERSION}})
}

/// A success reply line.
pub fn reply_return(value: Value, id: Option<Value>) -> Value {
    let mut reply = json!({"return": value});
    if let Some(id) = id {
        reply["id"] = id;
    }
    reply
}

/// An error reply line.
pub fn reply_error(error: &CommandError, id: Option<Value>) -> Value {
    let mut reply = json!({"error": {"class": error.class.as_str(), "desc": error.desc}});
    if let Some(id) = id {
        reply["id"] = id;
    }
    reply
}

/// An asynchronous event, e.g. `BACKUP_COMPLETED`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The event name, upper case (see docs/CONTROL.md).
    pub event: String,
    /// What happened, event-specific.
    #[serde(default)]
    pub data: Value,
    /// When the daemon emitted it (QMP's shape: seconds and microseconds since the epoch).
    pub timestamp: Timestamp,
}

/// Wall-clock time of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds since the Unix epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Timestamp {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        }
    }
}

impl Event {
    /// An event stamped now.
    pub fn new(event: &str, data: Value) -> Event {
        Event {
            event: event.to_string(),
            data,
            timestamp: Timestamp::now(),
        }
    }
}

/// Why a control-socket call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The socket could not be reached: usually no daemon runs for this state dir.
    Connect { path: PathBuf, source: io::Error },
    /// Reading or writing the socket failed, or the daemon closed it.
    Io(io::Error),
    /// The daemon sent something that is not the control protocol.
    Protocol(String),
    /// The daemon ran the command and it failed.
    Command(CommandError),
    /// No reply or event within the time asked for.
    Timeout,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { path, source } => write!(
                f,
                "cannot reach the tidemark daemon at {}: {source}; start it with `tidemark serve` \
                 (same --state-dir), or point --control / --state-dir / TIDEMARK_STATE_DIR at \
                 the running one",
                path.display()
            ),
            ClientError::Io(err) => write!(f, "talking to the tidemark daemon failed: {err}"),
            ClientError::Protocol(msg) => {
                write!(f, "the tidemark daemon sent an unexpected reply: {msg}")
            }
            ClientError::Command(err) => write!(f, "{}", err.desc),
            ClientError::Timeout => f.write_str("the tidemark daemon did not answer in time"),
        }
    }
}

/// The Display text already includes the underlying error, so no `source` is chained
/// (anyhow's `{:#}` would print it twice).
impl std::error::Error for ClientError {}

/// A blocking client of the control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Value,
    events: VecDeque<Event>,
    next_id: u64,
}

impl Client {
    /// Connect to the daemon's control socket at `path` and read its greeting.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = stream.try_clone().map_err(ClientError::Io)?;
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            events: VecDeque::new(),
            next_id: 1,
        };
        client.set_timeout(Some(Duration::from_secs(30)))?;
        let greeting = client.read_line()?;
        if greeting.get("tidemark").is_none() {
            return Err(ClientError::Protocol(format!(
                "expected the greeting {{\"tidemark\": ...}}, got {greeting}; is {} a tidemark \
                 control socket?",
                path.display()
            )));
        }
        client.greeting = greeting;
        client.set_timeout(None)?;
        Ok(client)
    }

    /// The greeting the daemon sent (its version and protocol number).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Run `command` with `arguments` (a JSON object, or `null` for none) and return what
    /// the daemon returned. Events that arrive meanwhile are queued for [`Client::next_event`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({"execute": command, "id": id});
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(ClientError::Io)?;
        loop {
            let message = self.read_line()?;
            if message.get("event").is_some() {
                self.queue_event(message)?;
                continue;
            }
            if message.get("id") != Some(&json!(id)) {
                return Err(ClientError::Protocol(format!(
                    "a reply for another request arrived: {message}"
                )));
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let error: CommandError = serde_json::from_value(error.clone())
                    .map_err(|err| ClientError::Protocol(format!("{error}: {err}")))?;
                return Err(ClientError::Command(error));
            }
            return Err(ClientError::Protocol(format!(
                "neither return nor error: {message}"
            )));
        }
    }

    /// The next event, waiting up to `timeout` (forever with `None`). `Ok(None)` when the
    /// time ran out.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        if let Some(timeout) = timeout {
            if timeout.is_zero() {
                return Ok(None);
            }
            self.set_timeout(Some(timeout))?;
        }
        let message = self.read_line();
        self.set_timeout(None)?;
        let message = match message {
            Ok(message) => message,
            Err(ClientError::Timeout) => return Ok(None),
            Err(err) => return Err(err),
        };
        if message.get("event").is_none() {
            return Err(ClientError::Protocol(format!(
                "a reply nobody asked for: {message}"
            )));
        }
        self.queue_event(message)?;
        Ok(self.events.pop_front())
    }

    /// Wait up to `timeout` for an event that `matches`; other events are dropped.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut matches: impl FnMut(&Event) -> bool,
    ) -> Result<Event, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(Some(left))? {
                Some(event) if matches(&event) => return Ok(event),
                Some(_) => continue,
                None => return Err(ClientError::Timeout),
            }
        }
    }

    /// The raw socket, e.g. to poll it alongside other input.
    pub fn socket(&self) -> &UnixStream {
        &self.writer
    }

    fn queue_event(&mut self, message: Value) -> Result<(), ClientError> {
        let event: Event = serde_json::from_value(message.clone())
            .map_err(|err| ClientError::Protocol(format!("bad event {message}: {err}")))?;
        self.events.push_back(event);
        Ok(())
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.reader
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(ClientError::Io)
    }

    fn read_line(&mut self) -> Result<Value, ClientError> {
        let mut line = Vec::new();
        let read = io::Read::take(&mut self.reader, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|err| match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
                _ => ClientError::Io(err),
            })?;
        if read == 0 {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the control connection (did it stop? see its log)",
            )));
        }
        if line.len() > MAX_LINE {
            return Err(ClientError::Protocol(format!(
                "a line longer than {MAX_LINE} bytes"
            )));
        }
        serde_json::from_slice(&line)
            .map_err(|err| ClientError::Protocol(format!("not JSON ({err})")))
    }
}

/// What every client command of the daemon takes: where the daemon is, and `--json`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The daemon's state directory (volumes, checkpoints, sockets).
    ///
    /// Default: $TIDEMARK_STATE_DIR, else /var/lib/tidemark as root, else
    /// $XDG_STATE_HOME/tidemark (~/.local/state/tidemark).
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,

    /// The daemon's control socket. Default: <state-dir>/control.sock.
    #[arg(long, value_name = "PATH", global = true)]
    pub control: Option<PathBuf>,

    /// Print the report as one line of JSON on stdout (errors too, as
    /// {"error": {"class": ..., "desc": ...}}).
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientArgs {
    /// The state dir these arguments name, or the default.
    pub fn state_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.state_dir {
            Some(dir) => Ok(dir.clone()),
            None => default_state_dir(),
        }
    }

    /// The control socket path these arguments name.
    pub fn control_path(&self) -> anyhow::Result<PathBuf> {
        match &self.control {
            Some(path) => Ok(path.clone()),
            None => Ok(self.state_dir()?.join("control.sock")),
        }
    }

    /// Connect to the daemon.
    pub fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.control_path()?)?)
    }
}

/// The default state dir (DESIGN.md): `$TIDEMARK_STATE_DIR`, else `/var/lib/tidemark` as
/// root, else `$XDG_STATE_HOME/tidemark` (`~/.local/state/tidemark` when unset).
pub fn default_state_dir() -> anyhow::Result<PathBuf> {
    state_dir_from(
        std::env::var_os("TIDEMARK_STATE_DIR"),
        is_root(),
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn state_dir_from(
    explicit: Option<std::ffi::OsString>,
    root: bool,
    xdg_state_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit.filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if root {
        return Ok(PathBuf::from("/var/lib/tidemark"));
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(dir) = xdg_state_home
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
    {
        return Ok(dir.join("tidemark"));
    }
    match home.map(PathBuf::from).filter(|d| d.is_absolute()) {
        Some(home) => Ok(home.join(".local/state/tidemark")),
        None => anyhow::bail!(
            "cannot choose a state dir: neither TIDEMARK_STATE_DIR, XDG_STATE_HOME nor HOME is \
             set; pass --state-dir DIR"
        ),
    }
}

/// Whether this process runs as root (the effective uid owns `/proc/self`).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Finish a client command: on error, say what failed (on stderr, and as JSON on stdout
/// with `--json`) and exit with a code scripts can trust: 0 success, 2 failure,
/// [`EXIT_NO_DAEMON`] (3) when the daemon cannot be reached.
pub fn finish(json: bool, result: anyhow::Result<ExitCode>) -> anyhow::Result<ExitCode> {
    let err = match result {
        Ok(code) => return Ok(code),
        Err(err) => err,
    };
    if json {
        let class = match err.downcast_ref::<ClientError>() {
            Some(ClientError::Command(command)) => command.class.as_str(),
            Some(ClientError::Connect { .. }) => "DaemonUnreachable",
            _ => "GenericError",
        };
        let _ =
            crate::ui::print_json(&json!({"error": {"class": class, "desc": format!("{err:#}")}}));
    }
    eprintln!("tidemark: error: {err:#}");
    Ok(ExitCode::from(exit_code_for(&err)))
}

/// Turn a failed control call into the process exit code scripts can trust:
/// [`EXIT_NO_DAEMON`] when the daemon cannot be reached, `ui::EXIT_FAILURE` otherwise.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<ClientError>() {
        Some(ClientError::Connect { .. }) => EXIT_NO_DAEMON,
        _ => crate::ui::EXIT_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_a_full_request() {
        let request =
            Request::parse(br#"{"execute": "volume-info", "arguments": {"name": "a"}, "id": 3}"#)
                .unwrap();
        assert_eq!(request.execute, "volume-info");
        assert_eq!(request.arguments.get("name"), Some(&json!("a")));
        assert_eq!(request.id, Some(json!(3)));
    }

    #[test]
    fn parse_accepts_missing_or_null_arguments() {
        assert!(Request::parse(br#"{"execute": "volume-list"}"#)
            .unwrap()
            .arguments
            .is_empty());
        assert!(Request::parse(br#"{"execute": "x", "arguments": null}"#)
            .unwrap()
            .id
            .is_none());
    }

    #[test]
    fn parse_rejects_every_malformed_shape_with_a_protocol_error() {
        let cases: &[&[u8]] = &[
            b"",
            b"{",
            b"\xff\xfe",
            b"[1,2]",
            b"\"execute\"",
            b"{}",
            b"{\"execute\": 5}",
            b"{\"execute\": \"x\", \"arguments\": [1]}",
            b"{\"execute\": \"x\", \"bogus\": 1}",
        ];
        for case in cases {
            let (err, _) = Request::parse(case).unwrap_err();
            assert_eq!(
                err.class,
                ErrorClass::ProtocolError,
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn parse_keeps_the_id_of_a_bad_request_for_the_reply() {
        let (_, id) = Request::parse(br#"{"execute": 1, "id": "abc"}"#).unwrap_err();
        assert_eq!(id, Some(json!("abc")));
    }

    #[test]
    fn replies_echo_the_id() {
        assert_eq!(
            reply_return(json!({}), Some(json!(9))),
            json!({"return": {}, "id": 9})
        );
        let err = CommandError::new(ErrorClass::NotFound, "gone");
        assert_eq!(
            reply_error(&err, None),
            json!({"error": {"class": "NotFound", "desc": "gone"}})
        );
    }

    #[test]
    fn events_round_trip_through_json() {
        let event = Event::new("BACKUP_COMPLETED", json!({"id": "b1"}));
        let text = serde_json::to_string(&event).unwrap();
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn state_dir_follows_design_precedence() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(
            state_dir_from(os("/x"), true, os("/s"), os("/h")).unwrap(),
            PathBuf::from("/x")
        );
        assert_eq!(
            state_dir_from(None, true, os("/s"), os("/h")).unwrap(),
            PathBuf::from("/var/lib/tidemark")
        );
        assert_eq!(
            state_dir_from(None, false, os("/s"), os("/h")).unwrap(),
            PathBuf::from("/s/tidemark")
        );
        assert_eq!(
            state_dir_from(None, false, os("rel"), os("/h")).unwrap(),
            PathBuf::from("/h/.local/state/tidemark")
        );
        assert!(state_dir_from(None, false, None, None).is_err());
    }
}
