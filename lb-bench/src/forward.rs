//! Stack against redirect (issue 12): how translated packets leave the
//! node, `--forward=stack` (the default: handed to the kernel stack, so
//! that netfilter's FORWARD chain, where `NetworkPolicy` engines live, sees
//! them) against `--forward=redirect` (straight to the egress device,
//! past netfilter), against the client straight to the backend. New TCP
//! connections per second (wrk, `Connection: close`) and the request rate
//! of one kept-alive connection (wrk, one connection: a request/response
//! rate), both families, through a `ClusterIP`, in the end-to-end topology
//! (`topo.rs`).
//!
//! Two agents run side by side, each in its own node namespace, so that
//! the contenders alternate round by round without a restart between
//! them: `--forward=stack` in `lb`'s node namespace (its VIP range),
//! `--forward=redirect` in the nftables contender's node namespace (whose
//! VIP range it serves here; no kube-proxy rules are loaded in this
//! stage). Direct goes through the direct contender's node namespace.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::e2e::{self, Settings, Test};
use crate::rules::{Cluster, Contender, Family, HTTP_PORT};
use crate::stats::summary;
use crate::sys::{self, Daemon, LbAgent, Netns, TempDir};
use crate::topo::{NODE_BACKEND_IF, NODE_CLIENT_IF, Topology};

/// The contenders of this stage: who serves the VIP, and under what name.
const CONTENDERS: [(Contender, &str); 3] = [
    (Contender::Direct, "direct"),
    (Contender::Lb, "stack"),
    (Contender::Nftables, "redirect"),
];

/// Starts an agent in NODE with `--forward=MODE` on the manifests of CLUSTER.
fn start_agent(
    settings: &Settings,
    node: &Netns,
    work: &Path,
    cluster: &Cluster,
    mode: &str,
) -> anyhow::Result<LbAgent> {
    let dir = work.join(format!("manifests-{mode}"));
    std::fs::create_dir_all(&dir)?;
    e2e::write_manifests(cluster, &dir)?;
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/{}{}-fwd-{mode}",
        sys::TAG,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&pins);
    let mut cmd = node.command(&settings.lb);
    cmd.arg("agent")
        // No socket programs: the clients are pods, served by TC.
        .arg("--socket-lb=off")
        .arg(format!("--forward={mode}"))
        .arg(format!("--source=file:{}", dir.display()))
        .arg("--attach")
        .arg(format!("{NODE_CLIENT_IF},{NODE_BACKEND_IF}"))
        .arg("--pin-path")
        .arg(&pins)
        .arg("--metrics-addr")
        .arg("127.0.0.1:9917");
    let daemon = Daemon::spawn(
        &format!("lb agent --forward={mode}"),
        &mut cmd,
        &work.join(format!("agent-{mode}.log")),
    )?;
    Ok(LbAgent::new(
        "forward",
        daemon,
        node.name(),
        &settings.lb,
        pins,
    ))
}

/// The settings of a run: SERVICES Services, 5 rounds of 3 s
/// measurements (QUICK: 1 round of 1 s).
pub fn settings(lb: PathBuf, quick: bool, services: u32) -> Settings {
    Settings {
        lb,
        scales: vec![services],
        rounds: if quick { 1 } else { 5 },
        conn_secs: if quick { 1 } else { 3 },
        latency_secs: if quick { 1 } else { 3 },
        bulk_secs: 0,
        changes: 0,
        connections: 32,
        contenders: Vec::new(),
        control_only: false,
        source: e2e::AgentSource::File,
    }
}

