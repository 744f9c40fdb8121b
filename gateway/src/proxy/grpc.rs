//! gRPC calls through the proxy: recognising one, its deadline (`grpc-timeout`), the gateway's
//! own answers as gRPC statuses (trailers-only), the status a call ended with (metrics, access
//! log), and the gRPC-Web bridge (`grpc_web` policy) to a plain gRPC upstream.
//!
//! Everything here runs only for requests that are gRPC (`POST` with an `application/grpc*`
//! content type); other requests pay one method comparison.

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use std::time::{Duration, Instant};

/// gRPC status codes the gateway itself produces or maps (the gRPC core status codes).
pub mod code {
    pub const OK: u8 = 0;
    pub const UNKNOWN: u8 = 2;
    pub const DEADLINE_EXCEEDED: u8 = 4;
    pub const PERMISSION_DENIED: u8 = 7;
    pub const INTERNAL: u8 = 13;
    pub const UNAVAILABLE: u8 = 14;
    pub const UNAUTHENTICATED: u8 = 16;
    pub const UNIMPLEMENTED: u8 = 12;
}

/// The names of the status codes, for metrics and the access log; `NONE` for a call that
/// ended without one (cut by the client).
const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of a status code (`UNKNOWN` past the known ones).
pub fn name(code: Option<u8>) -> &'static str {
    match code {
        None => "NONE",
        Some(c) => NAMES.get(c as usize).copied().unwrap_or("UNKNOWN"),
    }
}

/// The gRPC status a client infers from an HTTP status (gRPC's HTTP-to-gRPC status mapping).
pub fn from_http(status: u16) -> u8 {
    match status {
        200 => code::OK,
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// The HTTP status a gRPC status stands for, as Envoy maps it for outlier detection and its
/// statistics: what an upstream's `circuit_breaker.statuses` are compared with for a call.
pub fn to_http(code: u8) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

/// How the call reached the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Plain gRPC (HTTP/2).
    Grpc,
    /// gRPC-Web, binary (`application/grpc-web`, `+proto`).
    Web,
    /// gRPC-Web, base64 (`application/grpc-web-text`).
    WebText,
}

/// One gRPC call's state, on the request context.
#[derive(Debug)]
pub struct Call {
    /// How the call reached the gateway.
    pub wire: Wire,
    /// When the client's `grpc-timeout` runs out.
    pub deadline: Option<Instant>,
    /// The status the call ended with, once known.
    pub status: Option<u8>,
    /// A gRPC-Web call the `grpc_web` policy translates to gRPC for the upstream.
    pub bridged: bool,
    /// The upstream's circuit breaker waits for the status in the trailers.
    pub verdict_pending: bool,
    /// Base64 text the bridge holds back until a whole group arrives (text form).
    text_in: Vec<u8>,
}

impl Call {
    /// The call `req` is, if it is one: `POST` with an `application/grpc*` content type.
    pub fn detect(req: &RequestHeader) -> Option<Box<Call>> {
        if req.method != http::Method::POST {
            return None;
        }
        let wire = wire_of(req.headers.get(CONTENT_TYPE)?.as_bytes())?;
        let deadline = req
            .headers
            .get("grpc-timeout")
            .and_then(|v| parse_timeout(v.as_bytes()))
            .and_then(|d| Instant::now().checked_add(d));
        Some(Box::new(Call {
            wire,
            deadline,
            status: None,
            bridged: false,
            verdict_pending: false,
            text_in: Vec::new(),
        }))
    }

    /// Time left before the deadline (`None`: no deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The deadline has passed.
    pub fn expired(&self) -> bool {
        self.remaining().is_some_and(|r| r.is_zero())
    }

    /// The status for the gateway's own answer with HTTP `status`.
    pub fn status_for(&self, status: u16) -> u8 {
        if matches!(status, 408 | 504) && self.expired() {
            return code::DEADLINE_EXCEEDED;
        }
        from_http(status)
    }

    /// Notes the status in an upstream's response head (a trailers-only answer), and returns
    /// the HTTP status the attempt is judged by: the head's own unless it is 200, else the
    /// gRPC status's; `None` while that is still to come in HTTP/2 trailers (gRPC-Web passed
    /// through carries it in the body, and HTTP/1.1 answers bring no trailers to the gateway:
    /// those are judged by the head).
    pub fn on_upstream_response(&mut self, resp: &ResponseHeader) -> Option<u16> {
        let http = resp.status.as_u16();
        if let Some(c) = resp.headers.get("grpc-status").and_then(parse_status) {
            self.status = Some(c);
        } else if http != 200 {
            self.status = Some(from_http(http));
        }
        let trailers_to_come =
            resp.version == http::Version::HTTP_2 && (self.wire == Wire::Grpc || self.bridged);
        match (http, self.status) {
            (200, Some(code)) => Some(to_http(code)),
            (200, None) if trailers_to_come => None,
            _ => Some(http),
        }
    }

    /// Notes the status in the upstream's trailers.
    pub fn on_trailers(&mut self, trailers: &HeaderMap) {
        if let Some(c) = trailers.get("grpc-status").and_then(parse_status) {
            self.status = Some(c);
        }
    }
}

/// The wire a request content type names, if it is gRPC at all.
fn wire_of(content_type: &[u8]) -> Option<Wire> {
    const GRPC: &[u8] = b"application/grpc";
    let head = content_type.get(..GRPC.len())?;
    if !head.eq_ignore_ascii_case(GRPC) {
        return None;
    }
    let rest = &content_type[GRPC.len()..];
    let ends = |r: &[u8]| r.is_empty() || r[0] == b'+' || r[0] == b';';
    let starts = |r: &[u8], p: &[u8]| r.len() >= p.len() && r[..p.len()].eq_ignore_ascii_case(p);
    if ends(rest) {
        Some(Wire::Grpc)
    } else if starts(rest, b"-web-text") && ends(&rest[9..]) {
        Some(Wire::WebText)
    } else if starts(rest, b"-web") && ends(&rest[4..]) {
        Some(Wire::Web)
    } else {
        None
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

fn parse_status(v: &HeaderValue) -> Option<u8> {
    std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()
}

/// `grpc-message` is percent-encoded outside printable ASCII (and `%` itself).
fn percent_encode(message: &str) -> HeaderValue {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static("error"))
}

/// The content type of the gateway's answers to `wire`.
fn answer_type(wire: Wire) -> &'static str {
    match wire {
        Wire::Grpc => "application/grpc",
        Wire::Web => "application/grpc-web+proto",
        Wire::WebText => "application/grpc-web-text+proto",
    }
}

/// A trailers-only answer: HTTP 200 and the status in the head, no body (on HTTP/1.1, where
/// gRPC-Web goes, with `Content-Length: 0`).
pub fn answer_head(call: &Call, status: u8, message: &str, http2: bool) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(200, Some(4))?;
    resp.insert_header(CONTENT_TYPE, answer_type(call.wire))?;
    resp.insert_header("grpc-status", status.to_string())?;
    resp.insert_header("grpc-message", percent_encode(message))?;
    if !http2 {
        resp.insert_header(CONTENT_LENGTH, 0)?;
    }
    Ok(resp)
}

