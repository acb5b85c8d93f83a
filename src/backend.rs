//! What a frontend (the NBD server) serves: a plain [`Disk`] (`twinblk serve`) or a replicated
//! device (`twinblk up`). Static dispatch: the server is generic over it, so `serve` pays nothing.

use std::future::Future;

use crate::disk::{Disk, DiskError, IoBuf};

/// An error a frontend can report to its client as an errno.
pub trait BackendError: std::fmt::Display + Send + 'static {
    /// The errno the client should see (EIO, ENOSPC, EPERM, EINVAL…).
    fn errno(&self) -> i32;
}

impl BackendError for DiskError {
    fn errno(&self) -> i32 {
        DiskError::errno(self)
    }
}

/// A client that opened an export (finished negotiating): dropping it says the connection
/// ended. `close` turns true when the backend wants the connection ended (`secondary --force`):
/// the frontend then stops reading requests, answers those in flight and closes.
#[derive(Default)]
pub struct Opened {
    pub close: Option<tokio::sync::watch::Receiver<bool>>,
    /// Whatever the backend keeps per open client; dropped with the connection.
    pub guard: Option<Box<dyn std::any::Any + Send>>,
}

/// A block device as a frontend sees it. Offsets and lengths are checked by the frontend against
/// `size()`; implementations still refuse out-of-range requests.
///
/// The I/O methods return futures that own what they need (`'static`), so a frontend calls them
/// in the order its client sent the requests and only then spawns the futures. A backend that
/// orders requests (the replicated device) takes each request's place in that order when the
/// method is called, not when the future is first polled: two overlapping writes in flight at
/// once land in the order the client sent them, on both nodes.
pub trait Backend: Clone + Send + Sync + 'static {
    type Error: BackendError;

    fn size(&self) -> u64;
    fn block_size(&self) -> u32;
    fn read_only(&self) -> bool;
    /// Why a client may not open the export now (sent to it during negotiation, with the
    /// option's error reply); `None`: it may.
    fn refuse_open(&self) -> Option<String> {
        None
    }
    /// A client (`client`: its address, for the operator) finished negotiating; `Err`: it may
    /// not use the export after all (the state changed during its negotiation).
    fn opened(&self, client: &str) -> Result<Opened, String> {
        let _ = client;
        Ok(Opened::default())
    }
    /// A buffer suitable for `write` (aligned for O_DIRECT) whose contents are unspecified
    /// (recycled bytes, never zeroed): the caller fills every byte before writing it.
    fn alloc(&self, len: usize) -> IoBuf {
        IoBuf::uninit_contents(len)
    }
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<IoBuf, Self::Error>> + Send + 'static;
    fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static;
    fn flush(&self) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static;
    fn trim(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static;
}

impl Backend for Disk {
    type Error = DiskError;

    fn size(&self) -> u64 {
        Disk::size(self)
    }
    fn block_size(&self) -> u32 {
        Disk::block_size(self)
    }
    fn read_only(&self) -> bool {
        Disk::read_only(self)
    }
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<IoBuf, DiskError>> + Send + 'static {
        let d = self.clone();
        async move { Disk::read(&d, offset, len).await }
    }
    fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send + 'static {
        let d = self.clone();
        async move { Disk::write(&d, offset, buf, fua).await }
    }
    fn flush(&self) -> impl Future<Output = Result<(), DiskError>> + Send + 'static {
        let d = self.clone();
        async move { Disk::flush(&d).await }
    }
    fn trim(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), DiskError>> + Send + 'static {
        let d = self.clone();
        async move { Disk::trim(&d, offset, len).await }
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send + 'static {
        let d = self.clone();
        async move { Disk::write_zeroes(&d, offset, len, may_trim).await }
    }
}
