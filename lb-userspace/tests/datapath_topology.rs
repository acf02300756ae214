//! Datapath tests (root, `BPF_PROG_TEST_RUN`) of the topology-facing entry
//! points (issue 12): the reply-only egress program, the program for
//! devices without an Ethernet header, VLAN-tagged frames and frames for
//! another host's MAC; refusals that must not be sent; lengths checked
//! before any state is created.
//!
//! `lb_tc_l3` under `BPF_PROG_TEST_RUN`: the test run always sets
//! `skb->protocol` by reading bytes 12-13 of the data as an Ethernet
//! `EtherType` (`eth_type_trans`), while the program's data starts at the
//! IP header. The clients and backends there have addresses whose bytes at
//! those offsets spell the `EtherType` of their family (IPv4: `8.0.x.x`,
//! bytes 12-13 of the IPv4 header are the first two of the source; IPv6:
//! bytes 4-5 of the source are `86dd`), so that the program sees what a
//! real L3 device would give it.

mod support;

use lb_common::prog_names;
use lb_userspace::model::Protocol;

use support::frames::{
    Frame, TCP_SYN, assert_port_unreachable, assert_tcp_reset, verify_checksums,
};
use support::prog_test::{
    BACKENDS4, BACKENDS6, Fixture, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, VIP4, VIP6, addrs,
    frontend,
};

fn services(fx: &mut Fixture) {
    fx.set_services(&[
        (frontend(VIP4, 80, Protocol::Tcp), &addrs(&BACKENDS4)),
        (frontend(VIP4, 53, Protocol::Udp), &addrs(&BACKENDS4)),
        (frontend(VIP6, 80, Protocol::Tcp), &addrs(&BACKENDS6)),
        (frontend(VIP6, 53, Protocol::Udp), &addrs(&BACKENDS6)),
    ]);
}

/// Client -> VIP frames, TCP and UDP, both families.
fn requests() -> [Frame; 4] {
    [
        Frame::tcp("198.18.1.2:40000", "198.19.0.10:80", TCP_SYN),
        Frame::udp("198.18.1.2:40001", "198.19.0.10:53"),
        Frame::tcp("[fd00:1::2]:40000", "[fd00:96::10]:80", TCP_SYN),
        Frame::udp("[fd00:1::2]:40001", "[fd00:96::10]:53"),
    ]
}

#[test]
fn egress_translates_replies_only_and_once() {
    let Some(mut fx) = Fixture::new("egress_translates_replies_only_and_once") else {
        return;
    };
    services(&mut fx);
    for request in requests() {
        let what = format!("{:?} {}", request.proto, request.dst);
        // At egress a packet to a frontend is not translated (frontends are
        // translated where packets enter the node).
        let frame = request.bytes();
        let flows = fx.conntrack().len();
        let (verdict, out) = fx.run_named(prog_names::TC_LB_EGRESS, &frame);
        assert_eq!((verdict, &out), (TC_ACT_OK, &frame), "{what}: egress DNAT");
        assert_eq!(fx.conntrack().len(), flows, "{what}: egress created state");
        // The flow is created at ingress.
        let (verdict, out) = fx.run(&frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}: ingress");
        let (_, backend) = verify_checksums(&out);
        // The backend's reply, as it leaves towards the client without
        // having been translated on its way in (an unattached overlay).
        let reply = request.with_dst(backend).reply();
        let (verdict, out) = fx.run_named(prog_names::TC_LB_EGRESS, &reply.bytes());
        assert_eq!(verdict, TC_ACT_OK, "{what}: egress reply");
        assert_eq!(
            out,
            reply.with_src(request.dst).bytes(),
            "{what}: reply translated"
        );
        assert_eq!(verify_checksums(&out), (request.dst, request.src));
        // A reply translated at ingress already is left alone at egress.
        let (verdict, again) = fx.run_named(prog_names::TC_LB_EGRESS, &out);
        assert_eq!(
            (verdict, &again),
            (TC_ACT_OK, &out),
            "{what}: translated twice"
        );
    }
}

