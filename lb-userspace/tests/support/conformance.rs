//! The conformance suite's case format and runner (`tests/conformance.rs`).
//!
//! A case file (`tests/conformance/*.yaml`) holds groups, one per
//! kube-proxy test (or sub-test): the node (name, addresses), the
//! Kubernetes objects (Services and `EndpointSlices` as the API has them),
//! and the packet flows with kube-proxy's stated outcome. A group runs
//! through the agent's own path (`model::build`, `plan::diff`, the map
//! writes, `node::datapath_config`) into a private copy of the program,
//! then every flow is asked of the program with `lb explain`'s code
//! (`lb_userspace::explain`, dry runs) from many source ports, so that
//! every backend a new flow can reach shows up.
//!
//! Every group also runs as its IPv6 mirror: each IPv4 address a.b.c.d
//! becomes `fd00:4::a.b.c.d` (prefixes grow by 96 bits), `IPv4` becomes
//! `IPv6`, and the expected outcome is mirrored the same way.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use lb_common::proto;
use lb_userspace::{
    explain::{self, Catalog, MapView, Outcome, Query},
    model::{self, NodeContext},
    node::{self, NodeSettings},
};
use serde::Deserialize;
use serde_json::Value;

use super::prog_test::Fixture;

/// Distinct source ports asked per flow: with hashing over three backends,
/// missing one in 96 tuples has odds below 1e-16, over nine about 1e-4
/// (and the hash is deterministic: the same tuples give the same answer
/// every run).
const PROBES: u16 = 96;

/// One kube-proxy test (or sub-test).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Group {
    /// kube-proxy's test function (and sub-test).
    pub(crate) source: String,
    /// The node the proxy runs on.
    pub(crate) node: NodeSpec,
    /// Services and `EndpointSlices`.
    pub(crate) objects: Vec<Value>,
    /// The packets and their outcomes.
    pub(crate) flows: Vec<Flow>,
    /// Then (as kube-proxy's next sync): these objects instead, and these
    /// flows.
    #[serde(default)]
    pub(crate) then: Option<Phase>,
}

/// A later state of a group's objects.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Phase {
    pub(crate) objects: Vec<Value>,
    pub(crate) flows: Vec<Flow>,
}

/// The node: its name and the addresses the agent takes for it (by
/// default every global address of the node's interfaces).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeSpec {
    pub(crate) name: String,
    pub(crate) addresses: Vec<IpAddr>,
    /// Its `topology.kubernetes.io/zone` label, if any.
    #[serde(default)]
    pub(crate) zone: Option<String>,
    /// kube-proxy's `--nodeport-addresses` selects every one of
    /// `addresses` (the agent selects among its interfaces' addresses, which
    /// are not these in a test: the selection is given). Default: the
    /// agent's default, `primary`, computed by `node::context`.
    #[serde(default)]
    pub(crate) nodeport_on_all: bool,
}

/// One packet flow of kube-proxy's `runPacketFlowTests`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Flow {
    /// kube-proxy's name of the case.
    pub(crate) name: String,
    /// Source address.
    pub(crate) from: IpAddr,
    /// Destination address and port.
    pub(crate) to: SocketAddr,
    /// `TCP` (default) or `UDP`.
    #[serde(default)]
    pub(crate) protocol: Option<String>,
    /// kube-proxy's `output`: endpoints (`a:p, b:p`), `REJECT`, `DROP`, or
    /// `""` (not handled: passed on).
    pub(crate) kube_proxy: String,
    /// kube-proxy's `masq`.
    #[serde(default)]
    pub(crate) masq: bool,
    /// Where `lb` differs: its outcome (normalised form, see
    /// [`normalise`]) ...
    #[serde(default)]
    pub(crate) lb: Option<String>,
    /// ... and why (a README "Known deviations" row or an open gap).
    #[serde(default)]
    pub(crate) why: Option<String>,
    /// Not run here, and why.
    #[serde(default)]
    pub(crate) not_run: Option<String>,
}

/// How a group is run: as written, as its IPv6 mirror, or dual-stack
/// (every Service with both families, both families' slices, the flows
/// of both families asked of the same maps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Run {
    V4,
    V6,
    DualStack,
}

