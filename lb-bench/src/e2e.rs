//! End to end (wrk, iperf3, nginx in the veth topology) and control plane
//! (`lb agent` cold start and endpoint changes, `nft -f` and
//! `iptables-restore` load times), scale by scale.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::rules::{
    Cluster, Contender, Family, HTTP_PORT, HTTP_TARGET, IPERF_PORT, real_endpoint, vip,
};
use crate::stats::summary;
use crate::sys::{self, Daemon, Netns, TempDir, proc_status_kib};
use crate::topo::{NODE_BACKEND_IF, NODE_CLIENT_IF, Topology};

/// What to run.
pub struct Settings {
    pub lb: PathBuf,
    pub scales: Vec<u32>,
    pub rounds: usize,
    pub conn_secs: u32,
    pub latency_secs: u32,
    pub bulk_secs: u32,
    /// Endpoint changes per scale (control plane).
    pub changes: u32,
    /// wrk connections for the new-connection test.
    pub connections: u32,
    /// Contenders to measure (all are set up); empty: all.
    pub contenders: Vec<String>,
    /// Only the control plane of `lb` (cold start, endpoint changes,
    /// memory): no traffic, no kube-proxy rules. For profiling.
    pub control_only: bool,
    /// Where the agent reads the cluster from.
    pub source: AgentSource,
}

/// The agent's source in the control-plane benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentSource {
    /// `--source file:DIR`: manifest files of 500 Services each; a change
    /// rewrites one file (temporary file + rename).
    File,
    /// `--source kube`: the stand-in API server (`crate::kube`), listed
    /// page by page and watched; a change is one `EndpointSlice` write.
    Kube,
}

impl AgentSource {
    pub fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Kube => "kube",
        }
    }
}

/// What feeds the agent its cluster, by source.
enum Feed {
    Dir(PathBuf),
    Api(crate::kube::StandIn),
}

impl Feed {
    fn start(
        settings: &Settings,
        topo: &Topology,
        work: &Path,
        cluster: &Cluster,
    ) -> anyhow::Result<Self> {
        match settings.source {
            AgentSource::File => {
                let dir = work.join(format!("manifests-{}", cluster.count));
                std::fs::create_dir_all(&dir)?;
                write_manifests(cluster, &dir)?;
                Ok(Self::Dir(dir))
            }
            AgentSource::Kube => Ok(Self::Api(crate::kube::StandIn::start(
                topo.node(Contender::Lb),
                cluster,
            )?)),
        }
    }

    /// `lb agent` arguments that select this source.
    fn agent_args(&self) -> Vec<std::ffi::OsString> {
        match self {
            Self::Dir(dir) => vec!["--source".into(), format!("file:{}", dir.display()).into()],
            Self::Api(server) => vec![
                "--source".into(),
                "kube".into(),
                "--node-name".into(),
                crate::kube::NODE_NAME.into(),
                "--kubeconfig".into(),
                server.kubeconfig().into(),
            ],
        }
    }

