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

/// A packet in the pipeline: whether it is a dry run, and the flag to
/// restore when it is done.
pub(crate) struct Scope {
    /// This CPU's flag (null if the map could not be read: then nothing is
    /// a dry run and nothing is restored).
    flag: *mut u32,
    /// The flag's value before this packet.
    previous: u32,
    /// This packet is a dry run.
    dry: bool,
}

/// Starts a packet: sets the flag from its mark and remembers the flag's
/// previous value for [`finish`]. (A test run is not protected from
/// softirqs: a real packet may run on this CPU in the middle of a dry run.
/// It saves and restores the flag, so the dry run stays dry.) One map
/// lookup per packet: its pointer is kept until [`finish`] (the program
/// does not migrate between CPUs while it runs).
#[inline(always)]
pub(crate) fn begin(ctx: &TcContext) -> Scope {
    // SAFETY: the context of a TC program is an `__sk_buff`.
    let dry = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).mark } == probe::MARK;
    let Some(flag) = LB_PROBE.get_ptr_mut(0) else {
        return Scope {
            flag: core::ptr::null_mut(),
            previous: 0,
            dry: false,
        };
    };
    // SAFETY: per-CPU slot of this run.
    let previous = unsafe { *flag };
    // Written only when it changes: the common case (no dry run anywhere)
    // costs a read.
    if previous != u32::from(dry) {
        // SAFETY: as above.
        unsafe { *flag = u32::from(dry) };
    }
    Scope {
        flag,
        previous,
        dry,
    }
}

/// True while the packet in the pipeline is a dry run: skip map writes.
#[inline(always)]
pub(crate) fn dry_run() -> bool {
    LB_PROBE.get(0).is_some_and(|flag| *flag != 0)
}

/// Ends a packet: restores the flag [`begin`] found and, for a dry run,
/// writes the verdict's reason to `cb[0]`. Returns true for a dry run (its
/// verdict is not counted).
#[inline(always)]
pub(crate) fn finish(ctx: &mut TcContext, scope: &Scope, reason: u32) -> bool {
    if !scope.flag.is_null() && scope.previous != u32::from(scope.dry) {
        // SAFETY: this CPU's slot, from `begin` of this run.
        unsafe { *scope.flag = scope.previous };
    }
    if scope.dry
        && let Some(cb) = ctx.cb_mut().first_mut()
    {
        *cb = probe::ANSWER | (reason & probe::REASON_MASK);
    }
    scope.dry
}
