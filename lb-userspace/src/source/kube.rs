//! The Kubernetes source: kube-rs watchers and reflector stores for
//! Services, `EndpointSlice`s and the agent's own Node.
//!
//! - A snapshot is sent only once all three stores hold their initial list.
//! - Bursts are coalesced: after a change the source waits [`QUIET`] for
//!   more (at most [`MAX_DELAY`] in all), and it sends the next snapshot only
//!   once the agent has taken the previous one, so a slow sync never queues
//!   stale state.
//! - Watches restart with kube-runtime's default backoff (client-go's) and
//!   re-list on `410 Gone`. While a watch fails, the agent gets
//!   [`SourceUpdate::Stale`] with the reason (and keeps the last good state);
//!   a cheap list per resource probes the API server every
//!   [`PROBE_INTERVAL`], and the first success sends a fresh snapshot.
//!
//! Objects are passed on as they are: the model filters and validates them.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    pin::Pin,
    str::FromStr as _,
    time::{Duration, SystemTime},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Node, ObjectReference, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use tokio::{sync::mpsc, time::Instant};

use super::{Snapshot, SourceSpec, SourceUpdate};
use crate::model::{NodeContext, ObjectError};

/// After a change, wait this long for more before sending a snapshot.
pub const QUIET: Duration = Duration::from_millis(20);
/// A steady stream of changes still yields a snapshot this often.
pub const MAX_DELAY: Duration = Duration::from_millis(200);
/// How often a failing source checks whether the API server is back.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Label of the node's topology zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// `EndpointSlice` annotation: when the change behind this version happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
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
}

/// The Kubernetes source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// No node name.
    #[error("--source kube needs the node's name: --node-name or NODE_NAME")]
    NoNodeName,
    /// The kubeconfig file is unusable.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why, with its causes.
        reason: String,
    },
    /// No kubeconfig and not in a cluster.
    #[error(
        "no cluster configuration: no --kubeconfig, KUBECONFIG or ~/.kube/config, and not in a pod ({0})"
    )]
    NoConfig(String),
}

/// Checks what can be checked before starting, then starts the source.
///
/// # Errors
/// No node name, an unreadable kubeconfig, or no configuration at all.
pub fn spawn(
    config: &KubeSourceConfig,
    tx: mpsc::Sender<SourceUpdate>,
) -> Result<tokio::task::JoinHandle<()>, KubeSourceError> {
    if config.node_name.is_empty() {
        return Err(KubeSourceError::NoNodeName);
    }
    precheck(config.kubeconfig.as_deref())?;
    let config = config.clone();
    Ok(tokio::spawn(async move { run(&config, &tx).await }))
}

fn precheck(kubeconfig: Option<&Path>) -> Result<(), KubeSourceError> {
    if let Some(path) = kubeconfig {
        Kubeconfig::read_from(path).map_err(|e| KubeSourceError::Kubeconfig {
            path: path.to_owned(),
            reason: with_causes(&e),
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
        .map_err(|e| KubeSourceError::NoConfig(with_causes(&e)))
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

/// The three watched resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Services,
    Slices,
    Node,
}

impl Kind {
    const ALL: [Self; 3] = [Self::Services, Self::Slices, Self::Node];

    fn name(self) -> &'static str {
        match self {
            Self::Services => "Services",
            Self::Slices => "EndpointSlices",
            Self::Node => "Node",
        }
    }
}

/// What one watcher item means for the source.
enum Change {
    /// The initial list (or a re-list) is complete.
    Listed,
    /// An object was added, changed or deleted.
    Changed,
    /// Part of a list in progress: the store swaps it in at `Listed`.
    Listing,
}

type Signals = Pin<Box<dyn Stream<Item = (Kind, Result<Change, watcher::Error>)> + Send>>;

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self
                .services
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            slices: self.slices.state().iter().map(|s| (**s).clone()).collect(),
            node: self.node.state().first().map(|n| (**n).clone()),
            errors: Vec::new(),
        }
    }
}

fn node_selector(node_name: &str) -> String {
    format!("metadata.name={node_name}")
}

