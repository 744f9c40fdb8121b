//! The files a configuration names besides itself (`respond` and error-page bodies, API keys,
//! token secrets and keys): their contents are part of the configuration's hash, and the
//! reload loop watches them, so that editing one reloads as editing the file does.
//! Certificates are not among them: listeners poll their own (`tls.reload_interval`).

use crate::config::{Config, NamedPolicyConfig};
use std::path::{Path, PathBuf};

/// The files `config` names, each once, in a stable order.
pub fn referenced(config: &Config) -> Vec<PathBuf> {
    let mut out: Vec<&str> = Vec::new();
    for policy in config.policies.values() {
        match &policy.value {
            NamedPolicyConfig::Respond(r) => out.extend(r.file.as_ref().map(|f| f.value.as_str())),
            NamedPolicyConfig::ApiKey(k) => out.push(&k.keys_file.value),
            NamedPolicyConfig::BasicAuth(b) => out.push(&b.users_file.value),
            _ => {}
        }
    }
    let pages = config
        .listeners
        .value
        .values()
        .map(|l| &l.error_pages)
        .chain(config.routes.iter().map(|r| &r.error_pages));
    for pages in pages {
        out.extend(
            pages
                .values()
                .filter_map(|p| p.value.file.as_ref())
                .map(|f| f.value.as_str()),
        );
    }
    for auth in config.auth.values() {
        out.extend(auth.value.secret_file.as_ref().map(|f| f.value.as_str()));
        out.extend(auth.value.public_keys.iter().map(|k| k.file.as_str()));
    }
    out.sort_unstable();
    out.dedup();
    out.into_iter().map(PathBuf::from).collect()
}

/// A hash of the files' contents (a missing or unreadable file hashes as such, so that its
/// return is a change too).
pub fn hash(files: &[PathBuf]) -> u64 {
    files.iter().fold(0u64, |acc, path| {
        let h = match std::fs::read(path) {
            Ok(bytes) => crate::hash::content(&bytes),
            Err(_) => crate::hash::content(b"\0missing\0"),
        };
        // Order-dependent, so that two files swapping contents is a change.
        acc.rotate_left(7) ^ h ^ crate::hash::content(path.as_os_str().as_encoded_bytes())
    })
}

/// What `stat` says of each file: compared on every poll to notice an edit.
pub fn stamps(files: &[PathBuf]) -> Vec<Option<(std::time::SystemTime, u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|p: &PathBuf| {
            let m = std::fs::metadata(Path::new(p)).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}
