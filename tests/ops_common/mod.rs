//! Two real `twinblk up` daemons on 127.0.0.1 for the operations tests (events, metrics,
//! systemd): keys from `twinblk keygen`, one resource file, per-node extra keys and
//! environment.
#![allow(dead_code)]

pub mod acked;
pub mod netns;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Generous bound for state changes on loopback; a test failing here names what it waited for.
pub const WAIT: Duration = Duration::from_secs(120);
pub const NAMES: [&str; 2] = ["alpha", "beta"];

/// A command's stdout and stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// fio's nbd engine writing `size` of 64 KiB random blocks at depth 16 to `uri`, every block
/// checked on read-back, then a flush. fio leaves its verify state file in `dir`.
pub fn fio_verify(job: &str, uri: &str, dir: &std::path::Path, size: &str) -> Command {
    let mut c = Command::new("fio");
    c.current_dir(dir).args([
        &format!("--name={job}"),
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--size={size}"),
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=16",
        "--verify=crc32c",
        "--end_fsync=1",
    ]);
    c
}

/// Runs `twinblk ARGS` for node i and asserts it succeeded (with both logs if not).
pub fn ok(p: &Pair, i: usize, args: &[&str]) -> Output {
    let o = p.cli(i, args);
    assert!(o.status.success(), "{args:?}: {}\n{}", text(&o), p.logs());
    o
}

/// `down` on both nodes (each must exit cleanly), then both backing files, which must be
/// byte-identical (`what` names the step that should have made them so); returns alpha's.
pub fn down_both_identical(p: &mut Pair, what: &str) -> Vec<u8> {
    for i in [0, 1] {
        ok(p, i, &["down"]);
        if let Some(mut c) = p.children[i].take() {
            assert!(c.wait().expect("wait").success(), "{}", p.logs());
        }
    }
    let a = std::fs::read(p.path("alpha.img")).expect("alpha.img");
    let b = std::fs::read(p.path("beta.img")).expect("beta.img");
    assert_eq!(a.len(), b.len(), "the disks' sizes differ after {what}");
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "the disks differ after {what}, first at byte {at} (4 KiB block {})",
            at / 4096
        );
    }
    a
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_twinblk")
}

pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp bind");
    s.local_addr().expect("addr").port()
}

pub fn free_tcp_port() -> u16 {
    let s = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp bind");
    s.local_addr().expect("addr").port()
}

pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run twinblk")
}

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub children: [Option<Child>; 2],
}

impl Pair {
    /// Keys and the resource file (`extra[i]`: more lines for node i's table); nothing runs yet.
    pub fn configure(size: &str, extra: [&str; 2]) -> Pair {
        Pair::configure_with(size, "", extra)
    }

