//! Where Services and `EndpointSlice`s come from. A source sends what
//! changed (or, the file source on a full re-read, a whole snapshot) over a
//! channel; the agent turns each update into maps.

use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::mpsc;
use tracing::Instrument as _;

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
    /// This agent's own Node object, when the source knows it (kube source).
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
        SourceSpec::File(dir) => {
            // Every log line of the source names it.
            let span = tracing::info_span!("source", kind = "file", dir = %dir.display());
            let _entered = span.enter();
            // Fail at once on an unusable directory; read it in the
            // background, so that it overlaps loading the BPF program.
            file::load_dir_check(dir)?;
            let mut state = file::DirState::new(dir.clone());
            let events = match file::DirEvents::new(dir) {
                Ok(events) => Some(events),
                Err(error) => {
                    tracing::warn!(%error, "no inotify; polling only");
                    None
                }
            };
            // File by file, so that only a few files' objects are in memory
            // (and in the channel) at once.
            let first_tx = tx.clone();
            let first_span = span.clone();
            let first = tokio::task::spawn_blocking(move || {
                let _entered = first_span.enter();
                let first = state.refresh_streaming(&mut |part| {
                    let _ = first_tx.blocking_send(SourceUpdate::Changes(part));
                });
                (state, first)
            });
            let dir = dir.clone();
            Ok(tokio::spawn(async move {
                let Ok((mut state, first)) = first.await else {
                    return;
                };
                let update = match first {
                    Ok(update) => update,
                    Err(error) => Some(SourceUpdate::Stale(error.to_string())),
                };
                if let Some(update) = update
                    && tx.send(update).await.is_err()
                {
                    return;
                }
                // The poll stays as a fallback: for symlinked files whose
                // target changes elsewhere, and if inotify is unavailable.
                let mut ticker = tokio::time::interval(FILE_POLL_INTERVAL);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut events = events;
                let mut dir_was_unreadable = false;
                loop {
                    tokio::select! {
                        _ = ticker.tick() => {}
                        woke = async { events.as_ref()?.wait().await.err() }, if events.is_some() => {
                            if let Some(error) = woke {
                                tracing::warn!(%error, "inotify failed; polling only");
                                events = None;
                            }
                        }
                    }
                    let looked = state.refresh();
                    if looked.is_err() {
                        // Gone (or unreadable): a watch on a deleted
                        // directory never fires again; re-arm once it is back.
                        dir_was_unreadable = true;
                    } else if dir_was_unreadable {
                        dir_was_unreadable = false;
                        events = file::DirEvents::new(&dir)
                            .inspect_err(|error| tracing::warn!(%error, "no inotify; polling only"))
                            .ok();
                    }
                    let update = match looked {
                        Ok(None) => continue,
                        Ok(Some(update)) => update,
                        Err(error) => SourceUpdate::Stale(format!(
                            "cannot watch {}: {}",
                            dir.display(),
                            std::error::Error::source(&error)
                                .map_or_else(|| error.to_string(), ToString::to_string)
                        )),
                    };
                    if tx.send(update).await.is_err() {
                        return;
                    }
                }
            }
            .instrument(span.clone())))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// Log output, shared with the test.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Write for Logs {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const SERVICE: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: NAME}\nspec: {ports: [{port: 80}]}\n";

    #[tokio::test]
    async fn file_source_log_lines_carry_its_span() {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // This thread only: the test runtime runs the source's task here.
        let _default = tracing::subscriber::set_default(subscriber);
        let dir = std::env::temp_dir().join(format!("lb-source-span-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        std::fs::write(dir.join("a.yaml"), SERVICE.replace("NAME", "a")).expect("write");
        let (tx, mut rx) = mpsc::channel(4);
        let task = spawn(&SourceSpec::File(dir.clone()), tx).expect("source starts");
        let has_b = |update: &SourceUpdate| {
            let services = match update {
                SourceUpdate::Snapshot(snapshot) => &snapshot.services,
                SourceUpdate::Changes(changes) => &changes.services,
                SourceUpdate::Stale(_) => return false,
            };
            services
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some("b"))
        };
        let seen_b = tokio::time::timeout(Duration::from_secs(10), async {
            // The first read (on another thread), then b's arrival.
            while let Some(update) = rx.recv().await {
                if !matches!(&update, SourceUpdate::Changes(changes) if changes.more_follow) {
                    break;
                }
            }
            // That thread has no subscriber, so the callsites it hit are
            // cached as of no interest: ask again, now from this thread.
            tracing::callsite::rebuild_interest_cache();
            std::fs::write(dir.join("b.yaml"), SERVICE.replace("NAME", "b")).expect("write");
            while let Some(update) = rx.recv().await {
                if has_b(&update) {
                    return true;
                }
            }
            false
        })
        .await;
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(seen_b, Ok(true), "b arrives");
        let logs = String::from_utf8_lossy(&logs.0.lock().expect("logs")).into_owned();
        let line = logs
            .lines()
            .find(|line| line.contains("manifest directory changed"))
            .unwrap_or_else(|| panic!("no change logged: {logs:?}"));
        assert!(
            line.contains(&format!("source{{kind=\"file\" dir={}}}", dir.display())),
            "{line}"
        );
    }
}
