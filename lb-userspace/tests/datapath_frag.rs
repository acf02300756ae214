//! Datapath tests (root): the real TC program run with `BPF_PROG_TEST_RUN` on
//! crafted IPv4/IPv6 UDP fragments (see `support::prog_test` and
//! `support::frames`).
//!
//! This file: fragmented datagrams (`lb-ebpf` `frag`). Every fragment of a
//! datagram to a `ClusterIP` is translated (the first: addresses, port and
//! UDP checksum; the later ones: addresses), the reassembled datagram's
//! checksum holds, replies in fragments are translated back (at ingress
//! and at egress), a source-NATed flow's fragments get the node's address
//! both ways, a later fragment ahead of its first or of no service flow is
//! passed byte for byte and creates no state, and a dry run writes no
//! fragment entry.

mod support;

use std::net::{IpAddr, SocketAddr};

use aya::maps::{HashMap as AyaHashMap, MapData};
use lb_common::{Frag4Key, Frag6Key, FragEntry, map_names, prog_names};
use lb_userspace::model::{FrontendKind, Protocol};

use support::frames::{Frame, assert_port_unreachable, fragments, parse_fragment, reassemble};
use support::prog_test::{
    BACKENDS4, BACKENDS6, Fixture, NODE4, NODE6, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, VIP4,
    VIP6, addrs, frontend, node_config, spec, translated,
};

/// The families: service address, client address, backends, a datagram id.
const FAMILIES: [(&str, &str, [&str; 3], u32); 2] = [
    (VIP4, "198.18.1.2", BACKENDS4, 0x1234),
    (VIP6, "fd00:1::2", BACKENDS6, 0x1234_5678),
];

/// Where the datagrams of these tests are cut: three fragments of 48, 32
/// and 28 bytes of the 108 L4 bytes (UDP header + 100 bytes of data).
const CUTS: [usize; 2] = [48, 80];

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A UDP datagram of 100 bytes of data, none of them zero.
fn datagram(src: SocketAddr, dst: SocketAddr) -> Frame {
    Frame {
        payload: (0..100u8).map(|i| i.wrapping_mul(7) | 1).collect(),
        ..Frame::udp(&src.to_string(), &dst.to_string())
    }
}

/// Entries of the fragment maps (IPv4, IPv6) and the ports they hold.
fn frag_entries(fx: &Fixture) -> (Vec<FragEntry>, Vec<FragEntry>) {
    let v4: AyaHashMap<&MapData, Frag4Key, FragEntry> =
        AyaHashMap::try_from(fx.ebpf.map(map_names::FRAG4).expect("IPv4 fragment map"))
            .expect("a hash map");
    let v6: AyaHashMap<&MapData, Frag6Key, FragEntry> =
        AyaHashMap::try_from(fx.ebpf.map(map_names::FRAG6).expect("IPv6 fragment map"))
            .expect("a hash map");
    (
        v4.iter().map(|e| e.expect("entry").1).collect(),
        v6.iter().map(|e| e.expect("entry").1).collect(),
    )
}

/// Runs every fragment through program NAME, each passed (`TC_ACT_OK`);
/// returns them as the program left them.
fn run_all(fx: &mut Fixture, name: &str, frags: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frags
        .iter()
        .enumerate()
        .map(|(i, frag)| {
            let (verdict, out) = fx.run_named(name, frag);
            assert_eq!(verdict, TC_ACT_OK, "fragment {i}");
            assert_eq!(out.len(), frag.len(), "fragment {i}: length changed");
            out
        })
        .collect()
}

/// The later fragments (no L4 header) left their data as it was.
fn assert_later_data_untouched(input: &[Vec<u8>], output: &[Vec<u8>]) {
    for (i, (inp, out)) in input.iter().zip(output).enumerate().skip(1) {
        assert_eq!(
            parse_fragment(out).data,
            parse_fragment(inp).data,
            "fragment {i}: data changed"
        );
    }
}

