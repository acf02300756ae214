//! How a [`ListedSlice`](super::ListedSlice)'s endpoints are read: into
//! columns, each address parsed as it is read (see [`ListedEndpoints`]).

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{EndpointFields, ListedAddress, ListedEndpoints};

impl<'de> Deserialize<'de> for ListedEndpoints {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
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

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EndpointInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an endpoint")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        /// Puts VALUE in SLOT, refusing a key given twice.
        fn once<T, E: Error>(slot: &mut Option<T>, value: T, key: &'static str) -> Result<(), E> {
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

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for Addresses<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of address strings")
    }

    fn visit_none<E: Error>(self) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_unit<E: Error>(self) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
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

impl<'de> Deserialize<'de> for ListedAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = ListedAddress;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an address string")
            }

            // Called with the page's own text when it has no escapes: no
            // copy is made of an address that parses.
            fn visit_str<E: Error>(self, text: &str) -> Result<ListedAddress, E> {
                Ok(ListedAddress::parse(text))
            }
        }
        deserializer.deserialize_str(Text)
    }
}
