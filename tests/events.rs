//! `twinblk events`, `status` without a resource and `wait-sync` against two real daemons.

mod ops_common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ops_common::{Pair, WAIT};
use serde_json::Value;

/// A running `twinblk events` whose stdout lines arrive on a channel.
struct Stream {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Stream {
    fn start(p: &Pair, i: usize, args: &[&str]) -> Stream {
        let mut child = p
            .command(i, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn events");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Stream {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line, or a panic naming what was expected and everything seen so far.
    fn next(&mut self, what: &str) -> String {
        match self.lines.recv_timeout(WAIT) {
            Ok(l) => {
                self.seen.push(l.clone());
                l
            }
            Err(_) => panic!("no event line ({what}); seen:\n{}", self.seen.join("\n")),
        }
    }

    /// Skip lines until one satisfies `ok`.
    fn until(&mut self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            let l = self.next(what);
            if ok(&l) {
                return l;
            }
        }
        panic!(
            "timed out waiting for {what}; seen:\n{}",
            self.seen.join("\n")
        );
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(l: &str) -> Value {
    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
}

#[test]
fn events_stream_current_state_then_changes() {
    let p = Pair::new("16M", ["", ""]);
    // Both connected, neither has good data yet.
    for i in 0..2 {
        p.wait(i, "connected", |s| s["repl"] != "Connecting");
    }

    let mut human = Stream::start(&p, 0, &["events", "--now"]);
    let first = human.next("exists resource");
    assert!(
        first.starts_with("exists resource name:r0 role:Secondary may-promote:no"),
        "{first}"
    );
    assert!(human
        .next("exists device")
        .starts_with("exists device name:r0 disk:"));
    assert!(human
        .next("exists connection")
        .starts_with("exists connection name:r0 peer-node:beta connection:"));
    assert!(human
        .next("exists peer-device")
        .starts_with("exists peer-device name:r0 peer-node:beta replication:"));
    assert_eq!(human.next("end of exists"), "exists -");

    let mut js = Stream::start(&p, 0, &["events", "--now", "--json"]);
    let objects: Vec<Value> = (0..5).map(|_| json(&js.next("exists (json)"))).collect();
    let names: Vec<&str> = objects
        .iter()
        .map(|o| o["object"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        names,
        ["resource", "device", "connection", "peer-device", "-"]
    );
    for o in &objects {
        assert_eq!(o["type"], "exists", "{o}");
        assert_eq!(o["resource"], "r0", "{o}");
        assert_eq!(o["node"], "alpha", "{o}");
        assert!(o["time"].as_f64().is_some_and(|t| t > 1.0e9), "{o}");
    }
    assert_eq!(objects[0]["role"], "Secondary");

    p.primary_force();

    // The promotion, in both forms, then the initial full sync to beta, to its end.
    let l = human.until("role:Primary", |l| {
        l.starts_with("change resource name:r0 role:Primary")
    });
    assert!(
        l.contains("may-promote:no"),
        "a Primary may not promote: {l}"
    );
    let v = json(&js.until("role Primary (json)", |l| {
        let v = json(l);
        v["type"] == "change" && v["object"] == "resource" && v["role"] == "Primary"
    }));
    assert_eq!(v["may_promote"], false);
    assert_eq!(v["split_brain"], false);
    human.until("disk UpToDate", |l| {
        l.starts_with("change device name:r0 disk:UpToDate")
    });
    human.until("in sync with an UpToDate peer", |l| {
        l.starts_with(
            "change peer-device name:r0 peer-node:beta replication:Established peer-disk:UpToDate",
        )
    });
    assert!(
        human
            .seen
            .iter()
            .any(|l| l.contains("replication:SyncSource")),
        "the full sync must show as SyncSource: {:#?}",
        human.seen
    );
    // Every JSON line is an object with the fixed envelope.
    while let Ok(l) = js.lines.recv_timeout(Duration::from_millis(500)) {
        let v = json(&l);
        assert!(
            matches!(v["type"].as_str(), Some("change" | "dropped")),
            "{v}"
        );
    }

    // The peer sees alpha's new role, and may not promote while alpha is Primary.
    let mut peer = Stream::start(&p, 1, &["events", "--now"]);
    let l = peer.next("beta resource");
    assert!(
        l.starts_with("exists resource name:r0 role:Secondary may-promote:no"),
        "{l}"
    );
    let l = peer.until("beta connection", |l| l.starts_with("exists connection"));
    assert!(l.contains("peer-role:Primary"), "{l}");

    // Demoting alpha makes beta eligible.
    let o = p.cli(0, &["secondary"]);
    assert!(o.status.success(), "secondary: {o:?}");
    peer.until("beta may promote", |l| {
        l.starts_with("change resource name:r0 role:Secondary may-promote:yes")
    });
}

#[test]
fn status_without_a_resource_lists_running_ones() {
    let p = Pair::new("8M", ["", ""]);
    // A file that is not a resource file must not hide the others.
    std::fs::write(p.path("notes.toml"), "this is not [ a resource file").expect("write");
    let dir = p.dir.path().to_str().expect("utf-8");
    let o = ops_common::run(&["status", "--config-dir", dir, "--node", "alpha", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let all: Value = serde_json::from_slice(&o.stdout).expect("json array");
    let all = all.as_array().expect("array");
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["resource"], "r0");

    let o = ops_common::run(&["status", "--config-dir", dir, "--node", "alpha"]);
    assert!(o.status.success(), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("r0 ("), "{text}");

    // No daemon for a node named nowhere.
    let o = ops_common::run(&["status", "--config-dir", dir, "--node", "gamma"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("no resource is running"),
        "{o:?}"
    );
}

#[test]
fn wait_sync_waits_for_the_initial_sync_and_fails_when_standalone() {
    let p = Pair::new("32M", ["", ""]);
    p.primary_force();
    let o = p.cli(0, &["wait-sync", "--timeout", "120"]);
    assert!(o.status.success(), "wait-sync: {o:?}\n{}", p.logs());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.ends_with("r0: in sync (both disks UpToDate)\n"),
        "{out}"
    );
    // wait-sync said so, so status must agree right now.
    let s = p.status(0).expect("status");
    assert_eq!(s["repl"], "Established");
    assert_eq!(s["peer_disk"], "UpToDate");

    let o = p.cli(0, &["disconnect"]);
    assert!(o.status.success(), "disconnect: {o:?}");
    p.wait(0, "StandAlone", |s| s["repl"] == "StandAlone");
    let o = p.cli(0, &["wait-sync", "--timeout", "60"]);
    assert!(!o.status.success(), "wait-sync must fail when StandAlone");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("StandAlone"), "{err}");
}

#[test]
fn split_brain_shows_in_events_and_ends_wait_sync() {
    let p = Pair::new("8M", ["", ""]);
    p.primary_force();
    p.wait_in_sync();
    for i in 0..2 {
        let o = p.cli(i, &["disconnect"]);
        assert!(o.status.success(), "disconnect: {o:?}");
        p.wait(i, "StandAlone", |s| s["repl"] == "StandAlone");
    }
    // Both Primary and written while apart, then alpha steps down: a real split brain, which
    // the next handshake must find (not merely "both are Primary").
    let o = p.cli(1, &["primary"]);
    assert!(o.status.success(), "beta primary: {o:?}\n{}", p.logs());
    for (i, pattern) in [(0, "0x11"), (1, "0x22")] {
        let o = std::process::Command::new("qemu-io")
            .args(["-f", "raw", &p.nbd_uri(i), "-c"])
            .arg(format!("write -P {pattern} 0 64k"))
            .output()
            .expect("run qemu-io (Debian package qemu-utils)");
        assert!(o.status.success(), "write on node {i}: {o:?}\n{}", p.logs());
    }
    let o = p.cli(0, &["secondary"]);
    assert!(o.status.success(), "alpha secondary: {o:?}\n{}", p.logs());

    let mut beta = Stream::start(&p, 1, &["events", "--now", "--json"]);
    beta.until("end of exists", |l| json(l)["object"] == "-");
    for i in 0..2 {
        let o = p.cli(i, &["connect"]);
        assert!(o.status.success(), "connect: {o:?}");
    }
    let l = json(&beta.until("split brain", |l| {
        let v = json(l);
        v["object"] == "resource" && v["split_brain"] == true
    }));
    assert_eq!(l["role"], "Primary", "{l}");

    let o = p.cli(1, &["wait-sync", "--timeout", "120"]);
    assert!(!o.status.success(), "wait-sync must fail on split brain");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("split brain"), "{err}");
}
