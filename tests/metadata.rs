//! The metadata area with the real binary: `up` refuses missing, corrupt, foreign and
//! newer-format metadata with a message naming the file and the fix, and touches nothing;
//! `create-md` never overwrites; `dump-md` shows what a short run saved.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);
const QEMU_IO: &str = "/usr/bin/qemu-io";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_twinblk")
}

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A resource file for r0 (or another name) with nodes alpha and beta in a temporary directory.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("twinblk-meta-")
            .tempdir_in("/var/tmp")
            .unwrap();
        for n in ["alpha", "beta"] {
            let o = Command::new(bin())
                .args(["keygen", "--name", n, "--out"])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "keygen: {}", text(&o));
        }
        let s = Setup { dir };
        s.write_config("r0", None);
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `<resource>.toml`; `alpha_meta` overrides alpha's `meta` path.
    fn write_config(&self, resource: &str, alpha_meta: Option<&Path>) -> PathBuf {
        let d = self.dir.path().display();
        let node = |n: &str, meta: Option<&Path>| {
            let meta = meta
                .map(|m| format!("meta = \"{}\"\n", m.display()))
                .unwrap_or_default();
            format!(
                "[node.{n}]\naddress = \"127.0.0.1:{port}\"\ndisk = \"{d}/{resource}-{n}.img\"\n\
                 {meta}nbd = \"unix:{d}/{resource}-{n}.nbd\"\nadmin = \"{d}/{resource}-{n}.sock\"\n\
                 cert = \"{d}/{n}.crt\"\nkey = \"{d}/{n}.key\"\nsize = \"64M\"\n",
                port = free_udp_port()
            )
        };
        let cfg = format!(
            "[resource]\nname = \"{resource}\"\n{}{}",
            node("alpha", alpha_meta),
            node("beta", None)
        );
        let p = self.path(&format!("{resource}.toml"));
        std::fs::write(&p, cfg).unwrap();
        p
    }

    fn cli(&self, resource: &str, node: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg(resource)
            .arg("--config")
            .arg(self.path(&format!("{resource}.toml")))
            .args(["--node", node])
            .output()
            .unwrap()
    }

    /// Default metadata path of `node` in r0.
    fn meta(&self, node: &str) -> PathBuf {
        self.path(&format!("r0-{node}.img.twinblk-meta"))
    }

    fn disk(&self, node: &str) -> PathBuf {
        self.path(&format!("r0-{node}.img"))
    }

    fn create_md(&self, node: &str) {
        let o = self.cli("r0", node, &["create-md"]);
        assert!(o.status.success(), "create-md: {}", text(&o));
    }

    /// `up` must fail at once, with a message containing every one of `want`, and leave the
    /// metadata as it was and the disk uncreated.
    fn up_refuses(&self, node: &str, want: &[&str]) {
        let meta = self.meta(node);
        let before = std::fs::read(&meta).ok();
        let o = self.cli("r0", node, &["up"]);
        let t = text(&o);
        assert!(!o.status.success(), "up succeeded: {t}");
        for w in want {
            assert!(t.contains(w), "up's message lacks {w:?}: {t}");
        }
        assert_eq!(std::fs::read(&meta).ok(), before, "up changed the metadata");
        assert!(!self.disk(node).exists(), "up created the disk: {t}");
    }
}

