//! Fuzzes the metadata reader: arbitrary bytes as superblock slots and activity-log blocks must
//! never panic, and whatever decodes as a valid superblock re-encodes to the same slot.
//!
//! Run: `tools/fuzz.sh meta`
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinblk::meta::format::{self, Layout, Slot, BLOCK};

fuzz_target!(|data: &[u8]| {
    // Two slots from the input (padded with zeros: short inputs exercise the blank paths).
    let mut area = data.to_vec();
    area.resize(area.len().max(2 * BLOCK), 0);
    let slots = [
        format::decode_slot(&area[..BLOCK]),
        format::decode_slot(&area[BLOCK..2 * BLOCK]),
    ];
    for s in &slots {
        if let Slot::Valid(sb) = s {
            let again = format::encode_superblock(sb).expect("a decoded superblock re-encodes");
            assert_eq!(format::decode_slot(&again), Slot::Valid(sb.clone()));
        }
    }
    let picked = format::pick(&slots);
    // The activity log, read with the picked layout or one taken from the input's first bytes.
    let layout = match &picked {
        Ok((sb, _, _)) => sb.layout,
        Err(_) => {
            let n = |i: usize| u64::from(*data.get(i).unwrap_or(&1));
            match Layout::new(
                (n(0) << 32 | n(1) << 16 | n(2)).max(1),
                4096 << (n(3) % 9),
                (n(4) as u32 * 7).max(1),
            ) {
                Ok(l) => l,
                Err(_) => return,
            }
        }
    };
    let blocks: Vec<_> = area
        .chunks(BLOCK)
        .map(|b| format::decode_al(&layout, 7, b))
        .collect();
    let (best, _) = format::pick_al(&blocks);
    if let Some((seq, extents)) = best {
        let again = format::encode_al(&layout, 7, seq, &extents).expect("a decoded AL re-encodes");
        assert_eq!(
            format::decode_al(&layout, 7, &again),
            format::AlBlock::Valid { seq, extents }
        );
    }
    let _ = format::decode_words(data);
});
