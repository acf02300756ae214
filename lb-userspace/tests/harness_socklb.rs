//! Socket-level load balancing (issue 11): a process in the node's own
//! namespace reaches Services through the cgroup programs, not the TC path.
//!
//! The lab of `support::lab` (the agent in a "node" namespace, a client pod
//! and four backend pods). The socket programs are attached to a child
//! cgroup of the unified hierarchy that the test creates
//! (`--cgroup-root`), never to the real root, and only the test's client
//! process (`support::sockclient`, in that cgroup and in the node
//! namespace) is in it. `--socket-lb=hostns` compares with the namespace
//! the agent runs in: the lab's node namespace. The pins (links included)
//! are removed by `lb cleanup` and the cgroup is removed on drop, also on
//! failure. Privileged: root, bpffs, cgroup v2 at /sys/fs/cgroup/unified.
//!
//! Run: `cargo test -p lb-userspace --test harness_socklb -- --nocapture`

mod support;

use std::net::IpAddr;
use std::ops::Range;
use std::process::Command;
use std::time::{Duration, Instant};

use aya::maps::{Array, Map, MapData};
use lb_common::{Addr4, Addr6, SockSlot, limits};
use serde_json::{Value, json};
use support::clients::{http_get, metric_value};
use support::lab::{DNS_PORT, HTTP_PORT, Lab, WEB_PORTS, web_vip};
use support::manifests::{Cond, Manifest, SvcPort, service, slice, sp, suffix};
use support::pins::require_privileged;
use support::process::{daemonset_capabilities, metrics_addr, require_tools, run_ok, wait_until};
use support::serial;
use support::sockclient::{CgroupGuard, SockClient};
use support::topo::{Dual, Family};

/// Cgroup names are `lb-socklb-<pid>-<n>`.
const CGROUP_TAG: &str = "lb-socklb-";
/// The node addresses `NodePort` listens on (the node side of the client
/// pod's link).
const NODE_IPS: &str = "198.18.1.1,fd00:1::1";
const NODE_PORT_HTTP: u16 = 30080;
const NODE_PORT_DNS: u16 = 30053;

/// `edge`: a dual-stack `LoadBalancer` Service (`ClusterIP` .20, external IP
/// and ingress IP) on be3 and be4; `empty`: a `ClusterIP` Service (.30)
/// without endpoints; `closed`: a `ClusterIP` Service (.40) whose endpoint,
/// be3, listens on none of its ports (be3 refuses the connection).
fn edge_and_empty(lab: &Lab) -> Manifest {
    edge_and_empty_with(lab, false)
}

/// `edge_and_empty`, the edge Service with `sessionAffinity: ClientIP`
/// when `sticky`.
fn edge_and_empty_with(lab: &Lab, sticky: bool) -> Manifest {
    let ports = [
        sp("http", HTTP_PORT, "TCP", "8080").node(NODE_PORT_HTTP),
        sp("dns", DNS_PORT, "UDP", "8080").node(NODE_PORT_DNS),
    ];
    let edge = service(
        "edge",
        "LoadBalancer",
        &both(Dual::service(0, 0x96, 0x20)),
        &ports,
    )
    .external_ips(strings(external_ip()).iter().map(String::as_str))
    .ingress_ip(&lb_ip().v4.to_string())
    .ingress_ip(&lb_ip().v6.to_string());
    let edge = if sticky {
        edge.session_affinity("ClientIP")
    } else {
        edge
    };
    let mut manifest = Manifest::default()
        .with(&edge.build())
        .with(&service("empty", "ClusterIP", &both(empty_vip()), &WEB_PORTS).build())
        .with(&service("closed", "ClusterIP", &both(closed_vip()), &CLOSED_PORTS).build());
    let slice_ports = [("http", 8080, "TCP"), ("dns", 8080, "UDP")];
    for family in Family::BOTH {
        let eps = ["be3", "be4"]
            .map(|b| Cond::ready_if(true).endpoint(lab.topo.backend(b).addr.get(family)));
        manifest = manifest
            .with(&slice(
                "edge",
                &format!("edge-{}", suffix(family)),
                family,
                &slice_ports,
                eps,
            ))
            .with(&slice(
                "empty",
                &format!("empty-{}", suffix(family)),
                family,
                &slice_ports,
                [],
            ))
            .with(&slice(
                "closed",
                &format!("closed-{}", suffix(family)),
                family,
                &[("http", CLOSED_TARGET_PORT, "TCP")],
                [Cond::ready_if(true).endpoint(lab.topo.backend("be3").addr.get(family))],
            ));
    }
    manifest
}

fn external_ip() -> Dual {
    Dual::service(1, 0x97, 0x20)
}

fn lb_ip() -> Dual {
    Dual::service(2, 0x98, 0x20)
}

fn empty_vip() -> Dual {
    Dual::service(0, 0x96, 0x30)
}

fn closed_vip() -> Dual {
    Dual::service(0, 0x96, 0x40)
}

/// A port no backend listens on.
const CLOSED_TARGET_PORT: u16 = 8181;

/// `closed`'s one port, to `CLOSED_TARGET_PORT`.
const CLOSED_PORTS: [SvcPort; 1] = [sp("http", HTTP_PORT, "TCP", "8181")];

