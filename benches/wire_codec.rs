//! Hot-path cost of the peer wire codec: framing a write extent (with and without copying the
//! payload), decoding it, and the small acks.
//!
//! Run: `cargo bench --bench wire_codec`

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use twinblk::wire::{self, DataOp, Extent, PeerMsg};

fn extent(len: usize) -> PeerMsg {
    let data = Bytes::from(vec![0x5a; len]);
    PeerMsg::Data(Extent {
        seq: 42,
        epoch: 7,
        offset: 1 << 20,
        len: len as u32,
        op: DataOp::Write,
        flags: 0,
        crc32: crc32fast::hash(&data),
        data,
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    for len in [4096usize, 65536, 1 << 20] {
        let msg = extent(len);
        let frame = wire::encode(&msg).expect("encode");
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(
            BenchmarkId::new("encode_parts_zero_copy", len),
            &msg,
            |b, m| b.iter(|| wire::encode_parts(m).expect("encode")),
        );
        g.bench_with_input(BenchmarkId::new("encode_contiguous", len), &msg, |b, m| {
            let mut out = BytesMut::with_capacity(len + 128);
            b.iter(|| {
                out.clear();
                wire::encode_into(m, &mut out).expect("encode");
            })
        });
        g.bench_with_input(BenchmarkId::new("decode", len), &frame, |b, f| {
            b.iter(|| wire::decode(f).expect("decode"))
        });
        g.bench_with_input(
            BenchmarkId::new("decode_and_crc_check", len),
            &frame,
            |b, f| {
                b.iter(|| {
                    let (m, _) = wire::decode(f).expect("decode").expect("whole");
                    assert!(m.crc_ok());
                })
            },
        );
    }
    g.throughput(Throughput::Elements(1));
    let ack = PeerMsg::WriteAck {
        seq: 99,
        timing: Default::default(),
    };
    let ack_frame = wire::encode(&ack).expect("encode");
    g.bench_function("ack_encode", |b| {
        b.iter(|| wire::encode(&ack).expect("encode"))
    });
    g.bench_function("ack_decode", |b| {
        b.iter(|| wire::decode(&ack_frame).expect("decode"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
