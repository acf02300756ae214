//! The pipeline behind `lb_tc`: parse, then translate towards a service or
//! back from a backend, then forward what was translated. Every step
//! returns its verdict here; `lb_tc` counts and returns it.

use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};
use lb_common::{Addr4, Addr6, CtEntry, LbService, ct_dir, ct_flags, proto, reason, svc_flags};

use crate::{
    ct::{self, Flow},
    ctx::Ctx,
    family::{Family, Tuple, V4, V6, ct_key, placeholder_backend},
    frag::{self, V6Frag},
    fwd,
    hdr::{
        Link,
        eth::{ETH_P_8021AD_BE, ETH_P_8021Q_BE, ETH_P_IP_BE, ETH_P_IPV6_BE, PROTO_OFF},
        ipv4::{self, Ipv4Hdr},
        ipv6::{self, Ipv6Hdr},
        l4::{
            Ports, SCTP_CHUNK_HLEN, SCTP_HLEN, TCP_DOFF_OFF, TCP_FLAGS_OFF, TCP_HLEN, UDP_CSUM_OFF,
            UDP_HLEN, UDP_LEN_OFF, sctp_as_tcp_flags,
        },
    },
    icmp_err, lb,
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
    /// TCP flags (0 for UDP; SCTP: its first chunk read as TCP flags,
    /// `l4::sctp_as_tcp_flags`).
    pub(crate) tcp_flags: u8,
    /// Non-zero when a reply asked for `ct::answer` (its TCP flags and
    /// `ct::ANSWER_DUE`, `ct::ANSWERED`) on the tuple above, or a client's
    /// SYN to no service did (`ct::DIRECT_SYN`); reset for every packet.
    pub(crate) answer: u32,
    /// `frag::FIRST` for a first fragment going through the pipeline;
    /// reset for every packet.
    pub(crate) frag: u32,
    /// The datagram's identification, for a fragment (see `frag`).
    pub(crate) frag_id: u32,
}

/// `skb->pkt_type` of a frame for another host's MAC (`linux/if_packet.h`).
const PACKET_OTHERHOST: u32 = 3;

/// The parse step found a frontend: `run` runs the to-backend step next.
/// (Encoded verdicts have bit 62 set and never equal this.)
pub(crate) const GO_TO_BACKEND: u64 = 1 << 63;
/// The parse step found a UDP fragment other than the first: `run` runs
/// `frag::later` next.
pub(crate) const GO_TO_FRAG: u64 = (1 << 63) | 1;

/// The parse step found an ICMP / `ICMPv6` packet: `run` hands it to
/// `icmp_err`, a sibling subprogram (not under the parse step's frame).
pub(crate) const GO_TO_ICMP: u64 = (1 << 63) | 2;

