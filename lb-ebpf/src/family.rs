//! What differs between IPv4 and IPv6: key layouts, maps, offsets and the
//! address rewrite. The translation logic in `tc` is written once over this.

use aya_ebpf::{
    maps::{HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::TcContext,
};
use lb_common::{
    Affinity4Key, Affinity6Key, AffinityEntry, Ct4Key, Ct6Key, CtEntry, Lb4Backend, Lb4Key,
    Lb4RevNat, Lb6Backend, Lb6Key, Lb6RevNat, LbConfig, LbService, SourceRange4, SourceRange6,
};

use crate::{
    ct::{hash_finish, hash_mix},
    maps::{
        LB4_AFF_V1, LB4_BE_V2, LB4_CT_V3, LB4_RNAT_V2, LB4_SRC_V1, LB4_SVC_V2, LB6_AFF_V1,
        LB6_BE_V2, LB6_CT_V3, LB6_RNAT_V2, LB6_SRC_V1, LB6_SVC_V2,
    },
    nat::{self, CsumDiff},
    parse::{ETH_HLEN, Ipv4Hdr, Ipv6Hdr, Verdict},
    reject,
};

/// A flow as read from the packet (addresses and ports in network order).
/// 4-aligned: addresses are copied word by word.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct Tuple<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
}

/// The parsed packet, handed from the parse step to the to-backend step
/// (per-CPU scratch: see `tc::try_lb`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Packet {
    pub tuple4: Tuple<[u8; 4]>,
    pub tuple6: Tuple<[u8; 16]>,
    pub frontend: LbService,
    pub tcp_flags: u8,
}

/// One address family.
pub trait Family {
    /// Address bytes in network order.
    type Addr: Copy + PartialEq;
    type SvcKey: 'static;
    type CtKey: 'static;
    type Backend: Copy + 'static;
    type RevNat: Copy + 'static;
    type AffinityKey: 'static;
    type SourceRange: 'static;

    /// True for IPv4 (UDP zero checksum means "none").
    const IS_V4: bool;
    /// Offset of the TCP/UDP header in the frame (IPv4 options and IPv6
    /// extension headers are passed untranslated, so it is fixed).
    const L4_OFF: usize;

    fn services() -> &'static HashMap<Self::SvcKey, LbService>;
    fn backends() -> &'static HashMap<u32, Self::Backend>;
    fn rev_nats() -> &'static HashMap<u32, Self::RevNat>;
    fn conntrack() -> &'static LruHashMap<Self::CtKey, CtEntry>;
    fn affinity() -> &'static LruHashMap<Self::AffinityKey, AffinityEntry>;
    fn source_ranges() -> &'static LpmTrie<Self::SourceRange, u8>;

    fn svc_key(addr: Self::Addr, dport_be: u16, slot: u16, proto: u8) -> Self::SvcKey;
    fn ct_key(tuple: &Tuple<Self::Addr>, dir: u8) -> Self::CtKey;
    fn affinity_key(client: Self::Addr, rev_nat_id: u32) -> Self::AffinityKey;
    /// Full-length LPM key: the frontend, then the client address.
    fn source_range_key(rev_nat_id: u32, client: Self::Addr) -> Key<Self::SourceRange>;
    /// Backend address, port (network order) and `backend_flags`.
    fn backend_target(backend: &Self::Backend) -> (Self::Addr, u16, u8);
    fn rev_nat_target(rev_nat: &Self::RevNat) -> (Self::Addr, u16);
    fn flow_hash(tuple: &Tuple<Self::Addr>) -> u32;
    /// Source for SNAT towards remote backends (zero when not configured).
    fn node_addr(config: &LbConfig) -> Self::Addr;
    /// Source for hairpin flows.
    fn loopback(config: &LbConfig) -> Self::Addr;
    fn is_unspecified(addr: &Self::Addr) -> bool;
    /// Stores `addr` in a zeroed `CtEntry::nat_addr` (16 bytes).
    fn set_nat(nat: &mut [u8; 16], addr: Self::Addr);
    fn from_nat(addr: &[u8; 16]) -> Self::Addr;
    /// A placeholder backend before one is chosen, with `addr` copied in
    /// (zeroing the address would cost a `memset` subprogram call).
    fn placeholder_backend(addr: Self::Addr) -> Self::Backend;
    /// This family's tuple in the packet scratch.
    fn packet_tuple(packet: &mut Packet) -> &mut Tuple<Self::Addr>;
    /// Answers the packet with ICMP port unreachable.
    fn reject(ctx: &TcContext) -> Result<Verdict, Verdict>;
    /// Writes `new`'s addresses over `old`'s (direct packet access, IPv4
    /// header checksum included); the L4 pseudo-header difference, `None`
    /// when both are unchanged.
    fn write_addrs(
        ctx: &TcContext,
        old: &Tuple<Self::Addr>,
        new: &Tuple<Self::Addr>,
    ) -> Result<Option<CsumDiff>, Verdict>;
}

