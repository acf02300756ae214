//! Socket-level load balancing: loading the cgroup programs (`lb_sock_*`),
//! attaching them to the cgroup v2 root with `bpf_link`s pinned under
//! `PIN/cgroup/<cgroup id>/<program>`, and writing their settings.
//!
//! Like the TC links, the pinned links keep the programs attached when the
//! agent exits or is killed, and a new agent puts its programs into them
//! (`BPF_LINK_UPDATE`: atomic, never two copies at once). The release
//! program's link type has no update call in aya: a new link is attached
//! and pinned over the old one (for an instant both run; deleting an entry
//! twice is harmless). Links under another cgroup's id (the root moved)
//! are removed.

use std::{
    fs::File,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::{
    Ebpf,
    maps::{Array, MapError},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{FdLink, PinnedLink},
    },
};
use lb_common::{SockConfig, map_names, prog_names as p, sock_flags};

/// `--socket-lb`: which sockets are translated at the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SockLbMode {
    /// Every network namespace (pods too, instead of the TC path).
    All,
    /// Only the namespace the agent runs in (the node's): pods keep the
    /// TC path, so service meshes that redirect inside pods keep working.
    #[default]
    HostNs,
    /// No socket programs (detached if an earlier agent attached them).
    Off,
}

impl FromStr for SockLbMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Self::All),
            "hostns" => Ok(Self::HostNs),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?}: expected all, hostns or off")),
        }
    }
}

/// What the agent was asked to do about the node's own sockets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SockLbSettings {
    /// `--socket-lb`.
    pub mode: SockLbMode,
    /// `--cgroup-root` (`None`: where the cgroup v2 hierarchy is mounted).
    pub cgroup_root: Option<PathBuf>,
    /// `--socket-lb-bind-guard`: `bind()` to a `NodePort` fails.
    pub bind_guard: bool,
}

/// The socket programs could not be set up (the agent goes on with the TC
/// path and says why).
#[derive(Debug, thiserror::Error)]
pub enum SockLbError {
    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified, or give --cgroup-root)"
    )]
    NoCgroup2,
    /// `--cgroup-root` is not a cgroup v2 directory.
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 {
        /// The directory.
        path: PathBuf,
    },
    /// A file or directory could not be used.
    #[error("cannot {what} {path}")]
    Io {
        /// What was tried.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The network namespace cookie could not be read (kernel < 5.14).
    #[error("cannot read this network namespace's cookie (SO_NETNS_COOKIE, kernel >= 5.14)")]
    NetnsCookie(#[source] io::Error),
    /// A program is missing, was refused by the kernel, or did not attach.
    #[error("program {name}: cannot {step}")]
    Program {
        /// Program name.
        name: &'static str,
        /// The step that failed.
        step: &'static str,
        /// Why it failed (with the verifier log when loading failed).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The settings map could not be written.
    #[error("cannot write the socket-LB settings ({})", map_names::SOCK_CONFIG)]
    Config(#[source] MapError),
}

/// Where the socket programs ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SockLbState {
    /// Off (`--socket-lb=off`); links of an earlier agent removed.
    Off,
    /// Attached to `cgroup`; `adopted` links of an earlier agent now run
    /// this agent's programs.
    Attached {
        /// The cgroup v2 directory.
        cgroup: PathBuf,
        /// Links taken over from an earlier agent.
        adopted: usize,
    },
}

/// The `sock_addr` programs: name and whether it is a bind guard.
const SOCK_ADDR_PROGRAMS: [&str; 10] = [
    p::SOCK_CONNECT4,
    p::SOCK_CONNECT6,
    p::SOCK_SENDMSG4,
    p::SOCK_SENDMSG6,
    p::SOCK_RECVMSG4,
    p::SOCK_RECVMSG6,
    p::SOCK_GETPEERNAME4,
    p::SOCK_GETPEERNAME6,
    p::SOCK_BIND4,
    p::SOCK_BIND6,
];

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: u64 = 0x6367_7270;

/// Sets socket-level load balancing up as `settings` say: loads the
/// programs, writes their settings (this namespace's cookie, the flags),
/// attaches or adopts their links; with `Off`, removes them.
///
/// # Errors
/// No cgroup v2, a program the kernel refused (`bpf_set_retval` needs
/// kernel >= 5.18), or a link that could not be made or pinned.
pub fn setup(
    ebpf: &mut Ebpf,
    pin_path: &Path,
    settings: &SockLbSettings,
) -> Result<SockLbState, SockLbError> {
    if settings.mode == SockLbMode::Off {
        write_config(ebpf, &SockConfig::default())?;
        detach_all(pin_path).map_err(|source| SockLbError::Io {
            what: "remove the socket links under",
            path: pin_path.join("cgroup"),
            source,
        })?;
        return Ok(SockLbState::Off);
    }
    let root = match &settings.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup2_mount().ok_or(SockLbError::NoCgroup2)?,
    };
    if !is_cgroup2(&root) {
        return Err(SockLbError::NotCgroup2 { path: root });
    }
    let cgroup = File::open(&root).map_err(|source| SockLbError::Io {
        what: "open",
        path: root.clone(),
        source,
    })?;
    let cgroup_id = cgroup
        .metadata()
        .map_err(|source| SockLbError::Io {
            what: "stat",
            path: root.clone(),
            source,
        })?
        .ino();
    let mut flags = sock_flags::ENABLED;
    if settings.mode == SockLbMode::All {
        flags |= sock_flags::ALL_NETNS;
    }
    if settings.bind_guard {
        flags |= sock_flags::BIND_GUARD;
    }
    let config = SockConfig {
        netns_cookie: netns_cookie().map_err(SockLbError::NetnsCookie)?,
        flags,
        _pad: 0,
    };
    write_config(ebpf, &config)?;

    let links = pin_path.join("cgroup");
    let dir = links.join(cgroup_id.to_string());
    remove_other_cgroups(&links, &dir);
    std::fs::create_dir_all(&dir).map_err(|source| SockLbError::Io {
        what: "create",
        path: dir.clone(),
        source,
    })?;
    let mut adopted = 0;
    for name in SOCK_ADDR_PROGRAMS {
        let program: &mut CgroupSockAddr = program(ebpf, name)?;
        program.load().map_err(step(name, "load"))?;
        if attach_sock_addr(program, name, &cgroup, &dir.join(name))? {
            adopted += 1;
        }
    }
    let name = p::SOCK_RELEASE;
    let program: &mut CgroupSock = program(ebpf, name)?;
    program.load().map_err(step(name, "load"))?;
    attach_release(program, &cgroup, &dir.join(name))?;
    tracing::info!(
        cgroup = %root.display(),
        netns_cookie = config.netns_cookie,
        mode = ?settings.mode,
        bind_guard = settings.bind_guard,
        adopted,
        "socket-level load balancing attached"
    );
    Ok(SockLbState::Attached {
        cgroup: root,
        adopted,
    })
}

/// The program `name` of the object, as a `T`.
fn program<'e, T>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut T, SockLbError>
where
    &'e mut T: TryFrom<&'e mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| SockLbError::Program {
        name,
        step: "find it in the object",
        source: "missing".into(),
    })?;
    program.try_into().map_err(step(name, "use it"))
}

