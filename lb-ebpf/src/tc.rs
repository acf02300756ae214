//! The TC hook: parse, then translate towards a service or back from a
//! backend. One verdict point: `lb_tc`.

use core::mem::MaybeUninit;

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::{
    AffinityEntry, CtEntry, LbService, SNAT_PORT_COUNT, SNAT_PORT_MIN, backend_flags, ct_dir,
    ct_flags, proto, reason, svc_flags,
};

use crate::{
    ct,
    family::{Family, Packet, Tuple, V4, V6},
    fwd,
    maps::{LB_CONFIG_V1, LB_PACKET, count_reason, count_service},
    nat,
    parse::{
        ETH_HLEN, ETH_P_IP_BE, ETH_P_IPV6_BE, Ipv4Hdr, Ipv6Hdr, Ports, TCP_FLAGS_OFF, TCP_HLEN,
        UDP_CSUM_OFF, UDP_HLEN, Verdict, decode_unit, encode_unit, linearize_headers, ptr_at, read,
    },
};

/// IPv4 flags/fragment-offset bits that mark a fragment (MF or offset).
const IP4_FRAG_MASK: u16 = 0x3fff;
/// IPv6 next-header values of extension headers.
const IP6_HOPOPTS: u8 = 0;
const IP6_ROUTING: u8 = 43;
const IP6_FRAGMENT: u8 = 44;
const IP6_ESP: u8 = 50;
const IP6_AH: u8 = 51;
const IP6_DSTOPTS: u8 = 60;
const IP6_MOBILITY: u8 = 135;
const IP6_HIP: u8 = 139;
const IP6_SHIM6: u8 = 140;

#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    let verdict = match try_lb(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    count_reason(verdict.reason);
    verdict.action
}

/// The parse step found a frontend: `lb_tc` runs the to-backend step next.
/// (Encoded verdicts have bit 62 set and never equal this.)
const GO_TO_BACKEND: u64 = 1 << 63;

/// Parse and lookups, then (for a frontend hit) the to-backend step: two
/// sibling subprograms with the parsed packet in a per-CPU scratch, so
/// that their stack frames do not add up.
#[inline(always)]
fn try_lb(ctx: &TcContext) -> Result<Verdict, Verdict> {
    linearize_headers(ctx);
    let ether_type: u16 = read(ctx, 12)?;
    let Some(packet) = LB_PACKET.get_ptr_mut(0) else {
        return Ok(Verdict::pass(reason::PASS_NO_SERVICE));
    };
    // SAFETY: per-CPU scratch used by this run only.
    let packet = unsafe { &mut *packet };
    let v4_packet = ether_type == ETH_P_IP_BE;
    if !v4_packet && ether_type != ETH_P_IPV6_BE {
        return Ok(Verdict::pass(reason::PASS_NOT_IP));
    }
    let mut code = if v4_packet {
        v4(ctx, packet)
    } else {
        v6(ctx, packet)
    };
    if code == GO_TO_BACKEND {
        code = if v4_packet {
            to_backend_sub::<V4>(ctx, packet)
        } else {
            to_backend_sub::<V6>(ctx, packet)
        };
    }
    let verdict = Verdict::decode(code);
    let translated = verdict.reason == reason::NAT_NEW
        || verdict.reason == reason::NAT_ESTABLISHED
        || verdict.reason == reason::NAT_REPLY;
    if translated {
        // Forward it ourselves (see `fwd`); the stack if that cannot be done.
        return Ok(Verdict::decode(fwd::forward(ctx, v4_packet, code)));
    }
    Ok(verdict)
}

// Not inlined: each family gets its own BPF stack frame. Scalar returns:
// see `Verdict::encode`.
#[inline(never)]
fn v4(ctx: &TcContext, packet: &mut Packet) -> u64 {
    match try_v4(ctx, packet) {
        Ok(code) => code,
        Err(verdict) => verdict.encode(),
    }
}

#[inline(never)]
fn v6(ctx: &TcContext, packet: &mut Packet) -> u64 {
    match try_v6(ctx, packet) {
        Ok(code) => code,
        Err(verdict) => verdict.encode(),
    }
}

