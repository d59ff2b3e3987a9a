//! The image builder: sparse image files with known contents, and bitmap files for them.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use anyhow::bail;
use rand::{RngCore, SeedableRng};

use std::time::Duration;

use crate::run::run;

pub const MIB: u64 = 1 << 20;

/// A deterministic byte pattern: the byte at offset `o` of a patterned image.
pub fn pattern(o: u64) -> u8 {
    (o.wrapping_mul(2654435761) >> 13) as u8
}

/// An image file being filled: holes wherever nothing was written.
#[derive(Debug)]
pub struct Image(File);

impl Image {
    /// A new sparse image of `size` bytes, all holes.
    pub fn create(path: impl AsRef<Path>, size: u64) -> std::io::Result<Image> {
        let file = File::create(path)?;
        file.set_len(size)?;
        Ok(Image(file))
    }

    /// An existing image, to be overwritten in place.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Image> {
        Ok(Image(std::fs::OpenOptions::new().write(true).open(path)?))
    }

    /// Write the [`pattern`] into `len` bytes at `offset`.
    pub fn pattern(&self, offset: u64, len: u64) -> std::io::Result<&Image> {
        let bytes: Vec<u8> = (offset..offset + len).map(pattern).collect();
        self.0.write_all_at(&bytes, offset)?;
        Ok(self)
    }

    /// Write random bytes into `ranges`, in order, from one generator seeded with `seed`.
    pub fn random(&self, ranges: &[Range<u64>], seed: u64) -> std::io::Result<&Image> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        for range in ranges {
            let mut bytes = vec![0u8; (range.end - range.start) as usize];
            rng.fill_bytes(&mut bytes);
            self.0.write_all_at(&bytes, range.start)?;
        }
        Ok(self)
    }

    /// Write zeros (allocated, not holes) into `ranges`.
    pub fn zeros(&self, ranges: &[Range<u64>]) -> std::io::Result<&Image> {
        for range in ranges {
            let bytes = vec![0u8; (range.end - range.start) as usize];
            self.0.write_all_at(&bytes, range.start)?;
        }
        Ok(self)
    }

    /// Make what was written durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.0.sync_all()
    }
}

/// A sparse image of `size` bytes with the [`pattern`] in the `(offset, length)` ranges.
pub fn pattern_image(path: &Path, size: u64, data: &[(u64, u64)]) -> anyhow::Result<()> {
    let image = Image::create(path, size)?;
    for &(offset, len) in data {
        image.pattern(offset, len)?;
    }
    image.sync()?;
    Ok(())
}

/// A sparse image of `size` bytes: random data in `data`, written zeros in `zeros`,
/// holes elsewhere.
pub fn random_image(path: &str, size: u64, data: &[Range<u64>], zeros: &[Range<u64>], seed: u64) {
    Image::create(path, size)
        .and_then(|image| image.random(data, seed)?.zeros(zeros).map(drop))
        .unwrap_or_else(|err| panic!("making {path}: {err}"));
}

/// Overwrite `ranges` of an existing image with new random bytes.
pub fn scribble(path: &str, ranges: &[Range<u64>], seed: u64) {
    Image::open(path)
        .and_then(|image| image.random(ranges, seed).map(drop))
        .unwrap_or_else(|err| panic!("scribbling on {path}: {err}"));
}

/// Write a tidemark bitmap file with the given dirty blocks.
pub fn make_bitmap(
    path: &Path,
    name: &str,
    granularity: u32,
    size: u64,
    dirty: &[u64],
) -> anyhow::Result<()> {
    use tidemark_formats::bitmap::{set_dirty, write_bitmap_file, BitmapHeader};
    let header = BitmapHeader::new(uuid::Uuid::new_v4(), name, granularity, size, 1)?;
    let mut words = vec![0u64; header.word_count()];
    for &b in dirty {
        set_dirty(&mut words, b);
    }
    write_bitmap_file(path, &header, &words)?;
    Ok(())
}

/// Bytes allocated on disk.
pub fn allocated(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// `cmp A B` (the real tool; only the first `limit` bytes when given): whether the files
/// are byte for byte equal.
pub fn cmp_equal(
    a: impl AsRef<Path>,
    b: impl AsRef<Path>,
    limit: Option<u64>,
) -> anyhow::Result<bool> {
    let mut command = Command::new("cmp");
    if let Some(limit) = limit {
        command.arg("-n").arg(limit.to_string());
    }
    let out = run(
        command.arg(a.as_ref()).arg(b.as_ref()),
        Duration::from_secs(60),
    )?;
    match out.code() {
        0 => Ok(true),
        1 => {
            eprintln!("cmp: {}{}", out.stdout, out.stderr);
            Ok(false)
        }
        _ => bail!("cmp failed: {}", out.stderr),
    }
}

/// 64 KiB-aligned random extents of 1..=4 blocks inside `size`, `count` of them.
pub fn random_extents(size: u64, count: usize, seed: u64) -> Vec<Range<u64>> {
    use rand::Rng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let blocks = size / 65536;
    (0..count)
        .map(|_| {
            let start = rng.gen_range(0..blocks) * 65536;
            let len = (rng.gen_range(1..=4u64) * 65536).min(size - start);
            start..start + len
        })
        .collect()
}

/// The text-list form of `extents` (`OFFSET LENGTH` lines), as update-img reads it.
pub fn text_list(extents: &[Range<u64>]) -> String {
    extents
        .iter()
        .map(|r| format!("{} {}\n", r.start, r.end - r.start))
        .collect()
}