fn both(d: Dual) -> [IpAddr; 2] {
    [IpAddr::V4(d.v4), IpAddr::V6(d.v6)]
}

fn strings(d: Dual) -> [String; 2] {
    [d.v4.to_string(), d.v6.to_string()]
}

fn node_ip(family: Family) -> IpAddr {
    match family {
        Family::V4 => "198.18.1.1".parse().expect("address"),
        Family::V6 => "fd00:1::1".parse().expect("address"),
    }
}

fn loopback(family: Family) -> IpAddr {
    match family {
        Family::V4 => "127.0.0.1".parse().expect("address"),
        Family::V6 => "::1".parse().expect("address"),
    }
}

/// The lab with `web` (be1, be2), `edge` and `empty`, the agent attached
/// to a child cgroup, and a client in that cgroup in the node namespace.
fn start(mode: &str) -> (Lab, CgroupGuard, SockClient) {
    require_tools(&["python3", "bpftool"]);
    let mut lab = Lab::new();
    let cgroup = CgroupGuard::create(CGROUP_TAG);
    lab.write_manifest("web.json", &lab.web_file(&[("be1", true), ("be2", true)]));
    lab.write_manifest("edge.json", &edge_and_empty(&lab));
    lab.start_agent_with(&agent_flags(&cgroup, mode));
    let since = Instant::now();
    lab.wait_programmed(since, &lab.web_expect(&["be1", "be2"]));
    let client = SockClient::start(&cgroup, lab.node_ns());
    (lab, cgroup, client)
}

fn agent_flags(cgroup: &CgroupGuard, mode: &str) -> Vec<String> {
    agent_flags_at(&cgroup.path, mode)
}

/// The agent's flags with ROOT as `--cgroup-root`.
fn agent_flags_at(root: &std::path::Path, mode: &str) -> Vec<String> {
    vec![
        "--cgroup-root".into(),
        root.display().to_string(),
        "--socket-lb".into(),
        mode.into(),
        "--node-ip".into(),
        NODE_IPS.into(),
    ]
}

