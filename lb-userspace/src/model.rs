//! Kubernetes Service semantics: Services and `EndpointSlice`s in, the
//! frontends and backends the datapath serves out.
//!
//! A pure function, so every rule is unit tested without a cluster or root.
//! Bad objects never abort the build: each is reported as an [`ObjectError`]
//! and skipped, so one typo cannot take down the other Services.
//!
//! What it implements, as kube-proxy does:
//!
//! - Frontends: each `ClusterIP`; for `NodePort` and `LoadBalancer` Services
//!   each `nodePort` on every node address of the Service's families; for
//!   `LoadBalancer` each `status.loadBalancer.ingress[].ip` (VIP mode); each
//!   `spec.externalIPs` entry.
//! - Endpoints (kube-proxy's `CategorizeEndpoints`): the traffic policy
//!   (`internalTrafficPolicy` for `ClusterIP`s, `externalTrafficPolicy` for the
//!   rest) first, then zone hints, then ready endpoints, or, when none is
//!   ready, the serving and terminating ones (KEP-1669). Terminating endpoints
//!   that take no new flows are listed apart so that established flows drain.
//! - Session affinity, `loadBalancerSourceRanges` and `healthCheckNodePort`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Label that hands a Service to another proxy; kube-proxy skips those too.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the `EndpointSlice` controller sets to tie a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Namespace of an object that names none, as `kubectl apply` would place it.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Service annotation that turns on zone hints (`Auto`).
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// The deprecated name of [`TOPOLOGY_MODE_ANNOTATION`], still honoured.
pub const TOPOLOGY_AWARE_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not given (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The largest `timeoutSeconds` the API accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// What the model needs to know about the node the agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// Endpoints whose `nodeName` equals this are local. Empty: none is.
    pub name: String,
    /// Node addresses of both families; `NodePort` frontends listen on these.
    pub addresses: Vec<IpAddr>,
    /// Topology zone, matched against endpoint zone hints.
    pub zone: Option<String>,
}

/// Everything the datapath must serve, plus what was rejected on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub frontends: BTreeMap<Frontend, FrontendSpec>,
    /// Sorted by port.
    pub health_checks: Vec<HealthCheck>,
    /// Sorted and deduplicated, so that unchanged input logs the same lines.
    pub errors: Vec<ObjectError>,
}

/// A virtual address clients connect to: one address x one service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

/// Where a frontend's address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// `spec.clusterIPs` x `port`: in-cluster traffic.
    ClusterIp,
    /// A node address x `nodePort`.
    NodePort,
    /// `status.loadBalancer.ingress[].ip` x `port`.
    LoadBalancer,
    /// `spec.externalIPs` x `port`.
    ExternalIp,
}

impl FrontendKind {
    /// Whether traffic to it is governed by `externalTrafficPolicy` (and,
    /// for `LoadBalancer` Services, `loadBalancerSourceRanges`).
    #[must_use]
    pub fn is_external(self) -> bool {
        self != Self::ClusterIp
    }

    /// Spelling used by the Kubernetes API and `kubectl`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "ExternalIP",
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// L4 protocols the datapath balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number, as in the IP header.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    /// Spelling used by the Kubernetes API.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }

    /// Parses a Kubernetes `protocol` field, where absent means TCP.
    ///
    /// # Errors
    ///
    /// [`UnsupportedProtocol`] for anything but `TCP` and `UDP` (SCTP included).
    pub fn from_k8s(value: Option<&str>) -> Result<Self, UnsupportedProtocol> {
        value.map_or(Ok(Self::Tcp), str::parse)
    }
}

impl FromStr for Protocol {
    type Err = UnsupportedProtocol;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            other => Err(UnsupportedProtocol(other.to_owned())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A protocol string the datapath cannot serve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("protocol {0} is not supported (only TCP and UDP)")]
pub struct UnsupportedProtocol(pub String);

/// What a frontend serves and for whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServiceRef,
    pub kind: FrontendKind,
    /// Endpoints that take new flows, after readiness, traffic policy and
    /// topology. Sorted and deduplicated, so equal input gives equal slots.
    /// Empty: the datapath rejects new flows.
    pub backends: Vec<Backend>,
    /// Terminating endpoints not in `backends`: no new flows, but the
    /// established ones keep going until the endpoint leaves its slice.
    /// Sorted and deduplicated.
    pub terminating: Vec<Backend>,
    /// An external frontend (`NodePort`, `LoadBalancer`, `ExternalIP`) of a
    /// Service with `externalTrafficPolicy: Local`: only this node's
    /// endpoints, client source preserved.
    pub external_local: bool,
    /// A `ClusterIP` frontend of a Service with `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// 0: no session affinity; else the `ClientIP` affinity timeout.
    pub affinity_timeout_s: u32,
    /// Client prefixes allowed in, of this frontend's family, with host bits
    /// cleared; sorted. Empty: everyone. Only external frontends of
    /// `LoadBalancer` Services have any.
    pub source_ranges: Vec<(IpAddr, u8)>,
}

/// The Service port a frontend came from, for logs, metrics and the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// Empty for the single unnamed port a Service may have.
    pub port_name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// One endpoint address and the target port resolved for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// The endpoint's `nodeName` is this node's [`NodeContext::name`].
    pub node_local: bool,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.addr, self.port).fmt(f)
    }
}

/// A `healthCheckNodePort` to serve (Services with
/// `externalTrafficPolicy: Local`): 200 while `local_endpoints > 0`, else 503.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `port_name` is empty: the check is per Service.
    pub service: ServiceRef,
    pub port: u16,
    /// Distinct addresses of this node's ready, non-terminating endpoints
    /// over all ports and families (kube-proxy fails the check when only
    /// terminating endpoints are left, so load balancers drain the node).
    pub local_endpoints: usize,
}

/// An object (or part of one) that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectError {
    /// `"Service"`, `"EndpointSlice"` or `"File"`.
    pub kind: &'static str,
    /// Empty for files.
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl ObjectError {
    /// Names an object by its metadata, with the namespace defaulted.
    #[must_use]
    pub fn for_object(kind: &'static str, meta: &ObjectMeta, reason: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace_of(meta).to_owned(),
            name: meta.name.clone().unwrap_or_default(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.namespace.is_empty(), self.name.is_empty()) {
            (true, true) => write!(f, "{}: {}", self.kind, self.reason),
            (true, false) => write!(f, "{} {}: {}", self.kind, self.name, self.reason),
            (false, _) => write!(
                f,
                "{} {}/{}: {}",
                self.kind, self.namespace, self.name, self.reason
            ),
        }
    }
}

impl std::error::Error for ObjectError {}

const SERVICE: &str = "Service";
const ENDPOINT_SLICE: &str = "EndpointSlice";

/// Turns Services and `EndpointSlice`s into the desired frontends, as seen
/// from `node`.
///
/// The result depends only on the set of objects, not their order, except
/// that of two objects with the same namespace/name the first one wins. Of
/// two Services that claim one frontend (or health check port), the first by
/// namespace/name wins and the other is skipped whole.
#[must_use]
pub fn build(services: &[Service], slices: &[EndpointSlice], node: &NodeContext) -> Model {
    let mut errors = Vec::new();
    let endpoints = EndpointIndex::new(slices, &mut errors);
    let context = ServiceContext::new(node);

    let mut ordered: Vec<&Service> = services.iter().collect();
    // Stable, so that among duplicates the first given wins.
    ordered.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));

    let mut seen = BTreeSet::new();
    let mut frontends: BTreeMap<Frontend, FrontendSpec> = BTreeMap::new();
    let mut health_checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    for service in ordered {
        let meta = &service.metadata;
        let Some(name) = meta.name.as_deref() else {
            errors.push(ObjectError::for_object(
                SERVICE,
                meta,
                "missing metadata.name",
            ));
            continue;
        };
        let namespace = namespace_of(meta);
        if !seen.insert((namespace, name)) {
            errors.push(ObjectError::for_object(
                SERVICE,
                meta,
                "duplicate Service, the first one given is used",
            ));
            continue;
        }
        let slices: Vec<&SliceEndpoints> = endpoints.of(namespace, name).iter().collect();
        let output = service_output(service, &slices, &context);
        errors.extend(output.errors);
        if let Some(reason) = conflict(
            output.frontends.iter().map(|(frontend, _)| frontend),
            output.health_check.as_ref().map(|check| check.port),
            &frontends,
            &health_checks,
        ) {
            errors.push(ObjectError::for_object(SERVICE, meta, reason));
            continue;
        }
        frontends.extend(output.frontends);
        if let Some(check) = output.health_check {
            health_checks.insert(check.port, check);
        }
    }

    errors.sort();
    errors.dedup();
    Model {
        frontends,
        health_checks: health_checks.into_values().collect(),
        errors,
    }
}

/// What one Service asks for, before conflicts with other Services.
#[derive(Clone, Debug, Default)]
struct ServiceOutput {
    /// Each frontend once, in the Service's own order.
    frontends: Vec<(Frontend, FrontendSpec)>,
    health_check: Option<HealthCheck>,
    /// Its own problems: the whole Service, or parts of it, skipped.
    errors: Vec<ObjectError>,
}

/// The node facts every Service's frontends and endpoints depend on.
struct ServiceContext<'a> {
    node_name: &'a str,
    node_addrs: BTreeSet<IpAddr>,
    zone: Option<&'a str>,
}

impl<'a> ServiceContext<'a> {
    fn new(node: &'a NodeContext) -> Self {
        Self {
            node_name: &node.name,
            node_addrs: node.addresses.iter().copied().collect(),
            zone: node.zone.as_deref().filter(|zone| !zone.is_empty()),
        }
    }
}

/// One named Service with its slices (of its namespace, by the service-name
/// label) turned into frontends; independent of every other Service.
fn service_output(
    service: &Service,
    slices: &[&SliceEndpoints],
    context: &ServiceContext<'_>,
) -> ServiceOutput {
    let meta = &service.metadata;
    let namespace = namespace_of(meta);
    let name = meta.name.as_deref().unwrap_or_default();
    let mut output = ServiceOutput::default();
    let parsed = match parse_service(service, &mut output.errors) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return output,
        Err(reason) => {
            output
                .errors
                .push(ObjectError::for_object(SERVICE, meta, reason));
            return output;
        }
    };
    let mut selector = Selector {
        slices,
        parsed: &parsed,
        node_name: context.node_name,
        zone: context.zone,
        cache: HashMap::new(),
    };
    for PlannedFrontend {
        frontend,
        kind,
        port,
    } in parsed.frontends(&context.node_addrs)
    {
        let selection = selector.select(port, frontend.addr.is_ipv4(), kind);
        let spec = parsed.spec(
            ServiceRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port_name: parsed.ports[port].name.to_owned(),
            },
            frontend.addr,
            kind,
            selection,
        );
        output.frontends.push((frontend, spec));
    }
    output.health_check = parsed.health_check_port.map(|port| HealthCheck {
        service: ServiceRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port_name: String::new(),
        },
        port,
        local_endpoints: selector.local_ready_endpoints(),
    });
    output
}

/// Why a Service cannot have what it claims, if another one has it already.
fn conflict<'f>(
    mut planned: impl Iterator<Item = &'f Frontend>,
    health_check_port: Option<u16>,
    frontends: &BTreeMap<Frontend, FrontendSpec>,
    health_checks: &BTreeMap<u16, HealthCheck>,
) -> Option<String> {
    let frontend = planned.find_map(|planned| {
        let owner = frontends.get(planned)?;
        Some(format!(
            "frontend {planned} is already served by Service {}",
            owner.service
        ))
    });
    frontend.or_else(|| {
        let port = health_check_port?;
        let owner = health_checks.get(&port)?;
        Some(format!(
            "healthCheckNodePort {port} is already used by Service {}",
            owner.service
        ))
    })
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|namespace| !namespace.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

fn object_key(meta: &ObjectMeta) -> (&str, Option<&str>) {
    (namespace_of(meta), meta.name.as_deref())
}

fn is_ipv4(addr: IpAddr) -> bool {
    addr.is_ipv4()
}

fn family_name(ipv4: bool) -> &'static str {
    if ipv4 { "IPv4" } else { "IPv6" }
}

/// A Service port that passed validation.
#[derive(Clone, Copy)]
struct ServicePortSpec<'a> {
    /// Empty when unnamed; matched against the slice ports' names.
    name: &'a str,
    port: u16,
    proto: Protocol,
    /// For `NodePort` and `LoadBalancer` Services, when allocated and valid.
    node_port: Option<u16>,
}

/// `spec.type`, with `ExternalName` already skipped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// The IP families a Service serves.
#[derive(Clone, Copy, Default)]
struct Families {
    ipv4: bool,
    ipv6: bool,
}

impl Families {
    fn insert(&mut self, ipv4: bool) {
        if ipv4 {
            self.ipv4 = true;
        } else {
            self.ipv6 = true;
        }
    }

