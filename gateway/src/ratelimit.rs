//! Rate limiting: named GCRA policies (governor), keyed by client IP, a header, a JWT claim or
//! the route, with the IETF `RateLimit-Policy` / `RateLimit` headers.
//!
//! Memory is bounded per policy: keys whose bucket is full again are dropped every few seconds
//! (`retain_recent`), and while a policy holds `max_keys` keys, requests with keys it does not
//! know yet are counted in one of [`OVERFLOW_SLOTS`] shared buckets chosen by hashing the key. A
//! flood of distinct keys therefore makes limits stricter for the flood, never absent, and never
//! grows the table past `max_keys + 256 + OVERFLOW_SLOTS` entries (the size is sampled every
//! 256 checks).

use crate::config::{FailMode, MissingKey, RateLimitConfig, RedisLimitConfig};
use arc_swap::ArcSwapOption;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderName, HeaderValue};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Shared buckets used for new keys while a policy is full.
pub const OVERFLOW_SLOTS: u64 = 1024;

/// What a request is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The client's address.
    Ip(IpAddr),
    /// A hashed header or claim value (64 bits: constant size, whatever the client sends).
    Hash(u64),
    /// The route (index in the runtime's table).
    Route(u32),
    /// Requests without a key, when they share one bucket.
    Shared,
    /// An overflow bucket.
    Slot(u64),
}

/// Where a policy's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The client IP (after `trusted_proxies`).
    ClientIp,
    /// One bucket per route.
    Route,
    /// A request header.
    Header(HeaderName),
    /// A claim of the route's verified token.
    Claim(String),
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let through; `remaining` requests may follow at once, the bucket is full in `reset` s.
    Allowed {
        /// Requests left in the burst.
        remaining: u32,
        /// Seconds until the burst is whole again.
        reset: u64,
    },
    /// Over the limit: try again in `retry_after` seconds.
    Limited {
        /// Seconds until a request would pass.
        retry_after: u64,
    },
    /// No key and the policy rejects such requests.
    NoKey,
    /// The shared store did not answer and the policy fails closed.
    Unavailable,
}

/// The buckets: governor's sharded map, hashed with `ahash` (randomly seeded per policy)
/// instead of the standard library's SipHash (cheaper per request; `bench/README.md`).
type Limiter = RateLimiter<
    LimitKey,
    DashMapStateStore<LimitKey, ahash::RandomState>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// What defines a rate-limit policy's counting, as compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitSpec {
    count: u32,
    period: Duration,
    burst: u32,
    key: KeySource,
    missing: MissingKey,
    max_keys: usize,
    redis: Option<crate::config::RedisLimitConfig>,
}

/// A compiled rate-limit policy with its buckets.
pub struct RateLimitPolicy {
    /// The policy's name.
    pub name: Arc<str>,
    /// What it counts, as compiled; a policy with the same spec (and its buckets) survives
    /// reloads.
    pub spec: RateLimitSpec,
    /// Where the key comes from.
    pub key: KeySource,
    limiter: Limiter,
    missing: MissingKey,
    max_keys: usize,
    burst: u32,
    per_request: Duration,
    /// `"name";q=N;w=S`, sent with every response of a limited route.
    pub policy_header: HeaderValue,
    /// `"name";r=`, the start of every `RateLimit` header.
    state_prefix: Box<[u8]>,
    full: AtomicBool,
    checks: AtomicU32,
    tasks_started: AtomicBool,
    metrics: crate::metrics::RateLimitMetrics,
    redis: Option<RedisLimiter>,
}

/// GCRA in Redis, one atomic script per request, on the server's clock (so instances with
/// skewed clocks agree). State: the theoretical arrival time in µs, expiring when the bucket
/// would be full again. Returns {allowed, wait µs, remaining}.
const GCRA_LUA: &str = r#"
local t = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tau = t * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + t
local allow_at = new_tat - tau
if now < allow_at then
  return {0, allow_at - now, 0}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, math.floor((tau - (new_tat - now)) / t)}
"#;

