//! One sync: the source's update into the model, the model's changes into a
//! plan, the plan into the maps, and what the sync learnt into the shared
//! state (counters, readiness, Events, health-check listeners).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use super::{
    AgentConfig, Shared, lock, piecewise,
    timers::{Due, SyncTimers, UNREADY_AFTER_FAILURES},
};
use crate::{
    datapath::{
        capacity::Shortfall,
        maglev::MaglevSync,
        maps::{Maps, MapsError},
    },
    error::Causes,
    http::healthcheck::HealthServers,
    model,
    node::{self, NodeSettings},
    plan::{self, DatapathState, Op, PlanIndex},
    source::{
        self, Changes, Snapshot, SourceSpec, SourceUpdate,
        kube::{EventReporter, TriggerTimes},
    },
};

/// What the agent wants in the maps, kept between syncs so that a change
/// costs O(change).
pub(super) struct Desired {
    model: model::Incremental,
    /// This agent's Node object, as the source last gave it (kube source).
    node: Option<k8s_openapi::api::core::v1::Node>,
    /// `None` when the next plan must cover everything: first sync, after
    /// a failed write or a plan with problems.
    plan_index: Option<PlanIndex>,
}

impl Desired {
    pub(super) fn new(config: &AgentConfig) -> Self {
        let mut model = model::Incremental::new(model::NodeContext::default());
        model.set_trust_resource_versions(matches!(config.source, SourceSpec::Kube(_)));
        Self {
            model,
            node: None,
            plan_index: None,
        }
    }
}

/// Per-sync extras beyond the maps.
pub(super) struct Hooks {
    /// Node settings from the flags.
    node_settings: NodeSettings,
    /// The node configuration last written to the datapath.
    datapath_config: Option<lb_common::LbConfig>,
    /// `healthCheckNodePort` listeners.
    health: HealthServers,
    /// This node's name (kube source), for the model's `NodeContext`.
    node_name: String,
    /// Raises Events on invalid objects (kube source only).
    events: Option<EventReporter>,
    /// Turns slice trigger times into `network_programming` observations.
    trigger_times: TriggerTimes,
    /// Trigger times of changed slices, observed once their state is in
    /// the maps.
    pending_trigger_times: Vec<SystemTime>,
    /// The Maglev tables written (`--lb-algorithm`, `--maglev-external`).
    maglev: MaglevSync,
    /// Destroys the node's connected UDP sockets whose backend left
    /// (socket-level load balancing on).
    sockets: Option<super::sockets::Reaper>,
}

impl Hooks {
    pub(super) fn new(config: &AgentConfig) -> Self {
        Self {
            node_name: match &config.source {
                SourceSpec::Kube(kube) => kube.node_name.clone(),
                SourceSpec::File(_) => String::new(),
            },
            events: source::kube::event_reporter(&config.source),
            trigger_times: TriggerTimes::new(SystemTime::now()),
            pending_trigger_times: Vec::new(),
            node_settings: config.node.clone(),
            datapath_config: None,
            health: HealthServers::default(),
            maglev: MaglevSync::new(config.capacities.maglev),
            sockets: (config.socket_lb.mode != crate::datapath::sock::SockLbMode::Off).then(|| {
                super::sockets::Reaper::new(
                    &config.pin_path,
                    config.socket_lb.mode == crate::datapath::sock::SockLbMode::All,
                )
            }),
        }
    }
}

impl Hooks {
    /// The agent's proxy health, for the node health server.
    pub(super) fn proxy_health(&self) -> Arc<Mutex<crate::http::node_health::ProxyHealth>> {
        self.health.proxy_health()
    }
}

/// Model and extras before the maps exist: what the source's first
/// updates feed while the program loads.
pub(super) struct Pending {
    pub(super) desired: Desired,
    pub(super) hooks: Hooks,
}

impl Pending {
    /// Puts changes into the model (not yet committed); returns the
    /// source's errors.
    pub(super) fn feed(&mut self, changes: Changes) -> Vec<model::ObjectError> {
        let fed = changes.feed(&mut self.desired.model);
        if let Some(node) = fed.node {
            self.desired.node = node.into_node();
        }
        let network_programming = self
            .hooks
            .trigger_times
            .take_changed(fed.triggers, &fed.removed_slices);
        self.hooks.pending_trigger_times.extend(network_programming);
        fed.errors
    }
}

