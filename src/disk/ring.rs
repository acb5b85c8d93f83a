//! The io_uring bookkeeping both io_uring engines share: ring setup, slots for the ops in the
//! kernel, turning ops into SQEs, resuming short transfers, and completing ops from CQEs. The
//! engines only differ in who calls it and how they wait (`uring`: a dedicated thread sleeping in
//! `io_uring_enter`; `uring_inline`: a task on the caller's runtime woken by an eventfd).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::op::{Op, OpKind};

pub(super) const RING_ENTRIES: u32 = 256;
/// Ops in the kernel at once; the CQ (twice the SQ) can then never overflow.
const MAX_INFLIGHT: usize = RING_ENTRIES as usize;
/// Largest byte count one SQE moves; a longer transfer continues as a short one would.
const MAX_CHUNK: usize = 1 << 30;
/// user_data at or above this is the engine's own (see `RingCore::reap`), not a slot.
pub(super) const FIRST_TOKEN: u64 = MAX_INFLIGHT as u64;

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

struct InFlight {
    op: Op,
    /// Bytes already transferred (read/write), for resuming short transfers.
    done: usize,
}

/// A ring and the ops it owns. Not thread-safe by itself: each engine puts it behind its own
/// thread or mutex.
pub(super) struct RingCore {
    ring: IoUring,
    /// Keeps the registered file open as long as the ring may use it.
    _file: Arc<File>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Ops waiting for a free slot.
    backlog: VecDeque<Op>,
    /// Slots whose SQE is not in the ring yet: new ops, or short/EAGAIN ones to resume.
    ready: VecDeque<usize>,
    /// SQEs the kernel has and has not completed yet (slots and engine tokens alike).
    inflight: usize,
}

impl RingCore {
    pub(super) fn new(ring: IoUring, file: Arc<File>) -> RingCore {
        RingCore {
            ring,
            _file: file,
            slots: (0..MAX_INFLIGHT).map(|_| None).collect(),
            free: (0..MAX_INFLIGHT).rev().collect(),
            backlog: VecDeque::new(),
            ready: VecDeque::new(),
            inflight: 0,
        }
    }

    /// Takes an op; it reaches the kernel at the next `push_sqes` + `enter`.
    pub(super) fn queue(&mut self, op: Op) {
        self.backlog.push_back(op);
    }

    /// Whether no op is queued, waiting to be pushed, or in the kernel, given that `tokens` of
    /// the engine's own SQEs are in the kernel.
    pub(super) fn idle(&self, tokens: usize) -> bool {
        self.inflight <= tokens && self.ready.is_empty() && self.backlog.is_empty()
    }

    /// Whether anything is waiting to be pushed to the kernel.
    pub(super) fn has_pending(&self) -> bool {
        !self.ready.is_empty() || (!self.backlog.is_empty() && !self.free.is_empty())
    }

    /// How many of our SQEs the kernel holds (slots and engine tokens alike).
    pub(super) fn inflight(&self) -> usize {
        self.inflight
    }

    pub(super) fn cq_empty(&mut self) -> bool {
        self.ring.completion().is_empty()
    }

    /// Pushes an engine-owned SQE (user_data ≥ `FIRST_TOKEN`, referencing no memory of ours);
    /// false if the SQ is full.
    pub(super) fn push_token(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: the caller's SQE references no memory (a poll on an fd that outlives the ring).
        let ok = unsafe { self.ring.submission().push(entry) }.is_ok();
        if ok {
            self.inflight += 1;
        }
        ok
    }

    /// Moves queued ops into free slots and their SQEs into the SQ; when the SQ fills up, enters
    /// the kernel to make room. Does not enter otherwise: call `enter` once for the whole batch.
    pub(super) fn push_sqes(&mut self) -> io::Result<()> {
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
        while let Some(&slot) = self.ready.front() {
            let Some(entry) = self.slots.get(slot).and_then(|s| s.as_ref()).map(sqe) else {
                self.ready.pop_front();
                continue;
            };
            let entry = entry.user_data(slot as u64);
            // SAFETY: the op (and its buffer) stays in `slots` until its completion is reaped,
            // and `Drop` waits for every op in the kernel before the slots go.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                if !self.enter(0)? {
                    // The kernel took nothing (busy): leave the rest for the next round.
                    return Ok(());
                }
                continue;
            }
            self.ready.pop_front();
            self.inflight += 1;
        }
        Ok(())
    }

    /// One `io_uring_enter`: submits whatever is in the SQ and waits for `want` completions.
    /// Ok(false) when the kernel was busy or interrupted (try again later); Err is fatal.
    pub(super) fn enter(&mut self, want: usize) -> io::Result<bool> {
        if want == 0 && self.ring.submission().is_empty() {
            return Ok(true);
        }
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Hands the ops whose CQEs arrived to `done` (resuming short transfers instead); engine
    /// tokens go to `token`.
    pub(super) fn reap(
        &mut self,
        mut token: impl FnMut(u64),
        mut done: impl FnMut(Op, io::Result<()>),
    ) {
        let RingCore {
            ring,
            slots,
            free,
            ready,
            inflight,
            ..
        } = self;
        for c in ring.completion() {
            *inflight = inflight.saturating_sub(1);
            let ud = c.user_data();
            if ud >= FIRST_TOKEN {
                token(ud);
                continue;
            }
            let slot = ud as usize;
            let Some(entry) = slots.get_mut(slot) else {
                continue;
            };
            let Some(mut f) = entry.take() else {
                continue;
            };
            match outcome(&mut f, c.result()) {
                Some(r) => {
                    done(f.op, r);
                    free.push(slot);
                }
                None => {
                    *entry = Some(f);
                    ready.push_back(slot);
                }
            }
        }
    }

    /// After a fatal ring failure: fails every op not in the kernel. Ops the kernel may still
    /// hold keep their slots (and buffers) until `Drop` has waited for them.
    pub(super) fn fail_pending(&mut self, e: &io::Error) {
        let err = || Err(io::Error::new(e.kind(), e.to_string()));
        while let Some(slot) = self.ready.pop_front() {
            if let Some(f) = self.slots.get_mut(slot).and_then(|s| s.take()) {
                f.op.complete(err());
                self.free.push(slot);
            }
        }
        for op in self.backlog.drain(..) {
            op.complete(err());
        }
    }
}

impl Drop for RingCore {
    fn drop(&mut self) {
        // The kernel may still write into buffers owned by `slots` (an engine stopped with I/O
        // in flight): wait for those completions before freeing them.
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

/// What a CQE result means for its op: `Some` when finished (success or error), `None` when the
/// rest must be resubmitted (a short transfer, EAGAIN or EINTR).
fn outcome(f: &mut InFlight, res: i32) -> Option<io::Result<()>> {
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
fn sqe(f: &InFlight) -> squeue::Entry {
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
        // Routed to the aux pool by the engines; a no-op keeps the slot bookkeeping simple if not.
        OpKind::Discard { .. } | OpKind::ZeroOut { .. } => opcode::Nop::new().build(),
    }
}
