//! The libublk driver: creates (or recovers) the device, runs one thread per queue with a
//! single-threaded executor and one task per tag, and tears the device down on stop.

use crate::request::{decode, execute};
use crate::stop::{new_eventfd, poke, signal_fd, wait_any, StopHandle};
use crate::{BlockTarget, UblkError, UblkOptions};
use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkFlags, UblkUringData};
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::ThreadId;

/// The ublk driver's control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Fail early, with the fix in the message, when the driver is absent or not ours to use.
pub(crate) fn check_control(path: &Path) -> Result<(), UblkError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UblkError::DriverMissing {
            path: path.display().to_string(),
        }),
        Err(source) => Err(UblkError::ControlAccess {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn driver(op: &'static str) -> impl Fn(libublk::UblkError) -> UblkError {
    move |e| UblkError::Driver {
        op,
        detail: match e {
            libublk::UblkError::OtherError(errno) | libublk::UblkError::UringIOError(errno) => {
                format!("{} ({e})", std::io::Error::from_raw_os_error(errno.abs()))
            }
            other => other.to_string(),
        },
    }
}

fn validate(target: &dyn BlockTargetInfo, opts: &UblkOptions) -> Result<u8, UblkError> {
    let bad = |m: String| Err(UblkError::InvalidOptions(m));
    let lbs = target.lbs();
    if !(512..=4096).contains(&lbs) || !lbs.is_power_of_two() {
        return bad(format!(
            "logical block size {lbs} (need 512..=4096, a power of two)"
        ));
    }
    if target.size() == 0 || target.size() & (u64::from(lbs) - 1) != 0 {
        return bad(format!(
            "device size {} is not a positive multiple of the block size {lbs}",
            target.size()
        ));
    }
    if opts.queues == 0 || opts.queues > 32 {
        return bad(format!("queues {} (need 1..=32)", opts.queues));
    }
    if opts.depth == 0 || opts.depth > 4096 {
        return bad(format!("depth {} (need 1..=4096)", opts.depth));
    }
    if opts.max_io_bytes < 4096 || opts.max_io_bytes & 4095 != 0 || opts.max_io_bytes > (1 << 30) {
        return bad(format!(
            "max_io_bytes {} (need a multiple of 4096, at least 4096)",
            opts.max_io_bytes
        ));
    }
    Ok(lbs.trailing_zeros() as u8)
}

/// Object-safe view of the two numbers `validate` needs (keeps it testable without generics).
trait BlockTargetInfo {
    fn size(&self) -> u64;
    fn lbs(&self) -> u32;
}
impl<T: BlockTarget> BlockTargetInfo for T {
    fn size(&self) -> u64 {
        BlockTarget::size(self)
    }
    fn lbs(&self) -> u32 {
        self.logical_block_size()
    }
}

/// Expose `target` as `/dev/ublkbN` until stopped (SIGINT/SIGTERM if `opts.handle_signals`, or
/// `opts.stop`), then delete the device. `ready` is called with the block device's path once the
/// device is live. Blocks the calling thread; I/O runs on `opts.queues` threads of its own.
pub fn serve<T: BlockTarget>(
    target: Arc<T>,
    opts: &UblkOptions,
    ready: impl FnOnce(&str),
) -> Result<(), UblkError> {
    let lbs_shift = validate(&*target, opts)?;
    check_control(Path::new(CONTROL_PATH))?;

    // Queue threads poke this when they end, so that a device torn down from outside (e.g.
    // `ublk del`) also ends the wait below.
    let queues_gone = StopHandle::new()?;
    let mut wait_fds = vec![queues_gone.fd()];
    if let Some(stop) = &opts.stop {
        wait_fds.push(stop.fd());
    }
    if opts.handle_signals {
        wait_fds.push(signal_fd()?);
    }

    let ctrl = match opts.recover {
        Some(id) => {
            let ctrl = UblkCtrlBuilder::default()
                .name("twinblk")
                .id(id)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(driver("open device for recovery"))?;
            check_recoverable(&ctrl, id, BlockTarget::size(&*target))?;
            ctrl.start_user_recover()
                .map_err(driver("START_USER_RECOVERY"))?;
            ctrl
        }
        None => {
            let ctrl_flags = if opts.user_recovery {
                u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE)
            } else {
                0
            };
            UblkCtrlBuilder::default()
                .name("twinblk")
                .id(opts.dev_id.unwrap_or(-1))
                .nr_queues(opts.queues)
                .depth(opts.depth)
                .io_buf_bytes(opts.max_io_bytes)
                .ctrl_flags(ctrl_flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(driver("ADD_DEV"))?
        }
    };

    let size = BlockTarget::size(&*target);
    let volatile = target.volatile_cache();
    let discard = target.supports_discard();
    let tgt_init = |dev: &mut UblkDev| {
        let depth = dev.dev_info.queue_depth;
        let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
        let tgt = &mut dev.tgt;
        tgt.dev_size = size;
        // One more slot than the queue depth for the eventfd read that wakes the queue.
        tgt.sq_depth = depth.saturating_add(1);
        tgt.cq_depth = depth.saturating_add(1);
        let mut attrs = 0;
        if volatile {
            attrs |= sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        }
        tgt.params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC
                | if discard {
                    sys::UBLK_PARAM_TYPE_DISCARD
                } else {
                    0
                },
            basic: sys::ublk_param_basic {
                attrs,
                logical_bs_shift: lbs_shift,
                physical_bs_shift: lbs_shift.max(12),
                io_opt_shift: 12,
                io_min_shift: lbs_shift,
                max_sectors,
                dev_sectors: size >> 9,
                ..Default::default()
            },
            discard: sys::ublk_param_discard {
                discard_granularity: 4096,
                max_discard_sectors: u32::MAX >> 9,
                max_write_zeroes_sectors: u32::MAX >> 9,
                max_discard_segments: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(())
    };

    let dev = Arc::new(
        UblkDev::new("twinblk".to_string(), tgt_init, &ctrl).map_err(driver("open ublkc"))?,
    );
    let nr_queues = dev.dev_info.nr_hw_queues;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    for qid in 0..nr_queues {
        let dev = Arc::clone(&dev);
        let target = Arc::clone(&target);
        let tx = tx.clone();
        let gone = queues_gone.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ublk-q{qid}"))
            .spawn(move || {
                let tid = UblkCtrl::init_queue_thread();
                libublk::io::set_io_thread_idx(0);
                if tx.send((qid, tid)).is_ok() {
                    if let Err(e) = queue_main(qid, &dev, &*target) {
                        tracing::error!(qid, "ublk queue failed: {e}");
                    }
                }
                gone.stop();
            });
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                tracing::error!("cannot spawn ublk queue thread: {e}");
                queues_gone.stop();
                break;
            }
        }
    }
    drop(tx);
    for _ in 0..threads.len() {
        let Ok((qid, tid)) = rx.recv() else { break };
        ctrl.set_thread_affinity(qid, tid);
        if let Err(e) = ctrl.configure_queue(&dev, qid, tid) {
            tracing::warn!(qid, "ublk configure_queue: {e}");
        }
    }

    let started = ctrl.start_dev(&dev).map_err(driver("START_DEV"));
    if started.is_ok() {
        let path = ctrl.get_bdev_path();
        tracing::info!(%path, recovered = opts.recover.is_some(), "ublk device is live");
        ready(&path);
        wait_any(&wait_fds);
        tracing::info!(%path, "stopping ublk device");
    }
    // Stopping aborts every queue's pending commands, which ends the queue threads.
    match ctrl.kill_dev() {
        Ok(_) => tracing::debug!("ublk STOP_DEV done"),
        Err(e) => tracing::debug!("ublk STOP_DEV: {e}"),
    }
    for t in threads {
        if t.join().is_err() {
            tracing::error!("a ublk queue thread panicked");
        }
    }
    tracing::debug!("ublk queue threads ended");
    let _ = ctrl.stop_dev();
    // DEL_DEV waits until the char device /dev/ublkcN is closed, and `dev` holds it open.
    drop(dev);
    // A control created with ADD_DEV deletes on drop; a recovered one does not: delete it here.
    match ctrl.del_dev() {
        Ok(_) => tracing::debug!("ublk DEL_DEV done"),
        Err(e) => tracing::debug!("ublk DEL_DEV: {e}"),
    }
    started.map(|_| ())
}

/// Delete `/dev/ublkbN` left behind by a server that was killed (e.g. `kill -9` of a device
/// created with user recovery, which then waits for a `--recover` forever), when the caller
/// does not want to recover it: pending I/O fails, the device disappears. Refuses a device whose
/// server is still running (stop that one with SIGTERM instead).
pub fn delete(id: i32) -> Result<(), UblkError> {
    if id < 0 {
        return Err(UblkError::InvalidOptions(format!(
            "device number {id}: give N of /dev/ublkbN (0 or more)"
        )));
    }
    check_control(Path::new(CONTROL_PATH))?;
    let ctrl = UblkCtrl::new_simple(id).map_err(|e| match e {
        libublk::UblkError::OtherError(errno) if errno.abs() == libc::ENODEV => {
            UblkError::InvalidOptions(format!("there is no ublk device {id} (/dev/ublkb{id})"))
        }
        other => driver("GET_DEV_INFO")(other),
    })?;
    let info = ctrl.dev_info();
    let pid = info.ublksrv_pid;
    // SAFETY: kill with signal 0 only checks that the process exists.
    let server_alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
    if u32::from(info.state) == sys::UBLK_S_DEV_LIVE && server_alive {
        return Err(UblkError::InvalidOptions(format!(
            "/dev/ublkb{id} is served by the running process {pid}: stop it with SIGTERM (it deletes the device itself)"
        )));
    }
    match ctrl.kill_dev() {
        Ok(_) => tracing::debug!(id, "ublk STOP_DEV done"),
        Err(e) => tracing::debug!(id, "ublk STOP_DEV: {e}"),
    }
    ctrl.del_dev().map_err(driver("DEL_DEV"))?;
    Ok(())
}

/// Refuse to recover a device that is not waiting for a new server or has another size.
fn check_recoverable(ctrl: &UblkCtrl, id: i32, size: u64) -> Result<(), UblkError> {
    let info = ctrl.dev_info();
    if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
        return Err(UblkError::RecoverMismatch {
            dev_id: id,
            detail: "it was created without user recovery".into(),
        });
    }
    let mut params = sys::ublk_params::default();
    ctrl.get_params(&mut params).map_err(driver("GET_PARAMS"))?;
    if params.basic.dev_sectors != size >> 9 {
        return Err(UblkError::RecoverMismatch {
            dev_id: id,
            detail: format!(
                "it has {} bytes, the target {size}",
                params.basic.dev_sectors << 9
            ),
        });
    }
    Ok(())
}

