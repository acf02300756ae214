//! Services and `EndpointSlice`s read from the API server's protobuf, as
//! kube-proxy asks for them (`application/vnd.kubernetes.protobuf`): the
//! same [`ListedService`] and [`ListedSlice`] the JSON gives, with every
//! field the model reads (a Service's `status.conditions`, which it does
//! not, are left out).
//!
//! A JSON page is mostly spent tokenizing: every key compared, every
//! skipped value still scanned. Protobuf names fields by number and skips
//! what is not read by its length, so a slice is read in a fraction of
//! the time, and the fields a cluster adds (managed fields, owner
//! references, each endpoint's pod) cost almost nothing.
//!
//! Field numbers are `k8s.io/api`'s and `k8s.io/apimachinery`'s
//! `generated.proto`. Go writes a field that is not a pointer even when it
//! is empty, where its JSON leaves it out (`omitempty`): such a field read
//! empty is unset here, as in the JSON; a pointer field is set when sent.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, PortStatus, ServicePort, ServiceSpec,
    ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    EndpointConditions, EndpointHints, EndpointPort, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{KEPT_ANNOTATIONS, KEPT_LABELS};
/// Protobuf bytes for tests, field by field.
#[cfg(test)]
pub(crate) use super::wire::write;
use super::wire::{Fields, envelope};
pub use super::wire::{MAGIC, WireError};
use super::{EndpointFields, ListedAddress, ListedEndpoints, ListedService, ListedSlice};

/// One page of a list.
#[derive(Debug)]
pub struct ListPage<T> {
    /// The items.
    pub items: Vec<T>,
    /// `metadata.resourceVersion`: the version the list is a snapshot of.
    pub resource_version: Option<String>,
    /// `metadata.continue`: where the next page starts; `None` on the last.
    pub continue_token: Option<String>,
}

/// An error the API server answered with (`meta.v1.Status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiStatus {
    /// `code`: the HTTP status.
    pub code: u16,
    /// `reason`: why, in one word (`Expired`, `Forbidden` ...).
    pub reason: String,
    /// `message`.
    pub message: String,
}

/// Reads a `ServiceList` body.
///
/// # Errors
/// When BODY is not a `ServiceList` in the API server's protobuf.
pub fn service_list(body: &[u8]) -> Result<ListPage<ListedService>, WireError> {
    list(body, "ServiceList", service)
}

/// Reads an `EndpointSliceList` body.
///
/// # Errors
/// When BODY is not an `EndpointSliceList` in the API server's protobuf.
pub fn slice_list(body: &[u8]) -> Result<ListPage<ListedSlice>, WireError> {
    list(body, "EndpointSliceList", slice)
}

/// Reads a `Status` body (what an API server answers a failed request
/// with).
///
/// # Errors
/// When BODY is not a `Status` in the API server's protobuf.
pub fn status(body: &[u8]) -> Result<ApiStatus, WireError> {
    let envelope = envelope(body)?;
    expect_kind(envelope.kind, "Status")?;
    let mut status = ApiStatus::default();
    let mut fields = Fields::new(envelope.raw, "Status");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            3 => fields.str(field, value)?.clone_into(&mut status.message),
            4 => fields.str(field, value)?.clone_into(&mut status.reason),
            6 => {
                status.code = u16::try_from(fields.int32(field, value)?)
                    .map_err(|_| WireError::Range("Status.code"))?;
            }
            _ => {}
        }
    }
    Ok(status)
}

fn expect_kind(found: &str, expected: &'static str) -> Result<(), WireError> {
    if found == expected {
        Ok(())
    } else {
        Err(WireError::Kind {
            expected,
            found: found.to_owned(),
        })
    }
}

