//! ublk frontend for twinblk.
//!
//! This crate knows nothing of twinblk: it defines the small block-target trait a ublk queue needs
//! ([`BlockTarget`]), and [`serve`] exposes any such target as `/dev/ublkbN` through the kernel's
//! ublk driver (Linux ≥ 6.0, module `ublk_drv`), using `libublk`. On other systems the crate
//! compiles, and [`serve`] returns [`UblkError::Unsupported`].
//!
//! Threading: libublk runs one thread per hardware queue, each with a single-threaded executor
//! that drives io_uring. The futures a target returns are polled on that thread, but they may
//! complete anywhere: the waker they are given also kicks the queue's io_uring through an eventfd,
//! so a future that is completed by another runtime (a tokio task, a thread pool) wakes the queue.
//! A target's future must therefore not need any runtime context of its own to make progress.

use std::future::Future;
use std::pin::Pin;

mod request;

#[cfg(target_os = "linux")]
mod server;
#[cfg(target_os = "linux")]
mod stop;

#[cfg(target_os = "linux")]
pub use server::{delete, serve, CONTROL_PATH};
#[cfg(target_os = "linux")]
pub use stop::StopHandle;

#[cfg(not(target_os = "linux"))]
mod unsupported;
#[cfg(not(target_os = "linux"))]
pub use unsupported::{delete, serve, StopHandle};

pub use request::Request;

/// An I/O in flight: resolves to `Ok(())` or `Err(errno)` (a positive errno such as `libc::EIO`).
pub type IoFuture<'a> = Pin<Box<dyn Future<Output = Result<(), i32>> + 'a>>;

/// What a ublk queue needs from the device behind it. Offsets and lengths are in bytes, always
/// multiples of 512 and inside `0..size()` (the queue checks this before calling).
///
/// The returned futures are polled on a ublk queue thread, which runs no tokio runtime: they must
/// complete by themselves (e.g. wait on a channel that a runtime of yours completes), and they may
/// be woken from any thread. A future that is dropped before it completes must not leave the
/// target in an unsafe state (the queue only drops futures when the device is torn down).
pub trait BlockTarget: Send + Sync + 'static {
    /// Device size in bytes (a multiple of the logical block size).
    fn size(&self) -> u64;
    /// Logical block size in bytes (512 or 4096).
    fn logical_block_size(&self) -> u32;
    /// Fill `buf` with the bytes at `offset`.
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a>;
    /// Write `data` at `offset`; with `fua`, the data must be stable when the future resolves.
    fn write<'a>(&'a self, offset: u64, data: &'a [u8], fua: bool) -> IoFuture<'a>;
    /// Make every completed write stable.
    fn flush(&self) -> IoFuture<'_>;
    /// The range's contents are no longer needed (reads may return anything afterwards).
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_>;
    /// The range must read back as zeroes; `may_unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_>;
    /// Whether the device has a volatile write cache, i.e. the kernel must send FLUSH and FUA.
    /// Answer `true` unless every completed write is already stable.
    fn volatile_cache(&self) -> bool {
        true
    }
    /// Whether DISCARD and WRITE_ZEROES are advertised to the kernel.
    fn supports_discard(&self) -> bool {
        true
    }
}

/// How [`serve`] creates the device.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// Hardware queues (one serving thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Device number to ask for (`/dev/ublkbN`); `None` lets the kernel choose.
    pub dev_id: Option<i32>,
    /// Re-attach to the existing device N (created with `user_recovery`, its previous server
    /// gone): the filesystem on it sees only a pause. `dev_id` is ignored then.
    pub recover: Option<i32>,
    /// Create the device with `UBLK_F_USER_RECOVERY` (+ reissue), so that a crashed server can be
    /// replaced with `recover` instead of the device failing.
    pub user_recovery: bool,
    /// Largest single request in bytes (a multiple of 4096; the kernel splits bigger ones).
    pub max_io_bytes: u32,
    /// Stop on SIGINT / SIGTERM (installs handlers for both). Leave off when the caller handles
    /// signals itself and uses a [`StopHandle`].
    pub handle_signals: bool,
    /// Stop when this handle is triggered.
    pub stop: Option<StopHandle>,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions {
            queues: 1,
            depth: 64,
            dev_id: None,
            recover: None,
            user_recovery: true,
            max_io_bytes: 512 * 1024,
            handle_signals: true,
            stop: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    #[error(
        "the ublk_drv module is not loaded: modprobe ublk_drv; Linux ≥ 6.0 ({path} is missing)"
    )]
    DriverMissing { path: String },
    #[error("cannot open {path}: {source} (ublk devices need root or CAP_SYS_ADMIN)")]
    ControlAccess {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid ublk option: {0}")]
    InvalidOptions(String),
    #[error("ublk {op} failed: {detail}")]
    Driver { op: &'static str, detail: String },
    #[error("ublk device {dev_id} does not match the target: {detail}")]
    RecoverMismatch { dev_id: i32, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("ublk is only available on Linux")]
    Unsupported,
}
