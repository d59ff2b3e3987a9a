//! Hostile and broken clients against the NBD server: malformed handshakes, bad magic,
//! oversized and zero lengths, ranges past the end, unknown commands and options, writes
//! to read-only exports, clients vanishing mid-payload. The server must answer as
//! doc/proto.md says, keep serving everyone else, and end every connection task.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tidemark_nbd::export::Export;
use tidemark_nbd::file::FileExport;
use tidemark_nbd::proto::{self, cflags, chunk, info, opt, rep, Command, HeaderMode, Request};
use tidemark_nbd::server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const SIZE: u64 = 4 << 20;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

struct Fixture {
    _dir: tempfile::TempDir,
    server: Server,
    socket: PathBuf,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(SIZE).unwrap();
    drop(f);
    std::fs::write(dir.path().join("unused"), b"").unwrap();
    let rw = FileExport::open(&img, false).unwrap();
    rw.write(0, &[0xab; 4096], false).unwrap();
    let ro = FileExport::open(&img, true).unwrap();
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(800),
        ..ServerConfig::default()
    };
    let server = Server::with_config(config);
    server.add_export("rw", Arc::new(rw)).unwrap();
    server.add_export("ro", Arc::new(ro)).unwrap();
    let socket = dir.path().join("s.sock");
    let listener = server.bind_unix(&socket).unwrap();
    tokio::spawn({
        let server = server.clone();
        async move { server.serve(listener).await }
    });
    Fixture {
        _dir: dir,
        server,
        socket,
    }
}

impl Fixture {
    /// Every client is gone: the server must have ended every connection task.
    async fn assert_no_connections_left(&self) {
        assert!(
            self.server.wait_idle(Duration::from_secs(5)).await,
            "{} connection tasks still alive",
            self.server.connections()
        );
    }
}

struct Raw {
    s: UnixStream,
    mode: HeaderMode,
}

impl Raw {
    async fn connect(path: &Path) -> Raw {
        Raw {
            s: UnixStream::connect(path).await.unwrap(),
            mode: HeaderMode::Simple,
        }
    }

    async fn greet(path: &Path) -> Raw {
        let mut raw = Raw::connect(path).await;
        let mut greeting = [0u8; proto::GREETING_LEN];
        raw.s.read_exact(&mut greeting).await.unwrap();
        let flags = proto::parse_greeting(&greeting).unwrap();
        assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        raw.s
            .write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        raw
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        self.s
            .write_all(&proto::encode_option(option, data))
            .await
            .unwrap();
    }

    async fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let h = proto::parse_option_reply_header(&h).unwrap();
        let mut data = vec![0u8; h.length as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (h.reply, data)
    }

    /// Replies until the final one (ACK or an error); returns its type.
    async fn final_reply(&mut self) -> u32 {
        loop {
            let (r, _) = self.reply().await;
            if r == rep::ACK || rep::is_error(r) {
                return r;
            }
        }
    }

    /// Negotiate `mode` and optional contexts, then GO to `name`.
    async fn go(path: &Path, name: &str, mode: HeaderMode, contexts: &[&str]) -> Raw {
        let mut raw = Raw::greet(path).await;
        match mode {
            HeaderMode::Extended => {
                raw.option(opt::EXTENDED_HEADERS, &[]).await;
                assert_eq!(raw.final_reply().await, rep::ACK);
            }
            HeaderMode::Structured => {
                raw.option(opt::STRUCTURED_REPLY, &[]).await;
                assert_eq!(raw.final_reply().await, rep::ACK);
            }
            HeaderMode::Simple => {}
        }
        if !contexts.is_empty() {
            let req = proto::MetaRequest {
                name: name.into(),
                queries: contexts.iter().map(|c| c.to_string()).collect(),
            };
            raw.option(opt::SET_META_CONTEXT, &proto::encode_meta_request(&req))
                .await;
            assert_eq!(raw.final_reply().await, rep::ACK);
        }
        let req = proto::InfoRequest {
            name: name.into(),
            items: vec![info::BLOCK_SIZE],
        };
        raw.option(opt::GO, &proto::encode_info_request(&req)).await;
        assert_eq!(raw.final_reply().await, rep::ACK);
        raw.mode = mode;
        raw
    }

    async fn request(
        &mut self,
        flags: u16,
        command: Command,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let mut out = Vec::new();
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        proto::encode_request(&mut out, &req, self.mode == HeaderMode::Extended);
        out.extend_from_slice(payload);
        self.s.write_all(&out).await.unwrap();
    }

