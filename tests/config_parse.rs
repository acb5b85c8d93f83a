//! Resource file parsing: defaults, typed values, and every error path's message.

use std::path::PathBuf;
use std::time::Duration;
use twinblk::addr::ListenAddr;
use twinblk::config::{parse_duration, parse_size, Config, ConfigError, Frontend, Protocol};

const NODE_A: &str = r#"
[node.alpha]
address = "127.0.0.1:7789"
disk    = "/var/lib/twinblk/r0-alpha.img"
nbd     = "unix:/run/twinblk/r0-alpha.nbd"
admin   = "/run/twinblk/r0-alpha.sock"
cert    = "/etc/twinblk/alpha.crt"
key     = "/etc/twinblk/alpha.key"
"#;
const NODE_B: &str = r#"
[node.beta]
address = "127.0.0.1:7790"
disk    = "/var/lib/twinblk/r0-beta.img"
nbd     = "tcp:127.0.0.1:10809"
admin   = "/run/twinblk/r0-beta.sock"
cert    = "/etc/twinblk/beta.crt"
key     = "/etc/twinblk/beta.key"
"#;

fn with(resource: &str, a: &str, b: &str) -> String {
    format!("[resource]\nname = \"r0\"\n{resource}\n{a}\n{b}")
}

/// Parses and returns the error text; panics if the text parses.
fn err(text: &str) -> String {
    match Config::from_str(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} lacks {p:?}");
    }
}

#[test]
fn minimal_file_gets_documented_defaults() {
    let c = Config::from_str(&with("", NODE_A, NODE_B)).unwrap();
    let r = &c.resource;
    assert_eq!(r.name, "r0");
    assert_eq!(r.protocol, Protocol::Sync);
    assert_eq!(r.send_buffer, 64 << 20);
    assert_eq!(r.ping_interval, Duration::from_secs(1));
    assert_eq!(r.timeout, Duration::from_secs(5));
    assert_eq!(r.connect_retry, Duration::from_secs(5));
    assert_eq!(r.data_streams, 4);
    assert_eq!(r.window, 32 << 20);
    assert_eq!(r.max_mtu, 6500);
    let a = c.node_named("alpha").unwrap();
    assert_eq!(a.address, "127.0.0.1:7789".parse().unwrap());
    assert_eq!(a.nbd, ListenAddr::Unix("/run/twinblk/r0-alpha.nbd".into()));
    assert_eq!(a.size, None);
    assert_eq!(a.pin, None);
    let b = c.peer_of("alpha").unwrap();
    assert_eq!(b.name, "beta");
    assert_eq!(b.nbd, ListenAddr::Tcp("127.0.0.1:10809".into()));
    assert_eq!(c.peer_of("beta").unwrap().name, "alpha");
}

#[test]
fn every_optional_key_is_read() {
    let res = r#"protocol = "async"
send-buffer = "128M"
ping-interval = "500ms"
timeout = "3s"
connect-retry = "10s"
data-streams = 8
window = "16M"
max-mtu = 6500"#;
    let pin = format!("sha256:{}", "AB".repeat(32));
    let a = format!("{NODE_A}size = \"1G\"\npin = \"{pin}\"\n");
    let c = Config::from_str(&with(res, &a, NODE_B)).unwrap();
    let r = &c.resource;
    assert_eq!(r.protocol, Protocol::Async);
    assert_eq!(r.send_buffer, 128 << 20);
    assert_eq!(r.ping_interval, Duration::from_millis(500));
    assert_eq!(r.timeout, Duration::from_secs(3));
    assert_eq!(r.connect_retry, Duration::from_secs(10));
    assert_eq!(r.data_streams, 8);
    assert_eq!(r.window, 16 << 20);
    assert_eq!(r.max_mtu, 6500);
    let a = c.node_named("alpha").unwrap();
    assert_eq!(a.size, Some(1 << 30));
    assert_eq!(a.pin.as_deref(), Some(pin.to_ascii_lowercase().as_str()));
}

