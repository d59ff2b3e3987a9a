//! NBD over TLS end to end: certificates made here (a CA, a server, allowed, scoped and
//! unknown clients, a second CA, an expired client), `tidemark export` and `tidemark
//! serve` in FORCEDTLS mode against qemu-img, nbdinfo, nbdcopy and python3-libnbd, our
//! client against qemu-nbd's TLS, and every refusal the issue lists.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tidemark_tests::daemon::{Daemon, Model};
use tidemark_tests::image::Image;
use tidemark_tests::peers::qemu_io;
use tidemark_tests::run::{run, run_ok_within, Output};
use tidemark_tests::{tidemark_bin, ChildGuard};

const LIMIT: Duration = Duration::from_secs(60);
const SIZE: u64 = 8 << 20;

/// The certificates of tests/src/tls_certs.py in a temp dir, and an authz file:
/// admin may open everything, backup-host-1 (`scoped`) only `*@backup`.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn make() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/tls_certs.py");
        run_ok_within(
            Command::new("/usr/bin/python3")
                .arg(script)
                .arg(dir.path().join("certs")),
            LIMIT,
        )
        .expect("making certificates (python3-cryptography)");
        std::fs::write(
            dir.path().join("authz.json"),
            r#"{"policy": "deny", "rules": [
                {"match": "CN=admin,O=tidemark-test", "policy": "allow"},
                {"match": "CN=backup-host-1,O=tidemark-test", "policy": "allow",
                 "exports": ["*@backup"]}]}"#,
        )
        .expect("authz file");
        Certs { dir }
    }

    fn of(&self, who: &str) -> PathBuf {
        self.dir.path().join("certs").join(who)
    }

    fn authz(&self) -> PathBuf {
        self.dir.path().join("authz.json")
    }

    fn arg(&self, who: &str) -> String {
        self.of(who).display().to_string()
    }
}

/// `tidemark export FILE --listen 127.0.0.1:0 --tls-creds ... --name NAME`: the child
/// and its address.
fn export_tls(certs: &Certs, file: &Path, name: &str) -> (ChildGuard, String) {
    let mut child = ChildGuard::terminating(
        Command::new(tidemark_bin())
            .arg("export")
            .arg(file)
            .args(["--listen", "127.0.0.1:0", "--name", name, "--json"])
            .arg("--tls-creds")
            .arg(certs.of("server"))
            .arg("--tls-authz")
            .arg(certs.authz())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tidemark export"),
    );
    let mut line = String::new();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).expect("ready line") == 1 && byte[0] != b'\n' {
        line.push(byte[0] as char);
    }
    let ready: Value = serde_json::from_str(&line).expect("ready JSON");
    assert!(ready["uri"].as_str().unwrap().starts_with("nbds://"));
    (child, ready["address"].as_str().unwrap().to_string())
}

fn nbds(addr: &str, export: &str, certs: &Certs, who: &str) -> String {
    format!("nbds://{addr}/{export}?tls-certificates={}", certs.arg(who))
}

fn nbdinfo_size(uri: &str) -> Output {
    run(Command::new("nbdinfo").args(["--size", uri]), LIMIT).expect("nbdinfo")
}

fn stderr(out: &Output) -> String {
    out.stderr.clone()
}

