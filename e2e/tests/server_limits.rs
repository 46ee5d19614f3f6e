//! The HTTPS servers of the broker and the webhook (`runtime/src/tls.rs`) under a flood of
//! idle and slowly-sending connections: the real `cloudpass-operator` and
//! `cloudpass-webhook`, with small limits so that the test is quick.
//!
//! While thousands of connections that never send, TLS handshakes that stop halfway and
//! request headers sent a byte at a time are open, valid requests keep being answered
//! (on a kept-alive connection and on new ones), every bad connection is closed by the
//! server after its timeout, no more connections than the limit are open in the server
//! at once (its file descriptors are counted), and its memory stays bounded. And when
//! the server runs out of file descriptors, it pauses instead of spinning on `accept`.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use cloudpass_e2e::{
    ControlPlane,
    broker::{BrokerOptions, RunningBroker},
    certs::TestCa,
    process::{ManagedProcess, free_port},
    scenario::webhook::RunningWebhook,
    workspace_binary,
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
    task::JoinSet,
    time::Instant,
};
use tokio_rustls::TlsConnector;

/// The servers' connection limit in this test, at the full attack size.
const MAX_CONNECTIONS: usize = 256;
/// Connections that never send a byte, per server.
const SILENT: usize = 2000;
/// Connections that send the start of a TLS ClientHello and stop, per server.
const HALF_HELLOS: usize = 200;
/// Connections that finish TLS and send request headers a byte every 300 ms, per server.
const SLOW_HEADERS: usize = 100;
/// The servers' limits: far below the defaults, so that the test is quick.
const LIMITS: [(&str, &str); 4] =
    [("handshake-timeout", "1s"), ("header-read-timeout", "1s"), ("idle-timeout", "2s"), ("request-timeout", "5s")];
/// Bound on every wait for a server to act (connect, answer, close), and on a whole
/// flood: far above the limits (a flood takes about 11 s on 2 busy cores), only reached
/// when a server does not act at all.
const PATIENCE: Duration = Duration::from_secs(30);
/// Fresh connections, each with one valid request, sent during the flood.
const FRESH_REQUESTS: usize = 5;
/// A generous bound on a server's resident memory during the flood.
const MAX_RSS_KIB: u64 = 256 * 1024;

/// The servers' listen backlog (`runtime/src/tls.rs`): connections beyond the limit
/// wait there.
const LISTEN_BACKLOG: usize = 1024;

/// How many connections of each kind, and the connection limit: the full sizes above,
/// scaled down when this process may not open enough files for two floods at once.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    silent: usize,
    half_hellos: usize,
    slow_headers: usize,
    max_connections: usize,
}

impl Sizes {
    fn for_this_process() -> Self {
        let full = SILENT + HALF_HELLOS + SLOW_HEADERS;
        // Two servers at once, plus the process's own files.
        let available = open_files_limit().saturating_sub(256) / 2;
        let scale = |n: usize| if available >= full { n } else { (n * available / full).max(8) };
        let sizes = Self {
            silent: scale(SILENT),
            half_hellos: scale(HALF_HELLOS),
            slow_headers: scale(SLOW_HEADERS),
            max_connections: scale(MAX_CONNECTIONS).max(8),
        };
        if available < full {
            eprintln!("open-files limit {}: flood scaled down to {sizes:?}", open_files_limit());
        }
        sizes
    }

    fn flags(&self, prefix: &str) -> Vec<String> {
        LIMITS
            .iter()
            .map(|(flag, value)| format!("--{prefix}{flag}={value}"))
            .chain([format!("--{prefix}max-connections={}", self.max_connections)])
            .collect()
    }
}

