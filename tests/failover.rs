//! Failover with real daemons on 127.0.0.1 (issue #4): kill -9 of a sync Primary while a client
//! writes, promotion of the Secondary, every acknowledged write found there, the old Primary
//! back as Secondary resyncing only what changed; and a real split brain, reported on both
//! nodes and resolved with `connect --discard-my-data`.
//!
//! Corrupt metadata refused by `up` is tested in tests/metadata.rs
//! (`up_refuses_corrupt_metadata` and its neighbours), not repeated here.
//!
//! The writer is a raw NBD client (tests/nbd_common): every 4 KiB block it writes carries its
//! block number and a write version, so the test knows exactly which writes were acknowledged
//! before the kill and can check each one on the promoted node.

mod nbd_common;
mod ops_common;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nbd_common::{Raw, Transport};
use ops_common::acked::{block, version_of};
use ops_common::{Pair, NAMES};
use twinblk::nbd::proto::*;

const BS: usize = 4096;
const FIO: &str = "/usr/bin/fio";

fn need_fio() {
    assert!(
        Path::new(FIO).is_file(),
        "fio not found: install the Debian package fio"
    );
}

fn connect(p: &Pair, i: usize) -> Raw {
    let sock = p.path(&format!("{}.nbd", NAMES[i]));
    let mut c = Raw::connect(Transport::Unix, sock.to_str().expect("utf-8 path"));
    c.handshake(true, "");
    c
}

/// What the writer learned: per block, the newest acknowledged version and every version sent.
#[derive(Default)]
struct Record {
    acked: HashMap<u64, u64>,
    sent: HashMap<u64, Vec<u64>>,
    acks: u64,
}

/// Random 4 KiB writes with `qd` in flight until the connection breaks (or `max` acks).
/// Versions start after `base`, so two writers' blocks never look alike.
fn write_until_broken(mut c: Raw, blocks: u64, qd: usize, max: u64, base: u64) -> Record {
    let mut r = Record::default();
    let mut x = base | 1;
    let mut version = base;
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    loop {
        while inflight.len() < qd && r.acks + (inflight.len() as u64) < max {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x % blocks;
            version += 1;
            let data = block(b, version);
            // A send error means the server is gone: the reply loop below notices it too.
            let mut req = Vec::new();
            twinblk::nbd::codec::encode_request(
                &mut req,
                &twinblk::nbd::codec::RequestHeader {
                    flags: 0,
                    kind: CMD_WRITE,
                    cookie: version,
                    offset: b * BS as u64,
                    len: BS as u32,
                },
            );
            req.extend_from_slice(&data);
            r.sent.entry(b).or_default().push(version);
            inflight.push_back((version, b));
            if std::io::Write::write_all(&mut c.sock, &req).is_err() {
                return r;
            }
        }
        if inflight.is_empty() {
            return r;
        }
        match c.reply(0) {
            Ok((cookie, 0, _)) => {
                let Some(pos) = inflight.iter().position(|&(v, _)| v == cookie) else {
                    panic!("reply for unknown cookie {cookie}");
                };
                let (v, b) = inflight.remove(pos).expect("position is valid");
                let e = r.acked.entry(b).or_insert(0);
                *e = (*e).max(v);
                r.acks += 1;
            }
            // An error reply is not an acknowledgement; the write may or may not be anywhere.
            Ok((cookie, _, _)) => inflight.retain(|&(v, _)| v != cookie),
            Err(_) => return r,
        }
    }
}

/// Every acknowledged write is on node `i`: each written block holds its newest acked version
/// or a later version that was sent (and maybe applied) but not acked.
fn check_acked_writes(p: &Pair, i: usize, r: &Record) -> usize {
    let mut c = connect(p, i);
    let mut checked = 0;
    let mut blocks: Vec<_> = r.sent.keys().copied().collect();
    blocks.sort_unstable();
    for (n, b) in blocks.iter().enumerate() {
        c.send(CMD_READ, 0, n as u64 + 1, b * BS as u64, BS as u32, &[]);
        let (cookie, err, data) = c.reply(BS).expect("read reply");
        assert_eq!((cookie, err), (n as u64 + 1, 0), "read of block {b}");
        let have = version_of(*b, &data).unwrap_or_else(|e| panic!("{}: {e}", NAMES[i]));
        let acked = r.acked.get(b).copied().unwrap_or(0);
        let sent = r.sent.get(b).map(Vec::as_slice).unwrap_or(&[]);
        assert!(
            have >= acked && (have == 0 || sent.contains(&have)),
            "{}: block {b} holds version {have}, but version {acked} was acknowledged \
             (sent: {sent:?})",
            NAMES[i]
        );
        if acked > 0 {
            checked += 1;
        }
    }
    checked
}

