//! Checks that need the whole file: references between sections, values that parse as a type
//! but make no sense together. Every error points at the offending field. The policies'
//! own settings are checked where they are compiled (`plan::compile`).

use crate::config::{
    Balance, Config, ConfigError, HealthConfig, RouteConfig, UpstreamConfig, UpstreamProtocol,
};
use ipnet::IpNet;
use serde_saphyr::{Location, Spanned};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Makes errors that point into one file.
pub(super) struct Checker<'a> {
    pub(super) file: &'a Path,
}

impl Checker<'_> {
    pub(super) fn err(
        &self,
        loc: &Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::at(self.file, loc, field, message)
    }

    pub(super) fn err_at<T>(
        &self,
        span: &Spanned<T>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        self.err(&span.referenced, field, message)
    }

    /// A reference to a `kind` named `name.value` that the file does not define.
    fn dangling<'k>(
        &self,
        name: &Spanned<String>,
        field: String,
        kind: &str,
        defined: impl Iterator<Item = &'k String>,
    ) -> ConfigError {
        let defined: Vec<&str> = defined.map(String::as_str).collect();
        let defined = if defined.is_empty() {
            "none".to_string()
        } else {
            defined.join(", ")
        };
        self.err_at(
            name,
            field,
            format!("no {kind} named `{}` (defined: {defined})", name.value),
        )
    }
}

