//! The single-node lab of `harness.rs`: the `lb` agent in a "node"
//! namespace, a client and four backends in namespaces of their own,
//! joined to the node by veth pairs.
//!
//! ```text
//!            client (198.18.1.2, fd00:1::2)
//!              | eth0
//!              | h-cl
//!   node  [lb agent, TC ingress on every h-*]   VIPs 198.19.0.0/24, fd00:96::/112
//!     h-be1 | h-be2 | h-be3 | h-be4
//!     be1 (198.18.2.2, fd00:2::2) ... be4 (198.18.5.2, fd00:5::2)
//! ```
//!
//! Teardown (drop order of `Lab`'s fields): agent, pins (need the node
//! namespace), servers, namespaces, files; when the test fails, the agent
//! log is printed first.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::clients::http_get;
use super::manifests::{Cond, Manifest, ManifestDir, SvcPort, service, slice, sp, suffix};
use super::netns::{Netns, ns_command, sweep_stale_netns, unique_prefix};
use super::pins::{PinGuard, ServiceView, sweep_stale_pins};
use super::process::{
    ChildGuard, LogOnPanic, METRICS_ADDR, TempDir, lb_binary, log_note, metrics_addr,
    require_tools, spawn_logged, with_only,
};
use super::servers::Servers;
use super::topo::{Family, Pod, node_netns};

/// Namespace name tag: namespaces are `lbh<pid>-<n>-<role>`.
const TAG: &str = "lbh";
/// Pin directories are `/sys/fs/bpf/lb-test-<pid>-<n>`.
const PIN_TAG: &str = "lb-test-";
/// Port every backend listens on, TCP and UDP (`[::]`, dual-stack).
pub(crate) const BACKEND_PORT: u16 = 8080;
/// Service ports: `http` 80/TCP and `dns` 53/UDP, both to targetPort 8080.
pub(crate) const HTTP_PORT: u16 = 80;
pub(crate) const DNS_PORT: u16 = 53;

const WEB_VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const WEB_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

/// The `web` Service's `ClusterIP` of FAMILY.
pub(crate) fn web_vip(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(WEB_VIP4),
        Family::V6 => IpAddr::V6(WEB_VIP6),
    }
}

/// `web`'s address of FAMILY on PORT.
pub(crate) fn vip(family: Family, port: u16) -> SocketAddr {
    SocketAddr::new(web_vip(family), port)
}

/// `http` 80/TCP and `dns` 53/UDP to 8080.
pub(crate) const WEB_PORTS: [SvcPort; 2] = [
    sp("http", HTTP_PORT, "TCP", "8080"),
    sp("dns", DNS_PORT, "UDP", "8080"),
];

/// The namespaces and links. Dropping it deletes every namespace (which
/// deletes the veth pairs with them), pods first.
pub(crate) struct Topology {
    pub(crate) client: Pod,
    pub(crate) backends: Vec<Pod>,
    pub(crate) node: Netns,
}

impl Topology {
    fn build(prefix: &str, backends: u8) -> Self {
        let node = node_netns(&format!("{prefix}-node"));
        let client = Pod::wire(&node, prefix, "client", "h-cl", 1);
        let backends: Vec<Pod> = (1..=backends)
            .map(|i| Pod::wire(&node, prefix, &format!("be{i}"), &format!("h-be{i}"), i + 1))
            .collect();
        Self {
            client,
            backends,
            node,
        }
    }

    /// Every node-side interface (all get the TC program).
    pub(crate) fn node_ifaces(&self) -> Vec<String> {
        std::iter::once(&self.client)
            .chain(&self.backends)
            .map(|p| p.iface.clone())
            .collect()
    }

