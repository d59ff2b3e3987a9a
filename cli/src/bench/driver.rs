//! The measuring loop: keep `qd` requests in flight on a [`Backend`], time each one from
//! submission to its reaped completion, and stop at the byte or time limit.
//!
//! Requests go to the target as soon as a slot frees (fio's default,
//! `iodepth_batch_submit=1`), or `submit_batch` at a time. That matters more than it
//! seems: on a virtio disk measured here, random 4 KiB reads at QD32 reached 54k IOPS
//! when each refill of the queue went down in one batch and 63k (fio's figure) when each
//! request went down alone, because a batch leaves the device's queue short for as long
//! as it takes to gather.
//!
//! Every figure comes from completions the backend reaped: a request counts (bytes,
//! IOPS, latency) only when the target answered it, and the clock stops after the last
//! completion and, when anything was written, after the flush that makes it durable.

use std::io;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench::pattern::{self, Mismatch};
use crate::bench::stats::DirectionStats;
use crate::bench::workload::{Direction, Op};

/// Where requests go: a file or device through the engine's I/O engines, or an NBD
/// export through the NBD client. A backend owns one `bs`-sized buffer per slot
/// (`0..qd`); the driver fills or checks a slot's buffer only while it is idle.
pub trait Backend {
    /// The buffer of an idle `slot`.
    fn buffer(&mut self, slot: usize) -> &mut [u8];
    /// Queue a request on `slot` at `offset`, reading into or writing from its buffer.
    /// It reaches the target at the latest with the next [`Backend::commit`] or
    /// [`Backend::reap`].
    fn submit(&mut self, slot: usize, direction: Direction, offset: u64) -> anyhow::Result<()>;
    /// Send every queued request to the target now, without waiting for any.
    fn commit(&mut self) -> anyhow::Result<()>;
    /// Wait until at least one request has completed and append `(slot, result)` of every
    /// completed one to `done`. A request succeeds only if it transferred its whole buffer.
    fn reap(&mut self, done: &mut Vec<(usize, io::Result<()>)>) -> anyhow::Result<()>;
    /// Make everything written so far durable (fsync, NBD_CMD_FLUSH).
    fn flush(&mut self) -> anyhow::Result<()>;
}

/// When a phase ends.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// After this many requests.
    Ops(u64),
    /// When this much time has passed (requests in flight then still complete).
    Time(Duration),
}

/// What `--verify` does in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Off,
    /// Writes carry the pattern of `seed`; reads of blocks this run wrote are checked.
    WriteAndCheck {
        seed: u64,
    },
    /// Every read is checked against the pattern of `seed` (an earlier run wrote it).
    CheckAll {
        seed: u64,
    },
}

/// How many mismatches a report lists (all are counted).
pub const MISMATCHES_LISTED: usize = 16;

/// What one phase measured.
#[derive(Debug)]
pub struct PhaseResult {
    pub read: DirectionStats,
    pub write: DirectionStats,
    /// From the first submission to the last completion, plus the flush.
    pub elapsed: Duration,
    /// Time the final flush took (included in `elapsed`), when anything was written.
    pub flush: Option<Duration>,
    /// Blocks checked against the pattern, and the ones that did not match.
    pub checked_blocks: u64,
    pub mismatched_blocks: u64,
    pub mismatches: Vec<Mismatch>,
    /// Offsets written (block numbers, as a bitmap) when verifying writes.
    pub written: Option<BlockSet>,
}

/// Progress callback: bytes completed so far and time elapsed.
pub type Progress<'a> = &'a mut dyn FnMut(u64, Duration);

/// How one phase drives the backend.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    /// Bytes per request.
    pub bs: u64,
    /// Requests in flight.
    pub qd: usize,
    /// Requests queued before they are sent to the target together (1: each at once).
    pub submit_batch: usize,
    pub limit: Limit,
    pub verify: Verify,
    /// Blocks of `bs` in the region (bounds the written-block set of `--verify`).
    pub region_blocks: u64,
}

