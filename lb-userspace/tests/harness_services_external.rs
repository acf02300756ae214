//! The external paths of a Service (issue 3, behaviours 3 and 4): `NodePort`
//! with externalTrafficPolicy Cluster and Local (and its health check
//! node port), a `LoadBalancer` ingress IP and external IPs, with
//! `loadBalancerSourceRanges` enforced on the load-balancer IP (and, as
//! with kube-proxy, not on the `NodePort`s and external IPs).
//!
//! Runs on the two-node cluster of `support::cluster` (topology and address
//! plan are described there): real TCP/UDP clients and servers, IPv4 and
//! IPv6, dual-stack Services; the assertions are what the clients observe.
//! Each test builds the cluster once and runs named sub-scenarios on it
//! (per behaviour and family); a failing sub-scenario is reported and the
//! others still run, so one run shows every failing behaviour.
//!
//! Everything lives in namespaces the test creates and is removed by drop
//! guards, also when an assertion fails (both agents' logs, `lb services`
//! and `lb conntrack` are printed first). Privileged: root and bpffs.
//!
//! Run: `cargo test -p lb-userspace --test harness_services_external -- --nocapture`

mod support;

use std::net::SocketAddr;

use serde_json::Value;

use support::clients::{
    assert_nodeport_sources, assert_only, assert_source_preserved, assert_spread, assert_timeout,
    http_get, http_get_with_headers, tcp_batch, tcp_once, udp_batch, udp_once,
};
use support::cluster::{Cluster, DENIED_WAIT, ext_ip, lb_ip, ready, service, vip};
use support::manifests::HTTP_DNS;
use support::pins::require_privileged;
use support::scenarios::Scenarios;
use support::serial;
use support::topo::Family;

/// Checks a kube-proxy style health-check answer. `localEndpoints` counts
/// the local ready endpoint addresses of the family the probe came in on
/// (kube-proxy answers from one proxier per family: a dual-stack pod counts
/// once in each), also sent as `X-Load-Balancing-Endpoint-Weight`.
fn assert_health(
    what: &str,
    got: Result<(u16, String, String), String>,
    status: u16,
    local: u64,
    name: &str,
) {
    let (code, headers, body) = got.unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: HTTP {code} {body}");
    assert_eq!(code, status, "{what}: HTTP status (body {body})");
    let json: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{what}: body not JSON ({e}): {body}"));
    assert_eq!(
        json["localEndpoints"].as_u64(),
        Some(local),
        "{what}: localEndpoints in {body}"
    );
    assert_eq!(
        json["service"]["name"].as_str(),
        Some(name),
        "{what}: service name in {body}"
    );
    assert_eq!(
        json["serviceProxyHealthy"].as_bool(),
        Some(true),
        "{what}: the agent is in sync: {body}"
    );
    assert!(
        headers
            .lines()
            .any(|line| line
                .eq_ignore_ascii_case(&format!("X-Load-Balancing-Endpoint-Weight: {local}"))),
        "{what}: X-Load-Balancing-Endpoint-Weight {local} in {headers:?}"
    );
}