#[test]
fn peers_read_and_write_over_tls_and_every_stranger_is_refused() {
    let certs = Certs::make();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    Image::create(&disk, SIZE)
        .unwrap()
        .random(&[0..(3 << 20), (5 << 20)..(6 << 20)], 19)
        .unwrap();
    let (_export, addr) = export_tls(&certs, &disk, "disk");
    let admin = nbds(&addr, "disk", &certs, "admin");

    // nbdinfo and nbdcopy (libnbd) read it.
    let out = nbdinfo_size(&admin);
    assert!(out.status.success(), "nbdinfo: {}", stderr(&out));
    assert_eq!(out.stdout.trim(), SIZE.to_string());
    let copied = dir.path().join("copied.img");
    run_ok_within(Command::new("nbdcopy").arg(&admin).arg(&copied), LIMIT).expect("nbdcopy");
    assert_eq!(
        std::fs::read(&copied).unwrap(),
        std::fs::read(&disk).unwrap()
    );

    // python3-libnbd with the same URI.
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri({admin:?})\nprint(h.get_size(), h.pread(4096, 1 << 20).hex())\n"
    );
    let out = run_ok_within(
        Command::new("/usr/bin/python3").args(["-c", &script]),
        LIMIT,
    )
    .expect("python3-libnbd");
    let data = std::fs::read(&disk).unwrap();
    let hex: String = data[1 << 20..(1 << 20) + 4096]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(out.trim(), format!("{SIZE} {hex}"));

    // qemu-img writes a new image into the export, then reads it back, over TLS.
    let source = dir.path().join("source.img");
    Image::create(&source, SIZE)
        .unwrap()
        .random(&[(1 << 20)..(3 << 20), (3 << 20)..(4 << 20)], 7)
        .unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.arg("admin")
    );
    let target = format!("driver=nbd,host={host},port={port},export=disk,tls-creds=tls0");
    run_ok_within(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw"])
            .arg(&source)
            .args(["--object", &object, "--target-image-opts", &target]),
        LIMIT,
    )
    .expect("qemu-img convert into the TLS export");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        std::fs::read(&source).unwrap()
    );
    let back = dir.path().join("back.img");
    run_ok_within(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw", "--object", &object, "--image-opts"])
            .arg(format!("{target},tls-hostname=localhost"))
            .arg(&back),
        LIMIT,
    )
    .expect("qemu-img convert from the TLS export");
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&source).unwrap()
    );

    // Refused: no client certificate, another CA, an identity not in the list, an expired
    // certificate (each fails the TLS handshake or authorization), a scoped identity
    // asking for an export outside its scope (NBD_REP_ERR_POLICY), a plain client.
    for who in ["nocert", "otherca", "stranger", "expired", "scoped"] {
        let out = nbdinfo_size(&nbds(&addr, "disk", &certs, who));
        assert!(!out.status.success(), "{who} was served");
        assert!(out.stdout.is_empty(), "{who} got {:?}", out.stdout);
        if who == "scoped" {
            assert!(stderr(&out).contains("policy"), "{who}: {}", stderr(&out));
        }
    }
    let out = nbdinfo_size(&format!("nbd://{addr}/disk"));
    assert!(!out.status.success(), "a plain client was served");
    assert!(stderr(&out).contains("requires TLS"), "{}", stderr(&out));

    // Our own client honours the same refusals.
    let pulled = dir.path().join("pulled.img");
    let out = run(
        Command::new(tidemark_bin())
            .args([
                "pull",
                "--full",
                &nbds(&addr, "disk", &certs, "otherca"),
                "--into",
            ])
            .arg(&pulled),
        LIMIT,
    )
    .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("UnknownCA"), "{}", stderr(&out));
}

/// Read one option reply header: (option, reply type, payload length).
fn option_reply(s: &mut TcpStream) -> (u32, u32, u32) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    let be = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
    let mut payload = vec![0u8; be(16) as usize];
    s.read_exact(&mut payload).expect("option reply payload");
    (be(8), be(12), be(16))
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut msg = b"IHAVEOPT".to_vec();
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).unwrap();
}

fn greet(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// Whether the server closes the connection (after a TLS alert, say) within the read
/// timeout, sending no NBD reply.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return !got.starts_with(&0x3e889045u32.to_be_bytes()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn forcedtls_answers_tls_reqd_and_drops_export_name_and_garbage_after_starttls() {
    let certs = Certs::make();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    Image::create(&disk, SIZE).unwrap();
    let (_export, addr) = export_tls(&certs, &disk, "disk");
    const LIST: u32 = 3;
    const STARTTLS: u32 = 5;
    const GO: u32 = 7;
    const EXPORT_NAME: u32 = 1;
    const ERR_TLS_REQD: u32 = (1 << 31) + 5;

    let mut s = greet(&addr);
    send_option(&mut s, LIST, &[]);
    assert_eq!(
        option_reply(&mut s),
        (LIST, ERR_TLS_REQD, option_reply_len())
    );
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, GO, &go);
    assert_eq!(option_reply(&mut s).1, ERR_TLS_REQD);
    send_option(&mut s, EXPORT_NAME, b"disk");
    assert!(closed(&mut s), "EXPORT_NAME before STARTTLS must close");

    // STARTTLS is acknowledged; garbage instead of a ClientHello ends the connection.
    let mut s = greet(&addr);
    send_option(&mut s, STARTTLS, &[]);
    assert_eq!(option_reply(&mut s), (STARTTLS, 1, 0));
    s.write_all(b"IHAVEOPT this is not a TLS ClientHello\r\n\r\n")
        .unwrap();
    assert!(closed(&mut s), "garbage after STARTTLS must close");

    // The server still serves a proper client afterwards.
    let out = nbdinfo_size(&nbds(&addr, "disk", &certs, "admin"));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The length of the server's NBD_REP_ERR_TLS_REQD message.
