//! The immutable runtime a configuration turns into (made by `plan::activate`). Requests read
//! it through one `ArcSwap` load; a reload makes a whole new one and swaps it in. A request
//! keeps the `Arc<Runtime>` it started with until it ends.

use crate::auth::AuthPolicy;
use crate::config::{
    ClientAuthConfig, Config, DnsConfig, ForwardingConfig, LimitsConfig, RouteTimeouts,
};
use crate::metrics::RouteMetrics;
use crate::policy::Pipeline;
use crate::ratelimit::RateLimitPolicy;
use crate::routing::{PathRewrite, Router};
use crate::tls::CertStore;
use crate::upstream::Upstream;
use hickory_resolver::TokioResolver;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// A compiled route.
pub struct Route {
    /// The route's name.
    pub name: Arc<str>,
    /// Where it sends traffic; none when a policy answers every request or `split` does.
    pub upstream: Option<Arc<Upstream>>,
    /// Upstreams sharing its requests by weight.
    pub split: Option<crate::policy::split::Split>,
    /// Copies of a share of its requests to a shadow upstream.
    pub mirror: Option<Arc<crate::policy::mirror::Mirror>>,
    /// How it changes the path.
    pub rewrite: PathRewrite,
    /// Timeout overrides.
    pub timeouts: RouteTimeouts,
    /// Retries allowed after the first attempt.
    pub retries: u32,
    /// Its policies, in the order they run.
    pub policies: Pipeline,
    /// What it matches, for the admin views.
    pub matcher: serde_json::Value,
    /// The route's metric handles.
    pub metrics: Arc<RouteMetrics>,
}

impl Route {
    /// The upstream of the request that drew `choice` (the route's one upstream, or a side
    /// of its split).
    pub fn upstream_for(&self, choice: u8) -> Option<&Upstream> {
        match &self.split {
            None => self.upstream.as_deref(),
            Some(split) => split.targets.get(usize::from(choice)).map(|(u, _)| &**u),
        }
    }
}

/// A listener as bound at startup: address, read buffer size, and for TLS listeners whether
/// HTTP/2 is offered and the client-certificate policy.
pub type ListenerBinding = (SocketAddr, usize, Option<(bool, Option<ClientAuthConfig>)>);

/// What a listener binding looks like, to tell when a reload would need a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Bindings {
    /// Listener name → address, read buffer size, and TLS handshake settings (ALPN h2,
    /// client certificates) which are fixed when the listener starts.
    pub listeners: BTreeMap<String, ListenerBinding>,
    /// Admin address.
    pub admin: Option<SocketAddr>,
    /// h2c on plain listeners.
    pub h2c: bool,
    /// Proxy threads.
    pub threads: Option<usize>,
    /// Upstream keep-alive pool size.
    pub pool: usize,
    /// Span export (its thread and queue are made once, at start).
    pub traces: Option<crate::config::TracesConfig>,
    /// Drain timings (handed to Pingora at start).
    pub shutdown: crate::config::ShutdownConfig,
    /// Pid file and upgrade socket.
    pub process: crate::config::ProcessConfig,
    /// File watching (its tasks start once).
    pub reload: crate::config::ReloadConfig,
    /// The Docker provider (its watcher starts once).
    pub docker: Option<crate::config::DockerProviderConfig>,
}

impl Bindings {
    /// The restart-only fields that differ from `started` (what the process was started with),
    /// named as in the file; empty when a reload can apply everything.
    pub fn changes_from(&self, started: &Bindings) -> Vec<String> {
        let mut changed = Vec::new();
        for name in self.listeners.keys().chain(started.listeners.keys()) {
            let field = |f: &str| format!("listeners.{name}{f}");
            match (self.listeners.get(name), started.listeners.get(name)) {
                (Some(_), None) => changed.push(field(" (added)")),
                (None, Some(_)) => changed.push(field(" (removed)")),
                (Some(now), Some(then)) => {
                    if now.0 != then.0 {
                        changed.push(field(".address"));
                    }
                    if now.1 != then.1 {
                        changed.push(field(".read_buffer"));
                    }
                    match (&now.2, &then.2) {
                        (Some(a), Some(b)) => {
                            if a.0 != b.0 {
                                changed.push(field(".tls.http2"));
                            }
                            if a.1 != b.1 {
                                changed.push(field(".tls.client_auth"));
                            }
                        }
                        (None, None) => {}
                        _ => changed.push(field(".tls")),
                    }
                }
                (None, None) => {}
            }
        }
        changed.dedup();
        /// Span export as written, without the file positions.
        fn traces(
            t: &Option<crate::config::TracesConfig>,
        ) -> Option<(&str, &str, usize, u64, u64)> {
            t.as_ref().map(|t| {
                let timeout = t.timeout.0.as_nanos() as u64;
                let (endpoint, service) = (t.otlp_endpoint.value.as_str(), t.service_name.as_str());
                (
                    endpoint,
                    service,
                    t.max_queue,
                    timeout,
                    t.sample_ratio.to_bits(),
                )
            })
        }
        for (field, differs) in [
            ("admin.address", self.admin != started.admin),
            ("h2c", self.h2c != started.h2c),
            ("threads", self.threads != started.threads),
            ("upstream_keepalive_pool", self.pool != started.pool),
            ("traces", traces(&self.traces) != traces(&started.traces)),
            ("shutdown", self.shutdown != started.shutdown),
            ("process", self.process != started.process),
            ("reload", self.reload != started.reload),
            ("providers", self.docker != started.docker),
        ] {
            if differs {
                changed.push(field.to_string());
            }
        }
        changed
    }

