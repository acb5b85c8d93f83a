//! The graceful stop (`twinblk down`) as a core operation, and the `on-peer-lost` fencing hold.

use super::*;

/// Delivers only the messages addressed to node `to`, keeping the others queued (the other
/// node is stopped, as by SIGSTOP).
fn deliver_to(d: &mut Duo, to: usize) {
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut d.net)
        .into_iter()
        .partition(|(n, _, _)| *n == to);
    d.net = rest.into();
    for (n, conn, msg) in mine {
        if d.conn == Some(conn) {
            d.feed(n, Event::Peer { conn, msg });
        }
    }
}

/// Node 0 Primary and connected, with volatile disk caches: block 3 settled on both, block 5
/// written on the peer and acked, its flush barrier still on the way when the peer stops.
fn write_unstable_on_the_peer(d: &mut Duo) {
    d.volatile = true;
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 3, 0x11);
    d.write_unsettled(0, 5, 0x22);
    d.net.retain(|(_, _, m)| matches!(m, PeerMsg::Data(_)));
    deliver_to(d, 1);
    deliver_to(d, 0);
}

/// `twinblk down` on node `n` with the peer not answering: the drain expires. Returns the
/// stop's outcome; the node is gone afterwards (its persisted state stays in `d.saved`).
fn down(d: &mut Duo, n: usize) -> StopOutcome {
    d.feed(n, Event::Stop);
    d.feed(n, Event::Timer(TimerKind::StopDrain));
    let outcome = d.stopped[n].take().expect("the stop ended");
    d.r[n] = None;
    d.conn = None;
    d.net.clear();
    outcome
}

/// Defect 2 of issue 17: a write acked by the peer but not yet stable there (its flush barrier
/// never arrived: the peer was stopped), then `down` on the Primary whose drain times out, and
/// the peer loses its cache. After both restart, the handshake must resync the write, never
/// call two different disks Established.
#[test]
fn down_with_a_write_unstable_on_the_peer_resyncs_it_after_restart() {
    let mut d = Duo::new();
    write_unstable_on_the_peer(&mut d);
    assert_eq!(
        d.completed.last().map(|c| c.1),
        Some(Ok(())),
        "acked to the client"
    );
    assert!(d.st(0).peer_unstable > 0, "the peer has not made it stable");
    let outcome = down(&mut d, 0);
    assert!(
        matches!(outcome.drain, Drain::Expired { .. }),
        "{outcome:?}"
    );
    assert_eq!(outcome.persisted, Ok(()));
    assert!(!d.saved[0].meta.primary);
    // The stopped peer is killed: its cache (block 5) is gone.
    d.crash(1);
    d.restart(0);
    d.restart(1);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect_unsettled();
    assert_eq!(d.st(0).repl, ReplState::Connecting);
    d.settle();
    assert!(d.resynced_bytes[0] > 0, "the unstable write was resynced");
    assert_eq!(d.st(0).repl, ReplState::Established);
    assert_eq!(d.st(1).repl, ReplState::Established);
    assert!(d.disk[0] == d.disk[1], "Established over different disks");
}

