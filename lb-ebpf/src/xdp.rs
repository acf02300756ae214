//! The pipeline behind `lb_xdp` (`--xdp`): north-south service traffic
//! translated at the driver of the node's uplinks, before any skb exists.
//!
//! The parse, lookup, backend choice, conntrack and rewrite steps are
//! `tc`'s own, run over an `XdpContext` (`ctx::Ctx`): the same maps, the
//! same entries, so a flow started here continues at TC and the other way
//! round. What differs is the end:
//!
//! - a translated frame is placed by a FIB lookup and sent back out of its
//!   device (`XDP_TX`) or redirected to another one (`XDP_REDIRECT` through
//!   the devmap `LB_XDP_DEV_V1`); what the FIB cannot place (a local
//!   backend, no neighbour entry yet, a device outside the devmap, TTL
//!   about to expire, MTU exceeded) goes to the stack translated, as TC's
//!   default does with every translated packet;
//! - everything else leaves unchanged (`XDP_PASS`) and TC does what it
//!   does without XDP: not IP, VLAN tags, broadcast and multicast frames,
//!   ICMP (errors about flows are translated at TC, `icmp_err`), later
//!   fragments (first fragments are translated and recorded as at TC, so
//!   TC translates the rest), IP options and extension headers, other
//!   protocols than TCP, UDP and SCTP,
//!   refusals (TC builds the ICMP error or reset), replies that are not
//!   usable, traffic that is no service's;
//! - drops (source ranges, spoofed replies, a failed rewrite) are drops.
//!
//! Only frames that were acted on (translated or dropped) are counted under
//! their reason (`LB_REASONS`): the rest is counted at TC. Every frame is
//! counted in `LB_XDP_STATS_V1` under what was done with it.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibLookup, xdp_action},
    macros::map,
    maps::{DevMapHash, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{reason, xdp::stat};

use crate::{
    ct,
    ctx::Ctx,
    family::{Family, V4, V6},
    frag, fwd,
    hdr::{
        Eth,
        eth::{
            ALEN, DADDR_OFF, ETH_P_8021AD_BE, ETH_P_8021Q_BE, ETH_P_IP_BE, ETH_P_IPV6_BE,
            PROTO_OFF, SADDR_OFF,
        },
    },
    maps::{LB_PACKET, count_reason},
    probe,
    skb::{read, write},
    tc::{self, GO_TO_BACKEND, GO_TO_FRAG, GO_TO_ICMP},
    verdict::Verdict,
    zeroed::zeroed_in_place,
};

/// Devices a translated frame may be redirected to: ifindex -> ifindex,
/// filled by the loader (the uplinks and the node's other devices).
#[map]
static LB_XDP_DEV_V1: DevMapHash = DevMapHash::with_max_entries(lb_common::xdp::DEVMAP_ENTRIES, 0);

/// Per CPU: what was done with each frame, indexed by `xdp::stat`.
#[map]
static LB_XDP_STATS_V1: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

/// Per CPU: the FIB lookup structure (64 bytes kept off the stack).
#[map]
static LB_XDP_FIB: PerCpuArray<FibLookup> = PerCpuArray::with_max_entries(1, 0);

/// The XDP action for one frame, counted.
#[inline(always)]
pub(crate) fn run(ctx: &XdpContext) -> u32 {
    probe::begin_real();
    let (stat, action) = match try_run(ctx) {
        Ok(done) | Err(done) => done,
    };
    probe::end_real();
    if let Some(counter) = LB_XDP_STATS_V1.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot; no other writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
    action
}

/// Left to TC, unchanged.
const TO_TC: (u32, u32) = (stat::TO_TC, xdp_action::XDP_PASS);

#[inline(always)]
fn try_run(ctx: &XdpContext) -> Result<(u32, u32), (u32, u32)> {
    // Broadcast and multicast frames (the group bit of the destination)
    // are nobody's service traffic.
    // (Two bytes read: a one-byte bounds check compiles to `data < end`,
    // which the verifier does not take as a range.)
    let dst: [u8; 2] = read(ctx, DADDR_OFF).map_err(|_| TO_TC)?;
    if dst[0] & 1 != 0 {
        return Err(TO_TC);
    }
    let ether_type: u16 = read(ctx, PROTO_OFF).map_err(|_| TO_TC)?;
    if ether_type == ETH_P_8021Q_BE || ether_type == ETH_P_8021AD_BE {
        return Err(TO_TC);
    }
    let v4_packet = ether_type == ETH_P_IP_BE;
    if !v4_packet && ether_type != ETH_P_IPV6_BE {
        return Err(TO_TC);
    }
    let packet = LB_PACKET.get_ptr_mut(0).ok_or(TO_TC)?;
    // SAFETY: per-CPU scratch used by this run only.
    let packet = unsafe { &mut *packet };
    packet.answer = 0;
    packet.frag = 0;
    let mut code = if v4_packet {
        tc::v4::<Eth, false>(ctx, packet)
    } else {
        tc::v6::<Eth, false>(ctx, packet)
    };
    if packet.answer != 0 {
        if v4_packet {
            ct::answer::<V4<Eth>>(&packet.tuple4, packet.answer);
        } else {
            ct::answer::<V6<Eth>>(&packet.tuple6, packet.answer);
        }
    }
    // ICMP errors and later fragments: TC's (the parse step changed no
    // byte of them).
    if code == GO_TO_ICMP || code == GO_TO_FRAG {
        return Err(TO_TC);
    }
    if code == GO_TO_BACKEND {
        code = if v4_packet {
            tc::to_backend_sub::<V4<Eth>>(ctx, packet)
        } else {
            tc::to_backend_sub::<V6<Eth>>(ctx, packet)
        };
    }
    let verdict = Verdict::decode(code);
    let translated = verdict.reason == reason::NAT_NEW
        || verdict.reason == reason::NAT_ESTABLISHED
        || verdict.reason == reason::NAT_REPLY;
    if translated {
        count_reason(verdict.reason);
        if packet.frag & frag::FIRST != 0 {
            // A first fragment: its datagram's later fragments, which TC
            // translates, follow it (as `tc::try_run` records it).
            if v4_packet {
                frag::record::<V4<Eth>>(packet);
            } else {
                frag::record::<V6<Eth>>(packet);
            }
        }
        let stat = if v4_packet {
            forward::<V4<Eth>>(ctx)
        } else {
            forward::<V6<Eth>>(ctx)
        };
        let action = match stat {
            stat::TX => xdp_action::XDP_TX,
            stat::REDIRECT => xdp_action::XDP_REDIRECT,
            stat::DROP => xdp_action::XDP_DROP,
            _ => xdp_action::XDP_PASS,
        };
        return Ok((stat, action));
    }
    if verdict == Verdict::drop(verdict.reason) {
        count_reason(verdict.reason);
        return Ok((stat::DROP, xdp_action::XDP_DROP));
    }
    // Passed unchanged: TC counts it.
    Err(TO_TC)
}

/// Places a translated frame: `stat::TX` or `stat::REDIRECT` when it was
/// sent (MACs set, TTL decremented), `stat::PASS_TRANSLATED` when the
/// stack should (the frame's L2 and TTL untouched). A subprogram: the
/// lookup structure and the MACs stay out of the pipeline's frames.
#[inline(never)]
fn forward<F: Family>(ctx: &XdpContext) -> u32 {
    match try_forward::<F>(ctx) {
        Some(stat) => stat,
        None => stat::PASS_TRANSLATED,
    }
}

#[inline(always)]
fn try_forward<F: Family>(ctx: &XdpContext) -> Option<u32> {
    let slot = LB_XDP_FIB.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used by this run only; `bpf_fib_lookup` is
    // plain integers, bytes and their unions.
    let params: &mut FibLookup =
        unsafe { zeroed_in_place(&mut *slot.cast::<MaybeUninit<FibLookup>>()) };
    let in_ifindex = ctx.ifindex();
    params.ifindex = in_ifindex;
    F::fib_request(ctx, params)?;
    // The IP length, for the lookup's MTU check (too big: the stack
    // fragments or answers "too big").
    #[expect(clippy::cast_possible_truncation, reason = "a frame is below 64 KiB")]
    {
        params.__bindgen_anon_1.tot_len = Ctx::len(ctx).saturating_sub(hdr_l3_off()) as u16;
    }
    // Anything but a complete answer (local delivery, no neighbour entry,
    // forwarding off, blackholes, MTU): the stack.
    if fwd::fib_lookup(ctx, params, 0)? != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    let out = params.ifindex;
    if out != in_ifindex && LB_XDP_DEV_V1.get(out).is_none() {
        return None;
    }
    // SAFETY: after a successful lookup the union holds the MACs.
    let (smac, dmac): ([u8; ALEN], [u8; ALEN]) = unsafe {
        (
            params.__bindgen_anon_6.__bindgen_anon_2.smac,
            params.__bindgen_anon_6.__bindgen_anon_2.dmac,
        )
    };
    F::decrement_ttl(ctx)?;
    if write(ctx, DADDR_OFF, dmac).is_err() || write(ctx, SADDR_OFF, smac).is_err() {
        return Some(stat::DROP);
    }
    if out == in_ifindex {
        return Some(stat::TX);
    }
    // The entry was there a moment ago; gone since (a device removed):
    // the frame's L2 is already the next hop's, so it cannot go back.
    Some(match LB_XDP_DEV_V1.redirect(out, 0) {
        Ok(_) => stat::REDIRECT,
        Err(_) => stat::DROP,
    })
}

/// Offset of the IP header in the frame (`hdr::L3_OFF`), as a `u32`.
#[inline(always)]
#[expect(clippy::cast_possible_truncation, reason = "14")]
const fn hdr_l3_off() -> u32 {
    crate::hdr::L3_OFF as u32
}
