//! The access log: one JSON line per request, written to the file off the request path.
//!
//! At the end of a request its line is formatted from borrowed fields into a buffer of the
//! worker thread and appended to a bounded batch of bytes (one uncontended lock, no wake-up,
//! no allocation once the buffers have grown); a dedicated thread takes the whole batch every
//! 20 ms and writes it with one system call. When the batch is full, the line is dropped and
//! counted (`gateway_access_log_dropped_total`) rather than slowing requests down. (A queue
//! that woke the writer for every record cost a thread wake-up per request; records that
//! owned their text and were formatted and freed on the writer thread cost two allocations
//! and a cross-thread free per request.)

use crate::config::AccessLogConfig;
use http::{HeaderValue, Method};
use prometheus::IntCounter;
use std::cell::RefCell;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// One request, as the access log records it: borrowed from the request, formatted at once.
pub struct AccessRecord<'a> {
    /// When the request arrived.
    pub time: SystemTime,
    /// The request id.
    pub request_id: Option<&'a HeaderValue>,
    /// The W3C `traceparent` the request carried or got (its trace id is logged).
    pub traceparent: Option<&'a HeaderValue>,
    /// The client, after `trusted_proxies`.
    pub client_ip: Option<IpAddr>,
    /// Method.
    pub method: &'a Method,
    /// Host, without port.
    pub host: Option<&'a str>,
    /// Path as received (without the query).
    pub path: &'a str,
    /// The route taken.
    pub route: Option<&'a str>,
    /// Its upstream.
    pub upstream: Option<&'a str>,
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
    pub user: Option<&'a str>,
    /// `allowed` or `limited` when the route has a rate limit.
    pub rate_limit: Option<&'static str>,
    /// TLS version of the client connection.
    pub tls: Option<&'static str>,
    /// The `grpc-status` name a gRPC call ended with.
    pub grpc_status: Option<&'static str>,
}

/// `,"key":` as one literal; the keys are the literals in `write_line` (no escaping needed).
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}

impl AccessRecord<'_> {
    /// Appends the record as one JSON line (with its newline) to `out`. Keys are written as
    /// they are; string values go through [`put_text`], except text the gateway wrote itself
    /// ([`put_own_field`]); numbers through `itoa`: cheaper than a `serde` derive, which escapes
    /// every key and value piece by piece (`bench/README.md`, access-log rows).
    fn write_line(&self, out: &mut Vec<u8>) {
        let since_epoch = self
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        out.extend_from_slice(b"{\"time\":\"");
        out.extend_from_slice(&format_time(since_epoch));
        out.push(b'"');
        if let Some(id) = self.request_id {
            put_ascii_field(out, key!("request_id"), id.as_bytes());
        }
        let trace_id = self.traceparent.and_then(|tp| tp.as_bytes().get(3..35));
        if let Some(id) = trace_id {
            put_ascii_field(out, key!("trace_id"), id);
        }
        if let Some(ip) = self.client_ip {
            let mut text = [0; crate::text::IP_LEN];
            put_own_field(out, key!("client_ip"), crate::text::ip(ip, &mut text));
        }
        // A method is a token (RFC 9110 §9.1): nothing to escape.
        put_own_field(out, key!("method"), self.method.as_str().as_bytes());
        if let Some(host) = self.host {
            put_field(out, key!("host"), host);
        }
        put_field(out, key!("path"), self.path);
        if let Some(route) = self.route {
            put_field(out, key!("route"), route);
        }
        if let Some(upstream) = self.upstream {
            put_field(out, key!("upstream"), upstream);
        }
        if let Some(replica) = self.replica {
            let mut text = [0; crate::text::SOCKET_LEN];
            put_own_field(
                out,
                key!("replica"),
                crate::text::socket(replica, &mut text),
            );
        }
        // 0: the client left before an answer; logged as nginx does, 499.
        let status = match self.status {
            0 => CLIENT_CLOSED_STATUS,
            s => s,
        };
        put_number(out, key!("status"), status as u64);
        put_number(out, key!("bytes_in"), self.bytes_in as u64);
        put_number(out, key!("bytes_out"), self.bytes_out as u64);
        put_millis(out, key!("duration_ms"), self.duration);
        if let Some(took) = self.upstream_duration {
            put_millis(out, key!("upstream_ms"), took);
        }
        if let Some(user) = self.user {
            put_field(out, key!("user"), user);
        }
        if let Some(decision) = self.rate_limit {
            put_own_field(out, key!("rate_limit"), decision.as_bytes());
        }
        if let Some(tls) = self.tls {
            put_own_field(out, key!("tls"), tls.as_bytes());
        }
        if let Some(code) = self.grpc_status {
            put_own_field(out, key!("grpc_status"), code.as_bytes());
        }
        out.extend_from_slice(b"}\n");
    }
}

