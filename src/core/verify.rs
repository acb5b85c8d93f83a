//! Online verify (`twinblk verify`): both disks compared by block digest while application I/O
//! goes on; blocks that differ are marked out of sync on both nodes (a later disconnect/connect
//! resyncs them, like DRBD's verify).
//!
//! Two sides. The *driver* reads its disk chunk by chunk and sends the digest of every bitmap
//! block ([`PeerMsg::VerifyRequest`]); the *comparer* reads the same range, compares, marks what
//! differs and answers with the differing runs ([`PeerMsg::VerifyReply`]), which the driver
//! marks too.
//!
//! No false mismatch from a concurrent write: the driver is the Primary when there is one (a
//! Secondary that runs `verify` asks its Primary to drive, [`PeerMsg::VerifyAsk`]). Its read is
//! an in-flight disk op, so an overlapping client write waits for it; the request is sent on
//! the sequenced data stream as soon as the read completes, before the writes that waited. The
//! comparer applies data-stream messages in sequence order and its read is ordered against the
//! peer writes around it the same way. So both reads see the same prefix of writes. A role
//! change stops the verify.
//!
//! [`Verify`] is the pure bookkeeping (what to read next, progress, findings); the `Replica`
//! glue below turns it into disk reads and messages.

use bytes::Bytes;

use super::{
    digest, overlap, Action, AdminError, IoKind, Issue, PeerMsg, ReplState, Replica, Role,
    StateChange, VerifyAbort, VerifyAborted, VerifyRefusal, Violation,
};
use crate::wire::DiskState;

/// How many differing ranges `status` lists.
pub const FIRST_RANGES: usize = 8;

/// Which part this node plays in a verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifySide {
    /// Reads first and sends digests.
    Driver,
    /// Reads on request and compares.
    Comparer,
}

/// What `status` shows about the current or last verify on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyStatus {
    /// Counts the verifies this node took part in since it started (tells one run from the
    /// next: `verify --wait` waits for a run newer than the one it saw).
    pub run: u64,
    pub side: VerifySide,
    pub running: bool,
    pub checked_bytes: u64,
    pub total_bytes: u64,
    pub differing_blocks: u64,
    /// The first differing ranges found, as `(byte offset, bytes)`, adjacent ones merged.
    pub first_ranges: Vec<(u64, u64)>,
    /// Why it stopped early.
    pub aborted: Option<VerifyAbort>,
}

/// Verify bookkeeping on one node.
#[derive(Debug, Clone)]
pub struct Verify {
    st: VerifyStatus,
    block: u64,
    chunk: u64,
    window: usize,
    /// Driver: the next byte offset to read.
    cursor: u64,
    /// Driver: offsets of chunks read or sent and not yet answered.
    in_flight: Vec<u64>,
    last_step: u64,
}

impl Verify {
    fn new(side: VerifySide, run: u64, size: u64, block: u64, chunk: u64, window: usize) -> Self {
        let block = block.max(1);
        Verify {
            st: VerifyStatus {
                run,
                side,
                running: true,
                checked_bytes: 0,
                total_bytes: size,
                differing_blocks: 0,
                first_ranges: Vec::new(),
                aborted: None,
            },
            block,
            // Whole blocks, so every request starts on a block boundary.
            chunk: (chunk / block).max(1) * block,
            window: window.max(1),
            cursor: 0,
            in_flight: Vec::new(),
            last_step: 0,
        }
    }

    /// The driver of a verify of a `size`-byte device with `block`-byte bitmap blocks, reading
    /// `chunk` bytes at a time with up to `window` chunks outstanding.
    pub fn driver(run: u64, size: u64, block: u64, chunk: u64, window: usize) -> Self {
        Self::new(VerifySide::Driver, run, size, block, chunk, window)
    }

    pub fn comparer(run: u64, size: u64, block: u64) -> Self {
        Self::new(VerifySide::Comparer, run, size, block, block, 1)
    }

    pub fn side(&self) -> VerifySide {
        self.st.side
    }

    pub fn running(&self) -> bool {
        self.st.running
    }

