//! Routes and upstreams learnt from outside the configuration file: today the Docker engine
//! (`providers.docker`). What a provider finds is merged into the file's configuration and goes
//! through the same compile → activate path as a file reload; the file wins on a name clash.

pub mod docker;
pub mod labels;

use crate::config::{ConfigError, LoadedConfig};
use crate::plan::{self, Plan};
use labels::Declared;
use std::collections::BTreeSet;

/// What the providers currently declare: one entry per serving container, by container name.
#[derive(Debug, Clone, Default)]
pub struct Provided {
    /// The containers' declarations, in container-name order.
    pub declared: Vec<Declared>,
    /// Changes when anything declared changes.
    pub hash: u64,
}

impl Provided {
    /// Declarations with their hash.
    pub fn new(declared: Vec<Declared>) -> Provided {
        let hash = crate::hash::content(format!("{declared:?}").as_bytes());
        Provided { declared, hash }
    }
}

/// What merging left out: name clashes (warnings) and containers that do not compile with the
/// file (errors). The control plane logs each once while it lasts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Notes {
    /// Names the file (or an earlier container) already uses.
    pub clashes: BTreeSet<String>,
    /// Containers left out, with the label to blame.
    pub refused: BTreeSet<String>,
}

/// The file's configuration with `declared` added: containers of one upstream become its
/// targets (settings from the first container by name); names the file uses, and routes
/// another container already declared, stay the file's (or the first's), noted in `clashes`.
fn merge<'a>(
    loaded: &LoadedConfig,
    declared: impl Iterator<Item = &'a Declared>,
    clashes: &mut BTreeSet<String>,
) -> LoadedConfig {
    let mut merged = loaded.clone();
    let config = &mut merged.config;
    let file_upstreams: BTreeSet<String> = config.upstreams.keys().cloned().collect();
    let mut route_names: BTreeSet<String> =
        config.routes.iter().map(|r| r.name.value.clone()).collect();
    let mut clash = |what: String| {
        clashes.insert(what);
    };
    for d in declared {
        if file_upstreams.contains(&d.upstream) {
            clash(format!(
                "container {}: upstream {} is also in the configuration file; the file's is used",
                d.container, d.upstream
            ));
            continue;
        }
        match config.upstreams.get_mut(&d.upstream) {
            Some(upstream) => upstream
                .targets
                .value
                .extend(d.upstream_config.targets.value.iter().cloned()),
            None => {
                config
                    .upstreams
                    .insert(d.upstream.clone(), d.upstream_config.clone());
            }
        }
        for route in &d.routes {
            if route_names.insert(route.name.value.clone()) {
                config.routes.push(route.clone());
            } else if !config.routes.iter().any(|r| {
                r.name.value == route.name.value
                    && r.upstream.as_ref().is_some_and(|u| u.value == d.upstream)
            }) {
                // Replicas of one service declare the same routes: only other clashes matter.
                clash(format!(
                    "container {}: route {} is already declared (by the file or another container); the first is used",
                    d.container, route.name.value
                ));
            }
        }
    }
    merged
}

/// Compiles the file with what the providers declare. A container whose declaration does not
/// compile with the file is left out (an error names it and the label); the file's own errors
/// reject the whole configuration, as without providers.
pub fn compile_with(
    loaded: &LoadedConfig,
    provided: &Provided,
) -> Result<(Plan, Notes), ConfigError> {
    let mut notes = Notes::default();
    if provided.declared.is_empty() {
        return plan::compile(loaded).map(|plan| (plan, notes));
    }
    let merged = merge(loaded, provided.declared.iter(), &mut notes.clashes);
    match plan::compile(&merged) {
        Ok(plan) => Ok((plan, notes)),
        Err(combined) => {
            plan::compile(loaded)?;
            let mut good = Vec::new();
            let mut ignored = BTreeSet::new();
            for d in &provided.declared {
                let with = merge(loaded, good.iter().copied().chain([d]), &mut ignored);
                match plan::compile(&with) {
                    Ok(_) => good.push(d),
                    Err(e) => {
                        notes.refused.insert(blame(d, &e).to_string());
                    }
                }
            }
            let plan = plan::compile(&merge(loaded, good.into_iter(), &mut ignored))
                .map_err(|_| combined)?;
            Ok((plan, notes))
        }
    }
}

/// The container and label a compile error is about.
fn blame(d: &Declared, e: &ConfigError) -> labels::LabelError {
    let label = usize::try_from(e.line)
        .ok()
        .and_then(|l| l.checked_sub(1))
        .and_then(|l| d.lines.get(l))
        .cloned()
        .unwrap_or_else(|| e.field.clone());
    labels::LabelError {
        container: d.container.clone(),
        label,
        message: e.message.clone(),
    }
}
