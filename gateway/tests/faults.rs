//! Upstream faults against the real gateway: replicas that hang, answer slowly, reset
//! connections, close pooled keep-alive connections, or die under load, and a configuration
//! file that disappears. Every test is bounded in time.

mod common;

use common::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How a [`Faulty`] upstream treats each request it reads.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Answers 200 at once.
    Healthy,
    /// Reads the request, never answers, holds the connection.
    Hang,
    /// Answers after this many milliseconds.
    Slow(u64),
    /// Reads the request, then resets the connection (RST, no answer).
    Reset,
    /// Answers with keep-alive, then closes the connection once it has been idle this many
    /// milliseconds (a server whose keep-alive timeout is shorter than the gateway's).
    CloseIdle(u64),
}

/// A raw HTTP/1.1 upstream that misbehaves on purpose and records the `X-Id` of every request
/// it reads (so a test can tell whether anything was sent twice).
struct Faulty {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Faulty {
    async fn start(ip: &str, port: u16, fault: Fault, name: &'static str) -> Faulty {
        let listener = TcpListener::bind((ip, port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (s, c) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            let mut stopped_accept = stopped.clone();
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = stopped_accept.changed() => return,
                };
                let Ok((conn, _)) = conn else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let (s, mut stopped) = (s.clone(), stopped.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(conn, fault, name, s) => {}
                        // Killed: every connection is dropped where it stands.
                        _ = stopped.changed() => {}
                    }
                });
            }
        });
        Faulty {
            addr,
            seen,
            connections,
            stop,
        }
    }

    /// The process dies: listener and every connection gone at once.
    fn kill(&self) {
        let _ = self.stop.send(true);
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// How many times each request id reached any of `replicas`.
fn times_seen(replicas: &[&Faulty]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for id in replicas.iter().flat_map(|r| r.seen()) {
        *seen.entry(id).or_default() += 1;
    }
    seen
}

async fn serve(mut conn: TcpStream, fault: Fault, name: &str, seen: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    loop {
        let idle_limit = match fault {
            Fault::CloseIdle(ms) => Duration::from_millis(ms),
            _ => Duration::from_secs(3600),
        };
        // Read one head (and its Content-Length body).
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            let read = tokio::time::timeout(idle_limit, conn.read(&mut chunk)).await;
            match read {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                // Idle too long (CloseIdle), or the peer went away.
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let body_len: usize = field("content-length:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        buf.drain(..head_end + body_len);
        seen.lock()
            .unwrap()
            .push(field("x-id:").unwrap_or_default());
        match fault {
            Fault::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            Fault::Reset => {
                #[allow(deprecated)] // A reset is the point here.
                let _ = conn.set_linger(Some(Duration::ZERO));
                return;
            }
            Fault::Slow(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Fault::Healthy | Fault::CloseIdle(_) => {}
        }
        let body = format!("{{\"backend\":\"{name}\"}}");
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Gateway configuration with one upstream of `targets` on route `/`.
fn single_upstream(targets: &[SocketAddr], extra: &str, route_extra: &str) -> String {
    let list: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "upstreams:\n  u: {{ targets: [{}], balance: round_robin{extra} }}\nroutes:\n  - {{ name: r, upstream: u{route_extra} }}\n",
        list.join(", ")
    )
}

async fn backend_of(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let name = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["backend"].as_str().map(str::to_string))
        .unwrap_or(text);
    (status, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_replica_costs_its_timeout_and_blocks_no_one_else() {
    let hang = Faulty::start("127.0.0.1", 0, Fault::Hang, "hang").await;
    let good = Faulty::start("127.0.0.1", 0, Fault::Healthy, "good").await;
    let other = Backend::start("127.0.0.1", "other").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  mixed: {{ targets: ["{}", "{}"], balance: round_robin, timeouts: {{ read: 300ms }} }}
  hang:  {{ targets: ["{}"], timeouts: {{ read: 2s }} }}
  other: {{ targets: ["{}"] }}
routes:
  - {{ name: mixed, upstream: mixed, match: {{ path_prefix: /mixed }} }}
  - {{ name: hang, upstream: hang, match: {{ path_prefix: /hang }} }}
  - {{ name: other, upstream: other }}
"#,
        hang.addr, good.addr, hang.addr, other.addr
    ))
    .await;
    let c = client();

    // Ten requests stuck on the hanging upstream at once, while another route is used.
    let started = Instant::now();
    let stuck: Vec<_> = (0..10)
        .map(|i| {
            let (c, url) = (c.clone(), gw.url(&format!("/hang/{i}")));
            tokio::spawn(async move { c.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    for _ in 0..20 {
        let t = Instant::now();
        let r = c.get(gw.url("/elsewhere")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        // Far below the hanging route's 2 s timeout: nothing waits behind it.
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "another route waited {:?} behind the hanging one",
            t.elapsed()
        );
    }
    for s in stuck {
        assert_eq!(s.await.unwrap(), 504);
    }
    // Each stuck request costs its timeout, not more.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );

    // GET on an upstream with one hanging replica: the timeout is retried on the other one.
    for i in 0..6 {
        let r = c
            .get(gw.url("/mixed/get"))
            .header("x-id", format!("get-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(backend_of(r).await, (200, "good".to_string()));
    }
    // POST is not retried after it was sent: a timeout is a 504, and the request reached
    // exactly one replica exactly once.
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = format!("post-{i}");
        let r = c
            .post(gw.url("/mixed/post"))
            .header("x-id", &id)
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert!(matches!(status, 200 | 504), "POST: {status}");
        ids.push(id);
    }
    let seen = times_seen(&[&hang, &good]);
    for id in ids {
        assert_eq!(
            seen.get(&id),
            Some(&1),
            "{id} was sent {:?} times",
            seen.get(&id)
        );
    }
}

/// A client that leaves while its request waits on the upstream frees that upstream connection
/// at once, not at the answer or the read timeout, and its leaving is no error for an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_upstream_connection_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                // Reads the request, never answers, and notes when the gateway lets go.
                let mut buf = [0u8; 4096];
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                let _ = closed.send(Instant::now());
            });
        }
    });
    let gw = Gateway::start(&single_upstream(
        &[upstream],
        ", timeouts: { read: 30s }",
        "",
    ))
    .await;

    for path in ["/first", "/second"] {
        let mut client = TcpStream::connect(gw.http).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left = Instant::now();
        drop(client);
        let closed = tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
            .await
            .expect("the upstream connection outlived its client by 5 s")
            .unwrap();
        assert!(
            closed.duration_since(left) < Duration::from_secs(2),
            "{path}: the upstream connection was closed {:?} after the client left",
            closed.duration_since(left)
        );
    }
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}

/// A route's own read timeout is the one its requests wait for, and a route without one keeps
/// its upstream's, on the same upstream (the peer copied with the route's settings, and the
/// replica's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_own_timeout_is_used_and_its_neighbours_keep_the_upstreams() {
    let slow = Backend::start("127.0.0.1", "slow").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  slow: {{ targets: ["{}"], timeouts: {{ read: 5s }} }}
routes:
  - {{ name: short, upstream: slow, match: {{ path_prefix: /short }}, timeouts: {{ read: 300ms }} }}
  - {{ name: plain, upstream: slow }}
"#,
        slow.addr
    ))
    .await;
    let c = client();
    // Answers after 1 s: past the route's 300 ms, within the upstream's 5 s.
    for _ in 0..2 {
        let r = c.get(gw.url("/short/a?sleep=1000")).send().await.unwrap();
        assert_eq!(r.status(), 504);
        let r = c.get(gw.url("/plain/a?sleep=1000")).send().await.unwrap();
        assert_eq!(backend_of(r).await, (200, "slow".to_string()));
    }
}

