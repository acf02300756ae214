//! Where Services and `EndpointSlice`s come from. A source sends what
//! changed (or, the file source on a full re-read, a whole snapshot) over a
//! channel; the agent turns each update into maps.

use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::mpsc;

use crate::model::{
    Incremental, ObjectError, ObjectKey, PreparedService, PreparedSlice, SliceTrigger,
};

pub mod file;
pub mod kube;

/// The objects a source holds at one moment, and what it rejected.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Services.
    pub services: Vec<Service>,
    /// `EndpointSlices`.
    pub slices: Vec<EndpointSlice>,
    /// This agent's own Node object, when the source knows it (the kube
    /// source sends it in [`Changes::node`] instead).
    pub node: Option<Node>,
    /// Objects (or files) that could not be read, with the reason.
    pub errors: Vec<ObjectError>,
}

/// What changed since the source's previous update: objects added or
/// replaced, and the keys (namespace, name) of objects removed.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    /// Services added or replaced.
    pub services: Vec<Service>,
    /// Services removed.
    pub removed_services: Vec<ObjectKey>,
    /// `EndpointSlices` added or replaced. The kube source fills only the
    /// fields the model reads (it watches them as
    /// [`ListedSlice`](crate::model::ListedSlice)s).
    pub slices: Vec<EndpointSlice>,
    /// `EndpointSlices` removed.
    pub removed_slices: Vec<ObjectKey>,
    /// Every object (or file) the source cannot read now, not only new ones.
    pub errors: Vec<ObjectError>,
    /// More changes follow at once (a first read, sent file by file so
    /// that not every object is in memory at the same time): apply them
    /// together with the following ones; `errors` is not yet complete.
    pub more_follow: bool,
    /// This agent's own Node object, when it changed (kube source); `None`:
    /// the node stays as the previous update left it.
    pub node: Option<NodeChange>,
    /// Services added or replaced, parsed already ([`Changes::prepare`]).
    pub prepared_services: Vec<PreparedService>,
    /// `EndpointSlices` added or replaced, parsed already.
    pub prepared_slices: Vec<PreparedSlice>,
}

impl Changes {
    /// Parses `services` and `slices` into what the model keeps of them
    /// and drops the API objects. A source whose objects are made on a
    /// thread of its own calls this there: the objects are then allocated
    /// and freed on one thread, and the agent's loop only files the
    /// records (see `model::prepared`).
    pub fn prepare(&mut self) {
        self.prepared_services.extend(
            self.services
                .drain(..)
                .map(|service| PreparedService::new(&service)),
        );
        self.prepared_slices.extend(
            self.slices
                .drain(..)
                .map(|slice| PreparedSlice::new(&slice)),
        );
    }

    /// Puts the changes into `model` (not committed), each API object
    /// dropped once the model has what it needs; returns the rest.
    pub fn feed(self, model: &mut Incremental) -> Fed {
        for key in &self.removed_services {
            model.remove_service(key);
        }
        for key in &self.removed_slices {
            model.remove_slice(key);
        }
        let mut triggers: Vec<SliceTrigger> = self.slices.iter().map(SliceTrigger::of).collect();
        for slice in self.slices {
            model.upsert_slice(&slice);
        }
        for mut slice in self.prepared_slices {
            triggers.push(slice.take_trigger());
            model.upsert_prepared_slice(slice);
        }
        for service in self.services {
            model.upsert_service(&service);
        }
        for service in self.prepared_services {
            model.upsert_prepared_service(service);
        }
        Fed {
            triggers,
            removed_slices: self.removed_slices,
            errors: self.errors,
            node: self.node,
        }
    }
}

/// What [`Changes::feed`] leaves for the agent besides the model.
#[derive(Debug)]
pub struct Fed {
    /// The trigger times of the slices added or replaced.
    pub triggers: Vec<SliceTrigger>,
    /// The keys of the slices removed.
    pub removed_slices: Vec<ObjectKey>,
    /// [`Changes::errors`].
    pub errors: Vec<ObjectError>,
    /// [`Changes::node`].
    pub node: Option<NodeChange>,
}

/// A change of this agent's own Node object.
#[derive(Clone, Debug)]
pub enum NodeChange {
    /// The Node was added or changed.
    Set(Box<Node>),
    /// The Node was deleted.
    Removed,
}

impl NodeChange {
    /// The Node after the change.
    #[must_use]
    pub fn into_node(self) -> Option<Node> {
        match self {
            Self::Set(node) => Some(*node),
            Self::Removed => None,
        }
    }
}

/// What a source tells the agent.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one update at a time passes through a short channel; a box buys nothing"
)]
pub enum SourceUpdate {
    /// The complete current state.
    Snapshot(Snapshot),
    /// What changed since the previous update (which was a snapshot or
    /// changes).
    Changes(Changes),
    /// The source cannot deliver fresh state (the last good state keeps
    /// serving); the text says why.
    Stale(String),
}

