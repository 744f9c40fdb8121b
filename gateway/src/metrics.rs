//! Prometheus metrics, served by the admin listener on `/metrics`. Every name starts with
//! `gateway_`. Labels are bounded: route, upstream, policy and listener names from the
//! configuration, replica addresses, status classes, never paths or client data.
//!
//! The request path records through handles resolved ahead of time (per route, per upstream,
//! per policy, when the runtime is compiled; a route's method × status-class counters on their
//! first use), so recording is an atomic add: no lock, no allocation, no label lookup.

use crate::policy::compress::Coding;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use std::sync::{LazyLock, OnceLock};

/// Latency buckets for a proxy: sub-millisecond to tens of seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Methods with their own label value; everything else is `other`.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The class of a request whose client left before it was answered (nginx logs these as 499).
const CLIENT_CLOSED: &str = "client_closed";
/// The request classes: the status classes, then [`CLIENT_CLOSED`].
const REQUEST_CLASSES: [&str; 6] = [
    CLASSES[0],
    CLASSES[1],
    CLASSES[2],
    CLASSES[3],
    CLASSES[4],
    CLIENT_CLOSED,
];

/// All metric families of the process.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: IntCounterVec,
    response_bytes: IntCounterVec,
    /// Requests being served now.
    pub in_flight: IntGauge,
    upstream_responses: IntCounterVec,
    upstream_errors: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_retries: IntCounterVec,
    upstream_ejections: IntCounterVec,
    replica_up: IntGaugeVec,
    replicas: IntGaugeVec,
    dns_refreshes: IntCounterVec,
    auth: IntCounterVec,
    auth_refusals: IntCounterVec,
    jwks_skipped: IntCounterVec,
    ratelimit: IntCounterVec,
    basic_auth: IntCounterVec,
    concurrency: IntCounterVec,
    mirror: IntCounterVec,
    forward_auth: IntCounterVec,
    circuit_state: IntGaugeVec,
    circuit_opened: IntCounterVec,
    circuit_rejected: IntCounterVec,
    retry_budget_exhausted: IntCounterVec,
    /// Configuration reloads by result (`applied`, `rejected`).
    pub reloads: IntCounterVec,
    /// When the last configuration was applied (Unix seconds).
    pub last_reload: IntGauge,
    /// The running configuration's generation.
    pub generation: IntGauge,
    config_info: IntGaugeVec,
    /// Certificate `notAfter` (Unix seconds) per listener and certificate name.
    pub cert_expiry: IntGaugeVec,
    /// ACME orders by listener, kind (`new`, `renewal`) and result (`issued`, `failed`).
    pub acme_orders: IntCounterVec,
    /// Failed ACME orders by listener and reason.
    pub acme_failures: IntCounterVec,
    /// Access-log records dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// Pooled upstream connections Pingora could not hand over for reuse (a new one is made).
    pub pool_reuse_failures: IntCounter,
    /// Response body bytes into and out of each encoder (`compress`), by coding.
    compression: [(IntCounter, IntCounter); 3],
    /// Open client connections by listener and protocol (`http/1.1`, `h2`, `h2c`).
    pub connections: IntGaugeVec,
    /// Client connections accepted, by listener.
    pub connections_accepted: IntCounterVec,
    /// Client connections closed for not sending a request head in time, by listener.
    pub header_timeouts: IntCounterVec,
    /// Completed TLS handshakes by listener and protocol version.
    pub tls_handshakes: IntCounterVec,
    /// gRPC calls by route and the `grpc-status` they ended with.
    pub grpc_calls: IntCounterVec,
    /// gRPC calls (streams) in flight.
    pub grpc_in_flight: IntGauge,
    /// Failed TLS handshakes by listener and reason.
    pub tls_handshake_errors: IntCounterVec,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric name");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric name");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .expect("static metric definition");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric name");
    h
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let in_flight = IntGauge::new("gateway_requests_in_flight", "Requests being served")
            .expect("static metric definition");
        r.register(Box::new(in_flight.clone()))
            .expect("unique metric name");
        let last_reload = IntGauge::new(
            "gateway_config_last_reload_success_timestamp_seconds",
            "When the running configuration was applied",
        )
        .expect("static metric definition");
        r.register(Box::new(last_reload.clone()))
            .expect("unique metric name");
        let access_log_dropped = IntCounter::new(
            "gateway_access_log_dropped_total",
            "Access-log records dropped because the writer fell behind",
        )
        .expect("static metric definition");
        r.register(Box::new(access_log_dropped.clone()))
            .expect("unique metric name");
        let pool_reuse_failures = IntCounter::new(
            "gateway_upstream_pool_reuse_failures_total",
            "Pooled upstream connections that could not be handed over for reuse; a new connection was made instead",
        )
        .expect("static metric definition");
        r.register(Box::new(pool_reuse_failures.clone()))
            .expect("unique metric name");
        let generation = IntGauge::new(
            "gateway_config_generation",
            "Generation of the running configuration (1 at start, +1 per applied reload)",
        )
        .expect("static metric definition");
        r.register(Box::new(generation.clone()))
            .expect("unique metric name");
        let compression_bytes = counter(
            &r,
            "gateway_compression_bytes_total",
            "Response body bytes compressed (stage in) and what they became (stage out)",
            &["encoding", "stage"],
        );
        let compression = [Coding::Zstd, Coding::Brotli, Coding::Gzip].map(|c| {
            let stage = |s| compression_bytes.with_label_values(&[c.token(), s]);
            (stage("in"), stage("out"))
        });
        let m = Metrics {
            compression,
            requests: counter(
                &r,
                "gateway_requests_total",
                "Requests answered",
                &["route", "method", "status_class"],
            ),
            duration: histogram(
                &r,
                "gateway_request_duration_seconds",
                "Time from request to the end of the response",
                &["route", "method", "status_class"],
            ),
            request_bytes: counter(
                &r,
                "gateway_request_body_bytes_total",
                "Request body bytes received",
                &["route"],
            ),
            response_bytes: counter(
                &r,
                "gateway_response_body_bytes_total",
                "Response body bytes sent",
                &["route"],
            ),
            in_flight,
            connections: gauge(
                &r,
                "gateway_downstream_connections",
                "Open client connections",
                &["listener", "protocol"],
            ),
            connections_accepted: counter(
                &r,
                "gateway_downstream_connections_accepted_total",
                "Client connections accepted (after TLS, if any)",
                &["listener"],
            ),
            header_timeouts: counter(
                &r,
                "gateway_downstream_header_timeouts_total",
                "Client connections closed with 408 for not sending a request head in time",
                &["listener"],
            ),
            grpc_calls: counter(
                &r,
                "gateway_grpc_calls_total",
                "Finished gRPC calls by the grpc-status they ended with (NONE: no status, the call was cut)",
                &["route", "grpc_status"],
            ),
            grpc_in_flight: {
                let g = IntGauge::new("gateway_grpc_calls_in_flight", "gRPC calls (streams) open now")
                    .expect("static metric definition");
                r.register(Box::new(g.clone())).expect("unique metric name");
                g
            },
            tls_handshakes: counter(
                &r,
                "gateway_tls_handshakes_total",
                "Completed TLS handshakes",
                &["listener", "version"],
            ),
            tls_handshake_errors: counter(
                &r,
                "gateway_tls_handshake_errors_total",
                "Failed TLS handshakes",
                &["listener", "reason"],
            ),
            upstream_responses: counter(
                &r,
                "gateway_upstream_responses_total",
                "Responses from upstreams",
                &["upstream", "status_class"],
            ),
            upstream_errors: counter(
                &r,
                "gateway_upstream_errors_total",
                "Failed upstream attempts",
                &["upstream", "kind"],
            ),
            upstream_duration: histogram(
                &r,
                "gateway_upstream_duration_seconds",
                "From choosing a replica to its response header, per attempt",
                &["upstream"],
            ),
            upstream_retries: counter(
                &r,
                "gateway_upstream_retries_total",
                "Attempts retried on another replica",
                &["upstream"],
            ),
            upstream_ejections: counter(
                &r,
                "gateway_upstream_ejections_total",
                "Replicas ejected by passive health",
                &["upstream"],
            ),
            replica_up: gauge(
                &r,
                "gateway_upstream_replica_up",
                "1 when a replica takes traffic (healthy, not ejected)",
                &["upstream", "target"],
            ),
            replicas: gauge(
                &r,
                "gateway_upstream_replicas",
                "Replicas of an upstream, known and healthy",
                &["upstream", "state"],
            ),
            dns_refreshes: counter(
                &r,
                "gateway_dns_refreshes_total",
                "Re-resolutions of upstream host names",
                &["upstream", "result"],
            ),
            auth: counter(
                &r,
                "gateway_auth_total",
                "Token checks by result",
                &["policy", "result"],
            ),
            auth_refusals: counter(
                &r,
                "gateway_auth_refusals_total",
                "Tokens refused (results invalid and forbidden), by reason",
                &["policy", "reason"],
            ),
            jwks_skipped: counter(
                &r,
                "gateway_jwks_keys_skipped_total",
                "Keys of fetched JWKS documents the gateway could not use, by reason (once per document)",
                &["policy", "reason"],
            ),
            ratelimit: counter(
                &r,
                "gateway_ratelimit_total",
                "Rate-limit decisions",
                &["policy", "decision"],
            ),
            circuit_state: gauge(
                &r,
                "gateway_upstream_circuit_state",
                "Circuit breaker state: 0 closed, 1 open, 2 half open",
                &["upstream"],
            ),
            circuit_opened: counter(
                &r,
                "gateway_upstream_circuit_opened_total",
                "Times the circuit breaker opened",
                &["upstream"],
            ),
            circuit_rejected: counter(
                &r,
                "gateway_upstream_circuit_rejected_total",
                "Requests failed fast (503) by an open circuit",
                &["upstream"],
            ),
            retry_budget_exhausted: counter(
                &r,
                "gateway_upstream_retry_budget_exhausted_total",
                "Retries not made because the upstream's retry budget was spent",
                &["upstream"],
            ),
            forward_auth: counter(
                &r,
                "gateway_forward_auth_total",
                "Forward-auth decisions: allowed, cached, refused by the service, error (no answer: 503 or passed per on_error)",
                &["policy", "result"],
            ),
            mirror: counter(
                &r,
                "gateway_mirror_total",
                "Request copies for a route's mirror: sent (answered), failed, dropped (queue full), too_large",
                &["route", "result"],
            ),
            concurrency: counter(
                &r,
                "gateway_concurrency_total",
                "Concurrency-limit decisions: admitted at once, after queueing, or refused (queue full, timed out)",
                &["policy", "result"],
            ),
            basic_auth: counter(
                &r,
                "gateway_basic_auth_total",
                "Basic-auth checks by result",
                &["policy", "result"],
            ),
            reloads: counter(
                &r,
                "gateway_config_reloads_total",
                "Configuration reloads",
                &["result"],
            ),
            last_reload,
            generation,
            config_info: gauge(
                &r,
                "gateway_config_info",
                "The running configuration's hash",
                &["hash"],
            ),
            cert_expiry: gauge(
                &r,
                "gateway_tls_certificate_expiry_timestamp_seconds",
                "notAfter of each certificate",
                &["listener", "name"],
            ),
            acme_orders: counter(
                &r,
                "gateway_acme_orders_total",
                "ACME certificate orders by kind and result",
                &["listener", "kind", "result"],
            ),
            acme_failures: counter(
                &r,
                "gateway_acme_failures_total",
                "Failed ACME certificate orders by reason",
                &["listener", "reason"],
            ),
            access_log_dropped,
            pool_reuse_failures,
            registry: r,
        };
        // Both results exist from the start, so `increase()` sees the first rejection.
        for result in ["applied", "rejected"] {
            m.reloads.with_label_values(&[result]);
        }
        m
    }

    /// The retry-budget counter of `upstream`.
    pub fn retry_budget_exhausted(&self, upstream: &str) -> IntCounter {
        self.retry_budget_exhausted.with_label_values(&[upstream])
    }

    /// Counts one compressed response body.
    pub fn compressed(&self, coding: Coding, bytes_in: usize, bytes_out: usize) {
        let (i, o) = &self.compression[coding as usize];
        i.inc_by(bytes_in as u64);
        o.inc_by(bytes_out as u64);
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Marks `hash` as the running configuration and `generation` as its generation.
    pub fn config_applied(&self, generation: u64, hash: u64) {
        self.config_info.reset();
        self.config_info
            .with_label_values(&[&format!("{hash:016x}")])
            .set(1);
        self.generation.set(generation as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_reload.set(now as i64);
    }

    /// Replaces the replica gauges with the state of `upstreams` (called on each scrape).
    pub fn set_replicas<'a>(
        &self,
        upstreams: impl Iterator<Item = (&'a str, Vec<(String, bool)>)>,
    ) {
        self.replica_up.reset();
        self.replicas.reset();
        for (name, replicas) in upstreams {
            let healthy = replicas.iter().filter(|(_, up)| *up).count();
            self.replicas
                .with_label_values(&[name, "known"])
                .set(replicas.len() as i64);
            self.replicas
                .with_label_values(&[name, "healthy"])
                .set(healthy as i64);
            for (target, up) in replicas {
                self.replica_up
                    .with_label_values(&[name, &target])
                    .set(i64::from(up));
            }
        }
    }
}

/// A route's handles.
pub struct RouteMetrics {
    route: String,
    /// By method, then status class; each made on first use.
    requests: [[OnceLock<IntCounter>; REQUEST_CLASSES.len()]; 8],
    /// The same for the latency histogram.
    duration: [[OnceLock<Histogram>; REQUEST_CLASSES.len()]; 8],
    /// gRPC calls by the status they ended with (codes 0-16, then none), made on first use.
    grpc: [OnceLock<IntCounter>; 18],
    request_bytes: IntCounter,
    response_bytes: IntCounter,
}

impl RouteMetrics {
    /// Handles for `route` (`(none)` for requests that matched no route).
    pub fn new(route: &str) -> RouteMetrics {
        let m = &*METRICS;
        RouteMetrics {
            route: route.to_string(),
            requests: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            duration: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            grpc: std::array::from_fn(|_| OnceLock::new()),
            request_bytes: m.request_bytes.with_label_values(&[route]),
            response_bytes: m.response_bytes.with_label_values(&[route]),
        }
    }

    /// Records one finished request.
    pub fn record(
        &self,
        method: &http::Method,
        status: u16,
        seconds: f64,
        bytes_in: usize,
        bytes_out: usize,
    ) {
        let m = match *method {
            http::Method::GET => 0,
            http::Method::POST => 1,
            http::Method::PUT => 2,
            http::Method::DELETE => 3,
            http::Method::PATCH => 4,
            http::Method::HEAD => 5,
            http::Method::OPTIONS => 6,
            _ => 7,
        };
        // Status 0: nothing was answered, the client left first.
        let c = match status {
            0 => REQUEST_CLASSES.len() - 1,
            _ => usize::from(status / 100).clamp(1, 5) - 1,
        };
        self.requests[m][c]
            .get_or_init(|| {
                METRICS
                    .requests
                    .with_label_values(&[&self.route, METHODS[m], REQUEST_CLASSES[c]])
            })
            .inc();
        self.duration[m][c]
            .get_or_init(|| {
                METRICS
                    .duration
                    .with_label_values(&[&self.route, METHODS[m], REQUEST_CLASSES[c]])
            })
            .observe(seconds);
        self.request_bytes.inc_by(bytes_in as u64);
        self.response_bytes.inc_by(bytes_out as u64);
    }

    /// Records a finished gRPC call by its status (`None`: it ended without one).
    pub fn record_grpc(&self, status: Option<u8>) {
        // Codes past the known ones count as UNKNOWN (2), as their name says.
        let i = match status {
            None => 17,
            Some(c) if c <= 16 => usize::from(c),
            Some(_) => 2,
        };
        self.grpc[i]
            .get_or_init(|| {
                let code = (i < 17).then_some(i as u8);
                METRICS
                    .grpc_calls
                    .with_label_values(&[&self.route, crate::proxy::grpc::name(code)])
            })
            .inc();
    }

    /// Requests so far, how many were answered 5xx, and the latency histogram's cumulative
    /// bucket counts (bounds: [`latency_buckets`]). Read by the dashboard's sampler, never on
    /// the request path.
    pub fn totals(&self) -> RouteTotals {
        let mut t = RouteTotals {
            requests: 0,
            errors: 0,
            buckets: vec![0; BUCKETS.len()],
        };
        for (m, classes) in self.requests.iter().enumerate() {
            for (c, counter) in classes.iter().enumerate() {
                let Some(counter) = counter.get() else {
                    continue;
                };
                t.requests += counter.get();
                if REQUEST_CLASSES[c] == "5xx" {
                    t.errors += counter.get();
                }
                if let Some(h) = self.duration[m][c].get() {
                    let proto = prometheus::core::Metric::metric(h);
                    for (i, b) in proto.get_histogram().get_bucket().iter().enumerate() {
                        if let Some(sum) = t.buckets.get_mut(i) {
                            *sum += b.cumulative_count();
                        }
                    }
                }
            }
        }
        t
    }
}

/// The upper bounds (seconds) of the latency histograms' buckets.
pub fn latency_buckets() -> &'static [f64] {
    BUCKETS
}

