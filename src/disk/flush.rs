//! Flush coalescing: one fdatasync at a time, shared by every flush request that it covers.
//!
//! A flush must make stable every write that completed before it was asked for, and nothing more.
//! So each mutating op bumps a counter when it completes; a flush notes the counter when it
//! starts, and once it succeeds, everything up to that count is stable. A flush request whose ops
//! are already covered returns at once; one that arrives while a flush runs waits for it, and the
//! requests that are still not covered then share a single new flush. qemu's block layer does the
//! same (`flushed_gen`), and it matters: fio (3.33, as Debian ships it) with `fsync=N` issues a
//! FLUSH into every free queue slot until its first one completes, and a server that ran each as
//! its own fdatasync spent a core on io-wq workers doing redundant device flushes.
//!
//! A failed flush fails every request it would have covered, including those that were waiting
//! to share it, and every flush after it (the error is sticky until the disk is opened again):
//! Linux reports a write-back error once per open file, so a later fdatasync could succeed while
//! the data the failed one should have made stable is lost, and a "stable" answer for writes
//! completed after the failure would vouch for a disk that has already dropped acknowledged data.
//! Only the core knows what the failure means for the replicas (it stops using the disk).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::SeqCst};

#[derive(Default)]
pub(super) struct Flusher {
    /// Mutating ops (writes, zeroing, discards) completed so far.
    completed: AtomicU64,
    /// Every op counted up to here is stable: a flush that started at this count succeeded.
    stable: AtomicU64,
    /// The errno of the first failed flush (0: none failed). Sticky: every later flush fails
    /// with it.
    failed_errno: AtomicI32,
    /// Flushes actually run (the rest were covered by another).
    issued: AtomicU64,
    /// Held while a flush runs.
    gate: tokio::sync::Mutex<()>,
}

impl Flusher {
    /// A mutating op completed (successfully or not): later flushes must cover it.
    pub(super) fn completed_one(&self) {
        self.completed.fetch_add(1, SeqCst);
    }

    /// How many flushes were run, as opposed to answered by another's.
    #[cfg(test)]
    pub(super) fn issued(&self) -> u64 {
        self.issued.load(SeqCst)
    }

    /// Makes every op completed before this call stable, running `flush` only if no flush that
    /// started after them has done so (or is doing so) already.
    pub(super) async fn flush<F, Fut>(&self, flush: F) -> io::Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<()>>,
    {
        let target = self.completed.load(SeqCst);
        if let Some(r) = self.covered(target) {
            return r;
        }
        let _running = self.gate.lock().await;
        // The flush we waited for may have covered us.
        if let Some(r) = self.covered(target) {
            return r;
        }
        let start = self.completed.load(SeqCst);
        self.issued.fetch_add(1, SeqCst);
        let r = flush().await;
        match &r {
            Ok(()) => {
                self.stable.fetch_max(start, SeqCst);
            }
            Err(e) => self.record_failure(e),
        }
        r
    }

    /// A flush failed (here or in a synchronous one, [`super::Disk::sync_now`]): from now on
    /// every flush fails with its errno.
    pub(super) fn record_failure(&self, e: &io::Error) {
        let errno = e.raw_os_error().filter(|&n| n != 0).unwrap_or(libc::EIO);
        let _ = self.failed_errno.compare_exchange(0, errno, SeqCst, SeqCst);
    }

    /// The sticky error of an earlier failed flush, if any.
    pub(super) fn failure(&self) -> Option<io::Error> {
        match self.failed_errno.load(SeqCst) {
            0 => None,
            errno => Some(io::Error::from_raw_os_error(errno)),
        }
    }

