//! HTTPS with a serving certificate that can be replaced at run time: new handshakes get
//! the new certificate, open connections are not dropped; and plain HTTP for public
//! documents, health and metrics. Every connection is served within [`ServerLimits`]: handshake, header, idle and request timeouts and a cap on
//! connections, so that idle or slow clients cannot exhaust the server.

use std::{
    convert::Infallible,
    fmt,
    io::ErrorKind,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Bytes, HttpBody},
    http::{Request, StatusCode},
    response::IntoResponse,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use rustls::{
    crypto::aws_lc_rs,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::Error;

/// The current serving certificate, swappable.
#[derive(Default)]
pub struct ReloadableCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReloadableCert")
    }
}

impl ReloadableCert {
    /// Installs a certificate chain and key (PEM), only if the key is the one of the
    /// chain's first certificate: a mismatched pair (a certificate file already replaced,
    /// its key not yet) is refused and the current pair stays.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<(), Error> {
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Certificate(format!("serving certificate: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Certificate("serving certificate: no certificate in the PEM text".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("serving key: {e}")))?;
        let signing = aws_lc_rs::sign::any_supported_type(&key).map_err(|e| Error::Certificate(e.to_string()))?;
        let pair = CertifiedKey::new(certs, signing);
        pair.keys_match().map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                Error::Certificate("the serving key does not belong to the serving certificate".into())
            }
            other => Error::Certificate(format!("serving certificate: {other}")),
        })?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(pair));
        Ok(())
    }

    /// Whether a certificate is installed.
    pub fn is_loaded(&self) -> bool {
        self.current.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What one client may cost an HTTPS server: how long it may take at each step and how
/// many may be connected at once. The broker and the webhook use the same limits (each
/// with its own flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Time from accepting a connection to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's headers. For HTTP/1.1 it also bounds the
    /// wait for the next request on a kept-alive connection; for HTTP/2, the wait for the
    /// first request of a connection.
    pub header_read_timeout: Duration,
    /// How long a connection with no request in progress stays open (HTTP/2; HTTP/1.1
    /// connections are closed earlier by `header_read_timeout`).
    pub idle_timeout: Duration,
    /// Time from a request's headers to its answer, reading the body included; past it
    /// the client gets `503` and the handler is stopped.
    pub request_timeout: Duration,
    /// Connections served at once. Beyond it new connections wait in the kernel's listen
    /// backlog until one ends; the connections already open keep being served.
    pub max_connections: usize,
}

impl ServerLimits {
    /// Default of [`ServerLimits::handshake_timeout`], as a flag value.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: &str = "10s";
    /// Default of [`ServerLimits::header_read_timeout`], as a flag value.
    pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "10s";
    /// Default of [`ServerLimits::idle_timeout`], as a flag value.
    pub const DEFAULT_IDLE_TIMEOUT: &str = "90s";
    /// Default of [`ServerLimits::request_timeout`], as a flag value.
    pub const DEFAULT_REQUEST_TIMEOUT: &str = "60s";
    /// Default of [`ServerLimits::max_connections`].
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

