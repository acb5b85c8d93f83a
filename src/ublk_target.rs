//! A twinblk [`Backend`] as a ublk block target: `twinblk_ublk::BlockTarget` for a plain
//! [`Disk`] (`twinblk serve --ublk`) and for the replicated device (`twinblk up` with
//! `frontend = "ublk"`), the same two backends the NBD server serves.
//!
//! ublk queue threads run their own single-threaded executor, not tokio, so every backend call is
//! made on the queue thread (where a replicated backend fixes the request's order) and its future
//! is spawned on the given tokio runtime; the result comes back over a oneshot channel (which any
//! executor can await). Data is copied between the ublk request buffer and the backend's aligned
//! buffers: the request buffer belongs to the queue, the backend wants its own.

use crate::backend::{Backend, BackendError};
use crate::disk::Disk;
use std::future::Future;
use std::sync::Arc;
use tokio::runtime::Handle;
use twinblk_ublk::{BlockTarget, IoFuture, UblkError, UblkOptions};

pub struct BackendTarget<B: Backend> {
    backend: B,
    rt: Handle,
}

/// `twinblk serve --ublk`'s target.
pub type DiskTarget = BackendTarget<Disk>;

impl<B: Backend> BackendTarget<B> {
    pub fn new(backend: B, rt: Handle) -> BackendTarget<B> {
        BackendTarget { backend, rt }
    }

    /// Run `io` on the runtime; resolves to its result, or EIO if the runtime dropped it.
    fn on_runtime<T: Send + 'static>(
        &self,
        io: impl Future<Output = Result<T, B::Error>> + Send + 'static,
    ) -> impl Future<Output = Result<T, i32>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.rt.spawn(async move {
            let _ = tx.send(io.await);
        });
        async move {
            match rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => {
                    tracing::warn!("ublk request failed: {e}");
                    Err(e.errno())
                }
                Err(_) => Err(libc::EIO),
            }
        }
    }
}

impl<B: Backend> BlockTarget for BackendTarget<B> {
    fn size(&self) -> u64 {
        self.backend.size()
    }

    fn logical_block_size(&self) -> u32 {
        self.backend.block_size()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a> {
        let Ok(len) = u32::try_from(buf.len()) else {
            return Box::pin(async { Err(libc::EINVAL) });
        };
        let io = self.on_runtime(self.backend.read(offset, len));
        Box::pin(async move {
            let data = io.await?;
            match data.get(..buf.len()) {
                Some(d) => {
                    buf.copy_from_slice(d);
                    Ok(())
                }
                None => Err(libc::EIO),
            }
        })
    }

    fn write<'a>(&'a self, offset: u64, data: &'a [u8], fua: bool) -> IoFuture<'a> {
        if self.backend.read_only() {
            return Box::pin(async { Err(libc::EROFS) });
        }
        let mut buf = self.backend.alloc(data.len());
        buf.copy_from_slice(data);
        Box::pin(self.on_runtime(self.backend.write(offset, buf, fua)))
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.on_runtime(self.backend.flush()))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        if self.backend.read_only() {
            return Box::pin(async { Err(libc::EROFS) });
        }
        Box::pin(self.on_runtime(self.backend.trim(offset, len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        if self.backend.read_only() {
            return Box::pin(async { Err(libc::EROFS) });
        }
        Box::pin(self.on_runtime(self.backend.write_zeroes(offset, len, may_unmap)))
    }
}

/// Expose `backend` as `/dev/ublkbN` until stopped, then delete the device (see
/// [`twinblk_ublk::serve`]). Blocks the calling thread: call it from a plain thread or
/// `spawn_blocking`, never from inside an async task. `rt` runs the backend's I/O.
pub fn serve_ublk<B: Backend>(
    backend: B,
    rt: Handle,
    opts: &UblkOptions,
    ready: impl FnOnce(&str),
) -> Result<(), UblkError> {
    twinblk_ublk::serve(Arc::new(BackendTarget::new(backend, rt)), opts, ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;

    /// Drive the target's futures from a plain thread (as a ublk queue does), with the disk I/O
    /// on a tokio runtime, against a real file.
    #[test]
    fn disk_target_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let disk = Disk::open(
            &path,
            &DiskOptions {
                size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let t = DiskTarget::new(disk, rt.handle().clone());
        assert_eq!(t.size(), 1 << 20);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        // Not inside the runtime: this thread has no tokio context, like a ublk queue thread.
        futures_block_on(t.write(4096, &data, true)).unwrap();
        futures_block_on(t.flush()).unwrap();
        let mut back = vec![0u8; 8192];
        futures_block_on(t.read(4096, &mut back)).unwrap();
        assert_eq!(back, data);
        futures_block_on(t.write_zeroes(4096, 4096, false)).unwrap();
        futures_block_on(t.read(4096, &mut back)).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..], &data[4096..]);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[8192..12288], &data[4096..]);
    }

    /// Refusals come back as the errno the kernel should see: a read-only disk refuses every
    /// kind of write with EROFS, and a read past the end fails with the disk's own errno.
    #[test]
    fn refusals_become_errnos() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
        let disk = Disk::open(
            &path,
            &DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let t = BackendTarget::new(disk, rt.handle().clone());
        let data = vec![1u8; 4096];
        assert_eq!(futures_block_on(t.write(0, &data, false)), Err(libc::EROFS));
        assert_eq!(futures_block_on(t.discard(0, 4096)), Err(libc::EROFS));
        assert_eq!(
            futures_block_on(t.write_zeroes(0, 4096, true)),
            Err(libc::EROFS)
        );
        let mut back = vec![0u8; 4096];
        futures_block_on(t.read(4096, &mut back)).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        let past_end = futures_block_on(t.read(1 << 16, &mut back));
        assert!(
            matches!(past_end, Err(e) if e > 0),
            "read past the end: {past_end:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 1 << 16]);
    }

    /// A minimal block_on for the test: park the thread until woken.
    fn futures_block_on<F: Future>(f: F) -> F::Output {
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }
}
