//! bpffs and the agent's pins: the privilege guard (root and a writable
//! bpffs), a pin directory removed on drop (`lb cleanup`, then whatever is
//! left), and reading the pinned maps back with `lb services --json`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use super::netns::{dead_owner, ns_command, unique_prefix};
use super::process::{lb_binary, output_with_timeout};

/// Environment variable that turns a failing privilege check into a skip.
const SKIP_ENV: &str = "LB_SKIP_PRIVILEGED";

/// Where the root mount namespace's bpffs must be mounted.
pub(crate) const BPFFS: &str = "/sys/fs/bpf";

/// Checks that the test can do privileged work: running as root and a usable
/// bpffs at `/sys/fs/bpf` (mounted here if it is not yet).
///
/// Returns `true` when the test should go on. When a requirement is missing,
/// panics with a clear message, unless `LB_SKIP_PRIVILEGED=1` is set: then it
/// prints a loud skip line and returns `false` (the caller returns at once).
pub(crate) fn require_privileged(what: &str) -> bool {
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
fn ensure_bpffs() -> Result<(), String> {
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

/// The pin directory of one agent; on drop `lb cleanup` (inside the node
/// namespace, while it still exists) and removal of whatever is left.
pub(crate) struct PinGuard {
    /// The pin directory.
    pub(crate) path: PathBuf,
    /// The namespace the agent runs in.
    node_ns: String,
}

impl PinGuard {
    /// A fresh pin directory `BPFFS/<tag><pid>-<n>` for an agent in `NODE_NS`
    /// (not created: the agent creates it).
    pub(crate) fn new(tag: &str, node_ns: &str) -> Self {
        Self {
            path: Path::new(BPFFS).join(unique_prefix(tag)),
            node_ns: node_ns.to_owned(),
        }
    }

    /// The maps as `lb services --json` shows them.
    pub(crate) fn services(&self) -> Result<Vec<ServiceView>, String> {
        let mut cmd = Command::new(lb_binary());
        cmd.args(["services", "--json", "--pin-path"])
            .arg(&self.path);
        let out = output_with_timeout(&mut cmd, Duration::from_secs(10))
            .map_err(|e| format!("lb services: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "lb services failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        parse_services(&String::from_utf8_lossy(&out.stdout))
    }

    /// Raw `lb ARGS --pin-path` output, for diagnostics.
    pub(crate) fn lb_output(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(lb_binary());
        cmd.args(args).arg("--pin-path").arg(&self.path);
        match output_with_timeout(&mut cmd, Duration::from_secs(10)) {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("cannot run lb {args:?}: {e}"),
        }
    }
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
pub(crate) fn sweep_stale_pins(tag: &str) {
    let Ok(entries) = std::fs::read_dir(BPFFS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead_owner(&name, tag).is_some() {
            eprintln!("note: removing stale pins {}", entry.path().display());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One frontend of `lb services --json`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ServiceView {
    pub(crate) addr: IpAddr,
    pub(crate) port: u16,
    /// `TCP`, `UDP`.
    pub(crate) proto: String,
    pub(crate) rev_nat_id: u64,
    /// Sorted by id.
    pub(crate) backends: Vec<BackendView>,
}

/// One backend slot of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BackendView {
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    /// `active`, `terminating`, `missing`.
    pub(crate) state: String,
    /// On this node.
    pub(crate) local: bool,
}

impl ServiceView {
    /// The addresses of the backends in state `active`.
    pub(crate) fn active(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.backends
            .iter()
            .filter(|b| b.state == "active")
            .map(|b| b.addr)
    }
}

/// Parses `lb services --json`; sorted.
fn parse_services(json: &str) -> Result<Vec<ServiceView>, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| format!("not JSON ({e}): {json}"))?;
    let list = value
        .as_array()
        .ok_or_else(|| format!("not a JSON array: {json}"))?;
    let field = |v: &Value, key: &str| -> Result<Value, String> {
        v.get(key)
            .cloned()
            .ok_or_else(|| format!("missing {key:?} in {v}"))
    };
    let ip = |v: Value| -> Result<IpAddr, String> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad address {v}"))
    };
    let port = |v: Value| -> Result<u16, String> {
        v.as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("bad port {v}"))
    };
    let mut out = Vec::new();
    for svc in list {
        let mut backends = Vec::new();
        for be in field(svc, "backends")?
            .as_array()
            .ok_or_else(|| format!("backends is not an array in {svc}"))?
        {
            backends.push(BackendView {
                id: field(be, "id")?.as_u64().ok_or("bad backend id")?,
                addr: SocketAddr::new(ip(field(be, "address")?)?, port(field(be, "port")?)?),
                state: field(be, "state")?
                    .as_str()
                    .ok_or("bad backend state")?
                    .to_ascii_lowercase(),
                local: field(be, "local")?.as_bool().ok_or("bad backend local")?,
            });
        }
        backends.sort();
        out.push(ServiceView {
            addr: ip(field(svc, "address")?)?,
            port: port(field(svc, "port")?)?,
            proto: field(svc, "protocol")?
                .as_str()
                .ok_or("bad protocol")?
                .to_ascii_uppercase(),
            rev_nat_id: field(svc, "rev_nat_id")?.as_u64().ok_or("bad rev_nat_id")?,
            backends,
        });
    }
    out.sort();
    Ok(out)
}
