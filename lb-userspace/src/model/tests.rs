//! Tests of [`build`] as a whole: the types, whole-Service errors, and
//! Services competing for a frontend or a health check port.

use super::test_fixtures::{
    backends, backends_of, build_on, build_plain, error_lines, frontend, frontend_kinds, node_a,
};
use super::*;
use crate::testing::{EndpointBuilder, IpFamily, ServiceBuilder, SliceBuilder};

#[test]
fn single_stack_ipv4() {
    let model = build_plain(
        [ServiceBuilder::cluster_ip("shop", "web")
            .ips(["10.96.0.10"])
            .families(["IPv4"])
            .selector("app", "web")
            .port("http", 80, "TCP", 8080)],
        [SliceBuilder::for_service("shop", "web", IpFamily::V4)
            .name("web-abc12")
            .port("http", 8080, "TCP")
            .endpoint(EndpointBuilder::new("10.244.1.5").up().node("node-a"))
            .endpoint(EndpointBuilder::new("10.244.2.7").up().node("node-b"))],
    );
    assert_eq!(model.errors, []);
    assert_eq!(model.frontends.len(), 1);
    let spec = &model.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)];
    assert_eq!(
        spec.service,
        ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
            port_name: "http".into()
        }
    );
    assert_eq!(
        spec.backends,
        backends(&[("10.244.1.5", 8080), ("10.244.2.7", 8080)])
    );
}

#[test]
fn single_stack_ipv6() {
    let model = build_plain(
        [ServiceBuilder::new("kube-system", "dns")
            .ips(["fd00:10:96::a"])
            .families(["IPv6"])
            .port("dns", 53, "UDP", 53)],
        [
            SliceBuilder::for_service("kube-system", "dns", IpFamily::V6)
                .name("dns-x7k2p")
                .port("dns", 53, "UDP")
                .endpoint(EndpointBuilder::new("fd00:10:244:1::3").ready(true)),
        ],
    );
    assert_eq!(model.errors, []);
    assert_eq!(
        backends_of(&model, "fd00:10:96::a", 53, Protocol::Udp),
        backends(&[("fd00:10:244:1::3", 53)])
    );
}

#[test]
fn dual_stack_takes_each_family_from_its_own_slices() {
    let model = build_plain(
        [ServiceBuilder::new("prod", "api")
            .ips(["10.96.5.5", "fd00:10:96::5"])
            .families(["IPv4", "IPv6"])
            .port("", 443, "TCP", 8443)],
        [
            SliceBuilder::for_service("prod", "api", IpFamily::V4)
                .port("", 8443, "TCP")
                .addresses(["10.244.0.9"]),
            SliceBuilder::for_service("prod", "api", IpFamily::V6)
                .port("", 8443, "TCP")
                .addresses(["fd00:10:244::9"]),
        ],
    );
    assert_eq!(model.errors, []);
    assert_eq!(model.frontends.len(), 2);
    assert_eq!(
        backends_of(&model, "10.96.5.5", 443, Protocol::Tcp),
        backends(&[("10.244.0.9", 8443)])
    );
    assert_eq!(
        backends_of(&model, "fd00:10:96::5", 443, Protocol::Tcp),
        backends(&[("fd00:10:244::9", 8443)])
    );
}

#[test]
fn service_without_endpoints_still_has_its_frontend() {
    let model = build_plain(
        [ServiceBuilder::new("default", "lonely")
            .ips(["10.96.9.9"])
            .port("", 80, "TCP", 80)],
        [],
    );
    assert_eq!(model.errors, []);
    assert_eq!(backends_of(&model, "10.96.9.9", 80, Protocol::Tcp), []);
}

#[test]
fn missing_name_is_reported() {
    let model = build_plain(
        [ServiceBuilder::new("shop", "")
            .without_name()
            .ips(["10.96.0.10"])
            .port("", 80, "TCP", 80)],
        [],
    );
    assert!(model.frontends.is_empty());
    assert_eq!(
        error_lines(&model),
        ["Service shop/: missing metadata.name"]
    );
}

