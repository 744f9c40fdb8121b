//! The admin listener: `/health` (the process answers) and `/ready` (a runtime is loaded, the
//! client listeners are bound and the process is not draining) for orchestrators, `/metrics`
//! for Prometheus, and read-only `/routes` and `/upstreams` (with each replica's health) as
//! JSON.

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
            runtime,
            listeners_bound,
            draining,
        }
    }
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
            "/routes" => {
                let rt = self.runtime.load();
                let routes: Vec<serde_json::Value> = rt
                    .routes
                    .iter()
                    .map(|r| {
                        use crate::policy::Policy;
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
                    .collect();
                json(
                    200,
                    serde_json::json!({ "config_generation": rt.generation, "routes": routes })
                        .to_string(),
                )
            }
            "/upstreams" => {
                let rt = self.runtime.load();
                let now = crate::upstream::now_ms();
                let upstreams: serde_json::Map<String, serde_json::Value> = rt
                    .upstreams
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
                    .collect();
                json(200, serde_json::json!({ "config_generation": rt.generation, "upstreams": upstreams }).to_string())
            }
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
