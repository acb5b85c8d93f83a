//! `twinblk serve` against real NBD clients: libnbd's nbdinfo and nbdcopy, qemu-io, qemu-img,
//! and fio's nbd engine — over a unix socket and over TCP.

mod nbd_common;

use std::process::Command;
use std::time::Duration;

use nbd_common::*;

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_reports_size_block_sizes_and_flags() {
    need("nbdinfo", "libnbd-bin");
    for t in TRANSPORTS {
        let s = Served::start(t, 64 * MIB, &["--export", "vol0"]);
        for name in ["", "vol0"] {
            let out = run_ok(Command::new("nbdinfo").arg(s.uri(name)));
            for want in [
                "export-size: 67108864",
                "block_size_minimum: 512",
                "block_size_preferred: 4096",
                "block_size_maximum: 33554432",
                "is_read_only: false",
                "can_flush: true",
                "can_fua: true",
                "can_multi_conn: true",
                "can_trim: true",
                "can_zero: true",
                "can_fast_zero: true",
            ] {
                assert!(
                    out.contains(want),
                    "{t:?} {name:?}: missing {want:?} in\n{out}"
                );
            }
        }
        let bad = run(Command::new("nbdinfo").arg(s.uri("nosuch")));
        assert!(!bad.status.success(), "{t:?}: unknown export accepted");
        let list = run_ok(Command::new("nbdinfo").arg("--list").arg(s.uri("")));
        assert!(list.contains("export=\"vol0\""), "{list}");
    }
}

#[test]
fn qemu_io_write_then_read_pattern() {
    need("qemu-io", "qemu-utils");
    for t in TRANSPORTS {
        let s = Served::start(t, 64 * MIB, &[]);
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", &s.uri("")])
                .args([
                    "-c",
                    "write -P 0x5a 0 1M",
                    "-c",
                    "write -f -P 0xa5 3M 4k",
                    "-c",
                    "read -P 0x5a 0 1M",
                    "-c",
                    "read -P 0xa5 3M 4k",
                    "-c",
                    "write -z 1M 64k",
                    "-c",
                    "read -P 0 1M 64k",
                    "-c",
                    "discard 2M 64k",
                    "-c",
                    "flush",
                ]),
        );
        let data = std::fs::read(&s.disk).unwrap();
        assert!(data[..MIB as usize].iter().all(|&b| b == 0x5a));
        assert!(data[3 * MIB as usize..3 * MIB as usize + 4096]
            .iter()
            .all(|&b| b == 0xa5));
        // The named export works with qemu too.
        run_ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            &s.uri("twinblk"),
            "-c",
            "read -P 0x5a 0 4k",
        ]));
    }
}

#[test]
fn qemu_img_convert_in_and_out() {
    need("qemu-img", "qemu-utils");
    for t in TRANSPORTS {
        let s = Served::start(t, 32 * MIB, &[]);
        let src = s.dir.path().join("src.raw");
        let back = s.dir.path().join("back.raw");
        random_file(&src, 32 * MIB as usize, 42);
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(&src)
                .arg(s.uri("")),
        );
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(s.uri(""))
                .arg(&back),
        );
        run_ok(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&src)
                .arg(&back),
        );
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(&s.disk).unwrap()
        );
    }
}

#[test]
fn nbdcopy_in_out_and_multi_conn() {
    need("nbdcopy", "libnbd-bin");
    need("cmp", "diffutils");
    for t in TRANSPORTS {
        let s = Served::start(t, 32 * MIB, &[]);
        for (seed, conns) in [(7, "1"), (8, "4")] {
            let src = s.dir.path().join(format!("src{seed}.raw"));
            let back = s.dir.path().join(format!("back{seed}.raw"));
            random_file(&src, 32 * MIB as usize, seed);
            run_ok(
                Command::new("nbdcopy")
                    .arg(format!("--connections={conns}"))
                    .arg("--flush")
                    .arg(&src)
                    .arg(s.uri("")),
            );
            run_ok(
                Command::new("nbdcopy")
                    .arg(format!("--connections={conns}"))
                    .arg(s.uri(""))
                    .arg(&back),
            );
            run_ok(Command::new("cmp").arg(&src).arg(&back));
            run_ok(Command::new("cmp").arg(&src).arg(&s.disk));
        }
    }
}

