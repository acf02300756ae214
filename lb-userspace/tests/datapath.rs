//! Datapath tests (root): the real TC program run with `BPF_PROG_TEST_RUN` on
//! crafted IPv4/IPv6 TCP/UDP frames. Each test asserts the verdict, the
//! exact output bytes (built independently with checksums computed from
//! scratch), the checksums themselves, and the conntrack/counter maps.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use lb_common::LbConfig;
use lb_common::prog_names;
use lb_userspace::{
    loader,
    maps::{CtRecord, Maps},
    model::{Backend, Frontend, FrontendKind, FrontendSpec, Protocol, ServiceRef},
    plan,
};

/// A frontend spec of `kind` with remote (not node-local) `backends`.
fn spec(kind: FrontendKind, backends: &[SocketAddr]) -> FrontendSpec {
    let mut backends: Vec<Backend> = backends
        .iter()
        .map(|b| Backend {
            addr: b.ip(),
            port: b.port(),
            node_local: false,
        })
        .collect();
    backends.sort();
    FrontendSpec {
        service: ServiceRef {
            namespace: "default".into(),
            name: "web".into(),
            port_name: String::new(),
        },
        kind,
        backends,
        terminating: Vec::new(),
        external_local: false,
        internal_local: false,
        affinity_timeout_s: 0,
        source_ranges: Vec::new(),
    }
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

// ---------------------------------------------------------------- fixture

/// A private copy of the object with its own pinned maps.
struct Fixture {
    ebpf: Ebpf,
    maps: Maps,
    pin_path: PathBuf,
}

impl Fixture {
    fn new(what: &str) -> Option<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        if !support::pins::require_privileged(what) {
            return None;
        }
        // BPF_PROG_TEST_RUN runs in the caller's network namespace, and the
        // program's forwarding step asks that namespace's FIB. A fresh one
        // (this test thread only) has no routes and forwarding off, so the
        // translated packet is handed back, whatever the host's settings.
        // SAFETY: unshare affects only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let pin_path = PathBuf::from(format!(
            "/sys/fs/bpf/lb-dp-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut ebpf = match loader::load(&pin_path) {
            Ok(ebpf) => ebpf,
            Err(error) => {
                let _ = loader::cleanup(&pin_path, &[]);
                panic!("loading the eBPF object failed: {error:?}");
            }
        };
        let maps = Maps::from_ebpf(&mut ebpf).expect("maps");
        Some(Self {
            ebpf,
            maps,
            pin_path,
        })
    }

    fn program(&mut self) -> &mut SchedClassifier {
        loader::program(&mut self.ebpf).expect("program")
    }

    /// Writes `ClusterIP` `services` through the real diff/apply path.
    fn set_services(&mut self, services: &[(Frontend, &[SocketAddr])]) {
        let specs: Vec<(Frontend, FrontendSpec)> = services
            .iter()
            .map(|(frontend, backends)| (*frontend, spec(FrontendKind::ClusterIp, backends)))
            .collect();
        self.set_specs(&specs);
    }

    /// Writes `specs` through the real diff/apply path.
    fn set_specs(&mut self, specs: &[(Frontend, FrontendSpec)]) {
        let desired: BTreeMap<Frontend, FrontendSpec> = specs.iter().cloned().collect();
        let state = self.maps.read_state().expect("read state");
        let plan = plan::diff(&state, &desired);
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        for op in &plan.ops {
            self.maps.apply_op(op).expect("apply");
        }
    }

    /// Runs the TC program once on `frame`; returns the verdict and the
    /// frame as the program left it.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = self.program().test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn reason(&self, name: &str) -> u64 {
        self.maps
            .reason_counts()
            .expect("reasons")
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, count)| count)
            .expect("known reason")
    }

    fn conntrack(&self) -> Vec<CtRecord> {
        self.maps.conntrack().expect("conntrack")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.pin_path, &[]);
    }
}

// ---------------------------------------------------------------- packets

