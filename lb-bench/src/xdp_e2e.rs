//! XDP end to end (issue 13): small UDP datagrams per second and new TCP
//! connections per second from the external client namespace through a
//! `NodePort` (externalTrafficPolicy Cluster: DNAT + SNAT) to a backend
//! behind the node, for four contenders side by side in the end-to-end
//! topology (`topo.rs`), each in its own node namespace:
//!
//! - `xdp`: `lb agent --xdp=native` on both node links (the iptables
//!   contender's node namespace, no iptables rules in this stage),
//! - `tc`: `lb agent --xdp=off` (`lb`'s node namespace),
//! - `nftables`: kube-proxy's nftables `NodePort` shape (`nodeport_ruleset`),
//! - `direct`: the client straight to the backend's address, routed.
//! - `xdp-pass`: the client straight to a backend address routed through
//!   the `xdp` node: not a Service, so `lb_xdp` and `lb_tc` pass it to the
//!   stack. Against `direct` it measures what XDP on a veth costs before
//!   the program decides anything (the veth's NAPI ring, and its copy of
//!   every sender skb into an XDP buffer with 256 bytes of headroom).
//!
//! Native XDP on a veth sends `XDP_REDIRECT` frames to the peer, which
//! takes them only with NAPI on (GRO, see `tests/harness_xdp.rs`); the
//! senders' frames must carry full checksums (a NIC never hands XDP a
//! partial one). Both settings are applied to every contender's links, so
//! the paths differ only in who translates.
//!
//! CPU accounting: the machine-wide `/proc/stat` softirq time (and the
//! busy time: user + system + irq + softirq) over each measurement, per
//! packet forwarded to the backend (per connection for TCP). On a
//! 2-core machine nearly all of the forwarding runs in softirq on the
//! sender's CPU, so this shows where the time goes even when the sender
//! is the bottleneck; it includes whatever else the machine runs.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use flood::{ETHTOOL_SGRO, ETHTOOL_STXCSUM, PAYLOAD, blast, cpu_ns, ethtool_set, sink};

use crate::e2e;
use crate::rules::{Contender, ENDPOINTS, Family, HTTP_TARGET, bracketed, real_endpoint, vip};
use crate::stats::summary;
use crate::sys::{self, Daemon, LbAgent, Netns, TempDir};
mod flood;

use crate::topo::{NODE_BACKEND_IF, NODE_CLIENT_IF, Topology, link_addr};

/// The contenders: name, and whose node namespace carries it.
const CONTENDERS: [(&str, Contender); 5] = [
    ("xdp", Contender::Iptables),
    ("tc", Contender::Lb),
    ("nftables", Contender::Nftables),
    ("direct", Contender::Direct),
    ("xdp-pass", Contender::Iptables),
];

