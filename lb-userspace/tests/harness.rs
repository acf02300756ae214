//! Level-3 harness, one node: the `lb` agent in a "node" network namespace,
//! a client and four backends in namespaces of their own, joined to the
//! node by veth pairs (see `support::lab` for the picture), real TCP/UDP
//! clients and servers over IPv4 and IPv6. Load balancing and reverse NAT,
//! endpoint changes, malformed manifests, and an agent restart.
//!
//! Everything lives in namespaces this test creates (the node included);
//! nothing is added to the root namespace. Namespaces, agent processes, pins,
//! server threads and temporary files are removed by drop guards, also when an
//! assertion fails. Privileged: needs root and bpffs (see `support::pins`).
//!
//! Run: `cargo test -p lb-userspace --test harness -- --nocapture`
//! (the tests run one at a time; each builds its own topology).

mod support;

use std::ffi::CString;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::clients::{
    Answer, Conn, assert_connected_to, assert_only, assert_source_preserved, assert_spread,
    conn_to, tcp_batch, udp_batch,
};
use support::lab::{BACKEND_PORT, DNS_PORT, Expect, HTTP_PORT, Lab, WEB_PORTS, service_file, vip};
use support::manifests::{Manifest, service, sp};
use support::netns::{in_netns, ns_command};
use support::pins::require_privileged;
use support::process::{have_program, output_with_timeout};
use support::serial;
use support::topo::Family;

/// The agent must reflect a manifest change in the maps within this.
const CHANGE_DEADLINE: Duration = Duration::from_secs(1);

/// N fresh TCP connections from NS to TO, one request each, every one
/// checked: the client's socket is connected to TO (the replies came back
/// from TO: reverse NAT) and the backend saw the client's own address
/// (DNAT only, no SNAT).
fn tcp_checked(what: &str, ns: &str, to: SocketAddr, n: usize) -> Vec<Answer> {
    let answers = tcp_batch(ns, to, n);
    assert_connected_to(what, &answers, to);
    assert_source_preserved(what, &answers);
    answers
}

/// N UDP requests from fresh sockets connected to TO (the kernel drops any
/// reply whose source is not TO), checked like `tcp_checked`.
fn udp_checked(what: &str, ns: &str, to: SocketAddr, n: usize) -> Vec<Answer> {
    let answers = udp_batch(ns, to, n);
    assert_connected_to(what, &answers, to);
    assert_source_preserved(what, &answers);
    answers
}

/// One more request on an established connection; the backend still sees
/// the client's own address.
fn ask_checked(conn: &mut Conn, what: &str) -> Answer {
    let answer = conn.ask().answer(what);
    assert_source_preserved(what, std::slice::from_ref(&answer));
    answer
}

