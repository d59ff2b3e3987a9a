//! Criterion benchmarks of the on-disk formats' hot paths.
//!
//! - `delta_encode` / `delta_decode`: MB/s of a 64 MiB volume image written as a delta and
//!   read back, at zstd levels 1 and 3, on compressible (log-like text) and random data;
//!   `zstd_bulk` runs plain zstd on the same 4 MiB blocks as the peer, so the ratio shows
//!   what the format (framing, two crc32s per record, index) costs over bare compression.
//! - `dirty_runs`: a 1 TiB volume at 64 KiB granularity (16 Mi bits) with 1% of the blocks
//!   dirty in scattered runs; target under 5 ms. `bit_by_bit` is the naive peer.
//!
//! Run: cargo bench -p tidemark-benches --bench formats

use std::hint::black_box;
use std::io::Cursor;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use tidemark_formats::bitmap::{self, dirty_runs};
use tidemark_formats::delta::{
    CheckpointRef, DeltaHeader, DeltaReader, DeltaWriter, MAX_RECORD_DATA,
};
use tidemark_formats::Uuid;

const IMAGE: usize = 64 << 20;

fn compressible(len: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(1);
    let mut out = Vec::with_capacity(len + 200);
    let paths = [
        "/api/v1/items",
        "/api/v1/users",
        "/static/app.js",
        "/healthz",
    ];
    while out.len() < len {
        let line = format!(
            "2026-11-22T04:{:02}:{:02}.{:03}Z INFO req={:08x} path={}/{} status={} bytes={}\n",
            rng.gen_range(0..60),
            rng.gen_range(0..60),
            rng.gen_range(0..1000),
            rng.gen::<u32>(),
            paths[rng.gen_range(0..paths.len())],
            rng.gen_range(0..5000),
            [200, 200, 200, 304, 404][rng.gen_range(0..5)],
            rng.gen_range(0..100_000),
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(len);
    out
}

fn random(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    SmallRng::seed_from_u64(2).fill_bytes(&mut out);
    out
}

fn header() -> DeltaHeader {
    DeltaHeader {
        volume_uuid: Uuid::from_u128(1),
        volume_size: IMAGE as u64,
        granularity: 65536,
        from: None,
        to: CheckpointRef {
            name: "bench".into(),
            generation: 1,
        },
        created_unix: 0,
    }
}

/// Encodes `data` as one delta into `out` (cleared first; reused so that page faults of a
/// fresh 64 MiB buffer are not what is measured).
fn encode(data: &[u8], level: i32, out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut w = DeltaWriter::new(&mut *out, &header(), level).expect("valid header");
    w.write_data(0, data).expect("extent inside the volume");
    w.finish().expect("in-memory write");
    out.len()
}

fn decode(file: &[u8]) -> u64 {
    let mut r = DeltaReader::open(Cursor::new(file), Path::new("bench.delta")).expect("valid");
    let mut out = Vec::with_capacity(MAX_RECORD_DATA);
    let mut total = 0u64;
    for i in 0..r.extents().len() {
        r.read_extent_at(i, &mut out).expect("valid extent");
        total += out.len() as u64;
    }
    total
}

fn delta(c: &mut Criterion) {
    let inputs = [
        ("compressible", compressible(IMAGE)),
        ("random", random(IMAGE)),
    ];
    for level in [1, 3] {
        let mut enc = c.benchmark_group(format!("delta_encode/zstd{level}"));
        enc.throughput(Throughput::Bytes(IMAGE as u64));
        for (name, data) in &inputs {
            let mut out = Vec::with_capacity(data.len() + (1 << 20));
            enc.bench_with_input(BenchmarkId::new("tidemark", name), data, |b, d| {
                b.iter(|| black_box(encode(d, level, &mut out)))
            });
            // The peer: bare zstd on the same 4 MiB blocks into one reused buffer.
            let mut z = zstd::bulk::Compressor::new(level).expect("valid level");
            let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(MAX_RECORD_DATA));
            enc.bench_with_input(BenchmarkId::new("zstd_bulk", name), data, |b, d| {
                b.iter(|| {
                    d.chunks(MAX_RECORD_DATA)
                        .map(|chunk| {
                            frame.clear();
                            z.compress_to_buffer(chunk, &mut frame).expect("compress")
                        })
                        .sum::<usize>()
                })
            });
        }
        enc.finish();

        let mut dec = c.benchmark_group(format!("delta_decode/zstd{level}"));
        dec.throughput(Throughput::Bytes(IMAGE as u64));
        for (name, data) in &inputs {
            let mut file = Vec::new();
            encode(data, level, &mut file);
            println!(
                "delta {name} zstd{level}: {} bytes -> {} bytes ({:.2}x)",
                data.len(),
                file.len(),
                data.len() as f64 / file.len() as f64
            );
            dec.bench_with_input(BenchmarkId::new("tidemark", name), &file, |b, f| {
                b.iter(|| black_box(decode(f)))
            });
            let frames: Vec<Vec<u8>> = data
                .chunks(MAX_RECORD_DATA)
                .map(|chunk| zstd::bulk::compress(chunk, level).expect("compress"))
                .collect();
            let mut z = zstd::bulk::Decompressor::new().expect("decompressor");
            dec.bench_with_input(BenchmarkId::new("zstd_bulk", name), &frames, |b, fr| {
                let mut out = Vec::with_capacity(MAX_RECORD_DATA);
                b.iter(|| {
                    fr.iter()
                        .map(|f| {
                            out.clear();
                            z.decompress_to_buffer(f, &mut out).expect("decompress")
                        })
                        .sum::<usize>()
                })
            });
        }
        dec.finish();
    }
}

/// 1 TiB at 64 KiB = 16 Mi blocks; runs of 1..=64 blocks at random places until 1% is set.
fn one_percent_bitmap() -> (Vec<u64>, u64) {
    let blocks: u64 = (1u64 << 40) / 65536;
    let mut words = vec![0u64; (blocks / 64) as usize];
    let mut rng = SmallRng::seed_from_u64(3);
    let target = blocks / 100;
    let mut set = 0u64;
    while set < target {
        let len = rng.gen_range(1..=64);
        let start = rng.gen_range(0..blocks - len);
        bitmap::set_dirty_range(&mut words, start..start + len);
        set += len;
    }
    (words, blocks)
}

fn runs(c: &mut Criterion) {
    let (words, blocks) = one_percent_bitmap();
    let dirty: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    println!(
        "dirty_runs input: {blocks} blocks, {dirty} dirty ({:.2}%), {} runs",
        dirty as f64 * 100.0 / blocks as f64,
        dirty_runs(&words, blocks).count()
    );
    let mut g = c.benchmark_group("dirty_runs/1TiB_64KiB_1pct");
    g.bench_function("tidemark", |b| {
        b.iter(|| {
            dirty_runs(black_box(&words), blocks)
                .map(|r| r.end - r.start)
                .sum::<u64>()
        })
    });
    g.bench_function("bit_by_bit", |b| {
        b.iter(|| {
            let w = black_box(&words);
            let mut total = 0u64;
            let mut run_start = None;
            for i in 0..blocks {
                let set = w[(i / 64) as usize] >> (i % 64) & 1 == 1;
                match (set, run_start) {
                    (true, None) => run_start = Some(i),
                    (false, Some(s)) => {
                        total += i - s;
                        run_start = None;
                    }
                    _ => {}
                }
            }
            total + run_start.map_or(0, |s| blocks - s)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = delta, runs
}
criterion_main!(benches);
