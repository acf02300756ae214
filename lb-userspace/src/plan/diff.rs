//! The full plan: every desired frontend against the state, in make-before-
//! break order, and the `Planner` the incremental plan shares.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use lb_common::{backend_flags, limits, svc_flags};

use super::ids::{IdAllocator, IdSet, IdsInUse};
use super::{
    BackendEntry, BackendKey, DatapathState, FrontendState, FrontendWrite, Op, Plan, SourceRange,
};
use crate::fast_hash::{FastHashMap, map_with_capacity};
use crate::model::{Backend, Frontend, FrontendKind, FrontendSpec};

/// Computes the plan that turns `current` into `desired`.
#[must_use]
pub fn diff(current: &DatapathState, desired: &BTreeMap<Frontend, FrontendSpec>) -> Plan {
    let backend_ids = backend_ids(current);
    let mut planner = Planner::new(current, &backend_ids);
    for (frontend, spec) in desired {
        planner.frontend(frontend, spec);
    }
    planner.removals(desired);
    planner.markers(desired);
    planner.finish()
}

/// [`diff`], handed to `sink` in pieces as it is planned, so that a piece
/// can be written while the next is planned: each piece holds every write
/// of the frontends planned since the one before (their new backends, rev-
/// NAT entries and source ranges first, then their slots and frontends),
/// `piece_ops` or a few more (the frontends' last piece: what is left);
/// then, when there are any, the markers and the removals in a piece of
/// their own. Returns the plan's problems.
///
/// The pieces one after another are as make-before-break as [`diff`]'s
/// plan, whose writes they are in another order: a frontend's writes are
/// never split between two pieces and refer to nothing of another
/// frontend's (a backend entry and a source range belong to one rev-NAT
/// id); the markers come after every frontend, as in [`diff`] (a marker
/// only rejects a `ClusterIP`'s unserved ports: when the service map is
/// full, the frontends get its room first), and whatever removes last.
pub fn diff_in_pieces(
    current: &DatapathState,
    desired: &BTreeMap<Frontend, FrontendSpec>,
    piece_ops: usize,
    sink: &mut dyn FnMut(Vec<Op>),
) -> Vec<String> {
    let backend_ids = backend_ids(current);
    let mut planner = Planner::new(current, &backend_ids);
    for (frontend, spec) in desired {
        planner.frontend(frontend, spec);
        if planner.head.len() + planner.slots.len() >= piece_ops {
            sink(planner.take_frontend_writes());
        }
    }
    // What is left of the frontends' writes goes first, on its own: the
    // last piece is then only markers and removals, which the caller can
    // write while it does what the frontends' writes must be done for.
    if !(planner.head.is_empty() && planner.slots.is_empty()) {
        sink(planner.take_frontend_writes());
    }
    planner.removals(desired);
    planner.markers(desired);
    let Plan { ops, problems } = planner.finish();
    if !ops.is_empty() {
        sink(ops);
    }
    problems
}

/// Backend ids by frontend, address, port and protocol (of two entries
/// with one key, the higher id).
pub(super) fn backend_ids(state: &DatapathState) -> FastHashMap<BackendKey, u32> {
    let mut ids = map_with_capacity(state.backends.len());
    for (id, entry) in &state.backends {
        ids.insert(entry.key, *id);
    }
    ids
}

/// The backend id allocators of a plan over `state`, one per family: ids
/// only move forward, each family's over its own range (its backend
/// array's indexes, an IPv6 id with `limits::BACKEND_ID_V6` set).
pub(super) fn backend_allocator(state: &DatapathState) -> BackendAllocator<'_> {
    let max = state.backend_index_limit();
    let family = |bit: u32, floor: u32| FamilyIds {
        ids: IdAllocator::starting_at(
            IdsInUse::Backends(&state.backends),
            floor,
            (bit | 1)..=(bit | max),
        ),
        past_the_end: bit | max.saturating_add(1),
    };
    BackendAllocator {
        v4: family(0, state.next_backend_id.v4),
        v6: family(limits::BACKEND_ID_V6, state.next_backend_id.v6),
    }
}

/// A plan's backend id allocators, one per family.
#[derive(Debug)]
pub(super) struct BackendAllocator<'a> {
    v4: FamilyIds<'a>,
    v6: FamilyIds<'a>,
}

/// One family's backend ids.
#[derive(Debug)]
struct FamilyIds<'a> {
    ids: IdAllocator<'a>,
    /// The next id past the array's end (see `BackendAllocator::allocate`).
    past_the_end: u32,
}