    fn contains(self, addr: IpAddr) -> bool {
        if is_ipv4(addr) { self.ipv4 } else { self.ipv6 }
    }

    fn iter(self) -> impl Iterator<Item = bool> {
        [(self.ipv4, true), (self.ipv6, false)]
            .into_iter()
            .filter_map(|(has, ipv4)| has.then_some(ipv4))
    }
}

/// `internalTrafficPolicy` and `externalTrafficPolicy`.
#[derive(Clone, Copy, Default)]
struct TrafficPolicies {
    internal_local: bool,
    external_local: bool,
}

/// How endpoints are picked, beyond the traffic policies.
#[derive(Clone, Copy, Default)]
struct EndpointRules {
    /// `publishNotReadyAddresses`: every endpoint counts as ready.
    publish_not_ready: bool,
    /// `trafficDistribution: PreferClose` or topology mode `Auto`.
    zone_hints: bool,
}

/// A Service that passed validation.
struct ParsedService<'a> {
    cluster_ips: Vec<IpAddr>,
    families: Families,
    ports: Vec<ServicePortSpec<'a>>,
    /// VIP-mode ingress IPs of the Service's families, for `LoadBalancer`s.
    load_balancer_ips: Vec<IpAddr>,
    /// `externalIPs` of the Service's families.
    external_ips: Vec<IpAddr>,
    policies: TrafficPolicies,
    rules: EndpointRules,
    affinity_timeout_s: u32,
    /// Sorted, host bits cleared; only for `LoadBalancer` Services.
    source_ranges: Vec<(IpAddr, u8)>,
    /// Only with `externalTrafficPolicy: Local`.
    health_check_port: Option<u16>,
}

/// One frontend a Service asks for; `port` indexes `ParsedService::ports`.
struct PlannedFrontend {
    frontend: Frontend,
    kind: FrontendKind,
    port: usize,
}

impl ParsedService<'_> {
    /// Every frontend of the Service, each once: where one address is two
    /// kinds (an ingress IP also listed in `externalIPs`), the first kind in
    /// `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalIP` order is kept.
    fn frontends(&self, node_addrs: &BTreeSet<IpAddr>) -> Vec<PlannedFrontend> {
        let mut planned = Vec::new();
        let mut seen = BTreeSet::new();
        let mut add = |addr: IpAddr, port: u16, index: usize, kind: FrontendKind| {
            let frontend = Frontend {
                addr,
                port,
                proto: self.ports[index].proto,
            };
            if seen.insert(frontend) {
                planned.push(PlannedFrontend {
                    frontend,
                    kind,
                    port: index,
                });
            }
        };
        for (index, port) in self.ports.iter().enumerate() {
            for &addr in &self.cluster_ips {
                add(addr, port.port, index, FrontendKind::ClusterIp);
            }
        }
        for (index, port) in self.ports.iter().enumerate() {
            let Some(node_port) = port.node_port else {
                continue;
            };
            for &addr in node_addrs {
                if self.families.contains(addr) {
                    add(addr, node_port, index, FrontendKind::NodePort);
                }
            }
        }
        for (kind, addrs) in [
            (FrontendKind::LoadBalancer, &self.load_balancer_ips),
            (FrontendKind::ExternalIp, &self.external_ips),
        ] {
            for (index, port) in self.ports.iter().enumerate() {
                for &addr in addrs {
                    add(addr, port.port, index, kind);
                }
            }
        }
        planned
    }

    fn spec(
        &self,
        service: ServiceRef,
        addr: IpAddr,
        kind: FrontendKind,
        selection: Selection,
    ) -> FrontendSpec {
        let source_ranges = if kind.is_external() {
            self.source_ranges
                .iter()
                .copied()
                .filter(|&(prefix, _)| is_ipv4(prefix) == is_ipv4(addr))
                .collect()
        } else {
            Vec::new()
        };
        FrontendSpec {
            service,
            kind,
            backends: selection.backends,
            terminating: selection.terminating,
            external_local: kind.is_external() && self.policies.external_local,
            internal_local: !kind.is_external() && self.policies.internal_local,
            affinity_timeout_s: self.affinity_timeout_s,
            source_ranges,
        }
    }
}

/// `Ok(None)`: not ours to serve, skipped silently. `Err`: the whole Service
/// is invalid. Problems with one part (a port, an address) go to `errors`
/// and skip only that part.
fn parse_service<'a>(
    service: &'a Service,
    errors: &mut Vec<ObjectError>,
) -> Result<Option<ParsedService<'a>>, String> {
    let meta = &service.metadata;
    if meta
        .labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        tracing::debug!(namespace = namespace_of(meta), name = ?meta.name, "skipping Service owned by another proxy");
        return Ok(None);
    }
    let Some(spec) = service.spec.as_ref() else {
        return Ok(None);
    };
    let type_ = match spec.type_.as_deref() {
        None | Some("" | "ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Ok(None),
        Some(other) => {
            return Err(format!(
                "type {other:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"
            ));
        }
    };
    let Some(cluster_ips) = cluster_ips(spec)? else {
        return Ok(None);
    };
    let families = families(spec, &cluster_ips)?;
    let ports = ports(service, type_, errors)?;
    let policies = TrafficPolicies {
        internal_local: is_local_policy(
            "internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        )?,
        external_local: is_local_policy(
            "externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        )?,
    };
    let rules = endpoint_rules(meta, spec);
    let affinity_timeout_s = affinity_timeout(spec)?;
    let source_ranges = if type_ == ServiceType::LoadBalancer {
        source_ranges(
            spec.load_balancer_source_ranges
                .as_deref()
                .unwrap_or_default(),
        )?
    } else {
        Vec::new()
    };
    let health_check_port = if policies.external_local {
        health_check_port(service, errors)
    } else {
        None
    };

    let load_balancer_ips = if type_ == ServiceType::LoadBalancer {
        external_addrs(
            service,
            families,
            "status.loadBalancer.ingress ip",
            load_balancer_ingress_ips(service),
            errors,
        )
    } else {
        Vec::new()
    };
    let external_ips = external_addrs(
        service,
        families,
        "externalIPs entry",
        spec.external_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .filter(|text| !text.is_empty()),
        errors,
    );

    Ok(Some(ParsedService {
        cluster_ips,
        families,
        ports,
        load_balancer_ips,
        external_ips,
        policies,
        rules,
        affinity_timeout_s,
        source_ranges,
        health_check_port,
    }))
}

/// Parses ingress or external IPs: sorted and deduplicated, of the
/// Service's families only.
fn external_addrs<'t>(
    service: &Service,
    families: Families,
    field: &str,
    texts: impl Iterator<Item = &'t str>,
    errors: &mut Vec<ObjectError>,
) -> Vec<IpAddr> {
    let meta = &service.metadata;
    let mut addrs = Vec::new();
    for text in texts {
        match text.parse::<IpAddr>() {
            Ok(addr) if families.contains(addr) => addrs.push(addr),
            // kube-proxy ignores these quietly too: each family's proxier
            // only knows the Services with a ClusterIP of its family.
            Ok(addr) => tracing::debug!(
                namespace = namespace_of(meta), name = ?meta.name, %addr,
                "ignoring {field} of a family the Service does not have"
            ),
            Err(_) => errors.push(ObjectError::for_object(
                SERVICE,
                meta,
                format!("{field} {text:?} is not an IP address; address skipped"),
            )),
        }
    }
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// The Service's `ClusterIP`s; `None` when headless or not allocated yet.
fn cluster_ips(spec: &ServiceSpec) -> Result<Option<Vec<IpAddr>>, String> {
    let texts: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    match texts.first() {
        None | Some(&("" | "None")) => return Ok(None),
        Some(_) => {}
    }
    let mut addrs = Vec::with_capacity(texts.len());
    for text in texts {
        let addr: IpAddr = text
            .parse()
            .map_err(|_| format!("clusterIP {text:?} is not an IP address"))?;
        if addrs
            .iter()
            .any(|&other: &IpAddr| is_ipv4(other) == is_ipv4(addr))
        {
            return Err(format!(
                "clusterIPs holds two addresses of the family of {addr}"
            ));
        }
        addrs.push(addr);
    }
    Ok(Some(addrs))
}

/// `spec.ipFamilies` when given, else the families of the `ClusterIP`s.
fn families(spec: &ServiceSpec, cluster_ips: &[IpAddr]) -> Result<Families, String> {
    let mut families = Families::default();
    match spec.ip_families.as_deref() {
        Some(names) if !names.is_empty() => {
            for name in names {
                match name.as_str() {
                    "IPv4" => families.insert(true),
                    "IPv6" => families.insert(false),
                    other => return Err(format!("ipFamilies entry {other:?} is not IPv4 or IPv6")),
                }
            }
        }
        _ => {
            for &addr in cluster_ips {
                families.insert(is_ipv4(addr));
            }
        }
    }
    Ok(families)
}

/// The usable ports. A bad number or a duplicate rejects the Service; an
/// unsupported protocol or a bad `nodePort` skips only that port or its
/// `NodePort` frontends.
fn ports<'a>(
    service: &'a Service,
    type_: ServiceType,
    errors: &mut Vec<ObjectError>,
) -> Result<Vec<ServicePortSpec<'a>>, String> {
    let meta = &service.metadata;
    let service_ports = service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.as_deref())
        .unwrap_or_default();
    let mut numbers_seen = BTreeSet::new();
    for port in service_ports {
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        let Some(number) = u16::try_from(port.port).ok().filter(|&number| number != 0) else {
            return Err(format!("port {} is outside 1..=65535", port.port));
        };
        if !numbers_seen.insert((number, protocol)) {
            return Err(format!("port {number}/{protocol} is listed twice"));
        }
    }

    let mut ports = Vec::with_capacity(service_ports.len());
    for port in service_ports {
        let name = port.name.as_deref().unwrap_or_default();
        let proto = match Protocol::from_k8s(port.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(unsupported) => {
                errors.push(ObjectError::for_object(
                    SERVICE,
                    meta,
                    format!(
                        "port {:?} ({}): {unsupported}; port skipped",
                        name, port.port
                    ),
                ));
                continue;
            }
        };
        let node_port = match (type_, port.node_port) {
            (ServiceType::ClusterIp, _) | (_, None) => None,
            (_, Some(number)) => {
                let valid = u16::try_from(number).ok().filter(|&number| number != 0);
                if valid.is_none() {
                    errors.push(ObjectError::for_object(
                        SERVICE,
                        meta,
                        format!(
                            "port {:?} ({}): nodePort {number} is outside 1..=65535; nodePort skipped",
                            name, port.port
                        ),
                    ));
                }
                valid
            }
        };
        ports.push(ServicePortSpec {
            name,
            // Checked above.
            port: u16::try_from(port.port).unwrap_or_default(),
            proto,
            node_port,
        });
    }
    Ok(ports)
}

/// `publishNotReadyAddresses`, and whether zone hints apply: with
/// `trafficDistribution: PreferClose` (or its newer name `PreferSameZone`),
/// or the topology mode annotation (or its deprecated name) set to `Auto`.
fn endpoint_rules(meta: &ObjectMeta, spec: &ServiceSpec) -> EndpointRules {
    let annotated_auto = |key: &str| {
        meta.annotations
            .as_ref()
            .and_then(|annotations| annotations.get(key))
            .is_some_and(|value| matches!(value.as_str(), "Auto" | "auto"))
    };
    EndpointRules {
        publish_not_ready: spec.publish_not_ready_addresses == Some(true),
        zone_hints: matches!(
            spec.traffic_distribution.as_deref(),
            Some("PreferClose" | "PreferSameZone")
        ) || annotated_auto(TOPOLOGY_MODE_ANNOTATION)
            || annotated_auto(TOPOLOGY_AWARE_HINTS_ANNOTATION),
    }
}

/// `true` for `Local`; absent means `Cluster`.
fn is_local_policy(field: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("" | "Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(format!("{field} {other:?} is not Cluster or Local")),
    }
}

/// 0 without affinity, else the `ClientIP` timeout in seconds.
fn affinity_timeout(spec: &ServiceSpec) -> Result<u32, String> {
    match spec.session_affinity.as_deref() {
        None | Some("" | "None") => Ok(0),
        Some("ClientIP") => {
            let configured = spec
                .session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds);
            match configured {
                None => Ok(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(seconds) => u32::try_from(seconds)
                    .ok()
                    .filter(|seconds| (1..=MAX_AFFINITY_TIMEOUT_S).contains(seconds))
                    .ok_or_else(|| {
                        format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is outside 1..={MAX_AFFINITY_TIMEOUT_S}"
                        )
                    }),
            }
        }
        Some(other) => Err(format!("sessionAffinity {other:?} is not None or ClientIP")),
    }
}

