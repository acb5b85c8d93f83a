//! Engine 1: io_uring on a dedicated thread.
//!
//! Callers push ops onto a mutex-protected queue. The ring thread keeps a poll on an eventfd armed
//! in the ring, so one `io_uring_enter` both submits a batch and sleeps until either a completion
//! or new work arrives. Callers only write the eventfd when the thread said it is going to sleep,
//! so a busy ring costs no extra syscalls per op. The file is registered (fixed file 0).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::op::{Op, OpKind};
use super::threads::Threads;

pub(super) const RING_ENTRIES: u32 = 256;
/// Ops in the kernel at once; the CQ (twice the SQ) can then never overflow.
pub(super) const MAX_INFLIGHT: usize = RING_ENTRIES as usize;
const WAKE_TOKEN: u64 = u64::MAX;
/// Largest byte count one SQE moves; a longer transfer continues as a short one would.
const MAX_CHUNK: usize = 1 << 30;

pub struct Uring {
    q: Arc<Queue>,
    /// Runs the block-device ioctls io_uring has no opcode for.
    aux: Option<Threads>,
}

struct Queue {
    state: Mutex<State>,
    efd: OwnedFd,
}

struct State {
    ops: VecDeque<Op>,
    /// The ring thread is (about to be) blocked in io_uring_enter: wake it through the eventfd.
    sleeping: bool,
    shutdown: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. EAGAIN (counter saturated) still wakes.
        unsafe {
            libc::write(
                self.efd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

impl Uring {
    /// Sets up the ring; fails (so the caller can fall back to threads) if io_uring is missing,
    /// forbidden, or lacks an opcode we need.
    pub fn new(file: Arc<File>, is_block_device: bool) -> io::Result<Uring> {
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh fd we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let q = Arc::new(Queue {
            state: Mutex::new(State {
                ops: VecDeque::new(),
                sleeping: false,
                shutdown: false,
            }),
            efd,
        });
        let aux = if is_block_device {
            Some(Threads::new(file.clone(), 1, "twinblk-ioctl")?)
        } else {
            None
        };
        // The ring is created on its own thread: with SINGLE_ISSUER only the creating thread may
        // submit.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let tq = q.clone();
        thread::Builder::new()
            .name("twinblk-uring".into())
            .spawn(move || match setup_ring(&file) {
                Ok(ring) => {
                    let _ = ready_tx.send(Ok(()));
                    RingThread::new(ring, tq, file).run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })?;
        ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("io_uring thread died during setup")))?;
        Ok(Uring { q, aux })
    }

    pub fn submit(&self, op: Op) {
        if op.kind.is_ioctl() {
            match &self.aux {
                Some(aux) => aux.submit(op),
                None => op.complete(Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))),
            }
            return;
        }
        let mut st = self.q.lock();
        if st.shutdown {
            drop(st);
            op.complete(Err(io::Error::other("disk engine stopped")));
            return;
        }
        st.ops.push_back(op);
        let wake = std::mem::replace(&mut st.sleeping, false);
        drop(st);
        if wake {
            self.q.wake();
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.q.lock().shutdown = true;
        self.q.wake();
    }
}

/// Builds the ring (with the flags that cut completion overhead for a single dedicated thread,
/// when the kernel has them), checks the opcodes we need, and registers the file.
fn setup_ring(file: &File) -> io::Result<IoUring> {
    let ring: IoUring = match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
    {
        Ok(r) => r,
        // Kernels before 6.1: plain ring.
        Err(_) => IoUring::builder().build(RING_ENTRIES)?,
    };
    check_and_register(ring, file)
}

/// Checks the opcodes we need and registers the file as fixed file 0.
pub(super) fn check_and_register(ring: IoUring, file: &File) -> io::Result<IoUring> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
        opcode::Fallocate::CODE,
        opcode::PollAdd::CODE,
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {code} not supported by this kernel"),
            ));
        }
    }
    ring.submitter().register_files(&[file.as_raw_fd()])?;
    Ok(ring)
}

pub(super) struct InFlight {
    pub(super) op: Op,
    /// Bytes already transferred (read/write), for resuming short transfers.
    pub(super) done: usize,
}

struct RingThread {
    ring: IoUring,
    q: Arc<Queue>,
    /// Keeps the registered file open as long as the ring may use it.
    _file: Arc<File>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Ops taken from the queue, not yet in the ring (ring full).
    backlog: VecDeque<Op>,
    /// Slots to (re)submit: new ops placed in a slot, or short/EAGAIN ones to resume.
    ready: VecDeque<usize>,
    inflight: usize,
    wake_armed: bool,
    wake_buf: u64,
}

impl RingThread {
    fn new(ring: IoUring, q: Arc<Queue>, file: Arc<File>) -> RingThread {
        RingThread {
            ring,
            q,
            _file: file,
            slots: (0..MAX_INFLIGHT).map(|_| None).collect(),
            free: (0..MAX_INFLIGHT).rev().collect(),
            backlog: VecDeque::new(),
            ready: VecDeque::new(),
            inflight: 0,
            wake_armed: false,
            wake_buf: 0,
        }
    }

