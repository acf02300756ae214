//! `/metrics`: the agent's state and the datapath's counters as Prometheus
//! text (names as kube-proxy's where it has one, `kubeproxy_` -> `lb_`).
//! What to show is decided here; the text itself (HELP, TYPE, label
//! escaping, the `_total`, `_bucket`, `_sum`, `_count` samples) is
//! prometheus-client's.

use std::{fmt, sync::Mutex};

use prometheus_client::{
    encoding::{
        EncodeCounterValue, EncodeGaugeValue, EncodeMetric, MetricEncoder, NoLabelSet,
        prometheus_text,
    },
    metrics::{MetricType, TypedMetric, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    agent::{Shared, lock},
    datapath::{
        capacity::CapacityStatus,
        maps::{Maps, named_count},
    },
    model::Frontend,
};

/// The `Content-Type` of the exposition (Prometheus text 0.0.4).
pub(super) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The exposition of one scrape. Never in the sync's way: the shared state
/// is locked only to copy the agent's own numbers, the agent's view of the
/// maps only to copy (frontend, id) pairs, and the maps are read through a
/// handle of the scrape's own (no lock) on a blocking thread, so a scrape
/// that walks conntrack does not hold up the agent's (single-threaded) loop.
pub(super) async fn metrics(shared: &Mutex<Shared>) -> String {
    let (agent, datapath, reader, xdp) = {
        let shared = lock(shared);
        (
            agent_metrics(&shared),
            shared.datapath.clone(),
            shared.maps_reader.clone(),
            (shared.xdp_devices.clone(), shared.pin_path.clone()),
        )
    };
    let datapath_part = tokio::task::spawn_blocking(move || {
        let mut registry = Registry::default();
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
        registry.register(
            "lb_map_entries",
            "Entries in each map the agent writes",
            ByLabel::gauges("map", map_entries),
        );
        if let Some(maps) = reader {
            datapath_metrics(&maps, &frontend_ids, &mut registry);
        }
        xdp_metrics(&xdp.0, xdp.1.as_deref(), &mut registry);
        text(&registry)
    })
    .await
    .unwrap_or_default();
    let mut out = text(&agent);
    out.push_str(&datapath_part);
    out
}

/// The Prometheus text of `registry`.
fn text(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String does not fail.
    let _ = prometheus_text::encode(&mut out, registry);
    out
}

/// Registers a counter; `name` without the `_total` its sample gets.
fn counter<N>(registry: &mut Registry, name: &str, help: &str, value: N)
where
    N: EncodeCounterValue + Send + Sync + fmt::Debug + 'static,
{
    registry.register(name, help, ConstCounter::new(value));
}

fn gauge<N>(registry: &mut Registry, name: &str, help: &str, value: N)
where
    N: EncodeGaugeValue + Send + Sync + fmt::Debug + 'static,
{
    registry.register(name, help, ConstGauge::new(value));
}

/// The agent's own counters, gauges and histograms. Help texts have no
/// final full stop: prometheus-client adds it.
fn agent_metrics(shared: &Shared) -> Registry {
    let mut registry = Registry::default();
    let r = &mut registry;
    gauge(
        r,
        "lb_ready",
        "1 once the first full state is in the maps",
        u64::from(shared.ready),
    );
    counter(
        r,
        "lb_sync",
        "Syncs that wrote the whole plan",
        shared.syncs,
    );
    counter(
        r,
        "lb_sync_errors",
        "Syncs with a failed map write",
        shared.sync_errors,
    );
    counter(
        r,
        "lb_sync_retries",
        "Syncs started by the retry timer after a sync that did not write everything",
        shared.sync_retries,
    );
    counter(
        r,
        "lb_resyncs",
        "Periodic resyncs (every map read back and compared)",
        shared.resyncs,
    );
    counter(
        r,
        "lb_map_drift_repairs",
        "Map writes made by resyncs because the maps differed from what the agent wrote",
        shared.drift_repairs,
    );
    counter(r, "lb_map_writes", "Map writes done", shared.map_writes);
    counter(
        r,
        "lb_map_write_errors",
        "Map writes that failed",
        shared.map_write_errors,
    );
    gauge(
        r,
        "lb_invalid_objects",
        "Objects currently rejected as invalid",
        shared.invalid_objects,
    );
    counter(
        r,
        "lb_invalid_objects_reported",
        "Invalid objects reported",
        shared.invalid_objects_reported,
    );
    gauge(
        r,
        "lb_sync_duration_seconds",
        "Duration of the last sync",
        shared.last_sync_seconds,
    );
    gauge(
        r,
        "lb_frontends",
        "Service frontends (VIP:port/proto) in the maps",
        shared.frontends,
    );
    gauge(r, "lb_backends", "Backends in the maps", shared.backends);
    // Histograms (names as kube-proxy's, `kubeproxy_` -> `lb_`).
    r.register(
        "lb_sync_proxy_rules_duration_seconds",
        "Time to turn a snapshot into map writes (model, diff, apply)",
        shared.sync_duration.clone(),
    );
    r.register(
        "lb_network_programming_duration_seconds",
        "From an EndpointSlice's last-change trigger time to its state in the maps",
        shared.network_programming.clone(),
    );
    capacity_metrics(&shared.capacity, r);
    registry
}

/// Map capacities, writes refused by full maps, Services left out.
fn capacity_metrics(status: &CapacityStatus, registry: &mut Registry) {
    registry.register(
        "lb_map_capacity",
        "Entries each map sized by a flag holds at most",
        ByLabel::gauges("map", status.capacities.iter().copied()),
    );
    registry.register(
        "lb_map_full",
        "Map writes refused because the map was full",
        ByLabel::counters("map", status.full_total.iter().map(|(m, n)| (*m, *n))),
    );
    gauge(
        registry,
        "lb_services_unfit",
        "Service ports the last sync could not (fully) write for a full map",
        status.unfit.len(),
    );
}

/// The XDP mode of each `--xdp-interfaces` device and the XDP program's
/// counters (none with `--xdp=off`).
fn xdp_metrics(
    devices: &[(String, crate::datapath::xdp::DeviceMode)],
    pin_path: Option<&std::path::Path>,
    registry: &mut Registry,
) {
    if devices.is_empty() {
        return;
    }
    registry.register(
        "lb_xdp_native",
        "1 where the XDP program runs in the driver, 0 where the driver refused it (--xdp=best-effort: TC only)",
        ByLabel::gauges(
            "device",
            devices.iter().map(|(name, mode)| {
                (
                    name.clone(),
                    u64::from(*mode == crate::datapath::xdp::DeviceMode::Native),
                )
            }),
        ),
    );
    if let Some(stats) = pin_path.and_then(crate::datapath::xdp::stats) {
        registry.register(
            "lb_xdp_packets",
            "Frames seen by the XDP program, by what it did (to_tc: left to TC unchanged)",
            ByLabel::counters("action", stats),
        );
    }
}

/// Counters read from the maps at scrape time.
fn datapath_metrics(maps: &Maps, frontend_ids: &[(Frontend, u32)], registry: &mut Registry) {
    if let Ok(reasons) = maps.reason_counts() {
        if let Some(drops) = named_count(&reasons, "drop_snat_exhausted") {
            counter(
                registry,
                "lb_snat_exhausted",
                "New flows dropped because every candidate SNAT port towards their backend was taken",
                drops,
            );
        }
        registry.register(
            "lb_datapath_packets",
            "Packets seen by the TC program, and calls the socket programs translated or refused (sock_*), by verdict reason",
            ByLabel::counters("reason", reasons),
        );
    }
    if let Ok(events) = maps.event_counts()
        && !events.is_empty()
    {
        registry.register(
            "lb_datapath_events",
            "What packets did beside their verdict, by event (snat_took_unconfirmed: a new flow with no free SNAT port took the tuple of a flow its client had not confirmed for a second, which ended)",
            ByLabel::counters("event", events),
        );
    }
    let stats: Vec<_> = frontend_ids
        .iter()
        .filter_map(|(frontend, id)| Some((*frontend, maps.service_stats(*id).ok()?)))
        .collect();
    registry.register(
        "lb_service_packets",
        "Packets translated towards a frontend",
        ByLabel::counters("frontend", stats.iter().map(|(f, s)| (f, s.packets))),
    );
    registry.register(
        "lb_service_bytes",
        "Bytes translated towards a frontend",
        ByLabel::counters("frontend", stats.iter().map(|(f, s)| (f, s.bytes))),
    );
    if let Ok((v4, v6)) = maps.conntrack_len() {
        registry.register(
            "lb_conntrack_entries",
            "Conntrack entries by family",
            ByLabel::gauges("family", [("ipv4", v4), ("ipv6", v6)]),
        );
    }
    if let Ok(unanswered) = maps.conntrack_unanswered_len() {
        gauge(
            registry,
            "lb_conntrack_unanswered_entries",
            "Conntrack entries of flows the backend has not answered yet (both families; \
             included in lb_conntrack_entries)",
            unanswered,
        );
    }
}

/// A metric with one label whose samples the scrape computed, written in
/// the order given (prometheus-client's `Family` keeps a hash map, and is
/// made for metrics updated in place, not read at scrape time).
#[derive(Debug)]
struct ByLabel<M> {
    label: &'static str,
    samples: Vec<(String, M)>,
}

impl<N> ByLabel<ConstGauge<N>> {
    fn gauges<V: ToString>(label: &'static str, samples: impl IntoIterator<Item = (V, N)>) -> Self {
        Self {
            label,
            samples: samples
                .into_iter()
                .map(|(value, n)| (value.to_string(), ConstGauge::new(n)))
                .collect(),
        }
    }
}

impl<N> ByLabel<ConstCounter<N>> {
    fn counters<V: ToString>(
        label: &'static str,
        samples: impl IntoIterator<Item = (V, N)>,
    ) -> Self {
        Self {
            label,
            samples: samples
                .into_iter()
                .map(|(value, n)| (value.to_string(), ConstCounter::new(n)))
                .collect(),
        }
    }
}

impl<M: EncodeMetric + TypedMetric> EncodeMetric for ByLabel<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        for (value, metric) in &self.samples {
            metric.encode(encoder.encode_family(&[(self.label, value.as_str())])?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

/// Upper bounds (seconds) of the histogram buckets: milliseconds (what a
/// sync takes) up to minutes (what a slow control plane takes).
const BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// A Prometheus histogram with the fixed [`BUCKETS`], a plain value in the
/// agent's state (prometheus-client's own shares its counts behind an `Arc`
/// and cannot be compared or reset by assignment).
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
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let counts = self.counts.unwrap_or_default();
        let in_buckets: u64 = counts.iter().sum();
        // Non-cumulative counts; the encoder sums them up.
        let buckets: Vec<(f64, u64)> = BUCKETS
            .into_iter()
            .zip(counts)
            .chain([(f64::INFINITY, self.count - in_buckets)])
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests;
