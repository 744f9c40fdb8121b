//! Access policies through the real binary: `api_key` from a header or a query parameter,
//! against a file of digests made by `gateway api-key`, with scopes, forwarded identity, and
//! the key kept from the upstream.

mod common;

use common::*;

/// `gateway api-key NAME SCOPES`: the key, and the line for the keys file.
fn make_key(name: &str, scopes: &str) -> (String, String) {
    let out = std::process::Command::new(gateway_bin())
        .args(["api-key", name, scopes])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let key = lines.next().unwrap().to_string();
    let line = lines.next().unwrap().to_string();
    assert!(
        !line.contains(&key),
        "the file line holds no key in clear: {line}"
    );
    (key, line)
}

#[tokio::test]
async fn api_keys_admit_forward_and_stay_at_the_gateway() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let (reader, reader_line) = make_key("reader", "orders:read");
    let (writer, writer_line) = make_key("writer", "orders:read,orders:write");
    let keys = dir.path().join("keys");
    // Listed too: a key with a space and an oversized one, which must still be refused.
    let digest = gateway::policy::api_key::digest_hex;
    let hostile = format!(
        "spaced {}\nlong {}\n",
        digest("a b"),
        digest(&"k".repeat(4000))
    );
    std::fs::write(
        &keys,
        format!("# partners\n{reader_line}\n{writer_line}\n{hostile}"),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        r#"
policies:
  partners: {{ api_key: {{ keys_file: "{}", query: api_key }} }}
  writers: {{ api_key: {{ keys_file: "{}", scopes: ["orders:write"] }} }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: write, upstream: b, match: {{ path_prefix: /write }}, policies: [writers] }}
  - {{ name: read, upstream: b, policies: [partners] }}
"#,
        keys.display(),
        keys.display(),
        backend.addr
    ))
    .await;
    let c = client();

    // A valid key: its name and scopes go upstream, the key and forged identity do not.
    let r = c
        .get(gw.url("/orders"))
        .header("x-api-key", &writer)
        .header("x-api-key-name", "admin")
        .send()
        .await
        .unwrap();
    let seen = echo(r).await;
    let h = &seen["headers"];
    assert_eq!(h["x-api-key-name"], "writer", "{seen}");
    assert_eq!(h["x-api-key-scopes"], "orders:read orders:write", "{seen}");
    assert!(h.get("x-api-key").is_none(), "{seen}");
    // A key without scopes' header: a forged one is removed.
    let r = c
        .get(gw.url("/orders"))
        .header("x-api-key", &reader)
        .header("x-api-key-scopes", "orders:write")
        .send()
        .await
        .unwrap();
    let seen = echo(r).await;
    assert_eq!(seen["headers"]["x-api-key-scopes"], "orders:read", "{seen}");

    // From the query: taken out of what goes upstream, the rest kept.
    let r = c
        .get(gw.url(&format!("/orders?page=2&api_key={reader}&sort=id")))
        .send()
        .await
        .unwrap();
    let seen = echo(r).await;
    assert_eq!(seen["query"], "page=2&sort=id", "{seen}");
    assert_eq!(seen["headers"]["x-api-key-name"], "reader");

    // Missing, wrong, malformed, oversized: 401 with the challenge; a missing scope: 403.
    let status = |key: Option<String>, path: &'static str| {
        let mut req = c.get(gw.url(path));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        async move {
            let r = req.send().await.unwrap();
            let challenge = r.headers().get("www-authenticate").cloned();
            (r.status().as_u16(), challenge)
        }
    };
    let (s, challenge) = status(None, "/orders").await;
    assert_eq!((s, challenge.unwrap().to_str().unwrap()), (401, "ApiKey"));
    assert_eq!(status(Some(format!("{reader}x")), "/orders").await.0, 401);
    assert_eq!(status(Some("a b".into()), "/orders").await.0, 401);
    assert_eq!(status(Some("k".repeat(4000)), "/orders").await.0, 401);
    assert_eq!(status(Some(reader.clone()), "/write").await.0, 403);
    assert_eq!(status(Some(writer.clone()), "/write").await.0, 200);
    let hits = backend.hits();

    // Keys never appear in the log; editing the keys file alone reloads: a removed key stops
    // working.
    assert!(!gw.log().contains(&reader) && !gw.log().contains(&writer));
    let tmp = dir.path().join("keys.tmp");
    std::fs::write(&tmp, format!("{writer_line}\n")).unwrap();
    std::fs::rename(&tmp, &keys).unwrap();
    gw.wait_generation(2).await;
    assert_eq!(status(Some(reader.clone()), "/orders").await.0, 401);
    assert_eq!(status(Some(writer.clone()), "/orders").await.0, 200);
    assert_eq!(
        backend.hits(),
        hits + 1,
        "refused requests never went upstream"
    );
}

