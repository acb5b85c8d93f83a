//! A simulated disk with a volatile write cache: completed writes are visible at once but only
//! stable after a flush (or FUA); a crash keeps a random subset of the cached blocks.

use super::rng::Rng;

pub const BS: usize = 4096;

pub struct SimDisk {
    pub volatile: Vec<u8>,
    pub durable: Vec<u8>,
    /// Cached (not yet stable) block writes, oldest first: (completion number, block,
    /// contents).
    cache: Vec<(u64, usize, Vec<u8>)>,
    /// Block writes completed so far, numbering the cache's entries: a flush makes stable the
    /// ones completed before it was issued ([`SimDisk::flush_upto`]).
    completed: u64,
    /// Writes in flight: (io, offset, len), to check the core never overlaps two.
    pub writes_in_flight: Vec<(u64, u64, u64)>,
    /// A flush failed: every later one fails too, until the node restarts (the disk layer's
    /// sticky error; Linux itself would report the write-back error only once).
    pub flush_failed: bool,
}

impl SimDisk {
    pub fn new(blocks: usize) -> SimDisk {
        SimDisk {
            volatile: vec![0; blocks * BS],
            durable: vec![0; blocks * BS],
            cache: Vec::new(),
            completed: 0,
            writes_in_flight: Vec::new(),
            flush_failed: false,
        }
    }
    /// Every block content a crash could leave behind: the durable image and each cached
    /// (unflushed) write.
    pub fn crash_candidates(&self) -> impl Iterator<Item = &[u8]> {
        self.durable
            .chunks(BS)
            .chain(self.cache.iter().map(|(_, _, c)| c.as_slice()))
    }
    pub fn block(img: &[u8], b: usize) -> &[u8] {
        &img[b * BS..(b + 1) * BS]
    }
    /// Applies a completed write (byte range must be block aligned in the simulation).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        let off = offset as usize;
        self.volatile[off..off + data.len()].copy_from_slice(data);
        for (i, chunk) in data.chunks(BS).enumerate() {
            let b = off / BS + i;
            if fua {
                self.cache.retain(|(_, cb, _)| *cb != b);
                self.durable[b * BS..(b + 1) * BS].copy_from_slice(chunk);
            } else {
                self.completed += 1;
                self.cache.push((self.completed, b, chunk.to_vec()));
            }
        }
    }
    pub fn zero(&mut self, offset: u64, len: u64) {
        let z = vec![0u8; len as usize];
        self.write(offset, &z, false);
    }
    /// A discard as a device may execute it: per block (`how`), 0 leaves the old contents,
    /// 1 reads zeroes afterwards, 2 leaves bytes no write put there.
    pub fn discard(&mut self, offset: u64, len: u64, how: &[u8]) {
        let first = offset as usize / BS;
        for (i, &h) in how.iter().enumerate().take((len as usize).div_ceil(BS)) {
            let b = (first + i) * BS;
            match h {
                0 => {}
                1 => self.write(b as u64, &[0u8; BS], false),
                _ => {
                    let mut stale = vec![0xeeu8; BS];
                    stale[..8].copy_from_slice(&(0xdead_0000_u64 + i as u64).to_le_bytes());
                    self.write(b as u64, &stale, false);
                }
            }
        }
    }
    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.volatile[offset as usize..(offset + len) as usize].to_vec()
    }
    /// Makes every completed write stable (a flush issued now and completing at once).
    pub fn flush(&mut self) {
        self.flush_upto(self.completed);
    }
    /// Where a flush issued now stands: it covers the writes completed so far.
    pub fn completed(&self) -> u64 {
        self.completed
    }
    /// A flush issued when `upto` writes had completed completes: those are stable, the ones
    /// completed while it ran may still be lost (the driver contract: `DiskFlush` covers what
    /// completed before it was issued, and no more; a flush that also covered later writes
    /// would hide a core that issues it before a write it must cover completed).
    pub fn flush_upto(&mut self, upto: u64) {
        let mut kept = Vec::with_capacity(self.cache.len());
        for (n, b, data) in self.cache.drain(..) {
            if n <= upto {
                self.durable[b * BS..(b + 1) * BS].copy_from_slice(&data);
            } else {
                kept.push((n, b, data));
            }
        }
        self.cache = kept;
    }
    /// A flush failed: the cached writes were written back or dropped, each as it happened
    /// (reads now return what the device holds, maybe older data), and the error is sticky.
    pub fn fail_flush(&mut self, rng: &mut Rng) {
        for (_, b, data) in self.cache.drain(..) {
            if rng.one_in(2) {
                self.durable[b * BS..(b + 1) * BS].copy_from_slice(&data);
            }
        }
        self.volatile = self.durable.clone();
        self.flush_failed = true;
    }
    /// Power loss: each cached block write independently survives or not.
    pub fn crash(&mut self, rng: &mut Rng) {
        self.flush_failed = false;
        for (_, b, data) in self.cache.drain(..) {
            if rng.one_in(2) {
                self.durable[b * BS..(b + 1) * BS].copy_from_slice(&data);
            }
        }
        self.volatile = self.durable.clone();
        self.writes_in_flight.clear();
    }
}