/// A route's counters at one moment (see [`RouteMetrics::totals`]).
#[derive(Debug, Clone, Default)]
pub struct RouteTotals {
    /// Requests finished.
    pub requests: u64,
    /// Of those, answered 5xx.
    pub errors: u64,
    /// Cumulative count per latency bucket.
    pub buckets: Vec<u64>,
}

/// An upstream's handles.
pub struct UpstreamMetrics {
    responses: [IntCounter; 5],
    /// Attempt start (replica chosen) to the response header.
    pub duration: Histogram,
    /// Failed connects.
    pub connect_errors: IntCounter,
    /// Timeouts (connect, read, write).
    pub timeouts: IntCounter,
    /// Other failures (reset, refused mid-request, protocol errors).
    pub other_errors: IntCounter,
    /// Retries on another replica.
    pub retries: IntCounter,
    /// Passive ejections.
    pub ejections: IntCounter,
    /// DNS refreshes that succeeded.
    pub dns_ok: IntCounter,
    /// DNS refreshes that failed (the last good set was kept).
    pub dns_failed: IntCounter,
}

impl UpstreamMetrics {
    /// Failed attempts so far: connect errors, timeouts and broken responses.
    pub fn errors(&self) -> u64 {
        self.connect_errors.get() + self.timeouts.get() + self.other_errors.get()
    }

