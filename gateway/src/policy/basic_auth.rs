//! `basic_auth`: users and password hashes from an htpasswd file (bcrypt or argon2 only).
//!
//! Checking a password hash costs tens of milliseconds by design, so it runs on Tokio's
//! blocking pool, a few at a time; credentials that passed are remembered (a bounded set of
//! keyed SHA-256 digests, emptied with the policy when the file changes), and a client that
//! keeps failing is refused for a while without any check (429).

use crate::auth::ForwardedClaims;
use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use ahash::AHashMap;
use base64::Engine;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use pingora::proxy::Session;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Longest `Authorization` value looked at.
const MAX_HEADER: usize = 1024;
/// Verified credentials remembered per policy.
const CACHE_CAP: usize = 10_000;
/// Clients whose failures are counted per policy.
const FAILURES_CAP: usize = 100_000;

/// A stored password hash.
#[derive(Debug)]
pub enum PasswordHash {
    Bcrypt(String),
    Argon2(String),
}

impl PasswordHash {
    /// Parses the hash part of an htpasswd line.
    pub fn parse(hash: &str) -> Result<PasswordHash, String> {
        if ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
            hash.parse::<bcrypt::HashParts>()
                .map(|_| PasswordHash::Bcrypt(hash.to_owned()))
                .map_err(|e| format!("not a valid bcrypt hash: {e}"))
        } else if hash.starts_with("$argon2") {
            argon2::PasswordHash::new(hash)
                .map(|_| PasswordHash::Argon2(hash.to_owned()))
                .map_err(|e| format!("not a valid argon2 hash: {e}"))
        } else {
            Err("only bcrypt (`htpasswd -B`: `$2y$...`) and argon2 (`$argon2id$...`) hashes are accepted; plain text, crypt, MD5 (`$apr1$`) and SHA-1 (`{SHA}`) are refused".into())
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        use argon2::PasswordVerifier;
        match self {
            PasswordHash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            PasswordHash::Argon2(h) => argon2::PasswordHash::new(h).is_ok_and(|parsed| {
                argon2::Argon2::default()
                    .verify_password(password, &parsed)
                    .is_ok()
            }),
        }
    }
}

/// One user of the file.
#[derive(Debug)]
pub struct User {
    pub hash: PasswordHash,
    /// The headers that go upstream for this user.
    pub forward: ForwardedClaims,
    pub name: Arc<str>,
}

/// Failures counted for one client.
struct Failures {
    count: u32,
    since: Instant,
}

/// A compiled `basic_auth` policy.
pub struct BasicAuth {
    /// Users by name.
    pub users: AHashMap<String, Arc<User>>,
    /// `Basic realm="...", charset="UTF-8"`.
    pub challenge: HeaderValue,
    /// Remove `Authorization` from what goes upstream.
    pub remove_authorization: bool,
    /// The header the user name goes upstream as.
    pub forward_user: Option<HeaderName>,
    /// Failures a client may make per `window` before it is refused without a check.
    pub max_failures: u32,
    pub window: Duration,
    /// Verified credentials: keyed digests of `user:password`.
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Failures by client address.
    failures: Mutex<AHashMap<IpAddr, Failures>>,
    /// Hash checks running at once.
    checks: Arc<Semaphore>,
    /// The per-policy key of the credential digests.
    salt: [u8; 32],
    metrics: crate::metrics::BasicAuthMetrics,
    /// Checked for unknown users (a known user's hash), so that they take as long as known
    /// ones.
    decoy: Option<Arc<User>>,
}