#[test]
fn load_names_the_file_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r0.toml");
    std::fs::write(&p, with("colour = \"red\"", NODE_A, NODE_B)).unwrap();
    let e = Config::load(&p).unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }));
    assert_has(&e.to_string(), &[p.to_str().unwrap(), "colour"]);

    std::fs::write(&p, with("", NODE_A, NODE_B)).unwrap();
    let c = Config::load(&p).unwrap();
    assert_eq!(c.source, p);

    let missing = dir.path().join("nope.toml");
    let e = Config::load(&missing).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert_has(&e.to_string(), &["nope.toml", "cannot read"]);
}

#[test]
fn unknown_keys_are_rejected_everywhere() {
    assert_has(
        &err(&with("colour = \"red\"", NODE_A, NODE_B)),
        &["<string>", "unknown field `colour`"],
    );
    let a = format!("{NODE_A}colour = \"red\"\n");
    assert_has(&err(&with("", &a, NODE_B)), &["unknown field `colour`"]);
    let text = format!("{}\n[extra]\nx = 1\n", with("", NODE_A, NODE_B));
    assert_has(&err(&text), &["unknown field `extra`"]);
}

#[test]
fn missing_required_keys_are_named() {
    let a = NODE_A.replace("disk    = \"/var/lib/twinblk/r0-alpha.img\"\n", "");
    assert_has(&err(&with("", &a, NODE_B)), &["missing field `disk`"]);
    assert_has(
        &err(&format!("[resource]\n{NODE_A}{NODE_B}")),
        &["missing field `name`"],
    );
    assert_has(
        &err(&format!("{NODE_A}{NODE_B}")),
        &["missing field `resource`"],
    );
}

#[test]
fn node_count_must_be_two() {
    assert_has(
        &err(&with("", NODE_A, "")),
        &[
            "key `node`",
            "found 1 node table(s) [\"alpha\"]",
            "exactly two",
        ],
    );
    let c = NODE_B.replace("beta", "gamma").replace("7790", "7791");
    assert_has(
        &err(&with("", &format!("{NODE_A}{NODE_B}"), &c)),
        &["found 3"],
    );
}

#[test]
fn lookups_of_missing_nodes_explain_the_choice() {
    let c = Config::from_str(&with("", NODE_A, NODE_B)).unwrap();
    let e = c.node_named("gamma").unwrap_err().to_string();
    assert_has(
        &e,
        &[
            "node.gamma",
            "no node \"gamma\"",
            "--node",
            "[\"alpha\", \"beta\"]",
        ],
    );
    assert!(c.peer_of("gamma").is_err());
}

