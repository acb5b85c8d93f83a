//! Busy-polling of the event loop at low depth (issue 19): spin instead of sleeping while a
//! replicated write is in flight, and for a window after the last write event, but only where
//! it pays, backing off by itself where it does not.
//!
//! Every time the daemon's one thread sleeps (`epoll_wait`), the next event has to wake it; on a
//! virtual machine whose vCPU halted meanwhile that wake-up costs tens of microseconds, and a
//! sync write at queue depth 1 waits for four of them in the daemons (the client's request, the
//! extent reaching the Secondary, the Secondary's disk completion, the ack reaching the
//! Primary). A poll round yields to the runtime instead of sleeping (the runtime then checks its
//! sockets and the io_uring eventfd without blocking and runs the loop again) and to the kernel
//! (`sched_yield`, so that a client or peer process waiting for this CPU runs first).
//!
//! Spinning unconditionally (`TWINBLK_POLL_MODE=always`, the first version) helped only on an
//! idle machine (sync qd1 231.7 to 166.6 µs mean) and lost badly on a loaded one (294-425 to
//! 569-1,098 µs: a spinning daemon holds the CPU the client or the peer waits for). So
//! the adaptive mode spins only while all of these hold, in the spirit of Linux's hybrid block
//! polling and NAPI's busy-poll budget:
//! * depth: at most [`MAX_DEPTH`] writes in flight. Deeper, events arrive back to back and the
//!   loop seldom sleeps anyway.
//! * nobody waits for a CPU: `/proc/loadavg`'s count of runnable tasks (this thread included)
//!   is at most the number of CPUs, re-read each round (a `pread` of a kept descriptor: 0.5 µs
//!   here). A task that becomes runnable, the client woken by its reply, a build, the peer
//!   daemon, makes the spinner sleep at its next round instead of taking the CPU from it.
//! * a budget: one spin lasts at most twice the recent gap it waited (an average over the last
//!   spins that ended in the event), never more than the window (`TWINBLK_POLL_US`).
//! * hits: a spin whose event came within its budget is a hit, one that gave up is a miss. A
//!   hit rate under one half backs that kind of wait (in flight, or the window after) off, for
//!   1 ms doubling to 1 s while it keeps missing; the next probe starts afresh.

use std::fs::File;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// Deeper than this, the loop does not spin: completions arrive back to back.
pub(super) const MAX_DEPTH: usize = 2;
/// The window and longest spin when `TWINBLK_POLL_US` is unset (adaptive mode).
pub(super) const DEFAULT_WINDOW: Duration = Duration::from_micros(100);
/// The shortest spin budget, however short the recent gaps.
const MIN_BUDGET: Duration = Duration::from_micros(5);
const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A hit rate (moving average over about [`RATE_SPAN`] spins) under this backs off.
const MIN_HIT_RATE: f64 = 0.5;
const RATE_SPAN: f64 = 8.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Off,
    /// Spin only where it pays (the module's list).
    Adaptive,
    /// Spin whenever a write is in flight or the window is open (measuring only).
    Always,
}

/// How many tasks are runnable on the machine, this one included (`None`: cannot tell).
pub(super) trait RunQueue {
    fn running(&mut self) -> Option<u32>;
}

/// `/proc/loadavg`'s fourth field, `running/total`, read through a kept descriptor.
pub(super) struct LoadAvg {
    file: Option<File>,
    buf: [u8; 128],
}

impl LoadAvg {
    pub fn open() -> LoadAvg {
        LoadAvg {
            file: File::open("/proc/loadavg").ok(),
            buf: [0; 128],
        }
    }
}

impl RunQueue for LoadAvg {
    fn running(&mut self) -> Option<u32> {
        use std::os::unix::fs::FileExt;
        let n = self.file.as_ref()?.read_at(&mut self.buf, 0).ok()?;
        parse_running(std::str::from_utf8(&self.buf[..n]).ok()?)
    }
}

