//! The agent repairs what it did not write and says when it cannot write:
//! a service-map entry deleted behind its back is back after the next
//! periodic resync (counted in `lb_map_drift_repairs_total`), and map writes
//! that keep failing are retried with backoff while `/readyz` answers 503
//! with the reason.
//!
//! The node is a namespace this test creates, with a dummy interface to
//! attach to; no traffic is sent (the maps and the agent's HTTP answers are
//! what is checked). Privileged: root and bpffs.

mod support;

use std::{net::IpAddr, process::Command, time::Duration};

use lb_userspace::{
    datapath::maps::Maps,
    plan::{FrontendWrite, InlineSlots, Op},
};
use support::{
    clients::{http_get, metric_value},
    manifests::{Cond, Manifest, ManifestDir, service, slice, sp},
    netns::{Netns, sweep_stale_netns, unique_prefix},
    pins::{PinGuard, require_privileged, sweep_stale_pins},
    process::{
        ChildGuard, LogOnPanic, TempDir, lb_binary, metrics_addr, output_with_timeout,
        spawn_logged, wait_until,
    },
    topo::Family,
};

const TAG: &str = "lbrs";
const VIP: &str = "198.19.0.10";
const VIP2: &str = "198.19.0.11";
/// How long the agent gets for each thing the tests wait for.
const WAIT: Duration = Duration::from_secs(10);

/// One node namespace with a running agent (resync every second).
struct Node {
    // Drop order: the log (printed on panic), the agent, then pins (cleanup
    // inside the namespace), then the namespace, then the directories.
    _log: LogOnPanic,
    _agent: ChildGuard,
    pins: PinGuard,
    ns: Netns,
    manifests: ManifestDir,
    _work: TempDir,
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
        let work = TempDir::create(&format!("{prefix}-work"));
        let manifests = ManifestDir::create(&work);
        write_service(&manifests, "web", VIP);
        let pins = PinGuard::new(TAG, ns.name());
        let log = work.0.join("agent.log");
        let mut cmd = ns.command(lb_binary());
        // No socket programs: they would attach to the machine's cgroup root.
        cmd.arg("agent")
            .arg("--socket-lb=off")
            .args(["--source", &manifests.source()])
            .args(["--attach", "d0", "--node-ip", "198.18.0.1"])
            .args(["--metrics-addr", &metrics_addr().to_string()])
            .args(["--resync-interval", "1"])
            .arg("--pin-path")
            .arg(&pins.path);
        let agent = spawn_logged(&mut cmd, &log);
        let node = Self {
            _log: LogOnPanic::new(log),
            _agent: agent,
            pins,
            ns,
            manifests,
            _work: work,
        };
        wait_until("the agent is ready", WAIT, || {
            match node.get("/readyz")? {
                (200, _) => Ok(()),
                (code, body) => Err(format!("{code} {body}")),
            }
        });
        node
    }

    /// GET `path` from the agent's HTTP server: (status, body).
    fn get(&self, path: &str) -> Result<(u16, String), String> {
        http_get(self.ns.name(), metrics_addr(), path)
    }

    /// The value of the unlabelled metric `name`.
    fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.get("/metrics").expect("scrape /metrics");
        metric_value(&body, name).unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
    }

    /// The backend ids in the slots of `vip`:80/TCP, read from the maps.
    fn slots(&self, vip: &str) -> Option<Vec<u32>> {
        let maps = Maps::open_pinned(&self.pins.path).expect("open pinned maps");
        let state = maps.read_state().expect("read the maps");
        let vip: IpAddr = vip.parse().expect("an address");
        state
            .frontends
            .iter()
            .find(|(frontend, _)| frontend.addr == vip)
            .map(|(_, fs)| fs.slots.clone())
    }
}

/// A `ClusterIP` Service `name` on `vip`:80/TCP with two ready endpoints.
fn write_service(dir: &ManifestDir, name: &str, vip: &str) {
    let port = sp("http", 80, "TCP", "8080");
    let endpoints = ["198.18.0.2", "198.18.0.3"]
        .map(|addr| Cond::Ready.endpoint(addr.parse().expect("an address")));
    let manifest = Manifest::default()
        .with(
            &service(
                name,
                "ClusterIP",
                &[vip.parse().expect("an address")],
                &[port],
            )
            .build(),
        )
        .with(&slice(
            name,
            &format!("{name}-v4"),
            Family::V4,
            &[("http", 8080, "TCP")],
            endpoints,
        ));
    dir.write(&format!("{name}.json"), &manifest);
}

#[test]
fn a_slot_lost_behind_the_agents_back_is_restored_by_the_resync() {
    if !require_privileged("resync repairs drift") {
        return;
    }
    let node = Node::start();
    let slots = node.slots(VIP).expect("the Service is in the maps");
    assert_eq!(slots.len(), 2, "two endpoints, two slots: {slots:?}");
    let repairs_before = node.metric("lb_map_drift_repairs_total");

    // Someone (a stray `bpftool map update`, a bug) zeroes slot 2 (a
    // small frontend's slots are in its own entry).
    let mut maps = Maps::open_pinned(&node.pins.path).expect("open pinned maps");
    let vip: IpAddr = VIP.parse().unwrap();
    let state = maps.read_state().expect("read the maps");
    let (frontend, held) = state
        .frontends
        .iter()
        .find(|(f, _)| f.addr == vip)
        .expect("the frontend");
    maps.apply_op(&Op::PutFrontend(Box::new(FrontendWrite {
        frontend: *frontend,
        count: 2,
        rev_nat_id: held.rev_nat_id,
        flags: held.flags,
        affinity_timeout_s: held.affinity_timeout_s,
        affinity_group: held.affinity_group,
        inline: InlineSlots::from(&[slots[0], 0][..]),
    })))
    .expect("zero slot 2");
    // (The maps read back show an empty slot as backend id 0.)
    assert_eq!(node.slots(VIP), Some(vec![slots[0], 0]), "slot 2 is gone");

    // The resync (every second here) notices and writes it back.
    wait_until("the resync restores slot 2", WAIT, || {
        match node.slots(VIP) {
            Some(now) if now == slots => Ok(()),
            other => Err(format!("slots {other:?}")),
        }
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
    let map = node.pins.path.join("LB4_SVC_V3");
    let mut freeze = Command::new("bpftool");
    freeze.args(["map", "freeze", "pinned"]).arg(&map);
    let out = output_with_timeout(&mut freeze, Duration::from_secs(10)).expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool map freeze: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    write_service(&node.manifests, "api", VIP2);
    wait_until("/readyz says the syncs keep failing", WAIT, || {
        match node.get("/readyz")? {
            (503, body) if body.contains("syncs keep failing") => Ok(()),
            (code, body) => Err(format!("{code} {body}")),
        }
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