/// Samples by (contender, family, metric).
type Series = std::collections::BTreeMap<(&'static str, &'static str, &'static str), Vec<f64>>;

/// The backend address `xdp-pass` sends to (a host route through the
/// `xdp` node; `direct` uses endpoint 0).
fn pass_address(family: Family) -> IpAddr {
    real_endpoint(family, ENDPOINTS - 1)
}

const NODEPORT_HTTP: u16 = 30080;
const NODEPORT_UDP: u16 = 30090;
/// The backend's UDP sink (and the Service's UDP target port).
const UDP_TARGET: u16 = 9000;
/// The UDP sender's CPU (and with it the whole forwarding path: a veth
/// hands frames to its peer's queue on the sending CPU), `/proc/stat` label.
const SENDER_CPU: &str = "cpu0";
/// The command line of `lb-bench xdp-e2e`.
#[derive(clap::Args)]
pub struct Args {
    /// The `lb` binary.
    #[arg(long)]
    pub lb: PathBuf,
    /// Where to write the JSON results.
    #[arg(long)]
    pub json: PathBuf,
    /// A smoke run: 1 round of 1 s measurements.
    #[arg(long)]
    pub quick: bool,
    /// Override the number of rounds.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Override the seconds per measurement.
    #[arg(long)]
    pub secs: Option<u32>,
}

impl From<Args> for Settings {
    fn from(args: Args) -> Self {
        let mut settings = Self::new(args.lb, args.quick);
        settings.rounds = args.rounds.unwrap_or(settings.rounds);
        settings.secs = args.secs.unwrap_or(settings.secs);
        settings
    }
}

/// `lb-bench xdp-e2e`: runs the stage, writes the JSON.
///
/// # Errors
/// See [`run`]; or the JSON could not be written.
pub fn command(args: Args) -> anyhow::Result<()> {
    sys::install_signal_handlers();
    let json = args.json.clone();
    let result = run(&args.into())?;
    std::fs::write(&json, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("write {}", json.display()))?;
    eprintln!("[xdp-e2e] wrote {}", json.display());
    Ok(())
}

/// The settings of a run.
pub struct Settings {
    pub lb: PathBuf,
    pub rounds: usize,
    /// Seconds per measurement.
    pub secs: u32,
    /// wrk connections of the connection-rate test.
    pub connections: u32,
}

impl Settings {
    /// 5 rounds of 3 s (QUICK: 1 round of 1 s).
    pub fn new(lb: PathBuf, quick: bool) -> Self {
        Self {
            lb,
            rounds: if quick { 1 } else { 5 },
            secs: if quick { 1 } else { 3 },
            connections: 32,
        }
    }
}

/// The `NodePort` Service (HTTP and UDP) of the `lb` contenders, with the
/// backend's endpoints, as a `kind: List` manifest.
fn manifest(contender: Contender) -> Value {
    let v4 = vip(contender, Family::V4, 0).to_string();
    let v6 = vip(contender, Family::V6, 0).to_string();
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "np", "namespace": "bench"},
        "spec": {
            "type": "NodePort", "externalTrafficPolicy": "Cluster",
            "clusterIP": v4, "clusterIPs": [v4, v6],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": HTTP_TARGET, "nodePort": NODEPORT_HTTP},
                {"name": "udp", "port": UDP_TARGET, "protocol": "UDP", "targetPort": UDP_TARGET, "nodePort": NODEPORT_UDP},
            ],
        },
    });
    let mut items = vec![service];
    for (family, suffix, kind) in [(Family::V4, "v4", "IPv4"), (Family::V6, "v6", "IPv6")] {
        items.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("np-{suffix}"), "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": "np"}},
            "addressType": kind,
            "endpoints": (0..ENDPOINTS).map(|b| json!({
                "addresses": [real_endpoint(family, b).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
            })).collect::<Vec<_>>(),
            "ports": [
                {"name": "http", "port": HTTP_TARGET, "protocol": "TCP"},
                {"name": "udp", "port": UDP_TARGET, "protocol": "UDP"},
            ],
        }));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// kube-proxy's nftables-mode NAT rules for a `NodePort` (ETP Cluster) of
