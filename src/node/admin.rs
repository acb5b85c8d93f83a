//! The admin socket handler: turns `twinblk status/primary/secondary/connect/disconnect/down`
//! into event-loop inputs and answers with their result.

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::Input;
use crate::control::{Handler, Request, Response};
use crate::core::{AdminCmd, AdminErrorCode};

/// `secondary` or `down` refused before it reached the core: `/dev/ublkbN` is mounted or held
/// open. (Open NBD clients are the core's to refuse: [`crate::core::AdminError::ClientsOpen`].)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refused {
    /// `demote` or `take it down`, for the advice.
    pub action: &'static str,
    pub dev: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is in use (mounted or held open by a program): unmount it or stop the program, \
             then {} again",
            self.dev, self.action
        )
    }
}

/// How long `--force` waits for the disconnected clients' connections to end (each answers
/// what it read first, like at shutdown).
const FORCE_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub(super) struct Admin {
    pub tx: mpsc::UnboundedSender<Input>,
    /// Set by `down`: the daemon then shuts down gracefully.
    pub down: watch::Sender<bool>,
    pub resource: String,
    pub node: String,
    pub metrics: crate::metrics::Metrics,
    /// `/dev/ublkbN` once `frontend = "ublk"` created it, for `status`.
    pub ublk_device: std::sync::Arc<std::sync::OnceLock<String>>,
    pub clients: super::frontend::Clients,
    /// The resource file, re-read by `adjust`.
    pub config: std::path::PathBuf,
    /// The settings in effect (as loaded at `up`, plus what `adjust` applied).
    pub running: tokio::sync::Mutex<crate::config::Config>,
}

fn gone() -> Response {
    Response::Error {
        message: "the daemon is shutting down".into(),
        code: Some(AdminErrorCode::ShuttingDown),
    }
}

impl Admin {
    /// Like DRBD ("Device is held open by someone"): demoting or deleting `/dev/ublkbN` under a
    /// mounted filesystem would turn every later write of its users into an I/O error, so
    /// refuse (a mounted device is never forced). Whether the device is held open is only
    /// visible here; open NBD clients are counted by the core, which refuses the command.
    fn ublk_in_use(&self, action: &'static str) -> Result<(), Refused> {
        if let Some(dev) = self.ublk_device.get() {
            if super::frontend::held_open(std::path::Path::new(dev)) {
                return Err(Refused {
                    action,
                    dev: dev.clone(),
                });
            }
        }
        Ok(())
    }

    /// `--force`: disconnect the NBD clients and wait (up to [`FORCE_CLOSE_WAIT`]) for their
    /// connections to end; each close reaches the core before this returns (see
    /// `Clients::notifying`). Clients still open after that are named by the core's refusal.
    async fn disconnect_clients(&self, command: &str) {
        let clients = self.clients.open();
        if clients.is_empty() {
            return;
        }
        tracing::warn!(
            resource = %self.resource,
            clients = %clients.join(", "),
            "{command} --force: disconnecting the NBD clients"
        );
        self.clients.close_all();
        let deadline = tokio::time::Instant::now() + FORCE_CLOSE_WAIT;
        while !self.clients.open().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn admin(&self, cmd: AdminCmd, ok: &str) -> Response {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Input::Admin { cmd, reply }).is_err() {
            return gone();
        }
        match rx.await {
            Ok(Ok(())) => Response::Ok {
                message: ok.to_owned(),
            },
            Ok(Err(e)) => Response::Error {
                message: e.to_string(),
                code: Some(e.code()),
            },
            Err(_) => gone(),
        }
    }
}

