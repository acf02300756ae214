//! Socket-level load balancing: new TCP connections per second from a
//! process in the node's own namespace through a `ClusterIP` (translated at
//! `connect()` by the cgroup programs) against the same process straight
//! to the backend, both families, at 10 and 10k Services. The goal is
//! ~1.0x: the translation is one map lookup per `connect()`, nothing per
//! packet.
//!
//! ```text
//!   node (lb agent; the client in a child cgroup)  -- veth --  backend (accept + close)
//!   198.18.40.1, fd00:40::1                                    198.18.40.2, fd00:40::2
//! ```
//!
//! The socket programs are attached to a child cgroup this run creates
//! under `/sys/fs/cgroup/unified`, holding only the client process (this
//! binary's `connect-loop`); namespaces, pins and the cgroup are removed at
//! the end, also on failure.

use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::sys::{Netns, TempDir, run_ok};

const NODE4: &str = "198.18.40.1";
const NODE6: &str = "fd00:40::1";
const BACKEND4: &str = "198.18.40.2";
const BACKEND6: &str = "fd00:40::2";
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;

/// What to measure.
pub struct Settings {
    pub lb: PathBuf,
    pub scales: Vec<u32>,
    pub secs: u32,
    pub rounds: usize,
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

/// The node and backend namespaces, joined by a veth pair.
fn topology() -> anyhow::Result<(Netns, Netns)> {
    let node = Netns::create("sl-node")?;
    let backend = Netns::create("sl-be")?;
    node.ip(&[
        "link",
        "add",
        "to-be",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        backend.name(),
    ])?;
    for (ns, dev, v4, v6) in [
        (&node, "to-be", NODE4, NODE6),
        (&backend, "eth0", BACKEND4, BACKEND6),
    ] {
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
        ns.sysctls(&[
            ("net/ipv4/ip_local_port_range", "1024 65535"),
            ("net/ipv4/tcp_tw_reuse", "1"),
            ("net/ipv4/tcp_max_tw_buckets", "4096"),
            ("net/core/somaxconn", "8192"),
        ])?;
    }
    Ok((node, backend))
}

/// Runs the measurement; the result as JSON.
///
/// # Errors
/// A step of the setup failed, or the agent did not become ready.
pub fn run(settings: &Settings) -> anyhow::Result<Value> {
    let (node, backend) = topology()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (stop, ns) = (Arc::clone(&stop), backend.name().to_owned());
        std::thread::spawn(move || accept_loop(&ns, &stop))
    };
    let cgroup = Cgroup::create()?;
    let work = TempDir::new("lb-bench-socklb")?;
    let mut results = Vec::new();
    for &scale in &settings.scales {
        let dir = work.path().join(format!("m{scale}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("services.json"), manifests(scale))?;
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/lb-bench-sl-{}-{scale}",
            std::process::id()
        ));
        let mut agent = node
            .command(&settings.lb)
            .args([
                "agent",
                "--attach",
                "to-be",
                "--metrics-addr",
                "127.0.0.1:9918",
            ])
            .args(["--socket-lb", "hostns"])
            .arg(format!("--source=file:{}", dir.display()))
            .arg("--pin-path")
            .arg(&pins)
            .arg("--cgroup-root")
            .arg(&cgroup.0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start lb agent")?;
        let measured = measure_scale(&node, &cgroup, settings, scale);
        let _ = agent.kill();
        let _ = agent.wait();
        let _ = node
            .command(&settings.lb)
            .args(["cleanup", "--pin-path"])
            .arg(&pins)
            .output();
        results.push(measured?);
    }
    stop.store(true, Ordering::SeqCst);
    drop(server);
    Ok(
        json!({"socklb_connect": results, "seconds_per_round": settings.secs, "rounds": settings.rounds}),
    )
}

/// Both families at one scale, once the agent translates.
fn measure_scale(
    node: &Netns,
    cgroup: &Cgroup,
    settings: &Settings,
    scale: u32,
) -> anyhow::Result<Value> {
    wait_translated(node, cgroup, scale)?;
    let mut out = json!({"services": scale});
    for v6 in [false, true] {
        let family = if v6 { "ipv6" } else { "ipv4" };
        let backend: IpAddr = if v6 { BACKEND6 } else { BACKEND4 }.parse()?;
        let direct = SocketAddr::new(backend, BACKEND_PORT);
        let service = SocketAddr::new(vip(scale, v6), SERVICE_PORT);
        let (mut d, mut s) = (Vec::new(), Vec::new());
        // Alternating which goes first, so that neither always gets the
        // warmer (or the busier) half of a round.
        for round in 0..settings.rounds {
            if round % 2 == 0 {
                d.push(connect_rate(node, cgroup, direct, settings.secs)?);
                s.push(connect_rate(node, cgroup, service, settings.secs)?);
            } else {
                s.push(connect_rate(node, cgroup, service, settings.secs)?);
                d.push(connect_rate(node, cgroup, direct, settings.secs)?);
            }
        }
        let (dm, sm) = (median(&mut d), median(&mut s));
        eprintln!(
            "[socklb] {scale} services {family}: direct {dm:.0}/s, ClusterIP {sm:.0}/s ({:.3}x)",
            sm / dm
        );
        out[family] = json!({"direct_per_s": dm, "clusterip_per_s": sm, "ratio": sm / dm,
                             "direct_rounds": d, "clusterip_rounds": s});
    }
    Ok(out)
}

/// Waits until a connection to the measured Service is translated.
fn wait_translated(node: &Netns, cgroup: &Cgroup, scale: u32) -> anyhow::Result<()> {
    let target: SocketAddr = (vip(scale, false), SERVICE_PORT).into();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if connect_rate(node, cgroup, target, 0).is_ok_and(|n| n > 0.0) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the Service {target} was not reachable within 120 s")
}

/// Connections per second the client made to TARGET in SECS (0: one).
fn connect_rate(
    node: &Netns,
    cgroup: &Cgroup,
    target: SocketAddr,
    secs: u32,
) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec nsenter --net="/run/netns/$2" -- "$3" connect-loop --target "$4" --secs "$5""#)
            .arg("sh")
            .arg(&cgroup.0)
            .arg(node.name())
            .arg(exe)
            .arg(target.to_string())
            .arg(secs.to_string()),
    )?;
    out.trim()
        .parse()
        .with_context(|| format!("connect-loop said {out:?}"))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The backend: accepts and drops connections until STOP.
fn accept_loop(ns: &str, stop: &AtomicBool) {
    let netns = File::open(format!("/run/netns/{ns}"));
    let Ok(netns) = netns else { return };
    // SAFETY: setns on this thread with a namespace fd.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return;
    }
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
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: valid fd and option struct.
                unsafe {
                    libc::setsockopt(
                        stream.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&raw const linger).cast(),
                        libc::socklen_t::try_from(size_of::<libc::linger>()).unwrap_or(8),
                    );
                }
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
    let start = Instant::now();
    let limit = Duration::from_secs(u64::from(secs));
    let mut count: u64 = 0;
    let mut slowest = Duration::ZERO;
    loop {
        // The backend resets each connection once it accepted it: a reset
        // seen by `connect()` is a connection made.
        let began = Instant::now();
        match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
            Ok(stream) => drop(stream),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(error) => return Err(error).with_context(|| format!("connect {target}")),
        }
        count += 1;
        slowest = slowest.max(began.elapsed());
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
    if std::env::var_os("LB_BENCH_DEBUG").is_some() {
        eprintln!("{count} connections, slowest {slowest:?}");
    }
    Ok(())
}
