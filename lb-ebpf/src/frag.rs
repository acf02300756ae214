//! Fragmented UDP datagrams: every fragment of a service flow's datagram
//! translated, as Cilium does (`ipv4_handle_fragmentation`,
//! `IPV4_FRAG_DATAGRAMS_MAP`, and its IPv6 counterpart).
//!
//! Only a datagram's first fragment (offset 0) carries the UDP header. It
//! goes through the pipeline as a whole datagram would (`tc`: lookups,
//! a new flow, the rewrite of addresses, ports and UDP checksum), and once
//! translated its ports are recorded under the datagram's (source,
//! destination, identification, protocol) as it arrived (`record`). Every
//! later fragment carries the same four: `later` finds the ports, asks the
//! frontend and conntrack maps as the first fragment did, and rewrites the
//! IP addresses only (no L4 header in it). A later fragment never creates
//! state.
//!
//! The UDP checksum covers the whole datagram (pseudo-header, header,
//! every fragment's data) and sits in the first fragment: the incremental
//! update of the first fragment for the address and port change is the
//! one an unfragmented datagram gets, and the later fragments' data is not
//! changed, so the reassembled datagram's checksum holds. Their address
//! change is accounted for in the first fragment's checksum (it is only in
//! the pseudo-header). IPv4 later fragments get their header checksum
//! updated; an IPv6 one has none, but a `CHECKSUM_COMPLETE` `skb->csum`
//! covers the address bytes and follows them (`bpf_csum_update`).
//!
//! A later fragment whose first was not translated here is passed
//! untouched (`PASS_FRAG_UNTRACKED`): without ports, service traffic cannot
//! be told from other traffic, and passing what is not ours is the rule.
//! Cilium drops such fragments (`DROP_FRAG_NOT_FOUND`); it owns the node's
//! traffic, a kube-proxy replacement does not. A service fragment that
//! overtook its first fragment is thus not translated, and its datagram is
//! lost (the receiver cannot reassemble it), as it would be dropped.
//!
//! IPv6: a Fragment header right after the fixed header (what Linux and
//! other stacks send for UDP without further extension headers) is
//! handled; after other extension headers the packet is passed
//! (`PASS_EXT_HDR`), so the parse stays one bounded read. The parse step
//! reads the first fragment as family `V6Frag`, whose UDP header is 8
//! bytes further; the to-backend step, shared with whole datagrams, finds
//! the header again (`has_frag_header`).

use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, helpers::bpf_csum_update, programs::TcContext,
};
use lb_common::{FragEntry, FragKey, LbService, ct_flags, reason};

use crate::{
    ct::{self, Flow},
    family::{Family, Tuple, V6, placeholder_backend},
    fwd,
    hdr::ipv6::{self, FRAG_HLEN},
    lb,
    maps::count_service,
    skb::read,
    tc::{Packet, reply_entry_of},
    verdict::Verdict,
};

/// IPv6 with a Fragment header before the UDP header (a first fragment,
/// or an atomic fragment: offset 0 and no more fragments), as the parse
/// step reads it.
pub(crate) type V6Frag<L> = V6<L, FRAG_HLEN>;

/// `Packet::frag`: the packet is a first fragment (more follow): record
/// its ports once it is translated.
pub(crate) const FIRST: u32 = 1;

/// True when an IPv6 packet's fixed header is followed by a Fragment header
/// (a first or atomic fragment past the parse step: its UDP header is
/// `FRAG_HLEN` further). The to-backend step is shared with whole
/// datagrams and asks the packet, so that the conntrack and backend
/// choice code is not copied for fragments (half again the instructions
/// the verifier walks).
#[inline(always)]
pub(crate) fn has_frag_header<F: Family>(ctx: &TcContext) -> bool {
    !F::IS_V4 && read::<u8>(ctx, F::L3_OFF + ipv6::NEXT_HDR_OFF) == Ok(ipv6::NEXTHDR_FRAGMENT)
}

/// The key of the datagram of `tuple` (its addresses and protocol as they
/// arrived) with identification `id`.
#[inline(always)]
fn key<A: Copy>(tuple: &Tuple<A>, id: u32) -> FragKey<A> {
    FragKey {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        id,
        proto: tuple.proto,
        _pad: [0; 3],
    }
}

/// Records the ports of a translated first fragment (the tuple as parsed,
/// left in the scratch by the parse step) for its datagram's later
/// fragments. A subprogram with a small frame, a sibling of the pipeline's
/// steps; best effort (a failed insert leaves the later fragments
/// untranslated, as the LRU evicting the entry would).
#[inline(never)]
pub(crate) fn record<F: Family>(packet: &mut Packet) -> u64 {
    if crate::probe::dry_run() {
        return 0;
    }
    let id = packet.frag_id;
    let tuple = F::packet_tuple(packet);
    let entry = FragEntry {
        sport_be: tuple.sport_be,
        dport_be: tuple.dport_be,
    };
    let _ = F::fragments().insert(&key(tuple, id), &entry, 0);
    0
}

