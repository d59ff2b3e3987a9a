use std::io::BufWriter;
use std::path::{Path, PathBuf};

use tidemark_formats::delta::{CheckpointRef, DeltaHeader, DeltaWriter};
use tidemark_nbd::export::{Export, MetaContext, ZeroFlags, STATE_ZERO};

use super::{ChainError, ChainExport, Overlay};

const SIZE: u64 = 4 << 20;
const UUID: &str = "5a1e0000-0000-4000-8000-0000000000c1";

/// A deterministic byte stream (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn checkpoint(name: &str, generation: u64) -> CheckpointRef {
    CheckpointRef {
        name: name.into(),
        generation,
    }
}

/// A delta of `extents` ((offset, Some(data)) or (offset, None = zeros of `len`)),
/// applied to `model` as restore would apply it.
fn write_delta(
    path: &Path,
    from: Option<CheckpointRef>,
    to: CheckpointRef,
    extents: &[(u64, u64, Option<Vec<u8>>)],
    model: &mut [u8],
) {
    let header = DeltaHeader {
        volume_uuid: UUID.parse().unwrap(),
        volume_size: SIZE,
        granularity: 65536,
        from,
        to,
        created_unix: 1_700_000_000,
    };
    let file = std::fs::File::create(path).unwrap();
    let mut writer = DeltaWriter::new(BufWriter::new(file), &header, 1).unwrap();
    for (offset, len, data) in extents {
        let range = *offset as usize..(*offset + *len) as usize;
        match data {
            Some(bytes) => {
                writer.write_data(*offset, bytes).unwrap();
                model[range].copy_from_slice(bytes);
            }
            None => {
                writer.write_zero(*offset, *len).unwrap();
                model[range].fill(0);
            }
        }
    }
    writer.finish().unwrap();
}

/// Sorted, non-overlapping random extents, about a third of them zeros.
fn random_extents(rng: &mut Rng, count: usize) -> Vec<(u64, u64, Option<Vec<u8>>)> {
    let mut starts: Vec<u64> = (0..count).map(|_| rng.below(SIZE / 512) * 512).collect();
    starts.sort_unstable();
    starts.dedup();
    let mut out = Vec::new();
    let mut end = 0;
    for (i, &start) in starts.iter().enumerate() {
        let start = start.max(end);
        let limit = starts.get(i + 1).copied().unwrap_or(SIZE).min(SIZE);
        if start >= limit {
            continue;
        }
        let len = (1 + rng.below(300_000)).min(limit - start);
        let data = (rng.below(3) != 0).then(|| rng.bytes(len as usize));
        out.push((start, len, data));
        end = start + len;
    }
    out
}

/// A base image (data with a hole in the middle) and three incremental deltas, and the
/// bytes a restore of the whole chain gives.
struct Point {
    dir: tempfile::TempDir,
    model: Vec<u8>,
}

impl Point {
    fn new(full_delta_base: bool, seed: u64) -> Point {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed);
        let mut model = rng.bytes(SIZE as usize);
        model[SIZE as usize / 4..SIZE as usize / 2].fill(0);
        if full_delta_base {
            let full = vec![
                (0, SIZE / 4, Some(model[..SIZE as usize / 4].to_vec())),
                (SIZE / 4, SIZE / 4, None),
                (
                    SIZE / 2,
                    SIZE / 2,
                    Some(model[SIZE as usize / 2..].to_vec()),
                ),
            ];
            let mut scratch = model.clone();
            write_delta(
                &dir.path().join("base"),
                None,
                checkpoint("mon", 1),
                &full,
                &mut scratch,
            );
        } else {
            let image = std::fs::File::create(dir.path().join("base")).unwrap();
            image.set_len(SIZE).unwrap();
            use std::os::unix::fs::FileExt;
            image.write_all_at(&model[..SIZE as usize / 4], 0).unwrap();
            image
                .write_all_at(&model[SIZE as usize / 2..], SIZE / 2)
                .unwrap();
        }
        let days = [
            ("tue", "mon", 1, 2),
            ("wed", "tue", 2, 3),
            ("thu", "wed", 3, 4),
        ];
        for (day, from, from_gen, to_gen) in days {
            let extents = random_extents(&mut rng, 40);
            write_delta(
                &dir.path().join(day),
                Some(checkpoint(from, from_gen)),
                checkpoint(day, to_gen),
                &extents,
                &mut model,
            );
        }
        Point { dir, model }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn deltas(&self) -> Vec<PathBuf> {
        ["tue", "wed", "thu"].map(|d| self.path(d)).to_vec()
    }

    fn open(&self) -> ChainExport {
        ChainExport::open(&self.path("base"), &self.deltas()).unwrap()
    }
}

fn check_reads(export: &ChainExport, model: &[u8], seed: u64) {
    let mut rng = Rng(seed);
    let mut whole = vec![0u8; SIZE as usize];
    export.read(0, &mut whole).unwrap();
    assert!(whole == model, "the whole point differs from the model");
    for _ in 0..300 {
        let offset = rng.below(SIZE);
        let len = (1 + rng.below(200_000)).min(SIZE - offset);
        let mut buf = vec![0xAAu8; len as usize];
        export.read(offset, &mut buf).unwrap();
        assert!(
            buf[..] == model[offset as usize..(offset + len) as usize],
            "read of {len} bytes at {offset} differs"
        );
    }
}

