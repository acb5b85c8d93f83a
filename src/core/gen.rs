//! Data generations and the handshake decision, modelled on DRBD's generation ids.
//!
//! Each node keeps four ids (see docs/generations.md for the operator's view):
//! * `current`: names the data on this disk. A node starts a new one when it loses the
//!   connection with writes the peer may lack (its transfer log: acknowledged, or completed by
//!   the loss), and a Primary when it writes while not replicating (unless the loss already
//!   did) or goes Ahead. So a `current` the peer also has means no acknowledged write the peer
//!   lacks, except a crashed Primary's activity log (sync: unacknowledged; async: the tail a
//!   crash loses, as in DRBD's protocol A).
//! * `bitmap`: the generation the dirty bitmap is relative to (the last one both nodes agreed
//!   on), `None` when the bitmap is clean and the peer has everything.
//! * `history[0..2]`: the two bitmap generations before that, newest first.
//! * `resync_end` (a sync source only, until its target confirms the end): the generation it
//!   sent with `ResyncDone` and the ones the target may still carry instead ([`ResyncEnd`]).
//!
//! Both sides compute [`decide`] from the two `Hello`s; the answers are mirror images, so both
//! agree without another round trip. The rules, first match wins (`me` / `peer`):
//!
//! | #  | condition                                                  | decision                 |
//! |----|------------------------------------------------------------|--------------------------|
//! | 0  | one side Inconsistent, or UpToDate/Outdated with a clean bitmap (trusted bitmap), at a generation the other's `resync_end` names, whose bitmap is relative to the generation sent (its `current` or `bitmap`) | read the first as at the generation sent, then the rules below (rule 3: the end applies, [`read_at_resync_end`]) |
//! | 0b | one side good that moved on (its `bitmap`) from a generation the other's `resync_end` names as the target's, the other's bitmap relative to the generation sent | read the other (the source) at that generation, then the rules below |
//! | 1  | resource, size or node id conflict; both Primary           | refuse                   |
//! | 2  | neither disk UpToDate/Outdated                             | refuse                   |
//! | 3  | same `current`, neither changed anything since              | no sync                  |
//! | 4  | same `current`, one side is Primary                        | it is source (bitmaps)   |
//! | 5  | same `current`, otherwise                                  | the side that changed; if both, the crashed Primary, else the lower node id, is source (bitmaps) |
//! | 6  | `me.bitmap == peer.current`                                 | me source (bitmaps)      |
//! | 7  | `peer.bitmap == me.current`                                 | peer source (bitmaps)    |
//! | 8  | `me.bitmap == peer.bitmap` (both moved on from it)          | split brain              |
//! | 9  | `peer.current` in `me.history`                              | me source, full          |
//! | 10 | `me.current` in `peer.history`                              | peer source, full        |
//! | 11 | one side UpToDate, the other Inconsistent/Outdated (or     | full from the better one |
//! |    | Outdated vs Inconsistent)                                  |                          |
//! | 12 | any shared ancestor (bitmap/history ids intersect)          | split brain              |
//! | 13 | otherwise (unrelated data)                                 | split brain (unrelated)  |
//!
//! "(bitmaps)": a resync of the union of both dirty bitmaps (the target sends its own), full
//! when a bitmap cannot be trusted (see [`bitmap_enough`]). A Primary never becomes a target.

use std::borrow::Cow;

use super::{Refusal, SplitBrainCause};
use crate::wire::{AfterSb0Pri, AfterSb1Pri, DiskState, Hello, ResyncEnd, Role};

/// What a handshake concluded, from the point of view of the node calling [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Disks already identical: Established.
    NoSync,
    /// This node sends; `full` = every block, else the union of both dirty bitmaps.
    Source { full: bool },
    /// The peer sends.
    Target { full: bool },
    /// Both sides changed data since they last agreed: never resolved silently.
    SplitBrain(SplitBrainCause),
    /// Refuse the connection before any data moves.
    Refuse(Refusal),
}

/// A fresh generation for `node_id`, newer than both `mine` and `seen`.
pub fn fresh(node_id: u64, mine: u64, seen: u64) -> u64 {
    let counter = (mine.max(seen) >> 16) + 1;
    (counter << 16) | (node_id & 0xffff)
}

fn good(d: DiskState) -> bool {
    matches!(d, DiskState::UpToDate | DiskState::Outdated)
}

