//! The activity log: which extents (of [`Config::al_extent`](super::Config) bytes) may hold
//! writes the peer has not acked. Pure LRU bookkeeping; the `Replica` decides what is pinned and
//! emits the persistence actions.
//!
//! Why it exists: a Primary that crashes loses its in-memory bitmap. What it had persisted plus
//! every extent named by its last activity-log transaction covers every block it changed that
//! the peer may lack, so the resync after a crash is bounded by the log, not by the device.
//! A write to an already-active extent costs one hash lookup; only the first write to an
//! inactive extent costs a transaction (and, when the log is full, an eviction).

use crate::idmap::IdMap;

#[derive(Debug, Clone)]
pub struct ActivityLog {
    capacity: usize,
    /// extent -> last-use stamp (larger = more recent).
    active: IdMap<u64, u64>,
    tick: u64,
}

/// What activating a range needs persisted before its write may go to the disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transaction {
    /// Extents evicted to make room: persist their bitmap words first.
    pub evicted: Vec<u64>,
}

impl ActivityLog {
    pub fn new(capacity: usize) -> ActivityLog {
        ActivityLog {
            capacity: capacity.max(1),
            active: IdMap::default(),
            tick: 0,
        }
    }

    /// A log holding the extents of the last persisted transaction (oldest first, as if used
    /// in that order).
    pub fn restored(capacity: usize, extents: &[u64]) -> ActivityLog {
        let mut al = ActivityLog::new(capacity);
        for &e in extents {
            al.tick += 1;
            al.active.insert(e, al.tick);
        }
        al
    }

    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    pub fn contains(&self, extent: u64) -> bool {
        self.active.contains_key(&extent)
    }

    /// The active extents, sorted (the content of a transaction).
    pub fn extents(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.active.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Makes `extents` active and most recently used. `None` when all were active already (no
    /// transaction needed: the hot path). Otherwise the caller must persist the evicted extents'
    /// bitmap words, then the new set ([`ActivityLog::extents`]), before the write.
    ///
    /// Eviction takes the least recently used extents that are not `pinned` (writes in flight
    /// or not yet acked by the peer) and not among `extents`. When everything is pinned the log
    /// grows past its capacity: the `Replica` asks only for what fits (writes wait for room) and
    /// lets it grow only when nothing pinned could ever let go, so progress never depends on it.
    pub fn activate(
        &mut self,
        extents: std::ops::RangeInclusive<u64>,
        pinned: impl Fn(u64) -> bool,
    ) -> Option<Transaction> {
        let v: Vec<u64> = extents.collect();
        self.activate_set(&v, pinned)
    }

    /// [`ActivityLog::activate`] for any set of extents: one transaction for all of them (group
    /// commit: the extents every waiting write misses).
    pub fn activate_set(
        &mut self,
        extents: &[u64],
        pinned: impl Fn(u64) -> bool,
    ) -> Option<Transaction> {
        let mut missing = false;
        for &e in extents {
            self.tick += 1;
            match self.active.get_mut(&e) {
                Some(t) => *t = self.tick,
                None => {
                    missing = true;
                    self.active.insert(e, self.tick);
                }
            }
        }
        if !missing {
            return None;
        }
        let mut evicted = Vec::new();
        if self.active.len() > self.capacity {
            let mut cands: Vec<(u64, u64)> = self
                .active
                .iter()
                .filter(|(e, _)| !extents.contains(e))
                .map(|(&e, &t)| (t, e))
                .collect();
            cands.sort_unstable();
            for (_, e) in cands {
                if self.active.len() <= self.capacity {
                    break;
                }
                if pinned(e) {
                    continue;
                }
                self.active.remove(&e);
                evicted.push(e);
            }
        }
        Some(Transaction { evicted })
    }

    /// Marks `extent` most recently used if it is active (the hot path: no transaction).
    pub fn touch(&mut self, extent: u64) {
        if let Some(t) = self.active.get_mut(&extent) {
            self.tick += 1;
            *t = self.tick;
        }
    }

    /// Forgets `extent` (a transaction that would have named it failed: it is not durable).
    pub fn remove(&mut self, extent: u64) {
        self.active.remove(&extent);
    }

    /// Drops every extent that is not `pinned` (e.g. after a clean shutdown or once the peer
    /// has everything). Returns the removed extents; empty = no transaction needed.
    pub fn shrink(&mut self, pinned: impl Fn(u64) -> bool) -> Vec<u64> {
        let gone: Vec<u64> = self
            .active
            .keys()
            .copied()
            .filter(|&e| !pinned(e))
            .collect();
        for e in &gone {
            self.active.remove(e);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_extents_cost_nothing_and_lru_evicts_unpinned() {
        let mut al = ActivityLog::new(2);
        assert_eq!(al.activate(0..=0, |_| false), Some(Transaction::default()));
        assert_eq!(al.activate(0..=0, |_| false), None, "already active");
        assert_eq!(al.activate(1..=1, |_| false), Some(Transaction::default()));
        assert_eq!(al.activate(0..=0, |_| false), None);
        // 1 is now least recently used.
        let t = al.activate(2..=2, |_| false).unwrap();
        assert_eq!(t.evicted, vec![1]);
        assert_eq!(al.extents(), vec![0, 2]);
        // 0 is LRU but pinned: 2 goes instead.
        let t = al.activate(3..=3, |e| e == 0).unwrap();
        assert_eq!(t.evicted, vec![2]);
        assert_eq!(al.extents(), vec![0, 3]);
    }

    #[test]
    fn everything_pinned_grows_instead_of_blocking() {
        let mut al = ActivityLog::new(1);
        al.activate(5..=5, |_| true);
        let t = al.activate(6..=7, |_| true).unwrap();
        assert!(t.evicted.is_empty());
        assert_eq!(al.len(), 3);
        // Later, with nothing pinned, it shrinks back to capacity.
        let t = al.activate(8..=8, |_| false).unwrap();
        assert_eq!(t.evicted.len(), 3);
        assert_eq!(al.extents(), vec![8]);
    }

    #[test]
    fn one_transaction_for_a_group_evicts_only_outside_it() {
        let mut al = ActivityLog::new(3);
        al.activate_set(&[1, 2, 3], |_| false);
        // 1 is the oldest, but a group naming it keeps it: 2 and 3 go.
        let t = al.activate_set(&[1, 7, 8], |_| false).unwrap();
        let mut ev = t.evicted.clone();
        ev.sort_unstable();
        assert_eq!(ev, vec![2, 3]);
        assert_eq!(al.extents(), vec![1, 7, 8]);
        assert_eq!(al.activate_set(&[8, 7], |_| false), None);
        al.remove(7);
        assert!(!al.contains(7));
    }

    #[test]
    fn restored_and_shrink() {
        let mut al = ActivityLog::restored(4, &[9, 3]);
        assert!(al.contains(9) && al.contains(3));
        assert_eq!(al.activate(3..=3, |_| false), None);
        assert_eq!(al.shrink(|e| e == 3), vec![9]);
        assert_eq!(al.extents(), vec![3]);
    }
}
