use super::*;
use proptest::prelude::*;

fn export(read_only: bool) -> Export {
    Export {
        name: "disk0".into(),
        description: "test disk".into(),
        size: 1 << 20,
        read_only,
        min_block: 512,
    }
}

fn opt(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Parse option replies: (option, reply type, data).
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while b.len() >= 20 {
        assert_eq!(be_u64(b, 0), Some(OPT_REPLY_MAGIC));
        let len = be_u32(b, 16).unwrap() as usize;
        v.push((
            be_u32(b, 8).unwrap(),
            be_u32(b, 12).unwrap(),
            b[20..20 + len].to_vec(),
        ));
        b = &b[20 + len..];
    }
    assert!(b.is_empty());
    v
}

fn start(read_only: bool) -> Handshake {
    let mut out = Vec::new();
    let hs = Handshake::new(export(read_only), &mut out);
    assert_eq!(out.len(), 18);
    assert_eq!(be_u64(&out, 0), Some(NBDMAGIC));
    assert_eq!(be_u64(&out, 8), Some(IHAVEOPT));
    assert_eq!(be_u16(&out, 16), Some(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    hs
}

#[test]
fn go_with_structured_replies() {
    let mut hs = start(false);
    let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    opt(&mut input, OPT_STRUCTURED_REPLY, &[]);
    opt(
        &mut input,
        OPT_GO,
        &go_data(b"disk0", &[INFO_NAME, INFO_BLOCK_SIZE]),
    );
    input.extend_from_slice(b"tail");
    let mut out = Vec::new();
    let (used, st) = hs.feed(&input, &mut out).unwrap();
    assert_eq!(used, input.len() - 4);
    let HandshakeStatus::Done(n) = st else {
        panic!("{st:?}")
    };
    assert!(n.structured);
    assert_ne!(n.flags & FLAG_SEND_DF, 0);
    assert_ne!(n.flags & FLAG_SEND_TRIM, 0);
    assert_ne!(n.flags & FLAG_CAN_MULTI_CONN, 0);
    let r = replies(&out);
    assert_eq!(r[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
    assert_eq!(r.last().unwrap(), &(OPT_GO, REP_ACK, vec![]));
    let export_info = r
        .iter()
        .find(|x| x.1 == REP_INFO && x.2[..2] == [0, 0])
        .unwrap();
    assert_eq!(be_u64(&export_info.2, 2), Some(1 << 20));
    let bs = r
        .iter()
        .find(|x| x.1 == REP_INFO && be_u16(&x.2, 0) == Some(INFO_BLOCK_SIZE))
        .unwrap();
    assert_eq!(be_u32(&bs.2, 2), Some(512));
    assert_eq!(be_u32(&bs.2, 6), Some(4096));
    assert_eq!(be_u32(&bs.2, 10), Some(MAX_PAYLOAD));
    let name = r
        .iter()
        .find(|x| x.1 == REP_INFO && be_u16(&x.2, 0) == Some(INFO_NAME))
        .unwrap();
    assert_eq!(&name.2[2..], b"disk0");
    assert_eq!(hs.feed(b"", &mut out), Err(HandshakeError::Finished));
}

#[test]
fn read_only_flags_and_empty_name() {
    let mut hs = start(true);
    let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    opt(&mut input, OPT_INFO, &go_data(b"", &[]));
    opt(&mut input, OPT_GO, &go_data(b"nope", &[]));
    opt(&mut input, OPT_GO, &go_data(b"", &[]));
    let mut out = Vec::new();
    let (_, st) = hs.feed(&input, &mut out).unwrap();
    let HandshakeStatus::Done(n) = st else {
        panic!()
    };
    assert!(!n.structured);
    assert_eq!(n.flags & FLAG_SEND_DF, 0);
    assert_ne!(n.flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        n.flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO),
        0
    );
    let r = replies(&out);
    assert!(r.contains(&(OPT_INFO, REP_ACK, vec![])));
    assert!(r.iter().any(|x| x.0 == OPT_GO && x.1 == REP_ERR_UNKNOWN));
}

#[test]
fn export_name_with_and_without_zeroes() {
    for (cflags, tail) in [
        (FLAG_C_FIXED_NEWSTYLE, 124),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut hs = start(false);
        let mut input = cflags.to_be_bytes().to_vec();
        opt(&mut input, OPT_EXPORT_NAME, b"disk0");
        let mut out = Vec::new();
        let (used, st) = hs.feed(&input, &mut out).unwrap();
        assert_eq!(used, input.len());
        assert!(matches!(st, HandshakeStatus::Done(_)));
        assert_eq!(out.len(), 10 + tail);
        assert_eq!(be_u64(&out, 0), Some(1 << 20));
    }
    let mut hs = start(false);
    let mut input = 1u32.to_be_bytes().to_vec();
    opt(&mut input, OPT_EXPORT_NAME, b"other");
    assert!(matches!(
        hs.feed(&input, &mut Vec::new()),
        Err(HandshakeError::UnknownExport(_))
    ));
}

#[test]
fn list_abort_unsupported_and_invalid() {
    let mut hs = start(false);
    let mut input = 1u32.to_be_bytes().to_vec();
    opt(&mut input, OPT_LIST, &[]);
    opt(&mut input, OPT_LIST, b"x");
    opt(&mut input, OPT_STARTTLS, &[]);
    opt(&mut input, 9999, b"junk");
    opt(&mut input, OPT_STRUCTURED_REPLY, b"x");
    opt(&mut input, OPT_GO, b"\0\0\0\x09short");
    opt(&mut input, OPT_ABORT, &[]);
    let mut out = Vec::new();
    let (used, st) = hs.feed(&input, &mut out).unwrap();
    assert_eq!((used, st), (input.len(), HandshakeStatus::Close));
    let r = replies(&out);
    assert_eq!(r[0], (OPT_LIST, REP_SERVER, b"\0\0\0\x05disk0".to_vec()));
    assert_eq!(r[1], (OPT_LIST, REP_ACK, vec![]));
    assert_eq!(r[2].1, REP_ERR_INVALID);
    assert_eq!(r[3].1, REP_ERR_UNSUP);
    assert_eq!(r[4].1, REP_ERR_UNSUP);
    assert_eq!(r[5].1, REP_ERR_INVALID);
    assert_eq!(r[6].1, REP_ERR_INVALID);
    assert_eq!(r[7], (OPT_ABORT, REP_ACK, vec![]));
}

#[test]
fn hostile_handshakes_are_errors() {
    let mut hs = start(false);
    assert_eq!(
        hs.feed(&0x80u32.to_be_bytes(), &mut Vec::new()),
        Err(HandshakeError::BadClientFlags(0x80))
    );
    let mut hs = start(false);
    let mut input = 1u32.to_be_bytes().to_vec();
    input.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert!(matches!(
        hs.feed(&input, &mut Vec::new()),
        Err(HandshakeError::BadOptionMagic(_))
    ));
    let mut hs = start(false);
    let mut input = 1u32.to_be_bytes().to_vec();
    input.extend_from_slice(&IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&OPT_GO.to_be_bytes());
    input.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        hs.feed(&input, &mut Vec::new()),
        Err(HandshakeError::OptionTooLong { .. })
    ));
}

fn t(read_only: bool, structured: bool) -> Transmission {
    Transmission {
        size: 1 << 20,
        read_only,
        structured,
    }
}

fn hdr(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        cookie: 7,
        offset,
        len,
    }
}

