//! IPv6 (RFC 8200).

use core::mem::{offset_of, size_of};

/// IPv6 fixed header.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Ipv6Hdr {
    /// Version (high nibble of the first byte), traffic class, flow label.
    pub(crate) vtc_flow: [u8; 4],
    /// Payload length, network order.
    pub(crate) payload_len_be: u16,
    /// Protocol or extension header that follows.
    pub(crate) next_hdr: u8,
    /// Hop limit.
    pub(crate) hop_limit: u8,
    /// Source address.
    pub(crate) saddr: [u8; 16],
    /// Destination address.
    pub(crate) daddr: [u8; 16],
}

/// Fixed header length.
pub(crate) const HLEN: usize = size_of::<Ipv6Hdr>();
/// First byte of a header with traffic class 0.
pub(crate) const VERSION_BYTE: u8 = 0x60;
/// Offset of the payload length.
pub(crate) const PAYLOAD_LEN_OFF: usize = offset_of!(Ipv6Hdr, payload_len_be);
/// Offset of the next-header byte.
pub(crate) const NEXT_HDR_OFF: usize = offset_of!(Ipv6Hdr, next_hdr);
/// Offset of the hop limit.
pub(crate) const HOP_LIMIT_OFF: usize = offset_of!(Ipv6Hdr, hop_limit);
/// Offset of the source address.
pub(crate) const SADDR_OFF: usize = offset_of!(Ipv6Hdr, saddr);
/// Offset of the destination address.
pub(crate) const DADDR_OFF: usize = offset_of!(Ipv6Hdr, daddr);

/// The pseudo-header of upper-layer checksums (RFC 8200 section 8.1):
/// source, destination, upper-layer length (32 bits), zeros, next header.
pub(crate) const PSEUDO_SADDR_OFF: usize = 0;
pub(crate) const PSEUDO_DADDR_OFF: usize = 16;
/// The upper-layer length's low 16 bits (the high ones are zero here).
pub(crate) const PSEUDO_LEN_LOW_OFF: usize = 34;
pub(crate) const PSEUDO_NEXT_HDR_OFF: usize = 39;
pub(crate) const PSEUDO_LEN: usize = 40;

/// The Fragment header (RFC 8200 section 4.5).
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(
    dead_code,
    reason = "the wire layout: fields that are never read still place the others"
)]
pub(crate) struct FragHdr {
    /// Protocol of the fragmented datagram (or a further extension header).
    pub(crate) next_hdr: u8,
    /// Zero.
    pub(crate) reserved: u8,
    /// Offset (8-byte units, high 13 bits) and M flag (bit 0), network order.
    pub(crate) frag_off_be: u16,
    /// Identification of the datagram, network order.
    pub(crate) id_be: u32,
}

/// Fragment header length.
pub(crate) const FRAG_HLEN: usize = size_of::<FragHdr>();
/// The fragment offset bits of `FragHdr::frag_off_be`: non-zero on every
/// fragment but the first.
pub(crate) const FRAG_OFFSET_MASK: u16 = 0xfff8;
/// The M ("more fragments") flag of `FragHdr::frag_off_be`.
pub(crate) const FRAG_MORE: u16 = 0x0001;

/// Next-header values of extension headers.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
pub(crate) const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_ESP: u8 = 50;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;
const NEXTHDR_HIP: u8 = 139;
const NEXTHDR_SHIM6: u8 = 140;

/// True for an extension header other than the fragment header (which
/// callers tell apart first).
#[inline(always)]
pub(crate) fn is_extension(next: u8) -> bool {
    next == NEXTHDR_HOP
        || next == NEXTHDR_ROUTING
        || next == NEXTHDR_ESP
        || next == NEXTHDR_AUTH
        || next == NEXTHDR_DEST
        || next == NEXTHDR_MOBILITY
        || next == NEXTHDR_HIP
        || next == NEXTHDR_SHIM6
}

const _: () = assert!(FRAG_HLEN == 8);
const _: () = assert!(HLEN == 40 && SADDR_OFF == 8 && DADDR_OFF == 24 && HOP_LIMIT_OFF == 7);
