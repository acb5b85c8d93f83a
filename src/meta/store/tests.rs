use std::os::unix::fs::FileExt;

use super::*;
use crate::core::DiskState;
use crate::meta::format::{BLOCK, DEFAULT_AL_EXTENTS};

const SIZE: u64 = 64 << 20;

fn id() -> Identity<'static> {
    Identity {
        resource: "r0",
        node: "alpha",
        node_id: 1,
    }
}

fn expect() -> Expect<'static> {
    Expect {
        resource: "r0",
        node: "alpha",
        size: SIZE,
    }
}

fn layout() -> Layout {
    Layout::new(SIZE, 4096, DEFAULT_AL_EXTENTS).unwrap()
}

fn fresh() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r0.meta");
    drop(MetaStore::create(&p, &id(), &layout(), false).unwrap());
    (d, p)
}

fn poke(p: &Path, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn create_then_open_gives_a_new_device() {
    let (_d, p) = fresh();
    let (s, r) = MetaStore::open(&p, &expect()).unwrap();
    assert_eq!(r.meta, Meta::new_device());
    assert_eq!(r.bitmap.len() as u64, layout().bitmap_words());
    assert!(r.bitmap.iter().all(|&w| w == 0));
    assert!(r.activity_log.is_empty());
    assert_eq!(*s.layout(), layout());
    assert_eq!(s.superblock().node_id, 1);
    assert_ne!(s.superblock().resource_id, 0);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), layout().total_len());
}

#[test]
fn saves_survive_a_reopen() {
    let (_d, p) = fresh();
    let meta = Meta {
        current_gen: 0x20001,
        bitmap_gen: Some(0x10001),
        history: [5, 4],
        disk: DiskState::UpToDate,
        primary: true,
        no_activity_log: true,
        resync_resumable: false,
        resync_end: Some(crate::core::ResyncEnd {
            gen: 0x20001,
            target_gens: [3, 3],
        }),
    };
    {
        let (mut s, _) = MetaStore::open(&p, &expect()).unwrap();
        s.save_meta(&meta).unwrap();
        s.save_bitmap(3, &[0b101, u64::MAX]).unwrap();
        s.save_bitmap(0, &[1]).unwrap();
        // More transactions than the ring holds: the newest wins.
        for i in 0..40u64 {
            s.save_activity_log(&[i % 16, 15]).unwrap();
        }
        s.save_activity_log(&[2, 9, 11]).unwrap();
    }
    let (_s, r) = MetaStore::open(&p, &expect()).unwrap();
    assert_eq!(r.meta, meta);
    assert_eq!(&r.bitmap[..5], &[1, 0, 0, 0b101, u64::MAX]);
    assert_eq!(r.activity_log, vec![2, 9, 11]);
}

