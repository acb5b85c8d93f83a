//! The replicated device as the NBD server sees it: each request becomes a core event sent to
//! the resource's event loop, and the answer comes back through a oneshot when the core says
//! `CompleteClient` (or, for reads, when the local read it allowed finished).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

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
    pub(super) clients: Clients,
    /// The latency breakdown: a write's first and last stage are timed here.
    pub(super) latency: super::timing::Recorder,
}

/// The NBD clients that opened the replicated export, and whether one may open it now: what
/// `secondary` and `down` check (like DRBD, which refuses to demote a device held open, since
/// every later write of its users would fail) and what a client negotiating with a Secondary
/// is told. The event loop sets the refusal from the role ([`Clients::set_refusal`]).
#[derive(Clone, Default)]
pub(crate) struct Clients(Arc<Mutex<ClientsInner>>);

#[derive(Default)]
struct ClientsInner {
    refusal: Option<String>,
    next: u64,
    open: BTreeMap<u64, OpenClient>,
    /// The event loop, told of every open and close (the core decides whether a demotion or
    /// a stop may proceed). Sent under the lock, so an admin command that sees a client gone
    /// from [`Clients::open`] reaches the core after its close.
    notify: Option<mpsc::UnboundedSender<Input>>,
}

struct OpenClient {
    addr: String,
    close: watch::Sender<bool>,
}

/// Removes its client from [`Clients`] when the connection ends.
struct Registered {
    clients: Clients,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut g = self.clients.lock();
        g.open.remove(&self.id);
        if let Some(tx) = &g.notify {
            let _ = tx.send(Input::FrontendClosed { client: self.id });
        }
    }
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClientsInner> {
        // The data stays consistent under a panic (each change is one map operation).
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Clients whose opens and closes are sent to the event loop `tx`.
    pub(crate) fn notifying(tx: mpsc::UnboundedSender<Input>) -> Clients {
        let c = Clients::default();
        c.lock().notify = Some(tx);
        c
    }

    /// Why a client may not open the export now (`None`: it may).
    pub(crate) fn set_refusal(&self, why: Option<String>) {
        self.lock().refusal = why;
    }

    /// The addresses of the clients that have the export open, oldest first.
    pub(crate) fn open(&self) -> Vec<String> {
        self.lock().open.values().map(|c| c.addr.clone()).collect()
    }

    /// Ask every open client's connection to end (it answers what it read first).
    pub(crate) fn close_all(&self) {
        for c in self.lock().open.values() {
            let _ = c.close.send(true);
        }
    }

    fn register(&self, addr: &str) -> Result<crate::backend::Opened, String> {
        let mut g = self.lock();
        if let Some(why) = &g.refusal {
            return Err(why.clone());
        }
        g.next += 1;
        let id = g.next;
        let (close, rx) = watch::channel(false);
        g.open.insert(
            id,
            OpenClient {
                addr: addr.to_owned(),
                close,
            },
        );
        if let Some(tx) = &g.notify {
            let _ = tx.send(Input::FrontendOpened {
                client: id,
                name: addr.to_owned(),
            });
        }
        Ok(crate::backend::Opened {
            close: Some(rx),
            guard: Some(Box::new(Registered {
                clients: self.clone(),
                id,
            })),
        })
    }
}

impl Replicated {
    /// Hands `op` to the event loop now (this fixes its place among the client's requests) and
    /// returns the wait for its answer.
    fn call(&self, op: ClientOp) -> impl Future<Output = Result<Option<IoBuf>, Errno>> + 'static {
        let (reply, rx) = oneshot::channel();
        let at = self.latency.now();
        let sent = self.tx.send(Input::Client { op, reply, at });
        let latency = self.latency.clone();
        async move {
            sent.map_err(|_| Errno(libc::ESHUTDOWN))?;
            match rx.await {
                Ok((r, done)) => {
                    // A timed write: its answer goes out now.
                    if let (Some(at), Some(done), Some(now)) = (at, done, latency.now()) {
                        use crate::latency::Stage;
                        latency.record(
                            &[
                                (Stage::Reply, now.saturating_duration_since(done)),
                                (Stage::Total, now.saturating_duration_since(at)),
                            ],
                            now,
                        );
                    }
                    r.map_err(Errno)
                }
                // The event loop is gone (shutting down): the request was not done.
                Err(_) => Err(Errno(libc::ESHUTDOWN)),
            }
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
        // Opened only on a Primary (see `refuse_open`); the core still refuses a Secondary's
        // I/O with EPERM, for a client that negotiated before a demotion.
        false
    }
    fn refuse_open(&self) -> Option<String> {
        self.clients.lock().refusal.clone()
    }
    fn opened(&self, client: &str) -> Result<crate::backend::Opened, String> {
        self.clients.register(client)
    }
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<IoBuf, Errno>> + 'static {
        let r = self.call(ClientOp::Read { offset, len });
        async move { r.await?.ok_or(Errno(libc::EIO)) }
    }
    fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + 'static {
        let data = buf.into_bytes();
        done(self.call(ClientOp::Write { offset, data, fua }))
    }
    fn flush(&self) -> impl Future<Output = Result<(), Errno>> + 'static {
        done(self.call(ClientOp::Flush))
    }
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), Errno>> + 'static {
        let op = len32(len).map(|len| self.call(ClientOp::Trim { offset, len }));
        async move { op?.await.map(drop) }
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
    ) -> impl Future<Output = Result<(), Errno>> + 'static {
        let op = len32(len).map(|len| self.call(ClientOp::Zero { offset, len }));
        async move { op?.await.map(drop) }
    }
}