/// Parses `loadBalancerSourceRanges`: sorted, deduplicated, host bits cleared.
fn source_ranges(texts: &[String]) -> Result<Vec<(IpAddr, u8)>, String> {
    let mut ranges = texts
        .iter()
        .map(|text| {
            parse_cidr(text)
                .ok_or_else(|| format!("loadBalancerSourceRanges entry {text:?} is not a CIDR"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    ranges.sort_unstable();
    ranges.dedup();
    Ok(ranges)
}

/// `"203.0.113.0/24"`, `"2001:db8::/32"`, or a bare address (a host prefix).
/// Host bits are cleared, as kube-proxy's CIDR parsing does.
fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let text = text.trim();
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => {
            if len.is_empty() || !len.bytes().all(|byte| byte.is_ascii_digit()) {
                return None;
            }
            (addr.parse::<IpAddr>().ok()?, Some(len.parse::<u8>().ok()?))
        }
        None => (text.parse::<IpAddr>().ok()?, None),
    };
    match addr {
        IpAddr::V4(addr) => {
            let len = len.unwrap_or(32);
            if len > 32 {
                return None;
            }
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            Some((IpAddr::V4(Ipv4Addr::from(u32::from(addr) & mask)), len))
        }
        IpAddr::V6(addr) => {
            let len = len.unwrap_or(128);
            if len > 128 {
                return None;
            }
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            Some((IpAddr::V6(Ipv6Addr::from(u128::from(addr) & mask)), len))
        }
    }
}

/// `healthCheckNodePort`, if set and valid.
fn health_check_port(service: &Service, errors: &mut Vec<ObjectError>) -> Option<u16> {
    let number = service.spec.as_ref()?.health_check_node_port?;
    let port = u16::try_from(number).ok().filter(|&port| port != 0);
    if port.is_none() {
        errors.push(ObjectError::for_object(
            SERVICE,
            &service.metadata,
            format!("healthCheckNodePort {number} is outside 1..=65535; health check skipped"),
        ));
    }
    port
}

/// Ingress IPs the datapath must answer on: hostname-only entries have none,
/// and `ipMode: Proxy` ones are reached through the nodes, not on the VIP
/// (kube-proxy skips them as well).
fn load_balancer_ingress_ips(service: &Service) -> impl Iterator<Item = &str> {
    service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ingress| ingress.ip.as_deref())
        .filter(|ip| !ip.is_empty())
}

/// An endpoint's conditions, with Kubernetes' defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Conditions {
    /// Absent means ready.
    ready: bool,
    /// Absent means the same as `ready`.
    serving: bool,
    /// Absent means not terminating.
    terminating: bool,
}

/// One endpoint of a slice, by its first valid address.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EndpointInfo {
    addr: IpAddr,
    /// `nodeName`; compared with the node's name when selecting, so that a
    /// parsed slice does not depend on the node.
    node_name: Option<Box<str>>,
    conditions: Conditions,
    /// `hints.forZones` names; empty when there are no hints.
    zones: Vec<String>,
}

/// One `EndpointSlice`, validated once however many Service ports use it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SliceEndpoints {
    ipv4: bool,
    endpoints: Vec<EndpointInfo>,
    /// (name, protocol) -> target port.
    /// (name, protocol, target port), each (name, protocol) once: a slice
    /// has a few ports, so a list is both smaller and faster than a map.
    ports: Vec<(Box<str>, Protocol, u16)>,
}

/// Slices grouped by the Service they belong to: (namespace, service name).
struct EndpointIndex {
    by_service: HashMap<(String, String), Vec<SliceEndpoints>>,
}

impl EndpointIndex {
    fn new(slices: &[EndpointSlice], errors: &mut Vec<ObjectError>) -> Self {
        let mut ordered: Vec<&EndpointSlice> = slices.iter().collect();
        ordered.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));

        let mut seen = BTreeSet::new();
        let mut by_service: HashMap<(String, String), Vec<SliceEndpoints>> = HashMap::new();
        for slice in ordered {
            let meta = &slice.metadata;
            let Some(service) = slice_service(meta) else {
                continue;
            };
            let Some(name) = meta.name.as_deref() else {
                errors.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    meta,
                    "missing metadata.name",
                ));
                continue;
            };
            let namespace = namespace_of(meta);
            if !seen.insert((namespace, name)) {
                errors.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    meta,
                    "duplicate EndpointSlice, the first one given is used",
                ));
                continue;
            }
            if let Some(parsed) = parse_slice(slice, errors) {
                by_service
                    .entry((namespace.to_owned(), service.to_owned()))
                    .or_default()
                    .push(parsed);
            }
        }
        Self { by_service }
    }

    fn of(&self, namespace: &str, service: &str) -> &[SliceEndpoints] {
        self.by_service
            .get(&(namespace.to_owned(), service.to_owned()))
            .map_or(&[], Vec::as_slice)
    }
}

/// The Service a slice belongs to; none for slices not managed for a
/// Service (custom slices), which are none of ours.
fn slice_service(meta: &ObjectMeta) -> Option<&str> {
    meta.labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .map(String::as_str)
}

/// A named slice of a Service, validated; `None` when it has nothing to
/// serve (FQDN slices, or an unknown address type, reported).
fn parse_slice(slice: &EndpointSlice, errors: &mut Vec<ObjectError>) -> Option<SliceEndpoints> {
    let ipv4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => return None,
        other => {
            errors.push(ObjectError::for_object(
                ENDPOINT_SLICE,
                &slice.metadata,
                format!("addressType {other:?} is not IPv4, IPv6 or FQDN"),
            ));
            return None;
        }
    };
    Some(SliceEndpoints {
        ipv4,
        endpoints: endpoints(slice, ipv4, errors),
        ports: slice_ports(slice, errors),
    })
    .map(|mut parsed| {
        // Parsed slices are kept (`Incremental`): no spare capacity.
        parsed.endpoints.shrink_to_fit();
        parsed
    })
}

/// Validates every address, and keeps the first valid one of each endpoint:
/// an endpoint's addresses are one pod and fungible (kube-proxy uses only
/// the first), so taking all would weigh that pod more.
fn endpoints(
    slice: &EndpointSlice,
    ipv4: bool,
    errors: &mut Vec<ObjectError>,
) -> Vec<EndpointInfo> {
    let family = family_name(ipv4);
    let mut endpoints = Vec::new();
    for endpoint in slice.endpoints.as_deref().unwrap_or_default() {
        let mut first_valid = None;
        for text in &endpoint.addresses {
            match text.parse::<IpAddr>() {
                Ok(addr) if is_ipv4(addr) == ipv4 => {
                    first_valid.get_or_insert(addr);
                }
                Ok(addr) => errors.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    &slice.metadata,
                    format!("address {addr} is not {family} like the slice's addressType; address skipped"),
                )),
                Err(_) => errors.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    &slice.metadata,
                    format!("address {text:?} is not an IP address; address skipped"),
                )),
            }
        }
        let Some(addr) = first_valid else {
            continue;
        };
        let conditions = endpoint.conditions.as_ref();
        // Kubernetes: a nil `ready` means ready, a nil `serving` means the
        // same as `ready`, a nil `terminating` means not terminating.
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let conditions = Conditions {
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        };
        let zones = endpoint
            .hints
            .as_ref()
            .and_then(|hints| hints.for_zones.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|zone| zone.name.clone())
            .collect();
        endpoints.push(EndpointInfo {
            addr,
            node_name: endpoint.node_name.as_deref().map(Box::from),
            conditions,
            zones,
        });
    }
    endpoints
}

/// The slice's (name, protocol) -> port table. Ports without a number or of
/// another protocol (SCTP) cannot match a frontend and are left out.
fn slice_ports(
    slice: &EndpointSlice,
    errors: &mut Vec<ObjectError>,
) -> Vec<(Box<str>, Protocol, u16)> {
    let mut ports: Vec<(Box<str>, Protocol, u16)> = Vec::new();
    for EndpointPort {
        name,
        port,
        protocol,
        ..
    } in slice.ports.as_deref().unwrap_or_default()
    {
        let name = name.clone().unwrap_or_default();
        let (Some(number), Ok(proto)) = (port, Protocol::from_k8s(protocol.as_deref())) else {
            continue;
        };
        let Some(number) = u16::try_from(*number).ok().filter(|&number| number != 0) else {
            errors.push(ObjectError::for_object(
                ENDPOINT_SLICE,
                &slice.metadata,
                format!("port {name:?} number {number} is outside 1..=65535; port skipped"),
            ));
            continue;
        };
        if ports
            .iter()
            .any(|(known, known_proto, _)| **known == *name && *known_proto == proto)
        {
            errors.push(ObjectError::for_object(
                ENDPOINT_SLICE,
                &slice.metadata,
                format!("port {name:?}/{proto} is listed twice; the first is used"),
            ));
            continue;
        }
        ports.push((name.into_boxed_str(), proto, number));
    }
    ports.shrink_to_fit();
    ports
}

/// One endpoint as a candidate backend of one Service port.
#[derive(Clone, Copy)]
struct Candidate<'a> {
    backend: Backend,
    /// With `publishNotReadyAddresses` applied.
    conditions: Conditions,
    zones: &'a [String],
}

/// The endpoints of one frontend.
#[derive(Clone, Default)]
struct Selection {
    backends: Vec<Backend>,
    terminating: Vec<Backend>,
}

/// Picks the endpoints of one Service's frontends, each (port, family,
/// policy) once.
struct Selector<'a> {
    slices: &'a [&'a SliceEndpoints],
    parsed: &'a ParsedService<'a>,
    /// This node's name; empty: no endpoint is local.
    node_name: &'a str,
    /// This node's zone, if known.
    zone: Option<&'a str>,
    /// (port index, IPv4, local policy) -> selection.
    cache: HashMap<(usize, bool, bool), Selection>,
}

impl<'a> Selector<'a> {
    fn select(&mut self, port: usize, ipv4: bool, kind: FrontendKind) -> Selection {
        let policies = self.parsed.policies;
        let local = if kind.is_external() {
            policies.external_local
        } else {
            policies.internal_local
        };
        if let Some(selection) = self.cache.get(&(port, ipv4, local)) {
            return selection.clone();
        }
        // Zone hints only narrow the Cluster policy's endpoints.
        let zone = self.zone.filter(|_| !local && self.parsed.rules.zone_hints);
        let selection = select(&self.candidates(port, ipv4), local, zone);
        self.cache.insert((port, ipv4, local), selection.clone());
        selection
    }

    /// Every endpoint of the port's family, on the target port its own
    /// slice resolved for this port.
    fn candidates(&self, port: usize, ipv4: bool) -> Vec<Candidate<'a>> {
        let port = self.parsed.ports[port];
        let publish_not_ready = self.parsed.rules.publish_not_ready;
        self.slices
            .iter()
            .filter(|slice| slice.ipv4 == ipv4)
            .filter_map(|slice| {
                let target = slice
                    .ports
                    .iter()
                    .find(|(name, proto, _)| **name == *port.name && *proto == port.proto)
                    .map(|(_, _, target)| *target)?;
                let node_name = self.node_name;
                Some(slice.endpoints.iter().map(move |endpoint| Candidate {
                    backend: Backend {
                        addr: endpoint.addr,
                        port: target,
                        node_local: !node_name.is_empty()
                            && endpoint.node_name.as_deref() == Some(node_name),
                    },
                    conditions: Conditions {
                        ready: endpoint.conditions.ready || publish_not_ready,
                        ..endpoint.conditions
                    },
                    zones: &endpoint.zones,
                }))
            })
            .flatten()
            .collect()
    }

    /// Distinct addresses of this node's ready, non-terminating endpoints,
    /// over every port and family of the Service.
    fn local_ready_endpoints(&self) -> usize {
        let mut addrs = BTreeSet::new();
        for port in 0..self.parsed.ports.len() {
            for ipv4 in self.parsed.families.iter() {
                addrs.extend(
                    self.candidates(port, ipv4)
                        .iter()
                        .filter(|candidate| {
                            candidate.backend.node_local
                                && candidate.conditions.ready
                                && !candidate.conditions.terminating
                        })
                        .map(|candidate| candidate.backend.addr),
                );
            }
        }
        addrs.len()
    }
}

