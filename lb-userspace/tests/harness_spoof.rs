//! Spoofed sources (issue 12, "Spoofed sources"): a pod that sends as a
//! backend (`src=<backend>:port -> client`) must not get its packet
//! rewritten to come from the Service. Reply entries match from any
//! interface, so on pod-facing interfaces (veths) the datapath checks
//! that the source is routed back through the interface the packet came
//! in on (`bpf_fib_lookup`), and drops it otherwise (`drop_spoofed_source`).
//!
//! The single-node lab of `support::lab`: the client talks UDP to `web`
//! (backend `be1`); `be2` then sends a datagram from `be1`'s address and
//! port to the client's socket, as a raw frame on its own link. Both
//! families. Privileged: root and bpffs.
//!
//! The same check guards ICMP errors about a flow (issue 12, "ICMP
//! errors"): be2 forging a port unreachable from be1's address about the
//! client's flow is dropped, be1's own is translated for the client.
//!
//! Run: `cargo test -p lb-userspace --test harness_spoof -- --nocapture`

mod support;

use std::time::Duration;

use support::clients::{UdpFlow, metric_value};
use support::frames::{Frame, icmp_error};
use support::lab::{DNS_PORT, Lab, vip};
use support::netns::{in_netns, ns_command};
use support::pins::require_privileged;
use support::process::run_ok;
use support::serial;
use support::topo::Family;

/// The MAC address of IFACE in namespace NS.
fn mac_of(ns: &str, iface: &str) -> [u8; 6] {
    let out = run_ok(ns_command(ns, "ip").args(["-br", "link", "show", iface]));
    let text = out
        .split_whitespace()
        .nth(2)
        .expect("a MAC in `ip -br link`");
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("6 bytes")
}

/// Sends the IP packet PACKET out of `eth0` in NS to the MAC DST
/// (`AF_PACKET`, the kernel adds the Ethernet header).
fn send_raw(ns: &str, packet: &[u8], v4: bool, dst: [u8; 6]) {
    in_netns(ns, || {
        let proto: u16 = if v4 { 0x0800 } else { 0x86dd };
        // SAFETY: plain socket(2); closed below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                i32::from(proto.to_be()),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a zeroed sockaddr_ll is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        addr.sll_protocol = proto.to_be();
        // SAFETY: valid C string.
        let index = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        addr.sll_ifindex = i32::try_from(index).unwrap();
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst);
        // SAFETY: PACKET and ADDR are valid for their lengths.
        let sent = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
            )
        };
        let error = std::io::Error::last_os_error();
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        assert_eq!(
            usize::try_from(sent).ok(),
            Some(packet.len()),
            "sendto: {error}"
        );
    });
}

#[test]
fn a_pod_cannot_send_as_a_backend() {
    let _serial = serial();
    if !require_privileged("harness_spoof") {
        return;
    }
    let mut lab = Lab::new();
    lab.write_manifest("web.yaml", &lab.web_file(&[("be1", true)]));
    lab.start_agent();
    lab.wait_programmed(std::time::Instant::now(), &lab.web_expect(&["be1"]));
    let client = lab.client_ns().to_owned();
    let be1 = lab.topo.backend("be1").addr;
    let attacker = lab.topo.backend("be2");
    let node_mac = mac_of(lab.node_ns(), &attacker.iface);
    let mut spoofed = 0;
    for family in Family::BOTH {
        let to = vip(family, DNS_PORT);
        let flow = UdpFlow::open(&client, to);
        // The flow exists: be1 answers through the Service.
        let answer = flow.ask(Duration::from_secs(1)).answer("the real reply");
        assert_eq!(answer.backend, "be1");
        // be2 sends as be1 (its address and port) to the client's socket.
        let from = be1.sock(family, 8080);
        let frame = Frame {
            payload: b"forged".to_vec(),
            ..Frame::udp(&from.to_string(), &flow.local().to_string())
        };
        let bytes = frame.bytes();
        send_raw(attacker.ns(), &bytes[14..], family == Family::V4, node_mac);
        spoofed += 1;
        let got = flow.receive(Duration::from_millis(500));
        assert_eq!(
            got, None,
            "{family:?}: a datagram forged by be2 reached the client as from {to}"
        );
        // The real backend still gets through on the same flow.
        let answer = flow
            .ask(Duration::from_secs(1))
            .answer("the real reply again");
        assert_eq!(answer.backend, "be1");
    }
    let (status, metrics) =
        support::clients::http_get(lab.node_ns(), support::process::metrics_addr(), "/metrics")
            .expect("/metrics");
    assert_eq!(status, 200);
    let drops = metric_value(
        &metrics,
        "lb_datapath_packets_total{reason=\"drop_spoofed_source\"}",
    );
    assert_eq!(drops, Some(spoofed), "drops counted");
    lab.assert_agent_alive();
}