    /// Handles for `upstream`.
    pub fn new(upstream: &str) -> UpstreamMetrics {
        let m = &*METRICS;
        UpstreamMetrics {
            responses: CLASSES.map(|c| m.upstream_responses.with_label_values(&[upstream, c])),
            duration: m.upstream_duration.with_label_values(&[upstream]),
            connect_errors: m.upstream_errors.with_label_values(&[upstream, "connect"]),
            timeouts: m.upstream_errors.with_label_values(&[upstream, "timeout"]),
            other_errors: m.upstream_errors.with_label_values(&[upstream, "other"]),
            retries: m.upstream_retries.with_label_values(&[upstream]),
            ejections: m.upstream_ejections.with_label_values(&[upstream]),
            dns_ok: m.dns_refreshes.with_label_values(&[upstream, "ok"]),
            dns_failed: m.dns_refreshes.with_label_values(&[upstream, "failed"]),
        }
    }

    /// Counts a response header from the upstream.
    pub fn response(&self, status: u16) {
        self.responses[usize::from(status / 100).clamp(1, 5) - 1].inc();
    }
}

/// An auth policy's handles, by result.
pub struct AuthMetrics {
    /// Token accepted.
    pub ok: IntCounter,
    /// No token where one was required.
    pub missing: IntCounter,
    /// Token refused (signature, format, time, issuer, audience).
    pub invalid: IntCounter,
    /// Valid token without the required claims.
    pub forbidden: IntCounter,
    /// No key loaded.
    pub no_keys: IntCounter,
    /// Refusals by reason, in the order of [`AUTH_REFUSALS`].
    refusals: [IntCounter; AUTH_REFUSALS.len()],
    /// JWKS keys skipped, by [`crate::auth::SkippedKey`] (as `usize`).
    skipped: [IntCounter; crate::auth::SkippedKey::ALL.len()],
}

