//! What differs between IPv4 and IPv6: key layouts, maps, offsets and the
//! address rewrite. The translation logic in `tc` is written once over this.

use aya_ebpf::{
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};
use lb_common::{
    Ct4Key, Ct6Key, CtEntry, Lb4Backend, Lb4Key, Lb4RevNat, Lb6Backend, Lb6Key, Lb6RevNat,
    LbService,
};

use crate::{
    ct::{hash_finish, hash_mix},
    maps::{
        LB4_BE_V1, LB4_CT_V1, LB4_RNAT_V1, LB4_SVC_V1, LB6_BE_V1, LB6_CT_V1, LB6_RNAT_V1,
        LB6_SVC_V1,
    },
    nat::{self, IP4_DADDR_OFF, IP4_SADDR_OFF, IP6_DADDR_OFF, IP6_SADDR_OFF, L4Csum},
    parse::Verdict,
};

/// A flow as read from the packet (addresses and ports in network order).
#[derive(Clone, Copy)]
pub struct Tuple<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
}

/// One address family.
pub trait Family {
    /// Address bytes in network order.
    type Addr: Copy + PartialEq;
    type SvcKey: 'static;
    type CtKey: 'static;
    type Backend: Copy + 'static;
    type RevNat: Copy + 'static;

    /// True for IPv4 (UDP zero checksum means "none").
    const IS_V4: bool;
    /// Source address offset in the frame.
    const SADDR_OFF: usize;
    /// Destination address offset in the frame.
    const DADDR_OFF: usize;

    fn services() -> &'static HashMap<Self::SvcKey, LbService>;
    fn backends() -> &'static HashMap<u32, Self::Backend>;
    fn rev_nats() -> &'static HashMap<u32, Self::RevNat>;
    fn conntrack() -> &'static LruHashMap<Self::CtKey, CtEntry>;

    fn svc_key(addr: Self::Addr, dport_be: u16, slot: u16, proto: u8) -> Self::SvcKey;
    fn ct_key(tuple: &Tuple<Self::Addr>, dir: u8) -> Self::CtKey;
    fn backend_target(backend: &Self::Backend) -> (Self::Addr, u16);
    fn rev_nat_target(rev_nat: &Self::RevNat) -> (Self::Addr, u16);
    fn flow_hash(tuple: &Tuple<Self::Addr>) -> u32;
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: Self::Addr,
        new: Self::Addr,
        csum: L4Csum,
    ) -> Result<(), Verdict>;
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

    const IS_V4: bool = true;
    const SADDR_OFF: usize = IP4_SADDR_OFF;
    const DADDR_OFF: usize = IP4_DADDR_OFF;

    #[inline(always)]
    fn services() -> &'static HashMap<Lb4Key, LbService> {
        &LB4_SVC_V1
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Lb4Backend> {
        &LB4_BE_V1
    }
    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u32, Lb4RevNat> {
        &LB4_RNAT_V1
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Ct4Key, CtEntry> {
        &LB4_CT_V1
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
    fn backend_target(b: &Lb4Backend) -> ([u8; 4], u16) {
        (b.addr, b.port_be)
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
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: [u8; 4],
        new: [u8; 4],
        csum: L4Csum,
    ) -> Result<(), Verdict> {
        nat::rewrite_addr4(ctx, off, old, new, csum)
    }
}

impl Family for V6 {
    type Addr = [u8; 16];
    type SvcKey = Lb6Key;
    type CtKey = Ct6Key;
    type Backend = Lb6Backend;
    type RevNat = Lb6RevNat;

    const IS_V4: bool = false;
    const SADDR_OFF: usize = IP6_SADDR_OFF;
    const DADDR_OFF: usize = IP6_DADDR_OFF;

    #[inline(always)]
    fn services() -> &'static HashMap<Lb6Key, LbService> {
        &LB6_SVC_V1
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Lb6Backend> {
        &LB6_BE_V1
    }
    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u32, Lb6RevNat> {
        &LB6_RNAT_V1
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Ct6Key, CtEntry> {
        &LB6_CT_V1
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
    fn backend_target(b: &Lb6Backend) -> ([u8; 16], u16) {
        (b.addr, b.port_be)
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
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: [u8; 16],
        new: [u8; 16],
        csum: L4Csum,
    ) -> Result<(), Verdict> {
        nat::rewrite_addr6(ctx, off, old, new, csum)
    }
}
