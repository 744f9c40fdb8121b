//! The policies routes name: `auth` (JWT) and `rate_limits`.

use super::*;
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

/// A rate-limit policy (GCRA).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate: `N/s`, `N/m` or `N/h`.
    pub rate: Spanned<String>,
    /// Requests allowed at once on top of the steady rate. Default: N.
    #[serde(default)]
    pub burst: Option<u32>,
    /// `client_ip` (default), `route`, `header:NAME` or `jwt:CLAIM`.
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    /// What happens to a request without a key (no header, no token): `shared` (all such
    /// requests share one bucket, the default) or `reject` (400).
    #[serde(default)]
    pub missing_key: MissingKey,
    /// Keys tracked before new keys share overflow buckets. Default 100000.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Share the limit between gateway instances through Redis. None: count in this process.
    #[serde(default)]
    pub redis: Option<RedisLimitConfig>,
}

/// A rate limit kept in Redis.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedisLimitConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// When Redis cannot answer in time: `open` lets requests through (the default), `closed`
    /// refuses them with 503.
    #[serde(default)]
    pub on_error: FailMode,
    /// Longest wait for Redis per request. Default 50ms.
    #[serde(default = "default_redis_timeout")]
    pub timeout: Dur,
    /// Prefix of the keys written. Default `gateway:rl:`.
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
}

fn default_redis_timeout() -> Dur {
    Dur::millis(50)
}
fn default_redis_prefix() -> String {
    "gateway:rl:".into()
}

/// What a shared rate limit does when its store is unavailable.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Let requests through.
    #[default]
    Open,
    /// Refuse them (503).
    Closed,
}

fn default_max_keys() -> usize {
    100_000
}

/// What a rate limit does with a request that has no key.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// Count all such requests under one shared key.
    #[default]
    Shared,
    /// Refuse them with 400.
    Reject,
}

/// A JWT policy: where its keys come from and what a token must satisfy.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `http://host:port/path` of a JWKS document (host names resolved like targets).
    #[serde(default)]
    pub jwks_url: Option<Spanned<String>>,
    /// JWKS caching.
    #[serde(default)]
    pub jwks: JwksConfig,
    /// HMAC secret (at least 32 bytes), usually `${JWT_SECRET}`.
    #[serde(default)]
    pub secret: Option<Spanned<String>>,
    /// File holding the HMAC secret (a trailing newline is ignored).
    #[serde(default)]
    pub secret_file: Option<Spanned<String>>,
    /// Algorithms accepted with the secret. Default `[HS256]`.
    #[serde(default)]
    pub algorithms: Vec<Spanned<String>>,
    /// PEM public keys, each pinned to an algorithm.
    #[serde(default)]
    pub public_keys: Vec<PublicKeyConfig>,
    /// Accepted `iss` values (one or a list). Empty: not checked.
    #[serde(default)]
    pub issuer: OneOrMany,
    /// Accepted `aud` values (one or a list; a token must name one). Empty: not checked.
    #[serde(default)]
    pub audience: OneOrMany,
    /// Clock skew allowed on `exp` and `nbf`. Default 30s.
    #[serde(default)]
    pub leeway: Option<Dur>,
    /// Refuse tokens without `exp`. Default true.
    #[serde(default = "yes")]
    pub require_exp: bool,
    /// Claims that must be present (403 otherwise).
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Claim → allowed values (a string claim must be one; an array claim must contain one);
    /// 403 otherwise.
    #[serde(default)]
    pub claims: BTreeMap<String, OneOrMany>,
    /// Claim → header it is sent upstream in. Clients' own copies of these headers are always
    /// removed, on every route.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Also take the token from this cookie when there is no `Authorization` header.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Verified tokens remembered, so a signature is checked once per token, not once per
    /// request. Default 10000; 0 turns the cache off.
    #[serde(default = "default_token_cache")]
    pub token_cache: usize,
    /// How long a verified token is remembered (never past its `exp`). Default 60s.
    #[serde(default = "default_token_cache_ttl")]
    pub token_cache_ttl: Dur,
}

fn default_token_cache() -> usize {
    10_000
}
fn default_token_cache_ttl() -> Dur {
    Dur::secs(60)
}

/// JWKS caching.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    /// How often the document is fetched again. Default 5m.
    #[serde(default)]
    pub refresh: Option<Dur>,
    /// A token with an unknown `kid` triggers a refetch at most this often. Default 30s.
    #[serde(default)]
    pub min_refetch_interval: Option<Dur>,
    /// Time allowed for one fetch. Default 2s.
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// For an `https://` URL: PEM file of the CAs its certificate must chain to. Default: the
    /// system's CAs.
    #[serde(default)]
    pub ca: Option<String>,
}