/// Ends a call whose response has begun with `status`: trailers for gRPC, the trailer frame
/// in the body for gRPC-Web. The status is noted when it could be written.
pub async fn end_with(session: &mut Session, call: &mut Call, status: u8, message: &str) {
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert("grpc-status", HeaderValue::from(u16::from(status)));
    trailers.insert("grpc-message", percent_encode(message));
    let written = match call.wire {
        Wire::Grpc => session.write_response_trailers(trailers).await,
        Wire::Web | Wire::WebText => {
            let frame = call.trailer_frame(&trailers);
            session.write_response_body(Some(frame), true).await
        }
    };
    if written.is_ok() {
        call.status = Some(status);
    }
}

// The gRPC-Web bridge.
impl Call {
    /// The call as it goes upstream: `grpc-timeout` set to the time left (time queued here
    /// and earlier attempts spent the rest), and the bridge's edits for gRPC-Web.
    pub fn on_upstream_request(&self, up: &mut RequestHeader) -> Result<()> {
        if let Some(left) = self.remaining() {
            let ms = left.as_millis().max(1);
            let value = match ms {
                0..=99_999_999 => format!("{ms}m"),
                _ => format!("{}S", left.as_secs().min(99_999_999)),
            };
            up.insert_header("grpc-timeout", value)?;
        }
        if self.bridged {
            self.bridge_request(up)?;
        }
        Ok(())
    }

