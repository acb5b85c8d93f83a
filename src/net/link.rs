//! The QUIC endpoint, connection setup, per-connection stream tasks and the reconnect loop.

use super::frame::{write_frame, writer_task, FrameReader, OutFrame, Outbox, ReadEnd};
use super::keys::Identity;
use super::tls::{self, AuthLog};
use super::{NetError, ALPN, MAX_FRAME};
use crate::config::Config;
use bytes::{BufMut, Bytes, BytesMut};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Application close codes sent in QUIC CONNECTION_CLOSE. The driver may use codes >= 16.
pub mod close_code {
    /// Deliberate disconnect (admin command, shutdown).
    pub const DISCONNECT: u32 = 0;
    /// The peer broke framing or the setup exchange.
    pub const PROTOCOL: u32 = 1;
    /// A newer connection from the same peer replaced this one.
    pub const REPLACED: u32 = 2;
    /// Setup exchange found a different resource, node names or stream count.
    pub const MISMATCH: u32 = 3;
}

/// Knobs with their defaults; [`LinkConfig::from_config`] fills them from the resource file.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// QUIC keep-alive (`ping-interval`). Default 1 s.
    pub keep_alive: Duration,
    /// QUIC idle timeout (`timeout`): a peer silent this long is dead. Default 5 s.
    pub idle_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt. Default 100 ms.
    pub retry_min: Duration,
    /// Cap of the reconnect delay (`connect-retry`). Default 5 s.
    pub retry_max: Duration,
    /// Data streams per direction (`data-streams`). Default 4.
    pub data_streams: u8,
    /// Per-stream receive window (`window`). Default 32 MiB.
    pub stream_window: u64,
    /// Connection receive window and send window. Default 2 x `window`.
    pub conn_window: u64,
    /// Upper bound for path MTU discovery (UDP payload, `max-mtu`), clamped to 1200..=6500 (see
    /// `config::MAX_MAX_MTU`). Default `config::DEFAULT_MAX_MTU` (discovery finds what the path
    /// carries below it).
    pub mtu_upper_bound: u16,
    /// UDP socket buffer size requested with SO_RCVBUF/SO_SNDBUF; 0 keeps the system's. Default 8 MiB.
    pub socket_buffer: usize,
    /// Where a received frame's payload starts, from its first bytes (frames are opaque here;
    /// the codec knows). A frame that spans several QUIC chunks is copied once anyway; it is
    /// copied so that this offset lands 4096-aligned, and the payload reaches an O_DIRECT disk
    /// without a second copy. Default [`crate::wire::payload_offset`].
    pub payload_offset: fn(&[u8]) -> usize,
}

impl Default for Tuning {
    fn default() -> Self {
        use crate::config as c;
        Tuning {
            keep_alive: c::DEFAULT_PING_INTERVAL,
            idle_timeout: c::DEFAULT_TIMEOUT,
            retry_min: Duration::from_millis(100),
            retry_max: c::DEFAULT_CONNECT_RETRY,
            data_streams: c::DEFAULT_DATA_STREAMS,
            stream_window: c::DEFAULT_WINDOW,
            conn_window: 2 * c::DEFAULT_WINDOW,
            mtu_upper_bound: crate::config::DEFAULT_MAX_MTU,
            socket_buffer: 8 << 20,
            payload_offset: crate::wire::payload_offset,
        }
    }
}

/// Everything one side of the link needs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub resource: String,
    pub local_name: String,
    pub local_addr: SocketAddr,
    pub identity: Identity,
    pub peer_name: String,
    pub peer_addr: SocketAddr,
    /// `sha256:<hex>` of the peer's DER certificate.
    pub peer_pin: String,
    /// Where `peer_pin` came from, for the refusal's text.
    pub peer_pin_source: super::PinSource,
    /// ALPN we offer and accept; [`ALPN`] except in tests of version mismatch.
    pub alpn: Vec<u8>,
    pub tuning: Tuning,
}

impl LinkConfig {
    /// Builds the link config of node `local` from a resource file: loads our key and cert, and
    /// takes the peer's pin from `pin` or, if absent, from its `cert` file.
    pub fn from_config(cfg: &Config, local: &str) -> Result<LinkConfig, NetError> {
        let me = cfg
            .node_named(local)
            .map_err(|e| NetError::Key(e.to_string()))?;
        let peer = cfg
            .peer_of(local)
            .map_err(|e| NetError::Key(e.to_string()))?;
        let identity = Identity::load(&me.cert, &me.key).map_err(|e| {
            NetError::Key(format!(
                "node.{n}.cert / node.{n}.key: {e}; create them with `twinblk keygen --name {n} \
                 --out DIR` on this node (then give the peer the .crt or its pin)",
                n = me.name
            ))
        })?;
        warn_if_readable(&me.key, &me.name);
        let peer_pin = match &peer.pin {
            Some(p) => p.clone(),
            None => super::keys::pin_of_cert_file(&peer.cert).map_err(|e| {
                NetError::Key(format!(
                    "node.{n}.cert (the peer's certificate): {e}; copy {n}'s .crt (written by \
                     `twinblk keygen --name {n}` on {n}) to {path}, or set node.{n}.pin to the \
                     pin keygen printed there",
                    n = peer.name,
                    path = peer.cert.display()
                ))
            })?,
        };
        let r = &cfg.resource;
        Ok(LinkConfig {
            resource: r.name.clone(),
            local_name: me.name.clone(),
            local_addr: me.address,
            identity,
            peer_name: peer.name.clone(),
            peer_addr: peer.address,
            peer_pin,
            peer_pin_source: match &peer.pin {
                Some(_) => super::PinSource::Pin,
                None => super::PinSource::Cert(peer.cert.clone()),
            },
            alpn: ALPN.to_vec(),
            tuning: Tuning {
                keep_alive: r.ping_interval,
                idle_timeout: r.timeout,
                retry_max: r.connect_retry,
                data_streams: r.data_streams,
                stream_window: r.window,
                conn_window: 2 * r.window,
                mtu_upper_bound: r.max_mtu,
                ..Tuning::default()
            },
        })
    }
}

