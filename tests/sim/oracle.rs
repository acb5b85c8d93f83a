//! What the client did and was promised, and the checks against the disks' contents.
//!
//! Every written block carries its write's tag (first and last 8 bytes), so a block's content
//! names the write it came from; zeroed blocks are ambiguous among the zero versions. Epochs here
//! are the client's: a new one starts when a write is submitted after a completion, and at every
//! flush (the core's epochs may only be finer).

use super::disk::{SimDisk, BS};

#[derive(Clone, Copy, Debug)]
pub struct Version {
    pub order: u64,
    pub epoch: u64,
    pub tag: u64,
    /// Lost in a primary crash (still recognisable on the secondary, but no longer the truth).
    pub lost: bool,
    /// The write failed on the primary: its content may or may not be anywhere.
    pub failed: bool,
}

pub struct Oracle {
    history: Vec<Vec<Version>>,
    order: u64,
    epoch: u64,
    completed_since: bool,
    next_tag: u64,
    /// Per block: newest version the sync protocol promised is on the secondary's disk.
    pub confirmed_vol: Vec<u64>,
    /// Per block: newest version promised stable on the secondary.
    pub confirmed_dur: Vec<u64>,
    /// The secondary has been in sync since the primary last crashed.
    pub secondary_valid: bool,
    /// Per block: newest version the Primary completed to the client.
    pub completed: Vec<u64>,
    /// Per block: the oldest version the Primary's disk may hold after a crash (what a
    /// completed flush or FUA write covered there, and what it held when it took over).
    prim_floor: Vec<u64>,
}

fn block_tag(blk: &[u8]) -> Result<u64, String> {
    let head = u64::from_le_bytes(blk[..8].try_into().map_err(|_| "short block")?);
    let tail = u64::from_le_bytes(blk[BS - 8..].try_into().map_err(|_| "short block")?);
    let mid = blk[BS / 2];
    if head != tail {
        return Err(format!("torn block (head tag {head}, tail tag {tail})"));
    }
    let want_mid = if head == 0 { 0 } else { (head as u8) | 1 };
    if mid != want_mid {
        return Err(format!("block with tag {head} has foreign contents"));
    }
    Ok(head)
}

impl Oracle {
    pub fn new(blocks: usize) -> Oracle {
        let init = Version {
            order: 0,
            epoch: 0,
            tag: 0,
            lost: false,
            failed: false,
        };
        Oracle {
            history: vec![vec![init]; blocks],
            order: 0,
            epoch: 0,
            completed_since: false,
            next_tag: 1,
            confirmed_vol: vec![0; blocks],
            confirmed_dur: vec![0; blocks],
            secondary_valid: false,
            completed: vec![0; blocks],
            prim_floor: vec![0; blocks],
        }
    }

    pub fn client_write(&mut self, first: usize, n: usize, zero: bool) -> u64 {
        if self.completed_since {
            self.epoch += 1;
            self.completed_since = false;
        }
        let tag = if zero {
            0
        } else {
            self.next_tag += 1;
            self.next_tag
        };
        self.order += 1;
        for b in first..first + n {
            self.history[b].push(Version {
                order: self.order,
                epoch: self.epoch,
                tag,
                lost: false,
                failed: false,
            });
        }
        if zero {
            // Identify the zero version by its order (tags are 0 for all of them).
            return self.order | (1 << 63);
        }
        tag
    }

    pub fn client_flush(&mut self) {
        self.epoch += 1;
        self.completed_since = false;
    }

    pub fn client_completed(&mut self, tag: u64, first: usize, n: usize, ok: bool) {
        self.completed_since = true;
        if ok {
            return;
        }
        for b in first..first + n {
            if let Some(o) = self.order_of(b, tag) {
                for v in self.history[b].iter_mut().filter(|v| v.order == o) {
                    v.failed = true;
                }
            }
        }
    }

    /// A write the Primary completed to its client (not a rogue's): its disk holds it until a
    /// crash, and after one too if `fua`.
    pub fn primary_completed(&mut self, tag: u64, first: usize, n: usize, fua: bool) {
        for b in first..first + n {
            if let Some(o) = self.order_of(b, tag) {
                self.completed[b] = self.completed[b].max(o);
                if fua {
                    self.prim_floor[b] = self.prim_floor[b].max(o);
                }
            }
        }
    }

    /// A flush completed on the Primary: `snapshot` ([`Oracle::completed`] when it was
    /// submitted) is stable there.
    pub fn primary_flushed(&mut self, snapshot: &[u64]) {
        for (f, &o) in self.prim_floor.iter_mut().zip(snapshot) {
            *f = (*f).max(o);
        }
    }

    /// The Primary crashed: its disk (as the crash left it) still holds everything a flush made
    /// stable and what it was promoted with.
    pub fn check_primary_crash(&self, prim: &SimDisk) -> Result<(), String> {
        self.check_holds_stable(&prim.durable)
            .map_err(|e| format!("the Primary's crash took back stable data: {e}"))
    }

