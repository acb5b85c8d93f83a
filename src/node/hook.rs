//! The `on-peer-lost` hook: DRBD's `fencing resource-and-stonith` with a `fence-peer` handler.
//!
//! When a Primary loses a connection on which the peer was UpToDate, that peer could be promoted
//! by a cluster manager while this node keeps writing: two Primaries, a split brain. So the
//! driver holds the loss back from the core (which would otherwise complete the writes waiting
//! for the peer's ack and go on alone) and runs the hook with the resource and peer names. Only
//! when it exits 0 (the peer is fenced, or known not to be promoted) does the core hear of the
//! loss; until then writes are frozen, reads still served.
//!
//! If the hook fails (non-zero exit, killed, cannot start), I/O stays frozen as in DRBD: going on
//! would risk exactly the divergence the hook exists to prevent. The failure is logged at error
//! level and shown in `status` (`peer_lost_hook`), and the hook is run again every
//! [`RETRY_AFTER`] (a fencing device that was briefly unreachable often answers later). The hold
//! also ends when the peer connects again (it was not promoted behind our back: the handshake
//! compares generations) or the operator runs `twinblk disconnect` (they take responsibility).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::Input;

/// Pause between failed runs of the hook.
pub(super) const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What a hook run reports back to the event loop.
pub(crate) enum Report {
    Exited {
        run: u64,
        result: Result<(), String>,
    },
    Retry {
        run: u64,
    },
}

/// A connection loss the core has not been told about yet.
struct Held {
    conn: u64,
    reason: String,
    since: u64,
}

#[derive(Clone)]
enum State {
    /// Never ran since the daemon started.
    Idle,
    Running {
        attempt: u32,
    },
    Failed {
        attempt: u32,
        error: String,
    },
    Succeeded {
        attempt: u32,
    },
}