/// Decides the handshake. `me` is this node's hello, `peer` the peer's.
pub fn decide(me: &Hello, peer: &Hello) -> Decision {
    if me.resource != peer.resource {
        return Decision::Refuse(Refusal::ResourceMismatch {
            mine: me.resource.clone(),
            peer: peer.resource.clone(),
        });
    }
    if me.size != peer.size {
        return Decision::Refuse(Refusal::SizeMismatch {
            mine: me.size,
            peer: peer.size,
        });
    }
    if me.node_id == peer.node_id {
        return Decision::Refuse(Refusal::SameNodeId { id: me.node_id });
    }
    if me.role == Role::Primary && peer.role == Role::Primary {
        return Decision::Refuse(Refusal::BothPrimary);
    }
    // Rule 0, then its mirror (0b) for a target that moved on without the end.
    let (me, peer) = (&*at_resync_end(me, peer), &*at_resync_end(peer, me));
    let (me, peer) = (&*before_resync_end(me, peer), &*before_resync_end(peer, me));
    let raw = match raw_decide(me, peer) {
        Decision::SplitBrain(why) => {
            resolve_split_brain(me, peer).unwrap_or(Decision::SplitBrain(why))
        }
        d => d,
    };
    // Never make a Primary a sync target: it would serve reads from an Inconsistent disk.
    match raw {
        Decision::Target { .. } if me.role == Role::Primary => {
            Decision::Refuse(Refusal::PeerNewerThanPrimary)
        }
        Decision::Source { .. } if peer.role == Role::Primary => {
            Decision::Refuse(Refusal::NewerThanPrimaryPeer)
        }
        d => d,
    }
}

/// Rule 0: `tgt` as the handshake reads it against `src`. A sync target cut off just as its
/// resync ended (the source sent `ResyncDone`, the target never applied it) is still
/// Inconsistent at its old generation, but holds the generation sent with the end less what the
/// source's bitmap names: every resync block was stable on it before the source ended (a bit
/// goes only then), and every write sent since is in the source's transfer log, hence its
/// bitmap at the loss. So when the source's bitmap is relative to that generation (still its
/// `current`, or its `bitmap` once a loss or Ahead moved on), the target counts as at it:
/// rules 3-6 then resume from the bitmaps instead of a full resync (issue 17, defect 6). Only
/// a target without changes of its own qualifies: an Inconsistent one (a forced promotion
/// would have given it a new generation), or one that applied an earlier end (UpToDate, or
/// Outdated by the pull-ahead that followed) with a clean bitmap, and only with a trusted
/// bitmap (it learnt what it lacks). The source is the source either way (rules 9-11
/// otherwise, or, once the source's losses pushed the earlier end's generation out of its
/// two-slot history, a false split brain over "unrelated" data: simulator seeds 6890 and
/// 10732): this only avoids copying everything.
fn at_resync_end<'a>(tgt: &'a Hello, src: &Hello) -> Cow<'a, Hello> {
    let Some(ResyncEnd { gen, target_gens }) = src.resync_end else {
        return Cow::Borrowed(tgt);
    };
    let unchanged = match tgt.disk {
        DiskState::Inconsistent => true,
        DiskState::UpToDate | DiskState::Outdated => tgt.bitmap_gen.is_none() && !tgt.dirty,
        _ => false,
    };
    let applies = target_gens.contains(&tgt.current_gen)
        && unchanged
        && tgt.bitmap_known
        && good(src.disk)
        && src.bitmap_known
        && (src.current_gen == gen || src.bitmap_gen == Some(gen));
    if !applies {
        return Cow::Borrowed(tgt);
    }
    let mut read = tgt.clone();
    read.current_gen = gen;
    Cow::Owned(read)
}

/// The generation rule 0 reads `me` at against `peer` (the end `peer` sent before a cut names
/// `me`'s generation as the target's), if it does. When the handshake then finds nothing to
/// resync, that end applies now, as its `ResyncDone` would have.
pub fn read_at_resync_end(me: &Hello, peer: &Hello) -> Option<u64> {
    let read = at_resync_end(me, peer);
    (read.current_gen != me.current_gen).then_some(read.current_gen)
}

