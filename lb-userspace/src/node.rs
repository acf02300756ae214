//! What the agent knows about its node: name, addresses (for `NodePort` and
//! for source NAT), zone, and the hairpin loopback addresses; where each
//! comes from, in order: flags, the Node object (kube source), the
//! addresses configured on the interfaces of this network namespace.
//!
//! Which node addresses `NodePort`s listen on follows kube-proxy's
//! `--nodeport-addresses`: `primary` (its nftables mode's default), one
//! address per family, or the interface addresses inside given CIDRs.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

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
    /// `--node-ip`: the node's addresses; the first of each family is its
    /// primary address (`NodePort` with `primary`, and the source of SNAT
    /// towards endpoints on other nodes).
    pub addresses: Vec<IpAddr>,
    /// `--nodeport-addresses`.
    pub nodeport_addresses: NodePortAddresses,
    /// `--zone`: topology zone.
    pub zone: Option<String>,
    /// Hairpin source, IPv4.
    pub loopback4: Ipv4Addr,
    /// Hairpin source, IPv6.
    pub loopback6: Ipv6Addr,
    /// `--source-ranges-strict`: see [`NodeContext::source_ranges_strict`].
    pub source_ranges_strict: bool,
    /// `--forward`.
    pub forward: ForwardMode,
    /// `--cluster-cidr`: the cluster's pod CIDRs; a `ClusterIP` flow from
    /// outside them to an endpoint on another node is source-NATed to the
    /// node. Empty: no such source NAT.
    pub cluster_cidrs: ClusterCidrs,
}

/// `--cluster-cidr`: comma-separated CIDRs of both families (kube-proxy's
/// `--cluster-cidr`, dual-stack as `IPv4CIDR,IPv6CIDR`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterCidrs(pub Vec<(IpAddr, u8)>);

/// A `--cluster-cidr` item that is not a CIDR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a CIDR (ADDRESS/PREFIX)")]
pub struct ClusterCidrError(String);

impl FromStr for ClusterCidrs {
    type Err = ClusterCidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.split_once('/')
                    .and_then(|_| crate::model::parse_cidr(item))
                    .ok_or_else(|| ClusterCidrError(item.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl fmt::Display for ClusterCidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|(ip, prefix)| format!("{ip}/{prefix}"))
            .collect();
        f.write_str(&items.join(","))
    }
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            name: String::new(),
            addresses: Vec::new(),
            nodeport_addresses: NodePortAddresses::Primary,
            zone: None,
            loopback4: DEFAULT_LOOPBACK4,
            loopback6: DEFAULT_LOOPBACK6,
            source_ranges_strict: false,
            forward: ForwardMode::Stack,
            cluster_cidrs: ClusterCidrs::default(),
        }
    }
}

/// `--nodeport-addresses`, with kube-proxy's syntax and meaning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// `primary`: the node's primary address of each family (kube-proxy's
    /// nftables default).
    #[default]
    Primary,
    /// CIDRs (host bits cleared): every address of this namespace's
    /// interfaces inside one of them; a family none of them is of gets all
    /// of its addresses (kube-proxy: that family's zero CIDR).
    Cidrs(Vec<(IpAddr, u8)>),
}

/// A `--nodeport-addresses` value that is neither `primary` nor CIDRs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodePortAddressesError {
    #[error("{0:?} is not a CIDR (nor \"primary\")")]
    NotACidr(String),
    #[error("\"primary\" cannot be combined with CIDRs")]
    PrimaryWithCidrs,
}

impl FromStr for NodePortAddresses {
    type Err = NodePortAddressesError;

    /// `primary`, or a comma-separated list of CIDRs.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let items: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .collect();
        if items.is_empty() || items == ["primary"] {
            return Ok(Self::Primary);
        }
        let mut cidrs = Vec::with_capacity(items.len());
        for item in items {
            if item == "primary" {
                return Err(NodePortAddressesError::PrimaryWithCidrs);
            }
            let cidr = item
                .split_once('/')
                .and_then(|_| crate::model::parse_cidr(item))
                .ok_or_else(|| NodePortAddressesError::NotACidr(item.to_owned()))?;
            cidrs.push(cidr);
        }
        Ok(Self::Cidrs(cidrs))
    }
}

