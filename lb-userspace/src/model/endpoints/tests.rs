//! Tests of `EndpointSlice` parsing: ports by name and protocol, address
//! validation, and which slices belong to a Service.

use crate::model::Protocol;
use crate::model::test_fixtures::{backends, backends_of, build_plain, error_lines, frontend};
use crate::testing::{EndpointBuilder, IpFamily, ServiceBuilder, SliceBuilder};

/// `shop/web` at 10.96.0.10, port 80 to `target_port`.
fn web(target_port: i32) -> ServiceBuilder {
    ServiceBuilder::new("shop", "web")
        .ips(["10.96.0.10"])
        .port("", 80, "TCP", target_port)
}

fn web_slice(name: &str) -> SliceBuilder {
    SliceBuilder::for_service("shop", "web", IpFamily::V4).name(name)
}

#[test]
fn named_target_port_resolves_per_slice() {
    // Two pod templates name "http" differently: the controller writes
    // each number into its own slice.
    let model = build_plain(
        [ServiceBuilder::new("shop", "web")
            .ips(["10.96.0.20"])
            .named_target_port("http", 80, "TCP", "http")
            .named_target_port("metrics", 9090, "TCP", "metrics")],
        [
            web_slice("web-old")
                .port("http", 8080, "TCP")
                .port("metrics", 9100, "TCP")
                .addresses(["10.244.1.1"]),
            web_slice("web-new")
                .port("http", 8081, "TCP")
                .addresses(["10.244.1.2"]),
        ],
    );
    assert_eq!(model.errors, []);
    assert_eq!(
        backends_of(&model, "10.96.0.20", 80, Protocol::Tcp),
        backends(&[("10.244.1.1", 8080), ("10.244.1.2", 8081)])
    );
    // web-new exposes no "metrics" port, so it gives no metrics backend.
    assert_eq!(
        backends_of(&model, "10.96.0.20", 9090, Protocol::Tcp),
        backends(&[("10.244.1.1", 9100)])
    );
    assert_eq!(
        model.frontends[&frontend("10.96.0.20", 9090, Protocol::Tcp)]
            .service
            .port_name,
        "metrics".into()
    );
}

#[test]
fn same_port_number_over_tcp_and_udp() {
    let model = build_plain(
        [ServiceBuilder::new("kube-system", "kube-dns")
            .ips(["10.96.0.10"])
            .port("dns", 53, "UDP", 53)
            .port("dns-tcp", 53, "TCP", 53)],
        [
            SliceBuilder::for_service("kube-system", "kube-dns", IpFamily::V4)
                .name("kube-dns-q8m4z")
                .port("dns-tcp", 53, "TCP")
                .port("dns", 5353, "UDP")
                .addresses(["10.244.0.2"]),
        ],
    );
    assert_eq!(model.errors, []);
    assert_eq!(model.frontends.len(), 2);
    assert_eq!(
        backends_of(&model, "10.96.0.10", 53, Protocol::Udp),
        backends(&[("10.244.0.2", 5353)])
    );
    assert_eq!(
        backends_of(&model, "10.96.0.10", 53, Protocol::Tcp),
        backends(&[("10.244.0.2", 53)])
    );
}

#[test]
fn slice_port_of_other_protocol_does_not_match() {
    let model = build_plain(
        [ServiceBuilder::new("ops", "syslog")
            .ips(["10.96.1.1"])
            .port("", 514, "UDP", 514)],
        [SliceBuilder::for_service("ops", "syslog", IpFamily::V4)
            .name("syslog-1")
            .port("", 514, "TCP")
            .addresses(["10.244.3.3"])],
    );
    assert_eq!(model.errors, []);
    assert_eq!(backends_of(&model, "10.96.1.1", 514, Protocol::Udp), []);
}

#[test]
fn fqdn_slices_are_ignored() {
    let model = build_plain(
        [web(80)],
        [web_slice("web-fqdn")
            .address_type("FQDN")
            .port("", 80, "TCP")
            .addresses(["backend.example.com"])],
    );
    assert_eq!(model.errors, []);
    assert_eq!(backends_of(&model, "10.96.0.10", 80, Protocol::Tcp), []);
}

#[test]
fn wrong_family_and_unparsable_endpoint_addresses_are_skipped_alone() {
    let model = build_plain(
        [web(8080)],
        [web_slice("web-1").port("", 8080, "TCP").addresses([
            "fd00::1",
            "10.244.1.999",
            "10.244.1.1",
        ])],
    );
    assert_eq!(
        error_lines(&model),
        [
            "EndpointSlice shop/web-1: address \"10.244.1.999\" is not an IP address; address skipped",
            "EndpointSlice shop/web-1: address fd00::1 is not IPv4 like the slice's addressType; address skipped",
        ]
    );
    assert_eq!(
        backends_of(&model, "10.96.0.10", 80, Protocol::Tcp),
        backends(&[("10.244.1.1", 8080)])
    );
}

#[test]
fn endpoint_uses_its_first_valid_address_only() {
    let model = build_plain(
        [web(80)],
        [web_slice("web-1")
            .port("", 80, "TCP")
            .endpoint(EndpointBuilder::with_addresses([
                "10.244.1.1",
                "10.244.1.2",
            ]))],
    );
    assert_eq!(model.errors, []);
    assert_eq!(
        backends_of(&model, "10.96.0.10", 80, Protocol::Tcp),
        backends(&[("10.244.1.1", 80)])
    );
}

#[test]
fn slice_port_out_of_range_is_reported_and_skipped() {
    let model = build_plain(
        [ServiceBuilder::new("shop", "web")
            .ips(["10.96.0.10"])
            .port("http", 80, "TCP", 80)
            .port("admin", 81, "TCP", 81)],
        [web_slice("web-1")
            .port("http", 70000, "TCP")
            .port("admin", 9000, "TCP")
            .addresses(["10.244.1.1"])],
    );
    assert_eq!(
        error_lines(&model),
        ["EndpointSlice shop/web-1: port \"http\" number 70000 is outside 1..=65535; port skipped"]
    );
    assert_eq!(backends_of(&model, "10.96.0.10", 80, Protocol::Tcp), []);
    assert_eq!(
        backends_of(&model, "10.96.0.10", 81, Protocol::Tcp),
        backends(&[("10.244.1.1", 9000)])
    );
}

#[test]
fn slices_of_other_namespaces_and_services_are_ignored() {
    let model = build_plain(
        [web(80)],
        [
            SliceBuilder::for_service("staging", "web", IpFamily::V4)
                .name("web-1")
                .port("", 80, "TCP")
                .addresses(["10.244.9.1"]),
            SliceBuilder::for_service("shop", "api", IpFamily::V4)
                .name("web-2")
                .port("", 80, "TCP")
                .addresses(["10.244.9.2"]),
            web_slice("web-custom")
                .without_service()
                .port("", 80, "TCP")
                .addresses(["10.244.9.3"]),
        ],
    );
    assert_eq!(model.errors, []);
    assert_eq!(backends_of(&model, "10.96.0.10", 80, Protocol::Tcp), []);
}
