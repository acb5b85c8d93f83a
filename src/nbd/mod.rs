//! NBD frontend: `proto` (constants from the NBD protocol spec), `codec` (a pure, sans-IO codec for
//! the handshake and the transmission phase) and `server` (the tokio driver that serves a `Disk`).

pub mod codec;
pub mod proto;
pub mod server;