/// kube-proxy's `CategorizeEndpoints` for one frontend: the policy's
/// endpoints (all, or this node's), narrowed to this zone's by hints when
/// `zone` is given and every ready endpoint has hints and one names the zone;
/// of those the ready ones, or when none is ready (anywhere in the policy's
/// set) the serving and terminating ones.
fn select(candidates: &[Candidate<'_>], local: bool, zone: Option<&str>) -> Selection {
    let pool: Vec<&Candidate<'_>> = candidates
        .iter()
        .filter(|candidate| !local || candidate.backend.node_local)
        .collect();
    let ready: Vec<&Candidate<'_>> = pool
        .iter()
        .copied()
        .filter(|candidate| candidate.conditions.ready)
        .collect();
    let close: Vec<&Candidate<'_>> = match zone {
        Some(zone)
            if !ready.is_empty() && ready.iter().all(|candidate| !candidate.zones.is_empty()) =>
        {
            ready
                .iter()
                .copied()
                .filter(|candidate| candidate.zones.iter().any(|hint| hint == zone))
                .collect()
        }
        _ => Vec::new(),
    };
    let chosen = if !close.is_empty() {
        close
    } else if !ready.is_empty() {
        ready
    } else {
        pool.iter()
            .copied()
            .filter(|candidate| candidate.conditions.serving && candidate.conditions.terminating)
            .collect()
    };
    let backends = sorted_unique(chosen.iter().map(|candidate| candidate.backend));
    let in_backends = |backend: &Backend| {
        backends
            .binary_search_by(|other| (other.addr, other.port).cmp(&(backend.addr, backend.port)))
            .is_ok()
    };
    let terminating = sorted_unique(
        pool.iter()
            .filter(|candidate| candidate.conditions.terminating)
            .map(|candidate| candidate.backend)
            .filter(|backend| !in_backends(backend)),
    );
    Selection {
        backends,
        terminating,
    }
}

/// Sorted, one per address and port (one endpoint listed by two slices,
/// during a slice migration, counts once).
fn sorted_unique(backends: impl Iterator<Item = Backend>) -> Vec<Backend> {
    let mut backends: Vec<Backend> = backends.collect();
    backends.sort_unstable();
    backends.dedup_by(|a, b| a.addr == b.addr && a.port == b.port);
    backends
}

/// An object's identity: namespace (defaulted) and name (empty if missing).
pub type ObjectKey = (String, String);

/// The identity of a Service or `EndpointSlice`, as the model keys it.
#[must_use]
pub fn key_of(meta: &ObjectMeta) -> ObjectKey {
    (
        namespace_of(meta).to_owned(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One stored Service and what it asked for when last computed.
struct ServiceEntry {
    /// `None`: removed, to be forgotten at the next commit.
    service: Option<Service>,
    /// Frontends it claims (served, or refused by a conflict).
    claims: Vec<Frontend>,
    health_check_port: Option<u16>,
    /// Its own errors, a conflict with another Service included.
    errors: Vec<ObjectError>,
}

/// One stored `EndpointSlice`, reduced to what the model uses.
struct SliceEntry {
    /// `metadata.resourceVersion` (API objects): the same version is the
    /// same object, so a snapshot need not parse it again.
    resource_version: Option<String>,
    /// The Service it belongs to (service-name label); `None`: not ours.
    service: Option<String>,
    parsed: Option<SliceEndpoints>,
    errors: Vec<ObjectError>,
}

/// The frontends whose spec changed in one [`Incremental::commit`], with
/// the spec each had before (`None`: it is new).
pub type FrontendChanges = BTreeMap<Frontend, Option<FrontendSpec>>;

/// [`build`] kept up to date object by object: a change recomputes only the
/// Services it touches (the Service itself, or the Service its slice names),
/// so that one endpoint change costs O(that Service), not O(all Services).
///
/// It gives the same frontends, health checks and errors as [`build`] over
/// the same objects. Where a change involves two Services claiming one
/// frontend or health check port (whose outcome depends on the order of
/// all Services), or the node changes, it recomputes everything.
///
/// Slices are kept only in their parsed, compact form.
pub struct Incremental {
    node: NodeContext,
    services: BTreeMap<ObjectKey, ServiceEntry>,
    slices: HashMap<ObjectKey, SliceEntry>,
    /// (namespace, service name) -> names of its slices, in name order.
    slices_of: HashMap<ObjectKey, BTreeSet<String>>,
    /// How many Services claim each frontend / health check port.
    frontend_claims: HashMap<Frontend, u32>,
    port_claims: HashMap<u16, u32>,
    frontends: BTreeMap<Frontend, FrontendSpec>,
    health_checks: BTreeMap<u16, HealthCheck>,
    /// Every current error with the number of objects reporting it.
    errors: BTreeMap<ObjectError, u32>,
    /// Duplicates found by the last [`Incremental::reset`].
    duplicates: Vec<ObjectError>,
    /// Services to recompute at the next commit.
    dirty: BTreeSet<ObjectKey>,
    /// Everything is recomputed at the next commit.
    all_dirty: bool,
    /// Objects come from the API server, where an unchanged
    /// `metadata.resourceVersion` means an unchanged object; a slice whose
    /// version did not change is then not parsed again. Off for files,
    /// which may be edited by hand without touching the version.
    trust_resource_versions: bool,
}

impl Incremental {
    /// An empty model for `node`.
    #[must_use]
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            services: BTreeMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            frontend_claims: HashMap::new(),
            port_claims: HashMap::new(),
            frontends: BTreeMap::new(),
            health_checks: BTreeMap::new(),
            errors: BTreeMap::new(),
            duplicates: Vec::new(),
            dirty: BTreeSet::new(),
            all_dirty: false,
            trust_resource_versions: false,
        }
    }

    /// See `trust_resource_versions`: on for the API server's objects.
    pub fn set_trust_resource_versions(&mut self, trust: bool) {
        self.trust_resource_versions = trust;
    }

    /// Replaces every object, as [`build`] takes them (of two with the same
    /// namespace/name the first given wins). Objects equal to the stored
    /// ones change nothing, so that the commit recomputes only what differs.
    pub fn reset(&mut self, services: &[Service], slices: &[EndpointSlice]) {
        self.duplicates.clear();
        let mut present = BTreeSet::new();
        for service in services {
            let key = key_of(&service.metadata);
            if !present.insert(key.clone()) && service.metadata.name.is_some() {
                self.duplicates.push(ObjectError::for_object(
                    SERVICE,
                    &service.metadata,
                    "duplicate Service, the first one given is used",
                ));
                continue;
            }
            let stored = self
                .services
                .get(&key)
                .and_then(|entry| entry.service.as_ref());
            if stored != Some(service) {
                self.upsert_service(service.clone());
            }
        }
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .filter(|key| !present.contains(*key))
            .cloned()
            .collect();
        for key in &gone {
            self.remove_service(key);
        }
        let mut present = HashSet::new();
        for slice in slices {
            // Slices of no Service are none of ours (and no duplicates).
            if slice_service(&slice.metadata).is_none() {
                continue;
            }
            let key = key_of(&slice.metadata);
            if !present.insert(key) && slice.metadata.name.is_some() {
                self.duplicates.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    &slice.metadata,
                    "duplicate EndpointSlice, the first one given is used",
                ));
                continue;
            }
            self.upsert_slice(slice);
        }
        let gone: Vec<ObjectKey> = self
            .slices
            .keys()
            .filter(|key| !present.contains(*key))
            .cloned()
            .collect();
        for key in &gone {
            self.remove_slice(key);
        }
    }

    /// Sets the node; a different node recomputes everything.
    pub fn set_node(&mut self, node: &NodeContext) {
        if *node != self.node {
            self.node = node.clone();
            self.all_dirty = true;
        }
    }

    /// Adds or replaces a Service.
    pub fn upsert_service(&mut self, service: Service) {
        let key = key_of(&service.metadata);
        if let Some(entry) = self.services.get_mut(&key) {
            if entry.service.as_ref() == Some(&service) {
                return;
            }
            entry.service = Some(service);
        } else {
            self.services.insert(
                key.clone(),
                ServiceEntry {
                    service: Some(service),
                    claims: Vec::new(),
                    health_check_port: None,
                    errors: Vec::new(),
                },
            );
        }
        self.dirty.insert(key);
    }

    /// Removes a Service, if present.
    pub fn remove_service(&mut self, key: &ObjectKey) {
        if let Some(entry) = self.services.get_mut(key) {
            entry.service = None;
            self.dirty.insert(key.clone());
        }
    }

    /// Adds or replaces an `EndpointSlice`.
    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let key = key_of(&slice.metadata);
        let resource_version = slice.metadata.resource_version.clone();
        if self.trust_resource_versions
            && resource_version.is_some()
            && self
                .slices
                .get(&key)
                .is_some_and(|old| old.resource_version == resource_version)
        {
            return;
        }
        let service = slice_service(&slice.metadata).map(str::to_owned);
        let mut errors = Vec::new();
        let parsed = match &service {
            None => None,
            Some(_) if slice.metadata.name.is_none() => {
                errors.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    &slice.metadata,
                    "missing metadata.name",
                ));
                None
            }
            Some(_) => parse_slice(slice, &mut errors),
        };
        let entry = SliceEntry {
            resource_version,
            service,
            parsed,
            errors,
        };
        if let Some(old) = self.slices.get_mut(&key)
            && old.service == entry.service
            && old.parsed == entry.parsed
            && old.errors == entry.errors
        {
            old.resource_version = entry.resource_version;
            return;
        }
        self.remove_slice(&key);
        for error in &entry.errors {
            *self.errors.entry(error.clone()).or_default() += 1;
        }
        if let Some(service) = &entry.service {
            let owner = (key.0.clone(), service.clone());
            self.slices_of
                .entry(owner.clone())
                .or_default()
                .insert(key.1.clone());
            self.dirty.insert(owner);
        }
        self.slices.insert(key, entry);
    }

    /// Removes an `EndpointSlice`, if present.
    pub fn remove_slice(&mut self, key: &ObjectKey) {
        let Some(entry) = self.slices.remove(key) else {
            return;
        };
        for error in &entry.errors {
            self.forget_error(error);
        }
        if let Some(service) = entry.service {
            let owner = (key.0.clone(), service);
            if let Some(names) = self.slices_of.get_mut(&owner) {
                names.remove(&key.1);
                if names.is_empty() {
                    self.slices_of.remove(&owner);
                }
            }
            self.dirty.insert(owner);
        }
    }

    fn forget_error(&mut self, error: &ObjectError) {
        if let Some(count) = self.errors.get_mut(error) {
            *count -= 1;
            if *count == 0 {
                self.errors.remove(error);
            }
        }
    }

    /// Recomputes what changed since the last commit; returns the frontends
    /// whose spec changed, with their previous spec.
    pub fn commit(&mut self) -> FrontendChanges {
        if !self.all_dirty {
            let dirty = std::mem::take(&mut self.dirty);
            let mut changes = FrontendChanges::new();
            let mut contested = false;
            for key in &dirty {
                if !self.recompute(key, &mut changes) {
                    contested = true;
                    break;
                }
            }
            if !contested {
                return changes;
            }
            // Services done so far stay done; the full pass recomputes all
            // of them, measured against the frontends before this commit.
            let before = Self::restore(std::mem::take(&mut self.frontends), changes);
            return self.recompute_all(&before);
        }
        let before = std::mem::take(&mut self.frontends);
        self.recompute_all(&before)
    }

    /// The frontends as they were, from the current ones and the changes.
    fn restore(
        mut frontends: BTreeMap<Frontend, FrontendSpec>,
        changes: FrontendChanges,
    ) -> BTreeMap<Frontend, FrontendSpec> {
        for (frontend, old) in changes {
            match old {
                Some(spec) => frontends.insert(frontend, spec),
                None => frontends.remove(&frontend),
            };
        }
        frontends
    }

    /// Recomputes one uncontested Service in place; false when it shares a
    /// frontend or health check port with another Service (before or after),
    /// where only a full pass in namespace/name order decides.
    fn recompute(&mut self, key: &ObjectKey, changes: &mut FrontendChanges) -> bool {
        let output = self
            .services
            .get(key)
            .and_then(|entry| self.output_of(entry));
        let (old_claims, old_port) = self
            .services
            .get(key)
            .map(|entry| (entry.claims.clone(), entry.health_check_port))
            .unwrap_or_default();
        let new_claims: Vec<Frontend> = output
            .iter()
            .flat_map(|output| output.frontends.iter().map(|(frontend, _)| *frontend))
            .collect();
        let new_port = output
            .as_ref()
            .and_then(|output| output.health_check.as_ref().map(|check| check.port));
        let others = |claims: &HashMap<Frontend, u32>, frontend: &Frontend, mine: &[Frontend]| {
            claims.get(frontend).copied().unwrap_or(0) > u32::from(mine.contains(frontend))
        };
        let ports_contested = [old_port, new_port].into_iter().flatten().any(|port| {
            self.port_claims.get(&port).copied().unwrap_or(0) > u32::from(old_port == Some(port))
        });
        if ports_contested
            || old_claims
                .iter()
                .chain(&new_claims)
                .any(|frontend| others(&self.frontend_claims, frontend, &old_claims))
        {
            return false;
        }

        for frontend in &old_claims {
            let old = self.frontends.remove(frontend);
            changes.entry(*frontend).or_insert(old);
        }
        if let Some(port) = old_port {
            self.health_checks.remove(&port);
        }
        self.unclaim(key);
        let Some(output) = output else {
            self.services.remove(key);
            Self::settle(changes, &self.frontends, &old_claims);
            return true;
        };
        for error in &output.errors {
            *self.errors.entry(error.clone()).or_default() += 1;
        }
        for frontend in &new_claims {
            *self.frontend_claims.entry(*frontend).or_default() += 1;
        }
        if let Some(port) = new_port {
            *self.port_claims.entry(port).or_default() += 1;
        }
        for (frontend, spec) in output.frontends {
            let old = self.frontends.insert(frontend, spec);
            changes.entry(frontend).or_insert(old);
        }
        if let Some(check) = output.health_check {
            self.health_checks.insert(check.port, check);
        }
        if let Some(entry) = self.services.get_mut(key) {
            entry.claims = new_claims;
            entry.health_check_port = new_port;
            entry.errors = output.errors;
        }
        Self::settle(changes, &self.frontends, &old_claims);
        if let Some(entry) = self.services.get(key) {
            Self::settle(changes, &self.frontends, &entry.claims);
        }
        true
    }

    /// Drops changes of `touched` that turned out to be none (same spec as
    /// before).
    fn settle(
        changes: &mut FrontendChanges,
        frontends: &BTreeMap<Frontend, FrontendSpec>,
        touched: &[Frontend],
    ) {
        for frontend in touched {
            if changes
                .get(frontend)
                .is_some_and(|old| frontends.get(frontend) == old.as_ref())
            {
                changes.remove(frontend);
            }
        }
    }

    /// Forgets what a Service claimed and reported.
    fn unclaim(&mut self, key: &ObjectKey) {
        let Some(entry) = self.services.get_mut(key) else {
            return;
        };
        let claims = std::mem::take(&mut entry.claims);
        let port = entry.health_check_port.take();
        let errors = std::mem::take(&mut entry.errors);
        for frontend in claims {
            if let Some(count) = self.frontend_claims.get_mut(&frontend) {
                *count -= 1;
                if *count == 0 {
                    self.frontend_claims.remove(&frontend);
                }
            }
        }
        if let Some(port) = port
            && let Some(count) = self.port_claims.get_mut(&port)
        {
            *count -= 1;
            if *count == 0 {
                self.port_claims.remove(&port);
            }
        }
        for error in &errors {
            self.forget_error(error);
        }
    }

    /// `None` for a removed Service.
    fn output_of(&self, entry: &ServiceEntry) -> Option<ServiceOutput> {
        let service = entry.service.as_ref()?;
        let meta = &service.metadata;
        if meta.name.is_none() {
            return Some(ServiceOutput {
                errors: vec![ObjectError::for_object(
                    SERVICE,
                    meta,
                    "missing metadata.name",
                )],
                ..ServiceOutput::default()
            });
        }
        let owner = key_of(meta);
        let slices: Vec<&SliceEndpoints> = self
            .slices_of
            .get(&owner)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                self.slices
                    .get(&(owner.0.clone(), name.clone()))?
                    .parsed
                    .as_ref()
            })
            .collect();
        Some(service_output(
            service,
            &slices,
            &ServiceContext::new(&self.node),
        ))
    }

    /// Every Service in namespace/name order, as [`build`] does; the
    /// changes are measured against `before`.
    fn recompute_all(&mut self, before: &BTreeMap<Frontend, FrontendSpec>) -> FrontendChanges {
        self.all_dirty = false;
        self.dirty.clear();
        let keys: Vec<ObjectKey> = self.services.keys().cloned().collect();
        for key in &keys {
            self.unclaim(key);
        }
        self.services.retain(|_, entry| entry.service.is_some());
        self.frontends.clear();
        self.health_checks.clear();
        for key in &keys {
            let Some(entry) = self.services.get(key) else {
                continue;
            };
            let (Some(service), Some(mut output)) = (&entry.service, self.output_of(entry)) else {
                continue;
            };
            let meta = &service.metadata;
            let claims: Vec<Frontend> = output.frontends.iter().map(|(f, _)| *f).collect();
            let port = output.health_check.as_ref().map(|check| check.port);
            let accepted = match conflict(claims.iter(), port, &self.frontends, &self.health_checks)
            {
                Some(reason) => {
                    output
                        .errors
                        .push(ObjectError::for_object(SERVICE, meta, reason));
                    false
                }
                None => true,
            };
            for error in &output.errors {
                *self.errors.entry(error.clone()).or_default() += 1;
            }
            for frontend in &claims {
                *self.frontend_claims.entry(*frontend).or_default() += 1;
            }
            if let Some(port) = port {
                *self.port_claims.entry(port).or_default() += 1;
            }
            if accepted {
                self.frontends.extend(output.frontends);
                if let Some(check) = output.health_check {
                    self.health_checks.insert(check.port, check);
                }
            }
            if let Some(entry) = self.services.get_mut(key) {
                entry.claims = claims;
                entry.health_check_port = port;
                entry.errors = output.errors;
            }
        }
        let mut changes = FrontendChanges::new();
        for (frontend, spec) in before {
            if self.frontends.get(frontend) != Some(spec) {
                changes.insert(*frontend, Some(spec.clone()));
            }
        }
        for frontend in self.frontends.keys() {
            if !before.contains_key(frontend) {
                changes.insert(*frontend, None);
            }
        }
        changes
    }

    /// The desired frontends.
    #[must_use]
    pub fn frontends(&self) -> &BTreeMap<Frontend, FrontendSpec> {
        &self.frontends
    }

    /// Health checks to serve, sorted by port.
    #[must_use]
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        self.health_checks.values().cloned().collect()
    }

    /// Current errors, sorted and deduplicated as [`build`] gives them.
    #[must_use]
    pub fn errors(&self) -> Vec<ObjectError> {
        let mut errors: Vec<ObjectError> = self
            .errors
            .keys()
            .chain(&self.duplicates)
            .cloned()
            .collect();
        errors.sort();
        errors.dedup();
        errors
    }

    /// The whole model, as [`build`] returns it.
    #[must_use]
    pub fn model(&self) -> Model {
        Model {
            frontends: self.frontends.clone(),
            health_checks: self.health_checks(),
            errors: self.errors(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// Parses multi-document YAML manifests the way `kubectl apply` takes them.
    fn objects(manifests: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for document in serde_yaml::Deserializer::from_str(manifests) {
            let value = serde_yaml::Value::deserialize(document).expect("valid YAML");
            match value["kind"].as_str() {
                Some("Service") => {
                    services.push(serde_yaml::from_value(value).expect("valid Service"));
                }
                Some("EndpointSlice") => {
                    slices.push(serde_yaml::from_value(value).expect("valid EndpointSlice"));
                }
                other => panic!("unexpected kind {other:?}"),
            }
        }
        (services, slices)
    }

    fn build_yaml(manifests: &str) -> Model {
        build_on(manifests, &NodeContext::default())
    }

    fn build_on(manifests: &str, node: &NodeContext) -> Model {
        let (services, slices) = objects(manifests);
        build(&services, &slices, node)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// The node of most tests: dual-stack, in zone-a.
    fn node_a() -> NodeContext {
        NodeContext {
            name: "node-a".into(),
            addresses: vec![ip("192.168.1.10"), ip("2001:db8:1::10")],
            zone: Some("zone-a".into()),
        }
    }

    fn be(addr: &str, port: u16, node_local: bool) -> Backend {
        Backend {
            addr: ip(addr),
            port,
            node_local,
        }
    }

    fn spec_of<'m>(model: &'m Model, addr: &str, port: u16, proto: Protocol) -> &'m FrontendSpec {
        model
            .frontends
            .get(&frontend(addr, port, proto))
            .unwrap_or_else(|| panic!("no frontend {addr}:{port}/{proto}: {model:#?}"))
    }

    /// "frontend kind" lines, in frontend order.
    fn frontend_kinds(model: &Model) -> Vec<String> {
        model
            .frontends
            .iter()
            .map(|(frontend, spec)| format!("{frontend} {}", spec.kind))
            .collect()
    }

    fn frontend(addr: &str, port: u16, proto: Protocol) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            proto,
        }
    }

    fn backends(list: &[(&str, u16)]) -> Vec<Backend> {
        list.iter()
            .map(|&(addr, port)| Backend {
                addr: addr.parse().unwrap(),
                port,
                node_local: false,
            })
            .collect()
    }

    fn backends_of(model: &Model, addr: &str, port: u16, proto: Protocol) -> Vec<Backend> {
        model
            .frontends
            .get(&frontend(addr, port, proto))
            .unwrap_or_else(|| panic!("no frontend {addr}:{port}/{proto}: {model:#?}"))
            .backends
            .clone()
    }

    fn error_lines(model: &Model) -> Vec<String> {
        model.errors.iter().map(ToString::to_string).collect()
    }

    const WEB_V4: &str = r"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  selector: {app: web}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels:
    kubernetes.io/service-name: web
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-a
- addresses: [10.244.2.7]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-b
";

    #[test]
    fn single_stack_ipv4() {
        let model = build_yaml(WEB_V4);
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
        let model = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: fd00:10:96::a
  clusterIPs: [fd00:10:96::a]
  ipFamilies: [IPv6]
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-x7k2p
  namespace: kube-system
  labels: {kubernetes.io/service-name: dns}
addressType: IPv6
ports:
- {name: dns, port: 53, protocol: UDP}
endpoints:
- addresses: ["fd00:10:244:1::3"]
  conditions: {ready: true}
"#,
        );
        assert_eq!(model.errors, []);
        assert_eq!(
            backends_of(&model, "fd00:10:96::a", 53, Protocol::Udp),
            backends(&[("fd00:10:244:1::3", 53)])
        );
    }

    #[test]
    fn dual_stack_takes_each_family_from_its_own_slices() {
        let model = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: prod}
