//! inotify on the manifest directory.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io;
use std::path::Path;

use futures::{FutureExt as _, StreamExt as _};
use inotify::{EventMask, EventStream, Inotify, WatchMask};

use super::listing::is_manifest_name;

/// Bytes read from the inotify descriptor at once (many events).
const BUFFER: usize = 4096;

/// Wakes the file source when something in the directory changed
/// (inotify), so that a change is seen at once instead of at the next poll.
/// Only completed changes count: a closed written file, a rename, a
/// removal, an attribute change; not every write of a file being written.
pub struct DirEvents {
    events: EventStream<[u8; BUFFER]>,
}

impl std::fmt::Debug for DirEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirEvents").finish_non_exhaustive()
    }
}

impl DirEvents {
    /// Watches `dir`.
    ///
    /// # Errors
    ///
    /// inotify is unavailable (or out of watches), or `dir` cannot be watched.
    pub fn new(dir: &Path) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        inotify.watches().add(
            dir,
            WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::DELETE
                | WatchMask::ATTRIB
                | WatchMask::DELETE_SELF
                | WatchMask::MOVE_SELF,
        )?;
        Ok(Self {
            events: inotify.into_event_stream([0; BUFFER])?,
        })
    }

    /// Waits for the next events and consumes all that are queued: which
    /// files they name, so that only those are looked at.
    ///
    /// # Errors
    ///
    /// Reading the inotify descriptor failed.
    pub async fn wait(&mut self) -> io::Result<Changed> {
        let mut changed = Changed::Files(BTreeSet::new());
        let mut next = self.events.next().await;
        loop {
            match next {
                Some(Ok(event)) => changed.note(event.mask, event.name.as_deref()),
                Some(Err(error)) => return Err(error),
                None => return Err(io::Error::other("inotify stream ended")),
            }
            // Only what is already queued; never waits.
            match self.events.next().now_or_never() {
                Some(more) => next = more,
                None => return Ok(changed),
            }
        }
    }
}

/// What a wake-up says may have changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    /// These manifest files (written, replaced, removed) and nothing else
    /// (possibly none: a hidden temporary file was written and renamed).
    Files(BTreeSet<String>),
    /// Anything: the directory itself, lost events, or a name that is not
    /// a plain manifest file (a directory, a `ConfigMap`'s `..data`
    /// symlink that manifests resolve through, any other visible name).
    Anything,
}

impl Changed {
    fn note(&mut self, mask: EventMask, name: Option<&OsStr>) {
        let Self::Files(files) = self else { return };
        let whole = EventMask::ISDIR
            | EventMask::Q_OVERFLOW
            | EventMask::IGNORED
            | EventMask::DELETE_SELF
            | EventMask::MOVE_SELF;
        let name = name
            .and_then(OsStr::to_str)
            .filter(|_| !mask.intersects(whole));
        match name {
            Some(name) if is_manifest_name(name) => {
                files.insert(name.to_owned());
            }
            // A hidden file written, or renamed away (onto a manifest's
            // name, which has its own event): never a manifest itself.
            Some(name)
                if name.starts_with('.')
                    && !name.starts_with("..")
                    && (EventMask::CLOSE_WRITE | EventMask::MOVED_FROM).contains(mask) => {}
            _ => *self = Self::Anything,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Changed, DirEvents};
    use crate::source::file::testdir::TempDir;

    /// Long enough for a queued event, short enough for a test.
    const WAIT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn completed_changes_wake_once_each_burst() {
        let dir = TempDir::new("inotify");
        let mut events = DirEvents::new(&dir.0).expect("inotify");
        assert!(
            tokio::time::timeout(WAIT, events.wait()).await.is_err(),
            "nothing changed yet"
        );
        // Several events (create+close of two files) are one wake-up.
        dir.write("a.yaml", "a: 1\n");
        dir.write("b.yaml", "b: 1\n");
        tokio::time::timeout(WAIT, events.wait())
            .await
            .expect("written files wake")
            .expect("read");
        assert!(
            tokio::time::timeout(WAIT, events.wait()).await.is_err(),
            "the burst was consumed whole"
        );
        dir.remove("a.yaml");
        tokio::time::timeout(WAIT, events.wait())
            .await
            .expect("a removal wakes")
            .expect("read");
    }

    /// A wake-up names the manifest files that changed; a hidden
    /// temporary file renamed onto one is that file; anything else that
    /// may change what the directory holds asks for a look at all of it.
    #[tokio::test]
    async fn a_wake_up_names_the_manifest_files_or_asks_for_everything() {
        let dir = TempDir::new("inotify-names");
        let mut events = DirEvents::new(&dir.0).expect("inotify");
        let mut next = async || {
            tokio::time::timeout(WAIT, events.wait())
                .await
                .expect("wakes")
                .expect("read")
        };
        let files =
            |names: &[&str]| Changed::Files(names.iter().map(|n| (*n).to_owned()).collect());
        dir.write("a.yaml", "a: 1\n");
        dir.write("b.json", "{}");
        assert_eq!(next().await, files(&["a.yaml", "b.json"]));
        // Written aside and renamed over, as lb-bench and editors do.
        dir.write(".b.json.tmp", "[]");
        std::fs::rename(dir.0.join(".b.json.tmp"), dir.0.join("b.json")).expect("rename");
        assert_eq!(next().await, files(&["b.json"]));
        dir.remove("a.yaml");
        assert_eq!(next().await, files(&["a.yaml"]));
        dir.write(".swap", "x");
        assert_eq!(next().await, files(&[]));
        // A ConfigMap's swap of the `..data` symlink, a directory, a file
        // of another name: the whole directory.
        std::os::unix::fs::symlink(".", dir.0.join("..data_tmp")).expect("symlink");
        std::fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).expect("rename");
        assert_eq!(next().await, Changed::Anything);
        std::fs::create_dir(dir.0.join("sub")).expect("mkdir");
        std::fs::remove_dir(dir.0.join("sub")).expect("rmdir");
        assert_eq!(next().await, Changed::Anything);
        dir.write("notes.txt", "x");
        assert_eq!(next().await, Changed::Anything);
    }
}
