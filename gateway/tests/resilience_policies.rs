//! Resilience policies through the real binary: concurrency limits per route and per
//! upstream, with their queue, against slow backends.

mod common;

use common::*;
use std::time::Duration;

/// `gateway_concurrency_total{policy, result}`.
async fn count(gw: &Gateway, policy: &str, result: &str) -> u64 {
    let series = format!("gateway_concurrency_total{{policy=\"{policy}\",result=\"{result}\"}}");
    gw.metric(&series).await as u64
}

/// Sends `n` requests for `path` at once; their statuses, sorted.
async fn burst(gw: &Gateway, path: &str, n: usize) -> Vec<u16> {
    let c = client();
    let mut all = Vec::new();
    for _ in 0..n {
        let req = c.get(gw.url(path));
        all.push(tokio::spawn(async move { req.send().await.unwrap() }));
    }
    let mut statuses = Vec::new();
    for t in all {
        let r = t.await.unwrap();
        if r.status() == 503 {
            assert_eq!(r.headers()["retry-after"], "1");
        }
        statuses.push(r.status().as_u16());
    }
    statuses.sort();
    statuses
}

#[tokio::test]
async fn concurrency_limits_hold_exactly_and_queue_for_a_bounded_time() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        r#"
policies:
  two: {{ concurrency: {{ max: 2, queue: 2, queue_timeout: 300ms }} }}
  one: {{ concurrency: {{ max: 1, queue: 1, queue_timeout: 5s }} }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: two, upstream: b, match: {{ path_prefix: /two }}, policies: [two] }}
  - {{ name: one, upstream: b, match: {{ path_prefix: /one }}, policies: [one] }}
"#,
        backend.addr
    ))
    .await;

    // 6 at once for 2 places and 2 queue slots, each held 1 s: 2 served, 2 queued until their
    // 300 ms run out, 2 refused at once.
    let statuses = burst(&gw, "/two?sleep=1000", 6).await;
    assert_eq!(statuses, [200, 200, 503, 503, 503, 503]);
    assert_eq!(count(&gw, "two", "admitted").await, 2);
    assert_eq!(count(&gw, "two", "timeout").await, 2);
    assert_eq!(count(&gw, "two", "queue_full").await, 2);

    // A queued request gets the place when it is given back.
    let statuses = burst(&gw, "/one?sleep=300", 2).await;
    assert_eq!(statuses, [200, 200]);
    assert_eq!(count(&gw, "one", "queued").await, 1);

    // A client that leaves while queued: its place comes back, nothing stays taken.
    let c = client();
    let holder = tokio::spawn(c.get(gw.url("/one?sleep=800")).send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let leaver = tokio::spawn(c.get(gw.url("/one?sleep=10")).send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    leaver.abort();
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admitted = count(&gw, "one", "admitted").await;
    for _ in 0..3 {
        let r = c.get(gw.url("/one")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(count(&gw, "one", "admitted").await, admitted + 3);
}

#[tokio::test]
async fn an_upstream_limit_counts_every_route_and_survives_a_reload() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams: {{ b: {{ targets: ["{}"], concurrency: {{ max: 1, queue: 0 }} }} }}
routes:
  - {{ name: a, upstream: b, match: {{ path_prefix: /a }} }}
  - {{ name: z, upstream: b, match: {{ path_prefix: /z }} }}
"#,
        backend.addr
    ))
    .await;
    let c = client();
    let held = tokio::spawn(c.get(gw.url("/a?sleep=1500")).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The other route shares the upstream's one place.
    let r = c.get(gw.url("/z")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(count(&gw, "upstream:b", "queue_full").await, 1);
    // A reload that leaves the upstream alone keeps the count: the place is still taken.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    gw.write_raw_config(&format!("{text}# touched\n"));
    gw.wait_generation(2).await;
    let r = c.get(gw.url("/z")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    let r = c.get(gw.url("/z")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_listener_limit_survives_a_reload() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start_with(
        ", policies: [one]",
        "",
        &format!(
            "policies:\n  one: {{ concurrency: {{ max: 1, queue: 0 }} }}\n{}",
            one_route_to(&backend, "")
        ),
    )
    .await;
    let c = client();
    let held = tokio::spawn(c.get(gw.url("/a?sleep=1500")).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.get(gw.url("/z")).send().await.unwrap().status(), 503);
    // A reload that keeps the policy keeps its places: the one in flight is still taken.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    gw.write_raw_config(&format!("{text}# touched\n"));
    gw.wait_generation(2).await;
    assert_eq!(c.get(gw.url("/z")).send().await.unwrap().status(), 503);
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/z")).send().await.unwrap().status(), 200);
}

/// A metric's value (0 when absent), by its whole series name.
async fn series(gw: &Gateway, key: &str) -> i64 {
    gw.metric(key).await as i64
}

#[tokio::test]
async fn a_failing_upstream_trips_its_circuit_then_recovers_through_trials() {
    let dead = DeadPort::reserve();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", dead.port).parse().unwrap();
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  b:
    targets: ["{addr}"]
    retries: 0
    health: {{ passive: null }}
    circuit_breaker: {{ min_requests: 4, failure_percent: 50, window: 10s, open_for: 1s, trial_requests: 2 }}
routes: [ {{ name: r, upstream: b }} ]
"#
    ))
    .await;
    let c = client();
    // Four connect failures: 502 each, and the fourth opens the circuit.
    for _ in 0..4 {
        assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 502);
    }
    let r = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(echo_status(r).await, "upstream circuit open");
    assert_eq!(
        series(&gw, "gateway_upstream_circuit_state{upstream=\"b\"}").await,
        1
    );
    assert_eq!(
        series(&gw, "gateway_upstream_circuit_opened_total{upstream=\"b\"}").await,
        1
    );
    let ups = gw.admin_json("/upstreams").await;
    assert_eq!(ups["upstreams"]["b"]["circuit"], "open", "{ups}");

    // The upstream comes back; after open_for, two good trials close the circuit.
    drop(dead);
    let _backend = Backend::start_on(addr, "b").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        series(&gw, "gateway_upstream_circuit_state{upstream=\"b\"}").await,
        0
    );
    for _ in 0..5 {
        assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    }
    assert!(
        series(
            &gw,
            "gateway_upstream_circuit_rejected_total{upstream=\"b\"}"
        )
        .await
            >= 1
    );
}

