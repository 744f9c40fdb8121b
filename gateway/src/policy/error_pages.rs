//! `error_pages` on a listener or a route: the body of an answer the gateway makes itself (404,
//! 413, 429, 502, 503, 504, ...) in place of the JSON error, from a file or inline, with a
//! content type. `{request_id}` and `{status}` in the body are filled in per answer.

use bytes::Bytes;
use http::header::HeaderValue;

/// A piece of a page's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Bytes as written.
    Text(Bytes),
    /// `{request_id}`.
    RequestId,
    /// `{status}`.
    Status,
}

/// One compiled page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorPage {
    /// Its `Content-Type`.
    pub content_type: HeaderValue,
    /// Its body, in pieces.
    pub parts: Vec<Part>,
}

impl ErrorPage {
    /// A page from its text: `{request_id}` and `{status}` are placeholders, the rest is kept.
    pub fn new(content_type: HeaderValue, text: &str) -> ErrorPage {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find('{') {
            let (placeholder, len) = if rest[i..].starts_with("{request_id}") {
                (Part::RequestId, "{request_id}".len())
            } else if rest[i..].starts_with("{status}") {
                (Part::Status, "{status}".len())
            } else {
                parts.push(Part::Text(Bytes::copy_from_slice(&rest.as_bytes()[..=i])));
                rest = &rest[i + 1..];
                continue;
            };
            if i > 0 {
                parts.push(Part::Text(Bytes::copy_from_slice(&rest.as_bytes()[..i])));
            }
            parts.push(placeholder);
            rest = &rest[i + len..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(Bytes::copy_from_slice(rest.as_bytes())));
        }
        ErrorPage {
            content_type,
            parts,
        }
    }

    /// The body for one answer.
    pub fn render(&self, status: u16, request_id: Option<&HeaderValue>) -> Bytes {
        if let [Part::Text(t)] = &self.parts[..] {
            return t.clone();
        }
        let mut out = Vec::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.extend_from_slice(t),
                Part::RequestId => {
                    out.extend_from_slice(request_id.map_or(&[][..], |v| v.as_bytes()))
                }
                Part::Status => out.extend_from_slice(status.to_string().as_bytes()),
            }
        }
        Bytes::from(out)
    }
}

/// A listener's or a route's pages, by status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorPages(pub Vec<(u16, ErrorPage)>);

impl ErrorPages {
    /// The page for `status`, if any.
    pub fn get(&self, status: u16) -> Option<&ErrorPage> {
        self.0.iter().find(|(s, _)| *s == status).map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_in() {
        let page = ErrorPage::new(
            HeaderValue::from_static("text/html"),
            "<p>{status}: id {request_id} {other}</p>",
        );
        let id = HeaderValue::from_static("abc");
        assert_eq!(
            &page.render(503, Some(&id))[..],
            b"<p>503: id abc {other}</p>"
        );
        let plain = ErrorPage::new(HeaderValue::from_static("text/plain"), "gone");
        assert_eq!(&plain.render(404, None)[..], b"gone");
    }
}
