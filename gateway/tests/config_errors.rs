//! `gateway check` and `gateway run` agree on broken configurations: a file for each kind of
//! check the compile step makes (references, parsed values, files, positions of every section),
//! plus the configuration fuzz seeds. Both refuse it, with the same
//! `FILE:LINE:COLUMN: field: reason`.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A configuration that passes, on free loopback ports, with `extra` sections appended and
/// `routes` as the route list.
fn config(extra: &str, routes: &str) -> String {
    format!(
        "threads: 1\nlisteners:\n  http: {{ address: \"127.0.0.1:{}\" }}\nadmin: {{ address: \"127.0.0.1:{}\" }}\nupstreams:\n  u: {{ targets: [\"127.0.0.1:{}\"] }}\n{extra}routes:\n{routes}",
        free_port("127.0.0.1"),
        free_port("127.0.0.1"),
        DeadPort::reserve().port,
    )
}

const ROUTE: &str = "  - { name: r, upstream: u }\n";

/// [`config`] with one more listener line (as [`tls_listener`] makes).
fn with_listener(line: &str) -> String {
    config("", ROUTE).replace("admin:", &format!("{line}admin:"))
}

/// A TLS listener line with `acme: { <settings> }`.
fn acme_listener(settings: &str) -> String {
    format!(
        "  https: {{ address: \"127.0.0.1:{}\", tls: {{ acme: {{ {settings} }} }} }}\n",
        free_port("127.0.0.1")
    )
}

