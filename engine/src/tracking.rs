//! Dirty tracking: the active bitmap of a volume (the latest checkpoint's), its durable
//! group commit, and frozen bitmaps handed to backups.
//!
//! # The active bitmap
//!
//! Only the latest checkpoint's bitmap records writes; older ones are frozen (Clean on
//! disk, crc-checked, held in memory as `PagedBits`). The active bitmap lives in memory as
//! `AtomicU64` words, one bit per tracking block (bit `i % 64` of word `i / 64`, the file's
//! own layout), in 4 KiB pages allocated at their first mark, and in its file
//! (`tidemark_formats::bitmap`, paged layout): a 4 KiB header, then the payload, whose clean
//! pages are holes, then the page crc table (written when the bitmap is frozen). While
//! open, the header says `InUse` (or stays `Inconsistent` if it already was). Memory, disk
//! and start-up therefore grow with the pages written, not with the volume's size.
//!
//! # Durable mode: write order, and why it is safe
//!
//! For every data write, before the data write is issued:
//!
//! 1. For each touched block, if its bit is already in the *synced* shadow (a second set of
//!    words holding only bits known to be on stable storage), nothing is needed: rewrites of
//!    dirty blocks cost no sync and no wait.
//! 2. Otherwise the bit is set with an atomic OR and its 4 KiB payload page is queued.
//!    This also happens when another writer set the bit but its sync has not completed:
//!    a bit we merely *see* is not yet a bit on disk.
//! 3. The writer then waits for a sync that *starts* after step 2 (group commit): one
//!    leader at a time writes every queued page (`pwrite` at `HEADER_LEN + page * 4096`,
//!    through O_DIRECT for whole sectors so the sync waits for no page-cache writeback;
//!    a payload tail shorter than a sector goes through the page cache) and then
//!    `fdatasync`s the bitmap file, which covers both; every writer that queued before
//!    the leader started rides on that one sync; those that queued later elect the next
//!    leader. Steps 1-2 ([`ActiveBitmap::begin_mark`]) and 3-4 ([`PendingMark::finish`])
//!    are separate calls so that work which does not touch the volume (a snapshot's read
//!    of old contents) overlaps the sync; the data write is issued only after step 4.
//! 4. After the sync, the writer adds its bits to the synced shadow and lets the data
//!    write go.
//!
//! 5. Sequential streams: a write whose preceding block was already written also marks
//!    (in the same sync) blocks ahead of itself, up to 64 MiB, so the stream's next
//!    writes find their bits durable and cost no sync. These marks go to the file only:
//!    every report uses the blocks actually written, and a clean stop writes exactly
//!    those back. After a crash the file may therefore report a few blocks ahead of a
//!    stream as changed: a larger incremental, never a missed change.
//!
//! So a bit is on stable storage before the data it covers is even issued, and a crash
//! (kill -9 or power loss) at any moment leaves every acknowledged write's blocks dirty on
//! disk. Bits only ever go from 0 to 1 in an active bitmap, so a torn page write can only
//! lose bits whose data write was never issued. The header's payload crc is stale while
//! InUse; an InUse bitmap found at open is therefore trusted in durable mode (it is a
//! superset of the changes) and refused in fast mode.
//!
//! # Fast mode
//!
//! Bits are set in memory only. The payload reaches the file when the bitmap is frozen
//! (checkpoint created, volume closed cleanly): payload, `fdatasync`, then a Clean header
//! with the payload crc, `fdatasync`. A bitmap found InUse at open in fast mode therefore
//! missed changes: it is marked Inconsistent on disk and every backup that needs it is
//! refused until a full backup starts a new checkpoint.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use tidemark_formats::bitmap::{
    self, BitmapHeader, BitmapState, Page, PagedBits, HEADER_LEN, PAGE_WORDS,
};
use tidemark_formats::FormatError;

use crate::volume::backing::AlignedBuf;

/// Bytes per payload page: the unit written by the group commit.
const PAGE: usize = 4096;
/// O_DIRECT payload writes are whole multiples of this (the usual logical sector size).
const DIRECT_SECTOR: usize = 512;
/// A sequential write marks this many times its own blocks ahead of itself...
const SEQUENTIAL_AHEAD_FACTOR: u64 = 32;
/// ...at least this many blocks...
const SEQUENTIAL_AHEAD_MIN: u64 = 16;
/// ...and at most this many bytes.
const SEQUENTIAL_AHEAD_BYTES: u64 = 64 << 20;

