use proptest::prelude::*;

use super::*;
use crate::core::DiskState;

fn layout() -> Layout {
    Layout::new(1 << 30, DEFAULT_BITMAP_BLOCK, DEFAULT_AL_EXTENTS).unwrap()
}

fn sb(seq: u64) -> Superblock {
    Superblock {
        seq,
        resource_id: 0x1234_5678_9abc_def0,
        resource: "r0".into(),
        node_id: 2,
        node: "beta".into(),
        layout: layout(),
        meta: Meta {
            current_gen: 0x30002,
            bitmap_gen: Some(0x20001),
            history: [0x10001, 0],
            disk: DiskState::UpToDate,
            primary: true,
            no_activity_log: true,
            resync_resumable: true,
            resync_end: Some(ResyncEnd {
                gen: 0x30002,
                target_gens: [0, 0x20001],
            }),
        },
    }
}

#[test]
fn geometry_is_aligned_and_sized_for_the_device() {
    let l = layout();
    assert_eq!(l.bitmap_bits(), 1 << 18);
    assert_eq!(l.bitmap_words(), 1 << 12);
    assert_eq!(l.bitmap_offset(), 8192);
    assert_eq!(l.bitmap_area(), 32 << 10);
    assert_eq!(l.al_offset(), 8192 + (32 << 10));
    assert_eq!(l.total_len(), l.al_offset() + 16 * 4096);
    for seq in 0..40 {
        assert_eq!(l.al_block_offset(seq) % 4096, 0);
        assert!(l.al_block_offset(seq) < l.total_len());
    }
    // An odd size: a partial bitmap word, still a whole 4 KiB area.
    let odd = Layout::new(4096 * 65 + 1, 4096, 8).unwrap();
    assert_eq!(odd.bitmap_bits(), 66);
    assert_eq!(odd.bitmap_words(), 2);
    assert_eq!(odd.bitmap_area(), 4096);
}

#[test]
fn default_al_fits_up_to_64_tib_and_is_limited_above() {
    assert!(layout().al_capacity() >= DEFAULT_AL_EXTENTS);
    let big = 1u64 << 50;
    assert_eq!(Layout::new(big, 1 << 20, 1020).unwrap().al_capacity(), 1020);
    let e = Layout::new(big, 1 << 20, 1024).unwrap_err();
    assert!(e.to_string().contains("give 1 to 1020"), "{e}");
}

#[test]
fn bad_geometry_is_refused() {
    for (size, bb, al) in [
        (0, 4096, 8),
        (MAX_SIZE + 1, 4096, 8),
        (1 << 30, 4095, 8),
        (1 << 30, 2048, 8),
        (1 << 30, 2 << 20, 8),
        (1 << 30, 4096, 0),
        (1 << 30, 4096, 5000),
    ] {
        assert!(Layout::new(size, bb, al).is_err(), "{size} {bb} {al}");
    }
}

#[test]
fn superblock_round_trip() {
    let b = encode_superblock(&sb(7)).unwrap();
    assert_eq!(b.len(), BLOCK);
    assert_eq!(&b[0..8], &MAGIC);
    assert_eq!(decode_slot(&b), Slot::Valid(sb(7)));
}

#[test]
fn long_names_are_refused() {
    let mut s = sb(1);
    s.node = "n".repeat(64);
    assert!(encode_superblock(&s).is_err());
}

#[test]
fn a_flipped_bit_anywhere_is_caught() {
    let b = encode_superblock(&sb(3)).unwrap();
    for at in [9, 12, 16, 40, 70, 200, 4095] {
        let mut c = b.clone();
        c[at] ^= 0x10;
        assert!(
            matches!(decode_slot(&c), Slot::Damaged(_) | Slot::Newer(_)),
            "flip at {at}: {:?}",
            decode_slot(&c)
        );
    }
    let mut c = b.clone();
    c[0] ^= 1;
    assert_eq!(decode_slot(&c), Slot::Foreign);
}

#[test]
fn newer_version_is_recognised_without_a_valid_crc() {
    let mut b = encode_superblock(&sb(3)).unwrap();
    b[8..12].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(decode_slot(&b), Slot::Newer(3));
    let valid = Slot::Valid(sb(9));
    assert_eq!(pick(&[valid, Slot::Newer(3)]), Err(PickError::Newer(3)));
}

#[test]
fn pick_takes_the_highest_valid_sequence() {
    let (s, i, note) = pick(&[Slot::Valid(sb(4)), Slot::Valid(sb(5))]).unwrap();
    assert_eq!((s.seq, i, note), (5, 1, None));
    let (s, i, _) = pick(&[Slot::Valid(sb(6)), Slot::Valid(sb(5))]).unwrap();
    assert_eq!((s.seq, i), (6, 0));
}