/// The Redis side of a shared policy.
struct RedisLimiter {
    cfg: RedisLimitConfig,
    client: redis::Client,
    conn: ArcSwapOption<redis::aio::ConnectionManager>,
    script: redis::Script,
}

/// Parses `N/s`, `N/m` or `N/h`.
pub fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let (count, unit) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("`{text}`: expected N/s, N/m or N/h"))?;
    let count: u32 = count
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{text}`: the count must be a whole number ≥ 1"))?;
    let period = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => return Err(format!("`{text}`: unit `{other}` is not s, m or h")),
    };
    Ok((count, period))
}

/// Parses `client_ip`, `route`, `header:NAME` or `jwt:CLAIM`.
pub fn parse_key(text: &str) -> Result<KeySource, String> {
    match text {
        "client_ip" => Ok(KeySource::ClientIp),
        "route" => Ok(KeySource::Route),
        _ => {
            if let Some(name) = text.strip_prefix("header:") {
                HeaderName::from_bytes(name.as_bytes())
                    .map(KeySource::Header)
                    .map_err(|_| format!("`{name}` is not a header name"))
            } else if let Some(claim) = text.strip_prefix("jwt:").filter(|c| !c.is_empty()) {
                Ok(KeySource::Claim(claim.to_string()))
            } else {
                Err(format!(
                    "`{text}`: expected client_ip, route, header:NAME or jwt:CLAIM"
                ))
            }
        }
    }
}

impl RateLimitPolicy {
    /// Compiles a policy.
    pub fn new(name: &str, cfg: &RateLimitConfig) -> Result<RateLimitPolicy, String> {
        let (count, period) = parse_rate(&cfg.rate.value).map_err(|e| format!("rate: {e}"))?;
        let burst = cfg.burst.unwrap_or(count);
        let burst_nz = NonZeroU32::new(burst).ok_or("burst: must be at least 1")?;
        let per_request = period / count;
        let quota = Quota::with_period(per_request)
            .ok_or("rate: too fast to count")?
            .allow_burst(burst_nz);
        let key = parse_key(cfg.key.as_ref().map_or("client_ip", |k| k.value.as_str()))
            .map_err(|e| format!("key: {e}"))?;
        if cfg.max_keys < 1 {
            return Err("max_keys: must be at least 1".into());
        }
        let policy_header =
            HeaderValue::from_str(&format!("\"{name}\";q={count};w={}", period.as_secs()))
                .map_err(|_| "name: not usable in a header".to_string())?;
        Ok(RateLimitPolicy {
            name: name.into(),
            spec: RateLimitSpec {
                count,
                period,
                burst,
                key: key.clone(),
                missing: cfg.missing_key,
                max_keys: cfg.max_keys,
                redis: cfg.redis.clone(),
            },
            key,
            limiter: RateLimiter::dashmap_with_hasher(quota, ahash::RandomState::new())
                .with_middleware::<StateInformationMiddleware>(),
            missing: cfg.missing_key,
            max_keys: cfg.max_keys,
            burst,
            per_request,
            policy_header,
            state_prefix: format!("\"{name}\";r=").into_bytes().into_boxed_slice(),
            full: AtomicBool::new(false),
            checks: AtomicU32::new(0),
            tasks_started: AtomicBool::new(false),
            metrics: crate::metrics::RateLimitMetrics::new(name),
            redis: match &cfg.redis {
                Some(r) => Some(RedisLimiter {
                    client: redis::Client::open(r.url.as_str())
                        .map_err(|e| format!("redis.url: {e}"))?,
                    cfg: r.clone(),
                    conn: ArcSwapOption::empty(),
                    script: redis::Script::new(GCRA_LUA),
                }),
                None => None,
            },
        })
    }

    /// Counts one request under `key` (None: the request has no key).
    pub fn check(&self, key: Option<LimitKey>) -> Decision {
        let Some(key) = self.key_or_default(key) else {
            return Decision::NoKey;
        };
        // The table size is looked at every 256 checks (and by the cleanup task), not on
        // every request: counting it visits every shard.
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(256)
        {
            self.full
                .store(self.limiter.len() >= self.max_keys, Ordering::Relaxed);
        }
        let key = match key {
            LimitKey::Ip(_) | LimitKey::Hash(_) if self.full.load(Ordering::Relaxed) => {
                LimitKey::Slot(crate::hash::HASHER.hash_one(key) % OVERFLOW_SLOTS)
            }
            k => k,
        };
        match self.limiter.check_key(&key) {
            Ok(state) => self.allowed(state.remaining_burst_capacity()),
            Err(not_until) => {
                self.metrics.limited.inc();
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Decision::Limited {
                    retry_after: wait.as_nanos().div_ceil(1_000_000_000).max(1) as u64,
                }
            }
        }
    }

    /// The key a request counts under: its own, the shared one, or none when the policy
    /// refuses requests without a key.
    fn key_or_default(&self, key: Option<LimitKey>) -> Option<LimitKey> {
        match (key, self.missing) {
            (Some(k), _) => Some(k),
            (None, MissingKey::Shared) => Some(LimitKey::Shared),
            (None, MissingKey::Reject) => {
                self.metrics.no_key.inc();
                None
            }
        }
    }

    /// A request let through with `remaining` left in the burst.
    fn allowed(&self, remaining: u32) -> Decision {
        self.metrics.allowed.inc();
        let used = u128::from(self.burst.saturating_sub(remaining));
        Decision::Allowed {
            remaining,
            reset: (used * self.per_request.as_nanos()).div_ceil(1_000_000_000) as u64,
        }
    }

    /// Whether the policy is counted in Redis (checks are then [`RateLimitPolicy::check_shared`]).
    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    /// Counts one request in Redis, shared with every gateway using the same store and policy.
    pub async fn check_shared(&self, key: Option<LimitKey>) -> Decision {
        let Some(redis) = &self.redis else {
            return self.check(key);
        };
        let Some(key) = self.key_or_default(key) else {
            return Decision::NoKey;
        };
        let name = match key {
            LimitKey::Ip(ip) => format!("{}{}:ip:{ip}", redis.cfg.prefix, self.name),
            LimitKey::Hash(h) => format!("{}{}:h:{h:016x}", redis.cfg.prefix, self.name),
            LimitKey::Route(r) => format!("{}{}:route:{r}", redis.cfg.prefix, self.name),
            LimitKey::Shared => format!("{}{}:shared", redis.cfg.prefix, self.name),
            LimitKey::Slot(s) => format!("{}{}:slot:{s}", redis.cfg.prefix, self.name),
        };
        let answer = match redis.conn.load_full() {
            Some(conn) => {
                let mut conn = (*conn).clone();
                let mut invocation = redis.script.key(name);
                invocation
                    .arg(self.per_request.as_micros() as u64)
                    .arg(self.burst);
                let call = invocation.invoke_async::<(i64, i64, i64)>(&mut conn);
                tokio::time::timeout(redis.cfg.timeout.0, call)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            None => None,
        };
        match answer {
            Some((1, _, remaining)) => self.allowed(remaining.clamp(0, i64::from(u32::MAX)) as u32),
            Some((_, wait_us, _)) => {
                self.metrics.limited.inc();
                Decision::Limited {
                    retry_after: (wait_us.max(0) as u64).div_ceil(1_000_000).max(1),
                }
            }
            None => {
                self.metrics.store_errors.inc();
                match redis.cfg.on_error {
                    FailMode::Open => Decision::Allowed {
                        remaining: self.burst,
                        reset: 0,
                    },
                    FailMode::Closed => Decision::Unavailable,
                }
            }
        }
    }

    /// Keys currently held.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }

    /// The `RateLimit` header of a decision: `"name";r=REMAINING;t=SECONDS`.
    pub fn state_header(&self, remaining: u32, reset: u64) -> HeaderValue {
        // Built from the precomputed prefix and itoa digits: on every response of a limited
        // route, so no `format!`.
        let mut digits = itoa::Buffer::new();
        let mut text = Vec::with_capacity(self.state_prefix.len() + 24);
        text.extend_from_slice(&self.state_prefix);
        text.extend_from_slice(digits.format(remaining).as_bytes());
        text.extend_from_slice(b";t=");
        text.extend_from_slice(digits.format(reset).as_bytes());
        HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Starts the cleanup task (drops idle keys every 5 s). Must run on the control-plane
    /// Tokio runtime; ends when the policy is dropped.
    pub fn spawn_tasks(self: &Arc<Self>) {
        if self.tasks_started.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.redis.is_some() {
            // Connect in the background; until then requests follow `on_error`. The
            // connection manager reconnects by itself after that.
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(100);
                loop {
                    let Some(policy) = weak.upgrade() else { return };
                    let Some(redis) = &policy.redis else { return };
                    if redis.conn.load().is_some() {
                        return;
                    }
                    let made = tokio::time::timeout(
                        Duration::from_secs(2),
                        redis.client.get_connection_manager(),
                    )
                    .await;
                    match made {
                        Ok(Ok(conn)) => {
                            redis.conn.store(Some(Arc::new(conn)));
                            tracing::info!(policy = %policy.name, "rate limit connected to Redis");
                            return;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(policy = %policy.name, error = %e, "Redis unavailable")
                        }
                        Err(_) => tracing::warn!(policy = %policy.name, "Redis connect timed out"),
                    }
                    drop(policy);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            });
            return;
        }
        if matches!(self.key, KeySource::Route) {
            return;
        }
        let weak: Weak<RateLimitPolicy> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(policy) = weak.upgrade() else { return };
                policy.limiter.retain_recent();
                policy.limiter.shrink_to_fit();
                policy
                    .full
                    .store(policy.limiter.len() >= policy.max_keys, Ordering::Relaxed);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rate: &str, burst: Option<u32>, max_keys: usize) -> RateLimitPolicy {
        let cfg: RateLimitConfig = serde_saphyr::from_str(&format!(
            "{{ rate: \"{rate}\", {} max_keys: {max_keys} }}",
            burst.map(|b| format!("burst: {b},")).unwrap_or_default()
        ))
        .unwrap();
        RateLimitPolicy::new("p", &cfg).unwrap()
    }

    #[test]
    fn rates_and_keys_parse() {
        assert_eq!(parse_rate("10/s").unwrap(), (10, Duration::from_secs(1)));
        assert_eq!(parse_rate("600/m").unwrap(), (600, Duration::from_secs(60)));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10/d").is_err());
        assert!(parse_rate("ten/s").is_err());
        assert_eq!(
            parse_key("jwt:sub").unwrap(),
            KeySource::Claim("sub".into())
        );
        assert!(matches!(
            parse_key("header:X-Api-Key").unwrap(),
            KeySource::Header(_)
        ));
        assert!(parse_key("header:bad header").is_err());
        assert!(parse_key("cookie").is_err());
    }

    #[test]
    fn burst_then_limited_with_retry_after() {
        let p = policy("1/m", Some(3), 100);
        let ip = Some(LimitKey::Ip("10.0.0.1".parse().unwrap()));
        let remaining: Vec<_> = (0..3)
            .map(|_| match p.check(ip) {
                Decision::Allowed { remaining, .. } => remaining,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
        match p.check(ip) {
            Decision::Limited { retry_after } => assert!((59..=60).contains(&retry_after)),
            other => panic!("{other:?}"),
        }
        // Another key has its own bucket.
        assert!(matches!(
            p.check(Some(LimitKey::Ip("10.0.0.2".parse().unwrap()))),
            Decision::Allowed { .. }
        ));
    }

    #[test]
    fn a_flood_of_keys_stays_bounded() {
        let p = policy("1/h", Some(1), 1000);
        for i in 0..100_000u64 {
            p.check(Some(LimitKey::Hash(i)));
        }
        assert!(
            p.keys() as u64 <= 1000 + 256 + OVERFLOW_SLOTS,
            "{} keys",
            p.keys()
        );
        // Once full, new keys share overflow buckets: limited, not unlimited.
        let limited = (200_000..201_000u64)
            .filter(|i| matches!(p.check(Some(LimitKey::Hash(*i))), Decision::Limited { .. }))
            .count();
        assert!(limited > 0);
    }
}
