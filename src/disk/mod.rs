//! The disk driver: O_DIRECT (by default) I/O on a regular file or a block device, with many I/Os in
//! flight. The NBD server today, and the replication driver later, call it; it knows nothing of
//! either. Engines (io_uring on the caller's runtime or on a dedicated thread, or a thread pool)
//! sit behind one `Disk` handle.
//!
//! - `Disk::open(path, &DiskOptions) -> Result<Disk, DiskError>`; `Disk` is `Clone + Send + Sync`.
//! - `size()`, `block_size()` (logical: 512 or 4096), `is_block_device()`, `read_only()`.
//! - `alloc(len) -> IoBuf`: an aligned, pooled, zeroed buffer (derefs to exactly `len` bytes).
//! - `async read(offset, len) -> Result<IoBuf, DiskError>`
//! - `async write(offset, IoBuf, fua: bool) -> Result<(), DiskError>` (unaligned: read-modify-write,
//!   ordered against concurrent writes to the same blocks by a range lock)
//! - `async flush()`, `async trim(offset, len)`, `async write_zeroes(offset, len, may_trim: bool)`
//! - `DiskError::errno()` gives the errno to report to a client (EIO, ENOSPC, EPERM, EINVAL).
//!
//! Files: `file` (open, size, alignment discovery, ioctls), `buf` (aligned buffer pool), `lock`
//! (range lock for read-modify-write), `op` (operations + blocking execution), `ring` (the
//! io_uring bookkeeping both io_uring engines share), `uring`, `uring_inline` and `threads` (the
//! three engines).

mod buf;
mod file;
mod flush;
mod lock;
mod op;
mod ring;
mod threads;
mod uring;
mod uring_inline;

#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

pub use buf::{IoBuf, BUF_ALIGN};
use lock::RangeLock;
pub use op::SubmitOrder;
use op::{Done, Op, OpKind, Reply};

/// How the page cache is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// O_DIRECT: bypass the page cache (like `qemu-nbd --cache=none`).
    #[default]
    None,
    /// Buffered I/O through the page cache; FLUSH/FUA still fdatasync.
    Writeback,
}

/// Which submission engine runs the I/O.
///
/// The default is `UringInline`: no thread hop per I/O, about 0.24 syscalls per 4k write at
/// qd32 (`strace -c -f`). Measured through `twinblk serve` against qemu-nbd on the same file,
/// one `tools/bench.sh --runtime 6 --rounds 2 --size 256M` run with all three engines
/// (2026-11-22, load average 1.3 to 4.7 on 2 cores), ratios to qemu-nbd:
///
/// | workload | `Uring` | `UringInline` | `Threads` |
/// |---|---|---|---|
/// | 4k randwrite qd32 IOPS | 0.76 | 1.20 | 1.15 |
/// | 4k randwrite qd1 latency (inverted) | 0.84 | 1.08 | 0.94 |
/// | 1M seq write qd8 MB/s | 1.25 | 1.15 | 1.18 |
/// | 4k randread qd32 IOPS | 0.59 | 0.95 | 1.11 |
/// | 4k randwrite qd32 fsync=32 IOPS | 1.26 | 2.12 | 1.64 |
///
/// Earlier runs on the same machine under a load average of 11 to 15 (other builds) had
/// `Uring` ahead, because `UringInline` puts all the work on the runtime's thread, which then
/// competes for a busy CPU; with flushes it also fell into lock-step (a socket read's 32 writes
/// completing as one batch, fio's 32 flushes then running side by side on io-wq). On a machine
/// not saturated by other work, the thread hop costs more than that. `Uring` stays available
/// (`--engine uring`) and is the fallback when the inline ring cannot start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring on a dedicated thread (falls back to `Threads` if io_uring is unavailable).
    Uring,
    /// A pool of threads doing blocking syscalls.
    Threads,
    /// io_uring submitted in batches and reaped by a task on the runtime that opened the disk:
    /// no thread hop per I/O. Needs a tokio runtime (with I/O) at `Disk::open`, which must keep
    /// running while the disk is used; falls back to `Uring` without one.
    #[default]
    UringInline,
}

