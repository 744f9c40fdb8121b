//! `headers`: set, append and remove request headers (before the request goes upstream) and
//! response headers (before the response goes to the client), with values built from the
//! request. Names and literal text are checked when the configuration is compiled; a value
//! built at request time that is not a valid header value (a claim with a line break, say) is
//! not sent.

use crate::headers::HeaderEdits;
use crate::proxy::context::RequestCtx;
use http::header::{HeaderName, HeaderValue};
use std::fmt::Write as _;

/// Headers no rule may touch: hop-by-hop and framing headers, and the ones the gateway itself
/// sets for forwarding and tracing (`docs/configuration.md`, "headers").
pub const PROTECTED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "x-request-id",
    "traceparent",
    "tracestate",
];

/// One piece of a value template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text as written.
    Text(String),
    /// `{client_ip}`: the client's address after `trusted_proxies`.
    ClientIp,
    /// `{request_id}`.
    RequestId,
    /// `{route}`: the route's name.
    Route,
    /// `{host}`: the request's host (request edits only).
    Host,
    /// `{path}`: the path sent upstream (request edits only).
    Path,
    /// `{claim:NAME}`: a claim of the token `auth` verified (empty without one).
    Claim(String),
}

/// A value: literal when it has no placeholder (checked once), else built per request.
#[derive(Debug, Clone)]
pub enum Value {
    /// A fixed value.
    Fixed(HeaderValue),
    /// Built from the request.
    Template(Vec<Part>),
}

/// Parses `{...}` placeholders; `{{` and `}}` are literal braces. `request` allows the ones
/// only a request edit knows.
pub fn parse_template(text: &str, request: bool) -> Result<Value, String> {
    let parts = super::template::parse(text, Part::Text, |name| {
        match name {
        "client_ip" => Ok(Part::ClientIp),
        "request_id" => Ok(Part::RequestId),
        "route" => Ok(Part::Route),
        "host" | "path" if !request => Err(format!("{{{name}}} is known in request edits only")),
        "host" => Ok(Part::Host),
        "path" => Ok(Part::Path),
        _ => match name.strip_prefix("claim:") {
            Some(claim) if !claim.is_empty() => Ok(Part::Claim(claim.to_string())),
            _ => Err(format!(
                "unknown placeholder {{{name}}} (client_ip, request_id, route, host, path, claim:NAME)"
            )),
        },
    }
    })?;
    let checked = |t: &str| {
        HeaderValue::from_str(t)
            .map_err(|_| "not a valid header value (control characters, or not ASCII)".to_string())
    };
    match &parts[..] {
        [] => Ok(Value::Fixed(HeaderValue::from_static(""))),
        [Part::Text(t)] => checked(t).map(Value::Fixed),
        _ => {
            for p in &parts {
                if let Part::Text(t) = p {
                    checked(t)?;
                }
            }
            Ok(Value::Template(parts))
        }
    }
}

/// A header name a rule may edit.
pub fn parse_name(name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    if PROTECTED.contains(&parsed.as_str()) {
        return Err(format!(
            "{name} is set by the gateway or by HTTP itself and cannot be edited (docs/configuration.md, headers)"
        ));
    }
    Ok(parsed)
}

/// One side's edits.
#[derive(Debug, Clone, Default)]
pub struct Edits {
    /// Removed first.
    pub remove: Vec<HeaderName>,
    /// Then set.
    pub set: Vec<(HeaderName, Value)>,
    /// Then appended.
    pub append: Vec<(HeaderName, Value)>,
}

impl Edits {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.append.is_empty()
    }

    fn apply(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
        path: Option<&str>,
    ) -> pingora::Result<()> {
        for name in &self.remove {
            headers.unset(name);
        }
        for (name, value) in &self.set {
            if let Some(v) = value.render(headers, ctx, path) {
                headers.set(name, v)?;
            }
        }
        for (name, value) in &self.append {
            if let Some(v) = value.render(headers, ctx, path) {
                headers.append(name, v)?;
            }
        }
        Ok(())
    }
}

impl Value {
    fn render(
        &self,
        headers: &dyn HeaderEdits,
        ctx: &RequestCtx,
        path: Option<&str>,
    ) -> Option<HeaderValue> {
        let parts = match self {
            Value::Fixed(v) => return Some(v.clone()),
            Value::Template(parts) => parts,
        };
        let mut out = String::new();
        for part in parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::ClientIp => {
                    if let Some(ip) = ctx.client_ip {
                        let _ = write!(out, "{ip}");
                    }
                }
                Part::RequestId => {
                    if let Some(id) = ctx.request_id.as_ref().and_then(|v| v.to_str().ok()) {
                        out.push_str(id);
                    }
                }
                Part::Route => {
                    if let Some(route) = ctx.route() {
                        out.push_str(&route.name);
                    }
                }
                Part::Host => {
                    if let Some(host) = headers
                        .get(&http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                    {
                        out.push_str(host);
                    }
                }
                Part::Path => out.push_str(path.unwrap_or_default()),
                Part::Claim(name) => match ctx.token.as_deref().and_then(|c| c.get(name)) {
                    Some(serde_json::Value::String(s)) => out.push_str(s),
                    Some(serde_json::Value::Null) | None => {}
                    Some(other) => {
                        let _ = write!(out, "{other}");
                    }
                },
            }
        }
        // A value from the request that is no header value (a line break in a claim) is not
        // sent: never a header split in two.
        HeaderValue::from_str(&out).ok()
    }
}

/// The compiled rules.
#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    /// Edits of the upstream request.
    pub request: Edits,
    /// Edits of the response.
    pub response: Edits,
}

impl HeaderRules {
    /// Edits the request sent upstream.
    pub fn on_upstream_request(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
        uri: &http::Uri,
    ) -> pingora::Result<()> {
        self.request.apply(headers, ctx, Some(uri.path()))
    }

    /// Edits the response sent to the client.
    pub fn on_response(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
    ) -> pingora::Result<()> {
        self.response.apply(headers, ctx, None)
    }

    /// Headers the response edits may add.
    pub fn response_adds(&self) -> usize {
        self.response.set.len() + self.response.append.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn templates_parse_and_render() {
        let v = parse_template("ip={client_ip} sub={claim:sub} {{x}}", true).unwrap();
        let mut ctx = RequestCtx {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            ..Default::default()
        };
        let claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"sub":"u-1","evil":"a\r\nX-Admin: yes"}"#).unwrap();
        ctx.token = Some(Arc::new(claims));
        let headers = http::HeaderMap::new();
        assert_eq!(
            v.render(&headers, &ctx, None).unwrap(),
            "ip=192.0.2.1 sub=u-1 {x}"
        );
        // A claim with a line break never becomes a header.
        let evil = parse_template("{claim:evil}", true).unwrap();
        assert!(evil.render(&headers, &ctx, None).is_none());
        assert!(matches!(
            parse_template("plain", false).unwrap(),
            Value::Fixed(_)
        ));
    }

    #[test]
    fn bad_templates_and_names_are_refused() {
        assert!(parse_template("{path}", false)
            .unwrap_err()
            .contains("request edits only"));
        assert!(parse_template("{nope}", true)
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(parse_template("a{b", true).is_err());
        assert!(parse_template("a}b", true).is_err());
        assert!(parse_template("a\r\nb", true).is_err());
        assert!(parse_name("X-Forwarded-For")
            .unwrap_err()
            .contains("cannot be edited"));
        assert!(parse_name("Transfer-Encoding").is_err());
        assert!(parse_name("bad name").is_err());
        assert_eq!(parse_name("X-Frame-Options").unwrap(), "x-frame-options");
    }
}
