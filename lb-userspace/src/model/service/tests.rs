//! Tests of Service parsing: addresses, ports, types and their frontends,
//! policies, affinity and source ranges.

use std::net::IpAddr;

use super::parse_cidr;
use crate::model::test_fixtures::{
    be, build_on, build_plain, build_web, dual_stack_web, dual_stack_web_slices, error_lines,
    frontend, frontend_kinds, ip, node_a, spec_of,
};
use crate::model::{FrontendKind, Model, NodeContext, Protocol, SERVICE_PROXY_NAME_LABEL};
use crate::testing::ServiceBuilder;

/// A change to a Service under test.
type Tweak = fn(ServiceBuilder) -> ServiceBuilder;

#[test]
fn cluster_ip_alone_is_used_when_cluster_ips_is_absent() {
    let model = build_plain(
        [ServiceBuilder::new("default", "old")
            .legacy_cluster_ip("10.96.7.7")
            .port("", 80, "TCP", 80)],
        [],
    );
    assert_eq!(model.errors, []);
    assert!(
        model
            .frontends
            .contains_key(&frontend("10.96.7.7", 80, Protocol::Tcp))
    );
}

#[test]
fn headless_external_name_and_other_proxies_are_skipped_silently() {
    let model = build_plain(
        [
            ServiceBuilder::new("shop", "db")
                .headless()
                .port("", 5432, "TCP", 5432),
            ServiceBuilder::new("shop", "ext")
                .type_("ExternalName")
                .external_name("db.example.com"),
            ServiceBuilder::new("shop", "mesh")
                .label(SERVICE_PROXY_NAME_LABEL, "other-proxy")
                .ips(["10.96.3.3"])
                .port("", 80, "TCP", 80),
            ServiceBuilder::new("shop", "pending").port("", 80, "TCP", 80),
            ServiceBuilder::new("shop", "nospec").without_spec(),
        ],
        [],
    );
    assert_eq!(model, Model::default());
}

