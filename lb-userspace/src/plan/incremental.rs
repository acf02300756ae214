//! The plan over the changed frontends only, and the index it needs.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use super::diff::{Planner, backend_allocator};
use super::ids::{IdAllocator, IdSet, IdsInUse};
use super::{BackendKey, DatapathState, Op, Plan};
use crate::fast_hash::{FastHashMap, map_with_capacity};
use crate::model::{Frontend, FrontendChanges, FrontendKind, FrontendSpec, Protocol};

/// What a plan over only the changed frontends needs beyond the state:
/// the backend ids of each frontend (by rev-NAT id). (A backend entry
/// belongs to one frontend, so a change of one frontend touches its own
/// entries only.) A few ids per frontend, sized once: at 100k Services a
/// map from every backend key to its id took ~100 MiB next to the state.
///
/// Valid while the state is what the previous plans made of the desired
/// frontends; after a failed write or a plan with problems, make a new one
/// (and a full [`diff`](super::diff())).
#[derive(Debug, Default)]
pub struct PlanIndex {
    ids_of: FastHashMap<u32, Vec<u32>>,
}

impl PlanIndex {
    /// Indexes `state` (O(all)); `desired` is what the state was made of.
    #[must_use]
    pub fn new(state: &DatapathState, desired: &BTreeMap<Frontend, FrontendSpec>) -> Self {
        // Every entry of the state is one of a desired frontend's: the
        // index needs nothing from `desired` itself.
        let _ = desired;
        let mut ids_of: FastHashMap<u32, Vec<u32>> = map_with_capacity(state.frontends.len());
        // A frontend's ids are handed out together, so in id order they
        // come in runs: one lookup and one allocation of the right size per
        // run, not per id (~0.1 s at 100k Services, on the loop after the
        // first sync).
        let mut run: Vec<u32> = Vec::new();
        let mut owner = None;
        let mut file_run = |owner: u32, run: &mut Vec<u32>| {
            match ids_of.entry(owner) {
                Entry::Vacant(vacant) => {
                    vacant.insert(run.clone());
                }
                Entry::Occupied(mut occupied) => occupied.get_mut().extend_from_slice(run),
            }
            run.clear();
        };
        for (id, entry) in &state.backends {
            let rev_nat_id = entry.key.rev_nat_id;
            if owner != Some(rev_nat_id) {
                if let Some(previous) = owner {
                    file_run(previous, &mut run);
                }
                owner = Some(rev_nat_id);
            }
            run.push(*id);
        }
        if let Some(last) = owner {
            file_run(last, &mut run);
        }
        for ids in ids_of.values_mut() {
            ids.shrink_to_fit();
        }
        Self { ids_of }
    }

    /// Records the backend ids `ops` wrote; call once they are all in the
    /// maps, with the state from before them.
    pub fn note_applied(&mut self, before: &DatapathState, ops: &[Op]) {
        for op in ops {
            match op {
                Op::PutBackend { id, backend } => {
                    let owner = backend.key.rev_nat_id;
                    if let Some(old) = before.backends.get(id)
                        && old.key.rev_nat_id != owner
                    {
                        self.forget(old.key.rev_nat_id, *id);
                    }
                    let ids = self.ids_of.entry(owner).or_default();
                    if !ids.contains(id) {
                        ids.push(*id);
                    }
                }
                Op::DeleteBackend { id, .. } => {
                    if let Some(old) = before.backends.get(id) {
                        self.forget(old.key.rev_nat_id, *id);
                    }
                }
                _ => {}
            }
        }
    }

    fn forget(&mut self, rev_nat_id: u32, id: u32) {
        if let Some(ids) = self.ids_of.get_mut(&rev_nat_id) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.ids_of.remove(&rev_nat_id);
            }
        }
    }

    /// The backend ids of the frontend with `rev_nat_id`, ascending.
    fn backends_of(&self, rev_nat_id: u32) -> Vec<u32> {
        let mut ids = self.ids_of.get(&rev_nat_id).cloned().unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// Each frontend's backend ids, sorted (tests compare indexes).
    #[cfg(test)]
    fn entries(&self) -> BTreeMap<u32, Vec<u32>> {
        self.ids_of
            .keys()
            .map(|rev_nat_id| (*rev_nat_id, self.backends_of(*rev_nat_id)))
            .collect()
    }
}

/// The backend ids of the frontends in `changes` by key, from `index`.
fn known_backend_ids(
    current: &DatapathState,
    index: &PlanIndex,
    changes: &FrontendChanges,
) -> FastHashMap<BackendKey, u32> {
    let mut known = FastHashMap::default();
    for frontend in changes.keys() {
        let Some(state) = current.frontends.get(frontend) else {
            continue;
        };
        for id in index.backends_of(state.rev_nat_id) {
            if let Some(entry) = current.backends.get(&id) {
                known.insert(entry.key, id);
            }
        }
    }
    known
}

