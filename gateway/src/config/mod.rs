//! The configuration file: the types users write (documented field by field in
//! `docs/configuration.md`) and loading with `${VAR}` substitution. What the values mean
//! together is checked by `plan::compile`.
//!
//! Loading never panics on input: every problem becomes a [`ConfigError`] that names the file,
//! line, column and field.

mod types;

pub use types::{Addr, ByteSize, Dur, Target};

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration error with its position in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the error is in.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// The field path (`routes[2].upstream`), empty when the error is about the file as a whole.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about the value at `at` in `file`.
    pub fn at(
        file: &Path,
        at: &serde_saphyr::Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            line: at.line(),
            column: at.column(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Worker threads for the proxy. Default: the number of CPUs.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Let idle proxy threads steal work from busy ones (Tokio work stealing). Off by default:
    /// a proxy's tasks are short and evenly spread, and stealing costs CPU per request.
    #[serde(default)]
    pub work_stealing: bool,
    /// Accept HTTP/2 with prior knowledge (h2c) on plain-text listeners.
    #[serde(default)]
    pub h2c: bool,
    /// Idle upstream connections kept for reuse, across all upstreams. Default 1024. A pool
    /// smaller than the requests in flight forces new connections under load.
    #[serde(default = "default_pool")]
    pub upstream_keepalive_pool: usize,
    /// Where to accept client traffic, by name.
    pub listeners: BTreeMap<String, ListenerConfig>,
    /// The admin listener (`/health`, `/ready`). Off when absent.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// How upstream host names are resolved.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Peers (CIDRs) whose `X-Forwarded-*` headers are believed. Others have theirs replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// Which headers the gateway adds to requests and responses.
    #[serde(default)]
    pub forwarding: ForwardingConfig,
    /// Bounds on what a client may send.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// OpenTelemetry spans, one per request, exported over OTLP. None: off.
    #[serde(default)]
    pub traces: Option<TracesConfig>,
    /// SIGTERM handling.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Process files (pid file, upgrade socket).
    #[serde(default)]
    pub process: ProcessConfig,
    /// How the configuration file is watched.
    #[serde(default)]
    pub reload: ReloadConfig,
    /// The access log. Off when absent.
    #[serde(default)]
    pub access_log: Option<Spanned<AccessLogConfig>>,
    /// Token checks (JWT), by policy name; routes name the policy they use.
    #[serde(default)]
    pub auth: BTreeMap<String, Spanned<AuthConfig>>,
    /// Rate-limit policies, by name; routes name the policy they use.
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    /// Named groups of replicas that routes send traffic to.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// The route table, matched by the precedence in `docs/routing.md`.
    pub routes: Vec<RouteConfig>,
}

/// A client-facing listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `IP:PORT` to bind.
    pub address: Spanned<Addr>,
    /// Bytes of read buffer per client connection, held for the connection's life.
    /// Default 4096: Pingora's own 65536 cost 64 KiB per idle keep-alive connection; 16 KiB
    /// saves a few reads on large uploads over TLS, for no CPU time measured
    /// (`bench/README.md`).
    #[serde(default = "default_read_buffer")]
    pub read_buffer: usize,
    /// Terminate TLS on this listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Answer every request on this (plain) listener with a 308 to `https://` on this port.
    #[serde(default)]
    pub redirect_https: Option<u16>,
}

/// TLS on a listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate/key pairs; the first is also the default (no SNI, unknown name).
    pub certificates: Vec<CertificateConfig>,
    /// Offer HTTP/2 in ALPN. Default true.
    #[serde(default = "yes")]
    pub http2: bool,
    /// `Strict-Transport-Security` value added to responses on this listener
    /// (e.g. `max-age=31536000; includeSubDomains`). None: not sent.
    #[serde(default)]
    pub hsts: Option<String>,
    /// Ask clients for certificates signed by a CA.
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
    /// How often the certificate files are checked for changes. Default 2s.
    #[serde(default = "default_cert_poll")]
    pub reload_interval: Dur,
}

fn default_cert_poll() -> Dur {
    Dur::secs(2)
}

/// A certificate chain and its private key (PEM files).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Certificate chain, leaf first.
    pub cert: Spanned<String>,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Spanned<String>,
    /// Server names it answers for. Default: the certificate's DNS subjectAltNames
    /// (`*.example.com` covers one label).
    #[serde(default)]
    pub names: Vec<String>,
}

