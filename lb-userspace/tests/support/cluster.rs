//! The two-node cluster of the Service-behaviour harnesses
//! (`harness_services_*.rs`): two "node" namespaces joined by a fabric
//! link, each running its own `lb` agent, pods behind each node, and two
//! "external" clients on uplinks of node 1.
//!
//! ```text
//!   ext (198.18.200.2, fd00:200::2)     ext2 (198.18.201.2, fd00:201::2)
//!        | h-ext                            | h-ext2
//!   node1 [lb agent --node-name node1 --zone zone-a
//!          --node-ip 198.18.200.1,fd00:200::1]
//!        | h-client1 | h-be1 | h-be2                 fab1
//!   client1 (.1.2)  be1 (.2.2)  be2 (.3.2)             |  198.18.100.0/24
//!                                                    fab2    fd00:100::/64
//!   node2 [lb agent --node-name node2 --zone zone-b
//!          --node-ip 198.18.100.2,fd00:100::2]
//!        | h-be3 | h-be4
//!   be3 (198.18.4.2)  be4 (198.18.5.2)
//! ```
//!
//! Pod K lives on `198.18.K.0/24` and `fd00:K::/64` (the node is `.1`/`::1`,
//! the pod's default route). Service addresses: `ClusterIP`s `198.19.0.N` /
//! `fd00:96::N`, load-balancer ingress `198.19.1.N` / `fd00:97::N`,
//! external IPs `198.19.2.N` / `fd00:98::N`. Both agents read the same
//! manifest directory, as two nodes of one cluster would. Every backend
//! answers, on TCP and UDP ports 8080 and 9090, `NAME PORT PEER`.
//!
//! Teardown (drop order of `Cluster`'s fields): agents, pins (need the node
//! namespaces), servers, namespaces, files; when the test fails, both
//! agents' logs, `lb services` and `lb conntrack` are printed first.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_userspace::testing::ServiceBuilder;

use super::clients::http_get;
use super::manifests::{Cond, HTTP_DNS_EP, Manifest, ManifestDir, SvcPort, slice, suffix};
use super::netns::{Netns, ns_command, sweep_stale_netns, unique_prefix};
use super::pins::{PinGuard, ServiceView, sweep_stale_pins};
use super::process::{
    ChildGuard, METRICS_ADDR, TempDir, lb_binary, log_note, metrics_addr, require_tools,
    spawn_logged,
};
use super::scenarios::Scenarios;
use super::servers::Servers;
use super::topo::{Dual, Family, Pod, address, node_netns};

/// Namespace name tag: namespaces are `lbs<pid>-<n>-<role>`.
const TAG: &str = "lbs";
/// Pin directories are `/sys/fs/bpf/lbs-pins-<pid>-<n>`.
const PIN_TAG: &str = "lbs-pins-";
/// Ports every backend serves, TCP and UDP (`[::]`, dual-stack).
const SERVER_PORTS: [u16; 2] = [8080, 9090];
pub(crate) const BACKENDS: [&str; 4] = ["be1", "be2", "be3", "be4"];
/// Both agents must have synced a manifest change within this.
const APPLY_DEADLINE: Duration = Duration::from_secs(2);
/// Connect timeout of clients that expect a refusal (longer than any
/// allowance, so that a drop shows as a timeout).
pub(crate) const REFUSE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client waits before concluding that nothing answers.
pub(crate) const UNANSWERED_WAIT: Duration = Duration::from_millis(500);
/// How long a denied (dropped) client waits before calling it a timeout.
pub(crate) const DENIED_WAIT: Duration = Duration::from_secs(1);
/// Source addresses of hairpin flows (the agent's defaults).
const HAIRPIN4: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const HAIRPIN6: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0x6c62, 1);

/// The source address of hairpin flows of FAMILY.
pub(crate) fn hairpin(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(HAIRPIN4),
        Family::V6 => IpAddr::V6(HAIRPIN6),
    }
}

/// `ClusterIP`s of Service N.
pub(crate) fn vip(n: u8) -> Dual {
    Dual::service(0, 0x96, n)
}

/// `status.loadBalancer.ingress` IPs of Service N.
pub(crate) fn lb_ip(n: u8) -> Dual {
    Dual::service(1, 0x97, n)
}

/// `spec.externalIPs` of Service N.
pub(crate) fn ext_ip(n: u8) -> Dual {
    Dual::service(2, 0x98, n)
}

/// A dual-stack Service N (`ClusterIP`s `vip(N)`) of TYPE.
pub(crate) fn service(name: &str, n: u8, type_: &str, ports: &[SvcPort]) -> ServiceBuilder {
    super::manifests::service(name, type_, &vip(n).both(), ports)
}

