//! The route table: compiled once per configuration, matched per request.
//!
//! Precedence (documented in `docs/routing.md`):
//! 1. Host: an exact host beats the longest matching `*.wildcard`, which beats routes with no
//!    host. A more specific host table is searched completely before a less specific one.
//! 2. Path, within a host table: an exact `path`, then `path_regex` routes in file order, then
//!    the longest `path_prefix` (segment-aware; no path condition means prefix `/`).
//! 3. Among routes with the same path key: more conditions (methods, headers) first, then
//!    file order.
//!
//! Lookups cost hash probes per host label and per path segment, not per route, so matching
//! stays flat as the table grows. Regex routes are matched together by one `RegexSet`.

use crate::config::{MatchConfig, RouteConfig};
use http::{HeaderMap, HeaderName, Method};
use regex::{Regex, RegexSet};
use std::borrow::Cow;
use std::collections::HashMap as StdHashMap;

/// Hash maps keyed by request data: ahash is fast and randomly keyed (no hash flooding).
type HashMap<K, V> = StdHashMap<K, V, ahash::RandomState>;

/// A compiled header condition.
#[derive(Debug)]
enum HeaderCond {
    Present(HeaderName),
    Equals(HeaderName, Vec<u8>),
    Matches(HeaderName, Regex),
}

impl HeaderCond {
    fn holds(&self, headers: &HeaderMap) -> bool {
        match self {
            HeaderCond::Present(n) => headers.contains_key(n),
            HeaderCond::Equals(n, v) => headers.get_all(n).iter().any(|h| h.as_bytes() == v),
            HeaderCond::Matches(n, re) => headers
                .get_all(n)
                .iter()
                .any(|h| h.to_str().is_ok_and(|s| re.is_match(s))),
        }
    }
}

/// A compiled query-parameter condition (names and values compared percent-decoded).
#[derive(Debug)]
enum QueryCond {
    Present(String),
    Equals(String, String),
    Matches(String, Regex),
}

impl QueryCond {
    fn holds(&self, query: Option<&str>) -> bool {
        let Some(query) = query else {
            return false;
        };
        let name = match self {
            QueryCond::Present(n) | QueryCond::Equals(n, _) | QueryCond::Matches(n, _) => n,
        };
        form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k == name)
            .any(|(_, v)| match self {
                QueryCond::Present(_) => true,
                QueryCond::Equals(_, want) => v == want.as_str(),
                QueryCond::Matches(_, re) => re.is_match(&v),
            })
    }
}

/// Non-path conditions of a route.
#[derive(Debug, Default)]
struct Conditions {
    methods: Vec<Method>,
    headers: Vec<HeaderCond>,
    query: Vec<QueryCond>,
}

impl Conditions {
    fn weight(&self) -> usize {
        usize::from(!self.methods.is_empty()) + self.headers.len() + self.query.len()
    }

    fn hold(&self, method: &Method, headers: &HeaderMap, query: Option<&str>) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && self.headers.iter().all(|h| h.holds(headers))
            && self.query.iter().all(|q| q.holds(query))
    }
}

/// Routes of one host table, indexed by path.
#[derive(Default)]
struct PathTable {
    exact: HashMap<Box<str>, Vec<u32>>,
    prefix: HashMap<Box<str>, Vec<u32>>,
    regex_routes: Vec<u32>,
    regex: Option<RegexSet>,
    regex_sources: Vec<String>,
}

impl PathTable {
    fn finish(&mut self, conds: &[Conditions]) -> Result<(), regex::Error> {
        let by_specificity = |v: &mut Vec<u32>| {
            v.sort_by_key(|&i| (std::cmp::Reverse(conds[i as usize].weight()), i));
        };
        self.exact.values_mut().for_each(by_specificity);
        self.prefix.values_mut().for_each(by_specificity);
        if !self.regex_sources.is_empty() {
            self.regex = Some(RegexSet::new(&self.regex_sources)?);
        }
        Ok(())
    }

