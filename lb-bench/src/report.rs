//! The report: `benchmarks.md` (tables, targets vs measured) and SVG plots,
//! from the JSON a run left in its results directory.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;
use serde_json::{Value, json};

/// Prose kept next to the generated tables (analysis of a full run).
const NOTES: &str = include_str!("notes.md");

/// File names inside the results directory and the publish directory.
pub const DATAPATH_SVG: &str = "benchmarks-datapath.svg";
pub const E2E_SVG: &str = "benchmarks-e2e.svg";

fn read_json(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null)
}

/// CPU model, cores and kernel of this machine.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let hypervisor = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.contains(" hypervisor"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    });
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "kernel": kernel,
        "memory_gib": mem_kib.map(|k| (as_f64(k) / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "virtualized": hypervisor,
    })
}

/// Renders DIR/benchmarks.md and the SVGs into DIR, and with PUBLISH also
/// into that directory (plus `benchmarks.json`, all results in one file).
///
/// # Errors
/// A file could not be written.
pub fn render(dir: &Path, publish: Option<&Path>) -> anyhow::Result<()> {
    let mut all = json!({
        "run": read_json(&dir.join("run.json")),
        "machine": machine(),
        "datapath": read_json(&dir.join("datapath.json")),
        "e2e": read_json(&dir.join("e2e.json")),
        "lifecycle": crate::lifecycle::read(dir),
        "socklb": read_json(&dir.join("socklb.json")),
        "forward": read_json(&dir.join("forward.json")),
        "xdp": read_json(&dir.join("xdp.json")),
        "xdp_e2e": read_json(&dir.join("xdp-e2e.json")),
    });
    if all["run"].is_null() {
        all["run"] = json!({});
    }
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&all)?,
    )?;
    let markdown = markdown(&all);
    std::fs::write(dir.join("benchmarks.md"), &markdown)?;
    let mut plots = Vec::new();
    if let Err(error) = datapath_plot(&all["datapath"], &dir.join(DATAPATH_SVG)) {
        eprintln!("[report] no datapath plot: {error:#}");
    } else {
        plots.push(DATAPATH_SVG);
    }
    if let Err(error) = e2e_plot(&all["e2e"], &dir.join(E2E_SVG)) {
        eprintln!("[report] no end-to-end plot: {error:#}");
    } else {
        plots.push(E2E_SVG);
    }
    eprintln!("[report] wrote {}", dir.join("benchmarks.md").display());
    if let Some(out) = publish {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("benchmarks.md"), &markdown)?;
        std::fs::write(
            out.join("benchmarks.json"),
            serde_json::to_string_pretty(&all)?,
        )?;
        for plot in plots {
            std::fs::copy(dir.join(plot), out.join(plot))
                .with_context(|| format!("copy {plot}"))?;
        }
        eprintln!("[report] published to {}", out.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Lookups
// ---------------------------------------------------------------------------

fn datapath_ns(dp: &Value, services: u64, family: &str, proto: &str, case: &str) -> Option<f64> {
    dp["results"].as_array()?.iter().find_map(|row| {
        (row["services"] == services
            && row["family"] == family
            && row["proto"] == proto
            && row["case"] == case)
            .then(|| row["ns"]["median"].as_f64())
            .flatten()
    })
}

fn datapath_scales(dp: &Value) -> Vec<u64> {
    let mut scales: Vec<u64> = dp["results"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r["services"].as_u64()).collect())
        .unwrap_or_default();
    scales.sort_unstable();
    scales.dedup();
    scales
}

fn e2e_scales(e2e: &Value) -> Vec<&Value> {
    e2e["scales"]
        .as_array()
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

fn e2e_metric<'a>(
    scale: &'a Value,
    contender: &str,
    family: &str,
    metric: &str,
) -> Option<&'a Value> {
    scale["e2e"].as_array()?.iter().find(|row| {
        row["contender"] == contender && row["family"] == family && row["metric"] == metric
    })
}

