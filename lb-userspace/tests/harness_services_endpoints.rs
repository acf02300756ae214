//! Endpoints and connection tracking (issue 3, behaviours 7 and 8): ready /
//! serving / terminating endpoints and `publishNotReadyAddresses`; a
//! terminating endpoint drains its established connection; established
//! flows under endpoint churn; (issue 9) a Service whose only endpoint
//! terminates keeps its established flows, a readiness flap keeps TCP, a
//! pod removed from one of two Services keeps none of that one's flows.
//!
//! Runs on the two-node cluster of `support::cluster` (topology and address
//! plan are described there): real TCP/UDP clients and servers, IPv4 and
//! IPv6, dual-stack Services; the assertions are what the clients observe.
//! Each test builds the cluster once and runs named sub-scenarios on it
//! (per behaviour and family); a failing sub-scenario is reported and the
//! others still run, so one run shows every failing behaviour.
//!
//! Everything lives in namespaces the test creates and is removed by drop
//! guards, also when an assertion fails (both agents' logs, `lb services`
//! and `lb conntrack` are printed first). Privileged: root and bpffs.
//!
//! Run: `cargo test -p lb-userspace --test harness_services_endpoints -- --nocapture`

mod support;

use std::time::Instant;

use support::clients::{
    Conn, IO_TIMEOUT, Outcome, REFUSED_WITHIN, UdpFlow, assert_only, assert_refused, assert_spread,
    conn_to, tcp_batch, tcp_once, udp_batch, udp_flow_to,
};
use support::cluster::{Cluster, ep, ready, service, vip};
use support::manifests::{Cond, HTTP_DNS};
use support::pins::require_privileged;
use support::scenarios::Scenarios;
use support::serial;
use support::topo::Family;

/// The flows of the conntrack churn scenario, per family.
struct Flows {
    family: Family,
    keep: Conn,
    udp: UdpFlow,
    doomed: Conn,
}

