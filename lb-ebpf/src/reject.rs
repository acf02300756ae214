//! The refusal generated in place of the packet, sent back out of the
//! interface it came in on: a TCP reset for TCP (see `tcp_reset` for why
//! not an ICMP error), ICMP / `ICMPv6` "port unreachable" for UDP. A TCP
//! client sees "connection refused" at once, a UDP socket gets
//! `ECONNREFUSED`, as with kube-proxy's REJECT rules.
//!
//! The reply is assembled in a per-CPU scratch buffer (the BPF stack is too
//! small for it next to the rest of the program), checksummed there, and
//! written over the packet after the skb is resized to the reply's length.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use lb_common::{proto, reason};

use crate::{
    csum,
    hdr::{
        L3_OFF, Link,
        eth::{self, ALEN, ETH_P_IP, ETH_P_IPV6},
        ipv4, ipv6,
        l4::{
            ICMP_CODE_OFF, ICMP_CSUM_OFF, ICMP_DEST_UNREACH, ICMP_HLEN, ICMP_PORT_UNREACH,
            ICMP_QUOTED_L4, ICMP_TYPE_OFF, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH,
            TCP_ACK_SEQ_OFF, TCP_CSUM_OFF, TCP_DOFF_NO_OPTIONS, TCP_DOFF_OFF, TCP_FLAGS_OFF,
            TCP_HLEN, TCP_SEQ_OFF,
        },
    },
    maps::LB_SCRATCH,
    reject_guard,
    skb::read,
    tcp_reset,
    verdict::{TC_ACT_REDIRECT, Verdict},
    zeroed::zeroed_in_place,
};

/// Quoted bytes of the offending packet: its IP header and 8 bytes of L4.
const QUOTE4: usize = ipv4::HLEN + ICMP_QUOTED_L4;
const QUOTE6: usize = ipv6::HLEN + ICMP_QUOTED_L4;
/// The reply's IP header, at the same place as the packet's.
const IP_OFF: usize = L3_OFF;
/// The reply's ICMP header.
const ICMP4_OFF: usize = IP_OFF + ipv4::HLEN;
const ICMP6_OFF: usize = IP_OFF + ipv6::HLEN;
/// Reply lengths: Ethernet + IP + ICMP header + quote.
const REPLY4_LEN: usize = ICMP4_OFF + ICMP_HLEN + QUOTE4;
const REPLY6_LEN: usize = ICMP6_OFF + ICMP_HLEN + QUOTE6;
/// Pseudo-header for the `ICMPv6` checksum, placed after the IPv6 reply.
const PSEUDO6_OFF: usize = 112;
/// DSCP CS6, as the kernel marks its own ICMP errors.
const TOS_CS6: u8 = 0xc0;
/// TTL / hop limit of the reply.
const HOP_LIMIT: u8 = 64;

/// TCP resets: the reply (Ethernet + IP + TCP without options), then the
/// offending packet's IP and TCP headers, then the pseudo-header.
const RESET4_LEN: usize = L3_OFF + ipv4::HLEN + TCP_HLEN;
const RESET6_LEN: usize = L3_OFF + ipv6::HLEN + TCP_HLEN;
const RESET_QUOTE_OFF: usize = 76;
const RESET_PSEUDO_OFF: usize = RESET_QUOTE_OFF + ipv6::HLEN + TCP_HLEN;

/// Size of the scratch buffer: the largest reply with what follows it.
pub(crate) const SCRATCH_LEN: usize = RESET_PSEUDO_OFF + ipv6::PSEUDO_LEN;

// Replies are bounded whatever the offending packet: at most 110 bytes (an
// ICMPv6 error quoting the IPv6 header and 8 bytes, with Ethernet).
const _: () = assert!(REPLY4_LEN <= 110 && REPLY6_LEN <= 110);
const _: () = assert!(RESET4_LEN <= 110 && RESET6_LEN <= 110);
const _: () = assert!(PSEUDO6_OFF >= REPLY6_LEN && PSEUDO6_OFF.is_multiple_of(4));
const _: () = assert!(PSEUDO6_OFF + ipv6::PSEUDO_LEN <= SCRATCH_LEN);
const _: () = assert!(RESET_QUOTE_OFF >= RESET6_LEN && RESET_PSEUDO_OFF.is_multiple_of(4));

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