#[test]
fn bad_values_name_key_and_fix() {
    let cases: Vec<(String, &[&str])> = vec![
        (
            with("protocol = \"C\"", NODE_A, NODE_B),
            &["resource.protocol", "\"C\"", "\"sync\""],
        ),
        (
            with("send-buffer = \"64Q\"", NODE_A, NODE_B),
            &["resource.send-buffer", "suffix", "\"64M\""],
        ),
        (
            with("send-buffer = \"lots\"", NODE_A, NODE_B),
            &["resource.send-buffer", "not a size"],
        ),
        (
            with("window = \"1K\"", NODE_A, NODE_B),
            &["resource.window", "out of range", "64K"],
        ),
        (
            with("timeout = \"5\"", NODE_A, NODE_B),
            &["resource.timeout", "no unit", "\"5s\""],
        ),
        (
            with("timeout = \"5 days\"", NODE_A, NODE_B),
            &["resource.timeout", "unknown unit"],
        ),
        (
            with("timeout = \"0s\"", NODE_A, NODE_B),
            &["resource.timeout", "zero"],
        ),
        (
            with("ping-interval = \"10s\"", NODE_A, NODE_B),
            &["resource.ping-interval", "not shorter than timeout"],
        ),
        (
            with("connect-retry = \"-1s\"", NODE_A, NODE_B),
            &["resource.connect-retry"],
        ),
        (
            with("data-streams = 0", NODE_A, NODE_B),
            &["resource.data-streams", "between 1 and 64"],
        ),
        (
            with("data-streams = 65", NODE_A, NODE_B),
            &["resource.data-streams"],
        ),
        (
            with("max-mtu = 9000", NODE_A, NODE_B),
            &["resource.max-mtu", "between 1200 and 6500"],
        ),
        (
            with(
                "",
                NODE_A,
                &NODE_B.replace("127.0.0.1:7790", "beta.example:7790"),
            ),
            &["node.beta.address", "host names are not resolved"],
        ),
        (
            with(
                "",
                NODE_A,
                &NODE_B.replace("127.0.0.1:7790", "127.0.0.1:7789"),
            ),
            &["node.beta.address", "both nodes use"],
        ),
        (
            with(
                "",
                NODE_A,
                &NODE_B.replace("tcp:127.0.0.1:10809", "/run/x.sock"),
            ),
            &["node.beta.nbd", "names no transport", "unix:"],
        ),
        (
            with(
                "",
                NODE_A,
                &NODE_B.replace("tcp:127.0.0.1:10809", "tcp:localhost"),
            ),
            &["node.beta.nbd", "needs HOST:PORT"],
        ),
        (
            with("", NODE_A, &NODE_B.replace("tcp:127.0.0.1:10809", "unix:")),
            &["node.beta.nbd", "empty"],
        ),
        (
            with(
                "",
                NODE_A,
                &NODE_B.replace("\"/etc/twinblk/beta.key\"", "\"\""),
            ),
            &["node.beta.key", "empty"],
        ),
        (
            with("", NODE_A, &format!("{NODE_B}size = \"1000\"\n")),
            &["node.beta.size", "multiple of 4096"],
        ),
        (
            with("", NODE_A, &format!("{NODE_B}size = \"0\"\n")),
            &["node.beta.size", "size of 0"],
        ),
        (
            with("", NODE_A, &format!("{NODE_B}size = \"99999999999T\"\n")),
            &["node.beta.size", "too large"],
        ),
        (
            with("", NODE_A, &format!("{NODE_B}pin = \"md5:abc\"\n")),
            &["node.beta.pin", "sha256:", "keygen"],
        ),
        (
            with(
                "",
                NODE_A,
                &NODE_B.replace("[node.beta]", "[node.\"be ta\"]"),
            ),
            &["node.be ta", "not a valid node name"],
        ),
        (
            format!("[resource]\nname = \"r/0\"\n{NODE_A}{NODE_B}"),
            &["resource.name", "not a valid name"],
        ),
        (
            with("data-streams = \"4\"", NODE_A, NODE_B),
            &["data-streams", "invalid type"],
        ),
        ("this is not toml".to_string(), &["<string>"]),
    ];
    for (text, parts) in cases {
        let e = err(&text);
        assert_has(&e, parts);
        assert!(
            e.starts_with("<string>"),
            "error does not name the file: {e}"
        );
    }
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("512K"), Ok(512 << 10));
    assert_eq!(parse_size("64M"), Ok(64 << 20));
    assert_eq!(parse_size("64MiB"), Ok(64 << 20));
    assert_eq!(parse_size("1g"), Ok(1 << 30));
    assert_eq!(parse_size("2T"), Ok(2 << 40));
    assert_eq!(parse_size("16MB"), Ok(16 << 20));
    assert!(parse_size("").is_err());
    assert!(parse_size("M").is_err());
    assert!(parse_size("1.5G").is_err());
    assert!(parse_size("18446744073709551615K").is_err());
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("1.5s").is_err());
    assert!(parse_duration("99999999999999999999s").is_err());
}

#[test]
fn readme_example_parses() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/resource-file.md"),
    )
    .unwrap();
    let start = text
        .find("```toml\n")
        .expect("docs/resource-file.md has a toml example")
        + 8;
    let end = start + text[start..].find("```").unwrap();
    let c = Config::from_str(&text[start..end]).unwrap();
    assert_eq!(c.nodes.len(), 2);
}

#[test]
fn split_brain_policies() {
    use twinblk::core::{AfterSb0Pri, AfterSb1Pri};
    let c = Config::from_str(&with("", NODE_A, NODE_B)).unwrap();
    assert_eq!(c.resource.after_sb_0pri, AfterSb0Pri::Disconnect);
    assert_eq!(c.resource.after_sb_1pri, AfterSb1Pri::Disconnect);
    let c = Config::from_str(&with(
        "after-sb-0pri = \"discard-least-changes\"\nafter-sb-1pri = \"discard-secondary\"",
        NODE_A,
        NODE_B,
    ))
    .unwrap();
    assert_eq!(c.resource.after_sb_0pri, AfterSb0Pri::DiscardLeastChanges);
    assert_eq!(c.resource.after_sb_1pri, AfterSb1Pri::DiscardSecondary);
    let e = err(&with(
        "after-sb-0pri = \"discard-secondary\"",
        NODE_A,
        NODE_B,
    ));
    assert_has(&e, &["resource.after-sb-0pri", "discard-zero-changes"]);
    let e = err(&with("after-sb-1pri = \"yes\"", NODE_A, NODE_B));
    assert_has(&e, &["resource.after-sb-1pri", "discard-secondary"]);
}