/// Behaviours 7 and 8: ready / serving / terminating endpoints and
/// `publishNotReadyAddresses`; a terminating endpoint drains its
/// established connection; connection tracking under endpoint churn (TCP
/// keeps its endpoint, UDP moves at once when its endpoint goes, TCP to a
/// removed endpoint is reset).
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per behaviour, sharing one topology"
)]
fn endpoint_conditions_and_conntrack_churn() {
    let _serial = serial();
    if !require_privileged("harness_services_endpoints: endpoint_conditions_and_conntrack_churn") {
        return;
    }
    let mut lab = Cluster::new("conditions");
    let client = lab.ns("client1");
    let cond = service("cond", 40, "ClusterIP", &HTTP_DNS);
    let mut sc = Scenarios::default();

    sc.run("ready endpoints only (not-ready excluded)", || {
        let file = lab.simple(
            "cond",
            cond.clone(),
            &[ready("be1"), ep("be2", Cond::NotReady), ready("be3")],
        );
        lab.apply("cond.json", &file);
        for family in Family::BOTH {
            lab.expect_slots(0, vip(40).get(family), 80, "TCP", &["be1:8080", "be3:8080"]);
            let what = format!("{family:?} ready endpoints only, TCP");
            let answers = tcp_batch(&client, vip(40).sock(family, 80), 30);
            assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
            let what = format!("{family:?} ready endpoints only, UDP");
            let answers = udp_batch(&client, vip(40).sock(family, 53), 12);
            assert_only(&what, &answers, &["be1:8080", "be3:8080"]);
        }
    });

    sc.run("none ready: serving+terminating fallback", || {
        let file = lab.simple(
            "cond",
            cond.clone(),
            &[
                ep("be1", Cond::ServingTerminating),
                ep("be2", Cond::Terminating),
                ep("be3", Cond::NotReady),
            ],
        );
        lab.apply("cond.json", &file);
        for family in Family::BOTH {
            lab.expect_slots(0, vip(40).get(family), 80, "TCP", &["be1:8080"]);
            let what = format!("{family:?} serving+terminating fallback, TCP");
            let answers = tcp_batch(&client, vip(40).sock(family, 80), 10);
            assert_spread(&what, &answers, &["be1:8080"]);
            let what = format!("{family:?} serving+terminating fallback, UDP");
            let answers = udp_batch(&client, vip(40).sock(family, 53), 6);
            assert_spread(&what, &answers, &["be1:8080"]);
        }
    });

    sc.run("publishNotReadyAddresses: the conditions decide", || {
        // The EndpointSlice controller marks such endpoints ready; the
        // proxy (kube-proxy too) reads the conditions as they are, so a
        // not-ready one gets nothing even with the field set.
        let publish = cond.clone().publish_not_ready();
        let file = lab.simple("cond", publish, &[ep("be1", Cond::NotReady), ready("be2")]);
        lab.apply("cond.json", &file);
        for family in Family::BOTH {
            lab.expect_slots(0, vip(40).get(family), 80, "TCP", &["be2:8080"]);
            let what = format!("{family:?} publishNotReadyAddresses, TCP");
            let answers = tcp_batch(&client, vip(40).sock(family, 80), 10);
            assert_spread(&what, &answers, &["be2:8080"]);
        }
    });

    sc.run(
        "terminating endpoint: no new flows, established drains until removed",
        || {
            let file = lab.simple("cond", cond.clone(), &[ready("be1"), ready("be2")]);
            lab.apply("cond.json", &file);
            let mut draining: Vec<(Family, Conn)> = Family::BOTH
                .iter()
                .map(|&f| (f, conn_to(&client, vip(40).sock(f, 80), "be2")))
                .collect();
            let file = lab.simple(
                "cond",
                cond.clone(),
                &[ready("be1"), ep("be2", Cond::ServingTerminating)],
            );
            lab.apply("cond.json", &file);
            for (family, conn) in &mut draining {
                lab.expect_slots(0, vip(40).get(*family), 80, "TCP", &["be1:8080"]);
                let what = format!("{family:?} be2 terminating: new flows");
                let answers = tcp_batch(&client, vip(40).sock(*family, 80), 20);
                assert_spread(&what, &answers, &["be1:8080"]);
                for round in 0..2 {
                    let answer = conn.ask().answer(&format!(
                        "{family:?} established connection to terminating be2 (round {round})"
                    ));
                    assert_eq!(
                        answer.backend, "be2",
                        "{family:?}: draining connection moved"
                    );
                }
            }
            let file = lab.simple("cond", cond.clone(), &[ready("be1")]);
            lab.apply("cond.json", &file);
            for (family, conn) in &mut draining {
                let outcome = conn.ask();
                eprintln!("{family:?} connection to be2 after be2 left the slice: {outcome:?}");
                assert!(
                    matches!(outcome, Outcome::Reset | Outcome::Closed),
                    "{family:?}: the established connection to be2, gone from the slice, \
                     should be reset; got {outcome:?}"
                );
            }
        },
    );

    sc.run("conntrack under endpoint churn", || {
        let churn = service("churn", 41, "ClusterIP", &HTTP_DNS);
        let file = lab.simple(
            "churn",
            churn.clone(),
            &[ready("be1"), ready("be2"), ready("be3")],
        );
        lab.apply("churn.json", &file);
        let mut flows: Vec<Flows> = Family::BOTH
            .iter()
            .map(|&family| Flows {
                family,
                keep: conn_to(&client, vip(41).sock(family, 80), "be1"),
                udp: udp_flow_to(&client, vip(41).sock(family, 53), "be2"),
                doomed: conn_to(&client, vip(41).sock(family, 80), "be3"),
            })
            .collect();
        // Another endpoint comes: every established flow keeps its endpoint.
        let file = lab.simple(
            "churn",
            churn.clone(),
            &[ready("be1"), ready("be2"), ready("be3"), ready("be4")],
        );
        lab.apply("churn.json", &file);
        for f in &mut flows {
            let family = f.family;
            lab.expect_slots(
                0,
                vip(41).get(family),
                80,
                "TCP",
                &["be1:8080", "be2:8080", "be3:8080", "be4:8080"],
            );
            let what = format!("{family:?} churn: be4 added");
            assert_eq!(
                f.keep.ask().answer(&what).backend,
                "be1",
                "{what}: TCP flow moved"
            );
            assert_eq!(
                f.udp.ask(IO_TIMEOUT).answer(&what).backend,
                "be2",
                "{what}: UDP flow moved"
            );
            assert_eq!(
                f.doomed.ask().answer(&what).backend,
                "be3",
                "{what}: TCP flow moved"
            );
        }
        // be2 and be3 go: TCP to be1 stays; the UDP socket's next datagram
        // reaches a remaining endpoint at once; TCP to be3 is reset.
        let file = lab.simple("churn", churn, &[ready("be1"), ready("be4")]);
        lab.apply("churn.json", &file);
        for f in &mut flows {
            let family = f.family;
            lab.expect_slots(0, vip(41).get(family), 80, "TCP", &["be1:8080", "be4:8080"]);
            let what = format!("{family:?} churn: be2 and be3 removed");
            assert_eq!(
                f.keep.ask().answer(&what).backend,
                "be1",
                "{what}: TCP flow to be1 moved"
            );
            let start = Instant::now();
            let outcome = f.udp.ask(REFUSED_WITHIN);
            eprintln!(
                "{what}: UDP socket's next datagram: {outcome:?} after {:?}",
                start.elapsed()
            );
            let answer = outcome.answer(&format!(
                "{what}: the UDP socket whose endpoint (be2) left should reach a remaining \
                 endpoint with its next datagram"
            ));
            assert!(
                ["be1", "be4"].contains(&answer.backend.as_str()),
                "{what}: UDP answered by {}",
                answer.backend
            );
            let again = f.udp.ask(IO_TIMEOUT).answer(&what);
            assert_eq!(
                again.backend, answer.backend,
                "{what}: the re-selected UDP flow moved again"
            );
            let outcome = f.doomed.ask();
            eprintln!("{what}: TCP connection to be3: {outcome:?}");
            assert!(
                matches!(outcome, Outcome::Reset | Outcome::Closed),
                "{what}: the TCP connection to removed be3 should be reset, got {outcome:?}"
            );
        }
    });
    flow_life_scenarios(&mut lab, &client, &mut sc);
    lab.finish(sc);
}

