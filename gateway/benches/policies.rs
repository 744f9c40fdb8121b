//! Per-request cost of the policies: JWT verification per algorithm, the rate-limit decision
//! (one hot key, and keys spread over 10,000 clients), IP lists of 10 and 10,000 networks, and
//! header rules (fixed values and placeholders), CORS, the API-key lookup among 1,000 keys and
//! the compression negotiation.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gateway::auth::AuthPolicy;
use gateway::config::{AuthConfig, DnsConfig, RateLimitConfig};
use gateway::ratelimit::{LimitKey, RateLimitPolicy};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

const SECRET: &str = "an-hmac-secret-that-is-long-enough-0123456789";

fn claims() -> serde_json::Value {
    serde_json::json!({"sub": "bench-user", "role": "user", "iss": "bench", "aud": "api", "exp": 4_000_000_000u64})
}

/// A policy from YAML, and a token it accepts.
fn policy(yaml: &str) -> AuthPolicy {
    let cfg: AuthConfig = serde_saphyr::from_str(yaml).expect("policy");
    AuthPolicy::new("bench", &cfg, &DnsConfig::default()).expect("policy")
}

fn jwt(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("jwt_verify");
    // The token cache is off so each iteration checks the signature; the cached case is
    // measured on its own.
    let common = "issuer: bench, audience: api, forward_claims: { sub: X-User-Id, role: X-User-Role }, token_cache: 0";

    let hs = policy(&format!("{{ secret: \"{SECRET}\", {common} }}"));
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token");
    group.bench_function("HS256", |b| {
        b.iter(|| rt.block_on(hs.verify(black_box(&token))).expect("valid"))
    });

    for (name, alg, rcgen_alg) in [
        ("ES256", Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256),
        ("EdDSA", Algorithm::EdDSA, &rcgen::PKCS_ED25519),
    ] {
        let key = rcgen::KeyPair::generate_for(rcgen_alg).expect("key");
        let public = dir.path().join(format!("{name}.pem"));
        std::fs::write(&public, key.public_key_pem()).expect("write");
        let p = policy(&format!(
            "{{ public_keys: [ {{ file: \"{}\", algorithm: {name} }} ], {common} }}",
            public.display()
        ));
        let private = key.serialize_pem();
        let encoding = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(private.as_bytes()),
            _ => EncodingKey::from_ed_pem(private.as_bytes()),
        }
        .expect("encoding key");
        let token = encode(&Header::new(alg), &claims(), &encoding).expect("token");
        group.bench_function(name, |b| {
            b.iter(|| rt.block_on(p.verify(black_box(&token))).expect("valid"))
        });
        if alg == Algorithm::EdDSA {
            let cached = policy(&format!(
                "{{ public_keys: [ {{ file: \"{}\", algorithm: EdDSA }} ], issuer: bench, audience: api, forward_claims: {{ sub: X-User-Id, role: X-User-Role }} }}",
                public.display()
            ));
            group.bench_function("EdDSA_cached", |b| {
                b.iter(|| {
                    rt.block_on(cached.verify(black_box(&token)))
                        .expect("valid")
                })
            });
        }
    }
    group.finish();
}

fn ratelimit(c: &mut Criterion) {
    let mut group = c.benchmark_group("ratelimit_check");
    let cfg: RateLimitConfig =
        serde_saphyr::from_str("{ rate: 1000000/s, burst: 1000000 }").expect("policy");
    let p = RateLimitPolicy::new("bench", &cfg).expect("policy");
    let one = Some(LimitKey::Ip("10.0.0.1".parse().expect("ip")));
    group.bench_function("one_key", |b| b.iter(|| p.check(black_box(one))));
    let keys: Vec<_> = (0..10_000u32)
        .map(|i| Some(LimitKey::Ip(std::net::IpAddr::from(i.to_be_bytes()))))
        .collect();
    let mut i = 0;
    group.bench_function("10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            p.check(black_box(keys[i]))
        })
    });
    group.finish();
}

