//! Upstreams: named groups of replicas found through DNS, balanced, and health-checked.
//!
//! An [`Upstream`] outlives configuration reloads when its definition is unchanged, so its
//! replicas keep their health state and Pingora's connection pool (keyed by address) keeps its
//! warm connections. Its background tasks (re-resolution, active checks) hold only a weak
//! reference and stop by themselves once no runtime uses the upstream any more.

mod balance;
mod discovery;
mod grpc_health;
mod replica;

pub use balance::ReplicaSet;
pub use discovery::make_resolver;
pub use replica::{ms_at, now_ms, PassivePolicy, Replica};

use crate::config::{
    ActiveHealthConfig, Balance, DnsConfig, H2Config, HashKey, Target, UpstreamConfig,
    UpstreamProtocol,
};
use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::Backend;
use pingora::upstreams::peer::HttpPeer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Everything that defines an upstream; two upstreams with equal specs are interchangeable,
/// so a reload keeps the running one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    targets: Vec<Target>,
    balance: Balance,
    hash_key: Option<HashKey>,
    refresh: Duration,
    active: Option<ActiveHealthConfig>,
    passive: Option<PassivePolicy>,
    timeouts: crate::config::TimeoutsConfig,
    retries: u32,
    dns: DnsConfig,
    tls: Option<UpstreamTls>,
    protocol: UpstreamProtocol,
    h2: H2Config,
    concurrency: Option<crate::policy::ConcurrencySpec>,
    breaker: Option<crate::policy::circuit_breaker::BreakerSpec>,
    retry_budget: Option<crate::policy::retry_budget::BudgetSpec>,
}

/// An upstream's TLS settings, as compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UpstreamTls {
    sni: Option<String>,
    /// The CA file replicas' certificates must chain to (else the system's).
    ca: Option<String>,
    verify: bool,
}

impl UpstreamSpec {
    /// The TLS server name: configured, or the first target's host name (none for an IP).
    fn sni(&self) -> String {
        let Some(tls) = &self.tls else {
            return String::new();
        };
        tls.sni.clone().unwrap_or_else(|| {
            self.targets
                .iter()
                .find(|t| t.ip().is_none())
                .map(|t| t.host.clone())
                .unwrap_or_default()
        })
    }

    /// Certificate verification and trusted CAs on a peer of this upstream.
    fn apply_tls(&self, peer: &mut HttpPeer) {
        let Some(tls) = &self.tls else { return };
        peer.options.verify_cert = tls.verify;
        peer.options.verify_hostname = tls.verify;
        if let Some(ca) = &tls.ca {
            match crate::tls::load_ca(ca) {
                Ok((certs, fingerprint)) => {
                    peer.options.ca = Some(certs);
                    // Pingora's connection pool does not tell trust stores apart: a connection
                    // verified against one CA must not be reused for a peer that trusts another.
                    peer.group_key = fingerprint;
                }
                // Validation read this file moments ago; if it is gone now, the system's CAs
                // are used, which fails closed for a private CA.
                Err(e) => tracing::error!(error = %e, "upstream CA unreadable"),
            }
        }
    }

    /// The HTTP version on a peer of this upstream: ALPN over TLS, prior knowledge for `h2c`,
    /// and the HTTP/2 connection settings.
    fn apply_protocol(&self, peer: &mut HttpPeer) {
        use pingora::protocols::ALPN;
        peer.options.alpn = match self.protocol {
            UpstreamProtocol::Http1 => return,
            UpstreamProtocol::H2 | UpstreamProtocol::H2c => ALPN::H2,
            UpstreamProtocol::Auto => ALPN::H2H1,
        };
        peer.options.max_h2_streams = self.h2.max_streams;
        peer.options.h2_ping_interval = self.h2.ping_interval.map(|d| d.0);
    }

