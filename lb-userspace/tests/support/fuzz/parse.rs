//! A tolerant reading of a frame (the fuzzer's own, independent of the
//! datapath's): Ethernet, any number of VLAN tags, IPv4 (options) or IPv6
//! (extension headers), then TCP, UDP or an ICMP error with its quoted
//! packet. Nothing here assumes the frame is well-formed: every field is
//! `None` or absent when its bytes are not there.

use std::net::IpAddr;

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
pub(crate) const ETH_P_8021Q: u16 = 0x8100;
pub(crate) const ETH_P_8021AD: u16 = 0x88a8;
pub(crate) const TCP: u8 = 6;
pub(crate) const UDP: u8 = 17;
pub(crate) const ICMP: u8 = 1;
pub(crate) const ICMPV6: u8 = 58;
pub(crate) const NEXTHDR_FRAGMENT: u8 = 44;
pub(crate) const NEXTHDR_ROUTING: u8 = 43;

/// An IP header as read from a frame.
#[derive(Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts about one header"
)]
pub(crate) struct Ip {
    pub(crate) v4: bool,
    /// Offset of the IP header.
    pub(crate) l3_off: usize,
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    /// Upper-layer protocol (IPv6: after the extension headers).
    pub(crate) proto: u8,
    /// Offset of the upper-layer header.
    pub(crate) l4_off: usize,
    /// Where the IP packet ends by its own length field.
    pub(crate) declared_end: usize,
    /// IPv4 header length (IHL * 4); 40 for IPv6.
    pub(crate) hlen: usize,
    /// A fragment (IPv4 MF or offset, IPv6 fragment header).
    pub(crate) fragment: bool,
    /// A fragment other than the first: no upper-layer header in it.
    pub(crate) later_fragment: bool,
    /// IPv6 with a routing header: the pseudo-header's destination is not
    /// the header's.
    pub(crate) routed: bool,
    /// IPv6 extension headers present.
    pub(crate) ext_headers: bool,
}

impl Ip {
    /// The IP packet by its own length, if the frame holds all of it.
    pub(crate) fn complete(&self, frame: &[u8]) -> bool {
        self.declared_end <= frame.len() && self.declared_end >= self.l4_off
    }

    pub(crate) fn ttl_off(&self) -> usize {
        self.l3_off + if self.v4 { 8 } else { 7 }
    }

    pub(crate) fn addr_range(&self) -> std::ops::Range<usize> {
        if self.v4 {
            self.l3_off + 12..self.l3_off + 20
        } else {
            self.l3_off + 8..self.l3_off + 40
        }
    }
}

/// The link layer: where the IP header starts and what it claims to be.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Link {
    pub(crate) ether_type: u16,
    pub(crate) l3_off: usize,
    pub(crate) vlan_tags: usize,
}

pub(crate) fn be16(frame: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]))
}

pub(crate) fn be32(frame: &[u8], off: usize) -> Option<u32> {
    let bytes = frame.get(off..off + 4)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

pub(crate) fn link(frame: &[u8]) -> Option<Link> {
    let mut off = 12;
    let mut vlan_tags = 0;
    loop {
        let ether_type = be16(frame, off)?;
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            off += 4;
            vlan_tags += 1;
            continue;
        }
        return Some(Link {
            ether_type,
            l3_off: off + 2,
            vlan_tags,
        });
    }
}

/// The IP header of a frame (any VLAN tags skipped), if there is one.
pub(crate) fn ip(frame: &[u8]) -> Option<Ip> {
    let link = link(frame)?;
    match link.ether_type {
        ETH_P_IP => ip_at(frame, link.l3_off, true),
        ETH_P_IPV6 => ip_at(frame, link.l3_off, false),
        _ => None,
    }
}