#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    pub cache: CacheMode,
    pub read_only: bool,
    /// Create or extend a regular file to this size (never shrinks). For a block device it must be
    /// absent or equal to the device's size.
    pub size: Option<u64>,
    pub engine: EngineKind,
    /// How long the inline io_uring engine keeps polling after its last completion or
    /// submission before it sleeps, while its queue is deep (zero: never polls). Trades CPU for
    /// throughput; see `uring_inline`. The other engines ignore it.
    pub poll: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{}: {source}: {hint}", path.display())]
    Open {
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
    #[error("disk {op} at offset {offset} length {len} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error(
        "disk {op} at offset {offset} length {len} is past the end of the disk ({size} bytes)"
    )]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("disk {op} refused: the disk is open read-only")]
    ReadOnly { op: &'static str },
}

impl DiskError {
    /// The errno a client should see for this failure: ENOSPC for a full disk, EPERM for writes to
    /// a read-only disk, EINVAL for requests outside the disk, EIO for everything else.
    pub fn errno(&self) -> i32 {
        match self {
            DiskError::Open { source, .. } | DiskError::Io { source, .. } => {
                match source.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
                    Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => libc::EPERM,
                    _ => libc::EIO,
                }
            }
            DiskError::OutOfRange { .. } => libc::EINVAL,
            DiskError::ReadOnly { .. } => libc::EPERM,
        }
    }
}

enum Engine {
    Uring(uring::Uring),
    Threads(threads::Threads),
    UringInline(uring_inline::UringInline),
}

impl Engine {
    fn submit(&self, op: Op) {
        match self {
            Engine::Uring(u) => u.submit(op),
            Engine::Threads(t) => t.submit(op),
            Engine::UringInline(u) => u.submit(op),
        }
    }
}

struct Inner {
    engine: Engine,
    engine_kind: EngineKind,
    path: PathBuf,
    size: u64,
    block_size: u32,
    /// Offset/length alignment the I/O must have (O_DIRECT); 1 in writeback mode.
    io_align: u64,
    /// Alignment for discard/zeroing ranges (a block device's logical block size at least).
    zero_align: u64,
    is_block_device: bool,
    read_only: bool,
    lock: RangeLock,
    /// Counts completed writes and shares one fdatasync among the flushes it covers.
    flusher: flush::Flusher,
    /// The open file, for [`Disk::sync_now`] (the engine owns its own reference).
    file: Arc<std::fs::File>,
}

/// A handle on an open disk. Cheap to clone; the engine stops when the last clone is dropped
/// (after finishing the I/O in flight).
#[derive(Clone)]
pub struct Disk {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.inner.path)
            .field("size", &self.inner.size)
            .field("block_size", &self.inner.block_size)
            .field("engine", &self.inner.engine_kind)
            .finish()
    }
}

/// Start of the aligned block holding `x`.
fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

/// `x` rounded up to a multiple of `a`; `None` on overflow.
fn align_up(x: u64, a: u64) -> Option<u64> {
    match x % a {
        0 => Some(x),
        r => x.checked_add(a - r),
    }
}

impl Disk {
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<Disk, DiskError> {
        Disk::open_with_align(path, opts, None)
    }

