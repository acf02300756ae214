//! ICMP / `ICMPv6` errors about translated flows, translated back so that
//! the host that gets the error finds its socket: path-MTU discovery
//! (fragmentation needed, packet too big), port unreachable and time
//! exceeded work through a frontend.
//!
//! An error quotes the packet it is about: the packet as it left the node,
//! translated. Its quoted tuple reversed is the key a packet of the other
//! direction carries, so one exact-match lookup finds the flow:
//!
//! - **towards the client** (the quoted packet went to a backend, e.g. a
//!   router on the way to the backend sends "fragmentation needed" to the
//!   client): quoted `client -> backend` reversed is the flow's *reply*
//!   entry. The quote gets the frontend back as destination (and the
//!   client's own address and port as source for source-NATed flows); the
//!   outer destination, when it is the source-NAT address, becomes the
//!   client; an outer source that is the backend itself becomes the
//!   frontend.
//! - **towards the backend** (the quoted packet was a reply translated to
//!   come from the frontend, e.g. a router on the way to the client sends
//!   "fragmentation needed" to the frontend address): quoted
//!   `frontend -> client` reversed is the flow's *service* entry. The quote
//!   gets the backend back as source (and the source-NAT address and port
//!   as destination); an outer destination that is the frontend becomes
//!   the backend; an outer source that is the client of a source-NATed
//!   flow becomes the source-NAT address.
//!
//! Routers' own addresses (the outer source of most errors) are kept:
//! they are real hops. The kernel's NAT rewrites the outer source of every
//! translated error to the frontend (README, Known deviations).
//!
//! Checksums are all updated incrementally with direct packet access (no
//! helper, so `skb->csum` of `CHECKSUM_COMPLETE` packets stays right: every
//! change is balanced by a checksum field inside the same covered bytes):
//! the quoted IPv4 header's, the quoted TCP/UDP checksum when the quote
//! holds it (an error quotes a cut packet, so it can only be adjusted, as
//! the kernel's NAT does), the ICMP checksum (`ICMPv6`: with the outer
//! pseudo-header), the outer IPv4 header's.
//!
//! Nothing is created or refreshed: an error matching no flow, or quoting
//! something else than a TCP/UDP header of at least 8 bytes after an IP
//! header without options or extension headers, passes unchanged. Errors
//! are never answered (they never reach the reject path).

use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, macros::map, maps::PerCpuArray, programs::TcContext,
};
use lb_common::{Addr4, Addr6, CtEntry, CtKey, ct_dir, ct_flags, proto, reason};

use crate::{
    csum::CsumDiff,
    ct,
    family::{Family, Tuple, V4, V6},
    fwd,
    hdr::{
        Link,
        ipv4::{self, Ipv4Hdr},
        ipv6,
        l4::{ICMP_CSUM_OFF, ICMP_HLEN, Ports, TCP_CSUM_OFF, UDP_CSUM_OFF},
    },
    skb::{read, write},
    verdict::{Verdict, decode_unit, encode_unit},
};

/// ICMP error types (RFC 792): destination unreachable (fragmentation
/// needed is its code 4), time exceeded, parameter problem.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// `ICMPv6` error types (RFC 4443): destination unreachable, packet too
/// big, time exceeded, parameter problem.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;

/// The quoted IPv4 header's fragment-offset bits: a quote of a later
/// fragment has no ports (the first fragment's, with MF, does).
const FRAG_OFFSET_MASK: u16 = 0x1fff;

/// Bytes of the quoted L4 header every error must hold (RFC 792's 8).
const QUOTED_L4: usize = 8;
/// What must be linear for direct access: up to the quoted TCP checksum.
const QUOTED_L4_CSUM_END: usize = TCP_CSUM_OFF + 2;

/// The error's verdict when it was translated.
const TRANSLATED: Verdict = Verdict::pass(reason::NAT_ICMP_ERROR);

/// An error as parsed: outer addresses, the quoted tuple, and how much of
/// the quoted L4 header the message holds.
#[repr(C)]
#[derive(Clone, Copy)]
struct Quote<A> {
    outer_saddr: A,
    outer_daddr: A,
    inner: Tuple<A>,
    /// Whether the message holds the quoted TCP/UDP checksum.
    l4_csum: bool,
}