/// Parses IPv4; `Ok` holds an encoded verdict or `GO_TO_BACKEND`.
#[inline(always)]
fn try_v4(ctx: &TcContext, packet: &mut Packet) -> Result<u64, Verdict> {
    let ip: Ipv4Hdr = read(ctx, ETH_HLEN)?;
    if ip.version_ihl >> 4 != 4 || ip.version_ihl & 0x0f < 5 {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    if ip.version_ihl & 0x0f != 5 {
        return Err(Verdict::pass(reason::PASS_IP_OPTIONS));
    }
    if u16::from_be(ip.frag_off_be) & IP4_FRAG_MASK != 0 {
        return Err(Verdict::pass(reason::PASS_FRAGMENT));
    }
    translate::<V4>(ctx, ip.saddr, ip.daddr, ip.proto, packet)
}

/// Parses IPv6; `Ok` holds an encoded verdict or `GO_TO_BACKEND`.
#[inline(always)]
fn try_v6(ctx: &TcContext, packet: &mut Packet) -> Result<u64, Verdict> {
    let ip: Ipv6Hdr = read(ctx, ETH_HLEN)?;
    if ip.vtc_flow[0] >> 4 != 6 {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    let next = ip.next_hdr;
    if next == IP6_FRAGMENT {
        return Err(Verdict::pass(reason::PASS_FRAGMENT));
    }
    if next == IP6_HOPOPTS
        || next == IP6_ROUTING
        || next == IP6_ESP
        || next == IP6_AH
        || next == IP6_DSTOPTS
        || next == IP6_MOBILITY
        || next == IP6_HIP
        || next == IP6_SHIM6
    {
        return Err(Verdict::pass(reason::PASS_EXT_HDR));
    }
    translate::<V6>(ctx, ip.saddr, ip.daddr, next, packet)
}

/// Common TCP/UDP handling for both families: a frontend hit is handed
/// to the to-backend step through `packet`; replies, unserved ports of
/// service addresses and everything else are finished here.
#[inline(always)]
fn translate<F: Family>(
    ctx: &TcContext,
    saddr: F::Addr,
    daddr: F::Addr,
    l4_proto: u8,
    packet: &mut Packet,
) -> Result<u64, Verdict> {
    let l4_off = F::L4_OFF;
    let tcp_flags = if l4_proto == proto::TCP {
        ptr_at::<[u8; TCP_HLEN]>(ctx, l4_off)?;
        read::<u8>(ctx, l4_off + TCP_FLAGS_OFF)?
    } else if l4_proto == proto::UDP {
        ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off)?;
        if !F::IS_V4 && read::<u16>(ctx, l4_off + UDP_CSUM_OFF)? == 0 {
            return Err(Verdict::pass(reason::PASS_UDP6_ZERO_CSUM));
        }
        0
    } else {
        return Err(Verdict::pass(reason::PASS_OTHER_PROTO));
    };
    let ports: Ports = read(ctx, l4_off)?;
    let tuple = Tuple {
        saddr,
        daddr,
        sport_be: ports.sport_be,
        dport_be: ports.dport_be,
        proto: l4_proto,
    };
    let frontend_key = F::svc_key(daddr, ports.dport_be, 0, l4_proto);
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { F::services().get(&frontend_key) } {
        packet.frontend = *frontend;
        packet.tcp_flags = tcp_flags;
        *F::packet_tuple(packet) = tuple;
        return Ok(GO_TO_BACKEND);
    }
    let reply_key = F::ct_key(&tuple, ct_dir::REPLY);
    if let Some(entry) = F::conntrack().get_ptr_mut(&reply_key) {
        return from_backend::<F>(ctx, &tuple, entry, tcp_flags).map(Verdict::encode);
    }
    // A service address, but not a port it serves: refuse, as kube-proxy does.
    let marker_key = F::svc_key(daddr, 0, 0, 0);
    // SAFETY: only the presence is used.
    if unsafe { F::services().get(&marker_key) }.is_some() {
        return F::reject(ctx).map(Verdict::encode);
    }
    Err(Verdict::pass(reason::PASS_NO_SERVICE))
}

/// `choose_backend` as a leaf subprogram: the backend id (0: none), the
/// backend in `out`.
#[inline(never)]
fn choose_backend_sub<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    now: u64,
    out: &mut F::Backend,
) -> u32 {
    match choose_backend::<F>(tuple, frontend, now) {
        Ok((id, backend)) => {
            *out = backend;
            id
        }
        Err(_) => 0,
    }
}

