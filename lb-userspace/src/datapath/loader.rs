//! Loading the embedded eBPF object, pinning, attaching and detaching.
//!
//! Pin layout under the pin path (default `/sys/fs/bpf/lb`):
//! - `<MAP_NAME>`: every map (`lb_common::map_names`), reused on the next load;
//! - `links/<ifname>`: the TCX ingress link of each interface, so that the
//!   program stays attached when the agent exits or is killed, and a new
//!   agent replaces the program in that link (atomically) instead of adding
//!   a second one; `links-egress/<ifname>`: the same for egress (replies
//!   only).
//!
//! Kernels without TCX (< 6.6) get a clsact qdisc filter with a fixed
//! priority and handle, replaced in place on restart.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttach, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcHandle},
    },
};
use lb_common::prog_names;

/// The eBPF object, built by build.rs (empty when built with `AYA_BUILD_SKIP`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Priority and handle of the clsact fallback filter.
const NETLINK_PRIORITY: u16 = 0x1b;
const NETLINK_HANDLE: u32 = 0x1b;

/// Loading or attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// This binary was built without its eBPF object.
    #[error("this lb binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild it")]
    NoObject,
    /// bpffs is not where the pins should go.
    #[error("pin path {path} is not on a bpf filesystem (mount it: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs {
        /// The pin path.
        path: PathBuf,
    },
    /// The pin directory could not be made.
    #[error("cannot create pin directory {path}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the object (the verifier log is in the source).
    #[error("cannot load the eBPF object")]
    Load {
        /// Underlying error, with the verifier log.
        #[source]
        source: aya::EbpfError,
    },
    /// The program is missing from the object or has another type.
    #[error("program {name}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Underlying error (with the verifier log when loading failed).
        #[source]
        source: aya::programs::ProgramError,
    },
    /// No interface of that name exists in this network namespace.
    #[error("interface {0} does not exist in this network namespace")]
    NoSuchInterface(String),
    /// Attaching to an interface failed.
    #[error("cannot attach to {iface}: {step}")]
    Attach {
        /// Interface name.
        iface: String,
        /// The step that failed.
        step: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How a program ended up on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// A new TCX link, pinned.
    TcxNew,
    /// The pinned TCX link of an earlier agent, now running this program.
    TcxAdopted,
    /// A clsact filter (kernel without TCX).
    Netlink,
}