    pub fn status(&self) -> VerifyStatus {
        self.st.clone()
    }

    /// Driver: the next chunk `(offset, len)` to read, if the window has room. Not taken until
    /// [`Verify::issued`].
    pub fn next_chunk(&self) -> Option<(u64, u64)> {
        if !self.st.running
            || self.st.side != VerifySide::Driver
            || self.in_flight.len() >= self.window
            || self.cursor >= self.st.total_bytes
        {
            return None;
        }
        let len = self.chunk.min(self.st.total_bytes - self.cursor);
        Some((self.cursor, len))
    }

    /// Driver: the chunk from [`Verify::next_chunk`] is being read.
    pub fn issued(&mut self, offset: u64, len: u64) {
        self.in_flight.push(offset);
        self.cursor = offset.saturating_add(len);
    }

    /// Driver: the comparer answered the request at `offset`. Returns the differing runs
    /// clipped to the request (the peer is not trusted beyond it), or `None` for an answer to
    /// nothing outstanding (a stale reply from a stopped verify).
    pub fn replied(
        &mut self,
        offset: u64,
        len: u64,
        runs: &[(u64, u64)],
    ) -> Option<Vec<(u64, u64)>> {
        let i = self.in_flight.iter().position(|&o| o == offset)?;
        self.in_flight.swap_remove(i);
        let runs = self.clip(offset, len, runs);
        self.record(len, &runs);
        Some(runs)
    }

    /// Comparer: the request at `offset` was compared; `runs` differ.
    pub fn compared(&mut self, len: u64, runs: &[(u64, u64)]) {
        self.record(len, runs);
    }

    fn clip(&self, offset: u64, len: u64, runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let lo = offset / self.block;
        let hi = offset.saturating_add(len).div_ceil(self.block);
        runs.iter()
            .filter_map(|&(f, n)| {
                let a = f.max(lo);
                let b = f.saturating_add(n).min(hi);
                (a < b).then(|| (a, b - a))
            })
            .collect()
    }

    fn record(&mut self, len: u64, runs: &[(u64, u64)]) {
        self.st.checked_bytes = self
            .st
            .checked_bytes
            .saturating_add(len)
            .min(self.st.total_bytes);
        for &(f, n) in runs {
            self.st.differing_blocks = self.st.differing_blocks.saturating_add(n);
            let (off, bytes) = (f.saturating_mul(self.block), n.saturating_mul(self.block));
            let ranges = &mut self.st.first_ranges;
            if let Some(r) = ranges.iter_mut().find(|r| r.0.saturating_add(r.1) == off) {
                r.1 = r.1.saturating_add(bytes);
            } else if ranges.len() < FIRST_RANGES {
                ranges.push((off, bytes));
            }
        }
        self.st.first_ranges.sort_unstable();
    }

    /// Driver: everything read, sent and answered.
    pub fn finished(&self) -> bool {
        self.st.running && self.cursor >= self.st.total_bytes && self.in_flight.is_empty()
    }

    /// The verify is over; `aborted` says why if it stopped early.
    pub fn end(&mut self, aborted: Option<VerifyAbort>) {
        self.st.running = false;
        self.st.aborted = aborted;
        self.in_flight.clear();
    }

    /// A new tenth of the device was checked: the percentage, for a progress event.
    pub fn progress_step(&mut self) -> Option<u64> {
        let total = self.st.total_bytes.max(1);
        let pct = (self.st.checked_bytes.saturating_mul(100) / total).min(100);
        let step = pct / 10 * 10;
        (step > self.last_step).then(|| {
            self.last_step = step;
            step
        })
    }
}

/// Verify state changes, for logs and the events list.
fn emit_finished(v: &Verify, out: &mut Vec<Action>) {
    let s = v.status();
    out.push(Action::Emit(StateChange::VerifyFinished {
        differing_blocks: s.differing_blocks,
        first_ranges: s.first_ranges,
        aborted: s.aborted,
    }));
}

impl Replica {
    pub(super) fn verify_status(&self) -> Option<VerifyStatus> {
        self.verify.as_ref().map(Verify::status)
    }

