//! `forward_auth` (Traefik's ForwardAuth, nginx's `auth_request`, Envoy's `ext_authz`): each
//! request is first put to an auth service, an upstream like any other. A 2xx lets it through
//! with chosen headers of that answer added upstream; any other answer goes back to the client
//! as the service gave it (status, chosen headers, body up to a limit). A service that cannot
//! answer in time makes the request fail (503) or pass, as `on_error` says.

use crate::proxy::answer::Answer;
use crate::proxy::client::request_host;
use crate::proxy::context::RequestCtx;
use crate::upstream::{ms_at, Upstream};
use ahash::AHashMap;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use pingora::proxy::Session;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Verdicts remembered per policy.
const CACHE_CAP: usize = 10_000;

/// A compiled `forward_auth` policy.
pub struct ForwardAuth {
    /// The auth service's upstream name.
    pub upstream_name: String,
    /// The auth service, bound when the runtime is activated.
    pub upstream: std::sync::OnceLock<Arc<Upstream>>,
    /// The path asked on it.
    pub path: String,
    /// Client request headers sent to it.
    pub request_headers: Vec<HeaderName>,
    /// Headers of its 2xx answer added to the upstream request.
    pub response_headers: Vec<HeaderName>,
    /// Headers of its other answers passed to the client.
    pub client_headers: Vec<HeaderName>,
    /// Longest wait for its answer.
    pub timeout: Duration,
    /// Let requests through when it cannot answer.
    pub fail_open: bool,
    /// Largest body of a refusal passed to the client (larger: sent without its body).
    pub max_body: usize,
    /// The request header whose value keys the verdict cache, and for how long a 2xx counts.
    pub cache: Option<(HeaderName, Duration)>,
    /// 2xx verdicts by the key header's hash, with its whole value (compared on a hit: a
    /// hash alone could be made to collide) and their expiry.
    verdicts: Mutex<AHashMap<u64, CachedVerdict>>,
    metrics: crate::metrics::ForwardAuthMetrics,
    client: Client<HttpConnector, Empty<Bytes>>,
}

struct CachedVerdict {
    value: Bytes,
    until: Instant,
    headers: Arc<[(HeaderName, HeaderValue)]>,
}

/// What the auth service said.
enum Verdict {
    Allow(Arc<[(HeaderName, HeaderValue)]>),
    Refuse(Answer),
}

