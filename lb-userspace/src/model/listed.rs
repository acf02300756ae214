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

use super::service::parse_ip_sloppy;

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
    /// `endpoints`.
    pub endpoints: Option<Vec<ListedEndpoint>>,
    /// `ports`.
    pub ports: Option<Vec<EndpointPort>>,
}

/// An endpoint reduced to what the model reads.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedEndpoint {
    /// `addresses`, each parsed.
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: ListedAddresses,
    /// `conditions`.
    pub conditions: Option<EndpointConditions>,
    /// `hints`.
    pub hints: Option<EndpointHints>,
    /// `nodeName`.
    pub node_name: Option<String>,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// An endpoint's addresses, the first in place: the API allows several
/// and has only ever written one, and a vector for it was an allocation per
/// endpoint (2M at 100k Services, made and freed on the list's thread).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListedAddresses {
    /// The first address.
    first: Option<ListedAddress>,
    /// Any others, in order.
    rest: Vec<ListedAddress>,
}

impl ListedAddresses {
    /// The addresses in order.
    pub fn iter(&self) -> impl Iterator<Item = &ListedAddress> {
        self.first.iter().chain(&self.rest)
    }
}

impl<'de> Deserialize<'de> for ListedAddresses {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Addresses;
        impl<'de> serde::de::Visitor<'de> for Addresses {
            type Value = ListedAddresses;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of address strings")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ListedAddresses, A::Error> {
                let first = seq.next_element()?;
                let mut rest = Vec::new();
                if first.is_some() {
                    while let Some(address) = seq.next_element()? {
                        rest.push(address);
                    }
                }
                Ok(ListedAddresses { first, rest })
            }
        }
        deserializer.deserialize_seq(Addresses)
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
        let endpoints = slice.endpoints.map(|endpoints| {
            endpoints
                .into_iter()
                .map(|endpoint| Endpoint {
                    addresses: endpoint
                        .addresses
                        .iter()
                        .map(|address| match address.get() {
                            Ok(addr) => addr.to_string(),
                            Err(text) => text.to_owned(),
                        })
                        .collect(),
                    conditions: endpoint.conditions,
                    hints: endpoint.hints,
                    node_name: endpoint.node_name,
                    ..Endpoint::default()
                })
                .collect()
        });
        Self {
            metadata: slice.metadata,
            address_type: slice.address_type,
            endpoints,
            ports: slice.ports,
        }
    }
}

/// What the model reads of a slice, from either form (each method reads
/// the field of its name; a missing list is empty).
pub(super) trait SliceView {
    type Endpoint: EndpointView;
    fn metadata(&self) -> &ObjectMeta;
    fn address_type(&self) -> &str;
    fn endpoints(&self) -> &[Self::Endpoint];
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

/// The views of both forms: their fields have the same names and types,
/// except the addresses, which ADDRESSES reads from an endpoint.
macro_rules! views {
    ($slice:ty, $endpoint:ty, $addresses:path) => {
        impl SliceView for $slice {
            type Endpoint = $endpoint;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn address_type(&self) -> &str {
                &self.address_type
            }

            fn endpoints(&self) -> &[$endpoint] {
                self.endpoints.as_deref().unwrap_or_default()
            }

            fn ports(&self) -> &[EndpointPort] {
                self.ports.as_deref().unwrap_or_default()
            }
        }

        impl EndpointView for $endpoint {
            fn addresses(&self) -> impl Iterator<Item = Result<IpAddr, &str>> {
                $addresses(self)
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
    };
}

views!(EndpointSlice, Endpoint, api_addresses);
views!(ListedSlice, ListedEndpoint, listed_addresses);

fn api_addresses(endpoint: &Endpoint) -> impl Iterator<Item = Result<IpAddr, &str>> {
    endpoint
        .addresses
        .iter()
        .map(|text| parse_ip_sloppy(text).ok_or(text.as_str()))
}

fn listed_addresses(endpoint: &ListedEndpoint) -> impl Iterator<Item = Result<IpAddr, &str>> {
    endpoint.addresses.iter().map(ListedAddress::get)
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
        let addresses = &listed.endpoints.as_deref().unwrap_or_default()[0].addresses;
        assert_eq!(
            addresses.iter().collect::<Vec<_>>(),
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
