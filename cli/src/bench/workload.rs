//! The workload: which operation comes next, and at which offset.
//!
//! A workload covers a region `[0, region)` of the target in blocks of `bs` bytes.
//! Sequential patterns walk the blocks in order; random patterns visit them in a
//! seeded pseudo-random permutation, so one pass touches every block exactly once (as
//! fio does with its default random map) without keeping a map in memory: a keyed
//! Feistel network permutes the block numbers, cycle-walking past the end of the region.
//! Time-based runs start another pass (with a new permutation) when one ends.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The access pattern, named as fio names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads and writes mixed (see --rwmixread).
    Rw,
    /// Random reads and writes mixed (see --rwmixread).
    Randrw,
}

impl Pattern {
    /// Whether this pattern writes to the target.
    pub fn writes(self) -> bool {
        !matches!(self, Pattern::Read | Pattern::Randread)
    }

    fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }

    fn read_percent(self, rwmixread: u8) -> u8 {
        match self {
            Pattern::Read | Pattern::Randread => 100,
            Pattern::Write | Pattern::Randwrite => 0,
            Pattern::Rw | Pattern::Randrw => rwmixread,
        }
    }
}

/// The direction of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// One request of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub direction: Direction,
    pub offset: u64,
}

/// Produces the requests of a workload, one pass over the region after another.
#[derive(Debug)]
pub struct Workload {
    bs: u64,
    blocks: u64,
    read_percent: u8,
    order: Option<BlockPermutation>,
    seed: u64,
    next_index: u64,
    passes: u64,
    mix: SmallRng,
}

impl Workload {
    /// A workload over `blocks` blocks of `bs` bytes. `rwmixread` is the percentage of
    /// reads in the mixed patterns (ignored by the others).
    pub fn new(pattern: Pattern, bs: u64, blocks: u64, rwmixread: u8, seed: u64) -> Workload {
        let order = pattern
            .is_random()
            .then(|| BlockPermutation::new(blocks, seed));
        Workload {
            bs,
            blocks,
            read_percent: pattern.read_percent(rwmixread.min(100)),
            order,
            seed,
            next_index: 0,
            passes: 0,
            mix: SmallRng::seed_from_u64(seed ^ 0x6d69_7864_6972),
        }
    }

    /// The next request; after the last block of a pass the next pass begins.
    pub fn next_op(&mut self) -> Op {
        if self.next_index == self.blocks {
            self.next_index = 0;
            self.passes += 1;
            if let Some(order) = &mut self.order {
                *order = BlockPermutation::new(self.blocks, self.seed.wrapping_add(self.passes));
            }
        }
        let index = self.next_index;
        self.next_index += 1;
        let block = match &self.order {
            Some(order) => order.apply(index),
            None => index,
        };
        let direction = match self.read_percent {
            100 => Direction::Read,
            0 => Direction::Write,
            percent => {
                if self.mix.gen_range(0..100u8) < percent {
                    Direction::Read
                } else {
                    Direction::Write
                }
            }
        };
        Op {
            direction,
            offset: block * self.bs,
        }
    }
}

/// A seeded bijection of `[0, n)`: a balanced Feistel network over the smallest even
/// number of bits that holds `n`, cycle-walking until the result lands inside `[0, n)`.
/// Because the network is a bijection of `[0, 2^bits)` and `2^bits < 4n`, the walk ends
/// after a few steps on average.
#[derive(Debug, Clone)]
pub struct BlockPermutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl BlockPermutation {
    pub fn new(n: u64, seed: u64) -> BlockPermutation {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut state = seed;
        let keys = std::array::from_fn(|_| splitmix64(&mut state));
        BlockPermutation { n, half_bits, keys }
    }

    /// The position of element `index` (which must be below `n`) in the permutation.
    pub fn apply(&self, index: u64) -> u64 {
        let mut value = index;
        loop {
            value = self.feistel(value);
            if value < self.n {
                return value;
            }
        }
    }

    fn feistel(&self, value: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let mut left = value >> self.half_bits;
        let mut right = value & mask;
        for key in self.keys {
            let mut round = right ^ key;
            let mixed = splitmix64(&mut round) & mask;
            (left, right) = (right, left ^ mixed);
        }
        (left << self.half_bits) | right
    }
}

/// One step of splitmix64: a fast, well-mixed 64-bit generator (Steele et al. 2014).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_pass(pattern: Pattern, blocks: u64) -> Vec<Op> {
        let mut workload = Workload::new(pattern, 4096, blocks, 50, 7);
        (0..blocks).map(|_| workload.next_op()).collect()
    }

    #[test]
    fn sequential_read_walks_the_region_in_order_and_wraps() {
        let mut workload = Workload::new(Pattern::Read, 512, 3, 50, 1);
        let offsets: Vec<u64> = (0..7).map(|_| workload.next_op().offset).collect();
        assert_eq!(offsets, [0, 512, 1024, 0, 512, 1024, 0]);
    }

    #[test]
    fn random_pass_touches_every_block_once_and_is_not_sequential() {
        let ops = one_pass(Pattern::Randwrite, 1000);
        let mut offsets: Vec<u64> = ops.iter().map(|op| op.offset).collect();
        let sequential: Vec<u64> = (0..1000).map(|b| b * 4096).collect();
        assert_ne!(offsets, sequential);
        offsets.sort_unstable();
        assert_eq!(offsets, sequential);
        assert!(ops.iter().all(|op| op.direction == Direction::Write));
    }

    #[test]
    fn random_passes_differ_from_each_other() {
        let mut workload = Workload::new(Pattern::Randread, 4096, 64, 50, 3);
        let first: Vec<u64> = (0..64).map(|_| workload.next_op().offset).collect();
        let second: Vec<u64> = (0..64).map(|_| workload.next_op().offset).collect();
        assert_ne!(first, second);
    }

    #[test]
    fn mixed_pattern_follows_rwmixread() {
        let mut workload = Workload::new(Pattern::Randrw, 4096, 10_000, 70, 11);
        let reads = (0..10_000)
            .filter(|_| workload.next_op().direction == Direction::Read)
            .count();
        assert!((6_700..7_300).contains(&reads), "{reads} reads of 10000");
        let ops = one_pass(Pattern::Rw, 100);
        assert!(ops
            .iter()
            .enumerate()
            .all(|(i, op)| op.offset == i as u64 * 4096));
    }

    #[test]
    fn same_seed_gives_the_same_sequence() {
        assert_eq!(
            one_pass(Pattern::Randrw, 500),
            one_pass(Pattern::Randrw, 500)
        );
    }

    proptest! {
        #[test]
        fn permutation_is_a_bijection(n in 1u64..3000, seed in any::<u64>()) {
            let permutation = BlockPermutation::new(n, seed);
            let mut seen = vec![false; n as usize];
            for index in 0..n {
                let value = permutation.apply(index);
                prop_assert!(value < n);
                prop_assert!(!seen[value as usize], "{value} produced twice");
                seen[value as usize] = true;
            }
        }

        #[test]
        fn permutation_stays_in_range_for_huge_regions(n in 1u64..u64::MAX / 2, index in any::<u64>(), seed in any::<u64>()) {
            let permutation = BlockPermutation::new(n, seed);
            prop_assert!(permutation.apply(index % n) < n);
        }
    }
}
