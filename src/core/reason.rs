//! Why the core closes a connection, refuses one, or refuses an operator's command, and why
//! the transport lost one: typed (rustls' `PeerMisbehaved`, quinn's `ConnectionError`), each
//! with `Display` for the operator's text. Code that must tell reasons apart (the driver, the
//! CLI, the simulator) matches the variants; nothing matches on the text.

use std::fmt;

use super::{DiskFailure, DiskState, RefusalCode, ReplState, VerifyAbortCode};

/// Why this node closed its connection to the peer ([`super::Action::CloseConnection`]). The
/// driver sends the text to the peer as the close reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The handshake did not finish within `handshake_timeout`.
    HandshakeTimedOut,
    /// The connection was refused before any data moved (by this node or by the peer).
    Refused(Refusal),
    /// The peer refused it too, after this node found a split brain (the peer's words).
    SplitBrainSeenByPeer(String),
    /// A local write of client data failed: reconnecting resyncs the region.
    LocalWriteFailed { offset: u64, len: u64 },
    /// Writing the peer's data here failed: this disk is Inconsistent now.
    PeerDataWriteFailed { offset: u64, errno: i32 },
    /// A resync or checksum read of this node's disk failed (`errno` when the driver said).
    ResyncReadFailed { offset: u64, errno: Option<i32> },
    /// A read returned fewer bytes than asked: a driver bug.
    ShortRead { what: &'static str },
    /// A flush failed: this node stopped using its disk.
    DiskFailed(DiskFailure),
    /// Peer data whose crc32 does not match: network or memory corruption.
    CrcMismatch { offset: u64, len: u64 },
    /// The peer broke the protocol.
    Protocol(Violation),
    /// This node is stopping (`twinblk down`).
    Stopping,
    /// The operator's `disconnect`; `retry` when a connection came up afterwards.
    AdminDisconnected { retry: bool },
    /// A newer connection to the peer replaced this one.
    Replaced,
    /// This node was promoted during the handshake: it reconnects with its new role.
    PromotedDuringHandshake,
    /// `invalidate`: reconnecting for a full resync.
    Invalidated,
}

impl CloseReason {
    /// Whether losing an UpToDate peer this way may let a cluster manager promote it behind
    /// this Primary's back, so the `on-peer-lost` hold applies. Only what the operator chose
    /// (`disconnect`, `down`) or a connection the peer itself replaced is no such loss; every
    /// failure the core detects is (the peer looks just as dead to the cluster manager).
    pub fn may_fence(&self) -> bool {
        match self {
            CloseReason::Stopping
            | CloseReason::AdminDisconnected { .. }
            | CloseReason::Replaced => false,
            CloseReason::HandshakeTimedOut
            | CloseReason::Refused(_)
            | CloseReason::SplitBrainSeenByPeer(_)
            | CloseReason::LocalWriteFailed { .. }
            | CloseReason::PeerDataWriteFailed { .. }
            | CloseReason::ResyncReadFailed { .. }
            | CloseReason::ShortRead { .. }
            | CloseReason::DiskFailed(_)
            | CloseReason::CrcMismatch { .. }
            | CloseReason::Protocol(_)
            | CloseReason::PromotedDuringHandshake
            | CloseReason::Invalidated => true,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::HandshakeTimedOut => {
                f.write_str("handshake timed out: the peer did not answer; check it runs twinblk")
            }
            CloseReason::Refused(r) => r.fmt(f),
            CloseReason::SplitBrainSeenByPeer(why) => {
                write!(f, "split brain, also seen by the peer: {why}")
            }
            CloseReason::LocalWriteFailed { offset, len } => write!(
                f,
                "local write failed at offset {offset} (+{len}): reconnecting to resync the \
                 region; check this node's backing disk"
            ),
            CloseReason::PeerDataWriteFailed { offset, errno } => write!(
                f,
                "local disk error (errno {errno}) writing peer data at offset {offset}: check \
                 this node's backing disk, then reconnect to resync"
            ),
            CloseReason::ResyncReadFailed { offset, errno } => {
                write!(f, "resync read failed at offset {offset}")?;
                if let Some(e) = errno {
                    write!(f, " (errno {e})")?;
                }
                f.write_str(": check this node's backing disk")
            }
            CloseReason::ShortRead { what } => {
                write!(f, "{what} read returned a short buffer: driver bug")
            }
            CloseReason::DiskFailed(d) => d.fmt(f),
            CloseReason::CrcMismatch { offset, len } => write!(
                f,
                "crc32 mismatch in peer data at offset {offset} (+{len}): network or memory \
                 corruption; the region will be resynced"
            ),
            CloseReason::Protocol(v) => write!(f, "{v}: protocol error"),
            CloseReason::Stopping => f.write_str("the peer is shutting down (twinblk down)"),
            CloseReason::AdminDisconnected { retry: false } => {
                f.write_str("administratively disconnected")
            }
            CloseReason::AdminDisconnected { retry: true } => {
                f.write_str("administratively disconnected: run `twinblk connect`")
            }
            CloseReason::Replaced => f.write_str("replaced by a new connection"),
            CloseReason::PromotedDuringHandshake => f.write_str(
                "this node was promoted during the handshake: reconnecting with its new role",
            ),
            CloseReason::Invalidated => f.write_str("invalidated: reconnecting for a full resync"),
        }
    }
}