    fn verify_running(&self) -> bool {
        self.verify.as_ref().is_some_and(Verify::running)
    }

    /// Why a verify cannot run now, if it cannot.
    fn verify_refusal(&self) -> Option<VerifyRefusal> {
        let c = self.conn.as_ref();
        if !c.is_some_and(|c| c.decided) || self.repl != ReplState::Established {
            return Some(VerifyRefusal::NotEstablished { repl: self.repl });
        }
        if self.disk != DiskState::UpToDate
            || c.and_then(|c| c.peer_disk) != Some(DiskState::UpToDate)
        {
            return Some(VerifyRefusal::NotBothUpToDate);
        }
        if self.verify_running() {
            return Some(VerifyRefusal::AlreadyRunning);
        }
        None
    }

    /// Tells the peer this node takes no part in its verify, and why.
    fn verify_refuse_peer(&mut self, why: VerifyRefusal, out: &mut Vec<Action>) {
        self.send(
            PeerMsg::VerifyStop {
                code: why.wire_code(),
                reason: why.to_string(),
            },
            out,
        );
    }

    fn next_verify_run(&mut self) -> u64 {
        self.verify_runs += 1;
        self.verify_runs
    }

    /// `twinblk verify`: starts a verify, driven here or (Secondary of a Primary) by the peer.
    pub(super) fn admin_verify(&mut self, out: &mut Vec<Action>) -> Result<(), AdminError> {
        if let Some(why) = self.verify_refusal() {
            return Err(AdminError::Verify(why));
        }
        let peer_primary = self.conn.as_ref().and_then(|c| c.peer_role) == Some(Role::Primary);
        if self.role != Role::Primary && peer_primary {
            // Shown as running at once, so `verify --wait` does not read the last result.
            self.begin_comparer(out);
            self.send(PeerMsg::VerifyAsk, out);
            return Ok(());
        }
        self.start_verify_driver(out);
        Ok(())
    }

    /// This node compares (the peer reads first): shown as running from now on.
    fn begin_comparer(&mut self, out: &mut Vec<Action>) {
        let run = self.next_verify_run();
        self.verify = Some(Verify::comparer(
            run,
            self.cfg.size,
            self.bitmap.block_size(),
        ));
        out.push(Action::Emit(StateChange::VerifyStarted {
            bytes: self.cfg.size,
        }));
    }

    fn start_verify_driver(&mut self, out: &mut Vec<Action>) {
        let run = self.next_verify_run();
        self.verify = Some(Verify::driver(
            run,
            self.cfg.size,
            self.bitmap.block_size(),
            self.cfg.resync_chunk,
            // As many chunks in flight as the resync controller's fill target allows.
            usize::try_from(self.cfg.resync_rate.fill_target / self.cfg.resync_chunk.max(1))
                .unwrap_or(usize::MAX)
                .max(1),
        ));
        tracing::info!(resource = %self.cfg.resource, "verify started");
        out.push(Action::Emit(StateChange::VerifyStarted {
            bytes: self.cfg.size,
        }));
        let seq = self.next_seq();
        self.send(PeerMsg::VerifyStart { seq }, out);
        self.pump_verify(out);
    }

    /// Stops a running verify; `tell_peer` when the peer should stop too.
    pub(super) fn verify_abort(
        &mut self,
        reason: VerifyAbort,
        tell_peer: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if !v.running() {
            return;
        }
        tracing::warn!(resource = %self.cfg.resource, reason = %reason, code = reason.code(), "verify stopped");
        let wire = reason.to_wire();
        v.end(Some(reason));
        let side = v.side();
        let v = v.clone();
        emit_finished(&v, out);
        if tell_peer && self.conn.as_ref().is_some_and(|c| c.decided) {
            match side {
                VerifySide::Driver => {
                    let seq = self.next_seq();
                    self.send(
                        PeerMsg::VerifyEnd {
                            seq,
                            aborted: Some(wire),
                        },
                        out,
                    );
                }
                VerifySide::Comparer => self.send(
                    PeerMsg::VerifyStop {
                        code: wire.code,
                        reason: wire.why,
                    },
                    out,
                ),
            }
        }
    }

