//! Harness (root): path-MTU discovery through a Service address. See
//! `support::pmtu` for the topology: client -> client router -> node (lb)
//! -> backend router -> backend, one router's link to its host with an
//! MTU of 1280.
//!
//! Upload (the small link on the backend's side): the client's full-sized
//! segments, after the node's translation, do not fit, and the backend
//! router answers "fragmentation needed" (IPv4, DF set by TCP) / "packet
//! too big" (IPv6) to the client quoting `client -> backend`. Download (the
//! small link on the client's side): the backend's segments, translated
//! to come from the `ClusterIP`, do not fit, and the client router answers
//! to the `ClusterIP` quoting `ClusterIP -> client`. Only once `lb`
//! translates the error back (to the client about `client -> ClusterIP`,
//! to the backend about `backend -> client`) does the sender's kernel find
//! its socket, lower the path MTU and resend smaller segments. Without the
//! translation the error matches no socket and the transfer stalls until
//! the timeout (a PMTU black hole): the tests then fail on the transfer,
//! on the path MTU the sender holds, and on the `nat_icmp_error` counter.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::pmtu::{PmtuLab, SMALL_MTU, Small, download, upload, vip};
use support::topo::Family;

/// The transfer: large enough to need many full-sized segments.
const BYTES: usize = 4 << 20;
/// Every socket call must finish within this (a stall is a failure, not a
/// hang); a transfer itself takes well under a second.
const STALL_LIMIT: Duration = Duration::from_secs(8);

/// Runs TRANSFER for each family and checks, on the SMALL side's router
/// and the sender's kernel (the backend's with `backend_sends`), that the
/// error was sent, translated and acted on.
fn transfer_completes(
    small: Small,
    backend_sends: bool,
    transfer: impl Fn(&PmtuLab, SocketAddr) -> Result<support::pmtu::Upload, String>,
) {
    let lab = PmtuLab::start(small);
    for family in Family::BOTH {
        let service = SocketAddr::new(vip(family), 80);
        // The sender's path MTU towards whom it sends to.
        let towards = if backend_sends {
            PmtuLab::client_addr(family)
        } else {
            service.ip()
        };
        assert_eq!(
            lab.path_mtu(backend_sends, towards),
            None,
            "{family:?}: a path MTU before any traffic"
        );
        let translated = lab.reason_count("nat_icmp_error");
        let router_errors = lab.router_errors_sent(small, family);
        let result = transfer(&lab, service);
        let router_sent = lab.router_errors_sent(small, family) - router_errors;
        let errors = lab.reason_count("nat_icmp_error") - translated;
        let mtu = lab.path_mtu(backend_sends, towards);
        eprintln!(
            "{small:?} {family:?}: {result:?}; router sent {router_sent} errors, lb translated \
             {errors}, path MTU to {towards}: {mtu:?}"
        );
        let done = result.unwrap_or_else(|e| panic!("{family:?}: the transfer stalled: {e}"));
        assert_eq!(done.echoed, BYTES as u64, "{family:?}: bytes received");
        assert!(router_sent >= 1, "{family:?}: the router sent no error");
        assert!(errors >= 1, "{family:?}: no ICMP error translated");
        assert_eq!(mtu, Some(SMALL_MTU), "{family:?}: the sender's path MTU");
    }
}

#[test]
fn a_bulk_upload_through_a_cluster_ip_completes_over_a_smaller_mtu() {
    if !support::pins::require_privileged("a_bulk_upload_through_a_cluster_ip") {
        return;
    }
    transfer_completes(Small::BackendSide, false, |lab, service| {
        upload(lab.client_ns(), service, BYTES, STALL_LIMIT)
    });
}

#[test]
fn a_bulk_download_through_a_cluster_ip_completes_over_a_smaller_mtu() {
    if !support::pins::require_privileged("a_bulk_download_through_a_cluster_ip") {
        return;
    }
    transfer_completes(Small::ClientSide, true, |lab, service| {
        download(lab.client_ns(), service, BYTES as u64, STALL_LIMIT)
    });
}