/// One frame's worth of headers, built with correct checksums.
#[derive(Clone, Debug)]
struct Frame {
    src: SocketAddr,
    dst: SocketAddr,
    proto: Protocol,
    tcp_flags: u8,
    /// UDP over IPv4 only: send a zero ("no") checksum.
    udp_zero_csum: bool,
    payload: Vec<u8>,
}

impl Frame {
    fn tcp(src: &str, dst: &str, flags: u8) -> Self {
        Self {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: Protocol::Tcp,
            tcp_flags: flags,
            udp_zero_csum: false,
            payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        }
    }

    fn udp(src: &str, dst: &str) -> Self {
        Self {
            proto: Protocol::Udp,
            tcp_flags: 0,
            payload: b"ping".to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    fn with_dst(&self, dst: SocketAddr) -> Self {
        Self {
            dst,
            ..self.clone()
        }
    }

    fn with_src(&self, src: SocketAddr) -> Self {
        Self {
            src,
            ..self.clone()
        }
    }

    /// The reply a backend at `self.dst` sends to `self.src`.
    fn reply(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            tcp_flags: if self.proto == Protocol::Tcp {
                TCP_SYN | TCP_ACK
            } else {
                0
            },
            ..self.clone()
        }
    }

    fn l4(&self) -> Vec<u8> {
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

    fn bytes(&self) -> Vec<u8> {
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

fn eth_header(v4: bool) -> Vec<u8> {
    let mut eth = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    eth.extend(if v4 { 0x0800_u16 } else { 0x86dd_u16 }.to_be_bytes());
    eth
}

fn ipv6_header(src: [u8; 16], dst: [u8; 16], next: u8, payload_len: usize) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend(u16::try_from(payload_len).unwrap().to_be_bytes());
    ip.push(next);
    ip.push(64);
    ip.extend(src);
    ip.extend(dst);
    ip
}

/// RFC 1071 Internet checksum over `data`, starting from `initial`.
fn checksum(data: &[u8], initial: u32) -> u16 {
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

fn pseudo_header(src: IpAddr, dst: IpAddr, proto: Protocol, len: usize) -> Vec<u8> {
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

fn l4_checksum(src: IpAddr, dst: IpAddr, proto: Protocol, l4: &[u8]) -> u16 {
    let mut data = pseudo_header(src, dst, proto, l4.len());
    data.extend(l4);
    checksum(&data, 0)
}

/// Parses an Ethernet + IPv4/IPv6 (no options/extensions) + TCP/UDP frame
/// and checks every checksum from scratch. Returns (src, dst).
fn verify_checksums(frame: &[u8]) -> (SocketAddr, SocketAddr) {
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
        other => panic!("unexpected protocol {other}"),
    };
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

fn frontend(addr: &str, port: u16, proto: Protocol) -> Frontend {
    Frontend {
        addr: addr.parse().unwrap(),
        port,
        proto,
    }
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

// ------------------------------------------------------------- scenarios

const VIP4: &str = "198.19.0.10";
const VIP6: &str = "fd00:96::10";
const BACKENDS4: [&str; 3] = ["198.18.2.2:8080", "198.18.3.2:8080", "198.18.4.2:8080"];
const BACKENDS6: [&str; 3] = ["[fd00:2::2]:8080", "[fd00:3::2]:8080", "[fd00:4::2]:8080"];

/// First packet, follow-up and reply of one flow; returns the backend used.
fn first_follow_reply(fx: &mut Fixture, first: &Frame, backends: &[SocketAddr]) -> SocketAddr {
    let input = first.bytes();
    let (verdict, out) = fx.run(&input);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, backend) = verify_checksums(&out);
    assert_eq!(src, first.src, "source must not change towards the backend");
    assert!(backends.contains(&backend), "{backend} is not a backend");
    assert_eq!(out, first.with_dst(backend).bytes(), "DNAT output bytes");
    assert_eq!(fx.reason("nat_new"), 1);

    // Conntrack: one entry per direction.
    let ct = fx.conntrack();
    let service = ct
        .iter()
        .find(|r| r.direction == "service")
        .expect("service entry");
    assert_eq!(
        (service.source, service.destination),
        (first.src, first.dst)
    );
    let reply = ct
        .iter()
        .find(|r| r.direction == "reply")
        .expect("reply entry");
    assert_eq!((reply.source, reply.destination), (backend, first.src));
    assert_eq!(service.backend_id, reply.backend_id);

    // Follow-up packet of the same flow: same backend, from conntrack.
    let mut follow = first.clone();
    follow.tcp_flags = if first.proto == Protocol::Tcp {
        TCP_ACK | TCP_PSH
    } else {
        0
    };
    let (verdict, out) = fx.run(&follow.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, follow.with_dst(backend).bytes());
    assert_eq!(fx.reason("nat_established"), 1);

    // Reply from the backend: source back to the VIP.
    let from_backend = first.with_dst(backend).reply();
    let (verdict, out) = fx.run(&from_backend.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst) = verify_checksums(&out);
    assert_eq!((src, dst), (first.dst, first.src));
    assert_eq!(
        out,
        from_backend.with_src(first.dst).bytes(),
        "reverse NAT bytes"
    );
    assert_eq!(fx.reason("nat_reply"), 1);
    backend
}

#[test]
fn ipv4_tcp_first_follow_up_and_reply() {
    let Some(mut fx) = Fixture::new("ipv4_tcp_first_follow_up_and_reply") else {
        return;
    };
    let backends = addrs(&BACKENDS4);
    fx.set_services(&[(frontend(VIP4, 80, Protocol::Tcp), &backends)]);
    let first = Frame::tcp("198.18.1.2:40000", "198.19.0.10:80", TCP_SYN);
    first_follow_reply(&mut fx, &first, &backends);
    let view = fx.maps.service_stats(1).unwrap();
    assert_eq!(view.packets, 2, "two packets went to the service");
}

#[test]
fn ipv6_tcp_first_follow_up_and_reply() {
    let Some(mut fx) = Fixture::new("ipv6_tcp_first_follow_up_and_reply") else {
        return;
    };
    let backends = addrs(&BACKENDS6);
    fx.set_services(&[(frontend(VIP6, 80, Protocol::Tcp), &backends)]);
    let first = Frame::tcp("[fd00:1::2]:40000", "[fd00:96::10]:80", TCP_SYN);
    first_follow_reply(&mut fx, &first, &backends);
}

#[test]
fn ipv4_udp_first_follow_up_and_reply() {
    let Some(mut fx) = Fixture::new("ipv4_udp_first_follow_up_and_reply") else {
        return;
    };
    let backends = addrs(&BACKENDS4);
    fx.set_services(&[(frontend(VIP4, 53, Protocol::Udp), &backends)]);
    let first = Frame::udp("198.18.1.2:40000", "198.19.0.10:53");
    first_follow_reply(&mut fx, &first, &backends);
}

#[test]
fn ipv4_udp_zero_checksum_stays_zero() {
    let Some(mut fx) = Fixture::new("ipv4_udp_zero_checksum_stays_zero") else {
        return;
    };
    let backends = addrs(&BACKENDS4[..1]);
    fx.set_services(&[(frontend(VIP4, 53, Protocol::Udp), &backends)]);
    let mut first = Frame::udp("198.18.1.2:40000", "198.19.0.10:53");
    first.udp_zero_csum = true;
    let (verdict, out) = fx.run(&first.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[40..42], &[0, 0], "a zero UDP checksum must stay zero");
    verify_checksums(&out);
    assert_eq!(out, first.with_dst(backends[0]).bytes());
}

#[test]
fn ipv6_udp_first_follow_up_and_reply() {
    let Some(mut fx) = Fixture::new("ipv6_udp_first_follow_up_and_reply") else {
        return;
    };
    let backends = addrs(&BACKENDS6);
    fx.set_services(&[(frontend(VIP6, 53, Protocol::Udp), &backends)]);
    let first = Frame::udp("[fd00:1::2]:40000", "[fd00:96::10]:53");
    first_follow_reply(&mut fx, &first, &backends);
}

#[test]
fn ipv6_udp_zero_checksum_is_passed_untouched() {
    let Some(mut fx) = Fixture::new("ipv6_udp_zero_checksum_is_passed_untouched") else {
        return;
    };
    fx.set_services(&[(frontend(VIP6, 53, Protocol::Udp), &addrs(&BACKENDS6))]);
    let mut frame = Frame::udp("[fd00:1::2]:40000", "[fd00:96::10]:53").bytes();
    frame[60] = 0;
    frame[61] = 0;
    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame);
    assert_eq!(fx.reason("pass_udp6_zero_csum"), 1);
}

#[test]
fn flows_spread_over_every_backend_and_stick() {
    let Some(mut fx) = Fixture::new("flows_spread_over_every_backend_and_stick") else {
        return;
    };
    for (vip, client, list) in [
        (VIP4, "198.18.1.2", &BACKENDS4),
        (VIP6, "fd00:1::2", &BACKENDS6),
    ] {
        let backends = addrs(list);
        fx.set_services(&[(frontend(vip, 80, Protocol::Tcp), &backends)]);
        let mut chosen = BTreeMap::new();
        for sport in 40000..40060_u16 {
            let src = SocketAddr::new(client.parse().unwrap(), sport);
            let dst = SocketAddr::new(vip.parse().unwrap(), 80);
            let frame = Frame::tcp(&src.to_string(), &dst.to_string(), TCP_SYN);
            let (_, out) = fx.run(&frame.bytes());
            let (_, backend) = verify_checksums(&out);
            // The same flow again lands on the same backend.
            let (_, again) = fx.run(&frame.bytes());
            assert_eq!(verify_checksums(&again).1, backend);
            *chosen.entry(backend).or_insert(0) += 1;
        }
        assert_eq!(
            chosen.len(),
            3,
            "60 flows must use all backends: {chosen:?}"
        );
    }
}

#[test]
fn established_flow_keeps_backend_until_it_is_removed() {
    let Some(mut fx) = Fixture::new("established_flow_keeps_backend_until_it_is_removed") else {
        return;
    };
    for (vip, client, list) in [
        (VIP4, "198.18.1.2:40000", &BACKENDS4),
        (VIP6, "[fd00:1::2]:40000", &BACKENDS6),
    ] {
        let backends = addrs(list);
        let fe = frontend(vip, 80, Protocol::Tcp);
        fx.set_services(&[(fe, &backends)]);
        let dst = SocketAddr::new(vip.parse().unwrap(), 80).to_string();
        let syn = Frame::tcp(client, &dst, TCP_SYN);
        let (_, out) = fx.run(&syn.bytes());
        let (_, backend) = verify_checksums(&out);
        let data = Frame::tcp(client, &dst, TCP_ACK | TCP_PSH);

        // Another backend goes away: the flow stays where it is.
        let others: Vec<SocketAddr> = backends.iter().copied().filter(|b| *b != backend).collect();
        let kept = [backend, others[0]];
        fx.set_services(&[(fe, &kept)]);
        let (_, out) = fx.run(&data.bytes());
        assert_eq!(verify_checksums(&out).1, backend, "flow moved");

        // Its own backend goes away: re-selected onto the one left.
        fx.set_services(&[(fe, &others[..1])]);
        let (verdict, out) = fx.run(&data.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(verify_checksums(&out).1, others[0], "flow not re-selected");
        assert_eq!(out, data.with_dst(others[0]).bytes());
    }
}

#[test]
fn non_ip_frames_are_passed_untouched() {
    let Some(mut fx) = Fixture::new("non_ip_frames_are_passed_untouched") else {
        return;
    };
    // ARP request who-has 198.19.0.10.
    let mut arp = vec![0xff; 6];
    arp.extend([0x02, 0, 0, 0, 0, 0x02, 0x08, 0x06]);
    arp.extend([0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend([0x02, 0, 0, 0, 0, 0x02, 198, 18, 1, 2]);
    arp.extend([0, 0, 0, 0, 0, 0, 198, 19, 0, 10]);
    // LLDP-like frame with an unknown EtherType.
    let mut other = vec![
        0x01, 0x80, 0xc2, 0, 0, 0x0e, 0x02, 0, 0, 0, 0, 0x02, 0x88, 0xcc,
    ];
    other.extend([0u8; 46]);
    for frame in [arp, other] {
        let (verdict, out) = fx.run(&frame);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, frame);
    }
    assert_eq!(fx.reason("pass_not_ip"), 2);
}

#[test]
fn truncated_headers_are_passed_untouched_at_every_boundary() {
    let Some(mut fx) = Fixture::new("truncated_headers_are_passed_untouched_at_every_boundary")
    else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 80, Protocol::Tcp), &addrs(&BACKENDS4)),
        (frontend(VIP4, 53, Protocol::Udp), &addrs(&BACKENDS4)),
        (frontend(VIP6, 80, Protocol::Tcp), &addrs(&BACKENDS6)),
        (frontend(VIP6, 53, Protocol::Udp), &addrs(&BACKENDS6)),
    ]);
    let frames = [
        (
            Frame::tcp("198.18.1.2:40000", "198.19.0.10:80", TCP_SYN),
            34,
            20,
        ),
        (Frame::udp("198.18.1.2:40000", "198.19.0.10:53"), 34, 8),
        (
            Frame::tcp("[fd00:1::2]:40000", "[fd00:96::10]:80", TCP_SYN),
            54,
            20,
        ),
        (Frame::udp("[fd00:1::2]:40000", "[fd00:96::10]:53"), 54, 8),
    ];
    let mut runs = 0;
    for (frame, l4_off, l4_len) in frames {
        let full = frame.bytes();
        // Cut at the end of the IP header, after the ports, one byte short of
        // the L4 header. (BPF_PROG_TEST_RUN itself refuses frames whose IP
        // header is incomplete, so shorter cuts cannot reach the program.)
        for cut in [l4_off, l4_off + 2, l4_off + l4_len - 1] {
            let input = &full[..cut];
            let (verdict, out) = fx.run(input);
            assert_eq!(verdict, TC_ACT_OK, "cut at {cut}");
            assert_eq!(out, input, "cut at {cut} changed the frame");
            runs += 1;
        }
    }
    assert_eq!(fx.reason("pass_truncated"), runs);
    assert!(fx.conntrack().is_empty());
}

#[test]
fn ipv6_extension_header_is_passed_untouched() {
    let Some(mut fx) = Fixture::new("ipv6_extension_header_is_passed_untouched") else {
        return;
    };
    fx.set_services(&[(frontend(VIP6, 80, Protocol::Tcp), &addrs(&BACKENDS6))]);
    let frame = Frame::tcp("[fd00:1::2]:40000", "[fd00:96::10]:80", TCP_SYN);
    let l4 = frame.l4();
    // Hop-by-hop options header (8 bytes: next=TCP, len=0, PadN) before TCP.
    let mut ext = vec![6, 0, 1, 4, 0, 0, 0, 0];
    ext.extend(&l4);
    let src: std::net::Ipv6Addr = "fd00:1::2".parse().unwrap();
    let dst: std::net::Ipv6Addr = "fd00:96::10".parse().unwrap();
    let mut input = eth_header(false);
    input.extend(ipv6_header(src.octets(), dst.octets(), 0, ext.len()));
    input.extend(ext);
    let (verdict, out) = fx.run(&input);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, input);
    assert_eq!(fx.reason("pass_ext_hdr"), 1);

    // A fragment header is counted as a fragment.
    input[20] = 44;
    let (verdict, out) = fx.run(&input);
    assert_eq!((verdict, out), (TC_ACT_OK, input));
    assert_eq!(fx.reason("pass_fragment"), 1);
}

#[test]
fn ipv4_fragments_and_options_are_passed_untouched() {
    let Some(mut fx) = Fixture::new("ipv4_fragments_and_options_are_passed_untouched") else {
        return;
    };
    fx.set_services(&[(frontend(VIP4, 53, Protocol::Udp), &addrs(&BACKENDS4))]);
    let frame = Frame::udp("198.18.1.2:40000", "198.19.0.10:53").bytes();
    // First fragment (MF set) and a later fragment (offset 185*8).
    for frag in [0x2000_u16, 185] {
        let mut input = frame.clone();
        input[20..22].copy_from_slice(&frag.to_be_bytes());
        let (verdict, out) = fx.run(&input);
        assert_eq!((verdict, &out), (TC_ACT_OK, &input));
    }
    assert_eq!(fx.reason("pass_fragment"), 2);
    // IHL 6 (an options word).
    let mut input = frame.clone();
    input[14] = 0x46;
    input.splice(34..34, [1, 1, 1, 1]);
    let (verdict, out) = fx.run(&input);
    assert_eq!((verdict, out), (TC_ACT_OK, input));
    assert_eq!(fx.reason("pass_ip_options"), 1);
}

#[test]
fn icmp_and_other_protocols_are_passed_untouched() {
    let Some(mut fx) = Fixture::new("icmp_and_other_protocols_are_passed_untouched") else {
        return;
    };
    fx.set_services(&[(frontend(VIP4, 80, Protocol::Tcp), &addrs(&BACKENDS4))]);
    let mut input = Frame::tcp("198.18.1.2:40000", "198.19.0.10:80", TCP_SYN).bytes();
    input[23] = 1; // ICMP
    let (verdict, out) = fx.run(&input);
    assert_eq!((verdict, out), (TC_ACT_OK, input));
    assert_eq!(fx.reason("pass_other_proto"), 1);
}

/// Checks an ICMP/ICMPv6 port-unreachable reply to `offending`: swapped
/// MACs, service address -> client, the offending IP header + 8 bytes
/// quoted, every checksum right.
fn assert_port_unreachable(reply: &[u8], offending: &[u8]) {
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

#[test]
fn service_without_backends_rejects_with_port_unreachable() {
    let Some(mut fx) = Fixture::new("service_without_backends_rejects_with_port_unreachable")
    else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 80, Protocol::Tcp), &[]),
        (frontend(VIP6, 53, Protocol::Udp), &[]),
    ]);
    for frame in [
        Frame::tcp("198.18.1.2:40000", "198.19.0.10:80", TCP_SYN),
        Frame::udp("[fd00:1::2]:40000", "[fd00:96::10]:53"),
    ] {
        let input = frame.bytes();
        let (verdict, out) = fx.run(&input);
        assert_eq!(verdict, TC_ACT_REDIRECT, "sent back to the client");
        assert_port_unreachable(&out, &input);
    }
    assert_eq!(fx.reason("reject"), 2);
    assert!(fx.conntrack().is_empty());
}

