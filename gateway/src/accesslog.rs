//! The access log: one JSON line per request, written off the request path.
//!
//! The request path hands a small record to a bounded queue (`try_send`: never waits); a
//! dedicated thread formats and writes the lines through a buffer, flushing at least every
//! 200 ms. When the queue is full the record is dropped and counted
//! (`gateway_access_log_dropped_total`) rather than slowing requests down.

use crate::config::AccessLogConfig;
use http::{HeaderValue, Method};
use prometheus::IntCounter;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// One request, as the access log records it.
pub struct AccessRecord {
    /// When the request arrived.
    pub time: SystemTime,
    /// The request id.
    pub request_id: Option<HeaderValue>,
    /// W3C trace id, when the request carried or got one.
    pub trace_id: Option<HeaderValue>,
    /// The client, after `trusted_proxies`.
    pub client_ip: Option<IpAddr>,
    /// Method.
    pub method: Method,
    /// Host, without port.
    pub host: Option<String>,
    /// Path as received (without the query).
    pub path: String,
    /// The route taken.
    pub route: Option<Arc<str>>,
    /// Its upstream.
    pub upstream: Option<Arc<str>>,
    /// The replica of the last attempt.
    pub replica: Option<SocketAddr>,
    /// Status sent (0: none, the client went away).
    pub status: u16,
    /// Request body bytes read.
    pub bytes_in: usize,
    /// Response body bytes sent.
    pub bytes_out: usize,
    /// Arrival to end of response.
    pub duration: Duration,
    /// From sending upstream to its response header (last attempt).
    pub upstream_duration: Option<Duration>,
    /// The token's `sub`, when authenticated.
    pub user: Option<String>,
    /// `allowed` or `limited` when the route has a rate limit.
    pub rate_limit: Option<&'static str>,
    /// TLS version of the client connection.
    pub tls: Option<String>,
}

/// The JSON line of a record, serialised straight from borrowed fields (no intermediate
/// `Value` tree: the writer thread formats tens of thousands of these a second).
#[derive(serde::Serialize)]
struct Line<'a> {
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<&'a str>,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<&'a str>,
    status: u16,
    bytes_in: usize,
    bytes_out: usize,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<&'a str>,
}

/// Stack space for the addresses a line writes itself.
struct Scratch {
    client_ip: [u8; crate::text::IP_LEN],
    replica: [u8; crate::text::SOCKET_LEN],
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            client_ip: [0; crate::text::IP_LEN],
            replica: [0; crate::text::SOCKET_LEN],
        }
    }
}

impl AccessRecord {
    fn line<'a>(&'a self, scratch: &'a mut Scratch) -> Line<'a> {
        let Scratch { client_ip, replica } = scratch;
        Line {
            time: format_time(
                self.time
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
            request_id: header_text(&self.request_id),
            trace_id: header_text(&self.trace_id),
            client_ip: self.client_ip.map(|ip| crate::text::ip(ip, client_ip)),
            method: self.method.as_str(),
            host: self.host.as_deref(),
            path: &self.path,
            route: self.route.as_deref(),
            upstream: self.upstream.as_deref(),
            replica: self.replica.map(|r| crate::text::socket(r, replica)),
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration_ms: millis(self.duration),
            upstream_ms: self.upstream_duration.map(millis),
            user: self.user.as_deref(),
            rate_limit: self.rate_limit,
            tls: self.tls.as_deref(),
        }
    }
}

fn header_text(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// RFC 3339 UTC with milliseconds, written digit by digit (`format!` cost ~3k instructions a
/// line on the writer thread).
fn format_time(since_epoch: Duration) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH + since_epoch;
    let (date, clock) = (t.date(), t.time());
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut value: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, date.year().clamp(0, 9999) as u32);
    put(5, 2, u32::from(u8::from(date.month())));
    put(8, 2, u32::from(date.day()));
    put(11, 2, u32::from(clock.hour()));
    put(14, 2, u32::from(clock.minute()));
    put(17, 2, u32::from(clock.second()));
    put(20, 3, u32::from(clock.millisecond()));
    // Digits, dashes, colons and letters: always UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}

/// A running access log.
pub struct AccessLog {
    /// What it was built from; an unchanged configuration keeps the same writer on reload.
    pub spec: AccessLogConfig,
    queue: SyncSender<AccessRecord>,
    /// Log 1 request in `every` (1: all).
    every: u64,
    counter: std::sync::atomic::AtomicU64,
    dropped: IntCounter,
}

impl AccessLog {
    /// Opens the destination and starts the writer thread.
    pub fn start(cfg: &AccessLogConfig) -> Result<Arc<AccessLog>, String> {
        let out: Box<dyn Write + Send> = if cfg.path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&cfg.path)
                    .map_err(|e| format!("access_log.path {}: {e}", cfg.path))?,
            )
        };
        if !(cfg.sample > 0.0 && cfg.sample <= 1.0) {
            return Err("access_log.sample: must be in (0, 1]".into());
        }
        let (queue, rx) = sync_channel::<AccessRecord>(cfg.queue.max(1));
        std::thread::Builder::new()
            .name("gateway-access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
                loop {
                    match rx.recv_timeout(Duration::from_millis(200)) {
                        Ok(record) => {
                            let _ =
                                serde_json::to_writer(&mut out, &record.line(&mut Scratch::new()));
                            let _ = out.write_all(b"\n");
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            let _ = out.flush();
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            let _ = out.flush();
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("access log thread: {e}"))?;
        Ok(Arc::new(AccessLog {
            spec: cfg.clone(),
            queue,
            every: (1.0 / cfg.sample).round().max(1.0) as u64,
            counter: std::sync::atomic::AtomicU64::new(0),
            dropped: crate::metrics::METRICS.access_log_dropped.clone(),
        }))
    }

    /// Whether the next request is to be logged (sampling).
    pub fn wants(&self) -> bool {
        self.every == 1
            || self
                .counter
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % self.every
                == 0
    }

    /// Queues a record; never blocks.
    pub fn log(&self, record: AccessRecord) {
        match self.queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_keeps_one_in_n() {
        let dir = std::env::temp_dir().join(format!("gw-access-{}", std::process::id()));
        let cfg = AccessLogConfig {
            path: dir.to_string_lossy().into_owned(),
            sample: 0.25,
            queue: 16,
        };
        let log = AccessLog::start(&cfg).unwrap();
        let kept = (0..400).filter(|_| log.wants()).count();
        assert_eq!(kept, 100);
        assert!(AccessLog::start(&AccessLogConfig {
            sample: 0.0,
            ..cfg.clone()
        })
        .is_err());
        assert!(AccessLog::start(&AccessLogConfig { sample: 1.5, ..cfg }).is_err());
        let _ = std::fs::remove_file(dir);
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(
            format_time(Duration::from_millis(0)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            format_time(Duration::from_millis(1_795_651_200_123)),
            "2026-11-26T00:00:00.123Z"
        );
        assert_eq!(
            format_time(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
