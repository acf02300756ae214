//! Frames for `BPF_PROG_TEST_RUN`: Ethernet + IPv4/IPv6 + TCP/UDP/SCTP built
//! independently of the datapath, with checksums computed from scratch,
//! and the checks of what the program sent back.

use std::net::{IpAddr, SocketAddr};

use lb_userspace::model::Protocol;

pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_ACK: u8 = 0x10;
pub(crate) const TCP_PSH: u8 = 0x08;
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_RST: u8 = 0x04;
/// SCTP chunk types (RFC 9260 3.2).
pub(crate) const SCTP_DATA: u8 = 0;
pub(crate) const SCTP_INIT: u8 = 1;
pub(crate) const SCTP_INIT_ACK: u8 = 2;
pub(crate) const SCTP_ABORT: u8 = 6;
pub(crate) const SCTP_SHUTDOWN: u8 = 7;

/// One frame's worth of headers, built with correct checksums.
#[derive(Clone, Debug)]
pub(crate) struct Frame {
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
    pub(crate) proto: Protocol,
    /// TCP flags; for SCTP the type of the (one) chunk.
    pub(crate) tcp_flags: u8,
    /// UDP over IPv4 only: send a zero ("no") checksum.
    pub(crate) udp_zero_csum: bool,
    pub(crate) payload: Vec<u8>,
}

impl Frame {
    pub(crate) fn tcp(src: &str, dst: &str, flags: u8) -> Self {
        Self {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: Protocol::Tcp,
            tcp_flags: flags,
            udp_zero_csum: false,
            payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        }
    }

    pub(crate) fn udp(src: &str, dst: &str) -> Self {
        Self {
            proto: Protocol::Udp,
            tcp_flags: 0,
            payload: b"ping".to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    /// An SCTP packet with one chunk of type `chunk` (INIT: verification
    /// tag 0 and an INIT's fixed fields; others: a tag and a payload).
    pub(crate) fn sctp(src: &str, dst: &str, chunk: u8) -> Self {
        Self {
            proto: Protocol::Sctp,
            tcp_flags: chunk,
            payload: b"sctp data chunk!".to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    pub(crate) fn with_dst(&self, dst: SocketAddr) -> Self {
        Self {
            dst,
            ..self.clone()
        }
    }

    pub(crate) fn with_src(&self, src: SocketAddr) -> Self {
        Self {
            src,
            ..self.clone()
        }
    }

    /// The reply a backend at `self.dst` sends to `self.src`.
    pub(crate) fn reply(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            tcp_flags: match self.proto {
                Protocol::Tcp => TCP_SYN | TCP_ACK,
                Protocol::Udp => 0,
                Protocol::Sctp => SCTP_INIT_ACK,
            },
            ..self.clone()
        }
    }

    pub(crate) fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.src.port().to_be_bytes());
        l4.extend(self.dst.port().to_be_bytes());
        match self.proto {
            Protocol::Tcp => {
                l4.extend(0x0102_0304_u32.to_be_bytes()); // seq
                l4.extend(
                    if self.tcp_flags & TCP_ACK != 0 {
                        0x0a0b_0c0d_u32
                    } else {
                        0
                    }
                    .to_be_bytes(),
                );
                l4.push(5 << 4);
                l4.push(self.tcp_flags);
                l4.extend(64240_u16.to_be_bytes());
                l4.extend([0, 0]); // checksum
                l4.extend([0, 0]); // urgent
            }
            Protocol::Udp => {
                let len = u16::try_from(8 + self.payload.len()).unwrap();
                l4.extend(len.to_be_bytes());
                l4.extend([0, 0]);
            }
            Protocol::Sctp => {
                let tag = if self.tcp_flags == SCTP_INIT {
                    0
                } else {
                    0x5c7f_0001_u32
                };
                l4.extend(tag.to_be_bytes());
                l4.extend([0, 0, 0, 0]); // checksum
                let chunk: Vec<u8> = if self.tcp_flags == SCTP_INIT {
                    // initiate tag, a_rwnd, streams out/in, initial TSN
                    [0x5c7f_0002_u32, 65_535, 0x000a_000a, 1]
                        .iter()
                        .flat_map(|w| w.to_be_bytes())
                        .collect()
                } else {
                    self.payload.clone()
                };
                l4.push(self.tcp_flags);
                l4.push(0);
                l4.extend(u16::try_from(4 + chunk.len()).unwrap().to_be_bytes());
                l4.extend(chunk);
                let crc = crc32c(&l4);
                l4[8..12].copy_from_slice(&crc.to_le_bytes());
                return l4;
            }
        }
        l4.extend(&self.payload);
        let csum_off = if self.proto == Protocol::Tcp { 16 } else { 6 };
        if !(self.udp_zero_csum && self.proto == Protocol::Udp) {
            let mut csum = l4_checksum(self.src.ip(), self.dst.ip(), self.proto, &l4);
            if csum == 0 && self.proto == Protocol::Udp {
                csum = 0xffff;
            }
            l4[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());
        }
        l4
    }

    pub(crate) fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut frame = eth_header(self.src.is_ipv4());
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let total = u16::try_from(20 + l4.len()).unwrap();
                let mut ip = vec![0x45, 0];
                ip.extend(total.to_be_bytes());
                ip.extend(0x1234_u16.to_be_bytes());
                ip.extend(0x4000_u16.to_be_bytes()); // DF
                ip.push(64);
                ip.push(self.proto.number());
                ip.extend([0, 0]);
                ip.extend(s.octets());
                ip.extend(d.octets());
                let csum = checksum(&ip, 0);
                ip[10..12].copy_from_slice(&csum.to_be_bytes());
                frame.extend(ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame.extend(ipv6_header(
                    s.octets(),
                    d.octets(),
                    self.proto.number(),
                    l4.len(),
                ));
            }
            _ => panic!("mixed families"),
        }
        frame.extend(l4);
        frame
    }
}