/// FAMILY at the node's address NODE (pkg/proxy/nftables: `services` ends
/// with the `nodeport-ips` / `service-nodeports` lookup, the `external-`
/// chain marks for masquerade and goes to the `service-` chain, which
/// picks an `endpoint-` chain with `numgen random`).
fn nodeport_ruleset(family: Family, node: IpAddr) -> String {
    let (fam, addr_type, ip) = match family {
        Family::V4 => ("ip", "ipv4_addr", "ip"),
        Family::V6 => ("ip6", "ipv6_addr", "ip6"),
    };
    let t = format!("{fam} kube-proxy");
    let mut out = vec![format!("add table {t}")];
    for (chain, hook, prio) in [
        ("nat-prerouting", "prerouting", "-100"),
        ("nat-output", "output", "-100"),
        ("nat-postrouting", "postrouting", "100"),
    ] {
        out.push(format!(
            "add chain {t} {chain} {{ type nat hook {hook} priority {prio} ; }}"
        ));
    }
    for chain in ["mark-for-masquerade", "masquerading", "services"] {
        out.push(format!("add chain {t} {chain}"));
    }
    out.push(format!(
        "add map {t} service-ips {{ type {addr_type} . inet_proto . inet_service : verdict ; }}"
    ));
    out.push(format!("add set {t} nodeport-ips {{ type {addr_type} ; }}"));
    out.push(format!(
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; }}"
    ));
    out.push(format!("add rule {t} nat-prerouting jump services"));
    out.push(format!("add rule {t} nat-output jump services"));
    out.push(format!("add rule {t} nat-postrouting jump masquerading"));
    out.push(format!(
        "add rule {t} mark-for-masquerade mark set mark or 0x4000"
    ));
    out.push(format!(
        "add rule {t} masquerading mark and 0x4000 == 0 return"
    ));
    out.push(format!(
        "add rule {t} masquerading mark set mark xor 0x4000"
    ));
    out.push(format!("add rule {t} masquerading masquerade fully-random"));
    out.push(format!(
        "add rule {t} services {ip} daddr . meta l4proto . th dport vmap @service-ips"
    ));
    out.push(format!(
        "add rule {t} services fib daddr type local {ip} daddr @nodeport-ips \
         meta l4proto . th dport vmap @service-nodeports"
    ));
    out.push(format!("add element {t} nodeport-ips {{ {node} }}"));
    for (proto, name, node_port, target) in [
        ("tcp", "http", NODEPORT_HTTP, HTTP_TARGET),
        ("udp", "udp", NODEPORT_UDP, UDP_TARGET),
    ] {
        let svc = format!("bench/np/{proto}/{name}");
        let (svc_chain, ext_chain) = (format!("service-{svc}"), format!("external-{svc}"));
        out.push(format!("add chain {t} {svc_chain}"));
        out.push(format!("add chain {t} {ext_chain}"));
        let mut vmap = Vec::new();
        for b in 0..ENDPOINTS {
            let ep = real_endpoint(family, b);
            let ep_chain = format!(
                "endpoint-{svc}__{}/{target}",
                ep.to_string().replace(':', ".")
            );
            out.push(format!("add chain {t} {ep_chain}"));
            out.push(format!(
                "add rule {t} {ep_chain} {ip} saddr {ep} jump mark-for-masquerade"
            ));
            out.push(format!(
                "add rule {t} {ep_chain} meta l4proto {proto} dnat to {}",
                bracketed(ep, target)
            ));
            vmap.push(format!("{b} : goto {ep_chain}"));
        }
        out.push(format!(
            "add rule {t} {svc_chain} numgen random mod {ENDPOINTS} vmap {{ {} }}",
            vmap.join(" , ")
        ));
        out.push(format!("add rule {t} {ext_chain} jump mark-for-masquerade"));
        out.push(format!("add rule {t} {ext_chain} goto {svc_chain}"));
        out.push(format!(
            "add element {t} service-nodeports {{ {proto} . {node_port} : goto {ext_chain} }}"
        ));
    }
    out.join("\n") + "\n"
}