    /// The request as the gRPC upstream takes it: `application/grpc` and `te: trailers`; a
    /// text body shrinks when decoded, so its length goes.
    pub fn bridge_request(&self, up: &mut RequestHeader) -> Result<()> {
        let subtype = up
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|ct| ct.split_once('+').map(|(_, s)| s.to_string()));
        let ct = match subtype {
            Some(s) => format!("application/grpc+{s}"),
            None => "application/grpc".to_string(),
        };
        up.insert_header(CONTENT_TYPE, ct)?;
        up.insert_header("te", "trailers")?;
        if self.wire == Wire::WebText {
            up.remove_header(&CONTENT_LENGTH);
        }
        // gRPC ends a request stream with an empty DATA frame when nothing is left to send.
        up.set_send_end_stream(false);
        Ok(())
    }

    /// The request body chunk, base64-decoded for the text form.
    pub fn bridge_request_body(&mut self, body: &mut Option<Bytes>, end: bool) -> Result<()> {
        if self.wire != Wire::WebText {
            return Ok(());
        }
        if let Some(chunk) = body.as_ref() {
            self.text_in
                .extend(chunk.iter().filter(|b| !b.is_ascii_whitespace()));
        }
        let whole = if end {
            self.text_in.len()
        } else {
            self.text_in.len() / 4 * 4
        };
        let decoded = decode_base64(&self.text_in[..whole])?;
        self.text_in.drain(..whole);
        *body = Some(decoded);
        Ok(())
    }

    /// The response head as the gRPC-Web client takes it.
    pub fn bridge_response(&mut self, resp: &mut ResponseHeader) -> Result<()> {
        let Some(ct) = resp.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return Ok(());
        };
        if !ct.starts_with("application/grpc") {
            // Not a gRPC answer (the upstream's own error page): passed as it is.
            self.bridged = false;
            return Ok(());
        }
        let suffix = ct["application/grpc".len()..].to_string();
        let web = match self.wire {
            Wire::WebText => "application/grpc-web-text",
            _ => "application/grpc-web",
        };
        resp.insert_header(CONTENT_TYPE, format!("{web}{suffix}"))?;
        resp.remove_header(&CONTENT_LENGTH);
        Ok(())
    }

    /// The response body chunk, base64-encoded for the text form: each chunk on its own,
    /// padded, so nothing waits for the next one (gRPC-Web allows padding between chunks).
    pub fn bridge_response_body(&mut self, body: &mut Option<Bytes>) {
        if self.wire != Wire::WebText {
            return;
        }
        if let Some(chunk) = body.as_ref().filter(|c| !c.is_empty()) {
            let encoded = base64::engine::general_purpose::STANDARD.encode(chunk);
            *body = Some(Bytes::from(encoded));
        }
    }

    /// The trailers as gRPC-Web's final frame (flag 0x80, length, `name:value\r\n` lines);
    /// base64 for the text form.
    pub fn trailer_frame(&self, trailers: &HeaderMap) -> Bytes {
        let mut lines = BytesMut::with_capacity(64);
        for (name, value) in trailers {
            lines.put_slice(name.as_str().as_bytes());
            lines.put_u8(b':');
            lines.put_slice(value.as_bytes());
            lines.put_slice(b"\r\n");
        }
        let mut frame = BytesMut::with_capacity(5 + lines.len());
        frame.put_u8(0x80);
        frame.put_u32(lines.len() as u32);
        frame.put_slice(&lines);
        if self.wire != Wire::WebText {
            return frame.freeze();
        }
        Bytes::from(base64::engine::general_purpose::STANDARD.encode(frame))
    }
}

