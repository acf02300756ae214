//! The XDP program on the node's uplinks (`--xdp`, see
//! `lb-ebpf/src/xdp.rs`): loading, attaching through a pinned `bpf_link` per
//! device (`links-xdp/<ifname>`: kept when the agent exits, its program
//! replaced atomically by the next agent, removed by `lb cleanup`), the
//! devmap of redirect targets, and the program's counters.
//!
//! Only native (driver) mode is used: generic XDP runs on an skb, after
//! the work XDP is meant to save, and TC does that job already.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{DevMapHash, MapData, PerCpuArray},
    programs::{
        Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::xdp;

use super::loader::{LoadError, if_index};

/// `--xdp`: where the XDP program runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Native XDP on every XDP interface; a device whose driver refuses it
    /// is an error.
    Native,
    /// Native XDP where the driver has it; other devices are left to TC.
    BestEffort,
    /// No XDP program: TC does everything.
    #[default]
    Off,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::BestEffort => "best-effort",
            Self::Off => "off",
        })
    }
}

/// What a device got (the log, `lb status`, the `lb_xdp_device_mode`
/// metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceMode {
    /// The XDP program runs in the driver.
    Native,
    /// The driver refused native XDP (best-effort): TC only.
    TcOnly,
}

impl DeviceMode {
    /// The name shown in the log, `lb status` and the metric label.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::TcOnly => "tc-only",
        }
    }
}

/// `--xdp` and `--xdp-interfaces`.
#[derive(Clone, Debug, Default)]
pub struct XdpSettings {
    /// Where the XDP program runs.
    pub mode: XdpMode,
    /// Devices that get it.
    pub interfaces: Vec<String>,
}

/// Attaches the XDP program to every device of `settings` (nothing when
/// off) and makes those devices the redirect targets; returns each
/// device's mode, logged.
///
/// # Errors
/// As [`attach`].
pub fn setup(
    ebpf: &mut Ebpf,
    pin_path: &Path,
    settings: &XdpSettings,
) -> Result<Vec<(String, DeviceMode)>, LoadError> {
    let mut devices = Vec::new();
    if settings.mode == XdpMode::Off {
        // An earlier agent's XDP links: gone, so that TC sees everything.
        for done in detach_all(pin_path).map_err(|source| LoadError::PinDir {
            path: pin_path.join(XDP_LINKS),
            source,
        })? {
            tracing::info!(what = %done, "--xdp=off");
        }
        return Ok(devices);
    }
    load(ebpf)?;
    for iface in &present(&settings.interfaces) {
        let mode = attach(ebpf, iface, pin_path, settings.mode)?;
        tracing::info!(iface = %iface, xdp = mode.name(), "XDP");
        devices.push((iface.clone(), mode));
    }
    // Redirect only between devices running the program: a driver sets up
    // its XDP transmit queues when a program is attached.
    let native: Vec<String> = devices
        .iter()
        .filter(|(_, mode)| *mode == DeviceMode::Native)
        .map(|(name, _)| name.clone())
        .collect();
    set_redirect_targets(ebpf, &native)?;
    Ok(devices)
}

/// The devices of `--xdp-interfaces` there now: each name, and each glob
/// matched against the node's interfaces. One not there yet is logged and
/// left to the interface watcher, which attaches when it appears
/// (`agent::links`): an uplink such as a bond may come up after the agent.
fn present(entries: &[String]) -> Vec<String> {
    let links = crate::net::ifwatch::list_links();
    let mut devices: Vec<String> = Vec::new();
    for entry in entries {
        let mut matched = links
            .values()
            .filter(|name| crate::net::ifwatch::glob_match(entry, name))
            .peekable();
        if matched.peek().is_none() {
            tracing::warn!(
                device = %entry,
                "no such device yet: XDP is attached when it appears"
            );
        }
        for name in matched {
            if !devices.contains(name) {
                devices.push(name.clone());
            }
        }
    }
    devices
}

/// Directory of the XDP links' pins.
const XDP_LINKS: &str = "links-xdp";

