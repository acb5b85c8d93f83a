//! The tokio driver around the codec: accepts connections, runs the handshake, and serves
//! requests pipelined — many in flight per connection, replies in completion order, batched
//! into few `writev`s.
//!
//! Per connection: the reader (this connection's task) parses requests straight out of a large
//! buffer and hands each to the backend in the order the client sent them (overlapping writes in
//! flight together land in that order). The operation's future goes to the writer task, which
//! waits for all of them in one `FuturesUnordered` (a task per request cost a spawn, a channel
//! send and a wake each) and writes everything finished at once in one vectored write. Reading
//! and writing stay in separate tasks, so a client that writes requests before reading replies
//! cannot deadlock us. A reply is only produced after the disk completed the operation, so a
//! FLUSH on any connection covers every write acknowledged on any connection (CAN_MULTI_CONN).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::codec::{self, Command, Export, Handshake, HandshakeStatus, Transmission};
use super::proto::{self, REQUEST_HEADER_LEN};
use crate::backend::{Backend, BackendError};
use crate::disk::{Disk, IoBuf};

/// Bytes of socket input read at once; many small requests are parsed per read.
const READ_BUF: usize = 256 * 1024;
/// Payload bytes a connection may hold in flight (requests + replies not yet written), in
/// units of `PERMIT_UNIT`. Bounds memory; a client sending faster just waits.
const PERMIT_UNIT: usize = 4096;
const INFLIGHT_BYTES: usize = 128 * 1024 * 1024;
const MAX_PERMITS: usize = INFLIGHT_BYTES / PERMIT_UNIT;
/// Most iovecs per writev (IOV_MAX is 1024).
const MAX_IOV: usize = 1024;
/// A client that connects and never finishes negotiating is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection may take to drain its replies at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("handshake: {0}")]
    Handshake(#[from] codec::HandshakeError),
    #[error("protocol: {0}")]
    Protocol(#[from] codec::FatalError),
    #[error("client did not finish the handshake within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

/// A request handed to the backend: resolves to its reply.
type Pending = Pin<Box<dyn Future<Output = Done> + Send>>;

/// A finished request, waiting to be written.
struct Done {
    cookie: u64,
    read: bool,
    offset: u64,
    outcome: Outcome,
    _permit: Option<OwnedSemaphorePermit>,
}

enum Outcome {
    Ok,
    Err(u32),
    Data(Option<IoBuf>),
}

/// Serves one export of one disk to any number of connections.
pub struct Server<B: Backend = Disk> {
    disk: B,
    export: Export,
}

impl<B: Backend> Server<B> {
    pub fn new(disk: B, name: String, description: String) -> Arc<Server<B>> {
        let export = Export {
            name,
            description,
            size: disk.size(),
            read_only: disk.read_only(),
            min_block: disk.block_size(),
        };
        Arc::new(Server { disk, export })
    }

    pub fn disk(&self) -> &B {
        &self.disk
    }

    /// Serve one connection until the client leaves, the protocol breaks, or `shutdown` turns
    /// true (then: stop reading, finish what is in flight, write the replies, return).
    pub async fn serve_connection<R, W>(
        self: Arc<Self>,
        mut rd: R,
        mut wr: W,
        client: &str,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ServeError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut buf = InBuf::new();
        let hs = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            self.handshake(&mut rd, &mut wr, &mut buf, client, &mut shutdown),
        );
        let Some(negotiated) = hs.await.map_err(|_| ServeError::HandshakeTimeout)?? else {
            return Ok(());
        };
        let opened = match self.disk.opened(client) {
            Ok(o) => o,
            Err(why) => {
                info!(%client, "closing a client that negotiated just as the export closed: {why}");
                return Ok(());
            }
        };
        // Held until the connection ends: the backend counts this client as open meanwhile.
        let _guard = opened.guard;
        if let Some(mut close) = opened.close {
            // The backend may end this connection (e.g. `secondary --force`): it then ends as
            // at shutdown, answering what it read.
            let (tx, rx) = watch::channel(*shutdown.borrow());
            let mut outer = shutdown;
            tokio::spawn(async move {
                tokio::select! {
                    _ = outer.wait_for(|s| *s) => {}
                    _ = close.wait_for(|c| *c) => {}
                    _ = tx.closed() => return,
                }
                let _ = tx.send(true);
            });
            shutdown = rx;
        }
        debug!(
            structured = negotiated.structured,
            flags = negotiated.flags,
            "transmission"
        );

        let t = Transmission {
            size: self.export.size,
            read_only: self.export.read_only,
            structured: negotiated.structured,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_replies(wr, rx, t.structured));
        let result = self.read_requests(&mut rd, buf, tx, t, &mut shutdown).await;
        // The writer ends when every in-flight operation has sent its reply.
        let drained = if *shutdown.borrow() {
            tokio::time::timeout(DRAIN_TIMEOUT, writer).await.ok()
        } else {
            Some(writer.await)
        };
        match drained {
            Some(Ok(Err(e))) => debug!("writing replies: {e}"),
            Some(Err(e)) => warn!("reply writer: {e}"),
            None => warn!("gave up waiting for a client to read its replies"),
            Some(Ok(Ok(()))) => {}
        }
        result
    }

    /// Run the handshake; `None` if the client left or aborted.
    async fn handshake<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
        buf: &mut InBuf,
        client: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<codec::Negotiated>, ServeError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out = Vec::with_capacity(512);
        let mut hs = Handshake::new(self.export.clone(), &mut out);
        if let Some(why) = self.disk.refuse_open() {
            info!(%client, "this client may list the export but not open it: {why}");
            hs.refuse(why);
        }
        loop {
            if !out.is_empty() {
                wr.write_all(&out).await?;
                out.clear();
            }
            let (used, status) = hs.feed(buf.data(), &mut out)?;
            buf.consume(used);
            match status {
                HandshakeStatus::Done(n) => {
                    wr.write_all(&out).await?;
                    return Ok(Some(n));
                }
                HandshakeStatus::Close => {
                    wr.write_all(&out).await?;
                    debug!("client aborted the handshake");
                    return Ok(None);
                }
                HandshakeStatus::NeedMore => {
                    if !out.is_empty() {
                        continue;
                    }
                    if buf.fill(rd, shutdown).await? == 0 {
                        debug!("client left during the handshake");
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn read_requests<R: AsyncRead + Unpin>(
        self: &Arc<Self>,
        rd: &mut R,
        mut buf: InBuf,
        tx: mpsc::UnboundedSender<Pending>,
        t: Transmission,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ServeError> {
        let permits = Arc::new(Semaphore::new(MAX_PERMITS));
        loop {
            while let Some(h) = codec::parse_header(buf.data())? {
                buf.consume(REQUEST_HEADER_LEN);
                // Only READ/WRITE hold buffers (≤ MAX_PAYLOAD, checked by parse_header);
                // TRIM/WRITE_ZEROES lengths may be huge but cost no memory.
                let units = if matches!(h.kind, proto::CMD_READ | proto::CMD_WRITE) {
                    (h.len as usize).div_ceil(PERMIT_UNIT).clamp(1, MAX_PERMITS) as u32
                } else {
                    1
                };
                let permit = tokio::select! {
                    p = permits.clone().acquire_many_owned(units) => p.ok(),
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                };
                let cmd = codec::validate(&h, &t);
                let read = h.kind == proto::CMD_READ;
                let reply = |outcome| Done {
                    cookie: h.cookie,
                    read,
                    offset: h.offset,
                    outcome,
                    _permit: None,
                };
                let payload = h.payload_len() as usize;
                match cmd {
                    Err(errno) => {
                        if payload > 0 && !buf.skip(rd, payload, shutdown).await? {
                            return Ok(());
                        }
                        debug!(cookie = h.cookie, kind = h.kind, errno, "rejected request");
                        let _ = tx.send(Box::pin(std::future::ready(reply(Outcome::Err(errno)))));
                    }
                    Ok(Command::Disconnect) => {
                        debug!("client disconnected (NBD_CMD_DISC)");
                        return Ok(());
                    }
                    Ok(Command::Write { offset, len, fua }) => {
                        let mut data = self.disk.alloc(len as usize);
                        if !buf.read_into(rd, &mut data, shutdown).await? {
                            // Client gone mid-payload: this write was never acknowledged.
                            return Ok(());
                        }
                        let io = (len > 0).then(|| self.disk.write(offset, data, fua));
                        let flush = (len == 0 && fua).then(|| self.disk.clone());
                        self.queue(&tx, permit, h.cookie, offset, false, outcome(io, flush));
                    }
                    Ok(Command::Read { offset, len }) => {
                        let io = (len > 0).then(|| self.disk.read(offset, len));
                        self.queue(&tx, permit, h.cookie, offset, true, async move {
                            match io {
                                None => Outcome::Data(None),
                                Some(io) => match io.await {
                                    Ok(b) => Outcome::Data(Some(b)),
                                    Err(e) => disk_error(&e),
                                },
                            }
                        });
                    }
                    Ok(Command::Flush) => {
                        let io = Some(self.disk.flush());
                        self.queue(&tx, permit, h.cookie, 0, false, outcome::<B>(io, None));
                    }
                    Ok(Command::Trim { offset, len, fua }) => {
                        let io = (len > 0).then(|| self.disk.trim(offset, len.into()));
                        let flush = fua.then(|| self.disk.clone());
                        self.queue(&tx, permit, h.cookie, offset, false, outcome(io, flush));
                    }
                    Ok(Command::WriteZeroes {
                        offset,
                        len,
                        fua,
                        no_hole,
                        fast: _,
                    }) => {
                        // FAST_ZERO: on a regular file, zeroing is a fallocate (fast), so
                        // we always attempt it; the disk layer reports ENOTSUP otherwise.
                        let io =
                            (len > 0).then(|| self.disk.write_zeroes(offset, len.into(), !no_hole));
                        let flush = fua.then(|| self.disk.clone());
                        self.queue(&tx, permit, h.cookie, offset, false, outcome(io, flush));
                    }
                }
            }
            if buf.fill(rd, shutdown).await? == 0 {
                if !buf.data().is_empty() {
                    debug!("client left in the middle of a request header");
                }
                return Ok(());
            }
        }
    }

    /// Passes `op` (already handed to the backend, in the client's order) to the writer, which
    /// waits for it and writes its reply.
    fn queue(
        &self,
        tx: &mpsc::UnboundedSender<Pending>,
        permit: Option<OwnedSemaphorePermit>,
        cookie: u64,
        offset: u64,
        read: bool,
        op: impl std::future::Future<Output = Outcome> + Send + 'static,
    ) {
        let _ = tx.send(Box::pin(async move {
            Done {
                cookie,
                read,
                offset,
                outcome: op.await,
                _permit: permit,
            }
        }));
    }
}

/// The outcome of `io` (already handed to the backend; none: nothing to do), then, for FUA,
/// of a flush of `flush_after`, asked for once `io` is done.
async fn outcome<B: Backend>(
    io: Option<impl std::future::Future<Output = Result<(), B::Error>>>,
    flush_after: Option<B>,
) -> Outcome {
    if let Some(io) = io {
        if let Err(e) = io.await {
            return disk_error(&e);
        }
    }
    if let Some(d) = flush_after {
        if let Err(e) = d.flush().await {
            return disk_error(&e);
        }
    }
    Outcome::Ok
}

fn disk_error<E: BackendError>(e: &E) -> Outcome {
    warn!("disk: {e}");
    Outcome::Err(proto::wire_errno(e.errno()))
}

/// Wait for the requests the reader hands over and write their replies as they complete;
/// everything finished at once goes out in one vectored write. Ends once the reader is done and
/// every request has its reply written.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    structured: bool,
) -> io::Result<()> {
    let mut inflight: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut incoming: Vec<Pending> = Vec::with_capacity(64);
    let mut reader_done = false;
    let mut batch: Vec<Done> = Vec::with_capacity(64);
    let mut headers: Vec<u8> = Vec::with_capacity(64 * 32);
    // Where each reply's header ends in `headers`.
    let mut ends: Vec<usize> = Vec::with_capacity(64);
    loop {
        tokio::select! {
            // New requests first: they must be polled once to be waited for.
            n = rx.recv_many(&mut incoming, 256), if !reader_done => {
                reader_done = n == 0;
                inflight.extend(incoming.drain(..));
            }
            Some(d) = inflight.next(), if !inflight.is_empty() => batch.push(d),
            else => return wr.flush().await,
        }
        // Everything else already finished joins this write.
        while batch.len() < MAX_IOV / 2 {
            match inflight.next().now_or_never() {
                Some(Some(d)) => batch.push(d),
                _ => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        headers.clear();
        ends.clear();
        for d in &batch {
            match &d.outcome {
                Outcome::Ok => codec::encode_simple_reply(&mut headers, d.cookie, 0),
                Outcome::Err(e) => {
                    codec::encode_error_reply(&mut headers, structured, d.read, d.cookie, *e)
                }
                Outcome::Data(b) => {
                    let len = b.as_ref().map_or(0, |b| b.len() as u32);
                    codec::encode_read_reply_header(
                        &mut headers,
                        structured,
                        d.cookie,
                        d.offset,
                        len,
                    )
                }
            }
            ends.push(headers.len());
        }
        // Headers are contiguous in `headers`; runs of them go out as one slice, split only
        // where read data sits between them.
        let mut parts: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
        let mut run_start = 0;
        for (d, &end) in batch.iter().zip(&ends) {
            if let Outcome::Data(Some(b)) = &d.outcome {
                if !b.is_empty() {
                    parts.push(headers.get(run_start..end).unwrap_or_default());
                    parts.push(b);
                    run_start = end;
                }
            }
        }
        if run_start < headers.len() {
            parts.push(headers.get(run_start..).unwrap_or_default());
        }
        let mut iov = Vec::with_capacity(parts.len().min(MAX_IOV));
        write_all_vectored(&mut wr, &parts, &mut iov).await?;
        drop(iov);
        drop(parts);
        batch.clear();
    }
}

/// Write all of `parts` with as few vectored writes as the socket allows.
async fn write_all_vectored<'a, W: AsyncWrite + Unpin>(
    wr: &mut W,
    parts: &[&'a [u8]],
    iov: &mut Vec<IoSlice<'a>>,
) -> io::Result<()> {
    let (mut i, mut off) = (0, 0);
    while i < parts.len() {
        iov.clear();
        iov.extend(
            parts
                .get(i..)
                .unwrap_or_default()
                .iter()
                .take(MAX_IOV)
                .enumerate()
                .map(|(k, p)| {
                    IoSlice::new(if k == 0 {
                        p.get(off..).unwrap_or_default()
                    } else {
                        p
                    })
                }),
        );
        let mut n = wr.write_vectored(iov).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Skip what was written: whole parts, then a partial one.
        while let Some(p) = parts.get(i) {
            let left = p.len() - off;
            if n < left {
                off += n;
                break;
            }
            n -= left;
            i += 1;
            off = 0;
        }
    }
    Ok(())
}

/// Socket input buffer: read big, parse many requests per read.
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new() -> InBuf {
        InBuf {
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Read more input (at least one byte, or 0 at EOF or shutdown).
    async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        shutdown: &mut watch::Receiver<bool>,
    ) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let Some(space) = self.buf.get_mut(self.end..) else {
            return Ok(0);
        };
        if space.is_empty() {
            // Cannot happen: every message we wait for fits in the buffer.
            return Err(io::Error::other("input buffer full"));
        }
        let n = tokio::select! {
            r = rd.read(space) => r?,
            _ = shutdown.wait_for(|s| *s) => 0,
        };
        self.end += n;
        Ok(n)
    }

    /// Fill `dst` with the next bytes of the stream: first from the buffer, the rest read
    /// straight from the socket. False on EOF or shutdown.
    async fn read_into<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        dst: &mut [u8],
        shutdown: &mut watch::Receiver<bool>,
    ) -> io::Result<bool> {
        let have = self.data().len().min(dst.len());
        let (head, mut tail) = dst.split_at_mut(have);
        head.copy_from_slice(self.data().get(..have).unwrap_or(&[]));
        self.consume(have);
        while !tail.is_empty() {
            let n = tokio::select! {
                r = rd.read(tail) => r?,
                _ = shutdown.wait_for(|s| *s) => 0,
            };
            if n == 0 {
                return Ok(false);
            }
            tail = &mut tail[n..];
        }
        Ok(true)
    }

    /// Discard the next `n` bytes of the stream. False on EOF or shutdown.
    async fn skip<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        mut n: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> io::Result<bool> {
        while n > 0 {
            if self.data().is_empty() && self.fill(rd, shutdown).await? == 0 {
                return Ok(false);
            }
            let k = self.data().len().min(n);
            self.consume(k);
            n -= k;
        }
        Ok(true)
    }
}

/// Run `serve_connection` for a socket's two halves, logging how it ended.
pub async fn run_connection<B, R, W>(
    server: Arc<Server<B>>,
    rd: R,
    wr: W,
    peer: String,
    shutdown: watch::Receiver<bool>,
) where
    B: Backend,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    debug!(%peer, "connected");
    match server.serve_connection(rd, wr, &peer, shutdown).await {
        Ok(()) => debug!(%peer, "connection closed"),
        // A client that hangs up mid-reply is routine; protocol violations are worth a line.
        Err(ServeError::Io(e)) => debug!(%peer, "connection ended: {e}"),
        Err(e) => info!(%peer, "closing connection: {e}"),
    }
}

/// Connection tasks, so shutdown can wait for them.
pub type Connections = JoinSet<()>;
