//! A container's `gateway.*` labels → one upstream target and the routes it declares.
//!
//! The labels are written out as a small YAML document and read by the same parser and types as
//! the configuration file, so every route and upstream field works as a label and is checked
//! the same way. Each line of that document remembers its label, so an error names the label.

use crate::config::{ConfigError, RouteConfig, UpstreamConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

/// The label namespace.
pub const PREFIX: &str = "gateway.";

/// What the provider knows of one running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The engine's id for it.
    pub id: String,
    /// Its name, without Docker's leading `/`.
    pub name: String,
    /// All its labels.
    pub labels: BTreeMap<String, String>,
    /// Network name → its address there.
    pub networks: BTreeMap<String, IpAddr>,
    /// Ports it exposes (the image's `EXPOSE`, or published ones).
    pub exposed: Vec<u16>,
}

/// A container's contribution, checked.
#[derive(Debug, Clone)]
pub struct Declared {
    /// The container it came from.
    pub container: String,
    /// The upstream it is a replica of (`gateway.service`).
    pub upstream: String,
    /// Its upstream settings, with this container as the only target.
    pub upstream_config: UpstreamConfig,
    /// The routes it declares.
    pub routes: Vec<RouteConfig>,
    /// Label of each line of the document its settings were read from (index = line - 1).
    pub lines: Vec<String>,
}

/// A label error: the container and the label (or field) it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelError {
    /// The container.
    pub container: String,
    /// The label, or the field when no single label is to blame.
    pub label: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for LabelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "container {}: label {}: {}",
            self.container, self.label, self.message
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    upstream: UpstreamConfig,
    #[serde(default)]
    routes: Vec<RouteConfig>,
}

/// A nested mapping built from dotted label keys; leaves keep their label.
#[derive(Default)]
struct Tree(BTreeMap<String, Node>);

enum Node {
    Leaf { label: String, value: String },
    Map(Tree),
}

impl Tree {
    fn insert(&mut self, path: &[&str], label: &str, value: &str) -> Result<(), String> {
        let (first, rest) = path.split_first().ok_or("empty name")?;
        if first.is_empty() {
            return Err("empty segment in the name".into());
        }
        if rest.is_empty() {
            if self.0.contains_key(*first) {
                return Err("set twice, or both as a value and as a section".into());
            }
            self.0.insert(
                first.to_string(),
                Node::Leaf {
                    label: label.to_string(),
                    value: value.to_string(),
                },
            );
            return Ok(());
        }
        match self
            .0
            .entry(first.to_string())
            .or_insert_with(|| Node::Map(Tree::default()))
        {
            Node::Map(tree) => tree.insert(rest, label, value),
            Node::Leaf { .. } => Err("set both as a value and as a section".into()),
        }
    }

    /// Writes the tree as block YAML at `indent`, recording each line's label.
    fn write(&self, indent: usize, out: &mut String, lines: &mut Vec<String>, owner: &str) {
        for (key, node) in &self.0 {
            match node {
                Node::Leaf { label, value } => {
                    let _ = writeln!(out, "{:indent$}{key}: {}", "", scalar(key, value));
                    lines.push(label.clone());
                }
                Node::Map(tree) => {
                    let _ = writeln!(out, "{:indent$}{key}:", "");
                    lines.push(owner.to_string());
                    tree.write(indent + 2, out, lines, owner);
                }
            }
        }
    }
}

/// A label value as a YAML scalar that cannot change the document's structure: numbers and
/// booleans plain, lists (`hosts`, `methods`) split on commas, anything else double-quoted.
fn scalar(key: &str, value: &str) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    if matches!(key, "hosts" | "methods") {
        let items: Vec<String> = value.split(',').map(|v| quote(v.trim())).collect();
        return format!("[{}]", items.join(", "));
    }
    let plain = value == "true"
        || value == "false"
        || (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) && value.len() < 10);
    if plain {
        value.to_string()
    } else {
        quote(value)
    }
}

/// Short upstream health labels (`gateway.upstream.health.path`) are the active check's.
fn upstream_path(rest: &str) -> String {
    match rest.strip_prefix("health.") {
        Some(field @ ("path" | "interval" | "timeout" | "rise" | "fall" | "host")) => {
            format!("health.active.{field}")
        }
        _ => rest.to_string(),
    }
}

/// Whether the container asks to be served: any `gateway.` label, and not `gateway.enable=false`.
pub fn wanted(labels: &BTreeMap<String, String>) -> bool {
    labels.keys().any(|k| k.starts_with(PREFIX))
        && labels.get("gateway.enable").map(String::as_str) != Some("false")
}

