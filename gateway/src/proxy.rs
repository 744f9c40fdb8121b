//! The request path: Pingora's `ProxyHttp` phases, top to bottom.
//!
//! 1. `request_filter`: take the current runtime, settle the request id and client IP,
//!    normalise the path, find the route (404 when none), check the route's token (401/403)
//!    and rate limit (429).
//! 2. `upstream_peer`: pick a replica of the route's upstream (503 when none can take it).
//! 3. `upstream_request_filter`: rewrite the path, replace identity headers with the token's
//!    claims, set the forwarding headers.
//! 4. `upstream_response_filter` / `response_filter`: note success, return the request id and
//!    the rate-limit state.
//! 5. `fail_to_connect` / `error_while_proxy`: passive health and the retry decision.
//! 6. `fail_to_proxy`: the JSON error response (502/503/504) with the request id.
//! 7. `logging`: release the replica.

use crate::accesslog::AccessRecord;
use crate::auth::{AuthError, ForwardedClaims, Verified};
use crate::config::HashKey;
use crate::headers::{
    edit_request, edit_response, set_forwarded_headers, Forwarded, ADDED_REQUEST_HEADERS,
    ADDED_RESPONSE_HEADERS, RATELIMIT, RATELIMIT_POLICY, TRACEPARENT, TRACESTATE, X_FORWARDED_FOR,
    X_REQUEST_ID,
};
use crate::metrics::METRICS;
use crate::ratelimit::{Decision, KeySource, LimitKey, RateLimitPolicy};
use crate::routing::{normalize_path, PathError};
use crate::runtime::Runtime;
use crate::trace::{FinishedRequest, RequestSpan};
use crate::upstream::{ms_at, now_ms, Replica};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// How long the body of a request refused with 413 is read and discarded after the answer.
const BODY_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many tried replicas a request remembers (to send retries elsewhere).
const TRIED_CAP: usize = 4;

/// The proxy. One instance serves every listener; the runtime inside is swapped on reload.
pub struct Gateway {
    runtime: Arc<ArcSwap<Runtime>>,
}

impl Gateway {
    /// A proxy serving whatever runtime `runtime` holds.
    pub fn new(runtime: Arc<ArcSwap<Runtime>>) -> Gateway {
        Gateway { runtime }
    }
}

/// Per-request state.
///
/// The fields are in the order the phases after the upstream's response read them (`repr(C)`):
/// by then other requests have pushed the context out of the CPU's caches, and fields spread
/// over its whole length cost a cache miss each (`perf` found two of them taking ~40 % of
/// `upstream_response_filter`). The first 64 bytes serve the upstream response and the
/// metrics, the next 64 the response headers, the next 64 the access log. The context is
/// allocated 16-byte aligned, so each group spans one cache line or two, never more.
#[derive(Default)]
#[repr(C)]
pub struct RequestCtx {
    /// The runtime this request started on.
    rt: Option<Arc<Runtime>>,
    /// Index of the matched route in `rt.routes`.
    route: usize,
    /// The replica of the current attempt.
    replica: Option<Arc<Replica>>,
    /// When the current upstream attempt started.
    upstream_started: Option<std::time::Instant>,
    /// When the request arrived (set with the in-flight gauge).
    started: Option<std::time::Instant>,
    /// A route matched (`route` is meaningful), whatever happened next.
    routed: bool,
    /// The request came over TLS.
    tls: bool,
    /// The current attempt is the probe of a resting replica.
    probe: bool,
    /// The current attempt got a verdict (success or failure) for passive health.
    verdict: bool,

    /// Returned to the client and sent upstream.
    request_id: Option<HeaderValue>,
    /// The rate limit the request passed, with its remaining burst and reset seconds.
    quota: Option<(Arc<RateLimitPolicy>, u32, u64)>,

    /// How long the upstream's response header took.
    upstream_elapsed: Option<std::time::Duration>,
    /// The replica of the last attempt (kept after it is released), for the access log.
    last_replica: Option<SocketAddr>,
    /// The token's subject, for the access log.
    user: Option<Arc<str>>,

    /// The rate-limit decision, for the access log.
    limit_decision: Option<&'static str>,
    /// The client as the gateway believes it (after trusted-proxy handling).
    client_ip: Option<IpAddr>,
    /// The direct peer is a trusted proxy: its forwarding headers are kept.
    peer_trusted: bool,
    /// The client's `tracestate` goes with it (its `traceparent` was valid).
    keep_tracestate: bool,
    /// A `traceparent` to send upstream in place of the client's (none or invalid, or the
    /// gateway's own span when spans are exported).
    new_traceparent: Option<HeaderValue>,
    /// This request's span, when spans are exported.
    span: Option<RequestSpan>,
    /// Claims of a verified token, to send upstream as headers.
    claims: ForwardedClaims,
    /// Path to forward, when it differs from the request's.
    new_path: Option<String>,
    /// Replicas tried so far.
    tried: [u64; TRIED_CAP],
    tried_len: usize,
    /// Attempts made (1 after the first pick).
    attempts: u32,
    /// Request body bytes the route allows, and how many have arrived.
    body_limit: Option<u64>,
    body_received: u64,
}

