//! ACME: certificates obtained, stored, renewed and shared, against a real ACME server
//! (Pebble, Let's Encrypt's test server, from Debian's `pebble` package) that resolves the
//! names through the tests' DNS server and validates against the gateway's listeners.

mod common;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running Pebble with its own CA for its API, validating on `http_port` / `tls_port`.
struct Pebble {
    child: Child,
    dir: tempfile::TempDir,
    /// The directory URL.
    directory: String,
    management: SocketAddr,
    /// PEM of the root the API's certificate chains to (the gateway's `acme.ca`).
    api_ca: PathBuf,
}

/// Pebble's settings for one test.
struct PebbleSettings<'a> {
    http_port: u16,
    tls_port: u16,
    dns: SocketAddr,
    /// Lifetime of the certificates it issues, seconds.
    validity: u64,
    /// External account binding keys (kid, base64url key); required when any.
    eab: &'a [(&'a str, &'a str)],
}

impl Pebble {
    fn start(s: PebbleSettings<'_>) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        certs(dir.path(), &["127.0.0.1"]);
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        let management: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        let keys: serde_json::Map<String, serde_json::Value> = s
            .eab
            .iter()
            .map(|(kid, key)| (kid.to_string(), serde_json::Value::from(*key)))
            .collect();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": listen.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": dir.path().join("127.0.0.1.pem"),
                "privateKey": dir.path().join("127.0.0.1-key.pem"),
                "httpPort": s.http_port,
                "tlsPort": s.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": !s.eab.is_empty(),
                "externalAccountMACKeys": keys,
                "certificateValidityPeriod": s.validity,
            }
        });
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(s.dns.to_string())
            // Validate at once, and never reuse an earlier validation: every order is proven.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pebble (Debian package `pebble`; scripts/test installs it)");
        let pebble = Pebble {
            child,
            api_ca: dir.path().join("ca.pem"),
            directory: format!("https://{listen}/dir"),
            management,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(
                Instant::now() < deadline,
                "pebble did not start:\n{}",
                pebble.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pebble
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// The root Pebble issues under (made anew at each start), from its management API.
    fn issuing_root(&self) -> Vec<CertificateDer<'static>> {
        let out = Command::new("curl")
            .args(["-sf", "--cacert"])
            .arg(&self.api_ca)
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .unwrap();
        assert!(out.status.success(), "pebble roots: {out:?}");
        rustls_pemfile::certs(&mut out.stdout.as_slice())
            .map(Result::unwrap)
            .collect()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one verified HTTPS request saw: the leaf's SHA-256 and the response.
struct Seen {
    leaf: CertificateDer<'static>,
    response: String,
}

impl Seen {
    fn fingerprint(&self) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, self.leaf.as_ref())
            .as_ref()
            .to_vec()
    }

    fn issuer(&self) -> String {
        let (_, c) = x509_parser::parse_x509_certificate(self.leaf.as_ref()).unwrap();
        c.issuer().to_string()
    }
}

/// A TLS connection to `addr` for `sni`, verified against `roots`.
async fn connect(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))
}

/// `GET /acme-test` on `addr` for `sni` over TLS, verified against `roots`.
async fn https_get(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
) -> Result<Seen, String> {
    https_get_path(addr, sni, roots, "/acme-test").await
}

/// [`https_get`] for `path`.
async fn https_get_path(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
    path: &str,
) -> Result<Seen, String> {
    let mut tls = connect(addr, sni, roots).await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    Ok(Seen {
        leaf,
        response: String::from_utf8_lossy(&out).into_owned(),
    })
}

