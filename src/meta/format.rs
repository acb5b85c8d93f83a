//! The on-disk layout of the metadata area as a pure codec: bytes in, values out, no I/O.
//!
//! ```text
//! offset 0         superblock slot 0 (4 KiB)
//! offset 4096      superblock slot 1 (4 KiB)
//! offset 8192      bitmap: little-endian u64 words (bit i of word w = block 64w+i), padded to 4 KiB
//! al_offset        activity-log ring: `al_ring_blocks` blocks of 4 KiB, one transaction each
//! ```
//!
//! Superblock slot (all integers little-endian):
//!
//! ```text
//!   0  magic "TWBLKMD\0"        8  format version u32     12  crc32 of the slot (field zeroed)
//!  16  sequence u64            24  resource id u64       32  node id u64
//!  40  device size u64         48  bitmap block u64      56  al extents u32   60  al ring u32
//!  64  resource name (u8 length + 63 bytes)             128  node name (u8 length + 63 bytes)
//! 192  u16 length + the core's `Meta`, postcard, then one flags byte:
//!      bit 0 = `Meta::no_activity_log` (Primary with `al-updates = false`)
//!      bit 1 = `Meta::resync_resumable` (a resync target whose source marked what it lacks)
//!      bit 2 = `Meta::resync_end` is set: its three u64s follow the flags byte
//!              (`gen`, `target_gens[0]`, `target_gens[1]`)
//! ```
//!
//! The flags byte was zero in every slot written before it existed (the slot is zero-filled),
//! so those read as "activity log in use", "resync starts over", "no resync end to resume".
//! A build that knows none of the bits ignores them (and the bytes after): each is safe to
//! lose (a full resync instead of a partial one).
//!
//! An update writes `seq + 1` to the slot *not* in effect: a torn write damages only the slot
//! being written, and the valid slot with the highest sequence wins.
//!
//! Activity-log transaction (4 KiB block `seq % al_ring_blocks`):
//!
//! ```text
//!   0  sequence u64 (0 = never written)   8  crc32   12  count u16   14  extent numbers
//! ```
//!
//! Extent numbers are 3 bytes wide when the device has at most 2^24 extents of 4 MiB (64 TiB),
//! else 4 (the largest device has 2^32), so that the default 1024 extents fit in one block. The crc covers the resource id
//! first, so transactions left by an earlier `create-md --force` on the same file never count.
//!
//! Magic and version stay at offsets 0 and 8 in every future format, so a newer format is
//! recognised as such instead of as corruption.

use crate::core::{Meta, ResyncEnd, AL_EXTENT};

/// Every piece of the area is aligned to, and the slots and AL blocks are, this size.
pub const BLOCK: usize = 4096;
const BLOCK_U64: u64 = BLOCK as u64;
pub const MAGIC: [u8; 8] = *b"TWBLKMD\0";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
pub const DEFAULT_BITMAP_BLOCK: u64 = 4096;
pub const MIN_BITMAP_BLOCK: u64 = 4096;
pub const MAX_BITMAP_BLOCK: u64 = 1 << 20;
pub const DEFAULT_AL_EXTENTS: u32 = 1024;
/// Transactions in the AL ring: more than two only spreads the writes.
pub const DEFAULT_AL_RING: u32 = 16;
const MAX_AL_RING: u32 = 1024;
/// Largest device (16 PiB): extent numbers fit in 4 bytes, and every offset computation stays
/// far from overflow.
pub const MAX_SIZE: u64 = 1 << 54;
/// Longest resource or node name (the resource file allows 63).
pub const MAX_NAME: usize = 63;

const SB_CRC: usize = 12;
const SB_NAMES: usize = 64;
const SB_META: usize = 192;
const AL_HEADER: usize = 14;
/// The three u64s of `Meta::resync_end` after the flags byte.
const RESYNC_END_LEN: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> FormatError {
    FormatError::Invalid(s.into())
}

/// Geometry of the area, fixed at `create-md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Device size in bytes.
    pub size: u64,
    /// Bytes per bitmap bit.
    pub bitmap_block: u64,
    /// Most extents one activity-log transaction names.
    pub al_extents: u32,
    /// Transactions in the activity-log ring.
    pub al_ring_blocks: u32,
}