/// Client certificates.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// PEM file of the CAs client certificates must chain to.
    pub ca: String,
    /// Refuse clients without a certificate. Default true; false makes it optional (a
    /// certificate that is presented must still verify).
    #[serde(default = "yes")]
    pub required: bool,
}

fn default_read_buffer() -> usize {
    4 * 1024
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:PORT` to bind; keep it on loopback or an internal network.
    pub address: Spanned<Addr>,
}

/// Resolver settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers (`IP:PORT`, UDP and TCP). Default: the system's (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<Addr>,
    /// Time allowed for one lookup. Default 2s.
    #[serde(default)]
    pub timeout: Option<Dur>,
}

/// Headers the gateway adds.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ForwardingConfig {
    /// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `X-Real-IP` upstream.
    /// Default true.
    #[serde(default = "yes")]
    pub x_forwarded: bool,
    /// `X-Request-Id` upstream and on every response. Default true.
    #[serde(default = "yes")]
    pub request_id: bool,
    /// W3C trace context: a valid `traceparent` is passed on unchanged, a missing or invalid
    /// one is replaced by a new trace (and an orphaned `tracestate` dropped). Default true.
    #[serde(default = "yes")]
    pub traceparent: bool,
    /// Send header names with the spelling the client (or the upstream) used, as nginx does.
    /// Default false: names go out in canonical case (`Host`, `Content-Type`, …; others in
    /// lower case), as HAProxy and Envoy send them, which saves a second header map per request.
    #[serde(default)]
    pub preserve_header_case: bool,
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        ForwardingConfig {
            x_forwarded: true,
            request_id: true,
            traceparent: true,
            preserve_header_case: false,
        }
    }
}

/// OpenTelemetry export of a span per request (OTLP over HTTP, protobuf).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// The collector's traces URL, e.g. `http://otel-collector:4318/v1/traces` (plain HTTP).
    pub otlp_endpoint: Spanned<String>,
    /// `service.name` of the spans. Default `gateway`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Share of new traces (requests without a sampled `traceparent`) that are sampled and
    /// exported, 0.0 to 1.0. A client's sampled flag is always followed. Default 1.0.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Spans waiting for export; when full, new spans are dropped rather than wait. Default
    /// 4096.
    #[serde(default = "default_span_queue")]
    pub max_queue: usize,
    /// Longest wait for the collector per export. Default 5s.
    #[serde(default = "default_export_timeout")]
    pub timeout: Dur,
}

fn default_service_name() -> String {
    "gateway".to_string()
}
fn default_sample_ratio() -> f64 {
    1.0
}
fn default_span_queue() -> usize {
    4096
}
fn default_export_timeout() -> Dur {
    Dur::secs(5)
}

/// Bounds on client requests, so that no client can hold the gateway's memory or connections
/// hostage.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Header fields a request may carry; more get 431. Default 100 (as Envoy). Pingora itself
    /// refuses more than 256 with a 400.
    #[serde(
        default = "default_max_headers",
        deserialize_with = "limits::header_count"
    )]
    pub max_request_headers: usize,
    /// Bytes of request line and header fields together; more get 431. Default 64KiB. Pingora
    /// itself refuses more than 1 MiB with a 400.
    #[serde(
        default = "default_max_header_bytes",
        deserialize_with = "limits::header_bytes"
    )]
    pub max_request_header_bytes: ByteSize,
    /// Request body bytes; a larger `Content-Length` gets 413 before anything is forwarded, a
    /// longer chunked body is cut off with 413 (or a reset, when the response has begun).
    /// Routes can set their own. Default: no limit.
    #[serde(default)]
    pub max_request_body: Option<ByteSize>,
    /// Time a client has, from connecting, to send its first complete request head (HTTP/1);
    /// later heads on a keep-alive connection get the same from their first byte. Slower
    /// connections are answered 408 and closed (slowloris). Default 10s.
    #[serde(
        default = "default_header_timeout",
        deserialize_with = "limits::positive"
    )]
    pub header_timeout: Dur,
    /// How long an HTTP/1 keep-alive connection may sit idle between requests before it is
    /// closed (nginx's `keepalive_timeout`). Default 60s.
    #[serde(
        default = "default_keepalive_timeout",
        deserialize_with = "limits::positive"
    )]
    pub keepalive_timeout: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_headers: default_max_headers(),
            max_request_header_bytes: default_max_header_bytes(),
            max_request_body: None,
            header_timeout: default_header_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
        }
    }
}