impl ForwardAuth {
    /// A policy asking `upstream`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        upstream_name: String,
        path: String,
        request_headers: Vec<HeaderName>,
        response_headers: Vec<HeaderName>,
        client_headers: Vec<HeaderName>,
        timeout: Duration,
        fail_open: bool,
        max_body: usize,
        cache: Option<(HeaderName, Duration)>,
    ) -> ForwardAuth {
        ForwardAuth {
            upstream_name,
            upstream: std::sync::OnceLock::new(),
            path,
            request_headers,
            response_headers,
            client_headers,
            timeout,
            fail_open,
            max_body,
            cache,
            verdicts: Mutex::new(AHashMap::new()),
            metrics: crate::metrics::ForwardAuthMetrics::new(name),
            client: crate::upstream::own_client(Some(timeout), usize::MAX),
        }
    }

    /// Asks the auth service (or the cache) about the request.
    pub(super) async fn on_request(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), Answer> {
        let req = session.req_header();
        let key = self
            .cache
            .as_ref()
            .and_then(|(name, _)| req.headers.get(name))
            .map(|v| v.as_bytes());
        if let Some(headers) = key.and_then(|k| self.cached(k)) {
            self.metrics.cached.inc();
            ctx.forwarded_auth = Some(headers);
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let asked = tokio::time::timeout_at(deadline, self.ask(session, ctx, deadline)).await;
        match asked {
            Ok(Ok(Verdict::Allow(headers))) => {
                self.metrics.allowed.inc();
                if let (Some(k), Some((_, ttl))) = (key, &self.cache) {
                    self.remember(k, *ttl, headers.clone());
                }
                ctx.forwarded_auth = Some(headers);
                Ok(())
            }
            Ok(Ok(Verdict::Refuse(answer))) => {
                self.metrics.refused.inc();
                Err(answer)
            }
            Ok(Err(why)) => self.on_error(&why),
            Err(_) => self.on_error("no answer in time"),
        }
    }

    /// The service could not answer: counted (an operator sees an outage even when requests
    /// pass), logged at debug, then 503 or pass.
    fn on_error(&self, why: &str) -> Result<(), Answer> {
        self.metrics.error.inc();
        tracing::debug!("forward auth: {why}");
        if self.fail_open {
            Ok(())
        } else {
            Err(Answer::error(503, "authorization service unavailable"))
        }
    }

    /// Adds the allowed request's headers upstream, in place of any the client sent.
    pub(super) fn on_upstream_request(
        &self,
        headers: &mut dyn crate::headers::HeaderEdits,
        ctx: &RequestCtx,
    ) -> pingora::Result<()> {
        for name in &self.response_headers {
            headers.unset(name);
        }
        for (name, value) in ctx.forwarded_auth.iter().flat_map(|h| h.iter()) {
            headers.append(name, value.clone())?;
        }
        Ok(())
    }

    /// One call; `deadline` is the caller's, checked here too so that a call without an answer
    /// in time counts against the replica (the caller's timeout, the same instant, would only
    /// drop it).
    async fn ask(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        deadline: tokio::time::Instant,
    ) -> Result<Verdict, String> {
        let req = session.req_header();
        let mut attempt = self
            .upstream
            .get()
            .ok_or("no upstream")?
            .attempt(ms_at(Instant::now()))
            .ok_or("no replica")?;
        let uri = format!("http://{}{}", attempt.addr(), self.path);
        let mut ask = http::Request::get(uri)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let h = ask.headers_mut();
        for name in &self.request_headers {
            for v in req.headers.get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        let forwarded = [
            ("x-forwarded-method", Some(req.method.as_str())),
            (
                "x-forwarded-proto",
                Some(if ctx.tls { "https" } else { "http" }),
            ),
            ("x-forwarded-host", request_host(req)),
            (
                "x-forwarded-uri",
                req.uri.path_and_query().map(|p| p.as_str()),
            ),
        ];
        for (name, value) in forwarded {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
        if let Some(ip) = ctx.client_ip.and_then(crate::headers::ip_header_value) {
            h.insert(HeaderName::from_static("x-forwarded-for"), ip);
        }
        if let Some(id) = &ctx.request_id {
            h.insert(crate::headers::X_REQUEST_ID.clone(), id.clone());
        }
        let answer = match tokio::time::timeout_at(deadline, self.client.request(ask)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                // A pooled connection the service had closed is retried by the client; what
                // is left is the replica's only when no connection could be made.
                if e.is_connect() {
                    attempt.failed();
                }
                return Err(e.to_string());
            }
            Err(_) => {
                attempt.failed();
                return Err("no answer in time".into());
            }
        };
        attempt.answered();
        let (parts, body) = answer.into_parts();
        if parts.status.is_success() {
            let copied: Vec<_> = self
                .response_headers
                .iter()
                .flat_map(|name| {
                    parts
                        .headers
                        .get_all(name)
                        .iter()
                        .map(move |v| (name.clone(), v.clone()))
                })
                .collect();
            return Ok(Verdict::Allow(copied.into()));
        }
        // Read at most max_body (+1, to know it was more).
        let body = Limited::new(body, self.max_body + 1).collect().await;
        let body = body
            .ok()
            .map(|b| b.to_bytes())
            .filter(|b| b.len() <= self.max_body);
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("text/plain; charset=utf-8"));
        let status = parts.status.as_u16();
        let mut refusal = match body.filter(|b| !b.is_empty()) {
            Some(b) => Answer::fixed(status, Arc::new((content_type, b))),
            None => Answer::empty(status),
        };
        for name in &self.client_headers {
            for v in parts.headers.get_all(name) {
                refusal = refusal.with_header(name.clone(), v.clone());
            }
        }
        Ok(Verdict::Refuse(refusal))
    }

    fn cached(&self, key: &[u8]) -> Option<Arc<[(HeaderName, HeaderValue)]>> {
        let verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        let v = verdicts.get(&crate::hash::value(key))?;
        (v.value == key && Instant::now() < v.until).then(|| v.headers.clone())
    }

    fn remember(&self, key: &[u8], ttl: Duration, headers: Arc<[(HeaderName, HeaderValue)]>) {
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        if verdicts.len() >= CACHE_CAP {
            let now = Instant::now();
            verdicts.retain(|_, v| v.until > now);
            if verdicts.len() >= CACHE_CAP {
                verdicts.clear();
            }
        }
        let verdict = CachedVerdict {
            value: Bytes::copy_from_slice(key),
            until: Instant::now() + ttl,
            headers,
        };
        verdicts.insert(crate::hash::value(key), verdict);
    }
}
