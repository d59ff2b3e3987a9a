//! The io_uring engine against the pread/pwrite oracle and a plain `Vec<u8>` disk.

use std::os::unix::fs::FileExt;

use proptest::prelude::*;

use super::*;

const BLOCK: usize = 4096;

#[derive(Debug, Clone)]
struct Op {
    write: bool,
    block: usize,
    blocks: usize,
    fill: u8,
}

fn uring_available() -> bool {
    match UringEngine::new(4, BufPool::new(BLOCK, 4).unwrap()) {
        Ok(_) => true,
        Err(err) => {
            eprintln!("io_uring unavailable here ({err}); the oracle comparison needs it");
            false
        }
    }
}

/// Run `batches` through `engine` against a file holding `initial`; returns every read's
/// bytes (in batch order) and the final file contents. Requests within a batch do not
/// overlap, so their order does not matter.
fn run(
    engine: &mut dyn Engine,
    initial: &[u8],
    direct: bool,
    batches: &[Vec<Op>],
) -> (Vec<Vec<u8>>, Vec<u8>) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("disk");
    std::fs::write(&path, initial).unwrap();
    let (file, _) = open_file(&path, &OpenOptions::read_write().direct(direct)).unwrap();
    let id = engine.add_file(Arc::new(file));
    let mut reads = Vec::new();
    for batch in batches {
        for (index, op) in batch.iter().enumerate() {
            let mut buf = engine
                .pool()
                .take()
                .expect("the pool has a buffer per request");
            buf.set_len(op.blocks * BLOCK);
            if op.write {
                buf.as_mut_slice().fill(op.fill);
            }
            let op_kind = if op.write {
                super::Op::Write
            } else {
                super::Op::Read
            };
            let request = Request {
                op: op_kind,
                file: id,
                offset: (op.block * BLOCK) as u64,
                buf,
                user_data: index as u64,
            };
            engine.submit(request).unwrap();
        }
        let mut done = Vec::new();
        while done.len() < batch.len() {
            engine.reap(1, &mut done).unwrap();
        }
        done.sort_by_key(|c| c.user_data);
        for completion in done {
            let op = &batch[completion.user_data as usize];
            let n = completion.result.unwrap();
            assert_eq!(completion.offset, (op.block * BLOCK) as u64);
            if op.write {
                assert_eq!(n, op.blocks * BLOCK);
            } else {
                reads.push(completion.buf.as_slice()[..n].to_vec());
            }
        }
    }
    assert_eq!(engine.in_flight(), 0);
    (reads, std::fs::read(&path).unwrap())
}

/// The same batches applied to a `Vec<u8>`.
fn model(initial: &[u8], batches: &[Vec<Op>]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut disk = initial.to_vec();
    let mut reads = Vec::new();
    for batch in batches {
        let before = disk.clone();
        for op in batch {
            let start = op.block * BLOCK;
            if op.write {
                let end = start + op.blocks * BLOCK;
                if disk.len() < end {
                    disk.resize(end, 0);
                }
                disk[start..end].fill(op.fill);
            } else {
                let end = (start + op.blocks * BLOCK).min(before.len());
                reads.push(before[start.min(end)..end].to_vec());
            }
        }
    }
    (reads, disk)
}

fn batches_strategy(blocks: usize) -> impl Strategy<Value = Vec<Vec<Op>>> {
    let op = (any::<bool>(), 0..blocks, 1usize..6, any::<u8>()).prop_map(
        |(write, block, blocks, fill)| Op {
            write,
            block,
            blocks,
            fill,
        },
    );
    prop::collection::vec(prop::collection::vec(op, 1..12), 1..6).prop_map(|batches| {
        // Keep the first of any overlapping requests in a batch: concurrent overlapping
        // requests have no defined order, on disks or here.
        batches
            .into_iter()
            .map(|batch| {
                let mut kept: Vec<Op> = Vec::new();
                for op in batch {
                    let overlaps = kept
                        .iter()
                        .any(|k| op.block < k.block + k.blocks && k.block < op.block + op.blocks);
                    if !overlaps {
                        kept.push(op);
                    }
                }
                kept
            })
            .collect()
    })
}

fn engines() -> (Box<dyn Engine>, Box<dyn Engine>) {
    let pool = || BufPool::new(8 * BLOCK, 16).unwrap();
    (
        Box::new(UringEngine::new(16, pool()).unwrap()),
        Box::new(ThreadEngine::new(16, 4, pool()).unwrap()),
    )
}

/// An io_uring engine promised to one thread (single issuer, deferred task running where
/// the kernel has them).
fn single_thread_uring() -> Box<dyn Engine> {
    let pool = BufPool::new(8 * BLOCK, 16).unwrap();
    Box::new(UringEngine::with_options(16, pool, true).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn uring_matches_the_oracle_and_the_model(
        seed in any::<u64>(),
        blocks in 4usize..48,
        tail in prop_oneof![Just(0usize), 1usize..BLOCK],
        batches in batches_strategy(48),
        direct in any::<bool>(),
    ) {
        prop_assume!(uring_available());
        use rand::{RngCore, SeedableRng};
        // O_DIRECT needs whole blocks, so a direct-I/O disk has no tail.
        let tail = if direct { 0 } else { tail };
        let mut initial = vec![0u8; blocks * BLOCK + tail];
        rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut initial);
        // A read racing a write that extends the file may or may not see the new size;
        // keep writes inside the file so every batch has one right answer.
        let batches: Vec<Vec<Op>> = batches
            .into_iter()
            .map(|batch| batch.into_iter().filter(|op| !op.write || op.block + op.blocks <= blocks).collect())
            .collect();
        let (mut uring, mut oracle) = engines();
        let from_uring = run(uring.as_mut(), &initial, direct, &batches);
        let from_oracle = run(oracle.as_mut(), &initial, direct, &batches);
        let mut deferred = single_thread_uring();
        let from_deferred = run(deferred.as_mut(), &initial, direct, &batches);
        let expected = model(&initial, &batches);
        // Plain comparisons: a failure names the first differing read, not megabytes.
        prop_assert!(from_uring.1 == from_oracle.1, "final disks differ (io_uring vs threads)");
        prop_assert!(from_deferred == from_uring, "the single-thread (deferred task running) ring differs");
        prop_assert!(from_uring.1 == expected.1, "final disk differs from the model");
        prop_assert_eq!(from_uring.0.len(), expected.0.len());
        for (i, ((a, b), c)) in from_uring.0.iter().zip(&from_oracle.0).zip(&expected.0).enumerate() {
            prop_assert!(a == b && a == c, "read {} differs (lengths {} {} {})", i, a.len(), b.len(), c.len());
        }
    }
}

