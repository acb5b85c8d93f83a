//! The peer wire codec: `PeerMsg` <-> bytes. Pure: no I/O, no tokio.
//!
//! Frame = 12-byte little-endian header `{magic u32, version u16, kind u16, body_len u32}` + body.
//! Hot messages (data extents, resync data, acks, barriers) have a fixed little-endian body header
//! (zerocopy structs) followed by the raw payload, so encoding is a header write plus a payload
//! copy (or none at all with [`encode_parts`]) and decoding is a bounds check plus a zero-copy
//! `Bytes::slice`. Control messages (hello, state, refuse, resync-done) are postcard-encoded serde
//! structs (a refusal's reason as a [`RefusalCode`], its text for people only).
//!
//! Every data payload carries the crc32 the sender computed over it (`crc32fast`); the codec
//! carries it, the replication core verifies it before the data reaches a disk (so an in-process
//! driver that skips the codec is checked too). [`PeerMsg::crc_ok`] is the check.
//!
//! Decoding never panics and never trusts a length beyond [`MAX_BODY`].

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "TWBK" little-endian.
pub const MAGIC: u32 = 0x4b42_5754;
/// Wire format version; a peer speaking another version is refused at the first frame.
/// 2: `Hello` carries generation history and the changed-block count; `PeerBitmap`.
/// 3: online verify (`Verify*`) and checksum resync (`Csum*`, `ResyncSame`) messages.
/// `Barrier` says whether it flushes (flush barrier) or only orders (order barrier).
/// 4: a resync source clears a bit only once the block is stable on the target (a flush
/// barrier after its `ResyncAck` was acked), and a restarted target trusts its bitmap: a
/// version-3 source would let it resume over data lost in its crash.
/// 5: `WriteAck` carries the receiver's stage times ([`AckTiming`]) for the Primary's latency
/// breakdown (`twinblk status --latency`).
/// 6: `Hello` carries the sync source's unconfirmed resync end ([`ResyncEnd`]), so a cut just
/// as a resync ends resumes from the bitmaps on both sides alike.
/// 7: `Refuse` carries the refusal's [`RefusalCode`] next to its text, so the receiver tells
/// refusals apart by name, never by the words.
/// 8: a connected node's promotion is agreed with the peer first ([`PeerMsg::PromoteAsk`],
/// [`PeerMsg::PromoteAnswer`]): a version-7 node would promote on its own view of the peer.
/// 9: `VerifyEnd` and `VerifyStop` carry why the verify stopped as a [`VerifyAbortCode`] next
/// to its text, so the receiver tells the causes apart by name, never by the words.
/// 10: of two [`PeerMsg::PromoteAsk`]s that cross, the lower node id's goes ahead (the other
/// node answers yes and drops its own); a version-9 node refuses both.
pub const VERSION: u16 = 10;
/// Largest payload carried by one data message.
pub const MAX_PAYLOAD: usize = 32 << 20;
/// Largest body accepted: the largest payload plus room for the body header.
pub const MAX_BODY: usize = MAX_PAYLOAD + 4096;
/// Frame header length.
pub const HEADER_LEN: usize = 12;

/// Which transport stream a message should travel on. Messages on the same stream must be
/// delivered in order; data messages may be spread over several streams and reordered freely
/// (they carry a per-connection sequence number and the receiver restores the order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Control,
    Data,
}

/// Node role (DRBD vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

/// State of a node's backing disk (DRBD vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    UpToDate,
    Inconsistent,
    Outdated,
    Diskless,
}

/// Automatic split-brain resolution when neither node is Primary (DRBD's after-sb-0pri).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AfterSb0Pri {
    /// Stay StandAlone and let the operator decide.
    #[default]
    Disconnect,
    /// If only one node changed blocks since they last agreed, the other (unchanged) one
    /// becomes the sync target.
    DiscardZeroChanges,
    /// The node that started its generation last (became Primary last) discards its changes.
    DiscardYoungerPrimary,
    /// The node that changed fewer blocks discards its changes.
    DiscardLeastChanges,
}

/// Automatic split-brain resolution when one node is Primary (DRBD's after-sb-1pri).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AfterSb1Pri {
    #[default]
    Disconnect,
    /// The Secondary discards its changes.
    DiscardSecondary,
}

/// What a data extent does on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum DataOp {
    Write = 1,
    Trim = 2,
    Zero = 3,
}

/// Flag bit: the write is FUA (stable on the peer's disk before the ack).
pub const FLAG_FUA: u32 = 1;

/// One replicated client write (or trim / write-zeroes: then `data` is empty and `len` says how
/// much). `seq` is the per-connection stream sequence number shared by all data messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub seq: u64,
    pub epoch: u64,
    pub offset: u64,
    pub len: u32,
    pub op: DataOp,
    pub flags: u32,
    pub crc32: u32,
    pub data: Bytes,
}

/// How long an acked write spent in each stage on the node that acked it, in nanoseconds
/// (saturating at about 4.3 s; all zero: not measured). Only for the sender's latency
/// breakdown: nothing decides on it. The core sends zeros; the node driver fills them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AckTiming {
    /// Extent frame read from the stream -> the event loop took it.
    pub receive_ns: u32,
    /// Event loop -> disk write started.
    pub queue_ns: u32,
    /// Disk write started -> its completion reached the event loop.
    pub disk_ns: u32,
    /// Disk write done -> ack queued.
    pub ack_ns: u32,
}

impl AckTiming {
    /// Frame read to ack queued: the receiver's whole part of the round trip.
    pub fn total_ns(&self) -> u64 {
        u64::from(self.receive_ns)
            + u64::from(self.queue_ns)
            + u64::from(self.disk_ns)
            + u64::from(self.ack_ns)
    }
}