impl BackendAllocator<'_> {
    /// A new id for a backend at `addr`, from its family's range. When the
    /// range is used up, an id past the array's end: its write is refused
    /// as a full map's (`MapsError::Full`, as a hash map refuses an
    /// insert), so that the frontends naming it stay out whole and the
    /// Services left out are named, never served in part.
    pub(super) fn allocate(&mut self, addr: IpAddr) -> Option<u32> {
        let family = match addr {
            IpAddr::V4(_) => &mut self.v4,
            IpAddr::V6(_) => &mut self.v6,
        };
        family.ids.allocate().or_else(|| {
            let id = family.past_the_end;
            family.past_the_end = id.checked_add(1)?;
            Some(id)
        })
    }
}

fn local_flag(backend: &Backend) -> u8 {
    if backend.node_local {
        backend_flags::LOCAL
    } else {
        0
    }
}

/// The `backend_flags` of a draining backend of `spec` (terminating or not
/// ready): no new flows; not serving if the spec says so.
fn draining_flags(spec: &FrontendSpec, backend: &Backend) -> u8 {
    let same = |other: &Backend| other.addr == backend.addr && other.port == backend.port;
    let not_serving = if spec.not_serving.iter().any(same) {
        backend_flags::NOT_SERVING
    } else {
        0
    };
    backend_flags::TERMINATING | not_serving | local_flag(backend)
}

/// `svc_flags` of a frontend.
#[must_use]
fn frontend_flags(spec: &FrontendSpec) -> u16 {
    let mut flags = if spec.kind == FrontendKind::ClusterIp {
        svc_flags::CLUSTER_IP
    } else {
        svc_flags::EXTERNAL
    };
    if spec.kind.is_external() && spec.external_local {
        flags |= svc_flags::EXT_LOCAL;
    }
    if spec.affinity_timeout_s > 0 {
        flags |= svc_flags::AFFINITY;
    }
    if !spec.source_ranges.is_empty() {
        flags |= svc_flags::SOURCE_RANGES;
    }
    if spec.no_local_endpoints {
        flags |= svc_flags::NO_LOCAL_ENDPOINTS;
    }
    flags
}

/// The session-affinity group of a frontend (0 without affinity): one per
/// Service port, protocol and family, so that a client keeps its endpoint
/// whichever frontend of the port it uses, as kube-proxy's per-port
/// affinity does. A hash of those (FNV-1a), not an allocated id: the same
/// on every sync and after a restart with nothing to record. Two ports
/// whose hashes collide share one entry per client; the datapath uses an
/// entry only for an endpoint the frontend itself has, so a collision can
/// only end a client's affinity early (one in 2^32 pairs of ports).
#[must_use]
pub(super) fn affinity_group(frontend: &Frontend, spec: &FrontendSpec) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    if spec.affinity_timeout_s == 0 {
        return 0;
    }
    let service = &spec.service;
    let family = if frontend.addr.is_ipv4() { 4 } else { 6 };
    let mut hash = OFFSET;
    let parts: [&[u8]; 5] = [
        service.namespace.as_bytes(),
        service.name.as_bytes(),
        service.port_name.as_bytes(),
        &[frontend.proto.number()],
        &[family],
    ];
    for part in parts {
        // Each part ends with a 0xff byte (never in a name), so that
        // ("ab", "c") and ("a", "bc") differ.
        for &byte in part.iter().chain(&[0xff]) {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash.max(1)
}

/// Builds a plan in three buckets that are concatenated in order.
pub(super) struct Planner<'a> {
    pub(super) current: &'a DatapathState,
    /// New backends, rev-NAT entries and source ranges.
    pub(super) head: Vec<Op>,
    /// Slot and frontend writes, then new markers.
    pub(super) slots: Vec<Op>,
    /// Everything that removes.
    pub(super) tail: Vec<Op>,
    pub(super) problems: Vec<String>,
    /// Ids of the backends in the maps (of the frontends planned, at least).
    pub(super) known_backend_ids: &'a FastHashMap<BackendKey, u32>,
    /// Ids allocated by this plan.
    pub(super) new_backend_ids: FastHashMap<BackendKey, u32>,
    pub(super) backend_alloc: BackendAllocator<'a>,
    pub(super) rev_nat_alloc: IdAllocator<'a>,
    pub(super) backends_used: IdSet,
    pub(super) rev_nats_used: IdSet,
    pub(super) ranges_used: BTreeSet<SourceRange>,
}

