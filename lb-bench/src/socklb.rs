//! Socket-level load balancing: new TCP connections per second from a
//! process in the node's own namespace through a `ClusterIP` (translated at
//! `connect()` by the cgroup programs) against the same process straight
//! to the backend, both families, at 10 and 10k Services. The goal is at
//! least 0.99x: the translation is one map lookup per `connect()`, nothing per
//! packet. For comparison, a pod through the TC path (the same `ClusterIP`,
//! translated per packet at the node's veth) against a second pod straight
//! to the backend (routed by the node, the TC program looked up and missed).
//!
//! ```text
//!   pod (client, TC path)        node (lb agent; node client in a child cgroup)    backend (accept + reset)
//!   198.18.41.2 -- veth -- 198.18.41.1 (to-pod)  198.18.40.1 (to-be) -- veth -- 198.18.40.2
//!   fd00:41::2                  fd00:41::1          fd00:40::1                      fd00:40::2
//!   pod2 (client, direct)
//!   198.18.42.2 -- veth -- 198.18.42.1 (to-pod2)
//!   fd00:42::2                  fd00:42::1
//! ```
//!
//! The pod's direct contender is a second pod (the same kind of veth,
//! the TC program attached to it too). From the pod of the `ClusterIP`
//! runs, direct connections time out every few rounds: one that reuses
//! the source port of a translated connection to the same backend, closed
//! less than 10 s before, meets that flow's reply entry (closing, 10 s),
//! and its SYN-ACK is translated back to the `ClusterIP` (reproduced by
//! hand: a direct `connect()` from the port of a `ClusterIP` connection
//! just reset timed out; 11 s later it connected). See README, "Limits
//! that remain".
//!
//! The four contenders of a family run one after the other in a rotated
//! order each round; the table shows medians over rounds and the spread of
//! the per-round ratios (each ratio from two measurements taken next to
//! each other), so a loaded machine shows as spread, not as a result.
//!
//! The socket programs are attached to a child cgroup this run creates
//! under `/sys/fs/cgroup/unified`, holding only the node client process
//! (this binary's `connect-loop`), never the machine's root cgroup; the
//! pod client runs outside it. Namespaces, pins and the cgroup are removed
//! at the end, also on failure.

use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::progstats::{ProgramNs, SockProgCost};
use crate::stats::summary;
use crate::sys::{Netns, TempDir, run_ok};

const NODE4: &str = "198.18.40.1";
const NODE6: &str = "fd00:40::1";
const BACKEND4: &str = "198.18.40.2";
const BACKEND6: &str = "fd00:40::2";
const NODE_POD4: &str = "198.18.41.1";
const NODE_POD6: &str = "fd00:41::1";
const POD4: &str = "198.18.41.2";
const POD6: &str = "fd00:41::2";
const NODE_POD2_4: &str = "198.18.42.1";
const NODE_POD2_6: &str = "fd00:42::1";
const POD2_4: &str = "198.18.42.2";
const POD2_6: &str = "fd00:42::2";
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;

/// What to measure.
pub struct Settings {
    pub lb: PathBuf,
    pub scales: Vec<u32>,
    pub secs: u32,
    pub rounds: usize,
    /// Seconds of interleaved connects (socket against direct) per family
    /// and scale.
    pub paired_secs: u32,
}

impl Settings {
    /// The smoke run: 10 and 1k Services, 1 s per measurement, 1 round.
    pub fn quick(lb: PathBuf) -> Self {
        Self {
            lb,
            scales: vec![10, 1_000],
            secs: 1,
            rounds: 1,
            paired_secs: 2,
        }
    }
}

/// A child cgroup of the unified hierarchy, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn create() -> anyhow::Result<Self> {
        let path =
            Path::new("/sys/fs/cgroup/unified").join(format!("lb-bench-{}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok())
            {
                // SAFETY: kill(2) of this run's client.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[socklb] warning: cannot remove {}", self.0.display());
    }
}

/// The `ClusterIP` of Service I (1-based) of FAMILY.
fn vip(i: u32, v6: bool) -> IpAddr {
    let (hi, lo) = (
        u8::try_from(i >> 8).unwrap_or(0),
        u8::try_from(i & 0xff).unwrap_or(0),
    );
    if v6 {
        IpAddr::V6(std::net::Ipv6Addr::new(
            0xfd00,
            0x96,
            0,
            0,
            0,
            0,
            u16::from(hi),
            u16::from(lo),
        ))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::new(198, 19, hi, lo))
    }
}

