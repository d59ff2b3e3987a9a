//! The pread/pwrite engine: a small pool of threads, each doing one synchronous
//! `read_at`/`write_at` at a time. It needs nothing from the kernel beyond the classic
//! syscalls, so it works where io_uring is forbidden (many containers), and its
//! simplicity makes it the oracle the io_uring engine is tested against.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::{BufPool, Completion, Engine, EngineKind, FileId, IoError, Op, Request};

struct Job {
    request: Request,
    file: Arc<File>,
    submitted: Instant,
}

/// The thread-pool engine. Create it with [`super::open_engine`] (or [`ThreadEngine::new`]).
#[derive(Debug)]
pub struct ThreadEngine {
    pool: BufPool,
    files: Vec<Arc<File>>,
    depth: usize,
    in_flight: usize,
    jobs: Option<Sender<Job>>,
    done: Receiver<Completion>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadEngine {
    /// An engine with `depth` requests in flight served by `threads` worker threads.
    pub fn new(depth: usize, threads: usize, pool: BufPool) -> Result<ThreadEngine, IoError> {
        let depth = depth.max(1);
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::new();
        for index in 0..threads.clamp(1, depth) {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            let worker = std::thread::Builder::new()
                .name(format!("tidemark-io-{index}"))
                .spawn(move || serve(&job_rx, &done_tx))
                .map_err(|err| IoError::Config(format!("cannot start an I/O thread: {err}")))?;
            workers.push(worker);
        }
        Ok(ThreadEngine {
            pool,
            files: Vec::new(),
            depth,
            in_flight: 0,
            jobs: Some(jobs),
            done,
            workers,
        })
    }

    fn take_done(&mut self, completion: Completion, out: &mut Vec<Completion>) {
        self.in_flight -= 1;
        out.push(completion);
    }
}

fn serve(jobs: &Mutex<Receiver<Job>>, done: &Sender<Completion>) {
    loop {
        // Holding the lock only while receiving: a poisoned lock means another worker
        // panicked while receiving, and the channel is still sound.
        let next = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(Job {
            mut request,
            file,
            submitted,
        }) = next
        else {
            return;
        };
        let result = match request.op {
            Op::Read => read_full(&file, request.buf.as_mut_slice(), request.offset),
            Op::Write => file
                .write_all_at(request.buf.as_slice(), request.offset)
                .map(|()| request.buf.len()),
        };
        let completion = Completion {
            user_data: request.user_data,
            op: request.op,
            file: request.file,
            offset: request.offset,
            result,
            buf: request.buf,
            latency: submitted.elapsed(),
        };
        if done.send(completion).is_err() {
            return;
        }
    }
}

/// Read until the buffer is full or the file ends; the count read, like a pread that is
/// never short except at end of file.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(done)
}

impl Engine for ThreadEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Threads
    }

    fn pool(&self) -> &BufPool {
        &self.pool
    }

    fn add_file(&mut self, file: Arc<File>) -> FileId {
        self.files.push(file);
        FileId(self.files.len() as u32 - 1)
    }

    fn file(&self, id: FileId) -> Option<&Arc<File>> {
        self.files.get(id.0 as usize)
    }

    fn queue_depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, request: Request) -> Result<(), IoError> {
        if self.in_flight >= self.depth {
            return Err(IoError::QueueFull(self.depth));
        }
        let Some(file) = self.files.get(request.file.0 as usize) else {
            return Err(IoError::UnknownFile(request.file));
        };
        let job = Job {
            file: Arc::clone(file),
            request,
            submitted: Instant::now(),
        };
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        match sent {
            Some(Ok(())) => {
                self.in_flight += 1;
                Ok(())
            }
            _ => Err(IoError::Config("the I/O threads have stopped".into())),
        }
    }

    fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<usize, IoError> {
        let before = out.len();
        let min = min.min(self.in_flight);
        while out.len() - before < min {
            let completion = self
                .done
                .recv()
                .map_err(|_| IoError::Config("the I/O threads have stopped".into()))?;
            self.take_done(completion, out);
        }
        while let Ok(completion) = self.done.try_recv() {
            self.take_done(completion, out);
        }
        Ok(out.len() - before)
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        // Closing the job channel ends each worker after its current request.
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
