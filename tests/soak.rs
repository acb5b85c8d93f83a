//! A soak of two real daemons: random operator actions and crashes under a continuous writer,
//! each cycle ending with every acknowledged write read back from the Primary, and the soak
//! with both disks identical. The simulator reaches the schedules; this runs the real
//! transport, disk engine and CLI through them, one after another, many times.
//!
//! Each cycle, on a sync pair: a writer (16 writes in flight) runs against the Primary, then
//! one of
//! - a planned switchover (`secondary` on the Primary, `primary` on its peer);
//! - kill -9 of the Primary, the Secondary promoted, the old Primary restarted (it resyncs);
//! - kill -9 of the Secondary, restarted;
//! - `disconnect` and `connect` on the Primary;
//! - the Secondary stalled (SIGSTOP) for a second, below the peer timeout, then resumed.
//!
//! `TWINBLK_SOAK_SECS` sets how long it runs (default 20 s, a few cycles); `TWINBLK_SOAK_SEED`
//! picks the actions (default: from the clock, printed, so a failure can be run again).

mod ops_common;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ops_common::acked::{check_image, check_node, AckLog, Writer};
use ops_common::{text, Pair, NAMES};

const SIZE: &str = "64M";
const BLOCKS: u64 = (64 << 20) / 4096;

#[derive(Debug, Clone, Copy)]
enum Action {
    Switchover,
    KillPrimary,
    KillSecondary,
    Reconnect,
    StallSecondary,
}

const ACTIONS: [Action; 5] = [
    Action::Switchover,
    Action::KillPrimary,
    Action::KillSecondary,
    Action::Reconnect,
    Action::StallSecondary,
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn signal(p: &Pair, i: usize, s: Signal) {
    let pid = p.children[i].as_ref().expect("daemon runs").id();
    kill(Pid::from_raw(pid as i32), s).expect("signal the daemon");
}

/// Runs `args` on node i until it succeeds: a command refused while the node still sees the
/// writer's NBD connection, or its peer mid-handshake, is tried again.
fn retry(p: &Pair, i: usize, args: &[&str]) {
    let start = Instant::now();
    loop {
        let o = p.cli(i, args);
        if o.status.success() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} {args:?} still refused after 30 s: {}\n{}",
            NAMES[i],
            text(&o),
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `primary` as an operator would after the Primary died: plain first, `--force` if refused.
fn promote(p: &Pair, i: usize) -> bool {
    if p.cli(i, &["primary"]).status.success() {
        return false;
    }
    retry(p, i, &["primary", "--force"]);
    true
}

#[test]
fn random_operator_actions_and_crashes_under_a_writer_lose_no_acknowledged_write() {
    let secs: u64 = std::env::var("TWINBLK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("TWINBLK_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1;
    eprintln!("soak: TWINBLK_SOAK_SEED={seed}, {secs} s");
    let mut rng = Rng(seed);

    let mut p = Pair::configure(SIZE, ["", ""]);
    for i in 0..2 {
        p.start_and_wait(i);
    }
    p.primary_force();
    p.wait_in_sync();

    let mut all = AckLog::default();
    let mut prim = 0usize;
    let mut counts = [0u32; ACTIONS.len()];
    let start = Instant::now();
    let mut cycle = 0u64;
    while cycle == 0 || start.elapsed() < Duration::from_secs(secs) {
        cycle += 1;
        let sec = 1 - prim;
        let which = rng.below(ACTIONS.len() as u64) as usize;
        let action = ACTIONS[which];
        counts[which] += 1;
        // Versions grow from cycle to cycle, so a later writer's block is always newer.
        let w = Writer::start(&p.nbd_socket(prim), BLOCKS, 16, cycle << 40);
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        let log = match action {
            Action::Switchover => {
                // `secondary` refuses while an NBD client is connected: the writer stops first.
                let log = w.stop();
                retry(&p, prim, &["secondary"]);
                retry(&p, sec, &["primary"]);
                prim = sec;
                log
            }
            Action::KillPrimary => {
                p.kill(prim);
                let log = w.stop();
                p.wait(sec, "the loss of the killed Primary", |s| {
                    s["repl"] != "Established"
                });
                promote(&p, sec);
                p.start_and_wait(prim);
                prim = sec;
                log
            }
            Action::KillSecondary => {
                p.kill(sec);
                std::thread::sleep(Duration::from_millis(rng.below(500)));
                p.start_and_wait(sec);
                std::thread::sleep(Duration::from_millis(300));
                w.stop()
            }
            Action::Reconnect => {
                retry(&p, prim, &["disconnect"]);
                std::thread::sleep(Duration::from_millis(rng.below(500)));
                retry(&p, prim, &["connect"]);
                std::thread::sleep(Duration::from_millis(300));
                w.stop()
            }
            Action::StallSecondary => {
                signal(&p, sec, Signal::SIGSTOP);
                std::thread::sleep(Duration::from_millis(1000));
                signal(&p, sec, Signal::SIGCONT);
                std::thread::sleep(Duration::from_millis(300));
                w.stop()
            }
        };
        assert_eq!(
            log.errors,
            0,
            "cycle {cycle} ({action:?}): the writer got error replies\n{}",
            p.logs()
        );
        all.merge(&log);
        p.wait_in_sync();
        let checked = check_node(&p.nbd_socket(prim), &all, NAMES[prim]).unwrap_or_else(|e| {
            panic!("cycle {cycle} ({action:?}, seed {seed}): {e}\n{}", p.logs())
        });
        eprintln!(
            "cycle {cycle}: {action:?}, {} acks, Primary now {}, {checked} blocks checked",
            log.acks, NAMES[prim]
        );
    }
    let img = ops_common::down_both_identical(&mut p, "the soak");
    let checked = check_image(&img, &all, "both nodes after the soak")
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    eprintln!(
        "soak: {cycle} cycles ({}), {} acks, {checked} blocks checked on the final image",
        ACTIONS
            .iter()
            .zip(counts)
            .map(|(a, n)| format!("{a:?} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        all.acks
    );
    assert!(all.acks > 0, "the writers got no acknowledgement");
}
