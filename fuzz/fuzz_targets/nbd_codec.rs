//! Arbitrary bytes into the NBD handshake state machine and the request decoder: neither may
//! panic, loop, or claim to consume more than it was given.
//!
//! Run: `tools/fuzz.sh nbd_codec`
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinblk::nbd::codec::{self, Export, Handshake, HandshakeStatus, Transmission};

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the stream is split between two feeds.
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let export = Export {
        name: "fuzz".into(),
        description: "fuzz export".into(),
        size: 1 << 30,
        read_only: cut & 1 == 1,
        min_block: 512,
    };
    let mut out = Vec::new();
    let mut hs = Handshake::new(export, &mut out);
    let cut = usize::from(cut).min(data.len());
    let mut structured = false;
    let mut rest: &[u8] = data;
    if let Ok((used, st)) = hs.feed(&data[..cut], &mut out) {
        assert!(used <= cut);
        let tail = &data[used..];
        rest = tail;
        let st = if st == HandshakeStatus::NeedMore {
            match hs.feed(tail, &mut out) {
                Ok((used2, st)) => {
                    assert!(used2 <= tail.len());
                    rest = &tail[used2..];
                    st
                }
                Err(_) => return,
            }
        } else {
            st
        };
        if let HandshakeStatus::Done(n) = st {
            structured = n.structured;
        }
    }
    // Whatever follows is a transmission-phase stream.
    let t = Transmission {
        size: 1 << 30,
        read_only: false,
        structured,
    };
    let mut buf = rest;
    while let Ok(Some(d)) = codec::decode_request(buf) {
        assert!(d.consumed >= 28 && d.consumed <= buf.len());
        let _ = codec::validate(&d.header, &t);
        buf = &buf[d.consumed..];
    }
});
