//! The deterministic simulator: two nodes built from the real `Replica`, simulated disks and a
//! simulated network, every peer message through the real wire codec. Single-threaded; the
//! whole run is a function of the seed.

pub mod disk;
pub mod oracle;
pub mod rng;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use bytes::Bytes;
use twinblk::core::congestion::{Congestion, OnCongestion};
use twinblk::core::{
    Action, AdminCmd, AdminError, CloseReason, Config, DiskState, Event, FailedIo, Handover,
    InjectedBug, IoId, LinkLoss, Meta, PeerMsg, Protocol, Refusal, ReplState, Replica, Restored,
    Role, TimerKind,
};
use twinblk::wire::{self, Stream};

use disk::{SimDisk, BS};
use oracle::Oracle;
use rng::Rng;

const A: usize = 0;
const B: usize = 1;
const US: u64 = 1_000;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub protocol: Protocol,
    pub blocks: usize,
    pub client_ops: u64,
    pub queue_depth: usize,
    pub faults: bool,
    pub bug: InjectedBug,
    /// After a crash of the Primary, promote the survivor (as an operator would, `--force` when
    /// it is refused); the old Primary returns as Secondary.
    pub failover: bool,
    /// Partitions during which the Secondary is promoted and written too (split brain).
    pub split_brain: bool,
    /// Split-brain policy both nodes share (else an explicit `--discard-my-data` resolves it).
    pub sb_policy: bool,
    /// Checksum-based resync (odd seeds; not drawn from the rng, so other seeds replay as
    /// before).
    pub csums: bool,
    /// Async only: `on-congestion = pull-ahead` with a low `congestion-fill`.
    pub pull_ahead: bool,
    /// Resync rate controller: (max rate, min rate) in bytes/s, 0 = off.
    pub resync_rate: (u64, u64),
    /// The primary's stability points (flush barriers of its own): every this many ns...
    pub stability_interval: u64,
    /// ...or this many writes.
    pub stability_writes: usize,
    /// `al-updates`: off = no activity-log transactions, a crashed Primary resyncs everything.
    /// Off on one seed in four (`(seed / 2) % 4 == 3`). Seed 143 (off) once failed the
    /// split-brain check: not the core, the oracle: an unflushed write on the winner had hidden
    /// a block of the split brain's loser that a crash of the winner brought back; `adopt`
    /// accepts what the winner's disk falls back to since 3f92c22. It passes in both protocol
    /// modes (`TWINBLK_SIM_PROTOCOL`).
    pub al_updates: bool,
    /// A partition after which the client stalls (issues nothing more), and the operator
    /// mostly demotes the old Primary and promotes the stale Secondary, which writes or not,
    /// before the nodes meet again (issue 17, defect 1).
    pub stale_promotion: bool,
    /// Planned switchovers under load: `secondary` on the Primary, then `primary` on the peer
    /// (issue 17, defect 3); half of them are switched back at once, while the first one's
    /// role changes may still be on their way (the promotion agreed with the peer).
    pub switchover: bool,
    /// `on-peer-lost` configured: a Primary losing its UpToDate peer freezes until the
    /// simulated hook reports the peer fenced (it fails now and then, and is retried).
    pub fencing: bool,
    /// Graceful stops (`twinblk down`) among the faults, each followed by a restart.
    pub downs: bool,
    /// How long a graceful stop waits for the peer (`Config::stop_drain`): short, so the
    /// drain expires in some stops.
    pub stop_drain: u64,
    /// Failed flushes (sticky, dropping part of the disk's cache) on either node; the node's
    /// disk fails (issue 17, defect 4) and the operator restarts it. On by default since the
    /// false 'both nodes are Primary' below is fixed: 20,000 seeds per protocol pass with it
    /// on (`TWINBLK_SIM_FLUSH_FAULTS=0` turns it off for a scan). On (which
    /// changes every seed's random sequence), 20,000 sync seeds found: seed 3986, a failover to
    /// a survivor whose disk had failed (the operator now restarts it first, see `failover`);
    /// seed 7162, not about flushes: a switchover back started right after one, the new
    /// Primary's State (Primary) still on its way when it demoted again, so the old Primary
    /// promoted on its stale view of a Secondary peer, then received that State and refused
    /// "both nodes are Primary": a false split-brain report of the core (async seed 10524 of
    /// the default run reached it too once a failed peer write detached the disk), fixed since
    /// a connected promotion is agreed with the peer (`InjectedBug::PromoteWithoutAsking`); and
    /// three checkers whose known seeds move (`promotion_without_sync`,
    /// `switchover_that_overtakes_the_tail`, `stop_that_saves_not_primary_before_the_bitmap`;
    /// they pin flush faults off now, as `acks_after_a_core_initiated_close_...` does: on,
    /// none of its 200 seeds catches its bug). Async seed 922 was the oracle's: a Primary whose
    /// flush failed with its peer UpToDate gives its disk up (Inconsistent), so the peer's disk is
    /// the data, not the failed one (`peer_takes_over_a_failed_disk`). The activity log's
    /// pre-flush fails too (then the driver exited; since session 20 the core fails the disk,
    /// `FailedIo::ActivityLog`), which moved every seed
    /// again; 20,000 seeds per protocol then found: async 10732 (and 6890 before), a core
    /// bug: a false split brain over "unrelated" data after a cut at a pull-ahead's resync
    /// end, fixed in `gen::at_resync_end`; async 12174, the oracle's: the peer of a Primary
    /// whose disk failed crashed before it was promoted, and its disk is still the data;
    /// async 15081, the stale-promotion check's: a policy's source that decided before a cut
    /// had moved its bitmap generation, so the divergence must stay known; sync 16112, the
    /// switchover's: begun during a stop's drain, it waited for ever for the answer of a
    /// demotion the crash cut off (`crash` ends it, as for sync seed 8908). At 100,000 async
    /// seeds: 42766, a core bug (`InjectedBug::HangUpOnDiskFailure`); 98062, the simulator's:
    /// both disks failed, the Primary's first, and it took the peer's failed disk for "the data"
    /// without the forced promotion an operator needs there (`force_on_restart`).
    /// `TWINBLK_SIM_FLUSH_FAULTS=0|1` overrides it for `random_workloads_with_faults`.
    pub flush_faults: bool,
    /// The operator's `adjust` now and then on a running node: the resync rates and
    /// `on-peer-lost` (fencing on or off) change live, as the real `adjust` does; turning
    /// fencing off while writes wait for it must be refused (`fencing-still-needed`).
    pub adjusts: bool,
    /// Fencing is STONITH: a successful fence kills the peer (its disk loses what it had not
    /// made stable), then the Primary resumes; the peer restarts as Secondary.
    pub stonith: bool,
    /// With faults on, about one disk I/O in this many fails (400; flushes twice as often,
    /// other writes a quarter as often). Lower reaches disk-failure schedules faster
    /// (`TWINBLK_SIM_DISK_FAULTS=N`).
    pub disk_fault_rate: u64,
}

impl SimConfig {
    pub fn for_seed(seed: u64) -> SimConfig {
        let mut r = Rng::new(seed);
        SimConfig {
            seed,
            protocol: if r.one_in(2) {
                Protocol::Sync
            } else {
                Protocol::Async
            },
            blocks: 64,
            client_ops: r.range(60, 250),
            queue_depth: r.range(1, 8) as usize,
            faults: true,
            bug: InjectedBug::None,
            failover: r.one_in(2),
            split_brain: r.one_in(2),
            sb_policy: r.one_in(3),
            csums: seed % 2 == 1,
            // Drawn last, so earlier draws (and the seeds they reproduce) stay as they were.
            pull_ahead: r.one_in(2),
            resync_rate: match r.below(4) {
                0 => (0, 0),
                1 => (0, 64 << 20),
                2 => (32 << 20, 8 << 20),
                _ => (256 << 20, 0),
            },
            stability_interval: r.range(100 * US, 5000 * US),
            stability_writes: r.range(2, 40) as usize,
            al_updates: (seed / 2) % 4 != 3,
            // Drawn after the others, so the seeds without them replay as before.
            stale_promotion: r.one_in(3),
            switchover: r.one_in(3),
            fencing: r.one_in(2),
            downs: r.one_in(2),
            stop_drain: r.range(200 * US, 4000 * US),
            flush_faults: true,
            // Drawn last, so the seeds of every earlier configuration replay as before.
            adjusts: r.one_in(3),
            stonith: r.one_in(2),
            // Not drawn: every seed replays as before.
            disk_fault_rate: 400,
        }
    }
}

/// A split brain the simulator made: both nodes Primary and written while partitioned.
#[derive(Debug, Default)]
struct Split {
    /// The node promoted behind the Primary's back.
    rogue: usize,
    /// Version ids (oracle tags) each side wrote since the partition.
    written: [Vec<u64>; 2],
    /// Each node reported the split brain (status and a `Refused` change).
    reported: [bool; 2],
    /// Rogue writes still to issue.
    rogue_ops: u64,
    /// The rogue was promoted.
    promoted: bool,
    /// A `Resolve` is scheduled.
    resolve_scheduled: bool,
    /// Node incarnations when the split brain was first refused.
    incs: [u64; 2],
    /// `connect` retries after a report on one node only.
    retries: u32,
    /// The operator's choice is fixed: this node's data goes (after a forced failover).
    loser: Option<usize>,
    /// The rogue was demoted before the partition healed (the after-sb-1pri policy applies).
    rogue_demoted: bool,
    /// The rogue's persisted generation, when its promotion left it as it was (a plain
    /// promotion: the new generation starts, durably, with the first write).
    gen_unbumped: Option<u64>,
    /// The rogue's `primary` waits for its connection's handshake (the partition had not
    /// reached it yet): its generation before that command, and whether it was forced on a
    /// node that never learnt what it lacks (see `failover`).
    waited: Option<(u64, bool)>,
    /// The operator's resolution was issued: `connect --discard-my-data` on this node.
    resolved_by: Option<usize>,
    /// A data write reached each node's disk since the partition. The core moves the
    /// generation (durably) before a node's first such write, so a rogue that crashed before
    /// any did has not diverged: its peer rightly resyncs it as merely behind (seed 6843: the
    /// rogue's first write waited for an activity-log transaction and the crash came first).
    issued: [bool; 2],
}

#[derive(Debug)]
enum DiskOp {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// A discard: per block, 0 leaves it, 1 zeroes it, 2 leaves stale bytes.
    Discard {
        offset: u64,
        len: u64,
        keep: Vec<u8>,
    },
    /// Covers the block writes completed when it was issued ([`SimDisk::flush_upto`]).
    Flush {
        upto: u64,
    },
    Read {
        offset: u64,
        len: u64,
    },
    /// An activity-log transaction: pre-flush (of the block writes completed when it was
    /// issued), then the log names exactly `extents`.
    AlTxn {
        extents: Vec<u64>,
        upto: u64,
    },
}

#[derive(Debug)]
enum Ev {
    Disk {
        node: usize,
        inc: u64,
        io: IoId,
        op: DiskOp,
        fail: Option<i32>,
    },
    Deliver {
        to: usize,
        conn: u64,
        frame: Bytes,
    },
    ConnUp {
        conn: u64,
    },
    ConnDown {
        node: usize,
        conn: u64,
        reason: LinkLoss,
    },
    Timer {
        node: usize,
        inc: u64,
        kind: TimerKind,
    },
    ClientTick,
    Fault,
    Restart {
        node: usize,
    },
    /// The operator promotes the survivor of a Primary crash.
    Failover,
    /// A write to the rogue Primary of a split brain.
    RogueWrite,
    /// The operator looks at a reported split brain and resolves it.
    Resolve,
    /// The operator demotes a Primary that was refused because the peer has newer data.
    DemoteStale {
        node: usize,
    },
    /// The link fails just as a resync finishes (around `ResyncDone`).
    CutAtResyncEnd,
    /// The stale-promotion episode's operator step (see [`Stale`]).
    StalePromote,
    /// The planned switchover's next step (see [`Switch`]).
    Switchover,
    /// `twinblk down` on a node (once its clients' requests are answered).
    Down {
        node: usize,
    },
    /// The link fails (during a stop's drain, or just before a stop).
    DropLink,
    /// The `on-peer-lost` hook of freeze `episode` exits.
    FenceDone {
        node: usize,
        inc: u64,
        episode: u64,
        ok: bool,
    },
    /// The operator restarts a node whose disk failed (incarnation `inc`).
    RestartFailedNode {
        node: usize,
        inc: u64,
    },
}

/// A partition after which the client stalls; the operator may demote the old Primary and
/// promote the stale node (see [`SimConfig::stale_promotion`]).
#[derive(Debug)]
struct Stale {
    /// The Primary when the partition came.
    old: usize,
    /// The operator promotes the stale node (else only the client stalls).
    promote: bool,
    /// The operator demotes the old Primary first.
    demote_old: bool,
    /// The promoted node gets the client's writes (else the client stays stalled until the
    /// nodes meet again).
    new_writes: bool,
    /// The partition came (the client stalls a moment before it, so that what it leaves
    /// behind is writes in flight or unstable on the peer, not writes still queued: a queued
    /// write issued after the loss would move the generation by itself).
    cut: bool,
    /// The operator step happened.
    acted: bool,
    /// Blocks whose newest acknowledged version the promoted node lacked when promoted.
    missing: Vec<usize>,
    /// A refusal (split brain included) was reported since the partition.
    reported: bool,
    /// Before the last handshake decided: both had moved on from the generation they last
    /// shared (a split brain, which a shared policy may resolve), rather than one side still at
    /// it (resolved by bitmaps without a report).
    diverged: bool,
}

/// A planned switchover in progress (see [`SimConfig::switchover`]).
#[derive(Debug)]
struct Switch {
    old: usize,
    demote_sent: bool,
    /// The answer to the old Primary's `secondary` (it may come later: it waits for the peer).
    demoted: Option<Result<(), AdminError>>,
    /// `primary` sent to the peer, not yet answered (it asks the old Primary first).
    promote_sent: bool,
    /// The answer to the peer's `primary`.
    promoted: Option<Result<(), AdminError>>,
    /// `primary` on the peer refused because the old Primary is still Primary, as the peer
    /// saw it or as the old Primary answered: the demotion's state change is on its way (the
    /// operator tries again).
    retries: u32,
    /// Started right after the switchover before it finished (back to the node that was
    /// Primary before): the state changes of the first may still be on their way.
    back_to_back: bool,
    /// Once the demotion answered, the operator runs `primary` on both nodes at once (a
    /// DRBD user's habit): their asks cross, and exactly one must go ahead (the lower node
    /// id, node A), the other's `primary` failing.
    both: bool,
    /// The answer to the old Primary's `primary` (with `both`).
    promoted_old: Option<Result<(), AdminError>>,
}

/// Admin tags of the switchover's commands, so their (possibly later) answers are recognised.
const SWITCH_DEMOTE: u64 = 0x5717_0001;
const SWITCH_PROMOTE: u64 = 0x5717_0002;
/// The admin tag of the simulated operator's `adjust`.
const ADJUST: u64 = 0x5717_0003;
const SWITCH_PROMOTE_OLD: u64 = 0x5717_0004;

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}
impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct Node {
    replica: Option<Replica>,
    disk: SimDisk,
    /// The persisted metadata area: what survives a crash.
    meta: Meta,
    bitmap: Vec<u64>,
    al: Vec<u64>,
    inc: u64,
}

/// An outstanding client request at the primary.
#[derive(Debug, Clone)]
pub enum ClientReq {
    Write {
        tag: u64,
        first: usize,
        n: usize,
        fua: bool,
        zero: bool,
    },
    Flush {
        conn_epoch: u64,
        snapshot: Vec<u64>,
        /// [`oracle::Oracle::completed`] when the flush was submitted.
        completed: Vec<u64>,
    },
}

