//! Tests of endpoint selection: readiness, terminating endpoints, traffic
//! policies, node locality and zone hints.

use crate::model::test_fixtures::{
    backends, backends_of, be, build_on, build_plain, build_web, dual_stack_web, frontend, node_a,
    spec_of,
};
use crate::model::{Backend, HealthCheck, Model, NodeContext, Protocol, ServiceRef};
use crate::testing::{EndpointBuilder, IpFamily, ServiceBuilder, SliceBuilder};

/// `shop/web` at `cluster_ip`, port 80 to 8080.
fn web(cluster_ip: &str) -> ServiceBuilder {
    ServiceBuilder::new("shop", "web")
        .ips([cluster_ip])
        .port("", 80, "TCP", 8080)
}

/// A slice of `shop/web` named `name` with port 8080.
fn web_slice(name: &str, family: IpFamily) -> SliceBuilder {
    SliceBuilder::for_service("shop", "web", family)
        .name(name)
        .port("", 8080, "TCP")
}

#[test]
fn not_ready_endpoints_are_excluded_and_absent_ready_means_ready() {
    let model = build_plain(
        [web("10.96.0.10")],
        [web_slice("web-1", IpFamily::V4)
            .endpoint(EndpointBuilder::new("10.244.1.1").ready(true))
            .endpoint(EndpointBuilder::new("10.244.1.2").draining())
            .endpoint(EndpointBuilder::new("10.244.1.3").ready(false))
            .endpoint(EndpointBuilder::new("10.244.1.4").serving(true))
            .endpoint(EndpointBuilder::new("10.244.1.5"))],
    );
    assert_eq!(model.errors, []);
    assert_eq!(
        backends_of(&model, "10.96.0.10", 80, Protocol::Tcp),
        backends(&[
            ("10.244.1.1", 8080),
            ("10.244.1.4", 8080),
            ("10.244.1.5", 8080)
        ])
    );
}

#[test]
fn backends_are_sorted_and_deduplicated_across_slices() {
    let model = build_plain(
        [ServiceBuilder::new("shop", "web")
            .ips(["10.96.0.10"])
            .port("", 80, "TCP", 80)],
        [
            SliceBuilder::for_service("shop", "web", IpFamily::V4)
                .name("web-b")
                .port("", 80, "TCP")
                .addresses(["10.244.0.30", "10.244.0.4"]),
            SliceBuilder::for_service("shop", "web", IpFamily::V4)
                .name("web-a")
                .port("", 80, "TCP")
                .addresses(["10.244.0.4", "10.244.0.20"]),
        ],
    );
    assert_eq!(
        backends_of(&model, "10.96.0.10", 80, Protocol::Tcp),
        backends(&[("10.244.0.4", 80), ("10.244.0.20", 80), ("10.244.0.30", 80)])
    );
}

// ---- Traffic policies and endpoint conditions --------------------------

#[test]
fn external_traffic_policy_local_without_local_endpoints_has_no_backends() {
    let service = dual_stack_web("LoadBalancer")
        .external_traffic_policy("Local")
        .health_check_node_port(32000)
        .ingress_ip("203.0.113.10")
        .ingress_ip("2001:db8:ff::10");
    let node = NodeContext {
        name: "node-c".into(),
        ..node_a()
    };
    let model = build_web(service, &node);
    assert_eq!(model.errors, []);
    for (addr, port) in [
        ("192.168.1.10", 30080),
        ("2001:db8:1::10", 30080),
        ("203.0.113.10", 80),
        ("2001:db8:ff::10", 80),
    ] {
        let spec = spec_of(&model, addr, port, Protocol::Tcp);
        assert_eq!(spec.backends, [], "{addr}");
        assert_eq!(spec.terminating, [], "{addr}");
        assert!(spec.external_local && !spec.internal_local, "{addr}");
    }
    // In-cluster traffic still reaches every endpoint.
    let cluster_ip = spec_of(&model, "fd00:10:96::10", 80, Protocol::Tcp);
    assert!(!cluster_ip.external_local && !cluster_ip.internal_local);
    assert_eq!(
        cluster_ip.backends,
        [
            be("fd00:10:244:1::5", 8080, false),
            be("fd00:10:244:2::7", 8080, false)
        ]
    );
    assert_eq!(
        model.health_checks,
        [HealthCheck {
            service: ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
                port_name: "".into(),
            },
            port: 32000,
            local_endpoints: [0, 0],
        }]
    );
}

