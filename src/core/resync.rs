//! Resync planning on the sync source: which dirty region to read next, how many are in flight,
//! progress. The data path (reads, sends, acks, ordering against application writes) lives in
//! `Replica`; this type only decides *what* to move next.
//!
//! A block's bit is cleared only once the block is *stable* on the target: acked as written,
//! then covered by a flush barrier the target acked. Between the two the chunk is "unstable":
//! not sent again, not yet clean. So the bitmap, in memory and as persisted, always names every
//! block a crash of the target could have lost, and a target that crashed mid-resync resumes
//! from the bitmaps instead of starting over (see `Replica::restore`).

use super::bitmap::Bitmap;
use super::ratectl::{Pace, RateConfig, RateController};

/// What the resync source should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read and send this chunk (first block, blocks); it is in flight from now on.
    Chunk(u64, u64),
    /// The rate limit holds the next chunk back until this time (nanoseconds): arm a timer.
    WaitUntil(u64),
    /// Nothing to do until an ack (or an application write) changes the picture.
    Idle,
}

#[derive(Debug, Clone)]
pub struct ResyncSource {
    /// Next block to look at.
    cursor: u64,
    /// Chunks read or sent but not yet acked by the target: (first block, n blocks).
    in_flight: Vec<(u64, u64)>,
    /// Chunks acked as written, not yet stable on the target: (first block, n blocks, the
    /// connection's send sequence when the ack came). A flush barrier with a sequence number
    /// at least that was sent after the ack, so its ack makes the chunk stable.
    unstable: Vec<(u64, u64, u64)>,
    unstable_blocks: u64,
    /// The tag of this resync's stability flush in flight (see [`ResyncSource::wants_flush`]).
    pub flush_tag: Option<u64>,
    chunk_blocks: u64,
    block: u64,
    /// Decides how much may be in flight and how fast it goes.
    pub ctl: RateController,
    /// Blocks to sync when the resync started (for progress).
    pub total: u64,
    pub full: bool,
}

impl ResyncSource {
    pub fn new(
        bm: &Bitmap,
        chunk_bytes: u64,
        rate: RateConfig,
        full: bool,
        now: u64,
    ) -> ResyncSource {
        ResyncSource {
            cursor: 0,
            in_flight: Vec::new(),
            unstable: Vec::new(),
            unstable_blocks: 0,
            flush_tag: None,
            chunk_blocks: (chunk_bytes / bm.block_size()).max(1),
            block: bm.block_size(),
            ctl: RateController::new(rate, now),
            total: bm.count(),
            full,
        }
    }

    /// The end of the in-flight or unstable chunk holding `block`, if one does.
    fn busy_end(&self, block: u64) -> Option<u64> {
        let chunks = self.in_flight.iter().copied();
        let unstable = self.unstable.iter().map(|&(f, n, _)| (f, n));
        chunks
            .chain(unstable)
            .find(|&(f, n)| f <= block && block < f + n)
            .map(|(f, n)| f + n)
    }

    /// The next chunk to read, if the rate controller lets one go at `now`. A chunk is in
    /// flight until [`ResyncSource::acked`] or [`ResyncSource::abandon`].
    pub fn next_chunk(&mut self, bm: &Bitmap, now: u64) -> Next {
        match self
            .ctl
            .pace(now, self.chunk_blocks.saturating_mul(self.block))
        {
            Pace::Go => {}
            Pace::WaitAck => return Next::Idle,
            Pace::WaitUntil(t) => {
                // Only worth a timer if there is something to send.
                return if self.has_work(bm) {
                    Next::WaitUntil(t)
                } else {
                    Next::Idle
                };
            }
        }
        loop {
            match bm.next_run(self.cursor, self.chunk_blocks) {
                Some((first, n)) => {
                    // Never send the same block twice at once; skip past a busy run.
                    if let Some(end) = self.busy_end(first) {
                        self.cursor = end;
                        continue;
                    }
                    let mut n2 = 1;
                    while n2 < n && self.busy_end(first + n2).is_none() {
                        n2 += 1;
                    }
                    self.cursor = first + n2;
                    self.in_flight.push((first, n2));
                    self.ctl.sent(n2.saturating_mul(self.block));
                    return Next::Chunk(first, n2);
                }
                None if self.cursor > 0
                    && self.in_flight.is_empty()
                    && bm.count() > self.unstable_blocks =>
                {
                    // Bits set behind the cursor (e.g. a chunk that had to be retried); the
                    // unstable chunks' bits do not count, they are not sent again.
                    self.cursor = 0;
                }
                None => return Next::Idle,
            }
        }
    }

    fn has_work(&self, bm: &Bitmap) -> bool {
        let mut from = 0;
        while let Some((first, n)) = bm.next_run(from, u64::MAX) {
            let mut b = first;
            while b < first + n {
                match self.busy_end(b) {
                    Some(end) => b = end,
                    None => return true,
                }
            }
            from = b;
        }
        false
    }

