//! Mapping of a ublk I/O descriptor to a target call, and of its outcome to the completion the
//! driver expects. Pure: no libublk types, so it is tested on any machine.

use crate::BlockTarget;

// Kernel ABI (include/uapi/linux/ublk_cmd.h); a Linux test checks them against libublk's bindings.
pub(crate) const OP_READ: u32 = 0;
pub(crate) const OP_WRITE: u32 = 1;
pub(crate) const OP_FLUSH: u32 = 2;
pub(crate) const OP_DISCARD: u32 = 3;
pub(crate) const OP_WRITE_ZEROES: u32 = 5;
pub(crate) const F_FUA: u32 = 1 << 13;
pub(crate) const F_NOUNMAP: u32 = 1 << 15;

const SECTOR_SHIFT: u32 = 9;

/// One decoded ublk request. Offsets and lengths in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

/// Decode a descriptor (`op_flags`, `start_sector`, `nr_sectors`) for a device of `dev_size`
/// bytes whose per-request buffer holds `buf_len` bytes. `Err` carries a positive errno.
pub fn decode(
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    dev_size: u64,
    buf_len: usize,
) -> Result<Request, i32> {
    let op = op_flags & 0xff;
    if op == OP_FLUSH {
        // A flush carries no range: its sector fields are whatever the block layer left there.
        return Ok(Request::Flush);
    }
    let offset = start_sector
        .checked_mul(1 << SECTOR_SHIFT)
        .ok_or(libc_errno::EINVAL)?;
    let len = u64::from(nr_sectors) << SECTOR_SHIFT;
    let in_range = |len: u64| offset.checked_add(len).is_some_and(|end| end <= dev_size);
    match op {
        OP_READ | OP_WRITE => {
            if len > buf_len as u64 || len > u64::from(u32::MAX) {
                return Err(libc_errno::EINVAL);
            }
            if !in_range(len) {
                return Err(libc_errno::EIO);
            }
            let len = len as u32;
            Ok(if op == OP_READ {
                Request::Read { offset, len }
            } else {
                Request::Write {
                    offset,
                    len,
                    fua: op_flags & F_FUA != 0,
                }
            })
        }
        OP_DISCARD | OP_WRITE_ZEROES => {
            if !in_range(len) {
                return Err(libc_errno::EIO);
            }
            Ok(if op == OP_DISCARD {
                Request::Discard { offset, len }
            } else {
                Request::WriteZeroes {
                    offset,
                    len,
                    may_unmap: op_flags & F_NOUNMAP == 0,
                }
            })
        }
        _ => Err(libc_errno::EOPNOTSUPP),
    }
}

/// Run `req` against `target` and return the completion result for the driver: the byte count
/// for reads and writes, 0 for the others, or a negative errno.
pub(crate) async fn execute<T: BlockTarget + ?Sized>(
    target: &T,
    req: Request,
    buf: &mut [u8],
) -> i32 {
    let outcome = match req {
        Request::Read { offset, len } => match buf.get_mut(..len as usize) {
            Some(b) => target.read(offset, b).await.map(|()| len as i32),
            None => Err(libc_errno::EINVAL),
        },
        Request::Write { offset, len, fua } => match buf.get(..len as usize) {
            Some(b) => target.write(offset, b, fua).await.map(|()| len as i32),
            None => Err(libc_errno::EINVAL),
        },
        Request::Flush => target.flush().await.map(|()| 0),
        Request::Discard { offset, len } => target.discard(offset, len).await.map(|()| 0),
        Request::WriteZeroes {
            offset,
            len,
            may_unmap,
        } => target
            .write_zeroes(offset, len, may_unmap)
            .await
            .map(|()| 0),
    };
    match outcome {
        Ok(n) => n,
        // A target's errno is positive by contract; a stray 0 or negative one must not look
        // like success to the kernel.
        Err(e) if e > 0 => -e,
        Err(_) => -libc_errno::EIO,
    }
}

/// The few errno values used here, so that this module needs no libc on any platform.
pub(crate) mod libc_errno {
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const EOPNOTSUPP: i32 = 95;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IoFuture;
    use std::sync::Mutex;
    use std::task::{Context, Poll, Wake, Waker};

