//! What an async Primary does when its send buffer fills (DRBD's `on-congestion`): block new
//! writes until the peer acks (back-pressure), or pull ahead: stop shipping, mark writes in the
//! bitmap, and resync once the link drained. Pure decisions; `Replica` does the plumbing.

/// `on-congestion` in the resource file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCongestion {
    /// New writes wait for room in the send buffer (the link's speed bounds the application's).
    #[default]
    Block,
    /// Past `congestion-fill` the Primary goes Ahead (the peer Behind, Outdated) and the
    /// application never waits for the link; a bitmap resync catches the peer up later.
    PullAhead,
}

/// The congestion settings of an async resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Congestion {
    pub on_congestion: OnCongestion,
    /// High mark of the send buffer in bytes; 0 = off (block at `send_buffer`).
    pub fill: u64,
}

/// What admitting a write of `bytes` does to a replicating async Primary whose send buffer
/// holds `used` bytes (sent, not acked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Ship it.
    Ship,
    /// Wait for acks (back-pressure).
    Wait,
    /// Go Ahead: this write and the following ones are marked, not shipped.
    PullAhead,
}

impl Congestion {
    /// `established`: connected with no resync running (DRBD pulls ahead only then; during a
    /// resync the buffer applies back-pressure).
    pub fn admit(&self, used: u64, bytes: u64, send_buffer: u64, established: bool) -> Admission {
        let after = used.saturating_add(bytes);
        if used > 0
            && established
            && self.on_congestion == OnCongestion::PullAhead
            && self.fill > 0
            && after > self.fill
        {
            return Admission::PullAhead;
        }
        // An empty buffer takes any one write, so an extent larger than the buffer still goes.
        if used > 0 && after > send_buffer {
            return Admission::Wait;
        }
        Admission::Ship
    }

    /// Whether an Ahead node may start the resync that brings the peer back: everything it
    /// shipped before going Ahead has been acked.
    pub fn drained(&self, unacked: usize) -> bool {
        unacked == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    #[test]
    fn block_waits_at_the_send_buffer() {
        let c = Congestion::default();
        assert_eq!(c.admit(0, 64 * K, 128 * K, true), Admission::Ship);
        assert_eq!(c.admit(64 * K, 64 * K, 128 * K, true), Admission::Ship);
        assert_eq!(c.admit(96 * K, 64 * K, 128 * K, true), Admission::Wait);
        // An oversized write goes alone.
        assert_eq!(c.admit(0, 1024 * K, 128 * K, true), Admission::Ship);
    }

    #[test]
    fn pull_ahead_past_the_fill_mark_only_when_established() {
        let c = Congestion {
            on_congestion: OnCongestion::PullAhead,
            fill: 64 * K,
        };
        assert_eq!(c.admit(32 * K, 32 * K, 128 * K, true), Admission::Ship);
        assert_eq!(c.admit(32 * K, 33 * K, 128 * K, true), Admission::PullAhead);
        assert_eq!(c.admit(0, 256 * K, 128 * K, true), Admission::Ship);
        // During a resync: back-pressure at the send buffer instead.
        assert_eq!(c.admit(32 * K, 33 * K, 128 * K, false), Admission::Ship);
        assert_eq!(c.admit(100 * K, 33 * K, 128 * K, false), Admission::Wait);
    }

    #[test]
    fn fill_zero_is_off() {
        let c = Congestion {
            on_congestion: OnCongestion::PullAhead,
            fill: 0,
        };
        assert_eq!(c.admit(100 * K, 33 * K, 128 * K, true), Admission::Wait);
    }
}