    fn find(
        &self,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
        query: Option<&str>,
        conds: &[Conditions],
    ) -> Option<u32> {
        let first_holding = |ids: &Vec<u32>| {
            ids.iter()
                .copied()
                .find(|&i| conds[i as usize].hold(method, headers, query))
        };
        if let Some(hit) = self.exact.get(path).and_then(first_holding) {
            return Some(hit);
        }
        if let Some(set) = &self.regex {
            // Matches come back in file order; the first whose conditions hold wins.
            if let Some(hit) = set
                .matches(path)
                .iter()
                .map(|k| self.regex_routes[k])
                .find(|&i| conds[i as usize].hold(method, headers, query))
            {
                return Some(hit);
            }
        }
        if self.prefix.is_empty() {
            return None;
        }
        // Longest prefix first: the whole path, then each shorter run ending before a `/`.
        let mut end = path.len();
        loop {
            let key = if end == 0 { "/" } else { &path[..end] };
            if let Some(hit) = self.prefix.get(key).and_then(first_holding) {
                return Some(hit);
            }
            if end == 0 {
                return None;
            }
            end = path[..end].rfind('/').unwrap_or(0);
        }
    }
}

/// How a route changes the path before forwarding.
#[derive(Debug)]
pub enum PathRewrite {
    /// Forward the (normalised) path unchanged.
    Keep,
    /// Remove the matched prefix (`strip_prefix: true`).
    StripPrefix(Box<str>),
    /// Replace the matched prefix.
    ReplacePrefix(Box<str>, Box<str>),
    /// Replace the whole path (exact-path routes).
    ReplaceAll(Box<str>),
    /// Regex replacement with `$1`/`${name}` captures.
    Regex(Regex, Box<str>),
}

impl PathRewrite {
    /// The new path, or `None` to keep the path as it is.
    pub fn apply(&self, path: &str) -> Option<String> {
        match self {
            PathRewrite::Keep => None,
            PathRewrite::StripPrefix(prefix) => {
                let rest = path.strip_prefix(&**prefix).unwrap_or(path);
                Some(if rest.is_empty() {
                    "/".into()
                } else {
                    rest.into()
                })
            }
            PathRewrite::ReplacePrefix(prefix, with) => {
                let rest = path.strip_prefix(&**prefix).unwrap_or(path);
                let mut out = String::with_capacity(with.len() + rest.len());
                out.push_str(with);
                if out.ends_with('/') && rest.starts_with('/') {
                    out.push_str(&rest[1..]);
                } else {
                    out.push_str(rest);
                }
                Some(out)
            }
            PathRewrite::ReplaceAll(with) => Some(with.to_string()),
            PathRewrite::Regex(re, with) => {
                let out = re.replace(path, &**with).into_owned();
                Some(if out.starts_with('/') {
                    out
                } else {
                    format!("/{out}")
                })
            }
        }
    }
}

/// The compiled route table.
pub struct Router {
    exact_hosts: HashMap<Box<str>, PathTable>,
    wildcard_hosts: HashMap<Box<str>, PathTable>,
    any_host: PathTable,
    conds: Vec<Conditions>,
}

/// Strips the trailing `/` of a prefix (but keeps the root `/`).
fn prefix_key(p: &str) -> &str {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/"
    } else {
        t
    }
}

fn add_route(t: &mut PathTable, m: &MatchConfig, id: u32) {
    if let Some(p) = &m.path {
        t.exact.entry(p.value.as_str().into()).or_default().push(id);
    } else if let Some(re) = &m.path_regex {
        t.regex_routes.push(id);
        t.regex_sources.push(anchored(&re.value));
    } else {
        let key = m.path_prefix.as_ref().map_or("/", |p| prefix_key(&p.value));
        t.prefix.entry(key.into()).or_default().push(id);
    }
}