impl<'a> Planner<'a> {
    fn new(current: &'a DatapathState, backend_ids: &'a FastHashMap<BackendKey, u32>) -> Self {
        Self {
            current,
            head: Vec::new(),
            slots: Vec::new(),
            tail: Vec::new(),
            problems: Vec::new(),
            // Reuse the id of an identical backend of the same frontend.
            known_backend_ids: backend_ids,
            new_backend_ids: FastHashMap::default(),
            backend_alloc: backend_allocator(current),
            rev_nat_alloc: IdAllocator::new(
                current
                    .rev_nats
                    .keys()
                    .copied()
                    .chain(current.frontends.values().map(|f| f.rev_nat_id)),
                current.rev_nat_id_limit(),
            ),
            backends_used: IdSet::default(),
            rev_nats_used: IdSet::default(),
            ranges_used: BTreeSet::new(),
        }
    }

    /// Plans one desired frontend.
    pub(super) fn frontend(&mut self, frontend: &Frontend, spec: &FrontendSpec) {
        // A backend key names its frontend (by rev-NAT id): ids allocated
        // for another frontend never match, so only this one's are kept
        // (at 100k Services the plan allocates 2M).
        self.new_backend_ids.clear();
        let existing = self.current.frontends.get(frontend);
        let rev_nat_id = if let Some(state) = existing {
            state.rev_nat_id
        } else if let Some(id) = self.rev_nat_alloc.allocate() {
            id
        } else {
            self.problems.push(format!(
                "{}: no free rev-NAT id (limit {})",
                frontend,
                self.current.rev_nat_id_limit()
            ));
            return;
        };
        if self.current.rev_nats.get(&rev_nat_id) != Some(&(frontend.addr, frontend.port)) {
            self.head.push(Op::PutRevNat {
                id: rev_nat_id,
                frontend: *frontend,
            });
        }
        self.rev_nats_used.insert(rev_nat_id);
        for (addr, prefix) in &spec.source_ranges {
            let range = (rev_nat_id, *addr, *prefix);
            if !self.current.source_ranges.contains(&range) {
                self.head.push(Op::PutSourceRange(range));
            }
            self.ranges_used.insert(range);
        }

        // Only affinity looks a frontend's backend up by endpoint.
        let indexed = if affinity_group(frontend, spec) == 0 {
            0
        } else {
            backend_flags::INDEXED
        };
        let wanted = truncate_backends(frontend, &spec.backends, &mut self.problems);
        let new_slots: Vec<u32> = wanted
            .iter()
            .filter_map(|backend| {
                self.backend_id(frontend, rev_nat_id, backend, local_flag(backend) | indexed)
            })
            .collect();
        // Draining backends stay in the backend map (their flows go on).
        for backend in spec.terminating.iter().chain(&spec.not_ready) {
            let flags = draining_flags(spec, backend) | indexed;
            let _ = self.backend_id(frontend, rev_nat_id, backend, flags);
        }

        let old_slots = existing.map_or(&[][..], |state| &state.slots[..]);
        // The first slots are in the frontend's own entry: a change there
        // is a write of it (below); the others have entries of their own.
        let inline = &new_slots[..new_slots.len().min(limits::INLINE_SLOTS)];
        for (index, id) in new_slots.iter().enumerate().skip(limits::INLINE_SLOTS) {
            if old_slots.get(index) != Some(id) {
                self.slots.push(Op::PutSlot {
                    frontend: *frontend,
                    slot: slot_number(index),
                    backend_id: *id,
                });
            }
        }
        let flags = frontend_flags(spec);
        let group = affinity_group(frontend, spec);
        if existing.is_none_or(|state| {
            state.slots.len() != new_slots.len()
                || state.slots[..inline.len()] != *inline
                || state.flags != flags
                || state.affinity_timeout_s != spec.affinity_timeout_s
                || state.affinity_group != group
        }) {
            self.slots.push(Op::PutFrontend(Box::new(FrontendWrite {
                frontend: *frontend,
                count: u16::try_from(new_slots.len()).unwrap_or(u16::MAX),
                rev_nat_id,
                flags,
                affinity_timeout_s: spec.affinity_timeout_s,
                affinity_group: group,
                inline: inline.into(),
            })));
        }
        for index in new_slots.len().max(limits::INLINE_SLOTS)..old_slots.len() {
            self.tail.push(Op::DeleteSlot {
                frontend: *frontend,
                slot: slot_number(index),
            });
        }
    }

