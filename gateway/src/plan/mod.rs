//! From a parsed configuration to what serves it, in two steps:
//!
//! 1. [`compile`]: every check and every parse (references, rates, keys, secrets, HSTS values,
//!    CIDRs, regexes, JWKS URLs, access-log settings, certificates read and parsed), with no
//!    side effect. `gateway check`, `gateway run` and a reload all call it, so they cannot
//!    disagree. Every error names `FILE:LINE:COLUMN` and the field.
//! 2. [`activate`]: the side effects (DNS lookups of new upstreams, key fetches, the access
//!    log opened, certificates swapped), in an order where everything that can fail comes
//!    before anything that changes running state, so a rejected reload changes nothing.

mod activate;
pub mod files;
mod named;
pub use named::concurrency_spec;
mod validate;

pub use activate::{activate, start_tasks};

use crate::auth::AuthPolicy;
use crate::config::{AccessLogConfig, Config, ConfigError, LoadedConfig, RouteTimeouts, TlsConfig};
use crate::policy::Policy;
use crate::ratelimit::RateLimitPolicy;
use crate::routing::{compile_rewrite, PathRewrite, Router};
use crate::runtime::Bindings;
use crate::tls::LoadedCerts;
use crate::upstream::UpstreamSpec;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// A compiled configuration: everything checked and parsed, nothing started.
pub struct Plan {
    /// The file it came from.
    pub path: std::path::PathBuf,
    /// A hash of the file's bytes and of the files it names ([`files`]).
    pub source_hash: u64,
    /// The files it names besides itself, watched for changes.
    pub files: Vec<std::path::PathBuf>,
    /// The route table.
    pub router: Router,
    /// Routes, in the router's order.
    pub routes: Vec<RoutePlan>,
    /// Upstream definitions by name.
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    /// Token policies by name, built but not fetching keys.
    pub auth: BTreeMap<String, Arc<AuthPolicy>>,
    /// Rate-limit policies by name, built but not running.
    pub rate_limits: BTreeMap<String, Arc<RateLimitPolicy>>,
    /// Listeners with what applies to them before routing.
    pub listeners: Vec<ListenerPlan>,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The access log, checked but not opened.
    pub access_log: Option<AccessLogConfig>,
    /// What the listeners bind (a change needs a restart).
    pub bindings: Bindings,
    /// The configuration itself, for what is read as written (limits, forwarding, DNS).
    pub config: Config,
}

/// A compiled route: its policies by name, resolved to running objects on activation.
pub struct RoutePlan {
    /// The route's name.
    pub name: String,
    /// The upstream it sends traffic to; none when a policy answers every request.
    pub upstream: Option<String>,
    /// Upstreams sharing its requests by weight.
    pub split: Vec<(String, u32)>,
    /// What keeps a client on one side of the split.
    pub sticky: Option<crate::policy::split::Sticky>,
    /// The shadow upstream, share in percent, largest body, timeout.
    pub mirror: Option<(String, u32, u64, std::time::Duration)>,
    /// How it changes the path.
    pub rewrite: PathRewrite,
    /// Timeout overrides.
    pub timeouts: RouteTimeouts,
    /// Retries after the first attempt, when the route overrides the upstream's.
    pub retries: Option<u32>,
    /// Policies, in the order they run.
    pub policies: Vec<PolicyPlan>,
    /// What it matches, for the admin views.
    pub matcher: serde_json::Value,
    /// Bodies of the gateway's own answers for it.
    pub error_pages: Option<Arc<crate::policy::ErrorPages>>,
}

/// A compiled named policy (`policies:`), shared by every route and listener that lists it
/// (equal only to itself).
#[derive(Clone)]
pub struct NamedPolicy(Arc<Policy>);

impl NamedPolicy {
    /// A named policy compiled as `policy`.
    pub fn new(policy: Policy) -> NamedPolicy {
        NamedPolicy(Arc::new(policy))
    }

    /// The policy as compiled.
    pub fn get(&self) -> &Policy {
        &self.0
    }

    /// The running policy (its state shared with every other use of the name).
    pub fn policy(&self) -> Policy {
        (*self.0).clone()
    }
}

impl std::fmt::Debug for NamedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.kind())
    }
}

impl PartialEq for NamedPolicy {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for NamedPolicy {}

/// A compiled route policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyPlan {
    /// A named policy.
    Named(NamedPolicy),
    /// Request body bytes allowed.
    BodyLimit(u64),
    /// The named `auth` policy; `optional` lets requests without a token pass.
    Jwt { policy: String, optional: bool },
    /// The named rate limit.
    RateLimit(String),
}

