//! What differs between IPv4 and IPv6: the address, the maps, the L4
//! offset and the header work that depends on the header layout. The
//! pipeline (`tc`, `lb`, `ct`, `snat`, `xlate`, `fwd`) is written once over
//! `Family`; the map keys are `lb_common`'s generic types over its address.

use core::marker::PhantomData;

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibLookup,
    maps::{HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::TcContext,
};
use lb_common::{
    Addr4, Addr6, AffinityEntry, AffinityKey, Backend, CtEntry, CtKey, EndpointKey, FragEntry,
    FragKey, LbConfig, LbKey, LbService, RevNat, SourceRange, scope,
};

use crate::{
    csum::CsumDiff,
    ctx::Ctx,
    fwd,
    hash::flow_hash,
    hdr::{Eth, Link, ipv4, ipv6},
    maps::{
        LB4_AFF_V2, LB4_BE_V4, LB4_CT_NEW_V1, LB4_CT_V4, LB4_EP_V1, LB4_FRAG_V1, LB4_RNAT_V2,
        LB4_SRC_V1, LB4_SVC_V3, LB6_AFF_V2, LB6_BE_V4, LB6_CT_NEW_V1, LB6_CT_V4, LB6_EP_V1,
        LB6_FRAG_V1, LB6_RNAT_V2, LB6_SRC_V1, LB6_SVC_V3,
    },
    reject,
    tc::Packet,
    verdict::Verdict,
    xlate,
};

/// A flow as read from the packet (addresses and ports in network order).
/// 4-aligned: addresses are copied word by word.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub(crate) struct Tuple<A> {
    /// Source address.
    pub(crate) saddr: A,
    /// Destination address.
    pub(crate) daddr: A,
    /// Source port.
    pub(crate) sport_be: u16,
    /// Destination port.
    pub(crate) dport_be: u16,
    /// IP protocol number.
    pub(crate) proto: u8,
}

/// One address family.
pub(crate) trait Family {
    /// Address bytes in network order.
    type Addr: Copy + PartialEq + 'static;

    /// True for IPv4 (UDP zero checksum means "none").
    const IS_V4: bool;
    /// Whether the frame starts with an Ethernet header.
    const ETHERNET: bool;
    /// Offset of the IP header in the frame.
    const L3_OFF: usize;
    /// Offset of the TCP/UDP header in the frame (the device's link layer
    /// and the IP header without options or extension headers, but for an
    /// IPv6 Fragment header: packets with others are passed untranslated).
    const L4_OFF: usize;
    /// Bits in an address.
    const ADDR_BITS: u32;

    // This family's maps (see `maps`).
    fn services() -> &'static HashMap<LbKey<Self::Addr>, LbService>;
    /// The backend entry of `id` (cleared entries included: a cleared
    /// one has rev-NAT id 0, which no frontend has, so `lb::member_of`
    /// refuses it).
    fn backend(id: u32) -> Option<&'static Backend<Self::Addr>>;
    fn rev_nats() -> &'static HashMap<u32, RevNat<Self::Addr>>;
    fn conntrack() -> &'static LruHashMap<CtKey<Self::Addr>, CtEntry>;
    /// Flows the backend has not answered yet.
    fn conntrack_new() -> &'static LruHashMap<CtKey<Self::Addr>, CtEntry>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::Addr>, AffinityEntry>;
    /// (frontend, endpoint) -> that frontend's backend id.
    fn endpoints() -> &'static HashMap<EndpointKey<Self::Addr>, u32>;
    fn source_ranges() -> &'static LpmTrie<SourceRange<Self::Addr>, u8>;
    /// The first fragments' ports (see `frag`).
    fn fragments() -> &'static LruHashMap<FragKey<Self::Addr>, FragEntry>;

    /// `hash::flow_hash` of the tuple.
    fn flow_hash(tuple: &Tuple<Self::Addr>) -> u32;
    /// Source for SNAT towards remote backends (zero when not configured).
    fn node_addr(config: &LbConfig) -> Self::Addr;
    /// Source for hairpin flows.
    fn loopback(config: &LbConfig) -> Self::Addr;
    fn is_unspecified(addr: &Self::Addr) -> bool;
    /// Stores `addr` in a zeroed `CtEntry::nat_addr` (16 bytes).
    fn set_nat(nat: &mut [u8; 16], addr: Self::Addr);
    fn from_nat(addr: &[u8; 16]) -> Self::Addr;
    /// This family's tuple in the packet scratch.
    fn packet_tuple(packet: &mut Packet) -> &mut Tuple<Self::Addr>;
    /// Answers the packet with ICMP port unreachable.
    fn reject(ctx: &TcContext) -> Result<Verdict, Verdict>;
    /// Writes `new`'s addresses over `old`'s (direct packet access, IPv4
    /// header checksum included); the L4 pseudo-header difference, `None`
    /// when both are unchanged.
    fn write_addrs(
        ctx: &impl Ctx,
        old: &Tuple<Self::Addr>,
        new: &Tuple<Self::Addr>,
    ) -> Result<Option<CsumDiff>, Verdict>;
    /// Fills the family, protocol and addresses of a FIB lookup from the IP
    /// header; `None` when the packet is left to the stack (its TTL or hop
    /// limit would expire).
    fn fib_request(ctx: &impl Ctx, params: &mut FibLookup) -> Option<()>;
    /// One hop less, as routing would do (IPv4: checksum included).
    fn decrement_ttl(ctx: &impl Ctx) -> Option<()>;
}