fn list<T>(
    body: &[u8],
    kind: &'static str,
    item: fn(&[u8]) -> Result<T, WireError>,
) -> Result<ListPage<T>, WireError> {
    let envelope = envelope(body)?;
    expect_kind(envelope.kind, kind)?;
    let mut fields = Fields::new(envelope.raw, kind);
    let mut page = ListPage {
        items: Vec::with_capacity(fields.count(2)),
        resource_version: None,
        continue_token: None,
    };
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => list_meta(
                fields.bytes(field, value)?,
                &mut page.resource_version,
                &mut page.continue_token,
            )?,
            2 => page.items.push(item(fields.bytes(field, value)?)?),
            _ => {}
        }
    }
    Ok(page)
}

/// Reads a list's `metadata` (`meta.v1.ListMeta`) into its resource
/// version and continue token. (A message sent twice is merged, as Go
/// merges it: a field read later replaces one read before.)
fn list_meta(
    bytes: &[u8],
    version: &mut Option<String>,
    continue_token: &mut Option<String>,
) -> Result<(), WireError> {
    let mut meta = Fields::new(bytes, "ListMeta");
    while let Some((field, value)) = meta.next_field()? {
        match field {
            2 => *version = non_empty(meta.str(field, value)?),
            3 => *continue_token = non_empty(meta.str(field, value)?),
            _ => {}
        }
    }
    Ok(())
}

/// Where the list page in BODY says the next page starts (`None` on the
/// last), read ahead of its items (skipped by their lengths): the next
/// page can be asked for before this one is read. The page's kind is
/// checked when it is read.
///
/// # Errors
/// When BODY is not a list in the API server's protobuf.
pub fn continue_token(body: &[u8]) -> Result<Option<String>, WireError> {
    let envelope = envelope(body)?;
    let (mut version, mut continue_token) = (None, None);
    let mut fields = Fields::new(envelope.raw, "list");
    while let Some((field, value)) = fields.next_field()? {
        if field == 1 {
            list_meta(
                fields.bytes(field, value)?,
                &mut version,
                &mut continue_token,
            )?;
        }
    }
    Ok(continue_token)
}

/// A string field that Go leaves out of its JSON when empty.
fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

/// Appends a repeated string to LIST.
fn push_str(list: &mut Option<Vec<String>>, text: &str) {
    list.get_or_insert_with(Vec::new).push(text.to_owned());
}

/// Reads a map entry of strings into MAP when its key is one of KEPT.
/// Another entry is skipped unread (not even checked for UTF-8: a large
/// annotation such as kubectl's last-applied copy costs nothing).
fn kept_entry(
    bytes: &[u8],
    kept: &[&'static str],
    map: &mut Option<BTreeMap<String, String>>,
) -> Result<(), WireError> {
    let mut fields = Fields::new(bytes, "map entry");
    let (mut name, mut value) = (None, None);
    while let Some((field, item)) = fields.next_field()? {
        match field {
            1 => {
                let key = fields.bytes(field, item)?;
                name = kept.iter().find(|name| name.as_bytes() == key);
            }
            2 => value = Some(item),
            _ => {}
        }
    }
    if let Some(name) = name {
        let value = match value {
            Some(value) => fields.str(2, value)?,
            None => "",
        };
        map.get_or_insert_with(BTreeMap::new)
            .insert((*name).to_owned(), value.to_owned());
    }
    Ok(())
}

/// A map entry of strings: its key and value.
fn entry(bytes: &[u8]) -> Result<(&str, &str), WireError> {
    let mut fields = Fields::new(bytes, "map entry");
    let (mut key, mut value) = ("", "");
    while let Some((field, item)) = fields.next_field()? {
        match field {
            1 => key = fields.str(field, item)?,
            2 => value = fields.str(field, item)?,
            _ => {}
        }
    }
    Ok((key, value))
}

/// `metadata`, with what [`super::meta`] keeps of the JSON; CREATED:
/// keeping `creationTimestamp` (a Service's).
fn object_meta(bytes: &[u8], created: bool) -> Result<ObjectMeta, WireError> {
    let mut meta = ObjectMeta::default();
    let mut fields = Fields::new(bytes, "ObjectMeta");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => meta.name = non_empty(fields.str(field, value)?),
            3 => meta.namespace = non_empty(fields.str(field, value)?),
            6 => meta.resource_version = non_empty(fields.str(field, value)?),
            8 if created => meta.creation_timestamp = time(fields.bytes(field, value)?)?,
            11 => kept_entry(fields.bytes(field, value)?, KEPT_LABELS, &mut meta.labels)?,
            12 => kept_entry(
                fields.bytes(field, value)?,
                KEPT_ANNOTATIONS,
                &mut meta.annotations,
            )?,
            _ => {}
        }
    }
    Ok(meta)
}

