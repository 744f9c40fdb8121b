//! The compiled, immutable runtime a configuration turns into. Requests read it through one
//! `ArcSwap` load; a reload builds a whole new one and swaps it in. A request keeps the
//! `Arc<Runtime>` it started with until it ends.

use crate::auth::AuthPolicy;
use crate::config::{
    parse_cidr, ClientAuthConfig, Config, DnsConfig, ForwardingConfig, LimitsConfig, LoadedConfig,
    RouteTimeouts,
};
use crate::metrics::RouteMetrics;
use crate::ratelimit::RateLimitPolicy;
use crate::routing::{compile_rewrite, PathRewrite, Router};
use crate::tls::CertStore;
use crate::upstream::{make_resolver, Upstream, UpstreamSpec};
use hickory_resolver::TokioResolver;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tracing::warn;

/// A compiled route.
pub struct Route {
    /// The route's name.
    pub name: Arc<str>,
    /// Where it sends traffic.
    pub upstream: Arc<Upstream>,
    /// How it changes the path.
    pub rewrite: PathRewrite,
    /// Timeout overrides.
    pub timeouts: RouteTimeouts,
    /// Retries allowed after the first attempt.
    pub retries: u32,
    /// The token check requests must pass.
    pub auth: Option<Arc<AuthPolicy>>,
    /// Requests without a token pass (a token that is present must be valid).
    pub auth_optional: bool,
    /// The rate limit requests are counted under.
    pub rate_limit: Option<Arc<RateLimitPolicy>>,
    /// Request body bytes allowed (the route's, else `limits.max_request_body`).
    pub max_request_body: Option<u64>,
    /// The route's metric handles.
    pub metrics: RouteMetrics,
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
}

impl Bindings {
    /// The bindings a configuration asks for.
    pub fn of(config: &Config) -> Bindings {
        Bindings {
            listeners: config
                .listeners
                .iter()
                .map(|(k, v)| {
                    let tls = v.tls.as_ref().map(|t| (t.http2, t.client_auth.clone()));
                    (k.clone(), (v.address.value.0, v.read_buffer, tls))
                })
                .collect(),
            admin: config.admin.as_ref().map(|a| a.address.value.0),
            h2c: config.h2c,
            threads: config.threads,
            pool: config.upstream_keepalive_pool,
            traces: config.traces.clone(),
        }
    }
}

/// The compiled configuration.
pub struct Runtime {
    /// Increases with every successful load.
    pub generation: u64,
    /// Hash of the configuration file's bytes.
    pub source_hash: u64,
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
    /// Plain listeners that redirect to HTTPS: their address and the HTTPS port.
    pub redirects: Vec<(SocketAddr, u16)>,
    /// TLS listeners that send `Strict-Transport-Security`, with the value.
    pub hsts: Vec<(SocketAddr, http::HeaderValue)>,
    /// The access log, when on.
    pub access_log: Option<Arc<crate::accesslog::AccessLog>>,
    /// Metric handles for requests that matched no route.
    pub unmatched: RouteMetrics,
    /// Headers that carry forwarded claims: removed from every client request.
    pub identity_headers: Vec<http::HeaderName>,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Which headers the gateway adds.
    pub forwarding: ForwardingConfig,
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
    /// Whether `ip` is a trusted proxy.
    #[inline]
    pub fn is_trusted(&self, ip: &IpAddr) -> bool {
        !self.trusted_proxies.is_empty() && self.trusted_proxies.iter().any(|n| n.contains(ip))
    }
}