/// Range checks of `limits`, done while parsing so that the error carries the position.
mod limits {
    use super::{ByteSize, Dur};
    use serde::de::{Deserialize, Deserializer, Error};

    pub fn header_count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let n = usize::deserialize(d)?;
        if !(1..=256).contains(&n) {
            return Err(D::Error::custom(
                "must be 1 to 256 (Pingora refuses more than 256 header fields)",
            ));
        }
        Ok(n)
    }

    pub fn header_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        let size = ByteSize::deserialize(d)?;
        if !(1024..=1 << 20).contains(&size.0) {
            return Err(D::Error::custom(
                "must be 1KiB to 1MiB (Pingora refuses request heads over 1 MiB)",
            ));
        }
        Ok(size)
    }

    pub fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        let t = Dur::deserialize(d)?;
        if t.0.is_zero() {
            return Err(D::Error::custom("must be more than 0s"));
        }
        Ok(t)
    }
}

fn default_max_headers() -> usize {
    100
}
fn default_max_header_bytes() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_header_timeout() -> Dur {
    Dur::secs(10)
}
fn default_keepalive_timeout() -> Dur {
    Dur::secs(60)
}

/// Graceful shutdown on SIGTERM.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM: stop accepting, let in-flight requests finish for this long. Default 5s.
    #[serde(default = "default_grace")]
    pub grace_period: Dur,
    /// Then wait at most this long for the runtimes to stop. Default 2s.
    #[serde(default = "default_final_timeout")]
    pub final_timeout: Dur,
}

fn default_pool() -> usize {
    1024
}

fn default_grace() -> Dur {
    Dur::secs(5)
}
fn default_final_timeout() -> Dur {
    Dur::secs(2)
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period: default_grace(),
            final_timeout: default_final_timeout(),
        }
    }
}

/// Files the process writes.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Pid file. Default: `gateway-<pid>.pid` in the temp directory.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// Socket used to hand listeners to a new process on upgrade. Default:
    /// `gateway-<pid>-upgrade.sock` in the temp directory (set it explicitly to use upgrades).
    #[serde(default)]
    pub upgrade_socket: Option<PathBuf>,
}

/// Watching the configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Watch the file's directory for changes. Default true. SIGHUP always reloads.
    #[serde(default = "yes")]
    pub watch: bool,
    /// Wait this long after a change for more changes before reloading. Default 200ms.
    #[serde(default = "default_debounce")]
    pub debounce: Dur,
    /// Also compare the file's metadata on this interval, for file systems that send no
    /// events (some bind mounts). Default 2s.
    #[serde(default = "default_poll")]
    pub poll_interval: Dur,
}

fn yes() -> bool {
    true
}
fn default_debounce() -> Dur {
    Dur::millis(200)
}
fn default_poll() -> Dur {
    Dur::secs(2)
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            debounce: default_debounce(),
            poll_interval: default_poll(),
        }
    }
}

/// A named upstream: the replicas behind one or more DNS names or addresses.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` targets; every address a host name resolves to is a replica.
    pub targets: Spanned<Vec<Target>>,
    /// Re-resolution of host names.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    /// Balancing algorithm.
    #[serde(default = "default_balance")]
    pub balance: Spanned<Balance>,
    /// What `consistent_hash` hashes.
    #[serde(default)]
    pub hash_key: Option<HashKey>,
    /// Active and passive health checking.
    #[serde(default)]
    pub health: HealthConfig,
    /// Connection timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Extra attempts on another replica after a failure that is safe to retry. Default 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Speak TLS to the replicas.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
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

impl UpstreamTlsConfig {
    /// The settings without file positions.
    pub fn without_locations(&self) -> UpstreamTlsConfig {
        UpstreamTlsConfig {
            ca: self.ca.as_ref().map(unplaced),
            ..self.clone()
        }
    }
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
        }
    }
}

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
    /// The upstream that serves it.
    pub upstream: Spanned<String>,
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
    /// Overrides `limits.max_request_body` for this route.
    #[serde(default)]
    pub max_request_body: Option<ByteSize>,
}

