//! A listed object's `metadata`, reduced to what the model and the watch
//! read of it.
//!
//! An API server's objects carry more metadata than the model reads: a
//! `uid`, a `creationTimestamp`, `generateName`, `ownerReferences`, the
//! `managedFields` (the largest: a tree of every field set, each node a
//! map), labels, and for a Service applied with kubectl a copy of it in an
//! annotation. Read into `k8s-openapi`'s `ObjectMeta`, each was allocated,
//! checked and freed on the list's one thread (a third of a slice's
//! instructions, as a cluster writes them); here they are skipped.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, Visitor};

use crate::model::{
    HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, TRIGGER_TIME_ANNOTATION,
};

/// The labels the model reads (the Service a slice belongs to, and the
/// two that hand a Service or slice to another proxy); no other label is
/// kept.
pub(super) const KEPT_LABELS: &[&str] =
    &[SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL];

/// The annotations the agent reads (a slice's, for the network programming
/// latency).
pub(super) const KEPT_ANNOTATIONS: &[&str] = &[TRIGGER_TIME_ANNOTATION];

/// Reads a slice's `metadata` (`null` is the default) keeping only
/// `name`, `namespace`, `resourceVersion` (which the watch reads too), and
/// the labels and annotations above. These are read as `k8s-openapi` reads
/// them (`null` is unset, a key given twice is read twice and the last one
/// counts); the fields not kept are not checked.
pub(super) fn listed_meta<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<ObjectMeta, D::Error> {
    deserializer.deserialize_option(MetaOf { created: false })
}

/// As [`listed_meta`], for a Service: its `creationTimestamp` is kept too
/// (the model's claim order).
pub(super) fn listed_service_meta<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<ObjectMeta, D::Error> {
    deserializer.deserialize_option(MetaOf { created: true })
}

/// Reads `metadata`; CREATED: keeping `creationTimestamp`.
struct MetaOf {
    created: bool,
}

/// The keys of `metadata` that may be kept.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum MetaKey {
    Name,
    Namespace,
    ResourceVersion,
    CreationTimestamp,
    Labels,
    Annotations,
    #[serde(other)]
    Other,
}

impl<'de> Visitor<'de> for MetaOf {
    type Value = ObjectMeta;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("object metadata")
    }

    fn visit_none<E: Error>(self) -> Result<ObjectMeta, E> {
        Ok(ObjectMeta::default())
    }

    fn visit_unit<E: Error>(self) -> Result<ObjectMeta, E> {
        Ok(ObjectMeta::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<ObjectMeta, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<ObjectMeta, M::Error> {
        let mut meta = ObjectMeta::default();
        while let Some(key) = map.next_key()? {
            match key {
                MetaKey::Name => meta.name = map.next_value()?,
                MetaKey::Namespace => meta.namespace = map.next_value()?,
                MetaKey::ResourceVersion => meta.resource_version = map.next_value()?,
                MetaKey::CreationTimestamp if self.created => {
                    meta.creation_timestamp = map.next_value()?;
                }
                MetaKey::Labels => meta.labels = map.next_value_seed(Kept(KEPT_LABELS))?,
                MetaKey::Annotations => {
                    meta.annotations = map.next_value_seed(Kept(KEPT_ANNOTATIONS))?;
                }
                MetaKey::CreationTimestamp | MetaKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(meta)
    }
}

/// Reads a string map (`null` is none), keeping only the entries whose
/// keys are named (their values must be strings, as `k8s-openapi` reads
/// them); `None` when it keeps none.
struct Kept(&'static [&'static str]);

/// One key of a string map: the kept name it is, if any.
struct KeptKey(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeptKey {
    type Value = Option<&'static str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeptKey {
    type Value = Option<&'static str>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().copied().find(|kept| *kept == key))
    }
}

impl<'de> DeserializeSeed<'de> for Kept {
    type Value = Option<BTreeMap<String, String>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for Kept {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map of strings")
    }

    fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut kept = BTreeMap::new();
        while let Some(name) = map.next_key_seed(KeptKey(self.0))? {
            match name {
                Some(name) => {
                    kept.insert(name.to_owned(), map.next_value::<String>()?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((!kept.is_empty()).then_some(kept))
    }
}