    pub(crate) fn backend(&self, name: &str) -> &Pod {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// BACKENDS' addresses of FAMILY on the backend port.
    pub(crate) fn backend_addrs(&self, family: Family, backends: &[&str]) -> BTreeSet<SocketAddr> {
        backends
            .iter()
            .map(|b| self.backend(b).addr.sock(family, BACKEND_PORT))
            .collect()
    }
}

/// Service NAME with `clusterIPs` VIPS and PORTS, and one slice per family
/// of its VIPs with ENDPOINTS (pod, ready) on port 8080: one manifest file.
pub(crate) fn service_file(
    name: &str,
    vips: &[IpAddr],
    ports: &[SvcPort],
    endpoints: &[(&Pod, bool)],
) -> Manifest {
    let mut manifest = Manifest::default().with(&service(name, "ClusterIP", vips, ports).build());
    let slice_ports: Vec<(&str, u16, &str)> = ports
        .iter()
        .map(|p| (p.name(), BACKEND_PORT, p.proto()))
        .collect();
    for family in Family::BOTH {
        if vips.iter().any(|v| v.is_ipv4() == (family == Family::V4)) {
            let eps = endpoints
                .iter()
                .map(|(pod, ready)| Cond::ready_if(*ready).endpoint(pod.addr.get(family)));
            let slice_name = format!("{name}-{}", suffix(family));
            manifest = manifest.with(&slice(name, &slice_name, family, &slice_ports, eps));
        }
    }
    manifest
}

/// What one frontend should look like in the maps: its active backends.
#[derive(Debug)]
pub(crate) struct Expect {
    pub(crate) vip: IpAddr,
    pub(crate) port: u16,
    pub(crate) protocol: &'static str,
    pub(crate) active: BTreeSet<SocketAddr>,
}

impl Expect {
    fn met_by(&self, views: &[ServiceView]) -> bool {
        views.iter().any(|v| {
            v.addr == self.vip
                && v.port == self.port
                && v.proto == self.protocol
                && v.active().collect::<BTreeSet<_>>() == self.active
        })
    }
}

/// Topology + servers + manifest directory + agent + pins. Fields drop in
/// declaration order, the teardown order: agent, pins (need the node
/// namespace), servers, namespaces, files.
pub(crate) struct Lab {
    agent: Option<ChildGuard>,
    pins: PinGuard,
    _servers: Servers,
    pub(crate) topo: Topology,
    manifests: ManifestDir,
    log: PathBuf,
    _log_on_panic: LogOnPanic,
    _work: TempDir,
}

impl Lab {
    /// Builds the topology and starts the servers (not the agent).
    pub(crate) fn new() -> Self {
        require_tools(&["ip", "nsenter"]);
        sweep_stale_netns(TAG);
        sweep_stale_pins(PIN_TAG);
        let prefix = unique_prefix(TAG);
        let work = TempDir::create(&prefix);
        let manifests = ManifestDir::create(&work);
        let log = work.0.join("agent.log");
        let topo = Topology::build(&prefix, 4);
        let backends: Vec<&Pod> = topo.backends.iter().collect();
        let servers = Servers::start(&backends, &[BACKEND_PORT]);
        let pins = PinGuard::new(PIN_TAG, topo.node.name());
        eprintln!(
            "lab {prefix}: manifests {}, pins {}, log {}",
            manifests.dir.display(),
            pins.path.display(),
            log.display()
        );
        Self {
            agent: None,
            pins,
            _servers: servers,
            topo,
            manifests,
            _log_on_panic: LogOnPanic::new(log.clone()),
            log,
            _work: work,
        }
    }

    pub(crate) fn client_ns(&self) -> &str {
        self.topo.client.ns()
    }

    pub(crate) fn node_ns(&self) -> &str {
        self.topo.node.name()
    }

    /// Writes manifest FILE atomically; returns the instant of the rename.
    pub(crate) fn write_manifest(&self, file: &str, content: &Manifest) -> Instant {
        self.manifests.write(file, content)
    }

    /// Writes FILE with raw TEXT (e.g. broken YAML) atomically.
    pub(crate) fn write_raw(&self, file: &str, text: &str) -> Instant {
        self.manifests.write_text(file, text)
    }

    /// Starts the agent and waits until it is ready.
    pub(crate) fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Starts the agent with EXTRA flags and waits until it is ready.
    pub(crate) fn start_agent_with(&mut self, extra: &[String]) {
        let cmd = ns_command(self.node_ns(), lb_binary());
        self.spawn_agent(cmd, extra);
    }

