//! Online verify and checksum resync, on two in-memory nodes (`Duo`) and by hand.

use super::*;
use crate::core::verify::VerifySide;

fn corrupt(d: &mut Duo, n: usize, block: u64) {
    let o = (block * BLOCK) as usize;
    for b in &mut d.disk[n][o..o + BLOCK as usize] {
        *b ^= 0x5a;
    }
}

fn established_duo() -> Duo {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    d.connect();
    assert_eq!(d.st(0).repl, ReplState::Established);
    for b in 0..16 {
        d.write(0, b, b as u8 + 1);
    }
    assert_eq!(d.disk[0], d.disk[1]);
    d
}

#[test]
fn verify_finds_exactly_the_corrupted_blocks_and_reconnect_resyncs_them() {
    for initiator in [0, 1] {
        let mut d = established_duo();
        corrupt(&mut d, 1, 5);
        corrupt(&mut d, 1, 9);
        corrupt(&mut d, 1, 10);
        corrupt(&mut d, 1, 60);
        d.admin(initiator, AdminCmd::Verify);
        for n in [0, 1] {
            let v = d.st(n).verify.expect("verify status");
            assert!(!v.running, "node {n}: {v:?}");
            assert_eq!(v.aborted, None);
            assert_eq!(v.differing_blocks, 4, "node {n}");
            assert_eq!(v.checked_bytes, SIZE);
            assert_eq!(
                v.first_ranges,
                vec![
                    (5 * BLOCK, BLOCK),
                    (9 * BLOCK, 2 * BLOCK),
                    (60 * BLOCK, BLOCK)
                ]
            );
            assert_eq!(d.st(n).dirty_blocks, 4, "node {n} marks them out of sync");
            // Persisted too: a restart still knows.
            let saved: u32 = d.saved[n].bitmap.iter().map(|w| w.count_ones()).sum();
            assert_eq!(saved, 4);
        }
        // The Primary reads first, wherever the command ran.
        assert_eq!(d.st(0).verify.map(|v| v.side), Some(VerifySide::Driver));
        assert_eq!(d.st(1).verify.map(|v| v.side), Some(VerifySide::Comparer));
        assert_eq!(
            d.st(0).repl,
            ReplState::Established,
            "verify alone moves no data"
        );
        d.admin(1, AdminCmd::Disconnect);
        d.cut();
        d.connect();
        assert_eq!(d.st(0).repl, ReplState::Established);
        assert_eq!(d.disk[0], d.disk[1], "resync repaired the secondary");
        // The four found, plus the last write (block 15): sent, not yet barrier-acked when
        // the connection went, so it is marked too.
        assert!(d.resynced_bytes[0] <= 5 * BLOCK, "{}", d.resynced_bytes[0]);
        assert_eq!(d.st(0).dirty_blocks + d.st(1).dirty_blocks, 0);
    }
}

#[test]
fn identical_disks_verify_clean() {
    let mut d = established_duo();
    d.admin(0, AdminCmd::Verify);
    let v = d.st(0).verify.expect("status");
    assert!(
        !v.running && v.aborted.is_none() && v.differing_blocks == 0,
        "{v:?}"
    );
    assert_eq!(d.st(0).dirty_blocks + d.st(1).dirty_blocks, 0);
}

#[test]
fn verify_needs_a_connected_up_to_date_peer() {
    let mut d = Duo::new();
    d.admin(0, AdminCmd::Promote { force: false });
    let mut out = Vec::new();
    d.r[0].as_mut().expect("alive").handle(
        Event::Admin {
            tag: 5,
            cmd: AdminCmd::Verify,
        },
        0,
        &mut out,
    );
    let err = out.iter().find_map(|a| match a {
        Action::AdminDone { result: Err(e), .. } => Some(e.clone()),
        _ => None,
    });
    assert!(
        matches!(
            err,
            Some(AdminError::Verify(VerifyRefusal::NotEstablished {
                repl: ReplState::Connecting
            }))
        ),
        "{err:?}"
    );
    assert_eq!(err.map(|e| e.code()), Some(AdminErrorCode::VerifyRefused));
}

/// `verify` on both nodes at the same moment, then every message and disk I/O delivered.
fn verify_on_both(d: &mut Duo) {
    for n in [0, 1] {
        d.feed(
            n,
            Event::Admin {
                tag: 1,
                cmd: AdminCmd::Verify,
            },
        );
    }
    d.settle();
}

/// `verify` on two connected Secondaries at once: each drives, each finds the peer's start
/// and stops, by name.
#[test]
fn verifies_started_on_both_nodes_at_once_both_stop() {
    let mut d = Duo::new();
    d.connect();
    assert_eq!(d.st(0).repl, ReplState::Established);
    verify_on_both(&mut d);
    for n in [0, 1] {
        let v = d.st(n).verify.expect("status");
        assert!(!v.running, "node {n}: {v:?}");
        assert_eq!(
            v.aborted.as_ref().map(VerifyAbort::wire_code),
            Some(VerifyAbortCode::BothStarted),
            "node {n}: {v:?}"
        );
    }
}

/// `verify` on the Secondary while the Primary's own verify runs: the Secondary compares the
/// running one, and both finish (neither waits forever for the other).
#[test]
fn a_verify_asked_for_while_one_runs_joins_it() {
    let mut d = established_duo();
    corrupt(&mut d, 1, 3);
    verify_on_both(&mut d);
    for n in [0, 1] {
        let v = d.st(n).verify.expect("status");
        assert!(!v.running, "node {n}: {v:?}");
        assert_eq!(v.aborted, None, "node {n}");
        assert_eq!(v.differing_blocks, 1, "node {n}");
    }
}

