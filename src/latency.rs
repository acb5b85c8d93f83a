//! The per-stage latency breakdown of replicated writes (issue 19): where a write's time goes,
//! on this node and on the peer. Pure bookkeeping: the node driver takes the timestamps around
//! the actions it executes (the core never sees a clock) and records each stage's duration
//! here; `twinblk status --latency` reads the last N seconds, Prometheus the whole history
//! (`twinblk_write_stage_seconds{stage}`, see docs/metrics.md).
//!
//! A write on the Primary, and the stages it is cut into (the peer's four are measured there
//! and travel back in its [`crate::wire::AckTiming`]):
//!
//! ```text
//! frontend receive ─frontend─▶ event loop ─core─▶ local submit ─local_disk─▶ local done ┐
//!                                            └─▶ send ─transport (both ways)─▶ ack frame ─ack_receive─▶ event loop ┤
//!                        peer: frame ─peer_receive─▶ event loop ─peer_queue─▶ submit        │
//!                              ─peer_disk─▶ done ─peer_ack─▶ ack queued                      ▼
//!                                     client completion ◀─complete─ last of both ◀──────────┘
//!                                     frontend answers ◀─reply─
//! ```
//!
//! `transport` is the send-to-ack time minus the peer's own time (frame read to ack queued):
//! both QUIC stacks, their tasks and the kernel's UDP, each way. The event loops read their
//! frames from the QUIC streams themselves, so a frame is "read" when its event loop takes it:
//! the `*_receive` stages are the decode and hand-over to the core (well under a microsecond),
//! and a frame's wait for its event loop counts as `transport`. Local disk and the peer's path
//! run side by side: in protocol sync the slower of the two is what the client waits for.
//!
//! Always on; its cost (a handful of clock reads and histogram updates per write, about a
//! microsecond of CPU: `cargo bench --bench latency`) is in the README's "Benchmarks".
//! `TWINBLK_LATENCY=off` in the daemon's environment turns it off, only to measure that.

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;

/// One measured stage. The order is the table's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// NBD request parsed -> the event loop takes it.
    Frontend,
    /// The event loop hands it to the core -> its local disk write starts (admission: activity
    /// log, overlapping writes, the async send buffer).
    Core,
    /// Local disk write, started -> its completion reaches the event loop.
    LocalDisk,
    /// Extent queued for the peer -> its ack frame read here, minus the peer's time.
    Transport,
    /// Peer: extent frame read -> its event loop takes it.
    PeerReceive,
    /// Peer: its event loop -> its disk write starts (in-order apply, overlaps).
    PeerQueue,
    /// Peer: disk write, started -> completion in its event loop.
    PeerDisk,
    /// Peer: disk write done -> ack queued.
    PeerAck,
    /// Ack frame read here -> the event loop takes it.
    AckReceive,
    /// The last of local completion and (sync) the peer's ack -> the core completes the client.
    Complete,
    /// Client completion -> the frontend's request task runs to answer.
    Reply,
    /// NBD request parsed -> the frontend answers: the whole write.
    Total,
    /// Secondary: extent frame read -> the event loop takes it.
    ApplyReceive,
    /// Secondary: event loop -> disk write starts.
    ApplyQueue,
    /// Secondary: disk write, started -> completion in the event loop.
    ApplyDisk,
    /// Secondary: disk write done -> ack queued.
    ApplyAck,
}

impl Stage {
    pub const ALL: [Stage; 16] = [
        Stage::Frontend,
        Stage::Core,
        Stage::LocalDisk,
        Stage::Transport,
        Stage::PeerReceive,
        Stage::PeerQueue,
        Stage::PeerDisk,
        Stage::PeerAck,
        Stage::AckReceive,
        Stage::Complete,
        Stage::Reply,
        Stage::Total,
        Stage::ApplyReceive,
        Stage::ApplyQueue,
        Stage::ApplyDisk,
        Stage::ApplyAck,
    ];

