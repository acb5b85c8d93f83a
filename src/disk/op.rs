//! The operations both engines execute, and their blocking implementation (used by the thread
//! pool, and by the io_uring engine for the block-device ioctls io_uring cannot issue).

use std::io;
use std::os::unix::io::RawFd;

use tokio::sync::oneshot;

use super::buf::IoBuf;
use super::file;

pub enum OpKind {
    /// Fill all of `buf` from `offset`.
    Read { offset: u64, buf: IoBuf },
    /// Write all of `buf` at `offset`; `fua`: stable on completion (RWF_DSYNC).
    Write { offset: u64, buf: IoBuf, fua: bool },
    /// fdatasync.
    Flush,
    /// fallocate(2) on a regular file.
    Fallocate { mode: i32, offset: u64, len: u64 },
    /// BLKDISCARD on a block device.
    Discard { offset: u64, len: u64 },
    /// BLKZEROOUT on a block device.
    ZeroOut { offset: u64, len: u64 },
}

impl OpKind {
    /// Whether io_uring can run it (the block ioctls it cannot).
    pub fn is_ioctl(&self) -> bool {
        matches!(self, OpKind::Discard { .. } | OpKind::ZeroOut { .. })
    }

    /// Whether it changes the disk's contents (and so needs a later flush to be stable).
    pub fn is_mutating(&self) -> bool {
        !matches!(self, OpKind::Read { .. } | OpKind::Flush)
    }

    pub fn into_buf(self) -> Option<IoBuf> {
        match self {
            OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => Some(buf),
            _ => None,
        }
    }
}

/// An operation and where its completion goes. The engine owns the buffer while the kernel may
/// touch it, and hands it back in `Done`.
pub struct Op {
    pub kind: OpKind,
    pub done: Reply,
    pub order: SubmitOrder,
}

/// Where an op's completion goes.
pub enum Reply {
    /// A caller awaiting it (the `Disk`'s async methods).
    Channel(oneshot::Sender<Done>),
    /// A callback for a caller that started the op without a task of its own
    /// ([`super::Disk::write_then`]). It runs on the engine's completion path (the ring's driver
    /// task, or a worker thread), so it must be short and must not wait or submit disk I/O.
    /// Dropped uncalled only if the engine drops the op (it stopped): the callback's captures
    /// must report that themselves.
    Call(Box<dyn FnOnce(Done) + Send>),
}

/// When the in-runtime io_uring engine may enter the kernel for an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitOrder {
    /// With the next burst.
    Now,
    /// Only after the tasks already woken on this runtime have run: a sync write's extent goes
    /// on the wire (quinn's connection driver, woken when the event loop wrote the frame into the
    /// stream) before its local submission (`io_uring_enter`, a VM exit here) holds the thread. The other engines submit
    /// from their own threads and ignore it.
    AfterWokenTasks,
}

pub struct Done {
    pub buf: Option<IoBuf>,
    pub res: io::Result<()>,
}

impl Op {
    pub fn complete(self, res: io::Result<()>) {
        let done = Done {
            buf: self.kind.into_buf(),
            res,
        };
        match self.done {
            // The receiver may be gone (caller cancelled); the buffer then simply returns to the
            // pool.
            Reply::Channel(tx) => {
                let _ = tx.send(done);
            }
            Reply::Call(f) => f(done),
        }
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

fn cvt(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Runs `kind` with blocking syscalls, resuming short transfers and retrying EINTR/EAGAIN.
pub fn run_blocking(fd: RawFd, kind: &mut OpKind) -> io::Result<()> {
    match kind {
        OpKind::Read { offset, buf } => {
            let mut done = 0usize;
            while done < buf.len() {
                let rest = &mut buf[done..];
                // SAFETY: rest is valid writable memory of rest.len() bytes.
                let rc = unsafe {
                    libc::pread(
                        fd,
                        rest.as_mut_ptr().cast(),
                        rest.len(),
                        (*offset + done as u64) as libc::off_t,
                    )
                };
                match cvt(rc) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => done += n,
                    Err(e) if retryable(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
        OpKind::Write { offset, buf, fua } => {
            let mut done = 0usize;
            let mut dsync = *fua;
            while done < buf.len() {
                let rest = &buf[done..];
                let iov = libc::iovec {
                    iov_base: rest.as_ptr() as *mut _,
                    iov_len: rest.len(),
                };
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                // SAFETY: iov describes valid readable memory.
                let rc = unsafe {
                    libc::pwritev2(fd, &iov, 1, (*offset + done as u64) as libc::off_t, flags)
                };
                match cvt(rc) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => done += n,
                    Err(e) if retryable(&e) => {}
                    // Kernels without RWF_DSYNC: plain write, then fdatasync below.
                    Err(e) if dsync && e.raw_os_error() == Some(libc::EOPNOTSUPP) => dsync = false,
                    Err(e) => return Err(e),
                }
            }
            if *fua && !dsync {
                fdatasync(fd)?;
            }
            Ok(())
        }
        OpKind::Flush => fdatasync(fd),
        OpKind::Fallocate { mode, offset, len } => loop {
            // SAFETY: plain syscall on an open fd.
            let rc =
                unsafe { libc::fallocate(fd, *mode, *offset as libc::off_t, *len as libc::off_t) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if !retryable(&e) {
                return Err(e);
            }
        },
        OpKind::Discard { offset, len } => file::discard(fd, *offset, *len),
        OpKind::ZeroOut { offset, len } => file::zeroout(fd, *offset, *len),
    }
}

pub(crate) fn fdatasync(fd: RawFd) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !retryable(&e) {
            return Err(e);
        }
    }
}