/// A fragment other than the first (the parse step left its addresses,
/// protocol and identification in the scratch): translated as its first
/// fragment was, addresses only. An encoded verdict. The lookups and the
/// rewrite are two sibling subprograms (`to_backend_sub`, `reply_sub`):
/// their frames, with IPv6 tuples and keys, would not fit in one.
#[inline(never)]
pub(crate) fn later<F: Family, const EGRESS: bool>(ctx: &TcContext, packet: &mut Packet) -> u64 {
    let id = packet.frag_id;
    let tuple = F::packet_tuple(packet);
    // SAFETY: the value is copied out at once.
    let Some(ports) = (unsafe { F::fragments().get(&key(tuple, id)) }).copied() else {
        return Verdict::pass(reason::PASS_FRAG_UNTRACKED).encode();
    };
    tuple.sport_be = ports.sport_be;
    tuple.dport_be = ports.dport_be;
    if EGRESS {
        return reply_sub::<F>(ctx, tuple, false);
    }
    // SAFETY: the value is copied out at once.
    match unsafe { lb::frontend::<F>(tuple.daddr, tuple.dport_be, tuple.proto) } {
        Some(frontend) => {
            packet.frontend = *frontend;
            to_backend_sub::<F>(ctx, packet)
        }
        None => reply_sub::<F>(ctx, tuple, true),
    }
}

/// `to_backend` as a subprogram on the fragment and frontend in the
/// scratch.
#[inline(never)]
fn to_backend_sub<F: Family>(ctx: &TcContext, packet: &mut Packet) -> u64 {
    let frontend = packet.frontend;
    match to_backend::<F>(ctx, F::packet_tuple(packet), &frontend) {
        Ok(verdict) | Err(verdict) => verdict.encode(),
    }
}

/// `reply` as a subprogram.
#[inline(never)]
fn reply_sub<F: Family>(ctx: &TcContext, tuple: &Tuple<F::Addr>, check_source: bool) -> u64 {
    match reply::<F>(ctx, tuple, check_source) {
        Ok(verdict) | Err(verdict) => verdict.encode(),
    }
}

/// A later fragment to a frontend: to the backend of the flow its first
/// fragment found or created; none (expired since): passed.
#[inline(always)]
fn to_backend<F: Family>(
    ctx: &TcContext,
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
) -> Result<Verdict, Verdict> {
    let mut flow = Flow::<F> {
        backend_id: 0,
        flags: 0,
        backend: placeholder_backend(tuple.daddr),
        nat_addr: tuple.saddr,
        nat_port_be: tuple.sport_be,
        snat: false,
        answered: false,
    };
    // No TCP flags: a UDP datagram. Promotion and the reply entry's
    // refresh are the first fragment's business (it took the same path).
    let found = ct::established_flow_sub::<F>(tuple, frontend, 0, ct::now_ns(), &mut flow);
    if found & ct::FOUND == 0 {
        return Err(Verdict::pass(reason::PASS_FRAG_UNTRACKED));
    }
    let mut new = *tuple;
    new.daddr = flow.backend.addr;
    if flow.snat {
        new.saddr = flow.nat_addr;
    }
    rewrite_addrs::<F>(ctx, tuple, &new)?;
    count_service(frontend.rev_nat_id, ctx.len());
    Ok(Verdict::pass(reason::NAT_ESTABLISHED))
}

/// A later fragment of a backend's reply: the service address back as
/// source (and the client as destination for a source-NATed flow). At
/// ingress (`check_source`) the source must be routed back through the
/// interface on a pod-facing one, as for the first fragment.
#[inline(always)]
fn reply<F: Family>(
    ctx: &TcContext,
    tuple: &Tuple<F::Addr>,
    check_source: bool,
) -> Result<Verdict, Verdict> {
    let untracked = Verdict::pass(reason::PASS_FRAG_UNTRACKED);
    let (entry, answered) = reply_entry_of::<F>(tuple, 0).ok_or(untracked)?;
    // SAFETY: map value pointer; read once.
    let current = unsafe { *entry };
    if !ct::usable(&current, tuple.proto, 0, ct::now_ns(), answered) {
        return Err(untracked);
    }
    if check_source && fwd::source_routed_back::<F>(ctx) == 0 {
        return Err(Verdict::drop(reason::DROP_SPOOFED_SOURCE));
    }
    // SAFETY: the value is copied out at once.
    let Some(rev_nat) = (unsafe { F::rev_nats().get(&current.rev_nat_id) }) else {
        return Err(untracked);
    };
    let mut new = *tuple;
    new.saddr = rev_nat.addr;
    if current.flags & ct_flags::SNAT != 0 {
        new.daddr = F::from_nat(&current.nat_addr);
    }
    rewrite_addrs::<F>(ctx, tuple, &new)?;
    Ok(Verdict::pass(reason::NAT_REPLY))
}

/// Writes `new`'s addresses over `old`'s in a fragment without L4 header.
#[inline(always)]
fn rewrite_addrs<F: Family>(
    ctx: &TcContext,
    old: &Tuple<F::Addr>,
    new: &Tuple<F::Addr>,
) -> Result<(), Verdict> {
    let diff = F::write_addrs(ctx, old, new)?;
    if !F::IS_V4
        && let Some(diff) = diff
    {
        // With `CHECKSUM_COMPLETE`, `skb->csum` covers the IPv6 address
        // bytes (an unfragmented packet's L4 checksum field moves by the
        // opposite amount; here there is none). The helper fails,
        // harmlessly, for every other checksum state.
        // SAFETY: the context of a TC program is an `__sk_buff`.
        unsafe { bpf_csum_update(ctx.as_ptr().cast::<__sk_buff>(), diff.wsum()) };
    }
    Ok(())
}