    /// The answer for a request that needs the first `target` ops stable, if one is known: the
    /// sticky error once any flush failed, or success from one that made them stable.
    fn covered(&self, target: u64) -> Option<io::Result<()>> {
        if let Some(e) = self.failure() {
            return Some(Err(e));
        }
        (self.stable.load(SeqCst) >= target).then_some(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A flush that takes a while, so that requests pile up behind it.
    async fn slow_ok() -> io::Result<()> {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        Ok(())
    }

    #[test]
    fn nothing_written_needs_no_flush() {
        rt().block_on(async {
            let f = Flusher::default();
            f.flush(slow_ok).await.unwrap();
            assert_eq!(f.issued(), 0);
        });
    }

    #[test]
    fn every_completed_write_gets_a_flush_that_started_after_it() {
        rt().block_on(async {
            let f = Flusher::default();
            f.completed_one();
            f.flush(slow_ok).await.unwrap();
            assert_eq!(f.issued(), 1);
            // Covered already: no new write since.
            f.flush(slow_ok).await.unwrap();
            assert_eq!(f.issued(), 1);
            f.completed_one();
            f.flush(slow_ok).await.unwrap();
            assert_eq!(f.issued(), 2);
        });
    }

    /// A flusher with one write completed and a flush of it running (`outcome` after 5 ms),
    /// then `more_writes` more completions and `waiting` requests queued behind that flush.
    /// Returns the flusher and every request's result (the running one's first).
    async fn behind_a_running_flush(
        outcome: io::Result<()>,
        more_writes: u64,
        waiting: usize,
    ) -> (Arc<Flusher>, Vec<io::Result<()>>) {
        let f = Arc::new(Flusher::default());
        f.completed_one();
        let first = f.clone();
        let running = tokio::spawn(async move {
            first
                .flush(|| async {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    outcome
                })
                .await
        });
        // Let it take the gate before the others ask.
        tokio::task::yield_now().await;
        for _ in 0..more_writes {
            f.completed_one();
        }
        let mut behind = Vec::new();
        for _ in 0..waiting {
            let f = f.clone();
            behind.push(tokio::spawn(async move { f.flush(slow_ok).await }));
        }
        let mut results = vec![running.await.expect("flush task")];
        for h in behind {
            results.push(h.await.expect("flush task"));
        }
        (f, results)
    }

    #[test]
    fn requests_behind_a_running_flush_share_the_next_one() {
        rt().block_on(async {
            // They arrive after one more write completed, so the running flush does not cover
            // them: they need one more, and one is enough.
            let (f, results) = behind_a_running_flush(Ok(()), 1, 31).await;
            assert!(results.iter().all(|r| r.is_ok()));
            assert_eq!(f.issued(), 2);
        });
    }

    #[test]
    fn a_failed_flush_fails_everyone_it_covered_and_is_not_retried_for_them() {
        rt().block_on(async {
            // They need nothing newer than the failing flush covers: they must fail too,
            // without running a flush of their own (which the kernel might let succeed).
            let eio = Err(io::Error::from_raw_os_error(libc::EIO));
            let (f, results) = behind_a_running_flush(eio, 0, 4).await;
            assert_eq!(results.len(), 5);
            for r in results {
                let e = r.expect_err("covered by a failed flush");
                assert_eq!(e.raw_os_error(), Some(libc::EIO));
            }
            assert_eq!(f.issued(), 1);
        });
    }

    /// Linux reports a write-back error once: the next fdatasync succeeds although the data the
    /// failed one covered never reached the disk. A flush after the failure, even for writes
    /// completed after it, must not say "stable".
    #[test]
    fn a_failed_flush_fails_every_later_flush() {
        rt().block_on(async {
            let f = Flusher::default();
            f.completed_one();
            let e = f
                .flush(|| async { Err(io::Error::from_raw_os_error(libc::EIO)) })
                .await
                .expect_err("the flush failed");
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            for _ in 0..3 {
                f.completed_one();
                let e = f.flush(slow_ok).await.expect_err("sticky after a failure");
                assert_eq!(e.raw_os_error(), Some(libc::EIO));
            }
            // Not even run: the kernel's answer would be the once-only success.
            assert_eq!(f.issued(), 1);
        });
    }
}
