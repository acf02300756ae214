//! Kubernetes Service semantics: Services and `EndpointSlice`s in, the
//! frontends and backends the datapath serves out.
//!
//! A pure function, so every rule is unit tested without a cluster or root.
//! Bad objects never abort the build: each is reported as an [`ObjectError`]
//! and skipped, so one typo cannot take down the other Services.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Label that hands a Service to another proxy; kube-proxy skips those too.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the `EndpointSlice` controller sets to tie a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Namespace of an object that names none, as `kubectl apply` would place it.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Everything the datapath must serve, plus what was rejected on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub frontends: BTreeMap<Frontend, FrontendSpec>,
    /// Sorted and deduplicated, so that unchanged input logs the same lines.
    pub errors: Vec<ObjectError>,
}

/// A virtual address clients connect to: one `ClusterIP` x one service port.
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
    /// Sorted and deduplicated, so equal input gives equal slots.
    pub backends: Vec<Backend>,
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
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.addr, self.port).fmt(f)
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

/// Turns Services and `EndpointSlice`s into the desired frontends.
///
/// The result depends only on the set of objects, not their order, except
/// that of two objects with the same namespace/name the first one wins.
#[must_use]
pub fn build(services: &[Service], slices: &[EndpointSlice]) -> Model {
    let mut errors = Vec::new();
    let endpoints = EndpointIndex::new(slices, &mut errors);

    let mut ordered: Vec<&Service> = services.iter().collect();
    // Stable, so that among duplicates the first given wins.
    ordered.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));

    let mut seen = BTreeSet::new();
    let mut frontends: BTreeMap<Frontend, FrontendSpec> = BTreeMap::new();
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
        let parsed = match parse_service(service, &mut errors) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => continue,
            Err(reason) => {
                errors.push(ObjectError::for_object(SERVICE, meta, reason));
                continue;
            }
        };
        let claimed = parsed.frontends().find_map(|(frontend, _)| {
            frontends
                .get(&frontend)
                .map(|owner| (frontend, owner.service.clone()))
        });
        if let Some((frontend, owner)) = claimed {
            errors.push(ObjectError::for_object(
                SERVICE,
                meta,
                format!("frontend {frontend} is already served by Service {owner}"),
            ));
            continue;
        }
        for (frontend, port) in parsed.frontends() {
            let backends = endpoints.backends(namespace, name, frontend.addr, port);
            let service = ServiceRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port_name: port.name.to_owned(),
            };
            frontends.insert(frontend, FrontendSpec { service, backends });
        }
    }

    errors.sort();
    errors.dedup();
    Model { frontends, errors }
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

/// A Service port that passed validation.
#[derive(Clone, Copy)]
struct ServicePortSpec<'a> {
    /// Empty when unnamed; matched against the slice ports' names.
    name: &'a str,
    port: u16,
    proto: Protocol,
}

/// A Service that passed validation: its `ClusterIP`s and usable ports.
struct ParsedService<'a> {
    addrs: Vec<IpAddr>,
    ports: Vec<ServicePortSpec<'a>>,
}

impl<'a> ParsedService<'a> {
    fn frontends(&self) -> impl Iterator<Item = (Frontend, ServicePortSpec<'a>)> + '_ {
        self.addrs.iter().flat_map(|&addr| {
            self.ports.iter().map(move |&port| {
                let frontend = Frontend {
                    addr,
                    port: port.port,
                    proto: port.proto,
                };
                (frontend, port)
            })
        })
    }
}

/// `Ok(None)`: not ours to serve, skipped silently. `Err`: the whole Service
/// is invalid. Per-port problems go to `errors` and skip only that port.
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
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let cluster_ips: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    match cluster_ips.first() {
        // Not allocated yet, or headless.
        None | Some(&("" | "None")) => return Ok(None),
        Some(_) => {}
    }

