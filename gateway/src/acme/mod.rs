//! Certificates from an ACME server (RFC 8555) for a TLS listener: obtained, stored, renewed
//! and served without a restart.
//!
//! One [`Manager`] per listener with `tls.acme` runs on the control-plane runtime: it serves
//! what the storage folder holds, orders when there is nothing valid or the renewal time has
//! come, and backs off after failures. Instances sharing a storage folder take its lock to
//! order; the others pick the result up from the folder (and answer challenges from it).

mod challenge;
mod order;
mod storage;

pub use challenge::{http01_answer, offers_acme_tls, tls_alpn_cert, ACME_TLS_ALPN, HTTP01_PREFIX};

use crate::config::{AcmeChallenge, AcmeConfig};
use crate::metrics::METRICS;
use crate::tls::{CertStore, StoredCert};
use order::Failure;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use storage::{unix_now, Storage};
use tokio::sync::Notify;
use tracing::{error, info, warn};

/// Let's Encrypt's production directory.
const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory.
const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
/// The longest an order may take, validation included.
const ORDER_LIMIT: Duration = Duration::from_secs(300);
/// How often an instance waiting on another's order looks at the storage folder.
const LOCK_POLL: Duration = Duration::from_secs(1);
/// The longest wait after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);
/// The shortest wait after the server refused for its rate limits.
const RATE_LIMITED_BACKOFF: Duration = Duration::from_secs(3600);

/// A listener's `acme`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmePlan {
    /// The listener it serves.
    pub listener: String,
    /// The directory URL.
    pub directory: String,
    /// Contact address, without `mailto:`.
    pub email: Option<String>,
    /// The certificate's names, lower case.
    pub domains: Vec<String>,
    /// The challenge answered.
    pub challenge: AcmeChallenge,
    /// The storage folder.
    pub storage: PathBuf,
    /// The ACME server's root, PEM file.
    pub ca: Option<PathBuf>,
    /// Renew with this much lifetime left; `None`: a third of the lifetime.
    pub renew_before: Option<Duration>,
    /// The first wait after a failure.
    pub retry: Duration,
    /// External account binding: key id and MAC key.
    pub eab: Option<(String, Vec<u8>)>,
}

/// Checks `acme` of listener `listener`. An error names the field under `acme` and why.
pub fn compile(listener: &str, acme: &AcmeConfig) -> Result<AcmePlan, (String, String)> {
    let fail = |field: &str, why: String| Err((field.to_string(), why));
    let directory = match acme.directory.as_str() {
        "letsencrypt" => LETSENCRYPT.to_string(),
        "letsencrypt-staging" => LETSENCRYPT_STAGING.to_string(),
        url => match url.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => url.to_string(),
            _ => {
                return fail(
                    "directory",
                    format!(
                    "`{url}` is neither `letsencrypt`, `letsencrypt-staging` nor an https:// URL"
                ),
                )
            }
        },
    };
    if acme.domains.is_empty() {
        return fail("domains", "names at least one domain".into());
    }
    let mut domains = Vec::with_capacity(acme.domains.len());
    for d in &acme.domains {
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        if d.starts_with("*.") {
            return fail(
                "domains",
                format!("`{d}`: a wildcard name needs the DNS-01 challenge, which the gateway does not answer; list the names"),
            );
        }
        let is_ip = d.parse::<std::net::IpAddr>().is_ok();
        if is_ip || rustls::pki_types::DnsName::try_from(d.as_str()).is_err() || !d.contains('.') {
            return fail("domains", format!("`{d}` is not a public DNS name"));
        }
        if !domains.contains(&d) {
            domains.push(d);
        }
    }
    // In a fixed order: listing the names otherwise is the same certificate.
    domains.sort_unstable();
    if let Some(email) = &acme.email {
        if !email.contains('@') || email.contains(char::is_whitespace) {
            return fail("email", format!("`{email}` is not an email address"));
        }
    }
    if acme.storage.is_empty() {
        return fail("storage", "is empty".into());
    }
    if let Some(ca) = &acme.ca {
        crate::tls::load_ca(ca).map_err(|e| ("ca".to_string(), e))?;
    }
    if acme.renew_before.is_some_and(|d| d.0.is_zero()) {
        return fail("renew_before", "must be more than 0".into());
    }
    if acme.retry_interval.0 < Duration::from_secs(1) {
        return fail("retry_interval", "must be at least 1s".into());
    }
    let eab = match &acme.eab {
        None => None,
        Some(eab) => {
            use base64::Engine;
            let key = eab.hmac_key.trim_end_matches('=');
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(key)
                .map_err(|e| ("eab.hmac_key".to_string(), format!("not base64url: {e}")))?;
            Some((eab.kid.clone(), key))
        }
    };
    Ok(AcmePlan {
        listener: listener.to_string(),
        directory,
        email: acme.email.clone(),
        domains,
        challenge: acme.challenge,
        storage: PathBuf::from(&acme.storage),
        ca: acme.ca.as_ref().map(PathBuf::from),
        renew_before: acme.renew_before.map(|d| d.0),
        retry: acme.retry_interval.0,
        eab,
    })
}

