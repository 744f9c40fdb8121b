//! The gateway's own checks of a request head, before routing: framing, size, authority,
//! target form and path. One pure function, [`check_head`], called by the request path and by
//! the `request_head` fuzz target alike, so the fuzzer exercises what serves traffic.

use crate::config::LimitsConfig;
use crate::proxy::answer::{After, Answer};
use crate::routing::normalize_path;
use pingora::http::RequestHeader;
use std::borrow::Cow;

/// A head that passed: the normalised path routing sees. It is borrowed when it is the
/// request's own; owned when it must be forwarded instead (absolute-form always goes upstream
/// in origin-form).
#[derive(Debug, PartialEq, Eq)]
pub struct Head<'a> {
    /// The normalised path.
    pub path: Cow<'a, str>,
    /// How the request named its target.
    pub form: TargetForm,
}

/// What the head checks refuse, with the answer each gets. Every refusal closes the
/// connection: after a head the gateway will not forward, nothing on it can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadRefusal {
    /// Request smuggling shapes (400).
    AmbiguousFraming,
    /// More fields or bytes than `limits` allows (431).
    TooLarge,
    /// An HTTP/2 `Host` that names another host than `:authority` (400).
    AuthorityConflict,
    /// HTTP/1.1 without `Host`, or more than one `Host` (400).
    BadHost,
    /// A target routing cannot see as the upstream would, or a path that does not normalise
    /// (400).
    BadTarget,
}

impl HeadRefusal {
    /// The answer the client gets.
    pub fn answer(self) -> Answer {
        let (status, message) = match self {
            HeadRefusal::AmbiguousFraming => (400, "ambiguous message framing"),
            HeadRefusal::TooLarge => (431, "request header fields too large"),
            HeadRefusal::AuthorityConflict => (400, "Host does not match :authority"),
            HeadRefusal::BadHost => (400, "exactly one Host header is required"),
            HeadRefusal::BadTarget => (400, "invalid path"),
        };
        Answer::error(status, message).then(After::Close)
    }
}

/// Checks a request head. `raw_head` is the HTTP/1 head as received (HTTP/2 has none): its
/// size is what `limits` bounds, and a `Content-Length` Pingora dropped beside
/// `Transfer-Encoding` is found in it.
pub fn check_head<'a>(
    req: &'a RequestHeader,
    raw_head: Option<&[u8]>,
    limits: &LimitsConfig,
) -> Result<Head<'a>, HeadRefusal> {
    let fields = head_fields(&req.headers);
    if ambiguous_framing(&fields, raw_head) || bare_lf_end(raw_head) {
        return Err(HeadRefusal::AmbiguousFraming);
    }
    if bad_host(req, &fields) {
        return Err(HeadRefusal::BadHost);
    }
    if header_too_large(req, raw_head, limits) {
        return Err(HeadRefusal::TooLarge);
    }
    if authority_conflict(req) {
        return Err(HeadRefusal::AuthorityConflict);
    }
    let form = target_form(req);
    if form == TargetForm::Refused {
        return Err(HeadRefusal::BadTarget);
    }
    match normalize_path(req.uri.path()) {
        Ok(path) if form == TargetForm::Absolute => Ok(Head {
            path: Cow::Owned(path.into_owned()),
            form,
        }),
        Ok(path) => Ok(Head { path, form }),
        Err(_) => Err(HeadRefusal::BadTarget),
    }
}

/// More header fields, or more bytes of request head, than `limits` allows (431). HTTP/1
/// heads are measured as received; HTTP/2 ones as the fields' names and values.
fn header_too_large(req: &RequestHeader, raw_head: Option<&[u8]>, limits: &LimitsConfig) -> bool {
    let headers = &req.headers;
    if headers.len() > limits.max_request_headers {
        return true;
    }
    let max = limits.max_request_header_bytes.0 as usize;
    match raw_head {
        Some(raw) => raw.len() > max,
        None => {
            headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum::<usize>()
                > max
        }
    }
}

/// Message framing a proxy must not guess at, the shapes of request smuggling: two
/// `Content-Length`s, a `Content-Length` that is not plain digits (`42, 42`), a
/// `Transfer-Encoding` that is anything but one `chunked`, or both headers. Pingora drops the
/// `Content-Length` of a request that also has `Transfer-Encoding` while parsing (RFC 9112
/// allows that); the gateway refuses such requests instead, so it looks at the raw header,
/// which is only needed when `Transfer-Encoding` is present.
fn ambiguous_framing(fields: &HeadFields, raw_head: Option<&[u8]>) -> bool {
    let ((length, lengths), (coding, codings)) = (fields.length, fields.coding);
    if let Some(length) = length {
        let digits = length.as_bytes();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) || lengths > 1 {
            return true;
        }
    }
    let Some(coding) = coding else {
        return false;
    };
    if codings > 1
        || !coding
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
        || length.is_some()
    {
        return true;
    }
    raw_head.is_some_and(|raw| {
        raw.split(|b| *b == b'\n')
            .any(|line| line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
    })
}

/// A field's first value and how many values it has (more than one is all that matters).
type CountedField<'a> = (Option<&'a http::HeaderValue>, usize);

