//! The request path: Pingora's `ProxyHttp` phases, top to bottom. Each phase delegates:
//!
//! 1. `request_filter`: settle who the client is ([`client`]), check the head ([`head`]), run
//!    the listener's policies (HTTPS redirect), find the route (404 when none), run the
//!    route's policies ([`crate::policy`]: body limit, token, rate limit). Every answer the
//!    gateway writes itself goes through [`answer`].
//! 2. `upstream_peer`: pick a replica of the route's upstream (503 when none can take it).
//! 3. `upstream_request_filter`: rewrite the path, the policies' upstream headers (a token's
//!    claims), identity headers removed, the forwarding headers (`forward.rs`).
//! 4. `upstream_response_filter` / `response_filter`: note success; the request id and the
//!    policies' response headers (HSTS, rate-limit state); whether to compress the body, which
//!    `response_body_filter` then encodes chunk by chunk.
//! 5. `fail_to_connect` / `error_while_proxy`: passive health and the retry decision.
//! 6. `fail_to_proxy`: the JSON error answer (502/503/504) with the request id.
//! 7. `logging`: release the replica, metrics, access log, span.
//!
//! Two paths call these phases: the gateway's own HTTP/1 path ([`own`]), for requests without
//! a body to HTTP/1 upstreams, and Pingora's proxy for the rest. A callback added here must be
//! called in [`own`] too. The bodies of phases 1-4 are `Gateway`'s own functions (`on_request`,
//! `route_peer`, `on_upstream_request`, `on_request_body`, `on_upstream_response`,
//! `on_response`), which the trait's methods call and [`own`] calls directly, without the box
//! `async_trait` makes for each call.

pub mod answer;
pub mod client;
pub mod context;
mod forward;
pub mod grpc;
pub mod head;
pub mod own;

use crate::accesslog::AccessRecord;
use crate::config::{HashKey, RouteTimeouts};
use crate::headers::{edit_response, FieldLines, TRACEPARENT, X_REQUEST_ID};
use crate::metrics::METRICS;
use crate::policy::circuit_breaker::Admission;
use crate::policy::BodyLimit;
use crate::runtime::{Route, Runtime};
use crate::trace::FinishedRequest;
use crate::upstream::{ms_at, Replica, Upstream};
use answer::Answer;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use client::{cookie_value, never_indexed, request_host};
use context::{RequestCtx, TRIED_CAP};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

/// The proxy. One instance serves every listener; the runtime inside is swapped on reload.
pub struct Gateway {
    runtime: Arc<ArcSwap<Runtime>>,
}

impl Gateway {
    /// A proxy serving whatever runtime `runtime` holds.
    pub fn new(runtime: Arc<ArcSwap<Runtime>>) -> Gateway {
        Gateway { runtime }
    }

