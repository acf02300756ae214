//! The crafted packet (Ethernet + IPv4/IPv6 + a TCP SYN, a UDP datagram
//! or an SCTP INIT, checksums right) and the reading of what the program left.

use std::net::{IpAddr, SocketAddr};

use lb_common::proto;

/// TCP flag bits.
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// SCTP chunk types and the checksum's offset.
const SCTP_INIT: u8 = 1;
const SCTP_INIT_ACK: u8 = 2;
const SCTP_CSUM_OFF: usize = 8;
/// ICMP protocol numbers.
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Ethernet header length.
const ETH_LEN: usize = 14;

/// A frame from `src` to `dst` (one family) over `l4_proto` (TCP: a bare
/// SYN, the first packet of a connection, or for an `answer` (a backend's
/// packet to its client) a SYN-ACK, the first answer, which the datapath
/// takes for a flow answered or not; UDP: a small datagram; SCTP: an
/// INIT, for an `answer` an INIT ACK, which conntrack reads as TCP's SYN
/// and SYN-ACK).
pub(super) fn build(src: SocketAddr, dst: SocketAddr, l4_proto: u8, answer: bool) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(32);
    l4.extend(src.port().to_be_bytes());
    l4.extend(dst.port().to_be_bytes());
    if l4_proto == proto::SCTP {
        sctp_first_chunk(&mut l4, answer);
    } else if l4_proto == proto::TCP {
        l4.extend(0x6c62_0001_u32.to_be_bytes()); // seq
        l4.extend(0_u32.to_be_bytes()); // ack
        l4.push(5 << 4);
        l4.push(if answer { TCP_SYN | TCP_ACK } else { TCP_SYN });
        l4.extend(64240_u16.to_be_bytes());
        l4.extend([0, 0, 0, 0]); // checksum, urgent
    } else {
        l4.extend(12_u16.to_be_bytes());
        l4.extend([0, 0]);
        l4.extend(*b"lbxp");
    }
    if l4_proto == proto::SCTP {
        let crc = crc32c(&l4);
        l4[SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4].copy_from_slice(&crc.to_le_bytes());
        return frame_around(src, dst, l4_proto, &l4);
    }
    let csum_off = if l4_proto == proto::TCP { 16 } else { 6 };
    let mut csum = checksum(&[&pseudo_header(src.ip(), dst.ip(), l4_proto, l4.len()), &l4]);
    if csum == 0 && l4_proto == proto::UDP {
        csum = 0xffff;
    }
    l4[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());
    frame_around(src, dst, l4_proto, &l4)
}

/// The rest of an SCTP packet after the ports (checksum zero): the
/// verification tag and an INIT chunk (tag 0, as RFC 9260 requires), or
/// for an `answer` an INIT ACK (without its state cookie: the datapath
/// reads only the chunk type).
fn sctp_first_chunk(l4: &mut Vec<u8>, answer: bool) {
    l4.extend(if answer { 0x6c62_0001_u32 } else { 0 }.to_be_bytes());
    l4.extend([0, 0, 0, 0]); // checksum
    l4.push(if answer { SCTP_INIT_ACK } else { SCTP_INIT });
    l4.push(0);
    l4.extend(20_u16.to_be_bytes());
    l4.extend(0x6c62_0002_u32.to_be_bytes()); // initiate tag
    l4.extend(65_535_u32.to_be_bytes()); // a_rwnd
    l4.extend(10_u16.to_be_bytes()); // outbound streams
    l4.extend(10_u16.to_be_bytes()); // inbound streams
    l4.extend(1_u32.to_be_bytes()); // initial TSN
}

/// `CRC32c` (RFC 9260 appendix A) of `bytes`, bit by bit: the few bytes of
/// a crafted packet.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & 0_u32.wrapping_sub(crc & 1));
        }
    }
    !crc
}

/// Ethernet and IP headers around the L4 bytes `l4`.
fn frame_around(src: SocketAddr, dst: SocketAddr, l4_proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend(0x0800_u16.to_be_bytes());
            let total = u16::try_from(20 + l4.len()).unwrap_or(u16::MAX);
            let mut ip = vec![0x45, 0];
            ip.extend(total.to_be_bytes());
            ip.extend([0, 1, 0x40, 0, 64, l4_proto, 0, 0]);
            ip.extend(s.octets());
            ip.extend(d.octets());
            let csum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            frame.extend(ip);
        }
        (s, d) => {
            frame.extend(0x86dd_u16.to_be_bytes());
            frame.extend([0x60, 0, 0, 0]);
            frame.extend(u16::try_from(l4.len()).unwrap_or(u16::MAX).to_be_bytes());
            frame.extend([l4_proto, 64]);
            frame.extend(v6_octets(s));
            frame.extend(v6_octets(d));
        }
    }
    frame.extend(l4);
    frame
}

