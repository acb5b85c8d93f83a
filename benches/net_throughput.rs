//! Loopback throughput and latency of the transport, through its public API, for several
//! tunings, with plain TCP (same framing) as a reference.
//!
//! cargo bench --bench net_throughput                       # all variants, 1 GiB per run
//! cargo bench --bench net_throughput -- --mib 256 tuned    # chosen variants, 256 MiB
//!
//! Variants: baseline (quinn's default windows, 1 data stream, system socket buffers),
//! tuned (the crate defaults), tuned+mtu6500 (MTU discovery up to jumbo frames, = config max-mtu 6500), and `+` modifiers (see `tuning`),
//! tcp (reference). Each reports MB/s and messages/s for 1 MiB and 4 KiB messages and the
//! round-trip time of a 4 KiB ping-pong on the control stream; then, per QUIC variant, a sync
//! write's round trip as two daemons see it (`quic_extent_ack`: each end on its own
//! current-thread runtime, a 4 KiB extent out, a 40-byte ack back). `--idle-poll` holds the CPU
//! latency request the daemons' `idle-poll` takes while writes flow (needs root).
//!
//! Findings (2 shared cores, load 6-8 from other jobs, so wall-clock rates vary 2x run to run;
//! the CPU seconds per GiB, both ends together, are steadier):
//! - QUIC is CPU-bound per packet on loopback: ~4.5 cpu-s/GiB at MTU 1452 (baseline and tuned
//!   alike), ~2.0 at MTU 6500, TCP 0.55. Typical rates: 150-500 MB/s at 1452, 250-670 MB/s at 6500,
//!   TCP 1-3 GB/s.
//! - Windows and stream count change little on loopback (its bandwidth-delay product is tiny);
//!   they matter on real links. 8 MiB socket buffers remove the UDP drops baseline shows.
//! - 4 KiB ping-pong RTT: ~60-100 us p50 (TCP 10-16 us).

use bytes::Bytes;
use std::net::UdpSocket;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twinblk::net::{keygen, Identity, LinkConfig, PeerConn, PeerLink, Tuning, ALPN};

/// `baseline`, `tuned`, or either followed by `+` modifiers: `streamsN`, `winNM` (stream window
/// in MiB), `sockbufNM` (socket buffer MiB, 0 = system), `mtuN`.
fn tuning(variant: &str) -> Tuning {
    let mut parts = variant.split('+');
    let mut t = match parts.next() {
        Some("baseline") => Tuning {
            data_streams: 1,
            stream_window: 1_250_000,
            conn_window: 10_000_000,
            socket_buffer: 0,
            ..Tuning::default()
        },
        _ => Tuning::default(),
    };
    for m in parts {
        let num = |p: &str| {
            m.strip_prefix(p)
                .and_then(|v| v.trim_end_matches('M').parse::<u64>().ok())
        };
        if let Some(n) = num("streams") {
            t.data_streams = n as u8;
        } else if let Some(n) = num("win") {
            t.stream_window = n << 20;
            t.conn_window = 2 * (n << 20);
        } else if let Some(n) = num("sockbuf") {
            t.socket_buffer = (n << 20) as usize;
        } else if let Some(n) = num("mtu") {
            t.mtu_upper_bound = n as u16;
        } else {
            panic!("unknown modifier {m}");
        }
    }
    t
}

/// Both ends' link configs, with fresh keys in `dir`, on two bound loopback sockets.
fn pair_configs(dir: &std::path::Path, t: Tuning) -> [(LinkConfig, UdpSocket); 2] {
    let load = |name: &str| {
        let (k, c, pin) = keygen(name, dir, true).unwrap();
        (Identity::load(&c, &k).unwrap(), pin)
    };
    let (ia, pa) = load("alpha");
    let (ib, pb) = load("beta");
    let (sa, sb) = (
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        UdpSocket::bind("127.0.0.1:0").unwrap(),
    );
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let cfg = |me: &str, ma, id: Identity, peer: &str, paddr, pin: String| LinkConfig {
        resource: "bench".into(),
        local_name: me.into(),
        local_addr: ma,
        identity: id,
        peer_name: peer.into(),
        peer_addr: paddr,
        peer_pin: pin,
        peer_pin_source: twinblk::net::PinSource::Pin,
        alpn: ALPN.to_vec(),
        tuning: t.clone(),
    };
    [
        (cfg("alpha", aa, ia, "beta", ab, pb), sa),
        (cfg("beta", ab, ib, "alpha", aa, pa), sb),
    ]
}