    /// `upstream_peer`: the replica this attempt goes to, picked and counted on `ctx`, and its
    /// peer as the route sends to it.
    pub(crate) fn route_peer(&self, session: &Session, ctx: &mut RequestCtx) -> Result<RoutePeer> {
        ctx.release_replica();
        let (Some(route), Some(up)) = (ctx.route(), ctx.upstream()) else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "no route state");
        };
        let mut ip_buf = [0u8; 16];
        let hash = balance_key(up, session.req_header(), ctx, &mut ip_buf);
        let now = std::time::Instant::now();
        let Some((replica, probe)) = up.pick(hash, ctx.tried(), ms_at(now)) else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "no healthy replica");
        };
        let peer = RoutePeer::new(&replica, route, ctx.grpc.as_deref(), up.stream_idle())?;
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

    /// `request_filter`.
    pub(crate) async fn on_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        ctx.started = Some(std::time::Instant::now());
        METRICS.in_flight.inc();
        let rt = self.runtime.load_full();
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        ctx.grpc = grpc::Call::detect(session.req_header());
        if ctx.grpc.is_some() {
            METRICS.grpc_in_flight.inc();
        }
        client::identify(&rt, session.req_header(), peer, ctx);
        let admitted = admit(&rt, session, ctx).await;
        ctx.rt = Some(rt);
        match admitted {
            Ok(()) => Ok(false),
            Err(refused) => {
                // Bodiless answers (redirects) carry no request id.
                let id = refused.message.as_ref().map(|_| ctx.request_id().clone());
                if let Some(call) = ctx.grpc.as_mut() {
                    call.status = Some(call.status_for(refused.status));
                }
                let dressing = dressing(ctx, refused.status);
                answer::write(session, &refused, id.as_ref(), dressing).await?;
                Ok(true)
            }
        }
    }

    /// `upstream_request_filter`, where the added fields may go into `lines` (written after
    /// the head's own by the own path) rather than into the head's map: when the head carries
    /// none of them and no mirror copies the request.
    pub(crate) fn on_upstream_request(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut RequestCtx,
        lines: Option<&mut FieldLines>,
    ) -> Result<()> {
        let lines = lines.filter(|_| ctx.mirror.is_none());
        forward::edit_upstream_request(session, up, ctx, lines)?;
        if let Some(call) = ctx.grpc.as_ref() {
            call.on_upstream_request(up)?;
        }
        if ctx.mirror.is_some() {
            let body_empty = session.as_downstream_mut().is_body_empty();
            crate::policy::mirror::Capture::on_upstream_request(ctx, up, body_empty);
        }
        Ok(())
    }

    /// `upstream_response_filter`.
    pub(crate) fn on_upstream_response(&self, resp: &mut ResponseHeader, ctx: &mut RequestCtx) {
        ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
        // A gRPC call is judged by its status, which may come only in the trailers.
        let judged = match ctx.grpc.as_mut() {
            Some(call) => call.on_upstream_response(resp),
            None => Some(resp.status.as_u16()),
        };
        match (judged, ctx.grpc.as_mut()) {
            (Some(status), _) => ctx.judge_breaker(status),
            // A trial is judged by its head: a long stream must not hold a trial's place.
            (None, _) if ctx.breaker == Some(Admission::Trial) => ctx.judge_breaker(200),
            (None, Some(call)) => call.verdict_pending = ctx.breaker.is_some(),
            (None, None) => {}
        }
        if let Some(up) = ctx.upstream() {
            let m = &up.metrics;
            m.response(resp.status.as_u16());
            if let Some(took) = ctx.upstream_elapsed {
                m.duration.observe(took.as_secs_f64());
            }
        }
        if let Some(r) = &ctx.replica {
            r.report_success();
            ctx.verdict = true;
        }
    }

    /// `request_body_filter`.
    pub(crate) fn on_request_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(call) = ctx.grpc.as_mut().filter(|c| c.bridged) {
            call.bridge_request_body(body, end_of_stream)?;
        }
        if ctx.mirror.is_some() {
            crate::policy::mirror::Capture::on_body(ctx, body.as_ref(), end_of_stream);
        }
        BodyLimit::on_body(ctx, body.as_ref())
    }

    /// `response_filter`.
    pub(crate) fn on_response(
        &self,
        session: &Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        edit_response_headers(session, resp, ctx)?;
        if let Some(call) = ctx.grpc.as_mut().filter(|c| c.bridged) {
            call.bridge_response(resp)?;
        }
        if let Some(compression) = ctx.compression.as_mut() {
            let req = session.req_header();
            compression.on_response(resp, &req.method, req.version)?;
        }
        Ok(())
    }
}

/// The answer to an HTTP-01 validation request, when the token is one the gateway published.
async fn acme_http01(rt: &Runtime, token: &str) -> Option<Answer> {
    let key_auth = crate::acme::http01_answer(&rt.acme_http01, token).await?;
    Some(Answer::fixed(
        200,
        Arc::new((http::HeaderValue::from_static("text/plain"), key_auth)),
    ))
}

