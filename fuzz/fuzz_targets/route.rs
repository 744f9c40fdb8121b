//! Route matching and rewriting: a fixed table of every kind of route, and a fuzzed method,
//! host, path and header. Normalisation must never panic, and a normalised path must be a
//! fixed point (normalising it again changes nothing), or routing and the upstream could
//! disagree about the path.
#![no_main]

use gateway::routing::{compile_rewrite, normalize_path, PathRewrite, Router};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

const TABLE: &str = r#"
listeners: { http: { address: "127.0.0.1:1" } }
upstreams: { u: { targets: ["127.0.0.1:2"] } }
routes:
  - { name: root, upstream: u }
  - { name: api, upstream: u, match: { path_prefix: /api }, strip_prefix: true }
  - { name: users, upstream: u, match: { path_prefix: /api/users/, methods: [GET, POST] } }
  - { name: login, upstream: u, match: { path: /api/users/login } }
  - { name: byid, upstream: u, match: { path_regex: "^/api/users/([0-9]+)$" }, rewrite: "/users/$1" }
  - { name: tenant, upstream: u, match: { hosts: ["*.tenant.test"], path_prefix: /t }, rewrite: /tenant }
  - { name: exact_host, upstream: u, match: { hosts: [a.test, "b.test"] } }
  - { name: canary, upstream: u, match: { path_prefix: /api, headers: [ { name: x-canary, value: "on" } ] } }
"#;

static ROUTES: LazyLock<(Router, Vec<PathRewrite>)> = LazyLock::new(|| {
    let config = gateway::config::parse(
        std::path::Path::new("table.yaml"),
        TABLE,
        &Default::default(),
    )
    .expect("the fixed table parses");
    let router = Router::new(&config.routes).expect("the fixed table compiles");
    let rewrites = config
        .routes
        .iter()
        .map(|r| compile_rewrite(r).expect("rewrites compile"))
        .collect();
    (router, rewrites)
});

const METHODS: [&str; 6] = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let host = parts.next().filter(|h| !h.is_empty());
    let path = parts.next().unwrap_or("/");
    let canary = parts.next().unwrap_or("");
    let method = http::Method::from_bytes(METHODS[usize::from(selector) % METHODS.len()].as_bytes())
        .expect("static method");
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(canary) {
        headers.insert("x-canary", v);
    }
    let Ok(normal) = normalize_path(path) else {
        return;
    };
    assert_eq!(
        normalize_path(&normal).map(|p| p.into_owned()).ok().as_deref(),
        Some(normal.as_ref()),
        "normalisation is not idempotent for {path:?}"
    );
    let (router, rewrites) = &*ROUTES;
    if let Some(route) = router.find(host, &normal, &method, &headers, None) {
        let _ = rewrites[route as usize].apply(&normal);
    }
});