async fn quic_pair(dir: &std::path::Path, t: Tuning) -> (PeerConn, PeerConn, PeerLink, PeerLink) {
    let [(ca, sa), (cb, sb)] = pair_configs(dir, t);
    let a = PeerLink::from_socket(ca, sa).unwrap();
    let b = PeerLink::from_socket(cb, sb).unwrap();
    let (ca, cb) = tokio::join!(a.connect(), b.accept());
    (ca.unwrap(), cb.unwrap(), a, b)
}

/// A sync write's round trip as two daemons see it: each end on its own thread with a
/// current-thread runtime (as `twinblk up` runs), a 4 KiB extent (plus a 48-byte head) on a
/// data stream, a 40-byte ack back on the control stream.
fn quic_extent_ack(t: Tuning, rounds: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let [(ca, sa), (cb, sb)] = pair_configs(dir.path(), t);
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let secondary = std::thread::spawn(move || {
        rt().block_on(async move {
            let link = PeerLink::from_socket(cb, sb).unwrap();
            let mut c = link.accept().await.unwrap();
            let ack = Bytes::from(vec![7u8; 40]);
            while c.rx.recv().await.is_some() {
                if c.control.send(ack.clone()).is_err() {
                    break;
                }
            }
        })
    });
    let rtts = rt().block_on(async move {
        let link = PeerLink::from_socket(ca, sa).unwrap();
        let mut c = link.connect().await.unwrap();
        let extent = Bytes::from(vec![1u8; 4096 + 48]);
        let mut rtts = Vec::with_capacity(rounds);
        for i in 0..rounds + rounds / 10 {
            let t0 = Instant::now();
            c.data[0].send(extent.clone()).unwrap();
            c.rx.recv().await.unwrap();
            // The first tenth warms up (MTU discovery, congestion window).
            if i >= rounds / 10 {
                rtts.push(t0.elapsed());
            }
        }
        c.handle.disconnect(0, "done");
        rtts
    });
    secondary.join().unwrap();
    rtts
}

/// Holds a 0 µs CPU latency request (what `idle-poll` does in the daemons while writes flow)
/// until dropped; `None` (with a note) where it cannot.
fn hold_idle_poll() -> Option<std::fs::File> {
    use std::io::Write;
    let held = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f));
    match held {
        Ok(f) => Some(f),
        Err(e) => {
            println!("--idle-poll: /dev/cpu_dma_latency: {e}; measuring without it");
            None
        }
    }
}

struct Result {
    mb_s: f64,
    msgs_s: f64,
    /// CPU seconds (user + system, whole process: both ends) per GiB moved. On a shared machine
    /// this is steadier than wall-clock rates.
    cpu_s_per_gib: f64,
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

async fn quic_stream(tx: &PeerConn, rx: &mut PeerConn, msg: usize, total: usize) -> Result {
    let n = total / msg;
    let payload = Bytes::from(vec![0xa5u8; msg]);
    let senders = tx.data.clone();
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let send = tokio::spawn(async move {
        for i in 0..n {
            senders[i % senders.len()].send(payload.clone()).unwrap();
        }
    });
    let mut got = 0usize;
    let mut bytes = 0usize;
    while got < n {
        let f = rx.rx.recv().await.expect("connection up");
        bytes += f.bytes.len();
        got += 1;
    }
    let dt = start.elapsed().as_secs_f64();
    send.await.unwrap();
    assert_eq!(bytes, n * msg);
    Result {
        mb_s: bytes as f64 / dt / 1e6,
        msgs_s: n as f64 / dt,
        cpu_s_per_gib: (cpu_seconds() - cpu0) / (bytes as f64 / (1u64 << 30) as f64),
    }
}

async fn quic_pingpong(a: &mut PeerConn, b: &mut PeerConn, rounds: usize) -> Vec<Duration> {
    let msg = Bytes::from(vec![1u8; 4096]);
    let mut rtts = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t0 = Instant::now();
        a.control.send(msg.clone()).unwrap();
        let f = b.rx.recv().await.unwrap();
        b.control.send(f.bytes).unwrap();
        a.rx.recv().await.unwrap();
        rtts.push(t0.elapsed());
    }
    rtts
}

async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
    let (c, s) = (c.unwrap(), s.unwrap().0);
    c.set_nodelay(true).unwrap();
    s.set_nodelay(true).unwrap();
    (c, s)
}

