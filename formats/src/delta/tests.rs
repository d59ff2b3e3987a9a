//! Whole-file tests: what the writer produces, both readers accept, and every damaged byte
//! is refused by both.

use std::io::Cursor;
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::error::{chain, FormatError, FormatErrorKind};
use crate::header::{crc32_with_zeroed_field, HEADER_CRC};
use crate::Uuid;

fn header(volume_size: u64, incremental: bool) -> DeltaHeader {
    DeltaHeader {
        volume_uuid: Uuid::from_u128(0xfeed_beef),
        volume_size,
        granularity: 65536,
        from: incremental.then(|| CheckpointRef {
            name: "monday".into(),
            generation: 3,
        }),
        to: CheckpointRef {
            name: "tuesday".into(),
            generation: 4,
        },
        created_unix: 1_700_000_000,
    }
}

/// Deterministic pseudo-random bytes (xorshift), incompressible.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn text(len: usize) -> Vec<u8> {
    b"tidemark tracks changed blocks. "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// A small delta with every kind of record: compressible, raw, zero.
fn small_delta() -> Vec<u8> {
    let mut w = DeltaWriter::new(Vec::new(), &header(1 << 20, true), 3).unwrap();
    w.write_data(0, &text(300)).unwrap();
    w.write_data(4096, &noise(7, 64)).unwrap();
    w.write_zero(8192, 65536).unwrap();
    w.write_data(200_000, &text(100)).unwrap();
    w.finish().unwrap()
}

/// Opens a delta and reads every extent, as a restore would.
fn read_all(bytes: &[u8]) -> Result<Vec<(IndexEntry, Vec<u8>)>, FormatError> {
    let mut r = DeltaReader::open(Cursor::new(bytes), Path::new("d.delta"))?;
    let mut out = Vec::new();
    for e in r.extents().to_vec() {
        let mut data = Vec::new();
        r.read_extent(&e, &mut data)?;
        out.push((e, data));
    }
    Ok(out)
}

fn stream_all(bytes: &[u8]) -> Result<Vec<(IndexEntry, Vec<u8>)>, FormatError> {
    let mut r = DeltaStreamReader::new(bytes, Path::new("d.delta"))?;
    let mut out = Vec::new();
    while let Some((e, data)) = r.next_extent()? {
        out.push((e, data.to_vec()));
    }
    Ok(out)
}

#[test]
fn header_round_trips_full_and_incremental() {
    for inc in [false, true] {
        let h = header(12345, inc);
        let bytes = h.encode();
        assert_eq!(bytes.len(), HEADER_LEN);
        assert_eq!(DeltaHeader::parse(&bytes, Path::new("x")).unwrap(), h);
    }
}

#[test]
fn round_trip_through_both_readers() {
    let bytes = small_delta();
    let all = read_all(&bytes).unwrap();
    assert_eq!(all, stream_all(&bytes).unwrap());
    let kinds: Vec<_> = all
        .iter()
        .map(|(e, _)| (e.offset, e.kind, e.encoding))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, ExtentKind::Data, Encoding::Zstd),
            (4096, ExtentKind::Data, Encoding::Raw),
            (8192, ExtentKind::Zero, Encoding::Raw),
            (200_000, ExtentKind::Data, Encoding::Zstd),
        ]
    );
    assert_eq!(all[0].1, text(300));
    assert_eq!(all[1].1, noise(7, 64));
    assert!(all[2].1.is_empty());
    assert_eq!(all[3].1, text(100));
    let r = DeltaReader::open(Cursor::new(&bytes), Path::new("d")).unwrap();
    assert_eq!(r.header(), &header(1 << 20, true));
    assert_eq!(r.data_bytes(), 464);
}

#[test]
fn identical_input_gives_identical_bytes() {
    assert_eq!(small_delta(), small_delta());
}

#[test]
fn large_writes_split_into_bounded_records() {
    let size = 3 * MAX_RECORD_DATA as u64 + 100;
    let data = text(size as usize);
    let mut w = DeltaWriter::new(Vec::new(), &header(size, false), 1).unwrap();
    w.write_data(0, &data).unwrap();
    let bytes = w.finish().unwrap();
    let all = read_all(&bytes).unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|(e, _)| e.length <= MAX_RECORD_DATA as u64));
    let joined: Vec<u8> = all.into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(joined, data);
}

#[test]
fn empty_delta_is_valid() {
    let bytes = DeltaWriter::new(Vec::new(), &header(4096, false), 1)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + INDEX_HEADER_LEN + TRAILER_LEN);
    assert!(read_all(&bytes).unwrap().is_empty());
    assert!(stream_all(&bytes).unwrap().is_empty());
}

