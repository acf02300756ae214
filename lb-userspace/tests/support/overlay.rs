//! The two-node lab of `harness_overlay.rs`: node A and node B joined by
//! an underlay veth and, over it, by one of the links pod traffic takes in
//! real clusters: a VXLAN device (flannel, Calico VXLAN), an L3 device
//! without Ethernet header (IPIP, ip6ip6, `WireGuard`; here a tun pair with
//! a relay, see `tun_relay`), or plain routing over the underlay. A client
//! pod on A, a backend pod on B, an agent on each node.
//!
//! ```text
//!   client (198.18.1.2, fd00:1::2)          be (198.18.2.2, fd00:2::2)
//!     | h-client                               | h-be
//!   node-a [lb, node IP 198.18.101.1 on lo]  node-b [lb, node IP 198.18.102.2 on lo]
//!     | ul-a 198.18.100.1 ------------------ ul-b 198.18.100.2 (underlay)
//!     | ovl: vx-a / tun-a  <= overlay =>  vx-b / tun-b
//! ```
//!
//! The node IPs (`--node-ip`, where `NodePort` listens and the source of
//! source NAT) live on `lo` and each node routes the other's node IP and
//! pod subnet through the overlay, so that both service traffic and the
//! replies of source-NATed flows cross it, as pod traffic does in an
//! overlay cluster. Every namespace, process and pin goes on drop.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::clients::http_get;
use super::manifests::{Manifest, ManifestDir};
use super::netns::{Netns, ns_command, sweep_stale_netns, unique_prefix};
use super::pins::{PinGuard, sweep_stale_pins};
use super::process::{
    ChildGuard, METRICS_ADDR, TempDir, lb_binary, metrics_addr, require_tools, spawn_logged,
};
use super::servers::Servers;
use super::topo::{Dual, Family, Pod, address, node_netns};
use super::tun_relay::TunRelay;

const TAG: &str = "lbo";
const PIN_TAG: &str = "lbo-pins-";
/// Port the backend serves, TCP and UDP.
pub(crate) const BACKEND_PORT: u16 = 8080;

/// How pod traffic crosses from one node to the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    /// VXLAN over the underlay (an Ethernet device).
    Vxlan,
    /// A device without Ethernet header carrying both families, as
    /// `WireGuard`'s (`ARPHRD_NONE`; IPIP's and ip6ip6's are `ARPHRD_TUNNEL`
    /// and `ARPHRD_TUNNEL6`, the same packet layout at TC). The test
    /// kernel has neither IPIP, ip6ip6, GRE nor `WireGuard`
    /// (`CONFIG_NET_IPIP`, `CONFIG_IPV6_TUNNEL`, `CONFIG_WIREGUARD` unset),
    /// so it is a tun pair with a relay (`tun_relay`).
    L3,
    /// Routes via the underlay veth.
    Routed,
}

/// Node I's address on `lo`: `--node-ip` (198.18.101.1 / 198.18.102.2).
pub(crate) fn node_ip(i: usize) -> Dual {
    if i == 0 {
        Dual::host(101, 1)
    } else {
        Dual::host(102, 2)
    }
}

pub(crate) struct Node {
    pub(crate) name: &'static str,
    pub(crate) netns: Netns,
    /// Interfaces the agent attaches to.
    pub(crate) attach: Vec<String>,
}

/// Namespaces and links (dropping it deletes every namespace, pods first).
pub(crate) struct Topology {
    /// The L3 link's relay (stops before the namespaces go).
    _relay: Option<TunRelay>,
    pub(crate) client: Pod,
    pub(crate) backend: Pod,
    pub(crate) nodes: [Node; 2],
}

/// Side S ("a" or "b") of a link named BASE.
fn side(base: &str, s: usize) -> String {
    format!("{base}-{}", ["a", "b"][s])
}

