//! JWT checks: named policies compiled from the `auth` section, each with its keys (an HMAC
//! secret, PEM public keys, or a JWKS endpoint kept fresh in the background), the claims it
//! requires, and the claims it forwards upstream as headers.
//!
//! Every key is pinned to one algorithm: a token is only checked with keys whose algorithm is
//! the token's, so an RSA public key can never be used as an HMAC secret, and `alg: none` is
//! refused before any key is looked at.

use crate::config::{AuthConfig, DnsConfig, OneOrMany};
use arc_swap::ArcSwap;
use bytes::Bytes;
use hickory_resolver::TokioResolver;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No token, or one that does not verify (signature, format, `exp`, `nbf`, `iss`, `aud`,
    /// algorithm): 401 with `WWW-Authenticate: Bearer error="invalid_token"`.
    Invalid(&'static str),
    /// No token where one is required: 401 with a bare `WWW-Authenticate: Bearer`.
    Missing,
    /// A valid token without the claims the route requires: 403 `insufficient_scope`.
    Forbidden(&'static str),
    /// No key was ever loaded for the policy (its JWKS endpoint never answered): 503.
    NoKeys,
}

/// A token that verified: the policy's verdict, and until when (Unix seconds) it stands.
struct CachedToken {
    /// The policy's verdict on the claims and the headers they become, worked out once.
    outcome: Result<Verified, AuthError>,
    valid_until: u64,
}

/// Tokens longer than this are verified every time rather than remembered, which bounds the
/// cache's memory (`token_cache` × 2 KiB at most).
const MAX_CACHED_TOKEN: usize = 2048;

/// One verification key, pinned to its algorithm.
struct VerifyKey {
    kid: Option<String>,
    key: DecodingKey,
    validation: Arc<Validation>,
}

/// A set of keys, replaced whole when a JWKS is fetched.
#[derive(Default)]
struct KeySet {
    keys: Vec<VerifyKey>,
}

/// The claims a valid token carried, ready to forward (shared with the token cache).
pub type ForwardedClaims = Arc<[(HeaderName, HeaderValue)]>;

/// A valid token's claims, for the policies that read them after the check (shared with the
/// token cache).
pub type TokenClaims = Arc<Map<String, Value>>;

/// What a valid token yields.
#[derive(Debug, Default, Clone)]
pub struct Verified {
    /// Claims to send upstream as headers.
    pub forward: ForwardedClaims,
    /// Every claim of the token.
    pub claims: Option<TokenClaims>,
    /// The `sub` claim, for the access log.
    pub subject: Option<Arc<str>>,
}

/// What defines an `auth` policy, as compiled: its static keys by content (a key file
/// rewritten with a new key makes another spec), its key set's address, its claim rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSpec {
    /// Hash of every static key: algorithm, `kid` and bytes.
    static_keys: u64,
    jwks: Option<(JwksUrl, crate::config::JwksConfig)>,
    issuer: Vec<String>,
    audience: Vec<String>,
    leeway: u64,
    require_exp: bool,
    required_claims: Vec<String>,
    claims: Vec<(String, Vec<String>)>,
    forward: Vec<(String, HeaderName)>,
    cookie: Option<String>,
    token_cache: usize,
    token_cache_ttl: u64,
    dns: DnsConfig,
}

/// A compiled `auth` policy.
pub struct AuthPolicy {
    /// The policy's name.
    pub name: Arc<str>,
    /// What it checks, as compiled; a policy with the same spec (and its fetched keys)
    /// survives reloads.
    pub spec: AuthSpec,
    keys: ArcSwap<KeySet>,
    jwks: Option<Arc<JwksSource>>,
    /// Validations by algorithm, shared by the keys of that algorithm.
    validations: Vec<(Algorithm, Arc<Validation>)>,
    required_claims: Vec<String>,
    claim_values: Vec<(String, Vec<String>)>,
    /// Claim → header it is forwarded in.
    pub forward: Vec<(String, HeaderName)>,
    cookie: Option<String>,
    /// Claims of tokens that passed the signature and time checks, by token.
    cache: Option<quick_cache::sync::Cache<String, Arc<CachedToken>>>,
    cache_ttl: u64,
    leeway: u64,
    tasks_started: std::sync::atomic::AtomicBool,
    /// Metric handles.
    pub metrics: crate::metrics::AuthMetrics,
}

struct JwksSource {
    url: JwksUrl,
    /// The TLS client, for an `https://` URL.
    tls: Option<tokio_rustls::TlsConnector>,
    refresh: Duration,
    min_refetch: Duration,
    timeout: Duration,
    /// Wakes the fetcher for a token with an unknown `kid`.
    wake: Notify,
    /// Bumped after every fetch attempt; requests waiting for a refetch watch it.
    fetched: watch::Sender<u64>,
    /// When the last fetch started (ms since `epoch`), for the refetch rate limit.
    last_attempt_ms: AtomicU64,
    /// Hash of the last document whose skipped keys were reported.
    last_document: AtomicU64,
    epoch: Instant,
}

impl JwksSource {
    /// Whether `min_refetch_interval` has passed since the last fetch began.
    fn refetch_allowed(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_attempt_ms.load(Ordering::Relaxed);
        last == 0 || now.saturating_sub(last) >= self.min_refetch.as_millis() as u64
    }
}

/// An `http://` or `https://host:port/path` JWKS address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    /// `https://`: fetched over TLS, certificate and name verified.
    pub tls: bool,
    /// Host name or IP.
    pub host: String,
    /// Port (80 when absent).
    pub port: u16,
    /// Path and query.
    pub path: String,
}