/// Starts `lb agent --xdp=MODE` in CONTENDER's node namespace.
fn start_agent(
    settings: &Settings,
    topo: &Topology,
    work: &Path,
    contender: Contender,
    mode: &str,
) -> anyhow::Result<LbAgent> {
    let node = topo.node(contender);
    let dir = work.join(format!("manifests-{mode}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("np.json"), manifest(contender).to_string())?;
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/{}{}-xdpe2e-{mode}",
        sys::TAG,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&pins);
    let k = contender.index();
    let node_ips = format!(
        "{},{}",
        link_addr(0x10, k, 1, Family::V4),
        link_addr(0x10, k, 1, Family::V6)
    );
    let links = format!("{NODE_CLIENT_IF},{NODE_BACKEND_IF}");
    let mut cmd = node.command(&settings.lb);
    cmd.arg("agent")
        .arg("--socket-lb=off")
        .arg(format!("--xdp={mode}"))
        .arg(format!("--source=file:{}", dir.display()))
        .arg("--attach")
        .arg(&links)
        .arg(format!("--node-ip={node_ips}"))
        .arg("--pin-path")
        .arg(&pins)
        .arg("--metrics-addr")
        .arg("127.0.0.1:9917");
    if mode != "off" {
        cmd.arg(format!("--xdp-interfaces={links}"));
    }
    let daemon = Daemon::spawn(
        &format!("lb agent --xdp={mode}"),
        &mut cmd,
        &work.join(format!("agent-{mode}.log")),
    )?;
    Ok(LbAgent::new(
        "xdp-e2e",
        daemon,
        node.name(),
        &settings.lb,
        pins,
    ))
}

/// Where the client sends to for contender NAME in CONTENDER's node: the
/// node's `NodePort`, or the backend (direct, xdp-pass).
fn target(name: &str, contender: Contender, family: Family, tcp: bool) -> SocketAddr {
    let backend_port = if tcp { HTTP_TARGET } else { UDP_TARGET };
    match (name, contender) {
        ("xdp-pass", _) => SocketAddr::new(pass_address(family), backend_port),
        (_, Contender::Direct) => SocketAddr::new(real_endpoint(family, 0), backend_port),
        _ => SocketAddr::new(
            link_addr(0x10, contender.index(), 1, family),
            if tcp { NODEPORT_HTTP } else { NODEPORT_UDP },
        ),
    }
}

/// Packets received so far by the backend's side of CONTENDER's link.
fn backend_rx(topo: &Topology, contender: Contender) -> anyhow::Result<f64> {
    let iface = format!("b-{}", contender.index());
    let out = topo
        .backend
        .ip(&["-s", "-j", "link", "show", "dev", &iface])?;
    let parsed: Value = serde_json::from_str(&out).context("ip -j link output")?;
    parsed[0]["stats64"]["rx"]["packets"]
        .as_f64()
        .with_context(|| format!("no rx packets of {iface}"))
}

/// `lb_xdp_packets_total{action="redirect"}` of the agent in NODE.
fn xdp_redirects(node: &Netns) -> anyhow::Result<f64> {
    let text = node.run_in(|| {
        let mut stream = TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9917),
            Duration::from_secs(2),
        )?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("lb_xdp_packets_total{action=\"redirect\"} "))
        .and_then(|v| v.trim().parse().ok())
        .context("no lb_xdp_packets_total{action=\"redirect\"} in /metrics")
}

/// One UDP measurement: (metric, value) pairs.
#[expect(clippy::cast_precision_loss, reason = "packet counts far below 2^52")]
fn measure_udp(
    topo: &Topology,
    secs: u32,
    (name, contender): (&str, Contender),
    family: Family,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let to = target(name, contender, family, false);
    let (ready, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let rx_before = backend_rx(topo, contender)?;
    let xdp_before = if contender == Contender::Iptables {
        xdp_redirects(topo.node(contender))?
    } else {
        0.0
    };
    let (sent, received, elapsed, cpu) = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| topo.backend.run_in(|| sink(&ready, &stop)));
        while !ready.load(Ordering::SeqCst) && !receiver.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let cpu_before = (cpu_ns("cpu"), cpu_ns(SENDER_CPU));
        let started = Instant::now();
        let sent = topo.client.run_in(|| blast(to, secs));
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_after = (cpu_ns("cpu"), cpu_ns(SENDER_CPU));
        // Let the queues drain into the sink.
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::SeqCst);
        let delivered = receiver
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (
            sent,
            delivered,
            elapsed,
            (
                cpu_after.0.0 - cpu_before.0.0,
                cpu_after.1.0 - cpu_before.1.0,
                cpu_after.1.1 - cpu_before.1.1,
            ),
        )
    });
    let (sent, received) = (sent? as f64, received? as f64);
    let forwarded = backend_rx(topo, contender)? - rx_before;
    if forwarded < 1.0 {
        bail!("no datagram reached the backend ({sent} sent to {to})");
    }
    let mut values = vec![
        ("udp_pps", forwarded / elapsed),
        ("udp_sent_pps", sent / elapsed),
        ("udp_delivered_pps", received / elapsed),
        ("udp_softirq_ns_per_pkt", cpu.0 / forwarded),
        ("udp_sender_cpu_softirq_ns_per_pkt", cpu.1 / forwarded),
        ("udp_sender_cpu_busy_ns_per_pkt", cpu.2 / forwarded),
    ];
    if contender == Contender::Iptables {
        let redirects = xdp_redirects(topo.node(contender))? - xdp_before;
        // The path itself, not a number: `xdp` must have been forwarded
        // by XDP (one redirect per datagram), `xdp-pass` by the stack.
        let per_packet = redirects / forwarded;
        if (name == "xdp") != (per_packet >= 0.9) {
            bail!("{name}: {per_packet:.2} XDP redirects per datagram reaching the backend");
        }
        values.push(("xdp_redirects_per_pkt", per_packet));
    }
    Ok(values)
}

