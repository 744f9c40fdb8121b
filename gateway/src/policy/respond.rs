//! `redirect` and `respond`: a route that answers by itself. A redirect's target is built from
//! the request (scheme, host, path after the route's `rewrite`, query); a fixed answer has a
//! status, a body and a content type.

use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use bytes::Bytes;
use http::header::{HeaderValue, LOCATION};
use pingora::proxy::Session;
use std::sync::Arc;

/// One piece of a redirect target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text as written.
    Text(String),
    /// `{scheme}`: `http` or `https`, as the request came.
    Scheme,
    /// `{host}`: the request's host, port included.
    Host,
    /// `{path}`: the path, after the route's `rewrite`.
    Path,
    /// `{query}`: `?` and the query string, or nothing.
    Query,
}

/// Parses a redirect target; `{{`/`}}` are literal braces.
pub fn parse_target(text: &str) -> Result<Vec<Part>, String> {
    let parts = super::template::parse(text, Part::Text, |name| match name {
        "scheme" => Ok(Part::Scheme),
        "host" => Ok(Part::Host),
        "path" => Ok(Part::Path),
        "query" => Ok(Part::Query),
        other => Err(format!(
            "unknown placeholder {{{other}}} (scheme, host, path, query)"
        )),
    })?;
    let fixed: String = parts
        .iter()
        .map(|p| match p {
            Part::Text(t) => t.as_str(),
            _ => "x",
        })
        .collect();
    HeaderValue::from_str(&fixed).map_err(|_| "not a valid header value".to_string())?;
    Ok(parts)
}

/// The compiled redirect.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
    /// The target.
    pub to: Vec<Part>,
}

impl Redirect {
    pub(super) fn on_request(&self, session: &Session, ctx: &RequestCtx) -> Result<(), Answer> {
        let req = session.req_header();
        let path = ctx.new_path.as_deref().unwrap_or(req.uri.path());
        // The host as the client wrote it, port included (checked by the head checks).
        let host = req
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        let location = self.render(ctx.tls, host, path, req.uri.query());
        match HeaderValue::from_str(&location) {
            Ok(v) => Err(Answer::empty(self.status).with_header(LOCATION, v)),
            Err(_) => Err(Answer::status(400)),
        }
    }

    /// The target for a request. The path always starts with one `/` and has no `\`, so it can
    /// never turn the target into another host (`//evil`, `/\evil`).
    pub fn render(&self, tls: bool, host: &str, path: &str, query: Option<&str>) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.to {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Scheme => out.push_str(if tls { "https" } else { "http" }),
                Part::Host => out.push_str(host),
                Part::Path => {
                    out.push('/');
                    // Written piece by piece, without a copy of the path.
                    let trimmed = path.trim_start_matches(['/', '\\']);
                    let mut pieces = trimmed.split('\\');
                    out.push_str(pieces.next().unwrap_or_default());
                    for piece in pieces {
                        out.push_str("%5C");
                        out.push_str(piece);
                    }
                }
                Part::Query => {
                    if let Some(q) = query.filter(|q| !q.is_empty()) {
                        out.push('?');
                        out.push_str(q);
                    }
                }
            }
        }
        out
    }
}

/// The compiled fixed answer.
#[derive(Debug, Clone)]
pub struct Respond {
    /// Its status.
    pub status: u16,
    /// Its `Content-Type` and body.
    pub content: Arc<(HeaderValue, Bytes)>,
}

impl Respond {
    pub(super) fn on_request(&self) -> Result<(), Answer> {
        Err(Answer::fixed(self.status, self.content.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_cannot_leave_for_another_host() {
        let r = Redirect {
            status: 301,
            to: parse_target("{path}{query}").unwrap(),
        };
        assert_eq!(
            r.render(false, "h", "//evil.example/x", None),
            "/evil.example/x"
        );
        assert_eq!(
            r.render(false, "h", "/\\evil.example", None),
            "/evil.example"
        );
        assert_eq!(r.render(false, "h", "/a\\b", Some("q=1")), "/a%5Cb?q=1");
        let r = Redirect {
            status: 308,
            to: parse_target("https://{host}{path}{query}").unwrap(),
        };
        assert_eq!(
            r.render(false, "example.com:8080", "/x", Some("")),
            "https://example.com:8080/x"
        );
        assert_eq!(
            r.render(false, "example.com", "//@evil.example", None),
            "https://example.com/@evil.example"
        );
    }

    #[test]
    fn targets_parse() {
        assert!(parse_target("{scheme}://{host}{path}{{x}}").is_ok());
        assert!(parse_target("{nope}")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(parse_target("/a\r\nb").is_err());
        assert!(parse_target("/a{").is_err());
    }
}
