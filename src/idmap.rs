//! Hash maps and sets keyed by the integer ids this crate makes itself (request ids, I/O ids,
//! sequence numbers, extent numbers), with a multiply-and-rotate hasher (the `FxHash` scheme of
//! rustc and Firefox) instead of std's SipHash.
//!
//! Why: every replicated write goes in and out of about a dozen such maps across the core and
//! the driver (requests, in-flight I/O, acks awaited, the latency breakdown's stages). At 4 KiB
//! queue depth 32, SipHash was about 2 % of the Primary's CPU (`perf`), on the thread that bounds
//! that workload. SipHash's resistance to chosen keys buys nothing here: the keys are counters
//! this node assigns, or sequence numbers from a peer that authenticated with a pinned
//! certificate and is already trusted with the data.
//!
//! A fixed hasher also makes iteration order the same in every run, where `RandomState` changed
//! it per process. No meaning hangs on that order: where it reaches an output it is sorted first
//! (the activity log's transaction), or it orders requests that were concurrent anyway (the
//! writes a lost connection completes).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` for integer ids; create with `IdMap::default()`.
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
/// A `HashSet` for integer ids; create with `IdSet::default()`.
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

/// Golden-ratio multiplier: spreads consecutive ids over the high bits (hashbrown's control
/// bytes) and keeps the low bits (its bucket index) a bijection of the key's low bits.
const K: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl IdHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
    }
}

impl Hasher for IdHasher {
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    /// Other key types (not used for ids, but a `Hash` impl may call it): eight bytes at a time.
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn consecutive_ids_differ_in_low_and_high_bits() {
        let b = BuildHasherDefault::<IdHasher>::default();
        let hashes: Vec<u64> = (0u64..1024).map(|i| b.hash_one(i)).collect();
        // hashbrown indexes buckets with the low bits and tags them with the top 7.
        let low: IdSet<u64> = hashes.iter().map(|h| h & 1023).collect();
        assert_eq!(low.len(), 1024, "low 10 bits collide for consecutive ids");
        let top: IdSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(top.len() > 100, "top 7 bits take only {} values", top.len());
    }

    #[test]
    fn maps_behave_as_maps() {
        let mut m: IdMap<u64, u64> = IdMap::default();
        for i in 0..10_000u64 {
            m.insert(i * 4096, i);
        }
        for i in (0..10_000u64).step_by(2) {
            assert_eq!(m.remove(&(i * 4096)), Some(i));
        }
        assert_eq!(m.len(), 5_000);
        assert!((1..10_000u64).step_by(2).all(|i| m[&(i * 4096)] == i));
    }
}
