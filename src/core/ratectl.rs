//! The resync rate controller, modelled on DRBD's dynamic controller (`c-*` settings), sans-IO:
//! it is told what the resync sent and got acked, and when application I/O happened, and answers
//! whether the next resync request may go now, after the next ack, or at a later time.
//!
//! * `fill_target`: bytes of resync requests in flight the controller keeps (read, sent, not
//!   yet acked). This is what keeps a fast link busy without queueing seconds of resync data
//!   ahead of application writes.
//! * `max_rate`: a hard cap in bytes/s (0 = none: the fill target and the link decide).
//! * `min_rate`: while application I/O is active, resync backs off to this rate (the floor it
//!   keeps); 0 turns the back-off off (DRBD's `c-min-rate 0`).
//! * `plan_ahead`: the time constant: application I/O counts as active for this long after it
//!   was seen, and the rate limit lets at most this much time's worth of bytes go as one burst.

/// Controller settings; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateConfig {
    pub max_rate: u64,
    pub fill_target: u64,
    pub plan_ahead: u64,
    pub min_rate: u64,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            max_rate: 0,
            fill_target: DEFAULT_FILL_TARGET,
            plan_ahead: DEFAULT_PLAN_AHEAD,
            min_rate: DEFAULT_MIN_RATE,
        }
    }
}

pub const DEFAULT_FILL_TARGET: u64 = 4 << 20;
/// 200 ms, in nanoseconds.
pub const DEFAULT_PLAN_AHEAD: u64 = 200_000_000;
pub const DEFAULT_MIN_RATE: u64 = 16 << 20;

const NANOS: u128 = 1_000_000_000;

/// What the resync may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Send the next request now.
    Go,
    /// The fill target is reached: wait for an ack.
    WaitAck,
    /// Over the rate: try again at this time (nanoseconds).
    WaitUntil(u64),
}

#[derive(Debug, Clone)]
pub struct RateController {
    cfg: RateConfig,
    in_flight: u64,
    /// Rate-limit credit in byte-nanoseconds (bytes * 1e9), so slow rates lose nothing to
    /// rounding.
    credit: u128,
    last_refill: u64,
    last_app_io: Option<u64>,
    /// Bytes acked in total (for tests and status).
    acked_total: u64,
}

impl RateController {
    pub fn new(cfg: RateConfig, now: u64) -> RateController {
        RateController {
            cfg,
            in_flight: 0,
            credit: 0,
            last_refill: now,
            last_app_io: None,
            acked_total: 0,
        }
    }

    pub fn config(&self) -> &RateConfig {
        &self.cfg
    }

    /// Application I/O (a client read or write) happened now.
    pub fn app_io(&mut self, now: u64) {
        self.last_app_io = Some(now);
    }

    /// Whether application I/O counts as active at `now`.
    pub fn app_active(&self, now: u64) -> bool {
        self.last_app_io
            .is_some_and(|t| now < t.saturating_add(self.cfg.plan_ahead.max(1)))
    }