    fn take(&mut self, first: u64) -> Option<u64> {
        let i = self.in_flight.iter().position(|&(f, _)| f == first)?;
        let (_, n) = self.in_flight.swap_remove(i);
        Some(n.saturating_mul(self.block))
    }

    /// The target acked the chunk starting at `first` as written; `seq` is the connection's
    /// send sequence now. The chunk stays dirty (and is not sent again) until [`Self::stable`].
    pub fn acked(&mut self, first: u64, seq: u64) -> bool {
        let Some(i) = self.in_flight.iter().position(|&(f, _)| f == first) else {
            return false;
        };
        let (_, n) = self.in_flight.swap_remove(i);
        self.ctl.acked(n.saturating_mul(self.block));
        self.unstable.push((first, n, seq));
        self.unstable_blocks += n;
        true
    }

    /// A flush barrier with sequence number `seq` was acked: the chunks acked before it was
    /// sent are stable on the target. Returns them (first block, blocks): clear their bits.
    pub fn stable(&mut self, seq: u64) -> Vec<(u64, u64)> {
        let mut done = Vec::new();
        self.unstable.retain(|&(f, n, at)| {
            let stable = at <= seq;
            if stable {
                done.push((f, n));
            }
            !stable
        });
        self.unstable_blocks -= done.iter().map(|&(_, n)| n).sum::<u64>();
        done
    }

    /// A stability flush should go now: none is in flight, and either `bytes` or more are
    /// unstable, or nothing else is left to send (the resync cannot end before it).
    pub fn wants_flush(&self, bm: &Bitmap, bytes: u64) -> bool {
        self.flush_tag.is_none()
            && !self.unstable.is_empty()
            && (self.unstable_blocks.saturating_mul(self.block) >= bytes
                || (self.in_flight.is_empty() && bm.count() <= self.unstable_blocks))
    }

    /// A chunk could not be read or sent; it stays dirty and will be retried.
    pub fn abandon(&mut self, first: u64) {
        if let Some(bytes) = self.take(first) {
            self.ctl.abandoned(bytes);
        }
    }

    /// Everything synced: nothing dirty, nothing in flight, everything stable.
    pub fn finished(&self, bm: &Bitmap) -> bool {
        self.in_flight.is_empty() && self.unstable.is_empty() && bm.is_clean()
    }

    /// Blocks not yet written on the target (for progress: unstable ones count as done).
    pub fn remaining(&self, bm: &Bitmap) -> u64 {
        bm.count().saturating_sub(self.unstable_blocks)
    }
}

/// Resync progress as both nodes report it: blocks total/left, and the rate over the last few
/// seconds (from samples of `(now, blocks done)`).
#[derive(Debug, Clone)]
pub struct Progress {
    pub total: u64,
    pub left: u64,
    samples: std::collections::VecDeque<(u64, u64)>,
    last_pct: u64,
}

/// The rate is measured over about this many nanoseconds.
const RATE_WINDOW: u64 = 5_000_000_000;

impl Progress {
    pub fn new(total: u64, now: u64) -> Progress {
        let mut samples = std::collections::VecDeque::new();
        samples.push_back((now, 0));
        Progress {
            total,
            left: total,
            samples,
            last_pct: 0,
        }
    }