#[test]
fn external_traffic_policy_local_keeps_local_endpoints_and_counts_them_for_the_health_check() {
    let slice = |family| {
        SliceBuilder::for_service("shop", "shop-lb", family)
            .port("http", 8080, "TCP")
            .port("https", 8443, "TCP")
    };
    let model = build_on(
        [ServiceBuilder::load_balancer("shop", "shop-lb")
            .ips(["10.96.0.30", "fd00:10:96::30"])
            .families(["IPv4", "IPv6"])
            .external_traffic_policy("Local")
            .health_check_node_port(31999)
            .port("http", 80, "TCP", 8080)
            .node_port_of_last(30080)
            .port("https", 443, "TCP", 8443)
            .node_port_of_last(30443)
            .ingress_ip("203.0.113.30")],
        [
            slice(IpFamily::V4)
                .endpoint(
                    EndpointBuilder::new("10.244.1.5")
                        .ready(true)
                        .node("node-a"),
                )
                .endpoint(
                    EndpointBuilder::new("10.244.1.6")
                        .ready(false)
                        .node("node-a"),
                )
                .endpoint(
                    EndpointBuilder::new("10.244.2.7")
                        .ready(true)
                        .node("node-b"),
                ),
            slice(IpFamily::V6)
                .endpoint(
                    EndpointBuilder::new("fd00:10:244:1::5")
                        .ready(true)
                        .node("node-a"),
                )
                .endpoint(
                    EndpointBuilder::new("fd00:10:244:2::7")
                        .ready(true)
                        .node("node-b"),
                ),
        ],
        &node_a(),
    );
    assert_eq!(model.errors, []);
    let lb = spec_of(&model, "203.0.113.30", 443, Protocol::Tcp);
    assert_eq!(lb.kind, crate::model::FrontendKind::LoadBalancer);
    assert_eq!(lb.backends, [be("10.244.1.5", 8443, true)]);
    assert!(lb.external_local);
    assert_eq!(
        spec_of(&model, "2001:db8:1::10", 30080, Protocol::Tcp).backends,
        [be("fd00:10:244:1::5", 8080, true)]
    );
    assert_eq!(
        spec_of(&model, "10.96.0.30", 80, Protocol::Tcp).backends,
        [be("10.244.1.5", 8080, true), be("10.244.2.7", 8080, false)]
    );
    // One v4 and one v6 address (one dual-stack pod), each behind two
    // ports: one per family, as each of kube-proxy's proxiers counts.
    assert_eq!(model.health_checks.len(), 1);
    assert_eq!(model.health_checks[0].port, 31999);
    assert_eq!(model.health_checks[0].local_endpoints, [1, 1]);
    assert_eq!(model.health_checks[0].local_endpoints_of(false), 1);
}

