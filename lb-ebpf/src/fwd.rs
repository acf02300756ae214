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
        __sk_buff, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibLookup,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::{
    csum::CsumDiff,
    family::Family,
    hdr::{
        L3_OFF,
        eth::{ALEN, DADDR_OFF, SADDR_OFF},
        ipv4::{self, Ipv4Hdr},
        ipv6::{self, Ipv6Hdr},
    },
    skb::{read, write},
    verdict::{TC_ACT_REDIRECT, Verdict},
    zeroed::zeroed_in_place,
};

/// Address families of the FIB lookup (linux/socket.h).
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Sends the (already translated) packet towards its destination; returns
/// `verdict` (encoded) unchanged when the stack should do it, else the
/// same reason with the redirect action.
#[inline(never)]
pub(crate) fn forward<F: Family>(ctx: &TcContext, verdict: u64) -> u64 {
    let verdict = Verdict::decode(verdict);
    if try_forward::<F>(ctx).is_some() {
        Verdict::redirect(verdict.reason).encode()
    } else {
        verdict.encode()
    }
}

/// `Some` when the packet was redirected.
#[inline(always)]
fn try_forward<F: Family>(ctx: &TcContext) -> Option<()> {
    let mut slot = MaybeUninit::uninit();
    // SAFETY: `bpf_fib_lookup` is plain integers, bytes and their unions.
    let params: &mut FibLookup = unsafe { zeroed_in_place(&mut slot) };
    // SAFETY: the context of a TC program is an `__sk_buff`.
    params.ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    F::fib_request(ctx, params)?;
    // SAFETY: `params` is a properly sized, initialised lookup structure.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "64 bytes"
    )]
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
    F::decrement_ttl(ctx)?;
    let action = if rc == BPF_FIB_LKUP_RET_SUCCESS {
        // SAFETY: after a successful lookup the union holds the MACs.
        let (smac, dmac): ([u8; ALEN], [u8; ALEN]) = unsafe {
            (
                params.__bindgen_anon_6.__bindgen_anon_2.smac,
                params.__bindgen_anon_6.__bindgen_anon_2.dmac,
            )
        };
        write(ctx, DADDR_OFF, dmac).ok()?;
        write(ctx, SADDR_OFF, smac).ok()?;
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(params.ifindex, 0) }
    } else {
        // SAFETY: no parameters: the kernel resolves the next hop itself.
        unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) }
    };
    (action == i64::from(TC_ACT_REDIRECT)).then_some(())
}

/// `Family::fib_request` of IPv4.
#[inline(always)]
pub(crate) fn fib_request4(ctx: &TcContext, params: &mut FibLookup) -> Option<()> {
    let ip: Ipv4Hdr = read(ctx, L3_OFF).ok()?;
    if ip.ttl <= 1 {
        return None;
    }
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.daddr);
    Some(())
}

/// `Family::fib_request` of IPv6.
#[inline(always)]
pub(crate) fn fib_request6(ctx: &TcContext, params: &mut FibLookup) -> Option<()> {
    let ip: Ipv6Hdr = read(ctx, L3_OFF).ok()?;
    if ip.hop_limit <= 1 {
        return None;
    }
    params.family = AF_INET6;
    params.l4_protocol = ip.next_hdr;
    params.__bindgen_anon_3.ipv6_src = words(&ip.saddr);
    params.__bindgen_anon_4.ipv6_dst = words(&ip.daddr);
    Some(())
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

/// `Family::decrement_ttl` of IPv4: the checksum follows the TTL.
#[inline(always)]
pub(crate) fn decrement_ttl4(ctx: &TcContext) -> Option<()> {
    const TTL: usize = L3_OFF + ipv4::TTL_OFF;
    const CSUM: usize = L3_OFF + ipv4::CSUM_OFF;
    // TTL shares a 16-bit word with the protocol byte.
    let old: [u8; 2] = read(ctx, TTL).ok()?;
    let new = [old[0] - 1, old[1]];
    let check: u16 = read(ctx, CSUM).ok()?;
    let diff = CsumDiff::NONE.word(
        u32::from(u16::from_ne_bytes(old)),
        u32::from(u16::from_ne_bytes(new)),
    );
    write(ctx, TTL, new).ok()?;
    write(ctx, CSUM, diff.apply(check)).ok()
}

/// `Family::decrement_ttl` of IPv6 (no header checksum).
#[inline(always)]
pub(crate) fn decrement_ttl6(ctx: &TcContext) -> Option<()> {
    const HOP_LIMIT: usize = L3_OFF + ipv6::HOP_LIMIT_OFF;
    let hop_limit: u8 = read(ctx, HOP_LIMIT).ok()?;
    write(ctx, HOP_LIMIT, hop_limit - 1).ok()
}