/// The `lb_datapath_packets_total` counter of REASON.
fn reason_count(lab: &Lab, reason: &str) -> u64 {
    let (_, body) = http_get(lab.node_ns(), metrics_addr(), "/metrics").expect("metrics");
    metric_value(
        &body,
        &format!("lb_datapath_packets_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0)
}

/// The backend name of a server answer (`NAME PORT PEER`).
fn backend_of(answer: &Value) -> String {
    answer["answer"]
        .as_str()
        .and_then(|a| a.split_whitespace().next())
        .unwrap_or_else(|| panic!("no answer: {answer}"))
        .to_owned()
}

/// `[ip, port]` as the client reports addresses.
fn addr_json(ip: IpAddr, port: u16) -> Value {
    json!([ip.to_string(), port])
}

/// TCP to TARGET: connected, `getpeername()` is TARGET, answered by one of
/// BACKENDS. Returns the backend.
fn assert_tcp(
    client: &mut SockClient,
    what: &str,
    target: (IpAddr, u16),
    backends: &[&str],
) -> String {
    let r = client.call(&json!({"op": "tcp", "addr": target.0.to_string(), "port": target.1}));
    assert_eq!(
        r["peer"],
        addr_json(target.0, target.1),
        "{what}: getpeername: {r}"
    );
    let backend = backend_of(&r);
    assert!(
        backends.contains(&backend.as_str()),
        "{what}: answered by {backend}: {r}"
    );
    backend
}

/// Unconnected UDP to TARGET: `recvfrom()` shows TARGET, answered by one
/// of BACKENDS.
fn assert_udp(client: &mut SockClient, what: &str, target: (IpAddr, u16), backends: &[&str]) {
    let r = client.call(&json!({"op": "udp", "addr": target.0.to_string(), "port": target.1}));
    assert_eq!(
        r["from"],
        addr_json(target.0, target.1),
        "{what}: recvfrom source: {r}"
    );
    let backend = backend_of(&r);
    assert!(
        backends.contains(&backend.as_str()),
        "{what}: answered by {backend}: {r}"
    );
}

/// One frontend the client reaches: what it is, its address, its TCP and
/// UDP ports, the backends behind it.
struct Target {
    what: &'static str,
    ip: IpAddr,
    ports: (u16, u16),
    backends: &'static [&'static str],
}

const WEB: &[&str] = &["be1", "be2"];
const EDGE: &[&str] = &["be3", "be4"];

/// The address of DUAL of FAMILY.
fn pick(dual: Dual, family: Family) -> IpAddr {
    both(dual)[usize::from(family == Family::V6)]
}

/// Every kind of frontend of FAMILY.
fn targets(family: Family) -> [Target; 6] {
    let (svc, node) = ((HTTP_PORT, DNS_PORT), (NODE_PORT_HTTP, NODE_PORT_DNS));
    [
        Target {
            what: "ClusterIP (dual-stack web)",
            ip: web_vip(family),
            ports: svc,
            backends: WEB,
        },
        Target {
            what: "ClusterIP of a LoadBalancer",
            ip: pick(Dual::service(0, 0x96, 0x20), family),
            ports: svc,
            backends: EDGE,
        },
        Target {
            what: "NodePort on the node address",
            ip: node_ip(family),
            ports: node,
            backends: EDGE,
        },
        Target {
            what: "NodePort on loopback",
            ip: loopback(family),
            ports: node,
            backends: EDGE,
        },
        Target {
            what: "external IP",
            ip: pick(external_ip(), family),
            ports: svc,
            backends: EDGE,
        },
        Target {
            what: "LoadBalancer IP",
            ip: pick(lb_ip(), family),
            ports: svc,
            backends: EDGE,
        },
    ]
}

/// Every frontend of FAMILY over TCP and UDP, and a spread over `web`'s
/// endpoints; returns the calls translated.
fn reach_every_frontend(client: &mut SockClient, family: Family) -> u64 {
    let mut translated = 0;
    for t in targets(family) {
        let what = format!("{family:?} {}", t.what);
        assert_tcp(
            client,
            &format!("{what} TCP"),
            (t.ip, t.ports.0),
            t.backends,
        );
        assert_udp(
            client,
            &format!("{what} UDP"),
            (t.ip, t.ports.1),
            t.backends,
        );
        translated += 2;
    }
    // TCP picks a slot per connection.
    let seen: std::collections::BTreeSet<String> = (0..24)
        .map(|_| assert_tcp(client, "spread", (web_vip(family), HTTP_PORT), WEB))
        .collect();
    assert_eq!(
        seen.len(),
        2,
        "{family:?}: 24 connections should reach be1 and be2: {seen:?}"
    );
    translated + 24
}

/// No endpoints, and a port the `ClusterIP` does not serve: refused at
/// once, TCP and UDP (3 refusals).
fn refused_at_once(client: &mut SockClient, family: Family) {
    let empty = pick(empty_vip(), family);
    for (what, op, port) in [
        ("no endpoints, TCP", "tcp", HTTP_PORT),
        ("no endpoints, UDP", "udp", DNS_PORT),
        ("unserved port, TCP", "tcp", 81),
    ] {
        let r = client.call(&json!({"op": op, "addr": empty.to_string(), "port": port}));
        assert_eq!(r["error"], "ECONNREFUSED", "{family:?} {what}: {r}");
        let ms = r["ms"].as_f64().expect("ms");
        assert!(ms < 100.0, "{family:?} {what}: refused after {ms} ms");
    }
}

/// An IPv4-mapped address on an IPv6 socket is served like IPv4, and
/// shown as it was asked for (2 calls).
fn v4_mapped(client: &mut SockClient) {
    let mapped = format!("::ffff:{}", web_vip(Family::V4));
    let r = client.call(&json!({"op": "tcp", "addr": mapped, "port": HTTP_PORT}));
    assert_eq!(r["peer"], json!([mapped, HTTP_PORT]), "v4-mapped TCP: {r}");
    assert!(WEB.contains(&backend_of(&r).as_str()), "v4-mapped TCP: {r}");
    let r = client.call(&json!({"op": "udp", "addr": mapped, "port": DNS_PORT}));
    assert_eq!(r["from"], json!([mapped, DNS_PORT]), "v4-mapped UDP: {r}");
    assert!(WEB.contains(&backend_of(&r).as_str()), "v4-mapped UDP: {r}");
}

/// Every kind of frontend, TCP and UDP, both families, from the node's
/// own namespace: translated at the socket (the TC path translates
/// nothing), the frontend shown by `getpeername()` and `recvfrom()`, a
/// dual-stack Service on both families, an IPv4-mapped address on an IPv6
/// socket, connections spread over the endpoints; a frontend without
/// endpoints and an unserved port of a `ClusterIP` refused at once.
#[test]
fn node_sockets_reach_every_frontend_at_the_socket() {
    let _serial = serial();
    if !require_privileged("harness_socklb: node_sockets_reach_every_frontend_at_the_socket") {
        return;
    }
    let (lab, _cgroup, mut client) = start("hostns");
    let mut translated = 0;
    for family in Family::BOTH {
        translated += reach_every_frontend(&mut client, family);
        refused_at_once(&mut client, family);
    }
    v4_mapped(&mut client);
    translated += 2;
    // Translated at the socket: counted there, and the TC path (on every
    // node interface) translated nothing: the backends' replies were
    // passed, not reverse-translated.
    assert!(
        reason_count(&lab, "sock_translated") >= translated,
        "sock_translated"
    );
    assert_eq!(reason_count(&lab, "sock_refused"), 6, "sock_refused");
    assert_eq!(
        reason_count(&lab, "nat_new"),
        0,
        "the TC path translated a flow"
    );
    assert_eq!(
        reason_count(&lab, "nat_reply"),
        0,
        "the TC path reverse-translated a reply"
    );
}

/// Issue 10: the node's sockets' affinity (per network namespace) is per
/// Service port and family too: a socket of the node stuck to an endpoint
/// of `edge` through its `ClusterIP` gets it through every other frontend
/// of the port (the `NodePort` on the node address and on loopback, the
/// external IP, the load-balancer IP). TCP picks a slot at random per
/// `connect()`, so with affinity per frontend each of those 4 frontends
/// would agree by chance 1 in 2 per family.
#[test]
fn node_sockets_share_affinity_across_a_ports_frontends() {
    let _serial = serial();
    if !require_privileged("harness_socklb: node_sockets_share_affinity_across_a_ports_frontends") {
        return;
    }
    let (lab, _cgroup, mut client) = start("hostns");
    lab.write_manifest("edge.json", &edge_and_empty_with(&lab, true));
    for family in Family::BOTH {
        let targets = targets(family);
        let cluster_ip = &targets[1];
        // Affinity takes effect once the agent has written the change:
        // bounded retries until 10 connections in a row stick.
        let deadline = Instant::now() + Duration::from_secs(10);
        let first = loop {
            let seen: std::collections::BTreeSet<String> = (0..10)
                .map(|_| {
                    let what = format!("{family:?} {} TCP", cluster_ip.what);
                    assert_tcp(
                        &mut client,
                        &what,
                        (cluster_ip.ip, cluster_ip.ports.0),
                        EDGE,
                    )
                })
                .collect();
            if seen.len() == 1 {
                break seen.into_iter().next().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "{family:?}: ClusterIP affinity never took effect: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        for t in &targets[2..] {
            for _ in 0..5 {
                let what = format!("{family:?} {} TCP, stuck to {first}", t.what);
                let got = assert_tcp(&mut client, &what, (t.ip, t.ports.0), EDGE);
                assert_eq!(got, first, "{what}: another endpoint");
            }
        }
    }
}

/// A connected UDP socket whose backend leaves the Service is destroyed by
/// the agent (`SOCK_DESTROY`): the application's next call fails
/// (`ECONNABORTED`, or `EDESTADDRREQ` for a send on the now unconnected
/// socket: both say the socket was ended), and a new socket reaches the
/// backend that stays. A socket on the backend that stays is untouched.
#[test]
fn udp_socket_of_a_removed_backend_is_ended() {
    let _serial = serial();
    if !require_privileged("harness_socklb: udp_socket_of_a_removed_backend_is_ended") {
        return;
    }
    let (lab, _cgroup, mut client) = start("hostns");
    udp_sockets_of_a_removed_backend_end(&lab, &mut client, "node");
}

/// With `--socket-lb=all` a pod's connected UDP socket is translated at
/// the socket too, and `sock_diag` in the agent's namespace cannot see it:
/// the agent ends it from inside the pod's namespace. A process in a pod
/// namespace (the lab's client pod, in the test's child cgroup) keeps one
/// socket per backend through the removal of be1: the be1 socket's next
/// call fails, the be2 socket is untouched, a new socket reaches be2.
/// Before the agent entered pod namespaces the be1 socket went on being
/// answered by be1 (it still runs): this test failed.
#[test]
fn pod_udp_socket_of_a_removed_backend_is_ended_with_all() {
    let _serial = serial();
    if !require_privileged("harness_socklb: pod_udp_socket_of_a_removed_backend_is_ended_with_all")
    {
        return;
    }
    let (lab, cgroup, _node_client) = start("all");
    let mut pod_client = SockClient::start(&cgroup, lab.client_ns());
    let before = reason_count(&lab, "sock_translated");
    udp_sockets_of_a_removed_backend_end(&lab, &mut pod_client, "pod");
    assert!(
        reason_count(&lab, "sock_translated") > before,
        "the pod's sockets were not translated at the socket (the TC path served them)"
    );
}

/// Through CLIENT (WHO: node or pod), for each family: one connected UDP
/// socket per backend of `web`, be1 removed from the Service, the be1
/// socket ended (`ECONNABORTED`, or `EDESTADDRREQ` for a send on the now
/// unconnected socket: both say the socket was ended), the be2 socket
/// untouched, a new socket on be2; be1 put back.
fn udp_sockets_of_a_removed_backend_end(lab: &Lab, client: &mut SockClient, who: &str) {
    for family in Family::BOTH {
        let vip = web_vip(family);
        // One connected socket per backend (retry until both are held).
        let mut held = std::collections::BTreeMap::new();
        for id in 0..40 {
            let r = client.call(
                &json!({"op": "udp_open", "id": id, "addr": vip.to_string(), "port": DNS_PORT}),
            );
            assert_eq!(
                r["peer"],
                addr_json(vip, DNS_PORT),
                "{who} {family:?} connected UDP getpeername: {r}"
            );
            let asked = client.call(&json!({"op": "udp_ask", "id": id}));
            assert_eq!(
                asked["from"],
                addr_json(vip, DNS_PORT),
                "{who} {family:?} recv source: {asked}"
            );
            held.entry(backend_of(&asked)).or_insert(id);
            if held.len() == 2 {
                break;
            }
        }
        assert_eq!(
            held.len(),
            2,
            "{who} {family:?}: no socket on each backend: {held:?}"
        );
        let since = Instant::now();
        lab.write_manifest("web.json", &lab.web_file(&[("be2", true)]));
        lab.wait_programmed(since, &lab.web_expect(&["be2"]));
        wait_until(
            &format!("{who} {family:?}: the be1 socket ended"),
            Duration::from_secs(3),
            || {
                let r = client.call(&json!({"op": "udp_ask", "id": held["be1"]}));
                match r["error"].as_str() {
                    Some("ECONNABORTED" | "EDESTADDRREQ") => Ok(()),
                    _ => Err(format!("still answered: {r}")),
                }
            },
        );
        let r = client.call(&json!({"op": "udp_ask", "id": held["be2"]}));
        assert_eq!(
            backend_of(&r),
            "be2",
            "{who} {family:?}: the be2 socket was harmed: {r}"
        );
        let r = client.call(&json!({"op": "udp", "addr": vip.to_string(), "port": DNS_PORT}));
        assert_eq!(backend_of(&r), "be2", "{who} {family:?}: a new socket: {r}");
        for id in held.values() {
            client.call(&json!({"op": "udp_close", "id": id}));
        }
        lab.write_manifest("web.json", &lab.web_file(&[("be1", true), ("be2", true)]));
        lab.wait_programmed(Instant::now(), &lab.web_expect(&["be1", "be2"]));
    }
    assert!(
        lab.log_text()
            .contains("destroyed connected UDP sockets whose backend left")
    );
}

/// `--socket-lb=hostns` leaves sockets of other namespaces to the TC path
/// (a pod in the same cgroup), and `--socket-lb=all` (the same pins, the
/// agent restarted with it) translates them too. With
/// `--socket-lb-bind-guard`, `bind()` to a `NodePort` of a node address
/// (or of the wildcard address) fails with `EADDRINUSE`, other ports bind.
/// A closed connected socket's reverse entry is removed at release.
/// `--socket-lb=off` detaches; a `--cgroup-root` that is not cgroup v2 is
/// reported and the TC path goes on.
#[test]
fn hostns_all_bind_guard_and_release() {
    let _serial = serial();
    if !require_privileged("harness_socklb: hostns_all_bind_guard_and_release") {
        return;
    }
    let (mut lab, cgroup, mut node_client) = start("hostns");
    let mut pod_client = SockClient::start(&cgroup, lab.client_ns());
    let before = reason_count(&lab, "sock_translated");
    for family in Family::BOTH {
        assert_tcp(
            &mut pod_client,
            &format!("{family:?} pod"),
            (web_vip(family), HTTP_PORT),
            WEB,
        );
    }
    assert_eq!(
        reason_count(&lab, "sock_translated"),
        before,
        "a pod socket was translated"
    );
    assert_eq!(
        reason_count(&lab, "nat_new"),
        2,
        "the TC path should have served the pod"
    );

    held_connection_and_the_release_filter(&lab, &mut node_client);
    refused_connection_frees_its_slot(&lab, &mut node_client);
    // Connected sockets (TCP here) leave no reverse entry behind.
    for family in Family::BOTH {
        assert_tcp(
            &mut node_client,
            &format!("{family:?} node"),
            (web_vip(family), HTTP_PORT),
            WEB,
        );
    }
    assert_eq!(
        sock_entries(&lab, "LB4_SK_RNAT_V1"),
        0,
        "IPv4 entries left after close"
    );
    assert_eq!(
        sock_entries(&lab, "LB6_SK_RNAT_V1"),
        0,
        "IPv6 entries left after close"
    );
    assert_eq!(filter_count(&lab), 0, "filter counts left after close");
    for family in Family::BOTH {
        assert_eq!(
            sock_slots_in_use(&lab, family),
            [0, 0],
            "{family:?} slots left after close"
        );
    }

    lab.kill_agent();
    let mut flags = agent_flags(&cgroup, "all");
    flags.push("--socket-lb-bind-guard".into());
    lab.start_agent_with(&flags);
    let before = reason_count(&lab, "sock_translated");
    for family in Family::BOTH {
        assert_tcp(
            &mut pod_client,
            &format!("{family:?} pod, all"),
            (web_vip(family), HTTP_PORT),
            WEB,
        );
    }
    assert_eq!(
        reason_count(&lab, "sock_translated"),
        before + 2,
        "pod sockets not translated with all"
    );

    assert_bind_guard(&mut node_client);
    off_and_no_cgroup2(&mut lab, &cgroup, &mut node_client, &mut pod_client);
}

/// With `--socket-lb-bind-guard`: `bind()` to a `NodePort` of a node
/// address (or of the wildcard address) fails with `EADDRINUSE`, another
/// port binds.
fn assert_bind_guard(node_client: &mut SockClient) {
    for (what, addr, port, refused) in [
        (
            "NodePort on the node address",
            "198.18.1.1",
            NODE_PORT_HTTP,
            true,
        ),
        (
            "NodePort on the wildcard address",
            "0.0.0.0",
            NODE_PORT_HTTP,
            true,
        ),
        (
            "IPv6 NodePort on the node address",
            "fd00:1::1",
            NODE_PORT_HTTP,
            true,
        ),
        ("another port", "198.18.1.1", NODE_PORT_HTTP + 1, false),
    ] {
        let r = node_client.call(&json!({"op": "bind", "addr": addr, "port": port}));
        if refused {
            assert_eq!(r["error"], "EADDRINUSE", "bind to {what}: {r}");
        } else {
            assert_eq!(r["bound"], true, "bind to {what}: {r}");
        }
    }
    let r = node_client
        .call(&json!({"op": "bind", "addr": "198.18.1.1", "port": NODE_PORT_DNS, "udp": true}));
    assert_eq!(
        r["error"], "EADDRINUSE",
        "UDP bind to the DNS NodePort: {r}"
    );
}

/// `--socket-lb=off` detaches; a `--cgroup-root` that is not cgroup v2 is
/// reported and the TC path goes on.
fn off_and_no_cgroup2(
    lab: &mut Lab,
    cgroup: &CgroupGuard,
    node_client: &mut SockClient,
    pod_client: &mut SockClient,
) {
    // --socket-lb=off: the links go, a node socket is no longer translated.
    lab.kill_agent();
    lab.start_agent_with(&agent_flags(cgroup, "off"));
    assert!(
        attached_programs(&cgroup.path).is_empty(),
        "programs left with --socket-lb=off"
    );
    let r = node_client.call(
        &json!({"op": "tcp", "addr": web_vip(Family::V4).to_string(),
                                     "port": HTTP_PORT, "timeout": 0.3}),
    );
    assert!(
        r.get("answer").is_none(),
        "translated with --socket-lb=off: {r}"
    );
    // A --cgroup-root that is not cgroup v2: said, and the TC path serves.
    lab.kill_agent();
    lab.start_agent_with(&agent_flags_at(&std::env::temp_dir(), "hostns"));
    assert!(
        lab.log_text().contains("is not a cgroup v2 directory"),
        "no warning about cgroup v2"
    );
    assert_tcp(
        pod_client,
        "pod, TC path, no cgroup v2",
        (web_vip(Family::V6), HTTP_PORT),
        WEB,
    );
}

/// Where a held connection's reverse translation is expected.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Held {
    /// Its socket's near slot (`LB4_SK_SLOT_V1`, `LB6_SK_SLOT_V1`: among
    /// the first `SOCK_NEAR_SLOTS`).
    NearSlot,
    /// Its far slot (past them): the test took every near slot.
    FarSlot,
    /// The reverse-translation map (`LB4_SK_RNAT_V1`, `LB6_SK_RNAT_V1`):
    /// its slots were taken.
    Map,
}

/// A cookie no socket has (cookies start at 1 and grow; the test's
/// sockets are far past it): the test fills every slot with it to see the
/// map take over.
const FILLER_COOKIE: u64 = 1;

/// A held TCP connection through the `ClusterIP` keeps its reverse
/// translation in its near slot, in its far slot when every near slot is
/// taken, or in the map when every slot is (the test takes them), counted
/// in the release filter under its backend. A
/// socket connected straight to that backend meets the count when it is
/// released, has nothing to drop, and leaves the connection's record and
/// count alone; the connection's own release drops both.
fn held_connection_and_the_release_filter(lab: &Lab, client: &mut SockClient) {
    for family in Family::BOTH {
        held_connection_is_reversed(lab, client, family, Held::NearSlot);
    }
    let near = limits::SOCK_NEAR_SLOTS;
    for family in Family::BOTH {
        fill_slots(lab, family, FILLER_COOKIE, 0..near);
        held_connection_is_reversed(lab, client, family, Held::FarSlot);
        fill_slots(lab, family, FILLER_COOKIE, 0..limits::SOCK_SLOTS);
        held_connection_is_reversed(lab, client, family, Held::Map);
        fill_slots(lab, family, 0, 0..limits::SOCK_SLOTS);
    }
}

/// A connection through the `ClusterIP` that the backend refuses takes a
/// slot and a count at `connect()`, and its release frees both: after a
/// non-blocking `connect()` (the client's timeout) the socket still names
/// its peer; after a blocking one the kernel disconnects it, clearing the
/// peer's port, and the release finds the peer in the slot.
fn refused_connection_frees_its_slot(lab: &Lab, client: &mut SockClient) {
    for family in Family::BOTH {
        for (how, timeout) in [("non-blocking", json!(2.0)), ("blocking", Value::Null)] {
            let vip = closed_vip().get(family);
            let r = client.call(&json!({"op": "tcp", "addr": vip.to_string(),
                                        "port": HTTP_PORT, "timeout": timeout}));
            let what = format!("{family:?}, {how} connect()");
            assert_eq!(r["error"], "ECONNREFUSED", "{what}: {r}");
            assert_eq!(
                sock_slots_in_use(lab, family),
                [0, 0],
                "{what}: slots held after a refused connection"
            );
            assert_eq!(
                filter_count(lab),
                0,
                "{what}: counts after a refused connection"
            );
        }
    }
}

fn held_connection_is_reversed(lab: &Lab, client: &mut SockClient, family: Family, held: Held) {
    let vip = web_vip(family);
    let map = ["LB4_SK_RNAT_V1", "LB6_SK_RNAT_V1"][usize::from(family == Family::V6)];
    let what = format!("{family:?} {held:?}");
    let records = |lab: &Lab| {
        let [near, far] = sock_slots_in_use(lab, family);
        (near, far, sock_entries(lab, map))
    };
    let open = client
        .call(&json!({"op": "tcp_open", "id": 1, "addr": vip.to_string(), "port": HTTP_PORT}));
    assert_eq!(open["peer"], addr_json(vip, HTTP_PORT), "{what}: {open}");
    let cookie = open["cookie"].as_u64().expect("the socket's cookie");
    // A cookie whose far slot is among the near ones (1 in 64) finds it
    // taken with them.
    let far_is_near = cookie % u64::from(limits::SOCK_SLOTS) < u64::from(limits::SOCK_NEAR_SLOTS);
    let expected = match held {
        Held::NearSlot => (1, 0, 0),
        Held::FarSlot if far_is_near => (0, 0, 1),
        Held::FarSlot => (0, 1, 0),
        Held::Map => (0, 0, 1),
    };
    assert_eq!(
        records(lab),
        expected,
        "{what}: (near slots, far slots, map entries) held"
    );
    assert_eq!(filter_count(lab), 1, "{what}: held count");
    let backend = lab
        .topo
        .backend_addrs(family, &[&backend_of(&open)])
        .into_iter()
        .next()
        .expect("the backend's address");
    let direct = client
        .call(&json!({"op": "tcp", "addr": backend.ip().to_string(), "port": backend.port()}));
    assert_eq!(
        direct["peer"],
        addr_json(backend.ip(), backend.port()),
        "{what}: straight to the backend: {direct}"
    );
    assert_eq!(records(lab), expected, "{what}: after the direct socket");
    assert_eq!(
        filter_count(lab),
        1,
        "{what}: count after the direct socket"
    );
    let peer = client.call(&json!({"op": "tcp_peer", "id": 1}));
    assert_eq!(peer["peer"], addr_json(vip, HTTP_PORT), "{what}: {peer}");
    client.call(&json!({"op": "tcp_close", "id": 1}));
    assert_eq!(records(lab), (0, 0, 0), "{what}: after close");
    assert_eq!(filter_count(lab), 0, "{what}: count after close");
}

/// FAMILY's socket slot table, opened from its pin.
fn slot_table<A: Copy + 'static>(lab: &Lab, family: Family) -> Array<MapData, SockSlot<A>>
where
    SockSlot<A>: aya::Pod,
{
    let name = ["LB4_SK_SLOT_V1", "LB6_SK_SLOT_V1"][usize::from(family == Family::V6)];
    let data = MapData::from_pin(lab.pin_path().join(name)).expect("the slot table's pin");
    Array::try_from(Map::Array(data)).expect("an array")
}

/// The cookies of FAMILY's socket slot table.
fn slot_cookies(lab: &Lab, family: Family) -> Vec<u64> {
    fn read<A: Copy + 'static>(lab: &Lab, family: Family) -> Vec<u64>
    where
        SockSlot<A>: aya::Pod,
    {
        let table = slot_table::<A>(lab, family);
        table
            .iter()
            .map(|slot| slot.expect("a slot").cookie)
            .collect()
    }
    match family {
        Family::V4 => read::<Addr4>(lab, family),
        Family::V6 => read::<Addr6>(lab, family),
    }
}

/// Near and far slots of FAMILY held by a socket (not free, not the
/// test's filler).
fn sock_slots_in_use(lab: &Lab, family: Family) -> [usize; 2] {
    let near = usize::try_from(limits::SOCK_NEAR_SLOTS).expect("a slot count");
    let mut in_use = [0, 0];
    for (index, cookie) in slot_cookies(lab, family).into_iter().enumerate() {
        if cookie != 0 && cookie != FILLER_COOKIE {
            in_use[usize::from(index >= near)] += 1;
        }
    }
    in_use
}

/// Sets the cookie of FAMILY's slots at INDICES to COOKIE (0: frees them).
fn fill_slots(lab: &Lab, family: Family, cookie: u64, indices: Range<u32>) {
    fn fill<A: Copy + Default + 'static>(
        lab: &Lab,
        family: Family,
        cookie: u64,
        indices: Range<u32>,
    ) where
        SockSlot<A>: aya::Pod,
    {
        let mut table = slot_table::<A>(lab, family);
        let slot = SockSlot {
            cookie,
            backend: A::default(),
            frontend: A::default(),
            backend_port_be: 0,
            frontend_port_be: 0,
            _pad: 0,
        };
        for index in indices {
            table.set(index, &slot, 0).expect("write a slot");
        }
    }
    match family {
        Family::V4 => fill::<Addr4>(lab, family, cookie, indices),
        Family::V6 => fill::<Addr6>(lab, family, cookie, indices),
    }
}