impl BasicAuth {
    /// The policy `name` over `users`.
    pub fn new(
        name: &str,
        users: AHashMap<String, Arc<User>>,
        challenge: HeaderValue,
        remove_authorization: bool,
        forward_user: Option<HeaderName>,
        max_failures: u32,
        window: Duration,
    ) -> BasicAuth {
        use ring::rand::SecureRandom;
        let mut salt = [0u8; 32];
        // The key only resists precomputed tables of the digests; a failed fill leaves zeros.
        let _ = ring::rand::SystemRandom::new().fill(&mut salt);
        let decoy = users.values().next().cloned();
        let checks = std::thread::available_parallelism().map_or(2, |n| n.get());
        BasicAuth {
            users,
            challenge,
            remove_authorization,
            forward_user,
            max_failures,
            window,
            verified: Mutex::new(HashSet::new()),
            failures: Mutex::new(AHashMap::new()),
            checks: Arc::new(Semaphore::new(checks)),
            salt,
            decoy,
            metrics: crate::metrics::BasicAuthMetrics::new(name),
        }
    }

    /// Checks the request's credentials, or refuses the request.
    pub(super) async fn on_request(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), Answer> {
        if let Some(retry_after) = ctx.client_ip.and_then(|ip| self.blocked(ip)) {
            self.metrics.throttled.inc();
            return Err(Answer::error(429, "too many failed logins")
                .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry_after)));
        }
        let Some((user, password)) = credentials(&session.req_header().headers) else {
            self.metrics.invalid.inc();
            return Err(self.refusal("credentials required"));
        };
        let known = self.users.get(user.as_str());
        let digest = self.digest(&user, &password);
        let cached = known.is_some() && self.lock_verified().contains(&digest);
        if !cached {
            let Some(checked) = known.or(self.decoy.as_ref()).cloned() else {
                return Err(self.refusal("invalid credentials"));
            };
            let Ok(permit) = self.checks.clone().acquire_owned().await else {
                return Err(Answer::error(503, "credential check unavailable"));
            };
            // The permit goes with the check: a request dropped meanwhile does not free its
            // place while the hash is still being computed.
            let ok = tokio::task::spawn_blocking(move || {
                let ok = checked.hash.verify(&password);
                drop(permit);
                ok
            })
            .await
            .unwrap_or(false);
            if !ok || known.is_none() {
                self.metrics.invalid.inc();
                if let Some(ip) = ctx.client_ip {
                    self.count_failure(ip);
                }
                return Err(self.refusal("invalid credentials"));
            }
            self.metrics.verified.inc();
            self.insert_verified(digest);
        }
        if cached {
            self.metrics.cached.inc();
        }
        if let Some(user) = known {
            ctx.claims = user.forward.clone();
            ctx.user = Some(user.name.clone());
        }
        Ok(())
    }

    /// Removes the credentials and forged identity from what goes upstream.
    pub(super) fn on_upstream_request(
        &self,
        headers: &mut dyn crate::headers::HeaderEdits,
        ctx: &RequestCtx,
    ) -> pingora::Result<()> {
        if self.remove_authorization {
            headers.unset(&AUTHORIZATION);
        }
        if let Some(name) = &self.forward_user {
            headers.unset(name);
        }
        for (name, value) in ctx.claims.iter() {
            headers.set(name, value.clone())?;
        }
        Ok(())
    }

    /// Whether `user:password` passed a check before.
    pub fn remembered(&self, user: &str, password: &[u8]) -> bool {
        let digest = self.digest(user, password);
        self.lock_verified().contains(&digest)
    }

    /// Remembers credentials that passed (the set is emptied when full).
    pub fn remember(&self, user: &str, password: &[u8]) {
        self.insert_verified(self.digest(user, password));
    }

    fn insert_verified(&self, digest: [u8; 32]) {
        let mut verified = self.lock_verified();
        if verified.len() >= CACHE_CAP {
            verified.clear();
        }
        verified.insert(digest);
    }

    fn refusal(&self, message: &'static str) -> Answer {
        Answer::error(401, message)
            .with_header(http::header::WWW_AUTHENTICATE, self.challenge.clone())
    }

    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.salt);
        ctx.update(user.as_bytes());
        ctx.update(&[0]);
        ctx.update(password);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    fn lock_verified(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds until `ip` may try again, when it has used up its failures.
    fn blocked(&self, ip: IpAddr) -> Option<u64> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let f = failures.get(&ip)?;
        let left = self.window.checked_sub(f.since.elapsed())?;
        (f.count >= self.max_failures).then(|| left.as_secs().max(1))
    }

    fn count_failure(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= FAILURES_CAP {
            let window = self.window;
            failures.retain(|_, f| f.since.elapsed() < window);
            // Still full (a flood of addresses within the window): start again, bounded.
            if failures.len() >= FAILURES_CAP {
                failures.clear();
            }
        }
        let now = Instant::now();
        let f = failures.entry(ip).or_insert(Failures {
            count: 0,
            since: now,
        });
        if f.since.elapsed() >= self.window {
            *f = Failures {
                count: 0,
                since: now,
            };
        }
        f.count += 1;
    }
}

