//! Which endpoints a frontend sends new flows to (kube-proxy's
//! `CategorizeEndpoints`): traffic policy, zone hints, readiness, and the
//! terminating or not ready ones that only drain.

use std::collections::{BTreeSet, HashMap};

use super::endpoints::{Conditions, SliceEndpoints};
use super::service::ParsedService;
use super::{Backend, FrontendKind};

/// One endpoint as a candidate backend of one Service port.
#[derive(Clone, Copy)]
struct Candidate<'a> {
    backend: Backend,
    conditions: Conditions,
    zones: &'a [String],
    nodes: &'a [String],
}

/// The endpoints of one frontend.
#[derive(Clone, Default)]
pub(super) struct Selection {
    pub(super) backends: Vec<Backend>,
    pub(super) terminating: Vec<Backend>,
    pub(super) not_ready: Vec<Backend>,
    pub(super) not_serving: Vec<Backend>,
    /// See [`FrontendSpec::no_local_endpoints`](super::FrontendSpec).
    pub(super) no_local_endpoints: bool,
}

/// Picks the endpoints of one Service's frontends, each (port, family,
/// policy) once.
pub(super) struct Selector<'a> {
    slices: &'a [&'a SliceEndpoints],
    parsed: &'a ParsedService,
    /// This node's name; empty: no endpoint is local.
    node_name: &'a str,
    /// This node's zone, if known.
    zone: Option<&'a str>,
    /// (port index, IPv4, local policy) -> selection.
    cache: HashMap<(usize, bool, bool), Selection>,
}

impl<'a> Selector<'a> {
    /// `node_name` empty: no endpoint is local.
    pub(super) fn new(
        slices: &'a [&'a SliceEndpoints],
        parsed: &'a ParsedService,
        node_name: &'a str,
        zone: Option<&'a str>,
    ) -> Self {
        Self {
            slices,
            parsed,
            node_name,
            zone,
            cache: HashMap::new(),
        }
    }

    pub(super) fn select(&mut self, port: usize, ipv4: bool, kind: FrontendKind) -> Selection {
        let policies = self.parsed.policies;
        let local = if kind.is_external() {
            policies.external_local
        } else {
            policies.internal_local
        };
        if let Some(selection) = self.cache.get(&(port, ipv4, local)) {
            return selection.clone();
        }
        // Hints only narrow the Cluster policy's endpoints; they are
        // used whenever they are there, whatever the Service asks for
        // (kube-proxy reads only the hints, which the EndpointSlice
        // controller writes for `trafficDistribution` or topology mode).
        let here = (!local).then_some(Here {
            node: self.node_name,
            zone: self.zone,
        });
        let selection = select(&self.candidates(port, ipv4), local, here);
        self.cache.insert((port, ipv4, local), selection.clone());
        selection
    }

    /// Every endpoint of the port's family, on the target port its own
    /// slice resolved for this port; one endpoint (address and port)
    /// listed twice, by two slices during a move or by two pods sharing a
    /// reused address, counts once: as a non-terminating listing if there
    /// is one (kube-proxy's `addEndpoints`: a non-terminating listing
    /// replaces an earlier one, a terminating one never does), and of
    /// several non-terminating ones as a ready one if there is one, then a
    /// serving one. (kube-proxy keeps the one of the slice it reads last,
    /// in Go's map order, "undefined" says its comment; its
    /// `TestEndpointsMapFromESC` expects the ready listing, "if an endpoint
    /// is marked ready, we add it", and a slice caught mid-move lists the
    /// pod as it was, so the ready listing is the one the pod has now or
    /// had last.)
    fn candidates(&self, port: usize, ipv4: bool) -> Vec<Candidate<'a>> {
        let port = &self.parsed.ports[port];
        let mut candidates: Vec<Candidate<'a>> = self
            .slices
            .iter()
            .filter(|slice| slice.ipv4 == ipv4)
            .filter_map(|slice| {
                let target = slice
                    .ports
                    .iter()
                    .find(|(name, proto, _)| **name == *port.name && *proto == port.proto)
                    .map(|(_, _, target)| *target)?;
                let node_name = self.node_name;
                Some(slice.endpoints().map(move |endpoint| Candidate {
                    backend: Backend {
                        addr: endpoint.addr,
                        port: target,
                        node_local: !node_name.is_empty() && endpoint.node_name == Some(node_name),
                    },
                    conditions: endpoint.conditions,
                    zones: endpoint.zones,
                    nodes: endpoint.nodes,
                }))
            })
            .flatten()
            .collect();
        // Stable: of two listings alike, the first listed stays.
        candidates.sort_by_key(|candidate| {
            (
                candidate.backend.addr,
                candidate.backend.port,
                candidate.conditions.terminating,
                !candidate.conditions.ready,
                !candidate.conditions.serving,
            )
        });
        candidates.dedup_by(|later, kept| {
            later.backend.addr == kept.backend.addr && later.backend.port == kept.backend.port
        });
        candidates
    }

    /// Distinct addresses of this node's ready endpoints over every port
    /// of the Service, per family (IPv4, IPv6), as kube-proxy's
    /// `LocalReadyEndpoints` counts them in each family's proxier.
    pub(super) fn local_ready_endpoints(&self) -> [usize; 2] {
        let mut counts = [0; 2];
        for ipv4 in self.parsed.families.iter() {
            let mut addrs = BTreeSet::new();
            for port in 0..self.parsed.ports.len() {
                addrs.extend(
                    self.candidates(port, ipv4)
                        .iter()
                        .filter(|candidate| {
                            candidate.backend.node_local && candidate.conditions.ready
                        })
                        .map(|candidate| candidate.backend.addr),
                );
            }
            counts[usize::from(!ipv4)] = addrs.len();
        }
        counts
    }
}