pub(crate) fn eth_header(v4: bool) -> Vec<u8> {
    let mut eth = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    eth.extend(if v4 { 0x0800_u16 } else { 0x86dd_u16 }.to_be_bytes());
    eth
}

pub(crate) fn ipv6_header(src: [u8; 16], dst: [u8; 16], next: u8, payload_len: usize) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend(u16::try_from(payload_len).unwrap().to_be_bytes());
    ip.push(next);
    ip.push(64);
    ip.extend(src);
    ip.extend(dst);
    ip
}

/// `CRC32c` of `bytes` from scratch, bit by bit (RFC 9260 appendix A:
/// reflected Castagnoli polynomial, initial value all ones, complemented).
pub(crate) fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 0 {
                crc >> 1
            } else {
                (crc >> 1) ^ 0x82f6_3b78
            };
        }
    }
    !crc
}

/// Checks an SCTP packet's checksum: the `CRC32c` of the packet with the
/// field zeroed, stored little-endian.
pub(crate) fn assert_sctp_checksum(sctp: &[u8]) {
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    let field = u32::from_le_bytes(sctp[8..12].try_into().unwrap());
    assert_eq!(field, crc32c(&zeroed), "SCTP CRC32c wrong");
}

/// RFC 1071 Internet checksum over `data`, starting from `initial`.
pub(crate) fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

pub(crate) fn pseudo_header(src: IpAddr, dst: IpAddr, proto: Protocol, len: usize) -> Vec<u8> {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.push(0);
            pseudo.push(proto.number());
            pseudo.extend(u16::try_from(len).unwrap().to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend(u32::try_from(len).unwrap().to_be_bytes());
            pseudo.extend([0, 0, 0, proto.number()]);
        }
        _ => panic!("mixed families"),
    }
    pseudo
}

pub(crate) fn l4_checksum(src: IpAddr, dst: IpAddr, proto: Protocol, l4: &[u8]) -> u16 {
    let mut data = pseudo_header(src, dst, proto, l4.len());
    data.extend(l4);
    checksum(&data, 0)
}

/// Parses an Ethernet + IPv4/IPv6 (no options/extensions) + TCP/UDP frame
/// and checks every checksum from scratch. Returns (src, dst).
pub(crate) fn verify_checksums(frame: &[u8]) -> (SocketAddr, SocketAddr) {
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, proto, l4) = if ether_type == 0x0800 {
        let ip = &frame[14..34];
        assert_eq!(checksum(ip, 0), 0, "IPv4 header checksum wrong");
        let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
        let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
        (src, dst, ip[9], &frame[34..])
    } else {
        let ip = &frame[14..54];
        let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        (src, dst, ip[6], &frame[54..])
    };
    let proto = match proto {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        132 => Protocol::Sctp,
        other => panic!("unexpected protocol {other}"),
    };
    if proto == Protocol::Sctp {
        assert_sctp_checksum(l4);
        let sport = u16::from_be_bytes([l4[0], l4[1]]);
        let dport = u16::from_be_bytes([l4[2], l4[3]]);
        return (SocketAddr::new(src, sport), SocketAddr::new(dst, dport));
    }
    let udp_zero = proto == Protocol::Udp && l4[6] == 0 && l4[7] == 0;
    if udp_zero {
        assert!(src.is_ipv4(), "IPv6 UDP must carry a checksum");
    } else {
        assert_eq!(
            l4_checksum(src, dst, proto, l4),
            0,
            "{} checksum wrong",
            proto.name()
        );
    }
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    (SocketAddr::new(src, sport), SocketAddr::new(dst, dport))
}