impl fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Primary => f.write_str("primary"),
            Self::Cidrs(cidrs) => {
                for (index, (addr, len)) in cidrs.iter().enumerate() {
                    if index > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{addr}/{len}")?;
                }
                Ok(())
            }
        }
    }
}

/// The model's view of the node: flags win over what the source knows
/// (`from_source`: the Node object, if any); without either, the global
/// addresses of this namespace's interfaces.
#[must_use]
pub fn context(settings: &NodeSettings, from_source: &NodeContext) -> NodeContext {
    let interfaces = || interface_addresses();
    NodeContext {
        name: if settings.name.is_empty() {
            from_source.name.clone()
        } else {
            settings.name.clone()
        },
        addresses: nodeport_addresses(settings, &from_source.addresses, interfaces),
        zone: settings.zone.clone().or_else(|| from_source.zone.clone()),
        source_ranges_strict: settings.source_ranges_strict,
    }
}

/// The addresses `NodePort`s listen on, the primary address of each
/// family first (it is the source of SNAT, see [`datapath_config`]).
/// The node's addresses are `--node-ip`, else the Node object's (its
/// `InternalIP`s before its `ExternalIP`s), else the interfaces'; the
/// first of each family is the primary one, as kube-proxy's node IPs.
fn nodeport_addresses(
    settings: &NodeSettings,
    from_source: &[IpAddr],
    interfaces: impl Fn() -> Vec<IpAddr>,
) -> Vec<IpAddr> {
    let node_ips = if !settings.addresses.is_empty() {
        settings.addresses.clone()
    } else if !from_source.is_empty() {
        from_source.to_vec()
    } else {
        interfaces()
    };
    let primary: Vec<IpAddr> = [true, false]
        .into_iter()
        .filter_map(|ipv4| node_ips.iter().copied().find(|ip| ip.is_ipv4() == ipv4))
        .collect();
    let NodePortAddresses::Cidrs(cidrs) = &settings.nodeport_addresses else {
        return primary;
    };
    let selected = |addr: &IpAddr| {
        let mut of_family = cidrs
            .iter()
            .filter(|(prefix, _)| prefix.is_ipv4() == addr.is_ipv4())
            .peekable();
        of_family.peek().is_none()
            || of_family.any(|&(prefix, len)| crate::model::prefix_contains((prefix, len), *addr))
    };
    let mut addresses: Vec<IpAddr> = interfaces().into_iter().filter(selected).collect();
    // The primary address of a family, if selected, leads its family.
    addresses.sort_by_key(|addr| !primary.contains(addr));
    addresses.dedup();
    addresses
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
        } | if settings.cluster_cidrs.0.is_empty() {
            0
        } else {
            config_flags::CLUSTER_CIDR
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

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn flags_win_then_source_then_interfaces() {
        let source = NodeContext {
            name: "node-a".into(),
            addresses: ips(&["198.18.0.1"]),
            zone: Some("z1".into()),
            ..NodeContext::default()
        };
        let flags = NodeSettings {
            addresses: ips(&["fd00::1"]),
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
    fn primary_is_one_address_per_family_the_first() {
        let interfaces = || ips(&["192.0.2.99"]);
        let settings = NodeSettings::default();
        // The Node's: InternalIPs come first (the kube source orders them).
        let node = ips(&["192.0.2.10", "2001:db8::10", "203.0.113.7", "2001:db8::77"]);
        assert_eq!(
            nodeport_addresses(&settings, &node, interfaces),
            ips(&["192.0.2.10", "2001:db8::10"])
        );
        // Flags win; without flags or a Node, the interfaces.
        let flags = NodeSettings {
            addresses: ips(&["fd00::1", "fd00::2", "198.18.0.1", "198.18.0.2"]),
            ..NodeSettings::default()
        };
        assert_eq!(
            nodeport_addresses(&flags, &node, interfaces),
            ips(&["198.18.0.1", "fd00::1"])
        );
        assert_eq!(
            nodeport_addresses(&settings, &[], interfaces),
            ips(&["192.0.2.99"])
        );
    }

    #[test]
    fn cidrs_select_interface_addresses_primary_first() {
        let interfaces = || {
            ips(&[
                "10.0.0.5",
                "192.0.2.10",
                "192.0.2.11",
                "2001:db8::10",
                "fd00::5",
            ])
        };
        let settings = |cidrs: &str| NodeSettings {
            nodeport_addresses: cidrs.parse().unwrap(),
            ..NodeSettings::default()
        };
        let node = ips(&["192.0.2.11", "fd00::5"]);
        // Only IPv4 CIDRs: IPv6 gets all its addresses (its zero CIDR).
        assert_eq!(
            nodeport_addresses(&settings("192.0.2.0/24"), &node, interfaces),
            ips(&["192.0.2.11", "fd00::5", "192.0.2.10", "2001:db8::10"])
        );
        assert_eq!(
            nodeport_addresses(&settings("10.0.0.0/8, 2001:db8::/64"), &node, interfaces),
            ips(&["10.0.0.5", "2001:db8::10"])
        );
        // Everything; the interfaces' first of each family lead.
        assert_eq!(
            nodeport_addresses(&settings("0.0.0.0/0,::/0"), &[], interfaces),
            ips(&[
                "10.0.0.5",
                "2001:db8::10",
                "192.0.2.10",
                "192.0.2.11",
                "fd00::5"
            ])
        );
    }

    #[test]
    fn nodeport_addresses_parse_as_kube_proxy_reads_them() {
        assert_eq!("primary".parse(), Ok(NodePortAddresses::Primary));
        assert_eq!("".parse(), Ok(NodePortAddresses::Primary));
        assert_eq!(
            "010.0.0.1/8,fd00::/64"
                .parse::<NodePortAddresses>()
                .map(|a| a.to_string()),
            Ok("10.0.0.0/8,fd00::/64".to_owned())
        );
        assert_eq!(
            "primary,10.0.0.0/8".parse::<NodePortAddresses>(),
            Err(NodePortAddressesError::PrimaryWithCidrs)
        );
        for bad in ["10.0.0.1", "10.0.0.0/33", "eth0"] {
            assert_eq!(
                bad.parse::<NodePortAddresses>(),
                Err(NodePortAddressesError::NotACidr(bad.to_owned()))
            );
        }
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
            ..NodeContext::default()
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
    fn cluster_cidrs_parse_both_families_or_name_the_bad_item() {
        let cidrs: ClusterCidrs = "10.244.0.0/16, fd00:10:244::/56".parse().unwrap();
        assert_eq!(
            cidrs.0,
            [
                ("10.244.0.0".parse().unwrap(), 16),
                ("fd00:10:244::".parse().unwrap(), 56)
            ]
        );
        assert_eq!(cidrs.to_string(), "10.244.0.0/16,fd00:10:244::/56");
        assert_eq!("".parse::<ClusterCidrs>().unwrap(), ClusterCidrs::default());
        for bad in ["10.244.0.0", "10.244.0.0/33", "pods/16"] {
            let error = bad.parse::<ClusterCidrs>().unwrap_err().to_string();
            assert!(error.contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn cluster_cidrs_set_the_datapath_flag() {
        let context = NodeContext::default();
        let without = datapath_config(&NodeSettings::default(), &context);
        assert_eq!(without.flags & config_flags::CLUSTER_CIDR, 0);
        let settings = NodeSettings {
            cluster_cidrs: "10.244.0.0/16".parse().unwrap(),
            forward: ForwardMode::Redirect,
            ..NodeSettings::default()
        };
        let with = datapath_config(&settings, &context);
        assert_eq!(
            with.flags,
            config_flags::CLUSTER_CIDR | config_flags::FORWARD_REDIRECT
        );
    }
}
