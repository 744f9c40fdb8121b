//! `compress` through the real binary: negotiation from `Accept-Encoding`, the three codings
//! decoded back to the upstream's bytes over HTTP/1.1, HTTP/1.0 and HTTP/2, streaming, and the
//! responses it must leave alone (small, other types, already encoded, ranges, no-transform).

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// A JSON-like document of exactly `n` bytes (varied enough that it does not compress to
/// nothing, regular enough that it compresses well).
fn document(n: usize) -> Vec<u8> {
    let mut out = b"[".to_vec();
    let mut i = 0u64;
    while out.len() < n {
        let item = format!(
            "{{\"id\":{i},\"name\":\"product {i}\",\"price\":{}.{:02},\"stock\":{}}},",
            i * 7 % 1000,
            i % 100,
            i * 13 % 97
        );
        out.extend_from_slice(item.as_bytes());
        i += 1;
    }
    out.truncate(n);
    out
}

/// An upstream answering `GET /doc` as its query says: `n` bytes of [`document`] (or `gzip`'s
/// bytes, sent with `Content-Encoding: gzip`), with `type`, `cc` (`Cache-Control`), `etag`,
/// `status` and `range` (`Content-Range`) set when given; `chunked=1` streams it without a
/// length; `hold=1` sends the first half and then waits for [`Docs::release`].
struct Docs {
    addr: SocketAddr,
    gate: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Docs {
    async fn start(gzip: Bytes) -> Docs {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Notify::new());
        let g = gate.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (g, gzip) = (g.clone(), gzip.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    answer(req, g.clone(), gzip.clone())
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Docs { addr, gate, task }
    }

    fn release(&self) {
        self.gate.notify_one();
    }
}

impl Drop for Docs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn answer(
    req: Request<Incoming>,
    gate: Arc<Notify>,
    gzip: Bytes,
) -> Result<Response<Body>, std::io::Error> {
    let q: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%20", " ").replace("%22", "\"")))
        .collect();
    let mut resp = Response::builder();
    let body = if q.contains_key("gzip") {
        resp = resp.header("content-encoding", "gzip");
        gzip.clone()
    } else {
        Bytes::from(document(
            q.get("n").and_then(|n| n.parse().ok()).unwrap_or(0),
        ))
    };
    let kind = q.get("type").map_or("application/json", String::as_str);
    resp = resp.header("content-type", kind);
    for (param, header) in [
        ("cc", "cache-control"),
        ("etag", "etag"),
        ("range", "content-range"),
    ] {
        if let Some(v) = q.get(param) {
            resp = resp.header(header, v.as_str());
        }
    }
    if let Some(s) = q.get("status") {
        resp = resp.status(s.parse::<u16>().unwrap());
    }
    let chunked = q.contains_key("chunked");
    let hold = q.contains_key("hold");
    if !chunked {
        resp = resp.header("content-length", body.len());
    }
    if !chunked && !hold {
        return Ok(resp
            .body(Full::new(body).map_err(|e| match e {}).boxed())
            .unwrap());
    }
    // Streamed in 16 KiB frames; with `hold`, the second half waits for the test.
    let half = body.len() / 2;
    let stream = futures_util::stream::unfold(0usize, move |at| {
        let (body, gate) = (body.clone(), gate.clone());
        async move {
            if at >= body.len() {
                return None;
            }
            if hold && at == half {
                gate.notified().await;
            }
            let limit = if hold && at < half { half } else { body.len() };
            let end = (at + 16 * 1024).min(limit);
            Some((Ok(Frame::data(body.slice(at..end))), end))
        }
    });
    Ok(resp.body(BodyExt::boxed(StreamBody::new(stream))).unwrap())
}

