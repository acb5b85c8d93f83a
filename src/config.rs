//! Resource configuration: one TOML file per resource, shared verbatim by both nodes.
//!
//! ```toml
//! [resource]
//! name = "r0"
//! protocol = "sync"
//! [node.alpha]
//! address = "127.0.0.1:7789"
//! disk    = "/var/lib/twinblk/r0-alpha.img"
//! meta    = "/var/lib/twinblk/r0-alpha.meta"   # optional: default <disk>.twinblk-meta
//! nbd     = "unix:/run/twinblk/r0-alpha.nbd"
//! admin   = "/run/twinblk/r0-alpha.sock"
//! cert    = "/etc/twinblk/alpha.crt"
//! key     = "/etc/twinblk/alpha.key"
//! [node.beta]
//! # same keys
//! ```
//!
//! Parsing happens in two steps: serde reads the text into `Raw*` structs (unknown keys are refused
//! there), then [`Config::validate`] turns strings like `"5s"` and `"64M"` into typed values and
//! checks the cross-field rules. Every error names the file, the key and what to do about it,
//! because the person reading it is usually an operator at a console, not a developer.
//! docs/resource-file.md documents every key; keep it in step with the defaults below.

use crate::addr::ListenAddr;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default `protocol`.
pub const DEFAULT_PROTOCOL: Protocol = Protocol::Sync;
/// Default `send-buffer`: how many bytes of write extents an async primary may queue for the
/// peer before it goes Ahead (marks the bitmap instead of queueing).
pub const DEFAULT_SEND_BUFFER: u64 = 64 << 20;
/// Default `ping-interval`: QUIC keep-alive period; keeps the idle timer of a quiet link from firing.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(1);
/// Default `timeout`: a peer silent this long is declared dead (QUIC idle timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `connect-retry`: the cap of the exponential reconnect backoff (which starts at 100 ms).
pub const DEFAULT_CONNECT_RETRY: Duration = Duration::from_secs(5);
/// Default `data-streams`: long-lived QUIC streams per direction that carry write extents, so
/// that one lost packet stalls only the writes on its stream.
pub const DEFAULT_DATA_STREAMS: u8 = 4;
/// Default `window`: QUIC per-stream and per-connection receive window and the send window.
/// Must be at least the bandwidth-delay product of the link; 32 MiB covers 10 Gbit/s at 25 ms.
pub const DEFAULT_WINDOW: u64 = 32 << 20;

/// Default `c-max-rate`: 0 = no cap (the fill target and the link bound the resync).
pub const DEFAULT_C_MAX_RATE: u64 = 0;
/// Default `c-fill-target`: resync bytes in flight (read, sent, not acked).
pub const DEFAULT_C_FILL_TARGET: u64 = crate::core::ratectl::DEFAULT_FILL_TARGET;
/// Default `c-plan-ahead`: the controller's time constant.
pub const DEFAULT_C_PLAN_AHEAD: Duration =
    Duration::from_nanos(crate::core::ratectl::DEFAULT_PLAN_AHEAD);
/// Default `c-min-rate`: the resync rate kept while applications do I/O (bytes/s).
pub const DEFAULT_C_MIN_RATE: u64 = crate::core::ratectl::DEFAULT_MIN_RATE;

/// Default `idle-poll`: idle CPUs keep polling this long after the last replicated write
/// (`node::idle_poll`), so a client writing every few milliseconds keeps the fast wake-ups
/// while a quiet device costs nothing.
pub const DEFAULT_IDLE_POLL: Duration = Duration::from_millis(10);
/// Longest `idle-poll`.
pub const MAX_IDLE_POLL: Duration = Duration::from_secs(60);

/// Default `max-mtu`: upper bound of QUIC path MTU discovery (UDP payload bytes). Discovery
/// probes up to it and keeps what the path carries: on 1500-byte Ethernet a larger probe fails
/// (EMSGSIZE locally, or is dropped on the way) and the connection stays near 1452, at no
/// measured cost; on loopback or a jumbo-frame link it gets 6500-byte packets, which cut the CPU
/// per byte (1M writes about 1.7x faster over a 9000-MTU veth pair, measured session 4).
pub const DEFAULT_MAX_MTU: u16 = MAX_MAX_MTU;
/// Largest `max-mtu`: quinn sends up to 10 datagrams per GSO call and the kernel caps a GSO
/// send at 64 KiB, so bigger datagrams fail to send and discovery falls back to 1200.
pub const MAX_MAX_MTU: u16 = 6500;