pub struct World {
    pub cfg: SimConfig,
    rng: Rng,
    /// Draws for `primary` on both nodes at once (`Switch::both`), apart from `rng`, so the
    /// seeds whose switchovers never take that turn replay as before it existed.
    both_rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: [Node; 2],
    conn: Option<u64>,
    next_conn: u64,
    connecting: bool,
    partitioned_until: u64,
    stream_last: HashMap<(usize, u8), u64>,
    ops_left: u64,
    outstanding: HashMap<u64, ClientReq>,
    next_req: u64,
    oracle: Oracle,
    /// Tags of writes shipped by the primary -> connection epoch they were shipped in.
    replicated_tags: HashMap<u64, u64>,
    /// Bumped whenever the primary's connection changes (flush confirmation bookkeeping).
    conn_epoch: u64,
    healing: bool,
    b_prev_repl: ReplState,
    /// The node the client writes to (the oracle's Primary); the other is the Secondary.
    prim: usize,
    /// A failover was decided after the Primary crashed and has not happened yet.
    failover_pending: bool,
    split: Option<Split>,
    /// Client requests to the rogue Primary: req -> (version id, first block, blocks).
    rogue_out: HashMap<u64, (u64, usize, usize)>,
    /// Version ids of the side that lost a split brain: they must be gone from both disks.
    discarded: std::collections::HashSet<u64>,
    /// The client stops issuing (the operator is about to change roles).
    client_paused: bool,
    /// The split-brain resolution paused the client (its loser is the Primary) and waits for
    /// the I/O in flight; lifted when it resolves, or when the split ends otherwise first.
    resolve_paused: bool,
    /// A forced promotion, or one of a survivor that was not in sync with the Primary when it
    /// died (it may lack what the Primary wrote alone: a stale node, as DRBD's without
    /// fencing), happened and the nodes have not been in sync since: the returning node may be
    /// refused as a split brain. After a failover from Established, never.
    forced_failover: bool,
    /// The survivor was Established and UpToDate when the Primary died.
    survivor_in_sync: bool,
    /// The pending failover is to the peer of a Primary whose disk failed
    /// (`peer_takes_over_a_failed_disk`): the peer's disk is the data even if it crashes first.
    failed_disk_takeover: bool,
    /// The forced promotion was of a node whose bitmap was not trusted (an Inconsistent sync
    /// target before it learnt what it lacks): the bitmaps describe nothing until the nodes
    /// were in sync again (the next sync must be full).
    untrusted_promotion: bool,
    /// The link was cut after the sync source sent `ResyncDone` and before the target applied
    /// it: (target, its generation then). Until the target's generation moves (a forced
    /// promotion), its next resync must resume from the bitmaps, not be full.
    end_cut: Option<(usize, u64)>,
    stale: Option<Stale>,
    switching: Option<Switch>,
    /// A `down` waits for the clients of this node to finish (the client submits nothing
    /// new to it meanwhile), or the node is draining.
    down_node: Option<usize>,
    /// Deliveries to this node wait until the given time (it is stopped, as by SIGSTOP).
    stalled: Option<(usize, u64)>,
    /// The next `down` stalls the peer first.
    stall_at_down: bool,
    /// A node emitted `Action::Stopped`: its process exits after the batch.
    exiting: [bool; 2],
    /// The node went down (gracefully, or power failed during its stop) and has not restarted.
    was_down: [bool; 2],
    /// A write of the peer's data (replicated or resync) failed on this node's disk since it
    /// last started: it must not connect again before a restart (DRBD's `on-io-error
    /// detach`; reconnecting resyncs into the same failing disk, a storm while a disk is full).
    peer_write_failed: [bool; 2],
    /// Both disks failed (the Primary's first): the operator forces this node when it is back.
    force_on_restart: [bool; 2],
    /// Fencing: the node, Primary, lost its UpToDate peer and nothing since ended the freeze
    /// (the hook's success, the peer connecting again, `disconnect`): no write may be
    /// acknowledged.
    unfenced: [bool; 2],
    /// Each node's latest fencing episode (its last [`Action::FencePeer`]): a hook's answer for
    /// an older one comes after that freeze ended, and the core rightly ignores it.
    fence_episode: [Option<u64>; 2],
    /// Each node's `on-peer-lost` as the operator last adjusted it (the resource file a restart
    /// reads too): starts as `SimConfig::fencing`.
    fencing: [bool; 2],
    /// Each node's resync rates (max, min) as last adjusted.
    rates: [(u64, u64); 2],
    /// The answer to the operator's last `adjust`.
    adjusted: Option<Result<(), AdminError>>,
    /// Frames scheduled for delivery and not yet delivered (or dropped), per connection: at 0
    /// on a decided connection, each node's view of its peer's state is the peer's truth.
    frames_in_flight: HashMap<u64, u64>,
    trace: Vec<String>,
    pub events: u64,
    /// What happened, for the coverage summary.
    pub stats: std::collections::BTreeMap<&'static str, u64>,
}

fn tag_of(data: &[u8]) -> u64 {
    data.get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0)
}

pub fn block_for(tag: u64) -> Vec<u8> {
    let mut v = vec![(tag as u8) | 1; BS];
    v[..8].copy_from_slice(&tag.to_le_bytes());
    v[BS - 8..].copy_from_slice(&tag.to_le_bytes());
    v
}

impl World {
    pub fn new(cfg: SimConfig) -> World {
        let mk = || Node {
            replica: None,
            disk: SimDisk::new(cfg.blocks),
            meta: Meta::new_device(),
            bitmap: Vec::new(),
            al: Vec::new(),
            inc: 0,
        };
        let mut w = World {
            rng: Rng::new(cfg.seed.wrapping_mul(31).wrapping_add(7)),
            both_rng: Rng::new(cfg.seed ^ 0x5717_b07b),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: [mk(), mk()],
            conn: None,
            next_conn: 1,
            connecting: false,
            partitioned_until: 0,
            stream_last: HashMap::new(),
            ops_left: cfg.client_ops,
            outstanding: HashMap::new(),
            next_req: 1,
            oracle: Oracle::new(cfg.blocks),
            replicated_tags: HashMap::new(),
            conn_epoch: 0,
            healing: false,
            b_prev_repl: ReplState::StandAlone,
            prim: A,
            failover_pending: false,
            split: None,
            rogue_out: HashMap::new(),
            discarded: Default::default(),
            client_paused: false,
            resolve_paused: false,
            forced_failover: false,
            survivor_in_sync: false,
            failed_disk_takeover: false,
            untrusted_promotion: false,
            end_cut: None,
            stale: None,
            switching: None,
            down_node: None,
            stalled: None,
            stall_at_down: false,
            exiting: [false; 2],
            was_down: [false; 2],
            peer_write_failed: [false; 2],
            force_on_restart: [false; 2],
            unfenced: [false; 2],
            fence_episode: [None; 2],
            fencing: [cfg.fencing; 2],
            rates: [cfg.resync_rate; 2],
            adjusted: None,
            frames_in_flight: HashMap::new(),
            trace: Vec::new(),
            events: 0,
            stats: Default::default(),
            cfg,
        };
        w.start(A);
        w.start(B);
        w.admin(A, AdminCmd::Promote { force: true });
        w.admin(A, AdminCmd::Connect);
        w.admin(B, AdminCmd::Connect);
        w.schedule(10 * US, Ev::ClientTick);
        if w.cfg.faults {
            let d = w.rng.range(200 * US, 3000 * US);
            w.schedule(d, Ev::Fault);
        }
        w
    }

    fn log(&mut self, s: String) {
        if std::env::var_os("TWINBLK_SIM_TRACE").is_some() {
            eprintln!("[{:>10}] {s}", self.now);
        }
        if self.trace.len() > 400 {
            self.trace.drain(..200);
        }
        self.trace.push(format!("[{:>10}] {s}", self.now));
    }

