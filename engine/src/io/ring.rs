//! A small io_uring wrapper that allows only the operations tidemark needs: read and write
//! at an offset, from a registered (fixed) buffer when the buffer belongs to the
//! registered pool and from a plain buffer otherwise.
//!
//! Where the kernel supports it (5.10+), the ring is created disabled, the buffer pool is
//! registered, and the kernel is told to refuse every other SQE opcode and every later
//! `io_uring_register` call (`IORING_REGISTER_RESTRICTIONS`) before the ring is enabled:
//! even a bug here cannot turn this ring into anything but a reader and writer.
//!
//! A ring made for one thread (`single_thread`) is set up, where the kernel allows it
//! (6.1+), with `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN`: completions are
//! posted only when that thread enters the kernel to wait for them, with no task-work
//! wakeups in between (what fio does). The ring is then enabled lazily, by the first
//! thread that submits, which becomes its only user; any other thread gets an error
//! instead of the kernel's EEXIST.
//!
//! Ownership rule, the one invariant all `unsafe` below rests on: a buffer handed to the
//! kernel in an SQE is moved into this ring's in-flight table (slot = SQE `user_data`)
//! and is only given back when its CQE has been reaped. Until then nobody else can read,
//! write or free it. Dropping the ring waits for every in-flight request first; if even
//! that fails, the buffers are leaked rather than freed under the kernel's feet.

use std::io;
use std::os::fd::RawFd;
use std::thread::{self, ThreadId};

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};

use super::buf::{BufPool, IoBuf};

/// `io_uring_enter` flag: wait for (and, with deferred task running, post) completions.
/// Part of the kernel ABI since 5.1; the io-uring crate does not export it.
const IORING_ENTER_GETEVENTS: u32 = 1;

/// The direction of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RingOp {
    Read,
    Write,
}

/// A request that finished: the caller's tag, the kernel's result (bytes or -errno) and
/// the buffer, given back.
pub(crate) struct Reaped<T> {
    pub tag: T,
    pub result: i32,
    pub buf: IoBuf,
}

/// An io_uring ring with its registered buffers and the table of requests in flight.
///
/// Field order is drop order, and it matters: `ring` is declared first so it is closed
/// (unregistering the fixed buffers) before `registered` releases the pool's memory and
/// before `slots` gives back the buffers of requests still parked there. Reordering the
/// fields would let the kernel hold registered memory that has been freed.
pub(crate) struct Ring<T> {
    // Must stay the first field: see the drop-order note above.
    ring: IoUring,
    /// The registered pool (its id selects fixed ops) and a handle that keeps its memory
    /// alive while the kernel has it registered.
    registered: Option<BufPool>,
    restricted: bool,
    /// Whether the ring was created disabled and has not been enabled yet.
    disabled: bool,
    /// Single-issuer rings (deferred task running): the thread that enabled the ring,
    /// the only one the kernel lets submit and reap.
    single_issuer: bool,
    owner: Option<ThreadId>,
    slots: Vec<Option<(IoBuf, T)>>,
    free_slots: Vec<u32>,
    queued: usize,
    /// Scratch space for `reap`: (slot, result) of the CQEs just consumed, kept between
    /// calls so reaping never allocates.
    completed: Vec<(u64, i32)>,
}

