//! Datapath tests (root) of the XDP program (`lb_xdp`, `--xdp`): the real
//! program run with `BPF_PROG_TEST_RUN` on crafted frames, next to `lb_tc`
//! of the same object on the same maps (see `support::prog_test`).
//!
//! Each test runs in the private network namespace of its thread (the
//! fixture unshares one), where it builds the devices and routes the FIB
//! lookup answers from: `up0` (the uplink the frames come in on, towards
//! the clients) and `be0` (towards the backends' node), with permanent
//! neighbour entries, so the lookup is complete and the frame leaves by
//! `XDP_TX` or `XDP_REDIRECT`. Asserted: the action, the exact bytes (MACs,
//! TTL, addresses, ports, checksums computed from scratch), the XDP
//! counters and the verdict counters, and the conntrack entries TC then
//! continues from (and the other way round).

mod support;

use std::{net::SocketAddr, process::Command, time::Duration};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::xdp::stat;
use lb_userspace::{
    datapath::{loader, xdp},
    model::{FrontendKind, Protocol},
};

use support::frames::{Frame, TCP_ACK, TCP_SYN, verify_checksums};
use support::process::run_ok;
use support::prog_test::{Fixture, NODE4, NODE6, TC_ACT_OK, addrs, frontend, node_config, spec};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// MACs of this namespace's devices and of the next hops behind them.
const UP0_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0a, 0x00];
const BE0_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0b, 0x00];
const CLIENT_ROUTER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0a, 0x01];
const BACKEND_NODE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0b, 0x01];

const CLIENT4: &str = "203.0.113.7:45000";
const CLIENT6: &str = "[2001:db8:7::7]:45000";
const BACKEND4: &str = "198.18.12.2:8080";
const BACKEND6: &str = "[fd00:12::2]:8080";

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

