//! Full maps: which Services did not fit, counted per map, for the log,
//! `/metrics` and `/readyz`.
//!
//! The maps are sized at load time (`loader::Capacities`, the agent's
//! `--max-*` flags). A write into a full map fails; the maps writer then
//! leaves out what refers to it, so a frontend that does not fit stays out
//! whole while the others are served. This module turns those failures
//! into names: never a silent partial state.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use crate::{
    datapath::maps::MapsError,
    model::{Frontend, FrontendSpec},
    plan::Op,
};

/// How many Service names a log line or `/readyz` shows before "and N more".
const NAMES_SHOWN: usize = 50;

/// Capacity state shared with the HTTP server.
#[derive(Debug, Default)]
pub struct CapacityStatus {
    /// (map, entries it holds at most) of the maps sized by flags.
    pub capacities: Vec<(&'static str, u32)>,
    /// Writes refused because their map was full, per map, since start.
    pub full_total: BTreeMap<&'static str, u64>,
    /// Service ports (`namespace/name:port`) the last sync could not
    /// (fully) write because a map was full.
    pub unfit: Vec<String>,
    /// The maps the last sync found full.
    pub full_now: Vec<&'static str>,
}

impl CapacityStatus {
    /// Takes the shortfall of a sync: counts it, remembers its Services.
    pub(crate) fn record(&mut self, shortfall: &Shortfall, unfit: Vec<String>) {
        for (map, count) in &shortfall.full {
            *self.full_total.entry(map).or_default() += count;
        }
        self.full_now = shortfall.full.keys().copied().collect();
        self.unfit = unfit;
    }

    /// `/readyz` text for Services that did not fit; empty when all did.
    #[must_use]
    pub(crate) fn reason(&self) -> String {
        if self.unfit.is_empty() {
            return String::new();
        }
        format!(
            "{} Service ports did not fit in the maps (full: {}): {}",
            self.unfit.len(),
            self.full_now.join(", "),
            shown(&self.unfit)
        )
    }
}

/// The first [`NAMES_SHOWN`] names, comma-separated, and how many more.
fn shown(names: &[String]) -> String {
    let mut text = names
        .iter()
        .take(NAMES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_SHOWN {
        let _ = write!(text, " and {} more", names.len() - NAMES_SHOWN);
    }
    text
}

/// The writes of one sync that failed for want of room.
#[derive(Debug, Default)]
pub(crate) struct Shortfall {
    /// Writes refused by a full map, per map.
    full: BTreeMap<&'static str, u64>,
    /// Frontends with a write refused or left out.
    frontends: BTreeSet<Frontend>,
    /// `ClusterIP`s whose marker was refused.
    addrs: BTreeSet<IpAddr>,
    /// Rev-NAT ids whose source range was refused.
    rev_nat_ids: BTreeSet<u32>,
}

impl Shortfall {
    /// Takes a failed write; `false` when the failure is not about room
    /// (the caller reports those one by one).
    pub(crate) fn note(&mut self, op: &Op, error: &MapsError) -> bool {
        match error {
            MapsError::Full { map, .. } => *self.full.entry(map).or_default() += 1,
            MapsError::Unwritable { .. } => {}
            _ => return false,
        }
        match *op {
            Op::PutSlot { frontend, .. } | Op::PutRevNat { frontend, .. } => {
                self.frontends.insert(frontend);
            }
            Op::PutFrontend(ref write) => {
                self.frontends.insert(write.frontend);
            }
            Op::PutMarker { addr } => {
                self.addrs.insert(addr);
            }
            Op::PutSourceRange((id, _, _)) => {
                self.rev_nat_ids.insert(id);
            }
            // A backend that did not fit leaves out the slots that name
            // it: their frontends are counted there.
            _ => {}
        }
        true
    }

    /// No write failed for want of room.
    pub(crate) fn is_empty(&self) -> bool {
        self.full.is_empty() && self.frontends.is_empty()
    }

    /// Writes refused per map, with the flag that sizes it (for the log).
    pub(crate) fn full_maps(&self) -> String {
        self.full
            .iter()
            .map(|(map, count)| format!("{map}={count} ({})", flag_of(map)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The Service ports concerned, sorted: `namespace/name:port` (the
    /// frontend itself when the model no longer has it).
    pub(crate) fn services(
        &self,
        desired: &BTreeMap<Frontend, FrontendSpec>,
        ops: &[Op],
    ) -> Vec<String> {
        if self.is_empty() && self.addrs.is_empty() && self.rev_nat_ids.is_empty() {
            // The common case, every sync: no walk over all frontends.
            return Vec::new();
        }
        let mut frontends = self.frontends.clone();
        if !self.addrs.is_empty() {
            frontends.extend(
                desired
                    .keys()
                    .filter(|frontend| self.addrs.contains(&frontend.addr)),
            );
        }
        if !self.rev_nat_ids.is_empty() {
            frontends.extend(ops.iter().filter_map(|op| match *op {
                Op::PutRevNat { id, frontend } if self.rev_nat_ids.contains(&id) => Some(frontend),
                Op::PutFrontend(ref write) if self.rev_nat_ids.contains(&write.rev_nat_id) => {
                    Some(write.frontend)
                }
                _ => None,
            }));
        }
        let names: BTreeSet<String> = frontends
            .iter()
            .map(|frontend| {
                desired
                    .get(frontend)
                    .map_or_else(|| frontend.to_string(), |spec| spec.service.to_string())
            })
            .collect();
        names.into_iter().collect()
    }

    /// Logs what did not fit, naming the Services.
    pub(crate) fn log(&self, unfit: &[String]) {
        tracing::error!(
            full = %self.full_maps(),
            services = unfit.len(),
            "maps full: {} Service ports did not fit and are not (fully) served: {}",
            unfit.len(),
            shown(unfit)
        );
    }
}

/// The `lb agent` flag that sizes MAP.
fn flag_of(map: &str) -> &'static str {
    use lb_common::map_names as n;
    match map {
        n::REVNAT4 | n::REVNAT6 => "--max-services",
        n::SERVICES4 | n::SERVICES6 => "--max-service-slots",
        n::BACKENDS4 | n::BACKENDS6 | n::ENDPOINTS4 | n::ENDPOINTS6 => "--max-backends",
        n::SRC_RANGES4 | n::SRC_RANGES6 => "fixed size",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lists_are_cut_with_a_count() {
        let names: Vec<String> = (0..NAMES_SHOWN + 3).map(|i| format!("ns/s{i}")).collect();
        let text = shown(&names);
        assert!(text.starts_with("ns/s0, ns/s1"));
        assert!(text.ends_with(" and 3 more"), "{text}");
        assert_eq!(shown(&names[..2]), "ns/s0, ns/s1");
    }

    #[test]
    fn reason_names_the_maps_and_services() {
        let mut status = CapacityStatus::default();
        let mut shortfall = Shortfall::default();
        shortfall.full.insert("LB4_RNAT_V2", 2);
        status.record(&shortfall, vec!["ns/a:http".into(), "ns/b:http".into()]);
        status.record(&shortfall, vec!["ns/a:http".into()]);
        assert_eq!(status.full_total["LB4_RNAT_V2"], 4);
        assert_eq!(
            status.reason(),
            "1 Service ports did not fit in the maps (full: LB4_RNAT_V2): ns/a:http"
        );
    }
}
