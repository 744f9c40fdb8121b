//! The headers the gateway adds to requests and responses, and how they are written.
//!
//! By default heads are read without the second map Pingora keeps of each name's spelling (its
//! cost: `bench/README.md`) and edited in place; a head that has that map is rebuilt without
//! it before its edits. Without it, names go out in canonical case (`Host`, `Content-Type`,
//! `Date`, … and the rest in lower case), as HAProxy and Envoy send them. HTTP field names are
//! case-insensitive (RFC 9110 §5.1). With `forwarding.preserve_header_case`, the map is kept
//! and every name keeps the spelling the client (or the upstream) used.

use arrayvec::ArrayVec;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;
use std::net::IpAddr;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C `tracestate`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `RateLimit-Policy`.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers the gateway may add to a request, besides a token's forwarded claims.
pub const ADDED_REQUEST_HEADERS: usize = 6;
/// Headers the gateway may add to a response.
pub const ADDED_RESPONSE_HEADERS: usize = 4;

/// A header map the gateway edits: the plain `http` map, or Pingora's case-keeping header.
pub trait HeaderEdits {
    /// The first value of `name`.
    fn get(&self, name: &HeaderName) -> Option<&HeaderValue>;
    /// Replaces every value of `name` with `value`.
    fn set(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()>;
    /// Removes every value of `name`.
    fn unset(&mut self, name: &HeaderName);
    /// Adds `value` after any value `name` has.
    fn append(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()>;
}

impl HeaderEdits for HeaderMap {
    fn get(&self, name: &HeaderName) -> Option<&HeaderValue> {
        HeaderMap::get(self, name)
    }
    fn set(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
        self.insert(name.clone(), value);
        Ok(())
    }
    fn unset(&mut self, name: &HeaderName) {
        self.remove(name);
    }
    fn append(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
        HeaderMap::append(self, name.clone(), value);
        Ok(())
    }
}

/// Pingora's request and response headers: edits go through `insert_header` and
/// `remove_header`, which keep the case map in step.
macro_rules! case_keeping_edits {
    ($header:ty) => {
        impl HeaderEdits for $header {
            fn get(&self, name: &HeaderName) -> Option<&HeaderValue> {
                self.headers.get(name)
            }
            fn set(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
                self.insert_header(name.clone(), value)
            }
            fn unset(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            fn append(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
                self.append_header(name.clone(), value).map(|_| ())
            }
        }
    };
}
case_keeping_edits!(RequestHeader);
case_keeping_edits!(ResponseHeader);

/// Fields written after an upstream head's own instead of into its header map: the own path
/// writes them with the head (pingora-core's `write_request_header_with`), which spares the
/// map's inserts (`bench/README.md`). Room for every field the gateway adds.
#[derive(Default)]
pub struct FieldLines(ArrayVec<(HeaderName, HeaderValue), ADDED_REQUEST_HEADERS>);

impl FieldLines {
    /// The fields, in the order they were set.
    pub fn as_slice(&self) -> &[(HeaderName, HeaderValue)] {
        &self.0
    }

    /// Forgets the fields set.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Adds a field after those already set (an error past the room for every added field).
    pub fn push(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
        self.0.try_push((name.clone(), value)).or_else(|_| {
            pingora::Error::e_explain(
                pingora::ErrorType::InternalError,
                "more added request fields than the gateway adds",
            )
        })
    }
}

/// The most fields a head may have to be read in one pass for the few fields wanted from it,
/// rather than with a hashed look-up for each.
pub const FEW_FIELDS: usize = 12;

/// The first value of each of `names` (distinct names) in `headers`. A head of a few fields
/// ([`FEW_FIELDS`]), the usual request, is read in one pass.
pub fn first_values<'a, const N: usize>(
    headers: &'a HeaderMap,
    names: [&HeaderName; N],
) -> [Option<&'a HeaderValue>; N] {
    if headers.len() > FEW_FIELDS {
        return names.map(|name| headers.get(name));
    }
    let mut found = [None; N];
    for (name, value) in headers {
        if let Some(i) = names.iter().position(|n| *n == name) {
            found[i] = found[i].or(Some(value));
        }
    }
    found
}

/// Whether `headers` carries a field the gateway adds to requests (the request id, the trace
/// context, the forwarding fields: every name `proxy::forward` sets or removes): then those go
/// through the map, which replaces or extends the client's. One pass over the names.
pub fn carries_added_fields(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| {
        matches!(
            name.as_str(),
            "x-request-id"
                | "traceparent"
                | "tracestate"
                | "x-forwarded-for"
                | "x-real-ip"
                | "x-forwarded-proto"
                | "x-forwarded-host"
        )
    })
}

/// Applies `edit` to the headers of the upstream request; `adds` is how many headers it may
/// add, so that a map rebuilt without the client's spellings grows once.
pub fn edit_request(
    up: &mut RequestHeader,
    preserve_case: bool,
    adds: usize,
    edit: impl FnOnce(&mut dyn HeaderEdits, &http::Uri) -> Result<()>,
) -> Result<()> {
    // A head that records no spellings is edited in place: it goes out in canonical case.
    if preserve_case || !up.has_case() {
        let uri = up.uri.clone();
        return edit(up, &uri);
    }
    let end_stream = up.send_end_stream();
    let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts: http::request::Parts = std::mem::replace(up, placeholder).into();
    parts.headers.reserve(adds);
    let result = edit(&mut parts.headers, &parts.uri);
    // Put back even after an error: the request must stay whole for the error path.
    *up = RequestHeader::from(parts);
    if let Some(end_stream) = end_stream {
        up.set_send_end_stream(end_stream);
    }
    result
}

/// Applies `edit` to the headers of the response; `adds` as for [`edit_request`]. A reason
/// phrase other than the standard one is kept.
pub fn edit_response(
    resp: &mut ResponseHeader,
    preserve_case: bool,
    adds: usize,
    edit: impl FnOnce(&mut dyn HeaderEdits) -> Result<()>,
) -> Result<()> {
    // As for a request: a head that records no spellings is edited in place.
    if preserve_case || !resp.has_case() {
        return edit(resp);
    }
    let reason = resp
        .get_reason_phrase()
        .filter(|r| Some(*r) != resp.status.canonical_reason())
        .map(str::to_owned);
    let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts: http::response::Parts = std::mem::replace(resp, placeholder).into();
    parts.headers.reserve(adds);
    let result = edit(&mut parts.headers);
    *resp = ResponseHeader::from(parts);
    if reason.is_some() {
        resp.set_reason_phrase(reason.as_deref())?;
    }
    result
}

/// An IP address as a header value (formatted on the stack; one allocation for the value and
/// its clones).
pub fn ip_header_value(ip: IpAddr) -> Option<HeaderValue> {
    let text = crate::text::IpText::new(ip);
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).ok()
}

