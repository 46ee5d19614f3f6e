//! Starting, reconfiguring and stopping the agent: listeners on loopback, one per
//! endpoint kind and port, the refresh loop of every delivery, a new configuration from
//! the broker applied behind the open listeners, and a graceful stop.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{Router, extract::Request};
use cloudpass_api::{
    agent::{AgentDelivery, AgentEndpoint},
    broker::AgentDeliveries,
    secret::SecretString,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::{
    aws, azure,
    broker_client::{BrokerClient, refresh_loop},
    common::Shared,
    endpoint::{EndpointKind, listener},
    error::AgentError,
    gcp, health,
    metrics::Metrics,
    proxy,
    settings::{Settings, locate_server_cas},
    store::CredentialStore,
};

/// A running agent: its listeners, credentials and refresh loops, until
/// [`Agent::shutdown`]; [`Agent::reconfigure`] applies a changed configuration in place.
pub struct Agent {
    listeners: Vec<(EndpointKind, SocketAddr)>,
    shared: Shared,
    aws_token: Option<SecretString>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    live: Live,
}

/// What a new configuration replaces without closing a listener: the routes behind each
/// one, and the refresh loop of each changed delivery.
struct Live {
    /// The settings, with the deliveries served now.
    settings: Settings,
    client: Arc<BrokerClient>,
    routes: BTreeMap<(EndpointKind, u16), Arc<RwLock<Router>>>,
    refreshers: BTreeMap<String, JoinHandle<()>>,
    stopped: watch::Receiver<bool>,
    /// Why the broker's last answer was not (wholly) followed, as logged.
    reported: BTreeSet<String>,
}

/// What [`Agent::reconfigure`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconfigured {
    /// Policies now served with their new configuration (their credential fetched again).
    pub changed: Vec<String>,
    /// Policies whose new configuration moves the listener or file the app's variables
    /// name, or that the agent did not start with: still served as before, until the pod
    /// restarts.
    pub restart_required: Vec<String>,
}

async fn bind(port: u16) -> Result<TcpListener, AgentError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpListener::bind(addr).await.map_err(|source| AgentError::Bind { addr, source })
}

/// What the app's variables, fixed when the pod was admitted, name of a delivery: its
/// listener, or its file. A new configuration may change anything else.
fn place(endpoint: &AgentEndpoint) -> (Option<(EndpointKind, u16)>, Option<&str>) {
    let file = match endpoint {
        AgentEndpoint::File { name, .. } => Some(name.as_str()),
        _ => None,
    };
    (listener(endpoint), file)
}

/// The routes of the listeners `wanted` (the health port aside), for the deliveries in
/// `settings`.
fn delivery_routes(
    settings: &Settings,
    shared: &Shared,
    aws_token: Option<&SecretString>,
    wanted: impl Fn(&(EndpointKind, u16)) -> bool,
) -> Result<BTreeMap<(EndpointKind, u16), Router>, AgentError> {
    let mut groups: BTreeMap<(EndpointKind, u16), Vec<&AgentDelivery>> = BTreeMap::new();
    // Files have no listener: their refresh loop writes them.
    for delivery in &settings.config.deliveries {
        if let Some(key) = listener(&delivery.endpoint).filter(&wanted) {
            groups.entry(key).or_default().push(delivery);
        }
    }
    let mut routes = BTreeMap::new();
    for ((kind, port), group) in groups {
        let router = match kind {
            EndpointKind::Aws => {
                let token = aws_token.cloned().ok_or_else(|| {
                    AgentError::Config("an AWS delivery without the AWS authorization token file".into())
                })?;
                aws::router(group[0].policy.clone(), token, shared)
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
                azure::router(list, header, shared)
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
                gcp::router(list, shared)
            }
            EndpointKind::Proxy => {
                let routes: Vec<_> =
                    group.iter().filter_map(|d| proxy::ProxyRoute::from_endpoint(&d.policy, &d.endpoint)).collect();
                let clients = proxy::upstream_clients(&routes, settings.upstream_ca_pem.as_deref())?;
                proxy::router(routes, clients, settings.sigv4_max_body_bytes, shared)
            }
            EndpointKind::Health => unreachable!("no delivery is a health endpoint"),
        };
        routes.insert((kind, port), router);
    }
    Ok(routes)
}

