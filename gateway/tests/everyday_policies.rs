//! Named policies (`policies:`) through the real binary: IP allow and deny lists on the client
//! address after `trusted_proxies`, header rules on both sides, listed by a route, by a
//! listener and for every route, and changed by a reload.

mod common;

use common::*;
use std::net::IpAddr;

/// A client whose connections come from `ip` (on loopback).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .no_proxy()
        .build()
        .unwrap()
}

async fn status(c: &reqwest::Client, url: String, xff: Option<&str>) -> u16 {
    let mut req = c.get(url);
    if let Some(xff) = xff {
        req = req.header("x-forwarded-for", xff);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn ip_lists_allow_and_deny_the_real_client() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        r#"
trusted_proxies: ["127.0.0.5"]
policies:
  office: {{ ip_list: {{ allow: ["127.0.0.0/24", "10.1.0.0/16"], deny: ["127.0.0.3", "10.1.9.0/24"] }} }}
  blocklist: {{ ip_list: {{ deny: ["127.0.0.4/32"] }} }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: office, upstream: b, match: {{ path_prefix: /office }}, policies: [office] }}
  - {{ name: open, upstream: b, match: {{ path_prefix: /open }} }}
"#,
        backend.addr
    ))
    .await;
    let office = gw.url("/office");
    assert_eq!(
        status(&client_from("127.0.0.2"), office.clone(), None).await,
        200
    );
    // Deny wins over allow.
    assert_eq!(
        status(&client_from("127.0.0.3"), office.clone(), None).await,
        403
    );
    // The address after trusted_proxies: a trusted proxy's X-Forwarded-For decides...
    let proxy = client_from("127.0.0.5");
    assert_eq!(status(&proxy, office.clone(), Some("10.1.2.3")).await, 200);
    assert_eq!(status(&proxy, office.clone(), Some("10.1.9.9")).await, 403);
    assert_eq!(status(&proxy, office.clone(), Some("192.0.2.1")).await, 403);
    // ... an untrusted client's does not.
    assert_eq!(
        status(&client_from("127.0.0.3"), office.clone(), Some("10.1.2.3")).await,
        403
    );
    let refused = client_from("127.0.0.3")
        .get(office.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.headers()["content-type"], "application/json");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["status"], 403, "{body}");
    assert!(
        body["request_id"].is_string() || body["requestId"].is_string(),
        "{body}"
    );
    // Other routes are not concerned.
    assert_eq!(
        status(&client_from("127.0.0.3"), gw.url("/open"), None).await,
        200
    );

    // For every route, then on the listener (before routing: even a path no route takes).
    let base = gw.config_text("");
    let every = format!(
        "{base}trusted_proxies: [\"127.0.0.5\"]\npolicies:\n  blocklist: {{ ip_list: {{ deny: [\"127.0.0.4/32\"] }} }}\ndefault_policies: [blocklist]\nupstreams: {{ b: {{ targets: [\"{}\"] }} }}\nroutes:\n  - {{ name: open, upstream: b, match: {{ path_prefix: /open }} }}\n",
        backend.addr
    );
    gw.write_raw_config(&every);
    gw.wait_generation(2).await;
    assert_eq!(
        status(&client_from("127.0.0.4"), gw.url("/open"), None).await,
        403
    );
    assert_eq!(
        status(&client_from("127.0.0.4"), gw.url("/nowhere"), None).await,
        404
    );
    assert_eq!(
        status(&client_from("127.0.0.2"), gw.url("/open"), None).await,
        200
    );
    let on_listener = every
        .replace("default_policies: [blocklist]\n", "")
        .replacen(" }\n", ", policies: [blocklist] }\n", 1);
    assert!(
        on_listener.contains("policies: [blocklist] }"),
        "{on_listener}"
    );
    gw.write_raw_config(&on_listener);
    gw.wait_generation(3).await;
    assert_eq!(
        status(&client_from("127.0.0.4"), gw.url("/nowhere"), None).await,
        403
    );
    assert_eq!(
        status(&client_from("127.0.0.2"), gw.url("/open"), None).await,
        200
    );
}

#[tokio::test]
async fn header_rules_edit_both_sides() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        r#"
auth:
  t: {{ secret: "an-hmac-secret-that-is-long-enough-0123456789" }}
