//! The OCF agent in a live three-node Pacemaker/Corosync cluster (tools/cluster/cluster: alpha
//! and beta carry twinblk data, gamma is a quorum member; each node its own network, mount and
//! UTS namespaces; STONITH by fence_netns, which kills every process of the victim's namespace).
//! Pacemaker runs the promotable clone ms_r0 of ocf:twinblk:twinblk and a writer
//! (tools/cluster/writer.py under ocf:twinblk-test:writer, tools/cluster/writer-agent) colocated with the Promoted instance.
//! The writer logs every write before it is sent and every acknowledgement; after each scenario
//! the checker (ops_common::acked) reads every block back from the new Primary and, once resynced,
//! from the other node's disk: each must hold its newest acknowledged version or a later one
//! that was sent.
//!
//! Each scenario prints its failover time: from the fault (or the move command) to the first
//! write acknowledged afterwards. Times are reported, never asserted.
//!
//! `cargo test --test cluster` runs the short version (CI): promotion, kill -9 of the Primary's
//! daemon, the Primary's node killed and returning, on one cluster. The full list:
//! `tools/cluster/scenarios` (= `cargo test --test cluster -- --include-ignored --test-threads=1
//! --nocapture`). Needs root and Debian's pacemaker, corosync, crmsh, python3-libnbd (.ci/run).

mod ops_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ops_common::acked::{check_image, check_node, AckLog};

/// Bound for anything the cluster does (fencing, promotion, resync); failing here names what it
/// waited for and prints the cluster's state.
const WAIT: Duration = Duration::from_secs(180);
const NODES: [&str; 2] = ["alpha", "beta"];
/// The namespaces and bridges have fixed names: one cluster at a time.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

fn other(n: &str) -> &'static str {
    if n == "alpha" {
        "beta"
    } else {
        "alpha"
    }
}

/// What the writer logs say (tools/cluster/writer.py's format).
#[derive(Default)]
struct Writes {
    log: AckLog,
    /// (time in ns, node) of every acknowledgement.
    acks: Vec<(u128, String)>,
}

impl Writes {
    /// The first acknowledgement after `t` that follows a pause of more than a second: where
    /// the writes resumed (a write in flight when the fault struck may still be answered).
    fn resumed_after(&self, t: u128) -> Option<(u128, String)> {
        let mut acks = self.acks.clone();
        acks.sort();
        let mut last = acks.iter().take_while(|(at, _)| *at <= t).last()?.0;
        for (at, host) in acks.into_iter().filter(|(at, _)| *at > t) {
            if at - last > 1_000_000_000 {
                return Some((at, host));
            }
            last = at;
        }
        None
    }
}

struct Cluster {
    dir: PathBuf,
    _one: MutexGuard<'static, ()>,
}

