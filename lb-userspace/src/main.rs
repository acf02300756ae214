//! `lb`: the node agent and its inspection CLI.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand};
use lb_userspace::{
    agent::{self, AgentConfig},
    datapath::{
        loader,
        sock::{SockLbMode, SockLbSettings},
        xdp::{XdpMode, XdpSettings},
    },
    node::{self, NodeSettings},
    source::{SourceSpec, kube::KubeSourceConfig},
};

mod cli;

/// Default bpffs directory for maps and links.
const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(
    name = "lb",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("LB_BUILD_COMMIT"), ")"),
    about = "Dual-stack eBPF service load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at startup; boxing the agent's flags buys nothing"
)]
enum Command {
    /// Run the node agent in the foreground.
    Agent {
        /// Where `Services` and `EndpointSlices` come from: `file:DIR`, or
        /// `kube` (the API server: in-cluster, `KUBECONFIG` or `--kubeconfig`).
        #[arg(long, value_name = "file:DIR|kube")]
        source: String,
        /// Interfaces whose ingress gets the TC program.
        #[arg(long, value_name = "IFACE[,IFACE...]", value_delimiter = ',')]
        attach: Vec<String>,
        /// Globs (`*`, `?`) of interfaces to attach to, now and whenever one
        /// appears (e.g. `lxc*,veth*,cali*`).
        #[arg(long, value_name = "GLOB[,GLOB...]", value_delimiter = ',')]
        attach_pattern: Vec<String>,
        /// This node's name (`--source kube`: its Node object).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Kubeconfig file (`--source kube`); default: `KUBECONFIG`,
        /// `~/.kube/config`, else the in-cluster service account.
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "127.0.0.1:9917")]
        metrics_addr: SocketAddr,
        /// kube-proxy's node health server (`/healthz`, `/livez`), which
        /// cloud load balancers probe; `0.0.0.0` listens on both families;
        /// empty: off.
        #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:10256")]
        healthz_bind_address: String,
        /// The node's addresses (both families); the first of each family
        /// is its primary address: `NodePort` listens there (with
        /// `--nodeport-addresses primary`) and it is the source NAT address
        /// towards other nodes. Default: the Node object's (`InternalIP`s
        /// first), else this namespace's interfaces'.
        #[arg(long = "node-ip", value_name = "IP[,IP...]", value_delimiter = ',')]
        node_ips: Vec<IpAddr>,
        /// Addresses `NodePort`s listen on, as kube-proxy's flag: `primary`
        /// (one per family, the node's primary address), or CIDRs (every
        /// address of this namespace's interfaces inside one; a family with
        /// no CIDR gets all of its addresses).
        #[arg(long, value_name = "primary|CIDR[,CIDR...]", default_value = "primary")]
        nodeport_addresses: node::NodePortAddresses,
        /// This node's topology zone (default: the Node's zone label).
        #[arg(long)]
        zone: Option<String>,
        /// Conntrack entries per family (an LRU table).
        #[arg(long, default_value_t = lb_common::limits::DEFAULT_CT_ENTRIES,
              value_parser = clap::value_parser!(u32).range(1024..=(1 << 26)))]
        ct_entries: u32,
        /// Seconds between full resyncs: every map is read back, compared
        /// with what the agent wrote, and any difference repaired (0: off).
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        resync_interval: u64,
        /// Service frontends (address, port, protocol) per family: the
        /// rev-NAT maps. At most 262143 over both families (the rev-NAT id
        /// space). Default: 100k dual-stack Services of one port, +31%.
        #[arg(long, default_value_t = lb_common::limits::DEFAULT_SERVICES,
              value_parser = clap::value_parser!(u32).range(1..i64::from(lb_common::limits::MAX_FRONTENDS)))]
        max_services: u32,
        /// Service map entries per family: one per frontend, one per
        /// `ClusterIP`, one per backend slot of a frontend after its first 12
        /// (those are in its own entry). Default: 100k Services x 10
        /// endpoints, and room for 1.8M more slots.
        #[arg(long, default_value_t = lb_common::limits::MAX_SERVICE_SLOTS,
              value_parser = clap::value_parser!(u32).range(1..=(1 << 26)))]
        max_service_slots: u32,
        /// Backend entries per family: one per endpoint per frontend (a
        /// `ClusterIP` and each `NodePort` address of a Service have their
        /// own). Default: 1M endpoints per family, x2.
        #[arg(long, default_value_t = lb_common::limits::DEFAULT_BACKENDS,
              value_parser = clap::value_parser!(u32).range(1..i64::from(lb_common::limits::MAX_BACKENDS)))]
        max_backends: u32,
        /// Source address of hairpin flows (a pod reaching itself through
        /// its Service), IPv4.
        #[arg(long, default_value_t = node::DEFAULT_LOOPBACK4)]
        hairpin_ipv4: Ipv4Addr,
        /// Source address of hairpin flows, IPv6.
        #[arg(long, default_value_t = node::DEFAULT_LOOPBACK6)]
        hairpin_ipv6: Ipv6Addr,
        /// Enforce `loadBalancerSourceRanges` on a `LoadBalancer` Service's
        /// `NodePort`s and external IPs too, not only on its load-balancer
        /// IPs (kube-proxy's rule, which cloud load balancers that deliver
        /// to the `NodePort` from their own addresses rely on).
        #[arg(long)]
        source_ranges_strict: bool,
        /// The cluster's pod CIDRs, comma-separated, of one or both
        /// families (kube-proxy's `--cluster-cidr`): a `ClusterIP` flow
        /// from outside them (an off-cluster client with a route to the
        /// Service range) to an endpoint on another node gets the node's
        /// address as source, so that the reply comes back. Unset: none.
        #[arg(
            long,
            value_name = "CIDR[,CIDR]",
            default_value = "",
            env = "LB_CLUSTER_CIDR"
        )]
        cluster_cidr: node::ClusterCidrs,
        /// Socket-level load balancing (cgroup programs) for sockets of
        /// `hostns`: this network namespace only (the node's: pods keep the
        /// TC path), `all`: every namespace, `off`: none.
        #[arg(
            long,
            value_name = "all|hostns|off",
            default_value = "hostns",
            env = "LB_SOCKET_LB"
        )]
        socket_lb: SockLbMode,
        /// cgroup v2 directory the socket programs attach to (default:
        /// where the cgroup v2 hierarchy is mounted).
        #[arg(long, value_name = "DIR")]
        cgroup_root: Option<PathBuf>,
        /// `bind()` to a `NodePort` on a node address (or to an external
        /// or load-balancer IP's port) fails with `EADDRINUSE` in the
        /// namespaces `--socket-lb` translates.
        #[arg(long)]
        socket_lb_bind_guard: bool,
        /// How translated packets leave: `stack` (routed by the kernel,
        /// netfilter FORWARD and network policy engines there see them) or
        /// `redirect` (sent to the egress device by the datapath, which
        /// bypasses netfilter FORWARD: network policy there does not apply).
        #[arg(long, value_enum, default_value_t = node::ForwardMode::Stack)]
        forward: node::ForwardMode,
        /// The XDP program on the uplinks (north-south Service traffic
        /// translated and forwarded at the driver): `native` (a driver
        /// without native XDP is an error), `best-effort` (such devices
        /// stay TC-only) or `off`.
        #[arg(long, value_enum, default_value_t = XdpMode::Off, env = "LB_XDP")]
        xdp: XdpMode,
        /// Devices that get the XDP program: names or globs (`*`, `?`),
        /// also those that appear after the start (default: the
        /// `--attach` interfaces).
        #[arg(long, value_name = "IFACE[,IFACE...]", value_delimiter = ',')]
        xdp_interfaces: Vec<String>,
        #[command(flatten)]
        maglev: MaglevArgs,
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
    /// Show the devices with the programs (TC hooks, XDP mode) and the
    /// XDP counters, from the pins.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// bpffs directory of the pins.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Show what the datapath does with one packet: a dry run of the
    /// program against the pinned maps (changes nothing).
    Explain(cli::explain::Args),
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

