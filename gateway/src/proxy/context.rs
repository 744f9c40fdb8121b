//! Per-request state, carried through Pingora's phases.

use crate::auth::{ForwardedClaims, TokenClaims};
use crate::policy::Compression;
use crate::ratelimit::RateLimitPolicy;
use crate::runtime::{Route, Runtime};
use crate::trace::RequestSpan;
use crate::upstream::{now_ms, Replica, Upstream};
use http::header::HeaderValue;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// How many tried replicas a request remembers (to send retries elsewhere).
pub(crate) const TRIED_CAP: usize = 4;

/// Per-request state.
///
/// The fields are in the order the phases after the upstream's response read them (`repr(C)`):
/// by then other requests have pushed the context out of the CPU's caches, and fields spread
/// over its whole length cost a cache miss each (the context-layout row of `bench/README.md`).
/// The first 64 bytes serve the upstream response and the
/// metrics, the next 64 the response headers, the next 64 the access log. The context is
/// allocated 16-byte aligned, so each group spans one cache line or two, never more.
#[derive(Default)]
#[repr(C)]
pub struct RequestCtx {
    /// The runtime this request started on.
    pub(crate) rt: Option<Arc<Runtime>>,
    /// Index of the matched route in `rt.routes`.
    pub(crate) route: usize,
    /// The replica of the current attempt.
    pub(crate) replica: Option<Arc<Replica>>,
    /// When the current upstream attempt started.
    pub(crate) upstream_started: Option<std::time::Instant>,
    /// When the request arrived (set with the in-flight gauge).
    pub(crate) started: Option<std::time::Instant>,
    /// A route matched (`route` is meaningful), whatever happened next.
    pub(crate) routed: bool,
    /// The request came over TLS.
    pub(crate) tls: bool,
    /// The current attempt is the probe of a resting replica.
    pub(crate) probe: bool,
    /// The current attempt got a verdict (success or failure) for passive health.
    pub(crate) verdict: bool,
    /// Index of the connection's listener in `rt.listeners`, when it has policies.
    pub(crate) listener: Option<u16>,

    /// Returned to the client and sent upstream.
    pub(crate) request_id: Option<HeaderValue>,
    /// The rate limit the request passed, with its remaining burst and reset seconds.
    pub(crate) quota: Option<(Arc<RateLimitPolicy>, u32, u64)>,

    /// How long the upstream's response header took.
    pub(crate) upstream_elapsed: Option<std::time::Duration>,
    /// The replica of the last attempt (kept after it is released), for the access log.
    pub(crate) last_replica: Option<SocketAddr>,
    /// The token's subject, for the access log.
    pub(crate) user: Option<Arc<str>>,

    /// The rate-limit decision, for the access log.
    pub(crate) limit_decision: Option<&'static str>,
    /// The client as the gateway believes it (after trusted-proxy handling).
    pub(crate) client_ip: Option<IpAddr>,
    /// The direct peer is a trusted proxy: its forwarding headers are kept.
    pub(crate) peer_trusted: bool,
    /// The client's `tracestate` goes with it (its `traceparent` was valid).
    pub(crate) keep_tracestate: bool,
    /// A `traceparent` to send upstream in place of the client's (none or invalid, or the
    /// gateway's own span when spans are exported).
    pub(crate) new_traceparent: Option<HeaderValue>,
    /// This request's span, when spans are exported.
    pub(crate) span: Option<RequestSpan>,
    /// Claims of a verified token, to send upstream as headers.
    pub(crate) claims: ForwardedClaims,
    /// A verified token's claims, for the policies after the token check (rate-limit keys).
    pub(crate) token: Option<TokenClaims>,
    /// Path to forward, when it differs from the request's.
    pub(crate) new_path: Option<String>,
    /// Query to forward, when it differs from the request's (a key taken out of it).
    pub(crate) new_query: Option<String>,
    /// Replicas tried so far.
    pub(crate) tried: [u64; TRIED_CAP],
    pub(crate) tried_len: usize,
    /// Attempts made (1 after the first pick).
    pub(crate) attempts: u32,
    /// Request body bytes the route allows, and how many have arrived.
    pub(crate) body_limit: Option<u64>,
    pub(crate) body_received: u64,
    /// The response's compression, when a `compress` policy ran.
    pub(crate) compression: Option<Compression>,
    /// Places held under concurrency limits, given back when the request ends.
    pub(crate) permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// The copy of the request being made for a mirror, while its body arrives.
    pub(crate) mirror: Option<Box<crate::policy::mirror::Capture>>,
    /// Headers of the auth service's 2xx answer, for the upstream request (`forward_auth`).
    pub(crate) forwarded_auth: Option<std::sync::Arc<[(http::HeaderName, HeaderValue)]>>,
    /// The side of the route's split the request goes to.
    pub(crate) choice: u8,
    /// How the upstream's circuit breaker let the request through, when it has one.
    pub(crate) breaker: Option<crate::policy::circuit_breaker::Admission>,
    /// The gRPC call this request is, if it is one.
    pub(crate) grpc: Option<Box<super::grpc::Call>>,
}

