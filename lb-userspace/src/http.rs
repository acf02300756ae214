//! `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.x.
//!
//! Small on purpose: three GET routes, one response per connection.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{agent::Shared, maps::Maps};

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Mutex<Shared>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), handle(stream, &shared)).await;
                });
            }
            Err(error) => {
                tracing::warn!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, shared: &Mutex<Shared>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && !buf[..len].ends_with(b"\n\n") {
        if len == buf.len() {
            break;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let mut parts = request.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let (status, content_type, body) = if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        )
    } else {
        route(path, shared)
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

fn route(path: &str, shared: &Mutex<Shared>) -> (&'static str, &'static str, String) {
    let shared = shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match path {
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
        "/readyz" if shared.ready => ("200 OK", "text/plain", "ready\n".to_owned()),
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain",
            format!("not ready: {}\n", shared.not_ready_reason),
        ),
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics(&shared)),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    }
}

/// Prometheus text exposition.
fn metrics(shared: &Shared) -> String {
    let agent: [(&str, &str, &str, String); 10] = [
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
    // Frontend labels and occupancy are computed here, at scrape time, not
    // on every sync: both are O(all frontends).
    let (frontend_ids, map_entries) = shared.datapath.as_ref().map_or_else(
        || (Vec::new(), Vec::new()),
        |datapath| {
            let state = datapath
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let ids: Vec<(String, u32)> = state
                .frontends
                .iter()
                .map(|(frontend, fs)| (frontend.to_string(), fs.rev_nat_id))
                .collect();
            (ids, crate::agent::map_occupancy(&state))
        },
    );
    render_map_entries(&map_entries, &mut out);
    crate::capacity::render(&shared.capacity, &mut out);
    if let Some(maps) = &shared.maps {
        let maps = maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        datapath_metrics(&maps, &frontend_ids, &mut out);
    }
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
pub const BUCKETS: [f64; 18] = [
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
fn datapath_metrics(maps: &Maps, frontend_ids: &[(String, u32)], out: &mut String) {
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