/// What the error becomes.
#[repr(C)]
#[derive(Clone, Copy)]
struct Translation<A> {
    outer_saddr: A,
    outer_daddr: A,
    inner: Tuple<A>,
}

/// One family's error in flight: as parsed, and what it becomes.
#[repr(C)]
#[derive(Clone, Copy)]
struct Slot<A> {
    quote: Quote<A>,
    new: Translation<A>,
}

/// Both families' slots.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Scratch {
    v4: Slot<Addr4>,
    v6: Slot<Addr6>,
}

/// Per CPU: the error in flight. IPv6 quotes and translations on the
/// stack took the subprogram's frame over the verifier's 512 bytes.
#[map]
static LB_ICMP_ERR: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The family's slot in the scratch.
trait Scratched: Sized + Copy + 'static {
    fn slot(scratch: &mut Scratch) -> &mut Slot<Self>;
}

impl Scratched for Addr4 {
    #[inline(always)]
    fn slot(scratch: &mut Scratch) -> &mut Slot<Self> {
        &mut scratch.v4
    }
}

impl Scratched for Addr6 {
    #[inline(always)]
    fn slot(scratch: &mut Scratch) -> &mut Slot<Self> {
        &mut scratch.v6
    }
}

/// This CPU's slot of address type `A`.
#[inline(always)]
fn slot<A: Scratched>() -> Result<&'static mut Slot<A>, Verdict> {
    let scratch = LB_ICMP_ERR
        .get_ptr_mut(0)
        .ok_or(Verdict::pass(reason::PASS_OTHER_PROTO))?;
    // SAFETY: this CPU's scratch, used by this packet only.
    Ok(A::slot(unsafe { &mut *scratch }))
}

/// An IPv4 packet with protocol ICMP, IP header without options and not a
/// fragment (the parse step checked): translated when it is an error about
/// a translated flow. An encoded verdict (`Verdict::encode`).
#[inline(never)]
pub(crate) fn error4<L: Link, const EGRESS: bool>(ctx: &TcContext) -> u64 {
    match try_error4::<L, EGRESS>(ctx) {
        Ok(verdict) | Err(verdict) => verdict.encode(),
    }
}

/// An IPv6 packet whose next header is `ICMPv6`: as `error4`.
#[inline(never)]
pub(crate) fn error6<L: Link, const EGRESS: bool>(ctx: &TcContext) -> u64 {
    match try_error6::<L, EGRESS>(ctx) {
        Ok(verdict) | Err(verdict) => verdict.encode(),
    }
}

/// True for the ICMP types that quote the packet they are about.
#[inline(always)]
fn is_error(v4: bool, icmp_type: u8) -> bool {
    if v4 {
        icmp_type == ICMP_DEST_UNREACH
            || icmp_type == ICMP_TIME_EXCEEDED
            || icmp_type == ICMP_PARAMETERPROB
    } else {
        icmp_type == ICMPV6_DEST_UNREACH
            || icmp_type == ICMPV6_PKT_TOOBIG
            || icmp_type == ICMPV6_TIME_EXCEED
            || icmp_type == ICMPV6_PARAMPROB
    }
}

/// Makes the headers up to `end` linear (errors quote more headers than
/// the parse step pulls). Failure just means the bounds checks pass it.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "offsets and an skb's linear part are far below 4 GiB"
)]
fn linearize(ctx: &TcContext, end: usize) {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    let want = end as u32;
    if linear < want && len > linear {
        let _ = ctx.pull_data(if len < want { len } else { want });
    }
}

/// The end of the ICMP message in the frame from the IP header's length
/// field (`l3_len`: the whole IP packet), checked against the packet.
#[inline(always)]
fn message_end<L: Link>(ctx: &TcContext, l3_len: usize) -> Result<usize, Verdict> {
    // SAFETY: the context of a TC program is an `__sk_buff`.
    let skb_len = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).len } as usize;
    let end = L::L3_OFF + l3_len;
    if end > skb_len {
        return Err(Verdict::pass(reason::PASS_BAD_LENGTH));
    }
    Ok(end)
}