/// "0.93 1.53 1.57 3/182 17003" → 3.
fn parse_running(loadavg: &str) -> Option<u32> {
    let field = loadavg.split_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

/// One kind of wait's record: the recent gaps and hits, and its back-off.
#[derive(Debug)]
struct Tracker {
    /// Moving average of the gaps that spins waited and saw end (ns); `None`: none yet.
    gap: Option<f64>,
    hit_rate: f64,
    /// Spins counted since the last probe began.
    spins: u32,
    backoff: Duration,
    until: Option<Instant>,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            gap: None,
            hit_rate: 1.0,
            spins: 0,
            backoff: MIN_BACKOFF,
            until: None,
        }
    }

    fn budget(&self, window: Duration) -> Duration {
        match self.gap {
            None => window,
            Some(g) => Duration::from_nanos((2.0 * g) as u64).clamp(MIN_BUDGET, window),
        }
    }

    /// Whether backed off at `now`; a back-off that ended starts a fresh probe.
    fn backed_off(&mut self, now: Instant) -> bool {
        match self.until {
            Some(t) if now < t => true,
            Some(_) => {
                self.until = None;
                self.gap = None;
                self.hit_rate = 1.0;
                self.spins = 0;
                false
            }
            None => false,
        }
    }

    /// A wait that spun ended in its event after `gap` (whether the spin lasted that long or
    /// gave up before).
    fn gap(&mut self, gap: Duration) {
        let g = gap.as_nanos() as f64;
        self.gap = Some(match self.gap {
            None => g,
            Some(a) => a + (g - a) / RATE_SPAN,
        });
    }

    /// A spin ended: in its event (`hit`), or giving up.
    fn spun(&mut self, hit: bool, now: Instant) {
        let x = if hit { 1.0 } else { 0.0 };
        self.hit_rate += (x - self.hit_rate) / RATE_SPAN;
        self.spins += 1;
        if hit && self.hit_rate > 0.9 {
            self.backoff = MIN_BACKOFF;
        }
        if self.spins >= RATE_SPAN as u32 && self.hit_rate < MIN_HIT_RATE {
            self.until = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A write of this node is in flight (its disk write, or its extent's ack).
    InFlight,
    /// None is: the window after the last write event (the next request, the next extent).
    Window,
}

#[derive(Debug)]
struct Spin {
    kind: Kind,
    start: Instant,
    budget: Duration,
    /// At least one poll round ran (an event that was already queued is no hit).
    rounds: u32,
    /// The spin is over for this wait (budget spent, contended, or backed off): sleep.
    over: bool,
}

/// What the poll did: the `twinblk_busy_poll_*` metrics and the daemon's stop line.
#[derive(Debug, Default, Clone)]
pub(super) struct Stats {
    pub hits: Counter,
    pub misses: Counter,
    /// Spins ended, or not begun, because another task waited for a CPU.
    pub contended: Counter,
    pub rounds: Counter,
}

impl Stats {
    pub fn of(m: &crate::metrics::Metrics) -> Stats {
        Stats {
            hits: m.busy_poll_hits.clone(),
            misses: m.busy_poll_misses.clone(),
            contended: m.busy_poll_contended.clone(),
            rounds: m.busy_poll_rounds.clone(),
        }
    }
}

pub(super) struct Poller {
    mode: Mode,
    window: Duration,
    /// The last write event: a client request, a disk completion, a peer's extent or ack.
    last: Option<Instant>,
    spin: Option<Spin>,
    in_flight: Tracker,
    after: Tracker,
    runq: Box<dyn RunQueue + Send>,
    /// Runnable tasks (this one included) above which the loop does not spin.
    max_running: u32,
    pub stats: Stats,
}

impl Poller {
    /// `TWINBLK_POLL_US` (microseconds: 0 never polls; unset or unreadable: the default) and
    /// `TWINBLK_POLL_MODE` (`adaptive`, the default, or `always`).
    pub fn from_env(stats: Stats) -> Poller {
        let us: Option<u64> = std::env::var("TWINBLK_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok());
        let always = std::env::var("TWINBLK_POLL_MODE").is_ok_and(|m| m == "always");
        let (mode, window) = match us {
            Some(0) => (Mode::Off, Duration::ZERO),
            Some(us) => (
                if always { Mode::Always } else { Mode::Adaptive },
                Duration::from_micros(us),
            ),
            None if always => (Mode::Always, DEFAULT_WINDOW),
            None => (DEFAULT_MODE, DEFAULT_WINDOW),
        };
        // Runnable tasks allowed, this one included: one per CPU unless
        // `TWINBLK_POLL_RUNNING` says otherwise (for measuring).
        let max_running = std::env::var("TWINBLK_POLL_RUNNING")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        Poller::new(mode, window, Box::new(LoadAvg::open()), max_running, stats)
    }

    pub fn new(
        mode: Mode,
        window: Duration,
        runq: Box<dyn RunQueue + Send>,
        max_running: u32,
        stats: Stats,
    ) -> Poller {
        let mode = if window.is_zero() { Mode::Off } else { mode };
        Poller {
            mode,
            window,
            last: None,
            spin: None,
            in_flight: Tracker::new(),
            after: Tracker::new(),
            runq,
            max_running,
            stats,
        }
    }

    pub fn enabled(&self) -> bool {
        self.mode != Mode::Off
    }

    /// A write event happened at `now`: it ends the current spin (a hit if it came while
    /// spinning within the budget).
    pub fn touch(&mut self, now: Instant) {
        if self.mode == Mode::Off {
            return;
        }
        self.last = Some(now);
        if let Some(s) = self.spin.take() {
            if s.rounds > 0 {
                let gap = now.saturating_duration_since(s.start);
                self.tracker(s.kind).gap(gap);
                if !s.over {
                    // Still spinning: the event came within the budget (or the round it
                    // came in began within it).
                    self.count(s.kind, true, now);
                }
            }
        }
    }

    /// A poll round ran (the loop yielded instead of sleeping).
    pub fn round(&mut self) {
        self.stats.rounds.inc();
        if let Some(s) = &mut self.spin {
            s.rounds += 1;
        }
    }

    /// Whether to poll rather than sleep at `now`, with `depth` writes in flight.
    pub fn active(&mut self, depth: usize, now: Instant) -> bool {
        let open = depth > 0
            || self
                .last
                .is_some_and(|t| now.saturating_duration_since(t) < self.window);
        if !open {
            // The window closed: it stays closed until the next event.
            self.last = None;
        }
        match self.mode {
            Mode::Off => return false,
            Mode::Always => return open,
            Mode::Adaptive => {}
        }
        if !open {
            // Without an event: a spin in the window was a miss.
            self.give_up(now);
            self.spin = None;
            return false;
        }
        if depth > MAX_DEPTH {
            self.spin = None;
            return false;
        }
        let kind = if depth > 0 {
            Kind::InFlight
        } else {
            Kind::Window
        };
        if self.spin.as_ref().is_some_and(|s| s.kind != kind) {
            // The wait changed kind (the write completed locally, or a new one came): the old
            // spin ended in an event of its own.
            self.spin = None;
        }
        if self.spin.is_none() {
            let window = self.window;
            let t = self.tracker(kind);
            let over = t.backed_off(now);
            let budget = t.budget(window);
            self.spin = Some(Spin {
                kind,
                start: now,
                budget,
                rounds: 0,
                over,
            });
        }
        let Some(s) = &self.spin else { return false };
        if s.over {
            return false;
        }
        if now.saturating_duration_since(s.start) >= s.budget {
            self.give_up(now);
            return false;
        }
        match self.runq.running() {
            Some(n) if n <= self.max_running => true,
            _ => {
                // Someone waits for a CPU (or we cannot tell): sleep; neither hit nor miss.
                self.stats.contended.inc();
                if let Some(s) = &mut self.spin {
                    s.over = true;
                }
                false
            }
        }
    }

    /// The current spin ends without its event: a miss if it spun.
    fn give_up(&mut self, now: Instant) {
        if let Some(s) = &mut self.spin {
            if !s.over {
                s.over = true;
                if s.rounds > 0 {
                    let kind = s.kind;
                    self.count(kind, false, now);
                }
            }
        }
    }

    fn count(&mut self, kind: Kind, hit: bool, now: Instant) {
        if hit {
            self.stats.hits.inc();
        } else {
            self.stats.misses.inc();
        }
        self.tracker(kind).spun(hit, now);
    }

    fn tracker(&mut self, kind: Kind) -> &mut Tracker {
        match kind {
            Kind::InFlight => &mut self.in_flight,
            Kind::Window => &mut self.after,
        }
    }
}

/// The mode when `TWINBLK_POLL_US` is unset: off. Under load the adaptive mode never spins (a tie
/// with off), and with the idle poll (`idle_poll`, on by default) spinning loses even on an idle
/// machine: sync qd1 149.6-182.9 µs adaptive against 125.7-126.0 with the idle poll alone (the
/// README's Benchmarks).
pub(super) const DEFAULT_MODE: Mode = Mode::Off;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A run queue the test sets.
    struct Fake(Arc<AtomicU32>);
    impl RunQueue for Fake {
        fn running(&mut self) -> Option<u32> {
            match self.0.load(Ordering::Relaxed) {
                0 => None,
                n => Some(n),
            }
        }
    }

    const W: Duration = Duration::from_micros(100);
    const US: Duration = Duration::from_micros(1);

    fn poller(mode: Mode) -> (Poller, Arc<AtomicU32>) {
        let n = Arc::new(AtomicU32::new(1));
        (
            Poller::new(mode, W, Box::new(Fake(n.clone())), 2, Stats::default()),
            n,
        )
    }

    /// Spins (rounds while active) from `t` until the event at `t + gap`; returns whether it
    /// was still spinning when the event came.
    fn wait(p: &mut Poller, depth: usize, t: Instant, gap: Duration) -> bool {
        let mut now = t;
        let mut spinning = false;
        while now < t + gap {
            spinning = p.active(depth, now);
            if !spinning {
                break;
            }
            p.round();
            now += US;
        }
        p.touch(t + gap);
        spinning
    }

    #[test]
    fn off_never_polls() {
        let (mut p, _) = poller(Mode::Adaptive);
        p = Poller::new(Mode::Adaptive, Duration::ZERO, p.runq, 2, p.stats);
        let t = Instant::now();
        p.touch(t);
        assert!(!p.active(1, t));
        assert!(!p.active(0, t));
        assert!(!p.enabled());
    }

    #[test]
    fn always_polls_while_busy_and_for_the_window_after_the_last_event() {
        let (mut p, n) = poller(Mode::Always);
        n.store(9, Ordering::Relaxed);
        let t = Instant::now();
        // Nothing happened yet: an idle daemon sleeps.
        assert!(!p.active(0, t));
        // However deep and however loaded.
        assert!(p.active(32, t));
        p.touch(t);
        assert!(p.active(0, t + W / 2));
        assert!(!p.active(0, t + W));
        // The window closed: it stays closed until the next event, busy or not.
        assert!(!p.active(0, t + W / 2));
        assert!(p.active(1, t + 2 * W));
        p.touch(t + 2 * W);
        assert!(p.active(0, t + 2 * W + W / 2));
    }

    #[test]
    fn adaptive_polls_at_low_depth_only() {
        let (mut p, _) = poller(Mode::Adaptive);
        let t = Instant::now();
        assert!(!p.active(0, t), "idle: no window open");
        assert!(p.active(1, t));
        assert!(p.active(MAX_DEPTH, t));
        assert!(!p.active(MAX_DEPTH + 1, t));
        p.touch(t);
        assert!(p.active(0, t + US), "the window after an event");
        assert!(!p.active(0, t + W), "the window closed");
    }

    #[test]
    fn adaptive_sleeps_while_another_task_waits_for_a_cpu() {
        let (mut p, n) = poller(Mode::Adaptive);
        let t = Instant::now();
        n.store(3, Ordering::Relaxed);
        assert!(!p.active(1, t));
        assert_eq!(p.stats.contended.get(), 1);
        // The spin is over for this wait, even once the CPU frees up: the loop sleeps until
        // its next event.
        n.store(2, Ordering::Relaxed);
        assert!(!p.active(1, t + US));
        p.touch(t + 2 * US);
        assert!(p.active(1, t + 3 * US), "the next wait spins again");
        // Cannot read the run queue: do not spin.
        n.store(0, Ordering::Relaxed);
        p.touch(t + 4 * US);
        assert!(!p.active(1, t + 5 * US));
        // Neither counts as a miss: contention does not back off the next spins.
        assert_eq!(p.stats.misses.get(), 0);
    }

    #[test]
    fn the_budget_follows_the_recent_gaps() {
        let (mut p, _) = poller(Mode::Adaptive);
        let mut t = Instant::now();
        for _ in 0..32 {
            assert!(wait(&mut p, 1, t, 10 * US), "a 10 us gap is a hit");
            t += W;
        }
        assert!(p.stats.hits.get() >= 32 && p.stats.misses.get() == 0);
        // The average gap is 10 us: a spin lasts about 20 us, then the loop sleeps.
        assert!(p.active(1, t));
        p.round();
        assert!(p.active(1, t + 19 * US));
        assert!(!p.active(1, t + 21 * US));
        assert_eq!(p.stats.misses.get(), 1);
        // The window after an event has a record of its own: no gaps yet, the whole window.
        p.touch(t + 30 * US);
        assert!(p.active(0, t + 30 * US + W - US));
    }

    #[test]
    fn a_low_hit_rate_backs_off_and_probes_again_later() {
        let (mut p, _) = poller(Mode::Adaptive);
        let mut t = Instant::now();
        // Events come well after the window: every spin misses.
        let mut spun = 0;
        for _ in 0..8 {
            if wait(&mut p, 1, t, 3 * W) {
                spun += 1;
            }
            t += 4 * W;
        }
        assert_eq!(spun, 0);
        assert!(p.stats.misses.get() >= 4);
        // Backed off: the next waits sleep at once, for at least MIN_BACKOFF.
        let misses = p.stats.misses.get();
        assert!(!p.active(1, t));
        p.touch(t + US);
        assert!(!p.active(1, t + 2 * US));
        p.touch(t + 3 * US);
        assert_eq!(p.stats.misses.get(), misses, "a backed-off wait is no spin");
        // The window after an event is another kind of wait: not backed off.
        assert!(p.active(0, t + 4 * US));
        // After the back-off, a probe spins again with the whole window.
        let later = t + MIN_BACKOFF + W;
        p.touch(later);
        assert!(p.active(1, later));
        p.round();
        assert!(p.active(1, later + W - US));
        // Missing again backs off for longer (doubling).
        assert!(!p.active(1, later + W));
        let mut t = later + 2 * W;
        for _ in 0..16 {
            wait(&mut p, 1, t, 3 * W);
            t += 4 * W;
        }
        assert!(p.in_flight.backoff >= 2 * MIN_BACKOFF);
    }

    #[test]
    fn parses_the_running_count() {
        assert_eq!(parse_running("0.93 1.53 1.57 3/182 17003\n"), Some(3));
        assert_eq!(parse_running("0.93 1.53"), None);
        assert_eq!(parse_running("a b c x/1 2"), None);
        let mut l = LoadAvg::open();
        if std::path::Path::new("/proc/loadavg").exists() {
            // This thread is running while it reads.
            assert!(l.running().is_some_and(|n| n >= 1));
        }
    }
}