/// The service map key of `addr:dport_be/proto`, slot `slot`.
#[inline(always)]
pub(crate) fn svc_key<A>(addr: A, dport_be: u16, slot: u16, proto: u8) -> LbKey<A> {
    LbKey {
        addr,
        dport_be,
        backend_slot: slot,
        proto,
        scope: scope::INTERNAL,
        _pad: [0; 2],
    }
}

/// The conntrack key of `tuple` in direction `dir` (`ct_dir::*`).
#[inline(always)]
pub(crate) fn ct_key<A: Copy>(t: &Tuple<A>, dir: u8) -> CtKey<A> {
    CtKey {
        saddr: t.saddr,
        daddr: t.daddr,
        sport_be: t.sport_be,
        dport_be: t.dport_be,
        proto: t.proto,
        dir,
        _pad: [0; 2],
    }
}

/// The affinity key of `client` in the affinity group `group`.
#[inline(always)]
pub(crate) fn affinity_key<A>(client: A, group: u32) -> AffinityKey<A> {
    AffinityKey { client, group }
}

/// Full-length LPM key: the frontend, then the client address.
#[inline(always)]
pub(crate) fn source_range_key<F: Family>(
    rev_nat_id: u32,
    client: F::Addr,
) -> Key<SourceRange<F::Addr>> {
    Key::new(
        32 + F::ADDR_BITS,
        SourceRange {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr: client,
        },
    )
}

/// A placeholder backend before one is chosen, with `addr` copied in
/// (zeroing the address would cost a `memset` subprogram call).
#[inline(always)]
pub(crate) fn placeholder_backend<A>(addr: A) -> Backend<A> {
    Backend {
        addr,
        port_be: 0,
        proto: 0,
        flags: 0,
        rev_nat_id: 0,
    }
}

/// IPv4 on a device of link layer `L`.
pub(crate) struct V4<L = Eth>(PhantomData<L>);
/// IPv6 on a device of link layer `L`, with `EXT` bytes of extension
/// headers before L4: 0, or a Fragment header (`frag::V6Frag`).
pub(crate) struct V6<L = Eth, const EXT: usize = 0>(PhantomData<L>);

impl<L: Link> Family for V4<L> {
    type Addr = Addr4;

    const IS_V4: bool = true;
    const ETHERNET: bool = L::ETHERNET;
    const L3_OFF: usize = L::L3_OFF;
    const L4_OFF: usize = L::L3_OFF + ipv4::HLEN;
    const ADDR_BITS: u32 = 32;

    #[inline(always)]
    fn services() -> &'static HashMap<LbKey<Addr4>, LbService> {
        &LB4_SVC_V3
    }
    #[inline(always)]
    fn backend(id: u32) -> Option<&'static Backend<Addr4>> {
        LB4_BE_V4.get(lb_common::backend_index(id))
    }
    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u32, RevNat<Addr4>> {
        &LB4_RNAT_V2
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey<Addr4>, CtEntry> {
        &LB4_CT_V4
    }
    #[inline(always)]
    fn conntrack_new() -> &'static LruHashMap<CtKey<Addr4>, CtEntry> {
        &LB4_CT_NEW_V1
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Addr4>, AffinityEntry> {
        &LB4_AFF_V2
    }
    #[inline(always)]
    fn endpoints() -> &'static HashMap<EndpointKey<Addr4>, u32> {
        &LB4_EP_V1
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange<Addr4>, u8> {
        &LB4_SRC_V1
    }
    #[inline(always)]
    fn fragments() -> &'static LruHashMap<FragKey<Addr4>, FragEntry> {
        &LB4_FRAG_V1
    }
    #[inline(always)]
    fn flow_hash(t: &Tuple<Addr4>) -> u32 {
        flow_hash(&t.saddr, &t.daddr, t.sport_be, t.dport_be, t.proto)
    }
    #[inline(always)]
    fn node_addr(config: &LbConfig) -> Addr4 {
        config.node_addr4
    }
    #[inline(always)]
    fn loopback(config: &LbConfig) -> Addr4 {
        config.loopback4
    }
    #[inline(always)]
    fn is_unspecified(addr: &Addr4) -> bool {
        u32::from_ne_bytes(*addr) == 0
    }
    #[inline(always)]
    fn set_nat(nat: &mut [u8; 16], addr: Addr4) {
        nat[0] = addr[0];
        nat[1] = addr[1];
        nat[2] = addr[2];
        nat[3] = addr[3];
    }
    #[inline(always)]
    fn from_nat(addr: &[u8; 16]) -> Addr4 {
        [addr[0], addr[1], addr[2], addr[3]]
    }
    #[inline(always)]
    fn packet_tuple(packet: &mut Packet) -> &mut Tuple<Addr4> {
        &mut packet.tuple4
    }
    #[inline(always)]
    fn reject(ctx: &TcContext) -> Result<Verdict, Verdict> {
        reject::reject4::<L>(ctx)
    }
    #[inline(always)]
    fn write_addrs(
        ctx: &impl Ctx,
        old: &Tuple<Addr4>,
        new: &Tuple<Addr4>,
    ) -> Result<Option<CsumDiff>, Verdict> {
        xlate::write_addrs4::<L>(ctx, old, new)
    }
    #[inline(always)]
    fn fib_request(ctx: &impl Ctx, params: &mut FibLookup) -> Option<()> {
        fwd::fib_request4::<L>(ctx, params)
    }
    #[inline(always)]
    fn decrement_ttl(ctx: &impl Ctx) -> Option<()> {
        fwd::decrement_ttl4::<L>(ctx)
    }
}