#[tokio::test]
async fn a_configuration_refused_for_a_missing_keys_file_loads_when_the_file_appears() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&one_route_to(&backend, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let with_keys = text.replace(
        "routes: [ { name: r, upstream: b } ]",
        &format!(
            "policies:\n  k: {{ api_key: {{ keys_file: \"{}\" }} }}\nroutes: [ {{ name: r, upstream: b, policies: [k] }} ]",
            keys.display()
        ),
    );
    assert_ne!(with_keys, text);
    gw.write_raw_config(&with_keys);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !gw.log().contains("keys_file") {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(gw.generation().await, 1);
    let (key, line) = make_key("late", "");
    std::fs::write(&keys, format!("{line}\n")).unwrap();
    gw.wait_generation(2).await;
    let r = client()
        .get(gw.url("/x"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `Authorization: Basic` for `user:password`.
fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b64}")
}

fn argon2_hash(password: &str) -> String {
    use argon2::PasswordHasher;
    let salt = argon2::password_hash::SaltString::from_b64("c29tZXNhbHQxMjM0NTY").unwrap();
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// The value of `gateway_basic_auth_total{policy, result}`.
async fn basic_auth_count(gw: &Gateway, result: &str) -> u64 {
    let series = format!("gateway_basic_auth_total{{policy=\"ops\",result=\"{result}\"}}");
    gw.metric(&series).await as u64
}

#[tokio::test]
async fn basic_auth_checks_users_remembers_them_and_slows_guessing() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    let alice = bcrypt::hash("wonderland", 4).unwrap();
    std::fs::write(
        &users,
        format!("# ops\nalice:{alice}\nbob:{}\n", argon2_hash("builder")),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        r#"
policies:
  ops: {{ basic_auth: {{ users_file: "{}", realm: "ops", max_failures: 3, failure_window: 1m }} }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: prometheus, upstream: b, policies: [ops] }}
"#,
        users.display(),
        backend.addr
    ))
    .await;
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .no_proxy()
            .build()
            .unwrap()
    };
    let c = from("127.0.0.1");
    let send = |c: &reqwest::Client, auth: Option<String>| {
        let mut req = c.get(gw.url("/graph")).header("x-auth-user", "root");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send()
    };

    // No credentials: the challenge.
    let r = send(&c, None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"ops\", charset=\"UTF-8\""
    );
    // bcrypt and argon2 users: the name goes upstream, the credentials and forgery do not.
    for (user, password) in [("alice", "wonderland"), ("bob", "builder")] {
        let seen = echo(send(&c, Some(basic(user, password))).await.unwrap()).await;
        assert_eq!(seen["headers"]["x-auth-user"], user, "{seen}");
        assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    }
    // Verified once, then remembered.
    assert_eq!(basic_auth_count(&gw, "verified").await, 2);
    for _ in 0..3 {
        let r = send(&c, Some(basic("alice", "wonderland"))).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(basic_auth_count(&gw, "verified").await, 2);
    assert_eq!(basic_auth_count(&gw, "cached").await, 3);

    // A new password in the file: the remembered one stops working.
    let alice2 = bcrypt::hash("looking-glass", 4).unwrap();
    let tmp = dir.path().join("htpasswd.tmp");
    std::fs::write(&tmp, format!("alice:{alice2}\n")).unwrap();
    std::fs::rename(&tmp, &users).unwrap();
    gw.wait_generation(2).await;
    let r = send(&c, Some(basic("alice", "wonderland"))).await.unwrap();
    assert_eq!(r.status(), 401);
    let r = send(&c, Some(basic("alice", "looking-glass")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Guessing from one client: after 3 failures, 429 without a check, even with the right
    // password; another client is not concerned.
    let guesser = from("127.0.0.7");
    for guess in ["a", "b", "c"] {
        let r = send(&guesser, Some(basic("alice", guess))).await.unwrap();
        assert_eq!(r.status(), 401, "{guess}");
    }
    let r = send(&guesser, Some(basic("alice", "looking-glass")))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(basic_auth_count(&gw, "throttled").await >= 1);
    let r = send(&c, Some(basic("alice", "looking-glass")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Hostile headers: malformed, oversized, a user that does not exist.
    for auth in [
        "Basic !!!".to_string(),
        format!("Basic {}", "QUFB".repeat(2000)),
        basic("mallory", "x"),
        "Bearer abc".to_string(),
    ] {
        let r = send(&from("127.0.0.8"), Some(auth.clone())).await.unwrap();
        assert_eq!(r.status(), 401, "{auth:.40}");
    }
}

/// An auth service: `Bearer good` passes (with `X-User-Id`), `Bearer login` is sent to log
/// in, `Bearer huge` is refused with a 1 MiB body, `Bearer hang` never gets an answer, and
/// anything else is refused with 401. It counts what it is asked and keeps the last request's
/// forwarded headers.
struct AuthService {
    addr: std::net::SocketAddr,
    asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    last: std::sync::Arc<std::sync::Mutex<http::HeaderMap>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AuthService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn auth_service() -> AuthService {
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let last = std::sync::Arc::new(std::sync::Mutex::new(http::HeaderMap::new()));
    let (a, l) = (asked.clone(), last.clone());
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (a, l) = (a.clone(), l.clone());
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    a.fetch_add(1, Ordering::SeqCst);
                    *l.lock().unwrap() = req.headers().clone();
                    let auth = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    async move {
                        let r = hyper::Response::builder();
                        let (r, body) = match auth.as_str() {
                            "Bearer good" => (
                                r.status(200)
                                    .header("x-user-id", "u-1")
                                    .header("x-internal", "no"),
                                Vec::new(),
                            ),
                            "Bearer login" => (
                                r.status(302)
                                    .header("location", "/login")
                                    .header("set-cookie", "next=/orders")
                                    .header("x-internal", "no"),
                                b"go log in".to_vec(),
                            ),
                            "Bearer huge" => (r.status(403), vec![b'x'; 1 << 20]),
                            "Bearer hang" => {
                                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                                (r.status(200), Vec::new())
                            }
                            _ => (
                                r.status(401)
                                    .header("www-authenticate", "Bearer realm=\"sso\"")
                                    .header("content-type", "text/plain"),
                                b"nope".to_vec(),
                            ),
                        };
                        Ok::<_, std::convert::Infallible>(
                            r.body(Full::new(bytes::Bytes::from(body)).boxed()).unwrap(),
                        )
                    }
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    AuthService {
        addr,
        asked,
        last,
        task,
    }
}

#[tokio::test]
async fn forward_auth_asks_the_auth_service_and_relays_its_refusals() {
    use std::sync::atomic::Ordering;
    let backend = Backend::start("127.0.0.1", "b").await;
    let auth = auth_service().await;
    // A service that answers garbage.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = garbage.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"not http at all\r\n\r\n").await;
        }
    });
    let gw = Gateway::start(&format!(
        r#"
policies:
  sso:
    forward_auth:
      upstream: auth
      path: /verify
      response_headers: [X-User-Id]
      timeout: 300ms
      cache: {{ header: Authorization, ttl: 30s }}
  broken_closed: {{ forward_auth: {{ upstream: garbage }} }}
  broken_open: {{ forward_auth: {{ upstream: garbage, on_error: open }} }}
upstreams:
  b: {{ targets: ["{}"] }}
  auth: {{ targets: ["{}"] }}
  garbage: {{ targets: ["{garbage_addr}"] }}
routes:
  - {{ name: closed, upstream: b, match: {{ path_prefix: /closed }}, policies: [broken_closed] }}
  - {{ name: open, upstream: b, match: {{ path_prefix: /open }}, policies: [broken_open] }}
  - {{ name: app, upstream: b, policies: [sso] }}
"#,
        backend.addr, auth.addr
    ))
    .await;
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let get = |path: &str, token: &str| {
        c.get(gw.url(path))
            .header("authorization", format!("Bearer {token}"))
            .header("x-user-id", "forged")
            .send()
    };

    // Allowed: the chosen header of the 2xx answer goes upstream, in place of the client's.
    let seen = echo(get("/orders?page=2", "good").await.unwrap()).await;
    assert_eq!(seen["headers"]["x-user-id"], "u-1", "{seen}");
    assert!(seen["headers"].get("x-internal").is_none());
    let asked = auth.last.lock().unwrap().clone();
    assert_eq!(asked["x-forwarded-method"], "GET");
    assert_eq!(asked["x-forwarded-uri"], "/orders?page=2");
    assert_eq!(asked["x-forwarded-for"], "127.0.0.1");
    assert_eq!(asked["authorization"], "Bearer good");
    // Remembered: the same token is not asked about again.
    let before = auth.asked.load(Ordering::SeqCst);
    let r = get("/orders", "good").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(auth.asked.load(Ordering::SeqCst), before);

    // Refusals go back as the service gave them: status, chosen headers, body.
    let r = get("/orders", "bad").await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"sso\"");
    assert_eq!(r.text().await.unwrap(), "nope");
    let r = get("/orders", "login").await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/login");
    assert_eq!(r.headers()["set-cookie"], "next=/orders");
    assert!(r.headers().get("x-internal").is_none());
    assert_eq!(r.text().await.unwrap(), "go log in");
    // A huge refusal body is not relayed (the status is).
    let r = get("/orders", "huge").await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.bytes().await.unwrap().len() < 1024);
    // A service that hangs or answers garbage: 503, or the request passes with on_error: open.
    let started = std::time::Instant::now();
    assert_eq!(get("/orders", "hang").await.unwrap().status(), 503);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(get("/closed", "good").await.unwrap().status(), 503);
    let seen = echo(get("/open", "good").await.unwrap()).await;
    assert_eq!(seen["path"], "/open");
    assert_eq!(backend.hits(), 3, "only allowed requests went upstream");
    let errors = gw.metric("gateway_forward_auth_total{policy=\"sso\",result=\"error\"}");
    assert_eq!(errors.await, 1.0);
    let cached = gw.metric("gateway_forward_auth_total{policy=\"sso\",result=\"cached\"}");
    assert_eq!(cached.await, 1.0);
}