impl JwksUrl {
    /// Parses an `http://` or `https://` URL.
    pub fn parse(url: &str) -> Result<JwksUrl, String> {
        let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err("needs an http:// or https:// URL".into()),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err("needs a host, and no user info".into());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?,
            ),
            _ => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err("needs a host".into());
        }
        Ok(JwksUrl {
            tls,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// Parses an algorithm name as the configuration spells it (`RS256`, `EdDSA`, ...).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    name.parse::<Algorithm>()
        .map_err(|_| format!("unknown algorithm `{name}` (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)"))
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl AuthPolicy {
    /// Compiles a policy; reads its secret and key files. Errors name what is wrong.
    pub fn new(name: &str, cfg: &AuthConfig, dns: &DnsConfig) -> Result<AuthPolicy, String> {
        let leeway = cfg.leeway.map(|d| d.0.as_secs()).unwrap_or(30);
        let make_validation = |alg: Algorithm| {
            let mut v = Validation::new(alg);
            v.leeway = leeway;
            v.validate_exp = true;
            v.validate_nbf = true;
            // A claim the policy checks must be there: without these, a token that leaves out
            // `iss` or `aud` would pass a policy that names them.
            v.required_spec_claims = HashSet::new();
            if cfg.require_exp {
                v.required_spec_claims.insert("exp".to_string());
            }
            if !cfg.issuer.as_slice().is_empty() {
                v.required_spec_claims.insert("iss".to_string());
            }
            if !cfg.audience.as_slice().is_empty() {
                v.required_spec_claims.insert("aud".to_string());
            }
            let issuers = cfg.issuer.as_slice();
            if !issuers.is_empty() {
                v.set_issuer(issuers);
            }
            let audiences = cfg.audience.as_slice();
            if audiences.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(audiences);
            }
            Arc::new(v)
        };
        let all = [
            Algorithm::HS256,
            Algorithm::HS384,
            Algorithm::HS512,
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
        ];
        let validations: Vec<(Algorithm, Arc<Validation>)> =
            all.iter().map(|a| (*a, make_validation(*a))).collect();
        let validation_for = |alg: Algorithm| {
            validations
                .iter()
                .find(|(a, _)| *a == alg)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| make_validation(alg))
        };

        let mut keys = Vec::new();
        // Every static key's algorithm, kid and bytes, for the spec.
        let mut key_material: Vec<u8> = Vec::new();
        let secret = match (&cfg.secret, &cfg.secret_file) {
            (Some(_), Some(_)) => return Err("use `secret` or `secret_file`, not both".into()),
            (Some(s), None) => Some(s.value.as_bytes().to_vec()),
            (None, Some(file)) => {
                let bytes = std::fs::read(&file.value)
                    .map_err(|e| format!("secret_file {}: {e}", file.value))?;
                // A trailing newline is an editor's, not the secret's.
                let trimmed = bytes.trim_ascii_end().to_vec();
                Some(trimmed)
            }
            (None, None) => None,
        };
        if let Some(secret) = secret {
            if secret.len() < 32 {
                return Err("secret: at least 32 bytes (256 bits) are required".into());
            }
            let algorithms = if cfg.algorithms.is_empty() {
                vec![Algorithm::HS256]
            } else {
                cfg.algorithms
                    .iter()
                    .map(|a| parse_algorithm(&a.value))
                    .collect::<Result<Vec<_>, _>>()?
            };
            for alg in algorithms {
                key_material.extend_from_slice(format!("{alg:?}\0").as_bytes());
                key_material.extend_from_slice(&secret);
                if !is_hmac(alg) {
                    return Err(format!(
                        "algorithms: {alg:?} cannot be used with a shared secret"
                    ));
                }
                // RFC 7518 section 3.2: a key at least as long as the hash output.
                let least = match alg {
                    Algorithm::HS384 => 48,
                    Algorithm::HS512 => 64,
                    _ => 32,
                };
                if secret.len() < least {
                    return Err(format!(
                        "secret: {alg:?} needs at least {least} bytes (RFC 7518 section 3.2); this one has {}",
                        secret.len()
                    ));
                }
                keys.push(VerifyKey {
                    kid: None,
                    key: DecodingKey::from_secret(&secret),
                    validation: validation_for(alg),
                });
            }
        }
        for pk in &cfg.public_keys {
            let alg = parse_algorithm(&pk.algorithm)?;
            let pem =
                std::fs::read(&pk.file).map_err(|e| format!("public_keys {}: {e}", pk.file))?;
            key_material.extend_from_slice(format!("{alg:?}\0{:?}\0", pk.kid).as_bytes());
            key_material.extend_from_slice(&pem);
            let key = match alg {
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => DecodingKey::from_rsa_pem(&pem),
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                _ => {
                    return Err(format!(
                        "public_keys {}: {alg:?} is an HMAC algorithm; use `secret`",
                        pk.file
                    ))
                }
            }
            .map_err(|e| format!("public_keys {}: not a {alg:?} public key: {e}", pk.file))?;
            keys.push(VerifyKey {
                kid: pk.kid.clone(),
                key,
                validation: validation_for(alg),
            });
        }

        let jwks_url = cfg
            .jwks_url
            .as_ref()
            .map(|u| JwksUrl::parse(&u.value))
            .transpose()?;
        let claim_values: Vec<(String, Vec<String>)> = cfg
            .claims
            .iter()
            .map(|(k, v)| (k.clone(), v.as_slice().to_vec()))
            .collect();
        let jwks = match jwks_url.clone() {
            Some(url) => Some(Arc::new(JwksSource {
                tls: match url.tls {
                    true => Some(jwks_tls(cfg.jwks.ca.as_deref())?),
                    false => None,
                },
                url,
                refresh: cfg
                    .jwks
                    .refresh
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(300)),
                min_refetch: cfg
                    .jwks
                    .min_refetch_interval
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(30)),
                timeout: cfg
                    .jwks
                    .timeout
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(2)),
                wake: Notify::new(),
                fetched: watch::channel(0).0,
                last_attempt_ms: AtomicU64::new(0),
                last_document: AtomicU64::new(0),
                epoch: Instant::now(),
            })),
            None => None,
        };
        if keys.is_empty() && jwks.is_none() {
            return Err("needs keys: `secret`, `secret_file`, `public_keys` or `jwks_url`".into());
        }
        let mut forward = Vec::new();
        for (claim, header) in &cfg.forward_claims {
            let name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("forward_claims.{claim}: `{header}` is not a header name"))?;
            forward.push((claim.clone(), name));
        }
        let spec = AuthSpec {
            static_keys: crate::hash::content(&key_material),
            jwks: jwks_url.map(|u| (u, cfg.jwks.clone())),
            issuer: cfg.issuer.as_slice().to_vec(),
            audience: cfg.audience.as_slice().to_vec(),
            leeway,
            require_exp: cfg.require_exp,
            required_claims: cfg.required_claims.clone(),
            claims: claim_values.clone(),
            forward: forward.clone(),
            cookie: cfg.cookie.clone(),
            token_cache: cfg.token_cache,
            token_cache_ttl: cfg.token_cache_ttl.0.as_secs(),
            dns: dns.clone(),
        };
        Ok(AuthPolicy {
            name: name.into(),
            spec,
            keys: ArcSwap::from_pointee(KeySet { keys }),
            jwks,
            validations,
            required_claims: cfg.required_claims.clone(),
            claim_values,
            forward,
            cookie: cfg.cookie.clone(),
            cache: (cfg.token_cache > 0).then(|| quick_cache::sync::Cache::new(cfg.token_cache)),
            cache_ttl: cfg.token_cache_ttl.0.as_secs().max(1),
            leeway,
            tasks_started: std::sync::atomic::AtomicBool::new(false),
            metrics: crate::metrics::AuthMetrics::new(name),
        })
    }

    /// The bearer token of a request: `Authorization: Bearer …`, else the policy's cookie.
    pub fn token<'a>(&self, headers: &'a http::HeaderMap) -> Option<&'a str> {
        if let Some(v) = headers.get(http::header::AUTHORIZATION) {
            return bearer_token(v.as_bytes());
        }
        let cookie = self.cookie.as_deref()?;
        for header in headers.get_all(http::header::COOKIE) {
            let Ok(s) = header.to_str() else { continue };
            for pair in s.split(';') {
                if let Some((k, v)) = pair.trim().split_once('=') {
                    if k == cookie && !v.is_empty() {
                        return Some(v);
                    }
                }
            }
        }
        None
    }

    /// Checks `token`; on success returns its claims and the headers they become.
    pub async fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let outcome = self.check_token(token).await;
        match &outcome {
            Ok(_) => self.metrics.ok.inc(),
            Err(AuthError::Missing) => self.metrics.missing.inc(),
            Err(AuthError::Invalid(why)) => {
                self.metrics.invalid.inc();
                self.metrics.refused(why);
            }
            Err(AuthError::Forbidden(why)) => {
                self.metrics.forbidden.inc();
                self.metrics.refused(why);
            }
            Err(AuthError::NoKeys) => self.metrics.no_keys.inc(),
        }
        outcome
    }

    async fn check_token(&self, token: &str) -> Result<Verified, AuthError> {
        if token.len() > 16 * 1024 {
            return Err(AuthError::Invalid("token too large"));
        }
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(hit) = self.cache.as_ref().and_then(|c| c.get(token)) {
            if now <= hit.valid_until {
                // No claim checks or header building again: clone the verdict (reference
                // counts).
                return hit.outcome.clone();
            }
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token or unsupported algorithm"))?;
        if lists_critical(token) {
            return Err(AuthError::Invalid("token lists critical extensions"));
        }
        let mut keys = self.keys.load_full();
        if !keys_for(&keys, &header).any(|_| true) {
            if let Some(jwks) = &self.jwks {
                // An unknown key id may be a key the issuer just rotated in: ask for a refetch
                // (at most once per `min_refetch_interval`) and wait for it briefly.
                if jwks.refetch_allowed() {
                    let mut fetched = jwks.fetched.subscribe();
                    jwks.wake.notify_one();
                    let wait = jwks.timeout + Duration::from_millis(200);
                    let _ = tokio::time::timeout(wait, fetched.changed()).await;
                    keys = self.keys.load_full();
                }
                if keys.keys.is_empty() {
                    return Err(AuthError::NoKeys);
                }
            }
        }
        let mut last_error = AuthError::Invalid("no key matches the token's kid and algorithm");
        for key in keys_for(&keys, &header) {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &key.validation) {
                Ok(data) => {
                    let exp = data.claims.get("exp").and_then(Value::as_u64);
                    let verified = self.accept(data.claims);
                    if let (Some(cache), true) = (&self.cache, token.len() <= MAX_CACHED_TOKEN) {
                        // Remembered until the token expires (with the leeway the check
                        // allowed) or the TTL runs out, whichever comes first.
                        let until = exp
                            .map_or(u64::MAX, |e| e.saturating_add(self.leeway))
                            .min(now + self.cache_ttl);
                        let entry = CachedToken {
                            outcome: verified.clone(),
                            valid_until: until,
                        };
                        cache.insert(token.to_string(), Arc::new(entry));
                    }
                    return verified;
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last_error = AuthError::Invalid(match e.kind() {
                        ErrorKind::ExpiredSignature => "token expired",
                        ErrorKind::ImmatureSignature => "token not yet valid",
                        ErrorKind::InvalidIssuer => "wrong issuer",
                        ErrorKind::InvalidAudience => "wrong audience",
                        ErrorKind::MissingRequiredClaim(_) => "token lacks a required claim",
                        ErrorKind::InvalidSignature => "bad signature",
                        ErrorKind::InvalidAlgorithm => "algorithm not allowed",
                        _ => "malformed token",
                    });
                    // A bad signature may be the next key's; anything else is final.
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        return Err(last_error);
                    }
                }
            }
        }
        Err(last_error)
    }

    /// The outcome for a token whose signature and times are good: claim requirements, then
    /// what goes upstream.
    fn accept(&self, claims: Map<String, Value>) -> Result<Verified, AuthError> {
        let forward = self.authorize(&claims)?;
        Ok(Verified {
            forward,
            subject: claims.get("sub").and_then(Value::as_str).map(Arc::from),
            claims: Some(Arc::new(claims)),
        })
    }

    fn authorize(&self, claims: &Map<String, Value>) -> Result<ForwardedClaims, AuthError> {
        for claim in &self.required_claims {
            if claims.get(claim).is_none_or(Value::is_null) {
                return Err(AuthError::Forbidden("a required claim is missing"));
            }
        }
        for (claim, allowed) in &self.claim_values {
            let ok = match claims.get(claim) {
                Some(Value::String(s)) => allowed.iter().any(|a| a == s),
                Some(Value::Array(items)) => items
                    .iter()
                    .any(|i| i.as_str().is_some_and(|s| allowed.iter().any(|a| a == s))),
                Some(Value::Bool(b)) => allowed
                    .iter()
                    .any(|a| a == if *b { "true" } else { "false" }),
                Some(Value::Number(n)) => allowed.iter().any(|a| *a == n.to_string()),
                _ => false,
            };
            if !ok {
                return Err(AuthError::Forbidden(
                    "a claim does not have an allowed value",
                ));
            }
        }
        let mut out = Vec::with_capacity(self.forward.len());
        for (claim, header) in &self.forward {
            let text = match claims.get(claim) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => continue,
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| i.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                Some(other) => other.to_string(),
            };
            // A claim that cannot be a header value (control characters) is not forwarded
            // rather than forwarded mangled.
            if let Ok(v) = HeaderValue::from_str(&text) {
                out.push((header.clone(), v));
            }
        }
        Ok(out.into())
    }

    /// Starts the JWKS fetcher, if the policy has one and it is not running. Must run on the
    /// control-plane Tokio runtime.
    pub fn spawn_tasks(self: &Arc<Self>, resolver: Option<TokioResolver>) {
        let Some(source) = self.jwks.clone() else {
            return;
        };
        if self.tasks_started.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(jwks_loop(Arc::downgrade(self), source, resolver));
    }

    /// Counts and logs the keys a JWKS document had that the gateway skipped, once per
    /// document: a document fetched again unchanged is not reported again.
    fn report_skipped(&self, body: &[u8], skipped: &[(Option<String>, SkippedKey)]) {
        let Some(jwks) = &self.jwks else { return };
        let hash = crate::hash::content(body);
        if jwks.last_document.swap(hash, Ordering::AcqRel) == hash {
            return;
        }
        for (kid, reason) in skipped {
            self.metrics.skipped_key(*reason);
            warn!(policy = %self.name, kid = kid.as_deref().unwrap_or("(none)"), reason = reason.label(), "JWKS key skipped; the other keys are used");
        }
    }

    /// Whether the policy's keys are in place or a first fetch has been tried (always true
    /// without a JWKS): until then `/ready` says it waits for it.
    pub fn first_fetch_done(&self) -> bool {
        self.jwks.as_ref().is_none_or(|j| *j.fetched.borrow() > 0)
    }

    /// Fetches the JWKS once now (used when a runtime is built, so that the first requests
    /// find keys). Failures are logged; stale keys are kept.
    pub async fn fetch_now(&self, resolver: Option<&TokioResolver>) {
        let Some(jwks) = &self.jwks else { return };
        jwks.last_attempt_ms.store(
            jwks.epoch.elapsed().as_millis().max(1) as u64,
            Ordering::Release,
        );
        match fetch_jwks(&jwks.url, jwks.tls.as_ref(), resolver, jwks.timeout).await {
            Ok(body) => match parse_jwks(&body, &self.validations) {
                Ok(judged) if !judged.keys.is_empty() => {
                    self.report_skipped(&body, &judged.skipped);
                    let keys = judged.keys;
                    let count = keys.len();
                    self.keys.store(Arc::new(KeySet { keys }));
                    // A key that left the set must stop vouching for tokens at once.
                    if let Some(cache) = &self.cache {
                        cache.clear();
                    }
                    info!(policy = %self.name, keys = count, "JWKS loaded");
                }
                Ok(judged) => {
                    self.report_skipped(&body, &judged.skipped);
                    warn!(policy = %self.name, "JWKS has no usable keys; keeping the previous keys")
                }
                Err(e) => {
                    warn!(policy = %self.name, error = %e, "JWKS unreadable; keeping the previous keys")
                }
            },
            Err(e) => {
                warn!(policy = %self.name, error = %e, "JWKS fetch failed; keeping the previous keys")
            }
        }
        jwks.fetched.send_modify(|n| *n += 1);
    }
}