impl Topology {
    fn build(prefix: &str, link: Link, attach_overlay_on_a: bool) -> Self {
        let a = node_netns(&format!("{prefix}-node-a"));
        let b = node_netns(&format!("{prefix}-node-b"));
        a.ip(&[
            "link",
            "add",
            "ul-a",
            "type",
            "veth",
            "peer",
            "name",
            "ul-b",
            "netns",
            b.name(),
        ]);
        address(&a, "ul-a", Dual::host(100, 1));
        address(&b, "ul-b", Dual::host(100, 2));
        for (i, ns) in [&a, &b].iter().enumerate() {
            let ip = node_ip(i);
            ns.ip(&["addr", "add", &format!("{}/32", ip.v4), "dev", "lo"]);
            ns.ip(&["-6", "addr", "add", &format!("{}/128", ip.v6), "dev", "lo"]);
            ns.ip(&["link", "set", "lo", "up"]);
            ns.sysctls(&[(&format!("net/ipv4/conf/{}/rp_filter", side("ul", i)), "0")]);
        }
        let relay = (link == Link::L3)
            .then(|| TunRelay::start(a.name(), &side("tun", 0), b.name(), &side("tun", 1)));
        let client = Pod::wire(&a, prefix, "client", "h-client", 1).on_node(0);
        let backend = Pod::wire(&b, prefix, "be", "h-be", 2).on_node(1);
        // What each node routes through the overlay: the other's pod subnet
        // and node IP.
        let remote = [
            [Dual::host(2, 0), node_ip(1)],
            [Dual::host(1, 0), node_ip(0)],
        ];
        let overlay = [
            wire_overlay(&a, 0, link, &remote[0]),
            wire_overlay(&b, 1, link, &remote[1]),
        ];
        let [overlay_a, overlay_b] = overlay;
        let mut attach_a = vec!["h-client".to_owned()];
        if attach_overlay_on_a {
            attach_a.extend(overlay_a);
        }
        let mut attach_b = vec!["h-be".to_owned()];
        attach_b.extend(overlay_b);
        Self {
            _relay: relay,
            client,
            backend,
            nodes: [
                Node {
                    name: "node-a",
                    netns: a,
                    attach: attach_a,
                },
                Node {
                    name: "node-b",
                    netns: b,
                    attach: attach_b,
                },
            ],
        }
    }
}

/// Sets up node I's side (in NS) of LINK and its routes to REMOTE (the
/// other node's pod subnet and node IP) through it; returns the devices
/// the pod traffic crosses.
fn wire_overlay(ns: &Netns, i: usize, link: Link, remote: &[Dual; 2]) -> Vec<String> {
    let mut devices = Vec::new();
    let (me, peer) = (
        Dual::host(100, 1 + u8::from(i == 1)),
        Dual::host(100, 2 - u8::from(i == 1)),
    );
    let prefixes = |d: Dual, k: usize| {
        if k == 0 {
            (format!("{}/24", d.v4), format!("{}/64", d.v6))
        } else {
            (format!("{}/32", d.v4), format!("{}/128", d.v6))
        }
    };
    match link {
        Link::Vxlan => {
            let dev = side("vx", i);
            ns.ip(&[
                "link",
                "add",
                &dev,
                "type",
                "vxlan",
                "id",
                "42",
                "local",
                &me.v4.to_string(),
                "remote",
                &peer.v4.to_string(),
                "dstport",
                "4789",
                "dev",
                &side("ul", i),
            ]);
            let own = Dual::host(50, 1 + u8::from(i == 1));
            let via = Dual::host(50, 2 - u8::from(i == 1));
            address(ns, &dev, own);
            ns.sysctls(&[(&format!("net/ipv4/conf/{dev}/rp_filter"), "0")]);
            for (k, d) in remote.iter().enumerate() {
                let (p4, p6) = prefixes(*d, k);
                ns.ip(&["route", "add", &p4, "via", &via.v4.to_string()]);
                ns.ip(&["-6", "route", "add", &p6, "via", &via.v6.to_string()]);
            }
            devices.push(dev);
        }
        Link::L3 => {
            let dev = side("tun", i);
            ns.ip(&["link", "set", &dev, "up"]);
            ns.sysctls(&[(&format!("net/ipv4/conf/{dev}/rp_filter"), "0")]);
            for (k, d) in remote.iter().enumerate() {
                let (p4, p6) = prefixes(*d, k);
                ns.ip(&["route", "add", &p4, "dev", &dev]);
                ns.ip(&["-6", "route", "add", &p6, "dev", &dev]);
            }
            devices.push(dev);
        }
        Link::Routed => {
            for (k, d) in remote.iter().enumerate() {
                let (p4, p6) = prefixes(*d, k);
                ns.ip(&["route", "add", &p4, "via", &peer.v4.to_string()]);
                ns.ip(&["-6", "route", "add", &p6, "via", &peer.v6.to_string()]);
            }
            devices.push(side("ul", i));
        }
    }
    devices
}

