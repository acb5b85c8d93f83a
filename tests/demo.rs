//! tools/demo.sh end to end with the debug binary: two nodes, fio through the Primary, kill -9,
//! failover, the old Primary back as Secondary, resync, `cmp` of both disks (the script fails on
//! any step, so its exit status is the verdict).

use std::path::Path;
use std::process::Command;

#[test]
fn the_demo_runs_and_the_copies_match() {
    assert!(
        Path::new("/usr/bin/fio").is_file(),
        "fio not found: install the Debian package fio"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join("tools/demo.sh"))
        .env("TWINBLK", env!("CARGO_BIN_EXE_twinblk"))
        .env("DEMO_SIZE", "64M")
        .env("FIO_SIZE", "16M")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "demo.sh failed:\n{out}\n{err}");
    for step in [
        "1. two nodes",
        "4. fio writes",
        "5. alpha crashes",
        "6. beta is promoted",
        "7. the data written through alpha, verified through beta",
        "8. alpha comes back",
        "9. twinblk down on both",
        "$ cmp ",
        "demo passed",
    ] {
        assert!(
            out.contains(step),
            "step {step:?} missing from the demo's output:\n{out}"
        );
    }
    // After each step the demo shows `twinblk status`.
    assert!(out.contains("--- twinblk status (beta) ---"), "{out}");
}
