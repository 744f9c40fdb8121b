//! `redirect_https` on a plain listener: every request is answered with `308` to the same
//! host, path and query on the HTTPS port, before routing.

use crate::proxy::answer::Answer;
use crate::proxy::client::request_host;
use crate::proxy::context::RequestCtx;
use http::header::HeaderValue;
use pingora::http::RequestHeader;
use pingora::proxy::Session;

/// The compiled redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsRedirect {
    /// The HTTPS port redirected to (left out of the URL when 443).
    pub port: u16,
}

impl HttpsRedirect {
    /// Answers a plain-HTTP request with the redirect (400 without a usable `Host`).
    pub(super) fn on_request(&self, session: &Session, ctx: &RequestCtx) -> Result<(), Answer> {
        if ctx.tls {
            return Ok(());
        }
        Err(match https_location(session.req_header(), self.port) {
            Some(location) => Answer::empty(308).with_header(http::header::LOCATION, location),
            None => Answer::error(400, "no usable Host to redirect to"),
        })
    }
}

/// `https://HOST[:PORT]/path?query` for a redirect, or None without a sane Host.
fn https_location(req: &RequestHeader, port: u16) -> Option<HeaderValue> {
    let host = request_host(req).filter(|h| !h.is_empty())?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    HeaderValue::from_str(&location).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, host: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
        if let Some(h) = host {
            req.insert_header("host", h).unwrap();
        }
        req
    }

    #[test]
    fn the_location_keeps_host_path_and_query_and_names_the_port() {
        let req = request("/a/b?c=1", Some("api.test:8080"));
        assert_eq!(
            https_location(&req, 8443).unwrap(),
            "https://api.test:8443/a/b?c=1"
        );
        assert_eq!(
            https_location(&req, 443).unwrap(),
            "https://api.test/a/b?c=1"
        );
        let v6 = request("/", Some("[::1]:80"));
        assert_eq!(https_location(&v6, 8443).unwrap(), "https://[::1]:8443/");
        assert!(https_location(&request("/", None), 443).is_none());
        assert!(https_location(&request("/", Some("")), 443).is_none());
    }
}
