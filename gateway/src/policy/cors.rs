//! `cors`: cross-origin requests, following the Fetch standard. A preflight (`OPTIONS` with
//! `Origin` and `Access-Control-Request-Method`) is answered here and never forwarded; an
//! allowed origin's other requests get `Access-Control-Allow-Origin` (and credentials and
//! exposed headers) on the response. A disallowed origin gets no CORS headers at all, which a
//! browser reads as a refusal. `Vary: Origin` goes on every answer that depends on the origin.

use crate::headers::HeaderEdits;
use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use http::header::{
    HeaderName, HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
    VARY,
};
use http::Method;
use pingora::proxy::Session;

/// Which origins are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// Any origin (`*`; never with credentials).
    Any,
    /// Exact origins (`https://app.example.com`) and subdomain wildcards
    /// (`https://*.example.com`: scheme and a suffix).
    List {
        /// Exact origins, lower case.
        exact: Vec<String>,
        /// (`https://`, `.example.com`) pairs.
        wildcard: Vec<(String, String)>,
    },
}

/// The compiled policy.
#[derive(Debug, Clone)]
pub struct Cors {
    /// Allowed origins.
    pub origins: Origins,
    /// Allowed methods (upper case).
    pub methods: Vec<Method>,
    /// `Access-Control-Allow-Methods`.
    pub methods_value: HeaderValue,
    /// Allowed request headers (lower case).
    pub headers: Vec<HeaderName>,
    /// Credentials (cookies, `Authorization`) allowed.
    pub credentials: bool,
    /// `Access-Control-Max-Age`.
    pub max_age: Option<HeaderValue>,
    /// `Access-Control-Expose-Headers`.
    pub expose: Option<HeaderValue>,
}

static VARY_PREFLIGHT: HeaderValue = HeaderValue::from_static(
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
);

impl Cors {
    /// Whether `origin` is allowed. `null` (sandboxed documents, `file:`) only when listed.
    pub fn allows(&self, origin: &str) -> bool {
        match &self.origins {
            Origins::Any => true,
            Origins::List { exact, wildcard } => {
                // Compared without case and without a lower-cased copy: no allocation.
                exact.iter().any(|o| o.eq_ignore_ascii_case(origin))
                    || wildcard
                        .iter()
                        .any(|(scheme, suffix)| matches_wildcard(origin, scheme, suffix))
            }
        }
    }

    /// The `Access-Control-Allow-Origin` value for an allowed origin.
    fn allow_origin(&self, origin: &HeaderValue) -> HeaderValue {
        if self.origins == Origins::Any && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    /// The answer to a preflight, which never goes upstream.
    pub(super) fn on_request(&self, session: &Session, _ctx: &RequestCtx) -> Result<(), Answer> {
        let req = session.req_header();
        if req.method != Method::OPTIONS {
            return Ok(());
        }
        let (Some(origin), Some(method)) = (
            req.headers.get(ORIGIN),
            req.headers.get(ACCESS_CONTROL_REQUEST_METHOD),
        ) else {
            return Ok(());
        };
        let answer = Answer::empty(204).with_header(VARY, VARY_PREFLIGHT.clone());
        Err(
            match self.preflight(
                origin,
                method,
                req.headers.get(ACCESS_CONTROL_REQUEST_HEADERS),
            ) {
                Some(headers) => headers
                    .into_iter()
                    .fold(answer, |a, (name, value)| a.with_header(name, value)),
                // Refused: an answer without CORS headers.
                None => answer,
            },
        )
    }

    /// The CORS headers of a preflight's answer, or `None` when it is refused.
    pub fn preflight(
        &self,
        origin: &HeaderValue,
        method: &HeaderValue,
        requested: Option<&HeaderValue>,
    ) -> Option<Vec<(HeaderName, HeaderValue)>> {
        if !self.allows(origin.to_str().ok()?) {
            return None;
        }
        let method = Method::from_bytes(method.as_bytes()).ok()?;
        let simple = matches!(method, Method::GET | Method::HEAD | Method::POST);
        if !simple && !self.methods.contains(&method) {
            return None;
        }
        let mut out = vec![
            (ACCESS_CONTROL_ALLOW_ORIGIN, self.allow_origin(origin)),
            (ACCESS_CONTROL_ALLOW_METHODS, self.methods_value.clone()),
        ];
        if let Some(requested) = requested.filter(|r| !r.is_empty()) {
            let requested = requested.to_str().ok()?;
            for name in requested
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
            {
                let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
                if !self.headers.contains(&name) {
                    return None;
                }
            }
            out.push((
                ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_str(requested).ok()?,
            ));
        }
        if self.credentials {
            out.push((
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            ));
        }
        if let Some(age) = &self.max_age {
            out.push((ACCESS_CONTROL_MAX_AGE, age.clone()));
        }
        Some(out)
    }

    /// CORS headers on the response to an allowed origin's request; `Vary: Origin` whenever the
    /// answer depends on the origin.
    pub fn on_response(
        &self,
        headers: &mut dyn HeaderEdits,
        request: &http::HeaderMap,
    ) -> pingora::Result<()> {
        // A preflight's own answer already says all there is (a refused one, nothing).
        if request.contains_key(ACCESS_CONTROL_REQUEST_METHOD) {
            return Ok(());
        }
        let depends_on_origin = self.origins != Origins::Any || self.credentials;
        if depends_on_origin {
            headers.append(&VARY, HeaderValue::from_static("Origin"))?;
        }
        let Some(origin) = request.get(ORIGIN) else {
            return Ok(());
        };
        if !origin.to_str().is_ok_and(|o| self.allows(o)) {
            return Ok(());
        }
        headers.set(&ACCESS_CONTROL_ALLOW_ORIGIN, self.allow_origin(origin))?;
        if self.credentials {
            headers.set(
                &ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            )?;
        }
        if let Some(expose) = &self.expose {
            headers.set(&ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone())?;
        }
        Ok(())
    }
}

/// Whether `origin` is `SCHEME` + a subdomain (letters, digits, `-`, `.`) + `SUFFIX`, without
/// case.
fn matches_wildcard(origin: &str, scheme: &str, suffix: &str) -> bool {
    let b = origin.as_bytes();
    if b.len() <= scheme.len() + suffix.len() {
        return false;
    }
    let (head, rest) = b.split_at(scheme.len());
    let (sub, tail) = rest.split_at(rest.len() - suffix.len());
    head.eq_ignore_ascii_case(scheme.as_bytes())
        && tail.eq_ignore_ascii_case(suffix.as_bytes())
        && sub
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'.')
}

