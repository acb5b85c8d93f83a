//! What an operator meets at the command line, against real daemons and real NBD clients
//! (libnbd's nbdsh): `secondary`/`down` while clients have the export open, a client on a
//! Secondary, an idempotent `down`, and the CLI's small manners.

mod ops_common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

use ops_common::{text, Pair, WAIT};

const NBDSH: &str = "/usr/bin/nbdsh";

fn need_nbdsh() {
    assert!(
        std::path::Path::new(NBDSH).is_file(),
        "{NBDSH} not found: install the Debian package `nbdsh` (libnbd)"
    );
}

/// An nbdsh holding a connection to node i's export: it says `open` once connected, then on
/// each line of stdin tries a 4 KiB write and prints `wrote` or the error.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Holder {
    fn open(p: &Pair, i: usize) -> Holder {
        let script = "import sys\n\
                      print('open', flush=True)\n\
                      for _ in sys.stdin:\n    \
                          try:\n        \
                              h.pwrite(b'w' * 4096, 0)\n        \
                              print('wrote', flush=True)\n    \
                          except Exception as e:\n        \
                              print('error', e, flush=True)\n";
        let mut child = Command::new(NBDSH)
            // nbdsh runs `env python3`: the system one, which has libnbd's module.
            .env("PATH", "/usr/bin:/bin")
            .args(["-u", &p.nbd_uri(i), "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nbdsh");
        let stdin = child.stdin.take().expect("stdin");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut h = Holder {
            child,
            stdin,
            lines,
        };
        let first = h.next();
        assert_eq!(first, "open", "nbdsh did not connect\n{}", p.logs());
        h
    }

    fn next(&mut self) -> String {
        self.lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| "nbdsh said nothing".into())
    }

    /// One write through the held connection: `wrote` or `error …`.
    fn write(&mut self) -> String {
        let _ = writeln!(self.stdin);
        let _ = self.stdin.flush();
        self.next()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 17 defect 7: `secondary` (and `down`) went through under a connected nbdsh, whose
/// next write then failed with EPERM. Now both refuse and name the client; `--force`
/// disconnects it first; and a second `down` is a no-op, as `drbdadm down` is.
#[test]
fn secondary_and_down_refuse_while_an_nbd_client_has_the_export_open() {
    need_nbdsh();
    let mut p = Pair::new("16M", ["", ""]);
    p.primary_force();
    p.wait_in_sync();
    let mut h = Holder::open(&p, 0);
    assert_eq!(h.write(), "wrote", "{}", p.logs());

    for cmd in ["secondary", "down"] {
        let o = p.cli(0, &[cmd]);
        let t = text(&o);
        assert!(!o.status.success(), "{cmd} under an open client: {t}");
        assert!(
            t.contains("1 NBD client has r0 open (unix:pid "),
            "{cmd}: the refusal names the client: {t}"
        );
        assert!(t.contains(&format!("twinblk {cmd} r0 --force")), "{t}");
    }
    let s = p.status(0).expect("status");
    assert_eq!(s["role"], "Primary", "nothing changed: {s}");
    assert_eq!(h.write(), "wrote", "the client still works: {}", p.logs());

    let o = ops_common::ok(&p, 0, &["secondary", "--force"]);
    assert!(text(&o).contains("now Secondary"), "{}", text(&o));
    let after = h.write();
    assert!(
        after.starts_with("error") && !after.contains("Operation not permitted"),
        "the forced client was disconnected, not left to get EPERM: {after}"
    );
    assert_eq!(p.status(0).expect("status")["role"], "Secondary");

    // Down, then down again: the second one finds nothing running and succeeds.
    ops_common::down_both_identical(&mut p, "a forced demotion");
    for i in [0, 1] {
        let o = ops_common::ok(&p, i, &["down"]);
        assert!(text(&o).contains("already down"), "{}", text(&o));
    }
}

/// Issue 18: a client of a Secondary negotiated a writable export and then got EPERM for every
/// request; now the negotiation itself fails with a message naming the role, and the daemon
/// logs why.
#[test]
fn a_client_of_a_secondary_is_refused_at_negotiation_with_the_role() {
    need_nbdsh();
    let p = Pair::new("16M", ["", ""]);
    p.primary_force();
    p.wait_in_sync();
    let o = Command::new(NBDSH)
        .env("PATH", "/usr/bin:/bin")
        .args(["-u", &p.nbd_uri(1), "-c", "h.pwrite(b'x' * 512, 0)"])
        .output()
        .expect("run nbdsh");
    let t = text(&o);
    assert!(!o.status.success(), "nbdsh on the Secondary: {t}");
    assert!(t.contains("server policy prevents NBD_OPT_GO"), "{t}");
    // qemu's client prints the server's message.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &p.nbd_uri(1)])
        .output()
        .expect("run qemu-io");
    let t = text(&o);
    assert!(
        !o.status.success() || t.contains("Secondary"),
        "qemu-io on the Secondary: {t}"
    );
    assert!(
        t.contains("r0 is Secondary on beta") && t.contains("twinblk primary r0"),
        "the client is told the role and the way out: {t}"
    );
    let log = std::fs::read_to_string(p.path("beta.log")).expect("beta.log");
    assert!(log.contains("r0 is Secondary on beta"), "{log}");
    // The Primary's export still opens.
    let o = Command::new(NBDSH)
        .env("PATH", "/usr/bin:/bin")
        .args(["-u", &p.nbd_uri(0), "-c", "h.pwrite(b'x' * 512, 0)"])
        .output()
        .expect("run nbdsh");
    assert!(o.status.success(), "{}\n{}", text(&o), p.logs());
}

/// `keygen` accepts only names the resource file accepts; `--node` defaults to
/// `$TWINBLK_NODE`; `man | head` ends quietly.
#[test]
fn the_cli_agrees_with_the_resource_file_and_with_pipes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = ops_common::run(&[
        "keygen",
        "--name",
        "Alpha_1",
        "--out",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("not a valid node name") && text(&o).contains("letters, digits and '-'"),
        "{}",
        text(&o)
    );
    assert!(
        std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
        "no key written for a refused name"
    );

    let p = Pair::configure("16M", ["", ""]);
    // No --node: the status names alpha's admin socket, which nobody serves yet.
    let o = Command::new(ops_common::bin())
        .args(["status", "r0", "--config"])
        .arg(&p.config)
        .env("TWINBLK_NODE", "alpha")
        .output()
        .expect("status");
    assert!(
        text(&o).contains("alpha.sock"),
        "TWINBLK_NODE chose the node: {}",
        text(&o)
    );

    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("{} man | head -n 1", ops_common::bin()))
        .output()
        .expect("sh");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("Broken pipe"),
        "{}",
        text(&o)
    );
}

