//! Conntrack and selection helpers shared by both families.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{CtEntry, ct_flags, ct_timeout, proto};

use crate::parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, zeroed_in_place};

/// Monotonic clock in nanoseconds, at tick resolution (`CLOCK_MONOTONIC_COARSE`):
/// timeouts are seconds, and the coarse clock costs a fraction of the
/// precise one, which reads the (paravirtual) TSC.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Lifetime of an entry after its last packet.
#[inline(always)]
fn lifetime_ns(l4_proto: u8, flags: u32) -> u64 {
    if l4_proto != proto::TCP {
        ct_timeout::UDP_NS
    } else if flags & ct_flags::CLOSING != 0 {
        ct_timeout::TCP_CLOSING_NS
    } else {
        ct_timeout::TCP_NS
    }
}

/// True when the entry may still be used for a packet with `tcp_flags`.
/// A bare SYN on a closing entry starts a new flow on a reused port.
#[inline(always)]
pub fn usable(entry: &CtEntry, l4_proto: u8, tcp_flags: u8, now: u64) -> bool {
    let bare_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if bare_syn && entry.flags & ct_flags::CLOSING != 0 {
        return false;
    }
    now.saturating_sub(entry.last_seen_ns) <= lifetime_ns(l4_proto, entry.flags)
}

/// Flags an entry gains from this packet.
#[inline(always)]
pub fn flags_from_tcp(tcp_flags: u8) -> u32 {
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        ct_flags::CLOSING
    } else {
        0
    }
}

/// Refreshes `last_seen_ns` (at most once per `REFRESH_NS`) and records
/// closing flags. Returns true when the entry was refreshed.
#[inline(always)]
pub fn touch(entry: *mut CtEntry, tcp_flags: u8, now: u64) -> bool {
    let new_flags = flags_from_tcp(tcp_flags);
    // SAFETY: `entry` points into a map value.
    unsafe {
        if new_flags & !(*entry).flags != 0 {
            (*entry).flags |= new_flags;
        }
        if now.saturating_sub((*entry).last_seen_ns) >= ct_timeout::REFRESH_NS {
            (*entry).last_seen_ns = now;
            return true;
        }
    }
    false
}

/// A new entry, built in place in `slot` (see `zeroed_in_place`).
#[inline(always)]
pub fn new_entry(
    slot: &mut MaybeUninit<CtEntry>,
    backend_id: u32,
    rev_nat_id: u32,
    tcp_flags: u8,
    now: u64,
) -> &mut CtEntry {
    // SAFETY: `CtEntry` is plain integers and bytes.
    let entry = unsafe { zeroed_in_place(slot) };
    entry.created_ns = now;
    entry.last_seen_ns = now;
    entry.backend_id = backend_id;
    entry.rev_nat_id = rev_nat_id;
    entry.flags = flags_from_tcp(tcp_flags);
    entry
}

/// murmur3 mixing step.
#[inline(always)]
pub fn hash_mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3 finaliser.
#[inline(always)]
pub fn hash_finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Backend slot (1..=count) for a flow hash; `count` is non-zero.
#[inline(always)]
pub fn slot_for(hash: u32, count: u16) -> u16 {
    // count >= 1, so the result fits in 1..=count.
    (hash % u32::from(count)) as u16 + 1
}