#[test]
fn missing_is_refused_with_the_command_that_fixes_it() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("none");
    let e = MetaStore::open(&p, &expect()).unwrap_err();
    assert!(matches!(e, MetaError::Missing { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("twinblk create-md r0") && msg.contains("none"),
        "{msg}"
    );
    assert!(!p.exists(), "open must not create the file");
}

#[test]
fn create_refuses_to_overwrite_without_force() {
    let (_d, p) = fresh();
    {
        let (mut s, _) = MetaStore::open(&p, &expect()).unwrap();
        s.save_meta(&Meta {
            current_gen: 77,
            ..Meta::new_device()
        })
        .unwrap();
    }
    let e = MetaStore::create(&p, &id(), &layout(), false).unwrap_err();
    assert!(matches!(e, MetaError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(
        MetaStore::open(&p, &expect()).unwrap().1.meta.current_gen,
        77
    );
    drop(MetaStore::create(&p, &id(), &layout(), true).unwrap());
    assert_eq!(
        MetaStore::open(&p, &expect()).unwrap().1.meta,
        Meta::new_device()
    );
}

#[test]
fn create_refuses_other_data_but_takes_zeroes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m");
    std::fs::write(&p, b"{\"version\":1}").unwrap();
    let e = MetaStore::create(&p, &id(), &layout(), false).unwrap_err();
    assert!(matches!(e, MetaError::OtherData { .. }), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"{\"version\":1}");
    std::fs::write(&p, vec![0u8; 100_000]).unwrap();
    drop(MetaStore::create(&p, &id(), &layout(), false).unwrap());
    MetaStore::open(&p, &expect()).unwrap();
}

#[test]
fn not_metadata_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m");
    std::fs::write(&p, vec![0x5au8; 300_000]).unwrap();
    let e = MetaStore::open(&p, &expect()).unwrap_err();
    assert!(matches!(e, MetaError::NotMetadata { .. }), "{e}");
    std::fs::write(&p, b"").unwrap();
    let e = MetaStore::open(&p, &expect()).unwrap_err();
    assert!(matches!(e, MetaError::NotMetadata { .. }), "{e}");
}

#[test]
fn foreign_resource_node_and_size_are_refused() {
    let (_d, p) = fresh();
    let cases = [
        (
            Expect {
                resource: "r1",
                ..expect()
            },
            "belongs to resource \"r0\", not \"r1\"",
        ),
        (
            Expect {
                node: "beta",
                ..expect()
            },
            "is node \"alpha\"'s, not \"beta\"'s",
        ),
        (
            Expect {
                size: SIZE * 2,
                ..expect()
            },
            "describes a device of 67108864 bytes, but the disk has 134217728 bytes",
        ),
    ];
    for (exp, text) in cases {
        let e = MetaStore::open(&p, &exp).unwrap_err();
        assert!(matches!(e, MetaError::Foreign { .. }), "{e}");
        assert!(e.to_string().contains(text), "{e}");
        assert!(e.to_string().contains("create-md"), "{e}");
    }
}

#[test]
fn newer_format_is_refused_by_version() {
    let (_d, p) = fresh();
    poke(&p, 8, &3u32.to_le_bytes());
    let e = MetaStore::open(&p, &expect()).unwrap_err();
    assert!(matches!(e, MetaError::Newer { found: 3, .. }), "{e}");
    assert!(
        e.to_string().contains("is version 3, this build reads 1"),
        "{e}"
    );
}

#[test]
fn one_torn_slot_is_survived_both_are_corrupt() {
    let (_d, p) = fresh();
    {
        let (mut s, _) = MetaStore::open(&p, &expect()).unwrap();
        s.save_meta(&Meta {
            current_gen: 5,
            ..Meta::new_device()
        })
        .unwrap();
        // create-md left seq 2 in effect in slot 1; seq 3 (gen 5) went to slot 0, seq 4
        // (gen 6) to slot 1: tear that one.
        s.save_meta(&Meta {
            current_gen: 6,
            ..Meta::new_device()
        })
        .unwrap();
    }
    poke(&p, 4096 + 2000, &[0xee; 100]);
    let (s, r) = MetaStore::open(&p, &expect()).unwrap();
    drop(s);
    assert_eq!(r.meta.current_gen, 5, "the previous state wins");
    let ins = MetaStore::inspect(&p, "r0").unwrap();
    assert_eq!(ins.slot, 0);
    assert!(
        ins.warnings.iter().any(|w| w.contains("slot 1")),
        "{:?}",
        ins.warnings
    );
    poke(&p, 3000, &[0xee; 10]);
    let e = MetaStore::open(&p, &expect()).unwrap_err();
    assert!(matches!(e, MetaError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("both superblock slots"), "{e}");
}

#[test]
fn the_next_save_after_a_torn_slot_keeps_the_good_one() {
    let (_d, p) = fresh();
    // Slot 0 (seq 2) torn: seq 1 in slot 1 is in effect.
    poke(&p, 100, &[1; 8]);
    {
        let (mut s, r) = MetaStore::open(&p, &expect()).unwrap();
        assert_eq!(r.meta, Meta::new_device());
        s.save_meta(&Meta {
            current_gen: 9,
            ..Meta::new_device()
        })
        .unwrap();
    }
    let ins = MetaStore::inspect(&p, "r0").unwrap();
    assert_eq!(ins.superblock.meta.current_gen, 9);
    assert!(ins.warnings.is_empty(), "{:?}", ins.warnings);
}

#[test]
fn one_bad_al_block_is_survived_none_is_corrupt() {
    let (_d, p) = fresh();
    let l = layout();
    {
        let (mut s, _) = MetaStore::open(&p, &expect()).unwrap();
        s.save_activity_log(&[4]).unwrap(); // seq 2
        s.save_activity_log(&[4, 8]).unwrap(); // seq 3
    }
    // Tear transaction 3: transaction 2 is the log.
    poke(&p, l.al_block_offset(3) + 14, &[0xff; 6]);
    let (s, r) = MetaStore::open(&p, &expect()).unwrap();
    assert_eq!(r.activity_log, vec![4]);
    drop(s);
    for seq in 1..=2 {
        poke(&p, l.al_block_offset(seq) + 20, &[0xff; 6]);
    }
    let e = MetaStore::open(&p, &expect()).unwrap_err();
    assert!(matches!(e, MetaError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("activity-log"), "{e}");
}

#[test]
fn truncated_area_is_corrupt() {
    let (_d, p) = fresh();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(layout().total_len() - 4096).unwrap();
    let e = MetaStore::open(&p, &expect()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn an_open_store_is_locked() {
    let (_d, p) = fresh();
    let (s, _) = MetaStore::open(&p, &expect()).unwrap();
    let e = MetaStore::open(&p, &expect()).unwrap_err();
    assert!(matches!(e, MetaError::Busy { .. }), "{e}");
    let e = MetaStore::create(&p, &id(), &layout(), true).unwrap_err();
    assert!(matches!(e, MetaError::Busy { .. }), "{e}");
    // dump-md reads anyway.
    MetaStore::inspect(&p, "r0").unwrap();
    drop(s);
    MetaStore::open(&p, &expect()).unwrap();
}

#[test]
fn out_of_range_saves_are_errors_not_panics() {
    let (_d, p) = fresh();
    let (mut s, _) = MetaStore::open(&p, &expect()).unwrap();
    let words = layout().bitmap_words();
    assert!(s.save_bitmap(words, &[1]).is_err());
    assert!(s.save_bitmap(u64::MAX, &[1]).is_err());
    s.save_bitmap(words - 1, &[1]).unwrap();
    assert!(s.save_activity_log(&[1 << 40]).is_err());
    // Past the configured size (the core grows it for a write spanning more extents than it holds) is fine; past the block is not.
    let over: Vec<u64> = (0..=u64::from(DEFAULT_AL_EXTENTS))
        .map(|i| i % 16)
        .collect();
    s.save_activity_log(&over).unwrap();
    let too_many: Vec<u64> = (0..=u64::from(layout().al_capacity()))
        .map(|i| i % 16)
        .collect();
    assert!(s.save_activity_log(&too_many).is_err());
}

#[test]
fn bits_past_the_device_are_ignored() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m");
    // 70 blocks: two words, the second holds 6 real bits.
    let l = Layout::new(70 * 4096, 4096, 8).unwrap();
    drop(MetaStore::create(&p, &id(), &l, false).unwrap());
    poke(&p, l.bitmap_offset() + 8, &u64::MAX.to_le_bytes());
    let ins = MetaStore::inspect(&p, "r0").unwrap();
    assert_eq!(ins.bitmap, vec![0, 0b11_1111]);
}

#[test]
fn an_update_never_overwrites_the_slot_in_effect() {
    let (_d, p) = fresh();
    // Both slots hold sequence 1 (slot 1 out of its usual place): slot 0 is in effect.
    let slot0 = std::fs::read(&p).unwrap()[..BLOCK].to_vec();
    poke(&p, BLOCK as u64, &slot0);
    {
        let (mut s, _) = MetaStore::open(&p, &expect()).unwrap();
        s.save_meta(&Meta {
            current_gen: 3,
            ..Meta::new_device()
        })
        .unwrap();
    }
    assert_eq!(&std::fs::read(&p).unwrap()[..BLOCK], &slot0[..]);
    let ins = MetaStore::inspect(&p, "r0").unwrap();
    assert_eq!((ins.slot, ins.superblock.seq), (1, 2));
    assert_eq!(ins.superblock.meta.current_gen, 3);
}
