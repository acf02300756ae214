//! What the kube source's list thread spends on one page of
//! `EndpointSlice`s (and of Services): parsed from the page's text as
//! kube-rs parses a list (`serde_json::from_str` into
//! `ObjectList<ListedSlice>`), then prepared into the model's records and
//! dropped, as `Trackers::take_changes` does.
//!
//! ```text
//! list_profile [--rounds N] [--only LABEL-PREFIX]
//! ```
//!
//! The page is 500 slices shaped as `lb-bench`'s stand-in API server
//! serves them (10 endpoints, one port, a service-name label, a
//! `resourceVersion`), and again with what a cluster's API server adds
//! (owner, labels, managed fields; each endpoint's pod, node and zone).
//! Prints the time per object of each step. On a machine whose speed
//! moves from run to run, run one step under `valgrind --tool=callgrind`
//! (and `--only nothing` for the cost of making the pages) for counts of
//! instructions that do not.

#![expect(
    clippy::cast_precision_loss,
    reason = "times printed as nanoseconds per slice"
)]

use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use kube::core::ObjectList;
use lb_userspace::model::{ListedService, ListedSlice, PreparedService, PreparedSlice};
use serde_json::{Value, json};

/// Slices (and Services) per page: kube-rs's watcher lists 500 at a time.
const PAGE: u32 = 500;

fn slice_json(i: u32, ipv4: bool) -> Value {
    let (suffix, kind) = if ipv4 { ("v4", "IPv4") } else { ("v6", "IPv6") };
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("svc-{i}-{suffix}"),
            "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
            "resourceVersion": (1000 + i).to_string(),
        },
        "addressType": kind,
        "endpoints": (0..10u32).map(|b| {
            let addr = if ipv4 {
                format!("10.{}.{}.{}", i >> 8 & 0xff, i & 0xff, b + 1)
            } else {
                format!("fd00::{:x}:{:x}", i, b + 1)
            };
            json!({
                "addresses": [addr],
                "conditions": {"ready": true, "serving": true, "terminating": false},
            })
        }).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

/// SLICE as an API server serves what kube-controller-manager wrote: the
/// metadata it adds (owner, labels copied from the Service, the trigger
/// time, the fields it manages) and each endpoint's pod, node and zone.
fn as_in_a_cluster(mut slice: Value, i: u32) -> Value {
    let meta = &mut slice["metadata"];
    meta["generateName"] = json!(format!("svc-{i}-"));
    meta["uid"] = json!(format!("6c1e4f2a-0b7d-4c3e-9a51-{i:012x}"));
    meta["generation"] = json!(3);
    meta["creationTimestamp"] = json!("2026-12-01T10:00:00Z");
    meta["labels"]["app"] = json!(format!("svc-{i}"));
    meta["labels"]["endpointslice.kubernetes.io/managed-by"] =
        json!("endpointslice-controller.k8s.io");
    meta["annotations"] =
        json!({"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T10:00:00Z"});
    meta["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Service",
        "name": format!("svc-{i}"), "uid": format!("0d9b7a31-5e2c-4f6a-8b1d-{i:012x}"),
        "controller": true, "blockOwnerDeletion": true}]);
    meta["managedFields"] = json!([{"manager": "kube-controller-manager", "operation": "Update",
    "apiVersion": "discovery.k8s.io/v1", "time": "2026-12-01T10:00:00Z",
    "fieldsType": "FieldsV1", "fieldsV1": {
        "f:addressType": {}, "f:endpoints": {}, "f:ports": {},
        "f:metadata": {
            "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
            "f:generateName": {},
            "f:labels": {".": {}, "f:app": {}, "f:endpointslice.kubernetes.io/managed-by": {},
                         "f:kubernetes.io/service-name": {}},
            "f:ownerReferences": {".": {}, "k:{\"uid\":\"0d9b7a31\"}": {}},
        }}}]);
    if let Some(endpoints) = slice["endpoints"].as_array_mut() {
        for (b, endpoint) in endpoints.iter_mut().enumerate() {
            endpoint["targetRef"] = json!({"kind": "Pod", "namespace": "bench",
                "name": format!("svc-{i}-{b}"), "uid": format!("9f3a2c1d-7e6b-4a5f-8c2d-{i:08x}{b:04x}")});
            endpoint["nodeName"] = json!(format!("node-{}", b % 3));
            endpoint["zone"] = json!(format!("zone-{}", b % 3));
        }
    }
    slice
}

fn service_json(i: u32) -> Value {
    let v4 = format!("10.96.{}.{}", i >> 8 & 0xff, i & 0xff);
    let v6 = format!("fd00:96::{i:x}");
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench",
                     "resourceVersion": (1000 + i).to_string()},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": v4,
            "clusterIPs": [v4, v6],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

