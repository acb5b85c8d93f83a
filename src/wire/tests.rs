use super::*;
use proptest::prelude::*;

fn hello() -> Hello {
    Hello {
        resource: "r0".into(),
        node_id: 7,
        size: 1 << 30,
        role: Role::Primary,
        disk: DiskState::UpToDate,
        current_gen: 0x1234,
        bitmap_gen: Some(9),
        bitmap_known: true,
        dirty: false,
        crashed_primary: false,
        history: [7, 3],
        dirty_blocks: 12,
        discard_my_data: true,
        after_sb_0pri: AfterSb0Pri::DiscardLeastChanges,
        after_sb_1pri: AfterSb1Pri::DiscardSecondary,
        resync_end: Some(ResyncEnd {
            gen: 0x1234,
            target_gens: [0, 0x1001],
        }),
    }
}

fn roundtrip(m: &PeerMsg) {
    let bytes = encode(m).expect("encode");
    let (back, used) = decode(&bytes).expect("decode").expect("complete");
    assert_eq!(used, bytes.len());
    assert_eq!(&back, m);
    // Every strict prefix is "need more", never an error or a panic.
    for cut in 0..bytes.len() {
        assert_eq!(decode(&bytes.slice(..cut)), Ok(None), "prefix {cut}");
        let _ = payload_offset(&bytes[..cut]);
    }
    // The transport aligns a received payload where this says it starts.
    let (head, payload) = encode_parts(m).expect("encode");
    if !payload.is_empty() {
        assert_eq!(payload_offset(&head), head.len(), "{m:?}");
    }
}

#[test]
fn every_kind_roundtrips() {
    let data = Bytes::from(vec![0xab; 4096]);
    let msgs = vec![
        PeerMsg::Hello(hello()),
        PeerMsg::State(PeerState {
            role: Role::Secondary,
            disk: DiskState::Inconsistent,
        }),
        PeerMsg::Refuse {
            code: RefusalCode::SizeMismatch,
            reason: "size differs".into(),
        },
        PeerMsg::Refuse {
            code: RefusalCode::DiskFailed,
            reason: String::new(),
        },
        PeerMsg::PromoteAsk { id: 7 },
        PeerMsg::PromoteAnswer {
            id: 7,
            verdict: PromoteVerdict::Yes,
        },
        PeerMsg::PromoteAnswer {
            id: u64::MAX,
            verdict: PromoteVerdict::NoPrimary,
        },
        PeerMsg::PromoteAnswer {
            id: 0,
            verdict: PromoteVerdict::NoPromoting,
        },
        PeerMsg::Data(Extent {
            seq: 1,
            epoch: 2,
            offset: 4096,
            len: 4096,
            op: DataOp::Write,
            flags: FLAG_FUA,
            crc32: crc32fast::hash(&data),
            data: data.clone(),
        }),
        PeerMsg::Data(Extent {
            seq: 3,
            epoch: 2,
            offset: 0,
            len: 1 << 20,
            op: DataOp::Trim,
            flags: 0,
            crc32: 0,
            data: Bytes::new(),
        }),
        PeerMsg::Barrier {
            seq: 5,
            epoch: 2,
            flush: true,
        },
        PeerMsg::Barrier {
            seq: 8,
            epoch: 3,
            flush: false,
        },
        PeerMsg::ResyncData {
            seq: 6,
            offset: 8192,
            crc32: crc32fast::hash(&data),
            data,
        },
        PeerMsg::ResyncDone { seq: 7, gen: 99 },
        PeerMsg::WriteAck {
            seq: 1,
            timing: crate::wire::AckTiming {
                receive_ns: 1,
                queue_ns: 2,
                disk_ns: 3,
                ack_ns: u32::MAX,
            },
        },
        PeerMsg::BarrierAck { epoch: 2 },
        PeerMsg::ResyncAck {
            offset: 8192,
            len: 4096,
        },
        PeerMsg::VerifyRequest {
            seq: 8,
            offset: 1 << 20,
            len: 8192,
            digests: vec![u64::MAX, 7],
        },
        PeerMsg::VerifyReply {
            offset: 1 << 20,
            len: 8192,
            differ: vec![(256, 1)],
        },
        PeerMsg::VerifyStart { seq: 9 },
        PeerMsg::VerifyEnd {
            seq: 10,
            aborted: None,
        },
        PeerMsg::VerifyEnd {
            seq: 11,
            aborted: Some(VerifyAborted {
                code: VerifyAbortCode::RoleChanged,
                why: "role changed".into(),
            }),
        },
        PeerMsg::VerifyAsk,
        PeerMsg::VerifyStop {
            code: VerifyAbortCode::NotEstablished,
            reason: "not connected".into(),
        },
        PeerMsg::CsumRequest {
            offset: 0,
            len: 262_144,
        },
        PeerMsg::CsumReply {
            offset: 0,
            len: 8192,
            digests: vec![1, 2],
        },
        PeerMsg::ResyncSame {
            offset: 4096,
            len: 4096,
        },
        PeerMsg::ResyncZero {
            seq: 8,
            offset: 1 << 30,
            len: 256 << 10,
        },
        PeerMsg::Ahead { seq: 9 },
        PeerMsg::AheadResync { seq: 10 },
    ];
    for m in &msgs {
        roundtrip(m);
        assert!(m.crc_ok());
    }
    // `TWINBLK_FUZZ_SEEDS=$PWD/fuzz/seeds/wire cargo test --lib every_kind_roundtrips` writes
    // these as seeds of the `wire` fuzz target: a stream of one frame per kind, and one of all.
    if let Some(dir) = std::env::var_os("TWINBLK_FUZZ_SEEDS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The target's first byte says how it cuts the stream: chunks of up to 2 KiB.
        let mut all = vec![11u8];
        for (i, m) in msgs.iter().enumerate() {
            let f = encode(m).unwrap();
            let mut one = vec![11u8];
            for s in [&mut one, &mut all] {
                s.extend_from_slice(&(f.len() as u32).to_le_bytes());
                s.extend_from_slice(&f);
            }
            std::fs::write(dir.join(format!("kind-{i:02}")), one).unwrap();
        }
        std::fs::write(dir.join("all"), all).unwrap();
    }
}

