//! Answers to the ACME server's challenges. The instance that orders keeps them in memory and
//! writes them to the storage folder, so that any instance sharing it can answer the
//! validation that reaches it.
//!
//! - HTTP-01: `GET /.well-known/acme-challenge/<token>` answers the key authorization.
//! - TLS-ALPN-01: a handshake offering ALPN `acme-tls/1` gets a self-signed certificate for
//!   the name carrying the key authorization's digest (RFC 8737); the connection then closes.

use super::storage;
use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, RwLock};

/// The ALPN protocol of TLS-ALPN-01 validation.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The path prefix of HTTP-01 validation.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// HTTP-01 key authorizations by token.
static HTTP01: LazyLock<RwLock<HashMap<String, Bytes>>> = LazyLock::new(Default::default);

/// TLS-ALPN-01 certificates by name.
static TLS_ALPN: LazyLock<RwLock<HashMap<String, Arc<CertifiedKey>>>> =
    LazyLock::new(Default::default);

/// A challenge answer published while an order is validated; withdrawn when dropped.
pub struct Published {
    root: PathBuf,
    kind: Kind,
}

enum Kind {
    Http01(String),
    TlsAlpn01(String),
}

/// Publishes the HTTP-01 answer for `token`.
pub fn publish_http01(root: &Path, token: &str, key_auth: &str) -> std::io::Result<Published> {
    let path = storage::http01_path(root, token)
        .ok_or_else(|| std::io::Error::other(format!("token `{token}` is not base64url")))?;
    storage::write_atomic(&path, key_auth.as_bytes())?;
    if let Ok(mut map) = HTTP01.write() {
        map.insert(token.to_string(), Bytes::from(key_auth.to_string()));
    }
    Ok(Published {
        root: root.to_path_buf(),
        kind: Kind::Http01(token.to_string()),
    })
}

/// Publishes the TLS-ALPN-01 certificate for `name`.
pub fn publish_tls_alpn01(root: &Path, name: &str, key_auth: &str) -> std::io::Result<Published> {
    let cert = challenge_cert(name, key_auth).map_err(std::io::Error::other)?;
    storage::write_atomic(&storage::tls_alpn_path(root, name), key_auth.as_bytes())?;
    if let Ok(mut map) = TLS_ALPN.write() {
        map.insert(name.to_string(), cert);
    }
    Ok(Published {
        root: root.to_path_buf(),
        kind: Kind::TlsAlpn01(name.to_string()),
    })
}

impl Drop for Published {
    fn drop(&mut self) {
        let path = match &self.kind {
            Kind::Http01(token) => {
                if let Ok(mut map) = HTTP01.write() {
                    map.remove(token);
                }
                storage::http01_path(&self.root, token)
            }
            Kind::TlsAlpn01(name) => {
                if let Ok(mut map) = TLS_ALPN.write() {
                    map.remove(name);
                }
                Some(storage::tls_alpn_path(&self.root, name))
            }
        };
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The key authorization for an HTTP-01 `token`: this instance's, else one another instance
/// sharing a storage folder in `roots` published.
pub async fn http01_answer(roots: &[PathBuf], token: &str) -> Option<Bytes> {
    if let Some(answer) = HTTP01.read().ok().and_then(|m| m.get(token).cloned()) {
        return Some(answer);
    }
    for root in roots {
        let path = storage::http01_path(root, token)?;
        if let Ok(bytes) = tokio::fs::read(&path).await {
            return Some(Bytes::from(bytes));
        }
    }
    None
}

/// Whether a ClientHello offers `acme-tls/1`.
pub fn offers_acme_tls(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN))
}

/// What other instances published, by name: when the folder was last read, and the
/// challenge certificate made from what it held (with that key authorization), if anything.
/// The folder is read at most once a second a name, and one key pair is made per challenge.
static PICKED_UP: LazyLock<RwLock<HashMap<String, PickedUp>>> = LazyLock::new(Default::default);

/// A read of the folder for one name.
#[derive(Clone)]
struct PickedUp {
    read_at: std::time::Instant,
    made: Option<(String, Arc<CertifiedKey>)>,
}

/// How long a read of the folder is used before the folder is read again.
const REREAD: std::time::Duration = std::time::Duration::from_secs(1);

/// The TLS-ALPN-01 certificate for `name` (one of the listener's ACME names): this
/// instance's, else made from what another instance published in `root`. Only handshakes
/// offering `acme-tls/1` for the listener's own names get here; the small file is read at
/// most once a second a name.
pub fn tls_alpn_cert(name: &str, root: &Path) -> Option<Arc<CertifiedKey>> {
    if let Some(cert) = TLS_ALPN.read().ok().and_then(|m| m.get(name).cloned()) {
        return Some(cert);
    }
    let previous = PICKED_UP.read().ok().and_then(|m| m.get(name).cloned());
    if let Some(p) = previous.as_ref().filter(|p| p.read_at.elapsed() < REREAD) {
        return p.made.as_ref().map(|(_, cert)| cert.clone());
    }
    let key_auth = std::fs::read_to_string(storage::tls_alpn_path(root, name)).ok();
    let made = key_auth.and_then(|k| {
        let k = k.trim().to_string();
        let same = previous
            .and_then(|p| p.made)
            .filter(|(made_for, _)| *made_for == k);
        same.or_else(|| challenge_cert(name, &k).ok().map(|cert| (k, cert)))
    });
    if let Ok(mut m) = PICKED_UP.write() {
        let read_at = std::time::Instant::now();
        let made = made.clone();
        m.insert(name.to_string(), PickedUp { read_at, made });
    }
    made.map(|(_, cert)| cert)
}

/// A self-signed certificate for `name` with the `acmeIdentifier` extension holding the
/// SHA-256 digest of `key_auth`.
fn challenge_cert(name: &str, key_auth: &str) -> Result<Arc<CertifiedKey>, String> {
    let digest = ring::digest::digest(&ring::digest::SHA256, key_auth.as_bytes());
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(cert.der().to_vec())],
        signer,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_are_found_in_memory_then_in_storage_and_withdrawn() {
        let dir = tempfile::tempdir().unwrap();
        let roots = vec![dir.path().to_path_buf()];
        let published = publish_http01(dir.path(), "tok-1", "tok-1.thumb").unwrap();
        assert_eq!(
            http01_answer(&roots, "tok-1").await.as_deref(),
            Some(&b"tok-1.thumb"[..])
        );
        // What another instance published reaches this one through the folder.
        storage::write_atomic(
            &storage::http01_path(dir.path(), "tok-2").unwrap(),
            b"tok-2.thumb",
        )
        .unwrap();
        assert_eq!(
            http01_answer(&roots, "tok-2").await.as_deref(),
            Some(&b"tok-2.thumb"[..])
        );
        assert_eq!(http01_answer(&roots, "../lock").await, None);
        drop(published);
        assert_eq!(http01_answer(&roots, "tok-1").await, None);

        let published = publish_tls_alpn01(dir.path(), "a.test", "k.a").unwrap();
        let cert = tls_alpn_cert("a.test", Path::new("/nonexistent")).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.cert[0].as_ref()).unwrap();
        // id-pe-acmeIdentifier, critical, holding the digest.
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(ext.critical);
        let digest = ring::digest::digest(&ring::digest::SHA256, b"k.a");
        assert!(ext.value.ends_with(digest.as_ref()));
        drop(published);
        assert!(tls_alpn_cert("a.test", dir.path()).is_none());
    }
}
