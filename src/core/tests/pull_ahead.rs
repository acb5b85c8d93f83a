//! Pull-ahead (`on-congestion = "pull-ahead"`) across failures: what a Primary did while Ahead,
//! and what its peer never heard of, when the peer takes over.

use super::*;

/// Delivers, in order, the messages queued for node `to` that come before the first one
/// `stop` matches; everything else stays queued.
fn deliver_to_until(d: &mut Duo, to: usize, stop: impl Fn(&PeerMsg) -> bool) {
    let mut kept = std::collections::VecDeque::new();
    let mut stopped = false;
    while let Some((n, conn, msg)) = d.net.pop_front() {
        stopped |= n == to && stop(&msg);
        if n != to || stopped {
            kept.push_back((n, conn, msg));
        } else if d.conn == Some(conn) {
            d.feed(n, Event::Peer { conn, msg });
        }
    }
    d.net = kept;
}

/// Simulator seed 6392 (failovers on, with the operator's `adjust` drawn): the write that
/// made the Primary go Ahead waited for an activity-log transaction, and the peer's acks
/// drained the link before any write was marked. The Primary left Ahead at once with a
/// resync of nothing and sent `ResyncDone` with the generation it started on going Ahead,
/// then crashed before the peer heard of any of it. The peer was Established and UpToDate at
/// the old generation, holding every write the Primary had made stable, and was promoted and
/// written, as an operator's failover does. The returning crashed Primary is a sync target by
/// bitmaps (its changes are its crash's tail, as in any failover), not a split brain: nobody
/// wrote on both sides of a partition.
#[test]
fn a_peer_promoted_before_it_heard_of_an_empty_ahead_resync_is_no_split_brain() {
    let mut d = Duo::with(ahead_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 1, 1);
    let gen0 = d.st(0).current_gen;
    // The link stalls: two writes fill the buffer up to congestion-fill.
    d.write_unsettled(0, 2, 2);
    d.write_unsettled(0, 3, 3);
    // The next write goes Ahead, but waits for its activity-log transaction (extent 5).
    d.hold_al = true;
    d.write_unsettled(0, 40, 4);
    assert_eq!(d.st(0).repl, ReplState::Ahead);
    assert_eq!(d.st(0).dirty_blocks, 0, "nothing marked yet");
    // B gets the shipped writes (not yet the Ahead) and acks them; the acks drain A's link:
    // a resync of nothing, ended at once.
    deliver_to_until(&mut d, 1, |m| matches!(m, PeerMsg::Ahead { .. }));
    deliver_to_until(&mut d, 0, |_| false);
    let st = d.st(0);
    assert_eq!(st.repl, ReplState::Established);
    assert_ne!(st.current_gen, gen0, "going Ahead started a generation");
    assert!(
        d.net
            .iter()
            .any(|(n, _, m)| *n == 1 && matches!(m, PeerMsg::ResyncDone { .. })),
        "the end is on its way to B"
    );
    // A crashes before B hears of the Ahead, its resync or its end.
    d.crash(0);
    d.net.clear();
    d.held_al.clear();
    d.hold_al = false;
    assert_eq!(d.st(1).disk, DiskState::UpToDate);
    assert_eq!(d.st(1).current_gen, gen0);
    // The operator's failover: B is promoted plainly and written.
    d.admin(1, AdminCmd::Promote { force: false });
    assert_eq!(d.st(1).role, Role::Primary);
    d.write(1, 50, 5);
    // A returns (a crashed Primary) and connects.
    d.restart(0);
    d.connect();
    let (a, b) = (d.st(0), d.st(1));
    assert_eq!(a.split_brain, None, "a split brain nobody made");
    assert_eq!(b.split_brain, None, "a split brain nobody made");
    assert_eq!(a.repl, ReplState::Established);
    assert_eq!(a.disk, DiskState::UpToDate);
    assert_eq!(b.role, Role::Primary);
    assert!(d.disk[0] == d.disk[1], "byte-identical after the resync");
    assert_eq!(d.disk[0][(50 * BLOCK) as usize], 5, "B's write reached A");
    assert_eq!(a.current_gen, b.current_gen);
    assert!(
        d.resynced_bytes[1] < SIZE,
        "by bitmaps, not the whole device"
    );
}
