//! Packet access: one bounds-checked `ptr_at`, header layouts, verdicts.

use core::mem::{MaybeUninit, align_of, size_of};

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::reason;

/// Ethernet header length (no VLAN tag: TC sees the tag in skb metadata).
pub const ETH_HLEN: usize = 14;
/// EtherType IPv4 as it sits in the packet (network order read natively).
pub const ETH_P_IP_BE: u16 = 0x0800_u16.to_be();
/// EtherType IPv6 as it sits in the packet.
pub const ETH_P_IPV6_BE: u16 = 0x86DD_u16.to_be();
/// Bytes that must be linear for the largest header stack we parse
/// (Ethernet + IPv6 + TCP without options).
pub const MAX_PARSED_HEADERS: u32 = 14 + 40 + 20;

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// IPv6 fixed header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtc_flow: [u8; 4],
    pub payload_len_be: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// The part of a TCP or UDP header the load balancer reads.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ports {
    pub sport_be: u16,
    pub dport_be: u16,
}

/// TCP header offsets and flag bits.
pub const TCP_HLEN: usize = 20;
pub const TCP_FLAGS_OFF: usize = 13;
pub const TCP_CSUM_OFF: usize = 16;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// UDP header length and checksum offset.
pub const UDP_HLEN: usize = 8;
pub const UDP_CSUM_OFF: usize = 6;

/// What to do with the packet and why; produced once per packet.
#[derive(Clone, Copy)]
pub struct Verdict {
    /// TC action.
    pub action: i32,
    /// `lb_common::reason::*`.
    pub reason: u32,
}

impl Verdict {
    /// Let the packet continue (translated or not).
    #[inline(always)]
    pub const fn pass(reason: u32) -> Self {
        Self {
            action: TC_ACT_OK as i32,
            reason,
        }
    }

    /// Drop the packet.
    #[inline(always)]
    pub const fn drop(reason: u32) -> Self {
        Self {
            action: TC_ACT_SHOT as i32,
            reason,
        }
    }
}

/// Marks an encoded verdict as present (an encoded `Ok(())` is 0).
const ENCODED: u64 = 1 << 62;

impl Verdict {
    /// Packs into a scalar: BPF subprograms must not return structs (the
    /// verifier refuses a stack pointer left in R0 by the struct return).
    #[inline(always)]
    pub const fn encode(self) -> u64 {
        ENCODED | ((self.action as u32 as u64) << 32) | self.reason as u64
    }

    /// Unpacks `encode`'s result.
    #[inline(always)]
    pub const fn decode(code: u64) -> Self {
        Self {
            action: (code >> 32) as u32 as i32 & 0x3fff_ffff,
            reason: code as u32,
        }
    }
}

/// `Result<(), Verdict>` as a scalar, for subprogram returns.
#[inline(always)]
pub fn encode_unit(result: Result<(), Verdict>) -> u64 {
    match result {
        Ok(()) => 0,
        Err(verdict) => verdict.encode(),
    }
}

/// The inverse of `encode_unit`.
#[inline(always)]
pub fn decode_unit(code: u64) -> Result<(), Verdict> {
    if code == 0 {
        Ok(())
    } else {
        Err(Verdict::decode(code))
    }
}

/// A pointer to a `T` at `offset` in the packet, or a pass verdict if the
/// packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, Verdict> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Verdict::pass(reason::PASS_TRUNCATED));
    }
    Ok((start + offset) as *const T)
}

/// Reads a `T` at `offset`.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Verdict> {
    let ptr = ptr_at::<T>(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at; T is plain bytes.
    Ok(unsafe { ptr.read_unaligned() })
}

/// Writes a `T` at `offset` (direct packet access; a TC program that
/// writes gets the verifier's unclone prologue, so the bytes are its own).
#[inline(always)]
pub fn write<T: Copy>(ctx: &TcContext, offset: usize, value: T) -> Result<(), Verdict> {
    let ptr = ptr_at::<T>(ctx, offset)?.cast_mut();
    // SAFETY: bounds checked by ptr_at; T is plain bytes.
    unsafe { ptr.write_unaligned(value) };
    Ok(())
}

/// Zeroes `slot` in place with 4-byte volatile stores and returns it.
/// LLVM turns a plain zero initialisation of a struct or array into a call
/// of a byte-by-byte `memset` subprogram here (several hundred
/// instructions); volatile stores are neither merged nor turned into one.
/// `T`'s size must be a multiple of 4 and its alignment at least 4
/// (checked at compile time).
///
/// # Safety
/// All-zero bytes must be a valid `T` (plain bytes: no references, no
/// `NonZero`, no enums without a zero variant).
#[inline(always)]
pub unsafe fn zeroed_in_place<T>(slot: &mut MaybeUninit<T>) -> &mut T {
    const {
        assert!(size_of::<T>() % 4 == 0 && align_of::<T>() >= 4);
    }
    let words = slot.as_mut_ptr().cast::<u32>();
    let mut i = 0;
    while i < size_of::<T>() / 4 {
        // SAFETY: `i` words are inside the slot (size checked above); the
        // slot is 4-aligned.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte is zero, a valid `T` (the caller's promise).
    unsafe { slot.assume_init_mut() }
}

/// Makes the headers we parse linear when the skb keeps them in fragments,
/// so direct packet access sees them. Failure just means we see less.
#[inline(always)]
pub fn linearize_headers(ctx: &TcContext) {
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