#[test]
fn a_primary_losing_its_up_to_date_peer_freezes_writes_until_the_peer_is_fenced() {
    let mut d = Duo::with(fencing_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write_unsettled(0, 3, 0x11);
    lose(&mut d, 0);
    assert!(
        d.completed.is_empty(),
        "a write waiting for the peer completed"
    );
    assert_eq!(d.fence_requests[0], vec![(1, 1)]);
    assert!(d.st(0).frozen.is_some());
    d.write_unsettled(0, 4, 0x22);
    assert!(d.completed.is_empty(), "a new write completed while frozen");
    assert_eq!(
        d.disk[0][(4 * BLOCK) as usize],
        0,
        "a new write started while frozen"
    );

    // The hook fails: still frozen, and the core asks again after `fence_retry`.
    d.feed(
        0,
        Event::Fenced {
            episode: 1,
            result: Err("exit status: 1".into()),
        },
    );
    assert!(d.completed.is_empty());
    assert_eq!(
        d.st(0).frozen.and_then(|f| f.last_error),
        Some("exit status: 1".into())
    );
    d.feed(0, Event::Timer(TimerKind::FenceRetry { episode: 1 }));
    assert_eq!(d.fence_requests[0], vec![(1, 1), (1, 2)]);
    // A stale report (another episode) changes nothing.
    d.feed(
        0,
        Event::Fenced {
            episode: 7,
            result: Ok(()),
        },
    );
    assert!(d.completed.is_empty());

    d.feed(
        0,
        Event::Fenced {
            episode: 1,
            result: Ok(()),
        },
    );
    assert_eq!(d.completed.len(), 2, "{:?}", d.completed);
    assert!(d.completed.iter().all(|c| c.1.is_ok()));
    assert!(d.st(0).frozen.is_none());
    assert!(
        d.st(0).dirty_blocks >= 2,
        "both writes are marked for the peer"
    );
}

#[test]
fn without_fencing_or_after_disconnect_a_loss_freezes_nothing() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write_unsettled(0, 3, 0x11);
    lose(&mut d, 0);
    assert_eq!(d.completed.len(), 1);
    assert!(d.fence_requests[0].is_empty());

    let mut d = Duo::with(fencing_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write_unsettled(0, 3, 0x11);
    lose(&mut d, 0);
    assert!(d.completed.is_empty());
    // The operator takes responsibility: `disconnect` ends the freeze.
    d.admin(0, AdminCmd::Disconnect);
    assert_eq!(d.completed.len(), 1);
    assert!(d.st(0).frozen.is_none());
}

#[test]
fn the_peer_connecting_again_ends_the_freeze() {
    let mut d = Duo::with(fencing_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write_unsettled(0, 3, 0x11);
    lose(&mut d, 0);
    d.feed(
        1,
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
    );
    assert!(d.completed.is_empty());
    d.connect();
    assert_eq!(d.completed.len(), 1);
    assert_eq!(d.st(0).repl, ReplState::Established);
    assert!(d.disk[0] == d.disk[1], "the frozen write was resynced");
}

/// Defect 2's second path: the connection drops during the drain while fencing holds the
/// loss. The transfer log still lands in the bitmap, and the stop ends.
#[test]
fn down_whose_peer_is_lost_during_the_drain_keeps_the_unstable_writes_in_the_bitmap() {
    let mut d = Duo::with(fencing_cfg);
    write_unstable_on_the_peer(&mut d);
    assert_eq!(d.completed.last().map(|c| c.1), Some(Ok(())));
    d.feed(0, Event::Stop);
    assert!(d.stopped[0].is_none(), "the drain waits for the peer");
    lose(&mut d, 0);
    let outcome = d.stopped[0].take().expect("the stop ended");
    assert_eq!(outcome.drain, Drain::PeerLost);
    assert_eq!(outcome.persisted, Ok(()));
    d.r[0] = None;
    d.crash(1);
    d.restart(0);
    d.restart(1);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    assert!(d.resynced_bytes[0] > 0);
    assert_eq!(d.st(1).repl, ReplState::Established);
    assert!(d.disk[0] == d.disk[1], "Established over different disks");
}

#[test]
fn down_drained_sends_a_stability_point_and_stops_clean_without_a_resync() {
    let mut d = Duo::with(|n| {
        let mut c = al_cfg(n);
        c.stability_writes = 1000;
        c
    });
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 3, 0x11);
    assert!(d.st(0).peer_unstable > 0);
    d.feed(0, Event::Stop);
    assert!(d.stopped[0].is_none());
    d.settle();
    let outcome = d.stopped[0].take().expect("the stop ended once drained");
    assert_eq!(outcome.drain, Drain::Drained);
    assert_eq!(outcome.persisted, Ok(()));
    assert!(!d.saved[0].meta.primary);
    d.r[0] = None;
    d.restart(0);
    assert_eq!(d.st(0).dirty_blocks, 0, "nothing to resync");
}

#[test]
fn down_persists_data_then_bitmap_then_not_primary() {
    let mut r = primary_alone(al_cfg(1), synced_meta());
    let o = write(&mut r, 1, 3, 1);
    done(&mut r, writes(&o)[0].0);
    let out = r.handle_vec(Event::Stop, 0);
    let pos = |f: &dyn Fn(&Action) -> bool| out.iter().position(f).expect("present");
    let sync = pos(&|a| matches!(a, Action::SyncData));
    let bitmap = pos(&|a| matches!(a, Action::SaveBitmap { .. }));
    let meta = pos(&|a| matches!(a, Action::SaveMeta(m) if !m.primary));
    let stopped = pos(&|a| matches!(a, Action::Stopped(_)));
    assert!(sync < bitmap && bitmap < meta && meta < stopped, "{out:?}");
    // Afterwards the core starts nothing.
    let late = write_raw(&mut r, 2, 4, 1);
    assert_eq!(completions(&late), vec![(2, Err(libc::EIO))]);
    assert!(writes(&late).is_empty());
}

#[test]
fn down_with_a_local_write_still_in_flight_keeps_the_activity_log_in_force() {
    let mut r = primary_alone(al_cfg(1), synced_meta());
    write(&mut r, 1, 3, 1);
    let mut out = r.handle_vec(Event::Stop, 0);
    assert!(!out.iter().any(|a| matches!(a, Action::Stopped(_))));
    out.extend(r.handle_vec(Event::Timer(TimerKind::StopDrain), 0));
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::SaveMeta(m) if !m.primary)),
        "saved 'not Primary' with a write in flight: {out:?}"
    );
    let outcome = out.iter().find_map(|a| match a {
        Action::Stopped(o) => Some(o.clone()),
        _ => None,
    });
    assert!(
        matches!(
            outcome,
            Some(StopOutcome {
                persisted: Err(StopIncomplete::LocalWritesInFlight { writes: 1 }),
                ..
            })
        ),
        "{outcome:?}"
    );
}

