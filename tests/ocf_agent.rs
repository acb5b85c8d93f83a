//! tools/ocf/twinblk, the Pacemaker resource agent, against real daemons: each action called
//! directly with its OCF return code checked, then Debian's `ocf-tester` (package
//! resource-agents) over the whole agent. Alpha is run by the agent, beta by the test.
//!
//! No cluster runs here (tests/cluster.rs has the real one), so a real crm_master could not
//! reach a CIB. A recording stand-in first on PATH (a test double at the edge: the only thing not
//! real in this test) logs the score the agent sets, so the test can check that only an UpToDate
//! node gets one. Without the stand-in, PATH hides Pacemaker's own tools (`.ci/run` installs
//! them for the cluster test), as on a node without Pacemaker.

mod ops_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ops_common::Pair;

const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_ERR_UNIMPLEMENTED: i32 = 3;
const OCF_ERR_INSTALLED: i32 = 5;
const OCF_ERR_CONFIGURED: i32 = 6;
const OCF_NOT_RUNNING: i32 = 7;
const OCF_RUNNING_MASTER: i32 = 8;

const OCF_TESTER: &str = "/usr/sbin/ocf-tester";

fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/ocf/twinblk")
}

struct Agent<'a> {
    p: &'a Pair,
    /// Directory with the crm_master stand-in; `None`: PATH without Pacemaker's tools.
    stub: Option<PathBuf>,
    config: PathBuf,
}

/// The tools the agent would take for a promotion score.
const PACEMAKER_TOOLS: [&str; 2] = ["crm_master", "crm_attribute"];

/// `path` with every directory holding a Pacemaker tool replaced by a directory of links to
/// everything else in it: the agent then runs as on a node without Pacemaker.
fn path_without_pacemaker(p: &Pair, path: &str) -> String {
    let mut dirs = Vec::new();
    for (i, dir) in path.split(':').enumerate() {
        let dir = Path::new(dir);
        if !PACEMAKER_TOOLS.iter().any(|t| dir.join(t).exists()) {
            dirs.push(dir.display().to_string());
            continue;
        }
        let shadow = p.path(&format!("path-without-pacemaker-{i}"));
        if !shadow.exists() {
            std::fs::create_dir_all(&shadow).unwrap();
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name();
                if !PACEMAKER_TOOLS.iter().any(|t| name == *t) {
                    let _ = std::os::unix::fs::symlink(e.path(), shadow.join(&name));
                }
            }
        }
        dirs.push(shadow.display().to_string());
    }
    dirs.join(":")
}

