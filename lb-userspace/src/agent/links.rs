//! Loading the program and attaching it: at start, and whenever an
//! interface that matches `--attach-pattern` appears or goes.

use std::{path::Path, sync::Mutex};

use super::{AgentConfig, AgentError, Shared, lock};
use crate::error::Causes;
use crate::{
    datapath::{
        loader::{self, Attachment},
        maps::Maps,
        sock::{self, SockLbSettings, SockLbState},
        xdp,
    },
    net::ifwatch::{self, IfWatchError, LinkEvent, Patterns},
    plan::DatapathState,
};

/// What loading yields: the object, its maps, the attachments (TC, then
/// the XDP mode of each `--xdp-interfaces` device) and the state recovered
/// from the pins.
pub(super) type Loaded = (
    aya::Ebpf,
    Maps,
    (Vec<(String, Attachment)>, Vec<(String, xdp::DeviceMode)>),
    DatapathState,
);

/// Loads and attaches (verifier, map creation: hundreds of milliseconds)
/// on a blocking thread.
pub(super) fn spawn_load(
    config: &AgentConfig,
    policy: &LinkPolicy,
) -> tokio::task::JoinHandle<Result<Loaded, AgentError>> {
    let (pin_path, capacities) = (config.pin_path.clone(), config.capacities);
    let interfaces = config.interfaces.clone();
    let link_kinds = start_link_kinds(&interfaces, policy);
    let socket_lb = config.socket_lb.clone();
    let xdp = config.xdp.clone();
    tokio::task::spawn_blocking(move || {
        load_and_attach(
            &pin_path,
            &capacities,
            (&interfaces, &link_kinds),
            &socket_lb,
            &xdp,
        )
    })
}

fn load_and_attach(
    pin_path: &Path,
    capacities: &loader::Capacities,
    (interfaces, link_kinds): (&[String], &[loader::LinkKind]),
    socket_lb: &SockLbSettings,
    xdp_settings: &xdp::XdpSettings,
) -> Result<Loaded, AgentError> {
    let mut ebpf = loader::load_for(pin_path, capacities, link_kinds)?;
    // Before `Maps` takes its maps out of the object.
    let map_names = loader::map_names(&ebpf);
    let maps = Maps::from_ebpf(&mut ebpf)?;
    let mut attachments = Vec::new();
    for iface in interfaces {
        let how = loader::attach_iface(&mut ebpf, iface, pin_path)?;
        tracing::info!(iface = %iface, attachment = ?how, "attached");
        attachments.push((iface.clone(), how));
    }
    let xdp_devices = xdp::setup(&mut ebpf, pin_path, xdp_settings)?;
    for (iface, _) in &xdp_devices {
        if !interfaces.contains(iface) {
            // What XDP passes on (refusals, odd frames, translated frames
            // the stack must route) needs TC there too.
            tracing::warn!(
                iface = %iface,
                "XDP device not in --attach: frames XDP leaves to TC get no TC program there"
            );
        }
    }
    // The node's own sockets: without cgroup v2 (or on a kernel that
    // refuses the programs) the TC path still serves everything else.
    match sock::setup(&mut ebpf, pin_path, socket_lb) {
        Ok(SockLbState::Off) => tracing::info!("socket-level load balancing off"),
        Ok(SockLbState::Attached { .. }) => {}
        Err(error) => tracing::warn!(
            error = %Causes(&error),
            "socket-level load balancing is not available: the node's own sockets are not \
             translated; the TC path serves everything else"
        ),
    }
    for pin in loader::remove_superseded_pins(pin_path, &map_names) {
        tracing::info!(pin, "removed the pin of a map of another layout version");
    }
    let state = maps.read_state()?;
    Ok((ebpf, maps, (attachments, xdp_devices), state))
}

/// The link kinds whose TC programs the load verifies: Ethernet always
/// (most devices that come later are: pods' veths), L3 when a device the
/// agent attaches at its start needs it (one of `--attach`, or one there
/// already that `--attach-pattern` matches); otherwise once one comes.
fn start_link_kinds(interfaces: &[String], policy: &LinkPolicy) -> Vec<loader::LinkKind> {
    let present = ifwatch::list_links().into_values();
    let needs_l3 = interfaces
        .iter()
        .cloned()
        .chain(present.filter(|name| policy.tc.matches(name)))
        .any(|iface| loader::link_kind(&iface) == Some(loader::LinkKind::L3));
    let mut kinds = vec![loader::LinkKind::Ethernet];
    if needs_l3 {
        kinds.push(loader::LinkKind::L3);
    }
    kinds
}

/// Which interfaces that appear get which program: TC for
/// `--attach-pattern`, XDP for `--xdp-interfaces` (names or globs) unless
/// `--xdp=off`.
pub(super) struct LinkPolicy {
    /// `--attach-pattern`.
    pub(super) tc: Patterns,
    /// `--xdp-interfaces` (empty when XDP is off).
    pub(super) xdp: Patterns,
    /// `--xdp`.
    pub(super) xdp_mode: xdp::XdpMode,
}