/// Checks an ICMP/ICMPv6 port-unreachable reply to `offending`: swapped
/// MACs, service address -> client, the offending IP header + 8 bytes
/// quoted, every checksum right.
pub(crate) fn assert_port_unreachable(reply: &[u8], offending: &[u8]) {
    assert_eq!(&reply[0..6], &offending[6..12], "destination MAC");
    assert_eq!(&reply[6..12], &offending[0..6], "source MAC");
    assert_eq!(&reply[12..14], &offending[12..14], "EtherType");
    if offending[12..14] == [0x08, 0x00] {
        assert_eq!(reply.len(), 14 + 20 + 8 + 28);
        let ip = &reply[14..34];
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56, "total length");
        assert_eq!(ip[9], 1, "protocol ICMP");
        assert_eq!(&ip[12..16], &offending[30..34], "from the service address");
        assert_eq!(&ip[16..20], &offending[26..30], "to the client");
        assert_eq!(checksum(ip, 0), 0, "IPv4 header checksum");
        let icmp = &reply[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 3), "destination/port unreachable");
        assert_eq!(&icmp[8..], &offending[14..14 + 28], "quote");
        assert_eq!(checksum(icmp, 0), 0, "ICMP checksum");
    } else {
        assert_eq!(reply.len(), 14 + 40 + 8 + 48);
        let ip = &reply[14..54];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 56, "payload length");
        assert_eq!(ip[6], 58, "next header ICMPv6");
        assert_eq!(&ip[8..24], &offending[38..54], "from the service address");
        assert_eq!(&ip[24..40], &offending[22..38], "to the client");
        let icmp = &reply[54..];
        assert_eq!((icmp[0], icmp[1]), (1, 4), "destination/port unreachable");
        assert_eq!(&icmp[8..], &offending[14..14 + 48], "quote");
        let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        let mut pseudo = pseudo_header(src, dst, Protocol::Tcp, icmp.len());
        pseudo[39] = 58;
        pseudo.extend(icmp);
        assert_eq!(checksum(&pseudo, 0), 0, "ICMPv6 checksum");
    }
}

/// Checks a TCP reset answering the TCP segment `offending` (built by
/// [`Frame`]: sequence number 0x01020304, acknowledgment 0x0a0b0c0d when
/// it has ACK): swapped MACs, the service address and port -> the client,
/// no options, the RFC 9293 sequence and acknowledgment numbers, every
/// checksum right.
pub(crate) fn assert_tcp_reset(reply: &[u8], offending: &[u8]) {
    const RST: u8 = 0x04;
    assert_eq!(&reply[0..6], &offending[6..12], "destination MAC");
    assert_eq!(&reply[6..12], &offending[0..6], "source MAC");
    assert_eq!(&reply[12..14], &offending[12..14], "EtherType");
    let v4 = offending[12..14] == [0x08, 0x00];
    let (ip_len, l4_off) = if v4 { (20, 34) } else { (40, 54) };
    assert_eq!(
        reply.len(),
        14 + ip_len + 20,
        "Ethernet + IP + TCP, no options"
    );
    let (src, dst) = verify_checksums(reply);
    let (client, service) = verify_checksums(offending);
    assert_eq!(
        (src, dst),
        (service, client),
        "from the service to the client"
    );
    let ip = &reply[14..l4_off];
    if v4 {
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40, "total length");
        assert_eq!(ip[9], 6, "protocol TCP");
    } else {
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 20, "payload length");
        assert_eq!(ip[6], 6, "next header TCP");
    }
    let tcp = &reply[l4_off..];
    let asked = &offending[l4_off..];
    let word = |b: &[u8], off: usize| u32::from_be_bytes(b[off..off + 4].try_into().unwrap());
    assert_eq!(tcp[12], 5 << 4, "no options");
    let payload = u32::try_from(asked.len() - 20).unwrap();
    if asked[13] & TCP_ACK != 0 {
        assert_eq!(tcp[13], RST, "a bare RST");
        assert_eq!(word(tcp, 4), word(asked, 8), "seq = the segment's ack");
    } else {
        assert_eq!(tcp[13], RST | TCP_ACK, "RST+ACK");
        assert_eq!(word(tcp, 4), 0, "seq 0");
        // SYN and FIN take a sequence number each.
        let flags = u32::from(asked[13] & TCP_SYN != 0) + u32::from(asked[13] & TCP_FIN != 0);
        assert_eq!(
            word(tcp, 8),
            word(asked, 4).wrapping_add(payload + flags),
            "ack = the segment's seq + its length"
        );
    }
}