/// A raw upstream that answers every request with keep-alive and notes, per connection, when the
/// gateway closed it. With `half_close_after`, it shuts its own side of a connection once it has
/// been idle that long and keeps reading, so the gateway's close of an idle connection the
/// upstream ended shows too.
struct KeepAliveUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: tokio::sync::mpsc::UnboundedReceiver<Instant>,
}

impl KeepAliveUpstream {
    async fn start(half_close_after: Option<Duration>) -> KeepAliveUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, closed) = tokio::sync::mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(Self::serve(conn, half_close_after, tx.clone()));
            }
        });
        KeepAliveUpstream {
            addr,
            accepted,
            closed,
        }
    }

    async fn serve(
        mut conn: TcpStream,
        half_close_after: Option<Duration>,
        closed: tokio::sync::mpsc::UnboundedSender<Instant>,
    ) {
        let mut buf = [0u8; 4096];
        loop {
            let read = match half_close_after {
                Some(idle) => tokio::time::timeout(idle, conn.read(&mut buf)).await,
                None => Ok(conn.read(&mut buf).await),
            };
            match read {
                Ok(Ok(n)) if n > 0 => {
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if conn.write_all(answer).await.is_err() {
                        break;
                    }
                }
                Ok(_) => break,
                // Idle for `half_close_after`: end this side, then wait for the gateway's close.
                Err(_) => {
                    let _ = conn.shutdown().await;
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                    break;
                }
            }
        }
        let _ = closed.send(Instant::now());
    }

    /// When the gateway closed its next connection; fails the test with `what` after 5 s.
    async fn next_close(&mut self, what: &str) -> Instant {
        tokio::time::timeout(Duration::from_secs(5), self.closed.recv())
            .await
            .expect(what)
            .unwrap()
    }
}

