//! The `twinblk events` stream: the node's state as four objects in the manner of
//! `drbdsetup events2` (resource, device, connection, peer-device), and one line each time an
//! object changes.
//!
//! The event loop rebuilds the objects after every state change the core emits (and once a
//! second, which is what turns resync progress into `done:` updates), and broadcasts a `change`
//! line for each object that differs. The broadcast is bounded and never waits: a reader that
//! falls behind loses lines and is told so with a `dropped` line; replication never waits for
//! a terminal.
//!
//! JSON schema (one object per line, documented in the README): `type` (`exists`, `change`,
//! `dropped`), `object`, `resource`, `node`, `time` (Unix seconds), then the object's fields.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::core::{DiskState, ReplState, Role, Status};

/// Lines a reader may fall behind by before it loses some.
pub const BACKLOG: usize = 1024;

/// The objects, in the order `--now` lists them.
pub const OBJECTS: [&str; 4] = ["resource", "device", "connection", "peer-device"];

/// Extra facts the core's `Status` does not hold.
pub struct View<'a> {
    pub status: &'a Status,
    pub peer: &'a str,
    /// Why the last connection attempt or connection ended, for `connection.reason`.
    pub conn_error: Option<&'a str>,
}

/// Whether `twinblk primary` (without --force) would be accepted now; mirrors the checks of
/// the core's promote command (connected, the peer's answer then decides: a peer seen as
/// Primary refuses).
pub fn may_promote(s: &Status) -> bool {
    s.role != Role::Primary
        && s.peer_role != Some(Role::Primary)
        && s.repl != ReplState::SyncTarget
        && s.disk == DiskState::UpToDate
}

/// The core found a split brain and keeps the connection refused until an operator decides.
pub fn split_brain(s: &Status) -> bool {
    s.split_brain.is_some()
}

/// Resync progress in percent (one decimal) while one runs on this node.
pub fn resync_done(s: &Status) -> Option<f64> {
    s.resync.map(|(left, total)| {
        if total == 0 {
            100.0
        } else {
            let p = 100.0 * total.saturating_sub(left) as f64 / total as f64;
            (p * 10.0).floor() / 10.0
        }
    })
}

/// The connection object's `connection` value, in DRBD's words.
pub fn connection_state(r: ReplState) -> &'static str {
    match r {
        ReplState::StandAlone => "StandAlone",
        ReplState::Connecting => "Connecting",
        _ => "Connected",
    }
}

fn fields(pairs: Vec<(&str, Value)>) -> Map<String, Value> {
    pairs
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// The four objects' fields, in [`OBJECTS`] order.
pub fn objects(v: &View) -> [Map<String, Value>; 4] {
    let s = v.status;
    let dbg = |x: &dyn std::fmt::Debug| Value::String(format!("{x:?}"));
    let reason = match s.repl {
        ReplState::StandAlone => s.last_refusal.as_ref().map(|r| Value::from(r.to_string())),
        ReplState::Connecting => v.conn_error.map(Value::from),
        _ => None,
    };
    [
        fields(vec![
            ("role", dbg(&s.role)),
            ("may_promote", Value::Bool(may_promote(s))),
            ("split_brain", Value::Bool(split_brain(s))),
        ]),
        fields(vec![
            ("disk", dbg(&s.disk)),
            (
                "failure",
                s.disk_failure
                    .map_or(Value::Null, |f| Value::from(f.to_string())),
            ),
        ]),
        fields(vec![
            ("peer_node", Value::from(v.peer)),
            ("connection", Value::from(connection_state(s.repl))),
            ("peer_role", s.peer_role.map_or(Value::Null, |r| dbg(&r))),
            ("reason", reason.unwrap_or(Value::Null)),
        ]),
        fields(vec![
            ("peer_node", Value::from(v.peer)),
            ("replication", dbg(&s.repl)),
            ("peer_disk", s.peer_disk.map_or(Value::Null, |d| dbg(&d))),
            ("done", resync_done(s).map_or(Value::Null, Value::from)),
            // `twinblk verify`: whole percent while it runs, and the blocks found so far.
            (
                "verify_done",
                s.verify
                    .as_ref()
                    .filter(|v| v.running)
                    .map_or(Value::Null, |v| {
                        Value::from(v.checked_bytes.saturating_mul(100) / v.total_bytes.max(1))
                    }),
            ),
            (
                "verify_differing_blocks",
                s.verify
                    .as_ref()
                    .map_or(Value::Null, |v| Value::from(v.differing_blocks)),
            ),
        ]),
    ]
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_millis() as f64) / 1000.0)
        .unwrap_or(0.0)
}