/// Checks that `path` (or its closest existing parent) is on bpffs.
///
/// # Errors
/// The path is elsewhere.
pub fn check_bpffs(path: &Path) -> Result<(), LoadError> {
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    let mut probe = path;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let c_path =
        CString::new(probe.as_os_str().as_encoded_bytes()).map_err(|_| LoadError::NotBpffs {
            path: path.to_owned(),
        })?;
    // SAFETY: statfs writes into a zeroed, properly sized struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) };
    // f_type is i64 with glibc, u64 with musl (the static image build).
    if rc != 0 || u64::try_from(stat.f_type).ok() != Some(BPF_FS_MAGIC) {
        return Err(LoadError::NotBpffs {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Entries per family of the maps whose size is a flag of `lb agent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Frontends per family (`--max-services`): the rev-NAT maps.
    pub services: u32,
    /// Service map entries per family (`--max-service-slots`): frontends,
    /// their backend slots and the `ClusterIP` markers.
    pub service_slots: u32,
    /// Backend map entries per family (`--max-backends`).
    pub backends: u32,
    /// Conntrack entries per family (`--ct-entries`).
    pub ct_entries: u32,
    /// Maglev: which frontends get tables, their size and how many.
    pub maglev: super::maglev::MaglevConfig,
}

impl Default for Capacities {
    fn default() -> Self {
        use lb_common::limits;
        Self {
            services: limits::DEFAULT_SERVICES,
            service_slots: limits::MAX_SERVICE_SLOTS,
            backends: limits::DEFAULT_BACKENDS,
            ct_entries: limits::DEFAULT_CT_ENTRIES,
            maglev: super::maglev::MaglevConfig::default(),
        }
    }
}

impl Capacities {
    /// (map name, entries wanted) of every map these capacities size.
    #[must_use]
    pub fn by_map(&self) -> [(&'static str, u32); 13] {
        use lb_common::map_names as n;
        [
            (n::SERVICES4, self.service_slots),
            (n::SERVICES6, self.service_slots),
            // One more each: the next-backend-id record
            // (`maps::BACKEND_RECORDS`).
            (
                n::BACKENDS4,
                self.backends.saturating_add(super::maps::BACKEND_RECORDS),
            ),
            (
                n::BACKENDS6,
                self.backends.saturating_add(super::maps::BACKEND_RECORDS),
            ),
            // One entry per backend entry.
            (n::ENDPOINTS4, self.backends),
            (n::ENDPOINTS6, self.backends),
            (n::REVNAT4, self.services),
            (n::REVNAT6, self.services),
            (n::CT4, self.ct_entries),
            (n::CT6, self.ct_entries),
            (n::SVC_STATS, self.stats_entries()),
            (
                n::CT_NEW4,
                lb_common::limits::ct_new_entries(self.ct_entries),
            ),
            (
                n::CT_NEW6,
                lb_common::limits::ct_new_entries(self.ct_entries),
            ),
        ]
    }

    /// Entries of the per-service stats map (one per rev-NAT id, 0
    /// unused): twice the frontends of both families, since ids are handed
    /// out before a write finds its map full, and a frontend replaced
    /// gets a new id while the old one is still in use (make before
    /// break). Per-CPU and preallocated, so it costs 16 bytes x this per
    /// possible CPU (4 MiB per CPU at the default `--max-services`, the
    /// whole id space); the rev-NAT ids stay below it.
    #[must_use]
    pub fn stats_entries(&self) -> u32 {
        self.services
            .saturating_mul(4)
            .saturating_add(1)
            .min(lb_common::limits::MAX_FRONTENDS)
    }
}

/// Loads the object with its maps pinned under `pin_path` (reusing pins),
/// with the default capacities.
///
/// # Errors
/// No object, no bpffs, or the kernel refused the object.
pub fn load(pin_path: &Path) -> Result<Ebpf, LoadError> {
    load_with(pin_path, &Capacities::default())
}

/// Loads the object with its maps pinned under `pin_path` (reusing pins)
/// and sized by `capacities`, and verifies the TC programs of every link
/// kind.
///
/// A pinned map of another size is kept, entries and all, with a warning:
/// resizing would mean dropping what it holds (the conntrack entries of
/// live flows, the Services being served), and a restart must not do that
/// behind the operator's back. `lb cleanup` and a new start resize.
///
/// # Errors
/// No object, no bpffs, or the kernel refused the object.
pub fn load_with(pin_path: &Path, capacities: &Capacities) -> Result<Ebpf, LoadError> {
    load_for(pin_path, capacities, &[LinkKind::Ethernet, LinkKind::L3])
}

/// [`load_with`], verifying only the TC programs of the link kinds in
/// KINDS (those of the devices the agent attaches at its start): on a node
/// of Ethernet devices only, the L3 pair is ~0.8 s of CPU that a start
/// spends beside its first read for nothing. [`attach_iface`] verifies
/// another kind's programs when a device of it comes.
///
/// # Errors
/// No object, no bpffs, or the kernel refused the object.
pub fn load_for(
    pin_path: &Path,
    capacities: &Capacities,
    kinds: &[LinkKind],
) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    check_bpffs(pin_path)?;
    for dir in [pin_path.to_owned(), pin_path.join("links")] {
        std::fs::create_dir_all(&dir).map_err(|source| LoadError::PinDir { path: dir, source })?;
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_path);
    for (name, wanted) in capacities.by_map() {
        loader.map_max_entries(name, entries_to_use(pin_path, name, wanted));
    }
    for (name, wanted) in capacities.maglev.map_sizes() {
        drop_resized_pin(pin_path, name, wanted);
        loader.map_max_entries(name, wanted);
    }
    // 0 keeps Maglev out of the datapath (the verifier drops the lookup).
    let table_size = if capacities.maglev.enabled() {
        capacities.maglev.table_size
    } else {
        0
    };
    loader.override_global(lb_common::maglev::TABLE_SIZE_GLOBAL, &table_size, true);
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|source| LoadError::Load { source })?;
    let names: Vec<&'static str> = kinds.iter().copied().flat_map(tc_programs).collect();
    load_tc_programs(&mut ebpf, &names)?;
    Ok(ebpf)
}

/// Unpins the maps of another layout version of a map this object has
/// (`LB4_SVC_V2` when it has `LB4_SVC_V3`: the suffix changes with the
/// layout): left by an agent of another version, they would hold kernel
/// memory (a service map at 100k Services, ~100 MiB) until `lb cleanup`.
/// Called once the programs are in their links: a program of the other
/// version still attached somewhere keeps its own reference to its maps,
/// so only the pins go. CURRENT: the names of the object's maps ([`map_names`]
/// of it before any is taken out). Returns the names unpinned.
pub fn remove_superseded_pins(pin_path: &Path, current: &[String]) -> Vec<String> {
    let current: Vec<&str> = current.iter().map(String::as_str).collect();
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(pin_path) else {
        return removed;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        if entry.path().is_dir() || !superseded(name, &current) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed.push(name.to_owned()),
            Err(error) => tracing::warn!(pin = name, %error, "cannot remove a superseded pin"),
        }
    }
    removed
}

/// The names of the object's maps (all of them while none is taken out).
#[must_use]
pub fn map_names(ebpf: &Ebpf) -> Vec<String> {
    ebpf.maps().map(|(name, _)| name.to_owned()).collect()
}

/// True when NAME is `BASE_V<n>` and CURRENT has `BASE_V<m>` with m != n.
fn superseded(name: &str, current: &[&str]) -> bool {
    let Some((base, version)) = versioned(name) else {
        return false;
    };
    current.iter().any(|other| {
        versioned(other).is_some_and(|(other_base, other_version)| {
            other_base == base && other_version != version
        })
    })
}

/// (`BASE`, `N`) of a name `BASE_V<N>`.
fn versioned(name: &str) -> Option<(&str, &str)> {
    let (base, version) = name.rsplit_once("_V")?;
    (!version.is_empty() && version.bytes().all(|b| b.is_ascii_digit())).then_some((base, version))
}

/// Loads the TC programs NAMES that are not loaded yet, each on a thread
/// of its own: the verifier's walk of each ingress program (~203k
/// instructions for `lb_tc`) is most of an agent's start at 10k Services,
/// and they are verified side by side. (The XDP program is loaded by
/// `xdp::setup`, when `--xdp` uses it.)
///
/// The verifying threads run at [`VERIFIER_NICE`]: during a start they
/// share the cores with the source's first read, which a large cluster's
/// start waits for longer than for the programs (at 100k Services the
/// read takes seconds, the verification ~1 s of CPU). Niced, they take
/// what the read leaves instead of two thirds of both cores.
fn load_tc_programs(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), LoadError> {
    for name in names {
        program_named(ebpf, name)?;
    }
    let programs: Vec<(&'static str, &mut SchedClassifier)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| {
            let name = names.iter().copied().find(|wanted| *wanted == name)?;
            let program = <&mut SchedClassifier>::try_from(program).ok()?;
            program.fd().is_err().then_some((name, program))
        })
        .collect();
    std::thread::scope(|scope| {
        let loads: Vec<_> = programs
            .into_iter()
            .map(|(name, program)| {
                let load = scope.spawn(move || {
                    lower_own_priority(VERIFIER_NICE);
                    program.load()?;
                    // The verifier's work (what a start waits for); the
                    // kernel reports it from 5.16 on.
                    Ok(program
                        .info()
                        .ok()
                        .and_then(|info| info.verified_instruction_count()))
                });
                (name, load)
            })
            .collect();
        let mut verified = Vec::new();
        let mut instructions = Vec::new();
        for (name, load) in loads {
            let loaded: Result<Option<u32>, aya::programs::ProgramError> = load
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let count = loaded.map_err(|source| LoadError::Program { name, source })?;
            verified.push(name);
            instructions.extend(count.map(|count| (name, count)));
        }
        if !verified.is_empty() {
            tracing::info!(
                programs = ?verified,
                verified_instructions = ?instructions,
                "TC programs verified"
            );
        }
        Ok(())
    })
}

/// The nice value of the threads that verify the TC programs. Nice values
/// weigh threads within their CPU cgroup (the agent's pod, or its systemd
/// service with the CPU controller on), so this yields to the agent's own
/// busier threads; at 10 a thread still gets ~10% of a core that a
/// nice-0 thread keeps busy, so the load ends even on a busy host.
const VERIFIER_NICE: i32 = 10;

/// Raises the calling thread's nice value to NICE, if lower. Linux keeps
/// one per thread (`who` 0 is the calling thread, not the process), and a
/// thread it starts inherits it. Raising one's own nice value needs no
/// privilege; should it fail anyway, the thread runs as it was.
fn lower_own_priority(nice: i32) {
    // SAFETY: plain syscalls on the calling thread (-1 from getpriority is
    // also a valid nice value: then NICE is set anyway).
    if unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) } >= nice {
        return;
    }
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot lower the verifier's priority");
    }
}

/// The TC programs the agent attaches to a device of KIND: ingress, then
/// egress.
fn tc_programs(kind: LinkKind) -> [&'static str; 2] {
    match kind {
        LinkKind::Ethernet => [prog_names::TC_LB, prog_names::TC_LB_EGRESS],
        LinkKind::L3 => [prog_names::TC_LB_L3, prog_names::TC_LB_L3_EGRESS],
    }
}

/// The size to create map `name` with: `wanted`, or the size of the map
/// already pinned under that name (kept, see [`load_with`]).
fn entries_to_use(pin_path: &Path, name: &'static str, wanted: u32) -> u32 {
    let pin = pin_path.join(name);
    if !pin.exists() {
        return wanted;
    }
    let Ok(pinned) = aya::maps::MapInfo::from_pin(&pin).map(|info| info.max_entries()) else {
        // Unreadable: the load reports the pin's problem.
        return wanted;
    };
    // Per-CPU LRU maps (the maps of new flows) round their size up to a multiple of
    // the CPU count.
    let cpus = aya::util::nr_cpus().map_or(1, std::num::NonZero::get);
    let rounded = wanted.div_ceil(cpus).saturating_mul(cpus);
    if pinned != wanted && pinned != rounded {
        tracing::warn!(
            map = name,
            pinned,
            wanted,
            pin = %pin.display(),
            "a pinned map has another size than the flags ask; keeping the pinned map and its \
             entries (capacity {pinned}); run `lb cleanup` before starting to resize it"
        );
    }
    pinned
}

/// Unpins map `name` when it has another size than `wanted`, so that the
/// load makes it anew: for the Maglev maps, which the first sync rewrites
/// whole (unlike conntrack or the services, nothing in them is lost).
fn drop_resized_pin(pin_path: &Path, name: &'static str, wanted: u32) {
    let pin = pin_path.join(name);
    let Ok(pinned) = aya::maps::MapInfo::from_pin(&pin).map(|info| info.max_entries()) else {
        return;
    };
    if pinned != wanted {
        tracing::info!(map = name, pinned, wanted, "maglev map resized: made anew");
        let _ = std::fs::remove_file(&pin);
    }
}

/// The TC program of a loaded object.
///
/// # Errors
/// The object lacks the program.
pub fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
    program_named(ebpf, prog_names::TC_LB)
}

/// The TC program `name` (`prog_names::*`) of a loaded object.
///
/// # Errors
/// The object lacks the program.
pub fn program_named<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    let program = ebpf.program_mut(name).ok_or(LoadError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    program
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// What a device's frames start with, from its type (`ARPHRD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// An Ethernet header (veth, NICs, VXLAN, bridges, `gretap`).
    Ethernet,
    /// The IP header (IPIP, `ip6tnl`, SIT, GRE in L3 mode, `WireGuard`,
    /// tun, PPP).
    L3,
}

/// The link kind of `iface`, asked with `SIOCGIFHWADDR` (the device type
/// is its `sa_family`); `None` for a type whose header layout the datapath
/// does not know (or when the ioctl fails).
#[must_use]
pub fn link_kind(iface: &str) -> Option<LinkKind> {
    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_PPP: u16 = 512;
    const ARPHRD_RAWIP: u16 = 519;
    const ARPHRD_TUNNEL: u16 = 768;
    const ARPHRD_TUNNEL6: u16 = 769;
    const ARPHRD_SIT: u16 = 776;
    const ARPHRD_IPGRE: u16 = 778;
    const ARPHRD_IP6GRE: u16 = 823;
    const ARPHRD_NONE: u16 = 0xfffe;
    let name = iface.as_bytes();
    // SAFETY: a zeroed ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return None;
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // The request's type is `c_ulong` with glibc and `c_int` with musl
    // (`cargo xtask image`); the number fits both.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::unnecessary_cast,
        reason = "0x8927 in either type"
    )]
    let request = libc::SIOCGIFHWADDR as libc::Ioctl;
    // SAFETY: SIOCGIFHWADDR fills the ifreq it is given.
    let rc = unsafe { libc::ioctl(fd, request, &raw mut req) };
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    // SAFETY: SIOCGIFHWADDR set the hardware address member.
    match unsafe { req.ifr_ifru.ifru_hwaddr.sa_family } {
        ARPHRD_ETHER => Some(LinkKind::Ethernet),
        ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT | ARPHRD_IPGRE
        | ARPHRD_IP6GRE | ARPHRD_NONE => Some(LinkKind::L3),
        _ => None,
    }
}

/// `if_nametoindex`, or `None` if there is no such interface.
#[must_use]
pub fn if_index(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The pin of `iface`'s TCX ingress link.
#[must_use]
pub fn link_pin(pin_path: &Path, iface: &str) -> PathBuf {
    pin_path.join("links").join(iface)
}

/// The pin of `iface`'s egress link.
#[must_use]
pub fn egress_link_pin(pin_path: &Path, iface: &str) -> PathBuf {
    pin_path.join(EGRESS_LINKS).join(iface)
}

/// Directory of the egress links' pins (`links/` holds the ingress ones,
/// as before egress programs existed).
const EGRESS_LINKS: &str = "links-egress";

/// Attaches the datapath to `iface`: the ingress program and the
/// reply-only egress program of its link kind (Ethernet or L3, from the
/// device type), each as [`attach`] does. Returns how ingress was attached.
///
/// # Errors
/// No such interface, a device type without a known header layout, or the
/// kernel refused every way of attaching.
pub fn attach_iface(
    ebpf: &mut Ebpf,
    iface: &str,
    pin_path: &Path,
) -> Result<Attachment, LoadError> {
    let index = if_index(iface).ok_or_else(|| LoadError::NoSuchInterface(iface.to_owned()))?;
    let Some(kind) = link_kind(iface) else {
        return Err(LoadError::Attach {
            iface: iface.to_owned(),
            step: "read the device type".into(),
            source: "not Ethernet nor a known L3 device (IPIP, ip6tnl, GRE, WireGuard, tun)".into(),
        });
    };
    let [ingress, egress] = tc_programs(kind);
    // The first device of its kind when the start had none (~0.5 s).
    load_tc_programs(ebpf, &[ingress, egress])?;
    accept_local_sources(iface);
    let how = attach_hook(
        program_named(ebpf, ingress)?,
        iface,
        index,
        TcAttachType::Ingress,
        &link_pin(pin_path, iface),
    )?;
    let egress_dir = pin_path.join(EGRESS_LINKS);
    std::fs::create_dir_all(&egress_dir).map_err(|source| LoadError::PinDir {
        path: egress_dir,
        source,
    })?;
    attach_hook(
        program_named(ebpf, egress)?,
        iface,
        index,
        TcAttachType::Egress,
        &egress_link_pin(pin_path, iface),
    )?;
    record_iface(ebpf, iface, index)?;
    Ok(how)
}

/// Tells the datapath what `iface` is (`LB_IFACE_V1`): a veth is
/// pod-facing (every CNI puts its pods behind one), so packets that match
/// reply entries there get the reverse-path check.
fn record_iface(ebpf: &mut Ebpf, iface: &str, index: u32) -> Result<(), LoadError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| LoadError::Attach {
        iface: iface.to_owned(),
        step: "record the interface in LB_IFACE_V1".into(),
        source,
    };
    let flags = if driver(iface).as_deref() == Some("veth") {
        lb_common::iface_flags::POD_FACING
    } else {
        0
    };
    let map = ebpf
        .map_mut(lb_common::map_names::IFACES)
        .ok_or_else(|| failed("the object has no such map".into()))?;
    let mut map: aya::maps::HashMap<_, u32, u32> =
        aya::maps::HashMap::try_from(map).map_err(|e| failed(e.into()))?;
    map.insert(&index, &flags, 0).map_err(|e| failed(e.into()))
}

/// The driver of `iface` (`ETHTOOL_GDRVINFO`), `None` when it does not say.
fn driver(iface: &str) -> Option<String> {
    const SIOCETHTOOL: libc::Ioctl = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo`, up to the driver name (the kernel writes
    /// the whole 196 bytes).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: a zeroed ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if iface.len() >= req.ifr_name.len() {
        return None;
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL writes the drvinfo `ifr_data` points at.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut req) };
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Attaches `program` to ingress of `iface`: adopts the pinned link of an
/// earlier agent when there is one, else creates and pins a TCX link, else
/// (no TCX) installs a clsact filter.
///
/// # Errors
/// No such interface, or the kernel refused every way of attaching.
pub fn attach(
    program: &mut SchedClassifier,
    iface: &str,
    pin_path: &Path,
) -> Result<Attachment, LoadError> {
    let index = if_index(iface).ok_or_else(|| LoadError::NoSuchInterface(iface.to_owned()))?;
    accept_local_sources(iface);
    attach_hook(
        program,
        iface,
        index,
        TcAttachType::Ingress,
        &link_pin(pin_path, iface),
    )
}

/// Attaches `program` at `hook` of `iface` (index `index`), pinning the
/// TCX link at `pin` (see [`attach`]).
fn attach_hook(
    program: &mut SchedClassifier,
    iface: &str,
    index: u32,
    hook: TcAttachType,
    pin: &Path,
) -> Result<Attachment, LoadError> {
    let attach_err = |step: String| {
        let iface = iface.to_owned();
        move |source: Box<dyn std::error::Error + Send + Sync>| LoadError::Attach {
            iface,
            step,
            source,
        }
    };
    if pin.exists() {
        match adopt(program, pin) {
            Ok(()) => return Ok(Attachment::TcxAdopted),
            Err(reason) => {
                tracing::info!(iface, %reason, "pinned link not reusable, attaching anew");
                let _ = std::fs::remove_file(pin);
            }
        }
    }
    match program.attach(
        index,
        TcAttach::Tcx {
            attach_type: hook,
            order: LinkOrder::default(),
        },
    ) {
        Ok(link_id) => {
            let link = program
                .take_link(link_id)
                .map_err(|e| attach_err("take the TCX link".into())(e.into()))?;
            let link: FdLink = link
                .try_into()
                .map_err(|e: LinkError| attach_err("use the TCX link".into())(e.into()))?;
            link.pin(pin)
                .map_err(|e| attach_err(format!("pin the link at {}", pin.display()))(e.into()))?;
            Ok(Attachment::TcxNew)
        }
        Err(tcx_error) => {
            tracing::warn!(iface, error = %tcx_error, "TCX attach failed, falling back to clsact");
            attach_netlink(program, index, hook).map_err(|e| {
                attach_err(format!("TCX refused ({tcx_error}), then clsact"))(e.into())
            })?;
            Ok(Attachment::Netlink)
        }
    }
}

/// Fallback for translated packets the datapath cannot forward itself
/// (see `lb-ebpf/src/fwd.rs`) and hands to the stack: lets IPv4 packets
/// whose source the datapath set to one of the node's own addresses (source
/// NAT of external traffic, the `NodePort` address restored on replies)
/// through input routing, which otherwise drops them as martians
/// (`accept_local` = 0). Best effort: /proc/sys may be read-only in a
/// container, and strict `rp_filter` would still drop them (said in a log).
fn accept_local_sources(iface: &str) {
    let base = std::path::Path::new("/proc/sys/net/ipv4/conf").join(iface);
    if let Err(error) = std::fs::write(base.join("accept_local"), "1") {
        tracing::warn!(iface, %error, "cannot set accept_local; source-NATed IPv4 traffic may be dropped");
    }
    if std::fs::read_to_string(base.join("rp_filter")).is_ok_and(|v| v.trim() == "1") {
        tracing::warn!(
            iface,
            "rp_filter is strict (1): IPv4 NodePort and source-NATed traffic will be dropped; set it to 0 or 2"
        );
    }
}

/// Puts `program` into the pinned link at `pin`. A link whose interface
/// went away (even if one of the same name came back) is defunct and the
/// kernel refuses the update, so only a live link is adopted.
fn adopt(program: &mut SchedClassifier, pin: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    let fd_link: FdLink = pinned.into();
    let link = SchedClassifierLink::try_from(fd_link).map_err(|e| e.to_string())?;
    let link_id = program.attach_to_link(link).map_err(|e| e.to_string())?;
    let link = program.take_link(link_id).map_err(|e| e.to_string())?;
    // The pin keeps the link; dropping our fd leaves it attached.
    let fd_link: FdLink = link.try_into().map_err(|e| format!("{e}"))?;
    drop(fd_link);
    Ok(())
}

fn attach_netlink(
    program: &mut SchedClassifier,
    index: u32,
    hook: TcAttachType,
) -> Result<(), String> {
    if let Err(e) = tc::qdisc_add_clsact(index)
        && !e.to_string().contains("exists")
    {
        return Err(format!("add clsact: {e}"));
    }
    let options = || NlOptions {
        priority: NETLINK_PRIORITY,
        handle: TcHandle::from(NETLINK_HANDLE),
        ..NlOptions::default()
    };
    let attach = |program: &mut SchedClassifier| {
        program.attach(
            index,
            TcAttach::Netlink {
                parent: hook.into(),
                options: options(),
            },
        )
    };
    let link_id = if let Ok(id) = attach(program) {
        id
    } else {
        // An earlier agent's filter holds our priority/handle: replace it.
        let name = program
            .info()
            .ok()
            .and_then(|info| info.name_as_str().map(str::to_owned))
            .unwrap_or_else(|| prog_names::TC_LB.to_owned());
        let _ = tc::qdisc_detach_program(index, hook.into(), &name);
        attach(program).map_err(|e| e.to_string())?
    };
    let link = program.take_link(link_id).map_err(|e| e.to_string())?;
    // Netlink filters stay until removed; do not let the drop detach it.
    std::mem::forget(link);
    Ok(())
}

/// Detaches everything under `pin_path` and removes the pins. Interfaces in
/// `ifaces` also lose a clsact filter of ours, if any.
///
/// # Errors
/// A pin could not be removed.
pub fn cleanup(pin_path: &Path, ifaces: &[String]) -> io::Result<Vec<String>> {
    let mut done = super::sock::detach_all(pin_path)?;
    done.extend(super::xdp::detach_all(pin_path)?);
    let links = pin_path.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            std::fs::remove_file(entry.path())?;
            done.push(format!("detached {}", entry.file_name().to_string_lossy()));
        }
    }
    let egress_links = pin_path.join(EGRESS_LINKS);
    if let Ok(entries) = std::fs::read_dir(&egress_links) {
        for entry in entries.flatten() {
            std::fs::remove_file(entry.path())?;
            done.push(format!(
                "detached {} (egress)",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    for iface in ifaces {
        let Some(index) = if_index(iface) else {
            continue;
        };
        let hooks = [
            (TcAttachType::Ingress, prog_names::TC_LB),
            (TcAttachType::Ingress, prog_names::TC_LB_L3),
            (TcAttachType::Egress, prog_names::TC_LB_EGRESS),
            (TcAttachType::Egress, prog_names::TC_LB_L3_EGRESS),
        ];
        for (hook, name) in hooks {
            if tc::qdisc_detach_program(index, hook.into(), name).is_ok() {
                done.push(format!("removed clsact filter {name} on {iface}"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(pin_path) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                continue;
            }
            std::fs::remove_file(entry.path())?;
            done.push(format!("unpinned {}", entry.file_name().to_string_lossy()));
        }
    }
    if links.exists() {
        std::fs::remove_dir(&links)?;
    }
    if egress_links.exists() {
        std::fs::remove_dir(&egress_links)?;
    }
    if pin_path.exists() {
        std::fs::remove_dir(pin_path)?;
    }
    Ok(done)
}

/// Names of all interfaces in this network namespace (asked over netlink:
/// /sys/class/net may show another namespace under `nsenter --net`).
#[must_use]
pub fn all_interfaces() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry,
    // freed with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.push(
                std::ffi::CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::{VERIFIER_NICE, lower_own_priority, superseded};

    fn own_nice() -> i32 {
        // SAFETY: reads the calling thread's own nice value.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    fn a_verifying_thread_is_niced_and_the_thread_that_started_it_is_not() {
        let before = own_nice();
        let niced = std::thread::spawn(|| {
            lower_own_priority(VERIFIER_NICE);
            own_nice()
        })
        .join()
        .expect("the thread ran");
        assert_eq!(niced, VERIFIER_NICE.max(before));
        assert_eq!(own_nice(), before, "only the calling thread");
    }

    #[test]
    fn a_pin_is_superseded_only_by_another_version_of_its_own_map() {
        let current = ["LB4_SVC_V3", "LB_CONFIG_V3", "LB4_CT_V4", "LB_SCRATCH"];
        assert!(superseded("LB4_SVC_V2", &current));
        assert!(superseded("LB4_SVC_V4", &current), "a newer agent's too");
        assert!(superseded("LB4_CT_V3", &current));
        assert!(!superseded("LB4_SVC_V3", &current), "the map itself");
        assert!(!superseded("LB6_SVC_V2", &current), "another base");
        assert!(!superseded("LB4_SVC", &current), "no version");
        assert!(!superseded("LB4_SVC_Vx", &current), "not a version");
        assert!(
            !superseded("LB_SCRATCH_V1", &current),
            "no versioned map of that base"
        );
        assert!(!superseded("links", &current));
    }
}
