//! The request-head handling the gateway adds on top of Pingora: bytes are parsed as Pingora
//! parses them (httparse, 256 header slots, then `RequestHeader`), then run through
//! `check_head`, the very function the request path calls (framing, size, authority, target
//! form, path normalisation), and the request id, trace context and host readers. Nothing may
//! panic; a head the gateway routes must have a path that starts with `/` and carries no
//! control characters.
#![no_main]

use gateway::config::LimitsConfig;
use gateway::proxy::client::{request_host, valid_request_id};
use gateway::proxy::head::check_head;
use libfuzzer_sys::fuzz_target;
use pingora_http::RequestHeader;

fuzz_target!(|data: &[u8]| {
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(end)) = parsed.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return;
    };
    let Ok(mut req) = RequestHeader::build(method, path.as_bytes(), Some(parsed.headers.len()))
    else {
        return;
    };
    for h in parsed.headers.iter() {
        let Ok(name) = http::HeaderName::from_bytes(h.name.as_bytes()) else {
            return;
        };
        let Ok(value) = http::HeaderValue::from_bytes(h.value) else {
            return;
        };
        if req.append_header(name, value).is_err() {
            return;
        }
    }
    if let Some(id) = req.headers.get("x-request-id") {
        let _ = valid_request_id(id.as_bytes());
    }
    if let Some(tp) = req.headers.get("traceparent") {
        let _ = gateway::trace::parse_traceparent(tp.as_bytes());
    }
    let _ = request_host(&req);
    if let Ok(head) = check_head(&req, Some(&data[..end]), &LimitsConfig::default()) {
        let path = head.path;
        assert!(path.starts_with('/'), "routed path {path:?}");
        assert!(
            !path.bytes().any(|b| b < 0x20 || b == 0x7f),
            "control character in routed path {path:?}"
        );
    }
});
