//! `lb services`: every frontend with its backends, from the pinned maps.

use std::path::Path;

use lb_userspace::plan::BackendEntry;

#[derive(serde::Serialize)]
struct ServiceView {
    address: std::net::IpAddr,
    port: u16,
    protocol: &'static str,
    rev_nat_id: u32,
    packets: u64,
    bytes: u64,
    backends: Vec<BackendView>,
}

#[derive(serde::Serialize)]
struct BackendView {
    id: u32,
    address: std::net::IpAddr,
    port: u16,
    state: &'static str,
    local: bool,
}

fn backend_state(backend: Option<&BackendEntry>) -> &'static str {
    match backend {
        None => "missing",
        Some(b) if b.flags & lb_common::backend_flags::TERMINATING != 0 => "terminating",
        Some(_) => "active",
    }
}

/// Prints every frontend with its backends and counters, as text or JSON.
pub fn print(json: bool, pin_path: &Path) -> anyhow::Result<()> {
    let maps = super::open(pin_path)?;
    let state = maps.read_state()?;
    let mut views = Vec::new();
    for (frontend, frontend_state) in &state.frontends {
        let counters = maps
            .service_stats(frontend_state.rev_nat_id)
            .unwrap_or_default();
        views.push(ServiceView {
            address: frontend.addr,
            port: frontend.port,
            protocol: frontend.proto.name(),
            rev_nat_id: frontend_state.rev_nat_id,
            packets: counters.packets,
            bytes: counters.bytes,
            backends: frontend_state
                .slots
                .iter()
                .map(|id| {
                    let backend = state.backends.get(id);
                    BackendView {
                        id: *id,
                        address: backend
                            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |b| b.key.addr),
                        port: backend.map_or(0, |b| b.key.port),
                        state: backend_state(backend),
                        local: backend
                            .is_some_and(|b| b.flags & lb_common::backend_flags::LOCAL != 0),
                    }
                })
                .collect(),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    for (view, (frontend, _)) in views.iter().zip(&state.frontends) {
        println!(
            "{}  rev-nat {}  {} backends  {} packets",
            frontend,
            view.rev_nat_id,
            view.backends.len(),
            view.packets
        );
        for backend in &view.backends {
            println!(
                "  -> {} (id {}, {})",
                std::net::SocketAddr::new(backend.address, backend.port),
                backend.id,
                backend.state
            );
        }
    }
    Ok(())
}
