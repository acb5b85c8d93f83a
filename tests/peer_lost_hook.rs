//! `on-peer-lost`: a Primary that loses its UpToDate peer holds the writes waiting for that peer
//! until the hook exits 0; a failing hook keeps them held (and is retried). Real daemons over
//! QUIC, a real NBD client (raw protocol, so the test sees exactly when the write is answered),
//! and a hook script that records its arguments and waits for the test to let it exit.

mod nbd_common;
mod ops_common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nbd_common::{Raw, Sock, Transport};
use ops_common::{wait_until, Pair};
use twinblk::nbd::proto::CMD_WRITE;

const HOOK: &str = r#"#!/bin/sh
# Test hook: record the call, then exit with the code the test writes into `release`.
d=$(dirname "$0")
echo "$# $1 $2 $TWINBLK_RESOURCE $TWINBLK_PEER" >> "$d/hook.args"
touch "$d/hook.started"
while [ ! -s "$d/release" ]; do sleep 0.1; done
code=$(cat "$d/release")
[ "$code" = 0 ] && touch "$d/hook.done"
exit "$code"
"#;

fn set_timeout(c: &Raw, t: Duration) {
    match &c.sock {
        Sock::Unix(s) => s.set_read_timeout(Some(t)).unwrap(),
        Sock::Tcp(s) => s.set_read_timeout(Some(t)).unwrap(),
    }
}

/// Replace `release` atomically, so the hook never reads a half-written code.
fn release(p: &Pair, code: &str) {
    let tmp = p.path("release.tmp");
    std::fs::write(&tmp, code).unwrap();
    std::fs::rename(&tmp, p.path("release")).unwrap();
}

/// Nothing arrives on the connection for a while: the write is still held.
fn assert_no_reply(c: &mut Raw, p: &Pair, when: &str) {
    set_timeout(c, Duration::from_secs(2));
    match c.reply(0) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!(
            "{when}: the write was answered ({other:?}) while on-peer-lost had not exited 0\n{}",
            p.logs()
        ),
    }
}

#[test]
fn writes_wait_for_the_on_peer_lost_hook() {
    let mut p = Pair::configure_with(
        "64M",
        "on-peer-lost = \"{dir}/hook.sh\"\ntimeout = \"2s\"\nping-interval = \"500ms\"",
        ["", ""],
    );
    let hook = p.path("hook.sh");
    std::fs::write(&hook, HOOK).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.start_and_wait(0);
    p.start_and_wait(1);
    let o = p.cli(0, &["primary", "--force"]);
    assert!(o.status.success(), "primary --force: {o:?}");
    p.wait_in_sync();

    let mut c = Raw::connect(Transport::Unix, p.nbd_socket(0).to_str().unwrap());
    c.handshake(false, "r0");
    let block = vec![0x5a; 4096];
    c.send(CMD_WRITE, 0, 1, 0, 4096, &block);
    let (cookie, err, _) = c.reply(0).unwrap();
    assert_eq!((cookie, err), (1, 0), "write with the peer connected");
    let s = p.status(0).unwrap();
    assert_eq!(s["peer_lost_hook"]["state"], "idle", "alpha: {s}");

    // The peer dies; a write issued now waits for its ack, then for the hook.
    p.kill(1);
    c.send(CMD_WRITE, 0, 2, 4096, 4096, &block);
    wait_until("the hook to start", || p.path("hook.started").exists());
    let s = p.status(0).unwrap();
    assert_eq!(s["peer_lost_hook"]["state"], "running", "alpha: {s}");
    assert_eq!(s["peer_lost_hook"]["frozen"], true, "alpha: {s}");
    assert_no_reply(&mut c, &p, "hook running");

    // A failing hook keeps the writes frozen and says so in status.
    release(&p, "1");
    let s = p.wait(0, "the failed hook in status", |s| {
        s["peer_lost_hook"]["state"] == "failed"
    });
    assert_eq!(s["peer_lost_hook"]["frozen"], true, "alpha: {s}");
    assert_eq!(s["peer_lost_hook"]["last_exit_code"], 1, "alpha: {s}");
    assert!(s["peer_lost_hook"]["last_error"].is_string(), "alpha: {s}");
    assert_no_reply(&mut c, &p, "hook failed");
    assert!(!p.path("hook.done").exists());

    // The retry succeeds: only now is the write answered, successfully.
    release(&p, "0");
    set_timeout(&c, ops_common::WAIT);
    let (cookie, err, _) = c.reply(0).unwrap();
    assert_eq!((cookie, err), (2, 0), "the held write\n{}", p.logs());
    assert!(
        p.path("hook.done").exists(),
        "the write completed before the hook exited 0"
    );

    let args = std::fs::read_to_string(p.path("hook.args")).unwrap();
    let runs: Vec<&str> = args.lines().collect();
    assert!(runs.len() >= 2, "expected a failed run and a retry: {args}");
    for r in runs {
        assert_eq!(r, "2 r0 beta r0 beta", "hook arguments and environment");
    }
    let s = p.wait(0, "alpha continuing alone", |s| {
        s["peer_lost_hook"]["frozen"] == false
    });
    assert_eq!(s["peer_lost_hook"]["state"], "succeeded", "alpha: {s}");
    assert_eq!(s["role"], "Primary", "alpha: {s}");
    assert!(s["out_of_sync_bytes"].as_u64() > Some(0), "alpha: {s}");
    // And it goes on writing without the peer.
    c.send(CMD_WRITE, 0, 3, 8192, 4096, &block);
    let (cookie, err, _) = c.reply(0).unwrap();
    assert_eq!((cookie, err), (3, 0), "a write after the hook");
}

