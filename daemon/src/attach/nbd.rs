//! Kernel NBD: `/dev/nbdN` served by this process over socketpairs.
//!
//! Nothing is negotiated with the kernel. For each queue this process makes a socketpair,
//! serves the NBD transmission phase on one end
//! ([`tidemark_nbd::server::serve_transmission`], simple replies) and hands the other
//! end to nbd.ko with the generic netlink `nbd` family (`<linux/nbd-netlink.h>`):
//! NBD_CMD_CONNECT with the sockets, the size, the block size, the transmission flags the
//! export earns (the same the NBD server advertises) and a dead-connection timeout. When
//! this process dies the kernel holds I/O for that timeout; a restarted daemon hands
//! new sockets to the same device with NBD_CMD_RECONFIGURE ([`KernelNbd::reconnect`]).
//! Requests sent after the death wait for the new sockets; one the kernel had already sent
//! on a dead socket is resent once the block layer's request timeout (30 s) fires, so it
//! completes that much later on the new ones (seen on Debian's 6.1 kernel:
//! tests/tests/attach_vm.rs).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tidemark_nbd::export::Export;
use tidemark_nbd::negotiate::transmission_flags;
use tidemark_nbd::proto::HeaderMode;
use tidemark_nbd::server::{serve_transmission, ServerConfig};

use super::netlink::{Attr, GenlSocket};
use super::{claim, now_secs, AttachError, Attached, Attachment, Counted, FrontEnd};
use super::{IoCounters, Resources, Via};

const FAMILY: &str = "nbd";
const VERSION: u8 = 1;

/// `NBD_CMD_*` of the nbd generic netlink family.
mod cmd {
    pub const CONNECT: u8 = 1;
    pub const DISCONNECT: u8 = 2;
    pub const RECONFIGURE: u8 = 3;
}

/// `NBD_ATTR_*` and `NBD_SOCK_*`.
mod attr {
    pub const INDEX: u16 = 1;
    pub const SIZE_BYTES: u16 = 2;
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    pub const SERVER_FLAGS: u16 = 5;
    pub const SOCKETS: u16 = 7;
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    pub const SOCK_ITEM: u16 = 1;
    pub const SOCK_FD: u16 = 1;
}

/// The most queues (connections) one device gets.
pub const MAX_QUEUES: usize = 8;

/// What NBD_CMD_CONNECT asks of the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The device index, or `None` for any free device.
    pub index: Option<u32>,
    /// Export size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u64,
    /// NBD transmission flags.
    pub server_flags: u64,
    /// How long the kernel holds I/O while every connection is dead.
    pub dead_conn_timeout: Duration,
    /// The kernel's ends of the socketpairs, as descriptors of this process.
    pub fds: Vec<u32>,
}

fn sockets(fds: &[u32]) -> Attr {
    let items = fds
        .iter()
        .map(|fd| Attr::Nested(attr::SOCK_ITEM, vec![Attr::U32(attr::SOCK_FD, *fd)]))
        .collect();
    Attr::Nested(attr::SOCKETS, items)
}

impl Connect {
    /// The request's attributes.
    pub fn attrs(&self) -> Vec<Attr> {
        let mut attrs = Vec::new();
        if let Some(index) = self.index {
            attrs.push(Attr::U32(attr::INDEX, index));
        }
        attrs.extend([
            Attr::U64(attr::SIZE_BYTES, self.size),
            Attr::U64(attr::BLOCK_SIZE_BYTES, self.block_size),
            Attr::U64(attr::SERVER_FLAGS, self.server_flags),
            Attr::U64(attr::DEAD_CONN_TIMEOUT, self.dead_conn_timeout.as_secs()),
            sockets(&self.fds),
        ]);
        attrs
    }
}

/// NBD_CMD_RECONFIGURE's attributes: new sockets for device `index`.
pub fn reconfigure_attrs(index: u32, fds: &[u32], dead_conn_timeout: Duration) -> Vec<Attr> {
    vec![
        Attr::U32(attr::INDEX, index),
        Attr::U64(attr::DEAD_CONN_TIMEOUT, dead_conn_timeout.as_secs()),
        sockets(fds),
    ]
}

