//! Dirty bits in memory that cost memory only where bits are set.
//!
//! A [`PagedBits`] is a directory of 4 KiB leaf pages (32768 bits each, the bitmap file's
//! own payload pages): a page with no bit set is not allocated, so a 64 TiB volume tracked
//! at 64 KiB with 0.01% of its blocks dirty holds a few hundred KiB instead of 128 MiB.
//! Bit `i` is bit `i % 64` of word `(i / 64) % PAGE_WORDS` of page `i / PAGE_BITS`, the
//! same numbering as the file's flat payload. Counts, runs and ORs walk only the allocated
//! pages.

use std::collections::BTreeMap;
use std::ops::Range;

use super::dirty_runs;

/// Bytes per page (a payload page of the bitmap file).
pub const PAGE_BYTES: usize = 4096;
/// u64 words per page.
pub const PAGE_WORDS: usize = PAGE_BYTES / 8;
/// Bits per page.
pub const PAGE_BITS: u64 = PAGE_WORDS as u64 * 64;

/// One leaf page of bits.
pub type Page = [u64; PAGE_WORDS];

/// A bit set of a fixed length, stored as lazily allocated pages (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PagedBits {
    len: u64,
    /// Only pages with at least one bit set.
    pages: BTreeMap<u64, Box<Page>>,
}

impl PagedBits {
    /// `len` clear bits; nothing is allocated.
    pub fn new(len: u64) -> PagedBits {
        PagedBits {
            len,
            pages: BTreeMap::new(),
        }
    }

    /// The bits of a flat word slice (bit `i % 64` of word `i / 64`), cut to `len` bits.
    pub fn from_words(words: &[u64], len: u64) -> PagedBits {
        let mut bits = PagedBits::new(len);
        for (p, chunk) in words.chunks(PAGE_WORDS).enumerate() {
            if chunk.iter().any(|&w| w != 0) {
                let mut page = [0u64; PAGE_WORDS];
                page[..chunk.len()].copy_from_slice(chunk);
                bits.or_page(p as u64, &page);
            }
        }
        bits
    }

    /// The bits as flat words: `ceil(len / 64)` of them.
    pub fn to_words(&self) -> Vec<u64> {
        let mut words = vec![0u64; self.len.div_ceil(64) as usize];
        self.or_words_into(0, &mut words);
        words
    }

    /// Number of bits.
    pub fn bit_len(&self) -> u64 {
        self.len
    }

    /// Number of pages the bits span (allocated or not).
    pub fn page_count(&self) -> u64 {
        self.len.div_ceil(PAGE_BITS)
    }

    /// Number of allocated pages (each holds at least one set bit).
    pub fn allocated_pages(&self) -> usize {
        self.pages.len()
    }

    /// Whether bit `bit` is set (false past the end).
    pub fn get(&self, bit: u64) -> bool {
        self.pages.get(&(bit / PAGE_BITS)).is_some_and(|page| {
            let b = bit % PAGE_BITS;
            page[(b / 64) as usize] >> (b % 64) & 1 == 1
        })
    }

    /// Set every bit of `bits` (clamped to the length); pages are allocated as needed.
    pub fn set_range(&mut self, bits: Range<u64>) {
        let end = bits.end.min(self.len);
        let mut b = bits.start;
        while b < end {
            let p = b / PAGE_BITS;
            let stop = end.min((p + 1) * PAGE_BITS);
            let page = self
                .pages
                .entry(p)
                .or_insert_with(|| Box::new([0u64; PAGE_WORDS]));
            let base = p * PAGE_BITS;
            super::set_dirty_range(&mut page[..], b - base..stop - base);
            b = stop;
        }
    }