/// The same check on a disk image (a Secondary's export refuses reads).
fn check_acked_image(img: &[u8], r: &Record) -> usize {
    let mut checked = 0;
    for (b, sent) in &r.sent {
        let at = *b as usize * BS;
        let data = img.get(at..at + BS).expect("block inside the image");
        let have = version_of(*b, data).unwrap_or_else(|e| panic!("{e}"));
        let acked = r.acked.get(b).copied().unwrap_or(0);
        assert!(
            have >= acked && (have == 0 || sent.contains(&have)),
            "block {b} holds version {have}, but version {acked} was acknowledged (sent: {sent:?})"
        );
        if acked > 0 {
            checked += 1;
        }
    }
    checked
}

fn scrape(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    out.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from metrics:\n{out}"))
}

fn cli_ok(p: &Pair, i: usize, args: &[&str]) -> String {
    let o = p.cli(i, args);
    assert!(
        o.status.success(),
        "{} {args:?}: {}{}\n{}",
        NAMES[i],
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        p.logs()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `primary` as an operator would: plain first, `--force` only if that is refused.
fn promote(p: &Pair, i: usize) -> bool {
    let o = p.cli(i, &["primary"]);
    if o.status.success() {
        return false;
    }
    cli_ok(p, i, &["primary", "--force"]);
    true
}

fn down(p: &mut Pair, i: usize) {
    cli_ok(p, i, &["down"]);
    let mut c = p.children[i].take().expect("daemon running");
    let st = c.wait().expect("wait for daemon");
    assert!(st.success(), "{} exited with {st}\n{}", NAMES[i], p.logs());
}

const MIB: u64 = 1 << 20;

#[test]
fn sync_primary_killed_secondary_promoted_old_primary_resyncs_only_changes() {
    need_fio();
    const SIZE: u64 = 256 * MIB;
    const AL_EXTENTS: u64 = 4;
    const AL_EXTENT: u64 = 4 * MIB;
    const WRITTEN_WHILE_DOWN: u64 = 32 * MIB;
    let ports = [ops_common::free_tcp_port(), ops_common::free_tcp_port()];
    let mut p = Pair::configure(
        "256M",
        [
            &format!("metrics = \"127.0.0.1:{}\"", ports[0]),
            &format!("metrics = \"127.0.0.1:{}\"", ports[1]),
        ],
    );
    // A small activity log, so the crashed Primary's share of the resync is bounded well
    // below the device size.
    for i in 0..2 {
        cli_ok(
            &p,
            i,
            &[
                "create-md",
                "--force",
                "--al-extents",
                &AL_EXTENTS.to_string(),
            ],
        );
    }
    for i in 0..2 {
        p.start(i, &[]);
        p.wait(i, "the daemon answers status", |_| true);
    }
    p.primary_force();
    p.wait_in_sync();

    // (1) The writer runs against alpha; alpha is killed while writes are in flight.
    let c = connect(&p, 0);
    let writer =
        std::thread::spawn(move || write_until_broken(c, SIZE / BS as u64, 16, u64::MAX, 42 << 32));
    let t = Instant::now();
    // Let it write a while (in-flight writes at the kill are what matters, not the amount).
    while t.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(100));
    }
    p.children[0]
        .as_mut()
        .expect("alpha runs")
        .kill()
        .expect("kill -9 alpha");
    p.children[0].take().map(|mut c| c.wait());
    let rec = writer.join().expect("writer thread");
    assert!(
        rec.acks > 100,
        "the writer got only {} acks\n{}",
        rec.acks,
        p.logs()
    );

    // (2) beta notices and is promoted; every acknowledged write is there.
    p.wait(1, "the connection loss", |s| s["repl"] != "Established");
    let forced = promote(&p, 1);
    let s = p.status(1).expect("beta status");
    assert_eq!(s["role"], "Primary", "{s}");
    let checked = check_acked_writes(&p, 1, &rec);
    assert!(checked > 100, "only {checked} acked blocks checked");
    eprintln!(
        "beta promoted (force: {forced}); {} writes acked before the kill, {checked} blocks checked",
        rec.acks
    );

    // (3) A known amount of new data on beta: fio's random map writes each block once.
    let o = Command::new(FIO)
        .current_dir(p.dir.path())
        .args([
            "--name=failover",
            "--ioengine=nbd",
            &format!("--uri={}", p.nbd_uri(1)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={SIZE}"),
            &format!("--io_size={WRITTEN_WHILE_DOWN}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--randseed=7",
        ])
        .output()
        .expect("run fio");
    assert!(
        o.status.success(),
        "fio on beta: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // (4) alpha returns: Secondary, SyncTarget of only the changed blocks. What its activity
    // log named at the crash is resynced too: at most `al_extents` extents, a hard bound (16
    // writes in flight over 64 extents would otherwise pin up to 16).
    let o = p.cli(0, &["dump-md", "--json"]);
    assert!(o.status.success(), "dump-md: {o:?}");
    let md: serde_json::Value = serde_json::from_slice(&o.stdout).expect("dump-md json");
    assert_eq!(md["primary"], true, "alpha crashed as Primary: {md}");
    let al_len = md["activity_log"]["extents"]
        .as_array()
        .map_or(0, |a| a.len() as u64);
    assert!(al_len >= 1, "{md}");
    assert!(
        al_len <= AL_EXTENTS,
        "the activity log held {al_len} extents, configured {AL_EXTENTS}: {md}"
    );
    p.start(0, &[]);
    p.wait_in_sync();
    let s = p.status(0).expect("alpha status");
    assert_eq!(s["role"], "Secondary", "{s}");
    let resynced = scrape(ports[0], "twinblk_resync_bytes_total") as u64;
    let bound = WRITTEN_WHILE_DOWN + al_len * AL_EXTENT;
    eprintln!(
        "resynced {resynced} bytes after {WRITTEN_WHILE_DOWN} bytes written while alpha was down \
         and {al_len} activity-log extents (configured {AL_EXTENTS}); bound {bound}; device {SIZE}"
    );
    assert!(
        resynced >= WRITTEN_WHILE_DOWN,
        "resync copied {resynced} bytes, less than the {WRITTEN_WHILE_DOWN} written on beta"
    );
    assert!(
        resynced <= bound + bound / 10,
        "resync copied {resynced} bytes, more than written while down plus the activity log \
         ({bound}); device size {SIZE}"
    );
    assert!(resynced < SIZE / 2, "resync was nearly a full sync");

    // (5) Both down: the two disks are byte-identical.
    ops_common::down_both_identical(&mut p, "the failover and the old Primary's resync");
}

#[test]
fn split_brain_is_reported_on_both_and_resolved_by_discard_my_data() {
    let mut p = Pair::new("16M", ["", ""]);
    p.primary_force();
    p.wait_in_sync();
    for i in 0..2 {
        cli_ok(&p, i, &["disconnect"]);
        p.wait(i, "StandAlone", |s| s["repl"] == "StandAlone");
    }
    let forced = promote(&p, 1);
    eprintln!("beta promoted while disconnected (force: {forced})");
    // Both write as Primary: alpha versions 1.., beta versions 1000.. on overlapping blocks.
    let mut rec = [Record::default(), Record::default()];
    for (i, r) in rec.iter_mut().enumerate() {
        *r = write_until_broken(connect(&p, i), 64, 4, 40, (i as u64 + 1) << 32);
        assert_eq!(r.acks, 40, "{}: writes failed", NAMES[i]);
    }
    // Two Primaries are refused before anything else: the operator demotes one first.
    cli_ok(&p, 1, &["secondary"]);
    for i in 0..2 {
        cli_ok(&p, i, &["connect"]);
    }
    // Both detect it, explain it, and stay StandAlone.
    for i in 0..2 {
        let s = p.wait(i, "a split brain report", |s| !s["split_brain"].is_null());
        let sb = &s["split_brain"];
        assert!(sb["changed_blocks"].as_u64().unwrap_or(0) > 0, "{s}");
        assert!(sb["peer_changed_blocks"].as_u64().unwrap_or(0) > 0, "{s}");
        let cmds = format!("{} {}", sb["keep_this_nodes_data"], sb["keep_peers_data"]);
        assert!(cmds.contains("--discard-my-data"), "{s}");
        // Issue 18: by the nodes' names, not "on node 2".
        assert!(
            cmds.contains("on alpha: ") && cmds.contains("on beta: ") && !cmds.contains("node 2"),
            "{s}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    for (i, name) in NAMES.iter().enumerate() {
        let s = p.status(i).expect("status");
        assert_eq!(s["repl"], "StandAlone", "{name}: {s}");
        assert!(!s["split_brain"].is_null(), "{name}: {s}");
    }
    let human = String::from_utf8_lossy(&p.cli(0, &["status"]).stdout).into_owned();
    assert!(human.contains("discard-my-data"), "{human}");

    // beta (already Secondary) loses: connect --discard-my-data; alpha connects.
    cli_ok(&p, 1, &["connect", "--discard-my-data"]);
    cli_ok(&p, 0, &["connect"]);
    p.wait_in_sync();
    let s = p.status(1).expect("beta status");
    assert!(s["split_brain"].is_null(), "{s}");
    ops_common::down_both_identical(&mut p, "the split brain's resolution");
    // Every block alpha wrote holds alpha's data on both; beta's own writes are gone.
    let a = std::fs::read(p.path("alpha.img")).expect("read alpha.img");
    assert!(check_acked_image(&a, &rec[0]) > 0);
    for (b, versions) in &rec[1].sent {
        if rec[0].sent.contains_key(b) {
            continue;
        }
        let at = *b as usize * BS;
        let v = version_of(*b, &a[at..at + BS]).expect("valid block");
        assert_eq!(
            v, 0,
            "block {b} (written only by beta, versions {versions:?}) was not rolled back"
        );
    }
}

/// The first `primary --force` starts the full sync at once. Before it, both nodes refuse each
/// other (neither has good data) and stand alone; `connect-retry` is 10 minutes, far beyond
/// the test's wait, so only the promotion itself can bring them together: the dialing node
/// (alpha) dials afresh when promoted, and the standing-alone acceptor (beta) accepts.
#[test]
fn first_promotion_starts_the_full_sync_without_waiting_for_connect_retry() {
    let mut p = Pair::configure_with("32M", "connect-retry = \"600s\"", ["", ""]);
    // alpha first: its first dial goes to a port nobody answers yet.
    for i in 0..2 {
        p.start(i, &[]);
        p.wait(i, "the daemon answers status", |_| true);
    }
    p.wait(1, "the refusal (no node has good data yet)", |s| {
        s["repl"] == "StandAlone" && !s["last_refusal"].is_null()
    });
    p.primary_force();
    p.wait_in_sync();
    ops_common::down_both_identical(&mut p, "the first full sync");
}

/// Overlapping writes a client has in flight together land in the order it sent them, on both
/// nodes: the NBD server hands each request to the core before reading the next, and the core
/// keeps overlapping writes in that order. (NBD itself leaves the order open; a client that
/// pipelines rewrites of one block, as this test's failover writers do, gets the last one.)
#[test]
fn overlapping_writes_in_flight_land_in_the_order_sent_on_both_nodes() {
    let mut p = Pair::new("16M", ["", ""]);
    p.primary_force();
    p.wait_in_sync();
    let mut c = connect(&p, 0);
    // Each round: 32 writes over blocks 0..4, each 1 or 2 blocks long, none waited for.
    let mut last = [0u64; 4];
    let mut version = 0u64;
    for round in 0..50u64 {
        let mut cookies = Vec::new();
        for i in 0..32u64 {
            version += 1;
            let (start, n) = ((i + round) % 3, 1 + (i % 2));
            let data: Vec<u8> = (start..start + n).flat_map(|b| block(b, version)).collect();
            c.send(
                CMD_WRITE,
                0,
                version,
                start * BS as u64,
                data.len() as u32,
                &data,
            );
            cookies.push(version);
            for v in &mut last[start as usize..(start + n) as usize] {
                *v = version;
            }
        }
        for _ in &cookies {
            let (cookie, err, _) = c.reply(0).expect("write reply");
            assert_eq!(err, 0, "write {cookie} failed");
        }
        for (b, want) in last.iter().enumerate() {
            c.send(CMD_READ, 0, 1, b as u64 * BS as u64, BS as u32, &[]);
            let (_, err, data) = c.reply(BS).expect("read reply");
            assert_eq!(err, 0, "read of block {b}");
            let have = version_of(b as u64, &data).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                have, *want,
                "round {round}: block {b} holds write {have}, but write {want} was sent after it"
            );
        }
    }
    drop(c);
    p.wait_in_sync();
    ops_common::down_both_identical(&mut p, "the overlapping writes");
}

/// A resync target killed part-way (kill -9) resumes where the stable part ends instead of
/// starting over (issue #4): the source clears a block's bit only once a flush barrier made it
/// stable on the target, and the target saved that it may trust the bitmaps. The resumed
/// resync copies at most what was left at the kill plus what was not yet stable on the target.
#[test]
fn a_resync_target_killed_mid_resync_resumes_instead_of_starting_over() {
    need_fio();
    const WRITTEN: u64 = 192 * MIB;
    let port = ops_common::free_tcp_port();
    let mut p = Pair::new("256M", ["", &format!("metrics = \"127.0.0.1:{port}\"")]);
    p.primary_force();
    p.wait_in_sync();
    down(&mut p, 1);
    down(&mut p, 0);

    // A capped resync, so the kill lands part-way; the initial sync above ran uncapped.
    let text = std::fs::read_to_string(&p.config).expect("read config");
    let text = text.replacen("[resource]\n", "[resource]\nc-max-rate = \"40M\"\n", 1);
    std::fs::write(&p.config, text).expect("write config");
    p.start_and_wait(0);
    cli_ok(&p, 0, &["primary"]);
    p.fio_verified(
        0,
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            &format!("--size={WRITTEN}"),
        ],
    );
    let s = p.status(0).expect("alpha status");
    assert_eq!(s["out_of_sync_bytes"], WRITTEN, "{s}");

    p.start(1, &[]);
    let s = p.wait(0, "the resync three quarters done", |s| {
        s["repl"] == "SyncSource" && s["resync"]["percent"].as_f64().is_some_and(|x| x >= 75.0)
    });
    p.kill(1);
    let named = s["out_of_sync_bytes"].as_u64().expect("out_of_sync_bytes");
    eprintln!(
        "beta killed at {}% with {named} bytes still named",
        s["resync"]["percent"]
    );
    assert!(
        named < WRITTEN,
        "nothing was stable on beta at 75%: {named} bytes named\n{}",
        p.logs()
    );
    let md = cli_ok(&p, 1, &["dump-md"]);
    assert!(md.contains("resync-resumable"), "{md}");

    p.start(1, &[]);
    p.wait_in_sync();
    let resumed = scrape(port, "twinblk_resync_bytes_total") as u64;
    eprintln!(
        "resumed resync copied {resumed} bytes ({named} named at the kill, {WRITTEN} written)"
    );
    // `out_of_sync_bytes` follows the resync (what is left to send); the source keeps a
    // block's bit until a flush barrier made it stable on the target, so the resumed resync
    // may also resend up to `stability_bytes` (64 MiB by default) the target had not made
    // stable. Starting over would copy everything written.
    const STABILITY_BYTES: u64 = 64 * MIB;
    assert!(
        resumed <= named + STABILITY_BYTES && resumed < WRITTEN,
        "the resumed resync copied {resumed} bytes, more than the {named} left at the kill plus \
         {STABILITY_BYTES} not yet stable (written: {WRITTEN})\n{}",
        p.logs()
    );
    ops_common::down_both_identical(&mut p, "the resumed resync");
}
