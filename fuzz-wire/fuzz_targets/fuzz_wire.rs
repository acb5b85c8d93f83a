//! Fuzzes the peer wire codec: arbitrary bytes must never panic or allocate beyond the cap, and
//! whatever decodes must re-encode to a frame that decodes to the same message.
//!
//! Run: `cd fuzz-wire && cargo +nightly fuzz run fuzz_wire`
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use twinblk::wire::{self, FrameReader};

fuzz_target!(|data: &[u8]| {
    let buf = Bytes::copy_from_slice(data);
    if let Ok(Some((msg, used))) = wire::decode(&buf) {
        assert!(used <= data.len());
        let _ = msg.crc_ok();
        let again = wire::encode(&msg).expect("a decoded message re-encodes");
        let (back, _) = wire::decode(&again)
            .expect("re-encoded frame decodes")
            .expect("re-encoded frame is whole");
        assert_eq!(back, msg);
    }
    // The streaming reader, fed in odd-sized chunks.
    let mut r = FrameReader::new();
    for chunk in data.chunks(7) {
        r.push(chunk);
        loop {
            match r.next_msg() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
