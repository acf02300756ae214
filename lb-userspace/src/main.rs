//! `lb`: the node agent and its inspection CLI.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand};
use lb_userspace::{
    agent::{self, AgentConfig},
    loader,
    maps::Maps,
    plan,
    source::SourceSpec,
};

/// Default bpffs directory for maps and links.
const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(name = "lb", version, about = "Dual-stack eBPF service load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent in the foreground.
    Agent {
        /// Where `Services` and `EndpointSlices` come from: `file:DIR`.
        #[arg(long, value_name = "file:DIR")]
        source: String,
        /// Interfaces whose ingress gets the TC program.
        #[arg(
            long,
            value_name = "IFACE[,IFACE...]",
            value_delimiter = ',',
            required = true
        )]
        attach: Vec<String>,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "127.0.0.1:9917")]
        metrics_addr: SocketAddr,
    },
    /// Detach the programs and remove every pin.
    Cleanup {
        /// bpffs directory of the pins.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Print every frontend with its backends, from the pinned maps.
    Services {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// bpffs directory of the pins.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Print the tracked flows, from the pinned maps.
    Conntrack {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// bpffs directory of the pins.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = error.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the problem.
            let text = error.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("lb: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, with the causes joined (the verifier log, if any,
            // follows on the next lines).
            eprintln!("lb: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            source,
            attach,
            pin_path,
            metrics_addr,
        } => {
            let dir = source
                .strip_prefix("file:")
                .ok_or_else(|| anyhow!("unsupported --source {source:?}: expected file:DIR"))?;
            if dir.is_empty() {
                return Err(anyhow!("--source file: needs a directory"));
            }
            let attach: Vec<String> = attach.into_iter().filter(|s| !s.is_empty()).collect();
            if attach.is_empty() {
                return Err(anyhow!("--attach needs at least one interface"));
            }
            let config = AgentConfig {
                source: SourceSpec::File(PathBuf::from(dir)),
                interfaces: attach,
                pin_path,
                metrics_addr,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(agent::run(config))?;
            Ok(())
        }
        Command::Cleanup { pin_path } => {
            let done = loader::cleanup(&pin_path, &loader::all_interfaces())
                .with_context(|| format!("cleanup of {}", pin_path.display()))?;
            if done.is_empty() {
                println!("nothing to clean up under {}", pin_path.display());
            }
            for line in done {
                println!("{line}");
            }
            Ok(())
        }
        Command::Services { json, pin_path } => services(json, &pin_path),
        Command::Conntrack { json, pin_path } => {
            let maps = open(&pin_path)?;
            let flows = maps.conntrack()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                println!(
                    "{:<8} {:<4} {:<46} {:<46} {:>8} {:>7} {:>6}",
                    "DIR", "PROTO", "SOURCE", "DESTINATION", "BACKEND", "REVNAT", "IDLE"
                );
                for flow in flows {
                    println!(
                        "{:<8} {:<4} {:<46} {:<46} {:>8} {:>7} {:>5}s{}",
                        flow.direction,
                        flow.protocol,
                        flow.source.to_string(),
                        flow.destination.to_string(),
                        flow.backend_id,
                        flow.rev_nat_id,
                        flow.idle_seconds,
                        if flow.closing { " closing" } else { "" }
                    );
                }
            }
            Ok(())
        }
    }
}

fn open(pin_path: &std::path::Path) -> anyhow::Result<Maps> {
    Maps::open_pinned(pin_path).with_context(|| {
        format!(
            "no lb maps pinned under {} (is the agent running there?)",
            pin_path.display()
        )
    })
}

#[derive(serde::Serialize)]
struct ServiceView {
    address: std::net::IpAddr,
    port: u16,
    protocol: &'static str,
    rev_nat_id: u32,
    packets: u64,
    bytes: u64,
    backends: Vec<BackendView>,
}

#[derive(serde::Serialize)]
struct BackendView {
    id: u32,
    address: std::net::IpAddr,
    port: u16,
    state: &'static str,
}

fn services(json: bool, pin_path: &std::path::Path) -> anyhow::Result<()> {
    let maps = open(pin_path)?;
    let state = maps.read_state()?;
    let mut views = Vec::new();
    for (frontend, frontend_state) in &state.frontends {
        let counters = maps
            .service_stats(frontend_state.rev_nat_id)
            .unwrap_or_default();
        views.push(ServiceView {
            address: frontend.addr,
            port: frontend.port,
            protocol: frontend.proto.name(),
            rev_nat_id: frontend_state.rev_nat_id,
            packets: counters.packets,
            bytes: counters.bytes,
            backends: frontend_state
                .slots
                .iter()
                .map(|id| {
                    let backend = state.backends.get(id);
                    BackendView {
                        id: *id,
                        address: backend.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |b| b.addr),
                        port: backend.map_or(0, |b| b.port),
                        state: if backend.is_some() {
                            "active"
                        } else {
                            "missing"
                        },
                    }
                })
                .collect(),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    for (view, (frontend, _)) in views.iter().zip(&state.frontends) {
        println!(
            "{}  rev-nat {}  {} backends  {} packets",
            plan::frontend_label(frontend),
            view.rev_nat_id,
            view.backends.len(),
            view.packets
        );
        for backend in &view.backends {
            println!(
                "  -> {} (id {}, {})",
                std::net::SocketAddr::new(backend.address, backend.port),
                backend.id,
                backend.state
            );
        }
    }
    Ok(())
}
