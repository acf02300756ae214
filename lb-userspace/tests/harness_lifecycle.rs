//! Proof under load (issue 9): a steady rate of new TCP connections (1000/s
//! by default, `LB_LOAD_RATE`) over both families, through a `ClusterIP`
//! (from a pod) and a `NodePort` (from an external client) of one
//! dual-stack Service with real echo backends, plus long-lived TCP
//! connections and UDP sessions that keep exchanging data, through:
//!
//! - a SIGKILL of the agent and its restart: no new connection fails, no
//!   long-lived flow breaks or moves;
//! - the upgrade path (SIGTERM, then a new agent on the same pins, which
//!   loads the object anew and puts its program into the pinned TCX links;
//!   checked by program id): the same;
//! - 100 endpoint changes (scale up, scale down with graceful termination,
//!   readiness flaps, a pod removed from only one of two Services that
//!   select it): no new connection fails; TCP to a not-ready endpoint goes
//!   on, UDP moves off it, a removed endpoint's flows end;
//!
//! (The flood is `harness_lifecycle_flood.rs`; what both share is
//! `support::lifecycle`.) Every outcome is counted by kind (refused, timeout, reset, closed,
//! wrong answer, retransmitted) and printed with the conntrack occupancy.
//! `cargo xtask bench` runs the same phases longer (`LB_LIFECYCLE_SCALE`,
//! `LB_LIFECYCLE_OUT`) and reports the counts.
//!
//! Two-node cluster of `support::cluster`; the traffic enters node 1, whose
//! agent the test restarts. Everything lives in namespaces the test
//! creates. Privileged: root and bpffs.
//!
//! Run: `cargo test -p lb-userspace --test harness_lifecycle -- --nocapture`

mod support;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use serde_json::{Value, json};
use support::clients::{Conn, IO_TIMEOUT, Outcome, UdpFlow, conn_to, udp_flow_to};
use support::cluster::{Cluster, Ep, ep, ready, vip};
use support::keepers::{Keepers, flows_json, flows_text};
use support::lifecycle::{
    LOAD, NODE1, Plan, SIDE, cluster, conntrack, load_file, long_lived, side_file, targets,
    unbroken, verdict,
};
use support::load::Load;
use support::manifests::Cond;
use support::netns::in_netns;
use support::pins::require_privileged;
use support::scenarios::Scenarios;
use support::serial;
use support::topo::Family;

/// Program ids in the TCX ingress links of every interface of node 1.
fn program_ids(lab: &Cluster) -> Vec<(String, Vec<u32>)> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let node = &lab.topo.nodes[NODE1];
    node.ifaces()
        .iter()
        .map(|iface| {
            let name = CString::new(iface.as_str()).expect("interface name without NUL");
            let (_, programs) = in_netns(node.ns(), || {
                SchedClassifier::query_tcx(name.as_c_str(), TcAttachType::Ingress)
                    .unwrap_or_else(|e| panic!("TCX query of {iface}: {e}"))
            });
            let ids = programs
                .iter()
                .map(aya::programs::ProgramInfo::id)
                .collect();
            (iface.clone(), ids)
        })
        .collect()
}

/// How the agent goes away.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGKILL, then a new agent.
    Kill,
    /// SIGTERM, then a new agent (the upgrade path).
    Term,
}

/// The agent of node 1 goes away and a new one starts on the same pins,
/// under load; the results go to the benchmark as PHASE.
fn restart_under_load(lab: &mut Cluster, plan: &Plan, how: Stop, phase: &str) {
    let before = program_ids(lab);
    let keepers = Keepers::start(long_lived(lab, &["be1", "be2", "be3"], &["be1", "be3"]));
    let ct_before = conntrack(lab);
    let load = Load::start(&targets(lab), plan.spec);
    std::thread::sleep(plan.warm);
    load.epoch("agent down");
    match how {
        Stop::Kill => lab.kill_agent(NODE1),
        Stop::Term => lab.stop_agent(NODE1),
    }
    std::thread::sleep(plan.down);
    load.epoch("agent starting");
    let restart = lab.restart_agent(NODE1);
    eprintln!("{how:?}: the new agent was ready {restart:?} after its start");
    load.epoch("after restart");
    std::thread::sleep(plan.after);
    let ct_after = conntrack(lab);
    let report = load.stop();
    let flows = keepers.stop();
    let after = program_ids(lab);
    let what = format!("{how:?} and restart under load");
    eprintln!(
        "{what}: programs before {before:?}, after {after:?}; conntrack {ct_before} -> {ct_after}"
    );
    let result = json!({
        "load": report.json(), "flows": flows_json(&flows), "restart_ms": restart.as_millis(),
        "conntrack_before": ct_before, "conntrack_after": ct_after,
    });
    let mut violations = unbroken(&report, &flows);
    let old: BTreeSet<u32> = before
        .iter()
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect();
    for (iface, ids) in &after {
        if ids.len() != 1 || old.contains(&ids[0]) {
            violations.push(format!(
                "{iface} should run exactly one program, newly loaded (before: {before:?}, \
                 after: {after:?})"
            ));
        }
    }
    let text = format!(
        "{what}: new connections: {}long-lived flows:\n{}",
        report.text(),
        flows_text(&flows)
    );
    verdict(plan, phase, result, &violations, &text);
}