/// The token of an `Authorization` value: `Bearer` in any case, one space, the token (spaces
/// around it trimmed). On bytes: `HeaderValue::to_str` and a `char` split cost more per byte.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = std::str::from_utf8(rest.trim_ascii()).ok()?;
    (!token.is_empty()).then_some(token)
}

/// Whether a token's header lists critical extensions (`crit`, RFC 7515 section 4.1.11). The
/// gateway understands none, so such a token must be refused.
fn lists_critical(token: &str) -> bool {
    use base64::Engine;
    let head = token.split('.').next().unwrap_or("");
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head) else {
        return false;
    };
    // Parsed only when the name can appear: written out, or behind a JSON escape.
    let may_name_it =
        memchr::memmem::find(&bytes, b"crit").is_some() || memchr::memchr(b'\\', &bytes).is_some();
    may_name_it
        && serde_json::from_slice::<Map<String, Value>>(&bytes)
            .is_ok_and(|h| h.contains_key("crit"))
}

fn keys_for<'a>(
    set: &'a KeySet,
    header: &'a jsonwebtoken::Header,
) -> impl Iterator<Item = &'a VerifyKey> + 'a {
    set.keys.iter().filter(move |k| {
        k.validation.algorithms.first() == Some(&header.alg)
            && match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                // A key without an id is tried for any token of its algorithm; a token without
                // an id is tried against every key of its algorithm.
                _ => true,
            }
    })
}