fn fio_verify(uri: &str, jobs: u32, dir: &std::path::Path) {
    let out = run(Command::new("fio").current_dir(dir).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        &format!("--numjobs={jobs}"),
        "--size=8M",
        "--offset_increment=8M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--group_reporting",
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio failed ({}):\n{text}", out.status);
    assert!(
        !text.contains("verify:") || !text.contains("bad"),
        "fio reported verify errors:\n{text}"
    );
    assert!(text.contains("err= 0"), "fio reported an error:\n{text}");
}

#[test]
fn fio_randwrite_verify_single_and_multi_conn() {
    need("fio", "fio");
    for t in TRANSPORTS {
        let s = Served::start(t, 32 * MIB, &[]);
        fio_verify(&s.uri(""), 1, s.dir.path());
        // Two jobs: two connections writing disjoint 8M ranges at once.
        fio_verify(&s.uri(""), 2, s.dir.path());
    }
}

#[test]
fn read_only_export_refuses_writes() {
    need("qemu-io", "qemu-utils");
    need("nbdinfo", "libnbd-bin");
    for t in TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("ro.img");
        std::fs::write(&disk, vec![0x11u8; 4 * MIB as usize]).unwrap();
        let s = Served::start_on(t, dir, disk.clone(), None, &["--read-only"]);
        let info = run_ok(Command::new("nbdinfo").arg(s.uri("")));
        assert!(info.contains("is_read_only: true"), "{info}");
        assert!(info.contains("can_trim: false"), "{info}");
        assert!(info.contains("can_zero: false"), "{info}");
        run_ok(Command::new("qemu-io").args([
            "-r",
            "-f",
            "raw",
            &s.uri(""),
            "-c",
            "read -P 0x11 0 4M",
        ]));
        // qemu sees the read-only flag and refuses; the server-side EPERM for a client that
        // writes anyway is covered by nbd_bad_input.
        let out = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            &s.uri(""),
            "-c",
            "write -P 0x22 0 4k",
        ]));
        assert!(
            !out.status.success(),
            "qemu-io write succeeded on a read-only export"
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("wrote 4096"),
            "write succeeded on a read-only export:\n{text}"
        );
        assert_eq!(
            std::fs::read(&disk).unwrap(),
            vec![0x11u8; 4 * MIB as usize]
        );
    }
}

#[test]
fn sigterm_during_fio_exits_cleanly() {
    need("fio", "fio");
    for t in TRANSPORTS {
        let mut s = Served::start(t, 64 * MIB, &[]);
        let mut fio = Command::new("fio")
            .current_dir(s.dir.path())
            .args([
                "--name=load",
                "--ioengine=nbd",
                &format!("--uri={}", s.uri("")),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--size=64M",
                "--time_based",
                "--runtime=60",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn fio");
        // Wait until fio is connected and writing.
        let mut waited = 0;
        while !s.log().contains("transmission") && waited < 200 {
            std::thread::sleep(Duration::from_millis(50));
            waited += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
        let st = s.terminate();
        let _ = fio.kill();
        let _ = fio.wait();
        assert!(
            st.success(),
            "{t:?}: server exited with {st}; log:\n{}",
            s.log()
        );
        assert!(s.log().contains("disk flushed"), "{}", s.log());
        if t == Transport::Unix {
            assert!(
                !std::path::Path::new(&s.addr).exists(),
                "socket file left behind"
            );
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigterm() {
    for t in TRANSPORTS {
        let mut s = Served::start(t, 16 * MIB, &[]);
        let mut c = s.raw();
        c.handshake(true, "");
        // Pipeline writes; collect the acknowledgements we get before the server goes away.
        let n = 2048u64;
        let writer = {
            let mut w = Raw::connect(t, &s.addr);
            w.handshake(true, "");
            std::thread::spawn(move || {
                for i in 0..n {
                    let block = vec![(i % 251) as u8 + 1; 4096];
                    w.send(twinblk::nbd::proto::CMD_WRITE, 0, i, i * 4096, 4096, &block);
                }
                w
            })
        };
        let mut w = writer.join().unwrap();
        let mut acked = Vec::new();
        // Read a few acks, then stop the server while the rest are still in flight.
        for _ in 0..16 {
            let (cookie, err, _) = w.reply(0).unwrap();
            assert_eq!(err, 0);
            acked.push(cookie);
        }
        unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
        while let Ok((cookie, err, _)) = w.reply(0) {
            if err == 0 {
                acked.push(cookie);
            }
        }
        let st = s.terminate();
        assert!(st.success());
        drop(c);
        let data = std::fs::read(&s.disk).unwrap();
        for i in acked.iter().copied() {
            let blk = &data[(i * 4096) as usize..(i * 4096 + 4096) as usize];
            assert!(
                blk.iter().all(|&b| b == (i % 251) as u8 + 1),
                "acknowledged write {i} missing"
            );
        }
        assert!(!acked.is_empty());
    }
}
