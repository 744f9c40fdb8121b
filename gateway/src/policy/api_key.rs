//! `api_key`: a key from a header (or a query parameter) checked against a file of SHA-256
//! digests. The key's name and scopes go upstream as headers, in place of anything the client
//! sent under those names; the key itself does not go upstream.
//!
//! Keys are looked up by the first 8 bytes of their digest and the whole digest is then
//! compared in constant time, so the time a refusal takes tells nothing about a stored key.

use crate::auth::ForwardedClaims;
use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use ahash::AHashMap;
use http::header::{HeaderName, HeaderValue};
use pingora::proxy::Session;
use std::sync::Arc;

/// Longest key looked at; longer ones are refused without hashing.
const MAX_KEY: usize = 256;

/// One key of the file.
#[derive(Debug)]
pub struct KeyEntry {
    /// SHA-256 of the key.
    pub digest: [u8; 32],
    /// The key's name (forwarded, logged as the user).
    pub name: Arc<str>,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// The headers that go upstream for it (name, and scopes when it has any).
    pub forward: ForwardedClaims,
}

/// A compiled `api_key` policy.
#[derive(Debug)]
pub struct ApiKey {
    /// The request header that carries the key.
    pub header: HeaderName,
    /// The query parameter that may carry it instead.
    pub query: Option<String>,
    /// Scopes a key must all have (403 otherwise).
    pub required_scopes: Vec<String>,
    /// Keys by the first 8 bytes of their digest.
    pub keys: AHashMap<u64, Vec<KeyEntry>>,
    /// The headers the keys' names and scopes are forwarded as.
    pub forward_headers: Vec<HeaderName>,
}

/// How a request presented its key.
enum Presented<'a> {
    Header(&'a [u8]),
    Query(std::borrow::Cow<'a, str>),
}

impl ApiKey {
    /// Checks the request's key, or refuses the request.
    pub(super) fn on_request(&self, session: &Session, ctx: &mut RequestCtx) -> Result<(), Answer> {
        let req = session.req_header();
        let presented = match req.headers.get(&self.header) {
            Some(v) => Some(Presented::Header(v.as_bytes())),
            None => self
                .query
                .as_deref()
                .and_then(|name| query_value(req.uri.query()?, name).map(Presented::Query)),
        };
        let Some(presented) = presented else {
            return Err(refusal(401, "API key required"));
        };
        let key: &[u8] = match &presented {
            Presented::Header(k) => k,
            Presented::Query(k) => k.as_bytes(),
        };
        let key = key.trim_ascii();
        if key.is_empty() || key.len() > MAX_KEY || key.iter().any(|b| !b.is_ascii_graphic()) {
            return Err(refusal(401, "invalid API key"));
        }
        let Some(entry) = self.find(key) else {
            return Err(refusal(401, "invalid API key"));
        };
        if !self
            .required_scopes
            .iter()
            .all(|s| entry.scopes.iter().any(|have| have == s))
        {
            return Err(Answer::error(403, "the API key lacks a required scope"));
        }
        ctx.claims = entry.forward.clone();
        ctx.user = Some(entry.name.clone());
        if let Presented::Query(_) = presented {
            if let Some(name) = &self.query {
                ctx.new_query = Some(without_param(req.uri.query().unwrap_or(""), name));
            }
        }
        Ok(())
    }

    /// The key whose digest is `key`'s.
    pub fn find(&self, key: &[u8]) -> Option<&KeyEntry> {
        let digest = ring::digest::digest(&ring::digest::SHA256, key);
        let digest = digest.as_ref();
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&digest[..8]);
        self.keys
            .get(&u64::from_le_bytes(prefix))?
            .iter()
            .find(|e| constant_time_eq(&e.digest, digest))
    }

    /// Removes the key's header from what goes upstream.
    pub(super) fn on_upstream_request(
        &self,
        headers: &mut dyn crate::headers::HeaderEdits,
        ctx: &RequestCtx,
    ) -> pingora::Result<()> {
        headers.unset(&self.header);
        // What the client sent under the forwarded names never goes upstream.
        for name in &self.forward_headers {
            headers.unset(name);
        }
        for (name, value) in ctx.claims.iter() {
            headers.set(name, value.clone())?;
        }
        Ok(())
    }
}

/// Equality that reads every byte whatever differs.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The (percent-decoded) value of the first `name` parameter of `query`.
fn query_value<'a>(query: &'a str, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    form_urlencoded::parse(query.as_bytes()).find_map(|(k, v)| (k == name).then_some(v))
}

