//! Two nodes joined by an overlay (issue 12, "Replies over overlays and L3
//! devices"): a client pod on node A, its Service's backend on node B, an
//! agent on each node, and the link between them a VXLAN device, a device
//! without an Ethernet header (as IPIP, ip6ip6 and `WireGuard`; the agent
//! attaches `lb_tc_l3` to it), or plain routing (see `support::overlay`).
//!
//! For each link and family: a `ClusterIP` (DNAT on A, the reply crosses
//! back and is translated on A), a `NodePort` with `externalTrafficPolicy:
//! Cluster` on A's node IP (source NAT to A, the reply to A's node IP
//! crosses the overlay) and one with `externalTrafficPolicy: Local` on B's
//! node IP (the request crosses the overlay and is translated where it
//! enters B). With VXLAN, once more with A's agent not attached to the
//! VXLAN device (as when an overlay's device is not in the attach
//! pattern): the reply is then translated at egress of the client's
//! interface.
//!
//! Everything lives in namespaces the test creates and is removed by drop
//! guards, also when an assertion fails (both agents' logs are printed).
//! Privileged: root, bpffs, VXLAN and tun.
//!
//! Run: `cargo test -p lb-userspace --test harness_overlay -- --nocapture`

mod support;

use std::net::SocketAddr;

use support::clients::{
    assert_connected_to, assert_nodeport_sources, assert_only, assert_source_preserved, tcp_batch,
    udp_batch,
};
use support::manifests::{HTTP_DNS_EP, Manifest, SvcPort, service, slice, sp, suffix};
use support::overlay::{Link, OverlayLab, Topology};
use support::pins::require_privileged;
use support::serial;
use support::topo::{Dual, Family};

/// `web` (`ClusterIP`), `npc` (`NodePort`, ETP Cluster), `npl` (`NodePort`,
/// ETP Local): `ClusterIP`s `198.19.0.N`, `fd00:96::N`.
const WEB: u8 = 10;
const NPC: u8 = 11;
const NPL: u8 = 12;
const NPC_PORTS: [u16; 2] = [30080, 30053];
const NPL_PORTS: [u16; 2] = [30081, 30054];

fn vip(n: u8) -> Dual {
    Dual::service(0, 0x96, n)
}

fn ports(node_ports: Option<[u16; 2]>) -> [SvcPort; 2] {
    let http = sp("http", 80, "TCP", "8080");
    let dns = sp("dns", 53, "UDP", "8080");
    match node_ports {
        Some([h, d]) => [http.node(h), dns.node(d)],
        None => [http, dns],
    }
}

/// The three Services, each with the backend pod (on node B) behind it.
fn manifest(topo: &Topology) -> Manifest {
    let services = [
        (
            "web",
            service("web", "ClusterIP", &vip(WEB).both(), &ports(None)),
        ),
        (
            "npc",
            service("npc", "NodePort", &vip(NPC).both(), &ports(Some(NPC_PORTS)))
                .external_traffic_policy("Cluster"),
        ),
        (
            "npl",
            service("npl", "NodePort", &vip(NPL).both(), &ports(Some(NPL_PORTS)))
                .external_traffic_policy("Local"),
        ),
    ];
    let mut manifest = Manifest::default();
    for (name, builder) in services {
        manifest = manifest.with(&builder.build());
        for family in Family::BOTH {
            let endpoint = support::manifests::Cond::Ready
                .endpoint(topo.backend.addr.get(family))
                .node("node-b");
            let slice_name = format!("{name}-{}", suffix(family));
            manifest = manifest.with(&slice(name, &slice_name, family, &HTTP_DNS_EP, [endpoint]));
        }
    }
    manifest
}

/// TCP and UDP from the client to TO [http, dns]: every answer from the
/// backend, the client's sockets connected to TO (replies translated).
fn both_protocols(
    lab: &OverlayLab,
    what: &str,
    to: [SocketAddr; 2],
) -> Vec<support::clients::Answer> {
    let tcp = tcp_batch(lab.client_ns(), to[0], 3);
    assert_connected_to(&format!("{what} TCP"), &tcp, to[0]);
    assert_only(&format!("{what} TCP"), &tcp, &["be:8080"]);
    let udp = udp_batch(lab.client_ns(), to[1], 3);
    assert_connected_to(&format!("{what} UDP"), &udp, to[1]);
    assert_only(&format!("{what} UDP"), &udp, &["be:8080"]);
    tcp.into_iter().chain(udp).collect()
}

fn cluster_ip(lab: &OverlayLab, link: Link, family: Family) {
    let what = format!("{link:?} {family:?} ClusterIP");
    let answers = both_protocols(
        lab,
        &what,
        [vip(WEB).sock(family, 80), vip(WEB).sock(family, 53)],
    );
    assert_source_preserved(&what, &answers);
}

fn node_port_cluster(lab: &OverlayLab, link: Link, family: Family) {
    let what = format!("{link:?} {family:?} NodePort ETP Cluster on node A");
    let node_a = OverlayLab::node_ip(0, family);
    let to = NPC_PORTS.map(|p| SocketAddr::new(node_a, p));
    let answers = both_protocols(lab, &what, to);
    // The backend is on node B: source NAT to node A's address.
    assert_nodeport_sources(&what, &answers, &[], node_a);
}

fn node_port_local(lab: &OverlayLab, link: Link, family: Family) {
    let what = format!("{link:?} {family:?} NodePort ETP Local on node B");
    let node_b = OverlayLab::node_ip(1, family);
    let to = NPL_PORTS.map(|p| SocketAddr::new(node_b, p));
    let answers = both_protocols(lab, &what, to);
    assert_source_preserved(&what, &answers);
}

fn all_paths(link: Link) {
    let _serial = serial();
    if !require_privileged(&format!("harness_overlay: {link:?}")) {
        return;
    }
    let mut lab = OverlayLab::new(link, true, &manifest);
    for family in Family::BOTH {
        cluster_ip(&lab, link, family);
        node_port_cluster(&lab, link, family);
        node_port_local(&lab, link, family);
    }
    lab.assert_agents_alive();
}

#[test]
fn vxlan() {
    all_paths(Link::Vxlan);
}

#[test]
fn l3_device_without_ethernet_header() {
    all_paths(Link::L3);
}

#[test]
fn routed() {
    all_paths(Link::Routed);
}

/// A's agent is on the client's interface only: the `ClusterIP` reply
/// enters A through the VXLAN device without the program and is
/// translated at egress of the client's interface. (A source-NATed reply
/// is addressed to the node itself and never leaves through an egress: it
/// needs the device it enters by attached; README, limits.)
#[test]
fn vxlan_device_not_attached_replies_translated_at_egress() {
    let _serial = serial();
    if !require_privileged("harness_overlay: vxlan, not attached") {
        return;
    }
    let link = Link::Vxlan;
    let mut lab = OverlayLab::new(link, false, &manifest);
    for family in Family::BOTH {
        cluster_ip(&lab, link, family);
        node_port_local(&lab, link, family);
    }
    lab.assert_agents_alive();
}