/// Rule 0b: `src` as the handshake reads it against a `tgt` that never applied the end `src`
/// sent and moved on from a generation that end names as the target's (promoted and written
/// there: its `bitmap` is that generation). Such a target is good (UpToDate or Outdated), so it
/// never became the target of that resync (a target turns Inconsistent, durably, before any
/// resync data, and only the end or a forced promotion, which starts an unrelated generation,
/// makes it good again); so the resync moved nothing (a block's bit goes only once the target
/// made it stable): it was a pull-ahead's that ended with nothing marked, which the source
/// ends at once, without a word from the target. The generation the source started on going
/// Ahead then names no data the target lacks, and the source's bitmap, relative to the
/// generation sent, names all it changed since the target's: read the source at the target's
/// generation. Simulator seed 6392 (failovers on): the Primary went Ahead, the peer's acks
/// drained the link before the write that made it go Ahead was marked, the empty resync ended,
/// and the Primary crashed before the peer heard of any of it; the peer, in sync as far as
/// anyone could know, was promoted and written, and the returning crashed Primary saw a split
/// brain (rule 12) where an ordinary failover's rule 7 applies. A source that did change data
/// since (its `current` moved on from the generation sent) still meets rule 8: a split brain.
fn before_resync_end<'a>(src: &'a Hello, tgt: &Hello) -> Cow<'a, Hello> {
    let Some(ResyncEnd { gen, target_gens }) = src.resync_end else {
        return Cow::Borrowed(src);
    };
    let Some(had) = tgt
        .bitmap_gen
        .filter(|&g| g != 0 && g != gen && g != tgt.current_gen && target_gens.contains(&g))
    else {
        return Cow::Borrowed(src);
    };
    let applies = good(tgt.disk)
        && tgt.current_gen != gen
        && good(src.disk)
        && src.bitmap_known
        && (src.current_gen == gen || src.bitmap_gen == Some(gen));
    if !applies {
        return Cow::Borrowed(src);
    }
    let mut read = src.clone();
    if read.current_gen == gen {
        read.current_gen = had;
    }
    if read.bitmap_gen == Some(gen) {
        read.bitmap_gen = Some(had);
    }
    Cow::Owned(read)
}

/// Split brain, resolved by `connect --discard-my-data` on exactly one side, or else by the
/// policies when both nodes have the same ones. `None` = stays a split brain.
fn resolve_split_brain(me: &Hello, peer: &Hello) -> Option<Decision> {
    // Which side loses its changes: true = this node.
    let me_loses = match (me.discard_my_data, peer.discard_my_data) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        (true, true) => None,
        (false, false) => inconsistent_loser(me, peer).or_else(|| policy_loser(me, peer)),
    }?;
    Some(if me_loses {
        Decision::Target {
            full: !sb_bitmap_enough(peer, me),
        }
    } else {
        Decision::Source {
            full: !sb_bitmap_enough(me, peer),
        }
    })
}

/// After a split brain, the union of both bitmaps covers every difference when both are
/// trusted and relative to the same generation (the last one both had).
fn sb_bitmap_enough(src: &Hello, tgt: &Hello) -> bool {
    bitmap_enough(src, tgt)
        || (src.bitmap_known
            && tgt.bitmap_known
            && src.bitmap_gen.is_some()
            && src.bitmap_gen == tgt.bitmap_gen)
}

/// An Inconsistent disk has no changes of its own to keep: it became so as a sync target
/// (e.g. of an earlier `--discard-my-data` whose resync was cut short), by `invalidate`, or by a
/// write error. Against a good disk it loses, as DRBD's target adopts the source's generation at
/// resync start. True = this node loses.
fn inconsistent_loser(me: &Hello, peer: &Hello) -> Option<bool> {
    match (me.disk, peer.disk) {
        (DiskState::Inconsistent, p) if good(p) => Some(true),
        (m, DiskState::Inconsistent) if good(m) => Some(false),
        _ => None,
    }
}