fn option_reply_len() -> u32 {
    b"this server requires TLS: send NBD_OPT_STARTTLS first".len() as u32
}

#[test]
fn a_scoped_identity_reads_only_backup_exports() {
    let certs = Certs::make();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    Image::create(&disk, SIZE)
        .unwrap()
        .random(&[0..4096, 8192..(1 << 20)], 3)
        .unwrap();
    let (_export, addr) = export_tls(&certs, &disk, "vm@backup");
    let out = nbdinfo_size(&nbds(&addr, "vm@backup", &certs, "scoped"));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = nbdinfo_size(&nbds(&addr, "vm@backup", &certs, "stranger"));
    assert!(!out.status.success());
}

#[test]
fn tidemark_pulls_from_qemu_nbd_over_tls() {
    let certs = Certs::make();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    Image::create(&disk, SIZE)
        .unwrap()
        .random(&[(2 << 20)..(4 << 20), (4 << 20)..(5 << 20)], 11)
        .unwrap();
    let port = free_port();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        certs.arg("server")
    );
    let _server = ChildGuard::spawn(
        Command::new("qemu-nbd")
            .args([
                "--object",
                &object,
                "--tls-creds",
                "tls0",
                "-f",
                "raw",
                "-x",
                "disk",
            ])
            .args(["-b", "127.0.0.1", "-p", &port.to_string(), "-e", "4", "-t"])
            .arg(&disk)
            .stdout(Stdio::null()),
    )
    .unwrap();
    wait_for_port(port);
    let uri = nbds(&format!("127.0.0.1:{port}"), "disk", &certs, "admin");
    let pulled = dir.path().join("pulled.img");
    run_ok_within(
        Command::new(tidemark_bin())
            .args(["pull", "--full", &uri, "--into"])
            .arg(&pulled),
        LIMIT,
    )
    .expect("tidemark pull from qemu-nbd over TLS");
    assert_eq!(
        std::fs::read(&pulled).unwrap(),
        std::fs::read(&disk).unwrap()
    );
    // qemu-nbd refuses a certificate of another CA; our client reports it.
    let out = run(
        Command::new(tidemark_bin())
            .args(["pull", "--full"])
            .arg(nbds(
                &format!("127.0.0.1:{port}"),
                "disk",
                &certs,
                "otherca",
            ))
            .arg("--into")
            .arg(dir.path().join("refused.img")),
        LIMIT,
    )
    .unwrap();
    assert!(!out.status.success());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_and_an_incremental_pull_over_tls_restore_to_the_truth() {
    let certs = Certs::make();
    let listen = format!("127.0.0.1:{}", free_port());
    let creds = certs.arg("server");
    let daemon = Daemon::start_with(&["--listen", &listen, "--tls-creds", &creds]);
    let size = 8usize << 20;
    daemon.create_volume("v", size as u64);
    let mut model = Model::new(size);
    // The Unix socket stays plain; qemu-io writes through it.
    qemu_io(
        &daemon.uri("v"),
        &[model.write(0, 1 << 20, 3), model.write(5 << 20, 4096, 9)],
    );
    let backup = daemon.cli_json(&["backup", "begin", "v", "--checkpoint", "c1"]);
    let tcp = backup["volumes"][0]["uri"]["tcp"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(tcp.starts_with("nbds://"), "{tcp}");
    let with_certs = format!("{tcp}?tls-certificates={}", certs.arg("admin"));
    let image = daemon.dir.path().join("restored.img");
    run_ok_within(
        Command::new(tidemark_bin())
            .args(["pull", "--full", &with_certs, "--into"])
            .arg(&image),
        LIMIT,
    )
    .expect("full pull over TLS");
    model.assert_equals_file(&image, "full pull over TLS");
    daemon.cli_json(&["backup", "end", "v"]);

    qemu_io(
        &daemon.uri("v"),
        &[model.write(2 << 20, 65536, 5), model.write(7 << 20, 512, 1)],
    );
    let backup = daemon.cli_json(&[
        "backup",
        "begin",
        "v",
        "--incremental",
        "c1",
        "--checkpoint",
        "c2",
    ]);
    let tcp = backup["volumes"][0]["uri"]["tcp"]
        .as_str()
        .unwrap()
        .to_string();
    let with_certs = format!("{tcp}?tls-certificates={}", certs.arg("admin"));
    run_ok_within(
        Command::new(tidemark_bin())
            .args(["pull", "--bitmap", "c1", &with_certs, "--into"])
            .arg(&image),
        LIMIT,
    )
    .expect("incremental pull over TLS");
    model.assert_equals_file(&image, "incremental pull over TLS");
    daemon.cli_json(&["backup", "end", "v"]);

    // A plain client on the TLS port gets nothing.
    let out = nbdinfo_size(&format!("nbd://{listen}/v"));
    assert!(!out.status.success());
}

#[test]
fn serve_listen_without_tls_refuses_to_start_and_insecure_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        Command::new(tidemark_bin())
            .arg("serve")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--listen", "127.0.0.1:0"]),
        LIMIT,
    )
    .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("without TLS"), "{}", stderr(&out));
    assert!(!dir.path().join("state/control.sock").exists());

    let file = dir.path().join("disk.img");
    Image::create(&file, SIZE).unwrap();
    let out = run(
        Command::new(tidemark_bin())
            .arg("export")
            .arg(&file)
            .args(["--listen", "127.0.0.1:0"]),
        LIMIT,
    )
    .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("without TLS"), "{}", stderr(&out));

    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start_with(&["--listen", &listen, "--listen-insecure"]);
    let info = daemon.cli_json(&["info"]);
    assert_eq!(info["listen_insecure"], Value::Bool(true), "{info}");
    assert!(daemon.log().contains("without TLS"));
}

