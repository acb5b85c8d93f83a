//! The command line (clap). Only this edge uses `anyhow`.

mod ops;
mod verify;

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::addr::ListenAddr;
use crate::control::{self, Request, Response};
use crate::disk::{CacheMode, DiskOptions, EngineKind};
use crate::serve::ServeConfig;

/// `serve --poll-us` unless given (measured in `src/disk/uring_inline.rs`).
const POLL_US_DEFAULT: u64 = 100;

#[derive(Debug, Parser)]
#[command(
    name = "twinblk",
    version,
    about = "A replicated block device in userspace"
)]
struct Cli {
    /// Log filter, RUST_LOG syntax (e.g. `info`, `twinblk=debug`). Default: $RUST_LOG, else info.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log format on stderr: human (default) or json (one object per line, for collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a file or block device over NBD (no replication) until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Generate this node's QUIC/TLS identity (NAME.key, NAME.crt) and print its SHA-256 pin.
    Keygen(KeygenArgs),
    /// Create this node's metadata for a resource (once, before the first `up`), where the
    /// resource file's `meta` says (default: DISK.twinblk-meta).
    CreateMd {
        #[command(flatten)]
        res: ResArgs,
        /// Replace existing metadata (this node then needs a full resync).
        #[arg(long)]
        force: bool,
        /// Bytes of disk per dirty-bitmap bit: a power of two from 4K to 1M (suffixes K, M).
        #[arg(long, value_name = "SIZE", value_parser = crate::config::parse_size)]
        bitmap_block: Option<u64>,
        /// Activity-log size in 4 MiB extents: after a crash of the Primary at most this many
        /// extents are resynced (default 1024; at most 1360, or 1020 above 64 TiB).
        #[arg(long, value_name = "N")]
        al_extents: Option<u32>,
    },
    /// Print this node's metadata (superblock, generation ids, bitmap summary, activity log);
    /// reads the file, so it works while the daemon is down.
    DumpMd {
        #[command(flatten)]
        res: ResArgs,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a resource on this node in the foreground (replication, NBD, admin socket) until
    /// SIGINT/SIGTERM or `twinblk down`.
    Up {
        #[command(flatten)]
        res: ResArgs,
        /// Runtime worker threads; 0 runs the daemon on one thread (fastest on the 2-core
        /// machines measured; see `node::daemon::run`).
        #[arg(long, default_value_t = 0, hide = true)]
        threads: usize,
    },
    /// Make this node Primary (`--force` for the first promotion of an Inconsistent disk).
    Primary {
        #[command(flatten)]
        res: ResArgs,
        /// Promote even though this node's disk is not UpToDate (first promotion: its data
        /// becomes the reference and the peer is fully synced from it).
        #[arg(long)]
        force: bool,
    },
    /// Make this node Secondary. Refused while NBD clients have the export open (or a ublk
    /// device is in use).
    Secondary {
        #[command(flatten)]
        res: ResArgs,
        /// Disconnect the NBD clients first (their requests in flight are answered).
        #[arg(long)]
        force: bool,
    },
    /// Show roles, disk states, replication state and resync progress (without a resource:
    /// every resource running on this node).
    Status {
        /// The resource's name. Default: every resource file in --config-dir naming this node
        /// whose admin socket exists.
        resource: Option<String>,
        /// Its resource file. Default: /etc/twinblk/RESOURCE.toml.
        #[arg(long, value_name = "PATH", requires = "resource")]
        config: Option<std::path::PathBuf>,
        /// This node's name in the resource file. Default: $TWINBLK_NODE, else the host name.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Where to look for resource files when no resource is named.
        #[arg(long, value_name = "DIR", default_value = "/etc/twinblk")]
        config_dir: std::path::PathBuf,
        /// Machine-readable JSON (an array without a resource).
        #[arg(long)]
        json: bool,
        /// Also show the generation ids (current, bitmap, history).
        #[arg(long, short)]
        verbose: bool,
        /// Where replicated writes spent their time (per stage, on this node and on the peer)
        /// instead of the status.
        #[arg(long, requires = "resource")]
        latency: bool,
        /// With --latency: over the last this many seconds (1 to 60).
        #[arg(long, value_name = "N", default_value_t = 10, requires = "latency")]
        seconds: u64,
    },
    /// Connect to the peer again (after `disconnect` or a refusal).
    Connect {
        #[command(flatten)]
        res: ResArgs,
        /// Resolve a split brain: this node becomes the sync target and its changes since the
        /// nodes last agreed are overwritten with the peer's data. Run `twinblk secondary` first.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Disconnect from the peer and stay StandAlone.
    Disconnect(ResArgs),
    /// Discard this node's data: it becomes a full sync target of the peer (Secondary only).
    Invalidate(ResArgs),
    /// Re-read the resource file and apply to the running daemon what can change live; print
    /// each changed key and what happened to it. Applied live: the resync rates (c-*), the
    /// split-brain policies (after-sb-*, from the next handshake), on-peer-lost (from the next
    /// loss of the peer) and connect-retry. Applied for the next connection: timeout,
    /// ping-interval, window (QUIC settles them per connection; disconnect + connect to use
    /// them now). Every other key needs a restart (down + up), and the line says why. All or
    /// nothing: an invalid file, or a refused change (on-peer-lost removed while writes are
    /// frozen waiting for it), applies nothing. Run it on both nodes.
    Adjust(ResArgs),
    /// Compare both disks online (connected, both UpToDate) by block digest; blocks that
    /// differ are marked out of sync on both nodes and listed in `status`. Resync them with
    /// `twinblk disconnect` + `twinblk connect`.
    Verify {
        #[command(flatten)]
        res: ResArgs,
        /// Wait until the verify is done; exit non-zero if blocks differ or it stopped early.
        #[arg(long)]
        wait: bool,
    },
    /// Stop the daemon gracefully (finish requests in flight, flush, save metadata). Refused
    /// while NBD clients have the export open (or a ublk device is in use); a resource that
    /// is not running is already down (exit 0).
    Down {
        #[command(flatten)]
        res: ResArgs,
        /// Disconnect the NBD clients first (their requests in flight are answered).
        #[arg(long)]
        force: bool,
    },
    /// Stream state changes (like `drbdsetup events2`) until interrupted.
    Events {
        #[command(flatten)]
        res: ResArgs,
        /// First list the current state as `exists` lines.
        #[arg(long)]
        now: bool,
        /// One JSON object per line (schema in the README).
        #[arg(long)]
        json: bool,
    },
    /// Wait until no resync runs and both disks are UpToDate (progress bar on a terminal).
    /// Fails on a split brain, or when the node stays StandAlone (refused, disconnected).
    WaitSync {
        #[command(flatten)]
        res: ResArgs,
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Print a shell completion script (e.g. `twinblk completions bash > /etc/bash_completion.d/twinblk`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `twinblk man > /usr/local/share/man/man1/twinblk.1`;
    /// with --out-dir, write twinblk.1 and one twinblk-COMMAND.1 per command there.
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Delete /dev/ublkbN left behind by a killed server (instead of `serve --ublk --recover N`):
    /// its pending I/O fails. Refuses a device whose server still runs.
    UblkDel {
        /// N of /dev/ublkbN.
        id: i32,
    },
}

#[derive(Debug, clap::Args)]
struct ResArgs {
    /// The resource's name.
    resource: String,
    /// Its resource file. Default: /etc/twinblk/RESOURCE.toml.
    #[arg(long, value_name = "PATH")]
    config: Option<std::path::PathBuf>,
    /// This node's name in the resource file. Default: $TWINBLK_NODE, else the host name.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
}

impl ResArgs {
    fn config_path(&self) -> std::path::PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| format!("/etc/twinblk/{}.toml", self.resource).into())
    }

    fn node_name(&self) -> anyhow::Result<String> {
        node_name(self.node.as_deref())
    }

    /// Load the resource file and check it names this resource.
    fn load(&self) -> anyhow::Result<(crate::config::Config, String)> {
        let path = self.config_path();
        let cfg = crate::config::Config::load(&path)?;
        if cfg.resource.name != self.resource {
            anyhow::bail!(
                "{} describes resource {:?}, not {:?}; pass the right --config",
                path.display(),
                cfg.resource.name,
                self.resource
            );
        }
        let node = self.node_name()?;
        cfg.node_named(&node)?;
        Ok((cfg, node))
    }

    fn admin_socket(&self) -> anyhow::Result<std::path::PathBuf> {
        let (cfg, node) = self.load()?;
        Ok(cfg.node_named(&node)?.admin.clone())
    }
}

/// This node's name: `--node`, else `$TWINBLK_NODE` (what the systemd unit sets), else the
/// host name.
pub(crate) fn node_name(given: Option<&str>) -> anyhow::Result<String> {
    if let Some(n) = given {
        return Ok(n.to_owned());
    }
    if let Some(n) = std::env::var("TWINBLK_NODE").ok().filter(|n| !n.is_empty()) {
        return Ok(n);
    }
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name (or pass --node, or set TWINBLK_NODE)")?;
    Ok(h.trim().to_owned())
}

#[derive(Debug, clap::Args)]
struct KeygenArgs {
    /// The node's name, as in the resource file's `[node.NAME]` (the certificate's CN).
    #[arg(long)]
    name: String,
    /// Directory for NAME.key (mode 0600) and NAME.crt.
    #[arg(long, value_name = "DIR", default_value = "/etc/twinblk")]
    out: std::path::PathBuf,
    /// Replace existing NAME.key/NAME.crt (the peer's pin must then be updated).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The file or block device to export.
    #[arg(long, value_name = "PATH")]
    disk: std::path::PathBuf,
    /// Where to listen: unix:/path (or a bare path) or tcp:HOST:PORT.
    #[arg(long, value_name = "ADDR", required_unless_present = "ublk")]
    listen: Option<ListenAddr>,
    /// Serve the disk as a kernel block device /dev/ublkbN (Linux >= 6.0, module ublk_drv)
    /// instead of over NBD.
    #[arg(long, conflicts_with = "listen")]
    ublk: bool,
    /// ublk: hardware queues (one serving thread each).
    #[arg(long, default_value_t = 1, requires = "ublk")]
    queues: u16,
    /// ublk: requests in flight per queue.
    #[arg(long, default_value_t = 64, requires = "ublk")]
    depth: u16,
    /// ublk: re-attach to /dev/ublkbN left by a crashed server (the file system on it only
    /// sees a pause).
    #[arg(long, value_name = "N", requires = "ublk")]
    recover: Option<i32>,
    /// Create or extend a regular file to this size (suffixes K, M, G, T: powers of 1024).
    #[arg(long, value_name = "BYTES", value_parser = crate::config::parse_size)]
    size: Option<u64>,
    /// Export read-only: writes fail with EPERM.
    #[arg(long)]
    read_only: bool,
    /// The export's name; clients may also use the empty name.
    #[arg(long, value_name = "NAME", default_value = "twinblk")]
    export: String,
    /// Page cache use: none (O_DIRECT) or writeback.
    #[arg(long, value_enum, default_value_t = Cache::None)]
    cache: Cache,
    /// I/O engine.
    #[arg(long, value_enum, default_value_t = Engine::UringInline)]
    engine: Engine,
    /// Microseconds the uring-inline engine keeps polling for the next completion or request
    /// after the last one before it sleeps, while several I/Os are in flight; 0 never polls.
    /// Uses up to a core under deep-queue load; an idle disk costs nothing.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = POLL_US_DEFAULT)]
    poll_us: u64,
    /// Runtime worker threads; 0 runs everything on one thread.
    #[arg(long, default_value_t = 0, hide = true)]
    threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Cache {
    None,
    Writeback,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Engine {
    Uring,
    Threads,
    UringInline,
}

fn init_logging(level: Option<&str>, format: LogFormat) -> anyhow::Result<()> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).with_context(|| format!("--log-level {l:?}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // A log line that cannot be written (its file system is full, its pipe closed) is lost,
    // never fatal: tracing-subscriber's builder reports such a failure with `eprintln!`, which
    // panics when stderr fails too, so the panic took down whichever task was logging. A disk
    // I/O task logging its own ENOSPC then never reported the completion, and a sync write
    // waited for it forever (a CI run on a full machine: fio hung at 0 % CPU). Off here.
    if format == LogFormat::Json {
        // Fields at the top level, so collectors can index `resource`, `kind`, `to` directly.
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .init();
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .init();
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let cfg = ServeConfig {
        disk: a.disk,
        listen: a.listen,
        ublk: a.ublk.then_some(crate::serve::UblkConfig {
            queues: a.queues,
            depth: a.depth,
            recover: a.recover,
        }),
        export: a.export,
        disk_options: DiskOptions {
            cache: match a.cache {
                Cache::None => CacheMode::None,
                Cache::Writeback => CacheMode::Writeback,
            },
            read_only: a.read_only,
            size: a.size,
            engine: match a.engine {
                Engine::Uring => EngineKind::Uring,
                Engine::Threads => EngineKind::Threads,
                Engine::UringInline => EngineKind::UringInline,
            },
            poll: std::time::Duration::from_micros(a.poll_us),
        },
        threads: a.threads,
    };
    crate::serve::run(cfg)?;
    Ok(())
}

fn create_md(a: ResArgs, opts: crate::node::daemon::CreateMd) -> anyhow::Result<()> {
    let (_, node) = a.load()?;
    let store = crate::node::daemon::create_md(&a.config_path(), &node, &opts)?;
    let l = store.layout();
    println!(
        "{}: metadata for node {node} created at {} ({} bytes; device {} bytes, bitmap block {}, activity log {} extents)",
        a.resource,
        store.path().display(),
        l.total_len(),
        l.size,
        l.bitmap_block,
        l.al_extents
    );
    Ok(())
}

fn dump_md(a: ResArgs, json: bool) -> anyhow::Result<()> {
    let (cfg, node) = a.load()?;
    let path = &cfg.node_named(&node)?.meta;
    let ins = crate::meta::MetaStore::inspect(path, &a.resource)?;
    if json {
        println!("{}", crate::meta::dump::to_json(path, &ins));
    } else {
        print!("{}", crate::meta::dump::human(path, &ins));
    }
    Ok(())
}

fn up(a: ResArgs, threads: usize) -> anyhow::Result<()> {
    let (_, node) = a.load()?;
    crate::node::daemon::run(&a.config_path(), &node, threads)?;
    Ok(())
}

/// The daemon refused an admin request: its text, and its stable code if it has one.
#[derive(Debug)]
struct Refused {
    message: String,
    code: Option<crate::core::AdminErrorCode>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

/// Send one admin request; print its answer, fail on an error answer.
fn admin(res: &ResArgs, req: Request) -> anyhow::Result<()> {
    let path = res.admin_socket()?;
    let mut outcome: anyhow::Result<()> = Err(anyhow::anyhow!(
        "the daemon closed the admin connection without an answer"
    ));
    control::request(&path, &req, |resp| {
        outcome = match resp {
            Response::Ok { message } => {
                println!("{}: {message}", res.resource);
                Ok(())
            }
            Response::Error { message, code } => Err(Refused { message, code }.into()),
            other => Err(anyhow::anyhow!(
                "unexpected answer from the daemon: {other:?}"
            )),
        };
        false
    })?;
    outcome
}

/// `adjust`: the CLI reads the file first (it names the admin socket), so an invalid one is
/// refused here, before the daemon sees it; the daemon reads it again and applies it.
fn adjust(res: &ResArgs) -> anyhow::Result<()> {
    if let Err(e) = res.load() {
        anyhow::bail!("{e:#}; nothing applied");
    }
    admin(res, Request::Adjust)
}

/// `down`, idempotent like `drbdadm down`: a resource that is not running is already down.
fn down(res: &ResArgs, force: bool) -> anyhow::Result<()> {
    match admin(res, Request::Down { force }) {
        Err(e)
            if matches!(
                e.downcast_ref::<control::ControlError>(),
                Some(control::ControlError::NotRunning { .. })
            ) =>
        {
            println!("{}: not running (already down)", res.resource);
            Ok(())
        }
        r => r,
    }
}

/// `primary`: the one refusal that clears by itself within milliseconds (the lost peer's last
/// writes still landing here) is retried for a few seconds instead of failing the failover.
fn promote(res: &ResArgs, force: bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match admin(res, Request::Primary { force }) {
            Err(e)
                if e.downcast_ref::<Refused>().is_some_and(|r| {
                    r.code == Some(crate::core::AdminErrorCode::PeerWritesLanding)
                }) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

fn status(res: &ResArgs, json: bool, verbose: bool) -> anyhow::Result<()> {
    let path = res.admin_socket()?;
    let s = ops::query(&path)??;
    if json {
        println!("{s}");
        return Ok(());
    }
    print!("{}", human_status(&s, verbose));
    Ok(())
}

/// `status --latency`: the daemon's breakdown as a table (or its JSON).
fn latency(res: &ResArgs, json: bool, seconds: u64) -> anyhow::Result<()> {
    let path = res.admin_socket()?;
    let v = ops::query_for(&path, &Request::Latency { seconds }, "latency breakdown")??;
    if json {
        println!("{v}");
    } else {
        print!("{}", crate::latency::table(&v));
        if v.get("measuring").and_then(|m| m.as_bool()) == Some(false) {
            println!("  (the daemon runs with TWINBLK_LATENCY=off: nothing is measured)");
        }
    }
    Ok(())
}

fn human_status(s: &serde_json::Value, verbose: bool) -> String {
    use std::fmt::Write;
    let f = |k: &str| match s.get(k) {
        Some(serde_json::Value::String(v)) => v.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    };
    // Sizes as people read them (the JSON keeps bytes).
    let size = |k: &str| match s.get(k).and_then(|v| v.as_u64()) {
        Some(n) => crate::meta::dump::human_bytes(n),
        None => f(k),
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} ({}, protocol {})",
        f("resource"),
        size("size"),
        f("protocol")
    );
    let _ = writeln!(o, "  role:        {}    disk: {}", f("role"), f("disk"));
    let _ = writeln!(
        o,
        "  peer:        {}    disk: {}",
        f("peer_role"),
        f("peer_disk")
    );
    let _ = writeln!(o, "  replication: {}", f("repl"));
    // A peer that died still shows as connected until the timeout: say how long it has been
    // silent (keep-alives arrive every `ping-interval`, so a few seconds is already news).
    if let (Some(ago), Some(timeout)) = (
        s.get("peer_last_heard_secs").and_then(|v| v.as_u64()),
        s.get("peer_timeout_secs").and_then(|v| v.as_u64()),
    ) {
        if ago >= 2 {
            let _ = writeln!(
                o,
                "  peer last heard {ago} s ago: declared dead after {timeout} s without a word \
                 (`timeout`), then this node can be promoted"
            );
        }
    }
    if let Some(dev) = s.get("ublk_device").and_then(|d| d.as_str()) {
        let _ = writeln!(o, "  device:      {dev}");
    }
    if let Some(h) = s
        .get("handover")
        .and_then(|h| h.get("message"))
        .and_then(|m| m.as_str())
    {
        let _ = writeln!(o, "  handover:    {h}");
    }
    let _ = writeln!(o, "  out of sync: {}", size("out_of_sync_bytes"));
    if let Some(p) = s
        .get("resync")
        .and_then(|r| r.get("percent"))
        .and_then(|p| p.as_f64())
    {
        let rate = s.get("resync").and_then(|r| r.get("rate_bytes_per_sec"));
        let eta = s.get("resync").and_then(|r| r.get("eta_secs"));
        let mut line = format!("  resync:      {p:.1}% done");
        if let Some(r) = rate.and_then(|r| r.as_u64()) {
            line += &format!(", {:.1} MiB/s", r as f64 / (1u64 << 20) as f64);
        }
        if let Some(e) = eta.and_then(|e| e.as_u64()) {
            line += &format!(", {}m{:02}s left", e / 60, e % 60);
        }
        let _ = writeln!(o, "{line}");
    }
    if let Some(v) = s.get("verify").filter(|v| !v.is_null()) {
        o += &verify::human(v);
    }
    if let Some(sb) = s.get("split_brain").filter(|v| !v.is_null()) {
        let g = |k: &str| match sb.get(k) {
            Some(serde_json::Value::String(v)) => v.clone(),
            Some(serde_json::Value::Null) | None => "-".into(),
            Some(v) => v.to_string(),
        };
        let _ = writeln!(
            o,
            "  SPLIT BRAIN: both nodes wrote data since they last agreed"
        );
        let _ = writeln!(
            o,
            "    this node (id {}): generation {}, {} blocks changed ({} bytes)",
            g("node_id"),
            g("current_gen"),
            g("changed_blocks"),
            g("changed_bytes")
        );
        let _ = writeln!(
            o,
            "    peer      (id {}): generation {}, {} blocks changed ({} bytes)",
            g("peer_node_id"),
            g("peer_current_gen"),
            g("peer_changed_blocks"),
            g("peer_changed_bytes")
        );
        let _ = writeln!(o, "    last common generation: {}", g("common_gen"));
        for (k, what) in [
            ("keep_this_nodes_data", "to keep THIS node's data"),
            ("keep_peers_data", "to keep the PEER's data"),
        ] {
            let _ = writeln!(o, "    {what}:");
            for c in sb.get(k).and_then(|v| v.as_array()).into_iter().flatten() {
                let _ = writeln!(o, "      {}", c.as_str().unwrap_or("-"));
            }
        }
    }
    if let Some(gens) = s.get("generations").filter(|_| verbose) {
        let _ = writeln!(o, "  generations: {gens}");
    }
    for (k, label) in [
        ("last_refusal", "last refusal"),
        ("last_auth_error", "certificate"),
        ("last_connection_error", "connection"),
    ] {
        let connected = s.get("connected").and_then(|c| c.as_bool()) == Some(true);
        // While a certificate is refused, the connection error only repeats it.
        let auth = s.get("last_auth_error").and_then(|a| a.as_str());
        let repeats = auth.is_some_and(|a| f(k).contains(a));
        if k == "last_connection_error" && (connected || repeats) {
            continue;
        }
        if !matches!(s.get(k), None | Some(serde_json::Value::Null)) {
            let _ = writeln!(o, "  {label}: {}", f(k));
        }
    }
    o
}

/// The man page(s), from the same definitions as `--help`.
fn man(out_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    let Some(dir) = out_dir else {
        return clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("writing the man page");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, c: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))
    };
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("twinblk-{}", sub.get_name());
        // clap wants a &'static name; this command exits right after writing the pages.
        let full: &'static str = name.clone().leak();
        write(&name, sub.clone().name(full))?;
    }
    write("twinblk", cmd)?;
    println!("man pages written to {}", dir.display());
    Ok(())
}

fn keygen(a: KeygenArgs) -> anyhow::Result<()> {
    // Checked here too: a key the resource file cannot name would only fail at `up`.
    crate::config::check_node_name(&a.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (key, crt, pin) = crate::net::keys::keygen(&a.name, &a.out, a.force)?;
    eprintln!("wrote {} and {}", key.display(), crt.display());
    println!("{pin}");
    Ok(())
}

/// The error and its causes, each said once: our error types already put their source into
/// their own message, so printing the whole chain would repeat it.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
    }
    out
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Up { .. } | Command::Serve(_)) {
        // A command whose output goes to `head` or a closed pager ends quietly, like any Unix
        // tool, instead of "Broken pipe" (or a panic from println!). Not the daemons: they
        // write to sockets, where a vanished peer must be an error, not a signal.
        // SAFETY: no other thread runs yet; SIG_DFL is a valid disposition for SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = init_logging(cli.log_level.as_deref(), cli.log_format) {
        eprintln!("twinblk: {e:#}");
        return ExitCode::from(2);
    }
    let r = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Keygen(a) => keygen(a),
        Command::CreateMd {
            res,
            force,
            bitmap_block,
            al_extents,
        } => create_md(
            res,
            crate::node::daemon::CreateMd {
                force,
                bitmap_block,
                al_extents,
            },
        ),
        Command::DumpMd { res, json } => dump_md(res, json),
        Command::Up { res, threads } => up(res, threads),
        Command::Primary { res, force } => promote(&res, force),
        Command::Secondary { res, force } => admin(&res, Request::Secondary { force }),
        Command::Status {
            resource: Some(resource),
            config,
            node,
            json,
            latency: true,
            seconds,
            ..
        } => latency(
            &ResArgs {
                resource,
                config,
                node,
            },
            json,
            seconds,
        ),
        Command::Status {
            resource: Some(resource),
            config,
            node,
            json,
            verbose,
            ..
        } => status(
            &ResArgs {
                resource,
                config,
                node,
            },
            json,
            verbose,
        ),
        Command::Status {
            resource: None,
            node,
            config_dir,
            json,
            ..
        } => ops::status_all(&config_dir, node.as_deref(), json),
        Command::Connect {
            res,
            discard_my_data,
        } => admin(&res, Request::Connect { discard_my_data }),
        Command::Disconnect(res) => admin(&res, Request::Disconnect),
        Command::Invalidate(res) => admin(&res, Request::Invalidate),
        Command::Adjust(res) => adjust(&res),
        Command::Verify { res, wait } => verify::verify(&res, wait),
        Command::Down { res, force } => down(&res, force),
        Command::Events { res, now, json } => ops::events(&res, now, json),
        Command::WaitSync { res, timeout } => ops::wait_sync(&res, timeout),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "twinblk",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out_dir } => man(out_dir.as_deref()),
        Command::UblkDel { id } => twinblk_ublk::delete(id)
            .map(|()| println!("deleted /dev/ublkb{id}"))
            .map_err(Into::into),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinblk: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}
