//! Activation: a compiled [`Plan`] becomes a [`Runtime`]. What did not change is taken over
//! from the previous runtime (upstreams with their health, policies with their keys and
//! buckets, the access log, the certificate stores); the rest is made here. Every step that can
//! fail runs before the one step that changes running state (new certificates in a store), so
//! an activation either applies whole or changes nothing.

use super::{ListenerPlan, NamedPolicy, Plan, PolicyPlan, RoutePlan};
use crate::acme::Manager as AcmeManager;
use crate::auth::AuthPolicy;
use crate::metrics::RouteMetrics;
use crate::policy::{
    BodyLimit, ConcurrencyLimit, Hsts, HttpsRedirect, Jwt, Pipeline, Policy, RateLimit,
};
use crate::ratelimit::RateLimitPolicy;
use crate::runtime::{Route, Runtime};
use crate::tls::CertStore;
use crate::upstream::{make_resolver, Upstream};
use hickory_resolver::TokioResolver;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tracing::warn;

/// Listener pipelines by bound address, certificate stores and ACME managers by listener
/// name.
type Listeners = (
    Vec<(SocketAddr, Pipeline)>,
    BTreeMap<String, Arc<CertStore>>,
    BTreeMap<String, Arc<AcmeManager>>,
);

/// Makes the runtime a plan describes. Upstreams whose definition did not change are taken
/// over from `previous`; new ones resolve their host names once before this returns, so the
/// new runtime starts with replicas. On error nothing running has changed.
pub async fn activate(
    plan: Plan,
    previous: Option<&Runtime>,
    generation: u64,
) -> Result<Runtime, String> {
    let config = &plan.config;
    let resolver = resolver(&plan, previous)?;

    let mut upstreams = BTreeMap::new();
    for (name, spec) in plan.upstreams {
        let kept = previous
            .and_then(|p| p.upstreams.get(&name))
            .filter(|u| u.spec == spec)
            .cloned();
        let up = match kept {
            Some(u) => u,
            None => {
                let u = Upstream::new(&name, spec);
                if previous.is_some_and(|p| p.upstreams.contains_key(&name)) {
                    u.replaces_a_serving_one();
                }
                // At start nothing waits for DNS: discovery runs in the background and
                // `/ready` says what it waits for. A reload resolves before it swaps, so a
                // running gateway never serves an upstream with no replicas yet.
                if let (true, true, Some(r)) = (previous.is_some(), u.needs_discovery(), &resolver)
                {
                    let errors = u.refresh(r).await;
                    if !errors.is_empty() {
                        warn!(upstream = %name, errors = ?errors, "could not resolve every target; will retry on the refresh interval");
                    }
                }
                u
            }
        };
        upstreams.insert(name, up);
    }

    let mut auth = BTreeMap::new();
    let mut identity_headers: Vec<http::HeaderName> = Vec::new();
    for (name, compiled) in plan.auth {
        let kept = previous
            .and_then(|p| p.auth.get(&name))
            .filter(|a| a.spec == compiled.spec)
            .cloned();
        let policy = match kept {
            Some(p) => p,
            None => {
                // On a reload, keys are fetched before the runtime serves, so the first
                // requests find them; at start, in the background (`/ready` waits for it).
                if previous.is_some() {
                    compiled.fetch_now(resolver.as_ref()).await;
                }
                compiled
            }
        };
        for (_, header) in &policy.forward {
            if !identity_headers.contains(header) {
                identity_headers.push(header.clone());
            }
        }
        auth.insert(name, policy);
    }

    let mut rate_limits = BTreeMap::new();
    for (name, compiled) in plan.rate_limits {
        let kept = previous
            .and_then(|p| p.rate_limits.get(&name))
            .filter(|l| l.spec == compiled.spec)
            .cloned();
        rate_limits.insert(name, kept.unwrap_or(compiled));
    }

    // Concurrency limits whose settings did not change keep their places across the reload:
    // the requests in flight on the old runtime still count. Listeners and routes naming one
    // limit keep sharing it.
    let limits: BTreeMap<&str, &Arc<ConcurrencyLimit>> = previous
        .iter()
        .flat_map(|p| {
            let routes = p.routes.iter().map(|r| &r.policies);
            routes.chain(p.listeners.iter().map(|(_, pipeline)| pipeline))
        })
        .flat_map(|pipeline| pipeline.policies())
        .filter_map(|p| match p {
            Policy::Concurrency(l) => Some((&*l.name, l)),
            _ => None,
        })
        .collect();
    // The auth services of `forward_auth` policies are upstreams of this runtime.
    let named = plan
        .routes
        .iter()
        .flat_map(|r| r.policies.iter())
        .filter_map(|p| match p {
            PolicyPlan::Named(n) => Some(n),
            _ => None,
        })
        .chain(plan.listeners.iter().flat_map(|l| l.policies.iter()));
    for policy in named {
        if let Policy::ForwardAuth(f) = policy.get() {
            let up = upstreams
                .get(&f.upstream_name)
                .ok_or_else(|| format!("forward_auth: no upstream `{}`", f.upstream_name))?;
            let _ = f.upstream.set(up.clone());
        }
    }
    let mut routes = Vec::with_capacity(plan.routes.len());
    // A route that keeps its name keeps its metric handles: the counters behind them are the
    // same series, and the dashboard reads totals through the handles.
    let old_metrics: BTreeMap<&str, &Arc<RouteMetrics>> = previous
        .iter()
        .flat_map(|p| p.routes.iter().map(|r| (&*r.name, &r.metrics)))
        .collect();
    for (index, r) in plan.routes.into_iter().enumerate() {
        let metrics = old_metrics
            .get(r.name.as_str())
            .map_or_else(|| Arc::new(RouteMetrics::new(&r.name)), |m| Arc::clone(m));
        routes.push(route(
            r,
            index,
            metrics,
            &upstreams,
            &auth,
            &rate_limits,
            &limits,
        )?);
    }

    let access_log = match (
        &plan.access_log,
        previous.and_then(|p| p.access_log.as_ref()),
    ) {
        (None, _) => None,
        (Some(cfg), Some(running)) if running.spec == *cfg => Some(running.clone()),
        (Some(cfg), _) => Some(crate::accesslog::AccessLog::start(cfg)?),
    };

    // Last, and unable to fail: the certificates go live.
    let (listeners, tls_stores, acme) = listeners(plan.listeners, previous, &limits);
    let mut acme_http01: Vec<std::path::PathBuf> = Vec::new();
    for m in acme.values() {
        let p = m.plan();
        if p.challenge == crate::config::AcmeChallenge::Http01 && !acme_http01.contains(&p.storage)
        {
            acme_http01.push(p.storage.clone());
        }
    }

    Ok(Runtime {
        generation,
        source_hash: plan.source_hash,
        files: plan.files,
        router: plan.router,
        routes,
        upstreams,
        auth,
        rate_limits,
        tls_stores,
        acme,
        acme_http01,
        listeners,
        unmatched: previous.map_or_else(
            || Arc::new(RouteMetrics::new("(none)")),
            |p| p.unmatched.clone(),
        ),
        access_log,
        identity_headers,
        trusted_proxies: plan.trusted_proxies,
        forwarding: config.forwarding,
        admin_token: config
            .admin
            .as_ref()
            .and_then(|a| a.token.as_ref())
            .map(|t| crate::admin::token_digest(t.value.as_bytes())),
        limits: config.limits,
        bindings: plan.bindings,
        resolver,
        dns: config.dns.clone(),
    })
}