    /// The spec of a configured upstream.
    pub fn new(cfg: &UpstreamConfig, dns: &DnsConfig) -> UpstreamSpec {
        UpstreamSpec {
            targets: cfg.targets.value.clone(),
            balance: cfg.balance.value,
            hash_key: cfg.hash_key.clone(),
            refresh: cfg.discovery.value.refresh.0,
            active: cfg.health.value.active.clone(),
            passive: cfg.health.value.passive.as_ref().map(|p| PassivePolicy {
                max_fails: p.max_fails,
                fail_timeout: p.fail_timeout.0,
            }),
            timeouts: cfg.timeouts.value,
            retries: cfg.retries,
            dns: dns.clone(),
            tls: cfg.tls.as_ref().map(|t| UpstreamTls {
                sni: t.sni.clone(),
                ca: t.ca.as_ref().map(|c| c.value.clone()),
                verify: t.verify,
            }),
            protocol: cfg.protocol.value,
            h2: cfg.h2.as_ref().map(|h| h.value).unwrap_or_default(),
            // Checked by validation; an invalid one cannot reach here.
            concurrency: cfg
                .concurrency
                .as_ref()
                .and_then(|l| crate::plan::concurrency_spec(&l.value).ok()),
            breaker: cfg.circuit_breaker.as_ref().map(|b| {
                let b = &b.value;
                crate::policy::circuit_breaker::BreakerSpec {
                    failure_percent: b.failure_percent,
                    min_requests: b.min_requests,
                    window_secs: b.window.0.as_secs().max(1),
                    open_for: b.open_for.0,
                    trial_requests: b.trial_requests,
                    statuses: b.statuses.clone(),
                }
            }),
            retry_budget: cfg.retry_budget.as_ref().map(|r| {
                crate::policy::retry_budget::BudgetSpec {
                    budget_percent: r.value.budget_percent,
                    min_retries: r.value.min_retries,
                    window_secs: r.value.window.0.as_secs().max(1),
                }
            }),
        }
    }
}

/// A named upstream.
pub struct Upstream {
    /// Its name in the configuration.
    pub name: Arc<str>,
    /// Its definition.
    pub spec: UpstreamSpec,
    peer_template: HttpPeer,
    set: ArcSwap<ReplicaSet>,
    /// Which target each replica came from (parallel to the set), for keeping the last good
    /// addresses of a target whose lookup fails.
    origins: ArcSwap<Vec<(SocketAddr, usize)>>,
    tasks_started: AtomicBool,
    /// A first round of active checks has answered (always true without active checks).
    first_round_done: AtomicBool,
    /// A first DNS lookup has answered or failed (always true without host-name targets).
    first_lookup_done: AtomicBool,
    /// Woken when the first lookup is done: the health checks start on its replicas at once.
    looked_up: Arc<tokio::sync::Notify>,
    /// Metric handles.
    pub metrics: crate::metrics::UpstreamMetrics,
    /// Requests in flight at once, over all routes (`concurrency`).
    pub limit: Option<Arc<crate::policy::ConcurrencyLimit>>,
    /// Fails fast while the upstream keeps failing (`circuit_breaker`).
    pub breaker: Option<crate::policy::circuit_breaker::CircuitBreaker>,
    /// Bounds retries to a share of requests (`retry_budget`).
    pub retry_budget: Option<crate::policy::retry_budget::RetryBudget>,
}