#[test]
fn every_fragment_of_a_datagram_to_a_cluster_ip_is_translated() {
    let Some(mut fx) = Fixture::new("every_fragment_of_a_datagram_to_a_cluster_ip_is_translated")
    else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 53, Protocol::Udp), &addrs(&BACKENDS4)),
        (frontend(VIP6, 53, Protocol::Udp), &addrs(&BACKENDS6)),
    ]);
    for (round, (vip, client, backends, id)) in FAMILIES.into_iter().enumerate() {
        let request = datagram(sock(client, 40000), sock(vip, 53));
        let frags = fragments(&request, &CUTS, id);
        let out = run_all(&mut fx, prog_names::TC_LB, &frags);
        // The first fragment names the backend: DNAT of address and port.
        let first = parse_fragment(&out[0]);
        let backend = SocketAddr::new(
            first.dst,
            u16::from_be_bytes([first.data[2], first.data[3]]),
        );
        assert!(addrs(&backends).contains(&backend), "{backend}");
        // Every fragment goes there (same source, same id): as the
        // receiver reassembles them, the datagram is the one the client
        // sent, to the backend, with a valid UDP checksum.
        let (src, dst, l4) = reassemble(&out);
        assert_eq!((src, dst), (request.src.ip(), backend.ip()));
        assert_eq!(l4, request.with_dst(backend).l4(), "reassembled datagram");
        assert_later_data_untouched(&frags, &out);
        let n = u64::try_from(round).unwrap() + 1;
        assert_eq!(fx.reason("nat_new"), n);
        assert_eq!(fx.reason("nat_established"), 2 * n);
        // One flow (service and reply entries), made by the first fragment.
        assert_eq!(fx.conntrack().len(), 2 * usize::try_from(n).unwrap());
    }
    // One fragment entry per datagram: the client's ports as they arrived.
    let (v4, v6) = frag_entries(&fx);
    let ports = FragEntry {
        sport_be: 40000_u16.to_be(),
        dport_be: 53_u16.to_be(),
    };
    assert_eq!((v4, v6), (vec![ports], vec![ports]));
}

#[test]
fn fragmented_replies_are_translated_back_at_ingress_and_egress() {
    let Some(mut fx) = Fixture::new("fragmented_replies_are_translated_back_at_ingress_and_egress")
    else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 53, Protocol::Udp), &addrs(&BACKENDS4)),
        (frontend(VIP6, 53, Protocol::Udp), &addrs(&BACKENDS6)),
    ]);
    let mut replies = 0;
    for (vip, client, _, id) in FAMILIES {
        for (program, port) in [
            (prog_names::TC_LB, 40000),
            (prog_names::TC_LB_EGRESS, 40001),
        ] {
            let what = format!("{vip} via {program}");
            let request = datagram(sock(client, port), sock(vip, 53));
            let backend = translated(&mut fx, &request, &what);
            // The backend's answer, in fragments from the backend's address.
            let answer = request.with_dst(backend).reply();
            let frags = fragments(&answer, &CUTS, id + port_id(port));
            let out = run_all(&mut fx, program, &frags);
            let (src, dst, l4) = reassemble(&out);
            assert_eq!((src, dst), (request.dst.ip(), request.src.ip()), "{what}");
            assert_eq!(l4, request.reply().l4(), "{what}: reassembled reply");
            assert_later_data_untouched(&frags, &out);
            replies += 3;
            assert_eq!(fx.reason("nat_reply"), replies, "{what}");
        }
    }
}

/// A distinct datagram id per client port.
fn port_id(port: u16) -> u32 {
    u32::from(port - 40000)
}

