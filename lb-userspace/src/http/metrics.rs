//! Prometheus text exposition of the agent's state and the datapath's
//! counters (names as kube-proxy's where it has one, `kubeproxy_` -> `lb_`).

use std::{fmt::Write as _, sync::Mutex};

use crate::{
    agent::{Shared, lock},
    datapath::maps::Maps,
    model::Frontend,
};

/// Prometheus text exposition. Never in the sync's way: the shared state is
/// locked only to copy the agent's own numbers, the agent's view of the maps
/// only to copy (frontend, id) pairs, and the maps are read through a handle
/// of the scrape's own (no lock) on a blocking thread, so a scrape that walks
/// conntrack does not hold up the agent's (single-threaded) loop.
pub(super) async fn metrics(shared: &Mutex<Shared>) -> String {
    let (mut out, datapath, reader) = {
        let shared = lock(shared);
        (
            agent_metrics(&shared),
            shared.datapath.clone(),
            shared.maps_reader.clone(),
        )
    };
    let datapath_part = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        // Frontend labels and occupancy are computed here, at scrape time,
        // not on every sync: both are O(all frontends).
        let (frontend_ids, map_entries) = datapath.map_or_else(
            || (Vec::new(), Vec::new()),
            |datapath| {
                let state = lock(&datapath);
                let ids: Vec<(Frontend, u32)> = state
                    .frontends
                    .iter()
                    .map(|(frontend, fs)| (*frontend, fs.rev_nat_id))
                    .collect();
                (ids, crate::agent::map_occupancy(&state))
            },
        );
        render_map_entries(&map_entries, &mut out);
        if let Some(maps) = reader {
            datapath_metrics(&maps, &frontend_ids, &mut out);
        }
        out
    })
    .await
    .unwrap_or_default();
    out.push_str(&datapath_part);
    out
}

/// The agent's own counters, gauges and histograms.
fn agent_metrics(shared: &Shared) -> String {
    let agent: [(&str, &str, &str, String); 13] = [
        (
            "lb_ready",
            "gauge",
            "1 once the first full state is in the maps.",
            u8::from(shared.ready).to_string(),
        ),
        (
            "lb_sync_total",
            "counter",
            "Syncs that wrote the whole plan.",
            shared.syncs.to_string(),
        ),
        (
            "lb_sync_errors_total",
            "counter",
            "Syncs with a failed map write.",
            shared.sync_errors.to_string(),
        ),
        (
            "lb_sync_retries_total",
            "counter",
            "Syncs started by the retry timer after a sync that did not write everything.",
            shared.sync_retries.to_string(),
        ),
        (
            "lb_resyncs_total",
            "counter",
            "Periodic resyncs (every map read back and compared).",
            shared.resyncs.to_string(),
        ),
        (
            "lb_map_drift_repairs_total",
            "counter",
            "Map writes made by resyncs because the maps differed from what the agent wrote.",
            shared.drift_repairs.to_string(),
        ),
        (
            "lb_map_writes_total",
            "counter",
            "Map writes done.",
            shared.map_writes.to_string(),
        ),
        (
            "lb_map_write_errors_total",
            "counter",
            "Map writes that failed.",
            shared.map_write_errors.to_string(),
        ),
        (
            "lb_invalid_objects",
            "gauge",
            "Objects currently rejected as invalid.",
            shared.invalid_objects.to_string(),
        ),
        (
            "lb_invalid_objects_reported_total",
            "counter",
            "Invalid objects reported.",
            shared.invalid_objects_reported.to_string(),
        ),
        (
            "lb_sync_duration_seconds",
            "gauge",
            "Duration of the last sync.",
            shared.last_sync_seconds.to_string(),
        ),
        (
            "lb_frontends",
            "gauge",
            "Service frontends (VIP:port/proto) in the maps.",
            shared.frontends.to_string(),
        ),
        (
            "lb_backends",
            "gauge",
            "Backends in the maps.",
            shared.backends.to_string(),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in agent {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    latency_and_occupancy_metrics(shared, &mut out);
    crate::datapath::capacity::render(&shared.capacity, &mut out);
    out
}

/// Histograms (names as kube-proxy's, `kubeproxy_` -> `lb_`).
fn latency_and_occupancy_metrics(shared: &Shared, out: &mut String) {
    shared.sync_duration.render(
        "lb_sync_proxy_rules_duration_seconds",
        "Time to turn a snapshot into map writes (model, diff, apply).",
        out,
    );
    shared.network_programming.render(
        "lb_network_programming_duration_seconds",
        "From an EndpointSlice's last-change trigger time to its state in the maps.",
        out,
    );
}

/// Entries per map the agent writes (conntrack is read with the counters).
fn render_map_entries(map_entries: &[(&'static str, usize)], out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP lb_map_entries Entries in each map the agent writes.\n# TYPE lb_map_entries gauge"
    );
    for (map, entries) in map_entries {
        let _ = writeln!(out, "lb_map_entries{{map=\"{map}\"}} {entries}");
    }
}

/// Upper bounds (seconds) of the histogram buckets: milliseconds (what a
/// sync takes) up to minutes (what a slow control plane takes).
const BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// A Prometheus histogram with the fixed [`BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); `None` until the first.
    counts: Option<[u64; BUCKETS.len()]>,
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Records one value (seconds).
    pub fn observe(&mut self, value: f64) {
        let counts = self.counts.get_or_insert([0; BUCKETS.len()]);
        if let Some(bucket) = BUCKETS.iter().position(|&bound| value <= bound) {
            counts[bucket] += 1;
        }
        self.count += 1;
        self.sum += value;
    }

    /// Observations so far.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Appends the exposition of this histogram as NAME.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let counts = self.counts.unwrap_or_default();
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

/// Counters read from the maps at scrape time.
fn datapath_metrics(maps: &Maps, frontend_ids: &[(Frontend, u32)], out: &mut String) {
    if let Ok(reasons) = maps.reason_counts() {
        let _ = writeln!(
            out,
            "# HELP lb_datapath_packets_total Packets seen by the TC program, by verdict reason.\n# TYPE lb_datapath_packets_total counter"
        );
        for (reason, count) in reasons {
            let _ = writeln!(
                out,
                "lb_datapath_packets_total{{reason=\"{reason}\"}} {count}"
            );
        }
    }
    let mut packets = String::new();
    let mut bytes = String::new();
    for (frontend, id) in frontend_ids {
        if let Ok(stats) = maps.service_stats(*id) {
            let _ = writeln!(
                packets,
                "lb_service_packets_total{{frontend=\"{frontend}\"}} {}",
                stats.packets
            );
            let _ = writeln!(
                bytes,
                "lb_service_bytes_total{{frontend=\"{frontend}\"}} {}",
                stats.bytes
            );
        }
    }
    let _ = write!(
        out,
        "# HELP lb_service_packets_total Packets translated towards a frontend.\n# TYPE lb_service_packets_total counter\n{packets}"
    );
    let _ = write!(
        out,
        "# HELP lb_service_bytes_total Bytes translated towards a frontend.\n# TYPE lb_service_bytes_total counter\n{bytes}"
    );
    if let Ok((v4, v6)) = maps.conntrack_len() {
        let _ = writeln!(
            out,
            "# HELP lb_conntrack_entries Conntrack entries by family.\n# TYPE lb_conntrack_entries gauge\nlb_conntrack_entries{{family=\"ipv4\"}} {v4}\nlb_conntrack_entries{{family=\"ipv6\"}} {v6}"
        );
    }
}