/// One local endpoint that is terminating but still serving, one remote
/// ready one, under each combination of traffic policies (as the e2e
/// tests "should fallback to local terminating endpoints when there are
/// no ready endpoints with {internal,external}TrafficPolicy=Local" and
/// the Cluster counterparts do).
#[test]
fn terminating_fallback_is_per_traffic_policy_set() {
    let build = |internal: &str, external: &str| {
        build_on(
            [web("10.96.0.10")
                .type_("NodePort")
                .internal_traffic_policy(internal)
                .external_traffic_policy(external)
                .node_port_of_last(30080)],
            [web_slice("web-1", IpFamily::V4)
                .endpoint(EndpointBuilder::new("10.244.1.5").draining().node("node-a"))
                .endpoint(
                    EndpointBuilder::new("10.244.1.6")
                        .ready(false)
                        .serving(false)
                        .terminating(true)
                        .node("node-a"),
                )
                .endpoint(EndpointBuilder::new("10.244.2.7").up().node("node-b"))],
            &node_a(),
        )
    };
    let local_serving = be("10.244.1.5", 8080, true);
    let local_stopping = be("10.244.1.6", 8080, true);
    let remote = be("10.244.2.7", 8080, false);
    // Cluster: a ready endpoint exists, so no fallback; both local
    // terminating endpoints only drain. Local: no local endpoint is
    // ready, so the serving terminating one takes new flows.
    let cluster = (vec![remote], vec![local_serving, local_stopping]);
    let local = (vec![local_serving], vec![local_stopping]);
    for internal in ["Cluster", "Local"] {
        for external in ["Cluster", "Local"] {
            let model = build(internal, external);
            assert_eq!(model.errors, []);
            let cluster_ip = spec_of(&model, "10.96.0.10", 80, Protocol::Tcp);
            let node_port = spec_of(&model, "192.168.1.10", 30080, Protocol::Tcp);
            let want = |policy| if policy == "Local" { &local } else { &cluster };
            assert_eq!(
                (&cluster_ip.backends, &cluster_ip.terminating),
                (&want(internal).0, &want(internal).1),
                "ClusterIP, ITP {internal} ETP {external}"
            );
            assert_eq!(
                (&node_port.backends, &node_port.terminating),
                (&want(external).0, &want(external).1),
                "NodePort, ITP {internal} ETP {external}"
            );
            assert_eq!(cluster_ip.internal_local, internal == "Local");
            assert_eq!(node_port.external_local, external == "Local");
        }
    }
}

#[test]
fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints() {
    let model = build_on(
        [
            ServiceBuilder::new("kube-system", "node-cache")
                .ips(["fd00:10:96::53"])
                .families(["IPv6"])
                .internal_traffic_policy("Local")
                .port("dns", 53, "UDP", 53),
            ServiceBuilder::new("kube-system", "elsewhere")
                .ips(["10.96.0.54"])
                .internal_traffic_policy("Local")
                .port("", 80, "TCP", 80),
        ],
        [
            SliceBuilder::for_service("kube-system", "node-cache", IpFamily::V6)
                .name("node-cache-1")
                .port("dns", 53, "UDP")
                .endpoint(EndpointBuilder::new("fd00:10:244:1::53").node("node-a"))
                .endpoint(EndpointBuilder::new("fd00:10:244:2::53").node("node-b")),
            SliceBuilder::for_service("kube-system", "elsewhere", IpFamily::V4)
                .name("elsewhere-1")
                .port("", 80, "TCP")
                .endpoint(EndpointBuilder::new("10.244.2.54").node("node-b")),
        ],
        &node_a(),
    );
    assert_eq!(model.errors, []);
    let spec = spec_of(&model, "fd00:10:96::53", 53, Protocol::Udp);
    assert!(spec.internal_local && !spec.external_local);
    assert_eq!(spec.backends, [be("fd00:10:244:1::53", 53, true)]);
    assert!(!spec.no_local_endpoints);
    // No local endpoint but one elsewhere: no backends, and the datapath
    // drops new flows (kube-proxy: "Traffic to the clusterIP will be
    // dropped").
    let elsewhere = spec_of(&model, "10.96.0.54", 80, Protocol::Tcp);
    assert!(elsewhere.internal_local);
    assert_eq!(elsewhere.backends, []);
    assert!(elsewhere.no_local_endpoints);
    assert_eq!(model.health_checks, []);
}