/// Serve one hardware queue until the device stops.
fn queue_main<T: BlockTarget>(qid: u16, dev: &UblkDev, target: &T) -> Result<(), UblkError> {
    let kick = Arc::new(new_eventfd()?);
    // The kernel may fill this after the reading task is gone (until the ring is torn down), so it
    // must outlive the ring: 8 bytes per queue thread, leaked on purpose.
    let kick_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let q = Rc::new(UblkQueue::new(qid, dev).map_err(driver("queue setup"))?);
    let exe = smol::LocalExecutor::new();
    let queue_thread = std::thread::current().id();
    let dev_size = BlockTarget::size(target);
    let buf_len = dev.dev_info.max_io_buf_bytes as usize;

    let mut tasks = Vec::new();
    for tag in q.tags() {
        let q = Rc::clone(&q);
        let kick = Arc::clone(&kick);
        tasks.push(exe.spawn(async move {
            let mut buf = IoBuf::<u8>::new(buf_len);
            let mut next = q
                .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
                .await;
            while next.is_ok() {
                let iod = *q.get_iod(tag);
                let res = match decode(
                    iod.op_flags,
                    iod.start_sector,
                    iod.nr_sectors,
                    dev_size,
                    buf_len,
                ) {
                    Ok(req) => {
                        let io = execute(target, req, buf.as_mut_slice());
                        Kicked::new(io, &kick, queue_thread).await
                    }
                    Err(errno) => {
                        tracing::warn!(
                            qid,
                            tag,
                            op_flags = iod.op_flags,
                            "ublk request refused: errno {errno}"
                        );
                        -errno
                    }
                };
                next = q
                    .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
                    .await;
            }
            match next {
                Err(libublk::UblkError::QueueIsDown) | Ok(_) => {}
                Err(e) => tracing::error!(qid, tag, "ublk io task ended: {e}"),
            }
        }));
    }
    let kick_fd = kick.as_raw_fd();
    let kick_ptr = kick_buf.as_mut_ptr();
    let _kick_reader = exe.spawn(async move {
        // Each read drains the eventfd; its completion is what wakes a ring waiting in the kernel.
        loop {
            let sqe = opcode::Read::new(types::Fd(kick_fd), kick_ptr, 8).build();
            match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
                Ok(n) if n >= 0 || n == -libc::EAGAIN || n == -libc::EINTR => {}
                other => {
                    tracing::debug!("ublk kick reader ends: {other:?}");
                    break;
                }
            }
        }
    });

    let run = smol::block_on(exe.run(async {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await
    }));
    drop(tasks);
    drop(exe);
    run.map_err(driver("queue event loop"))
}