/// Reads a container's labels. `network` is the provider's default network.
pub fn declared(c: &Container, network: Option<&str>) -> Result<Declared, LabelError> {
    let fail = |label: &str, message: String| LabelError {
        container: c.name.clone(),
        label: label.to_string(),
        message,
    };
    let label = |key: &str| c.labels.get(&format!("{PREFIX}{key}"));
    let upstream = label("service")
        .or_else(|| c.labels.get("com.docker.compose.service"))
        .cloned()
        .unwrap_or_else(|| c.name.clone());
    if upstream.is_empty() {
        return Err(fail("gateway.service", "must not be empty".into()));
    }
    let network_label = label("network").map(String::as_str);
    let ip = match network_label.or(network) {
        Some(net) => c.networks.get(net).copied().ok_or_else(|| {
            fail(
                "gateway.network",
                format!("the container is not on network {net:?}"),
            )
        })?,
        None => match c.networks.values().collect::<Vec<_>>()[..] {
            [ip] => *ip,
            [] => return Err(fail("gateway.network", "the container has no network address".into())),
            _ => {
                return Err(fail(
                    "gateway.network",
                    "the container is on several networks: name one (label gateway.network, or providers.docker.network)".into(),
                ))
            }
        },
    };
    let port = match label("port") {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| fail("gateway.port", format!("{p:?} is not a port (1-65535)")))?,
        None => match c.exposed[..] {
            [p] => p,
            _ => {
                return Err(fail(
                    "gateway.port",
                    "missing: the container exposes no single port to default to".into(),
                ))
            }
        },
    };

    let mut upstream_tree = Tree::default();
    let mut routes: BTreeMap<String, Tree> = BTreeMap::new();
    for (key, value) in &c.labels {
        let Some(rest) = key.strip_prefix(PREFIX) else {
            continue;
        };
        let inserted = if let Some(field) = rest.strip_prefix("upstream.") {
            if field == "targets" {
                Err("not a label: targets are the containers themselves".into())
            } else {
                let path = upstream_path(field);
                upstream_tree.insert(&path.split('.').collect::<Vec<_>>(), key, value)
            }
        } else if let Some(route) = rest.strip_prefix("route.") {
            match route.split_once('.') {
                Some((name, field)) if !name.is_empty() => {
                    if field == "name" {
                        Err("not a label: the route's name is the one in the label".into())
                    } else {
                        routes.entry(name.to_string()).or_default().insert(
                            &field.split('.').collect::<Vec<_>>(),
                            key,
                            value,
                        )
                    }
                }
                _ => Err("expected gateway.route.NAME.FIELD".into()),
            }
        } else if matches!(rest, "enable" | "service" | "port" | "network") {
            Ok(())
        } else {
            Err("unknown label (see docs/configuration.md, providers.docker)".into())
        };
        inserted.map_err(|m| fail(key, m))?;
    }

    // The document: the upstream with this container as its target, then the routes.
    let owner = |what: &str| format!("{PREFIX}{what}");
    let mut text = String::new();
    let mut lines = Vec::new();
    text.push_str("upstream:\n");
    lines.push(owner("service"));
    let address = match ip {
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        IpAddr::V4(v4) => format!("{v4}:{port}"),
    };
    let _ = writeln!(text, "  targets: [\"{address}\"]");
    lines.push(owner("port"));
    upstream_tree.write(2, &mut text, &mut lines, &owner("upstream"));
    if !routes.is_empty() {
        text.push_str("routes:\n");
        lines.push(owner("route"));
    }
    for (name, tree) in &routes {
        let route_label = owner(&format!("route.{name}"));
        let _ = writeln!(
            text,
            "  - name: {}",
            serde_json::to_string(name).unwrap_or_default()
        );
        lines.push(route_label.clone());
        if !tree.0.contains_key("upstream") {
            let _ = writeln!(
                text,
                "    upstream: {}",
                serde_json::to_string(&upstream).unwrap_or_default()
            );
            lines.push(owner("service"));
        }
        tree.write(4, &mut text, &mut lines, &route_label);
    }
    let document = parse(&text).map_err(|e| {
        let label = usize::try_from(e.line)
            .ok()
            .and_then(|l| l.checked_sub(1))
            .and_then(|l| lines.get(l))
            .cloned()
            .unwrap_or_else(|| e.field.clone());
        fail(&label, e.message)
    })?;
    Ok(Declared {
        container: c.name.clone(),
        upstream,
        upstream_config: document.upstream,
        routes: document.routes,
        lines,
    })
}

