//! Moving a [`Plan`]'s bytes: many reads in flight on several connections, one writer.
//!
//! ```text
//!   connection 1 ─┬─ task ─┐                         ┌──────────── writer thread ───────────┐
//!                 ├─ task ─┤  (index, span, buffer)  │ reorder by index -> Sink::write/zero │
//!   connection 2 ─┼─ task ─┼────────────────────────>│ buffer back to the pool, permit drop │
//!                 └─ task ─┘                         └──────────────────────────────────────┘
//! ```
//!
//! Every request of the plan gets an index. A task first takes a permit of the window
//! semaphore, then the next index, then reads. The writer applies requests in index order,
//! so sinks see ascending offsets (a delta file needs them in order) and a pull stopped
//! half way has written a prefix. The window bounds memory (`window * request_size`) and the
//! reorder buffer; it cannot deadlock because the lowest unwritten index always holds a
//! permit (permits are taken before indices).
//!
//! A read that returns only zero bytes is handed to the sink as a zero range, so data the
//! server did not report as a hole still ends up as one in a sparse image.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use indicatif::ProgressBar;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::plan::{Action, Plan, Span};
use super::sink::Sink;
use super::source::Reader;

/// How hard to drive the transfer.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Reads in flight on each connection.
    pub queue_depth: usize,
    /// Largest single read, in bytes.
    pub request_size: u64,
}

/// What the transfer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Bytes read from the export.
    pub read: u64,
    /// Bytes the sinks were asked to zero (planned zero spans and reads that were all zero).
    pub zeroed: u64,
    /// Read requests issued.
    pub requests: u64,
}

struct Done {
    index: usize,
    span: Span,
    buffer: Option<Vec<u8>>,
    _permit: OwnedSemaphorePermit,
}

struct Shared {
    requests: Vec<Span>,
    next: AtomicUsize,
    window: Arc<Semaphore>,
    pool: Mutex<Vec<Vec<u8>>>,
    failed: AtomicBool,
}

impl Shared {
    fn take_buffer(&self, length: usize) -> Vec<u8> {
        let mut buf = self
            .pool
            .lock()
            .map(|mut p| p.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        buf.resize(length, 0);
        buf
    }

    fn give_buffer(&self, buf: Vec<u8>) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.push(buf);
        }
    }
}

/// Copy `plan` from `readers` into `sink`; returns what moved once the sink has every
/// byte (the caller finishes the sink).
pub async fn run<R: Reader>(
    readers: &[Arc<R>],
    plan: &Plan,
    sink: &mut (dyn Sink + Send),
    shape: Shape,
    progress: &ProgressBar,
) -> anyhow::Result<Moved> {
    let queue_depth = shape.queue_depth.max(1);
    let tasks = readers.len().max(1) * queue_depth;
    let window = tasks * 2;
    let requests: Vec<Span> = plan.requests(shape.request_size).collect();
    let total = requests.len();
    let shared = Arc::new(Shared {
        requests,
        next: AtomicUsize::new(0),
        window: Arc::new(Semaphore::new(window)),
        pool: Mutex::new(Vec::with_capacity(window)),
        failed: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel::<Done>(window);

    let mut readers_done = tokio::task::JoinSet::new();
    for reader in readers {
        for _ in 0..queue_depth {
            let reader = Arc::clone(reader);
            let shared = Arc::clone(&shared);
            let tx = tx.clone();
            readers_done.spawn(async move { read_loop(&*reader, &shared, tx).await });
        }
    }
    drop(tx);

    let writer_shared = Arc::clone(&shared);
    let written =
        tokio::task::block_in_place(|| write_loop(rx, &writer_shared, sink, total, progress));
    if written.is_err() {
        shared.failed.store(true, Ordering::Relaxed);
    }
    let mut moved = Moved::default();
    let mut read_error = None;
    while let Some(joined) = readers_done.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                read_error.get_or_insert(err);
            }
            Err(err) => {
                read_error.get_or_insert(anyhow!("a read task failed: {err}"));
            }
        }
    }
    if let Some(err) = read_error {
        return Err(err);
    }
    let (read, zeroed) = written?;
    moved.read = read;
    moved.zeroed = zeroed;
    moved.requests = shared
        .requests
        .iter()
        .filter(|s| s.action == Action::Copy)
        .count() as u64;
    Ok(moved)
}

