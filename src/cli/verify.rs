//! `twinblk verify [--wait]` and the verify lines of `twinblk status`.

use std::time::Duration;

use serde_json::Value;

use super::ResArgs;
use crate::control::Request;

fn run_of(s: &Value) -> Option<u64> {
    s.get("verify")?.get("run")?.as_u64()
}

/// Starts a verify; with `wait`, follows it to the end and fails if blocks differ.
pub fn verify(res: &ResArgs, wait: bool) -> anyhow::Result<()> {
    let path = res.admin_socket()?;
    let name = &res.resource;
    let before = super::ops::query(&path)??;
    let last_run = run_of(&before).unwrap_or(0);
    super::admin(res, Request::Verify)?;
    if !wait {
        return Ok(());
    }
    let mut last_step = None;
    loop {
        let s = super::ops::query(&path)??;
        let v = s.get("verify").filter(|_| run_of(&s) > Some(last_run));
        let Some(v) = v else {
            // The verify ended (or never showed) before a status could see it running: only
            // a lost connection does that; the daemon says why in its log and status.
            anyhow::bail!(
                "{name}: the verify did not start or was lost (replication {}); see `twinblk status`",
                s.get("repl").and_then(Value::as_str).unwrap_or("-")
            );
        };
        let pct = v.get("percent").and_then(Value::as_f64).unwrap_or(0.0);
        let step = (pct / 10.0) as u64;
        if last_step != Some(step) {
            println!("{name}: verify {pct:.0}% done");
            last_step = Some(step);
        }
        if v.get("running").and_then(Value::as_bool) == Some(false) {
            print!("{}", human(v));
            if let Some(why) = v.get("aborted").and_then(Value::as_str) {
                anyhow::bail!("{name}: verify stopped early: {why}");
            }
            let n = v
                .get("differing_blocks")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if n > 0 {
                anyhow::bail!(
                    "{name}: {n} blocks differ between the nodes (marked out of sync); resync \
                     them with `twinblk disconnect {name}` then `twinblk connect {name}`"
                );
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `status` lines for a verify object.
pub fn human(v: &Value) -> String {
    let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let pct = v.get("percent").and_then(Value::as_f64).unwrap_or(0.0);
    let state = if v.get("running").and_then(Value::as_bool) == Some(true) {
        format!("running, {pct:.1}% done")
    } else if let Some(why) = v.get("aborted").and_then(Value::as_str) {
        format!("stopped at {pct:.1}%: {why}")
    } else {
        "done".to_owned()
    };
    let mut o = format!(
        "  verify:      {state}; {} blocks differ ({} bytes)\n",
        num("differing_blocks"),
        num("differing_bytes")
    );
    let ranges: Vec<String> = v
        .get("first_ranges")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| {
            let off = r.get("offset").and_then(Value::as_u64).unwrap_or(0);
            let n = r.get("bytes").and_then(Value::as_u64).unwrap_or(0);
            format!("{off}+{n}")
        })
        .collect();
    if !ranges.is_empty() {
        o += &format!(
            "    differing ranges (offset+bytes): {}\n",
            ranges.join(", ")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_lines_name_the_ranges() {
        let v = json!({"running": false, "percent": 100.0, "differing_blocks": 2,
            "differing_bytes": 8192, "first_ranges": [{"offset": 4096, "bytes": 8192}],
            "aborted": null});
        let h = human(&v);
        assert!(h.contains("done; 2 blocks differ (8192 bytes)"), "{h}");
        assert!(h.contains("4096+8192"), "{h}");
        let v = json!({"running": true, "percent": 42.0, "differing_blocks": 0});
        assert!(human(&v).contains("running, 42.0% done"));
    }
}
