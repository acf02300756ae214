//! The Kubernetes source: kube-rs watchers for Services, `EndpointSlice`s
//! and the agent's own Node, forwarded to the agent as [`Changes`].
//!
//! - The first update is sent only once all three resources are listed.
//! - Bursts are coalesced: after a change the source waits [`QUIET`] for
//!   more (at most [`MAX_DELAY`] in all), and it sends the next update only
//!   once the agent has taken the previous one, so a slow sync never queues
//!   stale state. Several events on one object in a burst send it once.
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

use std::{
    collections::{BTreeMap, HashMap, HashSet},
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
        watcher,
    },
};
use tokio::{sync::mpsc, time::Instant};
use tracing::Instrument as _;

use super::{Changes, NodeChange, SourceSpec, SourceUpdate};
use crate::model::{NodeContext, ObjectError, ObjectKey, SERVICE_PROXY_NAME_LABEL, key_of};

/// After a change, wait this long for more before sending an update.
pub const QUIET: Duration = Duration::from_millis(20);
/// A steady stream of changes still yields an update this often.
pub const MAX_DELAY: Duration = Duration::from_millis(200);
/// How often a failing source checks whether the API server is back.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Label the `EndpointSlice` controller puts on the slices of a headless
/// Service (no cluster IP: nothing for a proxy to do).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
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
    // Every log line of the source names it.
    let span = tracing::info_span!("source", kind = "kube", node = %config.node_name);
    Ok(tokio::spawn(
        async move { run(&config, &tx).await }.instrument(span),
    ))
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
    /// Part of a list in progress: its removals are known at `Listed`.
    Listing,
}

/// One watcher item, of whichever resource.
#[expect(
    clippy::large_enum_variant,
    reason = "one item at a time, moved into the tracker at once; a box buys nothing"
)]
enum Observed {
    Services(watcher::Event<Service>),
    Slices(watcher::Event<EndpointSlice>),
    Node(watcher::Event<Node>),
}

type Signals = Pin<Box<dyn Stream<Item = (Kind, Result<Observed, watcher::Error>)> + Send>>;

/// The objects of one resource as the agent holds them (their key and
/// `resourceVersion` only), and what changed since the last update.
struct Tracker<K> {
    /// Key -> `resourceVersion` of each object sent.
    sent: HashMap<ObjectKey, Option<String>>,
    /// Key -> the object's newest state not yet sent (`None`: deleted).
    pending: HashMap<ObjectKey, Option<K>>,
    /// During a (re-)list: the keys listed so far.
    listing: Option<HashSet<ObjectKey>>,
}

impl<K: Resource> Default for Tracker<K> {
    fn default() -> Self {
        Self {
            sent: HashMap::new(),
            pending: HashMap::new(),
            listing: None,
        }
    }
}

impl<K: Resource> Tracker<K> {
    /// Takes one watcher event.
    fn observe(&mut self, event: watcher::Event<K>) -> Change {
        match event {
            watcher::Event::Init => {
                self.listing = Some(HashSet::new());
                Change::Listing
            }
            watcher::Event::InitApply(object) => {
                let key = key_of(object.meta());
                if let Some(listing) = &mut self.listing {
                    listing.insert(key.clone());
                }
                self.applied(key, object);
                Change::Listing
            }
            watcher::Event::InitDone => {
                // What the list did not name was deleted meanwhile.
                if let Some(listed) = self.listing.take() {
                    let gone: Vec<ObjectKey> = self
                        .sent
                        .keys()
                        .chain(self.pending.keys())
                        .filter(|key| !listed.contains(*key))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.deleted(key);
                    }
                }
                Change::Listed
            }
            watcher::Event::Apply(object) => {
                self.applied(key_of(object.meta()), object);
                Change::Changed
            }
            watcher::Event::Delete(object) => {
                self.deleted(key_of(object.meta()));
                Change::Changed
            }
        }
    }

    fn applied(&mut self, key: ObjectKey, object: K) {
        let version = object.meta().resource_version.as_ref();
        let as_sent = version.is_some()
            && self
                .sent
                .get(&key)
                .is_some_and(|sent| sent.as_ref() == version);
        if as_sent {
            // A re-list of an object the agent holds already.
            self.pending.remove(&key);
        } else {
            self.pending.insert(key, Some(object));
        }
    }

    fn deleted(&mut self, key: ObjectKey) {
        if self.sent.contains_key(&key) {
            self.pending.insert(key, None);
        } else {
            self.pending.remove(&key);
        }
    }

    /// What changed since the last call: objects added or replaced, keys
    /// removed. From now on they count as sent.
    fn take(&mut self) -> (Vec<K>, Vec<ObjectKey>) {
        let mut applied = Vec::new();
        let mut removed = Vec::new();
        for (key, object) in self.pending.drain() {
            if let Some(object) = object {
                self.sent
                    .insert(key, object.meta().resource_version.clone());
                applied.push(object);
            } else {
                self.sent.remove(&key);
                removed.push(key);
            }
        }
        (applied, removed)
    }
}

