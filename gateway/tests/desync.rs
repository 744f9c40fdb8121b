//! HTTP/1.1 request smuggling: the corpus of the `http_desync_guardian` crate
//! (`tests/desync/*.yaml`) replayed against a real gateway in front of a raw TCP upstream that
//! records every request head it receives.
//!
//! Every case the guardian rates Severe must get a 400, a closed connection, and must never be
//! forwarded. What happens to every other case is the table in `docs/desync.md`; the test fails
//! when the gateway's behaviour drifts from it. `UPDATE_DESYNC_TABLE=1` rewrites the table.

mod common;

use common::*;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FILES: [&str; 9] = [
    "rfc-compliant",
    "more-compliant-tests",
    "acceptable",
    "edge-cases",
    "uri-specific-test-cases",
    "bad-header-characters",
    "ambiguous",
    "real-life-test-cases",
    "severe",
];

#[derive(Deserialize)]
struct Case {
    name: String,
    uri: Scalar,
    method: Scalar,
    version: Scalar,
    /// Empty (`headers:` with nothing under it) in some cases.
    headers: Option<Vec<Header>>,
    expected: Expected,
}

/// A header of a case (its own `tier` is not needed here; serde skips it).
#[derive(Deserialize)]
struct Header {
    name: Scalar,
    value: Scalar,
}

/// The guardian's verdict on a case (only the tier matters to the gateway).
#[derive(Deserialize)]
struct Expected {
    tier: String,
}

/// Corpus values are strings or bare numbers.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Int(i64),
    Text(String),
}

impl Scalar {
    /// The bytes the corpus means: YAML has already turned `"\x01"` into U+0001; single-quoted
    /// strings still hold a literal `\x01`, decoded here as the guardian's own test does. Every
    /// char up to U+00FF is that one byte (`"\xa0"` is the byte 0xA0, not UTF-8).
    fn bytes(&self) -> Vec<u8> {
        let text = match self {
            Scalar::Int(n) => return n.to_string().into_bytes(),
            Scalar::Text(t) => t,
        };
        let mut out = Vec::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            let c = if c != '\\' {
                c
            } else {
                match chars.next() {
                    Some('x') => {
                        let hex: String = chars.by_ref().take(2).collect();
                        char::from(u8::from_str_radix(&hex, 16).unwrap())
                    }
                    Some('b') => '\x08',
                    Some('f') => '\x0c',
                    Some('n') => '\n',
                    Some('r') => '\r',
                    Some('t') => '\t',
                    Some(other) => other,
                    None => '\\',
                }
            };
            if (c as u32) <= 0xFF {
                out.push(c as u32 as u8);
            } else {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
        out
    }
}

struct Loaded {
    file: &'static str,
    index: usize,
    case: Case,
}

fn corpus() -> Vec<Loaded> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/desync");
    let mut all = Vec::new();
    for file in FILES {
        let text = std::fs::read_to_string(dir.join(format!("{file}.yaml"))).unwrap();
        let cases: Vec<Case> = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("{file}.yaml does not parse: {e}"));
        for (index, case) in cases.into_iter().enumerate() {
            all.push(Loaded { file, index, case });
        }
    }
    all
}

