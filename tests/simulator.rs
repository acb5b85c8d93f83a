//! Deterministic simulation of two twinblk nodes (see tests/sim/). Runs many seeds; a failing
//! seed prints the command that replays it exactly.
//!
//! `TWINBLK_SIM_SEEDS=N` runs N seeds (default 300), `TWINBLK_SIM_SEED=S` replays one seed.

mod sim;

use std::time::Instant;

use sim::{SimConfig, World};
use twinblk::core::InjectedBug;

fn run_seed(cfg: SimConfig) -> u64 {
    let mut w = World::new(cfg);
    w.run();
    w.events
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("TWINBLK_SIM_SEED") {
        return vec![s.trim().parse().expect("TWINBLK_SIM_SEED must be a number")];
    }
    let n = std::env::var("TWINBLK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(300u64);
    (1..=n).collect()
}

#[test]
fn random_workloads_with_faults() {
    let t = Instant::now();
    let seeds = seeds();
    let mut events = 0;
    for &seed in &seeds {
        events += run_seed(SimConfig::for_seed(seed));
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "simulated {} seeds, {events} events in {secs:.1}s ({:.0} seeds/s)",
        seeds.len(),
        seeds.len() as f64 / secs
    );
}

#[test]
fn fault_free_runs_converge() {
    for seed in 1..=30 {
        let mut cfg = SimConfig::for_seed(seed);
        cfg.faults = false;
        run_seed(cfg);
    }
}

/// Runs seeds with a deliberately broken core and returns how many the checker caught.
fn caught(bug: InjectedBug, sync_only: bool, seeds: u64) -> u64 {
    let mut n = 0;
    for seed in 1..=seeds {
        let mut cfg = SimConfig::for_seed(seed);
        cfg.bug = bug;
        if sync_only {
            cfg.protocol = twinblk::core::Protocol::Sync;
        }
        let r = std::panic::catch_unwind(move || run_seed(cfg));
        if r.is_err() {
            n += 1;
        }
    }
    n
}

#[test]
fn checker_catches_acks_without_peer() {
    let n = caught(InjectedBug::AckWithoutPeer, true, 40);
    assert!(n > 0, "no seed caught sync writes acked before the peer had them");
}

#[test]
fn checker_catches_forgotten_in_flight_regions() {
    let n = caught(InjectedBug::ForgetInFlightOnDisconnect, false, 60);
    assert!(n > 0, "no seed caught a resync that skipped regions in flight at a disconnect");
}