#[test]
fn unserved_port_of_a_service_address_is_rejected() {
    let Some(mut fx) = Fixture::new("unserved_port_of_a_service_address_is_rejected") else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 80, Protocol::Tcp), &addrs(&BACKENDS4)),
        (frontend(VIP6, 80, Protocol::Tcp), &addrs(&BACKENDS6)),
    ]);
    for frame in [
        Frame::tcp("198.18.1.2:40000", "198.19.0.10:81", TCP_SYN),
        Frame::udp("198.18.1.2:40000", "198.19.0.10:80"),
        Frame::tcp("[fd00:1::2]:40000", "[fd00:96::10]:8080", TCP_SYN),
    ] {
        let input = frame.bytes();
        let (verdict, out) = fx.run(&input);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_port_unreachable(&out, &input);
    }
    // Another address is not a service address: passed.
    let other = Frame::tcp("198.18.1.2:40000", "198.18.2.2:81", TCP_SYN).bytes();
    assert_eq!(fx.run(&other), (TC_ACT_OK, other));
}

const NODE4: &str = "198.18.0.1";
const NODE6: &str = "fd00::1";

fn node_config() -> LbConfig {
    LbConfig {
        node_addr4: NODE4.parse::<std::net::Ipv4Addr>().unwrap().octets(),
        loopback4: [169, 254, 42, 1],
        node_addr6: NODE6.parse::<std::net::Ipv6Addr>().unwrap().octets(),
        loopback6: "100::6c62:1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    }
}

#[test]
fn node_port_to_a_remote_backend_is_source_nated_and_reversed() {
    let Some(mut fx) = Fixture::new("node_port_to_a_remote_backend_is_source_nated_and_reversed")
    else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    for (node, client, backend) in [
        (NODE4, "198.18.9.2", "198.18.12.2:8080"),
        (NODE6, "fd00:9::2", "[fd00:12::2]:8080"),
    ] {
        let node_port = SocketAddr::new(node.parse().unwrap(), 30080);
        let fe = frontend(node, 30080, Protocol::Tcp);
        let backends = addrs(&[backend]);
        fx.set_specs(&[(fe, spec(FrontendKind::NodePort, &backends))]);
        let client = SocketAddr::new(client.parse().unwrap(), 45000);
        let syn = Frame::tcp(&client.to_string(), &node_port.to_string(), TCP_SYN);
        let (verdict, out) = fx.run(&syn.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        let (src, dst) = verify_checksums(&out);
        assert_eq!(dst, backends[0]);
        assert_eq!(src.ip(), node_port.ip(), "source NAT to the node address");
        assert!(
            (61_000..=65_535).contains(&src.port()),
            "port {}",
            src.port()
        );
        let mut expected = syn.with_dst(backends[0]).with_src(src);
        expected.tcp_flags = TCP_SYN;
        assert_eq!(out, expected.bytes());

        // The backend answers the node; the client gets the NodePort back.
        let reply = Frame::tcp(
            &backends[0].to_string(),
            &src.to_string(),
            TCP_SYN | TCP_ACK,
        );
        let (verdict, out) = fx.run(&reply.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(verify_checksums(&out), (node_port, client));
        assert_eq!(out, reply.with_src(node_port).with_dst(client).bytes());
    }
}

#[test]
fn external_traffic_to_a_local_backend_keeps_its_source() {
    let Some(mut fx) = Fixture::new("external_traffic_to_a_local_backend_keeps_its_source") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    let backends = addrs(&["198.18.2.2:8080"]);
    let mut local = spec(FrontendKind::NodePort, &backends);
    local.backends[0].node_local = true;
    let mut etp_local = spec(FrontendKind::LoadBalancer, &addrs(&["198.18.3.2:8080"]));
    etp_local.external_local = true;
    fx.set_specs(&[
        (frontend(NODE4, 30080, Protocol::Tcp), local),
        (frontend("198.19.1.1", 80, Protocol::Tcp), etp_local),
    ]);
    for (dst, backend) in [
        ("198.18.0.1:30080", "198.18.2.2:8080"),
        ("198.19.1.1:80", "198.18.3.2:8080"),
    ] {
        let syn = Frame::tcp("198.18.9.2:45000", dst, TCP_SYN);
        let (_, out) = fx.run(&syn.bytes());
        assert_eq!(out, syn.with_dst(backend.parse().unwrap()).bytes());
    }
}

#[test]
fn hairpin_flow_is_source_nated_to_the_loopback_address() {
    let Some(mut fx) = Fixture::new("hairpin_flow_is_source_nated_to_the_loopback_address") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    for (vip, pod, loopback) in [
        (VIP4, "198.18.2.2", "169.254.42.1"),
        (VIP6, "fd00:2::2", "100::6c62:1"),
    ] {
        let backend = SocketAddr::new(pod.parse().unwrap(), 8080);
        fx.set_services(&[(frontend(vip, 80, Protocol::Tcp), &[backend])]);
        let client = SocketAddr::new(pod.parse().unwrap(), 41000);
        let service = SocketAddr::new(vip.parse().unwrap(), 80);
        let syn = Frame::tcp(&client.to_string(), &service.to_string(), TCP_SYN);
        let (_, out) = fx.run(&syn.bytes());
        let (src, dst) = verify_checksums(&out);
        assert_eq!(dst, backend);
        assert_eq!(src.ip(), loopback.parse::<IpAddr>().unwrap());
        // The pod answers the loopback address; it gets the service back.
        let reply = Frame::tcp(&backend.to_string(), &src.to_string(), TCP_SYN | TCP_ACK);
        let (_, out) = fx.run(&reply.bytes());
        assert_eq!(verify_checksums(&out), (service, client));
        assert_eq!(out, reply.with_src(service).with_dst(client).bytes());
    }
}

#[test]
fn session_affinity_sticks_then_expires() {
    let Some(mut fx) = Fixture::new("session_affinity_sticks_then_expires") else {
        return;
    };
    for (vip, client, list) in [
        (VIP4, "198.18.1.2", &BACKENDS4),
        (VIP6, "fd00:1::2", &BACKENDS6),
    ] {
        let mut web = spec(FrontendKind::ClusterIp, &addrs(list));
        web.affinity_timeout_s = 1;
        let fe = frontend(vip, 80, Protocol::Tcp);
        fx.set_specs(&[(fe, web)]);
        let service = SocketAddr::new(vip.parse().unwrap(), 80).to_string();
        let backend_of = |fx: &mut Fixture, sport: u16| {
            let src = SocketAddr::new(client.parse().unwrap(), sport).to_string();
            let (_, out) = fx.run(&Frame::tcp(&src, &service, TCP_SYN).bytes());
            verify_checksums(&out).1
        };
        let first = backend_of(&mut fx, 42000);
        for sport in 42001..42015 {
            assert_eq!(backend_of(&mut fx, sport), first, "affinity hit");
        }
        // After the timeout the choice is made anew (by the flow hash):
        // idle past the timeout before each new flow until another backend
        // comes up. The hash is deterministic, so the outcome is too.
        let mut chosen = Vec::new();
        for round in 0..6u16 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
            chosen.push(backend_of(&mut fx, 43000 + round * 7));
            if chosen.iter().any(|b| *b != first) {
                break;
            }
        }
        assert!(
            chosen.iter().any(|b| *b != first),
            "affinity never expired: {chosen:?}"
        );
    }
}

#[test]
fn source_ranges_admit_listed_clients_only() {
    let Some(mut fx) = Fixture::new("source_ranges_admit_listed_clients_only") else {
        return;
    };
    let mut lb4 = spec(FrontendKind::LoadBalancer, &addrs(&BACKENDS4));
    lb4.source_ranges = vec![("198.18.1.0".parse().unwrap(), 24)];
    let mut lb6 = spec(FrontendKind::LoadBalancer, &addrs(&BACKENDS6));
    lb6.source_ranges = vec![("fd00:1::".parse().unwrap(), 64)];
    fx.set_specs(&[
        (frontend("198.19.1.1", 80, Protocol::Tcp), lb4),
        (frontend("fd00:97::1", 80, Protocol::Tcp), lb6),
    ]);
    fx.maps.write_config(&node_config()).unwrap();
    for (allowed, denied, lb) in [
        ("198.18.1.7:40000", "198.18.9.7:40000", "198.19.1.1:80"),
        ("[fd00:1::7]:40000", "[fd00:9::7]:40000", "[fd00:97::1]:80"),
    ] {
        let (verdict, out) = fx.run(&Frame::tcp(allowed, lb, TCP_SYN).bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_ne!(verify_checksums(&out).1, lb.parse().unwrap(), "translated");
        let (verdict, _) = fx.run(&Frame::tcp(denied, lb, TCP_SYN).bytes());
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    assert_eq!(fx.reason("drop_source_range"), 2);
}

#[test]
fn floor_program_loads_and_passes() {
    let Some(mut fx) = Fixture::new("floor_program_loads_and_passes") else {
        return;
    };
    let floor: &mut SchedClassifier = fx
        .ebpf
        .program_mut(prog_names::TC_FLOOR)
        .expect("floor program")
        .try_into()
        .unwrap();
    floor.load().unwrap();
    let input = Frame::tcp("198.18.1.2:40000", "198.19.0.10:80", TCP_SYN).bytes();
    let mut out = vec![0u8; input.len()];
    let opts = TestRunOptions {
        data_in: Some(&input),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    };
    let result = floor.test_run(opts).unwrap();
    assert_eq!(result.return_value, TC_ACT_OK);
    assert_eq!(out, input);
}