spec:
  clusterIP: 10.96.5.5
  clusterIPs: [10.96.5.5, "fd00:10:96::5"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {port: 443, targetPort: 8443}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-v4
  namespace: prod
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
ports: [{name: "", port: 8443, protocol: TCP}]
endpoints:
- addresses: [10.244.0.9]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-v6
  namespace: prod
  labels: {kubernetes.io/service-name: api}
addressType: IPv6
ports: [{name: "", port: 8443, protocol: TCP}]
endpoints:
- addresses: ["fd00:10:244::9"]
"#,
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
    fn cluster_ip_alone_is_used_when_cluster_ips_is_absent() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: old, namespace: default}
spec:
  clusterIP: 10.96.7.7
  ports: [{port: 80}]
",
        );
        assert_eq!(model.errors, []);
        assert!(
            model
                .frontends
                .contains_key(&frontend("10.96.7.7", 80, Protocol::Tcp))
        );
    }

    #[test]
    fn named_target_port_resolves_per_slice() {
        // Two pod templates name "http" differently: the controller writes
        // each number into its own slice.
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 9090, targetPort: metrics}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-old
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: metrics, port: 9100, protocol: TCP}
endpoints:
- addresses: [10.244.1.1]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-new
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8081, protocol: TCP}
endpoints:
- addresses: [10.244.1.2]
",
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
            "metrics"
        );
    }

    #[test]
    fn same_port_number_over_tcp_and_udp() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-q8m4z
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
ports:
- {name: dns-tcp, port: 53, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.0.2]
",
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
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: syslog, namespace: ops}
spec:
  clusterIP: 10.96.1.1
  ports: [{port: 514, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: syslog-1
  namespace: ops
  labels: {kubernetes.io/service-name: syslog}
addressType: IPv4
ports: [{port: 514, protocol: TCP}]
endpoints: [{addresses: [10.244.3.3]}]
",
        );
        assert_eq!(model.errors, []);
        assert_eq!(backends_of(&model, "10.96.1.1", 514, Protocol::Udp), []);
    }

    #[test]
    fn not_ready_endpoints_are_excluded_and_absent_ready_means_ready() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.1.1]
  conditions: {ready: true}
- addresses: [10.244.1.2]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.1.3]
  conditions: {ready: false}
- addresses: [10.244.1.4]
  conditions: {serving: true}
- addresses: [10.244.1.5]
",
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
    fn service_without_endpoints_still_has_its_frontend() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: default}
spec:
  clusterIP: 10.96.9.9
  ports: [{port: 80}]
",
        );
        assert_eq!(model.errors, []);
        assert_eq!(backends_of(&model, "10.96.9.9", 80, Protocol::Tcp), []);
    }

    #[test]
    fn fqdn_slices_are_ignored() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-fqdn
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: FQDN
ports: [{port: 80}]
endpoints: [{addresses: [backend.example.com]}]
",
        );
        assert_eq!(model.errors, []);
        assert_eq!(backends_of(&model, "10.96.0.10", 80, Protocol::Tcp), []);
    }

    #[test]
    fn headless_external_name_and_other_proxies_are_skipped_silently() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  clusterIPs: [None]
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec:
  type: ExternalName
  externalName: db.example.com
---
apiVersion: v1
kind: Service
metadata:
  name: mesh
  namespace: shop
  labels: {service.kubernetes.io/service-proxy-name: other-proxy}