/// A PEM public key.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyConfig {
    /// PEM file.
    pub file: String,
    /// The one algorithm it verifies (`RS256`, `ES256`, `EdDSA`, ...).
    pub algorithm: String,
    /// Key id; tokens naming another `kid` are not checked with it.
    #[serde(default)]
    pub kid: Option<String>,
}

/// One string or a list of strings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl Default for OneOrMany {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

/// A policy defined once by name (`policies:`) and listed by routes (`routes[].policies`),
/// listeners (`listeners.NAME.policies`) or all routes (`default_policies`). One kind each.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NamedPolicyConfig {
    /// Allow and deny by client address.
    IpList(IpListConfig),
    /// Request and response header edits.
    Headers(HeaderRulesConfig),
    /// Answer with a redirect built from the request.
    Redirect(RedirectConfig),
    /// Answer with a fixed status, body and content type.
    Respond(RespondConfig),
    /// Cross-origin requests (preflights answered here).
    Cors(CorsConfig),
    /// Response compression (gzip, brotli, zstd).
    Compress(CompressConfig),
    /// API keys checked against a file of their digests.
    ApiKey(ApiKeyConfig),
    /// Users and passwords from an htpasswd file.
    BasicAuth(BasicAuthConfig),
    /// Requests in flight at once, with a bounded queue.
    Concurrency(ConcurrencyConfig),
    /// Each request first put to an auth service.
    ForwardAuth(ForwardAuthConfig),
    /// gRPC-Web calls from browsers translated to gRPC for the upstream.
    GrpcWeb(GrpcWebConfig),
}

/// `grpc_web`: no settings (`grpc_web: {}`); the upstream must speak HTTP/2.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrpcWebConfig {}

/// `forward_auth`: an auth service asked about each request.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuthConfig {
    /// The auth service: an upstream (plain HTTP).
    pub upstream: Spanned<String>,
    /// The path asked on it. Default `/`.
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// Client request headers sent to it. Default `[Authorization, Cookie]`.
    #[serde(default)]
    pub request_headers: Option<Vec<String>>,
    /// Headers of its 2xx answer added to the upstream request. Default none.
    #[serde(default)]
    pub response_headers: Vec<String>,
    /// Headers of its other answers passed to the client. Default `[WWW-Authenticate,
    /// Location, Set-Cookie]`.
    #[serde(default)]
    pub client_headers: Option<Vec<String>>,
    /// Longest wait for its answer. Default 2s.
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// When it cannot answer: `closed` (503, the default) or `open` (the request passes).
    #[serde(default)]
    pub on_error: Option<FailMode>,
    /// Largest refusal body passed to the client. Default 64KiB.
    #[serde(default)]
    pub max_body: Option<ByteSize>,
    /// Remember 2xx verdicts by a request header's value for `ttl`. Default: not remembered.
    #[serde(default)]
    pub cache: Option<ForwardAuthCacheConfig>,
}

/// `forward_auth.cache`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuthCacheConfig {
    /// The request header whose value keys a verdict (e.g. `Authorization`).
    pub header: String,
    /// How long a 2xx verdict counts.
    pub ttl: Dur,
}

/// `concurrency` (a named policy, or `upstreams.NAME.concurrency`): requests in flight at once.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    /// Requests in flight at once (1 or more).
    pub max: u32,
    /// Requests that may wait for a place beyond `max`. Default: `max`.
    #[serde(default)]
    pub queue: Option<u32>,
    /// Longest wait in the queue before 503. Default 1s.
    #[serde(default)]
    pub queue_timeout: Option<Dur>,
}

/// `basic_auth`: requests must carry a user and password of `users_file`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// htpasswd lines `user:hash`, bcrypt (`htpasswd -B`) or argon2 hashes only.
    pub users_file: Spanned<String>,
    /// The realm of the `WWW-Authenticate` challenge. Default `gateway`.
    #[serde(default)]
    pub realm: Option<String>,
    /// The header the user name goes upstream as. Default `X-Auth-User`.
    #[serde(default)]
    pub forward_user: Option<Spanned<String>>,
    /// Keep `Authorization` on the request sent upstream. Default false (removed).
    #[serde(default)]
    pub keep_authorization: bool,
    /// Failed logins a client may make per `failure_window` before it gets 429 without a
    /// check. Default 5.
    #[serde(default)]
    pub max_failures: Option<u32>,
    /// Default 1m.
    #[serde(default)]
    pub failure_window: Option<Dur>,
}