#[test]
fn without_a_hook_the_primary_continues_at_once() {
    let mut p = Pair::configure_with(
        "64M",
        "timeout = \"2s\"\nping-interval = \"500ms\"",
        ["", ""],
    );
    p.start_and_wait(0);
    p.start_and_wait(1);
    let o = p.cli(0, &["primary", "--force"]);
    assert!(o.status.success(), "primary --force: {o:?}");
    p.wait_in_sync();
    let mut c = Raw::connect(Transport::Unix, p.nbd_socket(0).to_str().unwrap());
    c.handshake(false, "r0");
    p.kill(1);
    c.send(CMD_WRITE, 0, 1, 0, 4096, &[7; 4096]);
    set_timeout(&c, ops_common::WAIT);
    let (cookie, err, _) = c.reply(0).unwrap();
    assert_eq!(
        (cookie, err),
        (1, 0),
        "write after the peer died\n{}",
        p.logs()
    );
    let s = p.status(0).unwrap();
    assert_eq!(s["peer_lost_hook"]["frozen"], false, "alpha: {s}");
    assert!(s["peer_lost_hook"]["command"].is_null(), "alpha: {s}");
}

#[test]
fn on_peer_lost_must_be_an_absolute_path() {
    let nodes =
        "[node.a]\naddress = \"127.0.0.1:7000\"\ndisk = \"/d/a\"\nnbd = \"unix:/d/a.nbd\"\n\
                 admin = \"/d/a.sock\"\ncert = \"/d/a.crt\"\nkey = \"/d/a.key\"\n\
                 [node.b]\naddress = \"127.0.0.1:7001\"\ndisk = \"/d/b\"\nnbd = \"unix:/d/b.nbd\"\n\
                 admin = \"/d/b.sock\"\ncert = \"/d/b.crt\"\nkey = \"/d/b.key\"\n";
    let with = |v: &str| format!("[resource]\nname = \"r0\"\non-peer-lost = \"{v}\"\n{nodes}");
    let c = twinblk::config::Config::from_str(&with("/usr/local/sbin/fence")).unwrap();
    assert_eq!(
        c.resource.on_peer_lost.as_deref(),
        Some(std::path::Path::new("/usr/local/sbin/fence"))
    );
    let e = twinblk::config::Config::from_str(&with("fence.sh"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("resource.on-peer-lost") && e.contains("absolute path"),
        "{e}"
    );
    let c =
        twinblk::config::Config::from_str(&format!("[resource]\nname = \"r0\"\n{nodes}")).unwrap();
    assert!(c.resource.on_peer_lost.is_none());
}
