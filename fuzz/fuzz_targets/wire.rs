//! Fuzzes what a node runs on bytes from its peer: the transport's frame reassembler
//! (`net::FrameReader`, the code that reads every QUIC stream) over the input cut into chunks at
//! arbitrary places, then the wire codec on each frame, as `node::peer` decodes it.
//!
//! Checked: nothing panics; the reassembler yields exactly the frames a plain reading of the
//! concatenated stream gives, and ends the same way (finished at a frame boundary, or a protocol
//! error for an oversized or truncated frame), wherever the chunks were cut; whatever decodes
//! re-encodes to a frame that decodes to the same message.
//!
//! Run: `tools/fuzz.sh wire`
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use twinblk::net::{Chunks, FrameReader, ReadEnd, MAX_FRAME};
use twinblk::wire;

/// How a reading of the whole stream ends.
#[derive(Debug, PartialEq)]
enum End {
    Finished,
    Protocol,
}

/// The frames of `stream` read in one piece: the reference the reassembler must match.
fn reference(mut stream: &[u8]) -> (Vec<&[u8]>, End) {
    let mut frames = Vec::new();
    loop {
        if stream.is_empty() {
            return (frames, End::Finished);
        }
        let Some((len, rest)) = stream.split_first_chunk::<4>() else {
            return (frames, End::Protocol);
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > MAX_FRAME || rest.len() < len {
            return (frames, End::Protocol);
        }
        frames.push(&rest[..len]);
        stream = &rest[len..];
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte seeds where the stream is cut: chunks of 0 to 2^(b & 15) bytes.
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let max = 1usize << (seed & 15);
    let mut x = u32::from(seed) | 0x100;
    let mut chunks = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (x as usize % (max + 1)).min(rest.len());
        chunks.push(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }

    let (want, want_end) = reference(stream);
    let mut r = FrameReader::new(chunks.into_iter().collect::<Chunks>(), wire::payload_offset);
    let mut got = 0;
    let end = loop {
        match r.next_now() {
            Ok(frame) => {
                assert_eq!(
                    Some(&&frame[..]),
                    want.get(got),
                    "frame {got} differs from the stream's"
                );
                got += 1;
                check_decode(frame);
            }
            Err(ReadEnd::Finished) => break End::Finished,
            Err(ReadEnd::Protocol(_)) => break End::Protocol,
            Err(e @ ReadEnd::Failed(_)) => panic!("in-memory chunks failed: {e}"),
        }
    };
    assert_eq!(got, want.len(), "frames yielded");
    assert_eq!(end, want_end, "how the stream ended");
});

/// One frame as `node::peer` decodes it.
fn check_decode(frame: Bytes) {
    if let Ok(Some((msg, used))) = wire::decode(&frame) {
        assert!(used <= frame.len());
        let _ = msg.crc_ok();
        let again = wire::encode(&msg).expect("a decoded message re-encodes");
        let (back, _) = wire::decode(&again)
            .expect("re-encoded frame decodes")
            .expect("re-encoded frame is whole");
        assert_eq!(back, msg);
    }
}
