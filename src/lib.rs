//! twinblk: a replicated block device in userspace.
//!
//! Layers, top to bottom (see README "Architecture"): frontends (`nbd`), the per-resource driver,
//! the sans-IO replication core, state (bitmap, metadata), and the I/O drivers (`disk`, `net`).
//! Arrows point down only: pure modules never import drivers.

pub mod addr;
pub mod cli;
pub mod core;
pub mod disk;
pub mod nbd;
pub mod serve;
pub mod wire;
