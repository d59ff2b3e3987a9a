//! Any bytes (and the same bytes with their CRC fixed up) as a repository point index
//! (version 1, 2 or 3): decoding never panics, and what decodes re-encodes (as version 3)
//! into bytes that decode to the same point, with every piece inside the volume and its
//! slot and every zero run inside its slot's data chunk, so the slot readers' indexing
//! cannot go out of range.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "crc_fixup.rs"]
mod crc_fixup;
use crc_fixup::with_crc;
use tidemark_repo::format::{
    chunk_count, ChunkRef, PointIndex, MAX_SLOT_PIECES, MAX_SLOT_ZERO_RUNS,
};

fuzz_target!(|data: &[u8]| {
    let _ = PointIndex::decode(data);
    let data = &with_crc(data)[..];
    let Ok(point) = PointIndex::decode(data) else {
        return;
    };
    assert_eq!(
        point.chunks.len() as u64,
        chunk_count(point.size, point.chunk_size)
    );
    let chunk = u64::from(point.chunk_size);
    for piece in &point.pieces {
        assert!(piece.len > 0 && piece.end() <= point.size);
        assert_eq!(piece.offset / chunk, (piece.end() - 1) / chunk);
    }
    for slot in 0..point.chunks.len() as u64 {
        let pieces = point.slot_pieces(slot);
        assert!(pieces.len() <= MAX_SLOT_PIECES);
        let start = slot * chunk;
        for piece in pieces {
            assert!(piece.end() - start <= point.slot_len(slot));
        }
        let runs = point.slot_zero_runs(slot);
        assert!(runs.len() <= MAX_SLOT_ZERO_RUNS);
        assert!(runs.is_empty() || matches!(point.chunks[slot as usize], ChunkRef::Data(_)));
        for run in runs {
            assert!(run.len > 0);
            assert!(run.end() <= point.slot_len(slot));
        }
        for extent in point.slot_zero_extents(slot) {
            assert!(start <= extent.start && extent.start < extent.end);
            assert!(extent.end <= start + point.slot_len(slot));
        }
        let _ = point.slot_is_zero(slot);
    }
    assert!(point
        .zero_runs
        .iter()
        .all(|run| run.slot < point.chunks.len() as u64));
    let again = PointIndex::decode(&point.encode()).expect("a decoded point re-encodes");
    assert_eq!(again, point);
});