policies:
  tag:
    headers:
      request:
        remove: [X-Debug]
        set: {{ X-Route: "{{route}}", X-Client: "ip={{client_ip}}", X-Where: "{{host}}{{path}}", X-Id: "{{request_id}}" }}
        append: {{ X-Tag: gateway }}
      response:
        remove: [X-Powered-By]
        set: {{ X-Frame-Options: DENY, X-Served-By: "{{route}}" }}
        append: {{ Cache-Control: no-store }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: api, upstream: b, match: {{ path_prefix: /api }}, policies: [tag] }}
  - {{ name: plain, upstream: b }}
"#,
        backend.addr
    ))
    .await;
    let c = client();
    let r = c
        .get(gw.url("/api/x"))
        .header("x-debug", "1")
        .header("x-tag", "client")
        .header("x-route", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_eq!(r.headers()["x-served-by"], "api");
    let cache: Vec<_> = r.headers().get_all("cache-control").iter().collect();
    assert!(cache.iter().any(|v| *v == "no-store"), "{cache:?}");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let seen = echo(r).await;
    let h = &seen["headers"];
    assert!(h.get("x-debug").is_none(), "{h}");
    assert_eq!(h["x-route"], "api");
    assert_eq!(h["x-client"], "ip=127.0.0.1");
    assert_eq!(h["x-where"], format!("{}/api/x", gw.http));
    assert_eq!(h["x-id"], id);
    assert_eq!(h["x-tag"], "client, gateway");
    // A route without the policy is untouched.
    let r = c
        .get(gw.url("/other"))
        .header("x-debug", "1")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("x-frame-options").is_none());
    assert_eq!(echo(r).await["headers"]["x-debug"], "1");
}

#[tokio::test]
async fn header_rules_refuse_what_they_must_not_touch() {
    for (rule, field, words) in [
        (
            "request: { set: { X-Forwarded-For: x } }",
            "policies.h.headers.request.set.X-Forwarded-For",
            "cannot be edited",
        ),
        (
            "response: { remove: [Transfer-Encoding] }",
            "policies.h.headers.response.remove[0]",
            "cannot be edited",
        ),
        (
            "response: { set: { X-P: \"{path}\" } }",
            "policies.h.headers.response.set.X-P",
            "request edits only",
        ),
        (
            "request: { set: { X-A: \"{nope}\" } }",
            "policies.h.headers.request.set.X-A",
            "unknown placeholder",
        ),
        (
            "request: { set: { X-A: \"a\\r\\nX-B: b\" } }",
            "policies.h.headers.request.set.X-A",
            "not a valid header value",
        ),
        (
            "request: { set: { \"bad name\": x } }",
            "policies.h.headers.request.set.bad name",
            "not a header name",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.yaml");
        std::fs::write(
            &path,
            format!("listeners: {{ http: {{ address: \"127.0.0.1:1\" }} }}\npolicies:\n  h: {{ headers: {{ {rule} }} }}\nupstreams: {{ u: {{ targets: [\"127.0.0.1:1\"] }} }}\nroutes: [ {{ name: r, upstream: u, policies: [h] }} ]\n"),
        )
        .unwrap();
        let out = std::process::Command::new(gateway_bin())
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{rule}");
        assert!(err.contains("g.yaml:3:"), "{rule}: {err}");
        assert!(err.contains(field) && err.contains(words), "{rule}: {err}");
    }
}

#[tokio::test]
async fn routes_match_on_query_parameters() {
    let v2 = Backend::start("127.0.0.1", "v2").await;
    let num = Backend::start("127.0.0.1", "num").await;
    let any = Backend::start("127.0.0.1", "any").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  v2: {{ targets: ["{}"] }}
  num: {{ targets: ["{}"] }}
  any: {{ targets: ["{}"] }}
routes:
  - {{ name: any, upstream: any, match: {{ path_prefix: /items }} }}
  - {{ name: v2, upstream: v2, match: {{ path_prefix: /items, query: [ {{ name: version, value: "2 beta" }} ] }} }}
  - {{ name: num, upstream: num, match: {{ path_prefix: /items, query: [ {{ name: id, regex: "[0-9]+" }}, {{ name: debug }} ] }} }}
"#,
        v2.addr, num.addr, any.addr
    ))
    .await;
    let c = client();
    let backend = |path: &'static str| {
        let c = c.clone();
        let url = gw.url(path);
        async move { echo(c.get(url).send().await.unwrap()).await["backend"].clone() }
    };
    assert_eq!(backend("/items?version=2+beta").await, "v2");
    assert_eq!(backend("/items?version=2%20beta&x=1").await, "v2");
    assert_eq!(backend("/items?version=3").await, "any");
    assert_eq!(backend("/items?id=42&debug").await, "num");
    assert_eq!(backend("/items?id=42x&debug").await, "any");
    assert_eq!(backend("/items?id=42").await, "any");
    assert_eq!(backend("/items").await, "any");
    let routes = gw.admin_json("/routes").await;
    let v2_route = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "v2")
        .cloned()
        .unwrap();
    assert_eq!(v2_route["match"]["query"][0]["value"], "2 beta", "{routes}");
}

