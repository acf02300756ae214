//! Packet access: the one bounds-checked accessor (`ptr_at`) and the
//! reads and writes built on it.

use aya_ebpf::programs::TcContext;
use lb_common::reason;

use crate::{
    ctx::Ctx,
    hdr::{eth::ETH_HLEN, ipv6, l4::TCP_HLEN},
    verdict::Verdict,
};

/// Bytes that must be linear for the largest header stack we parse
/// (Ethernet + IPv6 + TCP without options).
#[expect(clippy::cast_possible_truncation, reason = "74 bytes")]
const MAX_PARSED_HEADERS: u32 = (ETH_HLEN + ipv6::HLEN + TCP_HLEN) as u32;

/// A pointer to a `T` at `offset` in the packet, or a pass verdict if the
/// packet is too short.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &impl Ctx, offset: usize) -> Result<*const T, Verdict> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    Ok((start + offset) as *const T)
}

/// Reads a `T` at `offset`.
#[inline(always)]
pub(crate) fn read<T: Copy>(ctx: &impl Ctx, offset: usize) -> Result<T, Verdict> {
    let ptr = ptr_at::<T>(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at; T is plain bytes.
    Ok(unsafe { ptr.read_unaligned() })
}

/// Writes a `T` at `offset` (direct packet access; a TC program that
/// writes gets the verifier's unclone prologue, so the bytes are its own).
#[inline(always)]
pub(crate) fn write<T: Copy>(ctx: &impl Ctx, offset: usize, value: T) -> Result<(), Verdict> {
    let ptr = ptr_at::<T>(ctx, offset)?.cast_mut();
    // SAFETY: bounds checked by ptr_at; T is plain bytes.
    unsafe { ptr.write_unaligned(value) };
    Ok(())
}

/// Makes the headers we parse linear when the skb keeps them in fragments,
/// so direct packet access sees them. Failure just means we see less.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "an skb's linear part is far below 4 GiB"
)]
pub(crate) fn linearize_headers(ctx: &TcContext) {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if linear < MAX_PARSED_HEADERS && len > linear {
        let want = if len < MAX_PARSED_HEADERS {
            len
        } else {
            MAX_PARSED_HEADERS
        };
        let _ = ctx.pull_data(want);
    }
}