/// The scratch buffer, zeroed whole, with the reply's Ethernet header
/// (MAC addresses swapped) and the quote of the packet at `quote_off`.
#[inline(always)]
fn start_reply<L: Link>(
    ctx: &TcContext,
    ether_type: u16,
    quote_off: usize,
    quote_len: usize,
) -> Result<&'static mut [u8; SCRATCH_LEN], Verdict> {
    let slot = LB_SCRATCH
        .get_ptr_mut(0)
        .ok_or(Verdict::drop(reason::DROP_REJECT_FAILED))?;
    // Zeroed in words (`zeroed_in_place`): a loop of byte stores became a
    // byte-by-byte `memset` subprogram, which the verifier walked a byte at
    // a time at each of its call sites.
    #[expect(clippy::cast_ptr_alignment, reason = "a map value is 8-aligned")]
    let words = slot.cast::<MaybeUninit<[u32; SCRATCH_LEN / 4]>>();
    // SAFETY: per-CPU map value of SCRATCH_LEN bytes, used by this run only;
    // zero words are valid bytes.
    let buf = unsafe {
        zeroed_in_place(&mut *words);
        &mut *slot
    };
    if L::ETHERNET {
        load_exact(
            ctx,
            eth::SADDR_OFF,
            &mut buf[eth::DADDR_OFF..eth::DADDR_OFF + ALEN],
        )?;
        load_exact(
            ctx,
            eth::DADDR_OFF,
            &mut buf[eth::SADDR_OFF..eth::SADDR_OFF + ALEN],
        )?;
        buf[eth::PROTO_OFF..eth::PROTO_OFF + 2].copy_from_slice(&ether_type.to_be_bytes());
    }
    load_exact(ctx, L::L3_OFF, &mut buf[quote_off..quote_off + quote_len])?;
    Ok(buf)
}

/// Copies exactly `dst.len()` packet bytes from `offset` (a constant length,
/// which the verifier needs; aya's `load_bytes` clamps it to the packet).
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "offsets and lengths inside a reply"
)]
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

/// Resizes the packet to the reply (the first `N` bytes of `buf`, from
/// the IP header on for a device without Ethernet header), writes the
/// reply over it and sends it back out of the interface it arrived on.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "a reply of under 200 bytes"
)]
fn send_back<const N: usize, L: Link>(
    ctx: &TcContext,
    buf: &[u8; SCRATCH_LEN],
) -> Result<Verdict, Verdict> {
    // The buffer is laid out as an Ethernet frame; without Ethernet the
    // reply starts at its IP header.
    let skip = L3_OFF - L::L3_OFF;
    let len = N - skip;
    ctx.change_tail(len as u32, 0).map_err(failed)?;
    // SAFETY: skip + len = N <= SCRATCH_LEN bytes of the buffer are read.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.as_ptr().cast(),
            0,
            buf.as_ptr().add(skip).cast(),
            len as u32,
            0,
        )
    };
    if rc != 0 {
        return Err(failed(rc));
    }
    // SAFETY: the context of a TC program is an `__sk_buff`.
    let ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != i64::from(TC_ACT_REDIRECT) {
        return Err(Verdict::drop(reason::DROP_REJECT_FAILED));
    }
    Ok(Verdict::redirect(reason::REJECT))
}