/// How the peer broke the protocol (the connection is closed; it reconnects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    SecondHello,
    UnexpectedBitmap,
    WritesToPrimary,
    RepeatedSeq,
    ReorderOverrun,
    AheadOutOfOrder,
    BeyondDevice {
        offset: u64,
        len: u64,
    },
    BadDigestRange,
    BadVerifyRequest {
        offset: u64,
        len: u32,
        digests: usize,
    },
    /// A sequenced message that this node's state does not allow.
    Unexpected(&'static str),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::SecondHello => f.write_str("peer sent a second hello"),
            Violation::UnexpectedBitmap => {
                f.write_str("peer sent its bitmap, but this node is not waiting for one")
            }
            Violation::WritesToPrimary => f.write_str("peer sent writes to a Primary"),
            Violation::RepeatedSeq => f.write_str("peer repeated a data sequence number"),
            Violation::ReorderOverrun => f.write_str("peer overran the reorder window"),
            Violation::AheadOutOfOrder => {
                f.write_str("peer changed Ahead/Behind state out of order")
            }
            Violation::BeyondDevice { offset, len } => {
                write!(
                    f,
                    "peer data at offset {offset} (+{len}) lies beyond the device"
                )
            }
            Violation::BadDigestRange => f.write_str("peer asked for digests of a bad range"),
            Violation::BadVerifyRequest {
                offset,
                len,
                digests,
            } => write!(
                f,
                "peer sent a malformed verify request (offset {offset}, {len} bytes, {digests} \
                 digests)"
            ),
            Violation::Unexpected(what) => f.write_str(what),
        }
    }
}

/// Why a connection was refused before any data moved ([`super::StateChange::Refused`],
/// [`super::Status::last_refusal`]). The peer is told its [`RefusalCode`] and the text
/// ([`crate::wire::PeerMsg::Refuse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    ResourceMismatch {
        mine: String,
        peer: String,
    },
    SizeMismatch {
        mine: u64,
        peer: u64,
    },
    SameNodeId {
        id: u64,
    },
    /// Both were Primary at the handshake.
    BothPrimary,
    /// The peer became Primary while this node is Primary on the same connection.
    BothPrimaryConnected,
    /// Rule 2: neither disk is UpToDate or Outdated.
    NoUpToDate,
    /// The handshake made this Primary the sync target (it never is one).
    PeerNewerThanPrimary,
    /// The handshake made the Primary peer this node's sync target.
    NewerThanPrimaryPeer,
    SplitBrain(SplitBrainCause),
    /// The peer refused: why by name (what code matches), and in its words (for people).
    ByPeer {
        code: RefusalCode,
        why: String,
    },
    /// A flush failed: this node stopped using its disk and stands alone until restarted.
    DiskFailed(DiskFailure),
}

