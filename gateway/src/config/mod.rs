//! The configuration file: the types users write (documented field by field in
//! `docs/configuration.md`) and loading with `${VAR}` substitution. What the values mean
//! together is checked by `plan::compile`.
//!
//! Loading never panics on input: every problem becomes a [`ConfigError`] that names the file,
//! line, column and field.

mod listeners;
mod policies;
mod process;
mod providers;
mod routes;
mod types;
mod upstreams;

pub use listeners::*;
pub use policies::*;
pub use process::*;
pub use providers::*;
pub use routes::*;
pub use types::{Addr, ByteSize, Dur, Target};
pub use upstreams::*;

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration error with its position in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the error is in.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// The field path (`routes[2].upstream`), empty when the error is about the file as a whole.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about the value at `at` in `file`.
    pub fn at(
        file: &Path,
        at: &serde_saphyr::Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            line: at.line(),
            column: at.column(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Worker threads for the proxy. Default: the number of CPUs.
    #[serde(default)]
    pub threads: Option<Spanned<usize>>,
    /// Let idle proxy threads steal work from busy ones (Tokio work stealing). Off by default:
    /// a proxy's tasks are short and evenly spread, and stealing costs CPU per request.
    #[serde(default)]
    pub work_stealing: bool,
    /// Accept HTTP/2 with prior knowledge (h2c) on plain-text listeners.
    #[serde(default)]
    pub h2c: bool,
    /// Idle upstream connections kept for reuse, across all upstreams. Default 1024. A pool
    /// smaller than the requests in flight forces new connections under load.
    #[serde(default = "default_pool")]
    pub upstream_keepalive_pool: usize,
    /// Where to accept client traffic, by name.
    pub listeners: Spanned<BTreeMap<String, ListenerConfig>>,
    /// The admin listener (`/health`, `/ready`). Off when absent.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// How upstream host names are resolved.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Peers (CIDRs) whose `X-Forwarded-*` headers are believed. Others have theirs replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// Which headers the gateway adds to requests and responses.
    #[serde(default)]
    pub forwarding: ForwardingConfig,
    /// Bounds on what a client may send.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// OpenTelemetry spans, one per request, exported over OTLP. None: off.
    #[serde(default)]
    pub traces: Option<TracesConfig>,
    /// SIGTERM handling.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Process files (pid file, upgrade socket).
    #[serde(default)]
    pub process: ProcessConfig,
    /// How the configuration file is watched.
    #[serde(default = "unplaced")]
    pub reload: Spanned<ReloadConfig>,
    /// The access log. Off when absent.
    #[serde(default)]
    pub access_log: Option<Spanned<AccessLogConfig>>,
    /// Token checks (JWT), by policy name; routes name the policy they use.
    #[serde(default)]
    pub auth: BTreeMap<String, Spanned<AuthConfig>>,
    /// Rate-limit policies, by name; routes name the policy they use.
    #[serde(default)]
    pub rate_limits: BTreeMap<String, Spanned<RateLimitConfig>>,
    /// Policies defined once by name (`ip_list`, `headers`), listed by routes and listeners.
    #[serde(default)]
    pub policies: BTreeMap<String, Spanned<NamedPolicyConfig>>,
    /// Named policies every route runs, before its own.
    #[serde(default)]
    pub default_policies: Vec<Spanned<String>>,
    /// Routes and upstreams from outside the file (Docker labels). A restart applies changes.
    #[serde(default)]
    pub providers: ProvidersConfig,
    /// Named groups of replicas that routes send traffic to.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// The route table, matched by the precedence in `docs/routing.md`.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

fn default_pool() -> usize {
    1024
}

/// A section's default, which is in no place of the file.
fn unplaced<T: Default>() -> Spanned<T> {
    let nowhere = serde_saphyr::Location::UNKNOWN;
    Spanned::new(T::default(), nowhere, nowhere)
}

fn yes() -> bool {
    true
}
/// A configuration file read from disk, with its source text kept for change detection.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// A hash of the file's bytes.
    pub source_hash: u64,
    /// The parsed configuration.
    pub config: Config,
}

/// Reads, substitutes `${VAR}` and parses a configuration file.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    load_text(path, read(path)?)
}

/// The file's text (for [`load_text`]), or why it cannot be read.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })
}

/// Substitutes `${VAR}` and parses `text`, read from `path`.
pub fn load_text(path: &Path, text: String) -> Result<LoadedConfig, ConfigError> {
    let config = parse(path, &text, &std::env::vars().collect())?;
    Ok(LoadedConfig {
        path: path.to_path_buf(),
        source_hash: crate::hash::content(text.as_bytes()),
        config,
    })
}

/// Parses configuration text (the checks across fields are `plan::compile`'s). `vars` are the values for `${VAR}` substitution.
pub fn parse(
    path: &Path,
    text: &str,
    vars: &std::collections::HashMap<String, String>,
) -> Result<Config, ConfigError> {
    let config = deserialize(path, text, Some(vars)).map_err(|mut error| {
        if let Some(message) = unredacted_message(path, text, vars, &error) {
            error.message = message;
        }
        error
    })?;
    Ok(config)
}

