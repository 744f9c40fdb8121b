//! Named policies (`policies:`): compiled once, shared by the routes and listeners that list
//! them.

use super::validate::{parse_cidr, Checker};
use super::NamedPolicy;
use crate::config::{
    ApiKeyConfig, BasicAuthConfig, CompressConfig, ConcurrencyConfig, Config, ConfigError,
    CorsConfig, ErrorPageConfig, FailMode, ForwardAuthConfig, HeaderEditsConfig, NamedPolicyConfig,
    RespondConfig,
};
use crate::policy::compress::{Coding, MediaPattern, DEFAULT_TYPES};
use crate::policy::cors::parse_origins;
use crate::policy::headers::{parse_name, parse_template, Edits};
use crate::policy::ip_list::Cidrs;
use crate::policy::respond::parse_target;
use crate::policy::{
    ApiKey, BasicAuth, Compress, ConcurrencyLimit, ConcurrencySpec, Cors, ErrorPage, ErrorPages,
    ForwardAuth, HeaderRules, IpList, Policy, Redirect, Respond,
};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Every named policy, compiled.
pub(super) fn compile(
    c: &Checker,
    config: &Config,
) -> Result<BTreeMap<String, NamedPolicy>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, spanned) in &config.policies {
        let field = format!("policies.{name}");
        let policy = match &spanned.value {
            NamedPolicyConfig::IpList(list) => {
                let cidrs = |entries: &[Spanned<String>], which: &str| {
                    entries
                        .iter()
                        .enumerate()
                        .map(|(i, e)| {
                            parse_cidr(&e.value).map_err(|m| {
                                c.err_at(e, format!("{field}.ip_list.{which}[{i}]"), m)
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                let allow = cidrs(&list.allow, "allow")?;
                let deny = cidrs(&list.deny, "deny")?;
                if allow.is_empty() && deny.is_empty() {
                    return Err(c.err_at(
                        spanned,
                        format!("{field}.ip_list"),
                        "needs `allow` or `deny`",
                    ));
                }
                Policy::IpList(Arc::new(IpList {
                    allow: (!allow.is_empty()).then(|| Cidrs::new(allow)),
                    deny: Cidrs::new(deny),
                }))
            }
            NamedPolicyConfig::Headers(rules) => {
                let request = edits(c, &rules.request, &format!("{field}.headers.request"), true)?;
                let response = edits(
                    c,
                    &rules.response,
                    &format!("{field}.headers.response"),
                    false,
                )?;
                if request.is_empty() && response.is_empty() {
                    return Err(c.err_at(spanned, format!("{field}.headers"), "edits nothing"));
                }
                Policy::Headers(Arc::new(HeaderRules { request, response }))
            }
            NamedPolicyConfig::Redirect(r) => {
                if ![301, 302, 303, 307, 308].contains(&r.status) {
                    return Err(c.err_at(
                        spanned,
                        format!("{field}.redirect.status"),
                        "must be 301, 302, 303, 307 or 308",
                    ));
                }
                let to = parse_target(&r.to.value)
                    .map_err(|m| c.err_at(&r.to, format!("{field}.redirect.to"), m))?;
                Policy::Redirect(Arc::new(Redirect {
                    status: r.status,
                    to,
                }))
            }
            NamedPolicyConfig::Cors(cors) => Policy::Cors(Arc::new(compile_cors(c, cors, &field)?)),
            NamedPolicyConfig::Respond(r) => {
                Policy::Respond(Arc::new(respond(c, spanned, r, &field)?))
            }
            NamedPolicyConfig::Compress(z) => {
                Policy::Compress(Arc::new(compress(c, spanned, z, &field)?))
            }
            NamedPolicyConfig::ApiKey(k) => Policy::ApiKey(Arc::new(api_key(c, k, &field)?)),
            NamedPolicyConfig::BasicAuth(b) => {
                Policy::BasicAuth(Arc::new(basic_auth(c, b, &field)?))
            }
            NamedPolicyConfig::ForwardAuth(f) => {
                Policy::ForwardAuth(Arc::new(forward_auth(c, config, f, &field)?))
            }
            NamedPolicyConfig::GrpcWeb(_) => Policy::GrpcWeb(crate::policy::GrpcWeb),
            NamedPolicyConfig::Concurrency(l) => {
                let spec = concurrency_spec(l)
                    .map_err(|m| c.err_at(spanned, format!("{field}.concurrency"), m))?;
                Policy::Concurrency(Arc::new(ConcurrencyLimit::new(name, spec)))
            }
        };
        out.insert(name.clone(), NamedPolicy::new(policy));
    }
    Ok(out)
}

fn api_key(c: &Checker, k: &ApiKeyConfig, field: &str) -> Result<ApiKey, ConfigError> {
    let header = |h: &Option<Spanned<String>>, what: &str, default: &'static str| match h {
        None => Ok(http::HeaderName::from_static(default)),
        Some(h) => crate::policy::headers::parse_name(&h.value)
            .map_err(|m| c.err_at(h, format!("{field}.api_key.{what}"), m)),
    };
    let name = header(&k.header, "header", "x-api-key")?;
    let forward_name = header(&k.forward_name, "forward_name", "x-api-key-name")?;
    let forward_scopes = header(&k.forward_scopes, "forward_scopes", "x-api-key-scopes")?;
    let at = format!("{field}.api_key.keys_file");
    let text = String::from_utf8(read_body(c, &k.keys_file, at.clone())?)
        .map_err(|_| c.err_at(&k.keys_file, at.clone(), "not UTF-8 text"))?;
    let keys = crate::policy::api_key::parse_keys(&text, &forward_name, &forward_scopes)
        .map_err(|m| c.err_at(&k.keys_file, at, format!("{}: {m}", k.keys_file.value)))?;
    Ok(ApiKey {
        header: name,
        query: k.query.clone(),
        required_scopes: k.scopes.clone(),
        keys,
        forward_headers: vec![forward_name, forward_scopes],
    })
}

fn forward_auth(
    c: &Checker,
    config: &Config,
    f: &ForwardAuthConfig,
    field: &str,
) -> Result<ForwardAuth, ConfigError> {
    let at = |what: &str| format!("{field}.forward_auth.{what}");
    match config.upstreams.get(&f.upstream.value) {
        None => {
            let known: Vec<&str> = config.upstreams.keys().map(String::as_str).collect();
            let m = format!(
                "no upstream named `{}` (defined: {})",
                f.upstream.value,
                known.join(", ")
            );
            return Err(c.err_at(&f.upstream, at("upstream"), m));
        }
        Some(u)
            if u.tls.is_some() || u.protocol.value != crate::config::UpstreamProtocol::Http1 =>
        {
            let m = "the auth service is asked in plain HTTP/1.1; this upstream has `tls` or another `protocol`";
            return Err(c.err_at(&f.upstream, at("upstream"), m));
        }
        Some(_) => {}
    }
    let path = match &f.path {
        None => "/".to_string(),
        Some(p)
            if p.value.starts_with('/') && p.value.parse::<http::uri::PathAndQuery>().is_ok() =>
        {
            p.value.clone()
        }
        Some(p) => return Err(c.err_at(p, at("path"), "a path starting with `/`")),
    };
    let names = |list: &[String], what: &str| {
        list.iter()
            .map(|n| {
                http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                    c.err_at(&f.upstream, at(what), format!("{n:?} is not a header name"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let default = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let request_headers = names(
        f.request_headers
            .as_deref()
            .unwrap_or(&default(&["authorization", "cookie"])),
        "request_headers",
    )?;
    let response_headers = names(&f.response_headers, "response_headers")?;
    for h in &response_headers {
        parse_name(h.as_str()).map_err(|m| c.err_at(&f.upstream, at("response_headers"), m))?;
    }
    let client_headers = names(
        f.client_headers.as_deref().unwrap_or(&default(&[
            "www-authenticate",
            "location",
            "set-cookie",
        ])),
        "client_headers",
    )?;
    let cache = match &f.cache {
        None => None,
        Some(cache) => {
            let name = http::HeaderName::from_bytes(cache.header.as_bytes())
                .map_err(|_| c.err_at(&f.upstream, at("cache.header"), "not a header name"))?;
            Some((name, cache.ttl.0))
        }
    };
    Ok(ForwardAuth::new(
        field.trim_start_matches("policies."),
        f.upstream.value.clone(),
        path,
        request_headers,
        response_headers,
        client_headers,
        f.timeout.map_or(std::time::Duration::from_secs(2), |t| t.0),
        f.on_error == Some(FailMode::Open),
        f.max_body.map_or(64 << 10, |b| b.0 as usize),
        cache,
    ))
}

/// A concurrency limit's settings, checked.
pub fn concurrency_spec(l: &ConcurrencyConfig) -> Result<ConcurrencySpec, String> {
    if l.max == 0 {
        return Err("`max` must be 1 or more".into());
    }
    Ok(ConcurrencySpec {
        max: l.max,
        queue: l.queue.unwrap_or(l.max),
        queue_timeout: l
            .queue_timeout
            .map_or(std::time::Duration::from_secs(1), |d| d.0),
    })
}

fn basic_auth(c: &Checker, b: &BasicAuthConfig, field: &str) -> Result<BasicAuth, ConfigError> {
    let forward_user = match &b.forward_user {
        None => http::HeaderName::from_static("x-auth-user"),
        Some(h) => crate::policy::headers::parse_name(&h.value)
            .map_err(|m| c.err_at(h, format!("{field}.basic_auth.forward_user"), m))?,
    };
    let at = format!("{field}.basic_auth.users_file");
    let text = String::from_utf8(read_body(c, &b.users_file, at.clone())?)
        .map_err(|_| c.err_at(&b.users_file, at.clone(), "not UTF-8 text"))?;
    let users =
        crate::policy::basic_auth::parse_users(&text, Some(&forward_user)).map_err(|m| {
            c.err_at(
                &b.users_file,
                at.clone(),
                format!("{}: {m}", b.users_file.value),
            )
        })?;
    if users.is_empty() {
        let m = format!("{}: no users", b.users_file.value);
        return Err(c.err_at(&b.users_file, at, m));
    }
    let realm = b.realm.as_deref().unwrap_or("gateway");
    let challenge =
        http::HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
            .ok()
            .filter(|_| !realm.contains('"'))
            .ok_or_else(|| {
                c.err_at(
                    &b.users_file,
                    format!("{field}.basic_auth.realm"),
                    "not a valid realm",
                )
            })?;
    Ok(BasicAuth::new(
        field.trim_start_matches("policies."),
        users,
        challenge,
        !b.keep_authorization,
        Some(forward_user),
        b.max_failures.unwrap_or(5),
        b.failure_window
            .map_or(std::time::Duration::from_secs(60), |d| d.0),
    ))
}

fn compress(
    c: &Checker,
    at: &Spanned<NamedPolicyConfig>,
    z: &CompressConfig,
    field: &str,
) -> Result<Compress, ConfigError> {
    let mut codings = Vec::new();
    for (i, name) in z.encodings.iter().enumerate() {
        let coding = Coding::parse(&name.value).ok_or_else(|| {
            c.err_at(
                name,
                format!("{field}.compress.encodings[{i}]"),
                format!("{:?} is not one of zstd, br, gzip", name.value),
            )
        })?;
        if codings.contains(&coding) {
            let at = format!("{field}.compress.encodings[{i}]");
            return Err(c.err_at(name, at, "listed twice"));
        }
        codings.push(coding);
    }
    if codings.is_empty() {
        codings = vec![Coding::Zstd, Coding::Brotli, Coding::Gzip];
    }
    for (name, level) in &z.levels {
        let at = format!("{field}.compress.levels.{name}");
        let coding = Coding::parse(name)
            .ok_or_else(|| c.err_at(level, at.clone(), "levels are for zstd, br and gzip"))?;
        let (range, _) = coding.levels();
        if !range.contains(&level.value) {
            let m = format!("{} is out of range {range:?}", level.value);
            return Err(c.err_at(level, at, m));
        }
    }
    let encodings = codings
        .into_iter()
        .map(|coding| {
            let level = z.levels.get(coding.token()).map(|l| l.value);
            (coding, level.unwrap_or(coding.levels().1))
        })
        .collect();
    let types = if z.types.is_empty() {
        DEFAULT_TYPES
            .iter()
            .map(|t| MediaPattern::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| c.err_at(at, format!("{field}.compress.types"), m))?
    } else {
        z.types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                MediaPattern::parse(&t.value)
                    .map_err(|m| c.err_at(t, format!("{field}.compress.types[{i}]"), m))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok(Compress {
        encodings,
        min_size: z.min_size.unwrap_or(1024),
        types,
    })
}

fn compile_cors(c: &Checker, cors: &CorsConfig, field: &str) -> Result<Cors, ConfigError> {
    let at = &cors.allow_origins;
    let err = |what: &str, m: String| c.err_at(at, format!("{field}.cors.{what}"), m);
    let origins =
        parse_origins(&at.value, cors.allow_credentials).map_err(|m| err("allow_origins", m))?;
    let mut methods = Vec::new();
    for m in &cors.allow_methods {
        let method = http::Method::from_bytes(m.as_bytes())
            .ok()
            .filter(|_| m.bytes().all(|b| b.is_ascii_uppercase()))
            .ok_or_else(|| {
                err(
                    "allow_methods",
                    format!("{m:?} is not an upper-case method"),
                )
            })?;
        methods.push(method);
    }
    if methods.is_empty() {
        methods = vec![http::Method::GET, http::Method::HEAD, http::Method::POST];
    }
    let names = |list: &[String], what: &str| {
        list.iter()
            .map(|n| {
                http::HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| err(what, format!("{n:?} is not a header name")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let headers = names(&cors.allow_headers, "allow_headers")?;
    let expose = names(&cors.expose_headers, "expose_headers")?;
    let join = |items: Vec<String>| http::HeaderValue::from_str(&items.join(", ")).ok();
    Ok(Cors {
        origins,
        methods_value: join(methods.iter().map(|m| m.to_string()).collect())
            .ok_or_else(|| err("allow_methods", "not a valid header value".into()))?,
        methods,
        headers,
        credentials: cors.allow_credentials,
        max_age: cors.max_age.map(|d| http::HeaderValue::from(d.0.as_secs())),
        expose: (!expose.is_empty())
            .then(|| join(expose.iter().map(|h| h.to_string()).collect()))
            .flatten(),
    })
}

/// Largest `respond` body or error page.
const MAX_BODY: u64 = 1 << 20;

/// A body from a file, at most [`MAX_BODY`] bytes.
fn read_body(c: &Checker, file: &Spanned<String>, field: String) -> Result<Vec<u8>, ConfigError> {
    std::fs::metadata(&file.value)
        .map_err(|e| e.to_string())
        .and_then(|m| {
            if m.len() > MAX_BODY {
                Err(format!("{} bytes: more than 1 MiB", m.len()))
            } else {
                std::fs::read(&file.value).map_err(|e| e.to_string())
            }
        })
        .map_err(|e| c.err_at(file, field, format!("{}: {e}", file.value)))
}

/// A listener's or a route's error pages.
pub(super) fn error_pages(
    c: &Checker,
    pages: &BTreeMap<u16, Spanned<ErrorPageConfig>>,
    field: &str,
) -> Result<Option<Arc<ErrorPages>>, ConfigError> {
    if pages.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (status, page) in pages {
        let at = format!("{field}.{status}");
        if !(400..=599).contains(status) {
            return Err(c.err_at(page, at, "an error page is for a status from 400 to 599"));
        }
        let text = match (&page.value.body, &page.value.file) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(c.err_at(page, at, "needs `body` or `file` (one of them)"))
            }
            (Some(body), None) => body.clone(),
            (None, Some(file)) => String::from_utf8(read_body(c, file, format!("{at}.file"))?)
                .map_err(|_| c.err_at(file, format!("{at}.file"), "not UTF-8 text"))?,
        };
        let content_type = page
            .value
            .content_type
            .as_deref()
            .unwrap_or("text/html; charset=utf-8");
        let content_type = http::HeaderValue::from_str(content_type).map_err(|_| {
            c.err_at(
                page,
                format!("{at}.content_type"),
                "not a valid header value",
            )
        })?;
        out.push((*status, ErrorPage::new(content_type, &text)));
    }
    Ok(Some(Arc::new(ErrorPages(out))))
}

fn respond(
    c: &Checker,
    at: &Spanned<NamedPolicyConfig>,
    r: &RespondConfig,
    field: &str,
) -> Result<Respond, ConfigError> {
    if !(200..=599).contains(&r.status) {
        return Err(c.err_at(at, format!("{field}.respond.status"), "must be 200 to 599"));
    }
    let body = match (&r.body, &r.file) {
        (Some(_), Some(file)) => {
            return Err(c.err_at(
                file,
                format!("{field}.respond"),
                "`body` or `file`, not both",
            ))
        }
        (Some(body), None) => bytes::Bytes::from(body.clone()),
        (None, Some(file)) => {
            bytes::Bytes::from(read_body(c, file, format!("{field}.respond.file"))?)
        }
        (None, None) => bytes::Bytes::new(),
    };
    let content_type = r
        .content_type
        .as_deref()
        .unwrap_or("text/plain; charset=utf-8");
    let content_type = http::HeaderValue::from_str(content_type).map_err(|_| {
        c.err_at(
            at,
            format!("{field}.respond.content_type"),
            "not a valid header value",
        )
    })?;
    Ok(Respond {
        status: r.status,
        content: Arc::new((content_type, body)),
    })
}

fn edits(
    c: &Checker,
    e: &HeaderEditsConfig,
    field: &str,
    request: bool,
) -> Result<Edits, ConfigError> {
    let mut out = Edits::default();
    for (i, name) in e.remove.iter().enumerate() {
        out.remove.push(
            parse_name(&name.value)
                .map_err(|m| c.err_at(name, format!("{field}.remove[{i}]"), m))?,
        );
    }
    for (which, map) in [("set", &e.set), ("append", &e.append)] {
        for (name, value) in map {
            let at = format!("{field}.{which}.{name}");
            let header = parse_name(name).map_err(|m| c.err_at(value, at.clone(), m))?;
            let value =
                parse_template(&value.value, request).map_err(|m| c.err_at(value, at, m))?;
            match which {
                "set" => out.set.push((header, value)),
                _ => out.append.push((header, value)),
            }
        }
    }
    Ok(out)
}

/// The named policies a list refers to, in order; an unknown name is an error at its place.
pub(super) fn resolve(
    c: &Checker,
    named: &BTreeMap<String, NamedPolicy>,
    names: &[Spanned<String>],
    field: &str,
) -> Result<Vec<NamedPolicy>, ConfigError> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            named.get(&n.value).cloned().ok_or_else(|| {
                let known: Vec<&str> = named.keys().map(String::as_str).collect();
                c.err_at(
                    n,
                    format!("{field}[{i}]"),
                    format!(
                        "no policy named `{}` (defined: {})",
                        n.value,
                        known.join(", ")
                    ),
                )
            })
        })
        .collect()
}
