//! A core [`StateChange`] as people and collectors read it: a stable kind, `from`/`to` where
//! the change has them, and one sentence. The log line, `status --json`'s `events` and nothing
//! else use it, so Rust's `Debug` text never reaches the stable JSON.

use crate::core::StateChange;
use crate::meta::dump::human_bytes;

/// One described state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Described {
    /// `role`, `disk`, `repl`, `peer-role`, `peer-disk`, `resync-started`, `resync-progress`,
    /// `resync-finished`, `refused`, `connection-lost`, `verify-started`, `verify-progress`,
    /// `verify-finished`.
    pub kind: &'static str,
    pub from: Option<String>,
    pub to: Option<String>,
    /// The stable name of the reason, where the change has one (`refused`: the refusal's
    /// code; `verify-finished` that stopped early: the abort's code), for scripts.
    pub code: Option<&'static str>,
    pub text: String,
}

/// `block`: bytes per bitmap bit, for sizes people read.
pub(super) fn describe(change: &StateChange, block: u64) -> Described {
    let d = |kind, from: Option<String>, to: Option<String>, text: String| Described {
        kind,
        from,
        to,
        code: None,
        text,
    };
    let name = |x: &dyn std::fmt::Debug| format!("{x:?}");
    let unknown = || "unknown".to_owned();
    match change {
        StateChange::Role { from, to } => d(
            "role",
            Some(name(from)),
            Some(name(to)),
            format!("role {from:?} -> {to:?}"),
        ),
        StateChange::Disk { from, to } => d(
            "disk",
            Some(name(from)),
            Some(name(to)),
            format!("disk {from:?} -> {to:?}"),
        ),
        StateChange::Repl { from, to } => d(
            "repl",
            Some(name(from)),
            Some(name(to)),
            format!("replication {from:?} -> {to:?}"),
        ),
        StateChange::PeerRole { to } => {
            let to = to.map(|r| name(&r)).unwrap_or_else(unknown);
            let text = format!("peer role {to}");
            d("peer-role", None, Some(to), text)
        }
        StateChange::PeerDisk { to } => {
            let to = to.map(|r| name(&r)).unwrap_or_else(unknown);
            let text = format!("peer disk {to}");
            d("peer-disk", None, Some(to), text)
        }
        StateChange::ResyncStarted { blocks, full } => d(
            "resync-started",
            None,
            None,
            format!(
                "{} resync started: {}",
                if *full { "full" } else { "bitmap" },
                human_bytes(blocks.saturating_mul(block))
            ),
        ),
        StateChange::ResyncProgress {
            percent,
            left_blocks,
        } => d(
            "resync-progress",
            None,
            None,
            format!(
                "resync {percent}% done, {} left",
                human_bytes(left_blocks.saturating_mul(block))
            ),
        ),
        StateChange::ResyncFinished => d("resync-finished", None, None, "resync finished".into()),
        StateChange::DiskFailed { failure } => {
            d("disk-failed", None, None, format!("disk failed: {failure}"))
        }
        StateChange::Refused { reason } => Described {
            code: Some(reason.code()),
            ..d(
                "refused",
                None,
                None,
                format!("connection refused: {reason}"),
            )
        },
        StateChange::ConnectionLost { reason } => d(
            "connection-lost",
            None,
            None,
            format!("connection lost: {reason}"),
        ),
        StateChange::VerifyStarted { bytes } => d(
            "verify-started",
            None,
            None,
            format!("verify started: {}", human_bytes(*bytes)),
        ),
        StateChange::VerifyProgress {
            percent,
            differing_blocks,
        } => d(
            "verify-progress",
            None,
            None,
            format!("verify {percent}% done, {differing_blocks} blocks differ so far"),
        ),
        StateChange::VerifyFinished {
            differing_blocks,
            first_ranges: _,
            aborted,
        } => Described {
            code: aborted.as_ref().map(|a| a.code()),
            ..d(
                "verify-finished",
                None,
                None,
                match aborted {
                    Some(why) => format!(
                        "verify stopped early ({why}); {differing_blocks} blocks differ so far"
                    ),
                    None => format!("verify finished: {differing_blocks} blocks differ"),
                },
            )
        },
    }
}

impl Described {
    /// The `status --json` `events` entry.
    pub(super) fn json(&self, time: u64) -> serde_json::Value {
        let mut o = serde_json::json!({
            "time": time,
            "kind": self.kind,
            "change": self.text,
        });
        if let Some(m) = o.as_object_mut() {
            if let Some(f) = &self.from {
                m.insert("from".into(), f.clone().into());
            }
            if let Some(t) = &self.to {
                m.insert("to".into(), t.clone().into());
            }
            if let Some(c) = self.code {
                m.insert("code".into(), c.into());
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Refusal, ReplState, VerifyAbort, VerifyAbortCode};

    /// Issue 18: `status --json` showed `"Repl { from: StandAlone, to: Connecting }"`.
    #[test]
    fn no_debug_text_in_the_json() {
        let c = StateChange::Repl {
            from: ReplState::StandAlone,
            to: ReplState::Connecting,
        };
        let j = describe(&c, 4096).json(7);
        assert_eq!(
            j,
            serde_json::json!({
                "time": 7, "kind": "repl", "from": "StandAlone", "to": "Connecting",
                "change": "replication StandAlone -> Connecting",
            })
        );
        let p = describe(
            &StateChange::ResyncStarted {
                blocks: 256,
                full: true,
            },
            4096,
        );
        assert_eq!(p.text, "full resync started: 1.0 MiB");
        let l = describe(&StateChange::PeerDisk { to: None }, 4096);
        assert_eq!((l.from, l.to.as_deref()), (None, Some("unknown")));
    }

    /// A verify that stopped early and a refusal carry their reason's stable name as `code`
    /// (scripts match it, never the sentence); a verify that finished has none.
    #[test]
    fn reasons_carry_their_code() {
        let stopped = |aborted| StateChange::VerifyFinished {
            differing_blocks: 2,
            first_ranges: vec![],
            aborted,
        };
        let j = describe(&stopped(Some(VerifyAbort::RoleChanged)), 4096).json(1);
        assert_eq!(j["code"], "role-changed", "{j}");
        assert_eq!(
            j["change"],
            "verify stopped early (a node changed its role during the verify; run it again); 2 \
             blocks differ so far"
        );
        let by_peer = VerifyAbort::ByPeer {
            code: VerifyAbortCode::ReadFailed,
            why: "verify read failed".into(),
        };
        let j = describe(&stopped(Some(by_peer)), 4096).json(1);
        assert_eq!(j["code"], "by-peer", "{j}");
        let j = describe(&stopped(None), 4096).json(1);
        assert_eq!(j.get("code"), None, "{j}");
        let j = describe(
            &StateChange::Refused {
                reason: Refusal::NoUpToDate,
            },
            4096,
        )
        .json(1);
        assert_eq!(j["code"], "no-up-to-date", "{j}");
    }
}