/// A page as kube-rs reads it: text, parsed with `serde_json::from_str`.
/// SERVICE as an API server serves one applied with kubectl: the
/// last-applied copy of it in an annotation, labels, the fields each
/// manager set.
fn service_in_a_cluster(mut service: Value, i: u32) -> Value {
    let applied = service.to_string();
    let meta = &mut service["metadata"];
    meta["uid"] = json!(format!("0d9b7a31-5e2c-4f6a-8b1d-{i:012x}"));
    meta["creationTimestamp"] = json!("2026-12-01T10:00:00Z");
    meta["labels"] = json!({"app": format!("svc-{i}"), "tier": "web"});
    meta["annotations"] = json!({"kubectl.kubernetes.io/last-applied-configuration": applied});
    meta["managedFields"] = json!([{"manager": "kubectl-client-side-apply", "operation": "Update",
        "apiVersion": "v1", "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                           "f:labels": {".": {}, "f:app": {}, "f:tier": {}}},
            "f:spec": {"f:internalTrafficPolicy": {}, "f:ipFamilies": {}, "f:ipFamilyPolicy": {},
                       "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {
                           ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                       "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}}]);
    let spec = &mut service["spec"];
    spec["selector"] = json!({"app": format!("svc-{i}")});
    spec["sessionAffinity"] = json!("None");
    spec["internalTrafficPolicy"] = json!("Cluster");
    service["status"] = json!({"loadBalancer": {}});
    service
}

fn page(kind: &str, items: &[Value]) -> String {
    serde_json::to_string(&json!({
        "apiVersion": "v1", "kind": kind,
        "metadata": {"resourceVersion": "99999", "continue": "token"},
        "items": items,
    }))
    .unwrap_or_default()
}

/// PAGE read as kube-rs reads a list.
fn list<T: serde::de::DeserializeOwned + Clone>(page: &str) -> ObjectList<T> {
    serde_json::from_str(page).unwrap_or_else(|e| panic!("page: {e}"))
}

/// Runs STEP ROUNDS times over a page of PAGE objects; prints ns per object.
/// Only the steps whose label starts with `--only`'s value, if given.
fn timed(label: &str, rounds: u32, mut step: impl FnMut()) {
    let only = std::env::args().skip_while(|arg| arg != "--only").nth(1);
    if only.is_some_and(|only| !label.starts_with(&only)) {
        return;
    }
    let start = Instant::now();
    for _ in 0..rounds {
        step();
    }
    let per = start.elapsed().as_nanos() as f64 / f64::from(rounds * PAGE);
    println!("{label:<36} {per:>8.0} ns an object");
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: u32 = match args.iter().position(|a| a == "--rounds") {
        Some(at) => args.get(at + 1).map_or(Ok(20), |n| n.parse())?,
        None => 20,
    };
    let slices = page(
        "EndpointSliceList",
        &(0..PAGE)
            .map(|i| slice_json(i, i % 2 == 0))
            .collect::<Vec<_>>(),
    );
    let cluster_slices = page(
        "EndpointSliceList",
        &(0..PAGE)
            .map(|i| as_in_a_cluster(slice_json(i, i % 2 == 0), i))
            .collect::<Vec<_>>(),
    );
    let services = page(
        "ServiceList",
        &(0..PAGE).map(service_json).collect::<Vec<_>>(),
    );
    let cluster_services = page(
        "ServiceList",
        &(0..PAGE)
            .map(|i| service_in_a_cluster(service_json(i), i))
            .collect::<Vec<_>>(),
    );

    timed("slices parsed", rounds, || {
        let list: ObjectList<ListedSlice> = list(&slices);
        drop(std::hint::black_box(list));
    });
    for (label, page) in [
        ("slices parsed + prepared", &slices),
        ("cluster slices parsed + prepared", &cluster_slices),
    ] {
        timed(label, rounds, || {
            let list: ObjectList<ListedSlice> = list(page);
            let prepared: Vec<PreparedSlice> =
                list.items.iter().map(PreparedSlice::listed).collect();
            drop(list);
            drop(std::hint::black_box(prepared));
        });
    }
    for (label, page) in [
        ("services parsed + prepared", &services),
        ("cluster services parsed + prepared", &cluster_services),
    ] {
        timed(label, rounds, || {
            let list: ObjectList<ListedService> = list(page);
            let prepared: Vec<PreparedService> = list
                .items
                .into_iter()
                .map(|service| PreparedService::new(&Service::from(service)))
                .collect();
            drop(std::hint::black_box(prepared));
        });
    }
    Ok(())
}
