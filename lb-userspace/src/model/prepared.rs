//! API objects reduced to what [`Incremental`](super::Incremental) keeps of
//! them, apart from the model, so that a source's own thread can do the
//! parsing and drop the objects.
//!
//! At 100k Services the file source's first read allocates millions of
//! small API object parts on its thread; when the agent's loop parsed and
//! dropped them, every free went back across threads into the one malloc
//! arena the reading thread was allocating from, and the two threads
//! spent much of the read waiting on its lock.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::endpoints::{SliceEndpoints, parse_slice, slice_service};
use super::listed::{ListedSlice, SliceView};
use super::{ENDPOINT_SLICE, ObjectError, ObjectKey, ServiceRecord, key_of};

/// A Service as the model keeps it: its key and its parsed record.
#[derive(Clone, Debug)]
pub struct PreparedService {
    pub(super) key: ObjectKey,
    pub(super) record: ServiceRecord,
}

/// An `EndpointSlice` as the model keeps it, with the trigger-time
/// annotation the agent's latency metric reads.
#[derive(Clone, Debug)]
#[cfg_attr(test, derive(PartialEq, Eq))]
pub struct PreparedSlice {
    pub(super) key: ObjectKey,
    pub(super) entry: SliceEntry,
    trigger: SliceTrigger,
}

/// What the network programming latency metric needs of a slice: its
/// namespace as written (not defaulted), its name and its
/// `endpoints.kubernetes.io/last-change-trigger-time` annotation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceTrigger {
    /// `metadata.namespace` as written (empty when absent).
    pub namespace: String,
    /// `metadata.name` (empty when absent).
    pub name: String,
    /// The annotation's value, if any.
    pub time: Option<String>,
}

/// One stored `EndpointSlice`, reduced to what the model uses.
#[derive(Clone, Debug)]
#[cfg_attr(test, derive(PartialEq, Eq))]
pub(super) struct SliceEntry {
    /// `metadata.resourceVersion` (API objects): the same version is the
    /// same object, so a snapshot need not parse it again.
    pub(super) resource_version: Option<String>,
    /// The Service it belongs to (service-name label); `None`: not ours.
    pub(super) service: Option<String>,
    pub(super) parsed: Option<SliceEndpoints>,
    pub(super) errors: Vec<ObjectError>,
}

impl PreparedService {
    /// Parses `service`.
    #[must_use]
    pub fn new(service: &Service) -> Self {
        Self {
            key: key_of(&service.metadata),
            record: ServiceRecord::new(service),
        }
    }
}

impl PreparedSlice {
    /// Parses and validates `slice` (its errors are kept with it).
    #[must_use]
    pub fn new(slice: &EndpointSlice) -> Self {
        Self::of(slice)
    }

    /// As [`PreparedSlice::new`], from the form the kube source lists.
    #[must_use]
    pub fn listed(slice: &ListedSlice) -> Self {
        Self::of(slice)
    }

    fn of(slice: &impl SliceView) -> Self {
        let meta = slice.metadata();
        Self {
            key: key_of(meta),
            entry: SliceEntry::new(slice),
            trigger: SliceTrigger::with_time(meta, trigger_annotation(meta).cloned()),
        }
    }

    /// Takes what the latency metric needs of the slice (left empty).
    pub fn take_trigger(&mut self) -> SliceTrigger {
        std::mem::take(&mut self.trigger)
    }
}

impl SliceTrigger {
    /// `slice`'s.
    #[must_use]
    pub fn of(slice: &EndpointSlice) -> Self {
        Self::with_time(
            &slice.metadata,
            trigger_annotation(&slice.metadata).cloned(),
        )
    }

    /// `slice`'s when it has the annotation: a slice without one (every
    /// slice of a manifest directory) costs no copy of its names.
    #[must_use]
    pub fn of_annotated(slice: &EndpointSlice) -> Option<Self> {
        let time = trigger_annotation(&slice.metadata)?.clone();
        Some(Self::with_time(&slice.metadata, Some(time)))
    }

    /// The names in META with TIME.
    fn with_time(meta: &ObjectMeta, time: Option<String>) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            time,
        }
    }
}

/// The trigger-time annotation in a slice's META, if any.
fn trigger_annotation(meta: &ObjectMeta) -> Option<&String> {
    meta.annotations
        .as_ref()?
        .get(super::TRIGGER_TIME_ANNOTATION)
}

impl SliceEntry {
    pub(super) fn new(slice: &impl SliceView) -> Self {
        let meta = slice.metadata();
        let service = slice_service(meta).map(str::to_owned);
        let mut errors = Vec::new();
        let parsed = match &service {
            None => None,
            Some(_) if meta.name.is_none() => {
                errors.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    meta,
                    "missing metadata.name",
                ));
                None
            }
            Some(_) => parse_slice(slice, &mut errors),
        };
        Self {
            resource_version: meta.resource_version.clone(),
            service,
            parsed,
            errors,
        }
    }
}
