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
        let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &self.issuer).unwrap();
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
