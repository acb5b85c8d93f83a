//! Two real `twinblk up` daemons on 127.0.0.1 (QUIC on free UDP ports, keys from
//! `twinblk keygen`), fio's nbd engine writing through the Primary, then byte-for-byte
//! comparison of the two disks.

mod ops_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const FIO: &str = "/usr/bin/fio";
/// Generous bound for state changes on loopback; a test failing here names what it waited for.
const WAIT: Duration = Duration::from_secs(120);

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_twinblk")
}

fn need_fio() {
    assert!(
        Path::new(FIO).is_file(),
        "{FIO} not found: install the Debian package `fio` (apt-get install fio)"
    );
}

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

struct Pair {
    dir: tempfile::TempDir,
    /// Each node's resource file (normally the same file; test (c) gives beta another identity).
    configs: [PathBuf; 2],
    children: [Option<Child>; 2],
    /// `create-md` ran for this node.
    created: [bool; 2],
}

const NAMES: [&str; 2] = ["alpha", "beta"];

impl Pair {
    /// Keys, resource file, both daemons up.
    fn new(protocol: &str, size: &str, beta_wrong_key: bool) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("twinblk-repl-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        for n in NAMES {
            let o = run(&["keygen", "--name", n, "--out", d.to_str().unwrap()]);
            assert!(o.status.success(), "keygen: {o:?}");
        }
        let ports = [free_udp_port(), free_udp_port()];
        let node = |n: &str, port: u16, cert: &str, key: &str| {
            format!(
                "[node.{n}]\naddress = \"127.0.0.1:{port}\"\ndisk = \"{d}/{n}.img\"\n\
                 nbd = \"unix:{d}/{n}.nbd\"\nadmin = \"{d}/{n}.sock\"\ncert = \"{d}/{cert}\"\n\
                 key = \"{d}/{key}\"\nsize = \"{size}\"\n",
                d = d.display()
            )
        };
        let head = format!("[resource]\nname = \"r0\"\nprotocol = \"{protocol}\"\n");
        let good = format!(
            "{head}{}{}",
            node("alpha", ports[0], "alpha.crt", "alpha.key"),
            node("beta", ports[1], "beta.crt", "beta.key")
        );
        std::fs::write(d.join("r0.toml"), &good).unwrap();
        let mut configs = [d.join("r0.toml"), d.join("r0.toml")];
        if beta_wrong_key {
            // Beta runs with a new key; alpha still pins the old beta.crt.
            let other = d.join("other");
            std::fs::create_dir_all(&other).unwrap();
            let o = run(&["keygen", "--name", "beta", "--out", other.to_str().unwrap()]);
            assert!(o.status.success(), "keygen: {o:?}");
            let bad = format!(
                "{head}{}{}",
                node("alpha", ports[0], "alpha.crt", "alpha.key"),
                node("beta", ports[1], "other/beta.crt", "other/beta.key")
            );
            std::fs::write(d.join("r0-beta.toml"), bad).unwrap();
            configs[1] = d.join("r0-beta.toml");
        }
        let mut p = Pair {
            dir,
            configs,
            children: [None, None],
            created: [false, false],
        };
        for i in 0..2 {
            p.start(i);
        }
        p
    }

    fn start(&mut self, i: usize) {
        if !self.created[i] {
            let o = self.cli(i, &["create-md"]);
            assert!(o.status.success(), "create-md: {o:?}");
            self.created[i] = true;
        }
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", NAMES[i]))).unwrap();
        let child = Command::new(bin())
            .args(["up", "r0", "--config"])
            .arg(&self.configs[i])
            .args(["--node", NAMES[i]])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
        self.wait(i, "the daemon answers status", |_| true);
    }

    fn cli(&self, i: usize, args: &[&str]) -> Output {
        let mut c = Command::new(bin());
        c.args(args)
            .arg("r0")
            .arg("--config")
            .arg(&self.configs[i])
            .args(["--node", NAMES[i]]);
        c.output().unwrap()
    }

    fn status(&self, i: usize) -> Option<serde_json::Value> {
        let o = self.cli(i, &["status", "--json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    fn logs(&self) -> String {
        NAMES
            .iter()
            .map(|n| {
                let l = std::fs::read_to_string(self.dir.path().join(format!("{n}.log")))
                    .unwrap_or_default();
                format!("--- {n} log ---\n{l}")
            })
            .collect()
    }

    fn wait(
        &self,
        i: usize,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < WAIT {
            if let Some(s) = self.status(i) {
                if ok(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{}: waited for {what}; last status {last:?}\n{}",
            NAMES[i],
            self.logs()
        );
    }

    fn wait_in_sync(&self) {
        for i in 0..2 {
            self.wait(i, "Established with both disks UpToDate", |s| {
                s["repl"] == "Established"
                    && s["disk"] == "UpToDate"
                    && s["peer_disk"] == "UpToDate"
            });
        }
    }

    fn primary_force(&self) {
        let o = self.cli(0, &["primary", "--force"]);
        assert!(
            o.status.success(),
            "primary --force: {o:?}\n{}",
            self.logs()
        );
    }

    fn nbd_uri(&self, i: usize) -> String {
        format!(
            "nbd+unix:///?socket={}",
            self.dir.path().join(format!("{}.nbd", NAMES[i])).display()
        )
    }

    fn fio(&self, i: usize, size: &str) -> Command {
        ops_common::fio_verify("repl", &self.nbd_uri(i), self.dir.path(), size)
    }

    /// `twinblk down` on node i, and its process exits successfully.
    fn down(&mut self, i: usize) {
        let o = self.cli(i, &["down"]);
        assert!(o.status.success(), "down: {o:?}");
        let status = self.children[i].take().unwrap().wait().unwrap();
        assert!(
            status.success(),
            "{} exited with {status}\n{}",
            NAMES[i],
            self.logs()
        );
    }

    fn disk(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.img", NAMES[i]))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn assert_identical(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "disk sizes differ");
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("the disks differ, first at byte {at}");
    }
    assert!(x.iter().any(|&b| b != 0), "nothing was written at all");
}

fn replicate(protocol: &str) {
    need_fio();
    let mut p = Pair::new(protocol, "256M", false);
    p.primary_force();
    p.wait_in_sync();
    // The Secondary lists the export but refuses to open it (libnbd names the refusal; the
    // server's message, with the role, is in tests/operator.rs).
    let o = p.fio(1, "1M").output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() && text.contains("server policy prevents NBD_OPT_GO"),
        "a write to the Secondary: {text}"
    );
    let o = p.fio(0, "256M").output().unwrap();
    assert!(
        o.status.success(),
        "fio through the Primary failed: {}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        p.logs()
    );
    p.down(0);
    p.down(1);
    assert_identical(&p.disk(0), &p.disk(1));
}

#[test]
fn sync_replication_makes_identical_disks() {
    replicate("sync");
}

#[test]
fn async_replication_makes_identical_disks() {
    replicate("async");
}

#[test]
fn wrong_certificate_moves_no_data_and_status_says_why() {
    need_fio();
    let p = Pair::new("sync", "64M", true);
    p.primary_force();
    let s = p.wait(0, "a certificate refusal in status", |s| {
        !s["last_auth_error"].is_null()
    });
    assert_ne!(s["repl"], "Established");
    let o = p.fio(0, "16M").output().unwrap();
    assert!(o.status.success(), "fio: {o:?}");
    let human = String::from_utf8_lossy(&p.cli(0, &["status"]).stdout).into_owned();
    assert!(human.contains("certificate"), "human status: {human}");
    let b = p.status(1).unwrap();
    assert!(
        b["peer_disk"].is_null() && b["disk"] == "Inconsistent",
        "beta: {b}"
    );
    let beta = std::fs::read(p.disk(1)).unwrap();
    assert!(beta.iter().all(|&b| b == 0), "data reached beta's disk");
}

#[test]
fn killing_the_secondary_does_not_fail_or_stall_sync_writes() {
    need_fio();
    let mut p = Pair::new("sync", "256M", false);
    p.primary_force();
    p.wait_in_sync();
    let fio = p
        .fio(0, "256M")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill once writes are flowing: beta has received some of them.
    p.wait(0, "writes in flight", |s| {
        s["requests_in_flight"].as_u64() > Some(0)
    });
    let mut beta = p.children[1].take().unwrap();
    beta.kill().unwrap();
    beta.wait().unwrap();
    let o = fio.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "fio failed after the secondary died: {}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        p.logs()
    );
    let s = p.status(0).unwrap();
    assert_ne!(s["repl"], "Established", "alpha: {s}");
    assert!(s["out_of_sync_bytes"].as_u64() > Some(0), "alpha: {s}");
}
