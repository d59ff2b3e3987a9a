//! What a run measured: per-direction counts and a latency histogram, and CPU time.
//!
//! Latencies are recorded in nanoseconds into an HDR histogram (3 significant digits,
//! 1 ns to 1 hour), so percentiles keep their precision whatever the spread; the exact
//! minimum, maximum and sum are kept beside it.

use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

/// The longest latency the histogram resolves; longer ones are clamped to it.
const MAX_TRACKED_NS: u64 = 3_600 * 1_000_000_000;

/// Completed requests of one direction and their latencies.
#[derive(Debug, Clone)]
pub struct DirectionStats {
    ops: u64,
    bytes: u64,
    histogram: Histogram<u64>,
    min_ns: u64,
    max_ns: u64,
    sum_ns: u128,
}

impl DirectionStats {
    pub fn new() -> DirectionStats {
        DirectionStats {
            ops: 0,
            bytes: 0,
            histogram: Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3)
                .expect("the histogram bounds are valid constants"),
            min_ns: u64::MAX,
            max_ns: 0,
            sum_ns: 0,
        }
    }

    /// Record one completed request of `bytes` that took `latency` from submission to
    /// completion.
    pub fn record(&mut self, bytes: u64, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.ops += 1;
        self.bytes += bytes;
        self.histogram.saturating_record(ns.min(MAX_TRACKED_NS));
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
        self.sum_ns += u128::from(ns);
    }

    pub fn ops(&self) -> u64 {
        self.ops
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The summary of this direction over a run of `elapsed`; `None` when it saw no
    /// requests.
    pub fn summary(&self, elapsed: Duration) -> Option<DirectionSummary> {
        if self.ops == 0 {
            return None;
        }
        let seconds = elapsed.as_secs_f64();
        // A percentile is the top of its histogram bucket; never report it above the
        // exact maximum.
        let percentile = |quantile| self.histogram.value_at_quantile(quantile).min(self.max_ns);
        Some(DirectionSummary {
            ops: self.ops,
            bytes: self.bytes,
            mb_per_sec: crate::ui::mb_per_sec(self.bytes, seconds),
            iops: if seconds > 0.0 {
                self.ops as f64 / seconds
            } else {
                0.0
            },
            latency_ns: LatencySummary {
                min: self.min_ns,
                mean: (self.sum_ns / u128::from(self.ops)) as u64,
                p50: percentile(0.50),
                p99: percentile(0.99),
                p99_9: percentile(0.999),
                max: self.max_ns,
            },
        })
    }
}

/// One direction's figures, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct DirectionSummary {
    pub ops: u64,
    pub bytes: u64,
    /// 10^6 bytes per second, as fio's and dd's "MB/s".
    pub mb_per_sec: f64,
    pub iops: f64,
    pub latency_ns: LatencySummary,
}

/// Completion latency (submission to completion) in nanoseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub min: u64,
    pub mean: u64,
    pub p50: u64,
    pub p99: u64,
    #[serde(rename = "p99.9")]
    pub p99_9: u64,
    pub max: u64,
}

/// CPU time this process used (all threads), from getrusage(RUSAGE_SELF).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuTime {
    pub user_secs: f64,
    pub system_secs: f64,
}

impl CpuTime {
    pub fn now() -> anyhow::Result<CpuTime> {
        use nix::sys::resource::{getrusage, UsageWho};
        let usage = getrusage(UsageWho::RUSAGE_SELF).context("getrusage failed")?;
        let seconds =
            |time: nix::sys::time::TimeVal| time.tv_sec() as f64 + time.tv_usec() as f64 / 1e6;
        Ok(CpuTime {
            user_secs: seconds(usage.user_time()),
            system_secs: seconds(usage.system_time()),
        })
    }

    /// The CPU time used between `earlier` and `self`.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user_secs: (self.user_secs - earlier.user_secs).max(0.0),
            system_secs: (self.system_secs - earlier.system_secs).max(0.0),
        }
    }

    pub fn total_secs(self) -> f64 {
        self.user_secs + self.system_secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_computes_rates_and_percentiles_from_recorded_latencies() {
        let mut stats = DirectionStats::new();
        for micros in 1..=1000u64 {
            stats.record(4096, Duration::from_micros(micros));
        }
        let summary = stats
            .summary(Duration::from_secs(2))
            .expect("ops were recorded");
        assert_eq!(summary.ops, 1000);
        assert_eq!(summary.bytes, 4096 * 1000);
        assert!((summary.iops - 500.0).abs() < 1e-9);
        assert!((summary.mb_per_sec - 4.096 / 2.0).abs() < 1e-9);
        let latency = summary.latency_ns;
        assert_eq!(latency.min, 1_000);
        assert_eq!(latency.max, 1_000_000);
        assert_eq!(latency.mean, 500_500);
        // Three significant digits: within 0.1% of the exact order statistics.
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 1e-3;
        assert!(close(latency.p50, 500_000), "p50 {}", latency.p50);
        assert!(close(latency.p99, 990_000), "p99 {}", latency.p99);
        assert!(close(latency.p99_9, 999_000), "p99.9 {}", latency.p99_9);
    }

    #[test]
    fn empty_direction_has_no_summary() {
        assert!(DirectionStats::new()
            .summary(Duration::from_secs(1))
            .is_none());
    }

    #[test]
    fn absurd_latencies_are_clamped_not_lost() {
        let mut stats = DirectionStats::new();
        stats.record(1, Duration::from_secs(100_000));
        stats.record(1, Duration::ZERO);
        let summary = stats
            .summary(Duration::from_secs(1))
            .expect("ops were recorded");
        assert_eq!(summary.ops, 2);
        assert_eq!(summary.latency_ns.max, 100_000 * 1_000_000_000);
        assert_eq!(summary.latency_ns.min, 1);
    }

    #[test]
    fn cpu_time_grows_with_work() {
        // Busy work until getrusage has seen 20 ms of it; on a loaded machine this takes
        // longer in wall time, never forever.
        let before = CpuTime::now().expect("getrusage works");
        let mut state = 1u64;
        let mut sink = 0u64;
        let start = std::time::Instant::now();
        let mut used = CpuTime::now().expect("getrusage works").since(before);
        while used.total_secs() < 0.02 && start.elapsed() < Duration::from_secs(20) {
            for _ in 0..100_000 {
                sink ^= crate::bench::workload::splitmix64(&mut state);
            }
            used = CpuTime::now().expect("getrusage works").since(before);
        }
        assert_ne!(sink, 1);
        assert!(
            used.total_secs() >= 0.02,
            "used {used:?} in {:?}",
            start.elapsed()
        );
        // This test's thread cannot use more CPU than the wall time (plus the other test
        // threads of this process, at most a few).
        assert!(used.total_secs() <= start.elapsed().as_secs_f64() * 8.0 + 0.05);
    }
}