impl Refusal {
    /// A stable kebab-case name (`status --json`'s `last_refusal_code`): the refusal's
    /// [`RefusalCode`], or `by-peer` when the peer refused (its code is
    /// `last_refusal_peer_code`).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::ByPeer { .. } => "by-peer",
            other => other.wire_code().as_str(),
        }
    }

    /// The name the peer is told ([`crate::wire::PeerMsg::Refuse`]); a refusal by the peer
    /// keeps the peer's.
    pub fn wire_code(&self) -> RefusalCode {
        match self {
            Refusal::ResourceMismatch { .. } => RefusalCode::ResourceMismatch,
            Refusal::SizeMismatch { .. } => RefusalCode::SizeMismatch,
            Refusal::SameNodeId { .. } => RefusalCode::SameNodeId,
            Refusal::BothPrimary => RefusalCode::BothPrimary,
            Refusal::BothPrimaryConnected => RefusalCode::BothPrimaryConnected,
            Refusal::NoUpToDate => RefusalCode::NoUpToDate,
            Refusal::PeerNewerThanPrimary => RefusalCode::PeerNewerThanPrimary,
            Refusal::NewerThanPrimaryPeer => RefusalCode::NewerThanPrimaryPeer,
            Refusal::SplitBrain(_) => RefusalCode::SplitBrain,
            Refusal::ByPeer { code, .. } => *code,
            Refusal::DiskFailed(_) => RefusalCode::DiskFailed,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ResourceMismatch { mine, peer } => write!(
                f,
                "peer serves resource {peer:?}, this node {mine:?}: check the peer address in \
                 the resource file"
            ),
            Refusal::SizeMismatch { mine, peer } => write!(
                f,
                "device sizes differ: this node {mine} bytes, peer {peer} bytes; make both \
                 backing devices the same size"
            ),
            Refusal::SameNodeId { id } => write!(
                f,
                "peer has this node's own node id {id}: give each node its own id"
            ),
            Refusal::BothPrimary => f.write_str(
                "both nodes are Primary: demote one with `twinblk secondary` (if both wrote, \
                 that is a split brain, reported once one is Secondary)",
            ),
            Refusal::BothPrimaryConnected => f.write_str(
                "both nodes are Primary (split brain): demote one with `twinblk secondary`",
            ),
            Refusal::NoUpToDate => f.write_str(
                "neither node has UpToDate data: make one Primary with `twinblk primary --force`",
            ),
            Refusal::PeerNewerThanPrimary => f.write_str(
                "the peer has newer data than this Primary: demote this node so it can resync",
            ),
            Refusal::NewerThanPrimaryPeer => f.write_str(
                "this node has newer data than the Primary peer: demote the peer so it can resync",
            ),
            Refusal::SplitBrain(c) => c.fmt(f),
            Refusal::ByPeer { why, .. } => write!(f, "peer refused: {why}"),
            Refusal::DiskFailed(d) => d.fmt(f),
        }
    }
}

/// Why the handshake found a split brain: both sides changed data since they last agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrainCause {
    /// Which rule of `core/gen.rs` found it, for people.
    pub what: &'static str,
    pub gen: u64,
    pub peer_gen: u64,
}

impl fmt::Display for SplitBrainCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "split brain: {} (this node generation {:#x}, peer {:#x})",
            self.what, self.gen, self.peer_gen
        )
    }
}

/// Why the transport lost the connection ([`super::Event::ConnectionDown`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkLoss {
    /// Nothing heard from the peer for the idle timeout: dead peer or broken network.
    TimedOut,
    /// The peer closed it, with its reason (untrusted text).
    PeerClosed { code: u64, reason: String },
    /// The peer's endpoint no longer knows the connection (it restarted).
    Reset,
    /// The driver replaced it with a newer connection to the peer.
    Replaced,
    /// This node's transport closed it (the endpoint shuts down).
    LocallyClosed,
    /// The peer sent a frame this node cannot decode (the driver closed the connection).
    Undecodable(String),
    /// Any other transport failure, as the transport describes it.
    Transport(String),
}