/// Errors of the tracking layer.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// Reading, writing or syncing a bitmap file failed.
    #[error("dirty bitmap {}: {action}", path.display())]
    Io {
        /// The bitmap file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A bitmap file is damaged or of an unknown version.
    #[error(transparent)]
    Format(#[from] FormatError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind (counters,
    // page lists); continuing with it is safe.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Blocks `[first, end)` touched by the byte range `[offset, offset + len)`.
pub(crate) fn blocks_of(offset: u64, len: u64, granularity: u32) -> Range<u64> {
    let g = u64::from(granularity);
    if len == 0 {
        return offset / g..offset / g;
    }
    offset / g..(offset + len).div_ceil(g)
}

/// `(word index, mask)` pairs covering blocks `range`.
fn word_masks(range: Range<u64>) -> impl Iterator<Item = (usize, u64)> {
    let mut b = range.start;
    std::iter::from_fn(move || {
        if b >= range.end {
            return None;
        }
        let bit = b % 64;
        let n = (64 - bit).min(range.end - b);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        let word = (b / 64) as usize;
        b += n;
        Some((word, mask))
    })
}

/// A frozen dirty bitmap: the blocks of a volume changed since a checkpoint, as of one
/// moment (a snapshot). What a backup reports as `qemu:dirty-bitmap:<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    name: String,
    granularity: u32,
    volume_size: u64,
    /// One bit per tracking block; clean pages are not allocated.
    bits: PagedBits,
}

impl DirtyBitmap {
    /// An empty bitmap (nothing changed) for a volume of `volume_size` bytes.
    pub fn new(name: &str, granularity: u32, volume_size: u64) -> DirtyBitmap {
        let blocks = volume_size.div_ceil(u64::from(granularity));
        DirtyBitmap {
            name: name.to_string(),
            granularity,
            volume_size,
            bits: PagedBits::new(blocks),
        }
    }

    /// The name it is exported under (normally the checkpoint it counts from).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per tracking block.
    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Size of the volume in bytes.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// Number of tracking blocks.
    pub fn block_count(&self) -> u64 {
        self.volume_size.div_ceil(u64::from(self.granularity))
    }

    /// The bits, one per tracking block (clean pages unallocated).
    pub fn bits(&self) -> &PagedBits {
        &self.bits
    }

    /// Whether tracking block `block` changed.
    pub fn is_dirty(&self, block: u64) -> bool {
        self.bits.get(block)
    }

    /// Number of changed tracking blocks.
    pub fn dirty_blocks(&self) -> u64 {
        self.bits.count_ones()
    }

    /// Changed byte ranges, in order, merged, clipped to the volume size.
    pub fn changed_extents(&self) -> Vec<Range<u64>> {
        let g = u64::from(self.granularity);
        self.bits
            .runs()
            .map(|r| r.start * g..(r.end * g).min(self.volume_size))
            .collect()
    }

    /// At most `max_runs` runs `(length, dirty)` describing `[offset, offset + len)` from
    /// its start, clipped to the volume: the work is proportional to the runs returned
    /// plus the allocated pages scanned, never to the length of the range beyond the last
    /// run, and clean pages cost nothing.
    pub fn runs_capped(&self, offset: u64, len: u64, max_runs: usize) -> Vec<(u64, bool)> {
        let mut runs = RunBuilder::new(self.granularity, self.volume_size, offset, len, max_runs);
        let end = runs.end_word();
        let pages = (runs.first_word() / PAGE_WORDS) as u64..end.div_ceil(PAGE_WORDS) as u64;
        for (p, page) in self.bits.pages_in(pages) {
            if runs.done() {
                break;
            }
            let base = p as usize * PAGE_WORDS;
            runs.clean_to_word(base);
            let from = runs.first_word();
            let to = end.min(base + PAGE_WORDS);
            if from < to {
                runs.feed(from, &page[from - base..to - base]);
            }
        }
        runs.finish()
    }

    /// Runs `(length, dirty)` describing `[offset, offset + len)`, clipped to the volume.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        self.runs_capped(offset, len, usize::MAX)
    }

    /// OR `bits` into this bitmap (a merge along the checkpoint chain), walking only its
    /// allocated pages.
    pub(crate) fn merge(&mut self, bits: &PagedBits) {
        self.bits.or_assign(bits);
    }

    /// Mark the bytes `[offset, offset + len)` changed.
    pub fn mark(&mut self, offset: u64, len: u64) {
        self.bits
            .set_range(blocks_of(offset, len, self.granularity));
    }
}

/// Builds the runs `(length, dirty)` of a byte range from bitmap words fed in order, in
/// pieces, stopping at a cap on the number of runs: a BLOCK_STATUS reply over a huge
/// range costs what the reply holds, and the words can be copied a window at a time.
#[derive(Debug)]
pub struct RunBuilder {
    granularity: u64,
    /// Next byte not yet described.
    pos: u64,
    /// End of the range, clipped to the volume.
    end: u64,
    max_runs: usize,
    out: Vec<(u64, bool)>,
    full: bool,
}

impl RunBuilder {
    /// Runs of `[offset, offset + len)` of a volume of `volume_size` bytes tracked at
    /// `granularity`, at most `max_runs` (at least one).
    pub fn new(
        granularity: u32,
        volume_size: u64,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> RunBuilder {
        let end = offset.saturating_add(len).min(volume_size);
        RunBuilder {
            granularity: u64::from(granularity),
            pos: offset.min(end),
            end,
            max_runs: max_runs.max(1),
            out: Vec::new(),
            full: false,
        }
    }

    /// Index of the word holding the next block to describe.
    pub fn first_word(&self) -> usize {
        (self.pos / self.granularity / 64) as usize
    }

    /// One past the index of the word holding the range's last block.
    pub fn end_word(&self) -> usize {
        if self.pos >= self.end {
            return self.first_word();
        }
        ((self.end - 1) / self.granularity / 64 + 1) as usize
    }

    /// Describe everything before word `word` as clean (the words skipped are all clear).
    pub fn clean_to_word(&mut self, word: usize) {
        self.push(word as u64 * 64 * self.granularity, false);
    }

    /// Whether no more words are needed: the range is described or the cap is reached.
    pub fn done(&self) -> bool {
        self.full || self.pos >= self.end
    }

    /// Add the run `[pos, stop)` of state `dirty`, merging with the previous run.
    fn push(&mut self, stop: u64, dirty: bool) {
        let stop = stop.min(self.end);
        if self.full || stop <= self.pos {
            return;
        }
        let len = stop - self.pos;
        let count = self.out.len();
        match self.out.last_mut() {
            Some((l, d)) if *d == dirty => *l += len,
            _ if count == self.max_runs => {
                self.full = true;
                return;
            }
            _ => self.out.push((len, dirty)),
        }
        self.pos = stop;
    }

    /// Feed words `first..first + words.len()`; `first` must be [`RunBuilder::first_word`].
    pub fn feed(&mut self, first: usize, words: &[u64]) {
        let g = self.granularity;
        let mut i = 0;
        while i < words.len() {
            if self.done() {
                return;
            }
            let w = words[i];
            let base = (first + i) as u64 * 64;
            i += 1;
            if w == 0 || w == u64::MAX {
                // All the equal whole words that follow in one push, not one each.
                let same = 1 + words[i..].iter().take_while(|&&x| x == w).count();
                self.push((base + 64 * same as u64) * g, w != 0);
                i += same - 1;
                continue;
            }
            let mut bit = 0u64;
            while bit < 64 && !self.done() {
                let dirty = w >> bit & 1 == 1;
                // Length of the run of equal bits starting at `bit`.
                let rest = if dirty { !(w >> bit) } else { w >> bit };
                let n = if rest == 0 {
                    64 - bit
                } else {
                    u64::from(rest.trailing_zeros()).min(64 - bit)
                };
                self.push((base + bit + n) * g, dirty);
                bit += n;
            }
        }
    }

    /// The runs; whatever of the range no word was fed for is clean.
    pub fn finish(mut self) -> Vec<(u64, bool)> {
        if !self.full && self.pos < self.end {
            let end = self.end;
            self.push(end, false);
        }
        self.out
    }
}

/// Group-commit bookkeeping: how many syncs started and completed.
#[derive(Debug, Default)]
struct Commit {
    started: u64,
    completed: u64,
    syncing: bool,
}

/// Bits set and queued by [`ActiveBitmap::begin_mark`], not yet known to be durable.
#[derive(Debug)]
#[must_use = "the data write may only be issued after finish() returned Ok"]
pub(crate) struct PendingMark<'a> {
    active: &'a ActiveBitmap,
    /// The first sync that started after the pages were queued.
    target: u64,
    /// Blocks to add to the synced shadow once that sync completed.
    blocks: Range<u64>,
}