/// Everything `request_filter` decides before the request goes upstream: `Ok` to forward it,
/// `Err` with the answer to write instead.
async fn admit(rt: &Runtime, session: &Session, ctx: &mut RequestCtx) -> Result<(), Answer> {
    let raw_head = session
        .as_downstream()
        .as_http1()
        .map(|h1| h1.get_headers_raw_bytes());
    let path = match head::check_head(session.req_header(), raw_head.as_deref(), &rt.limits) {
        Ok(head) => head.path,
        Err(refused) => return Err(refused.answer()),
    };
    // ACME validation on plain listeners comes before any listener policy (an HTTPS
    // redirect) and any route; a token the gateway did not publish is routed as usual.
    if !rt.acme_http01.is_empty() && !ctx.tls {
        if let Some(token) = path.strip_prefix(crate::acme::HTTP01_PREFIX) {
            if let Some(answer) = acme_http01(rt, token).await {
                return Err(answer);
            }
        }
    }

    if !rt.listeners.is_empty() {
        let local = session.server_addr().and_then(|a| a.as_inet()).copied();
        ctx.listener = local.and_then(|l| rt.listener_of(&l));
        if let Some(i) = ctx.listener {
            rt.listeners[i as usize].1.on_request(session, ctx).await?;
        }
    }

    let req = session.req_header();
    // Without routes that name a host, the host is not looked up (host-lookup row of the
    // bench README).
    let host = rt
        .router
        .matches_hosts()
        .then(|| request_host(req))
        .flatten();
    let Some(index) = rt
        .router
        .find(host, &path, &req.method, &req.headers, req.uri.query())
    else {
        return Err(Answer::status(404));
    };
    let route = &rt.routes[index as usize];
    ctx.route = index as usize;
    ctx.routed = true;
    ctx.new_path = match route.rewrite.apply(&path) {
        Some(p) => Some(p),
        None => match path {
            Cow::Owned(p) => Some(p),
            Cow::Borrowed(_) => None,
        },
    };
    route.policies.on_request(session, ctx).await?;
    if let Some(split) = &route.split {
        ctx.choice = split.choose(session.req_header(), ctx);
    }
    if let Some(up) = route.upstream_for(ctx.choice) {
        upstream_guards(up, ctx).await?;
    }
    if let Some(mirror) = &route.mirror {
        mirror.on_request(session.req_header(), ctx);
    }
    Ok(())
}

/// What the upstream itself asks of a request: a place under its concurrency limit, its
/// circuit closed (or a trial), and a count for its retry budget.
async fn upstream_guards(up: &Upstream, ctx: &mut RequestCtx) -> Result<(), Answer> {
    if let Some(limit) = &up.limit {
        limit.on_request(ctx).await?;
    }
    if up.breaker.is_some() || up.retry_budget.is_some() {
        let now = crate::upstream::now_ms();
        if let Some(breaker) = &up.breaker {
            ctx.breaker = Some(breaker.admit(now)?);
        }
        if let Some(budget) = &up.retry_budget {
            budget.request(now);
        }
    }
    Ok(())
}

/// A replica's peer as an attempt goes to it: the replica's own when the route changes none of
/// its settings (no copy), else a copy with the route's.
pub(crate) enum RoutePeer {
    Replica(Arc<Replica>),
    Own(Box<HttpPeer>),
}

impl RoutePeer {
    /// `replica`'s peer with what `route` and a gRPC `call` change: its timeouts.
    fn new(
        replica: &Arc<Replica>,
        route: &Route,
        call: Option<&grpc::Call>,
        stream_idle: std::time::Duration,
    ) -> Result<RoutePeer> {
        let t = &route.timeouts;
        if *t == RouteTimeouts::default() && call.is_none() {
            return Ok(RoutePeer::Replica(replica.clone()));
        }
        let mut peer = Box::new(replica.peer.clone());
        if let Some(d) = t.connect {
            peer.options.connection_timeout = Some(d.0);
        }
        if let Some(d) = t.read {
            peer.options.read_timeout = Some(d.0);
        }
        if let Some(d) = t.write {
            peer.options.write_timeout = Some(d.0);
        }
        if let Some(call) = call {
            grpc_timeouts(&mut peer, call, stream_idle)?;
        }
        Ok(RoutePeer::Own(peer))
    }

    /// The peer in a box of its own, as Pingora's proxy takes it.
    fn into_box(self) -> Box<HttpPeer> {
        match self {
            RoutePeer::Replica(replica) => Box::new(replica.peer.clone()),
            RoutePeer::Own(peer) => peer,
        }
    }
}

impl std::ops::Deref for RoutePeer {
    type Target = HttpPeer;

    fn deref(&self) -> &HttpPeer {
        match self {
            RoutePeer::Replica(replica) => &replica.peer,
            RoutePeer::Own(peer) => peer,
        }
    }
}