/// `api_key`: requests must carry a key listed (as its SHA-256 digest) in `keys_file`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The keys: one a line, `NAME SHA256-HEX [SCOPE,SCOPE...]` (read with the configuration).
    pub keys_file: Spanned<String>,
    /// The request header that carries the key. Default `X-Api-Key`.
    #[serde(default)]
    pub header: Option<Spanned<String>>,
    /// A query parameter that may carry the key when the header is absent. Default: none.
    #[serde(default)]
    pub query: Option<String>,
    /// Scopes a key must all have (403 otherwise). Default none.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The header the key's name goes upstream as. Default `X-Api-Key-Name`.
    #[serde(default)]
    pub forward_name: Option<Spanned<String>>,
    /// The header its scopes go upstream as (space-separated). Default `X-Api-Key-Scopes`.
    #[serde(default)]
    pub forward_scopes: Option<Spanned<String>>,
}

/// `compress`: responses compressed on the way to clients that accept it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct CompressConfig {
    /// Encodings offered, the preferred first (it wins when the client's q-values tie).
    /// Default `[zstd, br, gzip]`.
    #[serde(default)]
    pub encodings: Vec<Spanned<String>>,
    /// Level per encoding: `gzip` 1-9 (default 5), `br` 1-11 (default 4), `zstd` 1-19
    /// (default 3).
    #[serde(default)]
    pub levels: BTreeMap<String, Spanned<u32>>,
    /// Smallest `Content-Length` compressed, in bytes. Default 1024. A response without a
    /// length (chunked) is compressed.
    #[serde(default)]
    pub min_size: Option<u64>,
    /// Media types compressed: `type/subtype`, `type/*` or `type/*+suffix`. Default: text,
    /// JSON, JavaScript, XML and SVG.
    #[serde(default)]
    pub types: Vec<Spanned<String>>,
}

/// `cors`: which origins may call the routes from a browser, and how.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// `*`, exact origins (`https://app.example.com`) or wildcards (`https://*.example.com`).
    pub allow_origins: Spanned<Vec<String>>,
    /// Methods a preflight may ask for. Default GET, HEAD, POST.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Request headers a preflight may ask for. Default none.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Allow credentials (cookies, `Authorization`). Default false; never with `*`.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer. Default: not sent.
    #[serde(default)]
    pub max_age: Option<Dur>,
    /// Response headers scripts may read. Default none.
    #[serde(default)]
    pub expose_headers: Vec<String>,
}

/// `redirect`: answer with a redirect to a target built from the request.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// The target, with `{scheme}`, `{host}`, `{path}`, `{query}`.
    pub to: Spanned<String>,
    /// 301, 302, 303, 307 or 308. Default 302.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

fn default_redirect_status() -> u16 {
    302
}

/// `respond`: answer with a fixed status and body.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RespondConfig {
    /// The status, 200 to 599.
    pub status: u16,
    /// The body, inline. Default: empty.
    #[serde(default)]
    pub body: Option<String>,
    /// The body, from a file (read when the configuration is loaded; at most 1 MiB).
    #[serde(default)]
    pub file: Option<Spanned<String>>,
    /// `Content-Type`. Default `text/plain; charset=utf-8`.
    #[serde(default)]
    pub content_type: Option<String>,
}

/// `ip_list`: CIDRs (or single addresses) allowed and denied. Deny wins over allow; with an
/// `allow` list, an address in neither is denied.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct IpListConfig {
    /// Addresses let through. Empty: every address not denied.
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    /// Addresses refused with 403.
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
}

/// `headers`: edits of the request (before it goes upstream) and of the response (before it
/// goes to the client).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderRulesConfig {
    /// Edits of the request sent upstream.
    #[serde(default)]
    pub request: HeaderEditsConfig,
    /// Edits of the response sent to the client.
    #[serde(default)]
    pub response: HeaderEditsConfig,
}

/// Header edits, applied in the order remove, set, append.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderEditsConfig {
    /// Headers removed.
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
    /// Headers set (replacing any value), name → value template.
    #[serde(default)]
    pub set: BTreeMap<String, Spanned<String>>,
    /// Headers added (after any existing value), name → value template.
    #[serde(default)]
    pub append: BTreeMap<String, Spanned<String>>,
}

/// One error page: the body of an answer the gateway makes itself with this status.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErrorPageConfig {
    /// The body, inline (`{request_id}` and `{status}` filled in).
    #[serde(default)]
    pub body: Option<String>,
    /// The body, from a file read when the configuration is loaded (at most 1 MiB).
    #[serde(default)]
    pub file: Option<Spanned<String>>,
    /// `Content-Type`. Default `text/html; charset=utf-8`.
    #[serde(default)]
    pub content_type: Option<String>,
}