/// Keeps a policy's keys fresh: on the refresh interval, with a backoff from 1 s to 30 s until a
/// first key set arrives, and when a request names an unknown key (rate limited by the requests themselves).
/// Ends when the policy is dropped (a reload replaced it).
async fn jwks_loop(
    weak: Weak<AuthPolicy>,
    source: Arc<JwksSource>,
    resolver: Option<TokioResolver>,
) {
    let mut backoff = Duration::from_secs(1);
    // A policy made at start has not fetched yet: the first fetch is at once.
    if *source.fetched.borrow() == 0 {
        let Some(policy) = weak.upgrade() else { return };
        policy.fetch_now(resolver.as_ref()).await;
    }
    loop {
        let loaded = match weak.upgrade() {
            Some(policy) => !policy.keys.load().keys.is_empty(),
            None => return,
        };
        let wait = if loaded {
            backoff = Duration::from_secs(1);
            source.refresh
        } else {
            let wait = backoff;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            wait
        };
        tokio::select! {
            _ = source.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(policy) = weak.upgrade() else { return };
        policy.fetch_now(resolver.as_ref()).await;
    }
}

/// GETs the JWKS document. The host is resolved with the gateway's resolver.
async fn fetch_jwks(
    url: &JwksUrl,
    tls: Option<&tokio_rustls::TlsConnector>,
    resolver: Option<&TokioResolver>,
    timeout: Duration,
) -> Result<Bytes, String> {
    let work = async {
        let ip: IpAddr = match url.host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => {
                let resolver = resolver.ok_or("no resolver for the JWKS host")?;
                let lookup = resolver
                    .lookup_ip(url.host.as_str())
                    .await
                    .map_err(|e| format!("resolving {}: {e}", url.host))?;
                lookup
                    .iter()
                    .next()
                    .ok_or_else(|| format!("{} has no address", url.host))?
            }
        };
        let stream = tokio::net::TcpStream::connect(SocketAddr::new(ip, url.port))
            .await
            .map_err(|e| format!("connecting to {ip}:{}: {e}", url.port))?;
        match tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                    .map_err(|e| format!("{}: {e}", url.host))?;
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", url.host))?;
                http_get(stream, url).await
            }
            None => http_get(stream, url).await,
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// The TLS client for an `https://` JWKS: the configured CAs, or the system's.
fn jwks_tls(ca: Option<&str>) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("jwks.ca {path}: {e}"))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("jwks.ca {path}: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("jwks.ca {path}: {e}"))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err("no CA certificates to verify the JWKS endpoint with".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// GET `url.path` over `io` (HTTP/1.1), body up to 1 MiB.
async fn http_get<IO>(io: IO, url: &JwksUrl) -> Result<Bytes, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Empty, Limited};
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = if url.port == if url.tls { 443 } else { 80 } {
            url.host.clone()
        } else {
            format!("{}:{}", url.host, url.port)
        };
        let request = http::Request::get(url.path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "gateway-jwks")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let body = Limited::new(response.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(body.to_bytes())
    }
}

