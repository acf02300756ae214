//! One Service validated and parsed: its addresses, ports, policies and
//! the frontends it asks for. Problems are reported, never fatal to others.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::address::parse_ip_sloppy;
use super::select::Selection;
use super::{
    DEFAULT_AFFINITY_TIMEOUT_S, Frontend, FrontendKind, FrontendSpec, MAX_AFFINITY_TIMEOUT_S,
    ObjectError, Protocol, SERVICE, ServiceContext, ServiceRef, for_another_proxy, is_ipv4,
    namespace_of,
};

/// A Service port that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServicePortSpec {
    /// Empty when unnamed; matched against the slice ports' names.
    pub(super) name: Arc<str>,
    port: u16,
    pub(super) proto: Protocol,
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Families {
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

    pub(super) fn iter(self) -> impl Iterator<Item = bool> {
        [(self.ipv4, true), (self.ipv6, false)]
            .into_iter()
            .filter_map(|(has, ipv4)| has.then_some(ipv4))
    }
}

/// `internalTrafficPolicy` and `externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct TrafficPolicies {
    pub(super) internal_local: bool,
    pub(super) external_local: bool,
}

/// A Service that passed validation: all the model needs of it, owned,
/// so that the model keeps this instead of the API object (a few hundred
/// bytes instead of ~1.5 KiB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ParsedService {
    cluster_ips: Vec<IpAddr>,
    pub(super) families: Families,
    pub(super) ports: Vec<ServicePortSpec>,
    /// VIP-mode ingress IPs of the Service's families, for `LoadBalancer`s.
    load_balancer_ips: Vec<IpAddr>,
    /// `externalIPs` of the Service's families.
    external_ips: Vec<IpAddr>,
    pub(super) policies: TrafficPolicies,
    affinity_timeout_s: u32,
    /// Sorted, host bits cleared; only for `LoadBalancer` Services.
    source_ranges: Vec<(IpAddr, u8)>,
    /// Only with `externalTrafficPolicy: Local`.
    pub(super) health_check_port: Option<u16>,
}

/// One frontend a Service asks for; `port` indexes `ParsedService::ports`.
pub(super) struct PlannedFrontend {
    pub(super) frontend: Frontend,
    pub(super) kind: FrontendKind,
    pub(super) port: usize,
}

