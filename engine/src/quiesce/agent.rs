//! A client for the QEMU guest agent (qemu-ga) over the host end of its virtio-serial
//! channel, a Unix socket (`-chardev socket,path=SOCK,server=on,wait=off`).
//!
//! The protocol is QMP-like JSON, one object per line. The channel has no framing
//! guarantees across reconnects: the agent may still hold half a request from an earlier
//! client, and replies meant for an earlier client may still be in flight. So every
//! session starts with a sync (see [`AgentClient::connect`]): the client sends a `0xFF`
//! byte (which resets the agent's JSON parser) and `guest-sync-delimited` with a random
//! id; the agent answers `0xFF` then `{"return": id}`. Everything before the reply with
//! our latest id is stale and skipped. Until the guest opens its end, QEMU does not read
//! the socket, so the sync is resent every [`SYNC_RESEND`] until the call's time limit.
//!
//! Every call has a time limit. The client is dropped between freeze and thaw: QEMU's
//! chardev serves one connection at a time, and the watchdog must be able to connect.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How often the sync is resent while the guest has not answered.
const SYNC_RESEND: Duration = Duration::from_secs(1);
/// A reply line longer than this is not from a guest agent.
const MAX_LINE: usize = 1 << 20;

/// Errors talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("guest agent socket {socket}: cannot connect (is the VM running with a guest-agent channel on this socket?)")]
    Connect { socket: PathBuf, source: io::Error },
    #[error("guest agent on {socket}: no answer to {command} within {limit:?} (is qemu-ga running in the guest?)")]
    Timeout {
        socket: PathBuf,
        command: String,
        limit: Duration,
    },
    #[error("guest agent on {socket}: {command} failed: {class}: {desc}")]
    Command {
        socket: PathBuf,
        command: String,
        class: String,
        desc: String,
    },
    #[error("guest agent on {socket}: unexpected reply to {command}: {reply}")]
    Unexpected {
        socket: PathBuf,
        command: String,
        reply: String,
    },
    #[error("guest agent on {socket}: talking to it failed")]
    Io { socket: PathBuf, source: io::Error },
}

/// One mounted filesystem as the guest reports it (`guest-get-fsinfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFilesystem {
    pub mountpoint: String,
    #[serde(rename = "type")]
    pub fs_type: String,
    pub name: String,
}

/// A synced session with the guest agent.
#[derive(Debug)]
pub struct AgentClient {
    socket: PathBuf,
    stream: UnixStream,
    /// Bytes read but not yet consumed as a line.
    pending: Vec<u8>,
}

