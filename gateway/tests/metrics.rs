//! `/metrics` on the admin listener: what the gateway counts, scraped live and checked by
//! `promtool check metrics`.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// A scrape once every request sent so far has been recorded (requests are counted in the
/// last phase, just after the response went out).
async fn settled(gw: &Gateway) -> String {
    for _ in 0..100 {
        let m = scrape(gw).await;
        if m.contains("\ngateway_requests_in_flight 0\n") {
            return m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("requests stayed in flight");
}

async fn scrape(gw: &Gateway) -> String {
    let r = client()
        .get(format!("http://{}/metrics", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_upstreams_policies_and_reloads_are_counted() {
    let b = Backend::start("127.0.0.1", "b").await;
    let dead = DeadPort::reserve();
    let body = format!(
        r#"
auth:
  hs: {{ secret: "an-hmac-secret-that-is-long-enough-0123456789" }}
rate_limits:
  one: {{ rate: 1/m, burst: 1 }}
upstreams:
  up:
    targets: ["{}", "127.0.0.1:{}"]
    retries: 1
routes:
  - {{ name: open, upstream: up, match: {{ path_prefix: /open }} }}
  - {{ name: limited, upstream: up, rate_limit: one, match: {{ path_prefix: /limited }} }}
  - {{ name: private, upstream: up, auth: hs, match: {{ path_prefix: /private }} }}
"#,
        b.addr, dead.port
    );
    let gw = Gateway::start(&body).await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(c.get(gw.url("/open")).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        c.get(gw.url("/limited")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(gw.url("/limited")).send().await.unwrap().status(),
        429
    );
    assert_eq!(
        c.get(gw.url("/private")).send().await.unwrap().status(),
        401
    );
    assert_eq!(
        c.get(gw.url("/private"))
            .bearer_auth("not.a.token")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.get(gw.url("/no/such/route"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let r = c.post(gw.url("/open")).body("12345").send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Requests are counted in their last phase, just after the response went out.
    let m = settled(&gw).await;
    let dead_replica = format!("127.0.0.1:{}", dead.port);
    let exact: &[(String, f64)] = &[
        (r#"gateway_requests_total{method="GET",route="open",status_class="2xx"}"#.into(), 4.0),
        (r#"gateway_requests_total{method="POST",route="open",status_class="2xx"}"#.into(), 1.0),
        (r#"gateway_requests_total{method="GET",route="limited",status_class="4xx"}"#.into(), 1.0),
        (r#"gateway_requests_total{method="GET",route="(none)",status_class="4xx"}"#.into(), 1.0),
        (r#"gateway_request_duration_seconds_count{method="GET",route="open",status_class="2xx"}"#.into(), 4.0),
        (r#"gateway_request_duration_seconds_count{method="POST",route="open",status_class="2xx"}"#.into(), 1.0),
        (r#"gateway_request_body_bytes_total{route="open"}"#.into(), 5.0),
        (r#"gateway_ratelimit_total{decision="allowed",policy="one"}"#.into(), 1.0),
        (r#"gateway_ratelimit_total{decision="limited",policy="one"}"#.into(), 1.0),
        (r#"gateway_auth_total{policy="hs",result="missing"}"#.into(), 1.0),
        (r#"gateway_auth_total{policy="hs",result="invalid"}"#.into(), 1.0),
        (r#"gateway_auth_refusals_total{policy="hs",reason="malformed"}"#.into(), 1.0),
        (r#"gateway_auth_refusals_total{policy="hs",reason="expired"}"#.into(), 0.0),
        ("gateway_requests_in_flight".into(), 0.0),
        (r#"gateway_upstream_responses_total{status_class="2xx",upstream="up"}"#.into(), 6.0),
        (format!("gateway_upstream_replica_up{{target=\"{}\",upstream=\"up\"}}", b.addr), 1.0),
        (format!("gateway_upstream_replica_up{{target=\"{dead_replica}\",upstream=\"up\"}}"), 0.0),
        (r#"gateway_upstream_duration_seconds_count{upstream="up"}"#.into(), 6.0),
        (r#"gateway_upstream_replicas{state="known",upstream="up"}"#.into(), 2.0),
        (r#"gateway_upstream_replicas{state="healthy",upstream="up"}"#.into(), 1.0),
    ];
    for (series, expected) in exact {
        assert_eq!(value(&m, series), *expected, "{series}");
    }
    // The dead replica: connect errors, retries onto the live one, then ejection.
    for series in [
        r#"gateway_upstream_errors_total{kind="connect",upstream="up"}"#,
        r#"gateway_upstream_retries_total{upstream="up"}"#,
        r#"gateway_upstream_ejections_total{upstream="up"}"#,
    ] {
        assert!(value(&m, series) >= 1.0, "{series}");
    }
    assert_eq!(value(&m, "gateway_config_generation"), 1.0);
    // Labels never carry paths or client data.
    assert!(!m.contains("/no/such/route") && !m.contains("12345"));

    // Reloads are counted, applied and rejected.
    gw.write_config(&format!("{body}\n# changed\n"));
    gw.wait_generation(2).await;
    gw.write_raw_config("listeners: [");
    let mut rejected = 0.0;
    for _ in 0..50 {
        let m = scrape(&gw).await;
        rejected = value(&m, r#"gateway_config_reloads_total{result="rejected"}"#);
        if rejected >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(rejected >= 1.0);
    let m = scrape(&gw).await;
    assert_eq!(
        value(&m, r#"gateway_config_reloads_total{result="applied"}"#),
        1.0
    );
    assert_eq!(value(&m, "gateway_config_generation"), 2.0);
    assert!(value(&m, "gateway_config_last_reload_success_timestamp_seconds") > 1.7e9);

    // promtool accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test installs the prometheus package)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(m.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The alert rules and the Grafana dashboard use only metrics the gateway exports, and
/// promtool accepts the rules and passes their unit tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_assets_match_the_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let b = Backend::start("127.0.0.1", "b").await;
    // Every kind of thing that has metrics: a TLS listener, an auth policy, a rate limit.
    let dir = tempfile::tempdir().unwrap();
    let certs = Command::new(gateway_bin())
        .args(["certs", "--dir"])
        .arg(dir.path())
        .arg("localhost")
        .output()
        .unwrap();
    assert!(certs.status.success());
    // ACME against a directory that refuses connections: its series exist, nothing leaves
    // the machine.
    let dead = DeadPort::reserve();
    let tls = format!(
        "  https: {{ address: \"127.0.0.1:{}\", tls: {{ certificates: [ {{ cert: \"{1}/localhost.pem\", key: \"{1}/localhost-key.pem\" }} ], acme: {{ directory: \"https://127.0.0.1:{2}/dir\", domains: [acme.example.com], storage: \"{1}/acme\" }} }} }}\n",
        free_port("127.0.0.1"),
        dir.path().display(),
        dead.port
    );
    let body = format!(
        "auth:\n  hs: {{ secret: \"an-hmac-secret-that-is-long-enough-0123456789\" }}\nrate_limits:\n  rl: {{ rate: 10/s }}\nupstreams:\n  b: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, upstream: b, auth: hs, rate_limit: rl }}\n",
        b.addr
    );
    let gw = Gateway::start_with("", &tls, &body).await;
    assert_eq!(
        client().get(gw.url("/")).send().await.unwrap().status(),
        401
    );
    let exported: std::collections::BTreeSet<String> = settled(&gw)
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    for file in [
        "monitoring/alerts.yml",
        "monitoring/grafana/dashboards/gateway.json",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut used = std::collections::BTreeSet::new();
        for (i, _) in text.match_indices("gateway_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name)
                .to_string();
            used.insert(family);
        }
        assert!(!used.is_empty(), "{file} uses no gateway metric");
        for name in &used {
            assert!(
                exported.contains(name),
                "{file} uses {name}, which the gateway does not export"
            );
        }
    }
    for args in [
        ["check", "rules", "monitoring/alerts.yml"],
        ["test", "rules", "monitoring/alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The access log (JSON lines, written off the request path), W3C trace context, and the
/// read-only admin views.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_trace_context_and_admin_views() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let b = Backend::start("127.0.0.1", "b").await;
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("access.log");
    let secret = "an-hmac-secret-that-is-long-enough-0123456789";
    let gw = Gateway::start(&format!(
        r#"
access_log: {{ path: "{}" }}
auth:
  hs: {{ secret: "{secret}", forward_claims: {{ sub: X-User-Id }} }}
rate_limits:
  rl: {{ rate: 100/s }}
upstreams:
  b: {{ targets: ["{}"] }}
routes:
  - {{ name: private, upstream: b, auth: hs, rate_limit: rl, match: {{ path_prefix: /private }} }}
  - {{ name: open, upstream: b }}
"#,
        log.display(),
        b.addr
    ))
    .await;
    let c = client();

    // A valid traceparent (and its tracestate) passes unchanged.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = c
        .get(gw.url("/open"))
        .header("traceparent", tp)
        .header("tracestate", "k=v")
        .send()
        .await
        .unwrap();
    let h = echo(r).await["headers"].clone();
    assert_eq!(
        (h["traceparent"].as_str(), h["tracestate"].as_str()),
        (Some(tp), Some("k=v"))
    );
    // None: a new one is started. An invalid one is replaced and its tracestate dropped.
    let r = c.get(gw.url("/open")).send().await.unwrap();
    let made = echo(r).await["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        made.len() == 55 && made.starts_with("00-") && made.ends_with("-00"),
        "{made}"
    );
    for bad in [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    ] {
        let r = c
            .get(gw.url("/open"))
            .header("traceparent", bad)
            .header("tracestate", "k=v")
            .send()
            .await
            .unwrap();
        let h = echo(r).await["headers"].clone();
        assert_ne!(h["traceparent"].as_str(), Some(bad));
        assert!(h.get("tracestate").is_none(), "{bad}: {h}");
    }

    // An authenticated request is logged with its user, route, replica and rate-limit decision.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "alice", "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let r = c
        .get(gw.url("/private/x?q=1"))
        .bearer_auth(&token)
        .header("traceparent", tp)
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut line = None;
    for _ in 0..50 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        line = text.lines().find(|l| l.contains(&id)).map(str::to_string);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let entry: serde_json::Value =
        serde_json::from_str(&line.expect("no access-log line")).unwrap();
    assert_eq!(entry["request_id"], id.as_str());
    assert_eq!(entry["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(entry["method"], "GET");
    assert_eq!(entry["path"], "/private/x");
    assert_eq!(entry["route"], "private");
    assert_eq!(entry["upstream"], "b");
    assert_eq!(entry["replica"], b.addr.to_string());
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["bytes_in"], 3);
    assert_eq!(entry["user"], "alice");
    assert_eq!(entry["rate_limit"], "allowed");
    assert_eq!(entry["client_ip"], "127.0.0.1");
    assert!(
        entry["duration_ms"].as_f64().unwrap() > 0.0 && entry["upstream_ms"].as_f64().is_some()
    );
    assert!(entry["time"].as_str().unwrap().ends_with('Z'));
    // Every request got its line.
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(lines >= 7, "{lines} lines");

    // Read-only admin views.
    let routes: serde_json::Value = gw.admin_json("/routes").await;
    assert_eq!(routes["routes"][0]["name"], "private");
    assert_eq!(routes["routes"][0]["auth"], "hs");
    assert_eq!(routes["routes"][0]["rate_limit"], "rl");
    assert_eq!(routes["routes"][0]["match"]["path_prefix"], "/private");
    assert_eq!(
        routes["routes"][0]["policies"],
        serde_json::json!(["auth", "rate_limit"])
    );
    let ups: serde_json::Value = gw.admin_json("/upstreams").await;
    assert_eq!(
        ups["upstreams"]["b"]["replicas"][0]["address"],
        b.addr.to_string()
    );
    assert_eq!(ups["upstreams"]["b"]["replicas"][0]["available"], true);
    assert_eq!(ups["upstreams"]["b"]["replicas"][0]["state"], "healthy");
    assert_eq!(ups["upstreams"]["b"]["replicas"][0]["in_flight"], 0);
    assert_eq!(ups["upstreams"]["b"]["balance"], "round_robin");
    assert_eq!(
        ups["upstreams"]["b"]["targets"],
        serde_json::json!([b.addr.to_string()])
    );
}

/// An OTLP/HTTP collector: keeps the spans of every export it receives, or, when `hang`, takes
/// the request and never answers.
struct Collector {
    addr: std::net::SocketAddr,
    spans: std::sync::Arc<
        std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>,
    >,
    posts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Collector {
    async fn start(hang: bool) -> Collector {
        use http_body_util::BodyExt;
        use prost::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: std::sync::Arc<std::sync::Mutex<Vec<_>>> = Default::default();
        let posts: std::sync::Arc<std::sync::atomic::AtomicUsize> = Default::default();
        let (s, p) = (spans.clone(), posts.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (s, p) = (s.clone(), p.clone());
                            async move {
                                p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                assert_eq!(req.uri().path(), "/v1/traces");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                if hang {
                                    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                                }
                                let export = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body).unwrap();
                                for rs in export.resource_spans {
                                    let service = rs
                                        .resource
                                        .iter()
                                        .flat_map(|r| r.attributes.iter())
                                        .find(|a| a.key == "service.name")
                                        .and_then(|a| a.value.as_ref())
                                        .map(|v| format!("{:?}", v.value))
                                        .unwrap_or_default();
                                    for ss in rs.scope_spans {
                                        for span in ss.spans {
                                            s.lock().unwrap().push((service.clone(), span));
                                        }
                                    }
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, spans, posts }
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> String {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .map(|v| format!("{:?}", v.value))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_join_the_clients_trace() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let collector = Collector::start(false).await;
    let mut gw = Gateway::start(&format!(
        r#"
traces: {{ otlp_endpoint: "http://{}/v1/traces", service_name: gw-test, timeout: 2s }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes: [ {{ name: api, upstream: b }} ]
"#,
        collector.addr, backend.addr
    ))
    .await;
    let c = client();
    let upstream_tp =
        |v: &serde_json::Value| v["headers"]["traceparent"].as_str().unwrap().to_string();

    // No trace context: a new, sampled trace whose span is the upstream's parent.
    let fresh = upstream_tp(&echo(c.get(gw.url("/a")).send().await.unwrap()).await);
    assert!(fresh.ends_with("-01"), "{fresh}");
    // A sampled client trace: joined, with the gateway's own span as the upstream's parent.
    let client_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = c
        .get(gw.url("/b"))
        .header("traceparent", client_tp)
        .header("tracestate", "vendor=1")
        .send()
        .await
        .unwrap();
    let h = echo(r).await;
    let joined = upstream_tp(&h);
    assert_eq!(&joined[..36], &client_tp[..36], "same trace id");
    assert_ne!(
        &joined[36..52],
        "b7ad6b7169203331",
        "the gateway's span is the parent"
    );
    assert!(joined.ends_with("-01"));
    assert_eq!(h["headers"]["tracestate"], "vendor=1");
    // A client trace that is not sampled: followed, and not exported.
    let unsampled_tp = "00-11111111111111111111111111111111-2222222222222222-00";
    let r = c
        .get(gw.url("/c"))
        .header("traceparent", unsampled_tp)
        .send()
        .await
        .unwrap();
    let not_sampled = upstream_tp(&echo(r).await);
    assert!(not_sampled.ends_with("-00"));

    // Shutting down flushes the queue.
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(std::time::Duration::from_secs(10)).is_some());
    let spans = collector.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let find = |tp: &str| {
        spans
            .iter()
            .find(|(_, s)| hex_of(&s.trace_id) == tp[3..35])
            .unwrap_or_else(|| panic!("no span of {tp}: {spans:#?}"))
    };
    let (service, a) = find(&fresh);
    assert!(service.contains("gw-test"), "{service}");
    assert_eq!(hex_of(&a.span_id), fresh[36..52]);
    assert!(a.parent_span_id.is_empty());
    assert_eq!(a.name, "GET api");
    assert!(attribute(a, "http.route").contains("api"));
    assert!(attribute(a, "url.path").contains("/a"));
    assert!(attribute(a, "http.response.status_code").contains("200"));
    assert!(a.end_time_unix_nano > a.start_time_unix_nano);
    let (_, b) = find(&joined);
    assert_eq!(hex_of(&b.span_id), joined[36..52]);
    assert_eq!(hex_of(&b.parent_span_id), "b7ad6b7169203331");
    assert!(spans
        .iter()
        .all(|(_, s)| hex_of(&s.trace_id) != not_sampled[3..35]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_collector_does_not_hold_up_requests() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let collector = Collector::start(true).await;
    let mut gw = Gateway::start(&format!(
        r#"
traces: {{ otlp_endpoint: "http://{}/v1/traces", timeout: 1s, max_queue: 64 }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes: [ {{ name: api, upstream: b }} ]
"#,
        collector.addr, backend.addr
    ))
    .await;
    let c = client();
    // Far more spans than the queue holds, while every export hangs until its timeout.
    for _ in 0..10 {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                let (c, url) = (c.clone(), gw.url("/x"));
                tokio::spawn(async move { c.get(url).send().await.unwrap().status().as_u16() })
            })
            .collect();
        for t in batch {
            assert_eq!(t.await.unwrap(), 200);
        }
    }
    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait_exit(std::time::Duration::from_secs(15)).is_some(),
        "shutdown waited on the collector"
    );
    assert!(collector.posts.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// A client that hangs up before its answer is counted in its own class, `client_closed`, not
/// as 1xx, and logged with status 499 (as nginx logs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_is_counted_as_client_closed() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "upstreams: {{ b: {{ targets: [\"{}\"] }} }}\nroutes: [ {{ name: all, upstream: b }} ]\naccess_log: {{ path: \"{}\" }}\n",
        backend.addr,
        log.display()
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"GET /slow?sleep=1000 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(s);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("/slow")) {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line:\n{}",
            gw.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["status"], 499, "{line}");
    let metrics = gw.metrics().await;
    assert_eq!(
        value(
            &metrics,
            "gateway_requests_total{method=\"GET\",route=\"all\",status_class=\"client_closed\"}"
        ),
        1.0
    );
    assert!(
        !metrics.contains("route=\"all\",status_class=\"1xx\""),
        "{metrics}"
    );
}
