//! Forwarding of translated packets by the datapath itself, with
//! `--forward=redirect` only: a FIB lookup, then a redirect to the egress
//! interface (with neighbour resolution by the kernel when the next hop's
//! MAC is not known yet).
//!
//! By default a translated packet goes back to the stack (`TC_ACT_OK`), so
//! that netfilter's FORWARD chain, where `NetworkPolicy` engines (Calico in
//! iptables mode, kube-router, Weave) enforce policy, sees the translated
//! packet exactly as after kube-proxy's DNAT. The agent sets `accept_local`
//! on the interfaces it attaches to, so that input routing lets through the
//! packets whose source is one of the node's own addresses (source NAT of
//! external traffic, the `NodePort` address restored on its replies).
//!
//! The redirect skips input routing and netfilter (cheaper, and what
//! Cilium's BPF host routing does), so policy in FORWARD is bypassed.
//! Whatever the lookup cannot place (local delivery, no route, forwarding
//! off, MTU exceeded, TTL about to expire) goes to the stack.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibLookup,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};

use lb_common::{config_flags, iface_flags};

use crate::{
    csum::CsumDiff,
    ctx::Ctx,
    family::Family,
    hdr::{
        Link,
        eth::{ALEN, DADDR_OFF, SADDR_OFF},
        ipv4::{self, Ipv4Hdr},
        ipv6::{self, Ipv6Hdr},
    },
    maps::{LB_CONFIG_V3, LB_IFACE_V1},
    skb::{read, write},
    verdict::{TC_ACT_REDIRECT, Verdict},
    zeroed::zeroed_in_place,
};

/// Whether the agent asked for `--forward=redirect`
/// (`config_flags::FORWARD_REDIRECT`); no configuration: the stack.
#[inline(always)]
pub(crate) fn redirect_enabled() -> bool {
    LB_CONFIG_V3
        .get(0)
        .is_some_and(|config| config.flags & config_flags::FORWARD_REDIRECT != 0)
}

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
    if !F::ETHERNET {
        // From a device without MAC addresses the next hop's header would
        // have to be pushed; the stack does that.
        return None;
    }
    let mut slot = MaybeUninit::uninit();
    // SAFETY: `bpf_fib_lookup` is plain integers, bytes and their unions.
    let params: &mut FibLookup = unsafe { zeroed_in_place(&mut slot) };
    // SAFETY: the context of a TC program is an `__sk_buff`.
    params.ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    F::fib_request(ctx, params)?;
    let rc = fib_lookup(ctx, params, 0)?;
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

/// `bpf_fib_lookup` of `params` with `flags`: the kernel's
/// `BPF_FIB_LKUP_RET_*` code, `None` for an error (a negative return). The
/// one call for forwarding, the reverse-path check and XDP.
#[inline(always)]
pub(crate) fn fib_lookup(
    ctx: &impl EbpfContext,
    params: &mut FibLookup,
    flags: u32,
) -> Option<u32> {
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
            flags,
        )
    };
    u32::try_from(rc).ok()
}

/// `Family::fib_request` of IPv4.
#[inline(always)]
pub(crate) fn fib_request4<L: Link>(ctx: &impl Ctx, params: &mut FibLookup) -> Option<()> {
    let ip: Ipv4Hdr = read(ctx, L::L3_OFF).ok()?;
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
pub(crate) fn fib_request6<L: Link>(ctx: &impl Ctx, params: &mut FibLookup) -> Option<()> {
    let ip: Ipv6Hdr = read(ctx, L::L3_OFF).ok()?;
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
pub(crate) fn decrement_ttl4<L: Link>(ctx: &impl Ctx) -> Option<()> {
    let ttl_off = L::L3_OFF + ipv4::TTL_OFF;
    let csum_off = L::L3_OFF + ipv4::CSUM_OFF;
    // TTL shares a 16-bit word with the protocol byte.
    let old: [u8; 2] = read(ctx, ttl_off).ok()?;
    let new = [old[0] - 1, old[1]];
    let check: u16 = read(ctx, csum_off).ok()?;
    let diff = CsumDiff::NONE.word(
        u32::from(u16::from_ne_bytes(old)),
        u32::from(u16::from_ne_bytes(new)),
    );
    write(ctx, ttl_off, new).ok()?;
    write(ctx, csum_off, diff.apply(check)).ok()
}

/// `Family::decrement_ttl` of IPv6 (no header checksum).
#[inline(always)]
pub(crate) fn decrement_ttl6<L: Link>(ctx: &impl Ctx) -> Option<()> {
    let hop_limit_off = L::L3_OFF + ipv6::HOP_LIMIT_OFF;
    let hop_limit: u8 = read(ctx, hop_limit_off).ok()?;
    write(ctx, hop_limit_off, hop_limit - 1).ok()
}

/// `BPF_FIB_LOOKUP_SKIP_NEIGH`: the route is enough, no neighbour needed.
const FIB_SKIP_NEIGH: u32 = 1 << 2;

/// Per CPU: the reverse-path check's lookup structure. On the stack its 64
/// bytes, under the parse step's frame, took the deepest call chain over
/// the verifier's 512-byte limit.
#[map]
static LB_RPF_FIB: PerCpuArray<FibLookup> = PerCpuArray::with_max_entries(1, 0);

/// Reverse-path check of a packet that entered through a pod-facing
/// interface (`iface_flags::POD_FACING`): its source must be routed back
/// through that interface, else a pod is using another pod's address
/// (1: fine or not pod-facing or cannot tell, 0: spoofed). A subprogram of
/// its own: the lookup structure stays out of the parse step's frame.
#[inline(never)]
pub(crate) fn source_routed_back<F: Family>(ctx: &impl Ctx) -> u64 {
    let ifindex = ctx.ifindex();
    // SAFETY: the value is copied out at once.
    let pod_facing = unsafe { LB_IFACE_V1.get(&ifindex) }
        .is_some_and(|flags| flags & iface_flags::POD_FACING != 0);
    if !pod_facing {
        return 1;
    }
    let Some(slot) = LB_RPF_FIB.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, used by this run only; `bpf_fib_lookup` is
    // plain integers, bytes and their unions.
    let params: &mut FibLookup =
        unsafe { zeroed_in_place(&mut *slot.cast::<MaybeUninit<FibLookup>>()) };
    params.ifindex = ifindex;
    if F::fib_request(ctx, params).is_none() {
        // TTL about to expire: no verdict on the source here.
        return 1;
    }
    // Towards the packet's source: swap the addresses (IPv4 uses the
    // first word of each).
    // SAFETY: both unions are four words, whichever family.
    unsafe {
        core::mem::swap(
            &mut params.__bindgen_anon_3.ipv6_src,
            &mut params.__bindgen_anon_4.ipv6_dst,
        );
    }
    let Some(rc) = fib_lookup(ctx, params, FIB_SKIP_NEIGH) else {
        return 1;
    };
    if rc == BPF_FIB_LKUP_RET_FWD_DISABLED {
        return 1;
    }
    u64::from(
        (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
            && params.ifindex == ifindex,
    )
}