#[test]
fn load_through_restart_upgrade_and_endpoint_churn() {
    let _serial = serial();
    if !require_privileged("harness_lifecycle: load_through_restart_upgrade_and_endpoint_churn") {
        return;
    }
    let plan = Plan::from_env();
    let mut lab = cluster("lifecycle");
    let mut sc = Scenarios::default();
    sc.run("SIGKILL of the agent and restart under load", || {
        restart_under_load(&mut lab, &plan, Stop::Kill, "sigkill");
    });
    sc.run(
        "upgrade: SIGTERM, a new agent replaces the programs in the links",
        || restart_under_load(&mut lab, &plan, Stop::Term, "upgrade"),
    );
    sc.run("endpoint changes under load", || {
        churn_under_load(&mut lab, &plan);
    });
    lab.finish(sc);
}

/// What the churn's own flows must do, counted: (check, passed, failures).
#[derive(Default)]
struct Checks(Vec<(&'static str, u32, Vec<String>)>);

impl Checks {
    fn check(&mut self, name: &'static str, ok: bool, detail: impl FnOnce() -> String) {
        let i = self
            .0
            .iter()
            .position(|(n, _, _)| *n == name)
            .unwrap_or_else(|| {
                self.0.push((name, 0, Vec::new()));
                self.0.len() - 1
            });
        if ok {
            self.0[i].1 += 1;
        } else {
            self.0[i].2.push(detail());
        }
    }

    fn failures(&self) -> Vec<String> {
        self.0
            .iter()
            .flat_map(|(name, _, failed)| failed.iter().map(move |f| format!("{name}: {f}")))
            .collect()
    }

    fn json(&self) -> Value {
        self.0
            .iter()
            .map(|(name, ok, failed)| json!({"check": name, "passed": ok, "failed": failed.len()}))
            .collect()
    }
}

/// The flows the churn opens to watch one change each.
#[derive(Default)]
struct Watched {
    /// TCP to be4 while it is ready, per family.
    on_be4: Vec<(Family, Conn)>,
}

/// The endpoints of `load` without be4 (be2 ready).
const BASE: [Ep; 3] = [ready("be1"), ready("be2"), ready("be3")];

/// `plan.changes` endpoint changes under load, a cycle of seven: be4
/// scaled up; be2 not ready, ready again; be4 terminating, then (after a
/// grace period) gone; be1 removed from `side` only, then back.
fn churn_under_load(lab: &mut Cluster, plan: &Plan) {
    let client = lab.ns("client1");
    // be2 flaps, be4 comes and goes: TCP on be1..be3 and UDP on be1 and
    // be3 must never break or move.
    let keepers = Keepers::start(long_lived(lab, &["be1", "be2", "be3"], &["be1", "be3"]));
    let ct_before = conntrack(lab);
    let load = Load::start(&targets(lab), plan.spec);
    std::thread::sleep(plan.warm);
    load.epoch("endpoint changes");
    let (mut checks, mut watched) = (Checks::default(), Watched::default());
    let started = Instant::now();
    // A step that cannot even open its flows (a panic) ends the churn but
    // not the account: the load's counts still go to the report.
    let mut stopped = None;
    for change in 0..plan.changes {
        let step = std::panic::catch_unwind(AssertUnwindSafe(|| {
            churn_step(lab, &client, change % 7, plan, &mut watched, &mut checks);
        }));
        if let Err(payload) = step {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            stopped = Some(format!(
                "the churn stopped at change {change} (step {}): {message}",
                change % 7
            ));
            break;
        }
    }
    let took = started.elapsed();
    load.epoch("after");
    std::thread::sleep(plan.warm);
    let ct_after = conntrack(lab);
    let report = load.stop();
    let flows = keepers.stop();
    let what = format!("{} endpoint changes in {took:?}", plan.changes);
    eprintln!(
        "{what}: conntrack {ct_before} -> {ct_after}; checks {}",
        checks.json()
    );
    let result = json!({
        "changes": plan.changes, "changes_secs": took.as_secs_f64(), "load": report.json(),
        "flows": flows_json(&flows), "checks": checks.json(),
        "conntrack_before": ct_before, "conntrack_after": ct_after,
    });
    let mut violations = unbroken(&report, &flows);
    violations.extend(stopped);
    violations.extend(checks.failures());
    let text = format!(
        "{what}: new connections: {}long-lived flows:\n{}",
        report.text(),
        flows_text(&flows)
    );
    verdict(plan, "churn", result, &violations, &text);
}

/// Step STEP (0..7) of the churn cycle: one endpoint change, and what the
/// flows it concerns must do.
fn churn_step(
    lab: &mut Cluster,
    client: &str,
    step: usize,
    plan: &Plan,
    watched: &mut Watched,
    checks: &mut Checks,
) {
    let all = [BASE[0], BASE[1], BASE[2], ready("be4")];
    match step {
        0 => {
            let file = load_file(lab, &all);
            lab.apply("load.json", &file);
            watched.on_be4 = Family::BOTH
                .iter()
                .map(|&f| (f, conn_to(client, vip(LOAD).sock(f, 80), "be4")))
                .collect();
        }
        1 => {
            let udp: Vec<(Family, UdpFlow)> = Family::BOTH
                .iter()
                .map(|&f| (f, udp_flow_to(client, vip(LOAD).sock(f, 53), "be2")))
                .collect();
            let file = load_file(lab, &[BASE[0], ep("be2", Cond::NotReady), BASE[2], all[3]]);
            lab.apply("load.json", &file);
            for (family, flow) in &udp {
                let outcome = flow.ask(IO_TIMEOUT);
                let ok = matches!(&outcome, Outcome::Answer(a) if a.backend != "be2");
                checks.check("UDP moves off a not-ready endpoint", ok, || {
                    format!("{family:?}: {outcome:?}")
                });
            }
        }
        2 => {
            let file = load_file(lab, &all);
            lab.apply("load.json", &file);
        }
        3 => {
            let file = load_file(
                lab,
                &[
                    BASE[0],
                    BASE[1],
                    BASE[2],
                    ep("be4", Cond::ServingTerminating),
                ],
            );
            lab.apply("load.json", &file);
            for (family, conn) in &mut watched.on_be4 {
                let outcome = conn.ask();
                let ok = matches!(&outcome, Outcome::Answer(a) if a.backend == "be4");
                checks.check("TCP to a terminating endpoint goes on", ok, || {
                    format!("{family:?}: {outcome:?}")
                });
            }
        }
        4 => {
            std::thread::sleep(plan.grace);
            let file = load_file(lab, &BASE);
            lab.apply("load.json", &file);
            for (family, mut conn) in std::mem::take(&mut watched.on_be4) {
                let outcome = conn.ask();
                let ok = matches!(outcome, Outcome::Reset | Outcome::Closed);
                checks.check("TCP to a removed endpoint ends", ok, || {
                    format!("{family:?}: {outcome:?}")
                });
            }
        }
        5 => {
            let flows: Vec<(Family, UdpFlow, Conn)> = Family::BOTH
                .iter()
                .map(|&f| {
                    let udp = udp_flow_to(client, vip(SIDE).sock(f, 53), "be1");
                    (f, udp, conn_to(client, vip(SIDE).sock(f, 80), "be1"))
                })
                .collect();
            let file = side_file(lab, &[ready("be3")]);
            lab.apply("side.json", &file);
            for (family, udp, mut tcp) in flows {
                let outcome = udp.ask(IO_TIMEOUT);
                let ok = matches!(&outcome, Outcome::Answer(a) if a.backend == "be3");
                checks.check(
                    "side's UDP moves off be1 (removed from side only)",
                    ok,
                    || format!("{family:?}: {outcome:?}"),
                );
                let outcome = tcp.ask();
                let ok = matches!(outcome, Outcome::Reset | Outcome::Closed);
                checks.check(
                    "side's TCP to be1 (removed from side only) ends",
                    ok,
                    || format!("{family:?}: {outcome:?}"),
                );
            }
        }
        _ => {
            let file = side_file(lab, &[ready("be1"), ready("be3")]);
            lab.apply("side.json", &file);
        }
    }
}
