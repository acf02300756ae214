//! What the agent shows of itself: the state shared with the HTTP server
//! (readiness, counters, histograms) and the map occupancy it reports.

use std::sync::{Arc, Mutex};

use crate::{
    datapath::{loader::Attachment, maps::Maps},
    http::Histogram,
    plan::DatapathState,
};

/// Agent state shared with the HTTP server.
#[derive(Default)]
pub struct Shared {
    /// The first full state has been written.
    pub ready: bool,
    /// Why the agent is not ready (shown by /readyz).
    pub not_ready_reason: String,
    /// Successful syncs.
    pub syncs: u64,
    /// Syncs with at least one failed map write.
    pub sync_errors: u64,
    /// Syncs the retry timer started (after an incomplete sync).
    pub sync_retries: u64,
    /// Periodic resyncs that read every map back.
    pub resyncs: u64,
    /// Map writes a resync made because the maps differed from what the
    /// agent had written (drift repaired).
    pub drift_repairs: u64,
    /// Map writes done.
    pub map_writes: u64,
    /// Map writes that failed.
    pub map_write_errors: u64,
    /// Objects currently rejected as invalid.
    pub invalid_objects: u64,
    /// Rejections reported since start.
    pub invalid_objects_reported: u64,
    /// Duration of the last sync.
    pub last_sync_seconds: f64,
    /// Frontends and backends last written.
    pub frontends: usize,
    /// Backends last written.
    pub backends: usize,
    /// Map capacities, writes refused by full maps, Services left out.
    pub capacity: crate::datapath::capacity::CapacityStatus,
    /// Attachments by interface.
    pub attachments: Vec<(String, Attachment)>,
    /// The XDP mode of each `--xdp-interfaces` device (empty: `--xdp=off`).
    pub xdp_devices: Vec<(String, crate::datapath::xdp::DeviceMode)>,
    /// The pin directory (the XDP counters are read from it on scrape).
    pub pin_path: Option<std::path::PathBuf>,
    /// A read-only handle on the pinned maps of the scrapes' own (datapath
    /// counters), so that a scrape never waits for, nor holds up, a sync.
    pub maps_reader: Option<Arc<Maps>>,
    /// What the agent wrote (frontends with their rev-NAT id for
    /// per-service counters, and map occupancy, on scrape).
    pub datapath: Option<Arc<Mutex<DatapathState>>>,
    /// Sync durations.
    pub sync_duration: Histogram,
    /// `EndpointSlice` trigger time -> maps written.
    pub network_programming: Histogram,
}

/// Entries per map, from what the agent wrote.
#[must_use]
pub fn map_occupancy(state: &DatapathState) -> Vec<(&'static str, usize)> {
    use lb_common::map_names;
    let (mut svc4, mut svc6, mut be4, mut be6, mut rnat4, mut rnat6) = (0, 0, 0, 0, 0, 0);
    for (frontend, fs) in &state.frontends {
        // Slot 0 (the frontend, with its first slots) plus one entry per
        // backend slot after those.
        let entries = 1 + fs
            .slots
            .len()
            .saturating_sub(lb_common::limits::INLINE_SLOTS);
        if frontend.addr.is_ipv4() {
            svc4 += entries;
        } else {
            svc6 += entries;
        }
    }
    for marker in &state.markers {
        if marker.is_ipv4() {
            svc4 += 1;
        } else {
            svc6 += 1;
        }
    }
    for backend in state.backends.values() {
        if backend.key.addr.is_ipv4() {
            be4 += 1;
        } else {
            be6 += 1;
        }
    }
    for (addr, _) in state.rev_nats.values() {
        if addr.is_ipv4() {
            rnat4 += 1;
        } else {
            rnat6 += 1;
        }
    }
    vec![
        (map_names::SERVICES4, svc4),
        (map_names::SERVICES6, svc6),
        (map_names::BACKENDS4, be4),
        (map_names::BACKENDS6, be6),
        (map_names::REVNAT4, rnat4),
        (map_names::REVNAT6, rnat6),
    ]
}

#[cfg(test)]
mod tests {
    use super::map_occupancy;
    use crate::model::{Frontend, Protocol};
    use crate::plan::{DatapathState, FrontendState};

    /// A frontend is one service entry with its first `INLINE_SLOTS` slots,
    /// plus one per slot after them; a marker is one more.
    #[test]
    fn service_entries_count_only_the_slots_past_the_inline_ones() {
        let inline = lb_common::limits::INLINE_SLOTS;
        let frontend = |last: u8| Frontend {
            addr: std::net::IpAddr::from([198, 19, 0, last]),
            port: 80,
            proto: Protocol::Tcp,
        };
        let with_slots = |count: usize| FrontendState {
            slots: vec![1; count],
            ..FrontendState::default()
        };
        let mut state = DatapathState::default();
        state.frontends.insert(frontend(1), with_slots(2));
        state.frontends.insert(frontend(2), with_slots(inline + 2));
        state.markers.insert(frontend(1).addr);
        let services4 = map_occupancy(&state)
            .into_iter()
            .find(|(map, _)| *map == lb_common::map_names::SERVICES4)
            .map(|(_, entries)| entries);
        assert_eq!(services4, Some(1 + (1 + 2) + 1));
    }
}