    /// The rate limit in force at `now` (bytes/s), `None` = unlimited.
    pub fn rate_limit(&self, now: u64) -> Option<u64> {
        let max = (self.cfg.max_rate > 0).then_some(self.cfg.max_rate);
        if self.cfg.min_rate > 0 && self.app_active(now) {
            // Application I/O keeps its share: resync drops to its floor (never above the cap).
            return Some(max.map_or(self.cfg.min_rate, |m| m.min(self.cfg.min_rate)));
        }
        max
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    pub fn acked_total(&self) -> u64 {
        self.acked_total
    }

    fn refill(&mut self, now: u64, rate: u64, burst_bytes: u64) {
        let dt = now.saturating_sub(self.last_refill) as u128;
        self.last_refill = self.last_refill.max(now);
        let depth = (burst_bytes as u128).saturating_mul(NANOS);
        self.credit = self
            .credit
            .saturating_add(dt.saturating_mul(rate as u128))
            .min(depth);
    }

    /// May a request of (up to) `bytes` go at `now`? `Go` is a promise only if [`sent`]
    /// follows; a caller that then does not send just asks again later.
    ///
    /// [`sent`]: RateController::sent
    pub fn pace(&mut self, now: u64, bytes: u64) -> Pace {
        // One request always fits, so a fill target below the request size cannot stall.
        if self.in_flight > 0 && self.in_flight.saturating_add(bytes) > self.cfg.fill_target {
            return Pace::WaitAck;
        }
        let Some(rate) = self.rate_limit(now).filter(|&r| r > 0) else {
            self.last_refill = self.last_refill.max(now);
            return Pace::Go;
        };
        let burst = ((rate as u128 * self.cfg.plan_ahead as u128 / NANOS) as u64).max(bytes);
        self.refill(now, rate, burst);
        let need = (bytes as u128).saturating_mul(NANOS);
        if self.credit >= need {
            return Pace::Go;
        }
        let wait = (need - self.credit).div_ceil(rate as u128);
        Pace::WaitUntil(now.saturating_add(u64::try_from(wait).unwrap_or(u64::MAX)))
    }

    /// A request of `bytes` went out at `now` (after [`RateController::pace`] said `Go`).
    pub fn sent(&mut self, bytes: u64) {
        self.in_flight = self.in_flight.saturating_add(bytes);
        let spend = (bytes as u128).saturating_mul(NANOS);
        self.credit = self.credit.saturating_sub(spend);
    }

    /// The target acked `bytes`.
    pub fn acked(&mut self, bytes: u64) {
        self.in_flight = self.in_flight.saturating_sub(bytes);
        self.acked_total = self.acked_total.saturating_add(bytes);
    }

    /// A request of `bytes` was abandoned (read failed, or retried later).
    pub fn abandoned(&mut self, bytes: u64) {
        self.in_flight = self.in_flight.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;

    fn cfg(max_rate: u64, fill_target: u64, min_rate: u64) -> RateConfig {
        RateConfig {
            max_rate,
            fill_target,
            plan_ahead: 100 * MS,
            min_rate,
        }
    }

    /// Drives the controller like the core does, with a link that acks every request `rtt`
    /// after it was sent, for `secs` seconds of fake time; `app_every` feeds application I/O.
    /// Returns the bytes acked.
    fn drive(c: &mut RateController, chunk: u64, rtt: u64, secs: u64, app: bool) -> u64 {
        let mut now = 0;
        let mut acks: std::collections::VecDeque<u64> = Default::default();
        let end = secs * S;
        while now < end {
            if app {
                c.app_io(now);
            }
            while acks.front().is_some_and(|&t| t <= now) {
                acks.pop_front();
                c.acked(chunk);
            }
            let next = match c.pace(now, chunk) {
                Pace::Go => {
                    c.sent(chunk);
                    acks.push_back(now + rtt);
                    continue;
                }
                Pace::WaitAck => acks.front().copied().unwrap_or(end),
                Pace::WaitUntil(t) => {
                    assert!(t > now, "a wait must lie in the future");
                    t.min(acks.front().copied().unwrap_or(u64::MAX))
                }
            };
            now = next.max(now + 1);
        }
        c.acked_total()
    }

    #[test]
    fn fill_target_bounds_bytes_in_flight() {
        let mut c = RateController::new(cfg(0, M, 0), 0);
        for _ in 0..4 {
            assert_eq!(c.pace(0, 256 * K), Pace::Go);
            c.sent(256 * K);
        }
        assert_eq!(c.in_flight(), M);
        assert_eq!(c.pace(0, 256 * K), Pace::WaitAck);
        c.acked(256 * K);
        assert_eq!(c.pace(0, 256 * K), Pace::Go);
    }

    #[test]
    fn one_request_always_fits_a_tiny_fill_target() {
        let mut c = RateController::new(cfg(0, 4 * K, 0), 0);
        assert_eq!(c.pace(0, 256 * K), Pace::Go);
        c.sent(256 * K);
        assert_eq!(c.pace(0, 256 * K), Pace::WaitAck);
    }

    #[test]
    fn unlimited_rate_follows_the_link() {
        // 1 MiB in flight, 1 ms round trip: about 1 GiB/s.
        let mut c = RateController::new(cfg(0, M, 0), 0);
        let bytes = drive(&mut c, 256 * K, MS, 1, false);
        assert!(bytes >= 900 * M, "{bytes}");
    }

    #[test]
    fn max_rate_caps_throughput() {
        let mut c = RateController::new(cfg(10 * M, 4 * M, 0), 0);
        let bytes = drive(&mut c, 256 * K, MS, 4, false);
        // 4 s at 10 MiB/s, plus at most one burst of plan-ahead's worth.
        assert!(bytes <= 40 * M + M + 256 * K, "{bytes}");
        assert!(bytes >= 39 * M, "{bytes}");
    }

    #[test]
    fn application_io_pushes_resync_down_to_min_rate() {
        let mut c = RateController::new(cfg(0, 4 * M, 2 * M), 0);
        let bytes = drive(&mut c, 64 * K, MS, 4, true);
        assert!(bytes <= 8 * M + 512 * K, "{bytes}");
        assert!(bytes >= 7 * M, "{bytes}");
        // The floor is never above the cap.
        let c = RateController::new(cfg(M, 4 * M, 2 * M), 0);
        let mut c2 = c.clone();
        c2.app_io(0);
        assert_eq!(c2.rate_limit(0), Some(M));
    }

    #[test]
    fn idle_application_lets_resync_speed_up_again() {
        let mut c = RateController::new(cfg(0, M, M), 0);
        c.app_io(0);
        assert_eq!(c.rate_limit(50 * MS), Some(M));
        assert!(c.app_active(99 * MS));
        assert!(!c.app_active(100 * MS));
        assert_eq!(c.rate_limit(100 * MS), None);
        assert_eq!(c.pace(100 * MS, 256 * K), Pace::Go);
    }

    #[test]
    fn min_rate_zero_disables_the_back_off() {
        let mut c = RateController::new(cfg(0, M, 0), 0);
        c.app_io(0);
        assert_eq!(c.rate_limit(0), None);
    }

    #[test]
    fn a_wait_names_when_credit_suffices() {
        let mut c = RateController::new(cfg(M, 4 * M, 0), 0);
        // No credit at the start: 256 KiB at 1 MiB/s is 250 ms away.
        assert_eq!(c.pace(0, 256 * K), Pace::WaitUntil(250 * MS));
        assert_eq!(c.pace(250 * MS, 256 * K), Pace::Go);
        c.sent(256 * K);
        assert_eq!(c.pace(250 * MS, 256 * K), Pace::WaitUntil(500 * MS));
    }

    #[test]
    fn abandoned_requests_free_the_window() {
        let mut c = RateController::new(cfg(0, 256 * K, 0), 0);
        c.sent(256 * K);
        assert_eq!(c.pace(0, 256 * K), Pace::WaitAck);
        c.abandoned(256 * K);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.acked_total(), 0);
        assert_eq!(c.pace(0, 256 * K), Pace::Go);
    }
}