/// Why a key of a JWKS document is not used. Keys are judged one by one: one the gateway
/// cannot use is skipped, and the rest of the document still counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkippedKey {
    /// A key type, algorithm or curve the gateway does not support (ES512, X25519, an
    /// encryption algorithm, an unknown `kty`).
    Unsupported,
    /// `use` other than `sig`, or `key_ops` without `verify`.
    NotForVerifying,
    /// A symmetric key (`kty: oct`, or an HMAC `alg`): never taken from a JWKS.
    Symmetric,
    /// An `alg` that contradicts the key's type or curve (`ES256` on a P-384 key).
    Mismatch,
    /// Key material that does not decode.
    Invalid,
}

impl SkippedKey {
    /// Every reason, for the metric's labels.
    pub const ALL: [SkippedKey; 5] = [
        SkippedKey::Unsupported,
        SkippedKey::NotForVerifying,
        SkippedKey::Symmetric,
        SkippedKey::Mismatch,
        SkippedKey::Invalid,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            SkippedKey::Unsupported => "unsupported",
            SkippedKey::NotForVerifying => "not_for_verifying",
            SkippedKey::Symmetric => "symmetric",
            SkippedKey::Mismatch => "mismatch",
            SkippedKey::Invalid => "invalid",
        }
    }
}