impl<T> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("entries", &self.slots.len())
            .field("fixed_buffers", &self.registered.is_some())
            .field("restricted", &self.restricted)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl<T> Ring<T> {
    /// A ring with room for `depth` requests in flight, with `pool` registered as fixed
    /// buffers when the kernel allows it. `single_thread`: the ring will only ever be
    /// used from one thread (see the module docs).
    pub fn new(depth: usize, pool: &BufPool, single_thread: bool) -> io::Result<Ring<T>> {
        let entries = depth.clamp(1, 4096).next_power_of_two() as u32;
        let built = build(entries, single_thread)?;
        let ring = built.ring;
        let registered = register_pool(&ring, pool);
        let mut restricted = false;
        if built.disabled {
            restricted = restrict(&ring).is_ok();
            if !built.single_issuer {
                ring.submitter().register_enable_rings()?;
            }
        }
        let depth = entries as usize;
        Ok(Ring {
            ring,
            registered,
            restricted,
            disabled: built.disabled && built.single_issuer,
            single_issuer: built.single_issuer,
            owner: None,
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth as u32).rev().collect(),
            queued: 0,
            completed: Vec::with_capacity(depth),
        })
    }

    /// Whether completions run only when the owning thread waits for them
    /// (`IORING_SETUP_DEFER_TASKRUN`).
    pub fn deferred_taskrun(&self) -> bool {
        self.single_issuer
    }

    /// Enable a lazily enabled ring on this thread, and refuse a single-issuer ring's use
    /// from any other thread.
    fn claim(&mut self) -> io::Result<()> {
        if !self.single_issuer {
            return Ok(());
        }
        let me = thread::current().id();
        match self.owner {
            Some(owner) if owner == me => Ok(()),
            Some(_) => Err(io::Error::other(
                "this io_uring engine belongs to the thread that first used it \
                 (single issuer); it cannot be used from another thread",
            )),
            None => {
                if self.disabled {
                    self.ring.submitter().register_enable_rings()?;
                    self.disabled = false;
                }
                self.owner = Some(me);
                Ok(())
            }
        }
    }

    /// Requests the ring can hold in flight.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    pub fn fixed_buffers(&self) -> bool {
        self.registered.is_some()
    }

    pub fn restricted(&self) -> bool {
        self.restricted
    }

    /// Queue a read into or a write from `buf`'s range at `offset` of `fd`. The request is
    /// sent to the kernel by the next [`Ring::submit_and_wait`]. When the ring is full the
    /// buffer and tag come back with the error.
    #[allow(clippy::result_large_err)]
    pub fn push(
        &mut self,
        op: RingOp,
        fd: RawFd,
        offset: u64,
        buf: IoBuf,
        tag: T,
    ) -> Result<(), (io::Error, IoBuf, T)> {
        let Some(slot) = self.free_slots.pop() else {
            let err = io::Error::new(io::ErrorKind::WouldBlock, "io_uring queue is full");
            return Err((err, buf, tag));
        };
        let fd = types::Fd(fd);
        let ptr = buf.start_ptr();
        let len = buf.len() as u32;
        let fixed = self
            .registered
            .as_ref()
            .filter(|pool| pool.id() == buf.pool_id())
            .map(|_| buf.index() as u16);
        let entry = match (op, fixed) {
            (RingOp::Read, Some(index)) => opcode::ReadFixed::new(fd, ptr, len, index)
                .offset(offset)
                .build(),
            (RingOp::Write, Some(index)) => opcode::WriteFixed::new(fd, ptr, len, index)
                .offset(offset)
                .build(),
            (RingOp::Read, None) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
            (RingOp::Write, None) => opcode::Write::new(fd, ptr, len).offset(offset).build(),
        }
        .user_data(u64::from(slot));
        // Park the buffer before the kernel can see the SQE.
        self.slots[slot as usize] = Some((buf, tag));
        if self.ring.submission().is_full() {
            if let Err(err) = self.submit_and_wait(0) {
                return Err(self.unpark(slot, err));
            }
        }
        // SAFETY: the SQE points at `len` bytes of the buffer parked in `slots[slot]`; that
        // buffer stays there, untouched and alive, until the CQE with user_data == slot is
        // reaped in `reap` (or `Drop` waits for it), which is what io_uring requires of
        // the memory an SQE names. `fd` is a descriptor the engine keeps open.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            let err = io::Error::new(io::ErrorKind::WouldBlock, "io_uring submission queue full");
            return Err(self.unpark(slot, err));
        }
        self.queued += 1;
        Ok(())
    }

    fn unpark(&mut self, slot: u32, err: io::Error) -> (io::Error, IoBuf, T) {
        self.free_slots.push(slot);
        let (buf, tag) = self.slots[slot as usize]
            .take()
            .expect("a slot parked a moment ago is still occupied");
        (err, buf, tag)
    }

    /// Send queued requests to the kernel and wait until at least `want` completions are
    /// ready (0: do not wait).
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        self.claim()?;
        let want = want.min(self.in_flight());
        loop {
            let entered = if self.single_issuer {
                // Deferred completions are posted only by an enter with GETEVENTS, so a
                // ring of this kind always asks for events, even when not waiting.
                let to_submit = self.ring.submission().len() as u32;
                // SAFETY: every SQE in the queue points into a buffer parked in `slots`
                // (see `push`); no argument pointer is passed.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        to_submit,
                        want as u32,
                        IORING_ENTER_GETEVENTS,
                        None,
                    )
                }
            } else {
                self.ring.submit_and_wait(want)
            };
            match entered {
                Ok(_) => {
                    self.queued = 0;
                    return Ok(());
                }
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) && want == 0 => {
                    return Ok(());
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Hand every ready completion to `sink`, with its buffer.
    pub fn reap(&mut self, mut sink: impl FnMut(Reaped<T>)) {
        let mut finished = std::mem::take(&mut self.completed);
        finished.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(slot, result) in &finished {
            let Some(parked) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
                // Every SQE we push carries a slot we parked; anything else is not ours.
                tracing::error!(slot, "io_uring completion for an unknown request ignored");
                continue;
            };
            self.free_slots.push(slot as u32);
            let (buf, tag) = parked;
            sink(Reaped { tag, result, buf });
        }
        finished.clear();
        self.completed = finished;
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        while self.in_flight() > 0 {
            if self.submit_and_wait(1).is_err() {
                // The kernel may still own these buffers: leak them (and with them the
                // pool's memory) instead of letting it be reused or freed.
                for slot in self.slots.iter_mut() {
                    if let Some(parked) = slot.take() {
                        std::mem::forget(parked);
                    }
                }
                return;
            }
            self.reap(drop);
        }
    }
}

