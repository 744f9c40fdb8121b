//! The stack on a real Docker engine: docker-compose.yml brought up with images built on this
//! machine (tests/compose/build-images, swapped in by tests/compose/local-images.yml), driven
//! through the gateway's published ports; then the same file on a one-node Swarm
//! (scripts/swarm-stack). One test, so the stack starts once per run. Without a Docker engine
//! it prints why and does nothing.

mod docker;

use docker::{container_ips, docker, docker_ok, Compose, Swarm};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upstream name in gateway.yaml → compose service.
const UPSTREAMS: &[(&str, &str)] = &[
    ("users", "user-service"),
    ("products", "product-service"),
    ("orders", "order-service"),
    ("payments", "payment-service"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_runs_on_a_real_docker_engine() {
    if let Err(why) = docker_ok() {
        eprintln!("skipped: no Docker engine answers ({why})");
        println!("skipped: no Docker engine answers ({why})");
        return;
    }
    let started = Instant::now();
    docker::build_images();
    eprintln!("images ready after {:?}", started.elapsed());

    compose_end_to_end().await;
    eprintln!("compose suite done after {:?}", started.elapsed());
    swarm_end_to_end().await;
    eprintln!("swarm suite done after {:?}", started.elapsed());
}

async fn compose_end_to_end() {
    let stack = Compose::up();
    stack.wait_healthy(Duration::from_secs(240));
    let web = format!("http://{}", stack.port("gateway", 8080));
    let admin = format!("http://{}", stack.port("gateway", 9901));
    let c = client();

    try_it(&c, &web).await;
    let ca = stack.ca_pem();
    https_answers(&ca, &stack.port("gateway", 8443));

    // Every replica is found through Docker's DNS and checked healthy.
    for (upstream, service) in UPSTREAMS {
        let ips = container_ips(&stack.containers(service), &stack.network("backend"));
        assert_eq!(ips.len(), 3, "{service}: {ips:?}");
        wait_replicas(&c, &admin, upstream, &ips, Duration::from_secs(30)).await;
    }

    prometheus_scrapes_everything(
        &c,
        &format!("http://{}", stack.port("prometheus", 9090)),
        13,
    )
    .await;
    runs_locked_down(&stack);

    reload_follows_a_replaced_file(&c, &web, &stack).await;
    scale_under_load(&c, &web, &admin, &stack).await;
    kill_under_load(&c, &web, &stack).await;
    restart_keeps_certificates(&c, &stack, &ca).await;
}

/// The README's "Try it": catalogue, register, login, protected profile, order, payment and its
/// idempotent replay, the order paid.
async fn try_it(c: &reqwest::Client, web: &str) -> String {
    let (status, page) = get_json(
        c,
        &format!("{web}/api/products?category=gear&limit=2&page=1"),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["products"].as_array().map(Vec::len), Some(2), "{page}");

    static USERS: AtomicUsize = AtomicUsize::new(0);
    let n = USERS.fetch_add(1, Ordering::Relaxed);
    let email = format!("ada-{}-{n}@example.com", std::process::id());
    let user = json!({"email": email, "password": "correct horse", "firstName": "Ada", "lastName": "Lovelace"});
    let (status, registered) =
        post_json(c, &format!("{web}/api/users/register"), &user, None).await;
    assert_eq!(status, 201, "{registered}");
    let login = json!({"email": email, "password": "correct horse"});
    let (status, login) = post_json(c, &format!("{web}/api/users/login"), &login, None).await;
    assert_eq!(status, 200, "{login}");
    let token = login["token"].as_str().expect("token").to_string();
    let user_id = login["userId"].as_str().expect("userId");

    let me = format!("{web}/api/users/{user_id}");
    // A gateway that started before user-service (Swarm starts services in no order) has no
    // keys until its next JWKS attempt, which backs off to 30 s: 503 until then.
    let deadline = Instant::now() + Duration::from_secs(45);
    let r = loop {
        let r = c
            .get(&me)
            .bearer_auth(&token)
            .send()
            .await
            .expect("profile");
        if r.status() != 503 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(r.status(), 200);
    let r = c.get(&me).send().await.expect("profile without token");
    assert_eq!(r.status(), 401);

    let order = json!({"items": [{"productId": "p-3001", "quantity": 1}]});
    let (status, created) = post_json(c, &format!("{web}/api/orders"), &order, Some(&token)).await;
    assert_eq!(status, 201, "{created}");
    let order_id = created["orderId"].as_str().expect("orderId");
    let payment = json!({"orderId": order_id, "amountCents": created["totalCents"]});
    let pay = || {
        c.post(format!("{web}/api/payments"))
            .bearer_auth(&token)
            .header("idempotency-key", "order-1")
            .json(&payment)
            .send()
    };
    let first = pay().await.expect("payment");
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("payment body");
    let again = pay().await.expect("replayed payment");
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.expect("replay body");
    assert_eq!(again["paymentId"], first["paymentId"]);
    let (status, paid) = get_json_auth(c, &format!("{web}/api/orders/{order_id}"), &token).await;
    assert_eq!(
        (status, paid["status"].as_str()),
        (200, Some("paid")),
        "{paid}"
    );
    token
}

/// HTTPS on the published port, verified against the CA in the certificates volume.
fn https_answers(ca_pem: &str, addr: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).expect("ca.pem");
    let port = addr.rsplit(':').next().expect("port");
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/api/products?limit=1"))
        .output()
        .expect("curl");
    let code = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code, "200", "{}", String::from_utf8_lossy(&out.stderr));
}

/// Prometheus (the real server, in its container) has every target up and the alert rules
/// of monitoring/alerts.yml loaded.
async fn prometheus_scrapes_everything(c: &reqwest::Client, prometheus: &str, targets: usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, body) = get_json(c, &format!("{prometheus}/api/v1/targets")).await;
        let active = body["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let up = active.iter().filter(|t| t["health"] == "up").count();
        if active.len() == targets && up == targets {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{up} of {} targets up, {targets} expected: {body}",
            active.len()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let alerts =
        std::fs::read_to_string(docker::root().join("monitoring/alerts.yml")).expect("alerts.yml");
    let written = alerts.matches("- alert:").count();
    let (_, rules) = get_json(c, &format!("{prometheus}/api/v1/rules")).await;
    let loaded: usize = rules["data"]["groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .map(|g| g["rules"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0);
    assert!(written > 0);
    assert_eq!(loaded, written, "{rules}");
}

/// The gateway and the services run read-only, as uid 65532, with their health checks passing.
fn runs_locked_down(stack: &Compose) {
    for service in [
        "gateway",
        "user-service",
        "product-service",
        "order-service",
        "payment-service",
    ] {
        for id in stack.containers(service) {
            let seen = docker(&[
                "inspect",
                "-f",
                "{{.HostConfig.ReadonlyRootfs}} {{.Config.User}} {{.State.Health.Status}} {{.HostConfig.SecurityOpt}}",
                &id,
            ]);
            assert_eq!(
                seen.trim(),
                "true 65532:65532 healthy [no-new-privileges:true]",
                "{service}"
            );
        }
    }
}

/// gateway.yaml replaced by a rename in the mounted folder (what editors and `sed -i` do): the
/// gateway in its container sees the new file and serves the route it adds.
async fn reload_follows_a_replaced_file(c: &reqwest::Client, web: &str, stack: &Compose) {
    let probe = format!("{web}/reload-probe");
    let before = c.get(&probe).send().await.expect("get").status();
    assert_ne!(before, 200, "the probe route exists before the change");
    let dir = stack.config_dir();
    let mut text = std::fs::read_to_string(dir.join("gateway.yaml")).expect("read");
    text.push_str(
        "  - { name: reload-probe, match: { path: /reload-probe }, policies: [probe] }\n\
         policies:\n  probe: { respond: { status: 200, body: \"replaced by rename\\n\" } }\n",
    );
    let new = dir.join(".gateway.yaml.new");
    std::fs::write(&new, text).expect("write");
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::rename(&new, dir.join("gateway.yaml")).expect("rename");
    let replaced = Instant::now();
    loop {
        let r = c.get(&probe).send().await.expect("get");
        if r.status() == 200 {
            assert_eq!(r.text().await.expect("body"), "replaced by rename\n");
            break;
        }
        assert!(
            replaced.elapsed() < Duration::from_secs(15),
            "the replaced file was not applied within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("replaced file applied after {:?}", replaced.elapsed());
}

/// `--scale product-service=5` under load: the gateway finds the new replicas within one DNS
/// refresh (5 s in gateway.yaml), sends them traffic, and no request fails meanwhile.
async fn scale_under_load(c: &reqwest::Client, web: &str, admin: &str, stack: &Compose) {
    let load = Load::start(c, web, None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.scale("product-service", 5);
    let ips = container_ips(
        &stack.containers("product-service"),
        &stack.network("backend"),
    );
    assert_eq!(ips.len(), 5, "{ips:?}");
    // The containers are up: the next refresh (≤ 5 s) lists them; health checks follow.
    wait_listed(c, admin, "products", &ips, Duration::from_secs(6), false).await;
    wait_replicas(c, admin, "products", &ips, Duration::from_secs(30)).await;
    let mut replicas = BTreeSet::new();
    for _ in 0..40 {
        let r = c
            .get(format!("{web}/api/products?limit=1"))
            .send()
            .await
            .expect("get");
        if let Some(replica) = r.headers().get("x-replica") {
            replicas.insert(replica.to_str().unwrap_or_default().to_string());
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(replicas.len(), 5, "{replicas:?}");
    let (gets, failed, _) = load.stop().await;
    assert!(gets > 50, "{gets}");
    assert_eq!(failed, Vec::<String>::new(), "of {gets} GETs");
}

/// `docker kill` of a product and an order replica under GETs and order POSTs: no GET fails,
/// and no POST is sent twice (the orders the service holds are no more than the POSTs sent).
async fn kill_under_load(c: &reqwest::Client, web: &str, stack: &Compose) {
    let token = try_it(c, web).await;
    let (_, before) = get_json_auth(c, &format!("{web}/api/orders"), &token).await;
    let before = before["orders"].as_array().map_or(0, Vec::len);
    let load = Load::start(c, web, Some(token.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for service in ["product-service", "order-service"] {
        let victim = stack
            .containers(service)
            .into_iter()
            .next()
            .expect("a replica");
        docker(&["kill", &victim]);
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (gets, failed, posts) = load.stop().await;
    assert!(gets > 100, "{gets}");
    assert_eq!(failed, Vec::<String>::new(), "of {gets} GETs");
    let (_, after) = get_json_auth(c, &format!("{web}/api/orders?limit=100"), &token).await;
    let held = after["orders"].as_array().map_or(0, Vec::len) - before;
    let (sent, created) = posts;
    assert!(sent >= 10, "{sent} POSTs");
    assert!(
        created <= held && held <= sent,
        "{created} created, {held} held, {sent} sent"
    );
}

/// The gateway container restarted: ready again within seconds, with the certificates it had.
async fn restart_keeps_certificates(c: &reqwest::Client, stack: &Compose, ca: &str) {
    let gateway = stack
        .containers("gateway")
        .into_iter()
        .next()
        .expect("gateway");
    let restarted = Instant::now();
    docker(&["restart", "-t", "10", &gateway]);
    // The published ports may change with the restart.
    let admin = format!("http://{}", stack.port("gateway", 9901));
    loop {
        let ready = c.get(format!("{admin}/ready")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "not ready 30 s after restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("gateway ready {:?} after restart", restarted.elapsed());
    assert_eq!(stack.ca_pem(), ca, "the CA changed across a restart");
    https_answers(ca, &stack.port("gateway", 8443));
}

async fn swarm_end_to_end() {
    let swarm = Swarm::deploy();
    swarm.wait_running(Duration::from_secs(240));
    let web = format!("http://{}", swarm.port("gateway", 8080));
    let admin = format!("http://{}", swarm.port("gateway", 9901));
    let c = client();
    // Each service name resolves to one address per task (endpoint_mode: dnsrr): the gateway
    // balances and checks every task, as in Compose.
    for (upstream, service) in UPSTREAMS {
        let ips = container_ips(&swarm.containers(service), &swarm.network("backend"));
        assert_eq!(ips.len(), 3, "{service}: {ips:?}");
        wait_replicas(&c, &admin, upstream, &ips, Duration::from_secs(60)).await;
    }
    // Ready: the token keys fetched too (the gateway may have started before user-service).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c
        .get(format!("{admin}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "gateway not ready in the swarm");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    try_it(&c, &web).await;
    swarm.scale("product-service", 5);
    let ips = container_ips(
        &swarm.containers("product-service"),
        &swarm.network("backend"),
    );
    assert_eq!(ips.len(), 5, "{ips:?}");
    wait_replicas(&c, &admin, "products", &ips, Duration::from_secs(30)).await;
}

/// Steady GETs of the catalogue (under the `per_ip` rate limit) and, with a token, order
/// POSTs, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadResult>>,
}

#[derive(Default)]
struct LoadResult {
    gets: usize,
    failed: Vec<String>,
    posts: usize,
    created: usize,
}

impl Load {
    fn start(c: &reqwest::Client, web: &str, token: Option<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let (c, url, stop) = (
                c.clone(),
                format!("{web}/api/products?limit=1"),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut out = LoadResult::default();
                while !stop.load(Ordering::Relaxed) {
                    out.gets += 1;
                    match c.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => out.failed.push(format!("status {}", r.status())),
                        Err(e) => out.failed.push(format!("{e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                out
            }));
        }
        if let Some(token) = token {
            let (c, url, stop) = (c.clone(), format!("{web}/api/orders"), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = LoadResult::default();
                let order = json!({"items": [{"productId": "p-3002", "quantity": 1}]});
                while !stop.load(Ordering::Relaxed) {
                    out.posts += 1;
                    let r = c.post(&url).bearer_auth(&token).json(&order).send().await;
                    if r.is_ok_and(|r| r.status() == 201) {
                        out.created += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                out
            }));
        }
        Load { stop, tasks }
    }

    /// GETs sent, GET failures, (POSTs sent, POSTs answered 201).
    async fn stop(self) -> (usize, Vec<String>, (usize, usize)) {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadResult::default();
        for task in self.tasks {
            let one = task.await.expect("load task");
            all.gets += one.gets;
            all.failed.extend(one.failed);
            all.posts += one.posts;
            all.created += one.created;
        }
        (all.gets, all.failed, (all.posts, all.created))
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn get_json(c: &reqwest::Client, url: &str) -> (u16, Value) {
    send_json(c.get(url), url).await
}

async fn get_json_auth(c: &reqwest::Client, url: &str, token: &str) -> (u16, Value) {
    send_json(c.get(url).bearer_auth(token), url).await
}

async fn send_json(req: reqwest::RequestBuilder, url: &str) -> (u16, Value) {
    let r = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn post_json(
    c: &reqwest::Client,
    url: &str,
    body: &Value,
    token: Option<&str>,
) -> (u16, Value) {
    let mut req = c.post(url).json(body);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    send_json(req, url).await
}

/// The replica addresses the gateway lists for `upstream` on its admin port.
async fn listed(c: &reqwest::Client, admin: &str, upstream: &str) -> Vec<(String, String)> {
    let (_, body) = get_json(c, &format!("{admin}/upstreams")).await;
    body["upstreams"][upstream]["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let address = r["address"].as_str().unwrap_or_default();
                    let ip = address.rsplit_once(':').map_or(address, |(ip, _)| ip);
                    (
                        ip.to_string(),
                        r["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the gateway lists exactly `ips` for `upstream`: in any state, or all healthy.
async fn wait_listed(
    c: &reqwest::Client,
    admin: &str,
    upstream: &str,
    ips: &BTreeSet<String>,
    within: Duration,
    healthy: bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let seen = listed(c, admin, upstream).await;
        let matching: BTreeSet<String> = seen
            .iter()
            .filter(|(_, state)| !healthy || state == "healthy")
            .map(|(ip, _)| ip.clone())
            .collect();
        if &matching == ips && seen.len() == ips.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{upstream}: {seen:?}, expected {ips:?} (healthy: {healthy}) within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the gateway lists exactly `ips` for `upstream`, all healthy.
async fn wait_replicas(
    c: &reqwest::Client,
    admin: &str,
    upstream: &str,
    ips: &BTreeSet<String>,
    within: Duration,
) {
    wait_listed(c, admin, upstream, ips, within, true).await
}