/// One reflector per resource, merged into one stream of signals.
fn watch_all(client: &Client, node_name: &str) -> (Stores, Signals) {
    fn watch<K>(api: Api<K>, config: watcher::Config, kind: Kind) -> (Store<K>, Signals)
    where
        K: Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let (reader, writer) = reflector::store();
        let stream = watcher(api, config)
            .default_backoff()
            // Never read, and a good part of each object's size.
            .modify(|object| object.managed_fields_mut().clear())
            .reflect(writer)
            .map(move |item| {
                let change = item.map(|event| match event {
                    watcher::Event::InitDone => Change::Listed,
                    watcher::Event::Init | watcher::Event::InitApply(_) => Change::Listing,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => Change::Changed,
                });
                (kind, change)
            });
        (reader, Box::pin(stream))
    }
    let (services, a) = watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        Kind::Services,
    );
    let (slices, b) = watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        Kind::Slices,
    );
    let (node, c) = watch(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&node_selector(node_name)),
        Kind::Node,
    );
    let stores = Stores {
        services,
        slices,
        node,
    };
    (stores, Box::pin(futures::stream::select_all([a, b, c])))
}

/// Source state between signals.
#[derive(Default)]
struct Progress {
    listed: BTreeMap<Kind, bool>,
    /// Resources whose watch last failed, with the error.
    failing: BTreeMap<Kind, String>,
    /// The stale reason last sent, so that a repeated error is sent once.
    stale_sent: Option<String>,
    /// A change not yet sent, since when.
    dirty_since: Option<Instant>,
    /// When to send it.
    deadline: Option<Instant>,
}

impl Progress {
    fn all_listed(&self) -> bool {
        Kind::ALL
            .iter()
            .all(|kind| self.listed.get(kind).copied().unwrap_or(false))
    }

    fn mark_dirty(&mut self, now: Instant) {
        let since = *self.dirty_since.get_or_insert(now);
        self.deadline = Some((now + QUIET).min(since + MAX_DELAY));
    }

    /// The stale reason to send now, if it is new.
    fn stale_update(&mut self) -> Option<String> {
        if self.failing.is_empty() {
            self.stale_sent = None;
            return None;
        }
        let reason = self
            .failing
            .iter()
            .map(|(kind, error)| format!("cannot watch {}: {error}", kind.name()))
            .collect::<Vec<_>>()
            .join("; ");
        if self.stale_sent.as_ref() == Some(&reason) {
            return None;
        }
        self.stale_sent = Some(reason.clone());
        Some(reason)
    }

    fn recovered(&mut self, kind: Kind, now: Instant) {
        if self.failing.remove(&kind).is_some() {
            tracing::info!(resource = kind.name(), "watch works again");
            self.mark_dirty(now);
        }
    }

    fn apply(&mut self, kind: Kind, change: Result<Change, watcher::Error>, now: Instant) {
        match change {
            Ok(Change::Listed) => {
                self.listed.insert(kind, true);
                self.recovered(kind, now);
                self.mark_dirty(now);
            }
            Ok(Change::Changed) => {
                self.recovered(kind, now);
                self.mark_dirty(now);
            }
            Ok(Change::Listing) => self.recovered(kind, now),
            // Compaction: routine, the watcher re-lists.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::info!(
                    resource = kind.name(),
                    "resource version expired (410 Gone); re-listing"
                );
            }
            Err(error) => {
                let error = with_causes(&error);
                tracing::warn!(resource = kind.name(), %error, "watch failed; retrying with backoff");
                self.failing.insert(kind, error);
            }
        }
    }
}

