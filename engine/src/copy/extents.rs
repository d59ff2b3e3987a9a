//! Extent lists: parsing the text form, normalising (sort, align, merge, clamp), cutting
//! into I/O-sized chunks, and finding all-zero blocks.

use std::io::BufRead;
use std::ops::Range;

use super::CopyError;
use crate::io::ALIGN;

/// Granularity at which all-zero data becomes a hole. Equal to [`ALIGN`] so punched and
/// written pieces stay O_DIRECT-aligned.
pub const ZERO_BLOCK: usize = ALIGN;

/// The most lines a text extent list may have (a 64 KiB-granular 64 TiB volume).
pub const MAX_TEXT_EXTENTS: usize = 1 << 30;

/// Parse a text extent list: one `offset length` pair per line (decimal, or hex with
/// `0x`), `#` comments and blank lines ignored. `source` names the input in errors.
pub fn parse_text_list(reader: impl BufRead, source: &str) -> Result<Vec<Range<u64>>, CopyError> {
    let mut extents = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line_no = index + 1;
        let line =
            line.map_err(|err| CopyError::Input(format!("{source}: line {line_no}: {err}")))?;
        let text = line.split('#').next().unwrap_or("").trim();
        if text.is_empty() {
            continue;
        }
        let bad = |why: &str| {
            CopyError::Input(format!(
                "{source}: line {line_no}: {why}: {line:?} (expected `OFFSET LENGTH` in bytes)"
            ))
        };
        let mut fields = text.split_whitespace();
        let (Some(offset), Some(length), None) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(bad("need exactly two numbers"));
        };
        let offset = parse_number(offset).ok_or_else(|| bad("bad offset"))?;
        let length = parse_number(length).ok_or_else(|| bad("bad length"))?;
        let end = offset
            .checked_add(length)
            .ok_or_else(|| bad("offset + length overflows"))?;
        if extents.len() >= MAX_TEXT_EXTENTS {
            return Err(bad("too many extents"));
        }
        if length > 0 {
            extents.push(offset..end);
        }
    }
    Ok(extents)
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Refuse an extent list that does not fit a source of `size` bytes: an extent past its
/// end means the wrong snapshot or the wrong list, and clipping it would silently copy
/// less than asked. `source` names the snapshot in the error.
pub fn check_within(extents: &[Range<u64>], size: u64, source: &str) -> Result<(), CopyError> {
    match extents.iter().find(|extent| extent.end > size) {
        Some(extent) => Err(CopyError::Input(format!(
            "the changed extent at offset {} of {} bytes (ending at {}) lies past the end of \
             {source}, which holds {size} bytes; is this the extent list of this snapshot? \
             nothing was written",
            extent.start,
            extent.end - extent.start,
            extent.end
        ))),
        None => Ok(()),
    }
}

/// Sort, widen to [`ALIGN`] boundaries, clamp to `size` and merge overlapping or touching
/// extents. Widening only adds bytes that are copied from the same source, so it never
/// changes the result of a copy; it keeps every request O_DIRECT-aligned.
pub fn normalize(mut extents: Vec<Range<u64>>, size: u64) -> Vec<Range<u64>> {
    let align = ALIGN as u64;
    for extent in &mut extents {
        let start = extent.start / align * align;
        let end = extent.end.div_ceil(align).saturating_mul(align);
        *extent = start.min(size)..end.min(size);
    }
    extents.retain(|extent| !extent.is_empty());
    extents.sort_by_key(|extent| extent.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(extents.len());
    for extent in extents {
        match merged.last_mut() {
            Some(last) if extent.start <= last.end => last.end = last.end.max(extent.end),
            _ => merged.push(extent),
        }
    }
    merged
}

/// Cut `extent` into pieces of at most `chunk` bytes, cut at multiples of `chunk` so
/// neighbouring extents coalesce into the same, full-sized requests.
pub fn chunks(extent: Range<u64>, chunk: u64) -> impl Iterator<Item = Range<u64>> {
    let mut at = extent.start;
    std::iter::from_fn(move || {
        if at >= extent.end {
            return None;
        }
        let boundary = (at / chunk + 1).saturating_mul(chunk);
        let end = boundary.min(extent.end);
        let piece = at..end;
        at = end;
        Some(piece)
    })
}

/// `outer` minus the sorted, disjoint `inner` ranges: the gaps.
pub fn gaps(outer: Range<u64>, inner: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut gaps = Vec::new();
    let mut at = outer.start;
    for range in inner {
        if range.start > at {
            gaps.push(at..range.start.min(outer.end));
        }
        at = at.max(range.end);
    }
    if at < outer.end {
        gaps.push(at..outer.end);
    }
    gaps.retain(|gap| !gap.is_empty());
    gaps
}

/// Whether every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let all = words.by_ref().all(|word| {
        u128::from_ne_bytes(word.try_into().expect("chunks_exact yields 16-byte slices")) == 0
    });
    all && words.remainder().iter().all(|&b| b == 0)
}