/// Computes the plan for `changes` (frontends whose desired spec changed,
/// with the spec they had) only: O(changes), not O(all frontends).
///
/// `current` must be what the previous plans made of the desired frontends
/// before `changes`, and `index` must have followed them; then the result is
/// what [`diff`](super::diff()) gives over all of `desired`, except for the order of
/// independent writes.
pub fn diff_changes(
    current: &DatapathState,
    index: &mut PlanIndex,
    desired: &BTreeMap<Frontend, FrontendSpec>,
    changes: &FrontendChanges,
) -> Plan {
    let known = known_backend_ids(current, index, changes);
    let mut planner = Planner {
        current,
        head: Vec::new(),
        slots: Vec::new(),
        tail: Vec::new(),
        problems: Vec::new(),
        known_backend_ids: &known,
        new_backend_ids: FastHashMap::default(),
        backend_alloc: backend_allocator(current),
        rev_nat_alloc: IdAllocator::over(
            IdsInUse::RevNats(&current.rev_nats),
            current.rev_nat_id_limit(),
        ),
        backends_used: IdSet::default(),
        rev_nats_used: IdSet::default(),
        ranges_used: BTreeSet::new(),
    };
    for frontend in changes.keys() {
        if let Some(spec) = desired.get(frontend) {
            planner.frontend(frontend, spec);
        }
    }
    planner.removals_of(changes, index, desired);
    planner.markers_of(changes, desired);
    planner.finish()
}

impl Planner<'_> {
    /// Removals for `changes` only: see [`Planner::removals`].
    fn removals_of(
        &mut self,
        changes: &FrontendChanges,
        index: &PlanIndex,
        desired: &BTreeMap<Frontend, FrontendSpec>,
    ) {
        for frontend in changes.keys() {
            let Some(state) = self.current.frontends.get(frontend) else {
                continue;
            };
            if !desired.contains_key(frontend) {
                self.remove_frontend(*frontend, state);
            }
        }
        for frontend in changes.keys() {
            let Some(state) = self.current.frontends.get(frontend) else {
                continue;
            };
            let id = state.rev_nat_id;
            for range in self
                .current
                .source_ranges
                .range((id, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)..)
                .take_while(|range| range.0 == id)
            {
                if !self.ranges_used.contains(range) {
                    self.tail.push(Op::DeleteSourceRange(*range));
                }
            }
        }
        let mut freed_rev_nats = BTreeSet::new();
        for frontend in changes.keys() {
            if let Some(state) = self.current.frontends.get(frontend)
                && !self.rev_nats_used.contains(state.rev_nat_id)
                && let Some((addr, _)) = self.current.rev_nats.get(&state.rev_nat_id)
                && freed_rev_nats.insert(state.rev_nat_id)
            {
                self.tail.push(Op::DeleteRevNat {
                    id: state.rev_nat_id,
                    addr: *addr,
                });
            }
        }
        // A changed frontend's entries its new spec no longer names.
        for frontend in changes.keys() {
            let Some(state) = self.current.frontends.get(frontend) else {
                continue;
            };
            for id in index.backends_of(state.rev_nat_id) {
                if !self.backends_used.contains(id)
                    && let Some(entry) = self.current.backends.get(&id)
                {
                    self.tail.push(Op::DeleteBackend {
                        id,
                        addr: entry.key.addr,
                    });
                }
            }
        }
    }

    /// Markers of the addresses of `changes` only: see [`Planner::markers`].
    fn markers_of(
        &mut self,
        changes: &FrontendChanges,
        desired: &BTreeMap<Frontend, FrontendSpec>,
    ) {
        let addrs: BTreeSet<IpAddr> = changes.keys().map(|frontend| frontend.addr).collect();
        for addr in addrs {
            let first = Frontend {
                addr,
                port: 0,
                proto: Protocol::Tcp,
            };
            let last = Frontend {
                addr,
                port: u16::MAX,
                proto: Protocol::Udp,
            };
            let wanted = desired
                .range(first..=last)
                .any(|(_, spec)| spec.kind == FrontendKind::ClusterIp);
            let marked = self.current.markers.contains(&addr);
            if wanted && !marked {
                self.slots.push(Op::PutMarker { addr });
            } else if !wanted && marked {
                self.tail.push(Op::DeleteMarker { addr });
            }
        }
    }
}

#[cfg(test)]
mod tests;