/// One event line.
pub fn line(kind: &str, object: &str, resource: &str, node: &str, f: &Map<String, Value>) -> Value {
    let mut m = Map::new();
    m.insert("type".into(), kind.into());
    m.insert("object".into(), object.into());
    m.insert("resource".into(), resource.into());
    m.insert("node".into(), node.into());
    m.insert("time".into(), json!(unix_now()));
    for (k, v) in f {
        m.insert(k.clone(), v.clone());
    }
    Value::Object(m)
}

/// The `dropped` line a slow reader gets in place of what it missed.
pub fn dropped(resource: &str, node: &str, count: u64) -> Value {
    let mut f = Map::new();
    f.insert("count".into(), count.into());
    line("dropped", "-", resource, node, &f)
}

/// The broadcast side, owned by the event loop.
pub struct Bus {
    tx: broadcast::Sender<Value>,
    resource: String,
    node: String,
    last: Option<[Map<String, Value>; 4]>,
}

impl Bus {
    pub fn new(resource: &str, node: &str) -> Bus {
        let (tx, _) = broadcast::channel(BACKLOG);
        Bus {
            tx,
            resource: resource.to_owned(),
            node: node.to_owned(),
            last: None,
        }
    }

    pub fn sender(&self) -> broadcast::Sender<Value> {
        self.tx.clone()
    }

    /// Compare with the last objects; broadcast a `change` line for each that differs.
    /// Returns how many changed.
    pub fn update(&mut self, now: [Map<String, Value>; 4]) -> usize {
        let mut changed = 0;
        for (i, (name, obj)) in OBJECTS.iter().zip(now.iter()).enumerate() {
            let same = self
                .last
                .as_ref()
                .and_then(|l| l.get(i))
                .is_some_and(|old| old == obj);
            if !same {
                changed += 1;
                // No receiver is not an error: nobody is watching.
                let _ = self
                    .tx
                    .send(line("change", name, &self.resource, &self.node, obj));
            }
        }
        self.last = Some(now);
        changed
    }

    /// `exists` lines for the current objects, then the `exists -` end marker.
    pub fn exists(&self, now: &[Map<String, Value>; 4]) -> Vec<Value> {
        let mut v: Vec<Value> = OBJECTS
            .iter()
            .zip(now.iter())
            .map(|(name, obj)| line("exists", name, &self.resource, &self.node, obj))
            .collect();
        v.push(line("exists", "-", &self.resource, &self.node, &Map::new()));
        v
    }
}

/// Preferred field order in the human form; other fields follow sorted.
const ORDER: [&str; 10] = [
    "peer_node",
    "role",
    "disk",
    "connection",
    "replication",
    "peer_role",
    "peer_disk",
    "done",
    "may_promote",
    "split_brain",
];

