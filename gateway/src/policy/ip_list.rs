//! `ip_list`: allow and deny by the client's address (after `trusted_proxies`), 403 otherwise.
//! Each list is a set of CIDRs in a radix trie: a lookup walks at most 32 (IPv4) or 128 (IPv6)
//! bits, whatever the number of entries.

use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use iprange::IpRange;
use std::net::IpAddr;

/// A set of networks, IPv4 and IPv6.
#[derive(Default)]
pub struct Cidrs {
    v4: IpRange<Ipv4Net>,
    v6: IpRange<Ipv6Net>,
}

impl Cidrs {
    /// The set of `nets`.
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Cidrs {
        let mut set = Cidrs::default();
        for net in nets {
            match net {
                IpNet::V4(n) => {
                    set.v4.add(n.trunc());
                }
                IpNet::V6(n) => {
                    set.v6.add(n.trunc());
                }
            }
        }
        set.v4.simplify();
        set.v6.simplify();
        set
    }

    /// Whether `ip` is in a network of the set (an IPv4-mapped IPv6 address as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.v4.contains(&v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => self.v4.contains(&v4),
                None => self.v6.contains(&v6),
            },
        }
    }
}

/// The compiled lists.
pub struct IpList {
    /// Addresses let through; `None`: every address not denied.
    pub allow: Option<Cidrs>,
    /// Addresses refused.
    pub deny: Cidrs,
}

impl IpList {
    /// Refuses a denied client, or one not allowed.
    pub fn on_request(&self, ctx: &RequestCtx) -> Result<(), Answer> {
        let Some(ip) = ctx.client_ip else {
            return Err(Answer::error(403, "client address not allowed"));
        };
        let allowed = !self.deny.contains(ip) && self.allow.as_ref().is_none_or(|a| a.contains(ip));
        if allowed {
            Ok(())
        } else {
            Err(Answer::error(403, "client address not allowed"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Cidrs {
        Cidrs::new(list.iter().map(|s| s.parse().unwrap()))
    }

    fn verdict(list: &IpList, ip: &str) -> u16 {
        let ctx = RequestCtx {
            client_ip: Some(ip.parse().unwrap()),
            ..Default::default()
        };
        list.on_request(&ctx).map_or_else(|a| a.status, |_| 200)
    }

    #[test]
    fn deny_wins_over_allow() {
        let list = IpList {
            allow: Some(nets(&["10.0.0.0/8", "2001:db8::/32"])),
            deny: nets(&["10.9.0.0/16", "2001:db8:bad::/48"]),
        };
        assert_eq!(verdict(&list, "10.1.2.3"), 200);
        assert_eq!(verdict(&list, "10.9.2.3"), 403);
        assert_eq!(verdict(&list, "192.168.1.1"), 403);
        assert_eq!(verdict(&list, "::ffff:10.1.2.3"), 200);
        assert_eq!(verdict(&list, "2001:db8:1::1"), 200);
        assert_eq!(verdict(&list, "2001:db8:bad::1"), 403);
        let deny_only = IpList {
            allow: None,
            deny: nets(&["192.0.2.7/32"]),
        };
        assert_eq!(verdict(&deny_only, "192.0.2.7"), 403);
        assert_eq!(verdict(&deny_only, "192.0.2.8"), 200);
    }

    #[test]
    fn ten_thousand_entries() {
        // 10,000 /24s spread over the space, and host bits set in the written networks.
        let written: Vec<IpNet> = (0..10_000u32)
            .map(|i| {
                let base = i.wrapping_mul(2_654_435_761) & 0xffff_ff00;
                IpNet::V4(Ipv4Net::new((base | 7).into(), 24).unwrap())
            })
            .collect();
        let set = Cidrs::new(written.iter().copied());
        for net in &written {
            let IpNet::V4(n) = net else { unreachable!() };
            let inside = u32::from(n.network()) | 200;
            assert!(set.contains(IpAddr::V4(inside.into())));
        }
        // Anywhere else: the trie agrees with a scan of the list.
        for i in 0..2_000u32 {
            let ip = IpAddr::V4(i.wrapping_mul(0x9e37_79b9).into());
            let scanned = written.iter().any(|n| n.contains(&ip));
            assert_eq!(set.contains(ip), scanned, "{ip}");
        }
    }
}
