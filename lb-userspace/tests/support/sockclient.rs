//! Socket-LB helpers: a child cgroup of the unified hierarchy that the test
//! creates (the socket programs are attached to it, never to the real
//! root), and a client process inside it and inside the node namespace
//! (`sock_client.py`, driven one JSON line at a time). Only that client's
//! sockets pass the test's socket programs. The cgroup is removed on drop
//! (its processes, all the test's, killed first), also while a panic
//! unwinds; cgroups of dead runs are swept.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::netns::{dead_owner, unique_prefix};

/// Where the tests' cgroups go (a cgroup v2 mount).
pub(crate) const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// A child cgroup `UNIFIED/<tag><pid>-<n>`, removed on drop.
pub(crate) struct CgroupGuard {
    pub(crate) path: PathBuf,
}

impl CgroupGuard {
    pub(crate) fn create(tag: &str) -> Self {
        sweep_stale_cgroups(tag);
        let path = Path::new(UNIFIED).join(unique_prefix(tag));
        std::fs::create_dir(&path).unwrap_or_else(|e| {
            panic!(
                "cannot create cgroup {} (is cgroup v2 mounted at {UNIFIED}?): {e}",
                path.display()
            )
        });
        Self { path }
    }

    /// The pids in the cgroup.
    fn pids(path: &Path) -> Vec<libc::pid_t> {
        std::fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Kills what runs in the cgroup (the test's clients) and removes it.
fn remove_cgroup(path: &Path) {
    for _ in 0..50 {
        let pids = CgroupGuard::pids(path);
        for pid in &pids {
            // SAFETY: plain kill(2) of a process the test put there.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        if pids.is_empty() && std::fs::remove_dir(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: cannot remove cgroup {}", path.display());
}

/// Removes cgroups `UNIFIED/<tag><pid>-...` of runs that died.
fn sweep_stale_cgroups(tag: &str) {
    let Ok(entries) = std::fs::read_dir(UNIFIED) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead_owner(&name, tag).is_some() {
            eprintln!("note: removing stale cgroup {name}");
            remove_cgroup(&entry.path());
        }
    }
}

/// `sock_client.py` in CGROUP and network namespace NS.
pub(crate) struct SockClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl SockClient {
    /// Starts the client: a shell moves itself into the cgroup, then
    /// becomes the client inside the namespace, so no socket of it is ever
    /// outside the cgroup.
    pub(crate) fn start(cgroup: &CgroupGuard, ns: &str) -> Self {
        let script = include_str!("sock_client.py");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec nsenter --net="/run/netns/$2" -- python3 -u -c "$3""#)
            .arg("sh")
            .arg(&cgroup.path)
            .arg(ns)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the socket client: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut client = Self {
            child,
            stdin,
            stdout,
        };
        let ready = client.read();
        assert_eq!(ready["ready"], true, "socket client: {ready}");
        client
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(n) if n > 0 => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("socket client said {line:?}: {e}")),
            other => {
                let status = self.child.try_wait();
                panic!("socket client ended ({other:?}, {status:?})")
            }
        }
    }

    /// Sends COMMAND, returns the client's answer.
    pub(crate) fn call(&mut self, command: &Value) -> Value {
        writeln!(self.stdin, "{command}").expect("write to the socket client");
        self.read()
    }
}

impl Drop for SockClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
