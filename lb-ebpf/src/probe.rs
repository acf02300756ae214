//! Dry runs: the gate that lets `lb explain` and the conformance suite run
//! a crafted packet through the live maps without changing them.
//!
//! A packet handed to `BPF_PROG_TEST_RUN` with `skb->mark ==
//! lb_common::probe::MARK` takes every step a real one takes (lookups,
//! backend choice, source NAT decision, rewrite, reject), but every map
//! *write* checks [`dry_run`] first and is skipped: conntrack and affinity
//! entries (new, refreshed, closing flags) and the counters. What the
//! program would have done is still visible: the rewritten bytes (DNAT,
//! SNAT, the refusal), and the verdict's reason, which [`finish`] hands
//! back in `cb[0]` (`probe::ANSWER | reason`).
//!
//! The write sites are in `ct.rs` and `lb.rs` (conntrack, affinity),
//! `frag.rs` (first fragments' ports) and `maps.rs` (counters); a new map
//! write must check [`dry_run`] too.

use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, macros::map, maps::PerCpuArray, programs::TcContext,
};
use lb_common::probe;

/// Per CPU: a stack of bits, one per packet in the pipeline on this CPU,
/// the newest in bit 0 (1: a dry run). The write sites have no context to
/// read the mark from, hence a flag; per CPU because a program run is not
/// migrated; a stack because a test run is not protected from softirqs: a
/// real packet may run on this CPU in the middle of a dry run, and must
/// neither be taken for one nor end it. Kept in the map, not on the entry
/// point's frame, which is part of the deepest call chain the verifier
/// adds up.
#[map]
static LB_PROBE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Starts a packet: pushes whether it is a dry run (its mark).
#[inline(always)]
pub(crate) fn begin(ctx: &TcContext) {
    if let Some(flag) = LB_PROBE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; the stack is only touched here and in
        // `finish`, in pairs.
        unsafe {
            let bits = *flag;
            let new = (bits << 1) | u32::from(marked(ctx));
            // Written only when it changes: the common case (no dry run
            // anywhere) costs a read.
            if new != bits {
                *flag = new;
            }
        }
    }
}

/// True when `ctx` is a dry-run packet (its mark), for a write site that
/// has the context: a load, where [`dry_run`] is a map lookup.
#[inline(always)]
pub(crate) fn marked(ctx: &TcContext) -> bool {
    // SAFETY: the context of a TC program is an `__sk_buff`.
    unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).mark == probe::MARK }
}

/// True while the packet in the pipeline is a dry run: skip map writes.
#[inline(always)]
pub(crate) fn dry_run() -> bool {
    LB_PROBE.get(0).is_some_and(|bits| *bits & 1 != 0)
}

/// Ends a packet: pops its bit and, for a dry run, writes the verdict's
/// reason to `cb[0]`. Returns true for a dry run (its verdict is not
/// counted).
#[inline(always)]
pub(crate) fn finish(ctx: &mut TcContext, reason: u32) -> bool {
    let Some(flag) = LB_PROBE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, pushed by `begin` of this run.
    let dry = unsafe {
        let bits = *flag;
        if bits != 0 {
            *flag = bits >> 1;
        }
        bits & 1 != 0
    };
    if dry && let Some(cb) = ctx.cb_mut().first_mut() {
        *cb = probe::ANSWER | (reason & probe::REASON_MASK);
    }
    dry
}