/// First message on a connection, sent by both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub resource: String,
    pub node_id: u64,
    pub size: u64,
    pub role: Role,
    pub disk: DiskState,
    /// The data generation of this node's disk (see `core::gen`).
    pub current_gen: u64,
    /// The generation the dirty bitmap is relative to, if any.
    pub bitmap_gen: Option<u64>,
    /// The in-memory bitmap covers every change since `bitmap_gen` (false after a restart).
    pub bitmap_known: bool,
    /// This node has dirty bits (writes the peer may lack).
    pub dirty: bool,
    /// This node crashed (restarted) while Primary: its recent writes are unknown.
    pub crashed_primary: bool,
    /// The generations before `bitmap_gen`, newest first (0 = none).
    pub history: [u64; 2],
    /// Set bits in the dirty bitmap: blocks this node changed that the peer may lack (the
    /// split-brain report shows both sides' counts).
    pub dirty_blocks: u64,
    /// The operator ran `connect --discard-my-data` here: on a split brain this node loses.
    pub discard_my_data: bool,
    /// Split-brain policies; applied only when both nodes have the same ones.
    pub after_sb_0pri: AfterSb0Pri,
    pub after_sb_1pri: AfterSb1Pri,
    /// A sync source's `ResyncDone` the target may not have applied (see [`ResyncEnd`]).
    pub resync_end: Option<ResyncEnd>,
}

/// A resync end the sync source sent and the target has not confirmed (its disk turning
/// UpToDate): until then, a target still at one of `target_gens` (its generations before the
/// end; the same one twice when there is only one), Inconsistent with a trusted bitmap, holds
/// generation `gen`'s data except what the source's bitmap names. The handshake reads it as
/// being at `gen`, so a cut just as the resync ends resumes from the bitmaps instead of costing
/// a full resync (issue 17, defect 6; `core::gen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncEnd {
    /// The generation sent with the last `ResyncDone`: the one the target adopts.
    pub gen: u64,
    /// The generations the target may still carry instead.
    pub target_gens: [u64; 2],
}

/// Role / disk state update, sent when either changes while connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerState {
    pub role: Role,
    pub disk: DiskState,
}

/// Why a node refused a connection, by name: what [`PeerMsg::Refuse`] carries (postcard: the
/// variant's index, so a new variant goes last and bumps [`VERSION`]). The core's
/// `Refusal::wire_code` names each of its refusals; the receiver keeps the code in
/// `Refusal::ByPeer` and matches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    ResourceMismatch,
    SizeMismatch,
    SameNodeId,
    BothPrimary,
    BothPrimaryConnected,
    NoUpToDate,
    PeerNewerThanPrimary,
    NewerThanPrimaryPeer,
    SplitBrain,
    DiskFailed,
}

impl RefusalCode {
    /// The stable kebab-case name (`status --json`'s `last_refusal_code` and
    /// `last_refusal_peer_code`).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::ResourceMismatch => "resource-mismatch",
            RefusalCode::SizeMismatch => "size-mismatch",
            RefusalCode::SameNodeId => "same-node-id",
            RefusalCode::BothPrimary => "both-primary",
            RefusalCode::BothPrimaryConnected => "both-primary-connected",
            RefusalCode::NoUpToDate => "no-up-to-date",
            RefusalCode::PeerNewerThanPrimary => "peer-newer-than-primary",
            RefusalCode::NewerThanPrimaryPeer => "newer-than-primary-peer",
            RefusalCode::SplitBrain => "split-brain",
            RefusalCode::DiskFailed => "disk-failed",
        }
    }

    /// A split brain, as the sender found it (both Primary counts: it is one, or becomes one
    /// once a node is demoted).
    pub fn is_split_brain(self) -> bool {
        match self {
            RefusalCode::SplitBrain
            | RefusalCode::BothPrimary
            | RefusalCode::BothPrimaryConnected => true,
            RefusalCode::ResourceMismatch
            | RefusalCode::SizeMismatch
            | RefusalCode::SameNodeId
            | RefusalCode::NoUpToDate
            | RefusalCode::PeerNewerThanPrimary
            | RefusalCode::NewerThanPrimaryPeer
            | RefusalCode::DiskFailed => false,
        }
    }
}

/// The peer's answer to a [`PeerMsg::PromoteAsk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromoteVerdict {
    /// The answerer is not Primary and has no promotion of its own pending: the asker may
    /// commit its promotion. (The answerer cannot become Primary before it hears the
    /// asker's new role: its own promotion must ask the asker first.)
    Yes,
    /// The answerer is Primary (its `State` saying so precedes this answer).
    NoPrimary,
    /// The answerer asked to be promoted too, and its ask goes ahead (the lower node id; the
    /// asker, seeing the answerer's ask, has dropped its own and answered it yes).
    NoPromoting,
}

/// Why a verify stopped early or could not start, by name: what [`PeerMsg::VerifyEnd`] and
/// [`PeerMsg::VerifyStop`] carry (postcard: the variant's index, so a new variant goes last and
/// bumps [`VERSION`]). The core's `VerifyAbort::wire_code` and `VerifyRefusal::wire_code` name
/// each cause; the receiver keeps the code in `VerifyAbort::ByPeer` and matches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifyAbortCode {
    /// A node changed its role during the verify.
    RoleChanged,
    /// The connection was lost (never sent: the peer sees the loss itself).
    ConnectionLost,
    /// A verify read of the sender's disk failed.
    ReadFailed,
    /// A verify read returned fewer bytes than asked (a driver bug).
    ShortRead,
    /// Both nodes started a verify at once.
    BothStarted,
    /// The sender cannot take part: replication is not Established.
    NotEstablished,
    /// The sender cannot take part: a disk is not UpToDate.
    NotBothUpToDate,
    /// The sender cannot take part: it runs a verify already.
    AlreadyRunning,
    /// The sender was asked to drive but is not the Primary's peer.
    NotPrimarysPeer,
    /// The sender is Primary, so it must drive (it refuses to compare).
    PrimaryDrives,
}