/// N dual-stack Services of one TCP port, each with the backend as its
/// one endpoint, as one JSON list.
fn manifests(n: u32) -> String {
    let mut items = Vec::new();
    for i in 1..=n {
        let name = format!("s{i}");
        let (v4, v6) = (vip(i, false).to_string(), vip(i, true).to_string());
        items.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"type": "ClusterIP", "clusterIP": v4, "clusterIPs": [v4, v6],
                     "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                     "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP", "targetPort": BACKEND_PORT}]}}));
        for (suffix, kind, addr) in [("v4", "IPv4", BACKEND4), ("v6", "IPv6", BACKEND6)] {
            items.push(
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-{suffix}"), "namespace": "bench",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": kind,
                "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
                "endpoints": [{"addresses": [addr], "conditions": {"ready": true}}]}),
            );
        }
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// The namespaces of a run.
struct Topology {
    node: Netns,
    backend: Netns,
    pod: Netns,
    pod2: Netns,
}

const SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_local_port_range", "1024 65535"),
    ("net/ipv4/tcp_tw_reuse", "1"),
    ("net/ipv4/tcp_max_tw_buckets", "4096"),
    ("net/core/somaxconn", "8192"),
    ("net/ipv4/tcp_max_syn_backlog", "8192"),
];

/// Adds a veth pair `NODE_IF` (in NODE) -- eth0 (in PEER) with the addresses
/// of both sides, up.
fn link(node: &Netns, node_if: &str, peer: &Netns, addrs: [(&str, &str); 2]) -> anyhow::Result<()> {
    node.ip(&[
        "link",
        "add",
        node_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer.name(),
    ])?;
    for ((ns, dev), (v4, v6)) in [(node, node_if), (peer, "eth0")].into_iter().zip(addrs) {
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            dev,
            "nodad",
        ])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(())
}

/// The node, backend and pod namespaces: node -- backend and node -- pod
/// veth pairs, the node routing between them.
fn topology() -> anyhow::Result<Topology> {
    let topo = Topology {
        node: Netns::create("sl-node")?,
        backend: Netns::create("sl-be")?,
        pod: Netns::create("sl-pod")?,
        pod2: Netns::create("sl-pod2")?,
    };
    link(
        &topo.node,
        "to-be",
        &topo.backend,
        [(NODE4, NODE6), (BACKEND4, BACKEND6)],
    )?;
    link(
        &topo.node,
        "to-pod",
        &topo.pod,
        [(NODE_POD4, NODE_POD6), (POD4, POD6)],
    )?;
    link(
        &topo.node,
        "to-pod2",
        &topo.pod2,
        [(NODE_POD2_4, NODE_POD2_6), (POD2_4, POD2_6)],
    )?;
    for ns in [&topo.node, &topo.backend, &topo.pod, &topo.pod2] {
        ns.sysctls(SYSCTLS)?;
    }
    topo.node.sysctls(&[
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv6/conf/all/forwarding", "1"),
    ])?;
    for (pod, v4, v6) in [
        (&topo.pod, NODE_POD4, NODE_POD6),
        (&topo.pod2, NODE_POD2_4, NODE_POD2_6),
    ] {
        pod.ip(&["route", "add", "default", "via", v4])?;
        pod.ip(&["-6", "route", "add", "default", "via", v6])?;
    }
    for (v4, v6) in [
        ("198.18.41.0/24", "fd00:41::/64"),
        ("198.18.42.0/24", "fd00:42::/64"),
    ] {
        topo.backend.ip(&["route", "add", v4, "via", NODE4])?;
        topo.backend.ip(&["-6", "route", "add", v6, "via", NODE6])?;
    }
    Ok(topo)
}

/// Who connects to what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    /// The node client straight to the backend.
    NodeDirect,
    /// The node client to the `ClusterIP` (socket-LB).
    NodeSocket,
    /// A second pod's client straight to the backend (routed by the node).
    PodDirect,
    /// The pod client to the `ClusterIP` (TC path).
    PodTc,
}

impl Contender {
    const ALL: [Self; 4] = [
        Self::NodeDirect,
        Self::NodeSocket,
        Self::PodDirect,
        Self::PodTc,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::NodeDirect => "node_direct",
            Self::NodeSocket => "node_clusterip_socket",
            Self::PodDirect => "pod_direct",
            Self::PodTc => "pod_clusterip_tc",
        }
    }
}

