//! Failover without loss (issue 17): writes completed by a connection loss move the
//! generation, and a planned switchover keeps the old Primary's acknowledged tail.

use super::*;

/// Node `n`'s block `b` holds `byte` (first byte of the block).
fn holds(d: &Duo, n: usize, b: u64, byte: u8) -> bool {
    d.disk[n][(b * BLOCK) as usize] == byte
}

/// Defect 1: A's write waits for B's ack when the link is cut; the loss completes it (the
/// client has it acknowledged). A then issues nothing more and is demoted; the stale B is
/// promoted, with or without writing. At the next handshake A's write must not be overwritten
/// silently: the connection is refused or a split brain reported (A's disk keeps it), or B
/// gets it.
#[test]
fn a_write_completed_by_a_connection_loss_is_never_overwritten_by_a_stale_promoted_peer() {
    for b_writes in [false, true] {
        let mut d = Duo::new();
        d.admin(0, AdminCmd::Promote { force: false });
        d.connect();
        d.write(0, 1, 1);
        let req = d.next_req;
        d.write_unsettled(0, 5, 7);
        assert!(d.completed.iter().all(|&(r, _)| r != req), "waits for B");
        d.cut();
        assert!(
            d.completed.contains(&(req, Ok(()))),
            "the loss completes the waiting write"
        );
        assert!(holds(&d, 0, 5, 7) && !holds(&d, 1, 5, 7));
        d.admin(0, AdminCmd::Demote);
        d.admin(1, AdminCmd::Promote { force: false });
        if b_writes {
            d.write(1, 30, 3);
        }
        d.connect();
        let (sa, sb) = (d.st(0), d.st(1));
        let established = sa.repl == ReplState::Established && sb.repl == ReplState::Established;
        if established {
            assert!(
                holds(&d, 0, 5, 7) && holds(&d, 1, 5, 7),
                "b_writes {b_writes}: Established, but A's acknowledged write is gone"
            );
        } else {
            assert!(
                holds(&d, 0, 5, 7),
                "b_writes {b_writes}: A's acknowledged write was overwritten"
            );
            assert!(
                [&sa, &sb]
                    .iter()
                    .any(|s| s.last_refusal.is_some() || s.split_brain.is_some()),
                "b_writes {b_writes}: not connected and nothing reported: {sa:?} {sb:?}"
            );
        }
        assert!(
            !(b_writes && established),
            "both wrote since they last agreed: a split brain, not a resync"
        );
    }
}

/// Defect 1, durability: the generation that names the loss-completed writes is saved before
/// their completions go out (a crash right after the acknowledgement must not restart under
/// the generation the peer still has).
#[test]
fn a_connection_loss_saves_a_new_generation_before_completing_waiting_writes() {
    let (mut a, _) = pair(Protocol::Sync);
    let before = a.status().current_gen;
    let o1 = write(&mut a, 1, 5, 1);
    done(&mut a, writes(&o1)[0].0);
    let out = a.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    let after = a.status();
    assert_ne!(after.current_gen, before, "a new generation at the loss");
    assert_eq!(after.bitmap_gen, Some(before));
    let save = out
        .iter()
        .position(|x| matches!(x, Action::SaveMeta(m) if m.current_gen == after.current_gen));
    let complete = out
        .iter()
        .position(|x| matches!(x, Action::CompleteClient { req: 1, .. }));
    assert!(
        matches!((save, complete), (Some(s), Some(c)) if s < c),
        "the new generation must be durable before the completion: {out:?}"
    );
    // The next write does not start yet another one (the peer cannot hold this one).
    write(&mut a, 2, 30, 1);
    assert_eq!(a.status().current_gen, after.current_gen);
    assert_eq!(a.status().history, after.history);
}

/// Defect 1, async: a write is acknowledged once local and queued, so a loss with anything
/// unstable on the peer (the transfer log) moves the generation too, even with no request
/// waiting.
#[test]
fn an_async_loss_with_unstable_writes_moves_the_generation() {
    let (mut a, _) = pair(Protocol::Async);
    let before = a.status().current_gen;
    let o1 = write(&mut a, 1, 5, 1);
    assert_eq!(
        completions(&done(&mut a, writes(&o1)[0].0)),
        vec![(1, Ok(()))]
    );
    a.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    assert_ne!(a.status().current_gen, before);
    assert_eq!(a.status().bitmap_gen, Some(before));
    // A loss with nothing unstable on the peer changes nothing.
    let (mut a, _) = pair(Protocol::Async);
    a.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    assert_eq!(a.status().current_gen, before);
    assert_eq!(a.status().bitmap_gen, None);
}