impl fmt::Display for LinkLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkLoss::TimedOut => f.write_str("timed out: nothing heard from the peer"),
            LinkLoss::PeerClosed { code, reason } => {
                write!(f, "closed by the peer (code {code}): {reason}")
            }
            LinkLoss::Reset => f.write_str("reset by the peer (it restarted)"),
            LinkLoss::Replaced => f.write_str("replaced by a newer connection"),
            LinkLoss::LocallyClosed => f.write_str("closed locally"),
            LinkLoss::Undecodable(e) => {
                write!(f, "the peer sent a message this node cannot decode: {e}")
            }
            LinkLoss::Transport(s) => f.write_str(s),
        }
    }
}

/// Why a connection ended ([`super::StateChange::ConnectionLost`]): this node closed it, or
/// the transport lost it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnLoss {
    Closed(CloseReason),
    Link(LinkLoss),
}

impl fmt::Display for ConnLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnLoss::Closed(r) => r.fmt(f),
            ConnLoss::Link(l) => l.fmt(f),
        }
    }
}

/// Why the core refused (or failed) an operator's command ([`super::Action::AdminDone`]).
/// [`AdminError::code`] is the stable name scripts and the CLI match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    /// A flush failed earlier: this node no longer uses its disk.
    DiskFailed(DiskFailure),
    /// The peer's last writes are still landing on this disk (clears within milliseconds).
    PeerWritesLanding {
        writes: usize,
    },
    /// The peer is Primary (as this node saw it, or as the peer answered the promotion's ask).
    PeerIsPrimary {
        /// The peer's node name (its `[node.NAME]`), or "the peer" if unknown.
        peer: String,
        resource: String,
    },
    /// The peer asked to be promoted at the same moment (`primary` on both nodes), and its
    /// promotion goes ahead (the lower node id): this node answered it yes and stays
    /// Secondary.
    PromotionConflict {
        peer: String,
        resource: String,
    },
    /// The connection was lost before the peer answered the promotion's ask: still Secondary.
    PromotionPeerLost {
        loss: ConnLoss,
    },
    /// `primary` or `secondary` while a promotion waits for the peer's answer.
    PromotionPending,
    ResyncTarget,
    NotUpToDate {
        disk: DiskState,
    },
    /// `secondary` while a demotion already waits for the peer.
    DemotionPending,
    /// A waiting demotion was cancelled by `primary`.
    DemotionCancelled,
    /// The connection was lost before the peer had this node's last writes stable.
    DemotionPeerLost {
        loss: ConnLoss,
    },
    /// Client requests are in flight.
    RequestsInFlight {
        requests: usize,
    },
    /// `invalidate` on a Primary.
    InvalidatePrimary,
    /// `connect --discard-my-data` on a Primary.
    DiscardOnPrimary,
    /// `connect --discard-my-data` during a handshake: this node's hello went out without it.
    DiscardDuringHandshake,
    /// `verify` cannot run now.
    Verify(VerifyRefusal),
    /// Frontend clients have the device open (`secondary` or `down` without `--force`).
    ClientsOpen {
        resource: String,
        command: ClientsCommand,
        /// Who, oldest first (their addresses).
        clients: Vec<String>,
    },
    /// `adjust` would turn fencing off while writes are frozen until the peer is fenced.
    FencingStillNeeded,
    /// A graceful stop (`twinblk down`) is under way.
    ShuttingDown,
    /// The graceful stop is over.
    ShutDown,
}

