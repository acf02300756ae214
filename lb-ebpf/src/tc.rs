//! The pipeline behind `lb_tc`: parse, then translate towards a service or
//! back from a backend, then forward what was translated. Every step
//! returns its verdict here; `lb_tc` counts and returns it.

use aya_ebpf::programs::TcContext;
use lb_common::{Addr4, Addr6, CtEntry, LbService, ct_dir, ct_flags, proto, reason, svc_flags};

use crate::{
    ct::{self, Flow},
    family::{Family, Tuple, V4, V6, ct_key, placeholder_backend},
    fwd,
    hdr::{
        L3_OFF,
        eth::{ETH_P_IP_BE, ETH_P_IPV6_BE, PROTO_OFF},
        ipv4::{self, Ipv4Hdr},
        ipv6::{self, Ipv6Hdr},
        l4::{Ports, TCP_FLAGS_OFF, TCP_HLEN, UDP_CSUM_OFF, UDP_HLEN},
    },
    lb,
    maps::{LB_PACKET, count_service},
    skb::{linearize_headers, ptr_at, read},
    verdict::{Verdict, decode_unit, encode_unit},
    xlate,
};

/// The parsed packet, handed from the parse step to the to-backend step
/// (per-CPU scratch: see `run`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Packet {
    /// The flow, when the packet is IPv4.
    pub(crate) tuple4: Tuple<Addr4>,
    /// The flow, when the packet is IPv6.
    pub(crate) tuple6: Tuple<Addr6>,
    /// The frontend the packet is addressed to.
    pub(crate) frontend: LbService,
    /// TCP flags (0 for UDP).
    pub(crate) tcp_flags: u8,
    /// Non-zero when a reply asked for `ct::answer` (its TCP flags and
    /// `ct::ANSWER_DUE`, `ct::ANSWERED`) on the tuple above; reset for
    /// every packet.
    pub(crate) answer: u32,
}

/// The parse step found a frontend: `run` runs the to-backend step next.
/// (Encoded verdicts have bit 62 set and never equal this.)
const GO_TO_BACKEND: u64 = 1 << 63;