fn ip_list(c: &mut Criterion) {
    use gateway::policy::ip_list::{Cidrs, IpList};
    use gateway::proxy::context::RequestCtx;
    let mut group = c.benchmark_group("ip_list");
    for n in [10u32, 10_000] {
        let nets = (0..n).map(|i| {
            let base = i.wrapping_mul(2_654_435_761) & 0xffff_ff00;
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(base.into(), 24).expect("net"))
        });
        let list = IpList {
            allow: None,
            deny: Cidrs::new(nets),
        };
        let ctx = RequestCtx::with_client_ip("192.0.2.77".parse().expect("ip"));
        group.bench_function(format!("deny_{n}_miss"), |b| {
            b.iter(|| black_box(list.on_request(black_box(&ctx)).is_ok()))
        });
    }
    group.finish();
}

fn header_rules(c: &mut Criterion) {
    use gateway::policy::headers::{parse_name, parse_template, Edits};
    use gateway::policy::HeaderRules;
    use gateway::proxy::context::RequestCtx;
    let mut group = c.benchmark_group("header_rules");
    let edits = |set: &[(&str, &str)]| Edits {
        remove: vec![parse_name("x-powered-by").expect("name")],
        set: set
            .iter()
            .map(|(n, v)| {
                (
                    parse_name(n).expect("name"),
                    parse_template(v, false).expect("value"),
                )
            })
            .collect(),
        append: Vec::new(),
    };
    let ctx = RequestCtx::with_client_ip("192.0.2.77".parse().expect("ip"));
    for (name, set) in [
        (
            "fixed_2",
            vec![
                ("x-frame-options", "DENY"),
                ("x-content-type-options", "nosniff"),
            ],
        ),
        ("client_ip", vec![("x-client", "ip={client_ip}")]),
    ] {
        let rules = HeaderRules {
            request: Edits::default(),
            response: edits(&set),
        };
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || {
                    let mut h = http::HeaderMap::new();
                    h.insert(
                        "content-type",
                        http::HeaderValue::from_static("application/json"),
                    );
                    h.insert("x-powered-by", http::HeaderValue::from_static("x"));
                    h
                },
                |h| rules.on_response(h, black_box(&ctx)).expect("edit"),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn cors(c: &mut Criterion) {
    use gateway::policy::cors::{parse_origins, Cors};
    let mut group = c.benchmark_group("cors");
    let origins: Vec<String> = ["https://app.example.com", "https://*.example.org"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let policy = Cors {
        origins: parse_origins(&origins, true).expect("origins"),
        methods: vec![http::Method::GET, http::Method::PUT],
        methods_value: http::HeaderValue::from_static("GET, PUT"),
        headers: vec![http::HeaderName::from_static("content-type")],
        credentials: true,
        max_age: Some(http::HeaderValue::from_static("600")),
        expose: None,
    };
    let mut request = http::HeaderMap::new();
    request.insert(
        "origin",
        http::HeaderValue::from_static("https://a.example.org"),
    );
    group.bench_function("response_allowed_wildcard", |b| {
        b.iter_batched_ref(
            http::HeaderMap::new,
            |h| policy.on_response(h, black_box(&request)).expect("edit"),
            criterion::BatchSize::SmallInput,
        )
    });
    let origin = http::HeaderValue::from_static("https://app.example.com");
    let method = http::HeaderValue::from_static("PUT");
    let asked = http::HeaderValue::from_static("content-type");
    group.bench_function("preflight_allowed", |b| {
        b.iter(|| policy.preflight(black_box(&origin), &method, Some(&asked)))
    });
    group.finish();
}

fn api_key(c: &mut Criterion) {
    use gateway::policy::api_key::{digest_hex, parse_keys};
    let mut group = c.benchmark_group("api_key");
    let name = http::HeaderName::from_static("x-api-key-name");
    let scopes = http::HeaderName::from_static("x-api-key-scopes");
    let file: String = (0..1000)
        .map(|i| format!("k{i} {} read\n", digest_hex(&format!("key-{i:040}"))))
        .collect();
    let keys = parse_keys(&file, &name, &scopes).expect("keys");
    let policy = gateway::policy::ApiKey {
        header: http::HeaderName::from_static("x-api-key"),
        query: None,
        required_scopes: Vec::new(),
        keys,
        forward_headers: vec![name, scopes],
    };
    let hit = format!("key-{:040}", 500);
    let miss = format!("key-{:040}", 5000);
    group.bench_function("1000_keys_hit", |b| {
        b.iter(|| policy.find(black_box(hit.as_bytes())).is_some())
    });
    group.bench_function("1000_keys_miss", |b| {
        b.iter(|| policy.find(black_box(miss.as_bytes())).is_some())
    });
    group.finish();
}

fn basic_auth(c: &mut Criterion) {
    use base64::Engine;
    use gateway::policy::basic_auth::{credentials, parse_users};
    let mut group = c.benchmark_group("basic_auth");
    let hash = bcrypt::hash("wonderland", 4).expect("hash");
    let header = http::HeaderName::from_static("x-auth-user");
    let users = parse_users(&format!("alice:{hash}\n"), Some(&header)).expect("users");
    let policy = gateway::policy::BasicAuth::new(
        "bench",
        users,
        http::HeaderValue::from_static("Basic realm=\"bench\""),
        true,
        Some(header),
        5,
        std::time::Duration::from_secs(60),
    );
    policy.remember("alice", b"wonderland");
    let mut headers = http::HeaderMap::new();
    let b64 = base64::engine::general_purpose::STANDARD.encode("alice:wonderland");
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Basic {b64}").parse().expect("header"),
    );
    // What a request with remembered credentials costs: decode, user lookup, keyed digest,
    // set lookup.
    group.bench_function("cached_hit", |b| {
        b.iter(|| {
            let (user, password) = credentials(black_box(&headers)).expect("credentials");
            policy.users.contains_key(&user) && policy.remembered(&user, &password)
        })
    });
    group.finish();
}

/// The resilience policies on the path of a request they let through.
fn resilience(c: &mut Criterion) {
    use gateway::policy::circuit_breaker::{BreakerSpec, CircuitBreaker};
    use gateway::policy::split::{Split, Sticky};
    use gateway::policy::{ConcurrencyLimit, ConcurrencySpec};
    let mut group = c.benchmark_group("resilience");
    let limit = ConcurrencyLimit::new(
        "bench",
        ConcurrencySpec {
            max: 100,
            queue: 100,
            queue_timeout: std::time::Duration::from_secs(1),
        },
    );
    group.bench_function("concurrency_admit_release", |b| {
        b.iter(|| drop(black_box(limit.try_admit())))
    });
    let breaker = CircuitBreaker::new(
        "bench",
        BreakerSpec {
            failure_percent: 50,
            min_requests: 20,
            window_secs: 10,
            open_for: std::time::Duration::from_secs(10),
            trial_requests: 3,
            statuses: vec![502, 503, 504],
        },
    );
    let now = 1_000_000u64;
    group.bench_function("circuit_admit_record_success", |b| {
        b.iter(|| {
            let admission = breaker.admit(black_box(now)).expect("closed");
            breaker.record(admission, breaker.is_failure(200), now);
        })
    });
    let upstream = |name: &str| {
        let cfg: gateway::config::UpstreamConfig =
            serde_saphyr::from_str("targets: [\"127.0.0.1:1\"]").expect("upstream");
        gateway::upstream::Upstream::new(
            name,
            gateway::upstream::UpstreamSpec::new(&cfg, &DnsConfig::default()),
        )
    };
    let split = Split::new(
        vec![(upstream("blue"), 90), (upstream("green"), 10)],
        Some(Sticky::Cookie("sid".into())),
    );
    let mut req = pingora::http::RequestHeader::build("GET", b"/", None).expect("request");
    req.insert_header("cookie", "theme=dark; sid=user-12345")
        .expect("header");
    let ctx = gateway::proxy::context::RequestCtx::with_client_ip([10, 0, 0, 1].into());
    group.bench_function("split_sticky_cookie", |b| {
        b.iter(|| split.choose(black_box(&req), &ctx))
    });
    group.finish();
}

fn compress(c: &mut Criterion) {
    use gateway::policy::compress::{Coding, Compress};
    let mut group = c.benchmark_group("compress");
    let policy = Compress {
        encodings: vec![(Coding::Zstd, 3), (Coding::Brotli, 4), (Coding::Gzip, 5)],
        min_size: 1024,
        types: Vec::new(),
    };
    group.bench_function("negotiate_browser", |b| {
        b.iter(|| policy.negotiate(black_box("gzip, deflate, br, zstd")))
    });
    group.finish();
}

criterion_group!(
    benches,
    jwt,
    ratelimit,
    ip_list,
    header_rules,
    cors,
    api_key,
    basic_auth,
    resilience,
    compress
);
criterion_main!(benches);
