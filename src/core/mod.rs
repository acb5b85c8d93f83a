//! The sans-IO replication core: one [`Replica`] per resource and node. No I/O, no clocks, no
//! tokio: the driver (node.rs) feeds it [`Event`]s and executes the [`Action`]s it returns.
//!
//! # Driver contract
//!
//! ```text
//! let mut r = Replica::new(config, meta_loaded_from_disk);
//! loop { let ev = next_event(); out.clear(); r.handle(ev, now_nanos, &mut out); execute(&out) }
//! ```
//!
//! * Execute actions **in order**. [`Action::SaveMeta`] must be durable before any later action of
//!   the same batch runs (it guards e.g. "Inconsistent" before resync data touches the disk).
//! * Every `Disk*` action carries an [`IoId`]; report exactly one [`Event::DiskDone`] for it, with
//!   `Ok(Some(bytes))` for a `DiskRead`, `Ok(None)` otherwise, `Err(errno)` on failure. Disk actions
//!   of one batch may run concurrently; the core never emits two overlapping writes at once.
//! * `DiskWrite`/`DiskTrim`/`DiskZero` complete when the data is written (in the device's cache);
//!   with `fua: true` when it is stable. `DiskZero` must leave the range reading zeroes (a client
//!   TRIM runs as it on both nodes, so the replicas stay identical); `DiskTrim` may leave
//!   anything there and is never emitted for replicated data. `DiskFlush` completes when everything completed before it
//!   was issued is stable.
//! * [`Action::Send`] messages go to the peer of the *current* connection, on the stream
//!   [`PeerMsg::stream`] names: control messages in order on one stream; data messages may use
//!   several streams (the receiver restores their order by `seq`). If the connection is gone,
//!   drop them.
//! * Connections: when the transport has a connection, send [`Event::ConnectionUp`] with a fresh
//!   id; deliver decoded messages as [`Event::Peer`] with that id; report its loss with
//!   [`Event::ConnectionDown`]. After [`Action::CloseConnection`] close the connection it names;
//!   the core already treats it as gone (a later `ConnectionDown` for it is ignored). Only connect
//!   while [`Status::want_connection`] is true (then retry with backoff). Events for a connection
//!   id that is not the current one are ignored, so stale deliveries are harmless.
//! * [`Action::ArmTimer`]: deliver [`Event::Timer`] with that kind at (or after) `at` nanos.
//!   Re-arming replaces nothing: stale timers are recognised and ignored by the core.
//! * [`Action::CompleteClient`]: answer the client request (`Err(errno)` as the NBD error).
//! * [`Action::ServeRead`]: read `len` bytes at `offset` from the local disk and answer the client
//!   directly (the core only decides that this node may serve reads).
//! * [`Action::Emit`]: one structured state change for logs, `status` and the events stream.
//! * [`Action::AdminDone`]: the answer to an [`Event::Admin`] with the same tag.
//! * [`Action::SaveBitmap`]: persist into the metadata area, durable before any later action of
//!   the batch.
//! * [`Action::SaveActivityLog`] `{ io, extents }`: an activity-log transaction, executed in the
//!   background (not blocking other events): first make every data write completed so far
//!   stable (flush the data device, DRBD's pre-flush: an extent leaves the log only when
//!   nothing is in flight in it, and its data must then survive a crash), then write the
//!   transaction durably, then report [`Event::DiskDone`] for `io` (`Ok(None)`, or `Err(errno)`
//!   if either step failed: the writes waiting for it fail and the disk is failed,
//!   [`FailedIo::ActivityLog`]; never exit instead, see [`Handover`]). At most one is in
//!   flight (group commit: writes missing the log meanwhile wait in the core and share the
//!   next one); the writes it covers are issued
//!   only after its `DiskDone`. A crash before that = the transaction did not happen. The
//!   [`Action::SaveBitmap`]s before it in the batch (evicted extents) are durable before it.
//!   Start a restarted node with [`Replica::restore`] from what was persisted.
//! * [`Action::SyncData`]: make every *completed* data write stable now (fdatasync the data
//!   device), before any later action of the batch runs (the same flush as the activity log's
//!   pre-flush, without a transaction).
//! * Graceful stop (`twinblk down`): stop the clients (answer every request), then send
//!   [`Event::Stop`] and go on executing actions until [`Action::Stopped`]; then close the
//!   transport and exit. The persisting is already done by the actions before it.
//! * [`Action::FencePeer`]: run the fence (`on-peer-lost` hook) and report its exit as
//!   [`Event::Fenced`] with the same episode. The core decides when to ask, what a failure
//!   means and when to ask again.
//!
//! # What the core guarantees
//!
//! * Its own consistency: [`Replica::check_invariants`] holds after every event (checked by
//!   `handle` in debug builds, so at every simulator step), and role, disk and replication
//!   state change only along the tables in `legal_disk_change` / `legal_repl_change`.
//! * protocol `Sync` (DRBD C): a write completes once it is on the local disk and the peer acked it
//!   on its disk (with FUA/FLUSH: stable there). If the connection is lost, waiting writes complete
//!   once the loss is reported, and their regions go to the dirty bitmap.
//! * A connection loss with writes the peer may lack (the transfer log: acknowledged, or
//!   completed by the loss) starts a new data generation, saved before those completions go
//!   out ([`gen`]: a stale peer promoted meanwhile cannot look like the newer side).
//! * A demotion ([`AdminCmd::Demote`]) of a connected Primary answers only once the peer made
//!   every write this node sent stable (a flush barrier, acked); the role change goes to the
//!   peer only then, so it cannot overtake the data. Meanwhile new writes fail with `EPERM`; a
//!   connection loss fails the demotion (still Primary). Every demotion makes this disk's
//!   completed writes stable ([`Action::SyncData`]) before saving "not Primary". A promotion is
//!   refused while the former Primary's data is still arriving or landing.
//! * A promotion ([`AdminCmd::Promote`]) of a node connected past the handshake is agreed with
//!   the peer (DRBD 9's two-phase state change): it asks ([`PeerMsg::PromoteAsk`]) and commits
//!   only on the peer's yes, which the peer gives only if it is not Primary and has no ask of
//!   its own pending. The peer cannot become Primary after its yes before it hears this node's
//!   new role (its own promotion must ask this node, which refuses while Primary or asking), so
//!   two connected nodes are never both Primary, and a role change still on its way (a stale
//!   view of the peer) refuses cleanly instead of making a false split-brain report. Of two
//!   asks that cross, the lower node id's goes ahead and the other node's `primary` fails
//!   ([`AdminError::PromotionConflict`], see `answer_promotion`); a connection loss before the
//!   answer fails the promotion (still Secondary). A node not connected, or still handshaking
//!   (the promotion restarts the handshake, which compares roles), promotes on its own.
//! * protocol `Async` (DRBD A): a write completes once local and queued; the bytes sent but not
//!   acked by the peer are bounded by `send_buffer` (new writes wait for room: back-pressure).
//!   With `on-congestion = pull-ahead` ([`Config::congestion`]) the Primary instead goes Ahead
//!   once the unacked bytes pass `congestion-fill`: new writes are marked in the bitmap, not
//!   shipped, and the peer is Behind (Outdated; [`PeerMsg::Ahead`], in data order). When
//!   everything shipped before is acked, a bitmap resync starts on the live connection
//!   ([`PeerMsg::AheadResync`]: Ahead -> SyncSource -> Established). Going Ahead starts a new
//!   data generation, exactly as writing while disconnected does, so a crash or disconnect while
//!   Ahead is handled by the normal handshake rules.
//! * Resync pace: [`ratectl::RateController`] (the `c-*` settings, [`Config::resync_rate`])
//!   bounds the resync bytes in flight and its rate, and backs off to `c-min-rate` while
//!   application I/O is active ([`TimerKind::Resync`] wakes a rate-limited resync).
//! * A resync chunk that reads as all zeroes travels as [`PeerMsg::ResyncZero`] (no payload);
//!   the target executes it as [`Action::DiskZero`].
//! * An interrupted resync resumes where it stopped, after a disconnect or a crash of either
//!   node: the source clears a bit only once the block is stable on the target (acked as
//!   written, then covered by a flush barrier the target acked; `resync::ResyncSource` asks for
//!   one every `stability_bytes` of such data), the target clears its own bit when it wrote the
//!   block, so the next handshake's bitmaps name only what is left, plus at most
//!   `stability_bytes` a target crash may have taken back. The target saves
//!   [`Meta::resync_resumable`] once the source showed it marked everything the target lacks
//!   (the first `ResyncProgress`; until then `bitmap_known` is false and a restart means a full
//!   resync). A cut just as the resync ends (after `ResyncDone`, before the target applied
//!   it) resumes too: the source keeps the end ([`ResyncEnd`], persisted, in its `Hello`)
//!   until the target confirms it, and the handshake reads a target still at its old
//!   generation as at the one sent (rule 0 in [`gen`]). Every promotion first makes the
//!   acked peer and resync writes stable ([`Action::SyncData`]): a new Primary never serves
//!   data a crash could take back.
//! * Write order: a new epoch starts when a write is submitted after a write completed, and at
//!   every FLUSH. Two kinds of barrier close an epoch:
//!   - an *order barrier* (a plain epoch boundary) is not even sent. Sync: a write completes
//!     only once the peer acked it as written, so every write a later one could depend on is
//!     on the peer before that later one is submitted. Async: the peer issues writes in seq
//!     order from a contiguous prefix (its reorder buffer), never a later epoch's write past
//!     one still waiting for an overlapping write (a connection loss would drop the waiting
//!     one and keep its dependant; simulator seed 16161), so once its writes in flight
//!     complete it holds a prefix of the write sequence, which is a state the Primary's disk
//!     could have crashed in (epoch k complete, epoch k+1 partly). Both: the peer keeps
//!     overlapping writes in seq order. (Writes completed early by a connection loss are not
//!     on that connection any more: they are in the transfer log, hence the bitmap, and
//!     resynced.) A peer still accepts order barriers from an older build and drains them.
//!   - a *flush barrier* (client FLUSH, or a stability point the Primary issues on its own
//!     every `Config::stability_interval` or `stability_writes` / `stability_bytes`) is
//!     drained, flushed and acked ([`PeerMsg::BarrierAck`]) by the peer. Only its ack trims
//!     the transfer log.
//!
//!   So on the peer, order costs no fdatasync; stability costs one per flush barrier.
//!   Overlapping writes are applied in submission order on both nodes.
//! * A crashed Secondary holds what a local disk holds after power loss: everything before its
//!   last flush barrier, plus any subset of later writes. The Primary's transfer log names
//!   every write not yet known stable there.
//! * Every written region not known stable on the peer (sent, not flush-barrier-acked; or
//!   written while disconnected) is in the dirty bitmap once the connection is lost;
//!   reconnecting resyncs it (or everything when the bitmap cannot be trusted) before the peer
//!   is UpToDate again.
//! * Handshake: both sides send [`Hello`] and apply the same [`gen::decide`]: no sync, bitmap or
//!   full resync (which side is source), or refusal (other resource, other size, two Primaries,
//!   split brain) with a reason in [`Status::last_refusal`] and [`StateChange::Refused`].
//!   A bitmap resync copies the union of both bitmaps (the target sends its own first,
//!   [`PeerMsg::PeerBitmap`]). The rules are a table in `gen.rs` and docs/generations.md.
//! * Split brain is detected on both nodes, never resolved without `connect --discard-my-data`
//!   ([`AdminCmd::DiscardMyData`]) or a policy both nodes share (`Config::after_sb_0pri`,
//!   `after_sb_1pri`); [`Status::split_brain`] explains it and names the commands.
//! * Crash safety of the bitmap: an extent leaves the activity log only with nothing in flight
//!   and nothing in it the peer has not made stable (flush-barrier acked), after its bitmap words are persisted. So after a crash, the
//!   persisted bitmap plus (crashed Primary) the log's extents cover every block this node
//!   changed that the peer may lack ([`Replica::restore`]). A write to an extent the log does
//!   not name waits for a durable transaction naming it (group commit, at most one in flight);
//!   writes to named extents never wait for the log. With [`Config::al_updates`] off there are
//!   no transactions: the metadata says so while Primary ([`Meta::no_activity_log`]), and a
//!   crashed Primary restarts with the whole device dirty.
//! * A local write error on the Primary fails that request (with its errno: ENOSPC for a full
//!   disk) and, if connected, reconnects so the region is resynced. A failed write of the
//!   peer's data (replicated or resync) detaches this node's disk ([`DiskFailure`], DRBD's
//!   `on-io-error detach`): Inconsistent, the connection closed and not retried until the node
//!   is restarted, the failure in [`Status::disk_failure`]; the peer's writes waiting for it
//!   complete once the loss is reported (they are on the peer's disk and in its bitmap).
//! * Fencing ([`Config::fencing`], `on-peer-lost`): when the transport reports the loss of a
//!   connection past its handshake on which the peer was UpToDate, a Primary freezes: the writes waiting for the
//!   peer are not answered and no new write starts (reads are served) until [`Event::Fenced`]
//!   says the peer is fenced, the peer connects again (the handshake then compares
//!   generations), or the operator runs `disconnect`. The loss itself is processed at once
//!   (the transfer log goes to the bitmap), so a stop or crash during the freeze forgets
//!   nothing. A failed fence is asked again after [`Config::fence_retry`]. A Primary that gave
//!   its own failed disk up (its peer held everything) neither freezes nor fences: the peer is
//!   the good copy to promote, and the writes still waiting for it fail (EIO). In async that
//!   peer may still lack writes the Primary completed: it first hands them over ([`Handover`]:
//!   the connection stays until the peer made everything sent stable, or
//!   [`Config::stop_drain`]).
//! * Graceful stop ([`Event::Stop`]): no new connection or request is accepted; a stability
//!   point goes out at once, and the stop waits until the local I/O is done and the peer acked
//!   and made stable everything it was sent, or the connection is lost, or
//!   [`Config::stop_drain`] passes. Then, in this order: the connection is closed (the transfer
//!   log lands in the bitmap), the data device is synced ([`Action::SyncData`]), every bitmap
//!   word is saved, and only then the metadata stops saying Primary: a crash at any point in
//!   between restarts as a crashed Primary whose activity log covers what the bitmap may miss.
//!   If local writes are still in flight when the drain ends, "not Primary" is never saved
//!   (the activity log stays in force); [`StopOutcome`] says which. The writes the peer lacks
//!   are resynced from this node's bitmap after the restart (handshake rule 5: same
//!   generation, only this side changed).
//! * Promotion connects again after a refusal (e.g. no UpToDate node before the first
//!   `primary --force`), unless the operator said `disconnect`.
//!
//! # Not yet here
//!
//! * Verify keeps at most `c-fill-target` bytes of requests in flight, but is not paced by
//!   `c-max-rate` or `c-min-rate` as a resync is.

pub mod activity;
pub mod bitmap;
pub mod congestion;
pub mod csums;
pub mod digest;
pub mod gen;
pub mod ratectl;
mod reason;
pub mod resync;
pub mod verify;

use crate::idmap::{IdMap, IdSet};
use std::collections::{BTreeMap, VecDeque};

pub use reason::{
    AdminError, AdminErrorCode, ClientsCommand, CloseReason, ConnLoss, LinkLoss, Refusal,
    SplitBrainCause, VerifyAbort, VerifyRefusal, Violation,
};

use bytes::Bytes;

pub use crate::wire::PromoteVerdict;
pub use crate::wire::{
    AckTiming, AfterSb0Pri, AfterSb1Pri, DataOp, DiskState, Extent, Hello, PeerMsg, PeerState,
    RefusalCode, ResyncEnd, Role, VerifyAbortCode, VerifyAborted, FLAG_FUA,
};
use activity::ActivityLog;
use bitmap::{Bitmap, BLOCK};
use congestion::{Admission, Congestion};
use gen::Decision;
use ratectl::RateConfig;
use resync::{Next, Progress, ResyncSource};

/// Identifies a client request (chosen by the driver, unique among requests in flight).
pub type ReqId = u64;
/// Identifies one local disk operation (chosen by the core).
pub type IoId = u64;

const EPERM: i32 = libc::EPERM;
const EINVAL: i32 = libc::EINVAL;
const EIO: i32 = libc::EIO;

/// Replication protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// DRBD C: done when both disks have it.
    Sync,
    /// DRBD A: done when the local disk has it and it is queued for the peer.
    Async,
}

/// Deliberate bugs, for tests proving the simulator's invariant checks can fail. Never set this
/// outside tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InjectedBug {
    #[default]
    None,
    /// Sync writes complete without waiting for the peer's ack.
    AckWithoutPeer,
    /// Regions in flight at a disconnect are not marked dirty.
    ForgetInFlightOnDisconnect,
    /// A split brain is resolved silently: the Primary (else the higher node id) syncs to the
    /// other.
    ResolveSplitBrainSilently,
    /// A crashed Primary's activity log is not added to its bitmap at restart.
    IgnoreActivityLogOnRestore,
    /// A promotion does not make the acked peer and resync writes stable first.
    NoSyncAtPromotion,
    /// A failed client FLUSH only fails that request (the old behaviour): the Primary goes on
    /// with a disk that lost writes its peer has, and nothing marks them.
    FlushFailureIgnored,
    /// The sync source keeps no [`ResyncEnd`] when it sends `ResyncDone` (the old behaviour):
    /// a cut before the target applied the end costs a full resync.
    ForgetTargetAtResyncEnd,
    /// The sync source keeps the disk state its target's hello said (UpToDate, the old
    /// behaviour) until the target's next State: during the resync it reports the peer's disk
    /// as UpToDate while the target says Inconsistent (issue 17, defect 8).
    SourceSeesTargetUpToDate,
    /// A replicated TRIM is executed as a discard ([`Action::DiskTrim`]) on each node, whose
    /// contents afterwards each device chooses (the old behaviour: the replicas differ).
    TrimDiverges,
    /// A connection loss that completes (or leaves acknowledged) writes the peer may lack does
    /// not move the generation; only the next unreplicated write does (issue 17, defect 1).
    NoGenerationAtLoss,
    /// A demotion goes through at once (the role change overtakes the tail on the control
    /// stream), and a promotion does not wait for the former Primary's data still arriving
    /// (issue 17, defect 3).
    DemoteWithoutPeer,
    /// A graceful stop forgets the transfer log (writes sent but not stable on the peer) instead
    /// of adding it to the bitmap (issue 17, defect 2).
    StopDropsTransferLog,
    /// A graceful stop saves "not Primary" before the bitmap (issue 17, defect 2): a crash
    /// between the two loses the bits only the activity log covered.
    StopSavesMetaBeforeBitmap,
    /// A Primary that lost its UpToDate peer with fencing configured completes the waiting
    /// writes at once instead of freezing until the peer is fenced.
    NoFreezeOnPeerLost,
    /// A connection the core closes itself (a crc error, a local write error, a protocol
    /// violation) never starts the fencing hold, only a loss the transport reports does (the
    /// old behaviour): the waiting writes are acknowledged before the peer is fenced.
    NoFenceOnCoreClose,
    /// A failed write of the peer's data makes the disk Inconsistent and reconnects at once
    /// (the old behaviour) instead of detaching it: with a full disk, a resync into it, a
    /// failure and a reconnect, about three times a second for as long as it stays full.
    ReconnectAfterPeerWriteError,
    /// `primary` on a connected node commits on this node's own view of the peer (the old
    /// behaviour), without asking the peer: a State (Primary) still on its way then makes a
    /// false "both nodes are Primary" refusal (simulator sync seed 7162, flush faults on).
    PromoteWithoutAsking,
    /// `adjust` answers Ok and applies nothing: the node keeps its old settings (a turned-on
    /// `on-peer-lost` never freezes).
    AdjustIgnored,
    /// A successful fence does not end the freeze: the Primary stays frozen though the peer is
    /// fenced (with STONITH, dead) until it connects again.
    FenceSuccessIgnored,
    /// Promotions asked at the same moment are both refused (the old rule) instead of the
    /// lower node id's going ahead: `primary` on both nodes at once promotes neither.
    CrossingPromotionsBothRefused,
    /// A node whose own promotion waits says yes to the peer's and keeps its own: both
    /// commit, two connected Primaries.
    YesWhilePromoting,
    /// A Secondary issues a flush barrier's flush while the peer's writes before it are still
    /// in flight (it skips the drain): the barrier's ack vouches for writes its flush did not
    /// cover, and the Primary forgets them.
    FlushBarrierBeforeItsWrites,
    /// A Primary whose own disk failed while its peer held everything (it gave its disk up)
    /// freezes and fences that peer on the connection loss that follows, and completes the
    /// writes still waiting for the peer's ack (the old behaviour): the fence takes the only
    /// good copy, and the writes may be on the given-up disk only.
    FenceAfterOwnDiskFailed,
    /// `primary` during the connection's handshake promotes at once (the old behaviour) and
    /// restarts the handshake, instead of waiting for its outcome: a node whose peer, a moment
    /// from its hello, holds acknowledged writes it lacks becomes Primary without them.
    PromoteDuringHandshake,
    /// An async Primary whose disk failed while its peer was UpToDate hangs up at once (the old
    /// behaviour) instead of handing over: the writes it acknowledged (completed locally, FUA
    /// or flushed ones included) that were still on their way to the peer are lost when the
    /// peer is promoted, as the failure's message tells the operator to do.
    HangUpOnDiskFailure,
    /// A handshake that finds nothing to resync leaves a node it read at a cut resync's end
    /// (rule 0) as it was (the old behaviour): a target that was Outdated stays Outdated at
    /// the old generation while Established, so a failover needs `--force`.
    NoSyncIgnoresResyncEnd,
    /// `connect --discard-my-data` during a handshake is accepted (the old behaviour): the
    /// hello already sent lacks it, and the decision clears it unapplied.
    DiscardDuringHandshake,
}

impl InjectedBug {
    /// Every variant, for replaying a seed by name (`TWINBLK_SIM_BUG`). `position` matches
    /// exhaustively, so a new variant is a compile error there until it is listed here too.
    pub const ALL: [InjectedBug; 28] = {
        use InjectedBug::*;
        [
            None,
            AckWithoutPeer,
            ForgetInFlightOnDisconnect,
            ResolveSplitBrainSilently,
            IgnoreActivityLogOnRestore,
            NoSyncAtPromotion,
            FlushFailureIgnored,
            ForgetTargetAtResyncEnd,
            SourceSeesTargetUpToDate,
            TrimDiverges,
            NoGenerationAtLoss,
            DemoteWithoutPeer,
            StopDropsTransferLog,
            StopSavesMetaBeforeBitmap,
            NoFreezeOnPeerLost,
            NoFenceOnCoreClose,
            ReconnectAfterPeerWriteError,
            PromoteWithoutAsking,
            AdjustIgnored,
            FenceSuccessIgnored,
            CrossingPromotionsBothRefused,
            YesWhilePromoting,
            FlushBarrierBeforeItsWrites,
            FenceAfterOwnDiskFailed,
            PromoteDuringHandshake,
            HangUpOnDiskFailure,
            NoSyncIgnoresResyncEnd,
            DiscardDuringHandshake,
        ]
    };