#[test]
fn a_local_policy_drops_only_while_other_nodes_have_endpoints() {
    // (ITP, ETP) Local in turn; endpoints of node-b in the given states.
    let build = |policy: &str, remote: EndpointBuilder| {
        let service = dual_stack_web("NodePort");
        let service = if policy == "internal" {
            service.internal_traffic_policy("Local")
        } else {
            service.external_traffic_policy("Local")
        };
        build_on(
            [service],
            [SliceBuilder::for_service("shop", "web", IpFamily::V4)
                .port("http", 8080, "TCP")
                .endpoint(remote.node("node-b"))],
            &node_a(),
        )
    };
    for policy in ["internal", "external"] {
        let (local_kind, cluster_kind) = if policy == "internal" {
            (("10.96.0.10", 80), ("192.168.1.10", 30080))
        } else {
            (("192.168.1.10", 30080), ("10.96.0.10", 80))
        };
        for (remote, drops) in [
            (EndpointBuilder::new("10.244.2.7").up(), true),
            (EndpointBuilder::new("10.244.2.7").draining(), true),
            (
                EndpointBuilder::new("10.244.2.7")
                    .ready(false)
                    .serving(false)
                    .terminating(false),
                false,
            ),
        ] {
            let model = build(policy, remote.clone());
            let local = spec_of(&model, local_kind.0, local_kind.1, Protocol::Tcp);
            assert_eq!(local.backends, [], "{policy} {remote:?}");
            assert_eq!(local.no_local_endpoints, drops, "{policy} {remote:?}");
            // The other policy is Cluster: never flagged.
            let cluster = spec_of(&model, cluster_kind.0, cluster_kind.1, Protocol::Tcp);
            assert!(!cluster.no_local_endpoints, "{policy} {remote:?}");
        }
    }
}

#[test]
fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
    let model = build_on(
        [ServiceBuilder::new("shop", "web")
            .legacy_cluster_ip("fd00:10:96::10")
            .port("", 80, "TCP", 8080)],
        [web_slice("web-1", IpFamily::V6)
            .endpoint(EndpointBuilder::new("fd00::1").draining())
            .endpoint(
                EndpointBuilder::new("fd00::2")
                    .ready(false)
                    .serving(false)
                    .terminating(true),
            )
            .endpoint(
                EndpointBuilder::new("fd00::3")
                    .ready(false)
                    .terminating(true),
            )
            .endpoint(EndpointBuilder::new("fd00::4").ready(false))
            .endpoint(EndpointBuilder::new("fd00::5").ready(false).serving(true))],
        &node_a(),
    );
    assert_eq!(model.errors, []);
    let spec = spec_of(&model, "fd00:10:96::10", 80, Protocol::Tcp);
    // ::3 has no `serving`: kube-proxy reads that as serving, whatever
    // `ready` says, so it drains with new flows like ::1. ::4 and ::5
    // are neither usable nor terminating.
    assert_eq!(
        spec.backends,
        [be("fd00::1", 8080, false), be("fd00::3", 8080, false)]
    );
    assert_eq!(spec.terminating, [be("fd00::2", 8080, false)]);
    assert_eq!(spec.not_serving, [be("fd00::2", 8080, false)]);
}

#[test]
fn a_missing_serving_condition_means_serving() {
    // Not ready, not terminating, `serving` absent: not a backend, but
    // serving, so its UDP flows are not moved (kube-proxy clears UDP
    // conntrack only for endpoints that are not serving).
    let model = build_on(
        [web("10.96.0.10")],
        [web_slice("web-1", IpFamily::V4)
            .endpoint(EndpointBuilder::new("10.244.1.1").up())
            .endpoint(EndpointBuilder::new("10.244.1.2").ready(false))
            .endpoint(EndpointBuilder::new("10.244.1.3"))],
        &node_a(),
    );
    let spec = spec_of(&model, "10.96.0.10", 80, Protocol::Tcp);
    assert_eq!(
        spec.backends,
        [be("10.244.1.1", 8080, false), be("10.244.1.3", 8080, false)]
    );
    assert_eq!(spec.not_ready, [be("10.244.1.2", 8080, false)]);
    assert_eq!(spec.not_serving, []);
}

