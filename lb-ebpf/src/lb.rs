//! Service lookups: the frontend of a packet, its source ranges, session
//! affinity and the choice of a backend.

use lb_common::{
    AffinityEntry, Backend, CLUSTER_CIDR_REV_NAT, EndpointKey, LbService, backend_flags,
    config_flags, reason, svc_flags,
};

use crate::{
    family::{Family, Tuple, affinity_key, source_range_key, svc_key},
    hash::slot_for,
    maps::LB_CONFIG_V3,
    verdict::Verdict,
};

/// The frontend (slot 0) serving `daddr:dport_be/l4_proto`.
///
/// # Safety
/// The reference is into a map value: copy it out at once.
#[inline(always)]
pub(crate) unsafe fn frontend<F: Family>(
    daddr: F::Addr,
    dport_be: u16,
    l4_proto: u8,
) -> Option<&'static LbService> {
    // SAFETY: the caller copies the value out at once.
    unsafe { F::services().get(&svc_key(daddr, dport_be, 0, l4_proto)) }
}

/// True when `daddr` is a service address (its marker entry: port 0,
/// protocol 0), whatever the port.
#[inline(always)]
pub(crate) fn is_service_address<F: Family>(daddr: F::Addr) -> bool {
    // SAFETY: only the presence is used.
    unsafe { F::services().get(&svc_key(daddr, 0, 0, 0)) }.is_some()
}

/// False when the frontend limits its clients to source ranges and
/// `client` is in none of them.
#[inline(always)]
pub(crate) fn source_allowed<F: Family>(frontend: &LbService, client: F::Addr) -> bool {
    frontend.flags & svc_flags::SOURCE_RANGES == 0
        || F::source_ranges()
            .get(&source_range_key::<F>(frontend.rev_nat_id, client))
            .is_some()
}

/// 1 when `--cluster-cidr` is set and `client` is in none of the cluster
/// CIDRs (kept in the source-range map under `CLUSTER_CIDR_REV_NAT`),
/// else 0. A subprogram: the parse step calls it for `ClusterIP` hits, and
/// its key stays off the parse step's frame.
#[inline(never)]
pub(crate) fn off_cluster_source<F: Family>(client: F::Addr) -> u32 {
    let Some(config) = LB_CONFIG_V3.get_ptr(0) else {
        return 0;
    };
    // SAFETY: map value pointer; one field read.
    if unsafe { (*config).flags } & config_flags::CLUSTER_CIDR == 0 {
        return 0;
    }
    let key = source_range_key::<F>(CLUSTER_CIDR_REV_NAT, client);
    u32::from(F::source_ranges().get(&key).is_none())
}

/// True when `backend` is an entry of `frontend` (active or draining):
/// backend entries are per frontend and their ids are not reused, so a
/// conntrack or affinity entry naming a backend another frontend has, or
/// one removed from this frontend, never passes.
#[inline(always)]
pub(crate) fn member_of<A>(backend: &Backend<A>, frontend: &LbService) -> bool {
    backend.rev_nat_id == frontend.rev_nat_id
}

/// `choose_backend` as a leaf subprogram: the backend id (0: none), the
/// backend in `out`.
#[inline(never)]
pub(crate) fn choose_backend_sub<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    out: &mut Backend<F::Addr>,
) -> u32 {
    match choose_backend::<F>(tuple, frontend) {
        Ok((id, backend)) => {
            *out = backend;
            id
        }
        Err(_) => 0,
    }
}

/// The client's live affinity backend for `frontend` (id, 0: none; the
/// backend in `out`), its timeout restarted. A leaf subprogram called
/// next to `choose_backend_sub` (not from it): its frame is not added to
/// that one's on the new-flow chain.
#[inline(never)]
pub(crate) fn affinity_backend_sub<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    now: u64,
    out: &mut Backend<F::Addr>,
) -> u32 {
    let key = affinity_key(tuple.saddr, frontend.backend_id);
    let Some(entry) = F::affinity().get_ptr_mut(&key) else {
        return 0;
    };
    // SAFETY: map value pointer; fields read once.
    let (recorded, last_used_ns) = unsafe { ((*entry).backend_id, (*entry).last_used_ns) };
    let timeout_ns = u64::from(frontend.affinity_timeout_s) * 1_000_000_000;
    if now.saturating_sub(last_used_ns) > timeout_ns {
        return 0;
    }
    let Some((backend_id, backend)) = own_backend::<F>(recorded, frontend) else {
        return 0;
    };
    // Each new connection restarts the timeout, as kube-proxy's
    // `recent --set` does.
    if !crate::probe::dry_run() {
        // SAFETY: map value pointer.
        unsafe { (*entry).last_used_ns = now };
    }
    *out = backend;
    backend_id
}

