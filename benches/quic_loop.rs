//! How fast could a sync write's round trip be if the node drove QUIC itself? A measurement for
//! issue 19, not a transport: the same exchange as `net_throughput`'s `quic_extent_ack` (a 4 KiB
//! extent plus a 48-byte head out on a uni stream, a 40-byte ack back), with `quinn-proto` driven
//! by one plain loop per side (blocking UDP socket, no tokio, no tasks) or one tokio task per
//! side; through quinn's API with its endpoint and connection drivers as tokio tasks, and with
//! those same driver futures polled inside the application's one task (a `quinn::Runtime` that
//! keeps its spawns); and a bare UDP ping-pong of the same sizes.
//!
//! cargo bench --bench quic_loop                 # 20,000 round trips each
//! cargo bench --bench quic_loop -- --idle-poll  # holding /dev/cpu_dma_latency, as the daemons do
//!
//! The loops use the same TLS 1.3 suite (ring, AES-128-GCM) and MTU discovery up to 6500, but
//! no certificate check (loopback, a benchmark). Compare with `cargo bench --bench
//! net_throughput -- --idle-poll tuned`, whose last line is twinblk's link.
//!
//! Measured (2 vCPUs, idle, `--idle-poll`, four runs): UDP 10.4-10.5 µs mean; quinn-proto in a
//! blocking loop 17.1-20.3; quinn-proto in one tokio task per side 19.7-23.6; quinn with its
//! driver tasks 24.5-30.1; quinn with its drivers in the app's task 24.0-29.5 (0.5 more to 1.5
//! less than with tasks, in the same run). So quinn's task structure costs nothing measurable
//! here; its layering over quinn-proto costs about 5 µs a round trip (4.7-6.5 in the same run),
//! which is what driving quinn-proto from the node's event loop could save; QUIC's own packet
//! work costs about 7 µs over bare UDP.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto as qp;

