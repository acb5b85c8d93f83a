//! A network namespace behind a veth pair, for a node that must be reached over a real link:
//! its MTU is what the test sets, and taking the host end down is a real partition. Needs root
//! and iproute2 (as CI has); [`Link::new`] says why and returns `None` elsewhere.
#![allow(dead_code)]

use std::process::Command;

use super::text;

/// A network namespace with one end of a veth pair (`10.NET.0.2`), the other end on the host
/// (`10.NET.0.1`); removed on drop.
pub struct Link {
    ns: String,
    host_if: String,
    net: u8,
}

impl Link {
    /// `tag` (up to 4 letters) tells the test's interfaces and subnet from those of another
    /// test, in this process or another.
    pub fn new(tag: &str, mtu: u32) -> Option<Link> {
        let id = std::process::id();
        let salt: u32 = tag.bytes().map(u32::from).sum();
        let net = 100 + ((id + salt) % 100) as u8;
        let link = Link {
            ns: format!("tb{tag}{id}"),
            host_if: format!("tb{tag}{id}a"),
            net,
        };
        let peer_if = format!("tb{tag}{id}b");
        let (ns, hi) = (link.ns.as_str(), link.host_if.as_str());
        let mtu = mtu.to_string();
        let host_addr = format!("{}/24", link.host_addr());
        let peer_addr = format!("{}/24", link.peer_addr());
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
                    eprintln!("not run: `ip netns add` failed (needs root): {}", text(&o));
                    return None;
                }
                Err(e) if n == 0 => {
                    eprintln!("not run: no `ip` command (iproute2): {e}");
                    return None;
                }
                Ok(o) => panic!("ip {args:?}: {}", text(&o)),
                Err(e) => panic!("ip {args:?}: {e}"),
            }
        }
        Some(link)
    }

    pub fn host_addr(&self) -> String {
        format!("10.{}.0.1", self.net)
    }

    pub fn peer_addr(&self) -> String {
        format!("10.{}.0.2", self.net)
    }

    /// `ip netns exec NS`: the wrapper that runs a command in the namespace.
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.ns]
    }

    /// Takes the host end down (`up` false: a partition) or up again.
    pub fn set_up(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let o = Command::new("ip")
            .args(["link", "set", &self.host_if, state])
            .output()
            .expect("run ip");
        assert!(o.status.success(), "ip link set {state}: {}", text(&o));
    }

    /// Points the pair's resource file at the link: node 0 on the host end, node 1 in the
    /// namespace (the harness wrote loopback addresses).
    pub fn readdress(&self, config: &std::path::Path) {
        let cfg = std::fs::read_to_string(config).expect("config");
        let cfg = cfg
            .replacen("127.0.0.1:", &format!("{}:", self.host_addr()), 1)
            .replacen("127.0.0.1:", &format!("{}:", self.peer_addr()), 1);
        std::fs::write(config, cfg).expect("config");
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
