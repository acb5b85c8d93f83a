//! The NBD codec's hot paths: decoding a pipelined burst of request headers and encoding replies.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use twinblk::nbd::codec::{self, RequestHeader};
use twinblk::nbd::proto::{CMD_READ, CMD_WRITE};

fn burst(n: u64, kind: u16, payload: u32) -> Vec<u8> {
    let mut b = Vec::new();
    for i in 0..n {
        codec::encode_request(
            &mut b,
            &RequestHeader {
                flags: 0,
                kind,
                cookie: i,
                offset: i * 4096,
                len: payload,
            },
        );
        if kind == CMD_WRITE {
            b.resize(b.len() + payload as usize, 0);
        }
    }
    b
}

fn decode(c: &mut Criterion) {
    let t = codec::Transmission {
        size: 1 << 40,
        read_only: false,
        structured: true,
    };
    let mut g = c.benchmark_group("decode");
    for (name, kind) in [("read_4k_x32", CMD_READ), ("write_4k_x32", CMD_WRITE)] {
        let b = burst(32, kind, 4096);
        g.throughput(Throughput::Elements(32));
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let mut buf = black_box(&b[..]);
                let mut n = 0;
                while let Ok(Some(d)) = codec::decode_request(buf) {
                    if codec::validate(&d.header, &t).is_ok() {
                        n += 1;
                    }
                    buf = &buf[d.consumed..];
                }
                n
            })
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(32));
    let mut out = Vec::with_capacity(32 * 32);
    g.bench_function("simple_x32", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..32u64 {
                codec::encode_simple_reply(&mut out, black_box(i), 0);
            }
            out.len()
        })
    });
    g.bench_function("structured_read_header_x32", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..32u64 {
                codec::encode_read_reply_header(&mut out, true, black_box(i), i * 4096, 4096);
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
