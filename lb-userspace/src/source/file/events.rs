//! inotify on the manifest directory.

use std::io;
use std::path::Path;

/// Wakes the file source when something in the directory changed
/// (inotify), so that a change is seen at once instead of at the next poll.
/// Only completed changes count: a closed written file, a rename, a
/// removal, an attribute change; not every write of a file being written.
#[derive(Debug)]
pub struct DirEvents {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl DirEvents {
    /// Watches `dir`.
    ///
    /// # Errors
    ///
    /// inotify is unavailable (or out of watches), or `dir` cannot be watched.
    pub fn new(dir: &Path) -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: `fd` is an inotify descriptor and `path` a C string.
        if unsafe { libc::inotify_add_watch(raw, path.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an `OwnedFd` always returns the descriptor it owns, which
        // stays open until the `AsyncFd` (its owner now) is dropped.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Waits for the next events and consumes all that are queued.
    ///
    /// # Errors
    ///
    /// Reading the inotify descriptor failed.
    pub async fn wait(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut buffer = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|fd| {
                // SAFETY: reads into a buffer of the given length.
                let n = unsafe {
                    libc::read(
                        fd.get_ref().as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }
}