    /// The metric label and JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Frontend => "frontend",
            Stage::Core => "core",
            Stage::LocalDisk => "local_disk",
            Stage::Transport => "transport",
            Stage::PeerReceive => "peer_receive",
            Stage::PeerQueue => "peer_queue",
            Stage::PeerDisk => "peer_disk",
            Stage::PeerAck => "peer_ack",
            Stage::AckReceive => "ack_receive",
            Stage::Complete => "complete",
            Stage::Reply => "reply",
            Stage::Total => "total",
            Stage::ApplyReceive => "apply_receive",
            Stage::ApplyQueue => "apply_queue",
            Stage::ApplyDisk => "apply_disk",
            Stage::ApplyAck => "apply_ack",
        }
    }

    /// What the stage is, for the table.
    pub fn what(self) -> &'static str {
        match self {
            Stage::Frontend => "NBD request -> event loop",
            Stage::Core => "event loop -> local disk submit",
            Stage::LocalDisk => "local disk write",
            Stage::Transport => "QUIC + UDP, both ways",
            Stage::PeerReceive => "frame -> event loop",
            Stage::PeerQueue => "event loop -> disk submit",
            Stage::PeerDisk => "disk write",
            Stage::PeerAck => "disk done -> ack queued",
            Stage::AckReceive => "ack frame -> event loop",
            Stage::Complete => "last of both -> completion",
            Stage::Reply => "completion -> NBD answer",
            Stage::Total => "whole write (NBD in -> out)",
            Stage::ApplyReceive => "frame -> event loop",
            Stage::ApplyQueue => "event loop -> disk submit",
            Stage::ApplyDisk => "disk write",
            Stage::ApplyAck => "disk done -> ack queued",
        }
    }

    /// Whose time it is: this node, the peer (reported with its acks), or the link between.
    pub fn side(self) -> Side {
        match self {
            Stage::PeerReceive | Stage::PeerQueue | Stage::PeerDisk | Stage::PeerAck => Side::Peer,
            Stage::Transport => Side::Link,
            _ => Side::Local,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Local,
    Peer,
    Link,
}

/// Whether the daemon measures (`TWINBLK_LATENCY=off` turns it off, to measure its cost).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("TWINBLK_LATENCY").as_deref(),
            Ok("off" | "0" | "false")
        )
    })
}

/// Log-linear buckets: four per power of two of nanoseconds (each about 19 % wide).
const BUCKETS: usize = 4 * 44;

fn bucket(ns: u64) -> usize {
    if ns < 8 {
        return ns as usize;
    }
    let log = 63 - ns.leading_zeros() as usize;
    let frac = ((ns >> (log - 2)) & 3) as usize;
    (log * 4 + frac).min(BUCKETS - 1)
}

/// The smallest value of bucket `i`.
fn bucket_low(i: usize) -> u64 {
    match i {
        0..8 => i as u64,
        // Never used (8 ns starts at 12): empty, so the lows never go down.
        8..12 => 8,
        _ => (4 + (i as u64 & 3)) << (i / 4 - 2),
    }
}

/// One stage's durations in one interval.
#[derive(Clone)]
struct Hist {
    count: u64,
    sum_ns: u64,
    max_ns: u64,
    buckets: [u32; BUCKETS],
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            count: 0,
            sum_ns: 0,
            max_ns: 0,
            buckets: [0; BUCKETS],
        }
    }
}

impl Hist {
    fn add(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.max_ns = self.max_ns.max(ns);
        let b = &mut self.buckets[bucket(ns)];
        *b = b.saturating_add(1);
    }

    fn merge(&mut self, o: &Hist) {
        self.count += o.count;
        self.sum_ns = self.sum_ns.saturating_add(o.sum_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// The `q` quantile, as the middle of its bucket (never above the maximum seen).
    fn quantile_ns(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                let (lo, hi) = (bucket_low(i), bucket_low(i + 1));
                return (lo + hi.saturating_sub(lo) / 2).min(self.max_ns);
            }
        }
        self.max_ns
    }
}

/// The stages of one second.
struct Slot {
    second: u64,
    hists: Vec<Hist>,
}

/// Seconds kept for `status --latency`.
pub const WINDOW_SECS: u64 = 60;

