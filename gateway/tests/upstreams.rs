//! Replicas behind a DNS name: discovery, balancing, health checks and retries, with a real
//! DNS server and backends on 127.0.0.2, 127.0.0.3, ...

mod common;

use common::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Backends named r2, r3, ... on 127.0.0.2, 127.0.0.3, ... all on one port (so that one DNS
/// name with one port reaches all of them).
async fn replicas(n: u8) -> Vec<Backend> {
    let first = Backend::start(&loopback(2), "r2").await;
    let port = first.addr.port();
    let mut out = vec![first];
    for i in 3..2 + n {
        out.push(
            Backend::start_on(
                format!("{}:{port}", loopback(i)).parse().unwrap(),
                &format!("r{i}"),
            )
            .await,
        );
    }
    out
}

async fn spread(gw: &Gateway, n: usize, header: Option<(&str, String)>) -> HashMap<String, usize> {
    let c = client();
    let mut seen = HashMap::new();
    for i in 0..n {
        let mut req = c.get(gw.url(&format!("/x/{i}")));
        if let Some((k, v)) = &header {
            req = req.header(*k, v.clone());
        }
        let v = echo(req.send().await.unwrap()).await;
        *seen
            .entry(v["backend"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    seen
}

fn service(dns: &Dns, balance: &str, extra: &str, port: u16) -> String {
    format!(
        "dns: {{ nameservers: [\"{}\"], timeout: 500ms }}\nupstreams:\n  svc:\n    targets: [\"svc.test:{port}\"]\n    discovery: {{ refresh: 300ms }}\n    balance: {balance}\n{extra}routes:\n  - {{ name: all, upstream: svc }}\n",
        dns.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_spreads_over_dns_replicas() {
    let bs = replicas(3).await;
    let port = bs[0].addr.port();
    let dns = Dns::start().await;
    dns.set("svc.test", &["127.0.0.2", "127.0.0.3", "127.0.0.4"]);

    let gw = Gateway::start(&service(&dns, "round_robin", "", port)).await;
    let rr = spread(&gw, 300, None).await;
    assert_eq!(rr.len(), 3, "{rr:?}");
    assert!(
        rr.values().all(|&n| n == 100),
        "round robin is exact: {rr:?}"
    );
    drop(gw);

    for balance in ["random", "least_requests"] {
        let gw = Gateway::start(&service(&dns, balance, "", port)).await;
        let s = spread(&gw, 300, None).await;
        assert_eq!(s.len(), 3, "{balance}: {s:?}");
        assert!(s.values().all(|&n| n >= 50), "{balance}: {s:?}");
    }

    let gw = Gateway::start(&service(
        &dns,
        "consistent_hash",
        "    hash_key: { header: x-user }\n",
        port,
    ))
    .await;
    // One key always lands on one replica...
    for user in ["alice", "bob", "carol"] {
        let s = spread(&gw, 20, Some(("x-user", user.to_string()))).await;
        assert_eq!(s.len(), 1, "{user}: {s:?}");
    }
    // ...and many keys cover all replicas.
    let c = client();
    let mut owners = HashMap::new();
    for i in 0..200 {
        let v = echo(
            c.get(gw.url("/"))
                .header("x-user", format!("user-{i}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        *owners
            .entry(v["backend"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(owners.len(), 3, "{owners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_weights() {
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  w:\n    targets: [ {{ address: \"{}\", weight: 3 }}, \"{}\" ]\nroutes:\n  - {{ name: all, upstream: w }}\n",
        a.addr, b.addr
    ))
    .await;
    let s = spread(&gw, 200, None).await;
    assert_eq!(s["a"], 150, "{s:?}");
    assert_eq!(s["b"], 50, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_added_to_dns_gets_traffic_and_dns_failure_keeps_the_set() {
    let bs = replicas(2).await;
    let port = bs[0].addr.port();
    let dns = Dns::start().await;
    dns.set("svc.test", &["127.0.0.2"]);
    let gw = Gateway::start(&service(&dns, "round_robin", "", port)).await;
    assert_eq!(spread(&gw, 10, None).await.len(), 1);

    dns.set("svc.test", &["127.0.0.2", "127.0.0.3"]);
    // Within one refresh (300ms) plus slack, the new replica takes traffic.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = spread(&gw, 20, None).await;
    assert_eq!(s.get("r3"), Some(&10), "{s:?}");

    // DNS fails in every way: the last good set is kept.
    for mode in [DnsMode::ServFail, DnsMode::Garbage, DnsMode::Silent] {
        dns.set_mode(mode);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let s = spread(&gw, 20, None).await;
        assert_eq!(s.len(), 2, "{s:?}");
    }
    dns.set_mode(DnsMode::Normal);
    // A name that vanishes (NXDOMAIN) also keeps the last good set.
    dns.set("other", &["127.0.0.9"]);
    dns.remove("svc.test");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(spread(&gw, 20, None).await.len(), 2);
    // A replica removed from DNS stops getting traffic.
    dns.set("svc.test", &["127.0.0.3"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = spread(&gw, 10, None).await;
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s.get("r3"), Some(&10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_check_removes_and_restores_a_replica() {
    let bs = replicas(2).await;
    let port = bs[0].addr.port();
    let dns = Dns::start().await;
    dns.set("svc.test", &["127.0.0.2", "127.0.0.3"]);
    let gw = Gateway::start(&service(
        &dns,
        "round_robin",
        "    health:\n      active: { path: /health, interval: 100ms, timeout: 200ms, rise: 2, fall: 2 }\n",
        port,
    ))
    .await;
    assert_eq!(spread(&gw, 10, None).await.len(), 2);
    bs[1].set_health(503);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = spread(&gw, 20, None).await;
    assert_eq!(s.len(), 1, "unhealthy replica still gets traffic: {s:?}");
    assert!(s.contains_key("r2"));
    // Every replica unhealthy: 503 with a JSON body and the request id.
    bs[0].set_health(500);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = client().get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "no healthy upstream");
    assert_eq!(v["request_id"], id.as_str());
    bs[0].set_health(200);
    bs[1].set_health(200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = spread(&gw, 20, None).await;
    assert_eq!(s.len(), 2, "recovered replica gets no traffic: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_costs_no_idempotent_request() {
    let mut bs = replicas(3).await;
    let port = bs[0].addr.port();
    let dns = Dns::start().await;
    dns.set("svc.test", &["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    let gw = Gateway::start(&service(
        &dns,
        "round_robin",
        "    health: { passive: { max_fails: 1, fail_timeout: 2s } }\n",
        port,
    ))
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), gw.url("/steady"));
        workers.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    bs[1].kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    // Traffic carries on with the two that are left.
    let s = spread(&gw, 20, None).await;
    assert_eq!(s.len(), 2, "{s:?}");

    // A non-idempotent request to a replica that dies mid-request is not retried elsewhere.
    let mut slow = Backend::start("127.0.0.1", "slow").await;
    let other = Backend::start("127.0.0.1", "other").await;
    let gw2 = Gateway::start(&format!(
        "upstreams:\n  p: {{ targets: [\"{}\", \"{}\"], balance: round_robin }}\nroutes:\n  - {{ name: all, upstream: p }}\n",
        slow.addr, other.addr
    ))
    .await;
    let c = client();
    // Find which replica takes the next request by sending one GET first.
    let first = echo(c.get(gw2.url("/")).send().await.unwrap()).await["backend"]
        .as_str()
        .unwrap()
        .to_string();
    if first == "slow" {
        // Next request goes to "other"; make the one after go to slow.
        echo(c.get(gw2.url("/")).send().await.unwrap()).await;
    }
    let other_before = other.hits();
    let req = tokio::spawn({
        let c = c.clone();
        let url = gw2.url("/charge?sleep=1000");
        async move {
            c.post(url)
                .body("pay")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.kill();
    let status = req.await.unwrap().unwrap();
    assert_eq!(status, 502, "the POST fails clearly");
    assert_eq!(
        other.hits(),
        other_before,
        "and was not sent to the other replica"
    );
}

use std::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_then_half_open_probe() {
    let a = Backend::start("127.0.0.1", "a").await;
    let b_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  p:\n    targets: [\"{}\", \"{b_addr}\"]\n    health: {{ passive: {{ max_fails: 1, fail_timeout: 1s }} }}\nroutes:\n  - {{ name: all, upstream: p }}\n",
        a.addr
    ))
    .await;
    // b is down: every request still succeeds (connect failures are retried on a).
    let s = spread(&gw, 10, None).await;
    assert_eq!(s.get("a"), Some(&10));
    // b comes up; after fail_timeout one probe request finds it, and it is back.
    let b = Backend::start_on(b_addr, "b").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.hits() == 0 && Instant::now() < deadline {
        spread(&gw, 2, None).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.hits() > 0, "ejected replica never probed again");
    let s = spread(&gw, 10, None).await;
    assert_eq!(s.len(), 2, "{s:?}");
}

/// With active checks, a replica that appears in DNS beside healthy ones takes no traffic
/// until `rise` checks pass (a scaled-up container still starting gets none); at start,
/// `/ready` waits for the first round of checks, whose verdict decides alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_replicas_wait_for_their_checks_and_ready_waits_for_the_first_round() {
    let bs = replicas(4).await;
    let port = bs[0].addr.port();
    let dns = Dns::start().await;
    // r4 is down at start: the first round takes it out before any request.
    bs[2].set_health(503);
    dns.set("svc.test", &["127.0.0.2", "127.0.0.4"]);
    let health = "    health:\n      active: { path: /health, interval: 300ms, timeout: 200ms, rise: 3, fall: 3 }\n";
    let gw = Gateway::start(&service(&dns, "round_robin", health, port)).await;
    let s = spread(&gw, 10, None).await;
    assert_eq!(
        s.get("r2"),
        Some(&10),
        "a replica failing its first check got traffic: {s:?}"
    );

    // r3 appears while r2 is healthy, and is not up yet: no traffic to it.
    bs[1].set_health(503);
    dns.set("svc.test", &["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = spread(&gw, 20, None).await;
    assert_eq!(s.get("r2"), Some(&20), "{s:?}");
    // The admin view says why r3 takes nothing.
    let view: serde_json::Value = gw.admin_json("/upstreams").await;
    let r3 = view["upstreams"]["svc"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"].as_str().unwrap().starts_with("127.0.0.3:"))
        .cloned()
        .unwrap();
    assert_eq!(
        (r3["available"].as_bool(), r3["state"].as_str()),
        (Some(false), Some("unhealthy")),
        "{r3}"
    );
    assert_eq!(view["upstreams"]["svc"]["balance"], "round_robin");
    // r3 comes up: after `rise` passing checks it takes its share.
    bs[1].set_health(200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !spread(&gw, 10, None).await.contains_key("r3") {
        assert!(Instant::now() < deadline, "r3 never joined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every replica replaced at once (a recreated container with a new address): the new one
    // is checked as at start, so the upstream is never left with nothing to send to.
    dns.set("svc.test", &["127.0.0.5"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client().get(gw.url("/x")).send().await.unwrap();
        assert_ne!(r.status(), 503, "no replica to send to after the swap");
        if echo(r).await["backend"] == "r5" {
            break;
        }
        assert!(Instant::now() < deadline, "r5 never took traffic");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // `/ready` waits for the first round: a replica whose check hangs holds it for the check
    // timeout, and the answer says what it waits for.
    let hanging = tokio::net::TcpListener::bind(format!("{}:0", loopback(9)))
        .await
        .unwrap();
    let hang_addr = hanging.local_addr().unwrap();
    let gw2 = Gateway::start_unready(&format!(
        "upstreams:\n  slow:\n    targets: [\"{hang_addr}\"]\n    health:\n      active: {{ path: /health, interval: 10s, timeout: 2s }}\nroutes:\n  - {{ name: all, upstream: slow }}\n"
    ));
    let started = Instant::now();
    let mut saw_waiting = false;
    loop {
        match client()
            .get(format!("http://{}/ready", gw2.admin))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => break,
            Ok(r) if r.status() == 503 => {
                let body = r.text().await.unwrap();
                saw_waiting |= body.contains("upstream slow: first health checks");
            }
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{}", gw2.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_waiting, "{}", gw2.log());
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // A reload that changes the upstream's definition does not make a serving gateway unready.
    gw2.write_config(&format!(
        "upstreams:\n  slow:\n    targets: [\"{hang_addr}\"]\n    retries: 0\n    health:\n      active: {{ path: /health, interval: 10s, timeout: 2s }}\nroutes:\n  - {{ name: all, upstream: slow }}\n"
    ));
    gw2.wait_generation(2).await;
    let r = client()
        .get(format!("http://{}/ready", gw2.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    drop(hanging);
}

/// A healthy replica that appears beside checked, healthy ones still waits for `rise` passing
/// checks before it takes traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joining_healthy_ones_waits_for_rise_passes() {
    let bs = replicas(2).await;
    let port = bs[0].addr.port();
    let dns = Dns::start().await;
    dns.set("svc.test", &["127.0.0.2"]);
    let health = "    health:\n      active: { path: /health, interval: 300ms, timeout: 200ms, rise: 3, fall: 3 }\n";
    let gw = Gateway::start(&service(&dns, "round_robin", health, port)).await;
    dns.set("svc.test", &["127.0.0.2", "127.0.0.3"]);
    let added = Instant::now();
    // Found within one refresh (300 ms); before its third passing check (~900 ms) it gets
    // nothing, though it answers its checks.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = spread(&gw, 10, None).await;
    assert_eq!(s.get("r2"), Some(&10), "joined before its checks: {s:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !spread(&gw, 4, None).await.contains_key("r3") {
        assert!(Instant::now() < deadline, "r3 never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        added.elapsed() >= Duration::from_millis(600),
        "joined {:?} after it appeared",
        added.elapsed()
    );
}

/// Start-up never waits for DNS: with a name server that does not answer, the listeners and the
/// admin port are up at once, `/ready` says what it waits for and turns ready once the lookup
/// gives up (within `dns.timeout`), and requests for the upstream with no replica get a quick
/// 503 that is not logged as an ERROR. When DNS answers, replicas come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_does_not_wait_for_dns() {
    let bs = replicas(1).await;
    let port = bs[0].addr.port();
    let dns = Dns::start().await;
    dns.set("svc.test", &["127.0.0.2"]);
    dns.set_mode(DnsMode::Silent);
    let gw = Gateway::start_unready(&format!(
        "dns: {{ nameservers: [\"{}\"], timeout: 400ms }}\nupstreams:\n  svc:\n    targets: [\"svc.test:{port}\"]\n    discovery: {{ refresh: 500ms }}\nroutes:\n  - {{ name: all, upstream: svc }}\n",
        dns.addr
    ));
    let started = Instant::now();
    let mut waiting_said = false;
    let ready_after = loop {
        if let Ok(r) = client()
            .get(format!("http://{}/ready", gw.admin))
            .send()
            .await
        {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            waiting_said |= body.contains("upstream svc: first DNS lookup");
            if status == 200 {
                break started.elapsed();
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(waiting_said, "{}", gw.log());
    assert!(
        // The first lookup gives up at `dns.timeout` (400 ms); `/ready` follows it.
        ready_after < Duration::from_millis(750),
        "ready only after {ready_after:?}: the lookup outlived dns.timeout\n{}",
        gw.log()
    );
    // No replica yet: a quick 503, counted, not an ERROR line.
    let asked = Instant::now();
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(asked.elapsed() < Duration::from_millis(500));
    assert!(!gw.log().contains(" ERROR "), "{}", gw.log());
    // DNS answers again: the replica is found on the next refresh.
    dns.set_mode(DnsMode::Normal);
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let r = client().get(gw.url("/x")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_goes_over_pooled_h2c_upstream_connections() {
    let backend = Backend::start("127.0.0.1", "h2").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  b: {{ targets: [\"{}\"], protocol: h2c, h2: {{ max_streams: 8 }} }}\nroutes:\n  - {{ name: r, upstream: b }}\n",
        backend.addr
    ))
    .await;
    let c = client();
    let burst = || {
        let calls = (0..40).map(|i| {
            let c = c.clone();
            let url = gw.url(&format!("/item/{i}?sleep=50"));
            async move { echo(c.get(url).send().await.unwrap()).await }
        });
        futures_util::future::join_all(calls)
    };
    for seen in burst().await {
        assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
        assert_eq!(seen["backend"], "h2");
    }
    // A burst before any connection exists opens one per request (Pingora's pool); the next
    // burst finds them pooled and opens none.
    let opened = backend.connections();
    burst().await;
    assert_eq!(backend.connections(), opened);
}
