//! `providers.docker`: watches a Docker engine's API (read-only: list, events) for running
//! containers with `gateway.*` labels and hands what they declare to the control plane.
//!
//! A full list at start, after every container event (start, die, health change, ...) and every
//! `refresh`. A container serves once it runs and, if it has a Docker health check, passes it;
//! it leaves with the next list that no longer shows it; while one still shows a container an
//! event said stopped, the list is read again shortly (`Leaving`). If the engine cannot be
//! reached, the last list stays.

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
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(e)) => {
                    heard(&e, &mut leaving);
                    // Let a burst (a compose up, a scale) settle into one list.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    loop {
                        match events.next().now_or_never() {
                            Some(Some(Ok(e))) => heard(&e, &mut leaving),
                            Some(Some(Err(e))) => return Err(e),
                            Some(None) => return Ok(()),
                            None => break,
                        }
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            _ = tick.tick() => {}
            () = sleep_until(leaving.due), if leaving.due.is_some() => {}
        }
        let containers = list(docker).await?;
        debug!(
            listed = ?containers.iter().map(|c| &c.name).collect::<Vec<_>>(),
            "docker provider: listed"
        );
        leaving.listed(&containers, Instant::now());
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
/// list still showed: the engine can list a container as running for a while after its `die`
/// event, so they are listed again, sooner than the refresh, until they are gone.
#[derive(Debug, Default)]
struct Leaving {
    /// Container id → when to stop asking (one the engine keeps listing).
    ids: HashMap<String, Instant>,
    /// The wait before the next list while some are still shown; doubles after each.
    wait: Duration,
    /// When to list again; `None` while none is waited for.
    due: Option<Instant>,
}

impl Leaving {
    const FIRST_WAIT: Duration = Duration::from_millis(100);
    const LAST_WAIT: Duration = Duration::from_secs(2);
    const GIVE_UP: Duration = Duration::from_secs(10);

    fn note(&mut self, e: &EventMessage, now: Instant) {
        let Some(id) = e.actor.as_ref().and_then(|a| a.id.as_deref()) else {
            return;
        };
        match e.action.as_deref().unwrap_or_default() {
            "die" | "stop" | "destroy" | "pause" | "health_status: unhealthy" => {
                self.ids.insert(id.to_string(), now + Self::GIVE_UP);
                // The waits start over, for the others too; each is still dropped GIVE_UP after
                // its own event.
                self.wait = Self::FIRST_WAIT;
                self.due = None;
            }
            "start" | "unpause" | "health_status: healthy" => {
                self.ids.remove(id);
            }
            _ => {}
        }
    }

    /// After a list: forgets the containers it no longer shows (or asked about long enough)
    /// and sets when to list again for the others, never past the last one's give-up time.
    fn listed(&mut self, containers: &[Container], now: Instant) {
        self.ids
            .retain(|id, until| now < *until && containers.iter().any(|c| &c.id == id));
        let Some(last) = self.ids.values().max().copied() else {
            self.due = None;
            return;
        };
        match self.due {
            // A list of its own (an event's, the refresh's) before the one due: the wait stays.
            Some(due) if now < due => {}
            Some(_) => {
                self.wait = (self.wait * 2).min(Self::LAST_WAIT);
                self.due = Some((now + self.wait).min(last));
            }
            None => self.due = Some((now + self.wait).min(last)),
        }
        debug!(
            count = self.ids.len(),
            wait = ?self.wait,
            "docker provider: stopped containers still listed; listing again"
        );
    }
}

/// An event: noted for `leaving`, and logged at debug level to explain the list that follows.
fn heard(e: &EventMessage, leaving: &mut Leaving) {
    leaving.note(e, Instant::now());
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
        leaving.listed(&shown(&["a", "b"]), t);
        assert_eq!(leaving.due, None, "after kill it may still run");
        leaving.note(&event("die", "a"), t);
        leaving.listed(&shown(&["a", "b"]), t);
        assert_eq!(leaving.due, Some(t + Duration::from_millis(100)));
        // A list of its own (another event's, the refresh's) before then changes nothing.
        leaving.listed(&shown(&["a", "b"]), t + Duration::from_millis(50));
        assert_eq!(leaving.due, Some(t + Duration::from_millis(100)));
        // Each list when due: the wait doubles up to 2 s, the last one at the give-up time.
        let mut waits = Vec::new();
        let mut now = t;
        while let Some(due) = leaving.due {
            waits.push((due - now).as_millis());
            now = due;
            leaving.listed(&shown(&["a", "b"]), now);
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000, 2000, 900]);
        assert_eq!(now, t + Leaving::GIVE_UP);

        // Gone from the list: no more lists before the refresh.
        leaving.note(&event("die", "b"), now);
        leaving.listed(&shown(&["b"]), now);
        assert!(leaving.due.is_some());
        leaving.listed(&shown(&[]), now + Duration::from_millis(100));
        assert_eq!(leaving.due, None);
        assert!(leaving.ids.is_empty());
    }

    #[test]
    fn containers_that_come_back_are_forgotten_and_new_events_start_the_waits_over() {
        let t = Instant::now();
        let mut leaving = Leaving::default();
        for (gone, back) in [
            ("die", "start"),
            ("pause", "unpause"),
            ("health_status: unhealthy", "health_status: healthy"),
        ] {
            leaving.note(&event(gone, "a"), t);
            leaving.note(&event(back, "a"), t);
            leaving.listed(&shown(&["a"]), t);
            assert_eq!(leaving.due, None, "{gone}, then {back}");
        }
        leaving.note(&event("stop", "c"), t);
        leaving.listed(&shown(&["c"]), t);
        let second = t + Duration::from_millis(100);
        leaving.listed(&shown(&["c"]), second);
        assert_eq!(leaving.due, Some(second + Duration::from_millis(200)));
        leaving.note(&event("destroy", "d"), second);
        leaving.listed(&shown(&["c", "d"]), second);
        assert_eq!(leaving.due, Some(second + Duration::from_millis(100)));
    }
}