    /// Clear every bit of `bits` (clamped to the length); a page left with no bit set is
    /// freed.
    pub fn clear_range(&mut self, bits: Range<u64>) {
        let end = bits.end.min(self.len);
        if bits.start >= end {
            return;
        }
        let pages: Vec<u64> = self
            .pages
            .range(bits.start / PAGE_BITS..end.div_ceil(PAGE_BITS))
            .map(|(&p, _)| p)
            .collect();
        for p in pages {
            let base = p * PAGE_BITS;
            let from = bits.start.max(base) - base;
            let to = end.min(base + PAGE_BITS) - base;
            let Some(page) = self.pages.get_mut(&p) else {
                continue;
            };
            let mut b = from;
            while b < to {
                let n = (64 - b % 64).min(to - b);
                let mask = if n == 64 {
                    u64::MAX
                } else {
                    ((1u64 << n) - 1) << (b % 64)
                };
                page[(b / 64) as usize] &= !mask;
                b += n;
            }
            if page.iter().all(|&w| w == 0) {
                self.pages.remove(&p);
            }
        }
    }

    /// OR `page` into page `index`; bits past the length are dropped, and an all-clear
    /// page allocates nothing.
    pub fn or_page(&mut self, index: u64, page: &Page) {
        let base = index.saturating_mul(PAGE_BITS);
        if base >= self.len || page.iter().all(|&w| w == 0) {
            return;
        }
        let dst = self
            .pages
            .entry(index)
            .or_insert_with(|| Box::new([0u64; PAGE_WORDS]));
        for (d, s) in dst.iter_mut().zip(page) {
            *d |= s;
        }
        let valid = self.len - base;
        if valid < PAGE_BITS {
            let last = (valid / 64) as usize;
            if valid % 64 != 0 {
                dst[last] &= (1u64 << (valid % 64)) - 1;
                dst[last + 1..].fill(0);
            } else {
                dst[last..].fill(0);
            }
            if dst.iter().all(|&w| w == 0) {
                self.pages.remove(&index);
            }
        }
    }

    /// OR `other` into these bits, walking only `other`'s allocated pages.
    pub fn or_assign(&mut self, other: &PagedBits) {
        for (&p, page) in &other.pages {
            self.or_page(p, page);
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.pages
            .values()
            .map(|page| page.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum()
    }

    /// The allocated pages `(index, page)`, in increasing order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &Page)> + '_ {
        self.pages.iter().map(|(&p, page)| (p, &**page))
    }

    /// The allocated pages whose index is in `range`, in increasing order.
    pub fn pages_in(&self, range: Range<u64>) -> impl Iterator<Item = (u64, &Page)> + '_ {
        let range = range.start..range.end.max(range.start);
        self.pages.range(range).map(|(&p, page)| (p, &**page))
    }

    /// OR the flat words `first..first + out.len()` into `out` (words past the end are
    /// clear), walking only the allocated pages of the window.
    pub fn or_words_into(&self, first: usize, out: &mut [u64]) {
        let end = first + out.len();
        let pages = (first / PAGE_WORDS) as u64..end.div_ceil(PAGE_WORDS) as u64;
        for (p, page) in self.pages_in(pages) {
            let base = p as usize * PAGE_WORDS;
            let from = first.max(base);
            let to = end.min(base + PAGE_WORDS);
            for (o, w) in out[from - first..to - first]
                .iter_mut()
                .zip(&page[from - base..to - base])
            {
                *o |= w;
            }
        }
    }

