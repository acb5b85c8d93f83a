//! Resource-file keys of the resync controller and of pull-ahead: defaults, values, errors.

use std::time::Duration;
use twinblk::config::Config;
use twinblk::core::congestion::OnCongestion;

const NODES: &str = r#"
[node.alpha]
address = "127.0.0.1:7789"
disk    = "/var/lib/twinblk/r0-alpha.img"
nbd     = "unix:/run/twinblk/r0-alpha.nbd"
admin   = "/run/twinblk/r0-alpha.sock"
cert    = "/etc/twinblk/alpha.crt"
key     = "/etc/twinblk/alpha.key"
[node.beta]
address = "127.0.0.1:7790"
disk    = "/var/lib/twinblk/r0-beta.img"
nbd     = "unix:/run/twinblk/r0-beta.nbd"
admin   = "/run/twinblk/r0-beta.sock"
cert    = "/etc/twinblk/beta.crt"
key     = "/etc/twinblk/beta.key"
"#;

fn parse(resource: &str) -> Result<Config, String> {
    Config::from_str(&format!("[resource]\nname = \"r0\"\n{resource}\n{NODES}"))
        .map_err(|e| e.to_string())
}

fn err(resource: &str) -> String {
    match parse(resource) {
        Ok(_) => panic!("expected an error for {resource:?}"),
        Err(e) => e,
    }
}

#[test]
fn defaults_are_documented_values() {
    let c = parse("").unwrap();
    let r = &c.resource;
    assert_eq!(r.c_max_rate, 0, "no cap");
    assert_eq!(r.c_fill_target, 4 << 20);
    assert_eq!(r.c_plan_ahead, Duration::from_millis(200));
    assert_eq!(r.c_min_rate, 16 << 20);
    assert_eq!(r.on_congestion, OnCongestion::Block);
    assert_eq!(r.congestion_fill, 0);
    let rate = r.resync_rate();
    assert_eq!(rate.plan_ahead, 200_000_000);
    assert_eq!(rate.fill_target, 4 << 20);
}

#[test]
fn every_key_is_read() {
    let c = parse(
        r#"protocol = "async"
send-buffer = "64M"
c-max-rate = "200M"
c-fill-target = "16M"
c-plan-ahead = "2s"
c-min-rate = "8M"
on-congestion = "pull-ahead"
congestion-fill = "32M""#,
    )
    .unwrap();
    let r = &c.resource;
    assert_eq!(r.c_max_rate, 200 << 20);
    assert_eq!(r.c_fill_target, 16 << 20);
    assert_eq!(r.c_plan_ahead, Duration::from_secs(2));
    assert_eq!(r.c_min_rate, 8 << 20);
    let g = r.congestion();
    assert_eq!(g.on_congestion, OnCongestion::PullAhead);
    assert_eq!(g.fill, 32 << 20);
    // c-min-rate = 0 turns the back-off off.
    assert_eq!(parse("c-min-rate = \"0\"").unwrap().resource.c_min_rate, 0);
}

#[test]
fn bad_values_name_the_key_and_the_fix() {
    let e = err("c-fill-target = \"0\"");
    assert!(
        e.contains("resource.c-fill-target") && e.contains("4M"),
        "{e}"
    );
    let e = err("c-max-rate = \"10M\"\nc-min-rate = \"20M\"");
    assert!(
        e.contains("resource.c-min-rate") && e.contains("at most c-max-rate"),
        "{e}"
    );
    let e = err("c-max-rate = \"fast\"");
    assert!(e.contains("resource.c-max-rate"), "{e}");
    let e = err("on-congestion = \"drop\"");
    assert!(e.contains("pull-ahead"), "{e}");
    let e = err("on-congestion = \"pull-ahead\"\ncongestion-fill = \"1M\"");
    assert!(
        e.contains("protocol = \\\"async\\\"") || e.contains("protocol = \"async\""),
        "{e}"
    );
    let e = err("protocol = \"async\"\non-congestion = \"pull-ahead\"");
    assert!(e.contains("resource.congestion-fill"), "{e}");
    let e = err("protocol = \"async\"\nsend-buffer = \"8M\"\non-congestion = \"pull-ahead\"\ncongestion-fill = \"16M\"");
    assert!(e.contains("at most send-buffer"), "{e}");
    let e = err("protocol = \"async\"\ncongestion-fill = \"16M\"");
    assert!(e.contains("no effect"), "{e}");
}