/// A request that answers no data.
async fn done(r: impl Future<Output = Result<Option<IoBuf>, Errno>>) -> Result<(), Errno> {
    r.await.map(drop)
}

/// `frontend = "ublk"`: the replicated device as `/dev/ublkbN`, served by a thread of its own
/// (libublk's queue threads are not tokio tasks) that hands every request to the event loop
/// like an NBD connection does.
pub(super) struct UblkFrontend {
    /// `/dev/ublkbN`.
    pub device: String,
    stop: twinblk_ublk::StopHandle,
    thread: std::thread::JoinHandle<Result<(), twinblk_ublk::UblkError>>,
}

impl UblkFrontend {
    /// Create the device and return once it is live. Without `/dev/ublk-control` this fails
    /// with the ublk crate's explanation (load `ublk_drv`, Linux >= 6.0).
    ///
    /// The device is created without user recovery: if the daemon dies, its I/O fails rather
    /// than hanging until a `--recover` that `up` does not offer; the peer takes over instead.
    pub(super) async fn start(
        backend: Replicated,
        queues: u16,
        depth: u16,
    ) -> Result<UblkFrontend, twinblk_ublk::UblkError> {
        let stop = twinblk_ublk::StopHandle::new()?;
        let opts = twinblk_ublk::UblkOptions {
            queues,
            depth,
            user_recovery: false,
            handle_signals: false,
            stop: Some(stop.clone()),
            ..Default::default()
        };
        let rt = tokio::runtime::Handle::current();
        let (ready, device) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("ublk".into())
            .spawn(move || serve_ublk(backend, rt, &opts, ready))?;
        match device.await {
            Ok(device) => Ok(UblkFrontend {
                device,
                stop,
                thread,
            }),
            // The server returned before the device went live: its error says why.
            Err(_) => match join(thread).await {
                Err(e) => Err(e),
                Ok(()) => Err(twinblk_ublk::UblkError::Driver {
                    op: "START_DEV",
                    detail: "the ublk server stopped before the device was live".into(),
                }),
            },
        }
    }

    /// Delete the device once the requests in flight are answered.
    pub(super) async fn stop(self) -> Result<(), twinblk_ublk::UblkError> {
        self.stop.stop();
        join(self.thread).await
    }
}

async fn join(
    thread: std::thread::JoinHandle<Result<(), twinblk_ublk::UblkError>>,
) -> Result<(), twinblk_ublk::UblkError> {
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    match joined {
        Ok(Ok(r)) => r,
        _ => Err(twinblk_ublk::UblkError::Driver {
            op: "serve",
            detail: "the ublk server thread panicked".into(),
        }),
    }
}

#[cfg(target_os = "linux")]
fn serve_ublk(
    backend: Replicated,
    rt: tokio::runtime::Handle,
    opts: &twinblk_ublk::UblkOptions,
    ready: oneshot::Sender<String>,
) -> Result<(), twinblk_ublk::UblkError> {
    crate::ublk_target::serve_ublk(backend, rt, opts, |dev| {
        let _ = ready.send(dev.to_owned());
    })
}

#[cfg(not(target_os = "linux"))]
fn serve_ublk(
    _backend: Replicated,
    _rt: tokio::runtime::Handle,
    _opts: &twinblk_ublk::UblkOptions,
    _ready: oneshot::Sender<String>,
) -> Result<(), twinblk_ublk::UblkError> {
    Err(twinblk_ublk::UblkError::Unsupported)
}

/// Whether a block device is mounted or opened exclusively by someone: an exclusive open of a
/// block device fails with EBUSY then (and only then). Any other failure says nothing about use.
pub(super) fn held_open(dev: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}