/// How a node exposes the replicated device to its applications (`frontend` in `[node.NAME]`).
/// NBD is always served (the `nbd` key): it is how tools, backups and tests reach the device;
/// `Ublk` adds a kernel block device `/dev/ublkbN` on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Frontend {
    /// Only the NBD export.
    #[default]
    Nbd,
    /// The NBD export and `/dev/ublkbN` (Linux >= 6.0, module `ublk_drv`, root).
    Ublk,
}

/// Replication protocol, DRBD's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// DRBD C: a write completes when both disks have it.
    Sync,
    /// DRBD A: a write completes when the local disk has it and the extent is queued for the peer.
    Async,
}

/// A validated resource file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from (`<string>` when parsed from text), for error messages.
    pub source: PathBuf,
    pub resource: Resource,
    /// Exactly two nodes, sorted by name.
    pub nodes: Vec<Node>,
}

/// The `[resource]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    pub protocol: Protocol,
    pub send_buffer: u64,
    pub ping_interval: Duration,
    pub timeout: Duration,
    pub connect_retry: Duration,
    pub data_streams: u8,
    pub window: u64,
    pub max_mtu: u16,
    /// Split-brain policy with no Primary (`after-sb-0pri`).
    pub after_sb_0pri: crate::core::AfterSb0Pri,
    /// Split-brain policy with one Primary (`after-sb-1pri`).
    pub after_sb_1pri: crate::core::AfterSb1Pri,
    /// `csums`: checksum-based resync (the target's digests first; data moves only where
    /// they differ). Default off.
    pub csums: bool,
    /// `al-updates`: activity-log transactions (DRBD's disk option). Default on; off saves
    /// the transactions, but a Primary that crashes then resyncs the whole device.
    pub al_updates: bool,
    /// `on-peer-lost`: the command a Primary runs (and waits for) when it loses an UpToDate
    /// peer, before writes continue without it; `None`: continue at once.
    pub on_peer_lost: Option<PathBuf>,
    /// `c-max-rate`: resync cap in bytes/s, 0 = none.
    pub c_max_rate: u64,
    /// `c-fill-target`: resync bytes in flight.
    pub c_fill_target: u64,
    /// `c-plan-ahead`: the resync controller's time constant.
    pub c_plan_ahead: Duration,
    /// `c-min-rate`: resync rate kept while applications do I/O (bytes/s), 0 = no back-off.
    pub c_min_rate: u64,
    /// `on-congestion` (async): block, or pull ahead past `congestion-fill`.
    pub on_congestion: crate::core::congestion::OnCongestion,
    /// `congestion-fill`: the send-buffer mark where pull-ahead starts (0 = off).
    pub congestion_fill: u64,
    /// `idle-poll`: how long after the last replicated write idle CPUs keep polling
    /// (`node::idle_poll`); zero (`"off"`) never.
    pub idle_poll: Duration,
}

impl Resource {
    /// The resync rate controller's settings for the core.
    pub fn resync_rate(&self) -> crate::core::ratectl::RateConfig {
        crate::core::ratectl::RateConfig {
            max_rate: self.c_max_rate,
            fill_target: self.c_fill_target,
            plan_ahead: u64::try_from(self.c_plan_ahead.as_nanos()).unwrap_or(u64::MAX),
            min_rate: self.c_min_rate,
        }
    }

    /// The congestion settings for the core.
    pub fn congestion(&self) -> crate::core::congestion::Congestion {
        crate::core::congestion::Congestion {
            on_congestion: self.on_congestion,
            fill: self.congestion_fill,
        }
    }
}

