//! Operations commands: `events`, `status` of every resource, `wait-sync`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use super::ResArgs;
use crate::control::{self, ControlError, Request, Response};
use crate::node::events;

/// `twinblk events`: print event lines until interrupted or the daemon stops.
pub fn events(res: &ResArgs, now: bool, json: bool) -> anyhow::Result<()> {
    let path = res.admin_socket()?;
    let stdout = std::io::stdout();
    let mut err = None;
    control::request(&path, &Request::Events { now }, |resp| match resp {
        Response::Event { event } => {
            let text = if json {
                event.to_string()
            } else {
                events::human(&event)
            };
            let mut out = stdout.lock();
            // A closed pipe (`twinblk events r0 | head`) ends the stream quietly.
            writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
        }
        Response::Error { message, .. } => {
            err = Some(message);
            false
        }
        other => {
            err = Some(format!("unexpected answer from the daemon: {other:?}"));
            false
        }
    })?;
    match err {
        Some(e) => anyhow::bail!("{e}"),
        None => Ok(()),
    }
}

pub(super) fn query(path: &Path) -> Result<anyhow::Result<Value>, ControlError> {
    query_for(path, &Request::Status, "status")
}

/// One request whose answer is a `Response::Status` document (`status`, `status --latency`):
/// the transport's error apart from the daemon's.
pub(super) fn query_for(
    path: &Path,
    req: &Request,
    what: &str,
) -> Result<anyhow::Result<Value>, ControlError> {
    let mut got = None;
    let mut err = None;
    control::request(path, req, |resp| {
        match resp {
            Response::Status { status } => got = Some(status),
            Response::Error { message, .. } => err = Some(message),
            _ => {}
        }
        false
    })?;
    Ok(match (got, err) {
        (_, Some(e)) => Err(anyhow::anyhow!("{e}")),
        (Some(s), None) => Ok(s),
        (None, None) => Err(anyhow::anyhow!("the daemon sent no {what}")),
    })
}

/// `twinblk status` without a resource: every resource file in `dir` that names this node and
/// whose admin socket exists.
pub fn status_all(dir: &Path, node: Option<&str>, json: bool) -> anyhow::Result<()> {
    let node = super::node_name(node)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "reading {}: pass --config-dir or name a resource",
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut all = Vec::new();
    let mut failed = false;
    for f in files {
        // Other TOML files (or a broken one) must not hide the running resources.
        let cfg = match crate::config::Config::load(&f) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("skipping {}: {e}", f.display());
                continue;
            }
        };
        let Ok(me) = cfg.node_named(&node) else {
            continue;
        };
        if !me.admin.exists() {
            continue;
        }
        match query(&me.admin) {
            Ok(Ok(s)) => all.push(s),
            Ok(Err(e)) => {
                eprintln!("{}: {e}", cfg.resource.name);
                failed = true;
            }
            Err(ControlError::NotRunning { .. }) => {}
            Err(e) => {
                eprintln!("{}: {e}", cfg.resource.name);
                failed = true;
            }
        }
    }
    if json {
        println!("{}", Value::Array(all));
    } else if all.is_empty() {
        println!(
            "no resource is running on node {node:?} (resource files in {})",
            dir.display()
        );
    } else {
        for (i, s) in all.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print!("{}", super::human_status(s, false));
        }
    }
    if failed {
        anyhow::bail!("some daemons did not answer");
    }
    Ok(())
}

fn text<'a>(s: &'a Value, k: &str) -> &'a str {
    s.get(k).and_then(Value::as_str).unwrap_or("-")
}

/// Resync progress in percent from whatever the status carries.
fn percent(s: &Value) -> Option<f64> {
    let r = s.get("resync").filter(|r| !r.is_null())?;
    if let Some(p) = r.get("percent").and_then(Value::as_f64) {
        return Some(p);
    }
    let left = r.get("blocks_left").and_then(Value::as_f64)?;
    let total = r.get("blocks_total").and_then(Value::as_f64)?;
    Some(if total > 0.0 {
        100.0 * (total - left) / total
    } else {
        100.0
    })
}

/// Rate and ETA, if the daemon reports them (field names vary between versions: tolerate).
fn rate_eta(s: &Value) -> String {
    let Some(r) = s.get("resync") else {
        return String::new();
    };
    let mut out = String::new();
    for k in ["rate_bytes_per_sec", "rate", "bytes_per_sec"] {
        if let Some(v) = r.get(k).and_then(Value::as_f64) {
            out.push_str(&format!(" {:.1} MiB/s", v / (1024.0 * 1024.0)));
            break;
        }
    }
    for k in ["eta_secs", "eta_seconds", "eta"] {
        if let Some(v) = r.get(k).and_then(Value::as_f64) {
            out.push_str(&format!(" ETA {v:.0}s"));
            break;
        }
    }
    out
}

/// Why waiting cannot succeed, if so: a split brain at once (it is refused again on every
/// attempt until an operator resolves it); any other StandAlone once it has lasted longer than
/// `grace` (after a refusal the daemon tries again by itself after `connect-retry`, and the
/// cause may be gone by then; after `disconnect` it never does).
fn hopeless(s: &Value, standing_alone: Duration, grace: Duration) -> Option<String> {
    // The refusal is kept after a later success: only a node standing alone is stuck.
    if text(s, "repl") != "StandAlone" {
        return None;
    }
    let refusal = s.get("last_refusal").and_then(Value::as_str);
    // Refusals only the operator clears (the daemon's retries meet them again), by their
    // stable code (`Refusal::code` in the core), never the text.
    // A split brain the peer found counts too (its code, `last_refusal_peer_code`).
    let split_code = |key| {
        matches!(
            s.get(key).and_then(Value::as_str),
            Some("split-brain" | "both-primary" | "both-primary-connected")
        )
    };
    let split = split_code("last_refusal_code")
        || (text(s, "last_refusal_code") == "by-peer" && split_code("last_refusal_peer_code"));
    if !split && standing_alone <= grace {
        return None;
    }
    Some(match refusal {
        Some(r) if split => format!("StandAlone after a split brain: {r}"),
        Some(r) => format!("StandAlone: the connection was refused: {r}"),
        None => "not connected (StandAlone): run `twinblk connect` first".into(),
    })
}

