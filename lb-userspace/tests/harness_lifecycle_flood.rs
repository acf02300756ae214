//! Proof under load (issue 9), the flood: a spoofed SYN flood (random
//! sources, bounded in packets and time) at the fastest rate one thread
//! sends, against the `NodePort` of node 1, while 1000 new TCP
//! connections/s (`LB_LOAD_RATE`) go through the `ClusterIP` and the
//! `NodePort` of one dual-stack Service on both families and 18 long-lived
//! TCP/UDP flows keep exchanging data: no established flow breaks or
//! moves, and at least 99% of each target's new connections succeed,
//! during the flood and after it. The restarts, the upgrade and the
//! endpoint changes are `harness_lifecycle.rs`; what both share is
//! `support::lifecycle`.
//!
//! The flood comes from ext2, from addresses no namespace routes, so the
//! answers die in the node and nothing leaves the test's namespaces; it
//! stops after `LB_LIFECYCLE_SCALE` x 3 s or 4 million packets. Lost UDP
//! datagrams are counted but not held against the flood: UDP has no
//! retransmission, and a datagram dropped in a full receive queue of a
//! flooded CPU says nothing about the flow's state. Privileged: root and
//! bpffs.
//!
//! Run: `cargo test -p lb-userspace --test harness_lifecycle_flood -- --nocapture`

mod support;

use std::net::SocketAddr;

use serde_json::json;
use support::flood;
use support::keepers::{Keepers, flows_json, flows_text};
use support::lifecycle::{
    HTTP_NODE_PORT, NODE1, Plan, cluster, conntrack, drops, events, long_lived, targets, verdict,
};
use support::load::Load;
use support::pins::require_privileged;
use support::serial;
use support::topo::Family;

/// A spoofed SYN flood against the `NodePort` of node 1 from ext2 while
/// the load runs (from client1 and ext): established flows keep working,
/// at least 99% of the new connections made during the flood succeed.
#[test]
fn syn_flood_against_a_nodeport_under_load() {
    let _serial = serial();
    if !require_privileged("harness_lifecycle_flood: syn_flood_against_a_nodeport_under_load") {
        return;
    }
    let plan = Plan::from_env();
    let mut lab = cluster("flood");
    let keepers = Keepers::start(long_lived(&lab, &["be1", "be2", "be3"], &["be1", "be3"]));
    let ct_before = conntrack(&lab);
    let load = Load::start(&targets(&lab), plan.spec);
    std::thread::sleep(plan.warm);
    let flooded: Vec<SocketAddr> = Family::BOTH
        .iter()
        .map(|&f| SocketAddr::new(lab.node_ip(NODE1, f), HTTP_NODE_PORT))
        .collect();
    load.epoch("flood");
    let report = flood::start(&lab.ns("ext2"), &flooded, plan.flood)
        .join()
        .expect("flood thread");
    load.epoch("after flood");
    let ct_flood = conntrack(&lab);
    std::thread::sleep(plan.warm);
    let ct_after = conntrack(&lab);
    let node_drops = drops(&lab);
    let node_events = events(&lab);
    let load = load.stop();
    let flows = keepers.stop();
    lab.assert_agents_alive();
    let text = format!(
        "flood: {} SYNs ({} refused by the kernel) in {:?}, {:.0}/s, seed {:#x}; conntrack \
         {ct_before} -> {ct_flood} (end of flood) -> {ct_after}; node 1's drops {node_drops}, \
         events {node_events}\n\
         new connections: {}\
         long-lived flows:\n{}",
        report.sent,
        report.refused,
        report.elapsed,
        report.rate(),
        report.seed,
        load.text(),
        flows_text(&flows)
    );
    let result = json!({
        "flood": {"sent": report.sent, "refused": report.refused,
                  "secs": report.elapsed.as_secs_f64(), "pps": report.rate()},
        "load": load.json(), "flows": flows_json(&flows),
        "conntrack_before": ct_before, "conntrack_end_of_flood": ct_flood,
        "conntrack_after": ct_after, "node1_drops": node_drops, "node1_events": node_events,
    });
    let mut violations: Vec<String> = flows
        .iter()
        .filter(|f| f.broken.is_some() || f.moved > 0)
        .map(|f| format!("long-lived {} on {} broke or moved", f.label, f.backend))
        .collect();
    // Per target and per window: a NodePort that fails while the ClusterIP
    // carries on must not hide behind the total.
    for epoch in load.epochs.iter().filter(|e| e.name != "start") {
        for (label, counts) in load.targets.iter().zip(&epoch.per_target) {
            if counts.success_ratio() < 0.99 {
                violations.push(format!(
                    "{label}, {}: only {:.2}% of the new connections succeeded ({counts})",
                    epoch.name,
                    100.0 * counts.success_ratio()
                ));
            }
        }
    }
    verdict(&plan, "flood", result, &violations, &text);
}