#[test]
fn reads_resolve_newest_delta_first_then_the_base_image() {
    let point = Point::new(false, 7);
    check_reads(&point.open(), &point.model, 1);
}

#[test]
fn reads_resolve_over_a_full_delta_base() {
    let point = Point::new(true, 11);
    check_reads(&point.open(), &point.model, 2);
}

#[test]
fn allocation_covers_the_point_and_its_zero_runs_read_as_zeros() {
    for full in [false, true] {
        let point = Point::new(full, 13);
        let export = point.open();
        let mut at = 0;
        while at < SIZE {
            let extents = export
                .block_status(&MetaContext::BaseAllocation, at, SIZE - at)
                .unwrap();
            assert!(!extents.is_empty());
            for extent in extents {
                let end = (at + extent.length).min(SIZE);
                if extent.flags & STATE_ZERO != 0 {
                    assert!(
                        point.model[at as usize..end as usize]
                            .iter()
                            .all(|b| *b == 0),
                        "{at}..{end} is reported zero but holds data (full base: {full})"
                    );
                }
                at = end;
            }
        }
    }
}

#[test]
fn a_chain_out_of_order_is_refused_naming_both_files() {
    let point = Point::new(false, 17);
    let deltas = [point.path("tue"), point.path("thu"), point.path("wed")];
    let err = ChainExport::open(&point.path("base"), &deltas).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ChainError::Chain(_)), "{text}");
    assert!(
        text.contains("tue") && text.contains("thu") && text.contains("chain break"),
        "{text}"
    );
}

#[test]
fn an_incremental_delta_as_base_is_refused() {
    let point = Point::new(false, 19);
    let err = ChainExport::open(&point.path("tue"), &[point.path("wed")]).unwrap_err();
    assert!(
        err.to_string().contains("must start with a full backup"),
        "{err}"
    );
}

#[test]
fn the_point_is_read_only_without_an_overlay() {
    let point = Point::new(false, 23);
    let export = point.open();
    assert!(export.capabilities().read_only);
    let err = export.write(0, &[1; 512], false).unwrap_err();
    assert!(err.message.contains("--overlay"), "{err}");
}

fn overlay_export(point: &Point) -> ChainExport {
    let export = point.open();
    let overlay = Overlay::open(&point.path("overlay"), SIZE, &export.point()).unwrap();
    export.with_overlay(overlay)
}

#[test]
fn overlay_writes_read_back_over_the_chain_and_survive_a_reopen() {
    let point = Point::new(false, 29);
    let before: Vec<Vec<u8>> = ["base", "tue", "wed", "thu"]
        .iter()
        .map(|n| std::fs::read(point.path(n)).unwrap())
        .collect();
    let mut model = point.model.clone();
    let mut rng = Rng(31);
    {
        let export = overlay_export(&point);
        assert!(!export.capabilities().read_only);
        for i in 0..200 {
            let offset = rng.below(SIZE);
            let len = (1 + rng.below(70_000)).min(SIZE - offset);
            if i % 10 == 0 {
                export
                    .write_zeroes(offset, len, ZeroFlags::default())
                    .unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            } else {
                let data = rng.bytes(len as usize);
                export.write(offset, &data, i % 7 == 0).unwrap();
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
        }
        check_reads(&export, &model, 3);
        export.close().unwrap();
    }
    let export = overlay_export(&point);
    check_reads(&export, &model, 4);
    for (name, bytes) in ["base", "tue", "wed", "thu"].iter().zip(before) {
        assert!(
            std::fs::read(point.path(name)).unwrap() == bytes,
            "{name} changed"
        );
    }
}

#[test]
fn unflushed_overlay_writes_read_the_chain_after_a_crash_and_flushed_ones_stay() {
    let point = Point::new(false, 37);
    let export = overlay_export(&point);
    export.write(8192, &[0x11; 4096], false).unwrap();
    export.flush().unwrap();
    export.write(65536, &[0x22; 4096], false).unwrap();
    // A crash: no close, no flush of the second write.
    drop(export);
    let export = overlay_export(&point);
    let mut buf = vec![0u8; 4096];
    export.read(8192, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x11));
    export.read(65536, &mut buf).unwrap();
    assert!(buf[..] == point.model[65536..65536 + 4096]);
}

#[test]
fn an_overlay_of_another_point_is_refused() {
    let point = Point::new(false, 41);
    overlay_export(&point).close().unwrap();
    let shorter = ChainExport::open(&point.path("base"), &point.deltas()[..2]).unwrap();
    let err = Overlay::open(&point.path("overlay"), SIZE, &shorter.point()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("\"thu\"") && text.contains("\"wed\""),
        "{text}"
    );
}

#[test]
fn a_file_that_is_not_an_overlay_is_refused() {
    let point = Point::new(false, 43);
    let export = point.open();
    let err = Overlay::open(&point.path("tue"), SIZE, &export.point()).unwrap_err();
    assert!(err.to_string().contains("not an overlay"), "{err}");
}
