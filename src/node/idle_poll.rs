//! Idle polling while replicated writes flow (issue 19, the resource file's `idle-poll`): from
//! a write event until `idle-poll` after the last one, the daemon asks the kernel to keep idle
//! CPUs polling instead of halting, with a CPU latency request of 0 µs on
//! `/dev/cpu_dma_latency` (PM QoS, what tuned's latency profiles set for the whole machine).
//!
//! Why: a sync write waits for the other daemon at least three times (the extent reaching the
//! Secondary, the Secondary's disk completion, the ack reaching the Primary), and each time the
//! CPU that runs the waiting daemon has usually gone idle. A halted CPU is woken by an
//! interrupt; on a virtual machine that is a VM exit on both sides and the host scheduling the
//! vCPU again. A `perf sched` trace of one 4 KiB qd1 write here showed 27 and 53 µs from a
//! wake-up to the Secondary running. A polling idle CPU notices the wake-up at once and needs
//! no interrupt (the kernel's `TIF_POLLING_NRFLAG`). Measured (sync pair, fio nbd, 4k randwrite
//! qd1, this 2-vCPU VM): 265-290 µs mean without, 118-119 µs with; qd32 IOPS unchanged.
//!
//! Unlike the event loop's busy-poll (`node::poll`), this spins only in the kernel's idle
//! loop, which runs only when no task wants that CPU: it never takes a CPU from the client,
//! the peer daemon or anything else, so deep queues and a loaded machine lose nothing. Its
//! cost is power, or on a virtual machine host CPU time, while writes flow and for the linger
//! after the last one; `idle-poll = "off"` turns it off. The kernel drops the request when the
//! descriptor closes, so a daemon killed with -9 leaves nothing behind.
//!
//! Opening the device needs root (it is mode 0600); a daemon that cannot open it says so once
//! at `up` and runs without.

use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// The device that carries a process's CPU latency request.
pub(super) const DEVICE: &str = "/dev/cpu_dma_latency";
/// The latency asked for while held: 0 µs, so idle CPUs poll.
const HOLD_US: i32 = 0;
/// The latency asked for when released: the kernel's default (no constraint,
/// `PM_QOS_CPU_LATENCY_DEFAULT_VALUE`, 2000 s), so the request no longer counts.
const RELEASE_US: i32 = 2_000_000_000;

/// Where the latency request goes: the device, or a test's recorder.
pub(super) trait Request {
    /// Ask for `us` microseconds of wake-up latency at most.
    fn set(&mut self, us: i32) -> std::io::Result<()>;
}

/// The kernel's PM QoS request, held open for the daemon's life.
struct CpuDmaLatency(File);

impl Request for CpuDmaLatency {
    fn set(&mut self, us: i32) -> std::io::Result<()> {
        // The device takes a native-endian 32-bit value (or a hex string).
        self.0.write_all(&us.to_ne_bytes())
    }
}

/// What the idle poll did: the `twinblk_idle_poll_*` metrics.
#[derive(Debug, Default, Clone)]
pub(super) struct Stats {
    /// 1 while the request is held.
    pub held: Gauge,
    /// Times the request was taken.
    pub holds: Counter,
}

impl Stats {
    pub fn of(m: &crate::metrics::Metrics) -> Stats {
        Stats {
            held: m.idle_poll_held.clone(),
            holds: m.idle_poll_holds.clone(),
        }
    }
}

enum State {
    /// `idle-poll = "off"`, or the device could not be opened or written.
    Off,
    Released,
    /// Held since the first write event after a release; `last` is the latest write event.
    Held {
        last: Instant,
    },
}

pub(super) struct IdlePoll {
    linger: Duration,
    request: Option<Box<dyn Request + Send>>,
    state: State,
    pub stats: Stats,
}

