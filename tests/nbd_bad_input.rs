//! Hostile and broken clients, spoken by hand over raw sockets: the server answers with the
//! right errors, closes only the offending connection, and keeps serving everyone else.

mod nbd_common;

use std::io::Write;

use nbd_common::*;
use twinblk::nbd::proto::*;

const SIZE: u64 = 1 << 20;

fn check_still_serves(s: &Served) {
    let mut c = s.raw();
    c.handshake(true, "");
    c.send(CMD_WRITE, 0, 100, 0, 512, &[0x77; 512]);
    assert_eq!(c.reply(0).unwrap(), (100, 0, vec![]));
    c.send(CMD_READ, 0, 101, 0, 512, &[]);
    assert_eq!(c.reply(512).unwrap(), (101, 0, vec![0x77; 512]));
}

#[test]
fn out_of_range_and_bad_commands_get_errors_and_connection_survives() {
    for t in TRANSPORTS {
        let s = Served::start(t, SIZE, &[]);
        for structured in [false, true] {
            let mut c = s.raw();
            let (size, flags) = c.handshake(structured, "twinblk");
            assert_eq!(size, SIZE);
            assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
            // Read past the end.
            c.send(CMD_READ, 0, 1, SIZE - 512, 1024, &[]);
            assert_eq!(c.reply(1024).unwrap(), (1, EINVAL, vec![]));
            // Offset overflow.
            c.send(CMD_READ, 0, 2, u64::MAX - 10, 512, &[]);
            assert_eq!(c.reply(512).unwrap(), (2, EINVAL, vec![]));
            // Write past the end: the payload is consumed, ENOSPC returned.
            c.send(CMD_WRITE, 0, 3, SIZE, 4096, &[0xee; 4096]);
            assert_eq!(c.reply(0).unwrap(), (3, ENOSPC, vec![]));
            c.send(CMD_WRITE_ZEROES, 0, 4, SIZE - 1, 2, &[]);
            assert_eq!(c.reply(0).unwrap(), (4, ENOSPC, vec![]));
            // Huge lengths on commands without payload are fine to receive (and refuse).
            c.send(CMD_WRITE_ZEROES, 0, 40, 0, u32::MAX, &[]);
            assert_eq!(c.reply(0).unwrap(), (40, ENOSPC, vec![]));
            c.send(CMD_TRIM, 0, 41, 0, 1 << 30, &[]);
            assert_eq!(c.reply(0).unwrap(), (41, EINVAL, vec![]));
            // Unknown command, unknown flag, flag on the wrong command.
            c.send(77, 0, 5, 0, 0, &[]);
            assert_eq!(c.reply(0).unwrap(), (5, EINVAL, vec![]));
            c.send(CMD_READ, 1 << 12, 6, 0, 512, &[]);
            assert_eq!(c.reply(512).unwrap(), (6, EINVAL, vec![]));
            c.send(CMD_WRITE, CMD_FLAG_NO_HOLE, 7, 0, 512, &[1; 512]);
            assert_eq!(c.reply(0).unwrap(), (7, EINVAL, vec![]));
            // Zero-length requests succeed without I/O.
            c.send(CMD_READ, 0, 8, 0, 0, &[]);
            assert_eq!(c.reply(0).unwrap(), (8, 0, vec![]));
            // And the connection still works, FUA and all.
            c.send(CMD_WRITE, CMD_FLAG_FUA, 9, 4096, 512, &[0x42; 512]);
            assert_eq!(c.reply(0).unwrap(), (9, 0, vec![]));
            c.send(CMD_READ, 0, 10, 4096, 512, &[]);
            assert_eq!(c.reply(512).unwrap(), (10, 0, vec![0x42; 512]));
            c.send(CMD_FLUSH, 0, 11, 0, 0, &[]);
            assert_eq!(c.reply(0).unwrap(), (11, 0, vec![]));
            c.send(CMD_DISC, 0, 12, 0, 0, &[]);
            assert!(c.closed());
        }
        let data = std::fs::read(&s.disk).unwrap();
        assert_eq!(data.len() as u64, SIZE);
        assert!(data[4096..4608].iter().all(|&b| b == 0x42));
    }
}

#[test]
fn writes_to_read_only_export_get_eperm() {
    for t in TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("ro.img");
        std::fs::write(&disk, vec![0x11u8; SIZE as usize]).unwrap();
        let s = Served::start_on(t, dir, disk.clone(), None, &["--read-only"]);
        let mut c = s.raw();
        let (_, flags) = c.handshake(false, "");
        assert_ne!(flags & FLAG_READ_ONLY, 0);
        assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
        c.send(CMD_WRITE, 0, 1, 0, 4096, &[0x22; 4096]);
        assert_eq!(c.reply(0).unwrap(), (1, EPERM, vec![]));
        c.send(CMD_TRIM, 0, 2, 0, 4096, &[]);
        assert_eq!(c.reply(0).unwrap(), (2, EPERM, vec![]));
        c.send(CMD_WRITE_ZEROES, 0, 3, 0, 4096, &[]);
        assert_eq!(c.reply(0).unwrap(), (3, EPERM, vec![]));
        c.send(CMD_READ, 0, 4, 0, 16, &[]);
        assert_eq!(c.reply(16).unwrap(), (4, 0, vec![0x11; 16]));
        assert_eq!(std::fs::read(&disk).unwrap(), vec![0x11u8; SIZE as usize]);
    }
}