/// The `TcpExt:` counter NAME of NS (`/proc/thread-self`: the namespace
/// of the thread `run_in` enters, not the process's).
fn tcp_ext(ns: &Netns, name: &str) -> anyhow::Result<f64> {
    let text = ns.run_in(|| Ok(std::fs::read_to_string("/proc/thread-self/net/netstat")?))?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next(), lines.next());
    names
        .zip(values)
        .and_then(|(names, values)| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == name)
                .and_then(|(_, value)| value.parse().ok())
        })
        .with_context(|| format!("no TcpExt {name} in /proc/net/netstat"))
}

/// Client SYN retransmissions and backend PAWS rejections in `TIME_WAIT`
/// so far.
fn late_syns(topo: &Topology) -> anyhow::Result<(f64, f64)> {
    Ok((
        tcp_ext(&topo.client, "TCPSynRetrans")?,
        tcp_ext(&topo.backend, "PAWSTimewait")?,
    ))
}

/// One connection-rate measurement (wrk, `Connection: close`).
#[expect(clippy::cast_precision_loss, reason = "error counts far below 2^52")]
fn measure_tcp(
    topo: &Topology,
    settings: &Settings,
    (name, contender): (&str, Contender),
    family: Family,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let to = target(name, contender, family, true);
    let late_before = late_syns(topo)?;
    let cpu_before = cpu_ns("cpu");
    let out = e2e::wrk(
        &topo.client,
        e2e::CLIENT_CPU,
        &[
            "-t1",
            &format!("-c{}", settings.connections),
            &format!("-d{}s", settings.secs),
            "--timeout",
            "2s",
            "-H",
            "Connection: close",
            &format!("http://{to}/"),
        ],
        settings.secs,
    )?;
    let cpu_after = cpu_ns("cpu");
    let late_after = late_syns(topo)?;
    let rate = e2e::wrk_value(&out, "Requests/sec:").context("no Requests/sec in wrk output")?;
    let conns = rate * f64::from(settings.secs);
    Ok(vec![
        ("conn_per_s", rate),
        (
            "conn_softirq_us_per_conn",
            (cpu_after.0 - cpu_before.0) / conns / 1e3,
        ),
        (
            "conn_busy_us_per_conn",
            (cpu_after.1 - cpu_before.1) / conns / 1e3,
        ),
        ("conn_errors", e2e::wrk_errors(&out) as f64),
        // Each one a connection 1 s late (the initial RTO); a SYN the
        // backend refused in `TIME_WAIT` (PAWS) is retransmitted 1 s later,
        // after a 1 s measurement: counted at the backend.
        ("conn_syn_retransmits", late_after.0 - late_before.0),
        ("conn_backend_paws_tw_rejects", late_after.1 - late_before.1),
    ])
}