    /// This variant's index in [`InjectedBug::ALL`].
    pub const fn position(self) -> usize {
        use InjectedBug::*;
        match self {
            None => 0,
            AckWithoutPeer => 1,
            ForgetInFlightOnDisconnect => 2,
            ResolveSplitBrainSilently => 3,
            IgnoreActivityLogOnRestore => 4,
            NoSyncAtPromotion => 5,
            FlushFailureIgnored => 6,
            ForgetTargetAtResyncEnd => 7,
            SourceSeesTargetUpToDate => 8,
            TrimDiverges => 9,
            NoGenerationAtLoss => 10,
            DemoteWithoutPeer => 11,
            StopDropsTransferLog => 12,
            StopSavesMetaBeforeBitmap => 13,
            NoFreezeOnPeerLost => 14,
            NoFenceOnCoreClose => 15,
            ReconnectAfterPeerWriteError => 16,
            PromoteWithoutAsking => 17,
            AdjustIgnored => 18,
            FenceSuccessIgnored => 19,
            CrossingPromotionsBothRefused => 20,
            YesWhilePromoting => 21,
            FlushBarrierBeforeItsWrites => 22,
            FenceAfterOwnDiskFailed => 23,
            PromoteDuringHandshake => 24,
            HangUpOnDiskFailure => 25,
            NoSyncIgnoresResyncEnd => 26,
            DiscardDuringHandshake => 27,
        }
    }

    /// The variant named `name` (its Rust name, as `Debug` prints it).
    pub fn from_name(name: &str) -> Option<InjectedBug> {
        InjectedBug::ALL
            .into_iter()
            .find(|b| format!("{b:?}") == name)
    }
}

/// What a Primary does when it loses a connection on which the peer was UpToDate (resource key
/// `on-peer-lost`, DRBD's `fencing resource-and-stonith`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fencing {
    /// Go on alone at once: the writes waiting for the peer complete, new ones are marked in
    /// the bitmap.
    #[default]
    Off,
    /// Freeze: no write completes or starts (reads are served) until the driver reports the
    /// peer fenced ([`Action::FencePeer`], [`Event::Fenced`]), the peer connects again, or the
    /// operator disconnects.
    FreezeUntilFenced,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub resource: String,
    pub node_id: u64,
    /// Device size in bytes (both nodes must agree).
    pub size: u64,
    pub protocol: Protocol,
    /// Async: bytes sent but not yet acked by the peer before new writes wait.
    pub send_buffer: u64,
    /// Resync request size in bytes.
    pub resync_chunk: u64,
    /// The resync rate controller's settings (`c-max-rate`, `c-fill-target`, `c-plan-ahead`,
    /// `c-min-rate`).
    pub resync_rate: RateConfig,
    /// Async only: block or pull ahead when the send buffer fills (`on-congestion`,
    /// `congestion-fill`).
    pub congestion: Congestion,
    /// How long a handshake may take before the connection is closed, in nanoseconds.
    pub handshake_timeout: u64,
    /// Bytes per bitmap bit (set at `create-md`).
    pub bitmap_block: u64,
    /// Activity-log size in extents of [`Config::al_extent`] bytes: a crashed Primary resyncs
    /// at most this many extents.
    pub al_extents: usize,
    /// Bytes per activity-log extent: [`AL_EXTENT`]; smaller only in tests (the simulator's
    /// devices are a few hundred KiB).
    pub al_extent: u64,
    /// Activity-log transactions (resource key `al-updates`, DRBD's name; default true). Off:
    /// no transaction ever, and a Primary that crashes resyncs the whole device (its metadata
    /// says so: [`Meta::no_activity_log`]).
    pub al_updates: bool,
    /// Checksum-based resync ([`csums`]): the target's digests first, data only where they
    /// differ (resource key `csums`).
    pub csums: bool,
    /// Stability point: at most this long (nanoseconds) after a write is sent, the Primary
    /// sends a flush barrier of its own, so the peer makes it stable and the transfer log and
    /// activity log let go of it. Default 100 ms.
    pub stability_interval: u64,
    /// Stability point: also once this many writes were sent since the last flush barrier.
    /// Default 4096.
    pub stability_writes: usize,
    /// Stability point: also once this many payload bytes were sent since the last flush
    /// barrier. A resync source likewise asks for a flush (a tagged one) once this many resync
    /// bytes are acked and not yet stable: at most this much is sent again after a crash of
    /// the target. Default 64 MiB.
    pub stability_bytes: u64,
    /// Split-brain policy when neither node is Primary (both nodes must agree).
    pub after_sb_0pri: AfterSb0Pri,
    /// Split-brain policy when one node is Primary (both nodes must agree).
    pub after_sb_1pri: AfterSb1Pri,
    /// The nodes' names by node id (`node_names[id - 1]`), for the commands in a split-brain
    /// report; a node without one is called `node ID`.
    pub node_names: Vec<String>,
    /// A graceful stop ([`Event::Stop`], `twinblk down`) waits at most this long (nanoseconds)
    /// for the peer to ack and make stable everything it was sent. Default 30 s.
    pub stop_drain: u64,
    /// See [`Fencing`].
    pub fencing: Fencing,
    /// After a failed fence ([`Event::Fenced`] with an error), ask again after this long
    /// (nanoseconds). Default 5 s.
    pub fence_retry: u64,
    #[doc(hidden)]
    pub bug: InjectedBug,
}

impl Config {
    pub fn new(resource: &str, node_id: u64, size: u64, protocol: Protocol) -> Config {
        Config {
            resource: resource.to_owned(),
            node_id,
            size,
            protocol,
            send_buffer: 8 << 20,
            resync_chunk: 256 << 10,
            resync_rate: RateConfig::default(),
            congestion: Congestion::default(),
            handshake_timeout: 10_000_000_000,
            bitmap_block: BLOCK,
            al_extents: 1024,
            al_extent: AL_EXTENT,
            al_updates: true,
            csums: false,
            stability_interval: 100_000_000,
            stability_writes: 4096,
            stability_bytes: 64 << 20,
            after_sb_0pri: AfterSb0Pri::Disconnect,
            after_sb_1pri: AfterSb1Pri::Disconnect,
            node_names: Vec::new(),
            stop_drain: 30_000_000_000,
            fencing: Fencing::Off,
            fence_retry: 5_000_000_000,
            bug: InjectedBug::None,
        }
    }
}

/// What the driver persists for the core ([`Action::SaveMeta`]) and hands back to
/// [`Replica::new`] after a restart. meta/ stores it in the superblock (serialized with postcard,
/// so a new field needs a new metadata format version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    pub current_gen: u64,
    pub bitmap_gen: Option<u64>,
    /// The generations before `bitmap_gen`, newest first (DRBD's history ids; 0 = none): they
    /// let a handshake recognise a peer that is a generation or two behind.
    pub history: [u64; 2],
    pub disk: DiskState,
    /// The node was Primary when this was saved: after a restart it counts as a crashed primary.
    pub primary: bool,
    /// The node was Primary without activity-log updates (`al-updates = false`): after a crash
    /// the whole device is dirty. Not in the postcard bytes: meta/ stores it as a flag after
    /// them, so superblocks written before it existed read as `false`.
    #[serde(skip)]
    pub no_activity_log: bool,
    /// An Inconsistent resync target whose source had marked (persisted) every block this disk
    /// lacks before the crash: its bits are cleared only once the target has the block stable,
    /// so a restart resumes the resync from the bitmaps instead of starting over. Stored as a
    /// flag like `no_activity_log`; an older build reads it as absent (a full resync: safe).
    #[serde(skip)]
    pub resync_resumable: bool,
    /// A sync source's resync end its target has not confirmed ([`ResyncEnd`]): after a cut,
    /// the next handshake resumes from the bitmaps even if the target never applied it. Stored
    /// after the flags like them; an older build ignores it (a full resync: safe).
    #[serde(skip)]
    pub resync_end: Option<ResyncEnd>,
}

impl Meta {
    /// Metadata of a freshly created device: no data generation yet, Inconsistent.
    pub fn new_device() -> Meta {
        Meta {
            current_gen: 0,
            bitmap_gen: None,
            history: [0; 2],
            disk: DiskState::Inconsistent,
            primary: false,
            no_activity_log: false,
            resync_resumable: false,
            resync_end: None,
        }
    }
}

/// Bytes covered by one activity-log extent.
pub const AL_EXTENT: u64 = 4 << 20;

/// Everything the metadata area holds, handed to [`Replica::restore`] after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub meta: Meta,
    /// The on-disk bitmap as [`Bitmap`] words: bit `i` of word `w` is block `64 * w + i`
    /// (blocks of [`Config::bitmap_block`] bytes). Shorter than needed = the rest is clean.
    pub bitmap: Vec<u64>,
    /// Extent numbers (of [`Config::al_extent`] bytes) named by the last activity-log
    /// transaction.
    pub activity_log: Vec<u64>,
}

/// Which I/O of this node's disk failed (see [`DiskFailure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedIo {
    /// A client's FLUSH on the Primary.
    Client,
    /// A flush barrier from the peer (its writes were to become stable here).
    PeerBarrier,
    /// The flush that ends a resync on its target.
    ResyncEnd,
    /// A write of the peer's data (replicated or resync) on this node, at `offset`.
    PeerWrite { offset: u64 },
    /// An activity-log transaction on the Primary: the flush of the data written so far that
    /// comes before it, or its write to the metadata (the driver reports either as one error).
    ActivityLog,
}

impl FailedIo {
    /// A failed flush may have lost writes that were already acknowledged (Linux reports a
    /// write-back error once); a failed write lost only itself, which was never acked.
    fn loses_acked_writes(self) -> bool {
        !matches!(self, FailedIo::PeerWrite { .. })
    }
}

impl std::fmt::Display for FailedIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailedIo::Client => f.write_str("a client FLUSH"),
            FailedIo::PeerBarrier => f.write_str("a flush barrier from the peer"),
            FailedIo::ResyncEnd => f.write_str("the flush ending a resync"),
            FailedIo::ActivityLog => f.write_str(
                "an activity-log transaction (the data flush before it, or its metadata write)",
            ),
            FailedIo::PeerWrite { offset } => {
                write!(f, "a write of the peer's data at offset {offset}")
            }
        }
    }
}

/// An I/O of this node's disk failed; the node stops using the disk until it is restarted:
/// DRBD's `on-io-error detach`, without a diskless mode.
///
/// A failed flush: writes it should have made stable may be lost there (Linux reports a
/// write-back error once, and the disk layer keeps failing every later flush, see
/// `disk/flush.rs`). If the peer held everything (connected, UpToDate), or this node is
/// Secondary, this disk became Inconsistent and the peer is the sync source for all of it;
/// otherwise (a Primary without an UpToDate peer) this disk is still the best copy: it keeps its
/// state, every block is marked (the next resync from it is full, so both end up the same), and
/// the restart treats it as after a crash.
///
/// A failed write of the peer's data (a full disk: ENOSPC, or EIO): this disk is Inconsistent;
/// the peer never got an ack for that write, so its bitmap names it, and the resync after the
/// restart is by bitmap as before. Reconnecting at once (the old behaviour) resynced into the
/// same full disk and failed again, about three handshakes a second for as long as it stayed
/// full (measured: 5,489 in 30 minutes, 12 MB of log on the full node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFailure {
    pub io: FailedIo,
    pub errno: i32,
}

impl std::fmt::Display for DiskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let error = std::io::Error::from_raw_os_error(self.errno);
        if self.io.loses_acked_writes() {
            let fix = if self.errno == libc::ENOSPC {
                "Free space where the disk and its metadata live"
            } else {
                "Check the backing device"
            };
            write!(
                f,
                "{} failed on this node's disk ({error}): writes it covered may be lost \
                 there; this node stopped using the disk. {fix}, then restart the node \
                 (`twinblk down` and `up`); if the peer is UpToDate, promote the peer \
                 meanwhile",
                self.io
            )
        } else {
            let fix = if self.errno == libc::ENOSPC {
                "free space on the file system of the backing file"
            } else {
                "check the backing device"
            };
            write!(
                f,
                "{} failed on this node's disk ({error}): this node stopped using the disk \
                 (Inconsistent; the peer has the data). {fix}, then restart the node \
                 (`twinblk down` and `up`): it resyncs from the peer",
                self.io
            )
        }
    }
}

/// Replication (connection) state, DRBD vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplState {
    /// Not connected and not trying to (administratively, or after a refusal).
    StandAlone,
    /// Trying to connect, or handshaking.
    Connecting,
    Established,
    SyncSource,
    SyncTarget,
    /// Pull-ahead (async, congested link): writes are marked in the bitmap, not shipped.
    Ahead,
    /// The peer of an Ahead node: this disk is Outdated until the resync that follows.
    Behind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCmd {
    /// Become Primary. `force` allows an Inconsistent/Outdated disk (first promotion).
    Promote {
        force: bool,
    },
    Demote,
    Connect,
    Disconnect,
    /// `twinblk invalidate`: this node's data is thrown away; it becomes a full sync target (at
    /// once if connected, else at the next connect). Refused on a Primary.
    Invalidate,
    /// `connect --discard-my-data`: on the next split brain, this node becomes the sync target
    /// (send `Connect` after it).
    DiscardMyData,
    /// `twinblk verify`: compare both disks online (see [`verify`]).
    Verify,
    /// `twinblk adjust`: the settings the core reads that may change while it runs (all
    /// applied, or none: see [`Adjustable`]).
    Adjust(Adjustable),
    /// `twinblk down`, asked before the driver stops its frontend: `Ok` means it may (then
    /// [`Event::Stop`] follows); refused while frontend clients have the device open
    /// ([`AdminError::ClientsOpen`]).
    Down,
}

/// The settings `twinblk adjust` changes in a running core. Each takes effect at a point where
/// the core reads it afresh, so nothing in progress changes its rules halfway:
/// * `resync_rate`: every resync that starts later (a running one keeps its pace);
/// * `after_sb_0pri`, `after_sb_1pri`: the next handshake (one in progress decides with the
///   policies its hello carried, `Conn::sent_hello`, as the peer does with what it received,
///   so the two sides never decide with different policies);
/// * `fencing`: the next loss of an UpToDate peer. Turning it off while writes are frozen is
///   refused: nothing would then end the freeze but the peer's return or `disconnect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adjustable {
    pub resync_rate: RateConfig,
    pub after_sb_0pri: AfterSb0Pri,
    pub after_sb_1pri: AfterSb1Pri,
    pub fencing: Fencing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// Handshake deadline for connection `conn`.
    Handshake { conn: u64 },
    /// The rate-limited resync may send its next chunk.
    Resync,
    /// Time for a stability point (a flush barrier) on connection `conn`.
    Stability { conn: u64 },
    /// A graceful stop's drain ends ([`Config::stop_drain`]).
    StopDrain,
    /// Ask again to fence the peer after a failed attempt of freeze `episode`.
    FenceRetry { episode: u64 },
    /// The handover of a failed disk on connection `conn` ends ([`Config::stop_drain`]):
    /// see [`Handover`].
    Handover { conn: u64 },
}

/// Input to the core.
#[derive(Debug, Clone)]
pub enum Event {
    ClientWrite {
        req: ReqId,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    ClientTrim {
        req: ReqId,
        offset: u64,
        len: u32,
    },
    ClientWriteZeroes {
        req: ReqId,
        offset: u64,
        len: u32,
    },
    ClientFlush {
        req: ReqId,
    },
    ClientRead {
        req: ReqId,
        offset: u64,
        len: u32,
    },
    /// A `Disk*` action finished.
    DiskDone {
        io: IoId,
        result: Result<Option<Bytes>, i32>,
    },
    ConnectionUp {
        conn: u64,
    },
    ConnectionDown {
        conn: u64,
        reason: LinkLoss,
    },
    Peer {
        conn: u64,
        msg: PeerMsg,
    },
    Timer(TimerKind),
    Admin {
        tag: u64,
        cmd: AdminCmd,
    },
    /// Graceful stop (`twinblk down`), after the clients are gone: drain, persist, then
    /// [`Action::Stopped`]. See "Graceful stop" in the module docs.
    Stop,
    /// A frontend client (an NBD connection) opened the device; `name` says who, for people
    /// (its address). A demotion or a stop is refused while any is open (like DRBD's "device
    /// is held open"): every later write of theirs would fail.
    FrontendOpened {
        client: u64,
        name: String,
    },
    /// Frontend client `client` closed the device.
    FrontendClosed {
        client: u64,
    },
    /// The answer to [`Action::FencePeer`] for freeze `episode`: `Ok` once the peer is fenced
    /// (the `on-peer-lost` hook exited 0), else why not.
    Fenced {
        episode: u64,
        result: Result<(), String>,
    },
}

/// One structured state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    Role {
        from: Role,
        to: Role,
    },
    Disk {
        from: DiskState,
        to: DiskState,
    },
    Repl {
        from: ReplState,
        to: ReplState,
    },
    PeerDisk {
        to: Option<DiskState>,
    },
    PeerRole {
        to: Option<Role>,
    },
    ResyncStarted {
        blocks: u64,
        full: bool,
    },
    ResyncFinished,
    /// A new whole percent of the resync is done (on both nodes).
    ResyncProgress {
        percent: u64,
        left_blocks: u64,
    },
    /// The connection was refused (by this node or the peer) before any data moved.
    Refused {
        reason: Refusal,
    },
    ConnectionLost {
        reason: ConnLoss,
    },
    /// A flush of this node's disk failed: it stopped using the disk (see [`DiskFailure`]).
    DiskFailed {
        failure: DiskFailure,
    },
    /// A verify of `bytes` bytes began (on both nodes).
    VerifyStarted {
        bytes: u64,
    },
    /// A new tenth of the verify is done.
    VerifyProgress {
        percent: u64,
        differing_blocks: u64,
    },
    /// The verify ended; `aborted` says why if early. `first_ranges` are `(offset, bytes)`.
    VerifyFinished {
        differing_blocks: u64,
        first_ranges: Vec<(u64, u64)>,
        aborted: Option<VerifyAbort>,
    },
}

/// Output of the core. See the module docs for who must do what.
#[derive(Debug, Clone)]
pub enum Action {
    DiskWrite {
        io: IoId,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    /// A discard: afterwards the range's contents are unspecified (unchanged, zeroes or anything
    /// else, as BLKDISCARD leaves them). The core never emits it for data both nodes hold (a
    /// replicated TRIM is [`Action::DiskZero`] on both, so they read the same bytes); only
    /// [`InjectedBug::TrimDiverges`] does, to show the simulator catches it.
    DiskTrim {
        io: IoId,
        offset: u64,
        len: u32,
    },
    /// Make the range read as zeroes. The driver may deallocate it (a punched hole on a file,
    /// BLKZEROOUT on a block device, which unmaps on thin devices): a client's TRIM and
    /// WRITE_ZEROES both run as this, on both nodes.
    DiskZero {
        io: IoId,
        offset: u64,
        len: u32,
    },
    DiskFlush {
        io: IoId,
    },
    DiskRead {
        io: IoId,
        offset: u64,
        len: u32,
    },
    ServeRead {
        req: ReqId,
        offset: u64,
        len: u32,
    },
    Send(PeerMsg),
    CompleteClient {
        req: ReqId,
        result: Result<(), i32>,
    },
    ArmTimer {
        kind: TimerKind,
        at: u64,
    },
    Emit(StateChange),
    SaveMeta(Meta),
    /// Persist bitmap words `[first_word, first_word + words.len())` (same layout as
    /// [`Restored::bitmap`]). Durable before any later action of the batch runs.
    SaveBitmap {
        first_word: u64,
        words: Vec<u64>,
    },
    /// Persist the activity log: the complete set of extents that may hold writes the peer has
    /// not acked. Durable before any later action of the batch runs (a write to an extent
    /// follows the transaction that names it).
    SaveActivityLog {
        io: IoId,
        extents: Vec<u64>,
    },
    /// Make every data write that completed so far stable (fdatasync the data device) before
    /// any later action of the batch runs. Emitted by a forced promotion before its metadata
    /// says UpToDate: a resync target acked resync writes once written (the source cleared
    /// their bits), and they must survive a crash of the new Primary.
    SyncData,
    /// Close connection `conn` (the core already treats it as gone).
    CloseConnection {
        conn: u64,
        reason: CloseReason,
    },
    AdminDone {
        tag: u64,
        result: Result<(), AdminError>,
    },
    /// Fence the peer (run the `on-peer-lost` hook) and report [`Event::Fenced`] with the same
    /// `episode`. Writes are frozen meanwhile; `attempt` counts from 1.
    FencePeer {
        episode: u64,
        attempt: u32,
    },
    /// The graceful stop is over: everything it could persist is persisted (in the actions
    /// before this one). The driver closes its transport and exits; the core does nothing more.
    Stopped(StopOutcome),
}

/// How a graceful stop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutcome {
    pub drain: Drain,
    /// `Ok`: the metadata says "not Primary" after the bitmap was made durable. `Err`: it still
    /// says Primary, so the next start adds the activity log to the bitmap.
    pub persisted: Result<(), StopIncomplete>,
}

/// How the stop's drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Not connected when the stop began.
    NotConnected,
    /// The peer acked and made stable everything it was sent.
    Drained,
    /// The connection was lost during the drain: what was not stable is in the bitmap.
    PeerLost,
    /// [`Config::stop_drain`] passed: what was not stable is in the bitmap.
    Expired { unacked: usize, unstable: usize },
}

impl std::fmt::Display for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drain::NotConnected => write!(f, "not connected"),
            Drain::Drained => write!(f, "the peer has everything, stable"),
            Drain::PeerLost => write!(
                f,
                "the connection was lost during the drain; what the peer lacks is marked for resync"
            ),
            Drain::Expired { unacked, unstable } => write!(
                f,
                "the peer did not ack ({unacked}) or make stable ({unstable}) every write in \
                 time; they are marked for resync"
            ),
        }
    }
}

/// Why a graceful stop could not persist "not Primary".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopIncomplete {
    /// Local writes (or an activity-log transaction) never completed before the drain ended.
    LocalWritesInFlight { writes: usize },
}

impl std::fmt::Display for StopIncomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopIncomplete::LocalWritesInFlight { writes } => write!(
                f,
                "{writes} local writes did not complete in time: the metadata still says \
                 Primary, so the next start resyncs the activity log's extents"
            ),
        }
    }
}

/// An async Primary whose disk failed while its peer was UpToDate hands over before it hangs up
/// (see `disk_failed`): writes it acknowledged (completed on the local disk, FUA and flushed
/// ones included) may still be on their way to the peer, and the peer is the copy the
/// operator is told to promote. The disk is given up at once (Inconsistent, client I/O fails);
/// only the connection stays, until the peer acked and made stable every write it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// The connection `conn` stays open for it.
    Running { conn: u64 },
    /// The peer acked and made stable every write it was sent, then the connection closed: it
    /// holds every write this node acknowledged.
    Done,
    /// The connection ended first (lost, or closed at [`Config::stop_drain`]): the peer may
    /// lack writes this node acknowledged, which are lost with this disk.
    Cut,
}

impl Handover {
    /// The stable name programs read (`status --json`).
    pub fn name(self) -> &'static str {
        match self {
            Handover::Running { .. } => "running",
            Handover::Done => "done",
            Handover::Cut => "cut",
        }
    }
}

impl std::fmt::Display for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handover::Running { .. } => {
                f.write_str("handing the writes the peer lacks over before disconnecting")
            }
            Handover::Done => f.write_str("the peer got every write this node acknowledged"),
            Handover::Cut => f.write_str(
                "the connection ended before the peer had every write this node acknowledged: \
                 promoting the peer loses them",
            ),
        }
    }
}

/// Where a graceful stop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopState {
    Running,
    Draining {
        /// The drain's deadline passed.
        expired: bool,
        /// Connected when the stop began.
        was_connected: bool,
    },
    /// `clean`: "not Primary" was persisted after everything else.
    Stopped {
        clean: bool,
    },
}

/// A Primary lost its UpToDate peer with [`Fencing::FreezeUntilFenced`]: writes wait.
#[derive(Debug)]
struct Freeze {
    episode: u64,
    attempt: u32,
    /// Requests done but not yet answered.
    held: Vec<ReqId>,
    since: u64,
    last_error: Option<String>,
    /// The new generation the loss called for, started when the freeze ends without this
    /// node dying (see `lose_connection`).
    new_gen_at_end: bool,
}