/// Who sent a request, for the forwarding headers.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    /// The client as the gateway sees it (from a trusted proxy: the address it reported).
    pub client_ip: Option<IpAddr>,
    /// The address of the connection's peer.
    pub peer: Option<IpAddr>,
    /// Whether the peer is a trusted proxy whose forwarding headers are believed.
    pub peer_trusted: bool,
    /// Whether the client connection is TLS.
    pub tls: bool,
}

/// [`set_forwarded_headers`] for a head that carries none of the forwarding fields
/// ([`carries_added_fields`]): each is a new line, so none is looked up or extended.
pub fn forwarded_lines(
    head: &HeaderMap,
    uri: &http::Uri,
    from: Forwarded,
    lines: &mut FieldLines,
) -> Result<()> {
    if let Some(ip_value) = from.client_ip.and_then(ip_header_value) {
        lines.push(&X_FORWARDED_FOR, ip_value.clone())?;
        lines.push(&X_REAL_IP, ip_value)?;
    }
    lines.push(&X_FORWARDED_PROTO, forwarded_proto(from))?;
    if let Some(host) = forwarded_host(head.get(&http::header::HOST), uri) {
        lines.push(&X_FORWARDED_HOST, host)?;
    }
    Ok(())
}

fn forwarded_proto(from: Forwarded) -> HeaderValue {
    HeaderValue::from_static(if from.tls { "https" } else { "http" })
}

