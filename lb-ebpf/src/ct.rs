//! Connection tracking: entry lifetimes, a flow's service and reply
//! entries, and the flow state the rewrite needs.
//!
//! A flow's life: only a packet that can open a connection (a bare TCP
//! SYN, any UDP datagram) creates a flow, with its two entries in the map
//! of new flows (`Family::conntrack_new`, 60 s for TCP). The backend's
//! first reply moves both to the main map (`Family::conntrack`, flag
//! `REPLIED`), where a TCP flow lives 6 h after its last packet, 10 s after
//! a FIN or RST in either direction (`CLOSING`, set on both entries). A
//! flood of new flows thus churns the map of new flows only and never
//! evicts an answered flow. A closing flow ends at once when its client
//! reuses the port for a new connection: to the service (a bare SYN on
//! its service entry, `usable`) or straight to the backend
//! (`end_closed_flow`).

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::LruHashMap};
use lb_common::{
    Backend, CtEntry, CtKey, LbService, backend_flags, ct_dir, ct_flags, ct_timeout, proto, reason,
    svc_flags,
};

use crate::{
    family::{Family, Tuple, ct_key},
    hdr::l4::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    lb, snat,
    verdict::{Verdict, encode_unit},
    zeroed::zeroed_in_place,
};

/// Flags an entry keeps once set (copied between a flow's two entries).
const STICKY: u32 = ct_flags::CLOSING | ct_flags::REPLIED;

/// `touch` result: `last_seen_ns` was refreshed.
pub(crate) const REFRESHED: u32 = 1;
/// `touch` result: the packet set `CLOSING`.
pub(crate) const CLOSED_NOW: u32 = 2;

/// Monotonic clock in nanoseconds, at tick resolution (`CLOCK_MONOTONIC_COARSE`):
/// timeouts are seconds, and the coarse clock costs a fraction of the
/// precise one, which reads the (paravirtual) TSC.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The map holding a flow's entries: the main map once the backend has
/// answered, the map of new flows before.
#[inline(always)]
pub(crate) fn table<F: Family>(answered: bool) -> &'static LruHashMap<CtKey<F::Addr>, CtEntry> {
    if answered {
        F::conntrack()
    } else {
        F::conntrack_new()
    }
}

/// True for the protocols tracked as connections (TCP, and SCTP whose
/// chunks the parser reads as TCP flags, `l4::sctp_as_tcp_flags`); UDP
/// flows have no handshake and no end.
#[inline(always)]
fn connected(l4_proto: u8) -> bool {
    l4_proto == proto::TCP || l4_proto == proto::SCTP
}

/// Lifetime of an entry after its last packet (SCTP as TCP: heartbeats
/// keep an idle association's entries fresh).
#[inline(always)]
fn lifetime_ns(l4_proto: u8, flags: u32, answered: bool) -> u64 {
    if !connected(l4_proto) {
        ct_timeout::UDP_NS
    } else if flags & ct_flags::CLOSING != 0 {
        ct_timeout::TCP_CLOSING_NS
    } else if answered {
        ct_timeout::TCP_NS
    } else {
        ct_timeout::TCP_UNANSWERED_NS
    }
}

/// True when the entry (of the main map when `answered`) may still be
/// used for a packet with `tcp_flags`. A bare SYN on a closing entry
/// starts a new flow on a reused port.
#[inline(always)]
pub(crate) fn usable(
    entry: &CtEntry,
    l4_proto: u8,
    tcp_flags: u8,
    now: u64,
    answered: bool,
) -> bool {
    let bare_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if bare_syn && entry.flags & ct_flags::CLOSING != 0 {
        return false;
    }
    now.saturating_sub(entry.last_seen_ns) <= lifetime_ns(l4_proto, entry.flags, answered)
}