/// A compiled listener.
pub struct ListenerPlan {
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: SocketAddr,
    /// The HTTPS port a plain listener redirects to.
    pub redirect_https: Option<u16>,
    /// The `Strict-Transport-Security` value a TLS listener sends.
    pub hsts: Option<http::HeaderValue>,
    /// A TLS listener's certificates, loaded; and how often their files are polled.
    pub tls: Option<(LoadedCerts, std::time::Duration)>,
    /// A TLS listener's ACME certificate.
    pub acme: Option<crate::acme::AcmePlan>,
    /// Named policies run before routing.
    pub policies: Vec<NamedPolicy>,
    /// Bodies of the gateway's own answers on it.
    pub error_pages: Option<Arc<crate::policy::ErrorPages>>,
}

/// Reads, parses and compiles a configuration file: what `gateway check` reports, and the
/// first half of `gateway run` and of every reload.
pub fn load(path: &Path) -> Result<Plan, ConfigError> {
    compile(&crate::config::load(path)?)
}

/// Compiles a parsed configuration. No side effects: nothing is started, fetched, opened or
/// swapped.
pub fn compile(loaded: &LoadedConfig) -> Result<Plan, ConfigError> {
    let config = &loaded.config;
    let file = loaded.path.as_path();
    validate::validate(file, config)?;
    let c = validate::Checker { file };

    let router = Router::new(&config.routes).map_err(|(i, e)| {
        let route = &config.routes[i];
        let at = route
            .matcher
            .path_regex
            .as_ref()
            .map_or(&route.name.referenced, |r| &r.referenced);
        c.err(at, format!("routes[{i}].match"), e.to_string())
    })?;
    let auth = compile_auth(&c, config)?;
    let rate_limits = compile_rate_limits(&c, config)?;
    let named = named::compile(&c, config)?;
    let defaults = named::resolve(&c, &named, &config.default_policies, "default_policies")?;
    let mut routes = Vec::with_capacity(config.routes.len());
    for (i, r) in config.routes.iter().enumerate() {
        let rewrite = compile_rewrite(r)
            .map_err(|e| c.err_at(&r.name, format!("routes[{i}]"), e.to_string()))?;
        let own = named::resolve(&c, &named, &r.policies, &format!("routes[{i}].policies"))?;
        let answers = |p: &NamedPolicy| matches!(p.get(), Policy::Redirect(_) | Policy::Respond(_));
        if r.upstream.is_none() && r.split.is_empty() && !defaults.iter().chain(&own).any(answers) {
            return Err(c.err_at(
                &r.name,
                format!("routes[{i}].upstream"),
                "missing: a route needs an `upstream` unless a `redirect` or `respond` policy answers for it",
            ));
        }
        let bridges = |p: &NamedPolicy| matches!(p.get(), Policy::GrpcWeb(_));
        if defaults.iter().chain(&own).any(bridges) {
            check_http2_upstreams(&c, config, i, r)?;
        }
        let mut policies: Vec<PolicyPlan> = defaults
            .iter()
            .chain(&own)
            .cloned()
            .map(PolicyPlan::Named)
            .collect();
        if let Some(max) = r.max_request_body.or(config.limits.max_request_body) {
            policies.push(PolicyPlan::BodyLimit(max.0));
        }
        if let Some(a) = &r.auth {
            policies.push(PolicyPlan::Jwt {
                policy: a.value.clone(),
                optional: r.auth_optional,
            });
        }
        if let Some(l) = &r.rate_limit {
            policies.push(PolicyPlan::RateLimit(l.value.clone()));
        }
        routes.push(RoutePlan {
            name: r.name.value.clone(),
            upstream: r.upstream.as_ref().map(|u| u.value.clone()),
            split: r
                .split
                .iter()
                .map(|s| (s.upstream.value.clone(), s.weight))
                .collect(),
            mirror: r.mirror.as_ref().map(|m| {
                let m = &m.value;
                (
                    m.upstream.value.clone(),
                    m.percent,
                    m.max_body.map_or(64 << 10, |b| b.0),
                    m.timeout.map_or(std::time::Duration::from_secs(5), |t| t.0),
                )
            }),
            // Checked by validation.
            sticky: r
                .sticky
                .as_ref()
                .and_then(|s| crate::policy::split::Sticky::parse(&s.value).ok()),
            rewrite,
            timeouts: r.timeouts,
            retries: r.retries,
            policies,
            matcher: r.matcher.describe(),
            error_pages: named::error_pages(
                &c,
                &r.error_pages,
                &format!("routes[{i}].error_pages"),
            )?,
        });
    }
    let upstreams = config
        .upstreams
        .iter()
        .map(|(name, u)| (name.clone(), UpstreamSpec::new(u, &config.dns)))
        .collect();
    let trusted_proxies = config
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(i, cidr)| {
            validate::parse_cidr(&cidr.value)
                .map_err(|m| c.err_at(cidr, format!("trusted_proxies[{i}]"), m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let files = files::referenced(config);
    Ok(Plan {
        path: loaded.path.clone(),
        source_hash: loaded.source_hash ^ files::hash(&files),
        files,
        router,
        routes,
        upstreams,
        auth,
        rate_limits,
        listeners: compile_listeners(&c, config, &named)?,
        trusted_proxies,
        access_log: compile_access_log(&c, config)?,
        bindings: Bindings::of(config),
        config: config.clone(),
    })
}

fn compile_auth(
    c: &validate::Checker,
    config: &Config,
) -> Result<BTreeMap<String, Arc<AuthPolicy>>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, spanned) in &config.auth {
        let policy = &spanned.value;
        // Building the policy checks it whole: key sources, files, algorithms, header names.
        // The error points at the key source it is about, else at the policy.
        let built = AuthPolicy::new(name, policy, &config.dns).map_err(|e| {
            let span = [&policy.jwks_url, &policy.secret, &policy.secret_file]
                .into_iter()
                .flatten()
                .next();
            match span {
                Some(span) => c.err_at(span, format!("auth.{name}"), e),
                None => c.err_at(spanned, format!("auth.{name}"), e),
            }
        })?;
        out.insert(name.clone(), Arc::new(built));
    }
    Ok(out)
}

fn compile_rate_limits(
    c: &validate::Checker,
    config: &Config,
) -> Result<BTreeMap<String, Arc<RateLimitPolicy>>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, spanned) in &config.rate_limits {
        let policy = &spanned.value;
        let field = format!("rate_limits.{name}");
        crate::ratelimit::parse_rate(&policy.rate.value)
            .map_err(|e| c.err_at(&policy.rate, format!("{field}.rate"), e))?;
        if let Some(key) = &policy.key {
            crate::ratelimit::parse_key(&key.value)
                .map_err(|e| c.err_at(key, format!("{field}.key"), e))?;
        }
        // Rate and key parse; what can still fail (`burst`, `max_keys`, `redis.url`, a rate too
        // fast to count, a name unusable in a header) names its field in the message, at the
        // policy's position.
        let built = RateLimitPolicy::new(name, policy).map_err(|e| c.err_at(spanned, field, e))?;
        out.insert(name.clone(), Arc::new(built));
    }
    Ok(out)
}

