//! The checkable data `--verify` writes and later checks.
//!
//! Every 8-byte word of the target holds `splitmix64(seed, byte offset of the word)`,
//! little-endian. The content depends only on the seed and the absolute offset, never on
//! the block size, the order or how often a block was written, so a later run with the
//! same `--seed` (and any `--bs`) can check what an earlier one wrote, and a misplaced
//! write (right data, wrong offset) is caught as surely as a flipped bit.

use serde::Serialize;

use crate::bench::workload::splitmix64;

/// The word expected at byte `offset` (a multiple of 8) for `seed`.
fn word(seed: u64, offset: u64) -> u64 {
    let mut state = seed ^ offset.rotate_left(17);
    splitmix64(&mut state)
}

/// Fill `buf` with the pattern for the block at `offset` (both multiples of 8).
pub fn fill(buf: &mut [u8], seed: u64, offset: u64) {
    for (index, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&word(seed, offset + index as u64 * 8).to_le_bytes());
    }
}

/// The first byte of the block at `offset` that differs from the pattern, if any.
pub fn check(buf: &[u8], seed: u64, offset: u64) -> Option<Mismatch> {
    for (index, chunk) in buf.chunks_exact(8).enumerate() {
        let word_offset = offset + index as u64 * 8;
        let expected = word(seed, word_offset).to_le_bytes();
        if chunk != expected {
            let byte = chunk
                .iter()
                .zip(expected)
                .position(|(got, want)| *got != want)
                .unwrap_or(0);
            return Some(Mismatch {
                block_offset: offset,
                offset: word_offset + byte as u64,
                expected: expected[byte],
                found: chunk[byte],
            });
        }
    }
    None
}

/// A block whose content is not what `--verify` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// Offset of the block that was read.
    pub block_offset: u64,
    /// Offset of the first wrong byte in it.
    pub offset: u64,
    pub expected: u8,
    pub found: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_block_checks_clean() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 9, 1 << 20);
        assert_eq!(check(&buf, 9, 1 << 20), None);
    }

    #[test]
    fn pattern_does_not_depend_on_block_size() {
        let mut big = vec![0u8; 8192];
        fill(&mut big, 5, 0);
        let mut small = vec![0u8; 4096];
        fill(&mut small, 5, 4096);
        assert_eq!(&big[4096..], &small[..]);
    }

    #[test]
    fn flipped_byte_is_reported_at_its_offset() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 1, 8192);
        buf[1234] ^= 0x40;
        let mismatch = check(&buf, 1, 8192).expect("the corruption is found");
        assert_eq!(mismatch.block_offset, 8192);
        assert_eq!(mismatch.offset, 8192 + 1234);
        assert_eq!(mismatch.found, mismatch.expected ^ 0x40);
    }

    #[test]
    fn right_data_at_the_wrong_offset_is_a_mismatch() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 1, 0);
        assert!(check(&buf, 1, 4096).is_some());
    }

    #[test]
    fn another_seed_is_a_mismatch() {
        let mut buf = vec![0u8; 512];
        fill(&mut buf, 1, 0);
        assert!(check(&buf, 2, 0).is_some());
        assert!(check(&[0u8; 512], 2, 0).is_some());
    }
}