#[test]
fn vlan_tagged_frames_pass_untouched() {
    let Some(mut fx) = Fixture::new("vlan_tagged_frames_pass_untouched") else {
        return;
    };
    services(&mut fx);
    let mut n = 0;
    for request in requests() {
        for tpid in [0x8100_u16, 0x88a8] {
            let mut frame = request.bytes();
            // The tag sits between the MACs and the EtherType.
            let tag = [tpid.to_be_bytes(), 0x0064_u16.to_be_bytes()].concat();
            frame.splice(12..12, tag);
            for program in [prog_names::TC_LB, prog_names::TC_LB_EGRESS] {
                let (verdict, out) = fx.run_named(program, &frame);
                assert_eq!((verdict, &out), (TC_ACT_OK, &frame), "{program} {tpid:#x}");
                n += 1;
            }
        }
    }
    assert_eq!(fx.reason("pass_vlan"), n);
    assert!(fx.conntrack().is_empty());
}

/// The frame without its Ethernet header.
fn l3(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

/// An Ethernet header put back in front of an L3 packet, for the checks
/// written for frames.
fn with_eth(packet: &[u8], v4: bool) -> Vec<u8> {
    let mut frame = support::frames::eth_header(v4);
    frame.extend(packet);
    frame
}

#[test]
fn l3_program_translates_packets_without_ethernet_header() {
    let Some(mut fx) = Fixture::new("l3_program_translates_packets_without_ethernet_header") else {
        return;
    };
    // Backends whose replies also spell the EtherType (see the top).
    let (b4, b6) = (addrs(&["8.0.2.2:8080"]), addrs(&["[fd00:2:86dd::2]:8080"]));
    fx.set_services(&[
        (frontend(VIP4, 80, Protocol::Tcp), &b4),
        (frontend(VIP4, 53, Protocol::Udp), &b4),
        (frontend(VIP6, 80, Protocol::Tcp), &b6),
        (frontend(VIP6, 53, Protocol::Udp), &b6),
    ]);
    let requests = [
        Frame::tcp("8.0.1.2:40000", "198.19.0.10:80", TCP_SYN),
        Frame::udp("8.0.1.2:40001", "198.19.0.10:53"),
        Frame::tcp("[fd00:0:86dd::2]:40000", "[fd00:96::10]:80", TCP_SYN),
        Frame::udp("[fd00:0:86dd::2]:40001", "[fd00:96::10]:53"),
    ]
    .map(|frame| Frame {
        // BPF_PROG_TEST_RUN refused the 32-byte IPv4 UDP packet with
        // EINVAL (measured); a DNS-sized payload is long enough.
        payload: vec![0x5a; 40],
        ..frame
    });
    for request in requests {
        let what = format!("{:?} {}", request.proto, request.dst);
        let v4 = request.src.is_ipv4();
        let (verdict, out) = fx.run_named(prog_names::TC_LB_L3, &l3(&request.bytes()));
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        let (src, backend) = verify_checksums(&with_eth(&out, v4));
        assert_eq!(src, request.src, "{what}: source kept");
        assert!(
            b4.contains(&backend) || b6.contains(&backend),
            "{what}: {backend}"
        );
        assert_eq!(out, l3(&request.with_dst(backend).bytes()), "{what}: DNAT");
        // The reply, on the L3 device (ingress) and at its egress.
        let reply = request.with_dst(backend).reply();
        let expected = l3(&reply.with_src(request.dst).bytes());
        for program in [prog_names::TC_LB_L3, prog_names::TC_LB_L3_EGRESS] {
            let (verdict, out) = fx.run_named(program, &l3(&reply.bytes()));
            assert_eq!(
                (verdict, &out),
                (TC_ACT_OK, &expected),
                "{what}: {program} reply"
            );
        }
        // An unserved port of the service address: refused, the reply
        // built without an Ethernet header.
        let unserved = request.with_dst(std::net::SocketAddr::new(request.dst.ip(), 81));
        let offending = unserved.bytes();
        let (verdict, out) = fx.run_named(prog_names::TC_LB_L3, &l3(&offending));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: refused");
        // The checks expect the offending frame's MACs swapped: put them
        // on the fake header.
        let mut frame = with_eth(&out, v4);
        frame[..6].copy_from_slice(&offending[6..12]);
        frame[6..12].copy_from_slice(&offending[..6]);
        if request.proto == Protocol::Udp {
            assert_port_unreachable(&frame, &offending);
        } else {
            assert_tcp_reset(&frame, &offending);
        }
    }
}

#[test]
fn frames_for_another_hosts_mac_pass_untouched() {
    let Some(mut fx) = Fixture::new("frames_for_another_hosts_mac_pass_untouched") else {
        return;
    };
    services(&mut fx);
    // Received on the loopback device (index 1, MAC all zeros): a frame to
    // 02:00:00:00:00:01 is for another host (`PACKET_OTHERHOST`), one to
    // the device's own MAC is ours.
    for request in requests() {
        let what = format!("{:?} {}", request.proto, request.dst);
        let foreign = request.bytes();
        let (verdict, out) = fx.run_received(prog_names::TC_LB, &foreign, 1);
        assert_eq!(
            (verdict, &out),
            (TC_ACT_OK, &foreign),
            "{what}: foreign MAC"
        );
        let mut ours = foreign.clone();
        ours[..6].fill(0);
        let (verdict, out) = fx.run_received(prog_names::TC_LB, &ours, 1);
        assert_eq!(verdict, TC_ACT_OK, "{what}: own MAC");
        assert_ne!(
            verify_checksums(&out).1,
            request.dst,
            "{what}: not translated"
        );
    }
    assert_eq!(fx.reason("pass_other_host"), 4);
    assert_eq!(fx.reason("nat_new"), 4);
}

/// A frame to a port `web`'s address does not serve, from SRC.
fn unserved(src: &str) -> Vec<u8> {
    let dst = if src.starts_with('[') {
        "[fd00:96::10]:81"
    } else {
        "198.19.0.10:81"
    };
    Frame::udp(src, dst).bytes()
}

#[test]
fn refusals_are_never_sent_to_sources_that_must_not_be_answered() {
    let Some(mut fx) = Fixture::new("refusals_are_never_sent_to_sources_that_must_not_be_answered")
    else {
        return;
    };
    services(&mut fx);
    let sources = [
        "224.0.0.1:5353",
        "239.1.2.3:40000",
        "255.255.255.255:40000",
        "240.0.0.1:40000",
        "0.0.0.0:68",
        "0.1.2.3:40000",
        "127.0.0.1:40000",
        "198.19.0.10:40000", // the service address itself (source = destination)
        "[::]:40000",
        "[::1]:40000",
        "[ff02::1]:40000",
        "[ff05::2]:40000",
        "[::ffff:198.18.1.2]:40000",
    ];
    let mut frames: Vec<Vec<u8>> = sources.iter().map(|s| unserved(s)).collect();
    for src in ["198.18.1.2:40000", "[fd00:1::2]:40000"] {
        // A broadcast and a multicast destination MAC, a multicast source MAC.
        let mut broadcast = unserved(src);
        broadcast[..6].fill(0xff);
        let mut multicast = unserved(src);
        multicast[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
        let mut group_source = unserved(src);
        group_source[6] = 0x03;
        frames.extend([broadcast, multicast, group_source]);
    }
    for frame in &frames {
        let (verdict, _) = fx.run(frame);
        assert_eq!(verdict, TC_ACT_SHOT, "answered: {frame:02x?}");
    }
    assert_eq!(
        fx.reason("drop_reject_unanswerable"),
        u64::try_from(frames.len()).unwrap()
    );
    // A unicast client is still answered.
    for src in ["198.18.1.2:40000", "[fd00:1::2]:40000"] {
        let offending = unserved(src);
        let (verdict, reply) = fx.run(&offending);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{src}");
        assert_port_unreachable(&reply, &offending);
    }
}

#[test]
fn refusals_are_rate_limited_per_interface() {
    let Some(mut fx) = Fixture::new("refusals_are_rate_limited_per_interface") else {
        return;
    };
    services(&mut fx);
    let offending = unserved("198.18.1.2:40000");
    let started = std::time::Instant::now();
    let mut answered = 0_u64;
    let sent = 1500_u64;
    for _ in 0..sent {
        let (verdict, _) = fx.run(&offending);
        if verdict == TC_ACT_REDIRECT {
            answered += 1;
        } else {
            assert_eq!(verdict, TC_ACT_SHOT);
        }
    }
    let elapsed = started.elapsed();
    // A burst of 1000, then 100 a second (the coarse clock may lag a tick).
    let refill = u64::try_from(elapsed.as_millis() / 10).unwrap() + 2;
    eprintln!("{answered} of {sent} answered in {elapsed:?}");
    assert!(
        (1000..=1000 + refill).contains(&answered),
        "{answered} answered in {elapsed:?}"
    );
    assert_eq!(fx.reason("reject"), answered);
    assert_eq!(fx.reason("drop_reject_rate"), sent - answered);
}

/// Sets the 16-bit big-endian field at OFF of FRAME to VALUE.
fn set16(frame: &mut [u8], off: usize, value: u16) {
    frame[off..off + 2].copy_from_slice(&value.to_be_bytes());
}

#[test]
fn inconsistent_lengths_are_passed_before_state_is_created() {
    let Some(mut fx) = Fixture::new("inconsistent_lengths_are_passed_before_state_is_created")
    else {
        return;
    };
    services(&mut fx);
    let [tcp4, udp4, tcp6, udp6] = requests().map(|f| f.bytes());
    // (what, frame): header fields that disagree with the packet. (Checksums
    // are not fixed up: the program must not get as far as to look.)
    let mut bad = Vec::new();
    for (what, frame) in [("tcp4", &tcp4), ("udp4", &udp4)] {
        let total = u16::try_from(frame.len() - 14).unwrap();
        for (name, value) in [
            ("tot_len short", 19),
            ("tot_len long", total + 1),
            ("tot_len 0", 0),
        ] {
            let mut f = frame.clone();
            set16(&mut f, 16, value);
            bad.push((format!("{what} {name}"), f));
        }
    }
    for (what, frame) in [("tcp6", &tcp6), ("udp6", &udp6)] {
        let payload = u16::try_from(frame.len() - 54).unwrap();
        for (name, value) in [("payload_len long", payload + 1), ("payload_len 0", 0)] {
            let mut f = frame.clone();
            set16(&mut f, 18, value);
            bad.push((format!("{what} {name}"), f));
        }
    }
    for (what, frame, l4) in [("tcp4", &tcp4, 34), ("tcp6", &tcp6, 54)] {
        for (name, doff) in [("doff 4", 4_u8), ("doff 15", 15)] {
            let mut f = frame.clone();
            f[l4 + 12] = doff << 4;
            bad.push((format!("{what} {name}"), f));
        }
    }
    for (what, frame, l4) in [("udp4", &udp4, 34), ("udp6", &udp6, 54)] {
        let len = u16::try_from(frame.len() - l4).unwrap();
        for (name, value) in [("udp len 7", 7), ("udp len long", len + 1)] {
            let mut f = frame.clone();
            set16(&mut f, l4 + 4, value);
            bad.push((format!("{what} {name}"), f));
        }
    }
    for (what, frame) in &bad {
        let (verdict, out) = fx.run(frame);
        assert_eq!((verdict, &out), (TC_ACT_OK, frame), "{what}");
    }
    assert_eq!(
        fx.reason("pass_bad_length"),
        u64::try_from(bad.len()).unwrap()
    );
    assert!(fx.conntrack().is_empty(), "state created for a bad length");
    // Link padding after the IP packet is fine (the frame is longer than
    // the IP length says).
    let mut padded = tcp4.clone();
    padded.extend([0; 6]);
    let (verdict, out) = fx.run(&padded);
    assert_eq!(verdict, TC_ACT_OK);
    assert_ne!(out[30..34], padded[30..34], "padded: not translated");
    // BIG TCP: a zero IP length on a GSO packet is accepted, both families.
    for (what, frame, off, dst) in [("tcp4", &tcp4, 16, 30..34), ("tcp6", &tcp6, 18, 38..54)] {
        let mut big = frame.clone();
        set16(&mut big, off, 0);
        if off == 16 {
            // Keep the IPv4 header checksum right for the zero length.
            set16(&mut big, 24, 0);
            let sum = support::frames::checksum(&big[14..34], 0);
            set16(&mut big, 24, sum);
        }
        let (verdict, out) = fx.run_gso(&big, 1400);
        assert_eq!(verdict, TC_ACT_OK, "{what} BIG TCP");
        assert_ne!(out[dst.clone()], big[dst], "{what} BIG TCP: not translated");
    }
}

/// Removes a pin directory on drop.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = lb_userspace::datapath::loader::cleanup(&self.0, &[]);
    }
}

