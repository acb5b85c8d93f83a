//! `twinblk status --latency` on a real sync pair: after writes through the Primary's NBD
//! socket, the breakdown shows every stage of theirs, on both nodes (the peer's stages as its
//! acks reported them), and the Secondary shows its own. Behaviour only: which stages have
//! samples and whose they are, never how long they took.

mod ops_common;

use std::process::Command;

use ops_common::{ok, Pair};

const NBDSH: &str = "/usr/bin/nbdsh";

fn breakdown(p: &Pair, i: usize) -> serde_json::Value {
    let o = ok(p, i, &["status", "--latency", "--seconds", "60", "--json"]);
    serde_json::from_slice(&o.stdout).expect("status --latency --json is JSON")
}

/// The row of `stage`: (node, count, mean µs).
fn row(v: &serde_json::Value, stage: &str) -> Option<(String, u64, f64)> {
    v["stages"]
        .as_array()?
        .iter()
        .find(|r| r["stage"] == stage)
        .map(|r| {
            (
                r["node"].as_str().unwrap_or_default().to_owned(),
                r["count"].as_u64().unwrap_or(0),
                r["mean_us"].as_f64().unwrap_or(0.0),
            )
        })
}

#[test]
fn status_latency_shows_both_nodes_stages_after_writes() {
    assert!(
        std::path::Path::new(NBDSH).is_file(),
        "{NBDSH} not found: install the Debian package `nbdsh` (libnbd)"
    );
    let p = Pair::new("16M", ["", ""]);
    p.primary_force();
    p.wait_in_sync();

    // Before any client write: nothing to show (the initial sync is not a client write).
    let v = breakdown(&p, 0);
    assert!(row(&v, "total").is_none(), "{v}");

    let o = Command::new(NBDSH)
        .env("PATH", "/usr/bin:/bin")
        .args(["-u", &p.nbd_uri(0)])
        .args([
            "-c",
            "for i in range(32): h.pwrite(b'\\xcd' * 4096, i * 8192)",
        ])
        .output()
        .expect("run nbdsh");
    assert!(o.status.success(), "nbdsh: {o:?}\n{}", p.logs());

    // The Primary: its own stages, the link, and the peer's as its acks reported them.
    let v = breakdown(&p, 0);
    for (stage, node) in [
        ("frontend", "alpha"),
        ("core", "alpha"),
        ("local_disk", "alpha"),
        ("transport", "alpha<->beta"),
        ("peer_receive", "beta"),
        ("peer_queue", "beta"),
        ("peer_disk", "beta"),
        ("peer_ack", "beta"),
        ("ack_receive", "alpha"),
        ("complete", "alpha"),
        ("reply", "alpha"),
        ("total", "alpha"),
    ] {
        let (who, count, mean) = row(&v, stage).unwrap_or_else(|| panic!("no {stage} in {v}"));
        assert_eq!(who, node, "{stage}: {v}");
        assert!(count >= 32, "{stage}: {count} samples for 32 writes: {v}");
        // Disk writes and the round trip take measurable time; hops may round to 0.0 µs.
        if ["local_disk", "peer_disk", "transport", "total"].contains(&stage) {
            assert!(mean > 0.0, "{stage}: {v}");
        }
    }
    assert!(
        row(&v, "apply_disk").is_none(),
        "the Primary applied nothing: {v}"
    );

    // The Secondary: what applying the Primary's writes took there.
    let v = breakdown(&p, 1);
    for stage in ["apply_receive", "apply_queue", "apply_disk", "apply_ack"] {
        let (who, count, _) = row(&v, stage).unwrap_or_else(|| panic!("no {stage} in {v}"));
        assert_eq!(who, "beta", "{v}");
        assert!(count >= 32, "{stage}: {v}");
    }
    assert!(row(&v, "total").is_none(), "beta served no client: {v}");

    // The table names the stages and the nodes.
    let o = ok(&p, 0, &["status", "--latency"]);
    let t = String::from_utf8_lossy(&o.stdout);
    for want in [
        "peer_disk",
        "beta",
        "local_disk",
        "alpha<->beta",
        "total",
        "p99",
    ] {
        assert!(t.contains(want), "{want} missing from:\n{t}");
    }
}
