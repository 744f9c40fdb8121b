//! JWT checks: tokens minted here (valid, expired, not yet valid, wrong issuer or audience, bad
//! signature, algorithm confusion, `alg: none`, unknown then rotated key ids) against the real
//! gateway in front of a real backend, with a real JWKS endpoint.

mod common;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::Response;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

const SECRET: &str = "an-hmac-secret-that-is-long-enough-0123456789";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn claims(sub: &str, role: &str) -> Value {
    json!({"sub": sub, "role": role, "iss": "test", "aud": "api", "exp": now() + 600})
}

/// An Ed25519 key pair: signing key, public key as a JWK `x`, and as a PEM file's text.
struct EdKey {
    pkcs8: Vec<u8>,
    x: String,
    pem: String,
}

impl EdKey {
    fn new() -> EdKey {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let public = pair.public_key().as_ref().to_vec();
        // SubjectPublicKeyInfo for Ed25519: a fixed 12-byte prefix, then the key.
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(&public);
        EdKey {
            pkcs8: doc.as_ref().to_vec(),
            x: URL_SAFE_NO_PAD.encode(&public),
            pem: format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                STANDARD.encode(&spki)
            ),
        }
    }

    fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, &EncodingKey::from_ed_der(&self.pkcs8)).unwrap()
    }

    /// The public key as a PEM file `ed.pem` in `dir`.
    fn write_pem(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("ed.pem");
        std::fs::write(&path, &self.pem).unwrap();
        path
    }

    fn jwk(&self, kid: &str) -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid, "x": self.x})
    }
}