/// Why a token is refused: the message the client gets, and the metric's `reason` label.
pub const AUTH_REFUSALS: [(&str, &str); 14] = [
    ("token too large", "too_large"),
    ("malformed token or unsupported algorithm", "malformed"),
    ("malformed token", "malformed_claims"),
    (
        "no key matches the token's kid and algorithm",
        "unknown_key",
    ),
    ("token expired", "expired"),
    ("token not yet valid", "not_yet_valid"),
    ("wrong issuer", "issuer"),
    ("wrong audience", "audience"),
    ("token lacks a required claim", "missing_registered_claim"),
    ("bad signature", "signature"),
    ("algorithm not allowed", "algorithm"),
    ("token lists critical extensions", "critical_header"),
    ("a required claim is missing", "missing_claim"),
    ("a claim does not have an allowed value", "claim_value"),
];

impl AuthMetrics {
    /// Handles for `policy`.
    pub fn new(policy: &str) -> AuthMetrics {
        let a = |r: &str| METRICS.auth.with_label_values(&[policy, r]);
        AuthMetrics {
            ok: a("ok"),
            missing: a("missing"),
            invalid: a("invalid"),
            forbidden: a("forbidden"),
            no_keys: a("no_keys"),
            refusals: AUTH_REFUSALS
                .map(|(_, reason)| METRICS.auth_refusals.with_label_values(&[policy, reason])),
            skipped: crate::auth::SkippedKey::ALL.map(|why| {
                METRICS
                    .jwks_skipped
                    .with_label_values(&[policy, why.label()])
            }),
        }
    }