impl Cluster {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/cluster/cluster")
    }

    fn command(dir: &Path) -> Command {
        let mut c = Command::new(Self::script());
        c.env("TWBC_DIR", dir).env("TWINBLK", ops_common::bin());
        c
    }

    /// A fresh cluster (whatever a previous run left is stopped first) with `protocol`.
    fn start(protocol: &str) -> Cluster {
        let one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        for tool in [
            "/usr/sbin/corosync",
            "/usr/sbin/pacemakerd",
            "/usr/sbin/crm",
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} not found: install Debian's pacemaker, corosync and crmsh (.ci/run does)"
            );
        }
        let dir = PathBuf::from("/var/tmp/twinblk-cluster-test");
        let _ = Self::command(&dir).arg("stop").output();
        let c = Cluster { dir, _one: one };
        let started = Instant::now();
        c.ok(&["start", "--protocol", protocol]);
        println!(
            "cluster: started ({protocol}) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        Self::command(&self.dir)
            .args(args)
            .output()
            .expect("run tools/cluster/cluster")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "cluster {args:?}: {}\n{}",
            ops_common::text(&o),
            self.state()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A command inside `node` (crm, crm_resource, ...).
    fn exec(&self, node: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", node];
        args.extend_from_slice(cmd);
        self.ok(&args)
    }

    /// crm_mon and both daemons' status, for failure messages.
    fn state(&self) -> String {
        let o = Self::command(&self.dir)
            .arg("status")
            .output()
            .expect("cluster status");
        format!(
            "--- cluster state ({}; kept after a failure) ---\n{}",
            self.dir.display(),
            ops_common::text(&o)
        )
    }

    fn status(&self, node: &str) -> Option<serde_json::Value> {
        let o = Command::new(ops_common::bin())
            .args(["status", "r0", "--json", "--config"])
            .arg(self.dir.join("r0.toml"))
            .args(["--node", node])
            .output()
            .ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    fn primaries(&self) -> Vec<&'static str> {
        NODES
            .into_iter()
            .filter(|n| self.status(n).is_some_and(|s| s["role"] == "Primary"))
            .collect()
    }

    fn wait(&self, what: &str, mut f: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {what}\n{}",
                self.state()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn the_primary(&self) -> &'static str {
        let mut p = Vec::new();
        self.wait("exactly one Primary", |c| {
            p = c.primaries();
            p.len() == 1
        });
        p[0]
    }

    /// Both nodes connected and UpToDate, `primary` Primary.
    fn wait_in_sync(&self, primary: &str) {
        self.wait(
            &format!("{primary} Primary, Established, both UpToDate"),
            |c| {
                c.status(primary).is_some_and(|s| {
                    s["role"] == "Primary"
                        && s["repl"] == "Established"
                        && s["disk"] == "UpToDate"
                        && s["peer_disk"] == "UpToDate"
                })
            },
        );
    }

    fn writes(&self) -> Writes {
        let mut w = Writes::default();
        let dir = self.dir.join("writer");
        for e in std::fs::read_dir(&dir).expect("writer log directory") {
            let text = std::fs::read_to_string(e.expect("entry").path()).expect("writer log");
            for line in text.lines() {
                let f: Vec<&str> = line.split(' ').collect();
                match f.as_slice() {
                    ["S", b, v] => {
                        let (Ok(b), Ok(v)) = (b.parse(), v.parse()) else {
                            continue; // the last line of a killed writer may be cut short
                        };
                        w.log.sent.entry(b).or_default().push(v);
                    }
                    ["A", t, host, b, v] => {
                        let (Ok(t), Ok(b), Ok(v)) = (t.parse(), b.parse(), v.parse()) else {
                            continue;
                        };
                        let e = w.log.acked.entry(b).or_insert(0);
                        *e = (*e).max(v);
                        w.log.acks += 1;
                        w.acks.push((t, host.to_string()));
                    }
                    ["E", ..] => w.log.errors += 1,
                    _ => {}
                }
            }
        }
        w
    }

    /// Waits for `n` acknowledgements after `t` (by `node` if given); returns the first.
    fn wait_acks_after(&self, t: u128, node: Option<&str>, n: usize) -> (u128, String) {
        let mut first = None;
        self.wait(
            &format!("{n} writes acknowledged after the fault (on {node:?})"),
            |c| {
                let w = c.writes();
                let mut after: Vec<_> = w
                    .acks
                    .into_iter()
                    .filter(|(at, h)| *at > t && node.map_or(true, |n| n == h))
                    .collect();
                after.sort();
                first = after.first().cloned();
                after.len() >= n
            },
        );
        first.expect("an acknowledgement")
    }

    /// Stops the writer through Pacemaker (so no write is in flight), then checks every
    /// acknowledged write on `primary` (over NBD) and, once in sync, on the other node's disk.
    fn stop_writer_and_check(&self, primary: &str, scenario: &str) {
        self.exec("gamma", &["crm", "resource", "stop", "writer"]);
        self.wait("the writer to stop", |c| {
            // crm_resource says this on stderr.
            let o = c.run(&[
                "exec",
                "gamma",
                "crm_resource",
                "--resource",
                "writer",
                "--locate",
            ]);
            ops_common::text(&o).contains("NOT running")
        });
        let w = self.writes();
        let sock = self.dir.join(primary).join("r0.nbd");
        let checked = check_node(&sock, &w.log, primary)
            .unwrap_or_else(|e| panic!("{scenario}: {e}\n{}", self.state()));
        self.wait_in_sync(primary);
        let sec = other(primary);
        let img = std::fs::read(self.dir.join(sec).join("r0.img")).expect("disk image");
        let checked_sec = check_image(&img, &w.log, sec)
            .unwrap_or_else(|e| panic!("{scenario}: {e}\n{}", self.state()));
        println!(
            "{scenario}: checker: {} writes acknowledged ({} error replies or lost connections), \
             {} blocks with an acknowledged write all hold it on {primary} (Primary) and {} on \
             {sec} (Secondary, resynced)",
            w.log.acks, w.log.errors, checked, checked_sec
        );
        assert!(
            checked > 0,
            "{scenario}: the writer had no write acknowledged"
        );
        self.exec("gamma", &["crm", "resource", "start", "writer"]);
    }

    /// PIDs of `node`'s twinblk daemon (there is one; its netns and binary identify it).
    fn daemon_pid(&self, node: &str) -> Option<u32> {
        let id = std::fs::read_to_string(self.dir.join(node).join("netns-id")).ok()?;
        let exe = std::fs::canonicalize(ops_common::bin()).ok()?;
        std::fs::read_dir("/proc").ok()?.find_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let ns = std::fs::read_link(e.path().join("ns/net")).ok()?;
            let this = std::fs::read_link(e.path().join("exe")).ok()?;
            (ns.to_str()? == id.trim() && this == exe).then_some(pid)
        })
    }

    /// The byte length of `node`'s twinblk log (to read what a later step adds).
    fn daemon_log_len(&self, node: &str) -> usize {
        std::fs::read(self.daemon_log(node)).map_or(0, |b| b.len())
    }

    fn daemon_log(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("log-pacemaker/twinblk-r0.log")
    }

    /// The lines `node`'s twinblk logged after byte `from` that contain `what`, without the
    /// time stamp and target.
    fn log_since(&self, node: &str, from: usize, what: &str) -> Vec<String> {
        let log = std::fs::read(self.daemon_log(node)).unwrap_or_default();
        String::from_utf8_lossy(log.get(from..).unwrap_or_default())
            .lines()
            .filter(|l| l.contains(what))
            .map(|l| l.splitn(2, ": ").last().unwrap_or(l).to_string())
            .collect()
    }

    /// The resyncs the sync source `node` started after byte `from` (the source's line names
    /// the whole resync; the target's names only its own changes).
    fn resyncs_since(&self, node: &str, from: usize) -> Vec<String> {
        self.log_since(node, from, "kind=\"resync-started\"")
    }

    /// Waits for the writer to have `n` acknowledgements on `node`.
    fn wait_writer_on(&self, node: &str, n: usize) {
        self.wait_acks_after(0, Some(node), n);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut c = Self::command(&self.dir);
        if std::thread::panicking() {
            c.env("KEEP", "1");
        }
        let _ = c.arg("stop").output();
    }
}