/// Where this node is, for topology hints.
#[derive(Clone, Copy)]
struct Here<'a> {
    /// Empty: unknown.
    node: &'a str,
    zone: Option<&'a str>,
}

/// kube-proxy's `CategorizeEndpoints` for one frontend: the policy's
/// endpoints (all, or this node's), narrowed by topology hints when `here`
/// is given (`topologyModeFromHints`); of those the ready ones, or when none
/// is ready (anywhere in the policy's set) the serving and terminating ones.
fn select(candidates: &[Candidate<'_>], local: bool, here: Option<Here<'_>>) -> Selection {
    let pool: Vec<&Candidate<'_>> = candidates
        .iter()
        .filter(|candidate| !local || candidate.backend.node_local)
        .collect();
    let ready: Vec<&Candidate<'_>> = pool
        .iter()
        .copied()
        .filter(|candidate| candidate.conditions.ready)
        .collect();
    let close = here.map_or_else(Vec::new, |here| close_by_hints(&ready, here));
    let chosen = if !close.is_empty() {
        close
    } else if !ready.is_empty() {
        ready
    } else {
        pool.iter()
            .copied()
            .filter(|candidate| candidate.conditions.serving && candidate.conditions.terminating)
            .collect()
    };
    let backends = sorted_unique(chosen.iter().map(|candidate| candidate.backend));
    // kube-proxy's `hasEndpoints`: usable endpoints anywhere, this node
    // or not.
    let no_local_endpoints = local
        && backends.is_empty()
        && candidates.iter().any(|candidate| {
            candidate.conditions.ready
                || (candidate.conditions.serving && candidate.conditions.terminating)
        });
    let in_backends = |backend: &Backend| {
        backends
            .binary_search_by(|other| (other.addr, other.port).cmp(&(backend.addr, backend.port)))
            .is_ok()
    };
    let terminating = sorted_unique(
        pool.iter()
            .filter(|candidate| candidate.conditions.terminating)
            .map(|candidate| candidate.backend)
            .filter(|backend| !in_backends(backend)),
    );
    // Still in the slice but taking no new flows: established flows to
    // them go on, as kube-proxy never clears TCP conntrack.
    let not_ready = sorted_unique(
        pool.iter()
            .filter(|candidate| !candidate.conditions.terminating)
            .map(|candidate| candidate.backend)
            .filter(|backend| !in_backends(backend)),
    );
    // kube-proxy's UDP cleanup keeps flows to serving endpoints only
    // (`IsServing`).
    let not_serving = sorted_unique(
        pool.iter()
            .filter(|candidate| !candidate.conditions.serving && !candidate.conditions.ready)
            .map(|candidate| candidate.backend)
            .filter(|backend| !in_backends(backend)),
    );
    Selection {
        backends,
        terminating,
        not_ready,
        not_serving,
        no_local_endpoints,
    }
}

/// The ready endpoints the hints keep for this node: those hinted for it
/// when every ready endpoint has node hints (`PreferSameNode`) and one
/// names it; else those hinted for its zone when every ready endpoint has
/// zone hints and one names it; else none (no topology: all are used).
fn close_by_hints<'c>(ready: &[&'c Candidate<'c>], here: Here<'_>) -> Vec<&'c Candidate<'c>> {
    let by = |hints: fn(&Candidate<'c>) -> &'c [String], name: Option<&str>| {
        let name = name.filter(|name| !name.is_empty())?;
        if ready.iter().any(|candidate| hints(candidate).is_empty()) {
            return None;
        }
        let kept: Vec<&'c Candidate<'c>> = ready
            .iter()
            .copied()
            .filter(|candidate| hints(candidate).iter().any(|hint| hint == name))
            .collect();
        (!kept.is_empty()).then_some(kept)
    };
    by(|candidate| candidate.nodes, Some(here.node))
        .or_else(|| by(|candidate| candidate.zones, here.zone))
        .unwrap_or_default()
}

/// Sorted, one per address and port (one endpoint listed by two slices,
/// during a slice migration, counts once).
fn sorted_unique(backends: impl Iterator<Item = Backend>) -> Vec<Backend> {
    let mut backends: Vec<Backend> = backends.collect();
    backends.sort_unstable();
    backends.dedup_by(|a, b| a.addr == b.addr && a.port == b.port);
    // Kept in the model's frontends: no spare capacity (a list collected
    // from a filter doubles its way up, 16 places for 10 endpoints).
    backends.shrink_to_fit();
    backends
}

#[cfg(test)]
mod tests;
