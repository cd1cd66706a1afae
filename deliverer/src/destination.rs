//! The SSRF guard (docs/contract.md §5): handler URLs may not reach loopback,
//! private, link-local, CGNAT, multicast or unspecified addresses unless
//! `[deliverer] allow_networks` lists them.
//!
//! The check lives in the HTTP client's resolver, so the address that was
//! checked is the address that is connected (no time-of-check/time-of-use
//! gap with DNS rebinding). URLs whose host is an IP literal never reach a
//! resolver; they are checked directly before the request, which is the same
//! address the connection then uses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
use ipnet::IpNet;

/// A destination the policy refuses.
#[derive(Debug, thiserror::Error)]
#[error("blocked_destination: {host} resolves only to refused addresses ({addrs})")]
pub struct BlockedDestination {
    pub host: String,
    pub addrs: String,
}

/// Which addresses handlers may live at.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        AddressPolicy { allow }
    }

    /// Whether connecting to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let candidates = [Some(ip), embedded_v4(ip).map(IpAddr::V4)];
        if candidates
            .iter()
            .flatten()
            .any(|c| self.allow.iter().any(|n| n.contains(c)))
        {
            return true;
        }
        candidates.iter().flatten().all(|c| !is_special(*c))
    }

    /// Checks a URL whose host is an IP literal; names are left to the resolver.
    pub fn check_url(&self, url: &url::Url) -> Result<(), BlockedDestination> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        if self.allows(ip) {
            Ok(())
        } else {
            Err(BlockedDestination {
                host: url.host_str().unwrap_or_default().to_owned(),
                addrs: ip.to_string(),
            })
        }
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// or NAT64 (`64:ff9b::/96`) IPv6 address.
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let o = v6.octets();
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    None
}

fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || o[0] == 0 // 0.0.0.0/8 "this network"
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 CGNAT
                || o[0] >= 240 // 240.0.0.0/4 reserved
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link local
                || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site local (deprecated)
                || v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1)
        }
    }
}

/// A resolver that drops refused addresses and fails when none is left: the
/// HTTP connector's resolver, so it connects only to what passed.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: AddressPolicy,
}

impl GuardedResolver {
    pub fn new(policy: AddressPolicy) -> Self {
        GuardedResolver { policy }
    }
}

type ResolveError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = ResolveError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ResolveError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ResolveError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| policy.allows(a.ip())).collect();
            if allowed.is_empty() {
                let addrs = all.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
                return Err(Box::new(BlockedDestination { host, addrs }) as ResolveError);
            }
            Ok(allowed.into_iter())
        })
    }
}

/// Finds a [`BlockedDestination`] in an error's chain.
pub fn blocked_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a BlockedDestination> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(b) = e.downcast_ref::<BlockedDestination>() {
            return Some(b);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_special_addresses_unless_allowed() {
        let deny = AddressPolicy::default();
        for refused in [
            "127.0.0.1",
            "127.9.9.9",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!deny.allows(refused.parse().unwrap()), "{refused} should be refused");
        }
        for allowed in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "100.128.0.1",
            "::ffff:8.8.8.8",
        ] {
            assert!(deny.allows(allowed.parse().unwrap()), "{allowed} should be allowed");
        }
        let loopback = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        assert!(loopback.allows("127.0.0.1".parse().unwrap()));
        assert!(loopback.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(loopback.allows("::1".parse().unwrap()));
        assert!(!loopback.allows("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn literal_urls_are_checked() {
        let deny = AddressPolicy::default();
        assert!(deny.check_url(&"http://127.0.0.1:8080/x".parse().unwrap()).is_err());
        assert!(deny.check_url(&"http://[::ffff:127.0.0.1]/x".parse().unwrap()).is_err());
        assert!(deny.check_url(&"http://example.com/x".parse().unwrap()).is_ok());
    }
}
