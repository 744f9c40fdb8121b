//! Test harness: real HTTP backends, a real DNS server, and the real `gateway` binary, all on
//! 127.0.0.x with ports chosen by the kernel. Everything stops when its handle is dropped.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;

/// A port that refuses connections for as long as the value lives: bound but never listening,
/// so no other test can take it and turn a "dead" upstream into a live one.
pub struct DeadPort {
    _socket: tokio::net::TcpSocket,
    /// The reserved port on 127.0.0.1.
    pub port: u16,
}

impl DeadPort {
    /// Reserves a port on 127.0.0.1 that refuses every connection.
    pub fn reserve() -> DeadPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        DeadPort {
            _socket: socket,
            port,
        }
    }
}

/// An upstream that hangs: takes connections on 127.0.0.1 and neither answers nor closes them,
/// for as long as the value lives.
pub struct SilentPort {
    pub addr: SocketAddr,
    holder: tokio::task::JoinHandle<()>,
}

impl SilentPort {
    pub async fn start() -> SilentPort {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        SilentPort { addr, holder }
    }
}

impl Drop for SilentPort {
    fn drop(&mut self) {
        self.holder.abort();
    }
}

/// A port free on `ip` now, for a server the test starts next. Chosen below Linux's ephemeral
/// range (32768 and up), where the outgoing connections of tests running in parallel take
/// their ports: a port from `bind(0)` could be taken by one of those before the server binds.
/// Never the same port twice in one test process: two calls in a row (a gateway's listener
/// and its admin port) could otherwise draw the same free port.
pub fn free_port(ip: &str) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let port = fastrand::u16(20_000..32_000);
        if !handed_out.contains(&port) && std::net::TcpListener::bind((ip, port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A reqwest client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

struct BackendState {
    name: String,
    hits: AtomicUsize,
    connections: AtomicUsize,
    health: AtomicU16,
}

/// An HTTP/1.1 + h2c backend that describes each request it gets as JSON:
/// `{"backend", "method", "path", "query", "headers", "body_len"}`.
/// `GET /health` answers with the status set by [`Backend::set_health`];
/// `?sleep=MS` delays the answer; `GET /bytes?n=N` streams N bytes.
pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    tasks: Option<JoinSet<()>>,
}

impl Backend {
    /// Starts a backend on `ip` with a kernel-chosen port.
    pub async fn start(ip: &str, name: &str) -> Backend {
        Self::start_on(SocketAddr::new(ip.parse().unwrap(), 0), name).await
    }

    /// Starts a backend on an exact address (to bring a replica back on its old port).
    pub async fn start_on(addr: SocketAddr, name: &str) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState {
            name: name.to_string(),
            hits: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            health: AtomicU16::new(200),
        });
        let mut tasks = JoinSet::new();
        let st = state.clone();
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let conns2 = conns.clone();
        tasks.spawn(async move {
            let conns = conns2;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                let counted = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    // Connections are counted when they carry a request other than a health check.
                    if req.uri().path() != "/health" && !counted.swap(true, Ordering::SeqCst) {
                        st.connections.fetch_add(1, Ordering::SeqCst);
                    }
                    handle(st.clone(), req)
                });
                conns.lock().unwrap().spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        // Aborting `tasks` drops the accept loop, which drops (and so aborts) every connection.
        Backend {
            addr,
            state,
            tasks: Some(tasks),
        }
    }

    /// Requests served (health checks excluded).
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Connections that carried at least one request other than `/health`.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The status `/health` answers with.
    pub fn set_health(&self, status: u16) {
        self.state.health.store(status, Ordering::SeqCst);
    }

    /// Kills the backend: the listener and every open connection close at once.
    pub fn kill(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.abort_all();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn handle(
    st: Arc<BackendState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    if req.uri().path() == "/health" {
        let code = st.health.load(Ordering::SeqCst);
        return Ok(Response::builder()
            .status(code)
            .body(full("health"))
            .unwrap());
    }
    st.hits.fetch_add(1, Ordering::SeqCst);
    if let Some(ms) = query.get("sleep").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if req.uri().path() == "/bytes" {
        let n: usize = query.get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let take = left.min(chunk.len());
                Some((
                    Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take))),
                    left - take,
                ))
            }
        });
        return Ok(Response::builder()
            .header("content-length", n.to_string())
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap());
    }
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let path = req.uri().path().to_string();
    let q = req.uri().query().unwrap_or("").to_string();
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_string(), v.into());
            }
        }
    }
    // Count the body without keeping it.
    let mut body = req.into_body();
    let mut body_len = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_len += f.data_ref().map_or(0, |d| d.len()),
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    let out = serde_json::json!({
        "backend": st.name, "method": method, "path": path, "query": q,
        "headers": headers, "body_len": body_len, "version": version,
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(full(out.to_string()))
        .unwrap())
}