/// A rate-limit policy (GCRA).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate: `N/s`, `N/m` or `N/h`.
    pub rate: Spanned<String>,
    /// Requests allowed at once on top of the steady rate. Default: N.
    #[serde(default)]
    pub burst: Option<u32>,
    /// `client_ip` (default), `route`, `header:NAME` or `jwt:CLAIM`.
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    /// What happens to a request without a key (no header, no token): `shared` (all such
    /// requests share one bucket, the default) or `reject` (400).
    #[serde(default)]
    pub missing_key: MissingKey,
    /// Keys tracked before new keys share overflow buckets. Default 100000.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Share the limit between gateway instances through Redis. None: count in this process.
    #[serde(default)]
    pub redis: Option<RedisLimitConfig>,
}

/// A rate limit kept in Redis.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedisLimitConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// When Redis cannot answer in time: `open` lets requests through (the default), `closed`
    /// refuses them with 503.
    #[serde(default)]
    pub on_error: FailMode,
    /// Longest wait for Redis per request. Default 50ms.
    #[serde(default = "default_redis_timeout")]
    pub timeout: Dur,
    /// Prefix of the keys written. Default `gateway:rl:`.
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
}

fn default_redis_timeout() -> Dur {
    Dur::millis(50)
}
fn default_redis_prefix() -> String {
    "gateway:rl:".into()
}

/// What a shared rate limit does when its store is unavailable.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Let requests through.
    #[default]
    Open,
    /// Refuse them (503).
    Closed,
}

fn default_max_keys() -> usize {
    100_000
}

/// `s` without its position in the file, for comparing definitions across reloads.
fn unplaced(s: &Spanned<String>) -> Spanned<String> {
    Spanned::new(
        s.value.clone(),
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

impl RateLimitConfig {
    /// The definition without file positions: equal when a reload left the policy unchanged,
    /// wherever it moved in the file.
    pub fn without_locations(&self) -> RateLimitConfig {
        RateLimitConfig {
            rate: unplaced(&self.rate),
            key: self.key.as_ref().map(unplaced),
            ..self.clone()
        }
    }
}

impl AuthConfig {
    /// The definition without file positions (see [`RateLimitConfig::without_locations`]).
    pub fn without_locations(&self) -> AuthConfig {
        AuthConfig {
            jwks_url: self.jwks_url.as_ref().map(unplaced),
            secret: self.secret.as_ref().map(unplaced),
            secret_file: self.secret_file.as_ref().map(unplaced),
            algorithms: self.algorithms.iter().map(unplaced).collect(),
            ..self.clone()
        }
    }
}

/// What a rate limit does with a request that has no key.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// Count all such requests under one shared key.
    #[default]
    Shared,
    /// Refuse them with 400.
    Reject,
}

/// The access log: JSON lines.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file to append to, or `-` for standard output (the default).
    #[serde(default = "stdout_path")]
    pub path: String,
    /// Fraction of requests logged, in (0, 1]. Default 1 (all).
    #[serde(default = "one")]
    pub sample: f64,
    /// Records queued for the writer before new ones are dropped (and counted). Default 8192.
    #[serde(default = "default_log_queue")]
    pub queue: usize,
}

fn stdout_path() -> String {
    "-".into()
}
fn one() -> f64 {
    1.0
}
fn default_log_queue() -> usize {
    8192
}

/// A JWT policy: where its keys come from and what a token must satisfy.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `http://host:port/path` of a JWKS document (host names resolved like targets).
    #[serde(default)]
    pub jwks_url: Option<Spanned<String>>,
    /// JWKS caching.
    #[serde(default)]
    pub jwks: JwksConfig,
    /// HMAC secret (at least 32 bytes), usually `${JWT_SECRET}`.
    #[serde(default)]
    pub secret: Option<Spanned<String>>,
    /// File holding the HMAC secret (a trailing newline is ignored).
    #[serde(default)]
    pub secret_file: Option<Spanned<String>>,
    /// Algorithms accepted with the secret. Default `[HS256]`.
    #[serde(default)]
    pub algorithms: Vec<Spanned<String>>,
    /// PEM public keys, each pinned to an algorithm.
    #[serde(default)]
    pub public_keys: Vec<PublicKeyConfig>,
    /// Accepted `iss` values (one or a list). Empty: not checked.
    #[serde(default)]
    pub issuer: OneOrMany,
    /// Accepted `aud` values (one or a list; a token must name one). Empty: not checked.
    #[serde(default)]
    pub audience: OneOrMany,
    /// Clock skew allowed on `exp` and `nbf`. Default 30s.
    #[serde(default)]
    pub leeway: Option<Dur>,
    /// Refuse tokens without `exp`. Default true.
    #[serde(default = "yes")]
    pub require_exp: bool,
    /// Claims that must be present (403 otherwise).
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Claim → allowed values (a string claim must be one; an array claim must contain one);
    /// 403 otherwise.
    #[serde(default)]
    pub claims: BTreeMap<String, OneOrMany>,
    /// Claim → header it is sent upstream in. Clients' own copies of these headers are always
    /// removed, on every route.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Also take the token from this cookie when there is no `Authorization` header.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Verified tokens remembered, so a signature is checked once per token, not once per
    /// request. Default 10000; 0 turns the cache off.
    #[serde(default = "default_token_cache")]
    pub token_cache: usize,
    /// How long a verified token is remembered (never past its `exp`). Default 60s.
    #[serde(default = "default_token_cache_ttl")]
    pub token_cache_ttl: Dur,
}