#[tokio::test]
async fn routes_answer_by_themselves() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("maintenance.html");
    std::fs::write(&page, "<h1>Back soon</h1>\n").unwrap();
    let gw = Gateway::start(&format!(
        r#"
policies:
  to_v2: {{ redirect: {{ to: "{{scheme}}://{{host}}{{path}}{{query}}", status: 308 }} }}
  local: {{ redirect: {{ to: "{{path}}{{query}}", status: 301 }} }}
  robots: {{ respond: {{ status: 200, body: "User-agent: *\nDisallow: /\n" }} }}
  maintenance: {{ respond: {{ status: 503, file: "{}", content_type: "text/html; charset=utf-8" }} }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: old, upstream: b, match: {{ path_regex: "/v1/(.*)" }}, rewrite: "/v2/$1", policies: [to_v2] }}
  - {{ name: slash, match: {{ path_prefix: /go }}, strip_prefix: true, policies: [local] }}
  - {{ name: robots, match: {{ path: /robots.txt }}, policies: [robots] }}
  - {{ name: shop, upstream: b, match: {{ path_prefix: /shop }}, policies: [maintenance] }}
"#,
        page.display(),
        backend.addr
    ))
    .await;
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // A capture of path_regex, through the route's rewrite.
    let r = c.get(gw.url("/v1/items/7?x=1")).send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("http://{}/v2/items/7?x=1", gw.http).as_str()
    );
    // A target made of the path can never name another host.
    let r = c.get(gw.url("/go//evil.example/x")).send().await.unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"], "/evil.example/x");
    // A backslash, raw or encoded, is refused before any route (the path checks).
    let raw = raw_request(
        gw.http,
        b"GET /go/\\evil.example HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        std::time::Duration::from_secs(2),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 400") || raw.contains("location: /evil.example"),
        "{raw}"
    );
    assert!(!raw.to_ascii_lowercase().contains("location: //"), "{raw}");
    let r = c.get(gw.url("/go/%5Cevil.example")).send().await.unwrap();
    assert!(r
        .headers()
        .get("location")
        .is_none_or(|l| !l.to_str().unwrap().starts_with("//")));
    let r = c.get(gw.url("/robots.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), "User-agent: *\nDisallow: /\n");
    let r = c.get(gw.url("/shop/cart")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), "<h1>Back soon</h1>\n");
    assert_eq!(backend.hits(), 0, "nothing went upstream");
    // A route that answers by itself names no upstream; `/routes` shows none.
    let routes = gw.admin_json("/routes").await;
    let robots = routes
        .as_array()
        .or_else(|| routes["routes"].as_array())
        .and_then(|rs| rs.iter().find(|r| r["name"] == "robots"))
        .unwrap_or_else(|| panic!("{routes}"));
    assert!(robots["upstream"].is_null(), "{robots}");
}

#[tokio::test]
async fn cors_preflights_are_answered_at_the_edge() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        r#"
policies:
  app: {{ cors: {{ allow_origins: ["https://app.example.com", "https://*.example.org"], allow_methods: [GET, PUT, DELETE], allow_headers: [Content-Type, Authorization], allow_credentials: true, max_age: 10m, expose_headers: [X-Request-Id] }} }}
  public: {{ cors: {{ allow_origins: ["*"] }} }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: api, upstream: b, match: {{ path_prefix: /api }}, policies: [app] }}
  - {{ name: pub, upstream: b, match: {{ path_prefix: /pub }}, policies: [public] }}