spec:
  clusterIP: 10.96.3.3
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: pending, namespace: shop}
spec:
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: nospec, namespace: shop}
",
        );
        assert_eq!(model, Model::default());
    }

    #[test]
    fn invalid_cluster_ip_rejects_the_service() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: shop}
spec:
  clusterIP: 10.96.0.300
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: good, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  ports: [{port: 80}]
",
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
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: twice, namespace: shop}
spec:
  clusterIPs: [10.96.0.1, 10.96.0.2]
  ports: [{port: 80}]
",
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
        for port in ["0", "65536", "-1"] {
            let model = build_yaml(&format!(
                r"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: ok, port: 80}}, {{name: bad, port: {port}}}]
"
            ));
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
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: a, port: 80}
  - {name: b, port: 80, protocol: TCP}
",
        );
        assert!(model.frontends.is_empty());
        assert_eq!(
            error_lines(&model),
            ["Service shop/web: port 80/TCP is listed twice"]
        );
    }

    #[test]
    fn sctp_port_is_reported_and_only_that_port_skipped() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: sig, namespace: telco}
spec:
  clusterIP: 10.96.4.4
  ports:
  - {name: sctp, port: 3868, protocol: SCTP}
  - {name: tcp, port: 3868, protocol: TCP}
",
        );
        assert_eq!(
            error_lines(&model),
            [
                r#"Service telco/sig: port "sctp" (3868): protocol SCTP is not supported (only TCP and UDP); port skipped"#
            ]
        );
        assert_eq!(
            model.frontends.keys().copied().collect::<Vec<_>>(),
            [frontend("10.96.4.4", 3868, Protocol::Tcp)]
        );
    }

    #[test]
    fn missing_name_is_reported() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
",
        );
        assert!(model.frontends.is_empty());
        assert_eq!(
            error_lines(&model),
            ["Service shop/: missing metadata.name"]
        );
    }

    #[test]
    fn wrong_family_and_unparsable_endpoint_addresses_are_skipped_alone() {
        let model = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: ["fd00::1"]
- addresses: [10.244.1.999]
- addresses: [10.244.1.1]
"#,
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
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- addresses: [10.244.1.1, 10.244.1.2]
",
        );
        assert_eq!(model.errors, []);
        assert_eq!(
            backends_of(&model, "10.96.0.10", 80, Protocol::Tcp),
            backends(&[("10.244.1.1", 80)])
        );
    }

    #[test]
    fn slice_port_out_of_range_is_reported_and_skipped() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: admin, port: 81}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 70000}, {name: admin, port: 9000}]
endpoints: [{addresses: [10.244.1.1]}]
",
        );
        assert_eq!(
            error_lines(&model),
            [
                "EndpointSlice shop/web-1: port \"http\" number 70000 is outside 1..=65535; port skipped"
            ]
        );
        assert_eq!(backends_of(&model, "10.96.0.10", 80, Protocol::Tcp), []);
        assert_eq!(
            backends_of(&model, "10.96.0.10", 81, Protocol::Tcp),
            backends(&[("10.244.1.1", 9000)])
        );
    }

    #[test]
    fn duplicate_frontend_goes_to_the_first_service_by_namespace_and_name() {
        let manifests = r"
apiVersion: v1
kind: Service
metadata: {name: zeta, namespace: a}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: alpha, namespace: b}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}, {port: 81}]
";
        let (mut services, slices) = objects(manifests);
        let model = build(&services, &slices, &NodeContext::default());
        assert_eq!(
            error_lines(&model),
            ["Service b/alpha: frontend 10.96.0.10:80/TCP is already served by Service a/zeta"]
        );
        // The loser is skipped whole, not left half served.
        assert_eq!(model.frontends.len(), 1);
        assert_eq!(
            model.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)]
                .service
                .name,
            "zeta"
        );

        services.reverse();
        assert_eq!(
            build(&services, &slices, &NodeContext::default()),
            model,
            "input order does not matter"
        );
    }

    #[test]
    fn duplicate_service_object_keeps_the_first_given() {
        let manifests = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 80}]
";
        let model = build_yaml(manifests);
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
    fn slices_of_other_namespaces_and_services_are_ignored() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: staging
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.9.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-2
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.9.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-custom
  namespace: shop
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.9.3]}]
",
        );
        assert_eq!(model.errors, []);
        assert_eq!(backends_of(&model, "10.96.0.10", 80, Protocol::Tcp), []);
    }

    #[test]
    fn missing_namespace_means_default() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.1]}]
",
        );
        let spec = &model.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(spec.service.namespace, "default");
        assert_eq!(spec.backends, backends(&[("10.244.0.1", 80)]));
    }

    #[test]
    fn backends_are_sorted_and_deduplicated_across_slices() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.30]}, {addresses: [10.244.0.4]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.4]}, {addresses: [10.244.0.20]}]
",
        );
        assert_eq!(
            backends_of(&model, "10.96.0.10", 80, Protocol::Tcp),
            backends(&[("10.244.0.4", 80), ("10.244.0.20", 80), ("10.244.0.30", 80)])
        );
    }

    #[test]
    fn protocol_numbers_names_and_parsing() {
        assert_eq!((Protocol::Tcp.number(), Protocol::Udp.number()), (6, 17));
        assert_eq!((Protocol::Tcp.name(), Protocol::Udp.name()), ("TCP", "UDP"));
        assert_eq!(Protocol::from_k8s(None), Ok(Protocol::Tcp));
        assert_eq!(Protocol::from_k8s(Some("UDP")), Ok(Protocol::Udp));
        assert_eq!(
            "SCTP".parse::<Protocol>(),
            Err(UnsupportedProtocol("SCTP".into()))
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

    // ---- NodePort, LoadBalancer, ExternalIPs -------------------------------

    /// A dual-stack Service with one endpoint per family on node-a and one on
    /// node-b; `{type}` and `{extra}` (more spec lines) vary per test.
    fn dual_stack_web(type_: &str, extra: &str) -> String {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: {type_}
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}}
{extra}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: [10.244.1.5]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: node-a
- addresses: [10.244.2.7]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: node-b
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: ["fd00:10:244:1::5"]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: node-a
- addresses: ["fd00:10:244:2::7"]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: node-b
"#
        )
    }

    #[test]
    fn node_port_listens_on_every_node_address_of_the_service_families() {
        let node = NodeContext {
            addresses: vec![ip("192.168.1.10"), ip("10.0.0.10"), ip("2001:db8:1::10")],
            ..node_a()
        };
        let model = build_on(&dual_stack_web("NodePort", ""), &node);
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
            r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  type: NodePort
  clusterIP: "fd00:10:96::a"
  clusterIPs: ["fd00:10:96::a"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53, nodePort: 30053}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: kube-system}
spec:
  type: NodePort
  clusterIP: 10.96.0.53
  ports:
  - {port: 8080, nodePort: 30081}
"#,
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
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, nodePort: 70000}
  - {name: https, port: 443, nodePort: 30443}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.0.11
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.11}]
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  ports: [{port: 80, nodePort: 30012}]
",
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
        let status = r#"status:
  loadBalancer:
    ingress:
    - {ip: 203.0.113.10, ipMode: VIP}
    - ip: "2001:db8:ff::10"
    - hostname: lb-1234.elb.example.com
    - ip: 203.0.113.300
    - {ip: 198.51.100.7, ipMode: Proxy}
    - ip: 203.0.113.10
"#;
        let mut manifests = dual_stack_web("LoadBalancer", status);
        manifests.push_str(
            r#"
---
apiVersion: v1
kind: Service
metadata: {name: v4only, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  ipFamilies: [IPv4]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.20}, {ip: "2001:db8:ff::20"}]
"#,
        );
        let model = build_on(&manifests, &node_a());
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
        let extra = r#"  externalIPs: [198.51.100.20, "2001:db8:ee::20", 198.51.100.999, ""]"#;
        let model = build_on(&dual_stack_web("ClusterIP", extra), &node_a());
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
        let status = "status:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.10}]";
        let with_external_ip = "  externalIPs: [198.51.100.20]";
        let cases: [(&str, &str, &[&str]); 5] = [
            (
                "ClusterIP",
                "",
                &[
                    "10.96.0.10:80/TCP ClusterIP",
                    "[fd00:10:96::10]:80/TCP ClusterIP",
                ],
            ),
            (
                "NodePort",
                "",
                &[
                    "10.96.0.10:80/TCP ClusterIP",
                    "192.168.1.10:30080/TCP NodePort",
                    "[2001:db8:1::10]:30080/TCP NodePort",
                    "[fd00:10:96::10]:80/TCP ClusterIP",
                ],
            ),
            (
                "LoadBalancer",
                status,
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
                status,
                &[
                    "10.96.0.10:80/TCP ClusterIP",
                    "[fd00:10:96::10]:80/TCP ClusterIP",
                ],
            ),
            ("ExternalName", with_external_ip, &[]),
        ];
        for (type_, extra, expected) in cases {
            let model = build_on(&dual_stack_web(type_, extra), &node_a());
            assert_eq!(model.errors, [], "{type_}");
            assert_eq!(frontend_kinds(&model), expected, "{type_}");
        }
    }

    #[test]
    fn colliding_frontends_go_to_the_first_service_by_namespace_and_name() {
        let model = build_on(
            r"
apiVersion: v1
kind: Service
metadata: {name: alpha, namespace: a}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: beta, namespace: b}
spec:
  clusterIP: 10.96.0.11
  externalIPs: [10.96.0.10]
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: gamma, namespace: c}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  ports: [{name: http, port: 80, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: delta, namespace: c}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  ports: [{name: web, port: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: self, namespace: d}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.14
  externalIPs: [203.0.113.14]
  ports: [{port: 443}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.14}]
",
            &node_a(),
        );
        assert_eq!(
            error_lines(&model),
            [
                "Service b/beta: frontend 10.96.0.10:80/TCP is already served by Service a/alpha",
                "Service c/gamma: frontend 192.168.1.10:30080/TCP is already served by Service c/delta:web",
            ]
        );
        // Losers are skipped whole; one Service listing an address as both
        // ingress IP and external IP is no collision: the ingress IP wins.
        assert_eq!(
            frontend_kinds(&model),
            [
                "10.96.0.10:80/TCP ClusterIP",
                "10.96.0.13:8080/TCP ClusterIP",
                "10.96.0.14:443/TCP ClusterIP",
                "192.168.1.10:30080/TCP NodePort",
                "203.0.113.14:443/TCP LoadBalancer",
            ]
        );
    }

    // ---- Traffic policies and endpoint conditions --------------------------

    #[test]
    fn external_traffic_policy_local_without_local_endpoints_has_no_backends() {
        let status = "  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}, {ip: \"2001:db8:ff::10\"}]";
        let node = NodeContext {
            name: "node-c".into(),
            ..node_a()
        };
        let model = build_on(&dual_stack_web("LoadBalancer", status), &node);
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
                    port_name: String::new(),
                },
                port: 32000,
                local_endpoints: 0,
            }]
        );
    }

    #[test]
    fn external_traffic_policy_local_keeps_local_endpoints_and_counts_them_for_the_health_check() {
        let model = build_on(
            r#"
apiVersion: v1
kind: Service
metadata: {name: shop-lb, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, "fd00:10:96::30"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalTrafficPolicy: Local
  healthCheckNodePort: 31999
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: https, port: 443, targetPort: 8443, nodePort: 30443}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.30}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: shop-lb-v4
  namespace: shop
  labels: {kubernetes.io/service-name: shop-lb}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: https, port: 8443, protocol: TCP}
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
  nodeName: node-a
- addresses: [10.244.1.6]
  conditions: {ready: false}
  nodeName: node-a
- addresses: [10.244.2.7]
  conditions: {ready: true}
  nodeName: node-b
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: shop-lb-v6
  namespace: shop
  labels: {kubernetes.io/service-name: shop-lb}
addressType: IPv6
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: https, port: 8443, protocol: TCP}
endpoints:
- addresses: ["fd00:10:244:1::5"]
  conditions: {ready: true}
  nodeName: node-a
- addresses: ["fd00:10:244:2::7"]
  conditions: {ready: true}
  nodeName: node-b