impl ParsedService {
    /// Every frontend of the Service, each once: where one address is two
    /// kinds (an ingress IP also listed in `externalIPs`), the first kind in
    /// `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalIP` order is kept.
    pub(super) fn frontends(&self, node_addrs: &BTreeSet<IpAddr>) -> Vec<PlannedFrontend> {
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

    pub(super) fn spec(
        &self,
        service: ServiceRef,
        addr: IpAddr,
        kind: FrontendKind,
        selection: Selection,
        context: &ServiceContext<'_>,
    ) -> FrontendSpec {
        let source_ranges = self.source_ranges_of(addr, kind, context);
        FrontendSpec {
            service,
            kind,
            backends: selection.backends,
            terminating: selection.terminating,
            not_ready: selection.not_ready,
            not_serving: selection.not_serving,
            external_local: kind.is_external() && self.policies.external_local,
            internal_local: !kind.is_external() && self.policies.internal_local,
            no_local_endpoints: selection.no_local_endpoints,
            affinity_timeout_s: self.affinity_timeout_s,
            source_ranges,
        }
    }
}

impl ParsedService {
    /// The source ranges guarding one frontend, as kube-proxy applies
    /// them: on the load-balancer IPs only ("nodeports are not subject to
    /// loadBalancerSourceRanges"), of the frontend's family. With
    /// `--source-ranges-strict`, on the `NodePort`s and external IPs too.
    /// When a range holds a node address, the load-balancer IPs themselves
    /// are let in as well: a node reaching a VIP that is local to it loops
    /// back with the VIP as source (kube-proxy's `allowFromNode`).
    fn source_ranges_of(
        &self,
        addr: IpAddr,
        kind: FrontendKind,
        context: &ServiceContext<'_>,
    ) -> Vec<(IpAddr, u8)> {
        let guarded = match kind {
            FrontendKind::LoadBalancer => true,
            FrontendKind::NodePort | FrontendKind::ExternalIp => context.source_ranges_strict,
            FrontendKind::ClusterIp => false,
        };
        if !guarded {
            return Vec::new();
        }
        let mut ranges: Vec<(IpAddr, u8)> = self
            .source_ranges
            .iter()
            .copied()
            .filter(|&(prefix, _)| is_ipv4(prefix) == is_ipv4(addr))
            .collect();
        let holds_node = ranges.iter().any(|&range| {
            context
                .node_addrs
                .iter()
                .any(|&node| prefix_contains(range, node))
        });
        if holds_node {
            ranges.extend(
                self.load_balancer_ips
                    .iter()
                    .filter(|&&ip| is_ipv4(ip) == is_ipv4(addr))
                    .map(|&ip| (ip, if is_ipv4(ip) { 32 } else { 128 })),
            );
            ranges.sort_unstable();
            ranges.dedup();
        }
        ranges
    }
}

/// Whether `addr` is inside `(prefix, len)` (host bits of `prefix` clear).
#[must_use]
pub fn prefix_contains((prefix, len): (IpAddr, u8), addr: IpAddr) -> bool {
    match (prefix, addr) {
        (IpAddr::V4(prefix), IpAddr::V4(addr)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(addr) & mask == u32::from(prefix)
        }
        (IpAddr::V6(prefix), IpAddr::V6(addr)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(addr) & mask == u128::from(prefix)
        }
        _ => false,
    }
}

/// `Ok(None)`: not ours to serve, skipped silently. `Err`: the whole Service
/// is invalid. Problems with one part (a port, an address) go to `errors`
/// and skip only that part.
pub(super) fn parse_service(
    service: &Service,
    errors: &mut Vec<ObjectError>,
) -> Result<Option<ParsedService>, String> {
    let meta = &service.metadata;
    if for_another_proxy(meta) {
        tracing::debug!(namespace = namespace_of(meta), name = ?meta.name, "skipping Service labelled for another proxy or headless");
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
    let affinity_timeout_s = affinity_timeout(spec)?;
    let source_ranges = if type_ == ServiceType::LoadBalancer {
        source_ranges(
            service,
            spec.load_balancer_source_ranges
                .as_deref()
                .unwrap_or_default(),
            errors,
        )
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
        match parse_ip_sloppy(text) {
            Some(addr) if families.contains(addr) => addrs.push(addr),
            // kube-proxy ignores these quietly too: each family's proxier
            // only knows the Services with a ClusterIP of its family.
            Some(addr) => tracing::debug!(
                namespace = namespace_of(meta), name = ?meta.name, %addr,
                "ignoring {field} of a family the Service does not have"
            ),
            None => errors.push(ObjectError::for_object(
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
        let addr: IpAddr = parse_ip_sloppy(text)
            .ok_or_else(|| format!("clusterIP {text:?} is not an IP address"))?;
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
fn ports(
    service: &Service,
    type_: ServiceType,
    errors: &mut Vec<ObjectError>,
) -> Result<Vec<ServicePortSpec>, String> {
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
            name: name.into(),
            // Checked above.
            port: u16::try_from(port.port).unwrap_or_default(),
            proto,
            node_port,
        });
    }
    Ok(ports)
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

/// Parses `loadBalancerSourceRanges`: sorted, deduplicated, host bits
/// cleared. An entry that is not a CIDR is reported and skipped, the
/// others kept, as kube-proxy does (the API server's validation lets
/// some through, and it once let through more).
fn source_ranges(
    service: &Service,
    texts: &[String],
    errors: &mut Vec<ObjectError>,
) -> Vec<(IpAddr, u8)> {
    let mut ranges = Vec::with_capacity(texts.len());
    for text in texts {
        match parse_cidr(text) {
            Some(range) => ranges.push(range),
            None => errors.push(ObjectError::for_object(
                SERVICE,
                &service.metadata,
                format!("loadBalancerSourceRanges entry {text:?} is not a CIDR; entry skipped"),
            )),
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

/// `"203.0.113.0/24"`, `"2001:db8::/32"`, or a bare address (a host
/// prefix), parsed as leniently as kube-proxy's `ParseCIDRSloppy`: spaces
/// around it, and IPv4 octets and prefix lengths with leading zeros (read
/// as decimal, `010.0.0.0/08` is `10.0.0.0/8`), which the API server
/// accepted before Kubernetes 1.22 and still keeps in stored objects.
/// Host bits are cleared, as kube-proxy's CIDR parsing does.
#[must_use]
pub fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let text = text.trim();
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => {
            if len.is_empty() || !len.bytes().all(|byte| byte.is_ascii_digit()) {
                return None;
            }
            (parse_ip_sloppy(addr)?, Some(len.parse::<u8>().ok()?))
        }
        None => (parse_ip_sloppy(text)?, None),
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

#[cfg(test)]
mod tests;
