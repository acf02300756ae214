//! Real API JSON (Services, `EndpointSlice`s, a Node as a v1.3x API server
//! serves them), and the clusters the tests start from.

use lb_userspace::source::kube::HEADLESS_LABEL;
use serde_json::{Value, json};

use crate::NODE;
use crate::api_server::Res;

const CREATED: &str = "2025-03-01T10:00:00Z";

pub(crate) fn uid(name: &str) -> String {
    let mut h: u32 = 2_166_136_261;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16_777_619);
    }
    format!("{h:08x}-1c2d-4e5f-8a9b-{:012x}", u64::from(h) * 7919)
}

fn managed_fields(manager: &str) -> Value {
    json!([{"manager": manager, "operation": "Update", "apiVersion": "v1", "time": CREATED,
        "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}])
}

pub(crate) struct Svc<'a> {
    pub(crate) name: &'a str,
    pub(crate) type_: &'a str,
    pub(crate) cluster_ips: &'a [&'a str],
    pub(crate) families: &'a [&'a str],
    pub(crate) policy: &'a str,
    /// (name, port, protocol, targetPort, nodePort)
    pub(crate) ports: &'a [(&'a str, u16, &'a str, u16, Option<u16>)],
    pub(crate) labels: Value,
}

impl Default for Svc<'_> {
    fn default() -> Self {
        Self {
            name: "web",
            type_: "ClusterIP",
            cluster_ips: &[],
            families: &[],
            policy: "SingleStack",
            ports: &[("http", 80, "TCP", 8080, None)],
            labels: json!({}),
        }
    }
}

pub(crate) fn service(s: &Svc<'_>) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|(name, port, protocol, target, node_port)| {
            let mut p =
                json!({"name": name, "protocol": protocol, "port": port, "targetPort": target});
            if let Some(node_port) = node_port {
                p["nodePort"] = json!(node_port);
            }
            p
        })
        .collect();
    let mut labels = s.labels.clone();
    labels["app"] = json!(s.name);
    let mut spec = json!({
        "ports": ports,
        "selector": {"app": s.name},
        "clusterIP": s.cluster_ips.first().copied().unwrap_or("None"),
        "clusterIPs": s.cluster_ips,
        "type": s.type_,
        "sessionAffinity": "None",
        "ipFamilies": s.families,
        "ipFamilyPolicy": s.policy,
        "internalTrafficPolicy": "Cluster",
    });
    if s.type_ == "NodePort" {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": s.name,
            "namespace": "default",
            "uid": uid(s.name),
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}\n"},
            "managedFields": managed_fields("kubectl-client-side-apply"),
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    })
}

fn external_name(name: &str) -> Value {
    json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "default", "uid": uid(name), "resourceVersion": "1",
            "creationTimestamp": CREATED},
        "spec": {"type": "ExternalName", "externalName": "db.example.com", "sessionAffinity": "None"},
        "status": {"loadBalancer": {}}})
}

/// `web`'s IPv4 slice `web-abc12` with one ready endpoint ADDRESS on
/// its `http` port: what a test writes again and again to make changes.
pub(crate) fn web_slice_one(address: &str) -> Value {
    slice(
        "web-abc12",
        "web",
        "IPv4",
        &[(address, true)],
        &[("http", 8080, "TCP")],
    )
}

/// A slice of SERVICE; ENDPOINTS are (address, ready).
pub(crate) fn slice(
    name: &str,
    service: &str,
    address_type: &str,
    endpoints: &[(&str, bool)],
    ports: &[(&str, u16, &str)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (addr, ready))| {
            json!({"addresses": [addr],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": NODE, "zone": "zone-a",
                "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("{service}-{i}"),
                    "uid": uid(&format!("{service}-{i}"))}})
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port, protocol)| json!({"name": name, "protocol": protocol, "port": port}))
        .collect();
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": "default",
            "uid": uid(name),
            "resourceVersion": "1",
            "generation": 1,
            "creationTimestamp": CREATED,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app": service,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": CREATED},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                "uid": uid(service), "controller": true, "blockOwnerDeletion": true}],
            "managedFields": managed_fields("kube-controller-manager"),
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    })
}