/// True when a packet without a flow may open one: any UDP datagram, a TCP
/// SYN without ACK, RST or FIN, an SCTP INIT. Anything else creates no
/// state.
#[inline(always)]
pub(crate) fn opens(l4_proto: u8, tcp_flags: u8) -> bool {
    !connected(l4_proto) || tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// True when a packet from a backend may be the first answer of a flow: a
/// SYN+ACK or a RST for TCP (SCTP: INIT ACK or ABORT), any UDP datagram.
/// Only those look in the map of new flows, so that other traffic pays no
/// second lookup.
#[inline(always)]
pub(crate) fn may_be_first_reply(l4_proto: u8, tcp_flags: u8) -> bool {
    !connected(l4_proto)
        || tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        || tcp_flags & TCP_RST != 0
}

/// True when the entry, in the map of new flows and not closing, is of a
/// TCP (or SCTP) flow whose first packet came more than
/// `ct_timeout::TCP_UNCONFIRMED_HOLD_NS` ago: its client has not
/// confirmed it since (see `snat`).
#[inline(always)]
pub(crate) fn unconfirmed_for_long(entry: &CtEntry, l4_proto: u8, now: u64) -> bool {
    connected(l4_proto)
        && entry.flags & ct_flags::CLOSING == 0
        && now.saturating_sub(entry.created_ns) > ct_timeout::TCP_UNCONFIRMED_HOLD_NS
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
/// closing flags. Returns `REFRESHED` and/or `CLOSED_NOW`.
#[inline(always)]
pub(crate) fn touch(entry: *mut CtEntry, tcp_flags: u8, now: u64) -> u32 {
    if crate::probe::dry_run() {
        return 0;
    }
    let new_flags = flags_from_tcp(tcp_flags);
    let mut touched = 0;
    // SAFETY: `entry` points into a map value.
    unsafe {
        if new_flags & !(*entry).flags != 0 {
            (*entry).flags |= new_flags;
            touched |= CLOSED_NOW;
        }
        if now.saturating_sub((*entry).last_seen_ns) >= ct_timeout::REFRESH_NS {
            (*entry).last_seen_ns = now;
            touched |= REFRESHED;
        }
    }
    touched
}

/// True when the reply entry `entry` (key `reply`) is the one of the flow
/// of `client` (the client's own address and port) to the frontend
/// `rev_nat_id`.
#[inline(always)]
pub(crate) fn owned_by<F: Family>(
    entry: &CtEntry,
    reply: &Tuple<F::Addr>,
    client: &Tuple<F::Addr>,
    rev_nat_id: u32,
) -> bool {
    if entry.rev_nat_id != rev_nat_id {
        return false;
    }
    if entry.flags & ct_flags::SNAT != 0 {
        F::from_nat(&entry.nat_addr) == client.saddr && entry.nat_port_be == client.sport_be
    } else {
        reply.daddr == client.saddr && reply.dport_be == client.sport_be
    }
}

/// A new entry, built in place in `slot` (see `zeroed_in_place`).
#[inline(always)]
fn new_entry(
    slot: &mut MaybeUninit<CtEntry>,
    backend_id: u32,
    rev_nat_id: u32,
    flags: u32,
    now: u64,
) -> &mut CtEntry {
    // SAFETY: `CtEntry` is plain integers and bytes.
    let entry = unsafe { zeroed_in_place(slot) };
    entry.created_ns = now;
    entry.last_seen_ns = now;
    entry.backend_id = backend_id;
    entry.rev_nat_id = rev_nat_id;
    entry.flags = flags;
    entry
}

/// What the datapath needs of a flow's conntrack entry.
#[derive(Clone, Copy)]
pub(crate) struct Flow<F: Family> {
    /// Backend the flow goes to.
    pub(crate) backend_id: u32,
    /// The service entry's sticky flags (`STICKY`), for its reply entry.
    pub(crate) flags: u32,
    /// That backend's map value.
    pub(crate) backend: Backend<F::Addr>,
    /// Source the packets get when the flow is source-NATed.
    pub(crate) nat_addr: F::Addr,
    /// Source port that goes with `nat_addr`.
    pub(crate) nat_port_be: u16,
    /// Whether the flow is source-NATed.
    pub(crate) snat: bool,
    /// Whether the flow's entries are in the main map (see `table`).
    pub(crate) answered: bool,
}

/// `established_flow_sub` result: an entry was found and loaded.
pub(crate) const FOUND: u32 = 1;
/// `established_flow_sub` result: the reply entry needs the service
/// entry's refresh or closing flag.
pub(crate) const SYNC_REPLY: u32 = 2;
/// `established_flow_sub` result: the client went on after the backend's
/// answer: the flow moves to the main map (`promote`).
pub(crate) const PROMOTE: u32 = 4;

/// `established_flow` as a leaf subprogram: `FOUND` and `SYNC_REPLY` bits.
#[inline(never)]
pub(crate) fn established_flow_sub<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    tcp_flags: u8,
    now: u64,
    flow: &mut Flow<F>,
) -> u32 {
    let key = ct_key(tuple, ct_dir::SERVICE);
    if let Some(entry) = F::conntrack().get_ptr_mut(&key) {
        let found = established_flow::<F>(entry, tuple, frontend, tcp_flags, now, flow, true);
        if found == 0 && !crate::probe::dry_run() {
            // Expired, closing and reused, or no longer valid: the new flow
            // starts in the map of new flows, this one must not shadow it.
            let _ = F::conntrack().remove(&key);
        }
        return found;
    }
    match F::conntrack_new().get_ptr_mut(&key) {
        Some(entry) => established_flow::<F>(entry, tuple, frontend, tcp_flags, now, flow, false),
        None => 0,
    }
}

/// Loads the flow of the service entry `entry` into `flow`, if the entry
/// may still be used and its backend is still one of the frontend's
/// (taking new flows or draining). A UDP flow whose backend no longer
/// serves is not loaded when the frontend has backends for new flows: it
/// moves to one.
#[inline(always)]
fn established_flow<F: Family>(
    entry: *mut CtEntry,
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    tcp_flags: u8,
    now: u64,
    flow: &mut Flow<F>,
    answered: bool,
) -> u32 {
    // SAFETY: map value pointer; fields are read one by one.
    let (rev_nat_id, backend_id, flags) =
        unsafe { ((*entry).rev_nat_id, (*entry).backend_id, (*entry).flags) };
    if rev_nat_id != frontend.rev_nat_id {
        return 0;
    }
    // SAFETY: as above.
    if !usable(unsafe { &*entry }, tuple.proto, tcp_flags, now, answered) {
        return 0;
    }
    let Some(backend) = F::backend(backend_id) else {
        return 0;
    };
    if !lb::member_of(backend, frontend) {
        return 0;
    }
    if tuple.proto == proto::UDP
        && backend.flags & backend_flags::NOT_SERVING != 0
        && frontend.count != 0
    {
        return 0;
    }
    flow.backend = *backend;
    flow.backend_id = backend_id;
    flow.answered = answered;
    if flags & ct_flags::SNAT != 0 {
        flow.snat = true;
        // SAFETY: map value pointer.
        unsafe {
            flow.nat_addr = F::from_nat(&(*entry).nat_addr);
            flow.nat_port_be = (*entry).nat_port_be;
        }
    }
    let touched = touch(entry, tcp_flags, now);
    flow.flags = (flags | flags_from_tcp(tcp_flags)) & STICKY;
    // Answered, and the client goes on (for TCP the handshake's last ACK,
    // which a spoofed source never sends): the flow is established, as
    // the kernel's conntrack marks a flow assured.
    if !answered
        && flags & ct_flags::REPLIED != 0
        && (!connected(tuple.proto) || tcp_flags & TCP_SYN == 0)
    {
        return FOUND | SYNC_REPLY | PROMOTE;
    }
    if touched == 0 {
        FOUND
    } else {
        FOUND | SYNC_REPLY
    }
}

/// Moves a flow's two entries from the map of new flows to the main map
/// (`PROMOTE`). A subprogram: its own stack frame; best effort (a failed
/// insert leaves the entry where it was).
#[inline(never)]
pub(crate) fn promote<F: Family>(tuple: &Tuple<F::Addr>, flow: &Flow<F>) -> u64 {
    if crate::probe::dry_run() {
        return 0;
    }
    let reply = Tuple {
        saddr: flow.backend.addr,
        daddr: flow.nat_addr,
        sport_be: flow.backend.port_be,
        dport_be: flow.nat_port_be,
        proto: tuple.proto,
    };
    move_to_main::<F>(&ct_key(tuple, ct_dir::SERVICE));
    move_to_main::<F>(&ct_key(&reply, ct_dir::REPLY));
    0
}

#[inline(always)]
fn move_to_main<F: Family>(key: &CtKey<F::Addr>) {
    if let Some(entry) = F::conntrack_new().get_ptr(key) {
        // SAFETY: map value pointer, handed to the insert helper as is.
        if F::conntrack().insert(key, unsafe { &*entry }, 0).is_ok() {
            let _ = F::conntrack_new().remove(key);
        }
    }
}

/// `new_flow` as a subprogram: its own stack frame, the flow written to
/// `out`, a scalar result (`encode_unit`).
#[inline(never)]
pub(crate) fn new_flow_into<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    now: u64,
    out: &mut Flow<F>,
) -> u64 {
    encode_unit(new_flow::<F>(tuple, frontend, now, out))
}