#[test]
fn writer_refuses_misordered_overlapping_empty_and_out_of_range_extents() {
    let mut w = DeltaWriter::new(Vec::new(), &header(1 << 20, false), 1).unwrap();
    w.write_data(4096, &[1; 4096]).unwrap();
    assert!(
        w.write_data(0, &[1; 10]).is_err(),
        "before the previous extent"
    );
    assert!(w.write_zero(8191, 10).is_err(), "overlapping");
    assert!(w.write_data(8192, &[]).is_err(), "empty");
    assert!(w.write_zero(8192, 0).is_err(), "empty zero");
    assert!(w.write_zero((1 << 20) - 10, 11).is_err(), "past the end");
    assert!(w.write_zero(u64::MAX - 1, 5).is_err(), "overflow");
    w.write_zero(8192, 4096).unwrap();
    w.write_data((1 << 20) - 1, &[9]).unwrap();
    let all = read_all(&w.finish().unwrap()).unwrap();
    assert_eq!(all.len(), 3);
}

#[test]
fn writer_refuses_invalid_header_and_level() {
    let mut h = header(1 << 20, false);
    h.granularity = 1000;
    assert!(matches!(
        DeltaWriter::new(Vec::new(), &h, 1),
        Err(DeltaWriteError::Header(_))
    ));
    let mut h = header(1 << 20, false);
    h.to.name = String::new();
    assert!(DeltaWriter::new(Vec::new(), &h, 1).is_err());
}

#[test]
fn write_errors_print_their_cause_once() {
    let mut h = header(1 << 20, false);
    h.granularity = 1000;
    let e = DeltaWriter::new(Vec::new(), &h, 1).unwrap_err();
    assert_eq!(
        chain(&e),
        "invalid delta header: invalid granularity: 1000 (must be a power of two from 4096 to 1048576)"
    );
    let e = DeltaWriter::new(BrokenDisk, &header(1 << 20, false), 1).unwrap_err();
    assert_eq!(chain(&e), "writing the delta failed: disk on fire");
}

/// An output that fails every write.
struct BrokenDisk;

impl std::io::Write for BrokenDisk {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("disk on fire"))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn read_at_fills_covered_bytes_and_reports_coverage() {
    let bytes = small_delta();
    let mut r = DeltaReader::open(Cursor::new(&bytes), Path::new("d")).unwrap();
    let mut buf = [0xaau8; 100];
    assert!(r.read_at(10, &mut buf).unwrap());
    assert_eq!(&buf[..], &text(300)[10..110]);
    let mut buf = [0xaau8; 100];
    assert!(!r.read_at(250, &mut buf).unwrap(), "50 covered, 50 not");
    assert_eq!(&buf[..50], &text(300)[250..300]);
    assert!(
        buf[50..].iter().all(|&b| b == 0xaa),
        "uncovered bytes untouched"
    );
    let mut buf = [0xaau8; 10];
    assert!(r.read_at(9000, &mut buf).unwrap());
    assert_eq!(buf, [0; 10]);
    let mut buf = [0xaau8; 10];
    assert!(!r.read_at(500_000, &mut buf).unwrap());
    assert_eq!(buf, [0xaa; 10]);
    assert_eq!(r.extents_overlapping(0, 8193).len(), 3);
    assert_eq!(r.extents_overlapping(300, 3796).len(), 0);
}

/// The done-when of the issue: one flipped bit or a cut anywhere is refused, by both
/// readers, with an error naming a byte offset inside the file.
#[test]
fn every_truncation_and_every_bit_flip_is_refused() {
    let bytes = small_delta();
    assert!(
        bytes.len() < 2000,
        "keep the exhaustive test small: {}",
        bytes.len()
    );
    for len in 0..bytes.len() {
        let cut = &bytes[..len];
        let e = read_all(cut).expect_err("truncated delta accepted");
        assert!(e.offset <= len as u64, "cut at {len}: {e}");
        let e = stream_all(cut).expect_err("truncated delta accepted by the stream reader");
        assert!(e.offset <= len as u64, "cut at {len}: {e}");
    }
    for bit in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        let e = read_all(&b).expect_err("bit flip accepted");
        assert!(e.offset < b.len() as u64, "flip {bit}: {e}");
        let e = stream_all(&b).expect_err("bit flip accepted by the stream reader");
        assert!(e.offset < b.len() as u64, "flip {bit}: {e}");
    }
}

