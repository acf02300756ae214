//! Datapath tests (root): SCTP Services, with the real TC program run by
//! `BPF_PROG_TEST_RUN` on crafted IPv4/IPv6 SCTP frames (this kernel has
//! no SCTP sockets, so no real association can be made). Every frame the
//! program leaves has its `CRC32c` recomputed from scratch
//! (`support::frames::assert_sctp_checksum`) and is compared byte for
//! byte with one built independently.
//!
//! This file: an association's INIT, DATA and the backend's INIT ACK
//! translated (the port changes, so the `CRC32c` is updated), address-only
//! translation leaving the `CRC32c` as it was, a not-yet-computed (zero)
//! checksum left for the stack, `NodePort` source NAT (source port and
//! `CRC32c`), a packet of no association refused, ABORT closing the flow,
//! and a large DATA chunk.

mod support;

use std::net::SocketAddr;

use lb_userspace::model::{FrontendKind, Protocol};

use support::frames::{
    Frame, SCTP_ABORT, SCTP_DATA, SCTP_INIT, SCTP_INIT_ACK, SCTP_SHUTDOWN, assert_sctp_checksum,
    verify_checksums,
};
use support::prog_test::{
    BACKENDS4, BACKENDS6, Fixture, NODE4, NODE6, TC_ACT_OK, VIP4, VIP6, addrs, frontend,
    node_config, refused, spec,
};

/// The (VIP, client) pairs of both families.
const FAMILIES: [(&str, &str, &[&str; 3]); 2] = [
    (VIP4, "198.18.1.2", &BACKENDS4),
    (VIP6, "fd00:1::2", &BACKENDS6),
];

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Offset of the SCTP header in a frame of `addr`'s family.
fn l4_off(addr: SocketAddr) -> usize {
    if addr.is_ipv4() { 34 } else { 54 }
}

/// Runs `frame` and asserts it went to a backend of `backends` with only
/// its destination changed and a valid `CRC32c`; returns the backend.
fn to_backend(fx: &mut Fixture, frame: &Frame, backends: &[SocketAddr]) -> SocketAddr {
    let (verdict, out) = fx.run(&frame.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    let (src, backend) = verify_checksums(&out);
    assert_eq!(src, frame.src, "source unchanged");
    assert!(backends.contains(&backend), "{backend} is not a backend");
    assert_eq!(out, frame.with_dst(backend).bytes(), "DNAT bytes");
    backend
}

#[test]
fn association_is_translated_both_ways_with_its_crc32c_updated() {
    let Some(mut fx) = Fixture::new("association_is_translated_both_ways_with_its_crc32c_updated")
    else {
        return;
    };
    for (vip, client, backends) in FAMILIES {
        // Service port 3868, target port 8080: every packet's port changes.
        let backends = addrs(backends);
        fx.set_services(&[(frontend(vip, 3868, Protocol::Sctp), &backends)]);
        let client = sock(client, 40_000);
        let service = sock(vip, 3868);
        let init = Frame::sctp(&client.to_string(), &service.to_string(), SCTP_INIT);
        let backend = to_backend(&mut fx, &init, &backends);

        // The backend's INIT ACK: from the service again, `CRC32c` valid.
        let init_ack = Frame::sctp(&backend.to_string(), &client.to_string(), SCTP_INIT_ACK);
        let (verdict, out) = fx.run(&init_ack.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(verify_checksums(&out), (service, client));
        assert_eq!(out, init_ack.with_src(service).bytes(), "reverse NAT bytes");

        // DATA of the association: the same backend, from conntrack.
        let data = Frame::sctp(&client.to_string(), &service.to_string(), SCTP_DATA);
        assert_eq!(to_backend(&mut fx, &data, &backends), backend);

        // A large DATA chunk (the update does not depend on the bytes
        // after the ports, only on their number).
        let mut big = data.clone();
        big.payload = (0..1400_u32)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect();
        assert_eq!(to_backend(&mut fx, &big, &backends), backend);

        let ct = fx.conntrack();
        let service_entry = ct
            .iter()
            .find(|r| r.direction == "service" && r.source == client)
            .expect("service entry");
        assert_eq!(service_entry.protocol, "SCTP");
        assert!(service_entry.answered, "the INIT ACK answered the flow");
    }
    assert_eq!(fx.reason("nat_new"), 2);
    assert_eq!(fx.reason("nat_reply"), 2);
    assert_eq!(fx.reason("nat_established"), 4);
}

#[test]
fn address_only_translation_leaves_the_crc32c_as_it_was() {
    let Some(mut fx) = Fixture::new("address_only_translation_leaves_the_crc32c_as_it_was") else {
        return;
    };
    for (vip, client, backends) in FAMILIES {
        // Service port == target port: SCTP's checksum has no
        // pseudo-header, so only the addresses change.
        let backends = addrs(backends);
        fx.set_services(&[(frontend(vip, 8080, Protocol::Sctp), &backends)]);
        let init = Frame::sctp(
            &sock(client, 40_001).to_string(),
            &sock(vip, 8080).to_string(),
            SCTP_INIT,
        );
        let input = init.bytes();
        let (verdict, out) = fx.run(&input);
        assert_eq!(verdict, TC_ACT_OK);
        let off = l4_off(init.src);
        assert_eq!(out[off + 8..off + 12], input[off + 8..off + 12], "CRC32c");
        let (_, backend) = verify_checksums(&out);
        assert_eq!(out, init.with_dst(backend).bytes());
    }
}

#[test]
fn a_checksum_not_computed_yet_is_left_to_the_stack() {
    let Some(mut fx) = Fixture::new("a_checksum_not_computed_yet_is_left_to_the_stack") else {
        return;
    };
    for (vip, client, backends) in FAMILIES {
        // A local sender over veth (SCTP checksum offload) hands over
        // CHECKSUM_PARTIAL packets whose field is still 0; the CRC is
        // computed over the packet as it leaves, new ports included.
        let backends = addrs(backends);
        fx.set_services(&[(frontend(vip, 3868, Protocol::Sctp), &backends)]);
        let init = Frame::sctp(
            &sock(client, 40_002).to_string(),
            &sock(vip, 3868).to_string(),
            SCTP_INIT,
        );
        let off = l4_off(init.src);
        let mut input = init.bytes();
        input[off + 8..off + 12].fill(0);
        let (verdict, out) = fx.run(&input);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out[off + 8..off + 12], [0; 4], "field left for the stack");
        let backend_port = u16::from_be_bytes([out[off + 2], out[off + 3]]);
        assert_eq!(backend_port, 8080, "port translated");
        let mut expected = init.with_dst(sock(&out_addr(&out), 8080)).bytes();
        expected[off + 8..off + 12].fill(0);
        assert_eq!(out, expected);
    }
}

/// The destination address of a frame, as text.
fn out_addr(frame: &[u8]) -> String {
    if frame[12..14] == [0x08, 0x00] {
        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(&frame[30..34]).unwrap()).to_string()
    } else {
        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap()).to_string()
    }
}

