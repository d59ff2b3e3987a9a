//! Writes the committed seed corpora of the formats fuzz targets: small valid files of each
//! format (and a few near-misses), so the fuzzers start from the interesting shapes.
//!
//! Usage: cargo run -p tidemark-formats --example fuzz_seeds -- fuzz/corpus

use std::fs;
use std::path::{Path, PathBuf};

use tidemark_formats::bitmap::{self, BitmapHeader, BitmapState};
use tidemark_formats::cow::{CowIndexRecord, CowStoreHeader};
use tidemark_formats::delta::{CheckpointRef, DeltaHeader, DeltaWriter};
use tidemark_formats::manifest::{CheckpointChain, CheckpointEntry, TrackingMode, VolumeManifest};
use tidemark_formats::Uuid;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    bitmap_seeds(&root.join("bitmap_file"))?;
    delta_seeds(&root.join("delta_file"))?;
    cow_seeds(&root.join("cow_index"))?;
    manifest_seeds(&root.join("manifest"))?;
    roundtrip_seeds(&root.join("delta_roundtrip"))?;
    println!("seed corpora written under {}", root.display());
    Ok(())
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)?;
    Ok(())
}

fn bitmap_bytes(h: &BitmapHeader, words: &[u64]) -> Vec<u8> {
    let mut h = h.clone();
    if h.state == BitmapState::Clean {
        h.payload_crc = bitmap::words_crc(words);
    }
    let mut out = h.encode();
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

fn bitmap_seeds(dir: &Path) -> Result<()> {
    let u = Uuid::from_u128(0x7469_6465_6d61_726b);
    let h = BitmapHeader::new(u, "daily-1", 65536, 10 << 20, 1)?;
    let mut words = vec![0u64; h.word_count()];
    bitmap::set_dirty_range(&mut words, 3..40);
    bitmap::set_dirty(&mut words, h.block_count() - 1);
    put(dir, "clean", &bitmap_bytes(&h, &words))?;
    let mut in_use = h.clone();
    in_use.state = BitmapState::InUse;
    put(dir, "in_use", &bitmap_bytes(&in_use, &words))?;
    let mut bad = h.clone();
    bad.state = BitmapState::Inconsistent;
    put(dir, "inconsistent", &bitmap_bytes(&bad, &[0; 3]))?;
    let tiny = BitmapHeader::new(u, "x", 4096, 4096, 0)?;
    put(dir, "one_block", &bitmap_bytes(&tiny, &[1]))?;
    Ok(())
}

fn delta_header(incremental: bool) -> DeltaHeader {
    DeltaHeader {
        volume_uuid: Uuid::from_u128(0x7464),
        volume_size: 1 << 20,
        granularity: 65536,
        from: incremental.then(|| CheckpointRef {
            name: "mon".into(),
            generation: 1,
        }),
        to: CheckpointRef {
            name: "tue".into(),
            generation: 2,
        },
        created_unix: 1_700_000_000,
    }
}

fn delta_seeds(dir: &Path) -> Result<()> {
    let mut w = DeltaWriter::new(Vec::new(), &delta_header(true), 3)?;
    w.write_data(0, &b"compressible ".repeat(40))?;
    w.write_data(
        4096,
        &(0..200u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )?;
    w.write_zero(65536, 65536)?;
    w.write_data((1 << 20) - 10, &[0xab; 10])?;
    put(dir, "incremental", &w.finish()?)?;
    let w = DeltaWriter::new(Vec::new(), &delta_header(false), 1)?;
    put(dir, "empty_full", &w.finish()?)?;
    let mut w = DeltaWriter::new(Vec::new(), &delta_header(false), 1)?;
    w.write_zero(0, 1 << 20)?;
    put(dir, "all_zero", &w.finish()?)?;
    Ok(())
}

fn cow_seeds(dir: &Path) -> Result<()> {
    let h = CowStoreHeader::new(Uuid::from_u128(1), Uuid::from_u128(2), 1 << 30, 65536, 0)?;
    let mut bytes = h.encode();
    for (i, chunk) in [5u64, 0, 16383, 77].iter().enumerate() {
        let r = CowIndexRecord {
            chunk: *chunk,
            store_offset: 4096 + i as u64 * 65536,
            data_crc: 0x1234,
        };
        bytes.extend_from_slice(&r.encode());
    }
    put(dir, "store", &bytes)?;
    put(dir, "header_only", &h.encode())?;
    Ok(())
}

fn manifest_seeds(dir: &Path) -> Result<()> {
    let m = VolumeManifest {
        name: "db-1".into(),
        uuid: Uuid::from_u128(42),
        backing: "/dev/vdb".into(),
        size: 10 << 30,
        granularity: 65536,
        tracking: TrackingMode::Durable,
        created_unix: 1_700_000_000,
    };
    put(dir, "volume", &m.to_json())?;
    let c = CheckpointChain {
        chain_uuid: Uuid::from_u128(7),
        checkpoints: vec![
            CheckpointEntry {
                name: "mon".into(),
                generation: 1,
                created_unix: 10,
                bitmap_file: "mon.bitmap".into(),
                confirmed: true,
            },
            CheckpointEntry {
                name: "tue".into(),
                generation: 2,
                created_unix: 20,
                bitmap_file: "tue.bitmap".into(),
                confirmed: false,
            },
        ],
        next_generation: None,
    };
    put(dir, "chain", &c.to_json())?;
    put(
        dir,
        "empty_chain",
        &CheckpointChain {
            chain_uuid: Uuid::nil(),
            checkpoints: vec![],
            next_generation: None,
        }
        .to_json(),
    )?;
    Ok(())
}

fn roundtrip_seeds(dir: &Path) -> Result<()> {
    // level byte, then ops: kind, gap u16 LE, length-1 u16 LE.
    put(
        dir,
        "mixed",
        &[
            1, 0, 0, 0, 255, 15, 1, 16, 0, 0, 64, 2, 0, 0, 0, 3, 0, 1, 0, 0, 16,
        ],
    )?;
    put(dir, "one_zero", &[0, 1, 0, 0, 255, 255])?;
    put(dir, "random_data", &[2, 2, 0, 0, 255, 63, 6, 0, 2, 255, 31])?;
    Ok(())
}