/// What a run found: the table rows (from the IPv4 run) and the flows
/// whose outcome differs from the expected one.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) failures: Vec<String>,
}

/// One family of one run, as `run_flow` asks it.
#[derive(Clone, Copy)]
struct Asked {
    /// Mirror the flow's addresses and outcome.
    v6: bool,
    /// Record the row (the IPv4 run only).
    record: bool,
    /// For failure messages.
    label: &'static str,
}

/// One row of docs/conformance.md.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) source: String,
    pub(crate) name: String,
    pub(crate) kube_proxy: String,
    pub(crate) lb: String,
    pub(crate) why: String,
}

/// kube-proxy's outcome in the normalised form: `REJECT`, `DROP`, `PASS`,
/// or the endpoints, sorted, each followed by ` masq` when masqueraded.
pub(crate) fn kube_proxy_outcome(flow: &Flow) -> String {
    match flow.kube_proxy.trim() {
        "" => "PASS".to_owned(),
        verdict @ ("REJECT" | "DROP") => verdict.to_owned(),
        endpoints => normalise(
            endpoints
                .split(',')
                .map(|e| format!("{}{}", e.trim(), if flow.masq { " masq" } else { "" })),
        ),
    }
}

/// Sorted, deduplicated, joined by `, `.
pub(crate) fn normalise(items: impl IntoIterator<Item = String>) -> String {
    items
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(", ")
}

/// The IPv6 mirror of an IPv4 address: `fd00:4::a.b.c.d`.
pub(crate) fn mirror_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                4,
                0,
                0,
                0,
                0,
                u16::from_be_bytes([a, b]),
                u16::from_be_bytes([c, d]),
            ))
        }
        v6 @ IpAddr::V6(_) => v6,
    }
}

fn mirror_socket(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(mirror_ip(addr.ip()), addr.port())
}

/// Mirrors every address in a normalised outcome.
pub(crate) fn mirror_outcome(outcome: &str) -> String {
    if !outcome.contains(':') {
        return outcome.to_owned();
    }
    normalise(outcome.split(", ").map(|item| {
        let (addr, rest) = item.split_once(' ').map_or((item, ""), |(a, r)| (a, r));
        let addr: SocketAddr = addr.parse().expect("an endpoint in an outcome");
        let mirrored = mirror_socket(addr).to_string();
        if rest.is_empty() {
            mirrored
        } else {
            format!("{mirrored} {rest}")
        }
    }))
}