/// The quoted TCP/UDP header's ports and whether its checksum is quoted,
/// checked against the message's end.
#[inline(always)]
fn quoted_l4(
    ctx: &TcContext,
    l4_off: usize,
    l4_proto: u8,
    end: usize,
) -> Result<(Ports, bool), Verdict> {
    if l4_proto != proto::TCP && l4_proto != proto::UDP {
        return Err(Verdict::pass(reason::PASS_OTHER_PROTO));
    }
    // RFC 792 asks for 8 bytes of the L4 header: a shorter quote cannot be
    // matched to a flow (`pass_truncated`, unchanged).
    if l4_off + QUOTED_L4 > end {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    let ports: Ports = read(ctx, l4_off)?;
    let csum_end = l4_off
        + if l4_proto == proto::TCP {
            TCP_CSUM_OFF + 2
        } else {
            UDP_CSUM_OFF + 2
        };
    Ok((ports, csum_end <= end))
}

#[inline(always)]
fn try_error4<L: Link, const EGRESS: bool>(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let icmp_off = L::L3_OFF + ipv4::HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4_off = inner_off + ipv4::HLEN;
    // The type is within what the parse step made linear.
    let icmp_type: u8 = read(ctx, icmp_off)?;
    if !is_error(true, icmp_type) {
        return Err(Verdict::pass(reason::PASS_OTHER_PROTO));
    }
    linearize(ctx, inner_l4_off + QUOTED_L4_CSUM_END);
    let outer: Ipv4Hdr = read(ctx, L::L3_OFF)?;
    let end = message_end::<L>(ctx, usize::from(u16::from_be(outer.tot_len_be)))?;
    if inner_l4_off > end {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    let inner: Ipv4Hdr = read(ctx, inner_off)?;
    if inner.version_ihl >> 4 != 4 {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    if inner.version_ihl != ipv4::VERSION_IHL {
        return Err(Verdict::pass(reason::PASS_IP_OPTIONS));
    }
    if u16::from_be(inner.frag_off_be) & FRAG_OFFSET_MASK != 0 {
        return Err(Verdict::pass(reason::PASS_FRAGMENT));
    }
    let (ports, l4_csum) = quoted_l4(ctx, inner_l4_off, inner.proto, end)?;
    let slot = slot::<Addr4>()?;
    slot.quote = Quote {
        outer_saddr: outer.saddr,
        outer_daddr: outer.daddr,
        inner: Tuple {
            saddr: inner.saddr,
            daddr: inner.daddr,
            sport_be: ports.sport_be,
            dport_be: ports.dport_be,
            proto: inner.proto,
        },
        l4_csum,
    };
    decode_unit(translation_sub::<V4<L>, EGRESS>(ctx))?;
    rewrite4::<L>(ctx, slot)?;
    Ok(TRANSLATED)
}

#[inline(always)]
fn try_error6<L: Link, const EGRESS: bool>(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let icmp_off = L::L3_OFF + ipv6::HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4_off = inner_off + ipv6::HLEN;
    // The type is within what the parse step made linear.
    let icmp_type: u8 = read(ctx, icmp_off)?;
    if !is_error(false, icmp_type) {
        return Err(Verdict::pass(reason::PASS_OTHER_PROTO));
    }
    linearize(ctx, inner_l4_off + QUOTED_L4_CSUM_END);
    let payload_len_be: u16 = read(ctx, L::L3_OFF + ipv6::PAYLOAD_LEN_OFF)?;
    let payload_len = usize::from(u16::from_be(payload_len_be));
    let end = message_end::<L>(ctx, ipv6::HLEN + payload_len)?;
    if inner_l4_off > end {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    let version: u8 = read(ctx, inner_off)?;
    if version >> 4 != 6 {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    let next: u8 = read(ctx, inner_off + ipv6::NEXT_HDR_OFF)?;
    if next == ipv6::NEXTHDR_FRAGMENT {
        return Err(Verdict::pass(reason::PASS_FRAGMENT));
    }
    if ipv6::is_extension(next) {
        return Err(Verdict::pass(reason::PASS_EXT_HDR));
    }
    let (ports, l4_csum) = quoted_l4(ctx, inner_l4_off, next, end)?;
    let slot = slot::<Addr6>()?;
    let quote = &mut slot.quote;
    quote.outer_saddr = read(ctx, L::L3_OFF + ipv6::SADDR_OFF)?;
    quote.outer_daddr = read(ctx, L::L3_OFF + ipv6::DADDR_OFF)?;
    quote.inner.saddr = read(ctx, inner_off + ipv6::SADDR_OFF)?;
    quote.inner.daddr = read(ctx, inner_off + ipv6::DADDR_OFF)?;
    quote.inner.sport_be = ports.sport_be;
    quote.inner.dport_be = ports.dport_be;
    quote.inner.proto = next;
    quote.l4_csum = l4_csum;
    decode_unit(translation_sub::<V6<L>, EGRESS>(ctx))?;
    decode_unit(rewrite6_sub::<L>(ctx))?;
    Ok(TRANSLATED)
}

/// The live entry of `key` in the main map or the map of new flows (an
/// error may come before the flow's first answer: a SYN's time exceeded,
/// a first datagram's port unreachable).
#[inline(always)]
fn live_entry<F: Family>(key: &CtKey<F::Addr>) -> Option<*const CtEntry> {
    let now = ct::now_ns();
    // SAFETY: map values, read in place.
    if let Some(entry) = F::conntrack().get_ptr(key) {
        return ct::usable(unsafe { &*entry }, key.proto, 0, now, true).then_some(entry);
    }
    let entry = F::conntrack_new().get_ptr(key)?;
    // SAFETY: as above.
    ct::usable(unsafe { &*entry }, key.proto, 0, now, false).then_some(entry)
}

/// `translation` as a subprogram (its lookups' keys in a frame of their
/// own), on the family's slot: `encode_unit`.
#[inline(never)]
fn translation_sub<F: Family, const EGRESS: bool>(ctx: &TcContext) -> u64
where
    F::Addr: Scratched,
{
    encode_unit(translation::<F, EGRESS>(ctx))
}

/// What the error in the slot becomes (written to the slot), or
/// `pass_other_proto` (unchanged) when it is about no translated flow.
#[inline(always)]
fn translation<F: Family, const EGRESS: bool>(ctx: &TcContext) -> Result<(), Verdict>
where
    F::Addr: Scratched,
{
    let slot = slot::<F::Addr>()?;
    let q = &slot.quote.inner;
    let new = &mut slot.new;
    new.outer_saddr = slot.quote.outer_saddr;
    new.outer_daddr = slot.quote.outer_daddr;
    new.inner = *q;
    // The quoted tuple reversed: the key a packet of the quoted packet's
    // other direction carries.
    let mut key = CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport_be: q.dport_be,
        dport_be: q.sport_be,
        proto: q.proto,
        dir: ct_dir::REPLY,
        _pad: [0; 2],
    };
    let none = Verdict::pass(reason::PASS_OTHER_PROTO);
    if let Some(entry) = live_entry::<F>(&key) {
        // Towards the client: the quote went client (or its source-NAT
        // address) -> backend.
        // SAFETY: map value, fields read in place.
        let (rev_nat_id, flags) = unsafe { ((*entry).rev_nat_id, (*entry).flags) };
        // SAFETY: the value is read in place at once.
        let rev_nat = unsafe { F::rev_nats().get(&rev_nat_id) }.ok_or(none)?;
        new.inner.daddr = rev_nat.addr;
        new.inner.dport_be = rev_nat.port_be;
        if flags & ct_flags::SNAT != 0 {
            // SAFETY: as above.
            new.inner.saddr = F::from_nat(unsafe { &(*entry).nat_addr });
            new.inner.sport_be = unsafe { (*entry).nat_port_be };
        }
        if slot.quote.outer_daddr == q.saddr {
            new.outer_daddr = new.inner.saddr;
        }
        if slot.quote.outer_saddr == q.daddr {
            new.outer_saddr = rev_nat.addr;
        }
    } else {
        key.dir = ct_dir::SERVICE;
        let entry = live_entry::<F>(&key).ok_or(none)?;
        // Towards the backend: the quote went frontend -> client (a reply
        // as translated).
        // SAFETY: map value, fields read in place.
        let (backend_id, rev_nat_id, flags) =
            unsafe { ((*entry).backend_id, (*entry).rev_nat_id, (*entry).flags) };
        // A cleared entry (rev-NAT id 0) is no longer the flow's backend.
        let backend = F::backend(backend_id)
            .filter(|backend| backend.rev_nat_id == rev_nat_id)
            .ok_or(none)?;
        new.inner.saddr = backend.addr;
        new.inner.sport_be = backend.port_be;
        if flags & ct_flags::SNAT != 0 {
            // SAFETY: as above.
            new.inner.daddr = F::from_nat(unsafe { &(*entry).nat_addr });
            new.inner.dport_be = unsafe { (*entry).nat_port_be };
        }
        if slot.quote.outer_daddr == q.saddr {
            new.outer_daddr = backend.addr;
        }
        if slot.quote.outer_saddr == q.daddr {
            new.outer_saddr = new.inner.daddr;
        }
    }
    // As a reply: an error entering through a pod-facing interface must
    // come from a source routed back through it, or a pod could have
    // errors about other pods' flows delivered as the frontend's.
    if !EGRESS && fwd::source_routed_back::<F>(ctx) == 0 {
        return Err(Verdict::drop(reason::DROP_SPOOFED_SOURCE));
    }
    Ok(())
}

/// The quoted L4 checksum updated by `diff` (addresses and ports), or
/// `None` when it is not quoted or is a UDP datagram's "no checksum" (0,
/// IPv4). A UDP result of 0 is written as 0xffff (0 means none).
#[inline(always)]
fn quoted_l4_csum(
    ctx: &TcContext,
    l4_off: usize,
    l4_proto: u8,
    present: bool,
    diff: CsumDiff,
) -> Result<Option<(usize, u16, u16)>, Verdict> {
    if !present {
        return Ok(None);
    }
    let udp = l4_proto == proto::UDP;
    let off = l4_off + if udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
    let old: u16 = read(ctx, off)?;
    if udp && old == 0 {
        return Ok(None);
    }
    let mut new = diff.apply(old);
    if udp && new == 0 {
        new = 0xffff;
    }
    Ok(Some((off, old, new)))
}

/// Writes the quoted ports and checksum; returns the ICMP message's
/// difference for them.
#[inline(always)]
fn rewrite_quoted_l4<A: Copy>(
    ctx: &TcContext,
    l4_off: usize,
    quote: &Quote<A>,
    new: &Tuple<A>,
    addr_diff: CsumDiff,
) -> Result<CsumDiff, Verdict> {
    let old = &quote.inner;
    let new_ports = Ports {
        sport_be: new.sport_be,
        dport_be: new.dport_be,
    };
    let port_diff = CsumDiff::NONE
        .half(old.sport_be, new.sport_be)
        .half(old.dport_be, new.dport_be);
    let mut message = port_diff;
    if let Some((off, old_csum, new_csum)) = quoted_l4_csum(
        ctx,
        l4_off,
        old.proto,
        quote.l4_csum,
        addr_diff.add(port_diff),
    )? {
        write(ctx, off, new_csum)?;
        message = message.half(old_csum, new_csum);
    }
    write(ctx, l4_off, new_ports)?;
    Ok(message)
}

/// Writes an IPv4 error's translation: quoted header (addresses, checksum),
/// quoted ports and L4 checksum, ICMP checksum, outer header.
#[inline(always)]
fn rewrite4<L: Link>(ctx: &TcContext, slot: &Slot<Addr4>) -> Result<(), Verdict> {
    let (quote, new) = (&slot.quote, &slot.new);
    let icmp_off = L::L3_OFF + ipv4::HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4_off = inner_off + ipv4::HLEN;
    let old = &quote.inner;
    let inner_addrs = CsumDiff::NONE
        .bytes4(old.saddr, new.inner.saddr)
        .bytes4(old.daddr, new.inner.daddr);
    let inner_check: u16 = read(ctx, inner_off + ipv4::CSUM_OFF)?;
    let new_inner_check = inner_addrs.apply(inner_check);
    let l4 = rewrite_quoted_l4(ctx, inner_l4_off, quote, &new.inner, inner_addrs)?;
    write(ctx, inner_off + ipv4::SADDR_OFF, new.inner.saddr)?;
    write(ctx, inner_off + ipv4::DADDR_OFF, new.inner.daddr)?;
    write(ctx, inner_off + ipv4::CSUM_OFF, new_inner_check)?;
    // The ICMP checksum covers the whole message (no pseudo-header).
    let message = inner_addrs.add(l4).half(inner_check, new_inner_check);
    let icmp_check: u16 = read(ctx, icmp_off + ICMP_CSUM_OFF)?;
    write(ctx, icmp_off + ICMP_CSUM_OFF, message.apply(icmp_check))?;
    let outer = CsumDiff::NONE
        .bytes4(quote.outer_saddr, new.outer_saddr)
        .bytes4(quote.outer_daddr, new.outer_daddr);
    let outer_check: u16 = read(ctx, L::L3_OFF + ipv4::CSUM_OFF)?;
    write(ctx, L::L3_OFF + ipv4::SADDR_OFF, new.outer_saddr)?;
    write(ctx, L::L3_OFF + ipv4::DADDR_OFF, new.outer_daddr)?;
    write(ctx, L::L3_OFF + ipv4::CSUM_OFF, outer.apply(outer_check))?;
    Ok(())
}

/// `CsumDiff::bytes16` of two addresses of the slot, read as the aligned
/// words they are (byte by byte, four of them took the frame over the
/// verifier's limit in register spills).
#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "the slot's addresses are 4-aligned (asserted below)"
)]
fn words16(diff: CsumDiff, old: &Addr6, new: &Addr6) -> CsumDiff {
    // SAFETY: the slot's addresses are 4-aligned (`Tuple` is, and the
    // `repr(C)` structs around them keep it).
    let (old, new) = unsafe {
        (
            &*core::ptr::from_ref(old).cast::<[u32; 4]>(),
            &*core::ptr::from_ref(new).cast::<[u32; 4]>(),
        )
    };
    diff.word(old[0], new[0])
        .word(old[1], new[1])
        .word(old[2], new[2])
        .word(old[3], new[3])
}

/// `rewrite6` as a subprogram, on the IPv6 slot: `encode_unit`.
#[inline(never)]
fn rewrite6_sub<L: Link>(ctx: &TcContext) -> u64 {
    encode_unit(slot::<Addr6>().and_then(|slot| rewrite6::<L>(ctx, slot)))
}

/// Writes an IPv6 error's translation: quoted addresses, quoted ports and
/// L4 checksum, outer addresses, and the `ICMPv6` checksum (which covers
/// the outer addresses through its pseudo-header).
#[inline(always)]
fn rewrite6<L: Link>(ctx: &TcContext, slot: &Slot<Addr6>) -> Result<(), Verdict> {
    let (quote, new) = (&slot.quote, &slot.new);
    let icmp_off = L::L3_OFF + ipv6::HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4_off = inner_off + ipv6::HLEN;
    let old = &quote.inner;
    let inner_addrs = words16(
        words16(CsumDiff::NONE, &old.saddr, &new.inner.saddr),
        &old.daddr,
        &new.inner.daddr,
    );
    let l4 = rewrite_quoted_l4(ctx, inner_l4_off, quote, &new.inner, inner_addrs)?;
    write(ctx, inner_off + ipv6::SADDR_OFF, new.inner.saddr)?;
    write(ctx, inner_off + ipv6::DADDR_OFF, new.inner.daddr)?;
    let outer = words16(
        words16(CsumDiff::NONE, &quote.outer_saddr, &new.outer_saddr),
        &quote.outer_daddr,
        &new.outer_daddr,
    );
    write(ctx, L::L3_OFF + ipv6::SADDR_OFF, new.outer_saddr)?;
    write(ctx, L::L3_OFF + ipv6::DADDR_OFF, new.outer_daddr)?;
    let message = inner_addrs.add(l4).add(outer);
    let icmp_check: u16 = read(ctx, icmp_off + ICMP_CSUM_OFF)?;
    write(ctx, icmp_off + ICMP_CSUM_OFF, message.apply(icmp_check))?;
    Ok(())
}

// `words16` reads the slot's addresses as words.
const _: () = assert!(core::mem::align_of::<Slot<Addr6>>() >= 4);