/// A JWKS document judged: the keys taken, and each skipped key's `kid` and reason.
struct JudgedKeys {
    keys: Vec<VerifyKey>,
    skipped: Vec<(Option<String>, SkippedKey)>,
}

/// Reads a JWKS document. Only a document that is not JSON or has no `keys` array is an
/// error (the previous keys stay); each key is judged on its own.
fn parse_jwks(
    body: &[u8],
    validations: &[(Algorithm, Arc<Validation>)],
) -> Result<JudgedKeys, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let doc: Document = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut judged = JudgedKeys {
        keys: Vec::new(),
        skipped: Vec::new(),
    };
    for value in doc.keys {
        let kid = value.get("kid").and_then(Value::as_str).map(str::to_string);
        match judge_key(value, validations) {
            Ok(key) => judged.keys.push(key),
            Err(reason) => judged.skipped.push((kid, reason)),
        }
    }
    Ok(judged)
}

/// One key of a JWKS document, taken or refused with the reason.
fn judge_key(
    value: Value,
    validations: &[(Algorithm, Arc<Validation>)],
) -> Result<VerifyKey, SkippedKey> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|_| SkippedKey::Unsupported)?;
    let not_sig = jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| !matches!(u, jsonwebtoken::jwk::PublicKeyUse::Signature));
    let no_verify = jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&jsonwebtoken::jwk::KeyOperations::Verify));
    if not_sig || no_verify {
        return Err(SkippedKey::NotForVerifying);
    }
    // What the key's type and curve allow: one algorithm for a curve, RS256 by default for RSA.
    let by_key = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => return Err(SkippedKey::Unsupported),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => Some(Algorithm::EdDSA),
            _ => return Err(SkippedKey::Unsupported),
        },
        AlgorithmParameters::RSA(_) => None,
        AlgorithmParameters::OctetKey(_) => return Err(SkippedKey::Symmetric),
    };
    let alg = match jwk.common.key_algorithm {
        Some(a) => key_algorithm(a).ok_or(SkippedKey::Unsupported)?,
        None => by_key.unwrap_or(Algorithm::RS256),
    };
    if is_hmac(alg) {
        return Err(SkippedKey::Symmetric);
    }
    let rsa = matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
    );
    let fits = match by_key {
        Some(curve_alg) => curve_alg == alg,
        None => rsa,
    };
    if !fits {
        return Err(SkippedKey::Mismatch);
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| SkippedKey::Invalid)?;
    let (_, validation) = validations
        .iter()
        .find(|(a, _)| *a == alg)
        .ok_or(SkippedKey::Unsupported)?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        key,
        validation: validation.clone(),
    })
}

