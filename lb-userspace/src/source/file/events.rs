//! inotify on the manifest directory.

use std::io;
use std::path::Path;

use futures::{FutureExt as _, StreamExt as _};
use inotify::{EventStream, Inotify, WatchMask};

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

    /// Waits for the next events and consumes all that are queued: what
    /// changed does not matter, the directory is read again anyway.
    ///
    /// # Errors
    ///
    /// Reading the inotify descriptor failed.
    pub async fn wait(&mut self) -> io::Result<()> {
        let mut next = self.events.next().await;
        loop {
            match next {
                Some(Ok(_event)) => {}
                Some(Err(error)) => return Err(error),
                None => return Err(io::Error::other("inotify stream ended")),
            }
            // Only what is already queued; never waits.
            match self.events.next().now_or_never() {
                Some(more) => next = more,
                None => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::DirEvents;
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
}