fn anchored(re: &str) -> String {
    format!("^(?:{re})$")
}

impl Router {
    /// Compiles the routes of a validated configuration. Route `i` of the result is `routes[i]`.
    /// A regex that does not compile is an error with the index of its route.
    pub fn new(routes: &[RouteConfig]) -> Result<Router, (usize, regex::Error)> {
        let mut router = Router {
            exact_hosts: HashMap::default(),
            wildcard_hosts: HashMap::default(),
            any_host: PathTable::default(),
            conds: Vec::with_capacity(routes.len()),
        };
        for (i, r) in routes.iter().enumerate() {
            let id = i as u32;
            router
                .conds
                .push(compile_conditions(&r.matcher).map_err(|e| (i, e))?);
            let m = &r.matcher;
            if m.hosts.is_empty() {
                add_route(&mut router.any_host, m, id);
            }
            for h in &m.hosts {
                let table = match h.value.strip_prefix("*.") {
                    Some(suffix) => router.wildcard_hosts.entry(suffix.into()).or_default(),
                    None => router
                        .exact_hosts
                        .entry(h.value.as_str().into())
                        .or_default(),
                };
                add_route(table, m, id);
            }
        }
        // The regexes of a table are compiled together: an error there (a size limit) is
        // put on the first route with a regex.
        let first_regex = routes
            .iter()
            .position(|r| r.matcher.path_regex.is_some())
            .unwrap_or(0);
        let conds = std::mem::take(&mut router.conds);
        router
            .any_host
            .finish(&conds)
            .map_err(|e| (first_regex, e))?;
        for t in router
            .exact_hosts
            .values_mut()
            .chain(router.wildcard_hosts.values_mut())
        {
            t.finish(&conds).map_err(|e| (first_regex, e))?;
        }
        router.conds = conds;
        Ok(router)
    }

    /// Whether any route names a host. When none does, [`Router::find`] ignores the host, and
    /// the caller need not look it up.
    pub fn matches_hosts(&self) -> bool {
        !self.exact_hosts.is_empty() || !self.wildcard_hosts.is_empty()
    }