/// Validates a parsed configuration as a whole.
pub fn validate(file: &Path, config: &Config) -> Result<(), ConfigError> {
    let c = Checker { file };

    if let Some(threads) = config.threads.as_ref().filter(|t| t.value == 0) {
        return Err(c.err_at(threads, "threads", "must be at least 1"));
    }
    if let Some(traces) = &config.traces {
        let url = &traces.otlp_endpoint;
        let ok = url.value.strip_prefix("http://").is_some_and(|rest| {
            !rest.is_empty() && http::Uri::try_from(url.value.as_str()).is_ok()
        });
        if !ok {
            return Err(c.err_at(
                url,
                "traces.otlp_endpoint",
                "needs an http:// URL (OTLP over HTTP, e.g. http://otel-collector:4318/v1/traces)",
            ));
        }
        if !(0.0..=1.0).contains(&traces.sample_ratio) {
            return Err(c.err_at(url, "traces.sample_ratio", "must be 0.0 to 1.0"));
        }
        if traces.max_queue == 0 {
            return Err(c.err_at(url, "traces.max_queue", "must be at least 1"));
        }
    }
    if let Some(docker) = &config.providers.docker {
        let endpoint = docker.value.endpoint.as_str();
        let tcp = endpoint
            .strip_prefix("tcp://")
            .or_else(|| endpoint.strip_prefix("http://"));
        let ok = match tcp {
            Some(addr) => addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            }),
            None => !endpoint
                .strip_prefix("unix://")
                .unwrap_or(endpoint)
                .is_empty(),
        };
        if !ok {
            return Err(c.err_at(
                docker,
                "providers.docker.endpoint",
                "needs unix://PATH, a path, or tcp://HOST:PORT",
            ));
        }
        if docker.value.refresh.0.is_zero() {
            return Err(c.err_at(docker, "providers.docker.refresh", "must be more than 0s"));
        }
    }
    for (name, up) in &config.upstreams {
        if let Some(ca) = up.tls.as_ref().and_then(|t| t.ca.as_ref()) {
            if let Err(e) = crate::tls::load_ca(&ca.value) {
                return Err(c.err_at(ca, format!("upstreams.{name}.tls.ca"), e));
            }
        }
    }
    if config.listeners.value.is_empty() {
        return Err(c.err_at(
            &config.listeners,
            "listeners",
            "at least one listener is needed",
        ));
    }
    let mut bound: HashMap<std::net::SocketAddr, String> = HashMap::new();
    for (name, l) in &config.listeners.value {
        if l.tls.is_some() && l.redirect_https.is_some() {
            return Err(c.err_at(
                &l.address,
                format!("listeners.{name}.redirect_https"),
                "only a plain (non-TLS) listener redirects to HTTPS",
            ));
        }
        if !(1024..=1 << 20).contains(&l.read_buffer) {
            return Err(c.err_at(
                &l.address,
                format!("listeners.{name}.read_buffer"),
                "must be 1024 to 1048576 bytes",
            ));
        }
        if let Some(other) = bound.insert(l.address.value.0, name.clone()) {
            return Err(c.err_at(
                &l.address,
                format!("listeners.{name}.address"),
                format!("address already used by listener `{other}`"),
            ));
        }
    }
    if let Some(admin) = &config.admin {
        if let Some(t) = admin.token.as_ref().filter(|t| t.value.len() < 16) {
            return Err(c.err_at(t, "admin.token", "at least 16 characters"));
        }
        if let Some(other) = bound.get(&admin.address.value.0) {
            return Err(c.err_at(
                &admin.address,
                "admin.address",
                format!("address already used by listener `{other}`"),
            ));
        }
    }
    if config.reload.value.poll_interval.0.is_zero() {
        return Err(c.err_at(
            &config.reload,
            "reload.poll_interval",
            "must be greater than zero",
        ));
    }

    for (name, u) in &config.upstreams {
        let field = |f: &str| format!("upstreams.{name}.{f}");
        if u.targets.value.is_empty() {
            return Err(c.err_at(
                &u.targets,
                field("targets"),
                "at least one target is needed",
            ));
        }
        match (u.balance.value, &u.hash_key) {
            (Balance::ConsistentHash, None) => {
                return Err(c.err_at(
                    &u.balance,
                    field("balance"),
                    "consistent_hash needs `hash_key` (client_ip, path, {header: NAME} or {cookie: NAME})",
                ))
            }
            (b, Some(_)) if b != Balance::ConsistentHash => {
                return Err(c.err_at(
                    &u.balance,
                    field("hash_key"),
                    "hash_key is only used with `balance: consistent_hash`",
                ))
            }
            _ => {}
        }
        if u.discovery.value.refresh.0.is_zero() {
            return Err(c.err_at(
                &u.discovery,
                field("discovery.refresh"),
                "must be greater than zero",
            ));
        }
        check_health(&c, &u.health, field)?;
        if let Some(b) = &u.circuit_breaker {
            let v = &b.value;
            let m = if !(1..=100).contains(&v.failure_percent) {
                Some("`failure_percent` must be 1 to 100")
            } else if v.trial_requests == 0 {
                Some("`trial_requests` must be 1 or more")
            } else if v.window.0.as_secs() == 0 || v.open_for.0.is_zero() {
                Some("`window` (at least 1s) and `open_for` must be greater than zero")
            } else if v.statuses.iter().any(|s| !(100..=599).contains(s)) {
                Some("`statuses` are HTTP statuses (100 to 599)")
            } else {
                None
            };
            if let Some(m) = m {
                return Err(c.err_at(b, field("circuit_breaker"), m));
            }
        }
        if let Some(r) = &u.retry_budget {
            if r.value.budget_percent > 100 || r.value.window.0.as_secs() == 0 {
                return Err(c.err_at(
                    r,
                    field("retry_budget"),
                    "`budget_percent` is 0 to 100 and `window` at least 1s",
                ));
            }
        }
        if let Some(l) = &u.concurrency {
            super::named::concurrency_spec(&l.value)
                .map_err(|m| c.err_at(l, field("concurrency"), m))?;
        }
        check_protocol(&c, u, field)?;
        let t = &u.timeouts.value;
        if t.connect.0.is_zero()
            || t.read.0.is_zero()
            || t.write.0.is_zero()
            || t.idle.0.is_zero()
            || t.stream_idle.0.is_zero()
        {
            return Err(c.err_at(
                &u.timeouts,
                field("timeouts"),
                "timeouts must be greater than zero",
            ));
        }
    }

    let mut names = BTreeSet::new();
    for (i, r) in config.routes.iter().enumerate() {
        check_route(&c, config, i, r)?;
        if !names.insert(r.name.value.as_str()) {
            return Err(c.err_at(
                &r.name,
                format!("routes[{i}].name"),
                format!("route name `{}` is used twice", r.name.value),
            ));
        }
    }
    Ok(())
}

/// An upstream's health checks; errors point at its `health` section.
/// The upstream protocol against its TLS, its `h2` settings and its health check.
fn check_protocol(
    c: &Checker,
    u: &UpstreamConfig,
    field: impl Fn(&str) -> String,
) -> Result<(), ConfigError> {
    use crate::config::UpstreamProtocol as P;
    let protocol = u.protocol.value;
    let problem = match (protocol, u.tls.is_some()) {
        (P::H2 | P::Auto, false) => Some(
            "`h2` and `auto` agree on HTTP/2 through TLS (ALPN): add `tls`, or use `h2c` for HTTP/2 in the clear",
        ),
        (P::H2c, true) => Some("`h2c` is HTTP/2 in the clear: with `tls`, use `h2`"),
        _ => None,
    };
    if let Some(m) = problem {
        return Err(c.err_at(&u.protocol, field("protocol"), m));
    }
    if let Some(h2) = &u.h2 {
        if protocol == P::Http1 {
            return Err(c.err_at(h2, field("h2"), "only used with `protocol` h2, h2c or auto"));
        }
        if !(1..=10_000).contains(&h2.value.max_streams) {
            return Err(c.err_at(h2, field("h2.max_streams"), "must be 1 to 10000"));
        }
        if h2.value.ping_interval.is_some_and(|d| d.0.is_zero()) {
            return Err(c.err_at(
                h2,
                field("h2.ping_interval"),
                "must be greater than zero (or `null` for no pings)",
            ));
        }
    }
    let grpc_check = u.health.value.active.as_ref().and_then(|a| a.grpc.as_ref());
    if grpc_check.is_some() && protocol == P::Http1 {
        return Err(c.err_at(
            &u.health,
            field("health.active.grpc"),
            "gRPC runs over HTTP/2: set `protocol` to h2, h2c or auto",
        ));
    }
    Ok(())
}

