//! The control protocol: QMP-style JSON lines over a Unix socket (docs/CONTROL.md).
//!
//! One JSON object per line in each direction:
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
//! A request line is read in two steps, so each failure gets its class: [`Request::parse`]
//! checks the envelope (`ProtocolError`), then [`Command::from_request`] names a command
//! (`CommandNotFound`) and type-checks its arguments (`InvalidParameter`, naming the
//! argument). [`Command`] is the one list of commands: the server dispatches on it and the
//! client builds it.

use std::fmt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};

/// Version of the control protocol announced in the greeting. Additive changes (new
/// commands, new optional arguments, new reply fields, new events) keep the number.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the daemon accepts, in bytes (a request is a few hundred bytes;
/// this bounds what a misbehaving local client can make the daemon buffer).
pub const MAX_REQUEST_LINE: usize = 1 << 20;

/// Longest reply or event line a client accepts, in bytes. Replies grow with the number of
/// volumes (`info` and `volume-list` describe each, well under 1 KiB apiece), so this is a
/// bound on the client's memory, not on the host's volume count: far above what 100,000
/// volumes need.
pub const MAX_REPLY_LINE: usize = 256 << 20;

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{desc}")]
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

    /// An `InvalidParameter` error.
    pub fn invalid(desc: impl Into<String>) -> Self {
        CommandError::new(ErrorClass::InvalidParameter, desc)
    }

    /// A `NotFound` error.
    pub fn not_found(desc: impl Into<String>) -> Self {
        CommandError::new(ErrorClass::NotFound, desc)
    }

    /// A `Conflict` error.
    pub fn conflict(desc: impl Into<String>) -> Self {
        CommandError::new(ErrorClass::Conflict, desc)
    }

    /// A `GenericError`: tried and failed.
    pub fn failed(desc: impl Into<String>) -> Self {
        CommandError::new(ErrorClass::GenericError, desc)
    }
}

/// One request line, its envelope checked; [`Command::from_request`] reads the command.
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

/// Every command the daemon answers, with its arguments (docs/CONTROL.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "execute", content = "arguments", rename_all = "kebab-case")]
pub enum Command {
    /// Accepted for QMP tooling; does nothing.
    #[serde(rename = "qmp_capabilities")]
    QmpCapabilities(NoArguments),
    /// The daemon's version and protocol number.
    QueryVersion(NoArguments),
    /// The names of every command.
    QueryCommands(NoArguments),
    /// Everything `tidemark info --json` prints.
    QueryStatus(NoArguments),
    /// Register a backing as a volume and export it.
    VolumeCreate(VolumeCreateArgs),
    /// Every volume.
    VolumeList(NoArguments),
    /// One volume.
    VolumeInfo(VolumeNameArgs),
    /// Forget a volume (its backing stays).
    VolumeRemove(VolumeNameArgs),
    /// Start a checkpoint now.
    CheckpointCreate(CheckpointArgs),
    /// A volume's checkpoints, oldest first.
    CheckpointList(CheckpointListArgs),
    /// Delete a checkpoint, merging its changes into the previous one.
    CheckpointDelete(CheckpointArgs),
    /// Quiesce, snapshot, thaw; then pull or push.
    BackupBegin(BackupBeginArgs),
    /// End a pull backup or cancel a push.
    BackupEnd(BackupEndArgs),
    /// Running and recently ended backups.
    BackupStatus(NoArguments),
    /// Give a volume (or a backup's snapshot) a block device on this host.
    VolumeAttach(VolumeAttachArgs),
    /// Remove the block device of an attachment.
    VolumeDetach(VolumeNameArgs),
    /// Write back the blocks changed since a checkpoint from the point taken at it.
    VolumeRollback(VolumeRollbackArgs),
}

