//! Transport to the peer node: one QUIC connection per peer pair, mutual TLS 1.3 with pinned
//! certificates, length-prefixed byte frames on one control stream and a few data streams.
//!
//! The driver's view:
//!
//! ```text
//! let link = PeerLink::bind(LinkConfig::from_config(&cfg, "alpha")?)?;
//! let mut connector = link.connector();          // dials or accepts, reconnects with backoff
//! while let Some(mut conn) = connector.next().await {
//!     conn.control.send(hello_bytes)?;           // FrameSender: Bytes in, no copy of big frames
//!     conn.data[seq % conn.data.len()].send(extent_bytes)?;
//!     while let Some(Frame { stream, bytes, .. }) = conn.rx.recv().await { ... }
//!     let why = conn.closed().await;              // CloseReason: timeout, peer closed, TLS...
//! }
//! ```
//!
//! Who dials: the node whose name sorts first dials, the other accepts, so two nodes never race
//! to open two connections. An accepted connection replaces any older one from the same peer
//! (the peer restarted before our idle timer noticed). Frame contents are opaque here: the wire
//! codec owns them.

mod frame;
pub mod keys;
mod link;
mod tls;

pub use frame::{ChunkSource, Chunks, FrameReader, Framing, ReadEnd};
pub use keys::{keygen, load_cert, load_key, pin_of_cert_file, pin_of_der, Identity, KeyError};
pub use link::{
    close_code, CloseReason, ConnHandle, Connector, ConnectorStatus, Frame, FrameRx, FrameSender,
    LinkConfig, Live, PeerConn, PeerLink, Retune, StreamKind, Tuning,
};
pub use tls::{PinMismatch, PinSource};

/// ALPN protocol id; names the wire protocol version. A peer speaking another version is refused
/// during the TLS handshake.
pub const ALPN: &[u8] = b"twinblk/1";

/// Largest frame payload accepted or sent: a 32 MiB extent plus headroom for its header.
pub const MAX_FRAME: usize = 33 << 20;

/// Transport errors. `Display` texts name the peer and, where there is one, the fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    #[error("cannot bind UDP {addr}: {detail}; check that the address is local and no other process (another twinblk?) uses the port")]
    Bind {
        addr: std::net::SocketAddr,
        detail: String,
    },
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("identity: {0}")]
    Key(String),
    #[error("connecting to {peer} at {addr}: {reason}")]
    Connect {
        peer: String,
        addr: std::net::SocketAddr,
        reason: CloseReason,
    },
    #[error("accepting a connection: {0}")]
    Accept(CloseReason),
    /// `reason`: how the peer closed the connection, when it did (a refused certificate, a
    /// mismatch); `detail` says it too, with what this node was doing.
    #[error("connection setup with {peer} failed: {detail}")]
    Setup {
        peer: String,
        detail: String,
        reason: Option<CloseReason>,
    },
    #[error("connection to {peer} is closed: {reason}")]
    Closed { peer: String, reason: CloseReason },
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("the endpoint is closed")]
    EndpointClosed,
}

impl From<KeyError> for NetError {
    fn from(e: KeyError) -> Self {
        NetError::Key(e.to_string())
    }
}