/// Kept upstream connections are reused, closed by the gateway at their idle timeout, and let
/// go soon after the upstream ends them (within the idle list's one-second sweep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_reused_and_closed_when_idle_or_ended() {
    let c = client();
    // Idle timeout: five requests in a row share one connection, which is closed about 400 ms
    // after the last answer, without a next use.
    let mut up = KeepAliveUpstream::start(None).await;
    let gw = Gateway::start(&single_upstream(
        &[up.addr],
        ", timeouts: { idle: 400ms }",
        "",
    ))
    .await;
    for _ in 0..5 {
        let r = c.get(gw.url("/ka")).send().await.unwrap();
        assert_eq!(
            (r.status().as_u16(), r.text().await.unwrap()),
            (200, "ok".into())
        );
    }
    let answered = Instant::now();
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "the connection was not reused"
    );
    let closed = up
        .next_close("the idle connection outlived its 400 ms idle timeout by 5 s")
        .await;
    // The lower bound leaves room for the test's own lag in reading the last answer.
    let idle = closed.duration_since(answered);
    assert!(
        idle >= Duration::from_millis(200) && idle < Duration::from_millis(2500),
        "closed after {idle:?} idle (timeout 400 ms, swept every second)"
    );
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
    drop(gw);

    // The upstream ends an idle connection (a FIN after 200 ms, a keep-alive timeout shorter
    // than the gateway's): the gateway closes its side within the sweep, not at its own 4 s idle
    // timeout, and the next request opens a new connection and is answered.
    let mut up = KeepAliveUpstream::start(Some(Duration::from_millis(200))).await;
    let gw = Gateway::start(&single_upstream(&[up.addr], "", "")).await;
    let r = c.get(gw.url("/ka")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answered = Instant::now();
    let closed = up
        .next_close("a connection the upstream ended was held 5 s")
        .await;
    let held = closed.duration_since(answered);
    assert!(
        held < Duration::from_millis(2500),
        "held {held:?} after the answer"
    );
    let r = c.get(gw.url("/ka")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (200, "ok".into())
    );
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_resetting_and_idle_closing_replicas() {
    // Slow but within the timeout: answered.
    let slow = Faulty::start("127.0.0.1", 0, Fault::Slow(300), "slow").await;
    let gw = Gateway::start(&single_upstream(
        &[slow.addr],
        ", timeouts: { read: 2s }",
        "",
    ))
    .await;
    let r = client().get(gw.url("/slow")).send().await.unwrap();
    assert_eq!(backend_of(r).await, (200, "slow".to_string()));
    drop(gw);

    // A replica that resets every connection, beside a healthy one: GETs are retried and all
    // succeed; a POST that was sent to the resetting one is a 502 and not resent.
    let reset = Faulty::start("127.0.0.1", 0, Fault::Reset, "reset").await;
    let good = Faulty::start("127.0.0.1", 0, Fault::Healthy, "good").await;
    let gw = Gateway::start(&single_upstream(
        &[reset.addr, good.addr],
        ", health: { passive: { max_fails: 1000, fail_timeout: 1s } }",
        "",
    ))
    .await;
    let c = client();
    for i in 0..10 {
        let r = c
            .get(gw.url("/get"))
            .header("x-id", format!("g{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(backend_of(r).await, (200, "good".to_string()));
    }
    let mut statuses = Vec::new();
    for i in 0..10 {
        let r = c
            .post(gw.url("/post"))
            .header("x-id", format!("p{i}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 502)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&502) && statuses.contains(&200),
        "{statuses:?}"
    );
    let seen = times_seen(&[&reset, &good]);
    for i in 0..10 {
        assert_eq!(
            seen.get(&format!("p{i}")),
            Some(&1),
            "p{i} sent more than once"
        );
    }
    drop(gw);

    // A replica that closes keep-alive connections after 200 ms idle, while the gateway would
    // keep them 4 s: requests spaced past that reuse dead pooled connections, and none fails.
    let closing = Faulty::start("127.0.0.1", 0, Fault::CloseIdle(200), "closing").await;
    let gw = Gateway::start(&single_upstream(&[closing.addr], "", "")).await;
    for i in 0..8 {
        let r = c
            .get(gw.url("/ka"))
            .header("x-id", format!("k{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            backend_of(r).await,
            (200, "closing".to_string()),
            "request {i}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in 0..4 {
        let r = c
            .post(gw.url("/ka"))
            .header("x-id", format!("kp{i}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(
            backend_of(r).await,
            (200, "closing".to_string()),
            "POST {i}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(closing.connections.load(Ordering::SeqCst) >= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_no_get_and_sends_no_post_twice() {
    let port = free_port(&loopback(2));
    let a = Faulty::start(&loopback(2), port, Fault::Slow(5), "a").await;
    let b = Faulty::start(&loopback(3), port, Fault::Slow(5), "b").await;
    let gw = Gateway::start(&single_upstream(
        &[a.addr, b.addr],
        ", health: { passive: { max_fails: 1, fail_timeout: 5s } }",
        "",
    ))
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..6 {
        let (stop, results, errors, url) = (
            stop.clone(),
            results.clone(),
            errors.clone(),
            gw.url("/load"),
        );
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let post = w % 2 == 1;
                let id = format!("{}-{w}-{i}", if post { "post" } else { "get" });
                let req = if post {
                    c.post(&url).body("{}")
                } else {
                    c.get(&url)
                };
                let status = match req.header("x-id", &id).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(e) => {
                        errors.lock().unwrap().push(format!("{e:?}"));
                        0
                    }
                };
                results.lock().unwrap().push((id, status));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    let results = std::mem::take(&mut *results.lock().unwrap());
    let seen = times_seen(&[&a, &b]);
    let (gets, posts): (Vec<_>, Vec<_>) = results.iter().partition(|(id, _)| id.starts_with("get"));
    assert!(gets.len() > 50 && posts.len() > 50, "load too light");
    let failed_gets: Vec<_> = gets.iter().filter(|(_, s)| *s != 200).collect();
    assert!(
        failed_gets.is_empty(),
        "{} GETs failed: {:?}; client errors: {:?}",
        failed_gets.len(),
        &failed_gets[..failed_gets.len().min(5)],
        &errors.lock().unwrap()[..errors.lock().unwrap().len().min(3)]
    );
    for (id, status) in &posts {
        // A POST fails only with a clear 502, and no POST is ever sent twice.
        assert!(matches!(status, 200 | 502), "{id}: {status}");
        let times = seen.get(id).copied().unwrap_or(0);
        assert!(times <= 1, "{id} was sent {times} times");
        if *status == 200 {
            assert_eq!(times, 1, "{id} answered 200 without reaching a replica");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_unreadable_config_file_keeps_the_gateway_serving() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&one_route_to(&backend, "")).await;
    let c = client();
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);

    // Deleted: still serving, and the log says why nothing was reloaded.
    std::fs::remove_file(&gw.config_path).unwrap();
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    assert_eq!(gw.generation().await, 1);

    // Unreadable (a directory where the file was; permissions do not stop root): the same.
    std::fs::create_dir(&gw.config_path).unwrap();
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    assert_eq!(gw.generation().await, 1);
    let log = gw.log();
    assert!(
        log.lines().filter(|l| l.contains("cannot read")).count() >= 2,
        "log does not say the file could not be read:\n{log}"
    );

    // Back: reloaded.
    std::fs::remove_dir(&gw.config_path).unwrap();
    gw.write_config(&format!(
        "upstreams: {{ b: {{ targets: [\"{}\"] }} }}\nroutes: [ {{ name: r2, upstream: b, match: {{ path_prefix: /y }} }} ]\n",
        backend.addr
    ));
    gw.wait_generation(2).await;
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 404);
    assert_eq!(c.get(gw.url("/y")).send().await.unwrap().status(), 200);
    assert!(gw.log().lines().all(|l| !l.contains("panicked")));
}

/// When a request ended, and its status or why it failed.
type Outcome = (Instant, Result<u16, String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let mut gw = Gateway::start(&one_route_to(&backend, "")).await;
    let mut idle = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    idle.write_all(b"GET /once HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    read_until_contains(&mut idle, "\"/once\"", Duration::from_secs(5)).await;
    let mut buf = [0u8; 4096];
    let term = Instant::now();
    gw.signal(libc::SIGTERM);
    // The idle connection is closed when shutdown begins, not when the grace period (1 s in
    // these tests) ends.
    let n = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
        .await
        .expect("idle connection still open 2 s after SIGTERM")
        .unwrap_or(0);
    assert_eq!(n, 0, "got {:?}", String::from_utf8_lossy(&buf[..n]));
    assert!(
        term.elapsed() < Duration::from_millis(800),
        "closed {:?} after SIGTERM",
        term.elapsed()
    );
    assert!(gw.wait_exit(Duration::from_secs(10)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_finishes_every_request_and_refuses_new_connections_cleanly() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("access.log");
    let mut gw = Gateway::start(&one_route_to(
        &backend,
        &format!("access_log: {{ path: \"{}\" }}\n", log.display()),
    ))
    .await;
    // A new connection per request, so that every failure is a refused connection or a
    // broken response, never a keep-alive race.
    let c = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (c, stop, outcomes, url) = (
            c.clone(),
            stop.clone(),
            outcomes.clone(),
            gw.url("/work?sleep=150"),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = match c.get(&url).send().await {
                    Ok(r) => Ok(r.status().as_u16()),
                    Err(e) if e.is_connect() => Err("refused".to_string()),
                    Err(e) => Err(format!("{e:?}")),
                };
                let refused = r.is_err();
                outcomes.lock().unwrap().push((Instant::now(), r));
                if refused {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let term = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("gateway did not exit");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(status.code().is_some(), "{status:?}");
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let broken: Vec<_> = outcomes
        .iter()
        .filter(|(_, r)| {
            !matches!(r, Ok(200)) && r.as_ref().err().map(String::as_str) != Some("refused")
        })
        .collect();
    assert!(broken.is_empty(), "requests failed uncleanly: {broken:?}");
    // The requests in flight at SIGTERM were answered after it.
    let finished_after = outcomes
        .iter()
        .filter(|(t, r)| *t > term && matches!(r, Ok(200)))
        .count();
    assert!(
        finished_after >= 4,
        "only {finished_after} in-flight requests finished"
    );
    assert!(
        outcomes.iter().any(|(_, r)| r.is_err()),
        "no request saw the listener closed"
    );
    // Every answered request is in the access log, the last ones included: the writer
    // writes what is waiting before the process exits.
    let answered = outcomes
        .iter()
        .filter(|(_, r)| matches!(r, Ok(200)))
        .count();
    let logged = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"path\":\"/work\"") && l.contains("\"status\":200"))
        .count();
    assert_eq!(logged, answered, "access-log lines lost at shutdown");
}

/// SIGTERM with nothing in flight exits at once, not at the end of the grace period; a request
/// in flight is still answered first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_when_the_last_request_is_answered() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let routes = one_route_to(&backend, "");
    // A long grace period (read at start), so that exiting at its end would show.
    let long_grace = |text: String| text.replace("grace_period: 1s", "grace_period: 20s");
    let mut idle = Gateway::start_edited(&routes, long_grace).await;
    let term = Instant::now();
    idle.signal(libc::SIGTERM);
    assert!(
        idle.wait_exit(Duration::from_secs(5)).is_some(),
        "{}",
        idle.log()
    );
    assert!(
        term.elapsed() < Duration::from_secs(2),
        "took {:?}",
        term.elapsed()
    );
    assert_eq!(
        idle.log().matches("shutting down: draining").count(),
        1,
        "{}",
        idle.log()
    );

    let mut busy = Gateway::start_edited(&routes, long_grace).await;
    let slow = tokio::spawn(client().get(busy.url("/slow?sleep=700")).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let term = Instant::now();
    busy.signal(libc::SIGTERM);
    let answer = slow.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    assert!(
        busy.wait_exit(Duration::from_secs(5)).is_some(),
        "{}",
        busy.log()
    );
    assert!(
        term.elapsed() >= Duration::from_millis(400),
        "took {:?}",
        term.elapsed()
    );
    assert!(
        term.elapsed() < Duration::from_secs(3),
        "exited {:?} after SIGTERM: at the grace period's end, not when the request was answered",
        term.elapsed()
    );
}