impl Upstream {
    /// A new upstream with its literal-IP targets in place; host names are resolved by
    /// [`Upstream::refresh`].
    pub fn new(name: &str, spec: UpstreamSpec) -> Arc<Upstream> {
        let spec_has_no_checks = spec.active.is_none();
        let breaker = spec
            .breaker
            .clone()
            .map(|s| crate::policy::circuit_breaker::CircuitBreaker::new(name, s));
        let retry_budget = spec
            .retry_budget
            .map(|s| crate::policy::retry_budget::RetryBudget::new(name, s));
        let limit = spec.concurrency.map(|s| {
            Arc::new(crate::policy::ConcurrencyLimit::new(
                &format!("upstream:{name}"),
                s,
            ))
        });
        let spec_has_no_names = spec.targets.iter().all(|t| t.ip().is_some());
        let mut peer_template = HttpPeer::new("127.0.0.1:1", spec.tls.is_some(), spec.sni());
        spec.apply_tls(&mut peer_template);
        spec.apply_protocol(&mut peer_template);
        let t = &spec.timeouts;
        peer_template.options.connection_timeout = Some(t.connect.0);
        peer_template.options.read_timeout = Some(t.read.0);
        peer_template.options.write_timeout = Some(t.write.0);
        peer_template.options.idle_timeout = Some(t.idle.0);
        let up = Arc::new(Upstream {
            name: name.into(),
            spec,
            peer_template,
            set: ArcSwap::from_pointee(ReplicaSet::empty()),
            origins: ArcSwap::from_pointee(Vec::new()),
            tasks_started: AtomicBool::new(false),
            first_round_done: AtomicBool::new(spec_has_no_checks),
            first_lookup_done: AtomicBool::new(spec_has_no_names),
            looked_up: Arc::new(tokio::sync::Notify::new()),
            metrics: crate::metrics::UpstreamMetrics::new(name),
            limit,
            breaker,
            retry_budget,
        });
        let literal: Vec<(SocketAddr, usize)> = up
            .spec
            .targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.ip().map(|ip| (SocketAddr::new(ip, t.port), i)))
            .collect();
        up.install(literal);
        up
    }

    /// Whether its replicas are spoken to in HTTP/1 only (the gateway's own HTTP/1 path serves
    /// such an upstream's requests; Pingora's proxy those of one that may use HTTP/2).
    pub fn http1_only(&self) -> bool {
        matches!(
            self.peer_template.options.alpn,
            pingora::protocols::ALPN::H1
        )
    }

    /// Picks a replica for a request (see [`ReplicaSet::pick`]).
    #[inline]
    pub fn pick(
        &self,
        hash: Option<&[u8]>,
        exclude: &[u64],
        now_ms: u64,
    ) -> Option<(Arc<Replica>, bool)> {
        self.set
            .load()
            .pick(self.spec.balance, hash, exclude, now_ms)
    }

    /// Whether a retry could go to a replica not tried yet.
    pub fn has_alternative(&self, exclude: &[u64], now_ms: u64) -> bool {
        self.set.load().has_alternative(exclude, now_ms)
    }

    /// The current replica set.
    pub fn replicas(&self) -> Arc<ReplicaSet> {
        self.set.load_full()
    }

    /// The balancing algorithm.
    pub fn balance(&self) -> Balance {
        self.spec.balance
    }

    /// The targets as configured (`host:port`, with `weight` when not 1).
    pub fn targets(&self) -> Vec<String> {
        self.spec
            .targets
            .iter()
            .map(|t| match t.weight {
                1 => format!("{}:{}", t.host, t.port),
                w => format!("{}:{} weight={w}", t.host, t.port),
            })
            .collect()
    }

    /// The HTTP version spoken to the replicas.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.spec.protocol
    }

    /// How long a gRPC call may go without a message (`timeouts.stream_idle`).
    pub fn stream_idle(&self) -> Duration {
        self.spec.timeouts.stream_idle.0
    }

    /// Whether active health checks are on.
    pub fn active_checks(&self) -> bool {
        self.spec.active.is_some()
    }

    /// What `consistent_hash` hashes.
    pub fn hash_key(&self) -> Option<&HashKey> {
        self.spec.hash_key.as_ref()
    }

    /// Retries after a failure that is safe to retry.
    pub fn retries(&self) -> u32 {
        self.spec.retries
    }

    /// The passive ejection policy, if on.
    pub fn passive(&self) -> Option<&PassivePolicy> {
        self.spec.passive.as_ref()
    }

    /// Passive health: an attempt at `replica` failed on the upstream side. The last available
    /// replica is never ejected (as nginx never marks a lone server down): ejecting it would
    /// turn a partial failure into a total one.
    pub fn report_failure(&self, replica: &Replica, now_ms: u64) {
        if let Some(policy) = self.passive() {
            let may_eject = self.has_alternative(&[replica.id], now_ms);
            if replica.report_failure(policy, now_ms, may_eject) {
                self.metrics.ejections.inc();
            }
        }
    }

    /// A replica for a call the gateway makes itself (forward auth, a mirror's copy), counted
    /// in flight, whose outcome goes to passive health as a proxied request's does.
    pub fn attempt(self: &Arc<Self>, now_ms: u64) -> Option<Attempt> {
        let (replica, probe) = self.pick(None, &[], now_ms)?;
        replica.begin_request();
        Some(Attempt {
            upstream: self.clone(),
            replica,
            probe,
            verdict: None,
        })
    }

    /// Whether the first round of active checks has answered (true without active checks):
    /// until then `/ready` waits, so a gateway started in front of a half-up stack does not
    /// send traffic to replicas that are not up.
    pub fn first_checks_done(&self) -> bool {
        self.first_round_done.load(Ordering::Acquire)
    }

    /// Readiness does not wait for this upstream's first checks: it replaces one that was
    /// already serving (a reload that changed its definition).
    pub fn replaces_a_serving_one(&self) {
        self.first_round_done.store(true, Ordering::Release);
    }

    /// Whether the first DNS lookup of its targets has answered (or failed): until then the
    /// upstream may have no replica, and `/ready` says it waits for it.
    pub fn first_lookup_done(&self) -> bool {
        self.first_lookup_done.load(Ordering::Acquire)
    }

    /// Whether any target is a host name (and so needs discovery).
    pub fn needs_discovery(&self) -> bool {
        self.spec.targets.iter().any(|t| t.ip().is_none())
    }

    /// Replaces the replica set with these addresses, keeping the `Replica` (and so the health
    /// state) of every address that stays.
    fn install(&self, mut addrs: Vec<(SocketAddr, usize)>) {
        addrs.sort();
        addrs.dedup_by_key(|(a, _)| *a);
        let old = self.set.load();
        if old.replicas.len() == addrs.len()
            && old.addrs().zip(&addrs).all(|(a, (b, _))| a == *b)
            && !old.replicas.is_empty()
        {
            self.origins.store(Arc::new(addrs));
            return;
        }
        // With active checks, a replica that appears beside checked, healthy ones takes no
        // traffic before `rise` checks pass (a scaled-up container that is still starting).
        // Only replicas that stay count: one that replaces all the old ones (a recreated
        // container) is checked as at start, or the set would have no replica to send to.
        let join_unchecked = self.spec.active.is_some()
            && old.replicas.iter().any(|r| {
                addrs.iter().any(|(a, _)| *a == r.addr)
                    && r.is_active_healthy()
                    && !r.awaiting_first_check()
            });
        let replicas: Vec<Arc<Replica>> = addrs
            .iter()
            .map(
                |(addr, target)| match old.replicas.iter().find(|r| r.addr == *addr) {
                    Some(r) => r.clone(),
                    None => {
                        let weight = self.spec.targets[*target].weight;
                        let template = Some(&self.peer_template);
                        Arc::new(match join_unchecked {
                            true => Replica::joining(*addr, weight, template),
                            false => Replica::new(*addr, weight, template),
                        })
                    }
                },
            )
            .collect();
        if !old.replicas.is_empty() || !replicas.is_empty() {
            info!(upstream = %self.name, replicas = ?addrs.iter().map(|(a, _)| a).collect::<Vec<_>>(), "replica set changed");
        }
        self.set
            .store(Arc::new(ReplicaSet::new(replicas, self.spec.balance)));
        self.origins.store(Arc::new(addrs));
    }

    /// One discovery round: resolves every host-name target. A target whose lookup fails keeps
    /// its previous addresses. Returns the failures, if any.
    pub async fn refresh(&self, resolver: &TokioResolver) -> Vec<String> {
        let previous = self.origins.load_full();
        let mut addrs = Vec::new();
        let mut errors = Vec::new();
        // One lookup takes at most `dns.timeout`, whatever the resolver's retries add up to.
        let limit = self
            .spec
            .dns
            .timeout
            .map_or(Duration::from_secs(2), |d| d.0);
        for (i, target) in self.spec.targets.iter().enumerate() {
            let found = tokio::time::timeout(limit, discovery::resolve_target(resolver, target))
                .await
                .unwrap_or_else(|_| Err(format!("{}: no answer within {limit:?}", target.host)));
            match found {
                Ok(found) => addrs.extend(found.into_iter().map(|a| (a, i))),
                Err(e) => {
                    addrs.extend(previous.iter().filter(|(_, t)| *t == i).copied());
                    errors.push(e);
                }
            }
        }
        self.install(addrs);
        if !self.first_lookup_done.swap(true, Ordering::AcqRel) {
            self.looked_up.notify_one();
        }
        errors
    }

    /// Starts re-resolution and active health checks on the current Tokio runtime (once).
    /// The tasks end when the upstream is dropped.
    pub fn spawn_tasks(self: &Arc<Self>, resolver: Option<TokioResolver>) {
        if self.tasks_started.swap(true, Ordering::AcqRel) {
            return;
        }
        if let (true, Some(resolver)) = (self.needs_discovery(), resolver) {
            let weak = Arc::downgrade(self);
            let every = self.spec.refresh;
            tokio::spawn(async move { discovery_loop(weak, resolver, every).await });
        }
        if let Some(active) = self.spec.active.clone() {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move { health_loop(weak, active).await });
        }
    }
}