/// A WebSocket echo server.
pub async fn ws_echo(ip: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, h)
}

/// What the test DNS server answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DnsMode {
    /// Answer from the table.
    Normal,
    /// SERVFAIL for everything.
    ServFail,
    /// Bytes that are not DNS.
    Garbage,
    /// No answer at all.
    Silent,
}

/// A DNS server on 127.0.0.1 that answers A queries from a table the test edits.
pub struct Dns {
    pub addr: SocketAddr,
    records: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    mode: Arc<Mutex<DnsMode>>,
    pub queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    pub async fn start() -> Dns {
        use hickory_proto::op::{Message, MessageType, ResponseCode};
        use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let records: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::default();
        let mode = Arc::new(Mutex::new(DnsMode::Normal));
        let queries = Arc::new(AtomicUsize::new(0));
        let (r, m, q) = (records.clone(), mode.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, src)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                q.fetch_add(1, Ordering::SeqCst);
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mode = *m.lock().unwrap();
                let reply = match mode {
                    DnsMode::Silent => continue,
                    DnsMode::Garbage => vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3],
                    DnsMode::ServFail | DnsMode::Normal => {
                        let mut resp = Message::new();
                        resp.set_id(req.id())
                            .set_message_type(MessageType::Response)
                            .set_op_code(req.op_code())
                            .set_recursion_desired(req.recursion_desired())
                            .set_recursion_available(true)
                            .add_queries(req.queries().to_vec());
                        if mode == DnsMode::ServFail {
                            resp.set_response_code(ResponseCode::ServFail);
                        } else {
                            let table = r.lock().unwrap();
                            let mut known = false;
                            for query in req.queries() {
                                let name =
                                    query.name().to_ascii().trim_end_matches('.').to_lowercase();
                                if let Some(ips) = table.get(&name) {
                                    known = true;
                                    if query.query_type() == RecordType::A {
                                        for ip in ips {
                                            resp.add_answer(Record::from_rdata(
                                                query.name().clone(),
                                                600,
                                                RData::A(A(*ip)),
                                            ));
                                        }
                                    }
                                }
                            }
                            if !known {
                                resp.set_response_code(ResponseCode::NXDomain);
                            }
                        }
                        match resp.to_vec() {
                            Ok(v) => v,
                            Err(_) => continue,
                        }
                    }
                };
                let _ = sock.send_to(&reply, src).await;
            }
        });
        Dns {
            addr,
            records,
            mode,
            queries,
            task,
        }
    }

    /// Sets the A records of `name`.
    pub fn set(&self, name: &str, ips: &[&str]) {
        self.records.lock().unwrap().insert(
            name.to_string(),
            ips.iter().map(|s| s.parse().unwrap()).collect(),
        );
    }

    /// Removes `name` (NXDOMAIN from then on).
    pub fn remove(&self, name: &str) {
        self.records.lock().unwrap().remove(name);
    }

    pub fn set_mode(&self, mode: DnsMode) {
        *self.mode.lock().unwrap() = mode;
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running `gateway` process with its own temp directory, listener and admin ports.
pub struct Gateway {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    log_path: PathBuf,
    /// More listeners (YAML lines indented under `listeners:`), and settings of `http`.
    extra_listeners: String,
    http_settings: String,
}

/// The binary under test.
pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gateway")
}

impl Gateway {
    /// Starts the gateway with `body` appended to a header that sets `threads: 1`, the
    /// `http` listener, the admin listener, short shutdown times and fast reload polling.
    pub async fn start(body: &str) -> Gateway {
        Gateway::start_with("", "", body).await
    }

    /// Like [`Gateway::start`], with the full configuration text changed by `edit` first.
    pub async fn start_edited(body: &str, edit: impl Fn(String) -> String) -> Gateway {
        let mut gw = Gateway::new_in_tempdir("", "");
        gw.write_raw_config(&edit(gw.config_text(body)));
        gw.spawn();
        gw.wait_ready().await;
        gw
    }