#[test]
fn bad_magic_closes_only_that_connection() {
    for t in TRANSPORTS {
        let s = Served::start(t, SIZE, &[]);
        let mut good = s.raw();
        good.handshake(true, "");
        let mut bad = s.raw();
        bad.handshake(true, "");
        bad.sock.write_all(&[0xde; 28]).unwrap();
        assert!(bad.closed(), "{t:?}: connection with bad magic stayed open");
        good.send(CMD_READ, 0, 1, 0, 512, &[]);
        assert_eq!(good.reply(512).unwrap().1, 0);
        check_still_serves(&s);
        // The server logs from its own process: under load the line may land a moment later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !s.log().contains("bad request magic") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(s.log().contains("bad request magic"), "{}", s.log());
    }
}

#[test]
fn oversized_request_closes_connection() {
    for t in TRANSPORTS {
        let s = Served::start(t, SIZE, &[]);
        for kind in [CMD_READ, CMD_WRITE] {
            let mut c = s.raw();
            c.handshake(false, "");
            c.send(kind, 0, 1, 0, MAX_PAYLOAD + 1, &[]);
            assert!(c.closed(), "{t:?}: {kind} over 32 MiB accepted");
        }
        check_still_serves(&s);
    }
}

#[test]
fn garbage_handshakes_are_closed_and_server_carries_on() {
    for t in TRANSPORTS {
        let s = Served::start(t, SIZE, &[]);
        // An HTTP client.
        let mut c = s.raw();
        c.read_exact(18).unwrap();
        c.sock
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert!(c.closed());
        // Unknown client flags.
        let mut c = s.raw();
        c.read_exact(18).unwrap();
        c.sock.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
        assert!(c.closed());
        // An absurd option length: closed without waiting for (or allocating) 4 GiB.
        let mut c = s.raw();
        c.read_exact(18).unwrap();
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        c.sock.write_all(&b).unwrap();
        assert!(c.closed());
        // A client that connects and leaves at once.
        drop(s.raw());
        check_still_serves(&s);
    }
}

#[test]
fn disconnect_mid_payload_keeps_acknowledged_writes() {
    for t in TRANSPORTS {
        let s = Served::start(t, SIZE, &[]);
        let mut c = s.raw();
        c.handshake(true, "");
        c.send(CMD_WRITE, 0, 1, 0, 4096, &[0x31; 4096]);
        c.send(CMD_WRITE, 0, 2, 4096, 4096, &[0x32; 4096]);
        assert_eq!(c.reply(0).unwrap(), (1, 0, vec![]));
        assert_eq!(c.reply(0).unwrap(), (2, 0, vec![]));
        // Half a write, then hang up.
        let mut b = Vec::new();
        twinblk::nbd::codec::encode_request(
            &mut b,
            &twinblk::nbd::codec::RequestHeader {
                flags: 0,
                kind: CMD_WRITE,
                cookie: 3,
                offset: 8192,
                len: 65536,
            },
        );
        b.extend_from_slice(&[0x33; 1000]);
        c.sock.write_all(&b).unwrap();
        drop(c);
        check_still_serves(&s);
        let data = std::fs::read(&s.disk).unwrap();
        assert!(data[4096..8192].iter().all(|&x| x == 0x32));
        assert!(data[512..4096].iter().all(|&x| x == 0x31));
        // The unfinished write was never applied.
        assert!(data[8192..8192 + 65536].iter().all(|&x| x == 0));
    }
}

#[test]
fn pipelined_requests_complete_out_of_order_safely() {
    for t in TRANSPORTS {
        let s = Served::start(t, SIZE, &[]);
        let mut c = s.raw();
        c.handshake(true, "");
        // 64 writes in one burst, then the reads; every cookie answered exactly once.
        let mut burst = Vec::new();
        for i in 0..64u64 {
            twinblk::nbd::codec::encode_request(
                &mut burst,
                &twinblk::nbd::codec::RequestHeader {
                    flags: 0,
                    kind: CMD_WRITE,
                    cookie: i,
                    offset: i * 4096,
                    len: 4096,
                },
            );
            burst.extend_from_slice(&[i as u8; 4096]);
        }
        c.sock.write_all(&burst).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let (cookie, err, _) = c.reply(0).unwrap();
            assert_eq!(err, 0);
            assert!(seen.insert(cookie), "cookie {cookie} answered twice");
        }
        for i in 0..64u64 {
            c.send(CMD_READ, 0, 1000 + i, i * 4096, 4096, &[]);
        }
        let mut got = 0;
        for _ in 0..64 {
            let (cookie, err, data) = c.reply(4096).unwrap();
            assert_eq!(err, 0);
            let i = cookie - 1000;
            assert!(
                data.iter().all(|&b| b == i as u8),
                "read {i} returned wrong data"
            );
            got += 1;
        }
        assert_eq!(got, 64);
    }
}

#[test]
fn stale_socket_is_replaced_but_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    // A stale socket file: bound, then its listener gone.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let disk = dir.path().join("d.img");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twinblk"))
        .args(["serve", "--size", "1M", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--disk")
        .arg(&disk)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = out;
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            start.elapsed().as_secs() < 30,
            "server did not replace the stale socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // --size 1M created the file at exactly that size.
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 20);
    // A second server on the same live socket must refuse and leave it alone.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_twinblk"))
        .args(["serve", "--size", "1M", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--disk")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another server"));
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert!(first.wait().unwrap().success());
    assert!(!sock.exists(), "socket not removed at exit");
}