#[test]
fn invalid_cluster_ip_rejects_the_service() {
    let model = build_plain(
        [
            ServiceBuilder::new("shop", "bad")
                .ips(["10.96.0.300"])
                .port("", 80, "TCP", 80),
            ServiceBuilder::new("shop", "good")
                .ips(["10.96.0.30"])
                .port("", 80, "TCP", 80),
        ],
        [],
    );
    assert_eq!(
        error_lines(&model),
        [r#"Service shop/bad: clusterIP "10.96.0.300" is not an IP address"#]
    );
    assert_eq!(
        model.frontends.keys().copied().collect::<Vec<_>>(),
        [frontend("10.96.0.30", 80, Protocol::Tcp)]
    );
}

#[test]
fn two_cluster_ips_of_one_family_reject_the_service() {
    let model = build_plain(
        [ServiceBuilder::new("shop", "twice")
            .ips(["10.96.0.1", "10.96.0.2"])
            .port("", 80, "TCP", 80)],
        [],
    );
    assert!(model.frontends.is_empty());
    assert_eq!(model.errors.len(), 1);
    assert_eq!(model.errors[0].name, "twice");
    assert!(
        model.errors[0].reason.contains("two addresses"),
        "{}",
        model.errors[0]
    );
}

#[test]
fn port_out_of_range_rejects_the_service() {
    for port in [0, 65536, -1] {
        let model = build_plain(
            [ServiceBuilder::new("shop", "web")
                .ips(["10.96.0.10"])
                .port("ok", 80, "TCP", 80)
                .port("bad", port, "TCP", 8080)],
            [],
        );
        assert!(model.frontends.is_empty(), "port {port}");
        assert_eq!(
            error_lines(&model),
            [format!(
                "Service shop/web: port {port} is outside 1..=65535"
            )]
        );
    }
}

#[test]
fn duplicate_port_and_protocol_rejects_the_service() {
    let model = build_plain(
        [ServiceBuilder::new("shop", "web")
            .ips(["10.96.0.10"])
            .port("a", 80, "TCP", 80)
            .port("b", 80, "TCP", 80)],
        [],
    );
    assert!(model.frontends.is_empty());
    assert_eq!(
        error_lines(&model),
        ["Service shop/web: port 80/TCP is listed twice"]
    );
}

#[test]
fn sctp_port_is_a_frontend_beside_tcp_on_the_same_number() {
    let model = build_plain(
        [ServiceBuilder::new("telco", "sig")
            .ips(["10.96.4.4"])
            .port("sctp", 3868, "SCTP", 3868)
            .port("tcp", 3868, "TCP", 3868)],
        [],
    );
    assert!(error_lines(&model).is_empty(), "{:?}", error_lines(&model));
    assert_eq!(
        model.frontends.keys().copied().collect::<Vec<_>>(),
        [
            frontend("10.96.4.4", 3868, Protocol::Tcp),
            frontend("10.96.4.4", 3868, Protocol::Sctp)
        ]
    );
}

#[test]
fn unknown_protocol_is_reported_and_only_that_port_skipped() {
    let model = build_plain(
        [ServiceBuilder::new("telco", "sig")
            .ips(["10.96.4.4"])
            .port("dccp", 3868, "DCCP", 3868)
            .port("tcp", 3868, "TCP", 3868)],
        [],
    );
    assert_eq!(
        error_lines(&model),
        [
            r#"Service telco/sig: port "dccp" (3868): protocol DCCP is not supported (only TCP, UDP and SCTP); port skipped"#
        ]
    );
    assert_eq!(
        model.frontends.keys().copied().collect::<Vec<_>>(),
        [frontend("10.96.4.4", 3868, Protocol::Tcp)]
    );
}

#[test]
fn traffic_policy_and_type_must_be_known_values() {
    let service = |name: &str, ip: &str| {
        ServiceBuilder::new("shop", name)
            .ips([ip])
            .port("", 80, "TCP", 80)
    };
    let model = build_plain(
        [
            service("a", "10.96.0.1").internal_traffic_policy("Nearby"),
            service("b", "10.96.0.2")
                .type_("NodePort")
                .external_traffic_policy("local"),
            service("c", "10.96.0.3").type_("Ingress"),
            service("d", "10.96.0.4").families(["IPv5"]),
        ],
        [],
    );
    assert!(model.frontends.is_empty());
    assert_eq!(
        error_lines(&model),
        [
            r#"Service shop/a: internalTrafficPolicy "Nearby" is not Cluster or Local"#,
            r#"Service shop/b: externalTrafficPolicy "local" is not Cluster or Local"#,
            r#"Service shop/c: type "Ingress" is not ClusterIP, NodePort, LoadBalancer or ExternalName"#,
            r#"Service shop/d: ipFamilies entry "IPv5" is not IPv4 or IPv6"#,
        ]
    );
}

// ---- NodePort, LoadBalancer, ExternalIPs -------------------------------

#[test]
fn node_port_listens_on_every_node_address_of_the_service_families() {
    let node = NodeContext {
        addresses: vec![ip("192.168.1.10"), ip("10.0.0.10"), ip("2001:db8:1::10")],
        ..node_a()
    };
    let model = build_web(dual_stack_web("NodePort"), &node);
    assert_eq!(model.errors, []);
    assert_eq!(
        frontend_kinds(&model),
        [
            "10.0.0.10:30080/TCP NodePort",
            "10.96.0.10:80/TCP ClusterIP",
            "192.168.1.10:30080/TCP NodePort",
            "[2001:db8:1::10]:30080/TCP NodePort",
            "[fd00:10:96::10]:80/TCP ClusterIP",
        ]
    );
    // Each family's NodePort takes that family's endpoints; locality is
    // the endpoint's nodeName against this node's name.
    let v4 = spec_of(&model, "192.168.1.10", 30080, Protocol::Tcp);
    assert_eq!(
        v4.backends,
        [be("10.244.1.5", 8080, true), be("10.244.2.7", 8080, false)]
    );
    assert_eq!(v4.service.to_string(), "shop/web:http");
    let v6 = spec_of(&model, "2001:db8:1::10", 30080, Protocol::Tcp);
    assert_eq!(
        v6.backends,
        [
            be("fd00:10:244:1::5", 8080, true),
            be("fd00:10:244:2::7", 8080, false)
        ]
    );
    assert!(!v6.external_local && !v6.internal_local);
    assert_eq!((v6.affinity_timeout_s, v6.source_ranges.len()), (0, 0));
    assert_eq!(model.health_checks, []);
}

#[test]
fn node_port_of_a_single_stack_service_uses_node_addresses_of_its_family_only() {
    let model = build_on(
        [
            ServiceBuilder::node_port("kube-system", "dns")
                .ips(["fd00:10:96::a"])
                .families(["IPv6"])
                .port("dns", 53, "UDP", 53)
                .node_port_of_last(30053),
            ServiceBuilder::node_port("kube-system", "legacy")
                .ips(["10.96.0.53"])
                .port("", 8080, "TCP", 8080)
                .node_port_of_last(30081),
        ],
        [],
        &node_a(),
    );
    assert_eq!(model.errors, []);
    assert_eq!(
        frontend_kinds(&model),
        [
            "10.96.0.53:8080/TCP ClusterIP",
            "192.168.1.10:30081/TCP NodePort",
            "[2001:db8:1::10]:30053/UDP NodePort",
            "[fd00:10:96::a]:53/UDP ClusterIP",
        ]
    );
}

#[test]
fn bad_or_missing_node_port_skips_only_the_node_port_frontends() {
    let model = build_on(
        [
            ServiceBuilder::node_port("shop", "web")
                .ips(["10.96.0.10"])
                .port("http", 80, "TCP", 80)
                .node_port_of_last(70000)
                .port("https", 443, "TCP", 443)
                .node_port_of_last(30443),
            ServiceBuilder::load_balancer("shop", "lb")
                .allocate_node_ports(false)
                .ips(["10.96.0.11"])
                .port("", 80, "TCP", 80)
                .ingress_ip("203.0.113.11"),
            ServiceBuilder::new("shop", "plain")
                .ips(["10.96.0.12"])
                .port("", 80, "TCP", 80)
                .node_port_of_last(30012),
        ],
        [],
        &node_a(),
    );
    assert_eq!(
        error_lines(&model),
        [
            r#"Service shop/web: port "http" (80): nodePort 70000 is outside 1..=65535; nodePort skipped"#
        ]
    );
    assert_eq!(
        frontend_kinds(&model),
        [
            "10.96.0.10:80/TCP ClusterIP",
            "10.96.0.10:443/TCP ClusterIP",
            "10.96.0.11:80/TCP ClusterIP",
            "10.96.0.12:80/TCP ClusterIP",
            "192.168.1.10:30443/TCP NodePort",
            "203.0.113.11:80/TCP LoadBalancer",
        ]
    );
}

#[test]
fn load_balancer_serves_ingress_ips_of_its_families() {
    let web = dual_stack_web("LoadBalancer")
        .ingress_ip_mode("203.0.113.10", "VIP")
        .ingress_ip("2001:db8:ff::10")
        .ingress_hostname("lb-1234.elb.example.com")
        .ingress_ip("203.0.113.300")
        .ingress_ip_mode("198.51.100.7", "Proxy")
        .ingress_ip("203.0.113.10");
    let v4_only = ServiceBuilder::load_balancer("shop", "v4only")
        .legacy_cluster_ip("10.96.0.20")
        .families(["IPv4"])
        .port("", 443, "TCP", 443)
        .node_port_of_last(30443)
        .ingress_ip("203.0.113.20")
        .ingress_ip("2001:db8:ff::20");
    let model = build_on([web, v4_only], dual_stack_web_slices(), &node_a());
    assert_eq!(
        error_lines(&model),
        [
            r#"Service shop/web: status.loadBalancer.ingress ip "203.0.113.300" is not an IP address; address skipped"#
        ]
    );
    assert_eq!(
        frontend_kinds(&model),
        [
            "10.96.0.10:80/TCP ClusterIP",
            "10.96.0.20:443/TCP ClusterIP",
            "192.168.1.10:30080/TCP NodePort",
            "192.168.1.10:30443/TCP NodePort",
            "203.0.113.10:80/TCP LoadBalancer",
            "203.0.113.20:443/TCP LoadBalancer",
            "[2001:db8:1::10]:30080/TCP NodePort",
            "[2001:db8:ff::10]:80/TCP LoadBalancer",
            "[fd00:10:96::10]:80/TCP ClusterIP",
        ]
    );
    assert_eq!(
        spec_of(&model, "2001:db8:ff::10", 80, Protocol::Tcp).backends,
        [
            be("fd00:10:244:1::5", 8080, true),
            be("fd00:10:244:2::7", 8080, false)
        ]
    );
}

#[test]
fn external_ips_are_served_for_any_type_with_a_cluster_ip() {
    let service = dual_stack_web("ClusterIP").external_ips([
        "198.51.100.20",
        "2001:db8:ee::20",
        "198.51.100.999",
        "",
    ]);
    let model = build_web(service, &node_a());
    assert_eq!(
        error_lines(&model),
        [
            r#"Service shop/web: externalIPs entry "198.51.100.999" is not an IP address; address skipped"#
        ]
    );
    assert_eq!(
        frontend_kinds(&model),
        [
            "10.96.0.10:80/TCP ClusterIP",
            "198.51.100.20:80/TCP ExternalIP",
            "[2001:db8:ee::20]:80/TCP ExternalIP",
            "[fd00:10:96::10]:80/TCP ClusterIP",
        ]
    );
    let external = spec_of(&model, "198.51.100.20", 80, Protocol::Tcp);
    assert_eq!(
        external.backends,
        [be("10.244.1.5", 8080, true), be("10.244.2.7", 8080, false)]
    );
    assert!(!external.external_local);
}

#[test]
fn type_changes_give_exactly_the_frontends_of_the_new_type() {
    let as_is = |service: ServiceBuilder| service;
    let with_status = |service: ServiceBuilder| service.ingress_ip("203.0.113.10");
    let with_external_ip = |service: ServiceBuilder| service.external_ips(["198.51.100.20"]);
    let cases: [(&str, Tweak, &[&str]); 5] = [
        (
            "ClusterIP",
            as_is,
            &[
                "10.96.0.10:80/TCP ClusterIP",
                "[fd00:10:96::10]:80/TCP ClusterIP",
            ],
        ),
        (
            "NodePort",
            as_is,
            &[
                "10.96.0.10:80/TCP ClusterIP",
                "192.168.1.10:30080/TCP NodePort",
                "[2001:db8:1::10]:30080/TCP NodePort",
                "[fd00:10:96::10]:80/TCP ClusterIP",
            ],
        ),
        (
            "LoadBalancer",
            with_status,
            &[
                "10.96.0.10:80/TCP ClusterIP",
                "192.168.1.10:30080/TCP NodePort",
                "203.0.113.10:80/TCP LoadBalancer",
                "[2001:db8:1::10]:30080/TCP NodePort",
                "[fd00:10:96::10]:80/TCP ClusterIP",
            ],
        ),
        // Back to ClusterIP while the old status and nodePort linger.
        (
            "ClusterIP",
            with_status,
            &[
                "10.96.0.10:80/TCP ClusterIP",
                "[fd00:10:96::10]:80/TCP ClusterIP",
            ],
        ),
        ("ExternalName", with_external_ip, &[]),
    ];
    for (type_, extra, expected) in cases {
        let model = build_web(extra(dual_stack_web(type_)), &node_a());
        assert_eq!(model.errors, [], "{type_}");
        assert_eq!(frontend_kinds(&model), expected, "{type_}");
    }
}

// ---- Session affinity --------------------------------------------------

#[test]
fn client_ip_affinity_timeout_defaults_to_three_hours() {
    let client_ip = || dual_stack_web("NodePort").session_affinity("ClientIP");
    let cases = [
        ("ClientIP", client_ip(), 10_800),
        ("ClientIP 60 s", client_ip().affinity_timeout(60), 60),
        (
            "ClientIP 1 day",
            client_ip().affinity_timeout(86_400),
            86_400,
        ),
        (
            "None",
            dual_stack_web("NodePort").session_affinity("None"),
            0,
        ),
        ("absent", dual_stack_web("NodePort"), 0),
    ];
    for (case, service, timeout) in cases {
        let model = build_web(service, &node_a());
        assert_eq!(model.errors, [], "{case}");
        for spec in model.frontends.values() {
            assert_eq!(spec.affinity_timeout_s, timeout, "{case}");
        }
        assert_eq!(model.frontends.len(), 4);
    }
}

#[test]
fn invalid_affinity_rejects_the_service() {
    let client_ip = || dual_stack_web("ClusterIP").session_affinity("ClientIP");
    for (service, reason) in [
        (
            client_ip().affinity_timeout(0),
            "sessionAffinityConfig.clientIP.timeoutSeconds 0 is outside 1..=86400",
        ),
        (
            client_ip().affinity_timeout(86_401),
            "sessionAffinityConfig.clientIP.timeoutSeconds 86401 is outside 1..=86400",
        ),
        (
            dual_stack_web("ClusterIP").session_affinity("Cookie"),
            r#"sessionAffinity "Cookie" is not None or ClientIP"#,
        ),
    ] {
        let model = build_web(service, &node_a());
        assert!(model.frontends.is_empty(), "{reason}");
        assert_eq!(error_lines(&model), [format!("Service shop/web: {reason}")]);
    }
}

// ---- Source ranges -----------------------------------------------------

/// `node_a` with `--source-ranges-strict`.
fn strict_node() -> NodeContext {
    NodeContext {
        source_ranges_strict: true,
        ..node_a()
    }
}

/// A `LoadBalancer` Service with ranges of both families, ingress IPs and
/// external IPs.
fn ranged_lb() -> ServiceBuilder {
    dual_stack_web("LoadBalancer")
        .external_ips(["198.51.100.20", "2001:db8:ee::20"])
        .source_ranges([
            "203.0.113.77/24",
            "198.51.100.5/32",
            " 192.0.2.0/26 ",
            "2001:db8:abcd:12::1/48",
            "2001:db8:abcd::/48",
        ])
        .ingress_ip("203.0.113.10")
        .ingress_ip("2001:db8:ff::10")
}

#[test]
fn source_ranges_guard_only_the_load_balancer_ips_as_kube_proxy() {
    let model = build_web(ranged_lb(), &node_a());
    assert_eq!(model.errors, []);
    let v4 = vec![
        (ip("192.0.2.0"), 26),
        (ip("198.51.100.5"), 32),
        (ip("203.0.113.0"), 24),
    ];
    let v6 = vec![(ip("2001:db8:abcd::"), 48)];
    for (frontend, spec) in &model.frontends {
        // kube-proxy: "nodeports are not subject to
        // loadBalancerSourceRanges"; external IPs and ClusterIPs neither.
        let expected = match (spec.kind, frontend.addr) {
            (FrontendKind::LoadBalancer, IpAddr::V4(_)) => &v4,
            (FrontendKind::LoadBalancer, IpAddr::V6(_)) => &v6,
            _ => &vec![],
        };
        assert_eq!(&spec.source_ranges, expected, "{frontend} {}", spec.kind);
    }
    assert_eq!(model.frontends.len(), 8);
}

#[test]
fn strict_source_ranges_guard_every_external_frontend_per_family() {
    let model = build_web(ranged_lb(), &strict_node());
    assert_eq!(model.errors, []);
    let v4 = vec![
        (ip("192.0.2.0"), 26),
        (ip("198.51.100.5"), 32),
        (ip("203.0.113.0"), 24),
    ];
    let v6 = vec![(ip("2001:db8:abcd::"), 48)];
    for (frontend, spec) in &model.frontends {
        let expected = match (spec.kind, frontend.addr) {
            (FrontendKind::ClusterIp, _) => &vec![],
            (_, IpAddr::V4(_)) => &v4,
            (_, IpAddr::V6(_)) => &v6,
        };
        assert_eq!(&spec.source_ranges, expected, "{frontend} {}", spec.kind);
    }
    assert_eq!(model.frontends.len(), 8);
}

#[test]
fn source_ranges_of_one_family_leave_the_other_open() {
    let service = dual_stack_web("LoadBalancer")
        .source_ranges(["10.0.0.0/8"])
        .ingress_ip("203.0.113.10")
        .ingress_ip("2001:db8:ff::10");
    for node in [node_a(), strict_node()] {
        let model = build_web(service.clone(), &node);
        assert_eq!(model.errors, []);
        assert_eq!(
            spec_of(&model, "203.0.113.10", 80, Protocol::Tcp).source_ranges,
            [(ip("10.0.0.0"), 8)]
        );
        assert_eq!(
            spec_of(&model, "2001:db8:ff::10", 80, Protocol::Tcp).source_ranges,
            []
        );
    }
    // Only LoadBalancer Services are guarded; kube-proxy ignores the
    // field elsewhere.
    for node in [node_a(), strict_node()] {
        let model = build_web(
            dual_stack_web("NodePort").source_ranges(["10.0.0.0/8", "bogus"]),
            &node,
        );
        assert_eq!(model.errors, []);
        assert!(
            model
                .frontends
                .values()
                .all(|spec| spec.source_ranges.is_empty())
        );
    }
}

#[test]
fn a_range_holding_the_node_lets_the_load_balancer_ips_in() {
    // node_a is 192.168.1.10: a request from the node to a VIP that is
    // local to it comes back with the VIP as source (kube-proxy's
    // allowFromNode). The IPv6 ranges do not hold 2001:db8:1::10.
    let service = dual_stack_web("LoadBalancer")
        .source_ranges(["192.168.0.0/16", "2001:db8:abcd::/48"])
        .ingress_ip("203.0.113.10")
        .ingress_ip("203.0.113.11")
        .ingress_ip("2001:db8:ff::10");
    let model = build_web(service, &node_a());
    assert_eq!(
        spec_of(&model, "203.0.113.10", 80, Protocol::Tcp).source_ranges,
        [
            (ip("192.168.0.0"), 16),
            (ip("203.0.113.10"), 32),
            (ip("203.0.113.11"), 32)
        ]
    );
    assert_eq!(
        spec_of(&model, "2001:db8:ff::10", 80, Protocol::Tcp).source_ranges,
        [(ip("2001:db8:abcd::"), 48)]
    );
}

#[test]
fn an_invalid_source_range_skips_that_entry_only() {
    for range in [
        "10.0.0.0/33",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "2001:db8::/129",
        "256.0.0.0/8",
        "1.2.3/8",
        "example.com",
    ] {
        let model = build_web(
            dual_stack_web("LoadBalancer")
                .source_ranges([range, "198.51.100.0/24"])
                .ingress_ip("203.0.113.10"),
            &node_a(),
        );
        assert_eq!(
            spec_of(&model, "203.0.113.10", 80, Protocol::Tcp).source_ranges,
            [(ip("198.51.100.0"), 24)],
            "{range}"
        );
        assert_eq!(model.frontends.len(), 5, "{range}");
        assert_eq!(
            error_lines(&model),
            [format!(
                "Service shop/web: loadBalancerSourceRanges entry {range:?} is not a CIDR; entry skipped"
            )]
        );
    }
}

#[test]
fn cidr_parsing_reads_leading_zeros_as_the_api_server_did() {
    // ParseCIDRSloppy: decimal octets and lengths with leading zeros.
    assert_eq!(parse_cidr("010.001.0.0/08"), Some((ip("10.0.0.0"), 8)));
    assert_eq!(
        parse_cidr("192.000.002.077/32"),
        Some((ip("192.0.2.77"), 32))
    );
    assert_eq!(parse_cidr("0192.0.2.0/0024"), Some((ip("192.0.2.0"), 24)));
    assert_eq!(parse_cidr("0256.0.2.0/24"), None);
    assert_eq!(parse_cidr("192.0.2.0.1/24"), None);
}

#[test]
fn cidr_parsing_masks_host_bits() {
    assert_eq!(parse_cidr("192.0.2.1/0"), Some((ip("0.0.0.0"), 0)));
    assert_eq!(parse_cidr("192.0.2.255/31"), Some((ip("192.0.2.254"), 31)));
    assert_eq!(parse_cidr("192.0.2.1"), Some((ip("192.0.2.1"), 32)));
    assert_eq!(parse_cidr("2001:db8::1/0"), Some((ip("::"), 0)));
    assert_eq!(
        parse_cidr("2001:db8::ff/120"),
        Some((ip("2001:db8::"), 120))
    );
    assert_eq!(parse_cidr("2001:db8::1"), Some((ip("2001:db8::1"), 128)));
    assert_eq!(
        parse_cidr("2001:db8::1/128"),
        Some((ip("2001:db8::1"), 128))
    );
    assert_eq!(parse_cidr("192.0.2.0/24/1"), None);
    assert_eq!(parse_cidr(""), None);
}

#[test]
fn addresses_with_leading_zeros_read_as_decimal_as_kube_proxy() {
    // Stored before Kubernetes 1.22 tightened validation; kube-proxy's
    // ParseIPSloppy still reads them.
    let model = build_web(
        dual_stack_web("LoadBalancer")
            .external_ips(["198.051.100.020"])
            .ingress_ip("203.000.113.010"),
        &node_a(),
    );
    assert_eq!(model.errors, []);
    for (addr, kind) in [
        ("198.51.100.20", FrontendKind::ExternalIp),
        ("203.0.113.10", FrontendKind::LoadBalancer),
    ] {
        assert_eq!(spec_of(&model, addr, 80, Protocol::Tcp).kind, kind);
    }
    let model = build_plain(
        [ServiceBuilder::new("shop", "old")
            .ips(["010.096.000.010"])
            .port("", 80, "TCP", 80)],
        [
            crate::testing::SliceBuilder::for_service("shop", "old", crate::testing::IpFamily::V4)
                .port("", 80, "TCP")
                .endpoint(crate::testing::EndpointBuilder::new("010.244.001.005")),
        ],
    );
    assert_eq!(model.errors, []);
    assert_eq!(
        spec_of(&model, "10.96.0.10", 80, Protocol::Tcp).backends,
        [be("10.244.1.5", 80, false)]
    );
}