#[test]
fn rejects_bad_magic_version_kind_and_huge_length() {
    let good = encode(&PeerMsg::WriteAck {
        seq: 1,
        timing: Default::default(),
    })
    .unwrap();
    let mut b = good.to_vec();
    b[0] ^= 1;
    assert!(matches!(
        decode(&Bytes::from(b)),
        Err(WireError::BadMagic(_))
    ));
    let mut b = good.to_vec();
    // A version other than this build's (the one before it).
    b[4] = (VERSION - 1) as u8;
    assert!(matches!(
        decode(&Bytes::from(b)),
        Err(WireError::BadVersion(v)) if v == VERSION - 1
    ));
    let mut b = good.to_vec();
    b[6] = 200;
    assert!(matches!(
        decode(&Bytes::from(b)),
        Err(WireError::UnknownKind(200))
    ));
    let mut b = good.to_vec();
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&Bytes::from(b)),
        Err(WireError::TooLong(_))
    ));
}

#[test]
fn payload_length_mismatch_is_malformed() {
    let data = Bytes::from_static(b"hello");
    let m = PeerMsg::Data(Extent {
        seq: 1,
        epoch: 1,
        offset: 0,
        len: 6, // lies about its payload
        op: DataOp::Write,
        flags: 0,
        crc32: crc32fast::hash(&data),
        data,
    });
    let bytes = encode(&m).unwrap();
    assert!(matches!(decode(&bytes), Err(WireError::Malformed { .. })));
}

#[test]
fn corrupted_payload_fails_crc() {
    let data = Bytes::from(vec![1u8; 512]);
    let m = PeerMsg::ResyncData {
        seq: 1,
        offset: 0,
        crc32: crc32fast::hash(&data),
        data,
    };
    let mut b = encode(&m).unwrap().to_vec();
    let last = b.len() - 1;
    b[last] ^= 0x40;
    let (back, _) = decode(&Bytes::from(b)).unwrap().unwrap();
    assert!(!back.crc_ok());
}

