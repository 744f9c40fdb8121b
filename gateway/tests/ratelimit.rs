//! Rate limits against the real gateway: a known rate is driven and the 200s and 429s counted,
//! the IETF headers checked, and keys (client IP, header, token claim, route) kept apart.

mod common;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::time::{Duration, Instant};

const SECRET: &str = "an-hmac-secret-that-is-long-enough-0123456789";

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn config(backend: &Backend, extra: &str) -> String {
    format!(
        r#"
{extra}
auth:
  hs: {{ secret: "{SECRET}" }}
rate_limits:
  burst4: {{ rate: 2/s, burst: 4 }}
  steady: {{ rate: 5/s, burst: 5 }}
  by_key: {{ rate: 1/m, burst: 2, key: "header:X-Api-Key", missing_key: reject }}
  by_user: {{ rate: 1/m, burst: 2, key: "jwt:sub" }}
  by_route: {{ rate: 1/m, burst: 3, key: route }}
upstreams:
  b: {{ targets: ["{}"] }}
routes:
  - {{ name: burst, upstream: b, rate_limit: burst4, match: {{ path_prefix: /burst }} }}
  - {{ name: steady, upstream: b, rate_limit: steady, match: {{ path_prefix: /steady }} }}
  - {{ name: keyed, upstream: b, rate_limit: by_key, match: {{ path_prefix: /keyed }} }}
  - {{ name: user, upstream: b, auth: hs, rate_limit: by_user, match: {{ path_prefix: /user }} }}
  - {{ name: route, upstream: b, rate_limit: by_route, match: {{ path_prefix: /route }} }}
  - {{ name: open, upstream: b }}
"#,
        backend.addr
    )
}

async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_rates_and_headers() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&config(&backend, "")).await;
    let c = client();

    // The burst passes, counting down in RateLimit; then 429 with Retry-After.
    for left in [3, 2, 1, 0] {
        let r = c.get(gw.url("/burst")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-policy"], "\"burst4\";q=2;w=1");
        let state = r.headers()["ratelimit"].to_str().unwrap().to_string();
        assert!(
            state.starts_with(&format!("\"burst4\";r={left};t=")),
            "{state}"
        );
    }
    let r = c.get(gw.url("/burst")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["ratelimit"], "\"burst4\";r=0;t=1");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (body["status"].as_u64(), body["request_id"].as_str()),
        (Some(429), Some(id.as_str()))
    );
    // One request is earned back every 500 ms.
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(status(c.get(gw.url("/burst"))).await, 200);
    assert_eq!(status(c.get(gw.url("/burst"))).await, 429);
    // A WebSocket upgrade is counted like any request.
    let upgrade = c
        .get(gw.url("/burst"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(status(upgrade).await, 429);
    // Routes without a limit are untouched.
    assert_eq!(status(c.get(gw.url("/open"))).await, 200);

    // A known rate: 20 requests/s for 2 s against 5/s with a burst of 5 lets about
    // 5 + 2 × 5 = 15 through.
    let start = Instant::now();
    let (mut ok, mut limited) = (0, 0);
    for i in 0..40u32 {
        tokio::time::sleep_until((start + Duration::from_millis(50) * i).into()).await;
        match status(c.get(gw.url("/steady"))).await {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("{other}"),
        }
    }
    assert!((13..=17).contains(&ok), "{ok} passed, {limited} limited");
    assert_eq!(ok + limited, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_kept_apart_and_cannot_be_spoofed() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&config(&backend, "")).await;
    let c = client();

    // Client IP: a forged X-Forwarded-For from an untrusted peer does not buy a new bucket.
    for i in 0..4 {
        let r = c
            .get(gw.url("/burst"))
            .header("x-forwarded-for", format!("10.0.0.{i}"));
        assert_eq!(status(r).await, 200);
    }
    let r = c
        .get(gw.url("/burst"))
        .header("x-forwarded-for", "10.9.9.9");
    assert_eq!(status(r).await, 429);

    // Header key: each key its own bucket; no key is refused (missing_key: reject).
    for _ in 0..2 {
        assert_eq!(
            status(c.get(gw.url("/keyed")).header("x-api-key", "a")).await,
            200
        );
    }
    assert_eq!(
        status(c.get(gw.url("/keyed")).header("x-api-key", "a")).await,
        429
    );
    assert_eq!(
        status(c.get(gw.url("/keyed")).header("x-api-key", "b")).await,
        200
    );
    assert_eq!(status(c.get(gw.url("/keyed"))).await, 400);

    // Token claim: per user, whatever address they come from.
    let (alice, bob) = (token("alice"), token("bob"));
    for _ in 0..2 {
        assert_eq!(
            status(c.get(gw.url("/user")).bearer_auth(&alice)).await,
            200
        );
    }
    assert_eq!(
        status(c.get(gw.url("/user")).bearer_auth(&alice)).await,
        429
    );
    assert_eq!(status(c.get(gw.url("/user")).bearer_auth(&bob)).await, 200);
    // The token check comes first: no token is 401, not a count.
    assert_eq!(status(c.get(gw.url("/user"))).await, 401);

    // Route key: one bucket for everybody.
    for n in 0..3 {
        let r = c.get(gw.url("/route")).header("x-api-key", n.to_string());
        assert_eq!(status(r).await, 200);
    }
    assert_eq!(status(c.get(gw.url("/route"))).await, 429);

    // A reload that keeps a policy keeps its buckets.
    gw.write_config(&config(&backend, "# reloaded"));
    gw.wait_generation(2).await;
    assert_eq!(status(c.get(gw.url("/route"))).await, 429);
    assert_eq!(
        status(c.get(gw.url("/user")).bearer_auth(&alice)).await,
        429
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_give_each_client_its_own_bucket() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&config(&backend, "trusted_proxies: [127.0.0.1/32]")).await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(
            status(
                c.get(gw.url("/burst"))
                    .header("x-forwarded-for", "10.0.0.1")
            )
            .await,
            200
        );
    }
    assert_eq!(
        status(
            c.get(gw.url("/burst"))
                .header("x-forwarded-for", "10.0.0.1")
        )
        .await,
        429
    );
    assert_eq!(
        status(
            c.get(gw.url("/burst"))
                .header("x-forwarded-for", "10.0.0.2")
        )
        .await,
        200
    );
    // Garbage in X-Forwarded-For falls back to the peer, never to "no limit".
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(
            status(
                c.get(gw.url("/burst"))
                    .header("x-forwarded-for", "not-an-ip, ###"),
            )
            .await,
        );
    }
    assert!(codes.contains(&429), "{codes:?}");
}