impl Agent<'_> {
    fn cmd(&self) -> Command {
        let mut c = Command::new(agent());
        let path = std::env::var("PATH").unwrap_or_default();
        let path = match &self.stub {
            Some(d) => format!("{}:{path}", d.display()),
            None => path_without_pacemaker(self.p, &path),
        };
        c.env("PATH", path)
            .env("OCF_ROOT", "/usr/lib/ocf")
            .env("OCF_RESOURCE_INSTANCE", "r0")
            .env("OCF_RESKEY_resource", "r0")
            .env("OCF_RESKEY_config", &self.config)
            .env("OCF_RESKEY_node", "alpha")
            .env("OCF_RESKEY_binary", ops_common::bin())
            .env("OCF_RESKEY_log_file", self.p.path("alpha-ocf.log"))
            .env("OCF_RESKEY_CRM_meta_timeout", "60000")
            .env("OCF_RESKEY_CRM_meta_interval", "20000")
            .env("HA_RSCTMP", self.p.path("rsctmp"));
        c
    }

    fn run(&self, action: &str) -> Output {
        self.cmd().arg(action).output().unwrap()
    }

    /// Runs `action` and checks its return code.
    fn expect(&self, action: &str, rc: i32) -> Output {
        let o = self.run(action);
        assert_eq!(
            o.status.code(),
            Some(rc),
            "{action}: {}\n{}\n--- alpha (agent) log ---\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.p.logs(),
            std::fs::read_to_string(self.p.path("alpha-ocf.log")).unwrap_or_default()
        );
        o
    }

    /// The calls of the crm_master stand-in so far.
    fn scores(&self) -> Vec<String> {
        std::fs::read_to_string(self.p.path("crm_master.calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn last_score(&self) -> String {
        self.scores().last().cloned().unwrap_or_default()
    }
}

fn setup() -> (Pair, PathBuf) {
    let p = Pair::configure_with("64M", "", ["", ""]);
    let stub = p.path("stub");
    std::fs::create_dir_all(&stub).unwrap();
    let crm = stub.join("crm_master");
    std::fs::write(
        &crm,
        format!(
            "#!/bin/sh\necho \"$OCF_RESOURCE_INSTANCE $*\" >> {}\n",
            p.path("crm_master.calls").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&crm, std::fs::Permissions::from_mode(0o755)).unwrap();
    (p, stub)
}

#[test]
fn agent_actions_return_ocf_codes_and_scores_follow_the_disk() {
    let (mut p, stub) = setup();
    // Beta runs throughout, Inconsistent like alpha until it is made the reference below.
    p.start_and_wait(1);
    let a = Agent {
        p: &p,
        stub: Some(stub),
        config: p.config.clone(),
    };

    let o = a.expect("meta-data", OCF_SUCCESS);
    let xml = String::from_utf8_lossy(&o.stdout);
    assert!(xml.contains("<resource-agent name=\"twinblk\""), "{xml}");
    assert!(xml.contains("<version>1.1</version>"), "{xml}");
    assert!(xml.contains("role=\"Promoted\""), "{xml}");
    a.expect("validate-all", OCF_SUCCESS);
    a.expect("no-such-action", OCF_ERR_UNIMPLEMENTED);
    let missing = Agent {
        p: &p,
        stub: None,
        config: p.path("missing.toml"),
    };
    missing.expect("validate-all", OCF_ERR_INSTALLED);
    let o = missing
        .cmd()
        .env_remove("OCF_RESKEY_resource")
        .arg("validate-all")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(OCF_ERR_CONFIGURED), "{o:?}");

    // Not running: monitor says so, stop succeeds, promote/demote cannot.
    a.expect("monitor", OCF_NOT_RUNNING);
    a.expect("stop", OCF_SUCCESS);

    // A fresh node is Inconsistent: running Secondary, no promotion score, promote refused.
    a.expect("start", OCF_SUCCESS);
    a.expect("monitor", OCF_SUCCESS);
    assert_eq!(a.last_score(), "r0 -Q -l reboot -D", "{:?}", a.scores());
    a.expect("promote", OCF_ERR_GENERIC);
    assert_eq!(p.status(0).unwrap()["role"], "Secondary");

    // Beta becomes the reference and syncs alpha: alpha is UpToDate, its score is set.
    let o = p.cli(1, &["primary", "--force"]);
    assert!(o.status.success(), "beta primary --force: {o:?}");
    p.wait_in_sync();
    a.expect("monitor", OCF_SUCCESS);
    assert_eq!(
        a.last_score(),
        "r0 -Q -l reboot -v 10000",
        "{:?}",
        a.scores()
    );
    a.expect("notify", OCF_SUCCESS);
    let o = p.cli(1, &["secondary"]);
    assert!(o.status.success(), "beta secondary: {o:?}");

    // Promote and demote, each twice (idempotent), with monitor telling the roles apart.
    a.expect("promote", OCF_SUCCESS);
    a.expect("promote", OCF_SUCCESS);
    a.expect("monitor", OCF_RUNNING_MASTER);
    assert_eq!(p.status(0).unwrap()["role"], "Primary");
    a.expect("demote", OCF_SUCCESS);
    a.expect("demote", OCF_SUCCESS);
    a.expect("monitor", OCF_SUCCESS);
    assert_eq!(p.status(0).unwrap()["role"], "Secondary");

    // Starting a started resource succeeds; stop removes the score and really stops.
    a.expect("start", OCF_SUCCESS);
    a.expect("stop", OCF_SUCCESS);
    assert_eq!(a.last_score(), "r0 -Q -l reboot -D", "{:?}", a.scores());
    assert!(p.status(0).is_none(), "alpha still answers after stop");
    a.expect("monitor", OCF_NOT_RUNNING);
    a.expect("stop", OCF_SUCCESS);
    a.expect("promote", OCF_NOT_RUNNING);

    // Without Pacemaker's tools the agent still works: it only logs that it skipped the score.
    let bare = Agent {
        p: &p,
        stub: None,
        config: p.config.clone(),
    };
    let calls = a.scores().len();
    bare.expect("start", OCF_SUCCESS);
    let o = bare.expect("monitor", OCF_SUCCESS);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no crm_master"),
        "{o:?}"
    );
    bare.expect("stop", OCF_SUCCESS);
    assert_eq!(
        a.scores().len(),
        calls,
        "the stand-in was called without being on PATH"
    );
    drop(a);
    p.kill(1);
}

#[test]
fn ocf_tester_passes() {
    assert!(
        Path::new(OCF_TESTER).is_file(),
        "{OCF_TESTER} not found: install the Debian package resource-agents (and libxml2-utils \
         for xmllint)"
    );
    let (mut p, stub) = setup();
    // Both nodes UpToDate, both Secondary: the state Pacemaker would start the clone in.
    p.start_and_wait(0);
    p.start_and_wait(1);
    let o = p.cli(0, &["primary", "--force"]);
    assert!(o.status.success(), "primary --force: {o:?}");
    p.wait_in_sync();
    let o = p.cli(0, &["secondary"]);
    assert!(o.status.success(), "secondary: {o:?}");
    // From here on the agent runs alpha (the tester begins by stopping what runs).
    let _ = p.cli(0, &["down"]);
    if let Some(mut c) = p.children[0].take() {
        c.wait().unwrap();
    }

    let a = Agent {
        p: &p,
        stub: Some(stub),
        config: p.config.clone(),
    };
    // The agent's environment (PATH with the stand-in, HA_RSCTMP) for the tester.
    let t = a.cmd();
    let envs: Vec<_> = t
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned())))
        .collect();
    let o = Command::new(OCF_TESTER)
        .envs(envs)
        .arg("-v")
        .args(["-n", "r0"])
        .args(["-o", "resource=r0"])
        .arg("-o")
        .arg(format!("config={}", p.config.display()))
        .args(["-o", "node=alpha"])
        .arg("-o")
        .arg(format!("binary={}", ops_common::bin()))
        .arg("-o")
        .arg(format!("log_file={}", p.path("alpha-ocf.log").display()))
        .arg(agent())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("passed all tests"),
        "ocf-tester: {}\n{}\n{}\n--- agent-run daemon log ---\n{}",
        out,
        String::from_utf8_lossy(&o.stderr),
        p.logs(),
        std::fs::read_to_string(p.path("alpha-ocf.log")).unwrap_or_default()
    );
    // The tester promoted alpha: only possible with the score of an UpToDate disk.
    assert!(
        a.scores().iter().any(|s| s == "r0 -Q -l reboot -v 10000"),
        "{:?}",
        a.scores()
    );
    a.expect("monitor", OCF_NOT_RUNNING);
    drop(a);
    p.kill(1);
}