#[test]
fn a_write_racing_the_verify_read_is_ordered_after_it() {
    let (mut a, mut b) = pair(Protocol::Sync);
    let out = a.handle_vec(
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Verify,
        },
        0,
    );
    let reads: Vec<(IoId, u64, u32)> = out
        .iter()
        .filter_map(|x| match x {
            Action::DiskRead { io, offset, len } => Some((*io, *offset, *len)),
            _ => None,
        })
        .collect();
    assert!(!reads.is_empty());
    let mut to_b = sends(&out);
    // A client write into the first chunk while its verify read is in flight: held back.
    let out = write(&mut a, 50, 1, 1);
    assert!(
        writes(&out).is_empty(),
        "the write waits for the verify read"
    );
    // The read sees the old (zero) data; its digests go out first, then the write.
    let (io, _, len) = reads[0];
    let out = a.handle_vec(
        Event::DiskDone {
            io,
            result: Ok(Some(Bytes::from(vec![0u8; len as usize]))),
        },
        0,
    );
    let msgs = sends(&out);
    let vseq = msgs.iter().find_map(|m| match m {
        PeerMsg::VerifyRequest { seq, .. } => Some(*seq),
        _ => None,
    });
    let dseq = msgs.iter().find_map(|m| match m {
        PeerMsg::Data(e) => Some(e.seq),
        _ => None,
    });
    assert!(vseq.is_some() && dseq.is_some() && vseq < dseq, "{msgs:?}");
    // Deliver the write before the verify request: the secondary still compares first.
    let (data, rest): (Vec<PeerMsg>, Vec<PeerMsg>) = msgs
        .into_iter()
        .partition(|m| matches!(m, PeerMsg::Data(_)));
    to_b.extend(data);
    to_b.extend(rest);
    let out = deliver(&mut b, to_b);
    let order: Vec<&str> = out
        .iter()
        .filter_map(|x| match x {
            Action::DiskRead { offset: 0, .. } => Some("verify-read"),
            Action::DiskWrite { offset, .. } if *offset == BLOCK => Some("write"),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        vec!["verify-read"],
        "the write waits for the verify read"
    );
}

#[test]
fn a_role_change_stops_the_verify_on_both_nodes() {
    let mut d = established_duo();
    // Start; only the start reaches the comparer (none of the requests).
    d.feed(
        0,
        Event::Admin {
            tag: 1,
            cmd: AdminCmd::Verify,
        },
    );
    assert!(matches!(
        d.net.front(),
        Some((1, _, PeerMsg::VerifyStart { .. }))
    ));
    d.deliver_some(1);
    d.net.clear();
    assert!(d.st(1).verify.is_some_and(|v| v.running));
    d.feed(
        0,
        Event::Admin {
            tag: 2,
            cmd: AdminCmd::Demote,
        },
    );
    let v = d.st(0).verify.expect("status");
    assert!(!v.running);
    assert_eq!(v.aborted, Some(VerifyAbort::RoleChanged));
    // The comparer stops too, for the same cause by name (its own sight of the new role, or
    // the driver's word, whichever arrives first).
    d.settle();
    let v = d.st(1).verify.expect("status");
    assert!(!v.running, "{v:?}");
    assert_eq!(
        v.aborted.as_ref().map(VerifyAbort::wire_code),
        Some(VerifyAbortCode::RoleChanged),
        "{v:?}"
    );
}

fn set_csums(d: &mut Duo, on: bool) {
    for r in d.r.iter_mut().flatten() {
        r.cfg.csums = on;
    }
}

/// A full sync (after `invalidate`) between disks that already hold the same data.
fn full_sync_bytes(csums: bool, corrupt_blocks: &[u64]) -> (u64, Duo) {
    let mut d = established_duo();
    set_csums(&mut d, csums);
    for &b in corrupt_blocks {
        corrupt(&mut d, 1, b);
    }
    d.admin(1, AdminCmd::Invalidate);
    assert_eq!(d.st(1).disk, DiskState::Inconsistent);
    d.connect();
    assert_eq!(d.st(1).disk, DiskState::UpToDate);
    assert_eq!(d.st(1).repl, ReplState::Established);
    assert!(d.disk[0] == d.disk[1], "disks identical after the resync");
    assert_eq!(d.st(0).dirty_blocks + d.st(1).dirty_blocks, 0);
    (d.resynced_bytes[0], d)
}

#[test]
fn checksum_resync_moves_only_what_differs() {
    let (plain, _) = full_sync_bytes(false, &[]);
    assert_eq!(plain, SIZE, "without csums every block moves");
    let (csums, _) = full_sync_bytes(true, &[]);
    assert_eq!(csums, 0, "identical disks: no data moves");
    let (csums, _) = full_sync_bytes(true, &[7, 8, 40]);
    // One chunk here (the device is one resync chunk): the span from the first to the last
    // differing block moves, the equal blocks around it do not.
    assert_eq!(csums, (40 - 7 + 1) * BLOCK);
    let (plain, _) = full_sync_bytes(false, &[7, 8, 40]);
    assert_eq!(plain, SIZE);
}

#[test]
fn checksum_resync_with_small_chunks_moves_only_differing_chunks_spans() {
    let mut d = established_duo();
    set_csums(&mut d, true);
    for r in d.r.iter_mut().flatten() {
        r.cfg.resync_chunk = 4 * BLOCK;
    }
    for b in [1, 2, 13, 50] {
        corrupt(&mut d, 1, b);
    }
    d.admin(1, AdminCmd::Invalidate);
    d.connect();
    assert_eq!(d.st(1).disk, DiskState::UpToDate);
    assert!(d.disk[0] == d.disk[1]);
    assert_eq!(d.resynced_bytes[0], 4 * BLOCK);
}