"#,
            &node_a(),
        );
        assert_eq!(model.errors, []);
        let lb = spec_of(&model, "203.0.113.30", 443, Protocol::Tcp);
        assert_eq!(lb.kind, FrontendKind::LoadBalancer);
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
        // One v4 and one v6 address, each behind two ports: 2.
        assert_eq!(model.health_checks.len(), 1);
        assert_eq!(model.health_checks[0].port, 31999);
        assert_eq!(model.health_checks[0].local_endpoints, 2);
    }

    /// One local endpoint that is terminating but still serving, one remote
    /// ready one, under each combination of traffic policies (as the e2e
    /// tests "should fallback to local terminating endpoints when there are
    /// no ready endpoints with {internal,external}TrafficPolicy=Local" and
    /// the Cluster counterparts do).
    #[test]
    fn terminating_fallback_is_per_traffic_policy_set() {
        let manifests = |internal: &str, external: &str| {
            format!(
                r"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  internalTrafficPolicy: {internal}
  externalTrafficPolicy: {external}
  ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- addresses: [10.244.1.5]
  conditions: {{ready: false, serving: true, terminating: true}}
  nodeName: node-a
- addresses: [10.244.1.6]
  conditions: {{ready: false, serving: false, terminating: true}}
  nodeName: node-a
- addresses: [10.244.2.7]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: node-b
"
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
                let model = build_on(&manifests(internal, external), &node_a());
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
            r#"
apiVersion: v1
kind: Service
metadata: {name: node-cache, namespace: kube-system}
spec:
  clusterIP: "fd00:10:96::53"
  clusterIPs: ["fd00:10:96::53"]
  ipFamilies: [IPv6]
  internalTrafficPolicy: Local
  ports: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: node-cache-1
  namespace: kube-system
  labels: {kubernetes.io/service-name: node-cache}
addressType: IPv6
ports: [{name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: ["fd00:10:244:1::53"]
  nodeName: node-a
- addresses: ["fd00:10:244:2::53"]
  nodeName: node-b
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere, namespace: kube-system}
spec:
  clusterIP: 10.96.0.54
  internalTrafficPolicy: Local
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: elsewhere-1
  namespace: kube-system
  labels: {kubernetes.io/service-name: elsewhere}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- addresses: [10.244.2.54]
  nodeName: node-b
"#,
            &node_a(),
        );
        assert_eq!(model.errors, []);
        let spec = spec_of(&model, "fd00:10:96::53", 53, Protocol::Udp);
        assert!(spec.internal_local && !spec.external_local);
        assert_eq!(spec.backends, [be("fd00:10:244:1::53", 53, true)]);
        // No local endpoint: no backends, so the datapath rejects.
        let elsewhere = spec_of(&model, "10.96.0.54", 80, Protocol::Tcp);
        assert!(elsewhere.internal_local);
        assert_eq!(elsewhere.backends, []);
        assert_eq!(model.health_checks, []);
    }

    #[test]
    fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
        let model = build_on(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: "fd00:10:96::10"
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- addresses: ["fd00::1"]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: ["fd00::2"]
  conditions: {ready: false, serving: false, terminating: true}
- addresses: ["fd00::3"]
  conditions: {ready: false, terminating: true}
- addresses: ["fd00::4"]
  conditions: {ready: false}
- addresses: ["fd00::5"]
  conditions: {ready: false, serving: true}
"#,
            &node_a(),
        );
        assert_eq!(model.errors, []);
        let spec = spec_of(&model, "fd00:10:96::10", 80, Protocol::Tcp);
        // ::3 has no `serving`: it means the same as `ready`, false. ::4 and
        // ::5 are neither usable nor terminating.
        assert_eq!(spec.backends, [be("fd00::1", 8080, false)]);
        assert_eq!(
            spec.terminating,
            [be("fd00::2", 8080, false), be("fd00::3", 8080, false)]
        );
    }

    #[test]
    fn terminating_endpoint_drains_while_others_serve() {
        let model = build_on(
            r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.1.1]
  conditions: {ready: true, serving: true, terminating: false}
- addresses: [10.244.1.2]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-a
- addresses: [10.244.1.3]
  conditions: {ready: true, serving: true, terminating: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-2
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.1.3]
  conditions: {ready: false, serving: true, terminating: true}
",
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
    fn publish_not_ready_addresses_makes_every_endpoint_usable() {
        let model = build_on(
            r#"
apiVersion: v1
kind: Service
metadata: {name: peers, namespace: db}
spec:
  clusterIP: 10.96.0.40
  clusterIPs: [10.96.0.40, "fd00:10:96::40"]
  ipFamilies: [IPv4, IPv6]
  publishNotReadyAddresses: true
  ports: [{name: gossip, port: 7000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: peers-v4
  namespace: db
  labels: {kubernetes.io/service-name: peers}
addressType: IPv4
ports: [{name: gossip, port: 7000}]
endpoints:
- addresses: [10.244.1.1]
  conditions: {ready: false, serving: false, terminating: false}
- addresses: [10.244.1.2]
  conditions: {ready: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: peers-v6
  namespace: db
  labels: {kubernetes.io/service-name: peers}
addressType: IPv6
ports: [{name: gossip, port: 7000}]
endpoints:
- addresses: ["fd00:10:244::1"]
  conditions: {ready: false, serving: false, terminating: true}
"#,
            &node_a(),
        );
        assert_eq!(model.errors, []);
        let v4 = spec_of(&model, "10.96.0.40", 7000, Protocol::Tcp);
        assert_eq!(
            v4.backends,
            [be("10.244.1.1", 7000, false), be("10.244.1.2", 7000, false)]
        );
        let v6 = spec_of(&model, "fd00:10:96::40", 7000, Protocol::Tcp);
        assert_eq!(v6.backends, [be("fd00:10:244::1", 7000, false)]);
        assert_eq!(v6.terminating, []);
    }

    #[test]
    fn node_locality_needs_a_node_name() {
        let manifests = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  internalTrafficPolicy: Local
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- addresses: [10.244.1.1]
  nodeName: node-a
- addresses: [10.244.1.2]
";
        let on_a = build_on(manifests, &node_a());
        assert_eq!(
            on_a.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)].backends,
            [be("10.244.1.1", 80, true)]
        );
        // An agent that does not know its node name has no local endpoint.
        let unnamed = build_yaml(manifests);
        assert_eq!(
            unnamed.frontends[&frontend("10.96.0.10", 80, Protocol::Tcp)].backends,
            []
        );
    }

    #[test]
    fn traffic_policy_and_type_must_be_known_values() {
        let model = build_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  internalTrafficPolicy: Nearby
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.2
  externalTrafficPolicy: local
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: c, namespace: shop}
spec:
  type: Ingress
  clusterIP: 10.96.0.3
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: d, namespace: shop}
spec:
  clusterIP: 10.96.0.4
  ipFamilies: [IPv5]
  ports: [{port: 80}]
",
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

    // ---- Topology ----------------------------------------------------------

    /// Endpoints in zone-a (one on this node), zone-b and zone-c, with the
    /// hints the `EndpointSlice` controller writes for `PreferClose`.
    fn zoned_web(service_lines: &str, extra_endpoints: &str) -> String {
        format!(
            r"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
{service_lines}
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- addresses: [10.244.1.1]
  conditions: {{ready: true}}
  nodeName: node-a
  zone: zone-a
  hints: {{forZones: [{{name: zone-a}}]}}
- addresses: [10.244.4.1]
  conditions: {{ready: true}}
  nodeName: node-d
  zone: zone-a
  hints: {{forZones: [{{name: zone-a}}]}}
- addresses: [10.244.2.1]
  conditions: {{ready: true}}
  nodeName: node-b
  zone: zone-b
  hints: {{forZones: [{{name: zone-b}}, {{name: zone-c}}]}}
{extra_endpoints}
"
        )
    }

    const PREFER_CLOSE: &str = "spec:\n  trafficDistribution: PreferClose";

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
        let model = build_on(&zoned_web(PREFER_CLOSE, ""), &node_a());
        let zone_a = vec![be("10.244.1.1", 8080, true), be("10.244.4.1", 8080, false)];
        assert_eq!(
            cluster_and_node_port_backends(&model),
            (zone_a.clone(), zone_a)
        );

        let in_zone_c = NodeContext {
            zone: Some("zone-c".into()),
            ..node_a()
        };
        let model = build_on(&zoned_web(PREFER_CLOSE, ""), &in_zone_c);
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
        let model = build_on(&zoned_web(PREFER_CLOSE, ""), &in_zone(Some("zone-z")));
        assert_eq!(cluster_and_node_port_backends(&model).0, all);
        // The node's zone is unknown.
        let model = build_on(&zoned_web(PREFER_CLOSE, ""), &in_zone(None));
        assert_eq!(cluster_and_node_port_backends(&model).0, all);
        // The Service does not ask for topology: hints are ignored.
        let model = build_on(&zoned_web("spec:", ""), &node_a());
        assert_eq!(cluster_and_node_port_backends(&model).0, all);

        // One ready endpoint without hints turns the hints off.
        let unhinted = "- addresses: [10.244.3.1]\n  conditions: {ready: true}\n  zone: zone-a";
        let model = build_on(&zoned_web(PREFER_CLOSE, unhinted), &node_a());
        let mut with_unhinted = all.clone();
        with_unhinted.insert(2, be("10.244.3.1", 8080, false));
        assert_eq!(cluster_and_node_port_backends(&model).0, with_unhinted);
        // An endpoint that is not ready does not count.
        let not_ready = "- addresses: [10.244.3.1]\n  conditions: {ready: false, serving: true, terminating: true}";
        let model = build_on(&zoned_web(PREFER_CLOSE, not_ready), &node_a());
        let spec = spec_of(&model, "10.96.0.10", 80, Protocol::Tcp);
        assert_eq!(
            spec.backends,
            [be("10.244.1.1", 8080, true), be("10.244.4.1", 8080, false)]
        );
        assert_eq!(spec.terminating, [be("10.244.3.1", 8080, false)]);
    }

    #[test]
    fn topology_mode_auto_annotation_also_turns_hints_on() {
        for annotation in [
            "  annotations: {service.kubernetes.io/topology-mode: Auto}\nspec:",
            "  annotations: {service.kubernetes.io/topology-aware-hints: auto}\nspec:",
        ] {
            let model = build_on(&zoned_web(annotation, ""), &node_a());
            assert_eq!(
                cluster_and_node_port_backends(&model).0,
                [be("10.244.1.1", 8080, true), be("10.244.4.1", 8080, false)],
                "{annotation}"
            );
        }
    }

    #[test]
    fn topology_does_not_apply_to_local_traffic_policies() {
        // This node's only endpoint is hinted for another zone: with Local
        // policies it is used anyway, while the Cluster policy side follows
        // the hints.
        let service = "spec:\n  trafficDistribution: PreferClose\n  externalTrafficPolicy: Local";
        let local_elsewhere = "- addresses: [10.244.1.9]
  conditions: {ready: true}
  nodeName: node-a
  hints: {forZones: [{name: zone-b}]}";
        let model = build_on(&zoned_web(service, local_elsewhere), &node_a());
        assert_eq!(
            cluster_and_node_port_backends(&model),
            (
                vec![be("10.244.1.1", 8080, true), be("10.244.4.1", 8080, false)],
                vec![be("10.244.1.1", 8080, true), be("10.244.1.9", 8080, true)],
            )
        );
    }

    // ---- Session affinity --------------------------------------------------

    #[test]
    fn client_ip_affinity_timeout_defaults_to_three_hours() {
        let cases = [
            ("  sessionAffinity: ClientIP", 10_800),
            (
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
                60,
            ),
            (
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}",
                86_400,
            ),
            ("  sessionAffinity: None", 0),
            ("", 0),
        ];
        for (lines, timeout) in cases {
            let model = build_on(&dual_stack_web("NodePort", lines), &node_a());
            assert_eq!(model.errors, [], "{lines}");
            for spec in model.frontends.values() {
                assert_eq!(spec.affinity_timeout_s, timeout, "{lines}");
            }
            assert_eq!(model.frontends.len(), 4);
        }
    }

    #[test]
    fn invalid_affinity_rejects_the_service() {
        for (lines, reason) in [
            (
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
                "sessionAffinityConfig.clientIP.timeoutSeconds 0 is outside 1..=86400",
            ),
            (
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}",
                "sessionAffinityConfig.clientIP.timeoutSeconds 86401 is outside 1..=86400",
            ),
            (
                "  sessionAffinity: Cookie",
                r#"sessionAffinity "Cookie" is not None or ClientIP"#,
            ),
        ] {
            let model = build_on(&dual_stack_web("ClusterIP", lines), &node_a());
            assert!(model.frontends.is_empty(), "{lines}");
            assert_eq!(error_lines(&model), [format!("Service shop/web: {reason}")]);
        }
    }

    // ---- Source ranges -----------------------------------------------------

    #[test]
    fn source_ranges_guard_every_external_frontend_per_family() {
        let lines = r#"  externalIPs: [198.51.100.20, "2001:db8:ee::20"]
  loadBalancerSourceRanges:
  - 203.0.113.77/24
  - 198.51.100.5
  - " 192.0.2.0/26 "
  - 2001:db8:abcd:12::1/48
  - 2001:db8:abcd::/48
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}, {ip: "2001:db8:ff::10"}]"#;
        let model = build_on(&dual_stack_web("LoadBalancer", lines), &node_a());
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
        let lines = "  loadBalancerSourceRanges: [10.0.0.0/8]\nstatus:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}, {ip: \"2001:db8:ff::10\"}]";
        let model = build_on(&dual_stack_web("LoadBalancer", lines), &node_a());
        assert_eq!(model.errors, []);
        assert_eq!(
            spec_of(&model, "203.0.113.10", 80, Protocol::Tcp).source_ranges,
            [(ip("10.0.0.0"), 8)]
        );
        assert_eq!(
            spec_of(&model, "192.168.1.10", 30080, Protocol::Tcp).source_ranges,
            [(ip("10.0.0.0"), 8)]
        );
        assert_eq!(
            spec_of(&model, "2001:db8:ff::10", 80, Protocol::Tcp).source_ranges,
            []
        );
        // Only LoadBalancer Services are guarded; kube-proxy ignores the
        // field elsewhere.
        let model = build_on(
            &dual_stack_web(
                "NodePort",
                "  loadBalancerSourceRanges: [10.0.0.0/8, bogus]",
            ),
            &node_a(),
        );
        assert_eq!(model.errors, []);
        assert!(
            model
                .frontends
                .values()
                .all(|spec| spec.source_ranges.is_empty())
        );
    }

    #[test]
    fn invalid_source_range_rejects_the_service() {
        for range in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "2001:db8::/129",
            "example.com",
        ] {
            let model = build_on(
                &dual_stack_web(
                    "LoadBalancer",
                    &format!("  loadBalancerSourceRanges: [\"{range}\"]"),
                ),
                &node_a(),
            );
            assert!(model.frontends.is_empty(), "{range}");
            assert_eq!(
                error_lines(&model),
                [format!(
                    "Service shop/web: loadBalancerSourceRanges entry {range:?} is not a CIDR"
                )]
            );
        }
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

    // ---- Health checks -----------------------------------------------------

    #[test]
    fn health_checks_are_sorted_by_port_and_need_local_policy_and_a_valid_port() {
        let service = |name: &str, lines: &str| {
            format!(
                r"
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.{n}
{lines}
  ports: [{{port: 80}}]
",
                n = name.len()
            )
        };
        let manifests = [
            service(
                "z",
                "  externalTrafficPolicy: Local\n  healthCheckNodePort: 31000",
            ),
            service(
                "yy",
                "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
            ),
            service(
                "xxx",
                "  externalTrafficPolicy: Cluster\n  healthCheckNodePort: 32100",
            ),
            service(
                "wwww",
                "  externalTrafficPolicy: Local\n  healthCheckNodePort: 65536",
            ),
            service(
                "vvvvv",
                "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
            ),
            service("uuuuuu", "  externalTrafficPolicy: Local"),
        ]
        .concat();
        let model = build_on(manifests.trim_start_matches("\n---"), &node_a());
        assert_eq!(
            error_lines(&model),
            [
                "Service shop/wwww: healthCheckNodePort 65536 is outside 1..=65535; health check skipped",
                "Service shop/yy: healthCheckNodePort 32000 is already used by Service shop/vvvvv",
            ]
        );
        assert_eq!(
            model
                .health_checks
                .iter()
                .map(|check| (check.port, check.service.name.as_str()))
                .collect::<Vec<_>>(),
            [(31000, "z"), (32000, "vvvvv")]
        );
        // The Service with the bad port is still served.
        assert!(
            model
                .frontends
                .values()
                .any(|spec| spec.service.name == "wwww")
        );
    }
    use crate::test_rng::Rng;

    /// A random Service from a small space, so that Services often collide
    /// on a `ClusterIP` or health check port and change type and policy.
    fn random_service(rng: &mut Rng) -> Service {
        let name = format!("svc-{}", rng.below(6));
        let namespace = ["a", "b"][usize::try_from(rng.below(2)).unwrap()];
        let v4 = format!("10.0.0.{}", rng.below(5) + 1);
        let v6 = format!("fd00::{}", rng.below(5) + 1);
        let cluster_ips = match rng.below(3) {
            0 => serde_json::json!([v4]),
            1 => serde_json::json!([v6]),
            _ => serde_json::json!([v4, v6]),
        };
        let type_ =
            ["ClusterIP", "NodePort", "LoadBalancer"][usize::try_from(rng.below(3)).unwrap()];
        let local = rng.below(3) == 0;
        let mut spec = serde_json::json!({
            "type": type_,
            "clusterIPs": cluster_ips,
            "ports": [{"name": "http", "port": 80 + rng.below(2), "protocol": "TCP",
                       "targetPort": "http", "nodePort": 30000 + rng.below(3)}],
            "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
        });
        if local && type_ != "ClusterIP" {
            spec["healthCheckNodePort"] = serde_json::json!(32000 + rng.below(2));
        }
        if rng.below(4) == 0 {
            spec["ports"][0]["protocol"] = serde_json::json!("SCTP");
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": [{"ip": format!("192.0.2.{}", rng.below(3) + 1)}]}},
        }))
        .expect("valid Service")
    }

    fn random_slice(rng: &mut Rng) -> EndpointSlice {
        let service = format!("svc-{}", rng.below(6));
        let name = format!("{service}-{}", rng.below(3));
        let namespace = ["a", "b"][usize::try_from(rng.below(2)).unwrap()];
        let ipv4 = rng.below(2) == 0;
        let endpoints: Vec<serde_json::Value> = (0..rng.below(4))
            .map(|_| {
                let host = rng.below(6) + 1;
                let address = if rng.below(10) == 0 {
                    "not-an-ip".to_owned()
                } else if ipv4 {
                    format!("10.1.0.{host}")
                } else {
                    format!("fd01::{host}")
                };
                let node_name = ["node-a", "node-b"][usize::try_from(rng.below(2)).unwrap()];
                serde_json::json!({
                    "addresses": [address],
                    "nodeName": node_name,
                    "conditions": {"ready": rng.below(3) != 0, "serving": true,
                                   "terminating": rng.below(3) == 0},
                })
            })
            .collect();
        let mut labels = serde_json::json!({ SERVICE_NAME_LABEL: service });
        if rng.below(8) == 0 {
            labels = serde_json::json!({});
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "addressType": if ipv4 { "IPv4" } else { "IPv6" },
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080 + rng.below(2), "protocol": "TCP"}],
        }))
        .expect("valid EndpointSlice")
    }

    /// Applying random changes one by one gives, after every commit, what a
    /// full build over the same objects gives, and the reported changes are
    /// exactly the frontends that differ from the previous commit.
    #[test]
    fn incremental_model_matches_full_build_after_every_change() {
        let nodes = [
            node_a(),
            NodeContext {
                name: "node-b".into(),
                addresses: vec![ip("192.168.1.11")],
                zone: None,
            },
        ];
        for seed in 1..40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut services: BTreeMap<ObjectKey, Service> = BTreeMap::new();
            let mut slices: BTreeMap<ObjectKey, EndpointSlice> = BTreeMap::new();
            let mut node = nodes[0].clone();
            let mut model = Incremental::new(node.clone());
            let mut previous = BTreeMap::new();
            for step in 0..60 {
                // Some steps arrive as whole snapshots, as the kube source sends.
                let via_snapshot = rng.below(4) == 0;
                for _ in 0..=rng.below(3) {
                    match rng.below(9) {
                        0..=2 => {
                            let service = random_service(&mut rng);
                            services.insert(key_of(&service.metadata), service.clone());
                            if !via_snapshot {
                                model.upsert_service(service);
                            }
                        }
                        3 => {
                            let key = random_service(&mut rng).metadata;
                            services.remove(&key_of(&key));
                            if !via_snapshot {
                                model.remove_service(&key_of(&key));
                            }
                        }
                        4..=6 => {
                            let slice = random_slice(&mut rng);
                            slices.insert(key_of(&slice.metadata), slice.clone());
                            if !via_snapshot {
                                model.upsert_slice(&slice);
                            }
                        }
                        7 => {
                            let key = key_of(&random_slice(&mut rng).metadata);
                            slices.remove(&key);
                            if !via_snapshot {
                                model.remove_slice(&key);
                            }
                        }
                        _ => {
                            node = nodes[usize::try_from(rng.below(2)).unwrap()].clone();
                            model.set_node(&node);
                        }
                    }
                }
                let services: Vec<Service> = services.values().cloned().collect();
                let slices: Vec<EndpointSlice> = slices.values().cloned().collect();
                if via_snapshot {
                    model.reset(&services, &slices);
                }
                let changes = model.commit();
                let expected = build(&services, &slices, &node);
                assert_eq!(model.model(), expected, "seed {seed} step {step}");
                let mut expected_changes = FrontendChanges::new();
                for (frontend, spec) in &previous {
                    if expected.frontends.get(frontend) != Some(spec) {
                        expected_changes.insert(*frontend, Some(spec.clone()));
                    }
                }
                for frontend in expected.frontends.keys() {
                    if !previous.contains_key(frontend) {
                        expected_changes.insert(*frontend, None);
                    }
                }
                assert_eq!(changes, expected_changes, "seed {seed} step {step}");
                previous = expected.frontends;
            }
        }
    }

    /// A reset keeps the first of two objects with one name and reports the
    /// second, as `build` does; a later reset without it clears the report.
    #[test]
    fn incremental_reset_keeps_the_first_duplicate() {
        let mut rng = Rng(7);
        let first = random_service(&mut rng);
        let mut second = random_service(&mut rng);
        second.metadata = first.metadata.clone();
        let slice = random_slice(&mut rng);
        let mut model = Incremental::new(node_a());
        model.reset(
            &[first.clone(), second.clone()],
            &[slice.clone(), slice.clone()],
        );
        model.commit();
        let expected = build(
            &[first.clone(), second],
            &[slice.clone(), slice.clone()],
            &node_a(),
        );
        assert_eq!(model.model(), expected);
        assert!(
            model
                .errors()
                .iter()
                .any(|e| e.reason.starts_with("duplicate Service")),
            "{:?}",
            model.errors()
        );
        model.reset(std::slice::from_ref(&first), std::slice::from_ref(&slice));
        model.commit();
        assert_eq!(model.model(), build(&[first], &[slice], &node_a()));
    }
    /// A `ClusterIP` Service `a/svc-1` and its slice `a/svc-1-a` at
    /// resourceVersion 7, the rest random from `seed`.
    fn versioned_service_and_slice(seed: u64) -> (Service, EndpointSlice) {
        let mut rng = Rng(seed);
        let mut service = random_service(&mut rng);
        service.metadata.name = Some("svc-1".into());
        service.metadata.namespace = Some("a".into());
        service.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        service.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("TCP".into());
        let mut slice = random_slice(&mut rng);
        slice.metadata.name = Some("svc-1-a".into());
        slice.metadata.namespace = Some("a".into());
        slice.metadata.labels = Some([(SERVICE_NAME_LABEL.to_owned(), "svc-1".to_owned())].into());
        slice.metadata.resource_version = Some("7".into());
        (service, slice)
    }

    /// A snapshot of API objects whose resourceVersions did not change
    /// recomputes nothing; a new version of a slice is parsed again.
    #[test]
    fn incremental_snapshot_skips_unchanged_resource_versions() {
        let (service, slice) = versioned_service_and_slice(11);
        let mut model = Incremental::new(node_a());
        model.set_trust_resource_versions(true);
        model.reset(std::slice::from_ref(&service), std::slice::from_ref(&slice));
        model.commit();
        model.reset(std::slice::from_ref(&service), std::slice::from_ref(&slice));
        assert!(model.commit().is_empty());

        let mut changed = slice.clone();
        changed.metadata.resource_version = Some("8".into());
        changed.address_type = "IPv4".into();
        changed.endpoints = Some(vec![
            serde_json::from_value(serde_json::json!({
                "addresses": ["10.1.0.99"],
            }))
            .unwrap(),
        ]);
        model.reset(
            std::slice::from_ref(&service),
            std::slice::from_ref(&changed),
        );
        model.commit();
        assert_eq!(model.model(), build(&[service], &[changed], &node_a()));
    }

    /// Without trusted versions (files, edited by hand), a slice edited
    /// under its old resourceVersion is parsed again and followed.
    #[test]
    fn incremental_follows_an_edit_that_keeps_the_resource_version() {
        let (service, mut slice) = versioned_service_and_slice(12);
        slice.address_type = "IPv4".into();
        let mut model = Incremental::new(node_a());
        model.reset(std::slice::from_ref(&service), std::slice::from_ref(&slice));
        model.commit();

        let mut edited = slice.clone();
        edited.endpoints = Some(vec![
            serde_json::from_value(serde_json::json!({
                "addresses": ["10.1.0.99"],
            }))
            .unwrap(),
        ]);
        model.upsert_slice(&edited);
        model.commit();
        let expected = build(std::slice::from_ref(&service), &[edited.clone()], &node_a());
        assert_eq!(model.model(), expected);
        assert_ne!(
            expected,
            build(&[service], &[slice], &node_a()),
            "the edit must change the model for this test to mean anything"
        );
    }
}