impl LinkPolicy {
    /// The policy of the agent's settings.
    ///
    /// # Errors
    /// A pattern is empty or longer than an interface name.
    pub(super) fn new(
        attach_patterns: &[String],
        xdp_settings: &xdp::XdpSettings,
    ) -> Result<Self, IfWatchError> {
        let xdp_entries = if xdp_settings.mode == xdp::XdpMode::Off {
            Vec::new()
        } else {
            xdp_settings.interfaces.clone()
        };
        Ok(Self {
            tc: Patterns::new(attach_patterns.iter().cloned())?,
            xdp: Patterns::new(xdp_entries)?,
            xdp_mode: xdp_settings.mode,
        })
    }

    /// The interface watcher, reporting the interfaces of both kinds to
    /// TX; none when there are none to watch.
    ///
    /// # Errors
    /// The netlink subscription failed.
    pub(super) fn watch(
        &self,
        tx: tokio::sync::mpsc::Sender<LinkEvent>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, IfWatchError> {
        let watched = self.tc.union(&self.xdp);
        if watched.is_empty() {
            return Ok(None);
        }
        ifwatch::spawn(watched, tx).map(Some)
    }
}

/// Attaches to an interface that appeared; forgets one that went away
/// (its TCX and XDP links died with it, so only the pins are left to
/// remove).
pub(super) fn on_link_event(
    event: &LinkEvent,
    policy: &LinkPolicy,
    ebpf: &mut aya::Ebpf,
    pin_path: &Path,
    shared: &Mutex<Shared>,
) {
    match event {
        LinkEvent::Added(iface) => {
            // TC first: XDP passes what it does not handle on to TC.
            if policy.tc.matches(iface) {
                tc_on_new_device(iface, ebpf, pin_path, shared);
            }
            if policy.xdp.matches(iface) {
                xdp_on_new_device(iface, policy.xdp_mode, ebpf, pin_path, shared);
            }
        }
        LinkEvent::Removed(iface) => {
            let had_xdp = {
                let mut shared = lock(shared);
                shared.attachments.retain(|(name, _)| name != iface);
                let before = shared.xdp_devices.len();
                shared.xdp_devices.retain(|(name, _)| name != iface);
                shared.xdp_devices.len() != before
            };
            tracing::info!(iface = %iface, "interface gone");
            // Its devmap entry went with the device too (the kernel's
            // devmap notifier).
            if had_xdp {
                remove_link_pin(iface, &xdp::link_pin(pin_path, iface));
            }
            // The egress link died with the interface too.
            let _ = std::fs::remove_file(loader::egress_link_pin(pin_path, iface));
            remove_link_pin(iface, &loader::link_pin(pin_path, iface));
        }
    }
}

/// Removes the pin of a link that died with its interface IFACE.
fn remove_link_pin(iface: &str, pin: &Path) {
    match std::fs::remove_file(pin) {
        Ok(()) => tracing::info!(iface = %iface, pin = %pin.display(), "link pin removed"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(iface = %iface, %error, pin = %pin.display(), "cannot remove link pin");
        }
    }
}

/// TC on an `--attach-pattern` device that appeared after the start (or
/// came back).
fn tc_on_new_device(iface: &str, ebpf: &mut aya::Ebpf, pin_path: &Path, shared: &Mutex<Shared>) {
    if lock(shared)
        .attachments
        .iter()
        .any(|(name, _)| name == iface)
    {
        return;
    }
    match loader::attach_iface(ebpf, iface, pin_path) {
        Ok(how) => {
            tracing::info!(iface = %iface, attachment = ?how, "attached to new interface");
            lock(shared).attachments.push((iface.to_owned(), how));
        }
        // It may be gone again already; the removal event follows.
        Err(error) => {
            tracing::warn!(iface = %iface, error = %Causes(&error), "cannot attach to new interface");
        }
    }
}

/// XDP on a device of `--xdp-interfaces` that appeared after the start
/// (or came back): attached, made a redirect target when native, and
/// shown in the status and metrics.
fn xdp_on_new_device(
    iface: &str,
    mode: xdp::XdpMode,
    ebpf: &mut aya::Ebpf,
    pin_path: &Path,
    shared: &Mutex<Shared>,
) {
    if lock(shared)
        .xdp_devices
        .iter()
        .any(|(name, _)| name == iface)
    {
        return;
    }
    match xdp::attach(ebpf, iface, pin_path, mode) {
        Ok(device_mode) => {
            if device_mode == xdp::DeviceMode::Native
                && let Err(error) = xdp::set_redirect_targets(ebpf, &[iface.to_owned()])
            {
                tracing::warn!(iface = %iface, error = %Causes(&error), "not an XDP redirect target");
            }
            tracing::info!(iface = %iface, xdp = device_mode.name(), "XDP on new interface");
            lock(shared)
                .xdp_devices
                .push((iface.to_owned(), device_mode));
        }
        // Gone again already, or `--xdp=native` and a driver without it:
        // the device stays with TC (if `--attach-pattern` has it).
        Err(error) => {
            tracing::warn!(iface = %iface, error = %Causes(&error), "cannot attach XDP to new interface");
        }
    }
}
