//! Source NAT of new flows: when it applies, which address, which port.

use lb_common::{
    Backend, LbService, SNAT_PORT_COUNT, SNAT_PORT_MIN, backend_flags, ct_dir, reason, svc_flags,
};

use crate::{
    ct::{self, Flow},
    family::{Family, Tuple, ct_key},
    maps::LB_CONFIG_V2,
    verdict::Verdict,
};

/// Candidate ports tried for one source NAT.
const SNAT_ATTEMPTS: u32 = 8;

/// Decides on source NAT for a new flow whose backend is in `flow`:
/// hairpin flows (a backend sending to its own service) get the loopback
/// address as source, external traffic to a backend on another node the
/// node address (unless the frontend keeps the client address). On SNAT,
/// `flow` gets the address and a free port.
#[inline(always)]
pub(crate) fn choose_source<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    now: u64,
    flow: &mut Flow<F>,
) -> Result<(), Verdict> {
    let hairpin = flow.backend.addr == tuple.saddr;
    let remote_external = frontend.flags & svc_flags::EXTERNAL != 0
        && frontend.flags & svc_flags::EXT_LOCAL == 0
        && flow.backend.flags & backend_flags::LOCAL == 0;
    if !(hairpin || remote_external) {
        return Ok(());
    }
    let config = LB_CONFIG_V2
        .get_ptr(0)
        .ok_or(Verdict::drop(reason::DROP_NO_SNAT))?;
    // SAFETY: map value pointer; the field is copied out.
    let nat_addr = unsafe {
        if hairpin {
            F::loopback(&*config)
        } else {
            F::node_addr(&*config)
        }
    };
    if F::is_unspecified(&nat_addr) {
        return Err(Verdict::drop(reason::DROP_NO_SNAT));
    }
    let port = snat_port::<F>(tuple, &flow.backend, &nat_addr, now);
    if port == 0 {
        return Err(Verdict::drop(reason::DROP_NO_SNAT));
    }
    #[expect(clippy::cast_possible_truncation, reason = "a port from `snat_port`")]
    let port_be = port as u16;
    flow.nat_port_be = port_be;
    flow.nat_addr = nat_addr;
    flow.snat = true;
    Ok(())
}

/// A free source port on `nat_addr` towards the backend: the first of a
/// few hashed candidates whose reply tuple is not taken by a live flow.
/// Returns 0 when none is free. A subprogram: its own stack frame.
#[inline(never)]
fn snat_port<F: Family>(
    tuple: &Tuple<F::Addr>,
    backend: &Backend<F::Addr>,
    nat_addr: &F::Addr,
    now: u64,
) -> u32 {
    let nat_addr = *nat_addr;
    let start = F::flow_hash(tuple);
    let mut attempt = 0u32;
    while attempt < SNAT_ATTEMPTS {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "below SNAT_PORT_COUNT, a u16"
        )]
        let offset =
            (start.wrapping_add(attempt.wrapping_mul(7919)) % u32::from(SNAT_PORT_COUNT)) as u16;
        let port_be = (SNAT_PORT_MIN + offset).to_be();
        let reply = Tuple {
            saddr: backend.addr,
            daddr: nat_addr,
            sport_be: backend.port_be,
            dport_be: port_be,
            proto: tuple.proto,
        };
        let free = match F::conntrack().get_ptr(&ct_key(&reply, ct_dir::REPLY)) {
            None => true,
            // SAFETY: map value pointer; read once.
            Some(entry) => !ct::usable(unsafe { &*entry }, tuple.proto, 0, now),
        };
        if free {
            return u32::from(port_be);
        }
        attempt += 1;
    }
    0
}
