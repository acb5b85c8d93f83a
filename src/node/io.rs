//! Executes the core's `Disk*` actions on the local disk, and reports each as one `DiskDone`.
//! Writes, the hot path, start from the event loop without a task of their own
//! ([`Disk::write_then`]); the rest run each in its own task. The core never emits overlapping
//! writes at once, so the order they start in does not matter.

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Input;
use crate::core::{Action, IoId};
use crate::disk::{Disk, IoBuf, SubmitOrder};

/// Start `action` if it is a disk action; false if it is not one.
///
/// `after_send`: a client write whose extent the same batch sends to the peer. It enters the
/// kernel only after the tasks already woken have run ([`SubmitOrder::AfterWokenTasks`]), so the
/// extent's frame goes out first: in protocol sync the peer's path (the round trip plus the
/// peer's disk) is the longer one, and the local submission (`io_uring_enter`, and in a VM the
/// exit that tells the virtual disk) otherwise runs on the one thread before the frame leaves.
pub(super) fn start(
    disk: &Disk,
    action: &Action,
    tx: &mpsc::UnboundedSender<Input>,
    after_send: bool,
) -> bool {
    let disk = disk.clone();
    let done = |io: IoId| Completion {
        io,
        tx: Some(tx.clone()),
    };
    match action {
        Action::DiskWrite {
            io,
            offset,
            data,
            fua,
        } => {
            let (done, offset, fua) = (done(*io), *offset, *fua);
            let order = if after_send {
                SubmitOrder::AfterWokenTasks
            } else {
                SubmitOrder::Now
            };
            // No copy when the data already sits in aligned memory (a client's NBD payload on
            // the Primary); the disk copies a network buffer that does not.
            let buf = IoBuf::from_bytes(data.clone());
            disk.write_then(offset, buf, fua, order, move |r| {
                done.report(r.map(|()| None).map_err(|e| e.errno()));
            });
        }
        Action::DiskTrim { io, offset, len } => {
            let (done, offset, len) = (done(*io), *offset, *len);
            tokio::spawn(async move {
                let r = disk.trim(offset, len.into()).await;
                done.report(r.map(|()| None).map_err(|e| e.errno()));
            });
        }
        Action::DiskZero { io, offset, len } => {
            let (done, offset, len) = (done(*io), *offset, *len);
            tokio::spawn(async move {
                let r = disk.write_zeroes(offset, len.into(), true).await;
                done.report(r.map(|()| None).map_err(|e| e.errno()));
            });
        }
        Action::DiskFlush { io } => {
            let done = done(*io);
            tokio::spawn(async move {
                let r = disk.flush().await;
                done.report(r.map(|()| None).map_err(|e| e.errno()));
            });
        }
        Action::DiskRead { io, offset, len } => {
            let (done, offset, len) = (done(*io), *offset, *len);
            tokio::spawn(async move {
                let r = disk.read(offset, len).await;
                done.report(r.map(|b| Some(b.into_bytes())).map_err(|e| e.errno()));
            });
        }
        _ => return false,
    }
    true
}

/// The one `DiskDone` the driver contract promises for a disk action. Reported by
/// [`Completion::report`]; if the task running the I/O ends without reporting (a panic unwinds
/// it, the runtime drops it at shutdown), the drop reports `EIO` instead, so the core fails the
/// request (or the peer write) rather than waiting for it forever: a completion lost on an
/// error path is a client hung at 0 % CPU.
struct Completion {
    io: IoId,
    /// `None` once reported.
    tx: Option<mpsc::UnboundedSender<Input>>,
}

impl Completion {
    fn report(mut self, result: Result<Option<Bytes>, i32>) {
        self.send(result);
    }

    /// Sends the `DiskDone` unless it was sent already.
    fn send(&mut self, result: Result<Option<Bytes>, i32>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Input::DiskDone {
                io: self.io,
                result,
            });
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.send(Err(libc::EIO));
    }
}