/// The per-service counters are sized from `--max-services` (they cost 16
/// bytes per entry per possible CPU), and rev-NAT ids stay below their size.
#[test]
fn service_counters_are_sized_from_the_frontend_limit() {
    use std::collections::BTreeMap;

    use lb_userspace::datapath::{loader, maps::Maps};
    use lb_userspace::model::FrontendKind;

    if !support::pins::require_privileged("service_counters_are_sized_from_the_frontend_limit") {
        return;
    }
    let pin_path =
        std::path::PathBuf::from(format!("/sys/fs/bpf/lb-dp-stats-{}", std::process::id()));
    let _cleanup = Cleanup(pin_path.clone());
    let capacities = loader::Capacities {
        services: 1,
        ..loader::Capacities::default()
    };
    assert_eq!(capacities.stats_entries(), 5);
    let mut ebpf = loader::load_with(&pin_path, &capacities).expect("load");
    let stats_map = aya::maps::MapInfo::from_pin(pin_path.join(lb_common::map_names::SVC_STATS))
        .expect("stats map pinned");
    assert_eq!(stats_map.max_entries(), 5);
    let maps = Maps::from_ebpf(&mut ebpf).expect("maps");
    let state = maps.read_state().expect("state");
    assert_eq!(state.rev_nat_id_limit(), 4);
    // Five frontends: four get ids 1..=4, the fifth is reported, not given
    // an id the counters cannot hold.
    let backends = addrs(&BACKENDS4[..1]);
    let desired: BTreeMap<_, _> = (80..85)
        .map(|port| {
            (
                frontend(VIP4, port, Protocol::Tcp),
                support::prog_test::spec(FrontendKind::ClusterIp, &backends),
            )
        })
        .collect();
    let plan = lb_userspace::plan::diff(&state, &desired);
    assert_eq!(plan.problems.len(), 1, "{:?}", plan.problems);
    assert!(
        plan.problems[0].contains("no free rev-NAT id (limit 4)"),
        "{:?}",
        plan.problems
    );
    let ids: Vec<u32> = plan
        .ops
        .iter()
        .filter_map(|op| match op {
            lb_userspace::plan::Op::PutRevNat { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert!(ids.iter().all(|id| (1..=4).contains(id)), "{ids:?}");
}
