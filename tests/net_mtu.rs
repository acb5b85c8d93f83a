//! Path MTU discovery with the default `max-mtu` (6500) over a real 1500-byte link: beta runs in
//! its own network namespace behind a veth pair, so probes larger than the link fail the way
//! they do on Ethernet, and replication must go on at the size the path carries. Needs root
//! and iproute2 (as CI has); elsewhere it says so and does nothing.

mod ops_common;

use ops_common::netns::Link;
use ops_common::{ok, Pair};

#[test]
fn default_max_mtu_replicates_over_a_1500_byte_link() {
    let Some(link) = Link::new("mtu", 1500) else {
        return;
    };
    let mut p = Pair::configure("64M", ["", ""]);
    let cfg = std::fs::read_to_string(&p.config).expect("config");
    assert!(!cfg.contains("max-mtu"), "the default is under test");
    // Alpha on the host end, beta in the namespace.
    link.readdress(&p.config);
    p.start_and_wait(0);
    p.start_wrapped(1, &[], &link.wrapper());
    p.wait(1, "the daemon answers status", |_| true);
    ok(&p, 0, &["primary", "--force"]);
    p.wait_in_sync();

    // Full-size frames both ways through the 1500-byte link, checked on read-back.
    p.fio_verified(
        0,
        &[
            "--rw=randwrite",
            "--bsrange=4k-1M",
            "--iodepth=8",
            "--size=32M",
        ],
    );
    p.wait_in_sync();
    let a = ops_common::down_both_identical(&mut p, "replicating over the 1500-byte link");
    assert!(a.iter().any(|&x| x != 0), "fio's data is on the disk");
    drop(link);
}