/// A `meta.v1.Time`. Go writes the zero time as an empty message (its
/// JSON is `null`): unset. Whole seconds, as Go reads it (it drops the
/// nanoseconds, which its JSON never had).
fn time(bytes: &[u8]) -> Result<Option<Time>, WireError> {
    /// Go's zero time, 0001-01-01T00:00:00Z, should it be sent.
    const GO_ZERO_TIME: i64 = -62_135_596_800;
    if bytes.is_empty() {
        return Ok(None);
    }
    let mut seconds = 0;
    let mut fields = Fields::new(bytes, "Time");
    while let Some((field, value)) = fields.next_field()? {
        if field == 1 {
            seconds = fields.int64(field, value)?;
        }
    }
    if seconds == GO_ZERO_TIME {
        return Ok(None);
    }
    k8s_openapi::jiff::Timestamp::new(seconds, 0)
        .map(|at| Some(Time(at)))
        .map_err(|_| WireError::Range("Time"))
}

fn service(bytes: &[u8]) -> Result<ListedService, WireError> {
    let mut service = ListedService {
        metadata: ObjectMeta::default(),
        spec: None,
        status: None,
    };
    let mut fields = Fields::new(bytes, "Service");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => service.metadata = object_meta(fields.bytes(field, value)?, true)?,
            2 => service.spec = Some(service_spec(fields.bytes(field, value)?)?),
            3 => service.status = Some(service_status(fields.bytes(field, value)?)?),
            _ => {}
        }
    }
    Ok(service)
}

fn service_spec(bytes: &[u8]) -> Result<ServiceSpec, WireError> {
    let mut spec = ServiceSpec::default();
    let mut fields = Fields::new(bytes, "ServiceSpec");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => spec
                .ports
                .get_or_insert_with(Vec::new)
                .push(service_port(fields.bytes(field, value)?)?),
            2 => {
                let (key, value) = entry(fields.bytes(field, value)?)?;
                spec.selector
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key.to_owned(), value.to_owned());
            }
            3 => spec.cluster_ip = non_empty(fields.str(field, value)?),
            4 => spec.type_ = non_empty(fields.str(field, value)?),
            5 => push_str(&mut spec.external_ips, fields.str(field, value)?),
            7 => spec.session_affinity = non_empty(fields.str(field, value)?),
            8 => spec.load_balancer_ip = non_empty(fields.str(field, value)?),
            9 => push_str(
                &mut spec.load_balancer_source_ranges,
                fields.str(field, value)?,
            ),
            10 => spec.external_name = non_empty(fields.str(field, value)?),
            11 => spec.external_traffic_policy = non_empty(fields.str(field, value)?),
            12 => {
                let port = fields.int32(field, value)?;
                spec.health_check_node_port = (port != 0).then_some(port);
            }
            13 => {
                spec.publish_not_ready_addresses = fields.bool(field, value)?.then_some(true);
            }
            14 => {
                spec.session_affinity_config =
                    Some(session_affinity_config(fields.bytes(field, value)?)?);
            }
            17 => spec.ip_family_policy = Some(fields.str(field, value)?.to_owned()),
            18 => push_str(&mut spec.cluster_ips, fields.str(field, value)?),
            19 => push_str(&mut spec.ip_families, fields.str(field, value)?),
            20 => spec.allocate_load_balancer_node_ports = Some(fields.bool(field, value)?),
            21 => spec.load_balancer_class = Some(fields.str(field, value)?.to_owned()),
            22 => spec.internal_traffic_policy = Some(fields.str(field, value)?.to_owned()),
            23 => spec.traffic_distribution = Some(fields.str(field, value)?.to_owned()),
            _ => {}
        }
    }
    Ok(spec)
}

