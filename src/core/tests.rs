use super::*;

const SIZE: u64 = 64 * BLOCK;

fn cfg(node: u64, protocol: Protocol) -> Config {
    Config::new("r0", node, SIZE, protocol)
}

fn synced_meta() -> Meta {
    Meta {
        current_gen: 0x10001,
        bitmap_gen: None,
        history: [0; 2],
        disk: DiskState::UpToDate,
        primary: false,
        no_activity_log: false,
        resync_resumable: false,
        resync_end: None,
    }
}

fn sends(out: &[Action]) -> Vec<PeerMsg> {
    out.iter()
        .filter_map(|a| match a {
            Action::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn writes(out: &[Action]) -> Vec<(IoId, u64)> {
    out.iter()
        .filter_map(|a| match a {
            Action::DiskWrite { io, offset, .. } => Some((*io, *offset)),
            _ => None,
        })
        .collect()
}

fn flushes(out: &[Action]) -> Vec<IoId> {
    out.iter()
        .filter_map(|a| match a {
            Action::DiskFlush { io } => Some(*io),
            _ => None,
        })
        .collect()
}

fn completions(out: &[Action]) -> Vec<(ReqId, Result<(), i32>)> {
    out.iter()
        .filter_map(|a| match a {
            Action::CompleteClient { req, result } => Some((*req, *result)),
            _ => None,
        })
        .collect()
}

fn deliver(to: &mut Replica, msgs: Vec<PeerMsg>) -> Vec<Action> {
    let mut out = Vec::new();
    for m in msgs {
        // Through the real codec, as the driver would.
        let bytes = crate::wire::encode(&m).expect("encode");
        let (m, _) = crate::wire::decode(&bytes)
            .expect("decode")
            .expect("whole frame");
        to.handle(Event::Peer { conn: 1, msg: m }, 0, &mut out);
    }
    out
}

/// Two nodes with identical data, A Primary, connected and Established.
fn pair(protocol: Protocol) -> (Replica, Replica) {
    pair_of(cfg(1, protocol), cfg(2, protocol))
}

/// [`pair`] with each node's configuration given.
fn pair_of(ca: Config, cb: Config) -> (Replica, Replica) {
    let mut a = Replica::new(ca, synced_meta());
    let mut b = Replica::new(cb, synced_meta());
    a.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    a.handle_vec(
        Event::Admin {
            tag: 2,
            cmd: AdminCmd::Connect,
        },
        0,
    );
    b.handle_vec(
        Event::Admin {
            tag: 2,
            cmd: AdminCmd::Connect,
        },
        0,
    );
    let ha = sends(&a.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
    let hb = sends(&b.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
    deliver(&mut b, ha);
    deliver(&mut a, hb);
    assert_eq!(a.status().repl, ReplState::Established);
    assert_eq!(b.status().repl, ReplState::Established);
    (a, b)
}

/// A client write; an activity-log transaction it starts completes at once (its actions and
/// the completion's are both returned, in order). [`write_raw`] leaves it in flight.
fn write(r: &mut Replica, req: ReqId, block: u64, n: u64) -> Vec<Action> {
    let mut out = write_raw(r, req, block, n);
    let mut i = 0;
    while i < out.len() {
        if let Some(Action::SaveActivityLog { io, .. }) = out.get(i) {
            let io = *io;
            out.extend(done(r, io));
        }
        i += 1;
    }
    out
}

fn write_raw(r: &mut Replica, req: ReqId, block: u64, n: u64) -> Vec<Action> {
    let data = Bytes::from(vec![req as u8; (n * BLOCK) as usize]);
    r.handle_vec(
        Event::ClientWrite {
            req,
            offset: block * BLOCK,
            data,
            fua: false,
        },
        0,
    )
}

fn done(r: &mut Replica, io: IoId) -> Vec<Action> {
    r.handle_vec(
        Event::DiskDone {
            io,
            result: Ok(None),
        },
        0,
    )
}

/// Disk I/O `io` fails with EIO.
fn failed(r: &mut Replica, io: IoId) -> Vec<Action> {
    r.handle_vec(
        Event::DiskDone {
            io,
            result: Err(libc::EIO),
        },
        0,
    )
}

/// `a` becomes Primary, both connect (connection 1), and the hellos are exchanged.
fn promote_a_and_connect(a: &mut Replica, b: &mut Replica) {
    a.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    for r in [&mut *a, &mut *b] {
        r.handle_vec(
            Event::Admin {
                tag: 2,
                cmd: AdminCmd::Connect,
            },
            0,
        );
    }
    let ha = sends(&a.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
    let hb = sends(&b.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
    deliver(b, ha);
    deliver(a, hb);
}

#[test]
fn secondary_refuses_client_io() {
    let (_, mut b) = pair(Protocol::Sync);
    let out = write(&mut b, 7, 0, 1);
    assert_eq!(completions(&out), vec![(7, Err(libc::EPERM))]);
    assert!(writes(&out).is_empty());
    let out = b.handle_vec(
        Event::ClientRead {
            req: 8,
            offset: 0,
            len: 4096,
        },
        0,
    );
    assert_eq!(completions(&out), vec![(8, Err(libc::EPERM))]);
}

#[test]
fn sync_write_waits_for_local_and_peer() {
    let (mut a, mut b) = pair(Protocol::Sync);
    let out = write(&mut a, 1, 3, 2);
    let w = writes(&out);
    assert_eq!(w.len(), 1);
    let msgs = sends(&out);
    assert!(
        matches!(&msgs[..], [PeerMsg::Data(e)] if e.offset == 3 * BLOCK && e.crc32 == crc32fast::hash(&e.data))
    );
    // Local completion alone is not enough.
    assert!(completions(&done(&mut a, w[0].0)).is_empty());
    // The secondary writes, then acks.
    let out_b = deliver(&mut b, msgs);
    let wb = writes(&out_b);
    assert_eq!(wb.len(), 1);
    assert!(
        sends(&out_b).is_empty(),
        "no ack before the disk write completes"
    );
    let acks = sends(&done(&mut b, wb[0].0));
    assert_eq!(
        acks,
        vec![PeerMsg::WriteAck {
            seq: 1,
            timing: Default::default()
        }]
    );
    assert_eq!(completions(&deliver(&mut a, acks)), vec![(1, Ok(()))]);
}

#[test]
fn async_write_completes_locally_and_back_pressures() {
    let mut c = cfg(1, Protocol::Async);
    c.send_buffer = 2 * BLOCK;
    let mut a = Replica::new(c, synced_meta());
    let mut b = Replica::new(cfg(2, Protocol::Async), synced_meta());
    promote_a_and_connect(&mut a, &mut b);

    let o1 = write(&mut a, 1, 0, 2);
    assert_eq!(
        completions(&done(&mut a, writes(&o1)[0].0)),
        vec![(1, Ok(()))]
    );
    // The buffer is full (2 blocks unacked): the next write waits, not even issued locally.
    let o2 = write(&mut a, 2, 10, 1);
    assert!(writes(&o2).is_empty() && sends(&o2).is_empty());
    assert_eq!(a.status().requests_in_flight, 1);
    // The peer acks the first: room again, the second goes.
    let ob = deliver(&mut b, sends(&o1));
    let ack = sends(&done(&mut b, writes(&ob)[0].0));
    let o3 = deliver(&mut a, ack);
    assert_eq!(writes(&o3).len(), 1);
}

#[test]
fn overlapping_writes_are_ordered_on_the_primary() {
    let (mut a, _) = pair(Protocol::Sync);
    let o1 = write(&mut a, 1, 4, 4);
    let o2 = write(&mut a, 2, 6, 1); // overlaps the first
    let o3 = write(&mut a, 3, 20, 1); // does not
    assert_eq!(writes(&o1).len(), 1);
    assert!(writes(&o2).is_empty(), "overlapping write must wait");
    assert_eq!(writes(&o3).len(), 1, "independent write goes at once");
    let o4 = done(&mut a, writes(&o1)[0].0);
    assert_eq!(writes(&o4), vec![(writes(&o4)[0].0, 6 * BLOCK)]);
}

#[test]
fn write_after_completion_opens_new_epoch_without_sending_a_barrier() {
    let (mut a, _) = pair(Protocol::Async);
    let o1 = write(&mut a, 1, 0, 1);
    let e1 = match &sends(&o1)[..] {
        [PeerMsg::Data(e)] => e.epoch,
        other => panic!("{other:?}"),
    };
    // A second write before anything completed: same epoch.
    let o2 = write(&mut a, 2, 1, 1);
    assert!(matches!(&sends(&o2)[..], [PeerMsg::Data(e)] if e.epoch == e1));
    done(&mut a, writes(&o1)[0].0);
    // After a completion: a new epoch, and no order barrier on the wire (the peer applies a
    // seq prefix, which is all an order barrier would have guaranteed).
    let o3 = write(&mut a, 3, 2, 1);
    match &sends(&o3)[..] {
        [PeerMsg::Data(e)] => assert_eq!(e.epoch, e1 + 1),
        other => panic!("expected data alone, got {other:?}"),
    }
}

#[test]
fn async_secondary_issues_later_epochs_in_seq_order_without_draining() {
    let (mut a, mut b) = pair(Protocol::Async);
    let o1 = write(&mut a, 1, 0, 1);
    done(&mut a, writes(&o1)[0].0);
    let o2 = write(&mut a, 2, 8, 1); // next epoch
    let o3 = write(&mut a, 3, 0, 1); // overlaps the first write
    let mut msgs = sends(&o1);
    msgs.extend(sends(&o2));
    msgs.extend(sends(&o3));
    assert!(msgs.iter().all(|m| matches!(m, PeerMsg::Data(_))));
    // Only the later messages arrive: nothing may be applied past the gap.
    let first = msgs.remove(0);
    let ob = deliver(&mut b, msgs.clone());
    assert!(writes(&ob).is_empty(), "a write past a seq gap was applied");
    // The gap fills: epoch 2's write goes at once with epoch 1's; the overlapping write waits.
    let ob = deliver(&mut b, vec![first]);
    let wb = writes(&ob);
    assert_eq!(
        wb.iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![0, 8 * BLOCK],
        "epoch 2 starts without waiting for epoch 1; the overlapping write waits"
    );
    let ob2 = done(&mut b, wb[0].0);
    assert!(flushes(&ob2).is_empty(), "no flush without a flush barrier");
    assert_eq!(
        writes(&ob2).iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![0],
        "the overlapping write follows the one it overlaps"
    );
}

#[test]
fn secondary_still_drains_an_order_barrier_from_an_older_peer() {
    let (mut a, mut b) = pair(Protocol::Async);
    let o1 = write(&mut a, 1, 0, 1);
    done(&mut a, writes(&o1)[0].0);
    let o2 = write(&mut a, 2, 8, 1);
    // What an older build sent: data(e1), order barrier(e1), data(e2).
    let (d1, mut d2) = match (&sends(&o1)[..], &sends(&o2)[..]) {
        ([PeerMsg::Data(x)], [PeerMsg::Data(y)]) => (x.clone(), y.clone()),
        other => panic!("{other:?}"),
    };
    d2.seq = d1.seq + 2;
    let barrier = PeerMsg::Barrier {
        seq: d1.seq + 1,
        epoch: d1.epoch,
        flush: false,
    };
    let ob = deliver(&mut b, vec![PeerMsg::Data(d1), barrier, PeerMsg::Data(d2)]);
    let wb = writes(&ob);
    assert_eq!(wb.len(), 1, "only epoch 1's write may start");
    let ob2 = done(&mut b, wb[0].0);
    assert!(
        flushes(&ob2).is_empty(),
        "an order barrier is never flushed"
    );
    assert_eq!(
        writes(&ob2).iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![8 * BLOCK]
    );
}

/// Runs `n` writes one after the other (each after the previous completed, so each opens an
/// epoch) through a connected pair; returns how many flushes the secondary issued.
fn sequential_writes(a: &mut Replica, b: &mut Replica, first_req: ReqId, n: u64) -> usize {
    let mut peer_flushes = 0;
    for i in 0..n {
        let req = first_req + i;
        let oa = write(a, req, i % 32, 1);
        let ob = deliver(b, sends(&oa));
        peer_flushes += flushes(&ob).len();
        let mut acks = Vec::new();
        for (io, _) in writes(&ob) {
            let d = done(b, io);
            peer_flushes += flushes(&d).len();
            acks.extend(sends(&d));
        }
        let mut completed = completions(&done(a, writes(&oa)[0].0));
        completed.extend(completions(&deliver(a, acks)));
        assert_eq!(completed, vec![(req, Ok(()))]);
    }
    peer_flushes
}

#[test]
fn sync_order_barriers_cost_the_secondary_no_flush() {
    let (mut a, mut b) = pair(Protocol::Sync);
    // 50 epochs: no flush on the peer, and no barrier on the wire at all.
    assert_eq!(sequential_writes(&mut a, &mut b, 1, 50), 0);
    assert_eq!(a.status().peer_unstable, 50, "not yet stable on the peer");
    // A client FLUSH is a flush barrier: exactly one flush there, and its ack empties the
    // transfer log.
    let of = a.handle_vec(Event::ClientFlush { req: 99 }, 0);
    assert!(completions(&done(&mut a, flushes(&of)[0])).is_empty());
    let ob = deliver(&mut b, sends(&of));
    let fl = flushes(&ob);
    assert_eq!(fl.len(), 1);
    let ack = sends(&done(&mut b, fl[0]));
    assert_eq!(completions(&deliver(&mut a, ack)), vec![(99, Ok(()))]);
    assert_eq!(a.status().peer_unstable, 0);
}

#[test]
fn stability_point_after_n_writes_makes_them_stable_on_the_peer() {
    let mut ca = cfg(1, Protocol::Sync);
    ca.stability_writes = 10;
    let mut a = Replica::new(ca, synced_meta());
    let mut b = Replica::new(cfg(2, Protocol::Sync), synced_meta());
    promote_a_and_connect(&mut a, &mut b);
    // The 10th write sends a flush barrier after it; the peer flushes once and acks, and the
    // transfer log lets go of all ten.
    let mut peer_flushes = 0;
    let mut msgs = Vec::new();
    for i in 0..10 {
        let oa = write(&mut a, i + 1, i, 1);
        msgs.extend(sends(&oa));
    }
    assert!(matches!(
        msgs.last(),
        Some(PeerMsg::Barrier { flush: true, .. })
    ));
    let ob = deliver(&mut b, msgs);
    let mut acks = Vec::new();
    for (io, _) in writes(&ob) {
        let d = done(&mut b, io);
        for f in flushes(&d) {
            peer_flushes += 1;
            acks.extend(sends(&done(&mut b, f)));
        }
        acks.extend(sends(&d));
    }
    assert_eq!(peer_flushes, 1);
    assert_eq!(a.status().peer_unstable, 10);
    deliver(&mut a, acks);
    assert_eq!(a.status().peer_unstable, 0);
}

#[test]
fn stability_timer_sends_a_flush_barrier_for_unstable_writes() {
    let (mut a, mut b) = pair(Protocol::Sync);
    let oa = write(&mut a, 1, 0, 1);
    let at = oa
        .iter()
        .find_map(|x| match x {
            Action::ArmTimer {
                kind: kind @ TimerKind::Stability { .. },
                at,
            } => Some((*kind, *at)),
            _ => None,
        })
        .expect("the first unstable write arms the stability timer");
    assert_eq!(at.1, a.config().stability_interval);
    let ot = a.handle_vec(Event::Timer(at.0), at.1);
    assert!(matches!(
        &sends(&ot)[..],
        [PeerMsg::Barrier { flush: true, .. }]
    ));
    // Nothing new since: the next firing sends nothing.
    let ob = deliver(&mut b, sends(&oa));
    deliver(&mut b, sends(&ot));
    let _ = ob;
    let again = a.handle_vec(Event::Timer(at.0), 2 * at.1);
    assert!(sends(&again).is_empty());
}

#[test]
fn sync_flush_waits_for_peer_barrier_ack() {
    let (mut a, mut b) = pair(Protocol::Sync);
    let of = a.handle_vec(Event::ClientFlush { req: 9 }, 0);
    let fl = flushes(&of);
    assert_eq!(fl.len(), 1);
    assert!(completions(&done(&mut a, fl[0])).is_empty());
    let ob = deliver(&mut b, sends(&of));
    let ack = sends(&done(&mut b, flushes(&ob)[0]));
    assert_eq!(completions(&deliver(&mut a, ack)), vec![(9, Ok(()))]);
}

#[test]
fn disconnect_completes_waiting_writes_and_marks_them_dirty() {
    let (mut a, _) = pair(Protocol::Sync);
    let o1 = write(&mut a, 1, 5, 2);
    done(&mut a, writes(&o1)[0].0);
    let out = a.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    assert_eq!(completions(&out), vec![(1, Ok(()))]);
    assert_eq!(a.status().repl, ReplState::Connecting);
    assert!(a.bitmap().get(5) && a.bitmap().get(6) && !a.bitmap().get(7));
    // Writes while disconnected are served locally and remembered.
    let o2 = write(&mut a, 2, 30, 1);
    assert!(sends(&o2).is_empty());
    assert!(out
        .iter()
        .any(|x| matches!(x, Action::Emit(StateChange::ConnectionLost { .. }))));
    assert_eq!(
        completions(&done(&mut a, writes(&o2)[0].0)),
        vec![(2, Ok(()))]
    );
    assert_eq!(a.status().dirty_blocks, 3);
}

#[test]
fn a_connection_loss_with_unacked_writes_keeps_the_history_free_of_copies() {
    let (mut a, _) = pair(Protocol::Sync);
    let before = a.status();
    let o1 = write(&mut a, 1, 5, 1);
    done(&mut a, writes(&o1)[0].0);
    a.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    // The bitmap (the unacked write) is relative to the generation the peer has.
    assert_eq!(a.status().bitmap_gen, Some(before.current_gen));
    // The first write alone starts a new one; the old one is named once, as the bitmap's,
    // not pushed into history as well (two slots: a copy would push out an older one).
    write(&mut a, 2, 30, 1);
    let after = a.status();
    assert_ne!(after.current_gen, before.current_gen);
    assert_eq!(after.bitmap_gen, Some(before.current_gen));
    assert_eq!(after.history, before.history);
}

#[test]
fn reconnect_resyncs_dirty_blocks_then_target_is_up_to_date() {
    let (mut a, mut b) = pair(Protocol::Sync);
    a.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    b.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    let o = write(&mut a, 1, 12, 1);
    done(&mut a, writes(&o)[0].0);
    let ha = sends(&a.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
    let hb = sends(&b.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
    let ob0 = deliver(&mut b, ha);
    assert_eq!(b.status().repl, ReplState::SyncTarget);
    assert_eq!(b.status().disk, DiskState::Inconsistent);
    let mut oa = deliver(&mut a, hb);
    assert_eq!(a.status().repl, ReplState::SyncSource);
    assert!(
        !oa.iter().any(|x| matches!(x, Action::DiskRead { .. })),
        "the source waits for the target's bitmap"
    );
    oa.extend(deliver(&mut a, sends(&ob0)));
    assert_eq!(a.status().resync, Some((1, 1)));
    // The target learns the progress from the source.
    deliver(&mut b, sends(&oa));
    assert_eq!(b.status().resync, Some((1, 1)), "progress on the target");
    let reads: Vec<_> = oa
        .iter()
        .filter_map(|x| match x {
            Action::DiskRead { io, offset, len } => Some((*io, *offset, *len)),
            _ => None,
        })
        .collect();
    assert_eq!(reads.len(), 1, "only the dirty block is read");
    assert_eq!(reads[0].1, 12 * BLOCK);
    let data = Bytes::from(vec![1u8; BLOCK as usize]);
    let oa2 = a.handle_vec(
        Event::DiskDone {
            io: reads[0].0,
            result: Ok(Some(data)),
        },
        0,
    );
    let ob = deliver(&mut b, sends(&oa2));
    let ack = sends(&done(&mut b, writes(&ob)[0].0));
    let oa3 = deliver(&mut a, ack);
    // Written on the target, not yet stable there: the bit stays until a flush covers it.
    assert_eq!(a.status().repl, ReplState::SyncSource);
    assert_eq!(a.status().dirty_blocks, 1);
    assert_eq!(
        a.status().resync,
        Some((0, 1)),
        "progress counts it as done"
    );
    let ob1 = deliver(&mut b, sends(&oa3)); // the flush barrier
    let flushed = sends(&done(&mut b, flushes(&ob1)[0]));
    let oa4 = deliver(&mut a, flushed);
    assert_eq!(a.status().repl, ReplState::Established);
    assert_eq!(a.status().dirty_blocks, 0);
    let ob2 = deliver(&mut b, sends(&oa4)); // ResyncDone: flush first
    let ob3 = done(&mut b, flushes(&ob2)[0]);
    assert_eq!(b.status().disk, DiskState::UpToDate);
    assert_eq!(b.status().current_gen, a.status().current_gen);
    assert!(ob3
        .iter()
        .any(|x| matches!(x, Action::SaveMeta(m) if m.disk == DiskState::UpToDate)));
}

#[test]
fn handshake_refuses_other_size_before_data_moves() {
    let mut a = Replica::new(cfg(1, Protocol::Sync), synced_meta());
    let mut other = cfg(2, Protocol::Sync);
    other.size = SIZE * 2;
    let mut b = Replica::new(other, synced_meta());
    for r in [&mut a, &mut b] {
        r.handle_vec(
            Event::Admin {
                tag: 1,
                cmd: AdminCmd::Connect,
            },
            0,
        );
    }
    let _ = a.handle_vec(Event::ConnectionUp { conn: 1 }, 0);
    let hb = sends(&b.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
    let out = deliver(&mut a, hb);
    assert!(out.iter().any(|x| matches!(
        x,
        Action::CloseConnection {
            reason: CloseReason::Refused(Refusal::SizeMismatch { .. }),
            ..
        }
    )));
    assert!(out
        .iter()
        .any(|x| matches!(x, Action::Emit(StateChange::Refused { .. }))));
    assert!(sends(&out)
        .iter()
        .all(|m| matches!(m, PeerMsg::Refuse { .. })));
    let st = a.status();
    assert_eq!(st.repl, ReplState::StandAlone);
    assert!(matches!(
        st.last_refusal,
        Some(Refusal::SizeMismatch { .. })
    ));
    // The text names the thing and the fix.
    assert!(st.last_refusal.is_some_and(|r| r
        .to_string()
        .contains("make both backing devices the same size")));
}

#[test]
fn crc_mismatch_closes_connection_and_marks_region() {
    let (mut a, mut b) = pair(Protocol::Sync);
    let o = write(&mut a, 1, 9, 1);
    let mut msgs = sends(&o);
    if let Some(PeerMsg::Data(e)) = msgs.first_mut() {
        e.crc32 ^= 1;
    }
    let out = deliver(&mut b, msgs);
    assert!(
        writes(&out).is_empty(),
        "corrupt data never reaches the disk"
    );
    assert!(out
        .iter()
        .any(|x| matches!(x, Action::CloseConnection { reason: CloseReason::CrcMismatch { offset, .. }, .. } if *offset == 9 * BLOCK)));
    // The sender learns of the loss and marks the unacked region for resync.
    a.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    assert!(a.bitmap().get(9));
    assert!(
        !b.bitmap().get(9),
        "the receiver's bitmap names only what its peer lacks"
    );
}

#[test]
fn promotion_rules() {
    let mut n = Replica::new(cfg(1, Protocol::Sync), Meta::new_device());
    let out = n.handle_vec(
        Event::Admin {
            tag: 4,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    assert!(out.iter().any(
        |x| matches!(x, Action::AdminDone { tag: 4, result: Err(e @ AdminError::NotUpToDate { .. }) } if e.to_string().contains("--force"))
    ));
    let out = n.handle_vec(
        Event::Admin {
            tag: 5,
            cmd: AdminCmd::Promote { force: true },
        },
        0,
    );
    assert!(out.iter().any(|x| matches!(
        x,
        Action::AdminDone {
            tag: 5,
            result: Ok(())
        }
    )));
    assert_eq!(n.status().role, Role::Primary);
    assert_eq!(n.status().disk, DiskState::UpToDate);
    assert!(n.meta().primary && n.meta().current_gen != 0);
    // Demotion refuses while requests are in flight.
    let _ = write(&mut n, 1, 0, 1);
    let out = n.handle_vec(
        Event::Admin {
            tag: 6,
            cmd: AdminCmd::Demote,
        },
        0,
    );
    assert!(out.iter().any(|x| matches!(
        x,
        Action::AdminDone {
            tag: 6,
            result: Err(_)
        }
    )));
}

fn al_cfg(node: u64) -> Config {
    let mut c = cfg(node, Protocol::Sync);
    c.al_extent = 8 * BLOCK;
    c.al_extents = 2;
    // A stability point after every write: each is stable on the peer (and unpins its extent)
    // as soon as it is acked, so these tests see the log's LRU, not the stability timer.
    c.stability_writes = 1;
    c
}

fn primary_alone(c: Config, meta: Meta) -> Replica {
    let mut a = Replica::new(c, meta);
    a.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    a
}

fn al_saves(out: &[Action]) -> Vec<Vec<u64>> {
    out.iter()
        .filter_map(|a| match a {
            Action::SaveActivityLog { extents, .. } => Some(extents.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn activity_log_hot_set_is_free_and_eviction_persists_bits_first() {
    let mut a = primary_alone(al_cfg(1), synced_meta());
    // First write to extent 0: one transaction, before the disk write.
    let out = write(&mut a, 1, 0, 1);
    assert_eq!(al_saves(&out), vec![vec![0]]);
    let al_at = out
        .iter()
        .position(|x| matches!(x, Action::SaveActivityLog { .. }));
    let w_at = out
        .iter()
        .position(|x| matches!(x, Action::DiskWrite { .. }));
    assert!(al_at < w_at, "the log names the extent before the write");
    for (io, _) in writes(&out) {
        done(&mut a, io);
    }
    // Hot set: more writes to extent 0 cost no persistence at all.
    for req in 2..20 {
        let out = write(&mut a, req, req % 8, 1);
        assert!(
            out.iter().all(|x| !matches!(
                x,
                Action::SaveActivityLog { .. } | Action::SaveBitmap { .. }
            )),
            "no metadata I/O for a hot extent: {out:?}"
        );
        for (io, _) in writes(&out) {
            done(&mut a, io);
        }
    }
    let out = write(&mut a, 30, 8, 1); // extent 1
    assert_eq!(al_saves(&out), vec![vec![0, 1]]);
    for (io, _) in writes(&out) {
        done(&mut a, io);
    }
    // Extent 2: the log is full; extent 0 (least recently used) leaves, its dirty words are
    // persisted before the new log.
    let out = write(&mut a, 31, 16, 1);
    let bm_at = out
        .iter()
        .position(|x| matches!(x, Action::SaveBitmap { first_word: 0, .. }));
    let al_at = out
        .iter()
        .position(|x| matches!(x, Action::SaveActivityLog { .. }));
    assert!(bm_at.is_some() && bm_at < al_at, "{out:?}");
    assert_eq!(al_saves(&out), vec![vec![1, 2]]);
}

fn al_txns(out: &[Action]) -> Vec<(IoId, Vec<u64>)> {
    out.iter()
        .filter_map(|a| match a {
            Action::SaveActivityLog { io, extents } => Some((*io, extents.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn activity_log_group_commit_one_transaction_in_flight() {
    let mut a = primary_alone(al_cfg(1), synced_meta());
    // Extent 0 misses: a transaction, and the write waits for it.
    let out = write_raw(&mut a, 1, 0, 1);
    let t1 = al_txns(&out);
    assert_eq!(t1.len(), 1);
    assert_eq!(t1[0].1, vec![0]);
    assert!(writes(&out).is_empty(), "no write before its log: {out:?}");
    // While it is in flight: a second write to extent 0 (not durable yet) and writes to
    // extents 1 and 2 all wait, and start no transaction of their own.
    let mut waiting = Vec::new();
    for (req, block) in [(2, 1), (3, 8), (4, 16), (5, 17)] {
        waiting.extend(write_raw(&mut a, req, block, 1));
    }
    assert!(al_txns(&waiting).is_empty(), "{waiting:?}");
    assert!(writes(&waiting).is_empty(), "{waiting:?}");
    // The transaction is durable: its two writes go, and ONE transaction for what the others
    // missed follows, as far as the log has room (it holds 2): extent 1 joins; extent 2
    // waits, since extent 0 is pinned by its writes in flight.
    let out = done(&mut a, t1[0].0);
    let w: Vec<(IoId, u64)> = writes(&out);
    assert_eq!(
        w.iter().map(|&(_, o)| o / BLOCK).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let t2 = al_txns(&out);
    assert_eq!(t2.len(), 1, "{out:?}");
    assert_eq!(t2[0].1, vec![0, 1]);
    let mut completed = Vec::new();
    let out = done(&mut a, t2[0].0);
    let w8 = writes(&out);
    assert_eq!(
        w8.iter().map(|&(_, o)| o / BLOCK).collect::<Vec<_>>(),
        vec![8]
    );
    assert!(
        al_txns(&out).is_empty(),
        "the log is full of extents in use: {out:?}"
    );
    // Extent 0's writes complete: it is evicted for extent 2 (never more than 2 extents).
    completed.extend(completions(&done(&mut a, w[0].0)));
    let out = done(&mut a, w[1].0);
    completed.extend(completions(&out));
    let t3 = al_txns(&out);
    assert_eq!(t3.len(), 1, "{out:?}");
    assert_eq!(t3[0].1, vec![1, 2]);
    let out = done(&mut a, t3[0].0);
    let mut issued = writes(&out);
    assert_eq!(
        issued.iter().map(|&(_, o)| o / BLOCK).collect::<Vec<_>>(),
        vec![16, 17]
    );
    assert!(al_txns(&out).is_empty(), "{out:?}");
    issued.extend(w8);
    for (io, _) in issued {
        completed.extend(completions(&done(&mut a, io)));
    }
    completed.sort_unstable();
    assert_eq!(
        completed,
        (1..=5).map(|r| (r, Ok(()))).collect::<Vec<_>>(),
        "every write completes"
    );
    // Hot path: an active, committed extent costs nothing.
    let out = write_raw(&mut a, 6, 18, 1);
    assert!(al_txns(&out).is_empty());
    assert_eq!(writes(&out).len(), 1);
}

/// The peer's side of `msgs`: every disk I/O they cause completes, and what it sends back.
fn peer_applies(b: &mut Replica, msgs: Vec<PeerMsg>) -> Vec<PeerMsg> {
    let mut back = Vec::new();
    let mut pending: Vec<Action> = deliver(b, msgs);
    while !pending.is_empty() {
        let mut next = Vec::new();
        for x in pending {
            match x {
                Action::Send(m) => back.push(m),
                Action::DiskWrite { io, .. }
                | Action::DiskFlush { io }
                | Action::DiskZero { io, .. }
                | Action::DiskTrim { io, .. } => next.extend(done(b, io)),
                // The peer's other actions do not feed back.
                Action::DiskRead { .. }
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
        pending = next;
    }
    back
}

#[test]
fn a_full_log_makes_a_write_wait_and_asks_the_peer_for_stability_instead_of_growing() {
    // No stability points of its own: writes stay unstable on the peer, pinning their extents.
    let mut ca = al_cfg(1);
    ca.stability_writes = 1 << 20;
    let mut a = Replica::new(ca, synced_meta());
    let mut b = Replica::new(al_cfg(2), synced_meta());
    promote_a_and_connect(&mut a, &mut b);
    // Extents 0 and 1 fill the log (it holds 2); the peer acks both writes.
    let mut acks = Vec::new();
    for (req, block) in [(1, 0), (2, 8)] {
        let out = write(&mut a, req, block, 1);
        acks.extend(peer_applies(&mut b, sends(&out)));
        for (io, _) in writes(&out) {
            done(&mut a, io);
        }
    }
    let out = deliver(&mut a, acks);
    assert_eq!(completions(&out).len(), 2, "{out:?}");
    assert_eq!(a.status().peer_unstable, 2);
    // Extent 2: nothing can be evicted (both wait to be stable on the peer). The write waits,
    // the log stays at 2, and a flush barrier goes to the peer at once.
    let out = write_raw(&mut a, 3, 16, 1);
    assert!(al_txns(&out).is_empty(), "the log must not grow: {out:?}");
    assert!(writes(&out).is_empty(), "{out:?}");
    let pressure = sends(&out);
    assert!(
        matches!(&pressure[..], [PeerMsg::Barrier { flush: true, .. }]),
        "{pressure:?}"
    );
    // Its ack makes both stable: the write's transaction evicts the oldest extent.
    let ack = peer_applies(&mut b, pressure);
    let out = deliver(&mut a, ack);
    assert_eq!(a.status().peer_unstable, 0);
    let t = al_txns(&out);
    assert_eq!(t.len(), 1, "{out:?}");
    assert_eq!(t[0].1, vec![1, 2]);
    let out = done(&mut a, t[0].0);
    assert_eq!(writes(&out).len(), 1, "{out:?}");
}

/// A failed activity-log transaction (its pre-flush of the data, or its metadata write) fails
/// the writes waiting for it, and the disk: its writes completed before may be lost there, and
/// Linux would let a later flush pass without them. Alone, this Primary's disk is still the
/// best copy: it keeps it, marks every block (the next resync from it is full), and stops
/// serving. The driver used to exit instead.
#[test]
fn a_failed_activity_log_transaction_fails_its_writes_and_the_disk() {
    let mut a = primary_alone(al_cfg(1), synced_meta());
    let out = write_raw(&mut a, 1, 0, 1);
    let (io, _) = al_txns(&out)[0].clone();
    let out = failed(&mut a, io);
    assert_eq!(completions(&out), vec![(1, Err(libc::EIO))]);
    assert!(writes(&out).is_empty());
    let st = a.status();
    assert_eq!(
        st.disk_failure.map(|f| f.io),
        Some(FailedIo::ActivityLog),
        "{st:?}"
    );
    assert_eq!(st.disk, DiskState::UpToDate, "still the best copy");
    assert_eq!(st.role, Role::Primary);
    assert_eq!(st.dirty_blocks, SIZE / BLOCK, "the next resync is full");
    assert!(
        out.iter().any(|x| matches!(x, Action::SaveMeta(_))),
        "{out:?}"
    );
    // No write starts on that disk again, and none asks for the log.
    let out = write_raw(&mut a, 2, 0, 1);
    assert_eq!(completions(&out), vec![(2, Err(libc::EIO))]);
    assert!(
        al_txns(&out).is_empty() && writes(&out).is_empty(),
        "{out:?}"
    );
}

/// Connected to an UpToDate peer (sync: it has every write this node acknowledged), the
/// Primary gives the failed disk up, as at a failed client FLUSH: Inconsistent, and it hangs
/// up for good.
#[test]
fn a_sync_primary_whose_activity_log_fails_gives_its_disk_up_to_its_peer() {
    let (mut a, _b) = pair_of(al_cfg(1), al_cfg(2));
    let out = write_raw(&mut a, 1, 0, 1);
    let (io, _) = al_txns(&out)[0].clone();
    let out = failed(&mut a, io);
    assert_eq!(completions(&out), vec![(1, Err(libc::EIO))]);
    assert!(
        out.iter().any(|x| matches!(
            x,
            Action::CloseConnection {
                reason: CloseReason::DiskFailed(DiskFailure {
                    io: FailedIo::ActivityLog,
                    ..
                }),
                ..
            }
        )),
        "{out:?}"
    );
    let st = a.status();
    assert_eq!(st.disk, DiskState::Inconsistent);
    assert_eq!(st.repl, ReplState::StandAlone);
    assert!(!st.want_connection);
    assert!(st
        .disk_failure
        .is_some_and(|f| f.to_string().contains("activity-log transaction")));
}

/// Simulator async seed 21680 (graceful stops): the Primary went Ahead (a new generation, the
/// peer Behind and Outdated), its resync found nothing to send and ended at once, and the cut
/// took the `ResyncDone`. At the next handshake rule 0 reads the peer at the end's generation,
/// and nothing is left to resync: the end applies there and then, on both sides. Before, the
/// peer stayed Outdated at the old generation while Established, so a failover to it needed
/// `--force`.
#[test]
fn a_handshake_with_nothing_to_resync_applies_the_end_a_cut_took() {
    let src_meta = Meta {
        current_gen: 0x20001,
        history: [0x10001, 0],
        resync_end: Some(ResyncEnd {
            gen: 0x20001,
            target_gens: [0x10001, 0x10001],
        }),
        ..synced_meta()
    };
    let tgt_meta = Meta {
        disk: DiskState::Outdated,
        ..synced_meta()
    };
    let handshake = |bug: InjectedBug| {
        let (mut ca, mut cb) = (cfg(1, Protocol::Async), cfg(2, Protocol::Async));
        ca.bug = bug;
        cb.bug = bug;
        // Restarted (a graceful stop): a bitmap it trusts, as the running nodes had.
        let restored = |meta| Restored {
            meta,
            bitmap: Vec::new(),
            activity_log: Vec::new(),
        };
        let mut a = Replica::restore(ca, restored(src_meta));
        let mut b = Replica::restore(cb, restored(tgt_meta));
        a.handle_vec(
            Event::Admin {
                tag: 3,
                cmd: AdminCmd::Promote { force: false },
            },
            0,
        );
        for (tag, r) in [(1, &mut a), (2, &mut b)] {
            r.handle_vec(
                Event::Admin {
                    tag,
                    cmd: AdminCmd::Connect,
                },
                0,
            );
        }
        let ha = sends(&a.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
        let hb = sends(&b.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
        let on_b = deliver(&mut b, ha);
        deliver(&mut a, hb);
        (a, b, on_b)
    };
    let (a, b, on_b) = handshake(InjectedBug::None);
    let (sa, sb) = (a.status(), b.status());
    assert_eq!(
        (sa.repl, sb.repl),
        (ReplState::Established, ReplState::Established)
    );
    assert_eq!(sb.disk, DiskState::UpToDate, "{sb:?}");
    assert_eq!(sb.current_gen, 0x20001);
    assert_eq!(sb.history[0], 0x10001);
    assert_eq!(
        sa.peer_disk,
        Some(DiskState::UpToDate),
        "the source derives it too"
    );
    assert!(
        on_b.iter()
            .any(|x| matches!(x, Action::SaveMeta(m) if m.current_gen == 0x20001 && m.disk == DiskState::UpToDate)),
        "{on_b:?}"
    );
    // The old behaviour, for the simulator's check.
    let (_, b, _) = handshake(InjectedBug::NoSyncIgnoresResyncEnd);
    assert_eq!(b.status().disk, DiskState::Outdated);
}

/// A node told to connect, its connection up and its hello sent: in its handshake.
fn in_handshake(c: Config, meta: Meta) -> Replica {
    let mut r = Replica::new(c, meta);
    r.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Connect,
        },
        0,
    );
    r.handle_vec(Event::ConnectionUp { conn: 1 }, 0);
    r
}

/// `connect --discard-my-data` while a handshake is under way comes too late for it: the hello
/// went out without the flag, and the decision clears it. Refused, with what to do; accepted
/// (the old behaviour), a shared split-brain policy silently discarded the peer's data instead
/// (simulator seed 3584).
#[test]
fn discard_my_data_during_a_handshake_is_refused() {
    let mut b = in_handshake(cfg(2, Protocol::Sync), synced_meta());
    let out = b.handle_vec(
        Event::Admin {
            tag: 2,
            cmd: AdminCmd::DiscardMyData,
        },
        0,
    );
    let refused = out.iter().find_map(|x| match x {
        Action::AdminDone { tag: 2, result } => Some(result.clone()),
        _ => None,
    });
    let Some(Err(e)) = refused else {
        panic!("accepted during the handshake: {out:?}");
    };
    assert_eq!(e.code(), AdminErrorCode::DiscardDuringHandshake);
    assert!(e.to_string().contains("twinblk disconnect"), "{e}");
    assert!(!b.status().discard_my_data);
    // StandAlone again, it is taken for the next handshake.
    b.handle_vec(
        Event::Admin {
            tag: 3,
            cmd: AdminCmd::Disconnect,
        },
        0,
    );
    b.handle_vec(
        Event::Admin {
            tag: 4,
            cmd: AdminCmd::DiscardMyData,
        },
        0,
    );
    assert!(b.status().discard_my_data);
}

fn no_al_cfg(node: u64) -> Config {
    let mut c = al_cfg(node);
    c.al_updates = false;
    c
}

#[test]
fn al_updates_off_never_writes_the_log_and_says_so_in_the_metadata() {
    let mut a = Replica::new(no_al_cfg(1), synced_meta());
    let out = a.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    let metas: Vec<Meta> = out
        .iter()
        .filter_map(|x| match x {
            Action::SaveMeta(m) => Some(*m),
            _ => None,
        })
        .collect();
    assert!(
        metas.last().is_some_and(|m| m.primary && m.no_activity_log),
        "{metas:?}"
    );
    for (req, block) in [(1, 0), (2, 8), (3, 16), (4, 24), (5, 32)] {
        let out = write_raw(&mut a, req, block, 1);
        assert!(al_txns(&out).is_empty(), "{out:?}");
        assert_eq!(writes(&out).len(), 1, "issued at once");
    }
    // Demoted, it no longer claims to run without a log (a crash is then not a Primary's).
    let mut b = Replica::new(no_al_cfg(1), synced_meta());
    b.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    let out = b.handle_vec(
        Event::Admin {
            tag: 2,
            cmd: AdminCmd::Demote,
        },
        0,
    );
    assert!(out
        .iter()
        .any(|x| matches!(x, Action::SaveMeta(m) if !m.primary && !m.no_activity_log)));
}

#[test]
fn a_primary_that_crashed_without_a_log_restarts_with_the_whole_device_dirty() {
    let mut meta = synced_meta();
    meta.primary = true;
    meta.no_activity_log = true;
    let restored = Restored {
        meta,
        bitmap: Vec::new(),
        activity_log: vec![1],
    };
    // Whatever this start's setting: the metadata says how the crashed run wrote.
    for mk in [al_cfg, no_al_cfg] {
        let r = Replica::restore(mk(1), restored.clone());
        assert_eq!(r.bitmap().count(), SIZE / BLOCK, "every block dirty");
        assert!(r.my_hello().bitmap_known, "a bitmap resync of everything");
    }
    // A Secondary's flag means nothing (it was not writing).
    let mut m2 = meta;
    m2.primary = false;
    let r = Replica::restore(
        al_cfg(1),
        Restored {
            meta: m2,
            ..restored.clone()
        },
    );
    assert!(r.bitmap().is_clean());
    // Promoted again with the log on: the whole-device bits live only in memory, so they are
    // persisted before the metadata stops saying "everything is dirty after a crash".
    let mut r = Replica::restore(al_cfg(1), restored);
    let out = r.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    let bm_at = out
        .iter()
        .position(|x| matches!(x, Action::SaveBitmap { .. }));
    let meta_at = out
        .iter()
        .position(|x| matches!(x, Action::SaveMeta(m) if m.primary && !m.no_activity_log));
    assert!(
        bm_at.is_some() && meta_at.is_some() && bm_at < meta_at,
        "{out:?}"
    );
}

#[test]
fn restore_after_primary_crash_adds_the_activity_log() {
    let mut meta = synced_meta();
    meta.primary = true;
    let mut bm = Bitmap::new(SIZE, BLOCK);
    bm.set_bytes(40 * BLOCK, BLOCK);
    let r = Replica::restore(
        al_cfg(1),
        Restored {
            meta,
            bitmap: bm.words().to_vec(),
            activity_log: vec![1],
        },
    );
    // Block 40 from the persisted bitmap, blocks 8..16 from extent 1.
    assert_eq!(r.bitmap().count(), 9);
    assert!(r.bitmap().get(40) && r.bitmap().get(8) && r.bitmap().get(15));
    assert!(r.my_hello().bitmap_known);
    // A clean Secondary restart: the log does not count.
    let r = Replica::restore(
        al_cfg(1),
        Restored {
            meta: synced_meta(),
            bitmap: Vec::new(),
            activity_log: vec![1],
        },
    );
    assert!(r.bitmap().is_clean());
}

/// A tiny instant-disk, instant-network harness for whole scenarios: two replicas with
/// in-memory disks and persisted metadata, actions executed in order.
struct Duo {
    r: [Option<Replica>; 2],
    disk: [Vec<u8>; 2],
    saved: [Restored; 2],
    conn: Option<u64>,
    next_conn: u64,
    /// Resync bytes sent, with or without payload.
    resynced_bytes: [u64; 2],
    /// Resync zero-run messages sent.
    resync_zero_msgs: [u64; 2],
    /// Bytes zeroed or trimmed on each disk.
    zeroed_bytes: [u64; 2],
    next_req: u64,
    net: std::collections::VecDeque<(usize, u64, PeerMsg)>,
    mk: fn(u64) -> Config,
    /// Client completions of node 0 (the Primary in these tests).
    completed: Vec<(ReqId, Result<(), i32>)>,
    /// Every `AdminDone`: (node, tag, result).
    admin_done: Vec<(usize, u64, Result<(), AdminError>)>,
    /// Disks with a volatile cache: what each write since the last flush overwrote, so that
    /// [`Duo::crash`] loses it. Off unless a test turns it on.
    volatile: bool,
    undo: [Vec<(usize, Vec<u8>)>; 2],
    /// Each node's [`Action::Stopped`], once its graceful stop ended.
    stopped: [Option<StopOutcome>; 2],
    /// Each node's [`Action::FencePeer`] requests: (episode, attempt).
    fence_requests: [Vec<(u64, u32)>; 2],
    /// Activity-log transactions are left in flight (their ids kept here) instead of
    /// completing at once. Off unless a test turns it on.
    hold_al: bool,
    held_al: Vec<(usize, IoId)>,
}

impl Duo {
    fn new() -> Duo {
        Duo::with(al_cfg)
    }

    fn with(mk_cfg: fn(u64) -> Config) -> Duo {
        let mk = |n| Replica::new(mk_cfg(n), synced_meta());
        let saved = Restored {
            meta: synced_meta(),
            bitmap: Vec::new(),
            activity_log: Vec::new(),
        };
        Duo {
            r: [Some(mk(1)), Some(mk(2))],
            disk: [vec![0; SIZE as usize], vec![0; SIZE as usize]],
            saved: [saved.clone(), saved],
            conn: None,
            next_conn: 1,
            resynced_bytes: [0; 2],
            resync_zero_msgs: [0; 2],
            zeroed_bytes: [0; 2],
            next_req: 100,
            net: Default::default(),
            mk: mk_cfg,
            completed: Vec::new(),
            admin_done: Vec::new(),
            volatile: false,
            undo: Default::default(),
            stopped: Default::default(),
            fence_requests: Default::default(),
            hold_al: false,
            held_al: Vec::new(),
        }
    }

    /// Remembers what `[o, o + len)` held on node `n`'s disk before a write there.
    fn overwriting(&mut self, n: usize, o: usize, len: usize) {
        if self.volatile {
            self.undo[n].push((o, self.disk[n][o..o + len].to_vec()));
        }
    }

    fn feed(&mut self, n: usize, ev: Event) {
        let mut queue = std::collections::VecDeque::from([(n, ev)]);
        while let Some((n, ev)) = queue.pop_front() {
            let Some(r) = self.r[n].as_mut() else {
                continue;
            };
            let out = r.handle_vec(ev, 0);
            for a in out {
                match a {
                    Action::DiskWrite {
                        io, offset, data, ..
                    } => {
                        let o = offset as usize;
                        self.overwriting(n, o, data.len());
                        self.disk[n][o..o + data.len()].copy_from_slice(&data);
                        queue.push_back((
                            n,
                            Event::DiskDone {
                                io,
                                result: Ok(None),
                            },
                        ));
                    }
                    Action::DiskTrim { io, offset, len } | Action::DiskZero { io, offset, len } => {
                        let o = offset as usize;
                        self.overwriting(n, o, len as usize);
                        self.disk[n][o..o + len as usize].fill(0);
                        self.zeroed_bytes[n] += len as u64;
                        queue.push_back((
                            n,
                            Event::DiskDone {
                                io,
                                result: Ok(None),
                            },
                        ));
                    }
                    Action::DiskFlush { io } => {
                        // Every write so far completed: the flush makes them all stable.
                        self.undo[n].clear();
                        queue.push_back((
                            n,
                            Event::DiskDone {
                                io,
                                result: Ok(None),
                            },
                        ));
                    }
                    Action::SyncData => self.undo[n].clear(),
                    Action::DiskRead { io, offset, len } => {
                        let o = offset as usize;
                        let d = Bytes::copy_from_slice(&self.disk[n][o..o + len as usize]);
                        queue.push_back((
                            n,
                            Event::DiskDone {
                                io,
                                result: Ok(Some(d)),
                            },
                        ));
                    }
                    Action::Send(m) => {
                        // Only resync payloads are counted.
                        if let Some(bytes) = m.resync_payload_bytes() {
                            self.resynced_bytes[n] += bytes;
                            if matches!(m, PeerMsg::ResyncZero { .. }) {
                                self.resync_zero_msgs[n] += 1;
                            }
                        }
                        if let Some(conn) = self.conn {
                            let bytes = crate::wire::encode(&m).expect("encode");
                            let (m, _) =
                                crate::wire::decode(&bytes).expect("decode").expect("frame");
                            self.net.push_back((1 - n, conn, m));
                        }
                    }
                    Action::SaveMeta(m) => self.saved[n].meta = m,
                    Action::SaveBitmap { first_word, words } => {
                        let bm = &mut self.saved[n].bitmap;
                        let end = first_word as usize + words.len();
                        if bm.len() < end {
                            bm.resize(end, 0);
                        }
                        bm[first_word as usize..end].copy_from_slice(&words);
                    }
                    Action::SaveActivityLog { io, .. } if self.hold_al => {
                        self.held_al.push((n, io))
                    }
                    Action::SaveActivityLog { io, extents } => {
                        self.saved[n].activity_log = extents;
                        queue.push_back((
                            n,
                            Event::DiskDone {
                                io,
                                result: Ok(None),
                            },
                        ));
                    }
                    Action::CompleteClient { req, result } if n == 0 => {
                        self.completed.push((req, result))
                    }
                    Action::AdminDone { tag, result } => self.admin_done.push((n, tag, result)),
                    Action::CloseConnection { conn, reason } if self.conn == Some(conn) => {
                        self.conn = None;
                        // The peer hears the reason as the close's text.
                        let reason = LinkLoss::PeerClosed {
                            code: 0,
                            reason: reason.to_string(),
                        };
                        queue.push_back((1 - n, Event::ConnectionDown { conn, reason }));
                    }
                    Action::Stopped(o) => self.stopped[n] = Some(o),
                    Action::FencePeer { episode, attempt } => {
                        self.fence_requests[n].push((episode, attempt))
                    }
                    // Client reads, timers and state changes are not modelled; a close for a
                    // stale connection and completions on the Secondary are dropped.
                    Action::ServeRead { .. }
                    | Action::CompleteClient { .. }
                    | Action::ArmTimer { .. }
                    | Action::Emit(_)
                    | Action::CloseConnection { .. } => {}
                }
            }
        }
    }

    /// Delivers the next `k` network messages (fewer if the network runs dry).
    fn deliver_some(&mut self, k: usize) {
        for _ in 0..k {
            let Some((to, conn, msg)) = self.net.pop_front() else {
                return;
            };
            if self.conn == Some(conn) {
                self.feed(to, Event::Peer { conn, msg });
            }
        }
    }

    /// A client write whose replication stays on the network until [`Duo::settle`].
    fn write_unsettled(&mut self, n: usize, block: u64, byte: u8) {
        let req = self.next_req;
        self.next_req += 1;
        let data = Bytes::from(vec![byte; BLOCK as usize]);
        self.feed(
            n,
            Event::ClientWrite {
                req,
                offset: block * BLOCK,
                data,
                fua: false,
            },
        );
    }

    /// Connects without delivering anything yet.
    fn connect_unsettled(&mut self) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conn = Some(conn);
        for n in [0, 1] {
            self.feed(
                n,
                Event::Admin {
                    tag: 1,
                    cmd: AdminCmd::Connect,
                },
            );
        }
        self.feed(0, Event::ConnectionUp { conn });
        self.feed(1, Event::ConnectionUp { conn });
    }

    /// Delivers network messages until none are left.
    fn settle(&mut self) {
        while let Some((to, conn, msg)) = self.net.pop_front() {
            if self.conn == Some(conn) {
                self.feed(to, Event::Peer { conn, msg });
            }
        }
    }

    fn admin(&mut self, n: usize, cmd: AdminCmd) {
        self.feed(n, Event::Admin { tag: 9, cmd });
        self.settle();
    }

    fn connect(&mut self) {
        self.connect_unsettled();
        self.settle();
    }

    fn cut(&mut self) {
        if let Some(conn) = self.conn.take() {
            for n in [0, 1] {
                self.feed(
                    n,
                    Event::ConnectionDown {
                        conn,
                        reason: LinkLoss::TimedOut,
                    },
                );
            }
        }
    }

    fn write(&mut self, n: usize, block: u64, byte: u8) {
        let req = self.next_req;
        self.next_req += 1;
        let data = Bytes::from(vec![byte; BLOCK as usize]);
        self.feed(
            n,
            Event::ClientWrite {
                req,
                offset: block * BLOCK,
                data,
                fua: false,
            },
        );
        self.settle();
    }

    fn crash(&mut self, n: usize) {
        self.cut();
        self.r[n] = None;
        // The volatile cache is lost: newest write first, so the oldest contents come back.
        while let Some((o, old)) = self.undo[n].pop() {
            self.disk[n][o..o + old.len()].copy_from_slice(&old);
        }
    }

    fn restart(&mut self, n: usize) {
        self.r[n] = Some(Replica::restore(
            (self.mk)(n as u64 + 1),
            self.saved[n].clone(),
        ));
    }

    fn st(&self, n: usize) -> Status {
        self.r[n].as_ref().expect("alive").status()
    }
}

#[test]
fn failover_resyncs_only_the_promoted_nodes_changes_and_the_crashed_primarys_log() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    assert_eq!(d.st(0).repl, ReplState::Established);
    // Replicated writes in extents 0 and 1; a last one in extent 2 (the device has 8).
    for b in 0..12 {
        d.write(0, b, 1);
    }
    d.write(0, 20, 2);
    assert!(d.disk[0] == d.disk[1], "replicated");
    // A dies; its disk keeps a write B never saw (the last moments before the crash).
    d.crash(0);
    d.disk[0][(20 * BLOCK) as usize] = 0xee;
    // B is promoted and written (new generation): blocks 40 and 41.
    d.admin(1, AdminCmd::Promote { force: false });
    assert_eq!(d.st(1).role, Role::Primary);
    d.write(1, 40, 3);
    d.write(1, 41, 3);
    // A restarts as a crashed Primary: persisted bitmap + activity log (2 extents of 8 blocks).
    assert!(d.saved[0].meta.primary);
    d.restart(0);
    assert_eq!(
        d.st(0).dirty_blocks,
        16,
        "A's log: its two most recent extents"
    );
    d.connect();
    assert_eq!(d.st(0).repl, ReplState::Established);
    assert_eq!(d.st(0).disk, DiskState::UpToDate);
    assert!(d.disk[0] == d.disk[1], "byte-identical after the resync");
    // Only B's 2 blocks since promotion and A's 16 log blocks moved, not the device (64).
    assert_eq!(d.resynced_bytes[1], 18 * BLOCK);
    assert_eq!(d.st(0).current_gen, d.st(1).current_gen);
}

#[test]
fn split_brain_is_reported_on_both_nodes_and_resolved_by_discard_my_data() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 1, 1);
    // Partition; both become Primary and write.
    d.cut();
    d.admin(1, AdminCmd::Promote { force: false });
    d.write(0, 2, 2);
    d.write(0, 3, 2);
    d.write(1, 30, 3);
    // Both demoted (the operator noticed), then they meet again.
    d.admin(0, AdminCmd::Demote);
    d.admin(1, AdminCmd::Demote);
    d.connect();
    for n in [0, 1] {
        let st = d.st(n);
        assert_eq!(st.repl, ReplState::StandAlone, "node {n}");
        assert!(!st.want_connection, "node {n}: no reconnect loop");
        let sb = st.split_brain.expect("split brain reported on both nodes");
        assert_eq!(sb.common_gen, Some(0x10001));
        assert_ne!(sb.current_gen, sb.peer_current_gen);
    }
    let sb = d.st(0).split_brain.expect("report");
    // A: its 2 writes (block 1 was made stable on B by the stability point after it).
    assert_eq!((sb.changed_blocks, sb.peer_changed_blocks), (2, 1));
    assert!(sb.keep_mine[0].contains("twinblk connect r0 --discard-my-data"));
    // A plain reconnect does not resolve it.
    d.connect();
    assert!(d.st(0).split_brain.is_some() && d.st(1).split_brain.is_some());
    assert!(d.disk[0] != d.disk[1]);
    // B's changes go.
    d.admin(1, AdminCmd::DiscardMyData);
    d.connect();
    for n in [0, 1] {
        let st = d.st(n);
        assert_eq!(st.repl, ReplState::Established, "node {n}");
        assert_eq!(st.disk, DiskState::UpToDate);
        assert!(st.split_brain.is_none());
    }
    assert!(d.disk[0] == d.disk[1], "identical after the resync");
    assert_eq!(d.disk[1][(2 * BLOCK) as usize], 2, "A's data kept");
    // Bitmap-based: A's 2 blocks and B's 1, not the device.
    assert_eq!(d.resynced_bytes[0], 3 * BLOCK);
}

#[test]
fn demoted_primary_that_crashes_keeps_its_unreplicated_writes_in_the_bitmap() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.cut();
    // A writes alone (the bits live in memory, their extent in the activity log), is demoted,
    // then crashes before anything else persists its bitmap.
    d.write(0, 5, 7);
    d.admin(0, AdminCmd::Demote);
    d.crash(0);
    d.restart(0);
    assert!(
        d.st(0).dirty_blocks >= 1,
        "block 5 was written while disconnected: it must stay dirty"
    );
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    assert_eq!(d.st(1).repl, ReplState::Established);
    assert!(d.disk[0] == d.disk[1], "B got block 5 from the resync");
}

#[test]
fn a_forced_promotion_during_the_handshake_waits_for_it_and_goes_on_alone_when_it_ends() {
    let mut r = in_handshake(cfg(2, Protocol::Sync), Meta::new_device());
    // The first `primary --force` of a new pair, while the nodes are in their handshake
    // (neither has good data, so it will be refused): it waits for the outcome.
    let out = r.handle_vec(
        Event::Admin {
            tag: 2,
            cmd: AdminCmd::Promote { force: true },
        },
        0,
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::AdminDone { .. })),
        "answered before the handshake's outcome: {out:?}"
    );
    assert_eq!(r.status().role, Role::Secondary);
    // The handshake ends without a decision: the promotion goes on as without a connection.
    let out = r.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::AdminDone {
                tag: 2,
                result: Ok(())
            }
        )),
        "{out:?}"
    );
    assert_eq!(r.status().role, Role::Primary);
    assert!(r.status().want_connection);
}

fn al_cfg_promoting_during_handshakes(node: u64) -> Config {
    let mut c = al_cfg(node);
    c.bug = InjectedBug::PromoteDuringHandshake;
    c
}

/// The switchover that lost acknowledged writes on real daemons (`tests/switchover.rs` once a
/// stalled Secondary timed out): the Primary lost its peer, wrote on alone (acknowledged), was
/// demoted; the peer reconnected, and the operator's `primary` reached it during that
/// handshake. Promoted at once, it served data without those writes; waiting for the
/// handshake, it learns it is the sync target and is refused.
#[test]
fn a_promotion_during_the_handshake_waits_and_a_node_that_lacks_writes_is_refused() {
    for bug in [false, true] {
        let mut d = if bug {
            Duo::with(al_cfg_promoting_during_handshakes)
        } else {
            Duo::new()
        };
        d.admin(0, AdminCmd::Promote { force: false });
        d.connect();
        d.write(0, 1, 0xaa);
        d.cut();
        d.write(0, 2, 0xbb);
        assert_eq!(
            d.completed.last().map(|c| c.1),
            Some(Ok(())),
            "acknowledged"
        );
        d.admin(0, AdminCmd::Demote);
        assert_eq!(d.st(0).role, Role::Secondary);
        d.connect_unsettled();
        d.feed(
            1,
            Event::Admin {
                tag: 77,
                cmd: AdminCmd::Promote { force: false },
            },
        );
        let answer = |d: &Duo| {
            d.admin_done
                .iter()
                .find(|(n, tag, _)| *n == 1 && *tag == 77)
                .map(|(_, _, r)| r.clone())
        };
        if bug {
            // The old behaviour: Primary at once, without block 2.
            assert_eq!(d.st(1).role, Role::Primary);
            assert_eq!(answer(&d), Some(Ok(())));
            continue;
        }
        assert_eq!(d.st(1).role, Role::Secondary, "promoted before the hello");
        assert_eq!(answer(&d), None, "answered before the handshake decided");
        d.settle();
        assert!(
            matches!(answer(&d), Some(Err(AdminError::ResyncTarget))),
            "{:?}",
            answer(&d)
        );
        assert_eq!(d.st(1).role, Role::Secondary);
        assert_eq!(d.st(0).repl, ReplState::Established, "the resync ran");
        assert!(d.disk[0] == d.disk[1], "B got block 2");
        // Now it may be promoted, with every acknowledged write.
        d.admin(1, AdminCmd::Promote { force: false });
        assert_eq!(d.st(1).role, Role::Primary);
    }
}

/// A promotion that waited for a handshake which then decided for it goes on by the connected
/// rules: it asks the peer, which agrees.
#[test]
fn a_promotion_during_the_handshake_of_an_up_to_date_node_asks_the_peer_after_it() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 1, 0xaa);
    d.admin(0, AdminCmd::Demote);
    d.cut();
    d.connect_unsettled();
    d.feed(
        1,
        Event::Admin {
            tag: 78,
            cmd: AdminCmd::Promote { force: false },
        },
    );
    assert_eq!(d.st(1).role, Role::Secondary);
    d.settle();
    assert!(
        d.admin_done
            .iter()
            .any(|(n, tag, r)| *n == 1 && *tag == 78 && r.is_ok()),
        "{:?}",
        d.admin_done
    );
    assert_eq!(d.st(1).role, Role::Primary);
    assert_eq!(
        d.st(0).peer_role,
        Some(Role::Primary),
        "the peer heard of it"
    );
    assert_eq!(d.st(1).repl, ReplState::Established);
}

#[test]
fn promotion_disarms_discard_my_data() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.cut();
    d.admin(1, AdminCmd::Promote { force: false });
    d.write(0, 2, 2);
    d.write(1, 30, 3);
    d.admin(1, AdminCmd::Demote);
    d.connect();
    assert!(d.st(1).split_brain.is_some());
    // The operator arms B as the loser, but A dies before they meet; B is promoted after all
    // (its disk is UpToDate) and takes new writes.
    d.admin(1, AdminCmd::DiscardMyData);
    assert!(d.st(1).discard_my_data);
    d.admin(0, AdminCmd::Demote);
    d.admin(1, AdminCmd::Promote { force: false });
    assert_eq!(d.st(1).role, Role::Primary);
    assert!(!d.st(1).discard_my_data, "promotion disarms it");
    d.write(1, 31, 4);
    // A returns: still a split brain for the operator, not a demand to throw B's data away.
    d.connect();
    let st = d.st(1);
    assert!(st.split_brain.is_some(), "{st:?}");
    assert_eq!(st.role, Role::Primary);
    assert!(d.disk[1][(31 * BLOCK) as usize] == 4);
}

#[test]
fn invalidate_makes_this_node_a_full_sync_target() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 3, 7);
    d.disk[1][5] = 0x55; // silent corruption on B, which no bitmap knows about
    d.admin(0, AdminCmd::Invalidate);
    assert_eq!(d.st(0).disk, DiskState::UpToDate, "refused on the Primary");
    d.admin(1, AdminCmd::Invalidate);
    assert_eq!(d.st(1).disk, DiskState::Inconsistent);
    d.connect();
    assert_eq!(d.st(1).disk, DiskState::UpToDate);
    assert_eq!(d.st(1).repl, ReplState::Established);
    assert_eq!(d.resynced_bytes[0], SIZE, "every block");
    assert!(d.disk[0] == d.disk[1]);
}

/// A node that freezes on losing its UpToDate peer (`on-peer-lost`), with an activity log.
fn fencing_cfg(node: u64) -> Config {
    let mut c = al_cfg(node);
    c.fencing = Fencing::FreezeUntilFenced;
    c
}

/// The transport reports the loss of the current connection to node `n` only (the other is
/// dead or stopped).
fn lose(d: &mut Duo, n: usize) {
    d.net.clear();
    if let Some(conn) = d.conn.take() {
        d.feed(
            n,
            Event::ConnectionDown {
                conn,
                reason: LinkLoss::TimedOut,
            },
        );
    }
}

mod adjust;
mod pull_ahead;
mod stop;
mod switchover;
mod verify;
// ---- resync pace, pull-ahead, zero runs, resume ----

/// `al_cfg` with resync chunks of 4 blocks, one chunk in flight, and no back-off (the Duo has
/// no clock, so a rate limit would wait for a timer it never fires).
fn small_chunks(node: u64) -> Config {
    let mut c = al_cfg(node);
    c.resync_chunk = 4 * BLOCK;
    c.resync_rate.fill_target = 4 * BLOCK;
    c.resync_rate.min_rate = 0;
    c
}

fn ahead_cfg(node: u64) -> Config {
    let mut c = small_chunks(node);
    c.protocol = Protocol::Async;
    c.send_buffer = 8 * BLOCK;
    c.congestion = congestion::Congestion {
        on_congestion: congestion::OnCongestion::PullAhead,
        fill: 2 * BLOCK,
    };
    c
}

fn shipped_blocks(d: &Duo) -> Vec<u64> {
    d.net
        .iter()
        .filter_map(|(_, _, m)| match m {
            PeerMsg::Data(e) => Some(e.offset / BLOCK),
            _ => None,
        })
        .collect()
}

#[test]
fn congested_async_primary_pulls_ahead_then_resyncs_when_the_link_drains() {
    let mut d = Duo::with(ahead_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 1, 1);
    assert_eq!(d.st(0).repl, ReplState::Established);
    let gen0 = d.st(0).current_gen;
    d.completed.clear();
    // The link stalls (nothing is delivered): two writes fill the buffer up to congestion-fill.
    d.write_unsettled(0, 2, 2);
    d.write_unsettled(0, 3, 3);
    assert_eq!(d.st(0).repl, ReplState::Established);
    // The next write would pass the mark: Ahead. Writes are marked, not shipped.
    d.write_unsettled(0, 4, 4);
    d.write_unsettled(0, 5, 5);
    d.write_unsettled(0, 4, 6);
    let st = d.st(0);
    assert_eq!(st.repl, ReplState::Ahead);
    assert_eq!(st.dirty_blocks, 2, "blocks 4 and 5 are marked");
    assert_eq!(shipped_blocks(&d), vec![2, 3], "nothing shipped once Ahead");
    // A new generation: the marks are relative to the one the peer has.
    assert_ne!(st.current_gen, gen0);
    assert_eq!(st.bitmap_gen, Some(gen0));
    // The application never waited for the link.
    assert_eq!(d.completed.len(), 5);
    assert!(d.completed.iter().all(|(_, r)| r.is_ok()));
    // B gets what was shipped, then learns it is Behind: Outdated.
    let mut guard = 0;
    while d.st(1).repl != ReplState::Behind {
        d.deliver_some(1);
        guard += 1;
        assert!(guard < 20, "B never went Behind");
    }
    assert_eq!(d.st(1).disk, DiskState::Outdated);
    assert_eq!(d.saved[1].meta.disk, DiskState::Outdated, "persisted");
    assert_eq!(d.disk[1][(3 * BLOCK) as usize], 3, "shipped writes arrived");
    assert_eq!(d.disk[1][(4 * BLOCK) as usize], 0);
    // The acks drain A's buffer: a bitmap resync on the live connection, then Established.
    d.settle();
    for n in [0, 1] {
        let st = d.st(n);
        assert_eq!(st.repl, ReplState::Established, "node {n}");
        assert_eq!(st.disk, DiskState::UpToDate, "node {n}");
        assert_eq!(st.dirty_blocks, 0, "node {n}");
    }
    assert_eq!(d.st(0).peer_disk, Some(DiskState::UpToDate));
    assert!(d.disk[0] == d.disk[1], "identical after the resync");
    assert_eq!(
        d.disk[1][(4 * BLOCK) as usize],
        6,
        "the last write to block 4"
    );
    assert_eq!(
        d.resynced_bytes[0],
        2 * BLOCK,
        "only the marked blocks moved"
    );
    assert_eq!(d.st(0).current_gen, d.st(1).current_gen);
    // Replicating again: the next write is shipped.
    d.write_unsettled(0, 9, 9);
    assert_eq!(shipped_blocks(&d), vec![9]);
    d.settle();
    assert!(d.disk[0] == d.disk[1]);
}

#[test]
fn block_is_still_the_default_on_congestion() {
    let mut d = Duo::with(|n| {
        let mut c = ahead_cfg(n);
        c.congestion = congestion::Congestion::default();
        c.send_buffer = 2 * BLOCK;
        c
    });
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.completed.clear();
    for b in 0..4 {
        d.write_unsettled(0, b, 1);
    }
    assert_eq!(d.st(0).repl, ReplState::Established);
    assert_eq!(shipped_blocks(&d), vec![0, 1], "the rest waits for room");
    assert_eq!(d.completed.len(), 2);
    d.settle();
    assert_eq!(d.completed.len(), 4);
    assert!(d.disk[0] == d.disk[1]);
}

#[test]
fn disconnect_while_ahead_resyncs_the_marked_blocks_at_the_next_connect() {
    let mut d = Duo::with(ahead_cfg);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    for (b, byte) in [(2, 2), (3, 3), (4, 4), (6, 6)] {
        d.write_unsettled(0, b, byte);
    }
    assert_eq!(d.st(0).repl, ReplState::Ahead);
    // Half of it reaches B (Behind), then the link dies.
    while d.st(1).repl != ReplState::Behind {
        d.deliver_some(1);
    }
    d.cut();
    d.net.clear();
    d.connect();
    for n in [0, 1] {
        assert_eq!(d.st(n).repl, ReplState::Established, "node {n}");
        assert_eq!(d.st(n).disk, DiskState::UpToDate, "node {n}");
    }
    assert!(d.disk[0] == d.disk[1]);
    assert!(
        d.resynced_bytes[0] <= 4 * BLOCK,
        "a bitmap resync, not a full one"
    );
}

#[test]
fn zero_runs_travel_without_payload_and_become_write_zeroes() {
    let mut d = Duo::with(small_chunks);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.write(0, 3, 7); // the only data; the rest of the device is zeroes
                      // Garbage on B that no bitmap knows about; invalidate forces a full resync.
    d.disk[1][(10 * BLOCK) as usize] = 0x55;
    d.disk[1][(40 * BLOCK + 9) as usize] = 0x66;
    d.admin(1, AdminCmd::Invalidate);
    d.connect();
    assert_eq!(d.st(1).disk, DiskState::UpToDate);
    assert_eq!(d.st(1).repl, ReplState::Established);
    assert!(
        d.disk[0] == d.disk[1],
        "the zero runs overwrote the garbage"
    );
    assert_eq!(d.resynced_bytes[0], SIZE, "a full resync");
    // 16 chunks of 4 blocks: only the one holding block 3 carried a payload.
    assert_eq!(d.resync_zero_msgs[0], 15);
    assert_eq!(
        d.zeroed_bytes[1],
        15 * 4 * BLOCK,
        "executed as WRITE_ZEROES"
    );
}

/// Node 0 Primary writes 32 blocks while disconnected; the resync to node 1 runs until about
/// half is acked, then the link dies (nothing left in the network). Resync data is made
/// stable on the target every 8 blocks, so some acked blocks are stable and some are not.
fn resync_cut_halfway() -> Duo {
    resync_cut_halfway_on(false)
}

/// The same, on disks with a volatile cache (`volatile`: a crash loses unflushed writes).
fn resync_cut_halfway_on(volatile: bool) -> Duo {
    let mut d = Duo::with(|n| {
        let mut c = small_chunks(n);
        c.stability_bytes = 8 * BLOCK;
        c
    });
    d.volatile = volatile;
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.cut();
    for b in 0..32 {
        d.write(0, b, 9);
    }
    assert_eq!(d.st(0).dirty_blocks, 32);
    d.connect_unsettled();
    let mut guard = 0;
    while d.st(0).resync.is_none_or(|(left, _)| left > 16) {
        d.deliver_some(1);
        guard += 1;
        assert!(guard < 1000, "resync made no progress");
    }
    assert_eq!(d.st(0).repl, ReplState::SyncSource);
    d.cut();
    d.net.clear();
    d
}

/// Issue #4: a resync target that crashes mid-resync loses the resync writes it acked since
/// its last flush, and still resumes: a bit goes only once its block is stable on the target,
/// so the source's bitmap names what was lost, and the restarted target trusts its bitmap.
#[test]
fn a_resync_target_that_crashed_resumes_and_gets_back_what_the_crash_lost() {
    let mut d = resync_cut_halfway_on(true);
    let left = d.st(0).dirty_blocks;
    let first_run = d.resynced_bytes[0];
    assert!(
        !d.undo[1].is_empty(),
        "some resync writes are not stable yet"
    );
    assert!(left < 32, "some resync writes were made stable");
    d.crash(1);
    d.restart(1);
    assert_eq!(d.st(1).disk, DiskState::Inconsistent);
    assert!(d.saved[1].meta.resync_resumable);
    assert!(
        d.st(1).bitmap_known,
        "the restarted target trusts its bitmap"
    );
    d.connect();
    for n in [0, 1] {
        assert_eq!(d.st(n).repl, ReplState::Established, "node {n}");
        assert_eq!(d.st(n).disk, DiskState::UpToDate, "node {n}");
    }
    assert!(
        d.disk[0] == d.disk[1],
        "the blocks the crash lost were resynced"
    );
    assert_eq!(
        d.resynced_bytes[0] - first_run,
        left * BLOCK,
        "a partial resync of what was not stable, not a full one"
    );
}

#[test]
fn interrupted_resync_resumes_without_resending_stable_blocks() {
    let mut d = resync_cut_halfway();
    let left = d.st(0).dirty_blocks;
    let first_run = d.resynced_bytes[0];
    // Not yet sent (16 or fewer) plus acked and not yet stable (fewer than 8 + a chunk).
    assert!(left > 0 && left < 16 + 8 + 4, "{left}");
    // B, the target, cleared its own bits for what it wrote; its data is still Inconsistent.
    assert_eq!(d.st(1).disk, DiskState::Inconsistent);
    d.connect();
    for n in [0, 1] {
        assert_eq!(d.st(n).repl, ReplState::Established, "node {n}");
        assert_eq!(d.st(n).disk, DiskState::UpToDate, "node {n}");
    }
    assert!(d.disk[0] == d.disk[1]);
    // The second run moved exactly what was left (stable blocks are not resent); the first
    // sent the stable blocks plus the unstable ones (up to 8 here) and the chunk in flight at
    // the cut, which both runs send.
    assert_eq!(d.resynced_bytes[0] - first_run, left * BLOCK);
    assert!(
        first_run <= (32 - left + 8 + 4) * BLOCK,
        "{first_run} {left}"
    );
}

/// A rate-limited resync arms a timer instead of sending, and continues when it fires.
#[test]
fn rate_limited_resync_waits_for_its_timer() {
    let mut c = small_chunks(1);
    c.resync_rate.max_rate = 4 * BLOCK * 1000; // one chunk per millisecond
    c.resync_rate.plan_ahead = 1_000_000;
    let mut a = Replica::new(c, synced_meta());
    a.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    // Dirty while alone.
    for b in 0..8 {
        let out = write(&mut a, 10 + b, b, 1);
        for (io, _) in writes(&out) {
            done(&mut a, io);
        }
    }
    let mut b = Replica::new(small_chunks(2), synced_meta());
    for r in [&mut a, &mut b] {
        r.handle_vec(
            Event::Admin {
                tag: 2,
                cmd: AdminCmd::Connect,
            },
            0,
        );
    }
    let ha = sends(&a.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
    let hb = sends(&b.handle_vec(Event::ConnectionUp { conn: 1 }, 0));
    let to_a = sends(&deliver(&mut b, ha));
    let out = deliver(&mut a, hb);
    let out2 = deliver(&mut a, to_a);
    let all: Vec<Action> = out.into_iter().chain(out2).collect();
    assert_eq!(a.status().repl, ReplState::SyncSource);
    let reads = all
        .iter()
        .filter(|x| matches!(x, Action::DiskRead { .. }))
        .count();
    let timer = all.iter().find_map(|x| match x {
        Action::ArmTimer {
            kind: TimerKind::Resync,
            at,
        } => Some(*at),
        _ => None,
    });
    assert_eq!(reads, 0, "no credit yet at t=0");
    assert_eq!(timer, Some(1_000_000));
    let out = a.handle_vec(Event::Timer(TimerKind::Resync), 1_000_000);
    let reads: Vec<_> = out
        .iter()
        .filter_map(|x| match x {
            Action::DiskRead { offset, len, .. } => Some((*offset, *len)),
            _ => None,
        })
        .collect();
    assert_eq!(reads, vec![(0, (4 * BLOCK) as u32)]);
}

/// Issue #4 (simulator seed 6208): a resync target acks resync writes once written, not
/// stable. Forced to Primary, it must make them stable before its metadata says UpToDate, or a
/// crash right after takes back data it served, with no bitmap of its own naming it. A plain
/// promotion too: the peer writes it acked were not flushed either.
#[test]
fn promotion_makes_the_data_stable_before_saving() {
    let mut d = resync_cut_halfway();
    assert_eq!(d.st(1).disk, DiskState::Inconsistent);
    assert!(d.st(1).bitmap_known, "the source had started");
    let b = d.r[1].as_mut().expect("alive");
    let out = b.handle_vec(
        Event::Admin {
            tag: 3,
            cmd: AdminCmd::Promote { force: true },
        },
        0,
    );
    assert_eq!(b.status().role, Role::Primary);
    let sync = out.iter().position(|x| matches!(x, Action::SyncData));
    let first_save = out
        .iter()
        .position(|x| matches!(x, Action::SaveMeta(_) | Action::SaveBitmap { .. }));
    assert!(sync.is_some(), "no SyncData at a forced promotion: {out:?}");
    assert!(sync < first_save, "SyncData after the metadata: {out:?}");

    let mut a = Replica::new(cfg(1, Protocol::Sync), synced_meta());
    let out = a.handle_vec(
        Event::Admin {
            tag: 4,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    assert_eq!(a.status().role, Role::Primary);
    let sync = out.iter().position(|x| matches!(x, Action::SyncData));
    let save = out.iter().position(|x| matches!(x, Action::SaveMeta(_)));
    assert!(sync.is_some(), "no SyncData at a plain promotion: {out:?}");
    assert!(sync < save, "SyncData after the metadata: {out:?}");
}

/// A node that was UpToDate (bitmap trusted) and becomes a sync target does not know what it
/// lacks until the source shows it started: `bitmap_known` is false in between (simulator
/// seed 1213: else a forced promotion in that window counted as one of a target that knew).
#[test]
fn a_new_sync_target_knows_its_bitmap_only_once_the_source_started() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    assert!(d.st(1).bitmap_known);
    d.cut();
    d.write(0, 3, 7);
    d.connect_unsettled();
    let mut guard = 0;
    while d.st(1).repl != ReplState::SyncTarget {
        d.deliver_some(1);
        guard += 1;
        assert!(guard < 10, "B never became the sync target");
    }
    assert!(
        !d.st(1).bitmap_known,
        "target before the source's first progress"
    );
    d.settle();
    assert_eq!(d.st(1).repl, ReplState::Established);
    assert!(d.st(1).bitmap_known);
    assert!(d.disk[0] == d.disk[1]);
}

#[test]
fn promotion_waits_for_the_lost_peers_writes_to_land() {
    let (mut a, mut b) = pair(Protocol::Async);
    let oa = write(&mut a, 1, 3, 1);
    let ob = deliver(&mut b, sends(&oa));
    let landing = writes(&ob);
    assert_eq!(landing.len(), 1);
    b.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    let out = b.handle_vec(
        Event::Admin {
            tag: 7,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
    );
    assert!(
        out.iter().any(|x| matches!(
            x,
            Action::AdminDone {
                tag: 7,
                result: Err(AdminError::PeerWritesLanding { .. })
            }
        )),
        "{out:?}"
    );
    assert_eq!(b.status().role, Role::Secondary);
    done(&mut b, landing[0].0);
    let out = b.handle_vec(
        Event::Admin {
            tag: 8,
            cmd: AdminCmd::Promote { force: false },
        },
        0,
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
    assert_eq!(b.status().role, Role::Primary);
}

#[test]
fn a_new_generation_is_saved_before_the_first_unreplicated_write_reaches_the_disk() {
    let (mut a, _) = pair(Protocol::Sync);
    a.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    let before = a.status().current_gen;
    let out = write(&mut a, 1, 9, 1);
    assert_ne!(a.status().current_gen, before, "a new generation started");
    let save = out.iter().position(|x| matches!(x, Action::SaveMeta(_)));
    let disk = out
        .iter()
        .position(|x| matches!(x, Action::DiskWrite { .. }));
    assert!(
        matches!((save, disk), (Some(s), Some(d)) if s < d),
        "the generation must be durable before the data: {out:?}"
    );
}

#[test]
fn a_later_epochs_write_does_not_pass_a_waiting_overlapping_write_on_the_peer() {
    let (mut a, mut b) = pair(Protocol::Async);
    let o1 = write(&mut a, 1, 0, 4);
    let o2 = write(&mut a, 2, 1, 1); // overlaps the first: waits on both nodes
    let o2b = done(&mut a, writes(&o1)[0].0); // the first completes: the second is issued
    let o3 = write(&mut a, 3, 8, 1); // after a completion: the next epoch
    let mut msgs = sends(&o1);
    msgs.extend(sends(&o2));
    msgs.extend(sends(&o2b));
    msgs.extend(sends(&o3));
    let epochs: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            PeerMsg::Data(e) => Some(e.epoch),
            _ => None,
        })
        .collect();
    assert_eq!(epochs.len(), 3);
    assert!(epochs[2] > epochs[1], "{epochs:?}");
    let ob = deliver(&mut b, msgs);
    let wb = writes(&ob);
    assert_eq!(
        wb.iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![0],
        "the later epoch's write must wait behind the overlapping one"
    );
    let ob2 = done(&mut b, wb[0].0);
    assert_eq!(
        writes(&ob2).iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![BLOCK, 8 * BLOCK]
    );
}

/// A client TRIM zeroes on both nodes (issue 17, defect 5): a discard leaves whatever each
/// device chooses (nothing, a hole, stale blocks), so the replicas would read different bytes
/// and `verify` would report differences nobody wrote.
#[test]
fn a_trim_zeroes_the_range_on_both_nodes() {
    let (mut a, mut b) = pair(Protocol::Sync);
    let mut out = a.handle_vec(
        Event::ClientTrim {
            req: 9,
            offset: 2 * BLOCK,
            len: (3 * BLOCK) as u32,
        },
        0,
    );
    while let Some(io) = out.iter().find_map(|a| match a {
        Action::SaveActivityLog { io, .. } => Some(*io),
        _ => None,
    }) {
        out.retain(|a| !matches!(a, Action::SaveActivityLog { .. }));
        out.extend(done(&mut a, io));
    }
    let zeroes = |out: &[Action]| -> Vec<(u64, u32)> {
        out.iter()
            .filter_map(|a| match a {
                Action::DiskZero { offset, len, .. } => Some((*offset, *len)),
                Action::DiskTrim { .. } => panic!("a TRIM ran as a discard: {a:?}"),
                _ => None,
            })
            .collect()
    };
    assert_eq!(zeroes(&out), vec![(2 * BLOCK, (3 * BLOCK) as u32)]);
    let on_b = deliver(&mut b, sends(&out));
    assert_eq!(zeroes(&on_b), vec![(2 * BLOCK, (3 * BLOCK) as u32)]);
}

/// Issue 17 defect 8: during a resync the source's view of its peer's disk is the target's
/// truth (Inconsistent), not the UpToDate/Outdated its hello said; so an alert on the
/// Primary's peer disk fires. Once the resync is done both agree it is UpToDate again.
#[test]
fn the_sync_source_sees_its_targets_disk_as_inconsistent_during_the_resync() {
    let mut d = Duo::with(small_chunks);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.cut();
    for b in 0..32 {
        d.write(0, b, 7);
    }
    // The handshake's hello says "Outdated" or "UpToDate"; the target goes Inconsistent.
    d.connect_unsettled();
    let mut guard = 0;
    while d.st(0).resync.is_none() || d.st(1).repl != ReplState::SyncTarget {
        d.deliver_some(1);
        guard += 1;
        assert!(guard < 1000, "the resync never started");
    }
    assert!(d.st(0).resync.is_some_and(|(left, _)| left > 0));
    assert_eq!(d.st(0).repl, ReplState::SyncSource);
    assert_eq!(d.st(1).disk, DiskState::Inconsistent);
    assert_eq!(
        d.st(0).peer_disk,
        Some(DiskState::Inconsistent),
        "the source must report the target's disk as the target does"
    );
    assert_eq!(d.st(1).peer_disk, Some(DiskState::UpToDate));
    d.settle();
    for n in [0, 1] {
        assert_eq!(d.st(n).repl, ReplState::Established, "node {n}");
        assert_eq!(d.st(n).disk, DiskState::UpToDate, "node {n}");
        assert_eq!(d.st(n).peer_disk, Some(DiskState::UpToDate), "node {n}");
    }
}

/// Node 0 Primary wrote 16 blocks while disconnected and the resync to node 1 ran until the
/// source sent `ResyncDone` (it is Established); `deliver` more messages follow, then the link
/// is cut and the rest of the network is lost. Returns the Duo and the bytes resynced so far.
fn resync_cut_at_its_end(deliver: usize) -> (Duo, u64) {
    let mut d = Duo::with(small_chunks);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.cut();
    for b in 0..16 {
        d.write(0, b, 7);
    }
    d.connect_unsettled();
    let mut guard = 0;
    while d.st(0).repl != ReplState::Established || d.st(1).repl == ReplState::Connecting {
        d.deliver_some(1);
        guard += 1;
        assert!(guard < 1000, "resync made no progress");
    }
    d.deliver_some(deliver);
    d.cut();
    d.net.clear();
    let sent = d.resynced_bytes[0];
    (d, sent)
}

/// Issue 17, defect 6: a cut just as a resync finishes (the source sent `ResyncDone`, the
/// target never applied it, or applied it and its UpToDate never reached the source) resumes
/// from the bitmaps: nothing is resent, where it used to cost a full resync.
#[test]
fn a_cut_as_the_resync_finishes_costs_no_full_resync() {
    for deliver in [0, 1, 2, 3, 1000] {
        let (mut d, first_run) = resync_cut_at_its_end(deliver);
        d.connect();
        for n in [0, 1] {
            assert_eq!(d.st(n).repl, ReplState::Established, "{deliver}: node {n}");
            assert_eq!(d.st(n).disk, DiskState::UpToDate, "{deliver}: node {n}");
        }
        assert!(d.disk[0] == d.disk[1], "{deliver}");
        assert_eq!(
            d.resynced_bytes[0] - first_run,
            0,
            "{deliver} messages delivered after ResyncDone: resent after the cut"
        );
        // Confirmed by the handshake: nothing left to resume.
        assert_eq!(d.saved[0].meta.resync_end, None, "{deliver}");
    }
}

/// The same cut, then the source writes on alone (a new generation) and both nodes restart
/// before they meet again: the end is persisted, so the reconnect resends only the new
/// writes, whether or not the target applied the end.
#[test]
fn a_cut_at_the_resyncs_end_resumes_after_new_writes_and_restarts() {
    for deliver in [0, 1000] {
        let (mut d, first_run) = resync_cut_at_its_end(deliver);
        let applied = d.st(1).disk == DiskState::UpToDate;
        assert_eq!(applied, deliver == 1000, "{deliver}");
        // Kept (persisted) until the target's UpToDate confirms it.
        assert_eq!(
            d.saved[0].meta.resync_end.is_some(),
            !applied,
            "{deliver}: the unconfirmed end is persisted"
        );
        d.write(0, 20, 9);
        d.write(0, 40, 9);
        // The target restarts from its metadata; so does the source, after a clean demotion
        // (a crashed Primary would add its activity log's extents to the resync).
        d.admin(0, AdminCmd::Demote);
        for n in [1, 0] {
            d.crash(n);
            d.restart(n);
        }
        d.admin(0, AdminCmd::Promote { force: false });
        d.connect();
        for n in [0, 1] {
            assert_eq!(d.st(n).repl, ReplState::Established, "{deliver}: node {n}");
            assert_eq!(d.st(n).disk, DiskState::UpToDate, "{deliver}: node {n}");
        }
        assert!(d.disk[0] == d.disk[1], "{deliver}");
        let resent = d.resynced_bytes[0] - first_run;
        assert!(
            resent <= 2 * BLOCK,
            "{deliver}: {resent} bytes resent, more than the 2 blocks written since the cut"
        );
    }
}

/// With the old behaviour (the source keeps no end), the same cut costs a full resync: the
/// test above would fail.
#[test]
fn without_the_kept_end_a_cut_at_the_resyncs_end_is_a_full_resync() {
    fn forgetful(node: u64) -> Config {
        let mut c = small_chunks(node);
        c.bug = InjectedBug::ForgetTargetAtResyncEnd;
        c
    }
    let mut d = Duo::with(forgetful);
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    d.cut();
    for b in 0..16 {
        d.write(0, b, 7);
    }
    d.connect_unsettled();
    while d.st(0).repl != ReplState::Established || d.st(1).repl == ReplState::Connecting {
        d.deliver_some(1);
    }
    d.cut();
    d.net.clear();
    let first_run = d.resynced_bytes[0];
    d.connect();
    assert!(d.disk[0] == d.disk[1]);
    assert_eq!(d.resynced_bytes[0] - first_run, SIZE, "a full resync");
}

/// `check_invariants` catches each broken combination it names (a check that cannot fail
/// proves nothing), and the transition tables refuse what the core never does.
#[test]
fn invariant_checks_catch_broken_states() {
    type Breaks = fn(&mut Replica);
    let broken: [(&str, Breaks); 6] = [
        ("relative to no bitmap generation", |r| {
            r.bitmap.set_bytes(0, BLOCK);
            r.bitmap_gen = None;
        }),
        ("Primary with a Inconsistent disk", |r| {
            r.disk = DiskState::Inconsistent
        }),
        ("transfer log without an established connection", |r| {
            r.conn = None;
            r.repl = ReplState::Connecting;
            r.tl.push_back((1, 0, BLOCK));
        }),
        ("replication state Established with no connection", |r| {
            r.conn = None
        }),
        ("send buffer counts", |r| {
            if let Some(c) = r.conn.as_mut() {
                c.sendbuf += 1;
            }
        }),
        ("resync progress while Established", |r| {
            r.progress = Some(Progress::new(1, 0))
        }),
    ];
    for (want, breaks) in broken {
        let (mut a, _) = pair(Protocol::Sync);
        assert_eq!(a.check_invariants(), Ok(()));
        breaks(&mut a);
        let e = a.check_invariants().expect_err(want);
        assert!(e.contains(want), "{want}: got {e}");
    }
    use ReplState::*;
    assert!(legal_repl_change(Connecting, SyncTarget));
    assert!(legal_repl_change(SyncTarget, Connecting));
    assert!(!legal_repl_change(StandAlone, Established));
    assert!(!legal_repl_change(SyncSource, SyncTarget));
    assert!(!legal_repl_change(Ahead, Established));
    assert!(legal_disk_change(
        DiskState::Outdated,
        DiskState::Inconsistent
    ));
    assert!(!legal_disk_change(
        DiskState::Inconsistent,
        DiskState::Outdated
    ));
    assert!(!legal_disk_change(DiskState::UpToDate, DiskState::Diskless));
}

fn failed_client_flush(a: &mut Replica) -> Vec<Action> {
    let out = a.handle_vec(Event::ClientFlush { req: 50 }, 0);
    let io = flushes(&out)[0];
    let mut out = failed(a, io);
    // The peer's barrier ack, if one was sent, no longer matters.
    out.retain(|x| !matches!(x, Action::Send(_)));
    out
}

/// Issue 17, defect 4: a failed client FLUSH on a Primary whose peer holds everything makes
/// this disk Inconsistent (the peer becomes its full sync source), and the node stops using
/// the disk: client I/O fails, the connection closes and stays closed, no promotion.
#[test]
fn a_failed_flush_detaches_a_primary_whose_peer_has_everything() {
    let (mut a, _b) = pair(Protocol::Sync);
    let out = failed_client_flush(&mut a);
    assert_eq!(completions(&out), vec![(50, Err(libc::EIO))]);
    assert!(out
        .iter()
        .any(|x| matches!(x, Action::Emit(StateChange::DiskFailed { .. }))));
    assert!(out
        .iter()
        .any(|x| matches!(x, Action::CloseConnection { .. })));
    let st = a.status();
    assert_eq!(st.disk, DiskState::Inconsistent);
    assert!(!st.bitmap_known, "a full sync target");
    assert_eq!(st.disk_failure.map(|f| f.io), Some(FailedIo::Client));
    assert!(!st.want_connection);
    assert_eq!(completions(&write(&mut a, 51, 0, 1)), vec![(51, Err(EIO))]);
    let out = a.handle_vec(
        Event::Admin {
            tag: 3,
            cmd: AdminCmd::Connect,
        },
        0,
    );
    assert!(out
        .iter()
        .any(|x| matches!(x, Action::AdminDone { result: Err(e @ AdminError::DiskFailed(_)), .. } if e.to_string().contains("restart"))));
    assert!(!a.status().want_connection);
}

/// A Primary whose own disk failed while its peer held everything gave its disk up: the
/// peer's is the data, and the cluster manager must promote it. So the loss of the connection
/// that follows must not freeze and fence (with `on-peer-lost`): a STONITH hook would kill the
/// only good copy (simulator async seed 9912: the peer lost what it had not flushed), a
/// constraint would forbid the promotion that must follow. And a write or flush still waiting
/// for the peer's ack fails (EIO) instead of completing: its data is on the given-up disk
/// only, for all this node knows, so an OK would promise what the promoted peer may lack.
#[test]
fn a_primary_whose_disk_failed_neither_fences_its_peer_nor_acks_what_the_peer_lacks() {
    let mut ca = fencing_cfg(1);
    ca.protocol = Protocol::Sync;
    let mut cb = fencing_cfg(2);
    cb.protocol = Protocol::Sync;
    let (mut a, _b) = pair_of(ca, cb);
    let out = write(&mut a, 7, 3, 1);
    let local = writes(&out)[0].0;
    assert!(
        completions(&done(&mut a, local)).is_empty(),
        "waits for the peer"
    );
    // A flush made stable here, waiting for the peer's barrier ack (simulator seed 13692).
    let out = a.handle_vec(Event::ClientFlush { req: 49 }, 0);
    let flush = flushes(&out)[0];
    assert!(
        completions(&done(&mut a, flush)).is_empty(),
        "waits for the peer"
    );
    let out = failed_client_flush(&mut a);
    assert!(
        !out.iter().any(|x| matches!(x, Action::FencePeer { .. })),
        "fenced the peer that holds the only good copy: {out:?}"
    );
    assert_eq!(a.status().frozen, None);
    let mut c = completions(&out);
    c.sort();
    assert_eq!(
        c,
        vec![
            (7, Err(libc::EIO)),
            (49, Err(libc::EIO)),
            (50, Err(libc::EIO))
        ]
    );
    assert_eq!(a.status().disk, DiskState::Inconsistent);
}

/// Without an UpToDate peer the failed disk is still the best copy: it keeps its state, but
/// any block may now hold older data than the peer's, so every block is marked (a full resync
/// from it leaves both the same) and the node stops serving until restarted.
#[test]
fn a_failed_flush_on_a_lone_primary_marks_every_block() {
    let mut a = primary_alone(cfg(1, Protocol::Sync), synced_meta());
    write(&mut a, 60, 3, 1);
    let out = failed_client_flush(&mut a);
    assert_eq!(completions(&out), vec![(50, Err(libc::EIO))]);
    let st = a.status();
    assert_eq!(st.disk, DiskState::UpToDate);
    assert!(st.disk_failure.is_some());
    assert_eq!(st.dirty_blocks, a.bitmap().blocks());
    assert!(out.iter().any(|x| matches!(x, Action::SaveBitmap { .. })));
    assert_eq!(completions(&write(&mut a, 61, 0, 1)), vec![(61, Err(EIO))]);
}

/// An async Primary whose client write completed (on the local disk alone) and whose flush
/// then failed: the peer is UpToDate but lacks that write, still on its way.
fn async_failure_with_a_write_on_its_way() -> (Replica, Replica, Vec<PeerMsg>, Vec<Action>) {
    let (mut a, b) = pair(Protocol::Async);
    let out = write(&mut a, 7, 3, 1);
    let mut to_peer = sends(&out);
    assert_eq!(
        completions(&done(&mut a, writes(&out)[0].0)),
        vec![(7, Ok(()))],
        "async: the local disk is enough"
    );
    let out = a.handle_vec(Event::ClientFlush { req: 50 }, 0);
    to_peer.extend(sends(&out));
    let io = flushes(&out)[0];
    let out = failed(&mut a, io);
    (a, b, to_peer, out)
}

/// The write an async Primary completed may still be on its way when its disk fails with the
/// peer UpToDate, and the failure's message tells the operator to promote that peer
/// (simulator async seed 42766: it lacked a FUA write, completed on the failed disk). So the
/// Primary gives its disk up at once but keeps the connection until the peer acked and made
/// stable everything it was sent, and only then hangs up.
#[test]
fn an_async_primary_whose_disk_failed_hands_its_writes_over_before_it_hangs_up() {
    let (mut a, mut b, mut to_peer, out) = async_failure_with_a_write_on_its_way();
    assert_eq!(completions(&out), vec![(50, Err(libc::EIO))]);
    assert!(
        !out.iter()
            .any(|x| matches!(x, Action::CloseConnection { .. })),
        "hung up with a completed write on its way: {out:?}"
    );
    let st = a.status();
    assert_eq!(st.handover, Some(Handover::Running { conn: 1 }));
    assert_eq!(st.disk, DiskState::Inconsistent);
    assert_eq!(st.repl, ReplState::Established);
    assert!(!st.want_connection);
    // Client I/O fails meanwhile.
    assert_eq!(completions(&write(&mut a, 51, 0, 1)), vec![(51, Err(EIO))]);
    to_peer.extend(sends(&out));
    assert!(
        to_peer.iter().any(|m| matches!(
            m,
            PeerMsg::State(PeerState {
                disk: DiskState::Inconsistent,
                ..
            })
        )),
        "the peer is told the disk was given up: {to_peer:?}"
    );
    let back = peer_applies(&mut b, to_peer);
    assert!(
        back.iter().any(|m| matches!(m, PeerMsg::BarrierAck { .. })),
        "a flush barrier covers what was sent: {back:?}"
    );
    let b_disk: Vec<_> = b.status().peer_disk.into_iter().collect();
    assert_eq!(b_disk, vec![DiskState::Inconsistent]);
    let out = deliver(&mut a, back);
    assert_handover_ended(&a, &out, Handover::Done, "every write");
}

/// The handover is over as `outcome`: the connection closed for the disk failure, the node
/// stands alone, and its status says `says`.
fn assert_handover_ended(a: &Replica, out: &[Action], outcome: Handover, says: &str) {
    assert!(
        out.iter().any(|x| matches!(
            x,
            Action::CloseConnection {
                reason: CloseReason::DiskFailed(_),
                ..
            }
        )),
        "no hang-up: {out:?}"
    );
    let st = a.status();
    assert_eq!(st.handover, Some(outcome));
    assert_eq!(st.repl, ReplState::StandAlone);
    assert!(outcome.to_string().contains(says), "{outcome}");
}

/// A handover the peer does not finish (its acks never come) ends at the stop-drain deadline,
/// and the status says the peer may lack acknowledged writes.
#[test]
fn a_handover_that_the_peer_does_not_finish_is_cut_at_its_deadline() {
    let (mut a, _b, _to_peer, out) = async_failure_with_a_write_on_its_way();
    let deadline = out
        .iter()
        .find_map(|x| match x {
            Action::ArmTimer {
                kind: TimerKind::Handover { conn },
                ..
            } => Some(*conn),
            _ => None,
        })
        .expect("a deadline for the handover");
    let out = a.handle_vec(Event::Timer(TimerKind::Handover { conn: deadline }), 0);
    assert_handover_ended(&a, &out, Handover::Cut, "promoting the peer loses them");
}

/// A write still queued when the disk fails never starts during the handover: it would need
/// the given-up disk, and maybe an activity-log transaction on it (whose failed flush once
/// stopped the node, cutting the handover short: simulator async seed 186). Never
/// acknowledged, it fails.
#[test]
fn a_handover_fails_the_writes_still_queued_at_once() {
    let (mut a, _b) = pair(Protocol::Async);
    let first = write(&mut a, 7, 3, 1);
    assert_eq!(writes(&first).len(), 1);
    let queued = write(&mut a, 8, 3, 1);
    assert!(
        writes(&queued).is_empty(),
        "waits for the overlapping write"
    );
    let out = a.handle_vec(Event::ClientFlush { req: 50 }, 0);
    let io = flushes(&out)[0];
    let out = failed(&mut a, io);
    assert!(matches!(
        a.status().handover,
        Some(Handover::Running { .. })
    ));
    assert!(
        completions(&out).contains(&(8, Err(EIO))),
        "{:?}",
        completions(&out)
    );
    assert!(writes(&out).is_empty(), "a queued write started: {out:?}");
    // Its overlapping predecessor finishing does not start it either.
    let out = done(&mut a, writes(&first)[0].0);
    assert!(writes(&out).is_empty(), "{out:?}");
}

/// An activity-log transaction in flight when the disk fails fails too (its pre-flush runs on
/// the failed disk). That fails the write waiting for it and nothing else: the handover goes
/// on until the peer has everything (simulator async seed 186: the driver exited there and
/// cut it short).
#[test]
fn an_activity_log_transaction_failing_during_a_handover_does_not_cut_it() {
    let async_al = |node| {
        let mut c = al_cfg(node);
        c.protocol = Protocol::Async;
        c
    };
    let (mut a, mut b) = pair_of(async_al(1), async_al(2));
    let out = write(&mut a, 7, 0, 1);
    let mut to_peer = sends(&out);
    assert_eq!(
        completions(&done(&mut a, writes(&out)[0].0)),
        vec![(7, Ok(()))]
    );
    // A write to the next extent waits for its transaction.
    let waiting = write_raw(&mut a, 8, 8, 1);
    let (al_io, _) = al_txns(&waiting)[0].clone();
    assert!(writes(&waiting).is_empty());
    let out = a.handle_vec(Event::ClientFlush { req: 50 }, 0);
    to_peer.extend(sends(&out));
    let out = failed(&mut a, flushes(&out)[0]);
    to_peer.extend(sends(&out));
    assert!(matches!(
        a.status().handover,
        Some(Handover::Running { .. })
    ));
    let out = failed(&mut a, al_io);
    assert!(
        !out.iter()
            .any(|x| matches!(x, Action::CloseConnection { .. })),
        "the failed transaction cut the handover: {out:?}"
    );
    assert!(
        writes(&out).is_empty() && al_txns(&out).is_empty(),
        "{out:?}"
    );
    to_peer.extend(sends(&out));
    let st = a.status();
    assert!(
        matches!(st.handover, Some(Handover::Running { .. })),
        "{st:?}"
    );
    assert_eq!(
        st.disk_failure.map(|f| f.io),
        Some(FailedIo::Client),
        "the first failure is the one reported"
    );
    let back = peer_applies(&mut b, to_peer);
    let out = deliver(&mut a, back);
    assert_handover_ended(&a, &out, Handover::Done, "every write");
}

/// With nothing on its way (the peer acked and made stable everything), there is nothing to
/// hand over: the connection closes at once, as in sync.
#[test]
fn an_async_primary_whose_peer_has_everything_hangs_up_at_once() {
    let (mut a, _b) = pair(Protocol::Async);
    let out = failed_client_flush(&mut a);
    assert!(out
        .iter()
        .any(|x| matches!(x, Action::CloseConnection { .. })));
    assert_eq!(a.status().handover, None);
    assert_eq!(a.status().repl, ReplState::StandAlone);
}

/// `InjectedBug::ALL` lists every variant once, in `position` order, so `TWINBLK_SIM_BUG` can
/// replay any of them by name.
#[test]
fn every_injected_bug_is_replayable_by_name() {
    for (i, b) in InjectedBug::ALL.into_iter().enumerate() {
        assert_eq!(b.position(), i, "{b:?}");
        assert_eq!(InjectedBug::from_name(&format!("{b:?}")), Some(b));
    }
    assert_eq!(InjectedBug::from_name("NoSuchBug"), None);
}

/// A write of the Primary's data that fails on the Secondary (its disk full: ENOSPC) detaches
/// the Secondary's disk, DRBD's `on-io-error detach`: Inconsistent, the connection closed and
/// not retried (it reconnected at once, resynced into the same full disk and failed again,
/// about three handshakes a second while the disk stayed full), the failure and its errno in
/// the status. The Primary's sync write completes once the loss is reported: it is on the
/// Primary's disk, and its region in the bitmap for the resync after the Secondary's restart.
#[test]
fn a_failed_peer_write_detaches_the_secondarys_disk_and_the_primarys_write_completes() {
    let (mut a, mut b) = pair(Protocol::Sync);
    let out = write(&mut a, 7, 3, 2);
    let local = writes(&out)[0].0;
    let out_b = deliver(&mut b, sends(&out));
    let peer_io = writes(&out_b)[0].0;
    let out_b = b.handle_vec(
        Event::DiskDone {
            io: peer_io,
            result: Err(libc::ENOSPC),
        },
        0,
    );
    assert!(
        !sends(&out_b)
            .iter()
            .any(|m| matches!(m, PeerMsg::WriteAck { .. })),
        "a failed write is never acked"
    );
    assert!(out_b
        .iter()
        .any(|x| matches!(x, Action::CloseConnection { .. })));
    assert!(out_b
        .iter()
        .any(|x| matches!(x, Action::Emit(StateChange::DiskFailed { .. }))));
    let st = b.status();
    assert_eq!(st.disk, DiskState::Inconsistent);
    assert_eq!(st.repl, ReplState::StandAlone);
    assert!(!st.want_connection, "no reconnect into the same full disk");
    let f = st.disk_failure.expect("the status names the failed disk");
    assert_eq!(f.io, FailedIo::PeerWrite { offset: 3 * BLOCK });
    assert_eq!(f.errno, libc::ENOSPC);
    let text = f.to_string();
    assert!(
        text.contains("No space left on device") && text.contains("free space"),
        "{text}"
    );
    // `connect` is refused until the restart, and says so.
    let out_b = b.handle_vec(
        Event::Admin {
            tag: 4,
            cmd: AdminCmd::Connect,
        },
        0,
    );
    assert!(out_b.iter().any(|x| matches!(
        x,
        Action::AdminDone {
            result: Err(AdminError::DiskFailed(_)),
            ..
        }
    )));
    assert!(!b.status().want_connection);

    // The Primary: its local write is done, the peer's ack never comes; the loss completes it.
    assert!(
        completions(&done(&mut a, local)).is_empty(),
        "waits for the peer"
    );
    let out = a.handle_vec(
        Event::ConnectionDown {
            conn: 1,
            reason: LinkLoss::TimedOut,
        },
        0,
    );
    assert_eq!(completions(&out), vec![(7, Ok(()))]);
    assert!(a.bitmap().get(3) && a.bitmap().get(4));
}

/// Resync data reaches a disk only on a SyncTarget (or behind a queued Ahead resync start): an
/// Established Secondary that gets some closes the connection as a protocol violation, and
/// writes nothing. (`drain_reorder` decides this at the first resync message it meets.)
#[test]
fn resync_data_to_a_node_that_is_not_sync_target_closes_the_connection() {
    let (mut a, mut b) = pair(Protocol::Async);
    let msgs = sends(&write(&mut a, 1, 3, 1));
    let seq = msgs
        .iter()
        .find_map(|m| match m {
            PeerMsg::Data(e) => Some(e.seq),
            _ => None,
        })
        .expect("the write's extent");
    let out = deliver(&mut b, msgs);
    assert_eq!(writes(&out).len(), 1, "the write is applied");
    let data = Bytes::from(vec![7u8; BLOCK as usize]);
    let out = deliver(
        &mut b,
        vec![PeerMsg::ResyncData {
            seq: seq + 1,
            offset: 5 * BLOCK,
            crc32: crc32fast::hash(&data),
            data,
        }],
    );
    assert!(
        writes(&out).is_empty(),
        "resync data never reaches the disk"
    );
    assert!(
        out.iter().any(|x| matches!(
            x,
            Action::CloseConnection {
                reason: CloseReason::Protocol(Violation::Unexpected(
                    "peer sent resync data, but this node is not SyncTarget"
                )),
                ..
            }
        )),
        "{out:?}"
    );
}
