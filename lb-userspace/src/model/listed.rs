//! `EndpointSlice`s as the kube source lists and watches them: only the
//! fields the model reads, each address parsed as it is read.
//!
//! At 100k Services the first list holds 2M endpoints. Read into
//! `k8s-openapi`'s `EndpointSlice`, each endpoint is a vector and a string
//! per address (plus whatever else it carries: `targetRef`, `hostname`,
//! `zone`), all allocated, parsed again into the model's record, then
//! freed, on the list's one thread. Here an address is parsed straight from
//! the page's text and the fields the model does not read are skipped.
//! Services are listed likewise, with only the metadata the model reads
//! ([`ListedService`]).

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::address::parse_ip_sloppy;
use super::endpoints::push_sparse;

mod de;
mod meta;
pub mod proto;
mod service;
mod wire;

pub use service::ListedService;

/// An `EndpointSlice` reduced to what the model reads. Read as leniently
/// as `k8s-openapi` reads what an API server sends: a field missing or
/// `null` is its default. Unlike `k8s-openapi` it does not check
/// `apiVersion` and `kind` (the watch asked for slices), nor the metadata
/// it does not keep, and refuses a key given twice (no API server writes
/// one).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedSlice {
    /// `metadata`, with only what the model and the watch read of it
    /// (see `meta`).
    #[serde(default, deserialize_with = "meta::listed_meta")]
    pub metadata: ObjectMeta,
    /// `addressType`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub address_type: String,
    /// `endpoints`, in columns.
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoints: ListedEndpoints,
    /// `ports`.
    pub ports: Option<Vec<EndpointPort>>,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// A listed slice's endpoints, in columns. At 100k Services the first list
/// reads 2M endpoints: a struct apiece (~130 bytes with its room for
/// addresses, hints and a node name), in a vector that grew by copying,
/// was a good part of what the list's one thread allocated and copied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListedEndpoints {
    /// Every endpoint's `addresses`, each parsed, one endpoint's after
    /// another's.
    addresses: Vec<ListedAddress>,
    /// Where each endpoint's addresses end in `addresses`; empty while
    /// every endpoint has exactly one (as every endpoint an API server
    /// writes has).
    ends: Vec<usize>,
    /// Each endpoint's `conditions` (one entry per endpoint).
    conditions: Vec<Option<EndpointConditions>>,
    /// Each endpoint's `hints`; empty while no endpoint has any.
    hints: Vec<Option<EndpointHints>>,
    /// Each endpoint's `nodeName`; empty while no endpoint has one.
    node_names: Vec<Option<String>>,
}

/// One endpoint's fields besides its addresses (already in the columns).
struct EndpointFields {
    addresses: usize,
    conditions: Option<EndpointConditions>,
    hints: Option<EndpointHints>,
    node_name: Option<String>,
}

impl ListedEndpoints {
    /// How many endpoints there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.conditions.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Endpoint INDEX's addresses.
    fn addresses_of(&self, index: usize) -> &[ListedAddress] {
        let range = if self.ends.is_empty() {
            index..index + 1
        } else {
            let start = index.checked_sub(1).map_or(0, |before| self.ends[before]);
            start..self.ends[index]
        };
        self.addresses.get(range).unwrap_or_default()
    }

    /// The endpoints, in order.
    fn iter(&self) -> impl ExactSizeIterator<Item = ListedEndpoint<'_>> {
        (0..self.len()).map(|index| ListedEndpoint {
            columns: self,
            index,
        })
    }

    /// Adds the endpoint whose addresses were the last ones added.
    fn push(&mut self, fields: EndpointFields) {
        let index = self.len();
        if !self.ends.is_empty() || fields.addresses != 1 {
            if self.ends.is_empty() {
                // Every endpoint before this one had one address.
                self.ends.extend(1..=index);
            }
            self.ends.push(self.addresses.len());
        }
        self.conditions.push(fields.conditions);
        push_sparse(&mut self.hints, index, fields.hints);
        push_sparse(&mut self.node_names, index, fields.node_name);
    }
}

/// One endpoint of [`ListedEndpoints`].
#[derive(Clone, Copy)]
pub(super) struct ListedEndpoint<'a> {
    columns: &'a ListedEndpoints,
    index: usize,
}

/// One of an endpoint's addresses: parsed (as the model parses them,
/// leading zeros allowed), or the text that is not an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListedAddress {
    /// An IP address.
    Ip(IpAddr),
    /// Not an IP address: the text, for the error that names it.
    Invalid(Box<str>),
}

impl ListedAddress {
    fn parse(text: &str) -> Self {
        parse_ip_sloppy(text).map_or_else(|| Self::Invalid(text.into()), Self::Ip)
    }

