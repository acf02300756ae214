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
//! The write sites are in `ct.rs` and `lb.rs` (conntrack, affinity) and
//! `maps.rs` (counters); a new map write must check [`dry_run`] too.

use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, macros::map, maps::PerCpuArray, programs::TcContext,
};
use lb_common::probe;

/// Per CPU: 1 while a dry-run packet is in the pipeline. The write sites
/// have no context to read the mark from, hence a flag; per CPU because a
/// program run is not migrated.
#[map]
static LB_PROBE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Starts a packet: sets the flag from its mark and returns the flag's
/// previous value for [`finish`]. (A test run is not protected from
/// softirqs: a real packet may run on this CPU in the middle of a dry run.
/// It saves and restores the flag, so the dry run stays dry.)
#[inline(always)]
pub(crate) fn begin(ctx: &TcContext) -> u32 {
    // SAFETY: the context of a TC program is an `__sk_buff`.
    let mark = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).mark };
    let Some(flag) = LB_PROBE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot of this run.
    unsafe {
        let previous = *flag;
        *flag = u32::from(mark == probe::MARK);
        previous
    }
}

/// True while the packet in the pipeline is a dry run: skip map writes.
#[inline(always)]
pub(crate) fn dry_run() -> bool {
    LB_PROBE.get(0).is_some_and(|flag| *flag != 0)
}

/// Ends a packet: restores the flag [`begin`] returned and, for a dry run,
/// writes the verdict's reason to `cb[0]`. Returns true for a dry run (its
/// verdict is not counted).
#[inline(always)]
pub(crate) fn finish(ctx: &mut TcContext, previous: u32, reason: u32) -> bool {
    let dry = dry_run();
    if let Some(flag) = LB_PROBE.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this run.
        unsafe { *flag = previous };
    }
    if dry && let Some(cb) = ctx.cb_mut().first_mut() {
        *cb = probe::ANSWER | (reason & probe::REASON_MASK);
    }
    dry
}
