//! `lb-bench`: the end-to-end and control-plane benchmarks of `lb`, and the
//! report. Run through `cargo xtask bench` (root; it builds everything in
//! release mode and runs the per-packet runner first).
//!
//! ```text
//! lb-bench run --lb PATH --json FILE [--quick]     e2e + control plane (root)
//! lb-bench run ... --control-only --source kube    control plane, API server source
//! lb-bench report --dir DIR [--publish DOCS_DIR]  markdown + SVG from DIR/*.json
//! lb-bench manifests --services N --dir DIR      the run's manifests (profiling)
//! lb-bench socklb --lb PATH [--json FILE] [--quick] socket-LB connects/s vs direct (root)
//! lb-bench forward --lb PATH --json FILE [--quick]  --forward=stack vs redirect vs direct (root)
//! lb-bench xdp-e2e --lb PATH --json FILE [--quick]  XDP vs TC vs nftables vs direct, NodePort (root)
//! ```

// The stand-in API server of the kube source's tests, behind `--source kube`.
#[path = "../../lb-userspace/tests/kube_source/api_protobuf.rs"]
mod api_protobuf;
#[path = "../../lb-userspace/tests/kube_source/api_server.rs"]
#[expect(
    dead_code,
    reason = "shared with the tests, which use more of it (outages, Events, compaction)"
)]
mod api_server;
mod e2e;
mod forward;
mod kube;
mod lifecycle;
mod paired;
mod progstats;
mod report;
mod rules;
mod socklb;
mod stats;
mod sys;
mod topo;
mod xdp;
mod xdp_e2e;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "lb benchmarks: end to end, control plane, report"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// End-to-end and control-plane benchmarks in network namespaces (root).
    Run {
        /// The `lb` binary (release build).
        #[arg(long)]
        lb: PathBuf,
        /// Where to write the JSON results.
        #[arg(long)]
        json: PathBuf,
        /// A smoke run: small scales, one short round.
        #[arg(long)]
        quick: bool,
        /// Override the scales (Services), comma-separated.
        #[arg(long, value_delimiter = ',')]
        scales: Option<Vec<u32>>,
        /// Override the number of rounds.
        #[arg(long)]
        rounds: Option<usize>,
        /// Measure only these contenders (direct, lb, nftables, iptables);
        /// for profiling. Default: all.
        #[arg(long, value_delimiter = ',')]
        contenders: Vec<String>,
        /// Only `lb`'s control plane (cold start, endpoint changes, memory):
        /// no traffic and no kube-proxy rules.
        #[arg(long)]
        control_only: bool,
        /// The agent's source in the control-plane measurements: `file`
        /// (manifest files) or `kube` (a stand-in API server, listed page
        /// by page and watched).
        #[arg(long, value_enum, default_value = "file")]
        source: e2e::AgentSource,
    },
    /// Writes the manifests of a run of N Services into DIR, to profile
    /// `lb agent --source file:DIR` by hand.
    Manifests {
        /// Dual-stack Services (10 endpoints each).
        #[arg(long)]
        services: u32,
        /// Directory to write to (created).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Socket-level load balancing: new connections per second from a node
    /// process through a `ClusterIP` against straight to the backend (root).
    Socklb {
        /// The `lb` binary.
        #[arg(long)]
        lb: PathBuf,
        /// Where to write the JSON results (else stdout).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Services per run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,10000")]
        scales: Vec<u32>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3)]
        secs: u32,
        /// Rounds (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds of interleaved socket/direct connects per family and
        /// scale (`paired.rs`: the ratio with a 95% interval).
        #[arg(long, default_value_t = 20)]
        paired_secs: u32,
        /// A smoke run: 10 and 1k Services, 1 s per measurement, 1 round,
        /// 2 s interleaved (overrides the four above).
        #[arg(long)]
        quick: bool,
    },
    /// `--forward=stack` against `--forward=redirect` against direct:
    /// new connections/s and a request/response rate through a
    /// `ClusterIP`, both families (root).
    Forward {
        /// The `lb` binary.
        #[arg(long)]
        lb: PathBuf,
        /// Where to write the JSON results.
        #[arg(long)]
        json: PathBuf,
        /// A smoke run: 1 round of 1 s measurements.
        #[arg(long)]
        quick: bool,
        /// Services.
        #[arg(long, default_value_t = 10)]
        services: u32,
    },
    /// XDP against TC against kube-proxy's nftables rules against direct:
    /// small-UDP packets/s and new TCP connections/s through a `NodePort`,
    /// both families, with softirq time per packet (root).
    XdpE2e(xdp_e2e::Args),
    /// Internal: the interleaved client of `socklb` (run inside its
    /// cgroup): connects to TARGET and VERSUS in turn, times each.
    #[command(hide = true)]
    ConnectPair {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        versus: std::net::SocketAddr,
        #[arg(long)]
        secs: u32,
    },
    /// Internal: the client of `socklb` (run inside its cgroup).
    #[command(hide = true)]
    ConnectLoop {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        secs: u32,
    },
    /// Renders the report from a results directory.
    Report {
        /// Directory with datapath.json, e2e.json and machine.json.
        #[arg(long)]
        dir: PathBuf,
        /// Also write benchmarks.md, benchmarks.json and the SVGs here.
        #[arg(long)]
        publish: Option<PathBuf>,
    },
}