    /// Writes Service I's endpoints as CLUSTER has them now; returns the
    /// instant just before the write that the agent sees.
    fn change(&self, cluster: &Cluster, i: u32) -> anyhow::Result<Instant> {
        match self {
            Self::Dir(dir) => {
                let f = i / crate::rules::SERVICES_PER_FILE;
                write_atomically(dir, &Cluster::file_name(f), &cluster.manifest_file(f))
            }
            Self::Api(server) => Ok(server.rewrite_slice(cluster, i)),
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Self::Dir(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The three end-to-end tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Test {
    /// New TCP connections per second, one request each (`Connection: close`).
    ConnRate,
    /// Request latency on one kept-alive connection.
    Latency,
    /// One bulk TCP stream (iperf3).
    Bulk,
}

impl Test {
    const ALL: [Self; 3] = [Self::ConnRate, Self::Latency, Self::Bulk];
}

const REQUIRED: &[&str] = &[
    "ip",
    "nsenter",
    "wrk",
    "nginx",
    "iperf3",
    "nft",
    "iptables-restore",
    "ip6tables-restore",
    "iptables",
    "ip6tables",
    "conntrack",
];

/// Tools missing from PATH.
pub fn missing_tools() -> Vec<&'static str> {
    REQUIRED
        .iter()
        .copied()
        .filter(|tool| !sys::have_program(tool))
        .collect()
}

/// One measurement's outcome.
pub(crate) struct Sample {
    /// conn/s, or p50 in µs, or Gbit/s.
    pub(crate) values: Vec<(&'static str, f64)>,
    pub(crate) errors: u64,
}

/// Samples of one contender x family x metric.
#[derive(Default)]
struct Series {
    values: Vec<f64>,
    errors: u64,
    failures: Vec<String>,
}

/// Runs everything; returns the JSON of the end-to-end and control-plane
/// results.
///
/// # Errors
/// Setup failed or the run was interrupted. Noisy or bad numbers are never
/// errors.
pub fn run(settings: &Settings) -> anyhow::Result<Value> {
    let missing = missing_tools();
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (run scripts/setup.sh)",
            missing.join(", ")
        );
    }
    if !settings.control_only
        && let Some(&count) = settings.scales.iter().find(|&&n| n > MAX_E2E_SERVICES)
    {
        bail!(
            "{count} Services: traffic is measured up to {MAX_E2E_SERVICES} (each contender's IPv4 \
             VIP range holds 16k); use --control-only above"
        );
    }
    sys::sweep_stale();
    let work = TempDir::new("work")?;
    eprintln!("[e2e] building the topology (client, backend, 4 node namespaces)");
    let topo = Topology::build()?;
    let _servers = start_servers(&topo, work.path())?;
    wait_http(
        &topo,
        Contender::Direct,
        Family::V4,
        Duration::from_secs(10),
    )
    .context("nginx did not answer through the direct path")?;

    let mut scales = Vec::new();
    let total_steps = settings.scales.len() * settings.rounds * 2 * Test::ALL.len() * 4;
    let mut step = 0usize;
    let started = Instant::now();
    for &count in &settings.scales {
        sys::check_interrupted()?;
        let scale = run_scale(
            &topo,
            work.path(),
            settings,
            count,
            &mut step,
            total_steps,
            started,
        )?;
        scales.push(scale);
    }
    Ok(json!({
        "settings": {
            "scales": settings.scales,
            "rounds": settings.rounds,
            "conn_secs": settings.conn_secs,
            "latency_secs": settings.latency_secs,
            "bulk_secs": settings.bulk_secs,
            "changes": settings.changes,
            "connections": settings.connections,
            "endpoints_per_service": crate::rules::ENDPOINTS,
        },
        "tools": tool_versions(),
        "scales": scales,
    }))
}

fn tool_versions() -> Value {
    let version = |program: &str, arg: &str| {
        sys::output_with_timeout(Command::new(program).arg(arg), Duration::from_secs(5))
            .map(|out| {
                let text = if out.stdout.trim().is_empty() {
                    out.stderr
                } else {
                    out.stdout
                };
                text.lines().next().unwrap_or_default().trim().to_owned()
            })
            .unwrap_or_default()
    };
    json!({
        "wrk": version("wrk", "-v"),
        "nginx": version("nginx", "-v"),
        "iperf3": version("iperf3", "--version"),
        "nft": version("nft", "--version"),
        "iptables": version("iptables", "--version"),
    })
}

/// CPUs of the load generators and of the servers (when there are two or
/// more): a fixed placement keeps wake-ups comparable from run to run.
/// Most Services a run with traffic takes: the IPv4 VIP range of each
/// contender is a /18 (see `rules.rs`).
const MAX_E2E_SERVICES: u32 = (1 << 14) - 1;

pub(crate) const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

/// PROGRAM in namespace NS, pinned to CPU with `taskset` when the machine
/// has more than one.
fn pinned(ns: &Netns, cpu: usize, program: &str) -> Command {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if cpus > cpu && cpus > 1 && sys::have_program("taskset") {
        let mut cmd = ns.command("taskset");
        cmd.args(["-c", &cpu.to_string(), program]);
        cmd
    } else {
        ns.command(program)
    }
}

pub(crate) struct Servers {
    _nginx: Daemon,
    _iperf: Daemon,
}

pub(crate) fn start_servers(topo: &Topology, work: &Path) -> anyhow::Result<Servers> {
    let dir = work.join("nginx");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nworker_rlimit_nofile 65535;\n\
         events {{ worker_connections 16384; multi_accept on; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         keepalive_requests 10000000;\n  keepalive_timeout 60s;\n\
         server {{\n    listen [::]:{HTTP_TARGET} ipv6only=off backlog=8192;\n\
         location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let nginx = Daemon::spawn(
        "nginx",
        pinned(&topo.backend, SERVER_CPU, "nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&dir),
        &dir.join("stdout.log"),
    )?;
    let iperf = Daemon::spawn(
        "iperf3",
        pinned(&topo.backend, SERVER_CPU, "iperf3").args(["-s", "-p", &IPERF_PORT.to_string()]),
        &work.join("iperf3.log"),
    )?;
    Ok(Servers {
        _nginx: nginx,
        _iperf: iperf,
    })
}

/// The address and port a client connects to for CONTENDER.
pub(crate) fn target(
    cluster_last: u32,
    contender: Contender,
    family: Family,
    port: u16,
) -> (IpAddr, u16) {
    match contender {
        Contender::Direct => (
            real_endpoint(family, 0),
            if port == HTTP_PORT { HTTP_TARGET } else { port },
        ),
        _ => (vip(contender, family, cluster_last), port),
    }
}

fn url(addr: IpAddr, port: u16) -> String {
    format!("http://{}/", SocketAddr::new(addr, port))
}

/// One HTTP/1.0 GET from the client namespace; Ok when it answers 200.
fn http_get(topo: &Topology, addr: IpAddr, port: u16) -> anyhow::Result<()> {
    topo.client.run_in(|| {
        let timeout = Duration::from_secs(2);
        let mut stream = TcpStream::connect_timeout(&SocketAddr::new(addr, port), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        if !answer.starts_with("HTTP/1.1 200") {
            bail!("unexpected answer {:?}", answer.lines().next());
        }
        Ok(())
    })
}

/// Retries a GET until it works or TIMEOUT passes.
fn wait_http(
    topo: &Topology,
    contender: Contender,
    family: Family,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_http_to(topo, target(0, contender, family, HTTP_PORT), timeout)
}

pub(crate) fn wait_http_to(
    topo: &Topology,
    (addr, port): (IpAddr, u16),
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get(topo, addr, port) {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context(format!("GET {}", url(addr, port))));
            }
            Err(_) => sys::sleep(Duration::from_millis(100))?,
        }
    }
}

/// The `lb` agent of one scale, with its pins.
struct Agent {
    daemon: Daemon,
    lines: Receiver<(Instant, String)>,
    pin_path: PathBuf,
    lb: PathBuf,
    node: String,
    /// The last lines it printed (for error messages).
    tail: Vec<String>,
}

impl Agent {
    /// Waits for the next `synced` line; returns when it was read and the
    /// sync's own duration (`millis=`).
    fn next_sync(&mut self, timeout: Duration) -> anyhow::Result<(Instant, f64)> {
        self.next_sync_noting(timeout, &mut |_, _| {})
    }

    /// [`Self::next_sync`], showing every line read before to NOTE.
    fn next_sync_noting(
        &mut self,
        timeout: Duration,
        note: &mut dyn FnMut(Instant, &str),
    ) -> anyhow::Result<(Instant, f64)> {
        let deadline = Instant::now() + timeout;
        loop {
            sys::check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no `synced` line from the agent within {timeout:?}; last lines:\n{}",
                    self.tail.join("\n")
                );
            }
            match self.lines.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok((at, line)) => {
                    if sys::debug_output() {
                        eprintln!("[agent] {line}");
                    }
                    note(at, &line);
                    self.tail.push(line.clone());
                    if self.tail.len() > 20 {
                        self.tail.remove(0);
                    }
                    if line.contains("synced")
                        && let Some(millis) = field(&line, "millis=")
                    {
                        return Ok((at, millis));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the agent exited; last lines:\n{}", self.tail.join("\n"));
                }
            }
        }
    }

    fn drain(&mut self) {
        while let Ok((_, line)) = self.lines.try_recv() {
            self.tail.push(line);
            if self.tail.len() > 20 {
                self.tail.remove(0);
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.daemon.stop(Duration::from_secs(5));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", sys::netns_path(&self.node).display()))
            .arg("--")
            .arg(&self.lb)
            .args(["cleanup", "--pin-path"])
            .arg(&self.pin_path);
        match sys::cleanup_output(&mut cmd, Duration::from_secs(30)) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("[e2e] warning: lb cleanup: {}", out.stderr.trim()),
            Err(error) => eprintln!("[e2e] warning: lb cleanup: {error:#}"),
        }
        let _ = std::fs::remove_dir_all(&self.pin_path);
    }
}

/// A number after KEY in a log line (`millis=12.5`).
fn field(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub fn write_manifests(cluster: &Cluster, dir: &Path) -> anyhow::Result<()> {
    for f in 0..cluster.files() {
        write_atomically(dir, &Cluster::file_name(f), &cluster.manifest_file(f))?;
    }
    Ok(())
}

/// Writes a hidden temporary file and renames it over NAME (what the
/// agent's file source sees as one change). Returns the instant just
/// before the rename.
fn write_atomically(dir: &Path, name: &str, text: &str) -> anyhow::Result<Instant> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    let at = Instant::now();
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(at)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Starts the agent on a fresh pin path and measures the cold start.
fn start_agent(
    topo: &Topology,
    settings: &Settings,
    feed: &Feed,
    count: u32,
) -> anyhow::Result<(Agent, Value)> {
    let node = topo.node(Contender::Lb);
    let pin_path = PathBuf::from(format!(
        "/sys/fs/bpf/{}{}-s{count}",
        sys::TAG,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&pin_path);
    let mut cmd = node.command(&settings.lb);
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .arg("agent")
        // No socket programs: they would attach to the machine's cgroup
        // root (the clients here are pods, served by TC).
        .arg("--socket-lb=off")
        .args(feed.agent_args())
        .arg("--attach")
        .arg(format!("{NODE_CLIENT_IF},{NODE_BACKEND_IF}"))
        .arg("--pin-path")
        .arg(&pin_path)
        .arg("--metrics-addr")
        .arg("127.0.0.1:9917");
    let spawned = Instant::now();
    let (daemon, lines) = Daemon::spawn_lines("lb agent", &mut cmd)?;
    let mut agent = Agent {
        daemon,
        lines,
        pin_path,
        lb: settings.lb.clone(),
        node: node.name().to_owned(),
        tail: Vec::new(),
    };
    // When the program was loaded and attached (the agent logs the state it
    // recovered from the pins right after attaching).
    let mut attached_at = None;
    let (synced_at, sync_ms) =
        agent.next_sync_noting(Duration::from_mins(15), &mut |at, line| {
            if attached_at.is_none() && line.contains("recovered state") {
                attached_at = Some(at);
            }
        })?;
    let counters = sys::proc_counters(agent.daemon.pid());
    let cold = json!({
        "start_to_maps_written_ms": ms(synced_at - spawned),
        "cpu_ms_at_maps_written": counters.as_ref().map(|c| c.cpu_ms),
        "minor_faults_at_maps_written": counters.as_ref().map(|c| c.minor_faults),
        "load_average": sys::load_average(),
        "start_to_attached_ms": attached_at.map(|at| ms(at - spawned)),
        "sync_ms": sync_ms,
        "vmrss_kib_after_start": proc_status_kib(agent.daemon.pid(), "VmRSS"),
    });
    Ok((agent, cold))
}

/// `nft -f` / `iptables-restore` of the kube-proxy rules for both families.
fn load_rules(topo: &Topology, work: &Path, cluster: &Cluster) -> anyhow::Result<Value> {
    let mut out = json!({});
    for (contender, family) in [
        (Contender::Nftables, Family::V4),
        (Contender::Nftables, Family::V6),
        (Contender::Iptables, Family::V4),
        (Contender::Iptables, Family::V6),
    ] {
        sys::check_interrupted()?;
        let node = topo.node(contender);
        let (text, program, args): (String, &str, Vec<String>) = match contender {
            Contender::Nftables => (cluster.nft_ruleset(family), "nft", vec!["-f".into()]),
            _ => (
                cluster.iptables_restore(family),
                if family == Family::V4 {
                    "iptables-restore"
                } else {
                    "ip6tables-restore"
                },
                vec![],
            ),
        };
        let file = work.join(format!("{}-{}.rules", contender.name(), family.name()));
        std::fs::write(&file, &text)?;
        eprintln!(
            "[e2e] {} services: loading {} {} rules ({} lines) with {program}",
            cluster.count,
            contender.name(),
            family.name(),
            text.lines().count()
        );
        let started = Instant::now();
        sys::run_ok_within(
            node.command(program).args(&args).arg(&file),
            Duration::from_mins(15),
        )?;
        let took = ms(started.elapsed());
        eprintln!("[e2e]   loaded in {took:.0} ms");
        out[contender.name()][family.name()] =
            json!({"load_ms": took, "lines": text.lines().count()});
    }
    Ok(out)
}

/// Removes the kube-proxy rules (timed).
fn unload_rules(topo: &Topology, rules: &mut Value) -> anyhow::Result<()> {
    for family in Family::BOTH {
        let fam = if family == Family::V4 { "ip" } else { "ip6" };
        let started = Instant::now();
        sys::run_ok_within(
            topo.node(Contender::Nftables).command("nft").args([
                "delete",
                "table",
                fam,
                "kube-proxy",
            ]),
            Duration::from_mins(15),
        )?;
        rules["nftables"][family.name()]["delete_ms"] = json!(ms(started.elapsed()));
        let program = if family == Family::V4 {
            "iptables"
        } else {
            "ip6tables"
        };
        let started = Instant::now();
        for flag in ["-F", "-X"] {
            sys::run_ok_within(
                topo.node(Contender::Iptables)
                    .command(program)
                    .args(["-t", "nat", flag]),
                Duration::from_mins(15),
            )?;
        }
        rules["iptables"][family.name()]["delete_ms"] = json!(ms(started.elapsed()));
    }
    Ok(())
}

pub(crate) fn flush_conntrack(topo: &Topology) {
    for contender in [Contender::Nftables, Contender::Iptables] {
        let _ = sys::output_with_timeout(
            topo.node(contender).command("conntrack").arg("-F"),
            Duration::from_secs(30),
        );
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one scale of the benchmark, step by step"
)]
fn run_scale(
    topo: &Topology,
    work: &Path,
    settings: &Settings,
    count: u32,
    step: &mut usize,
    total_steps: usize,
    started: Instant,
) -> anyhow::Result<Value> {
    let mut cluster = Cluster::new(count);
    let last = cluster.last();
    let feed = Feed::start(settings, topo, work, &cluster)?;
    eprintln!(
        "[e2e] {count} services: starting lb agent (cold start, {} source)",
        settings.source.name()
    );
    let (mut agent, cold) = start_agent(topo, settings, &feed, count)?;
    eprintln!(
        "[e2e]   lb: maps written {:.0} ms after start (sync itself {:.1} ms; agent CPU time until then {:.0} ms, minor page faults {}; load average {})",
        cold["start_to_maps_written_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
        cold["sync_ms"].as_f64().unwrap_or(f64::NAN),
        cold["cpu_ms_at_maps_written"].as_f64().unwrap_or(f64::NAN),
        cold["minor_faults_at_maps_written"],
        sys::load_average().unwrap_or_default(),
    );
    let mut rules = if settings.control_only {
        Value::Null
    } else {
        load_rules(topo, work, &cluster)?
    };

    // Every contender must answer before it is measured.
    let mut broken = Vec::new();
    let checked: &[Contender] = if settings.control_only {
        &[]
    } else {
        &Contender::ALL
    };
    for &contender in checked {
        for family in Family::BOTH {
            if let Err(error) = wait_http_to(
                topo,
                target(last, contender, family, HTTP_PORT),
                Duration::from_secs(5),
            ) {
                eprintln!(
                    "[e2e] WARNING {count} services: {} {} does not answer, not measured: {error:#}",
                    contender.name(),
                    family.name()
                );
                broken.push(json!({"contender": contender.name(), "family": family.name(), "error": format!("{error:#}")}));
            }
        }
    }
    let is_broken = |c: Contender, f: Family| {
        broken
            .iter()
            .any(|b| b["contender"] == c.name() && b["family"] == f.name())
    };

    let mut series: std::collections::BTreeMap<(Contender, Family, &'static str), Series> =
        std::collections::BTreeMap::new();
    let rounds = if settings.control_only {
        0
    } else {
        settings.rounds
    };
    for round in 0..rounds {
        for family in Family::BOTH {
            for test in Test::ALL {
                let mut order = Contender::ALL.to_vec();
                let shift = round % order.len();
                order.rotate_left(shift);
                for contender in order {
                    sys::check_interrupted()?;
                    *step += 1;
                    let wanted = settings.contenders.is_empty()
                        || settings.contenders.iter().any(|c| c == contender.name());
                    if !wanted || is_broken(contender, family) {
                        continue;
                    }
                    flush_conntrack(topo);
                    sys::sleep(Duration::from_millis(200))?;
                    let outcome = measure(topo, settings, last, contender, family, test);
                    let mut line = format!(
                        "[e2e {step}/{total_steps} {:.0}s] {count} svc, round {}/{}, {} {:?} {}:",
                        started.elapsed().as_secs_f64(),
                        round + 1,
                        settings.rounds,
                        family.name(),
                        test,
                        contender.name()
                    );
                    match outcome {
                        Ok(sample) => {
                            for (metric, value) in &sample.values {
                                let _ = write!(line, " {metric}={value:.1}");
                                let entry = series.entry((contender, family, metric)).or_default();
                                entry.values.push(*value);
                                entry.errors += sample.errors;
                            }
                            if sample.errors > 0 {
                                let _ = write!(line, " (socket errors: {})", sample.errors);
                            }
                        }
                        Err(error) => {
                            let _ = write!(line, " FAILED: {error:#}");
                            sys::check_interrupted()?;
                            let metric = match test {
                                Test::ConnRate => "conn_per_s",
                                Test::Latency => "latency_p50_us",
                                Test::Bulk => "bulk_gbit_s",
                            };
                            series
                                .entry((contender, family, metric))
                                .or_default()
                                .failures
                                .push(format!("{error:#}"));
                        }
                    }
                    eprintln!("{line}");
                }
            }
        }
    }
    flush_conntrack(topo);

    // Control plane: endpoint changes, then peak memory.
    let changes = if count > 1 { settings.changes } else { 0 };
    let mut poll_inclusive = Vec::new();
    let mut apply = Vec::new();
    let mut change_failures = Vec::new();
    agent.drain();
    let mut seed: u32 = 0x2545_f491;
    for k in 0..changes {
        sys::check_interrupted()?;
        let i = (k * 7 + 1) % (count - 1);
        let octet = u8::try_from(k % 250 + 1).unwrap_or(1);
        cluster
            .overrides
            .insert(i, std::net::Ipv4Addr::new(198, 18, 3, octet));
        // A pseudo-random pause so that changes land at any phase of the
        // agent's 200 ms poll.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        sys::sleep(Duration::from_millis(u64::from(50 + seed % 250)))?;
        let at = feed.change(&cluster, i)?;
        match agent.next_sync(Duration::from_secs(30)) {
            Ok((synced, millis)) => {
                poll_inclusive.push(ms(synced - at));
                apply.push(millis);
            }
            Err(error) => {
                sys::check_interrupted()?;
                change_failures.push(format!("{error:#}"));
                break;
            }
        }
    }
    if changes > 0 {
        eprintln!(
            "[e2e] {count} services: {} endpoint changes: write->maps p50 {:.1} ms p99 {:.1} ms; sync itself p50 {:.2} ms p99 {:.2} ms",
            poll_inclusive.len(),
            crate::stats::percentile(&poll_inclusive, 50.0),
            crate::stats::percentile(&poll_inclusive, 99.0),
            crate::stats::percentile(&apply, 50.0),
            crate::stats::percentile(&apply, 99.0),
        );
        // Which changes the tail is made of (a p99 over 100 samples is the
        // second-slowest one): by their place after the start.
        let mut slowest: Vec<(usize, f64)> = poll_inclusive.iter().copied().enumerate().collect();
        slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
        let named: Vec<String> = slowest
            .iter()
            .take(3)
            .map(|(k, value)| format!("change {k}: {value:.1} ms"))
            .collect();
        eprintln!(
            "[e2e] {count} services: slowest changes: {}",
            named.join(", ")
        );
    }
    let pid = agent.daemon.pid();
    let vmhwm = proc_status_kib(pid, "VmHWM");
    let vmrss = proc_status_kib(pid, "VmRSS");
    let maps_kib = sys::bpf_maps_memlock_kib(pid);
    let alive = agent.daemon.alive();
    drop(agent);
    if !settings.control_only {
        unload_rules(topo, &mut rules)?;
    }
    drop(feed);

    let e2e: Vec<Value> = series
        .iter()
        .map(|((contender, family, metric), s)| {
            json!({
                "contender": contender.name(),
                "family": family.name(),
                "metric": metric,
                "summary": summary(&s.values),
                "socket_errors": s.errors,
                "failures": s.failures,
            })
        })
        .collect();
    Ok(json!({
        "services": count,
        "source": settings.source.name(),
        "e2e": e2e,
        "broken": broken,
        "control": {
            "lb": {
                "cold_start": cold,
                "endpoint_change": {
                    "count": poll_inclusive.len(),
                    "rename_to_maps_ms": summary(&poll_inclusive),
                    "sync_ms": summary(&apply),
                    "failures": change_failures,
                },
                "vmhwm_kib": vmhwm,
                "load_average_at_end": sys::load_average(),
                "vmrss_kib": vmrss,
                "bpf_maps_kib": maps_kib,
                "alive_at_end": alive,
            },
            "kube_proxy": rules,
        },
    }))
}

pub(crate) fn measure(
    topo: &Topology,
    settings: &Settings,
    last: u32,
    contender: Contender,
    family: Family,
    test: Test,
) -> anyhow::Result<Sample> {
    match test {
        Test::ConnRate => {
            let (addr, port) = target(last, contender, family, HTTP_PORT);
            let out = wrk(
                &topo.client,
                CLIENT_CPU,
                &[
                    "-t1",
                    &format!("-c{}", settings.connections),
                    &format!("-d{}s", settings.conn_secs),
                    "--timeout",
                    "2s",
                    "-H",
                    "Connection: close",
                    &url(addr, port),
                ],
                settings.conn_secs,
            )?;
            let rate = wrk_value(&out, "Requests/sec:").context("no Requests/sec in wrk output")?;
            Ok(Sample {
                values: vec![("conn_per_s", rate)],
                errors: wrk_errors(&out),
            })
        }
        Test::Latency => {
            let (addr, port) = target(last, contender, family, HTTP_PORT);
            // Same CPU as the server: one ping-pong connection needs one
            // CPU, and a cross-CPU wake-up per request (an IPI, costly in
            // a VM) would swamp the path being measured.
            let out = wrk(
                &topo.client,
                SERVER_CPU,
                &[
                    "-t1",
                    "-c1",
                    &format!("-d{}s", settings.latency_secs),
                    "--timeout",
                    "2s",
                    "--latency",
                    &url(addr, port),
                ],
                settings.latency_secs,
            )?;
            let p50 = wrk_percentile(&out, "50%").context("no 50% in wrk output")?;
            let p99 = wrk_percentile(&out, "99%").context("no 99% in wrk output")?;
            let rate = wrk_value(&out, "Requests/sec:").unwrap_or(f64::NAN);
            Ok(Sample {
                values: vec![
                    ("latency_p50_us", p50),
                    ("latency_p99_us", p99),
                    ("keepalive_req_per_s", rate),
                ],
                errors: wrk_errors(&out),
            })
        }
        Test::Bulk => {
            let (addr, port) = target(last, contender, family, IPERF_PORT);
            let out = sys::output_with_timeout(
                pinned(&topo.client, CLIENT_CPU, "iperf3").args([
                    "-c",
                    &addr.to_string(),
                    "-p",
                    &port.to_string(),
                    "-t",
                    &settings.bulk_secs.to_string(),
                    "-J",
                    "--connect-timeout",
                    "2000",
                ]),
                Duration::from_secs(u64::from(settings.bulk_secs) + 20),
            )?;
            let parsed: Value = serde_json::from_str(&out.stdout)
                .with_context(|| format!("iperf3 output is not JSON: {}", out.stderr.trim()))?;
            if let Some(error) = parsed["error"].as_str() {
                bail!("iperf3: {error}");
            }
            let bps = parsed["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("no end.sum_received.bits_per_second in iperf3 output")?;
            Ok(Sample {
                values: vec![("bulk_gbit_s", bps / 1e9)],
                errors: 0,
            })
        }
    }
}

pub(crate) fn wrk(client: &Netns, cpu: usize, args: &[&str], secs: u32) -> anyhow::Result<String> {
    let out = sys::output_with_timeout(
        pinned(client, cpu, "wrk").args(args),
        Duration::from_secs(u64::from(secs) + 20),
    )?;
    if !out.status.success() {
        bail!("wrk failed ({}): {}", out.status, out.stderr.trim());
    }
    Ok(out.stdout)
}

/// The number after LABEL (`Requests/sec:   1234.5`).
pub(crate) fn wrk_value(out: &str, label: &str) -> Option<f64> {
    out.lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// A latency percentile line (`     99%   1.20ms`) in µs.
fn wrk_percentile(out: &str, label: &str) -> Option<f64> {
    let value = out
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))?
        .trim();
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1e3)
    } else {
        (value.strip_suffix('s')?, 1e6)
    };
    number.trim().parse::<f64>().ok().map(|n| n * scale)
}

/// Socket errors and non-2xx answers wrk reports.
pub(crate) fn wrk_errors(out: &str) -> u64 {
    let mut total = 0;
    for line in out.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            total += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            total += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 1s test @ http://198.18.64.11:80/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    40.11us   10.00us   1.00ms   90.00%
  Latency Distribution
     50%   38.00us
     75%   41.00us
     90%   45.00us
     99%    1.20ms
  24000 requests in 1.00s, 3.50MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:  23999.50
Transfer/sec:      3.50MB
";

    #[test]
    fn wrk_output_parses() {
        assert_eq!(wrk_value(WRK, "Requests/sec:"), Some(23_999.5));
        assert_eq!(wrk_percentile(WRK, "50%"), Some(38.0));
        assert_eq!(wrk_percentile(WRK, "99%"), Some(1_200.0));
        assert_eq!(wrk_errors(WRK), 4);
    }

    #[test]
    fn log_fields_parse() {
        let line = "2025-01-01T00:00:00Z  INFO lb_userspace::agent: synced writes=3 failures=0 millis=1.25";
        assert_eq!(field(line, "millis="), Some(1.25));
        assert_eq!(field(line, "nope="), None);
    }
}
