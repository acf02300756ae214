//! Connection tracking: entry lifetimes, a flow's service and reply
//! entries, and the flow state the rewrite needs.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    Backend, CtEntry, LbService, backend_flags, ct_dir, ct_flags, ct_timeout, proto, reason,
};

use crate::{
    family::{Family, Tuple, ct_key},
    hdr::l4::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    lb, snat,
    verdict::{Verdict, encode_unit},
    zeroed::zeroed_in_place,
};

/// Monotonic clock in nanoseconds, at tick resolution (`CLOCK_MONOTONIC_COARSE`):
/// timeouts are seconds, and the coarse clock costs a fraction of the
/// precise one, which reads the (paravirtual) TSC.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Lifetime of an entry after its last packet.
#[inline(always)]
fn lifetime_ns(l4_proto: u8, flags: u32) -> u64 {
    if l4_proto != proto::TCP {
        ct_timeout::UDP_NS
    } else if flags & ct_flags::CLOSING != 0 {
        ct_timeout::TCP_CLOSING_NS
    } else {
        ct_timeout::TCP_NS
    }
}

/// True when the entry may still be used for a packet with `tcp_flags`.
/// A bare SYN on a closing entry starts a new flow on a reused port.
#[inline(always)]
pub(crate) fn usable(entry: &CtEntry, l4_proto: u8, tcp_flags: u8, now: u64) -> bool {
    let bare_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if bare_syn && entry.flags & ct_flags::CLOSING != 0 {
        return false;
    }
    now.saturating_sub(entry.last_seen_ns) <= lifetime_ns(l4_proto, entry.flags)
}

/// Flags an entry gains from this packet.
#[inline(always)]
fn flags_from_tcp(tcp_flags: u8) -> u32 {
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        ct_flags::CLOSING
    } else {
        0
    }
}

/// Refreshes `last_seen_ns` (at most once per `REFRESH_NS`) and records
/// closing flags. Returns true when the entry was refreshed.
#[inline(always)]
pub(crate) fn touch(entry: *mut CtEntry, tcp_flags: u8, now: u64) -> bool {
    if crate::probe::dry_run() {
        return false;
    }
    let new_flags = flags_from_tcp(tcp_flags);
    // SAFETY: `entry` points into a map value.
    unsafe {
        if new_flags & !(*entry).flags != 0 {
            (*entry).flags |= new_flags;
        }
        if now.saturating_sub((*entry).last_seen_ns) >= ct_timeout::REFRESH_NS {
            (*entry).last_seen_ns = now;
            return true;
        }
    }
    false
}

/// A new entry, built in place in `slot` (see `zeroed_in_place`).
#[inline(always)]
fn new_entry(
    slot: &mut MaybeUninit<CtEntry>,
    backend_id: u32,
    rev_nat_id: u32,
    tcp_flags: u8,
    now: u64,
) -> &mut CtEntry {
    // SAFETY: `CtEntry` is plain integers and bytes.
    let entry = unsafe { zeroed_in_place(slot) };
    entry.created_ns = now;
    entry.last_seen_ns = now;
    entry.backend_id = backend_id;
    entry.rev_nat_id = rev_nat_id;
    entry.flags = flags_from_tcp(tcp_flags);
    entry
}

/// What the datapath needs of a flow's conntrack entry.
#[derive(Clone, Copy)]
pub(crate) struct Flow<F: Family> {
    /// Backend the flow goes to.
    pub(crate) backend_id: u32,
    /// That backend's map value.
    pub(crate) backend: Backend<F::Addr>,
    /// Source the packets get when the flow is source-NATed.
    pub(crate) nat_addr: F::Addr,
    /// Source port that goes with `nat_addr`.
    pub(crate) nat_port_be: u16,
    /// Whether the flow is source-NATed.
    pub(crate) snat: bool,
}

/// `established_flow` as a leaf subprogram: bit 0 found, bit 1 refreshed.
#[inline(never)]
pub(crate) fn established_flow_sub<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    tcp_flags: u8,
    now: u64,
    flow: &mut Flow<F>,
) -> u32 {
    let (found, refreshed) = established_flow::<F>(tuple, frontend, tcp_flags, now, flow);
    u32::from(found) | (u32::from(refreshed) << 1)
}