    /// A role changed on either node: the driver might no longer be the node that writes.
    pub(super) fn verify_role_changed(&mut self, out: &mut Vec<Action>) {
        self.verify_abort(VerifyAbort::RoleChanged, true, out);
    }

    /// Driver: keeps the verify window full. A chunk overlapping a client write in flight or
    /// queued waits (the write goes first; this runs again when it completes).
    pub(super) fn pump_verify(&mut self, out: &mut Vec<Action>) {
        let Some(conn) = self.conn.as_ref().filter(|c| c.decided).map(|c| c.id) else {
            return;
        };
        while let Some((offset, len)) = self.verify.as_ref().and_then(Verify::next_chunk) {
            let r = (offset, len);
            let queued = self.issue_q.iter().any(|i| match i {
                Issue::Write { offset, len, .. } => overlap((*offset, (*len as u64).max(1)), r),
                Issue::Barrier { .. } => false,
            });
            if self.overlaps_inflight(r) || queued {
                break;
            }
            if let Some(v) = self.verify.as_mut() {
                v.issued(offset, len);
            }
            let io = self.new_io(IoKind::VerifyRead { conn }, offset, len);
            out.push(Action::DiskRead {
                io,
                offset,
                len: len as u32,
            });
        }
    }

    /// Driver: a chunk was read; its digests go out now, ahead of the writes that waited.
    pub(super) fn verify_read_done(
        &mut self,
        conn: u64,
        offset: u64,
        len: u64,
        result: Result<Option<Bytes>, i32>,
        out: &mut Vec<Action>,
    ) {
        let live = self.conn.as_ref().is_some_and(|c| c.id == conn)
            && self
                .verify
                .as_ref()
                .is_some_and(|v| v.running() && v.side() == VerifySide::Driver);
        if !live {
            return;
        }
        match result {
            Ok(Some(data)) if data.len() as u64 == len => {
                let digests = digest::blocks(&data, self.bitmap.block_size());
                let seq = self.next_seq();
                self.send(
                    PeerMsg::VerifyRequest {
                        seq,
                        offset,
                        len: len as u32,
                        digests,
                    },
                    out,
                );
            }
            Ok(_) => self.verify_abort(VerifyAbort::ShortRead, true, out),
            Err(errno) => self.verify_abort(VerifyAbort::ReadFailed { offset, errno }, true, out),
        }
    }

    /// Comparer: the verify request is in order; is it still wanted? (A request of a stopped
    /// verify is dropped unread.)
    pub(super) fn verify_wants_compare(&self) -> bool {
        self.verify
            .as_ref()
            .is_some_and(|v| v.running() && v.side() == VerifySide::Comparer)
    }

    /// Comparer: checks a request before it is queued; `Err` is a protocol error.
    pub(super) fn verify_check_request(
        &self,
        offset: u64,
        len: u32,
        digests: &[u64],
    ) -> Result<(), Violation> {
        let bs = self.bitmap.block_size();
        let end = offset.checked_add(len as u64);
        if len == 0
            || offset % bs != 0
            || end.map_or(true, |e| e > self.cfg.size)
            || len as usize > crate::wire::MAX_PAYLOAD
            || digests.len() as u64 != (len as u64).div_ceil(bs)
        {
            return Err(Violation::BadVerifyRequest {
                offset,
                len,
                digests: digests.len(),
            });
        }
        Ok(())
    }

    /// Comparer: the sequenced start of a verify driven by the peer.
    pub(super) fn verify_peer_started(&mut self, out: &mut Vec<Action>) {
        if self
            .verify
            .as_ref()
            .is_some_and(|v| v.running() && v.side() == VerifySide::Driver)
        {
            self.verify_abort(VerifyAbort::BothStarted, true, out);
            return;
        }
        if self.role == Role::Primary {
            // The Primary must drive (see the module docs); roles changed under the peer.
            self.verify_refuse_peer(VerifyRefusal::PrimaryDrives, out);
            return;
        }
        let pending = self
            .verify
            .as_ref()
            .is_some_and(|v| v.running() && v.side() == VerifySide::Comparer);
        if !pending {
            self.begin_comparer(out);
        }
    }