fn check_health(
    c: &Checker,
    health: &Spanned<HealthConfig>,
    field: impl Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if let Some(a) = &health.value.active {
        if !a.path.starts_with('/') {
            return Err(c.err_at(health, field("health.active.path"), "must start with `/`"));
        }
        if a.rise == 0 || a.fall == 0 {
            return Err(c.err_at(
                health,
                field("health.active"),
                "rise and fall must be at least 1",
            ));
        }
        if a.interval.0.is_zero() || a.timeout.0.is_zero() {
            return Err(c.err_at(
                health,
                field("health.active"),
                "interval and timeout must be greater than zero",
            ));
        }
        if a.grpc.is_some() && !a.expected_status.is_empty() {
            return Err(c.err_at(
                health,
                field("health.active.expected_status"),
                "a gRPC check is healthy on SERVING; `expected_status` is for HTTP checks",
            ));
        }
        if let Some(s) = a.expected_status.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(c.err_at(
                health,
                field("health.active.expected_status"),
                format!("{s} is not an HTTP status"),
            ));
        }
    }
    if let Some(p) = &health.value.passive {
        if p.max_fails == 0 || p.fail_timeout.0.is_zero() {
            return Err(c.err_at(
                health,
                field("health.passive"),
                "max_fails and fail_timeout must be greater than zero (or set `passive: null`)",
            ));
        }
    }
    Ok(())
}