/// The backend for a new flow: the client's affinity if it has a live one,
/// else a slot chosen by the flow hash.
#[inline(always)]
fn choose_backend<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    now: u64,
) -> Result<(u32, F::Backend), Verdict> {
    let affinity = frontend.flags & svc_flags::AFFINITY != 0;
    if affinity {
        let key = F::affinity_key(tuple.saddr, frontend.rev_nat_id);
        if let Some(entry) = F::affinity().get_ptr_mut(&key) {
            // SAFETY: map value pointer; fields read once.
            let (backend_id, last_used_ns) =
                unsafe { ((*entry).backend_id, (*entry).last_used_ns) };
            let timeout_ns = u64::from(frontend.affinity_timeout_s) * 1_000_000_000;
            if now.saturating_sub(last_used_ns) <= timeout_ns {
                // SAFETY: the value is copied out at once.
                if let Some(backend) = unsafe { F::backends().get(&backend_id) } {
                    let (_, _, flags) = F::backend_target(backend);
                    if flags & backend_flags::TERMINATING == 0 {
                        // Each new connection restarts the timeout, as
                        // kube-proxy's `recent --set` does.
                        // SAFETY: map value pointer.
                        unsafe { (*entry).last_used_ns = now };
                        return Ok((backend_id, *backend));
                    }
                }
            }
        }
    }
    let slot = ct::slot_for(F::flow_hash(tuple), frontend.count);
    let slot_key = F::svc_key(tuple.daddr, tuple.dport_be, slot, tuple.proto);
    // SAFETY: the value is copied out at once.
    let Some(slot_value) = (unsafe { F::services().get(&slot_key) }) else {
        return Err(Verdict::drop(reason::DROP_BACKEND_MISSING));
    };
    let backend_id = slot_value.backend_id;
    // SAFETY: the value is copied out at once.
    let Some(backend) = (unsafe { F::backends().get(&backend_id) }) else {
        return Err(Verdict::drop(reason::DROP_BACKEND_MISSING));
    };
    Ok((backend_id, *backend))
}

