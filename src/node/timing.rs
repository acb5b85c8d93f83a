//! The driver's half of the latency breakdown ([`crate::latency`]): it takes an instant around
//! each action it executes for a write and records the stages once both ends are known. The
//! core is never asked the time; the only thing asked of it is what a disk I/O is for
//! ([`crate::core::Replica::io_origin`]).
//!
//! On the Primary a write is followed by its request id from the frontend to the client's
//! answer; its extent by its sequence number (the `Send` right after its `DiskWrite` in the
//! same batch, same offset). On the Secondary the peer's extent is followed by its sequence
//! number from the frame to the ack, whose [`AckTiming`] carries the stages back.
//!
//! Everything here is bounded: entries leave at completion (and ack), a connection change
//! drops what can no longer be answered, and the maps are cleared outright if they ever grow
//! past [`MAX_TRACKED`] (a bug here must not grow the daemon).

use crate::idmap::IdMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::core::{AckTiming, IoId, IoOrigin, ReqId};
use crate::latency::{Stage, StageSummary, Window};

/// More writes than any queue depth tracked at once means entries leak: start over.
const MAX_TRACKED: usize = 1 << 16;

/// The stage histograms, shared by the event loop and the frontend (which times its answer).
#[derive(Clone)]
pub(crate) struct Recorder {
    window: Arc<Mutex<Window>>,
    start: Instant,
    on: bool,
}

impl Recorder {
    pub fn new(metrics: &crate::metrics::Metrics) -> Recorder {
        let prom = Stage::ALL
            .iter()
            .map(|s| metrics.write_stage(s.name()))
            .collect();
        Recorder {
            window: Arc::new(Mutex::new(Window::new(prom))),
            start: Instant::now(),
            on: crate::latency::enabled(),
        }
    }

    /// `Instant::now()` while measuring.
    pub fn now(&self) -> Option<Instant> {
        self.on.then(Instant::now)
    }

    pub fn record(&self, stages: &[(Stage, Duration)], now: Instant) {
        let second = now.saturating_duration_since(self.start).as_secs();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        for (s, d) in stages {
            w.record(*s, *d, second);
        }
    }

    /// Every stage over the last `secs` seconds.
    pub fn summary(&self, secs: u64) -> Vec<(Stage, StageSummary)> {
        let second = self.start.elapsed().as_secs();
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.summary(secs, second)
    }
}

struct Write {
    /// The event loop handed it to the core.
    admit: Instant,
    submit: Option<Instant>,
    local_done: Option<Instant>,
    /// Its extent was queued for the peer (and an ack is still to come).
    sent: Option<Instant>,
    /// The ack reached the event loop.
    acked: Option<Instant>,
    completed: bool,
}

struct Apply {
    read: Instant,
    admit: Instant,
    submit: Option<Instant>,
    done: Option<Instant>,
}

/// The per-write instants the event loop keeps.
pub(super) struct Timing {
    pub rec: Recorder,
    /// Protocol sync: a completion waits for the ack too.
    sync: bool,
    writes: IdMap<ReqId, Write>,
    io_req: IdMap<IoId, ReqId>,
    seq_req: IdMap<u64, ReqId>,
    /// The client write whose `DiskWrite` ran last in this batch: its `Send` follows.
    last_submit: Option<(u64, ReqId)>,
    applies: IdMap<u64, Apply>,
    io_seq: IdMap<IoId, u64>,
}

