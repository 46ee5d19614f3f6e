//! Starting and stopping the agent: listeners on loopback, one per endpoint kind and
//! port, the refresh loop of every delivery, and a graceful stop.

use std::{
    collections::BTreeMap,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::Router;
use cloudpass_api::{
    agent::{AgentDelivery, AgentEndpoint},
    secret::SecretString,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    aws, azure,
    broker_client::{BrokerClient, refresh_loop},
    common::Shared,
    endpoint::EndpointKind,
    error::AgentError,
    gcp, health,
    metrics::Metrics,
    proxy,
    settings::Settings,
    store::CredentialStore,
};

/// A running agent: its listeners, credentials and refresh loops, until
/// [`Agent::shutdown`].
pub struct Agent {
    listeners: Vec<(EndpointKind, SocketAddr)>,
    shared: Shared,
    aws_token: Option<SecretString>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    refreshers: Vec<JoinHandle<()>>,
    grace: Duration,
}

async fn bind(port: u16) -> Result<TcpListener, AgentError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpListener::bind(addr).await.map_err(|source| AgentError::Bind { addr, source })
}

impl Agent {
    /// Checks the settings, binds every listener on 127.0.0.1 (port 0 picks a free one,
    /// for tests), writes the AWS authorization token file, and starts serving and
    /// fetching. Returns once listening; credentials arrive in the background (see
    /// [`CredentialStore::not_ready`] or `/ready`).
    pub async fn start(mut settings: Settings) -> Result<Self, AgentError> {
        settings.locate_server_cas();
        settings.validate()?;
        let deliveries = &settings.config.deliveries;
        let shared = Shared {
            store: Arc::new(CredentialStore::new(deliveries.iter().map(|d| d.policy.clone()))),
            metrics: Metrics::new(),
        };
        let client = Arc::new(
            BrokerClient::new(&settings.broker)?.with_policy_namespace(settings.config.policy_namespace.clone()),
        );

        let mut groups: BTreeMap<(EndpointKind, u16), Vec<&AgentDelivery>> = BTreeMap::new();
        // Files have no listener: their refresh loop writes them.
        for delivery in deliveries {
            if let (Some(kind), Some(port)) = (EndpointKind::of(&delivery.endpoint), delivery.endpoint.port()) {
                groups.entry((kind, port)).or_default().push(delivery);
            }
        }
        let aws_token = if groups.keys().any(|(kind, _)| *kind == EndpointKind::Aws) {
            let (token, path) = aws::pod_authorization_token(&settings.shared_dir)?;
            info!(path = %path.display(), "AWS authorization token file ready");
            Some(token)
        } else {
            None
        };

        let mut planned: Vec<(EndpointKind, u16, Router)> =
            vec![(EndpointKind::Health, settings.config.health_port, health::router(&shared))];
        for ((kind, port), group) in &groups {
            let router = match kind {
                EndpointKind::Aws => {
                    let token = aws_token.clone().expect("written above");
                    aws::router(group[0].policy.clone(), token, &shared)
                }
                EndpointKind::Azure => {
                    let list = group
                        .iter()
                        .filter_map(|d| match &d.endpoint {
                            AgentEndpoint::AzureManagedIdentity { resource, .. } => {
                                Some(azure::AzureDelivery { policy: d.policy.clone(), resource: resource.clone() })
                            }
                            _ => None,
                        })
                        .collect();
                    let header = settings.identity_header.clone().expect("validated");
                    azure::router(list, header, &shared)
                }
                EndpointKind::Gcp => {
                    let list = group
                        .iter()
                        .filter_map(|d| match &d.endpoint {
                            AgentEndpoint::GcpMetadata { scopes, .. } => {
                                Some(gcp::GcpDelivery { policy: d.policy.clone(), scopes: scopes.clone() })
                            }
                            _ => None,
                        })
                        .collect();
                    gcp::router(list, &shared)
                }
                EndpointKind::Proxy => {
                    let routes: Vec<_> =
                        group.iter().filter_map(|d| proxy::ProxyRoute::from_endpoint(&d.policy, &d.endpoint)).collect();
                    let clients = proxy::upstream_clients(&routes, settings.upstream_ca_pem.as_deref())?;
                    proxy::router(routes, clients, settings.sigv4_max_body_bytes, &shared)
                }
                EndpointKind::Health => unreachable!("no delivery is a health endpoint"),
            };
            planned.push((*kind, *port, router));
        }

        // Bind everything before serving anything: a port in use fails the start.
        let mut bound = Vec::new();
        for (kind, port, router) in planned {
            bound.push((kind, bind(port).await?, router));
        }
        let (stop, stopped) = watch::channel(false);
        let mut listeners = Vec::new();
        let mut servers = Vec::new();
        for (kind, listener, router) in bound {
            let addr = listener
                .local_addr()
                .map_err(|source| AgentError::Bind { addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), source })?;
            listeners.push((kind, addr));
            let mut stopped = stopped.clone();
            servers.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
                    warn!(endpoint = kind.label(), error = %e, "listener stopped");
                }
            }));
        }
        let refreshers = deliveries
            .iter()
            .map(|d| {
                tokio::spawn(refresh_loop(
                    client.clone(),
                    d.clone(),
                    shared.clone(),
                    settings.retry,
                    settings.shared_dir.clone(),
                    stopped.clone(),
                ))
            })
            .collect();
        for (kind, addr) in &listeners {
            info!(endpoint = kind.label(), %addr, "listening");
        }
        info!(
            broker = %settings.broker.url,
            policies = %deliveries.iter().map(|d| d.policy.as_str()).collect::<Vec<_>>().join(","),
            "agent started"
        );
        Ok(Self { listeners, shared, aws_token, stop, servers, refreshers, grace: settings.shutdown_grace })
    }

    /// Every listener with its address.
    pub fn listeners(&self) -> &[(EndpointKind, SocketAddr)] {
        &self.listeners
    }

    /// The address of the first listener of `kind`.
    pub fn local_addr(&self, kind: EndpointKind) -> Option<SocketAddr> {
        self.listeners.iter().find(|(k, _)| *k == kind).map(|(_, a)| *a)
    }

    /// The credentials held, one slot per delivery's policy.
    pub fn store(&self) -> &Arc<CredentialStore> {
        &self.shared.store
    }

    /// The agent's metrics, as served on the health port.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The AWS authorization token (also in the shared directory), when an AWS delivery
    /// is served.
    pub fn aws_token(&self) -> Option<&SecretString> {
        self.aws_token.as_ref()
    }

    /// Stops fetching and accepting, lets in-flight requests finish within the grace
    /// period, then drops what is left.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut servers = self.servers;
        let drained = tokio::time::timeout(self.grace, async {
            for server in servers.iter_mut() {
                let _ = server.await;
            }
        })
        .await;
        if drained.is_err() {
            warn!(grace_seconds = self.grace.as_secs_f64(), "requests still in flight after the grace period; closing");
            for server in &servers {
                server.abort();
            }
        }
        for refresher in self.refreshers {
            refresher.abort();
        }
        info!("agent stopped");
    }
}

/// Runs an agent until `shutdown` completes (the binary passes SIGTERM/SIGINT), then
/// stops it gracefully.
pub async fn run(mut settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let mut shutdown = std::pin::pin!(shutdown);
    if settings.config.deliveries_from_broker() {
        let client = BrokerClient::new(&settings.broker)?;
        settings.config.deliveries = tokio::select! {
            deliveries = crate::broker_client::deliveries_until_complete(&client, settings.retry) => deliveries,
            () = &mut shutdown => return Ok(()),
        };
    }
    let agent = Agent::start(settings).await?;
    shutdown.await;
    agent.shutdown().await;
    Ok(())
}