/// The sum of the release filter's counters (`bpftool map dump`: each
/// value as 8 little-endian hex bytes).
fn filter_count(lab: &Lab) -> u64 {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(lab.pin_path().join("LB_SK_RNAT_CNT_V1")),
    );
    let entries: Vec<Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool map dump: {e}"));
    entries
        .iter()
        .map(|entry| {
            let bytes: Vec<u8> = entry["value"]
                .as_array()
                .expect("value bytes")
                .iter()
                .map(|b| {
                    let hex = b.as_str().expect("a hex byte");
                    u8::from_str_radix(hex.trim_start_matches("0x"), 16).expect("a hex byte")
                })
                .collect();
            u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
        })
        .sum()
}

/// Entries in the pinned map NAME (`bpftool map dump`).
fn sock_entries(lab: &Lab, name: &str) -> usize {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(lab.pin_path().join(name)),
    );
    serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or_else(|| panic!("bpftool map dump: {out}"))
}

/// Attached once: restarting the agent (even killed) leaves one program
/// per hook on the cgroup; `lb cleanup` detaches them all.
#[test]
fn links_survive_restarts_and_cleanup_removes_them() {
    let _serial = serial();
    if !require_privileged("harness_socklb: links_survive_restarts_and_cleanup_removes_them") {
        return;
    }
    let (mut lab, cgroup, mut client) = start("hostns");
    let mut loader = SockClient::start(&cgroup, lab.node_ns());
    // Load: 150 connections over ~3 s while the agent is killed and
    // restarted; none may fail.
    let target = web_vip(Family::V4);
    let load = std::thread::spawn(move || {
        let r = loader.call(
            &json!({"op": "tcp_loop", "addr": target.to_string(), "port": HTTP_PORT,
                                    "count": 150, "interval_ms": 20}),
        );
        (loader, r)
    });
    std::thread::sleep(Duration::from_millis(500));
    lab.kill_agent();
    std::thread::sleep(Duration::from_millis(300));
    lab.start_agent_with(&agent_flags(&cgroup, "hostns"));
    let (_loader, r) = load.join().expect("load thread");
    assert_eq!(r["failed"], 0, "connections lost across the restart: {r}");
    assert_eq!(r["ok"], 150, "{r}");
    assert!(
        lab.log_text().contains("adopted=10"),
        "the restarted agent did not adopt the links"
    );
    let attached = attached_programs(&cgroup.path);
    for hook in [
        "cgroup_inet4_connect",
        "cgroup_inet6_connect",
        "cgroup_udp4_sendmsg",
        "cgroup_udp6_sendmsg",
        "cgroup_udp4_recvmsg",
        "cgroup_udp6_recvmsg",
        "cgroup_inet4_getpeername",
        "cgroup_inet6_getpeername",
        "cgroup_inet4_bind",
        "cgroup_inet6_bind",
        "cgroup_inet_sock_release",
    ] {
        assert_eq!(
            attached.iter().filter(|h| *h == hook).count(),
            1,
            "{hook} attached once: {attached:?}"
        );
    }
    assert_tcp(
        &mut client,
        "after restart",
        (web_vip(Family::V6), HTTP_PORT),
        &["be1", "be2"],
    );

    let out = run_ok(
        Command::new(support::process::lb_binary())
            .arg("cleanup")
            .arg("--pin-path")
            .arg(lab.pin_path()),
    );
    assert!(
        out.contains("detached lb_sock_connect4"),
        "cleanup said: {out}"
    );
    assert!(
        attached_programs(&cgroup.path).is_empty(),
        "programs left on the cgroup after cleanup"
    );
    wait_until("untranslated after cleanup", Duration::from_secs(2), || {
        let r = client.call(&json!({"op": "tcp", "addr": web_vip(Family::V4).to_string(), "port": HTTP_PORT, "timeout": 0.3}));
        if r.get("answer").is_some() {
            Err(format!("still answered: {r}"))
        } else {
            Ok(())
        }
    });
}

