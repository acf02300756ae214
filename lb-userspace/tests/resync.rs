//! The agent repairs what it did not write and says when it cannot write:
//! a service-map entry deleted behind its back is back after the next
//! periodic resync (counted in `lb_map_drift_repairs_total`), and map writes
//! that keep failing are retried with backoff while `/readyz` answers 503
//! with the reason.
//!
//! The node is a namespace this test creates, with a dummy interface to
//! attach to; no traffic is sent (the maps and the agent's HTTP answers are
//! what is checked). Privileged: root and bpffs.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    ChildGuard, Netns, PinGuard, TempDir, in_netns, lb_binary, ns_command, output_with_timeout,
    require_privileged, sweep_stale_netns, sweep_stale_pins, unique_prefix,
};
use lb_userspace::{datapath::maps::Maps, plan::Op};
use serde_json::json;

const TAG: &str = "lbrs";
const METRICS_ADDR: &str = "127.0.0.1:9917";
const VIP: &str = "198.19.0.10";
const VIP2: &str = "198.19.0.11";

/// One node namespace with a running agent (resync every second).
struct Node {
    // Drop order: the agent first, then pins (cleanup inside the namespace),
    // then the namespace, then the directories.
    _agent: ChildGuard,
    pins: PinGuard,
    ns: Netns,
    manifests: TempDir,
    log: PathBuf,
}

impl Node {
    fn start() -> Self {
        sweep_stale_netns(TAG);
        sweep_stale_pins(TAG);
        let prefix = unique_prefix(TAG);
        let ns = Netns::create(&format!("{prefix}-node"));
        // A veth pair with both ends in the node: an interface to attach
        // to (this kernel has no dummy devices).
        ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
        ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "d0"]);
        ns.ip(&["link", "set", "d0", "up"]);
        ns.ip(&["link", "set", "d1", "up"]);
        let manifests = TempDir(std::env::temp_dir().join(format!("{prefix}-manifests")));
        std::fs::create_dir_all(&manifests.0).expect("create manifest directory");
        write_service(&manifests.0, "web", VIP);
        let pins = PinGuard {
            path: PathBuf::from("/sys/fs/bpf").join(format!("{prefix}-pins")),
            node_ns: ns.name().to_owned(),
        };
        let log = std::env::temp_dir().join(format!("{prefix}-agent.log"));
        let log_file = std::fs::File::create(&log).expect("create agent log");
        let mut cmd = ns_command(ns.name(), lb_binary());
        cmd.arg("agent")
            .arg("--source")
            .arg(format!("file:{}", manifests.0.display()))
            .args(["--attach", "d0", "--node-ip", "198.18.0.1"])
            .args(["--metrics-addr", METRICS_ADDR, "--resync-interval", "1"])
            .arg("--pin-path")
            .arg(&pins.path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file);
        let agent = ChildGuard(cmd.spawn().expect("start lb agent"));
        let node = Self {
            _agent: agent,
            pins,
            ns,
            manifests,
            log,
        };
        node.wait_for("the agent to be ready", || {
            node.get("/readyz").is_ok_and(|(code, _)| code == 200)
        });
        node
    }

    /// GET `path` from the agent's HTTP server: (status, body).
    fn get(&self, path: &str) -> Result<(u16, String), String> {
        let addr: SocketAddr = METRICS_ADDR.parse().expect("valid address");
        let text = in_netns(self.ns.name(), || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET {path} HTTP/1.0\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        })
        .map_err(|e| format!("GET {path}: {e}"))?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("GET {path}: malformed response {text:?}"))?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        Ok((code, body))
    }

    /// The value of the unlabelled metric `name`.
    fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.get("/metrics").expect("scrape /metrics");
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}; agent log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// The backend ids in the slots of `vip`:80/TCP, read from the maps.
    fn slots(&self, vip: &str) -> Option<Vec<u32>> {
        let maps = Maps::open_pinned(&self.pins.path).expect("open pinned maps");
        let state = maps.read_state().expect("read the maps");
        state
            .frontends
            .iter()
            .find(|(frontend, _)| frontend.addr == vip.parse::<IpAddr>().unwrap())
            .map(|(_, fs)| fs.slots.clone())
    }
}