fn default_token_cache() -> usize {
    10_000
}
fn default_token_cache_ttl() -> Dur {
    Dur::secs(60)
}

/// JWKS caching.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    /// How often the document is fetched again. Default 5m.
    #[serde(default)]
    pub refresh: Option<Dur>,
    /// A token with an unknown `kid` triggers a refetch at most this often. Default 30s.
    #[serde(default)]
    pub min_refetch_interval: Option<Dur>,
    /// Time allowed for one fetch. Default 2s.
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// For an `https://` URL: PEM file of the CAs its certificate must chain to. Default: the
    /// system's CAs.
    #[serde(default)]
    pub ca: Option<String>,
}

/// A PEM public key.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyConfig {
    /// PEM file.
    pub file: String,
    /// The one algorithm it verifies (`RS256`, `ES256`, `EdDSA`, ...).
    pub algorithm: String,
    /// Key id; tokens naming another `kid` are not checked with it.
    #[serde(default)]
    pub kid: Option<String>,
}

/// One string or a list of strings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl Default for OneOrMany {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
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

/// A configuration file read from disk, with its source text kept for change detection.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// A hash of the file's bytes.
    pub source_hash: u64,
    /// The parsed configuration.
    pub config: Config,
}

/// Reads, substitutes `${VAR}` and parses a configuration file.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    load_text(path, read(path)?)
}

/// The file's text (for [`load_text`]), or why it cannot be read.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })
}

/// Substitutes `${VAR}` and parses `text`, read from `path`.
pub fn load_text(path: &Path, text: String) -> Result<LoadedConfig, ConfigError> {
    let config = parse(path, &text, &std::env::vars().collect())?;
    Ok(LoadedConfig {
        path: path.to_path_buf(),
        source_hash: crate::hash::content(text.as_bytes()),
        config,
    })
}

/// Parses configuration text (the checks across fields are `plan::compile`'s). `vars` are the values for `${VAR}` substitution.
pub fn parse(
    path: &Path,
    text: &str,
    vars: &std::collections::HashMap<String, String>,
) -> Result<Config, ConfigError> {
    let config = deserialize(path, text, Some(vars)).map_err(|mut error| {
        if let Some(message) = unredacted_message(path, text, vars, &error) {
            error.message = message;
        }
        error
    })?;
    Ok(config)
}

/// Once a file uses `${VAR}` anywhere, the YAML library words every later error without its
/// own text (`invalid interpolated scalar value`, `unknown variant `an interpolated
/// variant``), so that no substituted value, a secret maybe, can show in it. The error's own
/// words come back from a second parse of the text with the values written in (as the library
/// itself resolves them), when that parse fails on the same line and field, the scalar there
/// has no `${` of its own, and no substituted value shows in the words.
fn unredacted_message(
    path: &Path,
    text: &str,
    vars: &std::collections::HashMap<String, String>,
    error: &ConfigError,
) -> Option<String> {
    if !error.message.contains("interpolated") {
        return None;
    }
    let error_line = text
        .lines()
        .nth(usize::try_from(error.line).ok()?.checked_sub(1)?)?;
    let at = error_line.get(usize::try_from(error.column).ok()?.checked_sub(1)?..)?;
    if scalar_text(at).contains("${") {
        return None;
    }
    let references = braced_references(text);
    // Each reference resolved by the library: a list of the references as literal strings.
    let list: String = references
        .iter()
        .map(|r| format!("- '{}'\n", r.replace('\'', "''")))
        .collect();
    let mut options = serde_saphyr::Options::default();
    options.property_syntax = serde_saphyr::PropertySyntax::DockerCompose;
    let values: Vec<String> =
        serde_saphyr::from_str_with_options(&list, options.with_properties(vars.clone())).ok()?;
    let mut written = text.to_string();
    for (reference, value) in references.iter().zip(&values) {
        written = written.replacen(reference.as_str(), value, 1);
    }
    let literal = deserialize(path, &written, None).err()?;
    let leaks = values
        .iter()
        .any(|v| v.len() >= 3 && literal.message.contains(v.as_str()));
    // Values written in earlier on the line move the column: the line and field must agree.
    ((literal.line, &literal.field) == (error.line, &error.field) && !leaks)
        .then_some(literal.message)
}