/// The automatic policies (DRBD's after-sb-0pri / after-sb-1pri); true = this node loses.
fn policy_loser(me: &Hello, peer: &Hello) -> Option<bool> {
    if !(good(me.disk) && good(peer.disk)) {
        return None;
    }
    let younger = || {
        // Generation counters grow with every new generation: the larger one was started last.
        let (a, b) = (me.current_gen >> 16, peer.current_gen >> 16);
        (a != b).then_some(a > b)
    };
    match (me.role, peer.role) {
        (Role::Secondary, Role::Secondary) => {
            if me.after_sb_0pri != peer.after_sb_0pri {
                return None;
            }
            match me.after_sb_0pri {
                AfterSb0Pri::Disconnect => None,
                AfterSb0Pri::DiscardZeroChanges => match (me.dirty_blocks, peer.dirty_blocks) {
                    (0, p) if p > 0 => Some(true),
                    (m, 0) if m > 0 => Some(false),
                    _ => None,
                },
                AfterSb0Pri::DiscardYoungerPrimary => younger(),
                AfterSb0Pri::DiscardLeastChanges => match me.dirty_blocks.cmp(&peer.dirty_blocks) {
                    std::cmp::Ordering::Less => Some(true),
                    std::cmp::Ordering::Greater => Some(false),
                    std::cmp::Ordering::Equal => younger(),
                },
            }
        }
        (me_role, _) => {
            if me.after_sb_1pri != peer.after_sb_1pri {
                return None;
            }
            match me.after_sb_1pri {
                AfterSb1Pri::Disconnect => None,
                AfterSb1Pri::DiscardSecondary => Some(me_role == Role::Secondary),
            }
        }
    }
}

/// The target's own changes are known: it sends its bitmap and the source ORs it in.
fn target_known(tgt: &Hello) -> bool {
    tgt.bitmap_known || (!tgt.dirty && !tgt.crashed_primary && tgt.disk != DiskState::Inconsistent)
}

/// `src` syncs to `tgt` by bitmaps (not everything): both bitmaps are trusted and the source's
/// is relative to the target's generation.
pub fn bitmap_enough(src: &Hello, tgt: &Hello) -> bool {
    src.bitmap_known
        && (src.bitmap_gen == Some(tgt.current_gen) || src.current_gen == tgt.current_gen)
        && target_known(tgt)
}

fn changed(h: &Hello) -> bool {
    h.dirty || h.crashed_primary
}

fn ancestors(h: &Hello) -> impl Iterator<Item = u64> + '_ {
    h.bitmap_gen
        .into_iter()
        .chain(h.history)
        .filter(|&g| g != 0)
}

fn split_brain(me: &Hello, peer: &Hello, what: &'static str) -> Decision {
    Decision::SplitBrain(SplitBrainCause {
        what,
        gen: me.current_gen,
        peer_gen: peer.current_gen,
    })
}