#[test]
fn a_torn_update_leaves_the_previous_state() {
    // seq 5 is in effect in slot 1; the update to seq 6 goes to slot 0 and is torn halfway.
    let old = encode_superblock(&sb(5)).unwrap();
    let mut new_sb = sb(6);
    new_sb.meta.disk = DiskState::Inconsistent;
    let new = encode_superblock(&new_sb).unwrap();
    // Slot 0 held seq 4; only the first 100 bytes of seq 6 (header, not the Meta) made it.
    let mut torn = encode_superblock(&sb(4)).unwrap();
    torn[..100].copy_from_slice(&new[..100]);
    let slots = [decode_slot(&torn), decode_slot(&old)];
    let (s, i, note) = pick(&slots).unwrap();
    assert_eq!((s, i), (sb(5), 1));
    assert!(note.unwrap().contains("slot 0"));
}

#[test]
fn both_slots_bad_is_corrupt_and_no_magic_is_not_metadata() {
    let mut b = encode_superblock(&sb(1)).unwrap();
    b[100] ^= 1;
    let bad = decode_slot(&b);
    assert!(matches!(
        pick(&[bad.clone(), bad.clone()]),
        Err(PickError::Corrupt(_))
    ));
    assert!(matches!(
        pick(&[bad, Slot::Blank]),
        Err(PickError::Corrupt(_))
    ));
    assert_eq!(
        pick(&[Slot::Blank, Slot::Foreign]),
        Err(PickError::NotMetadata)
    );
    assert_eq!(decode_slot(&[0; BLOCK]), Slot::Blank);
    assert_eq!(decode_slot(&[0xff; BLOCK]), Slot::Foreign);
    assert!(matches!(decode_slot(&[0; 10]), Slot::Damaged(_)));
}

#[test]
fn activity_log_round_trip_and_salt() {
    let l = layout();
    let ext: Vec<u64> = (0..l.al_extents as u64)
        .map(|i| (i * 7) % l.extents())
        .collect();
    let b = encode_al(&l, 42, 9, &ext).unwrap();
    assert_eq!(b.len(), BLOCK);
    assert_eq!(
        decode_al(&l, 42, &b),
        AlBlock::Valid {
            seq: 9,
            extents: ext.clone()
        }
    );
    // Left by other metadata (another resource id): never counts.
    assert!(matches!(decode_al(&l, 43, &b), AlBlock::Damaged(_)));
    assert_eq!(decode_al(&l, 42, &[0; BLOCK]), AlBlock::Empty);
    // Past `al_extents` (the core grows the log when nothing pinned could let go, e.g. one
    // write spanning more extents than the log holds) but within the block: persisted, or the
    // daemon would stop on such a write.
    let over: Vec<u64> = (0..l.al_extents as u64 + 16)
        .map(|i| i % l.extents())
        .collect();
    let b = encode_al(&l, 42, 10, &over).unwrap();
    assert_eq!(
        decode_al(&l, 42, &b),
        AlBlock::Valid {
            seq: 10,
            extents: over
        }
    );
    // Too many for the block, out of range, sequence 0.
    let too_many = vec![0; l.al_capacity() as usize + 1];
    assert!(encode_al(&l, 42, 9, &too_many).is_err());
    assert!(encode_al(&l, 42, 9, &[l.extents()]).is_err());
    assert!(encode_al(&l, 42, 0, &[]).is_err());
}

#[test]
fn four_byte_extent_numbers_on_huge_devices() {
    let l = Layout::new(1 << 50, 1 << 20, 1000).unwrap();
    let ext = vec![0, (1 << 24) + 5, l.extents() - 1];
    let b = encode_al(&l, 1, 3, &ext).unwrap();
    assert_eq!(
        decode_al(&l, 1, &b),
        AlBlock::Valid {
            seq: 3,
            extents: ext
        }
    );
}

#[test]
fn pick_al_takes_the_newest_valid_and_reports_damage() {
    let l = layout();
    let a = decode_al(&l, 1, &encode_al(&l, 1, 17, &[1, 2]).unwrap());
    let b = decode_al(&l, 1, &encode_al(&l, 1, 18, &[3]).unwrap());
    let mut torn = encode_al(&l, 1, 19, &[4, 5, 6]).unwrap();
    torn[20] ^= 0xff;
    let torn = decode_al(&l, 1, &torn);
    let (best, notes) = pick_al(&[a, AlBlock::Empty, b, torn]);
    assert_eq!(best, Some((18, vec![3])));
    assert_eq!(notes.len(), 1);
    assert!(notes[0].contains("block 3"), "{notes:?}");
    assert_eq!(pick_al(&[AlBlock::Empty]).0, None);
}

#[test]
fn words_round_trip() {
    let w = vec![0, 1, u64::MAX, 0x8000_0000_0000_0001];
    assert_eq!(decode_words(&encode_words(&w)), w);
    assert_eq!(encode_words(&[1])[0], 1, "little-endian");
}

fn arb_meta() -> impl Strategy<Value = Meta> {
    (
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        any::<[u64; 2]>(),
        prop_oneof![
            Just(DiskState::UpToDate),
            Just(DiskState::Inconsistent),
            Just(DiskState::Outdated),
            Just(DiskState::Diskless)
        ],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<Option<(u64, [u64; 2])>>(),
    )
        .prop_map(
            |(current_gen, bitmap_gen, history, disk, primary, no_activity_log, resumable, end)| {
                Meta {
                    current_gen,
                    bitmap_gen,
                    history,
                    disk,
                    primary,
                    no_activity_log,
                    resync_resumable: resumable,
                    resync_end: end.map(|(gen, target_gens)| ResyncEnd { gen, target_gens }),
                }
            },
        )
}

