//! Access policies through the real binary: `api_key` from a header or a query parameter,
//! against a file of digests made by `gateway api-key`, with scopes, forwarded identity, and
//! the key kept from the upstream.

mod common;

use common::*;

/// `gateway api-key NAME SCOPES`: the key, and the line for the keys file.
fn make_key(name: &str, scopes: &str) -> (String, String) {
    let out = std::process::Command::new(gateway_bin())
        .args(["api-key", name, scopes])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let key = lines.next().unwrap().to_string();
    let line = lines.next().unwrap().to_string();
    assert!(
        !line.contains(&key),
        "the file line holds no key in clear: {line}"
    );
    (key, line)
}

#[tokio::test]
async fn api_keys_admit_forward_and_stay_at_the_gateway() {
    let backend = Backend::start("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let (reader, reader_line) = make_key("reader", "orders:read");
    let (writer, writer_line) = make_key("writer", "orders:read,orders:write");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("# partners\n{reader_line}\n{writer_line}\n")).unwrap();
    let gw = Gateway::start(&format!(
        r#"
policies:
  partners: {{ api_key: {{ keys_file: "{}", query: api_key }} }}
  writers: {{ api_key: {{ keys_file: "{}", scopes: ["orders:write"] }} }}
upstreams: {{ b: {{ targets: ["{}"] }} }}
routes:
  - {{ name: write, upstream: b, match: {{ path_prefix: /write }}, policies: [writers] }}
  - {{ name: read, upstream: b, policies: [partners] }}
"#,
        keys.display(),
        keys.display(),
        backend.addr
    ))
    .await;
    let c = client();

    // A valid key: its name and scopes go upstream, the key and forged identity do not.
    let r = c
        .get(gw.url("/orders"))
        .header("x-api-key", &writer)
        .header("x-api-key-name", "admin")
        .send()
        .await
        .unwrap();
    let seen = echo(r).await;
    let h = &seen["headers"];
    assert_eq!(h["x-api-key-name"], "writer", "{seen}");
    assert_eq!(h["x-api-key-scopes"], "orders:read orders:write", "{seen}");
    assert!(h.get("x-api-key").is_none(), "{seen}");
    // A key without scopes' header: a forged one is removed.
    let r = c
        .get(gw.url("/orders"))
        .header("x-api-key", &reader)
        .header("x-api-key-scopes", "orders:write")
        .send()
        .await
        .unwrap();
    let seen = echo(r).await;
    assert_eq!(seen["headers"]["x-api-key-scopes"], "orders:read", "{seen}");

    // From the query: taken out of what goes upstream, the rest kept.
    let r = c
        .get(gw.url(&format!("/orders?page=2&api_key={reader}&sort=id")))
        .send()
        .await
        .unwrap();
    let seen = echo(r).await;
    assert_eq!(seen["query"], "page=2&sort=id", "{seen}");
    assert_eq!(seen["headers"]["x-api-key-name"], "reader");

    // Missing, wrong, malformed, oversized: 401 with the challenge; a missing scope: 403.
    let status = |key: Option<String>, path: &'static str| {
        let mut req = c.get(gw.url(path));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        async move {
            let r = req.send().await.unwrap();
            let challenge = r.headers().get("www-authenticate").cloned();
            (r.status().as_u16(), challenge)
        }
    };
    let (s, challenge) = status(None, "/orders").await;
    assert_eq!((s, challenge.unwrap().to_str().unwrap()), (401, "ApiKey"));
    assert_eq!(status(Some(format!("{reader}x")), "/orders").await.0, 401);
    assert_eq!(status(Some("a b".into()), "/orders").await.0, 401);
    assert_eq!(status(Some("k".repeat(4000)), "/orders").await.0, 401);
    assert_eq!(status(Some(reader.clone()), "/write").await.0, 403);
    assert_eq!(status(Some(writer.clone()), "/write").await.0, 200);
    let hits = backend.hits();

    // Keys never appear in the log, and a removed key stops working after a reload.
    assert!(!gw.log().contains(&reader) && !gw.log().contains(&writer));
    std::fs::write(&keys, format!("{writer_line}\n")).unwrap();
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    gw.write_raw_config(&format!("{text}# keys changed\n"));
    gw.wait_generation(2).await;
    assert_eq!(status(Some(reader.clone()), "/orders").await.0, 401);
    assert_eq!(status(Some(writer.clone()), "/orders").await.0, 200);
    assert_eq!(
        backend.hits(),
        hits + 1,
        "refused requests never went upstream"
    );
}
