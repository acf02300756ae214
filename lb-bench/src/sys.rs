//! Namespaces, processes and signals for the benchmarks.
//!
//! Rules enforced here: every network namespace is one this process created
//! (named `lbb<pid>-<role>`), deleted on drop (also while an error or a
//! panic unwinds, and after SIGINT/SIGTERM, which only set a flag that every
//! wait checks); nothing is ever added to the root namespace; every command
//! runs with a time limit.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead as _, BufReader, Read as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Namespace name tag: `lbb<pid>-<role>`.
pub const TAG: &str = "lbb";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag instead of killing the process, so that
/// the namespaces and processes are cleaned up by the normal unwinding.
pub fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Fails once SIGINT or SIGTERM has been received.
///
/// # Errors
/// The run was interrupted.
pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking up early (with an error) on SIGINT/SIGTERM.
///
/// # Errors
/// The run was interrupted.
pub fn sleep(duration: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// `/run/netns/NAME`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A network namespace this process created; deleted on drop after killing
/// every process still inside (all of which this process started).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add lbb<pid>-ROLE`, with `lo` up.
    ///
    /// # Errors
    /// `ip` failed.
    pub fn create(role: &str) -> anyhow::Result<Self> {
        let name = format!("{TAG}{}-{role}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    ///
    /// # Errors
    /// `ip` failed.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// PROGRAM inside this namespace (`nsenter --net`, which keeps the root
    /// mount namespace and so `/sys/fs/bpf`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.name).display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Writes sysctls (`("net/ipv4/ip_forward", "1")`) inside the namespace.
    ///
    /// # Errors
    /// A sysctl could not be written.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> anyhow::Result<()> {
        self.run_in(|| {
            for (key, value) in settings {
                let path = Path::new("/proc/sys").join(key);
                std::fs::write(&path, value).with_context(|| {
                    format!("{}: write {value} to {}", self.name, path.display())
                })?;
            }
            Ok(())
        })
    }

    /// Runs F on a thread that has joined this namespace.
    ///
    /// # Errors
    /// Joining failed, or F's error.
    pub fn run_in<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        std::thread::scope(|scope| {
            let handle = scope.spawn(|| {
                enter_netns(&self.name)?;
                f()
            });
            match handle.join() {
                Ok(value) => value,
                Err(payload) => std::panic::resume_unwind(payload),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_processes_in(&self.name);
        match cleanup_output(
            Command::new("ip").args(["netns", "delete", &self.name]),
            Duration::from_secs(30),
        ) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "[bench] warning: `ip netns delete {}` failed: {}",
                self.name,
                out.stderr.trim()
            ),
            Err(e) => eprintln!("[bench] warning: `ip netns delete {}`: {e}", self.name),
        }
    }
}

/// Moves the calling thread into namespace NAME.
fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = netns_path(name);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd; only affects the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({}): {}", path.display(), io::Error::last_os_error());
    }
    Ok(())
}