#[test]
fn a_later_fragment_without_its_first_is_passed_untouched_and_creates_no_state() {
    let Some(mut fx) = Fixture::new("a_later_fragment_without_its_first_is_passed_untouched")
    else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 53, Protocol::Udp), &addrs(&BACKENDS4)),
        (frontend(VIP6, 53, Protocol::Udp), &addrs(&BACKENDS6)),
    ]);
    let mut untracked = 0;
    for (vip, client, _, id) in FAMILIES {
        let request = datagram(sock(client, 40000), sock(vip, 53));
        let frags = fragments(&request, &[48], id);
        // Out of order: the second fragment overtook the first. Its ports
        // are unknown: passed as it came, counted, nothing created.
        let (verdict, out) = fx.run(&frags[1]);
        assert_eq!((verdict, &out), (TC_ACT_OK, &frags[1]), "{vip}: overtaking");
        untracked += 1;
        assert_eq!(fx.reason("pass_frag_untracked"), untracked);
        assert!(
            fx.conntrack().is_empty(),
            "{vip}: state from a later fragment"
        );
        // The first, then the second again: both translated.
        let out = run_all(&mut fx, prog_names::TC_LB, &frags);
        let (_, dst, _) = reassemble(&out);
        assert_ne!(dst, request.dst.ip(), "{vip}: not translated");
        // The flow ends (its entries go) while the fragment entry lives:
        // a later fragment does not bring the flow back.
        fx.edit_conntrack(&|_| true, &|_| None);
        let (verdict, out) = fx.run(&frags[1]);
        assert_eq!((verdict, &out), (TC_ACT_OK, &frags[1]), "{vip}: flow gone");
        untracked += 1;
        assert_eq!(fx.reason("pass_frag_untracked"), untracked);
        assert!(
            fx.conntrack().is_empty(),
            "{vip}: state from a later fragment"
        );
    }
}

#[test]
fn fragments_of_other_traffic_pass_byte_for_byte() {
    let Some(mut fx) = Fixture::new("fragments_of_other_traffic_pass_byte_for_byte") else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 53, Protocol::Udp), &addrs(&BACKENDS4)),
        (frontend(VIP6, 53, Protocol::Udp), &addrs(&BACKENDS6)),
    ]);
    let others = [
        ("198.18.1.2:40000", "198.18.9.9:53"),
        ("[fd00:1::2]:40000", "[fd00:9::9]:53"),
        // From a backend's address, but of no flow.
        ("198.18.2.2:8080", "198.18.1.2:40000"),
        ("[fd00:2::2]:8080", "[fd00:1::2]:40000"),
    ];
    for (src, dst) in others {
        let frags = fragments(
            &datagram(src.parse().unwrap(), dst.parse().unwrap()),
            &CUTS,
            7,
        );
        for program in [prog_names::TC_LB, prog_names::TC_LB_EGRESS] {
            for (i, frag) in frags.iter().enumerate() {
                let (verdict, out) = fx.run_named(program, frag);
                assert_eq!((verdict, &out), (TC_ACT_OK, frag), "{src} -> {dst} #{i}");
            }
        }
    }
    // Per frame and program: the first fragment is no service traffic,
    // the two later ones have no recorded first.
    assert_eq!(fx.reason("pass_no_service"), 8);
    assert_eq!(fx.reason("pass_frag_untracked"), 16);
    assert_eq!(frag_entries(&fx), (vec![], vec![]));
    assert!(fx.conntrack().is_empty());
}

#[test]
fn an_ipv6_atomic_fragment_is_translated_as_a_whole_datagram() {
    let Some(mut fx) = Fixture::new("an_ipv6_atomic_fragment_is_translated_as_a_whole_datagram")
    else {
        return;
    };
    fx.set_services(&[(frontend(VIP6, 53, Protocol::Udp), &addrs(&BACKENDS6))]);
    let request = datagram(sock("fd00:1::2", 40000), sock(VIP6, 53));
    // Offset 0 and no more fragments (RFC 6946): one fragment.
    let frags = fragments(&request, &[], 9);
    let out = run_all(&mut fx, prog_names::TC_LB, &frags);
    let (src, dst, l4) = reassemble(&out);
    let backend = SocketAddr::new(dst, u16::from_be_bytes([l4[2], l4[3]]));
    assert!(addrs(&BACKENDS6).contains(&backend), "{backend}");
    assert_eq!(src, request.src.ip());
    assert_eq!(l4, request.with_dst(backend).l4());
    assert_eq!(fx.reason("nat_new"), 1);
    // Nothing follows it: nothing recorded.
    assert_eq!(frag_entries(&fx), (vec![], vec![]));
}