/// The scalar at the start of `at` (the rest of a line from an error's column): a quoted one
/// to its closing quote, a plain one to the next flow delimiter or comment.
fn scalar_text(at: &str) -> &str {
    let end = match at.as_bytes().first() {
        Some(&quote @ (b'"' | b'\'')) => at[1..]
            .bytes()
            .position(|b| b == quote)
            .map_or(at.len(), |p| p + 2),
        _ => at.find([',', '}', ']', '#']).unwrap_or(at.len()),
    };
    &at[..end]
}

/// The `${...}` references of `text` in order (nested ones inside their outer one), skipping
/// `$$`.
fn braced_references(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'$', b'$') => i += 2,
            (b'$', b'{') => {
                let mut depth = 0;
                let mut end = i + 1;
                while end < bytes.len() {
                    match bytes[end] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    end += 1;
                }
                let Some(reference) = text.get(i..=end.min(bytes.len() - 1)) else {
                    break;
                };
                found.push(reference.to_string());
                i = end + 1;
            }
            _ => i += 1,
        }
    }
    found
}

/// Parses `text` into a [`Config`], with `${VAR}` substitution from `vars` when given.
fn deserialize(
    path: &Path,
    text: &str,
    vars: Option<&std::collections::HashMap<String, String>>,
) -> Result<Config, ConfigError> {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options.property_syntax = serde_saphyr::PropertySyntax::DockerCompose;
    let options = match vars {
        Some(vars) => options.with_properties(vars.clone()),
        None => options,
    };
    // serde_path_to_error tracks the field path (`routes[2].upstream`) the parser was in.
    let mut field = String::new();
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            field: clean_field_path(&field),
            message: one_line(&e.to_string()),
        }
    })
}

/// Drops the `.value` segments that `Spanned<T>` wrappers add to a serde path
/// (`upstreams.u.balance.value` → `upstreams.u.balance`); a real field named `value` after an
/// index (`headers[0].value`) stays.
fn clean_field_path(path: &str) -> String {
    if path == "." {
        return String::new();
    }
    let mut out = path.replace(".value[", "[").replace(".value.", ".");
    if let Some(stem) = out.strip_suffix(".value") {
        if !stem.ends_with(']') {
            out.truncate(stem.len());
        }
    }
    out
}

