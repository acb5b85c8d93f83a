//! The per-resource driver (`twinblk up`): one tokio event loop owns the [`Replica`], feeds it
//! events and executes its actions in order (see the driver contract in `core`).
//!
//! * `frontend`: the replicated device the NBD server serves (requests → core events).
//! * `io`: `Disk*` actions on the local disk, answered as `DiskDone`.
//! * `peer`: the current QUIC connection (`PeerMsg` → stream writers; frames read and decoded
//!   by the event loop itself).
//! * `admin`: the admin socket handler (`twinblk status`, `primary`, …).
//! * `hook`: runs the `on-peer-lost` hook when the core asks to fence the peer
//!   (`Action::FencePeer`), and reports its exit (`Event::Fenced`).
//! * `SaveMeta` / `SaveBitmap` go to the node's [`MetaStore`] (meta/), synchronously: each is
//!   durable before the next action runs (a failed one stops the daemon). `SaveActivityLog`
//!   (data-disk sync, then the transaction) runs on a blocking thread and is answered as
//!   `DiskDone`, an error included (the core then fails the disk).
//! * `daemon`: process setup, listeners and signals. The graceful shutdown is the core's
//!   (`Event::Stop` ... `Action::Stopped`): the driver only stops its clients first, then
//!   executes what the core decides and exits.
//! * `events`: the `twinblk events` objects and their bounded broadcast.
//! * `notify`: systemd readiness (sd_notify).

mod admin;
mod change;
pub mod daemon;
pub mod events;
mod frontend;
mod hook;
mod idle_poll;
mod io;
pub mod notify;
mod peer;
mod poll;
mod timing;

use crate::idmap::IdMap;
use std::collections::{HashMap, VecDeque};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

pub use frontend::{Errno, Replicated};

use crate::core::{
    Action, AdminCmd, AdminError, Event, IoId, LinkLoss, PeerMsg, Replica, ReqId, StateChange,
    StopOutcome, TimerKind,
};
use crate::disk::Disk;
use crate::meta::{AlWriter, MetaError, MetaStore};
use crate::net::{Connector, PeerConn, PeerLink};
use frontend::{ClientOp, ClientReply};
use peer::Current;

