//! The source's task: the watchers, coalescing into updates, stale
//! reasons and probes while the API server is unreachable.

use std::{collections::BTreeMap, pin::Pin, time::Duration};

use futures::{FutureExt as _, Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::ListParams,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{sync::mpsc, time::Instant};

use super::changes::{Change, Observed, Trackers, no_changes};
use super::listwatch;
use super::{
    HEADLESS_LABEL, KubeSourceConfig, MAX_DELAY, PROBE_INTERVAL, QUIET, SourceUpdate, client,
    with_causes,
};
use crate::model::{ListedService, ListedSlice, SERVICE_PROXY_NAME_LABEL};

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

/// Objects of the first lists handed to the agent at a time.
pub(super) const FIRST_LIST_BATCH: usize = 1000;
/// Signals already queued that are taken in a row before the loop looks
/// at its deadline again.
const DRAIN_LIMIT: usize = 256;
/// How soon to look again when the agent has not taken the previous update.
const AGENT_BUSY_RETRY: Duration = Duration::from_millis(1);

type Signals = Pin<Box<dyn Stream<Item = (Kind, Result<Observed, watcher::Error>)> + Send>>;

fn node_selector(node_name: &str) -> String {
    format!("metadata.name={node_name}")
}

/// kube-proxy's label selector for Services and `EndpointSlice`s: none
/// handed to another proxy, no slices of headless Services.
#[must_use]
pub fn proxied_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// One watcher per resource, merged into one stream: Services and
/// slices listed as protobuf ([`listwatch`]), the Node by kube-runtime.
fn watch_all(client: &Client, node_name: &str) -> Signals {
    fn signals<K: Send + 'static>(
        events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
        kind: Kind,
        wrap: fn(watcher::Event<K>) -> Observed,
    ) -> Signals {
        let stream = events
            .default_backoff()
            .map(move |item| (kind, item.map(wrap)));
        Box::pin(stream)
    }
    // The listed forms keep no managed fields (nor any other metadata the
    // model does not read).
    let services = signals(
        listwatch::watcher::<ListedService>(client.clone(), proxied_selector()),
        Kind::Services,
        Observed::Services,
    );
    let slices = signals(
        listwatch::watcher::<ListedSlice>(client.clone(), proxied_selector()),
        Kind::Slices,
        Observed::Slices,
    );
    let node = signals(
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&node_selector(node_name)),
        )
        // Never read, and a good part of the Node's size.
        .modify(|node| node.managed_fields_mut().clear()),
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
    /// When the last change was seen: one within [`QUIET`] of it is part
    /// of a burst, and waits for more.
    last_change: Option<Instant>,
    /// When to send it.
    deadline: Option<Instant>,
    /// The agent holds what was last sent: no stale reason since (and not
    /// the start). Otherwise the next update is sent even when empty, so
    /// that the agent is ready again.
    agent_current: bool,
    /// The first complete update was sent.
    first_sent: bool,
}

impl Progress {
    fn all_listed(&self) -> bool {
        Kind::ALL
            .iter()
            .all(|kind| self.listed.get(kind).copied().unwrap_or(false))
    }

    /// A change seen at NOW: after a quiet spell it is due at once (a lone
    /// change waits for nothing, and what arrived with it goes along);
    /// within a burst the update waits until the burst has been quiet for
    /// [`QUIET`], or [`MAX_DELAY`] after its first unsent change, so that a
    /// storm cannot hold syncs back.
    fn mark_dirty(&mut self, now: Instant) {
        let in_burst = self
            .last_change
            .is_some_and(|last| now.saturating_duration_since(last) < QUIET);
        self.last_change = Some(now);
        let since = *self.dirty_since.get_or_insert(now);
        let due = self.deadline.filter(|deadline| *deadline <= now);
        self.deadline = Some(match due {
            Some(due) => due,
            None if in_burst => (now + QUIET).min(since + MAX_DELAY),
            None => now,
        });
    }

