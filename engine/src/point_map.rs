//! The one reader of a restore point's layout: which source holds each byte of a point made
//! of a base (an image, or nothing under a full delta) and a chain of deltas, newest first.
//!
//! Every delta's index is sorted and non-overlapping (the delta reader refuses anything
//! else), so a range resolves by walking the newest layer's extents with a binary search
//! and resolving the gaps between them in the layers below, down to the base. The result
//! names, for each piece of the range in volume order, its [`Origin`]: the base at the
//! same offset, zeros (a zero extent, or what a full delta leaves uncovered), or one data
//! record of one delta. `tidemark verify`'s chain source, `export --chain` and `volume
//! rollback` all read a point through this map.

use std::ops::Range;

use tidemark_formats::delta::{ExtentKind, IndexEntry};

/// Where a piece of a point reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The base image at the same offset.
    Base,
    /// Zeros (a zero extent, or what a full delta does not cover).
    Zero,
    /// Data extent `entry` of the delta `layer` (layers oldest first).
    Record { layer: usize, entry: usize },
}

/// Append to `out`, in volume order, where each byte of `range` reads from: the newest of
/// `layers` (oldest first) that covers it, else `base`. A record partly covered by a newer
/// layer gives one piece per uncovered part.
pub fn resolve<L: AsRef<[IndexEntry]>>(
    range: Range<u64>,
    layers: &[L],
    base: Origin,
    out: &mut Vec<(Range<u64>, Origin)>,
) {
    if range.start >= range.end {
        return;
    }
    let Some((top, below)) = layers.split_last() else {
        out.push((range, base));
        return;
    };
    let top = top.as_ref();
    let first = top.partition_point(|e| e.end() <= range.start);
    let mut at = range.start;
    for (i, e) in top.iter().enumerate().skip(first) {
        if e.offset >= range.end {
            break;
        }
        let (lo, hi) = (e.offset.max(range.start), e.end().min(range.end));
        if at < lo {
            resolve(at..lo, below, base, out);
        }
        let origin = match e.kind {
            ExtentKind::Zero => Origin::Zero,
            ExtentKind::Data => Origin::Record {
                layer: below.len(),
                entry: i,
            },
        };
        out.push((lo..hi, origin));
        at = hi;
    }
    if at < range.end {
        resolve(at..range.end, below, base, out);
    }
}

/// The resolved extent map of a whole point (`0..size`): sorted pieces that cover it, with
/// neighbouring base or zero pieces merged (record pieces never merge: a piece's bytes are
/// found from its record's offset).
#[derive(Debug, Clone, Default)]
pub struct PointMap {
    pieces: Vec<(Range<u64>, Origin)>,
}

impl PointMap {
    /// The map of a point of `size` bytes: `layers` (oldest first) over `base`.
    pub fn new<L: AsRef<[IndexEntry]>>(size: u64, layers: &[L], base: Origin) -> PointMap {
        let mut resolved = Vec::new();
        resolve(0..size, layers, base, &mut resolved);
        let mut pieces: Vec<(Range<u64>, Origin)> = Vec::with_capacity(resolved.len());
        for (range, origin) in resolved {
            match pieces.last_mut() {
                Some((last, kind))
                    if last.end == range.start
                        && *kind == origin
                        && !matches!(origin, Origin::Record { .. }) =>
                {
                    last.end = range.end;
                }
                _ => pieces.push((range, origin)),
            }
        }
        PointMap { pieces }
    }

    /// How many pieces the map holds.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Whether the point is empty.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The pieces of `range`, clipped to it, in volume order (none for an empty range).
    pub fn pieces(&self, range: Range<u64>) -> impl Iterator<Item = (Range<u64>, Origin)> + '_ {
        let first = if range.start < range.end {
            self.pieces.partition_point(|(r, _)| r.end <= range.start)
        } else {
            self.pieces.len()
        };
        self.pieces[first..]
            .iter()
            .take_while(move |(r, _)| r.start < range.end)
            .map(move |(r, origin)| (r.start.max(range.start)..r.end.min(range.end), *origin))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tidemark_formats::delta::Encoding;

    /// An index entry of `length` bytes at `offset`, data or zeros, for tests.
    pub(crate) fn entry(offset: u64, length: u64, data: bool) -> IndexEntry {
        IndexEntry {
            offset,
            length,
            kind: if data {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            },
            record_offset: 0,
            encoding: Encoding::Raw,
            stored_len: 0,
            data_crc: 0,
            stored_crc: 0,
        }
    }