/// One `[node.NAME]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub address: SocketAddr,
    pub disk: PathBuf,
    /// This node's metadata area (file or block device); default `<disk>.twinblk-meta`.
    pub meta: PathBuf,
    pub nbd: ListenAddr,
    pub admin: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Create or extend the disk file to this many bytes; `None`: use the disk as it is.
    pub size: Option<u64>,
    /// `sha256:<64 hex>` of the node's DER certificate; `None`: computed from `cert` when needed.
    pub pin: Option<String>,
    /// Serve Prometheus metrics over HTTP here; `None` (the default): no metrics listener.
    pub metrics: Option<SocketAddr>,
    /// Per node, not per resource: the two machines may run different kernels.
    pub frontend: Frontend,
    /// `frontend = "ublk"`: hardware queues (one serving thread each) and depth per queue.
    pub ublk_queues: u16,
    pub ublk_depth: u16,
}

/// What went wrong reading a resource file. The `Display` text is meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read resource file: {source}; check the path and its permissions")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: key `{key}`: {problem}; {fix}")]
    Invalid {
        file: PathBuf,
        key: String,
        problem: String,
        fix: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    resource: RawResource,
    #[serde(default)]
    node: BTreeMap<String, RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawResource {
    name: String,
    protocol: Option<String>,
    send_buffer: Option<String>,
    ping_interval: Option<String>,
    timeout: Option<String>,
    connect_retry: Option<String>,
    data_streams: Option<i64>,
    window: Option<String>,
    max_mtu: Option<i64>,
    #[serde(rename = "after-sb-0pri")]
    after_sb_0pri: Option<String>,
    #[serde(rename = "after-sb-1pri")]
    after_sb_1pri: Option<String>,
    on_peer_lost: Option<PathBuf>,
    csums: Option<bool>,
    al_updates: Option<bool>,
    c_max_rate: Option<String>,
    c_fill_target: Option<String>,
    c_plan_ahead: Option<String>,
    c_min_rate: Option<String>,
    on_congestion: Option<String>,
    congestion_fill: Option<String>,
    idle_poll: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNode {
    address: String,
    disk: PathBuf,
    meta: Option<PathBuf>,
    nbd: String,
    admin: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    size: Option<String>,
    pin: Option<String>,
    metrics: Option<String>,
    frontend: Option<String>,
    ublk_queues: Option<u16>,
    ublk_depth: Option<u16>,
}

impl Config {
    /// Reads and validates a resource file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses resource-file text; `source` is only used to name the file in errors.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: source.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Self::validate(raw, source)
    }

    /// Parses resource-file text that came from no file (errors name `<string>`).
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str) -> Result<Config, ConfigError> {
        Self::parse(text, Path::new("<string>"))
    }

    fn validate(raw: RawConfig, file: &Path) -> Result<Config, ConfigError> {
        let bad = |key: &str, problem: String, fix: &str| ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            problem,
            fix: fix.to_string(),
        };
        let r = raw.resource;
        if !valid_name(&r.name) {
            return Err(bad(
                "resource.name",
                format!("{:?} is not a valid name", r.name),
                NAME_RULE,
            ));
        }
        let protocol = match r.protocol.as_deref() {
            None => DEFAULT_PROTOCOL,
            Some("sync") => Protocol::Sync,
            Some("async") => Protocol::Async,
            Some(other) => {
                return Err(bad(
                    "resource.protocol",
                    format!("unknown protocol {other:?}"),
                    "use \"sync\" (write done when both disks have it) or \"async\" (done when the local disk has it)",
                ))
            }
        };
        use crate::core::{AfterSb0Pri, AfterSb1Pri};
        let after_sb_0pri = match r.after_sb_0pri.as_deref() {
            None | Some("disconnect") => AfterSb0Pri::Disconnect,
            Some("discard-zero-changes") => AfterSb0Pri::DiscardZeroChanges,
            Some("discard-younger-primary") => AfterSb0Pri::DiscardYoungerPrimary,
            Some("discard-least-changes") => AfterSb0Pri::DiscardLeastChanges,
            Some(other) => {
                return Err(bad(
                    "resource.after-sb-0pri",
                    format!("unknown policy {other:?}"),
                    "use \"disconnect\" (default: the operator decides), \"discard-zero-changes\", \"discard-younger-primary\" or \"discard-least-changes\"",
                ))
            }
        };
        let after_sb_1pri =
            match r.after_sb_1pri.as_deref() {
                None | Some("disconnect") => AfterSb1Pri::Disconnect,
                Some("discard-secondary") => AfterSb1Pri::DiscardSecondary,
                Some(other) => return Err(bad(
                    "resource.after-sb-1pri",
                    format!("unknown policy {other:?}"),
                    "use \"disconnect\" (default: the operator decides) or \"discard-secondary\"",
                )),
            };
        let size_key = |key: &str, v: Option<&String>, default: u64| -> Result<u64, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) => parse_size(s).map_err(|p| bad(key, p, SIZE_RULE)),
            }
        };
        let dur_key =
            |key: &str, v: Option<&String>, default: Duration| -> Result<Duration, ConfigError> {
                match v {
                    None => Ok(default),
                    Some(s) => match parse_duration(s) {
                        Ok(d) if d.is_zero() => Err(bad(
                            key,
                            "a zero duration".into(),
                            "give a positive duration such as \"500ms\" or \"5s\"",
                        )),
                        Ok(d) => Ok(d),
                        Err(p) => Err(bad(key, p, DURATION_RULE)),
                    },
                }
            };
        let send_buffer = size_key(
            "resource.send-buffer",
            r.send_buffer.as_ref(),
            DEFAULT_SEND_BUFFER,
        )?;
        let window = size_key("resource.window", r.window.as_ref(), DEFAULT_WINDOW)?;
        if !(64 << 10..=1 << 30).contains(&window) {
            return Err(bad(
                "resource.window",
                format!("{window} bytes is out of range"),
                "give a size between 64K and 1G, at least the link's bandwidth times its round-trip time",
            ));
        }
        let ping_interval = dur_key(
            "resource.ping-interval",
            r.ping_interval.as_ref(),
            DEFAULT_PING_INTERVAL,
        )?;
        let timeout = dur_key("resource.timeout", r.timeout.as_ref(), DEFAULT_TIMEOUT)?;
        let connect_retry = dur_key(
            "resource.connect-retry",
            r.connect_retry.as_ref(),
            DEFAULT_CONNECT_RETRY,
        )?;
        if ping_interval >= timeout {
            return Err(bad(
                "resource.ping-interval",
                format!(
                    "ping-interval ({ping_interval:?}) is not shorter than timeout ({timeout:?}), so a quiet but healthy link would time out"
                ),
                "make ping-interval a fraction of timeout, e.g. ping-interval = \"1s\" with timeout = \"5s\"",
            ));
        }
        let data_streams = match r.data_streams {
            None => DEFAULT_DATA_STREAMS,
            Some(n @ 1..=64) => n as u8,
            Some(n) => {
                return Err(bad(
                    "resource.data-streams",
                    format!("{n} is out of range"),
                    "give a number of streams between 1 and 64 (default 4)",
                ))
            }
        };
        let max_mtu = match r.max_mtu {
            None => DEFAULT_MAX_MTU,
            Some(n) if (1200..=i64::from(MAX_MAX_MTU)).contains(&n) => n as u16,
            Some(n) => {
                return Err(bad(
                    "resource.max-mtu",
                    format!("{n} is out of range"),
                    "give the largest UDP payload the path carries, between 1200 and 6500: 1452 for 1500-byte Ethernet, 6500 for jumbo frames",
                ))
            }
        };
        let on_peer_lost = match r.on_peer_lost {
            None => None,
            Some(p) if p.is_absolute() => Some(p),
            Some(p) => {
                return Err(bad(
                    "resource.on-peer-lost",
                    format!("{} is not an absolute path", p.display()),
                    "give the command's absolute path, e.g. \"/usr/local/sbin/fence-peer\" (the daemon does not search PATH and its working directory is not yours)",
                ))
            }
        };
        let c_max_rate = size_key(
            "resource.c-max-rate",
            r.c_max_rate.as_ref(),
            DEFAULT_C_MAX_RATE,
        )?;
        let c_min_rate = size_key(
            "resource.c-min-rate",
            r.c_min_rate.as_ref(),
            DEFAULT_C_MIN_RATE,
        )?;
        let c_fill_target = size_key(
            "resource.c-fill-target",
            r.c_fill_target.as_ref(),
            DEFAULT_C_FILL_TARGET,
        )?;
        let c_plan_ahead = dur_key(
            "resource.c-plan-ahead",
            r.c_plan_ahead.as_ref(),
            DEFAULT_C_PLAN_AHEAD,
        )?;
        if c_fill_target == 0 {
            return Err(bad(
                "resource.c-fill-target",
                "0 bytes would never let a resync request go".into(),
                "give the resync bytes to keep in flight, e.g. \"4M\" (more on a long, fast link)",
            ));
        }
        if c_max_rate > 0 && c_min_rate > c_max_rate {
            return Err(bad(
                "resource.c-min-rate",
                format!("{c_min_rate} bytes/s is above c-max-rate ({c_max_rate} bytes/s)"),
                "make c-min-rate at most c-max-rate (or set c-max-rate = \"0\" for no cap)",
            ));
        }
        use crate::core::congestion::OnCongestion;
        let on_congestion = match r.on_congestion.as_deref() {
            None | Some("block") => OnCongestion::Block,
            Some("pull-ahead") => OnCongestion::PullAhead,
            Some(other) => {
                return Err(bad(
                    "resource.on-congestion",
                    format!("unknown value {other:?}"),
                    "use \"block\" (default: writes wait for the link) or \"pull-ahead\" (async only: go Ahead and resync later)",
                ))
            }
        };
        let congestion_fill = size_key("resource.congestion-fill", r.congestion_fill.as_ref(), 0)?;
        if on_congestion == OnCongestion::PullAhead {
            if protocol != Protocol::Async {
                return Err(bad(
                    "resource.on-congestion",
                    "pull-ahead needs protocol = \"async\": a sync write always waits for the peer"
                        .into(),
                    "set protocol = \"async\", or remove on-congestion",
                ));
            }
            if congestion_fill == 0 || congestion_fill > send_buffer {
                return Err(bad(
                    "resource.congestion-fill",
                    format!(
                        "{congestion_fill} bytes: pull-ahead needs a mark above 0 and at most send-buffer ({send_buffer} bytes)"
                    ),
                    "set congestion-fill below send-buffer, e.g. half of it",
                ));
            }
        } else if congestion_fill > 0 {
            return Err(bad(
                "resource.congestion-fill",
                "has no effect with on-congestion = \"block\"".into(),
                "set on-congestion = \"pull-ahead\" (async), or remove congestion-fill",
            ));
        }
        let idle_poll = match r.idle_poll.as_deref() {
            None => DEFAULT_IDLE_POLL,
            Some("off") => Duration::ZERO,
            Some(s) => match parse_duration(s) {
                Ok(d) if d <= MAX_IDLE_POLL => d,
                Ok(d) => {
                    return Err(bad(
                        "resource.idle-poll",
                        format!("{d:?} is longer than {MAX_IDLE_POLL:?}"),
                        "give how long idle CPUs keep polling after the last write, such as \"10ms\" (at most \"60s\"), or \"off\"",
                    ))
                }
                Err(p) => {
                    return Err(bad(
                        "resource.idle-poll",
                        p,
                        "give a duration such as \"10ms\", or \"off\"",
                    ))
                }
            },
        };
        let resource = Resource {
            name: r.name,
            protocol,
            send_buffer,
            ping_interval,
            timeout,
            connect_retry,
            data_streams,
            window,
            max_mtu,
            after_sb_0pri,
            after_sb_1pri,
            on_peer_lost,
            csums: r.csums.unwrap_or(false),
            al_updates: r.al_updates.unwrap_or(true),
            c_max_rate,
            c_fill_target,
            c_plan_ahead,
            c_min_rate,
            on_congestion,
            congestion_fill,
            idle_poll,
        };

        if raw.node.len() != 2 {
            let names: Vec<&str> = raw.node.keys().map(String::as_str).collect();
            return Err(bad(
                "node",
                format!(
                    "found {} node table(s) {names:?}, twinblk replicates between exactly two",
                    raw.node.len()
                ),
                "define exactly two tables, e.g. [node.alpha] and [node.beta]",
            ));
        }
        let mut nodes = Vec::with_capacity(2);
        for (name, n) in raw.node {
            let k = |field: &str| format!("node.{name}.{field}");
            if !valid_name(&name) {
                return Err(bad(
                    &format!("node.{name}"),
                    format!("{name:?} is not a valid node name"),
                    NAME_RULE,
                ));
            }
            let address: SocketAddr = n.address.parse().map_err(|_| {
                bad(
                    &k("address"),
                    format!("{:?} is not an IP address with a port", n.address),
                    "write it as \"192.0.2.1:7789\" or \"[2001:db8::1]:7789\" (UDP port for QUIC; host names are not resolved)",
                )
            })?;
            let nbd = parse_nbd(&n.nbd).map_err(|p| {
                bad(
                    &k("nbd"),
                    p,
                    "write \"unix:/run/twinblk/r0.nbd\" or \"tcp:127.0.0.1:10809\"",
                )
            })?;
            for (field, p) in [
                ("disk", &n.disk),
                ("admin", &n.admin),
                ("cert", &n.cert),
                ("key", &n.key),
                ("meta", n.meta.as_ref().unwrap_or(&n.disk)),
            ] {
                if p.as_os_str().is_empty() {
                    return Err(bad(
                        &k(field),
                        "the path is empty".into(),
                        "give an absolute path",
                    ));
                }
            }
            let size = match n.size.as_ref() {
                None => None,
                Some(s) => match parse_size(s) {
                    Ok(0) => {
                        return Err(bad(
                            &k("size"),
                            "a size of 0".into(),
                            "give the device size such as \"1G\", or remove the key to use the disk as it is",
                        ))
                    }
                    Ok(v) if v % 4096 != 0 => {
                        return Err(bad(
                            &k("size"),
                            format!("{v} bytes is not a multiple of 4096"),
                            "round the size to a multiple of 4K",
                        ))
                    }
                    Ok(v) => Some(v),
                    Err(p) => return Err(bad(&k("size"), p, SIZE_RULE)),
                },
            };
            if let Some(pin) = &n.pin {
                if !valid_pin(pin) {
                    return Err(bad(
                        &k("pin"),
                        format!("{pin:?} is not a certificate pin"),
                        "write \"sha256:\" followed by 64 hex digits, as printed by `twinblk keygen`, or remove the key to compute it from `cert`",
                    ));
                }
            }
            let metrics = match &n.metrics {
                None => None,
                Some(m) => Some(m.parse::<SocketAddr>().map_err(|_| {
                    bad(
                        &k("metrics"),
                        format!("{m:?} is not an IP address with a port"),
                        "write it as \"127.0.0.1:9942\" (TCP; Prometheus scrapes http://ADDR/metrics), or remove the key to serve no metrics",
                    )
                })?),
            };
            let frontend = match n.frontend.as_deref() {
                None | Some("nbd") => Frontend::Nbd,
                Some("ublk") => Frontend::Ublk,
                Some(other) => {
                    return Err(bad(
                        &k("frontend"),
                        format!("unknown frontend {other:?}"),
                        "use \"nbd\" (NBD export only) or \"ublk\" (NBD export plus /dev/ublkbN; Linux >= 6.0 with ublk_drv)",
                    ))
                }
            };
            let ublk_queues = n.ublk_queues.unwrap_or(1);
            if !(1..=32).contains(&ublk_queues) {
                return Err(bad(
                    &k("ublk-queues"),
                    format!("{ublk_queues} queues"),
                    "use 1 to 32 (one serving thread each; the number of CPUs is a good choice)",
                ));
            }
            let ublk_depth = n.ublk_depth.unwrap_or(64);
            if !(1..=4096).contains(&ublk_depth) {
                return Err(bad(
                    &k("ublk-depth"),
                    format!("depth {ublk_depth}"),
                    "use 1 to 4096 requests in flight per queue (64 is the default)",
                ));
            }
            let meta = n.meta.clone().unwrap_or_else(|| default_meta_path(&n.disk));
            if meta == n.disk {
                return Err(bad(
                    &k("meta"),
                    "the metadata would overwrite the disk".into(),
                    "give the metadata its own file or device, or remove the key for the default <disk>.twinblk-meta",
                ));
            }
            nodes.push(Node {
                name,
                address,
                disk: n.disk,
                meta,
                nbd,
                admin: n.admin,
                cert: n.cert,
                key: n.key,
                size,
                pin: n.pin.map(|p| p.to_ascii_lowercase()),
                metrics,
                frontend,
                ublk_queues,
                ublk_depth,
            });
        }
        if let [a, b] = nodes.as_slice() {
            if a.address == b.address {
                return Err(bad(
                    &format!("node.{}.address", b.name),
                    format!("both nodes use {}", a.address),
                    "give each node its own address (a different port on one host is fine)",
                ));
            }
        }
        Ok(Config {
            source: file.to_path_buf(),
            resource,
            nodes,
        })
    }

    /// The node called `name` (the one `--node` names, i.e. this machine).
    pub fn node_named(&self, name: &str) -> Result<&Node, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| self.no_such_node(name))
    }

    /// The node that is not `name`: the peer of the node `name`.
    pub fn peer_of(&self, name: &str) -> Result<&Node, ConfigError> {
        self.node_named(name)?;
        self.nodes
            .iter()
            .find(|n| n.name != name)
            .ok_or_else(|| self.no_such_node(name))
    }

    fn no_such_node(&self, name: &str) -> ConfigError {
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        ConfigError::Invalid {
            file: self.source.clone(),
            key: format!("node.{name}"),
            problem: format!("there is no node {name:?} in this resource (it has {names:?})"),
            fix: format!(
                "pass one of {names:?} as --node, or add a [node.{name}] table to the file"
            ),
        }
    }
}

