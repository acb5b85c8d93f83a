//! Shared by the NBD integration tests: start `twinblk serve` on a temp file, find the external
//! client tools, and speak raw NBD for the bad-input tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use twinblk::nbd::codec::{self, RequestHeader};
use twinblk::nbd::proto::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}
pub const TRANSPORTS: [Transport; 2] = [Transport::Unix, Transport::Tcp];

/// Fail (never skip) when a client tool is missing: CI installs them.
pub fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` not found on PATH: install the Debian package `{package}` (apt-get install {package})"
    );
}

pub struct Served {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub transport: Transport,
    /// Socket path (unix) or host:port (tcp).
    pub addr: String,
    /// stderr of the server, collected in the background (also keeps the pipe drained).
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Served {
    /// Start `twinblk serve` on a fresh file of `size` bytes, plus `extra` arguments.
    pub fn start(transport: Transport, size: u64, extra: &[&str]) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.img");
        Self::start_on(transport, dir, disk, Some(size), extra)
    }

    pub fn start_on(
        transport: Transport,
        dir: tempfile::TempDir,
        disk: PathBuf,
        size: Option<u64>,
        extra: &[&str],
    ) -> Served {
        let listen = match transport {
            Transport::Unix => format!("unix:{}", dir.path().join("nbd.sock").display()),
            Transport::Tcp => "tcp:127.0.0.1:0".to_owned(),
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinblk"));
        cmd.arg("serve").arg("--disk").arg(&disk).args([
            "--listen",
            &listen,
            "--cache",
            "writeback",
            "--log-level",
            "debug",
        ]);
        if let Some(s) = size {
            cmd.args(["--size", &s.to_string()]);
        }
        let mut child = cmd
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twinblk");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.to_owned());
                }
            }
        });
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = log2.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let shown = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                std::thread::sleep(Duration::from_millis(100));
                panic!("server did not start; log:\n{}", log.lock().unwrap());
            }
        };
        let addr = match transport {
            Transport::Unix => shown.strip_prefix("unix:").unwrap().to_owned(),
            Transport::Tcp => shown.strip_prefix("tcp:").unwrap().to_owned(),
        };
        Served {
            child,
            dir,
            disk,
            transport,
            addr,
            log,
        }
    }

    /// A libnbd/qemu URI for export `name`.
    pub fn uri(&self, name: &str) -> String {
        match self.transport {
            Transport::Unix => format!("nbd+unix:///{name}?socket={}", self.addr),
            Transport::Tcp => format!("nbd://{}/{name}", self.addr),
        }
    }

    pub fn raw(&self) -> Raw {
        Raw::connect(self.transport, &self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..600 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!(
            "server did not exit within 30 s of SIGTERM; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a command, returning its output; panics with the output if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fill a file with deterministic pseudo-random bytes.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    // Leave some zero stretches so clients exercise write-zeroes/holes.
    for z in data.chunks_mut(1 << 20).step_by(3) {
        z[..65536].fill(0);
    }
    std::fs::write(path, data).expect("write random file");
}

// ---------------------------------------------------------------------------------------------
// A raw NBD client.

pub enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}
impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Raw {
    pub sock: Sock,
    pub structured: bool,
}

impl Raw {
    pub fn connect(t: Transport, addr: &str) -> Raw {
        let sock = match t {
            Transport::Unix => Sock::Unix(UnixStream::connect(addr).expect("connect unix")),
            Transport::Tcp => Sock::Tcp(TcpStream::connect(addr).expect("connect tcp")),
        };
        let timeout = Some(Duration::from_secs(20));
        match &sock {
            Sock::Unix(s) => s.set_read_timeout(timeout).unwrap(),
            Sock::Tcp(s) => s.set_read_timeout(timeout).unwrap(),
        }
        Raw {
            sock,
            structured: false,
        }
    }

    pub fn read_exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0; n];
        self.sock.read_exact(&mut b)?;
        Ok(b)
    }

    /// Fixed-newstyle handshake with NBD_OPT_GO; returns (size, transmission flags).
    pub fn handshake(&mut self, structured: bool, name: &str) -> (u64, u16) {
        let g = self.read_exact(18).expect("greeting");
        assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
        let mut out = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        let opt = |out: &mut Vec<u8>, o: u32, d: &[u8]| {
            out.extend_from_slice(&IHAVEOPT.to_be_bytes());
            out.extend_from_slice(&o.to_be_bytes());
            out.extend_from_slice(&(d.len() as u32).to_be_bytes());
            out.extend_from_slice(d);
        };
        if structured {
            opt(&mut out, OPT_STRUCTURED_REPLY, &[]);
        }
        let mut go = (name.len() as u32).to_be_bytes().to_vec();
        go.extend_from_slice(name.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        opt(&mut out, OPT_GO, &go);
        self.sock.write_all(&out).expect("send options");
        self.structured = structured;
        let mut info = None;
        loop {
            let h = self.read_exact(20).expect("option reply");
            let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let rep = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let d = self.read_exact(len).expect("option reply data");
            assert_eq!(rep & REP_FLAG_ERROR, 0, "option {option} failed: {rep:#x}");
            if option == OPT_GO && rep == REP_INFO && d[..2] == [0, 0] {
                info = Some((
                    u64::from_be_bytes(d[2..10].try_into().unwrap()),
                    u16::from_be_bytes(d[10..12].try_into().unwrap()),
                ));
            }
            if option == OPT_GO && rep == REP_ACK {
                return info.expect("NBD_INFO_EXPORT");
            }
        }
    }

    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        codec::encode_request(
            &mut b,
            &RequestHeader {
                flags,
                kind,
                cookie,
                offset,
                len,
            },
        );
        b.extend_from_slice(payload);
        self.sock.write_all(&b).expect("send request");
    }

    /// Read one reply; returns (cookie, error, read data).
    pub fn reply(&mut self, read_len: usize) -> std::io::Result<(u64, u32, Vec<u8>)> {
        let m = self.read_exact(4)?;
        let magic = u32::from_be_bytes(m[..4].try_into().unwrap());
        if magic == SIMPLE_REPLY_MAGIC {
            let r = self.read_exact(12)?;
            let error = u32::from_be_bytes(r[..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(r[4..12].try_into().unwrap());
            let data = if error == 0 {
                self.read_exact(read_len)?
            } else {
                vec![]
            };
            return Ok((cookie, error, data));
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "bad reply magic");
        let r = self.read_exact(16)?;
        let flags = u16::from_be_bytes(r[..2].try_into().unwrap());
        let kind = u16::from_be_bytes(r[2..4].try_into().unwrap());
        let cookie = u64::from_be_bytes(r[4..12].try_into().unwrap());
        let len = u32::from_be_bytes(r[12..16].try_into().unwrap()) as usize;
        let p = self.read_exact(len)?;
        assert_ne!(flags & REPLY_FLAG_DONE, 0, "we only send one chunk");
        match kind {
            REPLY_TYPE_OFFSET_DATA => Ok((cookie, 0, p[8..].to_vec())),
            REPLY_TYPE_ERROR => Ok((
                cookie,
                u32::from_be_bytes(p[..4].try_into().unwrap()),
                vec![],
            )),
            k => panic!("unexpected chunk type {k}"),
        }
    }

    /// True once the server has closed the connection (EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.sock.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}
