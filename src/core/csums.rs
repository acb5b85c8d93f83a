//! Checksum-based resync (resource key `csums = true`, DRBD's csums-alg): for each chunk the
//! resync would copy, the target first sends its digests; the source sends data only for the
//! blocks that differ and a [`PeerMsg::ResyncSame`] for the rest, so two disks that are mostly
//! identical (a full sync after `invalidate`, a new node built from a copy) move little data.
//!
//! Flow per chunk (source `S`, target `T`):
//! 1. `S` sends [`PeerMsg::CsumRequest`] instead of reading (the chunk counts as in flight).
//! 2. `T` reads the range, ordered after the peer writes it already received (an item at the
//!    back of its apply queue), and answers [`PeerMsg::CsumReply`] with one digest per block.
//! 3. `S` reads the chunk (ordered against client writes like any resync read) and compares:
//!    equal blocks are named in a `ResyncSame`; the span from the first to the last differing
//!    block goes as ordinary resync data. The chunk is acked when that data is written (at
//!    once if all was equal), and its bits go when a flush barrier sent after the ack is
//!    acked: what `T` read may have been a write it had not flushed (simulator seed 179).
//!
//! Why equal means in sync: every write `T` had applied when it read was sent by `S` before
//! `T` answered, so before `S` reads: `S` reads a later state. A block equal at that point is
//! equal for good, since later writes are replicated anyway.

use std::collections::HashMap;

use bytes::Bytes;

use super::{
    digest, overlap, Action, Apply, CloseReason, IoKind, Issue, PeerMsg, ReplState, Replica,
    Violation,
};

/// Source side: differing spans sent as resync data, by their first byte: (connection, first
/// byte of the chunk they belong to). Their ack acks the chunk.
#[derive(Debug, Default)]
pub struct CsumSpans(HashMap<u64, (u64, u64)>);

impl Replica {
    /// Sync source: fetch chunk `first` (`offset`, `len` bytes): ask for the target's digests
    /// when `csums` is on, else read it for sending.
    pub(super) fn resync_fetch(
        &mut self,
        conn: u64,
        first: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<Action>,
    ) {
        if self.cfg.csums {
            self.send(
                PeerMsg::CsumRequest {
                    offset,
                    len: len as u32,
                },
                out,
            );
            return;
        }
        let io = self.new_io(IoKind::ResyncRead { conn, first }, offset, len);
        out.push(Action::DiskRead {
            io,
            offset,
            len: len as u32,
        });
    }

    /// Source: an ack for a differing span acks its chunk; returns the chunk's start as the
    /// resync bookkeeping knows it (`offset` itself for an ordinary resync chunk).
    pub(super) fn csum_ack_start(&mut self, offset: u64) -> u64 {
        let Some(conn) = self.conn.as_ref().map(|c| c.id) else {
            return offset;
        };
        match self.csum_spans.0.get(&offset) {
            Some(&(c, chunk)) if c == conn && chunk <= offset => {
                self.csum_spans.0.remove(&offset);
                chunk
            }
            _ => offset,
        }
    }

