//! The Services the fuzzer runs against and the valid frames it starts
//! from: clients to every frontend (and to unserved ports of service
//! addresses), replies of flows it has seen translated, ICMP errors about
//! them, all with options, extension headers, fragments and VLAN tags
//! now and then, both families.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_userspace::model::{Frontend, FrontendKind, FrontendSpec, Protocol};

use super::parse::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ICMP, ICMPV6, TCP, UDP};
use super::parse::{fix_checksums, ip};
use super::rng::Rng;
use crate::support::prog_test::{
    BACKENDS4, BACKENDS6, Fixture, NODE4, NODE6, VIP4, VIP6, addrs, frontend, node_config, spec,
};

/// Service addresses without any backend (refusals).
const EMPTY4: &str = "198.19.0.11";
const EMPTY6: &str = "fd00:96::11";
/// Load-balancer addresses with source ranges.
const LB4: &str = "198.19.1.1";
const LB6: &str = "fd00:97::1";
/// `NodePort` backends on another node (source NAT).
const REMOTE4: &str = "198.18.12.2:8080";
const REMOTE6: &str = "[fd00:12::2]:8080";
/// Clients: in the load balancers' source ranges, outside them, and a
/// backend pod itself (hairpin).
const CLIENTS: [&str; 6] = [
    "198.18.1.2",
    "198.18.9.2",
    "198.18.2.2",
    "fd00:1::2",
    "fd00:9::2",
    "fd00:2::2",
];
/// Hairpin source addresses of `node_config`.
const LOOPBACK4: &str = "169.254.42.1";
const LOOPBACK6: &str = "100::6c62:1";
/// A router on the path (source of ICMP errors).
const ROUTERS: [&str; 2] = ["198.18.50.1", "fd00:50::1"];

/// The Services under test, as written into the maps.
pub(crate) struct Services {
    pub(crate) specs: Vec<(Frontend, FrontendSpec)>,
    /// Every address the datapath has state for: frontends, backends,
    /// node and hairpin addresses. A frame that carries none of them
    /// anywhere is not service traffic.
    pub(crate) relevant: Vec<IpAddr>,
}

impl Services {
    pub(crate) fn new() -> Self {
        let mut specs = Vec::new();
        for (vip, backends) in [(VIP4, &BACKENDS4), (VIP6, &BACKENDS6)] {
            let backends = addrs(backends);
            for (port, proto) in [(80, Protocol::Tcp), (53, Protocol::Udp)] {
                let fe = frontend(vip, port, proto);
                specs.push((fe, spec(FrontendKind::ClusterIp, &backends)));
            }
            let mut sticky = spec(FrontendKind::ClusterIp, &backends);
            sticky.affinity_timeout_s = 600;
            specs.push((frontend(vip, 443, Protocol::Tcp), sticky));
        }
        for empty in [EMPTY4, EMPTY6] {
            for (port, proto) in [(80, Protocol::Tcp), (53, Protocol::Udp)] {
                specs.push((
                    frontend(empty, port, proto),
                    spec(FrontendKind::ClusterIp, &[]),
                ));
            }
        }
        for (node, remote) in [(NODE4, REMOTE4), (NODE6, REMOTE6)] {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                specs.push((
                    frontend(node, 30080, proto),
                    spec(FrontendKind::NodePort, &addrs(&[remote])),
                ));
            }
        }
        for (lb, backends, range) in [
            (LB4, &BACKENDS4, ("198.18.1.0", 24)),
            (LB6, &BACKENDS6, ("fd00:1::", 64)),
        ] {
            let mut ranged = spec(FrontendKind::LoadBalancer, &addrs(backends));
            ranged.source_ranges = vec![(range.0.parse().unwrap(), range.1)];
            specs.push((frontend(lb, 80, Protocol::Tcp), ranged));
        }
        let mut relevant: Vec<IpAddr> = specs
            .iter()
            .flat_map(|(fe, spec)| {
                std::iter::once(fe.addr).chain(spec.backends.iter().map(|b| b.addr))
            })
            .chain(
                [NODE4, NODE6, LOOPBACK4, LOOPBACK6]
                    .iter()
                    .map(|a| a.parse().unwrap()),
            )
            .collect();
        relevant.sort();
        relevant.dedup();
        Self { specs, relevant }
    }

    /// Writes the Services and the node configuration into `fx`'s maps.
    pub(crate) fn install(&self, fx: &mut Fixture) {
        fx.maps.write_config(&node_config()).expect("node config");
        fx.set_specs(&self.specs);
    }

    /// The backends of the frontend `addr:port/proto`, if it is one.
    pub(crate) fn backends_of(&self, dst: SocketAddr, proto: u8) -> Option<Vec<SocketAddr>> {
        self.specs
            .iter()
            .find(|(fe, _)| {
                fe.addr == dst.ip() && fe.port == dst.port() && fe.proto.number() == proto
            })
            .map(|(_, spec)| {
                spec.backends
                    .iter()
                    .map(|b| SocketAddr::new(b.addr, b.port))
                    .collect()
            })
    }

    /// Whether `addr:port/proto` is a frontend with `backend` among its
    /// backends.
    pub(crate) fn serves(&self, frontend: SocketAddr, proto: u8, backend: SocketAddr) -> bool {
        self.backends_of(frontend, proto)
            .is_some_and(|backends| backends.contains(&backend))
    }

    /// Whether `addr` is the address of some frontend.
    pub(crate) fn is_frontend_addr(&self, addr: IpAddr) -> bool {
        self.specs.iter().any(|(fe, _)| fe.addr == addr)
    }

    /// Source addresses a translated packet may get: its own, the node's,
    /// the hairpin address.
    pub(crate) fn snat_addrs() -> [IpAddr; 4] {
        [NODE4, NODE6, LOOPBACK4, LOOPBACK6].map(|a| a.parse().unwrap())
    }

    /// The byte strings of every relevant address.
    pub(crate) fn relevant_bytes(&self) -> Vec<Vec<u8>> {
        self.relevant
            .iter()
            .map(|addr| match addr {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            })
            .collect()
    }
}

