//! Optional busy-polling of the event loop while replicated writes are in flight
//! (`TWINBLK_POLL_US`, off unless set: an experiment for `tools/bench.sh`'s `twinblk-sync-poll`
//! column, not a default).
//!
//! Every time the daemon's one thread sleeps (`epoll_wait`), the next event has to wake it; on a
//! virtual machine whose vCPU halted meanwhile that wake-up costs tens of microseconds, and a
//! sync write at queue depth 1 waits for four of them in the daemons (the client's request, the
//! extent reaching the Secondary, the Secondary's disk completion, the ack reaching the
//! Primary). While a write is in flight, and for the window after the last write event, the
//! event loop yields to the runtime instead of sleeping (the runtime then checks its sockets and
//! the io_uring eventfd without blocking and runs the loop again) and to the kernel
//! (`sched_yield`, so that a client or peer process waiting for this CPU runs first).
//!
//! Why it is off: measured with a sync pair on this 2-vCPU machine while other builds ran (load
//! average 5 to 6), fio qd1 4k randwrite, 20,000 writes, three alternating rounds: polling off
//! 294-425 µs mean (p50 192-235), on with a 100 µs window 569-1,098 µs (p50 210-272), with
//! 8-16x the context switches (the yields) and 1.6-3.6x the daemons' CPU. Without the
//! `sched_yield` it was worse (2,738-3,391 µs: a client woken on a CPU with a spinning daemon
//! waited for the scheduler's slice). A busy CPU gives the spinning thread nothing to gain; what
//! it buys on an idle machine (no halted vCPU to wake) is for the quiet benchmark to show.

use std::time::{Duration, Instant};

pub(super) struct Poller {
    window: Duration,
    /// The last write event: a client request, a disk completion, a peer's extent or ack.
    last: Option<Instant>,
}

impl Poller {
    /// `TWINBLK_POLL_US` (microseconds; unset, 0 or unreadable: never polls).
    pub fn from_env() -> Poller {
        let us = std::env::var("TWINBLK_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Poller::new(Duration::from_micros(us))
    }

    pub fn new(window: Duration) -> Poller {
        Poller { window, last: None }
    }

    /// A write event happened at `now`.
    pub fn touch(&mut self, now: Instant) {
        if !self.window.is_zero() {
            self.last = Some(now);
        }
    }

    /// Whether to poll rather than sleep at `now`: writes are in flight (`busy`), or the window
    /// after the last write event is still open.
    pub fn active(&mut self, busy: bool, now: Instant) -> bool {
        if self.window.is_zero() {
            return false;
        }
        match self.last {
            _ if busy => true,
            Some(t) if now.saturating_duration_since(t) < self.window => true,
            _ => {
                self.last = None;
                false
            }
        }
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_never_polls() {
        let mut p = Poller::new(Duration::ZERO);
        let t = Instant::now();
        p.touch(t);
        assert!(!p.active(true, t));
        assert!(!p.active(false, t));
        assert!(!p.enabled());
    }

    #[test]
    fn polls_while_busy_and_for_the_window_after_the_last_event() {
        let w = Duration::from_micros(100);
        let mut p = Poller::new(w);
        let t = Instant::now();
        // Nothing happened yet: an idle daemon sleeps.
        assert!(!p.active(false, t));
        assert!(p.active(true, t));
        p.touch(t);
        assert!(p.active(false, t + w / 2));
        assert!(!p.active(false, t + w));
        // The window closed: it stays closed until the next event, busy or not.
        assert!(!p.active(false, t + w / 2));
        assert!(p.active(true, t + 2 * w));
        p.touch(t + 2 * w);
        assert!(p.active(false, t + 2 * w + w / 2));
    }
}