/// Serves whatever body the test sets, as JSON, and counts requests.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (b, h) = (b.clone(), h.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let text = b.lock().unwrap().clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(text),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            body,
            hits,
            _task: task,
        }
    }

    fn set(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One route to `backend` behind an `auth` policy `users` whose keys come from `jwks`, which
/// is fetched again for an unknown `kid` at most every `min_refetch`.
fn one_jwks_route(jwks: &JwksServer, backend: &Backend, min_refetch: &str) -> String {
    format!(
        r#"
auth:
  users:
    jwks_url: "http://{}/jwks.json"
    jwks: {{ refresh: 1h, min_refetch_interval: {min_refetch}, timeout: 1s }}
upstreams:
  b: {{ targets: ["{}"] }}
routes:
  - {{ name: users, upstream: b, auth: users }}
"#,
        jwks.addr, backend.addr
    )
}

async fn get(gw: &Gateway, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = client().get(gw.url(path));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

/// Status and `WWW-Authenticate` of a refused request; checks the JSON body and request id.
async fn refused(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["request_id"], id.as_str(), "{body}");
    assert_eq!(body["status"], status, "{body}");
    (status, challenge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_claims_forwarded() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let ed = EdKey::new();
    let dir = tempfile::tempdir().unwrap();
    let pem = ed.write_pem(dir.path());
    let gw = Gateway::start(&format!(
        r#"
auth:
  hs:
    secret: "{SECRET}"
    issuer: test
    audience: [api, other]
    forward_claims: {{ sub: X-User-Id, role: X-User-Role }}
    claims: {{ role: [admin, user] }}
  admins:
    secret: "{SECRET}"
    issuer: test
    audience: api
    claims: {{ role: admin }}
  ed:
    public_keys: [ {{ file: "{}", algorithm: EdDSA }} ]
    forward_claims: {{ sub: X-User-Id }}
upstreams:
  b: {{ targets: ["{}"] }}
routes:
  - {{ name: hs, upstream: b, auth: hs, match: {{ path_prefix: /hs }} }}
  - {{ name: admin, upstream: b, auth: admins, match: {{ path_prefix: /admin }} }}
  - {{ name: ed, upstream: b, auth: ed, match: {{ path_prefix: /ed }} }}
  - {{ name: opt, upstream: b, auth: hs, auth_optional: true, match: {{ path_prefix: /opt }} }}
  - {{ name: open, upstream: b }}
"#,
        pem.display(),
        backend.addr
    ))
    .await;

    // No token: 401 with a bare challenge.
    let (status, challenge) = refused(get(&gw, "/hs", None).await).await;
    assert_eq!((status, challenge.as_str()), (401, "Bearer"));

    // A valid token: through, with its claims as headers and the client's copies gone.
    let token = hs(&claims("u-1", "user"));
    let r = client()
        .post(gw.url("/hs/x"))
        .bearer_auth(&token)
        .header("x-user-id", "spoofed")
        .header("x-user-role", "admin")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = echo(r).await["headers"].clone();
    assert_eq!(h["x-user-id"], "u-1");
    assert_eq!(h["x-user-role"], "user");
    // Any audience of the list is accepted; the token also works from a second request.
    let other = hs(
        &json!({"sub": "u-2", "role": "admin", "iss": "test", "aud": ["x", "other"], "exp": now() + 600}),
    );
    assert_eq!(get(&gw, "/hs", Some(&other)).await.status(), 200);

    // Identity headers sent by a client never reach an upstream, even on open routes.
    let r = client()
        .get(gw.url("/open"))
        .header("x-user-id", "spoofed")
        .header("X-User-Role", "admin")
        .send()
        .await
        .unwrap();
    let h = echo(r).await["headers"].clone();
    assert!(
        h.get("x-user-id").is_none() && h.get("x-user-role").is_none(),
        "{h}"
    );

    // Tokens that do not verify: 401 invalid_token, with the reason.
    let mut bad: Vec<(&str, String)> = vec![
        (
            "expired",
            hs(
                &json!({"sub": "u", "role": "user", "iss": "test", "aud": "api", "exp": now() - 120}),
            ),
        ),
        (
            "not yet valid",
            hs(
                &json!({"sub": "u", "role": "user", "iss": "test", "aud": "api", "exp": now() + 600, "nbf": now() + 120}),
            ),
        ),
        (
            "wrong issuer",
            hs(
                &json!({"sub": "u", "role": "user", "iss": "evil", "aud": "api", "exp": now() + 600}),
            ),
        ),
        (
            "wrong audience",
            hs(
                &json!({"sub": "u", "role": "user", "iss": "test", "aud": "web", "exp": now() + 600}),
            ),
        ),
        (
            "required claim",
            hs(&json!({"sub": "u", "role": "user", "iss": "test", "aud": "api"})),
        ),
        (
            "bad signature",
            encode(
                &Header::new(Algorithm::HS256),
                &claims("u", "user"),
                &EncodingKey::from_secret(b"another-secret-that-is-long-enough-0123456789"),
            )
            .unwrap(),
        ),
        (
            "algorithm",
            encode(
                &Header::new(Algorithm::HS512),
                &claims("u", "user"),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap(),
        ),
    ];
    // alg: none, and garbage.
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims("u", "admin").to_string());
    bad.push(("malformed", format!("{none_header}.{payload}.")));
    bad.push(("malformed", "not-a-token".into()));
    bad.push(("malformed", format!("{}.{}.{}", "e30", payload, "!!!")));
    // Still within the 30 s leeway: accepted.
    let lenient =
        hs(&json!({"sub": "u", "role": "user", "iss": "test", "aud": "api", "exp": now() - 10}));
    assert_eq!(get(&gw, "/hs", Some(&lenient)).await.status(), 200);
    for (why, token) in &bad {
        let (status, challenge) = refused(get(&gw, "/hs", Some(token)).await).await;
        assert_eq!(status, 401, "{why}");
        assert!(
            challenge.starts_with("Bearer error=\"invalid_token\""),
            "{why}: {challenge}"
        );
        assert!(
            challenge.contains(why)
                || *why == "algorithm"
                || *why == "malformed"
                || *why == "required claim",
            "{why}: {challenge}"
        );
    }
    // Malformed Authorization headers.
    for value in [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "bearer    ",
        &format!("Bearer {}", "a".repeat(20_000)),
    ] {
        let r = client()
            .get(gw.url("/hs"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 401 || r.status() == 431 || r.status() == 400,
            "{value:.20}: {}",
            r.status()
        );
    }

    // Valid tokens without the claims a route requires: 403 insufficient_scope.
    let (status, challenge) =
        refused(get(&gw, "/hs", Some(&hs(&claims("u", "guest")))).await).await;
    assert_eq!(status, 403);
    assert!(
        challenge.starts_with("Bearer error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert_eq!(refused(get(&gw, "/admin", Some(&token)).await).await.0, 403);
    assert_eq!(
        get(&gw, "/admin", Some(&hs(&claims("u", "admin"))))
            .await
            .status(),
        200
    );

    // EdDSA with a PEM key; an HS256 token "signed" with that public key is not accepted.
    let ed_token = ed.sign(None, &json!({"sub": "e-1", "exp": now() + 600}));
    let r = get(&gw, "/ed", Some(&ed_token)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(echo(r).await["headers"]["x-user-id"], "e-1");
    // A policy that forwards fewer claims replaces the client's copy of its own header and
    // still removes the other policies' identity headers.
    let r = client()
        .get(gw.url("/ed"))
        .bearer_auth(&ed_token)
        .header("x-user-id", "spoofed")
        .header("x-user-role", "admin")
        .send()
        .await
        .unwrap();
    let h = echo(r).await["headers"].clone();
    assert_eq!(h["x-user-id"], "e-1");
    assert!(h.get("x-user-role").is_none(), "{h}");
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "e-1", "exp": now() + 600}),
        &EncodingKey::from_secret(ed.pem.as_bytes()),
    )
    .unwrap();
    assert_eq!(refused(get(&gw, "/ed", Some(&confused)).await).await.0, 401);
    // An HS token is not an Ed token either, and vice versa.
    assert_eq!(get(&gw, "/ed", Some(&token)).await.status(), 401);
    assert_eq!(get(&gw, "/hs", Some(&ed_token)).await.status(), 401);

    // Optional auth: no token passes without identity; a bad one is still refused.
    let r = get(&gw, "/opt", None).await;
    assert_eq!(r.status(), 200);
    assert!(echo(r).await["headers"].get("x-user-id").is_none());
    assert_eq!(get(&gw, "/opt", Some("garbage")).await.status(), 401);
    let r = get(&gw, "/opt", Some(&token)).await;
    assert_eq!(echo(r).await["headers"]["x-user-id"], "u-1");

    // Every method goes through the check, and the gateway survived all of it.
    for method in [
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::PATCH,
        reqwest::Method::OPTIONS,
    ] {
        let r = client()
            .request(method.clone(), gw.url("/hs"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method}");
    }
    assert_eq!(get(&gw, "/open", None).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_rotate_and_survive_a_broken_endpoint() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let (k1, k2, k3) = (EdKey::new(), EdKey::new(), EdKey::new());
    let jwks = JwksServer::start(json!({"keys": [k1.jwk("k1")]}).to_string()).await;
    let dead = DeadPort::reserve();
    let gw = Gateway::start(&format!(
        r#"
auth:
  users:
    jwks_url: "http://{}/jwks.json"
    jwks: {{ refresh: 1h, min_refetch_interval: 200ms, timeout: 1s }}
    forward_claims: {{ sub: X-User-Id }}
  nokeys:
    jwks_url: "http://127.0.0.1:{}/jwks.json"
    jwks: {{ timeout: 200ms }}
upstreams:
  b: {{ targets: ["{}"] }}
routes:
  - {{ name: users, upstream: b, auth: users, match: {{ path_prefix: /users }} }}
  - {{ name: nokeys, upstream: b, auth: nokeys, match: {{ path_prefix: /nokeys }} }}
"#,
        jwks.addr, dead.port, backend.addr
    ))
    .await;
    let claims = json!({"sub": "j-1", "exp": now() + 600});

    // Keys were fetched before the gateway served.
    let r = get(&gw, "/users", Some(&k1.sign(Some("k1"), &claims))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(echo(r).await["headers"]["x-user-id"], "j-1");

    // The issuer rotates to k2: the first token naming k2 makes the gateway refetch.
    jwks.set(json!({"keys": [k2.jwk("k2")]}).to_string());
    // (Past the 200 ms refetch limit since the fetch at start.)
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let before = jwks.hits();
    assert_eq!(
        get(&gw, "/users", Some(&k2.sign(Some("k2"), &claims)))
            .await
            .status(),
        200
    );
    assert!(jwks.hits() > before);
    // k1 was rotated out.
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert_eq!(
        get(&gw, "/users", Some(&k1.sign(Some("k1"), &claims)))
            .await
            .status(),
        401
    );

    // Unknown key ids do not hammer the endpoint: at most one refetch per interval.
    let before = jwks.hits();
    for _ in 0..20 {
        assert_eq!(
            get(&gw, "/users", Some(&k3.sign(Some("k3"), &claims)))
                .await
                .status(),
            401
        );
    }
    assert!(
        jwks.hits() - before <= 3,
        "{} refetches",
        jwks.hits() - before
    );

    // The endpoint breaks: the keys it served last stay in use.
    jwks.set("<html>oops</html>".into());
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert_eq!(
        get(&gw, "/users", Some(&k3.sign(Some("k3"), &claims)))
            .await
            .status(),
        401
    );
    assert_eq!(
        get(&gw, "/users", Some(&k2.sign(Some("k2"), &claims)))
            .await
            .status(),
        200
    );
    // A key with the right id but another key's signature is refused.
    assert_eq!(
        get(&gw, "/users", Some(&k3.sign(Some("k2"), &claims)))
            .await
            .status(),
        401
    );

    // A policy that never loaded a key answers 503, not "let through", not 401.
    let r = get(&gw, "/nokeys", Some(&k1.sign(Some("k1"), &claims))).await;
    assert_eq!(r.status(), 503);
    assert!(gw.log().contains("JWKS fetch failed"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_auth_configuration_is_refused_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "auth:\n  a:\n    secret: short\nupstreams:\n  b: { targets: [\"127.0.0.1:1\"] }\nroutes:\n  - { name: r, upstream: b, auth: a }\n",
            ":3:13: auth.a: secret: at least 32 bytes",
        ),
        (
            "upstreams:\n  b: { targets: [\"127.0.0.1:1\"] }\nroutes:\n  - { name: r, upstream: b, auth: nope }\n",
            ":4:35: routes[0].auth: no auth policy named `nope`",
        ),
        (
            "auth:\n  a:\n    jwks_url: \"ftp://idp.example/jwks\"\nupstreams:\n  b: { targets: [\"127.0.0.1:1\"] }\nroutes:\n  - { name: r, upstream: b, auth: a }\n",
            ":3:15: auth.a: needs an http:// or https:// URL",
        ),
        (
            "auth:\n  a:\n    issuer: x\nupstreams:\n  b: { targets: [\"127.0.0.1:1\"] }\nroutes:\n  - { name: r, upstream: b, auth: a }\n",
            "auth.a: needs keys",
        ),
        (
            "auth:\n  a:\n    public_keys: [ { file: /nonexistent.pem, algorithm: RS256 } ]\nupstreams:\n  b: { targets: [\"127.0.0.1:1\"] }\nroutes:\n  - { name: r, upstream: b, auth: a }\n",
            "auth.a: public_keys /nonexistent.pem",
        ),
        (
            "auth:\n  a:\n    secret: \"0123456789abcdef0123456789abcdef\"\n    algorithms: [RS256]\nupstreams:\n  b: { targets: [\"127.0.0.1:1\"] }\nroutes:\n  - { name: r, upstream: b, auth: a }\n",
            "cannot be used with a shared secret",
        ),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.yaml"));
        std::fs::write(
            &path,
            format!("listeners:\n  http: {{ address: \"127.0.0.1:1\" }}\n{body}"),
        )
        .unwrap();
        let out = std::process::Command::new(gateway_bin())
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} passed");
        // Line numbers are shifted by the two listener lines prepended.
        let want = want.replacen(":3:", ":5:", 1).replacen(":4:", ":6:", 1);
        assert!(err.contains(&want), "case {i}: want {want:?} in {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_and_websocket_upgrades_go_through_the_check() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let backend = Backend::start("127.0.0.1", "b").await;
    let (ws, _ws_task) = ws_echo("127.0.0.1").await;
    let gw = Gateway::start(&format!(
        r#"
auth:
  hs: {{ secret: "{SECRET}", cookie: session, forward_claims: {{ sub: X-User-Id }} }}
upstreams:
  b: {{ targets: ["{}"] }}
  ws: {{ targets: ["{ws}"] }}
routes:
  - {{ name: ws, upstream: ws, auth: hs, match: {{ path: /ws }} }}
  - {{ name: all, upstream: b, auth: hs }}
"#,
        backend.addr
    ))
    .await;
    let token = hs(&claims("c-1", "user"));

    // The token from the cookie when there is no Authorization header.
    let r = client()
        .get(gw.url("/x"))
        .header("cookie", format!("theme=dark; session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(echo(r).await["headers"]["x-user-id"], "c-1");
    let r = client()
        .get(gw.url("/x"))
        .header("cookie", "session=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(gw.url("/x"))
        .header("cookie", "other=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // An upgrade without a token is refused before it reaches the upstream.
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.http))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    // With one, the socket works.
    let mut req = format!("ws://{}/ws", gw.http)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut sock, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    sock.send(tokio_tungstenite::tungstenite::Message::text("hello"))
        .await
        .unwrap();
    let back = sock.next().await.unwrap().unwrap();
    assert_eq!(back.to_text().unwrap(), "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_token_still_expires() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "auth:\n  hs: {{ secret: \"{SECRET}\", leeway: 0s }}\nupstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b, auth: hs }}\n",
        backend.addr
    ))
    .await;
    let token = hs(&json!({"sub": "u", "exp": now() + 2}));
    // Verified once, then answered from the cache.
    for _ in 0..3 {
        assert_eq!(get(&gw, "/", Some(&token)).await.status(), 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let (status, challenge) = refused(get(&gw, "/", Some(&token)).await).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("token expired"), "{challenge}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_jwks_endpoint_costs_its_timeout_not_more() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let silent = SilentPort::start().await;
    let addr = silent.addr;
    let started = std::time::Instant::now();
    let gw = Gateway::start(&format!(
        "auth:\n  j: {{ jwks_url: \"http://{addr}/jwks\", jwks: {{ timeout: 300ms }} }}\nupstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b, auth: j }}\n",
        backend.addr
    ))
    .await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let token = EdKey::new().sign(Some("k"), &json!({"sub": "x", "exp": now() + 60}));
    let t = std::time::Instant::now();
    let r = get(&gw, "/", Some(&token)).await;
    assert_eq!(r.status(), 503);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert!(gw.log().contains("JWKS fetch failed"));
}

/// A token with `header` (JSON) and `claims`, signed by `key` over exactly those bytes.
fn ed_token_with_header(key: &EdKey, header: &Value, claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let pair = Ed25519KeyPair::from_pkcs8(&key.pkcs8).unwrap();
    let sig = pair.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_and_their_urls_never_fetched() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let (issuer, attacker) = (EdKey::new(), EdKey::new());
    let jwks = JwksServer::start(json!({"keys": [issuer.jwk("k1")]}).to_string()).await;
    // The attacker's own key server: a token pointing at it must not make the gateway call.
    let evil = JwksServer::start(json!({"keys": [attacker.jwk("k1")]}).to_string()).await;
    let gw = Gateway::start(&one_jwks_route(&jwks, &backend, "1h")).await;
    let claims = json!({"sub": "u", "exp": now() + 600});
    let good = issuer.sign(Some("k1"), &claims);
    assert_eq!(get(&gw, "/", Some(&good)).await.status(), 200);
    let fetches = jwks.hits();

    let evil_url = format!("http://{}/jwks.json", evil.addr);
    let mut hostile = vec![
        // Keys the token itself names or carries: jku, x5u, an embedded jwk, x5c.
        ed_token_with_header(
            &attacker,
            &json!({"alg": "EdDSA", "kid": "k1", "jku": evil_url}),
            &claims,
        ),
        ed_token_with_header(
            &attacker,
            &json!({"alg": "EdDSA", "kid": "k1", "x5u": evil_url}),
            &claims,
        ),
        ed_token_with_header(
            &attacker,
            &json!({"alg": "EdDSA", "jwk": attacker.jwk("k1")}),
            &claims,
        ),
        ed_token_with_header(
            &attacker,
            &json!({"alg": "EdDSA", "kid": "k1", "x5c": ["MIIB"]}),
            &claims,
        ),
        // Key ids written to reach a file, a query or a log line.
        ed_token_with_header(
            &attacker,
            &json!({"alg": "EdDSA", "kid": "../../../../etc/passwd"}),
            &claims,
        ),
        ed_token_with_header(
            &attacker,
            &json!({"alg": "EdDSA", "kid": "' OR '1'='1' --"}),
            &claims,
        ),
        ed_token_with_header(
            &attacker,
            &json!({"alg": "EdDSA", "kid": "k1\u{0000}\r\nX: y"}),
            &claims,
        ),
        // alg tricks: none, HMAC keyed with the public key, a made-up algorithm, alg missing.
        ed_token_with_header(&attacker, &json!({"alg": "none", "kid": "k1"}), &claims),
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": "k1"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        ),
        encode(
            &Header {
                kid: Some("k1".into()),
                ..Header::new(Algorithm::HS256)
            },
            &claims,
            &EncodingKey::from_secret(issuer.x.as_bytes()),
        )
        .unwrap(),
        ed_token_with_header(&attacker, &json!({"alg": "XYZ999", "kid": "k1"}), &claims),
        ed_token_with_header(&attacker, &json!({"kid": "k1"}), &claims),
        // The real key id, re-signed by someone else.
        ed_token_with_header(&attacker, &json!({"alg": "EdDSA", "kid": "k1"}), &claims),
        // Malformed segments.
        "a.b".into(),
        "a.b.c.d".into(),
        "..".into(),
        "a..c".into(),
        "!!!.???.***".into(),
        format!("{}.{}.{}", "e30", "e30", "%%%"),
        format!("{good}x"),
        good.replacen('.', "..", 1),
        // Big, but under the head limit: still just a bad token.
        format!(
            "{}.{}.{}",
            "A".repeat(20_000),
            "B".repeat(20_000),
            "C".repeat(10_000)
        ),
    ];
    // A header that decodes to something other than an object, and deeply nested JSON.
    hostile.push(format!(
        "{}.{}.AAAA",
        URL_SAFE_NO_PAD.encode("[1,2,3]"),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    ));
    hostile.push(format!(
        "{}.{}.AAAA",
        URL_SAFE_NO_PAD.encode(format!("{}{}", "[".repeat(5000), "]".repeat(5000))),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    ));
    for token in &hostile {
        let r = get(&gw, "/", Some(token)).await;
        let head: String = token.chars().take(60).collect();
        assert_eq!(r.status(), 401, "token {head}… was not refused");
    }
    assert_eq!(backend.hits(), 1, "a hostile token reached the upstream");
    assert_eq!(evil.hits(), 0, "the gateway fetched a URL named by a token");
    // Unknown key ids may trigger at most one refetch per interval (1h here): none more.
    assert!(
        jwks.hits() <= fetches + 1,
        "JWKS fetched {} times",
        jwks.hits() - fetches
    );

    // A token too large for the head limit is refused with 431 before any check.
    let huge = "A".repeat(100_000);
    assert_eq!(get(&gw, "/", Some(&huge)).await.status(), 431);
    // And the real token still works.
    assert_eq!(get(&gw, "/", Some(&good)).await.status(), 200);
}

/// A policy that checks `iss` and `aud` refuses a token that leaves either out; a token whose
/// header lists critical extensions is refused. (An HS384 secret shorter than 48 bytes is in
/// `config_errors.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_claims_must_be_present_and_critical_headers_are_refused() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let ed = EdKey::new();
    let dir = tempfile::tempdir().unwrap();
    let pem = ed.write_pem(dir.path());
    let gw = Gateway::start(&format!(
        r#"
auth:
  users:
    public_keys: [ {{ file: "{}", algorithm: EdDSA }} ]
    issuer: test
    audience: api
upstreams:
  b: {{ targets: ["{}"] }}
routes:
  - {{ name: users, upstream: b, auth: users }}
"#,
        pem.display(),
        backend.addr
    ))
    .await;
    let full = json!({"sub": "u", "iss": "test", "aud": "api", "exp": now() + 600});
    assert_eq!(
        get(&gw, "/", Some(&ed.sign(None, &full))).await.status(),
        200
    );
    for missing in ["iss", "aud"] {
        let mut partial = full.clone();
        partial.as_object_mut().unwrap().remove(missing);
        let (status, challenge) =
            refused(get(&gw, "/", Some(&ed.sign(None, &partial))).await).await;
        assert_eq!(status, 401, "without {missing}");
        assert!(challenge.contains("invalid_token"), "{challenge}");
    }
    // Critical extensions: refused, even with a good signature over them.
    let crit = ed_token_with_header(
        &ed,
        &json!({"alg": "EdDSA", "typ": "JWT", "crit": ["exp"], "exp": 1}),
        &full,
    );
    let (status, challenge) = refused(get(&gw, "/", Some(&crit)).await).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("critical extensions"), "{challenge}");
    // The same header without `crit` passes, so the refusal is the extension's.
    let plain = ed_token_with_header(&ed, &json!({"alg": "EdDSA", "typ": "JWT"}), &full);
    assert_eq!(get(&gw, "/", Some(&plain)).await.status(), 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics
            .contains("gateway_auth_refusals_total{policy=\"users\",reason=\"critical_header\"} 1"),
        "{metrics}"
    );
}

/// A JWKS document with keys the gateway cannot use (ES512, X25519, an encryption key) is
/// still read: its usable keys verify, a key the issuer removed stops verifying, and each
/// skipped key is counted once per document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unusable_key_does_not_poison_a_jwks_document() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let (k1, k2) = (EdKey::new(), EdKey::new());
    let odd = json!([
        {"kty": "EC", "crv": "P-521", "alg": "ES512", "kid": "p521",
         "x": "AHKZLLOsCOzz5cY97ewNUajB957y-C-U88c3v13nmGZx6sYl_oJXu9A5RkTKqjqvjyekWF-7ytDyRXYgCF5cj0Kt",
         "y": "AdymlHvOiLxXkEhayXQnNCvDX4h9htZaCJN34kfmC6pV5OhQHiraVySsUdaQkAgDPrwQrJmbnX9cwlGfP-HqHZR1"},
        {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": k1.x},
        {"kty": "OKP", "crv": "Ed25519", "use": "enc", "kid": "enc", "x": k1.x},
    ]);
    let doc = |keys: Vec<Value>| {
        let mut all = odd.as_array().unwrap().clone();
        all.extend(keys);
        json!({ "keys": all }).to_string()
    };
    let jwks = JwksServer::start(doc(vec![k1.jwk("k1")])).await;
    let gw = Gateway::start(&one_jwks_route(&jwks, &backend, "200ms")).await;
    let claims = json!({"sub": "u", "exp": now() + 600});
    // The first document's usable key verifies: no 503 for good.
    assert_eq!(
        get(&gw, "/", Some(&k1.sign(Some("k1"), &claims)))
            .await
            .status(),
        200
    );

    // The issuer rotates k1 out and k2 in, the odd keys still there.
    jwks.set(doc(vec![k2.jwk("k2")]));
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert_eq!(
        get(&gw, "/", Some(&k2.sign(Some("k2"), &claims)))
            .await
            .status(),
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert_eq!(
        get(&gw, "/", Some(&k1.sign(Some("k1"), &claims)))
            .await
            .status(),
        401
    );

    // Two documents, three skipped keys each: counted once per document.
    let metrics = gw.metrics().await;
    let skipped = |reason: &str| {
        let line =
            format!("gateway_jwks_keys_skipped_total{{policy=\"users\",reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .map(|v| v.trim().to_string())
    };
    assert_eq!(skipped("unsupported").as_deref(), Some("4"), "{metrics}");
    assert_eq!(
        skipped("not_for_verifying").as_deref(),
        Some("2"),
        "{metrics}"
    );
    assert_eq!(
        gw.log().matches("JWKS key skipped").count(),
        6,
        "{}",
        gw.log()
    );
}