    /// Counts a JWKS key the policy could not use.
    pub fn skipped_key(&self, why: crate::auth::SkippedKey) {
        self.skipped[why as usize].inc();
    }

    /// Counts a refusal by its message (every message the token check gives is in
    /// [`AUTH_REFUSALS`]; a unit test in `auth` holds the two together).
    pub fn refused(&self, message: &str) {
        if let Some(i) = AUTH_REFUSALS.iter().position(|(m, _)| *m == message) {
            self.refusals[i].inc();
        }
    }
}

/// A rate-limit policy's handles, by decision.
pub struct RateLimitMetrics {
    /// Let through.
    pub allowed: IntCounter,
    /// Answered 429.
    pub limited: IntCounter,
    /// Refused for lack of a key.
    pub no_key: IntCounter,
    /// Shared store (Redis) did not answer in time.
    pub store_errors: IntCounter,
}

impl RateLimitMetrics {
    /// Handles for `policy`.
    pub fn new(policy: &str) -> RateLimitMetrics {
        let d = |r: &str| METRICS.ratelimit.with_label_values(&[policy, r]);
        RateLimitMetrics {
            allowed: d("allowed"),
            limited: d("limited"),
            no_key: d("no_key"),
            store_errors: d("store_error"),
        }
    }
}

/// A circuit breaker's handles.
pub struct BreakerMetrics {
    /// 0 closed, 1 open, 2 half open.
    pub state: IntGauge,
    /// Times it opened.
    pub opened: IntCounter,
    /// Requests failed fast.
    pub rejected: IntCounter,
}