#[test]
fn frontend_is_per_node_and_defaults_to_nbd() {
    let ublk_a = format!("{NODE_A}frontend = \"ublk\"\n");
    let c = Config::from_str(&with("", &ublk_a, NODE_B)).unwrap();
    assert_eq!(c.node_named("alpha").unwrap().frontend, Frontend::Ublk);
    assert_eq!(c.node_named("beta").unwrap().frontend, Frontend::Nbd);
    let nbd_b = format!("{NODE_B}frontend = \"nbd\"\n");
    let c = Config::from_str(&with("", NODE_A, &nbd_b)).unwrap();
    assert_eq!(c.node_named("beta").unwrap().frontend, Frontend::Nbd);
    let bad = format!("{NODE_A}frontend = \"iscsi\"\n");
    assert_has(
        &err(&with("", &bad, NODE_B)),
        &["node.alpha.frontend", "\"iscsi\"", "\"nbd\"", "\"ublk\""],
    );
}

#[test]
fn ublk_queues_and_depth_are_per_node_with_limits() {
    let a = format!("{NODE_A}frontend = \"ublk\"\nublk-queues = 2\nublk-depth = 128\n");
    let c = Config::from_str(&with("", &a, NODE_B)).unwrap();
    let alpha = c.node_named("alpha").unwrap();
    assert_eq!((alpha.ublk_queues, alpha.ublk_depth), (2, 128));
    let beta = c.node_named("beta").unwrap();
    assert_eq!((beta.ublk_queues, beta.ublk_depth), (1, 64));
    let bad = format!("{NODE_A}ublk-queues = 0\n");
    assert_has(
        &err(&with("", &bad, NODE_B)),
        &["node.alpha.ublk-queues", "1 to 32"],
    );
    let bad = format!("{NODE_A}ublk-depth = 5000\n");
    assert_has(
        &err(&with("", &bad, NODE_B)),
        &["node.alpha.ublk-depth", "1 to 4096"],
    );
}

#[test]
fn al_updates_defaults_on_and_reads_false() {
    let c = Config::from_str(&with("", NODE_A, NODE_B)).unwrap();
    assert!(
        c.resource.al_updates,
        "DRBD's default: activity-log updates on"
    );
    let c = Config::from_str(&with("al-updates = false", NODE_A, NODE_B)).unwrap();
    assert!(!c.resource.al_updates);
    let c = Config::from_str(&with("al-updates = true", NODE_A, NODE_B)).unwrap();
    assert!(c.resource.al_updates);
    assert_has(
        &err(&with("al-updates = \"no\"", NODE_A, NODE_B)),
        &["al-updates"],
    );
}

#[test]
fn idle_poll_defaults_to_10ms_and_reads_off_and_durations() {
    let c = Config::from_str(&with("", NODE_A, NODE_B)).unwrap();
    assert_eq!(c.resource.idle_poll, Duration::from_millis(10));
    let c = Config::from_str(&with("idle-poll = \"off\"", NODE_A, NODE_B)).unwrap();
    assert_eq!(c.resource.idle_poll, Duration::ZERO);
    let c = Config::from_str(&with("idle-poll = \"0ms\"", NODE_A, NODE_B)).unwrap();
    assert_eq!(c.resource.idle_poll, Duration::ZERO);
    let c = Config::from_str(&with("idle-poll = \"250ms\"", NODE_A, NODE_B)).unwrap();
    assert_eq!(c.resource.idle_poll, Duration::from_millis(250));
    assert_has(
        &err(&with("idle-poll = \"2m\"", NODE_A, NODE_B)),
        &["resource.idle-poll", "longer than", "\"off\""],
    );
    assert_has(
        &err(&with("idle-poll = \"fast\"", NODE_A, NODE_B)),
        &["resource.idle-poll", "\"10ms\"", "\"off\""],
    );
}