/// An endpoint of a slice: the pod, its conditions, its zone and zone
/// hint, and whether it is hinted for its own node (`PreferSameNode`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ep {
    pod: &'static str,
    cond: Cond,
    zone: Option<&'static str>,
    hint: Option<&'static str>,
    node_hint: bool,
}

pub(crate) const fn ep(pod: &'static str, cond: Cond) -> Ep {
    Ep {
        pod,
        cond,
        zone: None,
        hint: None,
        node_hint: false,
    }
}

pub(crate) const fn ready(pod: &'static str) -> Ep {
    ep(pod, Cond::Ready)
}

impl Ep {
    pub(crate) const fn zoned(self, zone: &'static str, hint: Option<&'static str>) -> Self {
        Self {
            zone: Some(zone),
            hint,
            ..self
        }
    }

    /// Hinted for the node it runs on, as the `EndpointSlice` controller
    /// does for `trafficDistribution: PreferSameNode`.
    pub(crate) const fn same_node(self) -> Self {
        Self {
            node_hint: true,
            ..self
        }
    }
}

/// (address, port, protocol) of a frontend.
pub(crate) type Fe = (IpAddr, u16, String);

pub(crate) fn fe(addr: IpAddr, port: u16, proto: &str) -> Fe {
    (addr, port, proto.to_owned())
}

/// The frontends `ClusterIP`s x PORTS of Service N.
pub(crate) fn cluster_fes(n: u8, ports: &[(u16, &str)]) -> Vec<Fe> {
    Family::BOTH
        .iter()
        .flat_map(|&f| {
            ports
                .iter()
                .map(move |(port, proto)| fe(vip(n).get(f), *port, proto))
        })
        .collect()
}

/// (name, node index, subnet K) of every pod and external client.
const HOSTS: [(&str, usize, u8); 7] = [
    ("client1", 0, 1),
    ("be1", 0, 2),
    ("be2", 0, 3),
    ("be3", 1, 4),
    ("be4", 1, 5),
    ("ext", 0, 200),
    ("ext2", 0, 201),
];

/// A node namespace and what its agent is told.
pub(crate) struct Node {
    pub(crate) name: &'static str,
    /// `--node-ip`.
    ips: Dual,
    zone: &'static str,
    /// Every interface of the namespace (all get the TC program).
    ifaces: Vec<String>,
    pub(crate) netns: Netns,
}

impl Node {
    pub(crate) fn ns(&self) -> &str {
        self.netns.name()
    }

    /// The interfaces its agent attaches to.
    pub(crate) fn ifaces(&self) -> &[String] {
        &self.ifaces
    }
}

/// The namespaces and links; dropping it deletes every namespace (and the
/// veth pairs with them), pods first.
pub(crate) struct Topology {
    pub(crate) hosts: Vec<Pod>,
    pub(crate) nodes: Vec<Node>,
}

impl Topology {
    fn build(prefix: &str) -> Self {
        let mut nodes = vec![
            Node {
                name: "node1",
                ips: Dual::host(200, 1),
                zone: "zone-a",
                ifaces: vec!["fab1".to_owned()],
                netns: node_netns(&format!("{prefix}-node1")),
            },
            Node {
                name: "node2",
                ips: Dual::host(100, 2),
                zone: "zone-b",
                ifaces: vec!["fab2".to_owned()],
                netns: node_netns(&format!("{prefix}-node2")),
            },
        ];

        // Fabric: node1 fab1 (.100.1) <-> node2 fab2 (.100.2).
        nodes[0].netns.ip(&[
            "link",
            "add",
            "fab1",
            "type",
            "veth",
            "peer",
            "name",
            "fab2",
            "netns",
            nodes[1].netns.name(),
        ]);
        address(&nodes[0].netns, "fab1", Dual::host(100, 1));
        address(&nodes[1].netns, "fab2", Dual::host(100, 2));
        for node in &nodes {
            let fab = &node.ifaces[0];
            node.netns
                .sysctls(&[(&format!("net/ipv4/conf/{fab}/rp_filter"), "0")]);
        }

        let mut hosts = Vec::new();
        for (name, node, k) in HOSTS {
            let iface = format!("h-{name}");
            let pod = Pod::wire(&nodes[node].netns, prefix, name, &iface, k).on_node(node);
            nodes[node].ifaces.push(iface);
            hosts.push(pod);
        }

        // node1 reaches node2's pods over the fabric; node2 reaches
        // everything else (node1's pods, ext, ext2) over it.
        for k in [4, 5] {
            let net = Dual::host(k, 0);
            nodes[0].netns.ip(&[
                "route",
                "add",
                &format!("{}/24", net.v4),
                "via",
                "198.18.100.2",
            ]);
            nodes[0].netns.ip(&[
                "-6",
                "route",
                "add",
                &format!("{}/64", net.v6),
                "via",
                "fd00:100::2",
            ]);
        }
        nodes[1]
            .netns
            .ip(&["route", "add", "198.18.0.0/15", "via", "198.18.100.1"]);
        nodes[1]
            .netns
            .ip(&["-6", "route", "add", "fd00::/8", "via", "fd00:100::1"]);

        Self { hosts, nodes }
    }

