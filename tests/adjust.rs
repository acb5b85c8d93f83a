//! `twinblk adjust`: re-reading the resource file under a running daemon applies the resync
//! rates live, names the changed keys that need a restart, and applies nothing from an invalid
//! file.

mod ops_common;

use ops_common::{text, Pair};

fn c_max_rate(p: &Pair, i: usize) -> u64 {
    p.status(i).expect("status")["c_max_rate"]
        .as_u64()
        .expect("c_max_rate in status")
}

#[test]
fn adjust_applies_rates_and_names_restart_keys() {
    let mut p = Pair::configure_with("4M", "c-max-rate = \"100M\"\n", ["", ""]);
    for i in 0..2 {
        p.start_and_wait(i);
    }
    assert_eq!(c_max_rate(&p, 0), 100 << 20);

    // Unchanged file: nothing to do.
    let o = ops_common::ok(&p, 0, &["adjust"]);
    assert!(text(&o).contains("nothing to apply live"), "{}", text(&o));

    // A live key and a restart-only key change.
    let orig = std::fs::read_to_string(&p.config).unwrap();
    let changed = orig.replace(
        "c-max-rate = \"100M\"",
        "c-max-rate = \"200M\"\ntimeout = \"9s\"",
    );
    std::fs::write(&p.config, &changed).unwrap();
    let o = ops_common::ok(&p, 0, &["adjust"]);
    let out = text(&o);
    assert!(out.contains("applied c-max-rate"), "{out}");
    assert!(
        out.contains("needs a restart") && out.contains("timeout"),
        "{out}"
    );
    assert!(
        !out.contains("c-max-rate,") && !out.contains(": c-max-rate"),
        "{out}"
    );
    assert_eq!(c_max_rate(&p, 0), 200 << 20);
    // The other node was not adjusted.
    assert_eq!(c_max_rate(&p, 1), 100 << 20);

    // An invalid file: an error naming the key, nothing applied.
    let bad = changed.replace(
        "c-max-rate = \"200M\"",
        "c-max-rate = \"fast\"\nc-min-rate = \"1M\"",
    );
    std::fs::write(&p.config, bad).unwrap();
    let o = p.cli(0, &["adjust"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("c-max-rate"), "{}", text(&o));

    // Back to the valid file (the CLI finds the admin socket through it): the rate is already
    // in effect, the timeout still needs a restart.
    std::fs::write(&p.config, &changed).unwrap();
    assert_eq!(c_max_rate(&p, 0), 200 << 20);
    let out = text(&ops_common::ok(&p, 0, &["adjust"]));
    assert!(
        out.contains("nothing to apply live") && out.contains("timeout"),
        "{out}"
    );
    for i in 0..2 {
        assert!(p.stop(i), "{}", p.logs());
    }
}