/// Runs the stage at SETTINGS' first scale; the result as JSON.
///
/// # Errors
/// The topology, a server or an agent could not be set up, or a
/// contender never answered.
pub fn run(settings: &Settings) -> anyhow::Result<Value> {
    let missing: Vec<&str> = ["ip", "nsenter", "wrk", "nginx", "iperf3"]
        .into_iter()
        .filter(|p| !sys::have_program(p))
        .collect();
    anyhow::ensure!(missing.is_empty(), "missing tools: {}", missing.join(", "));
    sys::sweep_stale();
    let work = TempDir::new("forward")?;
    eprintln!("[forward] building the topology");
    let topo = Topology::build()?;
    let _servers = e2e::start_servers(&topo, work.path())?;
    let count = settings.scales.first().copied().unwrap_or(10);
    let stack_cluster = Cluster::new(count);
    let mut redirect_cluster = Cluster::new(count);
    redirect_cluster.vips = Contender::Nftables;
    let last = stack_cluster.last();
    let _stack = start_agent(
        settings,
        topo.node(Contender::Lb),
        work.path(),
        &stack_cluster,
        "stack",
    )?;
    let _redirect = start_agent(
        settings,
        topo.node(Contender::Nftables),
        work.path(),
        &redirect_cluster,
        "redirect",
    )?;
    for (contender, name) in CONTENDERS {
        for family in Family::BOTH {
            e2e::wait_http_to(
                &topo,
                e2e::target(last, contender, family, HTTP_PORT),
                Duration::from_secs(60),
            )
            .with_context(|| format!("{name} {} never answered", family.name()))?;
        }
    }
    let mut series: std::collections::BTreeMap<(&str, Family, &str), Vec<f64>> =
        std::collections::BTreeMap::new();
    for round in 0..settings.rounds {
        for family in Family::BOTH {
            for test in [Test::ConnRate, Test::Latency] {
                let mut order = CONTENDERS.to_vec();
                order.rotate_left(round % CONTENDERS.len());
                for (contender, name) in order {
                    sys::check_interrupted()?;
                    sys::sleep(Duration::from_millis(200))?;
                    let sample = e2e::measure(&topo, settings, last, contender, family, test)
                        .with_context(|| format!("{name} {} {test:?}", family.name()))?;
                    let mut line = format!(
                        "[forward] round {}/{} {} {test:?} {name}:",
                        round + 1,
                        settings.rounds,
                        family.name()
                    );
                    for (metric, value) in &sample.values {
                        let _ = write!(line, " {metric}={value:.1}");
                        series
                            .entry((name, family, metric))
                            .or_default()
                            .push(*value);
                    }
                    eprintln!("{line}");
                }
            }
        }
    }
    let mut results = Vec::new();
    for ((name, family, metric), values) in &series {
        let direct = series
            .get(&("direct", *family, *metric))
            .cloned()
            .unwrap_or_default();
        // Per-round ratios: each from two measurements of the same round.
        let ratios: Vec<f64> = values.iter().zip(&direct).map(|(v, d)| v / d).collect();
        results.push(json!({
            "contender": name, "family": family.name(), "metric": metric,
            "summary": summary(values), "vs_direct": summary(&ratios),
        }));
    }
    Ok(json!({
        "services": count,
        "rounds": settings.rounds,
        "conn_secs": settings.conn_secs,
        "latency_secs": settings.latency_secs,
        "connections": settings.connections,
        "load_average": sys::load_average(),
        "results": results,
    }))
}

/// The report's section (nothing when the stage did not run).
pub fn section(md: &mut String, forward: &Value) {
    let Some(results) = forward["results"].as_array() else {
        return;
    };
    let _ = writeln!(
        md,
        "## Forwarding: `--forward=stack` vs `--forward=redirect` (issue 12)\n\n\
         The end-to-end topology with two agents side by side (`lb-bench/src/forward.rs`): \
         `stack` hands translated packets to the kernel stack (netfilter's FORWARD chain sees \
         them, the default), `redirect` sends them straight to the egress device. {} Services, \
         {} rounds, contenders rotated each round. `conn/s`: wrk, {} connections, \
         `Connection: close`, {} s. `req/s`: wrk, one kept-alive connection, {} s (a \
         request/response rate). `× direct`: median of the per-round ratios [min–max].\n",
        forward["services"],
        forward["rounds"],
        forward["connections"],
        forward["conn_secs"],
        forward["latency_secs"],
    );
    let _ = writeln!(
        md,
        "| family | contender | conn/s | × direct | req/s (1 conn) | × direct | p50 µs |\n|---|---|---:|---:|---:|---:|---:|"
    );
    let find = |name: &str, family: &str, metric: &str| {
        results
            .iter()
            .find(|r| r["contender"] == name && r["family"] == family && r["metric"] == metric)
            .cloned()
            .unwrap_or(Value::Null)
    };
    for family in ["ipv4", "ipv6"] {
        for (_, name) in CONTENDERS {
            let conn = find(name, family, "conn_per_s");
            let req = find(name, family, "keepalive_req_per_s");
            let p50 = find(name, family, "latency_p50_us");
            let _ = writeln!(
                md,
                "| {family} | {name} | {} | {} | {} | {} | {} |",
                crate::report::spread(&conn["summary"], 0),
                crate::report::spread(&conn["vs_direct"], 3),
                crate::report::spread(&req["summary"], 0),
                crate::report::spread(&req["vs_direct"], 3),
                crate::report::spread(&p50["summary"], 0),
            );
        }
    }
    md.push('\n');
}
