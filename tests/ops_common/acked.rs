//! Records every write a node acknowledged and reads them back from a survivor: the checker
//! for "no acknowledged write is ever lost" with real daemons (failover, switchover, stale
//! promotion, `down` and restart).
//!
//! [`Writer`] is a raw NBD client on a node's unix socket that writes 4 KiB blocks, each
//! carrying its block number and a write version (the content tag) at its head and tail, the
//! rest derived from them, so a torn or misplaced block is recognised. It records, per block,
//! every version sent and the newest one acknowledged. [`check_node`] reads the blocks back
//! over NBD (from a Primary), [`check_image`] from a backing file (a Secondary refuses reads):
//! every block must hold its newest acknowledged version, or a later one that was sent (and
//! may have been applied without its acknowledgement reaching the client).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use twinblk::nbd::codec::{encode_request, RequestHeader};
use twinblk::nbd::proto::*;

pub const BS: usize = 4096;

/// Write `version`'s contents for block `b`.
pub fn block(b: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; BS];
    let mut x = (b << 32) ^ version ^ 0x9e37_79b9_7f4a_7c15;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&version.to_le_bytes());
    v[BS - 16..BS - 8].copy_from_slice(&b.to_le_bytes());
    v[BS - 8..].copy_from_slice(&version.to_le_bytes());
    v
}

/// The version block `b` holds (0: all zeroes, never written), or why it is not one of ours.
pub fn version_of(b: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|&x| x == 0) {
        return Ok(0);
    }
    let word = |at: usize| {
        data.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(u64::MAX)
    };
    let v = word(8);
    if data == block(b, v).as_slice() {
        Ok(v)
    } else {
        Err(format!(
            "block {b} holds foreign or torn data (head says block {} version {v})",
            word(0)
        ))
    }
}

/// What a writer learned: per block, the newest acknowledged version and every version sent.
#[derive(Default, Debug, Clone)]
pub struct AckLog {
    pub acked: HashMap<u64, u64>,
    pub sent: HashMap<u64, Vec<u64>>,
    pub acks: u64,
    /// Error replies (not acknowledgements: such a write may or may not be anywhere).
    pub errors: u64,
}

impl AckLog {
    /// Adds another writer's record (their versions never collide when their bases differ).
    pub fn merge(&mut self, o: &AckLog) {
        for (b, v) in &o.acked {
            let e = self.acked.entry(*b).or_insert(0);
            *e = (*e).max(*v);
        }
        for (b, v) in &o.sent {
            self.sent.entry(*b).or_default().extend(v);
        }
        self.acks += o.acks;
        self.errors += o.errors;
    }

    /// One block's check: `have` is what the survivor holds.
    fn check(&self, b: u64, have: u64, who: &str) -> Result<bool, String> {
        let acked = self.acked.get(&b).copied().unwrap_or(0);
        let sent = self.sent.get(&b).map(Vec::as_slice).unwrap_or(&[]);
        if have < acked || (have != 0 && !sent.contains(&have)) {
            return Err(format!(
                "{who}: block {b} holds version {have}, but version {acked} was acknowledged \
                 (sent: {sent:?})"
            ));
        }
        Ok(acked > 0)
    }
}

/// A minimal NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies) on a unix socket.
pub struct Nbd {
    sock: UnixStream,
}

impl Nbd {
    pub fn connect(path: &Path) -> Result<Nbd, String> {
        let sock = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut c = Nbd { sock };
        c.handshake()
            .map_err(|e| format!("{}: handshake: {e}", path.display()))?;
        Ok(c)
    }

    fn read_exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0; n];
        self.sock.read_exact(&mut b)?;
        Ok(b)
    }

    fn handshake(&mut self) -> std::io::Result<()> {
        let g = self.read_exact(18)?;
        if g[..8] != NBDMAGIC.to_be_bytes() {
            return Err(std::io::Error::other("not an NBD server"));
        }
        let mut out = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&6u32.to_be_bytes());
        out.extend_from_slice(&[0; 6]); // empty name, no info requests
        self.sock.write_all(&out)?;
        loop {
            let h = self.read_exact(20)?;
            let rep = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            self.read_exact(len)?;
            if rep & REP_FLAG_ERROR != 0 {
                return Err(std::io::Error::other(format!(
                    "NBD_OPT_GO refused: {rep:#x}"
                )));
            }
            if rep == REP_ACK {
                return Ok(());
            }
        }
    }

    pub fn send(
        &mut self,
        kind: u16,
        cookie: u64,
        offset: u64,
        payload: &[u8],
        len: u32,
    ) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(28 + payload.len());
        encode_request(
            &mut b,
            &RequestHeader {
                flags: 0,
                kind,
                cookie,
                offset,
                len,
            },
        );
        b.extend_from_slice(payload);
        self.sock.write_all(&b)
    }

    /// One simple reply: (cookie, errno, data of `read_len` bytes if it succeeded).
    pub fn reply(&mut self, read_len: usize) -> std::io::Result<(u64, u32, Vec<u8>)> {
        let r = self.read_exact(16)?;
        if u32::from_be_bytes([r[0], r[1], r[2], r[3]]) != SIMPLE_REPLY_MAGIC {
            return Err(std::io::Error::other("bad reply magic"));
        }
        let error = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
        let cookie = u64::from_be_bytes(r[8..16].try_into().expect("8 bytes"));
        let data = if error == 0 && read_len > 0 {
            self.read_exact(read_len)?
        } else {
            Vec::new()
        };
        Ok((cookie, error, data))
    }

    /// Reads block `b`.
    pub fn read_block(&mut self, b: u64) -> Result<Vec<u8>, String> {
        self.send(CMD_READ, b + 1, b * BS as u64, &[], BS as u32)
            .map_err(|e| e.to_string())?;
        match self.reply(BS).map_err(|e| e.to_string())? {
            (c, 0, d) if c == b + 1 => Ok(d),
            (c, e, _) => Err(format!("read of block {b}: cookie {c}, error {e}")),
        }
    }
}