fn parse(text: &str) -> Result<Document, ConfigError> {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    let mut field = String::new();
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize::<_, Document>(de).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        let line = e.location().map_or(0, |l| l.line());
        let message = e.to_string();
        let message = message.lines().next().unwrap_or_default();
        let message = message.split(" at line ").next().unwrap_or(message);
        ConfigError {
            file: "labels".into(),
            line,
            column: 0,
            field: field.replace(".value", ""),
            message: message.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(labels: &[(&str, &str)]) -> Container {
        Container {
            id: "0123abcd".into(),
            name: "web-1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            networks: [("net".to_string(), "10.1.0.5".parse().unwrap())].into(),
            exposed: vec![8000],
        }
    }

    #[test]
    fn labels_become_an_upstream_and_routes() {
        let d = declared(
            &container(&[
                ("gateway.service", "web"),
                ("gateway.route.api.match.path_prefix", "/api"),
                ("gateway.route.api.match.methods", "GET, HEAD"),
                ("gateway.route.api.strip_prefix", "true"),
                ("gateway.route.api.retries", "1"),
                ("gateway.upstream.health.path", "/health"),
                ("gateway.upstream.balance", "least_requests"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(d.upstream, "web");
        let t = &d.upstream_config.targets.value[0];
        assert_eq!((t.host.as_str(), t.port), ("10.1.0.5", 8000));
        let active = d.upstream_config.health.value.active.as_ref().unwrap();
        assert_eq!(active.path, "/health");
        let r = &d.routes[0];
        assert_eq!(
            (
                r.name.value.as_str(),
                r.upstream.as_ref().unwrap().value.as_str()
            ),
            ("api", "web")
        );
        assert_eq!(r.matcher.path_prefix.as_ref().unwrap().value, "/api");
        assert_eq!(r.matcher.methods.len(), 2);
        assert!(r.strip_prefix);
        assert_eq!(r.retries, Some(1));
    }

    #[test]
    fn errors_name_the_container_and_the_label() {
        for (labels, label) in [
            (
                vec![("gateway.route.api.retries", "lots")],
                "gateway.route.api.retries",
            ),
            (
                vec![("gateway.route.api.match.path_prfix", "/x")],
                "gateway.route.api.match.path_prfix",
            ),
            (vec![("gateway.port", "http")], "gateway.port"),
            (vec![("gateway.colour", "blue")], "gateway.colour"),
            (
                vec![("gateway.upstream.balance", "fastest")],
                "gateway.upstream.balance",
            ),
            (vec![("gateway.route.api", "/x")], "gateway.route.api"),
            (
                vec![("gateway.upstream.targets", "1.2.3.4:80")],
                "gateway.upstream.targets",
            ),
        ] {
            let e = declared(&container(&labels), None).unwrap_err();
            assert_eq!(
                (e.container.as_str(), e.label.as_str()),
                ("web-1", label),
                "{e}"
            );
        }
    }

    #[test]
    fn values_cannot_change_the_document() {
        let d = declared(
            &container(&[(
                "gateway.route.api.match.path",
                "/x\"\n  strip_prefix: true\n#",
            )]),
            None,
        );
        // Whatever the value holds, it stays one string of one field.
        let d = d.unwrap();
        assert!(!d.routes[0].strip_prefix);
        assert_eq!(
            d.routes[0].matcher.path.as_ref().unwrap().value,
            "/x\"\n  strip_prefix: true\n#"
        );
        assert_eq!(scalar("path_prefix", "*.x"), "\"*.x\"");
        assert_eq!(scalar("hosts", "a.com,*.b.com"), "[\"a.com\", \"*.b.com\"]");
    }

    #[test]
    fn the_address_comes_from_the_named_network() {
        let mut c = container(&[("gateway.port", "81")]);
        c.networks
            .insert("other".into(), "10.2.0.9".parse().unwrap());
        let e = declared(&c, None).unwrap_err();
        assert_eq!(e.label, "gateway.network");
        let d = declared(&c, Some("other")).unwrap();
        assert_eq!(d.upstream_config.targets.value[0].host, "10.2.0.9");
        assert_eq!(d.upstream_config.targets.value[0].port, 81);
        assert!(declared(&c, Some("absent")).is_err());
    }
}
