//! What the always-on latency breakdown costs per replicated write, in CPU: the clock reads and
//! stage records the driver does for one write on the Primary (8 instants, 12 stages, the
//! Prometheus histograms included) and on the Secondary (4 instants, 4 stages). The bench A/B
//! (`tools/bench.sh` with `twinblk-sync-nolat`) cannot resolve this on a shared machine; this
//! can.
//!
//! Run: `cargo bench --bench latency`

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use twinblk::latency::{Stage, Window};

fn window() -> Window {
    let (m, _registry) = twinblk::metrics::Metrics::new("r0", "alpha");
    Window::new(Stage::ALL.iter().map(|s| m.write_stage(s.name())).collect())
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("latency");
    let mut w = window();
    let start = Instant::now();
    g.bench_function("primary_write", |b| {
        b.iter(|| {
            let mut last = Instant::now();
            for i in 0..8 {
                let now = Instant::now();
                let d = now.duration_since(last);
                last = now;
                if i == 0 {
                    continue;
                }
                let second = now.duration_since(start).as_secs();
                w.record(Stage::ALL[i], d, second);
                if i < 6 {
                    w.record(Stage::ALL[i + 6], d, second);
                }
            }
        })
    });
    let mut w = window();
    g.bench_function("secondary_write", |b| {
        b.iter(|| {
            let mut last = Instant::now();
            for s in [
                Stage::ApplyReceive,
                Stage::ApplyQueue,
                Stage::ApplyDisk,
                Stage::ApplyAck,
            ] {
                let now = Instant::now();
                w.record(
                    s,
                    now.duration_since(last),
                    now.duration_since(start).as_secs(),
                );
                last = now;
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