/// The pin of `iface`'s XDP link.
#[must_use]
pub fn link_pin(pin_path: &Path, iface: &str) -> PathBuf {
    pin_path.join(XDP_LINKS).join(iface)
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let program = ebpf.program_mut(xdp::PROG).ok_or(LoadError::Program {
        name: xdp::PROG,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    program.try_into().map_err(|source| LoadError::Program {
        name: xdp::PROG,
        source,
    })
}

/// Loads the XDP program of a loaded object: [`setup`] does when `--xdp`
/// uses it (its verification is ~0.5 s of a start), and the datapath
/// tests' fixture on every load, so that a program the verifier refuses
/// is found by any of them.
///
/// # Errors
/// The object lacks it or the kernel refuses it.
pub fn load(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    program(ebpf)?.load().map_err(|source| LoadError::Program {
        name: xdp::PROG,
        source,
    })
}

/// The loaded XDP program, for `BPF_PROG_TEST_RUN`.
///
/// # Errors
/// The object lacks it.
pub fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    program(ebpf)
}

/// Attaches the XDP program to `iface` in native mode: adopts the pinned
/// link of an earlier agent (the program replaced atomically) or creates
/// and pins one. `BestEffort`: a driver without native XDP leaves the
/// device to TC (`DeviceMode::TcOnly`); `Native`: that is an error.
///
/// # Errors
/// No such interface, a refusal in `Native` mode, or the pin failed.
pub fn attach(
    ebpf: &mut Ebpf,
    iface: &str,
    pin_path: &Path,
    mode: XdpMode,
) -> Result<DeviceMode, LoadError> {
    let index = if_index(iface).ok_or_else(|| LoadError::NoSuchInterface(iface.to_owned()))?;
    let attach_err = |step: &str| {
        let iface = iface.to_owned();
        let step = step.to_owned();
        move |source: Box<dyn std::error::Error + Send + Sync>| LoadError::Attach {
            iface,
            step,
            source,
        }
    };
    let dir = pin_path.join(XDP_LINKS);
    std::fs::create_dir_all(&dir).map_err(|source| LoadError::PinDir { path: dir, source })?;
    let pin = link_pin(pin_path, iface);
    let program = program(ebpf)?;
    if pin.exists() {
        match adopt(program, &pin) {
            Ok(()) => return Ok(DeviceMode::Native),
            Err(reason) => {
                tracing::info!(iface, %reason, "pinned XDP link not reusable, attaching anew");
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
    let link_id = match program.attach(index, AyaXdpMode::Driver) {
        Ok(link_id) => link_id,
        Err(error) if mode == XdpMode::BestEffort => {
            tracing::warn!(iface, %error, "native XDP refused by the driver: this device stays TC-only");
            return Ok(DeviceMode::TcOnly);
        }
        Err(error) => {
            return Err(attach_err(
                "attach XDP in native (driver) mode; the driver refused it (use \
                 --xdp=best-effort to leave such devices to TC)",
            )(error.into()));
        }
    };
    let link = program
        .take_link(link_id)
        .map_err(|e| attach_err("take the XDP link")(e.into()))?;
    let link: FdLink = link.try_into().map_err(|e: LinkError| {
        attach_err("use the XDP link (a netlink attachment, no bpf_link)")(e.into())
    })?;
    link.pin(&pin)
        .map_err(|e| attach_err("pin the XDP link")(e.into()))?;
    Ok(DeviceMode::Native)
}

/// Puts `program` into the pinned link at `pin` (`bpf_link_update`).
fn adopt(program: &mut Xdp, pin: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    let fd_link: FdLink = pinned.into();
    let link_id = program
        .attach_to_link(XdpLink::try_from(fd_link).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let link = program.take_link(link_id).map_err(|e| e.to_string())?;
    // The pin keeps the link; dropping our fd leaves it attached.
    let fd_link: FdLink = link.try_into().map_err(|e| format!("{e}"))?;
    drop(fd_link);
    Ok(())
}

/// Puts the devices named in `ifaces` into the devmap of redirect targets
/// (a translated frame may leave through any device the FIB picks; one
/// outside the map goes to the stack). Devices that vanished are skipped.
///
/// # Errors
/// The object lacks the map.
pub fn set_redirect_targets(ebpf: &mut Ebpf, ifaces: &[String]) -> Result<usize, LoadError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| LoadError::Attach {
        iface: String::new(),
        step: format!("fill {}", xdp::DEVMAP),
        source,
    };
    let map = ebpf
        .map_mut(xdp::DEVMAP)
        .ok_or_else(|| failed("the object has no such map".into()))?;
    let mut map: DevMapHash<_> = DevMapHash::try_from(map).map_err(|e| failed(e.into()))?;
    let mut added = 0;
    for iface in ifaces {
        let Some(index) = if_index(iface) else {
            continue;
        };
        match map.insert(index, index, None, 0) {
            Ok(()) => added += 1,
            Err(error) => tracing::debug!(iface, %error, "not an XDP redirect target"),
        }
    }
    Ok(added)
}

/// The devices with a pinned XDP link under `pin_path`.
#[must_use]
pub fn attached(pin_path: &Path) -> Vec<String> {
    std::fs::read_dir(pin_path.join(XDP_LINKS))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes every pinned XDP link under `pin_path` (detaching the program).
///
/// # Errors
/// A pin could not be removed.
pub fn detach_all(pin_path: &Path) -> std::io::Result<Vec<String>> {
    let dir = pin_path.join(XDP_LINKS);
    let mut done = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            std::fs::remove_file(entry.path())?;
            done.push(format!(
                "detached {} (xdp)",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    if dir.exists() {
        std::fs::remove_dir(&dir)?;
    }
    Ok(done)
}

/// The XDP counters (`xdp::stat::NAMES` order), summed over CPUs, from
/// the pinned map; `None` when there is none (no XDP in this object).
#[must_use]
pub fn stats(pin_path: &Path) -> Option<Vec<(&'static str, u64)>> {
    let data = MapData::from_pin(pin_path.join(xdp::STATS_MAP)).ok()?;
    let map: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).ok()?;
    let mut out = Vec::new();
    for (index, name) in (0_u32..).zip(xdp::stat::NAMES) {
        let values = map.get(&index, 0).ok()?;
        out.push((name, values.iter().sum()));
    }
    Some(out)
}
