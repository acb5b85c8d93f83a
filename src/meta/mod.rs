//! The metadata area of one node: superblock (identity, geometry, the core's `Meta`), dirty
//! bitmap and activity log, kept where the resource file's `meta =` says.
//!
//! * `format`: the on-disk layout, a pure codec (fuzzed: `tools/fuzz.sh meta`).
//! * `store`: [`MetaStore`], durable reads and writes of a file or block device.
//! * `dump`: what `twinblk dump-md` prints.

pub mod dump;
pub mod format;
pub mod store;

pub use format::Layout;
pub use store::{AlWriter, Expect, Identity, Inspection, MetaError, MetaStore};