/// Programs attached at ingress of IFACE in the node namespace: TCX links
/// (queried with `BPF_PROG_QUERY` from a thread in the namespace) plus clsact
/// `bpf` filters (`tc filter show`). Returns the count and a description.
fn ingress_programs(node_ns: &str, iface: &str) -> (usize, String) {
    use aya::programs::{SchedClassifier, TcAttachType};
    let name = CString::new(iface).expect("interface name without NUL");
    let tcx = in_netns(node_ns, || {
        SchedClassifier::query_tcx(name.as_c_str(), TcAttachType::Ingress)
            .map(|(_, programs)| {
                programs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())
    });
    let mut count = 0;
    let mut description = String::new();
    match tcx {
        Ok(programs) => {
            count += programs.len();
            let _ = write!(description, "tcx ingress: {programs:?}");
        }
        Err(e) => {
            let _ = write!(description, "tcx query failed ({e})");
        }
    }
    let mut tc = ns_command(node_ns, "tc");
    tc.args(["filter", "show", "dev", iface, "ingress"]);
    if let Ok(out) = output_with_timeout(&mut tc, Duration::from_secs(5)) {
        let text = String::from_utf8_lossy(&out.stdout);
        let filters: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
            .collect();
        count += filters.len();
        let _ = write!(description, "; tc ingress bpf filters: {filters:?}");
    }
    if have_program("bpftool") {
        let mut bpftool = ns_command(node_ns, "bpftool");
        bpftool.args(["net", "show", "dev", iface]);
        if let Ok(out) = output_with_timeout(&mut bpftool, Duration::from_secs(5)) {
            let _ = write!(
                description,
                "; bpftool net show: {:?}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }
    (count, description)
}

fn assert_single_attachment(lab: &Lab, when: &str) {
    for iface in lab.topo.node_ifaces() {
        let (count, description) = ingress_programs(lab.node_ns(), &iface);
        eprintln!("{when}: {iface}: {description}");
        assert_eq!(
            count, 1,
            "{when}: {iface} should have exactly one lb program at ingress: {description}"
        );
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The topology alone (no agent): the client reaches every backend directly
/// through the node's routing, both families, TCP and UDP. If this fails the
/// problem is the harness or the host, not the load balancer.
#[test]
fn topology_routes_directly() {
    let _serial = serial();
    if !require_privileged("harness: topology_routes_directly") {
        return;
    }
    let lab = Lab::new();
    for be in &lab.topo.backends {
        for family in Family::BOTH {
            let to = be.addr.sock(family, BACKEND_PORT);
            let what = format!("direct {to}");
            let expected = format!("{}:{BACKEND_PORT}", be.name);
            for answers in [
                tcp_checked(&what, lab.client_ns(), to, 2),
                udp_checked(&what, lab.client_ns(), to, 2),
            ] {
                assert_spread(&what, &answers, &[expected.as_str()]);
            }
        }
    }
}

/// Scenarios 1, 2 and 4: the dual-stack `web` Service answers on both VIPs,
/// spreads 60 connections over every ready endpoint (never the not-ready
/// one), the client's socket is connected to the VIP (TCP handshake and UDP
/// replies came back from the VIP: reverse NAT), and the backend saw the
/// client's own address. Single-stack Services (one with a named targetPort)
/// work too.
#[test]
fn balancing_and_reverse_nat() {
    let _serial = serial();
    if !require_privileged("harness: balancing_and_reverse_nat") {
        return;
    }
    let mut lab = Lab::new();
    let web = lab.web_file(&[("be1", true), ("be2", true), ("be3", true), ("be4", false)]);
    lab.write_manifest("web.json", &web);
    let solo4_vip = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 20));
    let solo6_vip = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20));
    let solo4 = service_file(
        "solo4",
        &[solo4_vip],
        &WEB_PORTS[..1],
        &[
            (lab.topo.backend("be1"), true),
            (lab.topo.backend("be2"), true),
        ],
    );
    let solo6 = service_file(
        "solo6",
        &[solo6_vip],
        &[sp("http", HTTP_PORT, "TCP", "web")],
        &[
            (lab.topo.backend("be3"), true),
            (lab.topo.backend("be4"), true),
        ],
    );
    lab.write_manifest("solo4.json", &solo4);
    lab.write_manifest("solo6.json", &solo6);
    lab.start_agent();

    for path in ["/healthz", "/metrics"] {
        assert_eq!(lab.http_status(path), Ok(200), "GET {path}");
    }
    let mut expect = lab.web_expect(&["be1", "be2", "be3"]);
    expect.push(Expect {
        vip: solo4_vip,
        port: HTTP_PORT,
        protocol: "TCP",
        active: lab.topo.backend_addrs(Family::V4, &["be1", "be2"]),
    });
    expect.push(Expect {
        vip: solo6_vip,
        port: HTTP_PORT,
        protocol: "TCP",
        active: lab.topo.backend_addrs(Family::V6, &["be3", "be4"]),
    });
    lab.wait_programmed(Instant::now(), &expect);

    let three = ["be1:8080", "be2:8080", "be3:8080"];
    for family in Family::BOTH {
        let to = vip(family, HTTP_PORT);
        let what = format!("{family:?} TCP {to}");
        let answers = tcp_checked(&what, lab.client_ns(), to, 60);
        assert_spread(&what, &answers, &three);

        let to = vip(family, DNS_PORT);
        let what = format!("{family:?} UDP {to}");
        let answers = udp_checked(&what, lab.client_ns(), to, 30);
        assert_spread(&what, &answers, &three);
    }
    for (to, backends) in [
        (
            SocketAddr::new(solo4_vip, HTTP_PORT),
            ["be1:8080", "be2:8080"],
        ),
        (
            SocketAddr::new(solo6_vip, HTTP_PORT),
            ["be3:8080", "be4:8080"],
        ),
    ] {
        let what = format!("single-stack TCP {to}");
        let answers = tcp_checked(&what, lab.client_ns(), to, 20);
        assert_spread(&what, &answers, &backends);
    }
    lab.assert_agent_alive();
}

/// Scenario 3: one manifest change removes be2, adds be4 and marks be3 not
/// ready. The maps follow within 1 s of the rename; new connections go only
/// to be1 and be4; established connections to be1 keep working.
#[test]
fn endpoint_change_applies_within_a_second() {
    let _serial = serial();
    if !require_privileged("harness: endpoint_change_applies_within_a_second") {
        return;
    }
    let mut lab = Lab::new();
    let before = lab.web_file(&[("be1", true), ("be2", true), ("be3", true)]);
    lab.write_manifest("web.json", &before);
    lab.start_agent();
    lab.wait_programmed(Instant::now(), &lab.web_expect(&["be1", "be2", "be3"]));

    let mut kept: Vec<Conn> = Family::BOTH
        .iter()
        .map(|f| conn_to(lab.client_ns(), vip(*f, HTTP_PORT), "be1"))
        .collect();

    let after = lab.web_file(&[("be1", true), ("be3", false), ("be4", true)]);
    let renamed = lab.write_manifest("web.json", &after);
    let took = lab.wait_programmed(renamed, &lab.web_expect(&["be1", "be4"]));
    eprintln!("endpoint change reached the maps {took:?} after the rename");
    assert!(
        took <= CHANGE_DEADLINE,
        "endpoint change took {took:?} to reach the maps (limit {CHANGE_DEADLINE:?})"
    );

    let two = ["be1:8080", "be4:8080"];
    for family in Family::BOTH {
        let what = format!("{family:?} TCP after change");
        let answers = tcp_checked(&what, lab.client_ns(), vip(family, HTTP_PORT), 40);
        assert_spread(&what, &answers, &two);
        let what = format!("{family:?} UDP after change");
        let answers = udp_checked(&what, lab.client_ns(), vip(family, DNS_PORT), 20);
        assert_only(&what, &answers, &two);
    }
    for conn in &mut kept {
        let answer = ask_checked(conn, "established connection across the change");
        assert_eq!(answer.backend, "be1", "established connection moved");
    }
    lab.assert_agent_alive();
}

/// Scenario 5: broken YAML and a Service with an invalid clusterIP are
/// reported (by file / object name) and skipped; the working Service keeps
/// answering and a valid Service added at the same time is programmed.
#[test]
fn malformed_manifests_are_reported_and_skipped() {
    let _serial = serial();
    if !require_privileged("harness: malformed_manifests_are_reported_and_skipped") {
        return;
    }
    let mut lab = Lab::new();
    let web = lab.web_file(&[("be1", true), ("be2", true), ("be3", true)]);
    lab.write_manifest("web.json", &web);
    lab.start_agent();
    lab.wait_programmed(Instant::now(), &lab.web_expect(&["be1", "be2", "be3"]));

    lab.write_raw(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken-yaml\n  namespace: default\n\
         spec:\n  clusterIPs: [\"198.19.0.40\"\n  ports: {port: 80\n - :\n",
    );
    let bad_ip = service(
        "bad-vip",
        "ClusterIP",
        &[IpAddr::V4(Ipv4Addr::new(198, 19, 0, 50))],
        &WEB_PORTS[..1],
    )
    .ips(["999.1.1.1"]);
    let bad_ip = Manifest::default().with(&bad_ip.build());
    let bad_text = bad_ip.text();
    assert!(bad_text.contains("999.1.1.1") && !bad_text.contains("198.19.0.50"));
    lab.write_manifest("bad-vip.json", &bad_ip);
    let extra_vips = [
        IpAddr::V4(Ipv4Addr::new(198, 19, 0, 30)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x30)),
    ];
    let extra = service_file(
        "extra",
        &extra_vips,
        &WEB_PORTS[..1],
        &[(lab.topo.backend("be4"), true)],
    );
    let added = lab.write_manifest("extra.json", &extra);

    let mut expect = lab.web_expect(&["be1", "be2", "be3"]);
    for (vip, family) in extra_vips.iter().zip(Family::BOTH) {
        expect.push(Expect {
            vip: *vip,
            port: HTTP_PORT,
            protocol: "TCP",
            active: lab.topo.backend_addrs(family, &["be4"]),
        });
    }
    lab.wait_programmed(added, &expect);

    let mut missing = vec!["bad-vip", "broken.yaml"];
    let start = Instant::now();
    while !missing.is_empty() && start.elapsed() < Duration::from_secs(3) {
        let log = lab.log_text();
        missing.retain(|needle| !log.contains(needle));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        missing.is_empty(),
        "the agent log does not mention {missing:?} (invalid input must be reported with its name)"
    );
    lab.assert_agent_alive();

    for family in Family::BOTH {
        let what = format!("{family:?} web after bad input");
        let answers = tcp_checked(&what, lab.client_ns(), vip(family, HTTP_PORT), 20);
        assert_only(&what, &answers, &["be1:8080", "be2:8080", "be3:8080"]);
        let to = SocketAddr::new(extra_vips[usize::from(family == Family::V6)], HTTP_PORT);
        let what = format!("{family:?} extra {to}");
        let answers = tcp_checked(&what, lab.client_ns(), to, 5);
        assert_spread(&what, &answers, &["be4:8080"]);
    }
    let views = lab.services().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        views
            .iter()
            .all(|v| v.addr != IpAddr::V4(Ipv4Addr::new(198, 19, 0, 40))),
        "the broken file's VIP was programmed: {views:#?}"
    );
}

/// Scenario 6: SIGKILL the agent; established and new connections keep
/// working from the pinned state; a new agent on the same pins becomes ready,
/// keeps the same ids, does not stack a second program on any interface, and
/// the old connections still work.
#[test]
fn agent_restart_keeps_datapath() {
    let _serial = serial();
    if !require_privileged("harness: agent_restart_keeps_datapath") {
        return;
    }
    let mut lab = Lab::new();
    let web = lab.web_file(&[("be1", true), ("be2", true), ("be3", true)]);
    lab.write_manifest("web.json", &web);
    lab.start_agent();
    lab.wait_programmed(Instant::now(), &lab.web_expect(&["be1", "be2", "be3"]));
    let state_before = lab.services().unwrap_or_else(|e| panic!("{e}"));
    assert_single_attachment(&lab, "first agent");

    let mut conns: Vec<(Conn, String)> = Family::BOTH
        .iter()
        .map(|f| {
            let mut conn = Conn::open(lab.client_ns(), vip(*f, HTTP_PORT))
                .unwrap_or_else(|o| panic!("connect: {o:?}"));
            let backend = ask_checked(&mut conn, "first request").backend;
            (conn, backend)
        })
        .collect();

    let three = ["be1:8080", "be2:8080", "be3:8080"];
    lab.kill_agent();
    for (conn, backend) in &mut conns {
        let answer = ask_checked(conn, "connection with the agent down");
        assert_eq!(
            &answer.backend, backend,
            "connection moved with the agent down"
        );
    }
    for family in Family::BOTH {
        let what = format!("{family:?} new connections, agent down");
        let answers = tcp_checked(&what, lab.client_ns(), vip(family, HTTP_PORT), 10);
        assert_only(&what, &answers, &three);
    }

    lab.start_agent();
    lab.wait_programmed(Instant::now(), &lab.web_expect(&["be1", "be2", "be3"]));
    let state_after = lab.services().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        state_after, state_before,
        "ids/state changed across the restart (ids must be recovered from the pins)"
    );
    for (conn, backend) in &mut conns {
        let answer = ask_checked(conn, "connection across the restart");
        assert_eq!(
            &answer.backend, backend,
            "connection moved across the restart"
        );
    }
    for family in Family::BOTH {
        let what = format!("{family:?} new connections after restart");
        let answers = tcp_checked(&what, lab.client_ns(), vip(family, HTTP_PORT), 30);
        assert_spread(&what, &answers, &three);
    }
    assert_single_attachment(&lab, "restarted agent");
    lab.assert_agent_alive();
}
