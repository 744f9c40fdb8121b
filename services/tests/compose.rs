//! Reads docker-compose.yml and checks that it hangs together: every service, port, network,
//! volume, healthcheck, build target and variable it names exists, and that it agrees with
//! gateway.yaml, the Dockerfile and the Prometheus configuration. Runs without an engine;
//! `docker_stack.rs` starts the stack on a real one.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The application services: compose name, subcommand, port.
const APP: &[(&str, &str, u16)] = &[
    ("user-service", "users", 3001),
    ("product-service", "products", 3002),
    ("order-service", "orders", 3003),
    ("payment-service", "payments", 3004),
];

/// `text` with each `${NAME:-default}` replaced by its default.
fn with_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').expect("unclosed ${");
        out.push_str(after[..end].split_once(":-").map_or("", |(_, d)| d));
        rest = &after[end + 1..];
    }
    out + rest
}

/// `${NAME}`, `${NAME:-default}`, `${NAME:?message}` references in `text`.
fn variables(text: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else { break };
        let inner = &after[..end];
        let name: String = inner
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push((name, inner.contains(":-")));
        rest = &after[end..];
    }
    out
}

#[test]
fn the_compose_file_is_consistent() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().expect("services");
    let networks = compose["networks"].as_object().expect("networks");
    let volumes = compose["volumes"].as_object().expect("volumes");
    let dockerfile = read("Dockerfile");
    let gateway_yaml = read("gateway.yaml");

    for name in ["gateway", "postgres", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "{name} is missing");
    }

    // The services: replicas, command, port, healthcheck through the binary, internal network.
    for (name, subcommand, port) in APP {
        let s = &services[*name];
        assert!(
            s["deploy"]["replicas"].as_u64().unwrap_or(1) >= 2,
            "{name}: replicas"
        );
        let command = strings(&s["command"]);
        assert_eq!(command[0], *subcommand, "{name}: command");
        assert_eq!(
            command[1..],
            ["--listen".to_string(), format!("0.0.0.0:{port}")],
            "{name}: listen"
        );
        assert_eq!(
            strings(&s["healthcheck"]["test"]),
            [
                "CMD",
                "/usr/local/bin/services",
                "healthcheck",
                &format!("http://127.0.0.1:{port}/health")
            ],
            "{name}: healthcheck"
        );
        assert_eq!(
            strings(&s["networks"]),
            ["backend"],
            "{name}: only the internal network"
        );
        assert!(
            s["deploy"]["resources"]["limits"]["memory"].is_string(),
            "{name}: memory limit"
        );
        assert!(s["restart"].is_string(), "{name}: restart policy");
        assert!(
            s["environment"]["DATABASE_URL"]
                .as_str()
                .unwrap()
                .contains("@postgres:5432/"),
            "{name}: database"
        );
        // gateway.yaml finds it by this name and port.
        assert!(
            gateway_yaml.contains(&format!(":-{name}:{port}}}")),
            "gateway.yaml has no target {name}:{port}"
        );
    }
    assert!(
        gateway_yaml.contains("${USERS_JWKS:-user-service:3001}"),
        "JWKS address"
    );

    // The gateway: both networks, its ports match its listeners, health through its binary.
    let gw = &services["gateway"];
    assert_eq!(strings(&gw["networks"]), ["edge", "backend"]);
    let env = &gw["environment"];
    let http_port = env["GATEWAY_HTTP"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let admin_port = env["GATEWAY_ADMIN"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let ports = strings(&gw["ports"]);
    assert!(
        ports.iter().any(|p| p.ends_with(&format!(":{http_port}"))),
        "{ports:?}"
    );
    assert!(
        ports.contains(&format!(
            "127.0.0.1:${{GATEWAY_ADMIN_PORT:-{admin_port}}}:{admin_port}"
        )),
        "admin on loopback only: {ports:?}"
    );
    let https_port = env["GATEWAY_HTTPS"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert!(
        ports.iter().any(|p| p.ends_with(&format!(":{https_port}"))),
        "{ports:?}"
    );
    // The certificate it serves is made by the certs job into a volume it mounts.
    let cert = env["GATEWAY_CERT"].as_str().unwrap();
    let certs_job = &services["certs"];
    let dir = strings(&certs_job["command"])[2].clone();
    assert!(
        cert.starts_with(&format!("{dir}/")),
        "{cert} is not in {dir}"
    );
    assert!(strings(&gw["volumes"]).contains(&format!("gateway-certs:{dir}:ro")));
    // The configuration's folder is mounted, not the file (a single-file bind mount keeps the
    // old inode when an editor replaces the file), and by default it is the one holding
    // gateway.yaml.
    let run = strings(&gw["command"]);
    let config = Path::new(&run[2]);
    assert_eq!(run[..2], ["run", "-c"]);
    let folder = format!("{}:ro", config.parent().unwrap().display());
    let mounts: Vec<String> = strings(&gw["volumes"])
        .iter()
        .map(|v| with_defaults(v))
        .collect();
    assert!(
        mounts.contains(&format!(".:{folder}")),
        "{mounts:?} do not mount the project folder at {folder}"
    );
    assert_eq!(config.file_name().unwrap(), "gateway.yaml");
    assert!(strings(&certs_job["volumes"]).contains(&format!("gateway-certs:{dir}")));
    assert_eq!(
        gw["depends_on"]["certs"]["condition"],
        "service_completed_successfully"
    );
    assert!(dockerfile.contains(&format!("--chown=65532:65532 /out/certs {dir}")));
    assert!(
        gateway_yaml.contains("${GATEWAY_HTTPS:-") && gateway_yaml.contains("${GATEWAY_CERT:-")
    );
    assert_eq!(
        strings(&gw["healthcheck"]["test"]),
        [
            "CMD",
            "/usr/local/bin/gateway",
            "healthcheck",
            &format!("http://127.0.0.1:{admin_port}/ready")
        ]
    );
    assert!(
        gateway_yaml.contains("${GATEWAY_HTTP:-") && gateway_yaml.contains("${GATEWAY_ADMIN:-")
    );

    // Networks: declared, and the backend cannot reach out.
    assert_eq!(networks["backend"]["internal"], Value::Bool(true));
    for (name, s) in services {
        for n in strings(&s["networks"]) {
            assert!(
                networks.contains_key(&n),
                "{name}: network {n} is not declared"
            );
        }
        // Volumes: named ones declared, bind mounts present in the repository.
        for v in strings(&s["volumes"]) {
            let v = with_defaults(&v);
            let source = v.split(':').next().unwrap();
            if source == "." {
                continue;
            }
            if let Some(path) = source.strip_prefix("./") {
                assert!(
                    root().join(path).exists(),
                    "{name}: {source} does not exist"
                );
            } else {
                assert!(
                    volumes.contains_key(source),
                    "{name}: volume {source} is not declared"
                );
            }
        }
        // Dependencies exist; waiting for health needs a healthcheck.
        if let Some(deps) = s["depends_on"].as_object() {
            for (dep, how) in deps {
                assert!(
                    services.contains_key(dep),
                    "{name}: depends on unknown {dep}"
                );
                if how["condition"] == "service_healthy" {
                    assert!(
                        services[dep]["healthcheck"].is_object(),
                        "{name}: {dep} has no healthcheck"
                    );
                }
            }
        }
        // Build targets exist in the Dockerfile.
        if let Some(target) = s["build"]["target"].as_str() {
            assert!(
                dockerfile.contains(&format!(" AS {target}\n")),
                "{name}: no Dockerfile stage {target}"
            );
        }
        assert!(s["image"].is_string(), "{name}: image");
        assert!(s["restart"].is_string(), "{name}: restart policy");
        assert!(
            s["deploy"]["resources"]["limits"].is_object(),
            "{name}: resource limits"
        );
    }

    // Every variable without a default is documented in .env.example, and .env is not committed.
    let example = read(".env.example");
    let documented: BTreeSet<&str> = example
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    for (var, has_default) in variables(&read("docker-compose.yml")) {
        assert!(
            has_default || documented.contains(var.as_str()),
            "${{{var}}} is not in .env.example"
        );
    }
    assert!(read(".gitignore").lines().any(|l| l.trim() == ".env"));
    assert!(!Path::new(&root().join(".env")).exists() || std::env::var("CI").is_err());

    // Prometheus scrapes the same names and ports.
    let prometheus = yaml("monitoring/prometheus.yml");
    let sd = &prometheus["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_name"] == "services")
        .expect("services job")["dns_sd_configs"];
    for (name, _, port) in APP {
        assert!(
            sd.as_array()
                .unwrap()
                .iter()
                .any(|c| strings(&c["names"]) == [*name] && c["port"] == *port),
            "prometheus does not scrape {name}:{port}"
        );
    }
    // Grafana's provisioning files exist where the compose file mounts them.
    assert!(root()
        .join("monitoring/grafana/provisioning/datasources/prometheus.yml")
        .is_file());
    let dashboard: Value =
        serde_json::from_str(&read("monitoring/grafana/dashboards/services.json")).unwrap();
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
}
