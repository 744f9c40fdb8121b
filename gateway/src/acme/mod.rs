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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// A listener's ACME certificate, kept and renewed while the manager lives.
pub struct Manager {
    work: Arc<Work>,
    stop: Arc<Notify>,
    started: AtomicBool,
}

/// What the manager's task works with.
struct Work {
    plan: AcmePlan,
    store: Arc<CertStore>,
    storage: Storage,
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
        let storage = Storage::new(&plan.storage, &plan.directory, &plan.domains);
        store.set_acme_challenge(
            (plan.challenge == AcmeChallenge::TlsAlpn01).then(|| plan.storage.clone()),
        );
        Arc::new(Manager {
            work: Arc::new(Work {
                plan,
                store,
                storage,
            }),
            stop: Arc::new(Notify::new()),
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
        let serving = self.work.pick_up(None);
        if serving.is_none() {
            info!(listener = %listener, names = %plan.domains.join(","), directory = %plan.directory, "no stored ACME certificate: ordering one");
        }
        tokio::spawn(run(self.work.clone(), self.stop.clone(), serving));
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        // Wakes the task, which ends (a stored permit if it is busy ordering).
        self.stop.notify_one();
    }
}

/// The manager's task: wait for the renewal time, order (or pick up what another instance
/// ordered), back off after failures.
async fn run(work: Arc<Work>, stop: Arc<Notify>, mut serving: Option<Serving>) {
    let wait = |d: Duration| {
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = tokio::time::sleep(d) => true,
                _ = stop.notified() => false,
            }
        }
    };
    loop {
        let now = unix_now() as i64;
        if let Some(s) = &serving {
            if now < s.renew_at {
                if !wait(secs(s.renew_at - now)).await {
                    return;
                }
                continue;
            }
        }
        let state = work.storage.read_state();
        if state.next_attempt as i64 > now {
            if !wait(secs(state.next_attempt as i64 - now)).await {
                return;
            }
            serving = work.pick_up(serving);
            continue;
        }
        let lock = match work.storage.try_lock() {
            Ok(lock) => lock,
            Err(e) => {
                work.failed(&serving, &Failure::storage(e), work.plan.retry);
                if !wait(work.plan.retry).await {
                    return;
                }
                continue;
            }
        };
        let Some(lock) = lock else {
            // Another instance is ordering: its result appears in the folder.
            if !wait(LOCK_POLL).await {
                return;
            }
            serving = work.pick_up(serving);
            continue;
        };
        // Under the lock: another instance may have just stored a certificate or a failure.
        let before = serving.as_ref().map(|s| s.cert.fingerprint);
        serving = work.pick_up(serving);
        let renewed = serving.as_ref().map(|s| s.cert.fingerprint) != before;
        if renewed || work.storage.read_state().next_attempt as i64 > now {
            continue;
        }
        serving = work.order(serving).await;
        drop(lock);
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(1) as u64)
}

impl Failure {
    fn storage(e: std::io::Error) -> Failure {
        Failure {
            reason: order::Reason::Storage,
            detail: e.to_string(),
        }
    }
}

impl Work {
    /// Serves the stored certificate when it is valid for the configured names and is not
    /// the one served already; returns what is served now.
    fn pick_up(&self, serving: Option<Serving>) -> Option<Serving> {
        let (chain, key) = self.storage.read_cert()?;
        let path = self.storage.cert_path().display().to_string();
        let cert = match crate::tls::stored_cert(&chain, &key, &path) {
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
        let covers = self.plan.domains.iter().all(|d| cert.names.contains(d));
        if !covers || cert.not_after <= unix_now() as i64 {
            return serving;
        }
        let renew_at = self.renew_at(&cert);
        info!(listener = %self.plan.listener, names = %cert.names.join(","), not_after = cert.not_after, "ACME certificate served from storage");
        self.store.install_acme(&cert);
        Some(Serving { cert, renew_at })
    }

    /// When to renew `cert`: `renew_before` (else a third of its lifetime) before it
    /// expires, less a random part of up to a thirtieth of its lifetime (at most an hour), so
    /// that instances and names do not all renew at once.
    fn renew_at(&self, cert: &StoredCert) -> i64 {
        let lifetime = (cert.not_after - cert.not_before).max(1);
        let before = self
            .plan
            .renew_before
            .map_or(lifetime / 3, |d| d.as_secs() as i64);
        let jitter = fastrand::i64(0..=(lifetime / 30).min(3600));
        cert.not_after - before - jitter
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
                Err(_) => Err(Failure {
                    reason: order::Reason::Timeout,
                    detail: format!("no certificate within {}s", ORDER_LIMIT.as_secs()),
                }),
            };
        let issued = result.and_then(|issued| {
            self.storage
                .write_cert(&issued.chain_pem, &issued.key_pem)
                .map_err(Failure::storage)
        });
        let labels = [self.plan.listener.as_str(), kind];
        if let Err(f) = issued {
            METRICS
                .acme_orders
                .with_label_values(&[labels[0], labels[1], "failed"])
                .inc();
            let state = self.storage.read_state();
            let wait = backoff(self.plan.retry, state.failures + 1, f.reason);
            self.failed(&serving, &f, wait);
            let _ = self.storage.write_state(&storage::OrderState {
                failures: state.failures + 1,
                next_attempt: unix_now() + wait.as_secs(),
                last_error: format!("{}: {}", f.reason.label(), f.detail),
            });
            return serving;
        }
        METRICS
            .acme_orders
            .with_label_values(&[labels[0], labels[1], "issued"])
            .inc();
        let _ = self.storage.write_state(&storage::OrderState::default());
        let now_serving = self.pick_up(serving.clone());
        match &now_serving {
            Some(s) => {
                info!(listener = %self.plan.listener, names = %self.plan.domains.join(","), kind, not_after = s.cert.not_after, took_ms = started.elapsed().as_millis() as u64, "ACME certificate issued")
            }
            None => {
                error!(listener = %self.plan.listener, names = %self.plan.domains.join(","), "ACME certificate issued but not usable for the configured names")
            }
        }
        now_serving.or(serving)
    }

    /// Counts and logs a failure: ERROR when nothing valid is left to serve soon, else WARN.
    fn failed(&self, serving: &Option<Serving>, f: &Failure, retry_in: Duration) {
        METRICS
            .acme_failures
            .with_label_values(&[&self.plan.listener, f.reason.label()])
            .inc();
        let names = self.plan.domains.join(",");
        let left = serving
            .as_ref()
            .map_or(0, |s| s.cert.not_after - unix_now() as i64);
        // Expiring: less than half the renewal window left.
        let expiring = serving
            .as_ref()
            .is_none_or(|s| left < (s.cert.not_after - s.renew_at) / 2);
        let retry_in_s = retry_in.as_secs();
        if expiring {
            error!(listener = %self.plan.listener, names = %names, reason = f.reason.label(), error = %f.detail, expires_in_s = left.max(0), retry_in_s, "ACME order failed and the certificate is expiring or missing");
        } else {
            warn!(listener = %self.plan.listener, names = %names, reason = f.reason.label(), error = %f.detail, expires_in_s = left, retry_in_s, "ACME order failed; the current certificate keeps serving");
        }
    }
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
        assert_eq!(plan.domains, ["example.com", "a.example.com"]);
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
