//! The in-memory dirty bitmap: one bit per block (4 KiB by default) of regions the peer may lack.
//! It also remembers which words changed since they were last persisted, so the core can emit
//! `SaveBitmap` for just those.

use std::collections::BTreeSet;

/// Default bitmap granularity.
pub const BLOCK: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    blocks: u64,
    block_size: u64,
    set: u64,
    /// Word indices changed since the last [`Bitmap::take_unsaved`].
    unsaved: BTreeSet<u64>,
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
            unsaved: BTreeSet::new(),
        }
    }
    /// The raw words (bit `i` of word `w` = block `64 * w + i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }
    /// Loads persisted words (ORed in; words or bits beyond the device are ignored). The loaded
    /// state counts as saved.
    pub fn load_words(&mut self, words: &[u64]) {
        let tail = self.blocks % 64;
        let last = self.words.len().saturating_sub(1);
        for (i, (mine, &v)) in self.words.iter_mut().zip(words).enumerate() {
            let mask = if i == last && tail != 0 {
                (1u64 << tail) - 1
            } else {
                u64::MAX
            };
            let new = *mine | (v & mask);
            self.set += (new.count_ones() - mine.count_ones()) as u64;
            *mine = new;
        }
        self.unsaved.clear();
    }
    /// Number of words changed since they were last persisted.
    pub fn unsaved_count(&self) -> usize {
        self.unsaved.len()
    }
    /// Marks the words covering blocks `range` as needing persistence.
    pub fn mark_unsaved(&mut self, range: std::ops::Range<u64>) {
        if range.is_empty() {
            return;
        }
        let last = (range.end - 1).min(self.blocks.saturating_sub(1)) / 64;
        for w in range.start / 64..=last {
            self.unsaved.insert(w);
        }
    }
    /// Takes the changed words among `[first_word, end_word)` as contiguous runs
    /// `(first_word, words)`, and counts them as saved.
    pub fn take_unsaved(&mut self, first_word: u64, end_word: u64) -> Vec<(u64, Vec<u64>)> {
        let picked: Vec<u64> = self.unsaved.range(first_word..end_word).copied().collect();
        let mut runs: Vec<(u64, Vec<u64>)> = Vec::new();
        for w in picked {
            self.unsaved.remove(&w);
            let v = self.words.get(w as usize).copied().unwrap_or(0);
            match runs.last_mut() {
                Some((f, ws)) if *f + ws.len() as u64 == w => ws.push(v),
                _ => runs.push((w, vec![v])),
            }
        }
        runs
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
                self.unsaved.insert(block / 64);
            } else if !v && was {
                *w &= !m;
                self.set -= 1;
                self.unsaved.insert(block / 64);
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
        for (i, w) in self.words.iter_mut().enumerate() {
            if *w != 0 {
                self.unsaved.insert(i as u64);
            }
            *w = 0;
        }
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
    fn unsaved_words_come_out_as_runs() {
        let mut bm = Bitmap::new(64 * 10 * BLOCK, BLOCK);
        bm.set_bytes(0, BLOCK);
        bm.set_bytes(64 * BLOCK, BLOCK);
        bm.set_bytes(5 * 64 * BLOCK, BLOCK);
        assert_eq!(bm.unsaved_count(), 3);
        assert_eq!(bm.take_unsaved(1, 10), vec![(1, vec![1]), (5, vec![1])]);
        assert_eq!(bm.take_unsaved(0, 10), vec![(0, vec![1])]);
        assert_eq!(bm.unsaved_count(), 0);
        bm.set_bytes(0, BLOCK); // no change: nothing to save
        assert_eq!(bm.unsaved_count(), 0);
        let mut other = Bitmap::new(64 * 10 * BLOCK, BLOCK);
        other.load_words(bm.words());
        assert_eq!(other.count(), 3);
        assert_eq!(other.unsaved_count(), 0);
        other.load_words(&[u64::MAX; 20]); // longer than the device: ignored, no panic
        assert_eq!(other.count(), 640);
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
