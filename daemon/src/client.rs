//! A blocking client of the control socket, for the CLI and for scripts in Rust.
//!
//! ```no_run
//! use tidemark_daemon::client::Client;
//! use tidemark_daemon::protocol::{BackupBeginArgs, Command};
//! # fn main() -> Result<(), tidemark_daemon::client::ClientError> {
//! let mut client = Client::connect("/var/lib/tidemark/control.sock".as_ref())?;
//! let backup = client.execute(&Command::BackupBegin(BackupBeginArgs {
//!     volumes: vec!["vm1".into()],
//!     ..BackupBeginArgs::default()
//! }))?;
//! # Ok(()) }
//! ```
//!
//! Events may arrive between any two lines; [`Client::execute`] queues them and
//! [`Client::next_event`] hands them out.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::protocol::{Command, CommandError, Event, MAX_REPLY_LINE};

/// Why a control-socket call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached: usually no daemon runs for this state dir.
    #[error(
        "cannot reach the tidemark daemon at {}; start it with `tidemark serve` (same \
         --state-dir), or point --control / --state-dir / TIDEMARK_STATE_DIR at the running one",
        path.display()
    )]
    Connect {
        /// The control socket.
        path: PathBuf,
        /// Why connecting failed.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed, or the daemon closed it.
    #[error("talking to the tidemark daemon failed")]
    Io(#[source] io::Error),
    /// The command cannot be written as JSON (a path that is not UTF-8).
    #[error("the request cannot be sent as JSON")]
    Request(#[source] serde_json::Error),
    /// The daemon sent something that is not the control protocol.
    #[error("the tidemark daemon sent an unexpected reply: {0}")]
    Protocol(String),
    /// The daemon ran the command and it failed.
    #[error(transparent)]
    Command(CommandError),
    /// No reply or event within the time asked for.
    #[error("the tidemark daemon did not answer in time")]
    Timeout,
}

/// A blocking client of the control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
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
        client.set_timeout(None)?;
        Ok(client)
    }

    /// Run `command` and return what the daemon returned. Events that arrive meanwhile
    /// are queued for [`Client::next_event`].
    pub fn execute(&mut self, command: &Command) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = command
            .to_request(Some(json!(id)))
            .map_err(ClientError::Request)?;
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(ClientError::Io)?;
        loop {
            let mut message = self.read_line()?;
            if message.get("event").is_some() {
                self.queue_event(message)?;
                continue;
            }
            if message.get("id") != Some(&json!(id)) {
                return Err(ClientError::Protocol(format!(
                    "a reply for another request arrived: {message}"
                )));
            }
            // Taken, not cloned: a status reply of 10,000 volumes is megabytes.
            if let Some(value) = message.as_object_mut().and_then(|m| m.remove("return")) {
                return Ok(value);
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
        let read = io::Read::take(&mut self.reader, MAX_REPLY_LINE as u64 + 1)
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
        if line.len() > MAX_REPLY_LINE {
            return Err(ClientError::Protocol(format!(
                "a line longer than {MAX_REPLY_LINE} bytes"
            )));
        }
        serde_json::from_slice(&line)
            .map_err(|err| ClientError::Protocol(format!("not JSON ({err})")))
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::protocol::NoArguments;

    /// A reply that grows with the number of volumes (here 3 MiB, what `info` says of
    /// about 5,000 volumes) reaches the caller whole.
    #[test]
    fn a_reply_of_several_megabytes_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let names: Vec<String> = (0..100_000).map(|i| format!("volume-{i:024}")).collect();
        let served = names.clone();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            writer
                .write_all(b"{\"tidemark\": {\"version\": \"test\", \"protocol\": 1}}\n")
                .unwrap();
            let mut request = String::new();
            BufReader::new(stream).read_line(&mut request).unwrap();
            let id = serde_json::from_str::<Value>(&request).unwrap()["id"].clone();
            let mut reply = json!({"return": served, "id": id}).to_string();
            assert!(reply.len() > 3 << 20);
            reply.push('\n');
            writer.write_all(reply.as_bytes()).unwrap();
        });
        let mut client = Client::connect(&path).unwrap();
        let value = client
            .execute(&Command::VolumeList(NoArguments {}))
            .unwrap();
        assert_eq!(value, json!(names));
        server.join().unwrap();
    }
}