/// Loads the flow of an established entry into `flow`, if the entry may
/// still be used and its backend is still one of the frontend's (taking new
/// flows or draining). A UDP flow whose backend no longer serves is not
/// loaded when the frontend has backends for new flows: it moves to one.
/// Returns (found, refreshed).
#[inline(always)]
fn established_flow<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    tcp_flags: u8,
    now: u64,
    flow: &mut Flow<F>,
) -> (bool, bool) {
    let Some(entry) = F::conntrack().get_ptr_mut(&ct_key(tuple, ct_dir::SERVICE)) else {
        return (false, false);
    };
    // SAFETY: map value pointer; fields are read one by one.
    let (rev_nat_id, backend_id, flags) =
        unsafe { ((*entry).rev_nat_id, (*entry).backend_id, (*entry).flags) };
    if rev_nat_id != frontend.rev_nat_id {
        return (false, false);
    }
    // SAFETY: as above.
    if !usable(unsafe { &*entry }, tuple.proto, tcp_flags, now) {
        return (false, false);
    }
    // SAFETY: the value is copied out at once.
    let Some(backend) = (unsafe { F::backends().get(&backend_id) }) else {
        return (false, false);
    };
    if !lb::member_of(backend, frontend) {
        return (false, false);
    }
    if tuple.proto == proto::UDP
        && backend.flags & backend_flags::NOT_SERVING != 0
        && frontend.count != 0
    {
        return (false, false);
    }
    flow.backend = *backend;
    flow.backend_id = backend_id;
    if flags & ct_flags::SNAT != 0 {
        flow.snat = true;
        // SAFETY: map value pointer.
        unsafe {
            flow.nat_addr = F::from_nat(&(*entry).nat_addr);
            flow.nat_port_be = (*entry).nat_port_be;
        }
    }
    (true, touch(entry, tcp_flags, now))
}

/// `new_flow` as a subprogram: its own stack frame, the flow written to
/// `out`, a scalar result (`encode_unit`).
#[inline(never)]
pub(crate) fn new_flow_into<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    tcp_flags: u8,
    now: u64,
    out: &mut Flow<F>,
) -> u64 {
    encode_unit(new_flow::<F>(tuple, frontend, tcp_flags, now, out))
}

/// A new flow: choose its backend, decide on source NAT, and record it in
/// conntrack (and in the affinity map).
#[inline(always)]
fn new_flow<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    tcp_flags: u8,
    now: u64,
    flow: &mut Flow<F>,
) -> Result<(), Verdict> {
    let mut backend = crate::family::placeholder_backend(tuple.daddr);
    let backend_id = lb::choose_backend_sub::<F>(tuple, frontend, now, &mut backend);
    if backend_id == 0 {
        return Err(Verdict::drop(reason::DROP_BACKEND_MISSING));
    }
    flow.backend_id = backend_id;
    flow.backend = backend;
    snat::choose_source::<F>(tuple, frontend, now, flow)?;
    let mut slot = MaybeUninit::uninit();
    let entry = new_entry(&mut slot, backend_id, frontend.rev_nat_id, tcp_flags, now);
    if flow.snat {
        entry.flags |= ct_flags::SNAT;
        F::set_nat(&mut entry.nat_addr, flow.nat_addr);
        entry.nat_port_be = flow.nat_port_be;
    }
    if !crate::probe::dry_run()
        && F::conntrack()
            .insert(&ct_key(tuple, ct_dir::SERVICE), entry, 0)
            .is_err()
    {
        return Err(Verdict::drop(reason::DROP_CT_INSERT));
    }
    lb::remember_affinity::<F>(tuple, frontend, backend_id, now);
    Ok(())
}

/// (Re)writes the reply entry of a flow. Not inlined: its own stack frame;
/// a scalar result (`encode_unit`).
#[inline(never)]
pub(crate) fn write_reply_entry<F: Family>(
    tuple: &Tuple<F::Addr>,
    flow: &Flow<F>,
    rev_nat_id: u32,
    now: u64,
) -> u64 {
    encode_unit(reply_entry::<F>(tuple, flow, rev_nat_id, now))
}

#[inline(always)]
fn reply_entry<F: Family>(
    tuple: &Tuple<F::Addr>,
    flow: &Flow<F>,
    rev_nat_id: u32,
    now: u64,
) -> Result<(), Verdict> {
    let reply = Tuple {
        saddr: flow.backend.addr,
        daddr: flow.nat_addr,
        sport_be: flow.backend.port_be,
        dport_be: flow.nat_port_be,
        proto: tuple.proto,
    };
    let mut slot = MaybeUninit::uninit();
    let entry = new_entry(&mut slot, flow.backend_id, rev_nat_id, 0, now);
    if flow.snat {
        entry.flags |= ct_flags::SNAT;
        F::set_nat(&mut entry.nat_addr, tuple.saddr);
        entry.nat_port_be = tuple.sport_be;
    }
    if crate::probe::dry_run() {
        return Ok(());
    }
    F::conntrack()
        .insert(&ct_key(&reply, ct_dir::REPLY), entry, 0)
        .map_err(|_| Verdict::drop(reason::DROP_CT_INSERT))
}
