//! The stand-in API server's protobuf: Services, `EndpointSlice`s and
//! their lists, written from their JSON as the real API server
//! writes them for a client that accepts
//! `application/vnd.kubernetes.protobuf` (kube-proxy's choice, and the
//! agent's). Field numbers are `k8s.io/api`'s and `k8s.io/apimachinery`'s
//! `generated.proto`.
//!
//! Also compiled into `lb-bench` beside `api_server.rs`. A JSON key this
//! schema does not know is an error of the test that wrote the object:
//! it panics, naming the key, rather than sending less than was written.

use serde_json::Value;

/// How a field is written.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    Int,
    Bool,
    /// `meta.v1.Time` from RFC 3339 text.
    Time,
    /// `intstr.IntOrString` from a number or a string.
    IntOrString,
    /// `map<string, string>`.
    Map,
    /// `meta.v1.FieldsV1`: a message whose one field is the JSON text.
    FieldsV1,
    Msg(&'static [Field]),
}

/// One field of a message: its JSON key, number and type; a JSON array
/// is a repeated field.
#[derive(Clone, Copy)]
pub(crate) struct Field(&'static str, u32, Ty);

use Ty::{Bool, FieldsV1, Int, IntOrString, Map, Msg, Str, Time};

const OWNER_REFERENCE: &[Field] = &[
    Field("kind", 1, Str),
    Field("name", 3, Str),
    Field("uid", 4, Str),
    Field("apiVersion", 5, Str),
    Field("controller", 6, Bool),
    Field("blockOwnerDeletion", 7, Bool),
];
const MANAGED_FIELDS_ENTRY: &[Field] = &[
    Field("manager", 1, Str),
    Field("operation", 2, Str),
    Field("apiVersion", 3, Str),
    Field("time", 4, Time),
    Field("fieldsType", 6, Str),
    Field("fieldsV1", 7, FieldsV1),
    Field("subresource", 8, Str),
];
const OBJECT_META: &[Field] = &[
    Field("name", 1, Str),
    Field("generateName", 2, Str),
    Field("namespace", 3, Str),
    Field("selfLink", 4, Str),
    Field("uid", 5, Str),
    Field("resourceVersion", 6, Str),
    Field("generation", 7, Int),
    Field("creationTimestamp", 8, Time),
    Field("deletionTimestamp", 9, Time),
    Field("deletionGracePeriodSeconds", 10, Int),
    Field("labels", 11, Map),
    Field("annotations", 12, Map),
    Field("ownerReferences", 13, Msg(OWNER_REFERENCE)),
    Field("finalizers", 14, Str),
    Field("managedFields", 17, Msg(MANAGED_FIELDS_ENTRY)),
];
const LIST_META: &[Field] = &[
    Field("selfLink", 1, Str),
    Field("resourceVersion", 2, Str),
    Field("continue", 3, Str),
    Field("remainingItemCount", 4, Int),
];
const SERVICE_PORT: &[Field] = &[
    Field("name", 1, Str),
    Field("protocol", 2, Str),
    Field("port", 3, Int),
    Field("targetPort", 4, IntOrString),
    Field("nodePort", 5, Int),
    Field("appProtocol", 6, Str),
];
const CLIENT_IP_CONFIG: &[Field] = &[Field("timeoutSeconds", 1, Int)];
const SESSION_AFFINITY_CONFIG: &[Field] = &[Field("clientIP", 1, Msg(CLIENT_IP_CONFIG))];
const SERVICE_SPEC: &[Field] = &[
    Field("ports", 1, Msg(SERVICE_PORT)),
    Field("selector", 2, Map),
    Field("clusterIP", 3, Str),
    Field("type", 4, Str),
    Field("externalIPs", 5, Str),
    Field("sessionAffinity", 7, Str),
    Field("loadBalancerIP", 8, Str),
    Field("loadBalancerSourceRanges", 9, Str),
    Field("externalName", 10, Str),
    Field("externalTrafficPolicy", 11, Str),
    Field("healthCheckNodePort", 12, Int),
    Field("publishNotReadyAddresses", 13, Bool),
    Field("sessionAffinityConfig", 14, Msg(SESSION_AFFINITY_CONFIG)),
    Field("ipFamilyPolicy", 17, Str),
    Field("clusterIPs", 18, Str),
    Field("ipFamilies", 19, Str),
    Field("allocateLoadBalancerNodePorts", 20, Bool),
    Field("loadBalancerClass", 21, Str),
    Field("internalTrafficPolicy", 22, Str),
    Field("trafficDistribution", 23, Str),
];
const PORT_STATUS: &[Field] = &[
    Field("port", 1, Int),
    Field("protocol", 2, Str),
    Field("error", 3, Str),
];
const LOAD_BALANCER_INGRESS: &[Field] = &[
    Field("ip", 1, Str),
    Field("hostname", 2, Str),
    Field("ipMode", 3, Str),
    Field("ports", 4, Msg(PORT_STATUS)),
];
const LOAD_BALANCER_STATUS: &[Field] = &[Field("ingress", 1, Msg(LOAD_BALANCER_INGRESS))];
const CONDITION: &[Field] = &[
    Field("type", 1, Str),
    Field("status", 2, Str),
    Field("observedGeneration", 3, Int),
    Field("lastTransitionTime", 4, Time),
    Field("reason", 5, Str),
    Field("message", 6, Str),
];
const SERVICE_STATUS: &[Field] = &[
    Field("loadBalancer", 1, Msg(LOAD_BALANCER_STATUS)),
    Field("conditions", 2, Msg(CONDITION)),
];
/// `core.v1.Service`, without `kind` and `apiVersion` (the envelope's).
pub(crate) const SERVICE: &[Field] = &[
    Field("metadata", 1, Msg(OBJECT_META)),
    Field("spec", 2, Msg(SERVICE_SPEC)),
    Field("status", 3, Msg(SERVICE_STATUS)),
];
const ENDPOINT_CONDITIONS: &[Field] = &[
    Field("ready", 1, Bool),
    Field("serving", 2, Bool),
    Field("terminating", 3, Bool),
];
const OBJECT_REFERENCE: &[Field] = &[
    Field("kind", 1, Str),
    Field("namespace", 2, Str),
    Field("name", 3, Str),
    Field("uid", 4, Str),
    Field("apiVersion", 5, Str),
    Field("resourceVersion", 6, Str),
    Field("fieldPath", 7, Str),
];
const FOR_NAME: &[Field] = &[Field("name", 1, Str)];
const ENDPOINT_HINTS: &[Field] = &[
    Field("forZones", 1, Msg(FOR_NAME)),
    Field("forNodes", 2, Msg(FOR_NAME)),
];
const ENDPOINT: &[Field] = &[
    Field("addresses", 1, Str),
    Field("conditions", 2, Msg(ENDPOINT_CONDITIONS)),
    Field("hostname", 3, Str),
    Field("targetRef", 4, Msg(OBJECT_REFERENCE)),
    Field("deprecatedTopology", 5, Map),
    Field("nodeName", 6, Str),
    Field("zone", 7, Str),
    Field("hints", 8, Msg(ENDPOINT_HINTS)),
];
const ENDPOINT_PORT: &[Field] = &[
    Field("name", 1, Str),
    Field("protocol", 2, Str),
    Field("port", 3, Int),
    Field("appProtocol", 4, Str),
];
/// `discovery.v1.EndpointSlice`, without `kind` and `apiVersion`.
pub(crate) const ENDPOINT_SLICE: &[Field] = &[
    Field("metadata", 1, Msg(OBJECT_META)),
    Field("endpoints", 2, Msg(ENDPOINT)),
    Field("ports", 3, Msg(ENDPOINT_PORT)),
    Field("addressType", 4, Str),
];

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value.to_le_bytes()[0] | 0x80);
        value >>= 7;
    }
    out.push(value.to_le_bytes()[0]);
}