#[test]
fn a_full_queue_is_refused_not_overrun() {
    for mut engine in [engines().0, engines().1] {
        let file = Arc::new(tempfile::tempfile().unwrap());
        file.set_len(1 << 20).unwrap();
        let id = engine.add_file(file);
        let depth = engine.queue_depth();
        for i in 0..depth {
            let buf = engine.pool().take().unwrap();
            engine
                .submit(Request {
                    op: super::Op::Read,
                    file: id,
                    offset: 0,
                    buf,
                    user_data: i as u64,
                })
                .unwrap();
        }
        let extra = BufPool::new(BLOCK, 1).unwrap().take().unwrap();
        let refused = engine.submit(Request {
            op: super::Op::Read,
            file: id,
            offset: 0,
            buf: extra,
            user_data: 99,
        });
        assert!(
            matches!(refused, Err(IoError::QueueFull(_))),
            "{:?}: {refused:?}",
            engine.kind()
        );
        let mut done = Vec::new();
        while engine.in_flight() > 0 {
            engine.reap(1, &mut done).unwrap();
        }
        assert_eq!(done.len(), depth);
        drop(done);
        assert_eq!(engine.pool().available(), engine.pool().count());
    }
}

#[test]
fn errors_come_back_in_the_completion() {
    for mut engine in [engines().0, engines().1] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, [1u8; BLOCK]).unwrap();
        let (file, _) = open_file(&path, &OpenOptions::read_only()).unwrap();
        let id = engine.add_file(Arc::new(file));
        let buf = engine.pool().take().unwrap();
        engine
            .submit(Request {
                op: super::Op::Write,
                file: id,
                offset: 0,
                buf,
                user_data: 1,
            })
            .unwrap();
        let mut done = Vec::new();
        engine.reap(1, &mut done).unwrap();
        assert_eq!(
            done[0].result.as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF),
            "{:?}",
            engine.kind()
        );
    }
}

#[test]
fn buffers_from_another_pool_work_unregistered() {
    if !uring_available() {
        return;
    }
    let mut engine = engines().0;
    let file = Arc::new(tempfile::tempfile().unwrap());
    let id = engine.add_file(Arc::clone(&file));
    let other = BufPool::new(BLOCK, 1).unwrap();
    let mut buf = other.take().unwrap();
    buf.as_mut_slice().fill(0x5a);
    engine
        .submit(Request {
            op: super::Op::Write,
            file: id,
            offset: 8192,
            buf,
            user_data: 0,
        })
        .unwrap();
    let mut done = Vec::new();
    engine.reap(1, &mut done).unwrap();
    assert_eq!(*done[0].result.as_ref().unwrap(), BLOCK);
    let mut back = [0u8; BLOCK];
    file.read_exact_at(&mut back, 8192).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
}

#[test]
fn a_single_thread_engine_belongs_to_its_first_user() {
    if !uring_available() {
        return;
    }
    let file = Arc::new(tempfile::tempfile().unwrap());
    file.write_all_at(&[5u8; BLOCK], 0).unwrap();
    let read = |engine: &mut dyn Engine, id| -> Result<Vec<u8>, IoError> {
        let buf = engine.pool().take().unwrap();
        engine.submit(Request {
            op: super::Op::Read,
            file: id,
            offset: 0,
            buf,
            user_data: 1,
        })?;
        let mut done = Vec::new();
        engine.reap(1, &mut done)?;
        let completion = done.pop().unwrap();
        assert_eq!(completion.result.unwrap(), BLOCK);
        Ok(completion.buf.as_slice()[..BLOCK].to_vec())
    };
    // Made on this thread, first used on another: that thread becomes its user.
    let mut engine = single_thread_uring();
    let id = engine.add_file(Arc::clone(&file));
    let mut engine = std::thread::spawn(move || {
        assert_eq!(read(engine.as_mut(), id).unwrap(), vec![5u8; BLOCK]);
        engine
    })
    .join()
    .unwrap();
    // Back here, a ring that defers its completions to that thread refuses to work
    // (plainly, without hanging); one that could not defer works from anywhere.
    let deferred = UringEngine::with_options(4, BufPool::new(BLOCK, 4).unwrap(), true)
        .unwrap()
        .deferred_taskrun();
    match read(engine.as_mut(), id) {
        Ok(bytes) => {
            assert!(!deferred, "a deferred ring served another thread");
            assert_eq!(bytes, vec![5u8; BLOCK]);
        }
        Err(err) => {
            assert!(deferred, "{err}");
            assert!(err.to_string().contains("another thread"), "{err}");
        }
    }
}