/// A free source port on `nat_addr` towards the backend: the first of a
/// few hashed candidates whose reply tuple is not taken by a live flow.
/// Returns 0 when none is free. A subprogram: its own stack frame.
#[inline(never)]
fn snat_port<F: Family>(
    tuple: &Tuple<F::Addr>,
    backend: &F::Backend,
    nat_addr: &F::Addr,
    now: u64,
) -> u32 {
    let (backend_addr, backend_port_be, _) = F::backend_target(backend);
    let nat_addr = *nat_addr;
    let start = F::flow_hash(tuple);
    let mut attempt = 0u32;
    while attempt < SNAT_ATTEMPTS {
        let offset =
            (start.wrapping_add(attempt.wrapping_mul(7919)) % u32::from(SNAT_PORT_COUNT)) as u16;
        let port_be = (SNAT_PORT_MIN + offset).to_be();
        let reply = Tuple {
            saddr: backend_addr,
            daddr: nat_addr,
            sport_be: backend_port_be,
            dport_be: port_be,
            proto: tuple.proto,
        };
        let free = match F::conntrack().get_ptr(&F::ct_key(&reply, ct_dir::REPLY)) {
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

/// Candidate ports tried for one source NAT.
const SNAT_ATTEMPTS: u32 = 8;

/// What the datapath needs of a flow's conntrack entry.
#[derive(Clone, Copy)]
struct Flow<F: Family> {
    backend_id: u32,
    backend: F::Backend,
    /// Source the packets get when the flow is source-NATed.
    nat_addr: F::Addr,
    nat_port_be: u16,
    snat: bool,
}

/// `new_flow` as a subprogram: its own stack frame, the flow written to
/// `out`, a scalar result (`encode_unit`).
#[inline(never)]
fn new_flow_into<F: Family>(
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
    let mut backend = F::placeholder_backend(tuple.daddr);
    let backend_id = choose_backend_sub::<F>(tuple, frontend, now, &mut backend);
    if backend_id == 0 {
        return Err(Verdict::drop(reason::DROP_BACKEND_MISSING));
    }
    let (backend_addr, _, flags) = F::backend_target(&backend);
    let hairpin = backend_addr == tuple.saddr;
    let remote_external = frontend.flags & svc_flags::EXTERNAL != 0
        && frontend.flags & svc_flags::EXT_LOCAL == 0
        && flags & backend_flags::LOCAL == 0;
    flow.backend_id = backend_id;
    flow.backend = backend;
    if hairpin || remote_external {
        let config = LB_CONFIG_V1
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
        let port = snat_port::<F>(tuple, &backend, &nat_addr, now);
        if port == 0 {
            return Err(Verdict::drop(reason::DROP_NO_SNAT));
        }
        flow.nat_port_be = port as u16;
        flow.nat_addr = nat_addr;
        flow.snat = true;
    }
    let mut slot = MaybeUninit::uninit();
    let entry = ct::new_entry(&mut slot, backend_id, frontend.rev_nat_id, tcp_flags, now);
    if flow.snat {
        entry.flags |= ct_flags::SNAT;
        F::set_nat(&mut entry.nat_addr, flow.nat_addr);
        entry.nat_port_be = flow.nat_port_be;
    }
    if F::conntrack()
        .insert(&F::ct_key(tuple, ct_dir::SERVICE), entry, 0)
        .is_err()
    {
        return Err(Verdict::drop(reason::DROP_CT_INSERT));
    }
    if frontend.flags & svc_flags::AFFINITY != 0 {
        let affinity = AffinityEntry {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        let key = F::affinity_key(tuple.saddr, frontend.rev_nat_id);
        let _ = F::affinity().insert(&key, &affinity, 0);
    }
    Ok(())
}

/// (Re)writes the reply entry of a flow. Not inlined: its own stack frame;
/// a scalar result (`encode_unit`).
#[inline(never)]
fn write_reply_entry<F: Family>(
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
    let (backend_addr, backend_port_be, _) = F::backend_target(&flow.backend);
    let reply = Tuple {
        saddr: backend_addr,
        daddr: flow.nat_addr,
        sport_be: backend_port_be,
        dport_be: flow.nat_port_be,
        proto: tuple.proto,
    };
    let mut slot = MaybeUninit::uninit();
    let entry = ct::new_entry(&mut slot, flow.backend_id, rev_nat_id, 0, now);
    if flow.snat {
        entry.flags |= ct_flags::SNAT;
        F::set_nat(&mut entry.nat_addr, tuple.saddr);
        entry.nat_port_be = tuple.sport_be;
    }
    F::conntrack()
        .insert(&F::ct_key(&reply, ct_dir::REPLY), entry, 0)
        .map_err(|_| Verdict::drop(reason::DROP_CT_INSERT))
}

/// `established_flow` as a leaf subprogram: bit 0 found, bit 1 refreshed.
#[inline(never)]
fn established_flow_sub<F: Family>(
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
/// still be used and its backend still exists. Returns (found, refreshed).
#[inline(always)]
fn established_flow<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    tcp_flags: u8,
    now: u64,
    flow: &mut Flow<F>,
) -> (bool, bool) {
    let Some(entry) = F::conntrack().get_ptr_mut(&F::ct_key(tuple, ct_dir::SERVICE)) else {
        return (false, false);
    };
    // SAFETY: map value pointer; fields are read one by one.
    let (rev_nat_id, backend_id, flags) =
        unsafe { ((*entry).rev_nat_id, (*entry).backend_id, (*entry).flags) };
    if rev_nat_id != frontend.rev_nat_id {
        return (false, false);
    }
    // SAFETY: as above.
    if !ct::usable(unsafe { &*entry }, tuple.proto, tcp_flags, now) {
        return (false, false);
    }
    // SAFETY: the value is copied out at once.
    let Some(backend) = (unsafe { F::backends().get(&backend_id) }) else {
        return (false, false);
    };
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
    (true, ct::touch(entry, tcp_flags, now))
}

/// DNAT (and SNAT) of a packet towards its flow's backend, with a scalar
/// result (`encode_unit`).
#[inline(always)]
fn rewrite_to_backend<F: Family>(ctx: &TcContext, tuple: &Tuple<F::Addr>, flow: &Flow<F>) -> u64 {
    let (backend_addr, backend_port_be, _) = F::backend_target(&flow.backend);
    let mut new = *tuple;
    new.daddr = backend_addr;
    new.dport_be = backend_port_be;
    if flow.snat {
        new.saddr = flow.nat_addr;
        new.sport_be = flow.nat_port_be;
    }
    encode_unit(nat::rewrite::<F>(ctx, tuple, &new))
}

/// `rewrite_to_backend` as a subprogram, for IPv6: inlined, its 16-byte
/// addresses make the caller's frame too large for the verifier's 512-byte
/// limit on the deepest call chain. (IPv4 inlines it: a call less.)
#[inline(never)]
fn rewrite_to_backend_sub<F: Family>(
    ctx: &TcContext,
    tuple: &Tuple<F::Addr>,
    flow: &Flow<F>,
) -> u64 {
    rewrite_to_backend::<F>(ctx, tuple, flow)
}

/// `to_backend` as a subprogram (its own stack frame, a scalar result) on
/// the packet the parse step left in the scratch.
#[inline(never)]
fn to_backend_sub<F: Family>(ctx: &TcContext, packet: &mut Packet) -> u64 {
    let frontend = packet.frontend;
    let tcp_flags = packet.tcp_flags;
    let tuple = *F::packet_tuple(packet);
    match to_backend::<F>(ctx, &tuple, &frontend, tcp_flags) {
        Ok(verdict) | Err(verdict) => verdict.encode(),
    }
}

/// A packet to a service: keep the flow's backend or choose one, then DNAT
/// (and SNAT for hairpin and for external traffic to a remote backend).
#[inline(always)]
fn to_backend<F: Family>(
    ctx: &TcContext,
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    tcp_flags: u8,
) -> Result<Verdict, Verdict> {
    if frontend.flags & svc_flags::SOURCE_RANGES != 0
        && F::source_ranges()
            .get(&F::source_range_key(frontend.rev_nat_id, tuple.saddr))
            .is_none()
    {
        return Err(Verdict::drop(reason::DROP_SOURCE_RANGE));
    }
    if frontend.count == 0 {
        return F::reject(ctx);
    }
    let now = ct::now_ns();
    let mut flow = Flow::<F> {
        backend_id: 0,
        backend: F::placeholder_backend(tuple.daddr),
        nat_addr: tuple.saddr,
        nat_port_be: tuple.sport_be,
        snat: false,
    };
    let found = established_flow_sub::<F>(tuple, frontend, tcp_flags, now, &mut flow);
    let (established, refreshed) = (found & 1 != 0, found & 2 != 0);
    if !established {
        decode_unit(new_flow_into::<F>(
            tuple, frontend, tcp_flags, now, &mut flow,
        ))?;
    }
    if !established || refreshed {
        // (Re)create the reply entry: on a new flow, and about once a second
        // so that it outlives LRU pressure and one-way quiet periods.
        decode_unit(write_reply_entry::<F>(
            tuple,
            &flow,
            frontend.rev_nat_id,
            now,
        ))?;
    }
    decode_unit(if F::IS_V4 {
        rewrite_to_backend::<F>(ctx, tuple, &flow)
    } else {
        rewrite_to_backend_sub::<F>(ctx, tuple, &flow)
    })?;
    count_service(frontend.rev_nat_id, ctx.len());
    Ok(Verdict::pass(if established {
        reason::NAT_ESTABLISHED
    } else {
        reason::NAT_NEW
    }))
}

/// A packet matching a reply entry: restore the service address as source
/// (and the client as destination when the flow was source-NATed).
#[inline(always)]
fn from_backend<F: Family>(
    ctx: &TcContext,
    tuple: &Tuple<F::Addr>,
    entry: *mut CtEntry,
    tcp_flags: u8,
) -> Result<Verdict, Verdict> {
    let now = ct::now_ns();
    // SAFETY: map value pointer; read once.
    let current = unsafe { *entry };
    if !ct::usable(&current, tuple.proto, tcp_flags, now) {
        return Ok(Verdict::pass(reason::PASS_NO_SERVICE));
    }
    // SAFETY: the value is copied out at once.
    let Some(rev_nat) = (unsafe { F::rev_nats().get(&current.rev_nat_id) }) else {
        return Ok(Verdict::pass(reason::PASS_NO_SERVICE));
    };
    let (vip, vport_be) = F::rev_nat_target(rev_nat);
    ct::touch(entry, tcp_flags, now);
    let mut new = *tuple;
    new.saddr = vip;
    new.sport_be = vport_be;
    if current.flags & ct_flags::SNAT != 0 {
        new.daddr = F::from_nat(&current.nat_addr);
        new.dport_be = current.nat_port_be;
    }
    nat::rewrite::<F>(ctx, tuple, &new)?;
    Ok(Verdict::pass(reason::NAT_REPLY))
}

/// Does nothing: the floor that `lb_tc`'s per-packet cost is measured
/// against (same hook, same packet). Never attached by the agent.
#[classifier]
pub fn lb_floor(_ctx: TcContext) -> i32 {
    Verdict::pass(reason::PASS_NO_SERVICE).action
}