/// `,"key":"value"`.
fn put_field(out: &mut Vec<u8>, key: &[u8], value: &str) {
    out.extend_from_slice(key);
    put_text(out, value.as_bytes());
}

/// `,"key":"value"` for text the gateway made itself (addresses, a method, its own words, a
/// TLS version): nothing in it needs escaping, so it is not checked.
fn put_own_field(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(key);
    out.push(b'"');
    out.extend_from_slice(value);
    out.push(b'"');
}

/// `,"key":"value"` for a header's bytes; left out, as `HeaderValue::to_str` would refuse it,
/// when they are not ASCII (checked a word at a time, where `to_str` goes byte by byte).
fn put_ascii_field(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    if value.is_ascii() {
        out.extend_from_slice(key);
        put_text(out, value);
    }
}

/// A JSON string of UTF-8 `bytes`: copied as they are when nothing in them needs escaping
/// (ids, addresses, most paths), else escaped by `serde_json`.
pub(crate) fn put_text(out: &mut Vec<u8>, bytes: &[u8]) {
    if !needs_escaping(bytes) {
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let escaped = std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| serde_json::to_writer(&mut *out, text).ok());
    if escaped.is_none() {
        // Not reached (the bytes are UTF-8 and a Vec takes any write); the line stays valid.
        out.extend_from_slice(b"\"\"");
    }
}

/// Whether `bytes` holds a control character, `"`, `\` or DEL. Eight bytes at a time: run
/// byte by byte over every value of every line, this check was most of the writer's cost.
fn needs_escaping(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Some byte of `word` is below `n` (n <= 0x80): the classic borrow test, exact as an
    // "any" answer.
    let any_below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let any_equal = |word: u64, b: u8| any_below(word ^ (ONES * u64::from(b)), 1);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_ne_bytes(word);
        if any_below(word, 0x20)
            | any_equal(word, b'"')
            | any_equal(word, b'\\')
            | any_equal(word, 0x7f)
            != 0
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
}

/// `,"key":N`.
fn put_number(out: &mut Vec<u8>, key: &[u8], value: u64) {
    out.extend_from_slice(key);
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// `,"key":M.mmm`: a duration in milliseconds with microsecond digits.
fn put_millis(out: &mut Vec<u8>, key: &[u8], took: Duration) {
    let micros = took.as_micros().min(u64::MAX as u128) as u64;
    put_number(out, key, micros / 1000);
    let fraction = micros % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ]);
}

/// The access log's status for a request whose client left before it was answered (nginx's).
pub const CLIENT_CLOSED_STATUS: u16 = 499;

/// RFC 3339 UTC with milliseconds, written digit by digit (cheaper than `format!` on the
/// writer thread; `bench/README.md`).
fn format_time(since_epoch: Duration) -> [u8; 24] {
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
    out
}

/// How often the writer takes the waiting lines.
const WRITE_INTERVAL: Duration = Duration::from_millis(20);

/// A batch buffer larger than this, grown by a burst, is let go once written.
const RETAINED_BATCH: usize = 4 << 20;

