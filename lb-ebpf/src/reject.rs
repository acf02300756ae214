//! ICMP / ICMPv6 "port unreachable" generated in place of the packet, sent
//! back out of the interface it came in on. A TCP client sees "connection
//! refused" at once, a UDP socket gets `ECONNREFUSED`, as with kube-proxy's
//! REJECT rules.
//!
//! The reply is assembled in a per-CPU scratch buffer (the BPF stack is too
//! small for it next to the rest of the program), checksummed there, and
//! written over the packet after the skb is resized to the reply's length.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_REDIRECT},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_load_bytes},
    programs::TcContext,
};
use lb_common::reason;

use crate::{
    maps::LB_SCRATCH,
    parse::{ETH_HLEN, Verdict},
};

/// Quoted bytes of the offending packet: its IP header and 8 bytes of L4.
const QUOTE4: usize = 20 + 8;
const QUOTE6: usize = 40 + 8;
/// Offsets in the reply.
const IP_OFF: usize = ETH_HLEN;
const ICMP4_OFF: usize = IP_OFF + 20;
const ICMP6_OFF: usize = IP_OFF + 40;
/// Reply lengths: Ethernet + IP + ICMP header + quote.
const REPLY4_LEN: usize = ICMP4_OFF + 8 + QUOTE4;
const REPLY6_LEN: usize = ICMP6_OFF + 8 + QUOTE6;
/// Pseudo-header for the ICMPv6 checksum, placed after the IPv6 reply.
const PSEUDO6_OFF: usize = 112;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const HOP_LIMIT: u8 = 64;

/// Size of the scratch buffer: the IPv6 reply plus its pseudo-header.
pub const SCRATCH_LEN: usize = PSEUDO6_OFF + 40;

#[inline(always)]
fn failed<E>(_: E) -> Verdict {
    Verdict::drop(reason::DROP_REJECT_FAILED)
}

/// Ones'-complement sum of `len` bytes (a multiple of 4) at `data`, added
/// to `seed`.
#[inline(always)]
fn csum_add(data: *const u8, len: u32, seed: u32) -> Result<u32, Verdict> {
    // SAFETY: `data` points at `len` readable bytes of the scratch map value.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data.cast_mut().cast(), len, seed) };
    u32::try_from(sum).map_err(failed)
}

/// Folds a 32-bit sum to the 16-bit checksum, in packet byte order.
#[inline(always)]
fn csum_fold(sum: u32) -> [u8; 2] {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}

/// The scratch buffer, zeroed up to `len`, with the reply's Ethernet header
/// (MAC addresses swapped) and the quote of the packet at `quote_off`.
#[inline(always)]
fn start_reply(
    ctx: &TcContext,
    ether_type: u16,
    quote_off: usize,
    quote_len: usize,
) -> Result<&'static mut [u8; SCRATCH_LEN], Verdict> {
    let buf = LB_SCRATCH
        .get_ptr_mut(0)
        .ok_or(Verdict::drop(reason::DROP_REJECT_FAILED))?;
    // SAFETY: per-CPU map value of SCRATCH_LEN bytes, used by this run only.
    let buf = unsafe { &mut *buf };
    let mut i = 0;
    while i < SCRATCH_LEN {
        buf[i] = 0;
        i += 1;
    }
    load_exact(ctx, 6, &mut buf[0..6])?;
    load_exact(ctx, 0, &mut buf[6..12])?;
    buf[12..14].copy_from_slice(&ether_type.to_be_bytes());
    load_exact(ctx, ETH_HLEN, &mut buf[quote_off..quote_off + quote_len])?;
    Ok(buf)
}

/// Copies exactly `dst.len()` packet bytes from `offset` (a constant length,
/// which the verifier needs; aya's `load_bytes` clamps it to the packet).
#[inline(always)]
fn load_exact(ctx: &TcContext, offset: usize, dst: &mut [u8]) -> Result<(), Verdict> {
    // SAFETY: `dst` is writable for its whole length.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            offset as u32,
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(failed(rc)) }
}