/// One frame to build: a TCP or UDP packet with the optional parts the
/// datapath must cope with. `bytes` gives it correct checksums.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
    pub(crate) proto: u8,
    pub(crate) tcp_flags: u8,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) tcp_options: Vec<u8>,
    pub(crate) payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub(crate) ip_options: Vec<u8>,
    /// IPv6 extension headers: (type, body of 6 + 8n bytes).
    pub(crate) ext_headers: Vec<(u8, Vec<u8>)>,
    /// Fragment: offset in 8-byte units and "more fragments".
    pub(crate) fragment: Option<(u16, bool)>,
    /// VLAN tags (TPID) outermost first.
    pub(crate) vlan: Vec<u16>,
    pub(crate) ttl: u8,
    /// IPv4 UDP: send a zero ("no") checksum.
    pub(crate) udp_no_checksum: bool,
}

const TCP_FLAG_SETS: [u8; 10] = [0x02, 0x10, 0x18, 0x11, 0x04, 0x14, 0x12, 0x01, 0x00, 0x29];

impl Spec {
    pub(crate) fn new(src: SocketAddr, dst: SocketAddr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            tcp_flags: 0x02,
            seq: 0x0102_0304,
            ack: 0,
            tcp_options: Vec::new(),
            payload: b"ping".to_vec(),
            ip_options: Vec::new(),
            ext_headers: Vec::new(),
            fragment: None,
            vlan: Vec::new(),
            ttl: 64,
            udp_no_checksum: false,
        }
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.src.port().to_be_bytes());
        l4.extend(self.dst.port().to_be_bytes());
        if self.proto == TCP {
            l4.extend(self.seq.to_be_bytes());
            l4.extend(self.ack.to_be_bytes());
            let doff = u8::try_from((20 + self.tcp_options.len()) / 4).unwrap_or(15);
            l4.extend([doff << 4, self.tcp_flags]);
            l4.extend(64240_u16.to_be_bytes());
            l4.extend([0, 0, 0, 0]);
            l4.extend(&self.tcp_options);
        } else {
            let len = u16::try_from(8 + self.payload.len()).unwrap_or(u16::MAX);
            l4.extend(len.to_be_bytes());
            // Not zero, so that `fix_checksums` computes it (zero is "no
            // checksum" for IPv4 UDP, which it leaves alone).
            l4.extend(if self.udp_no_checksum {
                [0, 0]
            } else {
                [0xff, 0xff]
            });
        }
        l4.extend(&self.payload);
        l4
    }

    /// The frame, every checksum right (the L4 one over the whole
    /// datagram, also when this is a fragment of it).
    pub(crate) fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4();
        let v4 = self.src.is_ipv4();
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        for (i, tpid) in self.vlan.iter().enumerate() {
            frame.extend(tpid.to_be_bytes());
            frame.extend(u16::try_from(100 + i).unwrap().to_be_bytes());
        }
        frame.extend(if v4 { ETH_P_IP } else { ETH_P_IPV6 }.to_be_bytes());
        let l3_off = frame.len();
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let hlen = 20 + self.ip_options.len();
                let ihl = u8::try_from(hlen / 4).unwrap_or(15) & 0x0f;
                let total = u16::try_from(hlen + l4.len()).unwrap_or(u16::MAX);
                let frag = self.fragment.map_or(0x4000, |(offset, more)| {
                    (offset & 0x1fff) | if more { 0x2000 } else { 0 }
                });
                frame.extend([0x40 | ihl, 0]);
                frame.extend(total.to_be_bytes());
                frame.extend(0x1234_u16.to_be_bytes());
                frame.extend(u16::to_be_bytes(frag));
                frame.extend([self.ttl, self.proto, 0, 0]);
                frame.extend(s.octets());
                frame.extend(d.octets());
                frame.extend(&self.ip_options);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut chain: Vec<(u8, Vec<u8>)> = self.ext_headers.clone();
                if let Some((offset, more)) = self.fragment {
                    let word = (offset << 3) | u16::from(more);
                    let mut body = word.to_be_bytes().to_vec();
                    body.extend(0x1234_5678_u32.to_be_bytes());
                    chain.push((44, body));
                }
                let ext_len: usize = chain.iter().map(|(_, body)| body.len() + 2).sum();
                let first = chain.first().map_or(self.proto, |(ty, _)| *ty);
                frame.extend([0x60, 0, 0, 0]);
                frame.extend(u16::try_from(ext_len + l4.len()).unwrap().to_be_bytes());
                frame.extend([first, self.ttl]);
                frame.extend(s.octets());
                frame.extend(d.octets());
                for (i, (ty, body)) in chain.iter().enumerate() {
                    let next = chain.get(i + 1).map_or(self.proto, |(t, _)| *t);
                    let units = if *ty == 44 {
                        0
                    } else {
                        (body.len() + 2) / 8 - 1
                    };
                    frame.extend([next, u8::try_from(units).unwrap()]);
                    frame.extend(body);
                }
            }
            _ => panic!("mixed families"),
        }
        frame.extend(&l4);
        if self.fragment.is_some() {
            // Checksums as for the whole datagram, computed unfragmented.
            let mut whole = self.clone();
            whole.fragment = None;
            let whole = whole.bytes();
            let csum_at =
                |f: &[u8]| ip(f).map(|ip| ip.l4_off + if self.proto == TCP { 16 } else { 6 });
            if let (Some(from), Some(to)) = (csum_at(&whole), csum_at(&frame)) {
                let value = [whole[from], whole[from + 1]];
                frame[to..to + 2].copy_from_slice(&value);
            }
            let ip = ip(&frame).expect("built");
            if ip.v4 {
                let sum = !super::parse::ones_sum(&frame[l3_off..l3_off + ip.hlen], 0);
                frame[l3_off + 10..l3_off + 12].copy_from_slice(&sum.to_be_bytes());
            }
        } else {
            fix_checksums(&mut frame);
        }
        frame
    }
}