/// The source task: connect, then watch until the agent goes away.
async fn run(config: &KubeSourceConfig, tx: &mpsc::Sender<SourceUpdate>) {
    let mut delay = Duration::from_millis(500);
    let client = loop {
        match client(config.kubeconfig.as_deref()).await {
            Ok(client) => break client,
            Err(reason) => {
                tracing::error!(%reason, "cannot create the Kubernetes client; retrying");
                if tx.send(SourceUpdate::Stale(reason)).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    let (stores, mut signals) = watch_all(&client, &config.node_name);
    let mut progress = Progress::default();
    let mut probe: Option<tokio::task::JoinHandle<Result<(), String>>> = None;
    let mut probe_tick = tokio::time::interval(PROBE_INTERVAL);
    let mut warned_no_node = false;
    loop {
        let ready_to_send = progress.all_listed() && progress.failing.is_empty();
        let deadline = progress.deadline.filter(|_| ready_to_send);
        tokio::select! {
            () = tx.closed() => return,
            signal = signals.next() => {
                let Some((kind, change)) = signal else { return };
                progress.apply(kind, change, Instant::now());
                if let Some(reason) = progress.stale_update()
                    && tx.send(SourceUpdate::Stale(reason)).await.is_err()
                {
                    return;
                }
            }
            () = sleep_until(deadline) => {
                // The agent has not taken the previous snapshot yet: wait,
                // and send the state as it is then.
                if tx.capacity() < tx.max_capacity() {
                    progress.deadline = Some(Instant::now() + QUIET);
                    continue;
                }
                let snapshot = stores.snapshot();
                if snapshot.node.is_none() && !warned_no_node {
                    warned_no_node = true;
                    tracing::warn!(node = %config.node_name, "no Node of this name; node addresses and zone are unknown");
                }
                progress.dirty_since = None;
                progress.deadline = None;
                if tx.send(SourceUpdate::Snapshot(snapshot)).await.is_err() {
                    return;
                }
            }
            _ = probe_tick.tick(), if !progress.failing.is_empty() && probe.is_none() => {
                let (client, node) = (client.clone(), config.node_name.clone());
                probe = Some(tokio::spawn(async move { reachable(&client, &node).await }));
            }
            outcome = join(&mut probe) => match outcome {
                Ok(()) => {
                    for kind in Kind::ALL {
                        progress.recovered(kind, Instant::now());
                    }
                    progress.stale_update();
                }
                Err(error) => tracing::debug!(%error, "API server still unreachable"),
            },
        }
    }
}

/// ERROR and its causes, `: `-joined (kube's errors name only the outermost).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Waits for the probe in HANDLE (forever when there is none), then clears it.
async fn join(
    handle: &mut Option<tokio::task::JoinHandle<Result<(), String>>>,
) -> Result<(), String> {
    let Some(running) = handle.as_mut() else {
        return std::future::pending().await;
    };
    let outcome = running.await.unwrap_or_else(|e| Err(e.to_string()));
    *handle = None;
    outcome
}

/// One small list of each watched resource: the API server answers and we
/// may read what we watch.
async fn reachable(client: &Client, node_name: &str) -> Result<(), String> {
    let one = ListParams::default().limit(1);
    let check = async {
        Api::<Service>::all(client.clone()).list(&one).await?;
        Api::<EndpointSlice>::all(client.clone()).list(&one).await?;
        Api::<Node>::all(client.clone())
            .list(&one.clone().fields(&node_selector(node_name)))
            .await?;
        Ok::<(), kube::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(5), check).await {
        Ok(result) => result.map_err(|e| with_causes(&e)),
        Err(_) => Err("no answer within 5 s".to_owned()),
    }
}

/// The node facts the model needs, from the agent's Node object: its
/// `InternalIP` and `ExternalIP` addresses (both families, deduplicated, in
/// the Node's order) and its zone label. Without a Node: the name only.
#[must_use]
pub fn node_context(node: Option<&Node>, name: &str) -> NodeContext {
    let Some(node) = node else {
        return NodeContext {
            name: name.to_owned(),
            addresses: Vec::new(),
            zone: None,
        };
    };
    let mut addresses: Vec<IpAddr> = Vec::new();
    let listed = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_deref())
        .unwrap_or_default();
    for address in listed {
        if !matches!(address.type_.as_str(), "InternalIP" | "ExternalIP") {
            continue;
        }
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
    }
}

/// Raises a Kubernetes Event (type Warning, reason [`INVALID_REASON`]) on
/// each object the agent rejects. Publishing happens in the background; a
/// failure is logged, never retried (the log line and metric remain).
#[derive(Clone, Debug)]
pub struct EventReporter {
    tx: mpsc::UnboundedSender<(ObjectReference, String)>,
}

impl EventReporter {
    /// Starts the publisher for the cluster of CONFIG (client created on the
    /// first Event).
    #[must_use]
    pub fn spawn(config: &KubeSourceConfig) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(ObjectReference, String)>();
        let config = config.clone();
        tokio::spawn(async move {
            let reporter = Reporter {
                controller: EVENT_CONTROLLER.to_owned(),
                instance: Some(format!("{EVENT_CONTROLLER}-{}", config.node_name)),
            };
            let mut recorder: Option<Recorder> = None;
            while let Some((object, note)) = rx.recv().await {
                if recorder.is_none() {
                    match client(config.kubeconfig.as_deref()).await {
                        Ok(client) => recorder = Some(Recorder::new(client, reporter.clone())),
                        Err(error) => {
                            tracing::warn!(%error, "cannot raise Kubernetes Events");
                            continue;
                        }
                    }
                }
                let Some(recorder) = recorder.as_ref() else {
                    continue;
                };
                let event = invalid_event(note);
                if let Err(error) = recorder.publish(&event, &object).await {
                    tracing::warn!(
                        %error,
                        kind = ?object.kind,
                        namespace = ?object.namespace,
                        name = ?object.name,
                        "cannot raise a Kubernetes Event"
                    );
                }
            }
        });
        Self { tx }
    }

    /// Queues an Event on the object ERROR names, found in SNAPSHOT for its
    /// uid. Errors about files (not objects) raise none.
    pub fn report(&self, error: &ObjectError, snapshot: &Snapshot) {
        if let Some(object) = involved_object(error, snapshot) {
            let _ = self.tx.send((object, error.reason.clone()));
        }
    }
}

fn invalid_event(note: String) -> KubeEvent {
    // The API limits a note to 1 kB.
    let mut note = note;
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    KubeEvent {
        type_: EventType::Warning,
        reason: INVALID_REASON.to_owned(),
        note: Some(note),
        action: "Skipped".to_owned(),
        secondary: None,
    }
}

/// The object an error is about, as an Event's `regarding`.
#[must_use]
pub fn involved_object(error: &ObjectError, snapshot: &Snapshot) -> Option<ObjectReference> {
    let same = |namespace: Option<&str>, name: Option<&str>| {
        namespace.unwrap_or(crate::model::DEFAULT_NAMESPACE) == error.namespace
            && name == Some(error.name.as_str())
    };
    let reference = match error.kind {
        "Service" => snapshot
            .services
            .iter()
            .find(|s| same(s.metadata.namespace.as_deref(), s.metadata.name.as_deref()))
            .map(|s| s.object_ref(&())),
        "EndpointSlice" => snapshot
            .slices
            .iter()
            .find(|s| same(s.metadata.namespace.as_deref(), s.metadata.name.as_deref()))
            .map(|s| s.object_ref(&())),
        _ => return None,
    };
    // Not in the snapshot (should not happen): name it all the same.
    Some(reference.unwrap_or_else(|| {
        ObjectReference {
            api_version: Some(
                if error.kind == "Service" {
                    "v1"
                } else {
                    "discovery.k8s.io/v1"
                }
                .to_owned(),
            ),
            kind: Some(error.kind.to_owned()),
            namespace: Some(error.namespace.clone()),
            name: Some(error.name.clone()),
            ..ObjectReference::default()
        }
    }))
}

/// Turns `EndpointSlice` trigger-time annotations into network programming
/// latencies, as kube-proxy does: each distinct annotation value of a slice
/// counts once, and only changes made after the agent started.
#[derive(Debug)]
pub struct TriggerTimes {
    started: SystemTime,
    seen: HashMap<(String, String), String>,
}

impl TriggerTimes {
    /// Ignores trigger times before STARTED.
    #[must_use]
    pub fn new(started: SystemTime) -> Self {
        Self {
            started,
            seen: HashMap::new(),
        }
    }

    /// Trigger times of SLICES not seen before; call once their state is in
    /// the maps. Forgets slices that are gone.
    pub fn take_new(&mut self, slices: &[EndpointSlice]) -> Vec<SystemTime> {
        let mut fresh = Vec::new();
        let mut current = HashMap::with_capacity(slices.len());
        for slice in slices {
            let Some(value) = slice.annotations().get(TRIGGER_TIME_ANNOTATION) else {
                continue;
            };
            let key = (
                slice.metadata.namespace.clone().unwrap_or_default(),
                slice.metadata.name.clone().unwrap_or_default(),
            );
            if self.seen.get(&key) != Some(value)
                && let Some(time) = parse_time(value).filter(|t| *t >= self.started)
            {
                fresh.push(time);
            }
            current.insert(key, value.clone());
        }
        self.seen = current;
        fresh
    }
}

impl TriggerTimes {
    /// Trigger times of SLICES (changed ones) not seen before, forgetting
    /// the REMOVED ones: [`TriggerTimes::take_new`] for a source that sends
    /// changes instead of snapshots.
    pub fn take_changed(
        &mut self,
        slices: &[EndpointSlice],
        removed: &[crate::model::ObjectKey],
    ) -> Vec<SystemTime> {
        for (namespace, name) in removed {
            // Keys carry the defaulted namespace; annotations are kept by
            // the namespace as written.
            self.seen.remove(&(namespace.clone(), name.clone()));
            if namespace == crate::model::DEFAULT_NAMESPACE {
                self.seen.remove(&(String::new(), name.clone()));
            }
        }
        let mut fresh = Vec::new();
        for slice in slices {
            let key = (
                slice.metadata.namespace.clone().unwrap_or_default(),
                slice.metadata.name.clone().unwrap_or_default(),
            );
            let Some(value) = slice.annotations().get(TRIGGER_TIME_ANNOTATION) else {
                self.seen.remove(&key);
                continue;
            };
            if self.seen.get(&key) != Some(value)
                && let Some(time) = parse_time(value).filter(|t| *t >= self.started)
            {
                fresh.push(time);
            }
            self.seen.insert(key, value.clone());
        }
        fresh
    }
}

/// An RFC 3339 time, as the API writes annotations.
#[must_use]
pub fn parse_time(text: &str) -> Option<SystemTime> {
    Timestamp::from_str(text).ok().map(SystemTime::from)
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
        assert_eq!(context.zone.as_deref(), Some("zone-a"));
        let bare = node_context(None, "n2");
        assert!(bare.addresses.is_empty() && bare.zone.is_none() && bare.name == "n2");
    }

    fn slice(name: &str, trigger: Option<&str>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                annotations: trigger
                    .map(|t| [(TRIGGER_TIME_ANNOTATION.to_owned(), t.to_owned())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            ..EndpointSlice::default()
        }
    }

    #[test]
    fn trigger_times_count_each_change_once_and_skip_old_ones() {
        let started = parse_time("2025-01-01T00:00:00Z").unwrap();
        let mut times = TriggerTimes::new(started);
        let first = [
            slice("a", Some("2025-01-01T00:00:01Z")),
            slice("b", Some("2024-12-31T23:59:59Z")),
            slice("c", None),
            slice("d", Some("garbage")),
        ];
        assert_eq!(
            times.take_new(&first),
            vec![parse_time("2025-01-01T00:00:01Z").unwrap()]
        );
        assert!(times.take_new(&first).is_empty());
        let second = [
            slice("a", Some("2025-01-01T00:00:02.5Z")),
            slice("b", Some("2025-01-01T00:00:03Z")),
        ];
        assert_eq!(times.take_new(&second).len(), 2);
    }

    #[test]
    fn involved_object_names_the_object_with_its_uid() {
        let mut service = Service::default();
        service.metadata.name = Some("web".into());
        service.metadata.namespace = Some("prod".into());
        service.metadata.uid = Some("u-1".into());
        let snapshot = Snapshot {
            services: vec![service],
            ..Snapshot::default()
        };
        let error = ObjectError {
            kind: "Service",
            namespace: "prod".into(),
            name: "web".into(),
            reason: "bad".into(),
        };
        let reference = involved_object(&error, &snapshot).unwrap();
        assert_eq!(reference.uid.as_deref(), Some("u-1"));
        assert_eq!(reference.kind.as_deref(), Some("Service"));
        assert_eq!(reference.api_version.as_deref(), Some("v1"));
        let missing = ObjectError {
            kind: "EndpointSlice",
            name: "gone".into(),
            ..error.clone()
        };
        let reference = involved_object(&missing, &snapshot).unwrap();
        assert_eq!(
            reference.api_version.as_deref(),
            Some("discovery.k8s.io/v1")
        );
        assert!(reference.uid.is_none());
        let file = ObjectError {
            kind: "File",
            ..error
        };
        assert!(involved_object(&file, &snapshot).is_none());
    }

    #[test]
    fn stale_reason_is_sent_once_per_change() {
        let mut progress = Progress::default();
        let now = Instant::now();
        progress.failing.insert(Kind::Node, "refused".into());
        assert_eq!(
            progress.stale_update().as_deref(),
            Some("cannot watch Node: refused")
        );
        assert_eq!(progress.stale_update(), None);
        progress.recovered(Kind::Node, now);
        assert_eq!(progress.stale_update(), None);
        assert!(
            progress.deadline.is_some(),
            "recovery sends a fresh snapshot"
        );
    }
}