#[test]
fn contested_frontend_goes_to_the_first_service_by_namespace_and_name() {
    let mut services = vec![
        ServiceBuilder::new("a", "zeta")
            .ips(["10.96.0.10"])
            .port("", 80, "TCP", 80)
            .build(),
        ServiceBuilder::new("b", "alpha")
            .ips(["10.96.0.10"])
            .port("", 80, "TCP", 80)
            .port("", 81, "TCP", 81)
            .build(),
    ];
    let model = build(&services, &[], &NodeContext::default());
    assert_eq!(
        error_lines(&model),
        [
            "Service b/alpha: frontend 10.96.0.10:80/TCP is also claimed by Service a/zeta, which is older and serves it; frontend skipped"
        ]
    );
    // The loser keeps what nobody contests.
    assert_eq!(model.frontends.len(), 2);
    assert_eq!(
        model.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)]
            .service
            .name,
        "zeta".into()
    );
    assert_eq!(
        model.frontends[&frontend("10.96.0.10", 81, Protocol::Tcp)]
            .service
            .name,
        "alpha".into()
    );

    services.reverse();
    assert_eq!(
        build(&services, &[], &NodeContext::default()),
        model,
        "input order does not matter"
    );
}

#[test]
fn contested_frontend_goes_to_the_oldest_service() {
    // b/alpha was created first: it keeps 10.96.0.10:80 although a/zeta
    // comes first by name; a Service without a creation time (a manifest
    // file) comes after those with one.
    let services = [
        ServiceBuilder::new("a", "zeta")
            .created(1_700_000_100)
            .ips(["10.96.0.10"])
            .port("", 80, "TCP", 80)
            .port("", 82, "TCP", 82),
        ServiceBuilder::new("b", "alpha")
            .created(1_700_000_000)
            .ips(["10.96.0.10"])
            .port("", 80, "TCP", 80),
        ServiceBuilder::new("a", "aaa")
            .ips(["10.96.0.10"])
            .port("", 82, "TCP", 82),
    ];
    let model = build_plain(services.clone(), []);
    let owner = |port| {
        model.frontends[&frontend("10.96.0.10", port, Protocol::Tcp)]
            .service
            .to_string()
    };
    assert_eq!((owner(80), owner(82)), ("b/alpha".into(), "a/zeta".into()));
    assert_eq!(
        error_lines(&model),
        [
            "Service a/aaa: frontend 10.96.0.10:82/TCP is also claimed by Service a/zeta, which is older and serves it; frontend skipped",
            "Service a/zeta: frontend 10.96.0.10:80/TCP is also claimed by Service b/alpha, which is older and serves it; frontend skipped",
        ]
    );
    // The incremental model, given the objects one by one, newest first,
    // ends the same.
    let mut incremental = Incremental::new(NodeContext::default());
    for service in services.iter().rev() {
        incremental.upsert_service(&service.clone().build());
        incremental.commit();
    }
    assert_eq!(incremental.model(), model);
    // The winner goes away: the next oldest takes the frontend over.
    incremental.remove_service(&("b".into(), "alpha".into()));
    incremental.commit();
    let after = incremental.model();
    assert_eq!(
        after.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)]
            .service
            .to_string(),
        "a/zeta"
    );
    assert_eq!(after.errors.len(), 1, "{:?}", after.errors);
}

#[test]
fn duplicate_service_object_keeps_the_first_given() {
    let web = |ip| {
        ServiceBuilder::new("shop", "web")
            .ips([ip])
            .port("", 80, "TCP", 80)
    };
    let model = build_plain([web("10.96.0.10"), web("10.96.0.11")], []);
    assert_eq!(
        error_lines(&model),
        ["Service shop/web: duplicate Service, the first one given is used"]
    );
    assert!(
        model
            .frontends
            .contains_key(&frontend("10.96.0.10", 80, Protocol::Tcp))
    );
    assert_eq!(model.frontends.len(), 1);
}