#[test]
fn node_port_source_nat_rewrites_the_source_port_and_the_crc32c() {
    let Some(mut fx) = Fixture::new("node_port_source_nat_rewrites_the_source_port_and_the_crc32c")
    else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    for (node, client, backend) in [
        (NODE4, "198.18.9.2", "198.18.12.2:8080"),
        (NODE6, "fd00:9::2", "[fd00:12::2]:8080"),
    ] {
        let node_port = sock(node, 30_868);
        let backends = addrs(&[backend]);
        fx.set_specs(&[(
            frontend(node, 30_868, Protocol::Sctp),
            spec(FrontendKind::NodePort, &backends),
        )]);
        let client = sock(client, 45_000);
        let init = Frame::sctp(&client.to_string(), &node_port.to_string(), SCTP_INIT);
        let (verdict, out) = fx.run(&init.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        let (src, dst) = verify_checksums(&out);
        assert_eq!(dst, backends[0]);
        assert_eq!(src.ip(), node_port.ip(), "source NAT to the node address");
        assert_ne!(src.port(), client.port(), "source port from the SNAT pool");
        assert_eq!(out, init.with_dst(dst).with_src(src).bytes());

        let init_ack = Frame::sctp(&backends[0].to_string(), &src.to_string(), SCTP_INIT_ACK);
        let (verdict, out) = fx.run(&init_ack.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(verify_checksums(&out), (node_port, client));
        assert_eq!(out, init_ack.with_src(node_port).with_dst(client).bytes());
    }
}

#[test]
fn only_an_init_opens_an_association_and_abort_closes_it() {
    let Some(mut fx) = Fixture::new("only_an_init_opens_an_association_and_abort_closes_it") else {
        return;
    };
    for (vip, client, backends) in FAMILIES {
        let backends = addrs(backends);
        fx.set_services(&[(frontend(vip, 3868, Protocol::Sctp), &backends)]);
        let client = sock(client, 40_003);
        let service = sock(vip, 3868);
        // DATA and SHUTDOWN without an association: refused (ICMP port
        // unreachable), no state.
        for chunk in [SCTP_DATA, SCTP_SHUTDOWN] {
            let stray = Frame::sctp(&client.to_string(), &service.to_string(), chunk);
            refused(&mut fx, &stray, "a chunk of no association");
        }
        assert!(
            fx.conntrack().iter().all(|r| r.source != client),
            "no state for stray chunks"
        );
        let init = Frame::sctp(&client.to_string(), &service.to_string(), SCTP_INIT);
        let backend = to_backend(&mut fx, &init, &backends);
        let abort = Frame::sctp(&client.to_string(), &service.to_string(), SCTP_ABORT);
        assert_eq!(to_backend(&mut fx, &abort, &backends), backend);
        let ct = fx.conntrack();
        let entry = ct
            .iter()
            .find(|r| r.direction == "service" && r.source == client)
            .expect("service entry");
        assert!(entry.closing, "ABORT closes the flow as a TCP reset does");
    }
    assert_eq!(fx.reason("reject_no_flow"), 4);
}

#[test]
fn crc32c_of_the_frames_is_checked_for_real() {
    // The check the other tests rely on fails on a corrupted packet.
    let frame = Frame::sctp("198.18.1.2:1", "198.19.0.10:2", SCTP_INIT).bytes();
    assert_sctp_checksum(&frame[34..]);
    let mut bad = frame[34..].to_vec();
    bad[3] ^= 1;
    assert!(std::panic::catch_unwind(|| assert_sctp_checksum(&bad)).is_err());
}