/// The resolver discovery and key fetches use: the previous one while the DNS settings are
/// the same, a new one when some name needs resolving, else none.
fn resolver(plan: &Plan, previous: Option<&Runtime>) -> Result<Option<TokioResolver>, String> {
    let config = &plan.config;
    if let Some(r) = previous
        .filter(|p| p.dns == config.dns)
        .and_then(|p| p.resolver.clone())
    {
        return Ok(Some(r));
    }
    let needs_resolver = config
        .upstreams
        .values()
        .any(|u| u.targets.value.iter().any(|t| t.ip().is_none()))
        || config.auth.values().any(|a| {
            a.value.jwks_url.as_ref().is_some_and(|u| {
                crate::auth::JwksUrl::parse(&u.value)
                    .is_ok_and(|u| u.host.parse::<IpAddr>().is_err())
            })
        });
    if !needs_resolver {
        return Ok(None);
    }
    make_resolver(&config.dns)
        .map(Some)
        .map_err(|e| format!("dns: {e}"))
}

/// A route with its policies resolved to the running objects they name.
fn route(
    r: RoutePlan,
    index: usize,
    metrics: Arc<RouteMetrics>,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    auth: &BTreeMap<String, Arc<AuthPolicy>>,
    rate_limits: &BTreeMap<String, Arc<RateLimitPolicy>>,
    limits: &BTreeMap<&str, &Arc<ConcurrencyLimit>>,
) -> Result<Route, String> {
    let missing = |kind: &str, name: &str| format!("route {}: no {kind} `{name}`", r.name);
    let upstream = match &r.upstream {
        Some(name) => Some(
            upstreams
                .get(name)
                .cloned()
                .ok_or_else(|| missing("upstream", name))?,
        ),
        None => None,
    };
    let mut policies = Vec::with_capacity(r.policies.len());
    for p in &r.policies {
        policies.push(match p {
            PolicyPlan::Named(named) => carried_over(named, limits),
            PolicyPlan::BodyLimit(max) => Policy::BodyLimit(BodyLimit { max: *max }),
            PolicyPlan::Jwt { policy, optional } => Policy::Jwt(Jwt {
                policy: auth
                    .get(policy)
                    .cloned()
                    .ok_or_else(|| missing("auth policy", policy))?,
                optional: *optional,
            }),
            PolicyPlan::RateLimit(name) => Policy::RateLimit(RateLimit {
                policy: rate_limits
                    .get(name)
                    .cloned()
                    .ok_or_else(|| missing("rate limit", name))?,
                route: index as u32,
            }),
        });
    }
    let split = if r.split.is_empty() {
        None
    } else {
        let mut sides = Vec::with_capacity(r.split.len());
        for (name, weight) in &r.split {
            let up = upstreams
                .get(name)
                .cloned()
                .ok_or_else(|| missing("upstream", name))?;
            sides.push((up, *weight));
        }
        Some(crate::policy::split::Split::new(sides, r.sticky.clone()))
    };
    let mirror = match &r.mirror {
        None => None,
        Some((name, percent, max_body, timeout)) => {
            let up = upstreams
                .get(name)
                .cloned()
                .ok_or_else(|| missing("upstream", name))?;
            Some(Arc::new(crate::policy::mirror::Mirror::new(
                &r.name, up, *percent, *max_body, *timeout,
            )))
        }
    };
    Ok(Route {
        split,
        mirror,
        retries: r
            .retries
            .or_else(|| upstream.as_ref().map(|u| u.retries()))
            .unwrap_or(0),
        metrics,
        name: r.name.into(),
        upstream,
        rewrite: r.rewrite,
        timeouts: r.timeouts,
        policies: Pipeline::new(policies).with_error_pages(r.error_pages),
        matcher: r.matcher,
    })
}