/// When a changed key of the resource file takes effect in a running daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Applied now; from when, and what else to know.
    Live(&'static str),
    /// For the next connection; why not the open one.
    NextConnection(&'static str),
    /// Needs `twinblk down` + `twinblk up`; why.
    Restart(&'static str),
}

const RATE: Effect = Effect::Live(
    "through the core, for every resync that starts from now on; a running one keeps its pace",
);
const SPLIT_BRAIN: Effect = Effect::Live(
    "through the core, from the next handshake (one in progress decides with what it sent); a \
     policy applies only when both nodes have it: adjust the peer too",
);
const QUIC: Effect = Effect::NextConnection(
    "QUIC settles it in each connection's handshake and cannot change it on the open one; \
     `twinblk disconnect` + `twinblk connect` uses it now (a Primary then resyncs what it \
     wrote while disconnected)",
);
const OPENED_AT_UP: Effect =
    Effect::Restart("the daemon opens or binds it at `up` (on the peer too, if it names the peer)");
const TLS: Effect = Effect::Restart(
    "the TLS identity and the peer's pin are loaded when the daemon's endpoint starts",
);

/// Each changed key with its effect, in the resource file's order. Destructures every field,
/// so a new key is a compile error here until someone decides whether it can change live.
fn changes(old: &crate::config::Config, new: &crate::config::Config) -> Vec<(String, Effect)> {
    let crate::config::Resource {
        name,
        protocol,
        send_buffer,
        ping_interval,
        timeout,
        connect_retry,
        data_streams,
        window,
        max_mtu,
        after_sb_0pri,
        after_sb_1pri,
        csums,
        al_updates,
        on_peer_lost,
        c_max_rate,
        c_fill_target,
        c_plan_ahead,
        c_min_rate,
        on_congestion,
        congestion_fill,
        idle_poll,
    } = &old.resource;
    let n = &new.resource;
    let mut out = Vec::new();
    let mut key = |changed: bool, key: &str, effect: Effect| {
        if changed {
            out.push((key.to_owned(), effect));
        }
    };
    key(
        *name != n.name,
        "name",
        Effect::Restart(
            "it names the resource: the metadata and the peer's setup exchange check it",
        ),
    );
    key(
        *protocol != n.protocol,
        "protocol",
        Effect::Restart(
            "a write keeps the completion rule it was admitted under (sync: the peer's ack, \
             async: the local disk and the send buffer) and Ahead/Behind exist only in async; \
             the core has no point yet where every write in flight on both nodes follows one \
             rule",
        ),
    );
    let congestion = Effect::Restart(
        "the core's async admission and pull-ahead run with the values of `up`; a change \
         under writes in flight is not checked by the simulator yet",
    );
    key(*send_buffer != n.send_buffer, "send-buffer", congestion);
    key(
        *on_congestion != n.on_congestion,
        "on-congestion",
        congestion,
    );
    key(
        *congestion_fill != n.congestion_fill,
        "congestion-fill",
        congestion,
    );
    key(*c_max_rate != n.c_max_rate, "c-max-rate", RATE);
    key(*c_fill_target != n.c_fill_target, "c-fill-target", RATE);
    key(*c_plan_ahead != n.c_plan_ahead, "c-plan-ahead", RATE);
    key(*c_min_rate != n.c_min_rate, "c-min-rate", RATE);
    key(*ping_interval != n.ping_interval, "ping-interval", QUIC);
    key(*timeout != n.timeout, "timeout", QUIC);
    key(
        *connect_retry != n.connect_retry,
        "connect-retry",
        Effect::Live("from the next reconnect attempt"),
    );
    key(
        *data_streams != n.data_streams,
        "data-streams",
        Effect::Restart(
            "a connection opens its streams at setup and both nodes must agree on their number \
             (the setup exchange refuses a mismatch): change it on both nodes",
        ),
    );
    key(*window != n.window, "window", QUIC);
    key(
        *max_mtu != n.max_mtu,
        "max-mtu",
        Effect::Restart(
            "it sizes the UDP endpoint's largest datagram, fixed when the endpoint binds",
        ),
    );
    key(
        *after_sb_0pri != n.after_sb_0pri,
        "after-sb-0pri",
        SPLIT_BRAIN,
    );
    key(
        *after_sb_1pri != n.after_sb_1pri,
        "after-sb-1pri",
        SPLIT_BRAIN,
    );
    key(
        *on_peer_lost != n.on_peer_lost,
        "on-peer-lost",
        Effect::Live(
            "the fencing policy through the core, the command in the daemon: from the next loss \
             of the peer, and a freeze in progress retries with the new command",
        ),
    );
    key(
        *idle_poll != n.idle_poll,
        "idle-poll",
        Effect::Live("from the next write (\"off\": released at once)"),
    );
    key(
        *csums != n.csums,
        "csums",
        Effect::Restart(
            "the sync source reads it for every chunk, so a change would switch a running \
             resync's method halfway (not live yet)",
        ),
    );
    key(
        *al_updates != n.al_updates,
        "al-updates",
        Effect::Restart(
            "a Primary without activity-log updates must first record that in its metadata (a \
             crash then resyncs everything); the core does that when it starts, not at a change",
        ),
    );
    for on in &old.nodes {
        let Some(nn) = new.nodes.iter().find(|nn| nn.name == on.name) else {
            key(
                true,
                &format!("node.{} (removed)", on.name),
                Effect::Restart("the two nodes' names are in their metadata (`create-md`)"),
            );
            continue;
        };
        let crate::config::Node {
            name: _,
            address,
            disk,
            meta,
            nbd,
            admin,
            cert,
            key: tls_key,
            size,
            pin,
            metrics,
            frontend,
            ublk_queues,
            ublk_depth,
        } = on;
        let k = |f: &str| format!("node.{}.{f}", on.name);
        key(*address != nn.address, &k("address"), OPENED_AT_UP);
        key(*disk != nn.disk, &k("disk"), OPENED_AT_UP);
        key(*meta != nn.meta, &k("meta"), OPENED_AT_UP);
        key(*nbd != nn.nbd, &k("nbd"), OPENED_AT_UP);
        key(*admin != nn.admin, &k("admin"), OPENED_AT_UP);
        key(*cert != nn.cert, &k("cert"), TLS);
        key(*tls_key != nn.key, &k("key"), TLS);
        key(*size != nn.size, &k("size"), OPENED_AT_UP);
        key(*pin != nn.pin, &k("pin"), TLS);
        key(*metrics != nn.metrics, &k("metrics"), OPENED_AT_UP);
        key(*frontend != nn.frontend, &k("frontend"), OPENED_AT_UP);
        key(
            *ublk_queues != nn.ublk_queues,
            &k("ublk-queues"),
            OPENED_AT_UP,
        );
        key(*ublk_depth != nn.ublk_depth, &k("ublk-depth"), OPENED_AT_UP);
    }
    for nn in &new.nodes {
        if !old.nodes.iter().any(|on| on.name == nn.name) {
            key(
                true,
                &format!("node.{} (added)", nn.name),
                Effect::Restart("the two nodes' names are in their metadata (`create-md`)"),
            );
        }
    }
    out
}

impl Admin {
    /// `adjust`: re-read the resource file, apply what can change live (all of it or, if
    /// anything is refused, none of it), and say for each changed key what happened.
    async fn adjust(&self) -> Response {
        // Held throughout: two adjusts at once must not both compare with the same old file.
        let mut running = self.running.lock().await;
        let new = match crate::config::Config::load(&self.config) {
            Ok(c) => c,
            Err(e) => {
                return Response::Error {
                    message: format!("{e}; nothing applied"),
                    code: None,
                }
            }
        };
        let changed = changes(&running, &new);
        let file = self.config.display();
        if changed.is_empty() {
            return Response::Ok {
                message: format!("nothing changed: the daemon runs with every setting of {file}"),
            };
        }
        let restart_only = changed.iter().all(|(_, e)| matches!(e, Effect::Restart(_)));
        if !restart_only {
            let r = &new.resource;
            let adjust = super::Adjust {
                core: crate::core::Adjustable {
                    resync_rate: r.resync_rate(),
                    after_sb_0pri: r.after_sb_0pri,
                    after_sb_1pri: r.after_sb_1pri,
                    fencing: if r.on_peer_lost.is_some() {
                        crate::core::Fencing::FreezeUntilFenced
                    } else {
                        crate::core::Fencing::Off
                    },
                },
                link: crate::net::Live {
                    keep_alive: r.ping_interval,
                    idle_timeout: r.timeout,
                    retry_max: r.connect_retry,
                    window: r.window,
                },
                on_peer_lost: r.on_peer_lost.clone(),
                idle_poll: r.idle_poll,
            };
            let (reply, rx) = oneshot::channel();
            if self.tx.send(Input::Adjust { adjust, reply }).is_err() {
                return gone();
            }
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Response::Error {
                        message: format!("{e}; nothing applied"),
                        code: e.code(),
                    }
                }
                Err(_) => return gone(),
            }
            let (o, n) = (&mut running.resource, &new.resource);
            o.c_max_rate = n.c_max_rate;
            o.c_fill_target = n.c_fill_target;
            o.c_plan_ahead = n.c_plan_ahead;
            o.c_min_rate = n.c_min_rate;
            o.ping_interval = n.ping_interval;
            o.timeout = n.timeout;
            o.connect_retry = n.connect_retry;
            o.window = n.window;
            o.after_sb_0pri = n.after_sb_0pri;
            o.after_sb_1pri = n.after_sb_1pri;
            o.on_peer_lost = n.on_peer_lost.clone();
            o.idle_poll = n.idle_poll;
        }
        let mut message = format!("re-read {file}");
        for (key, effect) in &changed {
            let line = match effect {
                Effect::Live(when) => format!("{key}: applied live; {when}"),
                Effect::NextConnection(why) => {
                    format!("{key}: applied for the next connection; {why}")
                }
                Effect::Restart(why) => {
                    format!("{key}: needs a restart (`twinblk down` + `twinblk up`); {why}")
                }
            };
            tracing::info!(resource = %self.resource, "adjust: {line}");
            message.push_str("\n  ");
            message.push_str(&line);
        }
        Response::Ok { message }
    }

    /// Stream event lines until the client goes away or the daemon stops. A client that reads
    /// slower than events happen loses lines (the broadcast is bounded so the event loop never
    /// waits) and gets a `dropped` line saying how many.
    async fn events(&self, now: bool, reply: &mpsc::Sender<Response>) {
        let (r, rx) = oneshot::channel();
        if self.tx.send(Input::Events { now, reply: r }).is_err() {
            let _ = reply.send(gone()).await;
            return;
        }
        let Ok((mut stream, exists)) = rx.await else {
            let _ = reply.send(gone()).await;
            return;
        };
        for event in exists {
            if reply.send(Response::Event { event }).await.is_err() {
                return;
            }
        }
        loop {
            let event = match stream.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.metrics.events_dropped.inc_by(n);
                    super::events::dropped(&self.resource, &self.node, n)
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = reply.send(gone()).await;
                    return;
                }
            };
            if reply.send(Response::Event { event }).await.is_err() {
                return;
            }
        }
    }
}