fn key(out: &mut Vec<u8>, number: u32, wire_type: u8) {
    varint(out, u64::from(number) << 3 | u64::from(wire_type));
}

fn bytes_field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    key(out, number, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Seconds since the epoch of RFC 3339 TEXT in UTC (`...Z`; fractions of
/// a second dropped, as `meta.v1.Time` keeps whole seconds).
fn epoch_seconds(text: &str) -> i64 {
    assert!(
        text.ends_with('Z'),
        "the stand-in writes UTC times only: {text:?}"
    );
    let number = |range: std::ops::Range<usize>| -> i64 {
        text.get(range)
            .and_then(|digits| digits.parse().ok())
            .unwrap_or_else(|| panic!("not an RFC 3339 time: {text:?}"))
    };
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    let (hour, minute, second) = (number(11..13), number(14..16), number(17..19));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + hour * 3_600 + minute * 60 + second
}

fn write_value(out: &mut Vec<u8>, field: Field, value: &Value) {
    let Field(name, number, ty) = field;
    match (ty, value) {
        (_, Value::Null) => {}
        (Ty::Str, Value::String(text)) => bytes_field(out, number, text.as_bytes()),
        (Ty::Int, Value::Number(n)) => {
            key(out, number, 0);
            let n = n
                .as_i64()
                .unwrap_or_else(|| panic!("{name}: not an integer"));
            varint(out, n.cast_unsigned());
        }
        (Ty::Bool, Value::Bool(b)) => {
            key(out, number, 0);
            varint(out, u64::from(*b));
        }
        (Ty::Time, Value::String(text)) => {
            let mut time = Vec::new();
            key(&mut time, 1, 0);
            varint(&mut time, epoch_seconds(text).cast_unsigned());
            bytes_field(out, number, &time);
        }
        (Ty::IntOrString, value) => {
            let mut inner = Vec::new();
            match value {
                Value::Number(n) => {
                    key(&mut inner, 1, 0);
                    varint(&mut inner, 0);
                    key(&mut inner, 2, 0);
                    varint(
                        &mut inner,
                        n.as_i64().expect("an int32 port").cast_unsigned(),
                    );
                }
                Value::String(text) => {
                    key(&mut inner, 1, 0);
                    varint(&mut inner, 1);
                    bytes_field(&mut inner, 3, text.as_bytes());
                }
                other => panic!("{name}: neither a number nor a string: {other}"),
            }
            bytes_field(out, number, &inner);
        }
        (Ty::Map, Value::Object(map)) => {
            for (k, v) in map {
                let mut entry = Vec::new();
                bytes_field(&mut entry, 1, k.as_bytes());
                let text = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}.{k}: not a string"));
                bytes_field(&mut entry, 2, text.as_bytes());
                bytes_field(out, number, &entry);
            }
        }
        (Ty::FieldsV1, value) => {
            let mut inner = Vec::new();
            bytes_field(&mut inner, 1, value.to_string().as_bytes());
            bytes_field(out, number, &inner);
        }
        (Ty::Msg(schema), Value::Object(_)) => bytes_field(out, number, &message(schema, value)),
        (_, Value::Array(items)) if !matches!(ty, Ty::Map) => {
            for item in items {
                write_value(out, field, item);
            }
        }
        (_, other) => panic!("the stand-in cannot write {name} = {other}"),
    }
}

/// OBJECT as the message SCHEMA describes; `kind` and `apiVersion` are
/// the envelope's, not the message's.
pub(crate) fn message(schema: &[Field], object: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let Value::Object(map) = object else {
        panic!("not an object: {object}")
    };
    for (name, value) in map {
        let Some(field) = schema.iter().find(|field| field.0 == name) else {
            assert!(
                name == "kind" || name == "apiVersion",
                "the stand-in's protobuf has no field {name}"
            );
            continue;
        };
        write_value(&mut out, *field, value);
    }
    out
}

/// A list: its `ListMeta` (from JSON) and the items' messages, in the
/// envelope that names its kind and API version.
pub(crate) fn list(api_version: &str, kind: &str, list_meta: &Value, items: &[&[u8]]) -> Vec<u8> {
    let mut raw = Vec::new();
    bytes_field(&mut raw, 1, &message(LIST_META, list_meta));
    for item in items {
        bytes_field(&mut raw, 2, item);
    }
    enveloped(api_version, kind, &raw)
}

fn enveloped(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut type_meta = Vec::new();
    bytes_field(&mut type_meta, 1, api_version.as_bytes());
    bytes_field(&mut type_meta, 2, kind.as_bytes());
    let mut out = b"k8s\0".to_vec();
    bytes_field(&mut out, 1, &type_meta);
    bytes_field(&mut out, 2, raw);
    bytes_field(&mut out, 3, b"");
    bytes_field(&mut out, 4, b"");
    out
}
