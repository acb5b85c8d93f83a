//! Prometheus metrics of one resource on one node (`metrics = "127.0.0.1:9942"` in the node's
//! table), and the tiny HTTP/1.1 responder that serves them: `GET /metrics` answers the
//! OpenMetrics text of `prometheus-client`; nothing else is served. Off unless configured.
//!
//! The event loop owns the numbers and updates these atomics as it goes (counters on every
//! request, state gauges on every state change and once a second); a scrape only reads them, so
//! a slow or hostile scraper can never stall replication.
//!
//! Every metric carries the constant labels `resource` and `node`; the names are documented in
//! the README ("Metrics") and used by tools/grafana-dashboard.json.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request head longer than this is not a scraper.
const MAX_HEAD: usize = 8 * 1024;
/// A client that sends no complete request head in this time is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One-hot state gauges: `twinblk_role{role="Primary"} 1`, every other value 0.
pub type StateFamily = Family<Vec<(String, String)>, Gauge>;
pub type FloatGauge = Gauge<f64, AtomicU64>;
/// Histograms by label set, all with the stage buckets.
pub type StageFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics: cannot listen on {addr}: {source}; choose a free address for `metrics` in the node's table or remove the key")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything the node exports. Clones share the same atomics.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub role: StateFamily,
    pub disk_state: StateFamily,
    pub replication_state: StateFamily,
    pub peer_role: StateFamily,
    pub peer_disk_state: StateFamily,
    pub connected: Gauge,
    pub out_of_sync_bytes: Gauge,
    pub peer_inflight_requests: Gauge,
    pub peer_inflight_bytes: Gauge,
    pub send_buffer_bytes: Gauge,
    pub send_buffer_fill: FloatGauge,
    pub client_requests_in_flight: Gauge,
    pub writes: Counter,
    pub write_bytes: Counter,
    pub reads: Counter,
    pub read_bytes: Counter,
    pub flushes: Counter,
    pub trims: Counter,
    pub io_errors: Counter,
    pub write_latency: Histogram,
    pub local_write_latency: Histogram,
    /// The latency breakdown (`crate::latency`): one histogram per stage.
    pub write_stage: StageFamily,
    pub resync_bytes: Counter,
    pub resync_rate: FloatGauge,
    pub resync_remaining_bytes: Gauge,
    pub split_brain: Gauge,
    pub may_promote: Gauge,
    pub state_changes: Counter,
    pub events_dropped: Counter,
    /// The event loop's busy-poll (`node::poll`): spins that saw their event, spins that gave
    /// up, waits that did not spin because another task waited for a CPU, poll rounds.
    pub busy_poll_hits: Counter,
    pub busy_poll_misses: Counter,
    pub busy_poll_contended: Counter,
    pub busy_poll_rounds: Counter,
    /// The idle poll (`node::idle_poll`): 1 while the daemon holds its CPU latency request,
    /// and how many times it took it.
    pub idle_poll_held: Gauge,
    pub idle_poll_holds: Counter,
}

fn stage_buckets() -> Histogram {
    // 1 µs .. ~8 s: a task hop through a WAN round trip.
    Histogram::new(exponential_buckets(0.000_001, 2.0, 24))
}

fn latency_buckets() -> Histogram {
    // 20 µs .. ~5 s: NVMe-local writes through WAN end-to-end acks.
    Histogram::new(exponential_buckets(0.000_02, 2.0, 18))
}