impl AdminError {
    /// The stable code of the refusal (the admin reply's `code`).
    pub fn code(&self) -> AdminErrorCode {
        match self {
            AdminError::DiskFailed(_) => AdminErrorCode::DiskFailed,
            AdminError::PeerWritesLanding { .. } => AdminErrorCode::PeerWritesLanding,
            AdminError::PeerIsPrimary { .. } => AdminErrorCode::PeerIsPrimary,
            AdminError::PromotionConflict { .. } => AdminErrorCode::PromotionConflict,
            AdminError::PromotionPeerLost { .. } => AdminErrorCode::PromotionPeerLost,
            AdminError::PromotionPending => AdminErrorCode::PromotionPending,
            AdminError::ResyncTarget => AdminErrorCode::ResyncTarget,
            AdminError::NotUpToDate { .. } => AdminErrorCode::NotUpToDate,
            AdminError::DemotionPending => AdminErrorCode::DemotionPending,
            AdminError::DemotionCancelled => AdminErrorCode::DemotionCancelled,
            AdminError::DemotionPeerLost { .. } => AdminErrorCode::DemotionPeerLost,
            AdminError::RequestsInFlight { .. } => AdminErrorCode::RequestsInFlight,
            AdminError::InvalidatePrimary => AdminErrorCode::InvalidatePrimary,
            AdminError::DiscardOnPrimary => AdminErrorCode::DiscardOnPrimary,
            AdminError::DiscardDuringHandshake => AdminErrorCode::DiscardDuringHandshake,
            AdminError::Verify(_) => AdminErrorCode::VerifyRefused,
            AdminError::ClientsOpen { .. } => AdminErrorCode::ClientsOpen,
            AdminError::FencingStillNeeded => AdminErrorCode::FencingStillNeeded,
            AdminError::ShuttingDown => AdminErrorCode::ShuttingDown,
            AdminError::ShutDown => AdminErrorCode::ShutDown,
        }
    }
}

/// The command refused under open frontend clients ([`AdminError::ClientsOpen`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientsCommand {
    Secondary,
    Down,
}

