//! The replicated device as the NBD server sees it: each request becomes a core event sent to
//! the resource's event loop, and the answer comes back through a oneshot when the core says
//! `CompleteClient` (or, for reads, when the local read it allowed finished).

use std::future::Future;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::io::Owned;
use super::Input;
use crate::backend::{Backend, BackendError};
use crate::disk::{Disk, IoBuf};

/// A client request for the event loop; it assigns the request id.
#[derive(Debug)]
pub(crate) enum ClientOp {
    Write { offset: u64, data: Bytes, fua: bool },
    Trim { offset: u64, len: u32 },
    Zero { offset: u64, len: u32 },
    Flush,
    Read { offset: u64, len: u32 },
}

pub(crate) type ClientReply = Result<Option<IoBuf>, i32>;

/// An errno from the replicated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl BackendError for Errno {
    fn errno(&self) -> i32 {
        self.0
    }
}

/// The replicated device: cheap to clone, one per NBD request task.
#[derive(Clone)]
pub struct Replicated {
    pub(super) tx: mpsc::UnboundedSender<Input>,
    pub(super) disk: Disk,
}

impl Replicated {
    async fn call(&self, op: ClientOp) -> Result<Option<IoBuf>, Errno> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Client { op, reply })
            .map_err(|_| Errno(libc::ESHUTDOWN))?;
        match rx.await {
            Ok(r) => r.map_err(Errno),
            // The event loop is gone (shutting down): the request was not done.
            Err(_) => Err(Errno(libc::ESHUTDOWN)),
        }
    }
}

fn len32(len: u64) -> Result<u32, Errno> {
    u32::try_from(len).map_err(|_| Errno(libc::EINVAL))
}

impl Backend for Replicated {
    type Error = Errno;

    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn block_size(&self) -> u32 {
        self.disk.block_size()
    }
    fn read_only(&self) -> bool {
        // A Secondary serves the export too; its writes fail with EPERM (the core decides).
        false
    }
    fn alloc(&self, len: usize) -> IoBuf {
        self.disk.alloc(len)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, Errno> {
        match self.call(ClientOp::Read { offset, len }).await? {
            Some(b) => Ok(b),
            None => Err(Errno(libc::EIO)),
        }
    }
    fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send {
        let data = Bytes::from_owner(Owned(buf));
        async move {
            self.call(ClientOp::Write { offset, data, fua }).await?;
            Ok(())
        }
    }
    async fn flush(&self) -> Result<(), Errno> {
        self.call(ClientOp::Flush).await?;
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), Errno> {
        let len = len32(len)?;
        self.call(ClientOp::Trim { offset, len }).await?;
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> Result<(), Errno> {
        let len = len32(len)?;
        self.call(ClientOp::Zero { offset, len }).await?;
        Ok(())
    }
}
