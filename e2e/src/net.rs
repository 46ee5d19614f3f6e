//! The test bed's view of the network: the one address its servers listen on, and the
//! names its clients resolve that no public DNS knows.
//!
//! Without a node, everything is on loopback. A suite with a real node calls
//! [`listen_on`] with the node IP first: pods reach the host only there, so the cloud
//! emulators, the fakes and moto listen there (and their certificates name it). The
//! cluster-internal issuer URL of a Helm-installed broker stands for a public one; the
//! cloud fakes, which fetch its keys as AWS, Entra ID and Google would over public DNS,
//! resolve it through [`resolve_as`] to the broker Service's address, which kube-proxy
//! routes on this host.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{OnceLock, RwLock},
};

use anyhow::{Result, bail};

static LISTEN: OnceLock<IpAddr> = OnceLock::new();
static NAMES: RwLock<BTreeMap<String, IpAddr>> = RwLock::new(BTreeMap::new());

/// The address test servers listen on: loopback, or what [`listen_on`] set.
pub fn listen_address() -> IpAddr {
    *LISTEN.get().unwrap_or(&IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// Makes every test server of this process listen on `address` (once, before the first
/// server starts; the same address again is fine).
pub fn listen_on(address: IpAddr) -> Result<()> {
    let set = *LISTEN.get_or_init(|| address);
    if set != address {
        bail!("the test bed already listens on {set}, not {address}");
    }
    Ok(())
}

/// `scheme://<listen address>:<port>` (IPv6 in brackets).
pub fn local_url(scheme: &str, port: u16) -> String {
    format!("{scheme}://{}:{port}", crate::control_plane::host_in_url(listen_address()))
}

/// Makes the test bed's HTTP clients resolve `host` to `address`.
pub fn resolve_as(host: &str, address: IpAddr) {
    NAMES.write().unwrap_or_else(|e| e.into_inner()).insert(host.to_owned(), address);
}

/// How long a test-bed HTTP request may take before it fails (instead of hanging a test).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `GET url` with a client that gives up after [`REQUEST_TIMEOUT`]: what tests use
/// instead of `reqwest::get`, whose client waits forever.
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    client_builder().build()?.get(url).send().await
}

/// An HTTP client builder that resolves the names of [`resolve_as`], with
/// [`REQUEST_TIMEOUT`].
pub fn client_builder() -> reqwest::ClientBuilder {
    let names = NAMES.read().unwrap_or_else(|e| e.into_inner());
    names
        .iter()
        // Port 0: the URL's port is used.
        .fold(reqwest::Client::builder().timeout(REQUEST_TIMEOUT), |builder, (host, ip)| {
            builder.resolve(host, SocketAddr::new(*ip, 0))
        })
}

/// A free TCP port on the listen address (bound and released; good enough for tests).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind((listen_address(), 0))?.local_addr()?.port())
}
