//! Harness (root): path-MTU discovery through a Service address. See
//! `support::pmtu` for the topology: client -> node (lb) -> router ->
//! backend, the router's link to the backend with an MTU of 1280.
//!
//! The client uploads to the `ClusterIP`; its full-sized segments, after
//! the node's translation, do not fit the router's link, and the router
//! answers "fragmentation needed" (IPv4, DF set by TCP) / "packet too big"
//! (IPv6) to the client, quoting the packet as translated: client ->
//! backend. Only once `lb` translates the quote back to client ->
//! `ClusterIP` does the client's kernel find its socket, lower the path
//! MTU to the Service address and resend smaller segments. Without the
//! translation the error matches no socket and the upload stalls until
//! the client's timeout (a PMTU black hole): the test then fails on the
//! upload, on the path MTU the client holds for the `ClusterIP`, and on the
//! `nat_icmp_error` counter.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::pmtu::{PmtuLab, SMALL_MTU, upload, vip};
use support::topo::Family;

/// The upload: large enough to need many full-sized segments.
const UPLOAD_BYTES: usize = 4 << 20;
/// Every socket call of the upload must finish within this (a stall is a
/// failure, not a hang); the transfer itself takes well under a second.
const STALL_LIMIT: Duration = Duration::from_secs(8);

#[test]
fn a_bulk_upload_through_a_cluster_ip_completes_over_a_smaller_mtu() {
    if !support::pins::require_privileged("a_bulk_upload_through_a_cluster_ip") {
        return;
    }
    let lab = PmtuLab::start();
    for family in Family::BOTH {
        let service = SocketAddr::new(vip(family), 80);
        assert_eq!(
            lab.client_path_mtu(service.ip()),
            None,
            "{family:?}: a path MTU before any traffic"
        );
        let translated = lab.reason_count("nat_icmp_error");
        let router_errors = lab.router_errors_sent(family);
        let result = upload(lab.client_ns(), service, UPLOAD_BYTES, STALL_LIMIT);
        let router_sent = lab.router_errors_sent(family) - router_errors;
        let errors = lab.reason_count("nat_icmp_error") - translated;
        let mtu = lab.client_path_mtu(service.ip());
        eprintln!(
            "{family:?}: {result:?}; router sent {router_sent} errors, lb translated {errors}, \
             client path MTU to {} {mtu:?}",
            service.ip()
        );
        let done = result.unwrap_or_else(|e| panic!("{family:?}: the upload stalled: {e}"));
        assert_eq!(
            done.echoed, UPLOAD_BYTES as u64,
            "{family:?}: bytes received"
        );
        assert!(router_sent >= 1, "{family:?}: the router sent no error");
        assert!(errors >= 1, "{family:?}: no ICMP error translated");
        assert_eq!(
            mtu,
            Some(SMALL_MTU),
            "{family:?}: the client's path MTU to the ClusterIP"
        );
    }
}