fn poke(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn up_refuses_missing_metadata() {
    let s = Setup::new();
    let meta = s.meta("alpha");
    s.up_refuses(
        "alpha",
        &[
            &format!("no metadata at {}", meta.display()),
            "run `twinblk create-md r0`",
        ],
    );
    assert!(!meta.exists());
}

#[test]
fn up_refuses_corrupt_metadata() {
    let s = Setup::new();
    s.create_md("alpha");
    let meta = s.meta("alpha");
    // Damage both superblock slots (past the magic and version: their checksums fail).
    poke(&meta, 300, &[0x55; 8]);
    poke(&meta, 4096 + 300, &[0x55; 8]);
    s.up_refuses(
        "alpha",
        &[
            &format!("metadata at {} is corrupt", meta.display()),
            "both superblock slots are unusable",
            "twinblk create-md r0 --force",
        ],
    );
}

#[test]
fn up_survives_one_torn_slot() {
    let s = Setup::new();
    s.create_md("alpha");
    poke(&s.meta("alpha"), 300, &[0x55; 8]);
    let o = s.cli("r0", "alpha", &["dump-md", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["slot"], 1, "{v}");
    assert!(v["warnings"][0].as_str().unwrap().contains("slot 0"), "{v}");
}

#[test]
fn up_refuses_another_resources_metadata() {
    let s = Setup::new();
    // r1's alpha created its metadata where r0's alpha looks for its own.
    s.write_config("r1", Some(&s.meta("alpha")));
    let o = s.cli("r1", "alpha", &["create-md"]);
    assert!(o.status.success(), "create-md r1: {}", text(&o));
    s.up_refuses(
        "alpha",
        &[
            &format!("metadata at {}", s.meta("alpha").display()),
            "belongs to resource \"r1\", not \"r0\"",
            "twinblk create-md r0 --force",
        ],
    );
}

#[test]
fn up_refuses_the_other_nodes_metadata() {
    let s = Setup::new();
    s.create_md("alpha");
    std::fs::copy(s.meta("alpha"), s.meta("beta")).unwrap();
    s.up_refuses(
        "beta",
        &[
            &format!("metadata at {}", s.meta("beta").display()),
            "is node \"alpha\"'s, not \"beta\"'s",
            "meta =",
        ],
    );
}

#[test]
fn up_refuses_newer_format() {
    let s = Setup::new();
    s.create_md("alpha");
    let meta = s.meta("alpha");
    for slot in [0, 4096] {
        poke(&meta, slot + 8, &2u32.to_le_bytes());
    }
    s.up_refuses(
        "alpha",
        &[&format!(
            "metadata at {} is version 2, this build reads 1",
            meta.display()
        )],
    );
}

#[test]
fn up_refuses_a_file_that_is_not_metadata() {
    let s = Setup::new();
    // E.g. the JSON stand-in of an older build.
    std::fs::write(s.meta("alpha"), b"{\"version\":1}").unwrap();
    s.up_refuses("alpha", &["is not twinblk metadata", "meta ="]);
}

#[test]
fn create_md_refuses_to_overwrite() {
    let s = Setup::new();
    s.create_md("alpha");
    let meta = s.meta("alpha");
    let before = std::fs::read(&meta).unwrap();
    let o = s.cli("r0", "alpha", &["create-md"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains(&format!("metadata already exists at {}", meta.display()))
            && t.contains("--force"),
        "{t}"
    );
    assert_eq!(std::fs::read(&meta).unwrap(), before);
    // Something that is not metadata is not overwritten either.
    let other = s.meta("beta");
    std::fs::write(&other, b"precious").unwrap();
    let o = s.cli("r0", "beta", &["create-md"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not twinblk metadata"), "{}", text(&o));
    assert_eq!(std::fs::read(&other).unwrap(), b"precious");
    // --force replaces it (a new resource id).
    let o = s.cli("r0", "alpha", &["create-md", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(std::fs::read(&meta).unwrap(), before);
}

#[test]
fn create_md_options_and_limits() {
    let s = Setup::new();
    let o = s.cli(
        "r0",
        "alpha",
        &["create-md", "--bitmap-block", "64K", "--al-extents", "99"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = s.cli("r0", "alpha", &["dump-md", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bitmap_block"], 65536);
    assert_eq!(v["al_extents"], 99);
    assert_eq!(v["bitmap"]["bits"], 1024);
    let o = s.cli("r0", "beta", &["create-md", "--al-extents", "5000"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("give 1 to 1360"), "{}", text(&o));
    let o = s.cli("r0", "beta", &["create-md", "--bitmap-block", "1000"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("power of two"), "{}", text(&o));
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dump_md_shows_what_a_short_run_saved() {
    assert!(
        Path::new(QEMU_IO).is_file(),
        "{QEMU_IO} not found: install the Debian package `qemu-utils`"
    );
    let s = Setup::new();
    s.create_md("alpha");
    let log = std::fs::File::create(s.path("alpha.log")).unwrap();
    let mut d = Daemon(
        Command::new(bin())
            .args(["up", "r0", "--config"])
            .arg(s.path("r0.toml"))
            .args(["--node", "alpha"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while !s.cli("r0", "alpha", &["status"]).status.success() {
        assert!(
            start.elapsed() < WAIT,
            "the daemon never answered: {}",
            std::fs::read_to_string(s.path("alpha.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Alone (beta never comes up): every write is out of sync with the peer.
    let o = s.cli("r0", "alpha", &["primary", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    let uri = format!("nbd+unix:///?socket={}", s.path("r0-alpha.nbd").display());
    let o = Command::new(QEMU_IO)
        .args(["-f", "raw"])
        .args(["-c", "write -P 0xab 1M 64k", "-c", "write -P 0xcd 40M 4k"])
        .arg(&uri)
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-io: {}", text(&o));
    let o = s.cli("r0", "alpha", &["down"]);
    assert!(o.status.success(), "down: {}", text(&o));
    assert!(d.0.wait().unwrap().success());

    let o = s.cli("r0", "alpha", &["dump-md", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["resource"], "r0");
    assert_eq!(v["node"], "alpha");
    assert_eq!(v["size"], 64 << 20);
    assert_eq!(v["disk"], "UpToDate", "{v}");
    assert_ne!(v["current_gen"], 0, "{v}");
    assert_eq!(v["bitmap"]["set_bits"], 17, "{v}");
    assert_eq!(v["bitmap"]["out_of_sync_bytes"], 17 * 4096);
    assert_eq!(
        v["bitmap"]["ranges"],
        serde_json::json!([
            {"offset": 1 << 20, "len": 64 << 10},
            {"offset": 40 << 20, "len": 4096},
        ])
    );
    assert!(v["warnings"].as_array().unwrap().is_empty(), "{v}");

    let o = s.cli("r0", "alpha", &["dump-md"]);
    let t = text(&o);
    for want in [
        "resource:      r0",
        "node:          alpha (id 1)",
        "disk state:    UpToDate",
        "out of sync:   17 blocks, 69632 bytes",
        "1048576..1114112 (64.0 KiB)",
        "activity log:",
    ] {
        assert!(t.contains(want), "dump-md lacks {want:?}:\n{t}");
    }

    // The restart loads it: the daemon comes back with the saved disk state.
    let log = std::fs::File::create(s.path("alpha2.log")).unwrap();
    let _d = Daemon(
        Command::new(bin())
            .args(["up", "r0", "--config"])
            .arg(s.path("r0.toml"))
            .args(["--node", "alpha"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let status = loop {
        let o = s.cli("r0", "alpha", &["status", "--json"]);
        if o.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap();
        }
        assert!(
            start.elapsed() < WAIT,
            "the restarted daemon never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["disk"], "UpToDate", "{status}");
    assert_eq!(status["current_gen"], v["current_gen"], "{status}");
    // While it runs, the metadata is locked against create-md, and dump-md still reads it.
    let o = s.cli("r0", "alpha", &["create-md", "--force"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("in use"), "{}", text(&o));
    // The refusal names the holder: the daemon, by pid.
    assert!(text(&o).contains("(twinblk)"), "{}", text(&o));
    assert!(s.cli("r0", "alpha", &["dump-md"]).status.success());
}
