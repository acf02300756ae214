//! What the agent knows about its node: name, addresses (for `NodePort` and
//! for source NAT), zone, and the hairpin loopback addresses; where each
//! comes from, in order: flags, the Node object (kube source), the
//! addresses configured on the interfaces of this network namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::LbConfig;

use crate::model::NodeContext;

/// Source of hairpin flows (a pod reaching itself through its Service), IPv4.
/// Link-local, never on a wire; pods route it to the node (default route).
pub const DEFAULT_LOOPBACK4: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
/// Source of hairpin flows over IPv6: from the discard-only prefix
/// `100::/64` (RFC 6666), which no network routes; an IPv6 link-local
/// address would need neighbour discovery on every pod link.
pub const DEFAULT_LOOPBACK6: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0x6c62, 1);

/// Node settings from the command line.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// `--node-name` (or `NODE_NAME`): endpoints on this node are local.
    pub name: String,
    /// `--node-ip`: addresses `NodePort` listens on; the first of each
    /// family is the source of SNAT towards endpoints on other nodes.
    pub addresses: Vec<IpAddr>,
    /// `--zone`: topology zone.
    pub zone: Option<String>,
    /// Hairpin source, IPv4.
    pub loopback4: Ipv4Addr,
    /// Hairpin source, IPv6.
    pub loopback6: Ipv6Addr,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            name: String::new(),
            addresses: Vec::new(),
            zone: None,
            loopback4: DEFAULT_LOOPBACK4,
            loopback6: DEFAULT_LOOPBACK6,
        }
    }
}

/// The model's view of the node: flags win over what the source knows
/// (`from_source`: the Node object, if any); without either, the global
/// addresses of this namespace's interfaces.
#[must_use]
pub fn context(settings: &NodeSettings, from_source: &NodeContext) -> NodeContext {
    let addresses = if !settings.addresses.is_empty() {
        settings.addresses.clone()
    } else if !from_source.addresses.is_empty() {
        from_source.addresses.clone()
    } else {
        interface_addresses()
    };
    NodeContext {
        name: if settings.name.is_empty() {
            from_source.name.clone()
        } else {
            settings.name.clone()
        },
        addresses,
        zone: settings.zone.clone().or_else(|| from_source.zone.clone()),
    }
}

/// The datapath's node configuration for `context`.
#[must_use]
pub fn datapath_config(settings: &NodeSettings, context: &NodeContext) -> LbConfig {
    let mut config = LbConfig {
        loopback4: settings.loopback4.octets(),
        loopback6: settings.loopback6.octets(),
        ..LbConfig::default()
    };
    if let Some(IpAddr::V4(addr)) = context.addresses.iter().find(|a| a.is_ipv4()) {
        config.node_addr4 = addr.octets();
    }
    if let Some(IpAddr::V6(addr)) = context.addresses.iter().find(|a| a.is_ipv6()) {
        config.node_addr6 = addr.octets();
    }
    config
}

/// Global unicast addresses of the interfaces in this network namespace
/// (no loopback, no link-local), in interface order.
#[must_use]
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return out;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned.
        let (addr, next) = unsafe { ((*entry).ifa_addr, (*entry).ifa_next) };
        if let Some(ip) = sockaddr_ip(addr)
            && usable_node_address(&ip)
            && !out.contains(&ip)
        {
            out.push(ip);
        }
        entry = next;
    }
    // SAFETY: the list came from getifaddrs.
    unsafe { libc::freeifaddrs(list) };
    out
}

fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: non-null sockaddr from getifaddrs; the family says its type.
    unsafe {
        match i32::from((*addr).sa_family) {
            libc::AF_INET => {
                let v4 = &*addr.cast::<libc::sockaddr_in>();
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6 = &*addr.cast::<libc::sockaddr_in6>();
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

fn usable_node_address(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_then_source_then_interfaces() {
        let source = NodeContext {
            name: "node-a".into(),
            addresses: vec!["198.18.0.1".parse().unwrap()],
            zone: Some("z1".into()),
        };
        let flags = NodeSettings {
            addresses: vec!["fd00::1".parse().unwrap()],
            zone: Some("z2".into()),
            ..NodeSettings::default()
        };
        let ctx = context(&flags, &source);
        assert_eq!(ctx.name, "node-a");
        assert_eq!(ctx.addresses, flags.addresses);
        assert_eq!(ctx.zone.as_deref(), Some("z2"));
        let ctx = context(&NodeSettings::default(), &source);
        assert_eq!(ctx.addresses, source.addresses);
    }

    #[test]
    fn config_takes_the_first_address_of_each_family() {
        let ctx = NodeContext {
            name: String::new(),
            addresses: vec![
                "fd00::1".parse().unwrap(),
                "198.18.0.1".parse().unwrap(),
                "198.18.0.2".parse().unwrap(),
            ],
            zone: None,
        };
        let config = datapath_config(&NodeSettings::default(), &ctx);
        assert_eq!(config.node_addr4, [198, 18, 0, 1]);
        assert_eq!(
            Ipv6Addr::from(config.node_addr6),
            "fd00::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(config.loopback4, DEFAULT_LOOPBACK4.octets());
        assert_eq!(config.loopback6, DEFAULT_LOOPBACK6.octets());
    }

    #[test]
    fn link_local_and_loopback_are_not_node_addresses() {
        for addr in ["127.0.0.1", "169.254.1.1", "::1", "fe80::1", "0.0.0.0"] {
            assert!(!usable_node_address(&addr.parse().unwrap()), "{addr}");
        }
        assert!(usable_node_address(&"198.18.0.1".parse().unwrap()));
    }
}