#[test]
fn an_endpoint_listed_twice_counts_as_its_non_terminating_listing() {
    // A reused pod address: the old pod terminating (still serving) in one
    // slice, the new one not ready yet in another. kube-proxy keeps the
    // non-terminating listing, so there is nothing to fall back to.
    let model = build_on(
        [web("10.96.0.10")],
        [
            web_slice("web-1", IpFamily::V4)
                .endpoint(EndpointBuilder::new("10.244.1.7").draining()),
            web_slice("web-2", IpFamily::V4).endpoint(
                EndpointBuilder::new("10.244.1.7")
                    .ready(false)
                    .serving(false)
                    .terminating(false),
            ),
        ],
        &node_a(),
    );
    let spec = spec_of(&model, "10.96.0.10", 80, Protocol::Tcp);
    assert_eq!(spec.backends, []);
    assert_eq!(spec.not_ready, [be("10.244.1.7", 8080, false)]);
    assert_eq!(spec.terminating, []);
}

#[test]
fn an_endpoint_ready_in_one_slice_and_not_ready_in_another_is_used() {
    // kube-proxy's TestEndpointsMapFromESC "2 slices, overlapping
    // endpoints, some endpoints unready in 1 or both": a ready listing
    // wins over a non-terminating not-ready one, whichever slice comes
    // first; not ready in both stays not ready.
    for (first, second) in [("web-1", "web-2"), ("web-2", "web-1")] {
        let model = build_on(
            [web("10.96.0.10")],
            [
                web_slice(first, IpFamily::V4)
                    .endpoint(
                        EndpointBuilder::new("10.244.1.3")
                            .ready(false)
                            .serving(false),
                    )
                    .endpoint(
                        EndpointBuilder::new("10.244.1.6")
                            .ready(false)
                            .serving(false),
                    ),
                web_slice(second, IpFamily::V4)
                    .endpoint(EndpointBuilder::new("10.244.1.3").up())
                    .endpoint(
                        EndpointBuilder::new("10.244.1.6")
                            .ready(false)
                            .serving(false),
                    ),
            ],
            &node_a(),
        );
        assert_eq!(model.errors, []);
        let spec = spec_of(&model, "10.96.0.10", 80, Protocol::Tcp);
        assert_eq!(
            spec.backends,
            [be("10.244.1.3", 8080, false)],
            "{first} first"
        );
        assert_eq!(
            spec.not_ready,
            [be("10.244.1.6", 8080, false)],
            "{first} first"
        );
    }
}

#[test]
fn terminating_endpoint_drains_while_others_serve() {
    let model = build_on(
        [web("10.96.0.10")],
        [
            web_slice("web-1", IpFamily::V4)
                .endpoint(EndpointBuilder::new("10.244.1.1").up())
                .endpoint(EndpointBuilder::new("10.244.1.2").draining().node("node-a"))
                .endpoint(EndpointBuilder::new("10.244.1.3").up()),
            web_slice("web-2", IpFamily::V4)
                .endpoint(EndpointBuilder::new("10.244.1.3").draining()),
        ],
        &node_a(),
    );
    assert_eq!(model.errors, []);
    let spec = spec_of(&model, "10.96.0.10", 80, Protocol::Tcp);
    assert_eq!(
        spec.backends,
        [be("10.244.1.1", 8080, false), be("10.244.1.3", 8080, false)]
    );
    // 10.244.1.3, listed twice during a slice move, stays a backend.
    assert_eq!(spec.terminating, [be("10.244.1.2", 8080, true)]);
}