/// Everything a sync reads and writes: the maps and what they hold, the
/// model, and the state the HTTP server shows.
pub(super) struct Reconciler {
    maps: Arc<Mutex<Maps>>,
    /// What the maps hold, as the agent wrote it.
    state: Arc<Mutex<DatapathState>>,
    pending: Pending,
    shared: Arc<Mutex<Shared>>,
    /// The invalid objects reported so far (each is logged once).
    reported: BTreeSet<String>,
    /// What the source last said it cannot read (kept for the syncs the
    /// timers start).
    source_errors: Vec<model::ObjectError>,
    /// Retry and resync deadlines.
    timers: SyncTimers,
    /// A read-only handle on the pinned maps, for resyncs that read them
    /// back off the agent's loop (`None`: read them on it).
    reader: Option<Arc<Maps>>,
    /// Passes done: a resync's read is compared only if none happened
    /// while it ran.
    passes: u64,
}

/// A resync's read of every map, done on a blocking thread: at 100k
/// Services it walks millions of entries, one syscall each, which must not
/// hold up the syncs.
pub(super) struct ReadBack {
    /// The passes done when the read started.
    passes: u64,
    reader: Arc<Maps>,
}

impl ReadBack {
    /// Reads the maps (blocking).
    pub(super) fn run(self) -> MapsRead {
        MapsRead {
            passes: self.passes,
            read: self.reader.read_state(),
        }
    }
}

/// What a resync read back.
pub(super) struct MapsRead {
    passes: u64,
    read: Result<DatapathState, crate::datapath::maps::MapsError>,
}

/// What one pass did.
struct Outcome {
    writes: u64,
    failures: u64,
    elapsed: std::time::Duration,
    /// When the timers retry, if the pass did not write everything.
    retry_in: Option<std::time::Duration>,
    /// Frontends and backends in the maps after the pass.
    frontends: usize,
    backends: usize,
    /// Writes refused by full maps, and the Service ports left out.
    shortfall: Shortfall,
    unfit: Vec<String>,
}

/// One update from the source.
enum Input {
    Snapshot(Box<Snapshot>),
    Changes(Changes),
}

impl Input {
    /// What the sync's span calls its trigger.
    fn trigger(&self) -> &'static str {
        match self {
            Self::Snapshot(_) => "snapshot",
            Self::Changes(_) => "changes",
        }
    }
}

impl Reconciler {
    pub(super) fn new(
        maps: Arc<Mutex<Maps>>,
        state: Arc<Mutex<DatapathState>>,
        pending: Pending,
        shared: Arc<Mutex<Shared>>,
        resync_every: Option<std::time::Duration>,
        reader: Option<Arc<Maps>>,
    ) -> Self {
        Self {
            maps,
            state,
            pending,
            shared,
            reported: BTreeSet::new(),
            source_errors: Vec::new(),
            timers: SyncTimers::new(resync_every, Instant::now()),
            reader,
            passes: 0,
        }
    }

    /// When [`Self::on_timer`] wants to run next.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// A retry or a resync, whichever is due. A resync with a reader
    /// returns the read to run on a blocking thread (its result goes to
    /// [`Self::finish_resync`]); without one it reads the maps here.
    pub(super) fn on_timer(&mut self) -> Option<ReadBack> {
        match self.timers.take_due(Instant::now())? {
            Due::Retry => {
                lock(&self.shared).sync_retries += 1;
                self.sync(None);
                None
            }
            Due::Resync => {
                let passes = self.passes;
                if let Some(reader) = &self.reader {
                    return Some(ReadBack {
                        passes,
                        reader: Arc::clone(reader),
                    });
                }
                let read = lock(&self.maps).read_state();
                self.finish_resync(MapsRead { passes, read });
                None
            }
        }
    }

