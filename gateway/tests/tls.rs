//! TLS termination with real TLS clients (rustls, and curl): SNI picks the certificate, a
//! certificate rotated on disk is served to the next handshake and a broken one is refused,
//! HTTP/2 is negotiated by ALPN, TLS 1.1 is refused, HTTP is redirected, HSTS is sent.

mod common;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A verifying client that trusts the development CA: a request for `/x` over TLS, and the
/// ALPN result.
async fn https_get(
    addr: SocketAddr,
    ca: &Path,
    sni: &str,
    alpn: &[&[u8]],
) -> (Option<Vec<u8>>, String) {
    let (alpn, bytes) = https_get_path(addr, ca, sni, alpn, "/x").await;
    (alpn, String::from_utf8_lossy(&bytes).into_owned())
}

/// [`https_get`] for `path`, with the response's bytes.
async fn https_get_path(
    addr: SocketAddr,
    ca: &Path,
    sni: &str,
    alpn: &[&[u8]],
    path: &str,
) -> (Option<Vec<u8>>, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if negotiated.as_deref() == Some(b"h2") {
        return (negotiated, Vec::new());
    }
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    (negotiated, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_every_size_come_whole_over_tls() {
    // The client stream holds a response's head for its body (one send, one record for both
    // when they fit): sizes around what it holds, and around a TLS record, come whole.
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, &["a.test"]);
    let (https, listener) = tls_listener("https", d, &["a.test"], "");
    let _gw = Gateway::start_with("", &listener, &one_route_to(&backend, "")).await;
    let ca = d.join("ca.pem");
    for n in [
        0,
        1,
        3900,
        4096,
        4097,
        16 * 1024,
        16 * 1024 + 1,
        64 * 1024 + 7,
    ] {
        let (_, response) = https_get_path(
            https,
            &ca,
            "a.test",
            &[b"http/1.1"],
            &format!("/bytes?n={n}"),
        )
        .await;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| {
                panic!(
                    "n = {n}: no head in {:?}",
                    String::from_utf8_lossy(&response)
                )
            });
        let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "n = {n}: {head}");
        assert!(
            head.contains(&format!("content-length: {n}\r\n")),
            "n = {n}: {head}"
        );
        assert_eq!(response.len() - split - 4, n, "n = {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_rotation_alpn_versions_redirect_and_hsts() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, &["a.test"]);
    certs(d, &["b.test", "*.wild.test"]);
    let (https, listener) = tls_listener(
        "https",
        d,
        &["a.test", "b.test"],
        ", hsts: \"max-age=600\", reload_interval: 100ms",
    );
    let gw = Gateway::start_with(
        &format!(", redirect_https: {}", https.port()),
        &listener,
        &format!(
            "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\naccess_log: {{ path: \"{}/access.log\" }}\n",
            backend.addr,
            d.display()
        ),
    )
    .await;

    // SNI picks the certificate; an unknown name or none gets the first one.
    assert_eq!(served_names(https, "a.test").await, ["a.test"]);
    assert_eq!(
        served_names(https, "B.TEST").await,
        ["b.test", "*.wild.test"]
    );
    assert_eq!(
        served_names(https, "x.wild.test").await,
        ["b.test", "*.wild.test"]
    );
    assert_eq!(served_names(https, "deeper.x.wild.test").await, ["a.test"]);
    assert_eq!(served_names(https, "unknown.test").await, ["a.test"]);

    // A verified HTTP/1.1 request over TLS, with HSTS; h2 is chosen when offered.
    let ca = d.join("ca.pem");
    let (alpn, response) = https_get(https, &ca, "a.test", &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("strict-transport-security: max-age=600"),
        "{response}"
    );
    assert!(
        response.contains("\"x-forwarded-proto\":\"https\""),
        "{response}"
    );
    let (alpn, _) = https_get(https, &ca, "b.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    // Plain HTTP gets the redirect, not HSTS.
    let no_follow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert!(r.headers().get("strict-transport-security").is_none());

    // The plain listener redirects to the HTTPS port, path and query kept.
    let out = raw_request(
        gw.http,
        b"GET /a/b?c=1 HTTP/1.1\r\nHost: a.test:8080\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 308"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains(&format!(
            "location: https://a.test:{}/a/b?c=1",
            https.port()
        )),
        "{out}"
    );
    // The head checks come first: a request they refuse is refused, not redirected.
    let out = raw_request(
        gw.http,
        b"GET /%00 HTTP/1.1\r\nHost: a.test:8080\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");

    // curl: HTTP/2 over TLS works; TLS 1.1 is refused.
    let url = format!("https://a.test:{}/x", https.port());
    let resolve = format!("a.test:{}:127.0.0.1", https.port());
    let curl = |extra: &[&str]| {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                "--max-time",
                "5",
            ])
            .args(["--resolve", &resolve, "--cacert"])
            .arg(&ca)
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl (scripts/test installs it)")
    };
    let out = curl(&["--http2"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2 200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl(&["--tlsv1.1", "--tls-max", "1.1"]);
    assert!(!out.status.success(), "TLS 1.1 was accepted");
    let out = curl(&["--tlsv1.2", "--tls-max", "1.2"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2 200",
        "TLS 1.2: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Handshakes are counted by version, connections by protocol.
    let metrics = gw.metrics().await;
    for line in [
        "gateway_tls_handshakes_total{listener=\"https\",version=\"TLSv1.3\"}",
        "gateway_tls_handshakes_total{listener=\"https\",version=\"TLSv1.2\"}",
        "gateway_downstream_connections{listener=\"https\",protocol=\"h2\"}",
        "gateway_downstream_connections{listener=\"https\",protocol=\"http/1.1\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    // Series exist from the start; these two have counted.
    for handshakes in ["TLSv1.3", "TLSv1.2"] {
        let series =
            format!("gateway_tls_handshakes_total{{listener=\"https\",version=\"{handshakes}\"}} ");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&series) && !l.ends_with(" 0")),
            "no {handshakes} handshake counted:\n{metrics}"
        );
    }

    // The access log names the version of each TLS request; plain HTTP has none.
    let mut versions = Vec::new();
    for _ in 0..50 {
        let log = std::fs::read_to_string(d.join("access.log")).unwrap_or_default();
        versions = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| {
                (
                    v["path"].as_str().unwrap_or("").to_string(),
                    v["tls"].clone(),
                )
            })
            .collect();
        if versions.iter().any(|(_, tls)| tls == "TLSv1.2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        versions.iter().any(|(_, tls)| tls == "TLSv1.3"),
        "{versions:?}"
    );
    assert!(
        versions.iter().any(|(_, tls)| tls == "TLSv1.2"),
        "{versions:?}"
    );
    assert!(
        versions
            .iter()
            .any(|(path, tls)| path == "/a/b" && tls.is_null()),
        "{versions:?}"
    );

    // Rotation: a new certificate on disk is served to the next handshake.
    let before = std::fs::read(d.join("a.test.pem")).unwrap();
    certs(d, &["a.test", "a2.test"]);
    assert_ne!(before, std::fs::read(d.join("a.test.pem")).unwrap());
    let mut rotated = false;
    for _ in 0..50 {
        if served_names(https, "a.test").await == ["a.test", "a2.test"] {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        rotated,
        "the rotated certificate was not served: {}",
        gw.log()
    );
    assert!(gw.log().contains("certificates reloaded"));

    // A broken key is refused; the certificate in use keeps serving.
    std::fs::write(
        d.join("a.test-key.pem"),
        "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        gw.log().contains("new certificates refused"),
        "{}",
        gw.log()
    );
    assert_eq!(served_names(https, "a.test").await, ["a.test", "a2.test"]);
    let (_, response) = https_get(https, &ca, "a2.test", &[b"http/1.1"]).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_and_bad_tls_config() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, &["server.test"]);
    certs(d, &["client.test"]);
    let client_auth = format!(", client_auth: {{ ca: \"{}/ca.pem\" }}", d.display());
    let (https, listener) = tls_listener("mtls", d, &["server.test"], &client_auth);
    let _gw = Gateway::start_with(
        "",
        &listener,
        &format!(
            "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
            backend.addr
        ),
    )
    .await;
    let url = format!("https://server.test:{}/", https.port());
    let resolve = format!("server.test:{}:127.0.0.1", https.port());
    let curl = |extra: &[&str]| {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                "--resolve",
                &resolve,
                "--cacert",
            ])
            .arg(d.join("ca.pem"))
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    // Without a client certificate the handshake fails; with one signed by the CA it passes.
    assert!(!curl(&[]).status.success());
    let cert = d.join("client.test.pem");
    let key = d.join("client.test-key.pem");
    let out = curl(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `gateway check` refuses unreadable or mismatched pairs, naming the listener.
    let cfg = d.join("bad.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners:\n  https:\n    address: \"127.0.0.1:1\"\n    tls: {{ certificates: [ {{ cert: \"{0}/server.test.pem\", key: \"{0}/client.test-key.pem\" }} ] }}\nupstreams:\n  b: {{ targets: [\"127.0.0.1:1\"] }}\nroutes:\n  - {{ name: r, upstream: b }}\n",
            d.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(gateway_bin())
        .args(["check", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(":4:")
            && err.contains("listeners.https.tls")
            && err.contains("does not belong to"),
        "{err}"
    );
}

/// An HTTPS backend answering `body`, or `tls-backend PATH` without one, with the certificate
/// `NAME.pem` of `dir`.
async fn tls_backend(
    dir: &Path,
    name: &str,
    body: Option<String>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut read(dir.join(format!("{name}.pem"))).as_slice())
            .map(|c| c.unwrap())
            .collect();
    let key =
        rustls_pemfile::private_key(&mut read(dir.join(format!("{name}-key.pem"))).as_slice())
            .unwrap()
            .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let fixed = body.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let text = fixed
                            .clone()
                            .unwrap_or_else(|| format!("tls-backend {}", req.uri().path()));
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(text)),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_upstreams_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    certs(dir.path(), &["backend.test"]);
    certs(other.path(), &["unrelated.test"]);
    let (addr, _task) = tls_backend(dir.path(), "backend.test", None).await;
    let ca = dir.path().join("ca.pem");
    let wrong_ca = other.path().join("ca.pem");
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  good: {{ targets: ["{addr}"], tls: {{ sni: backend.test, ca: "{0}" }}, retries: 0 }}
  wrong_ca: {{ targets: ["{addr}"], tls: {{ sni: backend.test, ca: "{1}" }}, retries: 0 }}
  wrong_name: {{ targets: ["{addr}"], tls: {{ sni: other.test, ca: "{0}" }}, retries: 0 }}
  unverified: {{ targets: ["{addr}"], tls: {{ sni: backend.test, ca: "{1}", verify: false }}, retries: 0 }}
routes:
  - {{ name: good, upstream: good, match: {{ path_prefix: /good }} }}
  - {{ name: wrong_ca, upstream: wrong_ca, match: {{ path_prefix: /wrong-ca }} }}
  - {{ name: wrong_name, upstream: wrong_name, match: {{ path_prefix: /wrong-name }} }}
  - {{ name: unverified, upstream: unverified, match: {{ path_prefix: /unverified }} }}
"#,
        ca.display(),
        wrong_ca.display()
    ))
    .await;
    let c = client();
    let r = c.get(gw.url("/good/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tls-backend /good/x");
    // A certificate from another CA, or for another name, is not accepted.
    assert_eq!(
        c.get(gw.url("/wrong-ca")).send().await.unwrap().status(),
        502
    );
    assert_eq!(
        c.get(gw.url("/wrong-name")).send().await.unwrap().status(),
        502
    );
    // Unless verification is turned off.
    assert_eq!(
        c.get(gw.url("/unverified")).send().await.unwrap().status(),
        200
    );

    // A CA file that is not one is refused at load, with its line.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        format!(
            "listeners:\n  http: {{ address: \"127.0.0.1:1\" }}\nupstreams:\n  u:\n    targets: [\"127.0.0.1:1\"]\n    tls: {{ ca: \"{}\" }}\nroutes:\n  - {{ name: r, upstream: u }}\n",
            dir.path().join("backend.test-key.pem").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(gateway_bin())
        .args(["check", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(":6:") && err.contains("upstreams.u.tls.ca"),
        "{err}"
    );
}

/// sslyze (PyPI) finds the TLS listener compliant with Mozilla's "intermediate" profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslyze_finds_mozilla_intermediate_compliance() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), &["localhost"]);
    let (https, listener) = tls_listener("https", dir.path(), &["localhost"], "");
    let _gw = Gateway::start_with(
        "",
        &listener,
        "upstreams:\n  b: { targets: [\"127.0.0.1:1\"] }\nroutes:\n  - { name: r, upstream: b }\n",
    )
    .await;
    let (ca, target) = (
        dir.path().join("ca.pem"),
        format!("localhost:{}", https.port()),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([
                "-m",
                "sslyze",
                "--mozilla_config=intermediate",
                "--certinfo_ca_file",
            ])
            .arg(&ca)
            .arg(&target)
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("OK - Compliant"),
        "sslyze (scripts/test installs it): {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A JWKS served over HTTPS, verified against the configured CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_over_https() {
    use base64::Engine;
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), &["idp.test"]);
    let other = tempfile::tempdir().unwrap();
    certs(other.path(), &["elsewhere.test"]);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.public_key_raw());
    let jwks = format!(
        r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","alg":"EdDSA","kid":"k1","x":"{x}"}}]}}"#
    );
    let (idp, _task) = tls_backend(dir.path(), "idp.test", Some(jwks)).await;
    // The IdP's name resolves through a DNS server of the test's own.
    let dns = Dns::start().await;
    dns.set("idp.test", &["127.0.0.1"]);
    let gw = Gateway::start(&format!(
        "auth:\n  idp: {{ jwks_url: \"https://idp.test:{0}/jwks\", jwks: {{ ca: \"{1}\" }} }}\n  untrusted: {{ jwks_url: \"https://idp.test:{0}/jwks\", jwks: {{ ca: \"{4}\", timeout: 300ms }} }}\ndns: {{ nameservers: [\"{2}\"] }}\nupstreams:\n  b: {{ targets: [\"{3}\"] }}\nroutes:\n  - {{ name: other, upstream: b, auth: untrusted, match: {{ path_prefix: /other }} }}\n  - {{ name: all, upstream: b, auth: idp }}\n",
        idp.port(),
        dir.path().join("ca.pem").display(),
        dns.addr,
        backend.addr,
        other.path().join("ca.pem").display()
    ))
    .await;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("k1".into());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"sub": "s", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let r = client()
        .get(gw.url("/"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log());
    // The same endpoint checked against a CA that did not sign it gives no keys: 503.
    let r = client()
        .get(gw.url("/other"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted_and_silent_clients_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, &["a.test"]);
    let (https, listener) = tls_listener("https", d, &["a.test"], "");
    let gw = Gateway::start_with(
        "",
        &listener,
        &format!(
            "limits: {{ header_timeout: 1s }}\nupstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\n",
            backend.addr
        ),
    )
    .await;

    // Plain HTTP to the TLS port: refused at once.
    let mut plain = tokio::net::TcpStream::connect(https).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), plain.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "plain HTTP on the TLS port was not refused");

    // A client that connects and never says hello is cut off at the head deadline.
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(https).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a silent TLS client was held past the deadline"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));

    // The listener still works.
    let (_, response) = https_get(https, &d.join("ca.pem"), "a.test", &[b"http/1.1"]).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let metrics = gw.metrics().await;
    for line in [
        "gateway_tls_handshake_errors_total{listener=\"https\",reason=\"malformed\"} 1",
        "gateway_tls_handshake_errors_total{listener=\"https\",reason=\"timeout\"} 1",
        "gateway_tls_handshakes_total{listener=\"https\",version=\"TLSv1.3\"} 1",
    ] {
        assert!(
            metrics.contains(line),
            "{line} missing:\n{metrics}\n{}",
            gw.log()
        );
    }
    // An IP address as SNI (OpenSSL sends one; RFC 6066 forbids it): rustls complains at warn
    // level about each such client, which the gateway keeps out of its log.
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &https.to_string(), "-servername"])
        .arg(https.ip().to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl (scripts/test installs it)");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("TLSv1.3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A client that negotiates HTTP/2 and leaves without its connection preface: Pingora
    // logs an HTTP/2 handshake error for it, which the gateway keeps out of the log too.
    let (alpn, _) = https_get(https, &d.join("ca.pem"), "a.test", &[b"h2"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

    // Failed handshakes are routine on a public port: no error-level log lines for them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!gw.log().contains("handshake error"), "{}", gw.log());
    assert!(!gw.log().contains("Illegal SNI"), "{}", gw.log());
}

/// A reload that changes a listener's certificate and then fails on a later step (the access
/// log cannot be opened) is refused whole: the old certificate is still served, the
/// configuration generation and the routes are unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_fails_after_a_certificate_change_leaves_the_old_one_served() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, &["a.test"]);
    certs(d, &["b.test"]);
    let (https, listener) = tls_listener("https", d, &["a.test"], "");
    let body = |log: &str| {
        format!(
            "upstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b }}\naccess_log: {{ path: \"{log}\" }}\n",
            backend.addr
        )
    };
    let good_log = format!("{}/access.log", d.display());
    let gw = Gateway::start_with("", &listener, &body(&good_log)).await;
    assert_eq!(served_names(https, "b.test").await, ["a.test"]);
    let generation = gw.generation().await;

    // New certificate, and an access log in a directory that does not exist: the file is
    // only opened when the configuration is activated, after the certificates are loaded.
    let bad_log = format!("{}/missing-dir/access.log", d.display());
    let text = gw.config_text(&body(&bad_log)).replace(
        &format!("{}/a.test", d.display()),
        &format!("{}/b.test", d.display()),
    );
    assert!(text.contains("b.test.pem"), "{text}");
    gw.write_raw_config(&text);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("configuration rejected") {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.log().contains("missing-dir"), "{}", gw.log());
    assert_eq!(served_names(https, "b.test").await, ["a.test"]);
    assert_eq!(gw.generation().await, generation);
    let resp = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // The same certificate change with a good file is applied.
    let text = gw.config_text(&body(&good_log)).replace(
        &format!("{}/a.test", d.display()),
        &format!("{}/b.test", d.display()),
    );
    gw.write_raw_config(&text);
    gw.wait_generation(generation + 1).await;
    assert_eq!(served_names(https, "b.test").await, ["b.test"]);
}
