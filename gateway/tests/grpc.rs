//! gRPC through the gateway: a real gRPC service (tonic, `services/grpc-echo`) behind it, real
//! gRPC and gRPC-Web clients in front, over h2c and TLS on both sides.

mod common;

use base64::Engine;
use common::*;
use grpc_echo::{EchoClient, Msg, Server, Tls, TRAILER_BIN};
use prost::Message;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request};

const ECHO_BIN: &[u8] = &[0xde, 0xad, 0x00, 0x01, 0xff];

async fn h2c_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn h2c_client(addr: SocketAddr) -> EchoClient<Channel> {
    EchoClient::new(h2c_channel(addr).await)
}

async fn tls_client(addr: SocketAddr, dir: &Path, name: &str) -> EchoClient<Channel> {
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(name);
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    EchoClient::new(channel)
}

/// The messages of a stream that must end cleanly.
async fn count(stream: &mut tonic::Streaming<Msg>) -> usize {
    let mut n = 0;
    while stream.message().await.unwrap().is_some() {
        n += 1;
    }
    n
}

/// The status a stream that must fail ends with.
async fn failure(stream: &mut tonic::Streaming<Msg>) -> tonic::Status {
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended cleanly"),
            Err(e) => return e,
        }
    }
}

/// A binary metadata entry's bytes (present, or the test fails).
fn bin(meta: &tonic::metadata::MetadataMap, key: &str) -> bytes::Bytes {
    meta.get_bin(key).unwrap().to_bytes().unwrap()
}

fn msg(text: &str) -> Msg {
    Msg {
        text: text.into(),
        ..Msg::default()
    }
}

fn with_echo_bin<T>(message: T) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert_bin("x-echo-bin", MetadataValue::from_bytes(ECHO_BIN));
    req
}

fn tls_of(dir: &Path, name: &str) -> Tls {
    Tls {
        cert: std::fs::read(dir.join(format!("{name}.pem"))).unwrap(),
        key: std::fs::read(dir.join(format!("{name}-key.pem"))).unwrap(),
    }
}

