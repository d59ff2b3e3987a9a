//! What a pull copies: the export's block-status maps turned into spans to read or zero.
//!
//! Pure code: no sockets, no files. The pull gathers two maps over NBD, an allocation map
//! (`base:allocation`) and, for an incremental pull, a dirty map (`qemu:dirty-bitmap:NAME`),
//! and this module merges them into a [`Plan`]:
//!
//! ```text
//!   allocation  |  data  | zero |     data     |  zero  |
//!   dirty       | clean |   dirty   | clean |   dirty   |      (incremental only)
//!   plan        .       | Z  |Copy |  .    | C|   Z    |      (. = skipped, not read)
//! ```
//!
//! A full pull covers every byte: data ranges are read, ranges that `base:allocation`
//! reports as reading zero ([`STATE_ZERO`]) are never read and become zero spans, which the
//! image sink leaves as holes. An incremental pull covers only dirty bytes; a dirty range
//! that now reads as zero becomes a zero span, so the target image punches it instead of
//! keeping yesterday's data. A hole without `STATE_ZERO` (possible under qemu's backing
//! chains) is read like data: only the zero flag promises the contents.

use std::fmt;

use tidemark_nbd::export::{STATE_DIRTY, STATE_ZERO};

/// Errors in a block-status map as a server sent it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The map leaves bytes undescribed before its end.
    #[error(
        "the {context} map stops at byte {covered} of {size}: the server left the rest undescribed"
    )]
    Short {
        context: String,
        covered: u64,
        size: u64,
    },
    /// A run of zero length, which the protocol forbids.
    #[error("the {context} map has an empty extent at byte {offset}")]
    EmptyExtent { context: String, offset: u64 },
}

/// One run of a block-status map in absolute coordinates: `length` bytes at `offset`
/// share `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First byte.
    pub offset: u64,
    /// Length in bytes, never zero.
    pub length: u64,
    /// The context's flags for these bytes.
    pub flags: u32,
}

