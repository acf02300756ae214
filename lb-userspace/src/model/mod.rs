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
//!   ready, the serving and terminating ones (KEP-1669). Terminating and not
//!   ready endpoints that take no new flows are listed apart so that
//!   established flows drain (and those not serving, whose UDP flows move).
//! - Session affinity, `loadBalancerSourceRanges` and `healthCheckNodePort`.
//!
//! Where each part lives: this file holds the types and [`build`];
//! `service` parses a Service, `endpoints` its `EndpointSlice`s, `select`
//! picks a frontend's backends from them, and `incremental` keeps the
//! model up to date object by object ([`Incremental`]).

mod address;
mod endpoints;
mod incremental;
mod listed;
mod prepared;
mod select;
mod service;
#[cfg(test)]
mod test_fixtures;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use endpoints::{EndpointIndex, SliceEndpoints};
pub use incremental::{FrontendChanges, Incremental};
pub use listed::{ListedService, ListedSlice, proto as protobuf};
pub use prepared::{PreparedService, PreparedSlice, SliceTrigger};
use select::Selector;
use service::{ParsedService, PlannedFrontend, parse_service};
pub use service::{parse_cidr, prefix_contains};

/// Label that hands a Service to another proxy; kube-proxy skips those too.
pub(crate) const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the `EndpointSlice` controller puts on the slices of a headless
/// Service (no cluster IP: nothing for a proxy to do).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Label the `EndpointSlice` controller sets to tie a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `EndpointSlice` annotation: when the change behind this version happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Namespace of an object that names none, as `kubectl apply` would place it.
pub const DEFAULT_NAMESPACE: &str = "default";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not given (3 hours).
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The largest `timeoutSeconds` the API accepts (1 day).
const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// What the model needs to know about the node the agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// Endpoints whose `nodeName` equals this are local. Empty: none is.
    pub name: String,
    /// Node addresses of both families; `NodePort` frontends listen on these.
    pub addresses: Vec<IpAddr>,
    /// Topology zone, matched against endpoint zone hints (`name` is
    /// matched against node hints).
    pub zone: Option<String>,
    /// `--source-ranges-strict`: `loadBalancerSourceRanges` also guard the
    /// Service's `NodePort`s and external IPs. Off (kube-proxy): only its
    /// load-balancer IPs, as cloud load balancers that deliver to the
    /// `NodePort` from their own addresses need.
    pub source_ranges_strict: bool,
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
    /// Whether traffic to it is governed by `externalTrafficPolicy`.
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
    Sctp,
}

impl Protocol {
    /// IANA protocol number, as in the IP header.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    /// Spelling used by the Kubernetes API.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// Parses a Kubernetes `protocol` field, where absent means TCP.
    ///
    /// # Errors
    ///
    /// [`UnsupportedProtocol`] for anything but `TCP`, `UDP` and `SCTP`.
    fn from_k8s(value: Option<&str>) -> Result<Self, UnsupportedProtocol> {
        value.map_or(Ok(Self::Tcp), str::parse)
    }
}

impl FromStr for Protocol {
    type Err = UnsupportedProtocol;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
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
#[error("protocol {0} is not supported (only TCP, UDP and SCTP)")]
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
    /// Endpoints of the policy's set that neither take new flows nor
    /// terminate: not ready (a readiness flap), or ready but left out by
    /// zone hints. Like `terminating`: no new flows, established ones go
    /// on. Sorted and deduplicated.
    pub not_ready: Vec<Backend>,
    /// Of `terminating` and `not_ready`, the endpoints that are not serving
    /// either: their UDP flows move to one of `backends` (kube-proxy clears
    /// the UDP conntrack entries of endpoints that are not serving); TCP
    /// flows go on. Sorted and deduplicated.
    pub not_serving: Vec<Backend>,
    /// An external frontend (`NodePort`, `LoadBalancer`, `ExternalIP`) of a
    /// Service with `externalTrafficPolicy: Local`: only this node's
    /// endpoints, client source preserved.
    pub external_local: bool,
    /// A `ClusterIP` frontend of a Service with `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// The frontend's Local traffic policy (internal or external) left it
    /// no endpoint on this node while the Service port has usable ones on
    /// other nodes: new flows are dropped, not refused, as kube-proxy
    /// does (a refusal would tell the client the port is closed, when the
    /// Service is up elsewhere). Without endpoints anywhere: refused.
    pub no_local_endpoints: bool,
    /// 0: no session affinity; else the `ClientIP` affinity timeout.
    pub affinity_timeout_s: u32,
    /// Client prefixes allowed in, of this frontend's family, with host bits
    /// cleared; sorted. Empty: everyone. Only the load-balancer IPs of
    /// `LoadBalancer` Services have any (with `--source-ranges-strict`,
    /// their `NodePort`s and external IPs too).
    pub source_ranges: Vec<(IpAddr, u8)>,
}

