//! `EndpointSlice`s validated and parsed once into a compact form, and
//! grouped by the Service they belong to.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{EndpointHints, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::listed::{EndpointView as _, SliceView};
use super::{
    ENDPOINT_SLICE, ObjectError, Protocol, SERVICE_NAME_LABEL, for_another_proxy, is_ipv4,
    namespace_of, object_key,
};
use crate::fast_hash::FastHashMap;

/// An endpoint's conditions, with Kubernetes' defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Conditions {
    /// Absent means ready.
    pub(super) ready: bool,
    /// Absent means serving (kube-proxy's reading, whatever `ready` says).
    pub(super) serving: bool,
    /// Absent means not terminating.
    pub(super) terminating: bool,
}

/// One endpoint of a slice, by its first valid address, as
/// [`SliceEndpoints::endpoints`] gives it.
#[derive(Clone, Copy, Debug)]
pub(super) struct EndpointInfo<'a> {
    pub(super) addr: IpAddr,
    /// `nodeName`; compared with the node's name when selecting, so that a
    /// parsed slice does not depend on the node.
    pub(super) node_name: Option<&'a str>,
    pub(super) conditions: Conditions,
    /// `hints.forZones` names; empty when there are no hints.
    pub(super) zones: &'a [String],
    /// `hints.forNodes` names (`trafficDistribution: PreferSameNode`);
    /// empty when there are none.
    pub(super) nodes: &'a [String],
}

/// An endpoint's topology hints, one list of them non-empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Hints {
    zones: Vec<String>,
    nodes: Vec<String>,
}

/// One `EndpointSlice`, validated once however many Service ports use it.
///
/// Its endpoints are kept in columns, as the model keeps every slice: at
/// 100k Services (2M endpoints) a list of endpoint structs (an address
/// enum, a node name, hints) took ~50 bytes an endpoint, these ~6 (IPv4)
/// or ~18 (IPv6) when no endpoint has a node name or hints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SliceEndpoints {
    pub(super) ipv4: bool,
    /// Each endpoint's address, in order: 4 (IPv4) or 16 (IPv6) bytes.
    addrs: Box<[u8]>,
    /// Each endpoint's [`Conditions`] as bits ([`Conditions::bits`]).
    conditions: Box<[u8]>,
    /// Each endpoint's `nodeName`; empty when no endpoint has one.
    node_names: Box<[Option<Box<str>>]>,
    /// Each endpoint's hints; empty when no endpoint has any.
    hints: Box<[Option<Box<Hints>>]>,
    /// (name, protocol, target port), each (name, protocol) once: a slice
    /// has a few ports, so a list is both smaller and faster than a map.
    pub(super) ports: Vec<(Box<str>, Protocol, u16)>,
}

impl Hints {
    /// The names in HINTS; `None` when there are none.
    fn of(hints: &EndpointHints) -> Option<Box<Self>> {
        fn names<T>(list: Option<&[T]>, name: impl Fn(&T) -> &String) -> Vec<String> {
            list.unwrap_or_default().iter().map(name).cloned().collect()
        }
        let zones = names(hints.for_zones.as_deref(), |zone| &zone.name);
        let nodes = names(hints.for_nodes.as_deref(), |node| &node.name);
        (!zones.is_empty() || !nodes.is_empty()).then(|| Box::new(Self { zones, nodes }))
    }
}

impl Conditions {
    const READY: u8 = 1;
    const SERVING: u8 = 2;
    const TERMINATING: u8 = 4;

    fn bits(self) -> u8 {
        let bit = |set: bool, bit: u8| if set { bit } else { 0 };
        bit(self.ready, Self::READY)
            | bit(self.serving, Self::SERVING)
            | bit(self.terminating, Self::TERMINATING)
    }

    fn from_bits(bits: u8) -> Self {
        Self {
            ready: bits & Self::READY != 0,
            serving: bits & Self::SERVING != 0,
            terminating: bits & Self::TERMINATING != 0,
        }
    }
}