/// `--xdp` and `--xdp-interfaces` (default: the `--attach` interfaces).
fn xdp_settings(mode: XdpMode, interfaces: Vec<String>, attach: &[String]) -> XdpSettings {
    let interfaces: Vec<String> = interfaces.into_iter().filter(|s| !s.is_empty()).collect();
    XdpSettings {
        mode,
        interfaces: if interfaces.is_empty() {
            attach.to_vec()
        } else {
            interfaces
        },
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            source,
            attach,
            attach_pattern,
            node_name,
            kubeconfig,
            pin_path,
            metrics_addr,
            healthz_bind_address,
            node_ips,
            nodeport_addresses,
            zone,
            ct_entries,
            resync_interval,
            max_services,
            max_service_slots,
            max_backends,
            hairpin_ipv4,
            hairpin_ipv6,
            source_ranges_strict,
            cluster_cidr,
            socket_lb,
            cgroup_root,
            socket_lb_bind_guard,
            forward,
            xdp,
            xdp_interfaces,
            maglev,
        } => {
            let node = NodeSettings {
                name: node_name.clone().unwrap_or_default(),
                addresses: node_ips,
                nodeport_addresses,
                zone,
                loopback4: hairpin_ipv4,
                loopback6: hairpin_ipv6,
                source_ranges_strict,
                forward,
                cluster_cidrs: cluster_cidr,
            };
            let source = source_spec(&source, node_name, kubeconfig)?;
            let attach: Vec<String> = attach.into_iter().filter(|s| !s.is_empty()).collect();
            let attach_pattern: Vec<String> = attach_pattern
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect();
            if attach.is_empty() && attach_pattern.is_empty() {
                return Err(anyhow!(
                    "--attach or --attach-pattern needs at least one interface"
                ));
            }
            let xdp = xdp_settings(xdp, xdp_interfaces, &attach);
            let config = AgentConfig {
                source,
                xdp,
                interfaces: attach,
                attach_patterns: attach_pattern,
                pin_path,
                metrics_addr,
                healthz_addr: if healthz_bind_address.is_empty() {
                    None
                } else {
                    Some(healthz_bind_address.parse().map_err(|_| {
                        anyhow!("--healthz-bind-address {healthz_bind_address:?} is not ADDR:PORT")
                    })?)
                },
                node,
                capacities: loader::Capacities {
                    services: max_services,
                    service_slots: max_service_slots,
                    backends: max_backends,
                    ct_entries,
                    maglev: maglev.config()?,
                },
                resync_interval: (resync_interval > 0)
                    .then(|| std::time::Duration::from_secs(resync_interval)),
                socket_lb: SockLbSettings {
                    mode: socket_lb,
                    cgroup_root,
                    bind_guard: socket_lb_bind_guard,
                },
            };
            // One malloc arena: the agent's few threads (source reading, BPF
            // loading) would otherwise each keep an arena of freed memory,
            // tens of MiB at 10k Services. Contention is no issue here.
            // (glibc only: musl's allocator, in the static image, keeps no
            // per-thread arenas.)
            // SAFETY: called before any other thread exists.
            #[cfg(target_env = "gnu")]
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(agent::run(config))?;
            Ok(())
        }
        Command::Cleanup { pin_path } => cli::cleanup::run(&pin_path),
        Command::Services { json, pin_path } => cli::services::print(json, &pin_path),
        Command::Conntrack { json, pin_path } => cli::conntrack::print(json, &pin_path),
        Command::Explain(args) => cli::explain::run(&args),
        Command::Status { json, pin_path } => cli::status::print(json, &pin_path),
    }
}