/// A listener's ACME certificate, kept and renewed until the manager is stopped (a reload
/// that replaces or removes it) or dropped.
pub struct Manager {
    work: Arc<Work>,
    started: AtomicBool,
}

/// What the manager's task works with.
struct Work {
    plan: AcmePlan,
    store: Arc<CertStore>,
    /// This manager's id in the store: a replaced one cannot install there.
    owner: u64,
    storage: Storage,
    /// Set by [`Manager::stop`]; checked before anything is served.
    stopped: AtomicBool,
    wake: Notify,
    /// This instance's own failure count and next attempt (Unix seconds), in case the
    /// storage folder cannot record them: the backoff holds either way.
    backoff: Mutex<(u32, u64)>,
}

/// The certificate being served.
#[derive(Clone)]
struct Serving {
    cert: StoredCert,
    /// When to renew, Unix seconds.
    renew_at: i64,
}

impl Manager {
    /// A manager for `plan` serving through `store`; nothing runs before [`Manager::start`].
    pub fn new(plan: AcmePlan, store: Arc<CertStore>) -> Arc<Manager> {
        static OWNERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let owner = OWNERS.fetch_add(1, Ordering::Relaxed);
        let storage = Storage::new(&plan.storage, &plan.directory, &plan.domains);
        let tls_alpn = (plan.challenge == AcmeChallenge::TlsAlpn01)
            .then(|| (plan.storage.clone(), plan.domains.clone()));
        store.set_acme_owner(owner, tls_alpn);
        Arc::new(Manager {
            work: Arc::new(Work {
                plan,
                store,
                owner,
                storage,
                stopped: AtomicBool::new(false),
                wake: Notify::new(),
                backoff: Mutex::new((0, 0)),
            }),
            started: AtomicBool::new(false),
        })
    }

    /// What it was made from.
    pub fn plan(&self) -> &AcmePlan {
        &self.work.plan
    }