/// The soft limit on open files of this process (`ulimit -n`).
fn open_files_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024)
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time used so far by process `pid`, in clock ticks (user + system).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields after it are space-separated.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// A TLS client trusting only `ca_pem`, speaking HTTP/1.1.
fn connector(ca_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// One server under test and the valid request it must keep answering.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    pid: u32,
    connector: TlsConnector,
    /// A complete HTTP/1.1 request (kept alive), answered with 200.
    valid: Vec<u8>,
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

impl Target {
    async fn tls(&self) -> std::io::Result<Tls> {
        let tcp = TcpStream::connect(self.addr).await?;
        self.connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
    }

    /// Sends the valid request on `stream` and reads the answer, within [`PATIENCE`]; its
    /// status.
    async fn ask(&self, stream: &mut Tls) -> Result<u16, String> {
        let asked = async {
            stream.write_all(&self.valid).await.map_err(|e| format!("sending: {e}"))?;
            read_response(stream).await
        };
        tokio::time::timeout(PATIENCE, asked).await.map_err(|_| format!("no answer within {PATIENCE:?}"))?
    }

    /// The valid request on a new connection; its status.
    async fn ask_fresh(&self) -> Result<u16, String> {
        let mut stream = self.tls().await.map_err(|e| format!("connecting: {e}"))?;
        self.ask(&mut stream).await
    }
}

/// Reads one HTTP/1.1 response with a `content-length`; its status.
async fn read_response(stream: &mut Tls) -> Result<u16, String> {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Err(format!("closed mid-response after {} bytes", text.len()));
        }
        text.extend_from_slice(&buf[..n]);
        let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&text[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no content-length in {head:?}"))?;
        if text.len() >= end + 4 + length {
            let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            return status.ok_or_else(|| format!("no status in {head:?}"));
        }
    }
}