impl SliceEndpoints {
    /// How many endpoints [`endpoints`](Self::endpoints) gives.
    pub(super) fn len(&self) -> usize {
        self.conditions.len()
    }

    /// The endpoints, in the slice's order.
    pub(super) fn endpoints(&self) -> impl Iterator<Item = EndpointInfo<'_>> {
        let width = if self.ipv4 { 4 } else { 16 };
        self.addrs
            .chunks_exact(width)
            .zip(self.conditions.iter())
            .enumerate()
            .map(move |(index, (addr, &conditions))| {
                let addr = match <[u8; 4]>::try_from(addr) {
                    Ok(octets) => IpAddr::from(octets),
                    Err(_) => IpAddr::from(<[u8; 16]>::try_from(addr).unwrap_or_default()),
                };
                let hints = self.hints.get(index).and_then(Option::as_deref);
                EndpointInfo {
                    addr,
                    node_name: self.node_names.get(index).and_then(Option::as_deref),
                    conditions: Conditions::from_bits(conditions),
                    zones: hints.map_or(&[], |hints| &hints.zones),
                    nodes: hints.map_or(&[], |hints| &hints.nodes),
                }
            })
    }
}

/// Slices grouped by the Service they belong to: (namespace, service name).
pub(super) struct EndpointIndex {
    by_service: FastHashMap<(String, String), Vec<SliceEndpoints>>,
}

impl EndpointIndex {
    pub(super) fn new(slices: &[EndpointSlice], errors: &mut Vec<ObjectError>) -> Self {
        let mut ordered: Vec<&EndpointSlice> = slices.iter().collect();
        ordered.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));

        let mut seen = BTreeSet::new();
        let mut by_service: FastHashMap<(String, String), Vec<SliceEndpoints>> =
            FastHashMap::default();
        for slice in ordered {
            let meta = &slice.metadata;
            let Some(service) = slice_service(meta) else {
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
            if let Some(parsed) = parse_slice(slice, errors) {
                by_service
                    .entry((namespace.to_owned(), service.to_owned()))
                    .or_default()
                    .push(parsed);
            }
        }
        Self { by_service }
    }

    pub(super) fn of(&self, namespace: &str, service: &str) -> &[SliceEndpoints] {
        self.by_service
            .get(&(namespace.to_owned(), service.to_owned()))
            .map_or(&[], Vec::as_slice)
    }
}

/// The Service a slice belongs to; none for slices not managed for a
/// Service (custom slices), and for those of headless Services or handed to
/// another proxy (kube-proxy's label selector): none of ours.
pub(super) fn slice_service(meta: &ObjectMeta) -> Option<&str> {
    if for_another_proxy(meta) {
        return None;
    }
    meta.labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .map(String::as_str)
}

/// A named slice of a Service, validated; `None` when it has nothing to
/// serve (FQDN slices, or an unknown address type, reported).
pub(super) fn parse_slice(
    slice: &impl SliceView,
    errors: &mut Vec<ObjectError>,
) -> Option<SliceEndpoints> {
    let ipv4 = match slice.address_type() {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => return None,
        other => {
            errors.push(ObjectError::for_object(
                ENDPOINT_SLICE,
                slice.metadata(),
                format!("addressType {other:?} is not IPv4, IPv6 or FQDN"),
            ));
            return None;
        }
    };
    let mut parsed = SliceEndpoints {
        ipv4,
        addrs: Box::default(),
        conditions: Box::default(),
        node_names: Box::default(),
        hints: Box::default(),
        ports: slice_ports(slice, errors),
    };
    endpoints(slice, &mut parsed, errors);
    Some(parsed)
}