/// Resizes the packet to `N` bytes, writes the reply over it and sends it
/// back out of the interface it arrived on.
#[inline(always)]
fn send_back<const N: usize>(ctx: &TcContext, buf: &[u8; SCRATCH_LEN]) -> Result<Verdict, Verdict> {
    ctx.change_tail(N as u32, 0).map_err(failed)?;
    // SAFETY: N <= SCRATCH_LEN; the reply is the first N bytes.
    let reply = unsafe { &*buf.as_ptr().cast::<[u8; N]>() };
    ctx.store(0, reply, 0).map_err(failed)?;
    // SAFETY: the context of a TC program is an `__sk_buff`.
    let ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != i64::from(TC_ACT_REDIRECT) {
        return Err(Verdict::drop(reason::DROP_REJECT_FAILED));
    }
    Ok(Verdict {
        action: TC_ACT_REDIRECT as i32,
        reason: reason::REJECT,
    })
}

/// IPv4: ICMP destination unreachable, port unreachable.
#[inline(always)]
pub fn reject4(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let quote_off = ICMP4_OFF + 8;
    let buf = start_reply(ctx, 0x0800, quote_off, QUOTE4)?;
    // IP header: source is the address the client tried, destination the client.
    let total = (REPLY4_LEN - ETH_HLEN) as u16;
    buf[IP_OFF] = 0x45;
    buf[IP_OFF + 1] = 0xc0; // DSCP CS6, as the kernel marks its own ICMP errors
    buf[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&total.to_be_bytes());
    buf[IP_OFF + 8] = HOP_LIMIT;
    buf[IP_OFF + 9] = IPPROTO_ICMP;
    let mut i = 0;
    while i < 4 {
        buf[IP_OFF + 12 + i] = buf[quote_off + 16 + i];
        buf[IP_OFF + 16 + i] = buf[quote_off + 12 + i];
        i += 1;
    }
    let ip_csum = csum_fold(csum_add(buf[IP_OFF..].as_ptr(), 20, 0)?);
    buf[IP_OFF + 10] = ip_csum[0];
    buf[IP_OFF + 11] = ip_csum[1];
    buf[ICMP4_OFF] = ICMP_DEST_UNREACH;
    buf[ICMP4_OFF + 1] = ICMP_PORT_UNREACH;
    let icmp_csum = csum_fold(csum_add(buf[ICMP4_OFF..].as_ptr(), (8 + QUOTE4) as u32, 0)?);
    buf[ICMP4_OFF + 2] = icmp_csum[0];
    buf[ICMP4_OFF + 3] = icmp_csum[1];
    send_back::<REPLY4_LEN>(ctx, buf)
}

/// IPv6: ICMPv6 destination unreachable, port unreachable.
#[inline(always)]
pub fn reject6(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let quote_off = ICMP6_OFF + 8;
    let buf = start_reply(ctx, 0x86dd, quote_off, QUOTE6)?;
    let payload_len = (8 + QUOTE6) as u16;
    buf[IP_OFF] = 0x60;
    buf[IP_OFF + 4..IP_OFF + 6].copy_from_slice(&payload_len.to_be_bytes());
    buf[IP_OFF + 6] = IPPROTO_ICMPV6;
    buf[IP_OFF + 7] = HOP_LIMIT;
    let mut i = 0;
    while i < 16 {
        let src = buf[quote_off + 24 + i];
        let dst = buf[quote_off + 8 + i];
        buf[IP_OFF + 8 + i] = src;
        buf[IP_OFF + 24 + i] = dst;
        // Pseudo-header: source, destination, upper-layer length, next header.
        buf[PSEUDO6_OFF + i] = src;
        buf[PSEUDO6_OFF + 16 + i] = dst;
        i += 1;
    }
    buf[PSEUDO6_OFF + 34..PSEUDO6_OFF + 36].copy_from_slice(&payload_len.to_be_bytes());
    buf[PSEUDO6_OFF + 39] = IPPROTO_ICMPV6;
    buf[ICMP6_OFF] = ICMPV6_DEST_UNREACH;
    buf[ICMP6_OFF + 1] = ICMPV6_PORT_UNREACH;
    let pseudo = csum_add(buf[PSEUDO6_OFF..].as_ptr(), 40, 0)?;
    let icmp_csum = csum_fold(csum_add(
        buf[ICMP6_OFF..].as_ptr(),
        u32::from(payload_len),
        pseudo,
    )?);
    buf[ICMP6_OFF + 2] = icmp_csum[0];
    buf[ICMP6_OFF + 3] = icmp_csum[1];
    send_back::<REPLY6_LEN>(ctx, buf)
}