async fn read_loop<R: Reader>(
    reader: &R,
    shared: &Shared,
    tx: mpsc::Sender<Done>,
) -> anyhow::Result<()> {
    loop {
        if shared.failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let permit = Arc::clone(&shared.window)
            .acquire_owned()
            .await
            .context("the transfer window closed")?;
        let index = shared.next.fetch_add(1, Ordering::Relaxed);
        let Some(&span) = shared.requests.get(index) else {
            return Ok(());
        };
        let buffer = match span.action {
            Action::Zero => None,
            Action::Copy => {
                let buf = shared.take_buffer(span.length as usize);
                match reader.read_into(span.offset, buf).await {
                    Ok(buf) if buf.len() as u64 == span.length => Some(buf),
                    Ok(buf) => {
                        shared.failed.store(true, Ordering::Relaxed);
                        anyhow::bail!(
                            "reading {} bytes at offset {} from the export returned {} bytes",
                            span.length,
                            span.offset,
                            buf.len()
                        );
                    }
                    Err(err) => {
                        shared.failed.store(true, Ordering::Relaxed);
                        return Err(err.context(format!(
                            "reading {} bytes at offset {} from the export",
                            span.length, span.offset
                        )));
                    }
                }
            }
        };
        if tx
            .send(Done {
                index,
                span,
                buffer,
                _permit: permit,
            })
            .await
            .is_err()
        {
            // The writer stopped (it failed); its error is the one to report.
            return Ok(());
        }
    }
}

