//! `compress`: responses compressed with gzip, brotli or zstd on the way to the client.
//!
//! The encoding is negotiated from `Accept-Encoding` (q-values, `*`, `x-gzip`) when the request
//! arrives; whether to compress is decided on the upstream's response header (its type, length,
//! status, encoding, `Cache-Control`); the body is then encoded chunk by chunk as it streams.
//! The gzip and zstd encoders are Pingora's (`flate2` on zlib-ng, `zstd`); brotli's is here
//! (Pingora's never closes the stream). Pingora's negotiation is not used: it ignores q-values,
//! so it would compress for a client that refused the coding.
//! A response that is already encoded passes as it is: the gateway never decompresses.

use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, RANGE, TRANSFER_ENCODING, VARY,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use pingora::http::ResponseHeader;
use pingora::protocols::http::compression::{Algorithm, Encode};
use pingora::proxy::Session;
use std::sync::Arc;

/// A content coding the gateway produces (the discriminant indexes the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Zstd = 0,
    Brotli = 1,
    Gzip = 2,
}

impl Coding {
    /// The coding named `name` in the configuration.
    pub fn parse(name: &str) -> Option<Coding> {
        match name {
            "zstd" => Some(Coding::Zstd),
            "br" => Some(Coding::Brotli),
            "gzip" => Some(Coding::Gzip),
            _ => None,
        }
    }

    /// The coding's token in `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Brotli => "br",
            Coding::Gzip => "gzip",
        }
    }

    /// Levels the configuration accepts, and the default.
    pub fn levels(self) -> (std::ops::RangeInclusive<u32>, u32) {
        match self {
            Coding::Zstd => (1..=19, 3),
            Coding::Brotli => (1..=11, 4),
            Coding::Gzip => (1..=9, 5),
        }
    }

    fn algorithm(self) -> Algorithm {
        match self {
            Coding::Zstd => Algorithm::Zstd,
            Coding::Brotli => Algorithm::Brotli,
            Coding::Gzip => Algorithm::Gzip,
        }
    }

    /// Whether an `Accept-Encoding` token names this coding.
    fn named_by(self, token: &str) -> bool {
        token.eq_ignore_ascii_case(self.token())
            || (self == Coding::Gzip && token.eq_ignore_ascii_case("x-gzip"))
    }
}

/// A media-type pattern: `type/subtype`, `type/*` or `type/*+suffix` (lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaPattern {
    Exact(String),
    /// `type/` of `type/*`.
    AnySubtype(String),
    /// `type/` and `+suffix` of `type/*+suffix`.
    Suffix(String, String),
}

impl MediaPattern {
    /// Parses a pattern from the configuration.
    pub fn parse(s: &str) -> Result<MediaPattern, String> {
        let lower = s.trim().to_ascii_lowercase();
        let Some((top, sub)) = lower.split_once('/') else {
            return Err(format!("{s:?} is not a media type (`type/subtype`)"));
        };
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
        };
        if !token(top) {
            return Err(format!("{s:?} is not a media type (`type/subtype`)"));
        }
        let top = format!("{top}/");
        if sub == "*" {
            Ok(MediaPattern::AnySubtype(top))
        } else if let Some(suffix) = sub.strip_prefix("*+").filter(|x| token(x)) {
            Ok(MediaPattern::Suffix(top, format!("+{suffix}")))
        } else if token(sub) {
            Ok(MediaPattern::Exact(lower))
        } else {
            Err(format!("{s:?}: the subtype is a name, `*` or `*+suffix`"))
        }
    }

    fn matches(&self, media: &str) -> bool {
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match self {
            MediaPattern::Exact(m) => eq(media, m),
            MediaPattern::AnySubtype(top) => {
                media.len() > top.len() && eq(&media[..top.len()], top)
            }
            MediaPattern::Suffix(top, suffix) => {
                media.len() > top.len() + suffix.len()
                    && eq(&media[..top.len()], top)
                    && eq(&media[media.len() - suffix.len()..], suffix)
            }
        }
    }
}

/// The types compressed when a policy names none.
pub const DEFAULT_TYPES: &[&str] = &[
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/xml",
    "application/*+xml",
    "image/svg+xml",
];

/// A compiled `compress` policy.
#[derive(Debug)]
pub struct Compress {
    /// Codings offered with their levels, the preferred first.
    pub encodings: Vec<(Coding, u32)>,
    /// Smallest `Content-Length` compressed.
    pub min_size: u64,
    /// Media types compressed.
    pub types: Vec<MediaPattern>,
}

impl Compress {
    /// Notes the coding this request accepts best (run with the request's policies).
    pub fn on_request(
        self: &Arc<Self>,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), Answer> {
        // gRPC compresses message by message itself (`grpc-encoding`).
        if ctx.grpc.is_some() {
            return Ok(());
        }
        let request = &session.req_header().headers;
        let untouchable = request.contains_key(RANGE) || no_transform(request);
        let coding = if untouchable {
            None
        } else {
            request
                .get(ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| self.negotiate(v))
        };
        ctx.compression = Some(Compression {
            policy: self.clone(),
            coding,
            encoder: None,
        });
        Ok(())
    }