fn key_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

impl OneOrMany {
    /// The values, one or many.
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_refusal_message_has_a_metric_reason() {
        let source = include_str!("auth.rs");
        let mut found = 0;
        // Messages are the string literals inside `AuthError::Invalid(..)`/`Forbidden(..)` and
        // the arms of the jsonwebtoken error match.
        for line in source.lines() {
            let line = line.trim();
            let Some(start) = line.find('"') else {
                continue;
            };
            let Some(len) = line[start + 1..].find('"') else {
                continue;
            };
            let message = &line[start + 1..start + 1 + len];
            let is_refusal = line.contains("AuthError::Invalid(\"")
                || line.contains("AuthError::Forbidden(\"")
                || ((line.starts_with("ErrorKind::") || line.starts_with("_ =>"))
                    && line.contains("=>"))
                || line.starts_with("\"a claim");
            if is_refusal && !message.is_empty() {
                found += 1;
                assert!(
                    crate::metrics::AUTH_REFUSALS
                        .iter()
                        .any(|(m, _)| *m == message),
                    "{message:?} has no reason label"
                );
            }
        }
        assert!(found >= 12, "only {found} messages found");
    }

    use super::*;

    #[test]
    fn bearer_tokens() {
        let cases: [(&[u8], Option<&str>); 10] = [
            (b"Bearer abc.def.ghi", Some("abc.def.ghi")),
            (b"bearer abc", Some("abc")),
            (b"BEARER   abc  ", Some("abc")),
            (b"Bearer", None),
            (b"Bearer ", None),
            (b"Bearer    ", None),
            (b"Bearer\tabc", None),
            (b"Basic dXNlcjpwYXNz", None),
            (b"Bearerabc", None),
            (b"Bearer \xff\xfe", None),
        ];
        for (value, token) in cases {
            assert_eq!(
                super::bearer_token(value),
                token,
                "{:?}",
                value.escape_ascii()
            );
        }
    }

