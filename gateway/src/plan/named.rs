//! Named policies (`policies:`): compiled once, shared by the routes and listeners that list
//! them.

use super::validate::{parse_cidr, Checker};
use super::NamedPolicy;
use crate::config::{Config, ConfigError, HeaderEditsConfig, NamedPolicyConfig};
use crate::policy::headers::{parse_name, parse_template, Edits};
use crate::policy::ip_list::Cidrs;
use crate::policy::{HeaderRules, IpList};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Every named policy, compiled.
pub(super) fn compile(
    c: &Checker,
    config: &Config,
) -> Result<BTreeMap<String, NamedPolicy>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, spanned) in &config.policies {
        let field = format!("policies.{name}");
        let policy = match &spanned.value {
            NamedPolicyConfig::IpList(list) => {
                let cidrs = |entries: &[Spanned<String>], which: &str| {
                    entries
                        .iter()
                        .enumerate()
                        .map(|(i, e)| {
                            parse_cidr(&e.value).map_err(|m| {
                                c.err_at(e, format!("{field}.ip_list.{which}[{i}]"), m)
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                let allow = cidrs(&list.allow, "allow")?;
                let deny = cidrs(&list.deny, "deny")?;
                if allow.is_empty() && deny.is_empty() {
                    return Err(c.err_at(
                        spanned,
                        format!("{field}.ip_list"),
                        "needs `allow` or `deny`",
                    ));
                }
                NamedPolicy::IpList(Arc::new(IpList {
                    allow: (!allow.is_empty()).then(|| Cidrs::new(allow)),
                    deny: Cidrs::new(deny),
                }))
            }
            NamedPolicyConfig::Headers(rules) => {
                let request = edits(c, &rules.request, &format!("{field}.headers.request"), true)?;
                let response = edits(
                    c,
                    &rules.response,
                    &format!("{field}.headers.response"),
                    false,
                )?;
                if request.is_empty() && response.is_empty() {
                    return Err(c.err_at(spanned, format!("{field}.headers"), "edits nothing"));
                }
                NamedPolicy::Headers(Arc::new(HeaderRules { request, response }))
            }
        };
        out.insert(name.clone(), policy);
    }
    Ok(out)
}

fn edits(
    c: &Checker,
    e: &HeaderEditsConfig,
    field: &str,
    request: bool,
) -> Result<Edits, ConfigError> {
    let mut out = Edits::default();
    for (i, name) in e.remove.iter().enumerate() {
        out.remove.push(
            parse_name(&name.value)
                .map_err(|m| c.err_at(name, format!("{field}.remove[{i}]"), m))?,
        );
    }
    for (which, map) in [("set", &e.set), ("append", &e.append)] {
        for (name, value) in map {
            let at = format!("{field}.{which}.{name}");
            let header = parse_name(name).map_err(|m| c.err_at(value, at.clone(), m))?;
            let value =
                parse_template(&value.value, request).map_err(|m| c.err_at(value, at, m))?;
            match which {
                "set" => out.set.push((header, value)),
                _ => out.append.push((header, value)),
            }
        }
    }
    Ok(out)
}

/// The named policies a list refers to, in order; an unknown name is an error at its place.
pub(super) fn resolve(
    c: &Checker,
    named: &BTreeMap<String, NamedPolicy>,
    names: &[Spanned<String>],
    field: &str,
) -> Result<Vec<NamedPolicy>, ConfigError> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            named.get(&n.value).cloned().ok_or_else(|| {
                let known: Vec<&str> = named.keys().map(String::as_str).collect();
                c.err_at(
                    n,
                    format!("{field}[{i}]"),
                    format!(
                        "no policy named `{}` (defined: {})",
                        n.value,
                        known.join(", ")
                    ),
                )
            })
        })
        .collect()
}
