//! The in-memory dirty bitmap: one bit per block (4 KiB by default) of regions the peer may lack.
//! The next step persists it (meta/); this type stays the in-memory image.

/// Default bitmap granularity.
pub const BLOCK: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    blocks: u64,
    block_size: u64,
    set: u64,
}

impl Bitmap {
    /// A clean bitmap for a device of `size` bytes with `block_size`-byte bits.
    pub fn new(size: u64, block_size: u64) -> Bitmap {
        let block_size = block_size.max(1);
        let blocks = size.div_ceil(block_size);
        Bitmap {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            block_size,
            set: 0,
        }
    }
    pub fn block_size(&self) -> u64 {
        self.block_size
    }
    /// Number of bits (blocks).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }
    pub fn is_clean(&self) -> bool {
        self.set == 0
    }
    pub fn get(&self, block: u64) -> bool {
        block < self.blocks
            && self
                .words
                .get((block / 64) as usize)
                .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }
    fn put(&mut self, block: u64, v: bool) {
        if block >= self.blocks {
            return;
        }
        if let Some(w) = self.words.get_mut((block / 64) as usize) {
            let m = 1u64 << (block % 64);
            let was = *w & m != 0;
            if v && !was {
                *w |= m;
                self.set += 1;
            } else if !v && was {
                *w &= !m;
                self.set -= 1;
            }
        }
    }
    /// Blocks touched by the byte range (partial blocks included).
    pub fn block_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.block_size;
        let end = offset.saturating_add(len).div_ceil(self.block_size);
        first.min(self.blocks)..end.min(self.blocks)
    }
    /// Marks every block touched by the byte range dirty.
    pub fn set_bytes(&mut self, offset: u64, len: u64) {
        for b in self.block_range(offset, len) {
            self.put(b, true);
        }
    }
    /// Clears the blocks fully covered... and partially covered: callers clear exactly the
    /// block-aligned ranges they resynced.
    pub fn clear_bytes(&mut self, offset: u64, len: u64) {
        for b in self.block_range(offset, len) {
            self.put(b, false);
        }
    }
    pub fn set_all(&mut self) {
        for b in 0..self.blocks {
            self.put(b, true);
        }
    }
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.set = 0;
    }
    /// The first run of set bits starting at or after `from`, at most `max` blocks long:
    /// `(first_block, n_blocks)`.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut b = from;
        while b < self.blocks {
            let w = *self.words.get((b / 64) as usize)?;
            let masked = w >> (b % 64);
            if masked == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += masked.trailing_zeros() as u64;
            break;
        }
        if b >= self.blocks {
            return None;
        }
        let mut n = 0;
        while n < max.max(1) && self.get(b + n) {
            n += 1;
        }
        Some((b, n))
    }
    /// ORs `other` (same geometry) into self.
    pub fn merge(&mut self, other: &Bitmap) {
        for b in 0..self.blocks.min(other.blocks) {
            if other.get(b) {
                self.put(b, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_and_runs() {
        let mut bm = Bitmap::new(300 * BLOCK + 10, BLOCK);
        assert_eq!(bm.blocks(), 301);
        bm.set_bytes(4095, 2); // straddles blocks 0 and 1
        assert!(bm.get(0) && bm.get(1) && !bm.get(2));
        bm.set_bytes(200 * BLOCK, 70 * BLOCK);
        assert_eq!(bm.count(), 72);
        assert_eq!(bm.next_run(0, 16), Some((0, 2)));
        assert_eq!(bm.next_run(2, 16), Some((200, 16)));
        assert_eq!(bm.next_run(260, 100), Some((260, 10)));
        assert_eq!(bm.next_run(270, 100), None);
        bm.clear_bytes(0, 2 * BLOCK);
        assert_eq!(bm.count(), 70);
        bm.set_bytes(u64::MAX - 5, 100); // out of range: ignored, no panic
        bm.set_bytes(300 * BLOCK, 1 << 40);
        assert!(bm.get(300));
        bm.set_all();
        assert_eq!(bm.count(), 301);
        bm.clear_all();
        assert!(bm.is_clean());
    }

    #[test]
    fn merge_is_union() {
        let mut a = Bitmap::new(128 * BLOCK, BLOCK);
        let mut b = a.clone();
        a.set_bytes(0, BLOCK);
        b.set_bytes(64 * BLOCK, BLOCK);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert!(a.get(64));
    }
}