    /// `open`, with the O_DIRECT alignment raised to at least `min_align` (a power of two): lets
    /// tests exercise 4096-byte read-modify-write on a file system that accepts 512.
    pub(crate) fn open_with_align(
        path: &Path,
        opts: &DiskOptions,
        min_align: Option<u32>,
    ) -> Result<Disk, DiskError> {
        let mut b = file::open_backing(path, opts)?;
        if let Some(m) = min_align {
            if opts.cache == CacheMode::None && m > b.io_align && m.is_power_of_two() {
                b.io_align = m;
                b.block_size = if m <= 512 { 512 } else { 4096 };
            }
        }
        let file = Arc::new(b.file);
        let (engine, engine_kind) = match opts.engine {
            EngineKind::Uring => uring_engine(path, &file, b.is_block_device)?,
            EngineKind::Threads => (threads_engine(path, &file)?, EngineKind::Threads),
            EngineKind::UringInline => {
                match uring_inline::UringInline::new(file.clone(), b.is_block_device, opts.poll) {
                    Ok(u) => (Engine::UringInline(u), EngineKind::UringInline),
                    Err(e) => {
                        tracing::debug!(
                            path = %path.display(),
                            "inline io_uring unavailable ({e}); trying io_uring on its own thread"
                        );
                        uring_engine(path, &file, b.is_block_device)?
                    }
                }
            }
        };
        let io_align = u64::from(b.io_align);
        let zero_align = if b.is_block_device {
            io_align.max(u64::from(b.block_size))
        } else {
            io_align
        };
        tracing::debug!(
            path = %path.display(),
            size = b.size,
            block_size = b.block_size,
            io_align,
            engine = ?engine_kind,
            "disk open"
        );
        Ok(Disk {
            inner: Arc::new(Inner {
                engine,
                engine_kind,
                path: path.to_owned(),
                size: b.size,
                block_size: b.block_size,
                io_align,
                zero_align,
                is_block_device: b.is_block_device,
                read_only: opts.read_only,
                lock: RangeLock::new(),
                flusher: flush::Flusher::default(),
                file,
            }),
        })
    }