// The groups keep their 64-byte offsets when a field is added or changed.
const _: () = {
    assert!(std::mem::offset_of!(RequestCtx, request_id) == 64);
    assert!(std::mem::offset_of!(RequestCtx, upstream_elapsed) == 128);
    assert!(std::mem::offset_of!(RequestCtx, limit_decision) == 192);
};

impl RequestCtx {
    /// The request id, made now if the request has none yet.
    fn request_id(&mut self) -> &HeaderValue {
        self.request_id.get_or_insert_with(new_request_id)
    }

    fn tried(&self) -> &[u64] {
        &self.tried[..self.tried_len]
    }

    fn route(&self) -> Option<&crate::runtime::Route> {
        self.rt.as_ref().and_then(|rt| rt.routes.get(self.route))
    }

    /// Ends the current attempt's bookkeeping on its replica.
    fn release_replica(&mut self) {
        if let Some(r) = self.replica.take() {
            self.last_replica = Some(r.addr);
            r.end_request();
            if self.probe && !self.verdict {
                r.release_probe();
            }
        }
        self.probe = false;
        self.verdict = false;
    }

    /// Passive health: the current attempt failed on the upstream side. The last available
    /// replica of an upstream is never ejected (as nginx never marks a lone server down):
    /// ejecting it would turn a partial failure into a total one.
    fn report_failure(&mut self) {
        if let (Some(r), Some(route)) = (&self.replica, self.route()) {
            if let Some(policy) = route.upstream.passive() {
                let now = now_ms();
                let may_eject = route.upstream.has_alternative(&[r.id], now);
                if r.report_failure(policy, now, may_eject) {
                    route.upstream.metrics.ejections.inc();
                }
            }
            self.verdict = true;
        }
    }

    /// Counts a retry about to be made.
    fn count_retry(&self, retry: bool) {
        if let (true, Some(route)) = (retry, self.route()) {
            route.upstream.metrics.retries.inc();
        }
    }

    /// Whether another attempt is allowed and has somewhere to go.
    fn may_retry(&self) -> bool {
        match self.route() {
            Some(route) => {
                self.attempts <= route.retries
                    && route.upstream.has_alternative(self.tried(), now_ms())
            }
            None => false,
        }
    }
}

/// Request ids are kept when they look like ids: 1-128 of `A-Za-z0-9-_.:`.
fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
}

fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    let n = fastrand::u128(..);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((n >> (i * 4)) & 0xf) as usize];
    }
    // 32 lowercase hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// `value` marked never to be added to HPACK's table (no effect on HTTP/1).
fn never_indexed(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// The setting of the listener a connection arrived on (`actual` is the connection's local
/// address; a listener bound to 0.0.0.0 or [::] matches any address on its port).
fn listener_setting<'a, T>(list: &'a [(SocketAddr, T)], actual: &SocketAddr) -> Option<&'a T> {
    list.iter()
        .find(|(bound, _)| {
            bound.port() == actual.port()
                && (bound.ip().is_unspecified() || bound.ip() == actual.ip())
        })
        .map(|(_, v)| v)
}

/// `https://HOST[:PORT]/path?query` for a redirect, or None without a sane Host.
fn https_location(req: &RequestHeader, port: u16) -> Option<HeaderValue> {
    let host = request_host(req).filter(|h| !h.is_empty())?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    HeaderValue::from_str(&location).ok()
}

/// An HTTP/2 request whose `Host` names another host than its `:authority` (RFC 9113 section
/// 8.3.1: malformed). Routing goes by `:authority` while Pingora would hand `Host` upstream as
/// the authority, so the two must agree. (HTTP/1 absolute-form has the same rule, which
/// Pingora enforces itself.)
fn authority_conflict(req: &RequestHeader) -> bool {
    // Origin-form (the usual case) has no authority: no Host lookup.
    let Some(authority) = req.uri.authority() else {
        return false;
    };
    let Some(host) = req.headers.get(http::header::HOST) else {
        return false;
    };
    !host
        .as_bytes()
        .eq_ignore_ascii_case(authority.as_str().as_bytes())
}

/// The request's host without port: the URI authority (HTTP/2, absolute-form) or `Host`.
fn request_host(req: &RequestHeader) -> Option<&str> {
    if let Some(h) = req.uri.host() {
        return Some(h);
    }
    let raw = req.headers.get(http::header::HOST)?.to_str().ok()?;
    Some(strip_port(raw))
}

/// The host of a `Host` value: `[v6]` without brackets, `name:port` without the port; a value
/// with several colons and no brackets is a bare IPv6 address and stays whole. Byte by byte
/// from the end (`str::find`/`rfind` with a `char` cost ~300 instructions a request).
fn strip_port(h: &str) -> &str {
    let bytes = h.as_bytes();
    if bytes.first() == Some(&b'[') {
        let end = memchr::memchr(b']', bytes).unwrap_or(bytes.len());
        return &h[1..end];
    }
    let mut colon = bytes.len();
    while colon > 0 && bytes[colon - 1].is_ascii_digit() {
        colon -= 1;
    }
    match colon.checked_sub(1) {
        Some(at) if bytes[at] == b':' && memchr::memchr(b':', &bytes[..at]).is_none() => &h[..at],
        _ => h,
    }
}