/// A ring as [`build`] could set it up.
struct Built {
    ring: IoUring,
    /// Created disabled (restrictions can be set before enabling it).
    disabled: bool,
    /// Created with `SINGLE_ISSUER | DEFER_TASKRUN`.
    single_issuer: bool,
}

/// Build a ring, disabled (so restrictions can be set) and with cooperative task running
/// where the kernel knows those flags; for a `single_thread` ring also single-issuer with
/// deferred task running where it knows those; plain otherwise.
fn build(entries: u32, single_thread: bool) -> io::Result<Built> {
    // (disabled, coop, single issuer + deferred task running)
    let attempts: [(bool, bool, bool); 4] = [
        (true, true, true),
        (true, true, false),
        (true, false, false),
        (false, false, false),
    ];
    let mut last = None;
    for (disabled, coop, single_issuer) in attempts {
        if single_issuer && !single_thread {
            continue;
        }
        let mut builder = IoUring::builder();
        if disabled {
            builder.setup_r_disabled();
        }
        if coop {
            builder.setup_coop_taskrun();
        }
        if single_issuer {
            builder.setup_single_issuer();
            builder.setup_defer_taskrun();
        }
        match builder.build(entries) {
            Ok(ring) => {
                return Ok(Built {
                    ring,
                    disabled,
                    single_issuer,
                })
            }
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => last = Some(err),
            Err(err) => return Err(err),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
}

fn register_pool(ring: &IoUring, pool: &BufPool) -> Option<BufPool> {
    // The kernel's limit on registered buffers (IORING_MAX_REG_BUFFERS) is 16384.
    if pool.count() > 16384 {
        return None;
    }
    let iovecs: Vec<libc::iovec> = (0..pool.count())
        .map(|index| {
            let (base, len) = pool.region(index);
            libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            }
        })
        .collect();
    // SAFETY: each iovec covers one buffer of `pool`'s allocation. The returned clone of
    // the pool is stored in the ring and dropped only after the ring (and with it the
    // registration) is gone, so the registered memory outlives its registration.
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => Some(pool.clone()),
        Err(err) => {
            tracing::info!(%err, "cannot register I/O buffers with io_uring; using unregistered buffers");
            None
        }
    }
}

/// Allow only our four opcodes, no SQE flags and no further registration.
fn restrict(ring: &IoUring) -> io::Result<()> {
    let mut allowed = [
        Restriction::sqe_op(opcode::Read::CODE),
        Restriction::sqe_op(opcode::Write::CODE),
        Restriction::sqe_op(opcode::ReadFixed::CODE),
        Restriction::sqe_op(opcode::WriteFixed::CODE),
        Restriction::sqe_flags_allowed(squeue::Flags::empty().bits()),
    ];
    ring.submitter().register_restrictions(&mut allowed)
}