fn compile_listeners(
    c: &validate::Checker,
    config: &Config,
    named: &BTreeMap<String, NamedPolicy>,
) -> Result<Vec<ListenerPlan>, ConfigError> {
    let mut out = Vec::with_capacity(config.listeners.value.len());
    for (name, l) in &config.listeners.value {
        let tls = match &l.tls {
            Some(tls) => Some(compile_tls(c, name, &l.address.referenced, tls)?),
            None => None,
        };
        let acme = match l.tls.as_ref().and_then(|t| t.acme.as_ref()) {
            Some(acme) => {
                let plain = config.listeners.value.values().any(|l| l.tls.is_none());
                let required_client_cert = l
                    .tls
                    .as_ref()
                    .and_then(|t| t.client_auth.as_ref())
                    .is_some_and(|a| a.required);
                if acme.value.challenge == crate::config::AcmeChallenge::TlsAlpn01
                    && required_client_cert
                {
                    return Err(c.err_at(
                        acme,
                        format!("listeners.{name}.tls.acme.challenge"),
                        "tls-alpn-01 validation presents no client certificate, and this listener requires one: use http-01, or make client_auth optional",
                    ));
                }
                if acme.value.challenge == crate::config::AcmeChallenge::Http01 && !plain {
                    return Err(c.err_at(
                        acme,
                        format!("listeners.{name}.tls.acme.challenge"),
                        "http-01 is answered on a plain listener (port 80), and there is none: add one, or use tls-alpn-01",
                    ));
                }
                Some(
                    crate::acme::compile(name, &acme.value).map_err(|(field, e)| {
                        c.err_at(acme, format!("listeners.{name}.tls.acme.{field}"), e)
                    })?,
                )
            }
            None => None,
        };
        let hsts = match l.tls.as_ref().and_then(|t| t.hsts.as_ref()) {
            Some(v) => Some(http::HeaderValue::from_str(v).map_err(|_| {
                c.err_at(
                    &l.address,
                    format!("listeners.{name}.tls.hsts"),
                    "not a valid header value",
                )
            })?),
            None => None,
        };
        let field = format!("listeners.{name}.policies");
        out.push(ListenerPlan {
            name: name.clone(),
            address: l.address.value.0,
            redirect_https: l.redirect_https,
            hsts,
            tls,
            acme,
            policies: named::resolve(c, named, &l.policies, &field)?,
            error_pages: named::error_pages(
                c,
                &l.error_pages,
                &format!("listeners.{name}.error_pages"),
            )?,
        });
    }
    Ok(out)
}