    /// Refuses limits that would refuse every client: a zero timeout or connection limit.
    pub fn check(&self) -> Result<(), Error> {
        let timeouts = [
            ("handshake timeout", self.handshake_timeout),
            ("header read timeout", self.header_read_timeout),
            ("idle timeout", self.idle_timeout),
            ("request timeout", self.request_timeout),
        ];
        let zero = timeouts.iter().find(|(_, d)| d.is_zero()).map(|(what, _)| format!("the {what} must not be zero"));
        let zero =
            zero.or_else(|| (self.max_connections == 0).then(|| "the connection limit must be at least 1".into()));
        match zero {
            Some(why) => Err(Error::Io(std::io::Error::new(ErrorKind::InvalidInput, why))),
            None => Ok(()),
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            request_timeout: Duration::from_secs(60),
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Connections the kernel queues for the server beyond those it serves (beyond
/// [`ServerLimits::max_connections`]; further ones are refused or retried by clients).
pub const LISTEN_BACKLOG: u32 = 1024;

/// First pause after a failed `accept` (e.g. `EMFILE`: out of file descriptors); it
/// doubles on each further failure up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(50);
/// Longest pause after failed `accept`s.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Serves `router` over HTTPS on `addr` with the certificate in `cert` and the `limits`,
/// until the process ends, counting accepted connections in `connections`. Returns the
/// bound address.
pub async fn serve(
    addr: SocketAddr,
    router: axum::Router,
    cert: Arc<ReloadableCert>,
    connections: prometheus_client::metrics::counter::Counter,
    limits: ServerLimits,
) -> Result<SocketAddr, Error> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    start(addr, router, Some(TlsAcceptor::from(Arc::new(config))), connections, limits)
}

/// Serves `router` over plain HTTP/1.1 on `addr` within the same `limits` as [`serve`]
/// (the handshake timeout aside), for endpoints that are not secret: the issuer's
/// public documents, health and metrics. Returns the bound address.
pub async fn serve_plain(
    addr: SocketAddr,
    router: axum::Router,
    connections: prometheus_client::metrics::counter::Counter,
    limits: ServerLimits,
) -> Result<SocketAddr, Error> {
    start(addr, router, None, connections, limits)
}

fn start(
    addr: SocketAddr,
    router: axum::Router,
    acceptor: Option<TlsAcceptor>,
    connections: prometheus_client::metrics::counter::Counter,
    limits: ServerLimits,
) -> Result<SocketAddr, Error> {
    limits.check()?;
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(LISTEN_BACKLOG)?;
    let bound = listener.local_addr()?;
    // The protocol is known from ALPN once the handshake is done, so each connection
    // goes straight to its protocol (auto-detection would read without a deadline).
    let mut http1 = auto::Builder::new(TokioExecutor::new()).http1_only();
    http1.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let mut http2 = auto::Builder::new(TokioExecutor::new()).http2_only();
    http2.http2().timer(TokioTimer::new());
    let server = Arc::new(Server { acceptor, router, limits, http1, http2, connections });
    tokio::spawn(server.accept_loop(listener));
    Ok(bound)
}

/// One server: what every connection shares.
struct Server {
    /// `None`: plain HTTP/1.1.
    acceptor: Option<TlsAcceptor>,
    router: axum::Router,
    limits: ServerLimits,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
    connections: prometheus_client::metrics::counter::Counter,
}

impl Server {
    /// Accepts connections while fewer than `max_connections` are open, each served on
    /// its own task; pauses after failed accepts instead of retrying at once.
    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let mut pause = ACCEPT_PAUSE_MIN;
        loop {
            // At the limit the listener is not polled: new connections queue in the
            // kernel's backlog until a slot is free.
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => {
                    pause = ACCEPT_PAUSE_MIN;
                    tcp
                }
                // The client gave up before we took the connection: nothing to wait for.
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) => continue,
                Err(e) => {
                    // Out of file descriptors, memory or buffers: retrying at once would
                    // spin on the same error. Open connections keep being served.
                    warn!(error = %e, pause_ms = pause.as_millis() as u64, "cannot accept connections; pausing");
                    drop(slot);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                    continue;
                }
            };
            self.connections.inc();
            let server = self.clone();
            tokio::spawn(async move {
                server.connection(tcp).await;
                drop(slot);
            });
        }
    }

    /// Serves one connection within the limits.
    async fn connection(self: Arc<Self>, tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = &self.acceptor else {
            return self.http(tcp, false).await;
        };
        let tls = match tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return;
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        self.http(tls, h2).await;
    }

    /// Serves HTTP on an established stream until the client closes it, or it has been
    /// idle too long.
    async fn http<I>(&self, io: I, h2: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let builder = if h2 { &self.http2 } else { &self.http1 };
        let activity = Arc::new(Activity::new());
        let service =
            Limited { router: self.router.clone(), activity: activity.clone(), timeout: self.limits.request_timeout };
        let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            () = activity.idle(self.limits.header_read_timeout, self.limits.idle_timeout) => {}
        }
        // Idle: close it (an HTTP/2 client is told with GOAWAY), waiting a bounded time
        // for the close to go out.
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(self.limits.header_read_timeout, conn).await;
    }
}

/// Requests in progress on one connection, and when the last one started or ended.
struct Activity {
    in_flight: AtomicUsize,
    served: AtomicBool,
    last: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self { in_flight: AtomicUsize::new(0), served: AtomicBool::new(false), last: Mutex::new(Instant::now()) }
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Counts a request until the guard is dropped.
    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Returns once no request has been in progress for `idle` (`first` before the
    /// first request).
    async fn idle(&self, first: Duration, idle: Duration) {
        loop {
            let limit = if self.served.load(Ordering::Relaxed) { idle } else { first };
            let deadline = *self.last.lock().unwrap_or_else(|e| e.into_inner()) + limit;
            let now = Instant::now();
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // Bounded by the request timeout; look again later.
                tokio::time::sleep_until(deadline.max(now + limit)).await;
            } else if now >= deadline {
                return;
            } else {
                tokio::time::sleep_until(deadline).await;
            }
        }
    }
}

