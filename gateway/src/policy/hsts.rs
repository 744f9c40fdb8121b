//! `tls.hsts` on a TLS listener: `Strict-Transport-Security` on every proxied response.

use crate::headers::HeaderEdits;
use crate::proxy::context::RequestCtx;
use http::header::HeaderValue;

/// The compiled header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hsts {
    /// The `Strict-Transport-Security` value, checked when the configuration was compiled.
    pub value: HeaderValue,
}

impl Hsts {
    /// Sets the header on a response to a TLS request.
    pub(super) fn on_response(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
    ) -> pingora::Result<()> {
        if ctx.tls {
            headers.set(&http::header::STRICT_TRANSPORT_SECURITY, self.value.clone())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tls_responses_get_the_header() {
        let hsts = Hsts {
            value: HeaderValue::from_static("max-age=60"),
        };
        let mut ctx = RequestCtx::default();
        let mut headers = http::HeaderMap::new();
        hsts.on_response(&mut headers, &ctx).unwrap();
        assert!(headers.is_empty());
        ctx.tls = true;
        hsts.on_response(&mut headers, &ctx).unwrap();
        assert_eq!(headers["strict-transport-security"], "max-age=60");
    }
}