/// The reply's IPv4 header, checksummed: from the address the client tried
/// to the client (as quoted at `quote_off`), carrying `l4_len` bytes of
/// `l4_proto`; with `pseudo_off`, also the pseudo-header of the L4
/// checksum there.
#[inline(always)]
#[expect(clippy::cast_possible_truncation, reason = "a 20-byte header")]
fn ip4_header(
    buf: &mut [u8; SCRATCH_LEN],
    quote_off: usize,
    tos: u8,
    l4_proto: u8,
    l4_len: u16,
    pseudo_off: Option<usize>,
) -> Result<(), Verdict> {
    let total = ipv4::HLEN as u16 + l4_len;
    buf[IP_OFF] = ipv4::VERSION_IHL;
    buf[IP_OFF + ipv4::TOS_OFF] = tos;
    buf[IP_OFF + ipv4::TOT_LEN_OFF..IP_OFF + ipv4::TOT_LEN_OFF + 2]
        .copy_from_slice(&total.to_be_bytes());
    buf[IP_OFF + ipv4::TTL_OFF] = HOP_LIMIT;
    buf[IP_OFF + ipv4::PROTO_OFF] = l4_proto;
    let mut i = 0;
    while i < 4 {
        let src = buf[quote_off + ipv4::DADDR_OFF + i];
        let dst = buf[quote_off + ipv4::SADDR_OFF + i];
        buf[IP_OFF + ipv4::SADDR_OFF + i] = src;
        buf[IP_OFF + ipv4::DADDR_OFF + i] = dst;
        if let Some(pseudo) = pseudo_off {
            buf[pseudo + ipv4::PSEUDO_SADDR_OFF + i] = src;
            buf[pseudo + ipv4::PSEUDO_DADDR_OFF + i] = dst;
        }
        i += 1;
    }
    if let Some(pseudo) = pseudo_off {
        buf[pseudo + ipv4::PSEUDO_PROTO_OFF] = l4_proto;
        buf[pseudo + ipv4::PSEUDO_LEN_OFF..pseudo + ipv4::PSEUDO_LEN_OFF + 2]
            .copy_from_slice(&l4_len.to_be_bytes());
    }
    let ip_csum = csum::fold(csum_add(buf[IP_OFF..].as_ptr(), ipv4::HLEN as u32, 0)?);
    buf[IP_OFF + ipv4::CSUM_OFF] = ip_csum[0];
    buf[IP_OFF + ipv4::CSUM_OFF + 1] = ip_csum[1];
    Ok(())
}

/// The reply's IPv6 header: from the address the client tried to the
/// client (as quoted at `quote_off`), carrying `l4_len` bytes of `next_hdr`,
/// and the pseudo-header of the L4 checksum at `pseudo_off`.
#[inline(always)]
fn ip6_header(
    buf: &mut [u8; SCRATCH_LEN],
    quote_off: usize,
    next_hdr: u8,
    l4_len: u16,
    pseudo_off: usize,
) {
    buf[IP_OFF] = ipv6::VERSION_BYTE;
    buf[IP_OFF + ipv6::PAYLOAD_LEN_OFF..IP_OFF + ipv6::PAYLOAD_LEN_OFF + 2]
        .copy_from_slice(&l4_len.to_be_bytes());
    buf[IP_OFF + ipv6::NEXT_HDR_OFF] = next_hdr;
    buf[IP_OFF + ipv6::HOP_LIMIT_OFF] = HOP_LIMIT;
    let mut i = 0;
    while i < 16 {
        let src = buf[quote_off + ipv6::DADDR_OFF + i];
        let dst = buf[quote_off + ipv6::SADDR_OFF + i];
        buf[IP_OFF + ipv6::SADDR_OFF + i] = src;
        buf[IP_OFF + ipv6::DADDR_OFF + i] = dst;
        buf[pseudo_off + ipv6::PSEUDO_SADDR_OFF + i] = src;
        buf[pseudo_off + ipv6::PSEUDO_DADDR_OFF + i] = dst;
        i += 1;
    }
    buf[pseudo_off + ipv6::PSEUDO_LEN_LOW_OFF..pseudo_off + ipv6::PSEUDO_LEN_LOW_OFF + 2]
        .copy_from_slice(&l4_len.to_be_bytes());
    buf[pseudo_off + ipv6::PSEUDO_NEXT_HDR_OFF] = next_hdr;
}

/// IPv4: a TCP reset for TCP, else ICMP destination unreachable, port
/// unreachable.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "lengths of under 200 bytes"
)]
pub(crate) fn reject4<L: Link>(ctx: &TcContext) -> Result<Verdict, Verdict> {
    reject_guard::may_answer::<L>(ctx, true)?;
    if read::<u8>(ctx, L::L3_OFF + ipv4::PROTO_OFF)? == proto::TCP {
        return reset4::<L>(ctx);
    }
    let quote_off = ICMP4_OFF + ICMP_HLEN;
    let buf = start_reply::<L>(ctx, ETH_P_IP, quote_off, QUOTE4)?;
    let icmp_len = (ICMP_HLEN + QUOTE4) as u16;
    ip4_header(buf, quote_off, TOS_CS6, proto::ICMP, icmp_len, None)?;
    buf[ICMP4_OFF + ICMP_TYPE_OFF] = ICMP_DEST_UNREACH;
    buf[ICMP4_OFF + ICMP_CODE_OFF] = ICMP_PORT_UNREACH;
    let icmp_csum = csum::fold(csum_add(buf[ICMP4_OFF..].as_ptr(), u32::from(icmp_len), 0)?);
    buf[ICMP4_OFF + ICMP_CSUM_OFF] = icmp_csum[0];
    buf[ICMP4_OFF + ICMP_CSUM_OFF + 1] = icmp_csum[1];
    send_back::<REPLY4_LEN, L>(ctx, buf)
}