    /// The id of `backend` of `frontend` (rev-NAT id `rev_nat_id`),
    /// allocated if new; its entry is (re)written with `flags` when new or
    /// when its flags changed. The first call for a backend in a plan sets
    /// its flags (a spec naming it twice: the slot's win).
    fn backend_id(
        &mut self,
        frontend: &Frontend,
        rev_nat_id: u32,
        backend: &Backend,
        flags: u8,
    ) -> Option<u32> {
        let key = BackendKey {
            rev_nat_id,
            addr: backend.addr,
            port: backend.port,
            proto: frontend.proto,
        };
        let entry = BackendEntry { key, flags };
        let id = if let Some(id) = self
            .known_backend_ids
            .get(&key)
            .or_else(|| self.new_backend_ids.get(&key))
        {
            *id
        } else {
            let Some(id) = self.backend_alloc.allocate(backend.addr) else {
                self.problems
                    .push(format!("{frontend}: no free backend id for {backend}"));
                return None;
            };
            self.new_backend_ids.insert(key, id);
            id
        };
        if self.backends_used.insert(id) && self.current.backends.get(&id) != Some(&entry) {
            self.head.push(Op::PutBackend { id, backend: entry });
        }
        Some(id)
    }

    /// Marks `ClusterIP`s so that ports they do not serve are rejected, as
    /// kube-proxy does. Node, load-balancer and external IPs are not marked:
    /// they may be real hosts' addresses serving other ports themselves.
    fn markers(&mut self, desired: &BTreeMap<Frontend, FrontendSpec>) {
        let wanted: BTreeSet<IpAddr> = desired
            .iter()
            .filter(|(_, spec)| spec.kind == FrontendKind::ClusterIp)
            .map(|(frontend, _)| frontend.addr)
            .collect();
        for addr in wanted.difference(&self.current.markers) {
            self.slots.push(Op::PutMarker { addr: *addr });
        }
        for addr in self.current.markers.difference(&wanted) {
            self.tail.push(Op::DeleteMarker { addr: *addr });
        }
    }

    /// Removes a frontend that is no longer wanted, then its slots.
    pub(super) fn remove_frontend(&mut self, frontend: Frontend, state: &FrontendState) {
        self.tail.push(Op::DeleteFrontend { frontend });
        for index in limits::INLINE_SLOTS..state.slots.len() {
            self.tail.push(Op::DeleteSlot {
                frontend,
                slot: slot_number(index),
            });
        }
    }

    /// Plans the removal of what `desired` no longer has.
    fn removals(&mut self, desired: &BTreeMap<Frontend, FrontendSpec>) {
        let current = self.current;
        for (frontend, state) in &current.frontends {
            if !desired.contains_key(frontend) {
                self.remove_frontend(*frontend, state);
            }
        }
        for range in &self.current.source_ranges {
            if !self.ranges_used.contains(range) {
                self.tail.push(Op::DeleteSourceRange(*range));
            }
        }
        for (id, (addr, _)) in &self.current.rev_nats {
            if !self.rev_nats_used.contains(*id) {
                self.tail.push(Op::DeleteRevNat {
                    id: *id,
                    addr: *addr,
                });
            }
        }
        for (id, entry) in &self.current.backends {
            if !self.backends_used.contains(*id) {
                self.tail.push(Op::DeleteBackend {
                    id: *id,
                    addr: entry.key.addr,
                });
            }
        }
    }

    /// The frontends' writes planned so far, heads then slots, taken out
    /// (into a vector of their size: the planner's own keep their room for
    /// the next frontends).
    fn take_frontend_writes(&mut self) -> Vec<Op> {
        let mut writes = Vec::with_capacity(self.head.len() + self.slots.len());
        writes.append(&mut self.head);
        writes.append(&mut self.slots);
        writes
    }

    pub(super) fn finish(self) -> Plan {
        let mut ops = self.head;
        ops.extend(self.slots);
        ops.extend(self.tail);
        Plan {
            ops,
            problems: self.problems,
        }
    }
}

/// Slot number for a 0-based index (slot 0 is the frontend).
fn slot_number(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}

fn truncate_backends<'a>(
    frontend: &Frontend,
    backends: &'a [Backend],
    problems: &mut Vec<String>,
) -> &'a [Backend] {
    let max = usize::from(limits::MAX_BACKENDS_PER_SERVICE);
    if backends.len() > max {
        problems.push(format!(
            "{}: {} endpoints, only the first {max} are used",
            frontend,
            backends.len()
        ));
        &backends[..max]
    } else {
        backends
    }
}

#[cfg(test)]
mod tests;