/// The stable name of an admin refusal, sent as the admin reply's `code` (kebab-case in the
/// JSON) next to the message, so the CLI and scripts act on it without reading the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminErrorCode {
    DiskFailed,
    /// Clears by itself within milliseconds: `twinblk primary` retries on it.
    PeerWritesLanding,
    PeerIsPrimary,
    PromotionConflict,
    PromotionPeerLost,
    PromotionPending,
    ResyncTarget,
    NotUpToDate,
    DemotionPending,
    DemotionCancelled,
    DemotionPeerLost,
    RequestsInFlight,
    InvalidatePrimary,
    DiscardOnPrimary,
    DiscardDuringHandshake,
    VerifyRefused,
    FencingStillNeeded,
    ShuttingDown,
    ShutDown,
    /// NBD clients have the device open (`secondary`, `down` without `--force`).
    ClientsOpen,
    /// The ublk device is mounted or held open (decided by the driver).
    DeviceInUse,
    /// A code a newer daemon sent that this CLI does not know.
    #[serde(other)]
    Unknown,
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::DiskFailed(d) => d.fmt(f),
            AdminError::PeerWritesLanding { writes } => write!(
                f,
                "{writes} writes from the peer are still landing on this disk: promote again \
                 in a moment"
            ),
            AdminError::PeerIsPrimary { peer, resource } => write!(
                f,
                "the peer {peer} is Primary: demote it first (`twinblk secondary {resource}` on \
                 {peer}), then run `twinblk primary {resource}` here again; if {peer} died, it \
                 is declared dead after `timeout` without a word (`status` says when it was \
                 last heard): promote then"
            ),
            AdminError::PromotionConflict { peer, resource } => write!(
                f,
                "{peer} asked to become Primary at the same moment, and {peer} goes ahead (of \
                 two promotions at once, the node listed first in the resource file wins): this \
                 node stays Secondary (`twinblk status {resource}` shows {peer} Primary once it \
                 is; run `twinblk primary {resource}` on one node only)"
            ),
            AdminError::PromotionPeerLost { loss } => write!(
                f,
                "the connection to the peer was lost ({loss}) before it agreed to the \
                 promotion: still Secondary. Run `twinblk primary` again: a node without a \
                 connection is promoted on its own data (make sure the peer is not Primary)"
            ),
            AdminError::PromotionPending => f.write_str(
                "a promotion is waiting for the peer's agreement: it answers within a round \
                 trip (or fails if the peer is lost)",
            ),
            AdminError::ResyncTarget => f.write_str(
                "this node is a resync target (Inconsistent): wait for the resync to finish",
            ),
            AdminError::NotUpToDate { disk } => write!(
                f,
                "the disk is {disk:?}, not UpToDate: only an UpToDate node can become Primary \
                 (use --force for the very first promotion of a new resource)"
            ),
            AdminError::DemotionPending => f.write_str(
                "a demotion is already waiting for the peer to make this node's last writes \
                 stable: it answers when they are (or fails if the peer is lost)",
            ),
            AdminError::DemotionCancelled => {
                f.write_str("cancelled by `twinblk primary`: still Primary")
            }
            AdminError::DemotionPeerLost { loss } => write!(
                f,
                "the connection to the peer was lost ({loss}) before it had this node's last \
                 writes stable: still Primary, and those writes are in the bitmap under a new \
                 generation (the next connect resyncs them to the peer). Reconnect and run \
                 `twinblk secondary` again for a clean switchover, or run it now to give up the \
                 role anyway (promoting the peer then is a split brain once it writes)"
            ),
            AdminError::RequestsInFlight { requests } => write!(
                f,
                "{requests} client requests in flight: stop the clients (disconnect NBD) first"
            ),
            AdminError::InvalidatePrimary => f.write_str(
                "this node is Primary: demote it first (`twinblk secondary`); a Primary cannot \
                 become a sync target",
            ),
            AdminError::DiscardOnPrimary => f.write_str(
                "this node is Primary: demote it first (`twinblk secondary`), then discard its \
                 data",
            ),
            AdminError::DiscardDuringHandshake => f.write_str(
                "a handshake with the peer is under way, and it decides on what this node \
                 already sent (without --discard-my-data): run `twinblk disconnect`, then \
                 `twinblk connect --discard-my-data` again",
            ),
            AdminError::Verify(why) => why.fmt(f),
            AdminError::ClientsOpen {
                resource,
                command,
                clients,
            } => {
                let one = clients.len() == 1;
                write!(
                    f,
                    "{n} NBD client{s} ha{ve} {resource} open ({list}); {its} next writes would \
                     fail: stop {them} first, or `twinblk {command} {resource} --force` to \
                     disconnect {them} (requests in flight are answered first)",
                    n = clients.len(),
                    s = if one { "" } else { "s" },
                    ve = if one { "s" } else { "ve" },
                    list = clients.join(", "),
                    them = if one { "it" } else { "them" },
                    its = if one { "its" } else { "their" },
                    command = match command {
                        ClientsCommand::Secondary => "secondary",
                        ClientsCommand::Down => "down",
                    },
                )
            }
            AdminError::FencingStillNeeded => f.write_str(
                "writes are frozen until on-peer-lost fences the peer, and without the hook \
                 nothing would fence it: keep on-peer-lost (a corrected path is used by its \
                 next retry), bring the peer back, or `twinblk disconnect` to go on alone at \
                 your own risk",
            ),
            AdminError::ShuttingDown => f.write_str("this node is shutting down (twinblk down)"),
            AdminError::ShutDown => f.write_str("this node has shut down (twinblk down)"),
        }
    }
}

/// Why a verify cannot run now: `twinblk verify`'s refusal ([`AdminError::Verify`]), or this
/// node's answer to the peer's `VerifyAsk` or `VerifyStart` (a `VerifyStop` with its code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyRefusal {
    /// Not connected, or a resync runs.
    NotEstablished { repl: ReplState },
    /// A disk (this node's or the peer's) is not UpToDate.
    NotBothUpToDate,
    /// A verify runs on this node already.
    AlreadyRunning,
    /// Asked to drive, but this node is not the peer of a Primary.
    NotPrimarysPeer,
    /// Asked to compare, but this node is Primary: the Primary drives (see `core/verify.rs`).
    PrimaryDrives,
}

impl VerifyRefusal {
    /// The name the peer is told ([`crate::wire::PeerMsg::VerifyStop`]).
    pub fn wire_code(&self) -> VerifyAbortCode {
        match self {
            VerifyRefusal::NotEstablished { .. } => VerifyAbortCode::NotEstablished,
            VerifyRefusal::NotBothUpToDate => VerifyAbortCode::NotBothUpToDate,
            VerifyRefusal::AlreadyRunning => VerifyAbortCode::AlreadyRunning,
            VerifyRefusal::NotPrimarysPeer => VerifyAbortCode::NotPrimarysPeer,
            VerifyRefusal::PrimaryDrives => VerifyAbortCode::PrimaryDrives,
        }
    }
}