/// Once a file uses `${VAR}` anywhere, the YAML library words every later error without its
/// own text (`invalid interpolated scalar value`, `unknown variant `an interpolated
/// variant``), so that no substituted value, a secret maybe, can show in it. The error's own
/// words come back from a second parse of the text with the values written in (as the library
/// itself resolves them), when that parse fails on the same line and field, the scalar there
/// has no `${` of its own, and no substituted value shows in the words.
fn unredacted_message(
    path: &Path,
    text: &str,
    vars: &std::collections::HashMap<String, String>,
    error: &ConfigError,
) -> Option<String> {
    if !error.message.contains("interpolated") {
        return None;
    }
    let error_line = text
        .lines()
        .nth(usize::try_from(error.line).ok()?.checked_sub(1)?)?;
    let at = error_line.get(usize::try_from(error.column).ok()?.checked_sub(1)?..)?;
    if scalar_text(at).contains("${") {
        return None;
    }
    let references = braced_references(text);
    // Each reference resolved by the library: a list of the references as literal strings.
    let list: String = references
        .iter()
        .map(|r| format!("- '{}'\n", r.replace('\'', "''")))
        .collect();
    let mut options = serde_saphyr::Options::default();
    options.property_syntax = serde_saphyr::PropertySyntax::DockerCompose;
    let values: Vec<String> =
        serde_saphyr::from_str_with_options(&list, options.with_properties(vars.clone())).ok()?;
    let mut written = text.to_string();
    for (reference, value) in references.iter().zip(&values) {
        written = written.replacen(reference.as_str(), value, 1);
    }
    let literal = deserialize(path, &written, None).err()?;
    let leaks = values
        .iter()
        .any(|v| v.len() >= 3 && literal.message.contains(v.as_str()));
    // Values written in earlier on the line move the column: the line and field must agree.
    ((literal.line, &literal.field) == (error.line, &error.field) && !leaks)
        .then_some(literal.message)
}

/// The scalar at the start of `at` (the rest of a line from an error's column): a quoted one
/// to its closing quote, a plain one to the next flow delimiter or comment.
fn scalar_text(at: &str) -> &str {
    let end = match at.as_bytes().first() {
        Some(&quote @ (b'"' | b'\'')) => at[1..]
            .bytes()
            .position(|b| b == quote)
            .map_or(at.len(), |p| p + 2),
        _ => at.find([',', '}', ']', '#']).unwrap_or(at.len()),
    };
    &at[..end]
}

/// The `${...}` references of `text` in order (nested ones inside their outer one), skipping
/// `$$`.
fn braced_references(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'$', b'$') => i += 2,
            (b'$', b'{') => {
                let mut depth = 0;
                let mut end = i + 1;
                while end < bytes.len() {
                    match bytes[end] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    end += 1;
                }
                let Some(reference) = text.get(i..=end.min(bytes.len() - 1)) else {
                    break;
                };
                found.push(reference.to_string());
                i = end + 1;
            }
            _ => i += 1,
        }
    }
    found
}

/// Parses `text` into a [`Config`], with `${VAR}` substitution from `vars` when given.
fn deserialize(
    path: &Path,
    text: &str,
    vars: Option<&std::collections::HashMap<String, String>>,
) -> Result<Config, ConfigError> {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options.property_syntax = serde_saphyr::PropertySyntax::DockerCompose;
    let options = match vars {
        Some(vars) => options.with_properties(vars.clone()),
        None => options,
    };
    // serde_path_to_error tracks the field path (`routes[2].upstream`) the parser was in.
    let mut field = String::new();
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            field: clean_field_path(&field),
            message: one_line(&e.to_string()),
        }
    })
}

/// Drops the `.value` segments that `Spanned<T>` wrappers add to a serde path
/// (`upstreams.u.balance.value` → `upstreams.u.balance`); a real field named `value` after an
/// index (`headers[0].value`) stays.
fn clean_field_path(path: &str) -> String {
    if path == "." {
        return String::new();
    }
    let mut out = path.replace(".value[", "[").replace(".value.", ".");
    if let Some(stem) = out.strip_suffix(".value") {
        if !stem.ends_with(']') {
            out.truncate(stem.len());
        }
    }
    out
}

