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

/// A block device as a frontend sees it. Offsets and lengths are checked by the frontend against
/// `size()`; implementations still refuse out-of-range requests.
pub trait Backend: Clone + Send + Sync + 'static {
    type Error: BackendError;

    fn size(&self) -> u64;
    fn block_size(&self) -> u32;
    fn read_only(&self) -> bool;
    /// A buffer suitable for `write` (aligned for O_DIRECT).
    fn alloc(&self, len: usize) -> IoBuf;
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<IoBuf, Self::Error>> + Send;
    fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
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
    fn alloc(&self, len: usize) -> IoBuf {
        Disk::alloc(self, len)
    }
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<IoBuf, DiskError>> + Send {
        Disk::read(self, offset, len)
    }
    fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        Disk::write(self, offset, buf, fua)
    }
    fn flush(&self) -> impl Future<Output = Result<(), DiskError>> + Send {
        Disk::flush(self)
    }
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), DiskError>> + Send {
        Disk::trim(self, offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send {
        Disk::write_zeroes(self, offset, len, may_trim)
    }
}
