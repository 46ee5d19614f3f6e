//! HTTPS with a serving certificate that can be replaced at run time: new handshakes get
//! the new certificate, open connections are not dropped.

use std::{
    fmt,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rustls::{
    crypto::aws_lc_rs,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

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
    /// Installs a certificate chain and key (PEM).
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<(), Error> {
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Certificate(format!("serving certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("serving key: {e}")))?;
        let signing = aws_lc_rs::sign::any_supported_type(&key).map_err(|e| Error::Certificate(e.to_string()))?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(CertifiedKey::new(certs, signing)));
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

/// Serves `router` over HTTPS on `addr` with the certificate in `cert`, until the
/// process ends, counting accepted connections in `connections`. Returns the bound
/// address.
pub async fn serve(
    addr: SocketAddr,
    router: axum::Router,
    cert: Arc<ReloadableCert>,
    connections: prometheus_client::metrics::counter::Counter,
) -> Result<SocketAddr, Error> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            connections.inc();
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await;
                }
            });
        }
    });
    Ok(bound)
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

/// Installs the certificate and key files into `cert` now (a failure is logged: the
/// files may appear later, e.g. from cert-manager) and re-reads them every `interval`,
/// calling `on_reload` whenever their content changed.
pub fn watch_files(
    cert: Arc<ReloadableCert>,
    cert_file: PathBuf,
    key_file: PathBuf,
    interval: std::time::Duration,
    on_reload: impl Fn() + Send + 'static,
) {
    let files = (cert_file, key_file);
    let mut last = None;
    if let Err(e) = reload_files(&cert, &files, &mut last) {
        tracing::warn!(error = %e, "serving certificate files not readable yet");
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            match reload_files(&cert, &files, &mut last) {
                Ok(true) => {
                    on_reload();
                    tracing::info!("serving certificate reloaded from files");
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "serving certificate files not readable"),
            }
        }
    });
}
