//! Checksum-based resync (resource key `csums = true`, DRBD's csums-alg).

use super::{Action, PeerMsg, Replica};

impl Replica {
    pub(super) fn csum_peer_msg(&mut self, msg: PeerMsg, out: &mut Vec<Action>) {
        let _ = (msg, out);
    }
}
