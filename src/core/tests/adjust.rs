//! `twinblk adjust` in the core ([`AdminCmd::Adjust`]): policies change at the point where the
//! core reads them afresh, never inside a decision in progress, and a refusal applies nothing.

use super::*;

fn settings(c: &Config) -> Adjustable {
    Adjustable {
        resync_rate: c.resync_rate,
        after_sb_0pri: c.after_sb_0pri,
        after_sb_1pri: c.after_sb_1pri,
        fencing: c.fencing,
    }
}

fn adjust(d: &mut Duo, n: usize, f: impl FnOnce(&mut Adjustable)) -> Result<(), AdminError> {
    let mut a = settings(d.r[n].as_ref().expect("alive").config());
    f(&mut a);
    d.admin_done.clear();
    d.admin(n, AdminCmd::Adjust(a));
    d.admin_done.pop().expect("AdminDone").2
}

/// A split brain with neither node Primary: A changed blocks 2 and 3, B block 30.
fn split_brain_without_primary(d: &mut Duo) {
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 1, 1);
    d.cut();
    d.admin(1, AdminCmd::Promote { force: false });
    d.write(0, 2, 2);
    d.write(0, 3, 2);
    d.write(1, 30, 3);
    d.admin(0, AdminCmd::Demote);
    d.admin(1, AdminCmd::Demote);
}

#[test]
fn an_adjusted_split_brain_policy_applies_from_the_next_handshake_on_both_nodes() {
    let mut d = Duo::new();
    split_brain_without_primary(&mut d);
    // The hellos are on their way with `disconnect`; the policy changes on both nodes now.
    d.connect_unsettled();
    for n in [0, 1] {
        adjust(&mut d, n, |a| {
            a.after_sb_0pri = AfterSb0Pri::DiscardLeastChanges
        })
        .expect("adjust");
        // Node 0 changed it between sending its hello and deciding (`admin` delivers the
        // hellos after the command): it decides with what its hello carried, as the peer does.
        assert!(d.st(n).split_brain.is_some(), "node {n}");
    }
    assert_eq!(d.st(0).repl, ReplState::StandAlone);
    assert!(d.disk[0] != d.disk[1]);
    // The next handshake carries the new policy: B changed fewer blocks and loses them.
    d.connect();
    for n in [0, 1] {
        let st = d.st(n);
        assert_eq!(st.repl, ReplState::Established, "node {n}");
        assert!(st.split_brain.is_none(), "node {n}");
    }
    assert!(d.disk[0] == d.disk[1], "identical after the resync");
    assert_eq!(d.disk[1][(2 * BLOCK) as usize], 2, "A's changes kept");
}

#[test]
fn a_policy_adjusted_on_one_node_only_resolves_nothing() {
    let mut d = Duo::new();
    split_brain_without_primary(&mut d);
    adjust(&mut d, 0, |a| {
        a.after_sb_0pri = AfterSb0Pri::DiscardLeastChanges
    })
    .expect("adjust");
    d.connect();
    for n in [0, 1] {
        assert!(d.st(n).split_brain.is_some(), "node {n}");
    }
    assert!(d.disk[0] != d.disk[1], "resolved with one node's policy");
}

#[test]
fn fencing_turned_on_by_adjust_freezes_the_next_loss() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    adjust(&mut d, 0, |a| a.fencing = Fencing::FreezeUntilFenced).expect("adjust");
    d.write_unsettled(0, 3, 0x11);
    lose(&mut d, 0);
    assert_eq!(d.fence_requests[0], vec![(1, 1)]);
    assert!(d.st(0).frozen.is_some());
    assert!(d.completed.is_empty(), "a write completed while frozen");
}

#[test]
fn fencing_off_is_refused_while_frozen_and_nothing_of_the_adjust_applies() {
    let mut d = Duo::with(fencing_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write_unsettled(0, 3, 0x11);
    lose(&mut d, 0);
    assert!(d.st(0).frozen.is_some());
    let before = settings(d.r[0].as_ref().expect("alive").config());
    let e = adjust(&mut d, 0, |a| {
        a.fencing = Fencing::Off;
        a.resync_rate.max_rate = 1 << 20;
        a.after_sb_1pri = AfterSb1Pri::DiscardSecondary;
    })
    .expect_err("turning fencing off while frozen");
    assert_eq!(e, AdminError::FencingStillNeeded);
    let t = e.to_string();
    assert!(t.contains("frozen") && t.contains("disconnect"), "{t}");
    assert_eq!(
        settings(d.r[0].as_ref().expect("alive").config()),
        before,
        "a refused adjust changed settings"
    );
    assert!(d.st(0).frozen.is_some(), "the freeze ended");
    assert!(d.completed.is_empty());
    // With the hook kept, the rest applies while frozen.
    adjust(&mut d, 0, |a| a.resync_rate.max_rate = 1 << 20).expect("adjust");
    assert_eq!(
        d.r[0]
            .as_ref()
            .expect("alive")
            .config()
            .resync_rate
            .max_rate,
        1 << 20
    );
    assert!(d.st(0).frozen.is_some());
    // Once the freeze is over (the peer fenced), fencing may go.
    d.feed(
        0,
        Event::Fenced {
            episode: 1,
            result: Ok(()),
        },
    );
    assert!(d.st(0).frozen.is_none());
    adjust(&mut d, 0, |a| a.fencing = Fencing::Off).expect("adjust");
}
