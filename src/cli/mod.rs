//! The command line (clap). Only this edge uses `anyhow`.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::addr::ListenAddr;
use crate::disk::{CacheMode, DiskOptions, EngineKind};
use crate::serve::ServeConfig;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a file or block device over NBD (no replication) until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Generate this node's QUIC/TLS identity (NAME.key, NAME.crt) and print its SHA-256 pin.
    Keygen(KeygenArgs),
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
    #[arg(long, value_enum, default_value_t = Engine::Uring)]
    engine: Engine,
    /// Runtime worker threads; 0 runs everything on one thread.
    #[arg(long, default_value_t = 0, hide = true)]
    threads: usize,
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

fn init_logging(level: Option<&str>) -> anyhow::Result<()> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).with_context(|| format!("--log-level {l:?}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        },
        threads: a.threads,
    };
    crate::serve::run(cfg)?;
    Ok(())
}

fn keygen(a: KeygenArgs) -> anyhow::Result<()> {
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
    if let Err(e) = init_logging(cli.log_level.as_deref()) {
        eprintln!("twinblk: {e:#}");
        return ExitCode::from(2);
    }
    let r = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Keygen(a) => keygen(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinblk: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}