impl Handler for Admin {
    async fn handle(&self, request: Request, reply: mpsc::Sender<Response>) {
        let resp = match request {
            Request::Status => {
                let (r, rx) = oneshot::channel();
                if self.tx.send(Input::Status { reply: r }).is_err() {
                    gone()
                } else {
                    match rx.await {
                        Ok(mut status) => {
                            if let Some(o) = status.as_object_mut() {
                                o.insert(
                                    "ublk_device".into(),
                                    self.ublk_device.get().cloned().into(),
                                );
                            }
                            Response::Status { status }
                        }
                        Err(_) => gone(),
                    }
                }
            }
            Request::Latency { seconds } => {
                let (r, rx) = oneshot::channel();
                if self.tx.send(Input::Latency { seconds, reply: r }).is_err() {
                    gone()
                } else {
                    match rx.await {
                        Ok(status) => Response::Status { status },
                        Err(_) => gone(),
                    }
                }
            }
            Request::Primary { force } => {
                self.admin(AdminCmd::Promote { force }, "now Primary").await
            }
            Request::Secondary { force } => match self.ublk_in_use("demote") {
                Err(refused) => Response::Error {
                    message: refused.to_string(),
                    code: Some(AdminErrorCode::DeviceInUse),
                },
                Ok(()) => {
                    if force {
                        self.disconnect_clients("secondary").await;
                    }
                    self.admin(AdminCmd::Demote, "now Secondary").await
                }
            },
            Request::Connect { discard_my_data } => {
                let armed = if discard_my_data {
                    match self
                        .admin(
                            AdminCmd::DiscardMyData,
                            "this node's changes will be discarded",
                        )
                        .await
                    {
                        e @ Response::Error { .. } => Some(e),
                        _ => None,
                    }
                } else {
                    None
                };
                match armed {
                    Some(e) => e,
                    None if discard_my_data => {
                        self.admin(
                            AdminCmd::Connect,
                            "connecting; on a split brain this node becomes the sync target and \
                             its changes are overwritten",
                        )
                        .await
                    }
                    None => self.admin(AdminCmd::Connect, "connecting").await,
                }
            }
            Request::Disconnect => self.admin(AdminCmd::Disconnect, "disconnected").await,
            Request::Invalidate => {
                self.admin(
                    AdminCmd::Invalidate,
                    "invalidated: this node becomes a full sync target of the peer",
                )
                .await
            }
            Request::Adjust => self.adjust().await,
            Request::Verify => {
                self.admin(
                    AdminCmd::Verify,
                    "verify started: progress and findings in `twinblk status`",
                )
                .await
            }
            Request::Down { force } => match self.ublk_in_use("take it down") {
                Err(refused) => Response::Error {
                    message: refused.to_string(),
                    code: Some(AdminErrorCode::DeviceInUse),
                },
                Ok(()) => {
                    if force {
                        self.disconnect_clients("down").await;
                    }
                    match self.admin(AdminCmd::Down, "shutting down").await {
                        ok @ Response::Ok { .. } => {
                            let _ = self.down.send(true);
                            ok
                        }
                        refused => refused,
                    }
                }
            },
            Request::Events { now } => {
                self.events(now, &reply).await;
                return;
            }
        };
        let _ = reply.send(resp).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::events::Bus;

    /// A reader that does not keep up loses lines and is told how many; the sender never
    /// waits for it.
    #[test]
    fn slow_reader_gets_a_dropped_line() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (tx, mut inputs) = mpsc::unbounded_channel();
            let (down, _) = watch::channel(false);
            let (metrics, _) = crate::metrics::Metrics::new("r0", "alpha");
            let admin = Admin {
                tx,
                down,
                resource: "r0".into(),
                node: "alpha".into(),
                metrics: metrics.clone(),
                ublk_device: Default::default(),
                clients: Default::default(),
                config: "r0.toml".into(),
                running: tokio::sync::Mutex::new(
                    crate::config::Config::from_str(
                        "[resource]\nname = \"r0\"\n\
                         [node.alpha]\naddress = \"127.0.0.1:7789\"\ndisk = \"/a.img\"\n\
                         nbd = \"unix:/a.nbd\"\nadmin = \"/a.sock\"\ncert = \"/a.crt\"\n\
                         key = \"/a.key\"\n\
                         [node.beta]\naddress = \"127.0.0.1:7790\"\ndisk = \"/b.img\"\n\
                         nbd = \"unix:/b.nbd\"\nadmin = \"/b.sock\"\ncert = \"/b.crt\"\n\
                         key = \"/b.key\"\n",
                    )
                    .expect("config"),
                ),
            };
            let bus = Bus::new("r0", "alpha");
            let sender = bus.sender();
            drop(bus);
            // The event loop's side: subscribe on request, then flood without waiting.
            let fake_loop = tokio::spawn(async move {
                if let Some(Input::Events { reply, .. }) = inputs.recv().await {
                    let _ = reply.send((sender.subscribe(), Vec::new()));
                }
                for i in 0..(3 * crate::node::events::BACKLOG) {
                    // Never blocks: this is what keeps a slow terminal from stalling I/O.
                    let _ = sender.send(serde_json::json!({ "n": i }));
                }
                sender
            });
            // The client's side: a small channel nobody reads until the flood is over.
            let (reply, mut client) = mpsc::channel(8);
            let handler = tokio::spawn(async move {
                admin.handle(Request::Events { now: false }, reply).await;
            });
            let sender = fake_loop.await.expect("fake loop");
            drop(sender);
            let mut dropped = 0;
            let mut delivered = 0;
            while let Some(r) = client.recv().await {
                match r {
                    Response::Event { event } if event["type"] == "dropped" => {
                        dropped += event["count"].as_u64().expect("count");
                    }
                    Response::Event { .. } => delivered += 1,
                    Response::Error { .. } => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            let _ = handler.await;
            assert!(dropped > 0, "the reader must be told it lost lines");
            assert_eq!(
                dropped + delivered,
                3 * crate::node::events::BACKLOG as u64,
                "every line is either delivered or counted as dropped"
            );
            assert_eq!(metrics.events_dropped.get(), dropped);
        });
    }
}
