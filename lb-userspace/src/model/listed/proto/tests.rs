//! The protobuf reading gives what the JSON reading gives, field by field
//! (numbers from `k8s.io/api`'s `generated.proto`), and refuses a body it
//! cannot read with an error that says why.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::super::wire::write::Message;
use super::*;

/// `metadata` as a cluster writes it: fields the model does not read
/// (uid, generation, owner, managed fields, a label) next to those it does.
fn meta(name: &str, created: bool) -> Message {
    let mut meta = Message::default()
        .str(1, name)
        .str(2, "")
        .str(3, "shop")
        .str(5, "5f0c-uid")
        .str(6, "42")
        .int(7, 3)
        .entry(11, "app", "web")
        .entry(11, "kubernetes.io/service-name", "web")
        .entry(
            12,
            "endpoints.kubernetes.io/last-change-trigger-time",
            "2026-12-01T10:00:00Z",
        )
        .message(13, &Message::default().str(1, "v1").str(2, "Service"))
        .message(17, &Message::default().str(1, "kube-controller-manager"));
    if created {
        // 2026-12-01T10:00:00Z.
        meta = meta.message(8, &Message::default().int(1, 1_796_119_200));
    }
    meta
}

fn meta_json(name: &str, created: bool) -> serde_json::Value {
    let mut meta = json!({
        "name": name, "namespace": "shop", "uid": "5f0c-uid", "resourceVersion": "42",
        "generation": 3,
        "labels": {"app": "web", "kubernetes.io/service-name": "web"},
        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T10:00:00Z"},
        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u"}],
        "managedFields": [{"manager": "kube-controller-manager"}],
    });
    if created {
        meta["creationTimestamp"] = json!("2026-12-01T10:00:00Z");
    }
    meta
}

fn list_of(items: &[Message], rv: &str, continue_token: &str, kind: &str) -> Vec<u8> {
    Message::list(items, rv, continue_token).enveloped("v1", kind)
}

/// An endpoint as Go writes it: every field but the pointers that are nil.
fn endpoint(address: &str, ready: Option<bool>) -> Message {
    let mut conditions = Message::default();
    if let Some(ready) = ready {
        conditions = conditions.int(1, ready.into());
    }
    conditions = conditions.int(2, 1).int(3, 0);
    Message::default()
        .str(1, address)
        .message(2, &conditions)
        .message(4, &Message::default().str(1, "Pod").str(3, "web-0"))
}

#[test]
fn a_slice_reads_as_its_json_does() {
    let hinted = endpoint("fd00::7", Some(false))
        .str(6, "node-a")
        .str(7, "zone-a")
        .message(
            8,
            &Message::default()
                .message(1, &Message::default().str(1, "zone-a"))
                .message(2, &Message::default().str(1, "node-a")),
        );
    let two_addresses = endpoint("fd00::8", None)
        .str(1, "fd00:0::9")
        .str(1, "no-ip");
    let slice = Message::default()
        .message(1, &meta("web-abc", false))
        .message(2, &endpoint("fd00::1", Some(true)))
        .message(2, &hinted)
        .message(2, &two_addresses)
        .message(
            3,
            &Message::default().str(1, "http").str(2, "TCP").int(3, 8080),
        )
        .message(3, &Message::default().str(1, "").int(3, 9090))
        .str(4, "IPv6");
    let body = list_of(&[slice], "77", "77/shop/web-abc", "EndpointSliceList");
    let page = slice_list(&body).expect("a slice list");
    assert_eq!(page.resource_version.as_deref(), Some("77"));
    assert_eq!(page.continue_token.as_deref(), Some("77/shop/web-abc"));
    assert_eq!(
        continue_token(&body).expect("read ahead").as_deref(),
        Some("77/shop/web-abc"),
        "the token read ahead of the items is the page's"
    );
    let [listed] = <[ListedSlice; 1]>::try_from(page.items).expect("one slice");

    let conditions = |ready: Option<bool>| {
        let mut conditions = json!({"serving": true, "terminating": false});
        if let Some(ready) = ready {
            conditions["ready"] = json!(ready);
        }
        conditions
    };
    let target = json!({"kind": "Pod", "name": "web-0"});
    let from_json: ListedSlice = serde_json::from_value(json!({
        "metadata": meta_json("web-abc", false),
        "addressType": "IPv6",
        "endpoints": [
            {"addresses": ["fd00::1"], "conditions": conditions(Some(true)), "targetRef": target},
            {"addresses": ["fd00::7"], "conditions": conditions(Some(false)), "targetRef": target,
             "nodeName": "node-a", "zone": "zone-a",
             "hints": {"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node-a"}]}},
            {"addresses": ["fd00::8", "fd00:0::9", "no-ip"], "conditions": conditions(None),
             "targetRef": target},
        ],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}, {"name": "", "port": 9090}],
    }))
    .expect("a JSON slice");
    assert_eq!(EndpointSlice::from(listed), EndpointSlice::from(from_json));
}

