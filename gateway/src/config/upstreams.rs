//! `upstreams`: targets, discovery, balancing, health checks, timeouts, TLS to replicas.

use super::*;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A named upstream: the replicas behind one or more DNS names or addresses.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` targets; every address a host name resolves to is a replica.
    pub targets: Spanned<Vec<Target>>,
    /// Re-resolution of host names.
    #[serde(default = "unplaced")]
    pub discovery: Spanned<DiscoveryConfig>,
    /// Balancing algorithm.
    #[serde(default = "default_balance")]
    pub balance: Spanned<Balance>,
    /// What `consistent_hash` hashes.
    #[serde(default)]
    pub hash_key: Option<HashKey>,
    /// Active and passive health checking.
    #[serde(default = "unplaced")]
    pub health: Spanned<HealthConfig>,
    /// Connection timeouts.
    #[serde(default = "unplaced")]
    pub timeouts: Spanned<TimeoutsConfig>,
    /// Extra attempts on another replica after a failure that is safe to retry. Default 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Speak TLS to the replicas.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// The HTTP version spoken to the replicas. Default `http1`.
    #[serde(default = "unplaced")]
    pub protocol: Spanned<UpstreamProtocol>,
    /// HTTP/2 connection settings (with `protocol` `h2`, `h2c` or `auto`).
    #[serde(default)]
    pub h2: Option<Spanned<H2Config>>,
    /// Requests in flight at once to this upstream, over all routes. Default: no limit.
    #[serde(default)]
    pub concurrency: Option<Spanned<ConcurrencyConfig>>,
    /// Fail fast while the upstream keeps failing. Default: none.
    #[serde(default)]
    pub circuit_breaker: Option<Spanned<CircuitBreakerConfig>>,
    /// Retries at most a share of requests. Default: none (only `retries` bounds them).
    #[serde(default)]
    pub retry_budget: Option<Spanned<RetryBudgetConfig>>,
}

/// The HTTP version spoken to an upstream's replicas.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, connections pooled and reused one request at a time.
    #[default]
    Http1,
    /// HTTP/2 over TLS (ALPN `h2`); needs `tls`.
    H2,
    /// HTTP/2 in the clear, by prior knowledge (gRPC servers without TLS).
    H2c,
    /// Over TLS, whatever ALPN agrees (`h2`, else HTTP/1.1); needs `tls`.
    Auto,
}

impl UpstreamProtocol {
    /// The name as the configuration writes it.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::Auto => "auto",
        }
    }
}

/// `h2`: HTTP/2 connections to the replicas.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct H2Config {
    /// Requests multiplexed at once on one connection; more open another connection.
    /// Default 100.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// PING sent on each connection this often, so that an idle connection a NAT or a
    /// container network dropped is found and replaced. Default 30s; `null` sends none.
    #[serde(default = "default_ping_interval")]
    pub ping_interval: Option<Dur>,
}

fn default_max_streams() -> usize {
    100
}
fn default_ping_interval() -> Option<Dur> {
    Some(Dur::secs(30))
}

impl Default for H2Config {
    fn default() -> Self {
        H2Config {
            max_streams: default_max_streams(),
            ping_interval: default_ping_interval(),
        }
    }
}

/// `circuit_breaker`: when to fail fast, for how long, and how to recover.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Failed attempts, in percent of attempts over `window`, at which it opens. Default 50.
    #[serde(default = "default_failure_percent")]
    pub failure_percent: u32,
    /// Attempts the window must hold before the share counts. Default 20.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// The sliding window (whole seconds). Default 10s.
    #[serde(default = "default_ten_seconds")]
    pub window: Dur,
    /// How long it fails fast before trial requests. Default 10s.
    #[serde(default = "default_ten_seconds")]
    pub open_for: Dur,
    /// Trial requests when half open; all must succeed to close. Default 3.
    #[serde(default = "default_trials")]
    pub trial_requests: u32,
    /// Upstream statuses that count as failures (with connect errors and timeouts).
    /// Default 502, 503, 504.
    #[serde(default = "default_breaker_statuses")]
    pub statuses: Vec<u16>,
}

/// `retry_budget`: the share of requests that may be retries.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries, in percent of the requests over `window`. Default 20.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
    /// Retries always allowed per window, whatever the traffic. Default 3.
    #[serde(default = "default_min_retries")]
    pub min_retries: u32,
    /// The sliding window (whole seconds). Default 10s.
    #[serde(default = "default_ten_seconds")]
    pub window: Dur,
}

fn default_failure_percent() -> u32 {
    50
}
fn default_min_requests() -> u32 {
    20
}
fn default_ten_seconds() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_trials() -> u32 {
    3
}
fn default_breaker_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_budget_percent() -> u32 {
    20
}
fn default_min_retries() -> u32 {
    3
}

/// TLS to an upstream's replicas.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// Server name sent and verified. Default: the first target's host name (none for an IP).
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM file of the CAs the replicas' certificates must chain to. Default: the system's.
    #[serde(default)]
    pub ca: Option<Spanned<String>>,
    /// Verify the certificate and the name. Default true; false accepts any certificate.
    #[serde(default = "yes")]
    pub verify: bool,
}

fn default_balance() -> Spanned<Balance> {
    let nowhere = serde_saphyr::Location::UNKNOWN;
    Spanned::new(Balance::default(), nowhere, nowhere)
}

fn default_retries() -> u32 {
    2
}

/// DNS re-resolution.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// How often host names are resolved again. Default 5s.
    #[serde(default = "default_refresh")]
    pub refresh: Dur,
}

fn default_refresh() -> Dur {
    Dur::secs(5)
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            refresh: default_refresh(),
        }
    }
}

/// Balancing algorithms.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted round robin (smooth, nginx-style).
    #[default]
    RoundRobin,
    /// Least outstanding requests between two random replicas (power of two choices).
    LeastRequests,
    /// Consistent hash (ketama) of `hash_key`.
    ConsistentHash,
    /// Weighted random.
    Random,
}

impl Balance {
    /// The name as the configuration writes it.
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastRequests => "least_requests",
            Balance::ConsistentHash => "consistent_hash",
            Balance::Random => "random",
        }
    }
}

/// The request property `consistent_hash` hashes.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// The client IP (after trusted-proxy handling).
    ClientIp,
    /// The request path.
    Path,
    /// A request header's value.
    Header(String),
    /// A cookie's value.
    Cookie(String),
}

/// Health checking.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Periodic HTTP checks. Off when absent.
    #[serde(default)]
    pub active: Option<ActiveHealthConfig>,
    /// Ejection after failed requests. On by default (`max_fails: 1`, `fail_timeout: 10s`,
    /// as nginx); `passive: null` turns it off.
    #[serde(default = "default_passive")]
    pub passive: Option<PassiveHealthConfig>,
}

fn default_passive() -> Option<PassiveHealthConfig> {
    Some(PassiveHealthConfig::default())
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            active: None,
            passive: default_passive(),
        }
    }
}

/// Active HTTP health check.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActiveHealthConfig {
    /// Path requested with GET. Default `/health`.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Time between checks of one replica. Default 5s.
    #[serde(default = "default_refresh")]
    pub interval: Dur,
    /// Time allowed for one check (connect + response head). Default 1s.
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
    /// Consecutive successes that make an unhealthy replica healthy. Default 2.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that make a healthy replica unhealthy. Default 3.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Statuses that count as healthy. Default: any 2xx or 3xx.
    #[serde(default)]
    pub expected_status: Vec<u16>,
    /// `Host` header sent with checks. Default: the target's host name.
    #[serde(default)]
    pub host: Option<String>,
    /// Check with the gRPC health protocol (`grpc.health.v1.Health/Check`) instead of
    /// `GET path`: healthy when the answer is `SERVING`. Needs an HTTP/2 `protocol`.
    #[serde(default)]
    pub grpc: Option<GrpcHealthConfig>,
}

/// `health.active.grpc`: the gRPC health check.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrpcHealthConfig {
    /// The service asked about. Default `""`: the server as a whole.
    #[serde(default)]
    pub service: String,
}

fn default_health_path() -> String {
    "/health".into()
}
fn default_check_timeout() -> Dur {
    Dur::secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// Passive ejection, like nginx's `max_fails`/`fail_timeout`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthConfig {
    /// Failed attempts (connect errors, timeouts, broken responses) within `fail_timeout` that
    /// eject a replica. Default 1.
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    /// The window failures are counted in, and how long an ejected replica rests before one
    /// probe request may try it again. Default 10s.
    #[serde(default = "default_fail_timeout")]
    pub fail_timeout: Dur,
}

fn default_max_fails() -> u32 {
    1
}
fn default_fail_timeout() -> Dur {
    Dur::secs(10)
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        PassiveHealthConfig {
            max_fails: default_max_fails(),
            fail_timeout: default_fail_timeout(),
        }
    }
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP connect. Default 2s.
    #[serde(default = "default_connect")]
    pub connect: Dur,
    /// Longest wait for the next bytes of the upstream's response. Default 30s.
    #[serde(default = "default_read")]
    pub read: Dur,
    /// Longest wait while writing the request to the upstream. Default 30s.
    #[serde(default = "default_read")]
    pub write: Dur,
    /// How long an idle pooled connection is kept. Default 4s: below the 5s keep-alive
    /// timeout of Node.js servers, so the gateway never reuses a connection the upstream is
    /// closing.
    #[serde(default = "default_idle")]
    pub idle: Dur,
    /// For gRPC calls, in place of `read` and `write`: the longest a call may go with no
    /// message in either direction, so long-lived streams are not cut. Default 5m.
    #[serde(default = "default_stream_idle")]
    pub stream_idle: Dur,
}

fn default_stream_idle() -> Dur {
    Dur::secs(300)
}

fn default_connect() -> Dur {
    Dur::secs(2)
}
fn default_read() -> Dur {
    Dur::secs(30)
}
fn default_idle() -> Dur {
    Dur::secs(4)
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect: default_connect(),
            read: default_read(),
            write: default_read(),
            idle: default_idle(),
            stream_idle: default_stream_idle(),
        }
    }
}