/// The user and password of a `Basic` `Authorization` header.
pub fn credentials(headers: &http::HeaderMap) -> Option<(String, Vec<u8>)> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    if value.len() > MAX_HEADER || value.len() < 6 || !value[..6].eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value[6..].trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = std::str::from_utf8(&decoded[..colon]).ok()?;
    if user.is_empty() || user.bytes().any(|b| b.is_ascii_control()) {
        return None;
    }
    Some((user.to_owned(), decoded[colon + 1..].to_vec()))
}

/// Parses an htpasswd file: `user:hash` a line; `#` lines and blank lines skipped. Errors
/// name the line.
pub fn parse_users(
    text: &str,
    forward_user: Option<&HeaderName>,
) -> Result<AHashMap<String, Arc<User>>, String> {
    let mut users = AHashMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}", i + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, hash)) = line.split_once(':') else {
            return Err(at("needs `user:hash`"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_control()) {
            return Err(at("the user name is empty or has a control character"));
        }
        let hash = PasswordHash::parse(hash).map_err(|m| at(&m))?;
        let mut forward = Vec::new();
        if let Some(header) = forward_user {
            let value = HeaderValue::from_str(name)
                .map_err(|_| at("the user name cannot be a header value"))?;
            forward.push((header.clone(), value));
        }
        let user = User {
            hash,
            forward: forward.into(),
            name: name.into(),
        };
        if users.insert(name.to_owned(), Arc::new(user)).is_some() {
            return Err(at(&format!("the user `{name}` is listed twice")));
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slow_hashes_are_accepted() {
        let bcrypt = bcrypt::hash("pw", 4).unwrap();
        let users = parse_users(&format!("# ops\nalice:{bcrypt}\n"), None).unwrap();
        assert!(users["alice"].hash.verify(b"pw"));
        assert!(!users["alice"].hash.verify(b"pw2"));
        for bad in [
            "bob:secret",
            "bob:{SHA}abc=",
            "bob:$apr1$x$y",
            "bob:$6$salt$hash",
        ] {
            let err = parse_users(bad, None).unwrap_err();
            assert!(
                err.starts_with("line 1:") && err.contains("refused"),
                "{bad}: {err}"
            );
        }
        assert!(parse_users("nobody\n", None).is_err());
        let twice = format!("a:{bcrypt}\na:{bcrypt}\n");
        assert!(parse_users(&twice, None).unwrap_err().contains("twice"));
    }

    #[test]
    fn credentials_are_read_from_the_basic_scheme_only() {
        let mut h = http::HeaderMap::new();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        h.insert(
            AUTHORIZATION,
            format!("Basic {}", b64("alice:p:w")).parse().unwrap(),
        );
        assert_eq!(credentials(&h), Some(("alice".into(), b"p:w".to_vec())));
        h.insert(
            AUTHORIZATION,
            format!("bearer {}", b64("alice:pw")).parse().unwrap(),
        );
        assert_eq!(credentials(&h), None);
        h.insert(AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(credentials(&h), None);
        h.insert(
            AUTHORIZATION,
            format!("Basic {}", b64("nopassword")).parse().unwrap(),
        );
        assert_eq!(credentials(&h), None);
        h.insert(
            AUTHORIZATION,
            format!("Basic {}", "A".repeat(4000)).parse().unwrap(),
        );
        assert_eq!(credentials(&h), None);
    }
}