/// The `error` of a JSON answer.
async fn echo_status(r: reqwest::Response) -> String {
    let body: serde_json::Value = r.json().await.unwrap();
    body["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn the_retry_budget_bounds_retries_to_a_share_of_requests() {
    let (a, b) = (DeadPort::reserve(), DeadPort::reserve());
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  b:
    targets: ["{}", "{}"]
    retries: 1
    health: {{ passive: null }}
    retry_budget: {{ budget_percent: 0, min_retries: 2, window: 10s }}
routes: [ {{ name: r, upstream: b }} ]
"#,
        format_args!("127.0.0.1:{}", a.port),
        format_args!("127.0.0.1:{}", b.port)
    ))
    .await;
    let c = client();
    for _ in 0..6 {
        assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 502);
    }
    // Each request could have retried once; the budget allowed two in the window.
    assert_eq!(
        series(&gw, "gateway_upstream_retries_total{upstream=\"b\"}").await,
        2
    );
    assert_eq!(
        series(
            &gw,
            "gateway_upstream_retry_budget_exhausted_total{upstream=\"b\"}"
        )
        .await,
        4
    );
}

#[tokio::test]
async fn a_split_shares_requests_by_weight_and_keeps_sticky_clients_on_their_side() {
    let blue = Backend::start("127.0.0.1", "blue").await;
    let green = Backend::start("127.0.0.1", "green").await;
    let config = |w_blue: u32, w_green: u32| {
        format!(
            r#"
upstreams:
  blue: {{ targets: ["{}"] }}
  green: {{ targets: ["{}"] }}
routes:
  - {{ name: canary, match: {{ path_prefix: /canary }}, split: [ {{ upstream: blue, weight: {w_blue} }}, {{ upstream: green, weight: {w_green} }} ] }}
  - {{ name: sticky, match: {{ path_prefix: /sticky }}, sticky: "cookie:sid", split: [ {{ upstream: blue, weight: {w_blue} }}, {{ upstream: green, weight: {w_green} }} ] }}
"#,
            blue.addr, green.addr
        )
    };
    let gw = Gateway::start(&config(90, 10)).await;
    let c = client();
    let side = |path: String, sid: Option<String>| {
        let mut req = c.get(gw.url(&path));
        if let Some(sid) = sid {
            req = req.header("cookie", format!("theme=dark; sid={sid}"));
        }
        async move {
            echo(req.send().await.unwrap()).await["backend"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    // 1,000 requests without a key: the shares hold to within a few percent.
    let mut green_hits = 0;
    for _ in 0..1000 {
        if side("/canary".into(), None).await == "green" {
            green_hits += 1;
        }
    }
    assert!(
        (70..=130).contains(&green_hits),
        "{green_hits} of 1000 to green"
    );

    // Sticky: 200 clients, each asked 3 times, always land on the same side.
    let mut before = Vec::new();
    for i in 0..200 {
        let first = side("/sticky".into(), Some(format!("user-{i}"))).await;
        for _ in 0..2 {
            assert_eq!(
                side("/sticky".into(), Some(format!("user-{i}"))).await,
                first
            );
        }
        before.push(first);
    }
    let on_green = before.iter().filter(|s| *s == "green").count();
    assert!((5..=40).contains(&on_green), "{on_green} of 200 on green");

    // A reload that keeps the weights keeps everyone; one that moves weight to green only
    // moves clients to green.
    gw.write_config(&format!("{}# touched\n", config(90, 10)));
    gw.wait_generation(2).await;
    for (i, was) in before.iter().enumerate() {
        assert_eq!(
            &side("/sticky".into(), Some(format!("user-{i}"))).await,
            was
        );
    }
    gw.write_config(&config(50, 50));
    gw.wait_generation(3).await;
    let mut moved = 0;
    for (i, was) in before.iter().enumerate() {
        let now = side("/sticky".into(), Some(format!("user-{i}"))).await;
        if &now != was {
            assert_eq!((was.as_str(), now.as_str()), ("blue", "green"), "user-{i}");
            moved += 1;
        }
    }
    assert!(moved > 0);
    let routes = gw.admin_json("/routes").await;
    let text = routes.to_string();
    assert!(
        text.contains("\"split\"") && text.contains("\"weight\":50"),
        "{text}"
    );
}

#[tokio::test]
async fn a_mirror_copies_requests_and_never_holds_the_real_one_back() {
    let backend = Backend::start("127.0.0.1", "real").await;
    let (shadow, heads) = recording_upstream(OK_RESPONSE).await;
    let kept = Backend::start("127.0.0.1", "kept").await;
    let spare = Backend::start("127.0.0.1", "spare").await;
    // A shadow that takes connections and never answers.
    let silent = SilentPort::start().await;
    let silent_addr = silent.addr;
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  real: {{ targets: ["{}"] }}
  shadow: {{ targets: ["{shadow}"] }}
  silent: {{ targets: ["{silent_addr}"] }}
  kept: {{ targets: ["{}"] }}
  slowpair: {{ targets: ["{silent_addr}", "{}"] }}
routes:
  - {{ name: slow, upstream: real, match: {{ path_prefix: /slow }}, mirror: {{ upstream: slowpair, timeout: 200ms }} }}
  - {{ name: pooled, upstream: real, match: {{ path_prefix: /pooled }}, mirror: {{ upstream: kept }} }}
  - {{ name: copied, upstream: real, match: {{ path_prefix: /copied }}, mirror: {{ upstream: shadow, max_body: 2KiB }} }}
  - {{ name: half, upstream: real, match: {{ path_prefix: /half }}, mirror: {{ upstream: shadow, percent: 50 }} }}
  - {{ name: hung, upstream: real, match: {{ path_prefix: /hung }}, mirror: {{ upstream: silent, timeout: 3s }} }}
"#,
        backend.addr, kept.addr, spare.addr
    ))
    .await;
    let c = client();
    let metric = |route: &'static str, result: &'static str| {
        let series = format!("gateway_mirror_total{{result=\"{result}\",route=\"{route}\"}}");
        let gw = &gw;
        async move { gw.metric(&series).await as u64 }
    };

    // Every request copied, with its body; the client gets the real answer.
    let seen = echo(c.get(gw.url("/copied/a?x=1")).send().await.unwrap()).await;
    assert_eq!(seen["backend"], "real");
    let r = c
        .post(gw.url("/copied/b"))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Over max_body: served, not copied.
    let r = c
        .post(gw.url("/copied/c"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while heads.lock().unwrap().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            heads.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let copies = heads.lock().unwrap().clone();
    assert_eq!(copies.len(), 2, "{copies:?}");
    // Copies go out in the background, each on its own: the second may arrive first.
    let mut lower: Vec<String> = copies.iter().map(|h| h.to_ascii_lowercase()).collect();
    lower.sort();
    assert!(
        lower[0].starts_with("get /copied/a?x=1 http/1.1"),
        "{}",
        lower[0]
    );
    assert!(lower.iter().all(|h| h.contains("x-gateway-mirror: 1")));
    assert!(lower[1].starts_with("post /copied/b") && lower[1].contains("content-length: 1024"));
    assert_eq!(metric("copied", "too_large").await, 1);
    assert_eq!(metric("copied", "sent").await, 2);

    // Copies one after another go over kept connections, not one each (a connection goes back
    // to the pool just after its answer, which the next copy may overtake).
    for n in 1..=30 {
        assert_eq!(c.get(gw.url("/pooled")).send().await.unwrap().status(), 200);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while kept.hits() < n && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(kept.hits(), 30);
    assert!(
        kept.connections() <= 3,
        "{} connections",
        kept.connections()
    );

    // A copy cut by its timeout counts neither way for its replica: a slow shadow replica that
    // may also serve real routes is not ejected for a mirror's deadline.
    for _ in 0..6 {
        assert_eq!(c.get(gw.url("/slow")).send().await.unwrap().status(), 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric("slow", "failed").await < 3 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric("slow", "sent").await, 3);
    let ejected = gw
        .metric("gateway_upstream_ejections_total{upstream=\"slowpair\"}")
        .await;
    assert_eq!(ejected, 0.0);

    // Half of 200 requests, give or take.
    for _ in 0..200 {
        assert_eq!(c.get(gw.url("/half")).send().await.unwrap().status(), 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric("half", "sent").await < 80 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let half = metric("half", "sent").await;
    assert!((80..=120).contains(&half), "{half} of 200 copied");

    // A shadow that never answers: every real request is answered; copies time out, and
    // beyond the queue they are dropped, never waited for.
    let mut all = Vec::new();
    for _ in 0..400 {
        let req = c.get(gw.url("/hung"));
        all.push(tokio::spawn(
            async move { req.send().await.unwrap().status() },
        ));
    }
    for t in all {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(metric("hung", "dropped").await > 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric("hung", "failed").await == 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
