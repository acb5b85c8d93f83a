//! The admin socket handler: turns `twinblk status/primary/secondary/connect/disconnect/down`
//! into event-loop inputs and answers with their result.

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::Input;
use crate::control::{Handler, Request, Response};
use crate::core::AdminCmd;

/// What `secondary` or `down` would pull from under a user of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum InUse {
    /// `/dev/ublkbN` is mounted or held open.
    Ublk { dev: String },
    /// NBD clients have the export open (their addresses).
    Nbd { clients: Vec<String> },
}

/// An admin command refused before it reached the core, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refused {
    /// `demote` or `take it down`, for the advice.
    pub action: &'static str,
    /// `secondary` or `down`: the command to repeat with `--force`.
    pub command: &'static str,
    pub resource: String,
    pub in_use: InUse,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Refused {
            action,
            command,
            resource,
            in_use,
        } = self;
        match in_use {
            InUse::Ublk { dev } => write!(
                f,
                "{dev} is in use (mounted or held open by a program): unmount it or stop the \
                 program, then {action} again"
            ),
            InUse::Nbd { clients } => write!(
                f,
                "{n} NBD client{s} ha{ve} {resource} open ({list}); {its} next writes would \
                 fail: stop {them} first, or `twinblk {command} {resource} --force` to \
                 disconnect {them} (requests in flight are answered first)",
                n = clients.len(),
                s = if clients.len() == 1 { "" } else { "s" },
                ve = if clients.len() == 1 { "s" } else { "ve" },
                list = clients.join(", "),
                them = if clients.len() == 1 { "it" } else { "them" },
                its = if clients.len() == 1 { "its" } else { "their" },
            ),
        }
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
    pub running: std::sync::Mutex<crate::config::Config>,
}

fn gone() -> Response {
    Response::Error {
        message: "the daemon is shutting down".into(),
    }
}

impl Admin {
    /// Like DRBD ("Device is held open by someone"): demoting or deleting `/dev/ublkbN` under a
    /// mounted filesystem, or demoting under connected NBD clients, would turn every later
    /// write of theirs into an I/O error, so refuse. With `force`, the NBD clients are
    /// disconnected first (a mounted ublk device is never forced).
    async fn in_use(
        &self,
        action: &'static str,
        command: &'static str,
        force: bool,
    ) -> Result<(), Refused> {
        let refused = |in_use| Refused {
            action,
            command,
            resource: self.resource.clone(),
            in_use,
        };
        if let Some(dev) = self.ublk_device.get() {
            if super::frontend::held_open(std::path::Path::new(dev)) {
                return Err(refused(InUse::Ublk { dev: dev.clone() }));
            }
        }
        let clients = self.clients.open();
        if clients.is_empty() {
            return Ok(());
        }
        if !force {
            return Err(refused(InUse::Nbd { clients }));
        }
        tracing::warn!(
            resource = %self.resource,
            clients = %clients.join(", "),
            "{command} --force: disconnecting the NBD clients"
        );
        self.clients.close_all();
        let deadline = tokio::time::Instant::now() + FORCE_CLOSE_WAIT;
        loop {
            let left = self.clients.open();
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(refused(InUse::Nbd { clients: left }));
            }
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
            Ok(Err(message)) => Response::Error { message },
            Err(_) => gone(),
        }
    }
}

/// Settings `adjust` applies to a running daemon; every other changed key needs a restart.
fn restart_keys(old: &crate::config::Config, new: &crate::config::Config) -> Vec<String> {
    let (o, n) = (&old.resource, &new.resource);
    let mut keys = Vec::new();
    macro_rules! cmp {
        ($($f:ident => $k:literal),* $(,)?) => {
            $(if o.$f != n.$f { keys.push($k.to_owned()); })*
        };
    }
    cmp!(
        name => "name",
        protocol => "protocol",
        send_buffer => "send-buffer",
        ping_interval => "ping-interval",
        timeout => "timeout",
        connect_retry => "connect-retry",
        data_streams => "data-streams",
        window => "window",
        max_mtu => "max-mtu",
        after_sb_0pri => "after-sb-0pri",
        after_sb_1pri => "after-sb-1pri",
        csums => "csums",
        al_updates => "al-updates",
        on_peer_lost => "on-peer-lost",
        on_congestion => "on-congestion",
        congestion_fill => "congestion-fill",
    );
    if o != n {
        // A key this list does not name yet: say so rather than claim it applied.
        let mut o2 = o.clone();
        o2.c_max_rate = n.c_max_rate;
        o2.c_fill_target = n.c_fill_target;
        o2.c_plan_ahead = n.c_plan_ahead;
        o2.c_min_rate = n.c_min_rate;
        if keys.is_empty() && o2 != *n {
            keys.push("resource settings".to_owned());
        }
    }
    for on in &old.nodes {
        match new.nodes.iter().find(|nn| nn.name == on.name) {
            None => keys.push(format!("node {} (removed)", on.name)),
            Some(nn) if nn != on => keys.push(format!("node {} settings", on.name)),
            Some(_) => {}
        }
    }
    for nn in &new.nodes {
        if !old.nodes.iter().any(|on| on.name == nn.name) {
            keys.push(format!("node {} (added)", nn.name));
        }
    }
    keys
}

impl Admin {
    /// `adjust`: re-read the resource file; apply the resync rates live, list the rest.
    async fn adjust(&self) -> Response {
        let new = match crate::config::Config::load(&self.config) {
            Ok(c) => c,
            Err(e) => {
                return Response::Error {
                    message: format!("{e}; nothing applied"),
                }
            }
        };
        let old = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let rate = new.resource.resync_rate();
        let mut applied = Vec::new();
        if rate != old.resource.resync_rate() {
            match self.admin(AdminCmd::SetResyncRate(rate), "").await {
                Response::Ok { .. } => {}
                other => return other,
            }
            for (k, changed) in [
                (
                    "c-max-rate",
                    old.resource.c_max_rate != new.resource.c_max_rate,
                ),
                (
                    "c-fill-target",
                    old.resource.c_fill_target != new.resource.c_fill_target,
                ),
                (
                    "c-plan-ahead",
                    old.resource.c_plan_ahead != new.resource.c_plan_ahead,
                ),
                (
                    "c-min-rate",
                    old.resource.c_min_rate != new.resource.c_min_rate,
                ),
            ] {
                if changed {
                    applied.push(k);
                }
            }
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running.resource.c_max_rate = new.resource.c_max_rate;
            running.resource.c_fill_target = new.resource.c_fill_target;
            running.resource.c_plan_ahead = new.resource.c_plan_ahead;
            running.resource.c_min_rate = new.resource.c_min_rate;
        }
        let restart = restart_keys(&old, &new);
        let mut message = if applied.is_empty() {
            "nothing to apply live".to_owned()
        } else {
            format!("applied {}", applied.join(", "))
        };
        if !restart.is_empty() {
            message.push_str(&format!(
                "; changed but needs a restart (`twinblk down` + `twinblk up`): {}",
                restart.join(", ")
            ));
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
            Request::Secondary { force } => match self.in_use("demote", "secondary", force).await {
                Err(refused) => Response::Error {
                    message: refused.to_string(),
                },
                Ok(()) => self.admin(AdminCmd::Demote, "now Secondary").await,
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
            Request::Down { force } => match self.in_use("take it down", "down", force).await {
                Err(refused) => Response::Error {
                    message: refused.to_string(),
                },
                Ok(()) => {
                    let _ = self.down.send(true);
                    Response::Ok {
                        message: "shutting down".into(),
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
                running: std::sync::Mutex::new(
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
