//! The services on PostgreSQL (`DATABASE_URL=postgres://…`), as in Compose: a real server
//! started here on a free port, several replicas of each service on it, and concurrent requests
//! spread over the replicas. `scripts/test` installs PostgreSQL when it is missing.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::free_port;

/// The newest installed PostgreSQL's `bin` directory.
fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (scripts/test installs it)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop().expect("no initdb under /usr/lib/postgresql")
}

/// A command that runs as the `postgres` user when we are root (the server refuses root).
fn as_db_user(program: &Path) -> Command {
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

struct Postgres {
    child: Child,
    url: String,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Postgres {
    fn start() -> Postgres {
        let bin = pg_bin();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if unsafe { libc::geteuid() } == 0 {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        let out = as_db_user(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let child = as_db_user(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Postgres {
            child,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            data,
            _dir: dir,
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The server may run under runuser, which does not pass signals on: pg_ctl finds the
        // server through its pid file (fast shutdown).
        let _ = as_db_user(&pg_bin().join("pg_ctl"))
            .args(["stop", "-m", "fast", "-w", "-D"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One replica of a service, on 127.0.0.1 and a free port.
struct Replica {
    child: Child,
    base: String,
}

impl Replica {
    fn start(service: &str, db: &str) -> Replica {
        Replica::start_with(service, db, &[])
    }

    /// A replica with more environment (where its peer services are).
    fn start_with(service: &str, db: &str, env: &[(&str, &str)]) -> Replica {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_services"))
            .args([service, "--listen", &format!("127.0.0.1:{port}")])
            .envs(env.iter().copied())
            .env("DATABASE_URL", db)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{service} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Replica {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_state_through_postgres() {
    let pg = Postgres::start();
    // Replicas start together, as Compose starts them: schema creation must not race.
    let starts: Vec<_> = [
        "users", "users", "products", "products", "payments", "payments",
    ]
    .into_iter()
    .map(|s| {
        let url = pg.url.clone();
        std::thread::spawn(move || Replica::start(s, &url))
    })
    .collect();
    let mut r: Vec<Replica> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    let (_, _) = (r.pop().unwrap(), r.pop().unwrap());
    let (prod2, prod1) = (r.pop().unwrap(), r.pop().unwrap());
    // Orders price from the product service, payments check the order service: replicas
    // that call each other by URL.
    let orders = Replica::start_with(
        "orders",
        &pg.url,
        &[("PRODUCT_SERVICE_URL", prod1.base.as_str())],
    );
    let pay_env = [("ORDER_SERVICE_URL", orders.base.as_str())];
    let (pay1, pay2) = (
        Replica::start_with("payments", &pg.url, &pay_env),
        Replica::start_with("payments", &pg.url, &pay_env),
    );
    let (users2, users1) = (r.pop().unwrap(), r.pop().unwrap());
    let c = reqwest::Client::builder().no_proxy().build().unwrap();

    // Registered on one replica, logged in on the other; both publish the same key.
    let reg = json!({"email": "pg@example.com", "password": "correct horse", "firstName": "P", "lastName": "G"});
    let r = c
        .post(users1.url("/api/users/register"))
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let login = json!({"email": "pg@example.com", "password": "correct horse"});
    let r = c
        .post(users2.url("/api/users/login"))
        .json(&login)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let jwks1: Value = get_json(&c, &users1.url("/.well-known/jwks.json")).await;
    let jwks2: Value = get_json(&c, &users2.url("/.well-known/jwks.json")).await;
    assert_eq!(jwks1, jwks2);
    let r = c
        .post(users2.url("/api/users/register"))
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    // The catalogue is seeded once and searchable the same way as on SQLite.
    let page: Value = get_json(&c, &prod1.url("/api/products?search=SHOES")).await;
    assert_eq!(page["totalCount"], 2);

    // 40 concurrent subtractions of 1 from a stock of 25, over both replicas: exactly 25 pass.
    let set = json!({"operation": "set", "quantity": 25});
    let r = c
        .put(prod1.url("/api/products/p-2001/inventory"))
        .header("x-user-id", "u")
        .header("x-user-role", "admin")
        .json(&set)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let url = if i % 2 == 0 {
            prod1.url("")
        } else {
            prod2.url("")
        };
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put(format!("{url}/api/products/p-2001/inventory"))
                .header("x-user-id", "u")
                .header("x-user-role", "admin")
                .json(&json!({"operation": "subtract", "quantity": 1}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 25, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 409).count(), 15, "{codes:?}");
    let product: Value = get_json(&c, &prod2.url("/api/products/p-2001")).await;
    assert_eq!(product["inventory"], 0);

    // An order is priced from the catalogue; the client names no price.
    let order: Value = c
        .post(orders.url("/api/orders"))
        .header("x-user-id", "u")
        .json(&json!({"items": [{"productId": "p-1001", "quantity": 2}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let total = order["totalCents"].as_i64().unwrap();
    let price = order["items"][0]["unitPriceCents"].as_i64().unwrap();
    assert_eq!(total, 2 * price, "{order}");
    // The catalogue's price, not one the order service made up.
    let product = get_json(&c, &prod1.url("/api/products/p-1001")).await;
    assert_eq!(product["priceCents"].as_i64(), Some(price), "{product}");
    // More than the stock (p-2001 was emptied above): 409.
    let r = c
        .post(orders.url("/api/orders"))
        .header("x-user-id", "u")
        .json(&json!({"items": [{"productId": "p-2001", "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let order_id = order["orderId"].as_str().unwrap().to_string();

    // One Idempotency-Key sent 20 times at once over both replicas: one charge.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = if i % 2 == 0 {
            pay1.url("/api/payments")
        } else {
            pay2.url("/api/payments")
        };
        let (c, order_id) = (c.clone(), order_id.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .header("x-user-id", "u")
                .header("idempotency-key", "same-key")
                .json(&json!({"orderId": order_id, "amountCents": total}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (
                status,
                body["paymentId"].as_str().unwrap_or_default().to_string(),
            )
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(
        results.iter().filter(|(s, _)| *s == 201).count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|(s, _)| *s == 200).count(),
        19,
        "{results:?}"
    );
    let ids: std::collections::HashSet<_> = results.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.len(), 1, "{results:?}");

    // A charge must be the order's total, and for an order of the caller's.
    let charge = |user: &'static str, key: &'static str, amount: i64| {
        c.post(pay1.url("/api/payments"))
            .header("x-user-id", user)
            .header("idempotency-key", key)
            .json(&json!({"orderId": order_id, "amountCents": amount}))
            .send()
    };
    assert_eq!(charge("u", "cheap", 1).await.unwrap().status(), 422);
    assert_eq!(
        charge("mallory", "theirs", total).await.unwrap().status(),
        404
    );
    // The order service down: a clear 503, no charge.
    drop(orders);
    let r = charge("u", "down", total).await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "order service unavailable", "{body}");
    // The product service down: orders cannot be priced, a clear 503.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let orders = Replica::start_with("orders", &pg.url, &[("PRODUCT_SERVICE_URL", &nowhere)]);
    let r = c
        .post(orders.url("/api/orders"))
        .header("x-user-id", "u")
        .json(&json!({"items": [{"productId": "p-1001", "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "product service unavailable", "{body}");
}

/// `GET url` and its JSON body.
async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}
