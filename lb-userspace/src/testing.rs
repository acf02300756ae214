//! Test fixtures as builders: Kubernetes `Service`s and `EndpointSlice`s
//! built fluently, so that a test states only what it is about instead of a
//! page of YAML.
//!
//! Public (and hidden from the docs) rather than `cfg(test)` so that the
//! integration tests under `tests/` can use it too, to write manifest files;
//! it uses nothing the agent does not already depend on.
//!
//! Every setter takes values as the API carries them (strings, `i32`s), so
//! that tests can build invalid objects (`"10.96.0.300"`, port `70000`) and
//! check they are reported.
//!
//! ```
//! use lb_userspace::testing::{EndpointBuilder, IpFamily, ServiceBuilder, SliceBuilder};
//!
//! let service = ServiceBuilder::cluster_ip("default", "web")
//!     .ips(["10.0.0.1", "fd00::1"])
//!     .port("http", 80, "TCP", 8080)
//!     .build();
//! let slice = SliceBuilder::for_service("default", "web", IpFamily::V4)
//!     .port("http", 8080, "TCP")
//!     .endpoint(EndpointBuilder::new("10.244.1.5").ready(true).node("node-a"))
//!     .build();
//! # let _ = (service, slice);
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
    ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{NodeContext, SERVICE_NAME_LABEL};

/// The address family of an `EndpointSlice` (its `addressType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// Spelling used by the Kubernetes API.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// Suffix of the default slice name: `v4` or `v6`.
    fn suffix(self) -> &'static str {
        match self {
            Self::V4 => "v4",
            Self::V6 => "v6",
        }
    }
}

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        ..ObjectMeta::default()
    }
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    items.into_iter().map(str::to_owned).collect()
}

/// Builds a `v1/Service`.
#[derive(Clone, Debug)]
#[must_use]
pub struct ServiceBuilder {
    service: Service,
}