/// The attach types of the programs attached to CGROUP (`bpftool cgroup show`).
fn attached_programs(cgroup: &std::path::Path) -> Vec<String> {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup),
    );
    let list: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
        .expect("bpftool json");
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["attach_type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The socket programs need no capability beyond the `DaemonSet`'s
/// (`deploy/daemonset.yaml`): an agent with exactly those attaches them
/// and serves a node socket, and ends a UDP socket whose backend left
/// (`SOCK_DESTROY`).
#[test]
fn daemonset_capabilities_suffice() {
    let _serial = serial();
    if !require_privileged("harness_socklb: daemonset_capabilities_suffice") {
        return;
    }
    require_tools(&["python3", "setpriv"]);
    let mut lab = Lab::new();
    let cgroup = CgroupGuard::create(CGROUP_TAG);
    lab.write_manifest("web.json", &lab.web_file(&[("be1", true)]));
    lab.start_agent_with_caps(&daemonset_capabilities(), &agent_flags(&cgroup, "hostns"));
    lab.wait_programmed(Instant::now(), &lab.web_expect(&["be1"]));
    assert!(
        lab.log_text()
            .contains("socket-level load balancing attached"),
        "not attached with the DaemonSet's capabilities"
    );
    let mut client = SockClient::start(&cgroup, lab.node_ns());
    assert_tcp(
        &mut client,
        "with the DaemonSet's capabilities",
        (web_vip(Family::V4), HTTP_PORT),
        &["be1"],
    );
    let vip = web_vip(Family::V6);
    let r =
        client.call(&json!({"op": "udp_open", "id": 1, "addr": vip.to_string(), "port": DNS_PORT}));
    assert_eq!(r["peer"], addr_json(vip, DNS_PORT), "{r}");
    assert_eq!(
        backend_of(&client.call(&json!({"op": "udp_ask", "id": 1}))),
        "be1"
    );
    lab.write_manifest("web.json", &lab.web_file(&[("be2", true)]));
    lab.wait_programmed(Instant::now(), &lab.web_expect(&["be2"]));
    wait_until("the be1 socket ended", Duration::from_secs(3), || {
        let r = client.call(&json!({"op": "udp_ask", "id": 1}));
        match r["error"].as_str() {
            Some("ECONNABORTED" | "EDESTADDRREQ") => Ok(()),
            _ => Err(format!("still answered: {r}")),
        }
    });
}
