//! `twinblk adjust` under two running daemons: the resync rates, the split-brain policies and
//! the `on-peer-lost` hook apply live (the hook that fires after the change is the new one),
//! the timeouts apply from the next connection, the other changed keys are named as needing a
//! restart, and an invalid file or a refused change applies nothing.

mod ops_common;

use std::os::unix::fs::PermissionsExt;

use ops_common::{ok, text, wait_until, Pair};

/// The new hook: records its arguments, then waits for the test to write its exit code (at
/// most 2 minutes, so a failed test leaves no hook behind).
const HOOK: &str = r#"#!/bin/sh
d=$(dirname "$0")
echo "$1 $2" >> "$d/hook.fired"
i=0
while [ ! -s "$d/release" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
exit "$(cat "$d/release" 2>/dev/null || echo 1)"
"#;

fn settings(p: &Pair, i: usize) -> serde_json::Value {
    p.status(i).expect("status")["settings"].clone()
}

fn adjust(p: &Pair, i: usize) -> String {
    text(&ok(p, i, &["adjust"]))
}

/// Replaces `from` by `to` in the resource file.
fn edit(p: &Pair, from: &str, to: &str) {
    let t = std::fs::read_to_string(&p.config).expect("read config");
    assert!(t.contains(from), "{from:?} not in the resource file");
    std::fs::write(&p.config, t.replacen(from, to, 1)).expect("write config");
}

#[test]
fn adjust_applies_rates_policies_timeouts_and_the_hook_without_a_restart() {
    let mut p = Pair::configure_with(
        "4M",
        "c-max-rate = \"100M\"\ntimeout = \"5s\"\nping-interval = \"1s\"\n",
        ["", ""],
    );
    let hook = p.path("hook.sh");
    std::fs::write(&hook, HOOK).expect("hook");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p.start_and_wait(0);
    p.start_and_wait(1);
    p.primary_force();
    p.wait_in_sync();
    let s = settings(&p, 0);
    assert_eq!(s["c_max_rate"], 100 << 20, "{s}");
    assert_eq!(s["after_sb_0pri"], "disconnect", "{s}");
    assert_eq!(s["on_peer_lost"], serde_json::Value::Null, "{s}");
    assert_eq!(s["fencing"], false, "{s}");
    assert_eq!(s["timeout_ms"], 5000, "{s}");
    assert_eq!(s["idle_poll_ms"], 10, "the default linger: {s}");

    let out = adjust(&p, 0);
    assert!(out.contains("nothing changed"), "{out}");

    // A rate, a policy, a timeout, the hook, and a key that needs a restart.
    edit(&p, "c-max-rate = \"100M\"", "c-max-rate = \"200M\"");
    edit(&p, "timeout = \"5s\"", "timeout = \"3s\"");
    edit(
        &p,
        "protocol = \"sync\"",
        &format!(
            "protocol = \"async\"\nafter-sb-0pri = \"discard-zero-changes\"\n\
             idle-poll = \"off\"\non-peer-lost = \"{}\"",
            hook.display()
        ),
    );
    let out = adjust(&p, 0);
    for line in [
        "c-max-rate: applied live",
        "after-sb-0pri: applied live",
        "on-peer-lost: applied live",
        "idle-poll: applied live",
        "timeout: applied for the next connection",
        "protocol: needs a restart",
    ] {
        assert!(out.contains(line), "no {line:?} in: {out}");
    }
    for key in ["c-fill-target", "ping-interval", "after-sb-1pri", "csums"] {
        assert!(!out.contains(key), "unchanged {key} reported: {out}");
    }
    let st = p.status(0).expect("status");
    let s = &st["settings"];
    assert_eq!(s["c_max_rate"], 200 << 20, "{s}");
    assert_eq!(st["c_max_rate"], 200 << 20, "{st}");
    assert_eq!(s["after_sb_0pri"], "discard-zero-changes", "{s}");
    assert_eq!(s["on_peer_lost"], hook.display().to_string(), "{s}");
    assert_eq!(s["fencing"], true, "{s}");
    assert_eq!(st["peer_lost_hook"]["command"], hook.display().to_string());
    assert_eq!(s["timeout_ms"], 3000, "{s}");
    assert_eq!(
        (&s["idle_poll_ms"], &s["idle_poll_active"]),
        (&0.into(), &false.into()),
        "{s}"
    );
    assert_eq!(
        st["peer_timeout_secs"], 5,
        "the open connection keeps its timeout: {st}"
    );
    assert_eq!(
        st["protocol"], "sync",
        "protocol changed without a restart: {st}"
    );
    // Only the adjusted node changed.
    let s1 = settings(&p, 1);
    assert_eq!(
        (&s1["c_max_rate"], &s1["after_sb_0pri"], &s1["timeout_ms"]),
        (&(100u64 << 20).into(), &"disconnect".into(), &5000.into()),
        "{s1}"
    );

    // The next connection uses the new timeout.
    ok(&p, 0, &["disconnect"]);
    ok(&p, 0, &["connect"]);
    p.wait_in_sync();
    let st = p.status(0).expect("status");
    assert_eq!(st["peer_timeout_secs"], 3, "{st}");

    // Already applied: only the restart key is left.
    let out = adjust(&p, 0);
    assert!(
        out.contains("protocol: needs a restart") && !out.contains("applied"),
        "{out}"
    );

    // The peer dies: the Primary freezes (fencing came with the adjusted on-peer-lost) and runs
    // the new hook.
    p.kill(1);
    wait_until("the adjusted on-peer-lost hook runs", || {
        p.path("hook.fired").exists()
    });
    let fired = std::fs::read_to_string(p.path("hook.fired")).expect("hook.fired");
    assert_eq!(fired.trim(), "r0 beta");
    let st = p.status(0).expect("status");
    assert_eq!(st["peer_lost_hook"]["frozen"], true, "{st}");

    // Removing the hook while writes wait for it is refused, with everything else in the file.
    edit(&p, "c-max-rate = \"200M\"", "c-max-rate = \"50M\"");
    edit(&p, &format!("on-peer-lost = \"{}\"", hook.display()), "");
    let o = p.cli(0, &["adjust"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("frozen") && out.contains("nothing applied"),
        "{out}"
    );
    // The admin reply names the refusal by its stable code, for scripts (the core's
    // `AdminError`, carried through the driver).
    let mut reply = None;
    twinblk::control::request(
        &p.path("alpha.sock"),
        &twinblk::control::Request::Adjust,
        |r| {
            reply = Some(r);
            false
        },
    )
    .expect("admin request");
    match reply {
        Some(twinblk::control::Response::Error { message, code }) => {
            assert_eq!(
                code,
                Some(twinblk::core::AdminErrorCode::FencingStillNeeded),
                "{message}"
            );
            assert!(message.contains("nothing applied"), "{message}");
        }
        other => panic!("adjust while frozen was not refused: {other:?}"),
    }
    let s = settings(&p, 0);
    assert_eq!(
        s["c_max_rate"],
        200 << 20,
        "a refused adjust applied a rate: {s}"
    );
    assert_eq!(s["on_peer_lost"], hook.display().to_string(), "{s}");

    // The hook exits 0: the freeze ends.
    std::fs::write(p.path("release"), "0").expect("release");
    p.wait(0, "the hook's success", |s| {
        s["peer_lost_hook"]["state"] == "succeeded" && s["peer_lost_hook"]["frozen"] == false
    });
    // Now the hook may go.
    let out = adjust(&p, 0);
    assert!(
        out.contains("on-peer-lost: applied live") && out.contains("c-max-rate: applied live"),
        "{out}"
    );
    let s = settings(&p, 0);
    assert_eq!(
        (&s["on_peer_lost"], &s["fencing"], &s["c_max_rate"]),
        (
            &serde_json::Value::Null,
            &false.into(),
            &(50u64 << 20).into()
        ),
        "{s}"
    );
    assert!(p.stop(0), "{}", p.logs());
}

#[test]
fn an_invalid_file_applies_nothing() {
    let mut p = Pair::configure_with("4M", "c-max-rate = \"100M\"\n", ["", ""]);
    p.start_and_wait(0);
    let orig = std::fs::read_to_string(&p.config).expect("read config");
    // A valid change next to an invalid one.
    edit(
        &p,
        "c-max-rate = \"100M\"",
        "c-max-rate = \"200M\"\ntimeout = \"soon\"",
    );
    // The CLI reads the file first and refuses it.
    let o = p.cli(0, &["adjust"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("resource.timeout") && out.contains("nothing applied"),
        "{out}"
    );
    // The daemon re-reads its own file: a CLI given a valid copy (the same admin socket) gets
    // the daemon's refusal.
    let copy = p.path("copy.toml");
    std::fs::write(&copy, &orig).expect("write copy");
    let o = std::process::Command::new(ops_common::bin())
        .args(["adjust", "r0", "--node", "alpha", "--config"])
        .arg(&copy)
        .output()
        .expect("run twinblk");
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("resource.timeout") && out.contains("nothing applied"),
        "{out}"
    );
    std::fs::write(&p.config, orig).expect("write config");
    assert_eq!(settings(&p, 0)["c_max_rate"], 100 << 20);
    assert!(adjust(&p, 0).contains("nothing changed"));
    assert!(p.stop(0), "{}", p.logs());
}
