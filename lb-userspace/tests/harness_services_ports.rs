//! Service ports and rejection (issue 3, behaviours 1, 2 and 5), plus the
//! cluster's own sanity check: multi-port Services with the same port on
//! TCP and UDP and a named targetPort resolved per slice; unserved ports and
//! Services without usable endpoints refused at once;
//! internalTrafficPolicy Local.
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
//! Run: `cargo test -p lb-userspace --test harness_services_ports -- --nocapture`

mod support;

use support::clients::{
    Conn, IO_TIMEOUT, assert_refused, assert_source_preserved, assert_spread, assert_timeout,
    tcp_batch, tcp_once, tcp_once_from, udp_batch, udp_once,
};
use support::cluster::{
    BACKENDS, Cluster, DENIED_WAIT, REFUSE_CONNECT_TIMEOUT, ep, ready, service, vip,
};
use support::manifests::{Cond, HTTP_DNS, Manifest, sp};
use support::pins::require_privileged;
use support::scenarios::Scenarios;
use support::serial;
use support::topo::Family;

/// The topology alone (agents running, no Services): pods and external
/// clients reach every backend directly, both families, through the nodes'
/// routing and the fabric. If this fails, the problem is the harness or the
/// host, not the load balancer.
#[test]
fn topology_routes_directly() {
    let _serial = serial();
    if !require_privileged("harness_services_ports: topology_routes_directly") {
        return;
    }
    let lab = Cluster::new("routes");
    for from in ["client1", "ext", "ext2", "be4"] {
        for be in BACKENDS {
            for family in Family::BOTH {
                let to = lab.pod(be).addr.sock(family, 8080);
                let what = format!("{from} -> {be} {to}");
                let expected = format!("{be}:8080");
                let answers = tcp_batch(&lab.ns(from), to, 1);
                assert_spread(&what, &answers, &[expected.as_str()]);
                assert_source_preserved(&what, &answers);
                let answers = udp_batch(&lab.ns(from), to, 1);
                assert_spread(&what, &answers, &[expected.as_str()]);
            }
        }
    }
}