impl VerifyAbortCode {
    /// Every code, for tests that must cover each.
    pub const ALL: [VerifyAbortCode; 10] = [
        VerifyAbortCode::RoleChanged,
        VerifyAbortCode::ConnectionLost,
        VerifyAbortCode::ReadFailed,
        VerifyAbortCode::ShortRead,
        VerifyAbortCode::BothStarted,
        VerifyAbortCode::NotEstablished,
        VerifyAbortCode::NotBothUpToDate,
        VerifyAbortCode::AlreadyRunning,
        VerifyAbortCode::NotPrimarysPeer,
        VerifyAbortCode::PrimaryDrives,
    ];

    /// The stable kebab-case name (`status --json`'s `verify.aborted_code` and
    /// `verify.aborted_peer_code`, the `verify-finished` event's `code`).
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyAbortCode::RoleChanged => "role-changed",
            VerifyAbortCode::ConnectionLost => "connection-lost",
            VerifyAbortCode::ReadFailed => "read-failed",
            VerifyAbortCode::ShortRead => "short-read",
            VerifyAbortCode::BothStarted => "both-started",
            VerifyAbortCode::NotEstablished => "not-established",
            VerifyAbortCode::NotBothUpToDate => "not-both-up-to-date",
            VerifyAbortCode::AlreadyRunning => "already-running",
            VerifyAbortCode::NotPrimarysPeer => "not-primarys-peer",
            VerifyAbortCode::PrimaryDrives => "primary-drives",
        }
    }
}

/// Why the sender's verify stopped early, by name and in its words ([`PeerMsg::VerifyEnd`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyAborted {
    pub code: VerifyAbortCode,
    /// For people only (`status`, logs).
    pub why: String,
}

/// A peer message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMsg {
    Hello(Hello),
    State(PeerState),
    /// `primary` on a connected node: may the sender become Primary? (Control stream, so it
    /// follows every `State` the sender sent before; answered by [`PeerMsg::PromoteAnswer`]
    /// with the same `id`.) The promotion commits only on [`PromoteVerdict::Yes`].
    PromoteAsk {
        id: u64,
    },
    /// The answer to the [`PeerMsg::PromoteAsk`] with this `id` (control stream: it follows
    /// every `State` the answerer sent before).
    PromoteAnswer {
        id: u64,
        verdict: PromoteVerdict,
    },
    /// The sender refuses this connection: `code` says why (the receiver matches it), `reason`
    /// in the sender's words (for `status` and logs only).
    Refuse {
        code: RefusalCode,
        reason: String,
    },
    /// A replicated write extent (data stream, sequenced).
    Data(Extent),
    /// Closes epoch `epoch`: the receiver lets nothing after it start before everything before
    /// it is written (drains). A flush barrier (`flush`) then also flushes the disk and answers
    /// [`PeerMsg::BarrierAck`]; an order barrier is never flushed nor acked.
    Barrier {
        seq: u64,
        epoch: u64,
        flush: bool,
    },
    /// The sync target's dirty bitmap, as runs of `(first block, blocks)`; the source resyncs
    /// the union of both bitmaps. Sent in pieces; `done` marks the last.
    PeerBitmap {
        runs: Vec<(u64, u64)>,
        done: bool,
    },
    /// Sync source -> target: how far the resync is (blocks), for the target's status.
    ResyncProgress {
        total: u64,
        left: u64,
    },
    /// Resync payload for `[offset, offset+len)` (data stream, sequenced).
    ResyncData {
        seq: u64,
        offset: u64,
        crc32: u32,
        data: Bytes,
    },
    /// End of resync: the target flushes, becomes UpToDate with generation `gen`.
    ResyncDone {
        seq: u64,
        gen: u64,
    },
    /// The extent with this seq is on the receiver's disk (stable if it was FUA); `timing` says
    /// where its time went there.
    WriteAck {
        seq: u64,
        timing: AckTiming,
    },
    /// Everything up to the flush barrier closing epoch `epoch` is stable on the receiver's disk.
    BarrierAck {
        epoch: u64,
    },
    /// Resync data at `offset` is on the target's disk.
    ResyncAck {
        offset: u64,
        len: u32,
    },
    /// Online verify, driver -> comparer (data stream, sequenced): a verify begins; the
    /// receiver compares the requests that follow.
    VerifyStart {
        seq: u64,
    },
    /// Online verify (data stream, sequenced: the receiver reads its blocks after every write
    /// sent before this and before every write sent after): the sender's digest of each bitmap
    /// block of `[offset, offset + len)`.
    VerifyRequest {
        seq: u64,
        offset: u64,
        len: u32,
        digests: Vec<u64>,
    },
    /// Verify, driver -> comparer (data stream, sequenced): the verify ended, or stopped early
    /// for the reason in `aborted`.
    VerifyEnd {
        seq: u64,
        aborted: Option<VerifyAborted>,
    },
    /// Verify, comparer -> driver: the blocks of the request at `offset` that differ, as runs
    /// `(first block, blocks)`; the comparer has already marked them out of sync.
    VerifyReply {
        offset: u64,
        len: u32,
        differ: Vec<(u64, u64)>,
    },
    /// `twinblk verify` ran on the node that must not read first (the Secondary of a
    /// Primary): asks the receiver to drive a verify.
    VerifyAsk,
    /// Verify, either side: stop the verify (or refuse a `VerifyAsk`): `code` says why (the
    /// receiver matches it), `reason` in the sender's words (for `status` and logs only).
    VerifyStop {
        code: VerifyAbortCode,
        reason: String,
    },
    /// Checksum resync, source -> target: send your digests of this range.
    CsumRequest {
        offset: u64,
        len: u32,
    },
    /// Checksum resync, target -> source: its digest of each bitmap block of the range.
    CsumReply {
        offset: u64,
        len: u32,
        digests: Vec<u64>,
    },
    /// Checksum resync, source -> target: these blocks are already identical (no data moves).
    ResyncSame {
        offset: u64,
        len: u32,
    },
    /// Resync of `[offset, offset+len)`, which is all zeroes on the source: the target writes
    /// zeroes (WRITE_ZEROES) instead of receiving a payload (data stream, sequenced).
    ResyncZero {
        seq: u64,
        offset: u64,
        len: u32,
    },
    /// The sender went Ahead (pull-ahead on a congested link): it stops shipping writes and
    /// marks them in its bitmap; the receiver is Behind, its disk Outdated (data stream,
    /// sequenced: it follows every write shipped before it).
    Ahead {
        seq: u64,
    },
    /// The Ahead sender's link drained: a bitmap resync to the receiver starts now (data stream,
    /// sequenced: the resync data follows it).
    AheadResync {
        seq: u64,
    },
}