/// Wraps an I/O future so that a wake-up from another thread also kicks the queue's io_uring
/// (the queue thread may be asleep in io_uring_enter, where a plain task wake-up cannot reach it).
struct Kicked<'a, F> {
    io: Pin<Box<F>>,
    kick: &'a Arc<OwnedFd>,
    queue_thread: ThreadId,
    waker: Option<(Waker, Waker)>,
}

impl<'a, F: Future> Kicked<'a, F> {
    fn new(io: F, kick: &'a Arc<OwnedFd>, queue_thread: ThreadId) -> Self {
        Kicked {
            io: Box::pin(io),
            kick,
            queue_thread,
            waker: None,
        }
    }
}

struct KickWaker {
    task: Waker,
    kick: Arc<OwnedFd>,
    queue_thread: ThreadId,
}

impl Wake for KickWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.task.wake_by_ref();
        // On the queue thread itself the executor runs right after, no kick needed.
        if std::thread::current().id() != self.queue_thread {
            poke(self.kick.as_raw_fd());
        }
    }
}

impl<F: Future> Future for Kicked<'_, F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let reuse = matches!(&this.waker, Some((task, _)) if task.will_wake(cx.waker()));
        if !reuse {
            let kw = Waker::from(Arc::new(KickWaker {
                task: cx.waker().clone(),
                kick: Arc::clone(this.kick),
                queue_thread: this.queue_thread,
            }));
            this.waker = Some((cx.waker().clone(), kw));
        }
        match &this.waker {
            Some((_, kw)) => this.io.as_mut().poll(&mut Context::from_waker(kw)),
            None => this.io.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IoFuture;

    struct Sized(u64, u32);
    impl BlockTarget for Sized {
        fn size(&self) -> u64 {
            self.0
        }
        fn logical_block_size(&self) -> u32 {
            self.1
        }
        fn read<'a>(&'a self, _: u64, _: &'a mut [u8]) -> IoFuture<'a> {
            Box::pin(async { Err(libc::EIO) })
        }
        fn write<'a>(&'a self, _: u64, _: &'a [u8], _: bool) -> IoFuture<'a> {
            Box::pin(async { Err(libc::EIO) })
        }
        fn flush(&self) -> IoFuture<'_> {
            Box::pin(async { Err(libc::EIO) })
        }
        fn discard(&self, _: u64, _: u64) -> IoFuture<'_> {
            Box::pin(async { Err(libc::EIO) })
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> IoFuture<'_> {
            Box::pin(async { Err(libc::EIO) })
        }
    }

    #[test]
    fn missing_control_device_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_control(&dir.path().join("ublk-control")).unwrap_err();
        assert!(matches!(err, UblkError::DriverMissing { .. }));
        let msg = err.to_string();
        assert!(msg.contains("modprobe ublk_drv"), "{msg}");
        assert!(msg.contains("Linux ≥ 6.0"), "{msg}");
    }

    #[test]
    fn delete_checks_the_number_and_the_driver() {
        assert!(matches!(delete(-1), Err(UblkError::InvalidOptions(_))));
        if !Path::new(CONTROL_PATH).exists() {
            assert!(matches!(delete(0), Err(UblkError::DriverMissing { .. })));
        }
    }

    #[test]
    fn serve_without_the_driver_fails_cleanly() {
        if Path::new(CONTROL_PATH).exists() {
            // A machine with the driver: this test is about machines without it.
            return;
        }
        let mut called = false;
        let opts = UblkOptions {
            handle_signals: false,
            ..Default::default()
        };
        let err = serve(Arc::new(Sized(1 << 20, 512)), &opts, |_| called = true).unwrap_err();
        assert!(matches!(err, UblkError::DriverMissing { .. }), "{err}");
        assert!(!called);
    }

    #[test]
    fn options_and_geometry_are_validated() {
        let ok = UblkOptions::default();
        assert_eq!(validate(&Sized(1 << 20, 512), &ok).unwrap(), 9);
        assert_eq!(validate(&Sized(1 << 20, 4096), &ok).unwrap(), 12);
        assert!(validate(&Sized(1 << 20, 1000), &ok).is_err());
        assert!(validate(&Sized(1000, 512), &ok).is_err());
        assert!(validate(&Sized(0, 512), &ok).is_err());
        for bad in [
            UblkOptions {
                queues: 0,
                ..Default::default()
            },
            UblkOptions {
                depth: 0,
                ..Default::default()
            },
            UblkOptions {
                max_io_bytes: 1000,
                ..Default::default()
            },
        ] {
            let e = validate(&Sized(1 << 20, 512), &bad).unwrap_err();
            assert!(matches!(e, UblkError::InvalidOptions(_)), "{e}");
        }
    }

    /// A future completed from another thread must wake the task through the wrapped waker and
    /// kick the eventfd; completed on the queue thread, it must not kick.
    #[test]
    fn remote_completion_kicks_the_eventfd() {
        struct Flag(std::sync::atomic::AtomicBool);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let kick = Arc::new(new_eventfd().unwrap());
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(Arc::clone(&flag));
        let (tx, rx) = std::sync::mpsc::channel::<Waker>();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = Arc::clone(&done);
        let io = std::future::poll_fn(move |cx| {
            if d2.load(std::sync::atomic::Ordering::SeqCst) {
                Poll::Ready(7)
            } else {
                tx.send(cx.waker().clone()).unwrap();
                Poll::Pending
            }
        });
        let mut k = Kicked::new(io, &kick, std::thread::current().id());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut k).poll(&mut cx).is_pending());
        let remote = rx.recv().unwrap();
        let d3 = Arc::clone(&done);
        std::thread::spawn(move || {
            d3.store(true, std::sync::atomic::Ordering::SeqCst);
            remote.wake();
        })
        .join()
        .unwrap();
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64.
        let n = unsafe { libc::read(kick.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!((n, v), (8, 1));
        assert_eq!(Pin::new(&mut k).poll(&mut cx), Poll::Ready(7));
        // A wake on the queue thread itself: task woken, no kick.
        flag.0.store(false, std::sync::atomic::Ordering::SeqCst);
        let (_, kw) = k.waker.as_ref().unwrap();
        kw.wake_by_ref();
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
        let n = unsafe { libc::read(kick.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!(n, -1, "no kick expected");
    }
}
