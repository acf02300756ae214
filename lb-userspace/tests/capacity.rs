//! Full maps (root): an agent with room for 4 frontends per family, given
//! 6 dual-stack Services, names the 2 that did not fit (log, `/readyz`),
//! counts the refused writes (`/metrics`) and serves the 4 others (their
//! entries are in the maps, whole). Restarted with other sizes, it keeps
//! the pinned maps and their entries and says so.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lb_userspace::{datapath::maps::Maps, model::Protocol};
use serde_json::{Value, json};
use support::{
    clients::http_get,
    netns::{Netns, unique_prefix},
    pins::{PinGuard, require_privileged, sweep_stale_pins},
    process::{ChildGuard, TempDir, lb_binary, metrics_addr},
};

const SERVICES: u32 = 6;
const MAX_SERVICES: u32 = 4;
const ENDPOINTS: u32 = 2;

fn vip(family: u8, i: u32) -> IpAddr {
    let i = u8::try_from(i + 1).expect("few Services");
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, i))
    } else {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, u16::from(i)))
    }
}

fn endpoint(family: u8, i: u32, b: u32) -> IpAddr {
    let host = u8::try_from(i * ENDPOINTS + b + 1).expect("few endpoints");
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(10, 1, 0, host))
    } else {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, u16::from(host)))
    }
}