/// An ICMP (IPv4) or `ICMPv6` error frame from `src` to `dst`: type
/// `icmp_type`, `code`, the 4 bytes after the checksum `rest` (the MTU of
/// "fragmentation needed" / "packet too big"), then `quote` (the IP packet
/// it is about, as much of it as the sender quotes); every checksum from
/// scratch.
pub(crate) fn icmp_error(
    src: IpAddr,
    dst: IpAddr,
    (icmp_type, code): (u8, u8),
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend(rest);
    icmp.extend(quote);
    let mut frame = eth_header(src.is_ipv4());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let csum = checksum(&icmp, 0);
            icmp[2..4].copy_from_slice(&csum.to_be_bytes());
            let total = u16::try_from(20 + icmp.len()).unwrap();
            let mut ip = vec![0x45, 0xc0];
            ip.extend(total.to_be_bytes());
            ip.extend([0, 0, 0, 0, 64, 1, 0, 0]);
            ip.extend(s.octets());
            ip.extend(d.octets());
            let csum = checksum(&ip, 0);
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            frame.extend(ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let csum = checksum(&icmp, icmpv6_pseudo_sum(s.octets(), d.octets(), icmp.len()));
            icmp[2..4].copy_from_slice(&csum.to_be_bytes());
            frame.extend(ipv6_header(s.octets(), d.octets(), 58, icmp.len()));
        }
        _ => panic!("mixed families"),
    }
    frame.extend(icmp);
    frame
}

/// The unfolded sum of the `ICMPv6` pseudo-header (RFC 4443 2.3).
fn icmpv6_pseudo_sum(src: [u8; 16], dst: [u8; 16], len: usize) -> u32 {
    let mut pseudo = Vec::new();
    pseudo.extend(src);
    pseudo.extend(dst);
    pseudo.extend(u32::try_from(len).unwrap().to_be_bytes());
    pseudo.extend([0, 0, 0, 58]);
    u32::from(!checksum(&pseudo, 0))
}

/// Checks an ICMP / `ICMPv6` error frame's checksums from scratch (outer
/// IPv4 header, ICMP message with the `ICMPv6` pseudo-header) and returns
/// (outer source, outer destination, the quoted bytes).
pub(crate) fn verify_icmp_error(frame: &[u8]) -> (IpAddr, IpAddr, Vec<u8>) {
    if frame[12..14] == [0x08, 0x00] {
        let ip = &frame[14..34];
        assert_eq!(checksum(ip, 0), 0, "outer IPv4 header checksum wrong");
        assert_eq!(ip[9], 1, "not ICMP");
        let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
        let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
        let icmp = &frame[34..];
        assert_eq!(checksum(icmp, 0), 0, "ICMP checksum wrong");
        (src, dst, icmp[8..].to_vec())
    } else {
        let ip = &frame[14..54];
        assert_eq!(ip[6], 58, "not ICMPv6");
        let s = <[u8; 16]>::try_from(&ip[8..24]).unwrap();
        let d = <[u8; 16]>::try_from(&ip[24..40]).unwrap();
        let icmp = &frame[54..];
        let pseudo = icmpv6_pseudo_sum(s, d, icmp.len());
        assert_eq!(checksum(icmp, pseudo), 0, "ICMPv6 checksum wrong");
        (IpAddr::from(s), IpAddr::from(d), icmp[8..].to_vec())
    }
}