impl PendingMark<'_> {
    /// Steps 3 and 4 of the durable write order: wait for (or lead) a sync that started
    /// after the bits were queued, then record them as durable.
    pub(crate) fn finish(self) -> Result<(), TrackingError> {
        self.active.group_commit(self.target)?;
        for (word, mask) in word_masks(self.blocks) {
            self.active.page_for(word).synced[word % PAGE_WORDS].fetch_or(mask, Ordering::Release);
        }
        Ok(())
    }
}

/// One 4 KiB payload page of the active bitmap, allocated at its first mark.
#[derive(Debug)]
struct ActivePage {
    /// Blocks actually written: what every report and every frozen bitmap shows.
    written: [AtomicU64; PAGE_WORDS],
    /// Durable mode: the bits the file holds (or is about to): `written` plus blocks
    /// marked ahead of a sequential stream.
    on_disk: [AtomicU64; PAGE_WORDS],
    /// Durable mode: bits of `on_disk` known to be on stable storage.
    synced: [AtomicU64; PAGE_WORDS],
    /// Whether the page waits in the group commit's queue.
    queued: AtomicBool,
}

impl ActivePage {
    fn new() -> Box<ActivePage> {
        Box::new(ActivePage {
            written: std::array::from_fn(|_| AtomicU64::new(0)),
            on_disk: std::array::from_fn(|_| AtomicU64::new(0)),
            synced: std::array::from_fn(|_| AtomicU64::new(0)),
            queued: AtomicBool::new(false),
        })
    }
}

/// The bitmap of the latest checkpoint: set by every write, persisted per the module doc.
///
/// Its pages are allocated at their first mark (a directory of lazily set slots), so a
/// huge volume with few writes holds little memory; its file has the paged layout, clean
/// pages being holes.
#[derive(Debug)]
pub(crate) struct ActiveBitmap {
    path: PathBuf,
    file: File,
    /// The same file opened with O_DIRECT (None where the filesystem refuses it): payload
    /// pages go out through it, so a sync waits for no page-cache writeback.
    direct: Option<File>,
    header: Mutex<BitmapHeader>,
    durable: bool,
    granularity: u32,
    block_count: u64,
    pages: Box<[OnceLock<Box<ActivePage>>]>,
    queue: Mutex<Vec<usize>>,
    commit: Mutex<Commit>,
    commit_done: Condvar,
    syncs: AtomicU64,
    /// A directory whose fsync is owed before any bit counts as durable: the chain file
    /// naming this bitmap was renamed into it during a write pause and is synced after
    /// the pause ([`ActiveBitmap::owe_dir_sync`], `crate::checkpoint`).
    owed_dir_sync: Mutex<Option<PathBuf>>,
    #[cfg(test)]
    model: PowerLossModel,
}

/// Tests only: the payload a power loss would leave. What the file held when a leader
/// issued its fdatasync is on stable storage once that fdatasync returned.
#[cfg(test)]
#[derive(Debug)]
struct PowerLossModel {
    words: Mutex<Vec<u64>>,
}

#[cfg(test)]
impl PowerLossModel {
    fn new(bits: &PagedBits) -> PowerLossModel {
        let mut words = vec![0; bits.page_count() as usize * PAGE_WORDS];
        for (p, page) in bits.pages() {
            let first = p as usize * PAGE_WORDS;
            words[first..first + PAGE_WORDS].copy_from_slice(page);
        }
        PowerLossModel {
            words: Mutex::new(words),
        }
    }

    /// The payload words the file holds now.
    fn file_image(&self, file: &File) -> Vec<u64> {
        let mut bytes = vec![0u8; lock(&self.words).len() * 8];
        let mut done = 0;
        while done < bytes.len() {
            match file.read_at(&mut bytes[done..], (HEADER_LEN + done) as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => panic!("reading the bitmap file for the power-loss model: {e}"),
            }
        }
        bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect()
    }