/// `query` without any `name` parameter (what goes upstream). Names are compared decoded,
/// as [`query_value`] finds them, so `api%5Fkey=` cannot carry a key past the check.
fn without_param(query: &str, name: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for pair in query.split('&') {
        let raw = pair.split_once('=').map_or(pair, |(k, _)| k);
        let decoded = form_urlencoded::parse(raw.as_bytes())
            .next()
            .map(|(k, _)| k);
        if decoded.as_deref() == Some(name) {
            continue;
        }
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(pair);
    }
    out
}

/// 401 with the scheme challenge, or another status with the usual body.
fn refusal(status: u16, message: &'static str) -> Answer {
    Answer::error(status, message).with_header(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("ApiKey"),
    )
}

/// Parses a keys file: one key a line, `NAME SHA256-HEX [SCOPE,SCOPE...]`; `#` starts a
/// comment. Errors name the line.
pub fn parse_keys(
    text: &str,
    forward_name: &HeaderName,
    forward_scopes: &HeaderName,
) -> Result<AHashMap<u64, Vec<KeyEntry>>, String> {
    let mut keys: AHashMap<u64, Vec<KeyEntry>> = AHashMap::new();
    let mut names = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}", i + 1);
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let (Some(name), Some(hex)) = (fields.next(), fields.next()) else {
            return Err(at("needs `NAME SHA256-HEX [SCOPES]`"));
        };
        let scopes: Vec<String> = fields
            .next()
            .map(|s| {
                s.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if fields.next().is_some() {
            return Err(at("scopes are one comma-separated field"));
        }
        let digest = parse_digest(hex).ok_or_else(|| {
            at("the key must be given as its SHA-256 digest (64 hex digits), never in clear")
        })?;
        if !names.insert(name.to_owned()) {
            return Err(at(&format!("the name `{name}` is used twice")));
        }
        let value = |v: &str| {
            HeaderValue::from_str(v).map_err(|_| at(&format!("{v:?} cannot be a header value")))
        };
        let mut forward = vec![(forward_name.clone(), value(name)?)];
        if !scopes.is_empty() {
            forward.push((forward_scopes.clone(), value(&scopes.join(" "))?));
        }
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&digest[..8]);
        let bucket = keys.entry(u64::from_le_bytes(prefix)).or_default();
        if bucket.iter().any(|e| e.digest == digest) {
            return Err(at("the same key is listed twice"));
        }
        bucket.push(KeyEntry {
            digest,
            name: name.into(),
            scopes,
            forward: forward.into(),
        });
    }
    Ok(keys)
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new key: 32 random bytes, base64url (43 characters).
pub fn new_key() -> String {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    // The system's random source; failing it is not something to go on from.
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The SHA-256 digest of `key` in hex, as the keys file lists it.
pub fn digest_hex(key: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_file_holds_digests_only() {
        let n = HeaderName::from_static("x-api-key-name");
        let s = HeaderName::from_static("x-api-key-scopes");
        let line = format!(
            "partner-a {} orders:read,orders:write # a comment\n",
            digest_hex("k1")
        );
        let keys = parse_keys(&format!("# keys\n\n{line}"), &n, &s).unwrap();
        let entry = keys.values().flatten().next().unwrap();
        assert_eq!(&*entry.name, "partner-a");
        assert_eq!(entry.scopes, ["orders:read", "orders:write"]);
        assert_eq!(entry.forward[1].1, "orders:read orders:write");
        let err = parse_keys("partner-a not-a-digest\n", &n, &s).unwrap_err();
        assert!(
            err.starts_with("line 1:") && err.contains("never in clear"),
            "{err}"
        );
        let twice = format!("a {0}\nb {0}\n", digest_hex("k"));
        assert!(parse_keys(&twice, &n, &s).unwrap_err().contains("twice"));
        assert!(parse_keys("lonely\n", &n, &s).is_err());
    }

    #[test]
    fn the_query_parameter_is_found_and_removed() {
        assert_eq!(
            query_value("a=1&api_key=k%2Bx&b=2", "api_key").as_deref(),
            Some("k+x")
        );
        assert_eq!(query_value("api_keyx=1", "api_key"), None);
        assert_eq!(without_param("a=1&api_key=k&b=2", "api_key"), "a=1&b=2");
        assert_eq!(without_param("api_key=k", "api_key"), "");
        assert_eq!(without_param("a=1&api%5Fkey=k", "api_key"), "a=1");
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
    }
}