/// The verdict on one packet at ingress (`EGRESS` false) or egress of a
/// device of link layer `L`. Parse and lookups, then (for a frontend hit
/// at ingress) the to-backend step: two sibling subprograms with the
/// parsed packet in a per-CPU scratch, so that their stack frames do not
/// add up. At egress only replies are translated (see `translate`).
#[inline(always)]
pub(crate) fn run<L: Link, const EGRESS: bool>(ctx: &TcContext) -> Verdict {
    match try_run::<L, EGRESS>(ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_run<L: Link, const EGRESS: bool>(ctx: &TcContext) -> Result<Verdict, Verdict> {
    linearize_headers(ctx);
    // SAFETY: the context of a TC program is an `__sk_buff`.
    let skb = unsafe { &*ctx.as_ptr().cast::<__sk_buff>() };
    // A tagged frame belongs to a VLAN whose addresses we know nothing
    // about (TC sees an offloaded tag in the skb, others in the frame).
    if skb.vlan_present != 0 {
        return Ok(Verdict::pass(reason::PASS_VLAN));
    }
    // A frame for another host's MAC (promiscuous mode) is not ours. Only
    // where the packet entered through a device (`ingress_ifindex`) is the
    // type meaningful: `BPF_PROG_TEST_RUN` classifies every frame against
    // the loopback device's all-zero MAC.
    if !EGRESS && skb.ingress_ifindex != 0 && skb.pkt_type == PACKET_OTHERHOST {
        return Ok(Verdict::pass(reason::PASS_OTHER_HOST));
    }
    // `skb->protocol` is the `EtherType` in network order on every device.
    #[expect(clippy::cast_possible_truncation, reason = "a 16-bit field")]
    let ether_type = if L::ETHERNET {
        read::<u16>(ctx, PROTO_OFF)?
    } else {
        skb.protocol as u16
    };
    if ether_type == ETH_P_8021Q_BE || ether_type == ETH_P_8021AD_BE {
        return Ok(Verdict::pass(reason::PASS_VLAN));
    }
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
    packet.frag = 0;
    let mut code = if v4_packet {
        v4::<L, EGRESS>(ctx, packet)
    } else {
        v6::<L, EGRESS>(ctx, packet)
    };
    if packet.answer != 0 {
        // A reply that moves or closes its flow: a sibling subprogram of
        // the parse step, whose frame is already large.
        if v4_packet {
            ct::answer::<V4<L>>(&packet.tuple4, packet.answer);
        } else {
            ct::answer::<V6<L>>(&packet.tuple6, packet.answer);
        }
    }
    if code == GO_TO_ICMP {
        code = if v4_packet {
            icmp_err::error4::<L, EGRESS>(ctx)
        } else {
            icmp_err::error6::<L, EGRESS>(ctx)
        };
    }
    if !EGRESS && code == GO_TO_BACKEND {
        code = if v4_packet {
            to_backend_sub::<V4<L>>(ctx, packet)
        } else {
            to_backend_sub::<V6<L>>(ctx, packet)
        };
    }
    if code == GO_TO_FRAG {
        code = if v4_packet {
            frag::later::<V4<L>, EGRESS>(ctx, packet)
        } else {
            frag::later::<V6<L>, EGRESS>(ctx, packet)
        };
    }
    let verdict = Verdict::decode(code);
    let translated = verdict.reason == reason::NAT_NEW
        || verdict.reason == reason::NAT_ESTABLISHED
        || verdict.reason == reason::NAT_REPLY;
    if translated && packet.frag & frag::FIRST != 0 {
        // A first fragment: its datagram's later fragments follow it.
        if v4_packet {
            frag::record::<V4<L>>(packet);
        } else {
            frag::record::<V6<L>>(packet);
        }
    }
    // At egress the packet is already on its way out of its device.
    if !EGRESS && translated && fwd::redirect_enabled() {
        // `--forward=redirect`: forward it ourselves (see `fwd`); the stack
        // if that cannot be done. By default the stack routes it.
        let code = if v4_packet {
            fwd::forward::<V4<L>>(ctx, code)
        } else {
            fwd::forward::<V6<L>>(ctx, code)
        };
        return Ok(Verdict::decode(code));
    }
    Ok(verdict)
}

// Not inlined: each family gets its own BPF stack frame. Scalar returns:
// see `Verdict::encode`.
#[inline(never)]
pub(crate) fn v4<L: Link, const EGRESS: bool>(ctx: &impl Ctx, packet: &mut Packet) -> u64 {
    match try_v4::<L, EGRESS>(ctx, packet) {
        Ok(code) => code,
        Err(verdict) => verdict.encode(),
    }
}

#[inline(never)]
pub(crate) fn v6<L: Link, const EGRESS: bool>(ctx: &impl Ctx, packet: &mut Packet) -> u64 {
    match try_v6::<L, EGRESS>(ctx, packet) {
        Ok(code) => code,
        Err(verdict) => verdict.encode(),
    }
}

/// Parses IPv4; `Ok` holds an encoded verdict or `GO_TO_BACKEND`.
#[inline(always)]
fn try_v4<L: Link, const EGRESS: bool>(
    ctx: &impl Ctx,
    packet: &mut Packet,
) -> Result<u64, Verdict> {
    let ip: Ipv4Hdr = read(ctx, L::L3_OFF)?;
    if ip.version_ihl >> 4 != 4 || ip.version_ihl & 0x0f < 5 {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    if ip.version_ihl & 0x0f != 5 {
        return Err(Verdict::pass(reason::PASS_IP_OPTIONS));
    }
    let frag_off = u16::from_be(ip.frag_off_be);
    if frag_off & ipv4::FRAG_MASK != 0 {
        // The protocol of a first fragment is checked in `translate`: a
        // check here would have the compiler copy that whole step for it.
        if frag_off & ipv4::FRAG_OFFSET_MASK != 0 {
            if ip.proto != proto::UDP {
                return Err(Verdict::pass(reason::PASS_FRAGMENT));
            }
            packet.frag_id = u32::from(u16::from_be(ip.id_be));
            return Ok(later_fragment(&mut packet.tuple4, ip.saddr, ip.daddr));
        }
        packet.frag_id = u32::from(u16::from_be(ip.id_be));
        packet.frag = frag::FIRST;
    }
    if ip.proto == proto::ICMP {
        return Ok(GO_TO_ICMP);
    }
    let ip_total = u16::from_be(ip.tot_len_be);
    translate::<V4<L>, EGRESS>(ctx, ip.saddr, ip.daddr, ip.proto, ip_total, packet)
}

/// Parses IPv6; `Ok` holds an encoded verdict or `GO_TO_BACKEND`.
#[inline(always)]
fn try_v6<L: Link, const EGRESS: bool>(
    ctx: &impl Ctx,
    packet: &mut Packet,
) -> Result<u64, Verdict> {
    let ip: Ipv6Hdr = read(ctx, L::L3_OFF)?;
    if ip.vtc_flow[0] >> 4 != 6 {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    let next = ip.next_hdr;
    if ipv6::is_extension(next) {
        return Err(Verdict::pass(reason::PASS_EXT_HDR));
    }
    if next == proto::ICMPV6 {
        return Ok(GO_TO_ICMP);
    }
    // As an IPv4 total length: the payload length does not count the fixed
    // header (0 stays 0: BIG TCP).
    let payload_len = u16::from_be(ip.payload_len_be);
    #[expect(clippy::cast_possible_truncation, reason = "40")]
    let ip_total = if payload_len == 0 {
        0
    } else {
        payload_len.saturating_add(ipv6::HLEN as u16)
    };
    if next == ipv6::NEXTHDR_FRAGMENT {
        let fh: ipv6::FragHdr = read(ctx, L::L3_OFF + ipv6::HLEN)?;
        if fh.next_hdr != proto::UDP {
            return Err(Verdict::pass(reason::PASS_FRAGMENT));
        }
        packet.frag_id = u32::from_be(fh.id_be);
        let frag_off = u16::from_be(fh.frag_off_be);
        if frag_off & ipv6::FRAG_OFFSET_MASK != 0 {
            return Ok(later_fragment(&mut packet.tuple6, ip.saddr, ip.daddr));
        }
        // Offset 0: the UDP header follows. Without M, an atomic fragment
        // (RFC 6946): a whole datagram, nothing to record.
        if frag_off & ipv6::FRAG_MORE != 0 {
            packet.frag = frag::FIRST;
        }
        return translate::<V6Frag<L>, EGRESS>(
            ctx,
            ip.saddr,
            ip.daddr,
            fh.next_hdr,
            ip_total,
            packet,
        );
    }
    translate::<V6<L>, EGRESS>(ctx, ip.saddr, ip.daddr, next, ip_total, packet)
}

/// Leaves a UDP fragment other than the first in the scratch for
/// `frag::later` (its ports are not known yet).
#[inline(always)]
fn later_fragment<A: Copy>(tuple: &mut Tuple<A>, saddr: A, daddr: A) -> u64 {
    *tuple = Tuple {
        saddr,
        daddr,
        sport_be: 0,
        dport_be: 0,
        proto: proto::UDP,
    };
    GO_TO_FRAG
}

/// The L4 bytes the IP header declares (`total`: the IPv4 total length,
/// or the IPv6 payload length plus the fixed header), checked against the
/// packet: at least the IP header, at most what the packet holds from the
/// L4 header on (a shorter packet is a truncated or forged one; more is
/// link padding). BIG TCP's GSO packets above 64 KiB carry 0: then the
/// packet's own length counts.
#[inline(always)]
fn declared_l4_len<F: Family>(ctx: &impl Ctx, total: u16) -> Result<u32, Verdict> {
    let bad = Verdict::pass(reason::PASS_BAD_LENGTH);
    // The IP header and the extension headers before L4 (IPv6: a
    // Fragment header), which the IP length counts too.
    #[expect(clippy::cast_possible_truncation, reason = "header offsets")]
    let (l4_off, header) = (F::L4_OFF as u32, (F::L4_OFF - F::L3_OFF) as u32);
    let in_packet = ctx.len().checked_sub(l4_off).ok_or(bad)?;
    if total == 0 {
        return if ctx.gso_size() != 0 {
            Ok(in_packet)
        } else {
            Err(bad)
        };
    }
    let declared = u32::from(total).checked_sub(header).ok_or(bad)?;
    if declared > in_packet {
        return Err(bad);
    }
    Ok(declared)
}

/// Checks an SCTP packet's length (the common header and one chunk
/// header, within what the IP header declares) and reads its first chunk
/// as TCP flags. The checksum is not verified: the receiver does that, as
/// for TCP and UDP.
#[inline(always)]
fn sctp_flags<F: Family>(ctx: &impl Ctx, ip_total: u16) -> Result<u8, Verdict> {
    let l4_off = F::L4_OFF;
    ptr_at::<[u8; SCTP_HLEN + SCTP_CHUNK_HLEN]>(ctx, l4_off)?;
    let l4_len = declared_l4_len::<F>(ctx, ip_total)?;
    #[expect(clippy::cast_possible_truncation, reason = "16")]
    if l4_len < (SCTP_HLEN + SCTP_CHUNK_HLEN) as u32 {
        return Err(Verdict::pass(reason::PASS_BAD_LENGTH));
    }
    Ok(sctp_as_tcp_flags(read::<u8>(ctx, l4_off + SCTP_HLEN)?))
}

/// Common TCP/UDP/SCTP handling for both families: a frontend hit is handed
/// to the to-backend step through `packet`; replies, unserved ports of
/// service addresses and everything else are finished here. At egress
/// only replies are translated: frontends are translated where packets
/// enter the node, and a reply already translated at ingress no longer
/// matches a reply entry (its source is the frontend), so it is not
/// translated twice.
#[inline(always)]
fn translate<F: Family, const EGRESS: bool>(
    ctx: &impl Ctx,
    saddr: F::Addr,
    daddr: F::Addr,
    l4_proto: u8,
    ip_total: u16,
    packet: &mut Packet,
) -> Result<u64, Verdict> {
    let l4_off = F::L4_OFF;
    let bad_length = Verdict::pass(reason::PASS_BAD_LENGTH);
    // Read opaquely: known to the compiler, it would copy this whole step
    // for first fragments (twice the code for the verifier to walk).
    // SAFETY: a field of the per-CPU scratch.
    let first_fragment =
        unsafe { core::ptr::read_volatile(&raw const packet.frag) } & frag::FIRST != 0;
    // Lengths are checked once the L4 header is known to be there (a cut
    // header is `pass_truncated`).
    let tcp_flags = if l4_proto == proto::TCP {
        // TCP is not translated in fragments (see `frag`).
        if first_fragment {
            return Err(Verdict::pass(reason::PASS_FRAGMENT));
        }
        ptr_at::<[u8; TCP_HLEN]>(ctx, l4_off)?;
        let l4_len = declared_l4_len::<F>(ctx, ip_total)?;
        // The data offset: at least the fixed header, within the segment.
        let doff = u32::from(read::<u8>(ctx, l4_off + TCP_DOFF_OFF)? >> 4) * 4;
        #[expect(clippy::cast_possible_truncation, reason = "20")]
        if doff < TCP_HLEN as u32 || doff > l4_len {
            return Err(bad_length);
        }
        read::<u8>(ctx, l4_off + TCP_FLAGS_OFF)?
    } else if l4_proto == proto::UDP {
        ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off)?;
        if !F::IS_V4 && read::<u16>(ctx, l4_off + UDP_CSUM_OFF)? == 0 {
            return Err(Verdict::pass(reason::PASS_UDP6_ZERO_CSUM));
        }
        let l4_len = declared_l4_len::<F>(ctx, ip_total)?;
        let udp_len = u32::from(u16::from_be(read::<u16>(ctx, l4_off + UDP_LEN_OFF)?));
        // A first fragment's UDP length is the whole datagram's: at least
        // what this fragment carries.
        let fits = if first_fragment {
            udp_len >= l4_len
        } else {
            udp_len <= l4_len
        };
        #[expect(clippy::cast_possible_truncation, reason = "8")]
        if udp_len < UDP_HLEN as u32 || !fits {
            return Err(bad_length);
        }
        0
    } else if first_fragment {
        // SCTP is not translated in fragments either (its `CRC32c` covers
        // the whole packet).
        return Err(Verdict::pass(reason::PASS_FRAGMENT));
    } else if l4_proto == proto::SCTP {
        sctp_flags::<F>(ctx, ip_total)?
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
    if first_fragment {
        // For `frag::record` once translated.
        *F::packet_tuple(packet) = tuple;
    }
    if EGRESS {
        if let Some((entry, answered)) = reply_entry_of::<F>(&tuple, tcp_flags) {
            return from_backend::<F>(ctx, &tuple, entry, tcp_flags, answered, packet)
                .map(Verdict::encode);
        }
        return Err(Verdict::pass(reason::PASS_NO_SERVICE));
    }
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { lb::frontend::<F>(daddr, ports.dport_be, l4_proto) } {
        packet.frontend = *frontend;
        if packet.frontend.flags & svc_flags::CLUSTER_IP != 0
            && lb::off_cluster_source::<F>(saddr) != 0
        {
            packet.frontend.flags |= svc_flags::OFF_CLUSTER_SOURCE;
        }
        packet.tcp_flags = tcp_flags;
        *F::packet_tuple(packet) = tuple;
        return Ok(GO_TO_BACKEND);
    }
    if let Some((entry, answered)) = reply_entry_of::<F>(&tuple, tcp_flags) {
        // A reply entry matches from any interface: on a pod-facing one the
        // source must be routed back through it, or a pod could send as a
        // backend and have it come from the Service.
        if fwd::source_routed_back::<F>(ctx) == 0 {
            return Err(Verdict::drop(reason::DROP_SPOOFED_SOURCE));
        }
        return from_backend::<F>(ctx, &tuple, entry, tcp_flags, answered, packet)
            .map(Verdict::encode);
    }
    // A service address, but not a port it serves: refuse, as kube-proxy does.
    if lb::is_service_address::<F>(daddr) {
        return ctx.reject::<F>().map(Verdict::encode);
    }
    // A client's bare SYN to no service may reuse the port of a closing
    // flow to this very backend, whose reply entry would translate the
    // answer back to the service: `ct::end_closed_flow` ends such a flow,
    // after this step (two lookups per such SYN, none for other packets).
    if l4_proto == proto::TCP && ct::opens(l4_proto, tcp_flags) {
        *F::packet_tuple(packet) = tuple;
        packet.answer = ct::DIRECT_SYN;
    }
    Err(Verdict::pass(reason::PASS_NO_SERVICE))
}

/// The reply entry a packet matches: in the main map, or (a flow's first
/// answer) in the map of new flows; with true when in the main map.
#[inline(always)]
pub(crate) fn reply_entry_of<F: Family>(
    tuple: &Tuple<F::Addr>,
    tcp_flags: u8,
) -> Option<(*mut CtEntry, bool)> {
    let key = ct_key(tuple, ct_dir::REPLY);
    match F::conntrack().get_ptr_mut(&key) {
        Some(entry) => Some((entry, true)),
        None if ct::may_be_first_reply(tuple.proto, tcp_flags) => F::conntrack_new()
            .get_ptr_mut(&key)
            .map(|entry| (entry, false)),
        None => None,
    }
}

/// `to_backend` as a subprogram (its own stack frame, a scalar result) on
/// the packet the parse step left in the scratch.
#[inline(never)]
pub(crate) fn to_backend_sub<F: Family>(ctx: &impl Ctx, packet: &mut Packet) -> u64 {
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
    ctx: &impl Ctx,
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
            return ctx.reject::<F>();
        }
        // A segment that cannot open a connection creates no state: a
        // reset tells its sender the connection is gone (a reset is
        // dropped).
        if !ct::opens(tuple.proto, tcp_flags) {
            return ctx.reject::<F>().map(|verdict| Verdict {
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
        rewrite_to_backend::<F, 0>(ctx, tuple, &flow)
    } else if frag::has_frag_header::<F>(ctx) {
        // An IPv6 first fragment: its UDP header after the Fragment header.
        rewrite_to_backend_sub::<F, { ipv6::FRAG_HLEN }>(ctx, tuple, &flow)
    } else {
        rewrite_to_backend_sub::<F, 0>(ctx, tuple, &flow)
    })?;
    count_service(frontend.rev_nat_id, Ctx::len(ctx));
    Ok(Verdict::pass(if established {
        reason::NAT_ESTABLISHED
    } else {
        reason::NAT_NEW
    }))
}

/// DNAT (and SNAT) of a packet towards its flow's backend (its L4 header
/// `EXT` bytes after `F::L4_OFF`), with a scalar result (`encode_unit`).
#[inline(always)]
fn rewrite_to_backend<F: Family, const EXT: usize>(
    ctx: &impl Ctx,
    tuple: &Tuple<F::Addr>,
    flow: &Flow<F>,
) -> u64 {
    let mut new = *tuple;
    new.daddr = flow.backend.addr;
    new.dport_be = flow.backend.port_be;
    if flow.snat {
        new.saddr = flow.nat_addr;
        new.sport_be = flow.nat_port_be;
    }
    encode_unit(xlate::rewrite_at::<F, EXT>(ctx, tuple, &new))
}

/// `rewrite_to_backend` as a subprogram, for IPv6: inlined, its 16-byte
/// addresses make the caller's frame too large for the verifier's 512-byte
/// limit on the deepest call chain. (IPv4 inlines it: a call less.)
#[inline(never)]
fn rewrite_to_backend_sub<F: Family, const EXT: usize>(
    ctx: &impl Ctx,
    tuple: &Tuple<F::Addr>,
    flow: &Flow<F>,
) -> u64 {
    rewrite_to_backend::<F, EXT>(ctx, tuple, flow)
}

/// A packet matching a reply entry: restore the service address as source
/// (and the client as destination when the flow was source-NATed).
#[inline(always)]
fn from_backend<F: Family>(
    ctx: &impl Ctx,
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