    pub fn size(&self) -> u64 {
        self.inner.size
    }
    /// Logical block size: 512 or 4096. Requests need not be aligned to it, but aligned ones are
    /// the fast path.
    pub fn block_size(&self) -> u32 {
        self.inner.block_size
    }
    pub fn is_block_device(&self) -> bool {
        self.inner.is_block_device
    }
    pub fn read_only(&self) -> bool {
        self.inner.read_only
    }
    /// The engine actually running (after a possible fallback from io_uring).
    pub fn engine(&self) -> EngineKind {
        self.inner.engine_kind
    }
    /// A zero-filled, 4096-aligned buffer of exactly `len` bytes, from the pool.
    pub fn alloc(&self, len: usize) -> IoBuf {
        IoBuf::zeroed(len)
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, DiskError> {
        let len64 = u64::from(len);
        self.check_range("read", offset, len64)?;
        if len == 0 {
            return Ok(IoBuf::zeroed(0));
        }
        let a = self.inner.io_align;
        let start = align_down(offset, a);
        let end =
            align_up(offset + len64, a).ok_or_else(|| self.out_of_range("read", offset, len64))?;
        let span =
            usize::try_from(end - start).map_err(|_| self.out_of_range("read", offset, len64))?;
        let buf = IoBuf::uninit_contents(span);
        let (buf, res) = self.exec(OpKind::Read { offset: start, buf }).await;
        res.map_err(|e| self.io_error("read", offset, len64, e))?;
        let mut buf = buf.ok_or_else(|| self.io_error("read", offset, len64, lost_buffer()))?;
        buf.narrow((offset - start) as usize, len as usize);
        Ok(buf)
    }

    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<(), DiskError> {
        let len = buf.len() as u64;
        self.check_writable("write")?;
        self.check_range("write", offset, len)?;
        if len == 0 {
            return if fua { self.flush().await } else { Ok(()) };
        }
        let a = self.inner.io_align;
        let res = if self.is_aligned(offset, len) {
            let buf = self.in_aligned_memory(buf);
            let _g = self.inner.lock.shared(offset / a, (offset + len) / a).await;
            self.exec(OpKind::Write { offset, buf, fua }).await.1
        } else {
            self.read_modify_write(offset, &buf, fua).await
        };
        res.map_err(|e| self.io_error("write", offset, len, e))
    }

    /// Starts a write and calls `done` with its result, without a task of its own when it can: an
    /// aligned write (offset and length; the buffer is copied if it is not) with no
    /// read-modify-write in the way is queued on the engine from the caller, and `done` runs on
    /// the engine's completion path (see [`Reply::Call`]: short, no waiting). Anything else
    /// (unaligned, out of range, read-only, a partial-block write holding its blocks) runs
    /// [`Disk::write`] in a spawned task, so the caller needs a tokio runtime.
    /// The node's event loop writes this way: a task per write, and the channel hop of its
    /// completion, were a measurable part of a replicated write's CPU.
    ///
    /// If the engine stops with the write queued, `done` is dropped uncalled.
    pub fn write_then(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
        order: SubmitOrder,
        done: impl FnOnce(Result<(), DiskError>) + Send + 'static,
    ) {
        let len = buf.len() as u64;
        let direct = self.check_writable("write").is_ok()
            && self.check_range("write", offset, len).is_ok()
            && len > 0
            && self.is_aligned(offset, len)
            && (order == SubmitOrder::Now || matches!(self.inner.engine, Engine::UringInline(_)));
        let guard = if direct {
            self.inner.lock.try_shared()
        } else {
            None
        };
        let Some(guard) = guard else {
            let disk = self.clone();
            tokio::spawn(async move {
                if order == SubmitOrder::AfterWokenTasks {
                    tokio::task::yield_now().await;
                }
                done(disk.write(offset, buf, fua).await);
            });
            return;
        };
        let buf = self.in_aligned_memory(buf);
        let disk = self.clone();
        let reply = move |d: Done| {
            // As in `exec`: counted before the caller learns of the completion.
            disk.inner.flusher.completed_one();
            drop(guard);
            done(d.res.map_err(|e| disk.io_error("write", offset, len, e)));
        };
        self.inner.engine.submit(Op {
            kind: OpKind::Write { offset, buf, fua },
            done: Reply::Call(Box::new(reply)),
            order,
        });
    }

    /// Writes `data` at an unaligned `offset`/length: reads the partial head and tail blocks,
    /// patches them, writes the whole aligned span, holding its blocks exclusively throughout.
    async fn read_modify_write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let a = self.inner.io_align;
        let len = data.len() as u64;
        let start = align_down(offset, a);
        let end =
            align_up(offset + len, a).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let span =
            usize::try_from(end - start).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let _g = self.inner.lock.exclusive(start / a, end / a).await;
        let mut whole = IoBuf::uninit_contents(span);
        let head_partial = offset != start;
        let tail_partial = offset + len != end;
        let tail_start = end - a;
        let read_block = |at: u64| async move {
            let b = IoBuf::uninit_contents(a as usize);
            let (b, r) = self.exec(OpKind::Read { offset: at, buf: b }).await;
            r.and_then(|_| b.ok_or_else(lost_buffer))
        };
        if head_partial {
            let b = read_block(start).await?;
            whole[..a as usize].copy_from_slice(&b);
        }
        if tail_partial && !(head_partial && tail_start == start) {
            let b = read_block(tail_start).await?;
            let at = (tail_start - start) as usize;
            whole[at..].copy_from_slice(&b);
        }
        let at = (offset - start) as usize;
        whole[at..at + data.len()].copy_from_slice(data);
        self.exec(OpKind::Write {
            offset: start,
            buf: whole,
            fua,
        })
        .await
        .1
    }

    /// Makes every write completed before this call stable (fdatasync, shared with concurrent
    /// flushes it covers; none if an earlier one already covered them: see `flush.rs`). Once a
    /// flush failed, every later one fails too, until the disk is opened again.
    pub async fn flush(&self) -> Result<(), DiskError> {
        self.inner
            .flusher
            .flush(|| async { self.exec(OpKind::Flush).await.1 })
            .await
            .map_err(|e| self.io_error("flush", 0, 0, e))
    }