fn write_loop(
    mut rx: mpsc::Receiver<Done>,
    shared: &Shared,
    sink: &mut (dyn Sink + Send),
    total: usize,
    progress: &ProgressBar,
) -> anyhow::Result<(u64, u64)> {
    let mut pending: BTreeMap<usize, Done> = BTreeMap::new();
    let mut next = 0;
    let (mut read, mut zeroed) = (0u64, 0u64);
    while next < total {
        let Some(done) = rx.blocking_recv() else {
            // Every reader stopped early: one of them failed and reports why.
            return Ok((read, zeroed));
        };
        pending.insert(done.index, done);
        while let Some(done) = pending.remove(&next) {
            let Span { offset, length, .. } = done.span;
            match done.buffer {
                Some(buf) if buf.iter().any(|&b| b != 0) => {
                    sink.write(offset, &buf)?;
                    read += length;
                    shared.give_buffer(buf);
                }
                Some(buf) => {
                    sink.zero(offset, length)?;
                    read += length;
                    zeroed += length;
                    shared.give_buffer(buf);
                }
                None => {
                    sink.zero(offset, length)?;
                    zeroed += length;
                }
            }
            progress.inc(length);
            next += 1;
        }
    }
    Ok((read, zeroed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::plan::{ExtentMap, Plan};
    use crate::pull::sink::MemorySink;
    use proptest::prelude::*;
    use std::time::Duration;
    use tidemark_nbd::export::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};

    /// An in-memory export that answers reads after a short pseudo-random delay, so
    /// completions arrive out of order.
    struct SlowDisk {
        data: Vec<u8>,
        fail_at: Option<u64>,
    }

    impl Reader for SlowDisk {
        async fn read_into(&self, offset: u64, mut buf: Vec<u8>) -> anyhow::Result<Vec<u8>> {
            let jitter = (offset.wrapping_mul(2654435761) >> 7) % 3;
            tokio::time::sleep(Duration::from_micros(jitter * 200)).await;
            if self.fail_at == Some(offset) {
                anyhow::bail!("injected read error");
            }
            let range = offset as usize..offset as usize + buf.len();
            buf.copy_from_slice(&self.data[range]);
            Ok(buf)
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    fn runs(size: u64, pieces: &[(u64, u32)]) -> Vec<crate::pull::plan::Run> {
        let mut m = ExtentMap::new("t", size);
        for &(l, f) in pieces {
            m.push(l, f).unwrap();
        }
        m.finish().unwrap()
    }

    #[test]
    fn read_error_fails_the_transfer_with_its_offset() {
        let disk = Arc::new(SlowDisk {
            data: vec![7; 4096],
            fail_at: Some(1024),
        });
        let plan = Plan::full(&runs(4096, &[(4096, 0)]));
        let mut sink = MemorySink::new(vec![0; 4096]);
        let shape = Shape {
            queue_depth: 4,
            request_size: 512,
        };
        let err = runtime()
            .block_on(run(
                &[disk],
                &plan,
                &mut sink,
                shape,
                &ProgressBar::hidden(),
            ))
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("at offset 1024"), "{text}");
        assert!(text.contains("injected read error"), "{text}");
    }

    #[test]
    fn all_zero_reads_become_zero_ranges() {
        let mut data = vec![0u8; 4096];
        data[3000] = 1;
        let disk = Arc::new(SlowDisk {
            data,
            fail_at: None,
        });
        let plan = Plan::full(&runs(4096, &[(4096, 0)]));
        let mut sink = MemorySink::new(vec![0xff; 4096]);
        let shape = Shape {
            queue_depth: 2,
            request_size: 1024,
        };
        let moved = runtime()
            .block_on(run(
                &[disk],
                &plan,
                &mut sink,
                shape,
                &ProgressBar::hidden(),
            ))
            .unwrap();
        assert_eq!(
            moved,
            Moved {
                read: 4096,
                zeroed: 3072,
                requests: 4
            }
        );
        assert_eq!(sink.zeroed, vec![(0, 1024), (1024, 1024), (3072, 1024)]);
        assert_eq!(sink.writes, vec![(2048, 1024)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn incremental_transfer_equals_the_model(
            seed in any::<u64>(),
            dirty in prop::collection::vec((1u64..20_000, 0u32..=1), 1..12),
            alloc in prop::collection::vec((1u64..30_000, 0u32..=1), 1..8),
            connections in 1usize..4,
            queue_depth in 1usize..5,
            request_size in 1u64..9000,
        ) {
            const SIZE: u64 = 65_536;
            let mut rng_state = seed | 1;
            let mut source = vec![0u8; SIZE as usize];
            for b in source.iter_mut() {
                rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
                *b = rng_state as u8;
            }
            let mut alloc_pieces: Vec<(u64, u32)> =
                alloc.iter().map(|&(l, z)| (l, if z == 1 { STATE_HOLE | STATE_ZERO } else { 0 })).collect();
            alloc_pieces.push((SIZE, 0));
            let alloc = runs(SIZE, &alloc_pieces);
            // Zero ranges of the allocation map really read as zero.
            for run in alloc.iter().filter(|r| r.flags & STATE_ZERO != 0) {
                source[run.offset as usize..(run.offset + run.length) as usize].fill(0);
            }
            let mut dirty_pieces: Vec<(u64, u32)> =
                dirty.iter().map(|&(l, d)| (l, d * STATE_DIRTY)).collect();
            dirty_pieces.push((SIZE, 0));
            let dirty = runs(SIZE, &dirty_pieces);
            let plan = Plan::incremental(&alloc, &dirty);

            let old = vec![0x5a; SIZE as usize];
            let mut want = old.clone();
            for span in &plan.spans {
                let r = span.offset as usize..(span.offset + span.length) as usize;
                want[r.clone()].copy_from_slice(&source[r]);
            }
            let disk = Arc::new(SlowDisk { data: source, fail_at: None });
            let readers: Vec<Arc<SlowDisk>> = (0..connections).map(|_| Arc::clone(&disk)).collect();
            let mut sink = MemorySink::new(old);
            let shape = Shape { queue_depth, request_size };
            let moved = runtime()
                .block_on(run(&readers, &plan, &mut sink, shape, &ProgressBar::hidden()))
                .unwrap();
            prop_assert_eq!(moved.read, plan.copy_bytes());
            prop_assert!(sink.data == want, "the target differs from the model");
            prop_assert!(sink.in_order, "the sink saw offsets out of order");
        }
    }
}