/// The client IP: the peer's, or, when the peer is a trusted proxy, the right-most address in
/// `X-Forwarded-For` that is not itself a trusted proxy.
fn client_ip(rt: &Runtime, req: &RequestHeader, peer: Option<IpAddr>) -> (Option<IpAddr>, bool) {
    let Some(peer) = peer else {
        return (None, false);
    };
    if !rt.is_trusted(&peer) {
        return (Some(peer), false);
    }
    let mut ip = peer;
    for value in req.headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(s) = value.to_str() else { break };
        for part in s.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(hop) => {
                    ip = hop;
                    if !rt.is_trusted(&hop) {
                        return (Some(ip), true);
                    }
                }
                Err(_) => return (Some(ip), true),
            }
        }
    }
    (Some(ip), true)
}

/// Message framing a proxy must not guess at, the shapes of request smuggling: two
/// `Content-Length`s, a `Content-Length` that is not plain digits (`42, 42`), a
/// `Transfer-Encoding` that is anything but one `chunked`, or both headers. Pingora drops the
/// `Content-Length` of a request that also has `Transfer-Encoding` while parsing (RFC 9112
/// allows that); the gateway refuses such requests instead, so it looks at the raw header,
/// which is only needed when `Transfer-Encoding` is present.
fn ambiguous_framing(headers: &http::HeaderMap, raw_head: impl FnOnce() -> Option<Bytes>) -> bool {
    let ((length, lengths), (coding, codings)) = framing_fields(headers);
    if let Some(length) = length {
        let digits = length.as_bytes();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) || lengths > 1 {
            return true;
        }
    }
    let Some(coding) = coding else {
        return false;
    };
    if codings > 1
        || !coding
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
        || length.is_some()
    {
        return true;
    }
    raw_head().is_some_and(|raw| {
        raw.split(|b| *b == b'\n')
            .any(|line| line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
    })
}

/// A framing field's first value and how many values it has (more than one is all that
/// matters).
type FramingField<'a> = (Option<&'a http::HeaderValue>, usize);

/// `Content-Length` and `Transfer-Encoding` of a head. A head of a few fields, the usual
/// request, is read in one pass: cheaper than two hashed lookups (~130 instructions each).
fn framing_fields(headers: &http::HeaderMap) -> (FramingField<'_>, FramingField<'_>) {
    let (mut length, mut coding): (FramingField, FramingField) = ((None, 0), (None, 0));
    if headers.len() <= 12 {
        for (name, value) in headers {
            let field = if name == http::header::CONTENT_LENGTH {
                &mut length
            } else if name == http::header::TRANSFER_ENCODING {
                &mut coding
            } else {
                continue;
            };
            field.0 = field.0.or(Some(value));
            field.1 += 1;
        }
        return (length, coding);
    }
    let first_two = |name| {
        let mut values = headers.get_all(name).iter();
        let first = values.next();
        (
            first,
            usize::from(first.is_some()) + usize::from(values.next().is_some()),
        )
    };
    (
        first_two(http::header::CONTENT_LENGTH),
        first_two(http::header::TRANSFER_ENCODING),
    )
}

/// Why [`inspect_head`] refuses a request head.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum HeadVerdict {
    /// Passes the gateway's checks; routing sees this path.
    Route(String),
    AmbiguousFraming,
    BadTarget,
}

/// The gateway's own checks of a request head, in `request_filter`'s order, without a
/// session: framing, target form, path normalisation. `raw_head` is the head as received.
/// For the fuzz targets and tests; the proxy runs the same functions inline.
#[doc(hidden)]
pub fn inspect_head(req: &RequestHeader, raw_head: Option<Bytes>) -> HeadVerdict {
    if ambiguous_framing(&req.headers, || raw_head) {
        return HeadVerdict::AmbiguousFraming;
    }
    let _ = valid_request_id(
        req.headers
            .get(&X_REQUEST_ID)
            .map_or(&[][..], |v| v.as_bytes()),
    );
    let _ = crate::trace::parse_traceparent(
        req.headers
            .get(&TRACEPARENT)
            .map_or(&[][..], |v| v.as_bytes()),
    );
    let _ = request_host(req);
    if authority_conflict(req) || target_form(req) == TargetForm::Refused {
        return HeadVerdict::BadTarget;
    }
    match normalize_path(req.uri.path()) {
        Ok(p) => HeadVerdict::Route(p.into_owned()),
        Err(_) => HeadVerdict::BadTarget,
    }
}

/// More header fields, or more bytes of request head, than `limits` allows (431). HTTP/1
/// heads are measured as received; HTTP/2 ones as the fields' names and values.
fn header_too_large(session: &Session, limits: &crate::config::LimitsConfig) -> bool {
    let headers = &session.req_header().headers;
    if headers.len() > limits.max_request_headers {
        return true;
    }
    let max = limits.max_request_header_bytes.0 as usize;
    match session.as_downstream().as_http1() {
        Some(h1) => h1.get_headers_raw_bytes().len() > max,
        None => {
            headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum::<usize>()
                > max
        }
    }
}

/// How the request names its target. Only origin-form (`/path?query`) reaches routing as is;
/// an absolute-form target (`http://host/path`) is routed by `Host`, which Pingora makes its
/// authority, and forwarded in origin-form. Anything else (`*`, authority-form, a path that
/// does not start with `/`, bytes that are not UTF-8, where routing would see another path
/// than the upstream) is refused.
#[derive(PartialEq)]
enum TargetForm {
    Origin,
    Absolute,
    Refused,
}

