//! twinblk: a replicated block device in userspace.
//!
//! Layers, top to bottom (see README "Architecture"): frontends (`nbd`), the per-resource driver,
//! the sans-IO replication core, state (bitmap, metadata), and the I/O drivers (`disk`, `net`).
//! Arrows point down only: pure modules never import drivers.

pub mod addr;
pub mod backend;
pub mod cli;
pub mod config;
pub mod control;
pub mod core;
pub mod disk;
pub mod idmap;
pub mod latency;
pub mod meta;
pub mod metrics;
pub mod nbd;
pub mod net;
pub mod node;
pub mod serve;
#[cfg(target_os = "linux")]
pub mod ublk_target;
pub mod wire;
