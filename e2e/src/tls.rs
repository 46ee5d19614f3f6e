//! HTTPS servers for tests (e.g. a trivial admission webhook the apiserver calls).

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::certs::CertPair;

/// A rustls server configuration from PEM material, with the workspace's crypto provider.
pub fn server_config(pair: &CertPair) -> Result<rustls::ServerConfig> {
    let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).context("parsing the private key")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `router` over HTTPS on a free port of the test bed's listen address
/// ([`crate::net::listen_address`]: loopback unless a node needs otherwise) until the
/// task is aborted; aborting it also closes every open connection, like a process that
/// stops.
pub async fn serve_https(router: axum::Router, pair: &CertPair) -> Result<(SocketAddr, JoinHandle<()>)> {
    let acceptor = TlsAcceptor::from(Arc::new(server_config(pair)?));
    let listener = TcpListener::bind((crate::net::listen_address(), 0)).await?;
    let addr = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        // Connections live in this set, so they end with the accept loop.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            while connections.try_join_next().is_some() {}
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(router.clone());
            connections.spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await;
                }
            });
        }
    });
    Ok((addr, handle))
}
