//! Route lookup cost as the table grows: 10, 1,000 and 10,000 routes. The lookup should cost
//! the same at every size (hash probes per path segment and host label, not per route).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gateway::config::RouteConfig;
use gateway::routing::Router;
use http::{HeaderMap, Method};

#[derive(serde::Deserialize)]
struct Doc {
    routes: Vec<RouteConfig>,
}

/// `n` routes of mixed kinds: prefixes, exact paths, method-qualified prefixes, host-bound
/// prefixes and a few regexes, as a large real table would have.
fn table(n: usize) -> Vec<RouteConfig> {
    let mut y = String::from("routes:\n");
    for i in 0..n {
        let line = match i % 5 {
            0 => format!("  - {{ name: p{i}, upstream: u, match: {{ path_prefix: /svc{i}/items }} }}\n"),
            1 => format!("  - {{ name: e{i}, upstream: u, match: {{ path: /svc{i}/login }} }}\n"),
            2 => format!("  - {{ name: m{i}, upstream: u, match: {{ path_prefix: /svc{i}, methods: [POST] }} }}\n"),
            3 => format!("  - {{ name: h{i}, upstream: u, match: {{ hosts: [\"t{i}.example.com\"], path_prefix: /api }} }}\n"),
            _ if i % 50 == 4 => format!("  - {{ name: r{i}, upstream: u, match: {{ path_regex: \"/re{i}/[0-9]+\" }} }}\n"),
            _ => format!("  - {{ name: w{i}, upstream: u, match: {{ hosts: [\"*.w{i}.example.com\"] }} }}\n"),
        };
        y.push_str(&line);
    }
    y.push_str("  - { name: fallback, upstream: u }\n");
    serde_saphyr::from_str::<Doc>(&y)
        .expect("route table")
        .routes
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("routing_lookup");
    let headers = HeaderMap::new();
    for n in [10usize, 1_000, 10_000] {
        let routes = table(n);
        let router = Router::new(&routes).expect("router");
        let last_prefix = format!("/svc{}/items/42", (n - 1) / 5 * 5);
        group.bench_with_input(
            BenchmarkId::new("prefix_hit", n),
            &last_prefix,
            |b, path| {
                b.iter(|| {
                    router.find(
                        Some("api.example.com"),
                        black_box(path),
                        &Method::GET,
                        &headers,
                        None,
                    )
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("host_hit", n), &n, |b, _| {
            b.iter(|| {
                router.find(
                    Some(black_box("t3.example.com")),
                    "/api/users/1",
                    &Method::GET,
                    &headers,
                    None,
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("fallback", n), &n, |b, _| {
            b.iter(|| {
                router.find(
                    Some("api.example.com"),
                    black_box("/nothing/here/at/all"),
                    &Method::GET,
                    &headers,
                    None,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
