//! `providers`: routes and upstreams learnt from outside the file (Docker labels).

use super::*;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// Sources of routes and upstreams besides the file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ProvidersConfig {
    /// Containers of a Docker engine, by their `gateway.*` labels. Off when absent.
    #[serde(default)]
    pub docker: Option<Spanned<DockerProviderConfig>>,
}

/// The Docker provider (docs/configuration.md, "providers.docker").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DockerProviderConfig {
    /// The engine's API socket. Default `unix:///var/run/docker.sock`.
    #[serde(default = "default_docker_endpoint")]
    pub endpoint: String,
    /// The network whose container addresses the gateway connects to. Default: the container's
    /// only network (a container on several must name one with the `gateway.network` label).
    #[serde(default)]
    pub network: Option<String>,
    /// Full list of containers this often, besides the event stream. Default 15s.
    #[serde(default = "default_docker_refresh")]
    pub refresh: Dur,
}

fn default_docker_endpoint() -> String {
    "unix:///var/run/docker.sock".to_string()
}

fn default_docker_refresh() -> Dur {
    Dur::secs(15)
}
