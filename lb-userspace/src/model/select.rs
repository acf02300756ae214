//! Which endpoints a frontend sends new flows to (kube-proxy's
//! `CategorizeEndpoints`): traffic policy, zone hints, readiness, and the
//! terminating or not ready ones that only drain.

use std::collections::BTreeSet;

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
        }
    }

    /// The selection of each frontend in WANTED (port index, IPv4, kind),
    /// in order. Frontends of one port, family and traffic policy (a
    /// `NodePort` on every node address) share one: it is made once, and
    /// the later ones get a copy. (A `ClusterIP`-only Service has one
    /// frontend per port and family: a cache that kept a copy of each for
    /// a second one that never came cost a hash and a copy per frontend.)
    pub(super) fn select_each(&self, wanted: &[(usize, bool, FrontendKind)]) -> Vec<Selection> {
        let keys: Vec<(usize, bool, bool)> = wanted
            .iter()
            .map(|&(port, ipv4, kind)| (port, ipv4, self.local(kind)))
            .collect();
        let mut selections: Vec<Option<Selection>> = vec![None; keys.len()];
        for (index, &(port, ipv4, local)) in keys.iter().enumerate() {
            if selections[index].is_some() {
                continue;
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
            for later in index + 1..keys.len() {
                if keys[later] == keys[index] {
                    selections[later] = Some(selection.clone());
                }
            }
            selections[index] = Some(selection);
        }
        selections.into_iter().flatten().collect()
    }

    /// Whether a frontend of KIND uses the Service's Local traffic policy.
    fn local(&self, kind: FrontendKind) -> bool {
        let policies = self.parsed.policies;
        if kind.is_external() {
            policies.external_local
        } else {
            policies.internal_local
        }
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
        let target_port = |slice: &SliceEndpoints| {
            slice
                .ports
                .iter()
                .find(|(name, proto, _)| **name == *port.name && *proto == port.proto)
                .map(|(_, _, target)| *target)
        };
        let of_port = || {
            self.slices
                .iter()
                .filter(move |slice| slice.ipv4 == ipv4)
                .filter_map(move |slice| Some((*slice, target_port(slice)?)))
        };
        // Sized at once: collected from a flattened filter, the list grew
        // by doubling (three or four allocations a frontend).
        let mut candidates: Vec<Candidate<'a>> =
            Vec::with_capacity(of_port().map(|(slice, _)| slice.len()).sum());
        candidates.extend(of_port().flat_map(|(slice, target)| {
            let node_name = self.node_name;
            slice.endpoints().map(move |endpoint| Candidate {
                backend: Backend {
                    addr: endpoint.addr,
                    port: target,
                    node_local: !node_name.is_empty() && endpoint.node_name == Some(node_name),
                },
                conditions: endpoint.conditions,
                zones: endpoint.zones,
                nodes: endpoint.nodes,
            })
        }));
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
    let in_pool = |candidate: &&Candidate<'_>| !local || candidate.backend.node_local;
    // Sized at once, as the candidates are.
    let mut ready: Vec<&Candidate<'_>> = Vec::with_capacity(candidates.len());
    ready.extend(
        candidates
            .iter()
            .filter(in_pool)
            .filter(|candidate| candidate.conditions.ready),
    );
    let close = here.map_or_else(Vec::new, |here| close_by_hints(&ready, here));
    let chosen = if !close.is_empty() {
        close
    } else if !ready.is_empty() {
        ready
    } else {
        candidates
            .iter()
            .filter(in_pool)
            .filter(|candidate| candidate.conditions.serving && candidate.conditions.terminating)
            .collect()
    };
    // The candidates are sorted, one per address and port (`candidates`),
    // so every list taken from them in their order is too.
    let backends: Vec<Backend> = chosen.iter().map(|candidate| candidate.backend).collect();
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
    // Usually every endpoint of the pool is chosen, and none is left for
    // the lists below (one search in the backends per endpoint and list
    // was a tenth of a first commit).
    let all_chosen = backends.len() == candidates.iter().filter(in_pool).count();
    let others = |keep: fn(&Conditions) -> bool| -> Vec<Backend> {
        if all_chosen {
            return Vec::new();
        }
        let mut kept: Vec<Backend> = candidates
            .iter()
            .filter(in_pool)
            .filter(|candidate| keep(&candidate.conditions))
            .map(|candidate| candidate.backend)
            .filter(|backend| !in_backends(backend))
            .collect();
        // Kept in the model's frontends: no spare capacity (a list
        // collected from a filter doubles its way up).
        kept.shrink_to_fit();
        kept
    };
    Selection {
        terminating: others(|conditions| conditions.terminating),
        // Still in the slice but taking no new flows: established flows to
        // them go on, as kube-proxy never clears TCP conntrack.
        not_ready: others(|conditions| !conditions.terminating),
        // kube-proxy's UDP cleanup keeps flows to serving endpoints only
        // (`IsServing`).
        not_serving: others(|conditions| !conditions.serving && !conditions.ready),
        backends,
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

#[cfg(test)]
mod tests;
