//! `providers.docker`: watches a Docker engine's API (read-only: list, events) for running
//! containers with `gateway.*` labels and hands what they declare to the control plane.
//!
//! A full list at start, after every container event (start, die, health change, ...) and every
//! `refresh`. A container serves once it runs and, if it has a Docker health check, passes it;
//! it leaves once a list no longer shows it (`Leaving`). If the engine cannot be reached, the
//! last list stays.

use super::labels::{self, Container};
use super::Provided;
use crate::config::DockerProviderConfig;
use crate::reload::ControlPlane;
use bollard::models::{ContainerSummaryStateEnum, EventMessage};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use bollard::Docker;
use futures_util::{FutureExt as _, StreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

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
    let mut leaving = Leaving::default();
    let mut recheck = None;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(e)) => {
                    leaving.note(&e, Instant::now());
                    // Let a burst (a compose up, a scale) settle into one list.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while let Some(Some(Ok(e))) = events.next().now_or_never() {
                        leaving.note(&e, Instant::now());
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            _ = tick.tick() => {}
            () = sleep_until(recheck), if recheck.is_some() => {}
        }
        let containers = list(docker).await?;
        debug!(serving = ?containers.iter().map(|c| &c.name).collect::<Vec<_>>(), "docker provider: listed");
        recheck = leaving.listed(&containers, Instant::now());
        let provided = declare(&containers, settings.network.as_deref(), reported);
        plane.provide(provided).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Containers an event said no longer serve (died, stopped, removed, paused, unhealthy) that a
/// list still showed: the engine lists a container as running for tens of milliseconds after
/// its `die` event, so they are listed again, sooner than the refresh, until they are gone.
#[derive(Debug, Default)]
struct Leaving {
    /// Container id → when to stop asking (a container that came back, say).
    ids: HashMap<String, Instant>,
    /// The wait before the next list while some are still shown; doubles each time.
    wait: Duration,
}

impl Leaving {
    const FIRST_WAIT: Duration = Duration::from_millis(100);
    const LAST_WAIT: Duration = Duration::from_secs(2);
    const GIVE_UP: Duration = Duration::from_secs(10);

    fn note(&mut self, e: &EventMessage, now: Instant) {
        log_event(e);
        let Some(id) = e.actor.as_ref().and_then(|a| a.id.as_deref()) else {
            return;
        };
        match e.action.as_deref().unwrap_or_default() {
            "die" | "stop" | "destroy" | "pause" | "health_status: unhealthy" => {
                self.ids.insert(id.to_string(), now + Self::GIVE_UP);
                self.wait = Self::FIRST_WAIT;
            }
            "start" | "unpause" | "health_status: healthy" => {
                self.ids.remove(id);
            }
            _ => {}
        }
    }

    /// After a list: forgets the containers it no longer shows (or asked about long enough)
    /// and says when to list again for the others.
    fn listed(&mut self, containers: &[Container], now: Instant) -> Option<Instant> {
        self.ids
            .retain(|id, until| now < *until && containers.iter().any(|c| &c.id == id));
        if self.ids.is_empty() {
            return None;
        }
        debug!(count = self.ids.len(), wait = ?self.wait, "docker provider: stopped containers still listed; listing again");
        let at = now + self.wait;
        self.wait = (self.wait * 2).min(Self::LAST_WAIT);
        Some(at)
    }
}

/// An event at debug level: what the list that follows it answers.
fn log_event(e: &EventMessage) {
    let actor = e.actor.as_ref();
    let name = actor
        .and_then(|a| a.attributes.as_ref()?.get("name"))
        .map(String::as_str);
    debug!(
        action = e.action.as_deref().unwrap_or_default(),
        container = name
            .or(actor.and_then(|a| a.id.as_deref()))
            .unwrap_or_default(),
        "docker provider: event"
    );
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
        let id = c.id.unwrap_or_default();
        let name = c
            .names
            .unwrap_or_default()
            .first()
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.clone());
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
            id,
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

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    fn event(action: &str, id: &str) -> EventMessage {
        EventMessage {
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some(id.into()),
                attributes: None,
            }),
            ..EventMessage::default()
        }
    }

    fn shown(ids: &[&str]) -> Vec<Container> {
        ids.iter()
            .map(|id| Container {
                id: id.to_string(),
                name: format!("c-{id}"),
                labels: BTreeMap::new(),
                networks: BTreeMap::new(),
                exposed: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_stopped_container_still_listed_is_listed_again_until_gone() {
        let t = Instant::now();
        let mut leaving = Leaving::default();
        leaving.note(&event("kill", "a"), t);
        assert_eq!(
            leaving.listed(&shown(&["a", "b"]), t),
            None,
            "kill: may still run"
        );
        leaving.note(&event("die", "a"), t);
        let waits: Vec<_> = (0..7)
            .map(|_| leaving.listed(&shown(&["a", "b"]), t).map(|at| at - t))
            .collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(
            waits,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(2000),
                ms(2000)
            ]
        );
        // Gone from the list: no more lists before the refresh.
        assert_eq!(leaving.listed(&shown(&["b"]), t), None);
        assert_eq!(leaving.listed(&shown(&["a", "b"]), t), None);
    }

    #[test]
    fn a_container_that_comes_back_or_stays_is_not_asked_about_for_ever() {
        let t = Instant::now();
        let mut leaving = Leaving::default();
        leaving.note(&event("die", "a"), t);
        leaving.note(&event("start", "a"), t);
        assert_eq!(leaving.listed(&shown(&["a"]), t), None, "restarted");
        leaving.note(&event("health_status: unhealthy", "b"), t);
        assert!(leaving.listed(&shown(&["b"]), t).is_some());
        let late = t + Leaving::GIVE_UP;
        assert_eq!(leaving.listed(&shown(&["b"]), late), None, "given up");
        // A new event starts the waits over.
        leaving.note(&event("stop", "c"), late);
        leaving.listed(&shown(&["c"]), late);
        leaving.note(&event("destroy", "d"), late);
        assert_eq!(
            leaving.listed(&shown(&["c", "d"]), late),
            Some(late + Duration::from_millis(100))
        );
    }
}
