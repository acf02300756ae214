//! The TC hook: parse, then translate towards a service or back from a
//! backend. One verdict point: `lb_tc`.

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::{CtEntry, LbService, ct_dir, proto, reason};

use crate::{
    ct,
    family::{Family, Tuple, V4, V6},
    maps::{count_reason, count_service},
    nat::{L4Csum, rewrite_port},
    parse::{
        ETH_HLEN, ETH_P_IP_BE, ETH_P_IPV6_BE, Ipv4Hdr, Ipv6Hdr, Ports, TCP_FLAGS_OFF, TCP_HLEN,
        UDP_CSUM_OFF, UDP_HLEN, Verdict, linearize_headers, ptr_at, read,
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

#[inline(always)]
fn try_lb(ctx: &TcContext) -> Result<Verdict, Verdict> {
    linearize_headers(ctx);
    let ether_type: u16 = read(ctx, 12)?;
    if ether_type == ETH_P_IP_BE {
        try_v4(ctx)
    } else if ether_type == ETH_P_IPV6_BE {
        try_v6(ctx)
    } else {
        Ok(Verdict::pass(reason::PASS_NOT_IP))
    }
}

#[inline(always)]
fn try_v4(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let ip: Ipv4Hdr = read(ctx, ETH_HLEN)?;
    if ip.version_ihl >> 4 != 4 || ip.version_ihl & 0x0f < 5 {
        return Ok(Verdict::pass(reason::PASS_TRUNCATED));
    }
    if ip.version_ihl & 0x0f != 5 {
        return Ok(Verdict::pass(reason::PASS_IP_OPTIONS));
    }
    if u16::from_be(ip.frag_off_be) & IP4_FRAG_MASK != 0 {
        return Ok(Verdict::pass(reason::PASS_FRAGMENT));
    }
    let l4_off = ETH_HLEN + core::mem::size_of::<Ipv4Hdr>();
    translate::<V4>(ctx, ip.saddr, ip.daddr, ip.proto, l4_off)
}

#[inline(always)]
fn try_v6(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let ip: Ipv6Hdr = read(ctx, ETH_HLEN)?;
    if ip.vtc_flow[0] >> 4 != 6 {
        return Ok(Verdict::pass(reason::PASS_TRUNCATED));
    }
    let next = ip.next_hdr;
    if next == IP6_FRAGMENT {
        return Ok(Verdict::pass(reason::PASS_FRAGMENT));
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
        return Ok(Verdict::pass(reason::PASS_EXT_HDR));
    }
    let l4_off = ETH_HLEN + core::mem::size_of::<Ipv6Hdr>();
    translate::<V6>(ctx, ip.saddr, ip.daddr, next, l4_off)
}

/// Common TCP/UDP handling for both families.
#[inline(always)]
fn translate<F: Family>(
    ctx: &TcContext,
    saddr: F::Addr,
    daddr: F::Addr,
    l4_proto: u8,
    l4_off: usize,
) -> Result<Verdict, Verdict> {
    let tcp_flags = if l4_proto == proto::TCP {
        ptr_at::<[u8; TCP_HLEN]>(ctx, l4_off)?;
        read::<u8>(ctx, l4_off + TCP_FLAGS_OFF)?
    } else if l4_proto == proto::UDP {
        ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off)?;
        if !F::IS_V4 && read::<u16>(ctx, l4_off + UDP_CSUM_OFF)? == 0 {
            return Ok(Verdict::pass(reason::PASS_UDP6_ZERO_CSUM));
        }
        0
    } else {
        return Ok(Verdict::pass(reason::PASS_OTHER_PROTO));
    };
    let ports: Ports = read(ctx, l4_off)?;
    let tuple = Tuple {
        saddr,
        daddr,
        sport_be: ports.sport_be,
        dport_be: ports.dport_be,
        proto: l4_proto,
    };
    let csum = L4Csum::new(l4_proto, l4_off, F::IS_V4);

    let frontend_key = F::svc_key(daddr, ports.dport_be, 0, l4_proto);
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { F::services().get(&frontend_key) } {
        let frontend = *frontend;
        return to_backend::<F>(ctx, &tuple, &frontend, tcp_flags, l4_off, csum);
    }
    let reply_key = F::ct_key(&tuple, ct_dir::REPLY);
    if let Some(entry) = F::conntrack().get_ptr_mut(&reply_key) {
        return from_backend::<F>(ctx, &tuple, entry, tcp_flags, l4_off, csum);
    }
    Ok(Verdict::pass(reason::PASS_NO_SERVICE))
}

/// A packet to a service: keep the flow's backend or choose one, then DNAT.
#[inline(always)]
fn to_backend<F: Family>(
    ctx: &TcContext,
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    tcp_flags: u8,
    l4_off: usize,
    csum: L4Csum,
) -> Result<Verdict, Verdict> {
    if frontend.count == 0 {
        return Err(Verdict::drop(reason::DROP_NO_BACKEND));
    }
    let now = ct::now_ns();
    let ct_key = F::ct_key(tuple, ct_dir::SERVICE);
    let mut chosen: Option<(u32, F::Backend)> = None;
    let mut refreshed = false;
    if let Some(entry) = F::conntrack().get_ptr_mut(&ct_key) {
        // SAFETY: map value pointer; read once.
        let current = unsafe { *entry };
        if current.rev_nat_id == frontend.rev_nat_id
            && ct::usable(&current, tuple.proto, tcp_flags, now)
        {
            // SAFETY: the value is copied out at once.
            if let Some(backend) = unsafe { F::backends().get(&current.backend_id) } {
                chosen = Some((current.backend_id, *backend));
                refreshed = ct::touch(entry, tcp_flags, now);
            }
        }
    }
    let established = chosen.is_some();
    let (backend_id, backend) = match chosen {
        Some(found) => found,
        None => {
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
            let entry = ct::new_entry(backend_id, frontend.rev_nat_id, tcp_flags, now);
            if F::conntrack().insert(&ct_key, &entry, 0).is_err() {
                return Err(Verdict::drop(reason::DROP_CT_INSERT));
            }
            (backend_id, *backend)
        }
    };
    let (backend_addr, backend_port_be) = F::backend_target(&backend);
    if !established || refreshed {
        // (Re)create the reply entry: on a new flow, and about once a second
        // so that it outlives LRU pressure and one-way quiet periods.
        let reply = Tuple {
            saddr: backend_addr,
            daddr: tuple.saddr,
            sport_be: backend_port_be,
            dport_be: tuple.sport_be,
            proto: tuple.proto,
        };
        let entry = ct::new_entry(backend_id, frontend.rev_nat_id, 0, now);
        if F::conntrack()
            .insert(&F::ct_key(&reply, ct_dir::REPLY), &entry, 0)
            .is_err()
        {
            return Err(Verdict::drop(reason::DROP_CT_INSERT));
        }
    }
    F::rewrite_addr(ctx, F::DADDR_OFF, tuple.daddr, backend_addr, csum)?;
    rewrite_port(ctx, l4_off + 2, tuple.dport_be, backend_port_be, csum)?;
    count_service(frontend.rev_nat_id, ctx.len());
    Ok(Verdict::pass(if established {
        reason::NAT_ESTABLISHED
    } else {
        reason::NAT_NEW
    }))
}

/// A packet matching a reply entry: restore the service address as source.
#[inline(always)]
fn from_backend<F: Family>(
    ctx: &TcContext,
    tuple: &Tuple<F::Addr>,
    entry: *mut CtEntry,
    tcp_flags: u8,
    l4_off: usize,
    csum: L4Csum,
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
    F::rewrite_addr(ctx, F::SADDR_OFF, tuple.saddr, vip, csum)?;
    rewrite_port(ctx, l4_off, tuple.sport_be, vport_be, csum)?;
    Ok(Verdict::pass(reason::NAT_REPLY))
}

/// Does nothing: the floor that `lb_tc`'s per-packet cost is measured
/// against (same hook, same packet). Never attached by the agent.
#[classifier]
pub fn lb_floor(_ctx: TcContext) -> i32 {
    Verdict::pass(reason::PASS_NO_SERVICE).action
}