    /// Runs of set bits, in increasing order, merged across page boundaries.
    pub fn runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let len = self.len;
        let mut pieces = self
            .pages
            .iter()
            .flat_map(move |(&p, page)| {
                let base = p * PAGE_BITS;
                dirty_runs(&page[..], (len - base).min(PAGE_BITS))
                    .map(move |r| base + r.start..base + r.end)
            })
            .peekable();
        std::iter::from_fn(move || {
            let mut run = pieces.next()?;
            while let Some(next) = pieces.next_if(|n| n.start == run.end) {
                run.end = next.end;
            }
            Some(run)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model_runs(bits: &[bool]) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (i, &b) in bits.iter().enumerate() {
            let i = i as u64;
            if !b {
                continue;
            }
            match out.last_mut() {
                Some(r) if r.end == i => r.end += 1,
                _ => out.push(i..i + 1),
            }
        }
        out
    }

    #[test]
    fn clean_bits_allocate_nothing_and_one_bit_one_page() {
        let mut b = PagedBits::new(1 << 30);
        assert_eq!(b.allocated_pages(), 0);
        b.set_range(5 * PAGE_BITS + 7..5 * PAGE_BITS + 8);
        assert_eq!(b.allocated_pages(), 1);
        assert!(b.get(5 * PAGE_BITS + 7));
        b.clear_range(0..1 << 30);
        assert_eq!(b.allocated_pages(), 0, "an all-clear page is freed");
    }

    #[test]
    fn or_page_drops_bits_past_the_end() {
        let mut b = PagedBits::new(PAGE_BITS + 70);
        b.or_page(1, &[u64::MAX; PAGE_WORDS]);
        assert_eq!(b.count_ones(), 70);
        b.or_page(2, &[u64::MAX; PAGE_WORDS]);
        assert_eq!(b.allocated_pages(), 1);
        let mut c = PagedBits::new(PAGE_BITS + 64);
        c.or_page(1, &[u64::MAX; PAGE_WORDS]);
        assert_eq!(c.count_ones(), 64);
    }

    /// Operations a test applies to both the paged bits and a `Vec<bool>` model.
    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
        Or(Vec<(u64, u64)>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0u64..140_000, 0u64..70_000);
        prop_oneof![
            4 => range.prop_map(|(s, n)| Op::Set(s, n)),
            1 => (0u64..140_000, 0u64..70_000).prop_map(|(s, n)| Op::Clear(s, n)),
            2 => proptest::collection::vec((0u64..140_000, 0u64..3000), 0..6).prop_map(Op::Or),
        ]
    }

    proptest! {
        /// Marks, clears and ORs of a chain of bitmaps agree with a `Vec<bool>` in bits,
        /// counts, runs, flat words and windows; no page is allocated without a set bit.
        #[test]
        fn paged_bits_match_a_vec_of_bools(
            len in 1u64..140_000,
            ops in proptest::collection::vec(op(), 0..12),
            window in (0usize..2300, 0usize..700),
        ) {
            let mut bits = PagedBits::new(len);
            let mut model = vec![false; len as usize];
            let apply = |model: &mut Vec<bool>, r: Range<u64>, v: bool| {
                for i in r.start.min(len)..r.end.min(len) {
                    model[i as usize] = v;
                }
            };
            for op in ops {
                match op {
                    Op::Set(s, n) => {
                        bits.set_range(s..s + n);
                        apply(&mut model, s..s + n, true);
                    }
                    Op::Clear(s, n) => {
                        bits.clear_range(s..s + n);
                        apply(&mut model, s..s + n, false);
                    }
                    Op::Or(marks) => {
                        let mut other = PagedBits::new(len);
                        for (s, n) in marks {
                            other.set_range(s..s + n);
                            apply(&mut model, s..s + n, true);
                        }
                        bits.or_assign(&other);
                    }
                }
            }
            for (i, &m) in model.iter().enumerate() {
                prop_assert_eq!(bits.get(i as u64), m, "bit {}", i);
            }
            prop_assert_eq!(bits.count_ones(), model.iter().filter(|&&b| b).count() as u64);
            prop_assert_eq!(bits.runs().collect::<Vec<_>>(), model_runs(&model));
            for (_, page) in bits.pages() {
                prop_assert!(page.iter().any(|&w| w != 0));
            }
            let words = bits.to_words();
            prop_assert_eq!(&PagedBits::from_words(&words, len), &bits);
            let (first, n) = window;
            let mut out = vec![0u64; n];
            bits.or_words_into(first, &mut out);
            for (i, &w) in out.iter().enumerate() {
                prop_assert_eq!(w, words.get(first + i).copied().unwrap_or(0));
            }
        }
    }
}