/// Which source to run.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// `file:DIR`.
    File(PathBuf),
    /// `kube`: the API server (in-cluster or a kubeconfig).
    Kube(kube::KubeSourceConfig),
}

/// A source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file source's directory is unusable.
    #[error(transparent)]
    File(#[from] file::FileSourceError),
    /// The Kubernetes source has no usable configuration.
    #[error(transparent)]
    Kube(#[from] kube::KubeSourceError),
}

/// How often the file source checks its directory.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Starts `spec`, sending updates to `tx` until `tx` is closed.
///
/// # Errors
/// The source cannot start at all (for `file:`, the directory is unusable;
/// for `kube`, no node name or cluster configuration).
pub fn spawn(spec: &SourceSpec, tx: mpsc::Sender<SourceUpdate>) -> Result<SourceTask, SourceError> {
    match spec {
        SourceSpec::Kube(config) => Ok(kube::spawn(config, tx)?),
        SourceSpec::File(dir) => Ok(SourceTask {
            task: file::spawn(dir, tx)?,
            runtime: None,
        }),
    }
}

/// A running source: its task, and the runtime of its own it runs on, if
/// any (the kube source: its HTTP and JSON work then runs beside the
/// agent's loop, not on it). Dropped or aborted, the source stops.
#[derive(Debug)]
pub struct SourceTask {
    task: tokio::task::JoinHandle<()>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl SourceTask {
    fn on_runtime(task: tokio::task::JoinHandle<()>, runtime: tokio::runtime::Runtime) -> Self {
        Self {
            task,
            runtime: Some(runtime),
        }
    }

    /// Stops the source.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for SourceTask {
    fn drop(&mut self) {
        self.task.abort();
        // Without waiting: this may run on another runtime's thread.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NodeContext, TRIGGER_TIME_ANNOTATION};
    use crate::testing::{IpFamily, ServiceBuilder, SliceBuilder};

    /// A Service with a slice per family, a slice of an unknown address
    /// type (an error), a slice of no Service and one with a trigger time.
    fn changes() -> Changes {
        let mut triggered = SliceBuilder::for_service("prod", "api", IpFamily::V6)
            .port("http", 8080, "TCP")
            .addresses(["fd00::7"])
            .build();
        triggered.metadata.annotations = Some(
            [(
                TRIGGER_TIME_ANNOTATION.to_owned(),
                "2026-12-01T00:00:00Z".to_owned(),
            )]
            .into(),
        );
        Changes {
            services: vec![
                ServiceBuilder::cluster_ip("prod", "api")
                    .ips(["10.96.0.10", "fd00:96::10"])
                    .families(["IPv4", "IPv6"])
                    .port("http", 80, "TCP", 8080)
                    .build(),
            ],
            slices: vec![
                SliceBuilder::for_service("prod", "api", IpFamily::V4)
                    .port("http", 8080, "TCP")
                    .addresses(["10.0.0.1", "10.0.0.2"])
                    .build(),
                triggered,
                SliceBuilder::for_service("prod", "api", IpFamily::V4)
                    .name("api-odd")
                    .address_type("AppleTalk")
                    .build(),
                SliceBuilder::for_service("prod", "custom", IpFamily::V4)
                    .without_service()
                    .addresses(["10.0.0.9"])
                    .build(),
            ],
            ..Changes::default()
        }
    }

    #[test]
    fn prepared_changes_feed_the_model_as_the_api_objects_do() {
        let mut direct = Incremental::new(NodeContext::default());
        let fed_direct = changes().feed(&mut direct);
        direct.commit();

        let mut prepared_changes = changes();
        prepared_changes.prepare();
        assert!(prepared_changes.services.is_empty() && prepared_changes.slices.is_empty());
        assert_eq!(prepared_changes.prepared_services.len(), 1);
        assert_eq!(prepared_changes.prepared_slices.len(), 4);
        let mut prepared = Incremental::new(NodeContext::default());
        let fed_prepared = prepared_changes.feed(&mut prepared);
        prepared.commit();

        assert_eq!(prepared.frontends(), direct.frontends());
        assert_eq!(prepared.frontends().len(), 2, "{:?}", prepared.frontends());
        let backends: usize = prepared
            .frontends()
            .values()
            .map(|spec| spec.backends.len())
            .sum();
        assert_eq!(backends, 3);
        assert_eq!(prepared.errors(), direct.errors());
        assert_eq!(prepared.errors().len(), 1, "{:?}", prepared.errors());
        assert_eq!(fed_prepared.triggers, fed_direct.triggers);
        let times: Vec<_> = fed_prepared
            .triggers
            .iter()
            .filter_map(|t| t.time.as_deref())
            .collect();
        assert_eq!(times, ["2026-12-01T00:00:00Z"]);
    }
}