/// Links of every contender: GRO on the receivers of forwarded frames
/// (client's and backend's ends), full checksums from the senders.
fn tune_links(topo: &Topology) -> anyhow::Result<()> {
    for (_, contender) in CONTENDERS {
        let k = contender.index();
        for (ns, iface) in [
            (&topo.client, format!("c-{k}")),
            (&topo.backend, format!("b-{k}")),
        ] {
            ethtool_set(ns, &iface, ETHTOOL_SGRO, true)?;
            ethtool_set(ns, &iface, ETHTOOL_STXCSUM, false)?;
        }
    }
    Ok(())
}

/// Per contender, family and metric: the summary, and the per-round
/// ratios to `tc` and to `direct` (each from two measurements of the same
/// round).
fn results(series: &Series) -> Vec<Value> {
    let mut results = Vec::new();
    for ((name, family, metric), values) in series {
        // Per-round ratios: each from two measurements of the same round.
        let ratio = |other: &str| {
            let base = series
                .get(&(other, *family, *metric))
                .cloned()
                .unwrap_or_default();
            let ratios: Vec<f64> = values.iter().zip(&base).map(|(v, b)| v / b).collect();
            summary(&ratios)
        };
        results.push(json!({
            "contender": name, "family": family, "metric": metric,
            "summary": summary(values), "vs_tc": ratio("tc"), "vs_direct": ratio("direct"),
        }));
    }
    results
}

/// Runs the stage; the result as JSON.
///
/// # Errors
/// The topology, a server, an agent or the rules could not be set up, or a
/// contender never answered.
pub fn run(settings: &Settings) -> anyhow::Result<Value> {
    let missing: Vec<&str> = ["ip", "nsenter", "wrk", "nginx", "iperf3", "nft"]
        .into_iter()
        .filter(|p| !sys::have_program(p))
        .collect();
    anyhow::ensure!(missing.is_empty(), "missing tools: {}", missing.join(", "));
    sys::sweep_stale();
    let work = TempDir::new("xdp-e2e")?;
    eprintln!("[xdp-e2e] building the topology");
    let topo = Topology::build()?;
    tune_links(&topo)?;
    let _servers = e2e::start_servers(&topo, work.path())?;
    let _xdp = start_agent(settings, &topo, work.path(), Contender::Iptables, "native")?;
    let _tc = start_agent(settings, &topo, work.path(), Contender::Lb, "off")?;
    for family in Family::BOTH {
        let node = link_addr(0x10, Contender::Nftables.index(), 1, family);
        let file = work.path().join(format!("nft-{}.rules", family.name()));
        std::fs::write(&file, nodeport_ruleset(family, node))?;
        sys::run_ok_within(
            topo.node(Contender::Nftables)
                .command("nft")
                .arg("-f")
                .arg(&file),
            Duration::from_secs(30),
        )?;
    }
    // xdp-pass: one backend address through the xdp node (longest match
    // beats the endpoints' route via the direct node).
    for family in Family::BOTH {
        let (v, len) = if family == Family::V4 {
            ("-4", 32)
        } else {
            ("-6", 128)
        };
        let via = link_addr(0x10, Contender::Iptables.index(), 1, family).to_string();
        let dst = format!("{}/{len}", pass_address(family));
        topo.client.ip(&[v, "route", "add", &dst, "via", &via])?;
    }
    for (name, contender) in CONTENDERS {
        for family in Family::BOTH {
            let to = target(name, contender, family, true);
            e2e::wait_http_to(&topo, (to.ip(), to.port()), Duration::from_secs(60))
                .with_context(|| format!("{name} {} never answered", family.name()))?;
        }
    }
    let load_before = sys::load_average();
    let mut series = Series::new();
    for round in 0..settings.rounds {
        for family in Family::BOTH {
            for tcp in [false, true] {
                let mut order = CONTENDERS.to_vec();
                order.rotate_left(round % CONTENDERS.len());
                for (name, contender) in order {
                    sys::check_interrupted()?;
                    e2e::flush_conntrack(&topo);
                    sys::sleep(Duration::from_millis(300))?;
                    let sample = if tcp {
                        measure_tcp(&topo, settings, (name, contender), family)
                    } else {
                        measure_udp(&topo, settings.secs, (name, contender), family)
                    }
                    .with_context(|| {
                        format!(
                            "{name} {} {}",
                            family.name(),
                            if tcp { "tcp" } else { "udp" }
                        )
                    })?;
                    let mut line = format!(
                        "[xdp-e2e] round {}/{} {} {name}:",
                        round + 1,
                        settings.rounds,
                        family.name()
                    );
                    for (metric, value) in sample {
                        let _ = write!(line, " {metric}={value:.1}");
                        series
                            .entry((name, family.name(), metric))
                            .or_default()
                            .push(value);
                    }
                    eprintln!("{line}");
                }
            }
        }
    }
    let results = results(&series);
    Ok(json!({
        "rounds": settings.rounds,
        "secs": settings.secs,
        "connections": settings.connections,
        "payload": PAYLOAD,
        "cpus": std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        "load_average_before": load_before,
        "load_average_after": sys::load_average(),
        "results": results,
    }))
}

