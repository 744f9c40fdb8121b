//! The dashboard: one page (`/dashboard`, assets embedded in the binary) that polls one JSON
//! view (`/dashboard/state`) every two seconds.
//!
//! The state reads the counters the request path keeps anyway: a sampler takes each route's
//! totals (requests, 5xx, latency buckets) and each upstream's error count every few seconds,
//! and rates and p95 are differences against the oldest sample of the last minute. Nothing
//! is added to the request path; the sampler starts with the first admin request.

use crate::metrics::{latency_buckets, RouteTotals};
use crate::runtime::Runtime;
use arc_swap::ArcSwap;
use http::Response;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the sampler reads the counters.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The window rates and p95 cover.
const WINDOW: Duration = Duration::from_secs(60);
/// The shortest span a rate is given for (a shorter one would turn a request into a burst).
const MIN_SPAN: Duration = Duration::from_secs(1);

/// The counters at one moment.
#[derive(Clone)]
struct Sample {
    at: Instant,
    routes: HashMap<Arc<str>, RouteTotals>,
    upstream_errors: HashMap<String, u64>,
}

fn sample(rt: &Runtime) -> Sample {
    Sample {
        at: Instant::now(),
        routes: rt
            .routes
            .iter()
            .map(|r| (r.name.clone(), r.metrics.totals()))
            .collect(),
        upstream_errors: rt
            .upstreams
            .iter()
            .map(|(name, up)| (name.clone(), up.metrics.errors()))
            .collect(),
    }
}

/// The samples of the last minute.
pub struct Dashboard {
    runtime: Arc<ArcSwap<Runtime>>,
    /// The listeners as bound at start: a reload cannot change them (it asks for a restart).
    bound: Vec<(String, std::net::SocketAddr, bool)>,
    samples: Arc<Mutex<VecDeque<Sample>>>,
    started: std::sync::OnceLock<()>,
}

impl Dashboard {
    /// A dashboard of whatever `runtime` holds.
    pub fn new(runtime: Arc<ArcSwap<Runtime>>) -> Dashboard {
        let bound = runtime
            .load()
            .bindings
            .listeners
            .iter()
            .map(|(name, (addr, _, tls))| (name.clone(), *addr, tls.is_some()))
            .collect();
        Dashboard {
            runtime,
            bound,
            samples: Arc::default(),
            started: std::sync::OnceLock::new(),
        }
    }

    /// The page's data: the configuration, reloads, routes with their rates, upstreams with
    /// their replicas, listeners with their certificates.
    pub fn state(&self, rt: &Runtime) -> serde_json::Value {
        let now = sample(rt);
        let oldest = {
            let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            samples
                .iter()
                .find(|s| now.at.saturating_duration_since(s.at) <= WINDOW)
                .filter(|s| now.at.saturating_duration_since(s.at) >= MIN_SPAN)
                .cloned()
        };
        let oldest = oldest.as_ref();
        let routes: Vec<serde_json::Value> = super::routes_json(rt)
            .into_iter()
            .zip(&rt.routes)
            .map(|(mut view, route)| {
                let stats = oldest.and_then(|o| {
                    let then = o.routes.get(&route.name)?;
                    let over = now.at.saturating_duration_since(o.at);
                    Some(rates(then, now.routes.get(&route.name)?, over))
                });
                view["stats"] = stats.unwrap_or(serde_json::Value::Null);
                mask_match_values(&mut view["match"]);
                view
            })
            .collect();
        let mut upstreams = super::upstreams_json(rt);
        for (name, view) in upstreams.iter_mut() {
            let errors = oldest.and_then(|o| {
                Some(
                    now.upstream_errors
                        .get(name)?
                        .saturating_sub(*o.upstream_errors.get(name)?),
                )
            });
            view["errors_last_minute"] = errors.into();
        }
        let certificates = self.certificates();
        let listeners: Vec<serde_json::Value> = self
            .bound
            .iter()
            .map(|(name, addr, tls)| {
                serde_json::json!({
                    "name": name,
                    "address": addr.to_string(),
                    "tls": tls,
                    "certificates": certificates.get(name).cloned().unwrap_or_default(),
                })
            })
            .collect();
        let m = &crate::metrics::METRICS;
        serde_json::json!({
            "config_generation": rt.generation,
            "config_hash": format!("{:016x}", rt.source_hash),
            "applied_at": m.last_reload.get(),
            "reload": crate::reload::status(),
            "window_seconds": oldest.map(|o| now.at.saturating_duration_since(o.at).as_secs()),
            "routes": routes,
            "upstreams": upstreams,
            "listeners": listeners,
        })
    }

    /// The certificates of the listeners bound at start (a listener a reload removed is
    /// still bound, and one it added is not).
    pub fn certificates(&self) -> std::collections::BTreeMap<String, Vec<crate::tls::CertInfo>> {
        let mut all = crate::tls::inventory();
        all.retain(|name, _| self.bound.iter().any(|(bound, _, _)| bound == name));
        all
    }