    /// One reply: (cookie, errno, chunk type, payload). Simple READ replies carry `read_len`.
    async fn response(&mut self, read_len: usize) -> (u64, u32, u16, Vec<u8>) {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).await.unwrap();
        let rest = proto::reply_header_rest(u32::from_be_bytes(magic)).unwrap();
        let mut h = vec![0u8; 4 + rest];
        h[..4].copy_from_slice(&magic);
        self.s.read_exact(&mut h[4..]).await.unwrap();
        match proto::parse_reply_header(&h).unwrap() {
            proto::ReplyHeader::Simple { error, cookie } => {
                let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut data).await.unwrap();
                (cookie, error, 0, data)
            }
            proto::ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                length,
            } => {
                assert_ne!(
                    flags & chunk::FLAG_DONE,
                    0,
                    "test expects single-chunk replies"
                );
                let mut data = vec![0u8; length as usize];
                self.s.read_exact(&mut data).await.unwrap();
                let errno = if chunk::is_error(kind) {
                    u32::from_be_bytes(data[..4].try_into().unwrap())
                } else {
                    0
                };
                (cookie, errno, kind, data)
            }
        }
    }

    async fn expect_error(&mut self, cookie: u64, errno: u32) {
        let (c, e, _, _) = self.response(0).await;
        assert_eq!((c, e), (cookie, errno));
    }

    /// The server closes the connection (EOF) within a few seconds.
    async fn expect_closed(&mut self) {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match self.s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(r.is_ok(), "the server did not close the connection");
    }

    /// A read of 4 KiB at 0 still works.
    async fn assert_alive(&mut self) {
        self.request(0, Command::Read, 777, 0, 4096, &[]).await;
        let (cookie, errno, _, data) = self.response(4096).await;
        assert_eq!((cookie, errno), (777, 0));
        assert!(data.ends_with(&[0xab; 64]), "read returned the wrong bytes");
    }
}

#[tokio::test]
async fn unknown_client_flags_close_the_connection() {
    let f = fixture().await;
    let mut raw = Raw::connect(&f.socket).await;
    let mut greeting = [0u8; proto::GREETING_LEN];
    raw.s.read_exact(&mut greeting).await.unwrap();
    raw.s
        .write_all(&0xffff_ffffu32.to_be_bytes())
        .await
        .unwrap();
    raw.expect_closed().await;
    drop(raw);
    f.assert_no_connections_left().await;
}

#[tokio::test]
async fn bad_option_magic_closes_the_connection() {
    let f = fixture().await;
    let mut raw = Raw::greet(&f.socket).await;
    raw.s
        .write_all(b"NOTIHAVEOPT-garbage-garbage")
        .await
        .unwrap();
    raw.expect_closed().await;
    drop(raw);
    f.assert_no_connections_left().await;
}

#[tokio::test]
async fn unknown_options_and_starttls_are_refused_and_negotiation_goes_on() {
    let f = fixture().await;
    let mut raw = Raw::greet(&f.socket).await;
    raw.option(0x4242, b"some payload").await;
    assert_eq!(raw.reply().await.0, rep::ERR_UNSUP);
    raw.option(opt::STARTTLS, &[]).await;
    assert_eq!(raw.reply().await.0, rep::ERR_UNSUP);
    // Malformed GO: the name length runs past the payload.
    raw.option(opt::GO, &[0, 0, 1, 0, b'r', b'w']).await;
    assert_eq!(raw.reply().await.0, rep::ERR_INVALID);
    // Unknown export: a soft error.
    raw.option(
        opt::GO,
        &proto::encode_info_request(&proto::InfoRequest {
            name: "nope".into(),
            items: vec![],
        }),
    )
    .await;
    assert_eq!(raw.reply().await.0, rep::ERR_UNKNOWN);
    // Payload on an option that takes none.
    raw.option(opt::LIST, b"x").await;
    assert_eq!(raw.reply().await.0, rep::ERR_INVALID);
    raw.option(
        opt::GO,
        &proto::encode_info_request(&proto::InfoRequest {
            name: "rw".into(),
            items: vec![],
        }),
    )
    .await;
    assert_eq!(raw.final_reply().await, rep::ACK);
    raw.assert_alive().await;
}

#[tokio::test]
async fn oversized_options_are_refused_or_closed() {
    let f = fixture().await;
    let mut raw = Raw::greet(&f.socket).await;
    raw.option(opt::INFO, &vec![7u8; 100 * 1024]).await;
    assert_eq!(raw.reply().await.0, rep::ERR_TOO_BIG);
    // Still in sync: a valid option works.
    raw.option(opt::LIST, &[]).await;
    assert_eq!(raw.final_reply().await, rep::ACK);
    // A 1 GiB announcement is not worth reading: the server hangs up.
    let mut header = Vec::new();
    header.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&opt::GO.to_be_bytes());
    header.extend_from_slice(&(1u32 << 30).to_be_bytes());
    raw.s.write_all(&header).await.unwrap();
    raw.expect_closed().await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_time_limit() {
    let f = fixture().await;
    let mut raw = Raw::greet(&f.socket).await;
    // Half an option header, then nothing.
    raw.s
        .write_all(&proto::IHAVEOPT.to_be_bytes())
        .await
        .unwrap();
    raw.expect_closed().await;
    drop(raw);
    f.assert_no_connections_left().await;
}