/// The report's section (nothing when the stage did not run).
pub fn section(md: &mut String, run: &Value) {
    let Some(results) = run["results"].as_array() else {
        return;
    };
    let _ = writeln!(
        md,
        "## XDP end to end (issue 13)\n\n\
         External client namespace → `NodePort` (ETP=Cluster: DNAT + SNAT) → backend, each \
         contender in its own node namespace (`lb-bench/src/xdp_e2e.rs`): `xdp` = `lb agent \
         --xdp=native` on both node links, `tc` = `--xdp=off`, `nftables` = kube-proxy's \
         nftables `NodePort` rules, `direct` = the client to the backend's address, routed. \
         GRO on the receiving veth ends and software checksums on the senders for every \
         contender. {} rounds of {} s, contenders rotated each round; median [min–max]. \
         UDP: one sender thread, {}-byte payloads with `sendmmsg`, pps = frames received \
         by the backend's link. TCP: wrk, {} connections, `Connection: close`. CPU: \
         `/proc/stat` over the measurement ({} CPUs, load {} before, {} after; other jobs \
         included), per forwarded packet or connection, machine-wide or on the UDP sender's \
         CPU (cpu0, where a veth runs the whole forwarding path); busy = user + system + \
         irq + softirq. `× tc`, `× direct`: medians of the per-round ratios.\n",
        run["rounds"],
        run["secs"],
        run["payload"],
        run["connections"],
        run["cpus"],
        run["load_average_before"].as_str().unwrap_or("?"),
        run["load_average_after"].as_str().unwrap_or("?"),
    );
    let find = |name: &str, family: &str, metric: &str| {
        results
            .iter()
            .find(|r| r["contender"] == name && r["family"] == family && r["metric"] == metric)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let _ = writeln!(
        md,
        "| family | contender | UDP pps | × tc | × direct | softirq ns/pkt | sender CPU \
         softirq ns/pkt | sender CPU busy ns/pkt | conn/s | × tc | × direct | softirq \
         µs/conn | busy µs/conn |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let spread = crate::report::spread;
    for family in ["ipv4", "ipv6"] {
        for (name, _) in CONTENDERS {
            let udp = find(name, family, "udp_pps");
            let conn = find(name, family, "conn_per_s");
            let _ = writeln!(
                md,
                "| {family} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                spread(&udp["summary"], 0),
                spread(&udp["vs_tc"], 2),
                spread(&udp["vs_direct"], 2),
                spread(&find(name, family, "udp_softirq_ns_per_pkt")["summary"], 0),
                spread(
                    &find(name, family, "udp_sender_cpu_softirq_ns_per_pkt")["summary"],
                    0
                ),
                spread(
                    &find(name, family, "udp_sender_cpu_busy_ns_per_pkt")["summary"],
                    0
                ),
                spread(&conn["summary"], 0),
                spread(&conn["vs_tc"], 2),
                spread(&conn["vs_direct"], 2),
                spread(
                    &find(name, family, "conn_softirq_us_per_conn")["summary"],
                    1
                ),
                spread(&find(name, family, "conn_busy_us_per_conn")["summary"], 1),
            );
        }
    }
    let redirects: Vec<String> = ["xdp", "xdp-pass"]
        .iter()
        .flat_map(|name| {
            ["ipv4", "ipv6"].map(|family| {
                format!(
                    "{name} {family} {}",
                    spread(&find(name, family, "xdp_redirects_per_pkt")["summary"], 2)
                )
            })
        })
        .collect();
    let _ = writeln!(
        md,
        "\nXDP redirects per UDP packet received by the backend (xdp ≥ 1: XDP forwarded \
         them; xdp-pass 0: XDP passed them to the stack): {}.\n",
        redirects.join(", ")
    );
    late_syns_line(md, results);
}

/// The report's line on late SYNs. A SYN on a tuple the backend holds in
/// `TIME_WAIT` is refused (PAWS) and retransmitted 1 s later: such a
/// connection is lost to a short measurement, which the rate alone does
/// not say.
fn late_syns_line(md: &mut String, results: &[Value]) {
    let most = |name: &str, family: &str, metric: &str| {
        results
            .iter()
            .find(|r| r["contender"] == name && r["family"] == family && r["metric"] == metric)
            .and_then(|r| r["summary"]["max"].as_f64())
            .unwrap_or(0.0)
    };
    let late: Vec<String> = CONTENDERS
        .iter()
        .flat_map(|(name, _)| {
            ["ipv4", "ipv6"].map(|family| {
                format!(
                    "{name} {family} {:.0}/{:.0}",
                    most(name, family, "conn_syn_retransmits"),
                    most(name, family, "conn_backend_paws_tw_rejects")
                )
            })
        })
        .collect();
    let _ = writeln!(
        md,
        "Most per TCP measurement: client SYN retransmissions / SYNs the backend refused \
         in `TIME_WAIT` (PAWS; each one a connection 1 s late): {}.\n",
        late.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_ruleset_has_kube_proxys_chains() {
        let node: IpAddr = "198.18.18.1".parse().unwrap();
        let rules = nodeport_ruleset(Family::V4, node);
        assert!(rules.contains("add element ip kube-proxy nodeport-ips { 198.18.18.1 }"));
        for (proto, port) in [("tcp", NODEPORT_HTTP), ("udp", NODEPORT_UDP)] {
            assert!(rules.contains(&format!(
                "service-nodeports {{ {proto} . {port} : goto external-bench/np/{proto}/"
            )));
            let dnats = rules
                .lines()
                .filter(|l| l.contains(&format!("meta l4proto {proto} dnat to 198.18.2.")))
                .count();
            assert_eq!(dnats, ENDPOINTS as usize, "{proto}: one DNAT per endpoint");
        }
        let v6 = nodeport_ruleset(Family::V6, "fd00:12::1".parse().unwrap());
        assert!(v6.contains("dnat to [fd00:2::2]:9000"), "{v6}");
    }

    #[test]
    fn targets() {
        let xdp = target("xdp", Contender::Iptables, Family::V4, false);
        assert_eq!(xdp, "198.18.19.1:30090".parse().unwrap());
        let pass = target("xdp-pass", Contender::Iptables, Family::V4, true);
        assert_eq!(pass, "198.18.2.11:8080".parse().unwrap());
        let direct = target("direct", Contender::Direct, Family::V6, false);
        assert_eq!(direct, "[fd00:2::2]:9000".parse().unwrap());
    }
}