async fn discovery_loop(weak: Weak<Upstream>, resolver: TokioResolver, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An upstream made at start has not been looked up yet: the first tick is at once.
    if weak.upgrade().is_some_and(|u| u.first_lookup_done()) {
        tick.tick().await;
    }
    loop {
        tick.tick().await;
        let Some(up) = weak.upgrade() else { return };
        let errors = up.refresh(&resolver).await;
        if errors.is_empty() {
            up.metrics.dns_ok.inc();
        } else {
            up.metrics.dns_failed.inc();
            warn!(upstream = %up.name, errors = ?errors, "DNS refresh failed; keeping the last good addresses");
        }
    }
}

fn build_check(active: &ActiveHealthConfig, host: &str) -> HttpHealthCheck {
    let mut check = HttpHealthCheck::new(active.host.as_deref().unwrap_or(host), false);
    check.req.set_uri(
        active
            .path
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/")),
    );
    check.peer_template.options.connection_timeout = Some(active.timeout.0);
    check.peer_template.options.read_timeout = Some(active.timeout.0);
    check.peer_template.options.write_timeout = Some(active.timeout.0);
    let expected = active.expected_status.clone();
    check.validator = Some(Box::new(move |resp| {
        let code = resp.status.as_u16();
        let ok = if expected.is_empty() {
            (200..400).contains(&code)
        } else {
            expected.contains(&code)
        };
        if ok {
            Ok(())
        } else {
            pingora::Error::e_explain(
                pingora::ErrorType::CustomCode("unexpected status", code),
                "health check",
            )
        }
    }));
    check
}