    /// Like [`Gateway::start`], without waiting for `/ready`.
    pub fn start_unready(body: &str) -> Gateway {
        let mut gw = Gateway::new_in_tempdir("", "");
        gw.write_config(body);
        gw.spawn();
        gw
    }

    /// Like [`Gateway::start`], with `http_settings` added to the `http` listener (`, key:
    /// value` pairs) and `extra_listeners` (lines such as `  https: { ... }`) after it.
    pub async fn start_with(http_settings: &str, extra_listeners: &str, body: &str) -> Gateway {
        let mut gw = Gateway::new_in_tempdir(http_settings, extra_listeners);
        gw.write_config(body);
        gw.spawn();
        gw.wait_ready().await;
        gw
    }

    /// A gateway not yet started, with its files in a new temporary directory.
    fn new_in_tempdir(http_settings: &str, extra_listeners: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        let config_path = dir.path().join("gateway.yaml");
        let log_path = dir.path().join("gateway.log");
        Gateway {
            child: None,
            dir,
            http,
            admin,
            config_path,
            log_path,
            extra_listeners: extra_listeners.to_string(),
            http_settings: http_settings.to_string(),
        }
    }

    /// The full configuration text for `body`.
    pub fn config_text(&self, body: &str) -> String {
        format!(
            "threads: 1\nlisteners:\n  http: {{ address: \"{}\"{} }}\n{}admin: {{ address: \"{}\" }}\nshutdown: {{ grace_period: 1s, final_timeout: 1s }}\nreload: {{ debounce: 50ms, poll_interval: 200ms }}\n{}",
            self.http, self.http_settings, self.extra_listeners, self.admin, body
        )
    }

    /// Replaces the configuration file atomically (write + rename, as editors do).
    pub fn write_config(&self, body: &str) {
        self.write_raw_config(&self.config_text(body));
    }