/// Validates every address, and keeps the first valid one of each endpoint:
/// an endpoint's addresses are one pod and fungible (kube-proxy uses only
/// the first), so taking all would weigh that pod more. Fills the columns
/// of `parsed` (of its family), each sized exactly: parsed slices are kept.
fn endpoints(slice: &impl SliceView, parsed: &mut SliceEndpoints, errors: &mut Vec<ObjectError>) {
    let ipv4 = parsed.ipv4;
    let family = family_name(ipv4);
    let endpoints = slice.endpoints();
    let width = if ipv4 { 4 } else { 16 };
    // Sized for every endpoint at once: the columns are kept, and growing
    // them was three copies a slice.
    let mut addrs = Vec::with_capacity(endpoints.len() * width);
    let mut conditions_of = Vec::with_capacity(endpoints.len());
    // One entry per endpoint, or none at all while no endpoint has one (so
    // that equal slices are equal here).
    let mut node_names = Vec::new();
    let mut hints_of = Vec::new();
    for endpoint in endpoints {
        let mut first_valid = None;
        for address in endpoint.addresses() {
            match address {
                Ok(addr) if is_ipv4(addr) == ipv4 => {
                    first_valid.get_or_insert(addr);
                }
                Ok(addr) => errors.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    slice.metadata(),
                    format!("address {addr} is not {family} like the slice's addressType; address skipped"),
                )),
                Err(text) => errors.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    slice.metadata(),
                    format!("address {text:?} is not an IP address; address skipped"),
                )),
            }
        }
        let Some(addr) = first_valid else {
            continue;
        };
        match addr {
            IpAddr::V4(addr) => addrs.extend_from_slice(&addr.octets()),
            IpAddr::V6(addr) => addrs.extend_from_slice(&addr.octets()),
        }
        let index = conditions_of.len();
        let conditions = endpoint.conditions();
        // As kube-proxy reads them (endpointslicecache.go): a nil `ready`
        // or `serving` means true, a nil `terminating` means false.
        let conditions = Conditions {
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        };
        conditions_of.push(conditions.bits());
        push_sparse(&mut node_names, index, endpoint.node_name().map(Box::from));
        push_sparse(&mut hints_of, index, endpoint.hints().and_then(Hints::of));
    }
    parsed.addrs = addrs.into_boxed_slice();
    parsed.conditions = conditions_of.into_boxed_slice();
    parsed.node_names = node_names.into_boxed_slice();
    parsed.hints = hints_of.into_boxed_slice();
}

/// Puts VALUE as entry INDEX of COLUMN, a column that stays empty until a
/// value is given (and then holds `None` for the entries before it).
pub(super) fn push_sparse<T>(column: &mut Vec<Option<T>>, index: usize, value: Option<T>) {
    if column.is_empty() {
        if value.is_none() {
            return;
        }
        column.resize_with(index, || None);
    }
    column.push(value);
}

/// The slice's (name, protocol) -> port table. Ports without a number or of
/// another protocol cannot match a frontend and are left out.
fn slice_ports(
    slice: &impl SliceView,
    errors: &mut Vec<ObjectError>,
) -> Vec<(Box<str>, Protocol, u16)> {
    let mut ports: Vec<(Box<str>, Protocol, u16)> = Vec::new();
    for EndpointPort {
        name,
        port,
        protocol,
        ..
    } in slice.ports()
    {
        let name = name.clone().unwrap_or_default();
        let (Some(number), Ok(proto)) = (port, Protocol::from_k8s(protocol.as_deref())) else {
            continue;
        };
        let Some(number) = u16::try_from(*number).ok().filter(|&number| number != 0) else {
            errors.push(ObjectError::for_object(
                ENDPOINT_SLICE,
                slice.metadata(),
                format!("port {name:?} number {number} is outside 1..=65535; port skipped"),
            ));
            continue;
        };
        if ports
            .iter()
            .any(|(known, known_proto, _)| **known == *name && *known_proto == proto)
        {
            errors.push(ObjectError::for_object(
                ENDPOINT_SLICE,
                slice.metadata(),
                format!("port {name:?}/{proto} is listed twice; the first is used"),
            ));
            continue;
        }
        ports.push((name.into_boxed_str(), proto, number));
    }
    ports.shrink_to_fit();
    ports
}

fn family_name(ipv4: bool) -> &'static str {
    if ipv4 { "IPv4" } else { "IPv6" }
}

#[cfg(test)]
mod tests;