impl Command {
    /// The wire name of every command, in the order `query-commands` lists them. The
    /// tests check it against [`Command`], both ways.
    pub const NAMES: &'static [&'static str] = &[
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-status",
        "volume-create",
        "volume-list",
        "volume-info",
        "volume-remove",
        "checkpoint-create",
        "checkpoint-list",
        "checkpoint-delete",
        "backup-begin",
        "backup-end",
        "backup-status",
        "volume-attach",
        "volume-detach",
        "volume-rollback",
    ];

    /// Read the command of a parsed request: `CommandNotFound` for an unknown name,
    /// `InvalidParameter` naming the argument that is unknown, missing or ill-typed.
    pub fn from_request(request: &Request) -> Result<Command, CommandError> {
        let name = request.execute.as_str();
        if !Command::NAMES.contains(&name) {
            return Err(CommandError::new(
                ErrorClass::CommandNotFound,
                format!("unknown command {name:?}; `query-commands` lists them (docs/CONTROL.md)"),
            ));
        }
        Command::deserialize(Envelope {
            execute: Some(name),
            arguments: Some(request.arguments.clone()),
        })
        .map_err(|err| CommandError::invalid(format!("{name}: {err}")))
    }

    /// The request line's object: `{"execute": ..., "arguments": {...}, "id": id}`, the
    /// arguments left out when there are none. Fails only for a path that is not UTF-8.
    pub fn to_request(&self, id: Option<Value>) -> Result<Value, serde_json::Error> {
        let mut request = serde_json::to_value(self)?;
        if let Value::Object(object) = &mut request {
            if object
                .get("arguments")
                .and_then(Value::as_object)
                .is_some_and(Map::is_empty)
            {
                object.remove("arguments");
            }
            if let Some(id) = id {
                object.insert("id".into(), id);
            }
        }
        Ok(request)
    }
}

/// The arguments of a command that takes none (any argument is refused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// How a volume's changes are tracked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tracking {
    /// A bit that turns dirty is on stable storage before the write is issued.
    #[default]
    Durable,
    /// Bitmaps saved at clean stops only; a crash makes the next backup full.
    Fast,
}

/// `volume-create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreateArgs {
    /// The volume's name.
    pub name: String,
    /// Absolute path of a raw image or block device.
    pub backing: PathBuf,
    /// Create the image with this size if missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Tracking granularity in bytes (default 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u64>,
    /// Durable (default) or fast tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Tracking>,
}

/// `volume-info`, `volume-remove`: a volume by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeNameArgs {
    /// The volume.
    pub name: String,
}

/// `volume-attach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttachArgs {
    /// The volume, or a running pull backup's snapshot export (e.g. `data@backup`).
    pub name: String,
    /// The front end: `nbd` or `fuse` (default: nbd when the kernel has the nbd driver,
    /// else fuse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<crate::attach::Via>,
    /// The device refuses writes (a snapshot is always read-only).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub read_only: bool,
    /// Kernel NBD connections (1-8; default the number of CPUs, at most 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u32>,
}

/// `volume-rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRollbackArgs {
    /// The volume.
    pub name: String,
    /// The checkpoint the point was taken at.
    pub checkpoint: String,
    /// Absolute path of the point's base: a full delta, or an image followed by deltas.
    /// Empty with `repository`.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub base: PathBuf,
    /// Absolute paths of the point's incremental deltas, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<PathBuf>,
    /// The point is in this backup repository (a directory or `s3://BUCKET/PREFIX`)
    /// instead of files: `point` names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// With `repository`: the point, `VOLUME@CHECKPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
}

fn path_is_empty(path: &std::path::Path) -> bool {
    path.as_os_str().is_empty()
}

/// `checkpoint-create`, `checkpoint-delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointArgs {
    /// The volume.
    pub volume: String,
    /// The checkpoint.
    pub name: String,
}

/// `checkpoint-list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointListArgs {
    /// The volume.
    pub volume: String,
}

/// What a push writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushFormat {
    /// A raw image: a full copy, or update-img of an existing image for an incremental.
    #[default]
    Image,
    /// A delta file of the changed extents.
    Delta,
}

impl PushFormat {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            PushFormat::Image => "image",
            PushFormat::Delta => "delta",
        }
    }
}