fn step<E: std::error::Error + Send + Sync + 'static>(
    name: &'static str,
    step: &'static str,
) -> impl FnOnce(E) -> SockLbError {
    move |source| SockLbError::Program {
        name,
        step,
        source: Box::new(source),
    }
}

/// Puts `program` into the pinned link at `pin` (true), or attaches it
/// anew and pins the link (false).
fn attach_sock_addr(
    program: &mut CgroupSockAddr,
    name: &'static str,
    cgroup: &File,
    pin: &Path,
) -> Result<bool, SockLbError> {
    if pin.exists() {
        match adopt(program, pin) {
            Ok(()) => return Ok(true),
            Err(reason) => {
                tracing::info!(program = name, %reason, "pinned socket link not reusable, attaching anew");
                let _ = std::fs::remove_file(pin);
            }
        }
    }
    // `Single` is what a `bpf_link` takes (the kernel refuses flags on
    // cgroup links, which always stack with other programs).
    let id = program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(step(name, "attach it to the cgroup"))?;
    let link = program.take_link(id).map_err(step(name, "take its link"))?;
    let link: FdLink = link.try_into().map_err(step(name, "use its link"))?;
    link.pin(pin).map_err(step(name, "pin its link"))?;
    Ok(false)
}

fn adopt(program: &mut CgroupSockAddr, pin: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    let link = CgroupSockAddrLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    let id = program.attach_to_link(link).map_err(|e| e.to_string())?;
    let link = program.take_link(id).map_err(|e| e.to_string())?;
    // The pin keeps the link; dropping our fd leaves it attached.
    let _: FdLink = link.try_into().map_err(|e| format!("{e}"))?;
    Ok(())
}

