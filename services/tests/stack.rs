//! End to end: `services stack` starts the real gateway (the workspace's `gateway.yaml`) in
//! front of three replicas of every service on 127.N.x.y, and a real HTTP client walks the
//! newcomer's path through it.

use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::free_port;

/// The process started with `--listen ADDR`, found in `/proc`.
fn pid_listening_on(addr: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"--listen" && w[1] == addr.as_bytes())
                .then_some(pid)
        })
}

/// A running stack; stopped (SIGTERM) when dropped.
struct Stack {
    child: Child,
    base: String,
    https: String,
    net: String,
    data: tempfile::TempDir,
}

impl Stack {
    fn start() -> Stack {
        let services = PathBuf::from(env!("CARGO_BIN_EXE_services"));
        let gateway = services.with_file_name("gateway");
        assert!(
            gateway.is_file(),
            "{} is missing: build the workspace (`cargo test --workspace` does)",
            gateway.display()
        );
        let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../gateway.yaml");
        let data = tempfile::tempdir().unwrap();
        // A second octet of our own, so that parallel runs do not meet on the same addresses.
        let net = format!("127.{}", 100 + std::process::id() % 150);
        let http = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let https = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(&services)
            // The first administrator: this address gets the admin role when it registers.
            .env("ADMIN_EMAILS", "admin@example.com")
            .args([
                "stack",
                "--replicas",
                "3",
                "--net",
                &net,
                "--http",
                &http,
                "--admin",
                &admin,
            ])
            .args(["--https", &https])
            .arg("--config")
            .arg(&config)
            .arg("--gateway")
            .arg(&gateway)
            .arg("--data")
            .arg(data.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Wait for the banner, which is printed once every service answers through the gateway.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("Stack is up") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let logs = std::fs::read_dir(data.path().join("logs"))
                        .map(|d| {
                            d.flatten()
                                .map(|e| {
                                    format!(
                                        "== {}\n{}",
                                        e.path().display(),
                                        std::fs::read_to_string(e.path()).unwrap_or_default()
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("\n")
                        })
                        .unwrap_or_default();
                    panic!("the stack did not come up\n{logs}");
                }
            }
        }
        Stack {
            child,
            base: format!("http://{http}"),
            https,
            net,
            data,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Replica `n` (1-based) of the service on `octet`, bypassing the gateway.
    fn replica(&self, octet: u8, n: u8, port: u16, path: &str) -> String {
        format!("http://{}.{octet}.{n}:{port}{path}", self.net)
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the stack did not stop on Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// Sends `request`; its status and JSON body.
async fn send_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    json_of(request.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_stack_end_to_end() {
    let mut stack = Stack::start();
    let c = client();

    // Public catalogue through the gateway: filters, pagination, JSON errors.
    let (status, body) =
        send_json(c.get(stack.url("/api/products?category=gear&limit=4&page=2"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["totalCount"], 6);
    assert_eq!(body["totalPages"], 2);
    assert_eq!(body["products"].as_array().unwrap().len(), 2);
    let (status, body) = send_json(c.get(stack.url("/api/products?search=SHOES"))).await;
    assert_eq!(
        (status, body["totalCount"].as_i64()),
        (200, Some(2)),
        "{body}"
    );
    let (status, body) = send_json(c.get(stack.url("/api/products?search=100%25"))).await;
    assert_eq!(
        (status, body["totalCount"].as_i64()),
        (200, Some(0)),
        "% is literal: {body}"
    );
    for bad in [
        "/api/products?limit=0",
        "/api/products?limit=abc",
        "/api/products?page=-1",
    ] {
        let (status, body) = json_of(c.get(stack.url(bad)).send().await.unwrap()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["status"], 400, "{bad}: {body}");
    }
    let (status, body) = send_json(c.get(stack.url("/api/products/p-3004"))).await;
    assert_eq!(
        (status, body["name"].as_str()),
        (200, Some("Tent, two person"))
    );
    let (status, body) =
        json_of(c.get(stack.url("/api/products/nope")).send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no such product"))
    );

    // JSON answers end with a newline, for a terminal.
    let text = c
        .get(stack.url("/api/products/p-3004"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("}\n"), "{text:?}");

    // HTTPS: the stack made a development CA and a certificate for localhost.
    let port = stack.https.rsplit(':').next().unwrap().to_string();
    let ca = stack.data.path().join("certs/ca.pem");
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--resolve",
            &format!("localhost:{port}:127.0.0.1"),
            "--cacert",
        ])
        .arg(&ca)
        .arg(format!("https://localhost:{port}/api/products/p-1001"))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("Trail running shoes"),
        "{body}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Requests are spread over the three product replicas.
    let mut seen = HashSet::new();
    for _ in 0..30 {
        let r = c
            .get(stack.url("/api/products?limit=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        seen.insert(r.headers()["x-replica"].to_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // Failover: a product replica killed, requests keep succeeding on the others, and the
    // stack starts it again.
    let listen = format!("{}.2.2:3002", stack.net);
    let pid = pid_listening_on(&listen).expect("the product replica's process");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for _ in 0..30 {
        let r = c
            .get(stack.url("/api/products?limit=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let back = c.get(stack.replica(2, 2, 3002, "/health")).send().await;
        if back.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed replica was not started again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(pid_listening_on(&listen), Some(pid));

    // Register through the gateway; the token is EdDSA-signed and verifies against the JWKS.
    let registration = json!({"email": "Ada@Example.com", "password": "correct horse", "firstName": "Ada", "lastName": "Lovelace"});
    let (status, body) =
        send_json(c.post(stack.url("/api/users/register")).json(&registration)).await;
    assert_eq!(status, 201, "{body}");
    let user_id = body["userId"].as_str().unwrap().to_string();
    assert_eq!(body["email"], "ada@example.com");
    let token = body["token"].as_str().unwrap().to_string();
    let (status, jwks) = send_json(c.get(stack.url("/.well-known/jwks.json"))).await;
    assert_eq!(status, 200);
    let jwk = &jwks["keys"][0];
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), jwk["kid"].as_str());
    let key = jsonwebtoken::DecodingKey::from_ed_components(jwk["x"].as_str().unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["api"]);
    validation.set_issuer(&["user-service"]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], user_id.as_str());
    assert_eq!(claims["role"], "user");
    // Every replica publishes the same key.
    for n in 1..=3 {
        let r = c
            .get(stack.replica(1, n, 3001, "/.well-known/jwks.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(json_of(r).await.1, jwks);
    }

    // Registering twice, or with bad input, is refused.
    let (status, _) = send_json(c.post(stack.url("/api/users/register")).json(&registration)).await;
    assert_eq!(status, 409);
    for bad in [
        json!({"email": "nope", "password": "correct horse", "firstName": "A", "lastName": "B"}),
        json!({"email": "b@example.com", "password": "short", "firstName": "A", "lastName": "B"}),
        json!({"email": "b@example.com", "password": "correct horse", "firstName": "", "lastName": "B"}),
        json!({"email": "b@example.com"}),
    ] {
        let (status, body) = send_json(c.post(stack.url("/api/users/register")).json(&bad)).await;
        assert!(status == 400 || status == 422, "{bad}: {status} {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    let r = c
        .post(stack.url("/api/users/register"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A user registered through one replica logs in through each of the others.
    for n in 1..=3 {
        let login = json!({"email": "ada@example.com", "password": "correct horse"});
        let (status, body) = send_json(
            c.post(stack.replica(1, n, 3001, "/api/users/login"))
                .json(&login),
        )
        .await;
        assert_eq!(status, 200, "replica {n}: {body}");
        assert_eq!(body["userId"], user_id.as_str());
    }
    let wrong = json!({"email": "ada@example.com", "password": "wrong horse"});
    let (status, _) = send_json(c.post(stack.url("/api/users/login")).json(&wrong)).await;
    assert_eq!(status, 401);
    let unknown = json!({"email": "who@example.com", "password": "wrong horse"});
    let (status, _) = send_json(c.post(stack.url("/api/users/login")).json(&unknown)).await;
    assert_eq!(status, 401);

    // Logins through the gateway are rate limited per client address (login: burst 10,
    // 30/min in gateway.yaml): guessing runs into 429 with Retry-After.
    let mut limited = None;
    for attempt in 0..40 {
        let r = c
            .post(stack.url("/api/users/login"))
            .json(&wrong)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            401 => {}
            429 => {
                limited = Some((
                    attempt,
                    r.headers()["retry-after"].to_str().unwrap().to_string(),
                ));
                break;
            }
            other => panic!("login attempt {attempt}: {other}"),
        }
    }
    let (attempt, retry_after) = limited.expect("no 429 after 40 wrong passwords");
    assert!(attempt <= 10, "limited only after {attempt} attempts");
    assert!(retry_after.parse::<u64>().unwrap() >= 1);

    // The profile needs an identity; with one it is the caller's own profile only.
    let (status, _) = send_json(c.get(stack.url(&format!("/api/users/{user_id}")))).await;
    assert_eq!(status, 401);
    let profile = stack.replica(1, 2, 3001, &format!("/api/users/{user_id}"));
    let (status, body) = send_json(c.get(&profile).header("x-user-id", &user_id)).await;
    assert_eq!(
        (status, body["firstName"].as_str()),
        (200, Some("Ada")),
        "{body}"
    );
    let (status, _) = send_json(c.get(&profile).header("x-user-id", "someone-else")).await;
    assert_eq!(status, 403);

    // Through the gateway: the token is checked there, and the service sees its claims.
    let me = format!("/api/users/{user_id}");
    let (status, body) = send_json(c.get(stack.url(&me)).bearer_auth(&token)).await;
    assert_eq!(
        (status, body["email"].as_str()),
        (200, Some("ada@example.com")),
        "{body}"
    );
    // A client naming itself in X-User-Id gets nowhere without a token.
    let r = c
        .get(stack.url(&me))
        .header("x-user-id", &user_id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    // A tampered token is refused at the gateway.
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let r = c
        .get(stack.url(&me))
        .bearer_auth(&tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A valid token does not open someone else's profile.
    let r = c
        .get(stack.url("/api/users/someone-else"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Orders and payments through the gateway.
    let order = json!({"items": [{"productId": "p-1001", "quantity": 2}]});
    let (status, created) = send_json(
        c.post(stack.url("/api/orders"))
            .bearer_auth(&token)
            .json(&order),
    )
    .await;
    assert_eq!(
        (status, created["userId"].as_str()),
        (201, Some(user_id.as_str())),
        "{created}"
    );
    // The price is the catalogue's, whatever the client says.
    assert_eq!(created["totalCents"], 23800, "{created}");
    let forged = json!({"items": [{"productId": "p-1001", "quantity": 1, "unitPriceCents": 1}]});
    let r = c
        .post(stack.url("/api/orders"))
        .bearer_auth(&token)
        .json(&forged)
        .send()
        .await
        .unwrap();
    // A price from the client is not a field an order takes.
    assert_eq!(r.status(), 422);
    let unknown = json!({"items": [{"productId": "p-nope", "quantity": 1}]});
    let r = c
        .post(stack.url("/api/orders"))
        .bearer_auth(&token)
        .json(&unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (status, mine) = send_json(c.get(stack.url("/api/orders")).bearer_auth(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(mine["orders"][0]["orderId"], created["orderId"]);
    let pay = |key: &str| {
        c.post(stack.url("/api/payments"))
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .json(&json!({"orderId": created["orderId"], "amountCents": 23800}))
            .send()
    };
    assert_eq!(pay("through-gateway").await.unwrap().status(), 201);
    assert_eq!(pay("through-gateway").await.unwrap().status(), 200);
    // The order shows it is paid.
    let order_path = format!("/api/orders/{}", created["orderId"].as_str().unwrap());
    let (status, order_now) = send_json(c.get(stack.url(&order_path)).bearer_auth(&token)).await;
    assert_eq!(
        (status, order_now["status"].as_str()),
        (200, Some("paid")),
        "{order_now}"
    );
    // Marking an order paid is the payment service's call, not the client's: the gateway
    // routes nothing under /internal.
    let r = c
        .put(stack.url(&format!(
            "/internal{}/paid",
            order_path.trim_start_matches("/api")
        )))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Less than the order's total is refused.
    let r = c
        .post(stack.url("/api/payments"))
        .bearer_auth(&token)
        .header("idempotency-key", "one-cent")
        .json(&json!({"orderId": created["orderId"], "amountCents": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // Writing to the catalogue needs an administrator's token; reading it needs none.
    let stock = json!({"operation": "add", "quantity": 1});
    let r = c
        .put(stack.url("/api/products/p-1001/inventory"))
        .json(&stock)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .put(stack.url("/api/products/p-1001/inventory"))
        .bearer_auth(&token)
        .json(&stock)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a user's token changed the catalogue");
    let admin = json!({"email": "admin@example.com", "password": "correct horse", "firstName": "A", "lastName": "D"});
    // On a replica directly: the gateway's login rate limit is spent by now.
    let (status, body) = send_json(
        c.post(stack.replica(1, 1, 3001, "/api/users/register"))
            .json(&admin),
    )
    .await;
    assert_eq!(
        (status, body["role"].as_str()),
        (201, Some("admin")),
        "{body}"
    );
    let admin_token = body["token"].as_str().unwrap().to_string();
    let r = c
        .put(stack.url("/api/products/p-1001/inventory"))
        .bearer_auth(&admin_token)
        .json(&stock)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Inventory never goes below zero, whichever replica is asked.
    let inv = |n: u8| stack.replica(2, n, 3002, "/api/products/p-3005/inventory");
    let change = |n: u8, op: &str, q: i64| {
        c.put(inv(n))
            .header("x-user-id", &user_id)
            .header("x-user-role", "admin")
            .json(&json!({"operation": op, "quantity": q}))
            .send()
    };
    assert_eq!(
        json_of(change(1, "set", 5).await.unwrap()).await.1["newQuantity"],
        5
    );
    assert_eq!(
        json_of(change(2, "subtract", 3).await.unwrap()).await.1["newQuantity"],
        2
    );
    let (status, _) = json_of(change(3, "subtract", 3).await.unwrap()).await;
    assert_eq!(status, 409);
    assert_eq!(
        json_of(change(3, "add", 1).await.unwrap()).await.1["newQuantity"],
        3
    );
    let (status, _) = json_of(change(1, "subtract", -1).await.unwrap()).await;
    assert_eq!(status, 400);
    let (status, _) = json_of(change(1, "multiply", 1).await.unwrap()).await;
    assert_eq!(status, 422);
    let r = c
        .put(inv(1))
        .json(&json!({"operation": "set", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The service checks the role itself too.
    let r = c
        .put(inv(1))
        .header("x-user-id", &user_id)
        .json(&json!({"operation": "set", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Orders: created on one replica, read on another, invisible to other users.
    let order = json!({"items": [{"productId": "p-3005", "quantity": 1}]});
    let (status, created) = send_json(
        c.post(stack.replica(3, 1, 3003, "/api/orders"))
            .header("x-user-id", &user_id)
            .json(&order),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["totalCents"], 29900);
    let order_id = created["orderId"].as_str().unwrap();
    let path = format!("/api/orders/{order_id}");
    let (status, read) = send_json(
        c.get(stack.replica(3, 2, 3003, &path))
            .header("x-user-id", &user_id),
    )
    .await;
    assert_eq!((status, &read), (200, &created));
    let (status, _) = send_json(
        c.get(stack.replica(3, 3, 3003, &path))
            .header("x-user-id", "mallory"),
    )
    .await;
    assert_eq!(status, 404);

    // A payment retried with the same Idempotency-Key, on different replicas, is charged once.
    let pay = json!({"orderId": order_id, "amountCents": 29900});
    let charge = |n: u8, key: &str, body: &Value| {
        c.post(stack.replica(4, n, 3004, "/api/payments"))
            .header("x-user-id", &user_id)
            .header("idempotency-key", key)
            .json(body)
            .send()
    };
    let first = charge(1, "order-1-attempt", &pay).await.unwrap();
    assert_eq!(first.status(), 201);
    let (_, first) = json_of(first).await;
    let again = charge(2, "order-1-attempt", &pay).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(json_of(again).await.1["paymentId"], first["paymentId"]);
    let other = json!({"orderId": order_id, "amountCents": 1});
    assert_eq!(
        charge(3, "order-1-attempt", &other).await.unwrap().status(),
        422
    );
    let no_key = c
        .post(stack.replica(4, 1, 3004, "/api/payments"))
        .header("x-user-id", &user_id)
        .json(&pay)
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 400);

    // Every service serves /health and /metrics; the metrics count what was served.
    for (octet, port) in [(1u8, 3001u16), (2, 3002), (3, 3003), (4, 3004)] {
        let r = c
            .get(stack.replica(octet, 1, port, "/health"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let metrics = c
            .get(stack.replica(octet, 1, port, "/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("http_requests_total"), "{metrics}");
    }

    // Ctrl-C stops every process.
    let status = stack.terminate();
    assert!(status.success(), "{status}");
    let replica: SocketAddr = format!("{}.1.1:3001", stack.net).parse().unwrap();
    assert!(std::net::TcpStream::connect_timeout(&replica, Duration::from_millis(500)).is_err());
    let gateway: SocketAddr = stack.base.trim_start_matches("http://").parse().unwrap();
    assert!(std::net::TcpStream::connect_timeout(&gateway, Duration::from_millis(500)).is_err());
}