/// `--source` and the flags that go with it.
fn source_spec(
    source: &str,
    node_name: Option<String>,
    kubeconfig: Option<PathBuf>,
) -> anyhow::Result<SourceSpec> {
    if source == "kube" {
        let node_name = node_name.filter(|n| !n.is_empty()).ok_or_else(|| {
            anyhow!("--source kube needs the node's name: --node-name or NODE_NAME")
        })?;
        return Ok(SourceSpec::Kube(KubeSourceConfig {
            node_name,
            kubeconfig,
            prepare_first_lists: true,
        }));
    }
    let dir = source
        .strip_prefix("file:")
        .ok_or_else(|| anyhow!("unsupported --source {source:?}: expected file:DIR or kube"))?;
    if dir.is_empty() {
        return Err(anyhow!("--source file: needs a directory"));
    }
    Ok(SourceSpec::File(PathBuf::from(dir)))
}

/// The Maglev flags of `lb agent`.
#[derive(clap::Args, Debug)]
struct MaglevArgs {
    /// Backend choice of `ClusterIP` frontends: `random` (a per-node pick
    /// among the slots by the flow hash) or `maglev` (consistent hashing,
    /// the same on every node; implies `--maglev-external`).
    #[arg(long, value_enum, default_value_t = AlgorithmArg::Random)]
    lb_algorithm: AlgorithmArg,
    /// Maglev for north-south frontends (`NodePort`, load-balancer IPs,
    /// external IPs), so that a flow a router moves to another node keeps
    /// its backend.
    #[arg(long)]
    maglev_external: bool,
    /// Maglev table size M (entries per frontend): one of the primes 251,
    /// 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071. At 100 x
    /// the backends of a frontend, removing one moves 1.5-3.7% of the
    /// other backends' flows' slots; under 1% takes about 1600 x.
    #[arg(long, default_value_t = lb_userspace::maglev::DEFAULT_TABLE_SIZE,
          value_parser = parse_table_size)]
    maglev_table_size: u32,
    /// Frontends that can have a Maglev table. Each takes 2 x M x 4 bytes
    /// of kernel memory, allocated at load (256 x 128 KiB = 32 MiB at the
    /// default M); the frontends beyond it keep the per-node choice and
    /// are logged as an error.
    #[arg(long, default_value_t = lb_userspace::datapath::maglev::DEFAULT_MAX_TABLES,
          value_parser = clap::value_parser!(u32).range(0..=65_536))]
    max_maglev_tables: u32,
    /// Mixed into every frontend's Maglev seed (default: the seed is the
    /// Service's namespace, name, port name and family alone). Must be the
    /// same on every node.
    #[arg(long, default_value_t = 0)]
    maglev_seed: u64,
}

