//! Bytes decoded into a list of extents: write them as a delta, then both readers must give
//! back exactly what was written, and writing twice gives identical bytes.
//!
//! Input: byte 0 picks the zstd level (1..=3); then 5-byte ops: kind (even = data, odd =
//! zero), gap (u16 LE) from the previous extent, length (u16 LE, +1). Data is a pattern
//! from the kind byte, half compressible, half not.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::delta::{
    CheckpointRef, DeltaHeader, DeltaReader, DeltaStreamReader, DeltaWriter, ExtentKind,
};
use tidemark_formats::Uuid;

const VOLUME: u64 = 1 << 22;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    if seed & 2 == 0 {
        vec![seed; len]
    } else {
        let mut x = u32::from(seed) | 1;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect()
    }
}

fn write(level: i32, ops: &[(bool, u64, Vec<u8>, u64)]) -> Vec<u8> {
    let header = DeltaHeader {
        volume_uuid: Uuid::from_u128(5),
        volume_size: VOLUME,
        granularity: 65536,
        from: None,
        to: CheckpointRef {
            name: "fuzz".into(),
            generation: 1,
        },
        created_unix: 0,
    };
    let mut w = DeltaWriter::new(Vec::new(), &header, level).expect("valid header");
    for (data, off, bytes, len) in ops {
        if *data {
            w.write_data(*off, bytes).expect("ordered extent");
        } else {
            w.write_zero(*off, *len).expect("ordered extent");
        }
    }
    w.finish().expect("in-memory write")
}

fuzz_target!(|input: &[u8]| {
    let Some((&level, rest)) = input.split_first() else {
        return;
    };
    let level = i32::from(level % 3) + 1;
    let mut ops = Vec::new();
    let mut at = 0u64;
    for op in rest.chunks_exact(5) {
        let gap = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let len = u64::from(u16::from_le_bytes([op[3], op[4]])) + 1;
        let off = at + gap;
        if off + len > VOLUME {
            break;
        }
        let data = op[0] % 2 == 0;
        let bytes = if data {
            pattern(op[0], len as usize)
        } else {
            Vec::new()
        };
        ops.push((data, off, bytes, len));
        at = off + len;
    }
    let file = write(level, &ops);
    assert_eq!(file, write(level, &ops), "identical input, identical bytes");

    let mut r = DeltaReader::open(Cursor::new(&file), Path::new("rt")).expect("own output opens");
    assert_eq!(r.extents().len(), ops.len());
    let mut s = DeltaStreamReader::new(file.as_slice(), Path::new("rt")).expect("stream opens");
    for (i, (data, off, bytes, len)) in ops.iter().enumerate() {
        let e = r.extents()[i];
        assert_eq!((e.offset, e.length), (*off, *len));
        assert_eq!(e.kind == ExtentKind::Data, *data);
        let mut out = Vec::new();
        r.read_extent(&e, &mut out).expect("own output reads");
        assert_eq!(&out, bytes);
        let (se, sd) = s
            .next_extent()
            .expect("stream reads")
            .expect("extent present");
        assert_eq!(se, e);
        assert_eq!(sd, bytes.as_slice());
    }
    assert!(s.next_extent().expect("index and trailer verify").is_none());
});