/// IPv6: a TCP reset for TCP, else `ICMPv6` destination unreachable, port
/// unreachable.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "lengths of under 200 bytes"
)]
pub(crate) fn reject6<L: Link>(ctx: &TcContext) -> Result<Verdict, Verdict> {
    reject_guard::may_answer::<L>(ctx, false)?;
    if read::<u8>(ctx, L::L3_OFF + ipv6::NEXT_HDR_OFF)? == proto::TCP {
        return reset6::<L>(ctx);
    }
    let quote_off = ICMP6_OFF + ICMP_HLEN;
    let buf = start_reply::<L>(ctx, ETH_P_IPV6, quote_off, QUOTE6)?;
    let payload_len = (ICMP_HLEN + QUOTE6) as u16;
    ip6_header(buf, quote_off, proto::ICMPV6, payload_len, PSEUDO6_OFF);
    buf[ICMP6_OFF + ICMP_TYPE_OFF] = ICMPV6_DEST_UNREACH;
    buf[ICMP6_OFF + ICMP_CODE_OFF] = ICMPV6_PORT_UNREACH;
    let pseudo = csum_add(buf[PSEUDO6_OFF..].as_ptr(), ipv6::PSEUDO_LEN as u32, 0)?;
    let icmp_csum = csum::fold(csum_add(
        buf[ICMP6_OFF..].as_ptr(),
        u32::from(payload_len),
        pseudo,
    )?);
    buf[ICMP6_OFF + ICMP_CSUM_OFF] = icmp_csum[0];
    buf[ICMP6_OFF + ICMP_CSUM_OFF + 1] = icmp_csum[1];
    send_back::<REPLY6_LEN, L>(ctx, buf)
}

/// The reply's TCP header at `tcp_off`: a reset answering the quoted TCP
/// header at `quote_off`, which carried `payload_len` bytes of data (ports
/// swapped, no options, window 0, checksum left zero). `None` when the
/// quoted segment is itself a reset.
#[inline(always)]
fn reset_header(
    buf: &mut [u8; SCRATCH_LEN],
    tcp_off: usize,
    quote_off: usize,
    payload_len: u32,
) -> Option<()> {
    let word = |buf: &[u8; SCRATCH_LEN], off: usize| {
        u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
    };
    let reset = tcp_reset::answer(
        buf[quote_off + TCP_FLAGS_OFF],
        word(buf, quote_off + TCP_SEQ_OFF),
        word(buf, quote_off + TCP_ACK_SEQ_OFF),
        payload_len,
    )?;
    // Source port <- the packet's destination port, and the reverse.
    buf[tcp_off] = buf[quote_off + 2];
    buf[tcp_off + 1] = buf[quote_off + 3];
    buf[tcp_off + 2] = buf[quote_off];
    buf[tcp_off + 3] = buf[quote_off + 1];
    buf[tcp_off + TCP_SEQ_OFF..tcp_off + TCP_SEQ_OFF + 4].copy_from_slice(&reset.seq.to_be_bytes());
    buf[tcp_off + TCP_ACK_SEQ_OFF..tcp_off + TCP_ACK_SEQ_OFF + 4]
        .copy_from_slice(&reset.ack_seq.to_be_bytes());
    buf[tcp_off + TCP_DOFF_OFF] = TCP_DOFF_NO_OPTIONS;
    buf[tcp_off + TCP_FLAGS_OFF] = reset.flags;
    Some(())
}