/// A new flow: choose its backend, decide on source NAT, and record it in
/// the map of new flows (in the main map when a reply entry of this very
/// flow is still there: see `snat`), and in the affinity map.
#[inline(always)]
fn new_flow<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    now: u64,
    flow: &mut Flow<F>,
) -> Result<(), Verdict> {
    // Chosen straight into `flow` (which holds a placeholder): a copy here
    // would take this frame over the verifier's stack budget.
    // Affinity first, in a sibling subprogram of `choose_backend_sub`: the
    // two frames are never on the stack together.
    let mut backend_id = 0;
    if frontend.flags & svc_flags::AFFINITY != 0 {
        backend_id = lb::affinity_backend_sub::<F>(tuple, frontend, now, &mut flow.backend);
    }
    if backend_id == 0 {
        backend_id = lb::choose_backend_sub::<F>(tuple, frontend, &mut flow.backend);
    }
    if backend_id == 0 {
        return Err(Verdict::drop(reason::DROP_BACKEND_MISSING));
    }
    flow.backend_id = backend_id;
    snat::choose_source::<F>(tuple, frontend, now, flow)?;
    flow.flags = if flow.answered { ct_flags::REPLIED } else { 0 };
    let mut slot = MaybeUninit::uninit();
    let entry = new_entry(&mut slot, backend_id, frontend.rev_nat_id, flow.flags, now);
    if flow.snat {
        entry.flags |= ct_flags::SNAT;
        F::set_nat(&mut entry.nat_addr, flow.nat_addr);
        entry.nat_port_be = flow.nat_port_be;
    }
    if !crate::probe::dry_run()
        && table::<F>(flow.answered)
            .insert(&ct_key(tuple, ct_dir::SERVICE), entry, 0)
            .is_err()
    {
        return Err(Verdict::drop(reason::DROP_CT_INSERT));
    }
    lb::remember_affinity::<F>(tuple, frontend, backend_id, now);
    Ok(())
}

