//! `twinblk up`: load the resource file, open the disk, start QUIC, the event loop, the admin
//! socket and the NBD listener; run until SIGINT/SIGTERM or `twinblk down`, then shut down
//! gracefully (stop NBD, finish what is in flight, flush, save the metadata).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};

use super::admin::Admin;
use super::frontend::UblkFrontend;
use super::{Input, Node, Replicated};
use crate::config::{Config, ConfigError, Frontend, Protocol};
use crate::control::{self, ControlError};
use crate::core::{self, Replica};
use crate::disk::{Disk, DiskError, DiskOptions};
use crate::meta::{self, Expect, Identity, Layout, MetaError, MetaStore};
use crate::nbd::server::Server;
use crate::net::{LinkConfig, NetError, PeerLink};
use crate::serve::{bind, Listener, ServeError};

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("opening the disk: {0}")]
    Disk(#[from] DiskError),
    #[error("{0}")]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Layout(String),
    #[error("{0}")]
    Net(#[from] NetError),
    #[error("{0}")]
    Control(#[from] ControlError),
    #[error("NBD: {0}")]
    Nbd(#[from] ServeError),
    #[error("{0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("ublk (frontend = \"ublk\"): {0}")]
    Ublk(#[from] twinblk_ublk::UblkError),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("shutting down: {0}")]
    Shutdown(String),
}

/// Options of `twinblk create-md`.
#[derive(Debug, Clone, Copy)]
pub struct CreateMd {
    pub force: bool,
    /// Bytes per bitmap bit; `None`: 4 KiB.
    pub bitmap_block: Option<u64>,
    /// Activity-log extents; `None`: 1024.
    pub al_extents: Option<u32>,
}

/// `twinblk create-md`: write fresh metadata for node `node` of the resource in `config`.
/// Reads the disk's size but writes only the metadata.
pub fn create_md(config: &Path, node: &str, opts: &CreateMd) -> Result<MetaStore, UpError> {
    let cfg = Config::load(config)?;
    let me = cfg.node_named(node)?;
    let layout = Layout::new(
        device_size(me)?,
        opts.bitmap_block
            .unwrap_or(meta::format::DEFAULT_BITMAP_BLOCK),
        opts.al_extents.unwrap_or(meta::format::DEFAULT_AL_EXTENTS),
    )
    .map_err(|e| UpError::Layout(format!("create-md: {e}")))?;
    let id = Identity {
        resource: &cfg.resource.name,
        node,
        node_id: node_id(&cfg, node),
    };
    Ok(MetaStore::create(&me.meta, &id, &layout, opts.force)?)
}

/// The size the disk has (or gets, from the resource file's `size`) at `up`, found without
/// creating or changing anything.
fn device_size(me: &crate::config::Node) -> Result<u64, UpError> {
    if let Some(s) = me.size {
        return Ok(s);
    }
    let d = Disk::open(
        &me.disk,
        &DiskOptions {
            read_only: true,
            ..DiskOptions::default()
        },
    )?;
    Ok(d.size())
}

/// Node ids only need to differ between the two nodes: the resource file sorts them by name.
fn node_id(cfg: &Config, name: &str) -> u64 {
    cfg.nodes.iter().position(|n| n.name == name).unwrap_or(0) as u64 + 1
}

/// Run node `node` of the resource in `config` in the foreground, on a current-thread runtime
/// (`threads` 0) or on `threads` workers.
///
/// One thread is the default: the core's event loop, the NBD server, quinn and the inline
/// io_uring engine then hand work to each other without a cross-thread wake. Measured with a
/// sync pair on one 2-core machine (4k randwrite qd32 / 1M seq write qd8 / 4k qd1 latency,
/// fio's nbd engine on the Primary, two alternating rounds): 0 threads 24,075-25,102 IOPS,
/// 573-596 MiB/s, 230-247 us; 1: 21,275-21,612, 585-614, 213-214; 2 (the old default):
/// 17,493-18,532, 396-464, 264-291. The daemon's blocking work (activity-log transactions)
/// runs on tokio's blocking pool either way.
pub fn run(config: &Path, node: &str, threads: usize) -> Result<(), UpError> {
    let cfg = Config::load(config)?;
    let rt = crate::serve::runtime(threads).map_err(UpError::Runtime)?;
    rt.block_on(up(cfg, node))
}

async fn up(cfg: Config, name: &str) -> Result<(), UpError> {
    let me = cfg.node_named(name)?.clone();
    let resource = cfg.resource.name.clone();
    // Keys and certificates first (a missing peer certificate is a typo away), then the
    // metadata: any refusal leaves the disk and the metadata untouched (no image created).
    let link_cfg = LinkConfig::from_config(&cfg, name)?;
    let (store, restored) = MetaStore::open(
        &me.meta,
        &Expect {
            resource: &resource,
            node: name,
            size: device_size(&me)?,
        },
    )?;
    let al_writer = store.activity_log_writer()?;
    let disk = Disk::open(
        &me.disk,
        &DiskOptions {
            size: me.size,
            // The inline io_uring engine's deep-queue polling (`serve --poll-us`, see
            // `disk::uring_inline`), off by default here: TWINBLK_DISK_POLL_US sets it for
            // `tools/bench.sh`'s `twinblk-sync-dpoll` column (see the README's Benchmarks).
            poll: std::time::Duration::from_micros(
                std::env::var("TWINBLK_DISK_POLL_US")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            ),
            ..DiskOptions::default()
        },
    )?;
    if disk.size() != store.layout().size {
        return Err(MetaError::Foreign {
            path: me.meta.clone(),
            problem: format!(
                "describes a device of {} bytes, but the disk has {} bytes",
                store.layout().size,
                disk.size()
            ),
            fix: format!("the disk changed size: restore its old size, or run `twinblk create-md {resource} --force` for the new size (a full resync)"),
        }
        .into());
    }
    let node_id = node_id(&cfg, name);
    let (protocol, pname) = match cfg.resource.protocol {
        Protocol::Sync => (core::Protocol::Sync, "sync"),
        Protocol::Async => (core::Protocol::Async, "async"),
    };
    let mut ccfg = core::Config::new(&resource, node_id, disk.size(), protocol);
    ccfg.send_buffer = cfg.resource.send_buffer;
    ccfg.resync_rate = cfg.resource.resync_rate();
    ccfg.congestion = cfg.resource.congestion();
    ccfg.after_sb_0pri = cfg.resource.after_sb_0pri;
    ccfg.after_sb_1pri = cfg.resource.after_sb_1pri;
    ccfg.csums = cfg.resource.csums;
    ccfg.al_updates = cfg.resource.al_updates;
    ccfg.bitmap_block = store.layout().bitmap_block;
    // In node-id order (see `node_id`): the split-brain report names the nodes.
    ccfg.node_names = cfg.nodes.iter().map(|n| n.name.clone()).collect();
    ccfg.al_extents = store.layout().al_extents as usize;
    if cfg.resource.on_peer_lost.is_some() {
        ccfg.fencing = core::Fencing::FreezeUntilFenced;
    }
    info!(
        meta = %me.meta.display(),
        current_gen = restored.meta.current_gen,
        disk = ?restored.meta.disk,
        crashed_primary = restored.meta.primary,
        dirty_words = restored.bitmap.iter().filter(|w| **w != 0).count(),
        al_extents = restored.activity_log.len(),
        "metadata loaded"
    );
    let replica = Replica::restore(ccfg, restored);
    let link = PeerLink::bind(link_cfg)?;

    // Operations: metrics (if configured) and the events objects.
    let peer_name = cfg
        .nodes
        .iter()
        .find(|n| n.name != me.name)
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let (metrics, registry) = crate::metrics::Metrics::new(&resource, name);
    let metrics_task = match me.metrics {
        Some(addr) => {
            let l = crate::metrics::bind(addr).await?;
            info!(resource = %resource, node = %name, "metrics on http://{addr}/metrics");
            Some(tokio::spawn(crate::metrics::serve(l, Arc::new(registry))))
        }
        None => None,
    };
    let latency = super::timing::Recorder::new(&metrics);
    let obs = super::Observe::with_metrics(
        &resource,
        name,
        &peer_name,
        cfg.resource.send_buffer,
        metrics.clone(),
    );

    let (tx, rx) = mpsc::unbounded_channel();
    let clients = super::frontend::Clients::notifying(tx.clone());
    // Until the event loop's first step says the role.
    clients.set_refusal(Some(format!(
        "{resource} on {name} is starting: try again in a moment"
    )));
    let node = Node {
        replica,
        disk: disk.clone(),
        store,
        al_writer: std::sync::Arc::new(std::sync::Mutex::new(al_writer)),
        protocol: pname,
        tx: tx.clone(),
        start: Instant::now(),
        clients: Default::default(),
        admins: HashMap::new(),
        next_req: 1,
        next_tag: 1,
        next_conn: 0,
        current: None,
        link,
        connector: None,
        last_conn_error: None,
        user_disconnected: false,
        retry_pending: false,
        retry_after: cfg.resource.connect_retry,
        events: VecDeque::new(),
        out: Vec::new(),
        obs,
        peer_lost: super::hook::PeerLost::new(
            cfg.resource.on_peer_lost.clone(),
            resource.clone(),
            cfg.nodes
                .iter()
                .find(|n| n.name != me.name)
                .map(|n| n.name.clone())
                .unwrap_or_default(),
        ),
        nbd_clients: clients.clone(),
        stopped: None,
        timing: super::timing::Timing::new(latency.clone(), protocol == core::Protocol::Sync),
        poll: super::poll::Poller::from_env(super::poll::Stats::of(&metrics)),
        idle: super::idle_poll::IdlePoll::open(
            cfg.resource.idle_poll,
            super::idle_poll::Stats::of(&metrics),
        ),
    };
    // Ends (with an error) when the event loop task does, whether it returned or panicked.
    let (loop_alive, mut loop_ended) = oneshot::channel::<()>();
    let event_loop = tokio::spawn(async move {
        let _alive = loop_alive;
        node.run(rx).await
    });

    let (down_tx, mut down_rx) = watch::channel(false);
    let ublk_device = Arc::new(std::sync::OnceLock::new());
    let admin_listener = control::bind(&me.admin)?;
    let admin = tokio::spawn(control::serve(
        admin_listener,
        Arc::new(Admin {
            tx: tx.clone(),
            down: down_tx,
            resource: resource.clone(),
            node: name.to_owned(),
            metrics,
            ublk_device: ublk_device.clone(),
            clients: clients.clone(),
            config: cfg.source.clone(),
            running: tokio::sync::Mutex::new(cfg.clone()),
        }),
    ));

    let backend = Replicated {
        tx: tx.clone(),
        disk: disk.clone(),
        clients,
        latency,
    };
    let ublk_backend = backend.clone();
    let server = Server::new(backend, resource.clone(), format!("twinblk {resource}"));
    let mut sigterm = signal(SignalKind::terminate()).map_err(UpError::Runtime)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(UpError::Runtime)?;
    let listener = bind(&me.nbd).await?;
    let shown = match &listener {
        Listener::Tcp(l) => l
            .local_addr()
            .map(|a| format!("tcp:{a}"))
            .unwrap_or_else(|_| me.nbd.to_string()),
        Listener::Unix(..) => me.nbd.to_string(),
    };
    info!(
        resource = %resource,
        node = %name,
        "up: {} ({}), NBD on {shown}, admin socket {}",
        me.disk.display(),
        crate::meta::dump::human_bytes(disk.size()),
        me.admin.display()
    );
    let ublk = match me.frontend {
        Frontend::Nbd => None,
        Frontend::Ublk => {
            match UblkFrontend::start(ublk_backend, me.ublk_queues, me.ublk_depth).await {
                Ok(u) => {
                    info!(resource = %resource, "ublk device {}", u.device);
                    // Scripts wait for this line.
                    crate::serve::announce(&format!("ublk device {}", u.device));
                    let _ = ublk_device.set(u.device.clone());
                    Some(u)
                }
                Err(e) => {
                    admin.abort();
                    let _ = std::fs::remove_file(&me.admin);
                    return Err(e.into());
                }
            }
        }
    };
    // Tests and scripts wait for this line.
    crate::serve::announce(&format!("listening on {shown}"));
    // The NBD socket is bound and listening: connections are accepted from here on.
    super::notify::notify("READY=1");

    crate::serve::serve_until(listener, server, async {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("SIGINT: shutting down"),
            _ = down_rx.wait_for(|d| *d) => info!("twinblk down: shutting down"),
            // Before a shutdown the event loop only ends by a bug (a panic): every request
            // would then wait for it forever, so stop serving (clients see the connection
            // close) and exit with an error for the supervisor to restart us.
            _ = &mut loop_ended => error!(
                "the replication event loop stopped unexpectedly (a bug; see the lines \
                 above): shutting down so no client waits for it"
            ),
        }
        // Tell systemd at once: the drain that follows may take a while.
        super::notify::notify("STOPPING=1");
    })
    .await;
    // The device goes before the event loop: its requests in flight are answered first.
    let ublk_stopped = match ublk {
        Some(u) => u.stop().await,
        None => Ok(()),
    };
    // Every accepted request got its answer before serve_until returned.
    let (reply, done) = oneshot::channel();
    let result = if tx.send(Input::Shutdown { reply }).is_ok() {
        done.await
            .unwrap_or_else(|_| Err("the event loop stopped early".into()))
    } else {
        Err("the event loop stopped early".into())
    };
    admin.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&me.admin);
    let _ = event_loop.await;
    result.map_err(UpError::Shutdown)?;
    ublk_stopped?;
    info!("disk flushed, metadata saved; exiting");
    Ok(())
}