fn e2e_median(scale: &Value, contender: &str, family: &str, metric: &str) -> Option<f64> {
    e2e_metric(scale, contender, family, metric)?["summary"]["median"].as_f64()
}

// ---------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------

fn num(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "–".to_owned(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => Some(a / b),
        _ => None,
    }
}

pub(crate) fn spread(summary: &Value, decimals: usize) -> String {
    let median = summary["median"].as_f64();
    let (min, max) = (summary["min"].as_f64(), summary["max"].as_f64());
    let n = summary["n"]
        .as_u64()
        .or_else(|| summary["samples"].as_array().map(|a| a.len() as u64))
        .unwrap_or(0);
    if n > 1 {
        format!(
            "{} [{}–{}]",
            num(median, decimals),
            num(min, decimals),
            num(max, decimals)
        )
    } else {
        num(median, decimals)
    }
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn as_f64(n: u64) -> f64 {
    n as f64
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "an axis position, rounded and clamped to >= 0"
)]
fn to_u64(x: f64) -> u64 {
    x.round().max(0.0) as u64
}

fn scale_name(n: u64) -> String {
    match n {
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

// ---------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------

fn markdown(all: &Value) -> String {
    let mut md = String::new();
    let run = &all["run"];
    let machine = &all["machine"];
    let dp = &all["datapath"];
    let e2e = &all["e2e"];
    let quick = run["quick"].as_bool().unwrap_or(false);
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench{}` (root). Raw results: `docs/benchmarks.json` \
         (every run also keeps its own under `docs/bench-results/`). Benchmarks report; they \
         never fail on numbers. Every comparison below was measured in the same run, with \
         the contenders alternating round by round; cells show the median over rounds and, \
         in brackets, the spread (min–max).\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(md, "| machine | |\n|---|---|");
    let _ = writeln!(md, "| CPU | {} |", machine["cpu"].as_str().unwrap_or("?"));
    let _ = writeln!(
        md,
        "| cores | {}{} |",
        machine["cores"],
        if machine["virtualized"].as_bool() == Some(true) {
            " (virtual machine)"
        } else {
            ""
        }
    );
    let _ = writeln!(md, "| memory | {} GiB |", machine["memory_gib"]);
    let _ = writeln!(
        md,
        "| kernel | {} |",
        machine["kernel"].as_str().unwrap_or("?")
    );
    for (key, label) in [("commit", "commit"), ("date", "date (UTC)")] {
        if let Some(v) = run[key].as_str() {
            let _ = writeln!(md, "| {label} | {v} |");
        }
    }
    if let Some(total) = run["total_s"].as_f64() {
        let _ = writeln!(
            md,
            "| run time | {:.0} s{} |",
            total,
            if quick { " (`--quick`)" } else { "" }
        );
    }
    if let Some(tools) = e2e["tools"].as_object() {
        let list: Vec<String> = tools
            .iter()
            .filter_map(|(k, v)| {
                v.as_str()
                    .filter(|s| !s.is_empty())
                    .map(|s| format!("{k}: {s}"))
            })
            .collect();
        let _ = writeln!(md, "| tools | {} |", list.join("; "));
    }
    md.push('\n');

    targets(&mut md, dp, e2e);
    datapath_section(&mut md, dp);
    crate::xdp::section(&mut md, &all["xdp"]);
    crate::xdp_e2e::section(&mut md, &all["xdp_e2e"]);
    e2e_section(&mut md, e2e);
    control_section(&mut md, e2e);
    crate::lifecycle::section(&mut md, &all["lifecycle"]);
    crate::socklb::section(&mut md, &all["socklb"]);
    crate::forward::section(&mut md, &all["forward"]);
    md.push_str(NOTES);
    md
}

/// Largest scale of the end-to-end run.
fn largest_e2e(e2e: &Value) -> Option<&Value> {
    e2e_scales(e2e)
        .into_iter()
        .max_by_key(|s| s["services"].as_u64().unwrap_or(0))
}

#[expect(clippy::too_many_lines, reason = "one table, row by row")]
fn targets(md: &mut String, dp: &Value, e2e: &Value) {
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | measured | |\n|---|---|---|");
    if let Some(scale) = largest_e2e(e2e) {
        let n = scale["services"].as_u64().unwrap_or(0);
        for family in ["ipv4", "ipv6"] {
            let direct = e2e_median(scale, "direct", family, "conn_per_s");
            let lb = e2e_median(scale, "lb", family, "conn_per_s");
            let nft = e2e_median(scale, "nftables", family, "conn_per_s");
            let ipt = e2e_median(scale, "iptables", family, "conn_per_s");
            let r = ratio(lb, direct);
            let _ = writeln!(
                md,
                "| new connections/s through a VIP ≥ 0.95× direct, {family}, {} Services | \
                 lb {}× direct (nftables {}×, iptables {}×); lb = {}× nftables, {}× iptables | {} |",
                scale_name(n),
                num(r, 2),
                num(ratio(nft, direct), 2),
                num(ratio(ipt, direct), 2),
                num(ratio(lb, nft), 2),
                num(ratio(lb, ipt), 2),
                verdict(r.map(|r| r >= 0.95)),
            );
        }
    }
    let scales = datapath_scales(dp);
    if let (Some(&first), Some(&last)) = (scales.first(), scales.last()) {
        let mut worst_ratio: Option<(f64, String)> = None;
        let mut worst_flat: Option<(f64, String)> = None;
        for family in ["ipv4", "ipv6"] {
            for proto in ["tcp", "udp"] {
                for (case, floor_case) in [
                    ("established", "floor"),
                    ("reply", "floor"),
                    ("miss", "floor"),
                    ("first_single", "floor_single"),
                ] {
                    for &n in &scales {
                        let cost = datapath_ns(dp, n, family, proto, case);
                        let floor = datapath_ns(dp, n, family, proto, floor_case);
                        if let Some(r) = ratio(cost, floor)
                            && worst_ratio.as_ref().is_none_or(|(w, _)| r > *w)
                        {
                            worst_ratio =
                                Some((r, format!("{case} {family}/{proto} at {}", scale_name(n))));
                        }
                    }
                    let base = datapath_ns(dp, first, family, proto, case);
                    for &n in &scales {
                        if let Some(r) = ratio(datapath_ns(dp, n, family, proto, case), base) {
                            let dev = (r - 1.0).abs();
                            if worst_flat.as_ref().is_none_or(|(w, _)| dev > *w) {
                                worst_flat = Some((
                                    dev,
                                    format!(
                                        "{case} {family}/{proto}: {:+.0}% at {}",
                                        (r - 1.0) * 100.0,
                                        scale_name(n)
                                    ),
                                ));
                            }
                        }
                    }
                }
            }
        }
        let established = |family: &str| {
            ratio(
                datapath_ns(dp, last, family, "tcp", "established"),
                datapath_ns(dp, last, family, "tcp", "floor"),
            )
        };
        let _ = writeln!(
            md,
            "| per-packet cost within 2× the empty program | established TCP at {}: {}× (v4), {}× (v6); worst case: {}× ({}) | {} |",
            scale_name(last),
            num(established("ipv4"), 2),
            num(established("ipv6"), 2),
            num(worst_ratio.as_ref().map(|w| w.0), 2),
            worst_ratio.as_ref().map_or("", |w| w.1.as_str()),
            verdict(worst_ratio.as_ref().map(|w| w.0 <= 2.0)),
        );
        let _ = writeln!(
            md,
            "| per-packet cost flat (±10%) from {} to {} Services | largest deviation: {} | {} |",
            scale_name(first),
            scale_name(last),
            worst_flat.as_ref().map_or("–", |w| w.1.as_str()),
            verdict(worst_flat.as_ref().map(|w| w.0 <= 0.10)),
        );
    }
    let largest_cp = e2e_scales(e2e)
        .into_iter()
        .filter(|s| s["control"]["lb"]["cold_start"].is_object())
        .max_by_key(|s| s["services"].as_u64().unwrap_or(0));
    if let Some(scale) = largest_cp {
        let n = scale["services"].as_u64().unwrap_or(0);
        let lb = &scale["control"]["lb"];
        let kp = &scale["control"]["kube_proxy"];
        let cold_ms = lb["cold_start"]["start_to_maps_written_ms"].as_f64();
        let load = |c: &str| {
            let v4 = kp[c]["ipv4"]["load_ms"].as_f64();
            let v6 = kp[c]["ipv6"]["load_ms"].as_f64();
            v4.zip(v6).map(|(a, b)| (a + b) / 1000.0)
        };
        let _ = writeln!(
            md,
            "| {} Services × 10 endpoints programmed from cold < 1 s | {} s from agent start to maps written (the sync itself {} s); `nft -f` {} s, `iptables-restore` {} s (both families) | {} |",
            scale_name(n),
            num(cold_ms.map(|v| v / 1000.0), 2),
            num(lb["cold_start"]["sync_ms"].as_f64().map(|v| v / 1000.0), 3),
            num(load("nftables"), 1),
            num(load("iptables"), 1),
            verdict(cold_ms.map(|v| v < 1000.0)),
        );
        let change = &lb["endpoint_change"];
        let p99 = change["rename_to_maps_ms"]["p99"].as_f64();
        let sync_p99 = change["sync_ms"]["p99"].as_f64();
        let _ = writeln!(
            md,
            "| one endpoint change < 10 ms at p99 ({} Services) | file rename → maps: p99 {} ms (p50 {} ms: inotify wake-up, re-reading the changed file, the sync); the sync itself: p99 {} ms | {} (sync), {} (file to maps) |",
            scale_name(n),
            num(p99, 1),
            num(change["rename_to_maps_ms"]["p50"].as_f64(), 1),
            num(sync_p99, 2),
            verdict(sync_p99.map(|v| v < 10.0)),
            verdict(p99.map(|v| v < 10.0)),
        );
        let hwm = lb["vmhwm_kib"].as_f64().map(|k| k / 1024.0);
        let _ = writeln!(
            md,
            "| agent memory < 150 MiB ({} Services) | peak RSS (VmHWM) {} MiB | {} |",
            scale_name(n),
            num(hwm, 1),
            verdict(hwm.map(|m| m < 150.0)),
        );
    }
    md.push('\n');
}

fn datapath_section(md: &mut String, dp: &Value) {
    if dp.is_null() {
        return;
    }
    let _ = writeln!(md, "## Per-packet cost (`BPF_PROG_TEST_RUN`)\n");
    let _ = writeln!(
        md,
        "ns/packet, kernel-timed, median over {} rounds [min–max]. `floor` is the empty TC \
         program `lb_floor` on the same frame. `established`, `reply`, `miss`: one frame run \
         {} times in one call (mirror Services keep every repeat on the named path; the \
         verdict counters are checked). `first`: the first packet of a flow, one call per \
         fresh flow ({} flows per round), next to the floor and the established path \
         measured the same way (`… 1×`: single runs include the kernel's timer overhead). \
         Services are dual-stack with 10 endpoints each; the measured one is the last.\n",
        dp["rounds"], dp["repeat"], dp["single_run_flows"],
    );
    if let Some(programs) = dp["programs"].as_object() {
        for (name, info) in programs {
            let _ = writeln!(
                md,
                "- `{name}`: {} xlated instructions, {} bytes JITed, {} instructions processed by the verifier",
                info["xlated_insns"], info["jited_bytes"], info["verified_insns"]
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "| Services | family | L4 | floor | established | reply | miss | est./floor | floor 1× | first 1× | est. 1× | first/floor 1× |"
    );
    let _ = writeln!(
        md,
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let rows = dp["results"].as_array().cloned().unwrap_or_default();
    let cell = |n: u64, family: &str, proto: &str, case: &str| {
        rows.iter()
            .find(|r| {
                r["services"] == n
                    && r["family"] == family
                    && r["proto"] == proto
                    && r["case"] == case
            })
            .map_or_else(
                || "–".to_owned(),
                |r| {
                    let mut text = spread(&r["ns"], 1);
                    if r["path_ok"] == false {
                        text.push_str(" ⚠");
                    }
                    text
                },
            )
    };
    for n in datapath_scales(dp) {
        for family in ["ipv4", "ipv6"] {
            for proto in ["tcp", "udp"] {
                let get = |case| datapath_ns(dp, n, family, proto, case);
                let _ = writeln!(
                    md,
                    "| {} | {family} | {proto} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    scale_name(n),
                    cell(n, family, proto, "floor"),
                    cell(n, family, proto, "established"),
                    cell(n, family, proto, "reply"),
                    cell(n, family, proto, "miss"),
                    num(ratio(get("established"), get("floor")), 2),
                    cell(n, family, proto, "floor_single"),
                    cell(n, family, proto, "first_single"),
                    cell(n, family, proto, "established_single"),
                    num(ratio(get("first_single"), get("floor_single")), 2),
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\n⚠ marks a case where not every run took the expected path (see the JSON).\n\n\
         ![per-packet cost vs number of Services]({DATAPATH_SVG})\n"
    );
}

fn e2e_section(md: &mut String, e2e: &Value) {
    let scales = e2e_scales(e2e);
    if scales.is_empty() {
        return;
    }
    let settings = &e2e["settings"];
    let _ = writeln!(md, "## End to end (veth topology)\n");
    let _ = writeln!(
        md,
        "Client → node → backend over veth pairs, every contender in its own node namespace \
         (see `lb-bench/src/topo.rs`), nginx (1 worker) and iperf3 in the backend; wrk and \
         iperf3 in the client. {} rounds; per round and test the contenders run in rotated \
         order, netfilter conntrack is flushed before every measurement. `conn/s`: wrk, 1 \
         thread, {} connections, `Connection: close`, {} s (one request per TCP \
         connection). `latency`: wrk, 1 kept-alive connection, {} s, p50/p99 µs. `bulk`: one \
         iperf3 TCP stream, {} s. Ratios are to direct-to-backend in the same round set.\n",
        settings["rounds"],
        settings["connections"],
        settings["conn_secs"],
        settings["latency_secs"],
        settings["bulk_secs"],
    );
    for family in ["ipv4", "ipv6"] {
        let _ = writeln!(
            md,
            "### {}\n",
            if family == "ipv4" { "IPv4" } else { "IPv6" }
        );
        let _ = writeln!(
            md,
            "| Services | contender | conn/s | × direct | latency p50 µs | latency p99 µs | bulk Gbit/s |"
        );
        let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|");
        for scale in &scales {
            let n = scale["services"].as_u64().unwrap_or(0);
            let direct = e2e_median(scale, "direct", family, "conn_per_s");
            for contender in ["direct", "lb", "nftables", "iptables"] {
                let get = |metric, decimals| {
                    e2e_metric(scale, contender, family, metric)
                        .map_or_else(|| "–".to_owned(), |row| spread(&row["summary"], decimals))
                };
                let _ = writeln!(
                    md,
                    "| {} | {contender} | {} | {} | {} | {} | {} |",
                    scale_name(n),
                    get("conn_per_s", 0),
                    num(
                        ratio(e2e_median(scale, contender, family, "conn_per_s"), direct),
                        2
                    ),
                    get("latency_p50_us", 0),
                    get("latency_p99_us", 0),
                    get("bulk_gbit_s", 1),
                );
            }
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "![new connections/s vs number of Services]({E2E_SVG})\n"
    );
}

fn control_section(md: &mut String, e2e: &Value) {
    let scales = e2e_scales(e2e);
    if scales.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Control plane\n");
    let _ = writeln!(
        md,
        "`lb agent --source file:DIR` on a fresh pin path, DIR holding N dual-stack Services × \
         10 endpoints (JSON `kind: List` files of 500 Services). Cold start: agent start → the \
         `synced` log line (maps written; load and attach included). Endpoint change: one \
         endpoint address of one Service rewritten (temporary file + rename), {} times at \
         random phases; `rename → maps` is until the agent's `synced` line (includes the file \
         source's wake-up and its re-read of the changed file), `sync` is the agent's own \
         `millis=` (model + diff + map writes). Memory: `VmHWM` of the agent after all of it; \
         BPF maps: the kernel memory (`memlock`) of the maps it holds. \
         kube-proxy: `nft -f` / `iptables-restore` of the equivalent rules into an empty \
         namespace, IPv4 + IPv6.\n",
        e2e["settings"]["changes"],
    );
    // Older results have no load + attach time: no column then.
    let attach = scales
        .iter()
        .any(|s| s["control"]["lb"]["cold_start"]["start_to_attached_ms"].is_number());
    // Older results have no kernel memory of the maps either.
    let maps = scales
        .iter()
        .any(|s| s["control"]["lb"]["bpf_maps_kib"].is_number());
    let _ = writeln!(
        md,
        "| Services | lb cold start ms |{} lb sync ms | change rename→maps p50 / p99 ms | change sync p50 / p99 ms | lb VmHWM MiB |{} nft -f v4 + v6 s | iptables-restore v4 + v6 s |",
        if attach {
            " of which load + attach ms |"
        } else {
            ""
        },
        if maps { " BPF maps MiB (kernel) |" } else { "" }
    );
    let _ = writeln!(
        md,
        "|---:|---:|{}---:|---:|---:|---:|{}---:|---:|",
        if attach { "---:|" } else { "" },
        if maps { "---:|" } else { "" }
    );
    for scale in &scales {
        let n = scale["services"].as_u64().unwrap_or(0);
        let lb = &scale["control"]["lb"];
        let kp = &scale["control"]["kube_proxy"];
        let change = &lb["endpoint_change"];
        let load = |c: &str| {
            format!(
                "{} + {}",
                num(kp[c]["ipv4"]["load_ms"].as_f64().map(|v| v / 1000.0), 2),
                num(kp[c]["ipv6"]["load_ms"].as_f64().map(|v| v / 1000.0), 2)
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} |{} {} | {} / {} | {} / {} | {} |{} {} | {} |",
            scale_name(n),
            num(lb["cold_start"]["start_to_maps_written_ms"].as_f64(), 0),
            if attach {
                format!(
                    " {} |",
                    num(lb["cold_start"]["start_to_attached_ms"].as_f64(), 0)
                )
            } else {
                String::new()
            },
            num(lb["cold_start"]["sync_ms"].as_f64(), 1),
            num(change["rename_to_maps_ms"]["p50"].as_f64(), 1),
            num(change["rename_to_maps_ms"]["p99"].as_f64(), 1),
            num(change["sync_ms"]["p50"].as_f64(), 2),
            num(change["sync_ms"]["p99"].as_f64(), 2),
            num(lb["vmhwm_kib"].as_f64().map(|k| k / 1024.0), 1),
            if maps {
                format!(
                    " {} |",
                    num(lb["bpf_maps_kib"].as_f64().map(|k| k / 1024.0), 1)
                )
            } else {
                String::new()
            },
            load("nftables"),
            load("iptables"),
        );
    }
    md.push('\n');
}

// ---------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------

type Series = (String, Vec<(f64, f64)>);

/// A line plot over a log-scale x axis (Services), y linear from 0 or
/// (`log_y`) logarithmic. The x axis extends to the right of the data to
/// leave the legend room.
fn line_plot(
    path: &Path,
    title: &str,
    y_desc: &str,
    log_y: bool,
    series: &[Series],
) -> anyhow::Result<()> {
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max) * 40.0;
    let y_max = points().map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let y_min = points().map(|p| p.1).fold(f64::INFINITY, f64::min) / 1.5;
    anyhow::ensure!(y_max > 0.0, "nothing to plot");
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    if log_y {
        let chart = builder
            .build_cartesian_2d(
                (0.5f64..x_max).log_scale(),
                (y_min.max(1.0)..y_max).log_scale(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        draw_lines(chart, y_desc, series)?;
    } else {
        let chart = builder
            .build_cartesian_2d((0.5f64..x_max).log_scale(), 0f64..y_max)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        draw_lines(chart, y_desc, series)?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn draw_lines<'a, Y>(
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<LogCoord<f64>, Y>>,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("Services (log scale)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| scale_name(to_u64(*x)))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (index, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn datapath_plot(dp: &Value, path: &Path) -> anyhow::Result<()> {
    let scales = datapath_scales(dp);
    let mut series = Vec::new();
    for (family, proto, case, label) in [
        ("ipv4", "tcp", "established", "established v4 TCP"),
        ("ipv6", "tcp", "established", "established v6 TCP"),
        ("ipv4", "udp", "established", "established v4 UDP"),
        ("ipv4", "tcp", "reply", "reply v4 TCP"),
        ("ipv6", "tcp", "reply", "reply v6 TCP"),
        ("ipv4", "tcp", "miss", "miss v4"),
        ("ipv4", "tcp", "first_single", "first packet v4 TCP (1×)"),
        ("ipv6", "tcp", "first_single", "first packet v6 TCP (1×)"),
        ("ipv4", "tcp", "floor_single", "empty program (1×)"),
        ("ipv4", "tcp", "floor", "empty program"),
    ] {
        let points: Vec<(f64, f64)> = scales
            .iter()
            .filter_map(|&n| Some((as_f64(n), datapath_ns(dp, n, family, proto, case)?)))
            .collect();
        if !points.is_empty() {
            series.push((label.to_owned(), points));
        }
    }
    line_plot(
        path,
        "lb_tc per-packet cost (BPF_PROG_TEST_RUN)",
        "ns per packet (log scale)",
        true,
        &series,
    )
}

fn e2e_plot(e2e: &Value, path: &Path) -> anyhow::Result<()> {
    let scales = e2e_scales(e2e);
    let mut series = Vec::new();
    for family in ["ipv4", "ipv6"] {
        for contender in ["direct", "lb", "nftables", "iptables"] {
            let points: Vec<(f64, f64)> = scales
                .iter()
                .filter_map(|s| {
                    Some((
                        s["services"].as_f64()?,
                        e2e_median(s, contender, family, "conn_per_s")?,
                    ))
                })
                .collect();
            if !points.is_empty() {
                series.push((format!("{contender} {family}"), points));
            }
        }
    }
    line_plot(
        path,
        "New TCP connections per second (wrk, Connection: close)",
        "connections/s",
        false,
        &series,
    )
}

#[cfg(test)]
mod tests {
    use super::NOTES;

    /// A full run rewrites `docs/benchmarks.md` from its results and
    /// `notes.md`: prose edited in the published file by hand would be lost
    /// by the next run, so the published file must end with the notes as
    /// they are, and hand-taken measurements go to the journal.
    #[test]
    fn published_report_ends_with_the_notes_and_points_to_the_journal() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let published = std::fs::read_to_string(root.join("docs/benchmarks.md")).unwrap();
        assert!(
            published.ends_with(NOTES),
            "docs/benchmarks.md was edited by hand after its notes; edit \
             lb-bench/src/notes.md (prose) or docs/benchmarks-journal.md \
             (measurements taken by hand) and copy the notes over"
        );
        assert!(NOTES.contains("docs/benchmarks-journal.md"));
        assert!(root.join("docs/benchmarks-journal.md").is_file());
    }
}