/// Dual-stack `ClusterIP` Service `cap/svc-I`, port `http` 80 -> 8080.
fn service(i: u32) -> Value {
    let (v4, v6) = (vip(4, i).to_string(), vip(6, i).to_string());
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "cap"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": v4,
            "clusterIPs": [v4, v6],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

/// The `EndpointSlice` of `svc-I` for FAMILY (4 or 6), all ready.
fn slice(i: u32, family: u8) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("svc-{i}-v{family}"),
            "namespace": "cap",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
        },
        "addressType": format!("IPv{family}"),
        "endpoints": (0..ENDPOINTS).map(|b| json!({
            "addresses": [endpoint(family, i, b).to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
        })).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn write_manifests(dir: &Path) {
    let items: Vec<Value> = (0..SERVICES)
        .flat_map(|i| [service(i), slice(i, 4), slice(i, 6)])
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(dir.join("services.json"), list.to_string()).expect("write manifests");
}

/// GET PATH on the agent, from the node namespace: (status, body).
fn get(ns: &str, path: &str) -> Result<(u16, String), String> {
    http_get(ns, metrics_addr(), path)
}

/// The agent in NS with `--max-services MAX`, logging to LOG.
fn start_agent(ns: &Netns, manifests: &Path, pins: &Path, log: &Path, max: u32) -> ChildGuard {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log");
    let err = out.try_clone().expect("clone log");
    let mut cmd = ns.command(lb_binary());
    cmd.arg("agent")
        .arg("--source")
        .arg(format!("file:{}", manifests.display()))
        .args([
            "--attach",
            "d0",
            "--metrics-addr",
            &metrics_addr().to_string(),
        ])
        .arg("--max-services")
        .arg(max.to_string())
        .arg("--pin-path")
        .arg(pins)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    ChildGuard(cmd.spawn().expect("start the agent"))
}

/// Polls `/readyz` until its body says what did not fit (10 s at most).
fn wait_unfit_reason(ns: &str, agent: &mut ChildGuard, log: &Path) -> String {
    let start = Instant::now();
    let mut last = String::from("never asked");
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent exited ({status}):\n{}", read(log));
        }
        match get(ns, "/readyz") {
            Ok((503, body)) if body.contains("did not fit") => return body,
            Ok((code, body)) => last = format!("HTTP {code}: {body}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "/readyz never named the Services that did not fit (last: {last});\nlog:\n{}",
        read(log)
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The value of the metric line starting with SERIES.
fn metric(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Checks the maps: the first `MAX_SERVICES` Services, whole, and no other.
fn assert_maps_hold_the_first(pins: &Path) {
    let maps = Maps::open_pinned(pins).expect("open the pinned maps");
    let state = maps.read_state().expect("read the maps");
    for family in [4, 6] {
        for i in 0..SERVICES {
            let frontend = state.frontends.iter().find(|(f, _)| {
                f.addr == vip(family, i) && f.port == 80 && f.proto == Protocol::Tcp
            });
            if i < MAX_SERVICES {
                let (_, entry) =
                    frontend.unwrap_or_else(|| panic!("svc-{i} IPv{family} missing: {state:#?}"));
                assert_eq!(entry.slots.len(), ENDPOINTS as usize, "svc-{i} IPv{family}");
                for id in &entry.slots {
                    assert!(state.backends.contains_key(id), "backend {id} of svc-{i}");
                }
                assert!(
                    state.rev_nats.contains_key(&entry.rev_nat_id),
                    "rev-NAT of svc-{i}"
                );
            } else {
                assert!(
                    frontend.is_none(),
                    "svc-{i} IPv{family} should not be in the maps"
                );
            }
        }
    }
    assert_eq!(state.frontends.len(), 2 * MAX_SERVICES as usize);
}

#[test]
fn full_maps_name_the_services_left_out_and_serve_the_others() {
    if !require_privileged("full_maps_name_the_services_left_out") {
        return;
    }
    sweep_stale_pins("lbcap");
    let prefix = unique_prefix("lbcap");
    let ns = Netns::create(&prefix);
    // Something to attach to (both ends inside the namespace).
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    ns.ip(&["link", "set", "d0", "up"]);
    let work = TempDir::create(&prefix);
    let manifests = work.0.join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifest directory");
    write_manifests(&manifests);
    let log = work.0.join("agent.log");
    let pins = PinGuard::new("lbcap", ns.name());

    let mut agent = start_agent(&ns, &manifests, &pins.path, &log, MAX_SERVICES);
    let reason = wait_unfit_reason(ns.name(), &mut agent, &log);
    assert!(
        reason.contains("2 Service ports did not fit")
            && reason.contains("cap/svc-4:http")
            && reason.contains("cap/svc-5:http")
            && !reason.contains("svc-3"),
        "{reason}"
    );
    let (_, metrics) = get(ns.name(), "/metrics").expect("metrics");
    for map in ["LB4_RNAT_V2", "LB6_RNAT_V2"] {
        let capacity = format!("lb_map_capacity{{map=\"{map}\"}}");
        assert_eq!(
            metric(&metrics, &capacity),
            Some(u64::from(MAX_SERVICES)),
            "{metrics}"
        );
        // Two frontends per family refused at least once; the agent
        // retries a sync that did not write everything (with backoff), and
        // each retry is refused again, so the count may have grown.
        let full = format!("lb_map_full_total{{map=\"{map}\"}}");
        assert!(
            metric(&metrics, &full).is_some_and(|refused| refused >= 2),
            "{metrics}"
        );
    }
    assert_eq!(metric(&metrics, "lb_services_unfit"), Some(2), "{metrics}");
    let text = read(&log);
    let named = text
        .lines()
        .find(|line| line.contains("maps full"))
        .unwrap_or_else(|| panic!("no `maps full` line in the log:\n{text}"));
    assert!(
        named.contains("cap/svc-4:http") && named.contains("cap/svc-5:http"),
        "{named}"
    );
    assert!(
        !text.contains("map write failed"),
        "full maps are reported once:\n{text}"
    );
    assert_maps_hold_the_first(&pins.path);

    // Restarted with room for more: the pinned maps stay (with what they
    // serve), the agent says so and still names what does not fit.
    drop(agent);
    let mut agent = start_agent(&ns, &manifests, &pins.path, &log, 2 * MAX_SERVICES);
    let reason = wait_unfit_reason(ns.name(), &mut agent, &log);
    assert!(reason.contains("cap/svc-4:http"), "{reason}");
    let text = read(&log);
    assert!(
        text.contains("keeping the pinned map") && text.contains("LB4_RNAT_V2"),
        "no warning about the kept map size:\n{text}"
    );
    let (_, metrics) = get(ns.name(), "/metrics").expect("metrics");
    assert_eq!(
        metric(&metrics, "lb_map_capacity{map=\"LB4_RNAT_V2\"}"),
        Some(u64::from(MAX_SERVICES)),
        "{metrics}"
    );
    assert_maps_hold_the_first(&pins.path);
    drop(agent);
    // The pins, then the namespace, go on drop.
}