impl ServiceBuilder {
    /// A Service with an empty spec and no `type` (which means `ClusterIP`).
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            service: Service {
                metadata: meta(namespace, name),
                spec: Some(ServiceSpec::default()),
                status: None,
            },
        }
    }

    /// A `type: ClusterIP` Service.
    pub fn cluster_ip(namespace: &str, name: &str) -> Self {
        Self::new(namespace, name).type_("ClusterIP")
    }

    /// A `type: NodePort` Service.
    pub fn node_port(namespace: &str, name: &str) -> Self {
        Self::new(namespace, name).type_("NodePort")
    }

    /// A `type: LoadBalancer` Service.
    pub fn load_balancer(namespace: &str, name: &str) -> Self {
        Self::new(namespace, name).type_("LoadBalancer")
    }

    fn spec(&mut self) -> &mut ServiceSpec {
        self.service.spec.get_or_insert_with(ServiceSpec::default)
    }

    /// `spec.type`, any string.
    pub fn type_(mut self, type_: &str) -> Self {
        self.spec().type_ = Some(type_.to_owned());
        self
    }

    /// `spec.clusterIPs`, and `spec.clusterIP` set to the first, as the API
    /// server fills them in.
    pub fn ips<'a>(mut self, ips: impl IntoIterator<Item = &'a str>) -> Self {
        let ips = strings(ips);
        let spec = self.spec();
        spec.cluster_ip = ips.first().cloned();
        spec.cluster_ips = Some(ips);
        self
    }

    /// Only the legacy `spec.clusterIP`, without `clusterIPs`.
    pub fn legacy_cluster_ip(mut self, ip: &str) -> Self {
        self.spec().cluster_ip = Some(ip.to_owned());
        self
    }

    /// A headless Service: `clusterIP: None`.
    pub fn headless(self) -> Self {
        self.ips(["None"])
    }

    /// `spec.ipFamilies`, e.g. `["IPv4", "IPv6"]`.
    pub fn families<'a>(mut self, families: impl IntoIterator<Item = &'a str>) -> Self {
        self.spec().ip_families = Some(strings(families));
        self
    }

    /// A port with a numeric `targetPort`; an empty `name` leaves it unnamed.
    pub fn port(self, name: &str, port: i32, protocol: &str, target_port: i32) -> Self {
        self.port_to(name, port, protocol, IntOrString::Int(target_port))
    }

    /// A port whose `targetPort` names a container port.
    pub fn named_target_port(self, name: &str, port: i32, protocol: &str, target: &str) -> Self {
        self.port_to(name, port, protocol, IntOrString::String(target.to_owned()))
    }

    fn port_to(mut self, name: &str, port: i32, protocol: &str, target: IntOrString) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                name: (!name.is_empty()).then(|| name.to_owned()),
                port,
                protocol: Some(protocol.to_owned()),
                target_port: Some(target),
                ..ServicePort::default()
            });
        self
    }

    /// `nodePort` of the port added last.
    ///
    /// # Panics
    ///
    /// When no port was added yet.
    pub fn node_port_of_last(mut self, node_port: i32) -> Self {
        let port = self
            .spec()
            .ports
            .as_mut()
            .and_then(|ports| ports.last_mut())
            .expect("node_port_of_last needs a port first");
        port.node_port = Some(node_port);
        self
    }

    /// `spec.externalName`, of a `type: ExternalName` Service.
    pub fn external_name(mut self, name: &str) -> Self {
        self.spec().external_name = Some(name.to_owned());
        self
    }

    /// `spec.externalIPs`.
    pub fn external_ips<'a>(mut self, ips: impl IntoIterator<Item = &'a str>) -> Self {
        self.spec().external_ips = Some(strings(ips));
        self
    }

    /// One `status.loadBalancer.ingress` entry with this `ip`.
    pub fn ingress_ip(self, ip: &str) -> Self {
        self.ingress(LoadBalancerIngress {
            ip: Some(ip.to_owned()),
            ..LoadBalancerIngress::default()
        })
    }

    /// One `status.loadBalancer.ingress` entry with this `ip` and `ipMode`.
    pub fn ingress_ip_mode(self, ip: &str, ip_mode: &str) -> Self {
        self.ingress(LoadBalancerIngress {
            ip: Some(ip.to_owned()),
            ip_mode: Some(ip_mode.to_owned()),
            ..LoadBalancerIngress::default()
        })
    }

    /// One `status.loadBalancer.ingress` entry with only a `hostname`.
    pub fn ingress_hostname(self, hostname: &str) -> Self {
        self.ingress(LoadBalancerIngress {
            hostname: Some(hostname.to_owned()),
            ..LoadBalancerIngress::default()
        })
    }

    fn ingress(mut self, ingress: LoadBalancerIngress) -> Self {
        self.service
            .status
            .get_or_insert_with(ServiceStatus::default)
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default)
            .ingress
            .get_or_insert_with(Vec::new)
            .push(ingress);
        self
    }

    /// `spec.externalTrafficPolicy`, any string.
    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().external_traffic_policy = Some(policy.to_owned());
        self
    }

    /// `spec.internalTrafficPolicy`, any string.
    pub fn internal_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().internal_traffic_policy = Some(policy.to_owned());
        self
    }

    /// `spec.healthCheckNodePort`.
    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.spec().health_check_node_port = Some(port);
        self
    }

    /// `spec.sessionAffinity`, any string.
    pub fn session_affinity(mut self, affinity: &str) -> Self {
        self.spec().session_affinity = Some(affinity.to_owned());
        self
    }

    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub fn affinity_timeout(mut self, seconds: i32) -> Self {
        self.spec().session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(seconds),
            }),
        });
        self
    }

    /// `spec.loadBalancerSourceRanges`.
    pub fn source_ranges<'a>(mut self, ranges: impl IntoIterator<Item = &'a str>) -> Self {
        self.spec().load_balancer_source_ranges = Some(strings(ranges));
        self
    }

    /// `spec.allocateLoadBalancerNodePorts`.
    pub fn allocate_node_ports(mut self, allocate: bool) -> Self {
        self.spec().allocate_load_balancer_node_ports = Some(allocate);
        self
    }

    /// `spec.publishNotReadyAddresses: true`.
    pub fn publish_not_ready(mut self) -> Self {
        self.spec().publish_not_ready_addresses = Some(true);
        self
    }

    /// `spec.trafficDistribution`, e.g. `PreferClose`.
    pub fn traffic_distribution(mut self, distribution: &str) -> Self {
        self.spec().traffic_distribution = Some(distribution.to_owned());
        self
    }

    /// `spec.selector` with one label.
    pub fn selector(mut self, key: &str, value: &str) -> Self {
        self.spec()
            .selector
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// `metadata.creationTimestamp`, in seconds since the epoch.
    ///
    /// # Panics
    ///
    /// When `seconds` is outside the timestamps `jiff` can hold.
    pub fn created(mut self, seconds: i64) -> Self {
        let timestamp = k8s_openapi::jiff::Timestamp::from_second(seconds).expect("a timestamp");
        self.service.metadata.creation_timestamp = Some(Time(timestamp));
        self
    }

    /// One `metadata.labels` entry.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.service
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// One `metadata.annotations` entry.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.service
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// `metadata.resourceVersion`.
    pub fn resource_version(mut self, version: &str) -> Self {
        self.service.metadata.resource_version = Some(version.to_owned());
        self
    }

    /// Drops `metadata.name`.
    pub fn without_name(mut self) -> Self {
        self.service.metadata.name = None;
        self
    }

    /// Drops `metadata.namespace`.
    pub fn without_namespace(mut self) -> Self {
        self.service.metadata.namespace = None;
        self
    }

    /// Drops `spec`.
    pub fn without_spec(mut self) -> Self {
        self.service.spec = None;
        self
    }

    #[must_use]
    pub fn build(self) -> Service {
        self.service
    }
}

