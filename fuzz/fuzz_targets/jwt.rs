//! Token checking: fuzzed bytes as a bearer token against an HS256 policy with issuer,
//! audience and claim requirements. Header parsing, base64, JSON claims and the checks must
//! refuse garbage without panicking; the only tokens accepted are ones signed with the secret.
#![no_main]

use gateway::auth::AuthPolicy;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

const POLICY: &str = r#"
listeners: { http: { address: "127.0.0.1:1" } }
auth:
  a:
    secret: "0123456789abcdef0123456789abcdef"
    algorithms: [HS256, HS384]
    issuer: https://issuer.test
    audience: [api, web]
    required_claims: [sub]
    claims: { role: [admin, user] }
    forward_claims: { sub: X-User-Id, role: X-User-Role }
upstreams: { u: { targets: ["127.0.0.1:2"] } }
routes:
  - { name: r, upstream: u, auth: a }
"#;

static RUNTIME: LazyLock<(tokio::runtime::Runtime, AuthPolicy)> = LazyLock::new(|| {
    let config = gateway::config::parse(
        std::path::Path::new("policy.yaml"),
        POLICY,
        &Default::default(),
    )
    .expect("the fixed policy parses");
    let policy = AuthPolicy::new("a", &config.auth["a"].value, &config.dns).expect("policy builds");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (rt, policy)
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let (rt, policy) = &*RUNTIME;
    let _ = rt.block_on(policy.verify(token, Some("sub")));
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(http::header::AUTHORIZATION, v);
        let _ = policy.token(&headers);
    }
});