/// The Service port a frontend came from, for logs, metrics and the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Empty for the single unnamed port a Service may have.
    pub port_name: Arc<str>,
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
/// `externalTrafficPolicy: Local`): 200 while the asking family has local
/// endpoints (and the agent is in sync), else 503.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `port_name` is empty: the check is per Service.
    pub service: ServiceRef,
    pub port: u16,
    /// Distinct addresses of this node's ready endpoints over all ports,
    /// per family, IPv4 then IPv6: kube-proxy runs one proxier per family,
    /// each answering on its family's node addresses, so a dual-stack pod
    /// counts once in each (and only ready ones count: when only
    /// terminating endpoints are left, load balancers drain the node).
    pub local_endpoints: [usize; 2],
}

impl HealthCheck {
    /// The local endpoints of one family.
    #[must_use]
    pub fn local_endpoints_of(&self, ipv4: bool) -> usize {
        self.local_endpoints[usize::from(!ipv4)]
    }
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
    fn for_object(kind: &'static str, meta: &ObjectMeta, reason: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace_of(meta).to_owned(),
            name: meta.name.clone().unwrap_or_default(),
            reason: reason.into(),
        }
    }

    /// Names an object by its namespace (defaulted already) and name.
    #[must_use]
    fn for_key(kind: &'static str, (namespace, name): (&str, &str), reason: String) -> Self {
        Self {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            reason,
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
/// two Services that claim one frontend (or health check port), the older
/// (`creationTimestamp`, then namespace/name) serves it; the other keeps
/// its other frontends and gets an error naming the one it lost.
#[must_use]
pub fn build(services: &[Service], slices: &[EndpointSlice], node: &NodeContext) -> Model {
    let mut errors = Vec::new();
    let endpoints = EndpointIndex::new(slices, &mut errors);
    let context = ServiceContext::new(node);

    let mut ordered: Vec<&Service> = services.iter().collect();
    // Stable, so that among duplicates the first given wins.
    ordered.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));

    let mut seen = BTreeSet::new();
    let mut unique = Vec::with_capacity(ordered.len());
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
        if !seen.insert((namespace_of(meta), name)) {
            errors.push(ObjectError::for_object(
                SERVICE,
                meta,
                "duplicate Service, the first one given is used",
            ));
            continue;
        }
        unique.push(service);
    }
    unique.sort_by(|a, b| claim_order(&a.metadata).cmp(&claim_order(&b.metadata)));

    let mut frontends: BTreeMap<Frontend, FrontendSpec> = BTreeMap::new();
    let mut health_checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    for service in unique {
        let meta = &service.metadata;
        let (namespace, name) = (namespace_of(meta), meta.name.as_deref().unwrap_or_default());
        let slices: Vec<&SliceEndpoints> = endpoints.of(namespace, name).iter().collect();
        let record = ServiceRecord::new(service);
        let mut output = service_output(&record, (namespace, name), &slices, &context);
        leave_contested(
            &mut output,
            (namespace, name),
            |frontend| frontends.get(frontend).map(|spec| &spec.service),
            &health_checks,
        );
        errors.extend(output.errors);
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
    source_ranges_strict: bool,
}

impl<'a> ServiceContext<'a> {
    fn new(node: &'a NodeContext) -> Self {
        Self {
            node_name: &node.name,
            node_addrs: node.addresses.iter().copied().collect(),
            zone: node.zone.as_deref().filter(|zone| !zone.is_empty()),
            source_ranges_strict: node.source_ranges_strict,
        }
    }
}

/// A Service as the model keeps it: parsed once, without the API object
/// (~1.5 KiB each, ~150 MiB at 100k Services), since what it asks for
/// depends only on this, its slices and the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceRecord {
    /// `metadata.name` is set (else the Service is only reported).
    named: bool,
    /// `metadata.creationTimestamp`, for [`claim_order`].
    created: Option<Time>,
    /// `None`: nothing to serve (not ours, headless, or invalid).
    parsed: Option<ParsedService>,
    /// Its own problems: parts skipped, or why the whole of it is.
    errors: Vec<ObjectError>,
}

impl ServiceRecord {
    pub(super) fn new(service: &Service) -> Self {
        let meta = &service.metadata;
        let mut errors = Vec::new();
        let parsed = match parse_service(service, &mut errors) {
            Ok(parsed) => parsed,
            Err(reason) => {
                errors.push(ObjectError::for_object(SERVICE, meta, reason));
                None
            }
        };
        Self {
            named: meta.name.is_some(),
            created: meta.creation_timestamp.clone(),
            parsed,
            errors,
        }
    }

    /// [`claim_order`] of the Service with this record and `key`.
    fn claim_order<'a>(&'a self, key: &'a ObjectKey) -> ClaimOrder<'a> {
        let name = self.named.then_some(key.1.as_str());
        (
            self.created.is_none(),
            self.created.as_ref(),
            (&key.0, name),
        )
    }
}

