//! Proxying through the real gateway: routing, forwarding headers, rewrites, errors, bodies,
//! HTTP/2 and WebSocket.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_precedence_and_404() {
    let root = Backend::start("127.0.0.1", "root").await;
    let api = Backend::start("127.0.0.1", "api").await;
    let users = Backend::start("127.0.0.1", "users").await;
    let exact = Backend::start("127.0.0.1", "exact").await;
    let regex = Backend::start("127.0.0.1", "regex").await;
    let post = Backend::start("127.0.0.1", "post").await;
    let host = Backend::start("127.0.0.1", "host").await;
    let canary = Backend::start("127.0.0.1", "canary").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  root:   {{ targets: ["{}"] }}
  api:    {{ targets: ["{}"] }}
  users:  {{ targets: ["{}"] }}
  exact:  {{ targets: ["{}"] }}
  regex:  {{ targets: ["{}"] }}
  post:   {{ targets: ["{}"] }}
  host:   {{ targets: ["{}"] }}
  canary: {{ targets: ["{}"] }}
routes:
  - {{ name: root,   upstream: root, match: {{ path_prefix: /static }} }}
  - {{ name: api,    upstream: api, match: {{ path_prefix: /api }} }}
  - {{ name: users,  upstream: users, match: {{ path_prefix: /api/users }} }}
  - {{ name: login,  upstream: exact, match: {{ path: /api/users/login }} }}
  - {{ name: byid,   upstream: regex, match: {{ path_regex: "/api/users/[0-9]+" }} }}
  - {{ name: create, upstream: post, match: {{ path_prefix: /api/users, methods: [POST] }} }}
  - {{ name: tenant, upstream: host, match: {{ hosts: ["*.tenant.test"], path_prefix: /api }} }}
  - {{ name: canary, upstream: canary, match: {{ path_prefix: /api, headers: [ {{ name: x-canary, value: "on" }} ] }} }}