/// A request in progress.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router with the request timeout, counting requests in progress.
#[derive(Clone)]
struct Limited {
    router: axum::Router,
    activity: Arc<Activity>,
    timeout: Duration,
}

impl<B> tower::Service<Request<B>> for Limited
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let guard = self.activity.start();
        let timeout = self.timeout;
        let answer = self.router.clone().oneshot(request);
        Box::pin(async move {
            let _guard = guard;
            match tokio::time::timeout(timeout, answer).await {
                Ok(answer) => answer,
                Err(_) => Ok((
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("request not completed within {} s", timeout.as_secs_f64()),
                )
                    .into_response()),
            }
        })
    }
}

/// Loads the certificate files when their content changed; `Ok(true)` when reloaded.
fn reload_files(
    cert: &ReloadableCert,
    files: &(PathBuf, PathBuf),
    last: &mut Option<(String, String)>,
) -> Result<bool, String> {
    let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let pair = (read(&files.0)?, read(&files.1)?);
    if last.as_ref() == Some(&pair) {
        return Ok(false);
    }
    cert.set(&pair.0, &pair.1).map_err(|e| e.to_string())?;
    *last = Some(pair);
    Ok(true)
}

/// How soon files that could not be loaded are read again (at most `interval`): a
/// certificate and key replaced one after the other are read between the two writes.
const RELOAD_RETRY: Duration = Duration::from_secs(1);

