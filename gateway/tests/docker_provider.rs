//! `providers.docker` against the real engine: labelled containers (the local Debian base
//! image running a small Perl HTTP server that answers with its host name) come and go on a
//! Docker network made for the test, and the gateway's routes, upstreams and traffic follow.
//! Without a Docker engine it prints why and does nothing.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Answers every request with 200 and the container's host name.
const SERVER: &str = r#"use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalPort => 8000, Listen => 64, ReuseAddr => 1) or die "listen: $!"; my $h = `hostname`; chomp $h; while (my $c = $s->accept) { while (my $l = <$c>) { last if $l =~ /^\r?\n$/ } print $c "HTTP/1.1 200 OK\r\nContent-Length: " . length($h) . "\r\nConnection: close\r\n\r\n$h"; close $c }"#;

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The test's network and containers, removed when dropped.
struct Engine {
    network: String,
    containers: std::cell::RefCell<Vec<String>>,
}

impl Engine {
    fn new() -> Engine {
        let network = format!("gw-provider-{}", std::process::id());
        docker(&["network", "create", &network]).expect("network");
        Engine {
            network,
            containers: Default::default(),
        }
    }

    /// Starts a container named `name` on the test's network with `labels` and, optionally, a
    /// Docker health check that passes once `/tmp/ready` exists.
    fn run(&self, name: &str, labels: &[(&str, &str)], health_gate: bool) -> String {
        self.run_on(&self.network, name, labels, health_gate)
    }

