//! `twinblk dump-md`: the metadata area, readable by an operator or as JSON. Pure: formats an
//! [`Inspection`].

use std::fmt::Write;
use std::path::Path;

use serde_json::json;

use super::store::Inspection;
use crate::core::AL_EXTENT;

/// Dirty ranges listed before "… and N more".
const SHOW_RANGES: usize = 8;

/// Runs of set bits as `(first_block, blocks)`, in order.
pub fn runs(words: &[u64], bits: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (wi, &w) in words.iter().enumerate() {
        if w == 0 {
            continue;
        }
        for bit in 0..64u64 {
            let b = wi as u64 * 64 + bit;
            if b >= bits {
                break;
            }
            if w & (1 << bit) == 0 {
                continue;
            }
            match out.last_mut() {
                Some((first, n)) if *first + *n == b => *n += 1,
                _ => out.push((b, 1)),
            }
        }
    }
    out
}

fn gen(g: u64) -> String {
    if g == 0 {
        "none".into()
    } else {
        format!("{g:#018x}")
    }
}

/// Binary-prefixed size for people ("4.0 MiB").
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

struct Summary {
    set_bits: u64,
    dirty_bytes: u64,
    ranges: Vec<(u64, u64)>,
    total_ranges: usize,
}

fn summary(ins: &Inspection) -> Summary {
    let l = &ins.superblock.layout;
    let all = runs(&ins.bitmap, l.bitmap_bits());
    let to_bytes = |(first, n): (u64, u64)| {
        let start = first * l.bitmap_block;
        let end = ((first + n) * l.bitmap_block).min(l.size);
        (start, end.saturating_sub(start))
    };
    Summary {
        set_bits: all.iter().map(|r| r.1).sum(),
        dirty_bytes: all.iter().map(|&r| to_bytes(r).1).sum(),
        ranges: all.iter().take(SHOW_RANGES).map(|&r| to_bytes(r)).collect(),
        total_ranges: all.len(),
    }
}

/// The readable form.
pub fn human(path: &Path, ins: &Inspection) -> String {
    let sb = &ins.superblock;
    let l = &sb.layout;
    let m = &sb.meta;
    let s = summary(ins);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "metadata {} (format {}, slot {} in effect, update {})",
        path.display(),
        super::format::VERSION,
        ins.slot,
        sb.seq
    );
    let _ = writeln!(
        o,
        "  resource:      {} (id {:#018x})",
        sb.resource, sb.resource_id
    );
    let _ = writeln!(o, "  node:          {} (id {})", sb.node, sb.node_id);
    let _ = writeln!(
        o,
        "  device size:   {} bytes ({})",
        l.size,
        human_bytes(l.size)
    );
    let _ = writeln!(
        o,
        "  generations:   current {}, bitmap {}, history {}, {}",
        gen(m.current_gen),
        m.bitmap_gen.map_or_else(|| "none".to_string(), gen),
        gen(m.history[0]),
        gen(m.history[1])
    );
    if let Some(end) = m.resync_end {
        let _ = writeln!(
            o,
            "  resync end:    sent {}, the peer may still be at {} or {} (a cut before it \
             applied the end resumes from the bitmaps)",
            gen(end.gen),
            gen(end.target_gens[0]),
            gen(end.target_gens[1])
        );
    }
    let _ = writeln!(o, "  disk state:    {:?}", m.disk);
    let _ = writeln!(o, "  flags:         {}", flags(m));
    let _ = writeln!(
        o,
        "  bitmap:        {} bits of {} at offset {}",
        l.bitmap_bits(),
        human_bytes(l.bitmap_block),
        l.bitmap_offset()
    );
    let _ = writeln!(
        o,
        "  out of sync:   {} blocks, {} bytes ({})",
        s.set_bits,
        s.dirty_bytes,
        human_bytes(s.dirty_bytes)
    );
    for (start, len) in &s.ranges {
        let _ = writeln!(o, "    {start}..{} ({})", start + len, human_bytes(*len));
    }
    if s.total_ranges > s.ranges.len() {
        let _ = writeln!(
            o,
            "    … and {} more ranges",
            s.total_ranges - s.ranges.len()
        );
    }
    let _ = writeln!(
        o,
        "  activity log:  {} of at most {} extents of {} (transaction {}, ring of {} at offset {})",
        ins.activity_log.len(),
        l.al_extents,
        human_bytes(AL_EXTENT),
        ins.al_seq,
        l.al_ring_blocks,
        l.al_offset()
    );
    if !ins.activity_log.is_empty() {
        let mut ext = ins.activity_log.clone();
        ext.sort_unstable();
        let shown: Vec<String> = ext
            .iter()
            .take(32)
            .map(|e| format!("{e} ({})", human_bytes(e * AL_EXTENT)))
            .collect();
        let _ = writeln!(o, "    extents: {}", shown.join(", "));
        if ext.len() > 32 {
            let _ = writeln!(o, "    … and {} more", ext.len() - 32);
        }
    }
    for w in &ins.warnings {
        let _ = writeln!(o, "  warning: {w}");
    }
    o
}

/// The machine-readable form.
pub fn to_json(path: &Path, ins: &Inspection) -> serde_json::Value {
    let sb = &ins.superblock;
    let l = &sb.layout;
    let m = &sb.meta;
    let s = summary(ins);
    let mut al = ins.activity_log.clone();
    al.sort_unstable();
    json!({
        "path": path.display().to_string(),
        "format_version": super::format::VERSION,
        "slot": ins.slot,
        "seq": sb.seq,
        "resource": sb.resource,
        "resource_id": format!("{:#018x}", sb.resource_id),
        "node": sb.node,
        "node_id": sb.node_id,
        "size": l.size,
        "bitmap_block": l.bitmap_block,
        "al_extents": l.al_extents,
        "al_ring_blocks": l.al_ring_blocks,
        "current_gen": m.current_gen,
        "bitmap_gen": m.bitmap_gen,
        "history": m.history,
        "disk": format!("{:?}", m.disk),
        "primary": m.primary,
        "no_activity_log": m.no_activity_log,
        "resync_resumable": m.resync_resumable,
        "resync_end": m.resync_end.map(|e| json!({"gen": e.gen, "target_gens": e.target_gens})),
        "bitmap": {
            "bits": l.bitmap_bits(),
            "set_bits": s.set_bits,
            "out_of_sync_bytes": s.dirty_bytes,
            "ranges": s.ranges.iter().map(|(o, n)| json!({"offset": o, "len": n})).collect::<Vec<_>>(),
            "total_ranges": s.total_ranges,
        },
        "activity_log": {
            "seq": ins.al_seq,
            "extents": al,
            "extent_bytes": AL_EXTENT,
        },
        "warnings": ins.warnings,
    })
}

fn flags(m: &crate::core::Meta) -> String {
    let mut f = Vec::new();
    if m.primary {
        f.push("primary (saved while Primary: a restart counts as a crashed Primary)");
    }
    if m.no_activity_log {
        f.push(
            "no-activity-log (Primary with al-updates = false: a crash dirties the whole device)",
        );
    }
    if m.resync_resumable {
        f.push("resync-resumable (a sync target: the next connect resumes the resync)");
    }
    if f.is_empty() {
        "none".into()
    } else {
        f.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_across_words_and_stop_at_the_end() {
        let words = [1u64 << 63, 0b11, 0, u64::MAX];
        assert_eq!(runs(&words, 200), vec![(63, 3), (192, 8)]);
        assert_eq!(runs(&[0, 0], 128), vec![]);
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4 << 20), "4.0 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