/// The request on the wire: the case's request line, then `Host` (unless the case has one)
/// and `X-Desync-Case` so the upstream can tell cases apart, then the case's headers.
fn wire(id: usize, case: &Case, host: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(case.method.bytes());
    out.push(b' ');
    out.extend(case.uri.bytes());
    let version = case.version.bytes();
    if !version.is_empty() {
        out.push(b' ');
        out.extend(version);
    }
    out.extend_from_slice(b"\r\n");
    let headers = case.headers.as_deref().unwrap_or_default();
    let has_host = headers
        .iter()
        .any(|h| h.name.bytes().eq_ignore_ascii_case(b"host"));
    if !has_host {
        out.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("X-Desync-Case: {id}\r\n").as_bytes());
    for h in headers {
        out.extend(h.name.bytes());
        out.extend_from_slice(b": ");
        out.extend(h.value.bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// An upstream that reads one request head per connection, records its `X-Desync-Case`,
/// answers 200 with `Connection: close` at once and closes, never waiting for a body.
async fn case_recording_upstream() -> (SocketAddr, Arc<Mutex<HashSet<usize>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if let Some(line) = text.lines().find(|l| l.starts_with("x-desync-case:")) {
                    if let Ok(id) = line["x-desync-case:".len()..].trim().parse() {
                        record.lock().unwrap().insert(id);
                    }
                }
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (addr, seen)
}

/// What the client saw: the status (or none) and whether the gateway closed the connection
/// within the wait.
struct Outcome {
    status: Option<u16>,
    closed: bool,
}

async fn send(gateway: SocketAddr, bytes: Vec<u8>) -> Outcome {
    let mut s = tokio::net::TcpStream::connect(gateway).await.unwrap();
    if s.write_all(&bytes).await.is_err() {
        return Outcome {
            status: None,
            closed: true,
        };
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    let status = std::str::from_utf8(out.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok());
    Outcome { status, closed }
}

fn outcome_text(o: &Outcome, forwarded: bool) -> String {
    let status = o
        .status
        .map_or("no response".to_string(), |s| s.to_string());
    let conn = if o.closed { "closed" } else { "kept open" };
    let fwd = if forwarded {
        "forwarded"
    } else {
        "not forwarded"
    };
    format!("{status}, {conn}, {fwd}")
}

fn escape_cell(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '|' => "\\|".to_string(),
            c if c.is_control() || (c as u32) > 0x7E => format!("\\x{:02x}", c as u32),
            c => c.to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_corpus_severe_cases_are_refused_and_never_forwarded() {
    let (upstream, seen) = case_recording_upstream().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  app: {{ targets: [\"{upstream}\"] }}\nroutes:\n  - {{ name: all, upstream: app, match: {{ path_prefix: / }} }}\n"
    ))
    .await;
    let cases = corpus();
    assert!(cases.len() > 150, "corpus has {} cases", cases.len());
    let host = gw.http.to_string();

    // All cases at once: each waits at most a few seconds for its answer.
    let mut tasks = Vec::new();
    for (id, loaded) in cases.iter().enumerate() {
        let bytes = wire(id, &loaded.case, &host);
        let addr = gw.http;
        tasks.push(tokio::spawn(async move { send(addr, bytes).await }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    // An upstream that got a head answers at once; give the last ones a moment to land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forwarded = seen.lock().unwrap().clone();

    let mut failures = Vec::new();
    let mut table = String::new();
    let mut by_tier: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (id, (loaded, outcome)) in cases.iter().zip(&outcomes).enumerate() {
        let tier = &loaded.case.expected.tier;
        let was_forwarded = forwarded.contains(&id);
        let text = outcome_text(outcome, was_forwarded);
        if tier == "Severe" && (outcome.status != Some(400) || !outcome.closed || was_forwarded) {
            failures.push(format!(
                "{}.yaml #{} {:?}: {text}",
                loaded.file, loaded.index, loaded.case.name
            ));
        }
        *by_tier.entry((tier.clone(), text.clone())).or_default() += 1;
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            loaded.file,
            loaded.index,
            escape_cell(&loaded.case.name),
            tier,
            text
        ));
    }
    let mut summary = String::from("| Tier | Outcome | Cases |\n|---|---|---|\n");
    for ((tier, text), n) in &by_tier {
        summary.push_str(&format!("| {tier} | {text} | {n} |\n"));
    }
    let doc = format!(
        "# The HTTP/1.1 desync corpus against the gateway\n\n\
         Generated by `gateway/tests/desync.rs` (run it with `UPDATE_DESYNC_TABLE=1` to rewrite \
         this file); the test fails when the gateway's behaviour differs from this table.\n\n\
         Each case of the `http_desync_guardian` 0.1.3 corpus (`gateway/tests/desync/`) is sent \
         on its own connection with `Host` and an `X-Desync-Case` marker added, and no body. \
         The upstream answers every head it receives at once and records it. \"no response\" \
         means the gateway was still waiting (for a body it was promised) after 3 seconds.\n\n\
         Every Severe case must be: 400, closed, not forwarded.\n\n## Summary\n\n{summary}\n\
         ## Every case\n\n| File | # | Case | Tier | Gateway |\n|---|---|---|---|---|\n{table}"
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/desync.md");
    let update = std::env::var_os("UPDATE_DESYNC_TABLE").is_some();
    if update {
        std::fs::write(&path, &doc).unwrap();
    }
    assert!(gw_alive(&gw), "gateway died; log:\n{}", gw.log());
    assert!(
        failures.is_empty(),
        "Severe cases not refused:\n{}",
        failures.join("\n")
    );
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != doc {
        let new_lines: Vec<_> = doc
            .lines()
            .filter(|l| !committed.lines().any(|c| c == *l))
            .collect();
        panic!(
            "the gateway's answers differ from docs/desync.md (check them, then rerun with \
             UPDATE_DESYNC_TABLE=1); new lines:\n{}",
            new_lines.join("\n")
        );
    }
}

fn gw_alive(gw: &Gateway) -> bool {
    unsafe { libc::kill(gw.pid() as i32, 0) == 0 }
}