impl IdlePoll {
    /// Opens [`DEVICE`] unless `linger` is zero (`idle-poll = "off"`). A daemon that cannot
    /// open it (not root, no such device) logs why once and runs without.
    pub fn open(linger: Duration, stats: Stats) -> IdlePoll {
        if linger.is_zero() {
            return IdlePoll::new(linger, None, stats);
        }
        let request = match std::fs::OpenOptions::new().write(true).open(DEVICE) {
            Ok(f) => Some(Box::new(CpuDmaLatency(f)) as Box<dyn Request + Send>),
            Err(e) => {
                tracing::warn!(
                    "idle-poll: cannot open {DEVICE} ({e}): idle CPUs will halt between a sync \
                     write's steps, which costs latency on virtual machines; run the daemon as \
                     root, or set idle-poll = \"off\" in the resource file to silence this"
                );
                None
            }
        };
        IdlePoll::new(linger, request, stats)
    }

    pub fn new(
        linger: Duration,
        request: Option<Box<dyn Request + Send>>,
        stats: Stats,
    ) -> IdlePoll {
        let state = if linger.is_zero() || request.is_none() {
            State::Off
        } else {
            State::Released
        };
        IdlePoll {
            linger,
            request,
            state,
            stats,
        }
    }

    /// A write event (a client request, a disk completion, a peer's message): hold the
    /// request, or keep holding it. Returns the deadline to check at when it was just taken
    /// (the caller resets its timer then, and only then; the timer runs while [`Self::held`]).
    pub fn touch(&mut self, now: Instant) -> Option<Instant> {
        match &mut self.state {
            State::Off => None,
            State::Held { last } => {
                *last = now;
                None
            }
            State::Released => {
                if self.set(HOLD_US) {
                    self.state = State::Held { last: now };
                    self.stats.held.set(1);
                    self.stats.holds.inc();
                    Some(now + self.linger)
                } else {
                    None
                }
            }
        }
    }

    /// The timer armed at a deadline fired: release the request if no write event came
    /// within the linger, else return the next deadline.
    pub fn expire(&mut self, now: Instant) -> Option<Instant> {
        let State::Held { last } = self.state else {
            return None;
        };
        let due = last + self.linger;
        if now < due {
            return Some(due);
        }
        self.release();
        None
    }

    /// The linger in effect (`idle-poll`; zero: off).
    pub fn linger(&self) -> Duration {
        self.linger
    }

    /// Whether the request is held (the event loop's release timer runs only then).
    pub fn held(&self) -> bool {
        matches!(self.state, State::Held { .. })
    }

    /// Whether write events take the request: on, and the device is open.
    pub fn active(&self) -> bool {
        !matches!(self.state, State::Off)
    }

    /// `adjust`: a new linger (zero turns the idle poll off). A daemon that could not open the
    /// device at `up` stays without it.
    pub fn set_linger(&mut self, linger: Duration) {
        if linger.is_zero() {
            self.release();
            self.state = State::Off;
        } else if self.request.is_some() && matches!(self.state, State::Off) {
            self.state = State::Released;
        }
        self.linger = linger;
    }

    fn release(&mut self) {
        if matches!(self.state, State::Held { .. }) {
            self.stats.held.set(0);
            if self.set(RELEASE_US) {
                self.state = State::Released;
            }
        }
    }

    /// Writes the request; a failure (which the device does not produce for a valid value)
    /// turns the idle poll off for good rather than leaving it in an unknown state: closing
    /// the descriptor drops whatever the kernel holds for it.
    fn set(&mut self, us: i32) -> bool {
        let Some(r) = self.request.as_mut() else {
            return false;
        };
        match r.set(us) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("idle-poll: writing {DEVICE} failed ({e}): idle polling is off");
                self.request = None;
                self.state = State::Off;
                self.stats.held.set(0);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records every value written; fails every write once `fail` is set.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<i32>>>,
        fail: Arc<Mutex<bool>>,
    }
    impl Request for Recorder {
        fn set(&mut self, us: i32) -> std::io::Result<()> {
            if *self.fail.lock().unwrap() {
                return Err(std::io::Error::other("injected write failure"));
            }
            self.writes.lock().unwrap().push(us);
            Ok(())
        }
    }

