//! Building blocks of the test topologies: address families, the address
//! plan, node namespaces and pods wired to a node by a veth pair. Every
//! link is created directly inside namespaces the test owns, never in the
//! root namespace.
//!
//! Address plan: pod subnet K is `198.18.K.0/24` and `fd00:K::/64` (the
//! decimal digits of K read as hex, so subnet 200 is `fd00:200::`); the
//! node side of a pod's link is `.1` / `::1`, the pod `.2` / `::2`.
//! Service addresses are in `198.19.0.0/16` and `fd00:96::/32`-style
//! blocks that are never on a link.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::netns::Netns;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) const BOTH: [Self; 2] = [Self::V4, Self::V6];

    pub(crate) fn of(addr: SocketAddr) -> Self {
        if addr.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    /// The wildcard address, port 0 (for binding a client socket).
    pub(crate) fn unspecified(self) -> SocketAddr {
        match self {
            Self::V4 => (Ipv4Addr::UNSPECIFIED, 0).into(),
            Self::V6 => (Ipv6Addr::UNSPECIFIED, 0).into(),
        }
    }
}

/// One address of each family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dual {
    pub(crate) v4: Ipv4Addr,
    pub(crate) v6: Ipv6Addr,
}

/// The decimal digits of K read as hex, so that subnet 200 is `fd00:200::`.
fn hex_digits(k: u8) -> u16 {
    u16::from_str_radix(&k.to_string(), 16).expect("decimal digits are hex digits")
}

impl Dual {
    /// `198.18.K.H` and `fd00:K::H`.
    pub(crate) fn host(k: u8, h: u8) -> Self {
        Self {
            v4: Ipv4Addr::new(198, 18, k, h),
            v6: Ipv6Addr::new(0xfd00, hex_digits(k), 0, 0, 0, 0, 0, hex_digits(h)),
        }
    }

    /// `198.19.BLOCK.N` and `fd00:SIX::N`: service addresses (never on a link).
    pub(crate) fn service(block: u8, six: u16, n: u8) -> Self {
        Self {
            v4: Ipv4Addr::new(198, 19, block, n),
            v6: Ipv6Addr::new(0xfd00, six, 0, 0, 0, 0, 0, hex_digits(n)),
        }
    }

    pub(crate) fn get(self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.v4),
            Family::V6 => IpAddr::V6(self.v6),
        }
    }

    pub(crate) fn sock(self, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.get(family), port)
    }

    /// Both addresses, v4 first.
    pub(crate) fn both(self) -> [IpAddr; 2] {
        [IpAddr::V4(self.v4), IpAddr::V6(self.v6)]
    }

    /// Both addresses as text, v4 first.
    pub(crate) fn strings(self) -> [String; 2] {
        [self.v4.to_string(), self.v6.to_string()]
    }

    /// Whether IP is one of the two.
    pub(crate) fn has(self, ip: IpAddr) -> bool {
        self.both().contains(&ip.to_canonical())
    }
}

/// A node forwards, does not filter by reverse path, and skips duplicate
/// address detection (addresses are usable at once).
const NODE_SYSCTLS: [(&str, &str); 6] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

const POD_SYSCTLS: [(&str, &str); 4] = [
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

/// Creates a node namespace NAME (forwarding on, see `NODE_SYSCTLS`).
pub(crate) fn node_netns(name: &str) -> Netns {
    let node = Netns::create(name);
    node.sysctls(&NODE_SYSCTLS);
    node
}

/// Adds ADDR (v4 /24, v6 /64) to IFACE in NS and brings it up.
pub(crate) fn address(ns: &Netns, iface: &str, addr: Dual) {
    ns.ip(&["addr", "add", &format!("{}/24", addr.v4), "dev", iface]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", addr.v6),
        "dev",
        iface,
        "nodad",
    ]);
    ns.ip(&["link", "set", iface, "up"]);
}

/// A pod or external client: a namespace with `eth0`, whose veth peer
/// `iface` is in a node namespace. Dropping it deletes the namespace (and
/// the veth pair with it).
#[derive(Debug)]
pub(crate) struct Pod {
    /// `client`, `be1`, ... (also what a backend answers).
    pub(crate) name: String,
    /// The node-side veth.
    pub(crate) iface: String,
    /// `198.18.K.2`, `fd00:K::2`.
    pub(crate) addr: Dual,
    /// Index of its node (0 unless `on_node` says otherwise).
    pub(crate) node: usize,
    netns: Netns,
}

impl Pod {
    /// Creates namespace `PREFIX-NAME` on subnet K and its veth pair to
    /// NODE: `eth0` inside, IFACE on the node (reverse-path filter off), a
    /// default route via the node.
    pub(crate) fn wire(node: &Netns, prefix: &str, name: &str, iface: &str, k: u8) -> Self {
        let netns = Netns::create(&format!("{prefix}-{name}"));
        netns.sysctls(&POD_SYSCTLS);
        node.ip(&[
            "link",
            "add",
            iface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ]);
        node.sysctls(&[(&format!("net/ipv4/conf/{iface}/rp_filter"), "0")]);
        let gw = Dual::host(k, 1);
        address(node, iface, gw);
        let addr = Dual::host(k, 2);
        address(&netns, "eth0", addr);
        netns.ip(&["route", "add", "default", "via", &gw.v4.to_string()]);
        netns.ip(&["-6", "route", "add", "default", "via", &gw.v6.to_string()]);
        Self {
            name: name.to_owned(),
            iface: iface.to_owned(),
            addr,
            node: 0,
            netns,
        }
    }

    /// Records that the pod's node is node number NODE.
    pub(crate) fn on_node(self, node: usize) -> Self {
        Self { node, ..self }
    }

    /// The pod's namespace name.
    pub(crate) fn ns(&self) -> &str {
        self.netns.name()
    }
}