"#,
        backend.addr
    ))
    .await;
    let c = client();
    let preflight = |origin: &'static str, method: &'static str, headers: Option<&'static str>| {
        let mut req = c
            .request(reqwest::Method::OPTIONS, gw.url("/api/items/1"))
            .header("origin", origin)
            .header("access-control-request-method", method);
        if let Some(h) = headers {
            req = req.header("access-control-request-headers", h);
        }
        req.send()
    };
    // An allowed preflight: answered here with what the browser needs.
    let r = preflight(
        "https://app.example.com",
        "PUT",
        Some("content-type, authorization"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET, PUT, DELETE");
    assert_eq!(
        h["access-control-allow-headers"],
        "content-type, authorization"
    );
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    assert!(h["vary"].to_str().unwrap().contains("Origin"));
    // A wildcard subdomain.
    let r = preflight("https://a.b.example.org", "DELETE", None)
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://a.b.example.org"
    );
    // Refused: another origin, `null`, a method or a header not allowed: no CORS headers.
    for (origin, method, headers) in [
        ("https://evil.example", "PUT", None),
        ("null", "GET", None),
        ("https://app.example.com", "PATCH", None),
        ("https://app.example.com", "PUT", Some("x-secret")),
        ("https://example.org", "GET", None),
    ] {
        let r = preflight(origin, method, headers).await.unwrap();
        assert_eq!(r.status(), 204, "{origin} {method}");
        assert!(
            r.headers().get("access-control-allow-origin").is_none(),
            "{origin} {method} {headers:?}"
        );
    }
    assert_eq!(backend.hits(), 0, "no preflight went upstream");

    // The actual request: an allowed origin gets its headers, another none; Vary either way.
    let r = c
        .put(gw.url("/api/items/1"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    assert_eq!(r.headers()["access-control-expose-headers"], "x-request-id");
    assert!(r.headers().get_all("vary").iter().any(|v| v == "Origin"));
    let r = c
        .get(gw.url("/api/x"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert!(r.headers().get_all("vary").iter().any(|v| v == "Origin"));
    // Any origin, no credentials: `*`, and the answer does not depend on the origin.
    let r = c
        .get(gw.url("/pub/x"))
        .header("origin", "null")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r
        .headers()
        .get("access-control-allow-credentials")
        .is_none());
    // An OPTIONS that is no preflight goes upstream as any request.
    let r = c
        .request(reqwest::Method::OPTIONS, gw.url("/api/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(echo(r).await["method"], "OPTIONS");
}

#[tokio::test]
async fn error_pages_replace_the_json_answers() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("502.html");
    std::fs::write(&page, "<h1>{status}</h1><p>id {request_id}</p>\n").unwrap();
    let dead = DeadPort::reserve();
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start_with(
        ", error_pages: { 404: { body: \"nothing here ({request_id})\", content_type: text/plain } }",
        "",
        &format!(
            r#"
upstreams:
  b: {{ targets: ["{}"] }}
  dead: {{ targets: ["127.0.0.1:{}"], retries: 0 }}
routes:
  - {{ name: ok, upstream: b, match: {{ path_prefix: /ok }} }}
  - {{ name: down, upstream: dead, match: {{ path_prefix: /down }}, error_pages: {{ 502: {{ file: "{}" }} }} }}
"#,
            backend.addr,
            dead.port,
            page.display()
        ),
    )
    .await;
    let c = client();
    // The listener's page for "no route".
    let r = c.get(gw.url("/nowhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "text/plain");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.text().await.unwrap(), format!("nothing here ({id})"));
    // The route's page for an upstream that refuses connections.
    let r = c.get(gw.url("/down")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        r.text().await.unwrap(),
        format!("<h1>502</h1><p>id {id}</p>\n")
    );
    // Statuses without a page stay JSON.
    let raw = raw_request(
        gw.http,
        b"GET /ok HTTP/1.1\r\nConnection: close\r\n\r\n",
        std::time::Duration::from_secs(2),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{raw}"
    );
}

#[tokio::test]
async fn the_gateways_own_answers_carry_the_response_edits() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        r#"
auth:
  t: {{ secret: "an-hmac-secret-that-is-long-enough-0123456789" }}
policies:
  app: {{ cors: {{ allow_origins: ["https://app.example.com"], allow_credentials: true }} }}
  tag: {{ headers: {{ response: {{ set: {{ X-Frame-Options: DENY }} }} }} }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: api, upstream: b, match: {{ path_prefix: /api }}, policies: [app, tag], auth: t }}
"#,
        backend.addr
    ))
    .await;
    // A browser can read the 401 (CORS), and it has the route's header rules.
    let r = client()
        .get(gw.url("/api/me"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert!(r.headers().get("www-authenticate").is_some());
    assert_eq!(r.headers()["content-type"], "application/json");
}