/// Waits until the peer closes `stream` (end of stream or an error); `false` if it is
/// still open at `deadline`.
async fn closed_by_server(stream: &mut (impl AsyncRead + Unpin), deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout_at(deadline, async {
        loop {
            if matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// How long a silent connection stays silent. Beyond the connection limit and a full
/// listen backlog, the kernel may complete a client's handshake (a SYN cookie) but drop
/// its last ACK: the client believes it is connected, the server never sees the
/// connection and holds nothing for it, and nothing tells the client until it sends.
/// So a silent connection still open after this long sends one byte: a server that
/// holds it sees the start of a TLS record and keeps waiting, one that does not resets
/// it or (accepting it then) closes it after its handshake timeout.
const SILENT_PROBE_AFTER: Duration = Duration::from_secs(10);

/// Writes a byte every 300 ms until the server closes `stream`; `false` if it is still
/// open at `deadline`.
async fn dribble_until_closed(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout_at(deadline, async {
        loop {
            tokio::select! {
                read = stream.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { return },
                () = tokio::time::sleep(Duration::from_millis(300)) => {
                    if stream.write_all(b"a").await.and(stream.flush().await).is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
    .is_ok()
}

/// The start of a TLS 1.2+ ClientHello record: a 512-byte record announced, 6 bytes sent.
const HALF_CLIENT_HELLO: [u8; 11] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Silent,
    HalfHello,
    SlowHeaders,
}

/// What one bad connection saw: whether it connected, and whether the server closed it.
#[derive(Debug)]
struct Seen {
    kind: Kind,
    connected: bool,
    closed: bool,
}

/// Where the bad connections of one flood stand.
struct Flood {
    /// Bad connections open at once at most.
    room: Semaphore,
    /// Bad connections made so far.
    connected: AtomicUsize,
    deadline: Instant,
}

async fn bad_connection(target: Arc<Target>, kind: Kind, flood: Arc<Flood>) -> Seen {
    let not_connected = Seen { kind, connected: false, closed: false };
    let deadline = flood.deadline;
    let Ok(Ok(_room)) = tokio::time::timeout_at(deadline, flood.room.acquire()).await else { return not_connected };
    let Ok(Ok(mut tcp)) = tokio::time::timeout_at(deadline, TcpStream::connect(target.addr)).await else {
        return not_connected;
    };
    flood.connected.fetch_add(1, Ordering::Relaxed);
    let closed = match kind {
        Kind::Silent => {
            let probe_at = (Instant::now() + SILENT_PROBE_AFTER).min(deadline - Duration::from_secs(5));
            closed_by_server(&mut tcp, probe_at).await
                || tcp.write_all(&[0x16]).await.is_err()
                || closed_by_server(&mut tcp, deadline).await
        }
        Kind::HalfHello => {
            tcp.write_all(&HALF_CLIENT_HELLO).await.is_err() || closed_by_server(&mut tcp, deadline).await
        }
        Kind::SlowHeaders => {
            let name = ServerName::try_from("localhost").unwrap();
            let handshake = tokio::time::timeout_at(deadline, target.connector.connect(name, tcp)).await;
            let Ok(Ok(mut tls)) = handshake else { return not_connected };
            let start = format!("POST /whatever HTTP/1.1\r\nhost: localhost\r\nx-{}: ", target.name);
            tls.write_all(start.as_bytes()).await.is_err() || dribble_until_closed(&mut tls, deadline).await
        }
    };
    Seen { kind, connected: true, closed }
}

/// What a flood against one server showed.
#[derive(Debug)]
struct Outcome {
    /// Per kind: connections made, and how many of them the server closed.
    seen: Vec<(Kind, usize, usize)>,
    /// Valid requests answered 200 on the kept-alive connection, and the first failure.
    kept_alive: (usize, Option<String>),
    /// Results of the valid requests on fresh connections.
    fresh: Vec<Result<u16, String>>,
    /// Open file descriptors of the server: before the flood and the most during it.
    fds: (usize, usize),
    /// The most resident memory of the server during the flood, KiB.
    max_rss_kib: u64,
}

async fn flood(target: Target, sizes: Sizes) -> Outcome {
    let deadline = Instant::now() + PATIENCE;
    let target = Arc::new(target);
    let baseline_fds = open_fds(target.pid);

    // A client that was connected before the flood, sending a valid request every 200 ms
    // on the same connection (well within the header timeout between requests).
    let stop = Arc::new(AtomicBool::new(false));
    let mut kept = target.tls().await.expect("a kept-alive connection before the flood");
    let kept_alive = tokio::spawn({
        let (target, stop) = (target.clone(), stop.clone());
        async move {
            let mut answered = 0;
            while !stop.load(Ordering::Relaxed) {
                match target.ask(&mut kept).await {
                    Ok(200) => answered += 1,
                    Ok(status) => return (answered, Some(format!("status {status}"))),
                    Err(e) => return (answered, Some(e)),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (answered, None)
        }
    });
    let max_fds = Arc::new(AtomicUsize::new(0));
    let max_rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = tokio::spawn({
        let (pid, stop, max_fds, max_rss) = (target.pid, stop.clone(), max_fds.clone(), max_rss.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                max_fds.fetch_max(open_fds(pid), Ordering::Relaxed);
                max_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    // As many bad connections at once as the server holds plus its listen backlog:
    // the server is kept at its limit with a full backlog throughout, and a bad
    // connection that ends makes room for the next.
    let bad = Arc::new(Flood {
        room: Semaphore::new(sizes.max_connections + LISTEN_BACKLOG - 64),
        connected: AtomicUsize::new(0),
        deadline,
    });
    let mut attackers = JoinSet::new();
    for (kind, count) in
        [(Kind::SlowHeaders, sizes.slow_headers), (Kind::HalfHello, sizes.half_hellos), (Kind::Silent, sizes.silent)]
    {
        for _ in 0..count {
            attackers.spawn(bad_connection(target.clone(), kind, bad.clone()));
        }
    }
    // New clients once the server is full: each waits for a free slot, then is answered.
    while bad.connected.load(Ordering::Relaxed) < sizes.max_connections + 64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fresh = Vec::new();
    for _ in 0..FRESH_REQUESTS {
        let answer = tokio::time::timeout_at(deadline, target.ask_fresh()).await;
        fresh.push(answer.unwrap_or_else(|_| Err("no answer before the deadline".into())));
    }
    let seen: Vec<Seen> = attackers.join_all().await;
    stop.store(true, Ordering::Relaxed);
    let kept_alive = kept_alive.await.unwrap();
    sampler.await.unwrap();
    let seen = [Kind::SlowHeaders, Kind::HalfHello, Kind::Silent]
        .into_iter()
        .map(|kind| {
            let of_kind = seen.iter().filter(|s| s.kind == kind);
            (kind, of_kind.clone().filter(|s| s.connected).count(), of_kind.filter(|s| s.closed).count())
        })
        .collect();
    Outcome {
        seen,
        kept_alive,
        fresh,
        fds: (baseline_fds, max_fds.load(Ordering::Relaxed)),
        max_rss_kib: max_rss.load(Ordering::Relaxed),
    }
}

fn check(name: &str, outcome: &Outcome, sizes: Sizes) {
    eprintln!("{name}: {outcome:?}");
    for (kind, connected, closed) in &outcome.seen {
        let attempted = match kind {
            Kind::Silent => sizes.silent,
            Kind::HalfHello => sizes.half_hellos,
            Kind::SlowHeaders => sizes.slow_headers,
        };
        assert_eq!(*connected, attempted, "{name}: every {kind:?} connection gets in eventually");
        assert_eq!(closed, connected, "{name}: the server closes every {kind:?} connection after its timeout");
    }
    let (answered, failure) = &outcome.kept_alive;
    assert_eq!(failure, &None, "{name}: the kept-alive client is served throughout ({answered} answers)");
    assert!(*answered >= 3, "{name}: the kept-alive client got {answered} answers");
    assert!(outcome.fresh.iter().all(|r| r == &Ok(200)), "{name}: new clients are answered: {:?}", outcome.fresh);
    let (baseline, max) = outcome.fds;
    assert!(
        max <= baseline + sizes.max_connections + 32,
        "{name}: {max} files open, {baseline} before the flood: more connections than the limit of {}",
        sizes.max_connections
    );
    assert!(outcome.max_rss_kib <= MAX_RSS_KIB, "{name}: {} KiB resident", outcome.max_rss_kib);
}

fn admission_review() -> Vec<u8> {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default"},
                     "spec": {"containers": [{"name": "web", "image": "web:1"}]}});
    let request = json!({
        "uid": "5b1bb8a6-0000-4000-8000-000000000001",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "default", "operation": "CREATE", "userInfo": {"username": "alice"}, "object": pod,
    });
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}).to_string();
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    [head.into_bytes(), body.into_bytes()].concat()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a URL with a port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_do_not_take_the_servers_down() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let sizes = Sizes::for_this_process();
    let operator = workspace_binary("cloudpass-operator").unwrap();
    let webhook_binary = workspace_binary("cloudpass-webhook").unwrap();
    let options =
        BrokerOptions { namespace: "cloudpass-limits".into(), log_level: "warn".into(), ..Default::default() };
    let broker = RunningBroker::start_with(cp, &operator, &options, &sizes.flags("broker-")).await.unwrap();
    let webhook =
        RunningWebhook::start_with(cp, &webhook_binary, &broker, &options.namespace, &sizes.flags("")).await.unwrap();

    let broker_target = Target {
        name: "broker",
        addr: SocketAddr::from(([127, 0, 0, 1], port_of(&broker.url))),
        pid: broker.process.pid().unwrap(),
        connector: connector(&broker.ca.cert_pem()),
        valid: b"GET /.well-known/openid-configuration HTTP/1.1\r\nhost: localhost\r\n\r\n".to_vec(),
    };
    let webhook_target = Target {
        name: "webhook",
        addr: SocketAddr::from(([127, 0, 0, 1], port_of(&webhook.url))),
        pid: webhook.pid().unwrap(),
        connector: connector(&webhook.ca.cert_pem()),
        valid: admission_review(),
    };
    let started = std::time::Instant::now();
    let (broker_outcome, webhook_outcome) = tokio::join!(flood(broker_target, sizes), flood(webhook_target, sizes));
    eprintln!("flood of {sizes:?} against both servers: {:.1} s", started.elapsed().as_secs_f64());
    check("broker", &broker_outcome, sizes);
    check("webhook", &webhook_outcome, sizes);
}

/// Files the webhook may open in the next test: enough to start, too few for the
/// connections sent to it.
const FD_LIMIT: usize = 64;
/// Connections sent to that webhook: more than it has files for.
const FD_FLOOD: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_server_pauses_instead_of_spinning() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let binary = workspace_binary("cloudpass-webhook").unwrap();
    let dir = cp.dir().join("webhook-out-of-files");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("webhook-out-of-files").unwrap();
    let serving = ca.issue_server(&[]).unwrap();
    std::fs::write(dir.join("tls.crt"), &serving.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &serving.key_pem).unwrap();
    let port = free_port().unwrap();
    let args: Vec<String> = [
        "-c".to_owned(),
        format!("ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\""),
        binary.to_string_lossy().into_owned(),
        "--namespace=cloudpass-system".into(),
        format!("--listen-addr=127.0.0.1:{port}"),
        "--cert-mode=files".into(),
        format!("--tls-cert-file={}", dir.join("tls.crt").display()),
        format!("--tls-key-file={}", dir.join("tls.key").display()),
        // Connections stay open long enough to keep the process out of files.
        "--handshake-timeout=60s".into(),
        "--max-connections=1024".into(),
        "--log-format=json".into(),
    ]
    .into();
    let log = dir.join("webhook.log");
    let kubeconfig = cp.kubeconfig.to_string_lossy().into_owned();
    let mut process = ManagedProcess::spawn(
        "webhook-out-of-files",
        Path::new("/bin/sh"),
        &args,
        &log,
        &[("KUBECONFIG", &kubeconfig)],
    )
    .unwrap();
    let target = Target {
        name: "webhook",
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        pid: process.pid().unwrap(),
        connector: connector(&ca.cert_pem()),
        valid: b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n".to_vec(),
    };
    process.wait_until("/healthz", PATIENCE, || async { target.ask_fresh().await == Ok(200) }).await.unwrap();

    let mut silent = Vec::new();
    for _ in 0..FD_FLOOD {
        silent.push(TcpStream::connect(target.addr).await.unwrap());
    }
    // Out of files: every further accept fails until connections end.
    let pid = target.pid;
    process.wait_until("all files in use", PATIENCE, || async move { open_fds(pid) >= FD_LIMIT }).await.unwrap();
    // Three seconds out of files: the CPU time it costs. Retrying accept at once would
    // take a core for all of it; pausing costs next to nothing.
    let (ticks_per_second, window) = (100, 3);
    let before = cpu_ticks(target.pid);
    tokio::time::sleep(Duration::from_secs(window)).await;
    let used = cpu_ticks(target.pid) - before;
    eprintln!("out of files for {window} s: {used} clock ticks of CPU");
    assert!(
        used < ticks_per_second * window / 4,
        "{used} clock ticks of CPU in {window} s while out of files: accept is retried without a pause"
    );

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let pauses = text.lines().filter(|l| l.contains("cannot accept connections; pausing")).count();
    assert!(pauses >= 1, "the failed accepts are logged");

    // Once connections end, new clients are served again.
    drop(silent);
    let answer = tokio::time::timeout(PATIENCE, target.ask_fresh()).await;
    assert_eq!(answer.ok(), Some(Ok(200)), "served again once files are free:\n{}", process.log_tail(2000));
}