/// The bytes `up`'s balancer hashes for `req` (`consistent_hash`), if it hashes; an IP address
/// is written into `ip_buf`.
fn balance_key<'a>(
    up: &Upstream,
    req: &'a RequestHeader,
    ctx: &RequestCtx,
    ip_buf: &'a mut [u8; 16],
) -> Option<&'a [u8]> {
    match up.hash_key()? {
        HashKey::Path => Some(req.uri.path().as_bytes()),
        HashKey::Header(name) => req.headers.get(name.as_str()).map(|v| v.as_bytes()),
        HashKey::Cookie(name) => cookie_value(req, name),
        HashKey::ClientIp => match ctx.client_ip? {
            IpAddr::V4(v4) => {
                ip_buf[..4].copy_from_slice(&v4.octets());
                Some(&ip_buf[..4])
            }
            IpAddr::V6(v6) => {
                *ip_buf = v6.octets();
                Some(&ip_buf[..])
            }
        },
    }
}

/// A gRPC call's attempt: `timeouts.stream_idle` in place of the read and write timeouts, and
/// nothing waits past the call's deadline (504, read as `DEADLINE_EXCEEDED`).
fn grpc_timeouts(
    peer: &mut HttpPeer,
    call: &grpc::Call,
    stream_idle: std::time::Duration,
) -> Result<()> {
    let (mut wait, mut connect) = (stream_idle, peer.options.connection_timeout);
    if let Some(left) = call.remaining() {
        if left.is_zero() {
            return Error::e_explain(ErrorType::HTTPStatus(504), "gRPC deadline exceeded");
        }
        wait = wait.min(left);
        connect = Some(connect.map_or(left, |c| c.min(left)));
    }
    peer.options.read_timeout = Some(wait);
    peer.options.write_timeout = Some(wait);
    peer.options.connection_timeout = connect;
    Ok(())
}

/// What an answer with `status` takes from the listener and the route: the route's error page,
/// else the listener's, and both pipelines' response edits.
fn dressing(ctx: &RequestCtx, status: u16) -> answer::Dressing<'_> {
    let Some(rt) = ctx.rt.as_ref() else {
        return answer::Dressing::default();
    };
    let listener = ctx.listener.map(|i| &rt.listeners[i as usize].1);
    let route = ctx.route().map(|r| &r.policies);
    answer::Dressing {
        page: route
            .and_then(|p| p.error_page(status))
            .or_else(|| listener.and_then(|p| p.error_page(status))),
        pipelines: [listener, route],
        ctx: Some(ctx),
    }
}

/// The request id and the listener's and route's response header edits.
fn edit_response_headers(
    session: &Session,
    resp: &mut ResponseHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    let Some(rt) = ctx.rt.as_ref() else {
        return Ok(());
    };
    let request = &session.req_header().headers;
    let listener = ctx.listener.map(|i| &rt.listeners[i as usize].1);
    let route = ctx.route();
    let adds = usize::from(ctx.request_id.is_some())
        + listener.map_or(0, |p| p.response_headers())
        + route.map_or(0, |r| r.policies.response_headers());
    if adds == 0 {
        return Ok(());
    }
    edit_response(resp, rt.forwarding.preserve_header_case, adds, |headers| {
        if let Some(listener) = listener {
            listener.on_response(headers, ctx, request)?;
        }
        // Values that differ on every response are marked never-indexed, for HTTP/2: HPACK
        // would add each to the connection's table, where none is used again.
        if let Some(id) = &ctx.request_id {
            headers.set(&X_REQUEST_ID, never_indexed(id.clone()))?;
        }
        if let Some(route) = route {
            route.policies.on_response(headers, ctx, request)?;
        }
        Ok(())
    })
}

