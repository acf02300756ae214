//! TC and cgroup socket programs of the lb service load balancer.
//!
//! `lb_tc` runs on ingress of every attached interface: packets addressed to
//! a service (VIP:port/proto) get their destination translated to a backend
//! (DNAT), and the backends' replies get their source translated back to the
//! service (reverse NAT), both tracked in per-family conntrack maps.
//!
//! The `lb_sock_*` cgroup programs translate the node's own sockets at
//! `connect()`/`sendmsg()` and back at `getpeername()`/`recvmsg()` (`sock`).
//!
//! This file holds the entry points only; `tc` is the pipeline behind
//! `lb_tc`, `sock` the socket programs' work. `csum`, `hash`, `tcp_reset` and `verdict` are plain computations: they also
//! build on the host, where their unit tests run (`cargo test -p lb-ebpf`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![warn(unreachable_pub, unused_crate_dependencies)]
// `BPF_XADD` for the socket filter's shared counters (`sock::hooks::count`):
// the target has no compare-and-swap, so `core::sync::atomic` has no add.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    allow(internal_features, reason = "core_intrinsics, for atomic_xadd only")
)]
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
mod crc32c;
#[cfg(any(target_arch = "bpf", test))]
mod csum;
#[cfg(target_arch = "bpf")]
mod ct;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod family;
#[cfg(target_arch = "bpf")]
mod frag;
#[cfg(target_arch = "bpf")]
mod fwd;
#[cfg(any(target_arch = "bpf", test))]
mod hash;
#[cfg(target_arch = "bpf")]
mod hdr;
#[cfg(target_arch = "bpf")]
mod icmp_err;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maglev;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod probe;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod reject_guard;
#[cfg(target_arch = "bpf")]
mod skb;
#[cfg(target_arch = "bpf")]
mod snat;
#[cfg(any(target_arch = "bpf", test))]
mod sock;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(any(target_arch = "bpf", test))]
mod tcp_reset;
#[cfg(any(target_arch = "bpf", test))]
mod verdict;
#[cfg(target_arch = "bpf")]
mod xdp;
#[cfg(target_arch = "bpf")]
mod xlate;
#[cfg(target_arch = "bpf")]
mod zeroed;

#[cfg(target_arch = "bpf")]
use aya_ebpf::{macros::classifier, programs::TcContext};
#[cfg(target_arch = "bpf")]
use lb_common::reason;

/// The load balancer: its one verdict point. Every packet is counted under
/// the reason of its verdict (a dry run's reason is handed back instead,
/// see `probe`), then gets the verdict's action.
#[cfg(target_arch = "bpf")]
#[classifier]
fn lb_tc(ctx: TcContext) -> i32 {
    verdict_point::<hdr::Eth, false>(ctx)
}

/// `lb_tc` for devices without an Ethernet header (IPIP, `ip6tnl`, GRE in
/// L3 mode, WireGuard): the loader picks it from the device type.
#[cfg(target_arch = "bpf")]
#[classifier]
fn lb_tc_l3(ctx: TcContext) -> i32 {
    verdict_point::<hdr::Raw, false>(ctx)
}

/// Egress of attached interfaces: replies only, so that a reply that
/// reached the node through a device without the program (an overlay's
/// decapsulated traffic, for example) is translated where it leaves
/// towards the client.
#[cfg(target_arch = "bpf")]
#[classifier]
fn lb_tc_egress(ctx: TcContext) -> i32 {
    verdict_point::<hdr::Eth, true>(ctx)
}

/// `lb_tc_egress` for devices without an Ethernet header.
#[cfg(target_arch = "bpf")]
#[classifier]
fn lb_tc_l3_egress(ctx: TcContext) -> i32 {
    verdict_point::<hdr::Raw, true>(ctx)
}

/// The one verdict point of the TC programs: the pipeline's verdict is
/// counted under its reason (a dry run's reason is handed back instead, see
/// `probe`), then its action is returned.
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn verdict_point<L: hdr::Link, const EGRESS: bool>(mut ctx: TcContext) -> i32 {
    probe::begin(&ctx);
    let verdict = tc::run::<L, EGRESS>(&ctx);
    if !probe::finish(&mut ctx, verdict.reason) {
        maps::count_reason(verdict.reason);
    }
    verdict.action
}

/// North-south service traffic at the driver of the node's uplinks
/// (`--xdp`): the same translation as `lb_tc`, forwarded from here; what
/// it does not handle goes on to TC unchanged (see `xdp`).
#[cfg(target_arch = "bpf")]
#[aya_ebpf::macros::xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_xdp(ctx: aya_ebpf::programs::XdpContext) -> u32 {
    xdp::run(&ctx)
}

/// Does nothing: the floor that `lb_xdp`'s per-packet cost is measured
/// against (`xdp_cost`). Never attached by the agent.
#[cfg(target_arch = "bpf")]
#[aya_ebpf::macros::xdp]
fn lb_xdp_floor(_ctx: aya_ebpf::programs::XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Does nothing: the floor that `lb_tc`'s per-packet cost is measured
/// against (same hook, same packet). Never attached by the agent.
#[cfg(target_arch = "bpf")]
#[classifier]
fn lb_floor(_ctx: TcContext) -> i32 {
    verdict::Verdict::pass(reason::PASS_NO_SERVICE).action
}

// Socket-level load balancing (see `sock`): the cgroup programs. Each
// returns 1 (go on) or 0 (fail the call with the error it set).
#[cfg(target_arch = "bpf")]
use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};

/// `connect()` of an IPv4 socket to a service: to a backend.
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(connect4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

/// `connect()` of an IPv6 socket (IPv4-mapped addresses included).
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(connect6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect6(&ctx)
}

/// `sendmsg()` with an address on an unconnected IPv4 UDP socket.
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(sendmsg4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx)
}

/// `sendmsg()` with an address on an unconnected IPv6 UDP socket.
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(sendmsg6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg6(&ctx)
}

/// The source `recvmsg()` reports on an IPv4 UDP socket: the frontend.
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(recvmsg4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// The source `recvmsg()` reports on an IPv6 UDP socket.
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(recvmsg6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// The peer `getpeername()` reports on an IPv4 socket: the frontend.
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(getpeername4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_peer4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// The peer `getpeername()` reports on an IPv6 socket.
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(getpeername6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_peer6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// `bind()` of an IPv4 socket to a `NodePort` (`--socket-lb-bind-guard`).
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(bind4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_bind4(ctx: SockAddrContext) -> i32 {
    sock::bind4(&ctx)
}

/// `bind()` of an IPv6 socket to a `NodePort`.
#[cfg(target_arch = "bpf")]
#[cgroup_sock_addr(bind6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_bind6(ctx: SockAddrContext) -> i32 {
    sock::bind6(&ctx)
}

/// A socket is released: its reverse entry goes.
#[cfg(target_arch = "bpf")]
#[cgroup_sock(sock_release)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the macro hands the context over by value"
)]
fn lb_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
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
