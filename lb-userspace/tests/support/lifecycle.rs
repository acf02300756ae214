//! What the lifecycle proofs (`harness_lifecycle*.rs`) share: the plan
//! of their phases (longer when `cargo xtask bench` runs them), the
//! Services under load on the two-node cluster, the load's targets and
//! long-lived flows, conntrack occupancy, and the verdict of a phase
//! (recorded for the benchmark, then asserted).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::clients::{conn_to, metric_value, udp_flow_to};
use super::cluster::{Cluster, Ep, ready, service, vip};
use super::counts::LoadReport;
use super::flood::FloodLimit;
use super::keepers::{Flow, FlowReport};
use super::load::{LoadSpec, Target, tune_client};
use super::manifests::{HTTP_DNS, Manifest};
use super::topo::Family;

/// The Service under load (`ClusterIP`s `vip(60)`), and the second Service
/// that shares its pod be1.
pub(crate) const LOAD: u8 = 60;
pub(crate) const SIDE: u8 = 61;
pub(crate) const HTTP_NODE_PORT: u16 = 30080;
pub(crate) const DNS_NODE_PORT: u16 = 30053;
/// The node whose agent carries the traffic (and is restarted).
pub(crate) const NODE1: usize = 0;

/// Durations of the phases; `LB_LIFECYCLE_SCALE` multiplies them (the
/// benchmark runs them longer), `LB_LIFECYCLE_CHANGES` sets the number of
/// endpoint changes.
pub(crate) struct Plan {
    /// Load before the event.
    pub(crate) warm: Duration,
    /// How long the agent stays down.
    pub(crate) down: Duration,
    /// Load after the event.
    pub(crate) after: Duration,
    /// Endpoint changes of the churn phase.
    pub(crate) changes: usize,
    /// Time a terminating endpoint keeps serving before it leaves the
    /// slice (a grace period, longer than any of the load's connections).
    pub(crate) grace: Duration,
    pub(crate) flood: FloodLimit,
    pub(crate) spec: LoadSpec,
    /// Where the benchmark wants the results (`LB_LIFECYCLE_OUT`).
    pub(crate) out: Option<PathBuf>,
}

