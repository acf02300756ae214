//! Helpers shared by the privileged integration tests (veth harness, datapath
//! tests): the privilege guard, network-namespace guards and helpers, and
//! external commands with timeouts.
//!
//! Rules these helpers enforce for the tests that use them: everything
//! network-related happens inside namespaces the test creates (nothing is
//! added to the root namespace), and every namespace is deleted on drop, also
//! while a panic unwinds.
#![allow(
    dead_code,
    reason = "each integration-test crate uses its own subset of these helpers"
)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Environment variable that turns a failing privilege check into a skip.
pub const SKIP_ENV: &str = "LB_SKIP_PRIVILEGED";

/// Where the root mount namespace's bpffs must be mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Checks that the test can do privileged work: running as root and a usable
/// bpffs at `/sys/fs/bpf` (mounted here if it is not yet).
///
/// Returns `true` when the test should go on. When a requirement is missing,
/// panics with a clear message, unless `LB_SKIP_PRIVILEGED=1` is set: then it
/// prints a loud skip line and returns `false` (the caller returns at once).
pub fn require_privileged(what: &str) -> bool {
    let Some(problem) = privilege_problem() else {
        return true;
    };
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!(
            "\n######## SKIPPED (privileged test): {what}: {problem}; \
             {SKIP_ENV}=1 is set, so this test passes WITHOUT RUNNING ########\n"
        );
        return false;
    }
    panic!(
        "{what}: this privileged test cannot run: {problem}. Run it as root on a Linux host \
         with bpffs (e.g. `sudo -E cargo test -p lb-userspace --test harness`), or set \
         {SKIP_ENV}=1 to skip it explicitly"
    );
}

fn privilege_problem() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("not running as root (euid {euid})"));
    }
    ensure_bpffs().err()
}

/// Makes sure `/sys/fs/bpf` is a writable bpf filesystem, mounting it when it
/// is not mounted. Only mounts bpffs (no network change). The outcome is
/// computed once per test process.
pub fn ensure_bpffs() -> Result<(), String> {
    static OUTCOME: Mutex<Option<Result<(), String>>> = Mutex::new(None);
    let mut outcome = OUTCOME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    outcome.get_or_insert_with(check_or_mount_bpffs).clone()
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
        })
    })
}

fn check_or_mount_bpffs() -> Result<(), String> {
    if !bpffs_mounted() {
        if !Path::new(BPFFS).is_dir() {
            return Err(format!("{BPFFS} does not exist (no sysfs?)"));
        }
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", BPFFS])
            .status()
            .map_err(|e| format!("cannot run `mount -t bpf bpf {BPFFS}`: {e}"))?;
        if !status.success() || !bpffs_mounted() {
            return Err(format!(
                "{BPFFS} is not a bpf mount and `mount -t bpf bpf {BPFFS}` failed ({status})"
            ));
        }
        eprintln!("note: mounted bpffs at {BPFFS}");
    }
    let probe = Path::new(BPFFS).join(format!("lb-probe-{}", std::process::id()));
    std::fs::create_dir(&probe)
        .and_then(|()| std::fs::remove_dir(&probe))
        .map_err(|e| format!("{BPFFS} is mounted but not writable: {e}"))
}

/// A name prefix unique to this process and call, e.g. `lbh1234-3`.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `/run/netns/NAME`, where `ip netns add` binds a namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A network namespace created by the test; deleted on drop (after killing any
/// process still inside, all of which the test started).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME`, and brings `lo` up inside.
    pub fn create(name: &str) -> Self {
        run_ok(Command::new("ip").args(["netns", "add", name]));
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// Runs `ip -n NAME ARGS...` and panics (with its stderr) if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs PROGRAM inside this namespace through `nsenter
    /// --net` (which, unlike `ip netns exec`, keeps the root mount namespace,
    /// so `/sys/fs/bpf` stays visible).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        ns_command(&self.name, program)
    }

    /// Writes sysctls (`("net/ipv4/ip_forward", "1")`) inside the namespace.
    pub fn sysctls(&self, settings: &[(&str, &str)]) {
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

/// Deletes namespaces left by earlier runs of this test binary that died
/// without cleaning up (e.g. SIGKILLed): names `TAG<pid>-...` whose pid is no
/// longer alive. Only touches names with this test's own tag.
pub fn sweep_stale_netns(tag: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(tag) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("note: deleting stale namespace {name} of dead test process {pid}");
            drop(Netns { name });
        }
    }
}

/// Moves the calling thread into network namespace NAME (`setns`). Only this
/// thread changes namespace; sockets it creates afterwards belong to NAME.
pub fn enter_netns(name: &str) {
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
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
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

/// `nsenter --net=/run/netns/NS -- PROGRAM`.
pub fn ns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(program);
    cmd
}

/// Whether PROGRAM is on PATH.
pub fn have_program(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Runs CMD to completion (at most TIMEOUT, then SIGKILL), capturing output.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = stdout.as_mut() {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = stderr.as_mut() {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish within {timeout:?}; killed"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Runs CMD (30 s at most) and returns its stdout; panics with its stderr on
/// failure.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = output_with_timeout(cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `lb` binary of this build.
pub fn lb_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lb"))
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process (an agent), `SIGKILL`ed and reaped on drop.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pin directory of one agent; on drop `lb cleanup` (inside the node
/// namespace, while it still exists) and removal of whatever is left.
pub struct PinGuard {
    /// The pin directory.
    pub path: PathBuf,
    /// The namespace the agent ran in.
    pub node_ns: String,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        let mut cmd = ns_command(&self.node_ns, lb_binary());
        cmd.arg("cleanup").arg("--pin-path").arg(&self.path);
        match output_with_timeout(&mut cmd, Duration::from_secs(15)) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: `lb cleanup --pin-path {}` failed ({}): {}",
                self.path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: `lb cleanup`: {e}"),
        }
        if self.path.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.path)
        {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Removes pin directories `BPFFS/<tag><pid>-...` of dead runs.
pub fn sweep_stale_pins(tag: &str) {
    let Ok(entries) = std::fs::read_dir(BPFFS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(tag)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("note: removing stale pins {}", entry.path().display());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