#[test]
fn a_service_reads_as_its_json_does() {
    let port = |name: &str, port: i64, target: &Message, node_port: i64| {
        Message::default()
            .str(1, name)
            .str(2, "TCP")
            .int(3, port)
            .message(4, target)
            .int(5, node_port)
    };
    let spec = Message::default()
        .message(
            1,
            &port(
                "http",
                80,
                &Message::default().int(1, 0).int(2, 8080),
                30080,
            ),
        )
        .message(
            1,
            &port("", 443, &Message::default().int(1, 1).str(3, "https"), 0)
                .str(6, "kubernetes.io/h2c"),
        )
        .entry(2, "app", "web")
        .str(3, "10.96.0.10")
        .str(4, "LoadBalancer")
        .str(5, "192.0.2.7")
        .str(7, "ClientIP")
        .str(8, "")
        .str(9, "198.51.100.0/24")
        .str(10, "")
        .str(11, "Local")
        .int(12, 32000)
        .int(13, 0)
        .message(
            14,
            &Message::default().message(1, &Message::default().int(1, 600)),
        )
        .str(17, "PreferDualStack")
        .str(18, "10.96.0.10")
        .str(18, "fd00:96::10")
        .str(19, "IPv4")
        .str(19, "IPv6")
        .int(20, 1)
        .str(22, "Cluster");
    let ingress = Message::default()
        .str(1, "203.0.113.9")
        .str(2, "")
        .str(3, "VIP")
        .message(4, &Message::default().int(1, 80).str(2, "TCP"));
    let status = Message::default().message(1, &Message::default().message(1, &ingress));
    let service = Message::default()
        .message(1, &meta("web", true))
        .message(2, &spec)
        .message(3, &status);
    let body = list_of(&[service], "90", "", "ServiceList");
    let page = service_list(&body).expect("a Service list");
    assert_eq!(page.resource_version.as_deref(), Some("90"));
    assert_eq!(page.continue_token, None, "an empty token is the last page");
    assert_eq!(continue_token(&body).expect("read ahead"), None);
    let [listed] = <[ListedService; 1]>::try_from(page.items).expect("one Service");

    let from_json: ListedService = serde_json::from_value(json!({
        "metadata": meta_json("web", true),
        "spec": {
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080},
                {"protocol": "TCP", "port": 443, "targetPort": "https",
                 "appProtocol": "kubernetes.io/h2c"},
            ],
            "selector": {"app": "web"},
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "type": "LoadBalancer", "externalIPs": ["192.0.2.7"],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
            "loadBalancerSourceRanges": ["198.51.100.0/24"],
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
            "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"],
            "allocateLoadBalancerNodePorts": true, "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {"ingress": [
            {"ip": "203.0.113.9", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]},
        ]}},
    }))
    .expect("a JSON Service");
    assert_eq!(Service::from(listed), Service::from(from_json));
}

#[test]
fn a_status_says_what_failed() {
    let body = Message::default()
        .message(1, &Message::default())
        .str(2, "Failure")
        .str(3, "too old resource version: 5")
        .str(4, "Expired")
        .int(6, 410)
        .enveloped("v1", "Status");
    assert_eq!(
        status(&body),
        Ok(ApiStatus {
            code: 410,
            reason: "Expired".into(),
            message: "too old resource version: 5".into(),
        })
    );
}