impl<L: Link, const EXT: usize> Family for V6<L, EXT> {
    type Addr = Addr6;

    const IS_V4: bool = false;
    const ETHERNET: bool = L::ETHERNET;
    const L3_OFF: usize = L::L3_OFF;
    const L4_OFF: usize = L::L3_OFF + ipv6::HLEN + EXT;
    const ADDR_BITS: u32 = 128;

    #[inline(always)]
    fn services() -> &'static HashMap<LbKey<Addr6>, LbService> {
        &LB6_SVC_V3
    }
    #[inline(always)]
    fn backend(id: u32) -> Option<&'static Backend<Addr6>> {
        LB6_BE_V4.get(lb_common::backend_index(id))
    }
    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u32, RevNat<Addr6>> {
        &LB6_RNAT_V2
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey<Addr6>, CtEntry> {
        &LB6_CT_V4
    }
    #[inline(always)]
    fn conntrack_new() -> &'static LruHashMap<CtKey<Addr6>, CtEntry> {
        &LB6_CT_NEW_V1
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Addr6>, AffinityEntry> {
        &LB6_AFF_V2
    }
    #[inline(always)]
    fn endpoints() -> &'static HashMap<EndpointKey<Addr6>, u32> {
        &LB6_EP_V1
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange<Addr6>, u8> {
        &LB6_SRC_V1
    }
    #[inline(always)]
    fn fragments() -> &'static LruHashMap<FragKey<Addr6>, FragEntry> {
        &LB6_FRAG_V1
    }
    #[inline(always)]
    fn flow_hash(t: &Tuple<Addr6>) -> u32 {
        flow_hash(&t.saddr, &t.daddr, t.sport_be, t.dport_be, t.proto)
    }
    #[inline(always)]
    fn node_addr(config: &LbConfig) -> Addr6 {
        config.node_addr6
    }
    #[inline(always)]
    fn loopback(config: &LbConfig) -> Addr6 {
        config.loopback6
    }
    #[inline(always)]
    fn is_unspecified(addr: &Addr6) -> bool {
        u128::from_ne_bytes(*addr) == 0
    }
    #[inline(always)]
    fn set_nat(nat: &mut [u8; 16], addr: Addr6) {
        *nat = addr;
    }
    #[inline(always)]
    fn from_nat(addr: &[u8; 16]) -> Addr6 {
        *addr
    }
    #[inline(always)]
    fn packet_tuple(packet: &mut Packet) -> &mut Tuple<Addr6> {
        &mut packet.tuple6
    }
    #[inline(always)]
    fn reject(ctx: &TcContext) -> Result<Verdict, Verdict> {
        // A first fragment's port unreachable would have to quote the
        // Fragment header and the UDP header for the client's kernel to
        // find its socket; the reply quotes the fixed header and 8 bytes.
        if crate::frag::has_frag_header::<Self>(ctx) {
            return Err(Verdict::drop(lb_common::reason::DROP_REJECT_FAILED));
        }
        reject::reject6::<L>(ctx)
    }
    #[inline(always)]
    fn write_addrs(
        ctx: &impl Ctx,
        old: &Tuple<Addr6>,
        new: &Tuple<Addr6>,
    ) -> Result<Option<CsumDiff>, Verdict> {
        xlate::write_addrs6::<L>(ctx, old, new)
    }
    #[inline(always)]
    fn fib_request(ctx: &impl Ctx, params: &mut FibLookup) -> Option<()> {
        fwd::fib_request6::<L>(ctx, params)
    }
    #[inline(always)]
    fn decrement_ttl(ctx: &impl Ctx) -> Option<()> {
        fwd::decrement_ttl6::<L>(ctx)
    }
}