#[test]
fn promotion_connects_unless_the_operator_disconnected() {
    let mut r = Replica::new(cfg(1, Protocol::Sync), synced_meta());
    assert!(!r.status().want_connection);
    r.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    assert!(r.status().want_connection, "promotion reconnects");

    let mut r = Replica::new(cfg(1, Protocol::Sync), synced_meta());
    r.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Disconnect,
        },
        0,
    );
    r.handle_vec(
        Event::Admin {
            tag: 2,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    assert!(!r.status().want_connection, "`disconnect` is kept");
}

/// A Primary cut off from its peer freezes (fencing), and the cluster fences it first: it is
/// killed while frozen, the survivor is promoted and writes. Nothing the frozen node did after
/// the loss was acknowledged, and everything it acknowledged before (sync) is on the survivor,
/// so when it returns it must be a plain sync target: no split brain (issue 20's links-cut
/// scenario found one when the generation moved at the loss instead of when the freeze ends).
#[test]
fn a_primary_fenced_while_frozen_returns_as_sync_target_without_split_brain() {
    let mut d = Duo::with(fencing_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 3, 0x11);
    // Block 4 reaches only node 0's disk: the link is cut before the peer gets it.
    let req4 = d.next_req;
    d.write_unsettled(0, 4, 0x22);
    lose(&mut d, 0);
    d.feed(
        1,
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
    );
    assert!(d.st(0).frozen.is_some());
    assert!(
        d.completed.iter().all(|c| c.0 != req4),
        "block 4 was acknowledged"
    );
    // The cluster fences node 0 (kills it) and promotes node 1, which writes.
    d.crash(0);
    d.admin(1, AdminCmd::Promote { force: false });
    assert_eq!(d.st(1).role, Role::Primary);
    d.write(1, 5, 0x33);
    d.restart(0);
    d.connect();
    for n in [0, 1] {
        assert!(d.st(n).split_brain.is_none(), "node {n}: {:?}", d.st(n));
        assert_eq!(d.st(n).repl, ReplState::Established, "node {n}");
    }
    assert!(
        d.disk[0] == d.disk[1],
        "the returning node was not resynced"
    );
    assert_eq!(
        d.disk[0][(3 * BLOCK) as usize],
        0x11,
        "an acknowledged write was lost"
    );
    assert_eq!(d.disk[0][(5 * BLOCK) as usize], 0x33);
}

/// The same loss in async mode: the frozen Primary acknowledged writes the peer never got, so
/// a survivor promoted behind its back and writing is a real split brain, reported.
#[test]
fn an_async_primary_fenced_while_frozen_with_writes_only_it_has_reports_split_brain() {
    let mut d = Duo::with(|n| {
        let mut c = fencing_cfg(n);
        c.protocol = Protocol::Async;
        c
    });
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write_unsettled(0, 4, 0x22);
    assert!(
        d.completed.iter().any(|c| c.1.is_ok()),
        "async acknowledges at the local write"
    );
    lose(&mut d, 0);
    d.feed(
        1,
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
    );
    d.crash(0);
    d.admin(1, AdminCmd::Promote { force: false });
    d.write(1, 5, 0x33);
    d.restart(0);
    d.connect();
    assert!(
        d.st(0).split_brain.is_some() || d.disk[0][(4 * BLOCK) as usize] == 0x22,
        "node 0's acknowledged write was resynced away without a split brain"
    );
}

/// A Primary with fencing and `fencing_cfg`, connected to `b` on connection 1, with one sync
/// write (req 1, block 3) written locally and waiting for the peer's ack.
fn fencing_primary_with_a_waiting_write() -> (Replica, Replica) {
    let mut a = Replica::new(fencing_cfg(1), synced_meta());
    let mut b = Replica::new(fencing_cfg(2), synced_meta());
    promote_a_and_connect(&mut a, &mut b);
    assert_eq!(a.status().repl, ReplState::Established);
    assert_eq!(a.status().peer_disk, Some(DiskState::UpToDate));
    let o = write(&mut a, 1, 3, 1);
    let out = done(&mut a, writes(&o)[0].0);
    assert!(
        completions(&out).is_empty(),
        "a sync write waits for the peer"
    );
    (a, b)
}

fn fenced_and_frozen(out: &[Action], a: &Replica) {
    assert!(
        out.iter()
            .any(|x| matches!(x, Action::CloseConnection { .. })),
        "the core closed the connection"
    );
    assert!(
        completions(out).iter().all(|(_, r)| r.is_err()),
        "a write the peer lacks was acknowledged before the peer was fenced: {:?}",
        completions(out)
    );
    assert!(
        out.iter()
            .any(|x| matches!(x, Action::FencePeer { attempt: 1, .. })),
        "no fence requested"
    );
    assert!(a.status().frozen.is_some());
}

/// Issue 17: the fencing hold applied only to losses the transport reported. A connection the
/// core itself closes (here: the Primary's own disk failed a write) loses the UpToDate peer just
/// the same, and a cluster manager may promote it: the waiting write must not be acknowledged
/// before the peer is fenced.
#[test]
fn a_close_after_a_local_write_error_freezes_until_the_peer_is_fenced() {
    let (mut a, _b) = fencing_primary_with_a_waiting_write();
    let o = write(&mut a, 2, 5, 1);
    let out = a.handle_vec(
        Event::DiskDone {
            io: writes(&o)[0].0,
            result: Err(libc::EIO),
        },
        0,
    );
    fenced_and_frozen(&out, &a);
    let out = a.handle_vec(
        Event::Fenced {
            episode: 1,
            result: Ok(()),
        },
        0,
    );
    assert!(
        completions(&out).contains(&(1, Ok(()))),
        "the fenced loss answers the held write: {:?}",
        completions(&out)
    );
}

/// The same for a protocol violation by the peer (a second hello on an Established connection).
#[test]
fn a_close_for_a_peer_protocol_error_freezes_until_the_peer_is_fenced() {
    let (mut a, b) = fencing_primary_with_a_waiting_write();
    let out = deliver(&mut a, vec![PeerMsg::Hello(b.my_hello())]);
    fenced_and_frozen(&out, &a);
}

/// An operator's `disconnect` is no loss to fence: it ends any freeze.
#[test]
fn an_operator_disconnect_fences_nothing() {
    let (mut a, _b) = fencing_primary_with_a_waiting_write();
    let out = a.handle_vec(
        Event::Admin {
            tag: 3,
            cmd: AdminCmd::Disconnect,
        },
        0,
    );
    assert!(!out.iter().any(|x| matches!(x, Action::FencePeer { .. })));
    assert_eq!(completions(&out), vec![(1, Ok(()))]);
}

/// Issue 17, defect 7, decided by the core: `secondary` and `down` refuse while frontend
/// clients have the device open (their next writes would fail), naming them and the fix; the
/// driver only reports opens and closes ([`Event::FrontendOpened`], [`Event::FrontendClosed`]).
#[test]
fn demotion_and_down_refuse_while_frontend_clients_have_the_device_open() {
    let mut r = primary_alone(al_cfg(1), synced_meta());
    for (client, name) in [(1, "unix:pid 42"), (2, "10.0.0.9:5000")] {
        r.handle_vec(
            Event::FrontendOpened {
                client,
                name: name.into(),
            },
            0,
        );
    }
    let refusal = |out: Vec<Action>| {
        out.into_iter()
            .find_map(|a| match a {
                Action::AdminDone { result: Err(e), .. } => Some(e),
                _ => None,
            })
            .expect("refused")
    };
    for (cmd, word) in [(AdminCmd::Demote, "secondary"), (AdminCmd::Down, "down")] {
        let e = refusal(r.handle_vec(Event::Admin { tag: 3, cmd }, 0));
        assert_eq!(e.code(), AdminErrorCode::ClientsOpen);
        let t = e.to_string();
        assert!(
            t.contains("2 NBD clients have r0 open (unix:pid 42, 10.0.0.9:5000)"),
            "{t}"
        );
        assert!(t.contains(&format!("`twinblk {word} r0 --force`")), "{t}");
    }
    assert_eq!(r.status().role, Role::Primary);
    // One left: still refused, naming only that one.
    r.handle_vec(Event::FrontendClosed { client: 1 }, 0);
    let e = refusal(r.handle_vec(
        Event::Admin {
            tag: 4,
            cmd: AdminCmd::Demote,
        },
        0,
    ));
    assert!(
        e.to_string()
            .contains("1 NBD client has r0 open (10.0.0.9:5000)"),
        "{e}"
    );
    r.handle_vec(Event::FrontendClosed { client: 2 }, 0);
    for (tag, cmd) in [(5, AdminCmd::Down), (6, AdminCmd::Demote)] {
        let out = r.handle_vec(Event::Admin { tag, cmd }, 0);
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::AdminDone { tag: t, result: Ok(()) } if *t == tag)),
            "{out:?}"
        );
    }
    assert_eq!(r.status().role, Role::Secondary);
}

/// The same on a connected Primary whose last write is not yet stable on the peer (the
/// demotion would wait for it): the open client is refused first (tests/operator.rs found the
/// waiting demotion's path skipping the check).
#[test]
fn a_demotion_that_would_wait_for_the_peer_refuses_open_clients_too() {
    let mut d = Duo::with(|n| {
        let mut c = al_cfg(n);
        c.stability_writes = 1000;
        c
    });
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.feed(
        0,
        Event::FrontendOpened {
            client: 1,
            name: "unix:pid 42".into(),
        },
    );
    d.write(0, 3, 0x11);
    assert!(d.st(0).peer_unstable > 0, "a demotion now would wait");
    d.admin_done.clear();
    d.admin(0, AdminCmd::Demote);
    assert!(
        matches!(
            d.admin_done.last(),
            Some((0, _, Err(AdminError::ClientsOpen { .. })))
        ),
        "{:?}",
        d.admin_done
    );
    assert_eq!(d.st(0).role, Role::Primary);
}