/// A router that hands every request to the routes `current` holds at that moment.
fn swappable(current: Arc<RwLock<Router>>) -> Router {
    Router::new().fallback(move |request: Request| {
        let router = current.read().unwrap_or_else(|e| e.into_inner()).clone();
        router.oneshot(request)
    })
}

impl Live {
    fn spawn_refresher(&mut self, delivery: &AgentDelivery, shared: &Shared) {
        let refresher = tokio::spawn(refresh_loop(
            self.client.clone(),
            delivery.clone(),
            shared.clone(),
            self.settings.retry,
            self.settings.shared_dir.clone(),
            self.stopped.clone(),
        ));
        if let Some(previous) = self.refreshers.insert(delivery.policy.clone(), refresher) {
            previous.abort();
        }
    }
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

        let aws_token = if deliveries.iter().any(|d| matches!(listener(&d.endpoint), Some((EndpointKind::Aws, _)))) {
            let (token, path) = aws::pod_authorization_token(&settings.shared_dir)?;
            info!(path = %path.display(), "AWS authorization token file ready");
            Some(token)
        } else {
            None
        };
        let routes: BTreeMap<_, _> = delivery_routes(&settings, &shared, aws_token.as_ref(), |_| true)?
            .into_iter()
            .map(|(key, router)| (key, Arc::new(RwLock::new(router))))
            .collect();
        let mut planned: Vec<(EndpointKind, u16, Router)> =
            vec![(EndpointKind::Health, settings.config.health_port, health::router(&shared))];
        planned.extend(routes.iter().map(|((kind, port), current)| (*kind, *port, swappable(current.clone()))));

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
        for (kind, addr) in &listeners {
            info!(endpoint = kind.label(), %addr, "listening");
        }
        info!(
            broker = %settings.broker.url,
            policies = %deliveries.iter().map(|d| d.policy.as_str()).collect::<Vec<_>>().join(","),
            "agent started"
        );
        let mut live =
            Live { settings, client, routes, refreshers: BTreeMap::new(), stopped, reported: BTreeSet::new() };
        for delivery in live.settings.config.deliveries.clone() {
            live.spawn_refresher(&delivery, &shared);
        }
        Ok(Self { listeners, shared, aws_token, stop, servers, live })
    }

    /// Serves `offered` (the broker's deliveries for this pod) from now on, in place:
    /// each changed delivery's routes are swapped behind its open listener and its
    /// credential fetched again, while the one held stays served until the new one
    /// arrives; unchanged deliveries keep their credential and refresh loop. A change the
    /// app could not follow (another listener or file than its variables name) is not
    /// applied, and reported. Policies the broker leaves out (it cannot serve them now)
    /// stay as they are: their refresh loop hears the broker's refusal. Fails, changing
    /// nothing, when the result could not be served.
    pub fn reconfigure(&mut self, mut offered: Vec<AgentDelivery>) -> Result<Reconfigured, AgentError> {
        locate_server_cas(&mut offered, &self.live.settings.server_ca_dir);
        let mut next = self.live.settings.clone();
        let mut outcome = Reconfigured::default();
        for delivery in offered {
            match next.config.deliveries.iter_mut().find(|d| d.policy == delivery.policy) {
                Some(current) if *current == delivery => {}
                Some(current) if place(&current.endpoint) == place(&delivery.endpoint) => {
                    outcome.changed.push(delivery.policy.clone());
                    *current = delivery;
                }
                _ => outcome.restart_required.push(delivery.policy),
            }
        }
        self.shared.metrics.config_restart_required.set(outcome.restart_required.len() as i64);
        if outcome.changed.is_empty() {
            return Ok(outcome);
        }
        next.validate()?;
        // Only the listeners of changed deliveries get new routes (a proxy's upstream
        // clients, with their open connections, stay otherwise). Every one exists: no
        // applied change moves a delivery to another listener.
        let touched: BTreeSet<_> = next
            .config
            .deliveries
            .iter()
            .filter(|d| outcome.changed.contains(&d.policy))
            .filter_map(|d| listener(&d.endpoint))
            .collect();
        let routes = delivery_routes(&next, &self.shared, self.aws_token.as_ref(), |key| touched.contains(key))?;
        for (key, router) in routes {
            if let Some(current) = self.live.routes.get(&key) {
                *current.write().unwrap_or_else(|e| e.into_inner()) = router;
            }
        }
        self.live.settings = next;
        for policy in &outcome.changed {
            if let Some(delivery) = self.live.settings.config.deliveries.iter().find(|d| &d.policy == policy).cloned() {
                self.live.spawn_refresher(&delivery, &self.shared);
            }
        }
        Ok(outcome)
    }

    /// Asks the broker for this pod's deliveries and applies them ([`Agent::reconfigure`]),
    /// logging and counting what happened; a failure keeps the configuration served.
    pub async fn follow_broker(&mut self) {
        let (result, problems) = match self.live.client.deliveries().await {
            Err(e) => (
                "error",
                vec![format!("cannot ask the broker for this pod's deliveries ({e}); serving them as they were")],
            ),
            Ok(answer) => self.apply(answer),
        };
        self.shared.metrics.config_update(result);
        // Each problem is a warning when it appears, not again every period while it lasts.
        let problems: BTreeSet<String> = problems.into_iter().collect();
        for problem in &problems {
            if self.live.reported.contains(problem) {
                debug!(problem = %problem, "configuration not followed, as before");
            } else {
                warn!("{problem}");
            }
        }
        self.live.reported = problems;
    }

    /// Applies the broker's answer: the metric label of the outcome, and what was not
    /// followed.
    fn apply(&mut self, answer: AgentDeliveries) -> (&'static str, Vec<String>) {
        for missing in &answer.unavailable {
            debug!(policy = %missing.policy, reason = %missing.message, "the broker cannot serve this policy now");
        }
        let outcome = match self.reconfigure(answer.deliveries) {
            Ok(outcome) => outcome,
            Err(e) => {
                return (
                    "invalid",
                    vec![format!("the broker's new configuration cannot be served ({e}); serving the previous one")],
                );
            }
        };
        if !outcome.changed.is_empty() {
            info!(policies = %outcome.changed.join(","), "new configuration from the broker applied");
        }
        let problems = outcome
            .restart_required
            .iter()
            .map(|policy| {
                format!(
                    "policy {policy}: its new delivery moves the endpoint or file the app was given; it applies when the pod restarts"
                )
            })
            .collect();
        (if outcome.changed.is_empty() { "unchanged" } else { "applied" }, problems)
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
        let grace = self.live.settings.shutdown_grace;
        let mut servers = self.servers;
        let drained = tokio::time::timeout(grace, async {
            for server in servers.iter_mut() {
                let _ = server.await;
            }
        })
        .await;
        if drained.is_err() {
            warn!(grace_seconds = grace.as_secs_f64(), "requests still in flight after the grace period; closing");
            for server in &servers {
                server.abort();
            }
        }
        for refresher in self.live.refreshers.into_values() {
            refresher.abort();
        }
        info!("agent stopped");
    }
}

/// Runs an agent until `shutdown` completes (the binary passes SIGTERM/SIGINT), then
/// stops it gracefully. An agent whose configuration names no deliveries asks the broker
/// for them before it starts, then again every `config_refresh`.
pub async fn run(mut settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let follow = settings.config.deliveries_from_broker().then_some(settings.config_refresh);
    if follow.is_some() {
        let client = BrokerClient::new(&settings.broker)?;
        settings.config.deliveries = tokio::select! {
            deliveries = crate::broker_client::deliveries_until_complete(&client, settings.retry) => deliveries,
            () = &mut shutdown => return Ok(()),
        };
    }
    let mut agent = Agent::start(settings).await?;
    if let Some(every) = follow {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => agent.follow_broker().await,
                () = &mut shutdown => break,
            }
        }
    } else {
        shutdown.await;
    }
    agent.shutdown().await;
    Ok(())
}