/// Builds a `discovery.k8s.io/v1` `EndpointSlice`.
#[derive(Clone, Debug)]
#[must_use]
pub struct SliceBuilder {
    slice: EndpointSlice,
}

impl SliceBuilder {
    /// A slice of `service` (by the service-name label), named
    /// `<service>-v4` or `<service>-v6`, with no ports or endpoints.
    pub fn for_service(namespace: &str, service: &str, family: IpFamily) -> Self {
        let mut metadata = meta(namespace, &format!("{service}-{}", family.suffix()));
        metadata.labels = Some(BTreeMap::from([(
            SERVICE_NAME_LABEL.to_owned(),
            service.to_owned(),
        )]));
        Self {
            slice: EndpointSlice {
                metadata,
                address_type: family.name().to_owned(),
                endpoints: Some(Vec::new()),
                ports: None,
            },
        }
    }

    /// `metadata.name`.
    pub fn name(mut self, name: &str) -> Self {
        self.slice.metadata.name = Some(name.to_owned());
        self
    }

    /// Drops `metadata.name`.
    pub fn without_name(mut self) -> Self {
        self.slice.metadata.name = None;
        self
    }

    /// A label besides the service-name one.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.slice
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Drops the service-name label: a custom slice of no Service.
    pub fn without_service(mut self) -> Self {
        self.slice.metadata.labels = None;
        self
    }

    /// `metadata.resourceVersion`.
    pub fn resource_version(mut self, version: &str) -> Self {
        self.slice.metadata.resource_version = Some(version.to_owned());
        self
    }

    /// `addressType`, any string (`FQDN`, or an invalid one).
    pub fn address_type(mut self, address_type: &str) -> Self {
        address_type.clone_into(&mut self.slice.address_type);
        self
    }

    /// A port; an empty `name` leaves it unnamed.
    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.slice
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: (!name.is_empty()).then(|| name.to_owned()),
                port: Some(port),
                protocol: Some(protocol.to_owned()),
                app_protocol: None,
            });
        self
    }

    /// One endpoint.
    pub fn endpoint(mut self, endpoint: EndpointBuilder) -> Self {
        self.slice
            .endpoints
            .get_or_insert_with(Vec::new)
            .push(endpoint.build());
        self
    }

    /// One endpoint per address, with no conditions (which means ready).
    pub fn addresses<'a>(self, addresses: impl IntoIterator<Item = &'a str>) -> Self {
        addresses.into_iter().fold(self, |slice, address| {
            slice.endpoint(EndpointBuilder::new(address))
        })
    }

    #[must_use]
    pub fn build(self) -> EndpointSlice {
        self.slice
    }
}