    const LINGER: Duration = Duration::from_millis(10);
    const MS: Duration = Duration::from_millis(1);

    fn idle(linger: Duration) -> (IdlePoll, Recorder) {
        let r = Recorder::default();
        (
            IdlePoll::new(linger, Some(Box::new(r.clone())), Stats::default()),
            r,
        )
    }

    fn writes(r: &Recorder) -> Vec<i32> {
        r.writes.lock().unwrap().clone()
    }

    #[test]
    fn the_first_write_event_holds_and_later_ones_only_move_the_deadline() {
        let (mut p, r) = idle(LINGER);
        let t0 = Instant::now();
        assert_eq!(p.touch(t0), Some(t0 + LINGER), "taken: arm the timer");
        assert_eq!(p.touch(t0 + 3 * MS), None, "held: no timer to arm");
        assert_eq!(p.touch(t0 + 6 * MS), None);
        assert_eq!(
            writes(&r),
            vec![HOLD_US],
            "one write to the device per hold"
        );
        assert_eq!(p.stats.held.get(), 1);
        assert!(p.held(), "the release timer runs");
        assert_eq!(p.stats.holds.get(), 1);
        // The timer fires at the first deadline: the last event was 6 ms in, so not yet.
        assert_eq!(p.expire(t0 + LINGER), Some(t0 + 6 * MS + LINGER));
        assert_eq!(writes(&r), vec![HOLD_US]);
        // A linger without a write event releases.
        assert_eq!(p.expire(t0 + 6 * MS + LINGER), None);
        assert_eq!(writes(&r), vec![HOLD_US, RELEASE_US]);
        assert_eq!(p.stats.held.get(), 0);
        assert!(!p.held(), "no timer once released");
        // The next write event holds again.
        let t1 = t0 + 100 * MS;
        assert_eq!(p.touch(t1), Some(t1 + LINGER));
        assert_eq!(writes(&r), vec![HOLD_US, RELEASE_US, HOLD_US]);
        assert_eq!(p.stats.holds.get(), 2);
    }

    #[test]
    fn off_never_writes_the_device() {
        let (mut p, r) = idle(Duration::ZERO);
        let t0 = Instant::now();
        assert_eq!(p.touch(t0), None);
        assert_eq!(p.expire(t0 + LINGER), None);
        assert!(writes(&r).is_empty());
        // No device (not root): the same.
        let mut p = IdlePoll::new(LINGER, None, Stats::default());
        assert_eq!(p.touch(t0), None);
        assert_eq!(p.stats.held.get(), 0);
    }

    #[test]
    fn adjust_off_releases_at_once_and_on_again_holds_at_the_next_write() {
        let (mut p, r) = idle(LINGER);
        let t0 = Instant::now();
        p.touch(t0);
        p.set_linger(Duration::ZERO);
        assert_eq!(writes(&r), vec![HOLD_US, RELEASE_US]);
        assert_eq!(p.stats.held.get(), 0);
        assert_eq!(p.touch(t0 + MS), None, "off");
        p.set_linger(2 * LINGER);
        assert_eq!(p.touch(t0 + 2 * MS), Some(t0 + 2 * MS + 2 * LINGER));
        assert_eq!(writes(&r), vec![HOLD_US, RELEASE_US, HOLD_US]);
    }

    #[test]
    fn a_failed_write_turns_it_off_without_a_panic() {
        let (mut p, r) = idle(LINGER);
        *r.fail.lock().unwrap() = true;
        let t0 = Instant::now();
        assert_eq!(p.touch(t0), None);
        assert_eq!(p.stats.held.get(), 0);
        *r.fail.lock().unwrap() = false;
        assert_eq!(p.touch(t0 + MS), None, "off for good");
        assert!(writes(&r).is_empty());
    }
}