fn v6_octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// What a frame the program left carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seen {
    /// TCP or UDP from `src` to `dst`; `reset` for a TCP reset.
    Transport {
        src: SocketAddr,
        dst: SocketAddr,
        reset: bool,
    },
    /// An ICMP or `ICMPv6` destination unreachable from `src` to `dst`.
    Unreachable { src: IpAddr, dst: IpAddr },
    /// Anything else (cut short, another protocol).
    Other,
}

/// Reads the addresses and ports of `frame` (no IPv4 options, no IPv6
/// extension headers: the program makes none).
pub(super) fn read(frame: &[u8]) -> Seen {
    let Some(ether_type) = frame.get(12..14) else {
        return Seen::Other;
    };
    let (src, dst, l4_proto, l4_off) = if ether_type == [0x08, 0x00] {
        let Some(ip) = frame.get(ETH_LEN..ETH_LEN + 20) else {
            return Seen::Other;
        };
        let src: [u8; 4] = ip[12..16].try_into().unwrap_or_default();
        let dst: [u8; 4] = ip[16..20].try_into().unwrap_or_default();
        (IpAddr::from(src), IpAddr::from(dst), ip[9], ETH_LEN + 20)
    } else if ether_type == [0x86, 0xdd] {
        let Some(ip) = frame.get(ETH_LEN..ETH_LEN + 40) else {
            return Seen::Other;
        };
        let src: [u8; 16] = ip[8..24].try_into().unwrap_or_default();
        let dst: [u8; 16] = ip[24..40].try_into().unwrap_or_default();
        (IpAddr::from(src), IpAddr::from(dst), ip[6], ETH_LEN + 40)
    } else {
        return Seen::Other;
    };
    let Some(l4) = frame.get(l4_off..) else {
        return Seen::Other;
    };
    match l4_proto {
        proto::TCP | proto::UDP | proto::SCTP if l4.len() >= 8 => Seen::Transport {
            src: SocketAddr::new(src, u16::from_be_bytes([l4[0], l4[1]])),
            dst: SocketAddr::new(dst, u16::from_be_bytes([l4[2], l4[3]])),
            reset: l4_proto == proto::TCP && l4.get(13).is_some_and(|f| f & TCP_RST != 0),
        },
        ICMP if l4.first() == Some(&3) => Seen::Unreachable { src, dst },
        ICMPV6 if l4.first() == Some(&1) => Seen::Unreachable { src, dst },
        _ => Seen::Other,
    }
}

fn pseudo_header(src: IpAddr, dst: IpAddr, l4_proto: u8, len: usize) -> Vec<u8> {
    let mut pseudo = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend([0, l4_proto]);
            pseudo.extend(u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        }
        (s, d) => {
            pseudo.extend(v6_octets(s));
            pseudo.extend(v6_octets(d));
            pseudo.extend(u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            pseudo.extend([0, 0, 0, l4_proto]);
        }
    }
    pseudo
}

/// RFC 1071 Internet checksum over the concatenation of `parts` (each of
/// even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for chunk in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_right_checksums_and_read_back() {
        for (src, dst, l4) in [
            ("10.0.0.2:40000", "172.30.0.41:80", proto::TCP),
            ("10.0.0.2:40000", "172.30.0.41:53", proto::UDP),
            ("[fd00:10::2]:40000", "[fd00:172:30::41]:80", proto::TCP),
            ("[fd00:10::2]:40000", "[fd00:172:30::41]:53", proto::UDP),
            ("10.0.0.2:40000", "172.30.0.41:3868", proto::SCTP),
            ("[fd00:10::2]:40000", "[fd00:172:30::41]:3868", proto::SCTP),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let frame = build(src, dst, l4, false);
            let l4_off = if src.is_ipv4() { 34 } else { 54 };
            if l4 == proto::SCTP {
                let mut zeroed = frame[l4_off..].to_vec();
                let field: [u8; 4] = zeroed[8..12].try_into().unwrap();
                zeroed[8..12].fill(0);
                assert_eq!(u32::from_le_bytes(field), crc32c(&zeroed), "CRC32c");
                assert_eq!(frame[l4_off + 12], SCTP_INIT);
                assert_eq!(
                    read(&frame),
                    Seen::Transport {
                        src,
                        dst,
                        reset: false
                    }
                );
                continue;
            }
            if src.is_ipv4() {
                assert_eq!(checksum(&[&frame[14..34]]), 0, "IPv4 header checksum");
            }
            let pseudo = pseudo_header(src.ip(), dst.ip(), l4, frame.len() - l4_off);
            assert_eq!(checksum(&[&pseudo, &frame[l4_off..]]), 0, "L4 checksum");
            assert_eq!(
                read(&frame),
                Seen::Transport {
                    src,
                    dst,
                    reset: false
                }
            );
        }
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn short_or_foreign_frames_are_other() {
        assert_eq!(read(&[]), Seen::Other);
        assert_eq!(read(&[0; 20]), Seen::Other);
    }
}