/// Writes or refreshes the reply entry of a flow: on a new flow (`fresh`:
/// written anew, the tuple being free or this flow's, see `snat`), and
/// when the service entry was refreshed or started closing. An entry of
/// this flow is then updated in place (its own flags kept, the service
/// entry's sticky flags added); a missing or dead one is written anew; a
/// live one of another flow is left alone. Not inlined: its own stack
/// frame; a scalar result (`encode_unit`).
#[inline(never)]
pub(crate) fn write_reply_entry<F: Family>(
    tuple: &Tuple<F::Addr>,
    flow: &Flow<F>,
    rev_nat_id: u32,
    now: u64,
    fresh: bool,
) -> u64 {
    encode_unit(reply_entry::<F>(tuple, flow, rev_nat_id, now, fresh))
}

#[inline(always)]
fn reply_entry<F: Family>(
    tuple: &Tuple<F::Addr>,
    flow: &Flow<F>,
    rev_nat_id: u32,
    now: u64,
    fresh: bool,
) -> Result<(), Verdict> {
    if crate::probe::dry_run() {
        return Ok(());
    }
    let reply = Tuple {
        saddr: flow.backend.addr,
        daddr: flow.nat_addr,
        sport_be: flow.backend.port_be,
        dport_be: flow.nat_port_be,
        proto: tuple.proto,
    };
    let key = ct_key(&reply, ct_dir::REPLY);
    let map = table::<F>(flow.answered);
    if fresh {
        if !flow.answered {
            // A dead or closing entry of an earlier flow on this tuple in
            // the main map would shadow the new one's replies.
            let _ = F::conntrack().remove(&key);
        }
    } else if let Some(entry) = map.get_ptr_mut(&key) {
        // SAFETY: map value pointer, read in place.
        let current = unsafe { &*entry };
        if usable(current, tuple.proto, 0, now, flow.answered) {
            if owned_by::<F>(current, &reply, tuple, rev_nat_id) {
                // SAFETY: map value pointer.
                unsafe {
                    (*entry).flags |= flow.flags;
                    (*entry).last_seen_ns = now;
                }
            }
            return Ok(());
        }
    }
    let mut slot = MaybeUninit::uninit();
    let entry = new_entry(&mut slot, flow.backend_id, rev_nat_id, flow.flags, now);
    if flow.snat {
        entry.flags |= ct_flags::SNAT;
        F::set_nat(&mut entry.nat_addr, tuple.saddr);
        entry.nat_port_be = tuple.sport_be;
    }
    map.insert(&key, entry, 0)
        .map_err(|_| Verdict::drop(reason::DROP_CT_INSERT))
}