const EXTENT: usize = 4096 + 48;
const ACK: usize = 40;
/// Datagrams the quinn-proto loops sent: 2 per round trip once MTU discovery lets the extent fit
/// one packet (with the 1472-byte default payload limit it took 3, plus an ACK-only packet).
static SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // Never reached (TLS 1.3 only); the trait asks for it anyway.
        self.verify_tls13_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn transport() -> Arc<qp::TransportConfig> {
    let mut t = qp::TransportConfig::default();
    let mut mtu = qp::MtuDiscoveryConfig::default();
    mtu.upper_bound(6500);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

fn configs(dir: &std::path::Path) -> (qp::ServerConfig, qp::ClientConfig) {
    let (key, cert, _) = twinblk::net::keygen("beta", dir, true).unwrap();
    let cert = twinblk::net::load_cert(&cert).unwrap();
    let key = twinblk::net::load_key(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut s = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    s.alpn_protocols = vec![b"bench".to_vec()];
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"bench".to_vec()];
    let mut server = qp::ServerConfig::with_crypto(Arc::new(
        qp::crypto::rustls::QuicServerConfig::try_from(s).unwrap(),
    ));
    server.transport_config(transport());
    let mut client = qp::ClientConfig::new(Arc::new(
        qp::crypto::rustls::QuicClientConfig::try_from(c).unwrap(),
    ));
    client.transport_config(transport());
    (server, client)
}

/// The socket a side waits on: a blocking one (the thread sleeps in `recvfrom`), or tokio's (the
/// loop is a task on a current-thread runtime waiting in `epoll_wait`, as the node's event loop
/// does).
enum Sock {
    Blocking(UdpSocket),
    Tokio(tokio::net::UdpSocket),
}

impl Sock {
    fn send_to(&self, b: &[u8], to: SocketAddr) {
        let _ = match self {
            Sock::Blocking(s) => s.send_to(b, to),
            Sock::Tokio(s) => s.try_send_to(b, to),
        };
    }
}

/// One side: an endpoint with one connection, driven by one loop.
struct Side {
    sock: Sock,
    ep: qp::Endpoint,
    conn: Option<(qp::ConnectionHandle, qp::Connection)>,
    server: Option<Arc<qp::ServerConfig>>,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    connected: bool,
}

impl Side {
    fn new(sock: Sock, server: Option<qp::ServerConfig>) -> Side {
        let server = server.map(Arc::new);
        Side {
            sock,
            ep: qp::Endpoint::new(
                Arc::new({
                    // Datagrams up to the discovery bound must be receivable (as in the link).
                    let mut c = qp::EndpointConfig::default();
                    c.max_udp_payload_size(6500).unwrap();
                    c
                }),
                server.clone(),
                true,
                None,
            ),
            conn: None,
            server,
            tx_buf: Vec::with_capacity(65536),
            rx_buf: vec![0u8; 65536],
            connected: false,
        }
    }

    fn conn(&mut self) -> &mut qp::Connection {
        &mut self.conn.as_mut().expect("connected").1
    }

    /// Sends what the connection has to send and hands its events to the endpoint.
    fn flush(&mut self) {
        let now = Instant::now();
        let Some((ch, conn)) = self.conn.as_mut() else {
            return;
        };
        while let Some(ev) = conn.poll_endpoint_events() {
            if let Some(back) = self.ep.handle_event(*ch, ev) {
                conn.handle_event(back);
            }
        }
        loop {
            self.tx_buf.clear();
            let Some(t) = conn.poll_transmit(now, 1, &mut self.tx_buf) else {
                break;
            };
            self.sock.send_to(&self.tx_buf[..t.size], t.destination);
            SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        while let Some(e) = conn.poll() {
            if let qp::Event::Connected = e {
                self.connected = true;
            }
        }
    }

    /// Waits for one datagram (or the connection's next timer) and feeds it in.
    async fn turn(&mut self) {
        let now = Instant::now();
        let wait = self
            .conn
            .as_mut()
            .and_then(|(_, c)| c.poll_timeout())
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(100))
            .max(Duration::from_micros(1));
        let got = match &self.sock {
            Sock::Blocking(s) => {
                let _ = s.set_read_timeout(Some(wait));
                s.recv_from(&mut self.rx_buf).ok()
            }
            Sock::Tokio(s) => tokio::select! {
                r = s.recv_from(&mut self.rx_buf) => r.ok(),
                _ = tokio::time::sleep(wait) => None,
            },
        };
        match got {
            Some((n, from)) => {
                let data = BytesMut::from(&self.rx_buf[..n]);
                let now = Instant::now();
                self.tx_buf.clear();
                match self
                    .ep
                    .handle(now, from, None, None, data, &mut self.tx_buf)
                {
                    Some(qp::DatagramEvent::ConnectionEvent(_, ev)) => {
                        if let Some((_, c)) = self.conn.as_mut() {
                            c.handle_event(ev);
                        }
                    }
                    Some(qp::DatagramEvent::NewConnection(incoming)) => {
                        let mut buf = Vec::new();
                        let accepted = self.ep.accept(incoming, now, &mut buf, self.server.clone());
                        if let Ok(c) = accepted {
                            self.conn = Some(c);
                        }
                    }
                    Some(qp::DatagramEvent::Response(t)) => {
                        self.sock.send_to(&self.tx_buf[..t.size], t.destination);
                    }
                    None => {}
                }
            }
            None => {
                if let Some((_, c)) = self.conn.as_mut() {
                    c.handle_timeout(Instant::now());
                }
            }
        }
        self.flush();
    }

    /// Reads what the stream has; true once it ended.
    fn read(&mut self, id: qp::StreamId, got: &mut usize) -> bool {
        let mut s = self.conn().recv_stream(id);
        let Ok(mut chunks) = s.read(true) else {
            return true;
        };
        let mut ended = false;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(c)) => *got += c.bytes.len(),
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let _ = chunks.finalize();
        ended
    }
}

/// Runs `f` to completion: on a current-thread runtime for tokio's sockets, else by polling it
/// once (a blocking side never returns `Pending`).
fn run<F: std::future::Future>(tokio_rt: bool, f: F) -> F::Output {
    if tokio_rt {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    } else {
        futures_util::FutureExt::now_or_never(f).expect("a blocking side never waits in poll")
    }
}

fn sock(s: UdpSocket, tokio_rt: bool) -> Sock {
    if tokio_rt {
        s.set_nonblocking(true).unwrap();
        Sock::Tokio(tokio::net::UdpSocket::from_std(s).unwrap())
    } else {
        Sock::Blocking(s)
    }
}

/// What both QUIC exchanges start from: keys (in a directory that lives as long as the
/// returned guard), both ends' configs, and two bound loopback sockets.
fn setup() -> (
    tempfile::TempDir,
    qp::ServerConfig,
    qp::ClientConfig,
    UdpSocket,
    UdpSocket,
) {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = configs(dir.path());
    let sa = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sb = UdpSocket::bind("127.0.0.1:0").unwrap();
    (dir, server, client, sa, sb)
}