impl AgentClient {
    /// Connects (retrying while the socket is missing or refused) and syncs, all within
    /// `limit`.
    pub fn connect(socket: &Path, limit: Duration) -> Result<Self, AgentError> {
        let deadline = Instant::now() + limit;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(AgentError::Connect {
                        socket: socket.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let mut client = AgentClient {
            socket: socket.to_path_buf(),
            stream,
            pending: Vec::new(),
        };
        client.sync(deadline, limit)?;
        Ok(client)
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn sync(&mut self, deadline: Instant, limit: Duration) -> Result<(), AgentError> {
        let command = "guest-sync-delimited";
        loop {
            let id = u64::from(uuid::Uuid::new_v4().as_u128() as u32 & 0x7fff_ffff);
            let mut request = vec![0xFF];
            request.extend_from_slice(
                json!({"execute": command, "arguments": {"id": id}})
                    .to_string()
                    .as_bytes(),
            );
            request.push(b'\n');
            self.send(&request)?;
            let resend_at = (Instant::now() + SYNC_RESEND).min(deadline);
            while let Some(line) = self.read_line(resend_at)? {
                if serde_json::from_slice::<Value>(&line)
                    .ok()
                    .and_then(|v| v.get("return").and_then(Value::as_u64))
                    == Some(id)
                {
                    return Ok(());
                }
                // A stale reply (an earlier sync, an earlier client's command): skip it.
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(command, limit));
            }
        }
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        limit: Duration,
    ) -> Result<Value, AgentError> {
        let deadline = Instant::now() + limit;
        let mut request = match arguments {
            Some(arguments) => json!({"execute": command, "arguments": arguments}),
            None => json!({"execute": command}),
        }
        .to_string()
        .into_bytes();
        request.push(b'\n');
        self.send(&request)?;
        loop {
            let Some(line) = self.read_line(deadline)? else {
                return Err(self.timeout(command, limit));
            };
            let Ok(reply) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                let field = |name: &str| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(AgentError::Command {
                    socket: self.socket.clone(),
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
        }
    }

    /// `guest-fsfreeze-freeze` (every guest filesystem), or `guest-fsfreeze-freeze-list`
    /// when `mountpoints` is not empty. Returns how many filesystems the agent froze.
    pub fn fsfreeze_freeze(
        &mut self,
        mountpoints: &[String],
        limit: Duration,
    ) -> Result<u64, AgentError> {
        let (command, arguments) = if mountpoints.is_empty() {
            ("guest-fsfreeze-freeze", None)
        } else {
            (
                "guest-fsfreeze-freeze-list",
                Some(json!({ "mountpoints": mountpoints })),
            )
        };
        let reply = self.execute(command, arguments, limit)?;
        reply
            .as_u64()
            .ok_or_else(|| self.unexpected(command, &reply))
    }

    /// `guest-fsfreeze-thaw`: returns how many filesystems the agent thawed.
    pub fn fsfreeze_thaw(&mut self, limit: Duration) -> Result<u64, AgentError> {
        let command = "guest-fsfreeze-thaw";
        let reply = self.execute(command, None, limit)?;
        reply
            .as_u64()
            .ok_or_else(|| self.unexpected(command, &reply))
    }

    /// `guest-fsfreeze-status`: `"frozen"` or `"thawed"`.
    pub fn fsfreeze_status(&mut self, limit: Duration) -> Result<String, AgentError> {
        let command = "guest-fsfreeze-status";
        let reply = self.execute(command, None, limit)?;
        reply
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.unexpected(command, &reply))
    }

    /// `guest-get-fsinfo`: the guest's mounted filesystems.
    pub fn filesystems(&mut self, limit: Duration) -> Result<Vec<GuestFilesystem>, AgentError> {
        let command = "guest-get-fsinfo";
        let reply = self.execute(command, None, limit)?;
        serde_json::from_value(reply.clone()).map_err(|_| self.unexpected(command, &reply))
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        self.stream
            .write_all(bytes)
            .map_err(|source| AgentError::Io {
                socket: self.socket.clone(),
                source,
            })
    }

    /// The next complete line, or `None` once `deadline` passes. Everything up to a `0xFF`
    /// delimiter is dropped: it precedes the reply to a sync and ends any stale garbage.
    fn read_line(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, AgentError> {
        loop {
            if let Some(ff) = self.pending.iter().rposition(|&b| b == 0xFF) {
                self.pending.drain(..=ff);
            }
            if let Some(newline) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=newline).collect();
                line.pop();
                return Ok(Some(line));
            }
            if self.pending.len() > MAX_LINE {
                self.pending.clear();
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(wait))
                .map_err(|source| AgentError::Io {
                    socket: self.socket.clone(),
                    source,
                })?;
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(AgentError::Io {
                        socket: self.socket.clone(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the agent channel closed",
                        ),
                    })
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(source) => {
                    return Err(AgentError::Io {
                        socket: self.socket.clone(),
                        source,
                    })
                }
            }
        }
    }

    fn timeout(&self, command: &str, limit: Duration) -> AgentError {
        AgentError::Timeout {
            socket: self.socket.clone(),
            command: command.to_string(),
            limit,
        }
    }

    fn unexpected(&self, command: &str, reply: &Value) -> AgentError {
        AgentError::Unexpected {
            socket: self.socket.clone(),
            command: command.to_string(),
            reply: reply.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A scripted stand-in for qemu-ga: the real agent is exercised in the VM test
    /// (tests/tests/quiesce_vm.rs); this one injects the awkward cases.
    fn fake_agent(
        answer: impl Fn(&Value) -> Option<Vec<u8>> + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                    let text: Vec<u8> = line.iter().copied().filter(|&b| b != 0xFF).collect();
                    line.clear();
                    let Ok(request) = serde_json::from_slice::<Value>(&text) else {
                        continue;
                    };
                    if let Some(reply) = answer(&request) {
                        if writer.write_all(&reply).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        (dir, socket)
    }

    fn sync_reply(request: &Value) -> Option<Vec<u8>> {
        let id = request["arguments"]["id"].as_u64()?;
        // A stale reply meant for an earlier client and some garbage first, then the
        // delimiter byte and our answer.
        let mut reply = b"{\"return\": 17}\ngarbage".to_vec();
        reply.push(0xFF);
        reply.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
        Some(reply)
    }

    fn standard(request: &Value) -> Option<Vec<u8>> {
        let reply = match request["execute"].as_str()? {
            "guest-sync-delimited" => return sync_reply(request),
            "guest-fsfreeze-freeze" => json!({"return": 2}),
            "guest-fsfreeze-freeze-list" => {
                json!({"return": request["arguments"]["mountpoints"].as_array()?.len()})
            }
            "guest-fsfreeze-status" => json!({"return": "frozen"}),
            "guest-fsfreeze-thaw" => json!({"error": {"class": "GenericError", "desc": "nope"}}),
            _ => return None,
        };
        Some(format!("{reply}\n").into_bytes())
    }

    #[test]
    fn sync_skips_stale_replies_and_commands_work() {
        let (_dir, socket) = fake_agent(standard);
        let mut client = AgentClient::connect(&socket, Duration::from_secs(5)).unwrap();
        assert_eq!(
            client.fsfreeze_freeze(&[], Duration::from_secs(5)).unwrap(),
            2
        );
        let list = ["/a".to_string(), "/b".to_string(), "/c".to_string()];
        assert_eq!(
            client
                .fsfreeze_freeze(&list, Duration::from_secs(5))
                .unwrap(),
            3
        );
        assert_eq!(
            client.fsfreeze_status(Duration::from_secs(5)).unwrap(),
            "frozen"
        );
    }

    #[test]
    fn an_error_reply_names_the_command_and_the_agents_message() {
        let (_dir, socket) = fake_agent(standard);
        let mut client = AgentClient::connect(&socket, Duration::from_secs(5)).unwrap();
        let err = client.fsfreeze_thaw(Duration::from_secs(5)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("guest-fsfreeze-thaw") && text.contains("nope"),
            "{text}"
        );
    }

    #[test]
    fn a_silent_agent_times_out_at_the_limit() {
        let (_dir, socket) = fake_agent(|_| None);
        let start = Instant::now();
        let err = AgentClient::connect(&socket, Duration::from_millis(500)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_missing_socket_is_a_clear_error() {
        let err = AgentClient::connect(
            Path::new("/nonexistent/qga.sock"),
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/qga.sock"), "{err}");
    }
}