async fn tcp_stream(msg: usize, total: usize) -> Result {
    let (c, mut s) = tcp_pair().await;
    let n = total / msg;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let send = tokio::spawn(async move {
        let mut w = tokio::io::BufWriter::with_capacity(1 << 20, c);
        let payload = vec![0xa5u8; msg];
        for _ in 0..n {
            w.write_all(&(msg as u32).to_le_bytes()).await.unwrap();
            w.write_all(&payload).await.unwrap();
        }
        w.flush().await.unwrap();
    });
    let mut r = tokio::io::BufReader::with_capacity(1 << 20, &mut s);
    let mut buf = vec![0u8; msg];
    let mut bytes = 0;
    for _ in 0..n {
        let len = r.read_u32_le().await.unwrap() as usize;
        r.read_exact(&mut buf[..len]).await.unwrap();
        bytes += len;
    }
    let dt = start.elapsed().as_secs_f64();
    send.await.unwrap();
    Result {
        mb_s: bytes as f64 / dt / 1e6,
        msgs_s: n as f64 / dt,
        cpu_s_per_gib: (cpu_seconds() - cpu0) / (bytes as f64 / (1u64 << 30) as f64),
    }
}

async fn tcp_pingpong(rounds: usize) -> Vec<Duration> {
    let (mut c, mut s) = tcp_pair().await;
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 4100];
        for _ in 0..rounds {
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        }
    });
    let mut msg = vec![1u8; 4100];
    msg[..4].copy_from_slice(&4096u32.to_le_bytes());
    let mut back = vec![0u8; 4100];
    let mut rtts = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t0 = Instant::now();
        c.write_all(&msg).await.unwrap();
        c.read_exact(&mut back).await.unwrap();
        rtts.push(t0.elapsed());
    }
    echo.await.unwrap();
    rtts
}

fn pct(rtts: &mut [Duration], p: f64) -> f64 {
    rtts.sort();
    let i = ((rtts.len() as f64 - 1.0) * p) as usize;
    rtts[i].as_secs_f64() * 1e6
}

fn report(variant: &str, big: &Result, small: &Result, rtts: &mut [Duration]) {
    println!(
        "{variant:<14} 1MiB: {:>6.1} MB/s {:>5.0} msg/s {:>5.2} cpu-s/GiB | 4KiB: {:>6.1} MB/s {:>6.0} msg/s {:>5.2} cpu-s/GiB | 4KiB ping-pong RTT p50 {:>6.1} us p99 {:>7.1} us",
        big.mb_s,
        big.msgs_s,
        big.cpu_s_per_gib,
        small.mb_s,
        small.msgs_s,
        small.cpu_s_per_gib,
        pct(rtts, 0.5),
        pct(rtts, 0.99)
    );
}

fn main() {
    let mut args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let idle_poll = args.iter().any(|a| a == "--idle-poll");
    args.retain(|a| a != "--idle-poll");
    let _held = idle_poll.then(hold_idle_poll).flatten();
    let mut mib = 1024usize;
    if let Some(i) = args.iter().position(|a| a == "--mib") {
        mib = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(mib);
        args.drain(i..(i + 2).min(args.len()));
    }
    let variants: Vec<String> = if args.is_empty() {
        ["baseline", "tuned", "tuned+mtu6500", "tcp"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args
    };
    let total = mib << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{mib} MiB per run, loopback, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    rt.block_on(async {
        for v in &variants {
            if v == "tcp" {
                let big = tcp_stream(1 << 20, total).await;
                let small = tcp_stream(4096, total).await;
                let mut rtts = tcp_pingpong(2000).await;
                report(v, &big, &small, &mut rtts);
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let (mut a, mut b, _la, _lb) = quic_pair(dir.path(), tuning(v)).await;
            let big = quic_stream(&a, &mut b, 1 << 20, total).await;
            let small = quic_stream(&a, &mut b, 4096, total).await;
            let mut rtts = quic_pingpong(&mut a, &mut b, 2000).await;
            report(v, &big, &small, &mut rtts);
            let s = a.handle.stats();
            println!(
                "{:<14} sender: {} UDP datagrams, {} lost packets, path MTU {}, cwnd {}",
                "", s.udp_tx.datagrams, s.path.lost_packets, s.path.current_mtu, s.path.cwnd
            );
        }
    });
    for v in variants.iter().filter(|v| *v != "tcp") {
        let mut rtts = quic_extent_ack(tuning(v), 20_000);
        let mean = rtts.iter().map(Duration::as_secs_f64).sum::<f64>() / rtts.len() as f64;
        println!(
            "{v:<14} extent/ack round trip, two current-thread runtimes: mean {:>5.1} us p50 {:>5.1} us p99 {:>6.1} us",
            mean * 1e6,
            pct(&mut rtts, 0.5),
            pct(&mut rtts, 0.99)
        );
    }
}
