//! Aligned I/O buffers and the pool that recycles them.
//!
//! O_DIRECT needs the buffer address aligned (4096 covers every logical block size we accept), so
//! buffers come from `std::alloc` with a 4096-byte alignment. Allocating and freeing such memory on
//! every request would put the allocator (and page faults on fresh memory) on the hot path, so
//! buffers of the common power-of-two sizes (4 KiB .. 2 MiB) go back to a global pool on drop and
//! are handed out again by the next `alloc` of that size class.

use std::alloc::{self, Layout};

use bytes::Bytes;
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every buffer: enough for O_DIRECT on 512- and 4096-byte logical blocks.
pub const BUF_ALIGN: usize = 4096;

const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
const MAX_CLASS_SHIFT: u32 = 21; // 2 MiB
const NUM_CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Bytes a size class may keep idle in the pool; bounds the pool's memory.
const POOL_BYTES_PER_CLASS: usize = 16 << 20;
const POOL_MAX_PER_CLASS: usize = 256;

/// A raw aligned allocation. Owned by exactly one `IoBuf` or by the pool.
struct Chunk {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: a Chunk is plain memory with a single owner.
unsafe impl Send for Chunk {}

struct Pool {
    classes: [Mutex<Vec<Chunk>>; NUM_CLASSES],
}

static POOL: Pool = Pool {
    classes: [const { Mutex::new(Vec::new()) }; NUM_CLASSES],
};

fn class_of(cap: usize) -> Option<usize> {
    if !cap.is_power_of_two() {
        return None;
    }
    let shift = cap.trailing_zeros();
    if (MIN_CLASS_SHIFT..=MAX_CLASS_SHIFT).contains(&shift) {
        Some((shift - MIN_CLASS_SHIFT) as usize)
    } else {
        None
    }
}

fn max_pooled(cap: usize) -> usize {
    (POOL_BYTES_PER_CLASS / cap).clamp(4, POOL_MAX_PER_CLASS)
}

/// The capacity actually allocated for `len` bytes: a pooled power-of-two class when it fits,
/// else `len` rounded up to the alignment.
fn capacity_for(len: usize) -> usize {
    let len = len.max(1);
    if len <= 1 << MAX_CLASS_SHIFT {
        len.next_power_of_two().max(1 << MIN_CLASS_SHIFT)
    } else {
        len.div_ceil(BUF_ALIGN).saturating_mul(BUF_ALIGN)
    }
}

impl Chunk {
    /// A chunk of at least `len` bytes. `fresh` tells whether the memory is newly zeroed (true) or
    /// recycled (false: holds some earlier buffer's bytes).
    fn get(len: usize) -> (Chunk, bool) {
        let cap = capacity_for(len);
        if let Some(class) = class_of(cap) {
            if let Ok(mut free) = POOL.classes[class].lock() {
                if let Some(chunk) = free.pop() {
                    return (chunk, false);
                }
            }
        }
        // alloc_zeroed: every byte a `&[u8]` can see is initialised, and fresh buffers leak nothing.
        let layout = match Layout::from_size_align(cap, BUF_ALIGN) {
            Ok(l) => l,
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: layout has non-zero size (cap >= 4096).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(ptr) => (Chunk { ptr, cap }, true),
            None => alloc::handle_alloc_error(layout),
        }
    }

    fn put(self) {
        if let Some(class) = class_of(self.cap) {
            if let Ok(mut free) = POOL.classes[class].lock() {
                if free.len() < max_pooled(self.cap) {
                    free.push(self);
                    return;
                }
            }
        }
        drop(self);
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: allocated in `get` with exactly this layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, BUF_ALIGN),
            )
        }
    }
}

/// Lends an [`IoBuf`] to `Bytes::from_owner`.
struct BytesOwner(IoBuf);

impl AsRef<[u8]> for BytesOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A buffer for disk I/O: 4096-aligned memory from the pool. Derefs to exactly `len` bytes, which
/// may start at an inner offset (an unaligned read returns the sub-slice of the aligned block range
/// it read). Returns its memory to the pool when dropped.
///
/// It may instead borrow the memory of a [`Bytes`] ([`IoBuf::from_bytes`]): a write whose data
/// already sits in an aligned buffer (the NBD payload on the Primary) reaches the disk without a
/// copy. Such a buffer is read-only: the first mutable access copies it into pool memory.
pub struct IoBuf {
    chunk: Option<Chunk>,
    shared: Option<Bytes>,
    off: usize,
    len: usize,
}