/// Async, and a long stability interval: the writes stay unstable on the peer.
fn async_cfg(node: u64) -> Config {
    let mut c = al_cfg(node);
    c.protocol = Protocol::Async;
    c.stability_writes = 1000;
    c
}

fn unstable_cfg(node: u64) -> Config {
    let mut c = al_cfg(node);
    c.stability_writes = 1000;
    c
}

/// Delivers the control-stream messages now on the network (in their order), before the data
/// streams': QUIC streams are independent, so a role change can overtake the data before it.
fn deliver_control_first(d: &mut Duo) {
    let (control, data): (Vec<_>, Vec<_>) = std::mem::take(&mut d.net)
        .into_iter()
        .partition(|(_, _, m)| m.stream() == crate::wire::Stream::Control);
    d.net = data.into();
    for (to, conn, msg) in control {
        if d.conn == Some(conn) {
            d.feed(to, Event::Peer { conn, msg });
        }
    }
}

fn admin_result(d: &Duo, n: usize, tag: u64) -> Option<Result<(), AdminError>> {
    d.admin_done
        .iter()
        .find(|(m, t, _)| *m == n && *t == tag)
        .map(|(_, _, r)| r.clone())
}

/// Defect 3: a planned switchover (`secondary` on A, then `primary` on B) while A's last
/// acknowledged writes are still on their way (async) or unstable on B (sync). The role change
/// must not overtake them: B must hold every one of them once it is Primary, and the nodes
/// stay connected.
#[test]
fn a_planned_switchover_keeps_the_old_primarys_acknowledged_tail() {
    for mk in [async_cfg as fn(u64) -> Config, unstable_cfg] {
        let mut d = Duo::with(mk);
        d.admin(0, AdminCmd::Promote { force: false });
        d.connect();
        let sync = d.r[0].as_ref().map(|r| r.cfg.protocol) == Some(Protocol::Sync);
        for b in 0..4 {
            if sync {
                // Acked by B (written there), not yet stable: a flush barrier is missing.
                d.write(0, b, 7);
            } else {
                d.write_unsettled(0, b, 7);
            }
        }
        assert_eq!(d.completed.len(), 4, "sync {sync}: all acknowledged");
        d.feed(
            0,
            Event::Admin {
                tag: 5,
                cmd: AdminCmd::Demote,
            },
        );
        deliver_control_first(&mut d);
        d.feed(
            1,
            Event::Admin {
                tag: 6,
                cmd: AdminCmd::Promote { force: false },
            },
        );
        d.settle();
        if d.st(1).role != Role::Primary {
            // Refused while A was still Primary: the operator retries once `secondary` on A
            // answered.
            assert_eq!(admin_result(&d, 0, 5), Some(Ok(())), "sync {sync}");
            d.feed(
                1,
                Event::Admin {
                    tag: 7,
                    cmd: AdminCmd::Promote { force: false },
                },
            );
            d.settle();
        }
        assert_eq!(d.st(1).role, Role::Primary, "sync {sync}");
        assert_eq!(d.st(0).role, Role::Secondary, "sync {sync}");
        for b in 0..4 {
            assert!(
                holds(&d, 1, b, 7),
                "sync {sync}: block {b}, acknowledged on A, is missing on the new Primary"
            );
        }
        assert_eq!(
            d.st(0).repl,
            ReplState::Established,
            "sync {sync}: still connected"
        );
        d.write(1, 10, 9);
        assert!(d.disk[0] == d.disk[1], "sync {sync}");
    }
}

