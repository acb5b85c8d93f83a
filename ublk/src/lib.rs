//! ublk frontend for twinblk.
//!
//! This crate knows nothing of twinblk: it defines the small block-target trait a ublk queue needs,
//! and twinblk implements it. The libublk-backed implementation arrives with the ublk issue; until
//! then the crate only carries the trait, so that the dependency direction is fixed from day one.

/// What a ublk queue needs from the device behind it. Offsets and lengths are in bytes.
pub trait BlockTarget: Send + Sync + 'static {
    /// Device size in bytes.
    fn size(&self) -> u64;
    /// Logical block size in bytes (512 or 4096).
    fn logical_block_size(&self) -> u32;
}
