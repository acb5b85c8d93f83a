//! Engine 3: io_uring driven from the caller's tokio runtime, with no thread hop.
//!
//! The calling task pushes its SQE and enters the kernel itself (`io_uring_enter` without waiting).
//! An eventfd registered with the ring is written on every completion; a reaper task on the
//! runtime that opened the disk waits on it with `AsyncFd`, reaps the CQEs, resubmits short
//! transfers, and completes the callers' oneshots — on a current-thread runtime those wakes stay
//! on the same thread. The ring sits behind a `std::sync::Mutex`: uncontended on one thread, and
//! still correct when callers run on other threads or runtimes (ublk, multi-thread runtimes).
//! No SINGLE_ISSUER/DEFER_TASKRUN: any thread may submit, and completions must post without an
//! enter from the reaper.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::IoUring;
use tokio::io::unix::AsyncFd;

use super::op::Op;
use super::threads::Threads;
use super::uring::{check_and_register, outcome, sqe, InFlight, MAX_INFLIGHT, RING_ENTRIES};

pub struct UringInline {
    shared: Arc<Shared>,
    /// Runs the block-device ioctls io_uring has no opcode for.
    aux: Option<Threads>,
}

struct Shared {
    state: Mutex<Ring>,
    /// Registered with the ring: the kernel bumps it for every CQE.
    efd: OwnedFd,
}

struct Ring {
    ring: IoUring,
    /// Keeps the registered file open as long as the ring may use it.
    _file: Arc<File>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Ops waiting for a free slot.
    backlog: VecDeque<Op>,
    /// Slots whose SQE is not in the ring yet: new ops, or short/EAGAIN ones to resume.
    ready: VecDeque<usize>,
    inflight: usize,
    shutdown: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        // Slots and queues stay consistent between statements; a panic elsewhere leaves no
        // half-updated op.
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

impl UringInline {
    /// Sets up the ring and spawns its reaper on the current tokio runtime; fails (so the caller
    /// can fall back) without a runtime with I/O enabled, or if io_uring is unavailable.
    pub fn new(file: Arc<File>, is_block_device: bool) -> io::Result<UringInline> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("no tokio runtime to reap completions: {e}")))?;
        let ring = check_and_register(IoUring::builder().build(RING_ENTRIES)?, &file)?;
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh fd we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        // A duplicate for AsyncFd, which takes ownership; both refer to the same counter.
        let afd = {
            let _g = handle.enter();
            // SAFETY: the AsyncFd owns this OwnedFd, which stays open and unchanged until dropped.
            unsafe { AsyncFd::register(efd.try_clone()?) }.map_err(io::Error::from)?
        };
        let aux = if is_block_device {
            Some(Threads::new(file.clone(), 1, "twinblk-ioctl")?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(Ring {
                ring,
                _file: file,
                slots: (0..MAX_INFLIGHT).map(|_| None).collect(),
                free: (0..MAX_INFLIGHT).rev().collect(),
                backlog: VecDeque::new(),
                ready: VecDeque::new(),
                inflight: 0,
                shutdown: false,
            }),
            efd,
        });
        handle.spawn(reaper(shared.clone(), afd));
        Ok(UringInline { shared, aux })
    }

    pub fn submit(&self, op: Op) {
        if op.kind.is_ioctl() {
            match &self.aux {
                Some(aux) => aux.submit(op),
                None => op.complete(Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))),
            }
            return;
        }
        let mut r = self.shared.lock();
        if r.shutdown {
            drop(r);
            op.complete(Err(io::Error::other("disk engine stopped")));
            return;
        }
        r.backlog.push_back(op);
        r.place();
        r.push_and_submit();
    }
}

impl Drop for UringInline {
    fn drop(&mut self) {
        // The reaper finishes what is in flight, then exits (dropping the ring).
        self.shared.lock().shutdown = true;
        self.shared.wake();
    }
}

async fn reaper(shared: Arc<Shared>, afd: AsyncFd<OwnedFd>) {
    let mut counter = 0u64;
    loop {
        {
            let mut r = shared.lock();
            r.reap();
            r.place();
            r.push_and_submit();
            if r.shutdown && r.inflight == 0 && r.ready.is_empty() {
                r.fail_backlog(io::Error::other("disk engine stopped"));
                return;
            }
        }
        let mut guard = match afd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("waiting for io_uring completions failed: {e}");
                shared.lock().fail_all(e);
                return;
            }
        };
        // Reset the counter, then clear readiness; CQEs posted after the read bump it again, and
        // the reap at the top of the loop runs after both.
        // SAFETY: reads 8 bytes into a valid u64; nonblocking fd.
        unsafe {
            libc::read(
                afd.get_ref().as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                8,
            )
        };
        guard.clear_ready();
    }
}

impl Ring {
    /// Moves backlog ops into free slots.
    fn place(&mut self) {
        while let Some(slot) = self.free.last().copied() {
            let Some(op) = self.backlog.pop_front() else {
                break;
            };
            self.free.pop();
            if let Some(s) = self.slots.get_mut(slot) {
                *s = Some(InFlight { op, done: 0 });
                self.ready.push_back(slot);
            }
        }
    }

    /// Pushes ready SQEs and enters the kernel once, without waiting.
    fn push_and_submit(&mut self) {
        while let Some(&slot) = self.ready.front() {
            let Some(entry) = self.slots.get(slot).and_then(|s| s.as_ref()).map(sqe) else {
                self.ready.pop_front();
                continue;
            };
            let entry = entry.user_data(slot as u64);
            // SAFETY: the op (and its buffer) stays in `slots` until its completion is reaped, and
            // `Drop for Ring` waits for in-flight ops before the slots go.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                // SQ full (it holds as many as there are slots, so only after failed enters).
                break;
            }
            self.ready.pop_front();
            self.inflight += 1;
        }
        if self.ring.submission().is_empty() {
            return;
        }
        match self.ring.submit() {
            Ok(_) => {}
            // Left in the SQ; the reaper retries after the next completion.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) => {}
            Err(e) => {
                tracing::warn!("io_uring_enter failed: {e}; failing in-flight disk I/O");
                self.fail_all(e);
            }
        }
    }

    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            let slot = ud as usize;
            self.inflight = self.inflight.saturating_sub(1);
            let Some(mut f) = self.slots.get_mut(slot).and_then(|s| s.take()) else {
                continue;
            };
            match outcome(&mut f, res) {
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

    fn fail_backlog(&mut self, e: io::Error) {
        for op in self.backlog.drain(..) {
            op.complete(Err(io::Error::new(e.kind(), e.to_string())));
        }
    }

    /// After a ring failure: fails everything and refuses new ops. Ops the kernel may still hold
    /// keep their slots (and buffers) until `Drop` has waited for them.
    fn fail_all(&mut self, e: io::Error) {
        self.shutdown = true;
        while let Some(slot) = self.ready.pop_front() {
            if let Some(f) = self.slots.get_mut(slot).and_then(|s| s.take()) {
                f.op.complete(Err(io::Error::new(e.kind(), e.to_string())));
                self.free.push(slot);
            }
        }
        self.fail_backlog(e);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers owned by `slots` (the runtime can drop the
        // reaper with I/O in flight): wait for those completions before freeing them.
        while self.inflight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::warn!("io_uring: waiting for in-flight I/O at shutdown failed: {e}");
                    // Leak the buffers rather than free memory the kernel may still write.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            let n = self.ring.completion().count();
            self.inflight = self.inflight.saturating_sub(n);
        }
    }
}