    /// What changed was taken for an update: nothing is due.
    fn taken(&mut self) {
        self.dirty_since = None;
        self.deadline = None;
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
pub(super) async fn run(config: &KubeSourceConfig, tx: &mpsc::Sender<SourceUpdate>) {
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
                let Some(signal) = signal else { return };
                if on_signal(signal, &mut trackers, &mut progress, tx, config.prepare_first_lists).await.is_err() {
                    return;
                }
                // What has already arrived goes into the same update (a
                // few events read at once are one change); bounded, so
                // that a storm still lets the deadline fire.
                for _ in 0..DRAIN_LIMIT {
                    let Some(signal) = signals.next().now_or_never() else { break };
                    let Some(signal) = signal else { return };
                    if on_signal(signal, &mut trackers, &mut progress, tx, config.prepare_first_lists).await.is_err() {
                        return;
                    }
                }
            }
            () = sleep_until(deadline) => {
                // The agent has not taken the previous update yet: wait,
                // and send what changed until then.
                if tx.capacity() < tx.max_capacity() {
                    progress.deadline = Some(Instant::now() + AGENT_BUSY_RETRY);
                    continue;
                }
                let changes = trackers.take_changes(false);
                if trackers.node.sent.is_empty() && !warned_no_node {
                    warned_no_node = true;
                    tracing::warn!("no Node of this name; node addresses and zone are unknown");
                }
                progress.taken();
                if no_changes(&changes) && progress.agent_current {
                    continue;
                }
                progress.agent_current = true;
                progress.first_sent = true;
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

/// The agent's channel went away: the source ends.
struct Closed;

/// One watcher signal into the trackers and PROGRESS; sends the parts of
/// the first lists and stale reasons as they come.
async fn on_signal(
    (kind, item): (Kind, Result<Observed, watcher::Error>),
    trackers: &mut Trackers,
    progress: &mut Progress,
    tx: &mpsc::Sender<SourceUpdate>,
    prepare: bool,
) -> Result<(), Closed> {
    let change = item.map(|observed| trackers.observe(observed));
    progress.apply(kind, change, Instant::now());
    // The first lists go to the agent's model as they arrive (it syncs
    // only at the complete update): at 100k Services the API objects of
    // all of them would be ~1 GiB at once.
    if !progress.first_sent && trackers.pending_objects() >= FIRST_LIST_BATCH {
        let mut part = trackers.take_changes(prepare);
        part.more_follow = true;
        tx.send(SourceUpdate::Changes(part))
            .await
            .map_err(|_| Closed)?;
    }
    if let Some(reason) = progress.stale_update() {
        tx.send(SourceUpdate::Stale(reason))
            .await
            .map_err(|_| Closed)?;
    }
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        // Due already: at once, not at the timer's next millisecond tick.
        Some(deadline) if deadline <= Instant::now() => {}
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

#[cfg(test)]
mod tests {
    use super::*;

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

    const MS: Duration = Duration::from_millis(1);

    /// A change after a quiet spell is due at once, with whatever arrives
    /// before it goes; one within [`QUIET`] of the previous change waits
    /// for the burst to end.
    #[test]
    fn a_lone_change_is_due_at_once_and_a_burst_waits() {
        let mut progress = Progress::default();
        let t0 = Instant::now();
        progress.mark_dirty(t0);
        assert_eq!(progress.deadline, Some(t0), "the first change: at once");
        // Arrived with it, before the update went: still due at once.
        progress.mark_dirty(t0 + MS / 10);
        assert_eq!(progress.deadline, Some(t0));
        progress.taken();
        // The burst goes on: wait for it to be quiet.
        progress.mark_dirty(t0 + 5 * MS);
        assert_eq!(progress.deadline, Some(t0 + 5 * MS + QUIET));
        progress.mark_dirty(t0 + 15 * MS);
        assert_eq!(progress.deadline, Some(t0 + 15 * MS + QUIET));
        progress.taken();
        // Quiet for QUIET since the last change: the next one is lone.
        let later = t0 + 15 * MS + QUIET;
        progress.mark_dirty(later);
        assert_eq!(progress.deadline, Some(later));
        // A pending change that could not go yet (the agent was busy, a
        // watch failed) and is overdue stays due.
        progress.taken();
        progress.deadline = Some(later + MS);
        progress.dirty_since = Some(later + MS);
        progress.mark_dirty(later + 3 * MS);
        assert_eq!(progress.deadline, Some(later + MS));
    }

    /// A storm (a change every few milliseconds, never quiet) still gets
    /// an update at most [`MAX_DELAY`] after its first unsent change.
    #[test]
    fn a_storm_is_sent_within_max_delay() {
        let mut progress = Progress::default();
        let t0 = Instant::now();
        progress.mark_dirty(t0);
        progress.taken();
        let first_unsent = t0 + 5 * MS;
        let mut now = first_unsent;
        while now < t0 + 3 * MAX_DELAY {
            progress.mark_dirty(now);
            let deadline = progress.deadline.expect("a change is due");
            assert!(deadline <= first_unsent + MAX_DELAY, "{:?}", deadline - t0);
            assert!(deadline > now, "a burst waits");
            if deadline <= now + 5 * MS {
                break;
            }
            now += 5 * MS;
        }
        assert_eq!(progress.deadline, Some(first_unsent + MAX_DELAY));
    }
}
