//! The data path: reads, and writes, trims and write-zeroes in the write order of the
//! module doc (mark dirty, copy-before-write, then the backing store); flush and the
//! backing store's allocation.

use std::sync::{PoisonError, RwLockReadGuard};

use super::{Volume, VolumeError, WriteState};

/// Tests only: a hook a test sets on a writer's thread to stop it at one point.
#[cfg(test)]
pub(super) type WriteHook = std::cell::RefCell<Option<Box<dyn FnMut()>>>;

#[cfg(test)]
thread_local! {
    /// Tests only: run on a writer's thread once its bits are synced, before it takes the
    /// write gate again for its data write (where a pause may slip in).
    pub(super) static AFTER_BIT_SYNC: WriteHook = const { std::cell::RefCell::new(None) };
    /// Tests only: run on a writer's thread right before its data write, the write gate
    /// held (a write in flight that a pause must drain).
    pub(super) static BEFORE_DATA_WRITE: WriteHook = const { std::cell::RefCell::new(None) };
}

/// Tests only: run the hook `hook` of this thread, if one is set.
#[cfg(test)]
fn run_hook(hook: &'static std::thread::LocalKey<WriteHook>) {
    hook.with(|hook| {
        if let Some(hook) = hook.borrow_mut().as_mut() {
            hook();
        }
    });
}

impl Volume {
    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.manifest.size)
        {
            return Err(VolumeError::OutOfRange {
                volume: self.manifest.name.clone(),
                offset,
                len,
                size: self.manifest.size,
            });
        }
        Ok(())
    }

    pub(super) fn gate_read(&self) -> Result<RwLockReadGuard<'_, WriteState>, VolumeError> {
        let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        if st.closed {
            return Err(VolumeError::Closed(self.manifest.name.clone()));
        }
        Ok(st)
    }

    /// Steps 1 and 2 of the write order (module docs), the gate held throughout.
    /// The snapshot copies only read the volume, so they run while the bitmap sync is in
    /// flight; the data write still waits for both.
    pub(super) fn before_change(
        &self,
        st: &WriteState,
        offset: u64,
        len: u64,
    ) -> Result<(), VolumeError> {
        let pending = match &st.active {
            Some(active) => active.begin_mark(offset, len)?,
            None => None,
        };
        for snapshot in &st.snapshots {
            snapshot.preserve(offset, len);
        }
        if let Some(pending) = pending {
            pending.finish()?;
        }
        #[cfg(test)]
        if let Some(active) = &st.active {
            active.assert_survives_power_loss(offset, len);
        }
        Ok(())
    }

    /// The whole write order (module docs) for a change of `[offset, offset + len)`:
    /// steps 1 and 2, then `change` (step 3) with the gate held. A change whose bits need
    /// a sync waits for it with the gate *open*, so a pause never waits for a bit sync,
    /// only for the data writes in flight; once synced, the gate is taken again and, if a
    /// pause ran meanwhile (the active bitmap or the snapshots may have changed), steps 1
    /// and 2 are done again under it before the data write.
    fn change<T>(
        &self,
        offset: u64,
        len: u64,
        change: impl FnOnce() -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        let st = self.gate_read()?;
        let active = st.active.clone();
        let pending = match &active {
            Some(active) => active.begin_mark(offset, len)?,
            None => None,
        };
        for snapshot in &st.snapshots {
            snapshot.preserve(offset, len);
        }
        let Some(pending) = pending else {
            #[cfg(test)]
            if let Some(active) = &st.active {
                active.assert_survives_power_loss(offset, len);
            }
            #[cfg(test)]
            run_hook(&BEFORE_DATA_WRITE);
            return change();
        };
        let epoch = st.epoch;
        drop(st);
        pending.finish()?;
        #[cfg(test)]
        run_hook(&AFTER_BIT_SYNC);
        let st = self.gate_read()?;
        if st.epoch == epoch {
            #[cfg(test)]
            if let Some(active) = &st.active {
                active.assert_survives_power_loss(offset, len);
            }
        } else {
            self.before_change(&st, offset, len)?;
        }
        #[cfg(test)]
        run_hook(&BEFORE_DATA_WRITE);
        change()
    }

    /// Fill `buf` with the bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_range(offset, buf.len() as u64)?;
        self.backing
            .read_at(offset, buf)
            .map_err(|e| self.io_err("read", self.backing.path(), e))
    }

    /// Write `data` at `offset`; with `fua` it is durable before this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.change(offset, data.len() as u64, || {
            self.backing
                .write_at(offset, data)
                .map_err(|e| self.io_err("write", self.backing.path(), e))?;
            if fua {
                self.flush_backing()?;
            }
            Ok(())
        })
    }

    pub(super) fn flush_backing(&self) -> Result<(), VolumeError> {
        self.backing
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", self.backing.path(), e))
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> Result<(), VolumeError> {
        let _st = self.gate_read()?;
        self.flush_backing()
    }

    /// Discard `len` bytes at `offset` (a hole in a file, BLKDISCARD on a device).
    /// Counts as a change for tracking and snapshots.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.change(offset, len, || {
            match self.backing.discard(offset, len) {
                Ok(()) => {}
                // Discard is advisory: a store that cannot discard keeps the old bytes.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
                    ) => {}
                Err(e) => return Err(self.io_err("discard", self.backing.path(), e)),
            }
            if fua {
                self.flush_backing()?;
            }
            Ok(())
        })
    }

    /// Make `len` bytes at `offset` read as zeroes; `may_unmap` lets a file punch a hole.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.change(offset, len, || {
            self.backing
                .zero(offset, len, may_unmap)
                .map_err(|e| self.io_err("write zeroes", self.backing.path(), e))?;
            if fua {
                self.flush_backing()?;
            }
            Ok(())
        })
    }

    /// Allocation of `[offset, offset + len)` as at most `max_runs` `(length, is_hole)`
    /// runs (then they end before the range does), or `None` when the backing cannot tell
    /// (a device). The work stops at the cap: one or two lseek calls per run.
    pub fn allocation(&self, offset: u64, len: u64, max_runs: usize) -> Option<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len).min(self.manifest.size);
        let runs = self
            .backing
            .allocation_capped(offset, end.saturating_sub(offset), max_runs)?;
        Some(
            runs.into_iter()
                .map(|(s, e, data)| (e - s, !data))
                .collect(),
        )
    }
}