    const SIZE: u64 = 1 << 20;
    const BUF: usize = 128 * 1024;

    #[test]
    fn decodes_reads_and_writes() {
        assert_eq!(
            decode(OP_READ, 8, 16, SIZE, BUF),
            Ok(Request::Read {
                offset: 4096,
                len: 8192
            })
        );
        assert_eq!(
            decode(OP_WRITE | F_FUA, 0, 1, SIZE, BUF),
            Ok(Request::Write {
                offset: 0,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            decode(OP_WRITE, 0, 1, SIZE, BUF),
            Ok(Request::Write {
                offset: 0,
                len: 512,
                fua: false
            })
        );
    }

    #[test]
    fn decodes_flush_discard_write_zeroes() {
        assert_eq!(decode(OP_FLUSH, 0, 0, SIZE, BUF), Ok(Request::Flush));
        // Seen on a real kernel: a flush's sector fields are not meaningful and may be anything.
        assert_eq!(
            decode(OP_FLUSH, u64::MAX, u32::MAX, SIZE, BUF),
            Ok(Request::Flush)
        );
        // Discard and write-zeroes are not limited by the data buffer.
        assert_eq!(
            decode(OP_DISCARD, 0, 2048, SIZE, BUF),
            Ok(Request::Discard {
                offset: 0,
                len: SIZE
            })
        );
        assert_eq!(
            decode(OP_WRITE_ZEROES, 1, 1, SIZE, BUF),
            Ok(Request::WriteZeroes {
                offset: 512,
                len: 512,
                may_unmap: true
            })
        );
        assert_eq!(
            decode(OP_WRITE_ZEROES | F_NOUNMAP, 1, 1, SIZE, BUF),
            Ok(Request::WriteZeroes {
                offset: 512,
                len: 512,
                may_unmap: false
            })
        );
    }

    #[test]
    fn rejects_out_of_range_oversized_and_unknown() {
        // Ends exactly at the device end: fine. One sector past: EIO.
        assert!(decode(OP_READ, (SIZE >> 9) - 1, 1, SIZE, BUF).is_ok());
        assert_eq!(
            decode(OP_READ, SIZE >> 9, 1, SIZE, BUF),
            Err(libc_errno::EIO)
        );
        assert_eq!(
            decode(OP_DISCARD, 1, (SIZE >> 9) as u32, SIZE, BUF),
            Err(libc_errno::EIO)
        );
        // Offsets that overflow u64 must not wrap around into range.
        assert_eq!(
            decode(OP_WRITE, u64::MAX >> 8, 1, SIZE, BUF),
            Err(libc_errno::EINVAL)
        );
        assert_eq!(
            decode(OP_WRITE, u64::MAX >> 9, 1, u64::MAX, BUF),
            Err(libc_errno::EIO)
        );
        // Larger than the request buffer.
        assert_eq!(
            decode(OP_WRITE, 0, (BUF / 512 + 1) as u32, SIZE, BUF),
            Err(libc_errno::EINVAL)
        );
        assert_eq!(
            decode(4 /* WRITE_SAME */, 0, 1, SIZE, BUF),
            Err(libc_errno::EOPNOTSUPP)
        );
        assert_eq!(decode(13, 0, 1, SIZE, BUF), Err(libc_errno::EOPNOTSUPP));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn constants_match_the_kernel_abi() {
        use libublk::sys;
        assert_eq!(OP_READ, sys::UBLK_IO_OP_READ);
        assert_eq!(OP_WRITE, sys::UBLK_IO_OP_WRITE);
        assert_eq!(OP_FLUSH, sys::UBLK_IO_OP_FLUSH);
        assert_eq!(OP_DISCARD, sys::UBLK_IO_OP_DISCARD);
        assert_eq!(OP_WRITE_ZEROES, sys::UBLK_IO_OP_WRITE_ZEROES);
        assert_eq!(F_FUA, sys::UBLK_IO_F_FUA);
        assert_eq!(F_NOUNMAP, sys::UBLK_IO_F_NOUNMAP);
        assert_eq!(libc_errno::EIO, libc::EIO);
        assert_eq!(libc_errno::EINVAL, libc::EINVAL);
        assert_eq!(libc_errno::EOPNOTSUPP, libc::EOPNOTSUPP);
    }

    /// An in-memory target that records the calls it sees and can be told to fail.
    struct MemTarget {
        data: Mutex<Vec<u8>>,
        calls: Mutex<Vec<String>>,
        fail_with: Option<i32>,
    }

    impl MemTarget {
        fn new(fail_with: Option<i32>) -> Self {
            MemTarget {
                data: Mutex::new(vec![0; SIZE as usize]),
                calls: Mutex::new(Vec::new()),
                fail_with,
            }
        }
        fn done(&self, call: String) -> Result<(), i32> {
            self.calls.lock().unwrap().push(call);
            self.fail_with.map_or(Ok(()), Err)
        }
    }

    impl BlockTarget for MemTarget {
        fn size(&self) -> u64 {
            SIZE
        }
        fn logical_block_size(&self) -> u32 {
            512
        }
        fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
            let r = self.done(format!("read {offset} {}", buf.len()));
            Box::pin(async move { r })
        }
        fn write<'a>(&'a self, offset: u64, data: &'a [u8], fua: bool) -> IoFuture<'a> {
            let o = offset as usize;
            self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
            let r = self.done(format!("write {offset} {} {fua}", data.len()));
            Box::pin(async move { r })
        }
        fn flush(&self) -> IoFuture<'_> {
            let r = self.done("flush".into());
            Box::pin(async move { r })
        }
        fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
            let r = self.done(format!("discard {offset} {len}"));
            Box::pin(async move { r })
        }
        fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
            let r = self.done(format!("zeroes {offset} {len} {may_unmap}"));
            Box::pin(async move { r })
        }
    }

    struct Noop;
    impl Wake for Noop {
        fn wake(self: std::sync::Arc<Self>) {}
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        let waker = Waker::from(std::sync::Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("in-memory target futures complete at once"),
        }
    }

    #[test]
    fn execute_maps_results_and_data() {
        let t = MemTarget::new(None);
        let mut buf = vec![0xabu8; BUF];
        let w = decode(OP_WRITE | F_FUA, 2, 2, SIZE, BUF).unwrap();
        assert_eq!(run(execute(&t, w, &mut buf)), 1024);
        buf.fill(0);
        let r = decode(OP_READ, 2, 4, SIZE, BUF).unwrap();
        assert_eq!(run(execute(&t, r, &mut buf)), 2048);
        assert!(buf[..1024].iter().all(|&b| b == 0xab));
        assert!(buf[1024..2048].iter().all(|&b| b == 0));
        assert_eq!(run(execute(&t, Request::Flush, &mut buf)), 0);
        let d = decode(OP_DISCARD, 0, 8, SIZE, BUF).unwrap();
        assert_eq!(run(execute(&t, d, &mut buf)), 0);
        let z = decode(OP_WRITE_ZEROES | F_NOUNMAP, 8, 8, SIZE, BUF).unwrap();
        assert_eq!(run(execute(&t, z, &mut buf)), 0);
        assert_eq!(
            *t.calls.lock().unwrap(),
            [
                "write 1024 1024 true",
                "read 1024 2048",
                "flush",
                "discard 0 4096",
                "zeroes 4096 4096 false"
            ]
        );
    }

    #[test]
    fn execute_reports_negative_errno() {
        let mut buf = vec![0u8; BUF];
        let t = MemTarget::new(Some(28 /* ENOSPC */));
        let w = decode(OP_WRITE, 0, 1, SIZE, BUF).unwrap();
        assert_eq!(run(execute(&t, w, &mut buf)), -28);
        assert_eq!(run(execute(&t, Request::Flush, &mut buf)), -28);
        // A broken target returning a non-positive errno still fails the request.
        let t = MemTarget::new(Some(0));
        assert_eq!(run(execute(&t, Request::Flush, &mut buf)), -libc_errno::EIO);
    }

    #[test]
    fn execute_refuses_a_request_larger_than_the_buffer() {
        let t = MemTarget::new(None);
        let mut small = vec![0u8; 512];
        let r = Request::Read {
            offset: 0,
            len: 1024,
        };
        assert_eq!(run(execute(&t, r, &mut small)), -libc_errno::EINVAL);
        assert!(t.calls.lock().unwrap().is_empty());
    }
}