/// Split `data` (starting at `ALIGN`-aligned memory) into runs of [`ZERO_BLOCK`] blocks:
/// `(range, zero)` pairs covering it in order. Runs of data are never split.
pub fn zero_runs(data: &[u8]) -> Vec<(Range<usize>, bool)> {
    let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let end = (at + ZERO_BLOCK).min(data.len());
        let zero = is_zero(&data[at..end]);
        match runs.last_mut() {
            Some((range, was_zero)) if *was_zero == zero => range.end = end,
            _ => runs.push((at..end, zero)),
        }
        at = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_lists_parse_and_reject_garbage() {
        let text = "# changed\n0 4096\n0x10000 65536 # comment\n\n8192 0\n";
        assert_eq!(
            parse_text_list(text.as_bytes(), "t").unwrap(),
            vec![0..4096, 0x10000..0x20000]
        );
        for bad in ["1\n", "1 2 3\n", "x 1\n", "18446744073709551615 2\n"] {
            let err = parse_text_list(bad.as_bytes(), "list.txt")
                .unwrap_err()
                .to_string();
            assert!(err.contains("list.txt: line 1"), "{err}");
        }
    }

    #[test]
    fn chunks_cut_at_multiples() {
        let pieces: Vec<_> = chunks(100..300, 128).collect();
        assert_eq!(pieces, vec![100..128, 128..256, 256..300]);
    }

    #[test]
    fn zero_runs_find_the_holes() {
        let mut data = vec![0u8; ZERO_BLOCK * 4];
        data[ZERO_BLOCK + 5] = 1;
        data[ZERO_BLOCK * 2] = 1;
        let runs = zero_runs(&data);
        assert_eq!(
            runs,
            vec![
                (0..ZERO_BLOCK, true),
                (ZERO_BLOCK..ZERO_BLOCK * 3, false),
                (ZERO_BLOCK * 3..ZERO_BLOCK * 4, true)
            ]
        );
    }

    proptest! {
        #[test]
        fn normalize_covers_exactly_the_aligned_union(
            raw in prop::collection::vec((0u64..1 << 20, 1u64..1 << 16), 0..40),
            size in 1u64..(1 << 21),
        ) {
            let extents: Vec<_> = raw.iter().map(|&(o, l)| o..o + l).collect();
            let out = normalize(extents.clone(), size);
            let covered = |x: u64| out.iter().any(|r| r.contains(&x));
            for pair in out.windows(2) {
                prop_assert!(pair[0].end < pair[1].start);
            }
            for r in &out {
                prop_assert!(r.start % ALIGN as u64 == 0 && (r.end % ALIGN as u64 == 0 || r.end == size));
            }
            for e in &extents {
                for x in [e.start, e.end - 1] {
                    if x < size { prop_assert!(covered(x)); }
                }
            }
        }
    }
}