/// Builds one endpoint of a slice. Conditions left unset are absent, as the
/// API allows (kube-proxy reads an absent `ready` or `serving` as true).
#[derive(Clone, Debug)]
#[must_use]
pub struct EndpointBuilder {
    endpoint: Endpoint,
}

impl EndpointBuilder {
    /// An endpoint with one address.
    pub fn new(address: &str) -> Self {
        Self::with_addresses([address])
    }

    /// An endpoint with several addresses (of one pod).
    pub fn with_addresses<'a>(addresses: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            endpoint: Endpoint {
                addresses: strings(addresses),
                ..Endpoint::default()
            },
        }
    }

    fn conditions(&mut self) -> &mut EndpointConditions {
        self.endpoint
            .conditions
            .get_or_insert_with(EndpointConditions::default)
    }

    /// `conditions.ready`.
    pub fn ready(mut self, ready: bool) -> Self {
        self.conditions().ready = Some(ready);
        self
    }

    /// `conditions.serving`.
    pub fn serving(mut self, serving: bool) -> Self {
        self.conditions().serving = Some(serving);
        self
    }

    /// `conditions.terminating`.
    pub fn terminating(mut self, terminating: bool) -> Self {
        self.conditions().terminating = Some(terminating);
        self
    }

    /// All three conditions of a pod that is up: ready, serving, not
    /// terminating.
    pub fn up(self) -> Self {
        self.ready(true).serving(true).terminating(false)
    }

    /// A pod shutting down that still serves: not ready, serving,
    /// terminating.
    pub fn draining(self) -> Self {
        self.ready(false).serving(true).terminating(true)
    }

    /// `nodeName`.
    pub fn node(mut self, node_name: &str) -> Self {
        self.endpoint.node_name = Some(node_name.to_owned());
        self
    }

    /// `zone`.
    pub fn zone(mut self, zone: &str) -> Self {
        self.endpoint.zone = Some(zone.to_owned());
        self
    }

    /// `hints.forZones`.
    pub fn zone_hints<'a>(mut self, zones: impl IntoIterator<Item = &'a str>) -> Self {
        self.endpoint
            .hints
            .get_or_insert_with(EndpointHints::default)
            .for_zones = Some(
            zones
                .into_iter()
                .map(|zone| ForZone {
                    name: zone.to_owned(),
                })
                .collect(),
        );
        self
    }

    /// `hints.forNodes` (`trafficDistribution: PreferSameNode`).
    pub fn node_hints<'a>(mut self, nodes: impl IntoIterator<Item = &'a str>) -> Self {
        self.endpoint
            .hints
            .get_or_insert_with(EndpointHints::default)
            .for_nodes = Some(
            nodes
                .into_iter()
                .map(|node| ForNode {
                    name: node.to_owned(),
                })
                .collect(),
        );
        self
    }

    #[must_use]
    pub fn build(self) -> Endpoint {
        self.endpoint
    }
}

/// A node named `name` with these addresses, in `zone`.
///
/// # Panics
///
/// When an address is not an IP address.
#[must_use]
pub fn node_context<'a>(
    name: &str,
    addresses: impl IntoIterator<Item = &'a str>,
    zone: Option<&str>,
) -> NodeContext {
    NodeContext {
        name: name.to_owned(),
        addresses: addresses
            .into_iter()
            .map(|address| address.parse::<IpAddr>().expect("an IP address"))
            .collect(),
        zone: zone.map(str::to_owned),
        ..NodeContext::default()
    }
}

/// The objects as one multi-document YAML manifest, Services first, as
/// `kubectl apply -f` and the file source take them.
///
/// # Panics
///
/// Never for objects these builders make (they always serialize).
#[must_use]
pub fn manifest(services: &[Service], slices: &[EndpointSlice]) -> String {
    let documents = services
        .iter()
        .map(|service| serde_saphyr::to_string(service).expect("a Service serializes"))
        .chain(
            slices
                .iter()
                .map(|slice| serde_saphyr::to_string(slice).expect("a slice serializes")),
        );
    documents.collect::<Vec<_>>().join("---\n")
}

#[cfg(test)]
mod tests;
