//! Hostile clients against the real gateway: oversized and slow request heads, oversized
//! bodies, paths and hosts crafted to route around a policy. (Request smuggling has its own
//! corpus test in `desync.rs`; token tricks are in `auth.rs`; forged `X-Forwarded-For` against
//! rate limits in `ratelimit.rs`.)

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes or `limit` passes; returns what came and whether it closed.
async fn read_until_close(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// Sends `head` on a new connection; returns the status line's code and whether the gateway
/// closed the connection (within half a second of answering).
async fn status_of(addr: SocketAddr, head: &[u8]) -> (u16, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(head).await;
    let (text, closed) = read_until_close(&mut s, Duration::from_millis(500)).await;
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, closed)
}

/// The request line of every head a recording upstream received.
fn request_lines(received: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
    received
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.lines().next().unwrap_or("").to_string())
        .collect()
}

/// A connection that has had one request answered (200) and stays open for the next.
async fn kept_alive_after_one_request(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    s
}

fn head_with_headers(n: usize, value_len: usize) -> Vec<u8> {
    let mut h = b"GET /x HTTP/1.1\r\nHost: a.test\r\n".to_vec();
    for i in 0..n {
        h.extend_from_slice(format!("X-H{i}: {}\r\n", "v".repeat(value_len)).as_bytes());
    }
    h.extend_from_slice(b"\r\n");
    h
}