/// Parses the allowed origins: `*`, `https://app.example.com`, `https://*.example.com`.
pub fn parse_origins(list: &[String], credentials: bool) -> Result<Origins, String> {
    if list.iter().any(|o| o == "*") {
        if list.len() > 1 {
            return Err("`*` allows every origin: list nothing else with it".into());
        }
        if credentials {
            return Err("`*` cannot be combined with `allow_credentials` (the Fetch standard forbids it): list the origins".into());
        }
        return Ok(Origins::Any);
    }
    let mut exact = Vec::new();
    let mut wildcard = Vec::new();
    for o in list {
        let lower = o.to_ascii_lowercase();
        if lower == "null" {
            exact.push(lower);
            continue;
        }
        let Some((scheme, host)) = lower.split_once("://") else {
            return Err(format!("{o:?}: an origin is SCHEME://HOST[:PORT]"));
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("{o:?}: an origin has no path"));
        }
        match host.strip_prefix("*.") {
            Some(suffix) if !suffix.contains('*') && suffix.contains('.') => {
                wildcard.push((format!("{scheme}://"), format!(".{suffix}")))
            }
            _ if host.contains('*') => {
                return Err(format!(
                    "{o:?}: a wildcard is `SCHEME://*.DOMAIN` with a dot in DOMAIN"
                ))
            }
            _ => exact.push(lower),
        }
    }
    if exact.is_empty() && wildcard.is_empty() {
        return Err("needs at least one origin".into());
    }
    Ok(Origins::List { exact, wildcard })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], credentials: bool) -> Cors {
        let list: Vec<String> = origins.iter().map(|s| s.to_string()).collect();
        Cors {
            origins: parse_origins(&list, credentials).unwrap(),
            methods: vec![Method::GET, Method::PUT],
            methods_value: HeaderValue::from_static("GET, PUT"),
            headers: vec![HeaderName::from_static("content-type")],
            credentials,
            max_age: Some(HeaderValue::from_static("600")),
            expose: None,
        }
    }

    #[test]
    fn origins_exact_wildcard_any() {
        let p = policy(&["https://app.example.com", "https://*.example.org"], false);
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("https://APP.example.com"));
        assert!(!p.allows("http://app.example.com"));
        assert!(p.allows("https://a.b.example.org"));
        assert!(!p.allows("https://example.org"));
        assert!(!p.allows("https://evilexample.org"));
        assert!(!p.allows("https://x.example.org.evil.com"));
        assert!(!p.allows("null"));
        assert!(policy(&["*"], false).allows("null"));
        assert!(parse_origins(&["*".into()], true)
            .unwrap_err()
            .contains("cannot be combined"));
        assert!(parse_origins(&["https://*".into()], false).is_err());
        assert!(parse_origins(&["app.example.com".into()], false).is_err());
    }

    #[test]
    fn preflights_check_method_and_headers() {
        let p = policy(&["https://app.example.com"], true);
        let origin = HeaderValue::from_static("https://app.example.com");
        let put = HeaderValue::from_static("PUT");
        let ok = p
            .preflight(
                &origin,
                &put,
                Some(&HeaderValue::from_static("Content-Type")),
            )
            .unwrap();
        assert!(ok.contains(&(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())));
        assert!(ok.contains(&(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true")
        )));
        assert!(p
            .preflight(&origin, &HeaderValue::from_static("DELETE"), None)
            .is_none());
        assert!(p
            .preflight(&origin, &put, Some(&HeaderValue::from_static("x-secret")))
            .is_none());
        let other = HeaderValue::from_static("https://evil.example");
        assert!(p.preflight(&other, &put, None).is_none());
    }
}