    /// An fdatasync issued when the file held `image` returned.
    fn flushed(&self, image: &[u64]) {
        for (d, s) in lock(&self.words).iter_mut().zip(image) {
            *d |= s;
        }
    }

    /// Whether `block`'s bit would survive a power loss now.
    fn survives(&self, block: u64) -> bool {
        lock(&self.words)[(block / 64) as usize] >> (block % 64) & 1 == 1
    }
}

impl ActiveBitmap {
    /// Create a new, all-clean bitmap file for `header`'s checkpoint and activate it.
    pub(crate) fn create(
        path: &Path,
        mut header: BitmapHeader,
        durable: bool,
    ) -> Result<ActiveBitmap, TrackingError> {
        header.state = BitmapState::InUse;
        let bits = PagedBits::new(header.block_count());
        let header = bitmap::write_bitmap_pages(path, &header, &bits)?;
        Self::from_parts(path, header, &bits, durable)
    }

    /// Activate an existing bitmap file whose contents were already read and judged.
    /// Its header goes to InUse on disk (Inconsistent stays Inconsistent) before any
    /// write can set a bit. A file of the flat layout is first replaced by a paged one
    /// holding the same bits, so the file never mixes the two.
    pub(crate) fn activate(
        path: &Path,
        mut header: BitmapHeader,
        bits: &PagedBits,
        durable: bool,
    ) -> Result<ActiveBitmap, TrackingError> {
        if header.state != BitmapState::Inconsistent {
            header.state = BitmapState::InUse;
        }
        if !header.is_paged() {
            header = bitmap::write_bitmap_pages(path, &header, bits)?;
        }
        let active = Self::from_parts(path, header, bits, durable)?;
        active.write_header()?;
        Ok(active)
    }

    fn from_parts(
        path: &Path,
        header: BitmapHeader,
        bits: &PagedBits,
        durable: bool,
    ) -> Result<ActiveBitmap, TrackingError> {
        let io_err = |action, source| TrackingError::Io {
            path: path.to_path_buf(),
            action,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("open", e))?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let pages: Box<[OnceLock<Box<ActivePage>>]> = (0..bits.page_count().max(1))
            .map(|_| OnceLock::new())
            .collect();
        for (p, words) in bits.pages() {
            let page = ActivePage::new();
            for (i, &w) in words.iter().enumerate() {
                page.written[i].store(w, Ordering::Relaxed);
                page.on_disk[i].store(w, Ordering::Relaxed);
                page.synced[i].store(w, Ordering::Relaxed);
            }
            // Fresh slots: the set cannot fail.
            let _ = pages[p as usize].set(page);
        }
        Ok(ActiveBitmap {
            path: path.to_path_buf(),
            file,
            direct,
            granularity: header.granularity,
            block_count: header.block_count(),
            header: Mutex::new(header),
            durable,
            pages,
            queue: Mutex::new(Vec::new()),
            commit: Mutex::new(Commit::default()),
            commit_done: Condvar::new(),
            syncs: AtomicU64::new(0),
            owed_dir_sync: Mutex::new(None),
            #[cfg(test)]
            model: PowerLossModel::new(bits),
        })
    }

    /// The page holding word `word`, if allocated.
    fn page_of(&self, word: usize) -> Option<&ActivePage> {
        self.pages.get(word / PAGE_WORDS)?.get().map(|p| &**p)
    }

    /// The page holding word `word` (a word of a block below `block_count`), allocated
    /// now if it was clean.
    fn page_for(&self, word: usize) -> &ActivePage {
        self.pages[word / PAGE_WORDS].get_or_init(ActivePage::new)
    }