    #[test]
    fn jwks_urls() {
        let u = JwksUrl::parse("http://user-service:3001/.well-known/jwks.json").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("user-service", 3001, "/.well-known/jwks.json")
        );
        let u = JwksUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        assert!(JwksUrl::parse("https://x/").is_ok_and(|u| u.tls && u.port == 443));
        assert!(JwksUrl::parse("ftp://x/").is_err());
        assert!(JwksUrl::parse("http://u:p@x/").is_err());
        assert!(JwksUrl::parse("http://x:99999/").is_err());
    }

    #[test]
    fn hmac_keys_never_come_from_a_jwks() {
        let validations = vec![(
            Algorithm::HS256,
            Arc::new(Validation::new(Algorithm::HS256)),
        )];
        let body = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"HS256"}]}"#;
        let judged = parse_jwks(body, &validations).unwrap();
        assert!(judged.keys.is_empty());
        assert_eq!(judged.skipped, [(None, SkippedKey::Symmetric)]);
    }

    /// A P-256 public key (x, y) and an Ed25519 one (x), from RFC 7515 A.3 and RFC 8037 A.2.
    const EC_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const EC_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
    const ED_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    #[test]
    fn jwks_keys_are_judged_one_by_one() {
        let all = [
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
            Algorithm::RS256,
        ];
        let validations: Vec<_> = all
            .iter()
            .map(|a| (*a, Arc::new(Validation::new(*a))))
            .collect();
        let body = format!(
            r#"{{"keys":[
              {{"kid":"good-ec","kty":"EC","crv":"P-256","x":"{EC_X}","y":"{EC_Y}","alg":"ES256","use":"sig"}},
              {{"kid":"good-ed","kty":"OKP","crv":"Ed25519","x":"{ED_X}"}},
              {{"kid":"es512","kty":"EC","crv":"P-521","x":"{EC_X}","y":"{EC_Y}","alg":"ES512"}},
              {{"kid":"x25519","kty":"OKP","crv":"X25519","x":"{ED_X}"}},
              {{"kid":"enc","kty":"EC","crv":"P-256","x":"{EC_X}","y":"{EC_Y}","use":"enc"}},
              {{"kid":"ops","kty":"EC","crv":"P-256","x":"{EC_X}","y":"{EC_Y}","key_ops":["sign"]}},
              {{"kid":"mismatch","kty":"EC","crv":"P-256","x":"{EC_X}","y":"{EC_Y}","alg":"ES384"}},
              {{"kid":"rsa-oaep","kty":"RSA","n":"AQAB","e":"AQAB","alg":"RSA-OAEP"}},
              {{"kid":"unknown-kty","kty":"XYZ"}}
            ]}}"#
        );
        let judged = parse_jwks(body.as_bytes(), &validations).unwrap();
        let taken: Vec<_> = judged.keys.iter().map(|k| k.kid.clone().unwrap()).collect();
        assert_eq!(taken, ["good-ec", "good-ed"]);
        let skipped: Vec<_> = judged
            .skipped
            .iter()
            .map(|(kid, why)| (kid.clone().unwrap(), *why))
            .collect();
        assert_eq!(
            skipped,
            [
                ("es512".to_string(), SkippedKey::Unsupported),
                ("x25519".to_string(), SkippedKey::Unsupported),
                ("enc".to_string(), SkippedKey::NotForVerifying),
                ("ops".to_string(), SkippedKey::NotForVerifying),
                ("mismatch".to_string(), SkippedKey::Mismatch),
                ("rsa-oaep".to_string(), SkippedKey::Unsupported),
                ("unknown-kty".to_string(), SkippedKey::Unsupported),
            ]
        );
        // Not JSON, or no `keys`: the document is refused whole.
        assert!(parse_jwks(b"<html>", &validations).is_err());
        assert!(parse_jwks(br#"{"key":[]}"#, &validations).is_err());
    }
}