impl Metrics {
    /// Fresh metrics and the registry that exports them under `twinblk_`.
    pub fn new(resource: &str, node: &str) -> (Metrics, Registry) {
        let m = Metrics {
            role: StateFamily::default(),
            disk_state: StateFamily::default(),
            replication_state: StateFamily::default(),
            peer_role: StateFamily::default(),
            peer_disk_state: StateFamily::default(),
            connected: Gauge::default(),
            out_of_sync_bytes: Gauge::default(),
            peer_inflight_requests: Gauge::default(),
            peer_inflight_bytes: Gauge::default(),
            send_buffer_bytes: Gauge::default(),
            send_buffer_fill: FloatGauge::default(),
            client_requests_in_flight: Gauge::default(),
            writes: Counter::default(),
            write_bytes: Counter::default(),
            reads: Counter::default(),
            read_bytes: Counter::default(),
            flushes: Counter::default(),
            trims: Counter::default(),
            io_errors: Counter::default(),
            write_latency: latency_buckets(),
            local_write_latency: latency_buckets(),
            write_stage: StageFamily::new_with_constructor(stage_buckets),
            resync_bytes: Counter::default(),
            resync_rate: FloatGauge::default(),
            resync_remaining_bytes: Gauge::default(),
            split_brain: Gauge::default(),
            may_promote: Gauge::default(),
            state_changes: Counter::default(),
            events_dropped: Counter::default(),
            busy_poll_hits: Counter::default(),
            busy_poll_misses: Counter::default(),
            busy_poll_contended: Counter::default(),
            busy_poll_rounds: Counter::default(),
            idle_poll_held: Gauge::default(),
            idle_poll_holds: Counter::default(),
        };
        let labels = [
            (Cow::Borrowed("resource"), Cow::Owned(resource.to_owned())),
            (Cow::Borrowed("node"), Cow::Owned(node.to_owned())),
        ];
        let mut r = Registry::with_prefix_and_labels("twinblk", labels.into_iter());
        r.register(
            "role",
            "This node's role (1 for the current one)",
            m.role.clone(),
        );
        r.register(
            "disk_state",
            "This node's disk state (1 for the current one)",
            m.disk_state.clone(),
        );
        r.register(
            "replication_state",
            "Replication state (1 for the current one)",
            m.replication_state.clone(),
        );
        r.register(
            "peer_role",
            "The peer's role as last reported (1 for the current one; none while disconnected)",
            m.peer_role.clone(),
        );
        r.register(
            "peer_disk_state",
            "The peer's disk state as last reported (1 for the current one)",
            m.peer_disk_state.clone(),
        );
        r.register(
            "connected",
            "1 while a QUIC connection to the peer is up",
            m.connected.clone(),
        );
        r.register_with_unit(
            "out_of_sync",
            "Bytes marked out of sync in the bitmap",
            Unit::Bytes,
            m.out_of_sync_bytes.clone(),
        );
        r.register(
            "peer_inflight_requests",
            "Write extents sent to the peer and not yet acked",
            m.peer_inflight_requests.clone(),
        );
        r.register_with_unit(
            "peer_inflight",
            "Write payload sent to the peer and not yet acked",
            Unit::Bytes,
            m.peer_inflight_bytes.clone(),
        );
        r.register_with_unit(
            "send_buffer",
            "Configured send buffer (async: unacked bytes past this go Ahead)",
            Unit::Bytes,
            m.send_buffer_bytes.clone(),
        );
        r.register(
            "send_buffer_fill_ratio",
            "Unacked bytes to the peer as a fraction of the send buffer",
            m.send_buffer_fill.clone(),
        );
        r.register(
            "client_requests_in_flight",
            "Client requests the core is working on",
            m.client_requests_in_flight.clone(),
        );
        r.register("writes", "Client writes", m.writes.clone());
        r.register_with_unit(
            "written",
            "Client write payload",
            Unit::Bytes,
            m.write_bytes.clone(),
        );
        r.register("reads", "Client reads", m.reads.clone());
        r.register_with_unit(
            "read",
            "Client read payload",
            Unit::Bytes,
            m.read_bytes.clone(),
        );
        r.register("flushes", "Client flushes", m.flushes.clone());
        r.register("trims", "Client trims and write-zeroes", m.trims.clone());
        r.register(
            "io_errors",
            "Client requests completed with an error",
            m.io_errors.clone(),
        );
        r.register_with_unit(
            "write_latency",
            "Client write, submission to completion (end to end: includes the peer's ack in protocol sync)",
            Unit::Seconds,
            m.write_latency.clone(),
        );
        r.register_with_unit(
            "local_write_latency",
            "Local disk write, submission to completion",
            Unit::Seconds,
            m.local_write_latency.clone(),
        );
        r.register_with_unit(
            "write_stage",
            "Replicated writes, time per stage (see `twinblk status --latency` and docs/metrics.md); the peer's stages as its acks report them",
            Unit::Seconds,
            m.write_stage.clone(),
        );
        r.register_with_unit(
            "resync",
            "Resync payload sent (SyncSource) or received (SyncTarget)",
            Unit::Bytes,
            m.resync_bytes.clone(),
        );
        r.register(
            "resync_rate_bytes_per_second",
            "Resync payload rate over the last few seconds",
            m.resync_rate.clone(),
        );
        r.register_with_unit(
            "resync_remaining",
            "Bytes the running resync still has to copy (0 when none runs)",
            Unit::Bytes,
            m.resync_remaining_bytes.clone(),
        );
        r.register(
            "split_brain",
            "1 while the peer connection is refused for split brain",
            m.split_brain.clone(),
        );
        r.register(
            "may_promote",
            "1 if `twinblk primary` would succeed now",
            m.may_promote.clone(),
        );
        r.register(
            "state_changes",
            "State changes emitted by the replication core",
            m.state_changes.clone(),
        );
        r.register(
            "events_dropped",
            "State-change events dropped for slow `twinblk events` readers",
            m.events_dropped.clone(),
        );
        r.register(
            "busy_poll_hits",
            "Busy-poll spins that saw their event within their budget (TWINBLK_POLL_US)",
            m.busy_poll_hits.clone(),
        );
        r.register(
            "busy_poll_misses",
            "Busy-poll spins that gave up (budget spent) before their event",
            m.busy_poll_misses.clone(),
        );
        r.register(
            "busy_poll_contended",
            "Waits that did not busy-poll, or stopped, because another task waited for a CPU",
            m.busy_poll_contended.clone(),
        );
        r.register(
            "busy_poll_rounds",
            "Busy-poll rounds (the event loop yielded instead of sleeping)",
            m.busy_poll_rounds.clone(),
        );
        r.register(
            "idle_poll_held",
            "1 while idle CPUs are kept polling for replicated writes (idle-poll, /dev/cpu_dma_latency)",
            m.idle_poll_held.clone(),
        );
        r.register(
            "idle_poll_holds",
            "Times the idle poll's CPU latency request was taken (after idle-poll without writes, it is released)",
            m.idle_poll_holds.clone(),
        );
        (m, r)
    }