fn service_port(bytes: &[u8]) -> Result<ServicePort, WireError> {
    let mut port = ServicePort::default();
    let mut fields = Fields::new(bytes, "ServicePort");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => port.name = non_empty(fields.str(field, value)?),
            2 => port.protocol = non_empty(fields.str(field, value)?),
            3 => port.port = fields.int32(field, value)?,
            4 => port.target_port = Some(int_or_string(fields.bytes(field, value)?)?),
            5 => {
                let node_port = fields.int32(field, value)?;
                port.node_port = (node_port != 0).then_some(node_port);
            }
            6 => port.app_protocol = Some(fields.str(field, value)?.to_owned()),
            _ => {}
        }
    }
    Ok(port)
}

fn int_or_string(bytes: &[u8]) -> Result<IntOrString, WireError> {
    let (mut is_string, mut int, mut string) = (false, 0, String::new());
    let mut fields = Fields::new(bytes, "IntOrString");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => is_string = fields.int64(field, value)? == 1,
            2 => int = fields.int32(field, value)?,
            3 => fields.str(field, value)?.clone_into(&mut string),
            _ => {}
        }
    }
    Ok(if is_string {
        IntOrString::String(string)
    } else {
        IntOrString::Int(int)
    })
}

fn session_affinity_config(bytes: &[u8]) -> Result<SessionAffinityConfig, WireError> {
    let mut config = SessionAffinityConfig::default();
    let mut fields = Fields::new(bytes, "SessionAffinityConfig");
    while let Some((field, value)) = fields.next_field()? {
        if field == 1 {
            let mut client_ip = ClientIPConfig::default();
            let mut inner = Fields::new(fields.bytes(field, value)?, "ClientIPConfig");
            while let Some((field, value)) = inner.next_field()? {
                if field == 1 {
                    client_ip.timeout_seconds = Some(inner.int32(field, value)?);
                }
            }
            config.client_ip = Some(client_ip);
        }
    }
    Ok(config)
}

/// `status`; its `conditions` are not read (nor kept from the JSON's
/// reading by the model).
fn service_status(bytes: &[u8]) -> Result<ServiceStatus, WireError> {
    let mut status = ServiceStatus::default();
    let mut fields = Fields::new(bytes, "ServiceStatus");
    while let Some((field, value)) = fields.next_field()? {
        if field == 1 {
            let mut load_balancer = LoadBalancerStatus::default();
            let mut inner = Fields::new(fields.bytes(field, value)?, "LoadBalancerStatus");
            while let Some((field, value)) = inner.next_field()? {
                if field == 1 {
                    load_balancer
                        .ingress
                        .get_or_insert_with(Vec::new)
                        .push(ingress(inner.bytes(field, value)?)?);
                }
            }
            status.load_balancer = Some(load_balancer);
        }
    }
    Ok(status)
}

fn ingress(bytes: &[u8]) -> Result<LoadBalancerIngress, WireError> {
    let mut ingress = LoadBalancerIngress::default();
    let mut fields = Fields::new(bytes, "LoadBalancerIngress");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => ingress.ip = non_empty(fields.str(field, value)?),
            2 => ingress.hostname = non_empty(fields.str(field, value)?),
            3 => ingress.ip_mode = Some(fields.str(field, value)?.to_owned()),
            4 => {
                let mut port = PortStatus::default();
                let mut inner = Fields::new(fields.bytes(field, value)?, "PortStatus");
                while let Some((field, value)) = inner.next_field()? {
                    match field {
                        1 => port.port = inner.int32(field, value)?,
                        2 => inner.str(field, value)?.clone_into(&mut port.protocol),
                        3 => port.error = Some(inner.str(field, value)?.to_owned()),
                        _ => {}
                    }
                }
                ingress.ports.get_or_insert_with(Vec::new).push(port);
            }
            _ => {}
        }
    }
    Ok(ingress)
}