impl Layout {
    /// A checked layout with the default AL ring.
    pub fn new(size: u64, bitmap_block: u64, al_extents: u32) -> Result<Layout, FormatError> {
        let l = Layout {
            size,
            bitmap_block,
            al_extents,
            al_ring_blocks: DEFAULT_AL_RING,
        };
        l.check()?;
        Ok(l)
    }

    /// Refuses geometry this build cannot lay out (also guards decoding: every later
    /// computation on a checked layout stays in range).
    pub fn check(&self) -> Result<(), FormatError> {
        if self.size == 0 || self.size > MAX_SIZE {
            return Err(invalid(format!(
                "device size {} bytes is out of range (1 byte to {MAX_SIZE})",
                self.size
            )));
        }
        if !self.bitmap_block.is_power_of_two()
            || !(MIN_BITMAP_BLOCK..=MAX_BITMAP_BLOCK).contains(&self.bitmap_block)
        {
            return Err(invalid(format!(
                "bitmap block {} bytes is not a power of two between 4K and 1M",
                self.bitmap_block
            )));
        }
        let cap = self.al_capacity();
        if self.al_extents == 0 || self.al_extents > cap {
            return Err(invalid(format!(
                "{} activity-log extents do not fit in one 4 KiB transaction; give 1 to {cap}",
                self.al_extents
            )));
        }
        if !(2..=MAX_AL_RING).contains(&self.al_ring_blocks) {
            return Err(invalid(format!(
                "an activity-log ring of {} transactions is out of range (2 to {MAX_AL_RING})",
                self.al_ring_blocks
            )));
        }
        Ok(())
    }

    /// Bits in the bitmap.
    pub fn bitmap_bits(&self) -> u64 {
        self.size.div_ceil(self.bitmap_block)
    }
    /// Bitmap words (as [`crate::core::bitmap::Bitmap`] holds them).
    pub fn bitmap_words(&self) -> u64 {
        self.bitmap_bits().div_ceil(64)
    }
    pub fn bitmap_offset(&self) -> u64 {
        2 * BLOCK_U64
    }
    /// Bytes reserved for the bitmap (a multiple of 4 KiB).
    pub fn bitmap_area(&self) -> u64 {
        (self.bitmap_words() * 8).div_ceil(BLOCK_U64) * BLOCK_U64
    }
    pub fn al_offset(&self) -> u64 {
        self.bitmap_offset() + self.bitmap_area()
    }
    /// Where the transaction with sequence `seq` goes.
    pub fn al_block_offset(&self, seq: u64) -> u64 {
        self.al_offset() + (seq % u64::from(self.al_ring_blocks.max(1))) * BLOCK_U64
    }
    /// Bytes the whole area needs.
    pub fn total_len(&self) -> u64 {
        self.al_offset() + u64::from(self.al_ring_blocks) * BLOCK_U64
    }
    /// Extents of [`AL_EXTENT`] bytes on the device.
    pub fn extents(&self) -> u64 {
        self.size.div_ceil(AL_EXTENT)
    }
    fn al_width(&self) -> usize {
        if self.extents() <= 1 << 24 {
            3
        } else {
            4
        }
    }
    /// Most extent numbers one transaction can hold for this device.
    pub fn al_capacity(&self) -> u32 {
        ((BLOCK - AL_HEADER) / self.al_width()) as u32
    }
}

/// One superblock slot's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Update sequence: the valid slot with the highest wins.
    pub seq: u64,
    /// Random, chosen at `create-md` (each node has its own): for dump-md and debugging.
    pub resource_id: u64,
    pub resource: String,
    pub node_id: u64,
    pub node: String,
    pub layout: Layout,
    pub meta: Meta,
}

fn put_name(buf: &mut [u8], at: usize, name: &str, what: &str) -> Result<(), FormatError> {
    let b = name.as_bytes();
    if b.len() > MAX_NAME {
        return Err(invalid(format!(
            "{what} name {name:?} is longer than {MAX_NAME} bytes"
        )));
    }
    buf[at] = b.len() as u8;
    buf[at + 1..at + 1 + b.len()].copy_from_slice(b);
    Ok(())
}