/// Behaviours 3 and 4: `NodePort` on both nodes' addresses with
/// externalTrafficPolicy Cluster (source NAT for remote endpoints only) and
/// Local (node-local endpoints, source preserved, health check); a
/// `LoadBalancer` ingress IP and an external IP, with source ranges enforced
/// on the ingress IP.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per behaviour, sharing one topology"
)]
fn nodeport_loadbalancer_and_external_ips() {
    let _serial = serial();
    if !require_privileged("harness_services_external: nodeport_loadbalancer_and_external_ips") {
        return;
    }
    let mut lab = Cluster::new("nodeport");
    let ext = lab.ns("ext");
    let ext2 = lab.ns("ext2");
    let client = lab.ns("client1");
    let node2_ns = lab.topo.nodes[1].ns().to_owned();

    let np_cluster = service(
        "np-cluster",
        20,
        "NodePort",
        &[HTTP_DNS[0].node(30080), HTTP_DNS[1].node(30053)],
    );
    let np_cluster = lab.simple("np-cluster", np_cluster, &[ready("be1"), ready("be3")]);
    lab.apply("np-cluster.json", &np_cluster);

    let np_local = service(
        "np-local",
        21,
        "NodePort",
        &[HTTP_DNS[0].node(30081), HTTP_DNS[1].node(30054)],
    )
    .external_traffic_policy("Local")
    .health_check_node_port(32001)
    .external_ips(ext_ip(21).strings().iter().map(String::as_str));
    let np_local_all = lab.simple(
        "np-local",
        np_local.clone(),
        &[ready("be1"), ready("be2"), ready("be3")],
    );
    lab.apply("np-local.json", &np_local_all);

    let [lb_ip4, lb_ip6] = lb_ip(22).strings();
    let lb = service(
        "lb",
        22,
        "LoadBalancer",
        &[HTTP_DNS[0].node(30082), HTTP_DNS[1].node(30055)],
    )
    .external_ips(ext_ip(22).strings().iter().map(String::as_str))
    .source_ranges(["198.18.200.0/24", "fd00:200::/64"])
    .ingress_ip(&lb_ip4)
    .ingress_ip(&lb_ip6);
    let lb = lab.simple("lb", lb, &[ready("be1"), ready("be3")]);
    lab.apply("lb.json", &lb);

    let mut sc = Scenarios::default();
    for family in Family::BOTH {
        let n1 = lab.node_ip(0, family);
        let n2 = lab.node_ip(1, family);
        sc.run(
            &format!("{family:?} LoadBalancer IP and external IP from ext"),
            || {
                for (path, to) in [
                    ("LB IP", lb_ip(22).sock(family, 80)),
                    ("external IP", ext_ip(22).sock(family, 80)),
                ] {
                    lab.expect_slots(0, to.ip(), 80, "TCP", &["be1:8080", "be3:8080"]);
                    let what = format!("{family:?} ext -> lb {path} {to} TCP");
                    let answers = tcp_batch(&ext, to, 30);
                    assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                    assert_nodeport_sources(&what, &answers, &["be1", "be2"], n1);
                }
                let what = format!("{family:?} ext -> lb LB IP UDP");
                let answers = udp_batch(&ext, lb_ip(22).sock(family, 53), 16);
                assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                assert_nodeport_sources(&what, &answers, &["be1", "be2"], n1);
            },
        );
        sc.run(
            &format!("{family:?} loadBalancerSourceRanges deny ext2 on the LB IP only"),
            || {
                // Control: through the same node, ext2 reaches the external
                // IP of a Service without source ranges (np-local: node1's
                // endpoints, no source NAT).
                let what = format!("{family:?} ext2 -> np-local external IP (no ranges)");
                let answers = tcp_batch(&ext2, ext_ip(21).sock(family, 80), 6);
                assert_only(&what, &answers, &["be1:8080", "be2:8080"]);
                assert_source_preserved(&what, &answers);
                let to = lb_ip(22).sock(family, 80);
                assert_timeout(
                    &format!("{family:?} ext2 -> lb LB IP {to} TCP"),
                    &tcp_once(&ext2, to, DENIED_WAIT),
                );
                assert_timeout(
                    &format!("{family:?} ext2 -> lb LB IP UDP"),
                    &udp_once(&ext2, lb_ip(22).sock(family, 53), DENIED_WAIT),
                );
                // kube-proxy: "nodeports are not subject to
                // loadBalancerSourceRanges" (a cloud load balancer delivers
                // there from its own addresses), nor are external IPs;
                // `--source-ranges-strict` would guard them.
                for (path, to) in [
                    ("external IP", ext_ip(22).sock(family, 80)),
                    ("node1 NodePort", SocketAddr::new(n1, 30082)),
                    ("node2 NodePort", SocketAddr::new(n2, 30082)),
                ] {
                    let what = format!("{family:?} ext2 -> lb {path} {to} TCP");
                    let answers = tcp_batch(&ext2, to, 6);
                    assert_only(&what, &answers, &["be1:8080", "be3:8080"]);
                }
            },
        );
        sc.run(
            &format!("{family:?} LoadBalancer NodePorts allow ext"),
            || {
                for (i, node_ip, local) in [(0, n1, ["be1", "be2"]), (1, n2, ["be3", "be4"])] {
                    let what = format!("{family:?} ext -> lb node{} NodePort TCP", i + 1);
                    let answers = tcp_batch(&ext, SocketAddr::new(node_ip, 30082), 30);
                    assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                    assert_nodeport_sources(&what, &answers, &local, node_ip);
                }
            },
        );
        sc.run(
            &format!("{family:?} NodePort externalTrafficPolicy Cluster"),
            || {
                lab.expect_slots(0, n1, 30080, "TCP", &["be1:8080", "be3:8080"]);
                lab.expect_slots(1, n2, 30080, "TCP", &["be1:8080", "be3:8080"]);
                let what = format!("{family:?} ext -> node1 NodePort TCP");
                let answers = tcp_batch(&ext, SocketAddr::new(n1, 30080), 30);
                assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                assert_nodeport_sources(&what, &answers, &["be1", "be2"], n1);
                let what = format!("{family:?} ext -> node2 NodePort TCP");
                let answers = tcp_batch(&ext, SocketAddr::new(n2, 30080), 30);
                assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                assert_nodeport_sources(&what, &answers, &["be3", "be4"], n2);
                let what = format!("{family:?} ext -> node1 NodePort UDP");
                let answers = udp_batch(&ext, SocketAddr::new(n1, 30053), 24);
                assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                assert_nodeport_sources(&what, &answers, &["be1", "be2"], n1);
            },
        );
        sc.run(
            &format!("{family:?} NodePort externalTrafficPolicy Local"),
            || {
                lab.expect_slots(0, n1, 30081, "TCP", &["be1:8080", "be2:8080"]);
                lab.expect_slots(1, n2, 30081, "TCP", &["be3:8080"]);
                let what = format!("{family:?} ext -> node1 NodePort (ETP Local) TCP");
                let answers = tcp_batch(&ext, SocketAddr::new(n1, 30081), 30);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080"]);
                assert_source_preserved(&what, &answers);
                let what = format!("{family:?} ext -> node2 NodePort (ETP Local) TCP");
                let answers = tcp_batch(&ext, SocketAddr::new(n2, 30081), 10);
                assert_spread(&what, &answers, &["be3:8080"]);
                assert_source_preserved(&what, &answers);
                let what = format!("{family:?} ext -> node1 NodePort (ETP Local) UDP");
                let answers = udp_batch(&ext, SocketAddr::new(n1, 30054), 16);
                assert_only(&what, &answers, &["be1:8080", "be2:8080"]);
                assert_source_preserved(&what, &answers);
                // The ClusterIP of an ETP Local Service still uses every endpoint.
                let what = format!("{family:?} client1 -> np-local ClusterIP");
                let answers = tcp_batch(&client, vip(21).sock(family, 80), 30);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080", "be3:8080"]);
            },
        );
        sc.run(
            &format!("{family:?} node health server (kube-proxy's :10256)"),
            || {
                // What cloud load balancers probe for ETP Cluster Services:
                // the agent is in sync and the node (no Node object with
                // the file source) is not going away.
                for (path, node_eligible) in [("/healthz", Some(true)), ("/livez", None)] {
                    let what = format!("{family:?} ext -> node1:10256{path}");
                    let (code, body) = http_get(&ext, SocketAddr::new(n1, 10256), path)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    eprintln!("{what}: HTTP {code} {body}");
                    assert_eq!(code, 200, "{what}: {body}");
                    let json: Value = serde_json::from_str(&body)
                        .unwrap_or_else(|e| panic!("{what}: body not JSON ({e}): {body}"));
                    assert_eq!(json["healthy"].as_bool(), Some(true), "{what}: {body}");
                    assert_eq!(
                        json["nodeEligible"].as_bool(),
                        node_eligible,
                        "{what}: {body}"
                    );
                }
            },
        );
        sc.run(
            &format!("{family:?} healthCheckNodePort with local endpoints"),
            || {
                assert_health(
                    &format!("{family:?} health check of node1 from ext"),
                    http_get_with_headers(&ext, SocketAddr::new(n1, 32001), "/"),
                    200,
                    2,
                    "np-local",
                );
                assert_health(
                    &format!("{family:?} health check of node2 from node2"),
                    http_get_with_headers(&node2_ns, SocketAddr::new(n2, 32001), "/"),
                    200,
                    1,
                    "np-local",
                );
            },
        );
    }

    // be3 (node2's only local endpoint) leaves np-local.
    let np_local_node1 = lab.simple("np-local", np_local, &[ready("be1"), ready("be2")]);
    lab.apply("np-local.json", &np_local_node1);
    for family in Family::BOTH {
        let n1 = lab.node_ip(0, family);
        let n2 = lab.node_ip(1, family);
        sc.run(
            &format!("{family:?} healthCheckNodePort 503 without local endpoints"),
            || {
                assert_health(
                    &format!("{family:?} health check of node2 without local endpoints"),
                    http_get_with_headers(&node2_ns, SocketAddr::new(n2, 32001), "/"),
                    503,
                    0,
                    "np-local",
                );
                assert_health(
                    &format!("{family:?} health check of node1 after the change"),
                    http_get_with_headers(&ext, SocketAddr::new(n1, 32001), "/"),
                    200,
                    2,
                    "np-local",
                );
            },
        );
        sc.run(
            &format!("{family:?} ETP Local NodePort without local endpoints"),
            || {
                lab.expect_slots(1, n2, 30081, "TCP", &[]);
                // Dropped, as kube-proxy does (node1 has endpoints).
                assert_timeout(
                    &format!("{family:?} ext -> node2 NodePort (no local endpoint)"),
                    &tcp_once(&ext, SocketAddr::new(n2, 30081), DENIED_WAIT),
                );
                let what = format!("{family:?} ext -> node1 NodePort (ETP Local) after the change");
                let answers = tcp_batch(&ext, SocketAddr::new(n1, 30081), 20);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080"]);
                assert_source_preserved(&what, &answers);
            },
        );
    }
    lab.finish(sc);
}
