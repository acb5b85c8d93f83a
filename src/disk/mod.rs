//! The disk driver: O_DIRECT (by default) I/O on a regular file or a block device, with many I/Os in
//! flight. The NBD server today, and the replication driver later, call it; it knows nothing of
//! either. Engines (io_uring on a dedicated thread, or a thread pool) sit behind one `Disk` handle.
//!
//! API contract (implemented in this module's files):
//! - `Disk::open(path, &DiskOptions) -> Result<Disk, DiskError>`; `Disk` is `Clone + Send + Sync`.
//! - `size()`, `block_size()` (logical: 512 or 4096), `is_block_device()`, `read_only()`.
//! - `alloc(len) -> IoBuf`: an aligned, pooled buffer (derefs to `[u8]` of exactly `len` bytes).
//! - `async read(offset, len) -> Result<IoBuf, DiskError>`
//! - `async write(offset, IoBuf, fua: bool) -> Result<(), DiskError>` (unaligned: read-modify-write,
//!   ordered against concurrent writes to the same blocks)
//! - `async flush()`, `async trim(offset, len)`, `async write_zeroes(offset, len, may_trim: bool)`
//! - `DiskError::errno()` gives the errno to report to a client (EIO, ENOSPC, ...).
//!
//! NOTE: this file is a placeholder implementation (buffered I/O on the blocking pool) that fixes
//! the API so the NBD server can be written against it; the disk-layer work replaces its insides.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    #[default]
    Uring,
    Threads,
}

#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    pub cache: CacheMode,
    pub read_only: bool,
    /// Create or extend a regular file to this size. Ignored (must match or be absent) for devices.
    pub size: Option<u64>,
    pub engine: EngineKind,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("I/O error at offset {offset}: {source}")]
    Io { offset: u64, source: std::io::Error },
}

impl DiskError {
    /// The errno a client should see for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            DiskError::Open { source, .. } | DiskError::Io { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

/// A buffer for disk I/O. Derefs to exactly `len` bytes.
pub struct IoBuf {
    data: Vec<u8>,
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}
impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

struct Inner {
    file: File,
    size: u64,
    read_only: bool,
}

#[derive(Clone)]
pub struct Disk {
    inner: Arc<Inner>,
}

impl Disk {
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<Disk, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .create(opts.size.is_some() && !opts.read_only)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let mut size = file.metadata().map_err(open_err)?.len();
        if let Some(want) = opts.size {
            if want > size {
                file.set_len(want).map_err(open_err)?;
                size = want;
            }
        }
        Ok(Disk {
            inner: Arc::new(Inner {
                file,
                size,
                read_only: opts.read_only,
            }),
        })
    }
    pub fn size(&self) -> u64 {
        self.inner.size
    }
    pub fn block_size(&self) -> u32 {
        512
    }
    pub fn is_block_device(&self) -> bool {
        false
    }
    pub fn read_only(&self) -> bool {
        self.inner.read_only
    }
    pub fn alloc(&self, len: usize) -> IoBuf {
        IoBuf { data: vec![0; len] }
    }
    pub async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, DiskError> {
        let d = self.clone();
        let mut buf = self.alloc(len as usize);
        tokio::task::spawn_blocking(move || {
            d.inner
                .file
                .read_exact_at(&mut buf, offset)
                .map(|_| buf)
                .map_err(|source| DiskError::Io { offset, source })
        })
        .await
        .unwrap_or_else(|e| {
            Err(DiskError::Io {
                offset,
                source: std::io::Error::other(e),
            })
        })
    }
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<(), DiskError> {
        let d = self.clone();
        tokio::task::spawn_blocking(move || {
            d.inner.file.write_all_at(&buf, offset)?;
            if fua {
                d.inner.file.sync_data()?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|source| DiskError::Io { offset, source })
    }
    pub async fn flush(&self) -> Result<(), DiskError> {
        let d = self.clone();
        tokio::task::spawn_blocking(move || d.inner.file.sync_data())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| DiskError::Io { offset: 0, source })
    }
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, true).await
    }
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
    ) -> Result<(), DiskError> {
        let buf = self.alloc(len as usize);
        self.write(offset, buf, false).await
    }
}
