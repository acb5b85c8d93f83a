//! Service management: systemd readiness over a real datagram socket, JSON logs, completions
//! and the man page.

mod ops_common;

use ops_common::{Pair, NAMES};
use std::os::unix::net::{UnixDatagram, UnixStream};

#[test]
fn ready_only_once_nbd_accepts_and_stopping_on_sigterm() {
    let mut p = Pair::configure("8M", ["", ""]);
    let notify = p.path("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("bind notify socket");
    sock.set_read_timeout(Some(ops_common::WAIT))
        .expect("timeout");
    let notify_env = notify.to_str().expect("utf-8").to_owned();
    p.start(0, &[("NOTIFY_SOCKET", &notify_env), ("RUST_LOG", "info")]);

    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 ({e})\n{}", p.logs()));
    assert_eq!(&buf[..n], b"READY=1");
    // The promise READY=1 makes: the NBD socket takes connections now, not some time later.
    let nbd = p.path(&format!("{}.nbd", NAMES[0]));
    UnixStream::connect(&nbd)
        .unwrap_or_else(|e| panic!("READY=1 came before {} accepted: {e}", nbd.display()));

    assert!(
        p.stop(0),
        "the daemon must exit cleanly on SIGTERM\n{}",
        p.logs()
    );
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no STOPPING=1 ({e})\n{}", p.logs()));
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[test]
fn json_logs_carry_each_state_change_as_fields() {
    let mut p = Pair::configure("8M", ["", ""]);
    let log = p.path("alpha-json.log");
    // Started by hand to pass the global flag.
    let child = std::process::Command::new(ops_common::bin())
        .args(["--log-format", "json", "up", "r0", "--config"])
        .arg(&p.config)
        .args(["--node", "alpha"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    p.children[0] = Some(child);
    p.wait(0, "the daemon answers status", |_| true);
    let o = p.cli(0, &["primary", "--force"]);
    assert!(o.status.success(), "primary --force: {o:?}");
    assert!(p.stop(0), "clean exit");

    let text = std::fs::read_to_string(&log).expect("read log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let role = lines
        .iter()
        .find(|v| v["kind"] == "role")
        .unwrap_or_else(|| panic!("no role change line in:\n{text}"));
    assert_eq!(role["resource"], "r0", "{role}");
    assert_eq!(role["node"], "alpha", "{role}");
    assert_eq!(role["from"], "Secondary", "{role}");
    assert_eq!(role["to"], "Primary", "{role}");
    assert_eq!(role["level"], "INFO", "{role}");
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let o = ops_common::run(&["completions", "bash"]);
    assert!(o.status.success(), "{o:?}");
    let bash = String::from_utf8_lossy(&o.stdout);
    for word in ["wait-sync", "events", "--discard-my-data", "create-md"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    let o = ops_common::run(&["completions", "zsh"]);
    assert!(
        o.status.success() && o.stdout.starts_with(b"#compdef twinblk"),
        "{o:?}"
    );

    let o = ops_common::run(&["man"]);
    assert!(o.status.success(), "{o:?}");
    let man = String::from_utf8_lossy(&o.stdout);
    assert!(
        man.starts_with(".ie") || man.contains(".TH twinblk"),
        "{man}"
    );
    assert!(man.contains("wait\\-sync"), "{man}");

    let dir = tempfile::tempdir().expect("tempdir");
    let o = ops_common::run(&["man", "--out-dir", dir.path().to_str().expect("utf-8")]);
    assert!(o.status.success(), "{o:?}");
    let page = std::fs::read_to_string(dir.path().join("twinblk-wait-sync.1")).expect("page");
    assert!(
        page.contains(".TH twinblk\\-wait\\-sync") || page.contains("twinblk-wait-sync"),
        "{page}"
    );
    assert!(page.contains("timeout"), "{page}");
    assert!(dir.path().join("twinblk.1").is_file());

    let o = ops_common::run(&["completions", "tcsh"]);
    assert!(!o.status.success(), "an unknown shell is refused");
}