#[test]
fn publish_not_ready_addresses_is_left_to_the_slice_controller() {
    // The EndpointSlice controller marks the endpoints of such a Service
    // ready; kube-proxy reads the conditions as they are, and so do we.
    let slice =
        |family| SliceBuilder::for_service("db", "peers", family).port("gossip", 7000, "TCP");
    let model = build_on(
        [ServiceBuilder::new("db", "peers")
            .ips(["10.96.0.40", "fd00:10:96::40"])
            .families(["IPv4", "IPv6"])
            .publish_not_ready()
            .port("gossip", 7000, "TCP", 7000)],
        [
            slice(IpFamily::V4)
                .endpoint(
                    EndpointBuilder::new("10.244.1.1")
                        .ready(false)
                        .serving(false)
                        .terminating(false),
                )
                .endpoint(EndpointBuilder::new("10.244.1.2").ready(true)),
            slice(IpFamily::V6).endpoint(
                EndpointBuilder::new("fd00:10:244::1")
                    .ready(false)
                    .serving(false)
                    .terminating(true),
            ),
        ],
        &node_a(),
    );
    assert_eq!(model.errors, []);
    let v4 = spec_of(&model, "10.96.0.40", 7000, Protocol::Tcp);
    assert_eq!(v4.backends, [be("10.244.1.2", 7000, false)]);
    assert_eq!(v4.not_ready, [be("10.244.1.1", 7000, false)]);
    let v6 = spec_of(&model, "fd00:10:96::40", 7000, Protocol::Tcp);
    assert_eq!(v6.backends, []);
    assert_eq!(v6.terminating, [be("fd00:10:244::1", 7000, false)]);
}

#[test]
fn node_locality_needs_a_node_name() {
    let build = |node: &NodeContext| {
        build_on(
            [ServiceBuilder::new("shop", "web")
                .ips(["10.96.0.10"])
                .internal_traffic_policy("Local")
                .port("", 80, "TCP", 80)],
            [SliceBuilder::for_service("shop", "web", IpFamily::V4)
                .name("web-1")
                .port("", 80, "TCP")
                .endpoint(EndpointBuilder::new("10.244.1.1").node("node-a"))
                .endpoint(EndpointBuilder::new("10.244.1.2"))],
            node,
        )
    };
    let on_a = build(&node_a());
    assert_eq!(
        on_a.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)].backends,
        [be("10.244.1.1", 80, true)]
    );
    // An agent that does not know its node name has no local endpoint.
    let unnamed = build(&NodeContext::default());
    assert_eq!(
        unnamed.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)].backends,
        []
    );
}

// ---- Topology ----------------------------------------------------------

/// A `NodePort` Service `shop/web` (port 80 to 8080, `nodePort` 30080),
/// changed by `service`, with endpoints in zone-a (one on node-a),
/// zone-b and zone-c carrying the hints the `EndpointSlice` controller
/// writes for `PreferClose`, and `extra` ones.
fn zoned_web(
    service: impl FnOnce(ServiceBuilder) -> ServiceBuilder,
    extra: impl IntoIterator<Item = EndpointBuilder>,
    node: &NodeContext,
) -> Model {
    let slice = web_slice("web-1", IpFamily::V4)
        .endpoint(
            EndpointBuilder::new("10.244.1.1")
                .ready(true)
                .node("node-a")
                .zone("zone-a")
                .zone_hints(["zone-a"]),
        )
        .endpoint(
            EndpointBuilder::new("10.244.4.1")
                .ready(true)
                .node("node-d")
                .zone("zone-a")
                .zone_hints(["zone-a"]),
        )
        .endpoint(
            EndpointBuilder::new("10.244.2.1")
                .ready(true)
                .node("node-b")
                .zone("zone-b")
                .zone_hints(["zone-b", "zone-c"]),
        );
    let slice = extra.into_iter().fold(slice, SliceBuilder::endpoint);
    let web = web("10.96.0.10").type_("NodePort").node_port_of_last(30080);
    build_on([service(web)], [slice], node)
}

fn prefer_close(service: ServiceBuilder) -> ServiceBuilder {
    service.traffic_distribution("PreferClose")
}

fn cluster_and_node_port_backends(model: &Model) -> (Vec<Backend>, Vec<Backend>) {
    assert_eq!(model.errors, []);
    (
        spec_of(model, "10.96.0.10", 80, Protocol::Tcp)
            .backends
            .clone(),
        spec_of(model, "192.168.1.10", 30080, Protocol::Tcp)
            .backends
            .clone(),
    )
}