/// State changes kept for `status`.
const KEEP_EVENTS: usize = 32;
/// At most one resync progress line in the log per this interval.
const PROGRESS_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Everything the event loop reacts to.
pub(super) enum Input {
    Client {
        op: ClientOp,
        reply: oneshot::Sender<Answer>,
        /// When the frontend parsed it (latency breakdown).
        at: Option<Instant>,
    },
    DiskDone {
        io: IoId,
        result: Result<Option<Bytes>, i32>,
    },
    Peer {
        conn: u64,
        msg: PeerMsg,
        /// When its frame was read (latency breakdown).
        at: Option<Instant>,
    },
    ConnDown {
        conn: u64,
        reason: LinkLoss,
    },
    Timer(TimerKind),
    /// Time to connect again after a refusal.
    Retry,
    Admin {
        cmd: AdminCmd,
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    Status {
        reply: oneshot::Sender<serde_json::Value>,
    },
    /// `status --latency`: the breakdown over the last `seconds`.
    Latency {
        seconds: u64,
        reply: oneshot::Sender<serde_json::Value>,
    },
    /// Subscribe to the events stream; with `now`, also the current objects as `exists`
    /// lines (taken in the same step, so nothing falls between them and the stream).
    Events {
        now: bool,
        reply: oneshot::Sender<(
            tokio::sync::broadcast::Receiver<serde_json::Value>,
            Vec<serde_json::Value>,
        )>,
    },
    /// The `on-peer-lost` hook finished.
    Hook(hook::Report),
    /// `twinblk adjust`: apply these settings, all or none.
    Adjust {
        adjust: Adjust,
        reply: oneshot::Sender<Result<(), AdjustError>>,
    },
    /// An NBD client opened the export (`name`: its address).
    FrontendOpened {
        client: u64,
        name: String,
    },
    FrontendClosed {
        client: u64,
    },
    /// `twinblk down` (the clients are stopped): the core's graceful stop, then answer and exit.
    Shutdown {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Why `twinblk adjust` applied nothing: the core refused (its [`AdminError`] keeps the stable
/// code for the admin reply), or the driver's own settings cannot be applied.
#[derive(Debug)]
pub(super) enum AdjustError {
    Core(AdminError),
    Driver(String),
}

impl AdjustError {
    /// The admin reply's `code`: the core's refusals have one.
    pub fn code(&self) -> Option<crate::core::AdminErrorCode> {
        match self {
            AdjustError::Core(e) => Some(e.code()),
            AdjustError::Driver(_) => None,
        }
    }
}

impl std::fmt::Display for AdjustError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdjustError::Core(e) => e.fmt(f),
            AdjustError::Driver(e) => f.write_str(e),
        }
    }
}

/// What `twinblk adjust` changes in a running daemon: the core's settings through the core
/// (it owns every policy), the transport's and the hook's here in the driver.
pub(super) struct Adjust {
    pub core: crate::core::Adjustable,
    /// `timeout`, `ping-interval`, `connect-retry`, `window`.
    pub link: crate::net::Live,
    pub on_peer_lost: Option<std::path::PathBuf>,
    /// `idle-poll` (zero: off).
    pub idle_poll: std::time::Duration,
}

struct Node {
    replica: Replica,
    disk: Disk,
    store: MetaStore,
    /// Activity-log transactions run on a blocking thread, one at a time (the core's group
    /// commit), while the event loop goes on.
    al_writer: std::sync::Arc<std::sync::Mutex<AlWriter>>,
    protocol: &'static str,
    tx: mpsc::UnboundedSender<Input>,
    start: Instant,
    clients: IdMap<ReqId, oneshot::Sender<Answer>>,
    admins: HashMap<u64, oneshot::Sender<Result<(), AdminError>>>,
    next_req: ReqId,
    next_tag: u64,
    next_conn: u64,
    current: Option<Current>,
    link: PeerLink,
    connector: Option<Connector>,
    last_conn_error: Option<String>,
    /// The operator said `disconnect`: do not reconnect on our own.
    user_disconnected: bool,
    retry_pending: bool,
    retry_after: std::time::Duration,
    events: VecDeque<serde_json::Value>,
    out: Vec<Action>,
    obs: Observe,
    peer_lost: hook::PeerLost,
    /// The NBD clients of the export (shared with the NBD server and the admin handler).
    nbd_clients: frontend::Clients,
    /// The core's `Action::Stopped`: the event loop ends after this batch.
    stopped: Option<StopOutcome>,
    /// The latency breakdown's per-write instants.
    timing: timing::Timing,
    /// Spins instead of sleeping while few writes are in flight, where that pays (`poll`).
    poll: poll::Poller,
    /// Keeps idle CPUs polling while replicated writes flow (`idle_poll`, `idle-poll`).
    idle: idle_poll::IdlePoll,
}

/// A client request's answer, and (for a timed write) when the core completed it: the
/// frontend times its own answer from there.
pub(super) type Answer = (ClientReply, Option<Instant>);

/// What the operations side watches: the events broadcast and the metrics, plus the driver's
/// own bookkeeping for numbers the core does not keep (latencies, bytes in flight).
pub(super) struct Observe {
    pub node: String,
    pub peer: String,
    pub bus: events::Bus,
    pub metrics: crate::metrics::Metrics,
    /// Client writes in flight: when they were submitted.
    pub writes: IdMap<ReqId, Instant>,
    /// Local disk writes in flight: when they were started.
    pub disk_writes: IdMap<IoId, Instant>,
    /// Write extents sent to the peer and not yet acked: their payload size.
    pub unacked: IdMap<u64, u64>,
    pub send_buffer: u64,
    /// An Emit happened in the current batch: refresh the objects once it is done.
    pub dirty: bool,
    /// (when, resync bytes counter) at the last rate sample.
    pub rate_sample: (Instant, u64),
    /// Why the last established connection ended (not refusals: those are the core's
    /// `last_refusal`); cleared by the next connection.
    pub conn_lost: Option<String>,
    /// When the last resync progress line was logged.
    pub progress_logged: Option<Instant>,
}

impl Observe {
    pub fn with_metrics(
        resource: &str,
        node: &str,
        peer: &str,
        send_buffer: u64,
        metrics: crate::metrics::Metrics,
    ) -> Observe {
        metrics.send_buffer_bytes.set(send_buffer as i64);
        Observe {
            node: node.to_owned(),
            peer: peer.to_owned(),
            bus: events::Bus::new(resource, node),
            metrics,
            writes: IdMap::default(),
            disk_writes: IdMap::default(),
            unacked: IdMap::default(),
            send_buffer,
            dirty: true,
            rate_sample: (Instant::now(), 0),
            conn_lost: None,
            progress_logged: None,
        }
    }
}

impl Node {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn feed(&mut self, ev: Event) {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let now = self.now();
        self.timing.batch();
        self.replica.handle(ev, now, &mut out);
        for a in out.drain(..) {
            self.execute(a);
        }
        self.out = out;
        if self.obs.dirty {
            self.refresh();
        }
    }