    pub(crate) fn host(&self, name: &str) -> &Pod {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// The host name owning IP, else the address itself.
    fn name_of(&self, ip: IpAddr) -> String {
        self.hosts
            .iter()
            .find(|h| h.addr.has(ip))
            .map_or_else(|| ip.to_canonical().to_string(), |h| h.name.clone())
    }
}

/// Topology + servers + manifest directory + two agents. Fields drop in
/// declaration order, the teardown order: agents, pins (need the node
/// namespaces), servers, namespaces, files.
pub(crate) struct Cluster {
    /// One per node; `None` while the test has it stopped.
    agents: Vec<Option<ChildGuard>>,
    pins: Vec<PinGuard>,
    _servers: Servers,
    pub(crate) topo: Topology,
    manifests: ManifestDir,
    logs: Vec<PathBuf>,
    /// Extra flags of each node's agent (`new_with_args`).
    agent_args: Vec<Vec<String>>,
    _work: TempDir,
}

impl Cluster {
    /// Builds the topology, starts the servers and both agents, and waits
    /// until both are ready. WHAT names the test in the log.
    pub(crate) fn new(what: &str) -> Self {
        Self::new_with_args(what, Vec::new())
    }

    /// [`Cluster::new`] with extra flags for the agents (ARGS\[i\]: node
    /// i's; missing: none).
    pub(crate) fn new_with_args(what: &str, args: Vec<Vec<String>>) -> Self {
        super::panics::remember();
        require_tools(&["ip", "nsenter"]);
        sweep_stale_netns(TAG);
        sweep_stale_pins(PIN_TAG);
        let started = Instant::now();
        let prefix = unique_prefix(TAG);
        let work = TempDir::create(&prefix);
        let manifests = ManifestDir::create(&work);
        let topo = Topology::build(&prefix);
        let backends: Vec<&Pod> = BACKENDS.iter().map(|b| topo.host(b)).collect();
        let servers = Servers::start(&backends, &SERVER_PORTS);
        let pins: Vec<PinGuard> = topo
            .nodes
            .iter()
            .map(|node| PinGuard::new(PIN_TAG, node.ns()))
            .collect();
        let logs: Vec<PathBuf> = topo
            .nodes
            .iter()
            .map(|node| work.0.join(format!("agent-{}.log", node.name)))
            .collect();
        eprintln!(
            "lab {prefix} ({what}): manifests {}, work {}",
            manifests.dir.display(),
            work.0.display()
        );
        let mut lab = Self {
            agents: Vec::new(),
            pins,
            _servers: servers,
            topo,
            manifests,
            logs,
            agent_args: args,
            _work: work,
        };
        lab.agents = lab.topo.nodes.iter().map(|_| None).collect();
        for i in 0..lab.topo.nodes.len() {
            lab.start_agent(i);
        }
        for i in 0..lab.topo.nodes.len() {
            lab.wait_ready(i);
        }
        eprintln!("lab {prefix} up in {:?}", started.elapsed());
        lab
    }

    fn start_agent(&mut self, i: usize) {
        let node = &self.topo.nodes[i];
        let mut cmd = ns_command(node.ns(), lb_binary());
        // No socket programs: they would attach to the machine's cgroup root.
        cmd.arg("agent")
            .arg("--socket-lb=off")
            .arg("--source")
            .arg(self.manifests.source())
            .arg("--attach")
            .arg(node.ifaces.join(","))
            .arg("--pin-path")
            .arg(&self.pins[i].path)
            .arg("--metrics-addr")
            .arg(METRICS_ADDR)
            .arg("--node-name")
            .arg(node.name)
            .arg("--node-ip")
            .arg(format!("{},{}", node.ips.v4, node.ips.v6))
            .arg("--zone")
            .arg(node.zone)
            .args(self.agent_args.get(i).into_iter().flatten());
        assert!(
            self.agents[i].is_none(),
            "agent of {} already running",
            node.name
        );
        self.agents[i] = Some(spawn_logged(&mut cmd, &self.logs[i]));
    }