    /// Like [`Pair::configure`], with `resource` lines in `[resource]` (`{dir}` standing for the
    /// test's directory).
    pub fn configure_with(size: &str, resource: &str, extra: [&str; 2]) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("twinblk-ops-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let d = dir.path();
        for n in NAMES {
            let o = run(&["keygen", "--name", n, "--out", d.to_str().expect("utf-8")]);
            assert!(o.status.success(), "keygen: {o:?}");
        }
        let resource = resource.replace("{dir}", &d.display().to_string());
        // `resource` may choose the protocol; sync otherwise.
        let protocol = if resource.contains("protocol") {
            ""
        } else {
            "protocol = \"sync\"\n"
        };
        let mut text = format!("[resource]\nname = \"r0\"\n{protocol}{resource}\n");
        for (i, n) in NAMES.iter().enumerate() {
            text.push_str(&format!(
                "[node.{n}]\naddress = \"127.0.0.1:{port}\"\ndisk = \"{d}/{n}.img\"\n\
                 nbd = \"unix:{d}/{n}.nbd\"\nadmin = \"{d}/{n}.sock\"\ncert = \"{d}/{n}.crt\"\n\
                 key = \"{d}/{n}.key\"\nsize = \"{size}\"\n{extra}\n",
                port = free_udp_port(),
                d = d.display(),
                extra = extra[i],
            ));
        }
        let config = d.join("r0.toml");
        std::fs::write(&config, text).expect("write config");
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

    /// Both daemons up and answering.
    pub fn new(size: &str, extra: [&str; 2]) -> Pair {
        let mut p = Pair::configure(size, extra);
        for i in 0..2 {
            p.start(i, &[]);
            p.wait(i, "the daemon answers status", |_| true);
        }
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Start node i's daemon with extra environment; does not wait.
    pub fn start(&mut self, i: usize, env: &[(&str, &str)]) {
        self.start_wrapped(i, env, &[]);
    }

    /// Like [`Pair::start`], run through `wrapper` (e.g. `ip netns exec NS`).
    pub fn start_wrapped(&mut self, i: usize, env: &[(&str, &str)], wrapper: &[&str]) {
        let log = std::fs::File::create(self.path(&format!("{}.log", NAMES[i]))).expect("log");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let child = cmd
            .args(["up", "r0", "--config"])
            .arg(&self.config)
            .args(["--node", NAMES[i]])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn twinblk up");
        self.children[i] = Some(child);
    }

    /// Start node i's daemon and wait until it answers `status`.
    pub fn start_and_wait(&mut self, i: usize) {
        self.start(i, &[]);
        self.wait(i, "the daemon answers status", |_| true);
    }

    /// Send `sig` to node i's daemon (SIGSTOP/SIGCONT: a stalled node), which must be running.
    pub fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        let pid = self.children[i].as_ref().expect("daemon runs").id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal");
    }

    /// SIGKILL node i (a crash) and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            c.kill().expect("kill");
            c.wait().expect("wait");
        }
    }

    pub fn nbd_socket(&self, i: usize) -> PathBuf {
        self.path(&format!("{}.nbd", NAMES[i]))
    }

    /// `twinblk ARGS r0 --config C --node N`.
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        self.command(i, args).output().expect("run twinblk")
    }

    pub fn command(&self, i: usize, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .arg("r0")
            .arg("--config")
            .arg(&self.config)
            .args(["--node", NAMES[i]]);
        c
    }

    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let o = self.cli(i, &["status", "--json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    pub fn logs(&self) -> String {
        NAMES
            .iter()
            .map(|n| {
                let l = std::fs::read_to_string(self.path(&format!("{n}.log"))).unwrap_or_default();
                format!("--- {n} log ---\n{l}")
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

    pub fn wait_in_sync(&self) {
        for i in 0..2 {
            self.wait(i, "Established with both disks UpToDate", |s| {
                s["repl"] == "Established"
                    && s["disk"] == "UpToDate"
                    && s["peer_disk"] == "UpToDate"
            });
        }
    }

    pub fn primary_force(&self) {
        let o = self.cli(0, &["primary", "--force"]);
        assert!(
            o.status.success(),
            "primary --force: {o:?}\n{}",
            self.logs()
        );
    }

    /// fio's nbd engine against node i's export with `job` (rw, sizes, depth), every block
    /// checked on read-back (crc32c); asserts that fio succeeded.
    pub fn fio_verified(&self, i: usize, job: &[&str]) {
        let o = Command::new("fio")
            .args(["--name=check", "--ioengine=nbd"])
            .arg(format!("--uri={}", self.nbd_uri(i)))
            .args(job)
            .args(["--verify=crc32c", "--do_verify=1", "--output-format=terse"])
            .output()
            .expect("fio");
        assert!(o.status.success(), "fio: {}\n{}", text(&o), self.logs());
    }

    pub fn nbd_uri(&self, i: usize) -> String {
        format!("nbd+unix:///?socket={}", self.nbd_socket(i).display())
    }

    /// SIGTERM node i and wait for it to exit; true if it exited successfully.
    pub fn stop(&mut self, i: usize) -> bool {
        let Some(mut c) = self.children[i].take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        c.wait().map(|s| s.success()).unwrap_or(false)
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