fn ns32(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

impl Timing {
    pub fn new(rec: Recorder, sync: bool) -> Timing {
        Timing {
            rec,
            sync,
            writes: IdMap::default(),
            io_req: IdMap::default(),
            seq_req: IdMap::default(),
            last_submit: None,
            applies: IdMap::default(),
            io_seq: IdMap::default(),
        }
    }

    fn bound(&mut self) {
        if self.writes.len() > MAX_TRACKED || self.applies.len() > MAX_TRACKED {
            tracing::warn!("latency breakdown: too many writes tracked; starting over");
            self.writes.clear();
            self.io_req.clear();
            self.seq_req.clear();
            self.applies.clear();
            self.io_seq.clear();
        }
    }

    /// A new batch of actions starts.
    pub fn batch(&mut self) {
        self.last_submit = None;
    }

    /// Primary: a client write `req` reaches the core; `at` is when the frontend parsed it.
    pub fn client_write(&mut self, req: ReqId, at: Option<Instant>) {
        let Some(now) = self.rec.now() else {
            return;
        };
        self.bound();
        if let Some(at) = at {
            self.rec
                .record(&[(Stage::Frontend, now.saturating_duration_since(at))], now);
        }
        self.writes.insert(
            req,
            Write {
                admit: now,
                submit: None,
                local_done: None,
                sent: None,
                acked: None,
                completed: false,
            },
        );
    }

    /// A disk write (or zeroing) `io` at `offset` starts.
    pub fn disk_submit(&mut self, origin: Option<IoOrigin>, io: IoId, offset: u64) {
        let Some(now) = self.rec.now() else {
            return;
        };
        match origin {
            Some(IoOrigin::Client(req)) => {
                if let Some(w) = self.writes.get_mut(&req) {
                    w.submit = Some(now);
                    self.rec.record(
                        &[(Stage::Core, now.saturating_duration_since(w.admit))],
                        now,
                    );
                    self.io_req.insert(io, req);
                    self.last_submit = Some((offset, req));
                }
            }
            Some(IoOrigin::Peer(seq)) => {
                if let Some(a) = self.applies.get_mut(&seq) {
                    a.submit = Some(now);
                    let d = now.saturating_duration_since(a.admit);
                    self.rec.record(&[(Stage::ApplyQueue, d)], now);
                    self.io_seq.insert(io, seq);
                }
            }
            None => {}
        }
    }

    /// The disk I/O `io` completed (before the core hears of it).
    pub fn disk_done(&mut self, io: IoId) {
        if self.io_req.is_empty() && self.io_seq.is_empty() {
            return;
        }
        let Some(now) = self.rec.now() else {
            return;
        };
        if let Some(req) = self.io_req.remove(&io) {
            if let Some(w) = self.writes.get_mut(&req) {
                w.local_done = Some(now);
                if let Some(s) = w.submit {
                    let d = now.saturating_duration_since(s);
                    self.rec.record(&[(Stage::LocalDisk, d)], now);
                }
            }
        } else if let Some(seq) = self.io_seq.remove(&io) {
            if let Some(a) = self.applies.get_mut(&seq) {
                a.done = Some(now);
                if let Some(s) = a.submit {
                    let d = now.saturating_duration_since(s);
                    self.rec.record(&[(Stage::ApplyDisk, d)], now);
                }
            }
        }
    }

    /// Primary: the extent `seq` at `offset` is queued for the peer.
    pub fn sent(&mut self, seq: u64, offset: u64) {
        let Some((off, req)) = self.last_submit.take() else {
            return;
        };
        if off != offset {
            return;
        }
        if let (Some(w), Some(now)) = (self.writes.get_mut(&req), self.rec.now()) {
            w.sent = Some(now);
            self.seq_req.insert(seq, req);
        }
    }

    /// Primary: the peer's ack of `seq` reaches the event loop; `at` is when its frame was read.
    pub fn acked(&mut self, seq: u64, at: Option<Instant>, peer: &AckTiming) {
        let Some(req) = self.seq_req.remove(&seq) else {
            return;
        };
        let Some(now) = self.rec.now() else {
            return;
        };
        let Some(w) = self.writes.get_mut(&req) else {
            return;
        };
        w.acked = Some(now);
        let mut st: [(Stage, Duration); 6] = [(Stage::AckReceive, Duration::ZERO); 6];
        let mut n = 0;
        if let Some(at) = at {
            st[n] = (Stage::AckReceive, now.saturating_duration_since(at));
            n += 1;
            if let Some(sent) = w.sent {
                if peer.total_ns() > 0 {
                    let round = at.saturating_duration_since(sent);
                    let transport = round.saturating_sub(Duration::from_nanos(peer.total_ns()));
                    st[n] = (Stage::Transport, transport);
                    n += 1;
                }
            }
        }
        if peer.total_ns() > 0 {
            for (s, ns) in [
                (Stage::PeerReceive, peer.receive_ns),
                (Stage::PeerQueue, peer.queue_ns),
                (Stage::PeerDisk, peer.disk_ns),
                (Stage::PeerAck, peer.ack_ns),
            ] {
                st[n] = (s, Duration::from_nanos(u64::from(ns)));
                n += 1;
            }
        }
        self.rec.record(&st[..n], now);
        if w.completed {
            self.writes.remove(&req);
        }
    }

    /// The core completes client request `req`: returns the instant to pass to the frontend
    /// (which times its answer) if it is a tracked write.
    pub fn complete(&mut self, req: ReqId) -> Option<Instant> {
        if self.writes.is_empty() {
            return None;
        }
        let now = self.rec.now()?;
        let w = self.writes.get_mut(&req)?;
        let waited_ack = self.sync && w.sent.is_some();
        let ready = match (w.local_done, waited_ack.then_some(w.acked).flatten()) {
            (Some(l), Some(a)) => Some(l.max(a)),
            (Some(l), None) if !waited_ack => Some(l),
            _ => None,
        };
        if let Some(r) = ready {
            self.rec
                .record(&[(Stage::Complete, now.saturating_duration_since(r))], now);
        }
        w.completed = true;
        if w.sent.is_none() || w.acked.is_some() {
            self.writes.remove(&req);
        }
        Some(now)
    }

    /// Secondary: the peer's extent `seq` reaches the event loop; `at` is when its frame was
    /// read.
    pub fn apply_receive(&mut self, seq: u64, at: Option<Instant>) {
        let Some(now) = self.rec.now() else {
            return;
        };
        self.bound();
        if let Some(at) = at {
            let d = now.saturating_duration_since(at);
            self.rec.record(&[(Stage::ApplyReceive, d)], now);
        }
        self.applies.insert(
            seq,
            Apply {
                read: at.unwrap_or(now),
                admit: now,
                submit: None,
                done: None,
            },
        );
    }

    /// Secondary: the ack of `seq` is about to be queued: where its time went here.
    pub fn ack_timing(&mut self, seq: u64) -> AckTiming {
        let Some(a) = self.applies.remove(&seq) else {
            return AckTiming::default();
        };
        let Some(now) = self.rec.now() else {
            return AckTiming::default();
        };
        let (Some(submit), Some(done)) = (a.submit, a.done) else {
            return AckTiming::default();
        };
        let ack = now.saturating_duration_since(done);
        self.rec.record(&[(Stage::ApplyAck, ack)], now);
        AckTiming {
            receive_ns: ns32(a.admit.saturating_duration_since(a.read)),
            queue_ns: ns32(submit.saturating_duration_since(a.admit)),
            disk_ns: ns32(done.saturating_duration_since(submit)),
            // At least 1 ns: all zeros means "not measured".
            ack_ns: ns32(ack).max(1),
        }
    }

    /// The connection changed: no ack comes for what was sent on the old one, and its extents
    /// on this side are gone.
    pub fn connection_changed(&mut self) {
        self.seq_req.clear();
        self.applies.clear();
        self.io_seq.clear();
        self.writes.retain(|_, w| !w.completed);
        for w in self.writes.values_mut() {
            w.sent = None;
        }
    }
}
