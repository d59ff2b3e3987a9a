//! Block-device front ends: a volume (or a backup's snapshot) as a kernel block device on
//! this host, so a filesystem can live on it.
//!
//! - [`fuse`]: FUSE + loop. A FUSE filesystem with one regular file, the volume, and a loop
//!   device over it with direct I/O. Needs `/dev/fuse` and the loop driver; works where
//!   nbd.ko is missing. A crash of the serving process leaves the filesystem above with EIO
//!   (never wrong data); [`fuse::cleanup_stale`] removes what it left.
//! - [`nbd`]: kernel NBD. One socketpair per queue: this process serves the NBD
//!   transmission phase on its end, and the other end goes to nbd.ko over the generic
//!   netlink `nbd` family ([`netlink`]). With a dead-connection timeout the kernel holds
//!   I/O while the server is gone, and a restarted server hands over new sockets.
//!
//! Both serve a [`tidemark_nbd::export::Export`] (what the volume and snapshot adapters
//! already implement) behind the [`FrontEnd`] trait, and describe what they made in an
//! [`Attachment`] record the daemon keeps in its state dir. The loop ioctls, the only
//! unsafe code they need, live in the engine's syscall layer
//! ([`tidemark_engine::sys::loopdev`]).

mod counted;
pub mod fuse;
mod fuse_abi;
mod fuse_server;
pub mod nbd;
pub mod netlink;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidemark_engine::sys::loopdev as sys;
use tidemark_nbd::export::Export;

pub use counted::{Counted, IoCounters};

/// Which front end made an attachment (`--via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Kernel NBD over generic netlink: `/dev/nbdN`.
    Nbd,
    /// A FUSE file with a loop device over it: `/dev/loopN`.
    Fuse,
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Via::Nbd => "nbd",
            Via::Fuse => "fuse",
        })
    }
}

/// I/O through an attachment since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStats {
    /// Read requests.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flush (fsync) requests.
    pub flushes: u64,
    /// Trim and write-zeroes requests.
    pub discards: u64,
    /// Bytes trimmed or zeroed.
    pub discard_bytes: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// What a front end holds in the kernel for one attachment: enough to find it again after
/// a restart (NBD) or to remove it after a crash (FUSE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "lowercase")]
pub enum Resources {
    /// `/dev/nbd<index>`, served over `queues` sockets.
    Nbd {
        /// The nbd device index.
        index: u32,
        /// Connections (socketpairs) the device uses.
        queues: u32,
    },
    /// A loop device over the file `volume` of the FUSE mount `mount`.
    Fuse {
        /// The FUSE mountpoint.
        mount: PathBuf,
    },
}

/// One attachment, as listed by `volume list/info` and kept in the daemon's state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The volume (or `VOLUME@backup` snapshot) attached.
    pub volume: String,
    /// The block device made, e.g. `/dev/nbd0` or `/dev/loop3`.
    pub device: PathBuf,
    /// Writes are refused at the device.
    pub read_only: bool,
    /// When it was attached, in seconds since the Unix epoch.
    pub since: u64,
    /// The process serving it; a record whose process is gone is stale.
    pub pid: u32,
    /// The front end and what it holds in the kernel.
    pub resources: Resources,
    /// I/O counters at the time the record was taken.
    pub io: IoStats,
}

impl Attachment {
    /// The front end that made it.
    pub fn via(&self) -> Via {
        match self.resources {
            Resources::Nbd { .. } => Via::Nbd,
            Resources::Fuse { .. } => Via::Fuse,
        }
    }
}

/// Why attaching or detaching failed. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// nbd.ko is not loaded (the generic netlink family `nbd` does not exist).
    #[error("the kernel has no nbd driver (generic netlink family \"nbd\" not found): load it with `modprobe nbd`, or attach with `--via fuse`")]
    NbdMissing,
    /// /dev/fuse is missing or cannot be opened.
    #[error("cannot use /dev/fuse ({0}): load the fuse module with `modprobe fuse`, or attach with `--via nbd`")]
    FuseMissing(io::Error),
    /// The device is mounted or held open.
    #[error("{device} is in use (a filesystem is mounted on it or a program holds it open): unmount it first, then detach")]
    Busy {
        /// The block device.
        device: PathBuf,
    },
    /// A kernel or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path or device.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel answered a netlink request with something unexpected.
    #[error("nbd netlink: {0}")]
    Protocol(String),
}

impl AttachError {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        AttachError::Io {
            what: what.into(),
            source,
        }
    }
}

/// A front end: makes a kernel block device that serves an export.
pub trait FrontEnd: Send + Sync {
    /// Which front end this is.
    fn via(&self) -> Via;

    /// Attach `export` (named `volume` in records and logs) as a new block device; with
    /// `read_only` (or a read-only export) the device refuses writes with EPERM.
    fn attach(
        &self,
        volume: &str,
        export: Arc<dyn Export>,
        read_only: bool,
    ) -> Result<Box<dyn Attached>, AttachError>;
}

/// A live attachment, served by this process.
pub trait Attached: Send + Sync + fmt::Debug {
    /// Its record, with the current I/O counters.
    fn record(&self) -> Attachment;

    /// Remove the block device. Refused with [`AttachError::Busy`] while it is mounted
    /// or held open (nothing changes then and it may be retried); after success the
    /// attachment is gone and dropping it does nothing more.
    fn detach(&mut self) -> Result<(), AttachError>;
}

/// Seconds since the Unix epoch, for [`Attachment::since`].
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Open a device exclusively to prove nothing uses it, as [`AttachError::Busy`] if it is.
pub(crate) fn claim(device: &std::path::Path) -> Result<std::fs::File, AttachError> {
    sys::open_exclusive(device).map_err(|err| match err.raw_os_error() {
        Some(libc::EBUSY) => AttachError::Busy {
            device: device.to_path_buf(),
        },
        _ => AttachError::io(format!("cannot open {}", device.display()), err),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_json_with_the_front_end_named() {
        let record = Attachment {
            volume: "data".into(),
            device: "/dev/loop3".into(),
            read_only: false,
            since: 1_700_000_000,
            pid: 42,
            resources: Resources::Fuse {
                mount: "/run/tidemark/attach/data".into(),
            },
            io: IoStats {
                reads: 1,
                read_bytes: 4096,
                ..IoStats::default()
            },
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""via":"fuse""#), "{json}");
        assert_eq!(serde_json::from_str::<Attachment>(&json).unwrap(), record);
        assert_eq!(record.via(), Via::Fuse);
    }

    #[test]
    fn missing_drivers_name_the_module_and_the_other_front_end() {
        let nbd = AttachError::NbdMissing.to_string();
        assert!(
            nbd.contains("modprobe nbd") && nbd.contains("--via fuse"),
            "{nbd}"
        );
        let fuse = AttachError::FuseMissing(io::Error::from_raw_os_error(libc::ENOENT));
        let fuse = fuse.to_string();
        assert!(
            fuse.contains("/dev/fuse") && fuse.contains("--via nbd"),
            "{fuse}"
        );
    }
}