/// The verdict on one packet. Parse and lookups, then (for a frontend
/// hit) the to-backend step: two sibling subprograms with the parsed
/// packet in a per-CPU scratch, so that their stack frames do not add up.
#[inline(always)]
pub(crate) fn run(ctx: &TcContext) -> Verdict {
    match try_run(ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_run(ctx: &TcContext) -> Result<Verdict, Verdict> {
    linearize_headers(ctx);
    let ether_type: u16 = read(ctx, PROTO_OFF)?;
    let Some(packet) = LB_PACKET.get_ptr_mut(0) else {
        return Ok(Verdict::pass(reason::PASS_NO_SERVICE));
    };
    // SAFETY: per-CPU scratch used by this run only.
    let packet = unsafe { &mut *packet };
    let v4_packet = ether_type == ETH_P_IP_BE;
    if !v4_packet && ether_type != ETH_P_IPV6_BE {
        return Ok(Verdict::pass(reason::PASS_NOT_IP));
    }
    packet.answer = 0;
    let mut code = if v4_packet {
        v4(ctx, packet)
    } else {
        v6(ctx, packet)
    };
    if packet.answer != 0 {
        // A reply that moves or closes its flow: a sibling subprogram of
        // the parse step, whose frame is already large.
        if v4_packet {
            ct::answer::<V4>(&packet.tuple4, packet.answer);
        } else {
            ct::answer::<V6>(&packet.tuple6, packet.answer);
        }
    }
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
        let code = if v4_packet {
            fwd::forward::<V4>(ctx, code)
        } else {
            fwd::forward::<V6>(ctx, code)
        };
        return Ok(Verdict::decode(code));
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
    let ip: Ipv4Hdr = read(ctx, L3_OFF)?;
    if ip.version_ihl >> 4 != 4 || ip.version_ihl & 0x0f < 5 {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    if ip.version_ihl & 0x0f != 5 {
        return Err(Verdict::pass(reason::PASS_IP_OPTIONS));
    }
    if u16::from_be(ip.frag_off_be) & ipv4::FRAG_MASK != 0 {
        return Err(Verdict::pass(reason::PASS_FRAGMENT));
    }
    translate::<V4>(ctx, ip.saddr, ip.daddr, ip.proto, packet)
}

/// Parses IPv6; `Ok` holds an encoded verdict or `GO_TO_BACKEND`.
#[inline(always)]
fn try_v6(ctx: &TcContext, packet: &mut Packet) -> Result<u64, Verdict> {
    let ip: Ipv6Hdr = read(ctx, L3_OFF)?;
    if ip.vtc_flow[0] >> 4 != 6 {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    let next = ip.next_hdr;
    if next == ipv6::NEXTHDR_FRAGMENT {
        return Err(Verdict::pass(reason::PASS_FRAGMENT));
    }
    if ipv6::is_extension(next) {
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
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { lb::frontend::<F>(daddr, ports.dport_be, l4_proto) } {
        packet.frontend = *frontend;
        packet.tcp_flags = tcp_flags;
        *F::packet_tuple(packet) = tuple;
        return Ok(GO_TO_BACKEND);
    }
    // A reply: its entry is in the main map, or (the first answer of a
    // flow) in the map of new flows.
    let reply_key = ct_key(&tuple, ct_dir::REPLY);
    let reply = match F::conntrack().get_ptr_mut(&reply_key) {
        Some(entry) => Some((entry, true)),
        None if ct::may_be_first_reply(l4_proto, tcp_flags) => F::conntrack_new()
            .get_ptr_mut(&reply_key)
            .map(|entry| (entry, false)),
        None => None,
    };
    if let Some((entry, answered)) = reply {
        return from_backend::<F>(ctx, &tuple, entry, tcp_flags, answered, packet)
            .map(Verdict::encode);
    }
    // A service address, but not a port it serves: refuse, as kube-proxy does.
    if lb::is_service_address::<F>(daddr) {
        return F::reject(ctx).map(Verdict::encode);
    }
    Err(Verdict::pass(reason::PASS_NO_SERVICE))
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
    if !lb::source_allowed::<F>(frontend, tuple.saddr) {
        return Err(Verdict::drop(reason::DROP_SOURCE_RANGE));
    }
    let now = ct::now_ns();
    let mut flow = Flow::<F> {
        backend_id: 0,
        flags: 0,
        backend: placeholder_backend(tuple.daddr),
        nat_addr: tuple.saddr,
        nat_port_be: tuple.sport_be,
        snat: false,
        answered: false,
    };
    let found = ct::established_flow_sub::<F>(tuple, frontend, tcp_flags, now, &mut flow);
    let established = found & ct::FOUND != 0;
    if !established {
        // No backend for new flows: refuse this one, as kube-proxy rejects
        // `ct state new` only; established flows to a draining backend of
        // the frontend went on above.
        if frontend.count == 0 {
            // Unless a Local traffic policy left none here while other
            // nodes have some: kube-proxy drops those.
            if frontend.flags & svc_flags::NO_LOCAL_ENDPOINTS != 0 {
                return Err(Verdict::drop(reason::DROP_NO_LOCAL_ENDPOINT));
            }
            return F::reject(ctx);
        }
        // A segment that cannot open a connection creates no state: a
        // reset tells its sender the connection is gone (a reset is
        // dropped).
        if !ct::opens(tuple.proto, tcp_flags) {
            return F::reject(ctx).map(|verdict| Verdict {
                reason: reason::REJECT_NO_FLOW,
                ..verdict
            });
        }
        decode_unit(ct::new_flow_into::<F>(tuple, frontend, now, &mut flow))?;
    }
    if found & ct::PROMOTE != 0 {
        ct::promote::<F>(tuple, &flow);
        flow.answered = true;
    }
    if !established || found & ct::SYNC_REPLY != 0 {
        // Write the reply entry of a new flow; refresh it with the service
        // entry (about once a second, and when the flow starts closing) so
        // that it outlives one-way quiet periods and closes with it.
        decode_unit(ct::write_reply_entry::<F>(
            tuple,
            &flow,
            frontend.rev_nat_id,
            now,
            !established,
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

/// DNAT (and SNAT) of a packet towards its flow's backend, with a scalar
/// result (`encode_unit`).
#[inline(always)]
fn rewrite_to_backend<F: Family>(ctx: &TcContext, tuple: &Tuple<F::Addr>, flow: &Flow<F>) -> u64 {
    let mut new = *tuple;
    new.daddr = flow.backend.addr;
    new.dport_be = flow.backend.port_be;
    if flow.snat {
        new.saddr = flow.nat_addr;
        new.sport_be = flow.nat_port_be;
    }
    encode_unit(xlate::rewrite::<F>(ctx, tuple, &new))
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

/// A packet matching a reply entry: restore the service address as source
/// (and the client as destination when the flow was source-NATed).
#[inline(always)]
fn from_backend<F: Family>(
    ctx: &TcContext,
    tuple: &Tuple<F::Addr>,
    entry: *mut CtEntry,
    tcp_flags: u8,
    answered: bool,
    packet: &mut Packet,
) -> Result<Verdict, Verdict> {
    let now = ct::now_ns();
    // SAFETY: map value pointer; read once.
    let current = unsafe { *entry };
    if !ct::usable(&current, tuple.proto, tcp_flags, now, answered) {
        return Ok(Verdict::pass(reason::PASS_NO_SERVICE));
    }
    // SAFETY: the value is copied out at once.
    let Some(rev_nat) = (unsafe { F::rev_nats().get(&current.rev_nat_id) }) else {
        return Ok(Verdict::pass(reason::PASS_NO_SERVICE));
    };
    let mut new = *tuple;
    new.saddr = rev_nat.addr;
    new.sport_be = rev_nat.port_be;
    let touched = ct::touch(entry, tcp_flags, now);
    if !answered || touched != 0 {
        // The first answer marks the flow's entries; a closing or
        // refreshing one reaches the service entry too.
        *F::packet_tuple(packet) = *tuple;
        packet.answer =
            u32::from(tcp_flags) | ct::ANSWER_DUE | if answered { ct::ANSWERED } else { 0 };
    }
    if current.flags & ct_flags::SNAT != 0 {
        new.daddr = F::from_nat(&current.nat_addr);
        new.dport_be = current.nat_port_be;
    }
    xlate::rewrite::<F>(ctx, tuple, &new)?;
    Ok(Verdict::pass(reason::NAT_REPLY))
}