#[test]
fn a_body_that_cannot_be_read_is_refused_with_why() {
    let slice = Message::default()
        .message(1, &meta("web-abc", false))
        .message(2, &endpoint("10.0.0.1", Some(true)));
    let body = list_of(&[slice], "7", "", "EndpointSliceList");
    // Every cut of the body before the list's message ends is refused,
    // never read as a shorter list. (The envelope's last two fields, four
    // bytes of empty strings, are not read: protobuf cannot tell a message
    // cut between two fields, and HTTP's framing says where a body ends.)
    let message_end = body.len() - 4;
    for len in 0..message_end {
        assert!(
            slice_list(&body[..len]).is_err(),
            "cut at {len} of {}",
            body.len()
        );
    }
    let whole = slice_list(&body).expect("the whole body").items;
    let without_tail = slice_list(&body[..message_end]).expect("the list").items;
    assert_eq!(
        whole
            .into_iter()
            .map(EndpointSlice::from)
            .collect::<Vec<_>>(),
        without_tail
            .into_iter()
            .map(EndpointSlice::from)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        slice_list(br#"{"kind":"EndpointSliceList"}"#).unwrap_err(),
        WireError::NoMagic
    );
    assert_eq!(
        continue_token(br#"{"metadata":{"continue":"x"}}"#).unwrap_err(),
        WireError::NoMagic,
        "no token is read ahead of a JSON page"
    );
    assert_eq!(
        service_list(&body).unwrap_err(),
        WireError::Kind {
            expected: "ServiceList",
            found: "EndpointSliceList".into()
        }
    );
    // A string that is not UTF-8, and a field of the wrong wire type.
    let bad_name = Message::default().message(1, &Message::default().bytes(1, b"\xff\xfe"));
    let err = slice_list(&list_of(&[bad_name], "7", "", "EndpointSliceList")).unwrap_err();
    assert_eq!(err, WireError::NotUtf8("ObjectMeta"));
    let bad_kept_label = Message::default().message(
        1,
        &Message::default().message(
            11,
            &Message::default()
                .str(1, "kubernetes.io/service-name")
                .bytes(2, b"\xff"),
        ),
    );
    let err = slice_list(&list_of(&[bad_kept_label], "7", "", "EndpointSliceList")).unwrap_err();
    assert_eq!(err, WireError::NotUtf8("map entry"));
    // An annotation not kept is skipped unread, whatever its bytes.
    let odd_annotation = Message::default().message(
        1,
        &Message::default().str(1, "web").message(
            12,
            &Message::default().bytes(1, b"note\xff").bytes(2, b"\xfe"),
        ),
    );
    let page = slice_list(&list_of(&[odd_annotation], "7", "", "EndpointSliceList"))
        .expect("an unread annotation is not checked");
    assert_eq!(page.items[0].metadata.annotations, None);
    let varint_address = Message::default().message(2, &Message::default().int(1, 7));
    let err = slice_list(&list_of(&[varint_address], "7", "", "EndpointSliceList")).unwrap_err();
    assert!(
        err.to_string()
            .contains("Endpoint field 1 has wire type 0, not length-delimited"),
        "{err}"
    );
}

/// Go writes a zero `meta.v1.Time` as an empty message, and its JSON as
/// `null`; it reads whole seconds only.
#[test]
fn a_zero_time_is_unset_and_seconds_are_whole() {
    let created = |time: &Message| {
        let meta = Message::default().str(1, "web").message(8, time);
        let body = list_of(
            &[Message::default().message(1, &meta)],
            "1",
            "",
            "ServiceList",
        );
        let [service] = <[ListedService; 1]>::try_from(service_list(&body).expect("a list").items)
            .expect("one Service");
        service
            .metadata
            .creation_timestamp
            .map(|time| time.0.to_string())
    };
    assert_eq!(created(&Message::default()), None);
    assert_eq!(
        created(&Message::default().int(1, 1_796_119_200).int(2, 500)),
        Some("2026-12-01T10:00:00Z".to_owned())
    );
}
