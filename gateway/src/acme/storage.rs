//! The ACME storage folder, shared by every gateway instance that names it:
//!
//! ```text
//! <storage>/lock                                   held (flock) by the instance ordering
//! <storage>/accounts/<server>.json                 account key and URL (0600)
//! <storage>/certificates/<server>/<name>-<hash>/   certificate.pem (chain and key, 0600),
//!                                                  state.json
//! <storage>/challenges/http-01/<token>             key authorizations being validated
//! <storage>/challenges/tls-alpn-01/<name>
//! ```
//!
//! `<server>` is the directory's host and a hash of its URL, so that staging and production
//! certificates never mix. Every file is written whole to a temporary name and renamed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One certificate's place in the storage folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    root: PathBuf,
    /// `accounts/<server>.json`.
    account: PathBuf,
    /// `certificates/<server>/<name>`.
    cert_dir: PathBuf,
}

/// Failures of the last orders, shared by the instances: when the next may be made.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderState {
    /// Orders failed in a row.
    pub failures: u32,
    /// Unix seconds before which no order is made.
    pub next_attempt: u64,
    /// The last failure, for people reading the folder.
    #[serde(default)]
    pub last_error: String,
}

/// The storage lock, held while it lives.
pub struct Lock(#[allow(dead_code)] std::fs::File);

impl Storage {
    /// The place of the certificate for `names` from the server at `directory`.
    pub fn new(root: &Path, directory: &str, names: &[String]) -> Storage {
        let hash = short_hash(directory);
        let host = directory
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', ':']).next())
            .unwrap_or("server");
        let server = format!("{}-{hash}", safe(host));
        // One folder per set of names (in any order): lists that share a first name do not
        // share a certificate, and the failures of one list do not hold back a corrected one.
        let mut set: Vec<&str> = names.iter().map(String::as_str).collect();
        set.sort_unstable();
        let first = set.first().copied().unwrap_or("certificate");
        let cert_dir = format!("{}-{}", safe(first), short_hash(&set.join(",")));
        Storage {
            root: root.to_path_buf(),
            account: root.join("accounts").join(format!("{server}.json")),
            cert_dir: root.join("certificates").join(server).join(cert_dir),
        }
    }

    /// The storage folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The stored certificate's path: its chain and key in one PEM file, so that one rename
    /// replaces both and a reader never sees a chain with another's key.
    pub fn cert_path(&self) -> PathBuf {
        self.cert_dir.join("certificate.pem")
    }

    /// The stored chain and key, PEM.
    pub fn read_cert(&self) -> Option<Vec<u8>> {
        std::fs::read(self.cert_path()).ok()
    }

    /// Stores a new certificate.
    pub fn write_cert(&self, chain_pem: &str, key_pem: &str) -> std::io::Result<()> {
        let bundle = format!("{}\n{key_pem}", chain_pem.trim_end());
        write_atomic(&self.cert_path(), bundle.as_bytes())
    }

    /// Forgets the stored account (the server no longer knows it).
    pub fn remove_account(&self) -> std::io::Result<()> {
        std::fs::remove_file(&self.account)
    }

    /// The stored account, JSON.
    pub fn read_account(&self) -> Option<Vec<u8>> {
        std::fs::read(&self.account).ok()
    }

    /// Stores the account (its private key included).
    pub fn write_account(&self, json: &[u8]) -> std::io::Result<()> {
        write_atomic(&self.account, json)
    }

    /// The shared order state; the default when there is none or it cannot be read.
    pub fn read_state(&self) -> OrderState {
        std::fs::read(self.cert_dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Stores the order state.
    pub fn write_state(&self, state: &OrderState) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        write_atomic(&self.cert_dir.join("state.json"), &json)
    }

    /// Takes the storage lock if no other instance (or task) holds it.
    pub fn try_lock(&self) -> std::io::Result<Option<Lock>> {
        std::fs::create_dir_all(&self.root)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.root.join("lock"))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lock(file))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// The file of an HTTP-01 challenge's key authorization; `None` for a token that is not
/// base64url (it names a file).
pub fn http01_path(root: &Path, token: &str) -> Option<PathBuf> {
    let valid = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| root.join("challenges").join("http-01").join(token))
}

/// The file of a TLS-ALPN-01 challenge's key authorization for `name`.
pub fn tls_alpn_path(root: &Path, name: &str) -> PathBuf {
    root.join("challenges").join("tls-alpn-01").join(safe(name))
}

/// Writes `bytes` to `path` through a temporary file and a rename, owner-only (0600), making
/// the folders on the way.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A new file of its own (never one left behind, nor a link followed to elsewhere).
    let tmp = dir.join(format!(
        ".{name}.{}.{:08x}.tmp",
        std::process::id(),
        fastrand::u32(..)
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        // The rename itself made durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Eight hex digits of `text`'s SHA-256.
fn short_hash(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A name made safe as one path component: DNS names pass unchanged.
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_separate_servers_and_refuse_path_tricks() {
        let root = Path::new("/s");
        let names = vec!["example.com".to_string()];
        let prod = Storage::new(root, "https://acme.example/dir", &names);
        let other = Storage::new(root, "https://acme.example/other", &names);
        assert_ne!(prod.cert_path(), other.cert_path());
        assert!(prod.cert_path().starts_with("/s/certificates/"));
        assert!(prod.cert_path().to_string_lossy().contains("acme.example-"));
        assert_eq!(http01_path(root, "../x"), None);
        assert_eq!(http01_path(root, ""), None);
        assert!(http01_path(root, "abc-_DEF123").is_some());
        assert_eq!(
            tls_alpn_path(root, "../../etc"),
            Path::new("/s/challenges/tls-alpn-01/_.._etc")
        );
    }

    #[test]
    fn writes_are_owner_only_and_locks_exclude_each_other() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::new(dir.path(), "https://a/dir", &["a.test".to_string()]);
        s.write_cert("CHAIN\n", "KEY").unwrap();
        let mode = std::fs::metadata(s.cert_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(s.read_cert().unwrap(), b"CHAIN\nKEY".to_vec());
        // The same names in another order: the same place.
        let reordered = Storage::new(
            dir.path(),
            "https://a/dir",
            &["b.test".into(), "a.test".into()],
        );
        let ordered = Storage::new(
            dir.path(),
            "https://a/dir",
            &["a.test".into(), "b.test".into()],
        );
        assert_eq!(reordered.cert_path(), ordered.cert_path());
        let held = s.try_lock().unwrap();
        assert!(held.is_some());
        assert!(s.try_lock().unwrap().is_none());
        drop(held);
        assert!(s.try_lock().unwrap().is_some());
    }
}