/// Keeps the first line of a parser message and drops its own " at line X column Y" suffix,
/// since the position is printed in front.
fn one_line(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or(msg).trim();
    match first.find(" at line ") {
        Some(i) => first[..i].to_string(),
        None => first.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const BASE: &str = "listeners:\n  http: { address: \"${ADDR:-127.0.0.1:8080}\" }\nupstreams:\n  u: { targets: [\"${HOST}:${PORT:-80}\"] }\nroutes:\n  - { name: u, upstream: u, match: { path: \"/a$$b\" } }\n";

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn compose_style_substitution() {
        let c = parse(
            Path::new("t.yaml"),
            BASE,
            &vars(&[("HOST", "svc"), ("ADDR", "")]),
        )
        .unwrap();
        assert_eq!(
            c.listeners.value["http"].address.value.0.to_string(),
            "127.0.0.1:8080"
        );
        let t = &c.upstreams["u"].targets.value[0];
        assert_eq!((t.host.as_str(), t.port), ("svc", 80));
        assert_eq!(c.routes[0].matcher.path.as_ref().unwrap().value, "/a$b");
        let c = parse(
            Path::new("t.yaml"),
            BASE,
            &vars(&[("HOST", "svc"), ("PORT", "3001")]),
        )
        .unwrap();
        assert_eq!(c.upstreams["u"].targets.value[0].port, 3001);
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse(Path::new("t.yaml"), BASE, &vars(&[("HOST", "svc")])).unwrap();
        let u = &c.upstreams["u"];
        assert_eq!(u.balance.value, Balance::RoundRobin);
        assert_eq!(u.retries, 2);
        assert_eq!(u.discovery.value.refresh, Dur::secs(5));
        assert_eq!(
            u.timeouts.value,
            TimeoutsConfig {
                connect: Dur::secs(2),
                read: Dur::secs(30),
                write: Dur::secs(30),
                idle: Dur::secs(4),
                stream_idle: Dur::secs(300),
            }
        );
        assert_eq!(
            u.health.value.passive,
            Some(PassiveHealthConfig {
                max_fails: 1,
                fail_timeout: Dur::secs(10)
            })
        );
        assert!(u.health.value.active.is_none());
        assert_eq!(c.shutdown.grace_period, Dur::secs(5));
        assert!(c.reload.value.watch);
        assert!(!c.h2c && !c.work_stealing && c.threads.is_none());
        assert_eq!(
            (c.limits.header_timeout, c.limits.keepalive_timeout),
            (Dur::secs(10), Dur::secs(60))
        );
        assert_eq!(c.listeners.value["http"].read_buffer, 4096);
    }

    #[test]
    fn errors_keep_their_words_in_files_that_use_substitution() {
        let text = "listeners:\n  http: { address: \"${ADDR:-127.0.0.1:8080}\" }\nupstreams:\n  u: { targets: [\"${HOST:-svc}:${PORT:-80}\"], balance: foo }\nroutes:\n  - { name: u, upstream: u }\nlimits:\n  header_timeout: 0s\n";
        let e = parse(Path::new("t.yaml"), text, &vars(&[("PORT", "81")])).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (4, "upstreams.u.balance"),
            "{e}"
        );
        assert!(e.message.contains("unknown variant `foo`"), "{e}");
        let text = text.replace(", balance: foo", "");
        let e = parse(Path::new("t.yaml"), &text, &vars(&[])).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (8, "limits.header_timeout"),
            "{e}"
        );
        assert!(e.message.contains("more than 0s"), "{e}");
        // An error in a substituted value never shows the value.
        for (line, secret) in [
            (
                "  u: { targets: [\"127.0.0.1:80\"], balance: \"${BAL}\" }",
                "hunter22",
            ),
            (
                "  u: { targets: [\"127.0.0.1:80\"], timeouts: { connect: \"${T}\" } }",
                "hunter2x",
            ),
            ("  u: { targets: [\"${T}\"] }", "hunter2:99999"),
        ] {
            let text = format!("upstreams:\n{line}\nroutes:\n  - {{ name: u, upstream: u }}\n");
            let e = parse(
                Path::new("t.yaml"),
                &text,
                &vars(&[("BAL", secret), ("T", secret)]),
            )
            .unwrap_err();
            assert_eq!(e.line, 2, "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn braced_references_are_found_whole() {
        assert_eq!(
            braced_references("a: ${A}$${B} ${C:-${D}x} $$ ${E"),
            ["${A}", "${C:-${D}x}", "${E"]
        );
        assert_eq!(scalar_text("foo }"), "foo ");
        assert_eq!(scalar_text("\"a, ${B}\", c"), "\"a, ${B}\"");
    }

    #[test]
    fn connection_timeouts_must_be_positive() {
        for field in ["header_timeout", "keepalive_timeout"] {
            let text = format!(
                "upstreams:\n  u: {{ targets: [\"127.0.0.1:80\"] }}\nroutes:\n  - {{ name: u, upstream: u }}\nlimits:\n  {field}: 0s\n"
            );
            let e = parse(Path::new("t.yaml"), &text, &vars(&[])).unwrap_err();
            assert_eq!(e.field, format!("limits.{field}"), "{e}");
            assert_eq!(e.line, 6, "{e}");
            assert!(e.message.contains("more than 0s"), "{e}");
        }
    }

    #[test]
    fn field_paths_lose_spanned_wrappers_only() {
        assert_eq!(
            clean_field_path("upstreams.u.balance.value"),
            "upstreams.u.balance"
        );
        assert_eq!(
            clean_field_path("upstreams.u.targets.value[0]"),
            "upstreams.u.targets[0]"
        );
        assert_eq!(
            clean_field_path("routes[0].match.headers[1].value"),
            "routes[0].match.headers[1].value"
        );
        assert_eq!(
            clean_field_path("routes[0].match.headers[1].name.value"),
            "routes[0].match.headers[1].name"
        );
        assert_eq!(clean_field_path("."), "");
    }
}