fn proto_round_trips(rounds: usize, tokio_rt: bool) -> Vec<Duration> {
    let (_dir, server, client, sa, sb) = setup();
    let addr_b: SocketAddr = sb.local_addr().unwrap();
    let secondary = std::thread::spawn(move || {
        run(tokio_rt, async move {
            let mut b = Side::new(sock(sb, tokio_rt), Some(server));
            while !b.connected {
                b.turn().await;
            }
            let data = b.conn().streams().accept(qp::Dir::Uni);
            let mut data = data;
            let acks = b.conn().streams().open(qp::Dir::Uni).unwrap();
            let ack = Bytes::from(vec![7u8; ACK]);
            let mut got = 0usize;
            loop {
                if data.is_none() {
                    data = b.conn().streams().accept(qp::Dir::Uni);
                }
                if let Some(id) = data {
                    if b.read(id, &mut got) {
                        return;
                    }
                    while got >= EXTENT {
                        got -= EXTENT;
                        let _ = b.conn().send_stream(acks).write(&ack);
                    }
                    b.flush();
                }
                if b.conn.as_ref().is_some_and(|(_, c)| c.is_closed()) {
                    return;
                }
                b.turn().await;
            }
        })
    });
    run(tokio_rt, async move {
        let mut a = Side::new(sock(sa, tokio_rt), None);
        a.conn = Some(
            a.ep.connect(Instant::now(), client, addr_b, "beta")
                .unwrap(),
        );
        a.flush();
        while !a.connected {
            a.turn().await;
        }
        let data = a.conn().streams().open(qp::Dir::Uni).unwrap();
        let extent = Bytes::from(vec![1u8; EXTENT]);
        let mut acks = None;
        let mut rtts = Vec::with_capacity(rounds);
        for i in 0..rounds + rounds / 10 {
            let t0 = Instant::now();
            let _ = a.conn().send_stream(data).write(&extent);
            a.flush();
            let mut got = 0usize;
            while got < ACK {
                a.turn().await;
                if acks.is_none() {
                    acks = a.conn().streams().accept(qp::Dir::Uni);
                }
                if let Some(id) = acks {
                    a.read(id, &mut got);
                }
            }
            a.flush();
            // The first tenth warms up (MTU discovery, congestion window).
            if i >= rounds / 10 {
                rtts.push(t0.elapsed());
            }
        }
        a.conn()
            .close(Instant::now(), qp::VarInt::from_u32(0), Bytes::new());
        a.flush();
        drop(a);
        let _ = secondary.join();
        rtts
    })
}

/// quinn's runtime with its spawns kept: the endpoint's and the connections' driver futures go
/// into a set that [`with_drivers`] polls inside the application's own task, instead of a tokio
/// task each. Timers and sockets are tokio's, as with [`quinn::TokioRuntime`].
#[derive(Debug, Clone, Default)]
struct OneTask(Arc<std::sync::Mutex<Spawned>>);

type Driver = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

#[derive(Default)]
struct Spawned {
    new: Vec<Driver>,
    waker: Option<std::task::Waker>,
}

impl std::fmt::Debug for Spawned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} new drivers", self.new.len())
    }
}

impl quinn::Runtime for OneTask {
    fn new_timer(&self, i: Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        quinn::TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Driver) {
        let mut s = self.0.lock().unwrap();
        s.new.push(future);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    fn wrap_udp_socket(&self, t: UdpSocket) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        quinn::TokioRuntime.wrap_udp_socket(t)
    }
}

/// Runs `f` with `rt`'s drivers polled in the same task, before and after `f` each time.
async fn with_drivers<F: std::future::Future>(rt: OneTask, f: F) -> F::Output {
    use futures_util::StreamExt;
    let mut set = futures_util::stream::FuturesUnordered::<Driver>::new();
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(move |cx| {
        let mut drive = |cx: &mut std::task::Context<'_>| {
            {
                let mut s = rt.0.lock().unwrap();
                s.waker = Some(cx.waker().clone());
                set.extend(s.new.drain(..));
            }
            while let std::task::Poll::Ready(Some(())) = set.poll_next_unpin(cx) {}
        };
        drive(cx);
        if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
            return std::task::Poll::Ready(v);
        }
        // What `f` just wrote is sent now, not after a trip through tokio's run queue.
        drive(cx);
        std::task::Poll::Pending
    })
    .await
}