/// Run one phase: `qd` requests of `bs` bytes from `next_op` until `limit` (or until
/// `next_op` has no more), timing each from submission to completion.
pub fn run_phase(
    backend: &mut dyn Backend,
    next_op: &mut dyn FnMut() -> Option<Op>,
    phase: &Phase,
    progress: Progress<'_>,
) -> anyhow::Result<PhaseResult> {
    let Phase {
        bs,
        qd,
        limit,
        verify,
        region_blocks,
        ..
    } = *phase;
    let submit_batch = phase.submit_batch.max(1);
    let mut result = PhaseResult {
        read: DirectionStats::new(),
        write: DirectionStats::new(),
        elapsed: Duration::ZERO,
        flush: None,
        checked_blocks: 0,
        mismatched_blocks: 0,
        mismatches: Vec::new(),
        written: matches!(verify, Verify::WriteAndCheck { .. })
            .then(|| BlockSet::new(region_blocks)),
    };
    let mut in_flight: Vec<Option<(Op, Instant)>> = vec![None; qd];
    let mut idle: Vec<usize> = (0..qd).rev().collect();
    let mut done = Vec::with_capacity(qd);
    let mut submitted: u64 = 0;
    let mut queued = 0;
    let mut exhausted = false;
    let mut bytes_done: u64 = 0;
    let mut last_progress = Duration::ZERO;
    let start = Instant::now();
    let deadline = match limit {
        Limit::Time(duration) => Some(start + duration),
        Limit::Ops(_) => None,
    };
    let mut now = start;

    loop {
        let stop = exhausted
            || match limit {
                Limit::Ops(ops) => submitted >= ops,
                Limit::Time(_) => deadline.is_some_and(|deadline| now >= deadline),
            };
        if !stop {
            while let Some(&slot) = idle.last() {
                if let Limit::Ops(ops) = limit {
                    if submitted >= ops {
                        break;
                    }
                }
                let Some(op) = next_op() else {
                    exhausted = true;
                    break;
                };
                if op.direction == Direction::Write {
                    if let (Verify::WriteAndCheck { seed }, Some(written)) =
                        (verify, &mut result.written)
                    {
                        pattern::fill(backend.buffer(slot), seed, op.offset);
                        written.insert(op.offset / bs);
                    }
                }
                idle.pop();
                in_flight[slot] = Some((op, Instant::now()));
                backend.submit(slot, op.direction, op.offset)?;
                submitted += 1;
                queued += 1;
                if queued >= submit_batch {
                    backend.commit()?;
                    queued = 0;
                }
            }
        }
        // Whatever is still queued goes down with the reap below.
        queued = 0;
        if idle.len() == qd {
            break;
        }
        done.clear();
        backend.reap(&mut done)?;
        now = Instant::now();
        for (slot, outcome) in done.drain(..) {
            let Some((op, submitted_at)) = in_flight.get_mut(slot).and_then(Option::take) else {
                bail!("the I/O backend completed slot {slot}, which had no request in flight");
            };
            let what = match op.direction {
                Direction::Read => "read",
                Direction::Write => "write",
            };
            outcome
                .with_context(|| format!("{what} of {bs} bytes at offset {} failed", op.offset))?;
            let latency = now.saturating_duration_since(submitted_at);
            match op.direction {
                Direction::Read => {
                    result.read.record(bs, latency);
                    let seed = match verify {
                        Verify::CheckAll { seed } => Some(seed),
                        Verify::WriteAndCheck { seed } => result
                            .written
                            .as_ref()
                            .is_some_and(|written| written.contains(op.offset / bs))
                            .then_some(seed),
                        Verify::Off => None,
                    };
                    if let Some(seed) = seed {
                        result.checked_blocks += 1;
                        if let Some(mismatch) =
                            pattern::check(backend.buffer(slot), seed, op.offset)
                        {
                            result.mismatched_blocks += 1;
                            if result.mismatches.len() < MISMATCHES_LISTED {
                                result.mismatches.push(mismatch);
                            }
                        }
                    }
                }
                Direction::Write => result.write.record(bs, latency),
            }
            bytes_done += bs;
            idle.push(slot);
        }
        let elapsed = now - start;
        if elapsed >= last_progress + Duration::from_millis(200) {
            last_progress = elapsed;
            progress(bytes_done, elapsed);
        }
    }

    if result.write.ops() > 0 {
        let flush_start = Instant::now();
        backend
            .flush()
            .context("flushing the written data failed")?;
        result.flush = Some(flush_start.elapsed());
    }
    result.elapsed = start.elapsed();
    progress(bytes_done, result.elapsed);
    Ok(result)
}

/// A set of block numbers below a bound, one bit each.
#[derive(Debug, Clone)]
pub struct BlockSet {
    words: Vec<u64>,
    blocks: u64,
}