    /// The address, or the text that is not one.
    fn get(&self) -> Result<IpAddr, &str> {
        match self {
            Self::Ip(addr) => Ok(*addr),
            Self::Invalid(text) => Err(text),
        }
    }
}

impl k8s_openapi::Resource for ListedSlice {
    const API_VERSION: &'static str = <EndpointSlice as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <EndpointSlice as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <EndpointSlice as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <EndpointSlice as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str =
        <EndpointSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <EndpointSlice as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::ListableResource for ListedSlice {
    const LIST_KIND: &'static str = <EndpointSlice as k8s_openapi::ListableResource>::LIST_KIND;
}

impl k8s_openapi::Metadata for ListedSlice {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl From<ListedSlice> for EndpointSlice {
    /// The slice with what the model reads; an address that parsed is
    /// written as the model reads it (`010.0.0.1` as `10.0.0.1`).
    fn from(slice: ListedSlice) -> Self {
        let endpoints = slice
            .endpoints
            .iter()
            .map(|endpoint| Endpoint {
                addresses: endpoint
                    .listed_addresses()
                    .iter()
                    .map(|address| match address.get() {
                        Ok(addr) => addr.to_string(),
                        Err(text) => text.to_owned(),
                    })
                    .collect(),
                conditions: endpoint.conditions().cloned(),
                hints: endpoint.hints().cloned(),
                node_name: endpoint.node_name().map(str::to_owned),
                ..Endpoint::default()
            })
            .collect();
        Self {
            metadata: slice.metadata,
            address_type: slice.address_type,
            endpoints: Some(endpoints),
            ports: slice.ports,
        }
    }
}

/// What the model reads of a slice, from either form (each method reads
/// the field of its name; a missing list is empty).
pub(super) trait SliceView {
    fn metadata(&self) -> &ObjectMeta;
    fn address_type(&self) -> &str;
    fn endpoints(&self) -> impl ExactSizeIterator<Item = impl EndpointView>;
    fn ports(&self) -> &[EndpointPort];
}

/// What the model reads of an endpoint, from either form (each method
/// reads the field of its name).
pub(super) trait EndpointView {
    /// Each address, parsed, or the text that is not one.
    fn addresses(&self) -> impl Iterator<Item = Result<IpAddr, &str>>;
    fn conditions(&self) -> Option<&EndpointConditions>;
    fn hints(&self) -> Option<&EndpointHints>;
    fn node_name(&self) -> Option<&str>;
}

/// The methods both forms answer from their fields of the same names.
macro_rules! fields_of_both_forms {
    () => {
        fn metadata(&self) -> &ObjectMeta {
            &self.metadata
        }

        fn address_type(&self) -> &str {
            &self.address_type
        }

        fn ports(&self) -> &[EndpointPort] {
            self.ports.as_deref().unwrap_or_default()
        }
    };
}

impl SliceView for EndpointSlice {
    fields_of_both_forms!();

    fn endpoints(&self) -> impl ExactSizeIterator<Item = impl EndpointView> {
        self.endpoints.as_deref().unwrap_or_default().iter()
    }
}

impl EndpointView for &Endpoint {
    fn addresses(&self) -> impl Iterator<Item = Result<IpAddr, &str>> {
        self.addresses
            .iter()
            .map(|text| parse_ip_sloppy(text).ok_or(&**text))
    }

    fn conditions(&self) -> Option<&EndpointConditions> {
        self.conditions.as_ref()
    }

    fn hints(&self) -> Option<&EndpointHints> {
        self.hints.as_ref()
    }

    fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }
}

impl SliceView for ListedSlice {
    fields_of_both_forms!();

    fn endpoints(&self) -> impl ExactSizeIterator<Item = impl EndpointView> {
        self.endpoints.iter()
    }
}

impl<'a> ListedEndpoint<'a> {
    fn listed_addresses(&self) -> &'a [ListedAddress] {
        self.columns.addresses_of(self.index)
    }
}

impl EndpointView for ListedEndpoint<'_> {
    fn addresses(&self) -> impl Iterator<Item = Result<IpAddr, &str>> {
        self.listed_addresses().iter().map(ListedAddress::get)
    }

    fn conditions(&self) -> Option<&EndpointConditions> {
        self.columns.conditions.get(self.index)?.as_ref()
    }

    fn hints(&self) -> Option<&EndpointHints> {
        self.columns.hints.get(self.index)?.as_ref()
    }

    fn node_name(&self) -> Option<&str> {
        self.columns.node_names.get(self.index)?.as_deref()
    }
}

#[cfg(test)]
mod tests;
