//! `listeners` and `admin`: where the gateway listens, and TLS.

use super::*;
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

/// A client-facing listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `IP:PORT` to bind.
    pub address: Spanned<Addr>,
    /// Bytes of read buffer per client connection, held for the connection's life.
    /// Default 4096: Pingora's own 65536 cost 64 KiB per idle keep-alive connection; 16 KiB
    /// saves a few reads on large uploads over TLS, for no CPU time measured
    /// (`bench/README.md`).
    #[serde(default = "default_read_buffer")]
    pub read_buffer: usize,
    /// Terminate TLS on this listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Answer every request on this (plain) listener with a 308 to `https://` on this port.
    #[serde(default)]
    pub redirect_https: Option<u16>,
    /// Named policies (`policies:`) run for every request on this listener, before routing.
    #[serde(default)]
    pub policies: Vec<Spanned<String>>,
    /// Bodies of the answers the gateway makes itself on this listener, by status (a route's
    /// own pages come first).
    #[serde(default)]
    pub error_pages: BTreeMap<u16, Spanned<ErrorPageConfig>>,
}

/// TLS on a listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate/key pairs; the first is also the default (no SNI, unknown name). May be
    /// empty when `acme` is set.
    #[serde(default)]
    pub certificates: Vec<CertificateConfig>,
    /// Certificates obtained and renewed from an ACME server (RFC 8555).
    #[serde(default)]
    pub acme: Option<Spanned<AcmeConfig>>,
    /// Offer HTTP/2 in ALPN. Default true.
    #[serde(default = "yes")]
    pub http2: bool,
    /// `Strict-Transport-Security` value added to responses on this listener
    /// (e.g. `max-age=31536000; includeSubDomains`). None: not sent.
    #[serde(default)]
    pub hsts: Option<String>,
    /// Ask clients for certificates signed by a CA.
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
    /// How often the certificate files are checked for changes. Default 2s.
    #[serde(default = "default_cert_poll")]
    pub reload_interval: Dur,
}

fn default_cert_poll() -> Dur {
    Dur::secs(2)
}

/// A certificate chain and its private key (PEM files).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Certificate chain, leaf first.
    pub cert: Spanned<String>,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Spanned<String>,
    /// Server names it answers for. Default: the certificate's DNS subjectAltNames
    /// (`*.example.com` covers one label).
    #[serde(default)]
    pub names: Vec<String>,
}

/// Certificates from an ACME server for a TLS listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// `letsencrypt`, `letsencrypt-staging`, or the directory URL of any ACME server.
    /// Default `letsencrypt`.
    #[serde(default = "default_acme_directory")]
    pub directory: String,
    /// Contact address given to the ACME server for its expiry and policy notices.
    #[serde(default)]
    pub email: Option<String>,
    /// The names the certificate is for (one certificate for all of them).
    pub domains: Vec<String>,
    /// How names are proven: `tls-alpn-01` (on this listener) or `http-01` (on the plain
    /// listeners). Default `tls-alpn-01`.
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// Folder for the account key, certificates and the lock shared by gateway instances.
    /// Default `acme`.
    #[serde(default = "default_acme_storage")]
    pub storage: String,
    /// PEM file of the root the ACME server's own HTTPS certificate chains to, for a private
    /// ACME server. Default: the system's roots.
    #[serde(default)]
    pub ca: Option<String>,
    /// Renew when this much of the certificate's lifetime is left. Default: a third of it.
    #[serde(default)]
    pub renew_before: Option<Dur>,
    /// The first wait after a failed order; each further failure doubles it, up to a day.
    /// Default 1m.
    #[serde(default = "default_acme_retry")]
    pub retry_interval: Dur,
    /// External account binding, for ACME servers that require one.
    #[serde(default)]
    pub eab: Option<EabConfig>,
}

/// The ACME challenge a listener answers.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// A certificate made for the challenge, in the TLS handshake (ALPN `acme-tls/1`).
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// `/.well-known/acme-challenge/` on the plain listeners.
    #[serde(rename = "http-01")]
    Http01,
}

/// External account binding (RFC 8555 §7.3.4).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EabConfig {
    /// The key identifier the provider gave.
    pub kid: String,
    /// The MAC key the provider gave, base64url. Write it as `${VAR}`.
    pub hmac_key: String,
}

fn default_acme_directory() -> String {
    "letsencrypt".to_string()
}

fn default_acme_storage() -> String {
    "acme".to_string()
}

fn default_acme_retry() -> Dur {
    Dur::secs(60)
}

/// Client certificates.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// PEM file of the CAs client certificates must chain to.
    pub ca: String,
    /// Refuse clients without a certificate. Default true; false makes it optional (a
    /// certificate that is presented must still verify).
    #[serde(default = "yes")]
    pub required: bool,
}

fn default_read_buffer() -> usize {
    4 * 1024
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:PORT` to bind; keep it on loopback or an internal network.
    pub address: Spanned<Addr>,
    /// A bearer token the JSON views (`/routes`, `/upstreams`, `/certificates`,
    /// `/dashboard/state`) require. Default: none (open). Write it as `${VAR}`.
    #[serde(default)]
    pub token: Option<Spanned<String>>,
}
