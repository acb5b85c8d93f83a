//! Prometheus metrics of a real daemon pair, scraped over HTTP after NBD writes made with
//! libnbd's nbdsh.

mod ops_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use ops_common::{Pair, WAIT};

const NBDSH: &str = "/usr/bin/nbdsh";

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    out
}

/// The value of the sample whose name and labels start with `prefix` (labels as rendered,
/// `resource` and `node` first).
fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix) && l.as_bytes().get(prefix.len()) == Some(&b' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_value(port: u16, prefix: &str, ok: impl Fn(f64) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = scrape(port);
        if value(&text, prefix).is_some_and(&ok) {
            return text;
        }
        assert!(
            start.elapsed() < WAIT,
            "waited for {prefix}; last scrape:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_of_a_replicating_pair() {
    assert!(
        std::path::Path::new(NBDSH).is_file(),
        "{NBDSH} not found: install the Debian package `nbdsh` (libnbd)"
    );
    let ports = [ops_common::free_tcp_port(), ops_common::free_tcp_port()];
    let p = Pair::new(
        "16M",
        [
            &format!("metrics = \"127.0.0.1:{}\"", ports[0]),
            &format!("metrics = \"127.0.0.1:{}\"", ports[1]),
        ],
    );
    p.primary_force();
    p.wait_in_sync();

    const A: &str = r#"{resource="r0",node="alpha""#;
    const B: &str = r#"{resource="r0",node="beta""#;
    // The initial full sync copied the whole 16 MiB device to beta, and beta counted it too.
    let t = wait_value(ports[0], &format!("twinblk_resync_bytes_total{A}}}"), |v| {
        v >= 16.0 * 1024.0 * 1024.0
    });
    assert_eq!(
        value(&t, &format!("twinblk_resync_remaining_bytes{A}}}")),
        Some(0.0),
        "{t}"
    );
    wait_value(ports[1], &format!("twinblk_resync_bytes_total{B}}}"), |v| {
        v >= 16.0 * 1024.0 * 1024.0
    });

    // 16 writes of 64 KiB, one flush, two reads, through the Primary's NBD socket.
    let o = Command::new(NBDSH)
        // nbdsh runs `env python3`: the system one, which has libnbd's module.
        .env("PATH", "/usr/bin:/bin")
        .args(["-u", &p.nbd_uri(0)])
        .args([
            "-c",
            "for i in range(16): h.pwrite(b'\\xab' * 65536, i * 65536)",
            "-c",
            "h.flush()",
            "-c",
            "assert h.pread(4096, 0) == b'\\xab' * 4096",
            "-c",
            "assert h.pread(65536, 65536) == b'\\xab' * 65536",
        ])
        .output()
        .expect("run nbdsh");
    assert!(o.status.success(), "nbdsh: {o:?}\n{}", p.logs());

    let t = wait_value(ports[0], &format!("twinblk_writes_total{A}}}"), |v| {
        v == 16.0
    });
    let v = |name: &str| value(&t, &format!("{name}{A}}}"));
    assert_eq!(
        v("twinblk_written_bytes_total"),
        Some(16.0 * 65536.0),
        "{t}"
    );
    assert_eq!(v("twinblk_flushes_total"), Some(1.0), "{t}");
    assert_eq!(v("twinblk_reads_total"), Some(2.0), "{t}");
    assert_eq!(v("twinblk_read_bytes_total"), Some(4096.0 + 65536.0), "{t}");
    assert_eq!(v("twinblk_io_errors_total"), Some(0.0), "{t}");
    // The event loop's busy-poll is exported, and off by default: not one round.
    assert_eq!(v("twinblk_busy_poll_rounds_total"), Some(0.0), "{t}");
    assert_eq!(v("twinblk_busy_poll_hits_total"), Some(0.0), "{t}");
    // Sync protocol: every write's latency was observed end to end, and each hit the disk.
    assert_eq!(v("twinblk_write_latency_seconds_count"), Some(16.0), "{t}");
    assert!(
        v("twinblk_local_write_latency_seconds_count").is_some_and(|c| c >= 16.0),
        "{t}"
    );
    // The latency breakdown: every write's stages, the peer's too (reported with its acks).
    for stage in ["local_disk", "transport", "peer_disk", "total"] {
        let n = value(
            &t,
            &format!("twinblk_write_stage_seconds_count{A},stage=\"{stage}\"}}"),
        );
        assert!(n.is_some_and(|c| c >= 16.0), "{stage}: {t}");
    }
    // The idle poll (`idle-poll`, on by default) took its CPU latency request for the writes on
    // both nodes, and released it once they stopped; a daemon that may not open the device
    // (not root) said why instead.
    let may_hold = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .is_ok();
    for (port, labels) in [(ports[0], A), (ports[1], B)] {
        let t = wait_value(port, &format!("twinblk_idle_poll_held{labels}}}"), |v| {
            v == 0.0
        });
        let holds = value(&t, &format!("twinblk_idle_poll_holds_total{labels}}}"));
        if may_hold {
            assert!(holds.is_some_and(|n| n >= 1.0), "{t}");
        } else {
            assert_eq!(holds, Some(0.0), "{t}");
            assert!(p.logs().contains("idle-poll: cannot open"), "{}", p.logs());
        }
    }
    // All acked: nothing in flight to the peer.
    assert_eq!(v("twinblk_peer_inflight_requests"), Some(0.0), "{t}");
    assert_eq!(v("twinblk_peer_inflight_bytes"), Some(0.0), "{t}");

    // State gauges (refreshed at least once a second).
    let t = wait_value(ports[0], &format!("twinblk_connected{A}}}"), |v| v == 1.0);
    let one = |labels: &str| value(&t, labels) == Some(1.0);
    assert!(one(&format!("twinblk_role{A},role=\"Primary\"}}")), "{t}");
    assert!(
        one(&format!("twinblk_disk_state{A},state=\"UpToDate\"}}")),
        "{t}"
    );
    assert!(
        one(&format!(
            "twinblk_replication_state{A},state=\"Established\"}}"
        )),
        "{t}"
    );
    assert!(
        one(&format!("twinblk_peer_disk_state{A},state=\"UpToDate\"}}")),
        "{t}"
    );
    assert_eq!(
        value(&t, &format!("twinblk_may_promote{A}}}")),
        Some(0.0),
        "{t}"
    );
    assert_eq!(
        value(&t, &format!("twinblk_split_brain{A}}}")),
        Some(0.0),
        "{t}"
    );
    assert_eq!(
        value(&t, &format!("twinblk_out_of_sync_bytes{A}}}")),
        Some(0.0),
        "{t}"
    );

    // The Secondary wrote the same 16 extents to its disk and is not the Primary.
    let t = wait_value(
        ports[1],
        &format!("twinblk_peer_role{B},role=\"Primary\"}}"),
        |v| v == 1.0,
    );
    assert!(
        value(
            &t,
            &format!("twinblk_local_write_latency_seconds_count{B}}}")
        )
        .is_some_and(|c| c >= 16.0),
        "{t}"
    );
    assert_eq!(
        value(&t, &format!("twinblk_writes_total{B}}}")),
        Some(0.0),
        "beta served no client writes: {t}"
    );
    assert_eq!(
        value(&t, &format!("twinblk_role{B},role=\"Secondary\"}}")),
        Some(1.0),
        "{t}"
    );

    // The Grafana dashboard only uses names the daemon exports.
    let alpha = scrape(ports[0]);
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/grafana-dashboard.json"
    ))
    .expect("read tools/grafana-dashboard.json");
    let mut names: Vec<&str> = dash
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("twinblk_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 15, "{names:?}");
    for n in names {
        assert!(
            alpha.lines().any(|l| l.starts_with(&format!("{n}{{"))),
            "the dashboard uses {n}, which the daemon does not export:\n{alpha}"
        );
    }
}