    /// Comparer: the sequenced end of the peer's verify.
    pub(super) fn verify_peer_ended(
        &mut self,
        aborted: Option<VerifyAborted>,
        out: &mut Vec<Action>,
    ) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if !(v.running() && v.side() == VerifySide::Comparer) {
            return;
        }
        v.end(aborted.map(|a| VerifyAbort::ByPeer {
            code: a.code,
            why: a.why,
        }));
        let v = v.clone();
        emit_finished(&v, out);
    }

    /// Comparer: this node's copy of a requested range was read; compare, mark, answer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn verify_compare_done(
        &mut self,
        conn: u64,
        offset: u64,
        len: u64,
        digests: Vec<u64>,
        result: Result<Option<Bytes>, i32>,
        out: &mut Vec<Action>,
    ) {
        if self.conn.as_ref().map(|c| c.id) != Some(conn) || !self.verify_wants_compare() {
            return;
        }
        let bs = self.bitmap.block_size();
        let data = match result {
            Ok(Some(d)) if d.len() as u64 == len => d,
            Ok(_) => {
                self.verify_abort(VerifyAbort::ShortRead, true, out);
                return;
            }
            Err(errno) => {
                self.verify_abort(VerifyAbort::ReadFailed { offset, errno }, true, out);
                return;
            }
        };
        let mine = digest::blocks(&data, bs);
        let runs = digest::differing_runs(offset / bs, &mine, &digests);
        self.verify_mark(&runs, out);
        if let Some(v) = self.verify.as_mut() {
            v.compared(len, &runs);
        }
        self.verify_progress(out);
        self.send(
            PeerMsg::VerifyReply {
                offset,
                len: len as u32,
                differ: runs,
            },
            out,
        );
    }

    /// Marks blocks found different as out of sync, persistently (the next handshake resyncs
    /// them; the bitmap generation names what they are relative to).
    fn verify_mark(&mut self, runs: &[(u64, u64)], out: &mut Vec<Action>) {
        if runs.is_empty() {
            return;
        }
        let bs = self.bitmap.block_size();
        for &(f, n) in runs {
            tracing::warn!(
                resource = %self.cfg.resource,
                offset = f.saturating_mul(bs),
                bytes = n.saturating_mul(bs),
                "verify: blocks differ from the peer; marked out of sync"
            );
            self.bitmap
                .set_bytes(f.saturating_mul(bs), n.saturating_mul(bs));
        }
        self.flush_bitmap(out);
        if self.bitmap_gen.is_none() {
            self.bitmap_gen = Some(self.current_gen);
            self.save_meta(out);
        }
    }

    fn verify_progress(&mut self, out: &mut Vec<Action>) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if let Some(percent) = v.progress_step() {
            let differing_blocks = v.status().differing_blocks;
            out.push(Action::Emit(StateChange::VerifyProgress {
                percent,
                differing_blocks,
            }));
        }
    }

    /// Control-stream verify messages.
    pub(super) fn verify_peer_msg(&mut self, msg: PeerMsg, out: &mut Vec<Action>) {
        match msg {
            PeerMsg::VerifyAsk => {
                // The asker shows a comparer pending since its ask. A verify this node drives
                // already sent its start before the ask arrived, so the asker compares that
                // one: nothing to answer. (A refusal stopped the asker's comparer, and this
                // driver then waited forever for the replies to the requests it dropped.)
                if self
                    .verify
                    .as_ref()
                    .is_some_and(|v| v.running() && v.side() == VerifySide::Driver)
                {
                    return;
                }
                let why = self.verify_refusal().or_else(|| {
                    (self.role != Role::Primary
                        && self.conn.as_ref().and_then(|c| c.peer_role) == Some(Role::Primary))
                    .then_some(VerifyRefusal::NotPrimarysPeer)
                });
                match why {
                    Some(why) => self.verify_refuse_peer(why, out),
                    None => self.start_verify_driver(out),
                }
            }
            PeerMsg::VerifyStop { code, reason } if self.verify_running() => {
                // The driver tells the comparer (sequenced) so late requests are dropped.
                let driver = self.verify.as_ref().map(Verify::side) == Some(VerifySide::Driver);
                self.verify_abort(VerifyAbort::ByPeer { code, why: reason }, driver, out);
            }
            PeerMsg::VerifyReply {
                offset,
                len,
                differ,
            } => {
                let runs = match self.verify.as_mut() {
                    Some(v) if v.running() && v.side() == VerifySide::Driver => {
                        v.replied(offset, len as u64, &differ)
                    }
                    _ => None,
                };
                let Some(runs) = runs else {
                    return;
                };
                self.verify_mark(&runs, out);
                self.verify_progress(out);
                if self.verify.as_ref().is_some_and(Verify::finished) {
                    let seq = self.next_seq();
                    self.send(PeerMsg::VerifyEnd { seq, aborted: None }, out);
                    if let Some(v) = self.verify.as_mut() {
                        v.end(None);
                        let v = v.clone();
                        let s = v.status();
                        tracing::info!(
                            resource = %self.cfg.resource,
                            differing_blocks = s.differing_blocks,
                            "verify finished"
                        );
                        emit_finished(&v, out);
                    }
                } else {
                    self.pump_verify(out);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_walks_the_device_in_window_sized_steps() {
        let mut v = Verify::driver(1, 10 * 4096 + 100, 4096, 3 * 4096, 2);
        let a = v.next_chunk().expect("first");
        assert_eq!(a, (0, 3 * 4096));
        v.issued(a.0, a.1);
        let b = v.next_chunk().expect("second");
        assert_eq!(b, (3 * 4096, 3 * 4096));
        v.issued(b.0, b.1);
        assert_eq!(v.next_chunk(), None, "window of 2 is full");
        assert_eq!(v.replied(a.0, a.1, &[(1, 1)]), Some(vec![(1, 1)]));
        let c = v.next_chunk().expect("third");
        v.issued(c.0, c.1);
        assert_eq!(v.replied(b.0, b.1, &[]), Some(vec![]));
        let d = v.next_chunk().expect("last, short");
        assert_eq!(d, (9 * 4096, 4096 + 100));
        v.issued(d.0, d.1);
        assert_eq!(v.next_chunk(), None);
        assert!(!v.finished());
        // Runs outside the request are the peer's mistake: clipped away.
        assert_eq!(v.replied(c.0, c.1, &[(0, 7), (100, 2)]), Some(vec![(6, 1)]));
        assert_eq!(v.replied(d.0, d.1, &[(10, 1)]), Some(vec![(10, 1)]));
        assert_eq!(v.replied(d.0, d.1, &[]), None, "answered twice");
        assert!(v.finished());
        let s = v.status();
        assert_eq!(s.checked_bytes, s.total_bytes);
        assert_eq!(s.differing_blocks, 3);
        assert_eq!(
            s.first_ranges,
            vec![(4096, 4096), (6 * 4096, 4096), (10 * 4096, 4096)]
        );
    }

    #[test]
    fn adjacent_findings_merge_and_the_list_is_bounded() {
        let mut v = Verify::comparer(1, 1 << 30, 4096);
        v.compared(4096, &[(0, 1)]);
        v.compared(4096, &[(1, 2)]);
        for i in 0..20 {
            v.compared(4096, &[(100 + 2 * i, 1)]);
        }
        let s = v.status();
        assert_eq!(s.differing_blocks, 23);
        assert_eq!(s.first_ranges.len(), FIRST_RANGES);
        assert_eq!(s.first_ranges[0], (0, 3 * 4096));
    }

    #[test]
    fn progress_steps_by_tenths() {
        let mut v = Verify::comparer(1, 100, 1);
        v.compared(5, &[]);
        assert_eq!(v.progress_step(), None);
        v.compared(30, &[]);
        assert_eq!(v.progress_step(), Some(30));
        assert_eq!(v.progress_step(), None);
        v.compared(65, &[]);
        assert_eq!(v.progress_step(), Some(100));
    }
}