fn report(scenario: &str, t0: u128, first: &(u128, String)) {
    println!(
        "{scenario}: failover time {:.2} s (fault to the first write acknowledged, on {})",
        (first.0 - t0) as f64 / 1e9,
        first.1
    );
}

/// The cluster promotes one node and the writer runs there.
fn scenario_promotion(c: &Cluster) -> &'static str {
    let p = c.the_primary();
    c.wait_writer_on(p, 200);
    let w = c.writes();
    let hosts: std::collections::BTreeSet<_> = w.acks.iter().map(|(_, h)| h.as_str()).collect();
    assert_eq!(
        hosts.into_iter().collect::<Vec<_>>(),
        vec![p],
        "writes acknowledged elsewhere than on the Primary"
    );
    println!("promotion: {p} Promoted, the writer runs there");
    c.stop_writer_and_check(p, "promotion");
    p
}

/// kill -9 of the Primary's daemon: the monitor notices, Pacemaker recovers (in place or on the
/// peer); no acknowledged write lost.
fn scenario_kill_daemon(c: &Cluster) {
    let p = c.the_primary();
    c.wait_writer_on(p, 100);
    let pid = c
        .daemon_pid(p)
        .unwrap_or_else(|| panic!("no twinblk daemon on {p}\n{}", c.state()));
    let t0 = now_ns();
    nix_kill(pid);
    c.wait_acks_after(t0, None, 50);
    // A write answered between t0 and the signal's delivery is not the recovery.
    let first = c
        .writes()
        .resumed_after(t0)
        .unwrap_or_else(|| panic!("no pause in the writes after kill -9\n{}", c.state()));
    report("kill -9 of the Primary's daemon", t0, &first);
    let np = c.the_primary();
    println!("kill -9 of the Primary's daemon: {p} was Primary, now {np}");
    c.stop_writer_and_check(np, "kill -9 of the Primary's daemon");
}

