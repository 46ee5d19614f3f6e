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
use cloudpass_outbound::Retry;
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
        let mut pauses = Retry::new(ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX);
        loop {
            // At the limit the listener is not polled: new connections queue in the
            // kernel's backlog until a slot is free.
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => {
                    pauses.succeeded();
                    tcp
                }
                // The client gave up before we took the connection: nothing to wait for.
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) => continue,
                Err(e) => {
                    // Out of file descriptors, memory or buffers: retrying at once would
                    // spin on the same error. Open connections keep being served. One
                    // listener: no jitter needed.
                    let pause = pauses.failed(1.0);
                    warn!(error = %e, pause_ms = pause.as_millis() as u64, "cannot accept connections; pausing");
                    drop(slot);
                    tokio::time::sleep(pause).await;
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
mod tests;