#[tokio::test]
async fn abort_is_acknowledged_and_closes() {
    let f = fixture().await;
    let mut raw = Raw::greet(&f.socket).await;
    raw.option(opt::ABORT, &[]).await;
    assert_eq!(raw.reply().await.0, rep::ACK);
    raw.expect_closed().await;
}

#[tokio::test]
async fn export_name_of_an_unknown_export_closes() {
    let f = fixture().await;
    let mut raw = Raw::greet(&f.socket).await;
    raw.option(opt::EXPORT_NAME, b"nope").await;
    raw.expect_closed().await;
}

#[tokio::test]
async fn command_errors_follow_the_spec_in_every_header_mode() {
    let f = fixture().await;
    for mode in [
        HeaderMode::Simple,
        HeaderMode::Structured,
        HeaderMode::Extended,
    ] {
        let mut raw = Raw::go(&f.socket, "ro", mode, &[]).await;
        raw.request(0, Command::Unknown(42), 1, 0, 4096, &[]).await;
        raw.expect_error(1, EINVAL).await;
        raw.request(0, Command::Read, 2, 0, 0, &[]).await;
        raw.expect_error(2, EINVAL).await;
        raw.request(0, Command::Read, 3, SIZE - 512, 4096, &[])
            .await;
        raw.expect_error(3, EINVAL).await;
        raw.request(0, Command::Read, 4, u64::MAX - 10, 4096, &[])
            .await;
        raw.expect_error(4, EINVAL).await;
        raw.request(0, Command::Read, 5, 0, 64 << 20, &[]).await;
        raw.expect_error(5, EINVAL).await;
        // A write to the read-only export: EPERM, and its payload is consumed.
        raw.request(0, Command::Write, 6, 0, 4096, &[0x11; 4096])
            .await;
        raw.expect_error(6, EPERM).await;
        raw.request(0, Command::Trim, 7, 0, 4096, &[]).await;
        raw.expect_error(7, EPERM).await;
        raw.request(0, Command::WriteZeroes, 8, 0, 4096, &[]).await;
        raw.expect_error(8, EPERM).await;
        raw.request(0, Command::BlockStatus, 9, 0, 4096, &[]).await;
        raw.expect_error(9, EINVAL).await;
        raw.request(1 << 9, Command::Read, 10, 0, 4096, &[]).await;
        raw.expect_error(10, EINVAL).await;
        raw.assert_alive().await;
        // Bad request magic: the stream is out of sync, the server hangs up.
        raw.s.write_all(&[0x55; 32]).await.unwrap();
        raw.expect_closed().await;
    }
    f.assert_no_connections_left().await;
}

#[tokio::test]
async fn writes_past_the_end_get_enospc_and_oversized_payloads_close() {
    let f = fixture().await;
    let mut raw = Raw::go(&f.socket, "rw", HeaderMode::Structured, &[]).await;
    raw.request(0, Command::Write, 1, SIZE - 100, 200, &[0; 200])
        .await;
    raw.expect_error(1, ENOSPC).await;
    raw.request(0, Command::WriteZeroes, 2, SIZE, 1, &[]).await;
    raw.expect_error(2, ENOSPC).await;
    raw.request(0, Command::Trim, 3, SIZE, 1, &[]).await;
    raw.expect_error(3, EINVAL).await;
    raw.request(cflags::DF, Command::Write, 4, 0, 1, &[0]).await;
    raw.expect_error(4, EINVAL).await;
    raw.assert_alive().await;
    // A 64 MiB write payload will not be read: EINVAL, then the server hangs up.
    raw.request(0, Command::Write, 5, 0, 64 << 20, &[]).await;
    raw.expect_error(5, EINVAL).await;
    raw.expect_closed().await;
}

#[tokio::test]
async fn block_status_in_extended_mode_uses_64_bit_descriptors() {
    let f = fixture().await;
    let mut raw = Raw::go(&f.socket, "ro", HeaderMode::Extended, &["base:allocation"]).await;
    raw.request(0, Command::BlockStatus, 1, 0, SIZE, &[]).await;
    let (cookie, errno, kind, data) = raw.response(0).await;
    assert_eq!((cookie, errno, kind), (1, 0, chunk::BLOCK_STATUS_EXT));
    let proto::ChunkPayload::BlockStatus { extents, .. } =
        proto::parse_chunk_payload(kind, &data).unwrap()
    else {
        panic!("not block status")
    };
    assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), SIZE);
    // REQ_ONE: one descriptor.
    raw.request(cflags::REQ_ONE, Command::BlockStatus, 2, 0, SIZE, &[])
        .await;
    let (_, _, kind, data) = raw.response(0).await;
    let proto::ChunkPayload::BlockStatus { extents, .. } =
        proto::parse_chunk_payload(kind, &data).unwrap()
    else {
        panic!("not block status")
    };
    assert_eq!(extents.len(), 1);
    raw.request(0, Command::BlockStatus, 3, 0, 0, &[]).await;
    raw.expect_error(3, EINVAL).await;
}