/// The kernel NBD front end.
#[derive(Debug, Clone)]
pub struct KernelNbd {
    /// Connections per device (1 to [`MAX_QUEUES`]).
    pub queues: usize,
    /// How long the kernel holds I/O while this process is gone.
    pub dead_conn_timeout: Duration,
    /// Logical block size of the device.
    pub block_size: u64,
    /// Transmission tuning (in-flight budget per connection).
    pub config: ServerConfig,
}

impl Default for KernelNbd {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        KernelNbd {
            queues: cpus.min(MAX_QUEUES),
            dead_conn_timeout: Duration::from_secs(120),
            block_size: 4096,
            config: ServerConfig::default(),
        }
    }
}

/// The serving ends of a device's connections.
struct Queues {
    ours: Vec<UnixStream>,
    servers: Vec<JoinHandle<io::Result<()>>>,
}

impl Queues {
    /// Start serving `n` socketpairs; the kernel's ends are returned to be handed over.
    fn start(
        volume: &str,
        export: &Arc<Counted>,
        n: usize,
        config: &ServerConfig,
    ) -> Result<(Queues, Vec<UnixStream>), AttachError> {
        let mut queues = Queues {
            ours: Vec::new(),
            servers: Vec::new(),
        };
        let mut theirs = Vec::new();
        for i in 0..n.clamp(1, MAX_QUEUES) {
            let (ours, kernel) =
                UnixStream::pair().map_err(|e| AttachError::io("cannot make a socketpair", e))?;
            let control = ours
                .try_clone()
                .map_err(|e| AttachError::io("cannot clone a socket", e))?;
            let (name, export, config) = (volume.to_string(), export.clone(), config.clone());
            let server = std::thread::Builder::new()
                .name(format!("nbd-{volume}-{i}"))
                .spawn(move || serve_transmission(&name, export, ours, &config))
                .map_err(|e| AttachError::io("cannot start an NBD queue", e))?;
            queues.ours.push(control);
            queues.servers.push(server);
            theirs.push(kernel);
        }
        Ok((queues, theirs))
    }

    /// Close this side of every connection and wait for the servers.
    fn stop(self) {
        for socket in &self.ours {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        for server in self.servers {
            match server.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::info!("NBD queue ended: {err}"),
                Err(_) => tracing::error!("an NBD queue panicked"),
            }
        }
    }
}

/// Whether the kernel has the nbd driver (its generic netlink family exists): the
/// daemon's default front end is kernel NBD then, FUSE + loop otherwise.
pub fn available() -> bool {
    netlink_socket()
        .and_then(|mut socket| nbd_family(&mut socket))
        .is_ok()
}

/// The nbd family's id, or [`AttachError::NbdMissing`].
fn nbd_family(socket: &mut GenlSocket) -> Result<u16, AttachError> {
    socket
        .resolve(FAMILY)
        .map_err(|e| AttachError::io("cannot query generic netlink", e))?
        .ok_or(AttachError::NbdMissing)
}

fn netlink_socket() -> Result<GenlSocket, AttachError> {
    GenlSocket::open().map_err(|e| AttachError::io("cannot open a generic netlink socket", e))
}

fn raw_fds(streams: &[UnixStream]) -> Vec<u32> {
    streams.iter().map(|s| s.as_raw_fd() as u32).collect()
}

/// A kernel NBD attachment served by this process.
pub struct NbdAttachment {
    record: Attachment,
    index: u32,
    counters: Arc<IoCounters>,
    queues: Option<Queues>,
}