    fn run(mut self) {
        loop {
            self.reap();
            let shutdown = {
                let mut st = self.q.lock();
                st.sleeping = false;
                self.backlog.extend(st.ops.drain(..));
                st.shutdown
            };
            // Place queued ops into free slots.
            while let Some(slot) = self.free.last().copied() {
                let Some(op) = self.backlog.pop_front() else {
                    break;
                };
                self.free.pop();
                self.slots[slot] = Some(InFlight { op, done: 0 });
                self.ready.push_back(slot);
            }
            if shutdown && self.backlog.is_empty() && self.ready.is_empty() && self.inflight == 0 {
                return;
            }
            self.push_sqes();
            if !self.wake_armed {
                let e = opcode::PollAdd::new(types::Fd(self.q.efd.as_raw_fd()), libc::POLLIN as _)
                    .build()
                    .user_data(WAKE_TOKEN);
                // SAFETY: poll references no memory.
                if unsafe { self.ring.submission().push(&e) }.is_ok() {
                    self.wake_armed = true;
                }
            }
            // Sleep only if there is nothing to do but wait for the kernel or for callers.
            let mut want = 0;
            if self.ring.completion().is_empty() && self.ready.is_empty() {
                let mut st = self.q.lock();
                if (st.ops.is_empty() || self.free.is_empty()) && self.wake_armed {
                    st.sleeping = true;
                    want = 1;
                } else if shutdown && self.inflight > 0 {
                    want = 1;
                }
            }
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    tracing::warn!("io_uring_enter failed: {e}; failing in-flight disk I/O");
                    self.fail_all(e);
                    return;
                }
            }
        }
    }

    fn push_sqes(&mut self) {
        while let Some(&slot) = self.ready.front() {
            let Some(entry) = self.slots.get(slot).and_then(|s| s.as_ref()).map(sqe) else {
                self.ready.pop_front();
                continue;
            };
            let entry = entry.user_data(slot as u64);
            // SAFETY: the op (and its buffer) stays in `slots` until its completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                // SQ full: submit what we have and retry.
                if let Err(e) = self.ring.submit() {
                    if e.raw_os_error() != Some(libc::EBUSY)
                        && e.raw_os_error() != Some(libc::EINTR)
                    {
                        tracing::warn!("io_uring submit failed: {e}");
                    }
                    return;
                }
                continue;
            }
            self.ready.pop_front();
            self.inflight += 1;
        }
    }

    fn reap(&mut self) {
        let mut cqes = Vec::new();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for (ud, res) in cqes {
            if ud == WAKE_TOKEN {
                self.wake_armed = false;
                // Reset the counter so the next poll does not fire at once.
                // SAFETY: reads 8 bytes into a valid u64; nonblocking fd.
                unsafe {
                    libc::read(
                        self.q.efd.as_raw_fd(),
                        (&mut self.wake_buf as *mut u64).cast(),
                        8,
                    )
                };
                continue;
            }
            let slot = ud as usize;
            self.inflight = self.inflight.saturating_sub(1);
            let Some(mut f) = self.slots.get_mut(slot).and_then(|s| s.take()) else {
                continue;
            };
            let outcome = outcome(&mut f, res);
            match outcome {
                Some(r) => {
                    f.op.complete(r);
                    self.free.push(slot);
                }
                None => {
                    self.slots[slot] = Some(f);
                    self.ready.push_back(slot);
                }
            }
        }
    }

    fn fail_all(&mut self, e: io::Error) {
        for slot in self.slots.iter_mut() {
            if let Some(f) = slot.take() {
                f.op.complete(Err(io::Error::new(e.kind(), e.to_string())));
            }
        }
        for op in self.backlog.drain(..) {
            op.complete(Err(io::Error::new(e.kind(), e.to_string())));
        }
        let mut st = self.q.lock();
        st.shutdown = true;
        for op in st.ops.drain(..) {
            op.complete(Err(io::Error::new(e.kind(), e.to_string())));
        }
    }
}

/// What a CQE result means for its op: `Some` when finished (success or error), `None` when the
/// rest must be resubmitted (a short transfer, EAGAIN or EINTR).
pub(super) fn outcome(f: &mut InFlight, res: i32) -> Option<io::Result<()>> {
    if res < 0 {
        let errno = -res;
        return if errno == libc::EAGAIN || errno == libc::EINTR {
            None
        } else {
            Some(Err(io::Error::from_raw_os_error(errno)))
        };
    }
    match &f.op.kind {
        OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => {
            let n = res as usize;
            f.done += n;
            if f.done >= buf.len() {
                Some(Ok(()))
            } else if n == 0 {
                Some(Err(if matches!(f.op.kind, OpKind::Read { .. }) {
                    io::ErrorKind::UnexpectedEof.into()
                } else {
                    io::ErrorKind::WriteZero.into()
                }))
            } else {
                None
            }
        }
        _ => Some(Ok(())),
    }
}

/// The SQE for (the rest of) an op.
pub(super) fn sqe(f: &InFlight) -> squeue::Entry {
    let fd = types::Fixed(0);
    match &f.op.kind {
        OpKind::Read { offset, buf } => {
            let len = (buf.len() - f.done).min(MAX_CHUNK);
            // Within buf, which the slot owns until completion.
            let ptr = buf.raw_ptr().wrapping_add(f.done);
            opcode::Read::new(fd, ptr, len as u32)
                .offset(offset + f.done as u64)
                .build()
        }
        OpKind::Write { offset, buf, fua } => {
            let len = (buf.len() - f.done).min(MAX_CHUNK);
            let ptr = buf.raw_ptr().wrapping_add(f.done).cast_const();
            opcode::Write::new(fd, ptr, len as u32)
                .offset(offset + f.done as u64)
                .rw_flags(if *fua { libc::RWF_DSYNC } else { 0 })
                .build()
        }
        OpKind::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        OpKind::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, *len)
            .offset(*offset)
            .mode(*mode)
            .build(),
        // Routed to the aux pool in `submit`; a no-op keeps the slot bookkeeping simple if not.
        OpKind::Discard { .. } | OpKind::ZeroOut { .. } => opcode::Nop::new().build(),
    }
}
