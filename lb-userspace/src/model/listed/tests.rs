//! Listed slices against the API objects they stand for.

use serde_json::{Value, json};

use crate::model::PreparedSlice;

use super::*;

/// A slice with every kind of content the model reads or skips.
fn slice_json(address_type: &str, addresses: &[&str]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abc",
            "namespace": "shop",
            "resourceVersion": "42",
            "labels": {"kubernetes.io/service-name": "web"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-02T10:00:00Z"},
        },
        "addressType": address_type,
        "endpoints": [
            {
                "addresses": addresses,
                "conditions": {"ready": false, "serving": true, "terminating": true},
                "hostname": "pod-0",
                "nodeName": "node-a",
                "zone": "z1",
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": "pod-0", "uid": "u"},
                "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]},
            },
            {"addresses": [addresses[0]]},
            {"addresses": ["fd00::1"], "conditions": {}},
        ],
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "http", "port": 8081, "protocol": "TCP"},
            {"name": "dns", "port": 70000, "protocol": "UDP"},
            {"port": 9000},
        ],
    })
}

fn both(json: &Value) -> (PreparedSlice, PreparedSlice) {
    let text = json.to_string();
    let api: EndpointSlice = serde_json::from_str(&text).expect("an EndpointSlice");
    let listed: ListedSlice = serde_json::from_str(&text).expect("a listed slice");
    (PreparedSlice::new(&api), PreparedSlice::listed(&listed))
}

#[test]
fn a_listed_slice_parses_as_the_api_object_does() {
    for json in [
        slice_json(
            "IPv4",
            &[
                "10.0.0.1",
                "010.000.000.002",
                "fd00::2",
                "not-an-ip",
                "10.0.0.3",
            ],
        ),
        slice_json("IPv6", &["fd00::a", "10.0.0.1", "fd00::b"]),
        slice_json("FQDN", &["web.example"]),
        slice_json("AppleTalk", &["10.0.0.1"]),
        json!({"metadata": {"name": "bare", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "endpoints": null, "ports": null}),
        json!({"metadata": {"name": "mine"}, "addressType": "IPv4", "endpoints": []}),
        // What k8s-openapi reads as defaults.
        json!({"metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "web"}},
               "endpoints": [{"addresses": ["10.0.0.1"]}]}),
        json!({"metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": null, "endpoints": [{"addresses": ["10.0.0.1"]}]}),
        json!({"metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "endpoints": [{"conditions": {}}, {"addresses": null}]}),
        json!({"metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "endpoints": [{"addresses": []}, {"addresses": ["10.0.0.1"]}]}),
        json!({"metadata": null, "addressType": "IPv4"}),
        // Columns filled late: the first endpoint with other than one
        // address, a node name or hints after endpoints without.
        json!({"metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": [
            {"addresses": ["10.0.0.1"]},
            {"addresses": ["10.0.0.2"], "nodeName": "node-b"},
            {"addresses": ["not-an-ip", "10.0.0.3"], "conditions": {"ready": false}},
            {"addresses": ["10.0.0.4"], "hints": {"forZones": [{"name": "z2"}]}},
            {"addresses": ["10.0.0.5"], "conditions": null, "nodeName": null},
        ]}),
    ] {
        let (api, listed) = both(&json);
        assert_eq!(listed, api, "{json}");
    }
    // Not vacuous: the first one has parsed endpoints and errors.
    let (api, _) = both(&slice_json("IPv4", &["10.0.0.1", "not-an-ip"]));
    assert!(api.entry.parsed.is_some() && !api.entry.errors.is_empty());
}

#[test]
fn an_escaped_address_is_read_as_its_text() {
    // serde_json hands an escaped string over as a copy, not the page.
    let text = r#"{"metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "web"}},
                   "addressType": "IPv4",
                   "endpoints": [{"addresses": ["10.0.0.\u0031", "10.0.0.\u0078"]}]}"#;
    let api: EndpointSlice = serde_json::from_str(text).expect("an EndpointSlice");
    let listed: ListedSlice = serde_json::from_str(text).expect("a listed slice");
    let first = listed.endpoints.iter().next().expect("an endpoint");
    assert_eq!(
        first.listed_addresses().iter().collect::<Vec<_>>(),
        [
            &ListedAddress::Ip("10.0.0.1".parse().expect("an address")),
            &ListedAddress::Invalid("10.0.0.x".into()),
        ]
    );
    assert_eq!(PreparedSlice::listed(&listed), PreparedSlice::new(&api));
}

#[test]
fn a_slice_the_api_object_cannot_be_read_as_is_not_listed_either() {
    for json in [
        json!({"metadata": {"name": "x"}, "addressType": 4}),
        json!({"metadata": {"name": "x"}, "addressType": "IPv4", "endpoints": [{"addresses": [7]}]}),
        json!({"metadata": {"name": "x"}, "addressType": "IPv4", "endpoints": {}}),
        json!({"metadata": {"name": "x"}, "addressType": "IPv4", "ports": [{"port": "80"}]}),
    ] {
        let text = json.to_string();
        assert!(
            serde_json::from_str::<EndpointSlice>(&text).is_err(),
            "{json}"
        );
        assert!(
            serde_json::from_str::<ListedSlice>(&text).is_err(),
            "{json}"
        );
    }
}

#[test]
fn an_endpoint_key_given_twice_is_refused() {
    for key in ["addresses", "conditions", "hints", "nodeName"] {
        let text = format!(
            r#"{{"addressType": "IPv4", "endpoints": [{{"{key}": null, "{key}": null}}]}}"#
        );
        let error = serde_json::from_str::<ListedSlice>(&text).expect_err(&text);
        assert!(error.to_string().contains("duplicate field"), "{error}");
    }
    // The same keys once each are read.
    let listed: ListedSlice = serde_json::from_str(
        r#"{"addressType": "IPv4", "endpoints": [{"addresses": null, "conditions": null,
            "hints": null, "nodeName": null, "zone": "z1"}]}"#,
    )
    .expect("a listed slice");
    assert_eq!(listed.endpoints.len(), 1);
}

#[test]
fn a_listed_slice_as_an_api_object_gives_the_model_the_same_slice() {
    let json = slice_json("IPv4", &["010.0.0.1", "fd00::2", "not-an-ip"]);
    let listed: ListedSlice = serde_json::from_str(&json.to_string()).expect("a listed slice");
    let api = EndpointSlice::from(listed.clone());
    assert_eq!(PreparedSlice::new(&api), PreparedSlice::listed(&listed));
    let first = &api.endpoints.as_deref().unwrap_or_default()[0];
    assert_eq!(first.addresses, ["10.0.0.1", "fd00::2", "not-an-ip"]);
    assert_eq!(first.node_name.as_deref(), Some("node-a"));
}

#[test]
fn a_listed_slice_keeps_only_the_metadata_the_model_reads() {
    let json = json!({
        "metadata": {
            "name": "web-abc", "namespace": "shop", "resourceVersion": "42",
            "uid": "5f0c", "generateName": "web-", "generation": 3,
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {
                "app": "web",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": "web",
                "service.kubernetes.io/headless": "",
            },
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": "2026-12-02T10:00:00Z",
                "note": "kept by nobody",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "1a2b"}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}}}],
        },
        "addressType": "IPv4",
    });
    let listed: ListedSlice = serde_json::from_value(json.clone()).expect("a listed slice");
    let meta = &listed.metadata;
    assert_eq!(
        (
            meta.name.as_deref(),
            meta.namespace.as_deref(),
            meta.resource_version.as_deref()
        ),
        (Some("web-abc"), Some("shop"), Some("42"))
    );
    let keys = |map: &Option<std::collections::BTreeMap<String, String>>| {
        map.iter()
            .flatten()
            .map(|(key, _)| key.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(&meta.labels),
        [
            "kubernetes.io/service-name",
            "service.kubernetes.io/headless"
        ]
    );
    assert_eq!(
        keys(&meta.annotations),
        ["endpoints.kubernetes.io/last-change-trigger-time"]
    );
    assert!(meta.uid.is_none() && meta.managed_fields.is_none() && meta.owner_references.is_none());
    // The model makes the same of it as of the API object.
    let api: EndpointSlice = serde_json::from_value(json).expect("an EndpointSlice");
    assert_eq!(PreparedSlice::listed(&listed), PreparedSlice::new(&api));
}