#[test]
fn validation() {
    let rw = t(false, true);
    assert_eq!(
        validate(&hdr(CMD_READ, CMD_FLAG_DF, 0, 4096), &rw),
        Ok(Command::Read {
            offset: 0,
            len: 4096
        })
    );
    assert_eq!(
        validate(&hdr(CMD_READ, CMD_FLAG_DF, 0, 4096), &t(false, false)),
        Err(EINVAL)
    );
    assert_eq!(
        validate(&hdr(CMD_READ, 0, (1 << 20) - 1, 2), &rw),
        Err(EINVAL)
    );
    assert_eq!(validate(&hdr(CMD_READ, 0, u64::MAX, 2), &rw), Err(EINVAL));
    assert_eq!(validate(&hdr(CMD_WRITE, 0, 1 << 20, 1), &rw), Err(ENOSPC));
    assert_eq!(
        validate(&hdr(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &rw),
        Err(ENOSPC)
    );
    assert_eq!(validate(&hdr(CMD_TRIM, 0, 1 << 20, 1), &rw), Err(EINVAL));
    assert_eq!(
        validate(&hdr(CMD_WRITE, 0, 0, 1), &t(true, true)),
        Err(EPERM)
    );
    assert_eq!(
        validate(&hdr(CMD_TRIM, 0, 0, 1), &t(true, true)),
        Err(EPERM)
    );
    assert_eq!(validate(&hdr(CMD_WRITE, 1 << 9, 0, 1), &rw), Err(EINVAL));
    assert_eq!(validate(&hdr(CMD_WRITE, 1 << 15, 0, 1), &rw), Err(EINVAL));
    assert_eq!(validate(&hdr(99, 0, 0, 1), &rw), Err(EINVAL));
    assert_eq!(validate(&hdr(CMD_BLOCK_STATUS, 0, 0, 1), &rw), Err(EINVAL));
    assert_eq!(
        validate(&hdr(CMD_WRITE, CMD_FLAG_FUA, 10, 1), &rw),
        Ok(Command::Write {
            offset: 10,
            len: 1,
            fua: true
        })
    );
    assert_eq!(
        validate(
            &hdr(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                0,
                4096
            ),
            &rw
        ),
        Ok(Command::WriteZeroes {
            offset: 0,
            len: 4096,
            fua: false,
            no_hole: true,
            fast: true
        })
    );
    assert_eq!(validate(&hdr(CMD_FLUSH, 0, 0, 0), &rw), Ok(Command::Flush));
    assert_eq!(
        validate(&hdr(CMD_DISC, 0, 0, 0), &rw),
        Ok(Command::Disconnect)
    );
    assert_eq!(
        validate(&hdr(CMD_READ, 0, 1 << 20, 0), &rw),
        Ok(Command::Read {
            offset: 1 << 20,
            len: 0
        })
    );
}

#[test]
fn fatal_headers() {
    let mut b = Vec::new();
    encode_request(&mut b, &hdr(CMD_READ, 0, 0, MAX_PAYLOAD + 1));
    assert!(matches!(parse_header(&b), Err(FatalError::TooLong { .. })));
    let mut b = Vec::new();
    encode_request(&mut b, &hdr(CMD_WRITE_ZEROES, 0, 0, u32::MAX));
    assert!(parse_header(&b).unwrap().is_some());
    assert_eq!(
        parse_header(b"\x12\x34\x56\x78"),
        Err(FatalError::BadMagic(0x1234_5678))
    );
    assert_eq!(parse_header(&REQUEST_MAGIC.to_be_bytes()), Ok(None));
}

#[test]
fn replies_encode() {
    let mut b = Vec::new();
    encode_read_reply_header(&mut b, true, 9, 4096, 512);
    b.extend_from_slice(&[1; 512]);
    let (r, _, used) = decode_reply(&b, 0).unwrap().unwrap();
    assert_eq!(used, b.len());
    let Reply::Chunk {
        cookie,
        flags,
        kind,
        payload,
    } = r
    else {
        panic!()
    };
    assert_eq!(
        (cookie, flags, kind),
        (9, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)
    );
    assert_eq!(be_u64(payload, 0), Some(4096));
    assert_eq!(&payload[8..], &[1; 512][..]);

    let mut b = Vec::new();
    encode_error_reply(&mut b, true, true, 3, EIO);
    let (r, _, _) = decode_reply(&b, 512).unwrap().unwrap();
    assert_eq!(
        r,
        Reply::Chunk {
            cookie: 3,
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_ERROR,
            payload: &[0, 0, 0, 5, 0, 0]
        }
    );
    let mut b = Vec::new();
    encode_error_reply(&mut b, true, false, 3, EIO);
    encode_read_reply_header(&mut b, false, 4, 0, 2);
    b.extend_from_slice(b"ab");
    let (r, _, used) = decode_reply(&b, 2).unwrap().unwrap();
    assert_eq!(
        r,
        Reply::Simple {
            cookie: 3,
            error: EIO
        }
    );
    let (r, data, _) = decode_reply(&b[used..], 2).unwrap().unwrap();
    assert_eq!(
        (r, data),
        (
            Reply::Simple {
                cookie: 4,
                error: 0
            },
            &b"ab"[..]
        )
    );
}

fn arb_header() -> impl Strategy<Value = RequestHeader> {
    (
        any::<u16>(),
        0u16..10,
        any::<u64>(),
        any::<u64>(),
        0u32..70_000,
    )
        .prop_map(|(flags, kind, cookie, offset, len)| RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            len,
        })
}

