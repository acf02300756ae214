//! Datapath tests (root): the real TC program run with `BPF_PROG_TEST_RUN` on
//! crafted IPv4/IPv6 TCP/UDP frames (see `support::prog_test` and
//! `support::frames`). Each test asserts the verdict, the exact output bytes
//! (built independently with checksums computed from scratch), the
//! checksums themselves, and the conntrack/counter maps.
//!
//! This file: what the program leaves alone (non-IP, truncated headers,
//! extension headers, fragments, options, other protocols, IPv6 UDP without
//! a checksum) and what it rejects, with a TCP reset or a port unreachable (a Service
//! without backends, a port a service address does not serve), or drops (a
//! Local traffic policy with no endpoint on this node but some elsewhere).

mod support;

use lb_userspace::model::{FrontendKind, Protocol};

use support::frames::{
    Frame, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, assert_port_unreachable, assert_tcp_reset,
    eth_header, ipv6_header,
};
use support::prog_test::{
    BACKENDS4, BACKENDS6, Fixture, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, VIP4, VIP6, addrs,
    frontend, spec,
};

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
    fx.set_services(&[
        (frontend(VIP4, 53, Protocol::Udp), &addrs(&BACKENDS4)),
        (frontend(VIP4, 80, Protocol::Tcp), &addrs(&BACKENDS4)),
    ]);
    // UDP fragments are translated (datapath_frag.rs), TCP ones are not: a
    // first fragment (MF set) and a later fragment (offset 185*8).
    let tcp = Frame::tcp("198.18.1.2:40000", "198.19.0.10:80", TCP_SYN).bytes();
    for frag in [0x2000_u16, 185] {
        let mut input = tcp.clone();
        input[20..22].copy_from_slice(&frag.to_be_bytes());
        let (verdict, out) = fx.run(&input);
        assert_eq!((verdict, &out), (TC_ACT_OK, &input));
    }
    assert_eq!(fx.reason("pass_fragment"), 2);
    // A later UDP fragment whose first was never seen: passed untouched.
    let frame = Frame::udp("198.18.1.2:40000", "198.19.0.10:53").bytes();
    let mut input = frame.clone();
    input[20..22].copy_from_slice(&185_u16.to_be_bytes());
    let (verdict, out) = fx.run(&input);
    assert_eq!((verdict, &out), (TC_ACT_OK, &input));
    assert_eq!(fx.reason("pass_frag_untracked"), 1);
    assert!(fx.conntrack().is_empty());
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

#[test]
fn service_without_backends_rejects_tcp_with_a_reset_and_udp_with_port_unreachable() {
    let Some(mut fx) = Fixture::new("service_without_backends_rejects") else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 80, Protocol::Tcp), &[]),
        (frontend(VIP6, 80, Protocol::Tcp), &[]),
        (frontend(VIP4, 53, Protocol::Udp), &[]),
        (frontend(VIP6, 53, Protocol::Udp), &[]),
    ]);
    for frame in [
        Frame::udp("198.18.1.2:40000", "198.19.0.10:53"),
        Frame::udp("[fd00:1::2]:40000", "[fd00:96::10]:53"),
    ] {
        let input = frame.bytes();
        let (verdict, out) = fx.run(&input);
        assert_eq!(verdict, TC_ACT_REDIRECT, "sent back to the client");
        assert_port_unreachable(&out, &input);
    }
    // TCP: a reset, whatever the segment (a SYN, data with ACK, a FIN).
    for (client, vip) in [
        ("198.18.1.2:40000", "198.19.0.10:80"),
        ("[fd00:1::2]:40000", "[fd00:96::10]:80"),
    ] {
        for flags in [TCP_SYN, TCP_ACK | TCP_PSH, TCP_FIN] {
            let input = Frame::tcp(client, vip, flags).bytes();
            let (verdict, out) = fx.run(&input);
            assert_eq!(verdict, TC_ACT_REDIRECT, "sent back to the client");
            assert_tcp_reset(&out, &input);
        }
    }
    assert_eq!(fx.reason("reject"), 2 + 6);
    // A reset is never answered.
    for (client, vip) in [
        ("198.18.1.2:40000", "198.19.0.10:80"),
        ("[fd00:1::2]:40000", "[fd00:96::10]:80"),
    ] {
        let input = Frame::tcp(client, vip, TCP_RST | TCP_ACK).bytes();
        assert_eq!(fx.run(&input).0, TC_ACT_SHOT);
    }
    assert_eq!(fx.reason("drop_reset_unanswered"), 2);
    assert!(fx.conntrack().is_empty());
}

#[test]
fn local_policy_without_a_local_endpoint_drops_new_flows() {
    let Some(mut fx) = Fixture::new("local_policy_without_a_local_endpoint_drops") else {
        return;
    };
    // internalTrafficPolicy Local, the Service's endpoints all on other
    // nodes: kube-proxy drops ("Traffic to the clusterIP will be
    // dropped"), where a Service with no endpoints at all is refused.
    let local_elsewhere = || {
        let mut spec = spec(FrontendKind::ClusterIp, &[]);
        spec.internal_local = true;
        spec.no_local_endpoints = true;
        spec
    };
    fx.set_specs(&[
        (frontend(VIP4, 80, Protocol::Tcp), local_elsewhere()),
        (frontend(VIP6, 80, Protocol::Tcp), local_elsewhere()),
        (frontend(VIP4, 53, Protocol::Udp), local_elsewhere()),
        (frontend(VIP6, 53, Protocol::Udp), local_elsewhere()),
    ]);
    for frame in [
        Frame::udp("198.18.1.2:40000", "198.19.0.10:53"),
        Frame::udp("[fd00:1::2]:40000", "[fd00:96::10]:53"),
        Frame::tcp("198.18.1.2:40000", "198.19.0.10:80", TCP_SYN),
        Frame::tcp("[fd00:1::2]:40000", "[fd00:96::10]:80", TCP_SYN),
    ] {
        let (verdict, _) = fx.run(&frame.bytes());
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    assert_eq!(fx.reason("drop_no_local_endpoint"), 4);
    assert_eq!(fx.reason("reject"), 0);
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
    let udp = Frame::udp("198.18.1.2:40000", "198.19.0.10:80").bytes();
    let (verdict, out) = fx.run(&udp);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_port_unreachable(&out, &udp);
    for frame in [
        Frame::tcp("198.18.1.2:40000", "198.19.0.10:81", TCP_SYN),
        Frame::tcp("[fd00:1::2]:40000", "[fd00:96::10]:8080", TCP_SYN),
    ] {
        let input = frame.bytes();
        let (verdict, out) = fx.run(&input);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_tcp_reset(&out, &input);
    }
    // Another address is not a service address: passed.
    let other = Frame::tcp("198.18.1.2:40000", "198.18.2.2:81", TCP_SYN).bytes();
    assert_eq!(fx.run(&other), (TC_ACT_OK, other));
}