fn check_route(c: &Checker, config: &Config, i: usize, r: &RouteConfig) -> Result<(), ConfigError> {
    let field = |f: &str| format!("routes[{i}].{f}");
    let name = &r.name.value;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(c.err_at(
            &r.name,
            field("name"),
            "must be non-empty: letters, digits, `-`, `_`, `.`",
        ));
    }
    if let Some(up) = r.upstream.as_ref() {
        if !config.upstreams.contains_key(&up.value) {
            return Err(c.dangling(up, field("upstream"), "upstream", config.upstreams.keys()));
        }
        if !r.split.is_empty() {
            return Err(c.err_at(up, field("split"), "`upstream` or `split`, not both"));
        }
    }
    for (j, side) in r.split.iter().enumerate() {
        if !config.upstreams.contains_key(&side.upstream.value) {
            let at = field(&format!("split[{j}].upstream"));
            return Err(c.dangling(&side.upstream, at, "upstream", config.upstreams.keys()));
        }
    }
    if !r.split.is_empty() && r.split.iter().map(|s| u64::from(s.weight)).sum::<u64>() == 0 {
        return Err(c.err_at(&r.name, field("split"), "the weights add up to nothing"));
    }
    if r.split.len() > 255 {
        return Err(c.err_at(&r.name, field("split"), "at most 255 upstreams"));
    }
    if let Some(m) = &r.mirror {
        let up = &m.value.upstream;
        match config.upstreams.get(&up.value) {
            None => {
                let at = field("mirror.upstream");
                return Err(c.dangling(up, at, "upstream", config.upstreams.keys()));
            }
            Some(u) if u.tls.is_some() || u.protocol.value != UpstreamProtocol::Http1 => {
                return Err(c.err_at(
                    up,
                    field("mirror.upstream"),
                    "a mirror speaks plain HTTP/1.1; this upstream has `tls` or another `protocol`",
                ));
            }
            Some(_) => {}
        }
        if m.value.percent > 100 {
            return Err(c.err_at(m, field("mirror.percent"), "a percentage, 0 to 100"));
        }
        if m.value.timeout.is_some_and(|t| t.0.is_zero()) {
            return Err(c.err_at(m, field("mirror.timeout"), "must be greater than zero"));
        }
    }
    if let Some(sticky) = &r.sticky {
        if r.split.is_empty() {
            return Err(c.err_at(sticky, field("sticky"), "only with `split`"));
        }
        crate::policy::split::Sticky::parse(&sticky.value)
            .map_err(|m| c.err_at(sticky, field("sticky"), m))?;
    }
    match &r.auth {
        Some(a) if !config.auth.contains_key(&a.value) => {
            return Err(c.dangling(a, field("auth"), "auth policy", config.auth.keys()));
        }
        None if r.auth_optional => {
            return Err(c.err_at(
                &r.name,
                field("auth_optional"),
                "needs `auth` (the policy to apply)",
            ));
        }
        _ => {}
    }
    if let Some(limit) = &r.rate_limit {
        let Some(policy) = config.rate_limits.get(&limit.value) else {
            let known = config.rate_limits.keys();
            return Err(c.dangling(limit, field("rate_limit"), "rate limit", known));
        };
        let by_claim = policy
            .value
            .key
            .as_ref()
            .is_some_and(|k| k.value.starts_with("jwt:"));
        if by_claim && r.auth.is_none() {
            return Err(c.err_at(
                limit,
                field("rate_limit"),
                "this policy is keyed by a token claim: the route needs `auth`",
            ));
        }
    }
    let m = &r.matcher;
    let paths = [&m.path, &m.path_prefix, &m.path_regex];
    if paths.iter().filter(|p| p.is_some()).count() > 1 {
        return Err(c.err_at(
            &r.name,
            field("match"),
            "use only one of `path`, `path_prefix`, `path_regex`",
        ));
    }
    for (key, p) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
        if let Some(p) = p {
            if !p.value.starts_with('/') {
                return Err(c.err_at(p, field(&format!("match.{key}")), "must start with `/`"));
            }
            if p.value
                .bytes()
                .any(|b| b <= b' ' || b == b'?' || b == b'#' || b == 0x7f)
            {
                return Err(c.err_at(
                    p,
                    field(&format!("match.{key}")),
                    "must not contain spaces, control characters, `?` or `#`",
                ));
            }
        }
    }
    if let Some(re) = &m.path_regex {
        regex::Regex::new(&re.value)
            .map_err(|e| c.err_at(re, field("match.path_regex"), one_line(&e.to_string())))?;
    }
    for (j, h) in m.hosts.iter().enumerate() {
        check_host(&h.value)
            .map_err(|msg| c.err_at(h, field(&format!("match.hosts[{j}]")), msg))?;
    }
    for (j, meth) in m.methods.iter().enumerate() {
        if http::Method::from_bytes(meth.value.as_bytes()).is_err()
            || meth.value.bytes().any(|b| b.is_ascii_lowercase())
        {
            return Err(c.err_at(
                meth,
                field(&format!("match.methods[{j}]")),
                format!(
                    "`{}` is not an HTTP method (write it in upper case)",
                    meth.value
                ),
            ));
        }
    }
    for (j, h) in m.headers.iter().enumerate() {
        let f = field(&format!("match.headers[{j}]"));
        if http::HeaderName::from_bytes(h.name.value.as_bytes()).is_err() {
            return Err(c.err_at(
                &h.name,
                f,
                format!("`{}` is not a valid header name", h.name.value),
            ));
        }
        if h.value.is_some() && h.regex.is_some() {
            return Err(c.err_at(&h.name, f, "use `value` or `regex`, not both"));
        }
        if let Some(re) = &h.regex {
            regex::Regex::new(&re.value)
                .map_err(|e| c.err_at(re, f.clone(), one_line(&e.to_string())))?;
        }
    }
    if r.strip_prefix && m.path_prefix.is_none() {
        return Err(c.err_at(&r.name, field("strip_prefix"), "needs `match.path_prefix`"));
    }
    if let Some(rw) = &r.rewrite {
        if r.strip_prefix {
            return Err(c.err_at(
                rw,
                field("rewrite"),
                "use `rewrite` or `strip_prefix`, not both",
            ));
        }
        if m.path_regex.is_none() && !rw.value.starts_with('/') {
            return Err(c.err_at(rw, field("rewrite"), "must start with `/`"));
        }
        if m.path.is_none() && m.path_prefix.is_none() && m.path_regex.is_none() {
            return Err(c.err_at(
                rw,
                field("rewrite"),
                "needs `match.path`, `match.path_prefix` or `match.path_regex`",
            ));
        }
    }
    for (key, d) in [
        ("connect", r.timeouts.connect),
        ("read", r.timeouts.read),
        ("write", r.timeouts.write),
    ] {
        if d.is_some_and(|d| d.0.is_zero()) {
            return Err(c.err_at(
                &r.name,
                field(&format!("timeouts.{key}")),
                "must be greater than zero",
            ));
        }
    }
    Ok(())
}

/// Host patterns: a DNS name, or `*.` followed by one.
fn check_host(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(format!("`{h}` is not a host name or `*.domain` wildcard"));
    }
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("`{h}`: write host names in lower case"));
    }
    Ok(())
}

/// Parses `10.0.0.0/8`, `::1/128` or a bare address (as a /32 or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{s}` is not a CIDR (e.g. 10.0.0.0/8) or IP address"))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