proptest! {
    #[test]
    fn request_round_trip_any_split(hs in proptest::collection::vec(arb_header(), 1..8), cut in any::<prop::sample::Index>()) {
        let mut wire = Vec::new();
        for h in &hs {
            encode_request(&mut wire, h);
            wire.extend((0..h.payload_len()).map(|i| i as u8));
        }
        // Feed the stream in two pieces split anywhere; the decoder must wait, then resume.
        let cut = cut.index(wire.len() + 1);
        let mut buf = wire[..cut].to_vec();
        let mut got = Vec::new();
        let mut rest = &wire[cut..];
        loop {
            match decode_request(&buf).unwrap() {
                Some(Decoded { header: h, payload, consumed }) => {
                    prop_assert_eq!(payload.len() as u32, h.payload_len());
                    got.push(h);
                    buf.drain(..consumed);
                }
                None if rest.is_empty() => break,
                None => { buf.extend_from_slice(rest); rest = &[]; }
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, hs);
    }

    #[test]
    fn request_decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(Some(Decoded { header: h, consumed, .. })) = decode_request(&b) {
            prop_assert!(consumed <= b.len());
            let _ = validate(&h, &t(false, true));
            let _ = validate(&h, &t(true, false));
        }
    }

    #[test]
    fn handshake_never_panics_any_split(b in proptest::collection::vec(any::<u8>(), 0..300), cut in any::<prop::sample::Index>()) {
        let mut hs = start(false);
        let mut out = Vec::new();
        let cut = cut.index(b.len() + 1);
        if let Ok((used, HandshakeStatus::NeedMore)) = hs.feed(&b[..cut], &mut out) {
            let mut rest = b[used..].to_vec();
            let _ = hs.feed(&rest, &mut out);
            rest.clear();
        }
    }

    #[test]
    fn valid_handshake_any_split(cut in 0usize..200, structured in any::<bool>()) {
        let mut input = 3u32.to_be_bytes().to_vec();
        if structured { opt(&mut input, OPT_STRUCTURED_REPLY, &[]); }
        opt(&mut input, OPT_LIST, &[]);
        opt(&mut input, OPT_GO, &go_data(b"disk0", &[INFO_BLOCK_SIZE]));
        let cut = cut.min(input.len());
        let mut hs = start(false);
        let mut out = Vec::new();
        let (used, st) = hs.feed(&input[..cut], &mut out).unwrap();
        let st = if st == HandshakeStatus::NeedMore {
            let (used2, st) = hs.feed(&input[used..], &mut out).unwrap();
            prop_assert_eq!(used + used2, input.len());
            st
        } else { st };
        let HandshakeStatus::Done(n) = st else { panic!("{st:?}") };
        prop_assert_eq!(n.structured, structured);
    }

    #[test]
    fn reply_round_trip(cookie in any::<u64>(), offset in any::<u64>(), len in 0u32..5000, structured in any::<bool>(), err in 1u32..200) {
        let mut b = Vec::new();
        encode_read_reply_header(&mut b, structured, cookie, offset, len);
        b.resize(b.len() + len as usize, 0xa5);
        encode_error_reply(&mut b, structured, true, cookie ^ 1, err);
        let (r, data, used) = decode_reply(&b, len as usize).unwrap().unwrap();
        match r {
            Reply::Simple { cookie: c, error } => { prop_assert_eq!((c, error), (cookie, 0)); prop_assert_eq!(data.len(), len as usize); }
            Reply::Chunk { cookie: c, payload, .. } => { prop_assert_eq!(c, cookie); prop_assert_eq!(be_u64(payload, 0), Some(offset)); prop_assert_eq!(payload.len(), len as usize + 8); }
        }
        let (r, _, used2) = decode_reply(&b[used..], len as usize).unwrap().unwrap();
        prop_assert_eq!(used + used2, b.len());
        match r {
            Reply::Simple { cookie: c, error } => prop_assert_eq!((c, error), (cookie ^ 1, err)),
            Reply::Chunk { cookie: c, kind, payload, .. } => { prop_assert_eq!((c, kind), (cookie ^ 1, REPLY_TYPE_ERROR)); prop_assert_eq!(be_u32(payload, 0), Some(err)); }
        }
    }
}