/// FRAME (UDP) as IP fragments with identification ID: its L4 bytes cut
/// at CUTS (offsets in the L4 bytes, multiples of 8, ascending), the
/// first fragment carrying the UDP header. IPv4: MF and the offset in the
/// header (checksum computed); IPv6: a Fragment header right after the
/// fixed header, as Linux sends them.
pub(crate) fn fragments(frame: &Frame, cuts: &[usize], id: u32) -> Vec<Vec<u8>> {
    let l4 = frame.l4();
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(l4.len());
    bounds
        .windows(2)
        .map(|w| {
            let (start, end) = (w[0], w[1]);
            assert_eq!(start % 8, 0, "fragment offsets are multiples of 8");
            let more = end < l4.len();
            fragment(frame, start, &l4[start..end], more, id)
        })
        .collect()
}

/// One fragment of FRAME's datagram: CHUNK at OFFSET of the L4 bytes.
pub(crate) fn fragment(frame: &Frame, offset: usize, chunk: &[u8], more: bool, id: u32) -> Vec<u8> {
    let mut out = eth_header(frame.src.is_ipv4());
    let units = u16::try_from(offset / 8).unwrap();
    match (frame.src.ip(), frame.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = vec![0x45, 0];
            ip.extend(u16::try_from(20 + chunk.len()).unwrap().to_be_bytes());
            ip.extend(u16::try_from(id).unwrap().to_be_bytes());
            ip.extend((units | if more { 0x2000 } else { 0 }).to_be_bytes());
            ip.extend([64, frame.proto.number(), 0, 0]);
            ip.extend(s.octets());
            ip.extend(d.octets());
            let csum = checksum(&ip, 0);
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            out.extend(ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend(ipv6_header(s.octets(), d.octets(), 44, 8 + chunk.len()));
            out.extend([frame.proto.number(), 0]);
            out.extend(((units << 3) | u16::from(more)).to_be_bytes());
            out.extend(id.to_be_bytes());
        }
        _ => panic!("mixed families"),
    }
    out.extend(chunk);
    out
}

/// One parsed fragment (`fragment`'s layout): addresses, identification,
/// offset in the L4 bytes, more fragments, the fragment's data.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) id: u32,
    pub(crate) offset: usize,
    pub(crate) more: bool,
    pub(crate) data: Vec<u8>,
}

/// Parses a fragment; checks the IPv4 header checksum and the lengths.
pub(crate) fn parse_fragment(frame: &[u8]) -> Parsed {
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    if ether_type == 0x0800 {
        let ip = &frame[14..34];
        assert_eq!(checksum(ip, 0), 0, "IPv4 header checksum wrong");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            frame.len() - 14
        );
        let flags = u16::from_be_bytes([ip[6], ip[7]]);
        Parsed {
            src: IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap()),
            dst: IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap()),
            id: u32::from(u16::from_be_bytes([ip[4], ip[5]])),
            offset: usize::from(flags & 0x1fff) * 8,
            more: flags & 0x2000 != 0,
            data: frame[34..].to_vec(),
        }
    } else {
        let ip = &frame[14..54];
        assert_eq!(ip[6], 44, "no Fragment header");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            frame.len() - 54
        );
        let fh = &frame[54..62];
        let off = u16::from_be_bytes([fh[2], fh[3]]);
        Parsed {
            src: IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap()),
            dst: IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap()),
            id: u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]),
            offset: usize::from(off >> 3) * 8,
            more: off & 1 != 0,
            data: frame[62..].to_vec(),
        }
    }
}

/// Reassembles FRAGMENTS (any order) as a receiver would: every fragment's
/// addresses and identification agree, the pieces cover the datagram
/// without gap; returns (source, destination, L4 bytes), the UDP checksum
/// checked over the whole datagram.
pub(crate) fn reassemble(fragments: &[Vec<u8>]) -> (IpAddr, IpAddr, Vec<u8>) {
    let mut parts: Vec<Parsed> = fragments.iter().map(|f| parse_fragment(f)).collect();
    parts.sort_by_key(|p| p.offset);
    let (src, dst, id) = (parts[0].src, parts[0].dst, parts[0].id);
    let mut l4 = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        assert_eq!(
            (part.src, part.dst, part.id),
            (src, dst, id),
            "fragment {i}"
        );
        assert_eq!(part.offset, l4.len(), "fragment {i}: gap or overlap");
        assert_eq!(part.more, i + 1 < parts.len(), "fragment {i}: MF/M flag");
        l4.extend(&part.data);
    }
    assert_eq!(
        usize::from(u16::from_be_bytes([l4[4], l4[5]])),
        l4.len(),
        "UDP length"
    );
    assert_eq!(
        l4_checksum(src, dst, Protocol::Udp, &l4),
        0,
        "reassembled UDP checksum wrong"
    );
    (src, dst, l4)
}