/// Where a node's metadata lives when the resource file does not say: next to its disk.
pub fn default_meta_path(disk: &Path) -> PathBuf {
    let mut s = disk.as_os_str().to_owned();
    s.push(".twinblk-meta");
    PathBuf::from(s)
}

const NAME_RULE: &str = "use 1 to 63 ASCII letters, digits and '-', starting with a letter or digit (node names double as TLS server names)";
const SIZE_RULE: &str =
    "write a byte count with an optional binary suffix: \"4096\", \"512K\", \"64M\", \"1G\", \"2T\"";
const DURATION_RULE: &str = "write a whole number with a unit: \"500ms\", \"5s\", \"2m\", \"1h\"";

/// A node's name as `keygen --name` and the resource file's `[node.NAME]` accept it; the error
/// says the rule.
pub fn check_node_name(name: &str) -> Result<(), String> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid node name: {NAME_RULE}"))
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn valid_pin(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn parse_nbd(s: &str) -> Result<ListenAddr, String> {
    // The resource file always names the kind, unlike `serve --listen` where a bare path means unix.
    if !(s.starts_with("unix:") || s.starts_with("tcp:")) {
        return Err(format!("{s:?} names no transport"));
    }
    s.parse().map_err(|e: crate::addr::AddrError| e.to_string())
}

/// Parses `"4096"`, `"512K"`, `"64M"`, `"1G"`, `"2T"` (binary multiples; a trailing `B` or `iB` is
/// accepted, so `"64MiB"` works too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, suffix) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], Some(c)),
        _ => (t, None),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a size"));
    }
    let shift = match suffix.map(|c| c.to_ascii_uppercase()) {
        None => 0,
        Some('K') => 10,
        Some('M') => 20,
        Some('G') => 30,
        Some('T') => 40,
        Some(c) => return Err(format!("{s:?} has an unknown size suffix {c:?}")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses `"500ms"`, `"5s"`, `"2m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit"))?;
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("{s:?} is not a duration"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is too large"))?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{s:?} has an unknown unit {unit:?}")),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Sync => "sync",
            Protocol::Async => "async",
        })
    }
}

/// `after-sb-0pri` as the resource file spells it (for `status`).
pub fn after_sb_0pri_name(p: crate::core::AfterSb0Pri) -> &'static str {
    use crate::core::AfterSb0Pri as P;
    match p {
        P::Disconnect => "disconnect",
        P::DiscardZeroChanges => "discard-zero-changes",
        P::DiscardYoungerPrimary => "discard-younger-primary",
        P::DiscardLeastChanges => "discard-least-changes",
    }
}

/// `after-sb-1pri` as the resource file spells it (for `status`).
pub fn after_sb_1pri_name(p: crate::core::AfterSb1Pri) -> &'static str {
    use crate::core::AfterSb1Pri as P;
    match p {
        P::Disconnect => "disconnect",
        P::DiscardSecondary => "discard-secondary",
    }
}
