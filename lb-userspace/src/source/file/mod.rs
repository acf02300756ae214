//! The `file:` source: Services and `EndpointSlice`s from a directory of
//! manifests, as `kubectl get -o yaml` prints them or as written by hand.
//!
//! It lets the agent run without an API server (tests, benchmarks, demos).
//! A bad document is reported and skipped; only an unreadable directory is
//! fatal, because then there is no state to serve at all.

//!
//! Where each concern lives:
//! - `listing`: which files of the directory are manifests, and their stat
//!   stamps (what tells a file changed);
//! - `parse`: a file's documents (YAML or JSON, single objects or lists)
//!   into Services, `EndpointSlice`s and errors naming where they sit;
//! - `state`: following the directory file by file ([`DirState`]), sending
//!   what changed;
//! - `reread`: reading one changed file again, parsing only the JSON
//!   objects whose text changed;
//! - `split`: the items of a JSON list found by a byte scan, unparsed;
//! - `typed`: a JSON object read in one pass as a Service or a slice;
//! - `events`: inotify, to see a change at once ([`DirEvents`]);
//! - here: loading the whole directory, and the source's task.

mod events;
mod listing;
mod parse;
mod reread;
mod split;
mod state;
#[cfg(test)]
mod testdir;
mod typed;

use std::io;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use tracing::Instrument as _;

pub use super::Snapshot;
use super::{FILE_POLL_INTERVAL, SourceUpdate};
pub use events::{Changed, DirEvents};
pub use listing::DirWatcher;
use listing::manifest_files;
use parse::load_file;
pub use state::DirState;

/// The directory itself is unusable; individual files never cause this.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("cannot read manifest directory {}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Loads every manifest file of `dir` (not recursive), in file name order.
///
/// Files ending in `.yaml`, `.yml` or `.json` are read; hidden files and
/// editor temporaries (leading `.`) are not. Symlinks are followed, as in a
/// mounted `ConfigMap`.
///
/// # Errors
///
/// [`FileSourceError::ReadDir`] when `dir` is missing, not a directory or not
/// readable. Problems inside files go to [`Snapshot::errors`] instead.
pub fn load_dir(dir: &Path) -> Result<Snapshot, FileSourceError> {
    let files = manifest_files(dir).map_err(|source| FileSourceError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut snapshot = Snapshot::default();
    for file in &files {
        load_file(file, &mut snapshot);
    }
    tracing::debug!(
        dir = %dir.display(),
        files = files.len(),
        services = snapshot.services.len(),
        slices = snapshot.slices.len(),
        errors = snapshot.errors.len(),
        "loaded manifest directory"
    );
    Ok(snapshot)
}

/// Checks that `dir` can be listed, without reading any file.
///
/// # Errors
///
/// [`FileSourceError::ReadDir`] when `dir` is missing, not a directory or not
/// readable.
pub fn load_dir_check(dir: &Path) -> Result<(), FileSourceError> {
    manifest_files(dir)
        .map(drop)
        .map_err(|source| FileSourceError::ReadDir {
            path: dir.to_owned(),
            source,
        })
}

/// Starts the file source on `dir`: a first read file by file (on a
/// blocking thread, overlapping the agent's loading of the BPF program),
/// then a look at every inotify wake-up and every [`FILE_POLL_INTERVAL`].
///
/// # Errors
/// The directory is unusable.
pub(super) fn spawn(
    dir: &Path,
    tx: mpsc::Sender<SourceUpdate>,
) -> Result<tokio::task::JoinHandle<()>, FileSourceError> {
    // Every log line of the source names it.
    let span = tracing::info_span!("source", kind = "file", dir = %dir.display());
    let _entered = span.enter();
    // Fail at once on an unusable directory; read it in the
    // background, so that it overlaps loading the BPF program.
    load_dir_check(dir)?;
    let mut state = DirState::new(dir);
    let events = match DirEvents::new(dir) {
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
    // The objects are parsed into the model's records here, on the thread
    // that made them (`Changes::prepare`).
    let first = tokio::task::spawn_blocking(move || {
        let _entered = first_span.enter();
        let mut first = state.refresh_streaming(&mut |mut part| {
            part.prepare();
            let _ = first_tx.blocking_send(SourceUpdate::Changes(part));
        });
        if let Ok(Some(SourceUpdate::Changes(last))) = &mut first {
            last.prepare();
        }
        (state, first)
    });
    let dir = dir.to_owned();
    Ok(tokio::spawn(
        async move {
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
                let changed = tokio::select! {
                    _ = ticker.tick() => Changed::Anything,
                    woke = async {
                        match events.as_mut() {
                            Some(events) => events.wait().await,
                            None => std::future::pending().await,
                        }
                    }, if events.is_some() => match woke {
                        Ok(changed) => changed,
                        Err(error) => {
                            tracing::warn!(%error, "inotify failed; polling only");
                            events = None;
                            Changed::Anything
                        }
                    },
                };
                // A file inotify names is looked at alone, not with a stat
                // of every file.
                let looked = match &changed {
                    Changed::Files(names) => state.refresh_files(names),
                    Changed::Anything => state.refresh(),
                };
                if looked.is_err() {
                    // Gone (or unreadable): a watch on a deleted
                    // directory never fires again; re-arm once it is back.
                    dir_was_unreadable = true;
                } else if dir_was_unreadable {
                    dir_was_unreadable = false;
                    events = DirEvents::new(&dir)
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
        .instrument(span.clone()),
    ))
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use super::*;
    use std::time::Duration;

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
        let task = spawn(&dir, tx).expect("source starts");
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