/// Runs the measurement; the result as JSON.
///
/// # Errors
/// A step of the setup failed, or the agent did not become ready.
pub fn run(settings: &Settings) -> anyhow::Result<Value> {
    crate::sys::sweep_stale();
    let topo = topology()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (stop, ns) = (Arc::clone(&stop), topo.backend.name().to_owned());
        std::thread::spawn(move || accept_loop(&ns, &stop))
    };
    let cgroup = Cgroup::create()?;
    let work = TempDir::new("lb-bench-socklb")?;
    let _stats = crate::progstats::enable()?;
    let mut results = Vec::new();
    for &scale in &settings.scales {
        crate::sys::check_interrupted()?;
        let dir = work.path().join(format!("m{scale}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("services.json"), manifests(scale))?;
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/{}{}-sl-{scale}",
            crate::sys::TAG,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pins);
        let mut cmd = topo.node.command(&settings.lb);
        cmd.args([
            "agent",
            "--attach",
            "to-be,to-pod,to-pod2",
            "--metrics-addr",
            "127.0.0.1:9918",
        ])
        .args(["--socket-lb", "hostns"])
        .arg(format!("--source=file:{}", dir.display()))
        .arg("--pin-path")
        .arg(&pins)
        .arg("--cgroup-root")
        .arg(&cgroup.0);
        let agent = crate::sys::Daemon::spawn("lb agent", &mut cmd, &dir.join("agent.log"))?;
        let started = Instant::now();
        let measured = measure_scale(&topo, &cgroup, settings, (scale, &pins), started);
        drop(agent);
        let _ = crate::sys::cleanup_output(
            topo.node
                .command(&settings.lb)
                .args(["cleanup", "--pin-path"])
                .arg(&pins),
            Duration::from_secs(30),
        );
        let _ = std::fs::remove_dir_all(&pins);
        match measured {
            Ok(value) => results.push(value),
            Err(error) => {
                let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                return Err(error.context(format!(
                    "agent log (last lines, newest first):\n{}",
                    tail.join("\n")
                )));
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    drop(server);
    Ok(json!({
        "socklb_connect": results,
        "seconds_per_round": settings.secs,
        "rounds": settings.rounds,
        "paired_secs": settings.paired_secs,
        "load_average": crate::sys::load_average(),
    }))
}

/// Where CONTENDER connects to at SCALE.
fn target(contender: Contender, scale: u32, v6: bool) -> anyhow::Result<SocketAddr> {
    Ok(match contender {
        Contender::NodeDirect | Contender::PodDirect => {
            let backend: IpAddr = if v6 { BACKEND6 } else { BACKEND4 }.parse()?;
            SocketAddr::new(backend, BACKEND_PORT)
        }
        Contender::NodeSocket | Contender::PodTc => SocketAddr::new(vip(scale, v6), SERVICE_PORT),
    })
}

/// The rate CONTENDER makes to TARGET in SECS.
fn rate_of(
    topo: &Topology,
    cgroup: &Cgroup,
    contender: Contender,
    target: SocketAddr,
    secs: u32,
) -> anyhow::Result<f64> {
    match contender {
        Contender::NodeDirect | Contender::NodeSocket => {
            connect_rate(&topo.node, Some(cgroup), target, secs)
        }
        Contender::PodDirect => connect_rate(&topo.pod2, None, target, secs),
        Contender::PodTc => connect_rate(&topo.pod, None, target, secs),
    }
}

/// Both families at one scale, once the agent translates.
fn measure_scale(
    topo: &Topology,
    cgroup: &Cgroup,
    settings: &Settings,
    (scale, pins): (u32, &Path),
    started: Instant,
) -> anyhow::Result<Value> {
    for contender in [Contender::NodeSocket, Contender::PodTc] {
        for v6 in [false, true] {
            wait_reachable(topo, cgroup, contender, target(contender, scale, v6)?)?;
        }
    }
    eprintln!(
        "[socklb] {scale} services: translated {:.1} s after the agent started",
        started.elapsed().as_secs_f64()
    );
    let mut out = json!({"services": scale});
    for v6 in [false, true] {
        let family = if v6 { "ipv6" } else { "ipv4" };
        let mut rates: std::collections::BTreeMap<&str, Vec<f64>> =
            std::collections::BTreeMap::new();
        let mut program_ns = ProgramNs::default();
        // Each round in a rotated order, so that no contender always gets
        // the warmer (or the busier) part of a round.
        for round in 0..settings.rounds {
            let mut order = Contender::ALL.to_vec();
            order.rotate_left(round % Contender::ALL.len());
            for contender in order {
                crate::sys::check_interrupted()?;
                let node = matches!(contender, Contender::NodeDirect | Contender::NodeSocket);
                let before = node.then(|| SockProgCost::sample(pins)).transpose()?;
                let rate = rate_of(
                    topo,
                    cgroup,
                    contender,
                    target(contender, scale, v6)?,
                    settings.secs,
                )?;
                rates.entry(contender.name()).or_default().push(rate);
                if let Some(before) = before {
                    let cost = SockProgCost::sample(pins)?.since(&before);
                    program_ns.push(contender.name(), cost);
                }
            }
        }
        let of = |c: Contender| rates.get(c.name()).cloned().unwrap_or_default();
        let per_round = |a: Contender, b: Contender| -> Vec<f64> {
            of(a).iter().zip(of(b)).map(|(x, y)| x / y).collect()
        };
        let socket_ratio = per_round(Contender::NodeSocket, Contender::NodeDirect);
        let tc_ratio = per_round(Contender::PodTc, Contender::PodDirect);
        let median = |c: Contender| summary(&of(c))["median"].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "[socklb] {scale} services {family}: node direct {:.0}/s, node ClusterIP (socket) {:.0}/s \
             ({:.3}x); pod direct {:.0}/s, pod ClusterIP (TC) {:.0}/s ({:.3}x)",
            median(Contender::NodeDirect),
            median(Contender::NodeSocket),
            crate::stats::median(&socket_ratio),
            median(Contender::PodDirect),
            median(Contender::PodTc),
            crate::stats::median(&tc_ratio),
        );
        let (paired, control) = interleaved(topo, cgroup, settings, scale, v6)?;
        let ns = |c: Contender, i| program_ns.median(c.name(), i);
        eprintln!(
            "[socklb] {scale} services {family}: socket programs, ns per run (BPF stats): \
             direct connect {:.0} release {:.0}; ClusterIP connect {:.0} release {:.0}",
            ns(Contender::NodeDirect, 0),
            ns(Contender::NodeDirect, 1),
            ns(Contender::NodeSocket, 0),
            ns(Contender::NodeSocket, 1),
        );
        let mut entry = json!({
            "program_ns": program_ns.to_json(),
            "socket_vs_direct": summary(&socket_ratio),
            "tc_vs_direct": summary(&tc_ratio),
            "socket_vs_direct_interleaved": paired,
            "direct_vs_direct_interleaved": control,
        });
        for contender in Contender::ALL {
            entry[contender.name()] = summary(&of(contender));
        }
        out[family] = entry;
    }
    Ok(out)
}

/// The interleaved measurements at SCALE over one family (`paired.rs`):
/// the socket path against the direct connect, and the direct connect
/// against itself (the control); printed, and their JSON.
fn interleaved(
    topo: &Topology,
    cgroup: &Cgroup,
    settings: &Settings,
    scale: u32,
    v6: bool,
) -> anyhow::Result<(Value, Value)> {
    let family = if v6 { "ipv6" } else { "ipv4" };
    let direct = target(Contender::NodeDirect, scale, v6)?;
    let paired = connect_pair(
        &topo.node,
        cgroup,
        [target(Contender::NodeSocket, scale, v6)?, direct],
        settings.paired_secs,
    )?;
    // The measurement's own bias: the direct connect against itself,
    // whose extra should be 0 within its interval (see `paired.rs`).
    let control = connect_pair(
        &topo.node,
        cgroup,
        [direct, direct],
        settings.paired_secs.div_ceil(4),
    )?;
    eprintln!(
        "[socklb] {scale} services {family}: interleaved, socket/direct {:.4}x by the extra \
         (95% interval {}; ratio of medians {:.4}x), socket's extra per connection {:.3} µs \
         ({}) over {} pairs; stalls socket {} direct {}; control, direct against itself: \
         {:.3} µs ({})",
        paired["rate_ratio"].as_f64().unwrap_or(f64::NAN),
        paired["rate_ratio_ci95"],
        paired["ratio"].as_f64().unwrap_or(f64::NAN),
        paired["a_extra_us"].as_f64().unwrap_or(f64::NAN),
        paired["a_extra_us_ci95"],
        paired["pairs"],
        paired["a_stalls"],
        paired["b_stalls"],
        control["a_extra_us"].as_f64().unwrap_or(f64::NAN),
        control["a_extra_us_ci95"],
    );
    Ok((paired, control))
}

/// Waits until CONTENDER makes a connection to TARGET.
fn wait_reachable(
    topo: &Topology,
    cgroup: &Cgroup,
    contender: Contender,
    target: SocketAddr,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        crate::sys::check_interrupted()?;
        if rate_of(topo, cgroup, contender, target, 0).is_ok_and(|n| n > 0.0) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "{target} was not reachable for {} within 120 s",
        contender.name()
    )
}

/// Runs this binary with ARGS (an internal client subcommand) in NS, in
/// CGROUP if given (else in this process's cgroup): the shell moves
/// itself into the cgroup before it becomes the client, so that every
/// socket of the client is the cgroup's. Its standard output.
fn run_client(ns: &Netns, cgroup: Option<&Cgroup>, args: &[String]) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let cgroup_procs = cgroup.map_or_else(|| "/dev/null".into(), |c| c.0.join("cgroup.procs"));
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1" && ns="$2" exe="$3" && shift 3 && exec nsenter --net="/run/netns/$ns" -- "$exe" "$@""#)
            .arg("sh")
            .arg(cgroup_procs)
            .arg(ns.name())
            .arg(exe)
            .args(args),
    )
}