fn get_name(buf: &[u8], at: usize) -> Option<String> {
    let len = usize::from(*buf.get(at)?);
    if len > MAX_NAME {
        return None;
    }
    let b = buf.get(at + 1..at + 1 + len)?;
    String::from_utf8(b.to_vec()).ok()
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

fn crc_without(buf: &[u8], crc_at: usize, salt: Option<u64>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if let Some(s) = salt {
        h.update(&s.to_le_bytes());
    }
    h.update(&buf[..crc_at]);
    h.update(&[0; 4]);
    h.update(&buf[crc_at + 4..]);
    h.finalize()
}

/// Encodes one 4 KiB superblock slot.
pub fn encode_superblock(sb: &Superblock) -> Result<Vec<u8>, FormatError> {
    sb.layout.check()?;
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&sb.seq.to_le_bytes());
    b[24..32].copy_from_slice(&sb.resource_id.to_le_bytes());
    b[32..40].copy_from_slice(&sb.node_id.to_le_bytes());
    b[40..48].copy_from_slice(&sb.layout.size.to_le_bytes());
    b[48..56].copy_from_slice(&sb.layout.bitmap_block.to_le_bytes());
    b[56..60].copy_from_slice(&sb.layout.al_extents.to_le_bytes());
    b[60..64].copy_from_slice(&sb.layout.al_ring_blocks.to_le_bytes());
    put_name(&mut b, SB_NAMES, &sb.resource, "resource")?;
    put_name(&mut b, SB_NAMES + 64, &sb.node, "node")?;
    let meta = postcard::to_stdvec(&sb.meta)
        .map_err(|e| invalid(format!("cannot encode the metadata: {e}")))?;
    if meta.len() > BLOCK - SB_META - 3 - RESYNC_END_LEN {
        return Err(invalid("the metadata does not fit in a superblock slot"));
    }
    b[SB_META..SB_META + 2].copy_from_slice(&(meta.len() as u16).to_le_bytes());
    b[SB_META + 2..SB_META + 2 + meta.len()].copy_from_slice(&meta);
    let flags_at = SB_META + 2 + meta.len();
    b[flags_at] = u8::from(sb.meta.no_activity_log)
        | u8::from(sb.meta.resync_resumable) << 1
        | u8::from(sb.meta.resync_end.is_some()) << 2;
    if let Some(end) = sb.meta.resync_end {
        let words = [end.gen, end.target_gens[0], end.target_gens[1]];
        for (i, w) in words.iter().enumerate() {
            let at = flags_at + 1 + 8 * i;
            b[at..at + 8].copy_from_slice(&w.to_le_bytes());
        }
    }
    let crc = crc_without(&b, SB_CRC, None);
    b[SB_CRC..SB_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// What one superblock slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Valid(Superblock),
    /// All zero: never written.
    Blank,
    /// No twinblk magic.
    Foreign,
    /// A twinblk superblock of a newer format.
    Newer(u32),
    /// twinblk magic, but unusable (torn write, bit rot): why.
    Damaged(String),
}

/// Decodes one slot. Never panics, whatever the bytes.
pub fn decode_slot(buf: &[u8]) -> Slot {
    if buf.len() != BLOCK {
        return Slot::Damaged(format!("slot is {} bytes, not {BLOCK}", buf.len()));
    }
    if buf.iter().all(|&b| b == 0) {
        return Slot::Blank;
    }
    if buf[0..8] != MAGIC {
        return Slot::Foreign;
    }
    let version = u32_at(buf, 8).unwrap_or(0);
    if version > VERSION {
        return Slot::Newer(version);
    }
    if version != VERSION {
        return Slot::Damaged(format!("unknown format version {version}"));
    }
    let stored = u32_at(buf, SB_CRC).unwrap_or(0);
    let crc = crc_without(buf, SB_CRC, None);
    if stored != crc {
        return Slot::Damaged(format!(
            "checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"
        ));
    }
    match decode_checked(buf) {
        Ok(sb) => Slot::Valid(sb),
        Err(e) => Slot::Damaged(e),
    }
}

fn decode_checked(buf: &[u8]) -> Result<Superblock, String> {
    let short = || "slot too short".to_string();
    let layout = Layout {
        size: u64_at(buf, 40).ok_or_else(short)?,
        bitmap_block: u64_at(buf, 48).ok_or_else(short)?,
        al_extents: u32_at(buf, 56).ok_or_else(short)?,
        al_ring_blocks: u32_at(buf, 60).ok_or_else(short)?,
    };
    layout.check().map_err(|e| e.to_string())?;
    let resource = get_name(buf, SB_NAMES).ok_or("bad resource name")?;
    let node = get_name(buf, SB_NAMES + 64).ok_or("bad node name")?;
    let mlen = usize::from(u16::from_le_bytes(
        buf.get(SB_META..SB_META + 2)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?,
    ));
    let mbytes = buf
        .get(SB_META + 2..SB_META + 2 + mlen)
        .ok_or("metadata length past the slot")?;
    let mut meta: Meta = postcard::from_bytes(mbytes).map_err(|e| format!("metadata: {e}"))?;
    let flags = buf.get(SB_META + 2 + mlen).copied().unwrap_or(0);
    meta.no_activity_log = flags & 1 != 0;
    meta.resync_resumable = flags & 2 != 0;
    if flags & 4 != 0 {
        let end_at = SB_META + 2 + mlen + 1;
        let word = |i: usize| u64_at(buf, end_at + 8 * i).ok_or("resync end past the slot");
        meta.resync_end = Some(ResyncEnd {
            gen: word(0)?,
            target_gens: [word(1)?, word(2)?],
        });
    }
    Ok(Superblock {
        seq: u64_at(buf, 16).ok_or_else(short)?,
        resource_id: u64_at(buf, 24).ok_or_else(short)?,
        resource,
        node_id: u64_at(buf, 32).ok_or_else(short)?,
        node,
        layout,
        meta,
    })
}

/// Why no superblock could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("no twinblk superblock")]
    NotMetadata,
    #[error("format version {0}")]
    Newer(u32),
    #[error("{0}")]
    Corrupt(String),
}