impl std::fmt::Debug for NbdAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdAttachment")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl KernelNbd {
    fn serve(
        &self,
        volume: &str,
        export: Arc<dyn Export>,
        read_only: bool,
    ) -> Result<(Arc<Counted>, Queues, Vec<UnixStream>), AttachError> {
        let export = Arc::new(Counted::new(export, read_only));
        let (queues, theirs) = Queues::start(volume, &export, self.queues, &self.config)?;
        Ok((export, queues, theirs))
    }

    /// Serve an attachment made by an earlier run of this daemon again: new sockets go
    /// to the same device with NBD_CMD_RECONFIGURE, and I/O the kernel held resumes.
    pub fn reconnect(
        &self,
        record: &Attachment,
        export: Arc<dyn Export>,
    ) -> Result<Box<dyn Attached>, AttachError> {
        let Resources::Nbd { index, queues } = record.resources else {
            return Err(AttachError::Protocol(format!(
                "{} is not a kernel NBD attachment",
                record.device.display()
            )));
        };
        let mut socket = netlink_socket()?;
        let family = nbd_family(&mut socket)?;
        let served = KernelNbd {
            queues: queues as usize,
            ..self.clone()
        };
        let (export, running, theirs) = served.serve(&record.volume, export, record.read_only)?;
        let attrs = reconfigure_attrs(index, &raw_fds(&theirs), self.dead_conn_timeout);
        if let Err(err) = socket.request(family, cmd::RECONFIGURE, VERSION, &attrs) {
            running.stop();
            let what = format!("cannot reconnect {}", record.device.display());
            return Err(AttachError::io(what, err));
        }
        Ok(Box::new(NbdAttachment {
            record: Attachment {
                pid: std::process::id(),
                ..record.clone()
            },
            index,
            counters: export.counters(),
            queues: Some(running),
        }))
    }
}

impl FrontEnd for KernelNbd {
    fn via(&self) -> Via {
        Via::Nbd
    }

    fn attach(
        &self,
        volume: &str,
        export: Arc<dyn Export>,
        read_only: bool,
    ) -> Result<Box<dyn Attached>, AttachError> {
        let mut socket = netlink_socket()?;
        let family = nbd_family(&mut socket)?;
        let (export, running, theirs) = self.serve(volume, export, read_only)?;
        let connect = Connect {
            index: None,
            size: export.size(),
            block_size: self.block_size,
            server_flags: transmission_flags(export.as_ref(), HeaderMode::Simple).into(),
            dead_conn_timeout: self.dead_conn_timeout,
            fds: raw_fds(&theirs),
        };
        let replies = match socket.request(family, cmd::CONNECT, VERSION, &connect.attrs()) {
            Ok(replies) => replies,
            Err(err) => {
                running.stop();
                return Err(AttachError::io("nbd connect", err));
            }
        };
        // The kernel holds its own references to the sockets now.
        drop(theirs);
        let index = replies
            .iter()
            .flatten()
            .find(|(kind, _)| *kind == attr::INDEX)
            .and_then(|(_, v)| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?)));
        let Some(index) = index else {
            running.stop();
            return Err(AttachError::Protocol(
                "NBD_CMD_CONNECT answered without a device index".into(),
            ));
        };
        Ok(Box::new(NbdAttachment {
            record: Attachment {
                volume: volume.to_string(),
                device: PathBuf::from(format!("/dev/nbd{index}")),
                read_only: export.read_only(),
                since: now_secs(),
                pid: std::process::id(),
                resources: Resources::Nbd {
                    index,
                    queues: running.ours.len() as u32,
                },
                io: Default::default(),
            },
            index,
            counters: export.counters(),
            queues: Some(running),
        }))
    }
}

impl Attached for NbdAttachment {
    fn record(&self) -> Attachment {
        Attachment {
            io: self.counters.snapshot(),
            ..self.record.clone()
        }
    }

    fn detach(&mut self) -> Result<(), AttachError> {
        let Some(running) = self.queues.take() else {
            return Ok(());
        };
        let disconnected = claim(&self.record.device).and_then(|_claimed| {
            let mut socket = netlink_socket()?;
            let family = nbd_family(&mut socket)?;
            let attrs = [Attr::U32(attr::INDEX, self.index)];
            socket
                .request(family, cmd::DISCONNECT, VERSION, &attrs)
                .map_err(|e| {
                    AttachError::io(
                        format!("cannot disconnect {}", self.record.device.display()),
                        e,
                    )
                })
        });
        match disconnected {
            Ok(_) => {
                running.stop();
                Ok(())
            }
            Err(err) => {
                self.queues = Some(running);
                Err(err)
            }
        }
    }
}

