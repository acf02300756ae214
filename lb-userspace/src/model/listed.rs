//! `EndpointSlice`s as the kube source lists and watches them: only the
//! fields the model reads, each address parsed as it is read.
//!
//! At 100k Services the first list holds 2M endpoints. Read into
//! `k8s-openapi`'s `EndpointSlice`, each endpoint is a vector and a string
//! per address (plus whatever else it carries: `targetRef`, `hostname`,
//! `zone`), all allocated, parsed again into the model's record, then
//! freed, on the list's one thread. Here an address is parsed straight from
//! the page's text and the fields the model does not read are skipped.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::endpoints::push_sparse;
use super::address::parse_ip_sloppy;

/// An `EndpointSlice` reduced to what the model reads. Read as leniently
/// as `k8s-openapi` reads what an API server sends: a field missing or
/// `null` is its default. Unlike `k8s-openapi` it does not check
/// `apiVersion` and `kind` (the watch asked for slices) and refuses a key
/// given twice (no API server writes one).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedSlice {
    /// `metadata`.
    #[serde(default, deserialize_with = "null_as_default")]
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

impl<'de> Deserialize<'de> for ListedEndpoints {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Endpoints;
        impl<'de> Visitor<'de> for Endpoints {
            type Value = ListedEndpoints;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of endpoints")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ListedEndpoints, A::Error> {
                let mut columns = ListedEndpoints {
                    addresses: Vec::with_capacity(8),
                    conditions: Vec::with_capacity(8),
                    ..ListedEndpoints::default()
                };
                while seq.next_element_seed(EndpointInto(&mut columns))?.is_some() {}
                Ok(columns)
            }
        }
        deserializer.deserialize_seq(Endpoints)
    }
}

/// The keys of an endpoint the model reads.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum EndpointKey {
    Addresses,
    Conditions,
    Hints,
    NodeName,
    #[serde(other)]
    Other,
}

/// Reads one endpoint into the columns.
struct EndpointInto<'c>(&'c mut ListedEndpoints);

impl<'de> DeserializeSeed<'de> for EndpointInto<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EndpointInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an endpoint")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        fn once<T, E: serde::de::Error>(
            slot: &mut Option<T>,
            value: T,
            key: &'static str,
        ) -> Result<(), E> {
            if slot.replace(value).is_some() {
                return Err(E::duplicate_field(key));
            }
            Ok(())
        }
        let columns = self.0;
        let (mut addresses, mut conditions, mut hints, mut node_name) = (None, None, None, None);
        while let Some(key) = map.next_key()? {
            match key {
                EndpointKey::Addresses => {
                    let added = map.next_value_seed(Addresses(&mut columns.addresses))?;
                    once(&mut addresses, added, "addresses")?;
                }
                EndpointKey::Conditions => once(&mut conditions, map.next_value()?, "conditions")?,
                EndpointKey::Hints => once(&mut hints, map.next_value()?, "hints")?,
                EndpointKey::NodeName => once(&mut node_name, map.next_value()?, "nodeName")?,
                EndpointKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        columns.push(EndpointFields {
            addresses: addresses.unwrap_or(0),
            conditions: conditions.flatten(),
            hints: hints.flatten(),
            node_name: node_name.flatten(),
        });
        Ok(())
    }
}

/// Reads an endpoint's `addresses` (`null` is none) onto the end of the
/// column; the value is how many there were.
struct Addresses<'c>(&'c mut Vec<ListedAddress>);

impl<'de> DeserializeSeed<'de> for Addresses<'_> {
    type Value = usize;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for Addresses<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of address strings")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let before = self.0.len();
        while let Some(address) = seq.next_element()? {
            self.0.push(address);
        }
        Ok(self.0.len() - before)
    }
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

impl<'de> Deserialize<'de> for ListedAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = ListedAddress;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an address string")
            }

            // Called with the page's own text when it has no escapes: no
            // copy is made of an address that parses.
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ListedAddress, E> {
                Ok(ListedAddress::parse(text))
            }
        }
        deserializer.deserialize_str(Text)
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
mod tests {
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
}