/// (what is wrong, the file, the field the error must name).
fn corpus(dir: &Path) -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("unknown field", config("colour: blue\n", ROUTE), "colour"),
        (
            "a route naming a policy that does not exist",
            config("", "  - { name: r, upstream: u, policies: [nope] }\n"),
            "routes[0].policies[0]",
        ),
        (
            "default policies naming one that does not exist",
            config("default_policies: [nope]\n", ROUTE),
            "default_policies[0]",
        ),
        (
            "an IP list entry that is no network",
            config("policies:\n  p: { ip_list: { deny: [\"10.0.0.0/33\"] } }\n", ROUTE),
            "policies.p.ip_list.deny[0]",
        ),
        (
            "an IP list with nothing in it",
            config("policies:\n  p: { ip_list: {} }\n", ROUTE),
            "policies.p.ip_list",
        ),
        (
            "a redirect with a status that is no redirect",
            config("policies:\n  p: { redirect: { to: \"/x\", status: 200 } }\n", ROUTE),
            "policies.p.redirect.status",
        ),
        (
            "a redirect target with an unknown placeholder",
            config("policies:\n  p: { redirect: { to: \"/{nope}\" } }\n", ROUTE),
            "policies.p.redirect.to",
        ),
        (
            "a fixed answer from a file that is not there",
            config("policies:\n  p: { respond: { status: 200, file: /nonexistent/page.html } }\n", ROUTE),
            "policies.p.respond.file",
        ),
        (
            "CORS for any origin with credentials",
            config("policies:\n  p: { cors: { allow_origins: [\"*\"], allow_credentials: true } }\n", ROUTE),
            "policies.p.cors.allow_origins",
        ),
        (
            "a CORS origin with a path",
            config("policies:\n  p: { cors: { allow_origins: [\"https://a.example/x\"] } }\n", ROUTE),
            "policies.p.cors.allow_origins",
        ),
        (
            "a route with no upstream and nothing that answers for it",
            config("policies:\n  p: { compress: {} }\n", "  - { name: r, policies: [p] }\n"),
            "routes[0].upstream",
        ),
        (
            "an API keys file with a key in clear",
            {
                let keys = dir.join("keys-in-clear");
                std::fs::write(&keys, "partner s3cr3t-key\n").unwrap();
                config(
                    &format!("policies:\n  p: {{ api_key: {{ keys_file: \"{}\" }} }}\n", keys.display()),
                    ROUTE,
                )
            },
            "policies.p.api_key.keys_file",
        ),
        (
            "an htpasswd file with a plain-text password",
            {
                let users = dir.join("htpasswd-plain");
                std::fs::write(&users, "alice:wonderland\n").unwrap();
                config(
                    &format!("policies:\n  p: {{ basic_auth: {{ users_file: \"{}\" }} }}\n", users.display()),
                    ROUTE,
                )
            },
            "policies.p.basic_auth.users_file",
        ),
        (
            "a concurrency limit of nothing",
            config("policies:\n  p: { concurrency: { max: 0 } }\n", ROUTE),
            "policies.p.concurrency",
        ),
        (
            "a circuit breaker that never tries again",
            config("", ROUTE).replace(
                "u: { targets:",
                "u: { circuit_breaker: { trial_requests: 0 }, targets:",
            ),
            "upstreams.u.circuit_breaker",
        ),
        (
            "HTTP/2 by ALPN without TLS",
            config("", ROUTE).replace("u: { targets:", "u: { protocol: h2, targets:"),
            "upstreams.u.protocol",
        ),
        (
            "h2c over TLS",
            config("", ROUTE).replace("u: { targets:", "u: { protocol: h2c, tls: {}, targets:"),
            "upstreams.u.protocol",
        ),
        (
            "an unknown upstream protocol",
            config("", ROUTE).replace("u: { targets:", "u: { protocol: http3, targets:"),
            "upstreams.u.protocol",
        ),
        (
            "HTTP/2 settings on an HTTP/1.1 upstream",
            config("", ROUTE).replace("u: { targets:", "u: { h2: { max_streams: 10 }, targets:"),
            "upstreams.u.h2",
        ),
        (
            "no streams at all",
            config("", ROUTE).replace(
                "u: { targets:",
                "u: { protocol: h2c, h2: { max_streams: 0 }, targets:",
            ),
            "upstreams.u.h2.max_streams",
        ),
        (
            "a gRPC health check over HTTP/1.1",
            config("", ROUTE).replace(
                "u: { targets:",
                "u: { health: { active: { grpc: { service: x } } }, targets:",
            ),
            "upstreams.u.health.active.grpc",
        ),
        (
            "a zero stream idle timeout",
            config("", ROUTE).replace(
                "u: { targets:",
                "u: { timeouts: { stream_idle: 0s }, targets:",
            ),
            "upstreams.u.timeouts",
        ),
        (
            "gRPC-Web bridged to an HTTP/1.1 upstream",
            config("policies:\n  w: { grpc_web: {} }\n", "  - { name: r, upstream: u, policies: [w] }\n"),
            "routes[0].policies",
        ),
        (
            "a mirror to an HTTP/2 upstream",
            config(
                "",
                "  - { name: r, upstream: u, mirror: { upstream: m } }\n",
            )
            .replace("upstreams:\n", "upstreams:\n  m: { targets: [\"127.0.0.1:9\"], protocol: h2c }\n"),
            "routes[0].mirror.upstream",
        ),
        (
            "an admin token too short to resist guessing",
            config("", ROUTE).replace("admin: { address:", "admin: { token: short, address:"),
            "admin.token",
        ),
        (
            "settings for gRPC-Web",
            config("policies:\n  w: { grpc_web: { text: true } }\n", ROUTE),
            "policies.w.grpc_web.text",
        ),
        (
            "a route with both an upstream and a split",
            config("", "  - { name: r, upstream: u, split: [ { upstream: u, weight: 1 } ] }\n"),
            "routes[0].split",
        ),
        (
            "a sticky key of no known kind",
            config("", "  - { name: r, split: [ { upstream: u, weight: 1 } ], sticky: ip }\n"),
            "routes[0].sticky",
        ),
        (
            "a mirror to an upstream that does not exist",
            config("", "  - { name: r, upstream: u, mirror: { upstream: nope } }\n"),
            "routes[0].mirror.upstream",
        ),
        (
            "forward auth to an upstream that does not exist",
            config("policies:\n  p: { forward_auth: { upstream: nope } }\n", ROUTE),
            "policies.p.forward_auth.upstream",
        ),
        (
            "compression with an unknown encoding",
            config("policies:\n  p: { compress: { encodings: [gzip, deflate] } }\n", ROUTE),
            "policies.p.compress.encodings[1]",
        ),
        (
            "a compression level out of range",
            config("policies:\n  p: { compress: { levels: { gzip: 10 } } }\n", ROUTE),
            "policies.p.compress.levels.gzip",
        ),
        (
            "a compressed type that is no media type",
            config("policies:\n  p: { compress: { types: [json] } }\n", ROUTE),
            "policies.p.compress.types[0]",
        ),
        (
            "an error page for a status that is no error",
            config("", "  - { name: r, upstream: u, error_pages: { 200: { body: x } } }\n"),
            "routes[0].error_pages.200",
        ),
        (
            "an error page with neither body nor file",
            config("", "  - { name: r, upstream: u, error_pages: { 404: { content_type: text/plain } } }\n"),
            "routes[0].error_pages.404",
        ),
        (
            "a policy of no known kind",
            config("policies:\n  p: { cores: {} }\n", ROUTE),
            "policies.p",
        ),
        (
            "a query regex that does not compile",
            config("", "  - { name: r, upstream: u, match: { query: [ { name: a, regex: \"(\" } ] } }\n"),
            "routes[0].match",
        ),
        (
            "a Docker provider refreshing never",
            config("providers:\n  docker: { refresh: 0s }\n", ROUTE),
            "providers.docker.refresh",
        ),
        (
            "a Docker endpoint that is no socket or address",
            config("providers:\n  docker: { endpoint: \"tcp://nohost\" }\n", ROUTE),
            "providers.docker.endpoint",
        ),
        (
            "an unknown Docker provider field",
            config("providers:\n  docker: { socket: /run/docker.sock }\n", ROUTE),
            "providers.docker.socket",
        ),
        (
            "route to an upstream that does not exist",
            config("", "  - { name: r, upstream: nope }\n"),
            "routes[0].upstream",
        ),
        (
            "route to an auth policy that does not exist",
            config("", "  - { name: r, upstream: u, auth: nope }\n"),
            "routes[0].auth",
        ),
        (
            "route to a rate limit that does not exist",
            config("", "  - { name: r, upstream: u, rate_limit: nope }\n"),
            "routes[0].rate_limit",
        ),
        (
            "a rate that does not parse",
            config("rate_limits:\n  l: { rate: often }\n", ROUTE),
            "rate_limits.l.rate",
        ),
        (
            "a rate-limit key that does not parse",
            config("rate_limits:\n  l: { rate: 10/s, key: bogus }\n", ROUTE),
            "rate_limits.l.key",
        ),
        (
            "a burst of zero",
            config("rate_limits:\n  l: { rate: 10/s, burst: 0 }\n", ROUTE),
            "rate_limits.l",
        ),
        (
            "a claim key on a route without auth",
            config(
                "rate_limits:\n  l: { rate: 10/s, key: \"jwt:sub\" }\n",
                "  - { name: r, upstream: u, rate_limit: l }\n",
            ),
            "routes[0].rate_limit",
        ),
        (
            "a path regex that does not compile",
            config("", "  - { name: r, upstream: u, match: { path_regex: \"(\" } }\n"),
            "routes[0].match.path_regex",
        ),
        (
            "a path that does not start with /",
            config("", "  - { name: r, upstream: u, match: { path: api } }\n"),
            "routes[0].match.path",
        ),
        (
            "a header name that is not one",
            config(
                "",
                "  - { name: r, upstream: u, match: { headers: [ { name: \"a b\" } ] } }\n",
            ),
            "routes[0].match.headers[0]",
        ),
        (
            "a route name used twice",
            config("", &format!("{ROUTE}{ROUTE}")),
            "routes[1].name",
        ),
        (
            "a certificate file that does not exist",
            with_listener(&tls_listener("https", dir, &["none"], "").1),
            "listeners.https.tls",
        ),
        (
            "an HSTS value that is not a header value",
            with_listener(&tls_listener("https", dir, &["t.test"], ", hsts: \"a\\u0001b\"").1),
            "listeners.https.tls.hsts",
        ),
        (
            "an ACME wildcard name",
            with_listener(&acme_listener("domains: [\"*.example.com\"]")),
            "listeners.https.tls.acme.domains",
        ),
        (
            "an ACME directory that is no https URL",
            with_listener(&acme_listener(
                "domains: [example.com], directory: \"http://acme.test/dir\"",
            )),
            "listeners.https.tls.acme.directory",
        ),
        (
            "an ACME account binding key that is not base64url",
            with_listener(&acme_listener(
                "domains: [example.com], eab: { kid: k, hmac_key: \"no!\" }",
            )),
            "listeners.https.tls.acme.eab.hmac_key",
        ),
        (
            "an unknown ACME challenge",
            with_listener(&acme_listener("domains: [example.com], challenge: dns-01")),
            "listeners.https.tls.acme.challenge",
        ),
        (
            "TLS-ALPN-01 on a listener that requires client certificates",
            with_listener(&acme_listener(&format!(
                "domains: [example.com] }}, client_auth: {{ ca: \"{}/ca.pem\"",
                dir.display()
            ))),
            "listeners.https.tls.acme.challenge",
        ),
        (
            "HTTP-01 without a plain listener",
            with_listener(&acme_listener(
                "domains: [example.com], challenge: http-01",
            ))
            .replace("http: { address", "web: { tls: { acme: { domains: [example.org] } }, address"),
            "listeners.https.tls.acme.challenge",
        ),
        (
            "a TLS listener with neither certificates nor ACME",
            with_listener(&format!(
                "  https: {{ address: \"127.0.0.1:{}\", tls: {{}} }}\n",
                free_port("127.0.0.1")
            )),
            "listeners.https.tls",
        ),
        (
            "a redirect on a TLS listener",
            with_listener(
                &tls_listener("https", dir, &["t.test"], "")
                    .1
                    .replace("address:", "redirect_https: 443, address:"),
            ),
            "listeners.https.redirect_https",
        ),
        (
            "a trusted proxy that is not a CIDR",
            config("trusted_proxies: [\"10.0.0.0/33\"]\n", ROUTE),
            "trusted_proxies[0]",
        ),
        (
            "an access-log sample out of range",
            config("access_log: { sample: 2.0 }\n", ROUTE),
            "access_log.sample",
        ),
        (
            "an auth policy without a key",
            config("auth:\n  a: { issuer: x }\n", ROUTE),
            "auth.a",
        ),
        (
            "an HS384 secret shorter than the hash",
            config(
                "auth:\n  a: { secret: \"0123456789abcdef0123456789abcdef\", algorithms: [HS384] }\n",
                ROUTE,
            ),
            "auth.a",
        ),
        (
            "a JWKS URL that is not http(s)",
            config("auth:\n  a: { jwks_url: \"ftp://keys.test/jwks\" }\n", ROUTE),
            "auth.a",
        ),
        (
            "no threads",
            config("", ROUTE).replace("threads: 1", "threads: 0"),
            "threads",
        ),
        (
            "no listener",
            config("", ROUTE)
                .lines()
                .filter(|l| !l.starts_with("  http:"))
                .map(|l| match l {
                    "listeners:" => "listeners: {}\n".to_string(),
                    l => format!("{l}\n"),
                })
                .collect(),
            "listeners",
        ),
        (
            "a reload poll interval of zero",
            config("reload: { poll_interval: 0s }\n", ROUTE),
            "reload.poll_interval",
        ),
        (
            "a discovery interval of zero",
            config("", ROUTE).replace("\"] }\n", "\"], discovery: { refresh: 0s } }\n"),
            "upstreams.u.discovery.refresh",
        ),
        (
            "health checks that never rise",
            config("", ROUTE).replace(
                "\"] }\n",
                "\"], health: { active: { path: /health, rise: 0 } } }\n",
            ),
            "upstreams.u.health.active",
        ),
        (
            "passive health that never ejects",
            config("", ROUTE).replace(
                "\"] }\n",
                "\"], health: { passive: { max_fails: 0 } } }\n",
            ),
            "upstreams.u.health.passive",
        ),
        (
            "an upstream timeout of zero",
            config("", ROUTE).replace("\"] }\n", "\"], timeouts: { read: 0s } }\n"),
            "upstreams.u.timeouts",
        ),
        (
            "a listener read buffer out of range",
            config("", ROUTE).replace(
                "\" }\nadmin:",
                "\", read_buffer: 12 }\nadmin:",
            ),
            "listeners.http.read_buffer",
        ),
    ]
}