/// Behaviours 1, 2 and 5: multi-port Services with the same port on TCP
/// and UDP and a named targetPort resolved per slice; unserved ports and
/// Services without usable endpoints refused at once; internalTrafficPolicy
/// Local (only this node's endpoints; none: refused).
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per behaviour, sharing one topology"
)]
fn ports_reject_and_internal_traffic_policy() {
    let _serial = serial();
    if !require_privileged("harness_services_ports: ports_reject_and_internal_traffic_policy") {
        return;
    }
    let mut lab = Cluster::new("ports");
    let client = lab.ns("client1");

    // multi (10): http 80/TCP and dns 80/UDP -> named port "web" (8080 in
    // slice a for be1/be2, 9090 in slice b for be3); alt 81/TCP -> 9090.
    let multi = service(
        "multi",
        10,
        "ClusterIP",
        &[
            sp("http", 80, "TCP", "web"),
            sp("dns", 80, "UDP", "web"),
            sp("alt", 81, "TCP", "9090"),
        ],
    );
    let slices_a = lab.slices(
        "multi",
        "a",
        &[
            ("http", 8080, "TCP"),
            ("dns", 8080, "UDP"),
            ("alt", 9090, "TCP"),
        ],
        &[ready("be1"), ready("be2")],
    );
    let slices_b = lab.slices(
        "multi",
        "b",
        &[
            ("http", 9090, "TCP"),
            ("dns", 9090, "UDP"),
            ("alt", 9090, "TCP"),
        ],
        &[ready("be3")],
    );
    let multi = Manifest::default()
        .with(&multi.build())
        .with_all(&slices_a)
        .with_all(&slices_b);
    lab.apply("multi.json", &multi);
    // empty (11): a slice without endpoints; unready (14): only not-ready,
    // not-serving endpoints; noslice (15): no slice at all.
    let empty = lab.simple("empty", service("empty", 11, "ClusterIP", &HTTP_DNS), &[]);
    lab.apply("empty.json", &empty);
    let unready = lab.simple(
        "unready",
        service("unready", 14, "ClusterIP", &HTTP_DNS),
        &[ep("be1", Cond::NotReady), ep("be2", Cond::NotReady)],
    );
    lab.apply("unready.json", &unready);
    lab.apply(
        "noslice.json",
        &Manifest::default().with(&service("noslice", 15, "ClusterIP", &HTTP_DNS).build()),
    );
    // itp (12): internalTrafficPolicy Local, endpoints on both nodes;
    // itp-remote (13): the same with endpoints on node2 only.
    let itp = service("itp", 12, "ClusterIP", &HTTP_DNS).internal_traffic_policy("Local");
    let itp = lab.simple("itp", itp, &[ready("be1"), ready("be2"), ready("be3")]);
    lab.apply("itp.json", &itp);
    let itp_remote =
        service("itp-remote", 13, "ClusterIP", &HTTP_DNS).internal_traffic_policy("Local");
    let itp_remote = lab.simple("itp-remote", itp_remote, &[ready("be3"), ready("be4")]);
    lab.apply("itp-remote.json", &itp_remote);

    let mut sc = Scenarios::default();
    for family in Family::BOTH {
        sc.run(
            &format!("{family:?} multi-port, same port TCP+UDP, named targetPort per slice"),
            || {
                let v = vip(10).get(family);
                for i in 0..2 {
                    lab.expect_slots(i, v, 80, "TCP", &["be1:8080", "be2:8080", "be3:9090"]);
                    lab.expect_slots(i, v, 80, "UDP", &["be1:8080", "be2:8080", "be3:9090"]);
                    lab.expect_slots(i, v, 81, "TCP", &["be1:9090", "be2:9090", "be3:9090"]);
                }
                let what = format!("{family:?} multi TCP 80");
                let answers = tcp_batch(&client, vip(10).sock(family, 80), 30);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080", "be3:9090"]);
                assert_source_preserved(&what, &answers);
                let what = format!("{family:?} multi UDP 80");
                let answers = udp_batch(&client, vip(10).sock(family, 80), 24);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080", "be3:9090"]);
                assert_source_preserved(&what, &answers);
                let what = format!("{family:?} multi TCP 81 (numeric targetPort 9090)");
                let answers = tcp_batch(&client, vip(10).sock(family, 81), 24);
                assert_spread(&what, &answers, &["be1:9090", "be2:9090", "be3:9090"]);
            },
        );
        sc.run(
            &format!("{family:?} a client port reused at once to reach the endpoint directly"),
            || {
                // The client closes a connection through the Service and at
                // once connects straight to the endpoint that served it, from
                // the same port: the endpoint's answers must not come back
                // from the Service (they did until the closing flow expired,
                // 10 s later). 200 ms lets the endpoint close its side too.
                // Both sockets bind the port with `SO_REUSEADDR` (the first
                // one is in TIME_WAIT).
                let what = format!("{family:?} multi TCP 80, then its endpoint directly");
                let to = vip(10).sock(family, 80);
                let local = lab.pod("client1").addr.sock(family, 45123);
                let mut conn = Conn::open_from(&client, local, to)
                    .unwrap_or_else(|o| panic!("{what}: connect: {o:?}"));
                let first = conn.ask().answer(&what);
                drop(conn);
                std::thread::sleep(std::time::Duration::from_millis(200));
                let endpoint = lab.pod(&first.backend).addr.sock(family, first.port);
                let direct = tcp_once_from(&client, first.local, endpoint, IO_TIMEOUT).answer(
                    &format!("{what}: direct to {endpoint} from {}", first.local),
                );
                assert_eq!(
                    (direct.backend.as_str(), direct.port, direct.peer),
                    (first.backend.as_str(), first.port, first.local),
                    "{what}: the endpoint answered the client's own port"
                );
            },
        );
        sc.run(
            &format!("{family:?} ports the Service does not define are refused"),
            || {
                assert_refused(
                    &format!("{family:?} multi TCP 82 (unserved port)"),
                    &tcp_once(&client, vip(10).sock(family, 82), REFUSE_CONNECT_TIMEOUT),
                );
                assert_refused(
                    &format!("{family:?} multi UDP 81 (port only defined for TCP)"),
                    &udp_once(&client, vip(10).sock(family, 81), IO_TIMEOUT),
                );
                assert_refused(
                    &format!("{family:?} multi UDP 82 (unserved port)"),
                    &udp_once(&client, vip(10).sock(family, 82), IO_TIMEOUT),
                );
            },
        );
        sc.run(
            &format!("{family:?} no usable endpoints: refused at once"),
            || {
                for (n, name) in [(11, "empty"), (14, "unready"), (15, "noslice")] {
                    lab.expect_slots(0, vip(n).get(family), 80, "TCP", &[]);
                    assert_refused(
                        &format!("{family:?} {name} TCP"),
                        &tcp_once(&client, vip(n).sock(family, 80), REFUSE_CONNECT_TIMEOUT),
                    );
                    assert_refused(
                        &format!("{family:?} {name} UDP"),
                        &udp_once(&client, vip(n).sock(family, 53), IO_TIMEOUT),
                    );
                }
            },
        );
        sc.run(&format!("{family:?} internalTrafficPolicy Local"), || {
            let v = vip(12).get(family);
            lab.expect_slots(0, v, 80, "TCP", &["be1:8080", "be2:8080"]);
            lab.expect_slots(1, v, 80, "TCP", &["be3:8080"]);
            let what = format!("{family:?} itp Local TCP");
            let answers = tcp_batch(&client, vip(12).sock(family, 80), 30);
            assert_spread(&what, &answers, &["be1:8080", "be2:8080"]);
            assert_source_preserved(&what, &answers);
            let what = format!("{family:?} itp Local UDP");
            let answers = udp_batch(&client, vip(12).sock(family, 53), 16);
            assert_spread(&what, &answers, &["be1:8080", "be2:8080"]);
            // No local endpoint, some on node2: dropped, as kube-proxy
            // does (refused only when there are none anywhere).
            lab.expect_slots(0, vip(13).get(family), 80, "TCP", &[]);
            assert_timeout(
                &format!("{family:?} itp Local without local endpoints TCP"),
                &tcp_once(&client, vip(13).sock(family, 80), DENIED_WAIT),
            );
            assert_timeout(
                &format!("{family:?} itp Local without local endpoints UDP"),
                &udp_once(&client, vip(13).sock(family, 53), DENIED_WAIT),
            );
        });
    }
    lab.finish(sc);
}