fn compile_tls(
    c: &validate::Checker,
    listener: &str,
    address: &serde_saphyr::Location,
    tls: &TlsConfig,
) -> Result<(LoadedCerts, std::time::Duration), ConfigError> {
    let loaded = crate::tls::load(tls).map_err(|e| {
        let at = tls
            .certificates
            .first()
            .map_or(address, |c| &c.cert.referenced);
        c.err(at, format!("listeners.{listener}.tls"), e)
    })?;
    Ok((loaded, tls.reload_interval.0))
}

fn compile_access_log(
    c: &validate::Checker,
    config: &Config,
) -> Result<Option<AccessLogConfig>, ConfigError> {
    let Some(log) = &config.access_log else {
        return Ok(None);
    };
    let sample = log.value.sample;
    if !(sample > 0.0 && sample <= 1.0) {
        return Err(c.err_at(
            log,
            "access_log.sample",
            "must be greater than 0 and at most 1",
        ));
    }
    if log.value.path.is_empty() {
        return Err(c.err_at(
            log,
            "access_log.path",
            "a file path, or `-` for standard output",
        ));
    }
    Ok(Some(log.value.clone()))
}

/// A route that bridges gRPC-Web sends gRPC, which needs trailers: HTTP/2 upstreams only.
fn check_http2_upstreams(
    c: &validate::Checker,
    config: &Config,
    i: usize,
    r: &crate::config::RouteConfig,
) -> Result<(), ConfigError> {
    let names = r.upstream.iter().chain(r.split.iter().map(|s| &s.upstream));
    for name in names {
        let http1 = config
            .upstreams
            .get(&name.value)
            .is_some_and(|u| u.protocol.value == crate::config::UpstreamProtocol::Http1);
        if http1 {
            return Err(c.err_at(
                name,
                format!("routes[{i}].policies"),
                format!(
                    "`grpc_web` sends gRPC, which needs HTTP/2: upstream `{}` speaks HTTP/1.1 (set its `protocol` to h2c, h2 or auto)",
                    name.value
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(yaml: &str) -> Result<Plan, ConfigError> {
        let path = Path::new("t.yaml");
        let config = crate::config::parse(path, yaml, &Default::default())?;
        compile(&LoadedConfig {
            path: path.to_path_buf(),
            source_hash: 0,
            config,
        })
    }

    const BASE: &str = "listeners: { h: { address: \"127.0.0.1:1\" } }\nupstreams: { u: { targets: [\"127.0.0.1:2\"] } }\n";

    #[test]
    fn a_route_compiles_its_policies_in_order() {
        let plan = compiled(&format!(
            "{BASE}limits: {{ max_request_body: 1KiB }}\nauth: {{ a: {{ secret: \"0123456789abcdef0123456789abcdef\", algorithms: [HS256] }} }}\nrate_limits: {{ r: {{ rate: 10/s }} }}\nroutes:\n  - {{ name: bare, upstream: u, max_request_body: 0 }}\n  - {{ name: full, upstream: u, auth: a, auth_optional: true, rate_limit: r }}\n"
        ))
        .unwrap();
        assert_eq!(plan.routes[0].policies, [PolicyPlan::BodyLimit(0)]);
        assert_eq!(
            plan.routes[1].policies,
            [
                PolicyPlan::BodyLimit(1024),
                PolicyPlan::Jwt {
                    policy: "a".into(),
                    optional: true
                },
                PolicyPlan::RateLimit("r".into()),
            ]
        );
    }

    #[test]
    fn the_access_log_sample_is_checked_with_its_position() {
        let err = compiled(&format!(
            "{BASE}access_log: {{ sample: 2.0 }}\nroutes: [ {{ name: r, upstream: u }} ]\n"
        ))
        .err()
        .unwrap();
        assert_eq!((err.line, err.field.as_str()), (3, "access_log.sample"));
    }

    #[test]
    fn a_rate_limit_error_points_at_the_field_that_is_wrong() {
        let err = compiled(&format!(
            "{BASE}rate_limits:\n  r:\n    rate: 10/s\n    key: \"bogus\"\nroutes: [ {{ name: r, upstream: u }} ]\n"
        ))
        .err()
        .unwrap();
        assert_eq!((err.line, err.field.as_str()), (6, "rate_limits.r.key"));
        let err = compiled(&format!(
            "{BASE}rate_limits:\n  r:\n    rate: often\nroutes: [ {{ name: r, upstream: u }} ]\n"
        ))
        .err()
        .unwrap();
        assert_eq!((err.line, err.field.as_str()), (5, "rate_limits.r.rate"));
    }
}