/// What `gateway ARGS -c FILE` printed on standard error and whether it succeeded; a
/// process still running after 15 s is killed and reported as having served.
fn gateway(command: &str, file: &Path) -> (bool, String) {
    let mut child = Command::new(gateway_bin())
        .args([command, "-c"])
        .arg(file)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (true, "still running".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The configuration error in `stderr`: its `FILE:LINE:COLUMN: field: reason` line.
fn error_line<'a>(stderr: &'a str, file: &Path) -> Option<&'a str> {
    let file = file.to_str().unwrap();
    stderr.lines().find_map(|l| {
        let at = l.find(file)?;
        Some(&l[at..])
    })
}

#[test]
fn check_and_run_refuse_every_broken_file_alike() {
    let dir = tempfile::tempdir().unwrap();
    common::certs(dir.path(), &["t.test"]);
    let mut files = Vec::new();
    for (i, (what, text, field)) in corpus(dir.path()).into_iter().enumerate() {
        let path = dir.path().join(format!("broken-{i}.yaml"));
        std::fs::write(&path, &text).unwrap();
        files.push((what.to_string(), path, Some(field)));
    }
    // The fuzz seeds, as they are: whatever `check` says of them, `run` must say too.
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/config");
    for entry in std::fs::read_dir(&seeds).unwrap() {
        let path = entry.unwrap().path();
        files.push((format!("seed {}", path.display()), path, None));
    }
    assert!(files.len() > 28);
    for (what, path, field) in files {
        let (check_ok, check_err) = gateway("check", &path);
        if check_ok {
            // A seed that is valid: nothing to compare without serving on its fixed ports.
            assert!(field.is_none(), "{what}: `check` accepted it");
            continue;
        }
        let check_line = error_line(&check_err, &path)
            .unwrap_or_else(|| panic!("{what}: no error line in {check_err:?}"));
        let position = check_line[path.to_str().unwrap().len()..].to_string();
        let mut parts = position.splitn(4, ':');
        assert_eq!(parts.next(), Some(""), "{what}: {check_line}");
        let line: u64 = parts.next().and_then(|l| l.parse().ok()).unwrap_or(0);
        let column: u64 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        assert!(
            line > 0 && column > 0,
            "{what}: no position in {check_line}"
        );
        if let Some(field) = field {
            assert!(
                parts
                    .next()
                    .and_then(|rest| rest.trim_start().split(": ").next())
                    == Some(field),
                "{what}: expected field {field} in {check_line}"
            );
        }
        let (run_ok, run_err) = gateway("run", &path);
        assert!(!run_ok, "{what}: `run` served a file `check` refused");
        assert_eq!(
            error_line(&run_err, &path),
            Some(check_line),
            "{what}: run said {run_err:?}"
        );
    }
}
