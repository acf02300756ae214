//! Loading the program and attaching it: at start, and whenever an
//! interface that matches `--attach-pattern` appears or goes.

use std::{path::Path, sync::Mutex};

use super::{AgentError, Shared, lock};
use crate::error::Causes;
use crate::{
    datapath::{
        loader::{self, Attachment},
        maps::Maps,
        sock::{self, SockLbSettings, SockLbState},
        xdp,
    },
    net::ifwatch::LinkEvent,
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

pub(super) fn load_and_attach(
    pin_path: &Path,
    capacities: &loader::Capacities,
    interfaces: &[String],
    socket_lb: &SockLbSettings,
    xdp_settings: &xdp::XdpSettings,
) -> Result<Loaded, AgentError> {
    let mut ebpf = loader::load_with(pin_path, capacities)?;
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
    let state = maps.read_state()?;
    Ok((ebpf, maps, (attachments, xdp_devices), state))
}

/// Attaches to an interface that appeared; forgets one that went away
/// (its TCX link died with it, so only the pin is left to remove).
pub(super) fn on_link_event(
    event: &LinkEvent,
    ebpf: &mut aya::Ebpf,
    pin_path: &Path,
    shared: &Mutex<Shared>,
) {
    match event {
        LinkEvent::Added(iface) => {
            if lock(shared)
                .attachments
                .iter()
                .any(|(name, _)| name == iface)
            {
                return;
            }
            let attached = loader::attach_iface(ebpf, iface, pin_path);
            match attached {
                Ok(how) => {
                    tracing::info!(iface = %iface, attachment = ?how, "attached to new interface");
                    lock(shared).attachments.push((iface.clone(), how));
                }
                // It may be gone again already; the removal event follows.
                Err(error) => {
                    tracing::warn!(iface = %iface, error = %Causes(&error), "cannot attach to new interface");
                }
            }
        }
        LinkEvent::Removed(iface) => {
            lock(shared).attachments.retain(|(name, _)| name != iface);
            // The egress link died with the interface too.
            let _ = std::fs::remove_file(loader::egress_link_pin(pin_path, iface));
            let pin = pin_path.join("links").join(iface);
            match std::fs::remove_file(&pin) {
                Ok(()) => tracing::info!(iface = %iface, "interface gone; link pin removed"),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    tracing::info!(iface = %iface, "interface gone");
                }
                Err(error) => {
                    tracing::warn!(iface = %iface, %error, pin = %pin.display(), "cannot remove link pin");
                }
            }
        }
    }
}