impl Plan {
    pub(crate) fn from_env() -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let scale: f64 = env("LB_LIFECYCLE_SCALE").map_or(1.0, |v| {
            v.parse()
                .unwrap_or_else(|e| panic!("LB_LIFECYCLE_SCALE={v:?}: {e}"))
        });
        let changes = env("LB_LIFECYCLE_CHANGES").map_or(100, |v| {
            v.parse()
                .unwrap_or_else(|e| panic!("LB_LIFECYCLE_CHANGES={v:?}: {e}"))
        });
        let secs = |s: f64| Duration::from_secs_f64(s * scale);
        Self {
            warm: secs(1.5),
            down: secs(1.0),
            after: secs(2.0),
            changes,
            grace: Duration::from_millis(300),
            flood: FloodLimit {
                packets: 4_000_000,
                time: secs(3.0),
            },
            spec: LoadSpec::from_env(),
            out: env("LB_LIFECYCLE_OUT").map(PathBuf::from),
        }
    }

    /// Writes the results of PHASE for the benchmark report, if asked to.
    pub(crate) fn record(&self, phase: &str, result: &Value) {
        let Some(dir) = &self.out else { return };
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let path = dir.join(format!("lifecycle-{phase}.json"));
        let text = serde_json::to_string_pretty(result).expect("serialisable");
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// The `load` Service: `http` 80/TCP and `dns` 53/UDP to 8080, with node
/// ports; ENDPOINTS in its slices.
pub(crate) fn load_file(lab: &Cluster, endpoints: &[Ep]) -> Manifest {
    let svc = service(
        "load",
        LOAD,
        "NodePort",
        &[
            HTTP_DNS[0].node(HTTP_NODE_PORT),
            HTTP_DNS[1].node(DNS_NODE_PORT),
        ],
    );
    lab.simple("load", svc, endpoints)
}

/// The `side` Service (`ClusterIP` only), which selects be1 too.
pub(crate) fn side_file(lab: &Cluster, endpoints: &[Ep]) -> Manifest {
    lab.simple(
        "side",
        service("side", SIDE, "ClusterIP", &HTTP_DNS),
        endpoints,
    )
}

/// Builds the cluster with `load` on be1..be3 and `side` on be1, be3.
pub(crate) fn cluster(what: &str) -> Cluster {
    let mut lab = Cluster::new(what);
    tune_client(&lab.ns("client1"));
    tune_client(&lab.ns("ext"));
    let file = load_file(&lab, &[ready("be1"), ready("be2"), ready("be3")]);
    lab.apply("load.json", &file);
    let file = side_file(&lab, &[ready("be1"), ready("be3")]);
    lab.apply("side.json", &file);
    lab
}

/// The `ClusterIP` (from client1) and the `NodePort` of node 1 (from ext)
/// of `load`, on both families.
pub(crate) fn targets(lab: &Cluster) -> Vec<Target> {
    let mut targets = Vec::new();
    for family in Family::BOTH {
        targets.push(Target {
            label: format!("{family:?} ClusterIP"),
            ns: lab.ns("client1"),
            addr: vip(LOAD).sock(family, 80),
            snat: None,
        });
        let node = lab.node_ip(NODE1, family);
        targets.push(Target {
            label: format!("{family:?} NodePort"),
            ns: lab.ns("ext"),
            addr: SocketAddr::new(node, HTTP_NODE_PORT),
            snat: Some(node),
        });
    }
    targets
}

/// Long-lived flows of `load`: per family, TCP through the `ClusterIP`
/// and the `NodePort` on each backend of `tcp_on`, UDP through the
/// `ClusterIP` on each of `udp_on` and through the `NodePort` on the first.
pub(crate) fn long_lived(
    lab: &Cluster,
    tcp_on: &[&str],
    udp_on: &[&str],
) -> Vec<(String, Flow, String)> {
    let (client, ext) = (lab.ns("client1"), lab.ns("ext"));
    let mut flows = Vec::new();
    for family in Family::BOTH {
        let node = lab.node_ip(NODE1, family);
        let paths = [
            ("ClusterIP", &client, vip(LOAD).sock(family, 80)),
            ("NodePort", &ext, SocketAddr::new(node, HTTP_NODE_PORT)),
        ];
        for (path, ns, to) in paths {
            for backend in tcp_on {
                let conn = conn_to(ns, to, backend);
                let label = format!("{family:?} {path} TCP");
                flows.push((label, Flow::Tcp(conn), (*backend).to_owned()));
            }
        }
        let paths = [
            ("ClusterIP", &client, vip(LOAD).sock(family, 53), udp_on),
            (
                "NodePort",
                &ext,
                SocketAddr::new(node, DNS_NODE_PORT),
                &udp_on[..1],
            ),
        ];
        for (path, ns, to, backends) in paths {
            for backend in backends {
                let udp = udp_flow_to(ns, to, backend);
                let label = format!("{family:?} {path} UDP");
                flows.push((label, Flow::Udp(udp), (*backend).to_owned()));
            }
        }
    }
    flows
}

/// Conntrack entries of node 1 (both families), and the capacity of each
/// family's map, from its agent's metrics.
pub(crate) fn conntrack(lab: &Cluster) -> Value {
    let Ok(text) = lab.metrics(NODE1) else {
        return Value::Null;
    };
    let entries = |family: &str| {
        metric_value(
            &text,
            &format!("lb_conntrack_entries{{family=\"{family}\"}}"),
        )
    };
    let capacity = text.lines().find_map(|line| {
        line.strip_prefix("lb_map_capacity{map=\"LB4_CT")?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    });
    json!({"ipv4": entries("ipv4"), "ipv6": entries("ipv6"), "capacity_per_family": capacity})
}

/// Node 1's datapath drops so far, by reason (those counted at all), from
/// its agent's metrics: what a failed new connection may have met.
pub(crate) fn drops(lab: &Cluster) -> Value {
    nonzero_counts(lab, "lb_datapath_packets_total{reason=\"", "drop_")
}

/// Node 1's datapath events so far (those counted at all), from its
/// agent's metrics: `snat_took_unconfirmed` says source NAT gave new
/// flows the tuples of flooded ones.
pub(crate) fn events(lab: &Cluster) -> Value {
    nonzero_counts(lab, "lb_datapath_events_total{event=\"", "")
}

/// The nonzero series of node 1's metrics that start with SERIES (up to
/// the label's opening quote) and whose label value starts with LABEL, by
/// label value.
fn nonzero_counts(lab: &Cluster, series: &str, label: &str) -> Value {
    let Ok(text) = lab.metrics(NODE1) else {
        return Value::Null;
    };
    let counts: serde_json::Map<String, Value> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(series)?.strip_prefix(label)?;
            let (name, value) = rest.split_once("\"} ")?;
            let value: u64 = value.trim().parse().ok()?;
            (value > 0).then(|| (format!("{label}{name}"), json!(value)))
        })
        .collect();
    Value::Object(counts)
}

/// What the phase WHAT must not have seen: a failed new connection, a
/// long-lived flow that did not answer from its backend every time, a
/// rate below 95% of the one asked for (then the test did not prove what
/// it claims; `LB_LOAD_RATE` sets a rate the machine can make).
pub(crate) fn unbroken(load: &LoadReport, flows: &[FlowReport]) -> Vec<String> {
    let mut violations = Vec::new();
    let total = load.total();
    if total.failed() > 0 {
        violations.push(format!("new connections failed: {total}"));
    }
    for flow in flows.iter().filter(|f| !f.intact()) {
        violations.push(format!(
            "long-lived {} on {} did not keep working",
            flow.label, flow.backend
        ));
    }
    let achieved = load.achieved_rate();
    if achieved < 0.95 * f64::from(load.rate) {
        violations.push(format!(
            "the load made {achieved:.0} new connections/s, asked {} (a busy machine? \
             LB_LOAD_RATE sets the rate)",
            load.rate
        ));
    }
    violations
}

/// Records RESULT with VIOLATIONS for the benchmark (as PHASE), then
/// fails the test if there are any; TEXT is the phase's full account.
pub(crate) fn verdict(
    plan: &Plan,
    phase: &str,
    mut result: Value,
    violations: &[String],
    text: &str,
) {
    eprintln!("{text}");
    result["violations"] = json!(violations);
    plan.record(phase, &result);
    assert!(violations.is_empty(), "{phase}: {violations:#?}\n{text}");
}