impl BlockSet {
    pub fn new(blocks: u64) -> BlockSet {
        BlockSet {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    pub fn insert(&mut self, block: u64) {
        if block < self.blocks {
            self.words[(block / 64) as usize] |= 1 << (block % 64);
        }
    }

    pub fn contains(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// The members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(index, &word)| {
            let base = index as u64 * 64;
            (0..64u64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| base + bit)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{Pattern, Workload};
    use std::collections::VecDeque;

    /// A disk in memory whose requests complete in submission order, each `service`
    /// after the one before it (one request served at a time), on a virtual clock that
    /// `reap` advances by really sleeping.
    struct SlowDisk {
        data: Vec<u8>,
        bs: usize,
        buffers: Vec<Vec<u8>>,
        queue: VecDeque<(usize, Direction, u64)>,
        service: Duration,
        /// Time really spent serving (a loaded machine oversleeps).
        served: Duration,
        flushes: usize,
        fail_at: Option<u64>,
        /// Requests in the queue already sent to the "device", and how many each
        /// commit sent.
        committed: usize,
        commits: Vec<usize>,
    }

    impl SlowDisk {
        fn new(size: usize, bs: usize, qd: usize, service: Duration) -> SlowDisk {
            SlowDisk {
                data: vec![0; size],
                bs,
                buffers: vec![vec![0; bs]; qd],
                queue: VecDeque::new(),
                service,
                served: Duration::ZERO,
                flushes: 0,
                fail_at: None,
                committed: 0,
                commits: Vec::new(),
            }
        }
    }

    impl Backend for SlowDisk {
        fn buffer(&mut self, slot: usize) -> &mut [u8] {
            &mut self.buffers[slot]
        }

        fn submit(&mut self, slot: usize, direction: Direction, offset: u64) -> anyhow::Result<()> {
            self.queue.push_back((slot, direction, offset));
            Ok(())
        }

        fn reap(&mut self, done: &mut Vec<(usize, io::Result<()>)>) -> anyhow::Result<()> {
            let (slot, direction, offset) = self.queue.pop_front().expect("a request in flight");
            self.committed = self.committed.saturating_sub(1);
            let started = std::time::Instant::now();
            std::thread::sleep(self.service);
            self.served += started.elapsed();
            let range = offset as usize..offset as usize + self.bs;
            let outcome = if Some(offset) == self.fail_at {
                Err(io::Error::other("injected failure"))
            } else {
                match direction {
                    Direction::Read => self.buffers[slot].copy_from_slice(&self.data[range]),
                    Direction::Write => self.data[range].copy_from_slice(&self.buffers[slot]),
                }
                Ok(())
            };
            done.push((slot, outcome));
            Ok(())
        }

        fn commit(&mut self) -> anyhow::Result<()> {
            self.commits.push(self.queue.len() - self.committed);
            self.committed = self.queue.len();
            Ok(())
        }

        fn flush(&mut self) -> anyhow::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    fn phase(disk: &SlowDisk, limit: Limit, verify: Verify) -> Phase {
        let bs = disk.bs as u64;
        Phase {
            bs,
            qd: disk.buffers.len(),
            submit_batch: 1,
            limit,
            verify,
            region_blocks: disk.data.len() as u64 / bs,
        }
    }

    fn run(disk: &mut SlowDisk, pattern: Pattern, limit: Limit, verify: Verify) -> PhaseResult {
        let phase = phase(disk, limit, verify);
        let mut workload = Workload::new(pattern, phase.bs, phase.region_blocks, 50, 1);
        let mut next = || Some(workload.next_op());
        run_phase(disk, &mut next, &phase, &mut |_, _| {}).unwrap()
    }

    #[test]
    fn throughput_and_latency_come_from_completions() {
        // One request served at a time, each for (at least) 2 ms, 4 in flight: IOPS is
        // requests over the time really spent serving, and in steady state each request
        // waits for the 3 ahead of it plus its own service: 4 services.
        let mut disk = SlowDisk::new(1 << 20, 4096, 4, Duration::from_millis(2));
        let result = run(&mut disk, Pattern::Randread, Limit::Ops(100), Verify::Off);
        let read = result.read.summary(result.elapsed).unwrap();
        assert_eq!(read.ops, 100);
        assert!(result.write.summary(result.elapsed).is_none());
        let served = disk.served.as_secs_f64();
        let expected_iops = 100.0 / served;
        assert!(
            read.iops <= 500.0,
            "iops {} beyond the 2 ms service",
            read.iops
        );
        assert!(
            (read.iops - expected_iops).abs() <= expected_iops * 0.1,
            "iops {} vs {expected_iops} from the time served",
            read.iops
        );
        let mean_service_ns = served / 100.0 * 1e9;
        let mean = read.latency_ns.mean as f64;
        assert!(
            (3.5 * mean_service_ns..=4.3 * mean_service_ns).contains(&mean),
            "mean latency {mean} ns for a mean service of {mean_service_ns} ns"
        );
        assert!(
            read.latency_ns.min >= 2_000_000,
            "no request beats its service"
        );
        assert!(result.flush.is_none(), "nothing written, nothing flushed");
    }

    #[test]
    fn time_limit_stops_submitting_and_drains() {
        let mut disk = SlowDisk::new(1 << 20, 4096, 2, Duration::from_millis(5));
        let result = run(
            &mut disk,
            Pattern::Write,
            Limit::Time(Duration::from_millis(200)),
            Verify::Off,
        );
        let ops = result.write.ops();
        // Submissions stop at 200 ms; the (at most 2) requests in flight then complete.
        assert!(ops <= 42, "{ops} writes in 200 ms at 5 ms or more each");
        assert!(result.elapsed >= Duration::from_millis(200));
        let ops_served = (disk.served.as_secs_f64() / 0.005).round() as u64;
        assert!(
            ops <= ops_served + 1,
            "{ops} writes counted, {ops_served} served"
        );
        assert!(disk.queue.is_empty());
        assert_eq!(disk.flushes, 1);
        assert!(result.flush.is_some());
    }

    #[test]
    fn verify_writes_the_pattern_and_checks_what_was_written() {
        let mut disk = SlowDisk::new(64 << 10, 4096, 3, Duration::ZERO);
        let seed = 77;
        let result = run(
            &mut disk,
            Pattern::Randwrite,
            Limit::Ops(16),
            Verify::WriteAndCheck { seed },
        );
        let written = result.written.expect("verify tracks written blocks");
        assert_eq!(written.iter().count(), 16);
        for block in 0..16u64 {
            let at = (block * 4096) as usize;
            assert_eq!(
                pattern::check(&disk.data[at..at + 4096], seed, block * 4096),
                None
            );
        }
        disk.data[5 * 4096 + 100] ^= 1;
        let checked = run(
            &mut disk,
            Pattern::Read,
            Limit::Ops(16),
            Verify::CheckAll { seed },
        );
        assert_eq!(checked.checked_blocks, 16);
        assert_eq!(checked.mismatched_blocks, 1);
        assert_eq!(checked.mismatches[0].offset, 5 * 4096 + 100);
    }

    #[test]
    fn a_failed_request_names_its_offset() {
        let mut disk = SlowDisk::new(64 << 10, 4096, 2, Duration::ZERO);
        disk.fail_at = Some(3 * 4096);
        let mut workload = Workload::new(Pattern::Read, 4096, 16, 50, 1);
        let mut next = || Some(workload.next_op());
        let phase = phase(&disk, Limit::Ops(16), Verify::Off);
        let err = run_phase(&mut disk, &mut next, &phase, &mut |_, _| {}).unwrap_err();
        assert!(format!("{err:#}").contains("at offset 12288"), "{err:#}");
    }

    #[test]
    fn requests_are_sent_one_by_one_or_in_batches() {
        // One by one (fio's default): every commit sends exactly one request.
        let mut disk = SlowDisk::new(64 << 10, 4096, 8, Duration::ZERO);
        let phase = phase(&disk, Limit::Ops(40), Verify::Off);
        let mut workload = Workload::new(Pattern::Randread, 4096, 16, 50, 1);
        let mut next = || Some(workload.next_op());
        run_phase(&mut disk, &mut next, &phase, &mut |_, _| {}).unwrap();
        assert_eq!(disk.commits.len(), 40);
        assert!(
            disk.commits.iter().all(|&sent| sent == 1),
            "{:?}",
            disk.commits
        );

        // In batches of 4: the first fill of 8 goes down as two commits of 4; refills
        // (one slot frees per reap here) wait in the queue for the reap that follows.
        let mut disk = SlowDisk::new(64 << 10, 4096, 8, Duration::ZERO);
        let phase = Phase {
            submit_batch: 4,
            ..phase
        };
        let mut workload = Workload::new(Pattern::Randread, 4096, 16, 50, 1);
        let mut next = || Some(workload.next_op());
        let result = run_phase(&mut disk, &mut next, &phase, &mut |_, _| {}).unwrap();
        assert_eq!(result.read.ops(), 40);
        assert_eq!(disk.commits, [4, 4]);
    }

    #[test]
    fn block_set_iterates_in_order() {
        let mut set = BlockSet::new(200);
        for block in [150, 3, 64, 63, 3] {
            set.insert(block);
        }
        set.insert(500);
        assert_eq!(set.iter().collect::<Vec<_>>(), [3, 63, 64, 150]);
        assert!(set.contains(64) && !set.contains(65) && !set.contains(500));
    }
}
