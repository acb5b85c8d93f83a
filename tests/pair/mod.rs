//! Two real `twinblk` nodes on 127.0.0.1 for the operations tests (OCF agent, on-peer-lost):
//! keys from `twinblk keygen`, one resource file, `create-md` on both, daemons started on demand.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Generous bound for state changes on loopback; a test failing here names what it waited for.
pub const WAIT: Duration = Duration::from_secs(120);
pub const NAMES: [&str; 2] = ["alpha", "beta"];

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_twinblk")
}

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub children: [Option<Child>; 2],
}

impl Pair {
    /// Keys, a resource file (with `extra` lines in `[resource]`, `{dir}` standing for the test's
    /// directory) and metadata for both nodes; no daemon runs yet.
    pub fn new(extra: &str) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("twinblk-ops-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        for n in NAMES {
            let o = Command::new(bin())
                .args(["keygen", "--name", n, "--out"])
                .arg(d)
                .output()
                .unwrap();
            assert!(o.status.success(), "keygen: {o:?}");
        }
        let ports = [free_udp_port(), free_udp_port()];
        let extra = extra.replace("{dir}", &d.display().to_string());
        let mut text = format!("[resource]\nname = \"r0\"\nprotocol = \"sync\"\n{extra}\n");
        for (n, port) in NAMES.iter().zip(ports) {
            text += &format!(
                "[node.{n}]\naddress = \"127.0.0.1:{port}\"\ndisk = \"{d}/{n}.img\"\n\
                 nbd = \"unix:{d}/{n}.nbd\"\nadmin = \"{d}/{n}.sock\"\ncert = \"{d}/{n}.crt\"\n\
                 key = \"{d}/{n}.key\"\nsize = \"64M\"\n",
                d = d.display()
            );
        }
        let config = d.join("r0.toml");
        std::fs::write(&config, text).unwrap();
        let p = Pair {
            dir,
            config,
            children: [None, None],
        };
        for i in 0..2 {
            let o = p.cli(i, &["create-md"]);
            assert!(o.status.success(), "create-md: {o:?}");
        }
        p
    }

    pub fn start(&mut self, i: usize) {
        let log = std::fs::File::create(self.log_path(i)).unwrap();
        let child = Command::new(bin())
            .args(["up", "r0", "--config"])
            .arg(&self.config)
            .args(["--node", NAMES[i]])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
        self.wait(i, "the daemon answers status", |_| true);
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", NAMES[i]))
    }

    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("r0")
            .arg("--config")
            .arg(&self.config)
            .args(["--node", NAMES[i]])
            .output()
            .unwrap()
    }

    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let o = self.cli(i, &["status", "--json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    pub fn logs(&self) -> String {
        (0..2)
            .map(|i| {
                let l = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                format!("--- {} log ---\n{l}", NAMES[i])
            })
            .collect()
    }

    pub fn wait(
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

    /// Both nodes Established with UpToDate disks.
    pub fn wait_in_sync(&self) {
        for i in 0..2 {
            self.wait(i, "Established with both disks UpToDate", |s| {
                s["repl"] == "Established"
                    && s["disk"] == "UpToDate"
                    && s["peer_disk"] == "UpToDate"
            });
        }
    }

    pub fn nbd_socket(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.nbd", NAMES[i]))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
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

/// Poll `cond` until it holds; panic naming `what` after [`WAIT`].
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "waited too long for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