// The groups keep their 64-byte offsets when a field is added or changed.
const _: () = {
    assert!(std::mem::offset_of!(RequestCtx, request_id) == 64);
    assert!(std::mem::offset_of!(RequestCtx, upstream_elapsed) == 128);
    assert!(std::mem::offset_of!(RequestCtx, limit_decision) == 192);
};

impl RequestCtx {
    /// The request id, made now if the request has none yet.
    pub(crate) fn request_id(&mut self) -> &HeaderValue {
        self.request_id
            .get_or_insert_with(super::client::new_request_id)
    }

    /// The matched route's upstream; `None` before routing or for a route that answers by
    /// itself.
    pub(crate) fn upstream(&self) -> Option<&Upstream> {
        self.route()?.upstream_for(self.choice)
    }

    pub(crate) fn tried(&self) -> &[u64] {
        &self.tried[..self.tried_len]
    }

    /// The route the request matched; `None` before routing or when none did.
    pub(crate) fn route(&self) -> Option<&Route> {
        let rt = self.rt.as_ref().filter(|_| self.routed)?;
        rt.routes.get(self.route)
    }

    /// Ends the current attempt's bookkeeping on its replica.
    pub(crate) fn release_replica(&mut self) {
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

    /// Passive health: the current attempt failed on the upstream side.
    pub(crate) fn report_failure(&mut self) {
        self.record_breaker(true);
        if let (Some(r), Some(up)) = (&self.replica, self.upstream()) {
            up.report_failure(r, now_ms());
            self.verdict = true;
        }
    }

    /// Gives the upstream's circuit breaker an attempt's outcome. A trial has one verdict: its
    /// first outcome (a request let through as a trial and ended without any, its client gone
    /// or refused after admission, is counted a failure when it ends: see `logging`).
    pub(crate) fn record_breaker(&mut self, failed: bool) {
        let Some(admission) = self.breaker else {
            return;
        };
        if let Some(call) = self.grpc.as_mut() {
            call.verdict_pending = false;
        }
        if let Some(breaker) = self.upstream().and_then(|u| u.breaker.as_ref()) {
            breaker.record(admission, failed, now_ms());
        }
        if admission == crate::policy::circuit_breaker::Admission::Trial {
            self.breaker = None;
        }
    }

    /// Gives the circuit breaker an upstream answer's outcome by its (HTTP) status.
    pub(crate) fn judge_breaker(&mut self, status: u16) {
        let failed = self
            .upstream()
            .and_then(|u| u.breaker.as_ref())
            .is_some_and(|b| b.is_failure(status));
        self.record_breaker(failed);
    }

    /// Judges a gRPC call whose answer began without its status by the status its trailers
    /// brought. A call that never gets its upstream's trailers (its client gone, its deadline
    /// over, the gateway ending it) gets no verdict.
    pub(crate) fn judge_trailers(&mut self) {
        let pending = self.grpc.as_ref().filter(|c| c.verdict_pending);
        if let Some(code) = pending.and_then(|c| c.status) {
            self.judge_breaker(super::grpc::to_http(code));
        }
    }

    /// Counts a retry about to be made.
    pub(crate) fn count_retry(&self, retry: bool) {
        if let (true, Some(up)) = (retry, self.upstream()) {
            up.metrics.retries.inc();
        }
    }

    /// Whether another attempt is allowed and has somewhere to go.
    pub(crate) fn may_retry(&self) -> bool {
        match (self.route(), self.upstream()) {
            (Some(route), Some(up)) => {
                self.attempts <= route.retries
                    && up.has_alternative(self.tried(), now_ms())
                    && up
                        .retry_budget
                        .as_ref()
                        .is_none_or(|b| b.try_retry(now_ms()))
            }
            _ => false,
        }
    }
}

impl RequestCtx {
    /// A context for a request from `ip`, for the policies' benchmarks.
    pub fn with_client_ip(ip: IpAddr) -> RequestCtx {
        RequestCtx {
            client_ip: Some(ip),
            ..Default::default()
        }
    }
}
