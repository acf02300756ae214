//! The hook a packet is seen at: an skb at TC, a frame at XDP. The
//! pipeline (`tc`'s parse and translate steps, `xlate`, `fwd`'s reverse
//! path check) is written once over `Ctx`, as it is over `Family` and
//! `hdr::Link`; each entry point gets its own monomorphised copy, so the TC
//! programs compile to what they were before this trait existed.
//!
//! What differs: the packet's length (the skb may hold more than its
//! linear part; a frame is all linear), checksums (at TC only the kernel
//! knows the skb's checksum state, so the helpers update the L4 field; an
//! XDP frame from the wire carries full checksums, updated here with the
//! RFC 1624 arithmetic of `csum`), and what a refusal is (TC builds the
//! ICMP error or reset; XDP hands the packet to TC unchanged).

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0},
    helpers::bpf_csum_update,
    programs::{TcContext, XdpContext},
};
use lb_common::reason;

use crate::{csum::CsumDiff, family::Family, skb, verdict::Verdict};

/// A packet at a hook (see the module comment).
pub(crate) trait Ctx: EbpfContext {
    /// Start of the packet's (linear) bytes.
    fn data(&self) -> usize;
    /// End of the packet's linear bytes.
    fn data_end(&self) -> usize;
    /// The packet's length, non-linear part included.
    fn len(&self) -> u32;
    /// GSO segment size (0: not a GSO packet; always 0 at XDP).
    fn gso_size(&self) -> u32;
    /// The device the packet is on (ingress at XDP).
    fn ifindex(&self) -> u32;
    /// `bpf_l4_csum_replace` with `from` 0: adds the 32-bit difference
    /// `diff` to the L4 checksum at `off` (`flags`: `BPF_F_PSEUDO_HDR`,
    /// `BPF_F_MARK_MANGLED_0`, `BPF_F_IPV6`).
    fn l4_csum_add(&self, off: usize, diff: u64, flags: u64) -> Result<(), i64>;
    /// `bpf_csum_update`: `skb->csum` follows a change (nothing at XDP).
    fn csum_update(&self, diff: u32);
    /// A refusal of the packet (no backend, unserved port).
    fn reject<F: Family>(&self) -> Result<Verdict, Verdict>;
}

impl Ctx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: the context of a TC program is an `__sk_buff`.
        unsafe { (*self.as_ptr().cast::<__sk_buff>()).gso_size }
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context of a TC program is an `__sk_buff`.
        unsafe { (*self.as_ptr().cast::<__sk_buff>()).ifindex }
    }
    #[inline(always)]
    fn l4_csum_add(&self, off: usize, diff: u64, flags: u64) -> Result<(), i64> {
        self.l4_csum_replace(off, 0, diff, flags)
    }
    #[inline(always)]
    fn csum_update(&self, diff: u32) {
        // SAFETY: the context of a TC program is an `__sk_buff`.
        unsafe { bpf_csum_update(self.as_ptr().cast::<__sk_buff>(), diff) };
    }
    #[inline(always)]
    fn reject<F: Family>(&self) -> Result<Verdict, Verdict> {
        F::reject(self)
    }
}

impl Ctx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    #[expect(clippy::cast_possible_truncation, reason = "a frame is below 4 GiB")]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }
    #[inline(always)]
    #[expect(clippy::cast_possible_truncation, reason = "an ifindex is 32 bits")]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
    /// The frame's checksum is complete (nothing offloaded before XDP):
    /// the difference is applied to the field itself. As the helper with
    /// `BPF_F_MARK_MANGLED_0`: a UDP field of 0 (no checksum) stays 0, a
    /// result of 0 is written as 0xffff.
    #[inline(always)]
    fn l4_csum_add(&self, off: usize, diff: u64, flags: u64) -> Result<(), i64> {
        let old: u16 = skb::read(self, off).map_err(|_| -1_i64)?;
        let mangled_0 = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
        if mangled_0 && old == 0 {
            return Ok(());
        }
        #[expect(clippy::cast_possible_truncation, reason = "a 32-bit wsum")]
        let mut new = CsumDiff::NONE.word(u32::MAX, diff as u32).apply(old);
        if mangled_0 && new == 0 {
            new = 0xffff;
        }
        skb::write(self, off, new).map_err(|_| -1_i64)
    }
    #[inline(always)]
    fn csum_update(&self, _diff: u32) {}
    /// TC builds the refusal: the frame goes on unchanged.
    #[inline(always)]
    fn reject<F: Family>(&self) -> Result<Verdict, Verdict> {
        Err(Verdict::pass(reason::PASS_NO_SERVICE))
    }
}