/// `Packet::answer` bits above the TCP flags: a reply asked for `answer`.
pub(crate) const ANSWER_DUE: u32 = 1 << 8;
/// `Packet::answer`: its reply entry is in the main map.
pub(crate) const ANSWERED: u32 = 1 << 9;
/// `Packet::answer`: not a reply but a client's bare SYN to no service
/// (the tuple is the SYN's): `answer` hands it to `end_closed_flow`.
pub(crate) const DIRECT_SYN: u32 = 1 << 10;

/// A reply from the backend that changes its flow's service entry: the
/// first one (`REPLIED` on both entries; they move to the main map when
/// the client goes on: `PROMOTE`), one that
/// starts closing (`CLOSING` on the service entry too), one that refreshes
/// the reply entry (the service entry too, so that a flow where only the
/// server talks keeps both). `reply` is the packet's tuple, `mode` its TCP
/// flags with `ANSWER_DUE` and `ANSWERED` (the reply entry is in the main
/// map). Runs after the packet's own step, from `tc::run`, so that its
/// frame does not add to the parse step's; best effort (a failed move
/// leaves the flow where it was). With `DIRECT_SYN`, `reply` is a client's
/// SYN instead: see `end_closed_flow`.
#[inline(never)]
pub(crate) fn answer<F: Family>(reply: &Tuple<F::Addr>, mode: u32) -> u64 {
    if crate::probe::dry_run() {
        return 0;
    }
    if mode & DIRECT_SYN != 0 {
        return end_closed_flow::<F>(reply);
    }
    #[expect(clippy::cast_possible_truncation, reason = "the low byte: TCP flags")]
    let tcp_flags = mode as u8;
    let answered = mode & ANSWERED != 0;
    let reply_key = ct_key(reply, ct_dir::REPLY);
    let Some(entry) = table::<F>(answered).get_ptr_mut(&reply_key) else {
        return 0;
    };
    // SAFETY: map value pointer; fields read one by one.
    let (rev_nat_id, backend_id, flags) =
        unsafe { ((*entry).rev_nat_id, (*entry).backend_id, (*entry).flags) };
    // SAFETY: the value is copied out at once.
    let Some(frontend) = (unsafe { F::rev_nats().get(&rev_nat_id) }) else {
        return 0;
    };
    // The flow's service key: the client's own address and port to the
    // frontend.
    let mut service_key = CtKey {
        saddr: reply.daddr,
        daddr: frontend.addr,
        sport_be: reply.dport_be,
        dport_be: frontend.port_be,
        proto: reply.proto,
        dir: ct_dir::SERVICE,
        _pad: [0; 2],
    };
    if flags & ct_flags::SNAT != 0 {
        // SAFETY: map value pointer.
        unsafe {
            service_key.saddr = F::from_nat(&(*entry).nat_addr);
            service_key.sport_be = (*entry).nat_port_be;
        }
    }
    let gained = flags_from_tcp(tcp_flags) | ct_flags::REPLIED;
    let now = now_ns();
    if let Some(own) = table::<F>(answered).get_ptr_mut(&service_key) {
        // SAFETY: map value pointer.
        unsafe {
            if (*own).rev_nat_id == rev_nat_id && (*own).backend_id == backend_id {
                (*own).flags |= gained;
                (*own).last_seen_ns = now;
            }
        }
    }
    if !answered {
        // SAFETY: map value pointer.
        unsafe {
            (*entry).flags |= gained;
            (*entry).last_seen_ns = now;
        }
    }
    0
}