/// The IP header at `off` of `bytes` (a frame, or the packet an ICMP
/// error quotes).
pub(crate) fn ip_at(bytes: &[u8], off: usize, v4: bool) -> Option<Ip> {
    if v4 {
        let header = bytes.get(off..off + 20)?;
        if header[0] >> 4 != 4 {
            return None;
        }
        let hlen = usize::from(header[0] & 0x0f) * 4;
        let frag = u16::from_be_bytes([header[6], header[7]]);
        Some(Ip {
            v4,
            l3_off: off,
            src: IpAddr::from(<[u8; 4]>::try_from(&header[12..16]).ok()?),
            dst: IpAddr::from(<[u8; 4]>::try_from(&header[16..20]).ok()?),
            proto: header[9],
            l4_off: off + hlen.max(20),
            declared_end: off + usize::from(u16::from_be_bytes([header[2], header[3]])),
            hlen,
            fragment: frag & 0x3fff != 0,
            later_fragment: frag & 0x1fff != 0,
            routed: false,
            ext_headers: false,
        })
    } else {
        let header = bytes.get(off..off + 40)?;
        if header[0] >> 4 != 6 {
            return None;
        }
        let mut ip = Ip {
            v4,
            l3_off: off,
            src: IpAddr::from(<[u8; 16]>::try_from(&header[8..24]).ok()?),
            dst: IpAddr::from(<[u8; 16]>::try_from(&header[24..40]).ok()?),
            proto: header[6],
            l4_off: off + 40,
            declared_end: off + 40 + usize::from(u16::from_be_bytes([header[4], header[5]])),
            hlen: 40,
            fragment: false,
            later_fragment: false,
            routed: false,
            ext_headers: false,
        };
        skip_extension_headers(bytes, &mut ip);
        Some(ip)
    }
}

/// Walks the IPv6 extension headers (at most 8, then gives up: the
/// upper layer is then unknown, proto 59 "no next header").
fn skip_extension_headers(bytes: &[u8], ip: &mut Ip) {
    for _ in 0..8 {
        let len = match ip.proto {
            0 | 60 | NEXTHDR_ROUTING => bytes.get(ip.l4_off + 1).map(|l| (usize::from(*l) + 1) * 8),
            NEXTHDR_FRAGMENT => Some(8),
            51 => bytes.get(ip.l4_off + 1).map(|l| (usize::from(*l) + 2) * 4),
            _ => return,
        };
        ip.ext_headers = true;
        let (Some(len), Some(next)) = (len, bytes.get(ip.l4_off).copied()) else {
            ip.proto = 59;
            return;
        };
        if ip.proto == NEXTHDR_FRAGMENT {
            ip.fragment = true;
            let Some(frag) = be16(bytes, ip.l4_off + 2) else {
                ip.proto = 59;
                return;
            };
            ip.later_fragment = frag >> 3 != 0;
        }
        if ip.proto == NEXTHDR_ROUTING {
            ip.routed = true;
        }
        ip.proto = next;
        ip.l4_off += len;
    }
    ip.proto = 59;
}

/// Source and destination ports of a TCP or UDP header at `l4_off`.
pub(crate) fn ports(frame: &[u8], ip: &Ip) -> Option<(u16, u16)> {
    if !(ip.proto == TCP || ip.proto == UDP) || ip.later_fragment {
        return None;
    }
    Some((be16(frame, ip.l4_off)?, be16(frame, ip.l4_off + 2)?))
}

/// Offset of the L4 checksum field of `proto` relative to its header.
pub(crate) fn l4_csum_field(proto: u8) -> Option<usize> {
    match proto {
        TCP => Some(16),
        UDP => Some(6),
        ICMP | ICMPV6 => Some(2),
        _ => None,
    }
}

/// Whether `proto`/`ty` is an ICMP error (it quotes a packet).
pub(crate) fn is_icmp_error(v4: bool, proto: u8, ty: u8) -> bool {
    if v4 {
        proto == ICMP && matches!(ty, 3 | 4 | 5 | 11 | 12)
    } else {
        proto == ICMPV6 && ty < 128
    }
}