/// The `/metrics` counter of datapath reason REASON in LAB's agent.
fn reason_count(lab: &Lab, reason: &str) -> u64 {
    let (status, metrics) =
        support::clients::http_get(lab.node_ns(), support::process::metrics_addr(), "/metrics")
            .expect("/metrics");
    assert_eq!(status, 200);
    metric_value(
        &metrics,
        &format!("lb_datapath_packets_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0)
}

#[test]
fn a_pod_cannot_send_icmp_errors_as_a_backend() {
    let _serial = serial();
    if !require_privileged("harness_spoof icmp") {
        return;
    }
    let mut lab = Lab::new();
    lab.write_manifest("web.yaml", &lab.web_file(&[("be1", true)]));
    lab.start_agent();
    lab.wait_programmed(std::time::Instant::now(), &lab.web_expect(&["be1"]));
    let client = lab.client_ns().to_owned();
    let client_addr = lab.topo.client.addr;
    let be1 = lab.topo.backend("be1");
    let attacker = lab.topo.backend("be2");
    for family in Family::BOTH {
        let v4 = family == Family::V4;
        let to = vip(family, DNS_PORT);
        let flow = UdpFlow::open(&client, to);
        let answer = flow.ask(Duration::from_secs(1)).answer("the real reply");
        assert_eq!(answer.backend, "be1");
        // The client's datagram as it reached be1: the error's quote.
        let quote = Frame::udp(
            &flow.local().to_string(),
            &be1.addr.sock(family, 8080).to_string(),
        )
        .bytes();
        let unreachable = if v4 { (3, 3) } else { (1, 4) };
        let error = icmp_error(
            be1.addr.get(family),
            client_addr.get(family),
            unreachable,
            [0; 4],
            &quote[14..],
        );
        // be2 sends it as be1: dropped.
        let (dropped, translated) = (
            reason_count(&lab, "drop_spoofed_source"),
            reason_count(&lab, "nat_icmp_error"),
        );
        let node_mac = mac_of(lab.node_ns(), &attacker.iface);
        send_raw(attacker.ns(), &error[14..], v4, node_mac);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            reason_count(&lab, "drop_spoofed_source"),
            dropped + 1,
            "{family:?}: a forged error not dropped"
        );
        assert_eq!(reason_count(&lab, "nat_icmp_error"), translated);
        let answer = flow.ask(Duration::from_secs(1)).answer("after the forgery");
        assert_eq!(answer.backend, "be1");
        // be1 sends the same error itself: translated for the client.
        let node_mac = mac_of(lab.node_ns(), &be1.iface);
        send_raw(be1.ns(), &error[14..], v4, node_mac);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            reason_count(&lab, "nat_icmp_error"),
            translated + 1,
            "{family:?}: be1's own error not translated"
        );
        assert_eq!(reason_count(&lab, "drop_spoofed_source"), dropped + 1);
    }
    lab.assert_agent_alive();
}