/// `twinblk wait-sync`: block until both disks are UpToDate and no resync runs.
pub fn wait_sync(res: &ResArgs, timeout: Option<u64>) -> anyhow::Result<()> {
    let (cfg, node) = res.load()?;
    let path = cfg.node_named(&node)?.admin.clone();
    // Long enough for the daemon's own retry after a refusal to show as Connecting.
    let grace = cfg.resource.connect_retry * 2 + Duration::from_secs(2);
    let mut alone_since: Option<Instant> = None;
    let name = &res.resource;
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(1000);
        b.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{wide_bar}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_prefix(name.clone());
        b
    });
    let mut last_line = String::new();
    let mut last_print = Instant::now();
    let result = loop {
        let s = match query(&path) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => break Err(e),
            Err(e) => break Err(e.into()),
        };
        let (repl, disk, peer_disk) = (text(&s, "repl"), text(&s, "disk"), text(&s, "peer_disk"));
        if repl == "Established" && disk == "UpToDate" && peer_disk == "UpToDate" {
            break Ok(());
        }
        let alone = if repl == "StandAlone" {
            alone_since.get_or_insert_with(Instant::now).elapsed()
        } else {
            alone_since = None;
            Duration::ZERO
        };
        if let Some(why) = hopeless(&s, alone, grace) {
            break Err(anyhow::anyhow!("{name}: {why}"));
        }
        let p = percent(&s);
        let msg = match p {
            Some(p) => format!("{repl}: {p:.1}% done{}", rate_eta(&s)),
            None if repl == "SyncTarget" => {
                format!("{repl}: receiving the resync (progress shows on the peer)")
            }
            None => format!("{repl}, disk {disk}, peer disk {peer_disk}"),
        };
        if let Some(b) = &bar {
            b.set_position(p.map_or(0, |p| (p * 10.0) as u64));
            b.set_message(msg);
        } else if msg != last_line
            && (last_print.elapsed() >= Duration::from_secs(5)
                || p.is_none()
                || last_line.is_empty())
        {
            println!("{name}: {msg}");
            last_line = msg;
            last_print = Instant::now();
        }
        if let Some(t) = timeout {
            if start.elapsed() >= Duration::from_secs(t) {
                break Err(anyhow::anyhow!(
                    "{name}: not in sync after {t}s ({repl}, disk {disk}, peer disk {peer_disk})"
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if let Some(b) = &bar {
        // The outcome is printed as a line of its own below.
        b.finish_and_clear();
    }
    result?;
    println!("{name}: in sync (both disks UpToDate)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn progress_from_either_field_set() {
        let s = json!({"resync": {"blocks_left": 25, "blocks_total": 100}});
        assert_eq!(percent(&s), Some(75.0));
        let s =
            json!({"resync": {"percent": 42.5, "rate_bytes_per_sec": 2097152.0, "eta_secs": 9}});
        assert_eq!(percent(&s), Some(42.5));
        assert_eq!(rate_eta(&s), " 2.0 MiB/s ETA 9s");
        assert_eq!(percent(&json!({"resync": null})), None);
        assert_eq!(percent(&json!({})), None);
    }

    #[test]
    fn refusals_end_the_wait() {
        let (zero, grace) = (Duration::ZERO, Duration::from_secs(12));
        let long = Duration::from_secs(13);
        let sb = json!({
            "repl": "StandAlone",
            "last_refusal": "split brain: both nodes have changes",
            "last_refusal_code": "split-brain",
        });
        assert!(hopeless(&sb, zero, grace).is_some_and(|w| w.contains("split brain")));
        // The peer's split-brain refusal ends the wait too, by the peer's code.
        let by_peer = json!({
            "repl": "StandAlone",
            "last_refusal": "peer refused: split brain: both nodes have changes",
            "last_refusal_code": "by-peer",
            "last_refusal_peer_code": "split-brain",
        });
        assert!(hopeless(&by_peer, zero, grace).is_some());
        let by_peer_size = json!({
            "repl": "StandAlone",
            "last_refusal": "peer refused: device sizes differ",
            "last_refusal_code": "by-peer",
            "last_refusal_peer_code": "size-mismatch",
        });
        assert_eq!(
            hopeless(&by_peer_size, zero, grace),
            None,
            "the daemon retries"
        );
        let refused = json!({
            "repl": "StandAlone",
            "last_refusal": "the peer has newer data",
            "last_refusal_code": "peer-newer-than-primary",
        });
        assert_eq!(hopeless(&refused, zero, grace), None, "the daemon retries");
        assert!(hopeless(&refused, long, grace).is_some_and(|w| w.contains("newer data")));
        let off = json!({"repl": "StandAlone", "last_refusal": null});
        assert!(hopeless(&off, long, grace).is_some_and(|w| w.contains("twinblk connect")));
        let going = json!({"repl": "SyncSource", "last_refusal": null});
        assert_eq!(hopeless(&going, long, grace), None);
    }
}