    /// `img` holds everything a flush made stable on the Primary and what it was promoted
    /// with (a crashed Primary's disk, or the peer that takes over from a Primary whose disk
    /// failed).
    pub fn check_holds_stable(&self, img: &[u8]) -> Result<(), String> {
        for (b, &floor) in self.prim_floor.iter().enumerate() {
            let have = self.best_order(img, b)?;
            if have < floor {
                return Err(format!("block {b} at version {have}, stable at {floor}"));
            }
        }
        Ok(())
    }

    /// Blocks where `img` lacks the newest version the Primary acknowledged since it took over
    /// (completed to the client, a completion at a connection loss included), unless that
    /// version was given up since (a split brain's loser) or failed.
    pub fn missing_acked(&self, img: &[u8]) -> Result<Vec<usize>, String> {
        let mut missing = Vec::new();
        for (b, &c) in self.completed.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let kept = self.history[b]
                .iter()
                .any(|v| v.order == c && !v.lost && !v.failed);
            if kept && self.best_order(img, b)? < c {
                missing.push(b);
            }
        }
        Ok(missing)
    }

    /// `img` holds every write the Primary acknowledged (see [`Oracle::missing_acked`]).
    pub fn check_completed(&self, img: &[u8]) -> Result<(), String> {
        let missing = self.missing_acked(img)?;
        match missing.first() {
            None => Ok(()),
            Some(&b) => Err(format!(
                "acknowledged write lost: block {b} holds version {}, the client was \
                 acknowledged version {} ({} blocks like it: {missing:?})",
                self.best_order(img, b)?,
                self.completed[b],
                missing.len()
            )),
        }
    }

    /// The version a block effectively holds: a failed write counts as the one before it.
    fn effective(&self, b: usize, v: &Version) -> u64 {
        if !v.failed {
            return v.order;
        }
        self.history[b]
            .iter()
            .rev()
            .find(|e| e.order < v.order && !e.failed && !e.lost)
            .map_or(0, |e| e.order)
    }

    fn order_of(&self, b: usize, tag: u64) -> Option<u64> {
        if tag & (1 << 63) != 0 {
            return Some(tag & !(1 << 63));
        }
        self.history[b]
            .iter()
            .rev()
            .find(|v| v.tag == tag)
            .map(|v| v.order)
    }

    fn candidates(&self, img: &[u8], b: usize) -> Result<Vec<Version>, String> {
        let tag = block_tag(SimDisk::block(img, b)).map_err(|e| format!("block {b}: {e}"))?;
        let c: Vec<Version> = self.history[b]
            .iter()
            .copied()
            .filter(|v| v.tag == tag)
            .collect();
        if c.is_empty() {
            return Err(format!(
                "block {b} holds tag {tag}, never written there (or lost history)"
            ));
        }
        Ok(c)
    }

    fn best_order(&self, img: &[u8], b: usize) -> Result<u64, String> {
        Ok(self
            .candidates(img, b)?
            .iter()
            .map(|v| v.order)
            .max()
            .unwrap_or(0))
    }

    pub fn confirm_write(
        &mut self,
        tag: u64,
        first: usize,
        n: usize,
        fua: bool,
        sec: &SimDisk,
    ) -> Result<(), String> {
        for b in first..first + n {
            let Some(o) = self.order_of(b, tag) else {
                continue;
            };
            self.confirmed_vol[b] = self.confirmed_vol[b].max(o);
            let have = self.best_order(&sec.volatile, b)?;
            if have < o {
                return Err(format!(
                    "block {b} on the secondary is at version {have}, older than acked {o}"
                ));
            }
            if fua {
                self.confirmed_dur[b] = self.confirmed_dur[b].max(o);
                let have = self.best_order(&sec.durable, b)?;
                if have < o {
                    return Err(format!(
                        "FUA block {b} not stable on the secondary ({have} < {o})"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn confirm_flush(&mut self, snapshot: &[u64], sec: &SimDisk) -> Result<(), String> {
        for (b, &o) in snapshot.iter().enumerate() {
            self.confirmed_dur[b] = self.confirmed_dur[b].max(o);
        }
        self.check_confirmed(sec)
    }

    fn check_confirmed(&self, sec: &SimDisk) -> Result<(), String> {
        for b in 0..self.history.len() {
            let v = self.best_order(&sec.volatile, b)?;
            if v < self.confirmed_vol[b] {
                return Err(format!(
                    "acked write missing on the secondary: block {b} at version {v}, acked {}",
                    self.confirmed_vol[b]
                ));
            }
            let d = self.best_order(&sec.durable, b)?;
            if d < self.confirmed_dur[b] {
                return Err(format!(
                    "flushed write not stable on the secondary: block {b} at version {d}, flushed {}",
                    self.confirmed_dur[b]
                ));
            }
        }
        Ok(())
    }

    pub fn primary_crash(&mut self, sec: &SimDisk) -> Result<(), String> {
        self.check_confirmed(sec)?;
        self.confirmed_vol = self.confirmed_dur.clone();
        self.secondary_valid = false;
        Ok(())
    }

    /// A crashed secondary holds what a local disk holds after a power loss: everything a
    /// completed client flush covered, plus any subset of later writes (each block some version
    /// that was written there). Epoch (order) barriers are not flushed, so it is not a prefix
    /// of epochs: it counts as valid again only after it is back in sync (the primary resyncs
    /// its transfer log, which covers every write not yet flushed there).
    pub fn secondary_crash(&mut self, sec: &SimDisk) -> Result<(), String> {
        self.confirmed_vol = self.confirmed_dur.clone();
        self.check_confirmed(sec)?;
        self.secondary_valid = false;
        Ok(())
    }

    /// Sync mode, secondary in sync: every write acked to the client is on its disk. (Not a
    /// prefix of epochs: the peer applies writes of later epochs while earlier ones that no
    /// client could depend on yet are still in flight.)
    pub fn check_acked(&self, sec: &SimDisk) -> Result<(), String> {
        self.check_confirmed(sec)
    }

    /// After the primary crashed, or another node became Primary: its disk is the new history
    /// baseline.
    /// `promoted`: it took over with a promotion, which makes what it holds stable; otherwise
    /// only what is stable on it now counts as such.
    pub fn rebase(&mut self, prim: &SimDisk, promoted: bool) -> Result<(), String> {
        for b in 0..self.history.len() {
            let img = if promoted {
                &prim.volatile
            } else {
                &prim.durable
            };
            // A zeroed block could be any zero version: the oldest is what it surely holds.
            let c = self.candidates(img, b)?;
            self.prim_floor[b] = c.iter().map(|v| v.order).min().unwrap_or(0);
            self.completed[b] = 0;
            let c = self.candidates(&prim.volatile, b)?;
            let best = c
                .iter()
                .max_by_key(|v| v.order)
                .map(|v| v.order)
                .unwrap_or(0);
            for v in self.history[b].iter_mut() {
                v.lost |= v.order > best;
                // What the new Primary holds is the truth again, even if an earlier failover
                // had given it up.
                if v.order == best {
                    v.lost = false;
                }
            }
        }
        self.secondary_valid = false;
        Ok(())
    }

    /// The versions (tags, or zero-write ids from [`Oracle::client_write`]) of the losing side
    /// of a split brain: no longer part of the client's history.
    pub fn discard(&mut self, ids: &[u64]) {
        for &id in ids {
            let zero = id & (1 << 63) != 0;
            for h in self.history.iter_mut() {
                for v in h.iter_mut() {
                    if (zero && v.order == id & !(1 << 63)) || (!zero && v.tag == id) {
                        v.lost = true;
                    }
                }
            }
        }
        self.secondary_valid = false;
    }

    /// Another node became the Primary: what its old peer was promised no longer applies;
    /// promises start again against the new Secondary.
    pub fn new_regime(&mut self) {
        self.confirmed_vol.fill(0);
        self.confirmed_dur.fill(0);
        self.secondary_valid = false;
    }

    pub fn check_image(&self, img: &[u8]) -> Result<(), String> {
        for b in 0..self.history.len() {
            self.candidates(img, b)?;
        }
        Ok(())
    }

    fn latest(&self, b: usize, k: u64) -> Version {
        let h = &self.history[b];
        h.iter()
            .rev()
            .find(|v| v.epoch <= k && !v.lost && !v.failed)
            .copied()
            .unwrap_or(h[0])
    }

    /// The image equals the client's data as of the end of some epoch k, except blocks written
    /// in epoch k+1 (partially applied): "a prefix of epochs".
    pub fn check_prefix(&self, img: &[u8]) -> Result<(), String> {
        let mut cands = Vec::with_capacity(self.history.len());
        let (mut lo, mut hi) = (0u64, 0u64);
        for b in 0..self.history.len() {
            let c = self.candidates(img, b)?;
            lo = lo.max(c.iter().map(|v| v.epoch).min().unwrap_or(0));
            hi = hi.max(c.iter().map(|v| v.epoch).max().unwrap_or(0));
            cands.push(Some(c));
        }
        let mut first_bad = String::new();
        for k in lo.saturating_sub(1)..=hi {
            let bad = cands.iter().enumerate().find(|(b, c)| {
                let Some(c) = c else { return false };
                let l = self.latest(*b, k);
                !c.iter()
                    .any(|v| self.effective(*b, v) == l.order || v.epoch == k + 1)
            });
            match bad {
                None => return Ok(()),
                Some((b, c)) => {
                    first_bad += &format!(
                        "for epoch {k}: block {b} holds {:?}, expected {:?} or epoch {}",
                        c,
                        self.latest(b, k),
                        k + 1
                    );
                }
            }
        }
        let summary: Vec<String> = cands
            .iter()
            .enumerate()
            .filter_map(|(b, c)| {
                c.as_ref().map(|c| {
                    format!(
                        "{b}:{:?}",
                        c.iter().map(|v| (v.tag, v.epoch)).collect::<Vec<_>>()
                    )
                })
            })
            .collect();
        Err(format!("{first_bad}\nimage: {}", summary.join(" ")))
    }
}