impl Run {
    fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A block-status map of a whole export: runs in order, contiguous, covering `[0, size)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentMap {
    context: String,
    size: u64,
    runs: Vec<Run>,
}

impl ExtentMap {
    /// An empty map of `context` for an export of `size` bytes, to be filled with
    /// [`ExtentMap::push`] in order.
    pub fn new(context: impl Into<String>, size: u64) -> Self {
        ExtentMap {
            context: context.into(),
            size,
            runs: Vec::new(),
        }
    }

    /// The context this map describes.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Append extents `(length, flags)` that describe the export from `offset` on, which
    /// must not be past [`ExtentMap::covered`]: what the map describes already is skipped
    /// (a reply asked from where another map stopped, behind this one).
    pub fn push_from(&mut self, offset: u64, extents: &[(u64, u32)]) -> Result<(), PlanError> {
        let mut at = offset;
        for &(length, flags) in extents {
            if length == 0 {
                return Err(PlanError::EmptyExtent {
                    context: self.context.clone(),
                    offset: at,
                });
            }
            let end = at.saturating_add(length);
            let covered = self.covered();
            debug_assert!(
                at <= covered,
                "extents from {at} leave a gap after {covered}"
            );
            if end > covered {
                self.push(end - covered, flags)?;
            }
            if self.is_complete() {
                break;
            }
            at = end;
        }
        Ok(())
    }

    /// The first byte not yet described.
    pub fn covered(&self) -> u64 {
        self.runs.last().map_or(0, Run::end)
    }

    /// Whether the map describes the whole export.
    pub fn is_complete(&self) -> bool {
        self.covered() >= self.size
    }

    /// Append `length` bytes with `flags` after what is already covered, clipped at the
    /// export's end; neighbours with equal flags merge.
    pub fn push(&mut self, length: u64, flags: u32) -> Result<(), PlanError> {
        let offset = self.covered();
        if length == 0 {
            return Err(PlanError::EmptyExtent {
                context: self.context.clone(),
                offset,
            });
        }
        let length = length.min(self.size.saturating_sub(offset));
        if length == 0 {
            return Ok(());
        }
        match self.runs.last_mut() {
            Some(last) if last.flags == flags => last.length += length,
            _ => self.runs.push(Run {
                offset,
                length,
                flags,
            }),
        }
        Ok(())
    }

    /// The finished map's runs, or an error if the map is short.
    pub fn finish(self) -> Result<Vec<Run>, PlanError> {
        if !self.is_complete() {
            let covered = self.covered();
            return Err(PlanError::Short {
                context: self.context,
                covered,
                size: self.size,
            });
        }
        Ok(self.runs)
    }
}

/// What the pull does with a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read the bytes from the export and write them to the target.
    Copy,
    /// The bytes read as zero: write zeroes (punch a hole) without reading them.
    Zero,
}

/// A range of the export and what to do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub offset: u64,
    /// Length in bytes, never zero.
    pub length: u64,
    /// Read and copy, or zero.
    pub action: Action,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}+{}", self.action, self.offset, self.length)
    }
}

/// The spans a pull acts on, in order and disjoint; bytes outside every span are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The spans, sorted by offset, non-overlapping, neighbours of equal action merged.
    pub spans: Vec<Span>,
}

impl Plan {
    /// A full pull: every byte, data copied and zero ranges zeroed.
    pub fn full(allocation: &[Run]) -> Plan {
        let mut plan = Plan::default();
        for run in allocation {
            plan.push(run.offset, run.length, action_for(run.flags));
        }
        plan
    }

    /// An incremental pull: the dirty bytes only, each copied or zeroed according to the
    /// allocation map. Both maps must cover the same export (see [`ExtentMap`]).
    pub fn incremental(allocation: &[Run], dirty: &[Run]) -> Plan {
        let mut plan = Plan::default();
        let mut alloc = allocation.iter().peekable();
        for run in dirty.iter().filter(|run| run.flags & STATE_DIRTY != 0) {
            let mut offset = run.offset;
            while offset < run.end() {
                // Skip allocation runs that end before this point; both lists are sorted.
                while alloc.peek().is_some_and(|a| a.end() <= offset) {
                    alloc.next();
                }
                let Some(a) = alloc.peek() else { break };
                let end = run.end().min(a.end());
                plan.push(offset, end - offset, action_for(a.flags));
                offset = end;
            }
        }
        plan
    }

    fn push(&mut self, offset: u64, length: u64, action: Action) {
        if length == 0 {
            return;
        }
        match self.spans.last_mut() {
            Some(last) if last.action == action && last.offset + last.length == offset => {
                last.length += length;
            }
            _ => self.spans.push(Span {
                offset,
                length,
                action,
            }),
        }
    }

    /// Bytes that will be read from the export.
    pub fn copy_bytes(&self) -> u64 {
        self.bytes(Action::Copy)
    }

    /// Bytes that will be zeroed without being read.
    pub fn zero_bytes(&self) -> u64 {
        self.bytes(Action::Zero)
    }

    fn bytes(&self, action: Action) -> u64 {
        self.spans
            .iter()
            .filter(|s| s.action == action)
            .map(|s| s.length)
            .sum()
    }

    /// The spans cut into requests of at most `max_request` bytes, cut at multiples of
    /// `max_request` so requests stay aligned. Zero spans are not cut: zeroing costs the
    /// same whatever its length.
    pub fn requests(&self, max_request: u64) -> impl Iterator<Item = Span> + '_ {
        let max_request = max_request.max(1);
        self.spans.iter().flat_map(move |span| {
            let mut offset = span.offset;
            let end = span.offset + span.length;
            std::iter::from_fn(move || {
                if offset >= end {
                    return None;
                }
                let next = match span.action {
                    Action::Zero => end,
                    Action::Copy => ((offset / max_request + 1) * max_request).min(end),
                };
                let piece = Span {
                    offset,
                    length: next - offset,
                    action: span.action,
                };
                offset = next;
                Some(piece)
            })
        })
    }
}

fn action_for(allocation_flags: u32) -> Action {
    if allocation_flags & STATE_ZERO != 0 {
        Action::Zero
    } else {
        Action::Copy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tidemark_nbd::export::STATE_HOLE;

    fn map(size: u64, runs: &[(u64, u32)]) -> Vec<Run> {
        let mut map = ExtentMap::new("test", size);
        for &(length, flags) in runs {
            map.push(length, flags).unwrap();
        }
        map.finish().unwrap()
    }

    #[test]
    fn full_plan_reads_data_and_zeroes_holes() {
        let alloc = map(100, &[(10, 0), (20, STATE_HOLE | STATE_ZERO), (70, 0)]);
        let plan = Plan::full(&alloc);
        assert_eq!(
            plan.spans,
            vec![
                Span {
                    offset: 0,
                    length: 10,
                    action: Action::Copy
                },
                Span {
                    offset: 10,
                    length: 20,
                    action: Action::Zero
                },
                Span {
                    offset: 30,
                    length: 70,
                    action: Action::Copy
                },
            ]
        );
        assert_eq!(plan.copy_bytes(), 80);
        assert_eq!(plan.zero_bytes(), 20);
    }

    #[test]
    fn hole_without_zero_flag_is_read() {
        let alloc = map(10, &[(10, STATE_HOLE)]);
        assert_eq!(Plan::full(&alloc).copy_bytes(), 10);
    }

    #[test]
    fn incremental_plan_touches_only_dirty_bytes() {
        let alloc = map(100, &[(50, 0), (50, STATE_HOLE | STATE_ZERO)]);
        let dirty = map(100, &[(10, 0), (60, STATE_DIRTY), (30, 0)]);
        let plan = Plan::incremental(&alloc, &dirty);
        assert_eq!(
            plan.spans,
            vec![
                Span {
                    offset: 10,
                    length: 40,
                    action: Action::Copy
                },
                Span {
                    offset: 50,
                    length: 20,
                    action: Action::Zero
                },
            ]
        );
    }

    #[test]
    fn clean_bitmap_plans_nothing() {
        let alloc = map(100, &[(100, 0)]);
        let dirty = map(100, &[(100, 0)]);
        assert!(Plan::incremental(&alloc, &dirty).spans.is_empty());
    }

    #[test]
    fn map_clips_runs_past_the_end_and_merges_equal_neighbours() {
        let runs = map(100, &[(40, 1), (40, 1), (1000, 0)]);
        assert_eq!(
            runs,
            vec![
                Run {
                    offset: 0,
                    length: 80,
                    flags: 1
                },
                Run {
                    offset: 80,
                    length: 20,
                    flags: 0
                }
            ]
        );
    }

    #[test]
    fn short_map_is_an_error() {
        let mut m = ExtentMap::new("base:allocation", 100);
        m.push(60, 0).unwrap();
        assert_eq!(
            m.finish(),
            Err(PlanError::Short {
                context: "base:allocation".into(),
                covered: 60,
                size: 100
            })
        );
    }

    #[test]
    fn empty_extent_is_an_error() {
        let mut m = ExtentMap::new("base:allocation", 100);
        assert!(matches!(
            m.push(0, 0),
            Err(PlanError::EmptyExtent { offset: 0, .. })
        ));
    }

    #[test]
    fn requests_are_cut_at_aligned_boundaries() {
        let plan = Plan {
            spans: vec![
                Span {
                    offset: 3,
                    length: 20,
                    action: Action::Copy,
                },
                Span {
                    offset: 23,
                    length: 100,
                    action: Action::Zero,
                },
            ],
        };
        let pieces: Vec<(u64, u64)> = plan.requests(8).map(|s| (s.offset, s.length)).collect();
        assert_eq!(pieces, vec![(3, 5), (8, 8), (16, 7), (23, 100)]);
    }

    /// A map as (length, flags) pairs over a small export, plus its per-byte model.
    fn arb_map(size: u64, flag_mask: u32) -> impl Strategy<Value = Vec<(u64, u32)>> {
        prop::collection::vec((1..=size / 4 + 1, 0..=flag_mask), 1..20).prop_map(move |mut v| {
            // Make the runs cover at least `size` bytes: the last one is stretched.
            let total: u64 = v.iter().map(|r| r.0).sum();
            if total < size {
                if let Some(last) = v.last_mut() {
                    last.0 += size - total;
                }
            }
            v
        })
    }

    fn per_byte(size: u64, runs: &[Run]) -> Vec<u32> {
        let mut bytes = vec![u32::MAX; size as usize];
        for run in runs {
            for b in run.offset..run.offset + run.length {
                bytes[b as usize] = run.flags;
            }
        }
        bytes
    }

    fn plan_per_byte(size: u64, plan: &Plan) -> Vec<Option<Action>> {
        let mut bytes = vec![None; size as usize];
        for span in &plan.spans {
            for b in span.offset..span.offset + span.length {
                assert!(bytes[b as usize].is_none(), "spans overlap at {b}");
                bytes[b as usize] = Some(span.action);
            }
        }
        bytes
    }

    proptest! {
        #[test]
        fn incremental_plan_matches_per_byte_model(
            alloc in arb_map(64, 3), dirty in arb_map(64, 1), size in 1u64..64,
        ) {
            let alloc = map(size, &alloc);
            let dirty = map(size, &dirty);
            let plan = Plan::incremental(&alloc, &dirty);
            let a = per_byte(size, &alloc);
            let d = per_byte(size, &dirty);
            let got = plan_per_byte(size, &plan);
            for b in 0..size as usize {
                let want = (d[b] & STATE_DIRTY != 0).then(|| action_for(a[b]));
                prop_assert_eq!(got[b], want, "byte {}", b);
            }
            prop_assert!(plan.spans.windows(2).all(|w| w[0].offset + w[0].length <= w[1].offset));
        }

        #[test]
        fn full_plan_covers_every_byte(alloc in arb_map(64, 3), size in 1u64..64) {
            let alloc = map(size, &alloc);
            let plan = Plan::full(&alloc);
            let a = per_byte(size, &alloc);
            let got = plan_per_byte(size, &plan);
            for b in 0..size as usize {
                prop_assert_eq!(got[b], Some(action_for(a[b])));
            }
        }

        #[test]
        fn requests_cover_the_plan_exactly(alloc in arb_map(64, 3), size in 1u64..64, max in 1u64..20) {
            let plan = Plan::full(&map(size, &alloc));
            let pieces: Vec<Span> = plan.requests(max).collect();
            let mut next = 0;
            for p in &pieces {
                prop_assert_eq!(p.offset, next);
                if p.action == Action::Copy {
                    prop_assert!(p.length <= max);
                    prop_assert_eq!(p.offset / max, (p.offset + p.length - 1) / max);
                }
                next = p.offset + p.length;
            }
            prop_assert_eq!(next, size);
        }
    }
}