impl PeerMsg {
    /// The resync payload a message carries, for `twinblk_resync_bytes_total` (counted as sent on
    /// the source and as received on the target). Exhaustive, so a new message kind decides here.
    pub fn resync_payload_bytes(&self) -> Option<u64> {
        match self {
            PeerMsg::ResyncData { data, .. } => Some(data.len() as u64),
            PeerMsg::ResyncZero { len, .. } => Some(u64::from(*len)),
            PeerMsg::Hello(_)
            | PeerMsg::State(_)
            | PeerMsg::PromoteAsk { .. }
            | PeerMsg::PromoteAnswer { .. }
            | PeerMsg::Refuse { .. }
            | PeerMsg::Data(_)
            | PeerMsg::Barrier { .. }
            | PeerMsg::PeerBitmap { .. }
            | PeerMsg::ResyncProgress { .. }
            | PeerMsg::ResyncDone { .. }
            | PeerMsg::WriteAck { .. }
            | PeerMsg::BarrierAck { .. }
            | PeerMsg::ResyncAck { .. }
            | PeerMsg::VerifyStart { .. }
            | PeerMsg::VerifyRequest { .. }
            | PeerMsg::VerifyEnd { .. }
            | PeerMsg::VerifyReply { .. }
            | PeerMsg::VerifyAsk
            | PeerMsg::VerifyStop { .. }
            | PeerMsg::CsumRequest { .. }
            | PeerMsg::CsumReply { .. }
            | PeerMsg::ResyncSame { .. }
            | PeerMsg::Ahead { .. }
            | PeerMsg::AheadResync { .. } => None,
        }
    }
}