/// A private key others can read is no longer private: say so (DRBD's tools and ssh do too).
fn warn_if_readable(key: &std::path::Path, node: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(key) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "node.{node}.key {} is readable by other users (mode {:o}): anyone who can read \
                 it can impersonate {node}; chmod 600 it",
                key.display(),
                m.permissions().mode() & 0o777
            );
        }
    }
}

/// Why a connection ended (or never started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Nothing heard from the peer for the idle timeout: dead peer or broken network.
    TimedOut,
    /// The peer closed the connection deliberately.
    PeerClosed { code: u64, reason: String },
    /// We closed it (`disconnect`, replacement, endpoint shutdown).
    LocallyClosed,
    /// The TLS handshake failed: a certificate that is not the pinned one, or an ALPN mismatch.
    /// The text says which side refused and, for a pin mismatch, which cert was seen.
    Tls(String),
    /// Another QUIC transport error.
    Transport(String),
    /// The peer's endpoint no longer knows this connection (it restarted).
    Reset,
    /// The setup exchange failed or the connection attempt timed out.
    Setup(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::TimedOut => f.write_str("timed out: nothing heard from the peer"),
            CloseReason::PeerClosed { code, reason } => {
                write!(f, "closed by the peer (code {code}): {reason}")
            }
            CloseReason::LocallyClosed => f.write_str("closed locally"),
            CloseReason::Tls(s) => write!(f, "TLS handshake refused: {s}"),
            CloseReason::Transport(s) => write!(f, "QUIC transport error: {s}"),
            CloseReason::Reset => f.write_str("reset by the peer (it restarted)"),
            CloseReason::Setup(s) => write!(f, "{s}"),
        }
    }
}

impl From<ConnectionError> for CloseReason {
    fn from(e: ConnectionError) -> Self {
        let is_crypto = |code: quinn::TransportErrorCode| {
            let c = u64::from(code);
            (0x100..0x200).contains(&c)
        };
        // TLS alert 120, no_application_protocol: the ALPN ids differ.
        let hint = |code: quinn::TransportErrorCode| {
            if u64::from(code) == 0x100 + 120 {
                " (ALPN mismatch: the nodes speak different twinblk protocol versions; upgrade one)"
            } else {
                ""
            }
        };
        match e {
            ConnectionError::TimedOut => CloseReason::TimedOut,
            ConnectionError::ApplicationClosed(a) => CloseReason::PeerClosed {
                code: a.error_code.into_inner(),
                reason: String::from_utf8_lossy(&a.reason).into_owned(),
            },
            ConnectionError::LocallyClosed => CloseReason::LocallyClosed,
            ConnectionError::Reset => CloseReason::Reset,
            ConnectionError::TransportError(t) if is_crypto(t.code) => CloseReason::Tls(format!(
                "we refused: {}{}",
                verifier_text(&t.reason),
                hint(t.code)
            )),
            // TLS alerts 42 bad_certificate and 46 certificate_unknown (what a failed pin
            // check sends): the peer's text names its pin of ours and the fix there.
            ConnectionError::ConnectionClosed(c)
                if [0x100 + 42, 0x100 + 46].contains(&u64::from(c.error_code)) =>
            {
                CloseReason::Tls(format!(
                    "the peer refused our certificate: {}",
                    verifier_text(&String::from_utf8_lossy(&c.reason))
                ))
            }
            ConnectionError::ConnectionClosed(c) if is_crypto(c.error_code) => {
                let why = verifier_text(&String::from_utf8_lossy(&c.reason));
                CloseReason::Tls(format!(
                    "the peer refused: {} {why}{}",
                    c.error_code,
                    hint(c.error_code)
                ))
            }
            other => CloseReason::Transport(other.to_string()),
        }
    }
}

/// rustls writes a certificate verifier's own error as `Other(OtherError(TEXT))` (the Debug
/// form of its `CertificateError::Other`), on our side and in the reason the peer receives:
/// keep TEXT (our verifier's readable [`super::PinMismatch`]), drop the Rust around it.
fn verifier_text(reason: &str) -> String {
    const OPEN: &str = "Other(OtherError(";
    match reason.find(OPEN) {
        Some(i) if reason.ends_with("))") && i + OPEN.len() <= reason.len() - 2 => {
            format!(
                "{}{}",
                &reason[..i],
                &reason[i + OPEN.len()..reason.len() - 2]
            )
        }
        _ => reason.to_owned(),
    }
}

/// Which stream a frame arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Control,
    Data(u8),
}

/// One complete received frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub stream: StreamKind,
    pub bytes: Bytes,
    /// When the frame was complete on its stream (unless the latency breakdown is off,
    /// `crate::latency::enabled`): the start of the receiver's part of a write's time.
    pub at: Option<std::time::Instant>,
}

/// Received frames from all streams, read by whoever awaits [`FrameRx::recv`] (the node's
/// event loop) with no task in between: a reader task per stream cost a task wake and a channel
/// hop per message, on both nodes, on the path every sync write waits for (the extent at the
/// Secondary, its ack at the Primary). A peer that sends faster than the receiver reads waits in
/// QUIC flow control (the stream and connection windows), not in memory here.
///
/// Control frames come before data frames that are ready at the same time, so acks and state
/// changes are not stuck behind a backlog of extents; the data streams take turns.
pub struct FrameRx {
    control: StreamRead,
    /// Each data stream with its index (from its first frame).
    data: Vec<(u8, StreamRead)>,
    /// The data stream asked first next time.
    next_data: usize,
    /// Stamp frames with their arrival (the latency breakdown is on).
    timed: bool,
    /// The connection (closed on a broken stream), kept open while this lives.
    guard: Arc<CloseOnDrop>,
}

impl fmt::Debug for FrameRx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameRx")
            .field("data_streams", &self.data.len())
            .finish_non_exhaustive()
    }
}

type ReadFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (FrameReader, Result<Bytes, ReadEnd>)> + Send>,
>;

/// One stream's reading as [`FrameRx`] polls it. A read in progress owns its reader inside the
/// boxed future (a frame may span chunks, and `FrameReader::next` is not cancel-safe), so a
/// `recv` dropped by a `select!` loses no bytes: the read goes on at the next `recv`.
enum StreamRead {
    Idle(FrameReader),
    Reading(ReadFuture),
    Ended,
}

impl StreamRead {
    /// The stream's next frame, or why it ended; `None` once it has ended.
    fn poll_frame(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Bytes, ReadEnd>>> {
        use std::task::Poll;
        loop {
            match std::mem::replace(self, StreamRead::Ended) {
                StreamRead::Idle(mut r) => {
                    *self = StreamRead::Reading(Box::pin(async move {
                        let got = r.next().await;
                        (r, got)
                    }));
                }
                StreamRead::Reading(mut read) => {
                    return match read.as_mut().poll(cx) {
                        Poll::Pending => {
                            *self = StreamRead::Reading(read);
                            Poll::Pending
                        }
                        Poll::Ready((r, Ok(bytes))) => {
                            *self = StreamRead::Idle(r);
                            Poll::Ready(Some(Ok(bytes)))
                        }
                        // Stays `Ended`.
                        Poll::Ready((_, Err(end))) => Poll::Ready(Some(Err(end))),
                    };
                }
                StreamRead::Ended => return Poll::Ready(None),
            }
        }
    }
}

/// Closes the connection when the last of `PeerConn`, its senders and its `FrameRx` is dropped,
/// so a connection nobody uses cannot linger (kept alive by keep-alives) and block reconnects.
#[derive(Debug)]
struct CloseOnDrop(quinn::Connection);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(
            VarInt::from_u32(close_code::DISCONNECT),
            b"connection dropped by its owner",
        );
    }
}

impl FrameRx {
    /// The next frame, control first; `None` once the connection is gone and all frames are read.
    /// Cancel-safe (usable in `select!`).
    pub async fn recv(&mut self) -> Option<Frame> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Frame>> {
        use std::task::Poll;
        let mut open = false;
        match self.control.poll_frame(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                return Poll::Ready(Some(self.frame(StreamKind::Control, bytes)))
            }
            Poll::Ready(Some(Err(end))) => self.stream_ended(&end),
            Poll::Ready(None) => {}
            Poll::Pending => open = true,
        }
        let n = self.data.len();
        for k in 0..n {
            let i = (self.next_data + k) % n;
            let Some((idx, stream)) = self.data.get_mut(i) else {
                continue;
            };
            let idx = *idx;
            match stream.poll_frame(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    self.next_data = (i + 1) % n;
                    return Poll::Ready(Some(self.frame(StreamKind::Data(idx), bytes)));
                }
                Poll::Ready(Some(Err(end))) => self.stream_ended(&end),
                Poll::Ready(None) => {}
                Poll::Pending => open = true,
            }
        }
        if open {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    fn frame(&self, stream: StreamKind, bytes: Bytes) -> Frame {
        Frame {
            stream,
            bytes,
            at: self.timed.then(std::time::Instant::now),
        }
    }

    /// A stream stopped yielding frames. A broken one means lost frames: the connection ends
    /// rather than going on without them.
    fn stream_ended(&self, end: &ReadEnd) {
        match end {
            ReadEnd::Finished => {}
            ReadEnd::Failed(e) => tracing::debug!("stream ended: {e}"),
            ReadEnd::Protocol(e) => {
                tracing::warn!("closing the connection: {e}");
                self.guard.0.close(
                    VarInt::from_u32(close_code::PROTOCOL),
                    e.to_string().as_bytes(),
                );
            }
        }
    }
}

/// Sends frames on one stream. Frames on one sender arrive in order; there is no order between
/// senders. Cloneable; the stream is finished when the last clone is dropped.
///
/// Sending never waits, so the caller (the node's event loop) never blocks on QUIC flow
/// control; the amount in flight is bounded above, by the core (client queue depth, the async
/// send buffer, the resync window). A frame goes into quinn from the caller when nothing waits
/// before it, and otherwise queues for the stream's writer task ([`Outbox`]). Every frame used
/// to go through the writer task: a task wake per message, on both nodes, on the path every
/// sync write waits for (the extent, then its ack).
#[derive(Debug, Clone)]
pub struct FrameSender {
    out: Arc<SenderHold>,
    conn: quinn::Connection,
    peer: Arc<str>,
    _guard: Arc<CloseOnDrop>,
}

/// The senders' share of a stream's [`Outbox`]: when the last sender drops it, the stream is
/// finished once what is queued is out.
struct SenderHold(Arc<Outbox>);

impl fmt::Debug for SenderHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SenderHold")
    }
}

impl Drop for SenderHold {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl FrameSender {
    /// Queues a frame. The payload is not copied if it is larger than 1 KiB.
    pub fn send(&self, frame: Bytes) -> Result<(), NetError> {
        self.send_parts(frame, Bytes::new())
    }

    /// Queues one frame made of `head` followed by `payload`, without joining them: a large
    /// payload goes to QUIC as it is (no copy at all).
    pub fn send_parts(&self, head: Bytes, payload: Bytes) -> Result<(), NetError> {
        let frame = OutFrame { head, payload };
        check_len(frame.len())?;
        if self.conn.close_reason().is_some() {
            return Err(self.closed_err());
        }
        self.out.0.send(frame).map_err(|_| self.closed_err())
    }

