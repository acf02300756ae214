//! The Kubernetes source: watchers for Services, `EndpointSlice`s (listed
//! as protobuf, as kube-proxy lists them) and the agent's own Node,
//! forwarded to the agent as [`Changes`].
//!
//! - The first update is sent only once all three resources are listed;
//!   until then what the lists bring goes to the agent in parts of 1000
//!   objects marked `more_follow` (into its model, no sync), so that the
//!   API objects of a large cluster are not all in memory at once.
//! - A change after a quiet spell is sent at once (with the events read
//!   along with it); bursts are coalesced: a change within [`QUIET`] of the
//!   previous one waits until the burst has been quiet for [`QUIET`] (at
//!   most [`MAX_DELAY`] in all). The next update is sent only once the agent
//!   has taken the previous one, so a slow sync never queues stale state.
//!   Several events on one object in a burst send it once.
//! - The source keeps no objects, only the key and `resourceVersion` of
//!   each one the agent holds: a re-list (after `410 Gone`, a reconnect)
//!   sends what differs from that, removals of objects deleted while the
//!   watch was down included.
//! - Watches restart with kube-runtime's default backoff (client-go's) and
//!   re-list on `410 Gone`. While a watch fails, the agent gets
//!   [`SourceUpdate::Stale`] with the reason (and keeps the last good state);
//!   a cheap list per resource probes the API server every
//!   [`PROBE_INTERVAL`], and the first success sends an update (empty if
//!   nothing changed) that makes the agent ready again.
//!
//! The API server leaves out, as it does for kube-proxy, Services handed to
//! another proxy and the slices of headless Services ([`proxied_selector`]);
//! the rest is passed on as it is: the model filters and validates it.
//!
//! Where each concern lives:
//! - `watch`: the watchers, coalescing, stale reasons and probes (the
//!   source's task);
//! - `listwatch`: list-then-watch of Services and slices, their lists read
//!   as protobuf;
//! - `changes`: what the agent holds and what changed since, per resource;
//! - `events`: Kubernetes Events on invalid objects;
//! - `trigger`: `EndpointSlice` trigger times as programming latencies;
//! - here: configuration, the client, and the node facts from the Node.

mod changes;
mod events;
mod listwatch;
mod trigger;
mod watch;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Client, Config, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::{Changes, NodeChange, SourceSpec, SourceTask, SourceUpdate};
use crate::model::NodeContext;

pub use events::{EventReporter, involved_object};
pub use trigger::{TriggerTimes, parse_time};
pub use watch::proxied_selector;

/// A change this soon after the previous one is part of a burst: the
/// update waits until no change came for this long.
pub const QUIET: Duration = Duration::from_millis(20);
/// A steady stream of changes still yields an update this often.
pub const MAX_DELAY: Duration = Duration::from_millis(200);
/// How often a failing source checks whether the API server is back.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Label the `EndpointSlice` controller puts on the slices of a headless
/// Service (no cluster IP: nothing for a proxy to do).
pub const HEADLESS_LABEL: &str = crate::model::HEADLESS_LABEL;
/// Label of the node's topology zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// `EndpointSlice` annotation: when the change behind this version happened.
pub const TRIGGER_TIME_ANNOTATION: &str = crate::model::TRIGGER_TIME_ANNOTATION;
/// `reportingController` of the Events the agent raises.
pub const EVENT_CONTROLLER: &str = "lb-agent";
/// Reason of the Event raised on an invalid object.
pub const INVALID_REASON: &str = "InvalidObject";

/// How to reach the API server and which Node is ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSourceConfig {
    /// This node's name (`--node-name`, `NODE_NAME`).
    pub node_name: String,
    /// `--kubeconfig`; `None`: `KUBECONFIG`, `~/.kube/config`, in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Hand the parts of the first lists over parsed into the model's
    /// records ([`Changes::prepare`](crate::source::Changes::prepare)), on
    /// the source's thread, which made the objects: the agent's loop then
    /// only files them (at 100k Services the parsing and the freeing of
    /// the objects are seconds of CPU). Off, the parts carry the API
    /// objects, as every later update does.
    pub prepare_first_lists: bool,
}

