//! The dashboard in real browsers: headless Chromium (through chromedriver) and Firefox
//! (through geckodriver), driven in plain WebDriver against the real gateway in front of real
//! backends. Screenshots of the page, normal and failing, go to `target/screenshots/` (or
//! `$SCREENSHOT_DIR`).

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "dashboard-test-token-0123";

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chromium,
    Firefox,
}

/// A headless browser session behind its WebDriver server.
struct Browser {
    kind: Kind,
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(kind: Kind) -> Browser {
        let (candidates, what): (&[&str], _) = match kind {
            Kind::Chromium => (
                &["chromedriver", "/usr/bin/chromedriver"],
                "chromedriver (Debian's chromium-driver; scripts/test installs it)",
            ),
            Kind::Firefox => (
                &["geckodriver", "/usr/local/bin/geckodriver"],
                "geckodriver (scripts/test installs it from crates.io)",
            ),
        };
        let driver_bin = candidates
            .iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect(what);
        let port = free_port("127.0.0.1");
        // Its own process group, so that the browser it starts goes with it.
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = match kind {
            Kind::Chromium => json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": binary(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]),
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--window-size=1280,1100", format!("--user-data-dir={}", profile.path().display())],
                },
                "goog:loggingPrefs": {"browser": "ALL"},
            }}}),
            Kind::Firefox => json!({"capabilities": {"alwaysMatch": {
                "browserName": "firefox",
                "moz:firefoxOptions": {
                    "binary": binary(&["/usr/bin/firefox-esr", "/usr/bin/firefox"]),
                    "args": ["-headless", "-width", "1280", "-height", "1100"],
                },
            }}}),
        };
        let resp: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {resp}"))
            .to_string();
        Browser {
            kind,
            driver,
            base,
            session,
            http,
            _profile: profile,
        }
    }

    async fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let resp: Value = req.send().await.unwrap().json().await.unwrap();
        if resp["value"].get("error").is_some() {
            panic!("WebDriver {path}: {resp}");
        }
        resp["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url })).await;
    }

    /// Runs `body` (a function body; `return` gives the value) in the page.
    async fn eval(&self, body: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            json!({ "script": body, "args": [] }),
        )
        .await
    }

    /// Waits until `body` returns true in the page.
    async fn wait_for(&self, body: &str, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.eval(body).await != Value::Bool(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The browser console's errors (and the page's uncaught exceptions) so far. Firefox's
    /// driver has no log endpoint: there the page's own record of its errors is read.
    async fn console_errors(&self) -> Vec<String> {
        if self.kind == Kind::Firefox {
            let seen = self.eval("return window.__dashboardErrors || [];").await;
            return serde_json::from_value(seen).unwrap_or_default();
        }
        let logs = self
            .command("POST", "/se/log", json!({ "type": "browser" }))
            .await;
        logs.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or("").to_string())
            .collect()
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let png = self.command("GET", "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = std::env::var_os("SCREENSHOT_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots"),
            PathBuf::from,
        );
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    async fn quit(mut self) {
        self.command("DELETE", "", Value::Null).await;
        self.kill();
    }

    fn kill(&mut self) {
        // SAFETY: a plain signal to the driver's own process group.
        unsafe { libc::killpg(self.driver.id() as i32, libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill();
    }
}

fn binary(candidates: &[&'static str]) -> &'static str {
    candidates
        .iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| panic!("no browser at {candidates:?} (scripts/test installs it)"))
}

/// The text of column `col` of every row of table `id`.
fn column(id: &str, col: usize) -> String {
    format!(
        "return Array.from(document.querySelectorAll('#{id} tbody tr')).map(r => r.cells[{col}].textContent);"
    )
}

/// The state label of the replica at `addr`.
fn replica_state(addr: SocketAddr) -> String {
    format!(
        "const row = Array.from(document.querySelectorAll('#replicas tbody tr')).find(r => r.cells[1].textContent === '{addr}'); return row ? row.cells[2].textContent : null;"
    )
}

/// Whether the replica at `addr` shows `healthy` (or, with `healthy` false, anything else).
fn replica_healthy(addr: SocketAddr, healthy: bool) -> String {
    format!(
        "const row = Array.from(document.querySelectorAll('#replicas tbody tr')).find(r => r.cells[1].textContent === '{addr}'); return !!row && (row.cells[2].textContent === 'healthy') === {healthy};"
    )
}

fn config(a: &Backend, b: &Backend) -> String {
    format!(
        r#"upstreams:
  shop:
    targets: ["{}", "{}"]
    health: {{ active: {{ interval: 200ms, timeout: 500ms, rise: 1, fall: 1 }} }}
routes:
  - {{ name: products, upstream: shop, match: {{ path_prefix: /api/products, methods: [GET] }} }}
  - {{ name: internal, upstream: shop, match: {{ path_prefix: /internal, headers: [ {{ name: x-internal-key, value: s3cret-value }} ] }} }}
  - {{ name: everything, upstream: shop }}
"#,
        a.addr, b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_routes_replicas_certificates_and_reloads_live_in_chromium() {
    dashboard_in(Kind::Chromium, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_the_same_in_firefox() {
    dashboard_in(Kind::Firefox, "firefox-").await;
}

/// The whole walk through the dashboard in one browser; screenshots named with `prefix`.
async fn dashboard_in(kind: Kind, prefix: &str) {
    let mut a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), &["shop.test"]);
    let (_, listener) = tls_listener("https", dir.path(), &["shop.test"], "");
    let body = config(&a, &b);
    let gw = Gateway::start_edited(&body, |text| {
        text.replace(
            "admin: { address: \"",
            &format!("{listener}admin: {{ token: \"{TOKEN}\", address: \""),
        )
    })
    .await;
    for _ in 0..20 {
        client()
            .get(gw.url("/api/products/1"))
            .send()
            .await
            .unwrap();
    }

    // Safe by default: a strict CSP on the page, the data behind the token.
    let page = client()
        .get(format!("http://{}/dashboard", gw.admin))
        .send()
        .await
        .unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'self'"),
        "{csp}"
    );
    let open = client()
        .get(format!("http://{}/dashboard/state", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 401);
    let state = client()
        .get(format!("http://{}/dashboard/state", gw.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        state.contains("x-internal-key") && !state.contains("s3cret"),
        "{state}"
    );
    assert!(!state.contains(TOKEN));
    // Every JSON view takes the token; a wrong one is refused; /metrics stays open.
    for view in ["/routes", "/upstreams", "/certificates", "/dashboard/state"] {
        let url = format!("http://{}{view}", gw.admin);
        let none = client().get(&url).send().await.unwrap();
        let wrong = client()
            .get(&url)
            .bearer_auth("wrong-token-wrong-token")
            .send()
            .await
            .unwrap();
        let right = client().get(&url).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(
            (
                none.status().as_u16(),
                wrong.status().as_u16(),
                right.status().as_u16()
            ),
            (401, 401, 200),
            "{view}"
        );
    }
    let metrics = client()
        .get(format!("http://{}/metrics", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);

    let browser = Browser::start(kind).await;
    browser
        .goto(&format!("http://{}/dashboard#token={TOKEN}", gw.admin))
        .await;
    browser
        .wait_for(
            "return document.querySelectorAll('#replicas tbody tr').length === 2;",
            "the replica table",
            Duration::from_secs(10),
        )
        .await;

    // The tables match the configuration.
    assert_eq!(
        browser.eval(&column("routes", 0)).await,
        json!(["products", "internal", "everything"])
    );
    assert_eq!(
        browser.eval(&column("routes", 1)).await,
        json!([
            "prefix /api/products; GET",
            "prefix /internal; header x-internal-key",
            "every request"
        ])
    );
    // A header match's value may be a secret: it is in neither the page nor its data.
    let html = browser
        .eval("return document.documentElement.outerHTML;")
        .await;
    assert!(
        !html.to_string().contains("s3cret"),
        "the page shows a match value"
    );
    let mut addresses: Vec<String> =
        serde_json::from_value(browser.eval(&column("replicas", 1)).await).unwrap();
    addresses.sort();
    let mut want = vec![a.addr.to_string(), b.addr.to_string()];
    want.sort();
    assert_eq!(addresses, want);
    assert_eq!(
        browser.eval(&column("replicas", 2)).await,
        json!(["healthy", "healthy"])
    );
    // The 20 requests to `products` show as a rate, with a p95 bound (once the samples span a
    // second: the page may have asked sooner).
    browser
        .wait_for(
            "return document.querySelector('#routes tbody tr').cells[4].textContent !== '–';",
            "the first rates",
            Duration::from_secs(10),
        )
        .await;
    let rates = browser.eval(&column("routes", 4)).await;
    assert_ne!(rates[0], json!("0.0"), "{rates}");
    let p95 = browser.eval(&column("routes", 6)).await;
    assert!(p95[0].as_str().unwrap().starts_with("≤ "), "{p95}");
    let names = browser.eval(&column("listeners", 2)).await;
    assert!(names.to_string().contains("shop.test"), "{names}");
    let issuer = browser.eval(&column("listeners", 3)).await;
    assert!(issuer.to_string().contains("CN="), "{issuer}");
    // The token left the address bar.
    assert_eq!(browser.eval("return location.hash;").await, json!(""));

    // The filter box and the sortable columns.
    browser
        .eval("const f = document.getElementById('filter'); f.value = 'products'; f.dispatchEvent(new Event('input')); return true;")
        .await;
    assert_eq!(
        browser
            .eval("return Array.from(document.querySelectorAll('#routes tbody tr')).filter(r => !r.hidden).length;")
            .await,
        json!(1)
    );
    browser
        .eval("const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input')); document.querySelector('#routes th[data-key=name]').click(); return true;")
        .await;
    assert_eq!(
        browser.eval(&column("routes", 0)).await,
        json!(["everything", "internal", "products"])
    );
    browser.screenshot(&format!("{prefix}dashboard.png")).await;

    // A replica killed turns its row down within seconds, and back when it returns.
    let a_addr = a.addr;
    a.kill();
    browser
        .wait_for(
            &replica_healthy(a_addr, false),
            "the killed replica's row to turn down",
            Duration::from_secs(5),
        )
        .await;
    let down = browser.eval(&replica_state(a_addr)).await;
    assert_eq!(down, json!("unhealthy"));

    // A rejected reload shows its error and where it is.
    gw.write_raw_config(
        &std::fs::read_to_string(&gw.config_path)
            .unwrap()
            .replace("upstream: shop }\n", "upstream: nowhere }\n"),
    );
    browser
        .wait_for(
            "return !document.getElementById('rejected').hidden;",
            "the rejected reload",
            Duration::from_secs(10),
        )
        .await;
    let error = browser
        .eval("return document.getElementById('rejected-error').textContent;")
        .await;
    assert!(error.to_string().contains("routes[2].upstream"), "{error}");
    let line = browser
        .eval("return document.getElementById('rejected-line').textContent;")
        .await;
    assert!(line.as_str().unwrap().parse::<u32>().unwrap() > 1, "{line}");
    assert_eq!(
        browser
            .eval("return document.getElementById('reload-result').textContent;")
            .await,
        json!("rejected")
    );
    browser
        .screenshot(&format!("{prefix}dashboard-failing.png"))
        .await;
    // A phone's width: the tables scroll sideways, the page does not break.
    browser
        .command(
            "POST",
            "/window/rect",
            json!({ "width": 390, "height": 844 }),
        )
        .await;
    assert_eq!(
        browser
            .eval("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
            .await,
        json!(true)
    );
    browser
        .screenshot(&format!("{prefix}dashboard-phone.png"))
        .await;

    let _a = Backend::start_on(a_addr, "a").await;
    browser
        .wait_for(
            &replica_healthy(a_addr, true),
            "the returned replica's row to turn healthy",
            Duration::from_secs(5),
        )
        .await;

    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    browser.quit().await;
}