/// IPv4.
pub struct V4;
/// IPv6.
pub struct V6;

impl Family for V4 {
    type Addr = [u8; 4];
    type SvcKey = Lb4Key;
    type CtKey = Ct4Key;
    type Backend = Lb4Backend;
    type RevNat = Lb4RevNat;
    type AffinityKey = Affinity4Key;
    type SourceRange = SourceRange4;

    const IS_V4: bool = true;
    const L4_OFF: usize = ETH_HLEN + core::mem::size_of::<Ipv4Hdr>();

    #[inline(always)]
    fn services() -> &'static HashMap<Lb4Key, LbService> {
        &LB4_SVC_V2
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Lb4Backend> {
        &LB4_BE_V2
    }
    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u32, Lb4RevNat> {
        &LB4_RNAT_V2
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Ct4Key, CtEntry> {
        &LB4_CT_V3
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<Affinity4Key, AffinityEntry> {
        &LB4_AFF_V1
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange4, u8> {
        &LB4_SRC_V1
    }
    #[inline(always)]
    fn affinity_key(client: [u8; 4], rev_nat_id: u32) -> Affinity4Key {
        Affinity4Key { client, rev_nat_id }
    }
    #[inline(always)]
    fn source_range_key(rev_nat_id: u32, client: [u8; 4]) -> Key<SourceRange4> {
        Key::new(
            64,
            SourceRange4 {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr: client,
            },
        )
    }
    #[inline(always)]
    fn svc_key(addr: [u8; 4], dport_be: u16, slot: u16, proto: u8) -> Lb4Key {
        Lb4Key {
            addr,
            dport_be,
            backend_slot: slot,
            proto,
            scope: lb_common::scope::INTERNAL,
            _pad: [0; 2],
        }
    }
    #[inline(always)]
    fn ct_key(t: &Tuple<[u8; 4]>, dir: u8) -> Ct4Key {
        Ct4Key {
            saddr: t.saddr,
            daddr: t.daddr,
            sport_be: t.sport_be,
            dport_be: t.dport_be,
            proto: t.proto,
            dir,
            _pad: [0; 2],
        }
    }
    #[inline(always)]
    fn backend_target(b: &Lb4Backend) -> ([u8; 4], u16, u8) {
        (b.addr, b.port_be, b.flags)
    }
    #[inline(always)]
    fn rev_nat_target(r: &Lb4RevNat) -> ([u8; 4], u16) {
        (r.addr, r.port_be)
    }
    #[inline(always)]
    fn flow_hash(t: &Tuple<[u8; 4]>) -> u32 {
        let mut h = hash_mix(0x5f1b_6c3d, u32::from_ne_bytes(t.saddr));
        h = hash_mix(h, u32::from_ne_bytes(t.daddr));
        h = hash_mix(h, (u32::from(t.sport_be) << 16) | u32::from(t.dport_be));
        hash_finish(hash_mix(h, u32::from(t.proto)))
    }
    #[inline(always)]
    fn node_addr(config: &LbConfig) -> [u8; 4] {
        config.node_addr4
    }
    #[inline(always)]
    fn loopback(config: &LbConfig) -> [u8; 4] {
        config.loopback4
    }
    #[inline(always)]
    fn is_unspecified(addr: &[u8; 4]) -> bool {
        u32::from_ne_bytes(*addr) == 0
    }
    #[inline(always)]
    fn set_nat(nat: &mut [u8; 16], addr: [u8; 4]) {
        nat[0] = addr[0];
        nat[1] = addr[1];
        nat[2] = addr[2];
        nat[3] = addr[3];
    }
    #[inline(always)]
    fn from_nat(addr: &[u8; 16]) -> [u8; 4] {
        [addr[0], addr[1], addr[2], addr[3]]
    }
    #[inline(always)]
    fn packet_tuple(packet: &mut Packet) -> &mut Tuple<[u8; 4]> {
        &mut packet.tuple4
    }
    #[inline(always)]
    fn placeholder_backend(addr: [u8; 4]) -> Lb4Backend {
        Lb4Backend {
            addr,
            port_be: 0,
            proto: 0,
            flags: 0,
        }
    }
    #[inline(always)]
    fn reject(ctx: &TcContext) -> Result<Verdict, Verdict> {
        reject::reject4(ctx)
    }
    #[inline(always)]
    fn write_addrs(
        ctx: &TcContext,
        old: &Tuple<[u8; 4]>,
        new: &Tuple<[u8; 4]>,
    ) -> Result<Option<CsumDiff>, Verdict> {
        nat::write_addrs4(ctx, old, new)
    }
}

impl Family for V6 {
    type Addr = [u8; 16];
    type SvcKey = Lb6Key;
    type CtKey = Ct6Key;
    type Backend = Lb6Backend;
    type RevNat = Lb6RevNat;
    type AffinityKey = Affinity6Key;
    type SourceRange = SourceRange6;

    const IS_V4: bool = false;
    const L4_OFF: usize = ETH_HLEN + core::mem::size_of::<Ipv6Hdr>();

    #[inline(always)]
    fn services() -> &'static HashMap<Lb6Key, LbService> {
        &LB6_SVC_V2
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Lb6Backend> {
        &LB6_BE_V2
    }
    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u32, Lb6RevNat> {
        &LB6_RNAT_V2
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Ct6Key, CtEntry> {
        &LB6_CT_V3
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<Affinity6Key, AffinityEntry> {
        &LB6_AFF_V1
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange6, u8> {
        &LB6_SRC_V1
    }
    #[inline(always)]
    fn affinity_key(client: [u8; 16], rev_nat_id: u32) -> Affinity6Key {
        Affinity6Key { client, rev_nat_id }
    }
    #[inline(always)]
    fn source_range_key(rev_nat_id: u32, client: [u8; 16]) -> Key<SourceRange6> {
        Key::new(
            160,
            SourceRange6 {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr: client,
            },
        )
    }
    #[inline(always)]
    fn svc_key(addr: [u8; 16], dport_be: u16, slot: u16, proto: u8) -> Lb6Key {
        Lb6Key {
            addr,
            dport_be,
            backend_slot: slot,
            proto,
            scope: lb_common::scope::INTERNAL,
            _pad: [0; 2],
        }
    }
    #[inline(always)]
    fn ct_key(t: &Tuple<[u8; 16]>, dir: u8) -> Ct6Key {
        Ct6Key {
            saddr: t.saddr,
            daddr: t.daddr,
            sport_be: t.sport_be,
            dport_be: t.dport_be,
            proto: t.proto,
            dir,
            _pad: [0; 2],
        }
    }
    #[inline(always)]
    fn backend_target(b: &Lb6Backend) -> ([u8; 16], u16, u8) {
        (b.addr, b.port_be, b.flags)
    }
    #[inline(always)]
    fn rev_nat_target(r: &Lb6RevNat) -> ([u8; 16], u16) {
        (r.addr, r.port_be)
    }
    #[inline(always)]
    fn flow_hash(t: &Tuple<[u8; 16]>) -> u32 {
        let mut h = 0x5f1b_6c3d;
        let mut i = 0;
        while i < 16 {
            let s = [t.saddr[i], t.saddr[i + 1], t.saddr[i + 2], t.saddr[i + 3]];
            let d = [t.daddr[i], t.daddr[i + 1], t.daddr[i + 2], t.daddr[i + 3]];
            h = hash_mix(h, u32::from_ne_bytes(s));
            h = hash_mix(h, u32::from_ne_bytes(d));
            i += 4;
        }
        h = hash_mix(h, (u32::from(t.sport_be) << 16) | u32::from(t.dport_be));
        hash_finish(hash_mix(h, u32::from(t.proto)))
    }
    #[inline(always)]
    fn node_addr(config: &LbConfig) -> [u8; 16] {
        config.node_addr6
    }
    #[inline(always)]
    fn loopback(config: &LbConfig) -> [u8; 16] {
        config.loopback6
    }
    #[inline(always)]
    fn is_unspecified(addr: &[u8; 16]) -> bool {
        u128::from_ne_bytes(*addr) == 0
    }
    #[inline(always)]
    fn set_nat(nat: &mut [u8; 16], addr: [u8; 16]) {
        *nat = addr;
    }
    #[inline(always)]
    fn from_nat(addr: &[u8; 16]) -> [u8; 16] {
        *addr
    }
    #[inline(always)]
    fn packet_tuple(packet: &mut Packet) -> &mut Tuple<[u8; 16]> {
        &mut packet.tuple6
    }
    #[inline(always)]
    fn placeholder_backend(addr: [u8; 16]) -> Lb6Backend {
        Lb6Backend {
            addr,
            port_be: 0,
            proto: 0,
            flags: 0,
        }
    }
    #[inline(always)]
    fn reject(ctx: &TcContext) -> Result<Verdict, Verdict> {
        reject::reject6(ctx)
    }
    #[inline(always)]
    fn write_addrs(
        ctx: &TcContext,
        old: &Tuple<[u8; 16]>,
        new: &Tuple<[u8; 16]>,
    ) -> Result<Option<CsumDiff>, Verdict> {
        nat::write_addrs6(ctx, old, new)
    }
}