/// A valid frame from one of `CLIENTS` to a frontend (or to an unserved
/// port of a service address), with random flags, payload and now and
/// then options, extension headers, a fragment or VLAN tags.
pub(crate) fn to_service(rng: &mut Rng, services: &Services) -> Spec {
    let (fe, _) = rng.pick(&services.specs);
    let v4 = fe.addr.is_ipv4();
    let clients: Vec<IpAddr> = CLIENTS
        .iter()
        .map(|c| c.parse::<IpAddr>().unwrap())
        .filter(|c| c.is_ipv4() == v4)
        .collect();
    let client = *rng.pick(&clients);
    // A small port pool, so that flows repeat (established, replies).
    let sport = 40000 + u16::try_from(rng.below(24)).unwrap();
    let mut dport = fe.port;
    let mut proto = fe.proto.number();
    if rng.chance(10) {
        // An unserved port or the other protocol of a service address.
        dport = *rng.pick(&[81, 8080, 30081, fe.port]);
        proto = *rng.pick(&[TCP, UDP]);
    }
    let mut spec = Spec::new(
        SocketAddr::new(client, sport),
        SocketAddr::new(fe.addr, dport),
        proto,
    );
    spec.tcp_flags = *rng.pick(&TCP_FLAG_SETS);
    spec.seq = u32::try_from(rng.next_u64() >> 32).unwrap();
    spec.ack = if spec.tcp_flags & 0x10 != 0 {
        u32::try_from(rng.next_u64() >> 32).unwrap()
    } else {
        0
    };
    let len = *rng.pick(&[0, 1, 4, 17, 64, 300]);
    spec.payload = rng.bytes(len);
    decorate(rng, &mut spec);
    spec
}

