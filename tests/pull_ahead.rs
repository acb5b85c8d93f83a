//! Async pull-ahead with two real daemons over QUIC: a burst of writes larger than
//! `congestion-fill` makes the Primary go Ahead (its peer Behind) instead of making the
//! application wait; once the link drains, a bitmap resync on the live connection brings the
//! peer back, and the backing files end byte-identical.

mod ops_common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use ops_common::{ok, Pair};

/// Collects `twinblk events --json` lines of node i in the background.
fn watch_events(p: &Pair, i: usize) -> (std::process::Child, Arc<Mutex<Vec<String>>>) {
    let mut child = p
        .command(i, &["events", "--now", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("twinblk events");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().expect("events stdout");
    let keep = Arc::clone(&lines);
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            keep.lock().expect("lines").push(l);
        }
    });
    (child, lines)
}

fn saw(lines: &Mutex<Vec<String>>, what: &str) -> bool {
    lines
        .lock()
        .expect("lines")
        .iter()
        .any(|l| l.contains(what))
}

#[test]
fn a_write_burst_past_congestion_fill_pulls_ahead_then_resyncs_to_identical_disks() {
    let mut p = Pair::configure_with(
        "64M",
        "protocol = \"async\"\non-congestion = \"pull-ahead\"\ncongestion-fill = \"1M\"",
        ["", ""],
    );
    p.start_and_wait(0);
    p.start_and_wait(1);
    ok(&p, 0, &["primary", "--force"]);
    p.wait_in_sync();
    let (mut ea, alpha_events) = watch_events(&p, 0);
    let (mut eb, beta_events) = watch_events(&p, 1);
    // `--now` starts with the current state: once it is there, no later change is missed.
    ops_common::wait_until("both event streams connected", || {
        saw(&alpha_events, "\"exists\"") && saw(&beta_events, "\"exists\"")
    });

    // 16 MiB in flight at once through the real NBD export: far past the 1 MiB mark.
    p.fio_verified(0, &["--rw=write", "--bs=1M", "--iodepth=16", "--size=48M"]);

    // Ahead/Behind happened, then the resync on the live connection ended it.
    p.wait_in_sync();
    ops_common::wait_until("alpha's events show Ahead then SyncSource", || {
        saw(&alpha_events, "Ahead") && saw(&alpha_events, "SyncSource")
    });
    ops_common::wait_until("beta's events show Behind then SyncTarget", || {
        saw(&beta_events, "Behind") && saw(&beta_events, "SyncTarget")
    });
    let _ = ea.kill();
    let _ = eb.kill();
    let _ = ea.wait();
    let _ = eb.wait();
    let s = p.status(0).expect("alpha status");
    assert_eq!(s["repl"], "Established", "{s}");
    assert_eq!(s["out_of_sync_bytes"].as_u64().unwrap_or(1), 0, "{s}");

    // Byte-identical once both are down (clean shutdown writes everything out).
    let a = ops_common::down_both_identical(&mut p, "the pull-ahead resync");
    assert!(a.iter().any(|&x| x != 0), "fio's data is on the disk");
}
