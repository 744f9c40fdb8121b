//! The local stack without Docker: several replicas of every service on their own 127.0.x.y
//! addresses, a DNS server that answers each service name with its replicas' addresses (as
//! Docker's embedded DNS does in Compose), and the gateway with `gateway.yaml` pointed at that
//! DNS server. Ctrl-C (or SIGTERM) stops everything.

use crate::common::shutdown_signal;
use anyhow::{bail, Context};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::process::{Child, Command};

/// The services of the stack: subcommand, DNS name (as in docker-compose.yml), port, and the
/// third octet of their replicas' addresses.
pub const SERVICES: &[(&str, &str, u16, u8)] = &[
    ("users", "user-service", 3001, 1),
    ("products", "product-service", 3002, 2),
    ("orders", "order-service", 3003, 3),
    ("payments", "payment-service", 3004, 4),
];

/// Options of `services stack`.
#[derive(Debug, clap::Args)]
pub struct StackArgs {
    /// The gateway configuration.
    #[arg(long, short = 'c', default_value = "gateway.yaml")]
    pub config: PathBuf,
    /// The gateway binary (default: `gateway` beside this binary).
    #[arg(long)]
    pub gateway: Option<PathBuf>,
    /// Replicas of each service.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=20))]
    pub replicas: u8,
    /// First two octets of the replicas' addresses: replica N of service S listens on
    /// NET.S.N (users are S=1, products 2, orders 3, payments 4).
    #[arg(long, default_value = "127.0")]
    pub net: String,
    /// Where the SQLite databases and the logs go.
    #[arg(long, default_value = ".stack")]
    pub data: PathBuf,
    /// The gateway's public listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// The gateway's HTTPS listener (a development certificate is made for it).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub https: SocketAddr,
    /// The gateway's admin listener.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
}

/// The stack's processes: each is owned by a task that reports its exit, or stops it when told.
struct Children {
    tasks: tokio::task::JoinSet<()>,
    stop: tokio::sync::watch::Sender<bool>,
    exited_tx: tokio::sync::mpsc::Sender<String>,
    exited: tokio::sync::mpsc::Receiver<String>,
}

impl Children {
    fn new() -> Children {
        let (exited_tx, exited) = tokio::sync::mpsc::channel(64);
        Children {
            tasks: tokio::task::JoinSet::new(),
            stop: tokio::sync::watch::channel(false).0,
            exited_tx,
            exited,
        }
    }

