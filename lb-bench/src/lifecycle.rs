//! The report's section on connections under load through agent
//! restarts, the upgrade path, endpoint changes and a SYN flood: the
//! results `lb-userspace/tests/harness_lifecycle*.rs` write when
//! `cargo xtask bench` runs it (`DIR/lifecycle-PHASE.json`, one per phase).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value};

/// The phases, in the order of the report, with their row names.
const PHASES: [(&str, &str); 4] = [
    ("sigkill", "agent SIGKILLed, restarted"),
    (
        "upgrade",
        "upgrade (SIGTERM, new agent, new programs in the links)",
    ),
    ("churn", "endpoint changes"),
    ("flood", "spoofed SYN flood against the NodePort"),
];

/// Every `lifecycle-PHASE.json` of DIR, by phase (`null` when none).
pub fn read(dir: &Path) -> Value {
    let mut phases = Map::new();
    for (phase, _) in PHASES {
        let path = dir.join(format!("lifecycle-{phase}.json"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str(&text) {
                Ok(value) => {
                    phases.insert(phase.to_owned(), value);
                }
                Err(error) => eprintln!("[report] {}: {error}", path.display()),
            }
        }
    }
    if phases.is_empty() {
        Value::Null
    } else {
        Value::Object(phases)
    }
}

fn count(v: &Value) -> String {
    v.as_u64().map_or_else(|| "?".to_owned(), |n| n.to_string())
}

/// `v4 + v6` conntrack entries.
fn ct(v: &Value) -> String {
    format!("{} + {}", count(&v["ipv4"]), count(&v["ipv6"]))
}

/// The failures by kind, only the kinds that occurred.
fn failures(total: &Value) -> String {
    let kinds: Vec<String> = ["refused", "timeout", "reset", "closed", "wrong", "error"]
        .iter()
        .filter(|k| total[**k].as_u64().unwrap_or(0) > 0)
        .map(|k| format!("{} {k}", count(&total[*k])))
        .collect();
    if kinds.is_empty() {
        count(&total["failed"])
    } else {
        format!("{} ({})", count(&total["failed"]), kinds.join(", "))
    }
}

/// Whether the phase's proof held, else its first violation.
fn proof(violations: &Value) -> String {
    match violations.as_array().map(Vec::as_slice) {
        Some([]) => "holds".to_owned(),
        Some([first, rest @ ..]) => format!(
            "**fails**: {}{}",
            first.as_str().unwrap_or("?"),
            if rest.is_empty() {
                String::new()
            } else {
                format!(" (and {} more)", rest.len())
            }
        ),
        None => "?".to_owned(),
    }
}

/// What is particular to PHASE.
fn detail(phase: &str, r: &Value) -> String {
    match phase {
        "sigkill" | "upgrade" => format!("new agent ready in {} ms", count(&r["restart_ms"])),
        "churn" => {
            let checks = r["checks"].as_array().map_or(0, Vec::len);
            let passed: u64 = r["checks"]
                .as_array()
                .map_or(0, |c| c.iter().filter_map(|c| c["passed"].as_u64()).sum());
            let failed: u64 = r["checks"]
                .as_array()
                .map_or(0, |c| c.iter().filter_map(|c| c["failed"].as_u64()).sum());
            format!(
                "{} changes in {:.1} s; flows that must move or end: {passed} as required, \
                 {failed} not ({checks} kinds)",
                count(&r["changes"]),
                r["changes_secs"].as_f64().unwrap_or(0.0)
            )
        }
        "flood" => format!(
            "{} SYNs in {:.1} s ({:.0}/s); conntrack at the end of the flood {}",
            count(&r["flood"]["sent"]),
            r["flood"]["secs"].as_f64().unwrap_or(0.0),
            r["flood"]["pps"].as_f64().unwrap_or(0.0),
            ct(&r["conntrack_end_of_flood"])
        ),
        _ => String::new(),
    }
}

/// The section, if the run has results.
pub fn section(md: &mut String, lifecycle: &Value) {
    if lifecycle.is_null() {
        return;
    }
    let _ = writeln!(
        md,
        "## Connections under load: restarts, upgrade, endpoint changes, flood\n"
    );
    let _ = writeln!(
        md,
        "`lb-userspace/tests/harness_lifecycle.rs` and `harness_lifecycle_flood.rs`, run longer than in the test suite: a steady \
         rate of new TCP connections (one request and answer each) over both families, through \
         a ClusterIP from a pod and a NodePort from an external client of one dual-stack \
         Service with 3–4 real backends on two nodes, plus 18 long-lived flows (TCP through both \
         paths, UDP) asked every 50 ms, through each phase. A new connection fails when it is \
         refused, times out (2 s), is reset or closed before its answer, or gets a wrong answer; \
         *retransmitted* counts answered connections that needed a packet sent again (a drop). \
         A long-lived flow is intact when every ask was answered by its first backend. \
         Conntrack: entries of node 1's maps, IPv4 + IPv6, before → after the phase. *Proof*: \
         what the test asserts (no failed connection, every long-lived flow intact, the flows \
         that must move or end did, the rate reached; the flood: no established flow broken, \
         99% of each target's new connections in each window); the benchmark reports it and \
         never fails on it.\n"
    );
    let _ = writeln!(
        md,
        "| phase | s | conn/s asked / made | new connections | failed | retransmitted | \
         long-lived intact | conntrack before → after (capacity per family) | proof | |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for (phase, name) in PHASES {
        let r = &lifecycle[phase];
        if r.is_null() {
            continue;
        }
        let load = &r["load"];
        let total = &load["total"];
        let _ = writeln!(
            md,
            "| {name} | {:.1} | {} / {:.0} | {} | {} | {} | {} / {} | {} → {} ({}) | {} | {} |",
            load["secs"].as_f64().unwrap_or(0.0),
            count(&load["rate_asked"]),
            load["rate_achieved"].as_f64().unwrap_or(0.0),
            count(&total["attempts"]),
            failures(total),
            count(&total["retransmitted"]),
            count(&r["flows"]["intact"]),
            count(&r["flows"]["flows"]),
            ct(&r["conntrack_before"]),
            ct(&r["conntrack_after"]),
            count(&r["conntrack_after"]["capacity_per_family"]),
            proof(&r["violations"]),
            detail(phase, r),
        );
    }
    md.push('\n');
    if let Some(epochs) = lifecycle["flood"]["load"]["epochs"].as_array() {
        let _ = writeln!(md, "New connections of the flood phase by window:\n");
        let _ = writeln!(
            md,
            "| window | s | attempts | failed |\n|---|---:|---:|---:|"
        );
        for epoch in epochs {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {} | {} |",
                epoch["name"].as_str().unwrap_or("?"),
                epoch["secs"].as_f64().unwrap_or(0.0),
                count(&epoch["total"]["attempts"]),
                failures(&epoch["total"]),
            );
        }
        md.push('\n');
    }
}