#[test]
fn metadata_is_checked_where_it_is_kept_and_not_elsewhere() {
    // What is not kept is not read: a value the API object refuses there
    // does not lose the slice.
    for metadata in [
        json!({"name": "x", "creationTimestamp": "not a time"}),
        json!({"name": "x", "labels": {"app": 7}}),
        json!({"name": "x", "generation": "three"}),
    ] {
        let json = json!({"metadata": metadata});
        assert!(
            serde_json::from_value::<EndpointSlice>(json.clone()).is_err(),
            "{json}"
        );
        let listed: ListedSlice =
            serde_json::from_value(json.clone()).unwrap_or_else(|error| panic!("{json}: {error}"));
        assert_eq!(listed.metadata.name.as_deref(), Some("x"));
    }
    // What is kept is read as the API object reads it.
    for metadata in [
        json!({"name": 7}),
        json!({"labels": {"kubernetes.io/service-name": null}}),
        json!({"annotations": {"endpoints.kubernetes.io/last-change-trigger-time": 1}}),
        json!({"labels": ["kubernetes.io/service-name"]}),
    ] {
        let json = json!({"metadata": metadata});
        assert!(
            serde_json::from_value::<EndpointSlice>(json.clone()).is_err(),
            "{json}"
        );
        assert!(
            serde_json::from_value::<ListedSlice>(json.clone()).is_err(),
            "{json}"
        );
    }
    // `null`s, and a key given twice (the last one counts).
    let listed: ListedSlice = serde_json::from_str(
        r#"{"metadata": {"name": "a", "name": "b", "labels": null, "annotations": null,
                         "namespace": null}}"#,
    )
    .expect("a listed slice");
    assert_eq!(listed.metadata.name.as_deref(), Some("b"));
    assert!(listed.metadata.labels.is_none() && listed.metadata.namespace.is_none());
    let listed: ListedSlice =
        serde_json::from_str(r#"{"metadata": null}"#).expect("a listed slice");
    assert_eq!(listed.metadata, ObjectMeta::default());
}
