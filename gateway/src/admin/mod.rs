//! The admin listener: `/health` (the process answers) and `/ready` (a runtime is loaded, the
//! client listeners are bound and the process is not draining) for orchestrators, `/metrics`
//! for Prometheus, read-only `/routes`, `/upstreams` (with each replica's health) and
//! `/certificates` as JSON, and the live dashboard ([`dashboard`]). The JSON views take a
//! bearer token when `admin.token` is set.

mod dashboard;

use crate::runtime::Runtime;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The admin HTTP app.
pub struct Admin {
    runtime: Arc<ArcSwap<Runtime>>,
    listeners_bound: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    dashboard: dashboard::Dashboard,
}

impl Admin {
    /// An admin app reading `runtime`; `listeners_bound` turns true once every client listener
    /// is listening (see [`crate::listening`]), `draining` on SIGTERM.
    pub fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        listeners_bound: Arc<AtomicBool>,
        draining: Arc<AtomicBool>,
    ) -> Admin {
        Admin {
            dashboard: dashboard::Dashboard::new(runtime.clone()),
            runtime,
            listeners_bound,
            draining,
        }
    }

    /// A JSON view, when the request carries the token (if one is set): 401 otherwise.
    fn guarded(
        &self,
        session: &ServerSession,
        view: impl FnOnce(&Runtime) -> serde_json::Value,
    ) -> Response<Vec<u8>> {
        let rt = self.runtime.load();
        if let Some(want) = &rt.admin_token {
            let given = session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
            if given.is_none_or(|t| token_digest(t) != *want) {
                let mut resp = json(
                    401,
                    "{\"error\":\"token required\",\"status\":401}\n".into(),
                );
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"gateway admin\""),
                );
                return resp;
            }
        }
        let mut resp = json(200, view(&rt).to_string() + "\n");
        resp.headers_mut().insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        resp
    }
}

/// What the admin token is compared as: its SHA-256 (equal-length digests, so the comparison
/// says nothing about the token's length or prefix).
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What `/ready` still waits for at start, each bounded by its timeout: an upstream's first
/// DNS lookup (`dns.timeout`), then its first round of active health checks (the check
/// timeout); an auth policy's first JWKS fetch (`jwks.timeout`).
fn first_checks_pending(rt: &Runtime) -> Option<Vec<String>> {
    let mut waiting: Vec<String> = Vec::new();
    for (name, u) in &rt.upstreams {
        if !u.first_lookup_done() {
            waiting.push(format!("upstream {name}: first DNS lookup"));
        } else if !u.first_checks_done() {
            waiting.push(format!("upstream {name}: first health checks"));
        }
    }
    for (name, a) in &rt.auth {
        if !a.first_fetch_done() {
            waiting.push(format!("auth {name}: first JWKS fetch"));
        }
    }
    (!waiting.is_empty()).then_some(waiting)
}