/// Now and then: TCP or IP options, IPv6 extension headers, a fragment,
/// VLAN tags, an odd TTL.
pub(crate) fn decorate(rng: &mut Rng, spec: &mut Spec) {
    if spec.proto == UDP && spec.src.is_ipv4() && rng.chance(10) {
        spec.udp_no_checksum = true;
    }
    if spec.proto == TCP && rng.chance(15) {
        // MSS, SACK permitted, timestamps, window scale, NOPs; padded.
        let mut options = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
        options.extend(rng.bytes(8));
        options.extend([1, 3, 3, 7]);
        options.truncate(4 * rng.range(1, 5));
        spec.tcp_options = options;
    }
    if rng.chance(5) {
        if spec.src.is_ipv4() {
            // Record route (7) or NOPs and end of list, 4..40 bytes.
            let words = rng.range(1, 10);
            let mut options = vec![1; words * 4];
            if rng.chance(50) {
                options[0] = 7;
                options[1] = u8::try_from(words * 4 - 1).unwrap();
                options[2] = 4;
            }
            spec.ip_options = options;
        } else {
            for _ in 0..rng.range(1, 3) {
                let ty = *rng.pick(&[0, 60, 43]);
                let mut body = vec![1, 4, 0, 0, 0, 0];
                if ty == 43 {
                    // Routing type 4 (segment routing), segments left 0.
                    body = vec![4, 0, 0, 0, 0, 0];
                }
                body.extend(vec![0; 8 * rng.below(2)]);
                spec.ext_headers.push((ty, body));
            }
        }
    }
    if rng.chance(5) {
        spec.fragment = Some(*rng.pick(&[(0, true), (185, true), (185, false), (1, false)]));
    }
    if rng.chance(4) {
        spec.vlan = vec![*rng.pick(&[ETH_P_8021Q, ETH_P_8021AD])];
        if rng.chance(30) {
            spec.vlan.push(ETH_P_8021Q);
        }
    }
    if rng.chance(5) {
        spec.ttl = *rng.pick(&[0, 1, 2, 255]);
    }
}

/// The reply its backend sends to a frame the program translated (`out`):
/// source and destination swapped, TCP SYN-ACK or ACK, new payload.
pub(crate) fn reply_to(rng: &mut Rng, out: &[u8]) -> Option<Spec> {
    let ip = ip(out)?;
    let (sport, dport) = super::parse::ports(out, &ip)?;
    let mut spec = Spec::new(
        SocketAddr::new(ip.dst, dport),
        SocketAddr::new(ip.src, sport),
        ip.proto,
    );
    spec.tcp_flags = *rng.pick(&[0x12, 0x10, 0x18, 0x11, 0x04, 0x14]);
    spec.ack = u32::try_from(rng.next_u64() >> 32).unwrap();
    let len = *rng.pick(&[0, 3, 40]);
    spec.payload = rng.bytes(len);
    if rng.chance(30) {
        decorate(rng, &mut spec);
    }
    Some(spec)
}

