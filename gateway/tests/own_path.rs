//! The gateway's own HTTP/1 path (requests without a body to HTTP/1 upstreams) against upstreams
//! that answer with every framing HTTP/1 has, and the hand-over of the other requests to
//! Pingora's proxy on the same client connection. The rest of the suite drives this path too:
//! every HTTP/1 GET in it goes this way.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a [`Scripted`] upstream answers to a request head, and whether it closes the connection
/// after writing it.
type Script = fn(head: &str, nth_on_connection: usize) -> (Vec<u8>, bool);

/// An upstream that answers each request head by its script; it records the heads and counts
/// the connections it accepts. Request bodies it reads by `Content-Length`.
struct Scripted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    async fn start(script: Script) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads: Arc<Mutex<Vec<String>>> = Default::default();
        let (count, record) = (accepted.clone(), heads.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer(conn, script, record.clone()));
            }
        });
        Scripted {
            addr,
            accepted,
            heads,
            task,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut conn: TcpStream, script: Script, record: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for nth in 0.. {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            match conn.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end + 4);
        let len = head
            .to_ascii_lowercase()
            .lines()
            .find_map(|l| {
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < len {
            match conn.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        buf.drain(..len);
        record.lock().unwrap().push(head.clone());
        let (bytes, close) = script(&head, nth);
        if conn.write_all(&bytes).await.is_err() || close {
            return;
        }
    }
}

/// Answers by path: every HTTP/1 framing of a body, an informational answer first, no body.
fn framings(head: &str, _: usize) -> (Vec<u8>, bool) {
    let mut words = head.split(' ');
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (bytes, close): (&[u8], bool) = match path {
        "/length" if method == "HEAD" => (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n", false),
        "/length" => (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlength", false),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n",
            false,
        ),
        // An HTTP/1.0 upstream's body, ended by the close.
        "/close" => (b"HTTP/1.0 200 OK\r\n\r\nclose-delimited", true),
        "/hints" => (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints",
            false,
        ),
        "/none" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/switch" => (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            true,
        ),
        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody", false),
    };
    (bytes.to_vec(), close)
}

/// Sends `request` on `s` and reads until `needle`; the text read.
async fn exchange(s: &mut TcpStream, request: &str, needle: &str) -> String {
    s.write_all(request.as_bytes()).await.unwrap();
    read_until_contains(s, needle, Duration::from_secs(10)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_framing_of_an_answer_passes_on_one_kept_client_connection() {
    let up = Scripted::start(framings).await;
    let gw = Gateway::start(&one_route_to_addr(up.addr, "")).await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");

    let text = exchange(&mut s, &get("/length"), "length").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("content-length: 6"),
        "{text}"
    );

    let text = exchange(&mut s, &get("/chunked"), "\r\n0\r\n\r\n").await;
    assert!(text.contains("chu") && text.contains("nked"), "{text}");

    // A body ended by the upstream's close goes out chunked: the client's connection stays.
    let text = exchange(&mut s, &get("/close"), "\r\n0\r\n\r\n").await;
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{text}");
    assert!(text.contains("close-delimited"), "{text}");

    // An informational answer is passed on before the final one.
    let text = exchange(&mut s, &get("/hints"), "hints").await;
    let (early, fin) = (text.find("103 Early Hints"), text.find("200 OK"));
    assert!(early.is_some() && early < fin, "{text}");
    assert!(text.contains("rel=preload"), "{text}");

    // No body: neither for 204 nor for HEAD, and the next answer is read right.
    let text = exchange(&mut s, &get("/none"), "\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 204"), "{text}");
    let head = "HEAD /length HTTP/1.1\r\nHost: t\r\n\r\n";
    let text = exchange(&mut s, head, "\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("content-length: 6"),
        "{text}"
    );
    assert!(!text.contains("\r\n\r\nlength"), "{text}");
    let text = exchange(&mut s, &get("/other"), "body").await;
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "a body after HEAD's head: {text}"
    );
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());

    // A 101 to a request that asked for no upgrade is refused as an invalid answer (Pingora's
    // proxy would pass it on).
    let text = exchange(&mut s, &get("/switch"), "\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");

    // What went upstream: HTTP/1.1 heads with the forwarding headers, on kept connections.
    let heads = up.heads();
    assert_eq!(heads.len(), 8, "{heads:#?}");
    assert!(
        heads.iter().all(|h| h.contains(" HTTP/1.1\r\n")),
        "{heads:#?}"
    );
    assert!(
        heads
            .iter()
            .all(|h| h.to_ascii_lowercase().contains("x-forwarded-for:")),
        "{heads:#?}"
    );
    // One connection until the close-delimited answer, one after it.
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
}