    /// Records a new position; `Some(percent)` when a new whole percent was reached.
    pub fn update(&mut self, total: u64, left: u64, now: u64) -> Option<u64> {
        self.total = total.max(left);
        self.left = left;
        let done = self.total - left;
        self.samples.push_back((now, done));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|&(t, _)| t.saturating_add(RATE_WINDOW) <= now)
        {
            self.samples.pop_front();
        }
        let pct = self.percent();
        (pct != self.last_pct).then(|| {
            self.last_pct = pct;
            pct
        })
    }

    pub fn percent(&self) -> u64 {
        (self.total - self.left)
            .saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100)
    }

    /// Bytes per second over the last few seconds, once there is a measurable interval.
    pub fn rate(&self, block: u64) -> Option<u64> {
        let (&(t0, d0), &(t1, d1)) = (self.samples.front()?, self.samples.back()?);
        let dt = t1.checked_sub(t0).filter(|&dt| dt > 0)?;
        let bytes = d1.saturating_sub(d0).saturating_mul(block) as u128;
        Some((bytes * 1_000_000_000 / dt as u128) as u64)
    }

    /// Seconds left at the current rate.
    pub fn eta_secs(&self, block: u64) -> Option<u64> {
        let rate = self.rate(block).filter(|&r| r > 0)?;
        Some(self.left.saturating_mul(block) / rate)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn progress_rate_and_eta() {
        let s = 1_000_000_000;
        let mut p = super::Progress::new(100, 0);
        assert_eq!(p.rate(4096), None);
        assert_eq!(p.update(100, 90, s), Some(10));
        assert_eq!(p.update(100, 90, s), None);
        assert_eq!(p.rate(4096), Some(10 * 4096));
        assert_eq!(p.eta_secs(4096), Some(9));
        // Old samples fall out of the window: the rate follows the recent pace.
        for i in 2..=10u64 {
            p.update(100, 90 - (i - 1), i * s);
        }
        assert_eq!(p.rate(4096), Some(4096));
        assert_eq!(p.left, 81);
        assert_eq!(p.eta_secs(4096), Some(81));
    }

    use super::super::bitmap::BLOCK;
    use super::*;

    #[test]
    fn walks_dirty_runs_in_order_within_window() {
        let mut bm = Bitmap::new(64 * BLOCK, BLOCK);
        bm.set_bytes(0, 3 * BLOCK);
        bm.set_bytes(10 * BLOCK, 40 * BLOCK);
        // A fill target of two full chunks: at most 32 blocks in flight.
        let rate = RateConfig {
            max_rate: 0,
            fill_target: 32 * BLOCK,
            plan_ahead: 1,
            min_rate: 0,
        };
        let mut rs = ResyncSource::new(&bm, 16 * BLOCK, rate, false, 0);
        assert_eq!(rs.total, 43);
        assert_eq!(rs.next_chunk(&bm, 0), Next::Chunk(0, 3));
        assert_eq!(rs.next_chunk(&bm, 0), Next::Chunk(10, 16));
        assert_eq!(rs.next_chunk(&bm, 0), Next::Idle, "fill target reached");
        // Acked as written: the bits stay until a flush makes the chunk stable.
        assert!(rs.acked(0, 1));
        assert_eq!(rs.next_chunk(&bm, 0), Next::Chunk(26, 16));
        rs.abandon(10); // read failed: stays dirty
        assert!(rs.acked(26, 2));
        assert_eq!(rs.next_chunk(&bm, 0), Next::Chunk(42, 8));
        assert!(rs.acked(42, 3));
        assert!(
            !rs.wants_flush(&bm, 64 * BLOCK),
            "chunk 10 is still to send"
        );
        // Wraps around to retry the abandoned chunk, past the unstable ones.
        assert_eq!(rs.next_chunk(&bm, 0), Next::Chunk(10, 16));
        assert!(rs.acked(10, 4));
        assert_eq!(
            rs.next_chunk(&bm, 0),
            Next::Idle,
            "all that is left is unstable: nothing is sent twice"
        );
        assert_eq!(rs.remaining(&bm), 0);
        assert!(!rs.finished(&bm));
        assert!(rs.wants_flush(&bm, u64::MAX), "only a flush can end it now");
        rs.flush_tag = Some(7);
        assert!(!rs.wants_flush(&bm, u64::MAX), "one at a time");
        rs.flush_tag = None;
        // A flush sent at sequence 2 covers the chunks acked up to then: 0 and 26.
        let mut stable = rs.stable(2);
        stable.sort_unstable();
        assert_eq!(stable, vec![(0, 3), (26, 16)]);
        for (f, n) in stable {
            bm.clear_bytes(f * BLOCK, n * BLOCK);
        }
        assert_eq!(bm.count(), 24);
        assert!(!rs.finished(&bm));
        for (f, n) in rs.stable(4) {
            bm.clear_bytes(f * BLOCK, n * BLOCK);
        }
        assert!(rs.finished(&bm));
        assert_eq!(rs.ctl.in_flight(), 0);
        assert_eq!(rs.ctl.acked_total(), 43 * BLOCK);
    }

    #[test]
    fn rate_limit_names_a_wake_up_time_only_with_work_left() {
        let mut bm = Bitmap::new(64 * BLOCK, BLOCK);
        bm.set_bytes(0, 8 * BLOCK);
        let rate = RateConfig {
            max_rate: 4 * BLOCK * 1000, // 4 blocks per millisecond
            fill_target: 64 * BLOCK,
            plan_ahead: 1_000_000,
            min_rate: 0,
        };
        let mut rs = ResyncSource::new(&bm, 4 * BLOCK, rate, false, 0);
        assert_eq!(rs.next_chunk(&bm, 0), Next::WaitUntil(1_000_000));
        assert_eq!(rs.next_chunk(&bm, 1_000_000), Next::Chunk(0, 4));
        assert_eq!(rs.next_chunk(&bm, 1_000_000), Next::WaitUntil(2_000_000));
        assert_eq!(rs.next_chunk(&bm, 2_000_000), Next::Chunk(4, 4));
        // All dirty blocks in flight: nothing to wake up for.
        assert_eq!(rs.next_chunk(&bm, 2_000_000), Next::Idle);
    }
}