/// One tracker per watched resource.
#[derive(Default)]
struct Trackers {
    services: Tracker<Service>,
    slices: Tracker<EndpointSlice>,
    node: Tracker<Node>,
}

impl Trackers {
    fn observe(&mut self, observed: Observed) -> Change {
        match observed {
            Observed::Services(event) => self.services.observe(event),
            Observed::Slices(event) => self.slices.observe(event),
            Observed::Node(event) => self.node.observe(event),
        }
    }

    /// Everything not yet sent, as one update.
    fn take_changes(&mut self) -> Changes {
        let (services, removed_services) = self.services.take();
        let (slices, removed_slices) = self.slices.take();
        let (mut nodes, removed_nodes) = self.node.take();
        let node = match nodes.pop() {
            Some(node) => Some(NodeChange::Set(Box::new(node))),
            None if !removed_nodes.is_empty() => Some(NodeChange::Removed),
            None => None,
        };
        Changes {
            services,
            removed_services,
            slices,
            removed_slices,
            node,
            ..Changes::default()
        }
    }
}

/// Nothing changed.
fn no_changes(changes: &Changes) -> bool {
    changes.services.is_empty()
        && changes.removed_services.is_empty()
        && changes.slices.is_empty()
        && changes.removed_slices.is_empty()
        && changes.node.is_none()
}

fn node_selector(node_name: &str) -> String {
    format!("metadata.name={node_name}")
}