/// Connections per second the client made to TARGET in SECS (0: one),
/// from NS, in CGROUP if given.
fn connect_rate(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    target: SocketAddr,
    secs: u32,
) -> anyhow::Result<f64> {
    let out = run_client(
        ns,
        cgroup,
        &[
            "connect-loop".into(),
            "--target".into(),
            target.to_string(),
            "--secs".into(),
            secs.to_string(),
        ],
    )?;
    out.trim()
        .parse()
        .with_context(|| format!("connect-loop said {out:?}"))
}

/// The interleaved measurement (`paired.rs`) from NS in CGROUP: connects
/// to `targets[0]` and `targets[1]` in turn for SECS; its JSON.
fn connect_pair(
    ns: &Netns,
    cgroup: &Cgroup,
    targets: [SocketAddr; 2],
    secs: u32,
) -> anyhow::Result<Value> {
    let out = run_client(
        ns,
        Some(cgroup),
        &[
            "connect-pair".into(),
            "--target".into(),
            targets[0].to_string(),
            "--versus".into(),
            targets[1].to_string(),
            "--secs".into(),
            secs.to_string(),
        ],
    )?;
    serde_json::from_str(out.trim()).with_context(|| format!("connect-pair said {out:?}"))
}

/// The backend: accepts and drops connections until STOP.
fn accept_loop(ns: &str, stop: &AtomicBool) {
    let netns = File::open(format!("/run/netns/{ns}"));
    let Ok(netns) = netns else { return };
    // SAFETY: setns on this thread with a namespace fd.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return;
    }
    // Away from the client's CPU (`paired::connect_pair`).
    crate::sys::pin_thread(1);
    let Ok(listener) = TcpListener::bind(("::", BACKEND_PORT)) else {
        return;
    };
    // A deep accept queue (std listens with 128): a full queue drops SYNs,
    // and a dropped SYN costs the client a 1 s retransmission.
    // SAFETY: listen(2) again on a listening socket only resizes its queue.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    // Blocking accepts (a polling loop falls behind); the thread ends with
    // the process, after STOP.
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            // Closed with a reset (linger 0): neither side keeps the
            // connection in TIME_WAIT, so the client's ports never meet
            // an old connection of theirs.
            Ok((stream, _)) => {
                crate::sys::linger_zero(&stream);
                drop(stream);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// `lb-bench connect-loop`: connects to TARGET and closes, for SECS
/// seconds (the backend resets each connection: no `TIME_WAIT`); prints
/// the rate.
/// SECS 0: one connection, prints 1 on success.
///
/// # Errors
/// A connection failed.
pub fn connect_loop(target: SocketAddr, secs: u32) -> anyhow::Result<()> {
    // As `paired::connect_pair`.
    crate::sys::pin_thread(0);
    let start = Instant::now();
    let limit = Duration::from_secs(u64::from(secs));
    let mut count: u64 = 0;
    let mut slowest = Duration::ZERO;
    loop {
        // A reset seen by `connect()` is a connection made (`timed_connect`).
        slowest = slowest.max(crate::paired::timed_connect(target)?);
        count += 1;
        if start.elapsed() >= limit {
            break;
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let rate = if secs == 0 {
        count as f64
    } else {
        count as f64 / start.elapsed().as_secs_f64()
    };
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{rate}")?;
    if crate::sys::debug_output() {
        eprintln!("{count} connections, slowest {slowest:?}");
    }
    Ok(())
}

/// The report's section (nothing when the stage did not run).
pub fn section(md: &mut String, socklb: &Value) {
    use std::fmt::Write as _;
    let Some(scales) = socklb["socklb_connect"].as_array() else {
        return;
    };
    let _ = writeln!(
        md,
        "## Socket-level load balancing (issue 11)\n\n\
         New TCP connections/s (connect, the backend resets at once: no `TIME_WAIT`) from a \
         process in the node's namespace, in a child cgroup the run creates (the socket \
         programs are attached to it only): through a `ClusterIP` (translated at `connect()`) \
         and straight to the backend. For comparison, a pod through the TC path (the same \
         `ClusterIP`) and a second pod straight to the backend (routed by the node; a second pod, see the module doc). One \
         client process per measurement, {} s each, {} rounds with the four contenders rotated; \
         medians [min–max]; `×` is the median of the per-round ratios [min–max]. Those rounds \
         swing by ±20% on a shared machine, so the goal (socket ≥ 0.99× direct) is judged \
         on the interleaved columns: one process connecting to the `ClusterIP` and to the \
         backend in turn (which comes first alternates from pair to pair), every connect \
         timed, {} s per row; `extra` is the median difference of the two connects of a pair \
         (the socket path's cost per connection, robust to the two modes a busy machine gives \
         connect times), with its 95% interval from blocks of 500 pairs; `interleaved × \
         direct` is the rate that extra makes (the direct connects' mean time over that plus \
         the extra); `control` is the extra of the direct connect against itself (a quarter \
         as long), the measurement's own bias, which should be 0 within its interval. \
         `programs` is the socket programs' own time per run (`connect` + \
         `release`, ns, BPF run-time statistics) during the direct and the socket rounds \
         (`lb-bench/src/socklb.rs`, `paired.rs`, `progstats.rs`).\n",
        socklb["seconds_per_round"], socklb["rounds"], socklb["paired_secs"],
    );
    let _ = writeln!(
        md,
        "| Services | family | node direct | node → ClusterIP (socket) | × direct | interleaved × direct [95%] | extra µs [95%] | control µs [95%] | programs ns, direct / socket | pod direct | pod → ClusterIP (TC) | × direct |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let cell = |v: &Value, d: usize| crate::report::spread(v, d);
    for scale in scales {
        for family in ["ipv4", "ipv6"] {
            let f = &scale[family];
            let paired = &f["socket_vs_direct_interleaved"];
            // "—" for results from before a column existed (or none
            // measured: every connect of a side stalled).
            let interval = |value: &Value, key: &str, digits: usize| {
                let at = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
                let range = &value[format!("{key}_ci95")];
                if value[key].is_null() {
                    return "—".to_owned();
                }
                format!(
                    "{:.digits$} [{:.digits$}–{:.digits$}]",
                    at(&value[key]),
                    at(&range[0]),
                    at(&range[1]),
                )
            };
            let interleaved = interval(paired, "rate_ratio", 3);
            let extra = interval(paired, "a_extra_us", 2);
            let control = interval(&f["direct_vs_direct_interleaved"], "a_extra_us", 2);
            let ns = |contender: &str, kind: &str| {
                f["program_ns"][contender][kind]["median"]
                    .as_f64()
                    .unwrap_or(f64::NAN)
            };
            let programs = format!(
                "{:.0} + {:.0} / {:.0} + {:.0}",
                ns("node_direct", "connect"),
                ns("node_direct", "release"),
                ns("node_clusterip_socket", "connect"),
                ns("node_clusterip_socket", "release"),
            );
            let _ = writeln!(
                md,
                "| {} | {family} | {} | {} | {} | {interleaved} | {extra} | {control} | {programs} | {} | {} | {} |",
                scale["services"],
                cell(&f["node_direct"], 0),
                cell(&f["node_clusterip_socket"], 0),
                cell(&f["socket_vs_direct"], 3),
                cell(&f["pod_direct"], 0),
                cell(&f["pod_clusterip_tc"], 0),
                cell(&f["tc_vs_direct"], 3),
            );
        }
    }
    md.push('\n');
}