    /// Serves the stored certificate at once, then keeps it valid in the background; once.
    /// Must be called on the control-plane runtime.
    pub fn start(&self) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let (listener, plan) = (&self.work.plan.listener, &self.work.plan);
        for kind in ["new", "renewal"] {
            for result in ["issued", "failed"] {
                METRICS
                    .acme_orders
                    .with_label_values(&[listener, kind, result]);
            }
        }
        // Made at once, so that the alert's `increase` sees the first failure.
        for reason in order::Reason::ALL {
            METRICS
                .acme_failures
                .with_label_values(&[listener, reason.label()]);
        }
        let serving = self.work.pick_up(None, true);
        if serving.is_none() {
            info!(listener = %listener, names = %plan.domains.join(","), directory = %plan.directory, "no stored ACME certificate: ordering one");
        }
        tokio::spawn(run(self.work.clone(), serving));
    }

    /// Stops the manager: nothing more is ordered or served by it; an order under way is
    /// abandoned.
    pub fn stop(&self) {
        self.work.stopped.store(true, Ordering::Release);
        self.work.wake.notify_waiters();
        // A permit for a task between two waits.
        self.work.wake.notify_one();
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops the managers of `old` that `new` does not carry over, once `new` serves. (Their
/// stores already refuse their certificates: activation gave each store its new owner, or
/// none.)
pub fn retire(old: &BTreeMap<String, Arc<Manager>>, new: &BTreeMap<String, Arc<Manager>>) {
    for (listener, manager) in old {
        if !new.get(listener).is_some_and(|m| Arc::ptr_eq(m, manager)) {
            manager.stop();
        }
    }
}

/// The longest single wait: long waits are cut so that a clock set right, a suspended machine
/// or another instance's renewal is noticed within it.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The manager's task: wait for the renewal time, order (or pick up what another instance
/// ordered), back off after failures. Ends when the manager stops.
async fn run(work: Arc<Work>, mut serving: Option<Serving>) {
    let mut first_order = true;
    loop {
        if work.stopped.load(Ordering::Acquire) {
            return;
        }
        let now = unix_now() as i64;
        if let Some(s) = &serving {
            if now < s.renew_at {
                if !work.wait(secs(s.renew_at - now)).await {
                    return;
                }
                serving = work.pick_up(serving, true);
                continue;
            }
        }
        let next_attempt = work.next_attempt();
        if next_attempt > now {
            if !work.wait(secs(next_attempt - now)).await {
                return;
            }
            serving = work.pick_up(serving, true);
            continue;
        }
        if first_order {
            // Validation must find this instance's listeners bound.
            first_order = false;
            if !work.wait_for_listeners().await {
                return;
            }
        }
        let lock = match work.storage.try_lock() {
            Ok(lock) => lock,
            Err(e) => {
                work.failed(&serving, &Failure::storage(e));
                continue;
            }
        };
        let Some(lock) = lock else {
            // Another instance is ordering: its result appears in the folder.
            if !work.wait(LOCK_POLL).await {
                return;
            }
            serving = work.pick_up(serving, true);
            continue;
        };
        // Under the lock: another instance may have just stored a certificate or a failure.
        let before = serving.as_ref().map(|s| s.cert.fingerprint);
        serving = work.pick_up(serving, true);
        let renewed = serving.as_ref().map(|s| s.cert.fingerprint) != before;
        if renewed || work.next_attempt() > now {
            continue;
        }
        tokio::select! {
            next = work.order(serving.clone()) => serving = next,
            _ = work.wake.notified() => {
                if work.stopped.load(Ordering::Acquire) {
                    return;
                }
            }
        }
        drop(lock);
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(1) as u64)
}

impl Work {
    /// Sleeps `d` (at most [`MAX_WAIT`]); false when the manager stopped meanwhile.
    async fn wait(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d.min(MAX_WAIT)) => {}
            _ = self.wake.notified() => {}
        }
        !self.stopped.load(Ordering::Acquire)
    }

    /// Waits until the gateway's client listeners are bound; false when stopped meanwhile.
    async fn wait_for_listeners(&self) -> bool {
        let Some(bound) = LISTENERS_BOUND.get() else {
            return true;
        };
        while !bound.load(Ordering::Acquire) {
            if !self.wait(Duration::from_millis(100)).await {
                return false;
            }
        }
        true
    }

    /// When the next order may be made, Unix seconds: the later of what the storage folder
    /// and this instance recorded. A time further ahead than the longest backoff was written
    /// under a wrong clock (or the file is damaged) and does not count.
    fn next_attempt(&self) -> i64 {
        let latest = unix_now() + MAX_BACKOFF.as_secs();
        let valid = |t: u64| if t > latest { 0 } else { t };
        let stored = valid(self.storage.read_state().next_attempt);
        let own = valid(self.backoff.lock().map_or(0, |b| b.1));
        stored.max(own) as i64
    }

    /// Serves the stored certificate when it is valid for the configured names and is not
    /// the one served already; returns what is served now. `log`: say so.
    fn pick_up(&self, serving: Option<Serving>, log: bool) -> Option<Serving> {
        if self.stopped.load(Ordering::Acquire) {
            return serving;
        }
        let bundle = self.storage.read_cert()?;
        let path = self.storage.cert_path().display().to_string();
        let cert = match crate::tls::stored_cert(&bundle, &bundle, &path) {
            Ok(c) => c,
            Err(e) => {
                warn!(listener = %self.plan.listener, error = %e, "stored ACME certificate unusable: a new one is ordered");
                return serving;
            }
        };
        if serving
            .as_ref()
            .is_some_and(|s| s.cert.fingerprint == cert.fingerprint)
        {
            return serving;
        }
        if !self.usable(&cert) {
            return serving;
        }
        if !self.store.install_acme(self.owner, &cert) {
            return serving;
        }
        if log {
            info!(listener = %self.plan.listener, names = %cert.names.join(","), not_after = cert.not_after, "ACME certificate served from storage");
        }
        // A certificate another instance ordered ends this one's run of failures too.
        if let Ok(mut b) = self.backoff.lock() {
            *b = (0, 0);
        }
        let renew_at = self.renew_at(&cert);
        Some(Serving { cert, renew_at })
    }

    /// Whether `cert` covers every configured name and has not expired.
    fn usable(&self, cert: &StoredCert) -> bool {
        let covers = self.plan.domains.iter().all(|d| cert.names.contains(d));
        covers && cert.not_after > unix_now() as i64
    }

    /// When to renew `cert`: `renew_before` (else a third of its lifetime) before it
    /// expires, less a random part of up to a thirtieth of its lifetime (at most an hour), so
    /// that instances and names do not all renew at once; never before half its lifetime, so
    /// that a `renew_before` longer than the lifetime cannot renew without end.
    fn renew_at(&self, cert: &StoredCert) -> i64 {
        let lifetime = (cert.not_after - cert.not_before).max(1);
        let before = self
            .plan
            .renew_before
            .map_or(lifetime / 3, |d| d.as_secs() as i64);
        let jitter = fastrand::i64(0..=(lifetime / 30).min(3600));
        (cert.not_after - before - jitter).max(cert.not_before + lifetime / 2)
    }

    /// Orders a certificate; on success stores and serves it, on failure records when to try
    /// again. Called holding the storage lock.
    async fn order(&self, serving: Option<Serving>) -> Option<Serving> {
        let kind = if serving.is_some() { "renewal" } else { "new" };
        let started = Instant::now();
        let result =
            match tokio::time::timeout(ORDER_LIMIT, order::obtain(&self.plan, &self.storage)).await
            {
                Ok(result) => result,
                Err(_) => Err(Failure::new(
                    order::Reason::Timeout,
                    format!("no certificate within {}s", ORDER_LIMIT.as_secs()),
                )),
            };
        let issued = result.and_then(|issued| self.store_issued(&issued));
        let count = |result: &str| {
            METRICS
                .acme_orders
                .with_label_values(&[&self.plan.listener, kind, result])
                .inc();
        };
        let cert = match issued {
            Ok(cert) => cert,
            Err(f) => {
                count("failed");
                self.failed(&serving, &f);
                return serving;
            }
        };
        count("issued");
        if let Ok(mut b) = self.backoff.lock() {
            *b = (0, 0);
        }
        if let Err(e) = self.storage.write_state(&storage::OrderState::default()) {
            warn!(listener = %self.plan.listener, error = %e, "ACME order state not written");
        }
        info!(listener = %self.plan.listener, names = %self.plan.domains.join(","), kind, not_after = cert.not_after, took_ms = started.elapsed().as_millis() as u64, "ACME certificate issued");
        if self.stopped.load(Ordering::Acquire) || !self.store.install_acme(self.owner, &cert) {
            return serving;
        }
        // Never due again before a tenth of its validity has passed, whatever its `notBefore`
        // says: a new certificate cannot make the next order at once.
        let now = unix_now() as i64;
        let soonest = now + ((cert.not_after - now) / 10).max(1);
        let renew_at = self.renew_at(&cert).max(soonest);
        Some(Serving { cert, renew_at })
    }

    /// Checks a new certificate and stores it; one that does not serve the configured names
    /// (or has expired) is a failed order.
    fn store_issued(&self, issued: &order::Issued) -> Result<StoredCert, Failure> {
        let path = self.storage.cert_path().display().to_string();
        let cert = crate::tls::stored_cert(
            issued.chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            &path,
        )
        .map_err(|e| Failure::new(order::Reason::Finalize, e))?;
        if !self.usable(&cert) {
            return Err(Failure::new(
                order::Reason::Finalize,
                format!(
                    "the issued certificate is for {} until {}: not usable for {}",
                    cert.names.join(","),
                    cert.not_after,
                    self.plan.domains.join(",")
                ),
            ));
        }
        self.storage
            .write_cert(&issued.chain_pem, &issued.key_pem)
            .map_err(Failure::storage)?;
        Ok(cert)
    }

    /// Counts, logs and backs off a failure: ERROR when nothing valid is left to serve soon,
    /// else WARN. The wait holds in this instance even if the folder cannot record it.
    fn failed(&self, serving: &Option<Serving>, f: &Failure) {
        let stored = self.storage.read_state();
        let own = self.backoff.lock().map_or(0, |b| b.0);
        let failures = stored.failures.max(own) + 1;
        let wait = backoff(self.plan.retry, failures, f.reason);
        let next_attempt = unix_now() + wait.as_secs();
        if let Ok(mut b) = self.backoff.lock() {
            *b = (failures, next_attempt);
        }
        let state = storage::OrderState {
            failures,
            next_attempt,
            last_error: format!("{}: {}", f.reason.label(), f.detail),
        };
        if let Err(e) = self.storage.write_state(&state) {
            error!(listener = %self.plan.listener, storage = %self.plan.storage.display(), error = %e, "ACME storage not writable: certificates cannot be kept");
        }
        let names = self.plan.domains.join(",");
        let left = serving
            .as_ref()
            .map_or(0, |s| s.cert.not_after - unix_now() as i64);
        // Expiring: less than half the renewal window left.
        let expiring = serving
            .as_ref()
            .is_none_or(|s| left < (s.cert.not_after - s.renew_at) / 2);
        let retry_in_s = wait.as_secs();
        if expiring {
            error!(listener = %self.plan.listener, names = %names, reason = f.reason.label(), error = %f.detail, expires_in_s = left.max(0), retry_in_s, "ACME order failed and the certificate is expiring or missing");
        } else {
            warn!(listener = %self.plan.listener, names = %names, reason = f.reason.label(), error = %f.detail, expires_in_s = left, retry_in_s, "ACME order failed; the current certificate keeps serving");
        }
        // Counted once recorded and logged.
        METRICS
            .acme_failures
            .with_label_values(&[&self.plan.listener, f.reason.label()])
            .inc();
    }
}