#[test]
fn prefer_close_keeps_the_endpoints_hinted_for_this_zone() {
    let model = zoned_web(prefer_close, [], &node_a());
    let zone_a = vec![be("10.244.1.1", 8080, true), be("10.244.4.1", 8080, false)];
    assert_eq!(
        cluster_and_node_port_backends(&model),
        (zone_a.clone(), zone_a)
    );

    let in_zone_c = NodeContext {
        zone: Some("zone-c".into()),
        ..node_a()
    };
    let model = zoned_web(prefer_close, [], &in_zone_c);
    let zone_c = vec![be("10.244.2.1", 8080, false)];
    assert_eq!(
        cluster_and_node_port_backends(&model),
        (zone_c.clone(), zone_c)
    );
}

#[test]
fn zone_hints_fall_back_to_all_endpoints() {
    let all = vec![
        be("10.244.1.1", 8080, true),
        be("10.244.2.1", 8080, false),
        be("10.244.4.1", 8080, false),
    ];
    let in_zone = |zone: Option<&str>| NodeContext {
        zone: zone.map(str::to_owned),
        ..node_a()
    };
    // No endpoint hinted for this node's zone.
    let model = zoned_web(prefer_close, [], &in_zone(Some("zone-z")));
    assert_eq!(cluster_and_node_port_backends(&model).0, all);
    // The node's zone is unknown.
    let model = zoned_web(prefer_close, [], &in_zone(None));
    assert_eq!(cluster_and_node_port_backends(&model).0, all);

    // One ready endpoint without hints turns the hints off.
    let unhinted = EndpointBuilder::new("10.244.3.1")
        .ready(true)
        .zone("zone-a");
    let model = zoned_web(prefer_close, [unhinted], &node_a());
    let mut with_unhinted = all.clone();
    with_unhinted.insert(2, be("10.244.3.1", 8080, false));
    assert_eq!(cluster_and_node_port_backends(&model).0, with_unhinted);
    // An endpoint that is not ready does not count.
    let not_ready = EndpointBuilder::new("10.244.3.1").draining();
    let model = zoned_web(prefer_close, [not_ready], &node_a());
    let spec = spec_of(&model, "10.96.0.10", 80, Protocol::Tcp);
    assert_eq!(
        spec.backends,
        [be("10.244.1.1", 8080, true), be("10.244.4.1", 8080, false)]
    );
    assert_eq!(spec.terminating, [be("10.244.3.1", 8080, false)]);
}

#[test]
fn hints_are_used_whatever_the_service_asks_for() {
    // kube-proxy reads the hints alone: no `trafficDistribution`, the
    // topology-mode annotation, or a value it does not know.
    for tweak in [
        (|service| service) as fn(ServiceBuilder) -> ServiceBuilder,
        |service| service.annotation("service.kubernetes.io/topology-mode", "Auto"),
        |service| service.traffic_distribution("SomethingNew"),
    ] {
        let model = zoned_web(tweak, [], &node_a());
        assert_eq!(
            cluster_and_node_port_backends(&model).0,
            [be("10.244.1.1", 8080, true), be("10.244.4.1", 8080, false)],
        );
    }
}

/// Endpoints of `zoned_web` with node hints as the `EndpointSlice`
/// controller writes them for `PreferSameNode` (each for its own node),
/// zone hints kept.
fn node_hinted(node: &str, addr: &str, zone: &str) -> EndpointBuilder {
    EndpointBuilder::new(addr)
        .ready(true)
        .node(node)
        .zone(zone)
        .zone_hints([zone])
        .node_hints([node])
}

