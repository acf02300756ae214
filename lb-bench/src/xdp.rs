//! The report's section on the XDP program's per-packet cost next to the
//! TC program's (`xdp.json`, written by `lb-userspace/examples/xdp_cost.rs`,
//! stage `xdp` of `cargo xtask bench`).

use std::fmt::Write as _;

use serde_json::Value;

/// The median over rounds of `pick` for `family`.
fn median(results: &[Value], family: &str, pick: impl Fn(&Value) -> Option<f64>) -> Option<f64> {
    let mut values: Vec<f64> = results
        .iter()
        .filter(|row| row["family"] == family)
        .filter_map(&pick)
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// Appends the section (nothing when the stage did not run).
pub fn section(md: &mut String, xdp: &Value) {
    let Some(results) = xdp["results"].as_array() else {
        return;
    };
    let _ = writeln!(
        md,
        "## XDP vs TC, per packet\n\n`BPF_PROG_TEST_RUN` single runs ({} flows x {} rounds; \
         median over rounds of the mean ns), `NodePort` TCP to a backend behind another node \
         (ETP=Cluster: SNAT + DNAT). The XDP number includes its FIB lookup, MAC rewrite and \
         devmap redirect; the TC one (`--forward=stack`) stops where the stack takes over, so \
         the stack's routing and the skb the XDP path never builds are in neither. Ratio: TC \
         / XDP, each net of its hook's empty program (> 1: XDP cheaper).\n",
        xdp["flows"], xdp["rounds"]
    );
    let _ = writeln!(
        md,
        "| family | case | TC ns | XDP ns | TC floor | XDP floor | TC/XDP net |\n|---|---|---|---|---|---|---|"
    );
    for family in ["v4", "v6"] {
        for case in ["new", "established", "reply"] {
            let get = |hook: &'static str, key: &'static str| {
                median(results, family, move |row| row["ns"][hook][key].as_f64())
            };
            let ratio = median(results, family, |row| {
                row["ns"]["ratio_tc_over_xdp"][case].as_f64()
            });
            let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
            let _ = writeln!(
                md,
                "| {family} | {case} | {} | {} | {} | {} | {} |",
                cell(get("tc", case)),
                cell(get("xdp", case)),
                cell(get("tc", "floor")),
                cell(get("xdp", "floor")),
                ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
            );
        }
    }
    md.push('\n');
}