/// tidemark's own TLS record layer: large and unaligned reads (records straight from the
/// file, several MiB per reply, with simple and structured replies) and writes (records
/// opened by the request reader) come out intact through python3-libnbd (GnuTLS).
#[test]
fn large_and_unaligned_requests_cross_the_tls_record_layer_intact() {
    let certs = Certs::make();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let size = 40u64 << 20;
    Image::create(&disk, size)
        .unwrap()
        .random(&[0..size / 2, size / 2..size], 23)
        .unwrap();
    let (_export, addr) = export_tls(&certs, &disk, "disk");
    let admin = nbds(&addr, "disk", &certs, "admin");
    let script = format!(
        r#"import nbd, os
disk = open({disk:?}, "rb")
def truth(n, off):
    disk.seek(off)
    return disk.read(n)
for structured in (True, False):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.set_uri_allow_local_file(True)
    h.connect_uri({admin:?})
    for n, off in ((1, 0), (16384, 16383), (3 * 1048576 + 12345, 777), (32 << 20, 8 << 20)):
        assert h.pread(n, off) == truth(n, off), (structured, n, off)
    data = os.urandom(5 * 1048576 + 3)
    h.pwrite(data, 4097)
    h.flush()
    assert h.pread(len(data), 4097) == data, structured
    assert truth(len(data), 4097) == data, structured
    h.shutdown()
print("intact")
"#,
        disk = disk.to_str().unwrap()
    );
    let out = run_ok_within(
        Command::new("/usr/bin/python3").args(["-c", &script]),
        LIMIT,
    )
    .expect("python3-libnbd");
    assert_eq!(out.trim(), "intact");
}