    /// The same on `network`.
    fn run_on(
        &self,
        network: &str,
        name: &str,
        labels: &[(&str, &str)],
        health_gate: bool,
    ) -> String {
        let name = format!("{}-{name}", self.network);
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &name,
            "--network",
            network,
        ]
        .map(String::from)
        .to_vec();
        for (k, v) in labels {
            args.extend(["--label".into(), format!("{k}={v}")]);
        }
        if health_gate {
            args.extend(
                [
                    "--health-cmd",
                    "test -f /tmp/ready",
                    "--health-interval",
                    "1s",
                    "--health-retries",
                    "1",
                ]
                .map(String::from),
            );
        }
        args.extend(["shop-local/debian:bookworm", "perl", "-e", SERVER].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args).expect("docker run");
        self.containers.borrow_mut().push(name.clone());
        name
    }

    fn ip(&self, name: &str) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        docker(&["inspect", "-f", &format, name]).expect("inspect")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for c in self.containers.borrow().iter() {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

async fn route_names(gw: &Gateway) -> BTreeSet<String> {
    let routes = gw.admin_json("/routes").await;
    routes["routes"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

async fn replicas(gw: &Gateway, upstream: &str) -> BTreeSet<String> {
    let u = gw.admin_json("/upstreams").await;
    u["upstreams"][upstream]["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r["address"].as_str())
                .map(|a| a.rsplit_once(':').map_or(a, |(ip, _)| ip).to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn eventually<F, Fut>(what: &str, limit: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(within(limit, check).await, "not within {limit:?}: {what}");
}

/// Whether `check` holds within `limit`, asked every 100 ms.
async fn within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Whether a request to `path` is answered 200 by the container named `name`.
async fn answers_as(gw: &Gateway, path: &str, name: &str) -> bool {
    match client().get(gw.url(path)).send().await {
        Ok(r) if r.status() == 200 => r.text().await.is_ok_and(|t| t == name),
        _ => false,
    }
}

/// The gateway's configuration: the Docker provider on `network`, refreshing every `refresh`,
/// beside a route `file` to `files`, with `more` added.
fn config(network: &str, refresh: &str, files: impl std::fmt::Display, more: &str) -> String {
    format!(
        "providers: {{ docker: {{ network: \"{network}\", refresh: {refresh} }} }}\n{more}upstreams: {{ files: {{ targets: [\"{files}\"] }} }}\nroutes: [ {{ name: file, upstream: files, match: {{ path_prefix: /file }} }} ]\n"
    )
}

/// Host names that answered `n` requests to `path`.
async fn answered_by(gw: &Gateway, path: &str, n: usize) -> BTreeSet<String> {
    let c = client();
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let r = c.get(gw.url(path)).send().await.expect("request");
        assert_eq!(r.status(), 200, "{path}");
        seen.insert(r.text().await.unwrap_or_default());
    }
    seen
}

#[tokio::test]
async fn containers_declare_routes_through_labels() {
    if let Err(why) = docker(&["info", "--format", "{{.ServerVersion}}"]) {
        eprintln!("skipped: no Docker engine answers ({why})");
        return;
    }
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/compose/base-image");
    let made = Command::new(&base).status().expect("base-image");
    assert!(made.success(), "tests/compose/base-image failed");

    let engine = Engine::new();
    let backend = Backend::start("127.0.0.1", "file").await;
    let auth = "auth:\n  t: { secret: \"an-hmac-secret-that-is-long-enough-0123456789\" }\n";
    let gw = Gateway::start(&config(&engine.network, "10m", backend.addr, auth)).await;

    // A labelled container: its route and its replica appear, and traffic reaches it.
    let web = &[
        ("gateway.service", "web"),
        ("gateway.port", "8000"),
        ("gateway.route.web.match.path_prefix", "/web"),
        ("gateway.upstream.health.path", "/"),
        ("gateway.upstream.health.interval", "1s"),
    ];
    let a = engine.run("a", web, false);
    eventually("route web on /routes", Duration::from_secs(10), || async {
        route_names(&gw).await.contains("web")
    })
    .await;
    // The container runs before its server listens: the first requests may find nothing
    // there (and the replica resting after that failure), then it answers.
    eventually("a answers", Duration::from_secs(20), || {
        answers_as(&gw, "/web/x", &a)
    })
    .await;
    assert_eq!(
        answered_by(&gw, "/web/x", 3).await,
        BTreeSet::from([a.clone()])
    );
    let route = gw.admin_json("/routes").await;
    let web_route = route["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "web")
        .cloned();
    assert_eq!(
        web_route.unwrap()["match"]["path_prefix"],
        "/web",
        "{route}"
    );

    // A second replica with a Docker health check joins only once the check passes.
    let b = engine.run("b", web, true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(replicas(&gw, "web").await, BTreeSet::from([engine.ip(&a)]));
    docker(&["exec", &b, "touch", "/tmp/ready"]).expect("exec");
    eventually("b listed", Duration::from_secs(10), || async {
        replicas(&gw, "web").await.len() == 2
    })
    .await;
    eventually("both answer", Duration::from_secs(15), || async {
        answered_by(&gw, "/web", 10).await.len() == 2
    })
    .await;

    // Malformed labels: refused with the container and label named; the rest keeps serving.
    let bad = engine.run(
        "bad",
        &[
            ("gateway.port", "8000"),
            ("gateway.route.bad.retries", "lots"),
        ],
        false,
    );
    let unknown_policy = engine.run(
        "nopolicy",
        &[
            ("gateway.port", "8000"),
            ("gateway.route.np.match.path_prefix", "/np"),
            ("gateway.route.np.auth", "missing"),
        ],
        false,
    );
    eventually("label errors logged", Duration::from_secs(10), || async {
        let log = gw.log();
        log.contains(&format!("container {bad}: label gateway.route.bad.retries"))
            && log.contains(&format!(
                "container {unknown_policy}: label gateway.route.np.auth"
            ))
    })
    .await;
    let names = route_names(&gw).await;
    assert!(!names.contains("bad") && !names.contains("np"), "{names:?}");
    assert_eq!(answered_by(&gw, "/web", 4).await.len(), 2);

    // A name the file uses stays the file's.
    engine.run(
        "clash",
        &[
            ("gateway.port", "8000"),
            ("gateway.route.file.match.path_prefix", "/elsewhere"),
        ],
        false,
    );
    eventually("clash logged", Duration::from_secs(10), || async {
        gw.log().contains("route file is already declared")
    })
    .await;
    let r = client().get(gw.url("/file")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(backend.hits(), 1);

    // A container that stops leaves on its events: the refresh (10 min) is out of the test's reach.
    // The engine lists a killed container as running for a while after its `die` event.
    let a_ip = engine.ip(&a);
    let clock = || docker(&["system", "info", "--format", "{{.SystemTime}}"]);
    let since = clock().unwrap_or_default();
    docker(&["kill", &a]).expect("kill");
    let gone = within(Duration::from_secs(5), || async {
        !replicas(&gw, "web").await.contains(&a_ip)
    })
    .await;
    if !gone {
        // What the engine said of `a` meanwhile, and what the provider saw and listed.
        let filter = format!("container={a}");
        let events = match clock() {
            Ok(until) => docker(&[
                "events", "--since", &since, "--until", &until, "-f", &filter,
            ])
            .unwrap_or_else(|e| e),
            Err(e) => e,
        };
        panic!(
            "not within 5s: a gone\nthe engine's events since the kill:\n{events}\ngateway log:\n{}",
            gw.log()
        );
    }
    assert_eq!(
        answered_by(&gw, "/web", 5).await,
        BTreeSet::from([b.clone()])
    );

    // The last one gone: so is the route.
    docker(&["rm", "-f", &b]).expect("rm");
    eventually("route web gone", Duration::from_secs(10), || async {
        !route_names(&gw).await.contains("web")
    })
    .await;
    assert_eq!(
        client().get(gw.url("/web")).send().await.unwrap().status(),
        404
    );

    // What no container event announces, a running container joining the network, only the
    // refresh finds: a second gateway that refreshes every second serves it, the first not.
    let gw2 = Gateway::start(&config(&engine.network, "1s", backend.addr, "")).await;
    let late = &[
        ("gateway.port", "8000"),
        ("gateway.route.late.match.path_prefix", "/late"),
    ];
    let late = engine.run_on("bridge", "late", late, false);
    let off_network = format!("container {late}: label gateway.network");
    eventually(
        "late refused off the network",
        Duration::from_secs(10),
        || async { gw.log().contains(&off_network) && gw2.log().contains(&off_network) },
    )
    .await;
    docker(&["network", "connect", &engine.network, &late]).expect("connect");
    eventually(
        "late served by the refresh",
        Duration::from_secs(5),
        || async { route_names(&gw2).await.contains("late") },
    )
    .await;
    eventually("late answers", Duration::from_secs(20), || {
        answers_as(&gw2, "/late", &late)
    })
    .await;
    assert!(
        !route_names(&gw).await.contains("late"),
        "no event announced it, and the first gateway's refresh is 10 minutes away"
    );
    assert!(!gw.log().contains("panicked") && !gw2.log().contains("panicked"));
}
