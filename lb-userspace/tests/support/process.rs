//! Processes the tests start: external commands with a timeout, the agent
//! (killed and reaped on drop, its log printed if the test fails), and
//! temporary directories removed on drop.

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether PROGRAM is on PATH.
pub(crate) fn have_program(program: &str) -> bool {
    find_program(program).is_some()
}

/// PROGRAM's path on PATH.
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// Panics with a clear message unless every one of TOOLS is on PATH.
pub(crate) fn require_tools(tools: &[&str]) {
    for tool in tools {
        assert!(
            have_program(tool),
            "this test needs `{tool}` on PATH (iproute2, util-linux)"
        );
    }
}

/// Runs CMD to completion (at most TIMEOUT, then SIGKILL), capturing output.
pub(crate) fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
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

/// Runs CMD (at most TIMEOUT) and returns its stdout; panics with its output
/// on failure.
pub(crate) fn run_ok_within(cmd: &mut Command, timeout: Duration) -> String {
    let out =
        output_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `run_ok_within` 30 s.
pub(crate) fn run_ok(cmd: &mut Command) -> String {
    run_ok_within(cmd, Duration::from_secs(30))
}

/// Metrics/health address of every agent, inside its node namespace.
pub(crate) const METRICS_ADDR: &str = "127.0.0.1:9917";

/// `METRICS_ADDR` parsed.
pub(crate) fn metrics_addr() -> SocketAddr {
    METRICS_ADDR.parse().expect("valid metrics address")
}

/// The `lb` binary of this build.
pub(crate) fn lb_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lb"))
}

/// A temporary directory, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/NAME`.
    pub(crate) fn create(name: &str) -> Self {
        let dir = Self(std::env::temp_dir().join(name));
        std::fs::create_dir_all(&dir.0)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.0.display()));
        dir
    }

    /// Creates the subdirectory NAME and returns its path.
    pub(crate) fn subdir(&self, name: &str) -> PathBuf {
        let dir = self.0.join(name);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process (an agent), `SIGKILL`ed and reaped on drop.
pub(crate) struct ChildGuard(pub(crate) Child);

impl ChildGuard {
    /// Panics if the process has exited; WHO names it in the message.
    pub(crate) fn assert_alive(&mut self, who: &str) {
        if let Ok(Some(status)) = self.0.try_wait() {
            panic!("{who} exited ({status})");
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts CMD (an agent) with stdout and stderr appended to LOG, preceded
/// by a marker line. `RUST_LOG` is passed on (default `info`) unless CMD
/// sets it.
pub(crate) fn spawn_logged(cmd: &mut Command, log: &Path) -> ChildGuard {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let _ = writeln!(file, "==== harness: starting agent ====");
    let stderr = file.try_clone().expect("clone log file handle");
    if !cmd.get_envs().any(|(key, _)| key == "RUST_LOG") {
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
        );
    }
    cmd.stdin(Stdio::null()).stdout(file).stderr(stderr);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    ChildGuard(child)
}

/// Appends a marker line to LOG (e.g. when the test kills the agent).
pub(crate) fn log_note(log: &Path, note: &str) {
    if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(log) {
        let _ = writeln!(file, "==== harness: {note} ====");
    }
}

/// Polls F every 50 ms until it succeeds; panics with its last error after
/// LIMIT.
pub(crate) fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if start.elapsed() > limit => panic!("{what}: not within {limit:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Prints the agent log at PATH if the test panics while this is alive.
pub(crate) struct LogOnPanic(PathBuf);

impl LogOnPanic {
    pub(crate) fn new(path: PathBuf) -> Self {
        super::panics::remember();
        Self(path)
    }
}

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprint!(
                "======== agent log ({}) ========\n{}\n======== end of agent log ========\n{}",
                self.0.display(),
                std::fs::read_to_string(&self.0).unwrap_or_default(),
                super::panics::recap()
            );
        }
    }
}

/// The capabilities `deploy/daemonset.yaml` adds, as `setpriv` names them.
pub(crate) fn daemonset_capabilities() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let ds: serde_json::Value = serde_saphyr::from_str(&text).expect("daemonset.yaml parses");
    let add =
        &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"];
    let caps: Vec<String> = add
        .as_array()
        .expect("capabilities.add is a list")
        .iter()
        .map(|c| c.as_str().expect("capability name").to_lowercase())
        .collect();
    assert!(!caps.is_empty(), "the DaemonSet adds capabilities");
    caps
}

/// `setpriv` so that CAPS are all the program's capabilities.
pub(crate) fn with_only(caps: &[String], program: &std::path::Path) -> Vec<String> {
    let mut bounding = String::new();
    for cap in caps {
        let _ = std::fmt::Write::write_fmt(&mut bounding, format_args!(",+{cap}"));
    }
    vec![
        format!("--bounding-set=-all{bounding}"),
        "--inh-caps=-all".to_owned(),
        "--".to_owned(),
        program.display().to_string(),
    ]
}