fn arb_msg() -> impl Strategy<Value = PeerMsg> {
    let data = proptest::collection::vec(any::<u8>(), 0..3000).prop_map(Bytes::from);
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            data.clone()
        )
            .prop_map(|(seq, epoch, offset, flags, data)| {
                PeerMsg::Data(Extent {
                    seq,
                    epoch,
                    offset,
                    len: data.len() as u32,
                    op: DataOp::Write,
                    flags,
                    crc32: crc32fast::hash(&data),
                    data,
                })
            }),
        (any::<u64>(), any::<u64>(), data).prop_map(|(seq, offset, data)| PeerMsg::ResyncData {
            seq,
            offset,
            crc32: crc32fast::hash(&data),
            data
        }),
        (any::<u64>(), any::<u64>(), any::<bool>())
            .prop_map(|(seq, epoch, flush)| PeerMsg::Barrier { seq, epoch, flush }),
        (any::<u64>(), any::<[u32; 4]>()).prop_map(|(seq, t)| PeerMsg::WriteAck {
            seq,
            timing: crate::wire::AckTiming {
                receive_ns: t[0],
                queue_ns: t[1],
                disk_ns: t[2],
                ack_ns: t[3],
            }
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| PeerMsg::ResyncAck { offset, len }),
        (any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(seq, offset, len)| PeerMsg::ResyncZero { seq, offset, len }),
        any::<u64>().prop_map(|seq| PeerMsg::Ahead { seq }),
        any::<u64>().prop_map(|seq| PeerMsg::AheadResync { seq }),
        (
            ".{0,40}",
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<Option<u64>>(),
            any::<Option<(u64, u64, u64)>>()
        )
            .prop_map(|(resource, node_id, current_gen, dirty, bitmap_gen, end)| {
                PeerMsg::Hello(Hello {
                    resource,
                    node_id,
                    current_gen,
                    dirty,
                    bitmap_gen,
                    resync_end: end.map(|(gen, a, b)| ResyncEnd {
                        gen,
                        target_gens: [a, b],
                    }),
                    ..hello()
                })
            }),
        (0..10usize, ".{0,80}").prop_map(|(i, reason)| PeerMsg::Refuse {
            code: [
                RefusalCode::ResourceMismatch,
                RefusalCode::SizeMismatch,
                RefusalCode::SameNodeId,
                RefusalCode::BothPrimary,
                RefusalCode::BothPrimaryConnected,
                RefusalCode::NoUpToDate,
                RefusalCode::PeerNewerThanPrimary,
                RefusalCode::NewerThanPrimaryPeer,
                RefusalCode::SplitBrain,
                RefusalCode::DiskFailed,
            ][i],
            reason
        }),
        any::<u64>().prop_map(|id| PeerMsg::PromoteAsk { id }),
        (any::<u64>(), 0..3u8).prop_map(|(id, v)| PeerMsg::PromoteAnswer {
            id,
            verdict: [
                PromoteVerdict::Yes,
                PromoteVerdict::NoPrimary,
                PromoteVerdict::NoPromoting
            ][v as usize],
        }),
        (
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20),
            any::<bool>()
        )
            .prop_map(|(runs, done)| PeerMsg::PeerBitmap { runs, done }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(total, left)| PeerMsg::ResyncProgress { total, left }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<u64>(), 0..70)
        )
            .prop_map(|(seq, offset, len, digests)| PeerMsg::VerifyRequest {
                seq,
                offset,
                len,
                digests
            }),
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20)
        )
            .prop_map(|(offset, len, differ)| PeerMsg::VerifyReply {
                offset,
                len,
                differ
            }),
        (
            any::<u64>(),
            proptest::option::of((0..VerifyAbortCode::ALL.len(), ".{0,40}"))
        )
            .prop_map(|(seq, aborted)| PeerMsg::VerifyEnd {
                seq,
                aborted: aborted.map(|(i, why)| VerifyAborted {
                    code: VerifyAbortCode::ALL[i],
                    why
                }),
            }),
        any::<u64>().prop_map(|seq| PeerMsg::VerifyStart { seq }),
        (0..VerifyAbortCode::ALL.len(), ".{0,40}").prop_map(|(i, reason)| PeerMsg::VerifyStop {
            code: VerifyAbortCode::ALL[i],
            reason
        }),
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<u64>(), 0..70)
        )
            .prop_map(|(offset, len, digests)| PeerMsg::CsumReply {
                offset,
                len,
                digests
            }),
        (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| PeerMsg::ResyncSame { offset, len }),
    ]
}