    /// Sets a one-hot family to `value` (and every value seen before to 0).
    /// The histogram of latency stage `stage` (a shared handle: observing it needs no lookup).
    pub fn write_stage(&self, stage: &str) -> Histogram {
        self.write_stage
            .get_or_create(&vec![("stage".to_owned(), stage.to_owned())])
            .clone()
    }

    pub fn set_state(family: &StateFamily, label: &str, value: Option<&str>) {
        family.clear();
        if let Some(v) = value {
            family
                .get_or_create(&vec![(label.to_owned(), v.to_owned())])
                .set(1);
        }
    }
}

/// The OpenMetrics text of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut s = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a metric's name.
    if let Err(e) = encode(&mut s, registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    s
}

/// Bind the metrics listener (so a bad address fails `up` at once, with the key named).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serve scrapes until the task is aborted.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let registry = registry.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &registry).await {
                        tracing::debug!(error = %e, "metrics connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Index,
    NotFound,
    BadMethod,
    BadRequest,
}

/// Parses the request line of an HTTP/1.x head (pure, for tests).
pub fn route(head: &[u8]) -> Route {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" && method != "HEAD" {
        return Route::BadMethod;
    }
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => Route::Metrics,
        "/" => Route::Index,
        _ => Route::NotFound,
    }
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(buf.get(..n).unwrap_or_default());
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(true);
            }
        }
    })
    .await;
    let Ok(Ok(true)) = complete else {
        return Ok(());
    };
    let head_only = head.starts_with(b"HEAD ");
    let (status, ctype, body) = match route(&head) {
        Route::Metrics => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(registry),
        ),
        Route::Index => (
            "200 OK",
            "text/plain; charset=utf-8",
            "twinblk metrics: GET /metrics\n".to_owned(),
        ),
        Route::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
        Route::BadMethod => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is served\n".to_owned(),
        ),
        Route::BadRequest => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad request\n".to_owned(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::Index);
        assert_eq!(route(b"GET /etc/passwd HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"\x00\xff garbage"), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
    }

    #[test]
    fn text_has_names_labels_and_one_hot_states() {
        let (m, r) = Metrics::new("r0", "alpha");
        Metrics::set_state(&m.role, "role", Some("Secondary"));
        Metrics::set_state(&m.role, "role", Some("Primary"));
        m.writes.inc_by(3);
        m.write_bytes.inc_by(12288);
        m.write_latency.observe(0.001);
        let text = render(&r);
        assert!(
            text.contains(r#"twinblk_role{resource="r0",node="alpha",role="Primary"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"role="Secondary""#), "{text}");
        assert!(
            text.contains(r#"twinblk_writes_total{resource="r0",node="alpha"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"twinblk_written_bytes_total{resource="r0",node="alpha"} 12288"#),
            "{text}"
        );
        assert!(
            text.contains("twinblk_write_latency_seconds_count{resource=\"r0\",node=\"alpha\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn responder_serves_metrics_and_refuses_the_rest() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (m, r) = Metrics::new("r0", "alpha");
            m.reads.inc();
            let l = bind("127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("bind");
            let addr = l.local_addr().expect("addr");
            let task = tokio::spawn(serve(l, Arc::new(r)));
            let get = |req: &'static str| async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(req.as_bytes()).await.expect("write");
                let mut out = String::new();
                s.read_to_string(&mut out).await.expect("read");
                out
            };
            let ok = get("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
            assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
            assert!(ok.contains("twinblk_reads_total"), "{ok}");
            let missing = get("GET /nope HTTP/1.1\r\n\r\n").await;
            assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
            let post = get("POST /metrics HTTP/1.1\r\n\r\n").await;
            assert!(post.starts_with("HTTP/1.1 405"), "{post}");
            task.abort();
        });
    }
}