/// A `ClusterIP` Service `name` on `vip`:80/TCP with two ready endpoints.
fn write_service(dir: &Path, name: &str, vip: &str) {
    let objects = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": vip,
                    "clusterIPs": [vip],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
                }
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{name}-1"),
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": name}
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["198.18.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["198.18.0.3"], "conditions": {"ready": true}}
                ]
            }
        ]
    });
    let staging = dir.with_extension("staging");
    std::fs::create_dir_all(&staging).expect("create staging directory");
    let tmp = staging.join(format!("{name}.json"));
    std::fs::write(&tmp, objects.to_string()).expect("write manifest");
    std::fs::rename(&tmp, dir.join(format!("{name}.json"))).expect("move manifest in place");
    let _ = std::fs::remove_dir(&staging);
}

#[test]
fn a_slot_deleted_behind_the_agents_back_is_restored_by_the_resync() {
    if !require_privileged("resync repairs drift") {
        return;
    }
    let node = Node::start();
    let slots = node.slots(VIP).expect("the Service is in the maps");
    assert_eq!(slots.len(), 2, "two endpoints, two slots: {slots:?}");
    let repairs_before = node.metric("lb_map_drift_repairs_total");

    // Someone (a stray `bpftool map delete`, a bug) removes slot 2.
    let mut maps = Maps::open_pinned(&node.pins.path).expect("open pinned maps");
    let vip: IpAddr = VIP.parse().unwrap();
    let state = maps.read_state().expect("read the maps");
    let frontend = *state
        .frontends
        .keys()
        .find(|f| f.addr == vip)
        .expect("the frontend");
    maps.apply_op(&Op::DeleteSlot { frontend, slot: 2 })
        .expect("delete slot 2");
    // (The maps read back show an empty slot as backend id 0.)
    assert_eq!(node.slots(VIP), Some(vec![slots[0], 0]), "slot 2 is gone");

    // The resync (every second here) notices and writes it back.
    node.wait_for("the resync to restore slot 2", || {
        node.slots(VIP).as_ref() == Some(&slots)
    });
    assert!(
        node.metric("lb_map_drift_repairs_total") > repairs_before,
        "the repair is counted"
    );
    assert!(node.metric("lb_resyncs_total") >= 1);
    assert_eq!(node.get("/readyz").unwrap().0, 200, "drift is no failure");
}

#[test]
fn writes_that_keep_failing_are_retried_and_make_readyz_503() {
    if !require_privileged("failing syncs are retried") {
        return;
    }
    let node = Node::start();
    let retries_before = node.metric("lb_sync_retries_total");
    // Freeze the IPv4 service map: every write from user space fails
    // (EPERM) from now on, the program's lookups still work.
    let map = node.pins.path.join("LB4_SVC_V2");
    let mut freeze = Command::new("bpftool");
    freeze.args(["map", "freeze", "pinned"]).arg(&map);
    let out = output_with_timeout(&mut freeze, Duration::from_secs(10)).expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool map freeze: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    write_service(&node.manifests.0, "api", VIP2);
    node.wait_for("/readyz to say the syncs keep failing", || {
        node.get("/readyz")
            .is_ok_and(|(code, body)| code == 503 && body.contains("syncs keep failing"))
    });
    assert!(node.metric("lb_sync_retries_total") > retries_before);
    assert!(node.metric("lb_sync_errors_total") >= 2);
    // Backoff: the retries slow down (100 ms, 200 ms, 400 ms, ...), so a
    // second later there are a handful, not one per loop turn.
    std::thread::sleep(Duration::from_secs(1));
    let retries = node.metric("lb_sync_retries_total") - retries_before;
    assert!(
        (2..=10).contains(&retries),
        "retries within ~1.5 s with backoff from 100 ms: {retries}"
    );
    // What was written before keeps serving.
    assert_eq!(node.slots(VIP).map(|s| s.len()), Some(2));
}