#[expect(clippy::too_many_lines, reason = "one arm per subcommand")]
fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run {
            lb,
            json,
            quick,
            scales,
            rounds,
            contenders,
            control_only,
            source,
        } => {
            sys::install_signal_handlers();
            let mut settings = if quick {
                e2e::Settings {
                    lb,
                    scales: vec![10, 1_000],
                    rounds: 1,
                    conn_secs: 1,
                    latency_secs: 1,
                    bulk_secs: 1,
                    changes: 20,
                    connections: 32,
                    contenders,
                    control_only,
                    source,
                }
            } else {
                e2e::Settings {
                    lb,
                    scales: vec![10, 1_000, 10_000],
                    rounds: 3,
                    conn_secs: 5,
                    latency_secs: 3,
                    bulk_secs: 3,
                    changes: 100,
                    connections: 32,
                    contenders,
                    control_only,
                    source,
                }
            };
            if let Some(scales) = scales {
                settings.scales = scales;
            }
            if let Some(rounds) = rounds {
                settings.rounds = rounds;
            }
            let result = e2e::run(&settings)?;
            std::fs::write(&json, serde_json::to_string_pretty(&result)?)
                .with_context(|| format!("write {}", json.display()))?;
            eprintln!("[e2e] wrote {}", json.display());
            Ok(())
        }
        Cmd::Socklb {
            lb,
            json,
            scales,
            secs,
            rounds,
            paired_secs,
            quick,
        } => {
            sys::install_signal_handlers();
            let settings = if quick {
                socklb::Settings::quick(lb)
            } else {
                socklb::Settings {
                    lb,
                    scales,
                    secs,
                    rounds,
                    paired_secs,
                }
            };
            let result = socklb::run(&settings)?;
            let text = serde_json::to_string_pretty(&result)?;
            match json {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("write {}", path.display()))?,
                None => println!("{text}"),
            }
            Ok(())
        }
        Cmd::Forward {
            lb,
            json,
            quick,
            services,
        } => {
            sys::install_signal_handlers();
            write_json(
                &json,
                &forward::run(&forward::settings(lb, quick, services))?,
            )
        }
        Cmd::XdpE2e(args) => xdp_e2e::command(args),
        Cmd::ConnectLoop { target, secs } => socklb::connect_loop(target, secs),
        Cmd::ConnectPair {
            target,
            versus,
            secs,
        } => paired::connect_pair(target, versus, secs),
        Cmd::Report { dir, publish } => report::render(&dir, publish.as_deref()),
        Cmd::Manifests { services, dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            e2e::write_manifests(&rules::Cluster::new(services), &dir)
        }
    }
}

/// Writes VALUE to PATH, pretty-printed, and says so.
fn write_json(path: &std::path::Path, value: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!("[lb-bench] wrote {}", path.display());
    Ok(())
}
