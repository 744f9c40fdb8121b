//! Replica discovery: every A/AAAA record of a target's host name is a replica.
//!
//! Docker's embedded DNS answers with long TTLs, so the resolver keeps no cache of its own and
//! the gateway asks again on its own interval. A target whose lookup fails (timeout, SERVFAIL,
//! NXDOMAIN, an empty answer) keeps the addresses it had, so a DNS outage never empties an
//! upstream.

use crate::config::{DnsConfig, Target};
use hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use std::net::SocketAddr;
use std::time::Duration;

/// Builds a resolver from the `dns` section: the given name servers, or the system's.
pub fn make_resolver(dns: &DnsConfig) -> Result<TokioResolver, String> {
    let mut opts = ResolverOpts::default();
    opts.timeout = dns.timeout.map_or(Duration::from_secs(2), |d| d.0);
    opts.attempts = 2;
    // Every refresh must reach the server: the TTL of compose's DNS is not ours to honour.
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    opts.use_hosts_file = ResolveHosts::Always;
    if dns.nameservers.is_empty() {
        let mut builder = TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system resolver configuration: {e}"))?;
        *builder.options_mut() = opts;
        return Ok(builder.build());
    }
    let mut group = NameServerConfigGroup::new();
    for ns in &dns.nameservers {
        group.push(NameServerConfig::new(ns.0, Protocol::Udp));
        group.push(NameServerConfig::new(ns.0, Protocol::Tcp));
    }
    let config = ResolverConfig::from_parts(None, vec![], group);
    Ok(
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build(),
    )
}

/// The addresses of one target, or why they could not be had.
pub async fn resolve_target(
    resolver: &TokioResolver,
    target: &Target,
) -> Result<Vec<SocketAddr>, String> {
    if let Some(ip) = target.ip() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let lookup = resolver
        .lookup_ip(target.host.as_str())
        .await
        .map_err(|e| format!("{}: {e}", target.host))?;
    let mut addrs: Vec<SocketAddr> = lookup
        .iter()
        .map(|ip| SocketAddr::new(ip, target.port))
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{}: no addresses in the answer", target.host));
    }
    Ok(addrs)
}