    /// SIGKILL of node I's agent, like a crash or an OOM kill: nothing is
    /// cleaned up, the programs, links and pinned maps stay.
    pub(crate) fn kill_agent(&mut self, i: usize) {
        drop(self.agents[i].take().expect("agent running"));
        log_note(&self.logs[i], "agent SIGKILLed");
    }

    /// SIGTERM to node I's agent, as Kubernetes stops a pod (a rolling
    /// update of the `DaemonSet`); waits until it exited, which it must do
    /// cleanly within 10 s.
    pub(crate) fn stop_agent(&mut self, i: usize) {
        let mut agent = self.agents[i].take().expect("agent running");
        let pid = libc::pid_t::try_from(agent.0.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on the agent this test started and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        let status = loop {
            if let Ok(Some(status)) = agent.0.try_wait() {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the agent of {} did not exit within 10 s of SIGTERM",
                self.topo.nodes[i].name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "the agent of {} exited with {status} after SIGTERM",
            self.topo.nodes[i].name
        );
        log_note(&self.logs[i], "agent stopped (SIGTERM)");
    }

    /// Starts node I's agent again (same flags, same pins) and waits until
    /// it is ready; returns how long that took.
    pub(crate) fn restart_agent(&mut self, i: usize) -> Duration {
        let start = Instant::now();
        self.start_agent(i);
        self.wait_ready(i);
        start.elapsed()
    }

    /// The `/metrics` text of node I's agent.
    pub(crate) fn metrics(&self, i: usize) -> Result<String, String> {
        let (status, body) = http_get(self.topo.nodes[i].ns(), metrics_addr(), "/metrics")?;
        if status != 200 {
            return Err(format!("/metrics: HTTP {status}"));
        }
        Ok(body)
    }

    /// Fails the test if an agent died or a scenario of SC failed.
    pub(crate) fn finish(&mut self, sc: Scenarios) {
        self.assert_agents_alive();
        sc.finish();
    }

    pub(crate) fn assert_agents_alive(&mut self) {
        for (i, agent) in self.agents.iter_mut().enumerate() {
            let Some(agent) = agent else { continue };
            agent.assert_alive(&format!("the agent of {}", self.topo.nodes[i].name));
        }
    }

    fn wait_ready(&mut self, i: usize) {
        let start = Instant::now();
        let mut last = String::from("never asked");
        while start.elapsed() < Duration::from_secs(15) {
            self.assert_agents_alive();
            match http_get(self.topo.nodes[i].ns(), metrics_addr(), "/readyz") {
                Ok((200, _)) => return,
                Ok((code, body)) => last = format!("HTTP {code} {body}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "agent of {} not ready within 15 s (last /readyz: {last})",
            self.topo.nodes[i].name
        );
    }

    /// `lb_sync_total` of agent I (completed syncs).
    fn syncs(&self, i: usize) -> Result<u64, String> {
        self.metrics(i)?
            .lines()
            .find_map(|line| line.strip_prefix("lb_sync_total "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| "no lb_sync_total in /metrics".to_owned())
    }

    fn all_syncs(&self) -> Vec<u64> {
        (0..self.topo.nodes.len())
            .map(|i| self.syncs(i).unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    /// Waits until every agent completed a sync after BEFORE was read (the
    /// file source sends a snapshot only when a file changed, so that sync
    /// carried the change).
    fn wait_synced(&mut self, before: &[u64], since: Instant, what: &str) -> Duration {
        let mut now = Vec::new();
        while since.elapsed() < APPLY_DEADLINE {
            self.assert_agents_alive();
            now = self.all_syncs();
            if now.iter().zip(before).all(|(n, b)| n > b) {
                let took = since.elapsed();
                eprintln!("{what}: applied by both agents {took:?} after the rename");
                return took;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{what}: not applied by both agents within {APPLY_DEADLINE:?} (lb_sync_total \
             before {before:?}, now {now:?})"
        );
    }

    /// Writes FILE atomically (temp + rename) and waits until both agents
    /// synced it.
    pub(crate) fn apply(&mut self, file: &str, content: &Manifest) -> Duration {
        let before = self.all_syncs();
        let renamed = self.manifests.write(file, content);
        self.wait_synced(&before, renamed, file)
    }

    /// The pin directory of node I's agent.
    pub(crate) fn pin_path(&self, i: usize) -> &std::path::Path {
        &self.pins[i].path
    }

    pub(crate) fn pod(&self, name: &str) -> &Pod {
        self.topo.host(name)
    }

    /// The namespace of pod NAME.
    pub(crate) fn ns(&self, name: &str) -> String {
        self.topo.host(name).ns().to_owned()
    }

    /// `--node-ip` of node I.
    pub(crate) fn node_ip(&self, i: usize, family: Family) -> IpAddr {
        self.topo.nodes[i].ips.get(family)
    }

    /// One `EndpointSlice` per family for SERVICE (GROUP distinguishes
    /// several slices of one Service).
    pub(crate) fn slices(
        &self,
        service: &str,
        group: &str,
        ports: &[(&str, u16, &str)],
        eps: &[Ep],
    ) -> Vec<EndpointSlice> {
        Family::BOTH
            .iter()
            .map(|&family| {
                let endpoints = eps.iter().map(|e| {
                    let host = self.pod(e.pod);
                    let node = self.topo.nodes[host.node].name;
                    let endpoint = e.cond.endpoint(host.addr.get(family)).node(node);
                    let endpoint = if e.node_hint {
                        endpoint.node_hints([node])
                    } else {
                        endpoint
                    };
                    let endpoint = match e.zone {
                        Some(zone) => endpoint.zone(zone),
                        None => endpoint,
                    };
                    match e.hint {
                        Some(hint) => endpoint.zone_hints([hint]),
                        None => endpoint,
                    }
                });
                let name = format!("{service}-{group}-{}", suffix(family));
                slice(service, &name, family, ports, endpoints)
            })
            .collect()
    }

    /// SERVICE (named NAME) plus one slice per family with EPS on
    /// `http`/`dns` 8080.
    pub(crate) fn simple(&self, name: &str, service: ServiceBuilder, eps: &[Ep]) -> Manifest {
        Manifest::default()
            .with(&service.build())
            .with_all(&self.slices(name, "a", &HTTP_DNS_EP, eps))
    }

    fn views(&self, i: usize) -> Vec<ServiceView> {
        self.pins[i].services().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every frontend in agent I's maps.
    pub(crate) fn frontends(&self, i: usize) -> BTreeSet<Fe> {
        self.views(i)
            .into_iter()
            .map(|v| (v.addr, v.port, v.proto))
            .collect()
    }

    /// The backends (`be1:8080`, ...) in the slots of frontend
    /// ADDR:PORT/PROTO of agent I; `None` when there is no such frontend.
    fn slot_names(
        &self,
        i: usize,
        addr: IpAddr,
        port: u16,
        proto: &str,
    ) -> Option<BTreeSet<String>> {
        self.views(i)
            .into_iter()
            .find(|v| v.addr == addr && v.port == port && v.proto == proto)
            .map(|v| {
                v.backends
                    .iter()
                    .map(|b| format!("{}:{}", self.topo.name_of(b.addr.ip()), b.addr.port()))
                    .collect()
            })
    }

    /// Frontend ADDR:PORT/PROTO of agent I takes new flows to EXPECTED.
    pub(crate) fn expect_slots(
        &self,
        i: usize,
        addr: IpAddr,
        port: u16,
        proto: &str,
        expected: &[&str],
    ) {
        let got = self.slot_names(i, addr, port, proto);
        let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            got.as_ref(),
            Some(&expected),
            "`lb services` of {}: frontend {} {proto}: wrong backends in the slots \
             (None: no such frontend)",
            self.topo.nodes[i].name,
            SocketAddr::new(addr, port)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, node) in self.topo.nodes.iter().enumerate() {
            let log = std::fs::read_to_string(&self.logs[i]).unwrap_or_default();
            let mut text = String::new();
            let _ = writeln!(
                text,
                "======== {} agent log ({}) ========\n{log}",
                node.name,
                self.logs[i].display()
            );
            let _ = writeln!(
                text,
                "======== {} `lb services` ========\n{}",
                node.name,
                self.pins[i].lb_output(&["services"])
            );
            // The verdict counters say where a lost packet went.
            let reasons = self.metrics(i).map_or_else(
                |e| format!("cannot read the metrics: {e}"),
                |m| {
                    m.lines()
                        .filter(|l| l.contains("reason=") && !l.ends_with(" 0"))
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
            let _ = writeln!(
                text,
                "======== {} verdict counters ========\n{reasons}",
                node.name
            );
            let _ = writeln!(
                text,
                "======== {} `lb conntrack` ========\n{}======== end of {} ========",
                node.name,
                self.pins[i].lb_output(&["conntrack"]),
                node.name
            );
            eprintln!("{text}");
        }
        eprint!("{}", super::panics::recap());
    }
}