impl fmt::Display for VerifyRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyRefusal::NotEstablished { repl } => write!(
                f,
                "replication is {repl:?}, not Established: verify needs a connected peer and no \
                 resync running (see `twinblk status`)"
            ),
            VerifyRefusal::NotBothUpToDate => {
                f.write_str("both disks must be UpToDate to verify (see `twinblk status`)")
            }
            VerifyRefusal::AlreadyRunning => {
                f.write_str("a verify is already running: wait for it (`twinblk verify --wait`)")
            }
            VerifyRefusal::NotPrimarysPeer => {
                f.write_str("this node is not the Primary's peer to drive a verify")
            }
            VerifyRefusal::PrimaryDrives => {
                f.write_str("this node is Primary: the Primary drives a verify")
            }
        }
    }
}

/// Why a verify stopped early ([`super::verify::VerifyStatus::aborted`],
/// [`super::StateChange::VerifyFinished`]). The peer is told its [`VerifyAbortCode`] and the
/// text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyAbort {
    /// A node changed its role: the driver might no longer be the node that writes.
    RoleChanged,
    /// The connection to the peer ended.
    ConnectionLost(ConnLoss),
    /// A verify read of this node's disk failed.
    ReadFailed { offset: u64, errno: i32 },
    /// A verify read returned fewer bytes than asked: a driver bug.
    ShortRead,
    /// Both nodes started a verify at once.
    BothStarted,
    /// The peer stopped it, or refused to take part: why by name (what code matches), and
    /// in its words (for people).
    ByPeer { code: VerifyAbortCode, why: String },
}

impl VerifyAbort {
    /// A stable kebab-case name (`status --json`'s `verify.aborted_code`, the
    /// `verify-finished` event's `code`): the abort's [`VerifyAbortCode`], or `by-peer` when
    /// the peer stopped it (its code is `verify.aborted_peer_code`).
    pub fn code(&self) -> &'static str {
        match self {
            VerifyAbort::ByPeer { .. } => "by-peer",
            other => other.wire_code().as_str(),
        }
    }

    /// The name the peer is told; an abort by the peer keeps the peer's.
    pub fn wire_code(&self) -> VerifyAbortCode {
        match self {
            VerifyAbort::RoleChanged => VerifyAbortCode::RoleChanged,
            VerifyAbort::ConnectionLost(_) => VerifyAbortCode::ConnectionLost,
            VerifyAbort::ReadFailed { .. } => VerifyAbortCode::ReadFailed,
            VerifyAbort::ShortRead => VerifyAbortCode::ShortRead,
            VerifyAbort::BothStarted => VerifyAbortCode::BothStarted,
            VerifyAbort::ByPeer { code, .. } => *code,
        }
    }

    /// What the peer is told: the code and this node's words.
    pub fn to_wire(&self) -> crate::wire::VerifyAborted {
        crate::wire::VerifyAborted {
            code: self.wire_code(),
            why: self.to_string(),
        }
    }
}

impl fmt::Display for VerifyAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyAbort::RoleChanged => {
                f.write_str("a node changed its role during the verify; run it again")
            }
            VerifyAbort::ConnectionLost(loss) => write!(f, "connection lost: {loss}"),
            VerifyAbort::ReadFailed { offset, errno } => write!(
                f,
                "verify read failed at offset {offset} (errno {errno}): check this node's \
                 backing disk"
            ),
            VerifyAbort::ShortRead => {
                f.write_str("verify read returned a short buffer: driver bug")
            }
            VerifyAbort::BothStarted => {
                f.write_str("both nodes started a verify at once; run it again on one node")
            }
            VerifyAbort::ByPeer { why, .. } => write!(f, "stopped by the peer: {why}"),
        }
    }
}