/// The listeners' pipelines (only those with policies), and their certificate stores with the
/// plan's certificates installed: the same stores live on from runtime to runtime, since
/// Pingora holds them as the listeners' resolvers.
/// A named policy as the new runtime runs it: a concurrency limit whose settings did not
/// change is the previous runtime's.
fn carried_over(named: &NamedPolicy, limits: &BTreeMap<&str, &Arc<ConcurrencyLimit>>) -> Policy {
    match named.get() {
        Policy::Concurrency(new) => Policy::Concurrency(
            limits
                .get(&*new.name)
                .filter(|old| old.spec == new.spec)
                .map_or_else(|| new.clone(), |old| Arc::clone(old)),
        ),
        _ => named.policy(),
    }
}

fn listeners(
    plans: Vec<ListenerPlan>,
    previous: Option<&Runtime>,
    limits: &BTreeMap<&str, &Arc<ConcurrencyLimit>>,
) -> Listeners {
    let mut pipelines = Vec::new();
    let mut stores = BTreeMap::new();
    let mut acme = BTreeMap::new();
    for l in plans {
        let mut policies = Vec::new();
        if let Some(port) = l.redirect_https {
            policies.push(Policy::HttpsRedirect(HttpsRedirect { port }));
        }
        if let Some(value) = l.hsts {
            policies.push(Policy::Hsts(Hsts { value }));
        }
        policies.extend(l.policies.iter().map(|p| carried_over(p, limits)));
        let pipeline = Pipeline::new(policies).with_error_pages(l.error_pages);
        if !pipeline.is_empty() {
            pipelines.push((l.address, pipeline));
        }
        let Some((certs, poll)) = l.tls else { continue };
        let store = match previous.and_then(|p| p.tls_stores.get(&l.name)) {
            Some(store) => {
                store.install(certs);
                store.set_poll_interval(poll);
                store.clone()
            }
            None => CertStore::new(&l.name, certs, poll),
        };
        match l.acme {
            Some(plan) => {
                let kept = previous
                    .and_then(|p| p.acme.get(&l.name))
                    .filter(|m| *m.plan() == plan)
                    .cloned();
                let manager = kept.unwrap_or_else(|| AcmeManager::new(plan, store.clone()));
                acme.insert(l.name.clone(), manager);
            }
            None => store.clear_acme(),
        }
        stores.insert(l.name, store);
    }
    (pipelines, stores, acme)
}

/// Starts the background tasks of every part of `rt` that does not run them yet: upstream
/// discovery and health checks, JWKS refresh, rate-limit cleanup, certificate watching. Must
/// be called on the control-plane Tokio runtime.
pub fn start_tasks(rt: &Runtime) {
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
    for manager in rt.acme.values() {
        manager.start();
    }
    for mirror in rt.routes.iter().filter_map(|r| r.mirror.as_ref()) {
        mirror.spawn_task();
    }
}
