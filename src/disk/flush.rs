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
//! to share it: Linux reports a write-back error once per open file, so a retried fdatasync could
//! succeed while the data it should have made stable is lost.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::SeqCst};

#[derive(Default)]
pub(super) struct Flusher {
    /// Mutating ops (writes, zeroing, discards) completed so far.
    completed: AtomicU64,
    /// Every op counted up to here is stable: a flush that started at this count succeeded.
    stable: AtomicU64,
    /// 1 + the count at which the newest failed flush started (0: none failed), and its errno.
    failed: AtomicU64,
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
            Err(e) => {
                self.failed_errno
                    .store(e.raw_os_error().unwrap_or(libc::EIO), SeqCst);
                self.failed.fetch_max(start + 1, SeqCst);
            }
        }
        r
    }

    /// The answer for a request that needs the first `target` ops stable, if one is known: the
    /// error of a failed flush that covered them, or success from one that made them stable.
    fn covered(&self, target: u64) -> Option<io::Result<()>> {
        if self.failed.load(SeqCst) > target {
            return Some(Err(io::Error::from_raw_os_error(
                self.failed_errno.load(SeqCst),
            )));
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
            // A write after the failure gets a flush of its own, which may succeed.
            f.completed_one();
            f.flush(slow_ok).await.unwrap();
            assert_eq!(f.issued(), 2);
        });
    }
}
