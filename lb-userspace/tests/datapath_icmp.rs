//! Datapath tests (root): the real TC program run with `BPF_PROG_TEST_RUN` on
//! crafted frames (see `support::prog_test` and `support::frames`).
//!
//! This file: ICMP / `ICMPv6` errors about translated flows (issue 12).
//! Each flow is set up by real packets through the program first; the
//! error quotes the packet exactly as the program translated it, and what
//! comes out must be the error the other side would have got without
//! translation: byte for byte the frame built independently (checksums
//! from scratch), the quote equal to the packet as that side sent it. Errors
//! about nothing of ours, and quotes that are cut or odd, pass unchanged.

mod support;

use std::net::{IpAddr, SocketAddr};

use lb_common::prog_names;
use lb_userspace::datapath::maps::CtRecord;
use lb_userspace::model::{FrontendKind, Protocol};

use support::frames::{
    Frame, SCTP_INIT, TCP_ACK, TCP_SYN, checksum, icmp_error, verify_checksums, verify_icmp_error,
};
use support::prog_test::{
    BACKENDS4, BACKENDS6, Fixture, NODE4, NODE6, TC_ACT_OK, VIP4, VIP6, addrs, frontend,
    node_config, spec,
};

/// One family: service address, client, the backend, a router between the
/// node and the backend, a router between the node and the client.
struct Family {
    vip: &'static str,
    client: &'static str,
    backend: &'static str,
    router: &'static str,
    client_router: &'static str,
    node: &'static str,
}

const FAMILIES: [Family; 2] = [
    Family {
        vip: VIP4,
        client: "198.18.1.2",
        backend: BACKENDS4[0],
        router: "198.18.50.1",
        client_router: "198.18.60.1",
        node: NODE4,
    },
    Family {
        vip: VIP6,
        client: "fd00:1::2",
        backend: BACKENDS6[0],
        router: "fd00:50::1",
        client_router: "fd00:60::1",
        node: NODE6,
    },
];