#[tokio::test]
async fn a_client_vanishing_mid_payload_does_not_disturb_the_others() {
    let f = fixture().await;
    let mut steady = Raw::go(&f.socket, "rw", HeaderMode::Structured, &[]).await;
    let mut vanishing = Vec::new();
    for i in 0..8u64 {
        let mut raw = Raw::go(&f.socket, "rw", HeaderMode::Simple, &[]).await;
        // Announce a 1 MiB write, send a third of it, and go away.
        raw.request(0, Command::Write, i, 0, 1 << 20, &vec![0x77; 300_000])
            .await;
        vanishing.push(raw);
        steady.assert_alive().await;
    }
    drop(vanishing);
    // Mid-handshake vanishers too.
    for _ in 0..4 {
        let mut raw = Raw::greet(&f.socket).await;
        raw.s
            .write_all(&proto::IHAVEOPT.to_be_bytes()[..5])
            .await
            .unwrap();
    }
    for _ in 0..16 {
        steady.assert_alive().await;
    }
    drop(steady);
    f.assert_no_connections_left().await;
    // None of the partial writes reached the disk.
    let mut fresh = Raw::go(&f.socket, "ro", HeaderMode::Simple, &[]).await;
    fresh.assert_alive().await;
}

#[tokio::test]
async fn removing_an_export_closes_its_connections_only() {
    let f = fixture().await;
    let mut on_rw = Raw::go(&f.socket, "rw", HeaderMode::Structured, &[]).await;
    let mut on_ro = Raw::go(&f.socket, "ro", HeaderMode::Structured, &[]).await;
    assert!(f.server.remove_export("rw").is_some());
    on_rw.expect_closed().await;
    on_ro.assert_alive().await;
    let mut again = Raw::greet(&f.socket).await;
    again
        .option(
            opt::GO,
            &proto::encode_info_request(&proto::InfoRequest {
                name: "rw".into(),
                items: vec![],
            }),
        )
        .await;
    assert_eq!(again.reply().await.0, rep::ERR_UNKNOWN);
}

#[tokio::test]
async fn shutdown_is_a_soft_disconnect() {
    const ESHUTDOWN: u32 = 108;
    let f = fixture().await;
    // Idle in transmission: closed once the server shuts down.
    let mut idle = Raw::go(&f.socket, "ro", HeaderMode::Structured, &[]).await;
    // Mid-handshake: further options are refused with ERR_SHUTDOWN.
    let mut haggling = Raw::greet(&f.socket).await;
    // Ignores ESHUTDOWN: closed when the grace period ends.
    let mut stubborn = Raw::go(&f.socket, "rw", HeaderMode::Simple, &[]).await;
    stubborn
        .request(0, Command::Write, 9, 8192, 4096, &[1; 100])
        .await;
    // Mid-request when the server stops: its write and later requests get ESHUTDOWN,
    // and the connection stays open for the client's NBD_CMD_DISC.
    let mut busy = Raw::go(&f.socket, "rw", HeaderMode::Structured, &[]).await;
    busy.request(0, Command::Write, 1, 8192, 4096, &[7; 100])
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.server.shutdown();
    idle.expect_closed().await;
    busy.s.write_all(&[7; 4096 - 100]).await.unwrap();
    busy.expect_error(1, ESHUTDOWN).await;
    busy.request(0, Command::Read, 2, 0, 4096, &[]).await;
    busy.expect_error(2, ESHUTDOWN).await;
    busy.request(0, Command::Disc, 3, 0, 0, &[]).await;
    busy.expect_closed().await;
    haggling.option(opt::LIST, &[]).await;
    assert_eq!(haggling.reply().await.0, rep::ERR_SHUTDOWN);
    haggling.option(opt::ABORT, &[]).await;
    assert_eq!(haggling.reply().await.0, rep::ACK);
    haggling.expect_closed().await;
    stubborn.s.write_all(&[1; 4096 - 100]).await.unwrap();
    stubborn.expect_error(9, ESHUTDOWN).await;
    stubborn.expect_closed().await;
    f.assert_no_connections_left().await;
    // Nothing was written after the shutdown.
    let img = FileExport::open(&f._dir.path().join("disk.img"), true).unwrap();
    let mut buf = [0u8; 4096];
    img.read(8192, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 4096]);
}
