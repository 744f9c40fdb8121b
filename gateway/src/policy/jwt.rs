//! `auth` on a route: a JWT bearer token (header or cookie) checked against the policy's keys.
//! A valid token's forwarded claims replace the client's identity headers upstream, and its
//! claims stay on the request context for the policies after it (rate-limit keys).

use crate::auth::{AuthError, AuthPolicy};
use crate::headers::HeaderEdits;
use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use http::header::HeaderValue;
use pingora::proxy::Session;
use std::sync::Arc;

/// The compiled token check.
#[derive(Clone)]
pub struct Jwt {
    /// The `auth` policy (keys, claim rules), shared by every route that names it.
    pub policy: Arc<AuthPolicy>,
    /// Requests without a token pass (a token that is present must be valid).
    pub optional: bool,
}

impl Jwt {
    /// Verifies the request's token, or refuses the request.
    pub(super) async fn on_request(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), Answer> {
        let checked = match self.policy.token(&session.req_header().headers) {
            None if self.optional => return Ok(()),
            None => {
                self.policy.metrics.missing.inc();
                Err(AuthError::Missing)
            }
            Some(token) => self.policy.verify(token).await,
        };
        match checked {
            Ok(v) => {
                (ctx.claims, ctx.user, ctx.token) = (v.forward, v.subject, v.claims);
                Ok(())
            }
            Err(e) => Err(refusal(e)),
        }
    }

    /// Sends the token's forwarded claims upstream, in place of whatever the client sent.
    pub(super) fn on_upstream_request(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
    ) -> pingora::Result<()> {
        for (name, value) in ctx.claims.iter() {
            headers.set(name, value.clone())?;
        }
        Ok(())
    }
}

/// The answer to a refused token: 401 with a `WWW-Authenticate` challenge (RFC 6750), 403 for
/// missing claims, 503 when the policy has no keys yet.
fn refusal(error: AuthError) -> Answer {
    let (status, message, challenge) = match error {
        AuthError::Missing => (401, "token required", "Bearer".to_string()),
        AuthError::Invalid(why) => (
            401,
            why,
            format!("Bearer error=\"invalid_token\", error_description=\"{why}\""),
        ),
        AuthError::Forbidden(why) => (
            403,
            why,
            format!("Bearer error=\"insufficient_scope\", error_description=\"{why}\""),
        ),
        AuthError::NoKeys => return Answer::error(503, "no keys to verify tokens"),
    };
    let challenge = HeaderValue::from_str(&challenge).unwrap_or(HeaderValue::from_static("Bearer"));
    Answer::error(status, message).with_header(http::header::WWW_AUTHENTICATE, challenge)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderName;

    #[test]
    fn refusals_carry_the_challenge_rfc_6750_asks_for() {
        let missing = refusal(AuthError::Missing);
        assert_eq!(missing.status, 401);
        assert_eq!(missing.headers[0].1, "Bearer");
        let invalid = refusal(AuthError::Invalid("token expired"));
        assert_eq!(invalid.status, 401);
        assert_eq!(
            invalid.headers[0].1,
            "Bearer error=\"invalid_token\", error_description=\"token expired\""
        );
        let forbidden = refusal(AuthError::Forbidden("a required claim is missing"));
        assert_eq!(forbidden.status, 403);
        assert!(forbidden.headers[0]
            .1
            .to_str()
            .unwrap()
            .contains("insufficient_scope"));
        let no_keys = refusal(AuthError::NoKeys);
        assert_eq!((no_keys.status, no_keys.headers.len()), (503, 0));
    }

    #[test]
    fn forwarded_claims_replace_the_clients_headers() {
        let ctx = RequestCtx {
            claims: Arc::from(vec![(
                HeaderName::from_static("x-user-id"),
                HeaderValue::from_static("u-1"),
            )]),
            ..RequestCtx::default()
        };
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user-id", HeaderValue::from_static("forged"));
        let policy = crate::auth::AuthPolicy::new(
            "t",
            &crate::config::parse(
                std::path::Path::new("t.yaml"),
                "listeners: { h: { address: \"127.0.0.1:1\" } }\nupstreams: { u: { targets: [\"127.0.0.1:2\"] } }\nauth: { a: { secret: \"0123456789abcdef0123456789abcdef\", algorithms: [HS256] } }\nroutes: [ { name: r, upstream: u } ]\n",
                &Default::default(),
            )
            .unwrap()
            .auth["a"]
            .value,
            &Default::default(),
        )
        .unwrap();
        let jwt = Jwt {
            policy: Arc::new(policy),
            optional: false,
        };
        jwt.on_upstream_request(&mut headers, &ctx).unwrap();
        assert_eq!(headers["x-user-id"], "u-1");
    }
}