pub(crate) fn node(addresses: &[(&str, &str)]) -> Value {
    let mut addrs: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    addrs.push(json!({"type": "Hostname", "address": NODE}));
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": NODE,
            "uid": uid(NODE),
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
            "labels": {
                "kubernetes.io/hostname": NODE,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": "zone-a",
                "topology.kubernetes.io/region": "region-1",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": managed_fields("kubelet"),
        },
        "spec": {"podCIDR": "198.18.0.0/24", "podCIDRs": ["198.18.0.0/24", "fd00:18::/64"]},
        "status": {
            "addresses": addrs,
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status", "lastHeartbeatTime": CREATED,
                "lastTransitionTime": CREATED}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b",
                "kernelVersion": "6.12.0", "osImage": "Debian GNU/Linux 13",
                "containerRuntimeVersion": "containerd://2.0.0", "kubeletVersion": "v1.33.0",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        },
    })
}

#[expect(clippy::too_many_lines, reason = "the fixture: a list of objects")]
pub(crate) fn dual_stack_objects() -> Vec<(Res, Value)> {
    vec![
        (
            Res::Services,
            service(&Svc {
                cluster_ips: &["198.19.0.10", "fd00:96::10"],
                families: &["IPv4", "IPv6"],
                policy: "RequireDualStack",
                ports: &[
                    ("http", 80, "TCP", 8080, None),
                    ("dns", 53, "UDP", 8053, None),
                ],
                ..Svc::default()
            }),
        ),
        (
            Res::Services,
            service(&Svc {
                name: "np",
                type_: "NodePort",
                cluster_ips: &["fd00:96::20", "198.19.0.20"],
                families: &["IPv6", "IPv4"],
                policy: "PreferDualStack",
                ports: &[("http", 80, "TCP", 8080, Some(30080))],
                ..Svc::default()
            }),
        ),
        // Handed to another proxy: left out by the API server (the watch's
        // label selector), and by the model too, as in the file source.
        (
            Res::Services,
            service(&Svc {
                name: "other-proxy",
                cluster_ips: &["198.19.0.30"],
                families: &["IPv4"],
                labels: json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
                ..Svc::default()
            }),
        ),
        (Res::Services, external_name("db")),
        (
            Res::Services,
            service(&Svc {
                name: "headless",
                families: &["IPv4", "IPv6"],
                policy: "RequireDualStack",
                ..Svc::default()
            }),
        ),
        (
            Res::Slices,
            slice(
                "web-abc12",
                "web",
                "IPv4",
                &[
                    ("198.18.2.2", true),
                    ("198.18.3.2", true),
                    ("198.18.4.2", false),
                ],
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "web-def34",
                "web",
                "IPv6",
                &[("fd00:2::2", true), ("fd00:3::2", true)],
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "web-fqdn",
                "web",
                "FQDN",
                &[("web.example.com", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-v4",
                "np",
                "IPv4",
                &[("198.18.5.2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-v6",
                "np",
                "IPv6",
                &[("fd00:5::2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Nodes,
            node(&[
                ("InternalIP", "198.18.0.1"),
                ("InternalIP", "fd00:18::1"),
                ("ExternalIP", "198.18.100.1"),
            ]),
        ),
    ]
}

pub(crate) fn proxy_label() -> Value {
    json!({"service.kubernetes.io/service-proxy-name": "someone-else"})
}

/// `web` with its slice; `other` (another proxy's) and `hl` (headless) with
/// theirs, labelled as the `EndpointSlice` controller labels them.
pub(crate) fn objects_with_ignored_ones(web: &Svc<'_>) -> Vec<(Res, Value)> {
    let mut other_slice = slice(
        "other-1",
        "other",
        "IPv4",
        &[("198.18.7.2", true)],
        &[("http", 8080, "TCP")],
    );
    other_slice["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] =
        json!("someone-else");
    let mut headless_slice = slice(
        "hl-1",
        "hl",
        "IPv4",
        &[("198.18.8.2", true)],
        &[("http", 8080, "TCP")],
    );
    headless_slice["metadata"]["labels"][HEADLESS_LABEL] = json!("");
    vec![
        (Res::Services, service(web)),
        (
            Res::Slices,
            slice(
                "web-1",
                "web",
                "IPv4",
                &[("198.18.2.2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Services,
            service(&Svc {
                name: "other",
                cluster_ips: &["198.19.0.30"],
                families: &["IPv4"],
                labels: proxy_label(),
                ..Svc::default()
            }),
        ),
        (Res::Slices, other_slice),
        (
            Res::Services,
            service(&Svc {
                name: "hl",
                families: &["IPv4"],
                ..Svc::default()
            }),
        ),
        (Res::Slices, headless_slice),
        (Res::Nodes, node(&[("InternalIP", "198.18.0.1")])),
    ]
}
