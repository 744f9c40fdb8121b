//! The access log: one JSON line per request, written off the request path.
//!
//! The request path hands a small record to a bounded queue (`try_send`: never waits); a
//! dedicated thread formats and writes the lines through a buffer, flushing at least every
//! 200 ms. When the queue is full the record is dropped and counted
//! (`gateway_access_log_dropped_total`) rather than slowing requests down.

use crate::config::AccessLogConfig;
use http::{HeaderValue, Method};
use prometheus::IntCounter;
use serde_json::{json, Map, Value};
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

impl AccessRecord {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        let time = self
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        m.insert("time".into(), json!(format_time(time)));
        let header = |v: &Option<HeaderValue>| {
            v.as_ref()
                .and_then(|v| v.to_str().ok())
                .map(|s| Value::String(s.to_string()))
        };
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        put("request_id", header(&self.request_id));
        put("trace_id", header(&self.trace_id));
        put("client_ip", self.client_ip.map(|ip| json!(ip.to_string())));
        put("method", Some(json!(self.method.as_str())));
        put("host", self.host.as_ref().map(|h| json!(h)));
        put("path", Some(json!(self.path)));
        put("route", self.route.as_ref().map(|r| json!(&**r)));
        put("upstream", self.upstream.as_ref().map(|u| json!(&**u)));
        put("replica", self.replica.map(|r| json!(r.to_string())));
        put("status", Some(json!(self.status)));
        put("bytes_in", Some(json!(self.bytes_in)));
        put("bytes_out", Some(json!(self.bytes_out)));
        put("duration_ms", Some(json!(millis(self.duration))));
        put(
            "upstream_ms",
            self.upstream_duration.map(|d| json!(millis(d))),
        );
        put("user", self.user.as_ref().map(|u| json!(u)));
        put("rate_limit", self.rate_limit.map(|r| json!(r)));
        put("tls", self.tls.as_ref().map(|t| json!(t)));
        Value::Object(m)
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// RFC 3339 UTC with milliseconds.
fn format_time(since_epoch: Duration) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH + since_epoch;
    let (date, clock) = (t.date(), t.time());
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        date.year(),
        u8::from(date.month()),
        date.day(),
        clock.hour(),
        clock.minute(),
        clock.second(),
        clock.millisecond()
    )
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
                            let _ = serde_json::to_writer(&mut out, &record.to_json());
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
