//! What the gateway settles about a request's client before routing: its request id, its
//! address (through trusted proxies), its trace context, and the host it asked for.

use crate::headers::{TRACEPARENT, X_FORWARDED_FOR, X_REQUEST_ID};
use crate::proxy::context::RequestCtx;
use crate::runtime::Runtime;
use crate::trace::RequestSpan;
use http::header::HeaderValue;
use pingora::http::RequestHeader;
use std::net::IpAddr;

/// Settles the request id, the client address and the trace context of `req` on `ctx`.
pub(crate) fn identify(
    rt: &Runtime,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    ctx: &mut RequestCtx,
) {
    let [id, traceparent] =
        crate::headers::first_values(&req.headers, [&X_REQUEST_ID, &TRACEPARENT]);
    ctx.request_id = match id {
        Some(v) if valid_request_id(v.as_bytes()) => Some(v.clone()),
        // Ids are made here only when they are forwarded; errors make their own.
        _ if rt.forwarding.request_id => Some(new_request_id()),
        _ => None,
    };
    (ctx.client_ip, ctx.peer_trusted) = client_ip(rt, req, peer);
    if rt.forwarding.traceparent {
        trace_context(traceparent, ctx);
    }
}

/// The trace context: the client's `traceparent` (`incoming`) passed on, or a new one, or the
/// gateway's own span when spans are exported.
fn trace_context(incoming: Option<&HeaderValue>, ctx: &mut RequestCtx) {
    let incoming = incoming.and_then(|v| crate::trace::parse_traceparent(v.as_bytes()));
    match (incoming, crate::trace::export()) {
        // Passed on unchanged.
        (Some(_), None) => {}
        (None, None) => {
            let (trace_id, span_id) = crate::trace::new_ids();
            ctx.new_traceparent = Some(crate::trace::format_traceparent(trace_id, span_id, 0));
        }
        // The gateway's span joins the client's trace and becomes the upstream's parent.
        (Some((trace_id, parent, flags)), Some(_)) => {
            let span_id = crate::trace::new_ids().1;
            ctx.span = Some(RequestSpan {
                trace_id,
                span_id,
                parent_id: Some(parent),
                sampled: flags & 1 == 1,
            });
            ctx.keep_tracestate = true;
            ctx.new_traceparent = Some(crate::trace::format_traceparent(trace_id, span_id, flags));
        }
        (None, Some(export)) => {
            let (trace_id, span_id) = crate::trace::new_ids();
            let sampled = export.sample_new();
            ctx.span = Some(RequestSpan {
                trace_id,
                span_id,
                parent_id: None,
                sampled,
            });
            ctx.new_traceparent = Some(crate::trace::format_traceparent(
                trace_id,
                span_id,
                u8::from(sampled),
            ));
        }
    }
}

/// Request ids are kept when they look like ids: 1-128 of `A-Za-z0-9-_.:`.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
}

/// A new request id: 32 random hex digits.
pub(crate) fn new_request_id() -> HeaderValue {
    let mut text = crate::text::HexText::<32>::default();
    text.put_u128(0, fastrand::u128(..));
    text.value()
}

/// `value` marked never to be added to HPACK's table (no effect on HTTP/1).
pub(crate) fn never_indexed(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// The request's host without port: the URI authority (HTTP/2, absolute-form) or `Host`.
pub fn request_host(req: &RequestHeader) -> Option<&str> {
    if let Some(h) = req.uri.host() {
        return Some(h);
    }
    let raw = req.headers.get(http::header::HOST)?.to_str().ok()?;
    Some(strip_port(raw))
}

/// The host of a `Host` value: `[v6]` without brackets, `name:port` without the port; a value
/// with several colons and no brackets is a bare IPv6 address and stays whole. Byte by byte
/// from the end (`str::find`/`rfind` with a `char` cost more).
fn strip_port(h: &str) -> &str {
    let bytes = h.as_bytes();
    if bytes.first() == Some(&b'[') {
        let end = memchr::memchr(b']', bytes).unwrap_or(bytes.len());
        return &h[1..end];
    }
    let mut colon = bytes.len();
    while colon > 0 && bytes[colon - 1].is_ascii_digit() {
        colon -= 1;
    }
    match colon.checked_sub(1) {
        Some(at) if bytes[at] == b':' && memchr::memchr(b':', &bytes[..at]).is_none() => &h[..at],
        _ => h,
    }
}

/// The client IP: the peer's, or, when the peer is a trusted proxy, the right-most address in
/// `X-Forwarded-For` that is not itself a trusted proxy.
pub(crate) fn client_ip(
    rt: &Runtime,
    req: &RequestHeader,
    peer: Option<IpAddr>,
) -> (Option<IpAddr>, bool) {
    let Some(peer) = peer else {
        return (None, false);
    };
    if !rt.is_trusted(&peer) {
        return (Some(peer), false);
    }
    let mut ip = peer;
    for value in req.headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(s) = value.to_str() else { break };
        for part in s.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(hop) => {
                    ip = hop;
                    if !rt.is_trusted(&hop) {
                        return (Some(ip), true);
                    }
                }
                Err(_) => return (Some(ip), true),
            }
        }
    }
    (Some(ip), true)
}

pub(crate) fn cookie_value<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a [u8]> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .find_map(|v| {
            v.as_bytes().split(|b| *b == b';').find_map(|pair| {
                let pair = pair.trim_ascii_start();
                let (k, val) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
                (k == name.as_bytes()).then(|| &val[1..])
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123_x.y:z"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(b"<script>"));
        assert!(!valid_request_id(&[b'a'; 129]));
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert!(valid_request_id(id.as_bytes()));
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn ports_are_stripped() {
        for (host, bare) in [
            ("example.com:8080", "example.com"),
            ("example.com", "example.com"),
            ("[::1]:80", "::1"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("a.test:", "a.test"),
            ("a.test:8x", "a.test:8x"),
            ("fe80::1:80", "fe80::1:80"),
            ("", ""),
            ("[", ""),
            ("[::1", "::1"),
            ("a:1:2", "a:1:2"),
            (":80", ""),
        ] {
            assert_eq!(strip_port(host), bare, "{host:?}");
        }
    }

    #[test]
    fn cookies() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("cookie", "a=1; session=xyz; b=2")
            .unwrap();
        assert_eq!(cookie_value(&req, "session"), Some(&b"xyz"[..]));
        assert_eq!(cookie_value(&req, "sess"), None);
    }
}
