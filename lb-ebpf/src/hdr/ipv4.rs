//! IPv4 (RFC 791).

use core::mem::{offset_of, size_of};

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(
    dead_code,
    reason = "the wire layout: fields that are never read still place the others"
)]
pub(crate) struct Ipv4Hdr {
    /// Version (high nibble) and header length in words (low nibble).
    pub(crate) version_ihl: u8,
    /// DSCP and ECN.
    pub(crate) tos: u8,
    /// Total length, network order.
    pub(crate) tot_len_be: u16,
    /// Identification, network order.
    pub(crate) id_be: u16,
    /// Flags and fragment offset, network order.
    pub(crate) frag_off_be: u16,
    /// Time to live.
    pub(crate) ttl: u8,
    /// Protocol of the payload.
    pub(crate) proto: u8,
    /// Header checksum, as it sits in the packet.
    pub(crate) check: u16,
    /// Source address.
    pub(crate) saddr: [u8; 4],
    /// Destination address.
    pub(crate) daddr: [u8; 4],
}

/// Header length without options.
pub(crate) const HLEN: usize = size_of::<Ipv4Hdr>();
/// `version_ihl` of a header without options.
pub(crate) const VERSION_IHL: u8 = 0x45;
/// Offset of the TOS byte.
pub(crate) const TOS_OFF: usize = offset_of!(Ipv4Hdr, tos);
/// Offset of the total length.
pub(crate) const TOT_LEN_OFF: usize = offset_of!(Ipv4Hdr, tot_len_be);
/// Offset of the TTL (it shares a 16-bit word with the protocol byte).
pub(crate) const TTL_OFF: usize = offset_of!(Ipv4Hdr, ttl);
/// Offset of the protocol byte.
pub(crate) const PROTO_OFF: usize = offset_of!(Ipv4Hdr, proto);
/// Offset of the header checksum.
pub(crate) const CSUM_OFF: usize = offset_of!(Ipv4Hdr, check);
/// Offset of the source address.
pub(crate) const SADDR_OFF: usize = offset_of!(Ipv4Hdr, saddr);
/// Offset of the destination address.
pub(crate) const DADDR_OFF: usize = offset_of!(Ipv4Hdr, daddr);
/// Flags/fragment-offset bits that mark a fragment (MF or an offset).
pub(crate) const FRAG_MASK: u16 = 0x3fff;
/// The fragment offset bits (8-byte units): non-zero on every fragment but
/// the first.
pub(crate) const FRAG_OFFSET_MASK: u16 = 0x1fff;

/// The pseudo-header of TCP/UDP checksums (RFC 793): source, destination,
/// a zero byte, the protocol, the TCP/UDP length.
pub(crate) const PSEUDO_SADDR_OFF: usize = 0;
pub(crate) const PSEUDO_DADDR_OFF: usize = 4;
pub(crate) const PSEUDO_PROTO_OFF: usize = 9;
pub(crate) const PSEUDO_LEN_OFF: usize = 10;
pub(crate) const PSEUDO_LEN: usize = 12;

const _: () = assert!(HLEN == 20 && CSUM_OFF == 10 && SADDR_OFF == 12 && DADDR_OFF == 16);