/// The four call kinds, their metadata both ways and their trailers, through `client`.
async fn every_call_kind(client: &mut EchoClient<Channel>, replica: &str) {
    // Unary: the answer and the echoed binary header.
    let resp = client.unary(with_echo_bin(msg("hello"))).await.unwrap();
    assert_eq!(bin(resp.metadata(), "x-echo-bin"), ECHO_BIN);
    let m = resp.into_inner();
    assert_eq!((m.text.as_str(), m.replica.as_str()), ("hello", replica));

    // A status of the service's own, with its message and trailers.
    let err = client
        .unary(with_echo_bin(msg("fail:5:no such thing ✓")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "no such thing ✓");
    assert_eq!(bin(err.metadata(), "x-trailer-bin"), TRAILER_BIN);

    // Server streaming, then its trailers.
    let mut stream = client
        .server_stream(with_echo_bin(Msg {
            count: 50,
            ..msg("s")
        }))
        .await
        .unwrap()
        .into_inner();
    let mut got = 0;
    while let Some(m) = stream.message().await.unwrap() {
        assert_eq!(m.count, got);
        got += 1;
    }
    assert_eq!(got, 50);
    let trailers = stream.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");

    // A stream that fails after its messages: status, message and binary metadata arrive in
    // the trailers, after the data.
    let mut stream = client
        .server_stream(with_echo_bin(Msg {
            count: 3,
            ..msg("fail:10:aborted late")
        }))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    let err = stream.message().await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Aborted, "aborted late"));
    assert_eq!(bin(err.metadata(), "x-trailer-bin"), TRAILER_BIN);
    assert_eq!(bin(err.metadata(), "x-echo-bin"), ECHO_BIN);

    // Client streaming.
    let msgs: Vec<Msg> = (0..100).map(|i| msg(&format!("c{i}"))).collect();
    let resp = client
        .client_stream(with_echo_bin(tokio_stream::iter(msgs)))
        .await
        .unwrap();
    assert_eq!(bin(resp.metadata(), "x-echo-bin"), ECHO_BIN);
    let m = resp.into_inner();
    assert_eq!((m.count, m.text.as_str()), (100, "c99"));

    // Bidirectional: 10,000 messages each way.
    let msgs: Vec<Msg> = (0..10_000).map(|i| msg(&i.to_string())).collect();
    let mut stream = client
        .bidi(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = stream.message().await.unwrap() {
        assert_eq!(m.text, n.to_string());
        n += 1;
    }
    assert_eq!(n, 10_000);
    assert!(stream.trailers().await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_kind_passes_over_tls_and_h2c_with_trailers_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // One certificate, for both names.
    certs(d, &["gw.test", "backend.test"]);
    let plain = Server::start("127.0.0.1", "plain", None).unwrap();
    let secure = Server::start("127.0.0.1", "secure", Some(tls_of(d, "gw.test"))).unwrap();
    let (https, listener) = tls_listener("https", d, &["gw.test"], "");
    let gw = Gateway::start_with(
        "",
        &listener,
        &format!(
            r#"h2c: true
upstreams:
  plain: {{ targets: ["{0}"], protocol: h2c, h2: {{ max_streams: 50, ping_interval: 5s }} }}
  secure: {{ targets: ["{1}"], protocol: h2, tls: {{ sni: backend.test, ca: "{2}/ca.pem" }} }}
  either: {{ targets: ["{1}"], protocol: auto, tls: {{ sni: backend.test, ca: "{2}/ca.pem" }} }}
routes:
  - {{ name: either, upstream: either, match: {{ path_prefix: /test.Echo/, headers: [ {{ name: x-to, value: auto }} ] }} }}
  - {{ name: secure, upstream: secure, match: {{ path_prefix: /test.Echo/, headers: [ {{ name: x-to, value: secure }} ] }} }}
  - {{ name: echo, upstream: plain, match: {{ path_prefix: /test.Echo/ }} }}
"#,
            plain.addr,
            secure.addr,
            d.display()
        ),
    )
    .await;

    let mut over_h2c = h2c_client(gw.http).await;
    every_call_kind(&mut over_h2c, "plain").await;
    let mut over_tls = tls_client(https, d, "gw.test").await;
    every_call_kind(&mut over_tls, "plain").await;

    // An upstream spoken to over TLS (ALPN h2), chosen by a header (gRPC metadata).
    let mut to_secure = over_tls.clone();
    let mut req = Request::new(msg("tls"));
    req.metadata_mut()
        .insert("x-to", MetadataValue::from_static("secure"));
    let m = to_secure.unary(req).await.unwrap().into_inner();
    assert_eq!(m.replica, "secure");
    // `auto`: ALPN picks HTTP/2 with a server that offers it.
    let mut req = Request::new(msg("alpn"));
    req.metadata_mut()
        .insert("x-to", MetadataValue::from_static("auto"));
    let m = to_secure.unary(req).await.unwrap().into_inner();
    assert_eq!(m.replica, "secure");

    // Many calls at once share the upstream's HTTP/2 connections.
    let calls = (0..200).map(|i| {
        let mut c = over_h2c.clone();
        async move {
            c.unary(msg(&i.to_string()))
                .await
                .unwrap()
                .into_inner()
                .text
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert_eq!(answers.len(), 200);
    assert!(answers.iter().enumerate().all(|(i, t)| *t == i.to_string()));

    let ok = gw
        .metric("gateway_grpc_calls_total{grpc_status=\"OK\",route=\"echo\"}")
        .await;
    // Four kinds per client (the failing stream is ABORTED), and the 200 at once.
    assert_eq!(ok, 208.0, "OK calls counted: {ok}");
    let not_found = gw
        .metric("gateway_grpc_calls_total{grpc_status=\"NOT_FOUND\",route=\"echo\"}")
        .await;
    assert_eq!(not_found, 2.0);
    assert_eq!(gw.exported("gateway_grpc_calls_in_flight").await, Some(0.0));
}

const SECRET: &str = "grpc-test-secret-grpc-test-secret-0123";

fn token(role: &str) -> String {
    let claims = serde_json::json!({"sub": "u1", "role": role, "exp": 4_000_000_000u64});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn bearer<T>(message: T, role: &str) -> Request<T> {
    let mut req = Request::new(message);
    let value = format!("Bearer {}", token(role));
    req.metadata_mut()
        .insert("authorization", value.parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_refusals_read_as_grpc_statuses() {
    let server = Server::start("127.0.0.1", "one", None).unwrap();
    let dead = DeadPort::reserve();
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("access.log");
    // Never answers: only the gateway can end a call to it.
    let silent = SilentPort::start().await;
    let silent_addr = silent.addr;
    let gw = Gateway::start(&format!(
        r#"h2c: true
auth:
  admins: {{ secret: "{SECRET}", claims: {{ role: admin }} }}
rate_limits:
  one: {{ rate: 1/m, burst: 1 }}
upstreams:
  echo: {{ targets: ["{}"], protocol: h2c }}
  gone: {{ targets: ["127.0.0.1:{}"], protocol: h2c, retries: 0 }}
  silent: {{ targets: ["{}"], protocol: h2c, retries: 0 }}
access_log: {{ path: "{}" }}
routes:
  - {{ name: auth, upstream: echo, auth: admins, match: {{ path_prefix: /test.Echo/, headers: [ {{ name: x-case, value: auth }} ] }} }}
  - {{ name: limited, upstream: echo, rate_limit: one, match: {{ path_prefix: /test.Echo/, headers: [ {{ name: x-case, value: limit }} ] }} }}
  - {{ name: gone, upstream: gone, match: {{ path_prefix: /test.Echo/, headers: [ {{ name: x-case, value: gone }} ] }} }}
  - {{ name: small, upstream: echo, max_request_body: 64, match: {{ path_prefix: /test.Echo/, headers: [ {{ name: x-case, value: small }} ] }} }}
  - {{ name: silent, upstream: silent, match: {{ path_prefix: /test.Echo/, headers: [ {{ name: x-case, value: silent }} ] }} }}
  - {{ name: echo, upstream: echo, match: {{ path_prefix: /test.Echo/ }} }}
"#,
        server.addr,
        dead.port,
        silent_addr,
        log.display()
    ))
    .await;
    let mut client = h2c_client(gw.http).await;
    let case = |m: Msg, c: &'static str| {
        let mut req = Request::new(m);
        req.metadata_mut()
            .insert("x-case", MetadataValue::from_static(c));
        req
    };

    // No route: the health service is not routed here.
    let mut health = tonic_health::pb::health_client::HealthClient::new(h2c_channel(gw.http).await);
    let err = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert_eq!(err.message(), "no route");

    // JWT: no token (401), a token without the role (403), the right one.
    let err = client.unary(case(msg("a"), "auth")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut req = bearer(msg("a"), "user");
    req.metadata_mut()
        .insert("x-case", MetadataValue::from_static("auth"));
    let err = client.unary(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut req = bearer(msg("a"), "admin");
    req.metadata_mut()
        .insert("x-case", MetadataValue::from_static("auth"));
    assert_eq!(client.unary(req).await.unwrap().into_inner().text, "a");

    // Rate limit: the second call is refused (429).
    client.unary(case(msg("l"), "limit")).await.unwrap();
    let err = client.unary(case(msg("l"), "limit")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // A request body over the route's limit, to an HTTP/2 upstream: refused at once (413).
    let started = Instant::now();
    let err = client
        .unary(case(msg(&"x".repeat(1000)), "small"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // No replica answers (502/503).
    let err = client.unary(case(msg("g"), "gone")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The client's deadline bounds the upstream attempt: the gateway gives up at it. A bare
    // HTTP/2 client sends it (tonic's client would also enforce it itself), to an upstream
    // that never answers (a tonic server would also enforce it).
    let started = Instant::now();
    let (status, head) = raw_call(
        gw.http,
        "/test.Echo/Unary",
        "300m",
        &msg("slow").encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(head["grpc-status"], "4", "{head:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let metric =
        |s: &str, r: &str| format!("gateway_grpc_calls_total{{grpc_status=\"{s}\",route=\"{r}\"}}");
    assert_eq!(gw.metric(&metric("UNIMPLEMENTED", "(none)")).await, 1.0);
    assert_eq!(gw.metric(&metric("UNAUTHENTICATED", "auth")).await, 1.0);
    assert_eq!(gw.metric(&metric("PERMISSION_DENIED", "auth")).await, 1.0);
    assert_eq!(gw.metric(&metric("UNAVAILABLE", "limited")).await, 1.0);
    assert_eq!(gw.metric(&metric("UNAVAILABLE", "gone")).await, 1.0);
    // The gateway's own timeout, not only the client's, ended the call.
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.metric(&metric("DEADLINE_EXCEEDED", "silent")).await != 1.0 {
        assert!(Instant::now() < deadline, "no DEADLINE_EXCEEDED counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The access log names each call's status.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let statuses: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["grpc_status"].as_str().map(str::to_string))
            .collect();
        let wanted = [
            "UNIMPLEMENTED",
            "UNAUTHENTICATED",
            "PERMISSION_DENIED",
            "OK",
            "UNAVAILABLE",
            "DEADLINE_EXCEEDED",
        ];
        if wanted.iter().all(|w| statuses.iter().any(|s| s == w)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "access log statuses: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_fails_the_stream_unavailable_and_calls_go_to_the_other() {
    let a = Server::start("127.0.0.1", "a", None).unwrap();
    let b = Server::start("127.0.0.1", "b", None).unwrap();
    let dead = DeadPort::reserve();
    let gw = Gateway::start(&format!(
        "h2c: true\nupstreams:\n  echo: {{ targets: [\"{}\", \"{}\", \"127.0.0.1:{}\"], protocol: h2c }}\nroutes:\n  - {{ name: echo, upstream: echo }}\n",
        a.addr, b.addr, dead.port
    ))
    .await;
    let mut client = h2c_client(gw.http).await;

    // A refused connection is retried on another replica: no call fails.
    for i in 0..6 {
        client.unary(msg(&i.to_string())).await.unwrap();
    }

    let mut stream = client
        .server_stream(Msg {
            count: 10_000,
            delay_ms: 10,
            ..msg("long")
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let (victim, survivor) = match first.replica.as_str() {
        "a" => (a, "b"),
        _ => (b, "a"),
    };
    victim.kill();
    let err = failure(&mut stream).await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The gateway's trailers, not a reset (tonic reports a reset as UNAVAILABLE too).
    assert_eq!(err.message(), "bad gateway");

    for i in 0..10 {
        let m = client
            .unary(msg(&i.to_string()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(m.replica, survivor);
    }
}

/// Which replicas answer `n` unary calls.
async fn answering(client: &mut EchoClient<Channel>, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for i in 0..n {
        let m = client
            .unary(msg(&i.to_string()))
            .await
            .unwrap()
            .into_inner();
        if !seen.contains(&m.replica) {
            seen.push(m.replica);
        }
    }
    seen.sort();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_remove_and_restore_a_replica() {
    let a = Server::start("127.0.0.1", "a", None).unwrap();
    let b = Server::start("127.0.0.1", "b", None).unwrap();
    let gw = Gateway::start(&format!(
        r#"h2c: true
upstreams:
  echo:
    targets: ["{}", "{}"]
    protocol: h2c
    health:
      active: {{ grpc: {{ service: test.Echo }}, interval: 100ms, timeout: 1s, rise: 1, fall: 1 }}
routes:
  - {{ name: echo, upstream: echo }}
"#,
        a.addr, b.addr
    ))
    .await;
    assert_eq!(
        gw.admin_json("/upstreams").await["upstreams"]["echo"]["protocol"],
        "h2c"
    );
    let mut client = h2c_client(gw.http).await;
    assert_eq!(answering(&mut client, 10).await, ["a", "b"]);

    b.set_serving(false).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while answering(&mut client, 10).await != ["a"] {
        assert!(Instant::now() < deadline, "b was never taken out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let down = format!(
        "gateway_upstream_replica_up{{target=\"{}\",upstream=\"echo\"}}",
        b.addr
    );
    assert_eq!(gw.exported(&down).await, Some(0.0));

    b.set_serving(true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while answering(&mut client, 10).await != ["a", "b"] {
        assert!(Instant::now() < deadline, "b never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gRPC-Web frame: flag, length, bytes.
fn frame(flag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_calls_reach_a_plain_grpc_upstream() {
    let server = Server::start("127.0.0.1", "web", None).unwrap();
    let gw = Gateway::start(&format!(
        r#"policies:
  web: {{ grpc_web: {{}} }}
  browsers:
    cors:
      allow_origins: ["https://app.test"]
      allow_headers: [content-type, x-grpc-web, x-user-agent, grpc-timeout]
      expose_headers: [grpc-status, grpc-message]
upstreams:
  echo: {{ targets: ["{}"], protocol: h2c }}
routes:
  - {{ name: web, upstream: echo, policies: [browsers, web], match: {{ path_prefix: /test.Echo/ }} }}
"#,
        server.addr
    ))
    .await;

    // tonic-web's client encoder over HTTP/1.1.
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<tonic_web::GrpcWebCall<tonic::body::Body>>();
    let svc = tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebClientLayer::new())
        .service(http);
    let mut web = EchoClient::with_origin(svc, gw.url("").parse().unwrap());
    let m = web.unary(msg("from a browser")).await.unwrap().into_inner();
    assert_eq!(
        (m.text.as_str(), m.replica.as_str()),
        ("from a browser", "web")
    );
    let err = web.unary(msg("fail:9:precondition")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(err.message(), "precondition");
    let mut stream = web
        .server_stream(Msg {
            count: 20,
            ..msg("s")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count(&mut stream).await, 20);

    // The base64 form, by hand: one message in, one message and the trailer frame out.
    let body = frame(0, &msg("text form").encode_to_vec());
    let b64 = base64::engine::general_purpose::STANDARD;
    let resp = client()
        .post(gw.url("/test.Echo/Unary"))
        .header("content-type", "application/grpc-web-text+proto")
        .header("x-grpc-web", "1")
        .header("origin", "https://app.test")
        .body(b64.encode(&body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The upstream's own subtype (none from tonic) carried over.
    assert_eq!(resp.headers()["content-type"], "application/grpc-web-text");
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.test"
    );
    let text = resp.text().await.unwrap();
    let raw = decode_chunked_base64(text.trim());
    assert_eq!(raw[0], 0);
    let len = u32::from_be_bytes(raw[1..5].try_into().unwrap()) as usize;
    let answer = Msg::decode(&raw[5..5 + len]).unwrap();
    assert_eq!(answer.text, "text form");
    let trailer = &raw[5 + len..];
    assert_eq!(trailer[0], 0x80);
    let trailer_text = String::from_utf8_lossy(&trailer[5..]).to_lowercase();
    assert!(trailer_text.contains("grpc-status:0\r\n"), "{trailer_text}");

    // A text body that is not base64: refused as a status, at once.
    let bad = client()
        .post(gw.url("/test.Echo/Unary"))
        .header("content-type", "application/grpc-web-text")
        .body("!!!!not base64")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 200);
    assert_eq!(bad.headers()["grpc-status"], "13");

    // The browser's preflight is answered, and a gateway refusal is a gRPC-Web status.
    let pre = client_request("OPTIONS", &gw.url("/test.Echo/Unary"))
        .header("origin", "https://app.test")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success(), "{}", pre.status());
    let refused = client()
        .post(gw.url("/elsewhere.Service/Call"))
        .header("content-type", "application/grpc-web+proto")
        .body(frame(0, b""))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 200);
    assert_eq!(refused.headers()["grpc-status"], "12");
    assert_eq!(
        refused.headers()["content-type"],
        "application/grpc-web+proto"
    );
}

/// One unary call with `grpc-timeout: timeout` by a bare HTTP/2 client: the HTTP status and
/// the response head (a trailers-only answer carries the gRPC status there).
async fn raw_call(
    addr: SocketAddr,
    path: &str,
    timeout: &str,
    message: &[u8],
) -> (u16, http::HeaderMap) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .header("x-case", "silent")
        .body(())
        .unwrap();
    let (resp, mut body) = client.send_request(req, false).unwrap();
    body.send_data(frame(0, message).into(), true).unwrap();
    let resp = resp.await.unwrap();
    (resp.status().as_u16(), resp.headers().clone())
}

/// A gRPC-Web text body: base64 that may be padded at the end of each chunk the server sent.
fn decode_chunked_base64(text: &str) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for end in (4..=bytes.len()).step_by(4) {
        if bytes[end - 1] == b'=' || end == bytes.len() {
            out.extend(b64.decode(&bytes[start..end]).unwrap());
            start = end;
        }
    }
    out
}

fn client_request(method: &str, url: &str) -> reqwest::RequestBuilder {
    client().request(method.parse().unwrap(), url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_streams_outlive_the_read_timeout_and_stream_idle_bounds_them() {
    let server = Server::start("127.0.0.1", "s", None).unwrap();
    let gw = Gateway::start(&format!(
        r#"h2c: true
upstreams:
  patient: {{ targets: ["{0}"], protocol: h2c, timeouts: {{ read: 200ms, stream_idle: 5s }} }}
  strict: {{ targets: ["{0}"], protocol: h2c, retries: 0, timeouts: {{ read: 5s, stream_idle: 300ms }} }}
routes:
  - {{ name: strict, upstream: strict, match: {{ path_prefix: /test.Echo/, headers: [ {{ name: x-to, value: strict }} ] }} }}
  - {{ name: patient, upstream: patient }}
"#,
        server.addr
    ))
    .await;
    let mut client = h2c_client(gw.http).await;
    // Messages 600 ms apart: past `read`, within `stream_idle`.
    let mut stream = client
        .server_stream(Msg {
            count: 3,
            delay_ms: 600,
            ..msg("slow")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count(&mut stream).await, 3);

    // Past `stream_idle`, the call ends with a status (the gateway's timeout), not a reset.
    let mut req = Request::new(Msg {
        count: 3,
        delay_ms: 600,
        ..msg("slow")
    });
    req.metadata_mut()
        .insert("x-to", MetadataValue::from_static("strict"));
    let err = match client.server_stream(req).await {
        Err(e) => e,
        Ok(resp) => failure(&mut resp.into_inner()).await,
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "upstream timeout");
}

/// An upstream's gRPC status judges the call for its circuit breaker, mapped to HTTP as Envoy
/// maps it: `UNAVAILABLE` counts as a 503, whether it comes in the head (trailers-only) or in
/// the trailers after messages; `NOT_FOUND` (a 404) does not count.
#[tokio::test]
async fn unavailable_calls_open_the_circuit_as_503s_would() {
    let unary = Server::start("127.0.0.1", "unary", None).unwrap();
    let streams = Server::start("127.0.0.1", "streams", None).unwrap();
    let breaker =
        "circuit_breaker: { min_requests: 4, failure_percent: 50, window: 10s, open_for: 30s }";
    let gw = Gateway::start(&format!(
        r#"h2c: true
upstreams:
  unary: {{ targets: ["{}"], protocol: h2c, retries: 0, {breaker} }}
  streams: {{ targets: ["{}"], protocol: h2c, retries: 0, {breaker} }}
routes:
  - {{ name: streams, upstream: streams, match: {{ path_prefix: /test.Echo/, headers: [ {{ name: x-case, value: streams }} ] }} }}
  - {{ name: unary, upstream: unary, match: {{ path_prefix: /test.Echo/ }} }}
"#,
        unary.addr, streams.addr
    ))
    .await;
    let mut client = h2c_client(gw.http).await;
    let circuit = |ups: &serde_json::Value, name: &str| ups["upstreams"][name]["circuit"].clone();

    // Statuses a breaker does not count: the circuit stays closed.
    for _ in 0..6 {
        let err = client.unary(msg("fail:5:not here")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    assert_eq!(
        circuit(&gw.admin_json("/upstreams").await, "unary"),
        "closed"
    );

    // Trailers-only UNAVAILABLE answers: with the sixth, half the attempts have failed and the
    // circuit opens; the next call is refused by the gateway without reaching the service.
    for _ in 0..6 {
        let err = client.unary(msg("fail:14:down")).await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::Unavailable, "down"));
    }
    assert_eq!(circuit(&gw.admin_json("/upstreams").await, "unary"), "open");
    let err = client.unary(msg("hello")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "upstream circuit open");

    // Streams that fail after their messages: the status in the trailers is what counts.
    let streamed = |text: &'static str| {
        let mut req = Request::new(Msg {
            count: 2,
            ..msg(text)
        });
        req.metadata_mut()
            .insert("x-case", MetadataValue::from_static("streams"));
        req
    };
    for _ in 0..4 {
        let mut stream = client
            .server_stream(streamed("fail:14:gone late"))
            .await
            .unwrap()
            .into_inner();
        let err = failure(&mut stream).await;
        assert_eq!(
            (err.code(), err.message()),
            (Code::Unavailable, "gone late")
        );
    }
    assert_eq!(
        circuit(&gw.admin_json("/upstreams").await, "streams"),
        "open"
    );
    let err = client
        .server_stream(streamed("s"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.message(), "upstream circuit open");
}

/// Calls their client ends get no verdict from the upstream's breaker, whatever statuses it
/// counts: streams whose deadline runs out after their answer began (the gateway ends them
/// `DEADLINE_EXCEEDED`) and streams the client leaves. The same breaker opens on the
/// upstream's own failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_ended_by_their_client_do_not_count_against_the_upstream() {
    let server = Server::start("127.0.0.1", "slow", None).unwrap();
    let gw = Gateway::start(&format!(
        r#"h2c: true
upstreams:
  echo: {{ targets: ["{}"], protocol: h2c, retries: 0, circuit_breaker: {{ min_requests: 2, failure_percent: 50, window: 10s, open_for: 30s, statuses: [499, 500, 503, 504] }} }}
routes:
  - {{ name: echo, upstream: echo, match: {{ path_prefix: /test.Echo/ }} }}
"#,
        server.addr
    ))
    .await;
    let mut client = h2c_client(gw.http).await;
    let slow = || Msg {
        count: 20,
        delay_ms: 100,
        ..msg("s")
    };
    for _ in 0..3 {
        let mut req = Request::new(slow());
        req.set_timeout(Duration::from_millis(350));
        let mut stream = client.server_stream(req).await.unwrap().into_inner();
        let err = failure(&mut stream).await;
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    }
    for _ in 0..3 {
        let mut stream = client.server_stream(slow()).await.unwrap().into_inner();
        stream.message().await.unwrap().unwrap();
        drop(stream);
    }
    // The gateway sees the resets and ends those calls.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ups = gw.admin_json("/upstreams").await;
    assert_eq!(ups["upstreams"]["echo"]["circuit"], "closed", "{ups}");

    for _ in 0..2 {
        let err = client.unary(msg("fail:14:down")).await.unwrap_err();
        assert_eq!(err.message(), "down");
    }
    let ups = gw.admin_json("/upstreams").await;
    assert_eq!(ups["upstreams"]["echo"]["circuit"], "open", "{ups}");
}