/// Compiles a loaded configuration. Upstreams whose definition did not change are taken over
/// from `previous` (with their health state and background tasks); new ones resolve their host
/// names once before this returns, so the new runtime starts with replicas.
pub async fn build(
    loaded: &LoadedConfig,
    previous: Option<&Runtime>,
    generation: u64,
) -> Result<Runtime, String> {
    let config = &loaded.config;
    let router = Router::new(&config.routes).map_err(|e| format!("route table: {e}"))?;

    let needs_resolver = config
        .upstreams
        .values()
        .any(|u| u.targets.value.iter().any(|t| t.ip().is_none()))
        || config.auth.values().any(|a| {
            a.jwks_url.as_ref().is_some_and(|u| {
                crate::auth::JwksUrl::parse(&u.value)
                    .is_ok_and(|u| u.host.parse::<IpAddr>().is_err())
            })
        });
    let reusable = previous
        .filter(|p| p.dns == config.dns)
        .and_then(|p| p.resolver.clone());
    let resolver = match reusable {
        Some(r) => Some(r),
        None if needs_resolver => {
            Some(make_resolver(&config.dns).map_err(|e| format!("dns: {e}"))?)
        }
        None => None,
    };

    let mut upstreams = BTreeMap::new();
    for (name, cfg) in &config.upstreams {
        let spec = UpstreamSpec::new(cfg, &config.dns);
        let kept = previous
            .and_then(|p| p.upstreams.get(name))
            .filter(|u| u.spec == spec)
            .cloned();
        let up = match kept {
            Some(u) => u,
            None => {
                let u = Upstream::new(name, spec);
                if let (true, Some(r)) = (u.needs_discovery(), &resolver) {
                    let errors = u.refresh(r).await;
                    if !errors.is_empty() {
                        warn!(upstream = %name, errors = ?errors, "could not resolve every target; will retry on the refresh interval");
                    }
                }
                u
            }
        };
        upstreams.insert(name.clone(), up);
    }

    let mut auth = BTreeMap::new();
    let mut identity_headers: Vec<http::HeaderName> = Vec::new();
    for (name, cfg) in &config.auth {
        let spec = (cfg.without_locations(), config.dns.clone());
        let kept = previous
            .and_then(|p| p.auth.get(name))
            .filter(|a| a.spec == spec)
            .cloned();
        let policy = match kept {
            Some(p) => p,
            None => {
                let p = Arc::new(
                    AuthPolicy::new(name, cfg, &config.dns)
                        .map_err(|e| format!("auth.{name}: {e}"))?,
                );
                // Fetch the keys before the runtime serves, so the first requests find them.
                p.fetch_now(resolver.as_ref()).await;
                p
            }
        };
        for (_, header) in &policy.forward {
            if !identity_headers.contains(header) {
                identity_headers.push(header.clone());
            }
        }
        auth.insert(name.clone(), policy);
    }

    let mut rate_limits = BTreeMap::new();
    for (name, cfg) in &config.rate_limits {
        let kept = previous
            .and_then(|p| p.rate_limits.get(name))
            .filter(|l| l.spec == cfg.without_locations())
            .cloned();
        let policy = match kept {
            Some(p) => p,
            None => Arc::new(
                RateLimitPolicy::new(name, cfg).map_err(|e| format!("rate_limits.{name}: {e}"))?,
            ),
        };
        rate_limits.insert(name.clone(), policy);
    }

    let mut routes = Vec::with_capacity(config.routes.len());
    for r in &config.routes {
        let upstream = upstreams
            .get(&r.upstream.value)
            .cloned()
            .ok_or_else(|| format!("route {}: no upstream `{}`", r.name.value, r.upstream.value))?;
        routes.push(Route {
            name: r.name.value.as_str().into(),
            retries: r.retries.unwrap_or_else(|| upstream.retries()),
            upstream,
            rewrite: compile_rewrite(r).map_err(|e| format!("route {}: {e}", r.name.value))?,
            timeouts: r.timeouts,
            auth: match &r.auth {
                Some(name) => Some(auth.get(&name.value).cloned().ok_or_else(|| {
                    format!("route {}: no auth policy `{}`", r.name.value, name.value)
                })?),
                None => None,
            },
            auth_optional: r.auth_optional,
            metrics: RouteMetrics::new(&r.name.value),
            rate_limit: match &r.rate_limit {
                Some(name) => Some(rate_limits.get(&name.value).cloned().ok_or_else(|| {
                    format!("route {}: no rate limit `{}`", r.name.value, name.value)
                })?),
                None => None,
            },
            max_request_body: r
                .max_request_body
                .or(config.limits.max_request_body)
                .map(|b| b.0),
        });
    }

    // TLS last: replacing a store's certificates is the one step that changes running state,
    // so it happens only once everything else has been built.
    let mut tls_stores = BTreeMap::new();
    let mut redirects = Vec::new();
    let mut hsts = Vec::new();
    for (name, l) in &config.listeners {
        let addr = l.address.value.0;
        if let Some(port) = l.redirect_https {
            redirects.push((addr, port));
        }
        let Some(tls) = &l.tls else { continue };
        if let Some(value) = &tls.hsts {
            let value = http::HeaderValue::from_str(value)
                .map_err(|_| format!("listeners.{name}.tls.hsts: not a header value"))?;
            hsts.push((addr, value));
        }
        let store = match previous.and_then(|p| p.tls_stores.get(name)) {
            Some(store) => {
                if !store.serves(&tls.certificates) {
                    store
                        .replace(&tls.certificates)
                        .map_err(|e| format!("listeners.{name}.tls: {e}"))?;
                }
                store.clone()
            }
            None => CertStore::new(name, tls).map_err(|e| format!("listeners.{name}.tls: {e}"))?,
        };
        store.set_poll_interval(tls.reload_interval.0);
        tls_stores.insert(name.clone(), store);
    }

    let access_log = match (
        &config.access_log,
        previous.and_then(|p| p.access_log.as_ref()),
    ) {
        (None, _) => None,
        (Some(cfg), Some(running)) if running.spec == *cfg => Some(running.clone()),
        (Some(cfg), _) => Some(crate::accesslog::AccessLog::start(cfg)?),
    };

    let trusted_proxies = config
        .trusted_proxies
        .iter()
        .map(|c| parse_cidr(&c.value))
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Runtime {
        generation,
        source_hash: loaded.source_hash,
        router,
        routes,
        upstreams,
        auth,
        rate_limits,
        tls_stores,
        redirects,
        hsts,
        unmatched: RouteMetrics::new("(none)"),
        access_log,
        identity_headers,
        trusted_proxies,
        forwarding: config.forwarding,
        limits: config.limits,
        bindings: Bindings::of(config),
        resolver,
        dns: config.dns.clone(),
    })
}

/// Starts the background tasks (discovery, health checks, JWKS refresh, rate-limit cleanup,
/// certificate watching) of every upstream, policy and TLS listener that does not run them yet. Must be called
/// on the control-plane Tokio runtime.
pub fn start_upstream_tasks(rt: &Runtime) {
    for u in rt.upstreams.values() {
        u.spawn_tasks(rt.resolver.clone());
    }
    for a in rt.auth.values() {
        a.spawn_tasks(rt.resolver.clone());
    }
    for l in rt.rate_limits.values() {
        l.spawn_tasks();
    }
    for store in rt.tls_stores.values() {
        store.spawn_watch();
    }
}