    fn execute(&mut self, mut a: Action) {
        let mut after_send = false;
        match &mut a {
            Action::DiskWrite { io, offset, .. } => {
                self.obs.disk_writes.insert(*io, Instant::now());
                let origin = self.replica.io_origin(*io);
                self.timing.disk_submit(origin, *io, *offset);
                // A sync client write with a peer: its extent (the next action) goes on the wire
                // first, because the peer's path (the link, its disk, the ack back) is the longer
                // one the client waits for. An async write waits only for the local disk, so
                // that goes first (the submit is a VM exit here: 10-40 µs).
                after_send = matches!(origin, Some(crate::core::IoOrigin::Client(_)))
                    && self.current.is_some()
                    && self.replica.config().protocol == crate::core::Protocol::Sync;
            }
            Action::DiskZero { io, offset, .. } => {
                let origin = self.replica.io_origin(*io);
                self.timing.disk_submit(origin, *io, *offset);
            }
            Action::Send(PeerMsg::Data(x)) => self.timing.sent(x.seq, x.offset),
            Action::Send(PeerMsg::WriteAck { seq, timing }) => {
                *timing = self.timing.ack_timing(*seq);
            }
            _ => {}
        }
        if io::start(&self.disk, &a, &self.tx, after_send) {
            return;
        }
        match a {
            Action::ServeRead { req, offset, len } => {
                let Some(reply) = self.clients.remove(&req) else {
                    return;
                };
                let disk = self.disk.clone();
                let errors = self.obs.metrics.io_errors.clone();
                tokio::spawn(async move {
                    let r = disk.read(offset, len).await;
                    if r.is_err() {
                        errors.inc();
                    }
                    let _ = reply.send((r.map(Some).map_err(|e| e.errno()), None));
                });
            }
            Action::Send(msg) => {
                if let Some(c) = &self.current {
                    if let PeerMsg::Data(x) = &msg {
                        self.obs.unacked.insert(x.seq, x.data.len() as u64);
                    }
                    if let Some(n) = msg.resync_payload_bytes() {
                        self.obs.metrics.resync_bytes.inc_by(n);
                    }
                    c.send(&msg);
                }
            }
            Action::CompleteClient { req, result } => {
                if let Some(t) = self.obs.writes.remove(&req) {
                    self.obs
                        .metrics
                        .write_latency
                        .observe(t.elapsed().as_secs_f64());
                }
                if result.is_err() {
                    self.obs.metrics.io_errors.inc();
                }
                let done = self.timing.complete(req);
                if let Some(reply) = self.clients.remove(&req) {
                    let _ = reply.send((result.map(|()| None), done));
                }
            }
            Action::ArmTimer { kind, at } => {
                let delay = std::time::Duration::from_nanos(at.saturating_sub(self.now()));
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(Input::Timer(kind));
                });
            }
            Action::Emit(change) => self.emit(change),
            // Durable before the next action runs: the core relies on it.
            Action::SaveMeta(meta) => {
                let r = self.store.save_meta(&meta);
                self.saved(r);
            }
            Action::SaveBitmap { first_word, words } => {
                let r = self.store.save_bitmap(first_word, &words);
                self.saved(r);
            }
            Action::SaveActivityLog { io, extents } => {
                let (disk, al, tx) = (self.disk.clone(), self.al_writer.clone(), self.tx.clone());
                tokio::task::spawn_blocking(move || {
                    // The contract: completed writes are stable before a transaction drops
                    // their extent from the log, or a crash could lose a write no bitmap names.
                    // Either step failing is the core's to handle (it fails the writes waiting
                    // for the log and stops using the disk); exiting here instead would cut an
                    // async Primary's handover of its writes short.
                    let result = match disk.sync_now() {
                        Err(e) => {
                            tracing::error!("{e}: the activity-log transaction fails");
                            Err(e.errno())
                        }
                        Ok(()) => {
                            let r = match al.lock() {
                                Ok(mut w) => w.save(&extents),
                                Err(p) => p.into_inner().save(&extents),
                            };
                            r.map(|()| None).map_err(|e| {
                                tracing::error!("{e}: the activity-log transaction fails");
                                e.errno()
                            })
                        }
                    };
                    let _ = tx.send(Input::DiskDone { io, result });
                });
            }
            Action::SyncData => {
                // A promotion's metadata follows: the new Primary must not serve peer or
                // resync writes a crash could still take back.
                if let Err(e) = self.disk.sync_now() {
                    tracing::error!("{e}; stopping before the promotion is saved");
                    std::process::exit(1);
                }
            }
            Action::CloseConnection { conn, reason }
                if self.current.as_ref().is_some_and(|c| c.id == conn) =>
            {
                if let Some(c) = self.current.take() {
                    let text = reason.to_string();
                    if self.replica.status().stopping {
                        // The stop's drain is over (the peer has what it acked, the rest is
                        // in the bitmap) and the endpoint closes next: say why now.
                        c.close(&text);
                    } else {
                        c.close_after_queued(&text);
                    }
                }
                self.last_conn_error = Some(reason.to_string());
            }
            Action::AdminDone { tag, result } => {
                if let Some(reply) = self.admins.remove(&tag) {
                    let _ = reply.send(result);
                }
            }
            Action::FencePeer { episode, attempt } => {
                self.peer_lost.run(episode, attempt, &self.tx)
            }
            Action::Stopped(outcome) => self.stopped = Some(outcome),
            // Disk actions were started above (`io::start`); a close for a connection that is
            // no longer the current one has nothing left to close.
            Action::DiskWrite { .. }
            | Action::DiskTrim { .. }
            | Action::DiskZero { .. }
            | Action::DiskFlush { .. }
            | Action::DiskRead { .. }
            | Action::CloseConnection { .. } => {}
        }
    }

    fn saved(&self, r: Result<(), MetaError>) {
        if let Err(e) = r {
            // Going on could let data reach the disk that the saved state does not cover;
            // stop instead (the supervisor restarts us with the last durable metadata).
            tracing::error!("{e}; stopping so no action runs without its metadata");
            std::process::exit(1);
        }
    }

    fn emit(&mut self, change: StateChange) {
        self.obs.dirty = true;
        self.obs.metrics.state_changes.inc();
        let described = change::describe(&change, self.replica.config().bitmap_block);
        // Progress comes once per percent whatever the resync's length: a line every 10 s is
        // enough for a log (status, events and metrics have every step).
        let quiet = matches!(change, StateChange::ResyncProgress { .. })
            && self
                .obs
                .progress_logged
                .is_some_and(|t| t.elapsed() < PROGRESS_LOG_EVERY);
        if !quiet {
            if matches!(change, StateChange::ResyncProgress { .. }) {
                self.obs.progress_logged = Some(Instant::now());
            }
            log_change(&self.replica.config().resource, &self.obs.node, &described);
        }
        if let StateChange::ConnectionLost { reason } = &change {
            self.last_conn_error = Some(reason.to_string());
            self.obs.conn_lost = Some(reason.to_string());
        }
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.events.len() == KEEP_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(described.json(at));
    }

    fn client(&mut self, op: ClientOp, reply: oneshot::Sender<Answer>, at: Option<Instant>) {
        let req = self.next_req;
        self.next_req += 1;
        self.clients.insert(req, reply);
        let m = &self.obs.metrics;
        match &op {
            ClientOp::Write { data, .. } => {
                m.writes.inc();
                m.write_bytes.inc_by(data.len() as u64);
                self.obs.writes.insert(req, Instant::now());
                self.timing.client_write(req, at);
            }
            ClientOp::Read { len, .. } => {
                m.reads.inc();
                m.read_bytes.inc_by(u64::from(*len));
            }
            ClientOp::Flush => {
                m.flushes.inc();
            }
            ClientOp::Trim { .. } | ClientOp::Zero { .. } => {
                m.trims.inc();
            }
        }
        let ev = match op {
            ClientOp::Write { offset, data, fua } => Event::ClientWrite {
                req,
                offset,
                data,
                fua,
            },
            ClientOp::Trim { offset, len } => Event::ClientTrim { req, offset, len },
            ClientOp::Zero { offset, len } => Event::ClientWriteZeroes { req, offset, len },
            ClientOp::Flush => Event::ClientFlush { req },
            ClientOp::Read { offset, len } => Event::ClientRead { req, offset, len },
        };
        self.feed(ev);
    }

    fn connected(&mut self, conn: PeerConn) {
        if let Some(old) = self.current.take() {
            old.close("replaced by a newer connection");
            let conn = old.id;
            self.feed(Event::ConnectionDown {
                conn,
                reason: LinkLoss::Replaced,
            });
        }
        self.obs.unacked.clear();
        self.obs.conn_lost = None;
        self.timing.connection_changed();
        self.next_conn += 1;
        let id = self.next_conn;
        info!(conn = id, peer = %conn.peer, remote = %conn.remote_addr, "peer connected");
        self.current = Some(Current::start(id, conn));
        self.feed(Event::ConnectionUp { conn: id });
    }

    /// Run the connector while the core wants a connection. After a refusal the core stands
    /// alone; unless the operator said `disconnect`, try again after `connect-retry` (the
    /// cause, e.g. no UpToDate node yet, may be gone by then; a split brain is refused again
    /// before any data moves). Meanwhile the accepting side keeps accepting (not after a split
    /// brain or `disconnect`): the dialer reconnects as soon as it is promoted, and the first
    /// full sync after `primary --force` then starts at once, not up to `connect-retry` later.
    fn sync_connector(&mut self) {
        let s = self.replica.status();
        let want = s.want_connection;
        let listen =
            !want && !self.user_disconnected && s.split_brain.is_none() && !self.link.dials();
        if !want && !self.user_disconnected && !self.retry_pending {
            self.retry_pending = true;
            let tx = self.tx.clone();
            let delay = self.retry_after;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(Input::Retry);
            });
        }
        if (want || listen) && self.connector.is_none() {
            self.connector = Some(self.link.connector());
        } else if !(want || listen) && self.connector.is_some() {
            self.connector = None;
        }
    }

    fn status_json(&self) -> serde_json::Value {
        let s = self.replica.status();
        // Bytes per bitmap bit: chosen at create-md.
        let block = self.replica.config().bitmap_block;
        let conn = self.connector.as_ref().map(|c| c.status());
        let resync = s.resync.map(|(left, total)| {
            let done = if total == 0 {
                100.0
            } else {
                100.0 * (total - left) as f64 / total as f64
            };
            json!({
                "blocks_left": left,
                "blocks_total": total,
                "percent": done,
                "out_of_sync_bytes": left.saturating_mul(block),
                "rate_bytes_per_sec": s.resync_rate,
                "eta_secs": s.resync_eta_secs,
            })
        });
        // The open connection's `timeout` (an adjusted one applies from the next).
        let peer_timeout_secs = self
            .current
            .as_ref()
            .map_or(self.link.live().idle_timeout, |c| c.timeout)
            .as_secs();
        let last_refusal = s.last_refusal.as_ref().map(|r| r.to_string());
        let mut status = json!({
            "resource": self.replica.config().resource,
            "protocol": self.protocol,
            "size": self.replica.config().size,
            "role": format!("{:?}", s.role),
            "disk": format!("{:?}", s.disk),
            "disk_failure": s.disk_failure.map(|f| f.to_string()),
            "repl": format!("{:?}", s.repl),
            "peer_role": s.peer_role.map(|r| format!("{r:?}")),
            "peer_disk": s.peer_disk.map(|d| format!("{d:?}")),
            "current_gen": s.current_gen,
            "out_of_sync_bytes": out_of_sync_blocks(&s).saturating_mul(block),
            "resync": resync,
            // The resync rate limit in effect (`c-max-rate`; `twinblk adjust` changes it live).
            "c_max_rate": self.replica.config().resync_rate.max_rate,
            "want_connection": s.want_connection,
            "connected": self.current.is_some(),
            // A dead peer still looks connected until `timeout` passes without a word.
            "peer_last_heard_secs": self.current.as_ref().map(|c| c.last_heard().as_secs()),
            "peer_timeout_secs": peer_timeout_secs,
            "last_refusal": last_refusal,
            "last_connection_error": conn.and_then(|c| c.last_error).or_else(|| self.last_conn_error.clone()),
            "last_auth_error": self.link.last_auth_error(),
            "requests_in_flight": s.requests_in_flight,
            "peer_unacked": s.peer_unacked,
            "events": self.events,
            "split_brain": s.split_brain.as_ref().map(|sb| json!({
                "reason": sb.reason.to_string(),
                "node_id": sb.node_id,
                "peer_node_id": sb.peer_node_id,
                "current_gen": format!("{:#x}", sb.current_gen),
                "peer_current_gen": format!("{:#x}", sb.peer_current_gen),
                "common_gen": sb.common_gen.map(|g| format!("{g:#x}")),
                "changed_blocks": sb.changed_blocks,
                "changed_bytes": sb.changed_blocks.saturating_mul(block),
                "peer_changed_blocks": sb.peer_changed_blocks,
                "peer_changed_bytes": sb.peer_changed_blocks.saturating_mul(block),
                "keep_this_nodes_data": sb.keep_mine,
                "keep_peers_data": sb.keep_peers,
            })),
            "discard_my_data": s.discard_my_data,
            "generations": {
                "current": format!("{:#x}", s.current_gen),
                "bitmap": s.bitmap_gen.map(|g| format!("{g:#x}")),
                "history": s.history.map(|g| format!("{g:#x}")),
            },
            "peer_lost_hook": self.peer_lost.status(s.frozen.as_ref()),
            "verify": s.verify.as_ref().map(|v| json!({
                "run": v.run,
                "side": format!("{:?}", v.side),
                "running": v.running,
                "percent": if v.total_bytes == 0 { 100.0 } else {
                    100.0 * v.checked_bytes as f64 / v.total_bytes as f64
                },
                "checked_bytes": v.checked_bytes,
                "total_bytes": v.total_bytes,
                "differing_blocks": v.differing_blocks,
                "differing_bytes": v.differing_blocks.saturating_mul(block),
                "first_ranges": v.first_ranges.iter()
                    .map(|&(offset, bytes)| json!({"offset": offset, "bytes": bytes}))
                    .collect::<Vec<_>>(),
                "aborted": v.aborted.as_ref().map(ToString::to_string),
                // Its stable name, for scripts (the text is for people): `by-peer` when the
                // peer stopped it, with the peer's own code next to it.
                "aborted_code": v.aborted.as_ref().map(crate::core::VerifyAbort::code),
                "aborted_peer_code": match &v.aborted {
                    Some(crate::core::VerifyAbort::ByPeer { code, .. }) => Some(code.as_str()),
                    _ => None,
                },
            })),
        });
        // Outside the macro: one more key there passes its recursion limit.
        status["settings"] = self.settings_json();
        // The refusal's stable name, for scripts (the text is for people).
        status["last_refusal_code"] = s.last_refusal.as_ref().map(|r| r.code()).into();
        // A refusal by the peer: the peer's own code (the wire carries it).
        let peer_code = if let Some(crate::core::Refusal::ByPeer { code, .. }) = &s.last_refusal {
            Some(code.as_str())
        } else {
            None
        };
        status["last_refusal_peer_code"] = peer_code.into();
        status["handover"] = s
            .handover
            .map(|h| json!({"state": h.name(), "message": h.to_string()}))
            .into();
        status
    }

    /// `status --json`'s `settings`: what is in effect now for the keys `adjust` changes
    /// live, read back from where each lives (the core's config, the link, the hook).
    fn settings_json(&self) -> serde_json::Value {
        let c = self.replica.config();
        let live = self.link.live();
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        json!({
            "timeout_ms": ms(live.idle_timeout),
            "ping_interval_ms": ms(live.keep_alive),
            "connect_retry_ms": ms(self.retry_after),
            "window": live.window,
            "after_sb_0pri": crate::config::after_sb_0pri_name(c.after_sb_0pri),
            "after_sb_1pri": crate::config::after_sb_1pri_name(c.after_sb_1pri),
            "on_peer_lost": self.peer_lost.command().map(|p| p.display().to_string()),
            "fencing": c.fencing == crate::core::Fencing::FreezeUntilFenced,
            "c_max_rate": c.resync_rate.max_rate,
            "c_fill_target": c.resync_rate.fill_target,
            "c_plan_ahead_ms": c.resync_rate.plan_ahead / 1_000_000,
            "idle_poll_ms": ms(self.idle.linger()),
            "idle_poll_active": self.idle.active(),
            "c_min_rate": c.resync_rate.min_rate,
        })
    }

    /// `twinblk adjust`: everything that can fail is checked before anything changes, so a
    /// refusal applies nothing. The core goes first: it may refuse (e.g. turning fencing off
    /// while writes are frozen); the driver's own settings follow.
    fn adjust(&mut self, a: Adjust) -> Result<(), AdjustError> {
        let retune = self
            .link
            .prepare_retune(a.link)
            .map_err(|e| AdjustError::Driver(e.to_string()))?;
        let (tx, mut rx) = oneshot::channel();
        let tag = self.next_tag;
        self.next_tag += 1;
        self.admins.insert(tag, tx);
        self.feed(Event::Admin {
            tag,
            cmd: AdminCmd::Adjust(a.core),
        });
        // The core answers an adjust within the step that received it.
        match rx.try_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(AdjustError::Core(e)),
            Err(_) => {
                return Err(AdjustError::Driver(
                    "the core did not answer the adjust".into(),
                ))
            }
        }
        self.link.retune(retune);
        self.retry_after = a.link.retry_max;
        self.peer_lost.set_command(a.on_peer_lost);
        self.idle.set_linger(a.idle_poll);
        Ok(())
    }

    fn event_objects(
        &self,
        s: &crate::core::Status,
    ) -> [serde_json::Map<String, serde_json::Value>; 4] {
        events::objects(&events::View {
            status: s,
            peer: &self.obs.peer,
            conn_error: self.obs.conn_lost.as_deref(),
        })
    }

    /// Rebuild the events objects (broadcasting what changed) and the state gauges.
    fn refresh(&mut self) {
        self.obs.dirty = false;
        let s = self.replica.status();
        let resource = &self.replica.config().resource;
        self.nbd_clients
            .set_refusal((s.role != crate::core::Role::Primary).then(|| {
                format!(
                "{resource} is {:?} on {}: only the Primary serves it; connect to the Primary, or \
                 promote this node first (`twinblk primary {resource}`)",
                s.role, self.obs.node
            )
            }));
        let objects = self.event_objects(&s);
        self.obs.bus.update(objects);
        let m = &self.obs.metrics;
        use crate::metrics::Metrics as M;
        M::set_state(&m.role, "role", Some(&format!("{:?}", s.role)));
        M::set_state(&m.disk_state, "state", Some(&format!("{:?}", s.disk)));
        M::set_state(
            &m.replication_state,
            "state",
            Some(&format!("{:?}", s.repl)),
        );
        M::set_state(
            &m.peer_role,
            "role",
            s.peer_role.map(|r| format!("{r:?}")).as_deref(),
        );
        M::set_state(
            &m.peer_disk_state,
            "state",
            s.peer_disk.map(|d| format!("{d:?}")).as_deref(),
        );
        m.connected.set(i64::from(self.current.is_some()));
        let block = self.replica.config().bitmap_block;
        m.out_of_sync_bytes
            .set(i64::try_from(out_of_sync_blocks(&s).saturating_mul(block)).unwrap_or(i64::MAX));
        if s.peer_unacked == 0 {
            // Acks that never came (a connection that ended) must not count forever.
            self.obs.unacked.clear();
        }
        let inflight: u64 = self.obs.unacked.values().sum();
        m.peer_inflight_requests.set(s.peer_unacked as i64);
        m.peer_inflight_bytes.set(inflight as i64);
        m.send_buffer_fill.set(if self.obs.send_buffer == 0 {
            0.0
        } else {
            inflight as f64 / self.obs.send_buffer as f64
        });
        m.client_requests_in_flight.set(s.requests_in_flight as i64);
        m.resync_remaining_bytes
            .set(s.resync.map_or(0, |(left, _)| {
                i64::try_from(left.saturating_mul(block)).unwrap_or(i64::MAX)
            }));
        m.split_brain.set(i64::from(events::split_brain(&s)));
        m.may_promote.set(i64::from(events::may_promote(&s)));
    }

    /// Once a second: resync rate, and the objects (resync progress shows as `done:`).
    fn tick(&mut self) {
        // Sampled every second, so `status` dates the last datagram to within a second.
        if let Some(c) = &self.current {
            c.last_heard();
        }
        let now = Instant::now();
        let bytes = self.obs.metrics.resync_bytes.get();
        let (then, before) = self.obs.rate_sample;
        let secs = now.duration_since(then).as_secs_f64();
        if secs > 0.0 {
            self.obs
                .metrics
                .resync_rate
                .set(bytes.saturating_sub(before) as f64 / secs);
        }
        self.obs.rate_sample = (now, bytes);
        self.refresh();
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        // `up` means attach and connect, as in DRBD.
        self.next_tag += 1;
        self.feed(Event::Admin {
            tag: 0,
            cmd: AdminCmd::Connect,
        });
        // Set by Shutdown: answered once the core's stop is over.
        let mut stopping: Option<oneshot::Sender<Result<(), String>>> = None;
        let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The idle poll's release check, running while the request is held: set when it is
        // taken, moved at each deadline while write events keep coming (not at every event:
        // see `idle_poll`).
        let mut linger = std::pin::pin!(tokio::time::sleep(std::time::Duration::ZERO));
        loop {
            if let Some(outcome) = self.stopped.take() {
                if let Some(c) = self.current.take() {
                    c.close("the peer is shutting down (twinblk down)");
                }
                self.link.close("shutting down");
                if matches!(outcome.drain, crate::core::Drain::Expired { .. }) {
                    warn!("{}", outcome.drain);
                } else {
                    info!("stopped: {}", outcome.drain);
                }
                if self.poll.enabled() {
                    let p = &self.poll.stats;
                    info!(
                        hits = p.hits.get(),
                        misses = p.misses.get(),
                        contended = p.contended.get(),
                        rounds = p.rounds.get(),
                        "busy-poll"
                    );
                }
                let r = outcome.persisted.map_err(|e| e.to_string());
                if let Some(reply) = stopping.take() {
                    let _ = reply.send(r);
                }
                return;
            }
            if stopping.is_none() {
                self.sync_connector();
            }
            let poll = self.poll.enabled() && {
                // Writes in flight at this node: a Primary's client writes, its extents not yet
                // acked, either node's disk writes.
                let depth = self
                    .obs
                    .writes
                    .len()
                    .max(self.obs.disk_writes.len())
                    .max(self.obs.unacked.len());
                self.poll.active(depth, Instant::now())
            };
            let reading = self.current.as_ref().is_some_and(Current::reading);
            let input = tokio::select! {
                i = rx.recv() => match i {
                    Some(i) => i,
                    None => return,
                },
                // The peer's messages, read here rather than forwarded by a task (see
                // `Current::recv`); `None` (the streams ended) leaves the loss to come as
                // `ConnDown` on `rx`.
                Some(i) = recv_peer(&mut self.current, &self.tx), if reading => i,
                _ = ticker.tick() => {
                    self.tick();
                    continue;
                }
                Some(conn) = next_conn(&mut self.connector) => {
                    if !self.replica.status().want_connection {
                        // Accepted while standing alone (see `sync_connector`): try again now.
                        self.feed(Event::Admin {
                            tag: 0,
                            cmd: AdminCmd::Connect,
                        });
                    }
                    self.connected(conn);
                    continue;
                }
                // Busy-polling (see `poll`): round again instead of sleeping (a yield is
                // pending at its first poll, so whatever else is ready wins); to the kernel too,
                // so a client or peer process waiting for this CPU runs first.
                () = tokio::task::yield_now(), if poll => {
                    std::thread::yield_now();
                    self.poll.round();
                    continue;
                }
                () = &mut linger, if self.idle.held() => {
                    if let Some(due) = self.idle.expire(Instant::now()) {
                        linger.as_mut().reset(due.into());
                    }
                    continue;
                }
            };
            if matches!(
                input,
                Input::Client { .. } | Input::DiskDone { .. } | Input::Peer { .. }
            ) {
                let now = Instant::now();
                if self.poll.enabled() {
                    self.poll.touch(now);
                }
                if let Some(due) = self.idle.touch(now) {
                    linger.as_mut().reset(due.into());
                }
            }
            match input {
                Input::Client { op, reply, at } => self.client(op, reply, at),
                Input::DiskDone { io, result } => {
                    self.timing.disk_done(io);
                    if let Some(t) = self.obs.disk_writes.remove(&io) {
                        self.obs
                            .metrics
                            .local_write_latency
                            .observe(t.elapsed().as_secs_f64());
                    }
                    self.feed(Event::DiskDone { io, result })
                }
                Input::Peer { conn, msg, at } => {
                    match &msg {
                        PeerMsg::WriteAck { seq, timing } => {
                            self.obs.unacked.remove(seq);
                            if self.current.as_ref().is_some_and(|c| c.id == conn) {
                                self.timing.acked(*seq, at, timing);
                            }
                        }
                        PeerMsg::Data(x) if self.current.as_ref().is_some_and(|c| c.id == conn) => {
                            self.timing.apply_receive(x.seq, at)
                        }
                        _ => {}
                    }
                    if let Some(n) = msg.resync_payload_bytes() {
                        self.obs.metrics.resync_bytes.inc_by(n);
                    }
                    self.feed(Event::Peer { conn, msg })
                }
                Input::ConnDown { conn, reason } => {
                    if self.current.as_ref().is_some_and(|c| c.id == conn) {
                        self.current = None;
                        self.timing.connection_changed();
                        info!(conn, "peer connection lost: {reason}");
                        self.last_conn_error = Some(reason.to_string());
                    }
                    self.feed(Event::ConnectionDown { conn, reason });
                }
                Input::Hook(r) => {
                    self.peer_lost.record(&r);
                    self.feed(Event::Fenced {
                        episode: r.episode,
                        result: r.result,
                    });
                }
                Input::Timer(kind) => self.feed(Event::Timer(kind)),
                Input::Adjust { adjust, reply } => {
                    let r = self.adjust(adjust);
                    let _ = reply.send(r);
                }
                Input::FrontendOpened { client, name } => {
                    self.feed(Event::FrontendOpened { client, name })
                }
                Input::FrontendClosed { client } => self.feed(Event::FrontendClosed { client }),
                Input::Retry => {
                    self.retry_pending = false;
                    let s = self.replica.status();
                    // A split brain waits for the operator (or a policy): no reconnect loop.
                    if !self.user_disconnected && !s.want_connection && s.split_brain.is_none() {
                        self.feed(Event::Admin {
                            tag: 0,
                            cmd: AdminCmd::Connect,
                        });
                    }
                }
                Input::Admin { cmd, reply } => {
                    let tag = self.next_tag;
                    self.next_tag += 1;
                    self.admins.insert(tag, reply);
                    match cmd {
                        AdminCmd::Disconnect => self.user_disconnected = true,
                        AdminCmd::Connect => self.user_disconnected = false,
                        AdminCmd::Promote { .. }
                        | AdminCmd::Demote
                        | AdminCmd::Invalidate
                        | AdminCmd::DiscardMyData
                        | AdminCmd::Verify
                        | AdminCmd::Adjust(_)
                        | AdminCmd::Down => {}
                    }
                    let promote = matches!(cmd, AdminCmd::Promote { .. });
                    self.feed(Event::Admin { tag, cmd });
                    let s = self.replica.status();
                    if promote && s.role == crate::core::Role::Primary {
                        // (The core connects again after a promotion that follows a refusal.)
                        // Not connected yet: a dial in progress may be one the peer missed (it
                        // started later; QUIC's handshake retransmits back off for seconds).
                        // The promotion is when a connection matters: dial afresh.
                        if self.current.is_none() && self.link.dials() {
                            self.connector = None;
                        }
                    }
                }
                Input::Status { reply } => {
                    let _ = reply.send(self.status_json());
                }
                Input::Latency { seconds, reply } => {
                    let stages = self.timing.rec.summary(seconds);
                    let mut v =
                        crate::latency::to_json(&stages, seconds, &self.obs.node, &self.obs.peer);
                    if let Some(o) = v.as_object_mut() {
                        o.insert(
                            "role".into(),
                            json!(format!("{:?}", self.replica.status().role)),
                        );
                        o.insert("protocol".into(), json!(self.protocol));
                        o.insert("measuring".into(), json!(crate::latency::enabled()));
                        // What the transport did so far on this connection: per write, how many
                        // datagrams and QUIC ACK frames each way (small frames, ACK behaviour).
                        let m = &self.obs.metrics;
                        o.insert(
                            "quic".into(),
                            self.current.as_ref().map_or(json!(null), |c| {
                                let st = c.stats();
                                json!({
                                    "client_writes": m.writes.get(),
                                    "udp_tx_datagrams": st.udp_tx.datagrams,
                                    "udp_rx_datagrams": st.udp_rx.datagrams,
                                    "udp_tx_ios": st.udp_tx.ios,
                                    "ack_frames_tx": st.frame_tx.acks,
                                    "ack_frames_rx": st.frame_rx.acks,
                                    "stream_frames_tx": st.frame_tx.stream,
                                    "stream_frames_rx": st.frame_rx.stream,
                                    "packets_sent": st.path.sent_packets,
                                    "rtt_us": st.path.rtt.as_micros() as u64,
                                    "cwnd": st.path.cwnd,
                                    "lost_packets": st.path.lost_packets,
                                    "congestion_events": st.path.congestion_events,
                                })
                            }),
                        );
                    }
                    let _ = reply.send(v);
                }
                Input::Events { now, reply } => {
                    let rx = self.obs.bus.sender().subscribe();
                    let exists = if now {
                        let s = self.replica.status();
                        self.obs.bus.exists(&self.event_objects(&s))
                    } else {
                        Vec::new()
                    };
                    let _ = reply.send((rx, exists));
                }
                Input::Shutdown { reply } => {
                    // Stop accepting connections; the current one delivers what it was sent
                    // while the core drains it.
                    self.connector = None;
                    stopping = Some(reply);
                    self.feed(Event::Stop);
                }
            }
        }
    }
}