/// Whether the gateway's client listeners are bound, once the server says where to look.
static LISTENERS_BOUND: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Tells the managers where the server records that its client listeners are bound: no order
/// is made before, since validation must reach them.
pub fn listeners_bound_at(flag: Arc<AtomicBool>) {
    let _ = LISTENERS_BOUND.set(flag);
}

/// The wait before the next order after `failures` failures in a row: `first`, doubling, up
/// to a day; at least an hour after a rate-limit refusal.
fn backoff(first: Duration, failures: u32, reason: order::Reason) -> Duration {
    let doubled = first.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let wait = doubled.min(MAX_BACKOFF);
    if reason == order::Reason::RateLimited {
        wait.max(RATE_LIMITED_BACKOFF)
    } else {
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn config(domains: &[&str]) -> AcmeConfig {
        AcmeConfig {
            directory: "letsencrypt-staging".into(),
            email: Some("ops@example.com".into()),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            challenge: AcmeChallenge::Http01,
            storage: "acme".into(),
            ca: None,
            renew_before: None,
            retry_interval: Dur::secs(60),
            eab: None,
        }
    }

    #[test]
    fn plans_name_the_field_they_refuse() {
        let plan = compile(
            "https",
            &config(&["Example.COM.", "example.com", "a.example.com"]),
        )
        .unwrap();
        assert_eq!(plan.domains, ["a.example.com", "example.com"]);
        assert_eq!(plan.directory, LETSENCRYPT_STAGING);
        let field = |c: AcmeConfig| compile("https", &c).unwrap_err().0;
        assert_eq!(field(config(&["*.example.com"])), "domains");
        assert_eq!(field(config(&["10.0.0.1"])), "domains");
        assert_eq!(field(config(&["localhost"])), "domains");
        assert_eq!(field(config(&[])), "domains");
        let mut c = config(&["example.com"]);
        c.directory = "http://acme.test/dir".into();
        assert_eq!(field(c), "directory");
        let mut c = config(&["example.com"]);
        c.email = Some("nobody".into());
        assert_eq!(field(c), "email");
        let mut c = config(&["example.com"]);
        c.eab = Some(crate::config::EabConfig {
            kid: "k".into(),
            hmac_key: "not base64!".into(),
        });
        assert_eq!(field(c), "eab.hmac_key");
        let mut c = config(&["example.com"]);
        c.ca = Some("/nonexistent/ca.pem".into());
        assert_eq!(field(c), "ca");
    }

    #[test]
    fn backoff_doubles_to_a_day_and_waits_out_rate_limits() {
        let m = Duration::from_secs(60);
        assert_eq!(backoff(m, 1, order::Reason::Challenge), m);
        assert_eq!(backoff(m, 3, order::Reason::Challenge), m * 4);
        assert_eq!(backoff(m, 40, order::Reason::Challenge), MAX_BACKOFF);
        assert_eq!(
            backoff(m, 1, order::Reason::RateLimited),
            RATE_LIMITED_BACKOFF
        );
    }
}