fn slice(bytes: &[u8]) -> Result<ListedSlice, WireError> {
    let mut fields = Fields::new(bytes, "EndpointSlice");
    // Sized at once (an endpoint has one address, as an API server writes
    // them); grown from empty they were copied as they grew.
    let endpoints = fields.count(2);
    let mut slice = ListedSlice {
        metadata: ObjectMeta::default(),
        address_type: String::new(),
        endpoints: ListedEndpoints {
            addresses: Vec::with_capacity(endpoints),
            conditions: Vec::with_capacity(endpoints),
            ..ListedEndpoints::default()
        },
        ports: None,
    };
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => slice.metadata = object_meta(fields.bytes(field, value)?, false)?,
            2 => endpoint(fields.bytes(field, value)?, &mut slice.endpoints)?,
            3 => slice
                .ports
                .get_or_insert_with(Vec::new)
                .push(endpoint_port(fields.bytes(field, value)?)?),
            4 => fields
                .str(field, value)?
                .clone_into(&mut slice.address_type),
            _ => {}
        }
    }
    Ok(slice)
}

/// Reads one endpoint into COLUMNS.
fn endpoint(bytes: &[u8], columns: &mut ListedEndpoints) -> Result<(), WireError> {
    let mut endpoint = EndpointFields {
        addresses: 0,
        conditions: None,
        hints: None,
        node_name: None,
    };
    let mut fields = Fields::new(bytes, "Endpoint");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => {
                columns
                    .addresses
                    .push(ListedAddress::parse(fields.str(field, value)?));
                endpoint.addresses += 1;
            }
            2 => endpoint.conditions = Some(conditions(fields.bytes(field, value)?)?),
            6 => endpoint.node_name = Some(fields.str(field, value)?.to_owned()),
            8 => endpoint.hints = Some(hints(fields.bytes(field, value)?)?),
            _ => {}
        }
    }
    columns.push(endpoint);
    Ok(())
}

fn conditions(bytes: &[u8]) -> Result<EndpointConditions, WireError> {
    let mut conditions = EndpointConditions::default();
    let mut fields = Fields::new(bytes, "EndpointConditions");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => conditions.ready = Some(fields.bool(field, value)?),
            2 => conditions.serving = Some(fields.bool(field, value)?),
            3 => conditions.terminating = Some(fields.bool(field, value)?),
            _ => {}
        }
    }
    Ok(conditions)
}

fn hints(bytes: &[u8]) -> Result<EndpointHints, WireError> {
    /// The `name` of a `ForZone` or `ForNode`.
    fn name(bytes: &[u8]) -> Result<String, WireError> {
        let mut name = String::new();
        let mut fields = Fields::new(bytes, "EndpointHints entry");
        while let Some((field, value)) = fields.next_field()? {
            if field == 1 {
                fields.str(field, value)?.clone_into(&mut name);
            }
        }
        Ok(name)
    }
    let mut hints = EndpointHints::default();
    let mut fields = Fields::new(bytes, "EndpointHints");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => hints.for_zones.get_or_insert_with(Vec::new).push(ForZone {
                name: name(fields.bytes(field, value)?)?,
            }),
            2 => hints.for_nodes.get_or_insert_with(Vec::new).push(ForNode {
                name: name(fields.bytes(field, value)?)?,
            }),
            _ => {}
        }
    }
    Ok(hints)
}

fn endpoint_port(bytes: &[u8]) -> Result<EndpointPort, WireError> {
    let mut port = EndpointPort::default();
    let mut fields = Fields::new(bytes, "EndpointPort");
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => port.name = Some(fields.str(field, value)?.to_owned()),
            2 => port.protocol = Some(fields.str(field, value)?.to_owned()),
            3 => port.port = Some(fields.int32(field, value)?),
            4 => port.app_protocol = Some(fields.str(field, value)?.to_owned()),
            _ => {}
        }
    }
    Ok(port)
}

#[cfg(test)]
mod tests;