    /// The offered coding with the highest q-value in `accept` (ties go to the gateway's
    /// order); none when every offered coding has q=0 or is absent.
    pub fn negotiate(&self, accept: &str) -> Option<(Coding, u32)> {
        let mut best: Option<(u16, usize)> = None;
        for (i, &(coding, _)) in self.encodings.iter().enumerate() {
            let q = quality(accept, coding);
            if q > 0 && best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, i));
            }
        }
        best.map(|(_, i)| self.encodings[i])
    }

    /// Whether the response is one this policy compresses (for some client).
    fn compressible(&self, resp: &ResponseHeader) -> bool {
        let status = resp.status;
        if status.is_informational()
            || matches!(
                status,
                StatusCode::NO_CONTENT | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
            )
        {
            return false;
        }
        let h = &resp.headers;
        if h.contains_key(CONTENT_ENCODING) || h.contains_key(CONTENT_RANGE) || no_transform(h) {
            return false;
        }
        let small = h
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|len| len < self.min_size);
        if small {
            return false;
        }
        let Some(media) = h.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let media = media.split(';').next().unwrap_or("").trim();
        // An event stream must reach the client event by event; the encoders hold bytes back.
        !media.eq_ignore_ascii_case("text/event-stream")
            && self.types.iter().any(|p| p.matches(media))
    }
}

/// A `Cache-Control` that forbids transforming the content.
fn no_transform(headers: &HeaderMap) -> bool {
    headers.get_all(CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
    })
}

/// The q-value (in thousandths) `accept` gives `coding`: its own entry, else `*`'s, else 0.
fn quality(accept: &str, coding: Coding) -> u16 {
    let mut star = None;
    for entry in accept.split(',') {
        let mut parts = entry.split(';');
        let token = parts.next().unwrap_or("").trim();
        let q = parts
            .find_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("q")
                    .then(|| parse_q(v.trim()))
            })
            .unwrap_or(Some(1000));
        // A malformed q-value makes the entry unacceptable rather than preferred.
        let q = q.unwrap_or(0);
        if coding.named_by(token) {
            return q;
        }
        if token == "*" {
            star = Some(q);
        }
    }
    star.unwrap_or(0)
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
fn parse_q(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths = 0u16;
    for (i, b) in frac.bytes().enumerate() {
        thousandths += u16::from(b - b'0') * [100, 10, 1][i];
    }
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// One request's compression: the coding negotiated, then the encoder once the response
/// turned out compressible.
pub struct Compression {
    policy: Arc<Compress>,
    coding: Option<(Coding, u32)>,
    encoder: Option<Box<dyn Encode + Send + Sync>>,
}

static ACCEPT_ENCODING_VALUE: HeaderValue = HeaderValue::from_static("accept-encoding");

impl Compression {
    /// Decides on the response header: marks it as varying by `Accept-Encoding` when it is
    /// compressible, and when the client accepts a coding, rewrites the header for it and
    /// arms the encoder (not for `HEAD`: no body to encode).
    pub fn on_response(
        &mut self,
        resp: &mut ResponseHeader,
        method: &Method,
        version: Version,
    ) -> pingora::Result<()> {
        if !self.policy.compressible(resp) {
            return Ok(());
        }
        add_vary(resp)?;
        let Some((coding, level)) = self.coding else {
            return Ok(());
        };
        resp.insert_header(CONTENT_ENCODING, HeaderValue::from_static(coding.token()))?;
        resp.remove_header(&CONTENT_LENGTH);
        resp.remove_header(&ACCEPT_RANGES);
        weaken_etag(resp)?;
        // HTTP/1.1 frames a body of unknown length in chunks; HTTP/1.0 by closing the
        // connection; HTTP/2 by its own frames.
        if version == Version::HTTP_11 && !resp.headers.contains_key(TRANSFER_ENCODING) {
            resp.insert_header(TRANSFER_ENCODING, HeaderValue::from_static("chunked"))?;
        }
        if method != Method::HEAD {
            self.encoder = match coding {
                Coding::Brotli => Some(Box::new(Brotli::new(level))),
                _ => coding.algorithm().compressor(level),
            };
        }
        Ok(())
    }

    /// Encodes one chunk of the body (the last one flushes the encoder).
    pub fn on_body(&mut self, body: &mut Option<Bytes>, end: bool) -> pingora::Result<()> {
        if let Some(encoder) = self.encoder.as_mut() {
            let input = body.as_deref().unwrap_or_default();
            *body = Some(encoder.encode(input, end)?);
        }
        Ok(())
    }

    /// Counts the body's bytes in and out, when it was encoded.
    pub fn record(&self) {
        if let (Some(encoder), Some((coding, _))) = (&self.encoder, self.coding) {
            let (_, bytes_in, bytes_out, _) = encoder.stat();
            crate::metrics::METRICS.compressed(coding, bytes_in, bytes_out);
        }
    }
}

/// A brotli stream encoder. Pingora's flushes at the end of the body but never closes the
/// stream, which decoders reject; this one closes it.
struct Brotli {
    writer: Option<brotli::CompressorWriter<Vec<u8>>>,
    bytes_in: usize,
    bytes_out: usize,
}

impl Brotli {
    fn new(level: u32) -> Brotli {
        Brotli {
            // A 4 KiB input buffer and a 512 KiB window (lgwin 19), as Pingora's.
            writer: Some(brotli::CompressorWriter::new(Vec::new(), 4096, level, 19)),
            bytes_in: 0,
            bytes_out: 0,
        }
    }
}

impl Encode for Brotli {
    fn encode(&mut self, input: &[u8], end: bool) -> pingora::Result<Bytes> {
        use pingora::OrErr;
        let Some(writer) = self.writer.as_mut() else {
            return Ok(Bytes::new());
        };
        self.bytes_in += input.len();
        std::io::Write::write_all(writer, input).or_err(
            pingora::ErrorType::InternalError,
            "while compressing with brotli",
        )?;
        let out = if end {
            self.writer
                .take()
                .map(|w| w.into_inner())
                .unwrap_or_default()
        } else {
            std::mem::take(writer.get_mut())
        };
        self.bytes_out += out.len();
        Ok(out.into())
    }

    fn stat(&self) -> (&'static str, usize, usize, std::time::Duration) {
        (
            "br",
            self.bytes_in,
            self.bytes_out,
            std::time::Duration::ZERO,
        )
    }
}

/// Adds `Accept-Encoding` to `Vary` unless it is there or `Vary` is `*`.
fn add_vary(resp: &mut ResponseHeader) -> pingora::Result<()> {
    let listed = resp.headers.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                let t = t.trim();
                t == "*" || t.eq_ignore_ascii_case("accept-encoding")
            })
        })
    });
    if !listed {
        resp.append_header(VARY, ACCEPT_ENCODING_VALUE.clone())?;
    }
    Ok(())
}