/// The request's host for `X-Forwarded-Host`: `Host`, else the authority (an HTTP/2 request
/// may carry its host only as `:authority`).
fn forwarded_host(host: Option<&HeaderValue>, uri: &http::Uri) -> Option<HeaderValue> {
    host.cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// `X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto`, `X-Forwarded-Host`. From an untrusted
/// peer, incoming copies are replaced; from a trusted proxy, the chain is extended and its
/// scheme and host are kept.
pub fn set_forwarded_headers(
    headers: &mut dyn HeaderEdits,
    uri: &http::Uri,
    from: Forwarded,
) -> Result<()> {
    if let Some(ip_value) = from.client_ip.and_then(ip_header_value) {
        let forwarded_for = match (from.peer_trusted, headers.get(&X_FORWARDED_FOR), from.peer) {
            (true, Some(prev), Some(peer)) => {
                let mut v = Vec::with_capacity(prev.len() + 48);
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
                v.extend_from_slice(peer.to_string().as_bytes());
                HeaderValue::from_bytes(&v).ok()
            }
            _ => Some(ip_value.clone()),
        };
        if let Some(v) = forwarded_for {
            headers.set(&X_FORWARDED_FOR, v)?;
        }
        headers.set(&X_REAL_IP, ip_value)?;
    }
    if !(from.peer_trusted && headers.get(&X_FORWARDED_PROTO).is_some()) {
        headers.set(&X_FORWARDED_PROTO, forwarded_proto(from))?;
    }
    if !(from.peer_trusted && headers.get(&X_FORWARDED_HOST).is_some()) {
        match forwarded_host(headers.get(&http::header::HOST), uri) {
            Some(host) => headers.set(&X_FORWARDED_HOST, host)?,
            None => headers.unset(&X_FORWARDED_HOST),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_values_are_what_get_finds() {
        let mut head = HeaderMap::new();
        head.append("host", HeaderValue::from_static("a.test"));
        head.append("traceparent", HeaderValue::from_static("one"));
        head.append("Accept", HeaderValue::from_static("*/*"));
        head.append("traceparent", HeaderValue::from_static("two"));
        let names = [&TRACEPARENT, &X_REQUEST_ID, &http::header::ACCEPT];
        let found = first_values(&head, names);
        for (name, value) in names.into_iter().zip(found) {
            assert_eq!(value, head.get(name), "{name}");
        }
        assert_eq!(found[0].map(|v| v.as_bytes()), Some(&b"one"[..]));
        assert_eq!(first_values(&HeaderMap::new(), [&X_REQUEST_ID]), [None]);
        // A larger head is looked up name by name, to the same result.
        for i in 0..20 {
            head.append(
                format!("x-{i}").parse::<HeaderName>().unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        for (name, value) in names.into_iter().zip(first_values(&head, names)) {
            assert_eq!(value, head.get(name), "{name}");
        }
    }

    #[test]
    fn ip_header_values() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.10.100",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header_value(parsed).unwrap(), ip);
        }
    }

    #[test]
    fn forwarded_lines_are_what_the_map_edit_adds_to_a_head_without_them() {
        let uris: [http::Uri; 2] = [
            "/a".parse().unwrap(),
            "https://api.test:8443/a".parse().unwrap(),
        ];
        for (uri, host) in uris.iter().zip([Some("shop.test"), None]) {
            for (client_ip, peer_trusted, tls) in [
                (Some("192.0.2.7"), false, false),
                (Some("2001:db8::1"), true, true),
                (None, false, true),
            ] {
                let from = Forwarded {
                    client_ip: client_ip.map(|ip| ip.parse().unwrap()),
                    peer: Some("127.0.0.1".parse().unwrap()),
                    peer_trusted,
                    tls,
                };
                let mut head = HeaderMap::new();
                head.insert("user-agent", HeaderValue::from_static("t"));
                if let Some(host) = host {
                    head.insert(http::header::HOST, HeaderValue::from_static(host));
                }
                let mut edited = head.clone();
                set_forwarded_headers(&mut edited, uri, from).unwrap();
                let mut lines = FieldLines::default();
                forwarded_lines(&head, uri, from, &mut lines).unwrap();
                for (name, value) in lines.as_slice() {
                    head.append(name, value.clone());
                }
                assert_eq!(head, edited, "{uri} {client_ip:?} {peer_trusted} {tls}");
            }
        }
    }

    #[test]
    fn field_lines_refuse_more_than_the_gateway_adds() {
        let mut lines = FieldLines::default();
        for _ in 0..ADDED_REQUEST_HEADERS {
            lines
                .push(&X_REQUEST_ID, HeaderValue::from_static("1"))
                .unwrap();
        }
        assert!(lines
            .push(&X_REQUEST_ID, HeaderValue::from_static("1"))
            .is_err());
        assert_eq!(lines.as_slice().len(), ADDED_REQUEST_HEADERS);
        lines.clear();
        assert!(lines.as_slice().is_empty());
    }

    #[test]
    fn added_fields_are_found_in_any_case() {
        // Every name the upstream edits set or remove, as they name them and in upper case.
        let names = [
            &X_REQUEST_ID,
            &TRACEPARENT,
            &TRACESTATE,
            &X_FORWARDED_FOR,
            &X_REAL_IP,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
        ];
        for name in names {
            for spelled in [name.as_str().to_owned(), name.as_str().to_uppercase()] {
                let mut head = HeaderMap::new();
                head.insert("accept", HeaderValue::from_static("*/*"));
                assert!(!carries_added_fields(&head));
                let name = HeaderName::from_bytes(spelled.as_bytes()).unwrap();
                head.insert(name, HeaderValue::from_static("x"));
                assert!(carries_added_fields(&head), "{spelled}");
            }
        }
    }

    #[test]
    fn edits_keep_the_request_whole_in_both_modes() {
        for preserve_case in [false, true] {
            let mut up = RequestHeader::build("POST", b"/a?b=1", None).unwrap();
            up.insert_header("Host", "api.test").unwrap();
            up.insert_header("X-Custom-Thing", "1").unwrap();
            edit_request(&mut up, preserve_case, 2, |h, uri| {
                assert_eq!(uri.path(), "/a");
                h.set(&X_REQUEST_ID, HeaderValue::from_static("id-1"))?;
                h.unset(&HeaderName::from_static("x-custom-thing"));
                Ok(())
            })
            .unwrap();
            assert_eq!(up.method, "POST");
            assert_eq!(up.raw_path(), b"/a?b=1");
            assert_eq!(up.headers.get("x-request-id").unwrap(), "id-1");
            assert!(up.headers.get("x-custom-thing").is_none());
            assert_eq!(up.has_case(), preserve_case);
            let mut wire = Vec::new();
            up.header_to_h1_wire(&mut wire);
            let wire = String::from_utf8(wire).unwrap();
            assert!(wire.contains("Host: api.test\r\n"), "{wire}");
        }
    }

    #[test]
    fn an_unusual_reason_phrase_survives_a_response_edit() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.set_reason_phrase(Some("Fine")).unwrap();
        edit_response(&mut resp, false, 1, |h| {
            h.set(&X_REQUEST_ID, HeaderValue::from_static("id-2"))
        })
        .unwrap();
        assert_eq!(resp.get_reason_phrase(), Some("Fine"));
        assert_eq!(resp.headers.get("x-request-id").unwrap(), "id-2");
        assert!(!resp.has_case());
    }
}
