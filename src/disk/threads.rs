//! Engine 2: a pool of threads doing blocking pread/pwrite/fdatasync/fallocate. Queue depth is
//! the number of threads.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use super::op::{run_blocking, Op};

pub const DEFAULT_THREADS: usize = 16;

pub struct Threads {
    q: Arc<Queue>,
}

struct Queue {
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    ops: VecDeque<Op>,
    shutdown: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a queue and a flag: always consistent, even after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Threads {
    pub fn new(file: Arc<File>, n: usize, name: &str) -> io::Result<Threads> {
        let q = Arc::new(Queue {
            state: Mutex::new(State {
                ops: VecDeque::new(),
                shutdown: false,
            }),
            cv: Condvar::new(),
        });
        let pool = Threads { q };
        for i in 0..n.max(1) {
            let q = pool.q.clone();
            let file = file.clone();
            // On failure `pool` drops here and stops the workers already started.
            thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&q, &file))?;
        }
        Ok(pool)
    }

    pub fn submit(&self, op: Op) {
        let mut st = self.q.lock();
        if st.shutdown {
            drop(st);
            op.complete(Err(io::Error::other("disk engine stopped")));
            return;
        }
        st.ops.push_back(op);
        drop(st);
        self.q.cv.notify_one();
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.q.lock().shutdown = true;
        self.q.cv.notify_all();
    }
}

fn worker(q: &Queue, file: &File) {
    let fd = file.as_raw_fd();
    loop {
        let op = {
            let mut st = q.lock();
            loop {
                if let Some(op) = st.ops.pop_front() {
                    break op;
                }
                if st.shutdown {
                    return;
                }
                st = q.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let mut op = op;
        let res = run_blocking(fd, &mut op.kind);
        op.complete(res);
    }
}