    fn adopt(&mut self, name: String, mut child: Child) {
        let mut stop = self.stop.subscribe();
        let exited = self.exited_tx.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    let _ = exited.send(format!("{name} exited ({status})")).await;
                }
                _ = stop.changed() => stop_child(&name, &mut child).await,
            }
        });
    }

    /// Runs a service replica made by `spawn`, and starts it again when it exits on its own:
    /// after 1 s, doubling up to 30 s while it keeps dying within a minute of its start. The
    /// stack stays up while a replica is down, as Compose's `restart: unless-stopped` keeps a
    /// service; the other replicas take its traffic meanwhile.
    fn adopt_restarting<F>(&mut self, name: String, spawn: F) -> anyhow::Result<()>
    where
        F: Fn() -> std::io::Result<Child> + Send + 'static,
    {
        let mut child = spawn().with_context(|| format!("starting {name}"))?;
        let mut stop = self.stop.subscribe();
        self.tasks.spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                let started = Instant::now();
                tokio::select! {
                    status = child.wait() => {
                        let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                        if started.elapsed() > Duration::from_secs(60) {
                            backoff = Duration::from_secs(1);
                        }
                        eprintln!("{name} exited ({status}); restarting it in {}s", backoff.as_secs());
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.changed() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        match spawn() {
                            Ok(c) => child = c,
                            Err(e) => {
                                eprintln!("{name}: cannot start again: {e}");
                                return;
                            }
                        }
                    }
                    _ = stop.changed() => {
                        stop_child(&name, &mut child).await;
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// SIGTERM to every process, SIGKILL to those still running ten seconds later.
    async fn stop_all(&mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// SIGTERM to `child`, SIGKILL if it is still running ten seconds later.
async fn stop_child(name: &str, child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signals a child the caller owns and has not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        eprintln!("{name} did not stop in time; killing it");
        let _ = child.kill().await;
    }
}

/// Runs the stack until Ctrl-C or until the gateway dies; a replica that dies is restarted.
pub async fn run(args: StackArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let gateway = match &args.gateway {
        Some(g) => g.clone(),
        None => exe.with_file_name("gateway"),
    };
    if !gateway.is_file() {
        bail!(
            "no gateway binary at {} (build it with `cargo build -p gateway`, or pass --gateway)",
            gateway.display()
        );
    }
    if !args.config.is_file() {
        bail!("no gateway configuration at {}", args.config.display());
    }
    let logs = args.data.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let data = std::fs::canonicalize(&args.data)?;

    // Every replica's address, by service name.
    let mut table: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
    for (_, dns_name, _, octet) in SERVICES {
        let mut ips = Vec::new();
        for n in 1..=args.replicas {
            let ip: Ipv4Addr = format!("{}.{octet}.{n}", args.net)
                .parse()
                .with_context(|| {
                    format!(
                        "--net {}: not the first two octets of an IPv4 address",
                        args.net
                    )
                })?;
            if !ip.is_loopback() {
                bail!("--net {}: replicas must be on 127.x.x.x", args.net);
            }
            ips.push(ip);
        }
        table.insert(dns_name.to_string(), ips);
    }
    let dns = start_dns(Arc::new(table.clone())).await?;

    let mut children = Children::new();
    let started = tokio::select! {
        started = start_all(&args, &exe, &gateway, &data, &logs, &table, dns, &mut children) => started,
        _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    let outcome = match started {
        Ok(()) => supervise(&args, &table, &data, &mut children).await,
        Err(e) => Err(e),
    };
    children.stop_all().await;
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn start_all(
    args: &StackArgs,
    exe: &Path,
    gateway: &Path,
    data: &Path,
    logs: &Path,
    table: &HashMap<String, Vec<Ipv4Addr>>,
    dns: SocketAddr,
    children: &mut Children,
) -> anyhow::Result<()> {
    let shared_db = std::env::var("DATABASE_URL").ok();
    for (service, dns_name, port, _) in SERVICES {
        let db = shared_db
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/{service}.db?mode=rwc", data.display()));
        for (i, ip) in table[*dns_name].iter().enumerate() {
            let name = format!("{dns_name}-{}", i + 1);
            let log_path = logs.join(format!("{name}.log"));
            std::fs::File::create(&log_path)?;
            let (exe, db, service, listen) = (
                exe.to_path_buf(),
                db.clone(),
                *service,
                format!("{ip}:{port}"),
            );
            let spawn = move || {
                // Appended to across restarts.
                let log = std::fs::OpenOptions::new().append(true).open(&log_path)?;
                Command::new(&exe)
                    .arg(service)
                    .arg("--listen")
                    .arg(&listen)
                    .env("DATABASE_URL", &db)
                    // Services call each other by name (orders → products, payments →
                    // orders) through the stack's DNS, as in Compose.
                    .env("DNS_SERVER", dns.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
            };
            children.adopt_restarting(name, spawn)?;
            if i == 0 {
                // The first replica creates the schema (and the user service its signing key);
                // the others start once it is up and find them in place.
                wait_http(
                    SocketAddr::new((*ip).into(), *port),
                    "/health",
                    Duration::from_secs(30),
                )
                .await
                .with_context(|| format!("{dns_name} did not come up; see {}", logs.display()))?;
            }
        }
    }
    // A development CA and a certificate for localhost, made by the gateway itself.
    let certs = data.join("certs");
    let made = Command::new(gateway)
        .arg("certs")
        .arg("--dir")
        .arg(&certs)
        .args(["localhost", "127.0.0.1"])
        .stdout(Stdio::null())
        .output()
        .await
        .context("making development certificates")?;
    if !made.status.success() {
        bail!(
            "gateway certs failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    let log = std::fs::File::create(logs.join("gateway.log"))?;
    let child = Command::new(gateway)
        .arg("run")
        .arg("-c")
        .arg(&args.config)
        .env("GATEWAY_HTTP", args.http.to_string())
        .env("GATEWAY_HTTPS", args.https.to_string())
        .env("GATEWAY_CERT", certs.join("localhost.pem"))
        .env("GATEWAY_KEY", certs.join("localhost-key.pem"))
        .env("GATEWAY_ADMIN", args.admin.to_string())
        .env("GATEWAY_DNS", dns.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the gateway")?;
    children.adopt("gateway".into(), child);
    wait_http(args.admin, "/ready", Duration::from_secs(30))
        .await
        .context("the gateway did not become ready; see its log")?;
    // Ready once every service answers through the gateway.
    for path in ["/api/products?limit=1", "/.well-known/jwks.json"] {
        wait_http(args.http, path, Duration::from_secs(30))
            .await
            .with_context(|| format!("{path} is not answered through the gateway"))?;
    }
    Ok(())
}

async fn supervise(
    args: &StackArgs,
    table: &HashMap<String, Vec<Ipv4Addr>>,
    data: &Path,
    children: &mut Children,
) -> anyhow::Result<()> {
    let base = format!("http://{}", args.http);
    println!("Stack is up.");
    println!(
        "  gateway          {base}   (admin: http://{}/ready)",
        args.admin
    );
    println!(
        "                   https://localhost:{}   (curl --cacert {})",
        args.https.port(),
        data.join("certs/ca.pem").display()
    );
    for (_, dns_name, port, _) in SERVICES {
        let replicas: Vec<String> = table[*dns_name]
            .iter()
            .map(|ip| format!("{ip}:{port}"))
            .collect();
        println!("  {dns_name:<16} {}", replicas.join("  "));
    }
    println!("  data and logs    {}", data.display());
    println!();
    println!("Try:");
    println!("  curl -s '{base}/api/products?limit=2&category=gear'");
    println!("  curl -s -X POST {base}/api/users/register -H 'content-type: application/json' \\");
    println!("       -d '{{\"email\":\"ada@example.com\",\"password\":\"correct horse\",\"firstName\":\"Ada\",\"lastName\":\"Lovelace\"}}'");
    println!("  curl -s -X POST {base}/api/users/login -H 'content-type: application/json' \\");
    println!("       -d '{{\"email\":\"ada@example.com\",\"password\":\"correct horse\"}}'");
    println!();
    println!("Ctrl-C stops everything.");

    // Wait for Ctrl-C, or for any process to exit on its own.
    tokio::select! {
        _ = shutdown_signal() => {
            println!("Stopping.");
            Ok(())
        }
        Some(what) = children.exited.recv() => bail!("{what}; stopping the stack"),
    }
}

/// Answers A queries for the service names with their replicas (NXDOMAIN for other names),
/// on a free UDP port of 127.0.0.1.
async fn start_dns(table: Arc<HashMap<String, Vec<Ipv4Addr>>>) -> anyhow::Result<SocketAddr> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = sock.local_addr()?;
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, src)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let Some(reply) = dns_answer(&table, &buf[..n]) else {
                continue;
            };
            let _ = sock.send_to(&reply, src).await;
        }
    });
    Ok(addr)
}

fn dns_answer(table: &HashMap<String, Vec<Ipv4Addr>>, query: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    let mut resp = Message::new();
    resp.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(true)
        .add_queries(req.queries().to_vec());
    let mut known = false;
    for q in req.queries() {
        let name = q.name().to_ascii().trim_end_matches('.').to_lowercase();
        if let Some(ips) = table.get(&name) {
            known = true;
            if q.query_type() == RecordType::A {
                for ip in ips {
                    resp.add_answer(Record::from_rdata(q.name().clone(), 5, RData::A(A(*ip))));
                }
            }
        }
    }
    if !known {
        resp.set_response_code(ResponseCode::NXDomain);
    }
    resp.to_vec().ok()
}

/// Polls `GET path` on `addr` until it answers 200.
async fn wait_http(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get(addr, path).await {
            Ok((200, _)) => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok((status, body)) => bail!("GET http://{addr}{path}: {status} {body}"),
            Err(e) => bail!("GET http://{addr}{path}: {e}"),
        }
    }
}

/// A minimal HTTP/1.0 GET: status and body. Enough for health checks, without a client library.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: services-healthcheck\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.take(1 << 20).read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .context("timed out")??;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .context("not an HTTP response")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_answers_service_names_with_their_replicas() {
        use hickory_proto::op::Query;
        use hickory_proto::rr::Name;
        let mut table = HashMap::new();
        table.insert(
            "user-service".to_string(),
            vec![Ipv4Addr::new(127, 0, 1, 1), Ipv4Addr::new(127, 0, 1, 2)],
        );
        let ask = |name: &str| {
            let mut m = Message::new();
            m.set_id(7)
                .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            Message::from_vec(&dns_answer(&table, &m.to_vec().unwrap()).unwrap()).unwrap()
        };
        let r = ask("user-service.");
        assert_eq!(r.id(), 7);
        assert_eq!(r.answers().len(), 2);
        assert_eq!(ask("nobody.").response_code(), ResponseCode::NXDomain);
        assert!(dns_answer(&table, b"garbage").is_none());
    }
}