    /// Compares what a resync read back with what the agent believes it
    /// wrote and, where they differ (an entry deleted or overwritten behind
    /// its back, a write that failed unnoticed), plans against what is
    /// really there and writes the difference. A read during which the
    /// agent wrote is stale: it is dropped (the next resync reads again).
    pub(super) fn finish_resync(&mut self, maps_read: MapsRead) {
        let span = tracing::info_span!("resync");
        let _entered = span.enter();
        let read = match maps_read.read {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(error = %Causes(&error), "cannot read the maps back");
                return;
            }
        };
        if maps_read.passes != self.passes {
            tracing::debug!(
                "the maps changed while they were read back; the next resync reads again"
            );
            return;
        }
        lock(&self.shared).resyncs += 1;
        {
            let mut state = lock(&self.state);
            if *state == read {
                return;
            }
            *state = read;
        }
        self.pending.desired.plan_index = None;
        let writes = self.sync(None);
        if writes > 0 {
            tracing::warn!(
                writes,
                "the maps had drifted from the agent's state; repaired"
            );
            lock(&self.shared).drift_repairs += writes;
        }
    }

    /// One update from the source: a sync, or (while more follow) only into
    /// the model.
    pub(super) fn on_update(&mut self, update: SourceUpdate) {
        if !matches!(update, SourceUpdate::Stale(_)) {
            lock(&self.pending.hooks.proxy_health()).queued(Instant::now());
        }
        match update {
            SourceUpdate::Snapshot(snapshot) => {
                self.sync(Some(Input::Snapshot(Box::new(snapshot))));
            }
            SourceUpdate::Changes(changes) if changes.more_follow => {
                self.pending.feed(changes);
            }
            SourceUpdate::Changes(changes) => {
                self.sync(Some(Input::Changes(changes)));
            }
            SourceUpdate::Stale(reason) => {
                tracing::error!(%reason, "source has no fresh state; keeping the last good state");
                // Not ready until the source delivers again (the next
                // snapshot's sync makes it ready); /readyz says why.
                let mut shared = lock(&self.shared);
                shared.ready = false;
                shared.not_ready_reason = reason;
            }
        }
    }

    /// One pass: model, diff, apply; `None` is a pass the timers start
    /// (nothing new from the source). Returns the map writes done.
    fn sync(&mut self, input: Option<Input>) -> u64 {
        self.passes += 1;
        let span = tracing::info_span!(
            "sync",
            trigger = input.as_ref().map_or("timer", Input::trigger)
        );
        let _entered = span.enter();
        let started = Instant::now();
        let snapshot = match input {
            Some(Input::Snapshot(mut snapshot)) => {
                self.pending.desired.node = snapshot.node.take();
                self.pending
                    .desired
                    .model
                    .reset(&snapshot.services, &snapshot.slices);
                self.source_errors = std::mem::take(&mut snapshot.errors);
                Some(snapshot)
            }
            Some(Input::Changes(changes)) => {
                self.source_errors = self.pending.feed(changes);
                None
            }
            None => None,
        };
        let node = self.node_context();
        lock(&self.pending.hooks.proxy_health()).set_node(
            self.pending.desired.node.as_ref(),
            !self.pending.hooks.node_name.is_empty(),
        );
        // A plan over everything does not read the changes; on a first
        // sync they would be every frontend (~70 MiB at 100k Services).
        let changes = if self.pending.desired.plan_index.is_none() {
            self.pending.desired.model.commit_for_full_plan();
            model::FrontendChanges::new()
        } else {
            self.pending.desired.model.commit()
        };
        self.write_node_config(&node);
        let hooks = &mut self.pending.hooks;
        hooks
            .health
            .update(&self.pending.desired.model.health_checks());
        self.report_errors();
        let outcome = self.plan_and_write(&changes, started);
        self.record(outcome, snapshot.as_deref())
    }

    /// Plans the model's changes against what the maps hold and writes them.
    fn plan_and_write(&mut self, changes: &model::FrontendChanges, started: Instant) -> Outcome {
        let state = Arc::clone(&self.state);
        let mut state = lock(&state);
        let desired = &mut self.pending.desired;
        let frontends = desired.model.frontends();
        let mut shortfall = Shortfall::default();
        let piecewise = if desired.plan_index.is_none() && piecewise::suits(&state) {
            piecewise::plan_and_write(
                &mut state,
                frontends,
                &mut lock(&self.maps),
                &mut |op, error| note_failure(&mut shortfall, op, error),
            )
        } else {
            None
        };
        let (plan, applied) = if let Some(done) = piecewise {
            done
        } else {
            let mut plan = match &mut desired.plan_index {
                Some(index) => plan::diff_changes(&state, index, frontends, changes),
                None => plan::diff(&state, frontends),
            };
            let applied = apply_plan(
                &mut plan,
                &mut lock(&self.maps),
                &mut state,
                desired,
                &mut shortfall,
            );
            (plan, applied)
        };
        for problem in &plan.problems {
            tracing::warn!(%problem, "frontend not fully programmed");
        }
        if !plan.problems.is_empty() {
            // Left-out frontends are retried by a plan over everything.
            desired.plan_index = None;
        }
        let Applied {
            writes,
            mut failures,
            sizes,
            had_ops,
            backends_changed,
        } = applied;
        // After the plan: a table names only backends already written.
        let maglev = self.pending.hooks.maglev.sync(
            &state,
            desired.model.frontends(),
            lock(&self.maps).maglev(),
        );
        failures += maglev.failures;
        if let Some(reaper) = &self.pending.hooks.sockets
            && backends_changed
        {
            reaper.after_backend_change(&state);
        }
        let unfit = shortfall.services(desired.model.frontends(), &plan.ops);
        if !shortfall.is_empty() {
            shortfall.log(&unfit);
        }
        let elapsed = started.elapsed();
        if had_ops {
            tracing::info!(
                writes,
                failures,
                frontends = state.frontends.len(),
                backends = state.backends.len(),
                millis = elapsed.as_secs_f64() * 1000.0,
                "synced"
            );
        }
        // After a plan over everything, index what was written, once the ops
        // are gone (a plan over everything written at once, onto pinned
        // maps, is the largest allocation of its sync).
        let plan_complete = failures == 0 && plan.problems.is_empty();
        let retry_in = self
            .timers
            .after_sync(failures > 0, plan_complete, Instant::now());
        drop(plan);
        if let Some(sizes) = sizes {
            sizes.repack_grown(&mut state);
        }
        if plan_complete && desired.plan_index.is_none() {
            desired.plan_index = Some(PlanIndex::new(&state, desired.model.frontends()));
        }
        Outcome {
            writes,
            failures,
            elapsed,
            retry_in,
            frontends: state.frontends.len(),
            backends: state.backends.len(),
            shortfall,
            unfit,
        }
    }

    /// Puts what a pass did into the shared state: counters, latencies,
    /// readiness and its reason. Returns the map writes done.
    fn record(&mut self, outcome: Outcome, snapshot: Option<&Snapshot>) -> u64 {
        let Outcome {
            writes,
            failures,
            elapsed,
            retry_in,
            frontends,
            backends,
            shortfall,
            unfit,
        } = outcome;
        let mut shared = lock(&self.shared);
        shared.map_writes += writes;
        shared.map_write_errors += failures;
        shared.capacity.record(&shortfall, unfit);
        shared.invalid_objects = self.reported.len() as u64;
        shared.last_sync_seconds = elapsed.as_secs_f64();
        shared.frontends = frontends;
        shared.backends = backends;
        shared.sync_duration.observe(elapsed.as_secs_f64());
        if failures == 0 {
            let written = SystemTime::now();
            let hooks = &mut self.pending.hooks;
            let triggers = match snapshot {
                Some(snapshot) => hooks.trigger_times.take_new(&snapshot.slices),
                None => std::mem::take(&mut hooks.pending_trigger_times),
            };
            for trigger in triggers {
                let latency = written.duration_since(trigger).unwrap_or_default();
                shared.network_programming.observe(latency.as_secs_f64());
            }
            shared.syncs += 1;
            shared.ready = true;
            shared.not_ready_reason.clear();
            lock(&self.pending.hooks.proxy_health()).updated(written);
            return writes;
        }
        shared.sync_errors += 1;
        let mut detail =
            retry_in.map_or_else(String::new, |delay| format!("; retrying in {delay:?}"));
        let unfit = shared.capacity.reason();
        if !unfit.is_empty() {
            detail = format!("; {unfit}{detail}");
        }
        if shared.syncs == 0 {
            shared.ready = false;
            shared.not_ready_reason =
                format!("{failures} map writes failed in the first sync{detail}");
        } else if self.timers.failed_in_a_row >= UNREADY_AFTER_FAILURES {
            // The maps no longer follow the cluster: an operator (and a
            // rollout waiting on readiness) must see it.
            shared.ready = false;
            shared.not_ready_reason = format!(
                "syncs keep failing: {failures} map writes failed in the last sync, {} syncs in a row{detail}",
                self.timers.failed_in_a_row
            );
        }
        writes
    }

    /// The node as this sync sees it (flags over the Node object over the
    /// interfaces), set on the model.
    fn node_context(&mut self) -> model::NodeContext {
        let desired = &mut self.pending.desired;
        let hooks = &self.pending.hooks;
        let from_source = source::kube::node_context(desired.node.as_ref(), &hooks.node_name);
        let node = node::context(&hooks.node_settings, &from_source);
        desired.model.set_node(&node);
        node
    }

    /// Logs (and raises Events for) errors not reported before; remembers
    /// the current ones.
    fn report_errors(&mut self) {
        let model_errors = self.pending.desired.model.errors();
        let mut current_errors = BTreeSet::new();
        for error in self.source_errors.iter().chain(&model_errors) {
            let line = error.to_string();
            if !self.reported.contains(&line) {
                tracing::warn!(
                    kind = error.kind,
                    namespace = %error.namespace,
                    name = %error.name,
                    reason = %error.reason,
                    "invalid object skipped"
                );
                lock(&self.shared).invalid_objects_reported += 1;
                if let Some(events) = &self.pending.hooks.events {
                    events.report(error);
                }
            }
            current_errors.insert(line);
        }
        self.reported = current_errors;
    }

    /// Writes the datapath's node configuration when it changed.
    fn write_node_config(&mut self, node: &model::NodeContext) {
        let hooks = &mut self.pending.hooks;
        let config = node::datapath_config(&hooks.node_settings, node);
        if hooks.datapath_config == Some(config) {
            return;
        }
        let written = {
            let mut maps = lock(&self.maps);
            // The cluster CIDRs first: the flag that puts them to use comes
            // with the configuration.
            maps.write_cluster_cidrs(&hooks.node_settings.cluster_cidrs.0)
                .and_then(|()| maps.write_config(&config))
        };
        match written {
            Ok(()) => {
                tracing::info!(node = %node.name, addresses = ?node.addresses, zone = ?node.zone, cluster_cidrs = %hooks.node_settings.cluster_cidrs, "node configuration written");
                hooks.datapath_config = Some(config);
            }
            Err(error) => {
                tracing::error!(error = %Causes(&error), "cannot write the node configuration");
            }
        }
    }
}

