//! The plan over the changed frontends only, and the index it needs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use super::diff::{Planner, backend_allocator, backend_ids};
use super::ids::{IdAllocator, IdsInUse};
use super::{BackendKey, DatapathState, Op, Plan};
use crate::model::{Frontend, FrontendChanges, FrontendKind, FrontendSpec, Protocol};

/// What a plan over only the changed frontends needs beyond the state:
/// backend ids by frontend and address. (A backend entry belongs to one
/// frontend, so a change of one frontend touches its own entries only.)
///
/// Valid while the state is what the previous plans made of the desired
/// frontends; after a failed write or a plan with problems, make a new one
/// (and a full [`diff`](super::diff())).
#[derive(Debug, Default)]
pub struct PlanIndex {
    backend_ids: BTreeMap<BackendKey, u32>,
}

impl PlanIndex {
    /// Indexes `state` (O(all)); `desired` is what the state was made of.
    #[must_use]
    pub fn new(state: &DatapathState, desired: &BTreeMap<Frontend, FrontendSpec>) -> Self {
        // Every entry of the state is one of a desired frontend's: the
        // index needs nothing from `desired` itself.
        let _ = desired;
        Self {
            backend_ids: backend_ids(state),
        }
    }

    /// Records the backend ids `ops` wrote; call once they are all in the
    /// maps, with the state from before them.
    pub fn note_applied(&mut self, before: &DatapathState, ops: &[Op]) {
        for op in ops {
            match op {
                Op::PutBackend { id, backend } => {
                    if let Some(old) = before.backends.get(id)
                        && old.key != backend.key
                        && self.backend_ids.get(&old.key) == Some(id)
                    {
                        self.backend_ids.remove(&old.key);
                    }
                    self.backend_ids.insert(backend.key, *id);
                }
                Op::DeleteBackend { id, .. } => {
                    if let Some(old) = before.backends.get(id)
                        && self.backend_ids.get(&old.key) == Some(id)
                    {
                        self.backend_ids.remove(&old.key);
                    }
                }
                _ => {}
            }
        }
    }

    /// The backend entries of the frontend with `rev_nat_id`.
    fn backends_of(&self, rev_nat_id: u32) -> impl Iterator<Item = (&BackendKey, &u32)> {
        self.backend_ids
            .range(first_key(rev_nat_id)..)
            .take_while(move |(key, _)| key.rev_nat_id == rev_nat_id)
    }
}

/// The smallest backend key of a frontend.
fn first_key(rev_nat_id: u32) -> BackendKey {
    BackendKey {
        rev_nat_id,
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        port: 0,
        proto: Protocol::Tcp,
    }
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
    let mut planner = Planner {
        current,
        head: Vec::new(),
        slots: Vec::new(),
        tail: Vec::new(),
        problems: Vec::new(),
        known_backend_ids: &index.backend_ids,
        new_backend_ids: BTreeMap::new(),
        backend_alloc: backend_allocator(current),
        rev_nat_alloc: IdAllocator::over(
            IdsInUse::RevNats(&current.rev_nats),
            current.rev_nat_id_limit(),
        ),
        backends_used: BTreeSet::new(),
        rev_nats_used: BTreeSet::new(),
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
                && !self.rev_nats_used.contains(&state.rev_nat_id)
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
            for (key, &id) in index.backends_of(state.rev_nat_id) {
                if !self.backends_used.contains(&id) {
                    self.tail.push(Op::DeleteBackend { id, addr: key.addr });
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