    /// The bindings a configuration asks for.
    pub fn of(config: &Config) -> Bindings {
        Bindings {
            listeners: config
                .listeners
                .value
                .iter()
                .map(|(k, v)| {
                    let tls = v.tls.as_ref().map(|t| (t.http2, t.client_auth.clone()));
                    (k.clone(), (v.address.value.0, v.read_buffer, tls))
                })
                .collect(),
            admin: config.admin.as_ref().map(|a| a.address.value.0),
            h2c: config.h2c,
            threads: config.threads.as_ref().map(|t| t.value),
            pool: config.upstream_keepalive_pool,
            traces: config.traces.clone(),
            shutdown: config.shutdown.clone(),
            process: config.process.clone(),
            reload: config.reload.value.clone(),
            docker: config.providers.docker.as_ref().map(|d| d.value.clone()),
        }
    }
}

/// The compiled configuration.
pub struct Runtime {
    /// Increases with every successful load.
    pub generation: u64,
    /// Hash of the configuration file's bytes and of the files it names.
    pub source_hash: u64,
    /// The files the configuration names besides itself, watched for changes.
    pub files: Vec<std::path::PathBuf>,
    /// The route table.
    pub router: Router,
    /// Routes by index (as the router returns them).
    pub routes: Vec<Route>,
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// Token policies by name.
    pub auth: BTreeMap<String, Arc<AuthPolicy>>,
    /// Rate-limit policies by name.
    pub rate_limits: BTreeMap<String, Arc<RateLimitPolicy>>,
    /// Certificate stores of the TLS listeners, by listener name. The same stores live on
    /// from runtime to runtime (Pingora holds them as the listeners' resolvers).
    pub tls_stores: BTreeMap<String, Arc<CertStore>>,
    /// ACME certificate managers, by listener name.
    pub acme: BTreeMap<String, Arc<crate::acme::Manager>>,
    /// Storage folders of the ACME managers answering HTTP-01; empty: the challenge path is
    /// an ordinary path.
    pub acme_http01: Vec<std::path::PathBuf>,
    /// The policies of listeners that have some (HTTPS redirect, HSTS), by bound address.
    pub listeners: Vec<(SocketAddr, Pipeline)>,
    /// The access log, when on.
    pub access_log: Option<Arc<crate::accesslog::AccessLog>>,
    /// Metric handles for requests that matched no route.
    pub unmatched: Arc<RouteMetrics>,
    /// Headers that carry forwarded claims: removed from every client request.
    pub identity_headers: Vec<http::HeaderName>,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Which headers the gateway adds.
    pub forwarding: ForwardingConfig,
    /// SHA-256 of the admin views' bearer token, when one is set.
    pub admin_token: Option<[u8; 32]>,
    /// Bounds on client requests.
    pub limits: LimitsConfig,
    /// Listener bindings this runtime was built for.
    pub bindings: Bindings,
    /// The resolver discovery uses, when any upstream needs one.
    pub resolver: Option<TokioResolver>,
    /// The resolver settings it was made from.
    pub dns: DnsConfig,
}

impl Runtime {
    /// The index in `listeners` of the listener a connection to `local` arrived on, when that
    /// listener has policies (one bound to 0.0.0.0 or [::] takes any address on its port).
    #[inline]
    pub fn listener_of(&self, local: &SocketAddr) -> Option<u16> {
        self.listeners
            .iter()
            .position(|(bound, _)| {
                bound.port() == local.port()
                    && (bound.ip().is_unspecified() || bound.ip() == local.ip())
            })
            .map(|i| i as u16)
    }

    /// Whether `ip` is a trusted proxy.
    #[inline]
    pub fn is_trusted(&self, ip: &IpAddr) -> bool {
        !self.trusted_proxies.is_empty() && self.trusted_proxies.iter().any(|n| n.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::Bindings;

    fn bindings(text: &str) -> Bindings {
        let config =
            crate::config::parse(std::path::Path::new("t.yaml"), text, &Default::default())
                .unwrap();
        Bindings::of(&config)
    }

    #[test]
    fn a_reload_names_the_restart_only_fields_it_changed() {
        let base = "listeners: { h: { address: \"127.0.0.1:1\" } }\nupstreams: { u: { targets: [\"127.0.0.1:2\"] } }\nroutes: [ { name: r, upstream: u } ]\n";
        let started = bindings(base);
        assert!(bindings(base).changes_from(&started).is_empty());
        // Moved down a line: positions differ, definitions do not.
        assert!(bindings(&format!("\n{base}"))
            .changes_from(&started)
            .is_empty());
        let changed = bindings(&format!(
            "{}shutdown: {{ grace_period: 9s }}\nthreads: 3\n",
            base.replace("127.0.0.1:1", "127.0.0.1:3")
        ));
        assert_eq!(
            changed.changes_from(&started),
            ["listeners.h.address", "threads", "shutdown"]
        );
    }
}
