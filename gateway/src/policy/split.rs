//! Traffic split (`routes[].split`): a route sends a weighted share of its requests to each of
//! several upstreams (blue/green, canary), optionally sticky by a key so that one client stays
//! on one side. A key is hashed to a point in the total weight, and the upstreams own
//! consecutive ranges of it: a reload that keeps the weights keeps every key where it was, and
//! one that moves weight moves only the keys in the range that changed hands.

use crate::proxy::client::cookie_value;
use crate::proxy::context::RequestCtx;
use crate::upstream::Upstream;
use http::HeaderName;
use pingora::http::RequestHeader;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What keeps a client on one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    ClientIp,
    Header(HeaderName),
    Cookie(String),
    Claim(String),
}

impl Sticky {
    /// Parses `client_ip`, `header:NAME`, `cookie:NAME` or `jwt:CLAIM`.
    pub fn parse(text: &str) -> Result<Sticky, String> {
        let bad = || format!("{text:?}: expected client_ip, header:NAME, cookie:NAME or jwt:CLAIM");
        match text.split_once(':') {
            None if text == "client_ip" => Ok(Sticky::ClientIp),
            Some(("header", name)) => HeaderName::from_bytes(name.as_bytes())
                .map(Sticky::Header)
                .map_err(|_| bad()),
            Some(("cookie", name)) if !name.is_empty() => Ok(Sticky::Cookie(name.to_owned())),
            Some(("jwt", claim)) if !claim.is_empty() => Ok(Sticky::Claim(claim.to_owned())),
            _ => Err(bad()),
        }
    }
}

/// A route's split, compiled.
pub struct Split {
    /// Upstreams with the upper end of their range (cumulative weights, ascending).
    pub targets: Box<[(Arc<Upstream>, u64)]>,
    /// The sum of the weights.
    pub total: u64,
    pub sticky: Option<Sticky>,
    /// Spreads requests without a key.
    counter: AtomicU64,
}

impl Split {
    /// A split over `(upstream, weight)`, weights summing to more than zero.
    pub fn new(weighted: Vec<(Arc<Upstream>, u32)>, sticky: Option<Sticky>) -> Split {
        let mut end = 0u64;
        let targets = weighted
            .into_iter()
            .map(|(up, w)| {
                end += u64::from(w);
                (up, end)
            })
            .collect();
        Split {
            targets,
            total: end,
            sticky,
            counter: AtomicU64::new(0),
        }
    }

    /// The index of the upstream for this request.
    pub fn choose(&self, req: &RequestHeader, ctx: &RequestCtx) -> u8 {
        let point = match self.key(req, ctx) {
            // Scaled, not reduced modulo the total: a key keeps its place as a fraction of the
            // weights, so a change of weights moves only the keys whose range changed hands.
            Some(hash) => ((u128::from(hash) * u128::from(self.total)) >> 64) as u64,
            // A low-discrepancy sequence: the shares hold over any short run of requests.
            None => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % self.total
            }
        };
        self.targets
            .iter()
            .position(|(_, end)| point < *end)
            .unwrap_or(0) as u8
    }

    /// The sticky key's hash, when the policy has one and the request carries it.
    fn key(&self, req: &RequestHeader, ctx: &RequestCtx) -> Option<u64> {
        let bytes_hash = |b: &[u8]| crate::hash::value(b);
        match self.sticky.as_ref()? {
            Sticky::ClientIp => ctx.client_ip.map(|ip| match ip {
                std::net::IpAddr::V4(v4) => bytes_hash(&v4.octets()),
                std::net::IpAddr::V6(v6) => bytes_hash(&v6.octets()),
            }),
            Sticky::Header(name) => req.headers.get(name).map(|v| bytes_hash(v.as_bytes())),
            Sticky::Cookie(name) => cookie_value(req, name).map(bytes_hash),
            Sticky::Claim(claim) => {
                let value = ctx.token.as_ref()?.get(claim)?;
                Some(match value.as_str() {
                    Some(s) => bytes_hash(s.as_bytes()),
                    None => bytes_hash(value.to_string().as_bytes()),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_keys_parse() {
        assert_eq!(Sticky::parse("client_ip"), Ok(Sticky::ClientIp));
        assert_eq!(
            Sticky::parse("cookie:sid"),
            Ok(Sticky::Cookie("sid".into()))
        );
        assert_eq!(Sticky::parse("jwt:sub"), Ok(Sticky::Claim("sub".into())));
        assert!(Sticky::parse("header:x y").is_err());
        assert!(Sticky::parse("ip").is_err());
        assert!(Sticky::parse("cookie:").is_err());
    }
}