/// Base64 that may be padded between messages (each message encoded on its own): decoded
/// group run by group run.
fn decode_base64(text: &[u8]) -> Result<Bytes> {
    let bad = || {
        Error::create(
            ErrorType::HTTPStatus(400),
            pingora::ErrorSource::Downstream,
            Some("gRPC-Web text body is not base64".into()),
            None,
        )
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut start = 0;
    for (i, group) in text.chunks(4).enumerate() {
        if group.contains(&b'=') || (i + 1) * 4 >= text.len() {
            let end = (i * 4 + group.len()).min(text.len());
            base64::engine::general_purpose::STANDARD
                .decode_vec(&text[start..end], &mut out)
                .map_err(|_| bad())?;
            start = end;
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_wire_from_the_content_type() {
        assert_eq!(wire_of(b"application/grpc"), Some(Wire::Grpc));
        assert_eq!(wire_of(b"application/grpc+proto"), Some(Wire::Grpc));
        assert_eq!(wire_of(b"Application/GRPC;charset=x"), Some(Wire::Grpc));
        assert_eq!(wire_of(b"application/grpc-web"), Some(Wire::Web));
        assert_eq!(wire_of(b"application/grpc-web+proto"), Some(Wire::Web));
        assert_eq!(wire_of(b"application/grpc-web-text"), Some(Wire::WebText));
        assert_eq!(
            wire_of(b"application/grpc-web-text+proto"),
            Some(Wire::WebText)
        );
        assert_eq!(wire_of(b"application/grpcx"), None);
        assert_eq!(wire_of(b"application/grpc-webby"), None);
        assert_eq!(wire_of(b"application/json"), None);
        assert_eq!(wire_of(b"app"), None);
    }

    #[test]
    fn parses_grpc_timeout_units_and_refuses_the_rest() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(
            parse_timeout(b"99999999n"),
            Some(Duration::from_nanos(99999999))
        );
        assert_eq!(parse_timeout(b"123456789S"), None);
        assert_eq!(parse_timeout(b"S"), None);
        assert_eq!(parse_timeout(b"10x"), None);
        assert_eq!(parse_timeout(b"-1S"), None);
        assert_eq!(parse_timeout(b""), None);
    }

    #[test]
    fn maps_http_statuses_as_grpc_says() {
        assert_eq!(from_http(401), code::UNAUTHENTICATED);
        assert_eq!(from_http(403), code::PERMISSION_DENIED);
        assert_eq!(from_http(404), code::UNIMPLEMENTED);
        assert_eq!(from_http(429), code::UNAVAILABLE);
        assert_eq!(from_http(503), code::UNAVAILABLE);
        assert_eq!(from_http(400), code::INTERNAL);
        assert_eq!(from_http(418), code::UNKNOWN);
        assert_eq!(name(Some(14)), "UNAVAILABLE");
        assert_eq!(name(Some(99)), "UNKNOWN");
        assert_eq!(name(None), "NONE");
        assert_eq!(
            percent_encode("50% off\n").to_str().unwrap(),
            "50%25 off%0A"
        );
    }

    #[test]
    fn grpc_statuses_map_to_http_as_envoy_maps_them() {
        let http: Vec<u16> = (0..=17).map(to_http).collect();
        assert_eq!(
            http,
            [
                200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500,
                401, 500
            ]
        );
    }

    #[test]
    fn text_bodies_decode_in_any_chunking_and_encode_as_one_stream() {
        let mut call = Call {
            wire: Wire::WebText,
            deadline: None,
            status: None,
            bridged: true,
            verdict_pending: false,
            text_in: Vec::new(),
        };
        // "AAAAAAJoaQ==" is the frame of the message "hi"; a second message padded on its own.
        let text = b"AAAAAAJoaQ==AAAAAAE=";
        let mut decoded = Vec::new();
        for (i, piece) in text.chunks(5).enumerate() {
            let mut body = Some(Bytes::copy_from_slice(piece));
            let end = (i + 1) * 5 >= text.len();
            call.bridge_request_body(&mut body, end).unwrap();
            decoded.extend_from_slice(&body.unwrap());
        }
        assert_eq!(decoded, b"\0\0\0\0\x02hi\0\0\0\0\x01");
        let mut bad = Some(Bytes::from_static(b"!!!!"));
        assert!(call.bridge_request_body(&mut bad, true).is_err());

        // Each response chunk and the trailer frame are base64 on their own.
        let mut all = Vec::new();
        for piece in [&b"\0\0\0"[..], b"\0\x02h", b"i"] {
            let mut body = Some(Bytes::copy_from_slice(piece));
            call.bridge_response_body(&mut body);
            let text = body.unwrap();
            assert_eq!(text.len() % 4, 0);
            all.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(&text)
                    .unwrap(),
            );
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frame = call.trailer_frame(&trailers);
        all.extend(
            base64::engine::general_purpose::STANDARD
                .decode(&frame)
                .unwrap(),
        );
        assert_eq!(&all[..7], b"\0\0\0\0\x02hi");
        assert_eq!(&all[7..12], b"\x80\0\0\0\x0f");
        assert_eq!(&all[12..], b"grpc-status:0\r\n");
    }
}