/// Mirrors every IPv4 address, prefix and address type in an object.
fn mirror_value(value: &mut Value) {
    match value {
        Value::String(text) => {
            if text == "IPv4" {
                "IPv6".clone_into(text);
            } else if let Ok(ip) = text.parse::<Ipv4Addr>() {
                *text = mirror_ip(IpAddr::V4(ip)).to_string();
            } else if let Some((addr, len)) = text.trim().split_once('/')
                && let (Ok(ip), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u8>())
            {
                *text = format!("{}/{}", mirror_ip(IpAddr::V4(ip)), u16::from(len) + 96);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mirror_value),
        Value::Object(fields) => fields.values_mut().for_each(mirror_value),
        _ => {}
    }
}

/// Reads a case file.
pub(crate) fn load(text: &str, file: &str) -> Vec<Group> {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Runs every group in one way (`run`) through one private copy of the
/// program: each group's state replaces the previous one through the
/// agent's own diff, as a sync would. The IPv4 run records one row per
/// flow; the others check that they give the mirrored outcomes.
pub(crate) fn run_all(groups: &[Group], run: Run, report: &mut Report) {
    let Some(mut fx) = Fixture::new("conformance") else {
        return;
    };
    let maps = MapView::open(&fx.pin_path).expect("maps");
    let asked: &[Asked] = match run {
        Run::V4 => &[Asked {
            v6: false,
            record: true,
            label: "IPv4",
        }],
        Run::V6 => &[Asked {
            v6: true,
            record: false,
            label: "IPv6",
        }],
        Run::DualStack => &[
            Asked {
                v6: false,
                record: false,
                label: "dual-stack, IPv4",
            },
            Asked {
                v6: true,
                record: false,
                label: "dual-stack, IPv6",
            },
        ],
    };
    for group in groups {
        let phases = std::iter::once((&group.objects, &group.flows))
            .chain(group.then.as_ref().map(|t| (&t.objects, &t.flows)));
        for (objects, flows) in phases {
            let catalog = apply(&mut fx, group, objects, run);
            for one in asked {
                for flow in flows {
                    run_flow(&mut fx, &maps, &catalog, (group, flow), *one, report);
                }
            }
        }
    }
}

/// The dual-stack form of a case's objects: each Service gets the mirror
/// of its addresses next to its own (`clusterIPs`, external IPs, source
/// ranges, load-balancer ingress) and both families; each slice gets its
/// mirrored twin.
fn dual_stack(objects: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for object in objects {
        let mut mirrored = object.clone();
        mirror_value(&mut mirrored);
        if object.get("kind").and_then(Value::as_str) == Some("EndpointSlice") {
            if let Some(name) = mirrored.pointer_mut("/metadata/name")
                && let Some(text) = name.as_str()
            {
                *name = Value::String(format!("{text}-v6"));
            }
            out.push(object.clone());
            out.push(mirrored);
            continue;
        }
        let mut merged = object.clone();
        for path in [
            "/spec/externalIPs",
            "/spec/loadBalancerSourceRanges",
            "/status/loadBalancer/ingress",
        ] {
            if let (Some(Value::Array(ours)), Some(Value::Array(theirs))) = (
                merged.pointer_mut(path).map(Value::take),
                mirrored.pointer(path),
            ) {
                let both: Vec<Value> = ours.into_iter().chain(theirs.iter().cloned()).collect();
                *merged.pointer_mut(path).expect("the field") = Value::Array(both);
            }
        }
        if let (Some(v4), Some(v6)) = (
            object.pointer("/spec/clusterIP"),
            mirrored.pointer("/spec/clusterIP"),
        ) && let Some(spec) = merged.get_mut("spec").and_then(Value::as_object_mut)
        {
            spec.insert(
                "clusterIPs".into(),
                Value::Array(vec![v4.clone(), v6.clone()]),
            );
            spec.insert("ipFamilies".into(), serde_json::json!(["IPv4", "IPv6"]));
            spec.insert("ipFamilyPolicy".into(), "RequireDualStack".into());
        }
        out.push(merged);
    }
    out
}

/// Writes `objects` (mirrored for IPv6) and the group's node as the
/// program's state, through `model::build`, `plan::diff` and the maps.
fn apply(fx: &mut Fixture, group: &Group, objects: &[Value], run: Run) -> Catalog {
    let mut objects = objects.to_vec();
    let mut addresses = group.node.addresses.clone();
    match run {
        Run::V4 => {}
        Run::V6 => {
            objects.iter_mut().for_each(mirror_value);
            addresses = addresses.into_iter().map(mirror_ip).collect();
        }
        Run::DualStack => {
            objects = dual_stack(&objects);
            let mirrored: Vec<IpAddr> = addresses.iter().copied().map(mirror_ip).collect();
            addresses.extend(mirrored);
        }
    }
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for object in objects {
        match object.get("kind").and_then(Value::as_str) {
            Some("Service") => services.push(serde_json::from_value(object).expect("a Service")),
            Some("EndpointSlice") => {
                slices.push(serde_json::from_value(object).expect("an EndpointSlice"));
            }
            other => panic!("{}: unexpected kind {other:?}", group.source),
        }
    }
    // The node's addresses as `--node-ip` (kube-proxy's test node IPs),
    // through the agent's own `node::context`.
    // kube-proxy's fake proxier tells pods by the cluster CIDR 10.0.0.0/8
    // (`NewDetectLocalByCIDR`): `--cluster-cidr` with it and its mirror.
    let pods: IpAddr = "10.0.0.0".parse().unwrap();
    let settings = NodeSettings {
        name: group.node.name.clone(),
        addresses: addresses.clone(),
        zone: group.node.zone.clone(),
        cluster_cidrs: node::ClusterCidrs(vec![(pods, 8), (mirror_ip(pods), 96 + 8)]),
        ..NodeSettings::default()
    };
    let mut context = node::context(&settings, &NodeContext::default());
    if group.node.nodeport_on_all {
        context.addresses = addresses;
    }
    let built = model::build(&services, &slices, &context);
    assert!(
        built.errors.is_empty(),
        "{}: {:?}",
        group.source,
        built.errors
    );
    let specs: Vec<_> = built.frontends.clone().into_iter().collect();
    fx.set_specs(&specs);
    fx.maps
        .write_cluster_cidrs(&settings.cluster_cidrs.0)
        .expect("cluster CIDRs");
    fx.maps
        .write_config(&node::datapath_config(&settings, &context))
        .expect("config");
    Catalog::from_desired(&built.frontends)
}

fn run_flow(
    fx: &mut Fixture,
    maps: &MapView,
    catalog: &Catalog,
    (group, flow): (&Group, &Flow),
    asked: Asked,
    report: &mut Report,
) {
    let Asked { v6, record, label } = asked;
    let kube_proxy = kube_proxy_outcome(flow);
    let expected = flow.lb.clone().unwrap_or_else(|| kube_proxy.clone());
    if flow.lb.is_some() != flow.why.is_some() {
        report.failures.push(format!(
            "{} / {}: an `lb:` override needs a `why:` and the other way round",
            group.source, flow.name
        ));
    }
    if let Some(reason) = &flow.not_run {
        if record {
            report.rows.push(Row {
                source: group.source.clone(),
                name: flow.name.clone(),
                kube_proxy,
                lb: "not run".into(),
                why: reason.clone(),
            });
        }
        return;
    }
    let (from, to) = if v6 {
        (mirror_ip(flow.from), mirror_socket(flow.to))
    } else {
        (flow.from, flow.to)
    };
    let l4_proto = match flow.protocol.as_deref() {
        None | Some("TCP") => proto::TCP,
        Some("UDP") => proto::UDP,
        Some("SCTP") => proto::SCTP,
        Some(other) => panic!("{}: protocol {other}", flow.name),
    };
    let actual = ask(fx, maps, catalog, from, to, l4_proto);
    let family = |outcome: &str| {
        if v6 {
            mirror_outcome(outcome)
        } else {
            outcome.to_owned()
        }
    };
    if actual != family(&expected) {
        let hint = if flow.lb.is_some() && actual == family(&kube_proxy) {
            " (now as kube-proxy: remove the case's `lb:` override, its `why:` and its deviation row)"
        } else {
            ""
        };
        report.failures.push(format!(
            "{} / {} ({label}): lb {actual:?}, expected {:?}{hint}",
            group.source,
            flow.name,
            family(&expected)
        ));
    }
    if record {
        report.rows.push(Row {
            source: group.source.clone(),
            name: flow.name.clone(),
            lb: if expected == kube_proxy {
                "same".into()
            } else {
                expected.clone()
            },
            kube_proxy,
            why: flow.why.clone().unwrap_or_default(),
        });
    }
}

/// The normalised outcome of new flows from `from` (many source ports) to
/// `to`, asked of the program through `lb explain`'s code.
fn ask(
    fx: &mut Fixture,
    maps: &MapView,
    catalog: &Catalog,
    from: IpAddr,
    to: SocketAddr,
    l4_proto: u8,
) -> String {
    let mut seen = Vec::new();
    for port in 0..PROBES {
        let query = Query {
            from: SocketAddr::new(from, explain::DEFAULT_SOURCE_PORT + port * 7),
            to,
            l4_proto,
            ifindex: None,
        };
        let answer = explain::explain(fx.program(), maps, &query, Some(catalog)).expect("explain");
        seen.push(match answer.outcome {
            Outcome::Translated {
                backend,
                source_nat,
                ..
            } => format!(
                "{backend}{}",
                if source_nat.is_some() { " masq" } else { "" }
            ),
            Outcome::Reject { .. } => "REJECT".into(),
            Outcome::Drop => "DROP".into(),
            Outcome::Pass => "PASS".into(),
            Outcome::Reply { .. } => "REPLY".into(),
        });
    }
    normalise(seen)
}

/// The rows as the table of docs/conformance.md.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| kube-proxy test | case | kube-proxy | lb | why |\n|---|---|---|---|---|\n");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.source, row.name, row.kube_proxy, row.lb, row.why
        );
    }
    out
}
