//! Hot reload: watch the configuration file's directory (rename- and symlink-swap-safe), poll
//! its metadata as a fallback, reload on SIGHUP. Each reload parses and compiles the file and
//! activates a whole new runtime, then swaps it in at once; any failure keeps the running one.
//! What providers (Docker labels) declare is merged into the file's configuration on the way.

use crate::config::{self, ReloadConfig};
use crate::metrics::METRICS;
use crate::plan;
use crate::provider::{Notes, Provided};
use crate::runtime::{Bindings, Runtime};
use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new runtime with this generation is serving.
    Applied(u64),
    /// The file has not changed.
    Unchanged,
    /// The file was rejected; the running runtime keeps serving.
    Rejected(String),
}

/// The last reload's outcome and the last rejected file, for the admin views.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    /// `applied` or `rejected`; `none` before any reload.
    pub last_result: &'static str,
    /// The last rejected file's error, and when (Unix seconds). Stays after a later success.
    pub last_rejected: Option<Rejection>,
    /// Fields the running file changed that apply only after a restart (listeners, admin
    /// address, threads, ...); empty when none.
    pub restart_required: Vec<String>,
}

/// A rejected configuration: the error as logged, and its parts.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Rejection {
    /// When (Unix seconds).
    pub at: u64,
    /// The whole error, `FILE:LINE:COLUMN: field: reason`.
    pub error: String,
    /// The file, line and column (0: unknown) and field it names.
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub field: String,
}

static STATUS: std::sync::Mutex<ReloadStatus> = std::sync::Mutex::new(ReloadStatus {
    last_result: "none",
    last_rejected: None,
    restart_required: Vec::new(),
});

/// The reloads' outcome so far.
pub fn status() -> ReloadStatus {
    STATUS.lock().map(|s| s.clone()).unwrap_or_default()
}