/// A background writer: random 4 KiB writes with `qd` in flight on a node's NBD socket, until
/// [`Writer::stop`], an error reply (e.g. EPERM once the node is no longer Primary) or a broken
/// connection.
pub struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<AckLog>,
}

impl Writer {
    /// Versions start after `base`, so two writers' blocks never look alike.
    pub fn start(socket: &Path, blocks: u64, qd: usize, base: u64) -> Writer {
        Writer::start_n(socket, blocks, qd, base, u64::MAX)
    }

    /// Like [`Writer::start`], submitting at most `max` writes (then it finishes by itself once
    /// they are answered: [`Writer::finished`]).
    pub fn start_n(socket: &Path, blocks: u64, qd: usize, base: u64, max: u64) -> Writer {
        let mut c = Nbd::connect(socket).unwrap_or_else(|e| panic!("writer: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut r = AckLog::default();
            let mut x = base | 1;
            let mut version = base;
            let mut inflight: Vec<(u64, u64)> = Vec::new();
            let mut failed = false;
            let mut submitted = 0u64;
            loop {
                while !failed
                    && inflight.len() < qd
                    && submitted < max
                    && !flag.load(Ordering::Relaxed)
                {
                    submitted += 1;
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = x % blocks;
                    version += 1;
                    r.sent.entry(b).or_default().push(version);
                    if c.send(
                        CMD_WRITE,
                        version,
                        b * BS as u64,
                        &block(b, version),
                        BS as u32,
                    )
                    .is_err()
                    {
                        return r;
                    }
                    inflight.push((version, b));
                }
                if inflight.is_empty() {
                    return r;
                }
                match c.reply(0) {
                    Ok((cookie, err, _)) => {
                        let Some(i) = inflight.iter().position(|&(v, _)| v == cookie) else {
                            panic!("writer: reply for unknown cookie {cookie}");
                        };
                        let (v, b) = inflight.swap_remove(i);
                        if err == 0 {
                            let e = r.acked.entry(b).or_insert(0);
                            *e = (*e).max(v);
                            r.acks += 1;
                        } else {
                            r.errors += 1;
                            failed = true;
                        }
                    }
                    Err(_) => return r,
                }
            }
        });
        Writer { stop, handle }
    }

    /// Whether the writer gave up by itself (error reply or broken connection).
    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops submitting, waits for the replies in flight, closes the connection.
    pub fn stop(self) -> AckLog {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("writer thread")
    }
}

/// Every acknowledged write of `log` is on the node serving `socket` (a Primary): returns how
/// many blocks with an acknowledged write were checked.
pub fn check_node(socket: &Path, log: &AckLog, who: &str) -> Result<usize, String> {
    let mut c = Nbd::connect(socket)?;
    let mut blocks: Vec<u64> = log.sent.keys().copied().collect();
    blocks.sort_unstable();
    let mut checked = 0;
    for b in blocks {
        let data = c.read_block(b)?;
        let have = version_of(b, &data).map_err(|e| format!("{who}: {e}"))?;
        checked += usize::from(log.check(b, have, who)?);
    }
    Ok(checked)
}

/// The same check on a backing file's contents (a stopped node, or a Secondary).
pub fn check_image(img: &[u8], log: &AckLog, who: &str) -> Result<usize, String> {
    let mut checked = 0;
    let mut blocks: Vec<u64> = log.sent.keys().copied().collect();
    blocks.sort_unstable();
    for b in blocks {
        let at = b as usize * BS;
        let data = img
            .get(at..at + BS)
            .ok_or_else(|| format!("{who}: block {b} is past the end of the image"))?;
        let have = version_of(b, data).map_err(|e| format!("{who}: {e}"))?;
        checked += usize::from(log.check(b, have, who)?);
    }
    Ok(checked)
}