/// SIGKILLs every process in namespace NAME (a namespace this process
/// created, so all of them were started by it), except this process.
fn kill_processes_in(name: &str) {
    let Ok(out) = cleanup_output(
        Command::new("ip").args(["netns", "pids", name]),
        Duration::from_secs(5),
    ) else {
        return;
    };
    let me = std::process::id();
    for pid in out
        .stdout
        .split_whitespace()
        .filter_map(|p| p.parse::<libc::pid_t>().ok())
    {
        if u32::try_from(pid).is_ok_and(|p| p != me) {
            // SAFETY: plain kill(2) of a process this benchmark started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Deletes namespaces (and bpffs pins) left by earlier runs that died
/// without cleaning up: names `lbb<pid>-...` whose pid is gone.
pub fn sweep_stale() {
    for dir in ["/run/netns", "/sys/fs/bpf"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(TAG)
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            eprintln!("[bench] removing {dir}/{name} left by dead run {pid}");
            if dir == "/run/netns" {
                drop(Netns { name });
            } else {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Output of a finished command.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs CMD to completion (at most TIMEOUT, then SIGKILL; SIGINT/SIGTERM of
/// the benchmark kill it too), capturing output.
///
/// # Errors
/// Spawn failure, timeout or interruption.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    output_within(cmd, timeout, true)
}

/// [`output_with_timeout`] for cleanup: SIGINT/SIGTERM do not cut it short
/// (the time limit still holds).
pub fn cleanup_output(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    output_within(cmd, timeout, false)
}

fn output_within(
    cmd: &mut Command,
    timeout: Duration,
    interruptible: bool,
) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
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
    let status = wait_child_within(&mut child, timeout, interruptible)
        .with_context(|| format!("{cmd:?}"))?;
    Ok(Output {
        status,
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned(),
    })
}

/// Waits for CHILD at most TIMEOUT; kills it on timeout, and (when
/// INTERRUPTIBLE) on SIGINT/SIGTERM.
///
/// # Errors
/// Timeout or interruption (the child is killed and reaped).
fn wait_child_within(
    child: &mut Child,
    timeout: Duration,
    interruptible: bool,
) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let interrupted = if interruptible {
            check_interrupted()
        } else {
            Ok(())
        };
        if interrupted.is_err() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            interrupted?;
            bail!("did not finish within {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs CMD (120 s at most) and returns its stdout; fails with its stderr.
///
/// # Errors
/// The command failed, timed out or was interrupted.
pub fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    run_ok_within(cmd, Duration::from_secs(120))
}

/// Like [`run_ok`] with a time limit.
///
/// # Errors
/// The command failed, timed out or was interrupted.
pub fn run_ok_within(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let out = output_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            out.stdout.trim(),
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// An `lb agent` a stage started in a node namespace: on drop it is
/// stopped, `lb cleanup` detaches its programs from its pins, and the pin
/// directory is removed.
pub struct LbAgent {
    daemon: Daemon,
    /// The stage, for warnings (`[forward]`).
    stage: &'static str,
    node: String,
    lb: PathBuf,
    pins: PathBuf,
}

impl LbAgent {
    /// STAGE's agent DAEMON, running in namespace NODE with pins at PINS;
    /// LB is the binary that cleans up after it.
    pub fn new(stage: &'static str, daemon: Daemon, node: &str, lb: &Path, pins: PathBuf) -> Self {
        Self {
            daemon,
            stage,
            node: node.to_owned(),
            lb: lb.to_path_buf(),
            pins,
        }
    }
}

impl Drop for LbAgent {
    fn drop(&mut self) {
        self.daemon.stop(Duration::from_secs(5));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.node).display()))
            .arg("--")
            .arg(&self.lb)
            .args(["cleanup", "--pin-path"])
            .arg(&self.pins);
        if let Err(error) = cleanup_output(&mut cmd, Duration::from_secs(30)) {
            eprintln!("[{}] warning: lb cleanup: {error:#}", self.stage);
        }
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// A long-running child process (server, agent) killed and reaped on drop.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Spawns CMD with stdout/stderr to LOG (a file).
    ///
    /// # Errors
    /// Spawn failure.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let file = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Self { child })
    }

    /// Spawns CMD with its stderr delivered line by line, each with the
    /// instant it was read, on the returned channel (stdout is discarded).
    ///
    /// # Errors
    /// Spawn failure.
    pub fn spawn_lines(
        name: &str,
        cmd: &mut Command,
    ) -> anyhow::Result<(Self, mpsc::Receiver<(Instant, String)>)> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        let stderr = child.stderr.take().context("stderr pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok((Self { child }, rx))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after GRACE.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `/tmp/lbb<pid>-NAME`, fresh.
    ///
    /// # Errors
    /// It could not be created.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{TAG}{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `LB_BENCH_DEBUG` is set: runs then show what they would
/// otherwise only sum up (the agent's log lines, a socket client's slowest
/// connection).
pub(crate) fn debug_output() -> bool {
    std::env::var_os("LB_BENCH_DEBUG").is_some()
}

/// Whether PROGRAM is on PATH.
pub fn have_program(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A `key: value` field of `/proc/PID/status`, in KiB.
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The first field of `/proc/loadavg` (runnable tasks, 1-minute average):
/// how shared the machine was during a measurement.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// What `/proc/PID/stat` counts for a process so far, all threads.
#[derive(Debug, PartialEq)]
pub struct ProcCounters {
    /// CPU time, user and system, in milliseconds: on a machine shared with
    /// other work a wall-clock time measures the others too, this does not.
    pub cpu_ms: f64,
    /// Minor page faults: pages touched for the first time, each zeroed by
    /// the kernel. Unlike a time, the same run gives the same count on a
    /// busy or a slow machine, so that a change to how the agent uses
    /// memory shows in one run.
    pub minor_faults: u64,
}

/// Process PID's counters, from one read of `/proc/PID/stat`.
pub fn proc_counters(pid: u32) -> Option<ProcCounters> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_stat(&text, ticks)
}

/// The counters of one `/proc/PID/stat` line, its times in clock TICKS.
fn parse_stat(text: &str, ticks: libc::c_long) -> Option<ProcCounters> {
    if ticks <= 0 {
        return None;
    }
    // The command name (field 2) may hold spaces and ')': it ends at the
    // last ')'. After it, field N of `man 5 proc` is `fields[N - 3]`.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3);
    let minor_faults = field(10)?.parse().ok()?;
    let utime: f64 = field(14)?.parse().ok()?;
    let stime: f64 = field(15)?.parse().ok()?;
    #[expect(clippy::cast_precision_loss, reason = "ticks per second: 100")]
    let cpu_ms = (utime + stime) * 1000.0 / ticks as f64;
    Some(ProcCounters {
        cpu_ms,
        minor_faults,
    })
}

/// Kernel memory of the BPF maps process PID holds open (the `memlock`
/// the kernel charges for each, from `/proc/PID/fdinfo`), in KiB.
pub fn bpf_maps_memlock_kib(pid: u32) -> Option<u64> {
    let mut bytes = 0u64;
    let mut seen = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.trim().parse::<u64>().ok())
        };
        // A map open twice counts once.
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            bytes += memlock;
        }
    }
    Some(bytes / 1024)
}

/// Pins the calling thread to CPU (when the machine has it).
pub(crate) fn pin_thread(cpu: usize) {
    if std::thread::available_parallelism().map_or(1, std::num::NonZero::get) <= cpu {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity
    // only touch it and this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set);
    }
}

/// Makes STREAM's close a reset (`SO_LINGER` 0): no `TIME_WAIT`.
pub(crate) fn linger_zero(stream: &std::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option struct.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            libc::socklen_t::try_from(size_of::<libc::linger>()).unwrap_or(8),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each counter is read from its own field, after a command name that
    /// holds a space and a ')'.
    #[test]
    fn counters_come_from_their_fields() {
        let line = "4242 (lb agent) x) S 1 4242 4242 0 -1 4194560 19822 7 0 0 \
                    731 69 0 0 20 0 5 0 123 1000 100 18446744073709551615\n";
        assert_eq!(
            parse_stat(line, 100),
            Some(ProcCounters {
                cpu_ms: 8000.0,
                minor_faults: 19822,
            })
        );
        assert_eq!(parse_stat(line, 0), None);
        assert_eq!(parse_stat("4242 (lb", 100), None);
    }

    /// Pages touched for the first time are counted as minor faults.
    #[test]
    fn minor_faults_count_fresh_pages() {
        let pid = std::process::id();
        let before = proc_counters(pid).expect("/proc/self/stat");
        // 64 MiB, mapped on its own (above glibc's mmap threshold), so
        // that each of its 16384 pages faults once when written.
        let pages = 16_384;
        let mut block = vec![0u8; pages * 4096];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&block);
        let after = proc_counters(pid).expect("/proc/self/stat");
        // With transparent huge pages always on, a fault maps 2 MiB (512
        // pages); elsewhere (`madvise`, `never`) one page.
        let huge = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|mode| mode.contains("[always]"));
        let faults = if huge { pages / 512 } else { pages } as u64;
        assert!(
            after.minor_faults - before.minor_faults >= faults / 2,
            "{before:?} -> {after:?}"
        );
        assert!(after.cpu_ms >= before.cpu_ms);
    }
}
