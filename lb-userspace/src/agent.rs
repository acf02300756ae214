//! The agent loop: watch the source, rebuild the model, diff against the
//! maps, apply. Side effects (maps, HTTP, signals) live here and in `http`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use crate::{
    healthcheck::HealthServers,
    http::{self, Histogram},
    ifwatch::{self, IfWatchError, LinkEvent, Patterns},
    loader::{self, Attachment, LoadError},
    maps::{Maps, MapsError},
    model,
    node::{self, NodeSettings},
    plan::{self, DatapathState, PlanIndex},
    source::{
        self, Changes, Snapshot, SourceError, SourceSpec, SourceUpdate,
        kube::{EventReporter, TriggerTimes},
    },
};

/// What `lb agent` was asked to do.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where Services and `EndpointSlices` come from.
    pub source: SourceSpec,
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// Globs of interfaces to attach to, now and when they appear.
    pub attach_patterns: Vec<String>,
    /// bpffs directory for pins.
    pub pin_path: PathBuf,
    /// Address of the metrics/health server.
    pub metrics_addr: SocketAddr,
    /// Node name, addresses, zone and hairpin sources from the flags.
    pub node: NodeSettings,
    /// Conntrack entries per family.
    pub ct_entries: u32,
}

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The source cannot start.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Interface discovery cannot start.
    #[error(transparent)]
    IfWatch(#[from] IfWatchError),
    /// Loading or attaching failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The maps could not be opened or read.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The metrics address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The thread that loads and attaches ended without a result.
    #[error("loading the eBPF object stopped: {0}")]
    LoadTask(#[source] tokio::task::JoinError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// Agent state shared with the HTTP server.
#[derive(Default)]
pub struct Shared {
    /// The first full state has been written.
    pub ready: bool,
    /// Why the agent is not ready (shown by /readyz).
    pub not_ready_reason: String,
    /// Successful syncs.
    pub syncs: u64,
    /// Syncs with at least one failed map write.
    pub sync_errors: u64,
    /// Map writes done.
    pub map_writes: u64,
    /// Map writes that failed.
    pub map_write_errors: u64,
    /// Objects currently rejected as invalid.
    pub invalid_objects: u64,
    /// Rejections reported since start.
    pub invalid_objects_reported: u64,
    /// Duration of the last sync.
    pub last_sync_seconds: f64,
    /// Frontends and backends last written.
    pub frontends: usize,
    /// Backends last written.
    pub backends: usize,
    /// Attachments by interface.
    pub attachments: Vec<(String, Attachment)>,
    /// The maps (for datapath counters on scrape).
    pub maps: Option<Arc<Mutex<Maps>>>,
    /// What the agent wrote (frontends with their rev-NAT id for
    /// per-service counters, and map occupancy, on scrape).
    pub datapath: Option<Arc<Mutex<DatapathState>>>,
    /// Sync durations.
    pub sync_duration: Histogram,
    /// `EndpointSlice` trigger time -> maps written.
    pub network_programming: Histogram,
}

/// Runs the agent until SIGINT or SIGTERM. Pins and links stay in place.
///
/// # Errors
/// Startup failed (bad directory, interface, bpffs, kernel refusal, port).
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    // Check every input before touching the kernel.
    let (tx, mut updates) = tokio::sync::mpsc::channel(4);
    let source_task = source::spawn(&config.source, tx)?;
    let patterns = Patterns::new(config.attach_patterns.iter().cloned())?;
    for iface in &config.interfaces {
        if loader::if_index(iface).is_none() {
            return Err(LoadError::NoSuchInterface(iface.clone()).into());
        }
    }
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.metrics_addr,
            source,
        })?;

    let shared = Arc::new(Mutex::new(Shared {
        not_ready_reason: "first sync not done".into(),
        ..Shared::default()
    }));
    tokio::spawn(http::serve(listener, Arc::clone(&shared)));

    // Load and attach (verifier, map creation: hundreds of milliseconds) on
    // another thread, while the first objects from the source go into the
    // model here.
    let loading = {
        let (pin_path, ct_entries) = (config.pin_path.clone(), config.ct_entries);
        let interfaces = config.interfaces.clone();
        tokio::task::spawn_blocking(move || load_and_attach(&pin_path, ct_entries, &interfaces))
    };
    let mut desired = Desired {
        model: model::Incremental::new(model::NodeContext::default()),
        node: None,
        plan_index: None,
    };
    desired
        .model
        .set_trust_resource_versions(matches!(config.source, SourceSpec::Kube(_)));
    let mut hooks = Hooks::new(&config);
    let (loaded, first_update) = prefeed(loading, &mut updates, &mut desired, &mut hooks).await;
    let (mut ebpf, maps, attachments, state) = loaded?;
    tracing::info!(
        frontends = state.frontends.len(),
        backends = state.backends.len(),
        pin_path = %config.pin_path.display(),
        "recovered state from pinned maps"
    );
    let maps = Arc::new(Mutex::new(maps));
    let state = Arc::new(Mutex::new(state));
    {
        let mut shared = lock(&shared);
        shared.attachments = attachments;
        shared.maps = Some(Arc::clone(&maps));
        shared.datapath = Some(Arc::clone(&state));
    }

    let (link_tx, mut links) = tokio::sync::mpsc::channel(64);
    let link_task = if patterns.is_empty() {
        None
    } else {
        Some(ifwatch::spawn(patterns, link_tx)?)
    };

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signals)?;
    let mut reported = BTreeSet::new();
    if let Some(update) = first_update {
        on_update(
            update,
            &maps,
            &state,
            &mut desired,
            &shared,
            &mut reported,
            &mut hooks,
        );
    }
    loop {
        tokio::select! {
            Some(event) = links.recv() => on_link_event(&event, &mut ebpf, &config.pin_path, &shared),
            update = updates.recv() => {
                let Some(update) = update else {
                    tracing::error!("source ended; keeping the last good state");
                    break;
                };
                on_update(update, &maps, &state, &mut desired, &shared, &mut reported, &mut hooks);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    source_task.abort();
    if let Some(task) = link_task {
        task.abort();
    }
    tracing::info!("stopping; programs, links and maps stay in place");
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What loading yields: the object, its maps, the attachments and the
/// state recovered from the pins.
type Loaded = (aya::Ebpf, Maps, Vec<(String, Attachment)>, DatapathState);

fn load_and_attach(
    pin_path: &Path,
    ct_entries: u32,
    interfaces: &[String],
) -> Result<Loaded, AgentError> {
    let mut ebpf = loader::load_with(pin_path, ct_entries)?;
    let maps = Maps::from_ebpf(&mut ebpf)?;
    let program = loader::program(&mut ebpf)?;
    let mut attachments = Vec::new();
    for iface in interfaces {
        let how = loader::attach(program, iface, pin_path)?;
        tracing::info!(iface = %iface, attachment = ?how, "attached");
        attachments.push((iface.clone(), how));
    }
    let state = maps.read_state()?;
    Ok((ebpf, maps, attachments, state))
}

/// Until loading is done, puts the source's first objects into the model
/// (as long as more follow; a complete update waits for the maps and is
/// returned).
async fn prefeed(
    mut loading: tokio::task::JoinHandle<Result<Loaded, AgentError>>,
    updates: &mut tokio::sync::mpsc::Receiver<SourceUpdate>,
    desired: &mut Desired,
    hooks: &mut Hooks,
) -> (Result<Loaded, AgentError>, Option<SourceUpdate>) {
    let mut first_update = None;
    let mut source_open = true;
    loop {
        tokio::select! {
            loaded = &mut loading => {
                let loaded = loaded.unwrap_or_else(|error| Err(AgentError::LoadTask(error)));
                return (loaded, first_update);
            }
            update = updates.recv(), if first_update.is_none() && source_open => match update {
                Some(SourceUpdate::Changes(changes)) if changes.more_follow => {
                    feed(changes, desired, hooks);
                }
                Some(update) => first_update = Some(update),
                // The main loop notices and says so.
                None => source_open = false,
            },
        }
    }
}

/// One update from the source: a sync, or (while more follow) only into the
/// model.
fn on_update(
    update: SourceUpdate,
    maps: &Mutex<Maps>,
    state: &Mutex<DatapathState>,
    desired: &mut Desired,
    shared: &Mutex<Shared>,
    reported: &mut BTreeSet<String>,
    hooks: &mut Hooks,
) {
    match update {
        SourceUpdate::Snapshot(snapshot) => {
            let input = Input::Snapshot(Box::new(snapshot));
            sync(input, maps, state, desired, shared, reported, hooks);
        }
        SourceUpdate::Changes(changes) if changes.more_follow => {
            feed(changes, desired, hooks);
        }
        SourceUpdate::Changes(changes) => {
            let input = Input::Changes(changes);
            sync(input, maps, state, desired, shared, reported, hooks);
        }
        SourceUpdate::Stale(reason) => {
            tracing::error!(%reason, "source has no fresh state; keeping the last good state");
            // Not ready until the source delivers again (the next
            // snapshot's sync makes it ready); /readyz says why.
            let mut shared = lock(shared);
            shared.ready = false;
            shared.not_ready_reason = reason;
        }
    }
}

/// Puts changes into the model (not yet committed); returns the source's
/// errors.
fn feed(changes: Changes, desired: &mut Desired, hooks: &mut Hooks) -> Vec<model::ObjectError> {
    for key in &changes.removed_services {
        desired.model.remove_service(key);
    }
    for key in &changes.removed_slices {
        desired.model.remove_slice(key);
    }
    for slice in &changes.slices {
        desired.model.upsert_slice(slice);
    }
    for service in changes.services {
        desired.model.upsert_service(service);
    }
    if let Some(node) = changes.node {
        desired.node = node.into_node();
    }
    let network_programming = hooks
        .trigger_times
        .take_changed(&changes.slices, &changes.removed_slices);
    hooks.pending_trigger_times.extend(network_programming);
    changes.errors
}

/// What the agent wants in the maps, kept between syncs so that a change
/// costs O(change).
struct Desired {
    model: model::Incremental,
    /// This agent's Node object, as the source last gave it (kube source).
    node: Option<k8s_openapi::api::core::v1::Node>,
    /// `None` when the next plan must cover everything: first sync, after
    /// a failed write or a plan with problems.
    plan_index: Option<PlanIndex>,
}

/// One update from the source.
enum Input {
    Snapshot(Box<Snapshot>),
    Changes(Changes),
}

/// One pass: model, diff, apply.
fn sync(
    input: Input,
    maps: &Mutex<Maps>,
    state: &Mutex<DatapathState>,
    desired: &mut Desired,
    shared: &Mutex<Shared>,
    reported: &mut BTreeSet<String>,
    hooks: &mut Hooks,
) {
    let started = Instant::now();
    let (snapshot, source_errors) = match input {
        Input::Snapshot(mut snapshot) => {
            desired.node = snapshot.node.take();
            desired.model.reset(&snapshot.services, &snapshot.slices);
            let errors = std::mem::take(&mut snapshot.errors);
            (Some(snapshot), errors)
        }
        Input::Changes(changes) => (None, feed(changes, desired, hooks)),
    };
    let from_source = source::kube::node_context(desired.node.as_ref(), &hooks.node_name);
    let node = node::context(&hooks.node_settings, &from_source);
    desired.model.set_node(&node);
    let changes = desired.model.commit();
    write_node_config(maps, hooks, &node);
    hooks.health.update(&desired.model.health_checks());
    report_errors(
        source_errors.iter().chain(&desired.model.errors()),
        shared,
        reported,
        hooks,
    );

    let mut state = lock(state);
    let frontends = desired.model.frontends();
    let plan = match &mut desired.plan_index {
        Some(index) => plan::diff_changes(&state, index, frontends, &changes),
        None => plan::diff(&state, frontends),
    };
    for problem in &plan.problems {
        tracing::warn!(%problem, "frontend not fully programmed");
    }
    let (writes, failures) = apply_plan(&plan, &mut lock(maps), &mut state, desired);
    let elapsed = started.elapsed();
    if !plan.ops.is_empty() {
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
    // are gone (on a first sync they are the largest allocation).
    let plan_complete = failures == 0 && plan.problems.is_empty();
    drop(plan);
    if plan_complete && desired.plan_index.is_none() {
        desired.plan_index = Some(PlanIndex::new(&state, desired.model.frontends()));
    }
    let mut shared = lock(shared);
    shared.map_writes += writes;
    shared.map_write_errors += failures;
    shared.invalid_objects = reported.len() as u64;
    shared.last_sync_seconds = elapsed.as_secs_f64();
    shared.frontends = state.frontends.len();
    shared.backends = state.backends.len();
    drop(state);
    shared.sync_duration.observe(elapsed.as_secs_f64());
    if failures == 0 {
        let written = SystemTime::now();
        let triggers = match &snapshot {
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
    } else {
        shared.sync_errors += 1;
        if !shared.ready {
            shared.not_ready_reason = format!("{failures} map writes failed in the first sync");
        }
    }
}

/// Writes the plan; keeps the state (and the plan index) in step with what
/// the maps now hold. Returns (writes, failures).
fn apply_plan(
    plan: &plan::Plan,
    maps: &mut Maps,
    state: &mut DatapathState,
    desired: &mut Desired,
) -> (u64, u64) {
    let mut writes = 0u64;
    let mut failures = 0u64;
    maps.apply_ops(&plan.ops, &mut |op, result| match result {
        Ok(()) => writes += 1,
        Err(error) => {
            failures += 1;
            tracing::error!(%error, ?op, "map write failed");
        }
    });
    if failures == 0 {
        if let Some(index) = &mut desired.plan_index {
            index.note_applied(state, &plan.ops);
        }
        plan::apply_to_state(state, &plan.ops);
        if !plan.problems.is_empty() {
            // Left-out frontends are retried by a plan over everything.
            desired.plan_index = None;
        }
    } else {
        desired.plan_index = None;
        // Re-read what really is in the maps; the next sync retries.
        match maps.read_state() {
            Ok(read) => *state = read,
            Err(error) => tracing::error!(%error, "cannot read the maps back"),
        }
    }
    (writes, failures)
}

/// Logs (and raises Events for) errors not reported before; remembers the
/// current ones.
fn report_errors<'e>(
    errors: impl Iterator<Item = &'e model::ObjectError>,
    shared: &Mutex<Shared>,
    reported: &mut BTreeSet<String>,
    hooks: &Hooks,
) {
    let mut current_errors = BTreeSet::new();
    for error in errors {
        let line = error.to_string();
        if !reported.contains(&line) {
            tracing::warn!(
                kind = error.kind,
                namespace = %error.namespace,
                name = %error.name,
                reason = %error.reason,
                "invalid object skipped"
            );
            lock(shared).invalid_objects_reported += 1;
            if let Some(events) = &hooks.events {
                events.report(error);
            }
        }
        current_errors.insert(line);
    }
    *reported = current_errors;
}

// ---------------------------------------------------------------------------
// Interface discovery, Kubernetes Events, programming latency, occupancy.
// ---------------------------------------------------------------------------

/// Writes the datapath's node configuration when it changed.
fn write_node_config(maps: &Mutex<Maps>, hooks: &mut Hooks, node: &model::NodeContext) {
    let config = node::datapath_config(&hooks.node_settings, node);
    if hooks.datapath_config == Some(config) {
        return;
    }
    match lock(maps).write_config(&config) {
        Ok(()) => {
            tracing::info!(node = %node.name, addresses = ?node.addresses, zone = ?node.zone, "node configuration written");
            hooks.datapath_config = Some(config);
        }
        Err(error) => tracing::error!(%error, "cannot write the node configuration"),
    }
}

/// Per-sync extras beyond the maps.
struct Hooks {
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
}

impl Hooks {
    fn new(config: &AgentConfig) -> Self {
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
        }
    }
}

/// Attaches to an interface that appeared; forgets one that went away
/// (its TCX link died with it, so only the pin is left to remove).
fn on_link_event(event: &LinkEvent, ebpf: &mut aya::Ebpf, pin_path: &Path, shared: &Mutex<Shared>) {
    match event {
        LinkEvent::Added(iface) => {
            if lock(shared)
                .attachments
                .iter()
                .any(|(name, _)| name == iface)
            {
                return;
            }
            let attached =
                loader::program(ebpf).and_then(|program| loader::attach(program, iface, pin_path));
            match attached {
                Ok(how) => {
                    tracing::info!(iface = %iface, attachment = ?how, "attached to new interface");
                    lock(shared).attachments.push((iface.clone(), how));
                }
                // It may be gone again already; the removal event follows.
                Err(error) => {
                    tracing::warn!(iface = %iface, %error, "cannot attach to new interface");
                }
            }
        }
        LinkEvent::Removed(iface) => {
            lock(shared).attachments.retain(|(name, _)| name != iface);
            let pin = pin_path.join("links").join(iface);
            match std::fs::remove_file(&pin) {
                Ok(()) => tracing::info!(iface = %iface, "interface gone; link pin removed"),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    tracing::info!(iface = %iface, "interface gone");
                }
                Err(error) => {
                    tracing::warn!(iface = %iface, %error, pin = %pin.display(), "cannot remove link pin");
                }
            }
        }
    }
}

/// Entries per map, from what the agent wrote.
#[must_use]
pub fn map_occupancy(state: &DatapathState) -> Vec<(&'static str, usize)> {
    use lb_common::map_names;
    let (mut svc4, mut svc6, mut be4, mut be6, mut rnat4, mut rnat6) = (0, 0, 0, 0, 0, 0);
    for (frontend, fs) in &state.frontends {
        // Slot 0 (the frontend) plus one entry per backend slot.
        let entries = 1 + fs.slots.len();
        if frontend.addr.is_ipv4() {
            svc4 += entries;
        } else {
            svc6 += entries;
        }
    }
    for marker in &state.markers {
        if marker.is_ipv4() {
            svc4 += 1;
        } else {
            svc6 += 1;
        }
    }
    for backend in state.backends.values() {
        if backend.key.addr.is_ipv4() {
            be4 += 1;
        } else {
            be6 += 1;
        }
    }
    for (addr, _) in state.rev_nats.values() {
        if addr.is_ipv4() {
            rnat4 += 1;
        } else {
            rnat6 += 1;
        }
    }
    vec![
        (map_names::SERVICES4, svc4),
        (map_names::SERVICES6, svc6),
        (map_names::BACKENDS4, be4),
        (map_names::BACKENDS6, be6),
        (map_names::REVNAT4, rnat4),
        (map_names::REVNAT6, rnat6),
    ]
}