impl BreakerMetrics {
    /// Handles for `upstream`.
    pub fn new(upstream: &str) -> BreakerMetrics {
        let m = &*METRICS;
        BreakerMetrics {
            state: m.circuit_state.with_label_values(&[upstream]),
            opened: m.circuit_opened.with_label_values(&[upstream]),
            rejected: m.circuit_rejected.with_label_values(&[upstream]),
        }
    }
}

/// A `forward_auth` policy's handles.
pub struct ForwardAuthMetrics {
    pub allowed: IntCounter,
    pub cached: IntCounter,
    pub refused: IntCounter,
    pub error: IntCounter,
}

impl ForwardAuthMetrics {
    /// Handles for `policy`.
    pub fn new(policy: &str) -> ForwardAuthMetrics {
        let d = |r: &str| METRICS.forward_auth.with_label_values(&[policy, r]);
        ForwardAuthMetrics {
            allowed: d("allowed"),
            cached: d("cached"),
            refused: d("refused"),
            error: d("error"),
        }
    }
}

/// A route mirror's handles.
pub struct MirrorMetrics {
    /// Copies the shadow answered.
    pub sent: IntCounter,
    /// Copies that failed (no replica, connect, timeout, error).
    pub failed: IntCounter,
    /// Copies dropped because the queue was full.
    pub dropped: IntCounter,
    /// Requests not copied: body over `max_body`.
    pub too_large: IntCounter,
}