    /// Starts the agent with CAPS as its only capabilities (`setpriv`) and
    /// EXTRA flags, and waits until it is ready.
    pub(crate) fn start_agent_with_caps(&mut self, caps: &[String], extra: &[String]) {
        let mut cmd = ns_command(self.node_ns(), "setpriv");
        cmd.args(with_only(caps, &lb_binary()));
        self.spawn_agent(cmd, extra);
    }

    /// CMD (the agent's program) with the lab's flags and EXTRA.
    fn spawn_agent(&mut self, mut cmd: std::process::Command, extra: &[String]) {
        assert!(self.agent.is_none(), "agent already running");
        cmd.arg("agent")
            .arg("--source")
            .arg(self.manifests.source())
            .arg("--attach")
            .arg(self.topo.node_ifaces().join(","))
            .arg("--pin-path")
            .arg(&self.pins.path)
            .arg("--metrics-addr")
            .arg(METRICS_ADDR)
            .args(extra);
        // The socket programs only where a test asks for them (with its own
        // child cgroup): by default they would attach to the machine's
        // cgroup root.
        if !extra
            .iter()
            .any(|a| a == "--socket-lb" || a.starts_with("--socket-lb="))
        {
            cmd.arg("--socket-lb=off");
        }
        self.agent = Some(spawn_logged(&mut cmd, &self.log));
        self.wait_ready();
    }

    /// SIGKILL, like a crash or an OOM kill.
    pub(crate) fn kill_agent(&mut self) {
        drop(self.agent.take().expect("agent running"));
        log_note(&self.log, "agent SIGKILLed");
    }

    pub(crate) fn assert_agent_alive(&mut self) {
        self.agent
            .as_mut()
            .expect("agent started")
            .assert_alive("the agent");
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        let mut last = String::from("never asked");
        while start.elapsed() < Duration::from_secs(10) {
            self.assert_agent_alive();
            match http_get(self.node_ns(), metrics_addr(), "/readyz") {
                Ok((200, _)) => {
                    eprintln!("agent ready after {:?}", start.elapsed());
                    return;
                }
                Ok((code, _)) => last = format!("HTTP {code}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("agent not ready within 10 s (last /readyz: {last})");
    }

    /// HTTP status of GET PATH on the agent's metrics address.
    pub(crate) fn http_status(&self, path: &str) -> Result<u16, String> {
        http_get(self.node_ns(), metrics_addr(), path).map(|(code, _)| code)
    }

    pub(crate) fn services(&self) -> Result<Vec<ServiceView>, String> {
        self.pins.services()
    }

    /// The agent's pin directory.
    pub(crate) fn pin_path(&self) -> &std::path::Path {
        &self.pins.path
    }

    /// Polls `lb services --json` until every EXPECT is met (at most 5 s);
    /// returns the time from SINCE to the end of the first matching poll.
    pub(crate) fn wait_programmed(&self, since: Instant, expect: &[Expect]) -> Duration {
        let mut last = Err(String::from("never polled"));
        while since.elapsed() < Duration::from_secs(5) {
            last = self.services();
            if let Ok(views) = &last
                && expect.iter().all(|e| e.met_by(views))
            {
                return since.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "maps never matched within 5 s.\nexpected: {expect:#?}\nlast `lb services`: {last:#?}"
        );
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The dual-stack `web` Service on both VIPs with ENDPOINTS
    /// (backend name, ready).
    pub(crate) fn web_file(&self, endpoints: &[(&str, bool)]) -> Manifest {
        let eps: Vec<(&Pod, bool)> = endpoints
            .iter()
            .map(|(name, ready)| (self.topo.backend(name), *ready))
            .collect();
        service_file(
            "web",
            &[web_vip(Family::V4), web_vip(Family::V6)],
            &WEB_PORTS,
            &eps,
        )
    }

    /// The four `web` frontends (v4/v6 x http/dns) with BACKENDS active.
    pub(crate) fn web_expect(&self, backends: &[&str]) -> Vec<Expect> {
        let mut out = Vec::new();
        for family in Family::BOTH {
            for (port, protocol) in [(HTTP_PORT, "TCP"), (DNS_PORT, "UDP")] {
                out.push(Expect {
                    vip: web_vip(family),
                    port,
                    protocol,
                    active: self.topo.backend_addrs(family, backends),
                });
            }
        }
        out
    }
}
