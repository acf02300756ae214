//! The node's other network namespaces (pods'), and running code inside
//! one. Used to end pods' connected UDP sockets whose backend left
//! (`--socket-lb=all`): `sock_diag` sees only the namespace its netlink
//! socket was created in, so the agent creates one inside each pod
//! namespace.
//!
//! Found two ways, deduplicated by namespace inode: the bind mounts under
//! `/run/netns` (where containerd and CRI-O keep pod namespaces, and where
//! `ip netns` puts its own), and `/proc/PID/ns/net` of every process (a
//! namespace nothing has bind-mounted). Entering one needs `CAP_SYS_ADMIN`
//! (`setns`); opening another process's `/proc/PID/ns/net` needs it to be
//! ptrace-readable (`CAP_SYS_PTRACE` across users or capability sets), and
//! seeing pods' processes needs the host's PID namespace.

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// A network namespace: a path that opens it, and its inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    /// `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub path: PathBuf,
    /// The namespace's inode (what `ip netns identify` compares).
    pub inode: u64,
}

/// Every network namespace found under `/run/netns` and `/proc`, except
/// the one this process runs in; one entry per namespace.
#[must_use]
pub fn others() -> Vec<Netns> {
    others_in(Path::new("/run/netns"), Path::new("/proc"))
}

fn others_in(run_netns: &Path, proc: &Path) -> Vec<Netns> {
    let own = std::fs::metadata(proc.join("self/ns/net")).map(|m| m.ino());
    let mut seen = BTreeSet::new();
    if let Ok(own) = own {
        seen.insert(own);
    }
    let mut found = Vec::new();
    let mut consider = |path: PathBuf| {
        // stat follows the nsfs link: the inode is the namespace's.
        if let Ok(meta) = std::fs::metadata(&path)
            && seen.insert(meta.ino())
        {
            found.push(Netns {
                path,
                inode: meta.ino(),
            });
        }
    };
    if let Ok(entries) = std::fs::read_dir(run_netns) {
        for entry in entries.flatten() {
            consider(entry.path());
        }
    }
    if let Ok(entries) = std::fs::read_dir(proc) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                consider(entry.path().join("ns/net"));
            }
        }
    }
    found
}

/// Runs F on a short-lived thread that has joined the namespace at PATH
/// (a thread of its own: `setns` changes only the calling thread, and
/// this one ends with F).
///
/// # Errors
/// PATH cannot be opened, or `setns` refused (`EPERM` without
/// `CAP_SYS_ADMIN`).
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this thread with an open namespace fd.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_is_skipped_and_each_namespace_listed_once() {
        // A fake /proc whose "processes" link to real namespace files:
        // two to this process's own namespace, one to init's (which may
        // be the same namespace: then nothing is listed).
        let dir = std::env::temp_dir().join(format!("lb-netns-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (pid, target) in [
            ("self", "/proc/self/ns/net"),
            ("10", "/proc/self/ns/net"),
            ("11", "/proc/1/ns/net"),
            ("x", "/proc/1/ns/net"),
        ] {
            std::fs::create_dir_all(dir.join(pid).join("ns")).expect("mkdir");
            std::os::unix::fs::symlink(target, dir.join(pid).join("ns/net")).expect("symlink");
        }
        let found = others_in(&dir.join("no-run-netns"), &dir);
        let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino());
        let init = std::fs::metadata("/proc/1/ns/net").map(|m| m.ino());
        let expected: Vec<u64> = match (own, init) {
            (Ok(own), Ok(init)) if own != init => vec![init],
            _ => vec![],
        };
        assert_eq!(found.iter().map(|n| n.inode).collect::<Vec<_>>(), expected);
        if let Some(n) = found.first() {
            assert_eq!(
                n.path,
                dir.join("11/ns/net"),
                "the non-numeric entry is no process"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
