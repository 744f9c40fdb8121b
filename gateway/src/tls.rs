//! TLS termination (rustls): certificates chosen by SNI through a custom `ResolvesServerCert`
//! handed to Pingora, reloaded when their files change on disk or when a configuration reload
//! names other files; a broken new pair is refused and the old one keeps serving.
//!
//! Also: client-certificate verification, and `gateway certs`, which makes a local CA and leaf
//! certificates for development.

use crate::config::{CertificateConfig, ClientAuthConfig, TlsConfig};
use arc_swap::ArcSwap;
use pingora::listeners::tls::Acceptor;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tracing::{error, info};

/// The certificates of one listener, by name.
#[derive(Default)]
struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`: matches exactly one more label.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// The first certificate: for clients without SNI or with an unknown name.
    default: Option<Arc<CertifiedKey>>,
    /// What each certificate is, for the metric and the admin views.
    expiries: Vec<CertInfo>,
}

/// A listener's ACME certificate and challenge settings.
#[derive(Default)]
struct AcmeCerts {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// The ACME certificate, for clients without SNI when no file certificate is configured.
    default: Option<Arc<CertifiedKey>>,
    info: Vec<CertInfo>,
    /// Answer TLS-ALPN-01 validation for these names, with the storage folder other
    /// instances publish to.
    tls_alpn: Option<(PathBuf, Vec<String>)>,
    /// The manager that may install certificates here (0: none): one that a reload replaced
    /// or removed cannot put its certificate back.
    owner: u64,
}

/// A file's identity for change detection.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// A listener's certificate store: Pingora's resolver for the listener's whole life; its
/// contents are swapped on reloads.
pub struct CertStore {
    listener: String,
    table: ArcSwap<CertTable>,
    /// Certificates from ACME, served for names no file certificate covers.
    acme: ArcSwap<AcmeCerts>,
    /// The configured pairs and the file stamps they were loaded from.
    source: Mutex<(Vec<CertificateConfig>, Vec<Stamp>)>,
    poll_ms: AtomicU64,
    watching: AtomicBool,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertStore({})", self.listener)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        let acme = self.acme.load();
        let name = hello.server_name().map(str::to_ascii_lowercase);
        if let Some((root, names)) = &acme.tls_alpn {
            if crate::acme::offers_acme_tls(&hello) {
                // Only the listener's own names: any other gets no certificate.
                let name = name.filter(|n| names.contains(n))?;
                return crate::acme::tls_alpn_cert(&name, root);
            }
        }
        if let Some(name) = name {
            // rustls hands over SNI already validated as a DNS name; compare case-insensitively.
            if let Some(c) = table.exact.get(&name) {
                return Some(c.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(c) = table.wildcard.get(parent) {
                    return Some(c.clone());
                }
            }
            if let Some(c) = acme.exact.get(&name) {
                return Some(c.clone());
            }
        }
        table.default.clone().or_else(|| acme.default.clone())
    }
}

/// Reads a certificate chain and its key; checks that they belong together.
/// A certificate or key file that cannot be read; a missing one says how development files
/// are made.
fn missing(path: &str, e: &std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::NotFound {
        return format!("{path}: {e}");
    }
    let dir = Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or(".".into(), |d| d.display().to_string());
    format!(
        "{path}: no such file. For development, `gateway certs --dir {dir} localhost 127.0.0.1` makes a CA and a certificate for localhost"
    )
}

fn load_pair(c: &CertificateConfig) -> Result<(Arc<CertifiedKey>, Vec<String>), String> {
    let cert_path = &c.cert.value;
    let key_path = &c.key.value;
    let certs: Vec<CertificateDer<'static>> = {
        let pem = std::fs::read(cert_path).map_err(|e| missing(cert_path, &e))?;
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{cert_path}: {e}"))?
    };
    if certs.is_empty() {
        return Err(format!("{cert_path}: no certificate in the file"));
    }
    let key: PrivateKeyDer<'static> = {
        let pem = std::fs::read(key_path).map_err(|e| missing(key_path, &e))?;
        rustls_pemfile::private_key(&mut pem.as_slice())
            .map_err(|e| format!("{key_path}: {e}"))?
            .ok_or_else(|| format!("{key_path}: no private key in the file"))?
    };
    let signer = any_supported_type(&key).map_err(|e| format!("{key_path}: {e}"))?;
    let certified = CertifiedKey::new(certs, signer);
    certified
        .keys_match()
        .map_err(|e| format!("{key_path} does not belong to {cert_path}: {e}"))?;
    let names = if c.names.is_empty() {
        san_names(&certified.cert[0]).map_err(|e| format!("{cert_path}: {e}"))?
    } else {
        c.names.iter().map(|n| n.to_ascii_lowercase()).collect()
    };
    Ok((Arc::new(certified), names))
}

/// The DNS names a certificate is for (subjectAltName).
fn san_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// A certificate's `notAfter`, Unix seconds.
/// A served certificate as the admin views show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    /// The names it serves.
    pub names: Vec<String>,
    /// Its issuer's distinguished name.
    pub issuer: String,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
    /// Where it comes from: `file` or `acme`.
    pub source: &'static str,
    /// The certificate file.
    pub file: String,
}

/// A certificate read from ACME storage.
#[derive(Clone)]
pub struct StoredCert {
    pub key: Arc<CertifiedKey>,
    /// Its DNS names, lower case.
    pub names: Vec<String>,
    /// `notBefore` and `notAfter`, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the leaf, to tell certificates apart.
    pub fingerprint: [u8; 32],
    pub info: CertInfo,
}

/// Parses a stored chain and key (PEM); `file` names them in errors and in the admin views.
pub fn stored_cert(chain: &[u8], key: &[u8], file: &str) -> Result<StoredCert, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &chain[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{file}: {e}"))?;
    let Some(leaf) = certs.first().cloned() else {
        return Err(format!("{file}: no certificate in the file"));
    };
    let key = rustls_pemfile::private_key(&mut &key[..])
        .map_err(|e| format!("{file}: key: {e}"))?
        .ok_or_else(|| format!("{file}: no private key"))?;
    let signer = any_supported_type(&key).map_err(|e| format!("{file}: key: {e}"))?;
    let certified = CertifiedKey::new(certs, signer);
    certified
        .keys_match()
        .map_err(|e| format!("{file}: the key does not belong to it: {e}"))?;
    let names = san_names(&leaf).map_err(|e| format!("{file}: {e}"))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| format!("{file}: {e}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(digest.as_ref());
    let mut info = cert_info(&leaf, &names, file).ok_or_else(|| format!("{file}: unreadable"))?;
    info.source = "acme";
    Ok(StoredCert {
        key: Arc::new(certified),
        names,
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        fingerprint,
        info,
    })
}

fn cert_info(cert: &CertificateDer<'_>, names: &[String], file: &str) -> Option<CertInfo> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(CertInfo {
        names: names.to_vec(),
        issuer: parsed.issuer().to_string(),
        not_after: parsed.validity().not_after.timestamp(),
        source: "file",
        file: file.to_string(),
    })
}

/// Every listener's certificates as last installed, for the admin views.
static INVENTORY: std::sync::LazyLock<Mutex<std::collections::BTreeMap<String, Vec<CertInfo>>>> =
    std::sync::LazyLock::new(Default::default);

/// The certificates each TLS listener serves now, by listener name.
pub fn inventory() -> std::collections::BTreeMap<String, Vec<CertInfo>> {
    INVENTORY.lock().map(|i| i.clone()).unwrap_or_default()
}

/// A listener's certificates read and parsed, not yet served: the pure half of a certificate
/// change, made when a configuration is compiled. [`CertStore::install`] is the other half.
pub struct LoadedCerts {
    table: CertTable,
    /// What each certificate is (names, issuer, expiry), for the metric and the admin views.
    expiries: Vec<CertInfo>,
    certs: Vec<CertificateConfig>,
    stamps: Vec<Stamp>,
}

impl LoadedCerts {
    /// Reads and parses `certs`; any unreadable or mismatched pair is an error.
    pub fn load(certs: &[CertificateConfig]) -> Result<LoadedCerts, String> {
        // Stamped before reading: a file replaced while it is read is read again next poll.
        let stamps = certs.iter().flat_map(files).map(|p| stamp(&p)).collect();
        let (table, expiries) = build_table(certs)?;
        Ok(LoadedCerts {
            table,
            expiries,
            certs: certs.to_vec(),
            stamps,
        })
    }
}

fn build_table(certs: &[CertificateConfig]) -> Result<(CertTable, Vec<CertInfo>), String> {
    let mut table = CertTable::default();
    let mut expiries = Vec::new();
    for c in certs {
        let (key, names) = load_pair(c)?;
        expiries.extend(cert_info(&key.cert[0], &names, &c.cert.value));
        for name in names {
            match name.strip_prefix("*.") {
                Some(parent) => table.wildcard.entry(parent.to_string()),
                None => table.exact.entry(name),
            }
            .or_insert_with(|| key.clone());
        }
        table.default.get_or_insert(key);
    }
    table.expiries = expiries.clone();
    Ok((table, expiries))
}

fn record_expiries(listener: &str, files: &[CertInfo], acme: &[CertInfo]) {
    let certs: Vec<CertInfo> = files.iter().chain(acme).cloned().collect();
    let label = |c: &CertInfo| c.names.first().unwrap_or(&c.file).clone();
    // Certificates sharing a first name (a file's and ACME's) share a series: it shows the
    // earliest expiry, so that its alert fires for whichever runs out first.
    let mut earliest: HashMap<String, i64> = HashMap::new();
    for c in &certs {
        let at = earliest.entry(label(c)).or_insert(c.not_after);
        *at = (*at).min(c.not_after);
    }
    let gauge = &crate::metrics::METRICS.cert_expiry;
    if let Ok(mut inventory) = INVENTORY.lock() {
        // A certificate no longer served leaves the metric (else its alert would fire).
        for gone in inventory.get(listener).into_iter().flatten() {
            let name = label(gone);
            if !earliest.contains_key(&name) {
                let _ = gauge.remove_label_values(&[listener, &name]);
            }
        }
        for (name, not_after) in &earliest {
            gauge.with_label_values(&[listener, name]).set(*not_after);
        }
        inventory.insert(listener.to_string(), certs);
    }
}

impl CertStore {
    /// A store serving `loaded` for the listener named `listener`.
    pub fn new(listener: &str, loaded: LoadedCerts, poll: Duration) -> Arc<CertStore> {
        record_expiries(listener, &loaded.expiries, &[]);
        Arc::new(CertStore {
            listener: listener.to_string(),
            table: ArcSwap::from_pointee(loaded.table),
            acme: ArcSwap::from_pointee(AcmeCerts::default()),
            source: Mutex::new((loaded.certs, loaded.stamps)),
            poll_ms: AtomicU64::new(poll.as_millis().max(10) as u64),
            watching: AtomicBool::new(false),
        })
    }

    /// Serves `loaded` from now on (a configuration reload). Cannot fail: everything that can
    /// was done when the certificates were loaded.
    pub fn install(&self, loaded: LoadedCerts) {
        record_expiries(&self.listener, &loaded.expiries, &self.acme.load().info);
        self.table.store(Arc::new(loaded.table));
        if let Ok(mut source) = self.source.lock() {
            *source = (loaded.certs, loaded.stamps);
        }
    }

    /// Reloads when a file changed since the last load. A broken pair is logged and the
    /// certificates in use stay.
    fn reload_if_changed(&self) {
        let (certs, old) = match self.source.lock() {
            Ok(s) => (s.0.clone(), s.1.clone()),
            Err(_) => return,
        };
        let now: Vec<Stamp> = certs.iter().flat_map(files).map(|p| stamp(&p)).collect();
        if now == old {
            return;
        }
        match build_table(&certs) {
            Ok((table, expiries)) => {
                record_expiries(&self.listener, &expiries, &self.acme.load().info);
                self.table.store(Arc::new(table));
                info!(listener = %self.listener, "certificates reloaded");
            }
            Err(e) => {
                error!(listener = %self.listener, error = %e, "new certificates refused; the previous ones keep serving")
            }
        }
        // Remember the stamps either way: a broken file is reported once, not every poll.
        if let Ok(mut source) = self.source.lock() {
            source.1 = now;
        }
    }

    /// Serves `cert` for its names from now on, in place of the previous ACME certificate,
    /// when `owner` is the store's ACME manager; false (nothing changes) otherwise.
    pub fn install_acme(&self, owner: u64, cert: &StoredCert) -> bool {
        let previous = self.acme.rcu(|previous| {
            if previous.owner != owner {
                return Arc::clone(previous);
            }
            Arc::new(AcmeCerts {
                exact: cert
                    .names
                    .iter()
                    .map(|n| (n.clone(), cert.key.clone()))
                    .collect(),
                default: Some(cert.key.clone()),
                info: vec![cert.info.clone()],
                tls_alpn: previous.tls_alpn.clone(),
                owner,
            })
        });
        let installed = previous.owner == owner;
        if installed {
            let files = &self.table.load().expiries;
            record_expiries(&self.listener, files, std::slice::from_ref(&cert.info));
        }
        installed
    }

    /// Makes `owner` the store's ACME manager, answering TLS-ALPN-01 validation for the names
    /// and storage folder in `tls_alpn` (`None`: HTTP-01). The certificate in use serves until
    /// the new manager installs one.
    pub fn set_acme_owner(&self, owner: u64, tls_alpn: Option<(PathBuf, Vec<String>)>) {
        self.acme.rcu(|previous| AcmeCerts {
            exact: previous.exact.clone(),
            default: previous.default.clone(),
            info: previous.info.clone(),
            tls_alpn: tls_alpn.clone(),
            owner,
        });
    }

    /// Stops serving ACME certificates (the listener no longer has `acme`); no manager may
    /// install one after this.
    pub fn clear_acme(&self) {
        let previous = self.acme.swap(Arc::new(AcmeCerts::default()));
        if previous.default.is_some() {
            record_expiries(&self.listener, &self.table.load().expiries, &[]);
        }
    }

    /// How often the files are checked from now on.
    pub fn set_poll_interval(&self, every: Duration) {
        self.poll_ms
            .store(every.as_millis().max(10) as u64, Ordering::Relaxed);
    }

    /// Starts polling the certificate files, once. Runs on the control-plane runtime; ends
    /// when the store is dropped.
    pub fn spawn_watch(self: &Arc<Self>) {
        if self.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<CertStore> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let every = match weak.upgrade() {
                    Some(store) => Duration::from_millis(store.poll_ms.load(Ordering::Relaxed)),
                    None => return,
                };
                tokio::time::sleep(every).await;
                let Some(store) = weak.upgrade() else { return };
                store.reload_if_changed();
            }
        });
    }
}

fn files(c: &CertificateConfig) -> [PathBuf; 2] {
    [PathBuf::from(&c.cert.value), PathBuf::from(&c.key.value)]
}

/// The TLS acceptor of a listener: TLS 1.2 and 1.3 with rustls's modern cipher suites (as
/// Pingora's own settings), certificates from `store`, the client-certificate policy, and ALPN
/// h2 + http/1.1 (or http/1.1 alone) with `acme-tls/1` last, for ACME validation.
pub fn acceptor(store: Arc<CertStore>, tls: &TlsConfig) -> Result<Acceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| format!("TLS settings: {e}"))?;
    let builder = match &tls.client_auth {
        Some(client) => builder.with_client_cert_verifier(client_verifier(client)?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(store);
    config.alpn_protocols = if tls.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    config
        .alpn_protocols
        .push(crate::acme::ACME_TLS_ALPN.to_vec());
    Ok(Acceptor::from_server_config(Arc::new(config)))
}

fn client_verifier(
    c: &ClientAuthConfig,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let pem = std::fs::read(&c.ca).map_err(|e| format!("client_auth.ca {}: {e}", c.ca))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("client_auth.ca {}: {e}", c.ca))?;
        roots
            .add(cert)
            .map_err(|e| format!("client_auth.ca {}: {e}", c.ca))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "client_auth.ca {}: no certificate in the file",
            c.ca
        ));
    }
    let builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    );
    let builder = if c.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().map_err(|e| format!("client_auth: {e}"))
}

/// The CA certificates of a PEM file, as Pingora's connector wants them (each one parsed, so
/// a bad file is an error here rather than a panic later), and a fingerprint of the set.
pub fn load_ca(path: &str) -> Result<(Arc<pingora::protocols::tls::CaType>, u64), String> {
    let pem = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let fingerprint = crate::hash::value(&pem);
    let mut certs = Vec::new();
    for der in rustls_pemfile::certs(&mut pem.as_slice()) {
        let der = der.map_err(|e| format!("{path}: {e}"))?;
        x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("{path}: not an X.509 certificate: {e}"))?;
        certs.push(pingora::utils::tls::WrappedX509::new(
            der.as_ref().to_vec(),
            pingora::utils::tls::parse_x509,
        ));
    }
    if certs.is_empty() {
        return Err(format!("{path}: no certificate in the file"));
    }
    Ok((Arc::from(certs.into_boxed_slice()), fingerprint))
}

/// Compiles a listener's TLS section without serving: every pair loads, the client CA reads.
pub fn load(tls: &TlsConfig) -> Result<LoadedCerts, String> {
    if tls.certificates.is_empty() && tls.acme.is_none() {
        return Err("certificates: at least one is needed, or `acme`".into());
    }
    let loaded = LoadedCerts::load(&tls.certificates)?;
    if let Some(c) = &tls.client_auth {
        client_verifier(c)?;
    }
    Ok(loaded)
}

/// Writes a development CA (`ca.pem`, `ca-key.pem`) and a leaf certificate for `names`
/// (`NAME.pem`, `NAME-key.pem`, NAME being the first name) into `dir`. An existing CA in `dir`
/// is reused, so several leaves share one CA.
pub fn make_dev_certs(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca-key.pem");
    let write = |path: &Path, text: &str, private: bool| -> Result<(), String> {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "gateway development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.serial_number = Some(positive_serial()?);
    let (ca_key, ca_cert) = if ca_cert_path.is_file() && ca_key_path.is_file() {
        // Same name and key as the CA on disk: leaves signed now chain to that ca.pem.
        let key_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| e.to_string())?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| format!("ca-key.pem: {e}"))?;
        let cert = ca_params.self_signed(&key).map_err(|e| e.to_string())?;
        (key, cert)
    } else {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = ca_params.self_signed(&key).map_err(|e| e.to_string())?;
        write(&ca_cert_path, &cert.pem(), false)?;
        write(&ca_key_path, &key.serialize_pem(), true)?;
        (key, cert)
    };
    let first = names.first().ok_or("at least one name is needed")?;
    let mut leaf = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    leaf.distinguished_name
        .push(DnType::CommonName, first.as_str());
    // Browsers and Mozilla's TLS guidelines cap server certificates at 398/366 days; run the
    // command again to renew (the CA stays).
    let now = time::OffsetDateTime::now_utc();
    leaf.not_before = now - time::Duration::days(1);
    leaf.not_after = now + time::Duration::days(365);
    // What WebPKI validators (browsers, curl, sslyze) expect of a leaf.
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.serial_number = Some(positive_serial()?);
    let leaf_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .map_err(|e| e.to_string())?;
    let stem = first.replace('*', "wildcard");
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}-key.pem"));
    write(&cert_path, &leaf_cert.pem(), false)?;
    write(&key_path, &leaf_key.serialize_pem(), true)?;
    Ok(vec![ca_cert_path, cert_path, key_path])
}

/// A random 16-byte serial number, positive as RFC 5280 requires.
fn positive_serial() -> Result<rcgen::SerialNumber, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness for a serial number".to_string())?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str, not_after: i64, source: &'static str) -> CertInfo {
        CertInfo {
            names: vec![name.to_string()],
            issuer: String::new(),
            not_after,
            source,
            file: format!("{name}.pem"),
        }
    }

    /// The series' value, if it exists.
    fn expiry(listener: &str, name: &str) -> Option<i64> {
        use prometheus::core::Collector;
        let families = crate::metrics::METRICS.cert_expiry.collect();
        let m = families.first()?.get_metric().iter().find(|m| {
            let labels = m.get_label();
            let has = |k: &str, v: &str| labels.iter().any(|l| l.name() == k && l.value() == v);
            has("listener", listener) && has("name", name)
        })?;
        Some(m.get_gauge().get_value() as i64)
    }

    #[test]
    fn certificates_sharing_a_name_show_the_earliest_expiry_and_leave_with_it() {
        let listener = "unit-expiry";
        let file = cert("shop.test", 1_000, "file");
        let acme = cert("shop.test", 2_000, "acme");
        record_expiries(listener, &[file], std::slice::from_ref(&acme));
        assert_eq!(expiry(listener, "shop.test"), Some(1_000));
        // The same the other way round: the order of the sources does not decide.
        record_expiries(listener, &[cert("shop.test", 3_000, "file")], &[acme]);
        assert_eq!(expiry(listener, "shop.test"), Some(2_000));
        record_expiries(listener, &[], &[cert("other.test", 5_000, "acme")]);
        assert_eq!(expiry(listener, "shop.test"), None);
        assert_eq!(expiry(listener, "other.test"), Some(5_000));
    }
}