#[test]
fn missing_namespace_means_default() {
    let model = build_plain(
        [ServiceBuilder::new("", "web")
            .without_namespace()
            .ips(["10.96.0.10"])
            .port("", 80, "TCP", 80)],
        [SliceBuilder::for_service("default", "web", IpFamily::V4)
            .name("web-1")
            .port("", 80, "TCP")
            .addresses(["10.244.0.1"])],
    );
    let spec = &model.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)];
    assert_eq!(&*spec.service.namespace, "default");
    assert_eq!(spec.backends, backends(&[("10.244.0.1", 80)]));
}

#[test]
fn protocol_numbers_names_and_parsing() {
    assert_eq!((Protocol::Tcp.number(), Protocol::Udp.number()), (6, 17));
    assert_eq!(Protocol::Sctp.number(), 132);
    assert_eq!((Protocol::Tcp.name(), Protocol::Udp.name()), ("TCP", "UDP"));
    assert_eq!(Protocol::Sctp.name(), "SCTP");
    assert_eq!(Protocol::from_k8s(None), Ok(Protocol::Tcp));
    assert_eq!(Protocol::from_k8s(Some("UDP")), Ok(Protocol::Udp));
    assert_eq!(Protocol::from_k8s(Some("SCTP")), Ok(Protocol::Sctp));
    assert_eq!(
        "DCCP".parse::<Protocol>(),
        Err(UnsupportedProtocol("DCCP".into()))
    );
    assert!(
        "tcp".parse::<Protocol>().is_err(),
        "Kubernetes spells protocols in capitals"
    );
}

#[test]
fn displays_for_logs() {
    assert_eq!(
        frontend("fd00::1", 443, Protocol::Tcp).to_string(),
        "[fd00::1]:443/TCP"
    );
    assert_eq!(
        frontend("10.0.0.1", 53, Protocol::Udp).to_string(),
        "10.0.0.1:53/UDP"
    );
    let error = ObjectError {
        kind: "File",
        namespace: String::new(),
        name: "a.yaml".into(),
        reason: "bad".into(),
    };
    assert_eq!(error.to_string(), "File a.yaml: bad");
}

#[test]
fn colliding_frontends_go_to_the_first_service_by_namespace_and_name_each_alone() {
    let model = build_on(
        [
            ServiceBuilder::new("a", "alpha")
                .ips(["10.96.0.10"])
                .port("", 80, "TCP", 80),
            ServiceBuilder::new("b", "beta")
                .ips(["10.96.0.11"])
                .external_ips(["10.96.0.10"])
                .port("", 80, "TCP", 80),
            ServiceBuilder::node_port("c", "gamma")
                .ips(["10.96.0.12"])
                .port("http", 80, "TCP", 80)
                .node_port_of_last(30080),
            ServiceBuilder::node_port("c", "delta")
                .ips(["10.96.0.13"])
                .port("web", 8080, "TCP", 8080)
                .node_port_of_last(30080),
            ServiceBuilder::load_balancer("d", "self")
                .ips(["10.96.0.14"])
                .external_ips(["203.0.113.14"])
                .port("", 443, "TCP", 443)
                .ingress_ip("203.0.113.14"),
        ],
        [],
        &node_a(),
    );
    assert_eq!(
        error_lines(&model),
        [
            "Service b/beta: frontend 10.96.0.10:80/TCP is also claimed by Service a/alpha, which is older and serves it; frontend skipped",
            "Service c/gamma: frontend 192.168.1.10:30080/TCP is also claimed by Service c/delta:web, which is older and serves it; frontend skipped",
        ]
    );
    // Losers keep their uncontested frontends; one Service listing an
    // address as both ingress IP and external IP is no collision: the
    // ingress IP wins.
    assert_eq!(
        frontend_kinds(&model),
        [
            "10.96.0.10:80/TCP ClusterIP",
            "10.96.0.11:80/TCP ClusterIP",
            "10.96.0.12:80/TCP ClusterIP",
            "10.96.0.13:8080/TCP ClusterIP",
            "10.96.0.14:443/TCP ClusterIP",
            "192.168.1.10:30080/TCP NodePort",
            "203.0.113.14:443/TCP LoadBalancer",
        ]
    );
}