/// The auth service's replicas get passive health as proxied requests' do: a dead replica, or
/// one that never answers within `timeout`, is ejected after its failed calls (`max_fails`)
/// and the others answer from then on.
#[tokio::test]
async fn forward_auth_ejects_a_dead_replica_of_the_auth_service() {
    let dead = DeadPort::reserve();
    ejects_the_auth_replica_at(&format!("127.0.0.1:{}", dead.port)).await;
    let silent = SilentPort::start().await;
    ejects_the_auth_replica_at(&silent.addr.to_string()).await;
}

async fn ejects_the_auth_replica_at(failing: &str) {
    let backend = Backend::start("127.0.0.1", "b").await;
    let auth = auth_service().await;
    let gw = Gateway::start(&format!(
        r#"
policies:
  sso: {{ forward_auth: {{ upstream: auth, path: /verify, timeout: 300ms }} }}
upstreams:
  b: {{ targets: ["{}"] }}
  auth: {{ targets: ["{}", "{failing}"], health: {{ passive: {{ max_fails: 2, fail_timeout: 60s }} }} }}
routes:
  - {{ name: app, upstream: b, policies: [sso] }}
"#,
        backend.addr, auth.addr
    ))
    .await;
    let c = client();
    let mut refused = 0;
    for _ in 0..20 {
        let r = c
            .get(gw.url("/x"))
            .header("authorization", "Bearer good")
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => {}
            503 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    assert_eq!(refused, 2, "{failing}: its calls before its ejection");
    assert_eq!(
        gw.metric("gateway_upstream_ejections_total{upstream=\"auth\"}")
            .await,
        1.0
    );
}