/// Data bytes of the quoted TCP segment: what follows its header in an IP
/// payload of `l4_len` bytes (0 for a header that claims more).
#[inline(always)]
fn tcp_payload_len(buf: &[u8; SCRATCH_LEN], quote_tcp_off: usize, l4_len: u32) -> u32 {
    let header_len = u32::from(buf[quote_tcp_off + TCP_DOFF_OFF] >> 4) * 4;
    l4_len.saturating_sub(header_len)
}

/// Stores the folded checksum of (pseudo-header at `pseudo_off`, `pseudo_len`
/// bytes) + (TCP header at `tcp_off`) in the TCP header.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "headers of 20 and 40 bytes"
)]
fn tcp_checksum(
    buf: &mut [u8; SCRATCH_LEN],
    tcp_off: usize,
    pseudo_off: usize,
    pseudo_len: usize,
) -> Result<(), Verdict> {
    let pseudo = csum_add(buf[pseudo_off..].as_ptr(), pseudo_len as u32, 0)?;
    let sum = csum::fold(csum_add(buf[tcp_off..].as_ptr(), TCP_HLEN as u32, pseudo)?);
    buf[tcp_off + TCP_CSUM_OFF] = sum[0];
    buf[tcp_off + TCP_CSUM_OFF + 1] = sum[1];
    Ok(())
}

/// IPv4: a TCP reset from the address and port the client tried.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "lengths of under 200 bytes"
)]
fn reset4<L: Link>(ctx: &TcContext) -> Result<Verdict, Verdict> {
    const TCP_OFF: usize = IP_OFF + ipv4::HLEN;
    const QUOTE_TCP_OFF: usize = RESET_QUOTE_OFF + ipv4::HLEN;
    let buf = start_reply::<L>(ctx, ETH_P_IP, RESET_QUOTE_OFF, ipv4::HLEN + TCP_HLEN)?;
    let tot_len = u16::from_be_bytes([
        buf[RESET_QUOTE_OFF + ipv4::TOT_LEN_OFF],
        buf[RESET_QUOTE_OFF + ipv4::TOT_LEN_OFF + 1],
    ]);
    let l4_len = u32::from(tot_len).saturating_sub(ipv4::HLEN as u32);
    let payload_len = tcp_payload_len(buf, QUOTE_TCP_OFF, l4_len);
    if reset_header(buf, TCP_OFF, QUOTE_TCP_OFF, payload_len).is_none() {
        return Err(Verdict::drop(reason::DROP_RESET_UNANSWERED));
    }
    let tcp_len = TCP_HLEN as u16;
    ip4_header(
        buf,
        RESET_QUOTE_OFF,
        0,
        proto::TCP,
        tcp_len,
        Some(RESET_PSEUDO_OFF),
    )?;
    tcp_checksum(buf, TCP_OFF, RESET_PSEUDO_OFF, ipv4::PSEUDO_LEN)?;
    send_back::<RESET4_LEN, L>(ctx, buf)
}

/// IPv6: a TCP reset from the address and port the client tried.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "lengths of under 200 bytes"
)]
fn reset6<L: Link>(ctx: &TcContext) -> Result<Verdict, Verdict> {
    const TCP_OFF: usize = IP_OFF + ipv6::HLEN;
    const QUOTE_TCP_OFF: usize = RESET_QUOTE_OFF + ipv6::HLEN;
    let buf = start_reply::<L>(ctx, ETH_P_IPV6, RESET_QUOTE_OFF, ipv6::HLEN + TCP_HLEN)?;
    let l4_len = u16::from_be_bytes([
        buf[RESET_QUOTE_OFF + ipv6::PAYLOAD_LEN_OFF],
        buf[RESET_QUOTE_OFF + ipv6::PAYLOAD_LEN_OFF + 1],
    ]);
    let payload_len = tcp_payload_len(buf, QUOTE_TCP_OFF, u32::from(l4_len));
    if reset_header(buf, TCP_OFF, QUOTE_TCP_OFF, payload_len).is_none() {
        return Err(Verdict::drop(reason::DROP_RESET_UNANSWERED));
    }
    let tcp_len = TCP_HLEN as u16;
    ip6_header(buf, RESET_QUOTE_OFF, proto::TCP, tcp_len, RESET_PSEUDO_OFF);
    tcp_checksum(buf, TCP_OFF, RESET_PSEUDO_OFF, ipv6::PSEUDO_LEN)?;
    send_back::<RESET6_LEN, L>(ctx, buf)
}