/// Issue 18: a missing peer certificate said only `identity: …/nope.crt: No such file or
/// directory`, after creating the disk image. Now it names the key and the fix, before
/// touching the disk; a private key others can read is warned about.
#[test]
fn a_missing_peer_certificate_names_the_key_and_the_fix_before_creating_the_disk() {
    let p = Pair::configure("16M", ["", ""]);
    let text_cfg = std::fs::read_to_string(&p.config).expect("config");
    let beta_crt = p.path("beta.crt").display().to_string();
    let nope = p.path("nope.crt").display().to_string();
    std::fs::write(&p.config, text_cfg.replace(&beta_crt, &nope)).expect("write config");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p.path("alpha.key"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let o = p.cli(0, &["up"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("node.beta.cert") && t.contains("nope.crt") && t.contains("node.beta.pin"),
        "the key and both fixes are named: {t}"
    );
    assert!(t.contains("readable by other users"), "{t}");
    assert!(
        !p.path("alpha.img").exists(),
        "no disk image is created before a refusal"
    );
}

/// Issue 18: right after the Primary dies the survivor still says `Primary … Established`
/// until the timeout; now it says how long the peer has been silent and when it will be
/// declared dead.
#[test]
fn a_silent_peer_shows_when_it_was_last_heard() {
    let p = Pair::new("16M", ["", ""]);
    p.primary_force();
    p.wait_in_sync();
    p.signal(0, nix::sys::signal::Signal::SIGSTOP);
    let s = p.wait(1, "the frozen peer to be silent for 2 s", |s| {
        s["peer_last_heard_secs"].as_u64().is_some_and(|a| a >= 2)
    });
    let human = text(&p.cli(1, &["status"]));
    p.signal(0, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(s["connected"], true, "{s}");
    assert!(
        s["peer_timeout_secs"].as_u64().is_some_and(|t| t >= 2),
        "{s}"
    );
    assert!(
        human.contains("peer last heard") && human.contains("declared dead after"),
        "{human}"
    );
}

/// Issue 18: a refused certificate was logged as `… invalid peer certificate:
/// Other(OtherError(certificate presented by …))`, rustls's Debug text around ours. Now both
/// nodes' lines name the resource-file key the pin came from and the fix, in plain words.
#[test]
fn a_wrong_peer_certificate_is_logged_with_the_key_and_the_fix_without_rust_debug_text() {
    let other = tempfile::tempdir().expect("tempdir");
    let (_, _, wrong_pin) = twinblk::net::keygen("beta", other.path(), false).expect("keygen");
    // Alpha pins another certificate for beta than beta presents (both read this file, and
    // only alpha uses beta's pin).
    let mut p = Pair::configure("16M", ["", &format!("pin = \"{wrong_pin}\"")]);
    p.start_and_wait(0);
    p.start_and_wait(1);
    let s = p.wait(0, "alpha to refuse beta's certificate", |s| {
        s["last_auth_error"].is_string()
    });
    p.wait(1, "beta to learn why", |s| {
        s["last_connection_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused our certificate"))
    });
    let refusal = s["last_auth_error"].as_str().expect("string");
    assert!(
        refusal.contains("node.beta.pin") && refusal.contains(&wrong_pin),
        "{refusal}"
    );
    for i in 0..2 {
        assert!(p.stop(i), "{}", p.logs());
    }
    let logs = p.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("certificate") && l.contains("refus"))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("we refused"))
            && lines
                .iter()
                .any(|l| l.contains("the peer refused our certificate")),
        "both sides log the refusal: {logs}"
    );
    for l in &lines {
        assert!(
            !l.contains("Other(") && !l.contains("{ ") && !l.contains("OtherError"),
            "Rust Debug text in a log line: {l}"
        );
        assert!(
            l.contains("node.beta.pin") && l.contains("twinblk keygen --name beta"),
            "the line names neither the key nor the fix: {l}"
        );
    }
}
