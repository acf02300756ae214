//! The agent loop: watch the source, rebuild the model, diff against the
//! maps, apply. Side effects (maps, HTTP, signals) live here and in `http`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use crate::{
    http,
    loader::{self, Attachment, LoadError},
    maps::{Maps, MapsError},
    model,
    plan::{self, DatapathState},
    source::{self, SourceSpec, SourceUpdate, file::FileSourceError},
};

/// What `lb agent` was asked to do.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where Services and `EndpointSlices` come from.
    pub source: SourceSpec,
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// bpffs directory for pins.
    pub pin_path: PathBuf,
    /// Address of the metrics/health server.
    pub metrics_addr: SocketAddr,
}

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The source directory is unusable.
    #[error(transparent)]
    Source(#[from] FileSourceError),
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
    /// Frontends with their rev-NAT id, for per-service counters.
    pub frontend_ids: Vec<(String, u32)>,
}

/// Runs the agent until SIGINT or SIGTERM. Pins and links stay in place.
///
/// # Errors
/// Startup failed (bad directory, interface, bpffs, kernel refusal, port).
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    // Check every input before touching the kernel.
    let (tx, mut updates) = tokio::sync::mpsc::channel(4);
    let source_task = source::spawn(&config.source, tx)?;
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

    let mut ebpf = loader::load(&config.pin_path)?;
    let maps = Maps::from_ebpf(&mut ebpf)?;
    let program = loader::program(&mut ebpf)?;
    let mut attachments = Vec::new();
    for iface in &config.interfaces {
        let how = loader::attach(program, iface, &config.pin_path)?;
        tracing::info!(iface = %iface, attachment = ?how, "attached");
        attachments.push((iface.clone(), how));
    }
    let mut state = maps.read_state()?;
    tracing::info!(
        frontends = state.frontends.len(),
        backends = state.backends.len(),
        pin_path = %config.pin_path.display(),
        "recovered state from pinned maps"
    );
    let maps = Arc::new(Mutex::new(maps));
    {
        let mut shared = lock(&shared);
        shared.attachments = attachments;
        shared.maps = Some(Arc::clone(&maps));
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signals)?;
    let mut reported = BTreeSet::new();
    loop {
        tokio::select! {
            update = updates.recv() => match update {
                Some(SourceUpdate::Snapshot(snapshot)) => {
                    sync(&snapshot, &maps, &mut state, &shared, &mut reported);
                }
                Some(SourceUpdate::Stale(reason)) => {
                    tracing::error!(%reason, "source has no fresh state; keeping the last good state");
                    let mut shared = lock(&shared);
                    if !shared.ready {
                        shared.not_ready_reason = reason;
                    }
                }
                None => {
                    tracing::error!("source ended; keeping the last good state");
                    break;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    source_task.abort();
    tracing::info!("stopping; programs, links and maps stay in place");
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One pass: model, diff, apply.
fn sync(
    snapshot: &source::Snapshot,
    maps: &Mutex<Maps>,
    state: &mut DatapathState,
    shared: &Mutex<Shared>,
    reported: &mut BTreeSet<String>,
) {
    let started = Instant::now();
    let model = model::build(&snapshot.services, &snapshot.slices);
    let mut current_errors = BTreeSet::new();
    for error in snapshot.errors.iter().chain(&model.errors) {
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
        }
        current_errors.insert(line);
    }
    *reported = current_errors;

    let plan = plan::diff(state, &model.frontends);
    for problem in &plan.problems {
        tracing::warn!(%problem, "frontend not fully programmed");
    }
    let mut writes = 0u64;
    let mut failures = 0u64;
    {
        let mut maps = lock(maps);
        for op in &plan.ops {
            match maps.apply_op(op) {
                Ok(()) => writes += 1,
                Err(error) => {
                    failures += 1;
                    tracing::error!(%error, ?op, "map write failed");
                }
            }
        }
        if failures == 0 {
            plan::apply_to_state(state, &plan.ops);
        } else {
            // Re-read what really is in the maps; the next sync retries.
            match maps.read_state() {
                Ok(read) => *state = read,
                Err(error) => tracing::error!(%error, "cannot read the maps back"),
            }
        }
    }
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
    let mut shared = lock(shared);
    shared.map_writes += writes;
    shared.map_write_errors += failures;
    shared.invalid_objects = reported.len() as u64;
    shared.last_sync_seconds = elapsed.as_secs_f64();
    shared.frontends = state.frontends.len();
    shared.backends = state.backends.len();
    shared.frontend_ids = state
        .frontends
        .iter()
        .map(|(frontend, fs)| (plan::frontend_label(frontend), fs.rev_nat_id))
        .collect();
    if failures == 0 {
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