fn json(status: u16, body: String) -> Response<Vec<u8>> {
    let body = body.into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // The dashboard's sampler starts with the first admin request (orchestrators' first
        // `/ready`), so the dashboard has a minute of history when it is first opened.
        self.dashboard.start_sampler(&self.runtime.load());
        let path = session.req_header().uri.path();
        match path {
            "/health" => json(200, "{\"status\":\"ok\"}\n".into()),
            "/ready" => {
                let rt = self.runtime.load();
                if self.draining.load(Ordering::Relaxed) {
                    json(503, "{\"status\":\"draining\"}\n".into())
                } else if !self.listeners_bound.load(Ordering::Acquire) {
                    json(503, "{\"status\":\"starting\"}\n".into())
                } else if let Some(waiting) = first_checks_pending(&rt) {
                    json(
                        503,
                        serde_json::json!({ "status": "starting", "waiting_for": waiting })
                            .to_string()
                            + "\n",
                    )
                } else {
                    json(
                        200,
                        format!(
                            "{{\"status\":\"ready\",\"config_generation\":{},\"config_hash\":\"{:016x}\"}}\n",
                            rt.generation, rt.source_hash
                        ),
                    )
                }
            }
            "/routes" => self.guarded(session, |rt| {
                serde_json::json!({ "config_generation": rt.generation, "routes": routes_json(rt) })
            }),
            "/upstreams" => self.guarded(session, |rt| {
                serde_json::json!({ "config_generation": rt.generation, "upstreams": upstreams_json(rt) })
            }),
            "/certificates" => self.guarded(session, |_| {
                serde_json::json!({ "listeners": self.dashboard.certificates() })
            }),
            "/dashboard/state" => self.guarded(session, |rt| self.dashboard.state(rt)),
            "/dashboard" | "/dashboard/" => dashboard::asset("index.html"),
            // Browsers ask for it with every page; none is served.
            "/favicon.ico" => Response::builder()
                .status(204)
                .body(Vec::new())
                .unwrap_or_default(),
            "/dashboard/app.js" => dashboard::asset("app.js"),
            "/dashboard/app.css" => dashboard::asset("app.css"),
            "/metrics" => {
                let rt = self.runtime.load();
                let now = crate::upstream::now_ms();
                crate::metrics::METRICS.set_replicas(rt.upstreams.iter().map(|(name, up)| {
                    let set = up.replicas();
                    let replicas = set
                        .replicas
                        .iter()
                        .map(|r| (r.addr.to_string(), r.is_available(now)))
                        .collect();
                    (name.as_str(), replicas)
                }));
                let body = crate::metrics::METRICS.render().into_bytes();
                Response::builder()
                    .status(200)
                    .header(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            _ => json(404, "{\"error\":\"not found\",\"status\":404}\n".into()),
        }
    }
}

/// Every route as `/routes` and the dashboard show it.
fn routes_json(rt: &Runtime) -> Vec<serde_json::Value> {
    use crate::policy::Policy;
    rt.routes
        .iter()
        .map(|r| {
            let policies = r.policies.policies();
            let jwt = policies.iter().find_map(|p| match p {
                Policy::Jwt(j) => Some(j),
                _ => None,
            });
            let limit = policies.iter().find_map(|p| match p {
                Policy::RateLimit(l) => Some(&*l.policy.name),
                _ => None,
            });
            serde_json::json!({
                "name": &*r.name,
                "upstream": r.upstream.as_ref().map(|u| &*u.name),
                "split": r.split.as_ref().map(|s| {
                    let mut start = 0;
                    s.targets.iter().map(|(u, end)| {
                        let weight = end - start;
                        start = *end;
                        serde_json::json!({ "upstream": &*u.name, "weight": weight })
                    }).collect::<Vec<_>>()
                }),
                "match": &r.matcher,
                "policies": policies.iter().map(Policy::kind).collect::<Vec<_>>(),
                "auth": jwt.map(|j| &*j.policy.name),
                "auth_optional": jwt.is_some_and(|j| j.optional),
                "rate_limit": limit,
                "retries": r.retries,
            })
        })
        .collect()
}

/// Every upstream with its replicas' state, as `/upstreams` and the dashboard show them.
fn upstreams_json(rt: &Runtime) -> serde_json::Map<String, serde_json::Value> {
    let now = crate::upstream::now_ms();
    rt.upstreams
        .iter()
        .map(|(name, up)| {
            let set = up.replicas();
            let replicas: Vec<serde_json::Value> = set
                .replicas
                .iter()
                .map(|r| {
                    let (state, reason) = r.state(now, up.active_checks());
                    serde_json::json!({
                        "address": r.addr.to_string(),
                        "weight": r.weight,
                        "available": r.is_available(now),
                        "state": state,
                        "reason": reason,
                        "in_flight": r.outstanding(),
                    })
                })
                .collect();
            (
                name.clone(),
                serde_json::json!({
                    "targets": up.targets(),
                    "balance": up.balance().name(),
                    "protocol": up.protocol().name(),
                    "active_checks": up.active_checks(),
                    "circuit": up.breaker.as_ref().map(|b| b.state_name()),
                    "replicas": replicas,
                }),
            )
        })
        .collect()
}

/// GETs `url` (`http://IP:PORT/PATH`) and returns the status: the `healthcheck` subcommand.
pub fn probe(url: &str, timeout: std::time::Duration) -> Result<u16, String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are checked")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: std::net::SocketAddr = authority
        .parse()
        .map_err(|_| "the URL's host must be IP:PORT".to_string())?;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let path = if path.is_empty() { "/" } else { path };
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).map_err(|e| e.to_string())?;
    let line = std::str::from_utf8(&head[..n]).unwrap_or("");
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "not an HTTP response".to_string())
}
