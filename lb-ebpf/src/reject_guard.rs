//! Whether a refusal may be sent at all: the reject path must not be a
//! reflector. Never answered: a source that is multicast, broadcast,
//! unspecified, loopback or martian, a frame sent to a multicast or
//! broadcast MAC or not addressed to this host; and at most 100 replies a
//! second per interface, in bursts of up to 1000 (a token bucket per
//! ifindex, Cilium's defaults), since the kernel's `icmp_ratelimit` does
//! not see BPF-built packets. What is not answered is dropped and counted
//! under its reason. (The reply itself is bounded: a fixed-size TCP reset
//! or an ICMP error quoting only the IP header and 8 bytes, see `reject`.)

use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};
use lb_common::reason;

use crate::{
    ct::now_ns,
    hdr::{Link, eth, ipv4, ipv6},
    maps::LB_REJECT_RL,
    skb::read,
    verdict::Verdict,
};

/// Replies per second per interface.
const RATE_PER_S: u64 = 100;
/// Replies an interface may send at once after a quiet period.
const BURST: u64 = 1000;
/// Credit one reply costs, in nanoseconds of refill.
const COST_NS: u64 = 1_000_000_000 / RATE_PER_S;
/// `skb->pkt_type` of a frame for this host (`linux/if_packet.h`).
const PACKET_HOST: u32 = 0;

/// A token bucket, in nanoseconds of credit (one reply = `COST_NS`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Bucket {
    /// Credit left, at most `BURST * COST_NS`.
    credit_ns: u64,
    /// When the credit was last computed.
    last_ns: u64,
}

fn unanswerable<E>(_: E) -> Verdict {
    Verdict::drop(reason::DROP_REJECT_UNANSWERABLE)
}

/// `Ok` when a refusal of the IPv4 (`v4`) or IPv6 packet may be sent.
#[inline(always)]
pub(crate) fn may_answer<L: Link>(ctx: &TcContext, v4: bool) -> Result<(), Verdict> {
    // SAFETY: the context of a TC program is an `__sk_buff`.
    let skb = unsafe { &*ctx.as_ptr().cast::<__sk_buff>() };
    // Not addressed to this host (as for `pass_other_host`, only where the
    // packet entered through a device is the type meaningful).
    if skb.ingress_ifindex != 0 && skb.pkt_type != PACKET_HOST {
        return Err(unanswerable(()));
    }
    if L::ETHERNET {
        // The group bit: a multicast or broadcast destination, or a
        // source MAC that cannot be one.
        let dst: u8 = read(ctx, eth::DADDR_OFF).map_err(unanswerable)?;
        let src: u8 = read(ctx, eth::SADDR_OFF).map_err(unanswerable)?;
        if (dst | src) & 1 != 0 {
            return Err(unanswerable(()));
        }
    }
    let fine = if v4 {
        let src: [u8; 4] = read(ctx, L::L3_OFF + ipv4::SADDR_OFF).map_err(unanswerable)?;
        let dst: [u8; 4] = read(ctx, L::L3_OFF + ipv4::DADDR_OFF).map_err(unanswerable)?;
        source4_answerable(src) && src != dst
    } else {
        let src: [u8; 16] = read(ctx, L::L3_OFF + ipv6::SADDR_OFF).map_err(unanswerable)?;
        source6_answerable(&src)
    };
    if !fine {
        return Err(unanswerable(()));
    }
    if take_token(skb.ifindex) {
        Ok(())
    } else {
        Err(Verdict::drop(reason::DROP_REJECT_RATE))
    }
}

/// Not "this network" (0/8), loopback (127/8), multicast (224/4), the
/// reserved class E (240/4) nor the limited broadcast address in it.
#[inline(always)]
fn source4_answerable(src: [u8; 4]) -> bool {
    src[0] != 0 && src[0] != 127 && src[0] < 224
}

/// Not unspecified (`::`), loopback (`::1`), multicast (`ff00::/8`) nor
/// IPv4-mapped (`::ffff:0:0/96`, never on the wire).
#[inline(always)]
fn source6_answerable(src: &[u8; 16]) -> bool {
    let word = |i: usize| u32::from_be_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]);
    let (w0, w1, w2, w3) = (word(0), word(4), word(8), word(12));
    let first_64_zero = w0 == 0 && w1 == 0;
    let unspecified_or_loopback = first_64_zero && w2 == 0 && (w3 == 0 || w3 == 1);
    let v4_mapped = first_64_zero && w2 == 0xffff;
    src[0] != 0xff && !unspecified_or_loopback && !v4_mapped
}

/// Takes one reply's credit from the bucket of `ifindex`; `false` when
/// there is not enough. (Two CPUs refilling at once may both win a token:
/// the limit is approximate, as Cilium's.) A dry run (`probe`) only looks:
/// it takes nothing and creates no bucket.
#[inline(always)]
fn take_token(ifindex: u32) -> bool {
    let now = now_ns();
    let dry = crate::probe::dry_run();
    let Some(bucket) = LB_REJECT_RL.get_ptr_mut(&ifindex) else {
        if dry {
            return true;
        }
        let full = Bucket {
            credit_ns: BURST * COST_NS - COST_NS,
            last_ns: now,
        };
        // A full map evicts the least recently used interface's bucket.
        return LB_REJECT_RL.insert(&ifindex, &full, 0).is_ok();
    };
    // SAFETY: map value pointer, this entry only.
    let bucket = unsafe { &mut *bucket };
    let refill = now.saturating_sub(bucket.last_ns);
    let credit = bucket.credit_ns.saturating_add(refill).min(BURST * COST_NS);
    if dry {
        return credit >= COST_NS;
    }
    bucket.last_ns = now;
    if credit < COST_NS {
        bucket.credit_ns = credit;
        return false;
    }
    bucket.credit_ns = credit - COST_NS;
    true
}