fn target_form(req: &RequestHeader) -> TargetForm {
    let raw = req.raw_path();
    if !req.raw_path_is_utf8() {
        return TargetForm::Refused;
    }
    match raw.first() {
        Some(b'/') => TargetForm::Origin,
        _ if raw.len() > 8
            && (raw[..7].eq_ignore_ascii_case(b"http://")
                || raw[..8].eq_ignore_ascii_case(b"https://")) =>
        {
            TargetForm::Absolute
        }
        _ => TargetForm::Refused,
    }
}

fn cookie_value<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a [u8]> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .find_map(|v| {
            v.as_bytes().split(|b| *b == b';').find_map(|pair| {
                let pair = pair.trim_ascii_start();
                let (k, val) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
                (k == name.as_bytes()).then(|| &val[1..])
            })
        })
}

/// Writes a small JSON error with the request id, and closes the exchange.
async fn respond_json(
    session: &mut Session,
    status: u16,
    message: &str,
    request_id: Option<&HeaderValue>,
) -> Result<()> {
    respond_json_with(session, status, message, request_id, &[]).await
}

/// [`respond_json`] with one more response header.
async fn respond_json_with(
    session: &mut Session,
    status: u16,
    message: &str,
    request_id: Option<&HeaderValue>,
    extra: &[(&'static str, HeaderValue)],
) -> Result<()> {
    let id = request_id.and_then(|v| v.to_str().ok()).unwrap_or("");
    let body = Bytes::from(format!(
        "{{\"error\":\"{message}\",\"status\":{status},\"request_id\":\"{id}\"}}\n"
    ));
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    if let Some(id) = request_id {
        resp.insert_header("X-Request-Id", id.clone())?;
    }
    for (name, value) in extra {
        resp.insert_header(*name, value.clone())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Refuses a request whose head the gateway will not forward and closes the connection:
/// after a malformed head nothing that follows on it can be trusted.
async fn refuse_and_close(
    session: &mut Session,
    status: u16,
    message: &str,
    request_id: &HeaderValue,
) -> Result<bool> {
    session.set_keepalive(None);
    respond_json(session, status, message, Some(request_id)).await?;
    Ok(true)
}

/// The answer to a refused token: 401 with a `WWW-Authenticate` challenge (RFC 6750), 403 for
/// missing claims, 503 when the policy has no keys yet.
async fn respond_auth_error(
    session: &mut Session,
    error: AuthError,
    request_id: &HeaderValue,
) -> Result<()> {
    let (status, message, challenge) = match error {
        AuthError::Missing => (401, "token required", Cow::Borrowed("Bearer")),
        AuthError::Invalid(why) => (
            401,
            why,
            Cow::Owned(format!(
                "Bearer error=\"invalid_token\", error_description=\"{why}\""
            )),
        ),
        AuthError::Forbidden(why) => (
            403,
            why,
            Cow::Owned(format!(
                "Bearer error=\"insufficient_scope\", error_description=\"{why}\""
            )),
        ),
        AuthError::NoKeys => {
            return respond_json(session, 503, "no keys to verify tokens", Some(request_id)).await
        }
    };
    let challenge = HeaderValue::from_str(&challenge).unwrap_or(HeaderValue::from_static("Bearer"));
    respond_json_with(
        session,
        status,
        message,
        Some(request_id),
        &[("WWW-Authenticate", challenge)],
    )
    .await
}

/// The access-log record of a finished request, borrowed from it.
fn access_record<'a>(
    session: &'a Session,
    ctx: &'a RequestCtx,
    status: u16,
    duration: std::time::Duration,
) -> AccessRecord<'a> {
    let req = session.req_header();
    let route = ctx.route().filter(|_| ctx.routed);
    AccessRecord {
        time: std::time::SystemTime::now() - duration,
        request_id: ctx.request_id.as_ref(),
        traceparent: ctx
            .new_traceparent
            .as_ref()
            .or_else(|| req.headers.get(&TRACEPARENT)),
        client_ip: ctx.client_ip,
        method: &req.method,
        host: request_host(req),
        path: req.uri.path(),
        route: route.map(|r| &*r.name),
        upstream: route.map(|r| &*r.upstream.name),
        replica: ctx.last_replica,
        status,
        bytes_in: session.body_bytes_read(),
        bytes_out: session.body_bytes_sent(),
        duration,
        upstream_duration: ctx.upstream_elapsed,
        user: ctx.user.as_deref(),
        rate_limit: ctx.limit_decision,
        tls: session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|s| crate::downstream::tls_version(&s.version)),
    }
}

/// 429 with `Retry-After` and the rate-limit headers.
async fn respond_limited(
    session: &mut Session,
    limit: &RateLimitPolicy,
    retry_after: u64,
    request_id: &HeaderValue,
) -> Result<()> {
    respond_json_with(
        session,
        429,
        "too many requests",
        Some(request_id),
        &[
            ("Retry-After", HeaderValue::from(retry_after)),
            ("RateLimit-Policy", limit.policy_header.clone()),
            ("RateLimit", limit.state_header(0, retry_after)),
        ],
    )
    .await
}

fn status_message(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        404 => "no route",
        408 => "request timeout",
        413 => "request body too large",
        431 => "request header fields too large",
        502 => "bad gateway",
        503 => "no healthy upstream",
        504 => "upstream timeout",
        _ => "error",
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context by value in its request future, in more than one slot,
    /// and copies that future once a request into the box `async_trait` makes. Inline, the
    /// 432-byte context added ~1.3 KB to every copy (~1.7k instructions a request).
    type CTX = Box<RequestCtx>;

    /// No modules: the gateway passes bodies on as the upstream sent them, so it goes without
    /// the disabled response-compression module Pingora adds to every request by default
    /// (~0.7k instructions a request).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Box<RequestCtx> {
        Box::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        ctx.started = Some(std::time::Instant::now());
        METRICS.in_flight.inc();
        let rt = self.runtime.load_full();
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());

        let ambiguous_framing = ambiguous_framing(&session.req_header().headers, || {
            session
                .as_downstream()
                .as_http1()
                .map(|h1| h1.get_headers_raw_bytes())
        });
        let req = session.req_header();
        ctx.request_id = match req.headers.get(&X_REQUEST_ID) {
            Some(v) if valid_request_id(v.as_bytes()) => Some(v.clone()),
            // Ids are made here only when they are forwarded; errors make their own.
            _ if rt.forwarding.request_id => Some(new_request_id()),
            _ => None,
        };
        (ctx.client_ip, ctx.peer_trusted) = client_ip(&rt, req, peer);
        if rt.forwarding.traceparent {
            let incoming = req
                .headers
                .get(&TRACEPARENT)
                .and_then(|v| crate::trace::parse_traceparent(v.as_bytes()));
            match (incoming, crate::trace::export()) {
                // Passed on unchanged.
                (Some(_), None) => {}
                (None, None) => {
                    let (trace_id, span_id) = crate::trace::new_ids();
                    ctx.new_traceparent =
                        Some(crate::trace::format_traceparent(trace_id, span_id, 0));
                }
                // The gateway's span joins the client's trace and becomes the upstream's parent.
                (Some((trace_id, parent, flags)), Some(_)) => {
                    let span_id = crate::trace::new_ids().1;
                    ctx.span = Some(RequestSpan {
                        trace_id,
                        span_id,
                        parent_id: Some(parent),
                        sampled: flags & 1 == 1,
                    });
                    ctx.keep_tracestate = true;
                    ctx.new_traceparent =
                        Some(crate::trace::format_traceparent(trace_id, span_id, flags));
                }
                (None, Some(export)) => {
                    let (trace_id, span_id) = crate::trace::new_ids();
                    let sampled = export.sample_new();
                    ctx.span = Some(RequestSpan {
                        trace_id,
                        span_id,
                        parent_id: None,
                        sampled,
                    });
                    ctx.new_traceparent = Some(crate::trace::format_traceparent(
                        trace_id,
                        span_id,
                        u8::from(sampled),
                    ));
                }
            }
        }
        if ambiguous_framing {
            // Request smuggling shape: never forward it, never keep the connection.
            let id = ctx.request_id().clone();
            return refuse_and_close(session, 400, "ambiguous message framing", &id).await;
        }

        if header_too_large(session, &rt.limits) {
            let id = ctx.request_id().clone();
            return refuse_and_close(session, 431, status_message(431), &id).await;
        }

        if !rt.redirects.is_empty() && !ctx.tls {
            let local = session.server_addr().and_then(|a| a.as_inet()).copied();
            if let Some(port) = local.and_then(|l| listener_setting(&rt.redirects, &l)) {
                let location = https_location(session.req_header(), *port);
                ctx.rt = Some(rt);
                return match location {
                    Some(location) => {
                        let mut resp = ResponseHeader::build(308, Some(2))?;
                        resp.insert_header(http::header::LOCATION, location)?;
                        resp.insert_header(http::header::CONTENT_LENGTH, 0)?;
                        session.write_response_header(Box::new(resp), true).await?;
                        Ok(true)
                    }
                    None => {
                        respond_json(
                            session,
                            400,
                            "no usable Host to redirect to",
                            Some(ctx.request_id()),
                        )
                        .await?;
                        Ok(true)
                    }
                };
            }
        }
        if authority_conflict(session.req_header()) {
            let id = ctx.request_id().clone();
            return refuse_and_close(session, 400, "Host does not match :authority", &id).await;
        }
        let req = session.req_header();
        let form = target_form(req);
        let normalized = match form {
            TargetForm::Refused => Err(PathError::Invalid),
            _ => normalize_path(req.uri.path()),
        };
        let path = match normalized {
            // Absolute-form goes upstream as origin-form, so the path is always rewritten.
            Ok(p) if form == TargetForm::Absolute => Cow::Owned(p.into_owned()),
            Ok(p) => p,
            Err(_) => {
                let id = ctx.request_id().clone();
                return refuse_and_close(session, 400, "invalid path", &id).await;
            }
        };
        // Without routes that name a host, the host is not looked up (~200 instructions).
        let host = rt
            .router
            .matches_hosts()
            .then(|| request_host(req))
            .flatten();
        let found = rt.router.find(host, &path, &req.method, &req.headers);
        let Some(route) = found else {
            ctx.rt = Some(rt);
            respond_json(session, 404, status_message(404), Some(ctx.request_id())).await?;
            return Ok(true);
        };
        let route = route as usize;
        ctx.route = route;
        ctx.routed = true;
        ctx.new_path = match rt.routes[route].rewrite.apply(&path) {
            Some(p) => Some(p),
            None => match path {
                Cow::Owned(p) => Some(p),
                Cow::Borrowed(_) => None,
            },
        };
        if let Some(max) = rt.routes[route].max_request_body {
            let declared = session
                .req_header()
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                let expects_continue = session
                    .req_header()
                    .headers
                    .get(http::header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                if expects_continue {
                    // The client waits for our word before sending the body: it will not.
                    session.set_keepalive(None);
                } else {
                    // The client is sending the body anyway. Closing on it now would reset the
                    // connection under the answer; instead the body is read and discarded for
                    // a while after the answer (nginx's lingering close), then the connection
                    // is reused or, past that, closed.
                    let downstream = session.as_downstream_mut();
                    downstream.set_close_on_response_before_downstream_finish(false);
                    downstream.set_total_drain_timeout(Some(BODY_DRAIN_LIMIT));
                }
                ctx.rt = Some(rt);
                respond_json(session, 413, status_message(413), Some(ctx.request_id())).await?;
                return Ok(true);
            }
            ctx.body_limit = Some(max);
        }
        let limit = rt.routes[route].rate_limit.clone();
        let mut claim_key = None;
        if let Some(policy) = rt.routes[route].auth.clone() {
            let key_claim = match limit.as_deref().map(|l| &l.key) {
                Some(KeySource::Claim(c)) => Some(c.as_str()),
                _ => None,
            };
            let checked = match policy.token(&session.req_header().headers) {
                None if rt.routes[route].auth_optional => Ok(Verified::default()),
                None => {
                    policy.metrics.missing.inc();
                    Err(AuthError::Missing)
                }
                Some(token) => policy.verify(token, key_claim).await,
            };
            match checked {
                Ok(v) => {
                    (ctx.claims, claim_key, ctx.user) = (v.forward, v.limit_key, v.subject);
                }
                Err(e) => {
                    ctx.rt = Some(rt);
                    respond_auth_error(session, e, ctx.request_id()).await?;
                    return Ok(true);
                }
            }
        }
        if let Some(limit) = limit {
            let key = match &limit.key {
                KeySource::ClientIp => ctx.client_ip.map(LimitKey::Ip),
                KeySource::Route => Some(LimitKey::Route(route as u32)),
                KeySource::Header(name) => session
                    .req_header()
                    .headers
                    .get(name)
                    .map(|v| LimitKey::Hash(crate::ratelimit::hash_value(v.as_bytes()))),
                KeySource::Claim(_) => claim_key.map(LimitKey::Hash),
            };
            let decision = if limit.is_shared() {
                limit.check_shared(key).await
            } else {
                limit.check(key)
            };
            match decision {
                Decision::Allowed { remaining, reset } => {
                    ctx.limit_decision = Some("allowed");
                    ctx.quota = Some((limit, remaining, reset));
                }
                Decision::Limited { retry_after } => {
                    ctx.limit_decision = Some("limited");
                    ctx.rt = Some(rt);
                    respond_limited(session, &limit, retry_after, ctx.request_id()).await?;
                    return Ok(true);
                }
                Decision::Unavailable => {
                    ctx.rt = Some(rt);
                    respond_json(
                        session,
                        503,
                        "rate limiter unavailable",
                        Some(ctx.request_id()),
                    )
                    .await?;
                    return Ok(true);
                }
                Decision::NoKey => {
                    ctx.rt = Some(rt);
                    respond_json(
                        session,
                        400,
                        "request lacks the rate-limit key",
                        Some(ctx.request_id()),
                    )
                    .await?;
                    return Ok(true);
                }
            }
        }
        ctx.rt = Some(rt);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        ctx.release_replica();
        let Some(route) = ctx.route() else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "no route state");
        };
        let up = &route.upstream;
        let req = session.req_header();
        let mut ip_buf = [0u8; 16];
        let hash: Option<&[u8]> = match up.hash_key() {
            None => None,
            Some(HashKey::Path) => Some(req.uri.path().as_bytes()),
            Some(HashKey::Header(name)) => req.headers.get(name.as_str()).map(|v| v.as_bytes()),
            Some(HashKey::Cookie(name)) => cookie_value(req, name),
            Some(HashKey::ClientIp) => ctx.client_ip.map(|ip| match ip {
                IpAddr::V4(v4) => {
                    ip_buf[..4].copy_from_slice(&v4.octets());
                    &ip_buf[..4]
                }
                IpAddr::V6(v6) => {
                    ip_buf = v6.octets();
                    &ip_buf[..]
                }
            }),
        };
        let now = std::time::Instant::now();
        let Some((replica, probe)) = up.pick(hash, ctx.tried(), ms_at(now)) else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "no healthy replica");
        };
        let mut peer = Box::new(replica.peer.clone());
        let t = &route.timeouts;
        if let Some(d) = t.connect {
            peer.options.connection_timeout = Some(d.0);
        }
        if let Some(d) = t.read {
            peer.options.read_timeout = Some(d.0);
        }
        if let Some(d) = t.write {
            peer.options.write_timeout = Some(d.0);
        }
        replica.begin_request();
        if ctx.tried_len < TRIED_CAP {
            ctx.tried[ctx.tried_len] = replica.id;
            ctx.tried_len += 1;
        }
        ctx.attempts += 1;
        ctx.probe = probe;
        ctx.upstream_started = Some(now);
        ctx.replica = Some(replica);
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(path) = ctx.new_path.as_deref() {
            let uri = match up.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            up.set_uri(uri.parse().map_err(|_| {
                Error::explain(
                    ErrorType::HTTPStatus(400),
                    "rewritten path is not a valid URI",
                )
            })?);
        }
        let Some(rt) = ctx.rt.as_ref() else {
            return Ok(());
        };
        let forwarding = rt.forwarding;
        let request_id = ctx.request_id.as_ref().filter(|_| forwarding.request_id);
        if !forwarding.x_forwarded
            && request_id.is_none()
            && ctx.new_traceparent.is_none()
            && ctx.claims.is_empty()
            && rt.identity_headers.is_empty()
        {
            return Ok(());
        }
        let from = Forwarded {
            client_ip: ctx.client_ip,
            peer: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            peer_trusted: ctx.peer_trusted,
            tls: ctx.tls,
        };
        let adds = ADDED_REQUEST_HEADERS + ctx.claims.len();
        let claims = &ctx.claims;
        let (traceparent, keep_tracestate) = (&ctx.new_traceparent, ctx.keep_tracestate);
        edit_request(up, forwarding.preserve_header_case, adds, |headers, uri| {
            // Identity headers come from verified tokens only, never from the client: a claim's
            // header replaces whatever the client sent, and the others are removed.
            for (name, value) in claims.iter() {
                headers.set(name, value.clone())?;
            }
            for name in &rt.identity_headers {
                if !claims.iter().any(|(claimed, _)| claimed == name) {
                    headers.unset(name);
                }
            }
            if let Some(id) = request_id {
                headers.set(&X_REQUEST_ID, id.clone())?;
            }
            if let Some(tp) = traceparent {
                // A trace state without a valid parent belongs to no trace.
                if !keep_tracestate {
                    headers.unset(&TRACESTATE);
                }
                headers.set(&TRACEPARENT, tp.clone())?;
            }
            if forwarding.x_forwarded {
                set_forwarded_headers(headers, uri, from)?;
            }
            Ok(())
        })
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
        if let Some(route) = ctx.route() {
            let m = &route.upstream.metrics;
            m.response(resp.status.as_u16());
            if let Some(took) = ctx.upstream_elapsed {
                m.duration.observe(took.as_secs_f64());
            }
        }
        if let Some(r) = &ctx.replica {
            r.report_success();
            ctx.verdict = true;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let (Some(max), Some(chunk)) = (ctx.body_limit, body.as_ref()) {
            ctx.body_received += chunk.len() as u64;
            if ctx.body_received > max {
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body larger than the route allows",
                ));
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let Some(rt) = ctx.rt.as_ref() else {
            return Ok(());
        };
        let hsts = match ctx.tls && !rt.hsts.is_empty() {
            true => {
                let local = session.server_addr().and_then(|a| a.as_inet()).copied();
                local.and_then(|l| listener_setting(&rt.hsts, &l))
            }
            false => None,
        };
        if hsts.is_none() && ctx.request_id.is_none() && ctx.quota.is_none() {
            return Ok(());
        }
        let preserve_case = rt.forwarding.preserve_header_case;
        edit_response(resp, preserve_case, ADDED_RESPONSE_HEADERS, |headers| {
            if let Some(value) = hsts {
                headers.set(&http::header::STRICT_TRANSPORT_SECURITY, value.clone())?;
            }
            // Values that differ on every response are marked never-indexed, for HTTP/2: HPACK
            // would add each to the connection's table, where none is used again, after
            // comparing it with every earlier one (~0.7 µs a response for the request id).
            if let Some(id) = &ctx.request_id {
                headers.set(&X_REQUEST_ID, never_indexed(id.clone()))?;
            }
            if let Some((limit, remaining, reset)) = &ctx.quota {
                headers.set(&RATELIMIT_POLICY, limit.policy_header.clone())?;
                let state = limit.state_header(*remaining, *reset);
                headers.set(&RATELIMIT, never_indexed(state))?;
            }
            Ok(())
        })
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the upstream: always safe to try another replica.
        if let Some(route) = ctx.route() {
            let m = &route.upstream.metrics;
            match e.etype() {
                ErrorType::ConnectTimedout => m.timeouts.inc(),
                _ => m.connect_errors.inc(),
            }
        }
        ctx.report_failure();
        let retry = ctx.may_retry();
        ctx.count_retry(retry);
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let upstream_side = *e.esource() == ErrorSource::Upstream;
        // A pooled connection the upstream had closed: not the replica's fault.
        let stale_pooled = client_reused && matches!(e.retry, pingora::RetryType::ReusedOnly);
        if let (true, Some(route)) = (upstream_side && !stale_pooled, ctx.route()) {
            let m = &route.upstream.metrics;
            match e.etype() {
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    m.timeouts.inc()
                }
                _ => m.other_errors.inc(),
            }
        }
        if upstream_side && !stale_pooled {
            ctx.report_failure();
        }
        let body_sent =
            session.as_ref().body_bytes_read() > 0 || session.as_ref().retry_buffer_truncated();
        let safe = upstream_side
            && session.req_header().method.is_idempotent()
            && !body_sent
            && session.response_written().is_none();
        if safe && stale_pooled && ctx.tried_len > 0 {
            // Retrying the same replica on a fresh connection is fine.
            ctx.tried_len -= 1;
        }
        let retry = safe && ctx.may_retry();
        ctx.count_retry(retry);
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                match e.esource() {
                    ErrorSource::Downstream => 408,
                    _ => 504,
                }
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        // Pingora 0.9 drops the client connection after a failed proxy attempt whatever this
        // hook answers, so the response must say `Connection: close`: a client that believed
        // the connection would stay open races its next request against the close and gets a
        // reset instead of an answer.
        if code > 0 && session.response_written().is_none() {
            session.set_keepalive(None);
            let _ = respond_json(session, code, status_message(code), Some(ctx.request_id())).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        ctx.release_replica();
        let Some(started) = ctx.started else { return };
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route_metrics = match (&ctx.rt, ctx.route()) {
            (_, Some(route)) if ctx.routed => &route.metrics,
            (Some(rt), _) => &rt.unmatched,
            (None, _) => {
                METRICS.in_flight.dec();
                return;
            }
        };
        let elapsed = started.elapsed();
        route_metrics.record(
            &session.req_header().method,
            status,
            elapsed.as_secs_f64(),
            session.body_bytes_read(),
            session.body_bytes_sent(),
        );
        METRICS.in_flight.dec();
        if let Some(log) = ctx.rt.as_ref().and_then(|rt| rt.access_log.as_ref()) {
            if log.wants() {
                log.log(&access_record(session, ctx, status, elapsed));
            }
        }
        if let (Some(span), Some(export)) = (ctx.span, crate::trace::export()) {
            if span.sampled {
                let end = std::time::SystemTime::now();
                let req = session.req_header();
                let route = ctx.route().filter(|_| ctx.routed);
                export.record(&FinishedRequest {
                    span,
                    start: end - elapsed,
                    end,
                    method: req.method.as_str(),
                    path: req.uri.path(),
                    route: route.map(|r| &*r.name),
                    upstream: route.map(|r| &*r.upstream.name),
                    replica: ctx.last_replica,
                    status,
                    client_ip: ctx.client_ip,
                    request_id: ctx.request_id.as_ref().and_then(|v| v.to_str().ok()),
                    host: request_host(req),
                });
            }
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, e: &Error) -> bool {
        // Client-side hang-ups are routine; upstream trouble is logged.
        *e.esource() == ErrorSource::Downstream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_is_judged_alike_for_short_and_long_heads() {
        // (fields, ambiguous without looking at the raw head)
        let cases: [(&[(&str, &str)], bool); 9] = [
            (&[], false),
            (&[("content-length", "42")], false),
            (&[("transfer-encoding", "chunked")], false),
            (&[("content-length", "42"), ("content-length", "42")], true),
            (&[("content-length", "42, 42")], true),
            (&[("content-length", "")], true),
            (&[("transfer-encoding", "gzip, chunked")], true),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                true,
            ),
            (
                &[("transfer-encoding", "chunked"), ("content-length", "1")],
                true,
            ),
        ];
        for (fields, ambiguous) in cases {
            // Padded past the one-pass limit, the lookups answer instead.
            for padding in [0, 20] {
                let mut headers = http::HeaderMap::new();
                for i in 0..padding {
                    headers.append(
                        http::HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap(),
                        http::HeaderValue::from_static("1"),
                    );
                }
                for (name, value) in fields {
                    headers.append(*name, http::HeaderValue::from_str(value).unwrap());
                }
                assert_eq!(
                    ambiguous_framing(&headers, || None),
                    ambiguous,
                    "{fields:?} with {padding} more fields"
                );
            }
        }
        // A lone `chunked` is ambiguous only when the raw head also had a `Content-Length`.
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "transfer-encoding",
            http::HeaderValue::from_static("chunked"),
        );
        let raw = Bytes::from_static(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n");
        assert!(ambiguous_framing(&headers, || Some(raw)));
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123_x.y:z"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(b"<script>"));
        assert!(!valid_request_id(&[b'a'; 129]));
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert!(valid_request_id(id.as_bytes()));
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn ports_are_stripped() {
        for (host, bare) in [
            ("example.com:8080", "example.com"),
            ("example.com", "example.com"),
            ("[::1]:80", "::1"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("a.test:", "a.test"),
            ("a.test:8x", "a.test:8x"),
            ("fe80::1:80", "fe80::1:80"),
            ("", ""),
            ("[", ""),
            ("[::1", "::1"),
            ("a:1:2", "a:1:2"),
            (":80", ""),
        ] {
            assert_eq!(strip_port(host), bare, "{host:?}");
        }
    }

    #[test]
    fn cookies() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("cookie", "a=1; session=xyz; b=2")
            .unwrap();
        assert_eq!(cookie_value(&req, "session"), Some(&b"xyz"[..]));
        assert_eq!(cookie_value(&req, "sess"), None);
    }
}