/// The Kubernetes source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// No node name.
    #[error("--source kube needs the node's name: --node-name or NODE_NAME")]
    NoNodeName,
    /// The kubeconfig file is unusable.
    #[error("kubeconfig {path}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig and not in a cluster.
    #[error(
        "no cluster configuration: no --kubeconfig, KUBECONFIG or ~/.kube/config, and not in a pod"
    )]
    NoConfig(#[source] kube::config::InClusterError),
    /// The source's thread could not be started.
    #[error("cannot start the source's thread")]
    Runtime(#[source] std::io::Error),
}

/// Checks what can be checked before starting, then starts the source.
///
/// # Errors
/// No node name, an unreadable kubeconfig, or no configuration at all.
pub fn spawn(
    config: &KubeSourceConfig,
    tx: mpsc::Sender<SourceUpdate>,
) -> Result<SourceTask, KubeSourceError> {
    if config.node_name.is_empty() {
        return Err(KubeSourceError::NoNodeName);
    }
    precheck(config.kubeconfig.as_deref())?;
    let config = config.clone();
    // Every log line of the source names it.
    let span = tracing::info_span!("source", kind = "kube", node = %config.node_name);
    // A thread of its own: the responses' JSON is parsed there, beside the
    // agent's loop (which files the objects and writes the maps).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kube-source")
        .enable_all()
        .build()
        .map_err(KubeSourceError::Runtime)?;
    let task = runtime.spawn(async move { watch::run(&config, &tx).await }.instrument(span));
    Ok(SourceTask::on_runtime(task, runtime))
}

fn precheck(kubeconfig: Option<&Path>) -> Result<(), KubeSourceError> {
    if let Some(path) = kubeconfig {
        Kubeconfig::read_from(path).map_err(|source| KubeSourceError::Kubeconfig {
            path: path.to_owned(),
            source,
        })?;
        return Ok(());
    }
    let home_config = std::env::var_os("HOME")
        .map(|home| Path::new(&home).join(".kube/config"))
        .is_some_and(|path| path.exists());
    if std::env::var_os("KUBECONFIG").is_some() || home_config {
        return Ok(());
    }
    Config::incluster()
        .map(drop)
        .map_err(KubeSourceError::NoConfig)
}

/// A client for CONFIG's cluster.
///
/// # Errors
/// The configuration cannot be loaded or the client built.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {}", path.display(), with_causes(&e)))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {}", path.display(), with_causes(&e)))?
        }
        None => Config::infer()
            .await
            .map_err(|e| format!("cluster configuration: {}", with_causes(&e)))?,
    };
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {}", with_causes(&e)))
}

/// ERROR and its causes, `: `-joined (kube's errors name only the outermost).
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    crate::error::Causes(error).to_string()
}
/// The node facts the model needs, from the agent's Node object: its
/// `InternalIP` and then its `ExternalIP` addresses (both families,
/// deduplicated, each type in the Node's order: the first of a family is
/// the node's primary address, as kube-proxy's `GetNodeHostIPs` picks it)
/// and its zone label. Without a Node: the name only.
#[must_use]
pub fn node_context(node: Option<&Node>, name: &str) -> NodeContext {
    let Some(node) = node else {
        return NodeContext {
            name: name.to_owned(),
            addresses: Vec::new(),
            zone: None,
            ..NodeContext::default()
        };
    };
    let mut addresses: Vec<IpAddr> = Vec::new();
    let listed = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_deref())
        .unwrap_or_default();
    let by_type = ["InternalIP", "ExternalIP"]
        .into_iter()
        .flat_map(|type_| listed.iter().filter(move |address| address.type_ == type_));
    for address in by_type {
        match address.address.parse::<IpAddr>() {
            Ok(addr) if !addresses.contains(&addr) => addresses.push(addr),
            Ok(_) => {}
            Err(_) => tracing::warn!(
                node = name,
                address = %address.address,
                "Node address is not an IP address; ignored"
            ),
        }
    }
    NodeContext {
        name: name.to_owned(),
        addresses,
        zone: node.labels().get(ZONE_LABEL).cloned(),
        ..NodeContext::default()
    }
}

/// An [`EventReporter`] when SPEC is a cluster source (else `None`).
#[must_use]
pub fn event_reporter(spec: &SourceSpec) -> Option<EventReporter> {
    match spec {
        SourceSpec::Kube(config) => Some(EventReporter::spawn(config)),
        SourceSpec::File(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn node(addresses: &[(&str, &str)], zone: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                labels: zone.map(|z| [(ZONE_LABEL.to_owned(), z.to_owned())].into()),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(type_, address)| NodeAddress {
                            type_: (*type_).to_owned(),
                            address: (*address).to_owned(),
                        })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn node_context_takes_internal_and_external_ips_of_both_families() {
        let n = node(
            &[
                ("Hostname", "n1"),
                ("InternalIP", "192.0.2.10"),
                ("InternalIP", "2001:db8::10"),
                ("ExternalIP", "203.0.113.7"),
                ("ExternalIP", "192.0.2.10"),
                ("InternalDNS", "n1.example"),
                ("InternalIP", "not-an-ip"),
            ],
            Some("zone-a"),
        );
        let context = node_context(Some(&n), "n1");
        assert_eq!(context.name, "n1");
        assert_eq!(
            context.addresses,
            vec![
                "192.0.2.10".parse::<IpAddr>().unwrap(),
                "2001:db8::10".parse().unwrap(),
                "203.0.113.7".parse().unwrap(),
            ]
        );
        // InternalIPs first, whatever the Node's order.
        let n = node(
            &[("ExternalIP", "203.0.113.7"), ("InternalIP", "192.0.2.10")],
            None,
        );
        assert_eq!(
            node_context(Some(&n), "n1").addresses,
            vec![
                "192.0.2.10".parse::<IpAddr>().unwrap(),
                "203.0.113.7".parse().unwrap(),
            ]
        );
        assert_eq!(context.zone.as_deref(), Some("zone-a"));
        let bare = node_context(None, "n2");
        assert!(bare.addresses.is_empty() && bare.zone.is_none() && bare.name == "n2");
    }
}
