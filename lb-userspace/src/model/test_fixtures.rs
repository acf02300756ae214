//! Fixtures and assertions shared by the model's unit tests.

use std::net::IpAddr;

use crate::testing::{EndpointBuilder, IpFamily, ServiceBuilder, SliceBuilder, node_context};

use super::{Backend, Frontend, FrontendSpec, Model, NodeContext, Protocol, build};

/// Builds the model of these objects as seen from `node`.
pub(super) fn build_on(
    services: impl IntoIterator<Item = ServiceBuilder>,
    slices: impl IntoIterator<Item = SliceBuilder>,
    node: &NodeContext,
) -> Model {
    let services: Vec<_> = services.into_iter().map(ServiceBuilder::build).collect();
    let slices: Vec<_> = slices.into_iter().map(SliceBuilder::build).collect();
    build(&services, &slices, node)
}

/// Builds the model of these objects on a node that knows nothing of
/// itself (no name, no addresses, no zone).
pub(super) fn build_plain(
    services: impl IntoIterator<Item = ServiceBuilder>,
    slices: impl IntoIterator<Item = SliceBuilder>,
) -> Model {
    build_on(services, slices, &NodeContext::default())
}

pub(super) fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The node of most tests: dual-stack, in zone-a.
pub(super) fn node_a() -> NodeContext {
    node_context("node-a", ["192.168.1.10", "2001:db8:1::10"], Some("zone-a"))
}

pub(super) fn be(addr: &str, port: u16, node_local: bool) -> Backend {
    Backend {
        addr: ip(addr),
        port,
        node_local,
    }
}

pub(super) fn frontend(addr: &str, port: u16, proto: Protocol) -> Frontend {
    Frontend {
        addr: ip(addr),
        port,
        proto,
    }
}

/// Backends that are not node-local.
pub(super) fn backends(list: &[(&str, u16)]) -> Vec<Backend> {
    list.iter()
        .map(|&(addr, port)| be(addr, port, false))
        .collect()
}

pub(super) fn spec_of<'m>(
    model: &'m Model,
    addr: &str,
    port: u16,
    proto: Protocol,
) -> &'m FrontendSpec {
    model
        .frontends
        .get(&frontend(addr, port, proto))
        .unwrap_or_else(|| panic!("no frontend {addr}:{port}/{proto}: {model:#?}"))
}

pub(super) fn backends_of(model: &Model, addr: &str, port: u16, proto: Protocol) -> Vec<Backend> {
    spec_of(model, addr, port, proto).backends.clone()
}

/// "frontend kind" lines, in frontend order.
pub(super) fn frontend_kinds(model: &Model) -> Vec<String> {
    model
        .frontends
        .iter()
        .map(|(frontend, spec)| format!("{frontend} {}", spec.kind))
        .collect()
}

pub(super) fn error_lines(model: &Model) -> Vec<String> {
    model.errors.iter().map(ToString::to_string).collect()
}

/// A dual-stack Service `shop/web` of type `type_` (port `http` 80 ->
/// 8080, `nodePort` 30080); tests add to it.
pub(super) fn dual_stack_web(type_: &str) -> ServiceBuilder {
    ServiceBuilder::new("shop", "web")
        .type_(type_)
        .ips(["10.96.0.10", "fd00:10:96::10"])
        .families(["IPv4", "IPv6"])
        .selector("app", "web")
        .port("http", 80, "TCP", 8080)
        .node_port_of_last(30080)
}

/// The slices of [`dual_stack_web`]: one endpoint per family on node-a
/// and one on node-b, all up.
pub(super) fn dual_stack_web_slices() -> [SliceBuilder; 2] {
    let slice = |family, on_a: &str, on_b: &str| {
        SliceBuilder::for_service("shop", "web", family)
            .port("http", 8080, "TCP")
            .endpoint(EndpointBuilder::new(on_a).up().node("node-a"))
            .endpoint(EndpointBuilder::new(on_b).up().node("node-b"))
    };
    [
        slice(IpFamily::V4, "10.244.1.5", "10.244.2.7"),
        slice(IpFamily::V6, "fd00:10:244:1::5", "fd00:10:244:2::7"),
    ]
}

/// The model of `service` (a [`dual_stack_web`]) with its slices.
pub(super) fn build_web(service: ServiceBuilder, node: &NodeContext) -> Model {
    build_on([service], dual_stack_web_slices(), node)
}
