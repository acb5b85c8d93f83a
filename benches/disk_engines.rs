//! Disk engines side by side, O_DIRECT on a file under /var/tmp:
//! 4 KiB random write at queue depth 32, 4 KiB random read at qd32, 1 MiB sequential write at qd8.
//!
//! `cargo bench --bench disk_engines` (criterion reports elements/s = IOPS, or bytes/s).
//! Absolute numbers depend on the machine; compare the engines' ratio.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use twinblk::disk::{Disk, DiskOptions, EngineKind};

const FILE_SIZE: u64 = 256 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs `total` ops with `qd` always in flight; op `i` gets a distinct sequence number.
async fn run_qd<F, Fut>(qd: u64, total: u64, op: F) -> Duration
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..qd {
        let op = op.clone();
        let next = next.clone();
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                op(i).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
    start.elapsed()
}

/// A random 4 KiB-aligned offset from a sequence number (xorshift-mixed).
fn rand_off(i: u64, salt: u64) -> u64 {
    let mut x = (i ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    (x % (FILE_SIZE / 4096)) * 4096
}

fn open(path: &std::path::Path, engine: EngineKind) -> Disk {
    let d = Disk::open(
        path,
        &DiskOptions {
            engine,
            size: Some(FILE_SIZE),
            ..Default::default()
        },
    )
    .expect("open bench disk");
    assert_eq!(d.engine(), engine, "engine fell back");
    d
}

fn bench(c: &mut Criterion) {
    let file = tempfile::Builder::new()
        .prefix("twinblk-bench")
        .tempfile_in("/var/tmp")
        .expect("temp file in /var/tmp");
    let rt = runtime();
    // Fill the file so reads hit allocated blocks (reads of holes never touch the device).
    {
        let d = open(file.path(), EngineKind::Threads);
        rt.block_on(async {
            for i in 0..FILE_SIZE / (1 << 20) {
                let mut b = d.alloc(1 << 20);
                b.fill(i as u8 | 1);
                d.write(i << 20, b, false).await.expect("fill");
            }
            d.flush().await.expect("flush");
        });
    }

    let engines = [
        ("uring", EngineKind::Uring),
        ("threads", EngineKind::Threads),
    ];

    let mut g = c.benchmark_group("randwrite_4k_qd32");
    g.throughput(Throughput::Elements(1));
    for (name, engine) in engines {
        let d = open(file.path(), engine);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let d = d.clone();
                rt.block_on(run_qd(32, iters, move |i| {
                    let d = d.clone();
                    async move {
                        let buf = d.alloc(4096);
                        d.write(rand_off(i, 1), buf, false).await.expect("write");
                    }
                }))
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("randread_4k_qd32");
    g.throughput(Throughput::Elements(1));
    for (name, engine) in engines {
        let d = open(file.path(), engine);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let d = d.clone();
                rt.block_on(run_qd(32, iters, move |i| {
                    let d = d.clone();
                    async move {
                        let buf = d.read(rand_off(i, 2), 4096).await.expect("read");
                        criterion::black_box(buf[0]);
                    }
                }))
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("seqwrite_1m_qd8");
    g.throughput(Throughput::Bytes(1 << 20));
    for (name, engine) in engines {
        let d = open(file.path(), engine);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let d = d.clone();
                rt.block_on(run_qd(8, iters, move |i| {
                    let d = d.clone();
                    async move {
                        let buf = d.alloc(1 << 20);
                        let off = (i % (FILE_SIZE >> 20)) << 20;
                        d.write(off, buf, false).await.expect("write");
                    }
                }))
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("fua_write_4k_qd32");
    g.throughput(Throughput::Elements(1));
    for (name, engine) in engines {
        let d = open(file.path(), engine);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let d = d.clone();
                rt.block_on(run_qd(32, iters, move |i| {
                    let d = d.clone();
                    async move {
                        let buf = d.alloc(4096);
                        d.write(rand_off(i, 3), buf, true).await.expect("write");
                    }
                }))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