// SAFETY: IoBuf owns its memory exclusively; &IoBuf only gives shared access to bytes.
unsafe impl Send for IoBuf {}
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let (chunk, fresh) = Chunk::get(len);
        let mut b = IoBuf {
            chunk: Some(chunk),
            shared: None,
            off: 0,
            len,
        };
        if !fresh {
            b.fill(0);
        }
        b
    }

    /// A buffer whose contents are unspecified (recycled bytes): for reads that overwrite it.
    pub(crate) fn uninit_contents(len: usize) -> IoBuf {
        let (chunk, _) = Chunk::get(len);
        IoBuf {
            chunk: Some(chunk),
            shared: None,
            off: 0,
            len,
        }
    }

    /// A buffer over `data` without copying it (see the type's docs). The disk copies it only if
    /// its address does not suit O_DIRECT.
    pub fn from_bytes(data: Bytes) -> IoBuf {
        let len = data.len();
        IoBuf {
            chunk: None,
            shared: Some(data),
            off: 0,
            len,
        }
    }

    /// The buffer as `Bytes`, without a copy: the memory goes back to the pool when the last
    /// clone is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(BytesOwner(self))
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::uninit_contents(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Shortens the visible bytes to `len` (no effect if `len` is not smaller).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Narrows the visible bytes to `start..start+len` of the current view. Clamped to the view.
    pub(crate) fn narrow(&mut self, start: usize, len: usize) {
        let start = start.min(self.len);
        let len = len.min(self.len - start);
        self.off += start;
        self.len = len;
    }

    /// Address of the first visible byte (for alignment checks and the kernel).
    pub(crate) fn addr(&self) -> usize {
        self.as_ptr() as usize
    }

    /// Raw pointer to the first visible byte, for the kernel to read or fill while the engine
    /// owns the buffer. Only buffers the engine allocated are filled; a `from_bytes` buffer only
    /// ever goes to a write.
    pub(crate) fn raw_ptr(&self) -> *mut u8 {
        self.base().wrapping_add(self.off)
    }

    fn base(&self) -> *mut u8 {
        match (&self.chunk, &self.shared) {
            (Some(c), _) => c.ptr.as_ptr(),
            // Only ever read through (writes to the disk); `deref_mut` copies first.
            (None, Some(b)) => b.as_ptr().cast_mut(),
            (None, None) => NonNull::dangling().as_ptr(),
        }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: off+len <= cap, memory initialised (zeroed at allocation), exclusively owned.
        unsafe { std::slice::from_raw_parts(self.base().add(self.off), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        if self.shared.is_some() {
            // Borrowed memory may be shared with other `Bytes`: own a copy before writing.
            *self = IoBuf::copy_from(&self[..]);
        }
        // SAFETY: as in Deref, plus &mut self gives exclusive access to pool memory.
        unsafe { std::slice::from_raw_parts_mut(self.base().add(self.off), self.len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("off", &self.off)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some(chunk) = self.chunk.take() {
            chunk.put();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_exact_len() {
        for len in [0, 1, 511, 512, 4096, 4097, 65536, 1 << 20, (2 << 20) + 1] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.addr() % BUF_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn from_bytes_borrows_and_copies_only_when_written() {
        let mut src = IoBuf::zeroed(8192);
        src.fill(0x5a);
        let addr = src.addr();
        let shared = src.into_bytes();
        let mut b = IoBuf::from_bytes(shared.clone());
        assert_eq!(b.addr(), addr, "no copy for reading");
        assert_eq!(b.len(), 8192);
        b.narrow(4096, 4096);
        assert_eq!(b.addr(), addr + 4096);
        b[0] = 1;
        assert_ne!(b.addr(), addr + 4096, "written: now a private copy");
        assert_eq!(b.addr() % BUF_ALIGN, 0);
        assert_eq!((b[0], b[1], b.len()), (1, 0x5a, 4096));
        assert!(
            shared.iter().all(|&x| x == 0x5a),
            "the shared bytes are untouched"
        );
    }

    #[test]
    fn recycled_buffers_are_zeroed_by_zeroed() {
        {
            let mut b = IoBuf::zeroed(8192);
            b.fill(0xab);
        }
        for _ in 0..8 {
            let b = IoBuf::zeroed(8192);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn pool_reuses_memory() {
        // The 2 MiB class is used by no other test, so the pool's LIFO hands the same chunk back.
        let a = IoBuf::zeroed(2 << 20);
        let addr = a.addr();
        drop(a);
        let b = IoBuf::uninit_contents((2 << 20) - 4096);
        assert_eq!(b.addr(), addr);
    }

    #[test]
    fn narrow_and_truncate() {
        let mut b = IoBuf::copy_from(&(0..=255u8).collect::<Vec<_>>());
        b.narrow(10, 20);
        assert_eq!(&b[..], &(10..30u8).collect::<Vec<_>>()[..]);
        b.narrow(15, 100);
        assert_eq!(&b[..], &[25, 26, 27, 28, 29]);
        b.truncate(2);
        assert_eq!(&b[..], &[25, 26]);
        b.narrow(5, 5);
        assert_eq!(b.len(), 0);
    }
}