fn human_value(v: &Value) -> String {
    match v {
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::String(s) if s.chars().all(|c| c.is_ascii_graphic() && c != '"') => s.clone(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The human form of an event line, like `drbdsetup events2`:
/// `change peer-device name:r0 peer-node:beta replication:SyncSource done:42.1`.
pub fn human(ev: &Value) -> String {
    let get = |k: &str| ev.get(k).and_then(Value::as_str).unwrap_or("-");
    let kind = get("type");
    let object = get("object");
    if object == "-" && kind != "dropped" {
        return format!("{kind} -");
    }
    let mut out = format!("{kind} {object} name:{}", get("resource"));
    let Some(map) = ev.as_object() else {
        return out;
    };
    let skip = ["type", "object", "resource", "node", "time"];
    let mut keys: Vec<&String> = map.keys().filter(|k| !skip.contains(&k.as_str())).collect();
    keys.sort_by_key(|k| {
        (
            ORDER.iter().position(|o| o == k).unwrap_or(ORDER.len()),
            k.to_string(),
        )
    });
    for k in keys {
        if let Some(v) = map.get(k.as_str()) {
            if !v.is_null() {
                out.push(' ');
                out.push_str(&k.replace('_', "-"));
                out.push(':');
                out.push_str(&human_value(v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real replica's status, adjusted: robust against fields the core adds later.
    fn status() -> Status {
        let cfg = crate::core::Config::new("r0", 1, 1 << 20, crate::core::Protocol::Sync);
        let mut s = crate::core::Replica::new(cfg, crate::core::Meta::new_device()).status();
        s.role = Role::Secondary;
        s.disk = DiskState::UpToDate;
        s.repl = ReplState::Established;
        s.peer_role = Some(Role::Secondary);
        s.peer_disk = Some(DiskState::UpToDate);
        s.resync = None;
        s.last_refusal = None;
        s
    }

    #[test]
    fn only_changed_objects_are_broadcast() {
        let mut bus = Bus::new("r0", "alpha");
        let mut rx = bus.sender().subscribe();
        let mut s = status();
        let view = |s: &Status| {
            objects(&View {
                status: s,
                peer: "beta",
                conn_error: None,
            })
        };
        assert_eq!(bus.update(view(&s)), 4, "first update: everything is new");
        assert_eq!(bus.update(view(&s)), 0);
        s.role = Role::Primary;
        assert_eq!(bus.update(view(&s)), 1);
        let mut last = Value::Null;
        while let Ok(v) = rx.try_recv() {
            last = v;
        }
        assert_eq!(
            human(&last),
            "change resource name:r0 role:Primary may-promote:no split-brain:no"
        );
    }

    #[test]
    fn resync_progress_and_refusals_read_like_events2() {
        let mut s = status();
        s.role = Role::Primary;
        s.repl = ReplState::SyncSource;
        s.peer_disk = Some(DiskState::Inconsistent);
        s.resync = Some((579, 1000));
        let o = objects(&View {
            status: &s,
            peer: "beta",
            conn_error: None,
        });
        let l = line("change", "peer-device", "r0", "alpha", &o[3]);
        assert_eq!(
            human(&l),
            "change peer-device name:r0 peer-node:beta replication:SyncSource peer-disk:Inconsistent done:42.1"
        );
        assert_eq!(l["done"], json!(42.1));
        assert_eq!(l["node"], "alpha");

        s.repl = ReplState::StandAlone;
        s.peer_role = None;
        let cause = crate::core::SplitBrainCause {
            what: "both nodes changed data since they last agreed",
            gen: 0x10,
            peer_gen: 0x20,
        };
        // A peer's refusal that reads like one is not a split brain: only the core's finding is.
        s.last_refusal = Some(crate::core::Refusal::ByPeer {
            code: crate::core::RefusalCode::SplitBrain,
            why: cause.to_string(),
        });
        let o = objects(&View {
            status: &s,
            peer: "beta",
            conn_error: None,
        });
        assert_eq!(o[0]["split_brain"], json!(false));
        s.split_brain = Some(crate::core::SplitBrain {
            reason: cause.clone(),
            node_id: 1,
            peer_node_id: 2,
            current_gen: 0x10,
            peer_current_gen: 0x20,
            common_gen: Some(0x8),
            changed_blocks: 3,
            peer_changed_blocks: 4,
            keep_mine: [String::new(), String::new()],
            keep_peers: [String::new(), String::new()],
        });
        let o = objects(&View {
            status: &s,
            peer: "beta",
            conn_error: None,
        });
        assert_eq!(o[0]["split_brain"], json!(true));
        s.last_refusal = Some(crate::core::Refusal::SplitBrain(cause));
        let o = objects(&View {
            status: &s,
            peer: "beta",
            conn_error: None,
        });
        let l = line("exists", "connection", "r0", "alpha", &o[2]);
        assert_eq!(
            human(&l),
            "exists connection name:r0 peer-node:beta connection:StandAlone reason:\"split brain: \
             both nodes changed data since they last agreed (this node generation 0x10, peer 0x20)\""
        );
    }

    #[test]
    fn may_promote_follows_the_promote_rules() {
        let mut s = status();
        assert!(may_promote(&s));
        s.peer_role = Some(Role::Primary);
        assert!(!may_promote(&s));
        s.peer_role = None;
        s.disk = DiskState::Outdated;
        assert!(!may_promote(&s));
        s.disk = DiskState::UpToDate;
        s.role = Role::Primary;
        assert!(!may_promote(&s), "already Primary");
    }

    #[test]
    fn exists_ends_with_a_marker() {
        let bus = Bus::new("r0", "alpha");
        let s = status();
        let o = objects(&View {
            status: &s,
            peer: "beta",
            conn_error: None,
        });
        let lines = bus.exists(&o);
        assert_eq!(lines.len(), 5);
        assert_eq!(human(&lines[4]), "exists -");
        assert_eq!(
            human(&dropped("r0", "alpha", 7)),
            "dropped - name:r0 count:7"
        );
    }
}