async fn metric(gw: &Gateway, line_start: &str) -> f64 {
    let text = gw.metrics().await;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431_and_slow_heads_408() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        r#"
limits: {{ max_request_headers: 20, max_request_header_bytes: 4KiB, header_timeout: 1s }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes: [ {{ name: all, upstream: b }} ]
"#,
        backend.addr
    ))
    .await;

    // Count: 19 added fields + Host pass, 21 + Host do not.
    assert_eq!(status_of(gw.http, &head_with_headers(19, 8)).await.0, 200);
    assert_eq!(
        status_of(gw.http, &head_with_headers(21, 8)).await,
        (431, true)
    );
    // Size: one 5 KiB field is over the 4 KiB head limit.
    assert_eq!(
        status_of(gw.http, &head_with_headers(1, 5 << 10)).await,
        (431, true)
    );
    // Beyond Pingora's own bounds (256 fields, 1 MiB): 400 from Pingora, still closed.
    assert_eq!(
        status_of(gw.http, &head_with_headers(300, 4)).await,
        (400, true)
    );
    assert_eq!(
        status_of(gw.http, &head_with_headers(1, 2 << 20)).await.0,
        400
    );
    let hits_before_slow = backend.hits();

    // Slowloris: a head trickled one field at a time never completes, and gets 408 at the
    // deadline, however steadily bytes arrive.
    let started = Instant::now();
    let mut slow = TcpStream::connect(gw.http).await.unwrap();
    slow.write_all(b"GET /x HTTP/1.1\r\nHost: a.test\r\n")
        .await
        .unwrap();
    let trickle = async {
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    // While that connection trickles, other clients are served.
    let others = async {
        for _ in 0..5 {
            let r = client().get(gw.url("/ok")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::join!(trickle, others);
    let (text, closed) = read_until_close(&mut slow, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "got {text:?}");
    assert!(closed);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow head lasted {:?}",
        started.elapsed()
    );

    // A connection that never sends anything is closed at the deadline too.
    let mut idle = TcpStream::connect(gw.http).await.unwrap();
    let (text, closed) = read_until_close(&mut idle, Duration::from_secs(4)).await;
    assert!(closed && text.starts_with("HTTP/1.1 408"), "got {text:?}");

    // The deadline applies to every request on a keep-alive connection, not just the first.
    let mut ka = kept_alive_after_one_request(gw.http).await;
    // Idle between requests is the keep-alive timeout's business, not the head deadline's.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ka.write_all(b"GET /second HTTP/1.1\r\n").await.unwrap();
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if ka
            .write_all(format!("X-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
    }
    let (text, closed) = read_until_close(&mut ka, Duration::from_secs(3)).await;
    assert!(closed && text.contains("408"), "got {text:?}");

    // No slow or refused head reached the upstream.
    assert_eq!(backend.hits(), hits_before_slow + 5 + 1);
    assert!(
        metric(
            &gw,
            "gateway_downstream_header_timeouts_total{listener=\"http\"}"
        )
        .await
            >= 3.0
    );
    assert!(
        metric(
            &gw,
            "gateway_downstream_connections_accepted_total{listener=\"http\"}"
        )
        .await
            >= 10.0
    );
    assert!(gw.log().lines().all(|l| !l.contains("panicked")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_at_the_keepalive_timeout() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&one_route_to(
        &backend,
        "limits: { keepalive_timeout: 1s, header_timeout: 1s }\n",
    ))
    .await;
    let mut ka = TcpStream::connect(gw.http).await.unwrap();
    // Requests within the timeout reuse the connection, the head arriving in one piece or
    // byte by byte (its first byte is read while the connection waits for it). The third
    // comes after the first idle wait's deadline: the timer armed then fires while the
    // connection waits with a later deadline, and must wait on rather than close it.
    let requests = [(0, false), (400, false), (700, true)];
    for (i, (pause, byte_by_byte)) in requests.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let head = format!("GET /r{i} HTTP/1.1\r\nHost: a.test\r\n\r\n");
        if byte_by_byte {
            for byte in head.as_bytes() {
                ka.write_all(&[*byte]).await.unwrap();
            }
        } else {
            ka.write_all(head.as_bytes()).await.unwrap();
        }
        let text =
            read_until_contains(&mut ka, &format!("\"/r{i}\""), Duration::from_secs(2)).await;
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text:?}");
    }
    // Then idle past the timeout: closed without a word (no 408: no request had begun).
    let started = Instant::now();
    let (text, closed) = read_until_close(&mut ka, Duration::from_secs(4)).await;
    assert!(closed && text.is_empty(), "got {text:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed after {:?}",
        started.elapsed()
    );
    assert_eq!(backend.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_get_the_first_answer_then_a_close() {
    // HTTP/1.1 pipelining is not served (Pingora's default): the first request is answered and
    // the connection closed at once, never left waiting, and nothing after the first request
    // reaches an upstream; the client sends the rest again (RFC 9112 §9.3.2).
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&one_route_to(&backend, "")).await;
    let pipelined: [&[u8]; 2] = [
        b"GET /p0 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /p1 HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"POST /p0 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nhiGET /p1 HTTP/1.1\r\nHost: a.test\r\n\r\n",
    ];
    for (i, bytes) in pipelined.into_iter().enumerate() {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let (text, closed) = read_until_close(&mut s, Duration::from_secs(3)).await;
        assert!(closed, "case {i}: left open after {text:?}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "case {i}: {text:?}");
        assert!(
            text.starts_with("HTTP/1.1 200") && text.contains("\"/p0\""),
            "case {i}: {text:?}"
        );
        assert_eq!(backend.hits(), i + 1, "case {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_before_reaching_the_upstream() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        r#"
limits: {{ max_request_body: 1KiB }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: uploads, upstream: b, match: {{ path_prefix: /uploads }}, max_request_body: 1MiB }}
  - {{ name: all, upstream: b }}
"#,
        backend.addr
    ))
    .await;
    let c = client();

    // Declared too large: refused before a byte is forwarded.
    let r = c
        .post(gw.url("/api"))
        .body(vec![b'a'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.headers().get("x-request-id").is_some());
    assert_eq!(backend.hits(), 0);

    // Chunked, no length: cut off once it passes the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b'b'; 512])).collect();
    let r = c
        .post(gw.url("/api"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Within the limit, and a route with its own larger limit.
    let r = c
        .post(gw.url("/api"))
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(echo(r).await["body_len"], 1000);
    let r = c
        .post(gw.url("/uploads/file"))
        .body(vec![b'a'; 300 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(echo(r).await["body_len"], 300 << 10);
    // A client that sends its too-large body anyway reads the 413 (the body is drained behind
    // the answer, as nginx's lingering close does) instead of a reset.
    let r = c
        .post(gw.url("/uploads/file"))
        .body(vec![b'a'; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // One that asked to continue first gets the 413 at once and the connection closed.
    let started = Instant::now();
    let (code, closed) = status_of(
        gw.http,
        b"POST /api HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert_eq!((code, closed), (413, true));
    assert!(started.elapsed() < Duration::from_secs(2));

    // One that declares 10 GB and trickles it gets the 413 at once; the draining behind it is
    // bounded (5 s), then the connection is closed.
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"POST /api HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10000000000\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let trickle = async {
        for _ in 0..80 {
            if s.write_all(&[b'x'; 64]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(9), trickle).await;
    let (text, closed) = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    assert!(closed, "the drain behind a 413 was not bounded");
    assert!(started.elapsed() < Duration::from_secs(12));
    // Forwarded: the two bodies within their limits, and the head of the chunked one (its body
    // was cut off upstream too when it passed the limit). None of the declared-too-large ones.
    assert_eq!(backend.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_and_hosts_cannot_route_around_a_policy() {
    let public = Backend::start("127.0.0.1", "public").await;
    let admin = Backend::start("127.0.0.1", "admin").await;
    let gw = Gateway::start(&format!(
        r#"
auth:
  staff: {{ secret: "0123456789abcdef0123456789abcdef", algorithms: [HS256], require_exp: false }}
upstreams:
  public: {{ targets: ["{}"] }}
  admin:  {{ targets: ["{}"] }}
routes:
  - {{ name: public, upstream: public, match: {{ path_prefix: /api/public }} }}
  - {{ name: admin, upstream: admin, auth: staff, match: {{ path_prefix: /api/admin }} }}
  - {{ name: admin_host, upstream: admin, auth: staff, match: {{ hosts: [admin.test] }} }}
  - {{ name: public_host, upstream: public, match: {{ hosts: [public.test] }} }}
"#,
        public.addr, admin.addr
    ))
    .await;

    let attempts: &[&str] = &[
        "/api/admin",
        "/api/public/../admin",
        "/api/public/%2e%2e/admin",
        "/api/public/%2E%2E/admin",
        "/api/public/.%2e/admin",
        "/api/public/./../admin/x",
        "//api//admin",
        "/api/public/..%2fadmin",
        "/api/public/..%2Fadmin",
        "/api/public/..%5cadmin",
        "/api/public/..\\admin",
        "/api/public/..;/admin",
        "/api/public/%2e%2e;/admin",
        "/api/public/.;/../admin",
        "/api/%61dmin",
        "/api/admin%00",
        "/api/admin%0d%0aX-Injected:%201",
        "/api/public/%252e%252e/admin",
        "/api/public/../../api/admin",
        "/api/public/../../../api/admin",
        "http://a.test/api/admin",
        "http://a.test/api/public/../admin",
        "https://a.test/api/admin",
        "*",
        "a.test:80",
        "api/admin",
    ];
    for target in attempts {
        let head = format!("GET {target} HTTP/1.1\r\nHost: a.test\r\n\r\n");
        let (code, _) = status_of(gw.http, head.as_bytes()).await;
        // 200 only from the public upstream (a double-encoded `..` is a literal segment to
        // everyone, so it stays under /api/public); the admin upstream is never reached.
        assert!(
            matches!(code, 200 | 400 | 401 | 404),
            "{target}: status {code}"
        );
        assert_eq!(admin.hits(), 0, "{target} reached the protected upstream");
    }

    // Host confusion: an absolute-form target whose authority is not `Host` is refused (by
    // Pingora); when they agree, the route is the host's.
    for head in [
        &b"GET http://admin.test/x HTTP/1.1\r\nHost: public.test\r\n\r\n"[..],
        &b"GET http://public.test/x HTTP/1.1\r\nHost: admin.test\r\n\r\n"[..],
    ] {
        assert_eq!(status_of(gw.http, head).await, (400, true));
    }
    let (code, _) = status_of(
        gw.http,
        b"GET http://admin.test/x HTTP/1.1\r\nHost: admin.test\r\n\r\n",
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = status_of(
        gw.http,
        b"GET http://public.test/x HTTP/1.1\r\nHost: public.test\r\n\r\n",
    )
    .await;
    assert_eq!(code, 200);
    // Two Host headers, or userinfo in one: refused.
    let (code, closed) = status_of(
        gw.http,
        b"GET /x HTTP/1.1\r\nHost: public.test\r\nHost: admin.test\r\n\r\n",
    )
    .await;
    assert_eq!((code, closed), (400, true));
    let (code, _) = status_of(
        gw.http,
        b"GET /x HTTP/1.1\r\nHost: public.test@admin.test\r\n\r\n",
    )
    .await;
    assert!(matches!(code, 400 | 404), "userinfo host: {code}");
    // Case and trailing dots of the host are not a way in either.
    let (code, _) = status_of(gw.http, b"GET /x HTTP/1.1\r\nHost: ADMIN.test\r\n\r\n").await;
    assert_eq!(code, 401);
    let (code, _) = status_of(gw.http, b"GET /x HTTP/1.1\r\nHost: admin.test.\r\n\r\n").await;
    assert!(matches!(code, 401 | 404), "trailing dot: {code}");
    assert_eq!(
        admin.hits(),
        0,
        "a host trick reached the protected upstream"
    );
    assert!(public.hits() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_protocol_violations_are_refused_and_smuggle_nothing() {
    let (upstream, received) = recording_upstream(OK_RESPONSE).await;
    let gw = Gateway::start(&one_route_to_addr(upstream, "")).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let heads: &[(&str, String)] = &[
        ("obs-fold", "GET /fold HTTP/1.1\r\nHost: a.test\r\nX-A: one\r\n two\r\n\r\n".into()),
        ("NUL in a value", "GET /nul HTTP/1.1\r\nHost: a.test\r\nX-A: a\0b\r\n\r\n".into()),
        ("bare CR in a value", "GET /cr HTTP/1.1\r\nHost: a.test\r\nX-A: a\rb\r\n\r\n".into()),
        ("space before the colon", "GET /sp HTTP/1.1\r\nHost: a.test\r\nContent-Length : 5\r\n\r\nhello".into()),
        ("signed length", "POST /plus HTTP/1.1\r\nHost: a.test\r\nContent-Length: +5\r\n\r\nhello".into()),
        ("negative length", "POST /neg HTTP/1.1\r\nHost: a.test\r\nContent-Length: -1\r\n\r\n".into()),
        (
            "chunk size not hex, request behind it",
            format!("POST /badchunk HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "chunk size overflowing 64 bits, request behind it",
            format!("POST /overflow HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "bare LF after a chunk size",
            format!("POST /lf HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
    ];
    let mut outcomes = Vec::new();
    for (what, head) in heads {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        let _ = s.write_all(head.as_bytes()).await;
        let (text, closed) = read_until_close(&mut s, Duration::from_millis(1500)).await;
        let status: u16 = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        outcomes.push(format!("{what}: {status} closed={closed}"));
        // 400 and the connection closed: a head is refused before it is forwarded; a body
        // that breaks mid-way (its head already went upstream) ends both connections, so the
        // bytes behind it are never read as another request.
        assert!(
            status == 400 && closed,
            "{what}: status {status}, closed {closed}: {text:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The request line of every head that reached the upstream.
    let seen = request_lines(&received);
    assert!(
        !seen.iter().any(|l| l.contains("/smuggled")),
        "a smuggled request reached the upstream: {seen:?}\n{outcomes:#?}"
    );
    for refused in ["/fold", "/nul", "/cr", "/sp", "/plus", "/neg"] {
        assert!(
            !seen.iter().any(|l| l.contains(refused)),
            "{refused} reached the upstream: {seen:?}"
        );
    }
    assert!(gw.log().lines().all(|l| !l.contains("panicked")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_and_host_must_agree() {
    let public = Backend::start("127.0.0.1", "public").await;
    let admin = Backend::start("127.0.0.1", "admin").await;
    let gw = Gateway::start(&format!(
        r#"
h2c: true
auth:
  staff: {{ secret: "0123456789abcdef0123456789abcdef", algorithms: [HS256] }}
upstreams:
  public: {{ targets: ["{}"] }}
  admin:  {{ targets: ["{}"] }}
routes:
  - {{ name: admin_host, upstream: admin, auth: staff, match: {{ hosts: [admin.test] }} }}
  - {{ name: public_host, upstream: public, match: {{ hosts: [public.test] }} }}
"#,
        public.addr, admin.addr
    ))
    .await;
    let tcp = TcpStream::connect(gw.http).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut status = |authority: &str, host: Option<&str>| {
        let mut req = http::Request::builder()
            .method("GET")
            .uri(format!("http://{authority}/x"));
        if let Some(host) = host {
            req = req.header("host", host);
        }
        let (response, _) = client.send_request(req.body(()).unwrap(), true).unwrap();
        async move { response.await.unwrap().status().as_u16() }
    };
    // :authority alone routes; a Host that agrees is fine.
    assert_eq!(status("public.test", None).await, 200);
    assert_eq!(status("public.test", Some("public.test")).await, 200);
    assert_eq!(status("admin.test", None).await, 401);
    // A Host naming another host than :authority is malformed (RFC 9113 8.3.1).
    assert_eq!(status("public.test", Some("admin.test")).await, 400);
    assert_eq!(status("admin.test", Some("public.test")).await, 400);
    assert_eq!(admin.hits(), 0);
    assert_eq!(public.hits(), 2);
}

/// A client decides when its connection fails before a request begins: a hang-up in the middle
/// of a head, a head that stalls past the deadline, a malformed head it does not wait to hear
/// refused. None of that writes a log line (each would be a line a client writes at will, on the
/// thread that serves traffic); a failing upstream still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_failures_before_a_request_write_no_log_lines() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let dead = DeadPort::reserve();
    let gw = Gateway::start(&format!(
        r#"
limits: {{ header_timeout: 1s }}
upstreams:
  b: {{ targets: ["{}"] }}
  gone: {{ targets: ["127.0.0.1:{}"], retries: 0 }}
routes:
  - {{ name: gone, upstream: gone, match: {{ path_prefix: /gone }} }}
  - {{ name: all, upstream: b }}
"#,
        backend.addr, dead.port
    ))
    .await;

    // Hang-ups in the middle of a head, on new and on kept-alive connections.
    for _ in 0..5 {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"GET /x HT").await.unwrap();
    }
    let mut ka = kept_alive_after_one_request(gw.http).await;
    ka.write_all(b"GET /y HTTP/1.1\r\nHo").await.unwrap();
    drop(ka);
    // Malformed heads, the client gone (a reset) before the 400 is written.
    for _ in 0..5 {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        #[allow(deprecated)] // A reset is the point here (SO_LINGER 0: the drop resets).
        s.set_linger(Some(Duration::ZERO)).unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n")
            .await
            .unwrap();
    }
    // A head that stalls: 408 at the deadline.
    let mut slow = TcpStream::connect(gw.http).await.unwrap();
    slow.write_all(b"GET /x HTTP/1.1\r\n").await.unwrap();
    let (text, closed) = read_until_close(&mut slow, Duration::from_secs(3)).await;
    assert!(closed && text.starts_with("HTTP/1.1 408"), "got {text:?}");

    // The gateway still serves, and an upstream that refuses connections is logged.
    let c = client();
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/gone")).send().await.unwrap().status(), 502);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.log().contains("Fail to proxy: Upstream") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = gw.log();
    assert!(log.contains("Fail to proxy: Upstream"), "{log}");
    assert!(!log.contains("Downstream"), "{log}");
    assert!(!log.contains("failed to send error response"), "{log}");
    assert!(
        metric(
            &gw,
            "gateway_downstream_header_timeouts_total{listener=\"http\"}"
        )
        .await
            >= 1.0
    );
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without `Host`, or with two, gets 400 and is not
/// forwarded; HTTP/1.0 may leave `Host` out. A head that a bare-LF empty line ends early is
/// refused whole and the connection closed, so the fields behind it are never read as a body
/// or a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_required_and_a_bare_lf_does_not_cut_a_head_short() {
    let (upstream, received) = recording_upstream(OK_RESPONSE).await;
    let gw = Gateway::start(&one_route_to_addr(upstream, "")).await;
    assert_eq!(
        status_of(gw.http, b"GET /nohost HTTP/1.1\r\n\r\n").await,
        (400, true)
    );
    assert_eq!(
        status_of(
            gw.http,
            b"GET /twohosts HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"
        )
        .await
        .0,
        400
    );
    let cut = b"GET /cut HTTP/1.1\r\nHost: a.test\r\n\nX-Behind: 1\r\n\r\n";
    assert_eq!(status_of(gw.http, cut).await, (400, true));
    let all_lf = b"GET /alllf HTTP/1.1\nHost: a.test\n\n";
    assert_eq!(status_of(gw.http, all_lf).await, (400, true));
    // What passes: HTTP/1.0 without Host, HTTP/1.1 with one.
    assert_eq!(
        status_of(gw.http, b"GET /old HTTP/1.0\r\n\r\n").await.0,
        200
    );
    assert_eq!(
        status_of(gw.http, b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = request_lines(&received);
    for refused in ["/nohost", "/twohosts", "/cut", "/alllf", "X-Behind"] {
        assert!(
            !seen.iter().any(|l| l.contains(refused)),
            "{refused}: {seen:?}"
        );
    }
    assert!(seen.iter().any(|l| l.contains("/old")), "{seen:?}");
}

/// With h2c on, a connection that starts the HTTP/2 preface and breaks it, or ends inside it,
/// is closed without an HTTP/1 answer (RFC 9113 section 3.4); an HTTP/1 request still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_http2_preface_is_closed_not_read_as_http1() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&one_route_to(&backend, "h2c: true\n")).await;
    for broken in [
        &b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"[..],
        b"PRI * HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"PRI ",
    ] {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        s.write_all(broken).await.unwrap();
        if broken.len() == 4 {
            // Ends inside the preface.
            s.shutdown().await.unwrap();
        }
        let (text, closed) = read_until_close(&mut s, Duration::from_secs(2)).await;
        assert!(
            closed && text.is_empty(),
            "{broken:?}: {text:?} closed={closed}"
        );
    }
    assert_eq!(
        status_of(gw.http, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .0,
        200
    );
    assert_eq!(backend.hits(), 1);
}