    /// Finds the route for a request. `host` is the Host/`:authority` without port, in any case.
    /// `path` must already be normalised ([`normalize_path`]).
    pub fn find(
        &self,
        host: Option<&str>,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Option<u32> {
        if let Some(host) = host.filter(|_| self.matches_hosts()) {
            let mut buf = [0u8; 253];
            if let Some(lower) = ascii_lower(host, &mut buf) {
                if let Some(hit) = self
                    .exact_hosts
                    .get(lower)
                    .and_then(|t| t.find(path, method, headers, query, &self.conds))
                {
                    return Some(hit);
                }
                if !self.wildcard_hosts.is_empty() {
                    let mut rest = lower;
                    while let Some(dot) = rest.find('.') {
                        rest = &rest[dot + 1..];
                        if let Some(hit) = self
                            .wildcard_hosts
                            .get(rest)
                            .and_then(|t| t.find(path, method, headers, query, &self.conds))
                        {
                            return Some(hit);
                        }
                    }
                }
            }
        }
        self.any_host
            .find(path, method, headers, query, &self.conds)
    }
}

fn ascii_lower<'a>(s: &str, buf: &'a mut [u8; 253]) -> Option<&'a str> {
    let b = s.as_bytes();
    if b.len() > buf.len() {
        return None;
    }
    let out = &mut buf[..b.len()];
    for (o, c) in out.iter_mut().zip(b) {
        *o = c.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

fn compile_conditions(m: &MatchConfig) -> Result<Conditions, regex::Error> {
    let mut c = Conditions::default();
    for meth in &m.methods {
        // Validated already; an invalid one would simply never match.
        if let Ok(meth) = Method::from_bytes(meth.value.as_bytes()) {
            c.methods.push(meth);
        }
    }
    for h in &m.headers {
        let Ok(name) = HeaderName::from_bytes(h.name.value.as_bytes()) else {
            continue;
        };
        c.headers.push(match (&h.value, &h.regex) {
            (Some(v), _) => HeaderCond::Equals(name, v.as_bytes().to_vec()),
            (None, Some(re)) => HeaderCond::Matches(name, Regex::new(&anchored(&re.value))?),
            (None, None) => HeaderCond::Present(name),
        });
    }
    for q in &m.query {
        let name = q.name.value.clone();
        c.query.push(match (&q.value, &q.regex) {
            (Some(v), _) => QueryCond::Equals(name, v.clone()),
            (None, Some(re)) => QueryCond::Matches(name, Regex::new(&anchored(&re.value))?),
            (None, None) => QueryCond::Present(name),
        });
    }
    Ok(c)
}

/// Compiles a route's rewrite rule.
pub fn compile_rewrite(r: &RouteConfig) -> Result<PathRewrite, regex::Error> {
    let m = &r.matcher;
    if r.strip_prefix {
        if let Some(p) = &m.path_prefix {
            let key = prefix_key(&p.value);
            return Ok(if key == "/" {
                PathRewrite::Keep
            } else {
                PathRewrite::StripPrefix(key.into())
            });
        }
    }
    let Some(with) = &r.rewrite else {
        return Ok(PathRewrite::Keep);
    };
    let with: Box<str> = with.value.as_str().into();
    Ok(if let Some(p) = &m.path_prefix {
        let key = prefix_key(&p.value);
        PathRewrite::ReplacePrefix(if key == "/" { "".into() } else { key.into() }, with)
    } else if let Some(re) = &m.path_regex {
        PathRewrite::Regex(Regex::new(&anchored(&re.value))?, with)
    } else {
        PathRewrite::ReplaceAll(with)
    })
}

/// Why a request path was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not origin-form, a bad `%` escape, an encoded `/` or `\`, a control character (raw or
    /// encoded), `..` above the root, or a `..;`/`.;` segment.
    Invalid,
}