/// The superblock in effect: the valid slot with the highest sequence. Returns it, its slot
/// index, and a note when the other slot is unusable (a torn last update: not fatal).
pub fn pick(slots: &[Slot; 2]) -> Result<(Superblock, usize, Option<String>), PickError> {
    // A newer build wrote here: using the older slot would roll its state back.
    for s in slots {
        if let Slot::Newer(v) = s {
            return Err(PickError::Newer(*v));
        }
    }
    let describe = |s: &Slot| match s {
        Slot::Valid(_) => "valid".to_string(),
        Slot::Blank => "blank".to_string(),
        Slot::Foreign => "not a twinblk superblock".to_string(),
        Slot::Newer(v) => format!("format version {v}"),
        Slot::Damaged(why) => why.clone(),
    };
    match slots {
        [Slot::Valid(a), Slot::Valid(b)] => {
            if b.seq > a.seq {
                Ok((b.clone(), 1, None))
            } else {
                Ok((a.clone(), 0, None))
            }
        }
        [Slot::Valid(a), other] => Ok((
            a.clone(),
            0,
            Some(format!(
                "superblock slot 1 is unusable ({})",
                describe(other)
            )),
        )),
        [other, Slot::Valid(b)] => Ok((
            b.clone(),
            1,
            Some(format!(
                "superblock slot 0 is unusable ({})",
                describe(other)
            )),
        )),
        [Slot::Blank | Slot::Foreign, Slot::Blank | Slot::Foreign] => Err(PickError::NotMetadata),
        [a, b] => Err(PickError::Corrupt(format!(
            "both superblock slots are unusable: slot 0: {}; slot 1: {}",
            describe(a),
            describe(b)
        ))),
    }
}

