//! Engine 1: io_uring on a dedicated thread.
//!
//! Callers push ops onto a mutex-protected queue. The ring thread keeps a poll on an eventfd armed
//! in the ring, so one `io_uring_enter` both submits a batch and sleeps until either a completion
//! or new work arrives. Callers only write the eventfd when the thread said it is going to sleep,
//! so a busy ring costs no extra syscalls per op. The file is registered (fixed file 0).
//!
//! Completions go back in batches: when the engine is opened on a tokio runtime, the ring thread
//! sends everything one reap finished to a completer task there, which completes the callers'
//! oneshots. Waking the runtime from another thread costs a syscall; this pays it once per batch
//! instead of once per op. Without a runtime (or once it is gone) the ring thread completes the
//! ops itself.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use io_uring::{opcode, types, IoUring};
use tokio::sync::mpsc;

use super::op::Op;
use super::ring::{check_and_register, RingCore, RING_ENTRIES};
use super::threads::Threads;

const WAKE_TOKEN: u64 = u64::MAX;

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
        let completer = tokio::runtime::Handle::try_current().ok().map(|h| {
            let (tx, rx) = mpsc::unbounded_channel();
            h.spawn(complete_batches(rx));
            tx
        });
        thread::Builder::new()
            .name("twinblk-uring".into())
            .spawn(move || match setup_ring(&file) {
                Ok(ring) => {
                    let _ = ready_tx.send(Ok(()));
                    RingThread::new(RingCore::new(ring, file), tq, completer).run();
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
type Batch = Vec<(Op, io::Result<()>)>;

/// Completes on the runtime the ops the ring thread finished, a batch per wake.
async fn complete_batches(mut rx: mpsc::UnboundedReceiver<Batch>) {
    while let Some(batch) = rx.recv().await {
        for (op, res) in batch {
            op.complete(res);
        }
    }
}

struct RingThread {
    core: RingCore,
    q: Arc<Queue>,
    wake_armed: bool,
    /// The completer task, if the engine was opened on a runtime.
    completer: Option<mpsc::UnboundedSender<Batch>>,
}

impl RingThread {
    fn new(
        core: RingCore,
        q: Arc<Queue>,
        completer: Option<mpsc::UnboundedSender<Batch>>,
    ) -> RingThread {
        RingThread {
            core,
            q,
            wake_armed: false,
            completer,
        }
    }

    fn run(mut self) {
        loop {
            self.reap();
            let shutdown = {
                let mut st = self.q.lock();
                st.sleeping = false;
                for op in st.ops.drain(..) {
                    self.core.queue(op);
                }
                st.shutdown
            };
            if let Err(e) = self.core.push_sqes() {
                self.fail(e);
                return;
            }
            if shutdown && self.core.idle(usize::from(self.wake_armed)) {
                // Fire our own wake poll, so dropping the ring (which waits for everything in
                // the kernel) does not wait for it forever.
                self.q.wake();
                return;
            }
            if !self.wake_armed {
                let e = opcode::PollAdd::new(types::Fd(self.q.efd.as_raw_fd()), libc::POLLIN as _)
                    .build()
                    .user_data(WAKE_TOKEN);
                self.wake_armed = self.core.push_token(&e);
            }
            // Sleep only if there is nothing to do but wait for the kernel or for callers.
            let mut want = 0;
            if self.core.cq_empty() && !self.core.has_pending() {
                let mut st = self.q.lock();
                if st.ops.is_empty() && self.wake_armed {
                    st.sleeping = true;
                    want = 1;
                } else if shutdown && self.core.inflight() > 0 {
                    want = 1;
                }
            }
            if let Err(e) = self.core.enter(want) {
                self.fail(e);
                return;
            }
        }
    }

    fn reap(&mut self) {
        let mut woken = false;
        let mut batch = Vec::new();
        match &self.completer {
            Some(_) => self
                .core
                .reap(|ud| woken |= ud == WAKE_TOKEN, |op, r| batch.push((op, r))),
            None => self.core.reap(|ud| woken |= ud == WAKE_TOKEN, Op::complete),
        }
        if !batch.is_empty() {
            if let Some(tx) = &self.completer {
                if let Err(mpsc::error::SendError(batch)) = tx.send(batch) {
                    // The runtime is gone: complete here from now on.
                    self.completer = None;
                    for (op, r) in batch {
                        op.complete(r);
                    }
                }
            }
        }
        if woken {
            self.wake_armed = false;
            let mut buf = 0u64;
            // Reset the counter so the next poll does not fire at once.
            // SAFETY: reads 8 bytes into a valid u64; nonblocking fd.
            unsafe { libc::read(self.q.efd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
        }
    }

    /// The ring failed: fail everything queued and refuse new ops. Dropping `self.core` then
    /// waits for what the kernel still holds.
    fn fail(&mut self, e: io::Error) {
        tracing::warn!("io_uring_enter failed: {e}; failing in-flight disk I/O");
        self.core.fail_pending(&e);
        let mut st = self.q.lock();
        st.shutdown = true;
        for op in st.ops.drain(..) {
            op.complete(Err(io::Error::new(e.kind(), e.to_string())));
        }
    }
}
