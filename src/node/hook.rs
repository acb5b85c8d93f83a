//! The `on-peer-lost` hook: DRBD's `fencing resource-and-stonith` with a `fence-peer` handler.
//!
//! The policy is the core's ([`crate::core::Fencing`]): when a Primary loses a connection on
//! which the peer was UpToDate, that peer could be promoted by a cluster manager while this
//! node keeps writing (two Primaries, a split brain), so the core freezes writes (reads are
//! still served) and asks for the peer to be fenced ([`crate::core::Action::FencePeer`]). This
//! module only executes that: it runs the hook with the resource and peer names and reports its
//! exit as [`crate::core::Event::Fenced`]. Exit 0 (the peer is fenced, or known not to be
//! promoted) ends the freeze.
//!
//! If the hook fails (non-zero exit, killed, cannot start), I/O stays frozen as in DRBD: going on
//! would risk exactly the divergence the hook exists to prevent. The failure is logged at error
//! level and shown in `status` (`peer_lost_hook`), and the core asks again after
//! `fence_retry` (5 s; a fencing device that was briefly unreachable often answers later). The
//! freeze also ends when the peer connects again (it was not promoted behind our back: the
//! handshake compares generations) or the operator runs `twinblk disconnect` (they take
//! responsibility).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::Input;
use crate::core::FreezeStatus;

/// A hook run finished: the core hears it as `Event::Fenced`.
pub(crate) struct Report {
    pub episode: u64,
    pub result: Result<(), String>,
    /// The command's exit code, if it ran and exited (not killed by a signal, not unstartable).
    pub exit_code: Option<i32>,
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
        exit_code: Option<i32>,
    },
    Succeeded {
        attempt: u32,
    },
}

pub(super) struct PeerLost {
    command: Option<PathBuf>,
    resource: String,
    peer: String,
    state: State,
    /// When the current freeze began (unix seconds), for `status`.
    since: Option<(u64, u64)>,
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
            state: State::Idle,
            since: None,
        }
    }

    /// The command in effect.
    pub(super) fn command(&self) -> Option<&std::path::Path> {
        self.command.as_deref()
    }

    /// `twinblk adjust`: the next run (a retry of a freeze in progress too) uses `command`.
    pub(super) fn set_command(&mut self, command: Option<PathBuf>) {
        if command != self.command {
            info!(
                resource = %self.resource,
                "on-peer-lost is now {}",
                command.as_ref().map_or("not set".into(), |c| c.display().to_string())
            );
            self.command = command;
        }
    }

    /// Executes `Action::FencePeer`: runs the hook on a thread, its exit reported as
    /// [`Input::Hook`].
    pub(super) fn run(&mut self, episode: u64, attempt: u32, tx: &mpsc::UnboundedSender<Input>) {
        if attempt == 1 || self.since.map_or(true, |(e, _)| e != episode) {
            self.since = Some((episode, unix_now()));
            warn!(
                resource = %self.resource,
                peer = %self.peer,
                "lost the UpToDate peer while Primary; writes are frozen until on-peer-lost exits 0"
            );
        }
        let Some(cmd) = self.command.clone() else {
            // The core asks only when a hook is configured; without one there is nothing that
            // could fence the peer.
            let _ = tx.send(Input::Hook(Report {
                episode,
                result: Err("no on-peer-lost hook is configured".into()),
                exit_code: None,
            }));
            return;
        };
        self.state = State::Running { attempt };
        let (resource, peer, thread_tx) = (self.resource.clone(), self.peer.clone(), tx.clone());
        info!(command = %cmd.display(), attempt, "running on-peer-lost {resource} {peer}");
        // A plain thread: the hook may run for minutes (a STONITH), and tokio's process support
        // is not compiled in.
        let spawned = std::thread::Builder::new()
            .name("on-peer-lost".into())
            .spawn(move || {
                let output = Command::new(&cmd)
                    .arg(&resource)
                    .arg(&peer)
                    .env("TWINBLK_RESOURCE", &resource)
                    .env("TWINBLK_PEER", &peer)
                    .stdin(Stdio::null())
                    .output();
                let exit_code = output.as_ref().ok().and_then(|o| o.status.code());
                let result = output
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
                let _ = thread_tx.send(Input::Hook(Report {
                    episode,
                    result,
                    exit_code,
                }));
            });
        if let Err(e) = spawned {
            let _ = tx.send(Input::Hook(Report {
                episode,
                result: Err(format!("cannot start a thread for the hook: {e}")),
                exit_code: None,
            }));
        }
    }

    /// Records a run's outcome for `status` (the core decides what it means).
    pub(super) fn record(&mut self, r: &Report) {
        let attempt = match self.state {
            State::Running { attempt }
            | State::Failed { attempt, .. }
            | State::Succeeded { attempt } => attempt,
            State::Idle => 0,
        };
        self.state = match &r.result {
            Ok(()) => {
                info!(resource = %self.resource, peer = %self.peer, "on-peer-lost exited 0");
                State::Succeeded { attempt }
            }
            Err(e) => {
                error!(
                    resource = %self.resource,
                    peer = %self.peer,
                    attempt,
                    "on-peer-lost FAILED: {e}; writes stay frozen (the peer may be promoted \
                     elsewhere) and it runs again shortly. Fix the fencing, or bring the peer \
                     back, or `twinblk disconnect` to continue alone at your own risk"
                );
                State::Failed {
                    attempt,
                    error: e.clone(),
                    exit_code: r.exit_code,
                }
            }
        };
    }

    /// `status --json`'s `peer_lost_hook`; `frozen` is the core's freeze.
    pub(super) fn status(&self, frozen: Option<&FreezeStatus>) -> serde_json::Value {
        let (state, attempts, err, code) = match &self.state {
            State::Idle => ("idle", 0, None, None),
            State::Running { attempt } => ("running", *attempt, None, None),
            State::Failed {
                attempt,
                error,
                exit_code,
            } => ("failed", *attempt, Some(error.clone()), *exit_code),
            State::Succeeded { attempt } => ("succeeded", *attempt, None, None),
        };
        json!({
            "command": self.command.as_ref().map(|c| c.display().to_string()),
            "state": state,
            "attempts": attempts,
            "last_error": err,
            "last_exit_code": code,
            "frozen": frozen.is_some(),
            "frozen_since": frozen.and(self.since.map(|(_, t)| t)),
        })
    }
}
