//! Serve a plain file as /dev/ublkbN through `twinblk-ublk`, with std file I/O done on worker
//! threads (so completions arrive from other threads, as they do with twinblk's disk layer).
//!
//! usage: ublk_file FILE [--size BYTES] [--queues N] [--depth N] [--recover ID] [--inline]
//! Prints `READY /dev/ublkbN` once the device is live; stops on SIGINT/SIGTERM.

#[cfg(target_os = "linux")]
mod file_target {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::task::{Poll, Waker};
    use twinblk_ublk::{BlockTarget, IoFuture};

    type Job = Box<dyn FnOnce() + Send>;

    /// A file behind a small pool of I/O threads. `inline` does the I/O in the calling thread.
    pub struct FileTarget {
        pub file: Arc<File>,
        pub size: u64,
        jobs: Option<Mutex<mpsc::Sender<Job>>>,
    }

    struct Slot<T> {
        result: Option<T>,
        waker: Option<Waker>,
    }

    impl FileTarget {
        pub fn new(file: File, size: u64, threads: usize) -> FileTarget {
            let jobs = (threads > 0).then(|| {
                let (tx, rx) = mpsc::channel::<Job>();
                let rx = Arc::new(Mutex::new(rx));
                for _ in 0..threads {
                    let rx = Arc::clone(&rx);
                    std::thread::spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    });
                }
                Mutex::new(tx)
            });
            FileTarget {
                file: Arc::new(file),
                size,
                jobs,
            }
        }

        /// Run `f(file)` on a worker; the future resolves with its result.
        async fn run<T: Send + 'static>(
            &self,
            f: impl FnOnce(&File) -> T + Send + 'static,
        ) -> Result<T, i32> {
            let Some(jobs) = &self.jobs else {
                return Ok(f(&self.file));
            };
            let slot = Arc::new(Mutex::new(Slot {
                result: None,
                waker: None,
            }));
            let (s2, file) = (Arc::clone(&slot), Arc::clone(&self.file));
            let job: Job = Box::new(move || {
                let r = f(&file);
                let waker = s2.lock().ok().and_then(|mut s| {
                    s.result = Some(r);
                    s.waker.take()
                });
                if let Some(w) = waker {
                    w.wake();
                }
            });
            jobs.lock()
                .map_err(|_| libc::EIO)?
                .send(job)
                .map_err(|_| libc::EIO)?;
            std::future::poll_fn(|cx| {
                let Ok(mut s) = slot.lock() else {
                    return Poll::Ready(Err(libc::EIO));
                };
                match s.result.take() {
                    Some(r) => Poll::Ready(Ok(r)),
                    None => {
                        s.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await
        }
    }

    fn errno(e: std::io::Error) -> i32 {
        e.raw_os_error().unwrap_or(libc::EIO)
    }

    impl BlockTarget for FileTarget {
        fn size(&self) -> u64 {
            self.size
        }
        fn logical_block_size(&self) -> u32 {
            512
        }
        fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a> {
            let len = buf.len();
            Box::pin(async move {
                let data = self
                    .run(move |f| {
                        let mut v = vec![0u8; len];
                        f.read_exact_at(&mut v, offset).map(|()| v)
                    })
                    .await?
                    .map_err(errno)?;
                buf.copy_from_slice(&data);
                Ok(())
            })
        }
        fn write<'a>(&'a self, offset: u64, data: &'a [u8], fua: bool) -> IoFuture<'a> {
            let data = data.to_vec();
            Box::pin(async move {
                self.run(move |f| {
                    f.write_all_at(&data, offset)?;
                    if fua {
                        f.sync_data()?;
                    }
                    Ok(())
                })
                .await?
                .map_err(errno)
            })
        }
        fn flush(&self) -> IoFuture<'_> {
            Box::pin(async move { self.run(|f| f.sync_data()).await?.map_err(errno) })
        }
        fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
            self.write_zeroes(offset, len, true)
        }
        fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> IoFuture<'_> {
            Box::pin(async move {
                self.run(move |f| {
                    let zeroes = vec![0u8; 1 << 20];
                    let mut at = offset;
                    let end = offset + len;
                    while at < end {
                        let n = (end - at).min(zeroes.len() as u64) as usize;
                        f.write_all_at(&zeroes[..n], at)?;
                        at += n as u64;
                    }
                    Ok(())
                })
                .await?
                .map_err(errno)
            })
        }
    }
}

#[cfg(target_os = "linux")]
fn main() {
    use std::io::Write;
    use std::sync::Arc;

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: ublk_file FILE [--size BYTES] [--queues N] [--depth N] [--recover ID] [--inline]";
    let mut path = None;
    let mut size = None;
    let mut opts = twinblk_ublk::UblkOptions::default();
    let mut threads = 4;
    let mut it = args.iter();
    let num = |v: Option<&String>| -> u64 {
        v.and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            eprintln!("{usage}");
            std::process::exit(2)
        })
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size" => size = Some(num(it.next())),
            "--queues" => opts.queues = num(it.next()) as u16,
            "--depth" => opts.depth = num(it.next()) as u16,
            "--recover" => opts.recover = Some(num(it.next()) as i32),
            "--inline" => threads = 0,
            p if path.is_none() && !p.starts_with('-') => path = Some(p.to_string()),
            _ => {
                eprintln!("{usage}");
                std::process::exit(2)
            }
        }
    }
    let Some(path) = path else {
        eprintln!("{usage}");
        std::process::exit(2)
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(size.is_some())
        .truncate(false)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ublk_file: {path}: {e}");
            std::process::exit(1)
        }
    };
    if let Some(s) = size {
        if let Err(e) = file.set_len(s) {
            eprintln!("ublk_file: {path}: {e}");
            std::process::exit(1)
        }
    }
    let len = file.metadata().map(|m| m.len()).unwrap_or(0) & !511;
    let target = Arc::new(file_target::FileTarget::new(file, len, threads));
    let res = twinblk_ublk::serve(target, &opts, |dev| {
        println!("READY {dev}");
        let _ = std::io::stdout().flush();
    });
    if let Err(e) = res {
        eprintln!("ublk_file: {e}");
        std::process::exit(1);
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("ublk_file: ublk is only available on Linux");
    std::process::exit(1);
}
