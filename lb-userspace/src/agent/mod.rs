//! The agent loop: watch the source, rebuild the model, diff against the
//! maps, apply. Side effects (maps, HTTP, signals) live here and in `http`.
//!
//! `reconcile` is one sync, `links` loading and attaching, `status` what
//! the HTTP server shows.

mod links;
mod piecewise;
mod reconcile;
mod snat_watch;
mod sockets;
mod status;
mod timers;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

pub use status::{Shared, map_occupancy};

use crate::{
    datapath::{
        loader::{self, LoadError},
        maps::MapsError,
    },
    http,
    net::ifwatch::IfWatchError,
    node::NodeSettings,
    source::{self, SourceError, SourceSpec, SourceUpdate},
};
use links::{LinkPolicy, Loaded, on_link_event};
use reconcile::{Desired, Hooks, MapsRead, Pending, Reconciler};

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
    /// Address of kube-proxy's node health server (`/healthz`, `/livez`);
    /// `None`: not served.
    pub healthz_addr: Option<SocketAddr>,
    /// Node name, addresses, zone and hairpin sources from the flags.
    pub node: NodeSettings,
    /// Entries per family of the maps sized by flags.
    pub capacities: loader::Capacities,
    /// How often every map is read back and compared with what the agent
    /// wrote (`None`: never).
    pub resync_interval: Option<std::time::Duration>,
    /// Socket-level load balancing for the node's own sockets.
    pub socket_lb: crate::datapath::sock::SockLbSettings,
    /// The XDP program on the uplinks (`--xdp`, `--xdp-interfaces`).
    pub xdp: crate::datapath::xdp::XdpSettings,
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
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The thread that loads and attaches ended without a result.
    #[error("loading the eBPF object stopped")]
    LoadTask(#[source] tokio::task::JoinError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// Runs the agent until SIGINT or SIGTERM. Pins and links stay in place.
///
/// # Errors
/// Startup failed (bad directory, interface, bpffs, kernel refusal, port).
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    // Check every input before touching the kernel.
    let (tx, mut updates) = tokio::sync::mpsc::channel(4);
    let source_task = source::spawn(&config.source, tx)?;
    let link_policy = LinkPolicy::new(&config.attach_patterns, &config.xdp)?;
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

    // Load and attach on another thread, while the first objects from the
    // source go into the model here.
    let loading = links::spawn_load(&config, &link_policy);
    let mut pending = pending_and_node_health(&config);
    let (loaded, first_update) = prefeed(loading, &mut updates, &mut pending).await;
    let (mut ebpf, maps, (attachments, xdp_devices), state) = loaded?;
    tracing::info!(
        frontends = state.frontends.len(),
        backends = state.backends.len(),
        pin_path = %config.pin_path.display(),
        "recovered state from pinned maps"
    );
    let maps_reader = open_reader(&config.pin_path);
    let maps = Arc::new(Mutex::new(maps));
    let state = Arc::new(Mutex::new(state));
    {
        let mut shared = lock(&shared);
        shared.attachments = attachments;
        shared.xdp_devices = xdp_devices;
        shared.pin_path = Some(config.pin_path.clone());
        shared.capacity.capacities = lock(&maps).capacities();
        shared.maps_reader.clone_from(&maps_reader);
        shared.datapath = Some(Arc::clone(&state));
    }

    let (link_tx, mut links) = tokio::sync::mpsc::channel(64);
    let link_task = link_policy.watch(link_tx)?;

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signals)?;
    snat_watch::spawn(maps_reader.clone());
    let mut reconciler = Reconciler::new(
        maps,
        state,
        pending,
        Arc::clone(&shared),
        config.resync_interval,
        maps_reader,
    );
    // A resync's read of the maps, running on a blocking thread.
    let mut read_back: Option<tokio::task::JoinHandle<MapsRead>> = None;
    if let Some(update) = first_update {
        reconciler.on_update(update);
    }
    loop {
        tokio::select! {
            Some(event) = links.recv() => {
                on_link_event(&event, &link_policy, &mut ebpf, &config.pin_path, &shared);
            }
            update = updates.recv() => {
                let Some(update) = update else {
                    tracing::error!("source ended; keeping the last good state");
                    break;
                };
                reconciler.on_update(update);
            }
            () = timers::sleep_until(reconciler.next_timer()) => {
                if let Some(job) = reconciler.on_timer()
                    && read_back.is_none()
                {
                    read_back = Some(tokio::task::spawn_blocking(move || job.run()));
                }
            }
            Some(read) = join(&mut read_back) => reconciler.finish_resync(read),
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

/// The model and hooks before the maps exist, and kube-proxy's node
/// health server (`--healthz-bind-address`) on their proxy health.
fn pending_and_node_health(config: &AgentConfig) -> Pending {
    let pending = Pending {
        desired: Desired::new(config),
        hooks: Hooks::new(config),
    };
    if let Some(addr) = config.healthz_addr {
        tokio::spawn(http::node_health::run(addr, pending.hooks.proxy_health()));
    }
    pending
}

/// A read-only handle of its own on the pinned maps, for the scrapes and
/// the resyncs' reads: without one the metrics leave out the datapath
/// counters and resyncs read on the agent's loop, and the agent still runs.
fn open_reader(pin_path: &std::path::Path) -> Option<Arc<crate::datapath::maps::Maps>> {
    crate::datapath::maps::Maps::open_pinned(pin_path)
        .inspect_err(|error| {
            tracing::warn!(error = %crate::error::Causes(error), "cannot open a read-only handle on the maps");
        })
        .ok()
        .map(Arc::new)
}

/// The result of `task`, once it is done (never, without one).
async fn join<T>(task: &mut Option<tokio::task::JoinHandle<T>>) -> Option<T> {
    let Some(handle) = task else {
        return std::future::pending().await;
    };
    let result = handle.await.ok();
    *task = None;
    result
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Until loading is done, puts the source's first objects into the model
/// (as long as more follow; a complete update waits for the maps and is
/// returned).
async fn prefeed(
    mut loading: tokio::task::JoinHandle<Result<Loaded, AgentError>>,
    updates: &mut tokio::sync::mpsc::Receiver<SourceUpdate>,
    pending: &mut Pending,
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
                    pending.feed(changes);
                }
                Some(update) => first_update = Some(update),
                // The main loop notices and says so.
                None => source_open = false,
            },
        }
    }
}
