//! Process-wide sections: `dns`, `forwarding`, `traces`, `limits`, `shutdown`, `process`,
//! `reload`, `access_log`.

use super::*;
use serde::Deserialize;
use serde_saphyr::Spanned;

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
    /// Socket on which a running gateway hands its listeners to a new one (`run --upgrade`).
    /// Default: `gateway-<hash of the configuration file's absolute path>-upgrade.sock` in the
    /// temp directory, the same for every process started with the same file.
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
