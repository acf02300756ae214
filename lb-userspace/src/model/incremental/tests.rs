//! Property tests of [`Incremental`] against the full [`build`], and its
//! handling of duplicates and resource versions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::test_fixtures::{ip, node_a};
use crate::model::{
    FrontendChanges, Incremental, NodeContext, ObjectKey, SERVICE_NAME_LABEL, build, key_of,
};
use crate::test_rng::Rng;
use crate::testing::{EndpointBuilder, IpFamily, ServiceBuilder, SliceBuilder};

/// A random Service from a small space, so that Services often collide
/// on a `ClusterIP` or health check port and change type and policy.
fn random_service(rng: &mut Rng) -> Service {
    let name = format!("svc-{}", rng.below(6));
    let namespace = rng.pick(&["a", "b"]);
    let v4 = format!("10.0.0.{}", rng.below(5) + 1);
    let v6 = format!("fd00::{}", rng.below(5) + 1);
    let cluster_ips = match rng.below(3) {
        0 => vec![v4],
        1 => vec![v6],
        _ => vec![v4, v6],
    };
    let type_ = rng.pick(&["ClusterIP", "NodePort", "LoadBalancer"]);
    let local = rng.below(3) == 0;
    let port = 80 + rng.below(2);
    let node_port = 30000 + rng.below(3);
    let health_check_port = (local && type_ != "ClusterIP").then(|| 32000 + rng.below(2));
    let protocol = if rng.below(4) == 0 { "SCTP" } else { "TCP" };
    let ingress_ip = format!("192.0.2.{}", rng.below(3) + 1);
    let mut service = ServiceBuilder::new(namespace, &name)
        .type_(type_)
        .ips(cluster_ips.iter().map(String::as_str))
        .named_target_port("http", small(port), protocol, "http")
        .node_port_of_last(small(node_port))
        .external_traffic_policy(if local { "Local" } else { "Cluster" })
        .ingress_ip(&ingress_ip);
    if let Some(port) = health_check_port {
        service = service.health_check_node_port(small(port));
    }
    // Contested frontends go to the oldest: creation times that differ,
    // tie, or are missing.
    if rng.below(4) != 0 {
        service = service.created(1_700_000_000 + i64::from(small(rng.below(3))));
    }
    service.build()
}

fn random_slice(rng: &mut Rng) -> EndpointSlice {
    let service = format!("svc-{}", rng.below(6));
    let name = format!("{service}-{}", rng.below(3));
    let namespace = rng.pick(&["a", "b"]);
    let family = if rng.below(2) == 0 {
        IpFamily::V4
    } else {
        IpFamily::V6
    };
    let mut slice = SliceBuilder::for_service(namespace, &service, family).name(&name);
    for _ in 0..rng.below(4) {
        let host = rng.below(6) + 1;
        let address = if rng.below(10) == 0 {
            "not-an-ip".to_owned()
        } else if family == IpFamily::V4 {
            format!("10.1.0.{host}")
        } else {
            format!("fd01::{host}")
        };
        let node_name = rng.pick(&["node-a", "node-b"]);
        slice = slice.endpoint(
            EndpointBuilder::new(&address)
                .node(node_name)
                .ready(rng.below(3) != 0)
                .serving(true)
                .terminating(rng.below(3) == 0),
        );
    }
    if rng.below(8) == 0 {
        slice = slice.without_service();
    }
    slice
        .port("http", small(8080 + rng.below(2)), "TCP")
        .build()
}

/// A small random number as the API's `i32`.
fn small(number: u64) -> i32 {
    i32::try_from(number).unwrap()
}

/// Applying random changes one by one gives, after every commit, what a
/// full build over the same objects gives, and the reported changes are
/// exactly the frontends that differ from the previous commit (also after
/// a commit for a full plan, which reports none).
#[test]
fn incremental_model_matches_full_build_after_every_change() {
    let nodes = [
        node_a(),
        NodeContext {
            name: "node-b".into(),
            addresses: vec![ip("192.168.1.11")],
            zone: None,
            ..NodeContext::default()
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
                            model.upsert_service(&service);
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
            // Some commits are for a plan over everything (the agent's
            // first sync, or one after a failed write): no changes.
            let for_full_plan = rng.below(5) == 0;
            let changes = if for_full_plan {
                model.commit_for_full_plan();
                FrontendChanges::new()
            } else {
                model.commit()
            };
            let expected = build(&services, &slices, &node);
            assert_eq!(model.model(), expected, "seed {seed} step {step}");
            assert!(model.claims_match_entries(), "seed {seed} step {step}");
            if for_full_plan {
                previous = expected.frontends;
                continue;
            }
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
    changed.endpoints = Some(vec![EndpointBuilder::new("10.1.0.99").build()]);
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
    edited.endpoints = Some(vec![EndpointBuilder::new("10.1.0.99").build()]);
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