/// Every stage's durations over the last [`WINDOW_SECS`] seconds, one slot per second, and
/// (if given) the Prometheus histograms that keep the whole history.
pub struct Window {
    slots: Vec<Slot>,
    prom: Vec<prometheus_client::metrics::histogram::Histogram>,
}

impl Default for Window {
    fn default() -> Self {
        Window::new(Vec::new())
    }
}

impl Window {
    /// `prom`: one histogram per stage, in [`Stage::ALL`]'s order (or none).
    pub fn new(prom: Vec<prometheus_client::metrics::histogram::Histogram>) -> Window {
        Window {
            slots: (0..WINDOW_SECS)
                .map(|_| Slot {
                    second: u64::MAX,
                    hists: vec![Hist::default(); Stage::ALL.len()],
                })
                .collect(),
            prom,
        }
    }

    /// Records `d` for `stage` in second `second` (seconds since any fixed start).
    pub fn record(&mut self, stage: Stage, d: Duration, second: u64) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if let Some(p) = self.prom.get(stage.index()) {
            p.observe(d.as_secs_f64());
        }
        let n = self.slots.len() as u64;
        let Some(slot) = self.slots.get_mut((second % n.max(1)) as usize) else {
            return;
        };
        if slot.second != second {
            slot.second = second;
            for h in &mut slot.hists {
                h.count = 0;
                h.sum_ns = 0;
                h.max_ns = 0;
                h.buckets.fill(0);
            }
        }
        if let Some(h) = slot.hists.get_mut(stage.index()) {
            h.add(ns);
        }
    }

    /// Every stage over the `secs` seconds up to and including `now_second`.
    pub fn summary(&self, secs: u64, now_second: u64) -> Vec<(Stage, StageSummary)> {
        let from = now_second.saturating_sub(secs.clamp(1, WINDOW_SECS) - 1);
        let mut total = vec![Hist::default(); Stage::ALL.len()];
        for s in &self.slots {
            if s.second != u64::MAX && s.second >= from && s.second <= now_second {
                for (t, h) in total.iter_mut().zip(s.hists.iter()) {
                    t.merge(h);
                }
            }
        }
        Stage::ALL
            .iter()
            .zip(total.iter())
            .map(|(st, h)| {
                let us = |ns: u64| ns as f64 / 1000.0;
                (
                    *st,
                    StageSummary {
                        count: h.count,
                        mean_us: if h.count == 0 {
                            0.0
                        } else {
                            us(h.sum_ns) / h.count as f64
                        },
                        p50_us: us(h.quantile_ns(0.5)),
                        p99_us: us(h.quantile_ns(0.99)),
                        max_us: us(h.max_ns),
                    },
                )
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageSummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// The JSON `status --latency --json` prints (and the table is drawn from): the stages with
/// samples, each named by the node whose time it is.
pub fn to_json(
    stages: &[(Stage, StageSummary)],
    secs: u64,
    node: &str,
    peer: &str,
) -> serde_json::Value {
    let rows: Vec<_> = stages
        .iter()
        .filter(|(_, s)| s.count > 0)
        .map(|(st, s)| {
            let who = match st.side() {
                Side::Local => node.to_owned(),
                Side::Peer => peer.to_owned(),
                Side::Link => format!("{node}<->{peer}"),
            };
            json!({
                "stage": st.name(),
                "what": st.what(),
                "node": who,
                "count": s.count,
                "mean_us": round1(s.mean_us),
                "p50_us": round1(s.p50_us),
                "p99_us": round1(s.p99_us),
                "max_us": round1(s.max_us),
            })
        })
        .collect();
    json!({ "seconds": secs, "node": node, "peer": peer, "stages": rows })
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// The table `twinblk status --latency` prints, from [`to_json`]'s value.
pub fn table(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let secs = v.get("seconds").and_then(|s| s.as_u64()).unwrap_or(0);
    let node = v.get("node").and_then(|s| s.as_str()).unwrap_or("?");
    let rows = v
        .get("stages")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    let total = rows
        .iter()
        .find(|r| r.get("stage").and_then(|s| s.as_str()) == Some("total"))
        .and_then(|r| r.get("mean_us"))
        .and_then(|m| m.as_f64());
    let _ = writeln!(
        out,
        "write latency on {node}, last {secs} s (µs; local disk and the peer's path run side by side)"
    );
    if rows.is_empty() {
        let _ = writeln!(out, "  no replicated writes in that time");
        return out;
    }
    let _ = writeln!(
        out,
        "  {:<14} {:<14} {:<30} {:>8} {:>9} {:>9} {:>9} {:>6}",
        "stage", "node", "what", "writes", "mean", "p50", "p99", "share"
    );
    for r in &rows {
        let s = |k: &str| r.get(k).and_then(|x| x.as_str()).unwrap_or("");
        let f = |k: &str| r.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
        let share = match total {
            Some(t) if t > 0.0 && s("stage") != "total" => {
                format!("{:.0}%", 100.0 * f("mean_us") / t)
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<14} {:<14} {:<30} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>6}",
            s("stage"),
            s("node"),
            s("what"),
            r.get("count").and_then(|x| x.as_u64()).unwrap_or(0),
            f("mean_us"),
            f("p50_us"),
            f("p99_us"),
            share
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_contain_their_values() {
        for i in 1..BUCKETS {
            assert!(bucket_low(i) >= bucket_low(i - 1), "bucket {i}");
            if i > 12 {
                assert!(bucket_low(i) > bucket_low(i - 1), "bucket {i}");
            }
        }
        for ns in [
            0u64,
            1,
            7,
            8,
            9,
            100,
            1000,
            4095,
            4096,
            123_456,
            10_000_000_000,
        ] {
            let b = bucket(ns);
            assert!(bucket_low(b) <= ns && ns < bucket_low(b + 1), "{ns} in {b}");
        }
    }

    #[test]
    fn summary_covers_the_asked_seconds_only() {
        let mut w = Window::default();
        for i in 0..100 {
            w.record(Stage::LocalDisk, Duration::from_micros(50), 10);
            w.record(
                Stage::LocalDisk,
                Duration::from_micros(if i == 99 { 5000 } else { 100 }),
                11,
            );
        }
        w.record(Stage::PeerDisk, Duration::from_micros(70), 3);
        let s = w.summary(1, 11);
        let (_, d) = s.iter().find(|(st, _)| *st == Stage::LocalDisk).unwrap();
        assert_eq!(d.count, 100);
        assert!(d.p50_us > 80.0 && d.p50_us < 120.0, "{d:?}");
        assert!(d.max_us >= 5000.0);
        let s = w.summary(2, 11);
        let (_, d) = s.iter().find(|(st, _)| *st == Stage::LocalDisk).unwrap();
        assert_eq!(d.count, 200);
        assert!(d.p50_us > 40.0 && d.p50_us < 60.0, "{d:?}");
        // Second 3 is outside both windows; a slot reused 60 s later starts empty.
        assert!(s
            .iter()
            .all(|(st, d)| *st != Stage::PeerDisk || d.count == 0));
        w.record(Stage::LocalDisk, Duration::from_micros(1), 10 + WINDOW_SECS);
        let s = w.summary(1, 10 + WINDOW_SECS);
        let (_, d) = s.iter().find(|(st, _)| *st == Stage::LocalDisk).unwrap();
        assert_eq!(d.count, 1);
    }

    #[test]
    fn the_table_names_the_nodes_and_skips_empty_stages() {
        let mut w = Window::default();
        w.record(Stage::Total, Duration::from_micros(200), 5);
        w.record(Stage::PeerDisk, Duration::from_micros(50), 5);
        w.record(Stage::Transport, Duration::from_micros(60), 5);
        let v = to_json(&w.summary(10, 5), 10, "alpha", "beta");
        let t = table(&v);
        assert!(t.contains("peer_disk") && t.contains("beta"), "{t}");
        assert!(t.contains("alpha<->beta"), "{t}");
        assert!(t.contains("25%"), "{t}");
        assert!(!t.contains("local_disk"), "{t}");
        let empty = to_json(&Window::default().summary(10, 5), 10, "alpha", "beta");
        assert!(table(&empty).contains("no replicated writes"));
    }
}
