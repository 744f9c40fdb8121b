//! `rate_limit` on a route: a token bucket per key (client IP, route, a header, or a claim of
//! the token the `auth` policy before it verified), local or shared through Redis. The
//! remaining quota goes back in `RateLimit` / `RateLimit-Policy`.

use crate::headers::{HeaderEdits, RATELIMIT, RATELIMIT_POLICY};
use crate::proxy::answer::Answer;
use crate::proxy::client::never_indexed;
use crate::proxy::context::RequestCtx;
use crate::ratelimit::{Decision, KeySource, LimitKey, RateLimitPolicy};
use http::header::{HeaderName, HeaderValue};
use pingora::proxy::Session;
use serde_json::{Map, Value};
use std::sync::Arc;

static RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");

/// The compiled limit.
#[derive(Clone)]
pub struct RateLimit {
    /// The `rate_limits` policy (buckets), shared by every route that names it.
    pub policy: Arc<RateLimitPolicy>,
    /// The route's index, the key of `key: route`.
    pub route: u32,
}

impl RateLimit {
    /// Takes one token from the request's bucket, or refuses the request.
    pub(super) async fn on_request(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), Answer> {
        let limit = &self.policy;
        let key = match &limit.key {
            KeySource::ClientIp => ctx.client_ip.map(LimitKey::Ip),
            KeySource::Route => Some(LimitKey::Route(self.route)),
            KeySource::Header(name) => session
                .req_header()
                .headers
                .get(name)
                .map(|v| LimitKey::Hash(crate::hash::value(v.as_bytes()))),
            KeySource::Claim(claim) => ctx
                .token
                .as_deref()
                .and_then(|claims| claim_key(claims, claim))
                .map(LimitKey::Hash),
        };
        let decision = if limit.is_shared() {
            limit.check_shared(key).await
        } else {
            limit.check(key)
        };
        match decision {
            Decision::Allowed { remaining, reset } => {
                ctx.limit_decision = Some("allowed");
                ctx.quota = Some((limit.clone(), remaining, reset));
                Ok(())
            }
            Decision::Limited { retry_after } => {
                ctx.limit_decision = Some("limited");
                Err(Answer::error(429, "too many requests")
                    .with_header(RETRY_AFTER.clone(), HeaderValue::from(retry_after))
                    .with_header(RATELIMIT_POLICY.clone(), limit.policy_header.clone())
                    .with_header(RATELIMIT.clone(), limit.state_header(0, retry_after)))
            }
            Decision::Unavailable => Err(Answer::error(503, "rate limiter unavailable")),
            Decision::NoKey => Err(Answer::error(400, "request lacks the rate-limit key")),
        }
    }

    /// The quota left after this request.
    pub(super) fn on_response(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
    ) -> pingora::Result<()> {
        if let Some((limit, remaining, reset)) = &ctx.quota {
            headers.set(&RATELIMIT_POLICY, limit.policy_header.clone())?;
            // Different on every response: never worth HPACK's table.
            let state = limit.state_header(*remaining, *reset);
            headers.set(&RATELIMIT, never_indexed(state))?;
        }
        Ok(())
    }
}

/// A claim's value as a rate-limit key.
fn claim_key(claims: &Map<String, Value>, claim: &str) -> Option<u64> {
    match claims.get(claim)? {
        Value::String(s) => Some(crate::hash::value(s.as_bytes())),
        Value::Null => None,
        other => Some(crate::hash::value(other.to_string().as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_key_by_value_and_a_null_claim_is_no_key() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"sub":"u-1","n":7,"none":null,"list":["a"]}"#).unwrap();
        assert_eq!(claim_key(&claims, "sub"), Some(crate::hash::value(b"u-1")));
        assert_eq!(claim_key(&claims, "n"), Some(crate::hash::value(b"7")));
        assert_eq!(claim_key(&claims, "none"), None);
        assert_eq!(claim_key(&claims, "missing"), None);
        assert_eq!(
            claim_key(&claims, "list"),
            Some(crate::hash::value(b"[\"a\"]"))
        );
    }
}