proptest! {
    #[test]
    fn prop_superblock_round_trip(
        seq in any::<u64>(),
        rid in any::<u64>(),
        node_id in any::<u64>(),
        size in 1u64..=MAX_SIZE,
        bb_shift in 12u32..=20,
        al in 1u32..=1020,
        res in "[a-z0-9][a-z0-9-]{0,62}",
        node in "[a-z0-9][a-z0-9-]{0,62}",
        meta in arb_meta(),
    ) {
        let s = Superblock {
            seq,
            resource_id: rid,
            resource: res,
            node_id,
            node,
            layout: Layout::new(size, 1 << bb_shift, al).unwrap(),
            meta,
        };
        let b = encode_superblock(&s).unwrap();
        prop_assert_eq!(decode_slot(&b), Slot::Valid(s));
    }

    #[test]
    fn prop_al_round_trip(
        size in 1u64..=MAX_SIZE,
        seq in 1u64..,
        rid in any::<u64>(),
        picks in proptest::collection::vec(any::<u64>(), 0..1020),
    ) {
        let l = Layout::new(size, 1 << 20, 1020).unwrap();
        let ext: Vec<u64> = picks.iter().map(|p| p % l.extents()).collect();
        let b = encode_al(&l, rid, seq, &ext).unwrap();
        prop_assert_eq!(decode_al(&l, rid, &b), AlBlock::Valid { seq, extents: ext });
    }

    #[test]
    fn prop_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let slot = decode_slot(&bytes);
        let _ = pick(&[slot.clone(), slot]);
        let _ = decode_al(&layout(), 1, &bytes);
    }

    #[test]
    fn prop_corrupted_slot_never_panics_nor_passes_as_other_data(
        at in 0usize..BLOCK,
        x in 1u8..,
        meta in arb_meta(),
    ) {
        let mut s = sb(5);
        s.meta = meta;
        let mut b = encode_superblock(&s).unwrap();
        b[at] ^= x;
        // Either detected, or (a flip in the magic) not ours: never a different valid superblock.
        match decode_slot(&b) {
            Slot::Valid(got) => prop_assert!(false, "corruption at {} accepted: {:?}", at, got),
            Slot::Blank => prop_assert!(false, "not blank"),
            _ => {}
        }
    }
}

#[test]
fn flags_are_one_byte_that_older_slots_hold_as_zero() {
    let mut off = sb(3);
    off.meta.no_activity_log = false;
    off.meta.resync_resumable = false;
    off.meta.resync_end = None;
    let a = encode_superblock(&off).unwrap();
    let set = |f: fn(&mut Meta)| {
        let mut on = off.clone();
        f(&mut on.meta);
        encode_superblock(&on).unwrap()
    };
    for (bit, b) in [
        (1u8, set(|m| m.no_activity_log = true)),
        (2u8, set(|m| m.resync_resumable = true)),
    ] {
        let diff: Vec<usize> = (0..BLOCK).filter(|&i| a[i] != b[i]).collect();
        // Besides the crc (bytes 12..16), only the flags byte after the postcard Meta
        // differs; a flag off writes the zero that every slot written before it existed holds.
        let flags: Vec<usize> = diff.iter().copied().filter(|&i| i >= 16).collect();
        assert_eq!(flags.len(), 1, "{diff:?}");
        assert_eq!(a[flags[0]], 0);
        assert_eq!(b[flags[0]], bit);
        match decode_slot(&b) {
            Slot::Valid(s) => {
                assert_eq!(s.meta.no_activity_log, bit == 1);
                assert_eq!(s.meta.resync_resumable, bit == 2);
            }
            other => panic!("{other:?}"),
        }
    }
    match decode_slot(&a) {
        Slot::Valid(s) => assert!(
            !s.meta.no_activity_log && !s.meta.resync_resumable && s.meta.resync_end.is_none()
        ),
        other => panic!("{other:?}"),
    }
    // The resync end: bit 2 of the flags, its three words right after them (where an older
    // slot holds zeroes, and an older build does not look).
    let end = ResyncEnd {
        gen: 0x50002,
        target_gens: [0x10001, 0x30001],
    };
    let b = set(|m| {
        m.resync_end = Some(ResyncEnd {
            gen: 0x50002,
            target_gens: [0x10001, 0x30001],
        })
    });
    let diff: Vec<usize> = (16..BLOCK).filter(|&i| a[i] != b[i]).collect();
    let flags_at = diff[0];
    assert_eq!(b[flags_at], 4);
    assert!(diff.iter().all(|&i| i <= flags_at + 24), "{diff:?}");
    assert_eq!(
        b[flags_at + 1..flags_at + 9],
        0x50002u64.to_le_bytes(),
        "gen first"
    );
    match decode_slot(&b) {
        Slot::Valid(s) => assert_eq!(s.meta.resync_end, Some(end)),
        other => panic!("{other:?}"),
    }
}
