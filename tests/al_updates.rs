//! `al-updates = false` with real daemons: a Primary that ran without an activity log and is
//! killed comes back with its whole device out of sync (it cannot know where it wrote), then
//! resyncs to its peer, and the backing files end byte-identical.

mod ops_common;

use std::process::Command;

use ops_common::{ok, text, Pair};

#[test]
fn a_crashed_primary_without_activity_log_resyncs_the_whole_device() {
    let mut p = Pair::configure_with("16M", "al-updates = false", ["", ""]);
    p.start_and_wait(0);
    p.start_and_wait(1);
    ok(&p, 0, &["primary", "--force"]);
    p.wait_in_sync();
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 1M 64k",
            "-c",
            "write -P 0x7e 9M 4k",
        ])
        .arg(p.nbd_uri(0))
        .output()
        .expect("qemu-io");
    assert!(o.status.success(), "qemu-io: {}", text(&o));

    // The peer goes down cleanly, then the Primary crashes.
    ok(&p, 1, &["down"]);
    if let Some(mut c) = p.children[1].take() {
        assert!(c.wait().expect("wait").success(), "{}", p.logs());
    }
    p.kill(0);

    // Back alone: everything is out of sync, not just an activity log's worth.
    p.start_and_wait(0);
    let s = p.wait(0, "the restarted node reports its out-of-sync bytes", |s| {
        s["out_of_sync_bytes"].as_u64().is_some()
    });
    assert_eq!(s["out_of_sync_bytes"].as_u64(), Some(16 << 20), "{s}");

    p.start_and_wait(1);
    if p.status(0).is_some_and(|s| s["role"] != "Primary") {
        ok(&p, 0, &["primary"]);
    }
    p.wait_in_sync();
    let a = ops_common::down_both_identical(&mut p, "the full resync");
    assert_eq!(a[(1 << 20) + 100], 0x3c);
}