#[test]
fn a_dry_run_of_a_first_fragment_records_nothing() {
    let Some(mut fx) = Fixture::new("a_dry_run_of_a_first_fragment_records_nothing") else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 53, Protocol::Udp), &addrs(&BACKENDS4)),
        (frontend(VIP6, 53, Protocol::Udp), &addrs(&BACKENDS6)),
    ]);
    for (vip, client, _, id) in FAMILIES {
        let frags = fragments(&datagram(sock(client, 40000), sock(vip, 53)), &CUTS, id);
        let (verdict, out) = fx.run_dry(&frags[0]);
        assert_eq!(verdict, TC_ACT_OK);
        // What the program would do is visible (the DNAT)...
        assert_ne!(parse_fragment(&out).dst, vip.parse::<IpAddr>().unwrap());
    }
    // ...and nothing it would write is there.
    assert_eq!(frag_entries(&fx), (vec![], vec![]));
    assert!(fx.conntrack().is_empty());
    assert_eq!(fx.reason("nat_new"), 0);
}

#[test]
fn a_first_fragment_to_a_service_without_endpoints_is_refused_over_ipv4_dropped_over_ipv6() {
    let Some(mut fx) = Fixture::new("a_first_fragment_to_a_service_without_endpoints") else {
        return;
    };
    fx.set_services(&[
        (frontend(VIP4, 53, Protocol::Udp), &[]),
        (frontend(VIP6, 53, Protocol::Udp), &[]),
    ]);
    // IPv4: the port unreachable quotes the IP header and the UDP header,
    // as for a whole datagram.
    let frags = fragments(
        &datagram(sock("198.18.1.2", 40000), sock(VIP4, 53)),
        &CUTS,
        3,
    );
    let (verdict, out) = fx.run(&frags[0]);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_port_unreachable(&out, &frags[0]);
    assert_eq!(fx.reason("reject"), 1);
    // IPv6: the quote (fixed header and 8 bytes) would end at the Fragment
    // header, and the client's kernel could not match it to its socket:
    // dropped instead.
    let frags = fragments(
        &datagram(sock("fd00:1::2", 40000), sock(VIP6, 53)),
        &CUTS,
        3,
    );
    let (verdict, _) = fx.run(&frags[0]);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.reason("drop_reject_failed"), 1);
    // Nothing recorded: the later fragments pass.
    assert_eq!(frag_entries(&fx), (vec![], vec![]));
    assert!(fx.conntrack().is_empty());
}

#[test]
fn source_nated_fragments_are_translated_both_ways() {
    let Some(mut fx) = Fixture::new("source_nated_fragments_are_translated_both_ways") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    for (node, client, backend, id) in [
        (NODE4, "198.18.9.2", "198.18.12.2:8080", 0x4242),
        (NODE6, "fd00:9::2", "[fd00:12::2]:8080", 0x4242_4242),
    ] {
        // A NodePort to a remote backend: source NAT to the node.
        let node_port = sock(node, 30053);
        let backends = addrs(&[backend]);
        fx.set_specs(&[(
            frontend(node, 30053, Protocol::Udp),
            spec(FrontendKind::NodePort, &backends),
        )]);
        let request = datagram(sock(client, 45000), node_port);
        let frags = fragments(&request, &CUTS, id);
        let out = run_all(&mut fx, prog_names::TC_LB, &frags);
        let (src, dst, l4) = reassemble(&out);
        assert_eq!((src, dst), (node_port.ip(), backends[0].ip()), "{node}");
        let snat = SocketAddr::new(src, u16::from_be_bytes([l4[0], l4[1]]));
        assert_ne!(snat.port(), 45000, "{node}: source port not mapped");
        assert_eq!(l4, request.with_dst(backends[0]).with_src(snat).l4());
        assert_later_data_untouched(&frags, &out);
        // The backend answers the node in fragments; the client gets the
        // NodePort back, on its own address and port.
        let answer = request.with_dst(backends[0]).with_src(snat).reply();
        let frags = fragments(&answer, &CUTS, id + 1);
        let out = run_all(&mut fx, prog_names::TC_LB, &frags);
        let (src, dst, l4) = reassemble(&out);
        assert_eq!((src, dst), (node_port.ip(), request.src.ip()), "{node}");
        assert_eq!(l4, request.reply().l4(), "{node}: reassembled reply");
        assert_later_data_untouched(&frags, &out);
    }
}