/// What writing a plan did.
#[derive(Debug, Default)]
pub(super) struct Applied {
    pub(super) writes: u64,
    pub(super) failures: u64,
    /// The sizes to repack the state with once the plan is dropped (when
    /// every write succeeded).
    pub(super) sizes: Option<plan::StateSizes>,
    /// The plan had ops.
    pub(super) had_ops: bool,
    /// It put or deleted backends.
    pub(super) backends_changed: bool,
}

/// Whether `ops` put or delete backends (the socket reaper then looks).
pub(super) fn changes_backends(ops: &[Op]) -> bool {
    ops.iter()
        .any(|op| matches!(op, Op::PutBackend { .. } | Op::DeleteBackend { .. }))
}

/// Takes a failed write: full maps are summed up after the writes, naming
/// the Services; other failures are logged one by one.
fn note_failure(shortfall: &mut Shortfall, op: &Op, error: &MapsError) {
    if !shortfall.note(op, error) {
        tracing::error!(error = %Causes(error), ?op, "map write failed");
    }
}

/// Writes the plan; keeps the state (and the plan index) in step with what
/// the maps now hold. The ops are used up when they were all written (left
/// in the plan when some failed).
fn apply_plan(
    plan: &mut plan::Plan,
    maps: &mut Maps,
    state: &mut DatapathState,
    desired: &mut Desired,
    shortfall: &mut Shortfall,
) -> Applied {
    let mut applied = Applied {
        had_ops: !plan.ops.is_empty(),
        backends_changed: changes_backends(&plan.ops),
        ..Applied::default()
    };
    maps.apply_ops(&plan.ops, &mut |op, result| match result {
        Ok(()) => applied.writes += 1,
        Err(error) => {
            applied.failures += 1;
            note_failure(shortfall, op, &error);
        }
    });
    if applied.failures == 0 {
        if let Some(index) = &mut desired.plan_index {
            index.note_applied(state, &plan.ops);
        }
        applied.sizes = Some(plan::apply_owned_to_state(
            state,
            std::mem::take(&mut plan.ops),
        ));
    } else {
        desired.plan_index = None;
        read_back(maps, state);
    }
    applied
}

/// After a failed write: the state becomes what really is in the maps (the
/// next sync retries).
pub(super) fn read_back(maps: &Maps, state: &mut DatapathState) {
    match maps.read_state() {
        Ok(read) => *state = read,
        Err(error) => tracing::error!(error = %Causes(&error), "cannot read the maps back"),
    }
}