/// One named Service (its record, namespace and name) with its slices (of
/// its namespace, by the service-name label) turned into frontends;
/// independent of every other Service.
fn service_output(
    record: &ServiceRecord,
    (namespace, name): (&str, &str),
    slices: &[&SliceEndpoints],
    context: &ServiceContext<'_>,
) -> ServiceOutput {
    let mut output = ServiceOutput {
        errors: record.errors.clone(),
        ..ServiceOutput::default()
    };
    let Some(parsed) = &record.parsed else {
        return output;
    };
    let selector = Selector::new(slices, parsed, context.node_name, context.zone);
    let planned = parsed.frontends(&context.node_addrs);
    let wanted: Vec<(usize, bool, FrontendKind)> = planned
        .iter()
        .map(|planned| (planned.port, planned.frontend.addr.is_ipv4(), planned.kind))
        .collect();
    let selections = selector.select_each(&wanted);
    // Shared by every frontend of the Service (and its health check): two
    // strings copied per frontend were a sixth of a first sync's outputs.
    let (namespace, name): (Arc<str>, Arc<str>) = (namespace.into(), name.into());
    for (
        PlannedFrontend {
            frontend,
            kind,
            port,
        },
        selection,
    ) in planned.into_iter().zip(selections)
    {
        let spec = parsed.spec(
            ServiceRef {
                namespace: Arc::clone(&namespace),
                name: Arc::clone(&name),
                port_name: Arc::clone(&parsed.ports[port].name),
            },
            frontend.addr,
            kind,
            selection,
            context,
        );
        output.frontends.push((frontend, spec));
    }
    output.health_check = parsed.health_check_port.map(|port| HealthCheck {
        service: ServiceRef {
            namespace,
            name,
            port_name: Arc::default(),
        },
        port,
        local_endpoints: selector.local_ready_endpoints(),
    });
    output
}

/// Growth below which a B-tree is left as its inserts made it.
pub(crate) const REPACK_MIN: usize = 1024;

/// Rebuilds `map` with full nodes when it more than doubled since it held
/// `len_before` entries (a first sync). Filled one insert at a time, in
/// ascending order as ids and frontends come, a B-tree splits every node
/// in half: at 100k Services the 2M backends of the agent's state took
/// ~100 MiB where full nodes take ~55. Built from sorted entries, the
/// nodes are full; a later insert splits only its node.
pub(crate) fn repack_if_grown<K: Ord, V>(map: &mut BTreeMap<K, V>, len_before: usize) {
    if map.len() > 2 * len_before + REPACK_MIN {
        *map = std::mem::take(map).into_iter().collect();
    }
}

/// The order in which Services claim a frontend (or health check port)
/// that several want: the oldest first, as the one clients used first;
/// a Service without `creationTimestamp` (a manifest file) after those
/// with one; then namespace/name, so the outcome never depends on the
/// order objects arrived in.
fn claim_order(meta: &ObjectMeta) -> ClaimOrder<'_> {
    let created = meta.creation_timestamp.as_ref();
    (created.is_none(), created, object_key(meta))
}

/// See [`claim_order`].
type ClaimOrder<'a> = (bool, Option<&'a Time>, (&'a str, Option<&'a str>));

/// Leaves out of `output` what Services earlier in [`claim_order`] serve
/// already: each such frontend, and the health check port, is reported on
/// this Service (a Warning Event with the kube source) and skipped; the
/// rest of the Service is served. (kube-proxy has no rule here: whichever
/// Service its sync writes last overwrites the rule.)
/// `owner_of` names the Service serving a frontend already, if any.
fn leave_contested<'a>(
    output: &mut ServiceOutput,
    (namespace, name): (&str, &str),
    owner_of: impl Fn(&Frontend) -> Option<&'a ServiceRef>,
    health_checks: &BTreeMap<u16, HealthCheck>,
) {
    let errors = &mut output.errors;
    output.frontends.retain(|(frontend, _)| {
        let Some(owner) = owner_of(frontend) else {
            return true;
        };
        errors.push(ObjectError::for_key(
            SERVICE,
            (namespace, name),
            format!(
                "frontend {frontend} is also claimed by Service {owner}, which is older and serves it; frontend skipped",
            ),
        ));
        false
    });
    if let Some(port) = output.health_check.as_ref().map(|check| check.port)
        && let Some(owner) = health_checks.get(&port)
    {
        errors.push(ObjectError::for_key(
            SERVICE,
            (namespace, name),
            format!(
                "healthCheckNodePort {port} is also claimed by Service {}, which is older and serves it; health check skipped",
                owner.service
            ),
        ));
        output.health_check = None;
    }
}

/// A Service or `EndpointSlice` that kube-proxy never sees: its watches
/// select `!service.kubernetes.io/service-proxy-name` (whatever proxy is
/// named: kube-proxy has no name) and `!service.kubernetes.io/headless`.
/// The kube source asks the API server for the same selector; this keeps
/// the file source (and any object that slips through) to the same rule.
fn for_another_proxy(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().is_some_and(|labels| {
        labels.contains_key(SERVICE_PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL)
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