/// An active check of one replica: HTTP or gRPC.
enum Check {
    Http(Box<HttpHealthCheck>),
    Grpc(Box<grpc_health::GrpcHealthCheck>),
}

impl Check {
    /// The check of `up`'s replicas, over its protocol and TLS.
    fn of(up: &Upstream, active: &ActiveHealthConfig) -> Check {
        let host = up
            .spec
            .targets
            .first()
            .map(|t| t.host.as_str())
            .unwrap_or_default();
        let timeout = Some(active.timeout.0);
        if let Some(grpc) = &active.grpc {
            let mut peer = up.peer_template.clone();
            peer.options.connection_timeout = timeout;
            peer.options.read_timeout = timeout;
            peer.options.write_timeout = timeout;
            let authority = active.host.as_deref().unwrap_or(host);
            return Check::Grpc(Box::new(grpc_health::GrpcHealthCheck::new(
                peer,
                &grpc.service,
                authority,
            )));
        }
        let mut check = build_check(active, host);
        if up.spec.tls.is_some() {
            check.peer_template.scheme = pingora::upstreams::peer::Scheme::HTTPS;
            check.peer_template.sni = up.spec.sni();
            up.spec.apply_tls(&mut check.peer_template);
        }
        up.spec.apply_protocol(&mut check.peer_template);
        Check::Http(Box::new(check))
    }