    fn record(layer: usize, entry: usize) -> Origin {
        Origin::Record { layer, entry }
    }

    /// A model: each byte's origin, laying the layers over the base oldest first.
    fn model(size: u64, layers: &[Vec<IndexEntry>], base: Origin) -> Vec<Origin> {
        let mut bytes = vec![base; size as usize];
        for (layer, entries) in layers.iter().enumerate() {
            for (i, e) in entries.iter().enumerate() {
                let origin = match e.kind {
                    ExtentKind::Zero => Origin::Zero,
                    ExtentKind::Data => record(layer, i),
                };
                let end = e.end().min(size);
                for b in &mut bytes[e.offset.min(size) as usize..end as usize] {
                    *b = origin;
                }
            }
        }
        bytes
    }

    fn flatten(pieces: impl Iterator<Item = (Range<u64>, Origin)>) -> Vec<Origin> {
        let mut bytes = Vec::new();
        let mut at = None;
        for (range, origin) in pieces {
            if let Some(end) = at {
                assert_eq!(range.start, end, "pieces leave a gap or overlap");
            }
            at = Some(range.end);
            bytes.extend(std::iter::repeat_n(
                origin,
                (range.end - range.start) as usize,
            ));
        }
        bytes
    }

    #[test]
    fn the_newest_layer_wins_and_gaps_fall_through_to_the_base() {
        let layers = vec![
            vec![
                entry(0, 64, true),
                entry(64, 64, false),
                entry(128, 128, true),
            ],
            vec![entry(8, 4, true), entry(200, 4, false)],
        ];
        let mut out = Vec::new();
        resolve(0..300, &layers, Origin::Base, &mut out);
        assert_eq!(
            out,
            [
                (0..8, record(0, 0)),
                (8..12, record(1, 0)),
                (12..64, record(0, 0)),
                (64..128, Origin::Zero),
                (128..200, record(0, 2)),
                (200..204, Origin::Zero),
                (204..256, record(0, 2)),
                (256..300, Origin::Base),
            ]
        );
    }

    #[test]
    fn a_point_map_merges_base_and_zero_neighbours_but_never_records() {
        let layers = vec![
            vec![
                entry(0, 16, true),
                entry(16, 16, true),
                entry(32, 16, false),
            ],
            vec![entry(48, 16, false)],
        ];
        let map = PointMap::new(80, &layers, Origin::Zero);
        assert_eq!(
            map.pieces(0..80).collect::<Vec<_>>(),
            [
                (0..16, record(0, 0)),
                (16..32, record(0, 1)),
                (32..80, Origin::Zero),
            ]
        );
        assert_eq!(
            map.pieces(10..20).collect::<Vec<_>>(),
            [(10..16, record(0, 0)), (16..20, record(0, 1))]
        );
        assert_eq!(map.pieces(80..90).count(), 0);
        // A reversed range (an offset past the end it was clipped to) is empty too.
        let (start, end) = (20, 10);
        assert_eq!(map.pieces(start..end).count(), 0);
        assert!(PointMap::new(0, &layers, Origin::Base).is_empty());
    }

    #[test]
    fn every_range_resolves_as_the_byte_model_over_random_chains() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for round in 0..200 {
            let size = 1 + next(300);
            let layers: Vec<Vec<IndexEntry>> = (0..next(4))
                .map(|_| {
                    let mut at = next(20);
                    let mut entries = Vec::new();
                    while at < size {
                        let length = 1 + next(40);
                        entries.push(entry(at, length.min(size - at), next(3) != 0));
                        at += length + next(30);
                    }
                    entries
                })
                .collect();
            let base = if round % 2 == 0 {
                Origin::Base
            } else {
                Origin::Zero
            };
            let want = model(size, &layers, base);
            let map = PointMap::new(size, &layers, base);
            assert_eq!(flatten(map.pieces(0..size)), want, "round {round}");
            let (a, b) = (next(size), next(size));
            let range = a.min(b)..a.max(b);
            let mut out = Vec::new();
            resolve(range.clone(), &layers, base, &mut out);
            let slice = &want[range.start as usize..range.end as usize];
            assert_eq!(flatten(out.into_iter()), slice, "round {round}");
            assert_eq!(flatten(map.pieces(range)), slice, "round {round}");
        }
    }
}
