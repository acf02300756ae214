//! Driving the source: the updates it sends, and the state they add up to
//! as the agent holds it; what that state gives through the model.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_userspace::{
    model::{self, ObjectKey, key_of},
    source::{
        self, Changes, Snapshot, SourceSpec, SourceUpdate,
        kube::{KubeSourceConfig, node_context},
    },
};
use tokio::sync::mpsc;

use crate::NODE;
use crate::api_server::ApiServer;

pub(crate) struct Source {
    rx: mpsc::Receiver<SourceUpdate>,
    task: source::SourceTask,
    /// The state the updates so far add up to, as the agent holds it.
    pub(crate) held: Held,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    /// The source's configuration for this server, as node [`NODE`].
    pub(crate) fn source_config(&self) -> KubeSourceConfig {
        KubeSourceConfig {
            node_name: NODE.to_owned(),
            kubeconfig: Some(self.kubeconfig().to_owned()),
            // The tests look at the objects the source sends.
            prepare_first_lists: false,
        }
    }
}

pub(crate) fn start_source(server: &ApiServer) -> Source {
    start_source_with(server.source_config())
}

/// As the agent starts it: the first lists' parts come as the model's
/// records.
pub(crate) fn start_source_preparing(server: &ApiServer) -> Source {
    start_source_with(KubeSourceConfig {
        prepare_first_lists: true,
        ..server.source_config()
    })
}

fn start_source_with(config: KubeSourceConfig) -> Source {
    // The agent's channel size.
    let (tx, rx) = mpsc::channel(4);
    let task = source::spawn(&SourceSpec::Kube(config), tx).expect("source starts");
    Source {
        rx,
        task,
        held: Held::default(),
    }
}

/// Objects as the agent holds them after applying each update.
#[derive(Default)]
pub(crate) struct Held {
    services: BTreeMap<ObjectKey, Service>,
    slices: BTreeMap<ObjectKey, EndpointSlice>,
    node: Option<Node>,
}

impl Held {
    fn apply(&mut self, update: &SourceUpdate) {
        match update {
            SourceUpdate::Snapshot(snapshot) => {
                self.services = snapshot
                    .services
                    .iter()
                    .map(|s| (key_of(&s.metadata), s.clone()))
                    .collect();
                self.slices = snapshot
                    .slices
                    .iter()
                    .map(|s| (key_of(&s.metadata), s.clone()))
                    .collect();
                self.node.clone_from(&snapshot.node);
            }
            SourceUpdate::Changes(changes) => {
                for key in &changes.removed_services {
                    self.services.remove(key);
                }
                for key in &changes.removed_slices {
                    self.slices.remove(key);
                }
                for service in &changes.services {
                    self.services
                        .insert(key_of(&service.metadata), service.clone());
                }
                for slice in &changes.slices {
                    self.slices.insert(key_of(&slice.metadata), slice.clone());
                }
                if let Some(node) = &changes.node {
                    self.node = node.clone().into_node();
                }
            }
            SourceUpdate::Stale(_) => {}
        }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.services.values().cloned().collect(),
            slices: self.slices.values().cloned().collect(),
            node: self.node.clone(),
            errors: Vec::new(),
        }
    }
}

impl Source {
    /// The next update (applied to what is held), or a panic after TIMEOUT.
    async fn next(&mut self, timeout: Duration, what: &str) -> SourceUpdate {
        let update = match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(update)) => update,
            Ok(None) => panic!("{what}: the source ended"),
            Err(tokio::time::error::Elapsed { .. }) => {
                panic!("{what}: no update within {timeout:?}")
            }
        };
        self.held.apply(&update);
        update
    }

    /// The next update that is not a stale reason: changes, as the kube
    /// source sends them.
    pub(crate) async fn next_changes(&mut self, timeout: Duration, what: &str) -> Changes {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left, what).await {
                SourceUpdate::Changes(changes) => return changes,
                SourceUpdate::Stale(reason) => eprintln!("{what}: stale: {reason}"),
                SourceUpdate::Snapshot(_) => panic!("{what}: the kube source sends changes"),
            }
        }
    }

    /// The first state held for which PREDICATE holds (stale updates are
    /// skipped), with the number of updates seen.
    pub(crate) async fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        predicate: impl Fn(&Snapshot) -> bool,
    ) -> (Snapshot, usize) {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.next_changes(left, what).await;
            seen += 1;
            let held = self.held.snapshot();
            if predicate(&held) {
                return (held, seen);
            }
        }
    }

    pub(crate) async fn until_stale(&mut self, timeout: Duration, what: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let SourceUpdate::Stale(reason) = self.next(left, what).await {
                return reason;
            }
        }
    }

    /// Asserts that nothing arrives for FOR.
    pub(crate) async fn quiet(&mut self, period: Duration, what: &str) {
        if let Ok(update) = tokio::time::timeout(period, self.rx.recv()).await {
            panic!("{what}: expected no update, got {update:?}");
        }
    }
}

/// Frontend -> its backends, through the model, as `ADDR:PORT/PROTO` ->
/// `[ADDR:PORT, ...]`.
pub(crate) fn frontends(snapshot: &Snapshot) -> BTreeMap<String, Vec<String>> {
    let node = node_context(snapshot.node.as_ref(), NODE);
    let model = model::build(&snapshot.services, &snapshot.slices, &node);
    model
        .frontends
        .iter()
        .map(|(frontend, spec)| {
            (
                frontend.to_string(),
                spec.backends.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

pub(crate) fn names(snapshot: &Snapshot) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .services
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    names.sort();
    names
}

pub(crate) fn slice_version(snapshot: &Snapshot, name: &str) -> Option<String> {
    snapshot
        .slices
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .and_then(|s| s.metadata.resource_version.clone())
}

pub(crate) fn has_slice(snapshot: &Snapshot, name: &str) -> bool {
    snapshot
        .slices
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some(name))
}

pub(crate) fn expect(frontends: &BTreeMap<String, Vec<String>>, frontend: &str, backends: &[&str]) {
    let got = frontends
        .get(frontend)
        .unwrap_or_else(|| panic!("no frontend {frontend}; frontends: {frontends:#?}"));
    assert_eq!(
        got,
        &backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "backends of {frontend}"
    );
}

pub(crate) const STEP: Duration = Duration::from_secs(10);

pub(crate) fn key(name: &str) -> ObjectKey {
    ("default".to_owned(), name.to_owned())
}

pub(crate) fn object_names<'a>(
    objects: impl IntoIterator<Item = &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
) -> Vec<String> {
    let mut names: Vec<String> = objects
        .into_iter()
        .filter_map(|meta| meta.name.clone())
        .collect();
    names.sort();
    names
}

/// Log output of this test binary, from the moment a test asks for it.
pub(crate) fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .finish();
        // Global: the source logs from the runtime's threads.
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        logs
    }))
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