/// Installs the certificate and key files into `cert` now (a failure is logged: the
/// files may appear later, e.g. from cert-manager) and re-reads them every `interval`,
/// calling `on_reload` whenever their content changed. A pair that cannot be loaded (a
/// key that does not match the certificate, mid-rotation) leaves the current pair in
/// place and is read again within a second.
pub fn watch_files(
    cert: Arc<ReloadableCert>,
    cert_file: PathBuf,
    key_file: PathBuf,
    interval: Duration,
    on_reload: impl Fn() + Send + 'static,
) {
    let files = (cert_file, key_file);
    let mut last = None;
    let mut failed = reload_files(&cert, &files, &mut last).err();
    if let Some(e) = &failed {
        warn!(error = %e, "serving certificate files not loaded yet");
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(if failed.is_some() { interval.min(RELOAD_RETRY) } else { interval }).await;
            match reload_files(&cert, &files, &mut last) {
                Ok(reloaded) => {
                    failed = None;
                    if reloaded {
                        on_reload();
                        tracing::info!("serving certificate reloaded from files");
                    }
                }
                Err(e) => {
                    // Logged once per distinct problem, not once a second.
                    if failed.as_ref() != Some(&e) {
                        warn!(error = %e, "serving certificate files not loaded; keeping the current certificate");
                    }
                    failed = Some(e);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use axum::routing::{get, post};
    use rcgen::{CertificateParams, Issuer, KeyPair};
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsConnector, client::TlsStream};

    use super::*;

    /// Bound on every wait for the server to act: far above the limits under test, only
    /// reached when the server does not act at all.
    const PATIENCE: Duration = Duration::from_secs(20);

    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl TestCa {
        fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let pem = params.self_signed(&key).unwrap().pem();
            Self { issuer: Issuer::new(params, key), pem }
        }

        /// A serving certificate for `localhost` and its key (PEM).
        fn leaf(&self) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let cert =
                CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        fn connector(&self, alpn: &[u8]) -> TlsConnector {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap()).unwrap();
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![alpn.to_vec()];
            TlsConnector::from(Arc::new(config))
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn router() -> axum::Router {
        axum::Router::new().route("/", get(|| async { "ok" })).route("/echo", post(|body: Bytes| async move { body }))
    }

    async fn start(ca: &TestCa, limits: ServerLimits) -> SocketAddr {
        let cert = Arc::new(ReloadableCert::default());
        let (pem, key) = ca.leaf();
        cert.set(&pem, &key).unwrap();
        serve((Ipv4Addr::LOCALHOST, 0).into(), router(), cert, Default::default(), limits).await.unwrap()
    }

    async fn tls(ca: &TestCa, addr: SocketAddr, alpn: &[u8]) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        ca.connector(alpn).connect(ServerName::try_from("localhost").unwrap(), tcp).await
    }

    /// The certificate a new handshake gets.
    async fn served_cert(ca: &TestCa, addr: SocketAddr) -> std::io::Result<CertificateDer<'static>> {
        let stream = tls(ca, addr, b"http/1.1").await?;
        Ok(stream.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned())
    }

    /// `GET /` on a new HTTP/1.1 connection; the response text.
    async fn get_once(ca: &TestCa, addr: SocketAddr) -> String {
        let mut stream = tls(ca, addr, b"http/1.1").await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    }

    /// Reads one HTTP/1.1 response with a `content-length`.
    async fn read_response(stream: &mut TlsStream<TcpStream>) -> String {
        let mut text = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&text));
            text.extend_from_slice(&buf[..n]);
            let shown = String::from_utf8_lossy(&text).into_owned();
            if let Some((head, body)) = shown.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .expect("a content-length");
                if body.len() >= length {
                    return shown;
                }
            }
        }
    }

    /// Waits until the server closes `stream` (end of stream or an error), reading and
    /// discarding what it sends; `false` if it is still open after [`PATIENCE`].
    async fn closed_by_server(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> bool {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(PATIENCE, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// Sends a header byte every 200 ms until the server closes `stream`; `false` if it
    /// is still open after [`PATIENCE`].
    async fn closed_while_dribbling(stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin)) -> bool {
        let mut buf = [0u8; 256];
        tokio::time::timeout(PATIENCE, async {
            loop {
                tokio::select! {
                    read = stream.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { return },
                    () = tokio::time::sleep(Duration::from_millis(200)) => {
                        if stream.write_all(b"a").await.is_err() { return }
                    }
                }
            }
        })
        .await
        .is_ok()
    }

    fn quick_limits() -> ServerLimits {
        ServerLimits {
            handshake_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            max_connections: 4,
        }
    }

    #[tokio::test]
    async fn a_key_that_does_not_match_the_certificate_keeps_the_previous_pair() {
        let ca = TestCa::new();
        let (old_cert, old_key) = ca.leaf();
        let (new_cert, new_key) = ca.leaf();
        let dir = tempfile::tempdir().unwrap();
        let files = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&files.0, &old_cert).unwrap();
        std::fs::write(&files.1, &old_key).unwrap();
        let cert = Arc::new(ReloadableCert::default());
        let mut last = None;
        assert_eq!(reload_files(&cert, &files, &mut last), Ok(true));
        let addr = serve((Ipv4Addr::LOCALHOST, 0).into(), router(), cert.clone(), Default::default(), quick_limits())
            .await
            .unwrap();
        assert_eq!(served_cert(&ca, addr).await.unwrap(), der(&old_cert));

        // cert-manager rotating the Secret, read between the two files: the new
        // certificate with the old key.
        std::fs::write(&files.0, &new_cert).unwrap();
        let refused = reload_files(&cert, &files, &mut last).unwrap_err();
        assert!(refused.contains("does not belong to the serving certificate"), "{refused}");
        assert_eq!(served_cert(&ca, addr).await.unwrap(), der(&old_cert), "the previous pair keeps being served");

        std::fs::write(&files.1, &new_key).unwrap();
        assert_eq!(reload_files(&cert, &files, &mut last), Ok(true), "the matching key loads the new pair");
        assert_eq!(served_cert(&ca, addr).await.unwrap(), der(&new_cert));
        assert_eq!(reload_files(&cert, &files, &mut last), Ok(false), "nothing changed since");
    }

    #[test]
    fn an_empty_chain_or_a_foreign_key_is_refused() {
        let ca = TestCa::new();
        let (cert_pem, _) = ca.leaf();
        let (_, other_key) = ca.leaf();
        let cert = ReloadableCert::default();
        assert!(cert.set("", &other_key).is_err());
        assert!(cert.set(&cert_pem, &other_key).is_err());
        assert!(!cert.is_loaded());
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(ServerLimits::default().check().is_ok());
        assert!(ServerLimits { max_connections: 0, ..Default::default() }.check().is_err());
        assert!(ServerLimits { handshake_timeout: Duration::ZERO, ..Default::default() }.check().is_err());
    }

    #[tokio::test]
    async fn silent_and_slow_clients_are_closed_while_valid_ones_are_served() {
        let ca = TestCa::new();
        let limits = quick_limits();
        let addr = start(&ca, limits).await;
        // Every slot taken: two connections that never send, one that starts a TLS
        // handshake and stops, one that sends request headers a byte at a time.
        let (mut silent_a, mut silent_b) =
            (TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap());
        let mut half_hello = TcpStream::connect(addr).await.unwrap();
        half_hello.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).await.unwrap();
        let mut slow = tls(&ca, addr, b"http/1.1").await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nx-slow: ").await.unwrap();
        let slow_closed = closed_while_dribbling(&mut slow);
        // A valid client waits for a free slot (at most a timeout), then is answered.
        let (valid, slow_closed, half_closed, silent_0, silent_1) = tokio::join!(
            tokio::time::timeout(PATIENCE, get_once(&ca, addr)),
            slow_closed,
            closed_by_server(&mut half_hello),
            closed_by_server(&mut silent_a),
            closed_by_server(&mut silent_b),
        );
        assert!(valid.expect("a valid request is answered").starts_with("HTTP/1.1 200"));
        assert!(slow_closed, "headers sent a byte at a time are cut off by the header timeout");
        assert!(half_closed, "an unfinished TLS handshake is cut off");
        assert!(silent_0 && silent_1, "connections that send nothing are closed");
    }

    /// Finding: the plain-HTTP listeners (the issuer's documents, health and metrics)
    /// were served without any limit.
    #[tokio::test]
    async fn plain_http_closes_silent_and_slow_clients_and_serves_valid_ones() {
        let addr =
            serve_plain((Ipv4Addr::LOCALHOST, 0).into(), router(), Default::default(), quick_limits()).await.unwrap();
        let (mut silent_a, mut silent_b) =
            (TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap());
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nx-slow: ").await.unwrap();
        let slow_closed = closed_while_dribbling(&mut slow);
        let valid = async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).await.unwrap();
            text
        };
        let (valid, slow_closed, silent_0, silent_1) = tokio::join!(
            tokio::time::timeout(PATIENCE, valid),
            slow_closed,
            closed_by_server(&mut silent_a),
            closed_by_server(&mut silent_b),
        );
        assert!(valid.expect("a valid request is answered").starts_with("HTTP/1.1 200"));
        assert!(slow_closed, "headers sent a byte at a time are cut off by the header timeout");
        assert!(silent_0 && silent_1, "connections that send nothing are closed");
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_served_while_the_others_wait_and_is_closed_when_idle() {
        let ca = TestCa::new();
        let limits = ServerLimits { max_connections: 1, ..quick_limits() };
        let addr = start(&ca, limits).await;
        let mut kept = tls(&ca, addr, b"http/1.1").await.unwrap();
        // The only slot is taken: a second client's handshake cannot even start.
        let waiting = tokio::spawn({
            let connector = ca.connector(b"http/1.1");
            async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.is_ok()
            }
        });
        for _ in 0..5 {
            kept.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
            let response = read_response(&mut kept).await;
            assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("\r\n\r\nok"), "{response}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(!waiting.is_finished(), "beyond the limit a connection waits in the backlog");
        // Idle now: closed after the header timeout, which frees the slot.
        assert!(closed_by_server(&mut kept).await);
        assert!(tokio::time::timeout(PATIENCE, waiting).await.unwrap().unwrap(), "the waiting client gets the slot");
    }

    #[tokio::test]
    async fn a_request_body_that_never_ends_gets_503_at_the_request_timeout() {
        let ca = TestCa::new();
        let addr = start(&ca, quick_limits()).await;
        let mut stream = tls(&ca, addr, b"http/1.1").await.unwrap();
        stream.write_all(b"POST /echo HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\nabc").await.unwrap();
        let mut text = String::new();
        let read = tokio::time::timeout(PATIENCE, stream.read_to_string(&mut text)).await;
        assert!(read.is_ok(), "the server answers and closes");
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    }

    #[tokio::test]
    async fn http2_connections_are_closed_when_idle() {
        let ca = TestCa::new();
        let addr = start(&ca, quick_limits()).await;
        let stream = tls(&ca, addr, b"h2").await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut client, connection) = h2::client::handshake(stream).await.unwrap();
        let connection = tokio::spawn(connection);
        for _ in 0..3 {
            client = client.ready().await.unwrap();
            let request = Request::get("https://localhost/").body(()).unwrap();
            let (response, _) = client.send_request(request, true).unwrap();
            let response = response.await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let mut body = response.into_body();
            while let Some(chunk) = body.data().await {
                chunk.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // No request for the idle timeout: the server says GOAWAY and closes.
        let ended = tokio::time::timeout(PATIENCE, connection).await;
        assert!(ended.is_ok(), "an idle HTTP/2 connection is closed by the server");

        // One that never sends a request is closed after the header timeout.
        let stream = tls(&ca, addr, b"h2").await.unwrap();
        let (_client, connection) = h2::client::handshake(stream).await.unwrap();
        assert!(tokio::time::timeout(PATIENCE, connection).await.is_ok());
    }
}
