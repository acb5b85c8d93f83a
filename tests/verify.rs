//! `twinblk verify` with two real daemons over QUIC: blocks corrupted behind the secondary's
//! back (while it is down) are found exactly, reported on both nodes, and repaired by
//! disconnect + connect; the backing files end byte-identical.

mod ops_common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::Command;

use ops_common::{ok, text, Pair};

fn down(p: &mut Pair, i: usize) {
    ok(p, i, &["down"]);
    if let Some(mut c) = p.children[i].take() {
        assert!(c.wait().unwrap().success(), "{}", p.logs());
    }
}

fn corrupt(path: &std::path::Path, offset: u64, len: usize) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut buf).unwrap();
    for b in &mut buf {
        *b = !*b;
    }
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn verify_reports_exactly_the_corrupted_blocks_and_reconnect_repairs_them() {
    let mut p = Pair::configure_with("64M", "", ["", ""]);
    p.start_and_wait(0);
    p.start_and_wait(1);
    ok(&p, 0, &["primary", "--force"]);
    p.wait_in_sync();
    // Application data through the real NBD export (sync protocol: on both disks when done).
    let uri = format!("nbd+unix:///?socket={}", p.nbd_socket(0).display());
    let o = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", "write -P 0xab 0 8M", "-c", "write -P 0x11 20M 1M"])
        .arg(&uri)
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-io: {}", text(&o));

    // Identical disks: a verify from the Secondary (the Primary drives it) finds nothing.
    let o = ok(&p, 1, &["verify", "--wait"]);
    assert!(text(&o).contains("0 blocks differ"), "{}", text(&o));

    // Corrupt four 4 KiB blocks of the secondary's backing file while it is down.
    down(&mut p, 1);
    let img = p.path("beta.img");
    corrupt(&img, 1 << 20, 4096);
    corrupt(&img, (20 << 20) + 8192, 8192);
    corrupt(&img, 63 << 20, 4096);
    p.start_and_wait(1);
    p.wait_in_sync();
    for i in 0..2 {
        let s = p.status(i).unwrap();
        assert_eq!(s["out_of_sync_bytes"], 0, "nothing known yet: {s}");
    }

    // Verify from the Primary: fails (exit code) and names the blocks.
    let o = p.cli(0, &["verify", "--wait"]);
    assert!(!o.status.success(), "differing blocks must fail --wait");
    assert!(text(&o).contains("4 blocks differ"), "{}", text(&o));
    let expect = serde_json::json!([
        {"offset": 1 << 20, "bytes": 4096},
        {"offset": (20 << 20) + 8192, "bytes": 8192},
        {"offset": 63 << 20, "bytes": 4096},
    ]);
    for i in 0..2 {
        let s = p.wait(i, "the verify finished on this node", |s| {
            s["verify"]["running"] == false
        });
        let v = &s["verify"];
        assert_eq!(v["differing_blocks"], 4, "{s}");
        assert_eq!(v["first_ranges"], expect, "{s}");
        assert_eq!(v["aborted"], serde_json::Value::Null, "{s}");
        assert_eq!(v["aborted_code"], serde_json::Value::Null, "{s}");
        assert_eq!(v["aborted_peer_code"], serde_json::Value::Null, "{s}");
        assert_eq!(s["out_of_sync_bytes"], 16384, "marked on both nodes: {s}");
        let human = text(&ok(&p, i, &["status"]));
        assert!(human.contains("4 blocks differ"), "{human}");
    }

    // Disconnect + connect resyncs what the verify marked.
    ok(&p, 1, &["disconnect"]);
    ok(&p, 1, &["connect"]);
    p.wait_in_sync();
    for i in 0..2 {
        p.wait(i, "nothing out of sync", |s| s["out_of_sync_bytes"] == 0);
    }
    let o = ok(&p, 1, &["verify", "--wait"]);
    assert!(text(&o).contains("0 blocks differ"), "{}", text(&o));
    down(&mut p, 1);
    down(&mut p, 0);
    let a = std::fs::read(p.path("alpha.img")).unwrap();
    let b = std::fs::read(p.path("beta.img")).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(a == b, "backing files differ after the resync");
}