    fn csum_range_ok(&self, offset: u64, len: u32) -> bool {
        let bs = self.bitmap.block_size();
        len > 0
            && offset % bs == 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|e| e <= self.cfg.size)
            && len as usize <= crate::wire::MAX_PAYLOAD
    }

    pub(super) fn csum_peer_msg(&mut self, msg: PeerMsg, out: &mut Vec<Action>) {
        match msg {
            PeerMsg::CsumRequest { offset, len } => {
                // Established or Behind: the Ahead peer's `Ahead` and resync start (sequenced,
                // data stream) may still be on their way while this request (control stream)
                // overtook them. Answering then is safe: a digest can only make the source send
                // data (checked as resync data when it arrives), or skip blocks already equal.
                if !matches!(
                    self.repl,
                    ReplState::SyncTarget | ReplState::Behind | ReplState::Established
                ) {
                    return;
                }
                if !self.csum_range_ok(offset, len) {
                    self.close(CloseReason::Protocol(Violation::BadDigestRange), out);
                    return;
                }
                if let Some(c) = self.conn.as_mut() {
                    c.apply_q.push_back(Apply::Csum { offset, len });
                }
                self.pump_apply(out);
            }
            PeerMsg::CsumReply {
                offset,
                len,
                digests,
            } => self.csum_reply(offset, len, digests, out),
            // Our own changes there equal the source's data: nothing left to copy.
            PeerMsg::ResyncSame { offset, len }
                if self.repl == ReplState::SyncTarget && self.csum_range_ok(offset, len) =>
            {
                self.bitmap.clear_bytes(offset, len as u64);
            }
            _ => {}
        }
    }

    /// Target: the range was read; send its digests.
    pub(super) fn csum_target_read_done(
        &mut self,
        conn: u64,
        offset: u64,
        len: u64,
        result: Result<Option<Bytes>, i32>,
        out: &mut Vec<Action>,
    ) {
        if self.conn.as_ref().map(|c| c.id) != Some(conn) {
            return;
        }
        match result {
            Ok(Some(data)) if data.len() as u64 == len => {
                let digests = digest::blocks(&data, self.bitmap.block_size());
                self.send(
                    PeerMsg::CsumReply {
                        offset,
                        len: len as u32,
                        digests,
                    },
                    out,
                );
            }
            Ok(_) => self.close(CloseReason::ShortRead { what: "checksum" }, out),
            // Nothing to compare with: the source then sends the data.
            Err(_) => self.send(
                PeerMsg::CsumReply {
                    offset,
                    len: len as u32,
                    digests: Vec::new(),
                },
                out,
            ),
        }
    }

    /// Source: the target's digests arrived; read the chunk to compare (unless a client write
    /// overlaps it: then the chunk is retried later, from the digest request).
    fn csum_reply(&mut self, offset: u64, len: u32, digests: Vec<u64>, out: &mut Vec<Action>) {
        if self.repl != ReplState::SyncSource {
            return;
        }
        let Some(conn) = self.conn.as_ref().map(|c| c.id) else {
            return;
        };
        let bs = self.bitmap.block_size();
        let first = offset / bs;
        let r = (offset, len as u64);
        let queued = self.issue_q.iter().any(|i| match i {
            Issue::Write { offset, len, .. } => overlap((*offset, (*len as u64).max(1)), r),
            Issue::Barrier { .. } => false,
        });
        if len == 0 || !self.csum_range_ok(offset, len) {
            return;
        }
        if self.overlaps_inflight(r) || queued {
            if let Some(rs) = self.resync.as_mut() {
                rs.abandon(first);
            }
            self.pump_issue(out);
            return;
        }
        let io = self.new_io(IoKind::CsumSourceRead { conn, digests }, offset, len as u64);
        out.push(Action::DiskRead { io, offset, len });
    }

    /// Source: the chunk was read; send what differs. The whole chunk is done (its bits go)
    /// once the target has it stable, the equal part included.
    pub(super) fn csum_source_read_done(
        &mut self,
        conn: u64,
        offset: u64,
        len: u64,
        digests: Vec<u64>,
        result: Result<Option<Bytes>, i32>,
        out: &mut Vec<Action>,
    ) {
        let live =
            self.conn.as_ref().map(|c| c.id) == Some(conn) && self.repl == ReplState::SyncSource;
        let bs = self.bitmap.block_size();
        let first = offset / bs;
        let data = match result {
            Ok(Some(d)) if live && d.len() as u64 == len => d,
            _ => {
                if let Some(rs) = self.resync.as_mut() {
                    rs.abandon(first);
                }
                if live {
                    self.close(
                        CloseReason::ResyncReadFailed {
                            offset,
                            errno: None,
                        },
                        out,
                    );
                }
                return;
            }
        };
        let mine = digest::blocks(&data, bs);
        let theirs = digests.get(..mine.len()).unwrap_or(&digests);
        let runs = digest::differing_runs(first, &mine, theirs);
        let end = offset + len;
        // The differing span, in bytes: from the first to the end of the last differing block.
        let span = runs
            .first()
            .zip(runs.last())
            .map(|(a, b)| ((a.0 * bs).max(offset), ((b.0 + b.1) * bs).min(end)));
        let same = match span {
            Some((a, b)) => [(offset, a), (b, end)],
            None => [(offset, end), (end, end)],
        };
        for (o, e) in same {
            if e > o {
                // The bits stay: what the target read may not be stable there yet (a write
                // it has not flushed). The chunk's bits go once a flush barrier after this
                // is acked (see `resync`).
                self.send(
                    PeerMsg::ResyncSame {
                        offset: o,
                        len: (e - o) as u32,
                    },
                    out,
                );
            }
        }
        match span {
            None => self.resync_chunk_acked(first, out),
            Some((start, stop)) => {
                let lo = (start - offset) as usize;
                let hi = (stop - offset) as usize;
                let payload = data.slice(lo..hi);
                if start != offset {
                    self.csum_spans.0.insert(start, (conn, offset));
                }
                let seq = self.next_seq();
                let crc32 = crc32fast::hash(&payload);
                self.send(
                    PeerMsg::ResyncData {
                        seq,
                        offset: start,
                        crc32,
                        data: payload,
                    },
                    out,
                );
            }
        }
        self.pump_issue(out);
    }
}