/// Topology + server + manifests + both agents; drops in this order.
pub(crate) struct OverlayLab {
    agents: Vec<ChildGuard>,
    pins: Vec<PinGuard>,
    _servers: Servers,
    pub(crate) topo: Topology,
    manifests: ManifestDir,
    logs: Vec<PathBuf>,
    _work: TempDir,
}

impl OverlayLab {
    /// Builds the topology over LINK with MANIFEST in place, starts both
    /// agents and waits until both are ready. Without
    /// `attach_overlay_on_a`, node A's agent is on the client's interface
    /// only: replies then enter A through a device without the program.
    pub(crate) fn new(
        link: Link,
        attach_overlay_on_a: bool,
        manifest: &dyn Fn(&Topology) -> Manifest,
    ) -> Self {
        require_tools(&["ip", "nsenter"]);
        sweep_stale_netns(TAG);
        sweep_stale_pins(PIN_TAG);
        let prefix = unique_prefix(TAG);
        let work = TempDir::create(&prefix);
        let manifests = ManifestDir::create(&work);
        let topo = Topology::build(&prefix, link, attach_overlay_on_a);
        let servers = Servers::start(&[&topo.backend], &[BACKEND_PORT]);
        manifests.write("services.yaml", &manifest(&topo));
        let pins = topo
            .nodes
            .iter()
            .map(|n| PinGuard::new(PIN_TAG, n.netns.name()))
            .collect();
        let logs = topo
            .nodes
            .iter()
            .map(|n| work.0.join(format!("agent-{}.log", n.name)))
            .collect();
        eprintln!("overlay lab {prefix} ({link:?}): work {}", work.0.display());
        let mut lab = Self {
            agents: Vec::new(),
            pins,
            _servers: servers,
            topo,
            manifests,
            logs,
            _work: work,
        };
        for i in 0..2 {
            let node = &lab.topo.nodes[i];
            let ip = node_ip(i);
            let mut cmd = ns_command(node.netns.name(), lb_binary());
            cmd.arg("agent")
                .arg("--source")
                .arg(lab.manifests.source())
                .arg("--attach")
                .arg(node.attach.join(","))
                .arg("--pin-path")
                .arg(&lab.pins[i].path)
                .arg("--metrics-addr")
                .arg(METRICS_ADDR)
                .arg("--node-name")
                .arg(node.name)
                .arg("--node-ip")
                .arg(format!("{},{}", ip.v4, ip.v6))
                // The socket programs would attach to the machine's cgroup
                // root; this lab is about the TC path.
                .arg("--socket-lb=off");
            lab.agents.push(spawn_logged(&mut cmd, &lab.logs[i]));
        }
        for i in 0..2 {
            lab.wait_ready(i);
        }
        lab
    }

    fn wait_ready(&mut self, i: usize) {
        let start = Instant::now();
        let mut last = String::from("never asked");
        while start.elapsed() < Duration::from_secs(15) {
            self.agents[i].assert_alive(self.topo.nodes[i].name);
            match http_get(self.topo.nodes[i].netns.name(), metrics_addr(), "/readyz") {
                Ok((200, _)) => return,
                Ok((code, body)) => last = format!("HTTP {code} {body}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "agent of {} not ready within 15 s (last /readyz: {last})",
            self.topo.nodes[i].name
        );
    }

    pub(crate) fn client_ns(&self) -> &str {
        self.topo.client.ns()
    }

    /// The backend's address of FAMILY on the backend port.
    pub(crate) fn backend_addr(&self, family: Family) -> SocketAddr {
        self.topo.backend.addr.sock(family, BACKEND_PORT)
    }

    /// Node I's address of FAMILY.
    pub(crate) fn node_ip(i: usize, family: Family) -> IpAddr {
        node_ip(i).get(family)
    }

    pub(crate) fn assert_agents_alive(&mut self) {
        for (i, agent) in self.agents.iter_mut().enumerate() {
            agent.assert_alive(self.topo.nodes[i].name);
        }
    }
}

impl Drop for OverlayLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.logs {
                eprintln!(
                    "---- {} ----\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            eprint!("{}", super::panics::recap());
        }
    }
}
