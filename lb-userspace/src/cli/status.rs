//! `lb status`: which devices carry the programs (TC ingress/egress, XDP
//! and its mode) and the XDP program's counters, from the pins.

use std::{collections::BTreeMap, path::Path};

use lb_userspace::datapath::{loader, xdp};
use serde_json::json;

/// Prints one line per device with a pinned link, then the XDP counters.
pub fn print(json_out: bool, pin_path: &Path) -> anyhow::Result<()> {
    if !pin_path.is_dir() {
        anyhow::bail!(
            "nothing pinned under {} (is the agent running there?)",
            pin_path.display()
        );
    }
    let mut devices: BTreeMap<String, (Vec<&str>, &str)> = BTreeMap::new();
    for (dir, hook) in [("links", "ingress"), ("links-egress", "egress")] {
        for name in pinned_names(&pin_path.join(dir)) {
            devices
                .entry(name)
                .or_insert((Vec::new(), "off"))
                .0
                .push(hook);
        }
    }
    for name in xdp::attached(pin_path) {
        // Only native mode is ever attached (see `datapath::xdp`).
        devices.entry(name).or_insert((Vec::new(), "off")).1 = "native";
    }
    let stats = xdp::stats(pin_path).unwrap_or_default();
    if json_out {
        let list: Vec<_> = devices
            .iter()
            .map(|(name, (tc, mode))| {
                json!({
                    "device": name,
                    "present": loader::if_index(name).is_some(),
                    "tc": tc,
                    "xdp": mode,
                })
            })
            .collect();
        let counters: BTreeMap<_, _> = stats.into_iter().collect();
        println!("{}", json!({ "devices": list, "xdp_packets": counters }));
        return Ok(());
    }
    if devices.is_empty() {
        println!("no links pinned under {}", pin_path.display());
    }
    for (name, (tc, mode)) in &devices {
        let gone = if loader::if_index(name).is_some() {
            ""
        } else {
            " (device gone)"
        };
        let tc = if tc.is_empty() {
            "-".to_owned()
        } else {
            tc.join("+")
        };
        println!("{name:<16} tc={tc:<16} xdp={mode}{gone}");
    }
    if !stats.is_empty() {
        let line: Vec<String> = stats.iter().map(|(n, c)| format!("{n}={c}")).collect();
        println!("xdp packets: {}", line.join(" "));
    }
    Ok(())
}

fn pinned_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
