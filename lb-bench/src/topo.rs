//! The end-to-end topology: one client, one backend, and one "node" per
//! contender between them, so that each contender's rules live alone in its
//! own node namespace (netfilter conntrack, once a NAT rule exists in a
//! namespace, taxes every packet there; `lb` and direct must not pay for it).
//!
//! ```text
//!                      client (198.18.(16+K).2, fd00:1K::2 on c-K)
//!          c-0 |            c-1 |            c-2 |            c-3 |
//!   node-direct        node-lb (TC: lb)   node-nft (nft)     node-ipt (iptables)
//!          b-0 |            b-1 |            b-2 |            b-3 |
//!                      backend (lo: 198.18.2.2-11, fd00:2::2-b; nginx, iperf3)
//! ```
//!
//! Every address comes from 198.18.0.0/15 and `fd00::/8` (see `rules`); nothing
//! is added to the root namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;

use crate::rules::{Contender, ENDPOINTS, Family, real_endpoint};
use crate::sys::Netns;

/// Node-side interface names (the same in every node namespace).
pub const NODE_CLIENT_IF: &str = "to-client";
pub const NODE_BACKEND_IF: &str = "to-backend";

/// The namespaces; dropping this deletes them (and the veth pairs with them).
pub struct Topology {
    pub client: Netns,
    pub backend: Netns,
    /// Node namespaces, indexed by `Contender::index`.
    pub nodes: Vec<Netns>,
}

/// The address of HOST on link K of SIDE (0x10: client links, 0x20: backend links).
pub(crate) fn link_addr(side: u8, k: u8, host: u8, family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, side + k, host)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            u16::from(side + k),
            0,
            0,
            0,
            0,
            0,
            u16::from(host),
        )),
    }
}

/// The tuning every namespace gets: no DAD, wide port range, `TIME_WAIT`
/// capped, large accept queues (the benchmark's own namespaces only).
const COMMON_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
    ("net/ipv4/ip_local_port_range", "1024 65535"),
    ("net/ipv4/tcp_tw_reuse", "1"),
    ("net/ipv4/tcp_max_tw_buckets", "4096"),
    ("net/core/somaxconn", "8192"),
    ("net/ipv4/tcp_max_syn_backlog", "8192"),
];

impl Topology {
    /// Builds the namespaces, links, addresses and routes.
    ///
    /// # Errors
    /// An `ip` command or a sysctl failed (whatever was created is deleted).
    pub fn build() -> anyhow::Result<Self> {
        let client = Netns::create("client")?;
        let backend = Netns::create("backend")?;
        let mut nodes = Vec::new();
        for contender in Contender::ALL {
            nodes.push(Netns::create(&format!("node-{}", contender.name()))?);
        }
        let topo = Self {
            client,
            backend,
            nodes,
        };
        topo.wire().context("build the benchmark topology")?;
        Ok(topo)
    }

    pub fn node(&self, contender: Contender) -> &Netns {
        &self.nodes[usize::from(contender.index())]
    }

    #[expect(clippy::too_many_lines, reason = "the wiring, step by step")]
    fn wire(&self) -> anyhow::Result<()> {
        self.client.sysctls(COMMON_SYSCTLS)?;
        self.backend.sysctls(COMMON_SYSCTLS)?;
        // The backend's endpoint addresses live on its loopback.
        for family in Family::BOTH {
            for b in 0..ENDPOINTS {
                let (addr, len) = match real_endpoint(family, b) {
                    a @ IpAddr::V4(_) => (a, 32),
                    a @ IpAddr::V6(_) => (a, 128),
                };
                self.backend
                    .ip(&["addr", "add", &format!("{addr}/{len}"), "dev", "lo"])?;
            }
        }
        for contender in Contender::ALL {
            let k = contender.index();
            let node = self.node(contender);
            node.sysctls(COMMON_SYSCTLS)?;
            node.sysctls(&[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
                ("net/ipv4/conf/all/rp_filter", "0"),
                ("net/ipv4/conf/default/rp_filter", "0"),
            ])?;
            let c_if = format!("c-{k}");
            let b_if = format!("b-{k}");
            node.ip(&[
                "link",
                "add",
                NODE_CLIENT_IF,
                "type",
                "veth",
                "peer",
                "name",
                &c_if,
                "netns",
                self.client.name(),
            ])?;
            node.ip(&[
                "link",
                "add",
                NODE_BACKEND_IF,
                "type",
                "veth",
                "peer",
                "name",
                &b_if,
                "netns",
                self.backend.name(),
            ])?;
            for family in Family::BOTH {
                let (v, len) = match family {
                    Family::V4 => ("-4", 24),
                    Family::V6 => ("-6", 64),
                };
                let pairs = [
                    (node, NODE_CLIENT_IF, link_addr(0x10, k, 1, family)),
                    (&self.client, c_if.as_str(), link_addr(0x10, k, 2, family)),
                    (node, NODE_BACKEND_IF, link_addr(0x20, k, 1, family)),
                    (&self.backend, b_if.as_str(), link_addr(0x20, k, 2, family)),
                ];
                for (ns, iface, addr) in pairs {
                    let mut args = vec![v, "addr", "add"];
                    let cidr = format!("{addr}/{len}");
                    args.extend([cidr.as_str(), "dev", iface]);
                    if family == Family::V6 {
                        args.push("nodad");
                    }
                    ns.ip(&args)?;
                }
            }
            for (ns, iface) in [
                (node, NODE_CLIENT_IF),
                (node, NODE_BACKEND_IF),
                (&self.client, c_if.as_str()),
                (&self.backend, b_if.as_str()),
            ] {
                ns.ip(&["link", "set", iface, "up"])?;
            }
            node.sysctls(&[
                (&format!("net/ipv4/conf/{NODE_CLIENT_IF}/rp_filter"), "0"),
                (&format!("net/ipv4/conf/{NODE_BACKEND_IF}/rp_filter"), "0"),
            ])?;
            for family in Family::BOTH {
                let v = if family == Family::V4 { "-4" } else { "-6" };
                let (endpoints, client_net) = match family {
                    Family::V4 => (
                        "198.18.2.0/24".to_owned(),
                        format!("198.18.{}.0/24", 0x10 + k),
                    ),
                    Family::V6 => (
                        "fd00:2::/64".to_owned(),
                        format!("fd00:{:x}::/64", 0x10 + k),
                    ),
                };
                let node_b = link_addr(0x20, k, 1, family).to_string();
                let backend_side = link_addr(0x20, k, 2, family).to_string();
                let node_c = link_addr(0x10, k, 1, family).to_string();
                // Node: endpoints via the backend link.
                node.ip(&[v, "route", "add", &endpoints, "via", &backend_side])?;
                // Backend: this contender's client link via this node.
                self.backend
                    .ip(&[v, "route", "add", &client_net, "via", &node_b])?;
                // Client: this contender's service range (direct: the endpoints).
                let target = match (contender, family) {
                    (Contender::Direct, _) => endpoints.clone(),
                    (_, Family::V4) => format!("198.18.{}.0/18", 64 * k),
                    (_, Family::V6) => format!("fd00:96:{k}::/64"),
                };
                self.client
                    .ip(&[v, "route", "add", &target, "via", &node_c])?;
            }
        }
        Ok(())
    }
}