/// Encodes one activity-log transaction (a 4 KiB block for [`Layout::al_block_offset`]).
pub fn encode_al(
    layout: &Layout,
    resource_id: u64,
    seq: u64,
    extents: &[u64],
) -> Result<Vec<u8>, FormatError> {
    if seq == 0 {
        return Err(invalid("activity-log sequence 0 is reserved"));
    }
    // `al_extents` is the log's size; the core lets it grow past it only when nothing pinned
    // could ever let go (one write spanning more extents than the log holds), so a transaction
    // holds up to what fits in its block.
    if extents.len() > layout.al_capacity() as usize {
        return Err(invalid(format!(
            "{} activity-log extents, one transaction holds at most {}",
            extents.len(),
            layout.al_capacity()
        )));
    }
    let w = layout.al_width();
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(&seq.to_le_bytes());
    b[12..14].copy_from_slice(&(extents.len() as u16).to_le_bytes());
    for (i, &e) in extents.iter().enumerate() {
        if e >= layout.extents() {
            return Err(invalid(format!(
                "activity-log extent {e} is past the device's {} extents",
                layout.extents()
            )));
        }
        let at = AL_HEADER + i * w;
        b[at..at + w].copy_from_slice(&e.to_le_bytes()[..w]);
    }
    let crc = crc_without(&b, 8, Some(resource_id));
    b[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// One activity-log block, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlBlock {
    /// Never written (sequence 0, all zero).
    Empty,
    Valid {
        seq: u64,
        extents: Vec<u64>,
    },
    /// Unusable (torn write, left by older metadata, bit rot): why.
    Damaged(String),
}

/// Decodes one activity-log block. Never panics, whatever the bytes.
pub fn decode_al(layout: &Layout, resource_id: u64, buf: &[u8]) -> AlBlock {
    if buf.len() != BLOCK {
        return AlBlock::Damaged(format!("block is {} bytes, not {BLOCK}", buf.len()));
    }
    if buf.iter().all(|&b| b == 0) {
        return AlBlock::Empty;
    }
    let seq = u64_at(buf, 0).unwrap_or(0);
    let stored = u32_at(buf, 8).unwrap_or(0);
    if seq == 0 || stored != crc_without(buf, 8, Some(resource_id)) {
        return AlBlock::Damaged("checksum mismatch".into());
    }
    let count = usize::from(u16::from_le_bytes([buf[12], buf[13]]));
    if count > layout.al_capacity() as usize {
        return AlBlock::Damaged(format!(
            "names {count} extents, more than the {} a transaction holds",
            layout.al_capacity()
        ));
    }
    let w = layout.al_width();
    let mut extents = Vec::with_capacity(count);
    for i in 0..count {
        let at = AL_HEADER + i * w;
        let Some(bytes) = buf.get(at..at + w) else {
            return AlBlock::Damaged("extent list past the block".into());
        };
        let mut le = [0u8; 8];
        le[..w].copy_from_slice(bytes);
        let e = u64::from_le_bytes(le);
        if e >= layout.extents() {
            return AlBlock::Damaged(format!("extent {e} is past the device"));
        }
        extents.push(e);
    }
    AlBlock::Valid { seq, extents }
}

/// The activity log in effect: the valid transaction with the highest sequence, as
/// `(seq, extents)`, plus a note per damaged block (its index and why). `None` when no block is
/// valid.
pub fn pick_al(blocks: &[AlBlock]) -> (Option<(u64, Vec<u64>)>, Vec<String>) {
    let mut best: Option<(u64, &Vec<u64>)> = None;
    let mut notes = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        match b {
            AlBlock::Valid { seq, extents } => {
                if best.map_or(true, |(s, _)| *seq > s) {
                    best = Some((*seq, extents));
                }
            }
            AlBlock::Damaged(why) => notes.push(format!("activity-log block {i}: {why}")),
            AlBlock::Empty => {}
        }
    }
    (best.map(|(s, e)| (s, e.clone())), notes)
}

/// Bitmap words as stored (little-endian).
pub fn encode_words(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// Bitmap words from stored bytes (a trailing partial word is ignored).
pub fn decode_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

#[cfg(test)]
mod tests;
