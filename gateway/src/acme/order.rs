//! One ACME order, from account to certificate chain, with instant-acme.

use super::challenge::{self, Published};
use super::storage::Storage;
use super::AcmePlan;
use crate::config::AcmeChallenge;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use std::time::Duration;

/// Why an order failed: a metric label each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The directory or the account could not be had.
    Account,
    /// The server refused for its rate limits.
    RateLimited,
    /// The server refused the order.
    Order,
    /// A challenge was not validated.
    Challenge,
    /// Finalization or the certificate's download failed.
    Finalize,
    /// The storage folder could not be read or written.
    Storage,
    /// The order took longer than allowed.
    Timeout,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 7] = [
        Reason::Account,
        Reason::RateLimited,
        Reason::Order,
        Reason::Challenge,
        Reason::Finalize,
        Reason::Storage,
        Reason::Timeout,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Account => "account",
            Reason::RateLimited => "rate_limited",
            Reason::Order => "order",
            Reason::Challenge => "challenge",
            Reason::Finalize => "finalize",
            Reason::Storage => "storage",
            Reason::Timeout => "timeout",
        }
    }
}

/// A failed order.
#[derive(Debug)]
pub struct Failure {
    pub reason: Reason,
    pub detail: String,
}

impl Failure {
    pub fn new(reason: Reason, detail: impl std::fmt::Display) -> Failure {
        Failure {
            reason,
            detail: detail.to_string(),
        }
    }

    /// The storage folder could not be read or written.
    pub fn storage(e: std::io::Error) -> Failure {
        Failure::new(Reason::Storage, e)
    }

    /// An instant-acme error in a step that fails for `reason`, unless the server said it
    /// was its rate limit.
    fn acme(reason: Reason, e: instant_acme::Error) -> Failure {
        let reason = match &e {
            instant_acme::Error::Api(p)
                if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:rateLimited") =>
            {
                Reason::RateLimited
            }
            instant_acme::Error::Timeout(_) => Reason::Timeout,
            _ => reason,
        };
        Failure::new(reason, e)
    }
}

/// A new certificate: chain and private key, PEM.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// How long the server may take to validate, and to issue.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));

/// Orders a certificate for `plan.domains`, answering the challenges while it is validated.
pub async fn obtain(plan: &AcmePlan, storage: &Storage) -> Result<Issued, Failure> {
    let identifiers: Vec<Identifier> = plan
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let new_order = NewOrder::new(&identifiers);
    let mut order = match account(plan, storage).await?.new_order(&new_order).await {
        // The server no longer knows the stored account (its database was reset): a new one.
        Err(instant_acme::Error::Api(p))
            if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
        {
            tracing::warn!(listener = %plan.listener, "the ACME server no longer knows the stored account: a new one is made");
            storage
                .remove_account()
                .map_err(Failure::storage)?;
            account(plan, storage).await?.new_order(&new_order).await
        }
        other => other,
    }
    .map_err(|e| Failure::acme(Reason::Order, e))?;
    // Answers stay published until the order is done, then are withdrawn (dropped).
    let mut published: Vec<Published> = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| Failure::acme(Reason::Order, e))?;
        match authz.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => {
                return Err(Failure::new(
                    Reason::Challenge,
                    format!("authorization for {} is {other:?}", authz.identifier()),
                ))
            }
        }
        let kind = match plan.challenge {
            AcmeChallenge::Http01 => ChallengeType::Http01,
            AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        let name = authz.identifier().to_string();
        let mut ch = authz.challenge(kind.clone()).ok_or_else(|| {
            Failure::new(
                Reason::Challenge,
                format!("the server offers no {kind:?} challenge for {name}"),
            )
        })?;
        let key_auth = ch.key_authorization();
        let answer = match plan.challenge {
            AcmeChallenge::Http01 => {
                challenge::publish_http01(storage.root(), &ch.token, key_auth.as_str())
            }
            AcmeChallenge::TlsAlpn01 => {
                challenge::publish_tls_alpn01(storage.root(), &name, key_auth.as_str())
            }
        };
        published.push(answer.map_err(Failure::storage)?);
        ch.set_ready()
            .await
            .map_err(|e| Failure::acme(Reason::Challenge, e))?;
    }
    match order.poll_ready(&POLL).await {
        Ok(OrderStatus::Ready) => {}
        Ok(status) => {
            let mut why = vec![order
                .state()
                .error
                .as_ref()
                .map_or_else(|| format!("order is {status:?}"), |p| p.to_string())];
            why.extend(challenge_errors(&mut order).await);
            return Err(Failure::new(Reason::Challenge, why.join("; ")));
        }
        Err(e) => return Err(Failure::acme(Reason::Challenge, e)),
    }
    drop(published);
    let (csr, key_pem) = csr(&plan.domains).map_err(|e| Failure::new(Reason::Finalize, e))?;
    order
        .finalize_csr(&csr)
        .await
        .map_err(|e| Failure::acme(Reason::Finalize, e))?;
    let chain_pem = order
        .poll_certificate(&POLL)
        .await
        .map_err(|e| Failure::acme(Reason::Finalize, e))?;
    Ok(Issued { chain_pem, key_pem })
}

/// What the server said of each failed challenge (the cause: connection refused, wrong
/// answer, no DNS record).
async fn challenge_errors(order: &mut instant_acme::Order) -> Vec<String> {
    let mut out = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if authz.refresh().await.is_err() {
            continue;
        }
        let name = authz.identifier().to_string();
        for c in &authz.challenges {
            if let Some(e) = &c.error {
                out.push(format!("{name}: {e}"));
            }
        }
    }
    out
}

/// The stored account, or a new one (stored at once).
async fn account(plan: &AcmePlan, storage: &Storage) -> Result<Account, Failure> {
    let builder = || match &plan.ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let builder = builder().map_err(|e| Failure::acme(Reason::Account, e))?;
    if let Some(json) = storage.read_account() {
        if let Ok(credentials) = serde_json::from_slice::<AccountCredentials>(&json) {
            return builder
                .from_credentials(credentials)
                .await
                .map_err(|e| Failure::acme(Reason::Account, e));
        }
        tracing::warn!(listener = %plan.listener, "stored ACME account unreadable: a new one is made");
    }
    let contact: Vec<String> = plan.email.iter().map(|e| format!("mailto:{e}")).collect();
    let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
    let eab = plan
        .eab
        .as_ref()
        .map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
    let (account, credentials) = builder
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            plan.directory.clone(),
            eab.as_ref(),
        )
        .await
        .map_err(|e| Failure::acme(Reason::Account, e))?;
    let json = serde_json::to_vec(&credentials).map_err(|e| Failure::new(Reason::Storage, e))?;
    storage.write_account(&json).map_err(Failure::storage)?;
    Ok(account)
}

/// A new ECDSA P-256 key and a CSR for `names`; the key as PEM.
fn csr(names: &[String]) -> Result<(Vec<u8>, String), rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let key = rcgen::KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}
