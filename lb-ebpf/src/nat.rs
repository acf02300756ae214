//! Address and port rewrites with incremental checksum updates.
//!
//! The kernel helpers are used for every checksum change so that all skb
//! checksum states work: CHECKSUM_PARTIAL (local senders over veth: only the
//! pseudo-header part is updated), CHECKSUM_COMPLETE and CHECKSUM_NONE.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{proto, reason};

use crate::parse::{ETH_HLEN, TCP_CSUM_OFF, UDP_CSUM_OFF, Verdict};

/// IPv4 header offsets.
pub const IP4_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP4_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP4_DADDR_OFF: usize = ETH_HLEN + 16;
/// IPv6 header offsets.
pub const IP6_SADDR_OFF: usize = ETH_HLEN + 8;
pub const IP6_DADDR_OFF: usize = ETH_HLEN + 24;

/// Where the L4 checksum is and how to update it.
#[derive(Clone, Copy)]
pub struct L4Csum {
    /// Offset of the checksum field in the packet.
    pub off: usize,
    /// Extra flags for `l4_csum_replace` (UDP over IPv4: keep a zero checksum zero).
    pub flags: u64,
}

impl L4Csum {
    /// Checksum location for `l4_proto` at `l4_off`; `v4` selects IPv4's
    /// rule that a zero UDP checksum means "none" and must stay zero.
    #[inline(always)]
    pub fn new(l4_proto: u8, l4_off: usize, v4: bool) -> Self {
        if l4_proto == proto::TCP {
            Self {
                off: l4_off + TCP_CSUM_OFF,
                flags: 0,
            }
        } else {
            Self {
                off: l4_off + UDP_CSUM_OFF,
                flags: if v4 {
                    u64::from(BPF_F_MARK_MANGLED_0)
                } else {
                    0
                },
            }
        }
    }
}

#[inline(always)]
fn rewrite_failed<E>(_: E) -> Verdict {
    Verdict::drop(reason::DROP_REWRITE)
}

/// Rewrites an IPv4 address at `addr_off` and fixes the IP and L4 checksums.
#[inline(always)]
pub fn rewrite_addr4(
    ctx: &TcContext,
    addr_off: usize,
    old: [u8; 4],
    new: [u8; 4],
    csum: L4Csum,
) -> Result<(), Verdict> {
    let old = u32::from_ne_bytes(old);
    let new = u32::from_ne_bytes(new);
    if old == new {
        return Ok(());
    }
    ctx.store(addr_off, &new, 0).map_err(rewrite_failed)?;
    ctx.l3_csum_replace(IP4_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(rewrite_failed)?;
    ctx.l4_csum_replace(
        csum.off,
        u64::from(old),
        u64::from(new),
        u64::from(BPF_F_PSEUDO_HDR) | 4 | csum.flags,
    )
    .map_err(rewrite_failed)
}

/// Rewrites an IPv6 address at `addr_off` and fixes the L4 checksum
/// (IPv6 has no header checksum; the address is in the pseudo-header).
#[inline(always)]
pub fn rewrite_addr6(
    ctx: &TcContext,
    addr_off: usize,
    old: [u8; 16],
    new: [u8; 16],
    csum: L4Csum,
) -> Result<(), Verdict> {
    if old == new {
        return Ok(());
    }
    let mut from = old;
    let mut to = new;
    // SAFETY: both buffers are 16 readable bytes on our stack.
    let diff =
        unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
    if diff < 0 {
        return Err(Verdict::drop(reason::DROP_REWRITE));
    }
    ctx.store(addr_off, &new, 0).map_err(rewrite_failed)?;
    #[expect(clippy::cast_sign_loss, reason = "checked non-negative above")]
    let diff = diff as u64;
    ctx.l4_csum_replace(csum.off, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | csum.flags)
        .map_err(rewrite_failed)
}

/// Rewrites a TCP/UDP port at `port_off` and fixes the L4 checksum.
#[inline(always)]
pub fn rewrite_port(
    ctx: &TcContext,
    port_off: usize,
    old_be: u16,
    new_be: u16,
    csum: L4Csum,
) -> Result<(), Verdict> {
    if old_be == new_be {
        return Ok(());
    }
    ctx.store(port_off, &new_be, 0).map_err(rewrite_failed)?;
    ctx.l4_csum_replace(
        csum.off,
        u64::from(old_be),
        u64::from(new_be),
        2 | csum.flags,
    )
    .map_err(rewrite_failed)
}
