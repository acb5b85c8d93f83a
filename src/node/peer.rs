//! The current peer connection as the event loop drives it: outgoing messages are queued
//! straight to each stream's writer (sending never waits, so the event loop never waits for QUIC
//! flow control, and each stream keeps its order); incoming frames are read from the streams and
//! decoded by the event loop itself ([`Current::recv`]), ending with `Input::ConnDown` and the
//! reason.

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Input;
use crate::core::{LinkLoss, PeerMsg};
use crate::net::{close_code, ConnHandle, FrameRx, FrameSender, PeerConn};
use crate::wire::{self, Stream};

/// The current connection as the event loop sees it.
/// How long a connection the core closed stays open for the frames queued before the close.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

pub(super) struct Current {
    pub id: u64,
    control: FrameSender,
    data: Vec<FrameSender>,
    /// The frames received; `None` once they ended or one did not decode.
    rx: Option<FrameRx>,
    handle: ConnHandle,
    /// UDP datagrams received so far, and when that count last grew: when the peer was last
    /// heard (keep-alives included), for `status` while a dead peer is not yet timed out.
    heard: std::cell::Cell<(u64, std::time::Instant)>,
    /// This node's `timeout` when the connection was set up (`adjust` changes the next one).
    pub timeout: std::time::Duration,
}

impl Current {
    /// quinn's counters for this connection (datagrams, frames, packets).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.handle.stats()
    }

    /// How long ago anything (data, acks, QUIC keep-alives) arrived from the peer.
    pub fn last_heard(&self) -> std::time::Duration {
        let now = self.handle.stats().udp_rx.datagrams;
        let (seen, at) = self.heard.get();
        if now != seen {
            self.heard.set((now, std::time::Instant::now()));
            return std::time::Duration::ZERO;
        }
        at.elapsed()
    }

    /// Take over `conn` as connection `id`. Its frames are read by the event loop itself
    /// ([`Current::recv`]); its senders are the stream writers `conn` started.
    pub fn start(id: u64, conn: PeerConn) -> Current {
        let PeerConn {
            control,
            data,
            rx,
            handle,
            idle_timeout,
            ..
        } = conn;
        Current {
            id,
            control,
            data,
            rx: Some(rx),
            handle,
            heard: std::cell::Cell::new((0, std::time::Instant::now())),
            timeout: idle_timeout,
        }
    }

    /// Whether frames may still come ([`Current::recv`] has something to wait for).
    pub fn reading(&self) -> bool {
        self.rx.is_some()
    }

    /// The next message from the peer, decoded, as the event loop's input; for its `select!`
    /// (cancel-safe: it only awaits [`FrameRx::recv`]).
    ///
    /// The loop reads the frames itself, straight from the QUIC streams ([`FrameRx`]), with no
    /// task between: a forwarding task cost a task wake and a channel hop per message, on both
    /// nodes, on the path every sync write waits for (the extent at the Secondary, its ack at
    /// the Primary). A peer that sends faster than this node handles waits in QUIC flow control
    /// (the stream and connection windows) rather than in memory here.
    ///
    /// A frame that does not decode ends the connection: `ConnDown` with the reason, at once.
    /// When the streams end (the connection is going away), `None`, and the loss is reported
    /// as `ConnDown` through `events` once QUIC says why.
    pub async fn recv(&mut self, events: &mpsc::UnboundedSender<Input>) -> Option<Input> {
        let rx = self.rx.as_mut()?;
        let Some(frame) = rx.recv().await else {
            self.rx = None;
            let (id, handle, events) = (self.id, self.handle.clone(), events.clone());
            tokio::spawn(async move {
                let reason = link_loss(handle.closed().await);
                let _ = events.send(Input::ConnDown { conn: id, reason });
            });
            return None;
        };
        let undecodable = match wire::decode(&frame.bytes) {
            Ok(Some((msg, _))) => {
                return Some(Input::Peer {
                    conn: self.id,
                    msg,
                    at: frame.at,
                })
            }
            Ok(None) => "a truncated message".to_owned(),
            Err(e) => e.to_string(),
        };
        self.rx = None;
        let loss = LinkLoss::Undecodable(undecodable);
        warn!(conn = self.id, "closing the connection: {loss}");
        self.handle
            .disconnect(close_code::PROTOCOL, &loss.to_string());
        Some(Input::ConnDown {
            conn: self.id,
            reason: loss,
        })
    }

    /// Queue `msg` on the stream it belongs to. Errors mean the connection is going away; its
    /// loss comes as `ConnDown` (see [`Current::recv`]).
    pub fn send(&self, msg: &PeerMsg) {
        // Frames go as (head, payload): the payload is the client's buffer, never copied on its
        // way to QUIC.
        let (head, payload) = match wire::encode_parts(msg) {
            Ok((head, payload)) => (head.freeze(), payload),
            Err(e) => {
                warn!("cannot encode a peer message: {e}");
                return;
            }
        };
        let tx = match msg.stream() {
            Stream::Control => &self.control,
            Stream::Data => {
                let n = self.data.len().max(1) as u64;
                let i = msg.seq().unwrap_or(0) % n;
                self.data.get(i as usize).unwrap_or(&self.control)
            }
        };
        if let Err(e) = tx.send_parts(head, payload) {
            debug!("peer stream closed: {e}");
        }
    }

    pub fn close(&self, reason: &str) {
        self.handle.disconnect(close_code::DISCONNECT, reason);
    }

    /// Hangs up once what was queued before has had [`CLOSE_GRACE`] to leave (closing at once
    /// drops unsent frames). Above all the Hello: when the core refuses a peer during the
    /// handshake, the peer must still get this node's Hello to reach, and report, the same
    /// verdict; on a one-thread runtime the Hello was often still queued at the refusal, and the
    /// peer saw only a reset.
    pub fn close_after_queued(self, reason: &str) {
        let Current {
            handle,
            control,
            data,
            rx,
            ..
        } = self;
        // Nothing new is queued; the stream writers drain what is and then finish their streams.
        drop((control, data));
        let reason = reason.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_GRACE).await;
            handle.disconnect(close_code::DISCONNECT, &reason);
            // Held until now: the last owner of a connection's parts closes it when dropped,
            // and that would cut the grace short. Nothing reads it: the core is done with this
            // connection, and would ignore what came.
            drop(rx);
        });
    }
}

/// The transport's reason, as the core's [`LinkLoss`].
fn link_loss(r: crate::net::CloseReason) -> LinkLoss {
    use crate::net::CloseReason as Net;
    match r {
        Net::TimedOut => LinkLoss::TimedOut,
        Net::PeerClosed { code, reason } => LinkLoss::PeerClosed { code, reason },
        Net::LocallyClosed => LinkLoss::LocallyClosed,
        Net::Reset => LinkLoss::Reset,
        r @ (Net::Tls(_) | Net::Transport(_) | Net::Setup(_)) => LinkLoss::Transport(r.to_string()),
    }
}