/// Keeps the first line of a parser message and drops its own " at line X column Y" suffix,
/// since the position is printed in front.
fn one_line(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or(msg).trim();
    match first.find(" at line ") {
        Some(i) => first[..i].to_string(),
        None => first.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const BASE: &str = "listeners:\n  http: { address: \"${ADDR:-127.0.0.1:8080}\" }\nupstreams:\n  u: { targets: [\"${HOST}:${PORT:-80}\"] }\nroutes:\n  - { name: u, upstream: u, match: { path: \"/a$$b\" } }\n";

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn compose_style_substitution() {
        let c = parse(
            Path::new("t.yaml"),
            BASE,
            &vars(&[("HOST", "svc"), ("ADDR", "")]),
        )
        .unwrap();
        assert_eq!(
            c.listeners["http"].address.value.0.to_string(),
            "127.0.0.1:8080"
        );
        let t = &c.upstreams["u"].targets.value[0];
        assert_eq!((t.host.as_str(), t.port), ("svc", 80));
        assert_eq!(c.routes[0].matcher.path.as_ref().unwrap().value, "/a$b");
        let c = parse(
            Path::new("t.yaml"),
            BASE,
            &vars(&[("HOST", "svc"), ("PORT", "3001")]),
        )
        .unwrap();
        assert_eq!(c.upstreams["u"].targets.value[0].port, 3001);
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse(Path::new("t.yaml"), BASE, &vars(&[("HOST", "svc")])).unwrap();
        let u = &c.upstreams["u"];
        assert_eq!(u.balance.value, Balance::RoundRobin);
        assert_eq!(u.retries, 2);
        assert_eq!(u.discovery.refresh, Dur::secs(5));
        assert_eq!(
            u.timeouts,
            TimeoutsConfig {
                connect: Dur::secs(2),
                read: Dur::secs(30),
                write: Dur::secs(30),
                idle: Dur::secs(4)
            }
        );
        assert_eq!(
            u.health.passive,
            Some(PassiveHealthConfig {
                max_fails: 1,
                fail_timeout: Dur::secs(10)
            })
        );
        assert!(u.health.active.is_none());
        assert_eq!(c.shutdown.grace_period, Dur::secs(5));
        assert!(c.reload.watch);
        assert!(!c.h2c && !c.work_stealing && c.threads.is_none());
        assert_eq!(
            (c.limits.header_timeout, c.limits.keepalive_timeout),
            (Dur::secs(10), Dur::secs(60))
        );
        assert_eq!(c.listeners["http"].read_buffer, 4096);
    }

    #[test]
    fn errors_keep_their_words_in_files_that_use_substitution() {
        let text = "listeners:\n  http: { address: \"${ADDR:-127.0.0.1:8080}\" }\nupstreams:\n  u: { targets: [\"${HOST:-svc}:${PORT:-80}\"], balance: foo }\nroutes:\n  - { name: u, upstream: u }\nlimits:\n  header_timeout: 0s\n";
        let e = parse(Path::new("t.yaml"), text, &vars(&[("PORT", "81")])).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (4, "upstreams.u.balance"),
            "{e}"
        );
        assert!(e.message.contains("unknown variant `foo`"), "{e}");
        let text = text.replace(", balance: foo", "");
        let e = parse(Path::new("t.yaml"), &text, &vars(&[])).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (8, "limits.header_timeout"),
            "{e}"
        );
        assert!(e.message.contains("more than 0s"), "{e}");
        // An error in a substituted value never shows the value.
        for (line, secret) in [
            (
                "  u: { targets: [\"127.0.0.1:80\"], balance: \"${BAL}\" }",
                "hunter22",
            ),
            (
                "  u: { targets: [\"127.0.0.1:80\"], timeouts: { connect: \"${T}\" } }",
                "hunter2x",
            ),
            ("  u: { targets: [\"${T}\"] }", "hunter2:99999"),
        ] {
            let text = format!("upstreams:\n{line}\nroutes:\n  - {{ name: u, upstream: u }}\n");
            let e = parse(
                Path::new("t.yaml"),
                &text,
                &vars(&[("BAL", secret), ("T", secret)]),
            )
            .unwrap_err();
            assert_eq!(e.line, 2, "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn braced_references_are_found_whole() {
        assert_eq!(
            braced_references("a: ${A}$${B} ${C:-${D}x} $$ ${E"),
            ["${A}", "${C:-${D}x}", "${E"]
        );
        assert_eq!(scalar_text("foo }"), "foo ");
        assert_eq!(scalar_text("\"a, ${B}\", c"), "\"a, ${B}\"");
    }

    #[test]
    fn connection_timeouts_must_be_positive() {
        for field in ["header_timeout", "keepalive_timeout"] {
            let text = format!(
                "upstreams:\n  u: {{ targets: [\"127.0.0.1:80\"] }}\nroutes:\n  - {{ name: u, upstream: u }}\nlimits:\n  {field}: 0s\n"
            );
            let e = parse(Path::new("t.yaml"), &text, &vars(&[])).unwrap_err();
            assert_eq!(e.field, format!("limits.{field}"), "{e}");
            assert_eq!(e.line, 6, "{e}");
            assert!(e.message.contains("more than 0s"), "{e}");
        }
    }

    #[test]
    fn field_paths_lose_spanned_wrappers_only() {
        assert_eq!(
            clean_field_path("upstreams.u.balance.value"),
            "upstreams.u.balance"
        );
        assert_eq!(
            clean_field_path("upstreams.u.targets.value[0]"),
            "upstreams.u.targets[0]"
        );
        assert_eq!(
            clean_field_path("routes[0].match.headers[1].value"),
            "routes[0].match.headers[1].value"
        );
        assert_eq!(
            clean_field_path("routes[0].match.headers[1].name.value"),
            "routes[0].match.headers[1].name"
        );
        assert_eq!(clean_field_path("."), "");
    }
}