/// Defect 3: `secondary` answers only once the peer has every acknowledged write stable; until
/// then this node stays Primary (its peer's `primary` is refused) and takes no new writes.
#[test]
fn a_demotion_waits_for_the_peer_to_make_the_tail_stable() {
    let mut d = Duo::with(async_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write_unsettled(0, 3, 7);
    d.feed(
        0,
        Event::Admin {
            tag: 5,
            cmd: AdminCmd::Demote,
        },
    );
    assert_eq!(
        admin_result(&d, 0, 5),
        None,
        "answered before the peer had the tail"
    );
    assert_eq!(d.st(0).role, Role::Primary);
    assert!(
        d.net
            .iter()
            .any(|(_, _, m)| matches!(m, PeerMsg::Barrier { flush: true, .. })),
        "a flush barrier asks the peer to make the tail stable"
    );
    // A write arriving meanwhile is refused: the node is on its way to Secondary.
    let req = d.next_req;
    d.write_unsettled(0, 4, 8);
    assert!(d.completed.contains(&(req, Err(libc::EPERM))));
    // Demoting again while waiting: refused, the first one is still on its way.
    d.feed(
        0,
        Event::Admin {
            tag: 6,
            cmd: AdminCmd::Demote,
        },
    );
    assert!(matches!(admin_result(&d, 0, 6), Some(Err(_))));
    d.settle();
    assert_eq!(admin_result(&d, 0, 5), Some(Ok(())));
    assert_eq!(d.st(0).role, Role::Secondary);
    assert_eq!(d.st(0).peer_unstable, 0);
    assert_eq!(d.st(1).peer_role, Some(Role::Secondary));
    assert!(holds(&d, 1, 3, 7));
}

/// Defect 3: the connection is lost while a demotion waits: it fails, the node stays Primary,
/// and the tail is in the bitmap under a new generation (defect 1), so the stale peer cannot
/// take over silently.
#[test]
fn a_demotion_cut_off_from_the_peer_fails_and_keeps_the_tail() {
    let mut d = Duo::with(async_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    let before = d.st(0).current_gen;
    d.write_unsettled(0, 3, 7);
    d.feed(
        0,
        Event::Admin {
            tag: 5,
            cmd: AdminCmd::Demote,
        },
    );
    d.cut();
    let r = admin_result(&d, 0, 5);
    assert!(
        matches!(&r, Some(Err(AdminError::DemotionPeerLost { .. }))),
        "the demotion fails with the reason: {r:?}"
    );
    assert_eq!(d.st(0).role, Role::Primary);
    assert!(d.st(0).dirty_blocks >= 1);
    assert_ne!(d.st(0).current_gen, before);
    // Demoting now (no peer to wait for) goes through at once.
    d.admin(0, AdminCmd::Demote);
    assert_eq!(d.st(0).role, Role::Secondary);
}

/// Defect 3, the peer's side: a promotion is refused while the former Primary's sequenced data
/// is still arriving (held for a missing earlier seq, or queued for the disk), not only while
/// disk writes are in flight.
#[test]
fn a_promotion_is_refused_while_the_former_primarys_data_is_still_arriving() {
    let (mut a, mut b) = pair(Protocol::Async);
    let o1 = write(&mut a, 1, 3, 1);
    let o2 = write(&mut a, 2, 9, 1);
    let (m1, m2) = (sends(&o1), sends(&o2));
    // The second write arrives first: B holds it for the first.
    deliver(&mut b, m2);
    // The role change overtakes both (an older peer that does not wait).
    deliver(
        &mut b,
        vec![PeerMsg::State(PeerState {
            role: Role::Secondary,
            disk: DiskState::UpToDate,
        })],
    );
    let out = b.handle_vec(
        Event::Admin {
            tag: 7,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    assert!(
        out.iter().any(|x| matches!(x, Action::AdminDone { tag: 7, result: Err(e) } if matches!(e, AdminError::PeerWritesLanding { .. }))),
        "{out:?}"
    );
    assert_eq!(b.status().role, Role::Secondary);
    // Once everything landed, the promotion goes through: it asks the peer, and commits on
    // its yes (A here plays the older peer and is not asked).
    let ob = deliver(&mut b, m1);
    for (io, _) in writes(&ob) {
        done(&mut b, io);
    }
    let out = b.handle_vec(
        Event::Admin {
            tag: 8,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    assert_eq!(sends(&out), vec![PeerMsg::PromoteAsk { id: 1 }]);
    let out = deliver(
        &mut b,
        vec![PeerMsg::PromoteAnswer {
            id: 1,
            verdict: PromoteVerdict::Yes,
        }],
    );
    assert!(
        out.iter().any(|x| matches!(
            x,
            Action::AdminDone {
                tag: 8,
                result: Ok(())
            }
        )),
        "{out:?}"
    );
}

/// A demoted node's own last writes are stable before its metadata stops saying Primary: a
/// crash after that no longer adds the activity log to its bitmap (simulator seed 266).
#[test]
fn a_demotion_makes_this_disk_stable_before_saving_secondary() {
    for connected in [true, false] {
        let mut d = Duo::with(unstable_cfg);
        d.admin(0, AdminCmd::Promote { force: false });
        d.connect();
        d.write(0, 3, 7);
        if !connected {
            d.cut();
        }
        let r = d.r[0].as_mut().expect("alive");
        let mut out = r.handle_vec(
            Event::Admin {
                tag: 5,
                cmd: AdminCmd::Demote,
            },
            0,
        );
        // Connected: the demotion waits for the peer's ack of its flush barrier.
        let msgs = sends(&out);
        if connected {
            let b = d.r[1].as_mut().expect("alive");
            let mut acks = Vec::new();
            for a in deliver(b, msgs) {
                match a {
                    Action::Send(m) => acks.push(m),
                    Action::DiskFlush { io } => acks.extend(sends(&done(b, io))),
                    // Only the sends and the flush matter to this exchange.
                    Action::DiskWrite { .. }
                    | Action::DiskTrim { .. }
                    | Action::DiskZero { .. }
                    | Action::DiskRead { .. }
                    | Action::ServeRead { .. }
                    | Action::CompleteClient { .. }
                    | Action::ArmTimer { .. }
                    | Action::Emit(_)
                    | Action::SaveMeta(_)
                    | Action::SaveBitmap { .. }
                    | Action::SaveActivityLog { .. }
                    | Action::SyncData
                    | Action::CloseConnection { .. }
                    | Action::AdminDone { .. }
                    | Action::FencePeer { .. }
                    | Action::Stopped(_) => {}
                }
            }
            let r = d.r[0].as_mut().expect("alive");
            out = deliver(r, acks);
        }
        let sync = out.iter().position(|x| matches!(x, Action::SyncData));
        let save = out
            .iter()
            .position(|x| matches!(x, Action::SaveMeta(m) if !m.primary));
        assert!(
            matches!((sync, save), (Some(s), Some(m)) if s < m),
            "connected {connected}: {out:?}"
        );
    }
}

// ---- promotion agreed with the peer ----

fn admin(r: &mut Replica, tag: u64, cmd: AdminCmd) -> Vec<Action> {
    r.handle_vec(Event::Admin { tag, cmd }, 0)
}

fn answer(out: &[Action], tag: u64) -> Option<Result<(), AdminError>> {
    out.iter().find_map(|x| match x {
        Action::AdminDone { tag: t, result } if *t == tag => Some(result.clone()),
        _ => None,
    })
}

/// `primary` on a connected Secondary asks the peer and answers only with the peer's yes; the
/// peer hears the new role after its yes.
#[test]
fn a_connected_promotion_commits_only_on_the_peers_yes() {
    for protocol in [Protocol::Sync, Protocol::Async] {
        let (mut a, mut b) = pair(protocol);
        let out = admin(&mut a, 1, AdminCmd::Demote);
        assert_eq!(answer(&out, 1), Some(Ok(())));
        deliver(&mut b, sends(&out));
        let out = admin(&mut b, 2, AdminCmd::Promote { force: false });
        assert_eq!(answer(&out, 2), None, "{protocol:?}: waits for A");
        assert_eq!(b.status().role, Role::Secondary);
        let ask = sends(&out);
        assert_eq!(ask, vec![PeerMsg::PromoteAsk { id: 1 }]);
        // A second `primary` (or a `secondary`) meanwhile is refused, not queued.
        let again = admin(&mut b, 3, AdminCmd::Promote { force: false });
        assert_eq!(answer(&again, 3), Some(Err(AdminError::PromotionPending)));
        let again = admin(&mut b, 4, AdminCmd::Demote);
        assert_eq!(answer(&again, 4), Some(Err(AdminError::PromotionPending)));
        let yes = sends(&deliver(&mut a, ask));
        assert_eq!(
            yes,
            vec![PeerMsg::PromoteAnswer {
                id: 1,
                verdict: PromoteVerdict::Yes
            }]
        );
        let out = deliver(&mut b, yes);
        assert_eq!(answer(&out, 2), Some(Ok(())), "{protocol:?}");
        assert_eq!(b.status().role, Role::Primary);
        deliver(&mut a, sends(&out));
        assert_eq!(a.status().peer_role, Some(Role::Primary));
        assert_eq!(a.status().last_refusal, None);
    }
}

/// Simulator sync seed 7162 (flush faults on): a switchover back right after one. B's State
/// (Primary) is still on its way when B demotes again and A is promoted on its stale view of a
/// Secondary peer. Asked, B (Secondary by then) agrees; A receives the stale State before the
/// yes and is promoted with no "both nodes are Primary" refusal. Had B still been Primary, A's
/// promotion is refused naming B, and the connection stays up.
#[test]
fn a_stale_view_of_the_peer_never_makes_a_false_split_brain_report() {
    for b_demotes in [true, false] {
        let (mut a, mut b) = pair(Protocol::Sync);
        deliver(&mut b, sends(&admin(&mut a, 1, AdminCmd::Demote)));
        let ask = sends(&admin(&mut b, 2, AdminCmd::Promote { force: false }));
        let yes = sends(&deliver(&mut a, ask));
        let out = deliver(&mut b, yes);
        assert_eq!(answer(&out, 2), Some(Ok(())));
        // B's State (Primary) stays on the network.
        let mut b_to_a = sends(&out);
        if b_demotes {
            let out = admin(&mut b, 3, AdminCmd::Demote);
            assert_eq!(answer(&out, 3), Some(Ok(())));
            b_to_a.extend(sends(&out));
        }
        assert_eq!(
            a.status().peer_role,
            Some(Role::Secondary),
            "A's view is stale"
        );
        let out = admin(&mut a, 4, AdminCmd::Promote { force: false });
        assert_eq!(answer(&out, 4), None);
        b_to_a.extend(sends(&deliver(&mut b, sends(&out))));
        let out = deliver(&mut a, b_to_a);
        let (sa, sb) = (a.status(), b.status());
        assert_eq!(sa.last_refusal, None, "b_demotes {b_demotes}");
        assert_eq!(sb.last_refusal, None, "b_demotes {b_demotes}");
        assert_eq!(sa.repl, ReplState::Established);
        if b_demotes {
            assert_eq!(answer(&out, 4), Some(Ok(())));
            assert_eq!((sa.role, sb.role), (Role::Primary, Role::Secondary));
        } else {
            let err = answer(&out, 4).expect("answered").expect_err("refused");
            assert_eq!(err.code(), AdminErrorCode::PeerIsPrimary);
            assert_eq!((sa.role, sb.role), (Role::Secondary, Role::Primary));
        }
    }
}

/// `primary` on both nodes at once: the asks cross, and exactly one node is promoted, the
/// lower node id (A, node 1), whichever ask arrives first. B gives up its own ask as soon as it
/// sees A's (its `primary` fails then, naming A) and answers A yes; A refuses B's ask, and
/// that answer finds nothing waiting on B.
#[test]
fn crossing_promotions_promote_exactly_the_lower_node_id() {
    for a_hears_first in [true, false] {
        let (mut a, mut b) = pair(Protocol::Async);
        deliver(&mut b, sends(&admin(&mut a, 1, AdminCmd::Demote)));
        let ask_a = sends(&admin(&mut a, 2, AdminCmd::Promote { force: false }));
        let ask_b = sends(&admin(&mut b, 3, AdminCmd::Promote { force: false }));
        let (to_a, to_b) = if a_hears_first {
            let no = sends(&deliver(&mut a, ask_b));
            let out_b = deliver(&mut b, ask_a);
            (out_b, no)
        } else {
            let out_b = deliver(&mut b, ask_a);
            let no = sends(&deliver(&mut a, ask_b));
            (out_b, no)
        };
        // B gave up at A's ask: its `primary` fails, naming A and the rule.
        let err = answer(&to_a, 3).expect("answered").expect_err("refused");
        assert_eq!(err.code(), AdminErrorCode::PromotionConflict);
        let text = err.to_string();
        assert!(text.contains("listed first"), "{text}");
        assert_eq!(
            sends(&to_a),
            vec![PeerMsg::PromoteAnswer {
                id: 1,
                verdict: PromoteVerdict::Yes
            }],
            "a_hears_first {a_hears_first}"
        );
        assert_eq!(
            to_b,
            vec![PeerMsg::PromoteAnswer {
                id: 1,
                verdict: PromoteVerdict::NoPromoting
            }]
        );
        // A's refusal of B's dropped ask changes nothing on B.
        let out = deliver(&mut b, to_b);
        assert_eq!(answer(&out, 3), None);
        assert_eq!(b.status().role, Role::Secondary);
        let out = deliver(&mut a, sends(&to_a));
        assert_eq!(
            answer(&out, 2),
            Some(Ok(())),
            "a_hears_first {a_hears_first}"
        );
        deliver(&mut b, sends(&out));
        let (sa, sb) = (a.status(), b.status());
        assert_eq!((sa.role, sb.role), (Role::Primary, Role::Secondary));
        assert_eq!(sb.peer_role, Some(Role::Primary));
        assert_eq!((sa.last_refusal, sb.last_refusal), (None, None));
        assert_eq!(sa.repl, ReplState::Established);
        // B's `primary` now: refused, naming the Primary.
        let out = deliver(
            &mut a,
            sends(&admin(&mut b, 4, AdminCmd::Promote { force: false })),
        );
        let out = deliver(&mut b, sends(&out));
        let err = answer(&out, 4).expect("answered").expect_err("refused");
        assert_eq!(err.code(), AdminErrorCode::PeerIsPrimary);
    }
}

/// Every interleaving of `primary` on both connected Secondaries with the delivery of what
/// each sends (each direction in order, as one control stream): never two Primaries at any
/// point, and at the end exactly one, whose `primary` succeeded; the other's failed, as a
/// conflict only if the asks crossed, and then A (the lower node id) won. The injected bugs
/// break it (both refused; both say yes: two Primaries).
#[test]
fn simultaneous_promotions_never_make_two_primaries_in_any_interleaving() {
    assert_eq!(explore_promotions(InjectedBug::None), Ok(()));
    let err = explore_promotions(InjectedBug::CrossingPromotionsBothRefused).expect_err("caught");
    assert!(err.contains("no Primary"), "{err}");
    let err = explore_promotions(InjectedBug::YesWhilePromoting).expect_err("caught");
    assert!(err.contains("two Primaries"), "{err}");
}

/// One path of [`explore_promotions`]: the two nodes, what travels each way, which `primary`
/// ran, and the answers.
struct PromotionRun {
    r: [Replica; 2],
    net: [std::collections::VecDeque<PeerMsg>; 2],
    asked: [bool; 2],
    answers: [Option<Result<(), AdminError>>; 2],
}

impl PromotionRun {
    fn new(bug: InjectedBug) -> PromotionRun {
        let (mut a, mut b) = pair(Protocol::Sync);
        deliver(&mut b, sends(&admin(&mut a, 1, AdminCmd::Demote)));
        for r in [&mut a, &mut b] {
            r.cfg.bug = bug;
        }
        PromotionRun {
            r: [a, b],
            net: Default::default(),
            asked: [false; 2],
            answers: [None, None],
        }
    }

    fn take(&mut self, n: usize, out: Vec<Action>) {
        for x in out {
            match x {
                Action::Send(m) => self.net[1 - n].push_back(m),
                Action::AdminDone { tag: 7, result } => self.answers[n] = Some(result),
                _ => {}
            }
        }
    }

    /// The steps possible now: 0/1 `primary` on that node, 2/3 the next message to that node.
    fn choices(&self) -> Vec<u8> {
        let mut c = Vec::new();
        for n in 0..2 {
            if !self.asked[n] {
                c.push(n as u8);
            }
            if !self.net[n].is_empty() {
                c.push(2 + n as u8);
            }
        }
        c
    }

    fn step(&mut self, choice: u8) {
        let n = usize::from(choice % 2);
        let out = if choice < 2 {
            self.asked[n] = true;
            admin(&mut self.r[n], 7, AdminCmd::Promote { force: false })
        } else {
            let m = self.net[n].pop_front().expect("a message");
            deliver(&mut self.r[n], vec![m])
        };
        self.take(n, out);
    }
}

fn explore_promotions(bug: InjectedBug) -> Result<(), String> {
    let mut paths = 0;
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(path) = stack.pop() {
        let mut run = PromotionRun::new(bug);
        for &c in &path {
            run.step(c);
        }
        let roles = run.r.each_ref().map(|r| r.status().role);
        if roles == [Role::Primary; 2] {
            return Err(format!("two Primaries after {path:?}"));
        }
        let next = run.choices();
        if !next.is_empty() {
            for c in next {
                let mut p = path.clone();
                p.push(c);
                stack.push(p);
            }
            continue;
        }
        paths += 1;
        let Some(winner) = roles.iter().position(|&r| r == Role::Primary) else {
            return Err(format!("no Primary after {path:?}: {:?}", run.answers));
        };
        let [a, b] = &run.answers;
        let (won, lost) = if winner == 0 { (a, b) } else { (b, a) };
        if won != &Some(Ok(())) {
            return Err(format!(
                "node {winner} is Primary, its answer {won:?} ({path:?})"
            ));
        }
        match lost {
            Some(Err(AdminError::PromotionConflict { .. })) if winner == 0 => {}
            Some(Err(AdminError::PeerIsPrimary { .. })) => {}
            other => return Err(format!("the other node's answer {other:?} ({path:?})")),
        }
        // Both Established, each seeing the other as it is.
        for n in 0..2 {
            let s = run.r[n].status();
            if s.repl != ReplState::Established || s.peer_role != Some(roles[1 - n]) {
                return Err(format!(
                    "node {n} {:?} sees {:?} ({path:?})",
                    s.repl, s.peer_role
                ));
            }
        }
    }
    assert!(paths > 10, "{paths} paths");
    Ok(())
}

/// A connection loss before the answer fails the promotion (still Secondary); an answer that
/// arrives for it afterwards changes nothing, and the operator's retry promotes the node alone.
/// A stop fails a waiting promotion too.
#[test]
fn a_promotion_waiting_for_the_peer_fails_at_a_loss_or_a_stop() {
    let (mut a, mut b) = pair(Protocol::Sync);
    deliver(&mut b, sends(&admin(&mut a, 1, AdminCmd::Demote)));
    let ask = sends(&admin(&mut b, 2, AdminCmd::Promote { force: false }));
    let yes = sends(&deliver(&mut a, ask));
    let out = b.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    let err = answer(&out, 2).expect("answered").expect_err("refused");
    assert_eq!(err.code(), AdminErrorCode::PromotionPeerLost);
    assert_eq!(b.status().role, Role::Secondary);
    let out = deliver(&mut b, yes);
    assert_eq!(answer(&out, 2), None);
    assert_eq!(b.status().role, Role::Secondary);
    let out = admin(&mut b, 3, AdminCmd::Promote { force: false });
    assert_eq!(answer(&out, 3), Some(Ok(())));
    assert_eq!(b.status().role, Role::Primary);

    let (mut a, mut b) = pair(Protocol::Sync);
    deliver(&mut b, sends(&admin(&mut a, 1, AdminCmd::Demote)));
    let ask = sends(&admin(&mut b, 2, AdminCmd::Promote { force: false }));
    let yes = sends(&deliver(&mut a, ask));
    let out = b.handle_vec(Event::Stop, 0);
    assert_eq!(answer(&out, 2), Some(Err(AdminError::ShuttingDown)));
    deliver(&mut b, yes);
    assert_eq!(b.status().role, Role::Secondary);
}

/// `primary` right after `secondary` answered on the peer, its State (Secondary) still on its
/// way: the peer's answer, not this node's view, decides (no refusal for the operator to
/// retry). While the peer is really Primary, the refusal names it.
#[test]
fn a_promotion_asks_even_while_the_peers_demotion_is_on_its_way() {
    let (mut a, mut b) = pair(Protocol::Sync);
    let out = admin(&mut b, 1, AdminCmd::Promote { force: false });
    let no = sends(&deliver(&mut a, sends(&out)));
    let out = deliver(&mut b, no);
    match answer(&out, 1) {
        Some(Err(e @ AdminError::PeerIsPrimary { .. })) => {
            let text = e.to_string();
            assert!(text.contains("twinblk secondary r0"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    let demoted = sends(&admin(&mut a, 2, AdminCmd::Demote));
    assert_eq!(
        b.status().peer_role,
        Some(Role::Primary),
        "B's view is stale"
    );
    let ask = sends(&admin(&mut b, 3, AdminCmd::Promote { force: false }));
    assert_eq!(ask, vec![PeerMsg::PromoteAsk { id: 2 }]);
    let mut a_to_b = demoted;
    a_to_b.extend(sends(&deliver(&mut a, ask)));
    let out = deliver(&mut b, a_to_b);
    assert_eq!(answer(&out, 3), Some(Ok(())));
    assert_eq!(b.status().role, Role::Primary);
}