fn note(result: &'static str, rejected: Option<Rejection>) {
    if let Ok(mut s) = STATUS.lock() {
        s.last_result = result;
        if rejected.is_some() {
            s.last_rejected = rejected;
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Owns reloading for one configuration file.
pub struct ControlPlane {
    path: PathBuf,
    runtime: Arc<ArcSwap<Runtime>>,
    startup_bindings: Bindings,
    /// Held while a reload runs; holds the hash of the last file that was refused, so that
    /// the same broken bytes are not parsed and reported again on every unrelated event.
    serial: tokio::sync::Mutex<Option<u64>>,
    /// What the providers declare now (empty without providers).
    provided: std::sync::Mutex<Arc<Provided>>,
    /// What merging them last noted, so that each note is logged once while it lasts.
    noted: std::sync::Mutex<Notes>,
    /// The files the last parsed configuration names (running or refused): part of its hash,
    /// and polled, so that creating or fixing one retries a refused configuration too.
    watched: std::sync::Mutex<Vec<PathBuf>>,
}

/// File identity and version as seen by `stat` (following symlinks).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

impl ControlPlane {
    /// A control plane for `path`, serving through `runtime`, started with `startup_bindings`.
    pub fn new(
        path: PathBuf,
        runtime: Arc<ArcSwap<Runtime>>,
        startup_bindings: Bindings,
    ) -> ControlPlane {
        let watched = std::sync::Mutex::new(runtime.load().files.clone());
        ControlPlane {
            watched,
            path,
            runtime,
            startup_bindings,
            serial: tokio::sync::Mutex::new(None),
            provided: std::sync::Mutex::new(Arc::new(Provided::default())),
            noted: std::sync::Mutex::new(Notes::default()),
        }
    }

    /// Applies what the providers declare now, with the file as it is.
    pub async fn provide(&self, provided: Provided) -> ReloadOutcome {
        *self.provided.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(provided);
        self.reload(false).await
    }

    /// Reloads now. Without `force`, an unchanged file is left alone.
    pub async fn reload(&self, force: bool) -> ReloadOutcome {
        let mut last_refused = self.serial.lock().await;
        let current = self.runtime.load_full();
        let provided = self
            .provided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let compiled = match config::read(&self.path).and_then(|text| {
            let base = crate::hash::content(text.as_bytes()) ^ provided.hash;
            // The files the configuration names count as part of it.
            let hash = base ^ plan::files::hash(&self.watched());
            // Bytes already running, or already refused: nothing to parse or report again.
            if !force && (hash == current.source_hash || *last_refused == Some(hash)) {
                return Ok(None);
            }
            let mut refused_hash = hash;
            config::load_text(&self.path, text)
                .and_then(|mut loaded| {
                    let files = plan::files::referenced(&loaded.config);
                    refused_hash = base ^ plan::files::hash(&files);
                    *self.watched.lock().unwrap_or_else(|e| e.into_inner()) = files;
                    // The plan adds the hash of the files it names itself.
                    loaded.source_hash = base;
                    crate::provider::compile_with(&loaded, &provided)
                })
                .map(|(plan, notes)| {
                    self.log_new(notes);
                    Some(plan)
                })
                .inspect_err(|_| *last_refused = Some(refused_hash))
        }) {
            Ok(Some(l)) => l,
            Ok(None) => return ReloadOutcome::Unchanged,
            Err(e) => {
                error!("configuration rejected, the running configuration stays: {e}");
                METRICS.reloads.with_label_values(&["rejected"]).inc();
                note(
                    "rejected",
                    Some(Rejection {
                        at: unix_now(),
                        error: e.to_string(),
                        file: e.file.display().to_string(),
                        line: e.line,
                        column: e.column,
                        field: e.field.clone(),
                    }),
                );
                return ReloadOutcome::Rejected(e.to_string());
            }
        };
        let generation = current.generation + 1;
        let source_hash = compiled.source_hash;
        let next = match plan::activate(compiled, Some(&current), generation).await {
            Ok(rt) => rt,
            Err(e) => {
                *last_refused = Some(source_hash);
                error!(
                    "configuration rejected, the running configuration stays: {}: {e}",
                    self.path.display()
                );
                METRICS.reloads.with_label_values(&["rejected"]).inc();
                let file = self.path.display().to_string();
                note(
                    "rejected",
                    Some(Rejection {
                        at: unix_now(),
                        error: format!("{file}: {e}"),
                        file,
                        ..Rejection::default()
                    }),
                );
                return ReloadOutcome::Rejected(e);
            }
        };
        let restart_only = next.bindings.changes_from(&self.startup_bindings);
        if let Ok(mut s) = STATUS.lock() {
            s.restart_required = restart_only.clone();
        }
        if !restart_only.is_empty() {
            warn!(
                changed = %restart_only.join(", "),
                "{}: restart required for these fields; everything else (certificates included) is applied",
                self.path.display()
            );
        }
        plan::start_tasks(&next);
        METRICS.config_applied(generation, next.source_hash);
        METRICS.reloads.with_label_values(&["applied"]).inc();
        note("applied", None);
        let old = self.runtime.swap(Arc::new(next));
        let now = self.runtime.load();
        crate::acme::retire(&old.acme, &now.acme);
        if last_refused.take().is_some() {
            info!(
                generation,
                "configuration valid again after a rejected one: reloaded"
            );
        } else {
            info!(generation, "configuration reloaded");
        }
        ReloadOutcome::Applied(generation)
    }

    /// The files the last parsed configuration names.
    fn watched(&self) -> Vec<PathBuf> {
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Logs the provider notes not logged before; forgets the ones that no longer hold.
    fn log_new(&self, notes: Notes) {
        let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        for clash in notes.clashes.difference(&noted.clashes) {
            warn!("{clash}");
        }
        for refused in notes.refused.difference(&noted.refused) {
            error!("{refused}; the container is not served");
        }
        *noted = notes;
    }

    /// Watches for changes until the process ends. Runs on the control-plane runtime.
    pub async fn watch(self: Arc<Self>, settings: ReloadConfig) {
        let (tx, mut rx) = mpsc::unbounded_channel::<bool>();

        // Directory events: editors and orchestrators replace files by rename or swap a symlink
        // to a new directory, so any change in the directory triggers a (hash-checked) reload.
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let _watcher = if settings.watch {
            let tx = tx.clone();
            let name = self.path.file_name().map(|n| n.to_os_string());
            let made = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                // Only events that may concern the file: its own name, or the `..data`-style
                // symlink swaps of mounted configuration directories. An access log or anything
                // else written beside it is not a reason to look.
                let concerns_file = |e: &notify::Event| {
                    e.paths.is_empty()
                        || e.paths.iter().any(|p| {
                            let file = p.file_name();
                            file == name.as_deref()
                                || file.is_some_and(|f| f.as_encoded_bytes().starts_with(b".."))
                        })
                };
                if res.is_ok_and(|e| !e.kind.is_access() && concerns_file(&e)) {
                    let _ = tx.send(false);
                }
            })
            .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|_| w));
            match made {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(
                        "cannot watch {}: {e}; relying on polling every {}",
                        dir.display(),
                        settings.poll_interval
                    );
                    None
                }
            }
        } else {
            None
        };

        // SIGHUP: reload unconditionally.
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                    Ok(mut hup) => {
                        while hup.recv().await.is_some() {
                            info!("SIGHUP: reloading configuration");
                            let _ = tx.send(true);
                        }
                    }
                    Err(e) => warn!("cannot listen for SIGHUP: {e}"),
                }
            });
        }

        // Polling: the fallback for file systems that send no events, and the watch on the
        // files the configuration names (wherever they are).
        if settings.watch {
            let tx = tx.clone();
            let plane = self.clone();
            let every = settings.poll_interval.0;
            tokio::spawn(async move {
                let stamps = || (stamp(&plane.path), plan::files::stamps(&plane.watched()));
                let mut last = stamps();
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let now = stamps();
                    if now != last {
                        last = now;
                        if tx.send(false).is_err() {
                            return;
                        }
                    }
                }
            });
        }

        while let Some(first) = rx.recv().await {
            // Debounce: let a burst of writes settle, then reload once.
            tokio::time::sleep(settings.debounce.0).await;
            let mut force = first;
            while let Ok(more) = rx.try_recv() {
                force |= more;
            }
            self.reload(force).await;
        }
    }
}