    fn schedule(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: self.now + delay,
            seq: self.seq,
            ev,
        });
    }

    fn start(&mut self, node: usize) {
        let mut cfg = Config::new(
            "r0",
            node as u64 + 1,
            (self.cfg.blocks * BS) as u64,
            self.cfg.protocol,
        );
        cfg.send_buffer = 6 * BS as u64;
        cfg.resync_chunk = 4 * BS as u64;
        cfg.resync_rate.fill_target = 3 * 4 * BS as u64;
        cfg.resync_rate.max_rate = self.rates[node].0;
        cfg.resync_rate.min_rate = self.rates[node].1;
        cfg.resync_rate.plan_ahead = 2000 * US;
        if self.cfg.pull_ahead {
            cfg.congestion = Congestion {
                on_congestion: OnCongestion::PullAhead,
                fill: 3 * BS as u64,
            };
        }
        cfg.handshake_timeout = 50_000 * US;
        cfg.bug = self.cfg.bug;
        if self.cfg.sb_policy {
            cfg.after_sb_1pri = twinblk::core::AfterSb1Pri::DiscardSecondary;
        }
        cfg.csums = self.cfg.csums;
        cfg.stability_interval = self.cfg.stability_interval;
        cfg.stability_writes = self.cfg.stability_writes;
        // Also how much resync data may be unstable on the target: small, so resyncs on the
        // 64-block device are made stable piecewise and crashes fall between the pieces.
        cfg.stability_bytes = 2 * BS as u64 * self.cfg.stability_writes as u64;
        // Small extents and log so the 64-block device sees evictions.
        cfg.al_extent = 8 * BS as u64;
        cfg.al_extents = 3;
        cfg.al_updates = self.cfg.al_updates;
        cfg.stop_drain = self.cfg.stop_drain;
        cfg.fence_retry = 500 * US;
        if self.fencing[node] {
            cfg.fencing = twinblk::core::Fencing::FreezeUntilFenced;
        }
        self.peer_write_failed[node] = false;
        let n = &mut self.nodes[node];
        n.inc += 1;
        n.replica = Some(Replica::restore(
            cfg,
            Restored {
                meta: n.meta,
                bitmap: n.bitmap.clone(),
                activity_log: n.al.clone(),
            },
        ));
        self.log(format!(
            "node {node} starts with {:?}",
            self.nodes[node].meta
        ));
    }

    fn admin(&mut self, node: usize, cmd: AdminCmd) {
        self.feed(node, Event::Admin { tag: 0, cmd });
    }

    /// After a `primary` on `node`: whether it waits (for the node's handshake to decide, or the
    /// peer's answer) rather than answered at once. The operator's flow then comes back later,
    /// as the CLI waits for the answer; counted under `what`.
    fn promotion_waits(&mut self, node: usize, what: &'static str) -> bool {
        let waits = self.status(node).is_some_and(|s| s.promoting);
        if waits {
            *self.stats.entry(what).or_default() += 1;
        }
        waits
    }

    fn alive(&self, node: usize) -> bool {
        self.nodes[node].replica.is_some()
    }

    pub fn status(&self, node: usize) -> Option<twinblk::core::Status> {
        self.nodes[node].replica.as_ref().map(|r| r.status())
    }

    /// Feeds one event to a node and executes the actions.
    fn feed(&mut self, node: usize, ev: Event) {
        let Some(r) = self.nodes[node].replica.as_mut() else {
            return;
        };
        let is_down = matches!(ev, Event::ConnectionDown { .. })
            || matches!(
                ev,
                Event::Admin {
                    cmd: AdminCmd::Disconnect,
                    ..
                }
            );
        // A Primary with an UpToDate peer on a decided connection, not stopping: losing that
        // peer, whether the transport reports it or the core closes the connection itself (a
        // crc error, a local write error, a protocol violation), must hold every completion
        // until the peer is fenced. Only the operator's `disconnect` (and the stop, whose
        // clients are gone) and the peer's new connection replacing the old are not such a
        // loss.
        let had_up_to_date_peer = {
            let s = r.status();
            s.role == Role::Primary
                && s.peer_disk == Some(DiskState::UpToDate)
                && !matches!(s.repl, ReplState::StandAlone | ReplState::Connecting)
                && !s.stopping
        };
        let transport_loss = matches!(ev, Event::ConnectionDown { .. });
        let operator = matches!(
            ev,
            Event::Admin {
                cmd: AdminCmd::Disconnect,
                ..
            } | Event::Stop
                | Event::ConnectionUp { .. }
        );
        let ends_freeze = matches!(
            ev,
            Event::ConnectionUp { .. }
                | Event::Fenced { result: Ok(()), .. }
                | Event::Stop
                | Event::Admin {
                    cmd: AdminCmd::Disconnect,
                    ..
                }
        );
        // `primary` never promotes on this node's own view while its connection's handshake
        // is undecided (connected, still Connecting): the peer's hello, a moment away, may
        // name it the sync target (`InjectedBug::PromoteDuringHandshake`). It waits, and goes
        // on at the handshake's outcome (a later event).
        let handshaking_secondary = matches!(
            ev,
            Event::Admin {
                cmd: AdminCmd::Promote { .. },
                ..
            }
        ) && {
            let s = r.status();
            self.conn.is_some() && s.role == Role::Secondary && s.repl == ReplState::Connecting
        };
        let mut out = Vec::new();
        r.handle(ev, self.now, &mut out);
        if handshaking_secondary && r.status().role == Role::Primary {
            self.fail(format!(
                "node {node} was promoted during its connection's handshake, on its own view"
            ));
        }
        if ends_freeze {
            self.unfenced[node] = false;
        }
        let closes = out
            .iter()
            .any(|a| matches!(a, Action::CloseConnection { .. }));
        let core_close = closes && !transport_loss && !operator;
        if self.fencing[node]
            && had_up_to_date_peer
            && (transport_loss || core_close)
            && r.status().peer_disk.is_none()
        {
            self.unfenced[node] = true;
            if core_close {
                *self.stats.entry("fence: core-initiated close").or_default() += 1;
            }
        }
        let confirmable = !is_down && !closes;
        // Power fails now and then while a stop persists: its batch is cut right after one
        // of its persisting actions (or before the first), so the persist order must hold at
        // every such point.
        let stop_at = out.iter().position(|a| matches!(a, Action::Stopped(_)));
        let cut = match stop_at {
            Some(i) if self.cfg.faults && !self.healing && self.rng.one_in(3) => {
                let points: Vec<usize> = std::iter::once(0)
                    .chain(out[..i].iter().enumerate().filter_map(|(k, a)| {
                        matches!(
                            a,
                            Action::SaveMeta(_) | Action::SaveBitmap { .. } | Action::SyncData
                        )
                        .then_some(k + 1)
                    }))
                    .collect();
                let k = self.rng.below(points.len() as u64) as usize;
                points.get(k).copied()
            }
            _ => None,
        };
        for (i, a) in out.into_iter().enumerate() {
            if cut == Some(i) {
                *self
                    .stats
                    .entry("down: crash while persisting")
                    .or_default() += 1;
                self.log(format!("node {node}: power fails during its stop"));
                self.exiting[node] = false;
                self.down_node = None;
                self.was_down[node] = true;
                self.crash(node);
                return;
            }
            self.act(node, a, confirmable);
        }
        if std::mem::take(&mut self.exiting[node]) {
            // The process exits; a stop that persisted everything loses nothing here (its
            // disk was synced), one that could not is a crash as far as the disk knows.
            self.down_node = None;
            self.was_down[node] = true;
            self.crash(node);
            return;
        }
        if let Err(e) = self.check_step(node) {
            self.fail(e);
        }
        if let Err(e) = self.check_peer_views() {
            self.fail(e);
        }
        if let Err(e) = self.check_one_primary() {
            self.fail(e);
        }
    }

    /// Never two Primaries on a connection both nodes decided: a connected promotion is agreed
    /// with the peer, two Primaries meeting at a handshake are refused before it decides, and
    /// the split brains the simulator makes are made while partitioned. (Checked after every
    /// event, before the core itself would refuse the connection on the peer's State.)
    fn check_one_primary(&self) -> Result<(), String> {
        let (Some(a), Some(b)) = (self.status(A), self.status(B)) else {
            return Ok(());
        };
        let decided = |s: &twinblk::core::Status| {
            !matches!(s.repl, ReplState::StandAlone | ReplState::Connecting)
        };
        if a.role == Role::Primary && b.role == Role::Primary && decided(&a) && decided(&b) {
            return Err(format!(
                "two Primaries on one connection (node {A} {:?}, node {B} {:?})",
                a.repl, b.repl
            ));
        }
        Ok(())
    }

    /// Issue 17, defect 8: on a connection both nodes decided, once every frame sent on it was
    /// delivered, each node's view of its peer's disk (status, events, metrics) is the peer's
    /// own disk state. (While frames are on their way, a view may lag by the State message
    /// still travelling; the sync source derives its target's Inconsistent at the decision,
    /// as the target turns Inconsistent at its own.)
    fn check_peer_views(&mut self) -> Result<(), String> {
        let Some(conn) = self.conn else {
            return Ok(());
        };
        if self.frames_in_flight.get(&conn).copied().unwrap_or(0) > 0 {
            return Ok(());
        }
        let (Some(a), Some(b)) = (self.status(A), self.status(B)) else {
            return Ok(());
        };
        let decided = |s: &twinblk::core::Status| {
            !matches!(s.repl, ReplState::StandAlone | ReplState::Connecting)
        };
        if !decided(&a) || !decided(&b) {
            return Ok(());
        }
        if [&a, &b]
            .iter()
            .any(|s| matches!(s.repl, ReplState::SyncSource | ReplState::SyncTarget))
        {
            *self
                .stats
                .entry("peer disk views checked during a resync")
                .or_default() += 1;
        }
        for (n, me, peer) in [(A, &a, &b), (B, &b, &a)] {
            if me.peer_disk != Some(peer.disk) {
                return Err(format!(
                    "node {n} ({:?}) sees its peer's disk as {:?}, the peer ({:?}) says {:?}",
                    me.repl, me.peer_disk, peer.repl, peer.disk
                ));
            }
        }
        Ok(())
    }

    fn fail(&mut self, e: String) -> ! {
        // `TWINBLK_SIM_TRACE=N` shows more of the trace when replaying a seed.
        let lines = std::env::var("TWINBLK_SIM_TRACE")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(60);
        let tail = self
            .trace
            .iter()
            .rev()
            .take(lines)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        panic!(
            "invariant violated (seed {}): {e}\n--- last events ---\n{tail}\n\
             replay: TWINBLK_SIM_SEED={} cargo test --test simulator -- --nocapture",
            self.cfg.seed, self.cfg.seed
        );
    }

    /// Completes disk operation `io` of `node` (incarnation `inc`) after a random delay in
    /// `range` (nanoseconds), failing with `fail` if given.
    fn disk_later(
        &mut self,
        node: usize,
        inc: u64,
        io: IoId,
        op: DiskOp,
        fail: Option<i32>,
        range: (u64, u64),
    ) {
        let d = self.rng.range(range.0, range.1);
        self.schedule(
            d,
            Ev::Disk {
                node,
                inc,
                io,
                op,
                fail,
            },
        );
    }

    fn act(&mut self, node: usize, a: Action, confirmable: bool) {
        let inc = self.nodes[node].inc;
        let a_is_trim = matches!(a, Action::DiskTrim { .. });
        let fail_rate = if self.cfg.faults && !self.healing {
            self.cfg.disk_fault_rate.max(2)
        } else {
            0
        };

        match a {
            Action::DiskWrite {
                io,
                offset,
                data,
                fua,
            } => {
                self.check_no_overlap(node, io, offset, data.len() as u64);
                if let Some(sp) = self.split.as_mut() {
                    sp.issued[node] = true;
                }
                let fail = (fail_rate > 0 && self.rng.one_in(fail_rate)).then_some(libc::EIO);
                self.disk_later(
                    node,
                    inc,
                    io,
                    DiskOp::Write { offset, data, fua },
                    fail,
                    (5 * US, 300 * US),
                );
            }
            Action::DiskTrim { io, offset, len } | Action::DiskZero { io, offset, len } => {
                self.check_no_overlap(node, io, offset, len as u64);
                if let Some(sp) = self.split.as_mut() {
                    sp.issued[node] = true;
                }
                let len = len as u64;
                // A discard leaves what the device likes there: each block unchanged, zeroed
                // or stale (BLKDISCARD without discard_zeroes_data), independently per node.
                let op = match a_is_trim {
                    true => DiskOp::Discard {
                        offset,
                        len,
                        keep: (0..len.div_ceil(BS as u64))
                            .map(|_| self.rng.below(3) as u8)
                            .collect(),
                    },
                    false => DiskOp::Zero { offset, len },
                };
                self.disk_later(node, inc, io, op, None, (5 * US, 300 * US));
            }
            Action::DiskFlush { io } => {
                let fail =
                    (self.cfg.flush_faults && fail_rate > 0 && self.rng.one_in(fail_rate / 2))
                        .then_some(libc::EIO);
                let upto = self.nodes[node].disk.completed();
                let op = DiskOp::Flush { upto };
                self.disk_later(node, inc, io, op, fail, (20 * US, 800 * US));
            }
            Action::DiskRead { io, offset, len } => {
                let fail = (fail_rate > 0 && self.rng.one_in(fail_rate * 4)).then_some(libc::EIO);
                self.disk_later(
                    node,
                    inc,
                    io,
                    DiskOp::Read {
                        offset,
                        len: len as u64,
                    },
                    fail,
                    (5 * US, 300 * US),
                );
            }
            Action::ServeRead { .. } => {}
            Action::Send(msg) => {
                if std::env::var_os("TWINBLK_SIM_TRACE").is_some() {
                    let m = match &msg {
                        PeerMsg::Data(e) => format!(
                            "Data seq {} epoch {} off {} len {} tag {}",
                            e.seq,
                            e.epoch,
                            e.offset / BS as u64,
                            e.len,
                            tag_of(&e.data)
                        ),
                        PeerMsg::ResyncData {
                            seq, offset, data, ..
                        } => format!(
                            "ResyncData seq {seq} block {} n {} tag {}",
                            offset / BS as u64,
                            data.len() / BS,
                            tag_of(data)
                        ),
                        m => format!("{m:?}"),
                    };
                    self.log(format!("node {node} sends {m}"));
                }
                if matches!(msg, PeerMsg::ResyncZero { .. }) {
                    *self.stats.entry("resync zero runs").or_default() += 1;
                }
                if let PeerMsg::Barrier { flush, .. } = &msg {
                    let k = if *flush {
                        "flush barriers"
                    } else {
                        "order barriers"
                    };
                    *self.stats.entry(k).or_default() += 1;
                }
                self.send(node, msg)
            }
            Action::CompleteClient { req, result } => {
                if self.unfenced[node] && result.is_ok() {
                    self.fail(format!(
                        "node {node} acknowledged request {req} after losing its UpToDate peer, \
                         before the peer was fenced"
                    ));
                }
                if node == self.prim {
                    self.client_done(req, result, confirmable);
                } else if let Some((tag, first, n)) = self.rogue_out.remove(&req) {
                    self.oracle.client_completed(tag, first, n, result.is_ok());
                }
            }
            Action::ArmTimer { kind, at } => {
                let d = at.saturating_sub(self.now);
                self.schedule(d, Ev::Timer { node, inc, kind });
            }
            Action::Emit(c) => {
                if let twinblk::core::StateChange::ResyncStarted { full, .. } = &c {
                    self.check_end_cut(node, *full);
                }
                if let twinblk::core::StateChange::Repl { to, .. } = &c {
                    if self.peer_write_failed[node] && *to != ReplState::StandAlone {
                        self.fail(format!(
                            "node {node} goes {to:?} after a write of the peer's data failed on \
                             its disk, without a restart: it resyncs into the same failing disk \
                             (a full disk: a reconnect storm)"
                        ));
                    }
                }
                if let twinblk::core::StateChange::DiskFailed { failure } = &c {
                    // Its next resync is full, legitimately.
                    self.end_cut = None;
                    // The operator restarts the node (the status names the failure).
                    *self.stats.entry("disk failed").or_default() += 1;
                    let k = match (failure.io, node == self.prim) {
                        (FailedIo::Client, true) => "disk failed: client FLUSH on the Primary",
                        (FailedIo::Client, false) => "disk failed: client FLUSH on a Secondary",
                        (FailedIo::PeerBarrier, true) => {
                            "disk failed: peer barrier flush on the Primary"
                        }
                        (FailedIo::PeerBarrier, false) => {
                            "disk failed: peer barrier flush on the Secondary"
                        }
                        (FailedIo::ResyncEnd, true) => {
                            "disk failed: resync-end flush on the Primary"
                        }
                        (FailedIo::ResyncEnd, false) => {
                            "disk failed: resync-end flush on the Secondary"
                        }
                        (FailedIo::PeerWrite { .. }, true) => {
                            "disk failed: peer write on the Primary"
                        }
                        (FailedIo::PeerWrite { .. }, false) => {
                            "disk failed: peer write on the Secondary"
                        }
                        (FailedIo::ActivityLog, true) => {
                            "disk failed: activity-log transaction on the Primary"
                        }
                        (FailedIo::ActivityLog, false) => {
                            "disk failed: activity-log transaction on a Secondary"
                        }
                    };
                    *self.stats.entry(k).or_default() += 1;
                    if node == self.prim {
                        let gave_up = self
                            .status(node)
                            .is_some_and(|s| s.disk == DiskState::Inconsistent);
                        *self
                            .stats
                            .entry(if gave_up {
                                "disk failed: the Primary gave its disk up (peer UpToDate)"
                            } else {
                                "disk failed: the Primary kept its disk (the best copy)"
                            })
                            .or_default() += 1;
                    }
                    let d = self.rng.range(100 * US, 2000 * US);
                    self.schedule(d, Ev::RestartFailedNode { node, inc });
                }
                let k = match &c {
                    twinblk::core::StateChange::ResyncStarted { full: true, .. }
                        if node == self.prim =>
                    {
                        Some("resync full")
                    }
                    twinblk::core::StateChange::ResyncStarted { full: false, .. }
                        if node == self.prim =>
                    {
                        Some("resync bitmap")
                    }
                    twinblk::core::StateChange::ResyncFinished => {
                        // Sometimes the link fails right then: on the source, the end is on
                        // its way; on the target, its UpToDate is.
                        if self.cfg.faults && !self.healing && self.rng.one_in(4) {
                            let d = self.rng.range(0, 300 * US);
                            self.schedule(d, Ev::CutAtResyncEnd);
                        }
                        (node != self.prim).then_some("resync finished")
                    }

                    twinblk::core::StateChange::Refused { reason } => {
                        if let Some(st) = self.stale.as_mut() {
                            st.reported = true;
                        }
                        self.split_refused(node, reason);
                        self.stale_primary_refused(node, reason);
                        Some("refused")
                    }
                    twinblk::core::StateChange::Repl {
                        to: ReplState::Ahead,
                        ..
                    } => Some("went ahead"),
                    twinblk::core::StateChange::Repl {
                        from: ReplState::Behind,
                        to: ReplState::SyncTarget,
                    } => Some("behind -> sync target"),
                    _ => None,
                };
                if let Some(k) = k {
                    *self.stats.entry(k).or_default() += 1;
                }
                self.log(format!("node {node} {c:?}"))
            }
            Action::SaveMeta(m) => {
                if std::env::var_os("TWINBLK_SIM_TRACE").is_some() {
                    self.log(format!("node {node} saves {m:?}"));
                }
                self.nodes[node].meta = m
            }
            Action::SaveBitmap { first_word, words } => {
                let bm = &mut self.nodes[node].bitmap;
                let end = first_word as usize + words.len();
                if bm.len() < end {
                    bm.resize(end, 0);
                }
                bm[first_word as usize..end].copy_from_slice(&words);
            }
            Action::SaveActivityLog { io, extents } => {
                // In the background, like the node's blocking thread: a crash before it
                // completes means it never happened (the stale event is dropped). Its
                // pre-flush fails now and then (flush faults): see `Ev::Disk`.
                *self.stats.entry("al transaction").or_default() += 1;
                let fail = (self.cfg.flush_faults && fail_rate > 0 && self.rng.one_in(fail_rate))
                    .then_some(libc::EIO);
                self.disk_later(
                    node,
                    inc,
                    io,
                    DiskOp::AlTxn {
                        extents,
                        upto: self.nodes[node].disk.completed(),
                    },
                    fail,
                    (20 * US, 800 * US),
                );
            }
            Action::SyncData => {
                // A data sync fails only on a disk whose flush already failed (sticky): the
                // driver exits (node/mod.rs), like a crash at this point. Not injected fresh:
                // the one that fails first is the activity log's pre-flush (`Ev::Disk`), which
                // the driver handles the same way.
                if self.nodes[node].disk.flush_failed {
                    // The driver cannot make the data stable: it stops the node.
                    self.schedule(0, Ev::RestartFailedNode { node, inc });
                } else {
                    self.nodes[node].disk.flush();
                }
                *self.stats.entry("sync data").or_default() += 1;
            }
            Action::CloseConnection { conn, reason } => {
                self.log(format!("node {node} closes {conn}: {reason}"));
                if matches!(reason, CloseReason::CrcMismatch { .. }) {
                    *self.stats.entry("crc mismatch caught").or_default() += 1;
                }
                if self.conn == Some(conn) {
                    let c = conn;
                    self.conn = None;
                    self.conn_epoch += 1;
                    let d = self.rng.range(10 * US, 200 * US);
                    self.schedule(
                        d,
                        Ev::ConnDown {
                            node: 1 - node,
                            conn: c,
                            // The peer hears the reason as the close's text.
                            reason: LinkLoss::PeerClosed {
                                code: 0,
                                reason: reason.to_string(),
                            },
                        },
                    );
                }
            }
            Action::AdminDone { tag, result } => {
                if let Err(e) = &result {
                    self.log(format!("node {node} admin refused: {e}"));
                }
                if tag == ADJUST {
                    self.adjusted = Some(result.clone());
                }
                if let Some(sw) = self.switching.as_mut() {
                    match tag {
                        SWITCH_DEMOTE => sw.demoted = Some(result),
                        SWITCH_PROMOTE => sw.promoted = Some(result),
                        SWITCH_PROMOTE_OLD => sw.promoted_old = Some(result),
                        _ => {}
                    }
                }
            }
            Action::FencePeer { episode, attempt } => {
                *self
                    .stats
                    .entry(if attempt == 1 {
                        "fence: writes frozen"
                    } else {
                        "fence: retried"
                    })
                    .or_default() += 1;
                self.log(format!(
                    "node {node} fences its peer (episode {episode}, attempt {attempt})"
                ));
                self.fence_episode[node] = Some(episode);
                if self
                    .status(node)
                    .is_some_and(|s| s.disk_failure.is_some() && s.disk == DiskState::Inconsistent)
                {
                    self.fail(format!(
                        "node {node} fences its peer after giving its own failed disk up: the \
                         peer's disk is the only good copy, to be promoted, not fenced"
                    ));
                }
                if attempt == 1 && self.status(node).is_some_and(|s| s.stopping) {
                    *self.stats.entry("fence: loss during a stop").or_default() += 1;
                }
                let ok = !self.rng.one_in(3);
                let d = self.rng.range(100 * US, 3000 * US);
                self.schedule(
                    d,
                    Ev::FenceDone {
                        node,
                        inc,
                        episode,
                        ok,
                    },
                );
            }
            Action::Stopped(o) => {
                let k = match (o.drain, o.persisted.is_ok()) {
                    (_, false) => "down: local writes in flight",
                    (twinblk::core::Drain::NotConnected, true) => "down: not connected",
                    (twinblk::core::Drain::Drained, true) => "down: drained",
                    (twinblk::core::Drain::PeerLost, true) => "down: peer lost while draining",
                    (twinblk::core::Drain::Expired { .. }, true) => "down: drain expired",
                };
                *self.stats.entry(k).or_default() += 1;
                self.log(format!("node {node} stopped: {o:?}"));
                self.exiting[node] = true;
            }
        }
    }

    fn check_no_overlap(&mut self, node: usize, io: u64, offset: u64, len: u64) {
        let clash = self.nodes[node]
            .disk
            .writes_in_flight
            .iter()
            .any(|&(_, o, l)| offset < o + l && o < offset + len);
        if clash {
            self.fail(format!(
                "node {node}: core issued a write at {offset}+{len} overlapping one in flight"
            ));
        }
        self.nodes[node]
            .disk
            .writes_in_flight
            .push((io, offset, len));
    }

    fn send(&mut self, from: usize, msg: PeerMsg) {
        let Some(conn) = self.conn else { return };
        if from == self.prim {
            if let PeerMsg::Data(e) = &msg {
                if !e.data.is_empty() {
                    self.replicated_tags
                        .insert(tag_of(&e.data), self.conn_epoch);
                }
            }
        }
        let stream = match msg.stream() {
            Stream::Control => 0u8,
            Stream::Data => 1 + self.rng.below(2) as u8,
        };
        let mut frame = match wire::encode(&msg) {
            Ok(f) => f,
            Err(e) => self.fail(format!("encode failed: {e}")),
        };
        // Rare corruption of a data payload: the receiver must catch it with the crc.
        if self.cfg.faults
            && !self.healing
            && stream != 0
            && frame.len() > 100
            && self.rng.one_in(3000)
        {
            let mut v = frame.to_vec();
            let i = v.len() - 1 - self.rng.below(50) as usize;
            v[i] ^= 0x10;
            frame = Bytes::from(v);
            self.log(format!("net corrupts a frame from {from}"));
        }
        let d = self.rng.range(20 * US, 400 * US);
        let last = self.stream_last.entry((from, stream)).or_insert(0);
        let at = (self.now + d).max(*last + 1);
        *last = at;
        let delay = at - self.now;
        *self.frames_in_flight.entry(conn).or_default() += 1;
        self.schedule(
            delay,
            Ev::Deliver {
                to: 1 - from,
                conn,
                frame,
            },
        );
    }

    fn maybe_connect(&mut self) {
        if self.conn.is_some() || self.connecting || self.now < self.partitioned_until {
            return;
        }
        let want = |w: &World, n| w.status(n).is_some_and(|s| s.want_connection);
        if want(self, A) && want(self, B) {
            self.connecting = true;
            let d = self.rng.range(100 * US, 2000 * US);
            let conn = self.next_conn;
            self.next_conn += 1;
            self.schedule(d, Ev::ConnUp { conn });
        }
    }

    fn note_interrupted_resync(&mut self) {
        let syncing = [A, B].iter().any(|&n| {
            self.status(n)
                .is_some_and(|s| matches!(s.repl, ReplState::SyncSource | ReplState::SyncTarget))
        });
        if syncing {
            *self.stats.entry("resync interrupted").or_default() += 1;
        }
    }

    /// A resync starts on `node`: after a cut between `ResyncDone` and its application on
    /// this target (see `end_cut`), it must resume from the bitmaps.
    fn check_end_cut(&mut self, node: usize, full: bool) {
        let Some((tgt, gen)) = self.end_cut else {
            return;
        };
        if tgt != node {
            return;
        }
        self.end_cut = None;
        if self.nodes[node].meta.current_gen != gen || self.untrusted_promotion {
            // It became something else since (a forced promotion): nothing to resume.
            return;
        }
        if full {
            self.fail(format!(
                "a cut as the resync finished cost a full resync of node {node}"
            ));
        }
        *self
            .stats
            .entry("resumed after a cut at the resync's end")
            .or_default() += 1;
    }

    fn drop_connection(&mut self, why: &str) {
        let src_done = |w: &World, n| {
            w.status(n)
                .is_some_and(|s| s.repl == ReplState::Established)
        };
        let tgt = [A, B].into_iter().find(|&n| {
            self.status(n)
                .is_some_and(|s| s.repl == ReplState::SyncTarget && s.bitmap_known)
                && src_done(self, 1 - n)
        });
        if let (Some(t), true) = (tgt, self.conn.is_some()) {
            *self
                .stats
                .entry("cut between ResyncDone and the target's UpToDate")
                .or_default() += 1;
            self.end_cut = Some((t, self.nodes[t].meta.current_gen));
        }
        self.note_interrupted_resync();
        if let Some(c) = self.conn.take() {
            self.conn_epoch += 1;
            self.log(format!("net drops connection {c}: {why}"));
            for n in [A, B] {
                let d = self.rng.range(10 * US, 500 * US);
                self.schedule(
                    d,
                    Ev::ConnDown {
                        node: n,
                        conn: c,
                        reason: LinkLoss::Transport(why.into()),
                    },
                );
            }
        }
    }

    fn crash(&mut self, node: usize) {
        if !self.alive(node) {
            return;
        }
        self.log(format!("CRASH node {node}"));
        // The answer to a switchover's demotion dies with the old Primary's process: the
        // operator's `secondary` failed, and the switchover is over (sync seed 8908: one began
        // during a `down` of the Primary whose power then failed, and waited forever for the
        // answer, so the heal never converged; it showed once failed peer writes detach the
        // disk, which changed that seed's course).
        if self
            .switching
            .as_ref()
            .is_some_and(|sw| sw.old == node && sw.demote_sent && sw.demoted.is_none())
        {
            self.end_switchover("switchover: the old Primary crashed during its demotion");
        }
        // A Primary that pulled ahead (or is a sync source again) started a generation the
        // Secondary lacks, even while the Secondary still believes it is Established.
        let prim_in_sync = self
            .status(node)
            .is_some_and(|s| s.repl == ReplState::Established);
        // A Primary whose flush failed while its peer held everything made its own disk
        // Inconsistent (`DiskFailure`): the peer's disk is the data now, not what the failed
        // one holds.
        let disk_gave_up = node == self.prim
            && self
                .status(node)
                .is_some_and(|s| s.disk_failure.is_some() && s.disk == DiskState::Inconsistent);
        // An async Primary's handover of that disk (`Handover`) that a crash or a cut link
        // ended early: the peer may lack writes the Primary acknowledged, a double failure.
        let handover_cut = self
            .status(node)
            .is_some_and(|s| matches!(s.handover, Some(Handover::Running { .. } | Handover::Cut)));
        self.note_interrupted_resync();
        let sec = 1 - self.prim;
        *self
            .stats
            .entry(if node == self.prim {
                "crash primary"
            } else {
                "crash secondary"
            })
            .or_default() += 1;
        if node == self.prim {
            if let Err(e) = self.oracle.primary_crash(&self.nodes[sec].disk) {
                self.fail(format!("when the primary was killed: {e}"));
            }
        }
        let al_lost = self.queue.iter().any(|s| {
            matches!(&s.ev, Ev::Disk { node: n, inc, op: DiskOp::AlTxn { .. }, .. }
                if *n == node && *inc == self.nodes[node].inc)
        });
        if node == self.prim && !self.cfg.al_updates {
            *self
                .stats
                .entry("crash primary (al-updates off)")
                .or_default() += 1;
        }
        if al_lost {
            *self
                .stats
                .entry("crash with al transaction in flight")
                .or_default() += 1;
        }
        self.nodes[node].replica = None;
        self.unfenced[node] = false;
        self.fence_episode[node] = None;
        if self.down_node == Some(node) {
            // Crashed while draining (or before its stop began): the client goes on.
            self.down_node = None;
        }
        let mut rng = self.rng.clone();
        self.nodes[node].disk.crash(&mut rng);
        self.rng = rng;
        self.forget_lost_rogue_writes(node);
        if node == self.prim {
            self.outstanding.clear();
            if disk_gave_up && self.alive(sec) && self.split.is_none() {
                self.peer_takes_over_a_failed_disk(sec, handover_cut);
            } else if disk_gave_up
                && self.split.is_none()
                && self.nodes[sec].meta.disk == DiskState::Inconsistent
            {
                // The peer's disk failed too, after this one's (it was UpToDate then, or this
                // disk would have been kept): a double disk failure (async seed 98062: the
                // Primary's client FLUSH, then 79 us later the peer's flush barrier). Neither
                // copy is complete, so each node refuses the other ("neither node has
                // UpToDate data"), and the operator forces one: the peer, whose disk then is
                // the data, what a crash or its failed flush lost included.
                *self
                    .stats
                    .entry("disk failed on both nodes: the peer forced")
                    .or_default() += 1;
                self.log(format!(
                    "both disks failed: the operator forces node {sec} once it is back"
                ));
                self.force_on_restart[sec] = true;
                self.forced_failover = true;
                // It may never have learnt what it lacked (a sync target): nothing describes
                // its data once forced, so the next sync is full.
                self.untrusted_promotion = true;
                self.take_over(sec, "forced peer's disk after a double disk failure", false);
            } else if disk_gave_up && self.split.is_none() {
                // The peer crashed before this Primary's disk failed (sync seed 3209, a
                // switchover that left the old Primary Primary again): its disk, as its crash
                // left it, is still the data, the failed one is not (it resyncs from the peer
                // once both are back), as for a peer that crashed before taking over (async
                // seed 12174, `failover`). The writes acknowledged since the peer was lost
                // lived only on the failed disk: a double failure loses them.
                *self
                    .stats
                    .entry("disk failed: the peer had crashed before")
                    .or_default() += 1;
                self.log(format!(
                    "node {sec} crashed before the Primary's disk failed: its disk is the data"
                ));
                self.take_over(sec, "crashed peer's disk", false);
            } else if let Err(e) = self.oracle.check_primary_crash(&self.nodes[node].disk) {
                self.fail(format!("when the primary was killed: {e}"));
            } else if let Err(e) = self.oracle.rebase(&self.nodes[node].disk, false) {
                self.fail(format!("primary's disk after crash: {e}"));
            } else if self.cfg.failover
                && self.cfg.faults
                && self.alive(sec)
                && self.split.is_none()
            {
                // Mostly when the survivor is in sync (the failover operators do); sometimes
                // of a stale or Inconsistent survivor (forced).
                let in_sync = prim_in_sync
                    && self.status(sec).is_some_and(|s| {
                        s.repl == ReplState::Established && s.disk == DiskState::UpToDate
                    });
                if in_sync || self.rng.one_in(3) {
                    self.failover_pending = true;
                    self.survivor_in_sync = in_sync;
                    let d = self.rng.range(50 * US, 400 * US);
                    self.schedule(d, Ev::Failover);
                }
            }
        } else if self.split.is_some() {
            // The rogue Primary of a split brain crashed: its disk is not the client's history.
            self.oracle.confirmed_vol = self.oracle.confirmed_dur.clone();
            // Its writes in flight never complete: they may or may not be on its disk.
            for (_, (tag, first, n)) in std::mem::take(&mut self.rogue_out) {
                self.oracle.client_completed(tag, first, n, false);
            }
            // No write reached its disk: it never diverged (see `Split::issued`).
            if let Some(sp) = self.split.as_mut() {
                if !sp.issued[node] {
                    sp.written[node].clear();
                }
            }
        } else {
            if let Err(e) = self.oracle.secondary_crash(&self.nodes[sec].disk) {
                self.fail(format!("secondary's disk after crash: {e}"));
            }
        }
        if let Some(c) = self.conn.take() {
            self.conn_epoch += 1;
            let d = self.rng.range(10 * US, 500 * US);
            self.schedule(
                d,
                Ev::ConnDown {
                    node: 1 - node,
                    conn: c,
                    reason: LinkLoss::Reset,
                },
            );
        }
        let d = self.rng.range(500 * US, 5000 * US);
        self.schedule(d, Ev::Restart { node });
    }

    fn restart(&mut self, node: usize) {
        if self.alive(node) {
            return;
        }
        if node == self.prim && self.failover_pending {
            // The operator promotes the survivor before the old Primary is back.
            self.schedule(1000 * US, Ev::Restart { node });
            return;
        }
        if std::mem::take(&mut self.was_down[node]) {
            *self.stats.entry("down: restarted").or_default() += 1;
        }
        self.start(node);
        if node == self.prim {
            self.conn_epoch += 1;
            let force = std::mem::take(&mut self.force_on_restart[node]);
            self.admin(node, AdminCmd::Promote { force });
            if force && self.status(node).is_some_and(|s| s.role != Role::Primary) {
                self.fail(format!(
                    "node {node} refused a forced promotion after both disks failed"
                ));
            }
        }
        self.admin(node, AdminCmd::Connect);
    }

    /// The rogue crashed before the generation its writes start was saved: none of them
    /// reached its disk (the core saves the new generation before the first write is
    /// issued), so its data is what the nodes last agreed on and no split brain exists (seed
    /// 7965: a rogue that crashed before its one write was issued).
    fn forget_lost_rogue_writes(&mut self, node: usize) {
        let gen = self.nodes[node].meta.current_gen;
        let Some(sp) = self.split.as_mut() else {
            return;
        };
        if sp.rogue != node || sp.written[node].is_empty() || sp.resolved_by.is_some() {
            return;
        }
        if sp.gen_unbumped == Some(gen) {
            sp.written[node].clear();
            self.log(format!(
                "SPLIT: node {node} crashed before any rogue write was issued"
            ));
        }
    }

    /// A client write while a split brain is being made: which side wrote it.
    fn note_split_write(&mut self, node: usize, tag: u64) {
        if let Some(sp) = self.split.as_mut() {
            if sp.resolved_by.is_none() {
                sp.written[node].push(tag);
            }
        }
    }

    /// The Primary's flush failed while its peer held everything, so its disk became
    /// Inconsistent and the operator restarted it (`RestartFailedNode`): its status says to
    /// promote the peer, and the operator does. The failed flush only covers what it was to
    /// make stable, so the peer must hold everything a completed flush (or FUA write) made
    /// stable on the Primary, and (`primary_crash`, sync) every write it acked; what the failed
    /// disk holds is no longer the data (async seed 922, flush faults on: the oracle had
    /// rebuilt the history from the failed disk, and the peer's acknowledged tag 27, rightly
    /// resynced back, read as a lost version).
    ///
    /// `handover_cut`: the failed async Primary crashed, or lost the link, before the peer had
    /// every write it was sent (`Handover`): a double failure, whose in-flight writes the
    /// promoted peer may lack (as after an async Primary's crash), so nothing is checked.
    fn peer_takes_over_a_failed_disk(&mut self, peer: usize, handover_cut: bool) {
        *self
            .stats
            .entry("disk failed: the peer takes over")
            .or_default() += 1;
        if self.switching.is_some() {
            // The operator's takeover replaces a switchover under way: its promotion may have
            // failed with the connection the failed Primary closed (async seed 3418, once a
            // failed activity-log transaction no longer stopped the daemon).
            self.end_switchover("switchover: overtaken by a failed disk's takeover");
        }
        if handover_cut {
            *self
                .stats
                .entry("disk failed: handover cut short (double failure)")
                .or_default() += 1;
        }
        // The peer's disk writes still landing belong to it (`failover` waits for them).
        let mut img = self.nodes[peer].disk.volatile.clone();
        for s in self.queue.iter() {
            if let Ev::Disk {
                node,
                inc,
                op: DiskOp::Write { offset, data, .. },
                fail: None,
                ..
            } = &s.ev
            {
                if *node == peer && *inc == self.nodes[peer].inc {
                    let off = *offset as usize;
                    img[off..off + data.len()].copy_from_slice(data);
                }
            }
        }
        let checked = if handover_cut {
            Ok(())
        } else {
            self.oracle.check_holds_stable(&img)
        };
        if let Err(e) = checked {
            self.fail(format!(
                "node {peer} takes over from a Primary whose disk failed without data the \
                 Primary had made stable: {e}"
            ));
        }
        self.failover_pending = true;
        self.survivor_in_sync = true;
        self.failed_disk_takeover = true;
        let d = self.rng.range(50 * US, 400 * US);
        self.schedule(d, Ev::Failover);
    }

    /// The operator promotes the survivor of a Primary crash: plainly, and with `--force` if
    /// that is refused (its disk was not UpToDate: writes may be lost, which the operator
    /// accepts; the oracle then takes its disk as the new history).
    fn failover(&mut self) {
        if !self.failover_pending {
            return;
        }
        let s = 1 - self.prim;
        let takeover = std::mem::take(&mut self.failed_disk_takeover);
        let Some(st) = self.status(s) else {
            self.failover_pending = false;
            if takeover {
                // The peer of a Primary whose disk failed crashed before the operator promoted
                // it: its disk (as the crash left it) is still the data, the failed one's is
                // not. Both restart; it is the one promoted again (async seed 12174, flush
                // faults on: the oracle had kept the failed Primary's history).
                *self
                    .stats
                    .entry("disk failed: the peer crashed before taking over")
                    .or_default() += 1;
                self.log(format!(
                    "FAILOVER: node {s} crashed before taking over, its disk is the data"
                ));
                self.take_over(s, "crashed peer's disk", false);
            }
            return;
        };
        self.failed_disk_takeover = takeover;
        if st.promoting {
            // The operator's `primary` is still running: it waits for the node's handshake to
            // decide (or for the peer's answer), as the CLI does.
            self.schedule(50 * US, Ev::Failover);
            return;
        }
        let noticed = matches!(st.repl, ReplState::StandAlone | ReplState::Connecting);
        if !noticed || !self.nodes[s].disk.writes_in_flight.is_empty() {
            self.schedule(50 * US, Ev::Failover);
            return;
        }
        if st.disk_failure.is_some() {
            // A failed disk refuses every promotion until the node restarts (its status says
            // so): the operator restarts it first (`RestartFailedNode` is on its way).
            *self
                .stats
                .entry("failover: survivor's failed disk restarted first")
                .or_default() += 1;
            self.schedule(500 * US, Ev::Failover);
            return;
        }
        if st.stopping {
            // Its own `twinblk down` is still under way (the peer died during its drain): the
            // core refuses to promote a node that is shutting down, so the operator waits for
            // the stop and the restart after it (failover seed 11362, reached once a simulated
            // flush covered only what completed before it was issued).
            *self
                .stats
                .entry("failover: waited for the survivor's stop")
                .or_default() += 1;
            self.schedule(500 * US, Ev::Failover);
            return;
        }
        let was_up_to_date = st.disk == DiskState::UpToDate;
        // An Inconsistent node that never learnt what it lacks (no `bitmap_known`: the source
        // may not have marked anything) has no bitmap describing its data once forced. One
        // that knows is covered: the source keeps the bits of what it did not send, and the
        // core makes the acked resync writes stable before the forced promotion is saved
        // (`Action::SyncData`; seed 6208 lost them in a crash right after).
        let untrusted = st.disk == DiskState::Inconsistent && !st.bitmap_known;
        self.admin(s, AdminCmd::Promote { force: false });
        if self.promotion_waits(s, "failover: primary waited for a handshake") {
            self.schedule(50 * US, Ev::Failover);
            return;
        }
        let mut forced = false;
        if self.status(s).is_some_and(|x| x.role != Role::Primary) {
            if was_up_to_date {
                let why = self.status(s).and_then(|x| x.last_refusal);
                self.fail(format!(
                    "node {s} (UpToDate, peer dead) refused promotion: {why:?}"
                ));
            }
            self.admin(s, AdminCmd::Promote { force: true });
            if self.promotion_waits(s, "failover: primary --force waited for a handshake") {
                self.schedule(50 * US, Ev::Failover);
                return;
            }
            forced = true;
        }
        if self.status(s).is_some_and(|x| x.role != Role::Primary) {
            self.fail(format!("node {s} refused even a forced promotion"));
        }
        *self
            .stats
            .entry(if forced {
                "failover (forced)"
            } else {
                "failover"
            })
            .or_default() += 1;
        self.log(format!(
            "FAILOVER: node {s} is the Primary now (forced {forced})"
        ));
        self.failover_pending = false;
        self.failed_disk_takeover = false;
        self.forced_failover |= forced || !self.survivor_in_sync;
        self.untrusted_promotion |= forced && untrusted;
        self.take_over(s, "promoted node's disk", true);
    }

    /// Node `n` is the Primary now: its disk is the client's history from here on (`promoted`:
    /// it was just promoted, which made its disk stable).
    /// Node `n` is the Primary now (a new connection epoch, no previous replication state),
    /// and its disk is the history ([`World::adopt`]).
    fn take_over(&mut self, n: usize, what: &str, promoted: bool) {
        self.prim = n;
        self.conn_epoch += 1;
        self.b_prev_repl = ReplState::StandAlone;
        self.adopt(n, what, promoted);
    }

    fn adopt(&mut self, n: usize, what: &str, promoted: bool) {
        if let Err(e) = self.oracle.rebase(&self.nodes[n].disk, promoted) {
            self.fail(format!("{what}: {e}"));
        }
        // A forced promotion (of an Inconsistent node part-way through a resync) may bring back
        // what a split brain's loser wrote: it is the data now. That includes what its disk
        // falls back to if it crashes before flushing (seed 143: an unflushed write hid a
        // loser's block that the crash brought back).
        let disk = &self.nodes[n].disk;
        let img = &disk.volatile;
        let back: Vec<u64> = (0..self.cfg.blocks)
            .map(|i| tag_of(SimDisk::block(img, i)))
            .chain(disk.crash_candidates().map(tag_of))
            .collect();
        for t in back {
            self.discarded.remove(&t);
        }
        self.oracle.new_regime();
    }

    /// A partition during which the Secondary is promoted and written: a split brain.
    fn start_split(&mut self) {
        let rogue = 1 - self.prim;
        let d = self.rng.range(3000 * US, 10000 * US);
        self.partitioned_until = self.now + d;
        self.drop_connection("simulated partition (split brain)");
        self.oracle.secondary_valid = false;
        let ops = self.rng.range(1, 6);
        self.split = Some(Split {
            rogue,
            rogue_ops: ops,
            ..Default::default()
        });
        *self.stats.entry("split brain made").or_default() += 1;
        self.log(format!(
            "SPLIT: node {rogue} will be promoted behind the Primary's back"
        ));
        let d = self.rng.range(300 * US, 1500 * US);
        self.schedule(d, Ev::RogueWrite);
    }

    fn rogue_write(&mut self) {
        let Some(sp) = self.split.as_ref() else {
            return;
        };
        if sp.resolved_by.is_some() {
            return;
        }
        let (r, promoted, ops, demoted) = (sp.rogue, sp.promoted, sp.rogue_ops, sp.rogue_demoted);
        let Some(st) = self.status(r) else {
            // Crashed: it comes back Secondary (with what it wrote).
            self.schedule(500 * US, Ev::RogueWrite);
            return;
        };
        if !promoted {
            if matches!(
                st.repl,
                ReplState::Established | ReplState::SyncSource | ReplState::SyncTarget
            ) {
                if self.now >= self.partitioned_until {
                    // Reconnected before the operator got to it: no split brain.
                    *self.stats.entry("split: reconnected first").or_default() += 1;
                    self.split = None;
                } else {
                    self.schedule(100 * US, Ev::RogueWrite);
                }
                return;
            }
            if st.promoting {
                // Its `primary` still waits for the handshake to end (see `failover`).
                self.schedule(50 * US, Ev::RogueWrite);
                return;
            }
            // See `failover`: untrusted only if it never learnt what it lacks.
            let waited = self.split.as_mut().and_then(|sp| sp.waited.take());
            let untrusted = st.disk == DiskState::Inconsistent && !st.bitmap_known;
            let gen_before = waited.map_or(self.nodes[r].meta.current_gen, |w| w.0);
            if waited.is_some_and(|w| w.1) && st.role == Role::Primary {
                // The forced promotion that waited went through.
                self.untrusted_promotion = true;
            }
            self.admin(r, AdminCmd::Promote { force: false });
            if self.promotion_waits(r, "split: the rogue's primary waited for a handshake") {
                if let Some(sp) = self.split.as_mut() {
                    sp.waited = Some((gen_before, false));
                }
                self.schedule(50 * US, Ev::RogueWrite);
                return;
            }
            let gen_after = self.nodes[r].meta.current_gen;
            if let Some(sp) = self.split.as_mut() {
                sp.gen_unbumped = (gen_before == gen_after).then_some(gen_after);
            }
            if self.status(r).is_some_and(|x| x.role != Role::Primary) {
                self.admin(r, AdminCmd::Promote { force: true });
                if self.promotion_waits(r, "split: the rogue's primary waited for a handshake") {
                    if let Some(sp) = self.split.as_mut() {
                        sp.waited = Some((gen_before, untrusted));
                    }
                    self.schedule(50 * US, Ev::RogueWrite);
                    return;
                }
                // As after a forced failover: no bitmap describes this node's data now.
                self.untrusted_promotion |= untrusted;
            }
            if self.status(r).is_some_and(|x| x.role != Role::Primary) {
                self.log(format!("SPLIT: node {r} refused promotion"));
                *self.stats.entry("split: promotion refused").or_default() += 1;
                self.split = None;
                return;
            }
            *self.stats.entry("split brain: rogue promoted").or_default() += 1;
            if let Some(sp) = self.split.as_mut() {
                sp.promoted = true;
            }
        }
        let role = self.status(r).map(|x| x.role);
        if ops > 0 && role == Some(Role::Primary) && !self.healing {
            let blocks = self.cfg.blocks;
            let first = self.rng.below(blocks as u64) as usize;
            let n = (self.rng.range(1, 4) as usize).min(blocks - first);
            let tag = self.oracle.client_write(first, n, false);
            self.note_split_write(r, tag);
            let req = self.next_req;
            self.next_req += 1;
            self.rogue_out.insert(req, (tag, first, n));
            let mut data = Vec::with_capacity(n * BS);
            for _ in 0..n {
                data.extend_from_slice(&block_for(tag));
            }
            self.log(format!(
                "rogue: write tag {tag} blocks {first}+{n} on node {r}"
            ));
            if let Some(sp) = self.split.as_mut() {
                sp.rogue_ops -= 1;
            }
            self.feed(
                r,
                Event::ClientWrite {
                    req,
                    offset: (first * BS) as u64,
                    data: Bytes::from(data),
                    fua: false,
                },
            );
            let d = self.rng.range(50 * US, 400 * US);
            self.schedule(d, Ev::RogueWrite);
        } else if self.cfg.sb_policy && !demoted && role == Some(Role::Primary) {
            // The operator demotes the rogue again: at the reconnect only one node is Primary
            // and the shared after-sb-1pri policy (discard-secondary) applies.
            if self.rogue_out.is_empty() {
                self.admin(r, AdminCmd::Demote);
            }
            if self.status(r).is_some_and(|x| x.role == Role::Secondary) {
                if let Some(sp) = self.split.as_mut() {
                    sp.rogue_demoted = true;
                }
                self.log(format!("SPLIT: rogue node {r} demoted"));
            } else {
                self.schedule(200 * US, Ev::RogueWrite);
            }
        }
    }

    /// A Primary refused the peer because the peer has newer data (it is the handshake's
    /// sync source, and a Primary never becomes a target: DRBD's rr-conflict = disconnect).
    /// That happens after a stale failover (the survivor was not in sync when the Primary died)
    /// when the promoted node has not written since: its generation is the one the peer's
    /// bitmap is relative to, so it is no split brain, and the peer's data (acknowledged
    /// writes of the Primary that died) is the newer one. The operator does what the refusal
    /// says: demote this node and reconnect; the peer becomes the Primary. During the workload
    /// the client's next write makes this a split brain instead (handled there), so only the
    /// heal phase, where no write comes, needs the operator.
    fn stale_primary_refused(&mut self, node: usize, reason: &Refusal) {
        // Either side may be the one to say it (seed 7408 with failovers on: only the
        // Secondary did, and the Primary kept reconnecting).
        let stale = (node == self.prim && *reason == Refusal::PeerNewerThanPrimary)
            || (node != self.prim && *reason == Refusal::NewerThanPrimaryPeer);
        if !self.healing || self.split.is_some() || !stale {
            return;
        }
        let node = self.prim;
        if !self.forced_failover {
            self.fail(format!(
                "node {node} (Primary) was refused for newer peer data without a stale or \
                 forced failover: {reason}"
            ));
        }
        let d = self.rng.range(500 * US, 2000 * US);
        self.schedule(d, Ev::DemoteStale { node });
    }

    fn demote_stale(&mut self, node: usize) {
        if node != self.prim || self.split.is_some() {
            return;
        }
        let newer = 1 - node;
        let busy =
            !self.outstanding.is_empty() || !self.nodes[node].disk.writes_in_flight.is_empty();
        if busy || !self.alive(node) || !self.alive(newer) {
            self.schedule(500 * US, Ev::DemoteStale { node });
            return;
        }
        self.client_paused = true;
        self.admin(node, AdminCmd::Demote);
        if self.status(node).is_some_and(|s| s.role != Role::Secondary) {
            self.log(format!("demote of stale Primary {node} refused, retrying"));
            self.schedule(500 * US, Ev::DemoteStale { node });
            return;
        }
        self.log(format!(
            "OPERATOR: node {node} demoted (the peer has newer data), node {newer} takes over"
        ));
        *self.stats.entry("stale primary demoted").or_default() += 1;
        self.take_over(newer, "newer peer's disk", false);
        self.admin(node, AdminCmd::Connect);
        self.admin(newer, AdminCmd::Connect);
        self.client_paused = false;
    }

    /// A node refused the peer while a split brain was being made.
    fn split_refused(&mut self, node: usize, reason: &Refusal) {
        let incs = [self.nodes[A].inc, self.nodes[B].inc];
        // Both Primary counts as the split brain it is (or becomes once one is demoted). A
        // peer's refusal, whatever its code, is the peer's finding: the peer reports it itself.
        let split_brain = match reason {
            Refusal::SplitBrain(_) | Refusal::BothPrimary | Refusal::BothPrimaryConnected => true,
            Refusal::ResourceMismatch { .. }
            | Refusal::SizeMismatch { .. }
            | Refusal::SameNodeId { .. }
            | Refusal::NoUpToDate
            | Refusal::PeerNewerThanPrimary
            | Refusal::NewerThanPrimaryPeer
            | Refusal::ByPeer { .. }
            | Refusal::DiskFailed(_) => false,
        };
        if self.split.is_none() && split_brain {
            if !self.forced_failover {
                self.fail(format!(
                    "node {node} sees a split brain that nobody made: {reason}"
                ));
            }
            // A forced or stale promotion diverged the data: the operator discards the old
            // Primary's.
            *self
                .stats
                .entry("split brain after forced/stale failover")
                .or_default() += 1;
            let old = 1 - self.prim;
            self.split = Some(Split {
                rogue: old,
                promoted: true,
                loser: Some(old),
                ..Default::default()
            });
        }
        let Some(sp) = self.split.as_mut() else {
            return;
        };
        if split_brain {
            sp.reported[node] = true;
            *self.stats.entry("split brain reported").or_default() += 1;
        }
        if !sp.resolve_scheduled {
            sp.resolve_scheduled = true;
            sp.incs = incs;
            let d = self.rng.range(2000 * US, 5000 * US);
            self.schedule(d, Ev::Resolve);
        }
    }

    /// The operator reads `status` on both nodes and resolves the split brain with
    /// `secondary` + `connect --discard-my-data` on the loser (chosen at random) and `connect`
    /// on the winner.
    fn resolve(&mut self) {
        let incs = [self.nodes[A].inc, self.nodes[B].inc];
        let Some(sp) = self.split.as_mut() else {
            // The split ended while this waited for I/O in flight (a shared policy's handshake
            // decided it): the pause for the command it never ran goes too. Sync seed 5834
            // (with adjusts) paused the client for good, and the workload never finished.
            if std::mem::take(&mut self.resolve_paused) {
                self.client_paused = false;
            }
            return;
        };
        sp.resolve_scheduled = false;
        if let Some(loser) = sp.resolved_by {
            // Refused again after the command: the loser restarted since, and
            // `--discard-my-data` (a connect option, not persistent) went with it. Repeat it.
            if self.alive(A) && self.alive(B) {
                self.log(format!("RESOLVE again: node {loser} discards its data"));
                self.admin(loser, AdminCmd::Demote);
                self.admin(loser, AdminCmd::DiscardMyData);
                self.admin(loser, AdminCmd::Connect);
                self.admin(1 - loser, AdminCmd::Connect);
            }
            return;
        }
        let rogue = sp.rogue;
        let restarted = sp.incs != incs;
        let retry = |w: &mut World, d: u64| {
            if let Some(sp) = w.split.as_mut() {
                sp.resolve_scheduled = true;
            }
            w.schedule(d, Ev::Resolve);
        };
        let (Some(sa), Some(sb)) = (self.status(A), self.status(B)) else {
            self.log("resolve waits: a node is down".into());
            retry(self, 1000 * US);
            return;
        };
        let reported = [sa.split_brain.is_some(), sb.split_brain.is_some()];
        // Two Primaries are refused before the generations are compared (a report left from an
        // earlier handshake may linger on one): the operator demotes one, as below.
        let both_primary = sa.role == Role::Primary && sb.role == Role::Primary;
        if reported[A] != reported[B] && !both_primary {
            // A restarted daemon (or a handshake cut by the network) learns it at the next
            // handshake: `connect` on both, which resolves nothing.
            // Faults may cut any handshake; once healed (no faults), a few `connect`s must do.
            let cut = self.split.as_ref().map_or(0, |s| s.retries);
            if self.healing && !restarted && cut >= 4 {
                self.fail(format!(
                    "split brain reported on one node only: A {:?} / B {:?}",
                    sa.split_brain, sb.split_brain
                ));
            }
            let healing = self.healing;
            if let Some(sp) = self.split.as_mut() {
                if healing {
                    sp.retries += 1;
                }
                sp.incs = incs;
            }
            self.admin(A, AdminCmd::Connect);
            self.admin(B, AdminCmd::Connect);
            self.log("resolve: report on one node only, connect again".into());
            retry(self, 3000 * US);
            return;
        }
        if reported[A] && reported[B] {
            let waiting = |r: ReplState| matches!(r, ReplState::StandAlone | ReplState::Connecting);
            if !waiting(sa.repl) || !waiting(sb.repl) {
                // A `connect` (the heal phase's) is being refused again; `check_split` makes
                // sure no handshake gets through.
                self.log("resolve waits: not StandAlone".into());
                retry(self, 1000 * US);
                return;
            }
            for (n, st) in [(A, &sa), (B, &sb)] {
                let ok = st.split_brain.as_ref().is_some_and(|x| {
                    x.keep_mine
                        .iter()
                        .chain(&x.keep_peers)
                        .any(|c| c.contains("--discard-my-data"))
                });
                if !ok {
                    self.fail(format!("node {n}'s split-brain report names no command"));
                }
            }
        }
        let fixed = self.split.as_ref().and_then(|s| s.loser);
        let loser = match fixed {
            Some(l) => l,
            None if self.rng.one_in(2) => rogue,
            None => self.prim,
        };
        let winner = 1 - loser;
        if loser == self.prim {
            self.client_paused = true;
            self.resolve_paused = true;
        }
        let busy = !self.outstanding.is_empty()
            || !self.rogue_out.is_empty()
            || !self.nodes[A].disk.writes_in_flight.is_empty()
            || !self.nodes[B].disk.writes_in_flight.is_empty();
        if busy {
            self.log("resolve waits: I/O in flight".into());
            retry(self, 200 * US);
            return;
        }
        self.admin(loser, AdminCmd::Demote);
        if self
            .status(loser)
            .is_some_and(|x| x.role != Role::Secondary)
        {
            self.log("resolve waits: demotion refused".into());
            retry(self, 200 * US);
            return;
        }
        self.admin(loser, AdminCmd::DiscardMyData);
        if self.status(loser).is_some_and(|x| !x.discard_my_data) {
            // Refused (`discard-during-handshake`): a handshake is under way and decides on
            // the hello already sent, maybe resolving the split brain by a shared policy. The
            // operator waits for it and looks again (seed 3584: accepted, the flag was lost
            // and the policy discarded the peer's data instead).
            *self
                .stats
                .entry("split brain: discard refused during a handshake")
                .or_default() += 1;
            self.log("resolve waits: a handshake is under way".into());
            retry(self, 1000 * US);
            return;
        }
        self.log(format!(
            "RESOLVE: node {loser} discards its data (reported {reported:?})"
        ));
        self.admin(loser, AdminCmd::Connect);
        self.admin(winner, AdminCmd::Connect);
        *self
            .stats
            .entry("split brain resolved by command")
            .or_default() += 1;
        let ids = match self.split.as_mut() {
            Some(sp) => {
                sp.resolved_by = Some(loser);
                sp.rogue_ops = 0;
                std::mem::take(&mut sp.written[loser])
            }
            None => Vec::new(),
        };
        self.discard(&ids);
        if loser == self.prim {
            self.take_over(winner, "split-brain winner's disk", false);
        }
        self.client_paused = false;
        self.resolve_paused = false;
    }

    fn discard(&mut self, ids: &[u64]) {
        self.oracle.discard(ids);
        self.discarded
            .extend(ids.iter().copied().filter(|&t| t & (1 << 63) == 0));
    }

    /// Invariant: once both sides of a split brain wrote, no connection gets past the
    /// handshake until the operator resolved it or a policy both nodes share applies.
    fn check_split(&mut self) -> Result<(), String> {
        let Some(sp) = self.split.as_ref() else {
            return Ok(());
        };
        let repl = |w: &World, n| w.status(n).map(|s| s.repl);
        let decided = |r: Option<ReplState>| {
            matches!(
                r,
                Some(ReplState::Established | ReplState::SyncSource | ReplState::SyncTarget)
            )
        };
        let (ra, rb) = (repl(self, A), repl(self, B));
        // Only a live connection counts: after a cut, a node believes in the old one a while.
        if self.conn.is_none() || (!decided(ra) && !decided(rb)) {
            return Ok(());
        }
        if !sp.promoted {
            self.split = None;
            return Ok(());
        }
        let both_wrote = !sp.written[A].is_empty() && !sp.written[B].is_empty();
        let rogue_secondary = self
            .status(sp.rogue)
            .is_some_and(|s| s.role == Role::Secondary);
        if let Some(loser) = sp.resolved_by {
            // Over once the loser took the peer's data (a handshake cut before it decided
            // leaves it armed, or forgotten after a restart: the operator repeats the command).
            if matches!(
                repl(self, loser),
                Some(ReplState::SyncTarget | ReplState::Established)
            ) {
                self.split = None;
            }
            return Ok(());
        }
        let by_policy = self.cfg.sb_policy && rogue_secondary;
        if !by_policy {
            if both_wrote {
                return Err(format!(
                    "split brain resolved without a policy or a command: A is {ra:?}, B is {rb:?}"
                ));
            }
            // Only one side wrote: the nodes may legitimately sync (no split brain).
            *self
                .stats
                .entry("split: one side wrote, synced")
                .or_default() += 1;
            self.split = None;
            return Ok(());
        }
        // The policy decided: the Secondary (the rogue) must be the sync target.
        let rogue = sp.rogue;
        let r = repl(self, rogue);
        let p = repl(self, 1 - rogue);
        if r == Some(ReplState::SyncSource) || p == Some(ReplState::SyncTarget) {
            return Err(format!(
                "after-sb-1pri discard-secondary discarded the Primary's data (rogue {rogue} is {r:?})"
            ));
        }
        if r != Some(ReplState::SyncTarget) && p != Some(ReplState::SyncSource) {
            return Ok(());
        }
        *self
            .stats
            .entry("split brain resolved by policy")
            .or_default() += 1;
        let ids = self
            .split
            .take()
            .map(|mut s| std::mem::take(&mut s.written[rogue]))
            .unwrap_or_default();
        self.discard(&ids);
        Ok(())
    }

    /// `twinblk down` on `node`: the daemon first answers its clients' requests (the client
    /// submits nothing new to it meanwhile), then the core stops.
    fn down(&mut self, node: usize) {
        if !self.alive(node) || self.down_node != Some(node) {
            self.down_node = None;
            return;
        }
        if node == self.prim && !self.outstanding.is_empty() {
            self.schedule(100 * US, Ev::Down { node });
            return;
        }
        let st = self.status(node);
        if st.as_ref().is_some_and(|s| s.stopping) {
            return;
        }
        *self
            .stats
            .entry(if node == self.prim {
                "down: primary"
            } else {
                "down: secondary"
            })
            .or_default() += 1;
        if st.as_ref().is_some_and(|s| s.frozen.is_some()) {
            *self.stats.entry("down: while frozen").or_default() += 1;
        }
        if st.as_ref().is_some_and(|s| s.peer_unstable > 0) {
            *self
                .stats
                .entry("down: with writes unstable on the peer")
                .or_default() += 1;
        }
        self.log(format!("OPERATOR: twinblk down on node {node}"));
        if std::mem::take(&mut self.stall_at_down) {
            let d = self.cfg.stop_drain + self.rng.range(200 * US, 3000 * US);
            self.stalled = Some((1 - node, self.now + d));
            *self.stats.entry("down: peer stalled").or_default() += 1;
        }
        self.feed(node, Event::Stop);
        if self.rng.one_in(3) {
            // The link fails during the drain.
            let d = self.rng.range(20 * US, 800 * US);
            self.schedule(d, Ev::DropLink);
        }
    }

    fn client_tick(&mut self) {
        if self.client_paused || self.down_node == Some(self.prim) {
            if !self.healing || !self.outstanding.is_empty() {
                self.schedule(100 * US, Ev::ClientTick);
            }
            return;
        }
        let d = self.rng.range(5 * US, 200 * US);
        if !self.healing || !self.outstanding.is_empty() {
            self.schedule(d, Ev::ClientTick);
        }
        if self.healing || self.ops_left == 0 || self.outstanding.len() >= self.cfg.queue_depth {
            return;
        }
        let prim = self.prim;
        let Some(st) = self.status(prim) else { return };
        if st.role != Role::Primary {
            self.admin(prim, AdminCmd::Promote { force: false });
            return;
        }
        self.ops_left -= 1;
        let req = self.next_req;
        self.next_req += 1;
        let blocks = self.cfg.blocks;
        let roll = self.rng.below(100);
        if roll < 10 {
            let snapshot = self.oracle.confirmed_vol.clone();
            self.outstanding.insert(
                req,
                ClientReq::Flush {
                    conn_epoch: self.conn_epoch,
                    snapshot,
                    completed: self.oracle.completed.clone(),
                },
            );
            self.oracle.client_flush();
            self.feed(prim, Event::ClientFlush { req });
            return;
        }
        let first = self.rng.below(blocks as u64) as usize;
        let n = (self.rng.range(1, 4) as usize).min(blocks - first);
        if roll < 18 {
            let tag = self.oracle.client_write(first, n, true);
            self.note_split_write(prim, tag);
            self.outstanding.insert(
                req,
                ClientReq::Write {
                    tag,
                    first,
                    n,
                    fua: false,
                    zero: true,
                },
            );
            let (offset, len) = ((first * BS) as u64, (n * BS) as u32);
            let ev = if roll < 14 {
                *self.stats.entry("client trims").or_default() += 1;
                Event::ClientTrim { req, offset, len }
            } else {
                Event::ClientWriteZeroes { req, offset, len }
            };
            self.feed(prim, ev);
            return;
        }
        if roll < 20 {
            self.feed(
                prim,
                Event::ClientRead {
                    req,
                    offset: (first * BS) as u64,
                    len: BS as u32,
                },
            );
            return;
        }
        let tag = self.oracle.client_write(first, n, false);
        self.note_split_write(prim, tag);
        let fua = self.rng.one_in(8);
        let mut data = Vec::with_capacity(n * BS);
        for _ in 0..n {
            data.extend_from_slice(&block_for(tag));
        }
        self.outstanding.insert(
            req,
            ClientReq::Write {
                tag,
                first,
                n,
                fua,
                zero: false,
            },
        );
        self.log(format!(
            "client: write tag {tag} blocks {first}+{n} fua {fua}"
        ));
        self.feed(
            prim,
            Event::ClientWrite {
                req,
                offset: (first * BS) as u64,
                data: Bytes::from(data),
                fua,
            },
        );
    }

    fn client_done(&mut self, req: u64, result: Result<(), i32>, confirmable: bool) {
        let Some(r) = self.outstanding.remove(&req) else {
            return;
        };
        self.log(format!(
            "client: {r:?} done {result:?} confirmable {confirmable}"
        ));
        let sync = self.cfg.protocol == Protocol::Sync;
        let sec = 1 - self.prim;
        match r {
            ClientReq::Write {
                tag,
                first,
                n,
                fua,
                zero,
            } => {
                self.oracle.client_completed(tag, first, n, result.is_ok());
                if result.is_ok() {
                    self.oracle.primary_completed(tag, first, n, fua);
                }
                let confirmed = sync
                    && result.is_ok()
                    && confirmable
                    && !zero
                    && self.replicated_tags.get(&tag) == Some(&self.conn_epoch);
                if confirmed {
                    *self
                        .stats
                        .entry("sync acks checked on secondary")
                        .or_default() += 1;
                    if let Err(e) =
                        self.oracle
                            .confirm_write(tag, first, n, fua, &self.nodes[sec].disk)
                    {
                        self.fail(format!("sync write tag {tag} acked to the client: {e}"));
                    }
                }
            }
            ClientReq::Flush {
                conn_epoch,
                snapshot,
                completed,
            } => {
                if result.is_ok() {
                    self.oracle.primary_flushed(&completed);
                }
                let was_replicating = self.status(self.prim).is_some_and(|s| {
                    matches!(s.repl, ReplState::Established | ReplState::SyncSource)
                });
                if sync
                    && result.is_ok()
                    && confirmable
                    && conn_epoch == self.conn_epoch
                    && was_replicating
                {
                    if let Err(e) = self.oracle.confirm_flush(&snapshot, &self.nodes[sec].disk) {
                        self.fail(format!("sync flush acked to the client: {e}"));
                    }
                }
            }
        }
    }

    fn fault(&mut self) {
        if self.healing {
            return;
        }
        let d = self.rng.range(300 * US, 6000 * US);
        self.schedule(d, Ev::Fault);
        // The operator's episodes (only seeds with them draw here, so others replay as before).
        if (self.cfg.stale_promotion || self.cfg.switchover)
            && self.may_start_episode()
            && self.rng.one_in(3)
        {
            let stale = self.cfg.stale_promotion && (!self.cfg.switchover || self.rng.one_in(2));
            if stale {
                self.start_stale();
            } else {
                self.start_switchover(false);
            }
            return;
        }
        // The operator's `adjust` (only seeds with it draw here, so others replay as before).
        if self.cfg.adjusts && self.rng.one_in(4) {
            self.adjust();
            return;
        }
        // The operator's episodes take no crashes (their outcome is what they check).
        let episode = self.stale.is_some() || self.switching.is_some();
        match self.rng.below(10) {
            0..=2 if episode => {}
            0 => self.crash(A),
            1 | 2 => self.crash(B),
            3..=5 => self.drop_connection("simulated link failure"),
            6 => {
                let d = self.rng.range(1000 * US, 8000 * US);
                self.partitioned_until = self.now + d;
                self.drop_connection("simulated partition");
            }
            // Not during the operator's episodes, which take no crashes: a stop's power failure
            // is one (seed 2499 with adjusts: a switchover's old Primary crashed in its stop,
            // and the switchover waited for it for ever).
            9 if self.cfg.downs
                && !episode
                && self.down_node.is_none()
                && self.split.is_none()
                && !self.failover_pending =>
            {
                let node = if self.rng.one_in(3) {
                    1 - self.prim
                } else {
                    self.prim
                };
                // The peer is stopped (SIGSTOP) as the node goes down: the drain expires.
                self.stall_at_down = self.rng.one_in(3);
                self.down_node = Some(node);
                if self.rng.one_in(3) {
                    // The link fails first: the stop may find writes frozen by fencing.
                    self.drop_connection("simulated link failure");
                    let d = self.rng.range(200 * US, 1500 * US);
                    self.schedule(d, Ev::Down { node });
                } else {
                    self.schedule(0, Ev::Down { node });
                }
            }
            7 | 8
                if self.cfg.split_brain
                    && !episode
                    && self.split.is_none()
                    && !self.failover_pending
                    && self.ops_left > 20
                    && self.conn.is_some()
                    && self.alive(A)
                    && self.alive(B)
                    // A Primary whose disk failed is no side of a split brain: promoting its
                    // peer is what the failure's message asks for (async seed 40252: the
                    // "rogue" got the whole device from the failed Primary's peer, rightly).
                    && self.status(self.prim).is_some_and(|s| s.disk_failure.is_none()) =>
            {
                self.start_split()
            }
            _ => {}
        }
    }

    /// STONITH (`SimConfig::stonith`): the fence of `node`, a Primary frozen by the loss of
    /// its peer, powers the peer off before it reports success. Only a Secondary peer outside
    /// the operator's episodes (which take no crashes) and outside a split brain (whose rogue
    /// Primary the checks follow) is killed; otherwise the fence succeeds as a plain hook.
    fn stonith_kills_peer(&mut self, node: usize) -> bool {
        let peer = 1 - node;
        let frozen_primary = self
            .status(node)
            .is_some_and(|s| s.role == Role::Primary && s.frozen.is_some());
        // (A node whose own disk failed while the peer held everything never freezes: the core
        // does not fence the only good copy, and the fence check below fails a node that
        // does. Before, its STONITH killed that copy: async seed 9912.)
        if !self.cfg.stonith
            || node != self.prim
            || !frozen_primary
            || !self.alive(peer)
            || self.status(peer).is_some_and(|s| s.role == Role::Primary)
            || self.split.is_some()
            || self.stale.is_some()
            || self.switching.is_some()
            || self.failover_pending
        {
            return false;
        }
        *self
            .stats
            .entry("stonith: fence killed the peer")
            .or_default() += 1;
        self.log(format!("STONITH: node {node}'s fence kills node {peer}"));
        self.crash(peer);
        true
    }

    /// The operator's `adjust` on a running node (`SimConfig::adjusts`): new resync rates and
    /// `on-peer-lost` turned on or off, the split-brain policies as they are (the checks of a
    /// split brain follow `SimConfig::sb_policy`). Turning fencing off while the node's writes
    /// wait for a fence must be refused, and a refused adjust applies nothing.
    fn adjust(&mut self) {
        let node = if self.rng.one_in(2) { A } else { B };
        let Some(cur) = self.nodes[node]
            .replica
            .as_ref()
            .map(|r| r.config().clone())
        else {
            return;
        };
        let frozen = self.status(node).is_some_and(|s| s.frozen.is_some());
        let fencing = if frozen && self.rng.one_in(2) {
            false
        } else {
            self.rng.one_in(2)
        };
        let rates = match self.rng.below(4) {
            0 => (0, 0),
            1 => (0, 64 << 20),
            2 => (32 << 20, 8 << 20),
            _ => (256 << 20, 0),
        };
        let mut rate = cur.resync_rate;
        rate.max_rate = rates.0;
        rate.min_rate = rates.1;
        let a = twinblk::core::Adjustable {
            resync_rate: rate,
            after_sb_0pri: cur.after_sb_0pri,
            after_sb_1pri: cur.after_sb_1pri,
            fencing: if fencing {
                twinblk::core::Fencing::FreezeUntilFenced
            } else {
                twinblk::core::Fencing::Off
            },
        };
        self.log(format!(
            "OPERATOR: adjust node {node}: fencing {fencing}, rates {rates:?}"
        ));
        self.adjusted = None;
        self.feed(
            node,
            Event::Admin {
                tag: ADJUST,
                cmd: AdminCmd::Adjust(a),
            },
        );
        match self.adjusted.take() {
            Some(Ok(())) if frozen && !fencing => self.fail(format!(
                "node {node}: adjust turned fencing off while writes wait for the fence"
            )),
            Some(Ok(())) => {
                *self
                    .stats
                    .entry(match (self.fencing[node], fencing) {
                        (false, true) => "adjust: fencing turned on",
                        (true, false) => "adjust: fencing turned off",
                        (false, false) | (true, true) => "adjust: rates only",
                    })
                    .or_default() += 1;
                self.fencing[node] = fencing;
                self.rates[node] = rates;
            }
            Some(Err(AdminError::FencingStillNeeded)) if frozen && !fencing => {
                *self
                    .stats
                    .entry("adjust: fencing-still-needed refused")
                    .or_default() += 1;
                let kept = self.nodes[node].replica.as_ref().map(|r| {
                    let c = r.config();
                    (c.resync_rate, c.fencing)
                });
                if kept != Some((cur.resync_rate, cur.fencing)) {
                    self.fail(format!("node {node}: a refused adjust applied something"));
                }
            }
            // A node that is going down takes no more commands.
            Some(Err(AdminError::ShuttingDown | AdminError::ShutDown)) => {
                *self
                    .stats
                    .entry("adjust: refused while stopping")
                    .or_default() += 1;
            }
            Some(Err(e)) => self.fail(format!("node {node}: adjust refused: {e}")),
            None => self.fail(format!("node {node}: adjust not answered in its step")),
        }
    }

    /// An operator episode (stale promotion, switchover) may start: nothing else is going on.
    fn may_start_episode(&self) -> bool {
        let established = |n| {
            self.status(n)
                .is_some_and(|s| s.repl == ReplState::Established && s.disk == DiskState::UpToDate)
        };
        self.stale.is_none()
            && self.switching.is_none()
            && self.down_node.is_none()
            && self.split.is_none()
            && !self.failover_pending
            && !self.client_paused
            && self.ops_left > 20
            && self.conn.is_some()
            && established(A)
            && established(B)
            && self
                .status(self.prim)
                .is_some_and(|s| s.role == Role::Primary)
    }

    // ---- stale promotion (issue 17, defect 1) ----

    /// The client stops submitting; a moment later a partition comes (what it had in flight
    /// then completes at the loss).
    fn start_stale(&mut self) {
        self.client_paused = true;
        let promote = !self.rng.one_in(4);
        let st = Stale {
            old: self.prim,
            promote,
            demote_old: promote || self.rng.one_in(2),
            new_writes: self.rng.one_in(2),
            cut: false,
            acted: false,
            missing: Vec::new(),
            reported: false,
            diverged: false,
        };
        self.log(format!("STALE: the client stalls: {st:?}"));
        self.stale = Some(st);
        let d = self.rng.range(5 * US, 300 * US);
        self.schedule(d, Ev::StalePromote);
    }

    fn end_stale(&mut self, what: &'static str) {
        self.log(format!("STALE: over ({what})"));
        *self.stats.entry(what).or_default() += 1;
        self.stale = None;
        self.client_paused = false;
    }

    /// The operator, once both nodes noticed the loss: demotes the old Primary and promotes
    /// the stale node (plainly: it believes its disk UpToDate).
    fn stale_promote(&mut self) {
        let Some(st) = self.stale.as_ref() else {
            return;
        };
        if st.acted {
            return;
        }
        let (old, new) = (st.old, 1 - st.old);
        let (promote, demote_old, new_writes) = (st.promote, st.demote_old, st.new_writes);
        if !st.cut {
            if self.conn.is_none() {
                self.end_stale("stale: the link went down first");
                return;
            }
            let d = self.rng.range(3000 * US, 10000 * US);
            self.partitioned_until = self.now + d;
            self.drop_connection("simulated partition (stale promotion)");
            self.oracle.secondary_valid = false;
            if let Some(st) = self.stale.as_mut() {
                st.cut = true;
            }
            *self
                .stats
                .entry("stale: client stalled, then a partition")
                .or_default() += 1;
            let d = self.rng.range(300 * US, 1500 * US);
            self.schedule(d, Ev::StalePromote);
            return;
        }
        if self.conn.is_some() {
            // The partition healed before the operator got to it.
            self.end_stale("stale: reconnected before the operator acted");
            return;
        }
        // (Not while a node's handshake is still undecided: the partition has not reached it,
        // and a `primary` then would wait for that handshake's outcome.)
        let noticed = |w: &World, n| {
            w.status(n).is_some_and(|s| {
                matches!(s.repl, ReplState::StandAlone | ReplState::Connecting) && !s.handshaking
            })
        };
        if !self.outstanding.is_empty()
            || !noticed(self, old)
            || !noticed(self, new)
            || !self.nodes[new].disk.writes_in_flight.is_empty()
        {
            self.schedule(100 * US, Ev::StalePromote);
            return;
        }
        if demote_old {
            self.admin(old, AdminCmd::Demote);
            if self.status(old).is_some_and(|s| s.role != Role::Secondary) {
                self.schedule(100 * US, Ev::StalePromote);
                return;
            }
        }
        if let Some(st) = self.stale.as_mut() {
            st.acted = true;
        }
        if !promote {
            *self
                .stats
                .entry("stale: old Primary alone, no promotion")
                .or_default() += 1;
            return;
        }
        let missing = match self.oracle.missing_acked(&self.nodes[new].disk.volatile) {
            Ok(m) => m,
            Err(e) => self.fail(format!("stale node's disk: {e}")),
        };
        self.admin(new, AdminCmd::Promote { force: false });
        if self.status(new).is_some_and(|s| s.role != Role::Primary) {
            self.admin(old, AdminCmd::Promote { force: false });
            self.end_stale("stale: promotion refused");
            return;
        }
        *self.stats.entry("stale: stale node promoted").or_default() += 1;
        if !missing.is_empty() {
            *self
                .stats
                .entry("stale: promoted node lacked acknowledged writes")
                .or_default() += 1;
        }
        self.log(format!(
            "STALE: node {new} promoted, lacking acknowledged blocks {missing:?}"
        ));
        if let Some(st) = self.stale.as_mut() {
            st.missing = missing;
        }
        // The client follows the operator to the promoted node: a stale failover.
        self.forced_failover = true;
        self.take_over(new, "stale promoted node's disk", true);
        if new_writes {
            self.client_paused = false;
        }
    }

    /// Invariant: after a stale promotion, the old Primary's acknowledged writes the promoted
    /// node lacked are never resynced away (or left different) without a refusal or a
    /// split-brain report: the old Primary must be the sync source if they connect.
    fn check_stale(&mut self) -> Result<(), String> {
        let Some(st) = self.stale.as_ref().filter(|st| st.cut) else {
            return Ok(());
        };
        if st.reported {
            self.end_stale("stale: reported at the reconnect");
            return Ok(());
        }
        let repl = |w: &World, n| w.status(n).map(|s| s.repl);
        let decided = |r: Option<ReplState>| {
            matches!(
                r,
                Some(ReplState::Established | ReplState::SyncSource | ReplState::SyncTarget)
            )
        };
        let old = st.old;
        if self.conn.is_none() || !decided(repl(self, old)) || !decided(repl(self, 1 - old)) {
            // The generations as the next handshake will see them (a sync target adopts the
            // source's once it decided).
            let diverged = match (self.status(old), self.status(1 - old)) {
                (Some(o), Some(n)) => {
                    o.current_gen != n.current_gen
                        && Some(o.current_gen) != n.bitmap_gen
                        && Some(n.current_gen) != o.bitmap_gen
                }
                _ => false,
            };
            // (Only before either decided: a source moves its bitmap generation to the
            // target's. Once diverged, it stays so: a policy's source that decided before a
            // cut, its target not yet, has moved its bitmap generation to the target's, and
            // the next handshake resumes that resync without a split brain: async seed 15081
            // with flush faults on.)
            let neither = !decided(repl(self, old)) && !decided(repl(self, 1 - old));
            if let Some(st) = self.stale.as_mut().filter(|_| neither) {
                st.diverged |= diverged;
            }
            return Ok(());
        }
        let lost = st.acted && st.promote && !st.missing.is_empty();
        let old_secondary = self.status(old).is_some_and(|s| s.role == Role::Secondary);
        if lost && self.cfg.sb_policy && old_secondary && st.diverged {
            // Both changed data: a split brain, resolved by the policy the operator configured
            // on both nodes (after-sb-1pri discard-secondary: the old Primary, now Secondary,
            // loses; `check_split`'s rules apply to it as to any split brain).
            self.end_stale("stale: split brain resolved by the shared policy");
            return Ok(());
        }
        if lost && repl(self, old) != Some(ReplState::SyncSource) {
            return Err(format!(
                "the stale node was promoted lacking acknowledged writes of the old Primary \
                 (blocks {:?}), and they connected without a split brain or refusal: node {old} \
                 is {:?}",
                st.missing,
                repl(self, old)
            ));
        }
        self.end_stale("stale: reconnected, nothing lost");
        Ok(())
    }

    // ---- planned switchover (issue 17, defect 3) ----

    fn start_switchover(&mut self, back_to_back: bool) {
        self.client_paused = true;
        let both = !back_to_back && self.both_rng.one_in(3);
        self.switching = Some(Switch {
            old: self.prim,
            demote_sent: false,
            demoted: None,
            promote_sent: false,
            promoted: None,
            retries: 0,
            back_to_back,
            both,
            promoted_old: None,
        });
        self.log(format!(
            "SWITCHOVER: from node {}{}{}",
            self.prim,
            if back_to_back { " (back to back)" } else { "" },
            if both { " (primary on both nodes)" } else { "" }
        ));
        *self
            .stats
            .entry(if back_to_back {
                "switchover started (back to back)"
            } else {
                "switchover started"
            })
            .or_default() += 1;
        // Back to back: within a network delay of the last, so the new Primary's State
        // (Primary) may still be on its way to the node promoted next (sync seed 7162).
        let d = if back_to_back {
            self.rng.range(US, 50 * US)
        } else {
            self.rng.range(20 * US, 400 * US)
        };
        self.schedule(d, Ev::Switchover);
    }

    fn end_switchover(&mut self, what: &'static str) {
        self.log(format!("SWITCHOVER: {what}"));
        *self.stats.entry(what).or_default() += 1;
        self.switching = None;
        self.client_paused = false;
    }

    /// `secondary` on the old Primary once its client stopped (its last writes may still be on
    /// their way), then `primary` on the peer once the demotion answered, retried while the
    /// peer refuses because writes are still landing (as the CLI does). The new Primary must
    /// hold every write the client got acknowledged.
    fn switchover_step(&mut self) {
        let Some(sw) = self.switching.as_mut() else {
            return;
        };
        let (old, new) = (sw.old, 1 - sw.old);
        if !sw.demote_sent {
            if !self.outstanding.is_empty() {
                self.schedule(50 * US, Ev::Switchover);
                return;
            }
            let established = |w: &World, n| {
                w.status(n)
                    .is_some_and(|s| s.repl == ReplState::Established)
            };
            if self.conn.is_none() || !established(self, old) || !established(self, new) {
                // The link went down first: no planned switchover (promoting the peer now is
                // the stale promotion, a schedule of its own).
                self.end_switchover("switchover: link down first, not attempted");
                return;
            }
            let Some(sw) = self.switching.as_mut() else {
                return;
            };
            sw.demote_sent = true;
            self.feed(
                old,
                Event::Admin {
                    tag: SWITCH_DEMOTE,
                    cmd: AdminCmd::Demote,
                },
            );
            self.schedule(20 * US, Ev::Switchover);
            return;
        }
        match sw.demoted.take() {
            None => {
                // Waiting for the peer to make the tail stable.
                self.schedule(50 * US, Ev::Switchover);
                return;
            }
            Some(Err(e)) => {
                self.log(format!("SWITCHOVER: demotion failed: {e}"));
                if self.status(old).is_some_and(|s| s.role != Role::Primary) {
                    self.fail(format!("a failed demotion left node {old} Secondary: {e}"));
                }
                self.end_switchover("switchover: demotion failed, old Primary kept");
                return;
            }
            Some(Ok(())) => {}
        }
        // `primary` on the peer: connected, it asks the old Primary first and answers once
        // that one did (or the connection was lost).
        let Some(sw) = self.switching.as_mut() else {
            return;
        };
        sw.demoted = Some(Ok(()));
        let both = sw.both;
        if !sw.promote_sent {
            sw.promote_sent = true;
            self.feed(
                new,
                Event::Admin {
                    tag: SWITCH_PROMOTE,
                    cmd: AdminCmd::Promote { force: false },
                },
            );
            if both {
                // At the same instant: the two asks cross on the network.
                self.feed(
                    old,
                    Event::Admin {
                        tag: SWITCH_PROMOTE_OLD,
                        cmd: AdminCmd::Promote { force: false },
                    },
                );
            }
        }
        let Some(sw) = self.switching.as_mut() else {
            return;
        };
        if both {
            // A node a `down` (its process exit) took meanwhile never answers: the other's
            // answer decides, as in a switchover of one `primary`.
            let (n, o) = (sw.promoted.clone(), sw.promoted_old.clone());
            if (n.is_none() && self.alive(new)) || (o.is_none() && self.alive(old)) {
                self.schedule(50 * US, Ev::Switchover);
                return;
            }
            self.both_promoted(old, n, o);
            return;
        }
        let Some(result) = sw.promoted.take() else {
            self.schedule(50 * US, Ev::Switchover);
            return;
        };
        sw.promote_sent = false;
        let promoted = self.status(new).is_some_and(|s| s.role == Role::Primary);
        if result.is_ok() != promoted {
            self.fail(format!(
                "node {new}'s promotion answered {result:?}, but it is {}",
                if promoted { "Primary" } else { "not Primary" }
            ));
        }
        if let Err(why) = result {
            // The old Primary's state change may still be on its way (it went out when the
            // demotion answered), like the CLI's retry of writes still landing.
            let peer_primary = matches!(why, AdminError::PeerIsPrimary { .. });
            let retries = self.switching.as_ref().map_or(0, |sw| sw.retries);
            let landing = matches!(why, AdminError::PeerWritesLanding { .. });
            if landing || (peer_primary && retries < 40) {
                *self
                    .stats
                    .entry(if peer_primary {
                        "switchover: promotion retried (demotion on its way)"
                    } else {
                        "switchover: promotion waited for landing writes"
                    })
                    .or_default() += 1;
                if let Some(sw) = self.switching.as_mut() {
                    sw.retries += u32::from(peer_primary);
                }
                self.schedule(50 * US, Ev::Switchover);
                return;
            }
            // Nothing else promotes a node during a switchover: the peer never asks at the
            // same moment.
            if matches!(why, AdminError::PromotionConflict { .. }) {
                self.fail(format!(
                    "node {new}'s promotion met a promotion nobody ran: {why}"
                ));
            }
            self.log(format!("SWITCHOVER: promotion refused: {why}"));
            self.admin(old, AdminCmd::Promote { force: false });
            self.end_switchover("switchover: promotion refused, old Primary back");
            return;
        }
        self.switched(new);
    }

    /// `primary` ran on both nodes at once (`Switch::both`): `new`'s and `old`'s answers.
    /// Exactly one may be Primary (the check after every step catches two); neither only for a
    /// reason other than the tie (a node refusing at once because writes are still landing,
    /// the winner's own refusal when the yes arrives, a lost connection): then the old Primary
    /// is promoted again.
    fn both_promoted(
        &mut self,
        old: usize,
        on_new: Option<Result<(), AdminError>>,
        on_old: Option<Result<(), AdminError>>,
    ) {
        let new = 1 - old;
        // A node that went down answered nothing (`None`): it is not promoted.
        let gone = || Err(AdminError::ShutDown);
        let (on_new, on_old) = (on_new.unwrap_or_else(gone), on_old.unwrap_or_else(gone));
        for (n, result) in [(new, &on_new), (old, &on_old)] {
            let Some(st) = self.status(n) else {
                continue;
            };
            let primary = st.role == Role::Primary;
            if result.is_ok() != primary {
                self.fail(format!(
                    "node {n}'s `primary` (on both nodes) answered {result:?}, but it is {}",
                    if primary { "Primary" } else { "not Primary" }
                ));
            }
        }
        let conflict =
            |r: &Result<(), AdminError>| matches!(r, Err(AdminError::PromotionConflict { .. }));
        let winner = match (&on_new, &on_old) {
            (Ok(()), Ok(())) => {
                self.fail("`primary` on both nodes at once succeeded on both: two Primaries".into())
            }
            (Err(_), Err(_)) if conflict(&on_new) && conflict(&on_old) => self.fail(format!(
                "`primary` on both nodes at once promoted neither: both refused as a \
                 conflict ({on_new:?}, {on_old:?})"
            )),
            (Err(a), Err(b)) => {
                self.log(format!(
                    "SWITCHOVER: primary on both nodes, neither promoted: {a}; {b}"
                ));
                let landing = |e: &AdminError| matches!(e, AdminError::PeerWritesLanding { .. });
                self.admin(old, AdminCmd::Promote { force: false });
                self.end_switchover(if landing(a) || landing(b) {
                    "switchover: primary on both nodes, neither went ahead (writes landing)"
                } else {
                    "switchover: primary on both nodes, neither went ahead"
                });
                return;
            }
            (Ok(()), Err(_)) => new,
            (Err(_), Ok(())) => old,
        };
        let loser = if winner == new { &on_old } else { &on_new };
        if conflict(loser) && winner != A {
            self.fail(format!(
                "crossing promotions: node {winner} went ahead, not the lower node id (node {A})"
            ));
        }
        *self
            .stats
            .entry(match (winner == new, conflict(loser)) {
                (true, true) => "switchover: primary on both nodes, crossed, new went ahead",
                (false, true) => "switchover: primary on both nodes, crossed, old went ahead",
                (true, false) => "switchover: primary on both nodes, new went ahead",
                (false, false) => "switchover: primary on both nodes, old went ahead",
            })
            .or_default() += 1;
        if winner == old {
            // The old Primary's disk is still the history (its demotion made it stable on
            // both, and nothing was written since).
            self.end_switchover("switchover: the old Primary is Primary again");
            return;
        }
        self.switched(new);
    }

    /// The switchover made `new` the Primary: it holds every acknowledged write, and takes
    /// over.
    fn switched(&mut self, new: usize) {
        if let Err(e) = self.oracle.check_completed(&self.nodes[new].disk.volatile) {
            self.fail(format!(
                "a planned switchover lost an acknowledged write on the new Primary {new}: {e}"
            ));
        }
        self.take_over(new, "new Primary after a switchover", true);
        let back_to_back = self.switching.as_ref().is_some_and(|sw| sw.back_to_back);
        self.end_switchover(match (self.cfg.protocol, back_to_back) {
            (Protocol::Sync, false) => "switchover done (sync)",
            (Protocol::Async, false) => "switchover done (async)",
            (Protocol::Sync, true) => "switchover done (sync, back to back)",
            (Protocol::Async, true) => "switchover done (async, back to back)",
        });
        // Half the first switchovers are switched back at once (issue 17, the promotion
        // agreed with the peer).
        if !back_to_back && self.rng.one_in(2) {
            self.start_switchover(true);
        }
    }

    fn step(&mut self) -> bool {
        let Some(s) = self.queue.pop() else {
            return false;
        };
        self.now = s.at;
        self.events += 1;
        match s.ev {
            Ev::Disk {
                node,
                inc,
                io,
                op,
                fail,
            } => {
                if self.nodes[node].inc != inc || !self.alive(node) {
                    return true;
                }
                if std::env::var_os("TWINBLK_SIM_TRACE").is_some() {
                    let d = match &op {
                        DiskOp::Write { offset, data, .. } => format!(
                            "write block {} tags {:?}",
                            offset / BS as u64,
                            data.chunks(BS).map(tag_of).collect::<Vec<_>>()
                        ),
                        o => format!("{o:?}"),
                    };
                    self.log(format!("node {node} disk io {io} done: {d}"));
                }
                // No flush of the Primary fails while a split brain is made and resolved: one
                // that fails before the Primary noticed the partition gives its disk up (its
                // peer held everything), and the split then has a side without data, which
                // this model of a split brain does not follow (sync seed 71219;
                // `start_split` likewise waits for a failed Primary).
                let fail = fail.filter(|_| {
                    !(node == self.prim
                        && self.split.is_some()
                        && matches!(op, DiskOp::Flush { .. } | DiskOp::AlTxn { .. }))
                });
                let mut al_saved = None;
                let is_write = matches!(op, DiskOp::Write { .. });
                let mut rng = self.rng.clone();
                let disk = &mut self.nodes[node].disk;
                disk.writes_in_flight.retain(|&(i, _, _)| i != io);
                let sticky = disk.flush_failed;
                let result = match (fail, op) {
                    // An activity-log transaction's pre-flush fails like any flush.
                    (Some(e), DiskOp::Flush { .. } | DiskOp::AlTxn { .. }) => {
                        disk.fail_flush(&mut rng);
                        Err(e)
                    }
                    (None, DiskOp::Flush { .. } | DiskOp::AlTxn { .. }) if sticky => Err(libc::EIO),
                    (Some(e), _) => Err(e),
                    (None, DiskOp::Write { offset, data, fua }) => {
                        disk.write(offset, &data, fua);
                        Ok(None)
                    }
                    (None, DiskOp::Zero { offset, len }) => {
                        disk.zero(offset, len);
                        Ok(None)
                    }
                    (None, DiskOp::Discard { offset, len, keep }) => {
                        disk.discard(offset, len, &keep);
                        Ok(None)
                    }
                    (None, DiskOp::Flush { upto }) => {
                        disk.flush_upto(upto);
                        Ok(None)
                    }
                    (None, DiskOp::Read { offset, len }) => {
                        Ok(Some(Bytes::from(disk.read(offset, len))))
                    }
                    (None, DiskOp::AlTxn { extents, upto }) => {
                        // The driver contract: the data writes completed when it started are
                        // stable before the log transaction (DRBD's pre-flush), so an evicted
                        // extent's data survives a crash.
                        disk.flush_upto(upto);
                        al_saved = Some(extents);
                        Ok(None)
                    }
                };
                self.rng = rng;
                if let Some(extents) = al_saved {
                    self.nodes[node].al = extents;
                }
                if fail.is_some() && self.nodes[node].disk.flush_failed && !sticky {
                    *self.stats.entry("flush failed").or_default() += 1;
                    if node != self.prim {
                        // The Secondary's cache lost writes it had acked as written: what a
                        // crash of it would (the Primary's transfer log covers them).
                        if let Err(e) = self.oracle.secondary_crash(&self.nodes[node].disk) {
                            self.fail(format!("secondary's disk after a failed flush: {e}"));
                        }
                        self.conn_epoch += 1;
                    }
                }
                if let Err(e) = result {
                    *self.stats.entry("disk io error").or_default() += 1;
                    self.log(format!("node {node} disk io {io} fails errno {e}"));
                    // Every data write that is not a client's is the peer's (replicated or
                    // resync); the core still has it in flight here.
                    let peers = is_write
                        && !matches!(
                            self.nodes[node]
                                .replica
                                .as_ref()
                                .and_then(|r| r.io_origin(io)),
                            Some(twinblk::core::IoOrigin::Client(_))
                        );
                    if peers {
                        *self.stats.entry("peer write failed").or_default() += 1;
                        self.peer_write_failed[node] = true;
                    }
                }
                self.feed(node, Event::DiskDone { io, result });
            }
            Ev::Deliver { to, conn, frame } => {
                if let Some(n) = self.frames_in_flight.get_mut(&conn) {
                    *n = n.saturating_sub(1);
                }
                if self.conn != Some(conn) {
                    self.frames_in_flight.remove(&conn);
                    return true;
                }
                if let Some((n, until)) = self.stalled.filter(|&(n, u)| n == to && self.now < u) {
                    // Stopped: delivered (in order) when it runs again.
                    *self.frames_in_flight.entry(conn).or_default() += 1;
                    self.seq += 1;
                    self.queue.push(Scheduled {
                        at: until,
                        seq: self.seq,
                        ev: Ev::Deliver { to: n, conn, frame },
                    });
                    return true;
                }
                match wire::decode(&frame) {
                    Ok(Some((msg, used))) if used == frame.len() => {
                        self.feed(to, Event::Peer { conn, msg });
                    }
                    other => {
                        let why = format!("undecodable frame: {other:?}");
                        self.log(format!("node {to} {why}"));
                        self.drop_connection("frame failed to decode");
                    }
                }
            }
            Ev::ConnUp { conn } => {
                self.connecting = false;
                if self.conn.is_some()
                    || !self.alive(A)
                    || !self.alive(B)
                    || self.now < self.partitioned_until
                {
                    return true;
                }
                self.conn = Some(conn);
                self.conn_epoch += 1;
                self.log(format!("net: connection {conn} up"));
                self.feed(A, Event::ConnectionUp { conn });
                if self.conn == Some(conn) {
                    self.feed(B, Event::ConnectionUp { conn });
                }
            }
            Ev::ConnDown { node, conn, reason } => {
                self.feed(node, Event::ConnectionDown { conn, reason });
            }
            Ev::Timer { node, inc, kind } => {
                if self.nodes[node].inc == inc {
                    self.feed(node, Event::Timer(kind));
                }
            }
            Ev::ClientTick => self.client_tick(),
            Ev::Fault => self.fault(),
            Ev::Restart { node } => self.restart(node),
            Ev::Failover => self.failover(),
            Ev::RogueWrite => self.rogue_write(),
            Ev::Resolve => self.resolve(),
            Ev::DemoteStale { node } => self.demote_stale(node),
            Ev::RestartFailedNode { node, inc } => {
                let handing_over = self
                    .status(node)
                    .is_some_and(|s| matches!(s.handover, Some(Handover::Running { .. })));
                if handing_over && self.nodes[node].inc == inc {
                    // Its status says it is handing writes over to the peer: the operator
                    // waits for that before the restart, as for a `down` that drains.
                    *self
                        .stats
                        .entry("restart after a disk failure waited for the handover")
                        .or_default() += 1;
                    let d = self.rng.range(100 * US, 500 * US);
                    self.schedule(d, Ev::RestartFailedNode { node, inc });
                } else if self.nodes[node].inc == inc && self.alive(node) {
                    *self
                        .stats
                        .entry("restart after a disk failure")
                        .or_default() += 1;
                    self.crash(node);
                }
            }
            Ev::CutAtResyncEnd => {
                if !self.healing {
                    *self.stats.entry("cut as a resync finished").or_default() += 1;
                    self.drop_connection("simulated link failure as a resync finished");
                }
            }
            Ev::StalePromote => self.stale_promote(),
            Ev::Switchover => self.switchover_step(),
            Ev::Down { node } => self.down(node),
            Ev::DropLink => {
                if self.status(A).is_some_and(|s| s.stopping)
                    || self.status(B).is_some_and(|s| s.stopping)
                {
                    *self
                        .stats
                        .entry("down: link fails during the drain")
                        .or_default() += 1;
                }
                self.drop_connection("simulated link failure");
            }
            Ev::FenceDone {
                node,
                inc,
                episode,
                ok,
            } => {
                if self.nodes[node].inc == inc {
                    if !ok {
                        *self.stats.entry("fence: hook failed").or_default() += 1;
                    }
                    let result = if ok {
                        Ok(())
                    } else {
                        Err("simulated hook: exit status: 1".into())
                    };
                    let stonith = ok && self.stonith_kills_peer(node);
                    // Only the answer for the freeze the node is in must end it. A hook of an
                    // episode that ended otherwise (the peer connected again, then was lost
                    // again: a new freeze) still kills the peer, as a real STONITH does, but
                    // the core waits for its current episode's fence (FAILOVERS=1 seed 6382:
                    // the first freeze's hook answered during the second freeze).
                    let current = self.fence_episode[node] == Some(episode);
                    self.log(format!(
                        "node {node}'s fence (episode {episode}) answers {}{}",
                        if ok { "ok" } else { "failed" },
                        if current { "" } else { " (an older episode)" }
                    ));
                    self.feed(node, Event::Fenced { episode, result });
                    if stonith && current && self.status(node).is_some_and(|s| s.frozen.is_some()) {
                        self.fail(format!(
                            "node {node} stays frozen after its fence killed the peer"
                        ));
                    }
                }
            }
        }
        self.maybe_connect();
        if let Err(e) = self.check_bitmap_cover() {
            self.fail(e);
        }
        if let Err(e) = self.check_split() {
            self.fail(e);
        }
        if let Err(e) = self.check_stale() {
            self.fail(e);
        }
        if self.forced_failover
            && [A, B].iter().all(|&n| {
                self.status(n)
                    .is_some_and(|s| s.repl == ReplState::Established)
            })
        {
            self.forced_failover = false;
            self.untrusted_promotion = false;
        }
        true
    }

    /// The dirty bitmap of a node: in memory while it runs; after a crash what survives it,
    /// the persisted words plus (crashed as Primary) every activity-log extent.
    fn effective_bitmap(&self, node: usize) -> Vec<bool> {
        let n = &self.nodes[node];
        let mut v = vec![false; self.cfg.blocks];
        match &n.replica {
            Some(r) => {
                for (b, x) in v.iter_mut().enumerate() {
                    *x = r.bitmap().get(b as u64);
                }
            }
            None => {
                for (b, x) in v.iter_mut().enumerate() {
                    *x = n
                        .bitmap
                        .get(b / 64)
                        .is_some_and(|w| w & (1 << (b % 64)) != 0);
                }
                if n.meta.primary && n.meta.no_activity_log {
                    // It wrote without an activity log: it restarts with everything dirty.
                    v.iter_mut().for_each(|x| *x = true);
                }
                if n.meta.primary {
                    for &e in &n.al {
                        for b in e as usize * 8..(e as usize + 1) * 8 {
                            if let Some(x) = v.get_mut(b) {
                                *x = true;
                            }
                        }
                    }
                }
            }
        }
        v
    }

    /// Invariant: whenever the nodes are not connected, every block that differs between the
    /// two disks (their current contents, cache included) is in the union of both nodes'
    /// effective bitmaps, unless a node's bitmap is not trusted (an Inconsistent node
    /// without `bitmap_known`, or a dead Inconsistent one): then the next resync is full
    /// anyway. "Not connected": the network has no connection and neither node still believes
    /// it has one past the handshake (StandAlone / Connecting, or dead).
    fn check_bitmap_cover(&mut self) -> Result<(), String> {
        if self.conn.is_some() || self.untrusted_promotion {
            return Ok(());
        }
        for n in [A, B] {
            match self.status(n) {
                Some(s) => {
                    if !matches!(s.repl, ReplState::StandAlone | ReplState::Connecting) {
                        return Ok(());
                    }
                    if s.disk == DiskState::Inconsistent && !s.bitmap_known {
                        return Ok(());
                    }
                }
                None => {
                    if self.nodes[n].meta.disk == DiskState::Inconsistent {
                        return Ok(());
                    }
                }
            }
        }
        *self.stats.entry("bitmap cover checked").or_default() += 1;
        let (ba, bb) = (self.effective_bitmap(A), self.effective_bitmap(B));
        let (a, b) = (&self.nodes[A].disk.volatile, &self.nodes[B].disk.volatile);
        for i in 0..self.cfg.blocks {
            if SimDisk::block(a, i) != SimDisk::block(b, i) && !ba[i] && !bb[i] {
                return Err(format!(
                    "block {i} differs between the disks (A tag {}, B tag {}) but neither \
                     bitmap names it",
                    tag_of(SimDisk::block(a, i)),
                    tag_of(SimDisk::block(b, i))
                ));
            }
        }
        Ok(())
    }

    /// Invariants checked after every event.
    fn check_step(&mut self, node: usize) -> Result<(), String> {
        let sec = 1 - self.prim;
        if node != sec || self.split.is_some() {
            return Ok(());
        }
        let Some(st) = self.status(sec) else {
            return Ok(());
        };
        let in_sync = st.disk == DiskState::UpToDate
            && matches!(
                st.repl,
                ReplState::Established | ReplState::Connecting | ReplState::StandAlone
            );
        // Valid again only once a new connection reaches Established after the primary crashed.
        let entered =
            st.repl == ReplState::Established && self.b_prev_repl != ReplState::Established;
        self.b_prev_repl = st.repl;
        if entered && st.disk == DiskState::UpToDate && self.conn.is_some() && self.alive(self.prim)
        {
            self.oracle.secondary_valid = true;
        }
        if st.disk != DiskState::UpToDate {
            self.oracle.secondary_valid = false;
        }
        if in_sync && self.oracle.secondary_valid {
            // Async: the peer issues writes in seq order without draining between epochs, so
            // it holds a prefix only once its writes in flight have landed (the failover waits
            // for that too). Between those points, later writes may land before earlier ones.
            if self.cfg.protocol == Protocol::Async {
                if !self.nodes[sec].disk.writes_in_flight.is_empty() {
                    return Ok(());
                }
                self.oracle
                    .check_prefix(&self.nodes[sec].disk.volatile)
                    .map_err(|e| format!("secondary is not a prefix of epochs: {e}"))?;
            } else {
                self.oracle
                    .check_acked(&self.nodes[sec].disk)
                    .map_err(|e| format!("secondary lacks an acked write: {e}"))?;
            }
        }
        Ok(())
    }

    fn quiet(&self) -> bool {
        let (Some(a), Some(b)) = (self.status(self.prim), self.status(1 - self.prim)) else {
            return false;
        };
        a.role == Role::Primary
            && a.repl == ReplState::Established
            && b.repl == ReplState::Established
            && a.disk == DiskState::UpToDate
            && b.disk == DiskState::UpToDate
            && self.outstanding.is_empty()
            && self
                .queue
                .iter()
                .all(|s| matches!(s.ev, Ev::Timer { .. } | Ev::ClientTick))
    }

    /// Runs the workload with faults, then heals everything and checks convergence.
    pub fn run(&mut self) {
        // A panic inside the core (its invariant checks) names no seed: say it on the way out.
        struct SeedOnPanic(u64);
        impl Drop for SeedOnPanic {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    eprintln!(
                        "simulator seed {0}: replay with TWINBLK_SIM_SEED={0} cargo test \
                         --test simulator -- --nocapture",
                        self.0
                    );
                }
            }
        }
        let _seed = SeedOnPanic(self.cfg.seed);
        let mut guard = 0u64;
        while self.ops_left > 0 || !self.outstanding.is_empty() {
            if !self.step() {
                break;
            }
            guard += 1;
            if guard > 2_000_000 {
                self.fail("workload phase did not finish".into());
            }
        }
        self.healing = true;
        self.log("=== heal ===".into());
        if self.split.as_ref().is_some_and(|s| !s.promoted) {
            // The rogue never became Primary: no split brain will happen.
            self.split = None;
        }
        if let Some(s) = self.split.as_mut() {
            s.rogue_ops = 0;
        }
        self.partitioned_until = 0;
        for n in [A, B] {
            if !self.alive(n) {
                self.restart(n);
            } else {
                self.admin(n, AdminCmd::Connect);
            }
        }
        self.maybe_connect();
        let mut steps = 0u64;
        while !self.quiet() {
            if !self.client_paused
                && self.split.is_none()
                && self
                    .status(self.prim)
                    .is_some_and(|s| s.role != Role::Primary)
            {
                self.admin(self.prim, AdminCmd::Promote { force: false });
            }
            if !self.step() {
                let sa = self.status(A);
                let sb = self.status(B);
                self.fail(format!("nodes never converged: A {sa:?}, B {sb:?}"));
            }
            steps += 1;
            if steps > 500_000 {
                let (sa, sb) = (self.status(A), self.status(B));
                let waiting: Vec<u64> = self.outstanding.keys().copied().collect();
                let queued: Vec<String> = self
                    .queue
                    .iter()
                    .filter(|s| !matches!(s.ev, Ev::Timer { .. } | Ev::ClientTick))
                    .take(5)
                    .map(|s| format!("{:?}", s.ev))
                    .collect();
                self.fail(format!(
                    "heal phase did not converge: primary {}, requests {waiting:?} outstanding, \
                     queued {queued:?}, A {sa:?}, B {sb:?}",
                    self.prim
                ));
            }
        }
        let a = &self.nodes[A].disk.volatile;
        let b = &self.nodes[B].disk.volatile;
        if a != b {
            let first = (0..self.cfg.blocks)
                .find(|&i| SimDisk::block(a, i) != SimDisk::block(b, i))
                .unwrap_or(0);
            let (ta, tb) = (
                tag_of(SimDisk::block(a, first)),
                tag_of(SimDisk::block(b, first)),
            );
            self.fail(format!(
                "after reconnect and resync the disks differ, first at block {first} (A tag {ta}, B tag {tb})"
            ));
        }
        if let Err(e) = self.oracle.check_image(a) {
            self.fail(format!("final primary image: {e}"));
        }
        // Every write the Primary acknowledged since it took over is there, those completed at
        // a connection loss included (they count as acknowledged: the client saw them done).
        if let Err(e) = self.oracle.check_completed(a) {
            self.fail(format!("final image: {e}"));
        }
        for i in 0..self.cfg.blocks {
            let t = tag_of(SimDisk::block(a, i));
            if t != 0 && self.discarded.contains(&t) {
                self.fail(format!(
                    "block {i} holds tag {t}, written by the losing side of a split brain"
                ));
            }
        }
    }
}
