//! Which path a Service takes (issue 3, behaviours 9, 10 and 11): hairpin
//! on both nodes; Services that are skipped (another proxy's, headless,
//! `ExternalName`); topology-aware routing with `--zone`; type changes with
//! nothing stale in either agent's maps.
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
//! Run: `cargo test -p lb-userspace --test harness_services_routing -- --nocapture`

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use support::clients::{
    assert_source_preserved, assert_spread, assert_unanswered, tcp_batch, tcp_once, udp_batch,
};
use support::cluster::{
    Cluster, Ep, Fe, UNANSWERED_WAIT, cluster_fes, fe, hairpin, lb_ip, ready, service, vip,
};
use support::manifests::{HTTP_DNS, Manifest, sp};
use support::pins::require_privileged;
use support::scenarios::Scenarios;
use support::serial;
use support::topo::Family;

/// One step of the type-change scenario.
struct Stage {
    name: &'static str,
    type_: &'static str,
}

impl Stage {
    fn node_port(&self) -> bool {
        matches!(self.type_, "NodePort" | "LoadBalancer")
    }
}

/// Behaviours 9, 10 and 11: hairpin on both nodes; Services skipped
/// (proxy-name label, headless, `ExternalName`); topology-aware routing with
/// `--zone`; type changes `ClusterIP` -> `NodePort` -> `LoadBalancer` ->
/// `NodePort` -> `ClusterIP` -> `ExternalName` with nothing stale in either
/// agent's maps.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per behaviour, sharing one topology"
)]
fn hairpin_skipping_topology_and_type_changes() {
    let _serial = serial();
    if !require_privileged("harness_services_routing: hairpin_skipping_topology_and_type_changes") {
        return;
    }
    let mut lab = Cluster::new("hairpin");
    let client = lab.ns("client1");
    let ext = lab.ns("ext");
    let mut sc = Scenarios::default();

    // Hairpin: be1 (node1) and be3 (node2) reach their own Service.
    let file = lab.simple(
        "self",
        service("self", 50, "ClusterIP", &HTTP_DNS),
        &[ready("be1")],
    );
    lab.apply("self.json", &file);
    let file = lab.simple(
        "self3",
        service("self3", 55, "ClusterIP", &HTTP_DNS),
        &[ready("be3")],
    );
    lab.apply("self3.json", &file);
    for family in Family::BOTH {
        sc.run(&format!("{family:?} hairpin"), || {
            for (pod, n) in [("be1", 50), ("be3", 55)] {
                let expected = format!("{pod}:8080");
                let what = format!("{family:?} hairpin {pod} -> own Service TCP");
                let answers = tcp_batch(&lab.ns(pod), vip(n).sock(family, 80), 3);
                assert_spread(&what, &answers, &[expected.as_str()]);
                for a in &answers {
                    assert_eq!(
                        a.peer.ip(),
                        hairpin(family),
                        "{what}: the server saw {} (client {}), expected the hairpin source",
                        a.peer,
                        a.local
                    );
                }
                let what = format!("{family:?} hairpin {pod} -> own Service UDP");
                let answers = udp_batch(&lab.ns(pod), vip(n).sock(family, 53), 3);
                assert_spread(&what, &answers, &[expected.as_str()]);
                assert!(
                    answers.iter().all(|a| a.peer.ip() == hairpin(family)),
                    "{what}: the server should see the hairpin source: {answers:?}"
                );
            }
            // Not hairpin: another pod reaching that Service keeps its source.
            let what = format!("{family:?} be2 -> be1's Service (no hairpin)");
            let answers = tcp_batch(&lab.ns("be2"), vip(50).sock(family, 80), 3);
            assert_spread(&what, &answers, &["be1:8080"]);
            assert_source_preserved(&what, &answers);
        });
    }

    // Skipped Services: another proxy's, headless, ExternalName (with a
    // clusterIP, so that only its type can make it skipped).
    let foreign = service("foreign", 51, "ClusterIP", &HTTP_DNS)
        .label("service.kubernetes.io/service-proxy-name", "other-proxy");
    let file = lab.simple("foreign", foreign, &[ready("be1")]);
    lab.apply("foreign.json", &file);
    let headless = service("headless", 52, "ClusterIP", &HTTP_DNS).headless();
    let file = lab.simple("headless", headless, &[ready("be1")]);
    lab.apply("headless.json", &file);
    let extname =
        service("extname", 56, "ExternalName", &HTTP_DNS).external_name("backend.cluster.invalid");
    let file = lab.simple("extname", extname, &[ready("be1")]);
    lab.apply("extname.json", &file);

    // Topology: node1 is zone-a, node2 zone-b.
    let zoned = |hints: [Option<&'static str>; 4]| -> [Ep; 4] {
        [
            ready("be1").zoned("zone-a", hints[0]),
            ready("be2").zoned("zone-b", hints[1]),
            ready("be3").zoned("zone-a", hints[2]),
            ready("be4").zoned("zone-b", hints[3]),
        ]
    };
    let hinted = zoned([
        Some("zone-a"),
        Some("zone-b"),
        Some("zone-a"),
        Some("zone-b"),
    ]);
    let topo = service("topo", 54, "ClusterIP", &HTTP_DNS).traffic_distribution("PreferClose");
    let file = lab.simple("topo", topo.clone(), &hinted);
    lab.apply("topo.json", &file);

    // Frontends of both agents from here on, besides `morph`'s.
    let base: BTreeSet<Fe> = [50, 55, 54]
        .iter()
        .flat_map(|&n| cluster_fes(n, &[(80, "TCP"), (53, "UDP")]))
        .collect();
    sc.run(
        "skipped Services (proxy-name, headless, ExternalName)",
        || {
            for i in 0..2 {
                assert_eq!(
                    lab.frontends(i),
                    base,
                    "`lb services` of {}: skipped Services must have no frontends",
                    lab.topo.nodes[i].name
                );
            }
            for family in Family::BOTH {
                for (n, name) in [(51, "foreign"), (56, "extname")] {
                    assert_unanswered(
                        &format!("{family:?} client1 -> skipped Service {name}"),
                        &tcp_once(&client, vip(n).sock(family, 80), UNANSWERED_WAIT),
                    );
                }
            }
        },
    );

    let near = ["be1:8080", "be3:8080"];
    let far = ["be2:8080", "be4:8080"];
    let all4 = ["be1:8080", "be2:8080", "be3:8080", "be4:8080"];
    sc.run("topology: PreferClose keeps this zone's endpoints", || {
        for family in Family::BOTH {
            let v = vip(54).get(family);
            lab.expect_slots(0, v, 80, "TCP", &near);
            lab.expect_slots(1, v, 80, "TCP", &far);
            let what = format!("{family:?} PreferClose from zone-a");
            let answers = tcp_batch(&client, vip(54).sock(family, 80), 30);
            assert_spread(&what, &answers, &near);
        }
    });
    sc.run("topology: nothing hinted for this zone -> all", || {
        let file = lab.simple(
            "topo",
            topo.clone(),
            &zoned([
                Some("zone-c"),
                Some("zone-b"),
                Some("zone-c"),
                Some("zone-b"),
            ]),
        );
        lab.apply("topo.json", &file);
        for family in Family::BOTH {
            let v = vip(54).get(family);
            lab.expect_slots(0, v, 80, "TCP", &all4);
            lab.expect_slots(1, v, 80, "TCP", &far);
            let what = format!("{family:?} PreferClose, nothing hinted for zone-a");
            let answers = tcp_batch(&client, vip(54).sock(family, 80), 40);
            assert_spread(&what, &answers, &all4);
        }
    });
    sc.run("topology: an endpoint without hints -> all", || {
        let file = lab.simple(
            "topo",
            topo.clone(),
            &zoned([Some("zone-a"), Some("zone-b"), Some("zone-a"), None]),
        );
        lab.apply("topo.json", &file);
        for family in Family::BOTH {
            let v = vip(54).get(family);
            lab.expect_slots(0, v, 80, "TCP", &all4);
            lab.expect_slots(1, v, 80, "TCP", &all4);
        }
    });
    sc.run("topology: topology-mode Auto annotation", || {
        let annotated = service("topo", 54, "ClusterIP", &HTTP_DNS)
            .annotation("service.kubernetes.io/topology-mode", "Auto");
        let file = lab.simple("topo", annotated, &hinted);
        lab.apply("topo.json", &file);
        for family in Family::BOTH {
            let v = vip(54).get(family);
            lab.expect_slots(0, v, 80, "TCP", &near);
            lab.expect_slots(1, v, 80, "TCP", &far);
            let what = format!("{family:?} topology-mode Auto from zone-a");
            let answers = tcp_batch(&client, vip(54).sock(family, 80), 30);
            assert_spread(&what, &answers, &near);
        }
    });
    sc.run("topology: hints apply whatever the Service asks", || {
        // kube-proxy reads the hints alone, not the Service's fields.
        let plain = service("topo", 54, "ClusterIP", &HTTP_DNS);
        let file = lab.simple("topo", plain, &hinted);
        lab.apply("topo.json", &file);
        for family in Family::BOTH {
            let v = vip(54).get(family);
            lab.expect_slots(0, v, 80, "TCP", &near);
            lab.expect_slots(1, v, 80, "TCP", &far);
        }
    });
    sc.run(
        "topology: PreferSameNode keeps this node's endpoints",
        || {
            let same_node =
                service("topo", 54, "ClusterIP", &HTTP_DNS).traffic_distribution("PreferSameNode");
            let file = lab.simple("topo", same_node, &hinted.map(Ep::same_node));
            lab.apply("topo.json", &file);
            let node1 = ["be1:8080", "be2:8080"];
            for family in Family::BOTH {
                let v = vip(54).get(family);
                lab.expect_slots(0, v, 80, "TCP", &node1);
                lab.expect_slots(1, v, 80, "TCP", &["be3:8080", "be4:8080"]);
                let what = format!("{family:?} PreferSameNode from node1");
                let answers = tcp_batch(&client, vip(54).sock(family, 80), 30);
                assert_spread(&what, &answers, &node1);
            }
        },
    );

    // Type changes of `morph` (53): each agent's whole frontend set is
    // compared (nothing stale), then the client's view.
    let morph_eps = [ready("be1"), ready("be3")];
    let both = ["be1:8080", "be3:8080"];
    let stages = [
        Stage {
            name: "ClusterIP",
            type_: "ClusterIP",
        },
        Stage {
            name: "NodePort",
            type_: "NodePort",
        },
        Stage {
            name: "LoadBalancer",
            type_: "LoadBalancer",
        },
        Stage {
            name: "back to NodePort",
            type_: "NodePort",
        },
        Stage {
            name: "back to ClusterIP",
            type_: "ClusterIP",
        },
        Stage {
            name: "ExternalName",
            type_: "ExternalName",
        },
    ];
    for stage in &stages {
        let port = if stage.node_port() {
            sp("http", 80, "TCP", "8080").node(30090)
        } else {
            sp("http", 80, "TCP", "8080")
        };
        // As the API server and the service controller leave them: a
        // nodePort only on NodePort/LoadBalancer, an ingress status only on
        // LoadBalancer; the clusterIPs stay (also on ExternalName, so that
        // only the type can make it skipped).
        let mut morph = service("morph", 53, stage.type_, &[port]);
        if stage.type_ == "LoadBalancer" {
            let [ingress4, ingress6] = lb_ip(53).strings();
            morph = morph.ingress_ip(&ingress4).ingress_ip(&ingress6);
        }
        if stage.type_ == "ExternalName" {
            morph = morph.external_name("morph.cluster.invalid");
        }
        let morph = Manifest::default()
            .with(&morph.build())
            .with_all(&lab.slices("morph", "a", &[("http", 8080, "TCP")], &morph_eps));
        lab.apply("morph.json", &morph);
        sc.run(&format!("type change to {}: maps", stage.name), || {
            for i in 0..2 {
                let mut morph_fes = Vec::new();
                if stage.type_ != "ExternalName" {
                    morph_fes.extend(cluster_fes(53, &[(80, "TCP")]));
                }
                if stage.node_port() {
                    for family in Family::BOTH {
                        morph_fes.push(fe(lab.node_ip(i, family), 30090, "TCP"));
                    }
                }
                if stage.type_ == "LoadBalancer" {
                    for family in Family::BOTH {
                        morph_fes.push(fe(lb_ip(53).get(family), 80, "TCP"));
                    }
                }
                let mut expected = base.clone();
                expected.extend(morph_fes.iter().cloned());
                let got = lab.frontends(i);
                assert_eq!(
                    got,
                    expected,
                    "morph {}: `lb services` of {} (stale: {:?}, missing: {:?})",
                    stage.name,
                    lab.topo.nodes[i].name,
                    got.difference(&expected).collect::<Vec<_>>(),
                    expected.difference(&got).collect::<Vec<_>>()
                );
                for (addr, port, proto) in &morph_fes {
                    lab.expect_slots(i, *addr, *port, proto, &both);
                }
            }
        });
        for family in Family::BOTH {
            sc.run(
                &format!("{family:?} type change to {}: traffic", stage.name),
                || {
                    let what = format!("{family:?} morph {}", stage.name);
                    let cluster = vip(53).sock(family, 80);
                    if stage.type_ == "ExternalName" {
                        assert_unanswered(
                            &format!("{what}: client1 -> former ClusterIP"),
                            &tcp_once(&client, cluster, UNANSWERED_WAIT),
                        );
                    } else {
                        let answers = tcp_batch(&client, cluster, 20);
                        assert_spread(&format!("{what}: client1 -> ClusterIP"), &answers, &both);
                    }
                    let node_port = SocketAddr::new(lab.node_ip(0, family), 30090);
                    if stage.node_port() {
                        let answers = tcp_batch(&ext, node_port, 20);
                        assert_spread(&format!("{what}: ext -> NodePort"), &answers, &both);
                    } else {
                        assert_unanswered(
                            &format!("{what}: ext -> former NodePort"),
                            &tcp_once(&ext, node_port, UNANSWERED_WAIT),
                        );
                    }
                    let lb_addr = lb_ip(53).sock(family, 80);
                    if stage.type_ == "LoadBalancer" {
                        let answers = tcp_batch(&ext, lb_addr, 20);
                        assert_spread(&format!("{what}: ext -> LB IP"), &answers, &both);
                    } else {
                        assert_unanswered(
                            &format!("{what}: ext -> LB IP"),
                            &tcp_once(&ext, lb_addr, UNANSWERED_WAIT),
                        );
                    }
                },
            );
        }
    }
    lab.finish(sc);
}