/// `--lb-algorithm` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum AlgorithmArg {
    Random,
    Maglev,
}

fn parse_table_size(text: &str) -> Result<u32, String> {
    let size: u32 = text.parse().map_err(|e| format!("{e}"))?;
    lb_userspace::maglev::table_size(size).map_err(|e| e.to_string())
}

impl MaglevArgs {
    fn config(&self) -> anyhow::Result<lb_userspace::datapath::maglev::MaglevConfig> {
        use lb_userspace::datapath::maglev::{LbAlgorithm, MaglevConfig};
        let algorithm = match self.lb_algorithm {
            AlgorithmArg::Random => LbAlgorithm::Random,
            AlgorithmArg::Maglev => LbAlgorithm::Maglev,
        };
        let config = MaglevConfig {
            algorithm,
            external: self.maglev_external || algorithm == LbAlgorithm::Maglev,
            table_size: self.maglev_table_size,
            max_tables: self.max_maglev_tables,
            seed: self.maglev_seed,
        };
        if (config.external || algorithm == LbAlgorithm::Maglev) && config.max_tables == 0 {
            return Err(anyhow!(
                "Maglev is on (--lb-algorithm=maglev or --maglev-external) but --max-maglev-tables is 0"
            ));
        }
        Ok(config)
    }
}