/// One structured log line per state change: resource, node, kind, from/to and the reason's
/// code where the change has them, and the sentence.
fn log_change(resource: &str, node: &str, c: &change::Described) {
    let (kind, from, to, code) = (c.kind, c.from.as_deref(), c.to.as_deref(), c.code);
    if c.kind == "refused" {
        warn!(resource, node, kind, from, to, code, "{}", c.text);
    } else {
        info!(resource, node, kind, from, to, code, "{}", c.text);
    }
}

/// What is out of sync, the same on both nodes: during a resync, what it has left (the
/// source's bitmap keeps a bit until the block is stable on the target, the target's loses it
/// as it writes, so neither bitmap alone follows the resync); else this node's bitmap.
fn out_of_sync_blocks(s: &crate::core::Status) -> u64 {
    match s.resync {
        Some((left, _)) => left,
        None => s.dirty_blocks,
    }
}

async fn next_conn(c: &mut Option<Connector>) -> Option<PeerConn> {
    match c {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// The current connection's next message (see [`Current::recv`]); `None` without one.
async fn recv_peer(
    c: &mut Option<Current>,
    events: &mpsc::UnboundedSender<Input>,
) -> Option<Input> {
    match c {
        Some(c) => c.recv(events).await,
        None => None,
    }
}
