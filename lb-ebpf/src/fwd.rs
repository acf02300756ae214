//! Forwarding of translated packets by the datapath itself: a FIB lookup,
//! then a redirect to the egress interface (with neighbour resolution by
//! the kernel when the next hop's MAC is not known yet).
//!
//! Why: the kernel's input routing drops an IPv4 packet whose source is one
//! of the node's own addresses as a "martian" (`accept_local` = 0), and
//! that is exactly what source NAT of external traffic and the `NodePort`
//! address restored on its replies produce. Redirecting after the FIB
//! lookup skips input routing (and is cheaper). Whatever the lookup cannot
//! place (local delivery, no route, forwarding off, MTU exceeded, TTL about
//! to expire) goes to the stack as before.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT,
        bpf_fib_lookup as FibLookup,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::{
    nat::{CsumDiff, IP4_CSUM_OFF},
    parse::{ETH_HLEN, Ipv4Hdr, Ipv6Hdr, Verdict, read, write, zeroed_in_place},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Sends the (already translated) packet towards its destination; returns
/// `verdict` unchanged when the stack should do it.
#[inline(never)]
pub fn forward(ctx: &TcContext, v4: bool, verdict: u64) -> u64 {
    let verdict = Verdict::decode(verdict);
    match try_forward(ctx, v4) {
        Some(action) => Verdict {
            action,
            reason: verdict.reason,
        }
        .encode(),
        None => verdict.encode(),
    }
}

#[inline(always)]
fn try_forward(ctx: &TcContext, v4: bool) -> Option<i32> {
    let mut slot = MaybeUninit::uninit();
    // SAFETY: `bpf_fib_lookup` is plain integers, bytes and their unions.
    let params: &mut FibLookup = unsafe { zeroed_in_place(&mut slot) };
    // SAFETY: the context of a TC program is an `__sk_buff`.
    params.ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    if v4 {
        let ip: Ipv4Hdr = read(ctx, ETH_HLEN).ok()?;
        if ip.ttl <= 1 {
            return None;
        }
        params.family = AF_INET;
        params.l4_protocol = ip.proto;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.saddr);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.daddr);
    } else {
        let ip: Ipv6Hdr = read(ctx, ETH_HLEN).ok()?;
        if ip.hop_limit <= 1 {
            return None;
        }
        params.family = AF_INET6;
        params.l4_protocol = ip.next_hdr;
        params.__bindgen_anon_3.ipv6_src = words(&ip.saddr);
        params.__bindgen_anon_4.ipv6_dst = words(&ip.daddr);
    }
    // SAFETY: `params` is a properly sized, initialised lookup structure.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            core::ptr::from_mut(params),
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    };
    let rc = u32::try_from(rc).ok()?;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    decrement_ttl(ctx, v4)?;
    let action = if rc == BPF_FIB_LKUP_RET_SUCCESS {
        // SAFETY: after a successful lookup the union holds the MACs.
        let (smac, dmac) = unsafe {
            (
                params.__bindgen_anon_6.__bindgen_anon_2.smac,
                params.__bindgen_anon_6.__bindgen_anon_2.dmac,
            )
        };
        write(ctx, 0, dmac).ok()?;
        write(ctx, 6, smac).ok()?;
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(params.ifindex, 0) }
    } else {
        // SAFETY: no parameters: the kernel resolves the next hop itself.
        unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) }
    };
    (action == i64::from(TC_ACT_REDIRECT)).then_some(TC_ACT_REDIRECT as i32)
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// IPv4 TTL and IPv6 hop limit offsets in the frame.
const IP4_TTL_OFF: usize = ETH_HLEN + 8;
const IP6_HOP_LIMIT_OFF: usize = ETH_HLEN + 7;

/// What routing would do: one hop less (and the IPv4 checksum with it).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, v4: bool) -> Option<()> {
    if v4 {
        // TTL shares a 16-bit word with the protocol byte.
        let old: [u8; 2] = read(ctx, IP4_TTL_OFF).ok()?;
        let new = [old[0] - 1, old[1]];
        let check: u16 = read(ctx, IP4_CSUM_OFF).ok()?;
        let diff = CsumDiff::NONE.word(
            u32::from(u16::from_ne_bytes(old)),
            u32::from(u16::from_ne_bytes(new)),
        );
        write(ctx, IP4_TTL_OFF, new).ok()?;
        write(ctx, IP4_CSUM_OFF, diff.apply(check)).ok()
    } else {
        let hop_limit: u8 = read(ctx, IP6_HOP_LIMIT_OFF).ok()?;
        write(ctx, IP6_HOP_LIMIT_OFF, hop_limit - 1).ok()
    }
}