/// The access-log record of a finished request, borrowed from it.
fn access_record<'a>(
    session: &'a Session,
    ctx: &'a RequestCtx,
    status: u16,
    duration: std::time::Duration,
) -> AccessRecord<'a> {
    let req = session.req_header();
    let route = ctx.route();
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
        upstream: ctx.upstream().map(|u| &*u.name),
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
        grpc_status: ctx.grpc.as_ref().map(|call| grpc::name(call.status)),
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context by value in its request future, in more than one slot,
    /// and copies that future once a request into the box `async_trait` makes (`bench/README.md`
    /// has the cost of the inline context).
    type CTX = Box<RequestCtx>;

    /// No modules: the gateway passes bodies on as the upstream sent them, so it goes without
    /// the disabled response-compression module Pingora adds to every request by default.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Box<RequestCtx> {
        Box::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        self.on_request(session, ctx).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        self.route_peer(session, ctx).map(RoutePeer::into_box)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.on_upstream_request(session, up, ctx, None)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.on_upstream_response(resp, ctx);
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.on_request_body(body, end_of_stream, ctx)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.on_response(session, resp, ctx)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        if let Some(compression) = ctx.compression.as_mut() {
            compression.on_body(body, end_of_stream)?;
        }
        if let Some(call) = ctx.grpc.as_mut() {
            if call.expired() {
                return Error::e_explain(ErrorType::ReadTimedout, "gRPC deadline exceeded");
            }
            if call.bridged {
                call.bridge_response_body(body);
            }
        }
        Ok(None)
    }

    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Self::CTX,
    ) -> Result<Option<Bytes>> {
        let Some(call) = ctx.grpc.as_mut() else {
            return Ok(None);
        };
        call.on_trailers(trailers);
        let frame = call.bridged.then(|| call.trailer_frame(trailers));
        ctx.judge_trailers();
        Ok(frame)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the upstream: always safe to try another replica.
        if let Some(up) = ctx.upstream() {
            let m = &up.metrics;
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
        if let (true, Some(up)) = (upstream_side && !stale_pooled, ctx.upstream()) {
            let m = &up.metrics;
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
        // A gRPC call is retried only before any message reached the upstream.
        let safe = upstream_side
            && (session.req_header().method.is_idempotent() || ctx.grpc.is_some())
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
        if code > 0 && session.response_written().is_some() {
            if let Some(call) = ctx.grpc.as_mut() {
                // The call had begun: it ends with a status the client reads, not a reset.
                let status = match call.expired() {
                    true => grpc::code::DEADLINE_EXCEEDED,
                    false => grpc::code::UNAVAILABLE,
                };
                grpc::end_with(session, call, status, answer::message_for(code)).await;
            }
        }
        if let (true, Some(call)) = (
            code > 0 && session.response_written().is_none(),
            ctx.grpc.as_mut(),
        ) {
            call.status = Some(call.status_for(code));
        }
        if code > 0 && session.response_written().is_none() {
            let refused = Answer::status(code).then(answer::After::Close);
            let id = ctx.request_id().clone();
            let dressing = dressing(ctx, code);
            let _ = answer::write(session, &refused, Some(&id), dressing).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        ctx.release_replica();
        // A trial that got no verdict must not keep its place: it counts as a failure.
        if ctx.breaker == Some(Admission::Trial) {
            ctx.record_breaker(true);
        }
        let Some(started) = ctx.started else { return };
        if ctx.grpc.is_some() {
            METRICS.grpc_in_flight.dec();
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route_metrics = match (&ctx.rt, ctx.route()) {
            (_, Some(route)) => &route.metrics,
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
        if let Some(call) = &ctx.grpc {
            route_metrics.record_grpc(call.status);
        }
        METRICS.in_flight.dec();
        if let Some(compression) = &ctx.compression {
            compression.record();
        }
        if let Some(log) = ctx.rt.as_ref().and_then(|rt| rt.access_log.as_ref()) {
            if log.wants() {
                log.log(&access_record(session, ctx, status, elapsed));
            }
        }
        if let (Some(span), Some(export)) = (ctx.span, crate::trace::export()) {
            if span.sampled {
                let end = std::time::SystemTime::now();
                let req = session.req_header();
                let route = ctx.route();
                export.record(&FinishedRequest {
                    span,
                    start: end - elapsed,
                    end,
                    method: req.method.as_str(),
                    path: req.uri.path(),
                    route: route.map(|r| &*r.name),
                    upstream: ctx.upstream().map(|u| &*u.name),
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
        // Client-side hang-ups are routine; upstream trouble is logged. An answer the gateway
        // chose itself (503 with no replica to send to, 413 for a body over the limit) is
        // counted in the request metrics, and is no operator's error to act on per request.
        if let ErrorType::HTTPStatus(code) = e.etype() {
            tracing::debug!(status = code, error = %e, "request answered by the gateway");
            return true;
        }
        *e.esource() == ErrorSource::Downstream
    }
}