/// The fencing freeze, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeStatus {
    /// When it began (the core's clock, nanoseconds).
    pub since: u64,
    /// Fence attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// Why two nodes refuse to connect after a split brain, and how to resolve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrain {
    pub reason: SplitBrainCause,
    pub node_id: u64,
    pub peer_node_id: u64,
    pub current_gen: u64,
    pub peer_current_gen: u64,
    /// The generation both last agreed on, if they share one.
    pub common_gen: Option<u64>,
    /// Blocks this node changed since they last agreed (dirty bitmap bits).
    pub changed_blocks: u64,
    pub peer_changed_blocks: u64,
    /// Ready-to-run commands: keep this node's data, or keep the peer's.
    pub keep_mine: [String; 2],
    pub keep_peers: [String; 2],
}

/// A snapshot for `twinblk status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub role: Role,
    pub disk: DiskState,
    pub repl: ReplState,
    pub peer_role: Option<Role>,
    pub peer_disk: Option<DiskState>,
    pub current_gen: u64,
    pub dirty_blocks: u64,
    /// (blocks left, blocks in this resync) while SyncSource or SyncTarget.
    pub resync: Option<(u64, u64)>,
    /// Resync rate over the last few seconds, bytes per second.
    pub resync_rate: Option<u64>,
    /// Resync time left at that rate, in seconds.
    pub resync_eta_secs: Option<u64>,
    pub want_connection: bool,
    pub last_refusal: Option<Refusal>,
    pub requests_in_flight: usize,
    /// Data messages sent on the current connection and not yet acked by the peer (a graceful
    /// shutdown of an async Primary waits for this to drain).
    pub peer_unacked: usize,
    /// Writes sent on the current connection that the peer has not yet made stable (the
    /// transfer log: a flush barrier's ack clears them; a graceful shutdown waits for it).
    pub peer_unstable: usize,
    /// Set while the nodes refuse each other after a split brain.
    pub split_brain: Option<SplitBrain>,
    /// `connect --discard-my-data` is armed.
    pub discard_my_data: bool,
    pub bitmap_gen: Option<u64>,
    pub history: [u64; 2],
    /// The dirty bitmap covers every change since `bitmap_gen` (else the next resync is full).
    pub bitmap_known: bool,
    /// The running or last verify on this node.
    pub verify: Option<verify::VerifyStatus>,
    /// Writes are frozen until the lost peer is fenced ([`Fencing::FreezeUntilFenced`]).
    pub frozen: Option<FreezeStatus>,
    /// A graceful stop ([`Event::Stop`]) began.
    pub stopping: bool,
    /// A flush failed: the node no longer uses its disk until restarted.
    pub disk_failure: Option<DiskFailure>,
    /// After such a failure of an async Primary: whether the peer got every write this node
    /// acknowledged before the connection closed ([`Handover`]).
    pub handover: Option<Handover>,
    /// A `primary` command waits: for the connection's handshake to decide, or for the peer's
    /// answer. It is answered then.
    pub promoting: bool,
    /// A connection is up and its handshake has not decided yet.
    pub handshaking: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Bytes, fua: bool },
    Trim { offset: u64, len: u32 },
    Zero { offset: u64, len: u32 },
    Flush,
}

#[derive(Debug)]
struct ClientReq {
    /// Waiting in the issue queue (write not yet on its way; flush: barrier not yet sent).
    unissued: bool,
    local: bool,
    peer: bool,
    err: Option<i32>,
    write: bool,
}

#[derive(Debug)]
enum Issue {
    Write {
        req: ReqId,
        op: DataOp,
        offset: u64,
        len: u32,
        data: Bytes,
        fua: bool,
        epoch: u64,
    },
    /// Closes `epoch`. `flush`: a flush barrier (client FLUSH or stability point).
    Barrier {
        epoch: u64,
        flush: bool,
        flush_req: Option<ReqId>,
    },
}

#[derive(Debug)]
enum IoKind {
    Client { req: ReqId },
    ClientFlush { req: ReqId },
    Peer { conn: u64, seq: u64 },
    PeerResync { conn: u64 },
    ResyncRead { conn: u64, first: u64 },
    BarrierFlush { conn: u64, epoch: u64 },
    DoneFlush { conn: u64, gen: u64 },
    VerifyRead { conn: u64 },
    VerifyCompare { conn: u64, digests: Vec<u64> },
    CsumTargetRead { conn: u64 },
    CsumSourceRead { conn: u64, digests: Vec<u64> },
}

/// See [`Replica::io_origin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOrigin {
    /// A client write (or trim / write-zeroes) with this request id.
    Client(ReqId),
    /// The peer's replicated write with this sequence number.
    Peer(u64),
}

#[derive(Debug)]
struct Io {
    kind: IoKind,
    offset: u64,
    len: u64,
}

#[derive(Debug)]
enum Apply {
    Write(Extent),
    Resync {
        offset: u64,
        data: Bytes,
    },
    ResyncZero {
        offset: u64,
        len: u32,
    },
    Barrier {
        epoch: u64,
        flush: bool,
    },
    Done {
        gen: u64,
    },
    Verify {
        offset: u64,
        len: u32,
        digests: Vec<u64>,
    },
    /// Checksum resync target: read a range for its digests (not sequenced: queued when
    /// asked, so it follows the peer writes received before).
    Csum {
        offset: u64,
        len: u32,
    },
    /// The peer went Ahead (a state change in data order: a fence without a flush).
    Ahead,
    /// The Ahead peer's resync starts (a fence without a flush).
    AheadResync,
}

impl Apply {
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Apply::Verify { offset, len, .. } | Apply::Csum { offset, len } => {
                Some((*offset, *len as u64))
            }
            Apply::Write(e) => Some((e.offset, e.len as u64)),
            Apply::Resync { offset, data } => Some((*offset, data.len() as u64)),
            Apply::ResyncZero { offset, len } => Some((*offset, *len as u64)),
            _ => None,
        }
    }
}

/// A promotion asked of the peer ([`PeerMsg::PromoteAsk`]), committed on its yes.
#[derive(Debug, Clone, Copy)]
struct PendingPromotion {
    /// The `primary` command's admin tag, answered once what it waits for is over.
    tag: u64,
    force: bool,
    phase: PromotionPhase,
}

/// What a `primary` command waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PromotionPhase {
    /// The connection's handshake, which was running when it was asked: its outcome decides
    /// by which rules it goes on (see `promotion_must_wait`).
    Handshake,
    /// The peer's answer to `PromoteAsk { id }`.
    Asked { id: u64 },
}

#[derive(Debug)]
struct Conn {
    id: u64,
    sent_hello: Hello,
    decided: bool,
    peer_role: Option<Role>,
    peer_disk: Option<DiskState>,
    /// The peer's node id, from its hello: it breaks the tie between promotions asked at the
    /// same moment (see `answer_promotion`).
    peer_node_id: Option<u64>,
    /// The generation the peer's disk carries as far as this node knows: its hello's, then
    /// that of each resync end it confirmed.
    peer_gen: u64,
    send_seq: u64,
    recv_next: u64,
    reorder: BTreeMap<u64, PeerMsg>,
    /// Payload bytes received and not yet handed to the disk (reorder buffer + apply queue).
    reorder_bytes: u64,
    apply_q: VecDeque<Apply>,
    fence_in_flight: bool,
    /// Async buffer: payload bytes sent and not yet acked.
    sendbuf: u64,
    /// seq -> (client request waiting for this ack, payload bytes).
    awaiting_ack: IdMap<u64, (Option<ReqId>, u64)>,
    barrier_waiters: BTreeMap<u64, Vec<ReqId>>,
    /// Writes and payload bytes sent since the last flush barrier.
    unflushed_writes: usize,
    unflushed_bytes: u64,
    /// A stability timer is armed for this connection.
    stability_armed: bool,
    /// Flush barriers sent and not yet acked: (epoch, seq). An ack names the epoch; the seq
    /// says which writes it made stable (those sent before it). Includes the tagged flushes
    /// (activity-log pressure, resync stability; epoch from [`PRESSURE_EPOCH`] up).
    flushes: VecDeque<(u64, u64)>,
    /// Tagged flushes sent on this connection (makes each tag unique).
    tagged_flushes_sent: u64,
}

impl Conn {
    /// A tagged flush is in flight (see `Replica::tagged_flush`): its ack will trim the
    /// transfer log as any flush barrier's does.
    fn tagged_flush_in_flight(&self) -> bool {
        self.flushes.iter().any(|&(e, _)| e >= PRESSURE_EPOCH)
    }
}

/// A tagged flush (activity-log pressure, resync stability) is sent between two writes of one
/// epoch, so it cannot carry an epoch of its own: its ack is told apart by a tag from this
/// range, which real epochs never reach. The peer only echoes a flush barrier's epoch.
const PRESSURE_EPOCH: u64 = 1 << 63;

const REORDER_MAX_MSGS: usize = 1 << 16;
const REORDER_MAX_BYTES: u64 = 256 << 20;

/// Takes the queued writes `pick` chooses (by offset and length) out of the issue queue, in
/// order, and returns their requests; barriers stay.
fn take_queued_writes(
    q: &mut VecDeque<Issue>,
    mut pick: impl FnMut(u64, u32) -> bool,
) -> Vec<ReqId> {
    let mut taken = Vec::new();
    q.retain(|item| match item {
        Issue::Write {
            req, offset, len, ..
        } if pick(*offset, *len) => {
            taken.push(*req);
            false
        }
        Issue::Write { .. } | Issue::Barrier { .. } => true,
    });
    taken
}

fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// The replication state machine for one resource on one node.
pub struct Replica {
    cfg: Config,
    role: Role,
    disk: DiskState,
    repl: ReplState,
    want_connect: bool,
    current_gen: u64,
    bitmap_gen: Option<u64>,
    history: [u64; 2],
    crashed_primary: bool,
    bitmap_known: bool,
    /// SyncSource by bitmaps: waiting for the target's bitmap before the resync starts.
    awaiting_peer_bitmap: bool,
    discard_my_data: bool,
    split_brain: Option<SplitBrain>,
    /// Resync progress, on the source and on the target.
    progress: Option<Progress>,
    bitmap: Bitmap,
    needs_gen_bump: bool,
    max_peer_gen: u64,
    last_refusal: Option<Refusal>,
    reqs: IdMap<ReqId, ClientReq>,
    /// Requests waiting for admission, each with "a write completed since the previous
    /// submission" (an epoch boundary is decided at submission, not at admission).
    admit_q: VecDeque<(ReqId, Op, bool)>,
    issue_q: VecDeque<Issue>,
    epoch: u64,
    epoch_has_writes: bool,
    completion_seen: bool,
    next_io: IoId,
    inflight: IdMap<IoId, Io>,
    conn: Option<Conn>,
    /// Transfer log: (seq, offset, len) of writes sent but not yet stable on the peer (no
    /// flush barrier after them acked yet), in seq order.
    tl: VecDeque<(u64, u64, u64)>,
    resync: Option<ResyncSource>,
    /// Sync source: the generations sent with the `ResyncDone`s of this connection that the
    /// target has not yet confirmed (its disk turning UpToDate; one per applied end, in order).
    /// More than one: an Ahead resync can end before the target's UpToDate of the resync
    /// before it arrives (simulator seed 546).
    resync_dones_unconfirmed: VecDeque<u64>,
    /// Sync source: the last of those ends and the generations the target may still carry
    /// instead, persisted (see [`ResyncEnd`] and rule 0 in [`gen`]) until the target confirmed
    /// it or the next handshake decided.
    resync_end: Option<ResyncEnd>,
    /// When the armed [`TimerKind::Resync`] fires, if one is armed.
    resync_timer: Option<u64>,
    al: ActivityLog,
    /// The activity-log transaction in flight (group commit: at most one), by its io id.
    al_txn: Option<IoId>,
    /// Extents it adds: active in `al`, but no write may use them before it is durable.
    al_uncommitted: IdSet<u64>,
    /// A write waits for room in the full activity log: look again after the next event
    /// (a write completing or a flush barrier acked may unpin an extent).
    al_full: bool,
    /// The last metadata saved says Primary without activity-log updates: see `save_meta`.
    persisted_no_al: bool,
    now: u64,
    /// The last metadata saved (or restored) says Primary: see `save_meta`.
    persisted_primary: bool,
    verify: Option<verify::Verify>,
    verify_runs: u64,
    csum_spans: csums::CsumSpans,
    /// A `secondary` waiting (its admin tag) for the peer to make every write this Primary
    /// acknowledged stable: the role changes, and the peer hears of it, only then (see
    /// `start_demotion`).
    demoting: Option<u64>,
    /// A `primary` on a connected node waiting for the peer's answer (see `ask_promotion`).
    promoting: Option<PendingPromotion>,
    /// Promotion asks sent so far (each one's answer carries its number).
    promote_asks: u64,
    stop: StopState,
    freeze: Option<Freeze>,
    /// Freezes so far (each one's fence reports carry its number).
    fence_episodes: u64,
    /// The operator said `disconnect` (and not `connect` since): a promotion does not connect.
    admin_disconnected: bool,
    /// The frontend clients that have the device open, by the driver's id: their names.
    frontend_clients: BTreeMap<u64, String>,
    /// A flush failed: no client I/O, no connection (once handed over), no promotion until a
    /// restart.
    disk_failure: Option<DiskFailure>,
    handover: Option<Handover>,
}

impl Replica {
    /// A replica restarted from its whole metadata area: the persisted bitmap is loaded and,
    /// after a crash as Primary (`meta.primary`), every activity-log extent is added to it. The
    /// result is trusted (`bitmap_known`): the bitmap was persisted whenever an extent left the
    /// log, so persisted bits plus log extents cover every block this node changed that the
    /// peer may lack.
    pub fn restore(cfg: Config, restored: Restored) -> Replica {
        let mut r = Replica::new(cfg, restored.meta);
        r.bitmap.load_words(&restored.bitmap);
        r.al = ActivityLog::restored(r.cfg.al_extents, &restored.activity_log);
        if restored.meta.primary && r.cfg.bug != InjectedBug::IgnoreActivityLogOnRestore {
            let ext = r.cfg.al_extent.max(1);
            for &e in &restored.activity_log {
                // These bits exist only in memory: keeping the extents active means they are
                // persisted when the extent leaves the log.
                r.bitmap.set_bytes(e.saturating_mul(ext), ext);
            }
        }
        if restored.meta.primary && restored.meta.no_activity_log {
            // It wrote without logging where: any block may differ from the peer.
            r.bitmap.set_bytes(0, r.cfg.size);
        }
        if !r.bitmap.is_clean() && r.bitmap_gen.is_none() {
            r.bitmap_gen = Some(r.current_gen);
        }
        // An Inconsistent node was a resync target (or invalidated). If the source had marked
        // what it lacks, the source's bitmap still names every block it may have lost in the
        // crash (a bit goes only when the block is stable here): resume. Else (or after
        // `invalidate`) nothing short of a full resync is safe.
        r.bitmap_known = r.disk != DiskState::Inconsistent || restored.meta.resync_resumable;
        r
    }

    /// A replica starting as Secondary, not connected, from persisted `meta`.
    pub fn new(cfg: Config, meta: Meta) -> Replica {
        let bitmap = Bitmap::new(cfg.size, cfg.bitmap_block);
        Replica {
            role: Role::Secondary,
            disk: meta.disk,
            repl: ReplState::StandAlone,
            want_connect: false,
            current_gen: meta.current_gen,
            bitmap_gen: meta.bitmap_gen,
            history: meta.history,
            crashed_primary: meta.primary,
            awaiting_peer_bitmap: false,
            discard_my_data: false,
            split_brain: None,
            progress: None,
            bitmap_known: false,
            bitmap,
            needs_gen_bump: true,
            max_peer_gen: 0,
            last_refusal: None,
            reqs: IdMap::default(),
            admit_q: VecDeque::new(),
            issue_q: VecDeque::new(),
            epoch: 1,
            epoch_has_writes: false,
            completion_seen: false,
            next_io: 1,
            inflight: IdMap::default(),
            conn: None,
            tl: VecDeque::new(),
            resync: None,
            resync_dones_unconfirmed: VecDeque::new(),
            resync_end: meta.resync_end,
            resync_timer: None,
            al: ActivityLog::new(cfg.al_extents),
            al_txn: None,
            al_uncommitted: Default::default(),
            al_full: false,
            persisted_no_al: meta.primary && meta.no_activity_log,
            persisted_primary: meta.primary,
            now: 0,
            verify: None,
            verify_runs: 0,
            csum_spans: Default::default(),
            demoting: None,
            promoting: None,
            promote_asks: 0,
            stop: StopState::Running,
            freeze: None,
            fence_episodes: 0,
            admin_disconnected: false,
            frontend_clients: BTreeMap::new(),
            disk_failure: None,
            handover: None,
            cfg,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The metadata the driver should hold (same as the last [`Action::SaveMeta`]).
    pub fn meta(&self) -> Meta {
        Meta {
            current_gen: self.current_gen,
            bitmap_gen: self.bitmap_gen,
            history: self.history,
            disk: self.disk,
            primary: self.role == Role::Primary && !self.stopped_clean(),
            no_activity_log: self.role == Role::Primary
                && !self.cfg.al_updates
                && !self.stopped_clean(),
            resync_resumable: self.disk == DiskState::Inconsistent && self.bitmap_known,
            resync_end: self.resync_end,
        }
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    pub fn status(&self) -> Status {
        let c = self.conn.as_ref();
        Status {
            role: self.role,
            disk: self.disk,
            repl: self.repl,
            peer_role: c.and_then(|c| c.peer_role),
            peer_disk: c.and_then(|c| c.peer_disk),
            current_gen: self.current_gen,
            dirty_blocks: self.bitmap.count(),
            resync: self.progress.as_ref().map(|p| (p.left, p.total)),
            resync_rate: self
                .progress
                .as_ref()
                .and_then(|p| p.rate(self.bitmap.block_size())),
            resync_eta_secs: self
                .progress
                .as_ref()
                .and_then(|p| p.eta_secs(self.bitmap.block_size())),
            want_connection: self.want_connect,
            last_refusal: self.last_refusal.clone(),
            requests_in_flight: self.reqs.len() + self.admit_q.len(),
            peer_unacked: c.map_or(0, |c| c.awaiting_ack.len()),
            peer_unstable: if c.is_some() { self.tl.len() } else { 0 },
            split_brain: self.split_brain.clone(),
            discard_my_data: self.discard_my_data,
            bitmap_gen: self.bitmap_gen,
            history: self.history,
            bitmap_known: self.bitmap_known,
            verify: self.verify_status(),
            frozen: self.freeze.as_ref().map(|f| FreezeStatus {
                since: f.since,
                attempts: f.attempt,
                last_error: f.last_error.clone(),
            }),
            stopping: self.stop != StopState::Running,
            disk_failure: self.disk_failure,
            handover: self.handover,
            promoting: self.promoting.is_some(),
            handshaking: self.handshaking(),
        }
    }

    fn stopped_clean(&self) -> bool {
        self.stop == StopState::Stopped { clean: true }
    }

    /// Feeds one event; appends the resulting actions to `out`.
    pub fn handle(&mut self, ev: Event, now: u64, out: &mut Vec<Action>) {
        self.now = now;
        if matches!(self.stop, StopState::Stopped { .. }) {
            self.after_stop(ev, out);
            return;
        }
        match ev {
            Event::ClientWrite {
                req,
                offset,
                data,
                fua,
            } => {
                let len = data.len() as u64;
                self.client_op(req, offset, len, Op::Write { offset, data, fua }, out)
            }
            Event::ClientTrim { req, offset, len } => {
                self.client_op(req, offset, len as u64, Op::Trim { offset, len }, out)
            }
            Event::ClientWriteZeroes { req, offset, len } => {
                self.client_op(req, offset, len as u64, Op::Zero { offset, len }, out)
            }
            Event::ClientFlush { req } => self.client_op(req, 0, 0, Op::Flush, out),
            Event::ClientRead { req, offset, len } => {
                let result = self.may_serve(offset, len as u64);
                match result {
                    Ok(()) => {
                        self.note_app_io();
                        out.push(Action::ServeRead { req, offset, len })
                    }
                    Err(e) => out.push(Action::CompleteClient {
                        req,
                        result: Err(e),
                    }),
                }
            }
            Event::DiskDone { io, result } => self.disk_done(io, result, out),
            Event::ConnectionUp { conn } => self.connection_up(conn, out),
            Event::ConnectionDown { conn, reason } => {
                if self.conn.as_ref().is_some_and(|c| c.id == conn) {
                    self.lose_connection(ConnLoss::Link(reason), out);
                }
            }
            Event::Peer { conn, msg } => {
                if self.conn.as_ref().is_some_and(|c| c.id == conn) {
                    self.peer_msg(msg, out);
                }
            }
            Event::Timer(TimerKind::Handshake { conn }) => {
                if self
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.id == conn && !c.decided)
                {
                    self.close(CloseReason::HandshakeTimedOut, out);
                }
            }
            Event::Timer(TimerKind::Resync) => {
                self.resync_timer = None;
                self.pump_resync(out);
            }
            Event::Timer(TimerKind::Stability { conn }) => {
                if let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) {
                    c.stability_armed = false;
                    self.stabilize_sent(out);
                }
            }
            // (With frontend clients open, `admin` refuses it first.)
            Event::Admin {
                tag,
                cmd: AdminCmd::Demote,
            } if self.demotion_must_wait() && self.frontend_clients.is_empty() => {
                self.start_demotion(tag, out)
            }
            Event::Admin {
                tag,
                cmd: AdminCmd::Promote { force },
            } if self.promotion_must_wait() => {
                self.promoting = Some(PendingPromotion {
                    tag,
                    force,
                    phase: PromotionPhase::Handshake,
                });
            }
            Event::Admin {
                tag,
                cmd: AdminCmd::Promote { force },
            } if self.promotion_must_ask(force) => self.ask_promotion(tag, force, out),
            Event::Timer(TimerKind::StopDrain) => {
                if let StopState::Draining { expired, .. } = &mut self.stop {
                    *expired = true;
                }
            }
            Event::Timer(TimerKind::Handover { conn }) => {
                if self.handover == Some(Handover::Running { conn }) {
                    self.try_finish_handover(true, out);
                }
            }
            Event::Timer(TimerKind::FenceRetry { episode }) => {
                if let Some(f) = self.freeze.as_mut().filter(|f| f.episode == episode) {
                    f.attempt += 1;
                    out.push(Action::FencePeer {
                        episode,
                        attempt: f.attempt,
                    });
                }
            }
            Event::Admin { tag, cmd } => {
                let role = self.role;
                let result = if self.stop == StopState::Running {
                    self.admin(cmd, out)
                } else if matches!(cmd, AdminCmd::Down) {
                    // `down` again while stopping: already under way (idempotent).
                    Ok(())
                } else {
                    Err(AdminError::ShuttingDown)
                };
                if self.role != role {
                    self.verify_role_changed(out);
                }
                out.push(Action::AdminDone { tag, result });
            }
            Event::Stop => self.begin_stop(out),
            Event::FrontendOpened { client, name } => {
                self.frontend_clients.insert(client, name);
            }
            Event::FrontendClosed { client } => {
                self.frontend_clients.remove(&client);
            }
            Event::Fenced { episode, result } => self.fenced(episode, result, out),
        }
        if self.al_full && self.al_txn.is_none() {
            self.al_full = false;
            self.pump_issue(out);
        }
        // Before the stop's: a stop that drained closes the connection, which is the handover's
        // end too, and it ended drained.
        self.try_finish_handover(false, out);
        if matches!(self.stop, StopState::Draining { .. }) {
            self.try_finish_stop(out);
            // An expired stop closes the connection without the drain: cut.
            self.try_finish_handover(false, out);
        }
        #[cfg(debug_assertions)]
        if let Err(e) = self.check_invariants() {
            panic!("invariant violated (core, node {}): {e}", self.cfg.node_id);
        }
    }

    /// The structural invariants of this replica, true after every event: combinations of
    /// states that must never coexist, and bookkeeping kept in step by hand. `handle` checks
    /// them in debug builds (so every simulator step does); `Err` names the broken one.
    pub fn check_invariants(&self) -> Result<(), String> {
        let conn = self.conn.as_ref();
        let decided = conn.is_some_and(|c| c.decided);
        let connected_states = matches!(
            self.repl,
            ReplState::Established
                | ReplState::SyncSource
                | ReplState::SyncTarget
                | ReplState::Ahead
                | ReplState::Behind
        );
        if decided != connected_states {
            return Err(format!(
                "replication state {:?} with {}",
                self.repl,
                match conn {
                    None => "no connection",
                    Some(c) if c.decided => "a connection past its handshake",
                    Some(_) => "a connection still handshaking",
                }
            ));
        }
        if conn.is_some() && !decided && self.repl != ReplState::Connecting {
            return Err(format!("handshaking while {:?}", self.repl));
        }
        // A promotion waits only on a Secondary that is not stopping, for the peer's answer on
        // a decided connection or for the handshake of an undecided one: the loss, the stop,
        // the answer or the decision ends it.
        if let Some(p) = self.promoting {
            let waits_right = match p.phase {
                PromotionPhase::Asked { .. } => decided,
                PromotionPhase::Handshake => conn.is_some() && !decided,
            };
            if self.role != Role::Secondary || !waits_right || self.stop != StopState::Running {
                return Err(format!(
                    "a promotion waits ({:?}) as {:?}, {:?}, {:?}",
                    p.phase, self.role, self.repl, self.stop
                ));
            }
        }
        if self.role == Role::Primary
            && self.disk != DiskState::UpToDate
            && self.disk_failure.is_none()
        {
            return Err(format!("Primary with a {:?} disk", self.disk));
        }
        let handing_over = match self.handover {
            Some(Handover::Running { conn }) => {
                if self.conn.as_ref().map(|c| c.id) != Some(conn) {
                    return Err(format!(
                        "a handover on connection {conn}, not the current one"
                    ));
                }
                if self.disk_failure.is_none() || self.role != Role::Primary {
                    return Err("a handover without a failed Primary disk".into());
                }
                true
            }
            Some(Handover::Done | Handover::Cut) | None => false,
        };
        if self.disk_failure.is_some()
            && (self.want_connect || (self.conn.is_some() && !handing_over))
        {
            return Err("a failed disk still connects".into());
        }
        if self.role == Role::Primary && self.repl == ReplState::SyncTarget {
            return Err("a Primary is a sync target".into());
        }
        if self.repl == ReplState::SyncTarget && self.disk != DiskState::Inconsistent {
            return Err(format!("sync target with a {:?} disk", self.disk));
        }
        if self.disk == DiskState::Diskless {
            return Err("Diskless: the core never detaches".into());
        }
        if !self.bitmap.is_clean() && self.bitmap_gen.is_none() {
            return Err(format!(
                "{} dirty blocks relative to no bitmap generation",
                self.bitmap.count()
            ));
        }
        if (self.resync.is_some() || self.awaiting_peer_bitmap)
            && self.repl != ReplState::SyncSource
        {
            return Err(format!("resync source state while {:?}", self.repl));
        }
        if self.progress.is_some()
            && !matches!(self.repl, ReplState::SyncSource | ReplState::SyncTarget)
        {
            return Err(format!("resync progress while {:?}", self.repl));
        }
        if !self.resync_dones_unconfirmed.is_empty() && !decided {
            return Err("resync ends awaiting confirmation without a connection".into());
        }
        // The transfer log names writes sent on the current connection; at its loss they go to
        // the bitmap.
        if !self.tl.is_empty() && !decided {
            return Err(format!(
                "{} writes in the transfer log without an established connection",
                self.tl.len()
            ));
        }
        if self
            .tl
            .iter()
            .zip(self.tl.iter().skip(1))
            .any(|(a, b)| a.0 >= b.0)
        {
            return Err("transfer log out of sequence order".into());
        }
        if let Some(c) = conn {
            let unacked: u64 = c.awaiting_ack.values().map(|&(_, b)| b).sum();
            if unacked != c.sendbuf {
                return Err(format!(
                    "send buffer counts {} bytes, unacked writes hold {unacked}",
                    c.sendbuf
                ));
            }
            if c.awaiting_ack.keys().any(|&seq| seq > c.send_seq)
                || self.tl.back().is_some_and(|&(seq, _, _)| seq > c.send_seq)
            {
                return Err("a write awaits an ack for a sequence number never sent".into());
            }
            let data_moved = !c.apply_q.is_empty() || !c.awaiting_ack.is_empty();
            if !c.decided && data_moved {
                return Err("data moved before the handshake decided".into());
            }
        }
        for (io, x) in &self.inflight {
            let req = match x.kind {
                IoKind::Client { req } | IoKind::ClientFlush { req } => req,
                _ => continue,
            };
            if !self.reqs.get(&req).is_some_and(|r| r.local) {
                return Err(format!(
                    "disk io {io} of client request {req}, which does not wait for it"
                ));
            }
        }
        for (req, r) in &self.reqs {
            let has_io = || {
                self.inflight.values().any(|x| {
                    matches!(x.kind, IoKind::Client { req: q } | IoKind::ClientFlush { req: q } if q == *req)
                })
            };
            if r.local && !has_io() {
                return Err(format!(
                    "client request {req} waits for a local disk io that is not in flight"
                ));
            }
        }
        if !self.al_uncommitted.is_empty() && self.al_txn.is_none() {
            return Err("activity-log extents wait for a transaction that is not in flight".into());
        }
        if self.al_uncommitted.iter().any(|&e| !self.al.contains(e)) {
            return Err("an extent of the transaction in flight left the activity log".into());
        }
        // A crash of a Primary must restart as a crashed Primary (its activity log counts). The
        // converse may lag: a restarted crashed Primary is Secondary until it saves again.
        if self.role == Role::Primary && !self.persisted_primary && !self.stopped_clean() {
            return Err("Primary, but the metadata does not say so".into());
        }
        Ok(())
    }

    /// Convenience wrapper around [`Replica::handle`].
    pub fn handle_vec(&mut self, ev: Event, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.handle(ev, now, &mut out);
        out
    }

    /// What the disk I/O `io` (in flight) is for: a client write (on the Primary) or the
    /// peer's replicated write `seq` (on the Secondary); `None` for any other I/O. Read-only,
    /// for the driver's latency breakdown: it times its actions, the core never sees a clock.
    pub fn io_origin(&self, io: IoId) -> Option<IoOrigin> {
        match self.inflight.get(&io).map(|i| &i.kind) {
            Some(IoKind::Client { req }) => Some(IoOrigin::Client(*req)),
            Some(IoKind::Peer { seq, .. }) => Some(IoOrigin::Peer(*seq)),
            _ => None,
        }
    }

    // ---- small helpers ----

    fn new_io(&mut self, kind: IoKind, offset: u64, len: u64) -> IoId {
        let io = self.next_io;
        self.next_io += 1;
        self.inflight.insert(io, Io { kind, offset, len });
        io
    }

    fn overlaps_inflight(&self, r: (u64, u64)) -> bool {
        self.inflight
            .values()
            .any(|io| overlap((io.offset, io.len), r))
    }

    fn replicating(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.decided)
            && matches!(self.repl, ReplState::Established | ReplState::SyncSource)
    }

