//! Running the gateway: `check`, hot reload (under load, with broken files, on SIGHUP),
//! the admin endpoints and graceful shutdown.

mod common;

use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(gateway_bin())
        .args(["check", "-c"])
        .arg(&path)
        .env("UPSTREAM_PORT", "3001")
        .env_remove("UNSET_VAR")
        .output()
        .unwrap();
    let msg =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (
        out.status.success(),
        msg.replace(&*path.to_string_lossy(), "FILE"),
    )
}

const GOOD: &str = r#"listeners:
  http: { address: "127.0.0.1:8080" }
upstreams:
  users:
    targets: ["user-service:${UPSTREAM_PORT}", "127.0.0.1:${OTHER_PORT:-3002}"]
routes:
  - { name: users, match: { path_prefix: /api/users }, upstream: users }
"#;

#[test]
fn check_accepts_a_valid_file_and_substitutes_variables() {
    let (ok, msg) = check(GOOD);
    assert!(ok, "{msg}");
    assert!(msg.contains("configuration is valid"), "{msg}");
}

#[test]
fn check_names_file_line_column_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        // (change, expected position, expected words)
        (
            "upstream: userz }",
            "FILE:7:30: routes[0].upstream",
            "no upstream named `userz`",
        ),
        (
            "match: { path_prefix: /api/users }, upstream: users, colour: red }",
            "FILE:7:",
            "routes[0].colour: unknown field `colour`",
        ),
        (
            "match: { path_prefix: api }, upstream: users }",
            "FILE:7:42: routes[0].match.path_prefix",
            "must start with `/`",
        ),
        (
            "match: { path_regex: \"([\" }, upstream: users }",
            "FILE:7:41: routes[0].match.path_regex",
            "unclosed character class",
        ),
        (
            "match: { methods: [get] }, upstream: users }",
            "FILE:7:39: routes[0].match.methods[0]",
            "HTTP method",
        ),
    ];
    for (change, position, words) in cases {
        let text = GOOD.replace(
            "match: { path_prefix: /api/users }, upstream: users }",
            change,
        );
        let (ok, msg) = check(&text);
        assert!(!ok, "accepted: {text}");
        assert!(msg.contains(position), "expected `{position}` in: {msg}");
        assert!(msg.contains(words), "expected `{words}` in: {msg}");
    }
    let cases: &[(&str, &str, &str)] = &[
        (
            "timeouts: { connect: 5 }",
            "FILE:6:26: upstreams.users.timeouts.connect",
            "no unit",
        ),
        (
            "timeouts: { connect: 5 parsecs }",
            "FILE:6:26: upstreams.users.timeouts.connect",
            "unknown unit",
        ),
        (
            "balance: fastest",
            "FILE:6:14: upstreams.users.balance:",
            "unknown variant `fastest`",
        ),
        (
            "balance: consistent_hash",
            "FILE:6:14: upstreams.users.balance",
            "hash_key",
        ),
        (
            "targets: [\"no-port\"]",
            "FILE:5:15: upstreams.users.targets[0]",
            "HOST:PORT",
        ),
    ];
    for (line, position, words) in cases {
        let text = GOOD.replace(
            "    targets: [\"user-service:${UPSTREAM_PORT}\", \"127.0.0.1:${OTHER_PORT:-3002}\"]",
            &format!("    targets: [\"a:1\"]\n    {line}"),
        );
        let text = if line.starts_with("targets") {
            text.replace("    targets: [\"a:1\"]\n", "")
        } else {
            text
        };
        let (ok, msg) = check(&text);
        assert!(!ok, "accepted: {text}");
        assert!(
            msg.contains(position),
            "expected `{position}` in: {msg}\n{text}"
        );
        assert!(msg.contains(words), "expected `{words}` in: {msg}");
    }
    let (ok, msg) = check("listeners: [\n");
    assert!(!ok);
    assert!(msg.contains("FILE:"), "{msg}");
    let (ok, msg) = check(&GOOD.replace("${UPSTREAM_PORT}", "${UNSET_VAR:?must be set}"));
    assert!(!ok);
    assert!(msg.contains("must be set"), "{msg}");
    let (ok, msg) = check(&GOOD.replace(
        "/api/users }, upstream: users }",
        "/api/users }, upstream: users }\n  - { name: users, upstream: users }",
    ));
    assert!(!ok);
    assert!(msg.contains("used twice"), "{msg}");
    let (ok, msg) = Command::new(gateway_bin())
        .args(["check", "-c", "/nonexistent/gateway.yaml"])
        .output()
        .map(|o| {
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(!ok);
    assert!(
        msg.contains("/nonexistent/gateway.yaml: cannot read"),
        "{msg}"
    );
}

#[test]
fn help_describes_the_commands() {
    let out = Command::new(gateway_bin()).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["run", "check", "--config"] {
        assert!(text.contains(word), "{text}");
    }
}

fn two_routes(a: &Backend, b: &Backend, second_path: &str) -> String {
    format!(
        "upstreams:\n  a: {{ targets: [\"{}\"] }}\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: a, upstream: a }}\n  - {{ name: b, upstream: b, match: {{ path_prefix: {second_path} }} }}\n",
        a.addr, b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_changes_and_rejects_broken_files() {
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&two_routes(&a, &b, "/one")).await;
    let c = client();
    let who = |p: &'static str| {
        let c = c.clone();
        let url = gw.url(p);
        async move {
            echo(c.get(url).send().await.unwrap()).await["backend"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(who("/one").await, "b");
    assert_eq!(gw.generation().await, 1);

    // A changed file is picked up by the directory watch.
    gw.write_config(&two_routes(&a, &b, "/two"));
    gw.wait_generation(2).await;
    assert_eq!(who("/two").await, "b");
    assert_eq!(who("/one").await, "a");

    // A broken file: logged with its position, the old routes keep serving.
    gw.write_raw_config(
        &gw.config_text(&two_routes(&a, &b, "/two"))
            .replace("upstream: b,", "upstream: nope,"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.log().contains("no upstream named `nope`") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = gw.log_line("no upstream named `nope`");
    assert!(
        line.contains("gateway.yaml:12:26:") && line.contains("routes[1].upstream"),
        "{line}"
    );
    assert_eq!(gw.generation().await, 2);
    assert_eq!(who("/two").await, "b");

    // Deleted file: keep serving, say so.
    std::fs::remove_file(&gw.config_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.log().contains("cannot read") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.log().contains("cannot read"), "{}", gw.log());
    assert_eq!(who("/two").await, "b");

    // SIGHUP reloads even an unchanged file.
    gw.write_config(&two_routes(&a, &b, "/three"));
    gw.wait_generation(3).await;
    // The good file after the rejected ones says the problem is gone.
    assert!(
        gw.log().contains("configuration valid again"),
        "{}",
        gw.log()
    );
    gw.signal(libc::SIGHUP);
    gw.wait_generation(4).await;
    assert_eq!(who("/three").await, "b");

    // Listener changes need a restart, and the gateway says so.
    let moved = gw
        .config_text(&two_routes(&a, &b, "/three"))
        .replace(&gw.http.to_string(), "127.0.0.1:1");
    gw.write_raw_config(&moved);
    gw.wait_generation(5).await;
    let line = gw.log_line("restart required");
    // The field that changed is named, and only that one.
    assert!(line.contains("changed=listeners.http.address"), "{line}");
    assert_eq!(
        who("/three").await,
        "b",
        "still serving on the old listener"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&two_routes(&a, &b, "/r0")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, ok, failures, url) = (
            stop.clone(),
            ok.clone(),
            failures.clone(),
            gw.url(&format!("/load/{w}")),
        );
        workers.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    // 100 reloads: 80 good ones, and every fifth a broken file of another kind.
    let broken = [
        "routes: [ this is not yaml".to_string(),
        gw.config_text("upstreams: {}\nroutes: [ { name: r, upstream: nowhere } ]\n"),
        gw.config_text(&two_routes(&a, &b, "/x").replace("name: b,", "name: a,")),
        String::new(),
    ];
    let mut generation = 1;
    for i in 1..=100 {
        if i % 5 == 0 {
            gw.write_raw_config(&broken[(i / 5) % broken.len()]);
            tokio::time::sleep(Duration::from_millis(80)).await;
            continue;
        }
        gw.write_config(&two_routes(&a, &b, &format!("/r{i}")));
        generation += 1;
        gw.wait_generation(generation).await;
    }
    assert_eq!(gw.generation().await, 81);
    // The broken files were read and refused, not skipped over.
    let metrics = gw.metrics().await;
    let rejected: f64 = metrics
        .lines()
        .find(|l| l.starts_with("gateway_config_reloads_total{result=\"rejected\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(
        rejected >= 10.0,
        "only {rejected} broken files were refused"
    );
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "load too light to mean anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let b = Backend::start("127.0.0.1", "b").await;
    let mut gw = Gateway::start(&format!(
        "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
        b.addr
    ))
    .await;
    let c = client();
    let admin = format!("http://{}/ready", gw.admin);
    assert_eq!(c.get(&admin).send().await.unwrap().status(), 200);
    let in_flight = tokio::spawn({
        let c = c.clone();
        let url = gw.url("/slow?sleep=700");
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Draining: /ready says so, so that orchestrators stop sending traffic.
    let ready = c.get(&admin).send().await.map(|r| r.status().as_u16());
    assert!(matches!(ready, Ok(503) | Err(_)), "{ready:?}");
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "in-flight request completed"
    );
    // New connections are refused once the listener is closed.
    assert!(tokio::net::TcpStream::connect(gw.http).await.is_err());
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("gateway did not exit");
    assert!(status.success() || status.code().is_some(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "drain is bounded: {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_and_unknown_paths() {
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
        b.addr
    ))
    .await;
    let c = client();
    let r = c
        .get(format!("http://{}/health", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("http://{}/ready", gw.admin))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["config_generation"], 1);
    assert_eq!(
        c.get(format!("http://{}/nope", gw.admin))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_health_state_pools_and_in_flight_requests() {
    let a = Backend::start(&loopback(2), "a").await;
    let b = Backend::start(&loopback(3), "b").await;
    let upstream = |extra_route: &str| {
        format!(
            "upstreams:\n  p:\n    targets: [\"{}\", \"{}\"]\n    health:\n      active: {{ path: /health, interval: 100ms, timeout: 200ms, rise: 1, fall: 1 }}\nroutes:\n  - {{ name: all, upstream: p }}\n{extra_route}",
            a.addr, b.addr
        )
    };
    let gw = Gateway::start(&upstream("")).await;
    let c = client();
    // b fails its checks and leaves the rotation.
    b.set_health(503);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..10 {
        assert_eq!(
            echo(c.get(gw.url("/")).send().await.unwrap()).await["backend"],
            "a"
        );
    }
    let conns_before = a.connections();

    // A slow request is in flight when its route disappears.
    let slow = tokio::spawn({
        let c = c.clone();
        let url = gw.url("/slow/x?sleep=600");
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.write_config(&upstream(
        "  - { name: extra, upstream: p, match: { path_prefix: /extra } }\n",
    ));
    gw.wait_generation(2).await;

    // Straight after the swap: the unchanged upstream kept b's verdict (a new one would start
    // b as healthy and send it traffic until its first failed check)...
    for _ in 0..10 {
        assert_eq!(
            echo(c.get(gw.url("/extra")).send().await.unwrap()).await["backend"],
            "a"
        );
    }
    // ...and its pooled connections: no new connection to a was needed.
    assert_eq!(
        a.connections(),
        conns_before + 1,
        "only the slow request needed a second connection"
    );
    // The in-flight request finished on the runtime it started on.
    assert_eq!(slow.await.unwrap().unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_beside_the_config_do_not_make_it_reread() {
    let b = Backend::start("127.0.0.1", "b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
        b.addr
    ))
    .await;
    // The access log goes into the configuration's own directory.
    let log_path = gw.dir.path().join("access.log");
    gw.write_config(&format!(
        "access_log: {{ path: \"{}\" }}\nupstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
        log_path.display(),
        b.addr
    ));
    gw.wait_generation(2).await;
    // A broken file is refused once...
    gw.write_raw_config("routes: [ broken");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let refusals = |log: &str| log.matches("configuration rejected").count();
    assert_eq!(refusals(&gw.log()), 1, "{}", gw.log());
    // ...and not again for every line the access log writes beside it.
    let c = client();
    for _ in 0..100 {
        assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(std::fs::metadata(&log_path).unwrap().len() > 0);
    assert_eq!(refusals(&gw.log()), 1, "{}", gw.log());
    // A SIGHUP still retries it (and refuses it again).
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(refusals(&gw.log()), 2, "{}", gw.log());
    // Refusing a file never stopped the gateway from taking a good one.
    gw.write_config(&format!(
        "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: r2, upstream: b, match: {{ path_prefix: /y }} }}\n",
        b.addr
    ));
    gw.wait_generation(3).await;
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 404);
}

/// An address another process holds stops the start with the field named, after a few tries
/// (as nginx does), instead of a process that lives on and answers `/ready` while its proxy
/// listener was never bound.
#[test]
fn a_listener_address_in_use_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let admin = free_port("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(
        &path,
        format!(
            "listeners:\n  http: {{ address: \"127.0.0.1:{port}\" }}\nadmin: {{ address: \"127.0.0.1:{admin}\" }}\nupstreams:\n  b: {{ targets: [\"127.0.0.1:9\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n"
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = Command::new(gateway_bin())
        .args(["run", "-c"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("the gateway kept running with its listener address in use");
        }
        // While it tries, nothing answers as if it were ready: the admin port is not open.
        if std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok() {
            let _ = child.kill();
            panic!("the admin listener answered while the proxy listener was not bound");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    let expected = format!("{}:2:", path.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("listeners.http.address"), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    // It tried for a while first (5 tries, 0.5 s apart).
    assert!(started.elapsed() >= Duration::from_secs(2), "{stderr}");
    drop(taken);
}

/// A gateway whose client listener address was taken by this test after the start-up check
/// and before Pingora bound it: the test stops the process (SIGSTOP) as soon as it logs its
/// listeners, takes the address, and lets it go on. Returns the process, its admin address,
/// the listener the test holds, and the log's path; `None` if the gateway bound first every
/// time.
fn start_with_address_taken_after_the_check(
    dir: &std::path::Path,
) -> Option<(
    std::process::Child,
    u16,
    std::net::TcpListener,
    std::path::PathBuf,
)> {
    for attempt in 0..5 {
        let port = free_port("127.0.0.1");
        let admin = free_port("127.0.0.1");
        let path = dir.join(format!("gw{attempt}.yaml"));
        let log_path = dir.join(format!("gw{attempt}.log"));
        std::fs::write(
            &path,
            format!(
                "listeners:\n  http: {{ address: \"127.0.0.1:{port}\" }}\nadmin: {{ address: \"127.0.0.1:{admin}\" }}\nupstreams:\n  b: {{ targets: [\"127.0.0.1:9\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(gateway_bin())
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("listening")
        {
            assert!(
                Instant::now() < deadline,
                "the gateway never logged its listeners"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
        let taken = std::net::TcpListener::bind(("127.0.0.1", port));
        unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        match taken {
            Ok(taken) => return Some((child, admin, taken, log_path)),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    None
}

/// `/ready`'s status and body, once the admin listener answers.
fn ready(admin: u16) -> (u16, String) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut response = String::new();
            s.read_to_string(&mut response).unwrap();
            let status = response
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
            let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "the admin listener never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An address taken between the start-up check and Pingora's bind: `/ready` answers 503
/// ("starting") while Pingora tries it, and once it gives up (30 tries, a second apart) the
/// gateway exits with the listener named, instead of living on without it.
#[test]
fn a_listener_address_taken_after_the_check_keeps_ready_at_503_then_stops_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, admin, taken, log_path) = start_with_address_taken_after_the_check(dir.path())
        .expect("the gateway bound its address first in every attempt");
    let (status, body) = ready(admin);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"starting\""), "{body}");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the gateway kept running without its listener");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("field=listeners.http.address"), "{log}");
    assert!(log.contains("still not bound"), "{log}");
    drop(taken);
}

/// The same, with the address let go while Pingora still tries it: the listener is bound on
/// its next try, and `/ready` turns 200.
#[test]
fn a_listener_address_freed_while_pingora_tries_it_makes_the_gateway_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, admin, taken, _) = start_with_address_taken_after_the_check(dir.path())
        .expect("the gateway bound its address first in every attempt");
    let port = taken.local_addr().unwrap().port();
    assert_eq!(ready(admin).0, 503);
    drop(taken);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready(admin).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready after the address was freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ready means served: the listener is the gateway's.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(child.try_wait().unwrap().is_none());
    let _ = child.kill();
    let _ = child.wait();
}

/// One stream of load for the upgrade test: requests until `stop`, counting successes and
/// failures (with the first few errors).
#[derive(Default)]
struct LoadCount {
    ok: AtomicUsize,
    failed: AtomicUsize,
    errors: Mutex<Vec<String>>,
}

impl LoadCount {
    fn record(&self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = self.errors.lock().unwrap();
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
        }
    }
}

/// An HTTPS request on a new connection, verified against the development CA.
async fn https_once(
    addr: std::net::SocketAddr,
    tls: &tokio_rustls::TlsConnector,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("localhost".to_string()).unwrap();
    let mut s = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    s.write_all(b"GET /tls HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    match out.starts_with(b"HTTP/1.1 200") {
        true => Ok(()),
        false => Err(format!("answer: {:?}", String::from_utf8_lossy(&out))),
    }
}

/// A process started by the test, killed when the test ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx-style binary upgrade: a second gateway started with `run --upgrade` takes the
/// listening sockets over from the running one, which on SIGQUIT hands them over, drains and
/// exits. Under continuous load (HTTP/1 keep-alive, new connections, TLS) no request fails and
/// no connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_loses_no_request() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let certs = tempfile::tempdir().unwrap();
    common::certs(certs.path(), &["localhost"]);
    let (https, listener) = tls_listener("https", certs.path(), &["localhost"], "");
    let mut old = Gateway::start_with("", &listener, &one_route_to(&backend, "")).await;

    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(certs.path().join("ca.pem")).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<LoadCount>> = (0..3).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    // Keep-alive: one pooled client.
    {
        let (stop, count, url) = (stop.clone(), counts[0].clone(), old.url("/keepalive"));
        tasks.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let r = c.get(&url).send().await;
                count.record(match r {
                    Ok(r) if r.status() == 200 => {
                        r.bytes().await.map(|_| ()).map_err(|e| e.to_string())
                    }
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(format!("{e:?}")),
                });
            }
        }));
    }
    // A new connection for every request.
    {
        let (stop, count, addr) = (stop.clone(), counts[1].clone(), old.http);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let text = tokio::time::timeout(
                    Duration::from_secs(5),
                    raw_request_result(
                        addr,
                        b"GET /fresh HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                    ),
                )
                .await
                .unwrap_or_else(|_| Err("timeout".into()));
                count.record(text.and_then(|t| match t.starts_with("HTTP/1.1 200") {
                    true => Ok(()),
                    false => Err(format!("answer: {t:?}")),
                }));
            }
        }));
    }
    // TLS, a handshake per request.
    {
        let (stop, count, tls) = (stop.clone(), counts[2].clone(), tls.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                count.record(https_once(https, &tls).await);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The new binary (the same one here) starts in upgrade mode, then the old one is told.
    let new_log = old.dir.path().join("new.log");
    let new = Reaped(
        Command::new(gateway_bin())
            .args(["run", "--upgrade", "-c"])
            .arg(&old.config_path)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&new_log).unwrap())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old_pid = old.pid();
    old.signal(libc::SIGQUIT);
    let exited = tokio::task::spawn_blocking(move || {
        let status = old.wait_exit(Duration::from_secs(15));
        (old, status)
    });
    let (old, status) = exited.await.unwrap();
    assert!(
        status.is_some(),
        "the old gateway did not exit:\n{}",
        old.log()
    );
    // Load goes on against the new process alone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let new_text = std::fs::read_to_string(&new_log).unwrap_or_default();
    for (kind, count) in ["keep-alive", "new connections", "TLS"].iter().zip(&counts) {
        let (ok, failed) = (
            count.ok.load(Ordering::Relaxed),
            count.failed.load(Ordering::Relaxed),
        );
        assert!(ok > 20, "{kind}: only {ok} requests");
        assert_eq!(
            failed,
            0,
            "{kind}: {failed} of {} failed: {:?}\nold ({old_pid}):\n{}\nnew:\n{new_text}",
            ok + failed,
            count.errors.lock().unwrap(),
            old.log()
        );
    }
    // The new process serves, and answers /ready on the admin address it took over.
    let r = client()
        .get(format!("http://{}/ready", old.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{new_text}");
    assert!(new_text.contains("listeners bound"), "{new_text}");
    drop(new);
}

/// Sends raw bytes on a new connection and returns the answer, or why there was none.
async fn raw_request_result(addr: std::net::SocketAddr, bytes: &[u8]) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(bytes)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .await
        .map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The shipped `gateway.yaml` on a fresh clone: refused once, naming the missing certificate
/// and the command that makes a development one.
#[test]
fn the_shipped_file_without_a_certificate_says_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.yaml");
    std::fs::copy(shipped, &path).unwrap();
    let out = Command::new(gateway_bin())
        .args(["check", "-c"])
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("listeners.https.tls: certs/localhost.pem: no such file"),
        "{err}"
    );
    assert!(
        err.contains("`gateway certs --dir certs localhost 127.0.0.1`"),
        "{err}"
    );
    // After the command it names, the file is valid.
    let made = Command::new(gateway_bin())
        .args(["certs", "--dir", "certs", "localhost", "127.0.0.1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(made.status.success());
    let out = Command::new(gateway_bin())
        .args(["check", "-c"])
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
