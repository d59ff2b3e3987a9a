//! The report of a run: one JSON object for scripts (`--json`), a short table for people.
//!
//! JSON schema (`"schema": "tidemark-bench/1"`; fields are only ever added):
//! ```text
//! { schema, target, target_kind ("file"|"device"|"nbd"), engine, huge_page_bytes|null,
//!   rw, bs, qd, submit_batch, conns,
//!   direct, region_bytes, time_limit_secs|null, seed,
//!   elapsed_secs, bytes, ops, mb_per_sec, iops,
//!   read|null, write|null:  { ops, bytes, mb_per_sec, iops,
//!                             latency_ns: { min, mean, p50, p99, "p99.9", max } },
//!   flush_secs|null,
//!   cpu: { user_secs, system_secs, percent },
//!   verify|null: { seed, checked_blocks, mismatched_blocks, readback_secs|null,
//!                  mismatches: [ { block_offset, offset, expected, found } ] } }
//! ```
//! Throughput is in MB/s (10^6 bytes per second, as fio's and dd's "MB/s"); `elapsed_secs`
//! runs from the first submission to the last completion plus the final flush.

use std::fmt::Write as _;

use serde::Serialize;

use crate::bench::pattern::Mismatch;
use crate::bench::stats::{CpuTime, DirectionSummary, LatencySummary};
use crate::bench::workload::Pattern;

pub const SCHEMA: &str = "tidemark-bench/1";

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub target: String,
    pub target_kind: &'static str,
    /// The I/O path: "io_uring", "threads" (pread/pwrite pool) or "nbd".
    pub engine: String,
    /// Bytes of the I/O buffers in transparent huge pages (files and devices; null for
    /// NBD and where /proc/self/smaps cannot be read).
    pub huge_page_bytes: Option<u64>,
    pub rw: Pattern,
    pub bs: u64,
    pub qd: usize,
    /// Requests sent to the target together (1: each as soon as its slot frees).
    pub submit_batch: usize,
    pub conns: usize,
    pub direct: bool,
    pub region_bytes: u64,
    pub time_limit_secs: Option<f64>,
    pub seed: u64,
    pub elapsed_secs: f64,
    pub bytes: u64,
    pub ops: u64,
    pub mb_per_sec: f64,
    pub iops: f64,
    pub read: Option<DirectionSummary>,
    pub write: Option<DirectionSummary>,
    pub flush_secs: Option<f64>,
    pub cpu: CpuReport,
    pub verify: Option<VerifyReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    pub user_secs: f64,
    pub system_secs: f64,
    /// CPU time as a share of elapsed time (100 = one core busy all along).
    pub percent: f64,
}

impl CpuReport {
    pub fn new(used: CpuTime, elapsed_secs: f64) -> CpuReport {
        CpuReport {
            user_secs: used.user_secs,
            system_secs: used.system_secs,
            percent: if elapsed_secs > 0.0 {
                used.total_secs() / elapsed_secs * 100.0
            } else {
                0.0
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub seed: u64,
    pub checked_blocks: u64,
    pub mismatched_blocks: u64,
    /// The read-back pass after a write workload (not part of the measured figures).
    pub readback_secs: Option<f64>,
    /// The first mismatches found, in the order they were found.
    pub mismatches: Vec<Mismatch>,
}

impl Report {
    /// The report for people: a headline, one line per direction, totals, CPU, verify.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let direct = if self.direct { ", O_DIRECT" } else { "" };
        let pages = match self.huge_page_bytes {
            Some(0) => ", buffers in 4 KiB pages",
            Some(_) => ", buffers in huge pages",
            None => "",
        };
        let mut conns = if self.conns > 1 {
            format!(", {} connections", self.conns)
        } else {
            String::new()
        };
        if self.submit_batch > 1 {
            let _ = write!(conns, ", submitted {} at a time", self.submit_batch);
        }
        let _ = writeln!(
            out,
            "{} {} QD{} on {} {} ({}{direct}{pages}{conns}), {}",
            pattern_name(self.rw),
            human_bytes(self.bs),
            self.qd,
            self.target_kind,
            self.target,
            self.engine,
            human_bytes(self.region_bytes),
        );
        for (name, summary) in [("read", &self.read), ("write", &self.write)] {
            if let Some(summary) = summary {
                let _ = writeln!(
                    out,
                    "  {name:<6} {:>9.1} MB/s {:>10.0} IOPS   lat {}",
                    summary.mb_per_sec,
                    summary.iops,
                    latency_text(&summary.latency_ns)
                );
            }
        }
        let flush = self
            .flush_secs
            .map(|secs| format!(" (flush {})", human_secs(secs)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  total  {:>9.1} MB/s {:>10.0} IOPS   {} in {}{flush}",
            self.mb_per_sec,
            self.iops,
            human_bytes(self.bytes),
            human_secs(self.elapsed_secs)
        );
        let _ = writeln!(
            out,
            "  cpu    user {}  sys {}  ({:.0}% of one core)",
            human_secs(self.cpu.user_secs),
            human_secs(self.cpu.system_secs),
            self.cpu.percent
        );
        if let Some(verify) = &self.verify {
            let _ = writeln!(
                out,
                "  verify {} blocks checked (seed {}), {} mismatched",
                verify.checked_blocks, verify.seed, verify.mismatched_blocks
            );
            for mismatch in &verify.mismatches {
                let _ = writeln!(
                    out,
                    "         block at {}: byte {} is {:#04x}, expected {:#04x}",
                    mismatch.block_offset, mismatch.offset, mismatch.found, mismatch.expected
                );
            }
            if verify.mismatched_blocks > verify.mismatches.len() as u64 {
                let _ = writeln!(
                    out,
                    "         ... and {} more",
                    verify.mismatched_blocks - verify.mismatches.len() as u64
                );
            }
        }
        out
    }
}

fn pattern_name(pattern: Pattern) -> &'static str {
    match pattern {
        Pattern::Read => "read",
        Pattern::Write => "write",
        Pattern::Randread => "randread",
        Pattern::Randwrite => "randwrite",
        Pattern::Rw => "rw",
        Pattern::Randrw => "randrw",
    }
}

fn latency_text(latency: &LatencySummary) -> String {
    format!(
        "p50 {}  p99 {}  p99.9 {}  max {}  (mean {})",
        human_ns(latency.p50),
        human_ns(latency.p99),
        human_ns(latency.p99_9),
        human_ns(latency.max),
        human_ns(latency.mean)
    )
}

/// Nanoseconds in a unit that keeps them short.
pub fn human_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=999_999 => format!("{:.1} us", ns as f64 / 1e3),
        1_000_000..=9_999_999_999 => format!("{:.2} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

fn human_secs(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.1} ms", secs * 1e3)
    } else {
        format!("{secs:.2} s")
    }
}

/// Bytes in binary units (4 KiB, 1 MiB, 1.5 GiB).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units_read_naturally() {
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(1 << 20), "1 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_ns(850), "850 ns");
        assert_eq!(human_ns(123_456), "123.5 us");
        assert_eq!(human_ns(12_345_678), "12.35 ms");
    }

    #[test]
    fn cpu_percent_is_relative_to_elapsed_time() {
        let cpu = CpuReport::new(
            CpuTime {
                user_secs: 0.5,
                system_secs: 1.5,
            },
            4.0,
        );
        assert!((cpu.percent - 50.0).abs() < 1e-9);
    }
}