fn nix_kill(pid: u32) {
    let o = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .output()
        .expect("kill");
    assert!(o.status.success(), "kill -9 {pid}: {o:?}");
}

/// The Primary's node dies (`fault`: power off, or all its links cut): the survivor is promoted
/// after fencing; the returning node comes back Secondary and resyncs by bitmap.
fn scenario_node_lost(c: &Cluster, fault: &str) {
    let p = c.the_primary();
    let s = other(p);
    let name = format!("{p} (Primary) {fault}");
    c.wait_writer_on(p, 100);
    let t0 = now_ns();
    match fault {
        "killed" => {
            c.ok(&["kill", p]);
        }
        "cut off" => {
            c.ok(&["cut", p, "all"]);
        }
        _ => unreachable!("fault {fault}"),
    }
    let first = c.wait_acks_after(t0, Some(s), 50);
    report(&name, t0, &first);
    let fenced = c.exec("gamma", &["stonith_admin", "--history", p]);
    assert!(
        fenced.contains("successful"),
        "{name}: {s} writes but {p} was not fenced: {fenced}\n{}",
        c.state()
    );
    println!("{name}: fencing: {}", fenced.lines().next().unwrap_or(""));
    assert!(
        c.daemon_pid(p).is_none(),
        "{name}: {p}'s daemon survived fencing"
    );
    // The operator powers it on again.
    if fault == "cut off" {
        c.ok(&["heal", p, "all"]);
    }
    let from_p = c.daemon_log_len(p);
    let from_s = c.daemon_log_len(s);
    c.ok(&["boot", p]);
    c.wait_in_sync(s);
    assert_eq!(
        c.status(p).map(|st| st["role"].clone()),
        Some("Secondary".into()),
        "{name}: {p} did not come back Secondary"
    );
    let resyncs = c.resyncs_since(s, from_s);
    assert!(
        !resyncs.is_empty() && resyncs.iter().all(|l| l.starts_with("bitmap resync")),
        "{name}: {p} did not come back with a bitmap resync from {s}: {resyncs:?}"
    );
    let split = c.log_since(p, from_p, "split brain");
    // Sync: the node cut off froze and acknowledged nothing its peer lacks; fenced while
    // frozen, it returns a plain sync target (its generation moves only when a freeze ends
    // with it going on), never a split brain.
    assert!(split.is_empty(), "{name}: {split:?}");
    println!(
        "{name}: {p} came back Secondary; {s} (source): {}; split brain: {}",
        resyncs.join("; "),
        if split.is_empty() {
            "none".to_string()
        } else {
            split.join(" / ")
        }
    );
    c.stop_writer_and_check(s, &name);
}