    fn io_err(&self, action: &'static str, source: io::Error) -> TrackingError {
        TrackingError::Io {
            path: self.path.clone(),
            action,
            source,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn state(&self) -> BitmapState {
        lock(&self.header).state
    }

    /// How many group-commit syncs ran (one per batch of newly dirtied blocks).
    pub(crate) fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Record a write of `[offset, offset + len)`. In durable mode, returns only once
    /// every touched block's bit is on stable storage.
    #[cfg(test)]
    pub(crate) fn mark(&self, offset: u64, len: u64) -> Result<(), TrackingError> {
        match self.begin_mark(offset, len)? {
            Some(pending) => pending.finish(),
            None => Ok(()),
        }
    }

    /// Steps 1 and 2 of the durable write order: set the bits of `[offset, offset + len)`
    /// and queue their pages. `None` when nothing needs a sync (fast mode, or every bit
    /// already durable); otherwise the caller must [`PendingMark::finish`] before issuing
    /// the data write. Work that does not touch the volume (reading old contents for a
    /// snapshot) may run in between, overlapping the sync.
    pub(crate) fn begin_mark(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<PendingMark<'_>>, TrackingError> {
        let blocks = blocks_of(offset, len, self.granularity);
        if blocks.is_empty() || blocks.end > self.block_count {
            return Ok(None);
        }
        for (word, mask) in word_masks(blocks.clone()) {
            let w = &self.page_for(word).written[word % PAGE_WORDS];
            if w.load(Ordering::Relaxed) & mask != mask {
                w.fetch_or(mask, Ordering::Relaxed);
            }
        }
        if !self.durable
            || word_masks(blocks.clone()).all(|(word, mask)| self.is_synced(word, mask))
        {
            return Ok(None);
        }
        // A write that continues the previous block starts (or continues) a sequential
        // stream: mark ahead of it in the same sync, so the stream's next writes find
        // their bits already durable. The extra bits reach the file only; reports use
        // `written`, and a clean stop writes `written` back, so they can only show up
        // (as extra changed blocks) after a crash.
        let mut durable = blocks.clone();
        if blocks.start > 0 && self.is_written(blocks.start - 1) {
            let ahead = ((blocks.end - blocks.start) * SEQUENTIAL_AHEAD_FACTOR).clamp(
                SEQUENTIAL_AHEAD_MIN,
                SEQUENTIAL_AHEAD_BYTES / u64::from(self.granularity),
            );
            durable.end = (blocks.end + ahead).min(self.block_count);
        }
        for (word, mask) in word_masks(durable.clone()) {
            if !self.is_synced(word, mask) {
                // Queued even when already set: a bit we merely see set (by a writer
                // whose sync is still running) is not yet a bit on disk.
                self.page_for(word).on_disk[word % PAGE_WORDS].fetch_or(mask, Ordering::SeqCst);
                self.queue_page(word / PAGE_WORDS);
            }
        }
        // Any sync that starts from now on writes our pages (they are queued).
        let target = lock(&self.commit).started + 1;
        Ok(Some(PendingMark {
            active: self,
            target,
            blocks: durable,
        }))
    }

    /// Tests only: panics unless every block of `[offset, offset + len)` would keep its
    /// bit through a power loss now (durable mode; the volume checks it before every
    /// data write).
    #[cfg(test)]
    pub(crate) fn assert_survives_power_loss(&self, offset: u64, len: u64) {
        if !self.durable {
            return;
        }
        for block in blocks_of(offset, len, self.granularity) {
            assert!(
                self.model.survives(block),
                "block {block}'s bit is not on stable storage before its data write"
            );
        }
        assert!(
            lock(&self.owed_dir_sync).is_none(),
            "the chain naming this bitmap is not on stable storage before a data write"
        );
    }

    /// Durable mode: the chain file that names this bitmap was renamed into `dir` and
    /// the directory is not synced yet, so no bit counts as durable (and no data write
    /// is issued) until it is: the next group commit syncs it after the payload, unless
    /// [`ActiveBitmap::sync_owed_dir`] did first.
    pub(crate) fn owe_dir_sync(&self, dir: PathBuf) {
        *lock(&self.owed_dir_sync) = Some(dir);
    }

    /// Fsync the directory owed by [`ActiveBitmap::owe_dir_sync`], if any (a concurrent
    /// caller waits for this one's sync). On failure it stays owed.
    pub(crate) fn sync_owed_dir(&self) -> Result<(), TrackingError> {
        let mut owed = lock(&self.owed_dir_sync);
        if let Some(dir) = owed.as_ref() {
            crate::failpoint::check("tracking.dir_sync")
                .and_then(|()| File::open(dir)?.sync_all())
                .map_err(|source| TrackingError::Io {
                    path: self.path.clone(),
                    action: "fsync its directory (the checkpoint chain naming it)",
                    source,
                })?;
            *owed = None;
        }
        Ok(())
    }

    /// Whether every bit of `mask` in word `word` is known to be on stable storage.
    fn is_synced(&self, word: usize, mask: u64) -> bool {
        self.page_of(word)
            .is_some_and(|p| p.synced[word % PAGE_WORDS].load(Ordering::Acquire) & mask == mask)
    }

    fn is_written(&self, block: u64) -> bool {
        let word = (block / 64) as usize;
        self.page_of(word).is_some_and(|p| {
            p.written[word % PAGE_WORDS].load(Ordering::Relaxed) >> (block % 64) & 1 == 1
        })
    }

    fn queue_page(&self, page: usize) {
        let queued = &self.page_for(page * PAGE_WORDS).queued;
        if !queued.swap(true, Ordering::SeqCst) {
            lock(&self.queue).push(page);
        }
    }

    /// Wait until sync number `target` (one that started after the caller's pages were
    /// queued) completed; lead it if no sync is running.
    fn group_commit(&self, target: u64) -> Result<(), TrackingError> {
        let mut st = lock(&self.commit);
        loop {
            if st.completed >= target {
                return Ok(());
            }
            if st.syncing {
                st = self
                    .commit_done
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            st.syncing = true;
            st.started += 1;
            let mine = st.started;
            drop(st);
            let result = self.write_queued_pages();
            st = lock(&self.commit);
            st.syncing = false;
            if result.is_ok() {
                st.completed = mine;
            }
            self.commit_done.notify_all();
            result?;
        }
    }

    /// The leader's work: write every queued page, then one fdatasync.
    fn write_queued_pages(&self) -> Result<(), TrackingError> {
        let mut pages = {
            let mut queue = lock(&self.queue);
            for &p in queue.iter() {
                self.page_for(p * PAGE_WORDS)
                    .queued
                    .store(false, Ordering::SeqCst);
            }
            std::mem::take(&mut *queue)
        };
        pages.sort_unstable();
        let result = self.write_pages(&pages).and_then(|()| {
            #[cfg(test)]
            let image = self.model.file_image(&self.file);
            self.file
                .sync_data()
                .and_then(|()| crate::failpoint::check("tracking.fdatasync"))
                .map_err(|e| self.io_err("fdatasync", e))?;
            self.sync_owed_dir()?;
            #[cfg(test)]
            self.model.flushed(&image);
            Ok(())
        });
        if result.is_err() {
            // Put the pages back so the next leader retries them.
            for p in pages {
                self.queue_page(p);
            }
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Write payload pages (allocated ones; runs of consecutive pages go out in one
    /// pwrite). The part of a run made of whole sectors goes through O_DIRECT; the rest
    /// (everything when O_DIRECT is refused) through the page cache. The caller's
    /// fdatasync covers both.
    fn write_pages(&self, pages: &[usize]) -> Result<(), TrackingError> {
        let mut buf = AlignedBuf::default();
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            let bytes = buf.get((j - i) * PAGE);
            for (k, &p) in pages[i..j].iter().enumerate() {
                let dst = &mut bytes[k * PAGE..(k + 1) * PAGE];
                match self.pages[p].get() {
                    Some(page) => {
                        for (d, w) in dst.chunks_exact_mut(8).zip(&page.on_disk) {
                            d.copy_from_slice(&w.load(Ordering::SeqCst).to_le_bytes());
                        }
                    }
                    None => dst.fill(0),
                }
            }
            let offset = HEADER_LEN as u64 + pages[i] as u64 * PAGE as u64;
            self.write_run(bytes, offset)?;
            i = j;
        }
        Ok(())
    }

    /// Write one run of payload bytes at `offset` (a page boundary of the file).
    fn write_run(&self, bytes: &[u8], offset: u64) -> Result<(), TrackingError> {
        let direct_len = bytes.len() / DIRECT_SECTOR * DIRECT_SECTOR;
        let mut done = 0;
        if let (Some(direct), true) = (&self.direct, direct_len > 0) {
            match direct.write_all_at(&bytes[..direct_len], offset) {
                Ok(()) => done = direct_len,
                // A device with larger sectors: the page cache takes the whole run.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(self.io_err("write payload", e)),
            }
        }
        if done < bytes.len() {
            self.file
                .write_all_at(&bytes[done..], offset + done as u64)
                .map_err(|e| self.io_err("write payload", e))?;
        }
        Ok(())
    }

    fn write_header(&self) -> Result<(), TrackingError> {
        let bytes = lock(&self.header).encode();
        self.file
            .write_all_at(&bytes, 0)
            .map_err(|e| self.io_err("write header", e))?;
        self.file
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", e))
    }

    /// OR the blocks written so far of words `first..first + out.len()` into `out`
    /// (words past the end count as clean), walking only the allocated pages.
    pub(crate) fn or_words_into(&self, first: usize, out: &mut [u64]) {
        let end = (first + out.len()).min(self.pages.len() * PAGE_WORDS);
        let mut word = first;
        while word < end {
            let base = word / PAGE_WORDS * PAGE_WORDS;
            let stop = end.min(base + PAGE_WORDS);
            if let Some(page) = self.page_of(word) {
                for (o, w) in out[word - first..stop - first]
                    .iter_mut()
                    .zip(&page.written[word - base..stop - base])
                {
                    *o |= w.load(Ordering::SeqCst);
                }
            }
            word = stop;
        }
    }

    /// The first allocated page at or after `page`.
    pub(crate) fn next_page_from(&self, page: u64) -> Option<u64> {
        let from = usize::try_from(page).ok()?;
        self.pages
            .get(from..)?
            .iter()
            .position(|slot| slot.get().is_some())
            .map(|i| (from + i) as u64)
    }

    /// A copy of the blocks written so far (only pages with a set bit are allocated).
    pub(crate) fn bits(&self) -> PagedBits {
        let mut bits = PagedBits::new(self.block_count);
        for (p, slot) in self.pages.iter().enumerate() {
            if let Some(page) = slot.get() {
                let words: Page = std::array::from_fn(|i| page.written[i].load(Ordering::SeqCst));
                bits.or_page(p as u64, &words);
            }
        }
        bits
    }

    /// The header as it is on disk.
    pub(crate) fn header(&self) -> BitmapHeader {
        lock(&self.header).clone()
    }

    /// Persist the payload and mark the file Clean (crcs valid): the bitmap stops being
    /// active. No write may mark it any more (writes paused, or another bitmap active).
    /// An Inconsistent bitmap stays Inconsistent.
    ///
    /// Only allocated pages are written (the others are holes, or clean pages of a file
    /// read at activation, which hold no bit), then the page crc table's pages that cover
    /// them, one fdatasync, and the header with the table's crc.
    pub(crate) fn freeze(&self) -> Result<(), TrackingError> {
        // Writers wait for their bit syncs with the write gate open, so a sync of this
        // bitmap may still run (or start) now: the freeze leads the group commit, so
        // no page write of a sync interleaves with its own, and counts as one sync (it
        // writes every written bit) for the writers queued meanwhile.
        let mut st = lock(&self.commit);
        while st.syncing {
            st = self
                .commit_done
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.syncing = true;
        st.started += 1;
        let mine = st.started;
        drop(st);
        let queued = std::mem::take(&mut *lock(&self.queue));
        for &p in &queued {
            self.page_for(p * PAGE_WORDS)
                .queued
                .store(false, Ordering::SeqCst);
        }
        let result = self.freeze_payload();
        if result.is_err() {
            // Their bits may not be on disk: the next sync writes them.
            for p in queued {
                self.queue_page(p);
            }
        }
        let mut st = lock(&self.commit);
        st.syncing = false;
        if result.is_ok() {
            st.completed = mine;
        }
        self.commit_done.notify_all();
        result
    }

    /// The freeze's writes (see [`ActiveBitmap::freeze`]), as the commit's leader.
    fn freeze_payload(&self) -> Result<(), TrackingError> {
        let mut allocated = Vec::new();
        for (p, slot) in self.pages.iter().enumerate() {
            if let Some(page) = slot.get() {
                // The file gets exactly the written blocks (marks ahead of streams are
                // dropped).
                for (disk, w) in page.on_disk.iter().zip(&page.written) {
                    disk.store(w.load(Ordering::SeqCst), Ordering::SeqCst);
                }
                allocated.push(p);
            }
        }
        self.write_pages(&allocated)?;
        let bits = self.bits();
        let table = bitmap::page_table(&bits);
        let header = self.header();
        /// Payload pages covered by one 4 KiB page of the crc table.
        const ENTRIES_PER_TABLE_PAGE: usize = PAGE / 4;
        bitmap::write_table_pages(&self.file, &header, &table, |c| {
            let c = c as usize;
            allocated
                .binary_search_by(|&p| {
                    if p < c * ENTRIES_PER_TABLE_PAGE {
                        std::cmp::Ordering::Less
                    } else if p >= (c + 1) * ENTRIES_PER_TABLE_PAGE {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                })
                .is_ok()
        })
        .map_err(|e| self.io_err("write page crc table", e))?;
        self.file
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", e))?;
        {
            let mut header = lock(&self.header);
            if header.state != BitmapState::Inconsistent {
                header.state = BitmapState::Clean;
            }
            header.payload_crc = bitmap::payload_crc(&table);
        }
        self.write_header()
    }

    /// Mark the file Inconsistent on disk (the next backup from it must be full).
    pub(crate) fn mark_inconsistent(&self) -> Result<(), TrackingError> {
        lock(&self.header).state = BitmapState::Inconsistent;
        self.write_header()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use uuid::Uuid;

    fn header(size: u64, granularity: u32) -> BitmapHeader {
        BitmapHeader::new(Uuid::new_v4(), "c1", granularity, size, 1).unwrap()
    }

    #[test]
    fn capped_runs_match_runs_and_stop_at_the_cap() {
        // A pseudo-random bitmap over 1000 blocks of 4 KiB, the volume ending mid-block.
        let size = 1000 * 4096 - 100;
        let mut b = DirtyBitmap::new("c", 4096, size);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for block in 0..1000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 3 == 0 || (400..520).contains(&block) {
                b.mark(block * 4096, 1);
            }
        }
        for (offset, len) in [
            (0, u64::MAX),
            (5000, 1 << 20),
            (64 * 4096 - 1, 3),
            (size - 10, 100),
            (size, 5),
        ] {
            let all = b.runs(offset, len);
            assert_eq!(
                b.runs_capped(offset, len, usize::MAX),
                all,
                "{offset}+{len}"
            );
            // Fed in windows of 3 words, like a volume copying its words under a lock.
            let mut r = RunBuilder::new(4096, size, offset, len, usize::MAX);
            while !r.done() {
                let first = r.first_word();
                let end = r.end_word().min(first + 3);
                r.feed(first, &b.bits().to_words()[first..end]);
            }
            assert_eq!(r.finish(), all, "{offset}+{len} in windows");
            let capped = b.runs_capped(offset, len, 7);
            assert_eq!(capped[..], all[..all.len().min(7)], "{offset}+{len} capped");
        }
    }

    #[test]
    fn word_masks_cover_exactly_the_range() {
        let masks: Vec<_> = word_masks(3..130).collect();
        assert_eq!(masks, vec![(0, !0b111), (1, u64::MAX), (2, 0b11)]);
        assert_eq!(word_masks(5..5).count(), 0);
    }

    #[test]
    fn blocks_of_rounds_outward() {
        assert_eq!(blocks_of(0, 1, 4096), 0..1);
        assert_eq!(blocks_of(4095, 2, 4096), 0..2);
        assert_eq!(blocks_of(8192, 8192, 4096), 2..4);
    }

    #[test]
    fn durable_mark_is_on_disk_before_returning_and_rewrites_cost_no_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let active = ActiveBitmap::create(&path, header(1 << 30, 65536), true).unwrap();
        active.mark(65536 * 100, 4096).unwrap();
        assert_eq!(active.sync_count(), 1);
        let (h, words) = bitmap::read_bitmap_file(&path).unwrap();
        assert_eq!(h.state, BitmapState::InUse);
        assert!(bitmap::is_dirty(&words, 100));
        active.mark(65536 * 100 + 8192, 4096).unwrap();
        assert_eq!(
            active.sync_count(),
            1,
            "a rewrite of a dirty block must not sync"
        );
    }

    #[test]
    fn sequential_streams_mark_ahead_on_disk_but_report_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let active = ActiveBitmap::create(&path, header(1 << 30, 65536), true).unwrap();
        for i in 0..64u64 {
            active.mark(i << 20, 1 << 20).unwrap();
        }
        assert!(
            active.sync_count() <= 4,
            "{} syncs for one stream",
            active.sync_count()
        );
        let written = active.bits().to_words();
        assert_eq!(written.iter().map(|w| w.count_ones()).sum::<u32>(), 64 * 16);
        // A crash now: the file holds a superset of the written blocks.
        let (_, on_disk) = bitmap::read_bitmap_file(&path).unwrap();
        for b in 0..64 * 16 {
            assert!(bitmap::is_dirty(&on_disk, b));
        }
        // A clean stop writes back exactly what was written.
        active.freeze().unwrap();
        let (h, on_disk) = bitmap::read_bitmap_file(&path).unwrap();
        assert_eq!(h.state, BitmapState::Clean);
        assert_eq!(on_disk, written);
    }

    #[test]
    fn a_64_tib_active_bitmap_holds_and_writes_only_touched_pages() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let size = 64u64 << 40;
        let active = ActiveBitmap::create(&path, header(size, 65536), true).unwrap();
        for offset in [0, 1 << 40, size - 4096] {
            active.mark(offset, 4096).unwrap();
        }
        let allocated = active.pages.iter().filter(|p| p.get().is_some()).count();
        assert_eq!(allocated, 3);
        active.freeze().unwrap();
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 <= 64 << 10);
        let (h, bits) = bitmap::read_bitmap_pages(&path).unwrap();
        assert_eq!(h.state, BitmapState::Clean);
        assert_eq!(bits, active.bits());
        assert_eq!(bits.count_ones(), 3);
        assert_eq!(bits.allocated_pages(), 3);
    }

    #[test]
    fn fast_mode_persists_only_on_freeze() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let active = ActiveBitmap::create(&path, header(1 << 20, 4096), false).unwrap();
        active.mark(0, 3 * 4096).unwrap();
        assert_eq!(active.sync_count(), 0);
        let (_, words) = bitmap::read_bitmap_file(&path).unwrap();
        assert_eq!(words[0], 0);
        active.freeze().unwrap();
        let (h, words) = bitmap::read_bitmap_file(&path).unwrap();
        assert_eq!(h.state, BitmapState::Clean);
        assert_eq!(words[0], 0b111);
    }

    #[test]
    fn concurrent_writers_share_syncs_and_every_bit_lands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let active = Arc::new(ActiveBitmap::create(&path, header(1 << 30, 4096), true).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let active = active.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        active.mark((i * 8 + t) * 4096 * 3, 4096).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(active.sync_count() <= 1600);
        let (_, words) = bitmap::read_bitmap_file(&path).unwrap();
        for t in 0..8u64 {
            for i in 0..200u64 {
                assert!(bitmap::is_dirty(&words, (i * 8 + t) * 3));
            }
        }
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 1600);
    }

    /// Many writers first-writing distinct blocks at once: fewer syncs than blocks, and
    /// each writer's bit survives a power loss (the model) before mark returns, i.e.
    /// before its data write could be issued.
    #[test]
    fn concurrent_first_writes_share_syncs_and_each_bit_is_durable_before_its_data() {
        const THREADS: u64 = 32;
        const WRITES: u64 = 64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        // 4 KiB blocks over 1 GiB: 262,144 bits on 8 payload pages.
        let active = Arc::new(ActiveBitmap::create(&path, header(1 << 30, 4096), true).unwrap());
        let start = Arc::new(std::sync::Barrier::new(THREADS as usize));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (active, start) = (active.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for i in 0..WRITES {
                        // Spread over every page, never two writers on one block.
                        let block = (i * THREADS + t) * 127 % (1 << 18);
                        active.mark(block * 4096, 4096).unwrap();
                        assert!(active.model.survives(block), "block {block}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let bits = THREADS * WRITES;
        let syncs = active.sync_count();
        assert!(
            syncs < bits,
            "{syncs} syncs for {bits} newly dirtied blocks"
        );
        let (_, words) = bitmap::read_bitmap_file(&path).unwrap();
        assert_eq!(
            words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>(),
            bits
        );
    }

    /// A failed fdatasync fails its leader's mark, leaves its bits unproven, and the next
    /// sync writes them again; concurrent writers are never released by a failed sync.
    #[test]
    fn a_failed_sync_is_retried_and_proves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let active = Arc::new(ActiveBitmap::create(&path, header(1 << 30, 4096), true).unwrap());
        {
            let _armed = crate::failpoint::arm("tracking.fdatasync");
            // Alone, this thread leads the sync and its fdatasync fails.
            let err = active.mark(7 * 4096, 4096).unwrap_err();
            assert!(err.to_string().contains("fdatasync"), "{err}");
            assert!(!active.model.survives(7));
            let others: Vec<_> = (0..8u64)
                .map(|t| {
                    let active = active.clone();
                    std::thread::spawn(move || {
                        for i in 0..50u64 {
                            let block = 1000 + i * 8 + t;
                            active.mark(block * 4096, 4096).unwrap();
                            assert!(active.model.survives(block), "block {block}");
                        }
                    })
                })
                .collect();
            // Whenever this thread leads, its sync fails; when it rides on another
            // thread's sync, it succeeds. Either way a success means a durable bit.
            for i in 0..50u64 {
                let block = 5000 + i;
                if active.mark(block * 4096, 4096).is_ok() {
                    assert!(active.model.survives(block), "block {block}");
                }
            }
            for t in others {
                t.join().unwrap();
            }
        }
        active.mark(7 * 4096, 4096).unwrap();
        assert!(active.model.survives(7));
        assert!(bitmap::is_dirty(
            &bitmap::read_bitmap_file(&path).unwrap().1,
            7
        ));
    }

    #[test]
    fn dirty_bitmap_runs_and_extents_agree() {
        let mut b = DirtyBitmap::new("x", 4096, 4096 * 200 + 100);
        b.mark(4096 * 3, 4096 * 2);
        b.mark(4096 * 200, 50);
        assert_eq!(
            b.changed_extents(),
            vec![4096 * 3..4096 * 5, 4096 * 200..4096 * 200 + 100]
        );
        assert_eq!(
            b.runs(0, u64::MAX),
            vec![
                (4096 * 3, false),
                (8192, true),
                (4096 * 195, false),
                (100, true)
            ]
        );
        assert_eq!(b.runs(4096 * 4, 10), vec![(10, true)]);
        assert_eq!(b.dirty_blocks(), 3);
    }

    /// Runs of a byte range as a `Vec<bool>` of tracking blocks says them: one entry per
    /// byte range of equal state, merged.
    fn model_runs(dirty: &[bool], g: u64, size: u64, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        for byte in offset..end {
            let d = dirty[(byte / g) as usize];
            match out.last_mut() {
                Some((l, last)) if *last == d => *l += 1,
                _ => out.push((1, d)),
            }
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn runs_match_a_vec_of_bools(
            blocks in 1u64..300,
            tail in 0u64..16,
            marks in proptest::collection::vec((0u64..300, 1u64..80), 0..12),
            offset in 0u64..5000,
            len in 0u64..5000,
        ) {
            let g = 16u64;
            let size = (blocks - 1) * g + tail.max(1);
            let mut b = DirtyBitmap::new("p", g as u32, size);
            let mut model = vec![false; blocks as usize];
            for (block, count) in marks {
                let block = block % blocks;
                let count = count.min(size - block * g);
                b.mark(block * g, count);
                for m in block..(block * g + count).div_ceil(g) {
                    model[m as usize] = true;
                }
            }
            proptest::prop_assert_eq!(b.runs(offset, len), model_runs(&model, g, size, offset, len));
        }
    }
}
