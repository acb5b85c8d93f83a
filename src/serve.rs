//! `twinblk serve`: export one disk over NBD until SIGINT/SIGTERM.

use std::io;
use std::path::PathBuf;

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::addr::{clear_stale_socket, ListenAddr, SocketBusy};
use crate::backend::Backend;
use crate::disk::{Disk, DiskError, DiskOptions};
use crate::nbd::server::{run_connection, Connections, Server};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub disk: PathBuf,
    /// NBD listen address; `None` when only a ublk device is served.
    pub listen: Option<ListenAddr>,
    pub ublk: Option<UblkConfig>,
    pub export: String,
    pub disk_options: DiskOptions,
    /// 0: a current-thread runtime; otherwise that many worker threads.
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("opening disk: {0}")]
    Disk(#[from] DiskError),
    #[error("{path}: another server is listening on this socket; stop it or pick another path")]
    SocketInUse { path: PathBuf },
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("listening on {addr}: {source}")]
    Listen { addr: ListenAddr, source: io::Error },
    #[error("starting the runtime: {0}")]
    Runtime(io::Error),
    #[error("flushing the disk at exit: {0}")]
    Flush(DiskError),
    #[error("ublk: {0}")]
    Ublk(#[from] twinblk_ublk::UblkError),
}

/// What `serve --ublk` needs besides the disk.
#[derive(Debug, Clone, Default)]
pub struct UblkConfig {
    pub queues: u16,
    pub depth: u16,
    /// Re-attach to the existing /dev/ublkbN left by a crashed server.
    pub recover: Option<i32>,
}

pub(crate) enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            if let Err(e) = std::fs::remove_file(&*path) {
                warn!("removing {}: {e}", path.display());
            }
        }
    }
}

pub(crate) async fn bind(addr: &ListenAddr) -> Result<Listener, ServeError> {
    let err = |source| ServeError::Listen {
        addr: addr.clone(),
        source,
    };
    match addr {
        ListenAddr::Unix(path) => {
            clear_stale_socket(path).map_err(|busy| match busy {
                SocketBusy::InUse => ServeError::SocketInUse { path: path.clone() },
                SocketBusy::NotASocket => ServeError::NotASocket { path: path.clone() },
            })?;
            let l = UnixListener::bind(path).map_err(err)?;
            Ok(Listener::Unix(l, path.clone()))
        }
        ListenAddr::Tcp(hp) => Ok(Listener::Tcp(
            TcpListener::bind(hp.as_str()).await.map_err(err)?,
        )),
    }
}

/// Run the server in the foreground; returns after a signal, once in-flight requests are done
/// and the disk is flushed.
pub fn run(cfg: ServeConfig) -> Result<(), ServeError> {
    if let Some(ublk) = cfg.ublk.clone() {
        return run_ublk(cfg, ublk);
    }
    let rt = runtime(cfg.threads).map_err(ServeError::Runtime)?;
    rt.block_on(serve(cfg))
}

/// The runtime `serve` and `up` run on: one thread (`threads` 0), or that many workers.
pub(crate) fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// `serve --ublk`: the ublk queues run on their own threads (libublk's executor) and hand each
/// request to the disk on a multi-thread runtime; this thread blocks in the ublk server until a
/// signal stops it, then flushes. The device is deleted on the way out (or left for `--recover`
/// if the process is killed).
#[cfg(target_os = "linux")]
fn run_ublk(cfg: ServeConfig, u: UblkConfig) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads.max(1))
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let disk = rt.block_on(async { Disk::open(&cfg.disk, &cfg.disk_options) })?;
    let stop = twinblk_ublk::StopHandle::new().map_err(ServeError::Runtime)?;
    let opts = twinblk_ublk::UblkOptions {
        queues: u.queues,
        depth: u.depth,
        recover: u.recover,
        handle_signals: false,
        stop: Some(stop.clone()),
        ..Default::default()
    };
    let signals = rt.block_on(async {
        let term = signal(SignalKind::terminate())?;
        let int = signal(SignalKind::interrupt())?;
        Ok::<_, io::Error>((term, int))
    });
    let (mut sigterm, mut sigint) = signals.map_err(ServeError::Runtime)?;
    rt.spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("SIGINT: shutting down"),
        }
        stop.stop();
    });
    let path = cfg.disk.display().to_string();
    let size = disk.size();
    let served = crate::ublk_target::serve_ublk(disk.clone(), rt.handle().clone(), &opts, |dev| {
        info!("serving {path} ({size} bytes) as {dev}");
        // Tests and scripts wait for this line.
        announce(&format!("ublk device {dev}"));
    });
    rt.block_on(disk.flush()).map_err(ServeError::Flush)?;
    served?;
    info!("disk flushed; exiting");
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn run_ublk(_cfg: ServeConfig, _u: UblkConfig) -> Result<(), ServeError> {
    Err(twinblk_ublk::UblkError::Unsupported.into())
}

async fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    let Some(listen) = cfg.listen.clone() else {
        return Ok(());
    };
    let disk = Disk::open(&cfg.disk, &cfg.disk_options)?;
    let description = format!("twinblk {}", cfg.disk.display());
    let server = Server::new(disk.clone(), cfg.export.clone(), description);
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServeError::Runtime)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServeError::Runtime)?;
    let listener = bind(&listen).await?;
    let shown = match &listener {
        Listener::Tcp(l) => l
            .local_addr()
            .map(|a| format!("tcp:{a}"))
            .unwrap_or_else(|_| listen.to_string()),
        Listener::Unix(..) => listen.to_string(),
    };
    info!(
        "serving {} ({} bytes{}) as export {:?} on {shown}",
        cfg.disk.display(),
        disk.size(),
        if disk.read_only() { ", read-only" } else { "" },
        cfg.export
    );
    // Tests and scripts wait for this line.
    announce(&format!("listening on {shown}"));

    serve_until(listener, server, async {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("SIGINT: shutting down"),
        }
    })
    .await;
    disk.flush().await.map_err(ServeError::Flush)?;
    info!("disk flushed; exiting");
    Ok(())
}

/// Prints a line scripts wait for on stdout. Unlike `println!`, a stdout that cannot be written
/// (a full file system under a redirected log, a closed pipe) is not a panic: the server runs
/// on, as its logging does (see `cli::init_logging`).
pub(crate) fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Serve NBD connections from `listener` until `stop` completes; then stop accepting, let every
/// connection finish the requests it has read (each gets its answer), and wait for them.
pub(crate) async fn serve_until<B: Backend>(
    listener: Listener,
    server: Arc<Server<B>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = Connections::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = accept(&listener) => match r {
                Ok(Accepted::Unix(s)) => {
                    let who = unix_client(&s);
                    let (rd, wr) = s.into_split();
                    conns.spawn(run_connection(server.clone(), rd, wr, who, stop_rx.clone()));
                }
                Ok(Accepted::Tcp(s, peer)) => {
                    let _ = s.set_nodelay(true);
                    let (rd, wr) = s.into_split();
                    conns.spawn(run_connection(server.clone(), rd, wr, peer.to_string(), stop_rx.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

/// A unix-socket client as the operator can find it: its process id and program name.
fn unix_client(s: &tokio::net::UnixStream) -> String {
    let Some(pid) = s.peer_cred().ok().and_then(|c| c.pid()) else {
        return "unix".into();
    };
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => format!("unix:pid {pid} ({})", comm.trim()),
        Err(_) => format!("unix:pid {pid}"),
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
}

async fn accept(l: &Listener) -> io::Result<Accepted> {
    match l {
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
    }
}
