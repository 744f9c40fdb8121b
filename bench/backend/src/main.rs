//! Benchmark backend: `bench-backend ADDR...` serves, on each address, `GET /` (13 bytes,
//! `hello world!\n`), `/1k`, `/16k`, `/64k` (that many bytes), `/json16k` and `/json256k` (a
//! JSON list of products of that size, `application/json`) and `/health`, over HTTP/1.1
//! keep-alive or HTTP/2 in the clear (prior knowledge), on one thread. `GET /_connections`
//! answers how many connections this process has accepted, over all its addresses.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

/// Connections accepted so far.
static ACCEPTED: AtomicU64 = AtomicU64::new(0);
use tokio::net::TcpListener;

fn body_for(path: &str) -> Bytes {
    static HELLO: &[u8] = b"hello world!\n";
    match path {
        "/1k" => Bytes::from(vec![b'a'; 1024]),
        "/16k" => Bytes::from(vec![b'a'; 16 * 1024]),
        "/64k" => Bytes::from(vec![b'a'; 64 * 1024]),
        "/json16k" => json(16 * 1024),
        "/json256k" => json(256 * 1024),
        _ => Bytes::from_static(HELLO),
    }
}

/// A JSON list of products, `n` bytes long: what an API answers, for the compression runs.
fn json(n: usize) -> Bytes {
    let mut out = String::from("[");
    let mut i = 0u64;
    loop {
        let item = format!(
            "{{\"id\":{i},\"sku\":\"SKU-{:06}\",\"name\":\"Product {i}\",\"price_cents\":{},\"stock\":{},\"tags\":[\"t{}\",\"t{}\"],\"active\":{}}}",
            i * 7919 % 1_000_000,
            i * 37 % 10_000,
            i * 13 % 97,
            i % 11,
            i % 7,
            !i.is_multiple_of(3)
        );
        if out.len() + item.len() + 2 > n {
            break;
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item);
        i += 1;
    }
    out.push(']');
    while out.len() < n {
        out.push(' ');
    }
    Bytes::from(out)
}

fn main() {
    let addrs: Vec<String> = std::env::args().skip(1).collect();
    if addrs.is_empty() {
        eprintln!("usage: bench-backend ADDR [ADDR...]");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let bodies: &'static [(&'static str, Bytes)] = Box::leak(
            ["/", "/1k", "/16k", "/64k", "/json16k", "/json256k"]
                .iter()
                .map(|p| (*p, body_for(p)))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let mut tasks = Vec::new();
        for addr in addrs {
            let listener = TcpListener::bind(&addr).await.expect("bind");
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    ACCEPTED.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.set_nodelay(true);
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let path = req.uri().path();
                            let body = match path {
                                "/_connections" => {
                                    Bytes::from(ACCEPTED.load(Ordering::Relaxed).to_string())
                                }
                                _ => bodies
                                    .iter()
                                    .find(|(p, _)| *p == path)
                                    .map_or_else(|| bodies[0].1.clone(), |(_, b)| b.clone()),
                            };
                            let mut resp = Response::new(Full::new(body));
                            if path.starts_with("/json") {
                                resp.headers_mut().insert(
                                    hyper::header::CONTENT_TYPE,
                                    hyper::header::HeaderValue::from_static("application/json"),
                                );
                            }
                            async move { Ok::<_, Infallible>(resp) }
                        });
                    tokio::spawn(async move {
                        let mut builder = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        );
                        builder.http1().keep_alive(true);
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    });
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}