    async fn run(&self, addr: SocketAddr) -> bool {
        match self {
            Check::Http(check) => match Backend::new(&addr.to_string()) {
                Ok(backend) => check.check(&backend).await.is_ok(),
                Err(_) => false,
            },
            Check::Grpc(check) => match check.check(addr).await {
                Ok(()) => true,
                Err(e) => {
                    debug!(replica = %addr, error = %e, "gRPC health check failed");
                    false
                }
            },
        }
    }
}

async fn health_loop(weak: Weak<Upstream>, active: ActiveHealthConfig) {
    let mut tick = tokio::time::interval(active.interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Some(check) = weak.upgrade().map(|up| Check::of(&up, &active)) else {
        return;
    };
    let check = Arc::new(check);
    let looked_up = match weak.upgrade() {
        Some(up) => up.looked_up.clone(),
        None => return,
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // The first DNS answer at start: its replicas are checked now, not an interval on.
            _ = looked_up.notified() => {}
        }
        let Some(up) = weak.upgrade() else { return };
        // A round before the first lookup has no replicas: it does not count as the first.
        let counts = up.first_lookup_done();
        let set = up.replicas();
        let name = up.name.clone();
        drop(up);
        let probes = set.replicas.iter().map(|r| {
            let check = check.clone();
            let r = r.clone();
            let timeout = active.timeout.0;
            let name = name.clone();
            let (rise, fall) = (active.rise, active.fall);
            async move {
                let ok = tokio::time::timeout(timeout + Duration::from_millis(100), check.run(r.addr))
                    .await
                    .unwrap_or(false);
                debug!(upstream = %name, replica = %r.addr, ok, "health check");
                match r.record_check(ok, rise, fall) {
                    Some(true) => info!(upstream = %name, replica = %r.addr, "replica healthy again (active check)"),
                    Some(false) => warn!(upstream = %name, replica = %r.addr, "replica unhealthy (active check)"),
                    None => {}
                }
            }
        });
        let handles: Vec<_> = probes.map(tokio::spawn).collect();
        for h in handles {
            let _ = h.await;
        }
        if let (true, Some(up)) = (counts, weak.upgrade()) {
            up.first_round_done.store(true, Ordering::Release);
        }
    }
}

/// The HTTP/1.1 client of the calls the gateway makes itself to replicas (plain HTTP): a
/// connection is kept between calls, up to `max_idle` a replica, and closed after 30 s unused.
pub fn own_client<B>(
    connect_timeout: Option<Duration>,
    max_idle: usize,
) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_connect_timeout(connect_timeout);
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(max_idle)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector)
}

/// A call the gateway makes itself to one replica. Passive health hears the verdict given
/// ([`Attempt::answered`], [`Attempt::failed`]) when the call is dropped; a call dropped
/// without one (cancelled, or an error that is not the replica's) counts neither way.
pub struct Attempt {
    upstream: Arc<Upstream>,
    replica: Arc<Replica>,
    probe: bool,
    verdict: Option<bool>,
}

impl Attempt {
    /// The replica's address.
    pub fn addr(&self) -> SocketAddr {
        self.replica.addr
    }

    /// The replica answered (whatever the status).
    pub fn answered(&mut self) {
        self.verdict = Some(true);
    }

    /// The replica failed the call: no connection, or no answer in time.
    pub fn failed(&mut self) {
        self.verdict = Some(false);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.replica.end_request();
        match self.verdict {
            Some(true) => self.replica.report_success(),
            Some(false) => self.upstream.report_failure(&self.replica, now_ms()),
            None if self.probe => self.replica.release_probe(),
            None => {}
        }
    }
}
