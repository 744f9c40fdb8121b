//! `routes`: what a route matches and where it sends traffic.

use super::*;
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

/// Per-route overrides of the upstream's timeouts.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeouts {
    /// TCP connect.
    #[serde(default)]
    pub connect: Option<Dur>,
    /// Wait for response bytes.
    #[serde(default)]
    pub read: Option<Dur>,
    /// Wait while writing the request.
    #[serde(default)]
    pub write: Option<Dur>,
}

/// One route.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name, used in logs and metrics.
    pub name: Spanned<String>,
    /// What requests this route takes. Empty: every request.
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    /// The upstream that serves it. Required unless `split` names several, or a `redirect`
    /// or `respond` policy of the route answers every request.
    #[serde(default)]
    pub upstream: Option<Spanned<String>>,
    /// Upstreams sharing the route's requests by weight (instead of `upstream`).
    #[serde(default)]
    pub split: Vec<SplitConfig>,
    /// With `split`: what keeps a client on one side (`client_ip`, `header:NAME`,
    /// `cookie:NAME`, `jwt:CLAIM`). Default: none (each request drawn by weight).
    #[serde(default)]
    pub sticky: Option<Spanned<String>>,
    /// A share of the requests also sent to a shadow upstream (answers thrown away).
    #[serde(default)]
    pub mirror: Option<Spanned<MirrorConfig>>,
    /// Remove the matched `path_prefix` before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the matched path (prefix, exact path, or regex with `$1` captures).
    #[serde(default)]
    pub rewrite: Option<Spanned<String>>,
    /// Overrides of the upstream's timeouts.
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    /// Overrides the upstream's `retries`.
    #[serde(default)]
    pub retries: Option<u32>,
    /// The `auth` policy requests must pass. None: no token check.
    #[serde(default)]
    pub auth: Option<Spanned<String>>,
    /// With `auth`: let requests without a token through (unauthenticated), while a token that
    /// is present must be valid and has its claims forwarded.
    #[serde(default)]
    pub auth_optional: bool,
    /// The rate-limit policy requests are counted under. None: no limit.
    #[serde(default)]
    pub rate_limit: Option<Spanned<String>>,
    /// Named policies (`policies:`) the route runs, in order, after `default_policies` and
    /// before `auth` and `rate_limit`.
    #[serde(default)]
    pub policies: Vec<Spanned<String>>,
    /// Bodies of the answers the gateway makes itself for this route, by status.
    #[serde(default)]
    pub error_pages: BTreeMap<u16, Spanned<ErrorPageConfig>>,
    /// Overrides `limits.max_request_body` for this route.
    #[serde(default)]
    pub max_request_body: Option<ByteSize>,
}

/// `mirror`: where copies go and how many.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// The shadow upstream (plain HTTP).
    pub upstream: Spanned<String>,
    /// Share of the requests copied, in percent (0-100). Default 100.
    #[serde(default = "default_mirror_percent")]
    pub percent: u32,
    /// Largest request body copied; a request with a larger one is not mirrored. Default 64KiB.
    #[serde(default)]
    pub max_body: Option<ByteSize>,
    /// Longest a copy may take, answer included. Default 5s.
    #[serde(default)]
    pub timeout: Option<Dur>,
}

fn default_mirror_percent() -> u32 {
    100
}

/// One side of a traffic split.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// The upstream.
    pub upstream: Spanned<String>,
    /// Its share: its weight over the sum of the weights.
    pub weight: u32,
}

/// Request matching conditions; all given conditions must hold.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Host names: exact (`api.example.com`) or wildcard (`*.example.com`).
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    /// Exact path.
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// Path prefix, matched on segment boundaries (`/api` takes `/api` and `/api/x`, not `/apix`).
    #[serde(default)]
    pub path_prefix: Option<Spanned<String>>,
    /// Regular expression over the whole path (anchored).
    #[serde(default)]
    pub path_regex: Option<Spanned<String>>,
    /// Methods (`GET`, `POST`, ...). Empty: any.
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<HeaderMatchConfig>,
    /// Query-parameter conditions.
    #[serde(default)]
    pub query: Vec<QueryMatchConfig>,
}

/// One query-parameter condition: present, equal to `value`, or matching `regex` (compared
/// percent-decoded; any of the parameter's values may match).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QueryMatchConfig {
    /// Parameter name (case-sensitive).
    pub name: Spanned<String>,
    /// Exact value.
    #[serde(default)]
    pub value: Option<String>,
    /// Regular expression over the value (anchored).
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
}

/// One header condition: present, equal to `value`, or matching `regex`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchConfig {
    /// Header name (case-insensitive).
    pub name: Spanned<String>,
    /// Exact value.
    #[serde(default)]
    pub value: Option<String>,
    /// Regular expression over the value (anchored).
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
}

impl MatchConfig {
    /// What the route matches, for the admin views (fields left out are not matched on).
    pub fn describe(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        let list = |v: &[Spanned<String>]| {
            serde_json::Value::from(v.iter().map(|s| s.value.clone()).collect::<Vec<_>>())
        };
        if !self.hosts.is_empty() {
            out.insert("hosts".into(), list(&self.hosts));
        }
        for (key, value) in [
            ("path", &self.path),
            ("path_prefix", &self.path_prefix),
            ("path_regex", &self.path_regex),
        ] {
            if let Some(v) = value {
                out.insert(key.into(), v.value.clone().into());
            }
        }
        if !self.methods.is_empty() {
            out.insert("methods".into(), list(&self.methods));
        }
        if !self.headers.is_empty() {
            let headers = self.headers.iter().map(|h| {
                let mut one = serde_json::Map::new();
                one.insert("name".into(), h.name.value.clone().into());
                if let Some(v) = &h.value {
                    one.insert("value".into(), v.clone().into());
                }
                if let Some(r) = &h.regex {
                    one.insert("regex".into(), r.value.clone().into());
                }
                serde_json::Value::Object(one)
            });
            out.insert("headers".into(), headers.collect::<Vec<_>>().into());
        }
        if !self.query.is_empty() {
            let query = self.query.iter().map(|q| {
                let mut one = serde_json::Map::new();
                one.insert("name".into(), q.name.value.clone().into());
                if let Some(v) = &q.value {
                    one.insert("value".into(), v.clone().into());
                }
                if let Some(r) = &q.regex {
                    one.insert("regex".into(), r.value.clone().into());
                }
                serde_json::Value::Object(one)
            });
            out.insert("query".into(), query.collect::<Vec<_>>().into());
        }
        serde_json::Value::Object(out)
    }
}
