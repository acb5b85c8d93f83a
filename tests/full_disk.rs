//! A full backing disk gives a clear error and loses nothing, and never hangs a client: real
//! daemons and real NBD clients, with the disk (and the daemon's log, as on the CI machine that
//! ran out of space) on a tiny tmpfs.
//!
//! The CI run this reproduces: on a machine with 223 MB free, the Secondary's image writes got
//! ENOSPC, and so did the log lines reporting them, on the same file system. tracing's writer
//! answered the failed log write with `eprintln!`, which panicked (stderr failed too) inside
//! the task running the disk write, so its completion never reached the core: the Primary's sync
//! write waited forever for the peer's ack and fio hung at 0 % CPU. Every client here runs under
//! a deadline, so a regression fails instead of hanging.
//!
//! Mounting a tmpfs needs root (as the disk layer's ENOSPC test); CI runs as root.

mod ops_common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ops_common::{bin, text, Pair, NAMES};

/// How long a client may take for a few MiB on loopback before the test calls it hung.
const DEADLINE: Duration = Duration::from_secs(90);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs of `size` mounted at `dir`, unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mkdir");
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "none"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(o.status.success(), "mount tmpfs: {}", text(&o));
        Tmpfs(dir.to_owned())
    }

    /// Fills the file system: a filler file takes every free block, then `log` (the daemon's
    /// stderr, opened for appending) takes the rest of its last page, so the daemon's next
    /// log line fails with ENOSPC as its disk writes do.
    fn fill(&self, log: Option<&Path>) {
        let mut f = std::fs::File::create(self.0.join("filler")).expect("filler");
        let chunk = vec![0x5au8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&[0x5a]).is_ok() {}
        if let Some(log) = log {
            let mut l = std::fs::OpenOptions::new()
                .append(true)
                .open(log)
                .expect("open log");
            while l.write_all(b"#").is_ok() {}
        }
        let mut probe = std::fs::File::create(self.0.join("probe")).expect("probe");
        assert!(
            probe
                .write_all(&[0; 4096])
                .and_then(|()| probe.sync_all())
                .is_err(),
            "{} is not full",
            self.0.display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `cmd` to its end, or kills it after [`DEADLINE`] and panics: a client that never gets
/// its answers is the failure these tests exist for.
fn bounded(mut cmd: Command, what: &str, logs: impl Fn() -> String) -> Output {
    // Its own process group: fio runs its job in a child process, which holds the pipes too.
    let mut child = cmd
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("client output");
        }
        if start.elapsed() > DEADLINE {
            // SAFETY: kill has no memory preconditions; the group is the client's own.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let o = child.wait_with_output().expect("client output");
            panic!(
                "{what} hung: no answer after {DEADLINE:?}\n{}\n{}",
                text(&o),
                logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The fio job of the CI run that hung: random writes checked on read-back, then a flush.
fn fio(uri: &str, dir: &Path, size: &str) -> Command {
    ops_common::fio_verify("full", uri, dir, size)
}

/// Both nodes configured (not started) with node `full`'s disk on a tmpfs of `fs_size` (a
/// symlink from where the resource file names it); with `log_there`, its log too.
fn pair_with_full_node(
    protocol: &str,
    full: usize,
    fs_size: &str,
    log_there: bool,
) -> (Pair, Tmpfs) {
    let p = Pair::configure_with("32M", &format!("protocol = \"{protocol}\"\n"), ["", ""]);
    let fs = Tmpfs::mount(&p.path("small"), fs_size);
    let img = format!("{}.img", NAMES[full]);
    // The daemon creates the (sparse) image through the link; an image create-md made goes.
    let _ = std::fs::remove_file(p.path(&img));
    std::os::unix::fs::symlink(fs.0.join(&img), p.path(&img)).expect("symlink image");
    if log_there {
        let log = format!("{}.log", NAMES[full]);
        std::os::unix::fs::symlink(fs.0.join(&log), p.path(&log)).expect("symlink log");
    }
    (p, fs)
}

/// SIGTERM node i and wait (bounded) for it to exit; asserts it exited successfully: no task of
/// the daemon died on the way (a dead event loop makes the stop fail).
fn stop(p: &mut Pair, i: usize) {
    let Some(mut c) = p.children[i].take() else {
        return;
    };
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = c.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{} did not stop after SIGTERM\n{}", NAMES[i], p.logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "{} exited with {status}\n{}",
        NAMES[i],
        p.logs()
    );
}

fn start_in_sync(p: &mut Pair) {
    for i in 0..2 {
        p.start(i, &[]);
        p.wait(i, "the daemon answers status", |_| true);
    }
    p.primary_force();
    p.wait_in_sync();
}

/// The CI case: the Secondary's disk and its log fill up during sync writes. The writes
/// complete (the Primary has them, the Secondary drops out as Inconsistent and its region is
/// in the Primary's bitmap); nothing waits forever.
fn full_secondary(protocol: &str) {
    if !is_root() {
        eprintln!("skipping: mounting a tiny tmpfs needs root");
        return;
    }
    let (mut p, fs) = pair_with_full_node(protocol, 1, "4m", true);
    start_in_sync(&mut p);
    fs.fill(Some(&p.path("beta.log")));
    let handshakes = std::fs::read_to_string(p.path("alpha.log"))
        .unwrap_or_default()
        .matches("handshake decided")
        .count();
    let o = bounded(
        fio(&p.nbd_uri(0), p.dir.path(), "8M"),
        "fio through the Primary",
        || p.logs(),
    );
    assert!(
        o.status.success(),
        "fio through the Primary failed while only the Secondary's disk is full: {}\n{}",
        text(&o),
        p.logs()
    );
    // The Secondary detached its disk (DRBD's on-io-error detach): Inconsistent, StandAlone
    // rather than reconnecting into the same full disk, and its status says why and what to do.
    let b = p.wait(1, "the Secondary's disk detached", |s| {
        s["disk"] == "Inconsistent" && s["repl"] == "StandAlone" && !s["disk_failure"].is_null()
    });
    let why = b["disk_failure"].as_str().unwrap_or_default();
    assert!(
        why.contains("write of the peer's data")
            && why.contains("No space left on device")
            && why.contains("free space"),
        "beta's disk_failure: {b}"
    );
    let a = p.wait(0, "the Primary tracking what the Secondary lacks", |s| {
        s["out_of_sync_bytes"].as_u64() > Some(0)
    });
    assert_eq!(a["disk"], "UpToDate", "alpha: {a}\nbeta: {b}");
    // The reason reaches the Primary's operator too (the Secondary's own log is on the full
    // disk), once: the Secondary does not come back until it is restarted.
    let alpha_log = std::fs::read_to_string(p.path("alpha.log")).unwrap_or_default();
    assert!(
        alpha_log.contains("write of the peer's data")
            && alpha_log.contains("No space left on device"),
        "alpha's log does not say why beta dropped out\n{}",
        p.logs()
    );
    assert_eq!(
        alpha_log.matches("handshake decided").count(),
        handshakes,
        "alpha handshook again with the detached Secondary\n{}",
        p.logs()
    );
    // Both daemons still answer and stop cleanly: no task died on the way.
    for i in [0, 1] {
        stop(&mut p, i);
    }
}

#[test]
fn a_full_secondary_disk_and_log_do_not_hang_sync_writes() {
    full_secondary("sync");
}

#[test]
fn a_full_secondary_disk_and_log_do_not_hang_async_writes() {
    full_secondary("async");
}

/// The Primary's own disk is full: the client's writes fail with ENOSPC (not EIO, not a hang),
/// and the Primary keeps serving.
fn full_primary(protocol: &str) {
    if !is_root() {
        eprintln!("skipping: mounting a tiny tmpfs needs root");
        return;
    }
    let (mut p, fs) = pair_with_full_node(protocol, 0, "4m", true);
    start_in_sync(&mut p);
    fs.fill(Some(&p.path("alpha.log")));
    let o = bounded(
        fio(&p.nbd_uri(0), p.dir.path(), "8M"),
        "fio through the Primary",
        || p.logs(),
    );
    let out = text(&o);
    assert!(
        !o.status.success() && out.contains("No space left on device"),
        "fio on a full Primary: expected ENOSPC, got: {out}\n{}",
        p.logs()
    );
    let s = p.wait(0, "the Primary answers", |_| true);
    assert_eq!(s["role"], "Primary", "alpha: {s}");
    for i in [0, 1] {
        stop(&mut p, i);
    }
}

#[test]
fn a_full_primary_disk_fails_writes_with_enospc_sync() {
    full_primary("sync");
}

#[test]
fn a_full_primary_disk_fails_writes_with_enospc_async() {
    full_primary("async");
}

/// `twinblk serve` (no replication) with its disk and its log on a full file system: the NBD
/// client gets NBD_ENOSPC for the write, and the server goes on serving.
#[test]
fn serve_on_a_full_disk_answers_enospc() {
    if !is_root() {
        eprintln!("skipping: mounting a tiny tmpfs needs root");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("twinblk-full-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let fs = Tmpfs::mount(&dir.path().join("small"), "4m");
    let sock = dir.path().join("s.nbd");
    let log = fs.0.join("serve.log");
    let mut server = Command::new(bin())
        .args(["serve", "--size", "64M", "--disk"])
        .arg(fs.0.join("d.img"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < DEADLINE,
            "serve never listened\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fs.fill(Some(&log));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let mut c = Command::new("/usr/bin/nbdsh");
    c.env("PATH", "/usr/bin:/bin").args(["-u", &uri, "-c"]).arg(
        "try:\n    h.pwrite(b'x' * (2 << 20), 0)\n    print('written')\n\
         except nbd.Error as e:\n    print('errno', e.errno)\n\
         print('read', len(h.pread(4096, 0)))\n",
    );
    let o = bounded(c, "nbdsh against serve", logs);
    let out = text(&o);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        o.status.success() && out.contains("errno ENOSPC") && out.contains("read 4096"),
        "serve on a full disk: expected ENOSPC for the write and a working read, got: {out}\n{}",
        logs()
    );
}

/// One nbdsh call on `uri` running `code` (Python, the handle is `h`), bounded; its stdout, or
/// the error it printed.
fn nbdsh(uri: &str, code: &str, logs: impl Fn() -> String) -> String {
    let mut cmd = Command::new("/usr/bin/nbdsh");
    // nbdsh runs `env python3`: the system one, which has libnbd's module.
    cmd.env("PATH", "/usr/bin:/bin")
        .args(["-u", uri, "-c", code]);
    let o = bounded(cmd, "nbdsh", logs);
    text(&o)
}

/// The activity log's transaction fails (here its write to the metadata: the log's ring on a
/// full file system, ENOSPC). That is a disk failure like a failed flush, not the daemon's
/// exit (which in async cut a failed Primary's handover of its writes short): the write
/// waiting for the transaction fails, the Primary, whose peer holds everything, gives its disk
/// up and stays up to say why, and the peer is promoted with every acknowledged write.
fn failed_activity_log_write(protocol: &str) {
    if !is_root() {
        eprintln!("skipping: mounting a tiny tmpfs needs root");
        return;
    }
    if !Path::new("/usr/bin/nbdsh").exists() {
        panic!("/usr/bin/nbdsh not found: install the Debian package `nbdsh` (libnbd)");
    }
    let mut p = Pair::configure_with("32M", &format!("protocol = \"{protocol}\"\n"), ["", ""]);
    // Alpha's metadata (only) moves onto a small file system.
    let fs = Tmpfs::mount(&p.path("small"), "2m");
    let meta = p.path("alpha.img.twinblk-meta");
    let moved = fs.0.join("alpha.meta");
    std::fs::copy(&meta, &moved).expect("copy metadata");
    std::fs::remove_file(&meta).expect("remove metadata");
    std::os::unix::fs::symlink(&moved, &meta).expect("symlink metadata");
    let md = p.cli(0, &["dump-md", "--json"]);
    assert!(md.status.success(), "dump-md: {}", text(&md));
    let md: serde_json::Value = serde_json::from_slice(&md.stdout).expect("dump-md json");
    let ring = md["al_ring_blocks"].as_u64().expect("al_ring_blocks") * 4096;
    start_in_sync(&mut p);
    let logs = || p.logs();
    // Acknowledged on both nodes; its extent (the first) is in the log from here on.
    let out = nbdsh(
        &p.nbd_uri(0),
        "h.pwrite(b'A' * 4096, 0); h.flush(); print('ok')",
        logs,
    );
    assert!(out.contains("ok"), "the first write: {out}\n{}", p.logs());
    // The log's ring becomes holes (it is the area's end) and the file system fills: the next
    // transaction's write needs a block it cannot get.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&moved)
        .expect("open metadata");
    let len = f.metadata().expect("stat").len();
    // SAFETY: fallocate on an open descriptor; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (len - ring) as libc::off_t,
            ring as libc::off_t,
        )
    };
    assert_eq!(r, 0, "punch the ring: {}", std::io::Error::last_os_error());
    fs.fill(None);
    // A write to another extent (8 MiB in) waits for a transaction, which fails.
    let out = nbdsh(
        &p.nbd_uri(0),
        "try:\n    h.pwrite(b'B' * 4096, 8 << 20)\n    print('wrote')\n\
         except Exception as e:\n    print('error', e)",
        logs,
    );
    assert!(
        out.contains("error") && !out.contains("wrote"),
        "a write without its activity-log transaction succeeded: {out}\n{}",
        p.logs()
    );
    let a = p.wait(0, "alpha gives its disk up and says why", |s| {
        !s["disk_failure"].is_null() && s["disk"] == "Inconsistent" && s["repl"] == "StandAlone"
    });
    let why = a["disk_failure"].as_str().unwrap_or_default();
    assert!(
        why.contains("activity-log transaction")
            && why.contains("No space left on device")
            && why.contains("Free space"),
        "alpha's disk_failure: {a}"
    );
    // Async: anything the peer still lacked was handed over before the hang-up.
    assert!(
        a["handover"].is_null() || a["handover"]["state"] == "done",
        "alpha's handover: {a}"
    );
    // The peer holds every acknowledged write: promoted, it serves the first one.
    p.wait(1, "beta sees alpha gone", |s| s["repl"] != "Established");
    let o = p.cli(1, &["primary"]);
    assert!(
        o.status.success(),
        "primary on beta: {}\n{}",
        text(&o),
        p.logs()
    );
    let out = nbdsh(
        &p.nbd_uri(1),
        "print('same' if h.pread(4096, 0) == b'A' * 4096 else 'differs')",
        logs,
    );
    assert!(out.contains("same"), "beta's block 0: {out}\n{}", p.logs());
    // Alpha was up all along, and stops cleanly.
    for i in [0, 1] {
        stop(&mut p, i);
    }
}

#[test]
fn a_failed_activity_log_write_detaches_the_disk_and_the_daemon_stays_sync() {
    failed_activity_log_write("sync");
}

#[test]
fn a_failed_activity_log_write_detaches_the_disk_and_the_daemon_stays_async() {
    failed_activity_log_write("async");
}