/// Answers the first request on each connection and closes on the second without answering:
/// a kept connection the upstream had given up on.
fn one_per_connection(_: &str, nth: usize) -> (Vec<u8>, bool) {
    match nth {
        0 => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            false,
        ),
        _ => (Vec::new(), true),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_its_kept_connection_closed_is_sent_again() {
    let up = Scripted::start(one_per_connection).await;
    let gw = Gateway::start(&one_route_to_addr(up.addr, "")).await;
    let c = client();
    for i in 0..5 {
        let r = c.get(gw.url(&format!("/again/{i}"))).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    // Each request after the first met the connection the one before it left: 1 + 2 × 4 heads.
    assert_eq!(up.accepted.load(Ordering::SeqCst), 5);
    let heads = up.heads();
    assert_eq!(heads.len(), 9, "{heads:#?}");
    // A head sent again carries the added fields once, as the first did.
    for head in &heads {
        for name in ADDED {
            assert_eq!(values(head, name).len(), 1, "{name} in {head}");
        }
    }
    let log = gw.log();
    assert!(!log.contains("ERROR"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_a_body_go_through_pingoras_proxy_on_the_same_connection() {
    let backend = Backend::start("127.0.0.1", "b1").await;
    let gw = Gateway::start(&one_route_to(&backend, "")).await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let text = exchange(&mut s, "GET /first HTTP/1.1\r\nHost: t\r\n\r\n", "/first").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let post = "POST /sized HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello";
    let text = exchange(&mut s, post, "\"body_len\":5").await;
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    let chunked = "POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let text = exchange(&mut s, chunked, "\"body_len\":3").await;
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    let text = exchange(&mut s, "GET /last HTTP/1.1\r\nHost: t\r\n\r\n", "/last").await;
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert_eq!(backend.hits(), 4);
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}

/// The fields the gateway adds to every request by default.
const ADDED: [&str; 6] = [
    "x-request-id",
    "traceparent",
    "x-forwarded-for",
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// The values of every line of `head` named `name` (any case).
fn values(head: &str, name: &str) -> Vec<String> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// The one value of `name` in `head`; fails when there are none or several.
fn value(head: &str, name: &str) -> String {
    let all = values(head, name);
    assert_eq!(all.len(), 1, "{name} in {head}");
    all[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_fields_go_upstream_once_each_however_the_client_sent_them() {
    let (addr, heads) = recording_upstream(OK_RESPONSE).await;
    let gw = Gateway::start(&format!(
        "policies: {{ tag: {{ headers: {{ request: {{ set: {{ X-Route: \"{{route}}\" }} }} }} }} }}\n\
         upstreams: {{ b: {{ targets: [\"{addr}\"] }} }}\n\
         routes:\n  - {{ name: tagged, upstream: b, match: {{ path_prefix: /tagged }}, policies: [tag] }}\n  \
         - {{ name: plain, upstream: b }}\n"
    ))
    .await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let ask = |path: &str, fields: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\n{fields}\r\n")
    };
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    // None of the fields from the client: each added once, after the head's own.
    let answer = exchange(&mut s, &ask("/plain", ""), "\r\n\r\nok").await;
    let head = heads.lock().unwrap().last().unwrap().clone();
    assert_eq!(value(&head, "x-forwarded-for"), "127.0.0.1");
    assert_eq!(value(&head, "x-real-ip"), "127.0.0.1");
    assert_eq!(value(&head, "x-forwarded-proto"), "http");
    assert_eq!(value(&head, "x-forwarded-host"), "shop.test");
    let id = value(&head, "x-request-id");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains(&format!("x-request-id: {id}\r\n")),
        "the client's answer names the id the upstream saw: {answer}"
    );
    let traceparent = value(&head, "traceparent");
    assert_eq!(traceparent.len(), 55, "{traceparent}");
    assert!(traceparent.starts_with("00-") && traceparent.ends_with("-00"));
    assert_eq!(value(&head, "host"), "shop.test");

    // Forged forwarding fields are replaced, a valid id and trace context kept: once each.
    let forged = format!(
        "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Host: evil.test\r\n\
         X-Request-Id: client-id-1\r\ntraceparent: {parent}\r\ntracestate: v=1\r\n"
    );
    exchange(&mut s, &ask("/plain", &forged), "\r\n\r\nok").await;
    let head = heads.lock().unwrap().last().unwrap().clone();
    assert_eq!(value(&head, "x-forwarded-for"), "127.0.0.1");
    assert_eq!(value(&head, "x-real-ip"), "127.0.0.1");
    assert_eq!(value(&head, "x-forwarded-proto"), "http");
    assert_eq!(value(&head, "x-forwarded-host"), "shop.test");
    assert_eq!(value(&head, "x-request-id"), "client-id-1");
    assert_eq!(value(&head, "traceparent"), parent);
    assert_eq!(value(&head, "tracestate"), "v=1");

    // A trace state without a parent is dropped; a new parent goes instead.
    exchange(&mut s, &ask("/plain", "tracestate: v=1\r\n"), "\r\n\r\nok").await;
    let head = heads.lock().unwrap().last().unwrap().clone();
    assert!(values(&head, "tracestate").is_empty(), "{head}");
    assert_ne!(value(&head, "traceparent"), parent);

    // A policy's edit goes into the head's fields, the added fields once after them.
    exchange(&mut s, &ask("/tagged", ""), "\r\n\r\nok").await;
    let head = heads.lock().unwrap().last().unwrap().clone();
    assert_eq!(value(&head, "x-route"), "tagged");
    for name in ADDED {
        value(&head, name);
    }
    assert_eq!(heads.lock().unwrap().len(), 4);
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_go_out_in_canonical_case_with_nothing_added() {
    let answer = b"HTTP/1.1 200 OK\r\nX-Upstream-Thing: 1\r\nContent-Length: 2\r\n\r\nok";
    let (addr, heads) = recording_upstream(answer).await;
    let gw = Gateway::start(&one_route_to_addr(
        addr,
        "forwarding: { x_forwarded: false, request_id: false, traceparent: false }\n",
    ))
    .await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let ask = "GET /x HTTP/1.1\r\nHost: a.test\r\nX-Custom-Header: one\r\n\r\n";
    let text = exchange(&mut s, ask, "\r\n\r\nok").await;
    // No edit to either head, and still neither keeps the spelling it was read with.
    assert!(text.contains("\r\nx-upstream-thing: 1\r\n"), "{text}");
    let head = heads.lock().unwrap().last().unwrap().clone();
    assert!(head.contains("\r\nx-custom-header: one"), "{head}");
    assert!(head.contains("\r\nHost: a.test"), "{head}");
    for name in ADDED {
        assert!(values(&head, name).is_empty(), "{name} in {head}");
    }
}