/// `backup-begin` (docs/CONTROL.md has what each argument means).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupBeginArgs {
    /// The volumes, snapshotted together in one write pause.
    #[serde(default, deserialize_with = "null_as_default")]
    pub volumes: Vec<String>,
    /// Create this checkpoint at the snapshot instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Back up the changes since this checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental: Option<String>,
    /// Pull: the snapshot's export name, `{volume}` replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_name: Option<String>,
    /// Push mode: the target path, `{volume}` replaced; or `repo:URL`, a repository
    /// (directory or s3://) that gets the point VOLUME@CHECKPOINT (needs `checkpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<String>,
    /// What a push writes (default image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_format: Option<PushFormat>,
    /// Cap of each snapshot's COW store, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cow_limit: Option<u64>,
    /// Pull only: end the backup when this control connection closes.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub lease: bool,
    /// Mountpoints to FIFREEZE around the snapshot.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub freeze: Vec<PathBuf>,
    /// Hook directories (absent: the default ones that exist; empty: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Vec<PathBuf>>,
    /// A qemu-guest-agent socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<PathBuf>,
    /// Hard limit of the freeze-to-thaw window, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce_timeout_ms: Option<u64>,
    /// Allow `incremental` from an unconfirmed checkpoint.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub force: bool,
}

/// `backup-end`: the backup by `volume` or by `id`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupEndArgs {
    /// A volume of the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The backup's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The client's pull failed: end the backup as failed, its checkpoint unconfirmed.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub failed: bool,
}

/// `null` reads as absent, as for every optional argument.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A request as serde input: `execute` first (so the enum picks its variant before it
/// reads the arguments), then `arguments`, whose values are read by [`Arguments`].
struct Envelope<'a> {
    execute: Option<&'a str>,
    arguments: Option<Map<String, Value>>,
}

impl<'de> Deserializer<'de> for Envelope<'_> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

impl<'de> MapAccess<'de> for Envelope<'_> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let key = if self.execute.is_some() {
            "execute"
        } else if self.arguments.is_some() {
            "arguments"
        } else {
            return Ok(None);
        };
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        if let Some(execute) = self.execute.take() {
            return seed.deserialize(execute.into_deserializer());
        }
        let arguments = self.arguments.take().unwrap_or_default();
        seed.deserialize(Arguments {
            entries: arguments.into_iter(),
            current: None,
        })
    }
}

/// An `arguments` object as serde input that names the argument in a value's error
/// (serde's own message names an unknown or missing one).
struct Arguments {
    entries: serde_json::map::IntoIter,
    current: Option<(String, Value)>,
}

impl<'de> Deserializer<'de> for Arguments {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

impl<'de> MapAccess<'de> for Arguments {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let read = seed.deserialize(key.as_str().into_deserializer())?;
        self.current = Some((key, value));
        Ok(Some(read))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let (key, value) = self.current.take().unwrap_or_default();
        seed.deserialize(value)
            .map_err(|err| de::Error::custom(format_args!("argument {key:?}: {err}")))
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

/// What a command returns, before it becomes a reply line.
#[derive(Debug, Clone, PartialEq)]
pub enum Returned {
    /// A JSON value.
    Value(Value),
    /// JSON text serialized already, straight from typed data: the reports that grow
    /// with the number of volumes, so no `Value` tree is built per item.
    Json(String),
}

impl From<Value> for Returned {
    fn from(value: Value) -> Returned {
        Returned::Value(value)
    }
}

/// A success reply line's text (without the newline): `{"id":ID,"return":...}`, the
/// order [`reply_return`]'s keys serialize in.
pub fn reply_return_line(returned: Returned, id: Option<Value>) -> String {
    match returned {
        Returned::Value(value) => reply_return(value, id).to_string(),
        Returned::Json(text) => {
            let mut line = String::with_capacity(text.len() + 32);
            line.push('{');
            if let Some(id) = id {
                line.push_str("\"id\":");
                line.push_str(&id.to_string());
                line.push(',');
            }
            line.push_str("\"return\":");
            line.push_str(&text);
            line.push('}');
            line
        }
    }
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

#[cfg(test)]
mod tests;