fn raw_decide(me: &Hello, peer: &Hello) -> Decision {
    let me_src = |full: bool| Decision::Source { full };
    let peer_src = |full: bool| Decision::Target { full };
    let me_bm = || me_src(!bitmap_enough(me, peer));
    let peer_bm = || peer_src(!bitmap_enough(peer, me));
    // Rule 2.
    if !good(me.disk) && !good(peer.disk) {
        return Decision::Refuse(Refusal::NoUpToDate);
    }
    // Rules 3-5.
    if me.current_gen == peer.current_gen {
        return match (changed(me), changed(peer)) {
            (false, false) if good(me.disk) && good(peer.disk) => Decision::NoSync,
            // The Primary's data wins: the other side's unreplicated changes are not
            // acknowledged ones (those move the generation at the connection loss); a crashed
            // Primary's log holds sync writes never acknowledged without the peer, or an async
            // tail its crash lost. The bitmaps' union puts the Primary's blocks there.
            _ if me.role == Role::Primary && good(me.disk) => me_bm(),
            _ if peer.role == Role::Primary && good(peer.disk) => peer_bm(),
            (true, false) if good(me.disk) => me_bm(),
            (false, true) if good(peer.disk) => peer_bm(),
            (true, true) if good(me.disk) && good(peer.disk) => {
                // Same generation: neither side started new data, so the union of both
                // bitmaps makes them equal whichever way it flows.
                let me_first = me
                    .crashed_primary
                    .cmp(&peer.crashed_primary)
                    .then(peer.node_id.cmp(&me.node_id));
                if me_first.is_gt() {
                    me_bm()
                } else {
                    peer_bm()
                }
            }
            _ if good(me.disk) => me_bm(),
            _ => peer_bm(),
        };
    }
    // Rules 6-7.
    if good(me.disk) && me.bitmap_gen == Some(peer.current_gen) {
        return me_bm();
    }
    if good(peer.disk) && peer.bitmap_gen == Some(me.current_gen) {
        return peer_bm();
    }
    // Rule 8.
    if me.bitmap_gen.is_some() && me.bitmap_gen == peer.bitmap_gen {
        return split_brain(me, peer, "both nodes changed data since they last agreed");
    }
    // Rules 9-10.
    if good(me.disk) && peer.current_gen != 0 && me.history.contains(&peer.current_gen) {
        return me_src(true);
    }
    if good(peer.disk) && me.current_gen != 0 && peer.history.contains(&me.current_gen) {
        return peer_src(true);
    }
    // Rule 11: a disk that is not good carries no data worth a split-brain report.
    match (me.disk, peer.disk) {
        (DiskState::UpToDate, d) if d != DiskState::UpToDate => return me_src(true),
        (d, DiskState::UpToDate) if d != DiskState::UpToDate => return peer_src(true),
        (DiskState::Outdated, DiskState::Inconsistent) => return me_src(true),
        (DiskState::Inconsistent, DiskState::Outdated) => return peer_src(true),
        _ => {}
    }
    // Rule 12.
    if ancestors(me).any(|g| g == peer.current_gen || ancestors(peer).any(|p| p == g))
        || ancestors(peer).any(|g| g == me.current_gen)
    {
        return split_brain(me, peer, "both nodes changed data since they last agreed");
    }
    // Rule 13.
    split_brain(me, peer, "unrelated data generations")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(node: u64, role: Role, disk: DiskState, gen: u64) -> Hello {
        Hello {
            resource: "r0".into(),
            node_id: node,
            size: 1 << 20,
            role,
            disk,
            current_gen: gen,
            bitmap_gen: None,
            bitmap_known: true,
            dirty: false,
            crashed_primary: false,
            history: [0; 2],
            dirty_blocks: 0,
            discard_my_data: false,
            after_sb_0pri: AfterSb0Pri::Disconnect,
            after_sb_1pri: AfterSb1Pri::Disconnect,
            resync_end: None,
        }
    }

    fn mirror(d: &Decision) -> Decision {
        match d {
            Decision::Source { full } => Decision::Target { full: *full },
            Decision::Target { full } => Decision::Source { full: *full },
            other => other.clone(),
        }
    }

    fn check(a: &Hello, b: &Hello) -> Decision {
        let d = decide(a, b);
        let e = decide(b, a);
        match (&d, &e) {
            (Decision::Refuse(_), Decision::Refuse(_))
            | (Decision::SplitBrain(_), Decision::SplitBrain(_)) => {}
            _ => assert_eq!(mirror(&d), e, "decisions must mirror"),
        }
        d
    }

    #[test]
    fn refusals() {
        let a = h(1, Role::Primary, DiskState::UpToDate, 5);
        let mut b = h(2, Role::Secondary, DiskState::UpToDate, 5);
        b.resource = "r1".into();
        assert!(matches!(
            check(&a, &b),
            Decision::Refuse(Refusal::ResourceMismatch { .. })
        ));
        let mut b = h(2, Role::Secondary, DiskState::UpToDate, 5);
        b.size += 1;
        assert!(matches!(
            check(&a, &b),
            Decision::Refuse(Refusal::SizeMismatch { .. })
        ));
        let b = h(2, Role::Primary, DiskState::UpToDate, 5);
        assert!(matches!(
            check(&a, &b),
            Decision::Refuse(Refusal::BothPrimary)
        ));
        let a = h(1, Role::Secondary, DiskState::Inconsistent, 0);
        let b = h(2, Role::Secondary, DiskState::Inconsistent, 0);
        assert!(matches!(check(&a, &b), Decision::Refuse(_)));
    }

    #[test]
    fn initial_full_sync_and_no_sync() {
        let a = h(1, Role::Primary, DiskState::UpToDate, fresh(1, 0, 0));
        let b = h(2, Role::Secondary, DiskState::Inconsistent, 0);
        assert_eq!(check(&a, &b), Decision::Source { full: true });
        let b = h(2, Role::Secondary, DiskState::UpToDate, a.current_gen);
        assert_eq!(check(&a, &b), Decision::NoSync);
    }

    #[test]
    fn bitmap_sync_after_disconnect_and_full_after_crash() {
        let mut a = h(1, Role::Primary, DiskState::UpToDate, 0x20001);
        a.bitmap_gen = Some(0x10001);
        a.dirty = true;
        let b = h(2, Role::Secondary, DiskState::UpToDate, 0x10001);
        assert_eq!(check(&a, &b), Decision::Source { full: false });
        // Equal generations, the primary only has in-flight writes marked.
        let mut a2 = h(1, Role::Primary, DiskState::UpToDate, 0x10001);
        a2.dirty = true;
        assert_eq!(check(&a2, &b), Decision::Source { full: false });
        // Restarted primary: its own recent writes are unknown -> full.
        let mut a3 = h(1, Role::Secondary, DiskState::UpToDate, 0x10001);
        a3.crashed_primary = true;
        a3.bitmap_known = false;
        assert_eq!(check(&a3, &b), Decision::Source { full: true });
        // Promoted secondary meets the crashed primary: full from the promoted one.
        let mut b2 = h(2, Role::Primary, DiskState::UpToDate, 0x30002);
        b2.bitmap_gen = Some(0x10001);
        assert_eq!(check(&b2, &a3), Decision::Source { full: true });
    }

    #[test]
    fn split_brain_refused() {
        let mut a = h(1, Role::Secondary, DiskState::UpToDate, 0x20001);
        a.bitmap_gen = Some(0x10001);
        let mut b = h(2, Role::Secondary, DiskState::UpToDate, 0x30002);
        b.bitmap_gen = Some(0x10001);
        assert!(
            matches!(check(&a, &b), Decision::SplitBrain(c) if c.to_string().starts_with("split brain: "))
        );
    }

    #[test]
    fn failover_resyncs_by_bitmaps_and_history_means_full() {
        // A crashed as Primary at 0x10001 (restored: bitmap = persisted + activity log).
        let mut a = h(1, Role::Secondary, DiskState::UpToDate, 0x10001);
        a.crashed_primary = true;
        a.dirty = true;
        a.bitmap_gen = Some(0x10001);
        // B was promoted and wrote: new generation, bitmap relative to A's.
        let mut b = h(2, Role::Primary, DiskState::UpToDate, 0x20002);
        b.bitmap_gen = Some(0x10001);
        b.dirty = true;
        assert_eq!(check(&b, &a), Decision::Source { full: false });
        // A's bitmap not trusted (restarted without its metadata): full.
        a.bitmap_known = false;
        assert_eq!(check(&b, &a), Decision::Source { full: true });
        // B promoted but wrote nothing yet: same generation, the Primary wins by bitmaps.
        a.bitmap_known = true;
        let b2 = h(2, Role::Primary, DiskState::UpToDate, 0x10001);
        assert_eq!(check(&b2, &a), Decision::Source { full: false });
        // A peer two generations behind: B's bitmap does not reach back, full.
        let mut b3 = h(2, Role::Secondary, DiskState::UpToDate, 0x30002);
        b3.bitmap_gen = Some(0x20002);
        b3.history = [0x10001, 0];
        let c = h(1, Role::Secondary, DiskState::UpToDate, 0x10001);
        assert_eq!(check(&b3, &c), Decision::Source { full: true });
    }

    /// Both moved on from 0x10001 as Primary while partitioned.
    fn split_pair() -> (Hello, Hello) {
        let mut a = h(1, Role::Secondary, DiskState::UpToDate, 0x20001);
        a.bitmap_gen = Some(0x10001);
        a.dirty = true;
        a.dirty_blocks = 5;
        let mut b = h(2, Role::Secondary, DiskState::UpToDate, 0x30002);
        b.bitmap_gen = Some(0x10001);
        b.dirty = true;
        b.dirty_blocks = 9;
        (a, b)
    }

    #[test]
    fn split_brain_resolved_only_by_command_or_policy() {
        let (mut a, mut b) = split_pair();
        assert!(matches!(check(&a, &b), Decision::SplitBrain(_)));
        a.discard_my_data = true;
        assert_eq!(check(&a, &b), Decision::Target { full: false });
        b.discard_my_data = true;
        assert!(
            matches!(check(&a, &b), Decision::SplitBrain(_)),
            "both discarding"
        );
        let (mut a, mut b) = split_pair();
        a.after_sb_0pri = AfterSb0Pri::DiscardLeastChanges;
        assert!(
            matches!(check(&a, &b), Decision::SplitBrain(_)),
            "policies differ: not applied"
        );
        b.after_sb_0pri = AfterSb0Pri::DiscardLeastChanges;
        assert_eq!(check(&a, &b), Decision::Target { full: false });
        a.after_sb_0pri = AfterSb0Pri::DiscardYoungerPrimary;
        b.after_sb_0pri = AfterSb0Pri::DiscardYoungerPrimary;
        assert_eq!(check(&a, &b), Decision::Source { full: false });
        a.after_sb_0pri = AfterSb0Pri::DiscardZeroChanges;
        b.after_sb_0pri = AfterSb0Pri::DiscardZeroChanges;
        assert!(matches!(check(&a, &b), Decision::SplitBrain(_)));
        a.dirty_blocks = 0;
        assert_eq!(check(&a, &b), Decision::Target { full: false });
        let (a, mut b) = split_pair();
        b.role = Role::Primary;
        assert!(matches!(check(&a, &b), Decision::SplitBrain(_)));
        let (mut a, mut b) = split_pair();
        b.role = Role::Primary;
        a.after_sb_1pri = AfterSb1Pri::DiscardSecondary;
        b.after_sb_1pri = AfterSb1Pri::DiscardSecondary;
        assert_eq!(check(&a, &b), Decision::Target { full: false });
        // An untrusted bitmap on either side: full.
        a.bitmap_known = false;
        assert_eq!(check(&a, &b), Decision::Target { full: true });
    }

    #[test]
    fn primary_never_becomes_target() {
        let a = h(1, Role::Primary, DiskState::UpToDate, 0x10001);
        let mut b = h(2, Role::Secondary, DiskState::UpToDate, 0x20002);
        b.bitmap_gen = Some(0x10001);
        assert!(matches!(check(&a, &b), Decision::Refuse(_)));
    }

    /// Rule 0: source B sent `ResyncDone` with 0x20002 to A (at 0x10001 before); the cut came
    /// before A applied it.
    fn cut_at_resync_end() -> (Hello, Hello) {
        let mut a = h(1, Role::Secondary, DiskState::Inconsistent, 0x10001);
        a.history = [0x5, 0];
        let mut b = h(2, Role::Primary, DiskState::UpToDate, 0x20002);
        b.history = [0x10001, 0x5];
        b.resync_end = Some(ResyncEnd {
            gen: 0x20002,
            target_gens: [0x10001, 0x10001],
        });
        (a, b)
    }

    #[test]
    fn a_target_that_missed_the_resync_end_resumes_by_bitmaps() {
        let (a, mut b) = cut_at_resync_end();
        // B's bitmap is relative to the generation it sent: no sync needed but the end's.
        assert_eq!(check(&b, &a), Decision::Source { full: false });
        // B wrote since, with acknowledged writes A may lack: a loss moved it on.
        b.bitmap_gen = Some(0x20002);
        b.current_gen = 0x30002;
        b.history = [0x10001, 0x5];
        b.dirty = true;
        assert_eq!(check(&b, &a), Decision::Source { full: false });
        // Without the end (the old behaviour), a full resync (rule 9).
        let mut old = b.clone();
        old.resync_end = None;
        assert_eq!(check(&old, &a), Decision::Source { full: true });
        // Either generation the target may carry qualifies.
        let mut a2 = a.clone();
        a2.current_gen = 0x15001;
        b.resync_end = Some(ResyncEnd {
            gen: 0x20002,
            target_gens: [0x10001, 0x15001],
        });
        assert_eq!(check(&b, &a2), Decision::Source { full: false });
    }

    /// Async seeds 6890 and 10732 (simulator, flush faults on): the target applied the end of
    /// one resync (UpToDate at 0x30001) and the cut took the source's next end (a pull-ahead's
    /// resync, 0x40001, naming 0x30001 among the target's generations); the source's
    /// generation then moved on three times while apart (a loss, a crash, a write), pushing
    /// 0x30001 out of its history. The target holds 0x40001 less the source's bitmap, as an
    /// Inconsistent one would: resume by bitmaps, not a split brain over unrelated data.
    #[test]
    fn a_target_that_applied_the_previous_end_resumes_by_bitmaps() {
        let mut a = h(2, Role::Secondary, DiskState::UpToDate, 0x30001);
        let mut b = h(1, Role::Primary, DiskState::UpToDate, 0x80001);
        b.bitmap_gen = Some(0x40001);
        b.history = [0x70001, 0x60001];
        b.dirty = true;
        b.resync_end = Some(ResyncEnd {
            gen: 0x40001,
            target_gens: [0, 0x30001],
        });
        assert_eq!(check(&b, &a), Decision::Source { full: false });
        // Outdated (it saw the pull-ahead begin, not its resync): the same.
        a.disk = DiskState::Outdated;
        assert_eq!(check(&b, &a), Decision::Source { full: false });
        // With changes of its own it is no longer what the end describes.
        a.disk = DiskState::UpToDate;
        a.dirty = true;
        a.bitmap_gen = Some(0x30001);
        assert!(matches!(check(&b, &a), Decision::SplitBrain(_)));
    }

    /// Rule 0b, simulator seed 6392: A went Ahead (0x20001 from 0x10001) and ended its empty
    /// resync at once; it crashed before B heard of it. B, UpToDate at 0x10001, was promoted
    /// and wrote (0x20002). A's changes since 0x10001 are its crash's tail: B is the source, by
    /// bitmaps, as in any failover.
    #[test]
    fn a_target_promoted_before_it_heard_of_an_empty_ahead_resync_is_its_source() {
        let mut a = h(1, Role::Secondary, DiskState::UpToDate, 0x20001);
        a.crashed_primary = true;
        a.dirty = true;
        a.bitmap_gen = Some(0x20001);
        a.history = [0x10001, 0x5];
        a.resync_end = Some(ResyncEnd {
            gen: 0x20001,
            target_gens: [0x10001, 0x10001],
        });
        let mut b = h(2, Role::Primary, DiskState::UpToDate, 0x20002);
        b.bitmap_gen = Some(0x10001);
        b.history = [0x5, 0];
        b.dirty = true;
        assert_eq!(check(&b, &a), Decision::Source { full: false });
        // Without the end (the old behaviour): a split brain nobody made (rule 12).
        let mut old = a.clone();
        old.resync_end = None;
        assert!(matches!(check(&b, &old), Decision::SplitBrain(_)));
        // A that changed data since it sent the end (a loss with writes B may lack moved it
        // on): both changed since 0x10001, a split brain as before.
        let mut moved = a.clone();
        moved.current_gen = 0x30001;
        moved.crashed_primary = false;
        assert!(matches!(check(&b, &moved), Decision::SplitBrain(_)));
        // A B that moved on from a generation the end does not name: not this end's.
        let mut other = b.clone();
        other.bitmap_gen = Some(0x5);
        other.history = [0, 0];
        assert_eq!(
            decide(&other, &a),
            decide(&other, &old),
            "the end changes nothing"
        );
        // A B that is not good was a target of that resync (or forced): not this rule's.
        let mut bad = b.clone();
        bad.role = Role::Secondary;
        bad.disk = DiskState::Inconsistent;
        assert_eq!(
            decide(&bad, &a),
            decide(&bad, &old),
            "the end changes nothing"
        );
    }

    #[test]
    fn the_resync_end_never_covers_what_it_does_not_describe() {
        let (a, b) = cut_at_resync_end();
        // A target that does not know what it lacks: full.
        let mut untrusted = a.clone();
        untrusted.bitmap_known = false;
        assert_eq!(check(&b, &untrusted), Decision::Source { full: true });
        // An Inconsistent target at another generation: not this end's.
        let mut other = a.clone();
        other.current_gen = 0x40001;
        assert_eq!(check(&b, &other), Decision::Source { full: true });
        // An UpToDate node at the old generation with changes of its own is not what the
        // end describes (one without is: see the test above).
        let mut up = a.clone();
        up.disk = DiskState::UpToDate;
        up.dirty = true;
        up.bitmap_gen = Some(0x10001);
        assert_eq!(check(&b, &up), Decision::Source { full: true });
        // The source's bitmap is no longer relative to the generation sent (it moved twice):
        // nothing to resume from, full.
        let mut moved = b.clone();
        moved.current_gen = 0x50002;
        moved.bitmap_gen = Some(0x30002);
        moved.history = [0x20002, 0x10001];
        assert_eq!(check(&moved, &a), Decision::Source { full: true });
        // A source whose own disk is not good: refused as before.
        let mut bad = b.clone();
        bad.disk = DiskState::Inconsistent;
        bad.role = Role::Secondary;
        assert!(matches!(check(&bad, &a), Decision::Refuse(_)));
    }

    #[test]
    fn fresh_is_newer_and_unique_per_node() {
        let g1 = fresh(1, 0x50001, 0x70002);
        let g2 = fresh(2, 0x50001, 0x70002);
        assert!(g1 > 0x70002 && g2 > 0x70002 && g1 != g2);
    }
}