"#,
        root.addr, api.addr, users.addr, exact.addr, regex.addr, post.addr, host.addr, canary.addr
    ))
    .await;
    let c = client();
    let who = |v: serde_json::Value| v["backend"].as_str().unwrap().to_string();
    let get = |p: &str| c.get(gw.url(p)).send();
    assert_eq!(
        who(echo(get("/static/app.js").await.unwrap()).await),
        "root"
    );
    assert_eq!(who(echo(get("/api/orders").await.unwrap()).await), "api");
    assert_eq!(
        who(echo(get("/api/users/me").await.unwrap()).await),
        "users"
    );
    assert_eq!(
        who(echo(get("/api/users/login").await.unwrap()).await),
        "exact"
    );
    assert_eq!(
        who(echo(get("/api/users/42").await.unwrap()).await),
        "regex"
    );
    assert_eq!(
        who(echo(c.post(gw.url("/api/users/x")).send().await.unwrap()).await),
        "post"
    );
    assert_eq!(
        who(echo(c.post(gw.url("/api/users/login")).send().await.unwrap()).await),
        "exact"
    );
    assert_eq!(
        who(echo(
            c.get(gw.url("/api/users/1"))
                .header("host", "a.Tenant.test:8080")
                .send()
                .await
                .unwrap()
        )
        .await),
        "host"
    );
    assert_eq!(
        who(echo(
            c.get(gw.url("/api/x"))
                .header("x-canary", "on")
                .send()
                .await
                .unwrap()
        )
        .await),
        "canary"
    );
    assert_eq!(
        who(echo(
            c.get(gw.url("/api/x"))
                .header("x-canary", "off")
                .send()
                .await
                .unwrap()
        )
        .await),
        "api"
    );

    // No route: 404 JSON with the request id, also in the header.
    let r = get("/apix").await.unwrap();
    assert_eq!(r.status(), 404);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], 404);
    assert_eq!(body["request_id"], id.as_str());
    assert_eq!(id.len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_request_id_and_hop_by_hop() {
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
        b.addr
    ))
    .await;
    let c = client();
    let r = c
        .get(gw.url("/x?q=1"))
        .header("x-request-id", "abc-123")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.test")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "drop me")
        .header("host", "shop.test")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-request-id"],
        "abc-123",
        "a sane request id is kept and returned"
    );
    let v = echo(r).await;
    let h = &v["headers"];
    assert_eq!(h["x-request-id"], "abc-123");
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "untrusted peers cannot inject a client chain"
    );
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.test");
    assert_eq!(
        h["host"], "shop.test",
        "the client's Host is passed upstream"
    );
    assert!(
        h.get("x-secret").is_none(),
        "headers named in Connection are hop-by-hop"
    );
    assert_eq!(v["query"], "q=1");

    // A request id that is not sane is replaced.
    let r = c
        .get(gw.url("/"))
        .header("x-request-id", "bad id <script>")
        .send()
        .await
        .unwrap();
    let returned = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(returned, "bad id <script>");
    assert_eq!(echo(r).await["headers"]["x-request-id"], returned.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_extend_the_forwarded_chain() {
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "trusted_proxies: [\"127.0.0.0/8\"]\nupstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
        b.addr
    ))
    .await;
    let v = echo(
        client()
            .get(gw.url("/"))
            .header("x-forwarded-for", "203.0.113.9, 127.0.0.5")
            .header("x-forwarded-proto", "https")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.5, 127.0.0.1");
    assert_eq!(
        h["x-real-ip"], "203.0.113.9",
        "the right-most untrusted hop is the client"
    );
    assert_eq!(
        h["x-forwarded-proto"], "https",
        "a trusted proxy's scheme is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_prefix_rewrite_and_path_normalisation() {
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  b: {{ targets: ["{}"] }}
routes:
  - {{ name: strip,   upstream: b, match: {{ path_prefix: /svc/ }}, strip_prefix: true }}
  - {{ name: prefix,  upstream: b, match: {{ path_prefix: /v1 }}, rewrite: /api/v2 }}
  - {{ name: regex,   upstream: b, match: {{ path_regex: "/u/([0-9]+)" }}, rewrite: "/users/$1" }}
  - {{ name: public,  upstream: b, match: {{ path_prefix: /public }} }}
"#,
        b.addr
    ))
    .await;
    let c = client();
    let path = |r| async { echo(r).await["path"].as_str().unwrap().to_string() };
    assert_eq!(
        path(c.get(gw.url("/svc/users/1?x=1")).send().await.unwrap()).await,
        "/users/1"
    );
    assert_eq!(
        path(c.get(gw.url("/v1/items")).send().await.unwrap()).await,
        "/api/v2/items"
    );
    assert_eq!(
        path(c.get(gw.url("/u/42")).send().await.unwrap()).await,
        "/users/42"
    );

    // Raw requests, so that no client tidies the path first.
    let raw = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let out = raw_request(
        gw.http,
        raw("/public/a/../b").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.contains("\"path\":\"/public/b\""), "{out}");
    let out = raw_request(
        gw.http,
        raw("/public//%62").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.contains("\"path\":\"/public/b\""), "{out}");
    let out = raw_request(
        gw.http,
        raw("/public/../../etc/passwd").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = raw_request(
        gw.http,
        raw("/public/..%2F..%2Fadmin").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // `/public/../svc/x` is the `strip` route after normalisation, and is forwarded as such.
    let out = raw_request(
        gw.http,
        raw("/public/../svc/x").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.contains("\"path\":\"/x\""), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_json_502_and_504() {
    let slow = Backend::start("127.0.0.1", "slow").await;
    let dead = DeadPort::reserve();
    let dead_port = dead.port;
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  dead: {{ targets: ["127.0.0.1:{dead_port}"], retries: 0 }}
  slow: {{ targets: ["{}"], timeouts: {{ read: 300ms }} }}
routes:
  - {{ name: dead, upstream: dead, match: {{ path_prefix: /dead }} }}
  - {{ name: slow, upstream: slow, match: {{ path_prefix: /slow }} }}
"#,
        slow.addr
    ))
    .await;
    let c = client();
    // Connection refused: 502 with the request id; a lone replica is never ejected, so the
    // next request is tried again (and fails the same way).
    // The connection is closed after an upstream error, and the response says so (otherwise a
    // client reusing it would race the close and see a reset).
    for _ in 0..2 {
        let r = c.get(gw.url("/dead")).send().await.unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()["connection"], "close");
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["request_id"], id.as_str());
        assert_eq!(body["error"], "bad gateway");
    }
    // Upstream slower than the read timeout: 504.
    let r = c.get(gw.url("/slow?sleep=2000")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    // A fast request on the same upstream still works.
    assert_eq!(c.get(gw.url("/slow")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
        b.addr
    ))
    .await;
    const SIZE: usize = 100 * 1024 * 1024;
    let c = client();
    // A small upload and download first, so that the baseline holds the buffers every
    // transfer needs, whatever the build.
    let warm = c
        .post(gw.url("/upload"))
        .body(vec![7u8; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(echo(warm).await["body_len"], 1 << 20);
    let warm = c.get(gw.url("/bytes?n=1048576")).send().await.unwrap();
    assert_eq!(warm.bytes().await.unwrap().len(), 1 << 20);
    let baseline_kb = peak_rss_kb(gw.pid());
    // Upload 100 MB as a stream of chunks.
    let chunk = bytes::Bytes::from(vec![7u8; 1024 * 1024]);
    let stream =
        futures_util::stream::iter((0..100).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let r = c
        .post(gw.url("/upload"))
        .header("content-length", SIZE.to_string())
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(echo(r).await["body_len"], SIZE);
    // Download 100 MB.
    let mut r = c
        .get(gw.url(&format!("/bytes?n={SIZE}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut got = 0;
    while let Some(chunk) = r.chunk().await.unwrap() {
        got += chunk.len();
    }
    assert_eq!(got, SIZE);
    // Neither body was held in memory: the peak grew by far less than one body.
    let grown_kb = peak_rss_kb(gw.pid()).saturating_sub(baseline_kb);
    assert!(
        grown_kb < 32 * 1024,
        "peak RSS grew by {grown_kb} kB over {baseline_kb} kB"
    );
}

/// The process's peak resident set (`VmHWM`), kB.
fn peak_rss_kb(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_and_websocket_upgrade() {
    use futures_util::{SinkExt, StreamExt};
    let b = Backend::start("127.0.0.1", "b").await;
    let (ws, _ws_task) = ws_echo("127.0.0.1").await;
    let gw = Gateway::start(&format!(
        "h2c: true\nupstreams:\n  b: {{ targets: [\"{}\"] }}\n  ws: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n  - {{ name: ws, upstream: ws, match: {{ path: /ws }} }}\n",
        b.addr, ws
    ))
    .await;
    // HTTP/2 with prior knowledge.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(gw.url("/over-h2"))
        .header("x-request-id", "h2-id")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.headers()["x-request-id"], "h2-id");
    let v = echo(r).await;
    assert_eq!(v["path"], "/over-h2");
    assert_eq!(
        v["headers"]["x-forwarded-host"],
        gw.http.to_string().as_str()
    );

    // HTTP/1 beside it: a request shorter than the 24-byte HTTP/2 preface is told apart at
    // once and answered, not held until the head deadline (10 s).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut short = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    short.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let text = read_until_contains(&mut short, "\"path\":\"/\"", Duration::from_secs(2)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // A preface that arrives in pieces is still HTTP/2: the server's SETTINGS frame comes back.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut split = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    split.write_all(&preface[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    split.write_all(&preface[5..]).await.unwrap();
    split
        .write_all(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(2), split.read_exact(&mut frame))
        .await
        .expect("no answer to a split preface")
        .unwrap();
    assert_eq!(frame[3], 0x04, "not a SETTINGS frame: {frame:?}");

    // WebSocket through the gateway.
    let (mut sock, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.http))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().contains_key("x-request-id"));
    for i in 0..5 {
        sock.send(tokio_tungstenite::tungstenite::Message::text(format!(
            "hello {i}"
        )))
        .await
        .unwrap();
        let back = sock.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), format!("hello {i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_and_the_process_survives() {
    let b = Backend::start("127.0.0.1", "b").await;
    let mut gw = Gateway::start(&format!(
        "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
        b.addr
    ))
    .await;
    let cases: &[&[u8]] = &[
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\xff\xfe\xfd\r\n\r\n",
    ];
    for case in cases {
        let out = raw_request(gw.http, case, Duration::from_secs(3)).await;
        let status: u16 = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!(
            out.is_empty() || (400..500).contains(&status),
            "{:?} got {out:?}",
            String::from_utf8_lossy(case)
        );
    }
    assert_eq!(b.hits(), 0, "nothing malformed reached the backend");
    assert!(gw.alive());
    assert_eq!(
        client().get(gw.url("/ok")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_can_be_turned_off() {
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "forwarding: {{ x_forwarded: false, request_id: false }}\nupstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b, match: {{ path_prefix: /in }} }}\n",
        b.addr
    ))
    .await;
    let c = client();
    let r = c
        .get(gw.url("/in"))
        .header("x-forwarded-for", "10.1.1.1")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("x-request-id").is_none());
    let h = echo(r).await["headers"].clone();
    assert_eq!(
        h["x-forwarded-for"], "10.1.1.1",
        "left as the client sent it"
    );
    assert!(h.get("x-real-ip").is_none());
    assert!(h.get("x-forwarded-proto").is_none());
    assert!(h.get("x-request-id").is_none());
    // Errors still carry an id.
    let r = c.get(gw.url("/elsewhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["request_id"],
        id.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_go_out_in_canonical_case_unless_told_to_keep_them() {
    let answer = b"HTTP/1.1 200 Fine\r\nX-Upstream-Thing: 1\r\nContent-Length: 2\r\n\r\nok";
    let (upstream, heads) = recording_upstream(answer).await;
    let body = |preserve: bool| {
        format!(
            "forwarding: {{ preserve_header_case: {preserve} }}\nupstreams: {{ u: {{ targets: [\"{upstream}\"] }} }}\nroutes: [ {{ name: all, upstream: u }} ]\n"
        )
    };
    let gw = Gateway::start(&body(false)).await;
    let request =
        b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-Custom-Header: one\r\nUser-Agent: t\r\n\r\n";
    // By default, names Pingora knows in title case and the rest in lower case, as HAProxy
    // and Envoy send them; with the option, as the client and the upstream spelled them.
    let cases = [
        (
            false,
            ["x-custom-header: one", "user-agent: t"],
            "x-upstream-thing: 1",
        ),
        (
            true,
            ["X-Custom-Header: one", "User-Agent: t"],
            "X-Upstream-Thing: 1",
        ),
    ];
    for (generation, (preserve, sent, returned)) in (1..).zip(cases) {
        if preserve {
            gw.write_config(&body(true));
            gw.wait_generation(generation).await;
        }
        let answer = raw_request(gw.http, request, Duration::from_secs(1)).await;
        let head = heads
            .lock()
            .unwrap()
            .pop()
            .expect("the request reached the upstream");
        for line in ["Host: a.test", "x-real-ip: 127.0.0.1"].iter().chain(&sent) {
            assert!(
                head.contains(&format!("\r\n{line}")),
                "{line} not in\n{head}"
            );
        }
        assert!(head.contains("\r\nx-request-id: "), "{head}");
        assert!(head.contains("\r\ntraceparent: 00-"), "{head}");
        // The reason phrase is kept, and the request id added, either way.
        assert!(answer.starts_with("HTTP/1.1 200 Fine\r\n"), "{answer}");
        assert!(answer.contains(&format!("\r\n{returned}\r\n")), "{answer}");
        assert!(answer.contains("\r\nx-request-id: "), "{answer}");
    }
}

/// The HPACK representations of a header block, in order: `'i'` indexed, `'a'` literal added
/// to the table, `'w'` literal without indexing, `'n'` literal never indexed (RFC 7541 §6).
fn hpack_representations(block: &[u8]) -> String {
    // An integer with an `n`-bit prefix starting at `block[*at]` (§5.1).
    fn int(block: &[u8], at: &mut usize, n: u32) -> usize {
        let mask = (1usize << n) - 1;
        let mut value = block[*at] as usize & mask;
        *at += 1;
        if value == mask {
            let mut shift = 0;
            loop {
                let b = block[*at] as usize;
                *at += 1;
                value += (b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        value
    }
    // A string literal (§5.2): skipped.
    fn string(block: &[u8], at: &mut usize) {
        let len = int(block, at, 7);
        *at += len;
    }
    let mut kinds = String::new();
    let mut at = 0;
    while at < block.len() {
        let first = block[at];
        let (kind, prefix) = match first {
            b if b & 0x80 != 0 => ('i', 7),
            b if b & 0xc0 == 0x40 => ('a', 6),
            b if b & 0xe0 == 0x20 => {
                int(block, &mut at, 5); // a table size update
                continue;
            }
            b if b & 0xf0 == 0x10 => ('n', 4),
            _ => ('w', 4),
        };
        let name = int(block, &mut at, prefix);
        if kind != 'i' {
            if name == 0 {
                string(block, &mut at);
            }
            string(block, &mut at);
        }
        kinds.push(kind);
    }
    kinds
}

/// Sends one HTTP/2 GET with prior knowledge on a raw connection and returns the header block
/// of its response.
async fn h2_response_block(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame.
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // :method GET, :scheme http, then :path and :authority as literals without indexing.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 6]);
    block.extend_from_slice(b"a.test");
    out.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[1, 0x5, 0, 0, 0, 1]); // HEADERS, END_STREAM | END_HEADERS, stream 1
    out.extend_from_slice(&block);
    s.write_all(&out).await.unwrap();
    let read = async {
        let mut response = Vec::new();
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            s.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            // HEADERS or CONTINUATION of stream 1, until END_HEADERS.
            if stream == 1 && (head[3] == 1 || head[3] == 9) {
                let mut fragment = &payload[..];
                if head[3] == 1 && head[4] & 0x8 != 0 {
                    let pad = fragment[0] as usize;
                    fragment = &fragment[1..fragment.len() - pad];
                }
                if head[3] == 1 && head[4] & 0x20 != 0 {
                    fragment = &fragment[5..];
                }
                response.extend_from_slice(fragment);
                if head[4] & 0x4 != 0 {
                    return response;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a response header block")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_responses_keep_per_response_values_out_of_the_hpack_table() {
    // A request id and a rate-limit state differ on every response: HPACK would add each to
    // the connection's table (evicting what is worth keeping there) after comparing it with
    // every earlier one. They go out as literals never indexed; the rest as HPACK chooses.
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "h2c: true\nrate_limits:\n  rl: {{ rate: 1000/s, burst: 1000 }}\nupstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n  - {{ name: limited, upstream: b, rate_limit: rl, match: {{ path_prefix: /limited }} }}\n",
        b.addr
    ))
    .await;
    for (path, never_indexed) in [("/", 1), ("/limited", 2)] {
        let kinds = hpack_representations(&h2_response_block(gw.http, path).await);
        assert_eq!(
            kinds.matches('n').count(),
            never_indexed,
            "{path}: representations {kinds:?}"
        );
        assert!(kinds.starts_with('i'), "{path}: {kinds:?}"); // :status 200
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_writes_hold_back_no_streamed_chunk_and_lose_no_byte() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The client stream holds small writes (a response's head) for the next flush or the next
    // larger write. A chunked response's first chunk, then a pause: the head and the chunk
    // reach the client at once, not when the response ends.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (mut s, _) = upstream.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _ = s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await;
            });
        }
    });
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  b: {{ targets: [\"{}\"] }}\n  s: {{ targets: [\"{upstream_addr}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n  - {{ name: stream, upstream: s, match: {{ path: /stream }} }}\n",
        b.addr
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"GET /stream HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let asked = std::time::Instant::now();
    let text = read_until_contains(&mut s, "first", Duration::from_secs(5)).await;
    assert!(
        asked.elapsed() < Duration::from_millis(1000),
        "the first chunk came after {:?}: {text:?}",
        asked.elapsed()
    );
    assert!(!text.contains("second"), "{text:?}");
    read_until_contains(&mut s, "second", Duration::from_secs(5)).await;
    server.abort();

    // Content-Length bodies around what is held (4 KiB, a head with them) come whole.
    let c = client();
    for n in [0, 1, 3900, 4096, 4097, 16 * 1024, 64 * 1024 + 7] {
        let r = c
            .get(gw.url(&format!("/bytes?n={n}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), n, "n = {n}");
    }
}

/// Ordinary traffic writes no ERROR line: keep-alive HTTP/1 and HTTP/2 (h2c) clients in
/// parallel on two proxy threads, against healthy replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_traffic_logs_no_error() {
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let body = format!(
        "h2c: true\nupstreams: {{ u: {{ targets: [\"{}\", \"{}\"] }} }}\nroutes: [ {{ name: all, upstream: u }} ]\n",
        a.addr, b.addr
    );
    let gw2 = Gateway::start_edited(&body, |text| text.replace("threads: 1", "threads: 2")).await;
    let h1 = client();
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = if i % 2 == 0 { h1.clone() } else { h2.clone() };
        let url = gw2.url(&format!("/ordinary/{i}"));
        tasks.push(tokio::spawn(async move {
            for _ in 0..150 {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = gw2.log();
    assert!(!log.contains(" ERROR "), "{log}");
}