/// Attaches the release program with a new link pinned at `pin`, over an
/// earlier agent's (whose link goes with its pin).
fn attach_release(program: &mut CgroupSock, cgroup: &File, pin: &Path) -> Result<(), SockLbError> {
    let name = p::SOCK_RELEASE;
    let id = program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(step(name, "attach it to the cgroup"))?;
    let link = program.take_link(id).map_err(step(name, "take its link"))?;
    let link: FdLink = link.try_into().map_err(step(name, "use its link"))?;
    // (bpffs refuses names with a dot.)
    let fresh = pin.with_file_name(format!("{name}-new"));
    let _ = std::fs::remove_file(&fresh);
    link.pin(&fresh).map_err(step(name, "pin its link"))?;
    std::fs::rename(&fresh, pin).map_err(|source| SockLbError::Io {
        what: "move the new release link over",
        path: pin.to_owned(),
        source,
    })
}

fn write_config(ebpf: &mut Ebpf, config: &SockConfig) -> Result<(), SockLbError> {
    let map = ebpf
        .map_mut(map_names::SOCK_CONFIG)
        .ok_or(SockLbError::Config(MapError::InvalidName {
            name: map_names::SOCK_CONFIG.into(),
        }))?;
    let mut array: Array<_, SockConfig> = Array::try_from(map).map_err(SockLbError::Config)?;
    array.set(0, config, 0).map_err(SockLbError::Config)
}

/// Links pinned for other cgroups than `keep` (the root moved): removed,
/// which detaches them.
fn remove_other_cgroups(links: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(links) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path() != keep {
            tracing::info!(pins = %entry.path().display(), "removing socket links of another cgroup");
            if let Err(error) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(%error, pins = %entry.path().display(), "cannot remove old socket links");
            }
        }
    }
}

/// Removes every socket link pinned under `pin_path` (detaching them),
/// naming each.
///
/// # Errors
/// A pin could not be removed.
pub fn detach_all(pin_path: &Path) -> io::Result<Vec<String>> {
    let links = pin_path.join("cgroup");
    let mut done = Vec::new();
    let Ok(cgroups) = std::fs::read_dir(&links) else {
        return Ok(done);
    };
    for cgroup in cgroups.flatten() {
        for link in std::fs::read_dir(cgroup.path())?.flatten() {
            std::fs::remove_file(link.path())?;
            done.push(format!(
                "detached {} (cgroup {})",
                link.file_name().to_string_lossy(),
                cgroup.file_name().to_string_lossy()
            ));
        }
        std::fs::remove_dir(cgroup.path())?;
    }
    std::fs::remove_dir(&links)?;
    Ok(done)
}

/// Where the cgroup v2 hierarchy is mounted (the first `cgroup2` mount of
/// this mount namespace).
#[must_use]
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_in_mountinfo(&mountinfo)
}

/// The mount point of the first `cgroup2` line of a mountinfo text.
fn cgroup2_in_mountinfo(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "id parent major:minor root mountpoint options... - fstype source opts"
        let (fields, tail) = line.split_once(" - ")?;
        if tail.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = fields.split_whitespace().nth(4)?;
        // Octal escapes (\040 for a space) as the kernel writes them.
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest.get(pos + 1..pos + 4);
        if let Some(byte) = code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            out.push(char::from(byte));
            rest = &rest[pos + 4..];
        } else {
            out.push('\\');
            rest = &rest[pos + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// True when `path` is a directory of a cgroup v2 file system.
fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed, properly sized struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) };
    // f_type is i64 with glibc, u64 with musl.
    rc == 0 && u64::try_from(stat.f_type).ok() == Some(CGROUP2_MAGIC)
}

/// The cookie of the network namespace this thread is in
/// (`SO_NETNS_COOKIE`), which the programs compare with their socket's.
///
/// # Errors
/// No socket, or a kernel without `SO_NETNS_COOKIE` (< 5.14).
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or(8);
    // SAFETY: valid fd, pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_default_to_hostns() {
        assert_eq!("all".parse(), Ok(SockLbMode::All));
        assert_eq!("hostns".parse(), Ok(SockLbMode::HostNs));
        assert_eq!("off".parse(), Ok(SockLbMode::Off));
        assert!("host".parse::<SockLbMode>().is_err());
        assert_eq!(SockLbMode::default(), SockLbMode::HostNs);
    }

    #[test]
    fn the_first_cgroup2_mount_is_found_with_escapes() {
        let text = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
37 35 0:32 / /sys/fs/cgroup/sys\\040tem rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_in_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_in_mountinfo(
                &text.replace(" - cgroup2 cgroup2 rw,nsdelegate", " - tmpfs x rw")
            ),
            Some(PathBuf::from("/sys/fs/cgroup/sys tem"))
        );
        assert_eq!(
            cgroup2_in_mountinfo("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