fn decode(coding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(bytes, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::decode_all(bytes).unwrap(),
        other => panic!("unexpected coding {other}"),
    }
    out
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

async fn get(url: String, accept: Option<&str>) -> reqwest::Response {
    let mut req = client().get(url);
    if let Some(a) = accept {
        req = req.header("accept-encoding", a);
    }
    req.send().await.unwrap()
}

fn config(docs: &Docs, policy: &str) -> String {
    format!(
        "h2c: true\npolicies:\n  squeeze: {{ compress: {policy} }}\nupstreams: {{ d: {{ targets: [\"{}\"] }} }}\nroutes:\n  - {{ name: docs, upstream: d, policies: [squeeze] }}\n",
        docs.addr
    )
}

#[tokio::test]
async fn compresses_what_the_client_accepts_and_decodes_to_the_same_bytes() {
    let docs = Docs::start(Bytes::new()).await;
    let gw = Gateway::start(&config(&docs, "{ levels: { gzip: 6 } }")).await;
    let big = document(256 * 1024);

    // The client's q-values choose; ties go to the gateway's order (zstd, br, gzip).
    for (accept, coding) in [
        ("gzip", "gzip"),
        ("gzip, deflate, br", "br"),
        ("gzip, br, zstd", "zstd"),
        ("br;q=0.5, gzip;q=0.9", "gzip"),
        ("*", "zstd"),
        ("zstd;q=0, br;q=0, *;q=0.2", "gzip"),
    ] {
        let resp = get(gw.url("/doc?n=262144"), Some(accept)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "content-encoding"), Some(coding), "{accept}");
        assert_eq!(header(&resp, "vary"), Some("accept-encoding"));
        assert_eq!(header(&resp, "content-length"), None, "{accept}");
        assert_eq!(header(&resp, "transfer-encoding"), Some("chunked"));
        let bytes = resp.bytes().await.unwrap();
        assert!(
            bytes.len() < big.len() / 4,
            "{coding}: {} bytes",
            bytes.len()
        );
        assert_eq!(decode(coding, &bytes), big, "{accept}");
    }

    // Nothing acceptable: the bytes as they were, still marked as varying.
    for accept in [None, Some("identity"), Some("gzip;q=0, deflate")] {
        let resp = get(gw.url("/doc?n=262144"), accept).await;
        assert_eq!(header(&resp, "content-encoding"), None, "{accept:?}");
        assert_eq!(header(&resp, "vary"), Some("accept-encoding"));
        assert_eq!(header(&resp, "content-length"), Some("262144"));
        assert_eq!(resp.bytes().await.unwrap(), big);
    }

    // An upstream body without a length, and a strong validator made weak.
    let resp = get(
        gw.url("/doc?n=100000&chunked=1&etag=%22v1%22&type=text/html;%20charset=utf-8"),
        Some("gzip"),
    )
    .await;
    assert_eq!(header(&resp, "content-encoding"), Some("gzip"));
    assert_eq!(header(&resp, "etag"), Some("W/\"v1\""));
    assert_eq!(
        decode("gzip", &resp.bytes().await.unwrap()),
        document(100000)
    );

    // HEAD: the headers a GET would have, no body.
    let head = client()
        .head(gw.url("/doc?n=262144"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&head, "content-encoding"), Some("gzip"));
    assert_eq!(head.bytes().await.unwrap().len(), 0);

    // HTTP/2 (h2c): framed by DATA frames, no Transfer-Encoding.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let resp = h2
        .get(gw.url("/doc?n=262144"))
        .header("accept-encoding", "br")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(header(&resp, "content-encoding"), Some("br"));
    assert_eq!(header(&resp, "transfer-encoding"), None);
    assert_eq!(decode("br", &resp.bytes().await.unwrap()), big);

    // HTTP/1.0: no chunks; the body ends when the connection closes.
    let raw = raw_bytes(
        gw.http,
        b"GET /doc?n=65536 HTTP/1.0\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n",
    )
    .await;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert_eq!(decode("gzip", &raw[split + 4..]), document(65536));

    // The bytes in and out are counted per coding.
    let series = |stage: &str| {
        format!("gateway_compression_bytes_total{{encoding=\"gzip\",stage=\"{stage}\"}}")
    };
    let (bytes_in, bytes_out) = (
        gw.metric(&series("in")).await,
        gw.metric(&series("out")).await,
    );
    assert!(bytes_in >= 3.0 * 262144.0, "{bytes_in}");
    assert!(bytes_out < bytes_in / 4.0, "{bytes_out} of {bytes_in}");
}