#[test]
fn cut_short_file_names_where_the_trailer_should_be() {
    let bytes = small_delta();
    let cut = &bytes[..bytes.len() - 100];
    let e = read_all(cut).unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.offset, cut.len() as u64 - TRAILER_LEN as u64);
    assert!(
        msg.contains(&format!("d.delta: at byte {}", e.offset)),
        "{msg}"
    );
    assert!(msg.contains("cut short"), "{msg}");
    let e = stream_all(cut).unwrap_err();
    assert_eq!(e.offset, cut.len() as u64);
}

#[test]
fn flipped_payload_bit_names_the_payload_offset() {
    let bytes = small_delta();
    let payload_at = HEADER_LEN + RECORD_HEADER_LEN;
    let mut b = bytes.clone();
    b[payload_at + 5] ^= 0x10;
    let e = read_all(&b).unwrap_err();
    assert_eq!(e.offset, payload_at as u64);
    assert!(
        matches!(e.kind, FormatErrorKind::ChecksumMismatch { .. }),
        "{e}"
    );
}

#[test]
fn unknown_incompat_feature_refuses_to_open() {
    let mut bytes = small_delta();
    bytes[16] = 1;
    let crc = crc32_with_zeroed_field(&bytes[..HEADER_LEN], HEADER_CRC);
    bytes[HEADER_CRC].copy_from_slice(&crc.to_le_bytes());
    let e = DeltaReader::open(Cursor::new(&bytes), Path::new("d")).unwrap_err();
    assert!(matches!(
        e.kind,
        FormatErrorKind::UnknownIncompatFeatures { bits: 1, .. }
    ));
}

#[derive(Debug, Clone)]
enum Op {
    Data {
        gap: u64,
        len: usize,
        seed: u64,
        compressible: bool,
    },
    Zero {
        gap: u64,
        len: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..5000, 1usize..6000, any::<u64>(), any::<bool>()).prop_map(
            |(gap, len, seed, compressible)| Op::Data {
                gap,
                len,
                seed,
                compressible
            }
        ),
        (0u64..5000, 1u64..20_000).prop_map(|(gap, len)| Op::Zero { gap, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Writes random extents, then checks both readers and read_at against a byte model.
    #[test]
    fn round_trip_matches_a_byte_model(ops in proptest::collection::vec(op(), 0..12), level in 1i32..4) {
        let volume_size = 1u64 << 18;
        let mut model: Vec<Option<u8>> = vec![None; volume_size as usize];
        let mut w = DeltaWriter::new(Vec::new(), &header(volume_size, false), level).unwrap();
        let mut at = 0u64;
        for op in &ops {
            match op {
                Op::Data { gap, len, seed, compressible } => {
                    let off = at + gap;
                    let data = if *compressible { text(*len) } else { noise(*seed, *len) };
                    if off + *len as u64 > volume_size { break; }
                    w.write_data(off, &data).unwrap();
                    for (i, b) in data.iter().enumerate() { model[off as usize + i] = Some(*b); }
                    at = off + *len as u64;
                }
                Op::Zero { gap, len } => {
                    let off = at + gap;
                    if off + len > volume_size { break; }
                    w.write_zero(off, *len).unwrap();
                    model[off as usize..(off + len) as usize].fill(Some(0));
                    at = off + len;
                }
            }
        }
        let bytes = w.finish().unwrap();
        prop_assert_eq!(read_all(&bytes).unwrap(), stream_all(&bytes).unwrap());
        let mut r = DeltaReader::open(Cursor::new(&bytes), Path::new("d")).unwrap();
        let mut buf = vec![0xeeu8; 4096];
        let mut off = 0u64;
        while off < at.min(volume_size) {
            let n = buf.len().min((volume_size - off) as usize);
            buf.fill(0xee);
            let full = r.read_at(off, &mut buf[..n]).unwrap();
            let mut all = true;
            for (i, &b) in buf[..n].iter().enumerate() {
                match model[off as usize + i] {
                    Some(m) => prop_assert_eq!(b, m),
                    None => { all = false; prop_assert_eq!(b, 0xee) }
                }
            }
            prop_assert_eq!(full, all);
            off += 3000; // misaligned with the buffer, so reads straddle extents
        }
    }

    #[test]
    fn overwritten_bytes_never_panic(pos in 0usize..2000, junk in proptest::collection::vec(any::<u8>(), 1..64)) {
        let mut bytes = small_delta();
        let pos = pos % bytes.len();
        for (i, b) in junk.iter().enumerate() {
            if let Some(x) = bytes.get_mut(pos + i) { *x = *b; }
        }
        let _ = read_all(&bytes);
        let _ = stream_all(&bytes);
    }
}