/// kube-proxy's label selector for Services and `EndpointSlice`s: none
/// handed to another proxy, no slices of headless Services.
#[must_use]
pub fn proxied_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// One watcher per resource, merged into one stream.
fn watch_all(client: &Client, node_name: &str) -> Signals {
    fn watch<K>(
        api: Api<K>,
        config: watcher::Config,
        kind: Kind,
        wrap: fn(watcher::Event<K>) -> Observed,
    ) -> Signals
    where
        K: Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let stream = watcher(api, config)
            .default_backoff()
            // Never read, and a good part of each object's size.
            .modify(|object| object.managed_fields_mut().clear())
            .map(move |item| (kind, item.map(wrap)));
        Box::pin(stream)
    }
    let proxied = watcher::Config::default().labels(&proxied_selector());
    let services = watch(
        Api::<Service>::all(client.clone()),
        proxied.clone(),
        Kind::Services,
        Observed::Services,
    );
    let slices = watch(
        Api::<EndpointSlice>::all(client.clone()),
        proxied,
        Kind::Slices,
        Observed::Slices,
    );
    let node = watch(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&node_selector(node_name)),
        Kind::Node,
        Observed::Node,
    );
    Box::pin(futures::stream::select_all([services, slices, node]))
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
    /// The agent holds what was last sent: no stale reason since (and not
    /// the start). Otherwise the next update is sent even when empty, so
    /// that the agent is ready again.
    agent_current: bool,
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
        self.agent_current = false;
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
    let mut signals = watch_all(&client, &config.node_name);
    let mut trackers = Trackers::default();
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
                let Some((kind, item)) = signal else { return };
                let change = item.map(|observed| trackers.observe(observed));
                progress.apply(kind, change, Instant::now());
                if let Some(reason) = progress.stale_update()
                    && tx.send(SourceUpdate::Stale(reason)).await.is_err()
                {
                    return;
                }
            }
            () = sleep_until(deadline) => {
                // The agent has not taken the previous update yet: wait,
                // and send what changed until then.
                if tx.capacity() < tx.max_capacity() {
                    progress.deadline = Some(Instant::now() + QUIET);
                    continue;
                }
                let changes = trackers.take_changes();
                if trackers.node.sent.is_empty() && !warned_no_node {
                    warned_no_node = true;
                    tracing::warn!("no Node of this name; node addresses and zone are unknown");
                }
                progress.dirty_since = None;
                progress.deadline = None;
                if no_changes(&changes) && progress.agent_current {
                    continue;
                }
                progress.agent_current = true;
                if tx.send(SourceUpdate::Changes(changes)).await.is_err() {
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
        let span = tracing::info_span!("events", node = %config.node_name);
        tokio::spawn(
            async move {
                let reporter = Reporter {
                    controller: EVENT_CONTROLLER.to_owned(),
                    instance: Some(format!("{EVENT_CONTROLLER}-{}", config.node_name)),
                };
                let mut connected: Option<(Client, Recorder)> = None;
                while let Some((object, note)) = rx.recv().await {
                    if connected.is_none() {
                        match client(config.kubeconfig.as_deref()).await {
                            Ok(client) => {
                                let recorder = Recorder::new(client.clone(), reporter.clone());
                                connected = Some((client, recorder));
                            }
                            Err(error) => {
                                tracing::warn!(%error, "cannot raise Kubernetes Events");
                                continue;
                            }
                        }
                    }
                    let Some((client, recorder)) = connected.as_ref() else {
                        continue;
                    };
                    let object = with_uid(client, object).await;
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
            }
            .instrument(span),
        );
        Self { tx }
    }

    /// Queues an Event on the object ERROR names (its uid is read from the
    /// API server when the Event is raised). Errors about files (not
    /// objects) raise none.
    pub fn report(&self, error: &ObjectError) {
        if let Some(object) = involved_object(error) {
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

/// The object an error is about, as an Event's `regarding`, by name (the
/// agent keeps no objects): see [`with_uid`].
#[must_use]
pub fn involved_object(error: &ObjectError) -> Option<ObjectReference> {
    let api_version = match error.kind {
        "Service" => Service::api_version(&()),
        "EndpointSlice" => EndpointSlice::api_version(&()),
        _ => return None,
    };
    Some(ObjectReference {
        api_version: Some(api_version.into_owned()),
        kind: Some(error.kind.to_owned()),
        namespace: Some(error.namespace.clone()),
        name: Some(error.name.clone()),
        ..ObjectReference::default()
    })
}

/// REFERENCE with the uid of the object it names, as the API server has
/// it now (`kubectl describe` finds an object's Events by uid); as it is
/// when the object cannot be read.
async fn with_uid(client: &Client, reference: ObjectReference) -> ObjectReference {
    let (Some(namespace), Some(name)) = (reference.namespace.as_deref(), reference.name.as_deref())
    else {
        return reference;
    };
    let found = match reference.kind.as_deref() {
        Some("Service") => Api::<Service>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map(|found| found.map(|object| object.object_ref(&()))),
        Some("EndpointSlice") => Api::<EndpointSlice>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map(|found| found.map(|object| object.object_ref(&()))),
        _ => return reference,
    };
    match found {
        Ok(Some(found)) => found,
        Ok(None) => reference,
        Err(error) => {
            tracing::debug!(error = %with_causes(&error), namespace, name, "cannot read the object of an Event; raised without its uid");
            reference
        }
    }
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

    fn versioned(name: &str, version: u32) -> Service {
        let mut service = Service::default();
        service.metadata.name = Some(name.into());
        service.metadata.namespace = Some("default".into());
        service.metadata.resource_version = Some(version.to_string());
        service
    }

    /// Names of the objects and keys in one update, sorted.
    fn taken(tracker: &mut Tracker<Service>) -> (Vec<String>, Vec<String>) {
        let (applied, removed) = tracker.take();
        let mut applied: Vec<String> = applied
            .iter()
            .map(|s| {
                format!(
                    "{}@{}",
                    s.name_any(),
                    s.resource_version().unwrap_or_default()
                )
            })
            .collect();
        let mut removed: Vec<String> = removed.into_iter().map(|(_, name)| name).collect();
        applied.sort();
        removed.sort();
        (applied, removed)
    }

    #[test]
    fn a_burst_sends_each_object_once_and_a_relist_only_the_difference() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut tracker = Tracker::<Service>::default();
        for event in [
            Init,
            InitApply(versioned("a", 1)),
            InitApply(versioned("b", 2)),
            InitDone,
        ] {
            tracker.observe(event);
        }
        assert_eq!(
            taken(&mut tracker),
            (vec!["a@1".into(), "b@2".into()], vec![])
        );
        // A burst: the newest state of each object, once; an object added
        // and deleted within it is not sent at all.
        for event in [
            Apply(versioned("a", 3)),
            Apply(versioned("a", 4)),
            Delete(versioned("b", 5)),
            Apply(versioned("c", 6)),
            Delete(versioned("c", 7)),
        ] {
            tracker.observe(event);
        }
        assert_eq!(taken(&mut tracker), (vec!["a@4".into()], vec!["b".into()]));
        // A re-list: unchanged objects are not sent again.
        for event in [
            Init,
            InitApply(versioned("a", 4)),
            InitApply(versioned("d", 8)),
            InitDone,
        ] {
            tracker.observe(event);
        }
        assert_eq!(taken(&mut tracker), (vec!["d@8".into()], vec![]));
        // A re-list that no longer names what was sent, nor a change not
        // yet sent: all of it is removed.
        for event in [Apply(versioned("d", 9)), Init, InitDone] {
            tracker.observe(event);
        }
        assert_eq!(taken(&mut tracker), (vec![], vec!["a".into(), "d".into()]));
        assert!(tracker.sent.is_empty());
    }

    #[test]
    fn involved_object_names_services_and_slices_only() {
        let error = ObjectError {
            kind: "Service",
            namespace: "prod".into(),
            name: "web".into(),
            reason: "bad".into(),
        };
        let reference = involved_object(&error).unwrap();
        assert_eq!(reference.kind.as_deref(), Some("Service"));
        assert_eq!(reference.api_version.as_deref(), Some("v1"));
        assert_eq!(reference.namespace.as_deref(), Some("prod"));
        assert_eq!(reference.name.as_deref(), Some("web"));
        assert!(reference.uid.is_none(), "read when the Event is raised");
        let slice = ObjectError {
            kind: "EndpointSlice",
            name: "web-1".into(),
            ..error.clone()
        };
        let reference = involved_object(&slice).unwrap();
        assert_eq!(
            reference.api_version.as_deref(),
            Some("discovery.k8s.io/v1")
        );
        let file = ObjectError {
            kind: "File",
            ..error
        };
        assert!(involved_object(&file).is_none());
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
        assert!(progress.deadline.is_some(), "recovery sends an update");
    }
}
