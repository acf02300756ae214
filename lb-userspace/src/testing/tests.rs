//! The builders make objects the model accepts, and their manifest reads back.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{EndpointBuilder, IpFamily, ServiceBuilder, SliceBuilder, manifest, node_context};
use crate::model::{self, Frontend, Protocol};

#[test]
fn built_objects_make_a_dual_stack_service_with_backends() {
    let service = ServiceBuilder::cluster_ip("default", "web")
        .ips(["10.0.0.1", "fd00::1"])
        .families(["IPv4", "IPv6"])
        .port("http", 80, "TCP", 8080)
        .build();
    let v4 = SliceBuilder::for_service("default", "web", IpFamily::V4)
        .port("http", 8080, "TCP")
        .endpoint(EndpointBuilder::new("10.244.1.5").up().node("node-a"))
        .build();
    let v6 = SliceBuilder::for_service("default", "web", IpFamily::V6)
        .port("http", 8080, "TCP")
        .addresses(["fd00:244::5"])
        .build();
    let node = node_context("node-a", ["192.168.1.10"], Some("zone-a"));
    let built = model::build(&[service], &[v4, v6], &node);
    assert_eq!(built.errors, []);
    let v4_frontend = Frontend {
        addr: "10.0.0.1".parse().unwrap(),
        port: 80,
        proto: Protocol::Tcp,
    };
    let backend = built.frontends[&v4_frontend].backends[0];
    assert_eq!(
        (backend.to_string(), backend.node_local),
        ("10.244.1.5:8080".into(), true)
    );
    assert_eq!(built.frontends.len(), 2);
}

#[test]
fn manifest_round_trips_through_yaml() {
    let service = ServiceBuilder::load_balancer("shop", "web")
        .ips(["10.0.0.1"])
        .port("http", 80, "TCP", 8080)
        .node_port_of_last(30080)
        .ingress_ip("203.0.113.1")
        .build();
    let slice = SliceBuilder::for_service("shop", "web", IpFamily::V4)
        .port("http", 8080, "TCP")
        .endpoint(
            EndpointBuilder::new("10.244.1.5")
                .draining()
                .zone_hints(["a"]),
        )
        .build();
    let text = manifest(std::slice::from_ref(&service), std::slice::from_ref(&slice));
    let mut documents = text.split("---\n");
    let parsed: Service = serde_saphyr::from_str(documents.next().unwrap()).unwrap();
    let parsed_slice: EndpointSlice = serde_saphyr::from_str(documents.next().unwrap()).unwrap();
    assert_eq!((parsed, parsed_slice), (service, slice));
    assert!(text.contains("kind: Service\n") && text.contains("kind: EndpointSlice\n"));
}
