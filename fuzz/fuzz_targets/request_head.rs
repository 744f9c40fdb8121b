//! The request-head handling the gateway adds on top of Pingora: bytes are parsed as Pingora
//! parses them (httparse, 256 header slots, then `RequestHeader`), then run through the
//! gateway's checks (framing, target form, path normalisation, request id, trace context,
//! host). Nothing may panic; a head the gateway routes must have a path that starts with `/`
//! and carries no control characters.
#![no_main]

use bytes::Bytes;
use gateway::proxy::{inspect_head, HeadVerdict};
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
    if let HeadVerdict::Route(path) = inspect_head(&req, Some(Bytes::copy_from_slice(&data[..end])))
    {
        assert!(path.starts_with('/'), "routed path {path:?}");
        assert!(
            !path.bytes().any(|b| b < 0x20 || b == 0x7f),
            "control character in routed path {path:?}"
        );
    }
});