/// A real `redis-server` on a free port, stopped when dropped.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port("127.0.0.1");
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Redis { child, port }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_a_limit_through_redis() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let mut redis = Redis::start();
    let body = format!(
        r#"
rate_limits:
  shared: {{ rate: 1/m, burst: 4, redis: {{ url: "redis://127.0.0.1:{0}", timeout: 200ms }} }}
  strict: {{ rate: 1/m, burst: 100, redis: {{ url: "redis://127.0.0.1:{0}", on_error: closed, timeout: 200ms }} }}
upstreams:
  b: {{ targets: ["{1}"] }}
routes:
  - {{ name: shared, upstream: b, rate_limit: shared, match: {{ path_prefix: /shared }} }}
  - {{ name: strict, upstream: b, rate_limit: strict, match: {{ path_prefix: /strict }} }}
"#,
        redis.port, backend.addr
    );
    let (a, b) = (Gateway::start(&body).await, Gateway::start(&body).await);
    for gw in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while gw.log().matches("rate limit connected to Redis").count() < 2 {
            assert!(Instant::now() < deadline, "{}", gw.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let c = client();
    // One bucket of 4 for both gateways together.
    let mut codes = Vec::new();
    for i in 0..8 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = c.get(gw.url("/shared")).send().await.unwrap();
        if r.status() == 200 {
            let state = r.headers()["ratelimit"].to_str().unwrap().to_string();
            assert!(state.starts_with("\"shared\";r="), "{state}");
        } else {
            let wait: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(wait > 1, "{wait}");
        }
        codes.push(r.status().as_u16());
    }
    assert_eq!(codes, [200, 200, 200, 200, 429, 429, 429, 429]);

    // Redis goes away: `open` lets requests through, `closed` refuses them.
    redis.stop();
    assert_eq!(status(c.get(a.url("/shared"))).await, 200);
    assert_eq!(status(c.get(b.url("/strict"))).await, 503);
}
