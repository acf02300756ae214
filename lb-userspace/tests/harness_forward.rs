//! Where translated packets go (issue 12, "`NetworkPolicy` engines in
//! netfilter"): by default the kernel stack routes a translated packet, so
//! netfilter's FORWARD chain (where Calico in iptables mode, kube-router
//! and Weave enforce `NetworkPolicy`) sees it exactly as after kube-proxy's
//! DNAT; `--forward=redirect` sends it to the egress device from the
//! datapath, which bypasses FORWARD.
//!
//! The single-node lab of `support::lab`: an nftables rule in the node
//! namespace's FORWARD hook drops everything to `be1`. `web` has only `be1`
//! behind it, `api` only `be2`. Both families, TCP and UDP.
//!
//! Everything lives in namespaces the test creates (the nftables table is
//! in the node namespace and goes with it). Privileged: root and bpffs.
//!
//! Run: `cargo test -p lb-userspace --test harness_forward -- --nocapture`

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::clients::{
    assert_connected_to, assert_only, assert_timeout, assert_unanswered, tcp_batch, tcp_once,
    udp_batch, udp_once,
};
use support::lab::{DNS_PORT, HTTP_PORT, Lab, WEB_PORTS, service_file, vip};
use support::netns::ns_command;
use support::pins::require_privileged;
use support::process::{require_tools, run_ok};
use support::serial;
use support::topo::{Dual, Family};

/// `api`'s `ClusterIP`s (next to `web`'s `.10`).
fn api_vip(family: Family, port: u16) -> SocketAddr {
    Dual::service(0, 0x96, 11).sock(family, port)
}

/// Runs `nft ARGS` in the node namespace.
fn nft(lab: &Lab, args: &[&str]) -> String {
    run_ok(ns_command(lab.node_ns(), "nft").args(args))
}

/// A `NetworkPolicy` engine's FORWARD rule, as Calico (iptables mode) or
/// kube-router would install it: nothing may reach `be1`.
fn deny_be1(lab: &Lab) {
    let be1 = lab.topo.backend("be1").addr;
    nft(lab, &["add", "table", "inet", "lbpolicy"]);
    nft(
        lab,
        &[
            "add", "chain", "inet", "lbpolicy", "forward", "{", "type", "filter", "hook",
            "forward", "priority", "0", ";", "policy", "accept", ";", "}",
        ],
    );
    nft(
        lab,
        &[
            "add",
            "rule",
            "inet",
            "lbpolicy",
            "forward",
            "ip",
            "daddr",
            &be1.v4.to_string(),
            "counter",
            "drop",
        ],
    );
    nft(
        lab,
        &[
            "add",
            "rule",
            "inet",
            "lbpolicy",
            "forward",
            "ip6",
            "daddr",
            &be1.v6.to_string(),
            "counter",
            "drop",
        ],
    );
}

/// Packets both rules dropped so far (their counters).
fn drops(lab: &Lab) -> u64 {
    let listing = nft(lab, &["list", "chain", "inet", "lbpolicy", "forward"]);
    let words: Vec<&str> = listing.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "packets")
        .map(|w| w[1].parse::<u64>().expect("packet count"))
        .sum()
}

#[test]
fn netfilter_forward_policy_holds_for_service_traffic_unless_redirect() {
    let _serial = serial();
    if !require_privileged("harness_forward") {
        return;
    }
    require_tools(&["nft"]);
    let mut lab = Lab::new();
    lab.write_manifest("web.yaml", &lab.web_file(&[("be1", true)]));
    let be2 = lab.topo.backend("be2");
    let api = service_file(
        "api",
        &[api_vip(Family::V4, 0).ip(), api_vip(Family::V6, 0).ip()],
        &WEB_PORTS,
        &[(be2, true)],
    );
    lab.write_manifest("api.yaml", &api);
    lab.start_agent();
    let since = std::time::Instant::now();
    lab.wait_programmed(since, &lab.web_expect(&["be1"]));
    deny_be1(&lab);
    let client = lab.client_ns().to_owned();

    // Default (`--forward=stack`): the policy holds for Service traffic.
    for family in Family::BOTH {
        let before = drops(&lab);
        let what = format!("{family:?} web (be1 denied in FORWARD), stack");
        assert_timeout(
            &format!("{what}: TCP"),
            &tcp_once(&client, vip(family, HTTP_PORT), Duration::from_secs(1)),
        );
        assert_unanswered(
            &format!("{what}: UDP"),
            &udp_once(&client, vip(family, DNS_PORT), Duration::from_millis(500)),
        );
        assert!(
            drops(&lab) > before,
            "{what}: the FORWARD rule counted nothing: the packets did not pass FORWARD"
        );
        // Translation itself works: the other Service answers through the
        // stack, replies translated back.
        let to = api_vip(family, HTTP_PORT);
        let answers = tcp_batch(&client, to, 3);
        assert_connected_to(&format!("{family:?} api TCP"), &answers, to);
        assert_only(&format!("{family:?} api TCP"), &answers, &["be2:8080"]);
        let to = api_vip(family, DNS_PORT);
        let answers = udp_batch(&client, to, 3);
        assert_connected_to(&format!("{family:?} api UDP"), &answers, to);
        assert_only(&format!("{family:?} api UDP"), &answers, &["be2:8080"]);
    }

    // `--forward=redirect`: the datapath sends the packet to its egress
    // device and FORWARD never sees it: the policy is bypassed (the README
    // warns about exactly this).
    lab.kill_agent();
    lab.start_agent_with(&["--forward=redirect".to_owned()]);
    for family in Family::BOTH {
        let before = drops(&lab);
        let to = vip(family, HTTP_PORT);
        let answers = tcp_batch(&client, to, 3);
        assert_connected_to(&format!("{family:?} web TCP, redirect"), &answers, to);
        assert_only(
            &format!("{family:?} web TCP, redirect"),
            &answers,
            &["be1:8080"],
        );
        let to = vip(family, DNS_PORT);
        let answers = udp_batch(&client, to, 3);
        assert_only(
            &format!("{family:?} web UDP, redirect"),
            &answers,
            &["be1:8080"],
        );
        assert_eq!(
            drops(&lab),
            before,
            "{family:?}: FORWARD saw redirected packets"
        );
    }
    lab.assert_agent_alive();
}