pub(super) struct PeerLost {
    command: Option<PathBuf>,
    resource: String,
    peer: String,
    held: Option<Held>,
    /// Identifies the current episode, so reports of an abandoned one are ignored.
    run: u64,
    state: State,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl PeerLost {
    pub(super) fn new(command: Option<PathBuf>, resource: String, peer: String) -> PeerLost {
        PeerLost {
            command,
            resource,
            peer,
            held: None,
            run: 0,
            state: State::Idle,
        }
    }

    /// The Primary lost connection `conn` to an UpToDate peer. Returns true when a hook is
    /// configured: the loss is held (not to be fed to the core) until [`PeerLost::report`] or
    /// [`PeerLost::release`] hands it back.
    pub(super) fn hold(
        &mut self,
        conn: u64,
        reason: &str,
        tx: &mpsc::UnboundedSender<Input>,
    ) -> bool {
        if self.command.is_none() {
            return false;
        }
        if let Some(h) = &self.held {
            // Cannot happen (one connection at a time), but never hold two losses.
            warn!(
                held = h.conn,
                conn, "a second peer loss while one is held; keeping the first"
            );
            return true;
        }
        self.run += 1;
        self.held = Some(Held {
            conn,
            reason: reason.to_owned(),
            since: unix_now(),
        });
        warn!(
            resource = %self.resource,
            peer = %self.peer,
            "lost the UpToDate peer while Primary ({reason}); writes are frozen until on-peer-lost exits 0"
        );
        self.spawn(1, tx);
        true
    }

    fn spawn(&mut self, attempt: u32, tx: &mpsc::UnboundedSender<Input>) {
        let Some(cmd) = self.command.clone() else {
            return;
        };
        self.state = State::Running { attempt };
        let (resource, peer, run, thread_tx) = (
            self.resource.clone(),
            self.peer.clone(),
            self.run,
            tx.clone(),
        );
        info!(command = %cmd.display(), attempt, "running on-peer-lost {resource} {peer}");
        // A plain thread: the hook may run for minutes (a STONITH), and tokio's process support
        // is not compiled in.
        let spawned = std::thread::Builder::new()
            .name("on-peer-lost".into())
            .spawn(move || {
                let result = Command::new(&cmd)
                    .arg(&resource)
                    .arg(&peer)
                    .env("TWINBLK_RESOURCE", &resource)
                    .env("TWINBLK_PEER", &peer)
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", cmd.display()))
                    .and_then(|o| {
                        if o.status.success() {
                            Ok(())
                        } else {
                            let stderr = String::from_utf8_lossy(&o.stderr);
                            Err(format!(
                                "{} {}; stderr: {:?}",
                                cmd.display(),
                                o.status,
                                stderr.trim()
                            ))
                        }
                    });
                let _ = thread_tx.send(Input::Hook(Report::Exited { run, result }));
            });
        if let Err(e) = spawned {
            let _ = tx.send(Input::Hook(Report::Exited {
                run,
                result: Err(format!("cannot start a thread for the hook: {e}")),
            }));
        }
    }

    /// A hook run finished or its retry is due. Returns the held loss once the core may hear it.
    pub(super) fn report(
        &mut self,
        r: Report,
        tx: &mpsc::UnboundedSender<Input>,
    ) -> Option<(u64, String)> {
        let attempt = match self.state {
            State::Running { attempt } | State::Failed { attempt, .. } => attempt,
            _ => 0,
        };
        match r {
            // An abandoned episode (the hold was released meanwhile): only record the outcome.
            Report::Exited { run, result } if run != self.run || self.held.is_none() => {
                self.state = match result {
                    Ok(()) => State::Succeeded { attempt },
                    Err(error) => State::Failed { attempt, error },
                };
                None
            }
            Report::Retry { run } if run != self.run || self.held.is_none() => None,
            Report::Exited { result: Ok(()), .. } => {
                info!(
                    resource = %self.resource,
                    peer = %self.peer,
                    "on-peer-lost exited 0: continuing without the peer"
                );
                self.state = State::Succeeded { attempt };
                self.held.take().map(|h| (h.conn, h.reason))
            }
            Report::Exited { result: Err(e), .. } => {
                error!(
                    resource = %self.resource,
                    peer = %self.peer,
                    attempt,
                    "on-peer-lost FAILED: {e}; writes stay frozen (the peer may be promoted \
                     elsewhere); retrying in {RETRY_AFTER:?}. Fix the fencing, or bring the peer \
                     back, or `twinblk disconnect` to continue alone at your own risk"
                );
                self.state = State::Failed { attempt, error: e };
                let (tx, run) = (tx.clone(), self.run);
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY_AFTER).await;
                    let _ = tx.send(Input::Hook(Report::Retry { run }));
                });
                None
            }
            Report::Retry { .. } => {
                self.spawn(attempt + 1, tx);
                None
            }
        }
    }

    /// End the hold without the hook's verdict (the peer is back, or the operator disconnected).
    /// A hook still running is left alone; its result is ignored.
    pub(super) fn release(&mut self, why: &str) -> Option<(u64, String)> {
        let h = self.held.take()?;
        self.run += 1;
        info!(resource = %self.resource, "writes unfrozen: {why}");
        Some((h.conn, h.reason))
    }

    /// `status --json`'s `peer_lost_hook`.
    pub(super) fn status(&self) -> serde_json::Value {
        let (state, attempts, err) = match &self.state {
            State::Idle => ("idle", 0, None),
            State::Running { attempt } => ("running", *attempt, None),
            State::Failed { attempt, error } => ("failed", *attempt, Some(error.clone())),
            State::Succeeded { attempt } => ("succeeded", *attempt, None),
        };
        json!({
            "command": self.command.as_ref().map(|c| c.display().to_string()),
            "state": state,
            "attempts": attempts,
            "last_error": err,
            "frozen": self.held.is_some(),
            "frozen_since": self.held.as_ref().map(|h| h.since),
        })
    }
}
