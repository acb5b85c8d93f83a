//! `frontend = "ublk"` where the kernel has no ublk driver (as on the CI host): `twinblk up`
//! must refuse at start, say what to do, and leave no admin socket behind. The device itself
//! is exercised in the VM test (tools/vm-test.sh, stage repl).

use std::path::Path;
use std::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_twinblk")
}

#[test]
fn up_without_ublk_driver_fails_clearly() {
    if Path::new("/dev/ublk-control").exists() {
        // Here the device would be created instead; the VM test covers that path.
        eprintln!("skipped: /dev/ublk-control exists on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for n in ["alpha", "beta"] {
        let o = Command::new(bin())
            .args(["keygen", "--name", n, "--out"])
            .arg(d)
            .output()
            .unwrap();
        assert!(o.status.success(), "keygen: {o:?}");
    }
    let ports = [0, 1].map(|_| {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let node = |n: &str, port: u16, extra: &str| {
        format!(
            "[node.{n}]\naddress = \"127.0.0.1:{port}\"\ndisk = \"{d}/{n}.img\"\n\
             nbd = \"unix:{d}/{n}.nbd\"\nadmin = \"{d}/{n}.sock\"\ncert = \"{d}/{n}.crt\"\n\
             key = \"{d}/{n}.key\"\nsize = \"16M\"\n{extra}",
            d = d.display()
        )
    };
    let cfg = d.join("r0.toml");
    std::fs::write(
        &cfg,
        format!(
            "[resource]\nname = \"r0\"\n{}{}",
            node("alpha", ports[0], "frontend = \"ublk\"\n"),
            node("beta", ports[1], "")
        ),
    )
    .unwrap();
    let cli = |cmd: &str| {
        Command::new(bin())
            .args([cmd, "r0", "--config"])
            .arg(&cfg)
            .args(["--node", "alpha"])
            .output()
            .unwrap()
    };
    let o = cli("create-md");
    assert!(o.status.success(), "create-md: {o:?}");
    let o = cli("up");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "up succeeded without ublk_drv: {err}");
    assert!(
        err.contains("modprobe ublk_drv") && err.contains("/dev/ublk-control"),
        "the error does not say how to get the driver: {err}"
    );
    assert!(!d.join("alpha.sock").exists(), "admin socket left behind");
    assert!(!d.join("alpha.nbd").exists(), "NBD socket left behind");
}