thread_local! {
    /// The line being formatted, per worker thread; it keeps its capacity between requests.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Formatted lines, one after the other, and how many there are.
#[derive(Default)]
struct Lines {
    bytes: Vec<u8>,
    count: usize,
}

/// Lines waiting for the writer, shared with its thread.
struct Batch {
    lines: Mutex<Lines>,
    /// Set when the log is dropped (a reload without it, or with another one): the writer
    /// writes what is left and ends.
    closed: AtomicBool,
}

/// A running access log.
pub struct AccessLog {
    /// What it was built from; an unchanged configuration keeps the same writer on reload.
    pub spec: AccessLogConfig,
    batch: Arc<Batch>,
    capacity: usize,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Log 1 request in `every` (1: all).
    every: u64,
    counter: AtomicU64,
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
        let batch = Arc::new(Batch {
            lines: Mutex::new(Lines::default()),
            closed: AtomicBool::new(false),
        });
        let shared = batch.clone();
        let writer = std::thread::Builder::new()
            .name("gateway-access-log".into())
            .spawn(move || write_batches(&shared, out))
            .map_err(|e| format!("access log thread: {e}"))?;
        Ok(Arc::new(AccessLog {
            spec: cfg.clone(),
            batch,
            capacity: cfg.queue.max(1),
            writer: Mutex::new(Some(writer)),
            every: (1.0 / cfg.sample).round().max(1.0) as u64,
            counter: AtomicU64::new(0),
            dropped: crate::metrics::METRICS.access_log_dropped.clone(),
        }))
    }

    /// Whether the next request is to be logged (sampling).
    pub fn wants(&self) -> bool {
        self.every == 1
            || self
                .counter
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(self.every)
    }

    /// Formats the record's line and adds it to the batch; never waits for the writer.
    pub fn log(&self, record: &AccessRecord) {
        LINE.with(|line| {
            // Not re-entered: nothing in formatting logs.
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            record.write_line(&mut line);
            let mut lines = self
                .batch
                .lines
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if lines.count < self.capacity {
                lines.bytes.extend_from_slice(&line);
                lines.count += 1;
                prefetch_spare(&lines.bytes, line.len());
            } else {
                drop(lines);
                self.dropped.inc();
            }
        });
    }

    /// At shutdown: has the writer write what is waiting and end, waiting at most `limit`
    /// (an output that does not drain, such as a stuck pipe, must not hold up the exit).
    pub fn finish(&self, limit: Duration) {
        self.close();
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let deadline = std::time::Instant::now() + limit;
            while !writer.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn close(&self) {
        self.batch.closed.store(true, Ordering::Release);
        if let Some(writer) = &*self.writer.lock().unwrap_or_else(PoisonError::into_inner) {
            writer.thread().unpark();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Asks the CPU to bring the batch's next `ahead` bytes into its cache, without waiting: the
/// next line is copied there a request later. Each line lands on memory the thread has not
/// touched since the batch was last written, tens of milliseconds earlier, and releasing the
/// batch's lock waits for those stores (the prefetch row of `bench/README.md`).
#[inline]
fn prefetch_spare(bytes: &Vec<u8>, ahead: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let spare = bytes.capacity() - bytes.len();
        let next = bytes.as_ptr().wrapping_add(bytes.len());
        for offset in (0..ahead.min(spare)).step_by(64) {
            // SAFETY: a prefetch is a hint: it reads nothing into the program and cannot fault,
            // whatever the address; this one is inside the vector's allocation.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(offset).cast()) };
        }
    }
}

/// The writer thread: every [`WRITE_INTERVAL`], swaps the batch for its spare (empty, with the
/// capacity it had) and writes the lines in one go.
fn write_batches(batch: &Batch, mut out: Box<dyn Write + Send>) {
    let mut taken = Lines::default();
    loop {
        std::thread::park_timeout(WRITE_INTERVAL);
        let closed = batch.closed.load(Ordering::Acquire);
        std::mem::swap(
            &mut *batch.lines.lock().unwrap_or_else(PoisonError::into_inner),
            &mut taken,
        );
        if !taken.bytes.is_empty() {
            let _ = out.write_all(&taken.bytes);
            let _ = out.flush();
        }
        taken.bytes.clear();
        taken.count = 0;
        // A burst's buffer is not kept for ever.
        if taken.bytes.capacity() > RETAINED_BATCH {
            taken.bytes = Vec::new();
        }
        if closed {
            return;
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

    fn record(path: &str) -> AccessRecord<'_> {
        AccessRecord {
            time: SystemTime::now(),
            request_id: None,
            traceparent: None,
            client_ip: Some(IpAddr::from([127, 0, 0, 1])),
            method: &Method::GET,
            host: Some("a.test"),
            path,
            route: None,
            upstream: None,
            replica: None,
            status: 200,
            bytes_in: 0,
            bytes_out: 2,
            duration: Duration::from_micros(1500),
            upstream_duration: None,
            user: None,
            rate_limit: None,
            grpc_status: None,
            tls: None,
        }
    }

    fn lines_of(path: &std::path::Path, at_least: usize) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= at_least || std::time::Instant::now() > deadline {
                return text
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("a JSON line"))
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn batches_are_written_whole_and_an_overflow_is_counted() {
        let dir = std::env::temp_dir().join(format!("gw-access-batch-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let cfg = AccessLogConfig {
            path: dir.to_string_lossy().into_owned(),
            sample: 1.0,
            queue: 8,
        };
        let log = AccessLog::start(&cfg).unwrap();
        let dropped_before = crate::metrics::METRICS.access_log_dropped.get();
        // Far more than the batch holds between two writes: the rest are dropped and counted.
        for i in 0..2000 {
            log.log(&record(&format!("/burst/{i}")));
        }
        let dropped = crate::metrics::METRICS.access_log_dropped.get() - dropped_before;
        assert!(dropped > 0, "nothing was dropped");
        // Records already taken are written even when the log goes away at once.
        drop(log);
        let lines = lines_of(&dir, (2000 - dropped) as usize);
        assert_eq!(lines.len() as u64, 2000 - dropped);
        assert_eq!(lines[0]["path"], "/burst/0");
        assert_eq!(lines[0]["client_ip"], "127.0.0.1");
        assert_eq!(lines[0]["duration_ms"], 1.5);
        let _ = std::fs::remove_file(dir);
    }

    #[test]
    fn the_escaping_check_sees_every_byte_at_every_position() {
        let naive = |bytes: &[u8]| {
            bytes
                .iter()
                .any(|&b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
        };
        for len in 1..=24 {
            for at in 0..len {
                for byte in 0..=255u8 {
                    let mut text = vec![b'a'; len];
                    text[at] = byte;
                    assert_eq!(
                        needs_escaping(&text),
                        naive(&text),
                        "{byte:#x} at {at} of {len}"
                    );
                    // A second, plain non-ASCII byte beside it changes nothing.
                    text[(at + 1) % len] = 0xc3;
                    assert_eq!(
                        needs_escaping(&text),
                        naive(&text),
                        "{byte:#x} at {at} of {len}"
                    );
                }
            }
        }
        assert!(!needs_escaping(b""));
    }

    #[test]
    fn lines_are_json_whatever_the_text() {
        let mut r = record("/a\"b\\c\u{1}d/é");
        r.host = Some("h\nost");
        r.user = Some("user \"quoted\"");
        let request_id = HeaderValue::from_static("id-1");
        r.request_id = Some(&request_id);
        r.route = Some("all");
        r.upstream = Some("b");
        r.replica = Some("[::1]:8080".parse().unwrap());
        r.upstream_duration = Some(Duration::from_micros(12_345_678));
        r.rate_limit = Some("allowed");
        r.tls = Some("TLSv1.3");
        let mut out = Vec::new();
        r.write_line(&mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).expect("a JSON line");
        assert_eq!(v["path"], "/a\"b\\c\u{1}d/é");
        assert_eq!(v["host"], "h\nost");
        assert_eq!(v["user"], "user \"quoted\"");
        assert_eq!(v["request_id"], "id-1");
        assert_eq!(v["replica"], "[::1]:8080");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_out"], 2);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["upstream_ms"], 12345.678);
        assert_eq!(v["rate_limit"], "allowed");
        assert_eq!(v["tls"], "TLSv1.3");
        assert_eq!(v.as_object().unwrap().len(), 17);
        let traceparent =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        r.traceparent = Some(&traceparent);
        out.clear();
        r.write_line(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("a JSON line");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        // Header bytes that are not ASCII are left out; a quote is escaped.
        let request_id = HeaderValue::from_bytes(b"id-\xff").unwrap();
        r.request_id = Some(&request_id);
        let traceparent =
            HeaderValue::from_static("00-4bf92f3577b34da6\"3ce929d0e0e4736-00f067aa0ba902b7-01");
        r.traceparent = Some(&traceparent);
        out.clear();
        r.write_line(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("a JSON line");
        assert!(v.get("request_id").is_none());
        assert_eq!(v["trace_id"], "4bf92f3577b34da6\"3ce929d0e0e4736");
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(
            &format_time(Duration::from_millis(0)),
            b"1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            &format_time(Duration::from_millis(1_795_651_200_123)),
            b"2026-11-26T00:00:00.123Z"
        );
        assert_eq!(
            &format_time(Duration::from_secs(951_782_400)),
            b"2000-02-29T00:00:00.000Z"
        );
    }
}