#[repr(u16)]
#[derive(Clone, Copy)]
enum Kind {
    Hello = 1,
    State = 2,
    Refuse = 3,
    PeerBitmap = 4,
    ResyncProgress = 5,
    PromoteAsk = 6,
    PromoteAnswer = 7,
    Data = 10,
    Barrier = 11,
    ResyncData = 12,
    ResyncDone = 13,
    WriteAck = 20,
    BarrierAck = 21,
    ResyncAck = 22,
    VerifyStart = 30,
    VerifyRequest = 31,
    VerifyEnd = 32,
    VerifyReply = 33,
    VerifyAsk = 34,
    VerifyStop = 35,
    CsumRequest = 36,
    CsumReply = 37,
    ResyncSame = 38,
    ResyncZero = 39,
    Ahead = 40,
    AheadResync = 41,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::State,
            3 => Kind::Refuse,
            4 => Kind::PeerBitmap,
            5 => Kind::ResyncProgress,
            6 => Kind::PromoteAsk,
            7 => Kind::PromoteAnswer,
            10 => Kind::Data,
            11 => Kind::Barrier,
            12 => Kind::ResyncData,
            13 => Kind::ResyncDone,
            20 => Kind::WriteAck,
            21 => Kind::BarrierAck,
            22 => Kind::ResyncAck,
            30 => Kind::VerifyStart,
            31 => Kind::VerifyRequest,
            32 => Kind::VerifyEnd,
            33 => Kind::VerifyReply,
            34 => Kind::VerifyAsk,
            35 => Kind::VerifyStop,
            36 => Kind::CsumRequest,
            37 => Kind::CsumReply,
            38 => Kind::ResyncSame,
            39 => Kind::ResyncZero,
            40 => Kind::Ahead,
            41 => Kind::AheadResync,
            _ => return None,
        })
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct FrameHeader {
    magic: U32,
    version: U16,
    kind: U16,
    len: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct DataHeader {
    seq: U64,
    epoch: U64,
    offset: U64,
    len: U32,
    op: U16,
    _pad: U16,
    flags: U32,
    crc32: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct ResyncHeader {
    seq: U64,
    offset: U64,
    len: U32,
    crc32: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct ResyncZeroBody {
    seq: U64,
    offset: U64,
    len: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct TwoU64 {
    a: U64,
    b: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct BarrierBody {
    seq: U64,
    epoch: U64,
    flags: U32,
}

/// [`BarrierBody::flags`] bit: a flush barrier.
const BARRIER_FLUSH: u32 = 1;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct OneU64 {
    a: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct WriteAckBody {
    seq: U64,
    receive_ns: U32,
    queue_ns: U32,
    disk_ns: U32,
    ack_ns: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct ResyncAckBody {
    offset: U64,
    len: U32,
}

#[derive(Serialize, Deserialize)]
struct ResyncDoneBody {
    seq: u64,
    gen: u64,
}

#[derive(Serialize, Deserialize)]
struct BitmapBody {
    runs: Vec<(u64, u64)>,
    done: bool,
}

#[derive(Serialize, Deserialize)]
struct VerifyRequestBody {
    seq: u64,
    offset: u64,
    len: u32,
    digests: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct RangeBody {
    offset: u64,
    len: u32,
}

#[derive(Serialize, Deserialize)]
struct RunsBody {
    offset: u64,
    len: u32,
    runs: Vec<(u64, u64)>,
}

#[derive(Serialize, Deserialize)]
struct DigestsBody {
    offset: u64,
    len: u32,
    digests: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct VerifyEndBody {
    seq: u64,
    aborted: Option<VerifyAborted>,
}

#[derive(Serialize, Deserialize)]
struct RefuseBody {
    code: RefusalCode,
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct VerifyStopBody {
    code: VerifyAbortCode,
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct PromoteAnswerBody {
    id: u64,
    verdict: PromoteVerdict,
}

/// Why a frame could not be decoded. Any of these means the peer is broken or hostile: close the
/// connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad frame magic {0:#x}: the peer is not a twinblk node")]
    BadMagic(u32),
    #[error("peer speaks wire version {0}, this node speaks {VERSION}: upgrade one side")]
    BadVersion(u16),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("frame body of {0} bytes exceeds the {MAX_BODY}-byte cap")]
    TooLong(u64),
    #[error("malformed {kind} body: {why}")]
    Malformed { kind: &'static str, why: String },
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte cap")]
    PayloadTooLong(usize),
    #[error("control message does not serialize: {0}")]
    Encode(String),
}

fn malformed(kind: &'static str, why: impl Into<String>) -> WireError {
    WireError::Malformed {
        kind,
        why: why.into(),
    }
}

impl PeerMsg {
    /// The stream this message should travel on.
    pub fn stream(&self) -> Stream {
        match self {
            PeerMsg::Data(_)
            | PeerMsg::Barrier { .. }
            | PeerMsg::ResyncData { .. }
            | PeerMsg::ResyncDone { .. }
            | PeerMsg::VerifyStart { .. }
            | PeerMsg::VerifyRequest { .. }
            | PeerMsg::VerifyEnd { .. } => Stream::Data,
            PeerMsg::ResyncZero { .. } | PeerMsg::Ahead { .. } | PeerMsg::AheadResync { .. } => {
                Stream::Data
            }
            _ => Stream::Control,
        }
    }

    /// The data-stream sequence number, for sequenced messages.
    pub fn seq(&self) -> Option<u64> {
        match self {
            PeerMsg::Data(e) => Some(e.seq),
            PeerMsg::Barrier { seq, .. }
            | PeerMsg::ResyncData { seq, .. }
            | PeerMsg::ResyncDone { seq, .. }
            | PeerMsg::VerifyStart { seq }
            | PeerMsg::VerifyRequest { seq, .. }
            | PeerMsg::VerifyEnd { seq, .. } => Some(*seq),
            PeerMsg::ResyncZero { seq, .. }
            | PeerMsg::Ahead { seq }
            | PeerMsg::AheadResync { seq } => Some(*seq),
            _ => None,
        }
    }

    /// Does the payload match its crc32? (true for messages without payload)
    pub fn crc_ok(&self) -> bool {
        match self {
            PeerMsg::Data(e) => crc32fast::hash(&e.data) == e.crc32,
            PeerMsg::ResyncData { crc32, data, .. } => crc32fast::hash(data) == *crc32,
            _ => true,
        }
    }

    fn kind(&self) -> Kind {
        match self {
            PeerMsg::Hello(_) => Kind::Hello,
            PeerMsg::State(_) => Kind::State,
            PeerMsg::Refuse { .. } => Kind::Refuse,
            PeerMsg::PeerBitmap { .. } => Kind::PeerBitmap,
            PeerMsg::ResyncProgress { .. } => Kind::ResyncProgress,
            PeerMsg::PromoteAsk { .. } => Kind::PromoteAsk,
            PeerMsg::PromoteAnswer { .. } => Kind::PromoteAnswer,
            PeerMsg::Data(_) => Kind::Data,
            PeerMsg::Barrier { .. } => Kind::Barrier,
            PeerMsg::ResyncData { .. } => Kind::ResyncData,
            PeerMsg::ResyncDone { .. } => Kind::ResyncDone,
            PeerMsg::WriteAck { .. } => Kind::WriteAck,
            PeerMsg::BarrierAck { .. } => Kind::BarrierAck,
            PeerMsg::ResyncAck { .. } => Kind::ResyncAck,
            PeerMsg::VerifyRequest { .. } => Kind::VerifyRequest,
            PeerMsg::VerifyReply { .. } => Kind::VerifyReply,
            PeerMsg::VerifyStart { .. } => Kind::VerifyStart,
            PeerMsg::VerifyEnd { .. } => Kind::VerifyEnd,
            PeerMsg::VerifyAsk => Kind::VerifyAsk,
            PeerMsg::VerifyStop { .. } => Kind::VerifyStop,
            PeerMsg::CsumRequest { .. } => Kind::CsumRequest,
            PeerMsg::CsumReply { .. } => Kind::CsumReply,
            PeerMsg::ResyncSame { .. } => Kind::ResyncSame,
            PeerMsg::ResyncZero { .. } => Kind::ResyncZero,
            PeerMsg::Ahead { .. } => Kind::Ahead,
            PeerMsg::AheadResync { .. } => Kind::AheadResync,
        }
    }
}

fn postcard_err(e: postcard::Error) -> WireError {
    WireError::Encode(e.to_string())
}

fn postcard_body<T: Serialize>(v: &T) -> Result<Vec<u8>, WireError> {
    postcard::to_stdvec(v).map_err(postcard_err)
}

/// Encodes `msg` as a frame header plus body header, and the payload (shared, not copied)
/// separately: the transport writes `head` then `payload` (vectored) to avoid a copy.
pub fn encode_parts(msg: &PeerMsg) -> Result<(BytesMut, Bytes), WireError> {
    let mut head = BytesMut::with_capacity(HEADER_LEN + 48);
    let mut payload = Bytes::new();
    let mut body = BytesMut::new();
    match msg {
        PeerMsg::Hello(h) => body.extend_from_slice(&postcard::to_stdvec(h).map_err(postcard_err)?),
        PeerMsg::State(s) => body.extend_from_slice(&postcard::to_stdvec(s).map_err(postcard_err)?),
        PeerMsg::PromoteAsk { id } => body.extend_from_slice(OneU64 { a: (*id).into() }.as_bytes()),
        PeerMsg::PromoteAnswer { id, verdict } => {
            body.extend_from_slice(&postcard_body(&PromoteAnswerBody {
                id: *id,
                verdict: *verdict,
            })?)
        }
        PeerMsg::Refuse { code, reason } => body.extend_from_slice(
            &postcard::to_stdvec(&RefuseBody {
                code: *code,
                reason: reason.clone(),
            })
            .map_err(postcard_err)?,
        ),
        PeerMsg::PeerBitmap { runs, done } => body.extend_from_slice(
            &postcard::to_stdvec(&BitmapBody {
                runs: runs.clone(),
                done: *done,
            })
            .map_err(postcard_err)?,
        ),
        PeerMsg::ResyncProgress { total, left } => body.extend_from_slice(
            TwoU64 {
                a: (*total).into(),
                b: (*left).into(),
            }
            .as_bytes(),
        ),
        PeerMsg::ResyncDone { seq, gen } => body.extend_from_slice(
            &postcard::to_stdvec(&ResyncDoneBody {
                seq: *seq,
                gen: *gen,
            })
            .map_err(postcard_err)?,
        ),
        PeerMsg::Data(e) => {
            if e.data.len() > MAX_PAYLOAD {
                return Err(WireError::PayloadTooLong(e.data.len()));
            }
            let h = DataHeader {
                seq: e.seq.into(),
                epoch: e.epoch.into(),
                offset: e.offset.into(),
                len: e.len.into(),
                op: (e.op as u16).into(),
                _pad: 0.into(),
                flags: e.flags.into(),
                crc32: e.crc32.into(),
            };
            body.extend_from_slice(h.as_bytes());
            payload = e.data.clone();
        }
        PeerMsg::ResyncData {
            seq,
            offset,
            crc32,
            data,
        } => {
            if data.len() > MAX_PAYLOAD {
                return Err(WireError::PayloadTooLong(data.len()));
            }
            let h = ResyncHeader {
                seq: (*seq).into(),
                offset: (*offset).into(),
                len: (data.len() as u32).into(),
                crc32: (*crc32).into(),
            };
            body.extend_from_slice(h.as_bytes());
            payload = data.clone();
        }
        PeerMsg::Barrier { seq, epoch, flush } => body.extend_from_slice(
            BarrierBody {
                seq: (*seq).into(),
                epoch: (*epoch).into(),
                flags: (if *flush { BARRIER_FLUSH } else { 0 }).into(),
            }
            .as_bytes(),
        ),
        PeerMsg::WriteAck { seq, timing } => body.extend_from_slice(
            WriteAckBody {
                seq: (*seq).into(),
                receive_ns: timing.receive_ns.into(),
                queue_ns: timing.queue_ns.into(),
                disk_ns: timing.disk_ns.into(),
                ack_ns: timing.ack_ns.into(),
            }
            .as_bytes(),
        ),
        PeerMsg::BarrierAck { epoch } => {
            body.extend_from_slice(OneU64 { a: (*epoch).into() }.as_bytes())
        }
        PeerMsg::ResyncAck { offset, len } => body.extend_from_slice(
            ResyncAckBody {
                offset: (*offset).into(),
                len: (*len).into(),
            }
            .as_bytes(),
        ),
        PeerMsg::VerifyRequest {
            seq,
            offset,
            len,
            digests,
        } => body.extend_from_slice(&postcard_body(&VerifyRequestBody {
            seq: *seq,
            offset: *offset,
            len: *len,
            digests: digests.clone(),
        })?),
        PeerMsg::VerifyReply {
            offset,
            len,
            differ,
        } => body.extend_from_slice(&postcard_body(&RunsBody {
            offset: *offset,
            len: *len,
            runs: differ.clone(),
        })?),
        PeerMsg::VerifyStart { seq } => {
            body.extend_from_slice(OneU64 { a: (*seq).into() }.as_bytes())
        }
        PeerMsg::VerifyEnd { seq, aborted } => {
            body.extend_from_slice(&postcard_body(&VerifyEndBody {
                seq: *seq,
                aborted: aborted.clone(),
            })?)
        }
        PeerMsg::VerifyAsk => {}
        PeerMsg::VerifyStop { code, reason } => {
            body.extend_from_slice(&postcard_body(&VerifyStopBody {
                code: *code,
                reason: reason.clone(),
            })?)
        }
        PeerMsg::CsumRequest { offset, len } | PeerMsg::ResyncSame { offset, len } => body
            .extend_from_slice(&postcard_body(&RangeBody {
                offset: *offset,
                len: *len,
            })?),
        PeerMsg::CsumReply {
            offset,
            len,
            digests,
        } => body.extend_from_slice(&postcard_body(&DigestsBody {
            offset: *offset,
            len: *len,
            digests: digests.clone(),
        })?),
        PeerMsg::ResyncZero { seq, offset, len } => body.extend_from_slice(
            ResyncZeroBody {
                seq: (*seq).into(),
                offset: (*offset).into(),
                len: (*len).into(),
            }
            .as_bytes(),
        ),
        PeerMsg::Ahead { seq } => body.extend_from_slice(OneU64 { a: (*seq).into() }.as_bytes()),
        PeerMsg::AheadResync { seq } => {
            body.extend_from_slice(OneU64 { a: (*seq).into() }.as_bytes())
        }
    }
    let total = body.len() + payload.len();
    if total > MAX_BODY {
        return Err(WireError::TooLong(total as u64));
    }
    let fh = FrameHeader {
        magic: MAGIC.into(),
        version: VERSION.into(),
        kind: (msg.kind() as u16).into(),
        len: (total as u32).into(),
    };
    head.extend_from_slice(fh.as_bytes());
    head.extend_from_slice(&body);
    Ok((head, payload))
}

/// Encodes `msg` as one contiguous frame appended to `out`.
pub fn encode_into(msg: &PeerMsg, out: &mut BytesMut) -> Result<(), WireError> {
    let (head, payload) = encode_parts(msg)?;
    out.reserve(head.len() + payload.len());
    out.put_slice(&head);
    out.put_slice(&payload);
    Ok(())
}

/// Encodes `msg` as one contiguous frame.
pub fn encode(msg: &PeerMsg) -> Result<Bytes, WireError> {
    let mut out = BytesMut::new();
    encode_into(msg, &mut out)?;
    Ok(out.freeze())
}

fn check_header(h: &FrameHeader) -> Result<usize, WireError> {
    if h.magic.get() != MAGIC {
        return Err(WireError::BadMagic(h.magic.get()));
    }
    if h.version.get() != VERSION {
        return Err(WireError::BadVersion(h.version.get()));
    }
    let len = h.len.get() as u64;
    if len > MAX_BODY as u64 {
        return Err(WireError::TooLong(len));
    }
    Kind::from_u16(h.kind.get()).ok_or(WireError::UnknownKind(h.kind.get()))?;
    Ok(len as usize)
}

/// Where the payload of the frame that starts with `frame` begins, read from its first bytes; 0
/// for a frame without a payload, or when too few bytes are given to tell. The transport uses it
/// to assemble a large frame so that its payload lands 4096-aligned and goes to an O_DIRECT disk
/// without another copy.
pub fn payload_offset(frame: &[u8]) -> usize {
    let Ok((h, _)) = FrameHeader::read_from_prefix(frame) else {
        return 0;
    };
    match Kind::from_u16(h.kind.get()) {
        Some(Kind::Data) => HEADER_LEN + std::mem::size_of::<DataHeader>(),
        Some(Kind::ResyncData) => HEADER_LEN + std::mem::size_of::<ResyncHeader>(),
        _ => 0,
    }
}

/// Decodes one frame from the front of `buf`. Returns `Ok(None)` when more bytes are needed,
/// else the message and the number of bytes consumed. Payloads are zero-copy slices of `buf`.
pub fn decode(buf: &Bytes) -> Result<Option<(PeerMsg, usize)>, WireError> {
    let Ok((h, _)) = FrameHeader::read_from_prefix(buf) else {
        return Ok(None);
    };
    let len = check_header(&h)?;
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    let kind = Kind::from_u16(h.kind.get()).ok_or(WireError::UnknownKind(h.kind.get()))?;
    let body = buf.slice(HEADER_LEN..total);
    Ok(Some((decode_body(kind, body)?, total)))
}

fn fixed<T: FromBytes + KnownLayout + Immutable>(
    body: &[u8],
    kind: &'static str,
) -> Result<T, WireError> {
    match T::read_from_bytes(body) {
        Ok(v) => Ok(v),
        Err(_) => Err(malformed(kind, format!("body is {} bytes", body.len()))),
    }
}

fn control<'a, T: Deserialize<'a>>(body: &'a [u8], kind: &'static str) -> Result<T, WireError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(malformed(kind, format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(malformed(kind, e.to_string())),
    }
}

fn decode_body(kind: Kind, body: Bytes) -> Result<PeerMsg, WireError> {
    Ok(match kind {
        Kind::Hello => PeerMsg::Hello(control(&body, "hello")?),
        Kind::State => PeerMsg::State(control(&body, "state")?),
        Kind::Refuse => {
            let b: RefuseBody = control(&body, "refuse")?;
            PeerMsg::Refuse {
                code: b.code,
                reason: b.reason,
            }
        }
        Kind::PromoteAsk => PeerMsg::PromoteAsk {
            id: fixed::<OneU64>(&body, "promote-ask")?.a.get(),
        },
        Kind::PromoteAnswer => {
            let b: PromoteAnswerBody = control(&body, "promote-answer")?;
            PeerMsg::PromoteAnswer {
                id: b.id,
                verdict: b.verdict,
            }
        }
        Kind::PeerBitmap => {
            let b: BitmapBody = control(&body, "bitmap")?;
            PeerMsg::PeerBitmap {
                runs: b.runs,
                done: b.done,
            }
        }
        Kind::ResyncProgress => {
            let b: TwoU64 = fixed(&body, "resync-progress")?;
            PeerMsg::ResyncProgress {
                total: b.a.get(),
                left: b.b.get(),
            }
        }
        Kind::ResyncDone => {
            let b: ResyncDoneBody = control(&body, "resync-done")?;
            PeerMsg::ResyncDone {
                seq: b.seq,
                gen: b.gen,
            }
        }
        Kind::Data => {
            let Ok((h, _)) = DataHeader::read_from_prefix(&body) else {
                return Err(malformed("data", "short header"));
            };
            let hl = std::mem::size_of::<DataHeader>();
            let data = body.slice(hl..);
            let op = match h.op.get() {
                1 => DataOp::Write,
                2 => DataOp::Trim,
                3 => DataOp::Zero,
                other => return Err(malformed("data", format!("unknown op {other}"))),
            };
            let plen = data.len();
            let ok = match op {
                DataOp::Write => plen == h.len.get() as usize,
                DataOp::Trim | DataOp::Zero => plen == 0,
            };
            if !ok {
                return Err(malformed(
                    "data",
                    format!("payload {plen} bytes for len {}", h.len.get()),
                ));
            }
            PeerMsg::Data(Extent {
                seq: h.seq.get(),
                epoch: h.epoch.get(),
                offset: h.offset.get(),
                len: h.len.get(),
                op,
                flags: h.flags.get(),
                crc32: h.crc32.get(),
                data,
            })
        }
        Kind::ResyncData => {
            let Ok((h, _)) = ResyncHeader::read_from_prefix(&body) else {
                return Err(malformed("resync-data", "short header"));
            };
            let data = body.slice(std::mem::size_of::<ResyncHeader>()..);
            if data.len() != h.len.get() as usize {
                return Err(malformed(
                    "resync-data",
                    format!("payload {} bytes for len {}", data.len(), h.len.get()),
                ));
            }
            PeerMsg::ResyncData {
                seq: h.seq.get(),
                offset: h.offset.get(),
                crc32: h.crc32.get(),
                data,
            }
        }
        Kind::Barrier => {
            let b: BarrierBody = fixed(&body, "barrier")?;
            let flags = b.flags.get();
            if flags & !BARRIER_FLUSH != 0 {
                return Err(malformed("barrier", format!("unknown flags {flags:#x}")));
            }
            PeerMsg::Barrier {
                seq: b.seq.get(),
                epoch: b.epoch.get(),
                flush: flags & BARRIER_FLUSH != 0,
            }
        }
        Kind::WriteAck => {
            let b: WriteAckBody = fixed(&body, "write-ack")?;
            PeerMsg::WriteAck {
                seq: b.seq.get(),
                timing: AckTiming {
                    receive_ns: b.receive_ns.get(),
                    queue_ns: b.queue_ns.get(),
                    disk_ns: b.disk_ns.get(),
                    ack_ns: b.ack_ns.get(),
                },
            }
        }
        Kind::BarrierAck => PeerMsg::BarrierAck {
            epoch: fixed::<OneU64>(&body, "barrier-ack")?.a.get(),
        },
        Kind::ResyncAck => {
            let b: ResyncAckBody = fixed(&body, "resync-ack")?;
            PeerMsg::ResyncAck {
                offset: b.offset.get(),
                len: b.len.get(),
            }
        }
        Kind::VerifyRequest => {
            let b: VerifyRequestBody = control(&body, "verify-request")?;
            PeerMsg::VerifyRequest {
                seq: b.seq,
                offset: b.offset,
                len: b.len,
                digests: b.digests,
            }
        }
        Kind::VerifyReply => {
            let b: RunsBody = control(&body, "verify-reply")?;
            PeerMsg::VerifyReply {
                offset: b.offset,
                len: b.len,
                differ: b.runs,
            }
        }
        Kind::VerifyStart => PeerMsg::VerifyStart {
            seq: fixed::<OneU64>(&body, "verify-start")?.a.get(),
        },
        Kind::VerifyEnd => {
            let b: VerifyEndBody = control(&body, "verify-end")?;
            PeerMsg::VerifyEnd {
                seq: b.seq,
                aborted: b.aborted,
            }
        }
        Kind::VerifyAsk => {
            if !body.is_empty() {
                return Err(malformed(
                    "verify-ask",
                    format!("body is {} bytes", body.len()),
                ));
            }
            PeerMsg::VerifyAsk
        }
        Kind::VerifyStop => {
            let b: VerifyStopBody = control(&body, "verify-stop")?;
            PeerMsg::VerifyStop {
                code: b.code,
                reason: b.reason,
            }
        }
        Kind::CsumRequest => {
            let b: RangeBody = control(&body, "csum-request")?;
            PeerMsg::CsumRequest {
                offset: b.offset,
                len: b.len,
            }
        }
        Kind::CsumReply => {
            let b: DigestsBody = control(&body, "csum-reply")?;
            PeerMsg::CsumReply {
                offset: b.offset,
                len: b.len,
                digests: b.digests,
            }
        }
        Kind::ResyncSame => {
            let b: RangeBody = control(&body, "resync-same")?;
            PeerMsg::ResyncSame {
                offset: b.offset,
                len: b.len,
            }
        }
        Kind::ResyncZero => {
            let b: ResyncZeroBody = fixed(&body, "resync-zero")?;
            PeerMsg::ResyncZero {
                seq: b.seq.get(),
                offset: b.offset.get(),
                len: b.len.get(),
            }
        }
        Kind::Ahead => PeerMsg::Ahead {
            seq: fixed::<OneU64>(&body, "ahead")?.a.get(),
        },
        Kind::AheadResync => PeerMsg::AheadResync {
            seq: fixed::<OneU64>(&body, "ahead-resync")?.a.get(),
        },
    })
}

#[cfg(test)]
mod tests;