/// RFC 1071 ones'-complement sum of `data`, folded, not complemented.
pub(crate) fn ones_sum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    let (pairs, rest) = data.as_chunks::<2>();
    for pair in pairs {
        sum += u64::from(u16::from_be_bytes(*pair));
    }
    if let [last] = rest {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded")
}

/// Ones'-complement sum of the pseudo-header for `len` bytes of `proto`.
pub(crate) fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut bytes = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            bytes.extend(s.octets());
            bytes.extend(d.octets());
            bytes.extend([0, proto]);
            bytes.extend(u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            bytes.extend(s.octets());
            bytes.extend(d.octets());
            bytes.extend(u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            bytes.extend([0, 0, 0, proto]);
        }
        _ => unreachable!("one family per header"),
    }
    u32::from(ones_sum(&bytes, 0))
}

/// Whether the L4 checksum of the complete, unfragmented packet `ip`
/// verifies: `Some(true/false)`, or `None` when it cannot be told (not
/// complete, a fragment, a routing header, no known checksum, UDP whose
/// own length disagrees with the IP length, IPv4 UDP without checksum).
pub(crate) fn l4_csum_ok(frame: &[u8], ip: &Ip) -> Option<bool> {
    if !ip.complete(frame) || ip.fragment || ip.routed {
        return None;
    }
    let field = l4_csum_field(ip.proto)?;
    let l4 = &frame[ip.l4_off..ip.declared_end];
    if l4.len() < field + 2 {
        return None;
    }
    if ip.proto == UDP {
        if usize::from(be16(l4, 4)?) != l4.len() {
            return None;
        }
        if ip.v4 && be16(l4, 6)? == 0 {
            return None;
        }
    }
    let pseudo = if ip.proto == ICMP {
        0
    } else {
        pseudo_sum(ip.src, ip.dst, ip.proto, l4.len())
    };
    Some(ones_sum(l4, pseudo) == 0xffff)
}

/// Whether the IPv4 header checksum verifies (`None`: not IPv4, or the
/// header is not all there).
pub(crate) fn ip_csum_ok(frame: &[u8], ip: &Ip) -> Option<bool> {
    if !ip.v4 || ip.hlen < 20 {
        return None;
    }
    let header = frame.get(ip.l3_off..ip.l3_off + ip.hlen)?;
    Some(ones_sum(header, 0) == 0xffff)
}

/// Recomputes the IPv4 header checksum and the L4 checksum (when the
/// packet is complete and not fragmented), so that a mutation reaches past
/// the checksum checks of whatever reads it. A zero IPv4 UDP checksum
/// ("no checksum") stays zero.
pub(crate) fn fix_checksums(frame: &mut [u8]) {
    let Some(ip) = ip(frame) else { return };
    if ip.v4 && ip.hlen >= 20 && frame.len() >= ip.l3_off + ip.hlen {
        frame[ip.l3_off + 10..ip.l3_off + 12].fill(0);
        let sum = !ones_sum(&frame[ip.l3_off..ip.l3_off + ip.hlen], 0);
        frame[ip.l3_off + 10..ip.l3_off + 12].copy_from_slice(&sum.to_be_bytes());
    }
    if ip.fragment || ip.routed {
        return;
    }
    let Some(field) = l4_csum_field(ip.proto) else {
        return;
    };
    let end = ip.declared_end.min(frame.len());
    if end < ip.l4_off + field + 2 {
        return;
    }
    let at = ip.l4_off + field;
    if ip.v4 && ip.proto == UDP && frame[at..at + 2] == [0, 0] {
        return;
    }
    frame[at..at + 2].fill(0);
    let l4 = &frame[ip.l4_off..end];
    let pseudo = if ip.proto == ICMP {
        0
    } else {
        pseudo_sum(ip.src, ip.dst, ip.proto, l4.len())
    };
    let mut sum = !ones_sum(l4, pseudo);
    if sum == 0 && ip.proto == UDP {
        sum = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}