/// Normalises a request path for matching and forwarding (RFC 3986 section 6): decodes
/// percent-escaped unreserved characters, upper-cases other escapes, removes `.` and `..`
/// segments and merges repeated slashes. Paths that could mean something else to an upstream
/// (`%2F`, `%5C`, `%00`, a raw `\`) are refused rather than guessed at.
///
/// Returns the input unchanged (borrowed) in the common case.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::Invalid);
    }
    let mut needs_work = false;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => needs_work = true,
            b'\\' | 0..=0x1F | 0x7F => return Err(PathError::Invalid),
            b'/' if matches!(b.get(i + 1), Some(b'/') | Some(b'.')) => needs_work = true,
            _ => {}
        }
    }
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }

    // 1. Percent-decoding of unreserved characters.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) else {
                return Err(PathError::Invalid);
            };
            let v = (h * 16 + l) as u8;
            match v {
                // Separators and control characters (Pingora percent-encodes raw ones in the
                // request line, so they arrive here as `%0D` and the like).
                b'/' | b'\\' | 0..=0x1F | 0x7F => return Err(PathError::Invalid),
                _ if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => decoded.push(v as char),
                _ => {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(v >> 4)]));
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(v & 15)]));
                }
            }
            i += 3;
        } else {
            // Multi-byte UTF-8 is copied byte-run by byte-run via the char boundary.
            let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
            decoded.push_str(&path[i..i + ch_len]);
            i += ch_len;
        }
    }

    // 2. Dot segments and empty segments.
    let trailing_slash =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::Invalid);
                }
            }
            // `..;x` is `..` to Java servlet containers (path parameters): refused, as it
            // would climb out of the matched prefix behind the gateway's back.
            s if s.starts_with("..;") || s.starts_with(".;") => return Err(PathError::Invalid),
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(yaml: &str) -> Vec<RouteConfig> {
        #[derive(serde::Deserialize)]
        struct Doc {
            routes: Vec<RouteConfig>,
        }
        serde_saphyr::from_str::<Doc>(yaml).unwrap().routes
    }

    fn find(r: &Router, host: &str, path: &str, method: &str) -> Option<u32> {
        r.find(
            Some(host),
            path,
            &Method::from_bytes(method.as_bytes()).unwrap(),
            &HeaderMap::new(),
            None,
        )
    }

    #[test]
    fn precedence_is_host_then_exact_regex_prefix() {
        let rs = routes(
            r#"
routes:
  - { name: root,     upstream: u }
  - { name: api,      upstream: u, match: { path_prefix: /api } }
  - { name: users,    upstream: u, match: { path_prefix: /api/users/ } }
  - { name: login,    upstream: u, match: { path: /api/users/login } }
  - { name: numeric,  upstream: u, match: { path_regex: "/api/users/[0-9]+" } }
  - { name: post,     upstream: u, match: { path_prefix: /api/users, methods: [POST] } }
  - { name: wild,     upstream: u, match: { hosts: ["*.example.com"], path_prefix: / } }
  - { name: exacthost, upstream: u, match: { hosts: [admin.example.com], path_prefix: /admin } }
"#,
        );
        let r = Router::new(&rs).unwrap();
        assert!(r.matches_hosts());
        assert_eq!(find(&r, "x", "/", "GET"), Some(0));
        assert_eq!(
            find(&r, "x", "/apix", "GET"),
            Some(0),
            "prefixes match whole segments"
        );
        assert_eq!(find(&r, "x", "/api", "GET"), Some(1));
        assert_eq!(find(&r, "x", "/api/orders", "GET"), Some(1));
        assert_eq!(find(&r, "x", "/api/users", "GET"), Some(2));
        assert_eq!(find(&r, "x", "/api/users/abc", "GET"), Some(2));
        assert_eq!(
            find(&r, "x", "/api/users/abc", "POST"),
            Some(5),
            "methods make a route more specific"
        );
        assert_eq!(
            find(&r, "x", "/api/users/login", "POST"),
            Some(3),
            "exact beats everything"
        );
        assert_eq!(
            find(&r, "x", "/api/users/42", "GET"),
            Some(4),
            "regex beats prefix"
        );
        assert_eq!(
            find(&r, "a.example.com", "/api", "GET"),
            Some(6),
            "host tables first"
        );
        assert_eq!(find(&r, "a.b.Example.COM", "/", "GET"), Some(6));
        assert_eq!(
            find(&r, "example.com", "/api", "GET"),
            Some(1),
            "*.x does not match x"
        );
        assert_eq!(
            find(&r, "admin.example.com", "/admin/x", "GET"),
            Some(7),
            "exact host beats wildcard"
        );
        assert_eq!(
            find(&r, "admin.example.com", "/other", "GET"),
            Some(6),
            "falls through to wildcard"
        );
    }

    #[test]
    fn no_match_is_none_and_headers_filter() {
        let rs = routes(
            r#"
routes:
  - { name: canary, upstream: u, match: { path_prefix: /a, headers: [ { name: x-canary, value: "1" } ] } }
  - { name: re,     upstream: u, match: { path_prefix: /a, headers: [ { name: X-Env, regex: "stag.*" } ] } }
  - { name: any,    upstream: u, match: { path: /b } }
"#,
        );
        let r = Router::new(&rs).unwrap();
        assert!(!r.matches_hosts(), "no route names a host");
        let mut h = HeaderMap::new();
        assert_eq!(r.find(None, "/a", &Method::GET, &h, None), None);
        h.insert("x-env", "staging".parse().unwrap());
        assert_eq!(r.find(None, "/a/b", &Method::GET, &h, None), Some(1));
        h.insert("x-canary", "1".parse().unwrap());
        assert_eq!(r.find(None, "/a/b", &Method::GET, &h, None), Some(0));
        assert_eq!(
            r.find(None, "/b/", &Method::GET, &h, None),
            None,
            "exact means exact"
        );
    }

    #[test]
    fn rewrites() {
        let rs = routes(
            r#"
routes:
  - { name: s, upstream: u, match: { path_prefix: /api/ }, strip_prefix: true }
  - { name: p, upstream: u, match: { path_prefix: /old }, rewrite: /new/ }
  - { name: r, upstream: u, match: { path_regex: "/u/([0-9]+)" }, rewrite: "/users/$1/profile" }
"#,
        );
        let rw: Vec<_> = rs.iter().map(|r| compile_rewrite(r).unwrap()).collect();
        assert_eq!(rw[0].apply("/api/users/1").as_deref(), Some("/users/1"));
        assert_eq!(rw[0].apply("/api").as_deref(), Some("/"));
        assert_eq!(rw[1].apply("/old/x").as_deref(), Some("/new/x"));
        assert_eq!(rw[1].apply("/old").as_deref(), Some("/new/"));
        assert_eq!(rw[2].apply("/u/42").as_deref(), Some("/users/42/profile"));
    }

    #[test]
    fn path_normalisation() {
        let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
        assert!(matches!(
            normalize_path("/api/users/1"),
            Ok(Cow::Borrowed(_))
        ));
        assert_eq!(n("/api//users").unwrap(), "/api/users");
        assert_eq!(n("/api/public/../admin").unwrap(), "/api/admin");
        assert_eq!(n("/api/./x/.").unwrap(), "/api/x/");
        assert_eq!(n("/%61pi/%7euser").unwrap(), "/api/~user");
        assert_eq!(n("/a%2e%2e/b").unwrap(), "/a../b");
        assert_eq!(n("/a/%2e%2E/b").unwrap(), "/b");
        assert_eq!(n("/a%20b%c3%a9").unwrap(), "/a%20b%C3%A9");
        assert_eq!(n("/a/").unwrap(), "/a/");
        assert_eq!(n("/é/./x").unwrap(), "/é/x");
        assert!(n("/..").is_err());
        assert!(n("/a/../../b").is_err());
        assert!(n("/a%2fb").is_err());
        assert!(n("/a%5Cb").is_err());
        assert!(n("/a\\b").is_err());
        assert!(n("/a%00").is_err());
        assert!(n("/a%zz").is_err());
        assert!(n("/a%4").is_err());
        assert!(n("a/b").is_err());
        assert!(n("/a%0Db").is_err());
        assert!(n("/a%7f").is_err());
        assert!(n("/a\tb").is_err());
        assert!(n("/api/public/..;/admin").is_err());
        assert!(n("/api/public/%2e%2e;x=1/admin").is_err());
        assert!(n("/api/.;/admin").is_err());
        assert_eq!(n("/a;v=1/./b").unwrap(), "/a;v=1/b");
    }

    #[test]
    fn query_conditions_hold_on_decoded_values() {
        let has = |cond: QueryCond, q: Option<&str>| cond.holds(q);
        assert!(has(QueryCond::Present("v".into()), Some("a=1&v")));
        assert!(!has(QueryCond::Present("v".into()), Some("a=1&vv=2")));
        assert!(!has(QueryCond::Present("v".into()), None));
        assert!(has(
            QueryCond::Equals("q".into(), "a b".into()),
            Some("q=a%20b")
        ));
        assert!(has(
            QueryCond::Equals("q".into(), "a b".into()),
            Some("q=x&q=a+b")
        ));
        let re = Regex::new(&anchored("[0-9]+")).unwrap();
        assert!(has(
            QueryCond::Matches("id".into(), re.clone()),
            Some("id=42")
        ));
        assert!(!has(QueryCond::Matches("id".into(), re), Some("id=42x")));
    }
}