/// A TLS-ALPN-01 validation handshake for `sni` (ALPN `acme-tls/1` only, no verification
/// beyond recording the certificate): the leaf, and what the server sent after the handshake.
async fn validation_handshake(addr: SocketAddr, sni: &str) -> (CertificateDer<'static>, Vec<u8>) {
    let mut tls = unverified_handshake(addr, sni, &[b"acme-tls/1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the validation connection stayed open");
    (leaf, rest)
}

/// A verified HTTPS keep-alive connection.
struct KeptAlive {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    host: String,
}

impl KeptAlive {
    async fn open(addr: SocketAddr, sni: &str, roots: &[CertificateDer<'static>]) -> KeptAlive {
        let tls = connect(addr, sni, roots).await.unwrap();
        KeptAlive {
            tls,
            host: sni.to_string(),
        }
    }

    /// One request on the connection; the whole response (its length given by
    /// `Content-Length`).
    async fn get(&mut self) -> String {
        let head = format!("GET /acme-test HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.tls.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = self.tls.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap();
            if got.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

/// Waits up to `limit` for a verified certificate on `addr` for `sni`.
async fn wait_for_cert(
    gw: &Gateway,
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
    limit: Duration,
) -> Seen {
    let deadline = Instant::now() + limit;
    loop {
        match https_get(addr, sni, roots).await {
            Ok(seen) => return seen,
            Err(e) if Instant::now() > deadline => {
                panic!("no certificate for {sni}: {e}\ngateway log:\n{}", gw.log())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Two free ports on every IP in `ips`: the plain and TLS ports Pebble validates on.
fn validation_ports(ips: &[&str]) -> (u16, u16) {
    let pick = || loop {
        let port = free_port(ips[0]);
        if ips
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    };
    (pick(), pick())
}

/// One test's world: a backend, the DNS server answering `names` with the first of `ips`,
/// Pebble validating on two ports free on every one of `ips`, an empty storage folder.
struct Scene {
    backend: Backend,
    _dns: Dns,
    pebble: Pebble,
    storage: tempfile::TempDir,
    /// The ports Pebble validates on: HTTP-01 and TLS-ALPN-01.
    http: u16,
    https: u16,
    /// Pebble's issuing root.
    roots: Vec<CertificateDer<'static>>,
    /// A configuration with one route to the backend.
    body: String,
}

impl Scene {
    async fn start(ips: &[&str], names: &[&str], validity: u64, eab: &[(&str, &str)]) -> Scene {
        let backend = Backend::start("127.0.0.1", "b").await;
        let dns = Dns::start().await;
        for name in names {
            dns.set(name, &ips[..1]);
        }
        let (http, https) = validation_ports(ips);
        let pebble = Pebble::start(PebbleSettings {
            http_port: http,
            tls_port: https,
            dns: dns.addr,
            validity,
            eab,
        });
        Scene {
            roots: pebble.issuing_root(),
            body: one_route_to(&backend, ""),
            backend,
            _dns: dns,
            pebble,
            storage: tempfile::tempdir().unwrap(),
            http,
            https,
        }
    }

    /// `acme:` settings for `domains` against Pebble, with `extra` (`, key: value` pairs).
    fn acme(&self, domains: &str, extra: &str) -> String {
        format!(
            "acme: {{ directory: \"{}\", ca: \"{}\", email: ops@example.com, domains: [{domains}], storage: \"{}\"{extra} }}",
            self.pebble.directory,
            self.pebble.api_ca.display(),
            self.storage.path().display()
        )
    }

    /// The TLS listener's address on `ip`.
    fn tls_addr(&self, ip: &str) -> SocketAddr {
        format!("{ip}:{}", self.https).parse().unwrap()
    }

    /// Listener lines on `ip`: a plain one, and a TLS one with `tls` settings.
    fn listeners(&self, ip: &str, tls: &str) -> String {
        format!(
            "  acme_http: {{ address: \"{ip}:{}\" }}\n  https: {{ address: \"{ip}:{}\", tls: {{ {tls} }} }}\n",
            self.http, self.https
        )
    }

    /// A gateway with `listeners` and the route to the backend.
    async fn gateway(&self, listeners: &str) -> Gateway {
        Gateway::start_with("", listeners, &self.body).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_certificate_is_obtained_served_stored_and_reused_after_a_restart() {
    let scene = Scene::start(&["127.0.0.1"], &["a.acme.test"], 3600, &[]).await;
    let tls = scene.acme("a.acme.test", ", challenge: http-01");
    let listeners = scene.listeners("127.0.0.1", &tls);
    let gw = scene.gateway(&listeners).await;
    let (backend, storage, body, roots) =
        (&scene.backend, &scene.storage, &scene.body, &scene.roots);
    let (addr, http) = (scene.tls_addr("127.0.0.1"), scene.http);
    let seen = wait_for_cert(&gw, addr, "a.acme.test", roots, Duration::from_secs(30)).await;
    assert!(
        seen.response.starts_with("HTTP/1.1 200"),
        "{}",
        seen.response
    );
    assert!(seen.issuer().contains("Pebble"), "{}", seen.issuer());
    let orders = "gateway_acme_orders_total{kind=\"new\",listener=\"https\",result=\"issued\"}";
    assert_eq!(gw.metric(orders).await, 1.0);
    let log = gw.log();
    assert!(
        log.contains("ACME certificate issued") && log.contains("a.acme.test"),
        "{log}"
    );
    // Shown with its source, and in the expiry metric the alert reads.
    let certs = gw.admin_json("/certificates").await;
    let listed = &certs["listeners"]["https"][0];
    assert_eq!(listed["source"], "acme", "{certs}");
    assert_eq!(listed["names"][0], "a.acme.test");
    let expiry = gw
        .metric("gateway_tls_certificate_expiry_timestamp_seconds{listener=\"https\",name=\"a.acme.test\"}")
        .await;
    assert_eq!(expiry as i64, listed["not_after"].as_i64().unwrap());
    // The private keys on disk are the owner's alone.
    for entry in walk(storage.path()) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        if name == "certificate.pem" || name.ends_with(".json") {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&entry).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", entry.display());
        }
    }
    // A challenge token the gateway did not publish is routed as any other path (a backend
    // may run its own ACME client for other names).
    let hits = backend.hits();
    let r = client()
        .get(format!(
            "http://127.0.0.1:{http}/.well-known/acme-challenge/unknown"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(backend.hits(), hits + 1);
    // A published one is answered on the plain listener only; over TLS it is routed.
    let published = storage.path().join("challenges/http-01/published-token");
    std::fs::create_dir_all(published.parent().unwrap()).unwrap();
    std::fs::write(&published, "published-token.thumbprint").unwrap();
    let path = "/.well-known/acme-challenge/published-token";
    let r = client()
        .get(format!("http://127.0.0.1:{http}{path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "published-token.thumbprint");
    assert_eq!(backend.hits(), hits + 1);
    let over_tls = https_get_path(addr, "a.acme.test", roots, path)
        .await
        .unwrap();
    assert!(over_tls.response.starts_with("HTTP/1.1 200"));
    assert!(
        !over_tls.response.contains("thumbprint"),
        "{}",
        over_tls.response
    );
    assert_eq!(backend.hits(), hits + 2);
    // A reload that keeps `acme` keeps the certificate and orders nothing.
    gw.write_config(&format!("{body}# reloaded\n"));
    gw.wait_generation(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = https_get(addr, "a.acme.test", roots).await.unwrap();
    assert_eq!(after.fingerprint(), seen.fingerprint());
    assert_eq!(gw.metric(orders).await, 1.0);
    // The same manager: a new one would have logged that it served the stored certificate.
    assert!(!gw.log().contains("served from storage"), "{}", gw.log());
    drop(gw);

    // A restart serves the stored certificate at once and orders nothing.
    let gw = Gateway::start_with("", &listeners, body).await;
    let again = https_get(addr, "a.acme.test", roots).await.unwrap();
    assert_eq!(again.fingerprint(), seen.fingerprint());
    assert_eq!(gw.metric(orders).await, 0.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.metric(orders).await, 0.0, "{}", gw.log());
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_with_account_binding_and_a_file_certificate_winning_for_its_name() {
    const KID: &str = "kid-1";
    const KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let names = ["b.acme.test", "c.acme.test"];
    let scene = Scene::start(&["127.0.0.1"], &names, 3600, &[(KID, KEY)]).await;
    let files = tempfile::tempdir().unwrap();
    certs(files.path(), &["files.acme.test"]);
    let acme = scene.acme(
        "b.acme.test, c.acme.test",
        &format!(", challenge: tls-alpn-01, eab: {{ kid: {KID}, hmac_key: {KEY} }}"),
    );
    let tls = format!(
        "certificates: [ {{ cert: \"{0}/files.acme.test.pem\", key: \"{0}/files.acme.test-key.pem\" }} ], {acme}",
        files.path().display(),
    );
    // No plain listener is needed for TLS-ALPN-01.
    let addr = scene.tls_addr("127.0.0.1");
    let gw = scene
        .gateway(&format!(
            "  https: {{ address: \"{addr}\", tls: {{ {tls} }} }}\n"
        ))
        .await;
    let (storage, body, roots) = (&scene.storage, &scene.body, &scene.roots);
    let b = wait_for_cert(&gw, addr, "b.acme.test", roots, Duration::from_secs(30)).await;
    assert!(b.response.starts_with("HTTP/1.1 200"), "{}", b.response);
    // One certificate for both names.
    let c = https_get(addr, "c.acme.test", roots).await.unwrap();
    assert_eq!(c.fingerprint(), b.fingerprint());
    // The file certificate answers for its own name, ACME for the rest.
    let dev_ca: Vec<CertificateDer<'static>> = rustls_pemfile::certs(
        &mut std::fs::read(files.path().join("ca.pem"))
            .unwrap()
            .as_slice(),
    )
    .map(Result::unwrap)
    .collect();
    let f = https_get(addr, "files.acme.test", &dev_ca).await.unwrap();
    assert!(
        f.issuer().contains("gateway development CA"),
        "{}",
        f.issuer()
    );
    let sources: Vec<String> = gw.admin_json("/certificates").await["listeners"]["https"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["source"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sources, ["file", "acme"]);
    // A validation handshake (ALPN acme-tls/1) gets the challenge certificate published in the
    // shared folder, and the connection ends with the handshake.
    let published = storage.path().join("challenges/tls-alpn-01/c.acme.test");
    std::fs::create_dir_all(published.parent().unwrap()).unwrap();
    std::fs::write(&published, "token.thumbprint").unwrap();
    let (leaf, rest) = validation_handshake(addr, "c.acme.test").await;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
        .expect("acmeIdentifier extension");
    assert!(ext.critical);
    let digest = ring::digest::digest(&ring::digest::SHA256, b"token.thumbprint");
    assert!(ext.value.ends_with(digest.as_ref()));
    assert!(rest.is_empty());
    // Only the listener's own names get one.
    std::fs::write(
        storage.path().join("challenges/tls-alpn-01/other.test"),
        "token.thumbprint",
    )
    .unwrap();
    assert!(unverified_handshake(addr, "other.test", &[b"acme-tls/1"])
        .await
        .is_err());

    // A reload without `acme` stops serving its certificate: the file one answers.
    let without = gw.config_text(body).replace(&format!(", {acme}"), "");
    gw.write_raw_config(&without);
    gw.wait_generation(2).await;
    assert!(https_get(addr, "b.acme.test", roots).await.is_err());
    let served = served_leaf(addr, "b.acme.test").await;
    let (_, served) = x509_parser::parse_x509_certificate(served.as_ref()).unwrap();
    assert!(
        served.subject().to_string().contains("files.acme.test"),
        "{}",
        served.subject()
    );
    let sources = gw.admin_json("/certificates").await["listeners"]["https"].clone();
    assert_eq!(sources.as_array().unwrap().len(), 1, "{sources}");
    assert_eq!(sources[0]["source"], "file");
    // (Pebble here refuses accounts without a binding: the certificate shows it was bound.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_swaps_the_certificate_without_a_failed_handshake() {
    // 30 s certificates: renewed once a third of that is left.
    let scene = Scene::start(&["127.0.0.1"], &["r.acme.test"], 30, &[]).await;
    let tls = scene.acme("r.acme.test", "");
    let gw = scene.gateway(&scene.listeners("127.0.0.1", &tls)).await;
    let (addr, roots) = (scene.tls_addr("127.0.0.1"), &scene.roots);
    let first = wait_for_cert(&gw, addr, "r.acme.test", roots, Duration::from_secs(30)).await;
    // A keep-alive connection opened on the first certificate...
    let mut kept = KeptAlive::open(addr, "r.acme.test", roots).await;
    assert!(kept.get().await.starts_with("HTTP/1.1 200"));
    // ...and a client connecting back to back until a new certificate comes: no failure.
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut handshakes, mut renewed) = (0, None);
    while Instant::now() < deadline {
        let seen = https_get(addr, "r.acme.test", roots)
            .await
            .unwrap_or_else(|e| panic!("after {handshakes} handshakes: {e}\n{}", gw.log()));
        assert!(
            seen.response.starts_with("HTTP/1.1 200"),
            "{}",
            seen.response
        );
        handshakes += 1;
        if seen.fingerprint() != first.fingerprint() {
            renewed = Some(seen);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(renewed.is_some(), "not renewed; log:\n{}", gw.log());
    // The connection opened before the swap carries on.
    assert!(kept.get().await.starts_with("HTTP/1.1 200"));
    assert!(handshakes > 10, "{handshakes}");
    let renewals =
        "gateway_acme_orders_total{kind=\"renewal\",listener=\"https\",result=\"issued\"}";
    assert_eq!(gw.metric(renewals).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_renewals_keep_the_old_certificate_are_counted_and_back_off_across_restarts() {
    // 40 s certificates; `renew_before` is longer than half that, so the renewal comes at
    // half, 20 s in, not 5 s.
    let mut scene = Scene::start(&["127.0.0.1"], &["f.acme.test"], 40, &[]).await;
    let tls = scene.acme("f.acme.test", ", renew_before: 35s, retry_interval: 1m");
    let listeners = scene.listeners("127.0.0.1", &tls);
    let gw = scene.gateway(&listeners).await;
    let (addr, roots) = (scene.tls_addr("127.0.0.1"), scene.roots.clone());
    let first = wait_for_cert(&gw, addr, "f.acme.test", &roots, Duration::from_secs(30)).await;
    // The ACME server goes away; the renewal fails.
    scene.pebble.stop();
    let failures = "gateway_acme_failures_total{listener=\"https\",reason=\"account\"}";
    let deadline = Instant::now() + Duration::from_secs(40);
    while gw.metric(failures).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no failure counted:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed = "gateway_acme_orders_total{kind=\"renewal\",listener=\"https\",result=\"failed\"}";
    assert_eq!(gw.metric(failed).await, 1.0);
    // The old certificate keeps serving.
    let seen = https_get(addr, "f.acme.test", &roots).await.unwrap();
    assert_eq!(seen.fingerprint(), first.fingerprint());
    assert!(gw.log().contains("ACME order failed"), "{}", gw.log());
    // The next try waits out the backoff (1 minute), here and in a restarted instance: no
    // order storm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gw.metric(failures).await, 1.0);
    drop(gw);
    let gw = scene.gateway(&listeners).await;
    let seen = https_get(addr, "f.acme.test", &roots).await.unwrap();
    assert_eq!(seen.fingerprint(), first.fingerprint());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let any_order = gw.metric(failed).await
        + gw.metric(
            "gateway_acme_orders_total{kind=\"renewal\",listener=\"https\",result=\"issued\"}",
        )
        .await;
    assert_eq!(any_order, 0.0, "{}", gw.log());
    let state = walk(scene.storage.path())
        .into_iter()
        .find(|p| p.ends_with("state.json"))
        .unwrap();
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
    assert_eq!(state["failures"], 1, "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_storage_order_once_and_both_serve_it() {
    // Validation reaches the first instance only, whichever of the two orders.
    let scene = Scene::start(&["127.0.0.2", "127.0.0.3"], &["s.acme.test"], 3600, &[]).await;
    let tls = scene.acme("s.acme.test", ", challenge: http-01");
    let (a_listeners, b_listeners) = (
        scene.listeners("127.0.0.2", &tls),
        scene.listeners("127.0.0.3", &tls),
    );
    // The first up, so that validation finds it bound whichever orders.
    let a = scene.gateway(&a_listeners).await;
    let b = scene.gateway(&b_listeners).await;
    let (storage, roots, http) = (&scene.storage, &scene.roots, scene.http);
    let (a_addr, b_addr) = (scene.tls_addr("127.0.0.2"), scene.tls_addr("127.0.0.3"));
    let from_a = wait_for_cert(&a, a_addr, "s.acme.test", roots, Duration::from_secs(30)).await;
    let from_b = wait_for_cert(&b, b_addr, "s.acme.test", roots, Duration::from_secs(30)).await;
    assert_eq!(from_a.fingerprint(), from_b.fingerprint());
    let orders = "gateway_acme_orders_total{kind=\"new\",listener=\"https\",result=\"issued\"}";
    let total = a.metric(orders).await + b.metric(orders).await;
    assert_eq!(total, 1.0, "A:\n{}\nB:\n{}", a.log(), b.log());
    // Whichever instance orders, the other answers the validation that reaches it from the
    // shared folder: a key authorization published there is answered by both.
    let token = "shared-token_1";
    let path = storage.path().join("challenges/http-01").join(token);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "shared-token_1.thumbprint").unwrap();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let url = format!("http://{ip}:{http}/.well-known/acme-challenge/{token}");
        let r = client().get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "shared-token_1.thumbprint");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_validation_is_counted_with_the_servers_cause() {
    // The name does not resolve: Pebble cannot validate it and refuses the order.
    let scene = Scene::start(&["127.0.0.1"], &[], 3600, &[]).await;
    let tls = scene.acme("nowhere.acme.test", ", challenge: http-01");
    let gw = scene.gateway(&scene.listeners("127.0.0.1", &tls)).await;
    let failures = "gateway_acme_failures_total{listener=\"https\",reason=\"challenge\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.metric(failures).await < 1.0 {
        assert!(Instant::now() < deadline, "no failure:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_failed = "gateway_acme_orders_total{kind=\"new\",listener=\"https\",result=\"failed\"}";
    assert_eq!(gw.metric(new_failed).await, 1.0);
    // The log line names the server's cause, and with no certificate to serve it is an ERROR.
    let line = gw.log_line("ACME order failed");
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("names=nowhere.acme.test"), "{line}");
    assert!(line.contains("could not resolve"), "{line}");
    assert!(https_get(
        scene.tls_addr("127.0.0.1"),
        "nowhere.acme.test",
        &scene.roots
    )
    .await
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_the_folder_cannot_record_still_waits_its_backoff() {
    // 20 s certificates, renewed at half their lifetime.
    let mut scene = Scene::start(&["127.0.0.1"], &["u.acme.test"], 20, &[]).await;
    let tls = scene.acme("u.acme.test", ", renew_before: 15s, retry_interval: 1m");
    let gw = scene.gateway(&scene.listeners("127.0.0.1", &tls)).await;
    let (addr, roots) = (scene.tls_addr("127.0.0.1"), scene.roots.clone());
    wait_for_cert(&gw, addr, "u.acme.test", &roots, Duration::from_secs(30)).await;
    // The order state cannot be written (a folder where its file goes; permissions would not
    // stop a root process), and the ACME server goes away.
    let state = walk(scene.storage.path())
        .into_iter()
        .find(|p| p.ends_with("state.json"))
        .unwrap();
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("blocker"), "").unwrap();
    scene.pebble.stop();
    let failures = "gateway_acme_failures_total{listener=\"https\",reason=\"account\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.metric(failures).await < 1.0 {
        assert!(Instant::now() < deadline, "no failure:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gw.log().contains("ACME storage not writable"),
        "{}",
        gw.log()
    );
    // The backoff holds in memory: no second order.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gw.metric(failures).await, 1.0, "{}", gw.log());
}

/// A TCP relay in front of Pebble's API. Connections accepted while it holds are never
/// forwarded (a CA that stops answering in the middle of an order); it counts those.
struct Relay {
    addr: SocketAddr,
    hold: Arc<std::sync::atomic::AtomicBool>,
    held: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (on, count) = (hold.clone(), held.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if on.load(std::sync::atomic::Ordering::SeqCst) {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Read and dropped until the client goes: never answered, never closed.
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16384];
                        while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
                    });
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Relay {
            addr,
            hold,
            held,
            task,
        }
    }

    /// Holds the connections accepted from now on, or none.
    fn hold(&self, on: bool) {
        self.hold.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections it holds.
    fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_replaced_mid_order_gives_way_to_its_successor() {
    let scene = Scene::start(&["127.0.0.1"], &["r.acme.test"], 3600, &[]).await;
    let api: SocketAddr = scene
        .pebble
        .directory
        .trim_start_matches("https://")
        .trim_end_matches("/dir")
        .parse()
        .unwrap();
    // Pebble writes its URLs for the host it was asked by: the whole order goes through the
    // relay.
    let relay = Relay::start(api).await;
    relay.hold(true);
    let tls = scene.acme("r.acme.test", ", challenge: http-01").replace(
        &scene.pebble.directory,
        &format!("https://{}/dir", relay.addr),
    );
    let gw = scene.gateway(&scene.listeners("127.0.0.1", &tls)).await;
    // The first manager holds the storage folder's lock, its connection to the CA stuck in
    // the TLS handshake.
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.held() == 0 {
        assert!(Instant::now() < deadline, "no order began:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A reload that changes the plan (the account's e-mail) replaces the manager mid-order;
    // the successor orders under the same lock, which the first lets go of only by abandoning
    // its order.
    // (The held connection stays held; the successor's go through.)
    relay.hold(false);
    let changed = gw
        .config_text(&scene.body)
        .replace("ops@example.com", "ops2@example.com");
    assert_ne!(changed, gw.config_text(&scene.body));
    gw.write_raw_config(&changed);
    gw.wait_generation(2).await;
    let addr = scene.tls_addr("127.0.0.1");
    let seen = wait_for_cert(
        &gw,
        addr,
        "r.acme.test",
        &scene.roots,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        seen.response.starts_with("HTTP/1.1 200"),
        "{}",
        seen.response
    );
    // One order issued, the successor's (the first manager's connection is still held);
    // the abandoned one is counted neither way.
    assert_eq!(relay.held(), 1);
    let log = gw.log();
    let (reloaded, issued) = (
        log.find("configuration reloaded").unwrap(),
        log.find("ACME certificate issued").unwrap(),
    );
    assert!(
        reloaded < issued && log.matches("ACME certificate issued").count() == 1,
        "{log}"
    );
    let orders = |result: &str| {
        format!("gateway_acme_orders_total{{kind=\"new\",listener=\"https\",result=\"{result}\"}}")
    };
    assert_eq!(gw.metric(&orders("issued")).await, 1.0, "{}", gw.log());
    assert_eq!(gw.metric(&orders("failed")).await, 0.0, "{}", gw.log());
    let again = https_get(addr, "r.acme.test", &scene.roots).await.unwrap();
    assert_eq!(again.fingerprint(), seen.fingerprint());
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}
