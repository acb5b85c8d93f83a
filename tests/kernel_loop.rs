//! The kernel path without a VM: `nbdfuse` exposes the NBD export as a file, `losetup
//! --direct-io=on` turns it into a block device, and a real ext4 goes on top, written, remounted,
//! read back and checked with fio's verify. This puts the Linux block layer and a file system in front
//! of `twinblk serve`, which no NBD client library does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: apt-get install {package} (.ci/run does this)");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything the test set up, torn down in reverse order even when an assertion fails, so that a
/// failing run does not leave mounts and loop devices behind on the CI machine.
struct Stack {
    server: Option<Child>,
    fuse: Option<Child>,
    fuse_dir: PathBuf,
    loopdev: Option<String>,
    mounted: Option<PathBuf>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        if let Some(l) = self.loopdev.take() {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        if let Some(mut f) = self.fuse.take() {
            let _ = Command::new("umount").arg(&self.fuse_dir).status();
            let _ = f.kill();
            let _ = f.wait();
        }
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

#[test]
fn ext4_on_loop_on_nbdfuse_on_twinblk() {
    let nbdfuse = tool("nbdfuse", "nbdfuse");
    let losetup = tool("losetup", "mount");
    let mkfs = tool("mkfs.ext4", "e2fsprogs");
    let fio = tool("fio", "fio");

    let dir = tempfile::Builder::new()
        .prefix("twinblk-loop")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let disk = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&fuse_dir).expect("mkdir fuse");
    std::fs::create_dir(&mnt).expect("mkdir mnt");

    let server = Command::new(env!("CARGO_BIN_EXE_twinblk"))
        .args(["serve", "--disk"])
        .arg(&disk)
        .args(["--size", "256M", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("start twinblk serve");
    let mut stack = Stack {
        server: Some(server),
        fuse: None,
        fuse_dir: fuse_dir.clone(),
        loopdev: None,
        mounted: None,
    };
    wait_for("the NBD socket", || sock.exists());

    let fuse_file = fuse_dir.join("nbd");
    stack.fuse = Some(
        Command::new(&nbdfuse)
            .arg(&fuse_file)
            .arg("--unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdfuse"),
    );
    wait_for("the nbdfuse file", || {
        std::fs::metadata(&fuse_file).is_ok_and(|m| m.len() == 256 << 20)
    });

    let loopdev = run(Command::new(&losetup)
        .args(["--direct-io=on", "--find", "--show"])
        .arg(&fuse_file))
    .trim()
    .to_owned();
    assert!(loopdev.starts_with("/dev/loop"), "losetup said {loopdev:?}");
    stack.loopdev = Some(loopdev.clone());

    run(Command::new(&mkfs).args(["-q", "-F", &loopdev]));
    run(Command::new("mount").arg(&loopdev).arg(&mnt));
    stack.mounted = Some(mnt.clone());

    // Files through the page cache and the file system's own journal...
    let mut expected = Vec::new();
    for i in 0..8u32 {
        let body: Vec<u8> = (0..(300_000 + i * 7919))
            .map(|j| (j.wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8)
            .collect();
        std::fs::write(mnt.join(format!("f{i}")), &body).expect("write file");
        expected.push(body);
    }
    // ...and fio with O_DIRECT and verification inside the file system.
    // fio leaves a verify-state file in its working directory: keep it in the test's directory.
    run(Command::new(&fio)
        .current_dir(dir.path())
        .args([
            "--name=verify",
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--direct=1",
            "--ioengine=psync",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ])
        .arg(format!("--filename={}", mnt.join("fio.dat").display())));

    run(Command::new("umount").arg(&mnt));
    stack.mounted = None;
    run(Command::new("fsck.ext4").args(["-n", "-f", &loopdev]));
    run(Command::new("mount").arg(&loopdev).arg(&mnt));
    stack.mounted = Some(mnt.clone());
    for (i, body) in expected.iter().enumerate() {
        let got = std::fs::read(mnt.join(format!("f{i}"))).expect("read back");
        assert!(got == *body, "file f{i} differs after remount");
    }
    drop(stack);
}