/// Issue 9, items 1 to 3, with real sockets: a Service whose only
/// endpoint terminates keeps its established connection and refuses new
/// ones; a readiness flap keeps the TCP connection on its endpoint and
/// moves the UDP flow to a ready one; a pod removed from one of two
/// Services loses that Service's UDP flow and affinity client only.
fn flow_life_scenarios(lab: &mut Cluster, client: &str, sc: &mut Scenarios) {
    let flap = service("flap", 42, "ClusterIP", &HTTP_DNS);
    sc.run(
        "only endpoint terminating: established goes on, new refused",
        || {
            let file = lab.simple("flap", flap.clone(), &[ready("be1")]);
            lab.apply("flap.json", &file);
            let mut live: Vec<(Family, Conn, UdpFlow)> = Family::BOTH
                .iter()
                .map(|&f| {
                    let tcp = conn_to(client, vip(42).sock(f, 80), "be1");
                    let udp = udp_flow_to(client, vip(42).sock(f, 53), "be1");
                    (f, tcp, udp)
                })
                .collect();
            let file = lab.simple("flap", flap.clone(), &[ep("be1", Cond::Terminating)]);
            lab.apply("flap.json", &file);
            for (family, tcp, udp) in &mut live {
                lab.expect_slots(0, vip(42).get(*family), 80, "TCP", &[]);
                let what = format!("{family:?} only endpoint terminating");
                let answer = tcp.ask().answer(&format!("{what}: established TCP"));
                assert_eq!(answer.backend, "be1", "{what}: TCP moved");
                let answer = udp.ask(IO_TIMEOUT).answer(&format!("{what}: UDP flow"));
                assert_eq!(answer.backend, "be1", "{what}: UDP moved");
                let outcome = tcp_once(client, vip(42).sock(*family, 80), IO_TIMEOUT);
                assert_refused(&format!("{what}: new TCP connection"), &outcome);
            }
        },
    );
    sc.run(
        "readiness flap: TCP stays, UDP moves to a ready endpoint",
        || {
            let file = lab.simple("flap", flap.clone(), &[ready("be1"), ready("be2")]);
            lab.apply("flap.json", &file);
            let mut live: Vec<(Family, Conn, UdpFlow)> = Family::BOTH
                .iter()
                .map(|&f| {
                    let tcp = conn_to(client, vip(42).sock(f, 80), "be1");
                    let udp = udp_flow_to(client, vip(42).sock(f, 53), "be1");
                    (f, tcp, udp)
                })
                .collect();
            let file = lab.simple(
                "flap",
                flap.clone(),
                &[ep("be1", Cond::NotReady), ready("be2")],
            );
            lab.apply("flap.json", &file);
            for (family, tcp, udp) in &mut live {
                lab.expect_slots(0, vip(42).get(*family), 80, "TCP", &["be2:8080"]);
                let what = format!("{family:?} be1 not ready");
                let answer = tcp.ask().answer(&format!("{what}: established TCP"));
                assert_eq!(answer.backend, "be1", "{what}: TCP cut or moved");
                let answer = udp.ask(IO_TIMEOUT).answer(&format!("{what}: UDP flow"));
                assert_eq!(answer.backend, "be2", "{what}: UDP flow not moved");
                let answers = tcp_batch(client, vip(42).sock(*family, 80), 10);
                assert_spread(&format!("{what}: new flows"), &answers, &["be2:8080"]);
            }
            let file = lab.simple("flap", flap.clone(), &[ready("be1"), ready("be2")]);
            lab.apply("flap.json", &file);
            for (family, tcp, _) in &mut live {
                let what = format!("{family:?} be1 ready again");
                let answer = tcp.ask().answer(&format!("{what}: established TCP"));
                assert_eq!(answer.backend, "be1", "{what}: TCP moved");
            }
        },
    );
    sc.run("one pod behind two Services, removed from one", || {
        let one = service("one", 43, "ClusterIP", &HTTP_DNS).session_affinity("ClientIP");
        let two = service("two", 44, "ClusterIP", &HTTP_DNS);
        let file = lab.simple("one", one.clone(), &[ready("be1")]);
        lab.apply("one.json", &file);
        let file = lab.simple("two", two, &[ready("be1")]);
        lab.apply("two.json", &file);
        let flows: Vec<(Family, UdpFlow, UdpFlow)> = Family::BOTH
            .iter()
            .map(|&f| {
                // The client of `one` gets its affinity entry (to be1) too.
                let answers = tcp_batch(client, vip(43).sock(f, 80), 2);
                assert_spread(&format!("{f:?} one, before"), &answers, &["be1:8080"]);
                let of_one = udp_flow_to(client, vip(43).sock(f, 53), "be1");
                let of_two = udp_flow_to(client, vip(44).sock(f, 53), "be1");
                (f, of_one, of_two)
            })
            .collect();
        let file = lab.simple("one", one, &[ready("be2")]);
        lab.apply("one.json", &file);
        for (family, of_one, of_two) in &flows {
            lab.expect_slots(0, vip(43).get(*family), 80, "TCP", &["be2:8080"]);
            let what = format!("{family:?} be1 removed from one only");
            let answer = of_one
                .ask(IO_TIMEOUT)
                .answer(&format!("{what}: one's UDP flow"));
            assert_eq!(answer.backend, "be2", "{what}: one's UDP flow kept be1");
            let answer = of_two
                .ask(IO_TIMEOUT)
                .answer(&format!("{what}: two's UDP flow"));
            assert_eq!(answer.backend, "be1", "{what}: two's UDP flow moved");
            let answers = tcp_batch(client, vip(43).sock(*family, 80), 5);
            assert_spread(&format!("{what}: one's affinity"), &answers, &["be2:8080"]);
        }
    });
}
