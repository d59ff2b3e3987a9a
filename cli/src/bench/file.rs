//! Files and block devices, measured through the engine's I/O engines
//! (`tidemark_engine::io`: io_uring, or the pread/pwrite thread pool where the kernel
//! refuses io_uring), with one pool buffer per queue slot, reused for the whole run.

use std::fs::File;
use std::io;
use std::sync::Arc;

use anyhow::{bail, Context};
use tidemark_engine::io::{
    open_engine, Completion, Engine, EngineChoice, EngineConfig, FileId, IoBuf, Op, Pages, Request,
};

use crate::bench::driver::Backend;
use crate::bench::workload::{splitmix64, Direction};

/// A file or device behind one of the engine's I/O engines.
#[derive(Debug)]
pub struct FileBackend {
    engine: Box<dyn Engine>,
    file: Arc<File>,
    id: FileId,
    bs: usize,
    slots: Vec<Option<IoBuf>>,
    completions: Vec<Completion>,
}

impl FileBackend {
    /// Drive `file` with `qd` requests of `bs` bytes in flight. Write buffers start out
    /// filled with pseudo-random bytes (as fio's are), so compressing or deduplicating
    /// storage cannot flatter the figures.
    pub fn new(
        file: File,
        choice: EngineChoice,
        pages: Pages,
        bs: u64,
        qd: usize,
    ) -> anyhow::Result<FileBackend> {
        let bs = usize::try_from(bs).context("--bs does not fit in memory")?;
        let mut engine = open_engine(&EngineConfig {
            choice,
            queue_depth: qd,
            buf_size: bs,
            buf_count: qd,
            // The measuring loop submits and reaps on this thread only.
            single_thread: true,
            pages,
            ..EngineConfig::default()
        })
        .context("cannot start the I/O engine")?;
        if engine.queue_depth() < qd {
            bail!(
                "the I/O engine allows {} requests in flight, fewer than --qd {qd}",
                engine.queue_depth()
            );
        }
        let file = Arc::new(file);
        let id = engine.add_file(Arc::clone(&file));
        let mut state = 0x7469_6465_6d61_726b;
        let mut slots = Vec::with_capacity(qd);
        for _ in 0..qd {
            let mut buf = engine
                .pool()
                .take()
                .context("the I/O engine's buffer pool has fewer buffers than --qd")?;
            buf.set_len(bs);
            for chunk in buf.as_mut_slice().chunks_mut(8) {
                let word = splitmix64(&mut state).to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            slots.push(Some(buf));
        }
        Ok(FileBackend {
            engine,
            file,
            id,
            bs,
            slots,
            completions: Vec::with_capacity(qd),
        })
    }

    /// "io_uring" or "threads".
    pub fn engine_name(&self) -> String {
        self.engine.kind().to_string()
    }

    /// Bytes of the (already filled) buffers that sit in huge pages.
    pub fn huge_page_bytes(&self) -> Option<u64> {
        self.engine.pool().huge_page_bytes()
    }
}

impl Backend for FileBackend {
    fn buffer(&mut self, slot: usize) -> &mut [u8] {
        match self.slots.get_mut(slot).and_then(Option::as_mut) {
            Some(buf) => buf.as_mut_slice(),
            None => &mut [],
        }
    }

    fn submit(&mut self, slot: usize, direction: Direction, offset: u64) -> anyhow::Result<()> {
        let buf = self
            .slots
            .get_mut(slot)
            .and_then(Option::take)
            .with_context(|| format!("slot {slot} is busy or does not exist"))?;
        let op = match direction {
            Direction::Read => Op::Read,
            Direction::Write => Op::Write,
        };
        self.engine
            .submit(Request {
                op,
                file: self.id,
                offset,
                buf,
                user_data: slot as u64,
            })
            .context("the I/O engine refused a request")
    }

    fn commit(&mut self) -> anyhow::Result<()> {
        // Submit without waiting; completions that are already there are kept for `reap`.
        self.engine
            .reap(0, &mut self.completions)
            .context("submitting I/O requests failed")?;
        Ok(())
    }

    fn reap(&mut self, done: &mut Vec<(usize, io::Result<()>)>) -> anyhow::Result<()> {
        // Wait only when `commit` did not already pick up completions.
        let wait = usize::from(self.completions.is_empty());
        self.engine
            .reap(wait, &mut self.completions)
            .context("waiting for I/O completions failed")?;
        for completion in self.completions.drain(..) {
            let slot = completion.user_data as usize;
            let outcome = match completion.result {
                Ok(n) if n == self.bs => Ok(()),
                Ok(n) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "short transfer: {n} of {} bytes (end of the target?)",
                        self.bs
                    ),
                )),
                Err(err) => Err(err),
            };
            if let Some(place) = self.slots.get_mut(slot) {
                *place = Some(completion.buf);
            }
            done.push((slot, outcome));
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.file.sync_all().context("fsync failed")
    }
}
