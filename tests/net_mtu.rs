//! Path MTU discovery with the default `max-mtu` (6500) over a real 1500-byte link: beta runs in
//! its own network namespace behind a veth pair, so probes larger than the link fail the way
//! they do on Ethernet, and replication must go on at the size the path carries. Needs root
//! and iproute2 (as CI has); elsewhere it says so and does nothing.

mod ops_common;

use std::process::Command;

use ops_common::{ok, text, Pair};

/// A network namespace with one end of a veth pair; removed on drop.
struct Link {
    ns: String,
    host_if: String,
}

impl Link {
    fn new(mtu: u32, net: u8) -> Option<Link> {
        let id = std::process::id();
        let link = Link {
            ns: format!("tbmtu{id}"),
            host_if: format!("tbm{id}a"),
        };
        let peer_if = format!("tbm{id}b");
        let (ns, hi) = (link.ns.as_str(), link.host_if.as_str());
        let mtu = mtu.to_string();
        let host_addr = format!("10.{net}.0.1/24");
        let peer_addr = format!("10.{net}.0.2/24");
        let steps: [&[&str]; 8] = [
            &["netns", "add", ns],
            &["link", "add", hi, "type", "veth", "peer", "name", &peer_if],
            &["link", "set", &peer_if, "netns", ns],
            &["addr", "add", &host_addr, "dev", hi],
            &["link", "set", hi, "up", "mtu", &mtu],
            &["-n", ns, "addr", "add", &peer_addr, "dev", &peer_if],
            &["-n", ns, "link", "set", &peer_if, "up", "mtu", &mtu],
            &["-n", ns, "link", "set", "lo", "up"],
        ];
        for (n, args) in steps.iter().enumerate() {
            let o = Command::new("ip").args(*args).output();
            match o {
                Ok(o) if o.status.success() => {}
                Ok(o) if n == 0 => {
                    eprintln!(
                        "net_mtu: not run: `ip netns add` failed (needs root): {}",
                        text(&o)
                    );
                    return None;
                }
                Err(e) if n == 0 => {
                    eprintln!("net_mtu: not run: no `ip` command (iproute2): {e}");
                    return None;
                }
                Ok(o) => panic!("ip {args:?}: {}", text(&o)),
                Err(e) => panic!("ip {args:?}: {e}"),
            }
        }
        Some(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[test]
fn default_max_mtu_replicates_over_a_1500_byte_link() {
    let net = 100 + (std::process::id() % 100) as u8;
    let Some(link) = Link::new(1500, net) else {
        return;
    };
    let mut p = Pair::configure("64M", ["", ""]);
    // The harness wrote loopback addresses: alpha on the host end, beta in the namespace.
    let cfg = std::fs::read_to_string(&p.config).expect("config");
    assert!(!cfg.contains("max-mtu"), "the default is under test");
    let cfg = cfg
        .replacen("127.0.0.1:", &format!("10.{net}.0.1:"), 1)
        .replacen("127.0.0.1:", &format!("10.{net}.0.2:"), 1);
    std::fs::write(&p.config, cfg).expect("config");
    p.start_and_wait(0);
    p.start_wrapped(1, &[], &["ip", "netns", "exec", &link.ns]);
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