    /// How many fdatasyncs `flush` ran (the other flushes were covered by one of them).
    #[cfg(test)]
    pub(crate) fn flushes_issued(&self) -> u64 {
        self.inner.flusher.issued()
    }

    /// [`Disk::flush`] on the calling thread, bypassing the engine: for a driver that must have
    /// completed writes stable before its next step and cannot await (the replication event
    /// loop before an activity-log transaction).
    /// Sticky like `flush`: after any failed flush it fails without asking the kernel.
    pub fn sync_now(&self) -> Result<(), DiskError> {
        use std::os::fd::AsRawFd;
        if let Some(e) = self.inner.flusher.failure() {
            return Err(self.io_error("flush", 0, 0, e));
        }
        op::fdatasync(self.inner.file.as_raw_fd()).map_err(|e| {
            self.inner.flusher.record_failure(&e);
            self.io_error("flush", 0, 0, e)
        })
    }

    /// Discards the whole aligned blocks inside the range (a hint: the rest is left alone, and a
    /// device or file system without discard support makes this a no-op). On files the discarded
    /// blocks read back as zeroes.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable("trim")?;
        self.check_range("trim", offset, len)?;
        let a = self.inner.zero_align;
        let Some(start) = align_up(offset, a) else {
            return Ok(());
        };
        let end = align_down(offset + len, a);
        if end <= start {
            return Ok(());
        }
        let la = self.inner.io_align;
        let _g = self.inner.lock.shared(start / la, end.div_ceil(la)).await;
        let kind = if self.inner.is_block_device {
            OpKind::Discard {
                offset: start,
                len: end - start,
            }
        } else {
            OpKind::Fallocate {
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset: start,
                len: end - start,
            }
        };
        match self.exec(kind).await.1 {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => {
                tracing::debug!(path = %self.inner.path.display(), "discard not supported: {e}");
                Ok(())
            }
            Err(e) => Err(self.io_error("trim", offset, len, e)),
        }
    }

    /// Writes zeroes to the range: fallocate/BLKZEROOUT for the aligned middle (punching holes if
    /// `may_trim`), read-modify-write for partial blocks, zero buffers where zeroing is
    /// unsupported.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<(), DiskError> {
        self.check_writable("write_zeroes")?;
        self.check_range("write_zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let a = self.inner.zero_align;
        let end = offset + len;
        let mid_start = align_up(offset, a).unwrap_or(end).min(end);
        let mid_end = align_down(end, a).max(mid_start);
        if mid_start > offset {
            self.zero_by_writing(offset, mid_start - offset).await?;
        }
        if mid_end > mid_start {
            self.zero_aligned(mid_start, mid_end - mid_start, may_trim)
                .await?;
        }
        if end > mid_end {
            self.zero_by_writing(mid_end, end - mid_end).await?;
        }
        Ok(())
    }

    async fn zero_aligned(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DiskError> {
        let la = self.inner.io_align;
        let _g = self
            .inner
            .lock
            .shared(offset / la, (offset + len).div_ceil(la))
            .await;
        let kind = if self.inner.is_block_device {
            OpKind::ZeroOut { offset, len }
        } else {
            let mode = if may_trim {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            OpKind::Fallocate { mode, offset, len }
        };
        match self.exec(kind).await.1 {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {
                tracing::debug!(
                    path = %self.inner.path.display(),
                    "zeroing not supported ({e}); writing zeroes"
                );
            }
            Err(e) => return Err(self.io_error("write_zeroes", offset, len, e)),
        }
        // Already holding the range: write directly, not through `write` (which would lock again).
        const CHUNK: u64 = 1 << 20;
        let mut at = offset;
        while at < offset + len {
            let n = CHUNK.min(offset + len - at);
            let buf = IoBuf::zeroed(n as usize);
            self.exec(OpKind::Write {
                offset: at,
                buf,
                fua: false,
            })
            .await
            .1
            .map_err(|e| self.io_error("write_zeroes", at, n, e))?;
            at += n;
        }
        Ok(())
    }

    /// Zeroes a short (sub-block) range through the ordinary write path.
    async fn zero_by_writing(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let n = usize::try_from(len).map_err(|_| self.out_of_range("write_zeroes", offset, len))?;
        self.write(offset, IoBuf::zeroed(n), false).await
    }

    async fn exec(&self, kind: OpKind) -> (Option<IoBuf>, io::Result<()>) {
        let mutating = kind.is_mutating();
        let (tx, rx) = oneshot::channel();
        self.inner.engine.submit(Op {
            kind,
            done: Reply::Channel(tx),
            order: SubmitOrder::Now,
        });
        let r = match rx.await {
            Ok(Done { buf, res }) => (buf, res),
            Err(_) => (None, Err(io::Error::other("disk engine stopped"))),
        };
        // Counted before the caller learns of the completion (and acknowledges it to anyone),
        // so every flush asked for after that covers it.
        if mutating {
            self.inner.flusher.completed_one();
        }
        r
    }

    /// Whether a write at `offset` of `len` bytes covers whole blocks (else it is a
    /// read-modify-write).
    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        let a = self.inner.io_align;
        offset % a == 0 && len % a == 0
    }

    /// `buf` in memory O_DIRECT accepts: as it is, or copied once (a sub-slice of an unaligned
    /// read, a network frame sliced from quinn's chunk).
    fn in_aligned_memory(&self, buf: IoBuf) -> IoBuf {
        if (buf.addr() as u64) % self.inner.io_align == 0 {
            buf
        } else {
            IoBuf::copy_from(&buf)
        }
    }

    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DiskError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(self.out_of_range(op, offset, len)),
        }
    }

    fn out_of_range(&self, op: &'static str, offset: u64, len: u64) -> DiskError {
        DiskError::OutOfRange {
            op,
            offset,
            len,
            size: self.inner.size,
        }
    }

    fn check_writable(&self, op: &'static str) -> Result<(), DiskError> {
        if self.inner.read_only {
            Err(DiskError::ReadOnly { op })
        } else {
            Ok(())
        }
    }

    fn io_error(&self, op: &'static str, offset: u64, len: u64, source: io::Error) -> DiskError {
        let source = match source.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::WriteZero => io::Error::new(
                source.kind(),
                "short transfer: the file shrank under us or the device went away",
            ),
            _ => source,
        };
        tracing::warn!(
            path = %self.inner.path.display(),
            op,
            offset,
            len,
            "disk I/O failed: {source}"
        );
        DiskError::Io {
            op,
            offset,
            len,
            source,
        }
    }
}

/// The threaded io_uring engine, or the thread pool if io_uring is unavailable.
fn uring_engine(
    path: &Path,
    file: &Arc<std::fs::File>,
    is_block_device: bool,
) -> Result<(Engine, EngineKind), DiskError> {
    match uring::Uring::new(file.clone(), is_block_device) {
        Ok(u) => Ok((Engine::Uring(u), EngineKind::Uring)),
        Err(e) => {
            tracing::warn!(
                path = %path.display(),
                "io_uring unavailable ({e}); using the thread-pool disk engine"
            );
            Ok((threads_engine(path, file)?, EngineKind::Threads))
        }
    }
}

fn threads_engine(path: &Path, file: &Arc<std::fs::File>) -> Result<Engine, DiskError> {
    threads::Threads::new(file.clone(), threads::DEFAULT_THREADS, "twinblk-disk")
        .map(Engine::Threads)
        .map_err(|source| DiskError::Open {
            path: path.to_owned(),
            source,
            hint: "cannot start disk I/O threads: raise the process/thread limit",
        })
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

fn lost_buffer() -> io::Error {
    io::Error::other("disk engine returned no buffer")
}
