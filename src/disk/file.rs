//! Opening the backing file or device: O_DIRECT, creation/extension to the requested size, and
//! discovery of the size and alignment the kernel demands.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::{CacheMode, DiskError, DiskOptions};

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// What `open_backing` found out.
pub struct Backing {
    pub file: File,
    pub size: u64,
    pub is_block_device: bool,
    /// Alignment O_DIRECT needs for offsets and lengths (1 in writeback mode).
    pub io_align: u32,
    /// The logical block size to advertise: 512 or 4096.
    pub block_size: u32,
}

pub fn open_backing(path: &Path, opts: &DiskOptions) -> Result<Backing, DiskError> {
    let err = |source: io::Error, hint: &'static str| DiskError::Open {
        path: path.to_owned(),
        source,
        hint,
    };
    let direct = opts.cache == CacheMode::None;
    // Probe the type first: creation only applies to regular files.
    let existing = std::fs::metadata(path);
    let is_block_device = match &existing {
        Ok(m) => m.file_type().is_block_device(),
        Err(_) => false,
    };
    if let Ok(m) = &existing {
        if !m.file_type().is_block_device() && !m.file_type().is_file() {
            return Err(err(
                io::Error::from_raw_os_error(libc::EINVAL),
                "not a regular file or block device: give a disk image or a block device",
            ));
        }
    }
    let create = opts.size.is_some() && !opts.read_only && !is_block_device;
    let mut oo = OpenOptions::new();
    oo.read(true)
        .write(!opts.read_only)
        .create(create)
        .truncate(false);
    oo.custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 });
    let file = match oo.open(path) {
        Ok(f) => f,
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(err(
                e,
                "the file system does not support O_DIRECT: use --cache writeback",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(err(e, "create it by giving a size, or fix the path"))
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(err(e, "check its permissions, or open it read-only"))
        }
        Err(e) => return Err(err(e, "check the path")),
    };
    let fd = file.as_raw_fd();

    let (size, logical) = if is_block_device {
        let mut size = 0u64;
        // SAFETY: fd is open; the ioctl writes one u64.
        unsafe { blkgetsize64(fd, &mut size) }
            .map_err(|e| err(e.into(), "cannot read the device size (BLKGETSIZE64)"))?;
        let mut ss: libc::c_int = 0;
        // SAFETY: fd is open; the ioctl writes one int.
        unsafe { blksszget(fd, &mut ss) }
            .map_err(|e| err(e.into(), "cannot read the logical block size (BLKSSZGET)"))?;
        if let Some(want) = opts.size {
            if want != size {
                return Err(err(
                    io::Error::from_raw_os_error(libc::EINVAL),
                    "a block device's size is fixed: omit the size or give exactly the device's",
                ));
            }
        }
        (size, u32::try_from(ss).unwrap_or(512))
    } else {
        let mut size = file
            .metadata()
            .map_err(|e| err(e, "cannot stat the file"))?
            .len();
        let logical = file_dio_align(&file).unwrap_or(512);
        if let Some(want) = opts.size {
            if direct && want % u64::from(logical.max(512)) != 0 {
                return Err(err(
                    io::Error::from_raw_os_error(libc::EINVAL),
                    "with O_DIRECT the size must be a multiple of the block size \
                     (or use --cache writeback)",
                ));
            }
            if want < size {
                return Err(err(
                    io::Error::from_raw_os_error(libc::EINVAL),
                    "the file is larger than the requested size and is never shrunk: \
                     give a size at least as large as the file",
                ));
            }
            if want > size {
                if opts.read_only {
                    return Err(err(
                        io::Error::from_raw_os_error(libc::EROFS),
                        "the file is smaller than the requested size and read-only mode cannot \
                         extend it",
                    ));
                }
                file.set_len(want)
                    .map_err(|e| err(e, "cannot extend the file to the requested size"))?;
                size = want;
            }
        }
        (size, logical)
    };
    let block_size = if logical <= 512 { 512 } else { 4096 };
    let io_align = if direct { logical.max(512) } else { 1 };
    if direct && !io_align.is_power_of_two() {
        return Err(err(
            io::Error::from_raw_os_error(libc::EINVAL),
            "unsupported O_DIRECT alignment: use --cache writeback",
        ));
    }
    let mut size = size;
    if direct && !is_block_device && size % u64::from(io_align) != 0 {
        // An O_DIRECT write of the partial last block would grow the file: leave it out.
        let usable = size - size % u64::from(io_align);
        tracing::warn!(
            path = %path.display(),
            size,
            usable,
            "file size is not a multiple of the O_DIRECT alignment ({io_align}); \
             exporting only the aligned part"
        );
        size = usable;
    }
    Ok(Backing {
        file,
        size,
        is_block_device,
        io_align,
        block_size,
    })
}

/// O_DIRECT offset alignment of a regular file: statx STATX_DIOALIGN (Linux 6.1+), else the
/// logical block size of the device holding it.
pub(crate) fn file_dio_align(file: &File) -> Option<u32> {
    // SAFETY: statx writes into the zeroed struct; an empty path with AT_EMPTY_PATH means fd.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        return Some(stx.stx_dio_offset_align);
    }
    if rc == 0 {
        return sysfs_logical_block_size(stx.stx_dev_major, stx.stx_dev_minor);
    }
    None
}

fn sysfs_logical_block_size(major: u32, minor: u32) -> Option<u32> {
    // A partition has no queue/ of its own; its parent disk's applies.
    for rel in ["queue", "../queue"] {
        let p = format!("/sys/dev/block/{major}:{minor}/{rel}/logical_block_size");
        if let Ok(s) = std::fs::read_to_string(&p) {
            if let Ok(n) = s.trim().parse::<u32>() {
                return Some(n);
            }
        }
    }
    None
}

/// BLKDISCARD on a block device (blocking).
pub fn discard(fd: i32, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: the ioctl reads two u64.
    unsafe { blkdiscard(fd, &range) }
        .map(|_| ())
        .map_err(io::Error::from)
}

/// BLKZEROOUT on a block device (blocking).
pub fn zeroout(fd: i32, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: the ioctl reads two u64.
    unsafe { blkzeroout(fd, &range) }
        .map(|_| ())
        .map_err(io::Error::from)
}
