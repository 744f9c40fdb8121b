//! `providers.docker`: watches a Docker engine's API (read-only: list, events) for running
//! containers with `gateway.*` labels and hands what they declare to the control plane.
//!
//! A full list at start, after every container event (start, die, health change, ...) and every
//! `refresh`. A container serves once it runs and, if it has a Docker health check, passes it;
//! it leaves as soon as it stops. If the engine cannot be reached, the last list stays.

use super::labels::{self, Container};
use super::Provided;
use crate::config::DockerProviderConfig;
use crate::reload::ControlPlane;
use bollard::models::ContainerSummaryStateEnum;
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use bollard::Docker;
use futures_util::{FutureExt as _, StreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// Container events after which the list is read again.
const EVENTS: &[&str] = &[
    "start",
    "die",
    "stop",
    "kill",
    "destroy",
    "pause",
    "unpause",
    "health_status",
];

/// Runs until the process ends.
pub async fn run(settings: DockerProviderConfig, plane: Arc<ControlPlane>) {
    let mut reported = BTreeSet::new();
    let mut backoff = Duration::from_secs(1);
    loop {
        match connect(&settings.endpoint).await {
            Ok(docker) => {
                info!(endpoint = %settings.endpoint, "docker provider: connected");
                backoff = Duration::from_secs(1);
                if let Err(e) = watch(&docker, &settings, &plane, &mut reported).await {
                    warn!(endpoint = %settings.endpoint, "docker provider: {e}; reconnecting");
                }
            }
            Err(e) => warn!(
                endpoint = %settings.endpoint,
                "docker provider: cannot reach the engine: {e}; retrying in {backoff:?}"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// `unix://PATH` (or a bare path), or `tcp://HOST:PORT` / `http://HOST:PORT` for a socket proxy.
async fn connect(endpoint: &str) -> Result<Docker, bollard::errors::Error> {
    let docker = match endpoint.strip_prefix("tcp://") {
        Some(addr) => {
            Docker::connect_with_http(&format!("http://{addr}"), 10, bollard::API_DEFAULT_VERSION)?
        }
        None if endpoint.starts_with("http://") => {
            Docker::connect_with_http(endpoint, 10, bollard::API_DEFAULT_VERSION)?
        }
        None => {
            let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
            Docker::connect_with_socket(path, 10, bollard::API_DEFAULT_VERSION)?
        }
    };
    docker.negotiate_version().await
}

/// One connection: the event stream, with a full list at start, after events and every refresh.
async fn watch(
    docker: &Docker,
    settings: &DockerProviderConfig,
    plane: &ControlPlane,
    reported: &mut BTreeSet<String>,
) -> Result<(), bollard::errors::Error> {
    let filters = HashMap::from([("type", vec!["container"]), ("event", EVENTS.to_vec())]);
    let mut events = docker.events(Some(
        EventsOptionsBuilder::default().filters(&filters).build(),
    ));
    let mut tick = tokio::time::interval(settings.refresh.0);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(_)) => {
                    // Let a burst (a compose up, a scale) settle into one list.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while let Some(Some(Ok(_))) = events.next().now_or_never() {}
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            _ = tick.tick() => {}
        }
        let containers = list(docker).await?;
        let provided = declare(&containers, settings.network.as_deref(), reported);
        plane.provide(provided).await;
    }
}

/// The running containers that ask to be served and are healthy (or have no health check).
async fn list(docker: &Docker) -> Result<Vec<Container>, bollard::errors::Error> {
    let filters = HashMap::from([("status", vec!["running"])]);
    let options = ListContainersOptionsBuilder::default()
        .all(false)
        .filters(&filters)
        .build();
    let mut out = Vec::new();
    for c in docker.list_containers(Some(options)).await? {
        let labels: BTreeMap<String, String> = c.labels.unwrap_or_default().into_iter().collect();
        let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
        // "Up 3 seconds (health: starting)", "Up 1 minute (unhealthy)", "Up 2 minutes (healthy)".
        let status = c.status.unwrap_or_default();
        let unready = status.contains("(health: starting)") || status.contains("(unhealthy)");
        if !running || unready || !labels::wanted(&labels) {
            continue;
        }
        let name = c
            .names
            .unwrap_or_default()
            .first()
            .map(|n| n.trim_start_matches('/').to_string())
            .or(c.id)
            .unwrap_or_default();
        let networks = c
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(net, endpoint)| Some((net, endpoint.ip_address?.parse().ok()?)))
            .collect();
        let mut exposed: Vec<u16> = c
            .ports
            .unwrap_or_default()
            .iter()
            .map(|p| p.private_port)
            .collect();
        exposed.sort_unstable();
        exposed.dedup();
        out.push(Container {
            name,
            labels,
            networks,
            exposed,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Each container's declaration; label errors are logged once while they last.
fn declare(
    containers: &[Container],
    network: Option<&str>,
    reported: &mut BTreeSet<String>,
) -> Provided {
    let mut declared = Vec::new();
    let mut errors = BTreeSet::new();
    for c in containers {
        match labels::declared(c, network) {
            Ok(d) => declared.push(d),
            Err(e) => {
                let text = e.to_string();
                if !reported.contains(&text) {
                    error!("{text}; the container is not served");
                }
                errors.insert(text);
            }
        }
    }
    *reported = errors;
    Provided::new(declared)
}
