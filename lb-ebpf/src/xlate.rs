//! The rewrite: addresses and ports of a packet replaced, with incremental
//! checksum updates.
//!
//! The new bytes are written with direct packet access, the IPv4 header
//! checksum is updated in place (it covers only the header), and the L4
//! checksum gets at most two `bpf_l4_csum_replace` calls per packet: one
//! for the address change (pseudo-header) and one for the port change
//! (IPv6 on kernels before 6.16: two more, see `pseudo_csum_replace`). The
//! helper is kept for L4 because only the kernel knows the skb's checksum
//! state: with `CHECKSUM_PARTIAL` (local senders over veth) only the
//! pseudo-header part may be applied to the field, with `CHECKSUM_COMPLETE`
//! `skb->csum` must follow an IPv4 pseudo-header change.

use aya_ebpf::bindings::{BPF_F_IPV6, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use lb_common::{Addr4, Addr6, proto, reason};

use crate::{
    crc32c,
    csum::CsumDiff,
    ctx::Ctx,
    family::{Family, Tuple},
    hdr::{
        Link, ipv4, ipv6,
        l4::{Ports, SCTP_CSUM_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF},
    },
    skb::{read, write},
    verdict::{Verdict, decode_unit, encode_unit},
};

/// Where the L4 checksum is and how to update it.
#[derive(Clone, Copy)]
struct L4Csum {
    /// Offset of the checksum field in the packet.
    off: usize,
    /// Extra flags for `l4_csum_replace` (UDP: `BPF_F_MARK_MANGLED_0`).
    flags: u64,
}

impl L4Csum {
    /// Checksum location for `l4_proto` at `l4_off`. UDP gets
    /// `BPF_F_MARK_MANGLED_0`, for both families: an updated checksum that
    /// comes out as 0 is written as 0xffff (a UDP checksum of 0 means "none",
    /// which RFC 8200 forbids for IPv6, whose receivers drop it), and an IPv4
    /// datagram sent without a checksum (0) keeps none. (IPv6 UDP with a
    /// zero checksum is passed untouched before it gets here.)
    #[inline(always)]
    fn new(l4_proto: u8, l4_off: usize) -> Self {
        if l4_proto == proto::TCP {
            Self {
                off: l4_off + TCP_CSUM_OFF,
                flags: 0,
            }
        } else {
            Self {
                off: l4_off + UDP_CSUM_OFF,
                flags: u64::from(BPF_F_MARK_MANGLED_0),
            }
        }
    }
}

#[inline(always)]
fn rewrite_failed<E>(_: E) -> Verdict {
    Verdict::drop(reason::DROP_REWRITE)
}

/// Rewrites the packet of `old` (the tuple as parsed) to carry `new`'s
/// addresses and ports, with every checksum updated. Fields equal in both
/// are not touched.
#[inline(always)]
pub(crate) fn rewrite<F: Family>(
    ctx: &impl Ctx,
    old: &Tuple<F::Addr>,
    new: &Tuple<F::Addr>,
) -> Result<(), Verdict> {
    rewrite_at::<F, 0>(ctx, old, new)
}

/// `rewrite` of a packet whose L4 header is `EXT` bytes after
/// `F::L4_OFF` (an IPv6 first fragment's, after the Fragment header).
#[inline(always)]
pub(crate) fn rewrite_at<F: Family, const EXT: usize>(
    ctx: &impl Ctx,
    old: &Tuple<F::Addr>,
    new: &Tuple<F::Addr>,
) -> Result<(), Verdict> {
    let l4_off = F::L4_OFF + EXT;
    let csum = L4Csum::new(old.proto, l4_off);
    // Direct writes first: the checksum helpers invalidate packet pointers.
    let addr_diff = F::write_addrs(ctx, old, new)?;
    if old.proto == proto::SCTP {
        // IPv4's header checksum covers its address change; IPv6's
        // addresses count in `skb->csum` only.
        let skb_diff = match addr_diff {
            Some(diff) if !F::IS_V4 => diff.wsum(),
            _ => 0,
        };
        return decode_unit(sctp_ports::<F>(
            ctx,
            ports_word(Ports {
                sport_be: old.sport_be,
                dport_be: old.dport_be,
            }),
            ports_word(Ports {
                sport_be: new.sport_be,
                dport_be: new.dport_be,
            }),
            skb_diff,
        ));
    }
    let ports_changed = old.sport_be != new.sport_be || old.dport_be != new.dport_be;
    let mut port_diff = CsumDiff::NONE;
    if ports_changed {
        let old_ports = Ports {
            sport_be: old.sport_be,
            dport_be: old.dport_be,
        };
        let new_ports = Ports {
            sport_be: new.sport_be,
            dport_be: new.dport_be,
        };
        write(ctx, l4_off, new_ports)?;
        port_diff = port_diff.word(ports_word(old_ports), ports_word(new_ports));
    }
    if let Some(diff) = addr_diff {
        pseudo_csum_replace(ctx, csum, F::IS_V4, diff)?;
    }
    if ports_changed {
        ctx.l4_csum_add(csum.off, u64::from(port_diff.wsum()), csum.flags)
            .map_err(rewrite_failed)?;
    }
    Ok(())
}

/// The port change of an SCTP packet (its addresses already written):
/// the ports and the `CRC32c` updated for them (`crc32c`), and `skb->csum`
/// (`CHECKSUM_COMPLETE`) for every byte changed, `skb_diff` being the
/// IPv6 address change. A checksum field of 0 is left alone: it is one
/// not computed yet (`CHECKSUM_PARTIAL`, a local sender over veth, which
/// offers SCTP checksum offload), which is computed over the new ports
/// when the packet leaves; a computed `CRC32c` is 0 once in 2^32 packets,
/// which the receiver then drops and SCTP retransmits. A subprogram: its
/// own small frame, off the to-backend chain's deepest one; scalar
/// arguments and result (`encode_unit`).
#[inline(never)]
fn sctp_ports<F: Family>(ctx: &impl Ctx, old_ports: u32, new_ports: u32, skb_diff: u32) -> u64 {
    encode_unit(try_sctp_ports::<F>(ctx, old_ports, new_ports, skb_diff))
}

#[inline(always)]
fn try_sctp_ports<F: Family>(
    ctx: &impl Ctx,
    old_ports: u32,
    new_ports: u32,
    skb_diff: u32,
) -> Result<(), Verdict> {
    let l4_off = F::L4_OFF;
    let mut diff = CsumDiff::NONE;
    if old_ports != new_ports {
        // The SCTP packet's length as the IP header declares it (the
        // parser checked it against the packet; link padding is not part
        // of it).
        let len = if F::IS_V4 {
            let l3_off = l4_off - ipv4::HLEN;
            #[expect(clippy::cast_possible_truncation, reason = "20")]
            u32::from(u16::from_be(read::<u16>(ctx, l3_off + ipv4::TOT_LEN_OFF)?))
                .saturating_sub(ipv4::HLEN as u32)
        } else {
            let l3_off = l4_off - ipv6::HLEN;
            u32::from(u16::from_be(read::<u16>(
                ctx,
                l3_off + ipv6::PAYLOAD_LEN_OFF,
            )?))
        };
        let check: u32 = read(ctx, l4_off + SCTP_CSUM_OFF)?;
        write(ctx, l4_off, new_ports)?;
        diff = diff.word(old_ports, new_ports);
        if check != 0 {
            let delta =
                crc32c::first_word_delta(old_ports.to_ne_bytes(), new_ports.to_ne_bytes(), len);
            // The field holds the CRC little-endian.
            let new_check = check ^ u32::from_ne_bytes(delta.to_le_bytes());
            write(ctx, l4_off + SCTP_CSUM_OFF, new_check)?;
            diff = diff.word(check, new_check);
        }
    }
    let total = diff.add_wsum(skb_diff).wsum();
    if total != 0 {
        // At TC fails, harmlessly, unless the skb is `CHECKSUM_COMPLETE`;
        // nothing at XDP.
        ctx.csum_update(total);
    }
    Ok(())
}

/// The two ports as the one 32-bit word they occupy in the packet.
#[inline(always)]
fn ports_word(ports: Ports) -> u32 {
    let s = ports.sport_be.to_ne_bytes();
    let d = ports.dport_be.to_ne_bytes();
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// Applies a pseudo-header (address) change to the L4 checksum. For IPv6,
/// `BPF_F_IPV6` tells the kernel that `skb->csum` (`CHECKSUM_COMPLETE`) must
/// not change, since the address bytes themselves changed by the same
/// amount. Kernels before 6.16 refuse the flag: they get the call without
/// it, which takes the difference off `skb->csum`, and `bpf_csum_update`
/// puts it back (it fails, harmlessly, for every other checksum state).
#[inline(always)]
fn pseudo_csum_replace(
    ctx: &impl Ctx,
    csum: L4Csum,
    v4: bool,
    diff: CsumDiff,
) -> Result<(), Verdict> {
    let flags = u64::from(BPF_F_PSEUDO_HDR) | csum.flags;
    let diff = u64::from(diff.wsum());
    if v4 {
        return ctx
            .l4_csum_add(csum.off, diff, flags)
            .map_err(rewrite_failed);
    }
    if ctx
        .l4_csum_add(csum.off, diff, flags | u64::from(BPF_F_IPV6))
        .is_ok()
    {
        return Ok(());
    }
    ctx.l4_csum_add(csum.off, diff, flags)
        .map_err(rewrite_failed)?;
    #[expect(clippy::cast_possible_truncation, reason = "a 32-bit wsum")]
    ctx.csum_update(diff as u32);
    Ok(())
}

/// `Family::write_addrs` of IPv4: writes the addresses and updates the
/// header checksum; returns the pseudo-header difference, or `None` when
/// the addresses are unchanged.
#[inline(always)]
pub(crate) fn write_addrs4<L: Link>(
    ctx: &impl Ctx,
    old: &Tuple<Addr4>,
    new: &Tuple<Addr4>,
) -> Result<Option<CsumDiff>, Verdict> {
    let csum_off = L::L3_OFF + ipv4::CSUM_OFF;
    if old.saddr == new.saddr && old.daddr == new.daddr {
        return Ok(None);
    }
    let diff = CsumDiff::NONE
        .bytes4(old.saddr, new.saddr)
        .bytes4(old.daddr, new.daddr);
    let check: u16 = read(ctx, csum_off)?;
    write(ctx, L::L3_OFF + ipv4::SADDR_OFF, new.saddr)?;
    write(ctx, L::L3_OFF + ipv4::DADDR_OFF, new.daddr)?;
    write(ctx, csum_off, diff.apply(check))?;
    Ok(Some(diff))
}

/// `Family::write_addrs` of IPv6: writes the addresses that change (IPv6
/// has no header checksum); returns the pseudo-header difference, or
/// `None` when none changes.
#[inline(always)]
pub(crate) fn write_addrs6<L: Link>(
    ctx: &impl Ctx,
    old: &Tuple<Addr6>,
    new: &Tuple<Addr6>,
) -> Result<Option<CsumDiff>, Verdict> {
    let mut diff = CsumDiff::NONE;
    let mut changed = false;
    if old.saddr != new.saddr {
        diff = diff.bytes16(&old.saddr, &new.saddr);
        write(ctx, L::L3_OFF + ipv6::SADDR_OFF, new.saddr)?;
        changed = true;
    }
    if old.daddr != new.daddr {
        diff = diff.bytes16(&old.daddr, &new.daddr);
        write(ctx, L::L3_OFF + ipv6::DADDR_OFF, new.daddr)?;
        changed = true;
    }
    Ok(changed.then_some(diff))
}