    fn closed_err(&self) -> NetError {
        NetError::Closed {
            peer: self.peer.to_string(),
            reason: self
                .conn
                .close_reason()
                .map(CloseReason::from)
                .unwrap_or(CloseReason::Setup("the stream's writer stopped".into())),
        }
    }
}

fn check_len(len: usize) -> Result<(), NetError> {
    if len > MAX_FRAME {
        return Err(NetError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(())
}

/// A cheap handle to watch or close a connection from elsewhere. It does not keep the
/// connection open: that ends when `PeerConn`, its senders and its receiver are all dropped.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    conn: quinn::Connection,
}

impl ConnHandle {
    /// Closes the connection at once (queued, unsent frames are dropped) and tells the peer why.
    pub fn disconnect(&self, code: u32, reason: &str) {
        self.conn.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Resolves when the connection has ended, with the reason.
    pub async fn closed(&self) -> CloseReason {
        self.conn.closed().await.into()
    }

    /// The reason, if the connection has ended.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.conn.close_reason().map(Into::into)
    }

    /// Smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// quinn's counters (bytes, packets, lost packets, congestion window...).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }
}

/// An established, authenticated connection to the peer. Dropping it together with its senders
/// and receiver closes the connection (code 0); [`PeerConn::disconnect`] closes it at once.
///
/// Frames from every stream arrive on `rx`; it yields `None` once the connection is gone (then
/// [`PeerConn::close_reason`] says why). Fields are public so the driver can move the senders
/// into separate tasks.
#[derive(Debug)]
pub struct PeerConn {
    /// The control stream: handshake, acks, role changes. Sent at higher priority than data.
    pub control: FrameSender,
    /// The data streams for write extents; pick one per extent (e.g. by seq).
    pub data: Vec<FrameSender>,
    /// Every received frame, from all streams, tagged with its stream.
    pub rx: FrameRx,
    pub handle: ConnHandle,
    pub peer: String,
    pub remote_addr: SocketAddr,
    /// This node's `timeout` when the connection was set up: what its QUIC handshake offered
    /// (the smaller of both nodes' values applies). `adjust` does not change it.
    pub idle_timeout: Duration,
    _guard: Arc<CloseOnDrop>,
}

impl PeerConn {
    pub fn disconnect(&self, code: u32, reason: &str) {
        self.handle.disconnect(code, reason)
    }

    pub async fn closed(&self) -> CloseReason {
        self.handle.closed().await
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.handle.close_reason()
    }
}

/// The setup exchange on the control stream, sent by both sides as the first frame: it makes
/// sure both sides agree on resource, names and stream count, and (for the dialer) proves that
/// the acceptor accepted our certificate before we report the link as up.
struct Hello {
    streams: u8,
    resource: String,
    from: String,
    to: String,
}

const HELLO_MAGIC: &[u8; 8] = b"TBHELLO1";

impl Hello {
    fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_slice(HELLO_MAGIC);
        b.put_u8(self.streams);
        for s in [&self.resource, &self.from, &self.to] {
            // Names are validated as at most 63 ASCII bytes by the config.
            let s = &s.as_bytes()[..s.len().min(255)];
            b.put_u8(s.len() as u8);
            b.put_slice(s);
        }
        b.freeze()
    }

    fn decode(b: &[u8]) -> Option<Hello> {
        let rest = b.strip_prefix(HELLO_MAGIC.as_slice())?;
        let (&streams, mut rest) = rest.split_first()?;
        let mut take = || -> Option<String> {
            let (&n, r) = rest.split_first()?;
            let (s, r) = r.split_at_checked(n as usize)?;
            rest = r;
            String::from_utf8(s.to_vec()).ok()
        };
        let resource = take()?;
        let from = take()?;
        let to = take()?;
        Some(Hello {
            streams,
            resource,
            from,
            to,
        })
    }
}

struct LinkInner {
    cfg: LinkConfig,
    endpoint: Endpoint,
    /// What `retune` changes, swapped together.
    tuned: Mutex<Tuned>,
    auth_log: AuthLog,
}

/// The QUIC configs of the next connection (the dialer's, and the acceptor's, which the
/// endpoint also holds) and the [`Live`] settings they were built from.
struct Tuned {
    client: quinn::ClientConfig,
    server: quinn::ServerConfig,
    live: Live,
}

/// The settings `twinblk adjust` changes under a running link ([`PeerLink::retune`]). QUIC
/// settles the idle timeout (the smaller of both sides') and the windows in each connection's
/// handshake, and quinn offers no way to change them or the keep-alive on an open connection:
/// they apply from the next connection on. The reconnect backoff applies at its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    /// `ping-interval`.
    pub keep_alive: Duration,
    /// `timeout`; also bounds a connection attempt and its setup exchange.
    pub idle_timeout: Duration,
    /// `connect-retry`.
    pub retry_max: Duration,
    /// `window` (the connection windows are twice it).
    pub window: u64,
}

/// A [`Live`] checked and turned into QUIC configs by [`PeerLink::prepare_retune`], applied by
/// [`PeerLink::retune`] (which cannot fail: `adjust` checks everything before applying).
pub struct Retune {
    live: Live,
    transport: Arc<TransportConfig>,
}

/// One node's QUIC endpoint for one resource, bound to its address.
#[derive(Clone)]
pub struct PeerLink {
    inner: Arc<LinkInner>,
}

impl fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerLink")
            .field("local", &self.inner.cfg.local_name)
            .field("peer", &self.inner.cfg.peer_name)
            .finish()
    }
}

impl PeerLink {
    /// Binds the UDP socket at `cfg.local_addr`. Needs a tokio runtime.
    pub fn bind(cfg: LinkConfig) -> Result<PeerLink, NetError> {
        let sock = UdpSocket::bind(cfg.local_addr).map_err(|e| NetError::Bind {
            addr: cfg.local_addr,
            detail: e.to_string(),
        })?;
        Self::from_socket(cfg, sock)
    }

