//! A range lock over aligned blocks, so a read-modify-write of a partial block cannot lose a
//! concurrent write to the same block.
//!
//! Two kinds of holders: *shared* (aligned writes, zeroing, trim: they write whole blocks, so they
//! may overlap each other — the client gets no order among overlapping in-flight writes anyway)
//! and *exclusive* (read-modify-write: reads a block, patches it, writes it back; nothing else may
//! write those blocks in between). Conflicting requests are granted in arrival order.
//!
//! Hot path: while no exclusive holder exists (the usual case: aligned clients), a shared writer
//! only bumps `fast` and checks `exclusive`, never touching the mutex. It is a Dekker handshake:
//! the writer increments `fast` then reads `exclusive`; an exclusive locker increments
//! `exclusive` then waits for `fast` to drain. With SeqCst, at least one side sees the other, so
//! either the writer backs off to the slow path or the exclusive locker waits for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

#[derive(Default)]
pub struct RangeLock {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Exclusive lockers that exist (waiting or holding).
    exclusive: AtomicUsize,
    /// Shared holders that took the fast path (not in `state`).
    fast: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    held: Vec<Entry>,
    waiting: VecDeque<(Entry, oneshot::Sender<()>)>,
    drain_waiters: Vec<oneshot::Sender<()>>,
}

#[derive(Clone, Copy)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl Entry {
    fn conflicts(&self, other: &Entry) -> bool {
        (self.exclusive || other.exclusive) && self.start < other.end && other.start < self.end
    }
}

/// Held (or, while its acquiring future is pending, requested) range. Releases on drop, so a
/// cancelled acquisition cleans up too.
pub struct RangeGuard {
    shared: Arc<Shared>,
    kind: GuardKind,
    /// For an exclusive guard: undoes the `exclusive` count after the entry is removed (fields
    /// drop after `Drop::drop`).
    _token: Option<ExclusiveToken>,
}

enum GuardKind {
    Fast,
    Slow { id: u64 },
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the lists inconsistent (each update is a
        // single push/remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fast_release(&self) {
        if self.fast.fetch_sub(1, SeqCst) == 1 && self.exclusive.load(SeqCst) > 0 {
            for tx in self.state().drain_waiters.drain(..) {
                let _ = tx.send(());
            }
        }
    }

    /// Grants every waiter that conflicts with nothing held and no earlier waiter.
    fn grant(state: &mut State) {
        let mut i = 0;
        while i < state.waiting.len() {
            let Some((e, _)) = state.waiting.get(i) else {
                break;
            };
            let e = *e;
            let blocked = state.held.iter().any(|h| h.conflicts(&e))
                || state.waiting.iter().take(i).any(|(w, _)| w.conflicts(&e));
            if blocked {
                i += 1;
                continue;
            }
            if let Some((e, tx)) = state.waiting.remove(i) {
                state.held.push(e);
                // A dropped receiver means the guard is being dropped; its Drop removes the entry.
                let _ = tx.send(());
            }
        }
    }
}

impl RangeLock {
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Locks blocks `start..end` for a whole-block write.
    pub async fn shared(&self, start: u64, end: u64) -> RangeGuard {
        match self.try_shared() {
            Some(g) => g,
            None => self.slow(start, end, None).await,
        }
    }

    /// A shared lock on any blocks, if no read-modify-write exists (the hot path of
    /// [`RangeLock::shared`]); `None` when the caller must wait with `shared`.
    pub fn try_shared(&self) -> Option<RangeGuard> {
        let sh = &self.inner;
        sh.fast.fetch_add(1, SeqCst);
        if sh.exclusive.load(SeqCst) == 0 {
            return Some(RangeGuard {
                shared: sh.clone(),
                kind: GuardKind::Fast,
                _token: None,
            });
        }
        sh.fast_release();
        None
    }

    /// Locks blocks `start..end` for a read-modify-write.
    pub async fn exclusive(&self, start: u64, end: u64) -> RangeGuard {
        let sh = &self.inner;
        sh.exclusive.fetch_add(1, SeqCst);
        // From here on this token, later owned by the guard, undoes the increment.
        let token = ExclusiveToken(sh.clone());
        loop {
            let rx = {
                let mut st = sh.state();
                if sh.fast.load(SeqCst) == 0 {
                    break;
                }
                let (tx, rx) = oneshot::channel();
                st.drain_waiters.push(tx);
                rx
            };
            let _ = rx.await;
        }
        self.slow(start, end, Some(token)).await
    }

    async fn slow(&self, start: u64, end: u64, token: Option<ExclusiveToken>) -> RangeGuard {
        let exclusive = token.is_some();
        let sh = &self.inner;
        let (guard, rx) = {
            let mut st = sh.state();
            let id = st.next_id;
            st.next_id += 1;
            let e = Entry {
                id,
                start,
                end,
                exclusive,
            };
            let guard = RangeGuard {
                shared: sh.clone(),
                kind: GuardKind::Slow { id },
                _token: token,
            };
            let (tx, rx) = oneshot::channel();
            st.waiting.push_back((e, tx));
            Shared::grant(&mut st);
            (guard, rx)
        };
        let _ = rx.await;
        guard
    }
}

struct ExclusiveToken(Arc<Shared>);

impl Drop for ExclusiveToken {
    fn drop(&mut self) {
        self.0.exclusive.fetch_sub(1, SeqCst);
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        match self.kind {
            GuardKind::Fast => self.shared.fast_release(),
            GuardKind::Slow { id } => {
                let mut st = self.shared.state();
                st.held.retain(|e| e.id != id);
                st.waiting.retain(|(e, _)| e.id != id);
                Shared::grant(&mut st);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pending<F: std::future::Future>(f: F) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(50), f)
                .await
                .is_err()
        })
    }

    #[tokio::test]
    async fn shared_do_not_wait_for_each_other() {
        let l = RangeLock::new();
        let _a = l.shared(0, 10).await;
        let _b = l.shared(5, 15).await;
    }

    #[test]
    fn exclusive_waits_for_overlapping_shared_and_not_for_disjoint() {
        let l = RangeLock::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let a = rt.block_on(l.shared(0, 10));
        // Fast-path holder: the exclusive locker must wait until it is gone.
        assert!(pending(l.exclusive(20, 21)));
        drop(a);
        let x = rt.block_on(l.exclusive(3, 4));
        // Overlapping shared and exclusive wait; disjoint ones do not.
        assert!(pending(l.shared(0, 4)));
        assert!(pending(l.exclusive(3, 5)));
        // The cancelled exclusive waiter left no count behind: `x` is the only one.
        assert_eq!(l.inner.exclusive.load(SeqCst), 1);
        let _d = rt.block_on(l.shared(4, 8));
        let _e = rt.block_on(l.exclusive(100, 101));
        drop(x);
        let _f = rt.block_on(l.shared(0, 4));
    }

    #[test]
    fn cancelled_waiters_release() {
        let l = RangeLock::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let x = rt.block_on(l.exclusive(0, 1));
        assert!(pending(l.exclusive(0, 1))); // dropped while waiting
        drop(x);
        let _y = rt.block_on(l.exclusive(0, 1));
        assert_eq!(l.inner.exclusive.load(SeqCst), 1);
        assert_eq!(l.inner.state().waiting.len(), 0);
    }
}
