//! TC programs of the lb service load balancer.
//!
//! `lb_tc` runs on ingress of every attached interface: packets addressed to
//! a service (VIP:port/proto) get their destination translated to a backend
//! (DNAT), and the backends' replies get their source translated back to the
//! service (reverse NAT), both tracked in per-family conntrack maps.
//!
//! This file holds the entry points only; `tc` is the pipeline behind
//! `lb_tc`. `csum`, `hash`, `tcp_reset` and `verdict` are plain computations: they also
//! build on the host, where their unit tests run (`cargo test -p lb-ebpf`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![warn(unreachable_pub, unused_crate_dependencies)]
// Inlining is decided by hand here: what is a subprogram (`inline(never)`)
// sets the stack frames the verifier adds up, and everything else must be
// inlined into them (`inline(always)`) for the per-packet cost.
#![allow(
    clippy::inline_always,
    reason = "inlining is part of the verifier's stack budget"
)]
// On the host only the unit tests of the plain modules are built.
#![cfg_attr(
    not(target_arch = "bpf"),
    allow(
        unused_crate_dependencies,
        reason = "the BPF-only modules are not built"
    )
)]

#[cfg(any(target_arch = "bpf", test))]
mod csum;
#[cfg(target_arch = "bpf")]
mod ct;
#[cfg(target_arch = "bpf")]
mod family;
#[cfg(target_arch = "bpf")]
mod fwd;
#[cfg(any(target_arch = "bpf", test))]
mod hash;
#[cfg(target_arch = "bpf")]
mod hdr;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maglev;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod skb;
#[cfg(target_arch = "bpf")]
mod snat;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(any(target_arch = "bpf", test))]
mod tcp_reset;
#[cfg(any(target_arch = "bpf", test))]
mod verdict;
#[cfg(target_arch = "bpf")]
mod xlate;
#[cfg(target_arch = "bpf")]
mod zeroed;

#[cfg(target_arch = "bpf")]
use aya_ebpf::{macros::classifier, programs::TcContext};
#[cfg(target_arch = "bpf")]
use lb_common::reason;

/// The load balancer: its one verdict point. Every packet is counted under
/// the reason of its verdict, then gets the verdict's action.
#[cfg(target_arch = "bpf")]
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "`classifier` hands the context over by value"
)]
fn lb_tc(ctx: TcContext) -> i32 {
    let verdict = tc::run(&ctx);
    maps::count_reason(verdict.reason);
    verdict.action
}

/// Does nothing: the floor that `lb_tc`'s per-packet cost is measured
/// against (same hook, same packet). Never attached by the agent.
#[cfg(target_arch = "bpf")]
#[classifier]
fn lb_floor(_ctx: TcContext) -> i32 {
    verdict::Verdict::pass(reason::PASS_NO_SERVICE).action
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

/// GPL-compatible licence: some helpers are GPL-only.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// The eBPF crate only has content when built for a BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
