//! Network namespaces the tests create: a guard that deletes its namespace
//! (and kills what runs inside) on drop, also while a panic unwinds; running
//! a closure or a command inside one; sweeping namespaces left by dead runs.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::process::{output_with_timeout, run_ok};

/// A name prefix unique to this process and call, e.g. `lbh1234-3`.
pub(crate) fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `/run/netns/NAME`, where `ip netns add` binds a namespace.
fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A network namespace created by the test; deleted on drop (after killing any
/// process still inside, all of which the test started).
#[derive(Debug)]
pub(crate) struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME`, and brings `lo` up inside.
    pub(crate) fn create(name: &str) -> Self {
        run_ok(Command::new("ip").args(["netns", "add", name]));
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...` and panics (with its stderr) if it fails.
    pub(crate) fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs PROGRAM inside this namespace (see `ns_command`).
    pub(crate) fn command(&self, program: impl AsRef<OsStr>) -> Command {
        ns_command(&self.name, program)
    }

    /// Writes sysctls (`("net/ipv4/ip_forward", "1")`) inside the namespace.
    pub(crate) fn sysctls(&self, settings: &[(&str, &str)]) {
        in_netns(&self.name, || {
            for (key, value) in settings {
                let path = Path::new("/proc/sys").join(key);
                std::fs::write(&path, value).unwrap_or_else(|e| {
                    panic!(
                        "netns {}: cannot write {value} to {}: {e}",
                        self.name,
                        path.display()
                    )
                });
            }
        });
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_processes_in(&self.name);
        match output_with_timeout(
            Command::new("ip").args(["netns", "delete", &self.name]),
            Duration::from_secs(10),
        ) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: `ip netns delete {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: `ip netns delete {}`: {e}", self.name),
        }
    }
}

/// SIGKILLs every process whose network namespace is NAME (a namespace this
/// test created, so every such process was started by this test). The test
/// process itself is never in it (only some of its threads are, briefly).
fn kill_processes_in(name: &str) {
    let Ok(out) = output_with_timeout(
        Command::new("ip").args(["netns", "pids", name]),
        Duration::from_secs(5),
    ) else {
        return;
    };
    let me = std::process::id();
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<libc::pid_t>().ok())
    {
        if u32::try_from(pid).is_ok_and(|p| p != me) {
            eprintln!("note: killing leftover process {pid} in netns {name}");
            // SAFETY: plain kill(2) on a pid we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The pid in a name `TAG<pid>-...` when that process is dead (so the name
/// was left behind by a run that could not clean up); `None` otherwise.
pub(crate) fn dead_owner(name: &str, tag: &str) -> Option<u32> {
    let pid = name
        .strip_prefix(tag)?
        .split('-')
        .next()?
        .parse::<u32>()
        .ok()?;
    (pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Deletes namespaces left by earlier runs of this test binary that died
/// without cleaning up (e.g. SIGKILLed): names `TAG<pid>-...` whose pid is no
/// longer alive. Only touches names with this test's own tag.
pub(crate) fn sweep_stale_netns(tag: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = dead_owner(&name, tag) {
            eprintln!("note: deleting stale namespace {name} of dead test process {pid}");
            drop(Netns { name });
        }
    }
}

/// Moves the calling thread into network namespace NAME (`setns`). Only this
/// thread changes namespace; sockets it creates afterwards belong to NAME.
pub(crate) fn enter_netns(name: &str) {
    let path = netns_path(name);
    let file =
        File::open(&path).unwrap_or_else(|e| panic!("cannot open netns {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd; only affects the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(
        rc == 0,
        "setns({}) failed: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

/// Runs F on a fresh thread that has joined network namespace NAME, and
/// returns its result (a panic in F is propagated).
pub(crate) fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            enter_netns(ns);
            f()
        });
        match handle.join() {
            Ok(value) => value,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    })
}

/// `nsenter --net=/run/netns/NS -- PROGRAM`: unlike `ip netns exec`, it
/// keeps the root mount namespace, so `/sys/fs/bpf` stays visible.
pub(crate) fn ns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(program);
    cmd
}