/// The devices and routes of this thread's namespace (see the module
/// comment). `backends_via_uplink`: the backends' node is reached through
/// `up0` too (one uplink: replies and requests leave by `XDP_TX`).
fn topology(fx: &mut Fixture, backends_via_uplink: bool) {
    ip(&["link", "set", "lo", "up"]);
    for (dev, peer, mac) in [("up0", "up1", UP0_MAC), ("be0", "be1", BE0_MAC)] {
        ip(&[
            "link",
            "add",
            dev,
            "address",
            &mac_str(mac),
            "type",
            "veth",
            "peer",
            "name",
            peer,
        ]);
        ip(&["link", "set", dev, "up"]);
        ip(&["link", "set", peer, "up"]);
    }
    ip(&["addr", "add", "198.18.0.1/24", "dev", "up0"]);
    ip(&["addr", "add", "fd00::1/64", "dev", "up0", "nodad"]);
    ip(&["addr", "add", "198.18.1.1/24", "dev", "be0"]);
    ip(&["addr", "add", "fd00:1::1/64", "dev", "be0", "nodad"]);
    // Next hops, resolved for good.
    for (addr, mac, dev) in [
        ("198.18.0.254", CLIENT_ROUTER_MAC, "up0"),
        ("fd00::fe", CLIENT_ROUTER_MAC, "up0"),
        ("198.18.1.2", BACKEND_NODE_MAC, "be0"),
        ("fd00:1::2", BACKEND_NODE_MAC, "be0"),
    ] {
        ip(&[
            "neigh",
            "add",
            addr,
            "lladdr",
            &mac_str(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    ip(&["route", "add", "203.0.113.0/24", "via", "198.18.0.254"]);
    ip(&["-6", "route", "add", "2001:db8:7::/64", "via", "fd00::fe"]);
    if backends_via_uplink {
        ip(&["route", "add", "198.18.12.0/24", "via", "198.18.0.254"]);
        ip(&["-6", "route", "add", "fd00:12::/64", "via", "fd00::fe"]);
    } else {
        ip(&["route", "add", "198.18.12.0/24", "via", "198.18.1.2"]);
        ip(&["-6", "route", "add", "fd00:12::/64", "via", "fd00:1::2"]);
    }
    for path in [
        "/proc/sys/net/ipv4/conf/all/forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        std::fs::write(path, "1").expect("forwarding in the test's namespace");
    }
    let added =
        xdp::set_redirect_targets(&mut fx.ebpf, &["up0".into(), "be0".into()]).expect("devmap");
    assert_eq!(added, 2);
}

/// Runs `lb_xdp` once on `frame` as received on `iface` (index into
/// `xdp_md.ingress_ifindex`); the action and the frame as left.
fn run_xdp_on(fx: &mut Fixture, frame: &[u8], iface: Option<&str>) -> (u32, Vec<u8>) {
    // `struct xdp_md`: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&u32::try_from(frame.len()).unwrap().to_ne_bytes());
    if let Some(iface) = iface {
        let index = loader::if_index(iface).expect("device");
        ctx[12..16].copy_from_slice(&index.to_ne_bytes());
    }
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: iface.map(|_| &ctx[..]),
        ..TestRunOptions::default()
    };
    let program = xdp::program_mut(&mut fx.ebpf).expect("lb_xdp");
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN (xdp)");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// The XDP counter `index` (`xdp::stat`).
fn xdp_count(fx: &Fixture, index: u32) -> u64 {
    let stats = xdp::stats(&fx.pin_path).expect("xdp stats pinned");
    stats[index as usize].1
}

/// `frame` as it leaves towards a next hop: MACs set, TTL / hop limit one
/// less (the IPv4 header checksum is verified by `verify_checksums`).
fn as_forwarded(frame: &[u8], src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    if out[12..14] == [0x08, 0x00] {
        out[22] -= 1;
        out[24..26].copy_from_slice(&[0, 0]);
        let sum = support::frames::checksum(&out[14..34], 0);
        out[24..26].copy_from_slice(&sum.to_be_bytes());
    } else {
        out[21] -= 1;
    }
    out
}

fn node_port(fx: &mut Fixture, proto: Protocol) {
    fx.maps.write_config(&node_config()).unwrap();
    fx.set_specs(&[
        (
            frontend(NODE4, 30080, proto),
            spec(FrontendKind::NodePort, &addrs(&[BACKEND4])),
        ),
        (
            frontend(NODE6, 30080, proto),
            spec(FrontendKind::NodePort, &addrs(&[BACKEND6])),
        ),
    ]);
}

fn node_port_addr(client: &str) -> String {
    if client.starts_with('[') {
        format!("[{NODE6}]:30080")
    } else {
        format!("{NODE4}:30080")
    }
}

#[test]
fn xdp_node_port_new_established_and_reply_are_forwarded_at_the_driver() {
    let Some(mut fx) = Fixture::new("xdp_node_port_new_established_and_reply") else {
        return;
    };
    topology(&mut fx, false);
    node_port(&mut fx, Protocol::Tcp);
    for (client, backend) in [(CLIENT4, BACKEND4), (CLIENT6, BACKEND6)] {
        let backend: SocketAddr = backend.parse().unwrap();
        let client_addr: SocketAddr = client.parse().unwrap();
        let np: SocketAddr = node_port_addr(client).parse().unwrap();
        // New flow: source NAT (ETP=Cluster, remote backend) and DNAT,
        // out through be0 to the backends' node.
        let syn = Frame::tcp(client, &np.to_string(), TCP_SYN);
        let (action, out) = run_xdp_on(&mut fx, &syn.bytes(), Some("up0"));
        assert_eq!(action, XDP_REDIRECT, "{client}: new flow redirected");
        let (snat, dst) = verify_checksums(&out);
        assert_eq!(dst, backend);
        assert_eq!(snat.ip(), np.ip(), "source NAT to the node address");
        let translated = syn.with_dst(backend).with_src(snat).bytes();
        assert_eq!(out, as_forwarded(&translated, BE0_MAC, BACKEND_NODE_MAC));

        // Established: the same translation.
        let ack = Frame::tcp(client, &np.to_string(), TCP_ACK);
        let (action, out) = run_xdp_on(&mut fx, &ack.bytes(), Some("up0"));
        assert_eq!(action, XDP_REDIRECT);
        let translated = ack.with_dst(backend).with_src(snat).bytes();
        assert_eq!(out, as_forwarded(&translated, BE0_MAC, BACKEND_NODE_MAC));

        // The reply, back in through be0: reverse translated, out of up0
        // towards the client's router.
        let reply = Frame::tcp(&backend.to_string(), &snat.to_string(), TCP_SYN | TCP_ACK);
        let (action, out) = run_xdp_on(&mut fx, &reply.bytes(), Some("be0"));
        assert_eq!(action, XDP_REDIRECT, "{client}: reply redirected");
        assert_eq!(verify_checksums(&out), (np, client_addr));
        let restored = reply.with_src(np).with_dst(client_addr).bytes();
        assert_eq!(out, as_forwarded(&restored, UP0_MAC, CLIENT_ROUTER_MAC));
    }
    assert_eq!(xdp_count(&fx, stat::REDIRECT), 6);
    assert_eq!(xdp_count(&fx, stat::TO_TC), 0);
    assert_eq!(fx.reason("nat_new"), 2);
    assert_eq!(fx.reason("nat_established"), 2);
    assert_eq!(fx.reason("nat_reply"), 2);
}

#[test]
fn xdp_one_uplink_sends_both_ways_back_out_with_xdp_tx() {
    let Some(mut fx) = Fixture::new("xdp_one_uplink_sends_both_ways_back_out_with_xdp_tx") else {
        return;
    };
    topology(&mut fx, true);
    node_port(&mut fx, Protocol::Udp);
    for (client, backend) in [(CLIENT4, BACKEND4), (CLIENT6, BACKEND6)] {
        let backend: SocketAddr = backend.parse().unwrap();
        let client_addr: SocketAddr = client.parse().unwrap();
        let np: SocketAddr = node_port_addr(client).parse().unwrap();
        let request = Frame::udp(client, &np.to_string());
        let (action, out) = run_xdp_on(&mut fx, &request.bytes(), Some("up0"));
        assert_eq!(action, XDP_TX, "{client}: out the way it came");
        let (snat, dst) = verify_checksums(&out);
        assert_eq!(dst, backend);
        let translated = request.with_dst(backend).with_src(snat).bytes();
        assert_eq!(out, as_forwarded(&translated, UP0_MAC, CLIENT_ROUTER_MAC));
        let reply = Frame::udp(&backend.to_string(), &snat.to_string());
        let (action, out) = run_xdp_on(&mut fx, &reply.bytes(), Some("up0"));
        assert_eq!(action, XDP_TX);
        let restored = reply.with_src(np).with_dst(client_addr).bytes();
        assert_eq!(out, as_forwarded(&restored, UP0_MAC, CLIENT_ROUTER_MAC));
    }
    assert_eq!(xdp_count(&fx, stat::TX), 4);
}

#[test]
fn xdp_flow_continues_at_tc_and_tc_flow_continues_at_xdp() {
    let Some(mut fx) = Fixture::new("xdp_flow_continues_at_tc_and_tc_flow_continues_at_xdp") else {
        return;
    };
    topology(&mut fx, false);
    node_port(&mut fx, Protocol::Tcp);
    for (client, backend) in [(CLIENT4, BACKEND4), (CLIENT6, BACKEND6)] {
        let backend: SocketAddr = backend.parse().unwrap();
        let client_addr: SocketAddr = client.parse().unwrap();
        let np: SocketAddr = node_port_addr(client).parse().unwrap();
        // Started in XDP, continued by TC (XDP turned off, say).
        let syn = Frame::tcp(client, &np.to_string(), TCP_SYN);
        let (action, out) = run_xdp_on(&mut fx, &syn.bytes(), Some("up0"));
        assert_eq!(action, XDP_REDIRECT);
        let (snat, _) = verify_checksums(&out);
        let reply = Frame::tcp(&backend.to_string(), &snat.to_string(), TCP_SYN | TCP_ACK);
        let (verdict, out) = fx.run(&reply.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, reply.with_src(np).with_dst(client_addr).bytes());
        let ack = Frame::tcp(client, &np.to_string(), TCP_ACK);
        let (verdict, out) = fx.run(&ack.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            out,
            ack.with_dst(backend).with_src(snat).bytes(),
            "TC kept XDP's SNAT"
        );

        // Started at TC, continued by XDP (XDP turned on mid-flow).
        let other: SocketAddr = SocketAddr::new(client_addr.ip(), 45001);
        let syn = Frame::tcp(&other.to_string(), &np.to_string(), TCP_SYN);
        let (verdict, out) = fx.run(&syn.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        let (snat, dst) = verify_checksums(&out);
        assert_eq!(dst, backend);
        let reply = Frame::tcp(&backend.to_string(), &snat.to_string(), TCP_SYN | TCP_ACK);
        let (action, out) = run_xdp_on(&mut fx, &reply.bytes(), Some("be0"));
        assert_eq!(action, XDP_REDIRECT);
        let restored = reply.with_src(np).with_dst(other).bytes();
        assert_eq!(out, as_forwarded(&restored, UP0_MAC, CLIENT_ROUTER_MAC));
        let ack = Frame::tcp(&other.to_string(), &np.to_string(), TCP_ACK);
        let (action, out) = run_xdp_on(&mut fx, &ack.bytes(), Some("up0"));
        assert_eq!(action, XDP_REDIRECT);
        let translated = ack.with_dst(backend).with_src(snat).bytes();
        assert_eq!(out, as_forwarded(&translated, BE0_MAC, BACKEND_NODE_MAC));
    }
    // Two flows per family, one conntrack pair (service + reply) each.
    assert_eq!(fx.conntrack().len(), 8);
}

#[test]
fn xdp_translates_and_passes_what_the_fib_cannot_place() {
    let Some(mut fx) = Fixture::new("xdp_translates_and_passes_what_the_fib_cannot_place") else {
        return;
    };
    // No devices, no routes: the stack gets the translated frame, as TC's
    // default hands every translated packet to it.
    node_port(&mut fx, Protocol::Tcp);
    for (client, backend) in [(CLIENT4, BACKEND4), (CLIENT6, BACKEND6)] {
        let backend: SocketAddr = backend.parse().unwrap();
        let np = node_port_addr(client);
        let syn = Frame::tcp(client, &np, TCP_SYN);
        let (action, out) = run_xdp_on(&mut fx, &syn.bytes(), None);
        assert_eq!(action, XDP_PASS);
        let (snat, dst) = verify_checksums(&out);
        assert_eq!(dst, backend);
        assert_eq!(out, syn.with_dst(backend).with_src(snat).bytes());
    }
    assert_eq!(xdp_count(&fx, stat::PASS_TRANSLATED), 2);
    assert_eq!(fx.reason("nat_new"), 2);
}

/// Frames XDP leaves alone, each with why.
fn odd_frames() -> Vec<(&'static str, Vec<u8>)> {
    let np4 = format!("{NODE4}:30080");
    let np6 = format!("[{NODE6}]:30080");
    let syn4 = Frame::tcp(CLIENT4, &np4, TCP_SYN).bytes();
    let syn6 = Frame::tcp(CLIENT6, &np6, TCP_SYN).bytes();
    let mut frames = Vec::new();
    frames.push((
        "not a service",
        Frame::tcp(CLIENT4, "198.18.0.9:80", TCP_SYN).bytes(),
    ));
    frames.push((
        "not a service (v6)",
        Frame::udp(CLIENT6, "[fd00::9]:53").bytes(),
    ));
    frames.push((
        "unserved port of a service address (TC refuses it)",
        Frame::tcp(CLIENT4, "198.19.0.10:81", TCP_SYN).bytes(),
    ));
    let mut arp = syn4.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    frames.push(("ARP", arp));
    let mut vlan = syn4[..12].to_vec();
    vlan.extend([0x81, 0x00, 0x00, 0x07]);
    vlan.extend(&syn4[12..]);
    frames.push(("VLAN tag", vlan));
    let mut multicast = syn4.clone();
    multicast[0] = 0x01;
    frames.push(("multicast destination MAC", multicast));
    let mut fragment = syn4.clone();
    fragment[20] = 0x20; // more fragments
    frames.push(("IPv4 fragment", fragment));
    let mut options = syn4.clone();
    options[14] = 0x46;
    frames.push(("IPv4 options", options));
    let mut ext = syn6.clone();
    ext[20] = 0; // hop-by-hop options
    frames.push(("IPv6 extension header", ext));
    let mut frag6 = syn6.clone();
    frag6[20] = 44;
    frames.push(("IPv6 fragment header", frag6));
    let mut icmp = syn4.clone();
    icmp[23] = 1;
    frames.push(("ICMP", icmp));
    frames.push(("truncated", syn4[..40].to_vec()));
    frames
}

#[test]
fn xdp_passes_everything_it_does_not_handle_byte_for_byte() {
    let Some(mut fx) = Fixture::new("xdp_passes_everything_it_does_not_handle_byte_for_byte")
    else {
        return;
    };
    topology(&mut fx, false);
    fx.maps.write_config(&node_config()).unwrap();
    fx.set_specs(&[
        (
            frontend(NODE4, 30080, Protocol::Tcp),
            spec(FrontendKind::NodePort, &addrs(&[BACKEND4])),
        ),
        (
            frontend(NODE6, 30080, Protocol::Tcp),
            spec(FrontendKind::NodePort, &addrs(&[BACKEND6])),
        ),
        (
            frontend("198.19.0.10", 80, Protocol::Tcp),
            spec(FrontendKind::ClusterIp, &addrs(&[BACKEND4])),
        ),
    ]);
    let frames = odd_frames();
    for (what, frame) in &frames {
        let (action, out) = run_xdp_on(&mut fx, frame, Some("up0"));
        assert_eq!(action, XDP_PASS, "{what}");
        assert_eq!(&out, frame, "{what}: unchanged");
    }
    assert_eq!(xdp_count(&fx, stat::TO_TC), frames.len() as u64);
    // Nothing counted under a reason: TC counts these when it sees them.
    let counted: u64 = fx
        .maps
        .reason_counts()
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(counted, 0);
    assert!(fx.conntrack().is_empty());
    // And TC still does its job on the refused one.
    let (verdict, _) = fx.run(&frames[2].1);
    assert_eq!(
        verdict,
        support::prog_test::TC_ACT_REDIRECT,
        "TC refuses it"
    );
}

#[test]
fn xdp_drops_what_tc_drops() {
    let Some(mut fx) = Fixture::new("xdp_drops_what_tc_drops") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    let mut lb4 = spec(FrontendKind::LoadBalancer, &addrs(&[BACKEND4]));
    lb4.source_ranges = vec![("203.0.113.0".parse().unwrap(), 25)];
    let mut lb6 = spec(FrontendKind::LoadBalancer, &addrs(&[BACKEND6]));
    lb6.source_ranges = vec![("2001:db8:7::".parse().unwrap(), 120)];
    fx.set_specs(&[
        (frontend("198.19.1.1", 80, Protocol::Tcp), lb4),
        (frontend("fd00:97::1", 80, Protocol::Tcp), lb6),
    ]);
    for (allowed, denied, lb) in [
        (CLIENT4, "203.0.113.200:45000", "198.19.1.1:80"),
        (CLIENT6, "[2001:db8:7::1:7]:45000", "[fd00:97::1]:80"),
    ] {
        let (action, out) = run_xdp_on(&mut fx, &Frame::tcp(allowed, lb, TCP_SYN).bytes(), None);
        assert_eq!(action, XDP_PASS, "translated, no route here");
        assert_ne!(verify_checksums(&out).1, lb.parse().unwrap());
        let (action, _) = run_xdp_on(&mut fx, &Frame::tcp(denied, lb, TCP_SYN).bytes(), None);
        assert_eq!(action, XDP_DROP);
    }
    assert_eq!(fx.reason("drop_source_range"), 2);
    assert_eq!(xdp_count(&fx, stat::DROP), 2);
}

#[test]
fn xdp_attach_modes_on_a_device_without_native_xdp() {
    let Some(mut fx) = Fixture::new("xdp_attach_modes_on_a_device_without_native_xdp") else {
        return;
    };
    // The loopback device has no native XDP (no driver hook), in this
    // thread's own namespace.
    ip(&["link", "set", "lo", "up"]);
    let error = xdp::attach(&mut fx.ebpf, "lo", &fx.pin_path, xdp::XdpMode::Native)
        .expect_err("native XDP on lo");
    let text = lb_userspace::error::Causes(&error).to_string();
    assert!(
        text.contains("cannot attach to lo") && text.contains("native"),
        "a clear error naming the device and the mode: {text}"
    );
    let mode = xdp::attach(&mut fx.ebpf, "lo", &fx.pin_path, xdp::XdpMode::BestEffort)
        .expect("best-effort leaves it to TC");
    assert_eq!(mode, xdp::DeviceMode::TcOnly);
    assert!(xdp::attached(&fx.pin_path).is_empty(), "no link pinned");
    // A device that takes it: pinned, and adopted by a second attach (a
    // restart), still one link.
    topology(&mut fx, false);
    for _ in 0..2 {
        let mode = xdp::attach(&mut fx.ebpf, "up0", &fx.pin_path, xdp::XdpMode::Native)
            .expect("native XDP on a veth");
        assert_eq!(mode, xdp::DeviceMode::Native);
    }
    assert_eq!(xdp::attached(&fx.pin_path), vec!["up0".to_owned()]);
    let shown = run_ok(Command::new("ip").args(["-d", "link", "show", "up0"]));
    assert!(shown.contains("xdp"), "XDP on up0:\n{shown}");
    let done = xdp::detach_all(&fx.pin_path).expect("detach");
    assert_eq!(done, vec!["detached up0 (xdp)".to_owned()]);
    // The kernel frees an unpinned link from a work queue: a moment later.
    support::process::wait_until("XDP gone from up0", Duration::from_secs(2), || {
        let shown = run_ok(Command::new("ip").args(["-d", "link", "show", "up0"]));
        if shown.contains(" xdp") {
            Err(shown)
        } else {
            Ok(())
        }
    });
}