#[test]
fn prefer_same_node_keeps_the_endpoints_hinted_for_this_node() {
    let slice = |extra: Option<EndpointBuilder>| {
        let slice = web_slice("web-1", IpFamily::V4)
            .endpoint(node_hinted("node-a", "10.244.1.1", "zone-a"))
            .endpoint(node_hinted("node-d", "10.244.4.1", "zone-a"))
            .endpoint(node_hinted("node-b", "10.244.2.1", "zone-b"));
        extra.into_iter().fold(slice, SliceBuilder::endpoint)
    };
    let web = || {
        web("10.96.0.10")
            .type_("NodePort")
            .node_port_of_last(30080)
            .traffic_distribution("PreferSameNode")
    };
    let model = build_on([web()], [slice(None)], &node_a());
    assert_eq!(
        cluster_and_node_port_backends(&model),
        (
            vec![be("10.244.1.1", 8080, true)],
            vec![be("10.244.1.1", 8080, true)]
        )
    );
    // No endpoint for this node: the zone hints decide.
    let node_c = NodeContext {
        name: "node-c".into(),
        ..node_a()
    };
    let model = build_on([web()], [slice(None)], &node_c);
    assert_eq!(
        cluster_and_node_port_backends(&model).0,
        [be("10.244.1.1", 8080, false), be("10.244.4.1", 8080, false)]
    );
    // A ready endpoint without a node hint turns the node hints off (the
    // zone hints still apply: it has one).
    let zone_only = EndpointBuilder::new("10.244.1.2")
        .ready(true)
        .node("node-a")
        .zone("zone-a")
        .zone_hints(["zone-a"]);
    let model = build_on([web()], [slice(Some(zone_only))], &node_a());
    assert_eq!(
        cluster_and_node_port_backends(&model).0,
        [
            be("10.244.1.1", 8080, true),
            be("10.244.1.2", 8080, true),
            be("10.244.4.1", 8080, false)
        ]
    );
}

#[test]
fn topology_does_not_apply_to_local_traffic_policies() {
    // This node's only endpoint is hinted for another zone: with Local
    // policies it is used anyway, while the Cluster policy side follows
    // the hints.
    let local_elsewhere = EndpointBuilder::new("10.244.1.9")
        .ready(true)
        .node("node-a")
        .zone_hints(["zone-b"]);
    let model = zoned_web(
        |service| prefer_close(service).external_traffic_policy("Local"),
        [local_elsewhere],
        &node_a(),
    );
    assert_eq!(
        cluster_and_node_port_backends(&model),
        (
            vec![be("10.244.1.1", 8080, true), be("10.244.4.1", 8080, false)],
            vec![be("10.244.1.1", 8080, true), be("10.244.1.9", 8080, true)],
        )
    );
}

/// Endpoints still in the slice but taking no new flows drain: not ready
/// ones (a readiness flap) next to the terminating ones; those not serving
/// either are listed for the datapath to move their UDP flows.
#[test]
fn not_ready_endpoints_drain_and_not_serving_ones_are_listed() {
    let model = build_on(
        [web("10.96.0.10")],
        [web_slice("web-1", IpFamily::V4)
            .endpoint(EndpointBuilder::new("10.244.1.1").up())
            .endpoint(EndpointBuilder::new("10.244.1.2").draining())
            .endpoint(
                EndpointBuilder::new("10.244.1.3")
                    .ready(false)
                    .serving(false)
                    .terminating(true),
            )
            .endpoint(
                EndpointBuilder::new("10.244.1.4")
                    .ready(false)
                    .serving(false)
                    .terminating(false),
            )
            .endpoint(
                EndpointBuilder::new("10.244.1.5")
                    .ready(false)
                    .serving(true),
            )],
        &node_a(),
    );
    assert_eq!(model.errors, []);
    let spec = spec_of(&model, "10.96.0.10", 80, Protocol::Tcp);
    assert_eq!(spec.backends, [be("10.244.1.1", 8080, false)]);
    assert_eq!(
        spec.terminating,
        [be("10.244.1.2", 8080, false), be("10.244.1.3", 8080, false)]
    );
    assert_eq!(
        spec.not_ready,
        [be("10.244.1.4", 8080, false), be("10.244.1.5", 8080, false)]
    );
    assert_eq!(
        spec.not_serving,
        [be("10.244.1.3", 8080, false), be("10.244.1.4", 8080, false)]
    );
}
