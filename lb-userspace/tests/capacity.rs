//! Full maps (root): an agent with room for 4 of 6 dual-stack Services
//! (`--max-services 4`, or `--max-backends` for 4 and a half) names the 2
//! that did not fit (log, `/readyz`), counts the refused writes
//! (`/metrics`) and serves the 4 others (their entries are in the maps,
//! whole). Restarted with other sizes, it keeps the pinned maps and their
//! entries and says so.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lb_common::map_names;
use lb_userspace::{datapath::maps::Maps, model::Protocol};
use serde_json::{Value, json};
use support::{
    clients::{http_get, metric_value},
    netns::{Netns, unique_prefix},
    pins::{PinGuard, require_privileged, sweep_stale_pins},
    process::{ChildGuard, TempDir, lb_binary, metrics_addr, output_with_timeout, wait_until},
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

/// A namespace with an interface to attach to, a manifest directory with
/// the Services, a pin directory and an agent log. Fields drop in order:
/// the pins (`lb cleanup` inside the namespace), the files, the namespace.
struct Lab {
    pins: PinGuard,
    work: TempDir,
    ns: Netns,
}

impl Lab {
    fn new() -> Self {
        sweep_stale_pins("lbcap");
        let prefix = unique_prefix("lbcap");
        let ns = Netns::create(&prefix);
        // Something to attach to (both ends inside the namespace).
        ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
        ns.ip(&["link", "set", "d0", "up"]);
        let work = TempDir::create(&prefix);
        std::fs::create_dir_all(work.0.join("manifests")).expect("manifest directory");
        write_manifests(&work.0.join("manifests"));
        let pins = PinGuard::new("lbcap", ns.name());
        Self { pins, work, ns }
    }

    fn log(&self) -> PathBuf {
        self.work.0.join("agent.log")
    }

    fn log_text(&self) -> String {
        read(&self.log())
    }

    /// The agent with `FLAG VALUE` (a capacity), logging to the log.
    fn start_agent(&self, flag: &str, value: u32) -> ChildGuard {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("open log");
        let err = out.try_clone().expect("clone log");
        let mut cmd = self.ns.command(lb_binary());
        // No socket programs: they would attach to the machine's cgroup root.
        cmd.arg("agent")
            .arg("--socket-lb=off")
            .arg("--source")
            .arg(format!("file:{}", self.work.0.join("manifests").display()))
            .args([
                "--attach",
                "d0",
                "--metrics-addr",
                &metrics_addr().to_string(),
            ])
            .arg(flag)
            .arg(value.to_string())
            .arg("--pin-path")
            .arg(&self.pins.path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        ChildGuard(cmd.spawn().expect("start the agent"))
    }

    /// Polls `/readyz` until its body says what did not fit (10 s at most).
    fn unfit_reason(&self, agent: &mut ChildGuard) -> String {
        let start = Instant::now();
        let mut last = String::from("never asked");
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = agent.0.try_wait() {
                panic!("the agent exited ({status}):\n{}", self.log_text());
            }
            match get(self.ns.name(), "/readyz") {
                Ok((503, body)) if body.contains("did not fit") => return body,
                Ok((code, body)) => last = format!("HTTP {code}: {body}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "/readyz never named the Services that did not fit (last: {last});\nlog:\n{}",
            self.log_text()
        );
    }

    fn metrics(&self) -> String {
        get(self.ns.name(), "/metrics").expect("metrics").1
    }

    /// Checks that the log names svc-4 and svc-5, once, and no write alone.
    fn assert_log_names_the_last_two(&self) {
        let text = self.log_text();
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
            "full maps are reported once per sync, not per write:\n{text}"
        );
    }
}

/// Checks that `/readyz` names svc-4 and svc-5 only.
fn assert_names_the_last_two(reason: &str) {
    assert!(
        reason.contains("2 Service ports did not fit")
            && reason.contains("cap/svc-4:http")
            && reason.contains("cap/svc-5:http")
            && !reason.contains("svc-3"),
        "{reason}"
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
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
    let lab = Lab::new();
    let mut agent = lab.start_agent("--max-services", MAX_SERVICES);
    assert_names_the_last_two(&lab.unfit_reason(&mut agent));
    let metrics = lab.metrics();
    for map in ["LB4_RNAT_V2", "LB6_RNAT_V2"] {
        let capacity = format!("lb_map_capacity{{map=\"{map}\"}}");
        assert_eq!(
            metric_value(&metrics, &capacity),
            Some(u64::from(MAX_SERVICES)),
            "{metrics}"
        );
        // Two frontends refused at least once: a sync that did not write
        // everything is retried with backoff, and each retry is refused
        // again and counted, so the count may have grown since.
        let full = format!("lb_map_full_total{{map=\"{map}\"}}");
        assert!(
            metric_value(&metrics, &full).is_some_and(|refused| refused >= 2),
            "{metrics}"
        );
    }
    assert_eq!(
        metric_value(&metrics, "lb_services_unfit"),
        Some(2),
        "{metrics}"
    );
    lab.assert_log_names_the_last_two();
    assert_maps_hold_the_first(&lab.pins.path);

    // Restarted with room for more: the pinned maps stay (with what they
    // serve), the agent says so and still names what does not fit.
    drop(agent);
    let mut agent = lab.start_agent("--max-services", 2 * MAX_SERVICES);
    assert_names_the_last_two(&lab.unfit_reason(&mut agent));
    let text = lab.log_text();
    assert!(
        text.contains("keeping the pinned map") && text.contains("LB4_RNAT_V2"),
        "no warning about the kept map size:\n{text}"
    );
    assert_eq!(
        metric_value(&lab.metrics(), "lb_map_capacity{map=\"LB4_RNAT_V2\"}"),
        Some(u64::from(MAX_SERVICES)),
    );
    assert_maps_hold_the_first(&lab.pins.path);
}

/// A backend that does not fit takes out its slot and so its frontend: a
/// Service with one of its two backends is left out whole, not served
/// half (the slot count would point at a missing slot).
#[test]
fn a_full_backend_map_leaves_out_whole_frontends() {
    if !require_privileged("a_full_backend_map_leaves_out_whole_frontends") {
        return;
    }
    let lab = Lab::new();
    // The first 4 Services' 8 backends and one of svc-4's, per family.
    let room = MAX_SERVICES * ENDPOINTS + 1;
    let mut agent = lab.start_agent("--max-backends", room);
    assert_names_the_last_two(&lab.unfit_reason(&mut agent));
    let metrics = lab.metrics();
    for map in [map_names::BACKENDS4, map_names::BACKENDS6] {
        let capacity = format!("lb_map_capacity{{map=\"{map}\"}}");
        assert_eq!(
            metric_value(&metrics, &capacity),
            Some(u64::from(room)),
            "{metrics}"
        );
        // svc-4's second backend and svc-5's two, at least once each (the
        // retries of an incomplete sync are refused and counted again).
        let full = format!("lb_map_full_total{{map=\"{map}\"}}");
        assert!(
            metric_value(&metrics, &full).is_some_and(|refused| refused >= 3),
            "{metrics}"
        );
    }
    lab.assert_log_names_the_last_two();
    assert_maps_hold_the_first(&lab.pins.path);
}

/// A map left pinned by an agent of another layout version of it (the
/// service map was `LB4_SVC_V2` before its frontends held their first
/// slots) is unpinned once the programs are attached, so that it does not
/// hold kernel memory until `lb cleanup`; a pin of no map of this build is
/// left alone.
#[test]
fn a_map_pinned_by_another_layout_version_is_unpinned() {
    if !require_privileged("a_map_pinned_by_another_layout_version_is_unpinned") {
        return;
    }
    let lab = Lab::new();
    std::fs::create_dir_all(&lab.pins.path).expect("pin directory");
    for name in ["LB4_SVC_V2", "LB9_OTHER_V1"] {
        let pin = lab.pins.path.join(name);
        let mut create = std::process::Command::new("bpftool");
        create.args(["map", "create"]).arg(&pin).args([
            "type", "hash", "key", "4", "value", "4", "entries", "4", "name", name,
        ]);
        let out = output_with_timeout(&mut create, Duration::from_secs(10)).expect("run bpftool");
        assert!(
            out.status.success(),
            "bpftool map create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let agent = lab.start_agent("--max-services", 64);
    wait_until("the agent syncs", Duration::from_secs(20), || {
        let log = lab.log_text();
        if log.contains("synced") {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert!(
        !lab.pins.path.join("LB4_SVC_V2").exists(),
        "{}",
        lab.log_text()
    );
    assert!(lab.pins.path.join("LB4_SVC_V3").exists());
    assert!(lab.pins.path.join("LB9_OTHER_V1").exists());
    assert!(
        lab.log_text()
            .contains("removed the pin of a map of another layout version"),
        "{}",
        lab.log_text()
    );
    drop(agent);
}