    fn handshaking(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.decided)
    }

    fn set_role(&mut self, to: Role, out: &mut Vec<Action>) {
        // A Primary serves reads from its disk: only an UpToDate, non-target disk may.
        debug_assert!(
            to != Role::Primary
                || (self.disk == DiskState::UpToDate && self.repl != ReplState::SyncTarget),
            "illegal promotion: disk {:?}, replication {:?}",
            self.disk,
            self.repl
        );
        if self.role != to {
            out.push(Action::Emit(StateChange::Role {
                from: self.role,
                to,
            }));
            self.role = to;
        }
    }

    fn set_disk(&mut self, to: DiskState, out: &mut Vec<Action>) {
        debug_assert!(
            legal_disk_change(self.disk, to),
            "illegal disk state change {:?} -> {to:?}",
            self.disk
        );
        if self.disk != to {
            out.push(Action::Emit(StateChange::Disk {
                from: self.disk,
                to,
            }));
            self.disk = to;
        }
    }

    fn set_repl(&mut self, to: ReplState, out: &mut Vec<Action>) {
        debug_assert!(
            legal_repl_change(self.repl, to),
            "illegal replication state change {:?} -> {to:?}",
            self.repl
        );
        if self.repl != to {
            out.push(Action::Emit(StateChange::Repl {
                from: self.repl,
                to,
            }));
            self.repl = to;
        }
    }

    fn save_meta(&mut self, out: &mut Vec<Action>) {
        let m = self.meta();
        // Once the metadata says "not Primary", a crash no longer adds the activity log's
        // extents to the bitmap: the bits that live only in memory (writes while disconnected,
        // a crashed Primary's log) must be persisted first.
        // Likewise when it no longer says "everything is dirty after a crash" (al-updates off):
        // the whole-device bits a crash without a log left live only in memory.
        let no_al = m.primary && m.no_activity_log;
        if (!m.primary && self.persisted_primary) || (self.persisted_no_al && !no_al) {
            self.flush_bitmap(out);
        }
        self.persisted_primary = m.primary;
        self.persisted_no_al = no_al;
        out.push(Action::SaveMeta(m));
    }

    fn send(&mut self, msg: PeerMsg, out: &mut Vec<Action>) {
        if self.conn.is_some() {
            out.push(Action::Send(msg));
        }
    }

    fn next_seq(&mut self) -> u64 {
        match self.conn.as_mut() {
            Some(c) => {
                c.send_seq += 1;
                c.send_seq
            }
            None => 0,
        }
    }

    fn send_state(&mut self, out: &mut Vec<Action>) {
        if self.conn.as_ref().is_some_and(|c| c.decided) {
            let m = PeerMsg::State(PeerState {
                role: self.role,
                disk: self.disk,
            });
            self.send(m, out);
        }
    }

    fn may_serve(&self, offset: u64, len: u64) -> Result<(), i32> {
        if self.role != Role::Primary {
            return Err(EPERM);
        }
        if self.disk != DiskState::UpToDate || self.disk_failure.is_some() {
            return Err(EIO);
        }
        if offset
            .checked_add(len)
            .map_or(true, |end| end > self.cfg.size)
        {
            return Err(EINVAL);
        }
        Ok(())
    }

    // ---- client side (primary) ----

    fn client_op(&mut self, req: ReqId, offset: u64, len: u64, op: Op, out: &mut Vec<Action>) {
        // A demotion waiting for the peer: a new write would extend the tail it waits for.
        let demoting = self.demoting.is_some() && !matches!(op, Op::Flush);
        let allowed = if self.stop == StopState::Running {
            self.may_serve(offset, len)
                .and(if demoting { Err(EPERM) } else { Ok(()) })
        } else {
            // The driver stops its clients before the stop; a late one is not started.
            Err(EIO)
        };
        if let Err(e) = allowed {
            out.push(Action::CompleteClient {
                req,
                result: Err(e),
            });
            return;
        }
        if matches!(op, Op::Write { .. }) && len > crate::wire::MAX_PAYLOAD as u64 {
            out.push(Action::CompleteClient {
                req,
                result: Err(EINVAL),
            });
            return;
        }
        let boundary = std::mem::take(&mut self.completion_seen);
        self.admit_q.push_back((req, op, boundary));
        self.admit(out);
    }

    /// Moves requests from the admission queue into the issue queue while allowed (not during a
    /// handshake; async: while the send buffer has room).
    fn admit(&mut self, out: &mut Vec<Action>) {
        while let Some((_, op, _)) = self.admit_q.front() {
            if self.handshaking() || self.freeze.is_some() {
                break;
            }
            let bytes = match op {
                Op::Write { data, .. } => data.len() as u64,
                _ => 0,
            };
            if self.cfg.protocol == Protocol::Async && self.replicating() {
                let used = self.conn.as_ref().map_or(0, |c| c.sendbuf);
                let established = self.repl == ReplState::Established;
                match self
                    .cfg
                    .congestion
                    .admit(used, bytes, self.cfg.send_buffer, established)
                {
                    Admission::Ship => {}
                    Admission::Wait => break,
                    Admission::PullAhead => self.go_ahead(used, out),
                }
            }
            let Some((req, op, boundary)) = self.admit_q.pop_front() else {
                break;
            };
            self.admit_one(req, op, boundary, out);
        }
        self.pump_issue(out);
    }

    fn admit_one(&mut self, req: ReqId, op: Op, boundary: bool, out: &mut Vec<Action>) {
        let (dop, offset, len, data, fua) = match op {
            Op::Flush => {
                let io = self.new_io(IoKind::ClientFlush { req }, 0, 0);
                self.reqs.insert(
                    req,
                    ClientReq {
                        unissued: true,
                        local: true,
                        peer: false,
                        err: None,
                        write: false,
                    },
                );
                out.push(Action::DiskFlush { io });
                self.issue_q.push_back(Issue::Barrier {
                    epoch: self.epoch,
                    flush: true,
                    flush_req: Some(req),
                });
                self.epoch += 1;
                self.epoch_has_writes = false;
                return;
            }
            Op::Write { offset, data, fua } => {
                let len = data.len() as u32;
                (DataOp::Write, offset, len, data, fua)
            }
            Op::Trim { offset, len } => (DataOp::Trim, offset, len, Bytes::new(), false),
            Op::Zero { offset, len } => (DataOp::Zero, offset, len, Bytes::new(), false),
        };
        if boundary && self.epoch_has_writes {
            // The order barrier is not sent (only the epoch number moves, for the transfer
            // log). Sync: every write the client could depend on was acked by the peer as
            // written before this one was submitted. Async: the peer issues writes in seq
            // order (its reorder buffer applies only a contiguous prefix), so once its writes
            // in flight complete it holds a seq prefix: every write a later one could depend
            // on was submitted, hence sequenced, before it. Draining per epoch bought nothing
            // more (power loss on the peer loses unflushed writes in any order anyway) and,
            // at queue depth 8-32 where an epoch is about one write, serialised the peer.
            // Async keeps it as a local fence in the issue queue, though: a write that waits
            // for an overlapping one must not be overtaken (and sequenced before) by a write
            // of a later epoch, or the peer's seq prefix would not be an epoch prefix.
            if self.cfg.protocol == Protocol::Async {
                self.issue_q.push_back(Issue::Barrier {
                    epoch: self.epoch,
                    flush: false,
                    flush_req: None,
                });
            }
            self.epoch += 1;
            self.epoch_has_writes = false;
        }
        self.epoch_has_writes = true;
        self.reqs.insert(
            req,
            ClientReq {
                unissued: true,
                local: false,
                peer: false,
                err: None,
                write: true,
            },
        );
        self.issue_q.push_back(Issue::Write {
            req,
            op: dop,
            offset,
            len,
            data,
            fua,
            epoch: self.epoch,
        });
    }

    /// Issues queued writes and barriers: a write waits for overlapping in-flight disk ops and
    /// for earlier queued overlapping writes; a barrier is a fence nothing passes.
    fn pump_issue(&mut self, out: &mut Vec<Action>) {
        if self.handshaking() {
            return;
        }
        let mut i = 0;
        let mut blocked: Vec<(u64, u64)> = Vec::new();
        let mut al_wanted: Vec<u64> = Vec::new();
        let mut al_keep: Vec<u64> = Vec::new();
        while i < self.issue_q.len() {
            let Some(item) = self.issue_q.get(i) else {
                break;
            };
            match item {
                Issue::Barrier { .. } => {
                    if i != 0 {
                        break;
                    }
                    if let Some(Issue::Barrier {
                        epoch,
                        flush,
                        flush_req,
                    }) = self.issue_q.pop_front()
                    {
                        self.issue_barrier(epoch, flush, flush_req, out);
                    }
                }
                Issue::Write { offset, len, .. } => {
                    let r = (*offset, (*len as u64).max(1));
                    // The log first: its transaction then overlaps the wait for the disk.
                    let logged = self.al_covers(r.0, r.1, &mut al_wanted, &mut al_keep);
                    if !logged
                        || self.overlaps_inflight(r)
                        || blocked.iter().any(|b| overlap(*b, r))
                    {
                        blocked.push(r);
                        i += 1;
                        continue;
                    }
                    if let Some(Issue::Write {
                        req,
                        op,
                        offset,
                        len,
                        data,
                        fua,
                        epoch,
                    }) = self.issue_q.remove(i)
                    {
                        self.issue_write(req, op, offset, len, data, fua, epoch, out);
                    }
                }
            }
        }
        if !al_wanted.is_empty() {
            self.start_al_txn(al_wanted, &al_keep, out);
        }
        self.pump_resync(out);
        self.pump_verify(out);
    }

    fn issue_barrier(
        &mut self,
        epoch: u64,
        flush: bool,
        flush_req: Option<ReqId>,
        out: &mut Vec<Action>,
    ) {
        let replicating = self.replicating();
        // An order barrier is only a local fence (see `admit_one`): nothing goes to the peer.
        if replicating && flush {
            let seq = self.next_seq();
            self.reset_unflushed();
            if let Some(c) = self.conn.as_mut() {
                c.flushes.push_back((epoch, seq));
            }
            self.send(PeerMsg::Barrier { seq, epoch, flush }, out);
        }
        if let Some(req) = flush_req {
            let wait_peer = replicating && self.cfg.protocol == Protocol::Sync;
            if wait_peer {
                if let Some(c) = self.conn.as_mut() {
                    c.barrier_waiters.entry(epoch).or_default().push(req);
                }
            }
            if let Some(r) = self.reqs.get_mut(&req) {
                r.unissued = false;
                r.peer = wait_peer;
            }
            self.try_complete(req, out);
        }
    }

    /// Admits a flush barrier of the Primary's own (a stability point): once the peer acks it,
    /// every write admitted before it is stable there and leaves the transfer log, so the
    /// activity log may let go of its extents and a reconnect need not resync it.
    fn stability_point(&mut self) {
        self.issue_q.push_back(Issue::Barrier {
            epoch: self.epoch,
            flush: true,
            flush_req: None,
        });
        self.epoch += 1;
        self.epoch_has_writes = false;
        self.reset_unflushed();
    }

    /// A stability point now, if writes went to the peer since the last one: a wait for the
    /// peer to make everything sent stable ends at its ack, not at the next interval.
    fn stabilize_sent(&mut self, out: &mut Vec<Action>) {
        if self.conn.as_ref().is_some_and(|c| c.unflushed_writes > 0) {
            self.stability_point();
            self.pump_issue(out);
        }
    }

    fn reset_unflushed(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            c.unflushed_writes = 0;
            c.unflushed_bytes = 0;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn issue_write(
        &mut self,
        req: ReqId,
        op: DataOp,
        offset: u64,
        len: u32,
        data: Bytes,
        fua: bool,
        epoch: u64,
        out: &mut Vec<Action>,
    ) {
        self.activate_extents(offset, len as u64);
        self.note_app_io();
        let replicating = self.replicating();
        if !replicating {
            // Before the disk action: a first write since the peer was lost moves the
            // generation, and that must be durable before the data can be (actions run in
            // order), or a crash could leave diverged data under the old generation.
            self.mark_dirty_unreplicated(offset, len as u64, out);
        }
        let io = self.new_io(IoKind::Client { req }, offset, len as u64);
        match op {
            DataOp::Write => out.push(Action::DiskWrite {
                io,
                offset,
                data: data.clone(),
                fua,
            }),
            DataOp::Trim if self.cfg.bug == InjectedBug::TrimDiverges => {
                out.push(Action::DiskTrim { io, offset, len })
            }
            // A TRIM zeroes: a discard leaves whatever each device chooses there, and the two
            // nodes' devices choose differently (a no-op, a hole, stale blocks), so `verify`
            // would report differences nobody wrote and a failover would serve other bytes.
            DataOp::Trim | DataOp::Zero => out.push(Action::DiskZero { io, offset, len }),
        }
        let mut wait_peer = false;
        if replicating {
            let seq = self.next_seq();
            let bytes = data.len() as u64;
            wait_peer =
                self.cfg.protocol == Protocol::Sync && self.cfg.bug != InjectedBug::AckWithoutPeer;
            let mut arm = None;
            let mut point = false;
            if let Some(c) = self.conn.as_mut() {
                c.sendbuf += bytes;
                c.awaiting_ack
                    .insert(seq, (wait_peer.then_some(req), bytes));
                c.unflushed_writes += 1;
                c.unflushed_bytes += bytes;
                point = c.unflushed_writes >= self.cfg.stability_writes
                    || c.unflushed_bytes >= self.cfg.stability_bytes;
                if !c.stability_armed && !point {
                    c.stability_armed = true;
                    arm = Some(c.id);
                }
            }
            if let Some(conn) = arm {
                out.push(Action::ArmTimer {
                    kind: TimerKind::Stability { conn },
                    at: self.now.saturating_add(self.cfg.stability_interval),
                });
            }
            if point {
                // Issued once everything admitted before it is (pump_issue reaches it).
                self.stability_point();
            }
            self.tl.push_back((seq, offset, len as u64));
            let crc32 = crc32fast::hash(&data);
            let msg = PeerMsg::Data(Extent {
                seq,
                epoch,
                offset,
                len,
                op,
                flags: if fua { FLAG_FUA } else { 0 },
                crc32,
                data,
            });
            self.send(msg, out);
        }
        if let Some(r) = self.reqs.get_mut(&req) {
            r.unissued = false;
            r.local = true;
            r.peer = wait_peer;
        }
    }

    /// The extents of `offset..offset + len`.
    fn al_range(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let ext = self.cfg.al_extent.max(1);
        offset / ext..=offset.saturating_add(len.max(1) - 1) / ext
    }

    /// Whether a write to `offset..offset + len` may go to the disk now: its extents are in a
    /// durable activity-log transaction (always, with `al-updates` off). If not, the extents no
    /// transaction names yet are added to `wanted` (the next group commit). The hot path is
    /// lookups only. Every extent of the write goes to `keep`: a transaction must not evict
    /// what a queued write needs (or two writes could evict each other's extents forever).
    fn al_covers(&self, offset: u64, len: u64, wanted: &mut Vec<u64>, keep: &mut Vec<u64>) -> bool {
        if !self.cfg.al_updates {
            return true;
        }
        let mut ok = true;
        for e in self.al_range(offset, len) {
            keep.push(e);
            if !self.al.contains(e) {
                ok = false;
                if !wanted.contains(&e) {
                    wanted.push(e);
                }
            } else if self.al_uncommitted.contains(&e) {
                ok = false;
            }
        }
        ok
    }

    /// Before a local client write (its extents are covered, see `al_covers`): refreshes their
    /// LRU order.
    fn activate_extents(&mut self, offset: u64, len: u64) {
        for e in self.al_range(offset, len) {
            self.al.touch(e);
        }
    }

    /// Group commit: one activity-log transaction for every extent the waiting writes miss
    /// (unless one is in flight: the writes missing meanwhile wait for the next). The evicted
    /// extents' bitmap words are persisted first (synchronously, in order); the transaction
    /// itself runs in the background and its `DiskDone` issues the writes it covers.
    ///
    /// `al_extents` is a hard bound, as DRBD's: the log bounds the resync after a crash, and
    /// a log that grew with the queue depth would not. When no extent can be evicted, the
    /// writes wait (oldest first get the room that frees) and a pressure flush makes the
    /// peer's copies stable so extents pinned only by that unpin. The log grows past its size
    /// only when nothing could ever unpin (one write spanning more extents than the log holds,
    /// or extents held only by queued writes), never to keep a write from waiting.
    fn start_al_txn(&mut self, mut wanted: Vec<u64>, keep: &[u64], out: &mut Vec<Action>) {
        if self.al_txn.is_some() || wanted.is_empty() {
            return;
        }
        // `wanted` is in queue order and has no duplicates: the oldest waiting writes first.
        let ext = self.cfg.al_extent.max(1);
        let (writing, unstable) = self.pinned_extents();
        let writes_will_unpin = writing.iter().any(|&e| self.al.contains(e));
        let mut busy = writing;
        busy.extend(unstable);
        busy.extend(keep.iter().copied());
        let evictable = self
            .al
            .extents()
            .into_iter()
            .filter(|e| !busy.contains(e))
            .count();
        let room = (self.cfg.al_extents.max(1) + evictable).saturating_sub(self.al.len());
        let take = room.min(wanted.len());
        if take < wanted.len() {
            self.al_pressure_flush(out);
        }
        let take = if take > 0 {
            take
        } else if writes_will_unpin || self.conn.as_ref().is_some_and(Conn::tagged_flush_in_flight)
        {
            self.al_full = true;
            return;
        } else {
            1
        };
        wanted.truncate(take);
        let Some(t) = self.al.activate_set(&wanted, |e| busy.contains(&e)) else {
            return;
        };
        for e in t.evicted {
            let blocks = self.bitmap.block_range(e.saturating_mul(ext), ext);
            let (w0, w1) = (blocks.start / 64, blocks.end.div_ceil(64));
            for (first_word, words) in self.bitmap.take_unsaved(w0, w1) {
                out.push(Action::SaveBitmap { first_word, words });
            }
        }
        let io = self.next_io;
        self.next_io += 1;
        self.al_txn = Some(io);
        self.al_uncommitted = wanted.into_iter().collect();
        out.push(Action::SaveActivityLog {
            io,
            extents: self.al.extents(),
        });
    }

    /// The activity-log transaction `io` finished. Done: the writes it covers go to the disk,
    /// and the ones that missed meanwhile form the next transaction. Failed: its extents are not
    /// durable, so they leave the log and the writes waiting for them fail; and the disk failed
    /// ([`FailedIo::ActivityLog`]), as at a failed client FLUSH.
    fn al_txn_done(&mut self, io: IoId, result: Result<(), i32>, out: &mut Vec<Action>) {
        self.al_txn = None;
        let added = std::mem::take(&mut self.al_uncommitted);
        if let Err(e) = result {
            tracing::error!(
                io,
                errno = e,
                "activity-log transaction failed: failing the writes waiting for it"
            );
            for &x in &added {
                self.al.remove(x);
            }
            let ext = self.cfg.al_extent.max(1);
            let al = &self.al;
            let failed = take_queued_writes(&mut self.issue_q, |offset, len| {
                let last = offset.saturating_add(u64::from(len).max(1) - 1) / ext;
                (offset / ext..=last).any(|x| !al.contains(x))
            });
            self.fail_unissued(failed, e, out);
            // The pre-flush failed (writes completed before it may be lost here, and Linux
            // would let a later flush pass without them), or the metadata write did: either
            // way the disk is failing (DRBD's `on-io-error` covers metadata I/O too). The
            // driver used to exit here, which cut an async handover short and lost what the
            // peer still lacked (simulator async seed 186); as a disk failure the node stays,
            // hands over, and says what happened.
            self.disk_failed(FailedIo::ActivityLog, e, out);
        }
        self.pump_issue(out);
    }

    /// Client requests taken out of the issue queue ([`take_queued_writes`]) before they
    /// started: they fail with `errno` (never acknowledged, never sent).
    fn fail_unissued(&mut self, reqs: Vec<ReqId>, errno: i32, out: &mut Vec<Action>) {
        for req in reqs {
            if let Some(r) = self.reqs.get_mut(&req) {
                r.unissued = false;
                r.err = Some(errno);
            }
            self.try_complete(req, out);
        }
    }

    /// The activity log is full and some of its extents wait only for the peer to make writes
    /// stable: ask for that now rather than at the next stability point. Sent at once, not
    /// through the issue queue: the writes queued there are the ones waiting for the room, and
    /// a barrier behind them would never go out. A flush barrier between two writes of one
    /// epoch is still a correct one (the peer drains what came before it, flushes, acks); it
    /// only cannot close the epoch, so it carries a tag instead ([`PRESSURE_EPOCH`]). One at a
    /// time.
    fn al_pressure_flush(&mut self, out: &mut Vec<Action>) {
        if self.tl.is_empty() || self.handshaking() {
            return;
        }
        if self
            .conn
            .as_ref()
            .is_some_and(|c| !c.tagged_flush_in_flight())
        {
            self.tagged_flush(out);
        }
    }

    /// Sends a flush barrier outside the epoch sequence, tagged from [`PRESSURE_EPOCH`] up;
    /// returns its tag. Its ack makes everything sent before it stable on the peer.
    fn tagged_flush(&mut self, out: &mut Vec<Action>) -> Option<u64> {
        let c = self.conn.as_mut()?;
        let tag = PRESSURE_EPOCH + c.tagged_flushes_sent;
        c.tagged_flushes_sent += 1;
        let seq = self.next_seq();
        self.reset_unflushed();
        if let Some(c) = self.conn.as_mut() {
            c.flushes.push_back((tag, seq));
        }
        self.send(
            PeerMsg::Barrier {
                seq,
                epoch: tag,
                flush: true,
            },
            out,
        );
        Some(tag)
    }

    /// Extents that must stay in the activity log: (those of a local client write in flight,
    /// those of a write sent to the peer and not yet stable there). The latter have no flush
    /// barrier acked after them: they may be missing there after a crash of either node.
    fn pinned_extents(&self) -> (IdSet<u64>, IdSet<u64>) {
        let writing = self
            .inflight
            .values()
            .filter(|io| matches!(io.kind, IoKind::Client { .. }))
            .flat_map(|io| self.al_range(io.offset, io.len))
            .collect();
        let unstable = self
            .tl
            .iter()
            .flat_map(|&(_, off, len)| self.al_range(off, len))
            .collect();
        (writing, unstable)
    }

    /// Persists every bitmap word changed since it was last persisted (after bulk changes, at
    /// a clean shutdown).
    fn flush_bitmap(&mut self, out: &mut Vec<Action>) {
        let words = self.bitmap.words().len() as u64;
        if self.bitmap.unsaved_count() as u64 > (words / 4).max(1) {
            self.bitmap.take_unsaved(0, words);
            out.push(Action::SaveBitmap {
                first_word: 0,
                words: self.bitmap.words().to_vec(),
            });
            return;
        }
        for (first_word, words) in self.bitmap.take_unsaved(0, words) {
            out.push(Action::SaveBitmap { first_word, words });
        }
    }

    /// Starts a new data generation: the old one becomes the bitmap generation (what the dirty
    /// bitmap is relative to) or, when there already is one, history.
    ///
    /// When the bitmap generation already is `current` (set at the connection loss for writes
    /// the peer may lack), `current` is named there: pushing it to history too filled one of
    /// the two slots with a copy, and after one more rotation (a restart of the lone Primary)
    /// the peer's generation fell out and an ordinary reconnect looked like unrelated data
    /// (simulator seed 2683 with failovers). A rotation is still needed with any other bitmap
    /// generation: a force-promoted sync target's `current` is its source's.
    fn new_generation(&mut self) {
        self.needs_gen_bump = false;
        match self.bitmap_gen {
            None => self.bitmap_gen = Some(self.current_gen),
            Some(b) if b == self.current_gen => {}
            Some(_) => self.push_history(self.current_gen),
        }
        self.current_gen = gen::fresh(self.cfg.node_id, self.current_gen, self.max_peer_gen);
    }

    fn push_history(&mut self, g: u64) {
        if g != 0 && self.history[0] != g {
            self.history = [g, self.history[0]];
        }
    }

    /// The bitmap is relative to `to` from now on (or to nothing): the old bitmap generation
    /// goes to history.
    fn set_bitmap_gen(&mut self, to: Option<u64>) {
        if let Some(old) = self.bitmap_gen {
            if Some(old) != to {
                self.push_history(old);
            }
        }
        self.bitmap_gen = to;
    }

    /// A write the peer will not get now: remember it, and (first time since we lost the peer)
    /// start a new data generation so the peer's generation names what the bitmap is relative to.
    fn mark_dirty_unreplicated(&mut self, offset: u64, len: u64, out: &mut Vec<Action>) {
        self.bitmap.set_bytes(offset, len);
        if self.role == Role::Primary && self.needs_gen_bump {
            self.new_generation();
            self.save_meta(out);
        } else if self.bitmap_gen.is_none() {
            self.bitmap_gen = Some(self.current_gen);
            self.save_meta(out);
        }
    }

    fn try_complete(&mut self, req: ReqId, out: &mut Vec<Action>) {
        let done = self
            .reqs
            .get(&req)
            .is_some_and(|r| !r.unissued && !r.local && !r.peer);
        if let Some(f) = self.freeze.as_mut().filter(|_| done) {
            // Frozen: answered once the peer is fenced (see `unfreeze`).
            if !f.held.contains(&req) {
                f.held.push(req);
            }
            return;
        }
        if done {
            if let Some(r) = self.reqs.remove(&req) {
                if r.write {
                    self.completion_seen = true;
                }
                // A write or flush finishing after this node gave its failed disk up is on
                // that disk only, for all it knows (the peer did not confirm it before the
                // connection closed, or an async write was never waited for): the promoted
                // peer may lack it, so it must not be acknowledged (EIO: it may or may not
                // have happened; simulator seed 13692: a flush whose barrier the peer had not
                // acked).
                let result = match r.err {
                    Some(e) => Err(e),
                    None if self.disk_given_up() => Err(EIO),
                    None => Ok(()),
                };
                out.push(Action::CompleteClient { req, result });
            }
        }
    }

    // ---- disk completions ----

    fn disk_done(&mut self, io: IoId, result: Result<Option<Bytes>, i32>, out: &mut Vec<Action>) {
        if self.al_txn == Some(io) {
            self.al_txn_done(io, result.map(|_| ()), out);
            return;
        }
        let Some(Io { kind, offset, len }) = self.inflight.remove(&io) else {
            tracing::warn!(io, "completion for unknown disk io ignored");
            return;
        };
        let cur = self.conn.as_ref().map(|c| c.id);
        match kind {
            IoKind::Client { req } => {
                if let Some(r) = self.reqs.get_mut(&req) {
                    if let Err(e) = result {
                        tracing::warn!(offset, len, errno = e, "local write failed");
                        r.err = Some(e);
                    }
                    r.local = false;
                }
                let failed = result.is_err();
                if failed {
                    // The peer may have it and we do not: the region must be resynced, and only
                    // a new handshake starts a resync, so drop the connection (it reconnects).
                    self.bitmap.set_bytes(offset, len);
                    if self.bitmap_gen.is_none() {
                        self.bitmap_gen = Some(self.current_gen);
                    }
                }
                self.try_complete(req, out);
                if failed && self.conn.is_some() {
                    self.close(CloseReason::LocalWriteFailed { offset, len }, out);
                }
                self.pump_issue(out);
            }
            IoKind::ClientFlush { req } => {
                if let Some(r) = self.reqs.get_mut(&req) {
                    if let Err(e) = result {
                        r.err = Some(e);
                    }
                    r.local = false;
                }
                self.try_complete(req, out);
                if let Err(errno) = result {
                    self.disk_failed(FailedIo::Client, errno, out);
                }
            }
            IoKind::Peer { conn, seq } => {
                if let Err(e) = result {
                    self.disk_failed(FailedIo::PeerWrite { offset }, e, out);
                } else if cur == Some(conn) {
                    // The driver fills in the timing (the core has no clock).
                    let timing = Default::default();
                    self.send(PeerMsg::WriteAck { seq, timing }, out);
                }
                self.pump_apply(out);
            }
            IoKind::PeerResync { conn } => {
                if let Err(e) = result {
                    self.disk_failed(FailedIo::PeerWrite { offset }, e, out);
                } else if cur == Some(conn) {
                    // This node's own change there is overwritten: the source's bit goes on
                    // the ack, ours now (an interrupted resync resumes with what is left).
                    self.bitmap.clear_bytes(offset, len);
                    self.send(
                        PeerMsg::ResyncAck {
                            offset,
                            len: len as u32,
                        },
                        out,
                    );
                }
                self.pump_apply(out);
            }
            IoKind::ResyncRead { conn, first } => {
                let live = cur == Some(conn) && self.repl == ReplState::SyncSource;
                match result {
                    Ok(Some(data)) if live && data.len() as u64 == len => {
                        let seq = self.next_seq();
                        let msg = if all_zero(&data) {
                            PeerMsg::ResyncZero {
                                seq,
                                offset,
                                len: len as u32,
                            }
                        } else {
                            let crc32 = crc32fast::hash(&data);
                            PeerMsg::ResyncData {
                                seq,
                                offset,
                                crc32,
                                data,
                            }
                        };
                        self.send(msg, out);
                    }
                    Ok(_) if !live => {}
                    Ok(_) => {
                        if let Some(rs) = self.resync.as_mut() {
                            rs.abandon(first);
                        }
                        self.close(CloseReason::ShortRead { what: "resync" }, out);
                    }
                    Err(e) => {
                        if let Some(rs) = self.resync.as_mut() {
                            rs.abandon(first);
                        }
                        if live {
                            self.close(
                                CloseReason::ResyncReadFailed {
                                    offset,
                                    errno: Some(e),
                                },
                                out,
                            );
                        }
                    }
                }
                self.pump_issue(out);
            }
            IoKind::BarrierFlush { conn, epoch } => {
                // Whatever connection it served: the disk failed.
                if let Err(errno) = result {
                    self.disk_failed(FailedIo::PeerBarrier, errno, out);
                    return;
                }
                if cur != Some(conn) {
                    return;
                }
                self.send(PeerMsg::BarrierAck { epoch }, out);
            }
            IoKind::VerifyRead { conn } => {
                self.verify_read_done(conn, offset, len, result, out);
                self.pump_issue(out);
            }
            IoKind::CsumTargetRead { conn } => {
                self.csum_target_read_done(conn, offset, len, result, out);
                self.pump_apply(out);
            }
            IoKind::CsumSourceRead { conn, digests } => {
                self.csum_source_read_done(conn, offset, len, digests, result, out);
            }
            IoKind::VerifyCompare { conn, digests } => {
                self.verify_compare_done(conn, offset, len, digests, result, out);
                self.pump_apply(out);
            }
            IoKind::DoneFlush { conn, gen } => {
                if let Err(errno) = result {
                    self.disk_failed(FailedIo::ResyncEnd, errno, out);
                    return;
                }
                if cur != Some(conn) {
                    return;
                }
                if let Some(c) = self.conn.as_mut() {
                    c.fence_in_flight = false;
                    c.apply_q.pop_front();
                    // The source is at `gen` now: if this node is the next sync source (a
                    // switchover), its resync end must name the generation the peer carries,
                    // not the one of the last handshake (async seed 1912: a cut at that
                    // resync's end cost a full resync).
                    c.peer_gen = gen;
                }
                self.set_bitmap_gen(None);
                if self.current_gen != gen {
                    self.push_history(self.current_gen);
                }
                self.current_gen = gen;
                self.bitmap.clear_all();
                self.flush_bitmap(out);
                self.bitmap_known = true;
                self.crashed_primary = false;
                self.set_disk(DiskState::UpToDate, out);
                self.save_meta(out);
                self.set_repl(ReplState::Established, out);
                self.progress = None;
                out.push(Action::Emit(StateChange::ResyncFinished));
                self.send_state(out);
                self.pump_apply(out);
            }
        }
    }

    /// This node's disk failed while the peer held everything, so it gave the disk up
    /// (Inconsistent, [`Self::disk_failed`]): the peer's disk is the data, so this node
    /// neither fences it nor acknowledges anything more. (Under
    /// [`InjectedBug::FenceAfterOwnDiskFailed`], the old behaviour, it never counts as given
    /// up.)
    fn disk_given_up(&self) -> bool {
        self.disk_failure.is_some()
            && self.disk == DiskState::Inconsistent
            && self.cfg.bug != InjectedBug::FenceAfterOwnDiskFailed
    }

    /// An I/O of this disk failed (see [`DiskFailure`]): a flush (the writes it covered may be
    /// lost here, and Linux would let a later flush succeed without them), an activity-log
    /// transaction, or a write of the peer's data. The node stops using the disk: client I/O
    /// fails, the connection closes and stays closed, no promotion. What the disk becomes: see
    /// [`DiskFailure`].
    fn disk_failed(&mut self, io: FailedIo, errno: i32, out: &mut Vec<Action>) {
        if self.disk_failure.is_some() {
            return;
        }
        let old_behaviour = match io {
            FailedIo::PeerWrite { .. } => self.cfg.bug == InjectedBug::ReconnectAfterPeerWriteError,
            _ => self.cfg.bug == InjectedBug::FlushFailureIgnored,
        };
        if old_behaviour {
            // A failed client FLUSH only failed that request (and a failed activity-log
            // transaction the writes waiting for it); anything else made the disk
            // Inconsistent and reconnected.
            match io {
                FailedIo::Client | FailedIo::ActivityLog => {}
                FailedIo::PeerWrite { offset } => {
                    self.inconsistent_and_reconnect(offset, errno, out)
                }
                FailedIo::PeerBarrier | FailedIo::ResyncEnd => {
                    self.inconsistent_and_reconnect(0, errno, out)
                }
            }
            return;
        }
        let failure = DiskFailure { io, errno };
        tracing::error!(resource = %self.cfg.resource, %failure, "disk failed");
        self.disk_failure = Some(failure);
        out.push(Action::Emit(StateChange::DiskFailed { failure }));
        let peer_has_all = self.replicating()
            && self.conn.as_ref().and_then(|c| c.peer_disk) == Some(DiskState::UpToDate);
        // "Has all" in state: an async peer may still lack writes this node completed (FUA
        // and flushed ones too: their flushes were local). They are sent or queued here, so
        // the connection stays until the peer made them stable (simulator async seed 42766:
        // the peer, promoted as the failure's message says, lacked a FUA write).
        let hand_over = peer_has_all
            && self.role == Role::Primary
            && self.cfg.protocol == Protocol::Async
            && self.conn.as_ref().is_some_and(|c| c.decided)
            && !self.peer_drained()
            && self.cfg.bug != InjectedBug::HangUpOnDiskFailure;
        if peer_has_all || self.role == Role::Secondary {
            // The peer is the good copy (a Secondary's flushes all come from its peer). A
            // failed write lost only itself, unacked: the peer's bitmap still names what this
            // disk lacks, so a resync it could resume stays resumable.
            self.set_disk(DiskState::Inconsistent, out);
            if io.loses_acked_writes() {
                self.bitmap_known = false;
            }
            self.save_meta(out);
        } else {
            // This disk is the best copy, but it may now hold older data where the peer has
            // newer (written while connected, then lost here): any block may differ, so the
            // next resync from here is full and leaves both the same.
            self.bitmap.set_all();
            if self.bitmap_gen.is_none() {
                self.bitmap_gen = Some(self.current_gen);
            }
            self.flush_bitmap(out);
            self.save_meta(out);
        }
        self.want_connect = false;
        self.last_refusal = Some(Refusal::DiskFailed(failure));
        if let (true, Some(conn)) = (hand_over, self.conn.as_ref().map(|c| c.id)) {
            tracing::warn!(
                resource = %self.cfg.resource,
                "handing the writes the peer lacks over before disconnecting"
            );
            self.handover = Some(Handover::Running { conn });
            // Writes still queued never start: they would need this disk, and maybe an
            // activity-log transaction on it (whose failed flush once stopped the node and cut
            // the handover short: simulator async seed 186). Never acknowledged, they fail.
            let queued = take_queued_writes(&mut self.issue_q, |_, _| true);
            self.fail_unissued(queued, EIO, out);
            // The peer sees this disk as it is now (it must not count on it meanwhile).
            self.send_state(out);
            // A flush barrier behind everything sent: its ack says the peer has it all.
            self.stabilize_sent(out);
            out.push(Action::ArmTimer {
                kind: TimerKind::Handover { conn },
                at: self.now.saturating_add(self.cfg.stop_drain),
            });
            return;
        }
        if self.conn.is_some() {
            self.close(CloseReason::DiskFailed(failure), out);
        }
        self.set_repl(ReplState::StandAlone, out);
    }

    /// Ends a running [`Handover`]: done once the peer acked and made stable everything it was
    /// sent, cut if the connection ended first or `expired`. Either way the connection closes
    /// and stays closed, as at any disk failure.
    fn try_finish_handover(&mut self, expired: bool, out: &mut Vec<Action>) {
        let Some(Handover::Running { conn }) = self.handover else {
            return;
        };
        let outcome = if !self.conn.as_ref().is_some_and(|c| c.id == conn) {
            Handover::Cut
        } else if self.peer_drained() {
            Handover::Done
        } else if expired {
            Handover::Cut
        } else {
            return;
        };
        self.handover = Some(outcome);
        match outcome {
            Handover::Cut => tracing::error!(resource = %self.cfg.resource, "{outcome}"),
            _ => tracing::info!(resource = %self.cfg.resource, "{outcome}"),
        }
        if let Some(failure) = self.disk_failure {
            self.close(CloseReason::DiskFailed(failure), out);
        }
        self.set_repl(ReplState::StandAlone, out);
    }

    /// The old answer to a failed write of peer data, kept for the injected bugs: Inconsistent,
    /// and reconnect at once (into the same failing disk). (The region is not marked here: our
    /// bitmap names changes the *peer* lacks. The sender still has it in its transfer log,
    /// unacked, and marks it when the connection drops.)
    fn inconsistent_and_reconnect(&mut self, offset: u64, errno: i32, out: &mut Vec<Action>) {
        self.set_disk(DiskState::Inconsistent, out);
        self.save_meta(out);
        if self.conn.is_some() {
            self.close(CloseReason::PeerDataWriteFailed { offset, errno }, out);
        }
    }

    // ---- connection lifecycle ----

    fn my_hello(&self) -> Hello {
        Hello {
            resource: self.cfg.resource.clone(),
            node_id: self.cfg.node_id,
            size: self.cfg.size,
            role: self.role,
            disk: self.disk,
            current_gen: self.current_gen,
            bitmap_gen: self.bitmap_gen,
            bitmap_known: self.bitmap_known,
            dirty: !self.bitmap.is_clean(),
            crashed_primary: self.crashed_primary,
            history: self.history,
            dirty_blocks: self.bitmap.count(),
            discard_my_data: self.discard_my_data,
            after_sb_0pri: self.cfg.after_sb_0pri,
            after_sb_1pri: self.cfg.after_sb_1pri,
            resync_end: self.resync_end,
        }
    }

    fn connection_up(&mut self, conn: u64, out: &mut Vec<Action>) {
        if self.stop != StopState::Running {
            out.push(Action::CloseConnection {
                conn,
                reason: CloseReason::Stopping,
            });
            return;
        }
        if !self.want_connect {
            out.push(Action::CloseConnection {
                conn,
                reason: CloseReason::AdminDisconnected { retry: true },
            });
            return;
        }
        if self.conn.is_some() {
            self.close(CloseReason::Replaced, out);
        }
        // The peer is back: the handshake compares generations, so a promotion behind this
        // node's back is found there (as a split brain), not by waiting for the fence.
        self.unfreeze(out);
        let hello = self.my_hello();
        self.conn = Some(Conn {
            id: conn,
            sent_hello: hello.clone(),
            decided: false,
            peer_role: None,
            peer_disk: None,
            peer_node_id: None,
            peer_gen: 0,
            send_seq: 0,
            recv_next: 1,
            reorder: BTreeMap::new(),
            reorder_bytes: 0,
            apply_q: VecDeque::new(),
            fence_in_flight: false,
            sendbuf: 0,
            awaiting_ack: IdMap::default(),
            barrier_waiters: BTreeMap::new(),
            unflushed_writes: 0,
            unflushed_bytes: 0,
            stability_armed: false,
            flushes: VecDeque::new(),
            tagged_flushes_sent: 0,
        });
        self.set_repl(ReplState::Connecting, out);
        out.push(Action::Send(PeerMsg::Hello(hello)));
        out.push(Action::ArmTimer {
            kind: TimerKind::Handshake { conn },
            at: self.now.saturating_add(self.cfg.handshake_timeout),
        });
    }

    /// Closes the current connection from our side.
    fn close(&mut self, reason: CloseReason, out: &mut Vec<Action>) {
        let Some(conn) = self.conn.as_ref().map(|c| c.id) else {
            return;
        };
        tracing::warn!(resource = %self.cfg.resource, %reason, "closing peer connection");
        out.push(Action::CloseConnection {
            conn,
            reason: reason.clone(),
        });
        self.lose_connection(ConnLoss::Closed(reason), out);
    }

    fn lose_connection(&mut self, reason: ConnLoss, out: &mut Vec<Action>) {
        let Some(c) = self.conn.take() else {
            return;
        };
        // Writes acknowledged to their clients that the peer never acked (async): only this
        // node has them, whatever happens next.
        let acked_without_peer = c.awaiting_ack.values().any(|(req, _)| req.is_none());
        // Fencing: the peer was UpToDate, so a cluster manager may promote it now. Nothing
        // this node does from here may be acknowledged until the peer is fenced: freeze before
        // the waiting writes below would complete. That holds for a loss this node's core
        // decided (a crc error, a local write error, a protocol violation) as much as for one
        // the transport reported: the peer looks just as lost to the cluster manager.
        let may_fence = match &reason {
            ConnLoss::Link(_) => true,
            ConnLoss::Closed(why) => {
                why.may_fence() && self.cfg.bug != InjectedBug::NoFenceOnCoreClose
            }
        };
        // Except when this node gave its own disk up (it failed while the peer held
        // everything): the peer's disk is the data and must be promoted. A fence would take
        // the only good copy (STONITH) or forbid that promotion (a constraint), and this node
        // acknowledges nothing more to protect: its client I/O fails from now on, and so do
        // the writes still waiting for the peer or their local write (`try_complete`).
        if may_fence
            && !self.disk_given_up()
            && self.cfg.fencing == Fencing::FreezeUntilFenced
            && self.cfg.bug != InjectedBug::NoFreezeOnPeerLost
            && self.role == Role::Primary
            && c.decided
            && c.peer_disk == Some(DiskState::UpToDate)
            && self.freeze.is_none()
        {
            self.fence_episodes += 1;
            let episode = self.fence_episodes;
            tracing::warn!(
                resource = %self.cfg.resource,
                %reason,
                "lost the UpToDate peer while Primary; writes are frozen until it is fenced"
            );
            self.freeze = Some(Freeze {
                episode,
                attempt: 1,
                held: Vec::new(),
                since: self.now,
                last_error: None,
                new_gen_at_end: false,
            });
            out.push(Action::FencePeer {
                episode,
                attempt: 1,
            });
        }
        // Requests waiting for the peer complete without it, but only after the generation
        // that names their data is durable (below).
        let waiting: Vec<ReqId> = c
            .awaiting_ack
            .into_values()
            .filter_map(|(req, _)| req)
            .chain(c.barrier_waiters.into_values().flatten())
            .collect();
        for req in &waiting {
            if let Some(r) = self.reqs.get_mut(req) {
                r.peer = false;
            }
        }
        // The transfer log: writes the peer may lack (not flush-barrier acked), every one of
        // them acknowledged to the client already (async, or sync once acked) or about to be
        // (the waiting ones).
        let tl = std::mem::take(&mut self.tl);
        let acked_unreplicated = !tl.is_empty();
        if self.cfg.bug != InjectedBug::ForgetInFlightOnDisconnect {
            for (_, off, len) in tl {
                self.bitmap.set_bytes(off, len);
            }
        }
        if !self.bitmap.is_clean() && self.bitmap_gen.is_none() {
            self.bitmap_gen = Some(self.current_gen);
        }
        self.resync = None;
        // An end the target did not confirm stays in `resync_end` for the next handshake.
        self.resync_dones_unconfirmed.clear();
        self.progress = None;
        self.awaiting_peer_bitmap = false;
        self.needs_gen_bump = true;
        // Acknowledged writes the peer may lack: a new generation now (DRBD's new current
        // UUID when a Primary loses its peer), whatever this node does next. Waiting for the
        // next write left the peer's generation on this data if none came (the client
        // stalled, or this node was demoted): a stale peer promoted meanwhile then looked
        // like the newer side, and these writes were resynced away without a split brain.
        // Whatever the bitmap generation says (simulator seed 1836 skipped the bump when it
        // differed from `current`, and the peer had that `current`). A source that just ended
        // a resync: a target that adopted the generation sent finds it as the bitmap
        // generation (rule 6), one that never applied the end is read as at it (`resync_end`,
        // rule 0): either way behind by bitmaps.
        //
        // Frozen (fencing) with nothing acknowledged that the peer did not ack (sync): the
        // generation moves when the freeze ends with this node going on (fenced, reconnected,
        // `disconnect`, stop), before the held writes are answered, as DRBD makes its new
        // current UUID when a frozen Primary resumes. If instead the cluster fences this node
        // while frozen, it returns a crashed Primary at the generation the promoted survivor
        // came from: a sync target, not a split brain (the survivor has every write this node
        // acknowledged; the ones after the loss were never answered).
        if acked_unreplicated && self.cfg.bug != InjectedBug::NoGenerationAtLoss {
            match self.freeze.as_mut() {
                Some(f) if !acked_without_peer => f.new_gen_at_end = true,
                _ => self.new_generation(),
            }
        }
        self.verify_abort(VerifyAbort::ConnectionLost(reason.clone()), false, out);
        self.flush_bitmap(out);
        out.push(Action::Emit(StateChange::ConnectionLost {
            reason: reason.clone(),
        }));
        if c.peer_disk.is_some() {
            out.push(Action::Emit(StateChange::PeerDisk { to: None }));
        }
        let next = if self.want_connect {
            ReplState::Connecting
        } else {
            ReplState::StandAlone
        };
        self.set_repl(next, out);
        self.save_meta(out);
        for req in waiting {
            self.try_complete(req, out);
        }
        if let Some(tag) = self.demoting.take() {
            out.push(Action::AdminDone {
                tag,
                result: Err(AdminError::DemotionPeerLost {
                    loss: reason.clone(),
                }),
            });
        }
        // One that waited for the handshake goes on without the connection; one that asked
        // the peer fails (the answer may have been a yes the peer acted on).
        if self.promoting.map(|p| p.phase) == Some(PromotionPhase::Handshake) {
            self.resume_promotion(out);
        } else {
            self.fail_promotion(AdminError::PromotionPeerLost { loss: reason }, out);
        }
        self.admit(out);
    }

    // ---- demotion (planned switchover) ----

    /// `secondary` on a connected Primary whose peer lacks, or has not made stable, writes
    /// this node acknowledged (async: queued or unacked; sync: acked but before a flush
    /// barrier). Changing the role now would let the peer hear of it (on the control stream)
    /// before that data (on the data streams), be promoted, and resync the tail away; and a
    /// loss right after would leave the tail only here. So the demotion waits for the peer.
    /// Ahead (pull-ahead) does not wait: the peer is Outdated and cannot be promoted plainly,
    /// and the marked writes are in the bitmap under a generation the peer lacks.
    fn demotion_must_wait(&self) -> bool {
        self.cfg.bug != InjectedBug::DemoteWithoutPeer
            && self.role == Role::Primary
            && self.demoting.is_none()
            && self.reqs.is_empty()
            && self.admit_q.is_empty()
            && self.replicating()
            && !self.tl.is_empty()
    }

    /// Asks the peer to make the tail stable (a flush barrier); [`Replica::maybe_finish_demotion`]
    /// answers once it did, and a connection loss first fails the demotion. New writes are
    /// refused meanwhile.
    fn start_demotion(&mut self, tag: u64, out: &mut Vec<Action>) {
        tracing::info!(
            resource = %self.cfg.resource,
            unstable = self.tl.len(),
            "demotion waits for the peer to make this Primary's last writes stable"
        );
        self.demoting = Some(tag);
        self.stability_point();
        self.pump_issue(out);
    }

    /// The peer made every write this node sent stable: the waiting demotion goes through.
    fn maybe_finish_demotion(&mut self, out: &mut Vec<Action>) {
        if !self.tl.is_empty() {
            return;
        }
        let Some(tag) = self.demoting.take() else {
            return;
        };
        out.push(Action::SyncData);
        self.set_role(Role::Secondary, out);
        self.save_meta(out);
        self.send_state(out);
        self.verify_role_changed(out);
        out.push(Action::AdminDone {
            tag,
            result: Ok(()),
        });
    }

    fn refuse(&mut self, reason: Refusal, out: &mut Vec<Action>) {
        self.last_refusal = Some(reason.clone());
        self.want_connect = false;
        out.push(Action::Emit(StateChange::Refused {
            reason: reason.clone(),
        }));
        self.send(
            PeerMsg::Refuse {
                code: reason.wire_code(),
                reason: reason.to_string(),
            },
            out,
        );
        self.close(CloseReason::Refused(reason), out);
    }

    fn peer_msg(&mut self, msg: PeerMsg, out: &mut Vec<Action>) {
        match msg {
            PeerMsg::Hello(h) => self.peer_hello(h, out),
            PeerMsg::Refuse { reason, .. } if self.split_brain.is_some() => {
                self.close(CloseReason::SplitBrainSeenByPeer(reason), out);
            }
            PeerMsg::Refuse { code, reason } => {
                let reason = Refusal::ByPeer { code, why: reason };
                self.last_refusal = Some(reason.clone());
                self.want_connect = false;
                out.push(Action::Emit(StateChange::Refused {
                    reason: reason.clone(),
                }));
                self.close(CloseReason::Refused(reason), out);
            }
            PeerMsg::State(s) => {
                let mut disk_up_to_date = false;
                if let Some(c) = self.conn.as_mut() {
                    let role_changed = c.peer_role != Some(s.role);
                    let disk_changed = c.peer_disk != Some(s.disk);
                    // Any UpToDate state confirms, not only a change: when the source
                    // already showed its target as UpToDate (before the decision set it
                    // Inconsistent), the missed confirmation left a stale bitmap generation
                    // persisted, and after a crash both nodes decided to be the source
                    // (simulator seed 1914 with downs).
                    disk_up_to_date = s.disk == DiskState::UpToDate;
                    c.peer_role = Some(s.role);
                    c.peer_disk = Some(s.disk);
                    if role_changed {
                        out.push(Action::Emit(StateChange::PeerRole { to: Some(s.role) }));
                        self.verify_role_changed(out);
                    }
                    if disk_changed {
                        out.push(Action::Emit(StateChange::PeerDisk { to: Some(s.disk) }));
                    }
                }
                if disk_up_to_date && !self.resync_dones_unconfirmed.is_empty() {
                    self.resync_confirmed(out);
                }
                if s.role == Role::Primary && self.role == Role::Primary {
                    self.refuse(Refusal::BothPrimaryConnected, out);
                }
            }
            PeerMsg::PromoteAsk { id } => self.answer_promotion(id, out),
            PeerMsg::PromoteAnswer { id, verdict } => self.promotion_answered(id, verdict, out),
            PeerMsg::WriteAck { seq, .. } => {
                let mut req = None;
                if let Some(c) = self.conn.as_mut() {
                    if let Some((r, bytes)) = c.awaiting_ack.remove(&seq) {
                        c.sendbuf = c.sendbuf.saturating_sub(bytes);
                        req = r;
                    }
                }
                if let Some(req) = req {
                    if let Some(r) = self.reqs.get_mut(&req) {
                        r.peer = false;
                    }
                    self.try_complete(req, out);
                }
                self.maybe_leave_ahead(out);
                self.admit(out);
            }
            PeerMsg::BarrierAck { epoch } => {
                let mut stable_below = None;
                if let Some(c) = self.conn.as_mut() {
                    if let Some(i) = c.flushes.iter().position(|&(e, _)| e == epoch) {
                        stable_below = c.flushes.remove(i).map(|(_, seq)| seq);
                    }
                }
                // Every write sent before the acked barrier is stable on the peer. (Acks may
                // come out of order: a later barrier's covers an earlier one's writes too.)
                if let Some(below) = stable_below {
                    while self.tl.front().is_some_and(|&(seq, _, _)| seq < below) {
                        self.tl.pop_front();
                    }
                    self.resync_stable(epoch, below, out);
                    self.maybe_finish_demotion(out);
                }
                let mut done = Vec::new();
                if let Some(c) = self.conn.as_mut().filter(|_| epoch < PRESSURE_EPOCH) {
                    while let Some((&e, _)) = c.barrier_waiters.first_key_value() {
                        if e > epoch {
                            break;
                        }
                        if let Some((_, reqs)) = c.barrier_waiters.pop_first() {
                            done.extend(reqs);
                        }
                    }
                }
                for req in done {
                    if let Some(r) = self.reqs.get_mut(&req) {
                        r.peer = false;
                    }
                    self.try_complete(req, out);
                }
            }
            PeerMsg::PeerBitmap { runs, done } => self.peer_bitmap(runs, done, out),
            PeerMsg::ResyncProgress { total, left } => {
                if self.repl == ReplState::SyncTarget {
                    // The source decided and marked (persisted) everything this disk lacks; it
                    // clears a bit only once the data is stable here. An interrupted resync
                    // can therefore resume from the bitmaps, even after a crash of this node:
                    // saved, so `restore` trusts the bitmap again.
                    if !self.bitmap_known {
                        self.bitmap_known = true;
                        self.save_meta(out);
                    }
                    self.note_progress(total, left, out);
                }
            }
            PeerMsg::ResyncAck { offset, .. } => {
                if self.repl != ReplState::SyncSource {
                    return;
                }
                let first = self.csum_ack_start(offset) / self.bitmap.block_size();
                self.resync_chunk_acked(first, out);
                self.pump_resync(out);
            }
            m @ (PeerMsg::Data(_)
            | PeerMsg::Barrier { .. }
            | PeerMsg::ResyncData { .. }
            | PeerMsg::ResyncDone { .. }
            | PeerMsg::VerifyStart { .. }
            | PeerMsg::VerifyRequest { .. }
            | PeerMsg::VerifyEnd { .. }
            | PeerMsg::ResyncZero { .. }
            | PeerMsg::Ahead { .. }
            | PeerMsg::AheadResync { .. }) => self.sequenced(m, out),
            m @ (PeerMsg::VerifyReply { .. } | PeerMsg::VerifyAsk | PeerMsg::VerifyStop { .. }) => {
                self.verify_peer_msg(m, out)
            }
            m @ (PeerMsg::CsumRequest { .. }
            | PeerMsg::CsumReply { .. }
            | PeerMsg::ResyncSame { .. }) => self.csum_peer_msg(m, out),
        }
    }

    fn peer_hello(&mut self, h: Hello, out: &mut Vec<Action>) {
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if c.decided {
            self.close(CloseReason::Protocol(Violation::SecondHello), out);
            return;
        }
        c.peer_role = Some(h.role);
        c.peer_disk = Some(h.disk);
        c.peer_node_id = Some(h.node_id);
        c.peer_gen = h.current_gen;
        let mine = c.sent_hello.clone();
        self.max_peer_gen = self.max_peer_gen.max(h.current_gen);
        let mut d = gen::decide(&mine, &h);
        if self.cfg.bug == InjectedBug::ResolveSplitBrainSilently
            && matches!(d, Decision::SplitBrain(_))
        {
            d = if (mine.role == Role::Primary, mine.node_id) > (h.role == Role::Primary, h.node_id)
            {
                Decision::Source { full: false }
            } else {
                Decision::Target { full: false }
            };
        }
        tracing::info!(resource = %self.cfg.resource, ?d, "handshake decided");
        if !matches!(d, Decision::Refuse(_) | Decision::SplitBrain(_)) {
            self.split_brain = None;
            self.discard_my_data = false;
            // Decided: an end the peer never applied is part of what this handshake resyncs
            // (rule 0), or this node's data is about to be replaced. Saved by each branch.
            self.resync_end = None;
        }
        match d {
            Decision::Refuse(reason) => {
                self.refuse(reason, out);
                return;
            }
            Decision::SplitBrain(cause) => {
                self.split_brain = Some(self.split_brain_report(&cause, &mine, &h));
                tracing::error!(resource = %self.cfg.resource, %cause, "split brain detected");
                let reason = Refusal::SplitBrain(cause);
                // Not closed yet: the peer must see our hello to detect (and report) the split
                // brain too, and a close may drop what is still in flight. The peer's Refuse
                // closes the connection (or the handshake timer does).
                self.last_refusal = Some(reason.clone());
                self.want_connect = false;
                out.push(Action::Emit(StateChange::Refused {
                    reason: reason.clone(),
                }));
                self.send(
                    PeerMsg::Refuse {
                        code: reason.wire_code(),
                        reason: reason.to_string(),
                    },
                    out,
                );
                return;
            }
            Decision::NoSync => {
                if self.bitmap.is_clean() {
                    self.set_bitmap_gen(None);
                }
                self.crashed_primary = false;
                self.bitmap_known = true;
                // Read at the end of a resync whose `ResyncDone` a cut took (rule 0), with
                // nothing changed on either side since: the end applies now, as that message
                // would have (its generation, and UpToDate from an UpToDate source). Without
                // this a target that was Outdated (a pull-ahead's empty resync) stayed so,
                // Established at the old generation, promotable only with `--force`
                // (simulator async seed 21680 with graceful stops). Both sides derive it from
                // the two hellos, so no message is needed.
                let applies = self.cfg.bug != InjectedBug::NoSyncIgnoresResyncEnd;
                let up = |from: DiskState, source: DiskState| {
                    if from == DiskState::Outdated && source == DiskState::UpToDate {
                        DiskState::UpToDate
                    } else {
                        from
                    }
                };
                if let Some(gen) = gen::read_at_resync_end(&mine, &h).filter(|_| applies) {
                    if self.current_gen != gen {
                        self.push_history(self.current_gen);
                    }
                    self.current_gen = gen;
                    let to = up(self.disk, h.disk);
                    if to != self.disk {
                        self.set_disk(to, out);
                    }
                }
                if let Some(gen) = gen::read_at_resync_end(&h, &mine).filter(|_| applies) {
                    if let Some(c) = self.conn.as_mut() {
                        c.peer_gen = gen;
                        c.peer_disk = Some(up(h.disk, mine.disk));
                    }
                }
                self.set_repl(ReplState::Established, out);
                self.save_meta(out);
            }
            Decision::Source { full } => {
                // The target goes Inconsistent as it decides (`Decision::Target`), before any
                // resync data; its hello still said what it was. Its State (UpToDate) at the
                // resync's end is the next change, so status, events and metrics show the
                // target's truth throughout (issue 17 defect 8).
                let derive = self.cfg.bug != InjectedBug::SourceSeesTargetUpToDate;
                if let Some(c) = self.conn.as_mut().filter(|_| derive) {
                    c.peer_disk = Some(DiskState::Inconsistent);
                }
                if full {
                    self.bitmap.set_all();
                }
                self.bitmap_known = true;
                self.set_bitmap_gen(Some(h.current_gen));
                self.set_repl(ReplState::SyncSource, out);
                if full {
                    self.start_resync(true, out);
                } else {
                    // The target's own changes come first (PeerBitmap); the resync covers both.
                    self.awaiting_peer_bitmap = true;
                    self.save_meta(out);
                }
            }
            Decision::Target { full } => {
                // `bitmap_known` becomes true only once the source shows it started (its first
                // ResyncProgress): the peer may never have seen our hello, and then nothing
                // marked what this disk lacks. (A node that was UpToDate had it set: cleared
                // here, or a forced promotion before the first ResyncProgress would count as
                // one of a target that knew what it lacks; simulator seed 1213.)
                self.bitmap_known = false;
                self.set_disk(DiskState::Inconsistent, out);
                self.save_meta(out);
                out.push(Action::Emit(StateChange::ResyncStarted {
                    blocks: if full {
                        self.bitmap.blocks()
                    } else {
                        self.bitmap.count()
                    },
                    full,
                }));
                self.set_repl(ReplState::SyncTarget, out);
                if !full {
                    self.send_bitmap(out);
                }
            }
        }
        let peer_disk = match self.conn.as_mut() {
            Some(c) => {
                c.decided = true;
                c.peer_disk
            }
            None => Some(h.disk),
        };
        out.push(Action::Emit(StateChange::PeerDisk { to: peer_disk }));
        self.pump_apply(out);
        self.admit(out);
        self.resume_promotion(out);
    }

    fn note_progress(&mut self, total: u64, left: u64, out: &mut Vec<Action>) {
        let now = self.now;
        let p = self
            .progress
            .get_or_insert_with(|| Progress::new(total, now));
        if let Some(percent) = p.update(total, left, now) {
            out.push(Action::Emit(StateChange::ResyncProgress {
                percent,
                left_blocks: left,
            }));
        }
    }

    fn split_brain_report(&self, reason: &SplitBrainCause, me: &Hello, peer: &Hello) -> SplitBrain {
        let common = me
            .bitmap_gen
            .into_iter()
            .chain(me.history)
            .find(|&g| g != 0 && (peer.bitmap_gen == Some(g) || peer.history.contains(&g)));
        let r = &self.cfg.resource;
        let name = |id: u64| {
            id.checked_sub(1)
                .and_then(|i| self.cfg.node_names.get(i as usize))
                .cloned()
                .unwrap_or_else(|| format!("node {id}"))
        };
        let (here, there) = (name(me.node_id), name(peer.node_id));
        SplitBrain {
            reason: reason.clone(),
            node_id: me.node_id,
            peer_node_id: peer.node_id,
            current_gen: me.current_gen,
            peer_current_gen: peer.current_gen,
            common_gen: common,
            changed_blocks: me.dirty_blocks,
            peer_changed_blocks: peer.dirty_blocks,
            keep_mine: [
                format!(
                    "on {there}: twinblk secondary {r} && twinblk connect {r} --discard-my-data"
                ),
                format!("on {here}: twinblk connect {r}"),
            ],
            keep_peers: [
                format!(
                    "on {here}: twinblk secondary {r} && twinblk connect {r} --discard-my-data"
                ),
                format!("on {there}: twinblk connect {r}"),
            ],
        }
    }

    /// Sync source: the resync of everything the bitmap names begins.
    fn start_resync(&mut self, full: bool, out: &mut Vec<Action>) {
        self.awaiting_peer_bitmap = false;
        self.flush_bitmap(out);
        let rs = ResyncSource::new(
            &self.bitmap,
            self.cfg.resync_chunk,
            self.cfg.resync_rate,
            full,
            self.now,
        );
        out.push(Action::Emit(StateChange::ResyncStarted {
            blocks: rs.total,
            full,
        }));
        self.progress = Some(Progress::new(rs.total, self.now));
        self.send(
            PeerMsg::ResyncProgress {
                total: rs.total,
                left: rs.total,
            },
            out,
        );
        self.resync = Some(rs);
        self.save_meta(out);
        self.pump_resync(out);
    }

    /// Sync target: sends its own dirty bitmap (blocks it changed that the source lacks) as
    /// runs, in pieces small enough for one frame.
    fn send_bitmap(&mut self, out: &mut Vec<Action>) {
        const RUNS_PER_MSG: usize = 1 << 16;
        let mut runs = Vec::new();
        let mut from = 0;
        while let Some((first, n)) = self.bitmap.next_run(from, u64::MAX) {
            runs.push((first, n));
            from = first + n;
            if runs.len() == RUNS_PER_MSG {
                let runs = std::mem::take(&mut runs);
                self.send(PeerMsg::PeerBitmap { runs, done: false }, out);
            }
        }
        self.send(PeerMsg::PeerBitmap { runs, done: true }, out);
    }

    /// Sync source: the target's bitmap is ORed into ours; the resync starts after the last
    /// piece.
    fn peer_bitmap(&mut self, runs: Vec<(u64, u64)>, done: bool, out: &mut Vec<Action>) {
        if !(self.repl == ReplState::SyncSource && self.awaiting_peer_bitmap) {
            self.close(CloseReason::Protocol(Violation::UnexpectedBitmap), out);
            return;
        }
        let bs = self.bitmap.block_size();
        for (first, n) in runs {
            // Out-of-range runs are clipped by the bitmap.
            self.bitmap
                .set_bytes(first.saturating_mul(bs), n.saturating_mul(bs));
        }
        if done {
            self.start_resync(false, out);
        }
    }

    /// Data-stream messages: checked, then buffered until their turn by seq.
    fn sequenced(&mut self, m: PeerMsg, out: &mut Vec<Action>) {
        let Some(seq) = m.seq() else {
            return;
        };
        if !m.crc_ok() {
            let (off, len) = match &m {
                PeerMsg::Data(e) => (e.offset, e.len as u64),
                PeerMsg::ResyncData { offset, data, .. } => (*offset, data.len() as u64),
                _ => (0, 0),
            };
            // Not marked in our bitmap (it names what the peer lacks): the sender never gets an
            // ack for it, so the region is in its transfer log and becomes dirty there.
            self.close(CloseReason::CrcMismatch { offset: off, len }, out);
            return;
        }
        let range = match &m {
            PeerMsg::Data(e) => Some((e.offset, e.len as u64)),
            PeerMsg::ResyncData { offset, data, .. } => Some((*offset, data.len() as u64)),
            PeerMsg::ResyncZero { offset, len, .. } => Some((*offset, *len as u64)),
            _ => None,
        };
        if let PeerMsg::VerifyRequest {
            offset,
            len,
            digests,
            ..
        } = &m
        {
            if let Err(why) = self.verify_check_request(*offset, *len, digests) {
                self.close(CloseReason::Protocol(why), out);
                return;
            }
        }
        if let Some((off, len)) = range {
            if off.checked_add(len).map_or(true, |end| end > self.cfg.size) {
                self.close(
                    CloseReason::Protocol(Violation::BeyondDevice { offset: off, len }),
                    out,
                );
                return;
            }
        }
        if self.role == Role::Primary
            && matches!(
                m,
                PeerMsg::Data(_)
                    | PeerMsg::ResyncData { .. }
                    | PeerMsg::ResyncZero { .. }
                    | PeerMsg::Ahead { .. }
                    | PeerMsg::AheadResync { .. }
            )
        {
            self.close(CloseReason::Protocol(Violation::WritesToPrimary), out);
            return;
        }
        let size = match &m {
            PeerMsg::Data(e) => e.data.len() as u64,
            PeerMsg::ResyncData { data, .. } => data.len() as u64,
            _ => 0,
        };
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if seq < c.recv_next || c.reorder.contains_key(&seq) {
            self.close(CloseReason::Protocol(Violation::RepeatedSeq), out);
            return;
        }
        c.reorder.insert(seq, m);
        c.reorder_bytes += size;
        if c.reorder.len() + c.apply_q.len() > REORDER_MAX_MSGS
            || c.reorder_bytes > REORDER_MAX_BYTES
        {
            self.close(CloseReason::Protocol(Violation::ReorderOverrun), out);
            return;
        }
        self.pump_apply(out);
    }

    /// Receiver side: moves in-order messages to the apply queue and issues them; a barrier (or
    /// resync-done) waits for everything before it, flushes, and only then lets later items go.
    fn pump_apply(&mut self, out: &mut Vec<Action>) {
        if let Err(why) = self.drain_reorder(out) {
            self.close(CloseReason::Protocol(Violation::Unexpected(why)), out);
            return;
        }
        self.issue_applies(out);
    }

    /// Moves in-order messages from the reorder buffer to the apply queue.
    fn drain_reorder(&mut self, out: &mut Vec<Action>) -> Result<(), &'static str> {
        // Resync messages are legal once this node is SyncTarget, or will be when a queued
        // Ahead resync start is applied. Found out at the first resync message only: the scan
        // of the apply queue, at every event, cost an async Secondary with a backlog (up to
        // send-buffer / 4 KiB items) more CPU the further it fell behind.
        let mut sync_target: Option<bool> = None;
        let resync_legal = |s: &Self| {
            s.repl == ReplState::SyncTarget
                || s.conn
                    .as_ref()
                    .is_some_and(|c| c.apply_q.iter().any(|a| matches!(a, Apply::AheadResync)))
        };
        loop {
            let m = {
                let Some(c) = self.conn.as_mut() else {
                    return Ok(());
                };
                if !c.decided {
                    return Ok(());
                }
                let Some(m) = c.reorder.remove(&c.recv_next) else {
                    return Ok(());
                };
                c.recv_next += 1;
                m
            };
            let item = match m {
                PeerMsg::Data(e) => Apply::Write(e),
                PeerMsg::ResyncData { offset, data, .. } => {
                    if !*sync_target.get_or_insert_with(|| resync_legal(self)) {
                        return Err("peer sent resync data, but this node is not SyncTarget");
                    }
                    Apply::Resync { offset, data }
                }
                PeerMsg::ResyncZero { offset, len, .. } => {
                    if !*sync_target.get_or_insert_with(|| resync_legal(self)) {
                        return Err("peer sent resync zeroes, but this node is not SyncTarget");
                    }
                    Apply::ResyncZero { offset, len }
                }
                PeerMsg::Barrier { epoch, flush, .. } => Apply::Barrier { epoch, flush },
                PeerMsg::ResyncDone { gen, .. } => {
                    if !*sync_target.get_or_insert_with(|| resync_legal(self)) {
                        return Err("peer ended a resync this node is not part of");
                    }
                    Apply::Done { gen }
                }
                PeerMsg::Ahead { .. } => Apply::Ahead,
                PeerMsg::AheadResync { .. } => {
                    sync_target = Some(true);
                    Apply::AheadResync
                }
                // Verify bookkeeping needs no disk: done in sequence order right here.
                PeerMsg::VerifyStart { .. } => {
                    self.verify_peer_started(out);
                    continue;
                }
                PeerMsg::VerifyEnd { aborted, .. } => {
                    self.verify_peer_ended(aborted, out);
                    continue;
                }
                PeerMsg::VerifyRequest {
                    offset,
                    len,
                    digests,
                    ..
                } => {
                    if !self.verify_wants_compare() {
                        continue;
                    }
                    Apply::Verify {
                        offset,
                        len,
                        digests,
                    }
                }
                _ => continue,
            };
            if let Some(c) = self.conn.as_mut() {
                c.apply_q.push_back(item);
            }
        }
    }

    /// The peer went Ahead: it stops shipping writes, so this disk falls behind.
    fn become_behind(&mut self, out: &mut Vec<Action>) {
        tracing::warn!(resource = %self.cfg.resource, "peer pulled ahead: this node is Behind (Outdated) until the resync that follows");
        self.set_repl(ReplState::Behind, out);
        if self.disk == DiskState::UpToDate {
            self.set_disk(DiskState::Outdated, out);
        }
        self.save_meta(out);
        self.send_state(out);
    }

    /// The Ahead peer's link drained: its resync to this node starts.
    fn behind_to_sync_target(&mut self, out: &mut Vec<Action>) {
        // Persisted before the resync data that follows touches the disk (actions run in order).
        self.set_disk(DiskState::Inconsistent, out);
        self.save_meta(out);
        out.push(Action::Emit(StateChange::ResyncStarted {
            blocks: self.bitmap.count(),
            full: false,
        }));
        self.set_repl(ReplState::SyncTarget, out);
        self.send_state(out);
    }

    /// Receiver side: issues queued applies in order (overlaps wait; fences at the front only).
    fn issue_applies(&mut self, out: &mut Vec<Action>) {
        let mut i = 0;
        let mut blocked: Vec<(u64, u64)> = Vec::new();
        // The oldest epoch with a write still waiting (see below).
        let mut waiting_epoch: Option<u64> = None;
        loop {
            let Some(c) = self.conn.as_ref() else {
                return;
            };
            let conn = c.id;
            let Some(item) = c.apply_q.get(i) else {
                break;
            };
            match item.range() {
                Some(r) => {
                    let r = (r.0, r.1.max(1));
                    let epoch = match item {
                        Apply::Write(e) => Some(e.epoch),
                        _ => None,
                    };
                    // A write of a later epoch never passes a waiting one: it may depend on it
                    // (an epoch starts after a completion), and if the connection drops now
                    // the waiting one is never applied. Within an epoch nothing depends.
                    let after_waiting = epoch.zip(waiting_epoch).is_some_and(|(e, w)| e > w);
                    if after_waiting
                        || self.overlaps_inflight(r)
                        || blocked.iter().any(|b| overlap(*b, r))
                    {
                        blocked.push(r);
                        if let Some(e) = epoch {
                            waiting_epoch = Some(waiting_epoch.map_or(e, |w: u64| w.min(e)));
                        }
                        i += 1;
                        continue;
                    }
                    let item = self.conn.as_mut().and_then(|c| {
                        let item = c.apply_q.remove(i);
                        let bytes = match &item {
                            Some(Apply::Write(e)) => e.data.len() as u64,
                            Some(Apply::Resync { data, .. }) => data.len() as u64,
                            _ => 0,
                        };
                        c.reorder_bytes = c.reorder_bytes.saturating_sub(bytes);
                        item
                    });
                    match item {
                        Some(Apply::Write(e)) => {
                            let io = self.new_io(
                                IoKind::Peer { conn, seq: e.seq },
                                e.offset,
                                e.len as u64,
                            );
                            out.push(match e.op {
                                DataOp::Write => Action::DiskWrite {
                                    io,
                                    offset: e.offset,
                                    data: e.data,
                                    fua: e.flags & FLAG_FUA != 0,
                                },
                                DataOp::Trim if self.cfg.bug == InjectedBug::TrimDiverges => {
                                    Action::DiskTrim {
                                        io,
                                        offset: e.offset,
                                        len: e.len,
                                    }
                                }
                                // As on the Primary (`issue_write`): both read zeroes.
                                DataOp::Trim | DataOp::Zero => Action::DiskZero {
                                    io,
                                    offset: e.offset,
                                    len: e.len,
                                },
                            });
                        }
                        Some(Apply::Resync { offset, data }) => {
                            let io =
                                self.new_io(IoKind::PeerResync { conn }, offset, data.len() as u64);
                            out.push(Action::DiskWrite {
                                io,
                                offset,
                                data,
                                fua: false,
                            });
                        }
                        Some(Apply::Verify {
                            offset,
                            len,
                            digests,
                        }) if self.verify_wants_compare() => {
                            let io = self.new_io(
                                IoKind::VerifyCompare { conn, digests },
                                offset,
                                len as u64,
                            );
                            out.push(Action::DiskRead { io, offset, len });
                        }
                        Some(Apply::Csum { offset, len }) => {
                            let io =
                                self.new_io(IoKind::CsumTargetRead { conn }, offset, len as u64);
                            out.push(Action::DiskRead { io, offset, len });
                        }
                        Some(Apply::ResyncZero { offset, len }) => {
                            let io = self.new_io(IoKind::PeerResync { conn }, offset, len as u64);
                            out.push(Action::DiskZero { io, offset, len });
                        }
                        // No connection left, a verify that no longer wants its compare, or
                        // items without a range (they never reach this arm).
                        None
                        | Some(Apply::Verify { .. })
                        | Some(Apply::Barrier { .. })
                        | Some(Apply::Done { .. })
                        | Some(Apply::Ahead)
                        | Some(Apply::AheadResync) => {}
                    }
                }
                None => {
                    if i != 0 || c.fence_in_flight {
                        break;
                    }
                    // A state change: applied when everything before it was issued.
                    let state = match item {
                        Apply::Ahead => Some(true),
                        Apply::AheadResync => Some(false),
                        _ => None,
                    };
                    if let Some(ahead) = state {
                        if let Some(c) = self.conn.as_mut() {
                            c.apply_q.pop_front();
                        }
                        let ok = match ahead {
                            true => self.repl == ReplState::Established,
                            false => self.repl == ReplState::Behind,
                        };
                        if !ok {
                            self.close(CloseReason::Protocol(Violation::AheadOutOfOrder), out);
                            return;
                        }
                        if ahead {
                            self.become_behind(out);
                        } else {
                            self.behind_to_sync_target(out);
                        }
                        continue;
                    }
                    // A fence: only at the front, with no peer write still in flight (drained).
                    let skip_drain = self.cfg.bug == InjectedBug::FlushBarrierBeforeItsWrites
                        && matches!(item, Apply::Barrier { flush: true, .. });
                    let peer_writes_in_flight = !skip_drain
                        && self.inflight.values().any(|io| {
                            matches!(io.kind, IoKind::Peer { .. } | IoKind::PeerResync { .. })
                        });
                    if i != 0 || c.fence_in_flight || peer_writes_in_flight {
                        break;
                    }
                    match *item {
                        // Order barrier: everything before it is written, the next epoch may
                        // start. No flush: stability is the flush barriers' job.
                        Apply::Barrier { flush: false, .. } => {
                            if let Some(c) = self.conn.as_mut() {
                                c.apply_q.pop_front();
                            }
                        }
                        // Flush barrier: the flush covers every write completed before it is
                        // issued, i.e. all before the barrier; later items need not wait for
                        // it. The ack (which trims the sender's transfer log) follows it.
                        Apply::Barrier { epoch, flush: true } => {
                            let io = self.new_io(IoKind::BarrierFlush { conn, epoch }, 0, 0);
                            if let Some(c) = self.conn.as_mut() {
                                c.apply_q.pop_front();
                            }
                            out.push(Action::DiskFlush { io });
                        }
                        Apply::Done { gen } => {
                            let io = self.new_io(IoKind::DoneFlush { conn, gen }, 0, 0);
                            if let Some(c) = self.conn.as_mut() {
                                c.fence_in_flight = true;
                            }
                            out.push(Action::DiskFlush { io });
                            break;
                        }
                        _ => break,
                    }
                }
            }
        }
    }

    /// Sync source: keeps the resync window full; ends the resync when all is acked.
    fn pump_resync(&mut self, out: &mut Vec<Action>) {
        if self.repl != ReplState::SyncSource {
            return;
        }
        let Some(conn) = self.conn.as_ref().map(|c| c.id) else {
            return;
        };
        let now = self.now;
        loop {
            let Some(rs) = self.resync.as_mut() else {
                return;
            };
            let (first, n) = match rs.next_chunk(&self.bitmap, now) {
                Next::Chunk(first, n) => (first, n),
                Next::WaitUntil(at) => {
                    self.arm_resync_timer(at, out);
                    break;
                }
                Next::Idle => break,
            };
            let rs_done = |s: &mut Self| {
                if let Some(rs) = s.resync.as_mut() {
                    rs.abandon(first);
                }
            };
            let bs = self.bitmap.block_size();
            let offset = first * bs;
            let len = (n * bs).min(self.cfg.size.saturating_sub(offset));
            let r = (offset, len);
            let queued_overlap = self.issue_q.iter().any(|i| match i {
                Issue::Write { offset, len, .. } => overlap((*offset, (*len as u64).max(1)), r),
                Issue::Barrier { .. } => false,
            });
            if len == 0 || self.overlaps_inflight(r) || queued_overlap {
                // Application writes go first; retry this chunk later.
                rs_done(self);
                break;
            }
            self.resync_fetch(conn, first, offset, len, out);
        }
        let flush = self
            .resync
            .as_ref()
            .is_some_and(|rs| rs.wants_flush(&self.bitmap, self.cfg.stability_bytes));
        if flush {
            let tag = self.tagged_flush(out);
            if let Some(rs) = self.resync.as_mut() {
                rs.flush_tag = tag;
            }
        }
        let finished = self
            .resync
            .as_ref()
            .is_some_and(|rs| rs.finished(&self.bitmap));
        let reads_in_flight = self
            .inflight
            .values()
            .any(|io| matches!(io.kind, IoKind::ResyncRead { conn: c, .. } if c == conn));
        if finished && !reads_in_flight {
            let seq = self.next_seq();
            let gen = self.current_gen;
            self.send(PeerMsg::ResyncDone { seq, gen }, out);
            self.resync = None;
            // The bitmap is relative to our generation from here on; the target's old one
            // goes to history. A target cut off before it applied the end is still at that
            // old generation (or, with an earlier end unconfirmed, at that end's): the end is
            // kept, persisted (`save_meta` below), so that the next handshake reads such a
            // target as at `gen` and resumes from the bitmaps (rule 0 in `gen`; issue 17
            // defect 6). (Keeping the old generation as the bitmap generation instead let it
            // fall out of the two-slot history once losses moved the generation: seed 244.)
            self.resync_dones_unconfirmed.push_back(gen);
            self.resync_end = self.unconfirmed_end();
            self.set_bitmap_gen(None);
            self.crashed_primary = false;
            self.flush_bitmap(out);
            self.set_repl(ReplState::Established, out);
            self.progress = None;
            out.push(Action::Emit(StateChange::ResyncFinished));
            self.save_meta(out);
        }
    }

    /// Sync source: the target applied the oldest `ResyncDone` not yet confirmed (its disk
    /// turned UpToDate, durably, before it said so): it carries that end's generation now.
    fn resync_confirmed(&mut self, out: &mut Vec<Action>) {
        let Some(gen) = self.resync_dones_unconfirmed.pop_front() else {
            return;
        };
        if let Some(c) = self.conn.as_mut() {
            c.peer_gen = gen;
        }
        let end = self.unconfirmed_end();
        if end != self.resync_end {
            self.resync_end = end;
            self.save_meta(out);
        }
    }

    /// The [`ResyncEnd`] for the ends not yet confirmed: the last one's generation, and the
    /// generations the target may carry instead (the one it had, then each earlier end's;
    /// the newest two).
    fn unconfirmed_end(&self) -> Option<ResyncEnd> {
        if self.cfg.bug == InjectedBug::ForgetTargetAtResyncEnd {
            return None;
        }
        let q = &self.resync_dones_unconfirmed;
        let &gen = q.back()?;
        let had = self.conn.as_ref()?.peer_gen;
        // Newest last: the target's generation, then each end before the last.
        let mut may = std::iter::once(had)
            .chain(q.iter().copied().take(q.len().saturating_sub(1)))
            .rev();
        let newest = may.next()?;
        let before = may.next().unwrap_or(newest);
        Some(ResyncEnd {
            gen,
            target_gens: [before, newest],
        })
    }

    /// Sync source: a flush barrier (sequence number `below`, tag `epoch`) was acked, so the
    /// resync chunks acked before it was sent are stable on the target: their bits go now.
    fn resync_stable(&mut self, epoch: u64, below: u64, out: &mut Vec<Action>) {
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        if rs.flush_tag == Some(epoch) {
            rs.flush_tag = None;
        }
        let stable = rs.stable(below);
        let bs = self.bitmap.block_size();
        for (first, n) in &stable {
            let offset = first.saturating_mul(bs);
            let len = n
                .saturating_mul(bs)
                .min(self.cfg.size.saturating_sub(offset));
            self.bitmap.clear_bytes(offset, len);
        }
        if !stable.is_empty() {
            self.resync_progress(out);
        }
        // Chunks acked after this flush went out need the next one (or this was the end).
        self.pump_resync(out);
    }

    /// Sync source: the target wrote the chunk starting at block `first`. Not yet stable: its
    /// bits go when a flush barrier sent after now is acked (`resync_stable`).
    pub(super) fn resync_chunk_acked(&mut self, first: u64, out: &mut Vec<Action>) {
        let seq = self.conn.as_ref().map_or(0, |c| c.send_seq);
        if self.resync.as_mut().is_some_and(|rs| rs.acked(first, seq)) {
            self.resync_progress(out);
        }
    }

    /// Sync source: tells the target (and status) how much is left.
    fn resync_progress(&mut self, out: &mut Vec<Action>) {
        let Some(rs) = self.resync.as_ref() else {
            return;
        };
        let (total, left) = (rs.total, rs.remaining(&self.bitmap));
        self.note_progress(total, left, out);
        self.send(PeerMsg::ResyncProgress { total, left }, out);
    }

    fn arm_resync_timer(&mut self, at: u64, out: &mut Vec<Action>) {
        if self.resync_timer.is_some_and(|t| t <= at) {
            return;
        }
        self.resync_timer = Some(at);
        out.push(Action::ArmTimer {
            kind: TimerKind::Resync,
            at,
        });
    }

    /// Application I/O happened: a running resync backs off (down to `c-min-rate`).
    fn note_app_io(&mut self) {
        if let Some(rs) = self.resync.as_mut() {
            rs.ctl.app_io(self.now);
        }
    }

    // ---- Ahead / Behind (pull-ahead) ----

    /// The send buffer passed `congestion-fill`: stop shipping. The peer learns it in data
    /// order (everything shipped so far still reaches it), and a new data generation starts so
    /// the marked writes are relative to the generation the peer has.
    fn go_ahead(&mut self, used: u64, out: &mut Vec<Action>) {
        tracing::warn!(
            resource = %self.cfg.resource,
            unacked_bytes = used,
            congestion_fill = self.cfg.congestion.fill,
            "send buffer past congestion-fill: going Ahead; writes are marked for a resync              instead of shipped until the link drains"
        );
        let seq = self.next_seq();
        self.send(PeerMsg::Ahead { seq }, out);
        self.set_repl(ReplState::Ahead, out);
        self.set_bitmap_gen(Some(self.current_gen));
        self.current_gen = gen::fresh(self.cfg.node_id, self.current_gen, self.max_peer_gen);
        self.needs_gen_bump = false;
        self.save_meta(out);
    }

    /// Ahead and everything shipped before is acked: resync the marked regions on the live
    /// connection (Ahead -> SyncSource -> Established).
    fn maybe_leave_ahead(&mut self, out: &mut Vec<Action>) {
        if self.repl != ReplState::Ahead {
            return;
        }
        let Some(unacked) = self.conn.as_ref().map(|c| c.awaiting_ack.len()) else {
            return;
        };
        if !self.cfg.congestion.drained(unacked) {
            return;
        }
        tracing::info!(resource = %self.cfg.resource, "link drained: resyncing what was marked while Ahead");
        let seq = self.next_seq();
        self.send(PeerMsg::AheadResync { seq }, out);
        self.set_repl(ReplState::SyncSource, out);
        self.start_resync(false, out);
    }

    // ---- admin ----

    /// `twinblk adjust`: checks first, then applies every setting (see [`Adjustable`]).
    fn admin_adjust(&mut self, a: Adjustable) -> Result<(), AdminError> {
        if a.fencing == Fencing::Off && self.freeze.is_some() {
            return Err(AdminError::FencingStillNeeded);
        }
        if self.cfg.bug == InjectedBug::AdjustIgnored {
            return Ok(());
        }
        self.cfg.resync_rate = a.resync_rate;
        self.cfg.after_sb_0pri = a.after_sb_0pri;
        self.cfg.after_sb_1pri = a.after_sb_1pri;
        self.cfg.fencing = a.fencing;
        Ok(())
    }

    // ---- fencing freeze ----

    fn fenced(&mut self, episode: u64, result: Result<(), String>, out: &mut Vec<Action>) {
        let Some(f) = self.freeze.as_mut().filter(|f| f.episode == episode) else {
            // An episode that ended otherwise (the peer came back, `disconnect`): nothing held.
            return;
        };
        match result {
            Ok(()) if self.cfg.bug == InjectedBug::FenceSuccessIgnored => {}
            Ok(()) => {
                tracing::info!(resource = %self.cfg.resource, "the peer is fenced: going on without it");
                self.unfreeze(out);
            }
            Err(e) => {
                tracing::error!(
                    resource = %self.cfg.resource,
                    attempt = f.attempt,
                    "fencing the peer FAILED: {e}; writes stay frozen (the peer may be promoted \
                     elsewhere); retrying. Fix the fencing, or bring the peer back, or \
                     `twinblk disconnect` to continue alone at your own risk"
                );
                f.last_error = Some(e);
                out.push(Action::ArmTimer {
                    kind: TimerKind::FenceRetry { episode },
                    at: self.now.saturating_add(self.cfg.fence_retry),
                });
            }
        }
    }

    /// Ends the freeze: the requests it held are answered, the waiting ones admitted.
    fn unfreeze(&mut self, out: &mut Vec<Action>) {
        let Some(f) = self.freeze.take() else {
            return;
        };
        if f.new_gen_at_end && self.needs_gen_bump {
            // Durable before the held writes are answered (`save_meta` is ordered before the
            // completions), as at an unfrozen loss.
            self.new_generation();
            self.save_meta(out);
        }
        for req in f.held {
            self.try_complete(req, out);
        }
        self.admit(out);
    }

    // ---- graceful stop ----

    /// `twinblk down`: stop connecting, and let the current connection deliver what it was
    /// sent. A stability point goes out at once, so the drain ends when the peer made every
    /// write stable, not at the next stability interval.
    fn begin_stop(&mut self, out: &mut Vec<Action>) {
        if self.stop != StopState::Running {
            return;
        }
        self.want_connect = false;
        // A yes arriving during the drain must not make a stopping node Primary.
        self.fail_promotion(AdminError::ShuttingDown, out);
        self.stop = StopState::Draining {
            expired: false,
            was_connected: self.conn.is_some(),
        };
        out.push(Action::ArmTimer {
            kind: TimerKind::StopDrain,
            at: self.now.saturating_add(self.cfg.stop_drain),
        });
        if self.replicating() {
            self.stabilize_sent(out);
        }
    }

    /// Local writes not yet completed, the activity-log transaction included.
    fn local_writes_in_flight(&self) -> usize {
        let writes = self
            .inflight
            .values()
            .filter(|io| {
                matches!(
                    io.kind,
                    IoKind::Client { .. } | IoKind::Peer { .. } | IoKind::PeerResync { .. }
                )
            })
            .count();
        writes + usize::from(self.al_txn.is_some())
    }

    /// The peer acked and made stable everything it was sent (trivially when not connected,
    /// or before the handshake decided: nothing was sent).
    fn peer_drained(&self) -> bool {
        self.conn.as_ref().map_or(true, |c| {
            !c.decided || (c.awaiting_ack.is_empty() && self.tl.is_empty())
        })
    }

    fn try_finish_stop(&mut self, out: &mut Vec<Action>) {
        let StopState::Draining { expired, .. } = self.stop else {
            return;
        };
        let held = self.freeze.as_ref().map_or(0, |f| f.held.len());
        let local_idle = self.inflight.is_empty()
            && self.al_txn.is_none()
            && self.reqs.len() == held
            && self.admit_q.is_empty();
        if expired || (local_idle && self.peer_drained()) {
            self.finish_stop(out);
        }
    }

    /// The stop's persist order: the transfer log lands in the bitmap (closing the
    /// connection), the data is made stable, the bitmap is made durable, and only then the
    /// metadata stops saying Primary. If local writes are still in flight (the drain expired
    /// with a hung disk), "not Primary" is never saved: the next start adds the activity log.
    fn finish_stop(&mut self, out: &mut Vec<Action>) {
        let StopState::Draining { was_connected, .. } = self.stop else {
            return;
        };
        let drain = match self.conn.as_ref() {
            None if was_connected => Drain::PeerLost,
            None => Drain::NotConnected,
            Some(_) if self.peer_drained() => Drain::Drained,
            Some(c) => Drain::Expired {
                unacked: c.awaiting_ack.len(),
                unstable: self.tl.len(),
            },
        };
        if self.cfg.bug == InjectedBug::StopDropsTransferLog {
            self.tl.clear();
        }
        if let Some(conn) = self.conn.as_ref().map(|c| c.id) {
            out.push(Action::CloseConnection {
                conn,
                reason: CloseReason::Stopping,
            });
            self.lose_connection(ConnLoss::Closed(CloseReason::Stopping), out);
        }
        // Requests not started yet never will be (the driver stopped its clients first).
        for (req, _, _) in std::mem::take(&mut self.admit_q) {
            out.push(Action::CompleteClient {
                req,
                result: Err(EIO),
            });
        }
        // Nothing more is written: what the freeze held is on the local disk and, if the peer
        // lacks it, in the bitmap.
        self.unfreeze(out);
        let writes = self.local_writes_in_flight();
        let persisted = if writes > 0 {
            self.flush_bitmap(out);
            self.stop = StopState::Stopped { clean: false };
            Err(StopIncomplete::LocalWritesInFlight { writes })
        } else {
            out.push(Action::SyncData);
            if self.cfg.bug == InjectedBug::StopSavesMetaBeforeBitmap {
                self.stop = StopState::Stopped { clean: true };
                out.push(Action::SaveMeta(self.meta()));
                self.persisted_primary = false;
            }
            self.flush_bitmap(out);
            self.stop = StopState::Stopped { clean: true };
            self.save_meta(out);
            Ok(())
        };
        tracing::info!(resource = %self.cfg.resource, %drain, ?persisted, "stopped");
        out.push(Action::Stopped(StopOutcome { drain, persisted }));
    }

    /// After [`Action::Stopped`] the driver is exiting: answer what must be answered, start
    /// nothing.
    fn after_stop(&mut self, ev: Event, out: &mut Vec<Action>) {
        match ev {
            Event::ClientWrite { req, .. }
            | Event::ClientTrim { req, .. }
            | Event::ClientWriteZeroes { req, .. }
            | Event::ClientFlush { req }
            | Event::ClientRead { req, .. } => out.push(Action::CompleteClient {
                req,
                result: Err(EIO),
            }),
            Event::Admin { tag, .. } => out.push(Action::AdminDone {
                tag,
                result: Err(AdminError::ShutDown),
            }),
            Event::ConnectionUp { conn } => out.push(Action::CloseConnection {
                conn,
                reason: CloseReason::Stopping,
            }),
            Event::DiskDone { .. }
            | Event::ConnectionDown { .. }
            | Event::Peer { .. }
            | Event::Timer(_)
            | Event::Stop
            | Event::FrontendOpened { .. }
            | Event::FrontendClosed { .. }
            | Event::Fenced { .. } => {}
        }
    }

    /// A demotion or a stop under open frontend clients would fail their every later write:
    /// refused, naming them (the driver's `--force` disconnects them first).
    fn refuse_while_open(&self, command: ClientsCommand) -> Result<(), AdminError> {
        if self.frontend_clients.is_empty() {
            return Ok(());
        }
        Err(AdminError::ClientsOpen {
            resource: self.cfg.resource.clone(),
            command,
            clients: self.frontend_clients.values().cloned().collect(),
        })
    }

    /// The peer's node name, for the operator's messages.
    fn peer_name(&self) -> String {
        self.cfg
            .node_names
            .iter()
            .enumerate()
            .find(|&(i, _)| i as u64 + 1 != self.cfg.node_id)
            .map_or_else(|| "the peer".into(), |(_, n)| n.clone())
    }

    /// Whether this Secondary may become Primary now, as far as this node knows (checked when
    /// `primary` runs, and again when the peer's yes arrives). `ask`: the peer is asked next,
    /// so its role is the peer's own answer, not this node's view of it (a demotion's State
    /// may still be on its way: the operator's `primary` right after `secondary` succeeds).
    fn may_promote(&self, force: bool, ask: bool) -> Result<(), AdminError> {
        if let Some(f) = self.disk_failure {
            return Err(AdminError::DiskFailed(f));
        }
        // Right after the peer is lost, its last writes may still be on their way to
        // this disk. As Primary, a read of such a block could see the old data and then
        // the new appear under it; the window is milliseconds, so say so and let the
        // operator (or the CLI's retry) try again rather than queue reads here.
        // So may the data the peer sent before it was demoted: held in the reorder
        // buffer for an earlier seq, or queued for the disk.
        let arriving = self
            .conn
            .as_ref()
            // (During a handshake nothing queued is applied: the promotion closes
            // the connection, and it goes with it; simulator seed 1222.)
            .filter(|c| c.decided && self.cfg.bug != InjectedBug::DemoteWithoutPeer)
            .map_or(0, |c| c.reorder.len() + c.apply_q.len());
        let landing = arriving
            + self
                .inflight
                .values()
                .filter(|io| matches!(io.kind, IoKind::Peer { .. } | IoKind::PeerResync { .. }))
                .count();
        if landing > 0 {
            return Err(AdminError::PeerWritesLanding { writes: landing });
        }
        if !ask && self.conn.as_ref().and_then(|c| c.peer_role) == Some(Role::Primary) {
            return Err(self.peer_is_primary());
        }
        if self.repl == ReplState::SyncTarget {
            return Err(AdminError::ResyncTarget);
        }
        if self.disk != DiskState::UpToDate && !force {
            return Err(AdminError::NotUpToDate { disk: self.disk });
        }
        Ok(())
    }

    fn peer_is_primary(&self) -> AdminError {
        AdminError::PeerIsPrimary {
            peer: self.peer_name(),
            resource: self.cfg.resource.clone(),
        }
    }

    fn promotion_conflict(&self) -> AdminError {
        AdminError::PromotionConflict {
            peer: self.peer_name(),
            resource: self.cfg.resource.clone(),
        }
    }

    /// `primary` on a node connected past the handshake: the peer must agree first (see the
    /// module docs). The command is answered with the peer's answer, or the connection's loss.
    fn ask_promotion(&mut self, tag: u64, force: bool, out: &mut Vec<Action>) {
        self.promote_asks += 1;
        let id = self.promote_asks;
        self.promoting = Some(PendingPromotion {
            tag,
            force,
            phase: PromotionPhase::Asked { id },
        });
        self.send(PeerMsg::PromoteAsk { id }, out);
    }

    /// `primary` on a Secondary whose connection is in its handshake waits for the handshake's
    /// outcome (it is bounded by the handshake timeout) instead of promoting on what it knows
    /// alone. The peer's hello may be a moment away and say that it holds writes this node
    /// lacks: a Primary that lost this node, wrote on (acknowledging those writes), and was
    /// demoted, so that the operator now fails over to this node. Promoted before the hello,
    /// this node would serve data without those acknowledged writes (the real daemons did, in
    /// `tests/switchover.rs`, once a stalled Secondary timed out). Once the handshake decided,
    /// the connected rules apply (the peer is asked; a sync target is refused); if it ends
    /// without a decision (refused, cut, timed out), the rules of a node without a connection
    /// do, as if the command had come a moment later. DRBD likewise runs a role change only
    /// once a connection's state change is done.
    fn promotion_must_wait(&self) -> bool {
        self.cfg.bug != InjectedBug::PromoteDuringHandshake
            && self.stop == StopState::Running
            && self.role == Role::Secondary
            && self.promoting.is_none()
            && self.handshaking()
    }

    /// A promotion that waited for the handshake goes on by the rules that hold now: connected
    /// past the handshake, it asks the peer; otherwise it is decided here (promoted, or
    /// refused with the reason, e.g. this node became the sync target).
    fn resume_promotion(&mut self, out: &mut Vec<Action>) {
        let Some(p) = self
            .promoting
            .filter(|p| p.phase == PromotionPhase::Handshake)
        else {
            return;
        };
        self.promoting = None;
        if self.stop != StopState::Running {
            out.push(Action::AdminDone {
                tag: p.tag,
                result: Err(AdminError::ShuttingDown),
            });
            return;
        }
        if self.promotion_must_ask(p.force) {
            self.ask_promotion(p.tag, p.force, out);
            return;
        }
        let result = self.promote_if_allowed(p.force, out);
        self.answer_promotion_command(p.tag, result, out);
    }

    /// Promotes this node if it may be promoted on its own (the checks of a node without a
    /// connection, or after the peer's yes).
    fn promote_if_allowed(&mut self, force: bool, out: &mut Vec<Action>) -> Result<(), AdminError> {
        self.may_promote(force, false)?;
        self.promote(force, out);
        Ok(())
    }

    /// Answers a `primary` command that waited (for the handshake, or the peer's answer).
    fn answer_promotion_command(
        &mut self,
        tag: u64,
        result: Result<(), AdminError>,
        out: &mut Vec<Action>,
    ) {
        if self.role == Role::Primary {
            self.verify_role_changed(out);
        }
        out.push(Action::AdminDone { tag, result });
    }

    /// `primary` asks the peer: this Secondary is connected past the handshake and may be
    /// promoted as far as it knows (else `admin` answers at once: a refusal, or a promotion
    /// on its own when not connected).
    fn promotion_must_ask(&self, force: bool) -> bool {
        self.cfg.bug != InjectedBug::PromoteWithoutAsking
            && self.stop == StopState::Running
            && self.role == Role::Secondary
            && self.promoting.is_none()
            && self.conn.as_ref().is_some_and(|c| c.decided)
            && self.may_promote(force, true).is_ok()
    }

    /// The peer asks to become Primary: no if this node is Primary; yes if it is not asking
    /// itself. After a yes this node cannot become Primary before it hears the asker's new
    /// role: its own ask would reach the asker after the yes, and be refused.
    ///
    /// Asks that cross (`primary` on both nodes at once): both nodes see the other's ask while
    /// their own waits, and both apply the same rule, so exactly one goes ahead: the lower node
    /// id (the node listed first in the resource file; the handshake refuses equal ids). It
    /// refuses the peer's ask and waits for the peer's answer to its own; the other abandons its
    /// own ask (its `primary` fails, naming the winner) and only then answers yes. Whatever
    /// the winner answers to the abandoned ask changes nothing (no ask waits for it), and the
    /// winner received that ask before the yes (one control stream), so it refused it while its
    /// own still waited: never two yeses, never two Primaries.
    fn answer_promotion(&mut self, id: u64, out: &mut Vec<Action>) {
        let verdict = if self.role == Role::Primary {
            PromoteVerdict::NoPrimary
        } else if let Some(mine) = self.promoting {
            match self.cfg.bug {
                // Both refuse (the old rule), or both say yes and keep their own ask.
                InjectedBug::CrossingPromotionsBothRefused => PromoteVerdict::NoPromoting,
                InjectedBug::YesWhilePromoting => PromoteVerdict::Yes,
                _ if self.wins_crossing_promotion() => PromoteVerdict::NoPromoting,
                _ => {
                    self.promoting = None;
                    out.push(Action::AdminDone {
                        tag: mine.tag,
                        result: Err(self.promotion_conflict()),
                    });
                    PromoteVerdict::Yes
                }
            }
        } else {
            PromoteVerdict::Yes
        };
        self.send(PeerMsg::PromoteAnswer { id, verdict }, out);
    }

    /// Of two promotions asked at the same moment, this node's goes ahead: its node id is the
    /// lower one. (Without the peer's id, which a connection past its handshake always has,
    /// it refuses: both refusing is safe.)
    fn wins_crossing_promotion(&self) -> bool {
        self.conn
            .as_ref()
            .and_then(|c| c.peer_node_id)
            .map_or(true, |peer| self.cfg.node_id < peer)
    }

    /// The peer answered this node's ask: the promotion commits on its yes (if this node may
    /// still be promoted), else the command fails with the peer's reason.
    fn promotion_answered(&mut self, id: u64, verdict: PromoteVerdict, out: &mut Vec<Action>) {
        let Some(p) = self
            .promoting
            .filter(|p| p.phase == PromotionPhase::Asked { id })
        else {
            return;
        };
        self.promoting = None;
        let result = match verdict {
            PromoteVerdict::Yes => self.promote_if_allowed(p.force, out),
            PromoteVerdict::NoPrimary => Err(self.peer_is_primary()),
            PromoteVerdict::NoPromoting => Err(self.promotion_conflict()),
        };
        self.answer_promotion_command(p.tag, result, out);
    }

    /// The waiting promotion fails (the connection was lost, or the node stops).
    fn fail_promotion(&mut self, err: AdminError, out: &mut Vec<Action>) {
        if let Some(p) = self.promoting.take() {
            out.push(Action::AdminDone {
                tag: p.tag,
                result: Err(err),
            });
        }
    }

    /// Becomes Primary (every check passed, and the peer agreed if connected).
    fn promote(&mut self, force: bool, out: &mut Vec<Action>) {
        // What this node starts serving is stable before the promotion is saved: peer
        // and resync writes were acked once written, not flushed, and a crash of the
        // new Primary must not take back data it has already served (for a forced
        // resync target: data no bitmap of its own names once it is UpToDate, seed
        // 6208).
        if self.cfg.bug != InjectedBug::NoSyncAtPromotion {
            out.push(Action::SyncData);
        }
        if self.disk != DiskState::UpToDate {
            debug_assert!(force, "may_promote lets only a forced promotion through");
            self.current_gen = gen::fresh(self.cfg.node_id, self.current_gen, self.max_peer_gen);
            self.bitmap_gen = None;
            self.bitmap.clear_all();
            self.flush_bitmap(out);
            self.bitmap_known = true;
            self.set_disk(DiskState::UpToDate, out);
        }
        // The peer decides from the hello already sent (role, disk, generation): it
        // could make this Primary its sync target. Start the handshake over. (Only with
        // `InjectedBug::PromoteDuringHandshake`: a promotion asked during a handshake waits
        // for its outcome, see `promotion_must_wait`.)
        if self.handshaking() {
            self.close(CloseReason::PromotedDuringHandshake, out);
        }
        // An armed `--discard-my-data` meant the data this node had then; as Primary it
        // takes new writes that must not be thrown away at the next handshake.
        self.discard_my_data = false;
        // Without a peer, the new generation starts with the first write (so a node
        // promoted before its peer connects does not cost a resync).
        self.set_role(Role::Primary, out);
        self.save_meta(out);
        self.send_state(out);
        // A connection refused because neither side had good data (the usual state
        // before the first `primary --force`) is worth trying again now; not after
        // the operator's `disconnect`.
        if !self.want_connect && !self.admin_disconnected {
            self.want_connect = true;
            self.last_refusal = None;
            if self.repl == ReplState::StandAlone {
                self.set_repl(ReplState::Connecting, out);
            }
        }
    }

    fn admin(&mut self, cmd: AdminCmd, out: &mut Vec<Action>) -> Result<(), AdminError> {
        match cmd {
            AdminCmd::Promote { force } => {
                if self.role == Role::Primary {
                    if let Some(tag) = self.demoting.take() {
                        out.push(Action::AdminDone {
                            tag,
                            result: Err(AdminError::DemotionCancelled),
                        });
                    }
                    return Ok(());
                }
                if self.promoting.is_some() {
                    return Err(AdminError::PromotionPending);
                }
                // (Connected, it asked the peer instead: see `promotion_must_ask`.)
                self.promote_if_allowed(force, out)
            }
            AdminCmd::Demote => {
                if self.promoting.is_some() {
                    return Err(AdminError::PromotionPending);
                }
                if self.role == Role::Secondary {
                    return Ok(());
                }
                self.refuse_while_open(ClientsCommand::Secondary)?;
                if self.demoting.is_some() {
                    return Err(AdminError::DemotionPending);
                }
                // This disk's own last writes are stable before the metadata stops saying
                // Primary: after that a crash no longer adds the activity log to the bitmap,
                // and the new Primary's transfer log never named them (simulator seed 266: a
                // demoted node crashed and lost a block the new Primary had, unmarked).
                out.push(Action::SyncData);
                let n = self.reqs.len() + self.admit_q.len();
                if n > 0 {
                    return Err(AdminError::RequestsInFlight { requests: n });
                }
                self.set_role(Role::Secondary, out);
                self.save_meta(out);
                self.send_state(out);
                Ok(())
            }
            AdminCmd::Connect => {
                if let Some(f) = self.disk_failure {
                    return Err(AdminError::DiskFailed(f));
                }
                self.want_connect = true;
                self.admin_disconnected = false;
                self.last_refusal = None;
                if self.repl == ReplState::StandAlone {
                    self.set_repl(ReplState::Connecting, out);
                }
                Ok(())
            }
            AdminCmd::Invalidate => {
                if self.role == Role::Primary {
                    return Err(AdminError::InvalidatePrimary);
                }
                // Inconsistent with an untrusted bitmap: the next handshake can only make this
                // node a full sync target.
                self.set_disk(DiskState::Inconsistent, out);
                self.bitmap_known = false;
                self.save_meta(out);
                if self.conn.is_some() {
                    self.close(CloseReason::Invalidated, out);
                }
                self.want_connect = true;
                self.last_refusal = None;
                if self.repl == ReplState::StandAlone {
                    self.set_repl(ReplState::Connecting, out);
                }
                Ok(())
            }
            AdminCmd::Verify => self.admin_verify(out),
            AdminCmd::Adjust(a) => self.admin_adjust(a),
            AdminCmd::Down => self.refuse_while_open(ClientsCommand::Down),
            AdminCmd::DiscardMyData => {
                if self.role == Role::Primary {
                    return Err(AdminError::DiscardOnPrimary);
                }
                // Too late for this handshake: its hello went out without the flag, and the
                // decision would clear it. Silently, the operator's "discard my data" then lost
                // to a policy that discarded the peer's (simulator seed 3584).
                if self.handshaking() && self.cfg.bug != InjectedBug::DiscardDuringHandshake {
                    return Err(AdminError::DiscardDuringHandshake);
                }
                self.discard_my_data = true;
                Ok(())
            }
            AdminCmd::Disconnect => {
                self.want_connect = false;
                self.admin_disconnected = true;
                self.close(CloseReason::AdminDisconnected { retry: false }, out);
                // The operator takes responsibility for going on without the fence.
                self.unfreeze(out);
                self.set_repl(ReplState::StandAlone, out);
                Ok(())
            }
        }
    }
}