impl Drop for NbdAttachment {
    /// Stop serving without disconnecting: the kernel holds I/O for the dead-connection
    /// timeout, waiting for [`KernelNbd::reconnect`], as after a daemon restart.
    fn drop(&mut self) {
        if let Some(running) = self.queues.take() {
            running.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::netlink::{encode_request, parse_answers, parse_attrs, Answer};

    #[test]
    fn connect_carries_every_attribute_with_sockets_nested_per_item() {
        let connect = Connect {
            index: None,
            size: 1 << 30,
            block_size: 4096,
            server_flags: 0x1ad,
            dead_conn_timeout: Duration::from_secs(120),
            fds: vec![5, 6],
        };
        let msg = encode_request(0x20, cmd::CONNECT, VERSION, 1, &connect.attrs());
        let answers = parse_answers(&msg).unwrap();
        let [Answer::Message { cmd, attrs, .. }] = &answers[..] else {
            panic!("one message expected: {answers:?}");
        };
        assert_eq!(*cmd, cmd::CONNECT);
        let u64_of = |kind| {
            let (_, v) = attrs.iter().find(|(k, _)| *k == kind).unwrap();
            u64::from_ne_bytes(v[..].try_into().unwrap())
        };
        assert!(!attrs.iter().any(|(k, _)| *k == attr::INDEX), "any device");
        assert_eq!(u64_of(attr::SIZE_BYTES), 1 << 30);
        assert_eq!(u64_of(attr::BLOCK_SIZE_BYTES), 4096);
        assert_eq!(u64_of(attr::SERVER_FLAGS), 0x1ad);
        assert_eq!(u64_of(attr::DEAD_CONN_TIMEOUT), 120);
        let (_, socks) = attrs.iter().find(|(k, _)| *k == attr::SOCKETS).unwrap();
        let fds: Vec<u32> = parse_attrs(socks)
            .unwrap()
            .into_iter()
            .map(|(kind, item)| {
                assert_eq!(kind, attr::SOCK_ITEM);
                let inner = parse_attrs(&item).unwrap();
                assert_eq!(inner[0].0, attr::SOCK_FD);
                u32::from_ne_bytes(inner[0].1[..].try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, vec![5, 6]);
    }

    #[test]
    fn reconfigure_names_the_device_and_the_new_sockets() {
        let attrs = reconfigure_attrs(3, &[9], Duration::from_secs(60));
        assert_eq!(attrs[0], Attr::U32(attr::INDEX, 3));
        assert_eq!(
            attrs[2],
            Attr::Nested(
                attr::SOCKETS,
                vec![Attr::Nested(
                    attr::SOCK_ITEM,
                    vec![Attr::U32(attr::SOCK_FD, 9)]
                )]
            )
        );
    }

    #[test]
    fn read_only_exports_advertise_read_only_and_writable_ones_every_command() {
        use tidemark_nbd::proto::tflags;
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let export: Arc<dyn Export> =
            Arc::new(tidemark_nbd::file::FileExport::open(file.path(), false).unwrap());
        let rw = transmission_flags(&Counted::new(export.clone(), false), HeaderMode::Simple);
        for flag in [
            tflags::HAS_FLAGS,
            tflags::SEND_FLUSH,
            tflags::SEND_FUA,
            tflags::SEND_TRIM,
            tflags::SEND_WRITE_ZEROES,
            tflags::CAN_MULTI_CONN,
        ] {
            assert_ne!(rw & flag, 0, "flag {flag:#x} in {rw:#x}");
        }
        assert_eq!(rw & tflags::READ_ONLY, 0);
        let ro = transmission_flags(&Counted::new(export, true), HeaderMode::Simple);
        assert_ne!(ro & tflags::READ_ONLY, 0);
    }

    #[test]
    fn attaching_without_nbd_ko_names_the_module_and_fuse() {
        if std::path::Path::new("/sys/module/nbd").exists() {
            return;
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let export = Arc::new(tidemark_nbd::file::FileExport::open(file.path(), false).unwrap());
        let err = KernelNbd::default().attach("t", export, false).unwrap_err();
        assert!(matches!(err, AttachError::NbdMissing), "{err}");
    }
}