#[test]
fn pacemaker_promotes_recovers_a_killed_daemon_and_fails_over_a_dead_node() {
    let c = Cluster::start("sync");
    scenario_promotion(&c);
    scenario_kill_daemon(&c);
    scenario_node_lost(&c, "killed");
}

#[test]
#[ignore = "full scenario list: tools/cluster/scenarios"]
fn the_primarys_links_cut() {
    let c = Cluster::start("sync");
    scenario_node_lost(&c, "cut off");
}

/// A planned move under the writer: `crm_resource --move --promoted` to the other node.
fn scenario_move(c: &Cluster, protocol: &str) {
    let p = c.the_primary();
    let s = other(p);
    let name = format!("planned move {p} -> {s} ({protocol})");
    c.wait_writer_on(p, 100);
    let t0 = now_ns();
    c.exec(
        "gamma",
        &[
            "crm_resource",
            "--move",
            "--promoted",
            "--resource",
            "ms_r0",
            "--node",
            s,
        ],
    );
    let first = c.wait_acks_after(t0, Some(s), 50);
    report(&name, t0, &first);
    c.wait_in_sync(s);
    c.exec("gamma", &["crm_resource", "--clear", "--resource", "ms_r0"]);
    c.stop_writer_and_check(s, &name);
}

#[test]
#[ignore = "full scenario list: tools/cluster/scenarios"]
fn planned_move_sync() {
    let c = Cluster::start("sync");
    scenario_move(&c, "sync");
}

#[test]
#[ignore = "full scenario list: tools/cluster/scenarios"]
fn planned_move_async() {
    let c = Cluster::start("async");
    scenario_move(&c, "async");
}

/// The replication link alone is cut: the Primary freezes writes, its on-peer-lost hook
/// (tools/ocf/twinblk-fence-peer) fences the peer through Pacemaker, writes resume; at no time
/// are both nodes Primary.
#[test]
#[ignore = "full scenario list: tools/cluster/scenarios"]
fn replication_link_cut_fences_the_peer() {
    let c = Cluster::start("sync");
    let p = c.the_primary();
    let s = other(p);
    let name = format!("replication link of {p} (Primary) cut");
    c.wait_writer_on(p, 100);
    let t0 = now_ns();
    c.ok(&["cut", p, "repl"]);
    // Both roles are watched until the writes resume.
    let mut first = None;
    let mut polls = 0;
    c.wait("writes to resume after a pause", |c| {
        let prim = c.primaries();
        assert!(prim.len() < 2, "{name}: two Primaries\n{}", c.state());
        polls += 1;
        first = c.writes().resumed_after(t0);
        first.is_some()
    });
    println!("{name}: never two Primaries ({polls} polls of both nodes)");
    let first = first.expect("an acknowledgement");
    report(&name, t0, &first);
    assert_eq!(first.1, p, "{name}: writes resumed elsewhere");
    let fenced = c.exec("gamma", &["stonith_admin", "--history", s]);
    assert!(
        fenced.contains("successful"),
        "{name}: writes resumed but {s} was not fenced: {fenced}\n{}",
        c.state()
    );
    println!("{name}: {}", fenced.lines().next().unwrap_or(""));
    let hook = c.status(p).map(|st| st["peer_lost_hook"].clone());
    println!("{name}: {p}'s hook: {hook:?}");
    c.ok(&["heal", p, "repl"]);
    let from = c.daemon_log_len(p);
    c.ok(&["boot", s]);
    c.wait_in_sync(p);
    assert_eq!(c.primaries(), vec![p], "{name}: roles after the return");
    println!(
        "{name}: {s} came back Secondary; {p} (source): {}",
        c.resyncs_since(p, from).join("; ")
    );
    c.stop_writer_and_check(p, &name);
}