/// `frontend`'s own usable backend for the endpoint of the backend
/// `recorded` (an affinity entry's, possibly recorded through another
/// frontend of the same group): the same entry when it is `frontend`'s,
/// else the one the endpoint index names. `None` when the endpoint is
/// not (or no longer) one of `frontend`'s, e.g. a remote endpoint at an
/// `externalTrafficPolicy: Local` frontend, as kube-proxy's external
/// chain jumps to local endpoints only.
#[inline(always)]
pub(crate) fn own_backend<F: Family>(
    recorded: u32,
    frontend: &LbService,
) -> Option<(u32, Backend<F::Addr>)> {
    let backend = *F::backend(recorded)?;
    let (id, backend) = if member_of(&backend, frontend) {
        (recorded, backend)
    } else {
        let key = EndpointKey {
            rev_nat_id: frontend.rev_nat_id,
            addr: backend.addr,
            port_be: backend.port_be,
            proto: backend.proto,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        let id = *unsafe { F::endpoints().get(&key) }?;
        (id, *F::backend(id)?)
    };
    affinity_usable(&backend, frontend).then_some((id, backend))
}

/// The backend for a new flow without a live affinity (see
/// `affinity_backend_sub`): its Maglev table's entry for the flow when it
/// has one, else a slot chosen by the flow hash.
#[inline(always)]
fn choose_backend<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
) -> Result<(u32, Backend<F::Addr>), Verdict> {
    if let Some(picked) = crate::maglev::pick::<F>(tuple, frontend) {
        return Ok(picked);
    }
    let slot = slot_for(F::flow_hash(tuple), frontend.count);
    slot_backend::<F>(frontend, tuple.daddr, tuple.dport_be, tuple.proto, slot)
        .ok_or(Verdict::drop(reason::DROP_BACKEND_MISSING))
}

/// The backend in slot `slot` of FRONTEND, whose key is
/// `daddr:dport_be/l4_proto` (id and value), `None` when the slot or its
/// backend is missing. Slots up to `limits::INLINE_SLOTS` are in the
/// frontend's own entry; those after it have entries of their own. Also
/// used by the socket programs, which pick the slot their own way.
#[inline(always)]
pub(crate) fn slot_backend<F: Family>(
    frontend: &LbService,
    daddr: F::Addr,
    dport_be: u16,
    l4_proto: u8,
    slot: u16,
) -> Option<(u32, Backend<F::Addr>)> {
    let backend_id = if let Some(id) = frontend.inline_slot(slot) {
        id
    } else {
        let slot_key = svc_key(daddr, dport_be, slot, l4_proto);
        // SAFETY: the value is copied out at once.
        unsafe { F::services().get(&slot_key) }?.backend_id
    };
    let backend = F::backend(backend_id)?;
    // A slot names a backend written before it and cleared after it, but
    // an apply interrupted between the two leaves a cleared entry named.
    member_of(backend, frontend).then_some((backend_id, *backend))
}

/// True when an affinity entry naming `backend` may take a new
/// connection of `frontend`: the backend is still the frontend's and
/// takes new flows.
#[inline(always)]
pub(crate) fn affinity_usable<A>(backend: &Backend<A>, frontend: &LbService) -> bool {
    member_of(backend, frontend) && backend.flags & backend_flags::TERMINATING == 0
}

/// Records the client's backend for session affinity in the frontend's
/// group, when the frontend has it (best effort: an LRU map).
#[inline(always)]
pub(crate) fn remember_affinity<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    backend_id: u32,
    now: u64,
) {
    if frontend.flags & svc_flags::AFFINITY != 0 && !crate::probe::dry_run() {
        let affinity = AffinityEntry {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        let key = affinity_key(tuple.saddr, frontend.backend_id);
        let _ = F::affinity().insert(&key, &affinity, 0);
    }
}
