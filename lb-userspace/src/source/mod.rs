//! Where Services and `EndpointSlice`s come from. A source sends what
//! changed (or, the file source on a full re-read, a whole snapshot) over a
//! channel; the agent turns each update into maps.

use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::mpsc;

use crate::model::{ObjectError, ObjectKey};

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
    /// `EndpointSlices` added or replaced.
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
pub fn spawn(
    spec: &SourceSpec,
    tx: mpsc::Sender<SourceUpdate>,
) -> Result<tokio::task::JoinHandle<()>, SourceError> {
    match spec {
        SourceSpec::Kube(config) => Ok(kube::spawn(config, tx)?),
        SourceSpec::File(dir) => Ok(file::spawn(dir, tx)?),
    }
}