    /// Starts the sampler once, on the runtime serving the admin listener. It keeps a
    /// minute of samples and ends with the process.
    pub fn start_sampler(&self, rt: &Runtime) {
        if self.started.set(()).is_err() {
            return;
        }
        let (samples, runtime) = (self.samples.clone(), self.runtime.clone());
        if let Ok(mut s) = samples.lock() {
            s.push_back(sample(rt));
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let next = sample(&runtime.load());
                let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
                s.push_back(next);
                while s.len() > (WINDOW.as_secs() / SAMPLE_EVERY.as_secs()) as usize + 2 {
                    s.pop_front();
                }
            }
        });
    }
}

/// Requests per second, the 5xx share and p95 (ms) between two samples of a route.
fn rates(then: &RouteTotals, now: &RouteTotals, over: Duration) -> serde_json::Value {
    let requests = now.requests.saturating_sub(then.requests);
    let errors = now.errors.saturating_sub(then.errors);
    let secs = over.as_secs_f64().max(0.001);
    // The bucket bound the 95th percentile lies under; past the last bucket, that bound
    // with `p95_beyond`.
    let want = (requests as f64 * 0.95).ceil() as u64;
    let bucket = now
        .buckets
        .iter()
        .zip(&then.buckets)
        .zip(latency_buckets())
        .find(|((n, t), _)| n.saturating_sub(**t) >= want)
        .map(|(_, bound)| bound * 1000.0);
    let last = latency_buckets().last().map_or(0.0, |b| b * 1000.0);
    serde_json::json!({
        "requests_per_second": requests as f64 / secs,
        "error_rate": if requests > 0 { errors as f64 / requests as f64 } else { 0.0 },
        "p95_ms": if requests > 0 { Some(bucket.unwrap_or(last)) } else { None },
        "p95_beyond": requests > 0 && bucket.is_none(),
        "requests": requests,
    })
}

/// Header and query values of a route's match, which may be secrets (an internal key a
/// route requires): the state shows the names only.
fn mask_match_values(matcher: &mut serde_json::Value) {
    for list in ["headers", "query"] {
        if let Some(items) = matcher.get_mut(list).and_then(|v| v.as_array_mut()) {
            for item in items {
                for field in ["value", "regex"] {
                    if let Some(v) = item.get_mut(field) {
                        *v = serde_json::Value::String("…".into());
                    }
                }
            }
        }
    }
}

/// The page's files, embedded; the page gets a strict Content-Security-Policy (its own
/// script, style and data only).
pub fn asset(name: &str) -> Response<Vec<u8>> {
    let (body, content_type): (&[u8], &str) = match name {
        "index.html" => (
            include_bytes!("assets/index.html"),
            "text/html; charset=utf-8",
        ),
        "app.js" => (
            include_bytes!("assets/app.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => (include_bytes!("assets/app.css"), "text/css; charset=utf-8"),
    };
    Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        )
        .header("X-Content-Type-Options", "nosniff")
        .header("Referrer-Policy", "no-referrer")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .body(body.to_vec())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_p95_come_from_the_differences() {
        let n = latency_buckets().len();
        let then = RouteTotals {
            requests: 100,
            errors: 1,
            buckets: vec![100; n],
        };
        // 100 more requests: 90 under 1 ms, 10 more under 5 ms; 5 of them 5xx.
        let mut buckets = vec![200; n];
        buckets[0] = 150;
        buckets[1] = 190;
        let now = RouteTotals {
            requests: 200,
            errors: 6,
            buckets,
        };
        let r = rates(&then, &now, Duration::from_secs(10));
        assert_eq!(r["requests_per_second"], 10.0);
        assert_eq!(r["error_rate"], 0.05);
        // 95 of 100 lie under the 2.5 ms bound (the 1 ms bucket holds only 90).
        assert_eq!(r["p95_ms"], 2.5);
        let idle = rates(&now, &now, Duration::from_secs(10));
        assert!(idle["p95_ms"].is_null());
        // Slower than the last bucket: its bound, marked.
        let slow = RouteTotals {
            requests: 300,
            errors: 6,
            buckets: now.buckets.clone(),
        };
        let r = rates(&now, &slow, Duration::from_secs(10));
        assert_eq!(r["p95_ms"], 30000.0);
        assert_eq!(r["p95_beyond"], true);
    }

    #[test]
    fn header_and_query_values_are_not_shown() {
        let mut m = serde_json::json!({"path_prefix": "/a", "headers": [{"name": "x-key", "value": "s3cret"}],
            "query": [{"name": "k", "regex": "^s3"}]});
        mask_match_values(&mut m);
        assert!(!m.to_string().contains("s3"), "{m}");
        assert_eq!(m["headers"][0]["name"], "x-key");
    }
}