impl MirrorMetrics {
    /// Handles for `route`.
    pub fn new(route: &str) -> MirrorMetrics {
        let d = |r: &str| METRICS.mirror.with_label_values(&[route, r]);
        MirrorMetrics {
            sent: d("sent"),
            failed: d("failed"),
            dropped: d("dropped"),
            too_large: d("too_large"),
        }
    }
}

/// A concurrency limit's handles.
pub struct ConcurrencyMetrics {
    /// Given a place at once.
    pub admitted: IntCounter,
    /// Given a place after waiting.
    pub queued: IntCounter,
    /// Refused: the queue was full.
    pub queue_full: IntCounter,
    /// Refused: no place within `queue_timeout`.
    pub timeout: IntCounter,
}

impl ConcurrencyMetrics {
    /// Handles for `policy`.
    pub fn new(policy: &str) -> ConcurrencyMetrics {
        let d = |r: &str| METRICS.concurrency.with_label_values(&[policy, r]);
        ConcurrencyMetrics {
            admitted: d("admitted"),
            queued: d("queued"),
            queue_full: d("queue_full"),
            timeout: d("timeout"),
        }
    }
}

/// A `basic_auth` policy's handles.
pub struct BasicAuthMetrics {
    /// Credentials found among the remembered ones.
    pub cached: IntCounter,
    /// Credentials whose hash was checked, and matched.
    pub verified: IntCounter,
    /// Missing, malformed or wrong credentials (401).
    pub invalid: IntCounter,
    /// Refused for too many failures (429).
    pub throttled: IntCounter,
}

impl BasicAuthMetrics {
    /// Handles for `policy`.
    pub fn new(policy: &str) -> BasicAuthMetrics {
        let d = |r: &str| METRICS.basic_auth.with_label_values(&[policy, r]);
        BasicAuthMetrics {
            cached: d("cached"),
            verified: d("verified"),
            invalid: d("invalid"),
            throttled: d("throttled"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_shows_in_the_exposition() {
        let r = RouteMetrics::new("unit-test-route");
        r.record(&http::Method::GET, 204, 0.002, 10, 20);
        r.record(&http::Method::from_bytes(b"PURGE").unwrap(), 503, 0.2, 0, 0);
        let text = METRICS.render();
        assert!(text.contains(
            "gateway_requests_total{method=\"GET\",route=\"unit-test-route\",status_class=\"2xx\"} 1"
        ), "{text}");
        assert!(text.contains(
            "gateway_requests_total{method=\"other\",route=\"unit-test-route\",status_class=\"5xx\"} 1"
        ));
        assert!(text.contains("gateway_response_body_bytes_total{route=\"unit-test-route\"} 20"));
    }

    #[test]
    fn a_client_that_left_has_its_own_class() {
        let r = RouteMetrics::new("unit-test-left");
        r.record(&http::Method::GET, 0, 0.5, 0, 0);
        let text = METRICS.render();
        assert!(text.contains(
            "gateway_requests_total{method=\"GET\",route=\"unit-test-left\",status_class=\"client_closed\"} 1"
        ), "{text}");
        assert!(!text.contains("route=\"unit-test-left\",status_class=\"1xx\""));
    }
}