    /// Replaces the configuration file with exactly `text`.
    pub fn write_raw_config(&self, text: &str) {
        let tmp = self.dir.path().join(".gateway.yaml.tmp");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log_path).unwrap();
        let child = Command::new(gateway_bin())
            .arg("-c")
            .arg(&self.config_path)
            .env("RUST_LOG", "info,gateway::provider=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until `/ready` answers 200: a runtime is loaded and the client listeners are
    /// bound (they are bound on their own thread; every test that sends a request at once
    /// relies on `/ready` saying so).
    pub async fn wait_ready(&self) {
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = c.get(format!("http://{}/ready", self.admin)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway not ready; log:\n{}", self.log());
    }

    /// `http://127.0.0.1:PORT{path}` on the client listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The first log line containing `text` (the test fails, showing the log, without one).
    pub fn log_line(&self, text: &str) -> String {
        let log = self.log();
        let line = log.lines().find(|l| l.contains(text));
        line.unwrap_or_else(|| panic!("no log line with {text:?}:\n{log}"))
            .to_string()
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one series of `/metrics` (its whole name with labels in Prometheus'
    /// order), 0 when it is not exported.
    pub async fn metric(&self, series: &str) -> f64 {
        self.exported(series).await.unwrap_or(0.0)
    }

    /// The value of one series of `/metrics`, `None` when it is not exported (for a check
    /// that a series reads 0, which [`Gateway::metric`] could not tell from a missing one).
    pub async fn exported(&self, series: &str) -> Option<f64> {
        self.metrics().await.lines().find_map(|l| {
            l.strip_prefix(series)
                .filter(|v| v.starts_with(' '))
                .map(|v| v.trim().parse().unwrap())
        })
    }

    /// The configuration generation `/ready` reports.
    pub async fn generation(&self) -> u64 {
        self.admin_json("/ready").await["config_generation"]
            .as_u64()
            .unwrap()
    }

    /// The JSON an admin endpoint (`/ready`, `/routes`, `/upstreams`) answers.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        client()
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the generation reaches `n`.
    pub async fn wait_generation(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.generation().await >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("generation {n} not reached; log:\n{}", self.log());
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The JSON a backend answered with.
pub async fn echo(resp: reqwest::Response) -> serde_json::Value {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "status {status}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// Sends raw bytes on a new connection and returns whatever comes back before the peer
/// closes or `wait` passes.
pub async fn raw_request(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads from an open connection until what came contains `needle` (the test backend echoes
/// the path in its JSON body) and returns it all; panics when the connection closes first or
/// `limit` passes.
pub async fn read_until_contains(
    s: &mut tokio::net::TcpStream,
    needle: &str,
    limit: Duration,
) -> String {
    use tokio::io::AsyncReadExt;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    while !text.contains(needle) {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in time, got {text:?}"))
            .unwrap_or(0);
        assert!(n > 0, "closed before {needle:?}, after {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text
}

/// A configuration with one upstream `b` (the one `backend`) and one route `r` to it, after the
/// top-level lines in `extra` (each ending in a newline).
pub fn one_route_to(backend: &Backend, extra: &str) -> String {
    one_route_to_addr(backend.addr, extra)
}

/// [`one_route_to`] for an upstream known by its address only.
pub fn one_route_to_addr(addr: SocketAddr, extra: &str) -> String {
    format!(
        "{extra}upstreams: {{ b: {{ targets: [\"{addr}\"] }} }}\nroutes: [ {{ name: r, upstream: b }} ]\n"
    )
}

/// An IP on loopback other than 127.0.0.1, so that replicas have distinct addresses.
pub fn loopback(n: u8) -> String {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)).to_string()
}

/// A plain `200 OK` answer for [`recording_upstream`].
pub const OK_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// A raw upstream that answers every request head at once with `answer` (after reading any
/// `Content-Length` body, or a chunked body up to its last chunk) and records each head whole,
/// exactly as the gateway sent it.
pub async fn recording_upstream(
    answer: &'static [u8],
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut chunk).await {
                            Ok(n) if n > 0 => {
                                buf.extend_from_slice(&chunk[..n]);
                                continue;
                            }
                            _ => return,
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    record.lock().unwrap().push(head.clone());
                    buf.drain(..end + 4);
                    let lower = head.to_ascii_lowercase();
                    if lower.contains("transfer-encoding: chunked") {
                        // Until the last chunk (a well-formed body ends with 0\r\n\r\n).
                        while !buf.windows(5).any(|w| w == b"0\r\n\r\n") {
                            match conn.read(&mut chunk).await {
                                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                        }
                        let at = buf.windows(5).position(|w| w == b"0\r\n\r\n").unwrap();
                        buf.drain(..at + 5);
                    } else if let Some(len) = lower
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                    {
                        while buf.len() < len {
                            match conn.read(&mut chunk).await {
                                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                        }
                        buf.drain(..len);
                    }
                    if conn.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Makes a leaf certificate (and the shared CA) with `gateway certs`.
pub fn certs(dir: &Path, names: &[&str]) {
    let out = Command::new(gateway_bin())
        .arg("certs")
        .arg("--dir")
        .arg(dir)
        .args(names)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TLS listener `name` on a free loopback port serving the certificates `leaves` (as made by
/// [`certs`] in `dir`), with more `tls` settings in `extra` (`, key: value` pairs): its
/// address, and its line for `listeners:`.
pub fn tls_listener(name: &str, dir: &Path, leaves: &[&str], extra: &str) -> (SocketAddr, String) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let certificates: Vec<String> = leaves
        .iter()
        .map(|leaf| {
            let d = dir.display();
            format!("{{ cert: \"{d}/{leaf}.pem\", key: \"{d}/{leaf}-key.pem\" }}")
        })
        .collect();
    let line = format!(
        "  {name}: {{ address: \"{addr}\", tls: {{ certificates: [ {} ]{extra} }} }}\n",
        certificates.join(", ")
    );
    (addr, line)
}

/// The crypto provider the tests' TLS clients use.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client's certificate check that accepts any certificate: to see which one is served.
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS handshake with `addr` for `sni`, offering `alpn`, that accepts any certificate; the
/// leaf served is the stream's `peer_certificates()[0]`.
pub async fn unverified_handshake(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// The leaf certificate served on `addr` for `sni`, parsed.
pub async fn served_leaf(
    addr: SocketAddr,
    sni: &str,
) -> rustls::pki_types::CertificateDer<'static> {
    let tls = unverified_handshake(addr, sni, &[]).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// The DNS names of the certificate served on `addr` for `sni`.
pub async fn served_names(addr: SocketAddr, sni: &str) -> Vec<String> {
    let der = served_leaf(addr, sni).await;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}