    /// Uses an already bound socket (tests bind port 0 first to learn the addresses).
    pub fn from_socket(cfg: LinkConfig, sock: UdpSocket) -> Result<PeerLink, NetError> {
        let addr = sock.local_addr().unwrap_or(cfg.local_addr);
        set_socket_buffers(&sock, cfg.tuning.socket_buffer);
        let transport = Arc::new(transport_config(&cfg.tuning)?);
        let live = Live {
            keep_alive: cfg.tuning.keep_alive,
            idle_timeout: cfg.tuning.idle_timeout,
            retry_max: cfg.tuning.retry_max,
            window: cfg.tuning.stream_window,
        };
        let auth_log: AuthLog = Arc::new(Mutex::new(None));
        let id = &cfg.identity;
        let server_tls = tls::server_config(
            id,
            &cfg.local_name,
            &cfg.peer_name,
            &cfg.peer_pin,
            &cfg.peer_pin_source,
            &cfg.alpn,
            &auth_log,
        )?;
        let client_tls = tls::client_config(
            id,
            &cfg.local_name,
            &cfg.peer_name,
            &cfg.peer_pin,
            &cfg.peer_pin_source,
            &cfg.alpn,
            &auth_log,
        )?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls)
                .map_err(|e| NetError::TlsSetup(format!("QUIC server: {e}")))?,
        ));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls)
                .map_err(|e| NetError::TlsSetup(format!("QUIC client: {e}")))?,
        ));
        client.transport_config(transport);
        let runtime = quinn::default_runtime().ok_or_else(|| NetError::Bind {
            addr,
            detail: "no tokio runtime is running".into(),
        })?;
        let mut ec = EndpointConfig::default();
        // Datagrams up to the MTU discovery bound must be receivable, or discovery stops at 1472.
        ec.max_udp_payload_size(mtu_bound(&cfg.tuning).max(1472))
            .map_err(|e| NetError::TlsSetup(format!("max UDP payload: {e}")))?;
        let endpoint =
            Endpoint::new(ec, Some(server.clone()), sock, runtime).map_err(|e| NetError::Bind {
                addr,
                detail: e.to_string(),
            })?;
        Ok(PeerLink {
            inner: Arc::new(LinkInner {
                cfg,
                endpoint,
                tuned: Mutex::new(Tuned {
                    client,
                    server,
                    live,
                }),
                auth_log,
            }),
        })
    }

    /// The settings in effect for the next connection (see [`Live`]).
    pub fn live(&self) -> Live {
        self.tuned().live
    }

    fn tuned(&self) -> std::sync::MutexGuard<'_, Tuned> {
        // Every update is a plain assignment: a poisoned lock still holds a whole config.
        self.inner.tuned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `live` and builds its QUIC transport config; nothing changes yet.
    pub fn prepare_retune(&self, live: Live) -> Result<Retune, NetError> {
        let t = Tuning {
            keep_alive: live.keep_alive,
            idle_timeout: live.idle_timeout,
            retry_max: live.retry_max,
            stream_window: live.window,
            conn_window: live.window.saturating_mul(2),
            ..self.inner.cfg.tuning.clone()
        };
        Ok(Retune {
            live,
            transport: Arc::new(transport_config(&t)?),
        })
    }

    /// Applies a prepared retune: connections set up from now on (dialed or accepted) use it;
    /// the open one keeps what its handshake settled (see [`Live`]).
    pub fn retune(&self, r: Retune) {
        let mut t = self.tuned();
        t.client.transport_config(r.transport.clone());
        t.server.transport_config(r.transport);
        self.inner
            .endpoint
            .set_server_config(Some(t.server.clone()));
        t.live = r.live;
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.endpoint.local_addr().ok()
    }

    pub fn config(&self) -> &LinkConfig {
        &self.inner.cfg
    }

    /// True if this node dials (its name sorts before the peer's); the peer accepts.
    pub fn dials(&self) -> bool {
        self.inner.cfg.local_name < self.inner.cfg.peer_name
    }

    /// The last certificate refusal (seen vs expected pin), for `status`.
    pub fn last_auth_error(&self) -> Option<String> {
        self.inner.auth_log.lock().ok().and_then(|s| s.clone())
    }

    /// Closes every connection and the endpoint; the UDP port is released once quinn's tasks end.
    pub fn close(&self, reason: &str) {
        self.inner
            .endpoint
            .close(VarInt::from_u32(close_code::DISCONNECT), reason.as_bytes());
    }

    /// Dials the peer once: QUIC + TLS handshake, then the setup exchange and stream opening.
    pub async fn connect(&self) -> Result<PeerConn, NetError> {
        let c = &self.inner.cfg;
        let err = |reason: CloseReason| NetError::Connect {
            peer: c.peer_name.clone(),
            addr: c.peer_addr,
            reason,
        };
        let (client, live) = {
            let t = self.tuned();
            (t.client.clone(), t.live)
        };
        let connecting = self
            .inner
            .endpoint
            .connect_with(client, c.peer_addr, &c.peer_name)
            .map_err(|e| err(CloseReason::Setup(e.to_string())))?;
        let limit = live.idle_timeout;
        let conn = match tokio::time::timeout(limit, connecting).await {
            Err(_) => {
                return Err(err(CloseReason::Setup(format!(
                    "no answer within {limit:?}; is twinblk up on {}?",
                    c.peer_name
                ))))
            }
            Ok(Err(e)) => {
                let e = err(e.into());
                tracing::warn!("{e}");
                return Err(e);
            }
            Ok(Ok(conn)) => conn,
        };
        match tokio::time::timeout(limit, self.setup(conn.clone(), true, limit)).await {
            Ok(Ok(pc)) => Ok(pc),
            Ok(Err(e)) => Err(self.setup_failed(&conn, e)),
            Err(_) => Err(self.setup_failed(
                &conn,
                format!("setup exchange did not finish within {limit:?}"),
            )),
        }
    }

    /// Accepts the next connection from the peer. Refused handshakes come back as errors (and
    /// are logged); call again to keep accepting.
    pub async fn accept(&self) -> Result<PeerConn, NetError> {
        let incoming = self
            .inner
            .endpoint
            .accept()
            .await
            .ok_or(NetError::EndpointClosed)?;
        let remote = incoming.remote_address();
        let live = self.live();
        let limit = live.idle_timeout;
        let conn = match tokio::time::timeout(limit, incoming).await {
            Err(_) => {
                return Err(NetError::Accept(CloseReason::Setup(format!(
                    "handshake from {remote} did not finish within {limit:?}"
                ))))
            }
            Ok(Err(e)) => {
                let e = NetError::Accept(e.into());
                tracing::warn!(%remote, "{e}");
                return Err(e);
            }
            Ok(Ok(conn)) => conn,
        };
        match tokio::time::timeout(limit, self.setup(conn.clone(), false, limit)).await {
            Ok(Ok(pc)) => Ok(pc),
            Ok(Err(e)) => Err(self.setup_failed(&conn, e)),
            Err(_) => Err(self.setup_failed(
                &conn,
                format!("setup exchange did not finish within {limit:?}"),
            )),
        }
    }

    fn setup_failed(&self, conn: &quinn::Connection, detail: String) -> NetError {
        // A close the peer sent explains more than our failed read does.
        let (detail, reason) = match conn.close_reason() {
            Some(quinn::ConnectionError::LocallyClosed) => (detail, None),
            Some(r) => {
                let r = CloseReason::from(r);
                (format!("{r}; while {detail}"), Some(r))
            }
            // A mismatch closed the connection itself (with `close_code::MISMATCH`).
            None => {
                conn.close(VarInt::from_u32(close_code::PROTOCOL), detail.as_bytes());
                (detail, None)
            }
        };
        let e = NetError::Setup {
            peer: self.inner.cfg.peer_name.clone(),
            detail,
            reason,
        };
        tracing::warn!("{e}");
        e
    }

    async fn setup(
        &self,
        conn: quinn::Connection,
        dialer: bool,
        idle_timeout: Duration,
    ) -> Result<PeerConn, String> {
        let c = &self.inner.cfg;
        let alpn = conn
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol);
        if alpn.as_deref() != Some(c.alpn.as_slice()) {
            let e = format!(
                "ALPN mismatch: peer negotiated {:?}, we speak {:?}",
                alpn.map(|a| String::from_utf8_lossy(&a).into_owned()),
                String::from_utf8_lossy(&c.alpn)
            );
            // Closed here with its own code (as a resource mismatch below), so
            // `setup_failed` never tells the two kinds apart by their text.
            conn.close(VarInt::from_u32(close_code::MISMATCH), e.as_bytes());
            return Err(e);
        }
        let n = c.tuning.data_streams;
        let ours = Hello {
            streams: n,
            resource: c.resource.clone(),
            from: c.local_name.clone(),
            to: c.peer_name.clone(),
        }
        .encode();
        let fail = |what: &str, e: &dyn fmt::Display| format!("{what}: {e}");

        let (mut ctl_send, ctl_recv) = if dialer {
            conn.open_bi().await
        } else {
            conn.accept_bi().await
        }
        .map_err(|e| fail("control stream", &e))?;
        let mut ctl_reader = FrameReader::new(ctl_recv, c.tuning.payload_offset);
        let _ = ctl_send.set_priority(1);

        if dialer {
            write_frame(&mut ctl_send, &ours)
                .await
                .map_err(|e| fail("sending hello", &e))?;
        }
        let theirs = ctl_reader
            .next()
            .await
            .map_err(|e| fail("reading the peer's hello", &e))?;
        let theirs = Hello::decode(&theirs).ok_or("the peer's hello is malformed")?;
        if theirs.resource != c.resource
            || theirs.from != c.peer_name
            || theirs.to != c.local_name
            || theirs.streams != n
        {
            let e = format!(
                "resource mismatch: the peer says resource {:?}, from {:?} to {:?}, {} data streams; we expect resource {:?}, from {:?} to {:?}, {n} data streams; both nodes must use the same resource file",
                theirs.resource, theirs.from, theirs.to, theirs.streams, c.resource, c.peer_name, c.local_name
            );
            // Close while the control stream is still ours: dropping it first finishes it, and
            // the peer could read that end before the close that carries the reason.
            conn.close(VarInt::from_u32(close_code::MISMATCH), e.as_bytes());
            return Err(e);
        }
        if !dialer {
            write_frame(&mut ctl_send, &ours)
                .await
                .map_err(|e| fail("sending hello", &e))?;
        }

        // Our data streams; the first frame on each names its index.
        let mut data_send = Vec::with_capacity(n as usize);
        for i in 0..n {
            let mut s = conn
                .open_uni()
                .await
                .map_err(|e| fail("opening a data stream", &e))?;
            write_frame(&mut s, &[i])
                .await
                .map_err(|e| fail("data stream", &e))?;
            data_send.push(s);
        }
        let mut data_recv = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let s = conn
                .accept_uni()
                .await
                .map_err(|e| fail("accepting a data stream", &e))?;
            let mut r = FrameReader::new(s, c.tuning.payload_offset);
            let idx = r.next().await.map_err(|e| fail("data stream header", &e))?;
            match idx.as_ref() {
                [i] if *i < n && !data_recv.iter().any(|(j, _)| j == i) => data_recv.push((*i, r)),
                _ => return Err(format!("bad data stream header {idx:?}")),
            }
        }

        // From here on, the senders' writer tasks own the send streams, and whoever awaits
        // `FrameRx::recv` reads the receive streams.
        let peer: Arc<str> = Arc::from(c.peer_name.as_str());
        let guard = Arc::new(CloseOnDrop(conn.clone()));
        let sender = |stream: quinn::SendStream| {
            let out = Outbox::new(stream);
            tokio::spawn(writer_task(out.clone()));
            FrameSender {
                out: Arc::new(SenderHold(out)),
                conn: conn.clone(),
                peer: peer.clone(),
                _guard: guard.clone(),
            }
        };
        let control = sender(ctl_send);
        let data = data_send.into_iter().map(sender).collect();
        let rx = FrameRx {
            control: StreamRead::Idle(ctl_reader),
            data: data_recv
                .into_iter()
                .map(|(i, r)| (i, StreamRead::Idle(r)))
                .collect(),
            next_data: 0,
            timed: crate::latency::enabled(),
            guard: guard.clone(),
        };
        tracing::info!(peer = %c.peer_name, remote = %conn.remote_address(), dialer, "connected");
        Ok(PeerConn {
            control,
            data,
            rx,
            handle: ConnHandle { conn: conn.clone() },
            peer: c.peer_name.clone(),
            remote_addr: conn.remote_address(),
            idle_timeout,
            _guard: guard,
        })
    }

    /// Starts the reconnect loop for this node's role: dial with backoff, or accept.
    pub fn connector(&self) -> Connector {
        let (tx, rx) = mpsc::channel(1);
        let status = Arc::new(Mutex::new(ConnectorStatus::default()));
        let link = self.clone();
        let st = status.clone();
        let task = if self.dials() {
            tokio::spawn(async move { link.dial_loop(tx, st).await })
        } else {
            tokio::spawn(async move { link.accept_loop(tx, st).await })
        };
        Connector { rx, status, task }
    }

    async fn dial_loop(self, tx: mpsc::Sender<PeerConn>, status: Arc<Mutex<ConnectorStatus>>) {
        let t = self.inner.cfg.tuning.clone();
        // Nobody should dial us; refuse so a misconfigured peer learns it quickly.
        let _refuser = {
            let ep = self.inner.endpoint.clone();
            AbortOnDrop(tokio::spawn(async move {
                while let Some(inc) = ep.accept().await {
                    tracing::warn!(remote = %inc.remote_address(), "refusing an incoming connection: the node whose name sorts first dials, and that is us");
                    inc.refuse();
                }
            }))
        };
        let mut delay = t.retry_min;
        loop {
            set_status(&status, |s| s.attempts += 1);
            match self.connect().await {
                Ok(conn) => {
                    delay = t.retry_min;
                    let handle = conn.handle.clone();
                    set_status(&status, |s| {
                        s.connected = true;
                        s.connections += 1;
                        s.attempts = 0;
                    });
                    if tx.send(conn).await.is_err() {
                        break;
                    }
                    let why = handle.closed().await;
                    tracing::info!(peer = %self.inner.cfg.peer_name, "connection ended: {why}");
                    set_status(&status, |s| {
                        s.connected = false;
                        s.last_error = Some(why.to_string());
                    });
                }
                Err(e) => {
                    set_status(&status, |s| s.last_error = Some(e.to_string()));
                    if matches!(e, NetError::EndpointClosed) {
                        break;
                    }
                    // `connect-retry` as `adjust` last set it.
                    delay = (delay * 2).min(self.live().retry_max);
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn accept_loop(self, tx: mpsc::Sender<PeerConn>, status: Arc<Mutex<ConnectorStatus>>) {
        let mut current: Option<ConnHandle> = None;
        loop {
            match self.accept().await {
                Ok(conn) => {
                    if let Some(old) = current.take() {
                        if old.close_reason().is_none() {
                            tracing::info!(peer = %conn.peer, "a new connection from the peer replaces the old one");
                            old.disconnect(close_code::REPLACED, "replaced by a newer connection");
                        }
                    }
                    current = Some(conn.handle.clone());
                    set_status(&status, |s| {
                        s.connected = true;
                        s.connections += 1;
                    });
                    let handle = conn.handle.clone();
                    let st = status.clone();
                    tokio::spawn(async move {
                        let why = handle.closed().await;
                        set_status(&st, |s| {
                            s.connected = false;
                            s.last_error = Some(why.to_string());
                        });
                    });
                    if tx.send(conn).await.is_err() {
                        break;
                    }
                }
                Err(NetError::EndpointClosed) => break,
                Err(e) => set_status(&status, |s| {
                    s.attempts += 1;
                    s.last_error = Some(e.to_string());
                }),
            }
        }
    }
}

/// Stops a helper task when its owner stops (the connector task is aborted, not ended).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn set_status(st: &Mutex<ConnectorStatus>, f: impl FnOnce(&mut ConnectorStatus)) {
    if let Ok(mut s) = st.lock() {
        f(&mut s);
    }
}

/// What the connector is doing, for `status`.
#[derive(Debug, Clone, Default)]
pub struct ConnectorStatus {
    /// A connection is up (it may have just died unnoticed: see the idle timeout).
    pub connected: bool,
    /// Failed attempts since the last connection.
    pub attempts: u32,
    /// Connections established so far.
    pub connections: u64,
    /// Why the last attempt failed or the last connection ended.
    pub last_error: Option<String>,
}

/// The reconnect loop. Yields each new connection; dropping it stops the loop (and leaves any
/// delivered connection alone).
#[derive(Debug)]
pub struct Connector {
    rx: mpsc::Receiver<PeerConn>,
    status: Arc<Mutex<ConnectorStatus>>,
    task: JoinHandle<()>,
}

impl Connector {
    /// The next established connection; `None` once the endpoint is closed.
    pub async fn next(&mut self) -> Option<PeerConn> {
        self.rx.recv().await
    }

    pub fn status(&self) -> ConnectorStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mtu_bound(t: &Tuning) -> u16 {
    t.mtu_upper_bound.clamp(1200, crate::config::MAX_MAX_MTU)
}

fn transport_config(t: &Tuning) -> Result<TransportConfig, NetError> {
    let bad = |what: &str| NetError::TlsSetup(format!("transport setting {what} is out of range"));
    let mut tc = TransportConfig::default();
    tc.keep_alive_interval(Some(t.keep_alive));
    tc.max_idle_timeout(Some(
        IdleTimeout::try_from(t.idle_timeout).map_err(|_| bad("timeout"))?,
    ));
    tc.stream_receive_window(VarInt::from_u64(t.stream_window).map_err(|_| bad("window"))?);
    tc.receive_window(VarInt::from_u64(t.conn_window).map_err(|_| bad("window"))?);
    tc.send_window(t.conn_window);
    tc.max_concurrent_uni_streams(VarInt::from_u32(u32::from(t.data_streams)));
    tc.max_concurrent_bidi_streams(VarInt::from_u32(1));
    tc.datagram_receive_buffer_size(None);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(mtu_bound(t));
    tc.mtu_discovery_config(Some(mtu));
    Ok(tc)
}

/// Larger UDP buffers absorb bursts at high rates; the kernel caps them at net.core.[rw]mem_max
/// unless we are allowed to force them. Best effort: failure only costs throughput.
fn set_socket_buffers(sock: &UdpSocket, size: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    if size == 0 {
        return;
    }
    if setsockopt(sock, sockopt::RcvBufForce, &size).is_err() {
        let _ = setsockopt(sock, sockopt::RcvBuf, &size);
    }
    if setsockopt(sock, sockopt::SndBufForce, &size).is_err() {
        let _ = setsockopt(sock, sockopt::SndBuf, &size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::Framing;
    use crate::net::keys::keygen;

    /// Two endpoints with a raw, authenticated QUIC connection (no setup exchange), so a test can
    /// write bytes the `FrameSender` would never produce.
    async fn raw_pair() -> (quinn::Connection, quinn::Connection, PeerLink, PeerLink) {
        let dir = tempfile::tempdir().unwrap();
        let (ka, ca, pa) = keygen("alpha", dir.path(), false).unwrap();
        let (kb, cb, pb) = keygen("beta", dir.path(), false).unwrap();
        let (sa, sb) = (
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
        let cfg = |me: &str, ma, id, peer: &str, paddr, pin: String| LinkConfig {
            resource: "r0".into(),
            local_name: me.into(),
            local_addr: ma,
            identity: id,
            peer_name: peer.into(),
            peer_addr: paddr,
            peer_pin: pin,
            peer_pin_source: crate::net::PinSource::Pin,
            alpn: ALPN.to_vec(),
            tuning: Tuning::default(),
        };
        let ia = Identity::load(&ca, &ka).unwrap();
        let ib = Identity::load(&cb, &kb).unwrap();
        let a = PeerLink::from_socket(cfg("alpha", aa, ia, "beta", ab, pb), sa).unwrap();
        let b = PeerLink::from_socket(cfg("beta", ab, ib, "alpha", aa, pa), sb).unwrap();
        let connecting = a
            .inner
            .endpoint
            .connect_with(a.tuned().client.clone(), ab, "beta")
            .unwrap();
        let (ca, cb) = tokio::join!(connecting, async {
            b.inner.endpoint.accept().await.unwrap().await
        });
        (ca.unwrap(), cb.unwrap(), a, b)
    }

    async fn read_after(
        bytes: &[u8],
        payload_offset: fn(&[u8]) -> usize,
    ) -> Vec<Result<Bytes, ReadEnd>> {
        let (ca, cb, _a, _b) = raw_pair().await;
        let mut s = ca.open_uni().await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.finish().unwrap();
        let mut r = FrameReader::new(cb.accept_uni().await.unwrap(), payload_offset);
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(b) => out.push(Ok(b)),
                Err(ReadEnd::Finished) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn frames_are_reassembled_across_chunks_and_split_when_coalesced() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        for f in [&b"ab"[..], &b""[..], &big[..], &b"z"[..]] {
            wire.extend_from_slice(&(f.len() as u32).to_le_bytes());
            wire.extend_from_slice(f);
        }
        // The big frame spans many chunks: its "payload", from byte 40 on, lands 4096-aligned.
        let got = read_after(&wire, |_| 40).await;
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].as_deref().unwrap(), b"ab");
        assert_eq!(got[1].as_deref().unwrap(), b"");
        let b = got[2].as_deref().unwrap();
        assert_eq!(b, &big[..]);
        assert_eq!((b.as_ptr() as usize + 40) % crate::disk::BUF_ALIGN, 0);
        assert_eq!(got[3].as_deref().unwrap(), b"z");
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_protocol_errors() {
        let too_big = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let got = read_after(&too_big, |_| 0).await;
        let e = got[0].as_ref().unwrap_err();
        assert_eq!(
            e,
            &ReadEnd::Protocol(Framing::TooLarge { len: MAX_FRAME + 1 })
        );
        // The text names the size and the limit (it is the connection's close reason).
        let text = e.to_string();
        assert!(
            text.contains("over the") && text.contains("limit"),
            "{text}"
        );

        let mut cut = 10u32.to_le_bytes().to_vec();
        cut.extend_from_slice(b"12345");
        let got = read_after(&cut, |_| 0).await;
        let e = got[0].as_ref().unwrap_err();
        assert!(
            matches!(
                e,
                ReadEnd::Protocol(Framing::FinishedInside { len: 10, .. })
            ),
            "{e:?}"
        );

        // Cut inside a frame big enough to be assembled in aligned memory.
        let mut cut = 100_000u32.to_le_bytes().to_vec();
        cut.extend_from_slice(&[7; 50_000]);
        let got = read_after(&cut, |_| 0).await;
        let e = got[0].as_ref().unwrap_err();
        assert!(
            matches!(
                e,
                ReadEnd::Protocol(Framing::FinishedInside { len: 100_000, .. })
            ),
            "{e:?}"
        );

        // Inside the header.
        let got = read_after(&[1, 0], |_| 0).await;
        let e = got[0].as_ref().unwrap_err();
        assert_eq!(
            e,
            &ReadEnd::Protocol(Framing::FinishedInside { have: 2, len: 4 })
        );
    }

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = Hello {
            streams: 4,
            resource: "r0".into(),
            from: "alpha".into(),
            to: "beta".into(),
        };
        let d = Hello::decode(&h.encode()).unwrap();
        assert_eq!(
            (
                d.streams,
                d.resource.as_str(),
                d.from.as_str(),
                d.to.as_str()
            ),
            (4, "r0", "alpha", "beta")
        );
        let enc = h.encode();
        for cut in 0..enc.len() {
            assert!(
                Hello::decode(&enc[..cut]).is_none(),
                "prefix of {cut} bytes accepted"
            );
        }
        assert!(Hello::decode(b"XXHELLO1\x04\x02r0").is_none());
    }
}