/// The same exchange through quinn's API: its endpoint and connection drivers as tokio tasks
/// (`one_task` false, quinn's own runtime), or polled inside the one task of each side.
fn quinn_round_trips(rounds: usize, one_task: bool) -> Vec<Duration> {
    let (_dir, server, client, sa, sb) = setup();
    let addr_b: SocketAddr = sb.local_addr().unwrap();
    let endpoint_config = || {
        let mut c = quinn::EndpointConfig::default();
        c.max_udp_payload_size(6500).unwrap();
        c
    };
    let side = move |sock: UdpSocket,
                     server: Option<qp::ServerConfig>|
          -> (quinn::Endpoint, Option<OneTask>) {
        let (rt, one): (Arc<dyn quinn::Runtime>, Option<OneTask>) = if one_task {
            let r = OneTask::default();
            (Arc::new(r.clone()), Some(r))
        } else {
            (Arc::new(quinn::TokioRuntime), None)
        };
        let sock = rt.wrap_udp_socket(sock).unwrap();
        let ep =
            quinn::Endpoint::new_with_abstract_socket(endpoint_config(), server, sock, rt).unwrap();
        (ep, one)
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    async fn maybe_with<F: std::future::Future>(one: Option<OneTask>, f: F) -> F::Output {
        match one {
            Some(rt) => with_drivers(rt, f).await,
            None => f.await,
        }
    }
    let secondary = std::thread::spawn(move || {
        runtime().block_on(async move {
            let (ep, one) = side(sb, Some(server));
            maybe_with(one, async move {
                let conn = ep.accept().await.unwrap().await.unwrap();
                let mut data = conn.accept_uni().await.unwrap();
                let mut acks = conn.open_uni().await.unwrap();
                let ack = vec![7u8; ACK];
                let mut buf = vec![0u8; EXTENT];
                while data.read_exact(&mut buf).await.is_ok() {
                    if acks.write_all(&ack).await.is_err() {
                        break;
                    }
                }
                conn.closed().await;
            })
            .await
        })
    });
    let rtts = runtime().block_on(async move {
        let (ep, one) = side(sa, None);
        maybe_with(one, async move {
            let conn = ep
                .connect_with(client, addr_b, "beta")
                .unwrap()
                .await
                .unwrap();
            let mut data = conn.open_uni().await.unwrap();
            let extent = vec![1u8; EXTENT];
            let mut buf = vec![0u8; ACK];
            let mut acks = None;
            let mut rtts = Vec::with_capacity(rounds);
            for i in 0..rounds + rounds / 10 {
                let t0 = Instant::now();
                data.write_all(&extent).await.unwrap();
                if acks.is_none() {
                    acks = Some(conn.accept_uni().await.unwrap());
                }
                let a: &mut quinn::RecvStream = acks.as_mut().unwrap();
                a.read_exact(&mut buf).await.unwrap();
                if i >= rounds / 10 {
                    rtts.push(t0.elapsed());
                }
            }
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
            rtts
        })
        .await
    });
    let _ = secondary.join();
    rtts
}

fn udp_round_trips(rounds: usize) -> Vec<Duration> {
    let sa = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sb = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let secondary = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let ack = vec![7u8; ACK];
        loop {
            match sb.recv_from(&mut buf) {
                Ok((1, _)) => return,
                Ok(_) => {
                    let _ = sb.send_to(&ack, aa);
                }
                Err(_) => return,
            }
        }
    });
    let extent = vec![1u8; EXTENT];
    let mut buf = vec![0u8; 65536];
    let mut rtts = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let t0 = Instant::now();
        sa.send_to(&extent, ab).unwrap();
        sa.recv_from(&mut buf).unwrap();
        if i >= rounds / 10 {
            rtts.push(t0.elapsed());
        }
    }
    sa.send_to(&[0], ab).unwrap();
    let _ = secondary.join();
    rtts
}

fn report(what: &str, mut rtts: Vec<Duration>) {
    rtts.sort();
    let mean = rtts.iter().map(Duration::as_secs_f64).sum::<f64>() / rtts.len() as f64;
    let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    println!(
        "{what:<44} mean {:>5.1} us p50 {:>5.1} us p99 {:>6.1} us",
        mean * 1e6,
        pct(0.5),
        pct(0.99)
    );
}

fn main() {
    let idle_poll = std::env::args().any(|a| a == "--idle-poll");
    let _held = idle_poll.then(|| {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f))
            .map_err(|e| println!("--idle-poll: /dev/cpu_dma_latency: {e}; measuring without it"))
            .ok()
    });
    let rounds = 20_000;
    report("udp (blocking sockets)", udp_round_trips(rounds));
    report(
        "quinn-proto, one blocking loop per side",
        proto_round_trips(rounds, false),
    );
    report(
        "quinn-proto, one tokio task per side",
        proto_round_trips(rounds, true),
    );
    report(
        "quinn, its driver tasks (quinn's own runtime)",
        quinn_round_trips(rounds, false),
    );
    report(
        "quinn, its drivers polled in the app's task",
        quinn_round_trips(rounds, true),
    );
    let runs = 2 * (rounds + rounds / 10);
    println!(
        "quinn-proto loops: {:.2} datagrams per round trip",
        SENT.load(std::sync::atomic::Ordering::Relaxed) as f64 / runs as f64
    );
}