    let mut addrs = Vec::with_capacity(cluster_ips.len());
    for text in cluster_ips {
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

    let service_ports = spec.ports.as_deref().unwrap_or_default();
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
        match Protocol::from_k8s(port.protocol.as_deref()) {
            Ok(proto) => ports.push(ServicePortSpec {
                name,
                // Checked above.
                port: u16::try_from(port.port).unwrap_or_default(),
                proto,
            }),
            Err(unsupported) => errors.push(ObjectError::for_object(
                SERVICE,
                meta,
                format!(
                    "port {:?} ({}): {unsupported}; port skipped",
                    name, port.port
                ),
            )),
        }
    }
    Ok(Some(ParsedService { addrs, ports }))
}

/// One `EndpointSlice`, validated once however many Service ports use it.
struct SliceEndpoints {
    ipv4: bool,
    /// Ready addresses, one per endpoint.
    ready: Vec<IpAddr>,
    /// (name, protocol) -> target port.
    ports: BTreeMap<(String, Protocol), u16>,
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
            let Some(service) = meta
                .labels
                .as_ref()
                .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            else {
                // Not managed for a Service (custom slices): none of ours.
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
            let ipv4 = match slice.address_type.as_str() {
                "IPv4" => true,
                "IPv6" => false,
                "FQDN" => continue,
                other => {
                    errors.push(ObjectError::for_object(
                        ENDPOINT_SLICE,
                        meta,
                        format!("addressType {other:?} is not IPv4, IPv6 or FQDN"),
                    ));
                    continue;
                }
            };
            let parsed = SliceEndpoints {
                ipv4,
                ready: ready_addresses(slice, ipv4, errors),
                ports: slice_ports(slice, errors),
            };
            by_service
                .entry((namespace.to_owned(), service.clone()))
                .or_default()
                .push(parsed);
        }
        Self { by_service }
    }

    /// Backends of one frontend: ready endpoints of the frontend's family,
    /// each on the target port its own slice resolved for this port.
    fn backends(
        &self,
        namespace: &str,
        service: &str,
        frontend_addr: IpAddr,
        port: ServicePortSpec<'_>,
    ) -> Vec<Backend> {
        let Some(slices) = self
            .by_service
            .get(&(namespace.to_owned(), service.to_owned()))
        else {
            return Vec::new();
        };
        let mut backends: Vec<Backend> = slices
            .iter()
            .filter(|slice| slice.ipv4 == is_ipv4(frontend_addr))
            .filter_map(|slice| {
                let target = *slice.ports.get(&(port.name.to_owned(), port.proto))?;
                Some(
                    slice
                        .ready
                        .iter()
                        .map(move |&addr| Backend { addr, port: target }),
                )
            })
            .flatten()
            .collect();
        backends.sort_unstable();
        backends.dedup();
        backends
    }
}

/// Validates every address, and keeps the first valid one of each ready
/// endpoint: an endpoint's addresses are one pod and fungible (kube-proxy
/// uses only the first), so taking all would weigh that pod more.
fn ready_addresses(
    slice: &EndpointSlice,
    ipv4: bool,
    errors: &mut Vec<ObjectError>,
) -> Vec<IpAddr> {
    let family = if ipv4 { "IPv4" } else { "IPv6" };
    let mut ready = Vec::new();
    for endpoint in slice.endpoints.as_deref().unwrap_or_default() {
        // Kubernetes: a nil `ready` means ready.
        let is_ready = endpoint
            .conditions
            .as_ref()
            .and_then(|conditions| conditions.ready)
            .unwrap_or(true);
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
        if is_ready {
            ready.extend(first_valid);
        }
    }
    ready
}

/// The slice's (name, protocol) -> port table. Ports without a number or of
/// another protocol (SCTP) cannot match a frontend and are left out.
fn slice_ports(
    slice: &EndpointSlice,
    errors: &mut Vec<ObjectError>,
) -> BTreeMap<(String, Protocol), u16> {
    let mut ports = BTreeMap::new();
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
        if ports.contains_key(&(name.clone(), proto)) {
            errors.push(ObjectError::for_object(
                ENDPOINT_SLICE,
                &slice.metadata,
                format!("port {name:?}/{proto} is listed twice; the first is used"),
            ));
            continue;
        }
        ports.insert((name, proto), number);
    }
    ports
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
        let (services, slices) = objects(manifests);
        build(&services, &slices)
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
        let model = build(&services, &slices);
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
            build(&services, &slices),
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
}
