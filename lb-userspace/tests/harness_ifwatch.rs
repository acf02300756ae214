//! Interface discovery in the veth harness: the agent runs with
//! `--attach-pattern 'h-*'` and no `--attach`, and a pod created after it
//! started is served without a restart; a pod that goes away is forgotten
//! (its link pin removed) and served again when it comes back. With
//! `--xdp=native --xdp-interfaces 'h-lat?'`, the late pod's device gets the
//! XDP program when it appears (and again when it comes back), its pin
//! goes with it, and no other device gets XDP. A tun device that comes
//! later gets the programs for devices without an Ethernet header, which
//! the agent verifies only then (none of its devices needed them before).
//!
//! The agent runs with exactly the capabilities `deploy/daemonset.yaml`
//! grants (and nothing else: `setpriv` empties the bounding set but for
//! those), and each of them is shown to be necessary: without any one, the
//! agent does not start.
//!
//! ```text
//!   client (198.18.1.2)  late (198.18.9.2, created after the agent)
//!        | h-cl               | h-late
//!   node [lb agent --attach-pattern 'h-*']   VIP 198.19.0.10, fd00:96::10
//!        | h-be1              | h-be2 (created after the agent)
//!   be1 (198.18.2.2)     be2 (198.18.3.2)
//! ```
//!
//! Everything lives in namespaces this test creates (addresses in
//! `198.18.0.0/15` and `fd00::/8`); nothing is added to the root namespace.
//! Namespaces, the agent, pins, servers and files are removed by drop
//! guards, also when an assertion fails. Privileged: root and bpffs.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use support::clients::{Conn, Outcome, http_get};
use support::ethtool::{ETHTOOL_STXCSUM, ethtool_set};
use support::manifests::{Cond, Manifest, ManifestDir, service, slice, sp, suffix};
use support::netns::{ns_command, sweep_stale_netns, unique_prefix};
use support::pins::{PinGuard, require_privileged};
use support::process::{
    LogOnPanic, METRICS_ADDR, TempDir, daemonset_capabilities, lb_binary, metrics_addr,
    output_with_timeout, require_tools, run_ok, spawn_logged, wait_until, with_only,
};
use support::servers::Servers;
use support::topo::{Family, Pod, node_netns};

const TAG: &str = "lbi";
const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// How long each step may take.
const STEP: Duration = Duration::from_secs(5);
/// The ingress program for devices without an Ethernet header.
const LB_TC_L3: &str = lb_common::prog_names::TC_LB_L3;

/// The dual-stack `web` Service and its slices with BACKENDS; TRIGGER is
/// the slices' last-change trigger time annotation.
fn manifest(backends: &[&Pod], trigger: &str) -> Manifest {
    let web = service(
        "web",
        "ClusterIP",
        &[IpAddr::V4(VIP4), IpAddr::V6(VIP6)],
        &[sp("http", VIP_PORT, "TCP", "8080")],
    );
    let mut manifest = Manifest::default().with(&web.build());
    for family in Family::BOTH {
        let endpoints = backends
            .iter()
            .map(|pod| Cond::Ready.endpoint(pod.addr.get(family)));
        let mut slice = slice(
            "web",
            &format!("web-{}", suffix(family)),
            family,
            &[("http", BACKEND_PORT, "TCP")],
            endpoints,
        );
        slice.metadata.annotations = Some(BTreeMap::from([(
            "endpoints.kubernetes.io/last-change-trigger-time".to_owned(),
            trigger.to_owned(),
        )]));
        manifest = manifest.with(&slice);
    }
    manifest
}

/// Whether IFACE in NS has an XDP program (`ip -d link` shows `xdp`).
fn has_xdp(ns: &str, iface: &str) -> bool {
    run_ok(ns_command(ns, "ip").args(["-d", "link", "show", iface])).contains(" xdp")
}