/// The fields the head checks read: `Content-Length`, `Transfer-Encoding` and `Host`.
#[derive(Clone, Copy)]
struct HeadFields<'a> {
    length: CountedField<'a>,
    coding: CountedField<'a>,
    host: CountedField<'a>,
}

/// The fields of a head the checks read. A head of a few fields
/// ([`crate::headers::FEW_FIELDS`]), the usual request, is read in one pass.
fn head_fields(headers: &http::HeaderMap) -> HeadFields<'_> {
    let mut fields = HeadFields {
        length: (None, 0),
        coding: (None, 0),
        host: (None, 0),
    };
    if headers.len() <= crate::headers::FEW_FIELDS {
        for (name, value) in headers {
            let field = if name == http::header::CONTENT_LENGTH {
                &mut fields.length
            } else if name == http::header::TRANSFER_ENCODING {
                &mut fields.coding
            } else if name == http::header::HOST {
                &mut fields.host
            } else {
                continue;
            };
            field.0 = field.0.or(Some(value));
            field.1 += 1;
        }
        return fields;
    }
    let first_two = |name| {
        let mut values = headers.get_all(name).iter();
        let first = values.next();
        (
            first,
            usize::from(first.is_some()) + usize::from(values.next().is_some()),
        )
    };
    HeadFields {
        length: first_two(http::header::CONTENT_LENGTH),
        coding: first_two(http::header::TRANSFER_ENCODING),
        host: first_two(http::header::HOST),
    }
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without `Host`, or any request with more than
/// one, is answered 400. (HTTP/1.0 may leave it out; HTTP/2 carries `:authority`.)
fn bad_host(req: &RequestHeader, fields: &HeadFields) -> bool {
    fields.host.1 > 1 || (fields.host.1 == 0 && req.version == http::Version::HTTP_11)
}

/// An HTTP/1 head whose blank line is not CRLF CRLF: a bare LF ended it, so what the client
/// meant as more header fields would be read as the body or the next request.
fn bare_lf_end(raw_head: Option<&[u8]>) -> bool {
    raw_head.is_some_and(|raw| !raw.ends_with(b"\r\n\r\n"))
}

/// An HTTP/2 request whose `Host` names another host than its `:authority` (RFC 9113 section
/// 8.3.1: malformed). Routing goes by `:authority` while Pingora would hand `Host` upstream as
/// the authority, so the two must agree. (HTTP/1 absolute-form has the same rule, which
/// Pingora enforces itself.)
fn authority_conflict(req: &RequestHeader) -> bool {
    // Origin-form (the usual case) has no authority: no Host lookup.
    let Some(authority) = req.uri.authority() else {
        return false;
    };
    let Some(host) = req.headers.get(http::header::HOST) else {
        return false;
    };
    !host
        .as_bytes()
        .eq_ignore_ascii_case(authority.as_str().as_bytes())
}

/// How the request names its target. Only origin-form (`/path?query`) reaches routing as is;
/// an absolute-form target (`http://host/path`) is routed by `Host`, which Pingora makes its
/// authority, and forwarded in origin-form. Anything else (`*`, authority-form, a path that
/// does not start with `/`, bytes that are not UTF-8, where routing would see another path
/// than the upstream) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetForm {
    /// `/path?query`.
    Origin,
    /// `http://host/path`.
    Absolute,
    /// Anything else.
    Refused,
}

fn target_form(req: &RequestHeader) -> TargetForm {
    let raw = req.raw_path();
    if !req.raw_path_is_utf8() {
        return TargetForm::Refused;
    }
    match raw.first() {
        Some(b'/') => TargetForm::Origin,
        _ if raw.len() > 8
            && (raw[..7].eq_ignore_ascii_case(b"http://")
                || raw[..8].eq_ignore_ascii_case(b"https://")) =>
        {
            TargetForm::Absolute
        }
        _ => TargetForm::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn framing_is_judged_alike_for_short_and_long_heads() {
        // (fields, ambiguous without looking at the raw head)
        let cases: [(&[(&str, &str)], bool); 9] = [
            (&[], false),
            (&[("content-length", "42")], false),
            (&[("transfer-encoding", "chunked")], false),
            (&[("content-length", "42"), ("content-length", "42")], true),
            (&[("content-length", "42, 42")], true),
            (&[("content-length", "")], true),
            (&[("transfer-encoding", "gzip, chunked")], true),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                true,
            ),
            (
                &[("transfer-encoding", "chunked"), ("content-length", "1")],
                true,
            ),
        ];
        for (fields, ambiguous) in cases {
            // Padded past the one-pass limit, the lookups answer instead.
            for padding in [0, 20] {
                let mut headers = http::HeaderMap::new();
                for i in 0..padding {
                    headers.append(
                        http::HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap(),
                        http::HeaderValue::from_static("1"),
                    );
                }
                for (name, value) in fields {
                    headers.append(*name, http::HeaderValue::from_str(value).unwrap());
                }
                assert_eq!(
                    ambiguous_framing(&head_fields(&headers), None),
                    ambiguous,
                    "{fields:?} with {padding} more fields"
                );
            }
        }
        // A lone `chunked` is ambiguous only when the raw head also had a `Content-Length`.
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "transfer-encoding",
            http::HeaderValue::from_static("chunked"),
        );
        let raw = Bytes::from_static(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n");
        assert!(ambiguous_framing(&head_fields(&headers), Some(&raw[..])));
    }
}