impl Family {
    fn v4(&self) -> bool {
        self.vip.contains('.')
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn sock(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

/// The errors under test: (name, (type, code), the 4 bytes after the
/// checksum), per family.
fn errors(v4: bool) -> [(&'static str, (u8, u8), [u8; 4]); 4] {
    // "Fragmentation needed" carries the next hop's MTU in its last two
    // bytes, "packet too big" in all four.
    let mtu = if v4 {
        [0, 0, 0x04, 0xd8]
    } else {
        [0, 0, 0x05, 0x00]
    };
    if v4 {
        [
            ("fragmentation needed", (3, 4), mtu),
            ("port unreachable", (3, 3), [0; 4]),
            ("time exceeded", (11, 0), [0; 4]),
            ("parameter problem", (12, 0), [20, 0, 0, 0]),
        ]
    } else {
        [
            ("packet too big", (2, 0), mtu),
            ("port unreachable", (1, 4), [0; 4]),
            ("time exceeded", (3, 0), [0; 4]),
            ("parameter problem", (4, 0), [0, 0, 0, 40]),
        ]
    }
}

/// How much of the offending packet an error quotes: all of it (Linux
/// quotes up to 576 / 1280 bytes), or the IP header and the 8 bytes
/// RFC 792 asks for (no TCP checksum in it).
fn quote_lengths(v4: bool, packet_len: usize) -> [usize; 2] {
    [packet_len, if v4 { 20 } else { 40 } + 8]
}

/// The IP packet of an Ethernet frame.
fn ip_packet(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

/// Conntrack as the program left it, without the idle clock (which ticks).
fn conntrack(fx: &Fixture) -> Vec<CtRecord> {
    let mut records: Vec<CtRecord> = fx
        .conntrack()
        .into_iter()
        .map(|r| CtRecord {
            idle_seconds: 0,
            ..r
        })
        .collect();
    records.sort_by_key(|r| format!("{r:?}"));
    records
}

/// Runs `error` through `lb_tc` (or the program NAME) and asserts it comes
/// out as `expected`, counted as translated, with conntrack unchanged.
fn assert_translated(fx: &mut Fixture, name: &str, error: &[u8], expected: &[u8], what: &str) {
    let before = conntrack(fx);
    let count = fx.reason("nat_icmp_error");
    let (verdict, out) = fx.run_named(name, error);
    assert_eq!(verdict, TC_ACT_OK, "{what}: verdict");
    // Every checksum of the output, from scratch, before the exact bytes.
    verify_icmp_error(&out);
    assert_eq!(out, expected, "{what}: bytes");
    assert_eq!(fx.reason("nat_icmp_error"), count + 1, "{what}: counted");
    assert_eq!(conntrack(fx), before, "{what}: conntrack changed");
}

/// Runs `error` and asserts it passes byte for byte, under `reason`.
fn assert_untouched(fx: &mut Fixture, error: &[u8], reason: &str, what: &str) {
    let count = fx.reason(reason);
    let translated = fx.reason("nat_icmp_error");
    let (verdict, out) = fx.run(error);
    assert_eq!(verdict, TC_ACT_OK, "{what}: verdict");
    assert_eq!(out, error, "{what}: changed");
    assert_eq!(
        fx.reason(reason),
        count + 1,
        "{what}: not counted as {reason}"
    );
    assert_eq!(fx.reason("nat_icmp_error"), translated, "{what}");
}

/// A first packet of `proto` from the client to the frontend, run through
/// the program: (the packet as the client sent it, as the program sent it).
fn open_flow(fx: &mut Fixture, fam: &Family, proto: Protocol, sport: u16) -> (Frame, Vec<u8>) {
    let src = sock(fam.client, sport).to_string();
    let dst = sock(fam.vip, 80).to_string();
    let sent = match proto {
        Protocol::Tcp => Frame::tcp(&src, &dst, TCP_SYN),
        Protocol::Udp => Frame::udp(&src, &dst),
        Protocol::Sctp => Frame::sctp(&src, &dst, SCTP_INIT),
    };
    let (verdict, out) = fx.run(&sent.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(verify_checksums(&out).1, fam.backend.parse().unwrap());
    (sent, out)
}

/// Errors about the client's packets to the backend (a router towards the
/// backend, or the backend itself) reach the client about the client's
/// own packet to the frontend: the quote's destination is the frontend
/// again, its checksums as the client computed them; the outer source is
/// kept for a router and becomes the frontend for the backend itself.
#[test]
fn errors_about_packets_to_a_backend_reach_the_client_about_the_frontend() {
    let Some(mut fx) = Fixture::new("errors_about_packets_to_a_backend") else {
        return;
    };
    for fam in &FAMILIES {
        let backend: SocketAddr = fam.backend.parse().unwrap();
        let services = [
            (frontend(fam.vip, 80, Protocol::Tcp), addrs(&[fam.backend])),
            (frontend(fam.vip, 80, Protocol::Udp), addrs(&[fam.backend])),
        ];
        let services: Vec<_> = services.iter().map(|(f, b)| (*f, b.as_slice())).collect();
        fx.set_services(&services);
        for (i, proto) in [Protocol::Tcp, Protocol::Udp].into_iter().enumerate() {
            let (sent, out) = open_flow(&mut fx, fam, proto, 41000 + u16::try_from(i).unwrap());
            let client_packet = sent.bytes();
            for (kind, type_code, rest) in errors(fam.v4()) {
                // Port unreachable comes from the backend itself.
                let from = if kind == "port unreachable" {
                    backend.ip()
                } else {
                    ip(fam.router)
                };
                let to_client = if from == backend.ip() {
                    ip(fam.vip)
                } else {
                    from
                };
                for len in quote_lengths(fam.v4(), ip_packet(&out).len()) {
                    let what = format!("{} {proto} {kind}, {len}-byte quote", fam.vip);
                    let error = icmp_error(
                        from,
                        ip(fam.client),
                        type_code,
                        rest,
                        &ip_packet(&out)[..len],
                    );
                    let expected = icmp_error(
                        to_client,
                        ip(fam.client),
                        type_code,
                        rest,
                        &ip_packet(&client_packet)[..len],
                    );
                    assert_translated(&mut fx, prog_names::TC_LB, &error, &expected, &what);
                }
            }
            // The whole quote is the client's packet: its L4 checksum
            // verifies from scratch against the frontend.
            let error = icmp_error(
                ip(fam.router),
                ip(fam.client),
                errors(fam.v4())[0].1,
                errors(fam.v4())[0].2,
                ip_packet(&out),
            );
            let (_, out) = fx.run(&error);
            let (_, _, quote) = verify_icmp_error(&out);
            let mut frame = out[..14].to_vec();
            frame.extend(&quote);
            assert_eq!(
                verify_checksums(&frame),
                (sock(fam.client, sent.src.port()), sock(fam.vip, 80))
            );
        }
        // A router on the way sends its error with the TTL it saw: the
        // quoted header's checksum follows (from scratch in the check).
        let (_, mut out) = open_flow(&mut fx, fam, Protocol::Tcp, 41100);
        if fam.v4() {
            out[14 + 8] -= 1;
            out[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
            let csum = checksum(&out[14..34], 0);
            out[14 + 10..14 + 12].copy_from_slice(&csum.to_be_bytes());
        } else {
            out[14 + 7] -= 1;
        }
        let (kind, type_code, rest) = errors(fam.v4())[2];
        let error = icmp_error(
            ip(fam.router),
            ip(fam.client),
            type_code,
            rest,
            ip_packet(&out),
        );
        let (verdict, got) = fx.run(&error);
        assert_eq!(verdict, TC_ACT_OK, "{kind} with TTL - 1");
        let (src, dst, quote) = verify_icmp_error(&got);
        assert_eq!((src, dst), (ip(fam.router), ip(fam.client)));
        if fam.v4() {
            assert_eq!(checksum(&quote[..20], 0), 0, "quoted IPv4 header checksum");
            assert_eq!(quote[8], 63, "quoted TTL kept");
        }
        let mut frame = got[..14].to_vec();
        frame.extend(&quote);
        assert_eq!(
            verify_checksums(&frame),
            (sock(fam.client, 41100), sock(fam.vip, 80))
        );
        fx.set_services(&[]);
    }
}

/// A source-NATed flow (a `NodePort` to a remote backend): the error is
/// addressed to the node's address and quotes the node's port; the client
/// gets it, about its own packet to the `NodePort`. And the other way: an
/// error about a reply reaches the backend about its packet to the node.
#[test]
fn errors_about_a_source_nated_flow_reach_the_client() {
    let Some(mut fx) = Fixture::new("errors_about_a_source_nated_flow") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    for fam in &FAMILIES {
        let backends = addrs(&[fam.backend]);
        let fe = frontend(fam.node, 30080, Protocol::Tcp);
        fx.set_specs(&[(fe, spec(FrontendKind::NodePort, &backends))]);
        let client = sock(fam.client, 45000);
        let node_port = sock(fam.node, 30080);
        let syn = Frame::tcp(&client.to_string(), &node_port.to_string(), TCP_SYN);
        let (verdict, out) = fx.run(&syn.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        let (nat_src, dst) = verify_checksums(&out);
        assert_eq!((nat_src.ip(), dst), (node_port.ip(), backends[0]));
        for (kind, type_code, rest) in errors(fam.v4()) {
            for len in quote_lengths(fam.v4(), ip_packet(&out).len()) {
                let what = format!("{} SNAT {kind}, {len}-byte quote", fam.node);
                let error = icmp_error(
                    ip(fam.router),
                    nat_src.ip(),
                    type_code,
                    rest,
                    &ip_packet(&out)[..len],
                );
                let expected = icmp_error(
                    ip(fam.router),
                    client.ip(),
                    type_code,
                    rest,
                    &ip_packet(&syn.bytes())[..len],
                );
                assert_translated(&mut fx, prog_names::TC_LB, &error, &expected, &what);
            }
        }
        // The reply (backend -> the node's port), as the client got it
        // (the NodePort -> the client): an error about it, sent to the
        // NodePort address, reaches the backend about its packet to the
        // node's port; from the client itself, it comes from the node.
        let reply = Frame::tcp(
            &backends[0].to_string(),
            &nat_src.to_string(),
            TCP_SYN | TCP_ACK,
        );
        let (verdict, out) = fx.run(&reply.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(verify_checksums(&out), (node_port, client));
        for (kind, type_code, rest) in errors(fam.v4()) {
            for (from, as_seen) in [
                (ip(fam.client_router), ip(fam.client_router)),
                (client.ip(), nat_src.ip()),
            ] {
                let what = format!("{} SNAT reply {kind} from {from}", fam.node);
                let error = icmp_error(from, node_port.ip(), type_code, rest, ip_packet(&out));
                let expected = icmp_error(
                    as_seen,
                    backends[0].ip(),
                    type_code,
                    rest,
                    ip_packet(&reply.bytes()),
                );
                assert_translated(&mut fx, prog_names::TC_LB, &error, &expected, &what);
            }
        }
        fx.set_specs(&[]);
    }
}

/// Errors about a reply as translated (frontend -> client), sent to the
/// frontend address by a router towards the client (or by the client):
/// the backend gets them about its own packet to the client.
#[test]
fn errors_about_replies_reach_the_backend_about_its_own_packet() {
    let Some(mut fx) = Fixture::new("errors_about_replies") else {
        return;
    };
    for fam in &FAMILIES {
        let backend: SocketAddr = fam.backend.parse().unwrap();
        let udp = [(frontend(fam.vip, 80, Protocol::Udp), addrs(&[fam.backend]))];
        let tcp = [(frontend(fam.vip, 80, Protocol::Tcp), addrs(&[fam.backend]))];
        for (proto, services) in [(Protocol::Tcp, &tcp), (Protocol::Udp, &udp)] {
            let services: Vec<_> = services.iter().map(|(f, b)| (*f, b.as_slice())).collect();
            fx.set_services(&services);
            let (sent, _) = open_flow(&mut fx, fam, proto, 42000);
            let reply = sent.with_dst(backend).reply();
            let (verdict, out) = fx.run(&reply.bytes());
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(
                verify_checksums(&out),
                (sock(fam.vip, 80), sent.src),
                "reply translated"
            );
            for (kind, type_code, rest) in errors(fam.v4()) {
                for from in [ip(fam.client_router), ip(fam.client)] {
                    // The client itself is the other side of the flow: as
                    // the backend sees it, the source is the client too
                    // (no source NAT here), so both keep their source.
                    for len in quote_lengths(fam.v4(), ip_packet(&out).len()) {
                        let what = format!("{} {proto} reply {kind} from {from}, {len}", fam.vip);
                        let error =
                            icmp_error(from, ip(fam.vip), type_code, rest, &ip_packet(&out)[..len]);
                        let expected = icmp_error(
                            from,
                            backend.ip(),
                            type_code,
                            rest,
                            &ip_packet(&reply.bytes())[..len],
                        );
                        assert_translated(&mut fx, prog_names::TC_LB, &error, &expected, &what);
                    }
                }
            }
        }
        fx.set_services(&[]);
    }
}

/// An error the node's own stack generates while forwarding a translated
/// packet (its next link's MTU is smaller, the TTL ran out) leaves through
/// an attached interface's egress: translated there, and only once.
#[test]
fn errors_generated_on_the_node_are_translated_at_egress() {
    let Some(mut fx) = Fixture::new("errors_generated_on_the_node") else {
        return;
    };
    for fam in &FAMILIES {
        let tcp = [(frontend(fam.vip, 80, Protocol::Tcp), addrs(&[fam.backend]))];
        let services: Vec<_> = tcp.iter().map(|(f, b)| (*f, b.as_slice())).collect();
        fx.set_services(&services);
        let (sent, out) = open_flow(&mut fx, fam, Protocol::Tcp, 43000);
        let (_, type_code, rest) = errors(fam.v4())[0];
        let error = icmp_error(
            ip(fam.node),
            ip(fam.client),
            type_code,
            rest,
            ip_packet(&out),
        );
        let expected = icmp_error(
            ip(fam.node),
            ip(fam.client),
            type_code,
            rest,
            ip_packet(&sent.bytes()),
        );
        let what = format!("{} at egress", fam.vip);
        assert_translated(&mut fx, prog_names::TC_LB_EGRESS, &error, &expected, &what);
        // Translated once: the translated error matches no flow any more.
        let (verdict, again) = fx.run_named(prog_names::TC_LB_EGRESS, &expected);
        assert_eq!(
            (verdict, again),
            (TC_ACT_OK, expected.clone()),
            "{what}: twice"
        );
        let (verdict, again) = fx.run(&expected);
        assert_eq!(
            (verdict, again),
            (TC_ACT_OK, expected),
            "{what}: then ingress"
        );
        fx.set_services(&[]);
    }
}

/// IPv4 header bytes of `packet` with `edit` applied and the header
/// checksum recomputed.
fn edited_v4(packet: &[u8], edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut packet = packet.to_vec();
    edit(&mut packet);
    packet[10..12].copy_from_slice(&[0, 0]);
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let csum = checksum(&packet[..ihl], 0);
    packet[10..12].copy_from_slice(&csum.to_be_bytes());
    packet
}

/// What must pass untouched: errors about no flow of ours, informational
/// messages, quotes cut before the ports, quotes with IPv4 options, of a
/// later fragment, of another protocol, and a length field claiming more
/// than the frame holds. Each passes byte for byte, under its reason.
#[test]
fn errors_about_nothing_of_ours_and_odd_quotes_pass_unchanged() {
    let Some(mut fx) = Fixture::new("errors_about_nothing_of_ours") else {
        return;
    };
    for fam in &FAMILIES {
        let tcp = [(frontend(fam.vip, 80, Protocol::Tcp), addrs(&[fam.backend]))];
        let services: Vec<_> = tcp.iter().map(|(f, b)| (*f, b.as_slice())).collect();
        fx.set_services(&services);
        let (_, out) = open_flow(&mut fx, fam, Protocol::Tcp, 44000);
        let quoted = ip_packet(&out);
        let (_, type_code, rest) = errors(fam.v4())[0];
        let router = ip(fam.router);
        let client = ip(fam.client);
        let error = |quote: &[u8]| icmp_error(router, client, type_code, rest, quote);
        let v = fam.vip;

        // No flow: another client port, and the untranslated packet.
        let other = Frame::tcp(
            &sock(fam.client, 44001).to_string(),
            fam.backend,
            TCP_SYN | TCP_ACK,
        );
        assert_untouched(
            &mut fx,
            &error(ip_packet(&other.bytes())),
            "pass_other_proto",
            &format!("{v}: no flow"),
        );
        // Informational: echo request / reply.
        let echo = if fam.v4() { (8, 0) } else { (128, 0) };
        let ping = icmp_error(router, client, echo, [0, 1, 0, 1], quoted);
        assert_untouched(&mut fx, &ping, "pass_other_proto", &format!("{v}: echo"));
        // Cut: the IP header and 7 bytes of TCP, or only part of the header.
        let hlen = if fam.v4() { 20 } else { 40 };
        for len in [hlen + 7, hlen - 4] {
            assert_untouched(
                &mut fx,
                &error(&quoted[..len]),
                "pass_truncated",
                &format!("{v}: quote cut at {len}"),
            );
        }
        // The outer length claims more than the frame holds.
        let mut long = error(quoted);
        if fam.v4() {
            let total = u16::from_be_bytes([long[16], long[17]]) + 8;
            long[16..18].copy_from_slice(&total.to_be_bytes());
            long[24..26].copy_from_slice(&[0, 0]);
            let csum = checksum(&long[14..34], 0);
            long[24..26].copy_from_slice(&csum.to_be_bytes());
        } else {
            let len = u16::from_be_bytes([long[18], long[19]]) + 8;
            long[18..20].copy_from_slice(&len.to_be_bytes());
        }
        assert_untouched(&mut fx, &long, "pass_bad_length", &format!("{v}: length"));
        if fam.v4() {
            // Options in the quoted header: the ports are elsewhere.
            let mut with_options = quoted[..20].to_vec();
            with_options.extend([1, 1, 1, 0]);
            with_options.extend(&quoted[20..]);
            let with_options = edited_v4(&with_options, |p| {
                p[0] = 0x46;
                let total = u16::from_be_bytes([p[2], p[3]]) + 4;
                p[2..4].copy_from_slice(&total.to_be_bytes());
            });
            assert_untouched(&mut fx, &error(&with_options), "pass_ip_options", "options");
            // A later fragment quotes no ports.
            let later = edited_v4(quoted, |p| p[6..8].copy_from_slice(&[0x00, 0x10]));
            assert_untouched(&mut fx, &error(&later), "pass_fragment", "fragment");
            // Another protocol in the quote.
            let other = edited_v4(quoted, |p| p[9] = 47);
            assert_untouched(&mut fx, &error(&other), "pass_other_proto", "GRE");
        } else {
            // A fragment header or another extension header first.
            for (next, reason) in [(44, "pass_fragment"), (60, "pass_ext_hdr")] {
                let mut odd = quoted.to_vec();
                odd[6] = next;
                assert_untouched(&mut fx, &error(&odd), reason, &format!("next {next}"));
            }
        }
        fx.set_services(&[]);
    }
}