/// An ICMP error about a packet the program translated (`out`, as it left
/// towards the backend) or a reply (back to the client): from a router on
/// the path, quoting the packet's head. Fragmentation needed / packet too
/// big, port unreachable, time exceeded.
pub(crate) fn icmp_error_about(rng: &mut Rng, out: &[u8]) -> Option<Vec<u8>> {
    let quoted_ip = ip(out)?;
    let v4 = quoted_ip.v4;
    let quote_len =
        (quoted_ip.l4_off - quoted_ip.l3_off + 8) + if rng.chance(30) { rng.below(64) } else { 0 };
    let quote_end = (quoted_ip.l3_off + quote_len).min(out.len());
    let quote = &out[quoted_ip.l3_off..quote_end];
    // To the quoted packet's source, from a router or its destination.
    let from: IpAddr = if rng.chance(50) {
        quoted_ip.dst
    } else {
        ROUTERS[usize::from(!v4)].parse().unwrap()
    };
    let (ty, code, word): (u8, u8, u32) = if v4 {
        *rng.pick(&[(3, 4, 1400), (3, 3, 0), (11, 0, 0), (3, 1, 0)])
    } else {
        *rng.pick(&[(2, 0, 1400), (1, 4, 0), (3, 0, 0), (1, 3, 0)])
    };
    let mut icmp = vec![ty, code, 0, 0];
    icmp.extend(word.to_be_bytes());
    icmp.extend(quote);
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x03];
    match (from, quoted_ip.src) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend(ETH_P_IP.to_be_bytes());
            frame.extend([0x45, 0xc0]);
            frame.extend(u16::try_from(20 + icmp.len()).unwrap().to_be_bytes());
            frame.extend([0, 0, 0, 0, 64, ICMP, 0, 0]);
            frame.extend(s.octets());
            frame.extend(d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend(ETH_P_IPV6.to_be_bytes());
            frame.extend([0x60, 0, 0, 0]);
            frame.extend(u16::try_from(icmp.len()).unwrap().to_be_bytes());
            frame.extend([ICMPV6, 64]);
            frame.extend(s.octets());
            frame.extend(d.octets());
        }
        _ => return None,
    }
    frame.extend(icmp);
    fix_checksums(&mut frame);
    Some(frame)
}

/// Bytes of no particular shape: random, or random behind an IPv4/IPv6
/// `EtherType` and version, now and then with service addresses in place.
pub(crate) fn random_frame(rng: &mut Rng, services: &Services) -> Vec<u8> {
    let len = rng.range(14, 160);
    let mut frame = rng.bytes(len);
    match rng.below(4) {
        0 => {}
        1 => {
            frame[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
            if let Some(b) = frame.get_mut(14) {
                *b = 0x40 | (*b & 0x0f);
            }
        }
        2 => {
            frame[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
            if let Some(b) = frame.get_mut(14) {
                *b = 0x60 | (*b & 0x0f);
            }
        }
        _ => {
            let v4 = rng.chance(50);
            frame[12..14].copy_from_slice(&if v4 { ETH_P_IP } else { ETH_P_IPV6 }.to_be_bytes());
            let wanted: Vec<&IpAddr> = services
                .relevant
                .iter()
                .filter(|a| a.is_ipv4() == v4)
                .collect();
            let (dst_off, addr) = match rng.pick(&wanted) {
                IpAddr::V4(a) => (30, a.octets().to_vec()),
                IpAddr::V6(a) => (38, a.octets().to_vec()),
            };
            if frame.len() >= dst_off + addr.len() {
                frame[14] = if v4 { 0x45 } else { 0x60 };
                frame[dst_off..dst_off + addr.len()].copy_from_slice(&addr);
                if rng.chance(50) {
                    let proto_off = if v4 { 23 } else { 20 };
                    frame[proto_off] = *rng.pick(&[TCP, UDP, ICMP, ICMPV6]);
                }
                if rng.chance(50) {
                    fix_checksums(&mut frame);
                }
            }
        }
    }
    frame
}

/// Addresses the fuzzer writes into address fields: relevant ones mostly.
pub(crate) fn some_address(rng: &mut Rng, services: &Services, v4: bool) -> Vec<u8> {
    if rng.chance(70) {
        let wanted: Vec<&IpAddr> = services
            .relevant
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .collect();
        if let Some(addr) = wanted.get(rng.below(wanted.len().max(1))) {
            return match addr {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
        }
    }
    let special: Vec<Vec<u8>> = if v4 {
        [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::LOCALHOST,
        ]
        .iter()
        .map(|a| a.octets().to_vec())
        .collect()
    } else {
        [Ipv6Addr::UNSPECIFIED, Ipv6Addr::LOCALHOST]
            .iter()
            .map(|a| a.octets().to_vec())
            .collect()
    };
    if rng.chance(30) {
        return rng.pick(&special).clone();
    }
    rng.bytes(if v4 { 4 } else { 16 })
}
