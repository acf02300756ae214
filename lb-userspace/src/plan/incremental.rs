//! The plan over the changed frontends only, and the index it needs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use lb_common::{backend_flags, limits};

use super::diff::{Planner, backend_ids, backend_keys, local_flag};
use super::ids::{IdAllocator, IdsInUse};
use super::{BackendEntry, BackendKey, DatapathState, Op, Plan};
use crate::model::{Backend, Frontend, FrontendChanges, FrontendKind, FrontendSpec, Protocol};

/// What a plan over only the changed frontends needs beyond the state:
/// backend ids by address, and which desired frontends name each backend.
///
/// Valid while the state is what the previous plans made of the desired
/// frontends; after a failed write or a plan with problems, make a new one
/// (and a full [`diff`](super::diff())).
#[derive(Debug, Default)]
pub struct PlanIndex {
    backend_ids: HashMap<BackendKey, u32>,
    /// Desired frontends naming each backend, sorted.
    users: HashMap<BackendKey, Vec<Frontend>>,
}

impl PlanIndex {
    /// Indexes `state` and `desired` (O(all)).
    #[must_use]
    pub fn new(state: &DatapathState, desired: &BTreeMap<Frontend, FrontendSpec>) -> Self {
        let mut users: HashMap<BackendKey, Vec<Frontend>> = HashMap::new();
        for (frontend, spec) in desired {
            for key in backend_keys(frontend, spec) {
                let list = users.entry(key).or_default();
                // Frontends come in order; a spec may name a key twice.
                if list.last() != Some(frontend) {
                    list.push(*frontend);
                }
            }
        }
        Self {
            backend_ids: backend_ids(state),
            users,
        }
    }

    /// Follows the desired frontends through `changes`; returns the backends
    /// whose users changed.
    fn follow(
        &mut self,
        desired: &BTreeMap<Frontend, FrontendSpec>,
        changes: &FrontendChanges,
    ) -> BTreeSet<BackendKey> {
        let mut touched = BTreeSet::new();
        for (frontend, old) in changes {
            for key in old.iter().flat_map(|spec| backend_keys(frontend, spec)) {
                if let Some(list) = self.users.get_mut(&key) {
                    list.retain(|user| user != frontend);
                    if list.is_empty() {
                        self.users.remove(&key);
                    }
                }
                touched.insert(key);
            }
            for key in desired
                .get(frontend)
                .into_iter()
                .flat_map(|spec| backend_keys(frontend, spec))
            {
                let list = self.users.entry(key).or_default();
                if let Err(at) = list.binary_search(frontend) {
                    list.insert(at, *frontend);
                }
                touched.insert(key);
            }
        }
        touched
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

    /// The flags `desired_backend_flags` gives `key`, from its users only;
    /// `None` when no frontend names it.
    fn flags_of(&self, key: &BackendKey, desired: &BTreeMap<Frontend, FrontendSpec>) -> Option<u8> {
        let mut flags = None;
        let same = |backend: &&Backend| backend.addr == key.addr && backend.port == key.port;
        for frontend in self.users.get(key).into_iter().flatten() {
            let Some(spec) = desired.get(frontend) else {
                continue;
            };
            for backend in spec.terminating.iter().filter(same) {
                flags.get_or_insert(backend_flags::TERMINATING | local_flag(backend));
            }
            for backend in spec.backends.iter().filter(same) {
                flags = Some(local_flag(backend));
            }
        }
        flags
    }

    /// Whether a plan over all of `desired` would keep `key` in the map:
    /// some frontend has it in a slot (within the slot limit) or draining.
    fn in_use(&self, key: &BackendKey, desired: &BTreeMap<Frontend, FrontendSpec>) -> bool {
        let same = |backend: &Backend| backend.addr == key.addr && backend.port == key.port;
        let max = usize::from(limits::MAX_BACKENDS_PER_SERVICE);
        self.users.get(key).into_iter().flatten().any(|frontend| {
            desired.get(frontend).is_some_and(|spec| {
                spec.backends.iter().take(max).any(same) || spec.terminating.iter().any(same)
            })
        })
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
    let touched = index.follow(desired, changes);
    let flags: BTreeMap<BackendKey, u8> = touched
        .iter()
        .filter_map(|key| Some((*key, index.flags_of(key, desired)?)))
        .collect();
    let mut planner = Planner {
        current,
        head: Vec::new(),
        slots: Vec::new(),
        tail: Vec::new(),
        problems: Vec::new(),
        backend_flags: flags,
        known_backend_ids: &index.backend_ids,
        new_backend_ids: BTreeMap::new(),
        backend_alloc: IdAllocator::over(
            IdsInUse::Backends(&current.backends),
            limits::MAX_BACKENDS - 1,
        ),
        rev_nat_alloc: IdAllocator::over(
            IdsInUse::RevNats(&current.rev_nats),
            limits::MAX_FRONTENDS - 1,
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
    // Backends of unchanged frontends whose flags changed with the others.
    for key in &touched {
        if index.in_use(key, desired)
            && let Some(&id) = index.backend_ids.get(key)
            && planner.backends_used.insert(id)
        {
            let entry = BackendEntry {
                key: *key,
                flags: planner.backend_flags.get(key).copied().unwrap_or(0),
            };
            if current.backends.get(&id) != Some(&entry) {
                planner.head.push(Op::PutBackend { id, backend: entry });
            }
        }
    }
    planner.removals_of(changes, &touched, index, desired);
    planner.markers_of(changes, desired);
    planner.finish()
}

impl Planner<'_> {
    /// Removals for `changes` only: see [`Planner::removals`].
    fn removals_of(
        &mut self,
        changes: &FrontendChanges,
        touched: &BTreeSet<BackendKey>,
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
        for key in touched {
            if let Some(&id) = index.backend_ids.get(key)
                && !self.backends_used.contains(&id)
                && !index.in_use(key, desired)
            {
                self.tail.push(Op::DeleteBackend { id, addr: key.addr });
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
