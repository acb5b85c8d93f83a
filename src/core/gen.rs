//! Data generations and the handshake decision.
//!
//! A simplified form of DRBD's generation ids (the next step brings the full current / bitmap /
//! history scheme): each node has a `current` generation naming its data. A Primary that writes
//! while it is not replicating starts a new generation and remembers the old one as `bitmap_gen`:
//! its dirty bitmap holds every change since `bitmap_gen`. Both sides compute [`decide`] from the
//! two `Hello`s; the answers are mirror images, so both agree without another round trip.

use crate::wire::{DiskState, Hello, Role};

/// What a handshake concluded, from the point of view of the node calling [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Disks already identical: Established.
    NoSync,
    /// This node sends; `full` = every block, else only its dirty bitmap.
    Source { full: bool },
    /// The peer sends.
    Target { full: bool },
    /// Refuse the connection before any data moves.
    Refuse(String),
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
        return Decision::Refuse(format!(
            "peer serves resource {:?}, this node {:?}: check the peer address in the resource file",
            peer.resource, me.resource
        ));
    }
    if me.size != peer.size {
        return Decision::Refuse(format!(
            "device sizes differ: this node {} bytes, peer {} bytes; make both backing devices the same size",
            me.size, peer.size
        ));
    }
    if me.node_id == peer.node_id {
        return Decision::Refuse(format!(
            "peer has this node's own node id {}: give each node its own id",
            me.node_id
        ));
    }
    if me.role == Role::Primary && peer.role == Role::Primary {
        return Decision::Refuse(
            "both nodes are Primary (split brain): demote one with `twinblk secondary`".into(),
        );
    }
    let raw = raw_decide(me, peer);
    // Never make a Primary a sync target: it would serve reads from an Inconsistent disk.
    match raw {
        Decision::Target { .. } if me.role == Role::Primary => Decision::Refuse(
            "the peer has newer data than this Primary: demote this node so it can resync".into(),
        ),
        Decision::Source { .. } if peer.role == Role::Primary => Decision::Refuse(
            "this node has newer data than the Primary peer: demote the peer so it can resync"
                .into(),
        ),
        d => d,
    }
}

/// `src` syncs to `tgt`: only the bitmap is enough when it is known, relative to the target's
/// generation, and the target has no writes of its own the source does not know.
fn bitmap_enough(src: &Hello, tgt: &Hello) -> bool {
    src.bitmap_known
        && (src.bitmap_gen == Some(tgt.current_gen) || src.current_gen == tgt.current_gen)
        && !tgt.dirty
        && !tgt.crashed_primary
        && (tgt.disk != DiskState::Inconsistent || tgt.bitmap_known)
}

fn raw_decide(me: &Hello, peer: &Hello) -> Decision {
    let me_src = |full: bool| Decision::Source { full };
    let peer_src = |full: bool| Decision::Target { full };
    if !good(me.disk) && !good(peer.disk) {
        return Decision::Refuse(
            "neither node has UpToDate data: make one Primary with `twinblk primary --force`"
                .into(),
        );
    }
    if me.current_gen == peer.current_gen {
        let me_c = me.dirty || me.crashed_primary;
        let peer_c = peer.dirty || peer.crashed_primary;
        return match (me_c, peer_c) {
            (true, true) => Decision::Refuse(
                "split brain: both nodes have changes the other lacks; discard one side's data"
                    .into(),
            ),
            (true, false) if good(me.disk) => me_src(!bitmap_enough(me, peer)),
            (false, true) if good(peer.disk) => peer_src(!bitmap_enough(peer, me)),
            (false, false) if good(me.disk) && good(peer.disk) => Decision::NoSync,
            _ if good(me.disk) => me_src(!bitmap_enough(me, peer)),
            _ => peer_src(!bitmap_enough(peer, me)),
        };
    }
    if good(me.disk) && me.bitmap_gen == Some(peer.current_gen) {
        return me_src(!bitmap_enough(me, peer));
    }
    if good(peer.disk) && peer.bitmap_gen == Some(me.current_gen) {
        return peer_src(!bitmap_enough(peer, me));
    }
    match (me.disk, peer.disk) {
        (DiskState::UpToDate, d) if d != DiskState::UpToDate => me_src(true),
        (d, DiskState::UpToDate) if d != DiskState::UpToDate => peer_src(true),
        (DiskState::Outdated, DiskState::Inconsistent) => me_src(true),
        (DiskState::Inconsistent, DiskState::Outdated) => peer_src(true),
        _ => Decision::Refuse(format!(
            "split brain: unrelated data generations (this node {:#x}, peer {:#x}); \
             discard one side's data",
            me.current_gen, peer.current_gen
        )),
    }
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
            (Decision::Refuse(_), Decision::Refuse(_)) => {}
            _ => assert_eq!(mirror(&d), e, "decisions must mirror"),
        }
        d
    }

    #[test]
    fn refusals() {
        let a = h(1, Role::Primary, DiskState::UpToDate, 5);
        let mut b = h(2, Role::Secondary, DiskState::UpToDate, 5);
        b.resource = "r1".into();
        assert!(matches!(check(&a, &b), Decision::Refuse(r) if r.contains("resource")));
        let mut b = h(2, Role::Secondary, DiskState::UpToDate, 5);
        b.size += 1;
        assert!(matches!(check(&a, &b), Decision::Refuse(r) if r.contains("sizes")));
        let b = h(2, Role::Primary, DiskState::UpToDate, 5);
        assert!(matches!(check(&a, &b), Decision::Refuse(r) if r.contains("Primary")));
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
        assert!(matches!(check(&a, &b), Decision::Refuse(r) if r.contains("split brain")));
    }

    #[test]
    fn primary_never_becomes_target() {
        let a = h(1, Role::Primary, DiskState::UpToDate, 0x10001);
        let mut b = h(2, Role::Secondary, DiskState::UpToDate, 0x20002);
        b.bitmap_gen = Some(0x10001);
        assert!(matches!(check(&a, &b), Decision::Refuse(_)));
    }

    #[test]
    fn fresh_is_newer_and_unique_per_node() {
        let g1 = fresh(1, 0x50001, 0x70002);
        let g2 = fresh(2, 0x50001, 0x70002);
        assert!(g1 > 0x70002 && g2 > 0x70002 && g1 != g2);
    }
}
