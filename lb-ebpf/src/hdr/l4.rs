//! TCP, UDP, SCTP and ICMP / `ICMPv6` headers: the parts the datapath touches.

/// The ports of a TCP or UDP header, its first four bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Ports {
    /// Source port, network order.
    pub(crate) sport_be: u16,
    /// Destination port, network order.
    pub(crate) dport_be: u16,
}

/// TCP header length without options.
pub(crate) const TCP_HLEN: usize = 20;
/// Offsets of the TCP sequence and acknowledgment numbers.
pub(crate) const TCP_SEQ_OFF: usize = 4;
pub(crate) const TCP_ACK_SEQ_OFF: usize = 8;
/// Offset of the data offset (header length in words, high nibble).
pub(crate) const TCP_DOFF_OFF: usize = 12;
/// The data-offset byte of a header without options (5 words).
pub(crate) const TCP_DOFF_NO_OPTIONS: u8 = 5 << 4;
/// Offset of the TCP flags byte.
pub(crate) const TCP_FLAGS_OFF: usize = 13;
/// Offset of the TCP checksum.
pub(crate) const TCP_CSUM_OFF: usize = 16;
/// TCP flag bits.
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// UDP header length.
pub(crate) const UDP_HLEN: usize = 8;
/// Offset of the UDP length (header and data).
pub(crate) const UDP_LEN_OFF: usize = 4;
/// Offset of the UDP checksum.
pub(crate) const UDP_CSUM_OFF: usize = 6;

/// ICMP and `ICMPv6` header length (type, code, checksum, 4 more bytes).
pub(crate) const ICMP_HLEN: usize = 8;
/// Offsets in the ICMP / `ICMPv6` header.
pub(crate) const ICMP_TYPE_OFF: usize = 0;
pub(crate) const ICMP_CODE_OFF: usize = 1;
pub(crate) const ICMP_CSUM_OFF: usize = 2;
/// ICMP destination unreachable, port unreachable (RFC 792).
pub(crate) const ICMP_DEST_UNREACH: u8 = 3;
pub(crate) const ICMP_PORT_UNREACH: u8 = 3;
/// `ICMPv6` destination unreachable, port unreachable (RFC 4443).
pub(crate) const ICMPV6_DEST_UNREACH: u8 = 1;
pub(crate) const ICMPV6_PORT_UNREACH: u8 = 4;
/// Bytes of the offending packet's L4 header quoted in an ICMP error.
pub(crate) const ICMP_QUOTED_L4: usize = 8;

/// SCTP common header length (ports, verification tag, checksum).
pub(crate) const SCTP_HLEN: usize = 12;
/// Offset of the SCTP checksum (`CRC32c`, little-endian).
pub(crate) const SCTP_CSUM_OFF: usize = 8;
/// Length of an SCTP chunk header (type, flags, length).
pub(crate) const SCTP_CHUNK_HLEN: usize = 4;
/// SCTP chunk types (RFC 9260 3.2) that open or close an association.
pub(crate) const SCTP_INIT: u8 = 1;
pub(crate) const SCTP_INIT_ACK: u8 = 2;
pub(crate) const SCTP_ABORT: u8 = 6;
pub(crate) const SCTP_SHUTDOWN: u8 = 7;
pub(crate) const SCTP_SHUTDOWN_ACK: u8 = 8;
pub(crate) const SCTP_SHUTDOWN_COMPLETE: u8 = 14;

/// An SCTP packet's first chunk read as the TCP flags of the segment that
/// plays its part, so that conntrack tracks an association as it tracks a
/// connection: INIT opens (SYN), INIT ACK is the first answer (SYN+ACK),
/// ABORT resets (RST), the SHUTDOWN exchange closes (FIN), anything else
/// belongs to an association (ACK). Only the first chunk counts: INIT,
/// INIT ACK and SHUTDOWN COMPLETE must be alone in their packet
/// (RFC 9260 6.10), and an ABORT bundled after data closes no later than
/// the peer's own answer to it.
#[inline(always)]
pub(crate) fn sctp_as_tcp_flags(chunk_type: u8) -> u8 {
    match chunk_type {
        SCTP_INIT => TCP_SYN,
        SCTP_INIT_ACK => TCP_SYN | TCP_ACK,
        SCTP_ABORT => TCP_RST,
        SCTP_SHUTDOWN | SCTP_SHUTDOWN_ACK | SCTP_SHUTDOWN_COMPLETE => TCP_FIN | TCP_ACK,
        _ => TCP_ACK,
    }
}