/// A client's bare SYN to no service (`syn`), on the tuple a backend
/// answers one of our flows on: the SYN's reverse is that flow's reply
/// key, so the client reuses the port of a connection through a Service
/// for a direct one to the same backend. When that flow is closing (or
/// dead), it ends now: its reply and service entries are deleted, so that
/// the new connection's SYN+ACK and everything after it reach the client
/// untranslated, as the kernel's conntrack deletes a closed connection a
/// new SYN reopens (`nf_conntrack_proto_tcp.c`). A live flow is left
/// alone: the backend sees both connections as one tuple, so the direct
/// one cannot work, and the live one must not break (README "Known
/// deviations"). Runs from `answer` (see `tc::translate`); a subprogram:
/// its frame adds to `answer`'s only.
#[inline(never)]
pub(crate) fn end_closed_flow<F: Family>(syn: &Tuple<F::Addr>) -> u64 {
    let reply = Tuple {
        saddr: syn.daddr,
        daddr: syn.saddr,
        sport_be: syn.dport_be,
        dport_be: syn.sport_be,
        proto: syn.proto,
    };
    let key = ct_key(&reply, ct_dir::REPLY);
    let now = now_ns();
    end_closed_in::<F>(&key, &reply, now, true);
    end_closed_in::<F>(&key, &reply, now, false);
    0
}

/// `end_closed_flow` in one map (the main one when `answered`): a flow's
/// two entries are in the same map (`promote` moves both).
#[inline(always)]
fn end_closed_in<F: Family>(
    key: &CtKey<F::Addr>,
    reply: &Tuple<F::Addr>,
    now: u64,
    answered: bool,
) {
    let map = table::<F>(answered);
    let Some(entry) = map.get_ptr(key) else {
        return;
    };
    // SAFETY: map value pointer, read in place.
    let current = unsafe { &*entry };
    if current.flags & ct_flags::CLOSING == 0 && usable(current, reply.proto, 0, now, answered) {
        return;
    }
    remove_flow::<F>(map, key, reply, current);
}

/// Ends the flow whose reply entry in the map of new flows is on `reply`
/// (the reply tuple source NAT gives a new flow) if it is one
/// `unconfirmed_for_long`: its service and reply entries are deleted, so
/// that a late packet of the old client is not sent on the new flow's
/// tuple. A subprogram: its own stack frame, a scalar result (1 when a
/// flow ended).
#[inline(never)]
pub(crate) fn end_unconfirmed<F: Family>(reply: &Tuple<F::Addr>, now: u64) -> u64 {
    let key = ct_key(reply, ct_dir::REPLY);
    let map = F::conntrack_new();
    let Some(entry) = map.get_ptr(&key) else {
        return 0;
    };
    // SAFETY: map value pointer, read in place.
    let current = unsafe { &*entry };
    if !usable(current, reply.proto, 0, now, false)
        || !unconfirmed_for_long(current, reply.proto, now)
    {
        return 0;
    }
    remove_flow::<F>(map, &key, reply, current);
    1
}

/// Deletes the flow whose reply entry `current` is in `map` under `key`
/// (tuple `reply`): its service entry, if it still is that flow's, then
/// the reply entry. A flow's two entries are in the same map (`promote`
/// moves both).
#[inline(always)]
fn remove_flow<F: Family>(
    map: &LruHashMap<CtKey<F::Addr>, CtEntry>,
    key: &CtKey<F::Addr>,
    reply: &Tuple<F::Addr>,
    current: &CtEntry,
) {
    let (rev_nat_id, backend_id) = (current.rev_nat_id, current.backend_id);
    // The flow's service key, as in `answer`: the client's own address and
    // port (the NAT ones when source-NATed) to the frontend.
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { F::rev_nats().get(&rev_nat_id) } {
        let mut service_key = CtKey {
            saddr: reply.daddr,
            daddr: frontend.addr,
            sport_be: reply.dport_be,
            dport_be: frontend.port_be,
            proto: reply.proto,
            dir: ct_dir::SERVICE,
            _pad: [0; 2],
        };
        if current.flags & ct_flags::SNAT != 0 {
            service_key.saddr = F::from_nat(&current.nat_addr);
            service_key.sport_be = current.nat_port_be;
        }
        if let Some(own) = map.get_ptr(&service_key) {
            // SAFETY: map value pointer, read in place.
            let own = unsafe { &*own };
            if own.rev_nat_id == rev_nat_id && own.backend_id == backend_id {
                let _ = map.remove(&service_key);
            }
        }
    }
    let _ = map.remove(key);
}