/// Frames the XDP program saw, over all its actions.
fn xdp_frames(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("lb_xdp_packets_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn http_status(node_ns: &str, path: &str) -> Result<u16, String> {
    http_get(node_ns, metrics_addr(), path).map(|(code, _)| code)
}

/// N connections from `client_ns` to the VIP of each family; the names of the
/// backends that answered (a connection that completes to the VIP had its
/// replies translated back: reverse NAT on the backend's interface).
fn ask_vips(client_ns: &str, n: usize) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let to = SocketAddr::new(vip, VIP_PORT);
        for _ in 0..n {
            let mut conn = Conn::open(client_ns, to).map_err(|o| format!("connect {to}: {o:?}"))?;
            let answer = match conn.ask() {
                Outcome::Answer(answer) => answer,
                other => return Err(format!("ask {to}: {other:?}")),
            };
            if answer.remote != to {
                return Err(format!("connected to {}, not {to}", answer.remote));
            }
            names.push(answer.backend);
        }
    }
    Ok(names)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn pods_created_after_the_agent_are_served() {
    if !require_privileged("harness_ifwatch: pods_created_after_the_agent_are_served") {
        return;
    }
    require_tools(&["ip", "nsenter", "setpriv"]);
    sweep_stale_netns(TAG);
    let prefix = unique_prefix(TAG);
    let work = TempDir::create(&prefix);
    let manifests = ManifestDir::create(&work);
    let log_path = work.0.join("agent.log");

    let node = node_netns(&format!("{prefix}-node"));
    let client = Pod::wire(&node, &prefix, "client", "h-cl", 1);
    let be1 = Pod::wire(&node, &prefix, "be1", "h-be1", 2);
    let _be1_server = Servers::start(&[&be1], &[BACKEND_PORT]);
    manifests.write("web.json", &manifest(&[&be1], "2020-01-01T00:00:00Z"));
    let pins = PinGuard::new("lb-ifw-", node.name());
    let caps = daemonset_capabilities();
    let agent_args = |pin_path: &Path| -> Vec<String> {
        vec![
            "agent".into(),
            // No socket programs: they would attach to the machine's
            // cgroup root (tests/harness_socklb.rs proves their
            // capabilities on a child cgroup).
            "--socket-lb=off".into(),
            "--source".into(),
            manifests.source(),
            "--attach-pattern".into(),
            "h-*".into(),
            // XDP on one device that does not exist yet (the late pod's).
            "--xdp=native".into(),
            "--xdp-interfaces".into(),
            "h-lat?".into(),
            "--pin-path".into(),
            pin_path.display().to_string(),
            "--metrics-addr".into(),
            METRICS_ADDR.into(),
        ]
    };

    // Each capability is necessary: without it the agent exits with an error.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let probe_pins = PinGuard::new("lb-ifw-cap-", node.name());
        let mut cmd = node.command("setpriv");
        cmd.args(with_only(&fewer, &lb_binary()))
            .args(agent_args(&probe_pins.path));
        let out = output_with_timeout(&mut cmd, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("the agent without {missing} kept running: {e}"));
        assert!(
            !out.status.success(),
            "the agent started without CAP_{}",
            missing.to_uppercase()
        );
        eprintln!(
            "without {missing}: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }

    // The agent with exactly the DaemonSet's capabilities.
    let mut cmd = node.command("setpriv");
    cmd.args(with_only(&caps, &lb_binary()))
        .args(agent_args(&pins.path))
        .env("RUST_LOG", "info");
    let mut agent = spawn_logged(&mut cmd, &log_path);
    let show_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let guard = LogOnPanic::new(log_path.clone());
    wait_until("agent ready", STEP, || {
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent exited ({status}):\n{}", show_log());
        }
        match http_status(node.name(), "/readyz")? {
            200 => Ok(()),
            code => Err(format!("HTTP {code}")),
        }
    });
    let wait_pinned = |dir: &str, iface: &str| {
        let pin = pins.path.join(dir).join(iface);
        wait_until(&format!("{iface} attached ({dir})"), STEP, || {
            pin.exists()
                .then_some(())
                .ok_or_else(|| format!("no {}", pin.display()))
        });
    };
    let wait_attached = |pods: [&Pod; 2]| {
        for pod in pods {
            wait_pinned("links", &pod.iface);
        }
    };
    // Devices there at the start are attached by the interface watcher's
    // first scan, which may come just after the first sync.
    wait_attached([&client, &be1]);
    let names = ask_vips(client.ns(), 4).expect("the client reaches the VIPs");
    assert!(names.iter().all(|n| n == "be1"), "{names:?}");

    // A client pod and a backend pod created after the agent started.
    let late = Pod::wire(&node, &prefix, "late", "h-late", 9);
    // Its frames meet XDP: full checksums (see support::ethtool).
    ethtool_set(late.ns(), "eth0", ETHTOOL_STXCSUM, false);
    let be2 = Pod::wire(&node, &prefix, "be2", "h-be2", 3);
    let _be2_server = Servers::start(&[&be2], &[BACKEND_PORT]);
    manifests.write(
        "web.json",
        &manifest(&[&be1, &be2], &Timestamp::now().to_string()),
    );
    wait_attached([&late, &be2]);
    let mut served = Vec::new();
    wait_until(
        "the late pod reaches both backends over both families",
        STEP,
        || {
            served = ask_vips(late.ns(), 12)?;
            if served.iter().any(|n| n == "be1") && served.iter().any(|n| n == "be2") {
                Ok(())
            } else {
                Err(format!("answers: {served:?}"))
            }
        },
    );
    assert!(
        served.iter().all(|n| n == "be1" || n == "be2"),
        "{served:?}"
    );
    // XDP came to the late pod's device (the glob `h-lat?`) and saw its
    // frames; not to h-be2, which only `--attach-pattern` names.
    let xdp_pin = pins.path.join("links-xdp").join(&late.iface);
    assert!(
        xdp_pin.exists(),
        "no {}:\n{}",
        xdp_pin.display(),
        show_log()
    );
    assert!(has_xdp(node.name(), &late.iface), "{}", show_log());
    assert!(!has_xdp(node.name(), &be2.iface));
    let (_, metrics) = http_get(node.name(), metrics_addr(), "/metrics").expect("GET /metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("lb_xdp_native{{device=\"{}\"}} 1", late.iface)),
        "{metrics}"
    );
    assert!(xdp_frames(&metrics) > 0, "{metrics}");

    // A device without an Ethernet header (tun) that matches the pattern:
    // the agent started with Ethernet devices only and verified only their
    // programs; it verifies the L3 pair now, and attaches it.
    assert!(!show_log().contains(LB_TC_L3), "{}", show_log());
    run_ok(
        node.command("ip")
            .args(["tuntap", "add", "dev", "h-tun", "mode", "tun"]),
    );
    run_ok(node.command("ip").args(["link", "set", "h-tun", "up"]));
    for dir in ["links", "links-egress"] {
        wait_pinned(dir, "h-tun");
    }
    let verified = show_log()
        .lines()
        .filter(|line| line.contains("TC programs verified"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert!(
        verified.len() == 2 && verified[1].contains(LB_TC_L3),
        "{verified:?}"
    );

    // The late pod goes away: forgotten; it comes back: served again.
    let late_pin = pins.path.join("links").join(&late.iface);
    drop(late);
    wait_until("h-late forgotten", STEP, || {
        (!late_pin.exists() && !xdp_pin.exists())
            .then_some(())
            .ok_or_else(|| "a pin is still there".to_owned())
    });
    let late = Pod::wire(&node, &prefix, "late", "h-late", 9);
    ethtool_set(late.ns(), "eth0", ETHTOOL_STXCSUM, false);
    wait_until("h-late attached again (TC and XDP)", STEP, || {
        (late_pin.exists() && xdp_pin.exists() && has_xdp(node.name(), &late.iface))
            .then_some(())
            .ok_or_else(|| "no pin or no XDP".to_owned())
    });
    wait_until("the re-created pod is served", STEP, || {
        ask_vips(late.ns(), 4).map(drop)
    });
    if let Ok(Some(status)) = agent.0.try_wait() {
        panic!("the agent exited ({status}):\n{}", show_log());
    }
    let text = show_log();
    assert!(text.contains("attached to new interface"), "{text}");
    assert!(text.contains("XDP on new interface"), "{text}");

    // Metrics: map occupancy, sync durations, and the programming latency
    // of the one slice change made after the agent started.
    let (_, metrics) = http_get(node.name(), metrics_addr(), "/metrics").expect("GET /metrics");
    // Services: slot 0 (holding both backend slots) and the ClusterIP's
    // marker.
    let names = lb_common::map_names::SERVICES4;
    let expected = [
        format!("lb_map_entries{{map=\"{names}\"}} 2"),
        format!(
            "lb_map_entries{{map=\"{}\"}} 2",
            lb_common::map_names::SERVICES6
        ),
        format!(
            "lb_map_entries{{map=\"{}\"}} 2",
            lb_common::map_names::BACKENDS4
        ),
        "lb_network_programming_duration_seconds_count 2".to_owned(),
    ];
    for line in &expected {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("lb_sync_proxy_rules_duration_seconds_count "),
        "{metrics}"
    );
    drop(guard);
}