/// The disk state changes the core makes (the same state is always allowed). Data gets worse
/// only as a sync target or by an error (UpToDate/Outdated -> Inconsistent) or when the peer
/// pulls ahead (UpToDate -> Outdated); it gets better only by a finished resync or a forced
/// promotion (-> UpToDate). An Inconsistent disk never becomes merely Outdated, and the core
/// never detaches (Diskless).
fn legal_disk_change(from: DiskState, to: DiskState) -> bool {
    use DiskState::*;
    from == to
        || matches!(
            (from, to),
            (UpToDate, Inconsistent | Outdated)
                | (Outdated, Inconsistent | UpToDate)
                | (Inconsistent, UpToDate)
        )
}

/// The replication state changes the core makes (the same state is always allowed). Losing
/// the connection is legal from anywhere; everything else follows the handshake's decision
/// or the pull-ahead cycle (Established -> Ahead -> SyncSource -> Established on the Primary,
/// Established -> Behind -> SyncTarget -> Established on its peer).
fn legal_repl_change(from: ReplState, to: ReplState) -> bool {
    use ReplState::*;
    from == to
        || matches!(to, StandAlone | Connecting)
        || matches!(
            (from, to),
            (Connecting, Established | SyncSource | SyncTarget)
                | (Established, Ahead | Behind)
                | (Ahead, SyncSource)
                | (Behind, SyncTarget)
                | (SyncSource | SyncTarget, Established)
        )
}

/// Whether a resync chunk is all zeroes (then it travels without payload).
fn all_zero(data: &[u8]) -> bool {
    // OR-folding fixed-size pieces vectorizes; the early exit keeps data chunks cheap.
    data.chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests;
