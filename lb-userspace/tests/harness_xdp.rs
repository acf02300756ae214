//! The XDP program end to end (issue 13): `NodePort` traffic from an
//! external client translated and forwarded at the driver of node1's
//! uplink, to a backend behind node2, and the replies back, both families,
//! TCP and UDP, externalTrafficPolicy Cluster (source NAT to node1).
//!
//! The two-node cluster of `support::cluster`: node1's agent runs with
//! `--xdp=native --xdp-interfaces=h-ext,fab1` (the external client's link
//! and the fabric towards node2), node2's with TC only. Native XDP on a
//! veth hands `XDP_TX`/`XDP_REDIRECT` frames to the peer device, which
//! takes them only with NAPI on: an XDP program there or GRO (kernel >=
//! 5.13). The harness turns GRO on at the peers that receive redirected
//! frames (ext's `eth0`, node2's `fab2`), through the ethtool ioctl.
//! Frames from the senders' own sockets would reach XDP with an offloaded
//! (partial) checksum, which a NIC never hands to XDP; the senders (ext and
//! the backends) compute checksums in software (`tx` checksumming off).
//!
//! Asserted: what the clients observe (the backend behind node2 answers,
//! saw node1's address: source NAT), and that it was XDP that forwarded
//! them: the XDP counters in node1's `/metrics` grew by at least one
//! redirect per request and per reply, the devices run native XDP
//! (`lb_xdp_native`, `lb status`). Then `lb cleanup` removes the XDP links.
//!
//! Everything lives in namespaces the test creates. Privileged: root and
//! bpffs.
//!
//! Run: `cargo test -p lb-userspace --test harness_xdp -- --nocapture`

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::clients::{assert_nodeport_sources, assert_only, tcp_batch, udp_batch};
use support::cluster::{Cluster, ready, service};
use support::ethtool::{ETHTOOL_SGRO, ETHTOOL_STXCSUM, ethtool_set};
use support::manifests::HTTP_DNS;
use support::netns::ns_command;
use support::pins::require_privileged;
use support::process::{lb_binary, run_ok, wait_until};
use support::serial;
use support::topo::Family;

/// The value of the sample LINE-PREFIX (`name{labels}`) in a `/metrics` text.
fn sample(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in /metrics:\n{metrics}"))
}

fn xdp_redirects(lab: &Cluster) -> u64 {
    let metrics = lab.metrics(0).expect("node1 /metrics");
    sample(&metrics, "lb_xdp_packets_total{action=\"redirect\"} ")
}

#[test]
fn nodeport_through_native_xdp_to_a_backend_behind_another_node() {
    let _serial = serial();
    if !require_privileged("harness_xdp: nodeport_through_native_xdp") {
        return;
    }
    let mut lab = Cluster::new_with_args(
        "xdp",
        vec![vec![
            "--xdp=native".to_owned(),
            "--xdp-interfaces=h-ext,fab1".to_owned(),
        ]],
    );
    let ext = lab.ns("ext");
    let node1 = lab.topo.nodes[0].ns().to_owned();
    let node2 = lab.topo.nodes[1].ns().to_owned();
    // NAPI on the peers that receive XDP_TX / XDP_REDIRECT frames.
    ethtool_set(&ext, "eth0", ETHTOOL_SGRO, true);
    ethtool_set(&node2, "fab2", ETHTOOL_SGRO, true);
    // Full checksums from the senders (see the module comment).
    for ns in [ext.clone(), lab.ns("be3"), lab.ns("be4")] {
        ethtool_set(&ns, "eth0", ETHTOOL_STXCSUM, false);
    }

    let np = service(
        "np-xdp",
        30,
        "NodePort",
        &[HTTP_DNS[0].node(30090), HTTP_DNS[1].node(30091)],
    );
    let np = lab.simple("np-xdp", np, &[ready("be3")]);
    lab.apply("np-xdp.json", &np);

    let metrics = lab.metrics(0).expect("node1 /metrics");
    for device in ["h-ext", "fab1"] {
        assert_eq!(
            sample(&metrics, &format!("lb_xdp_native{{device=\"{device}\"}} ")),
            1,
            "{device} runs native XDP"
        );
    }
    for family in Family::BOTH {
        let n1 = lab.node_ip(0, family);
        for (proto, port) in [("TCP", 30090), ("UDP", 30091)] {
            let to = SocketAddr::new(n1, port);
            let what = format!("{family:?} ext -> node1 NodePort {to} {proto} (XDP)");
            let before = xdp_redirects(&lab);
            let n = 10;
            let answers = if proto == "TCP" {
                tcp_batch(&ext, to, n)
            } else {
                udp_batch(&ext, to, n)
            };
            assert_only(&what, &answers, &["be3:8080"]);
            // Source NAT to node1's address (ETP=Cluster, remote backend).
            assert_nodeport_sources(&what, &answers, &[], n1);
            let grew = xdp_redirects(&lab) - before;
            eprintln!("{what}: {grew} frames redirected by XDP");
            // Each exchange is at least one request redirected to fab1 and
            // one reply redirected to h-ext (TCP: more, the handshake and
            // the close).
            assert!(
                grew >= 2 * n as u64,
                "{what}: only {grew} XDP redirects for {n} exchanges"
            );
        }
    }
    let status = run_ok(
        ns_command(&node1, lb_binary())
            .arg("status")
            .arg("--pin-path")
            .arg(lab.pin_path(0)),
    );
    eprintln!("lb status:\n{status}");
    for device in ["h-ext", "fab1"] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(device) && l.contains("xdp=native")),
            "{device} native in `lb status`:\n{status}"
        );
    }
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("h-be1") && l.contains("xdp=off")),
        "pod devices stay TC-only:\n{status}"
    );
    restart_then_cleanup(&mut lab, &ext, &node1);
}

/// A restart (an upgrade) puts the new program into the pinned links:
/// XDP keeps forwarding, the flows of before are conntrack's. Then `lb
/// cleanup` detaches the XDP program with the rest.
fn restart_then_cleanup(lab: &mut Cluster, ext: &str, node1: &str) {
    lab.stop_agent(0);
    lab.restart_agent(0);
    let to = SocketAddr::new(lab.node_ip(0, Family::V4), 30091);
    let before = xdp_redirects(lab);
    let answers = udp_batch(ext, to, 5);
    assert_only("V4 UDP after the restart", &answers, &["be3:8080"]);
    assert!(
        xdp_redirects(lab) - before >= 10,
        "XDP forwards after the restart"
    );
    lab.finish(support::scenarios::Scenarios::default());
    lab.stop_agent(0);
    let done = run_ok(
        ns_command(node1, lb_binary())
            .arg("cleanup")
            .arg("--pin-path")
            .arg(lab.pin_path(0)),
    );
    for device in ["h-ext", "fab1"] {
        assert!(
            done.contains(&format!("detached {device} (xdp)")),
            "cleanup output:\n{done}"
        );
    }
    // The kernel frees an unpinned link from a work queue: a moment later.
    wait_until("XDP gone from h-ext", Duration::from_secs(2), || {
        let links = run_ok(ns_command(node1, "ip").args(["-d", "link", "show", "h-ext"]));
        if links.contains(" xdp") {
            Err(links)
        } else {
            Ok(())
        }
    });
}
