//! `lb explain` (root): the real binary against a private copy of the
//! program and its pinned maps, on both families: every outcome kind
//! (translated with and without source NAT, established, reply, TCP and
//! UDP refusal, drop, pass), and not one map or counter changed by it.
//! Bad arguments: one line, non-zero exit.

mod support;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{AffinityEntry, AffinityKey, map_names};
use lb_userspace::model::{FrontendKind, Protocol};
use serde_json::Value;

use support::frames::{Frame, TCP_ACK, TCP_SYN, verify_checksums};
use support::prog_test::{
    BACKENDS4, BACKENDS6, Fixture, NODE4, NODE6, TC_ACT_OK, VIP4, VIP6, addrs, frontend,
    node_config, spec,
};

/// One family's addresses for the scenario.
struct Family {
    vip: &'static str,
    backends: [&'static str; 3],
    node: &'static str,
    remote_backend: &'static str,
    lb_ip: &'static str,
    client: &'static str,
    outsider: &'static str,
    range: (&'static str, u8),
    elsewhere: &'static str,
}

const V4: Family = Family {
    vip: VIP4,
    backends: BACKENDS4,
    node: NODE4,
    remote_backend: "198.18.12.2:8080",
    lb_ip: "198.19.7.7",
    client: "198.18.1.2",
    outsider: "203.0.113.9",
    range: ("198.18.1.0", 24),
    elsewhere: "198.51.100.1",
};

const V6: Family = Family {
    vip: VIP6,
    backends: BACKENDS6,
    node: NODE6,
    remote_backend: "[fd00:12::2]:8080",
    lb_ip: "fd00:77::7",
    client: "fd00:1::2",
    outsider: "2001:db8:9::9",
    range: ("fd00:1::", 64),
    elsewhere: "2001:db8:51::1",
};

fn sock(ip: &str, port: u16) -> String {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port).to_string()
}

/// Runs `lb explain` with `args`; returns (success, stdout, stderr).
fn lb_explain(pin_path: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .arg("explain")
        .arg("--pin-path")
        .arg(pin_path)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run lb explain");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `lb explain --json` of one packet.
fn explain(pin_path: &Path, from: &str, to: &str) -> Value {
    let (ok, stdout, stderr) = lb_explain(pin_path, &["--json", "--from", from, "--to", to]);
    assert!(ok, "lb explain --from {from} --to {to}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Everything a packet could change: conntrack entries (all but their
/// age, which is computed at read time), affinity entries, the verdict
/// counters and the per-frontend counters.
fn live_state(fx: &Fixture) -> String {
    let mut ct: Vec<String> = fx
        .conntrack()
        .into_iter()
        .map(|r| {
            format!(
                "{} {} {}->{} be {} fe {} closing {}",
                r.direction,
                r.protocol,
                r.source,
                r.destination,
                r.backend_id,
                r.rev_nat_id,
                r.closing
            )
        })
        .collect();
    ct.sort();
    let affinity = [
        affinity::<[u8; 4]>(&fx.pin_path, map_names::AFFINITY4),
        affinity::<[u8; 16]>(&fx.pin_path, map_names::AFFINITY6),
    ];
    let reasons = fx.maps.reason_counts().unwrap();
    let stats: Vec<_> = fx
        .maps
        .read_state()
        .unwrap()
        .frontends
        .values()
        .map(|f| {
            let s = fx.maps.service_stats(f.rev_nat_id).unwrap();
            (f.rev_nat_id, s.packets, s.bytes)
        })
        .collect();
    format!("{ct:#?}\n{affinity:?}\n{reasons:?}\n{stats:?}")
}

fn affinity<A: lb_common::MapAddr + std::fmt::Debug>(pin_path: &Path, name: &str) -> Vec<String>
where
    AffinityKey<A>: aya::Pod,
{
    let data = MapData::from_pin(pin_path.join(name)).unwrap();
    let map: HashMap<MapData, AffinityKey<A>, AffinityEntry> =
        HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let mut entries: Vec<String> = map
        .iter()
        .map(|e| {
            let (k, v) = e.unwrap();
            format!(
                "{:?}/{} -> {} @{}",
                k.client, k.group, v.backend_id, v.last_used_ns
            )
        })
        .collect();
    entries.sort();
    entries
}

#[test]
fn every_outcome_on_both_families_and_nothing_changes() {
    let _serial = support::serial();
    let Some(mut fx) = Fixture::new("every_outcome_on_both_families_and_nothing_changes") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    let mut specs = Vec::new();
    for f in [&V4, &V6] {
        let backends = addrs(&f.backends);
        let mut cluster_ip = spec(FrontendKind::ClusterIp, &backends);
        cluster_ip.affinity_timeout_s = 600;
        specs.push((frontend(f.vip, 80, Protocol::Tcp), cluster_ip));
        specs.push((
            frontend(f.vip, 53, Protocol::Udp),
            spec(FrontendKind::ClusterIp, &[]),
        ));
        specs.push((
            frontend(f.node, 30080, Protocol::Tcp),
            spec(FrontendKind::NodePort, &addrs(&[f.remote_backend])),
        ));
        specs.push((
            frontend(f.vip, 3868, Protocol::Sctp),
            spec(FrontendKind::ClusterIp, &backends),
        ));
        let mut lb = spec(FrontendKind::LoadBalancer, &addrs(&[f.remote_backend]));
        lb.source_ranges = vec![(f.range.0.parse().unwrap(), f.range.1)];
        specs.push((frontend(f.lb_ip, 80, Protocol::Tcp), lb));
    }
    fx.set_specs(&specs);
    for f in [&V4, &V6] {
        every_outcome(&mut fx, f);
    }
}

/// One family's outcomes, each asked of `lb explain`, around a real flow;
/// the live state is the same before and after.
fn every_outcome(fx: &mut Fixture, f: &Family) {
    {
        // A real flow first (not a dry run): conntrack, affinity, counters.
        let client = sock(f.client, 45_000);
        let vip = sock(f.vip, 80);
        let syn = Frame::tcp(&client, &vip, TCP_SYN);
        let (verdict, out) = fx.run(&syn.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        let (_, backend) = verify_checksums(&out);
        let before = live_state(fx);
        assert!(before.contains("service"), "the real flow is tracked");

        // The established flow: the same backend, from conntrack.
        let e = explain(&fx.pin_path, &client, &vip);
        assert_eq!(e["outcome"], "translated", "{e}");
        assert_eq!(e["established"], true);
        assert_eq!(e["backend"], backend.to_string());
        assert_eq!(e["reason"], "nat_established");
        assert_eq!(e["source_nat"], Value::Null);
        assert_eq!(e["frontend"]["address"], vip);
        assert_eq!(e["frontend"]["kind"], "ClusterIP");
        assert_eq!(e["frontend"]["policies"][0], "affinity");
        assert_eq!(e["candidates"].as_array().unwrap().len(), 3);

        // A new flow from another client: a candidate, client source kept.
        let e = explain(&fx.pin_path, f.outsider, &vip);
        assert_eq!(
            (&e["outcome"], &e["established"]),
            (&"translated".into(), &false.into())
        );
        assert_eq!(e["reason"], "nat_new");
        let picked = e["backend"].as_str().unwrap();
        assert!(
            f.backends
                .iter()
                .any(|b| addrs(&[b])[0].to_string() == picked),
            "{e}"
        );

        // NodePort to a backend on another node: source NAT to the node.
        let e = explain(&fx.pin_path, f.outsider, &sock(f.node, 30080));
        assert_eq!(e["outcome"], "translated", "{e}");
        assert_eq!(e["backend"], addrs(&[f.remote_backend])[0].to_string());
        let snat: SocketAddr = e["source_nat"].as_str().unwrap().parse().unwrap();
        assert_eq!(snat.ip(), f.node.parse::<IpAddr>().unwrap());
        assert_eq!(e["frontend"]["kind"], "external");

        // The backend's reply to the real flow: the frontend restored.
        let e = explain(&fx.pin_path, &backend.to_string(), &client);
        assert_eq!(e["outcome"], "reply", "{e}");
        assert_eq!(e["restored_source"], vip);
        assert_eq!(e["restored_destination"], Value::Null);
        assert_eq!(e["frontend"]["address"], vip);

        // Refusals: an unserved TCP port of the ClusterIP (a reset), the
        // UDP port without endpoints (ICMP port unreachable).
        let e = explain(&fx.pin_path, f.outsider, &sock(f.vip, 81));
        assert_eq!(
            (&e["outcome"], &e["reply"]),
            (&"reject".into(), &"tcp-reset".into()),
            "{e}"
        );
        assert_eq!(e["frontend"], Value::Null);
        let e = explain(
            &fx.pin_path,
            f.outsider,
            &format!("{}/udp", sock(f.vip, 53)),
        );
        assert_eq!(e["outcome"], "reject", "{e}");
        assert_eq!(e["reply"], "icmp-port-unreachable");
        assert_eq!(e["reason"], "reject");
        assert_eq!(e["candidates"].as_array().unwrap().len(), 0);

        sctp_init_is_translated(fx, f);

        // Drop: a client outside the load balancer's source ranges.
        let e = explain(&fx.pin_path, f.outsider, &sock(f.lb_ip, 80));
        assert_eq!(
            (&e["outcome"], &e["reason"]),
            (&"drop".into(), &"drop_source_range".into()),
            "{e}"
        );
        assert_eq!(e["frontend"]["policies"][0], "source-ranges");

        // Pass: not a service address.
        let e = explain(&fx.pin_path, f.client, &sock(f.elsewhere, 80));
        assert_eq!(
            (&e["outcome"], &e["reason"]),
            (&"pass".into(), &"pass_no_service".into()),
            "{e}"
        );

        // The text form says the same.
        let (ok, text, stderr) = lb_explain(
            &fx.pin_path,
            &["--from", f.outsider, "--to", &sock(f.node, 30080)],
        );
        assert!(ok, "{stderr}");
        assert!(
            text.contains("frontend   ") && text.contains("external"),
            "{text}"
        );
        // The same question as the JSON one above: the same answer.
        assert!(text.contains(&format!("source NAT {snat}\n")), "{text}");

        assert_eq!(live_state(fx), before, "lb explain changed live state");

        // The real reply still finds its (unchanged) entry.
        let reply = Frame::tcp(&backend.to_string(), &client, TCP_SYN | TCP_ACK);
        let (verdict, out) = fx.run(&reply.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(verify_checksums(&out).0.to_string(), vip);
    }
}

/// An SCTP INIT to the `ClusterIP`'s SCTP port: translated to a candidate
/// of that frontend (not the TCP one's).
fn sctp_init_is_translated(fx: &Fixture, f: &Family) {
    let e = explain(
        &fx.pin_path,
        f.outsider,
        &format!("{}/sctp", sock(f.vip, 3868)),
    );
    assert_eq!(
        (&e["outcome"], &e["reason"]),
        (&"translated".into(), &"nat_new".into()),
        "{e}"
    );
    assert_eq!(e["candidates"].as_array().unwrap().len(), 3, "{e}");
    let picked = e["backend"].as_str().unwrap();
    assert!(
        f.backends
            .iter()
            .any(|b| addrs(&[b])[0].to_string() == picked),
        "{e}"
    );
}

#[test]
fn bad_arguments_get_one_line() {
    let _serial = support::serial();
    let Some(fx) = Fixture::new("bad_arguments_get_one_line") else {
        return;
    };
    let missing = fx.pin_path.join("not-there");
    for (args, says) in [
        (
            vec!["--from", "10.0.0.x", "--to", "10.96.0.1:80"],
            "not an address",
        ),
        (
            vec!["--from", "10.0.0.2", "--to", "10.96.0.1"],
            "a port is needed",
        ),
        (
            vec!["--from", "10.0.0.2", "--to", "10.96.0.1:80/icmp"],
            "unknown protocol",
        ),
        (
            vec!["--from", "10.0.0.2", "--to", "[fd00::1]:80"],
            "different address families",
        ),
        (
            vec![
                "--from",
                "10.0.0.2",
                "--to",
                "10.96.0.1:80",
                "--iface",
                "nope0",
            ],
            "no such interface",
        ),
        (vec!["--from", "10.0.0.2"], "required arguments"),
    ] {
        let (ok, stdout, stderr) = lb_explain(&fx.pin_path, &args);
        assert!(!ok && stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // No maps pinned there: said, and nothing created.
    let (ok, _, stderr) = lb_explain(&missing, &["--from", "10.0.0.2", "--to", "10.96.0.1:80"]);
    assert!(!ok && stderr.contains("is the agent running"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        !missing.exists(),
        "lb explain created {}",
        missing.display()
    );
}

#[test]
fn iface_is_where_the_packet_arrives() {
    let _serial = support::serial();
    let Some(mut fx) = Fixture::new("iface_is_where_the_packet_arrives") else {
        return;
    };
    // The fixture's thread has a network namespace of its own (see
    // `Fixture::new`); `ip` run from this thread creates the pair there.
    let status = Command::new("ip")
        .args([
            "link", "add", "xpa0", "type", "veth", "peer", "name", "xpb0",
        ])
        .status()
        .expect("ip link add");
    assert!(status.success(), "ip link add");
    let up = Command::new("ip")
        .args(["link", "set", "xpa0", "up"])
        .status()
        .unwrap();
    assert!(up.success());
    fx.set_specs(&[(
        frontend(VIP4, 53, Protocol::Udp),
        spec(FrontendKind::ClusterIp, &[]),
    )]);
    // The kernel runs the packet as arriving on the interface named (the
    // test run's skb gets that device; an unknown index would fail the
    // run), and the answer is the same refusal on each.
    for iface in ["xpa0", "lo"] {
        let (ok, stdout, stderr) = lb_explain(
            &fx.pin_path,
            &[
                "--json",
                "--iface",
                iface,
                "--from",
                "198.18.1.2",
                "--to",
                &format!("{}/udp", sock(VIP4, 53)),
            ],
        );
        assert!(ok, "{iface}: {stderr}");
        let e: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(
            (&e["outcome"], &e["reply"]),
            (&"reject".into(), &"icmp-port-unreachable".into()),
            "{iface}: {e}"
        );
    }
}

#[test]
fn manifests_name_the_service() {
    let _serial = support::serial();
    let Some(mut fx) = Fixture::new("manifests_name_the_service") else {
        return;
    };
    let work = support::process::TempDir::create(&format!("lb-explain-{}", std::process::id()));
    let dir = work.subdir("manifests");
    std::fs::write(
        dir.join("web.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: shop, name: web}}\n\
             spec: {{clusterIP: {VIP4}, clusterIPs: [{VIP4}, \"{VIP6}\"], ipFamilies: [IPv4, IPv6],\n\
             \x20 ipFamilyPolicy: RequireDualStack, ports: [{{name: http, port: 80, protocol: TCP}}]}}\n"
        ),
    )
    .unwrap();
    fx.set_specs(&[
        (
            frontend(VIP4, 80, Protocol::Tcp),
            spec(FrontendKind::ClusterIp, &addrs(&BACKENDS4)),
        ),
        (
            frontend(VIP6, 80, Protocol::Tcp),
            spec(FrontendKind::ClusterIp, &addrs(&BACKENDS6)),
        ),
    ]);
    let dir = dir.display().to_string();
    for (client, vip) in [("198.18.1.2", VIP4), ("fd00:1::2", VIP6)] {
        let (ok, stdout, stderr) = lb_explain(
            &fx.pin_path,
            &[
                "--json",
                "--manifests",
                &dir,
                "--from",
                client,
                "--to",
                &sock(vip, 80),
            ],
        );
        assert!(ok, "{stderr}");
        let e: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(e["frontend"]["service"], "shop/web:http", "{e}");
        assert_eq!(e["frontend"]["kind"], "ClusterIP", "{e}");
        assert_eq!(e["outcome"], "translated", "{e}");
    }
    // Without the directory the maps alone cannot name it.
    let (_, stdout, _) = lb_explain(
        &fx.pin_path,
        &["--json", "--from", "198.18.1.2", "--to", &sock(VIP4, 80)],
    );
    let e: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(e["frontend"]["service"], Value::Null, "{e}");
}