proptest! {
    #[test]
    fn roundtrip_any(m in arb_msg()) {
        let bytes = encode(&m).unwrap();
        let (back, used) = decode(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, m);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode(&Bytes::from(b));
    }

    #[test]
    fn mutated_frames_never_panic(m in arb_msg(), pos in any::<usize>(), bit in 0u8..8) {
        let mut b = encode(&m).unwrap().to_vec();
        let i = pos % b.len();
        b[i] ^= 1 << bit;
        let _ = decode(&Bytes::from(b));
    }
}

#[test]
fn refuses_the_previous_wire_version_by_name() {
    // Version 2 barriers had no flush flag: a v2 peer must be refused at its first frame, with a
    // message that says what to do, not misread.
    let mut b = encode(&PeerMsg::WriteAck {
        seq: 1,
        timing: Default::default(),
    })
    .unwrap()
    .to_vec();
    b[4..6].copy_from_slice(&2u16.to_le_bytes());
    let e = decode(&Bytes::from(b)).unwrap_err();
    assert_eq!(e, WireError::BadVersion(2));
    assert!(e.to_string().contains("upgrade one side"), "{e}");
}

#[test]
fn barrier_with_unknown_flags_is_malformed() {
    let mut b = encode(&PeerMsg::Barrier {
        seq: 1,
        epoch: 1,
        flush: true,
    })
    .unwrap()
    .to_vec();
    let last = b.len() - 1;
    b[last] = 0x80;
    assert!(matches!(
        decode(&Bytes::from(b)),
        Err(WireError::Malformed {
            kind: "barrier",
            ..
        })
    ));
}

/// A refusal code this build does not know (a newer peer's; the version check refuses such a
/// peer first) is a malformed frame, not a panic.
#[test]
fn an_unknown_refusal_code_is_malformed() {
    let mut body = postcard::to_stdvec(&RefuseBody {
        code: RefusalCode::DiskFailed,
        reason: "x".into(),
    })
    .expect("encode");
    body[0] = 100;
    assert!(decode_body(Kind::Refuse, Bytes::from(body)).is_err());
}

/// Every verify-abort code crosses the wire unchanged, in both messages that carry one, and
/// each has its own stable name.
#[test]
fn every_verify_abort_code_roundtrips() {
    let mut names = std::collections::HashSet::new();
    for code in VerifyAbortCode::ALL {
        roundtrip(&PeerMsg::VerifyStop {
            code,
            reason: code.as_str().into(),
        });
        roundtrip(&PeerMsg::VerifyEnd {
            seq: 3,
            aborted: Some(VerifyAborted {
                code,
                why: String::new(),
            }),
        });
        assert!(names.insert(code.as_str()), "{code:?} shares its name");
    }
}

/// A verify-abort code this build does not know (a newer peer's; the version check refuses
/// such a peer first) is a malformed frame, not a panic.
#[test]
fn an_unknown_verify_abort_code_is_malformed() {
    let mut body = postcard::to_stdvec(&VerifyStopBody {
        code: VerifyAbortCode::PrimaryDrives,
        reason: "x".into(),
    })
    .expect("encode");
    body[0] = 100;
    assert!(matches!(
        decode_body(Kind::VerifyStop, Bytes::from(body)),
        Err(WireError::Malformed { .. })
    ));
    // In `VerifyEnd`: the seq (1), the option's tag (1), then the code.
    let mut body = postcard::to_stdvec(&VerifyEndBody {
        seq: 1,
        aborted: Some(VerifyAborted {
            code: VerifyAbortCode::RoleChanged,
            why: "x".into(),
        }),
    })
    .expect("encode");
    assert_eq!(body[2], 0, "the code's byte");
    body[2] = 100;
    assert!(matches!(
        decode_body(Kind::VerifyEnd, Bytes::from(body)),
        Err(WireError::Malformed { .. })
    ));
}