/// Sends raw bytes and reads until the gateway closes the connection.
async fn raw_bytes(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test]
async fn leaves_alone_what_it_must_not_touch() {
    // A gzip bomb: 64 MiB of zeros in about 64 KiB. The gateway passes it on as it came.
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        std::io::Write::write_all(&mut bomb, &zeros).unwrap();
    }
    let bomb = Bytes::from(bomb.finish().unwrap());
    let docs = Docs::start(bomb.clone()).await;
    let gw = Gateway::start(&config(
        &docs,
        "{ encodings: [gzip], min_size: 2048, types: [application/json] }",
    ))
    .await;

    let untouched = |path: &'static str, vary: bool| {
        let url = gw.url(path);
        async move {
            let resp = get(url, Some("gzip, br, zstd")).await;
            assert_eq!(header(&resp, "content-encoding"), None, "{path}");
            let varies = header(&resp, "vary") == Some("accept-encoding");
            assert_eq!(varies, vary, "{path}");
            resp
        }
    };
    // Below min_size, a type not listed, `no-transform`, a partial answer.
    untouched("/doc?n=2047", false).await;
    untouched("/doc?n=65536&type=image/png", false).await;
    untouched("/doc?n=65536&type=text/plain", false).await;
    untouched("/doc?n=65536&cc=public,%20no-transform", false).await;
    let partial = untouched(
        "/doc?n=65536&status=206&range=bytes%200-65535/200000",
        false,
    )
    .await;
    assert_eq!(partial.status(), 206);
    assert_eq!(partial.bytes().await.unwrap().len(), 65536);
    // A compressible answer at exactly min_size is compressed.
    let at_min = get(gw.url("/doc?n=2048"), Some("gzip")).await;
    assert_eq!(header(&at_min, "content-encoding"), Some("gzip"));

    // The client asked for a range, or for no transformation: the bytes as they are.
    for (name, value) in [("range", "bytes=0-99"), ("cache-control", "no-transform")] {
        let resp = client()
            .get(gw.url("/doc?n=65536"))
            .header("accept-encoding", "gzip")
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(header(&resp, "content-encoding"), None, "{name}");
        assert_eq!(resp.bytes().await.unwrap(), document(65536), "{name}");
    }

    // Already encoded: passed on byte for byte, never inflated, whatever the client accepts.
    for accept in ["gzip", "br", "identity"] {
        let resp = get(gw.url("/doc?gzip=1"), Some(accept)).await;
        assert_eq!(header(&resp, "content-encoding"), Some("gzip"), "{accept}");
        let len = bomb.len().to_string();
        assert_eq!(header(&resp, "content-length"), Some(len.as_str()));
        assert_eq!(resp.bytes().await.unwrap(), bomb, "{accept}");
    }

    // A reload that drops the policy stops compressing.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    gw.write_raw_config(&text.replace(", policies: [squeeze]", ""));
    gw.wait_generation(2).await;
    let plain = get(gw.url("/doc?n=65536"), Some("gzip")).await;
    assert_eq!(header(&plain, "content-encoding"), None);
    assert_eq!(header(&plain, "vary"), None);
}

#[tokio::test]
async fn streams_while_the_upstream_is_still_sending() {
    let docs = Docs::start(Bytes::new()).await;
    let gw = Gateway::start(&config(&docs, "{ encodings: [gzip] }")).await;
    let n = 4 << 20;
    let resp = get(gw.url(&format!("/doc?n={n}&hold=1")), Some("gzip")).await;
    assert_eq!(header(&resp, "content-encoding"), Some("gzip"));
    // The first half is compressed and sent while the upstream holds the second back.
    let mut stream = resp;
    let mut got = Vec::new();
    while got.len() < 64 * 1024 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("compressed bytes before the upstream finished")
            .unwrap()
            .expect("the body ended early");
        got.extend_from_slice(&chunk);
    }
    docs.release();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(decode("gzip", &got), document(n));
}
