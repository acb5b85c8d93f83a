//! Resync planning on the sync source: which dirty region to read next, how many are in flight,
//! progress. The data path (reads, sends, acks, ordering against application writes) lives in
//! `Replica`; this type only decides *what* to move next.

use super::bitmap::Bitmap;

#[derive(Debug, Clone)]
pub struct ResyncSource {
    /// Next block to look at.
    cursor: u64,
    /// Chunks read or sent but not yet acked by the target: (first block, n blocks).
    in_flight: Vec<(u64, u64)>,
    window: usize,
    chunk_blocks: u64,
    /// Blocks to sync when the resync started (for progress).
    pub total: u64,
    pub full: bool,
}

impl ResyncSource {
    pub fn new(bm: &Bitmap, chunk_bytes: u64, window: usize, full: bool) -> ResyncSource {
        ResyncSource {
            cursor: 0,
            in_flight: Vec::new(),
            window: window.max(1),
            chunk_blocks: (chunk_bytes / bm.block_size()).max(1),
            total: bm.count(),
            full,
        }
    }

    fn busy(&self, first: u64, n: u64) -> bool {
        self.in_flight
            .iter()
            .any(|&(f, m)| first < f + m && f < first + n)
    }

    /// The next chunk to read, as a block range, if the window has room. The chunk is recorded
    /// as in flight until [`ResyncSource::acked`] or [`ResyncSource::abandon`].
    pub fn next_chunk(&mut self, bm: &Bitmap) -> Option<(u64, u64)> {
        if self.in_flight.len() >= self.window {
            return None;
        }
        loop {
            match bm.next_run(self.cursor, self.chunk_blocks) {
                Some((first, n)) => {
                    // Never send the same block twice at once; skip past a busy run.
                    let mut n2 = 0;
                    while n2 < n && !self.busy(first + n2, 1) {
                        n2 += 1;
                    }
                    if n2 == 0 {
                        self.cursor = first + 1;
                        continue;
                    }
                    self.cursor = first + n2;
                    self.in_flight.push((first, n2));
                    return Some((first, n2));
                }
                None if self.cursor > 0 && self.in_flight.is_empty() && !bm.is_clean() => {
                    // Bits set behind the cursor (e.g. a chunk that had to be retried).
                    self.cursor = 0;
                }
                None => return None,
            }
        }
    }

    /// The target acked the chunk starting at `first`.
    pub fn acked(&mut self, first: u64) -> bool {
        match self.in_flight.iter().position(|&(f, _)| f == first) {
            Some(i) => {
                self.in_flight.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// A chunk could not be read or sent; it stays dirty and will be retried.
    pub fn abandon(&mut self, first: u64) {
        self.acked(first);
    }

    /// Everything synced: nothing dirty and nothing in flight.
    pub fn finished(&self, bm: &Bitmap) -> bool {
        self.in_flight.is_empty() && bm.is_clean()
    }

    pub fn remaining(&self, bm: &Bitmap) -> u64 {
        bm.count()
    }
}

#[cfg(test)]
mod tests {
    use super::super::bitmap::BLOCK;
    use super::*;

    #[test]
    fn walks_dirty_runs_in_order_within_window() {
        let mut bm = Bitmap::new(64 * BLOCK, BLOCK);
        bm.set_bytes(0, 3 * BLOCK);
        bm.set_bytes(10 * BLOCK, 40 * BLOCK);
        let mut rs = ResyncSource::new(&bm, 16 * BLOCK, 2, false);
        assert_eq!(rs.total, 43);
        assert_eq!(rs.next_chunk(&bm), Some((0, 3)));
        assert_eq!(rs.next_chunk(&bm), Some((10, 16)));
        assert_eq!(rs.next_chunk(&bm), None, "window full");
        bm.clear_bytes(0, 3 * BLOCK);
        assert!(rs.acked(0));
        assert_eq!(rs.next_chunk(&bm), Some((26, 16)));
        rs.abandon(10); // read failed: stays dirty
        bm.clear_bytes(26 * BLOCK, 16 * BLOCK);
        rs.acked(26);
        assert_eq!(rs.next_chunk(&bm), Some((42, 8)));
        bm.clear_bytes(42 * BLOCK, 8 * BLOCK);
        rs.acked(42);
        // Wraps around to retry the abandoned chunk.
        assert_eq!(rs.next_chunk(&bm), Some((10, 16)));
        bm.clear_bytes(10 * BLOCK, 16 * BLOCK);
        rs.acked(10);
        assert_eq!(rs.next_chunk(&bm), None);
        assert!(rs.finished(&bm));
    }
}
