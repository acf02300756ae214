//! What the agent knows about its node: name, addresses (for `NodePort` and
//! for source NAT), zone, and the hairpin loopback addresses; where each
//! comes from, in order: flags, the Node object (kube source), the
//! addresses configured on the interfaces of this network namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{LbConfig, config_flags};

use crate::{model::NodeContext, net::ifaddrs::interface_addresses};

/// Source of hairpin flows (a pod reaching itself through its Service), IPv4.
/// Link-local, never on a wire; pods route it to the node (default route).
pub const DEFAULT_LOOPBACK4: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
/// Source of hairpin flows over IPv6: from the discard-only prefix
/// `100::/64` (RFC 6666), which no network routes; an IPv6 link-local
/// address would need neighbour discovery on every pod link.
pub const DEFAULT_LOOPBACK6: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0x6c62, 1);

/// How translated packets leave the node (`--forward`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ForwardMode {
    /// The kernel stack routes them: netfilter's FORWARD chain (and the
    /// `NetworkPolicy` engines there) sees the translated packet, as after
    /// kube-proxy's DNAT.
    #[default]
    Stack,
    /// The datapath redirects them to the egress device (FIB lookup):
    /// faster, but netfilter FORWARD never sees them, so `NetworkPolicy`
    /// enforced there does not apply to Service traffic.
    Redirect,
}

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
    /// `--forward`.
    pub forward: ForwardMode,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            name: String::new(),
            addresses: Vec::new(),
            zone: None,
            loopback4: DEFAULT_LOOPBACK4,
            loopback6: DEFAULT_LOOPBACK6,
            forward: ForwardMode::Stack,
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
        flags: match settings.forward {
            ForwardMode::Stack => 0,
            ForwardMode::Redirect => config_flags::FORWARD_REDIRECT,
        },
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
}