/// A strong `ETag` becomes weak (the bytes changed, the content did not); an invalid one goes.
fn weaken_etag(resp: &mut ResponseHeader) -> pingora::Result<()> {
    let Some(tag) = resp.headers.get(ETAG) else {
        return Ok(());
    };
    let tag = tag.as_bytes();
    if tag.starts_with(b"W/") {
        return Ok(());
    }
    if tag.starts_with(b"\"") {
        let weak = HeaderValue::from_bytes(&[b"W/", tag].concat());
        if let Ok(weak) = weak {
            return resp.insert_header(ETAG, weak);
        }
    }
    resp.remove_header(&ETAG);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Compress {
        Compress {
            encodings: vec![(Coding::Zstd, 3), (Coding::Brotli, 4), (Coding::Gzip, 5)],
            min_size: 1024,
            types: DEFAULT_TYPES
                .iter()
                .map(|t| MediaPattern::parse(t).unwrap())
                .collect(),
        }
    }

    fn picked(accept: &str) -> Option<&'static str> {
        policy().negotiate(accept).map(|(c, _)| c.token())
    }

    #[test]
    fn negotiation_follows_q_values_then_the_gateway_order() {
        assert_eq!(picked("gzip"), Some("gzip"));
        assert_eq!(picked("gzip, deflate, br"), Some("br"));
        assert_eq!(picked("gzip, br, zstd"), Some("zstd"));
        assert_eq!(picked("br;q=0.5, gzip;q=0.8"), Some("gzip"));
        assert_eq!(picked("gzip;q=0, br;q=0"), None);
        assert_eq!(picked("*"), Some("zstd"));
        assert_eq!(picked("*;q=0.1, zstd;q=0, br;q=0"), Some("gzip"));
        assert_eq!(picked("identity"), None);
        assert_eq!(picked(""), None);
        assert_eq!(picked("X-GZIP"), Some("gzip"));
        assert_eq!(picked("gzip;q=1.000, br;q=0.999"), Some("gzip"));
        // A malformed q-value counts as a refusal, not as a preference.
        assert_eq!(picked("br;q=2, gzip;q=0.5"), Some("gzip"));
        assert_eq!(picked("br;q=0.0001, gzip;q=0.5"), Some("gzip"));
    }

    #[test]
    fn media_patterns() {
        let p = |s| MediaPattern::parse(s).unwrap();
        assert!(p("text/*").matches("text/html"));
        assert!(p("text/*").matches("TEXT/CSS"));
        assert!(!p("text/*").matches("text/"));
        assert!(p("application/*+json").matches("application/problem+json"));
        assert!(!p("application/*+json").matches("application/json"));
        assert!(p("application/json").matches("Application/JSON"));
        assert!(!p("application/json").matches("application/jsonx"));
        assert!(MediaPattern::parse("json").is_err());
        assert!(MediaPattern::parse("text/h?ml").is_err());
        assert!(MediaPattern::parse("*/json").is_err());
    }
}