#[test]
fn health_checks_are_sorted_by_port_and_need_local_policy_and_a_valid_port() {
    let service = |name: &str| {
        ServiceBuilder::load_balancer("shop", name)
            .ips([format!("10.96.1.{}", name.len()).as_str()])
            .port("", 80, "TCP", 80)
    };
    let model = build_on(
        [
            service("z")
                .external_traffic_policy("Local")
                .health_check_node_port(31000),
            service("yy")
                .external_traffic_policy("Local")
                .health_check_node_port(32000),
            service("xxx")
                .external_traffic_policy("Cluster")
                .health_check_node_port(32100),
            service("wwww")
                .external_traffic_policy("Local")
                .health_check_node_port(65536),
            service("vvvvv")
                .external_traffic_policy("Local")
                .health_check_node_port(32000),
            service("uuuuuu").external_traffic_policy("Local"),
        ],
        [],
        &node_a(),
    );
    assert_eq!(
        error_lines(&model),
        [
            "Service shop/wwww: healthCheckNodePort 65536 is outside 1..=65535; health check skipped",
            "Service shop/yy: healthCheckNodePort 32000 is also claimed by Service shop/vvvvv, which is older and serves it; health check skipped",
        ]
    );
    assert_eq!(
        model
            .health_checks
            .iter()
            .map(|check| (check.port, &*check.service.name))
            .collect::<Vec<_>>(),
        [(31000, "z"), (32000, "vvvvv")]
    );
    // The Service with the bad port is still served.
    assert!(
        model
            .frontends
            .values()
            .any(|spec| &*spec.service.name == "wwww")
    );
}

#[test]
fn objects_labelled_headless_or_for_another_proxy_are_none_of_ours() {
    // kube-proxy's watches select `!service-proxy-name,!headless` for
    // Services and slices alike; the file source gets the same rule.
    let web = |name: &str| {
        ServiceBuilder::new("shop", name)
            .ips(["10.96.0.10"])
            .port("http", 80, "TCP", 8080)
    };
    let slice = |service: &str, name: &str| {
        SliceBuilder::for_service("shop", service, IpFamily::V4)
            .name(name)
            .port("http", 8080, "TCP")
            .endpoint(EndpointBuilder::new("10.244.1.5").up())
    };
    let services = [
        web("web"),
        web("labelled").label(HEADLESS_LABEL, ""),
        web("mesh")
            .label(SERVICE_PROXY_NAME_LABEL, "other")
            .ips(["10.96.0.11"]),
    ];
    let model = build_plain(
        services.clone(),
        [
            slice("web", "web-1"),
            // A stray slice claiming the Service: ignored, as kube-proxy
            // never sees it.
            slice("web", "web-2")
                .label(HEADLESS_LABEL, "")
                .endpoint(EndpointBuilder::new("10.244.9.9").up()),
            slice("web", "web-3")
                .label(SERVICE_PROXY_NAME_LABEL, "other")
                .endpoint(EndpointBuilder::new("10.244.9.8").up()),
        ],
    );
    assert_eq!(model.errors, []);
    assert_eq!(frontend_kinds(&model), ["10.96.0.10:80/TCP ClusterIP"]);
    assert_eq!(
        backends_of(&model, "10.96.0.10", 80, Protocol::Tcp),
        backends(&[("10.244.1.5", 8080)])
    );
    // The incremental model, fed one object at a time, agrees.
    let mut incremental = Incremental::new(NodeContext::default());
    for service in services {
        incremental.upsert_service(&service.build());
    }
    for slice in [
        slice("web", "web-1"),
        slice("web", "web-2").label(HEADLESS_LABEL, ""),
    ] {
        incremental.upsert_slice(&slice.build());
    }
    incremental.commit();
    assert_eq!(incremental.model().frontends, model.frontends);
}
