//! tidemark's NBD client against real servers: qemu-nbd exporting a qcow2 persistent dirty
//! bitmap with `-B` (the libvirt pull-backup shape), nbdkit's file plugin (with and
//! without structured replies), and `tidemark export` with several connections.

use std::process::Command;

use anyhow::Result;
use tidemark_nbd::client::{Client, ClientOptions};
use tidemark_nbd::export::{Extent, STATE_DIRTY};
use tidemark_nbd::proto::HeaderMode;
use tidemark_nbd::uri::NbdUri;
use tidemark_tests::export::export;
use tidemark_tests::image::pattern_image;
use tidemark_tests::peers::serve;
use tidemark_tests::{pattern, run_ok};

const MIB: u64 = 1 << 20;

fn unix_uri(socket: &std::path::Path, name: &str) -> Result<NbdUri> {
    Ok(format!("nbd+unix:///{name}?socket={}", socket.display()).parse()?)
}

#[tokio::test]
async fn reads_a_qcow2_dirty_bitmap_from_qemu_nbd() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("vm.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("16M"),
    )?;
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x11 0 4M"])
            .arg(&img),
    )?;
    // The checkpoint: writes after it are dirty in "ck".
    run_ok(
        Command::new("qemu-img")
            .args(["bitmap", "--add", "-g", "64K"])
            .arg(&img)
            .arg("ck"),
    )?;
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x42 1M 128k",
                "-c",
                "write -P 0x43 9M 64k",
            ])
            .arg(&img),
    )?;

    let socket = dir.path().join("qemu-nbd.sock");
    let _server = serve(
        Command::new("qemu-nbd")
            .args(["-r", "-f", "qcow2", "-x", "vm", "-B", "ck", "-k"])
            .arg(&socket)
            .arg(&img),
        &socket,
        std::time::Duration::from_secs(20),
    )?;
    let options = ClientOptions {
        meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:ck".into()],
        ..ClientOptions::default()
    };
    let client = Client::connect(&unix_uri(&socket, "vm")?, options).await?;
    assert_eq!(client.size(), 16 * MIB);
    assert!(client.is_read_only());
    assert!(client.info().mode >= HeaderMode::Structured);
    let dirty = client
        .block_status("qemu:dirty-bitmap:ck", 0, client.size())
        .await?;
    assert_eq!(
        dirty,
        vec![
            Extent {
                length: MIB,
                flags: 0
            },
            Extent {
                length: 128 * 1024,
                flags: STATE_DIRTY
            },
            Extent {
                length: 8 * MIB - 128 * 1024,
                flags: 0
            },
            Extent {
                length: 64 * 1024,
                flags: STATE_DIRTY
            },
            Extent {
                length: 7 * MIB - 64 * 1024,
                flags: 0
            },
        ]
    );
    // Read only what changed, as a pull client does.
    let changed = client.read_vec(MIB, 128 * 1024).await?;
    assert!(changed.iter().all(|&b| b == 0x42));
    let changed = client.read_vec(9 * MIB, 64 * 1024).await?;
    assert!(changed.iter().all(|&b| b == 0x43));
    let alloc = client
        .block_status("base:allocation", 0, client.size())
        .await?;
    assert_eq!(alloc.iter().map(|e| e.length).sum::<u64>(), 16 * MIB);
    assert_eq!(
        alloc[0].flags & 1,
        0,
        "the first 4 MiB are allocated: {alloc:?}"
    );
    client.disconnect().await;
    Ok(())
}

async fn exercise_writable(client: &Client) -> Result<()> {
    let data: Vec<u8> = (0..3 * MIB).map(pattern).collect();
    client.write(512 * 1024, &data, false).await?;
    client.flush().await?;
    let mut back = vec![0u8; data.len()];
    client.read(512 * 1024, &mut back).await?;
    assert!(back == data, "read-back differs");
    client.write_zeroes(MIB, 64 * 1024, false, false).await?;
    assert!(client
        .read_vec(MIB, 64 * 1024)
        .await?
        .iter()
        .all(|&b| b == 0));
    client.trim(2 * MIB, MIB).await?;
    let alloc = client
        .block_status("base:allocation", 0, client.size())
        .await?;
    assert_eq!(alloc.iter().map(|e| e.length).sum::<u64>(), client.size());
    Ok(())
}

#[tokio::test]
async fn talks_to_nbdkit_with_and_without_structured_replies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("disk.img");
    pattern_image(&img, 8 * MIB, &[])?;
    let socket = dir.path().join("nbdkit.sock");
    let _server = serve(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .arg("file")
            .arg(format!("file={}", img.display())),
        &socket,
        std::time::Duration::from_secs(20),
    )?;
    let client = Client::connect(&unix_uri(&socket, "")?, ClientOptions::default()).await?;
    assert!(client.info().mode >= HeaderMode::Structured);
    exercise_writable(&client).await?;
    client.disconnect().await;

    // Simple replies only: block status is not available, I/O still works.
    let options = ClientOptions {
        extended_headers: false,
        structured_replies: false,
        ..ClientOptions::default()
    };
    let simple = Client::connect(&unix_uri(&socket, "")?, options).await?;
    assert_eq!(simple.info().mode, HeaderMode::Simple);
    assert!(simple
        .block_status("base:allocation", 0, MIB)
        .await
        .is_err());
    let data: Vec<u8> = (0..MIB).map(|o| pattern(o + 7)).collect();
    simple.write(4 * MIB, &data, true).await?;
    assert!(simple.read_vec(4 * MIB, MIB as usize).await? == data);
    simple.disconnect().await;
    Ok(())
}

#[tokio::test]
async fn uses_several_connections_to_tidemark_export() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("disk.img");
    pattern_image(&img, 16 * MIB, &[(0, 4 * MIB)])?;
    let e = export(dir.path(), &img, &["--name", "d"])?;
    let options = ClientOptions {
        connections: 4,
        depth: 16,
        ..ClientOptions::default()
    };
    let client = Client::connect(&e.uri.parse()?, options).await?;
    assert!(client.can_multi_conn());
    assert_eq!(client.connections(), 4);
    assert_eq!(client.info().mode, HeaderMode::Extended);
    exercise_writable(&client).await?;
    // Many reads in flight over the four connections.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let c = client.clone();
        tasks.spawn(async move { (i, c.read_vec(8 * MIB + i * 65536, 65536).await) });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, data) = done?;
        assert!(data?.iter().all(|&b| b == 0), "block {i}");
    }
    client.disconnect().await;
    Ok(())
}
