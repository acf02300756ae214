//! Diff: what the maps hold versus what the model wants, as an ordered plan.
//!
//! Pure: no maps here. The order is make before break, so that a packet
//! arriving at any point during apply sees a complete service:
//! 1. new backends and rev-NAT entries,
//! 2. backend slots (each slot always names an existing backend),
//! 3. the frontend (slot 0) with its new count,
//! 4. slots beyond the new count, removed frontends (slot 0 first),
//! 5. rev-NAT entries and backends nothing refers to any more.
//!
//! Ids are stable: a frontend keeps its rev-NAT id and a backend address
//! keeps its backend id for as long as they exist, also across agent restarts
//! (the state is read back from the pinned maps).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use lb_common::{backend_flags, limits, svc_flags};

use crate::model::{Backend, Frontend, FrontendChanges, FrontendKind, FrontendSpec, Protocol};

/// A backend as stored in the backend maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// Backend address.
    pub addr: IpAddr,
    /// Backend port.
    pub port: u16,
    /// L4 protocol.
    pub proto: Protocol,
}

/// A backend entry: its identity and `backend_flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendEntry {
    /// Address, port, protocol.
    pub key: BackendKey,
    /// `lb_common::backend_flags` bits.
    pub flags: u8,
}

/// A frontend as stored in the service maps.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FrontendState {
    /// Rev-NAT id (also the stats index).
    pub rev_nat_id: u32,
    /// Backend id per slot, slot 1 first.
    pub slots: Vec<u32>,
    /// `lb_common::svc_flags` bits of slot 0.
    pub flags: u16,
    /// Session-affinity timeout (0: none).
    pub affinity_timeout_s: u32,
}

/// A source-range entry: frontend rev-NAT id, prefix address, prefix length.
pub type SourceRange = (u32, IpAddr, u8);

/// What the maps hold, in userspace terms.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DatapathState {
    /// Frontends (service slot 0 entries) with their slots.
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// Backends by id.
    pub backends: BTreeMap<u32, BackendEntry>,
    /// Rev-NAT entries by id.
    pub rev_nats: BTreeMap<u32, (IpAddr, u16)>,
    /// Service addresses whose unserved ports are rejected.
    pub markers: BTreeSet<IpAddr>,
    /// Allowed client prefixes per frontend.
    pub source_ranges: BTreeSet<SourceRange>,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Insert or overwrite backend `id`.
    PutBackend { id: u32, backend: BackendEntry },
    /// Insert rev-NAT `id` for `frontend` (and zero its counters).
    PutRevNat { id: u32, frontend: Frontend },
    /// Point `slot` (>= 1) of `frontend` at `backend_id`.
    PutSlot {
        frontend: Frontend,
        slot: u16,
        backend_id: u32,
    },
    /// Write slot 0 of `frontend`.
    PutFrontend {
        frontend: Frontend,
        count: u16,
        rev_nat_id: u32,
        flags: u16,
        affinity_timeout_s: u32,
    },
    /// Allow a client prefix into a frontend.
    PutSourceRange(SourceRange),
    /// Mark `addr` as a service address (unserved ports are rejected).
    PutMarker { addr: IpAddr },
    /// Remove a client prefix of a frontend.
    DeleteSourceRange(SourceRange),
    /// Remove the service-address mark of `addr`.
    DeleteMarker { addr: IpAddr },
    /// Remove `slot` (>= 1) of `frontend`.
    DeleteSlot { frontend: Frontend, slot: u16 },
    /// Remove slot 0 of `frontend`.
    DeleteFrontend { frontend: Frontend },
    /// Remove rev-NAT `id` of the family of `addr`.
    DeleteRevNat { id: u32, addr: IpAddr },
    /// Remove backend `id` of the family of `addr`.
    DeleteBackend { id: u32, addr: IpAddr },
}

/// The plan, and what could not be planned.
#[derive(Debug, Default)]
pub struct Plan {
    /// Map writes in the order they must happen.
    pub ops: Vec<Op>,
    /// Frontends left out, with the reason (id space or slot limit).
    pub problems: Vec<String>,
}

/// The ids in use before a plan: a set, or the keys of a state's map.
#[derive(Debug)]
enum IdsInUse<'a> {
    Set(BTreeSet<u32>),
    Backends(&'a BTreeMap<u32, BackendEntry>),
    RevNats(&'a BTreeMap<u32, (IpAddr, u16)>),
}

impl IdsInUse<'_> {
    fn contains(&self, id: u32) -> bool {
        match self {
            Self::Set(set) => set.contains(&id),
            Self::Backends(map) => map.contains_key(&id),
            Self::RevNats(map) => map.contains_key(&id),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Set(set) => set.len(),
            Self::Backends(map) => map.len(),
            Self::RevNats(map) => map.len(),
        }
    }

    fn last(&self) -> Option<u32> {
        match self {
            Self::Set(set) => set.last().copied(),
            Self::Backends(map) => map.last_key_value().map(|(id, _)| *id),
            Self::RevNats(map) => map.last_key_value().map(|(id, _)| *id),
        }
    }
}

/// Hands out ids that are not in use, starting after the highest id in use
/// and moving forward, so that ids freed below it are not handed out again
/// soon (stale conntrack entries may still name them). An id freed at the
/// top is the next one handed out by a later plan; a flow still naming it
/// then reaches the new backend, as after any backend change (TCP gets a
/// reset, UDP carries on).
#[derive(Debug)]
struct IdAllocator<'a> {
    in_use: IdsInUse<'a>,
    /// Handed out by this allocator.
    taken: BTreeSet<u32>,
    next: u32,
    max: u32,
}

impl<'a> IdAllocator<'a> {
    fn new(in_use: impl IntoIterator<Item = u32>, max: u32) -> Self {
        Self::over(IdsInUse::Set(in_use.into_iter().collect()), max)
    }

    fn over(in_use: IdsInUse<'a>, max: u32) -> Self {
        let next = in_use.last().map_or(1, |last| last.saturating_add(1));
        Self {
            in_use,
            taken: BTreeSet::new(),
            next,
            max,
        }
    }

    fn allocate(&mut self) -> Option<u32> {
        if self.in_use.len() + self.taken.len() >= self.max as usize {
            return None;
        }
        loop {
            if self.next == 0 || self.next > self.max {
                self.next = 1;
            }
            let candidate = self.next;
            self.next += 1;
            if !self.in_use.contains(candidate) && self.taken.insert(candidate) {
                return Some(candidate);
            }
        }
    }
}

/// Computes the plan that turns `current` into `desired`.
#[must_use]
pub fn diff(current: &DatapathState, desired: &BTreeMap<Frontend, FrontendSpec>) -> Plan {
    let backend_ids = backend_ids(current);
    let mut planner = Planner::new(current, desired, &backend_ids);
    for (frontend, spec) in desired {
        planner.frontend(frontend, spec);
    }
    planner.removals(desired);
    planner.markers(desired);
    planner.finish()
}

/// Backend ids by address, port and protocol.
fn backend_ids(state: &DatapathState) -> HashMap<BackendKey, u32> {
    state
        .backends
        .iter()
        .map(|(id, entry)| (entry.key, *id))
        .collect()
}

/// The backends a frontend's spec names (new flows or draining).
fn backend_keys(frontend: &Frontend, spec: &FrontendSpec) -> impl Iterator<Item = BackendKey> {
    spec.backends
        .iter()
        .chain(&spec.terminating)
        .map(move |backend| BackendKey {
            addr: backend.addr,
            port: backend.port,
            proto: frontend.proto,
        })
}

/// What a plan over only the changed frontends needs beyond the state:
/// backend ids by address, and which desired frontends name each backend.
///
/// Valid while the state is what the previous plans made of the desired
/// frontends; after a failed write or a plan with problems, make a new one
/// (and a full [`diff`]).
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
/// what [`diff`] gives over all of `desired`, except for the order of
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

fn local_flag(backend: &Backend) -> u8 {
    if backend.node_local {
        backend_flags::LOCAL
    } else {
        0
    }
}

/// `svc_flags` of a frontend.
#[must_use]
pub fn frontend_flags(spec: &FrontendSpec) -> u16 {
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
    flags
}

/// The `backend_flags` every backend should have: local if the endpoint
/// is on this node; terminating unless some frontend still sends it new
/// flows.
fn desired_backend_flags(desired: &BTreeMap<Frontend, FrontendSpec>) -> BTreeMap<BackendKey, u8> {
    let mut flags: BTreeMap<BackendKey, u8> = BTreeMap::new();
    for (frontend, spec) in desired {
        let key = |b: &Backend| BackendKey {
            addr: b.addr,
            port: b.port,
            proto: frontend.proto,
        };
        let local = |b: &Backend| {
            if b.node_local {
                backend_flags::LOCAL
            } else {
                0
            }
        };
        for backend in &spec.terminating {
            flags
                .entry(key(backend))
                .or_insert(backend_flags::TERMINATING | local(backend));
        }
        for backend in &spec.backends {
            flags.insert(key(backend), local(backend));
        }
    }
    flags
}

/// Builds a plan in three buckets that are concatenated in order.
struct Planner<'a> {
    current: &'a DatapathState,
    /// New backends, rev-NAT entries and source ranges.
    head: Vec<Op>,
    /// Slot and frontend writes, then new markers.
    slots: Vec<Op>,
    /// Everything that removes.
    tail: Vec<Op>,
    problems: Vec<String>,
    backend_flags: BTreeMap<BackendKey, u8>,
    /// Ids of the backends in the maps.
    known_backend_ids: &'a HashMap<BackendKey, u32>,
    /// Ids allocated by this plan.
    new_backend_ids: BTreeMap<BackendKey, u32>,
    backend_alloc: IdAllocator<'a>,
    rev_nat_alloc: IdAllocator<'a>,
    backends_used: BTreeSet<u32>,
    rev_nats_used: BTreeSet<u32>,
    ranges_used: BTreeSet<SourceRange>,
}

impl<'a> Planner<'a> {
    fn new(
        current: &'a DatapathState,
        desired: &BTreeMap<Frontend, FrontendSpec>,
        backend_ids: &'a HashMap<BackendKey, u32>,
    ) -> Self {
        Self {
            current,
            head: Vec::new(),
            slots: Vec::new(),
            tail: Vec::new(),
            problems: Vec::new(),
            backend_flags: desired_backend_flags(desired),
            // Reuse the id of an identical backend.
            known_backend_ids: backend_ids,
            new_backend_ids: BTreeMap::new(),
            backend_alloc: IdAllocator::new(
                current.backends.keys().copied(),
                limits::MAX_BACKENDS - 1,
            ),
            rev_nat_alloc: IdAllocator::new(
                current
                    .rev_nats
                    .keys()
                    .copied()
                    .chain(current.frontends.values().map(|f| f.rev_nat_id)),
                limits::MAX_FRONTENDS - 1,
            ),
            backends_used: BTreeSet::new(),
            rev_nats_used: BTreeSet::new(),
            ranges_used: BTreeSet::new(),
        }
    }

    /// Plans one desired frontend.
    fn frontend(&mut self, frontend: &Frontend, spec: &FrontendSpec) {
        let existing = self.current.frontends.get(frontend);
        let rev_nat_id = if let Some(state) = existing {
            state.rev_nat_id
        } else if let Some(id) = self.rev_nat_alloc.allocate() {
            id
        } else {
            self.problems.push(format!(
                "{}: no free rev-NAT id (limit {})",
                frontend,
                limits::MAX_FRONTENDS - 1
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

        let wanted = truncate_backends(frontend, &spec.backends, &mut self.problems);
        let new_slots: Vec<u32> = wanted
            .iter()
            .filter_map(|backend| self.backend_id(frontend, backend))
            .collect();
        // Terminating backends stay in the backend map (flows drain).
        for backend in &spec.terminating {
            let _ = self.backend_id(frontend, backend);
        }

        let old_slots = existing.map_or(&[][..], |state| &state.slots[..]);
        for (index, id) in new_slots.iter().enumerate() {
            if old_slots.get(index) != Some(id) {
                self.slots.push(Op::PutSlot {
                    frontend: *frontend,
                    slot: slot_number(index),
                    backend_id: *id,
                });
            }
        }
        let flags = frontend_flags(spec);
        if existing.is_none_or(|state| {
            state.slots.len() != new_slots.len()
                || state.flags != flags
                || state.affinity_timeout_s != spec.affinity_timeout_s
        }) {
            self.slots.push(Op::PutFrontend {
                frontend: *frontend,
                count: u16::try_from(new_slots.len()).unwrap_or(u16::MAX),
                rev_nat_id,
                flags,
                affinity_timeout_s: spec.affinity_timeout_s,
            });
        }
        for index in new_slots.len()..old_slots.len() {
            self.tail.push(Op::DeleteSlot {
                frontend: *frontend,
                slot: slot_number(index),
            });
        }
    }

    /// The id of `backend` for `frontend`'s protocol, allocated if new; its
    /// entry is (re)written when new or when its flags changed.
    fn backend_id(&mut self, frontend: &Frontend, backend: &Backend) -> Option<u32> {
        let key = BackendKey {
            addr: backend.addr,
            port: backend.port,
            proto: frontend.proto,
        };
        let flags = self.backend_flags.get(&key).copied().unwrap_or(0);
        let entry = BackendEntry { key, flags };
        let id = if let Some(id) = self
            .known_backend_ids
            .get(&key)
            .or_else(|| self.new_backend_ids.get(&key))
        {
            *id
        } else {
            let Some(id) = self.backend_alloc.allocate() else {
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
    fn remove_frontend(&mut self, frontend: Frontend, state: &FrontendState) {
        self.tail.push(Op::DeleteFrontend { frontend });
        for index in 0..state.slots.len() {
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
            if !self.rev_nats_used.contains(id) {
                self.tail.push(Op::DeleteRevNat {
                    id: *id,
                    addr: *addr,
                });
            }
        }
        for (id, entry) in &self.current.backends {
            if !self.backends_used.contains(id) {
                self.tail.push(Op::DeleteBackend {
                    id: *id,
                    addr: entry.key.addr,
                });
            }
        }
    }

    fn finish(self) -> Plan {
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

/// Applies `plan` to `state` the way the maps would change: used by tests
/// and as the agent's cache of what it wrote.
pub fn apply_to_state(state: &mut DatapathState, ops: &[Op]) {
    for op in ops {
        match op {
            Op::PutBackend { id, backend } => {
                state.backends.insert(*id, *backend);
            }
            Op::PutRevNat { id, frontend } => {
                state.rev_nats.insert(*id, (frontend.addr, frontend.port));
            }
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
            } => {
                let entry = state.frontends.entry(*frontend).or_default();
                let index = usize::from(*slot) - 1;
                if entry.slots.len() <= index {
                    entry.slots.resize(index + 1, 0);
                }
                entry.slots[index] = *backend_id;
            }
            Op::PutFrontend {
                frontend,
                count,
                rev_nat_id,
                flags,
                affinity_timeout_s,
            } => {
                let entry = state.frontends.entry(*frontend).or_default();
                entry.rev_nat_id = *rev_nat_id;
                entry.flags = *flags;
                entry.affinity_timeout_s = *affinity_timeout_s;
                entry.slots.resize(usize::from(*count), 0);
            }
            Op::PutSourceRange(range) => {
                state.source_ranges.insert(*range);
            }
            Op::DeleteSourceRange(range) => {
                state.source_ranges.remove(range);
            }
            Op::PutMarker { addr } => {
                state.markers.insert(*addr);
            }
            Op::DeleteMarker { addr } => {
                state.markers.remove(addr);
            }
            Op::DeleteSlot { frontend, slot } => {
                if let Some(entry) = state.frontends.get_mut(frontend) {
                    entry.slots.truncate(usize::from(*slot) - 1);
                }
            }
            Op::DeleteFrontend { frontend } => {
                state.frontends.remove(frontend);
            }
            Op::DeleteRevNat { id, .. } => {
                state.rev_nats.remove(id);
            }
            Op::DeleteBackend { id, .. } => {
                state.backends.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceRef;

    fn fe(addr: &str, port: u16) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn backend(addr: &str, port: u16) -> Backend {
        Backend {
            addr: addr.parse().unwrap(),
            port,
            node_local: false,
        }
    }

    fn spec(backends: &[(&str, u16)]) -> FrontendSpec {
        FrontendSpec {
            service: ServiceRef {
                namespace: "default".into(),
                name: "web".into(),
                port_name: String::new(),
            },
            kind: FrontendKind::ClusterIp,
            backends: backends
                .iter()
                .map(|(addr, port)| backend(addr, *port))
                .collect(),
            terminating: Vec::new(),
            external_local: false,
            internal_local: false,
            affinity_timeout_s: 0,
            source_ranges: Vec::new(),
        }
    }

    /// Applies the plan and checks that the result is what was desired.
    fn converge(state: &mut DatapathState, desired: &BTreeMap<Frontend, FrontendSpec>) -> Vec<Op> {
        let plan = diff(state, desired);
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        apply_to_state(state, &plan.ops);
        for (frontend, spec) in desired {
            let got = &state.frontends[frontend];
            let addrs: Vec<_> = got
                .slots
                .iter()
                .map(|id| {
                    let key = state.backends[id].key;
                    (key.addr, key.port)
                })
                .collect();
            let want: Vec<_> = spec.backends.iter().map(|b| (b.addr, b.port)).collect();
            assert_eq!(addrs, want);
            assert_eq!(
                state.rev_nats[&got.rev_nat_id],
                (frontend.addr, frontend.port)
            );
        }
        assert_eq!(state.frontends.len(), desired.len());
        assert!(diff(state, desired).ops.is_empty(), "not idempotent");
        plan.ops
    }

    #[test]
    fn new_service_writes_backends_then_slots_then_frontend() {
        let mut state = DatapathState::default();
        let desired = BTreeMap::from([(
            fe("198.19.0.10", 80),
            spec(&[("198.18.2.2", 8080), ("198.18.3.2", 8080)]),
        )]);
        let ops = converge(&mut state, &desired);
        let kinds: Vec<_> = ops
            .iter()
            .map(|op| match op {
                Op::PutRevNat { .. } => "revnat",
                Op::PutBackend { .. } => "backend",
                Op::PutSlot { .. } => "slot",
                Op::PutFrontend { .. } => "frontend",
                Op::PutMarker { .. } => "marker",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "revnat", "backend", "backend", "slot", "slot", "frontend", "marker"
            ]
        );
    }

    #[test]
    fn ids_are_stable_across_changes() {
        let mut state = DatapathState::default();
        let v4 = fe("198.19.0.10", 80);
        let v6 = fe("fd00:96::10", 80);
        let mut desired = BTreeMap::from([
            (v4, spec(&[("198.18.2.2", 8080), ("198.18.3.2", 8080)])),
            (v6, spec(&[("fd00:2::2", 8080)])),
        ]);
        converge(&mut state, &desired);
        let rev_v4 = state.frontends[&v4].rev_nat_id;
        let rev_v6 = state.frontends[&v6].rev_nat_id;
        let be_id = state.frontends[&v4].slots[1];

        desired.insert(v4, spec(&[("198.18.3.2", 8080), ("198.18.4.2", 8080)]));
        let ops = converge(&mut state, &desired);
        assert_eq!(state.frontends[&v4].rev_nat_id, rev_v4);
        assert_eq!(state.frontends[&v6].rev_nat_id, rev_v6);
        assert_eq!(state.frontends[&v4].slots[0], be_id, "kept backend id");
        // The removed backend goes last, after every slot write.
        let last = ops.last().unwrap();
        assert!(matches!(last, Op::DeleteBackend { .. }), "{ops:?}");
        // A frontend whose count did not change is not rewritten.
        assert!(!ops.iter().any(|op| matches!(op, Op::PutFrontend { .. })));
    }

    #[test]
    fn shrinking_writes_count_before_deleting_slots() {
        let mut state = DatapathState::default();
        let v4 = fe("198.19.0.10", 80);
        let mut desired = BTreeMap::from([(
            v4,
            spec(&[
                ("198.18.2.2", 8080),
                ("198.18.3.2", 8080),
                ("198.18.4.2", 8080),
            ]),
        )]);
        converge(&mut state, &desired);
        desired.insert(v4, spec(&[("198.18.2.2", 8080)]));
        let ops = converge(&mut state, &desired);
        let frontend_at = ops
            .iter()
            .position(|op| matches!(op, Op::PutFrontend { count: 1, .. }))
            .unwrap();
        let first_delete = ops
            .iter()
            .position(|op| matches!(op, Op::DeleteSlot { .. }))
            .unwrap();
        assert!(frontend_at < first_delete, "{ops:?}");
    }

    #[test]
    fn removed_frontend_deletes_slot_zero_first_and_frees_everything() {
        let mut state = DatapathState::default();
        let v4 = fe("198.19.0.10", 80);
        let desired = BTreeMap::from([(v4, spec(&[("198.18.2.2", 8080)]))]);
        converge(&mut state, &desired);
        let ops = converge(&mut state, &BTreeMap::new());
        assert!(matches!(ops[0], Op::DeleteFrontend { .. }), "{ops:?}");
        assert_eq!(state, DatapathState::default());
    }

    #[test]
    fn same_backend_in_two_services_shares_one_id() {
        let mut state = DatapathState::default();
        let desired = BTreeMap::from([
            (fe("198.19.0.10", 80), spec(&[("198.18.2.2", 8080)])),
            (fe("198.19.0.11", 80), spec(&[("198.18.2.2", 8080)])),
        ]);
        converge(&mut state, &desired);
        assert_eq!(state.backends.len(), 1);
    }

    #[test]
    fn empty_service_has_zero_count() {
        let mut state = DatapathState::default();
        let desired = BTreeMap::from([(fe("198.19.0.10", 80), spec(&[]))]);
        let ops = converge(&mut state, &desired);
        assert!(ops.contains(&Op::PutFrontend {
            frontend: fe("198.19.0.10", 80),
            count: 0,
            rev_nat_id: 1,
            flags: svc_flags::CLUSTER_IP,
            affinity_timeout_s: 0,
        }));
    }

    #[test]
    fn cluster_ips_are_marked_after_their_frontends_but_node_ports_are_not() {
        let mut state = DatapathState::default();
        let mut node_port = spec(&[("198.18.2.2", 8080)]);
        node_port.kind = FrontendKind::NodePort;
        let desired = BTreeMap::from([
            (fe("198.19.0.10", 80), spec(&[("198.18.2.2", 8080)])),
            (fe("198.18.0.1", 30080), node_port),
        ]);
        let ops = converge(&mut state, &desired);
        let marker = ops
            .iter()
            .position(|op| matches!(op, Op::PutMarker { .. }))
            .unwrap();
        let last_frontend = ops
            .iter()
            .rposition(|op| matches!(op, Op::PutFrontend { .. }))
            .unwrap();
        assert!(marker > last_frontend, "{ops:?}");
        assert_eq!(
            state.markers,
            BTreeSet::from(["198.19.0.10".parse::<IpAddr>().unwrap()])
        );
        converge(&mut state, &BTreeMap::new());
        assert!(state.markers.is_empty());
    }

    #[test]
    fn flags_and_affinity_changes_rewrite_the_frontend() {
        let mut state = DatapathState::default();
        let v4 = fe("198.19.0.10", 80);
        let mut web = spec(&[("198.18.2.2", 8080)]);
        converge(&mut state, &BTreeMap::from([(v4, web.clone())]));
        web.affinity_timeout_s = 30;
        let ops = converge(&mut state, &BTreeMap::from([(v4, web.clone())]));
        assert_eq!(
            ops,
            [Op::PutFrontend {
                frontend: v4,
                count: 1,
                rev_nat_id: 1,
                flags: svc_flags::CLUSTER_IP | svc_flags::AFFINITY,
                affinity_timeout_s: 30,
            }]
        );
        web.affinity_timeout_s = 0;
        let ops = converge(&mut state, &BTreeMap::from([(v4, web)]));
        assert!(matches!(
            ops[..],
            [Op::PutFrontend {
                flags: svc_flags::CLUSTER_IP,
                ..
            }]
        ));
    }

    #[test]
    fn source_ranges_go_in_before_the_flag_and_out_after_it() {
        let mut state = DatapathState::default();
        let lb = fe("198.19.1.1", 80);
        let mut spec_lb = spec(&[("198.18.2.2", 8080)]);
        spec_lb.kind = FrontendKind::LoadBalancer;
        spec_lb.source_ranges = vec![("198.18.1.0".parse().unwrap(), 24)];
        let ops = converge(&mut state, &BTreeMap::from([(lb, spec_lb.clone())]));
        let range = ops
            .iter()
            .position(|op| matches!(op, Op::PutSourceRange(_)))
            .unwrap();
        let frontend = ops
            .iter()
            .position(|op| matches!(op, Op::PutFrontend { flags, .. } if flags & svc_flags::SOURCE_RANGES != 0))
            .unwrap();
        assert!(range < frontend);
        spec_lb.source_ranges.clear();
        let ops = converge(&mut state, &BTreeMap::from([(lb, spec_lb)]));
        let frontend = ops
            .iter()
            .position(|op| matches!(op, Op::PutFrontend { .. }))
            .unwrap();
        let removed = ops
            .iter()
            .position(|op| matches!(op, Op::DeleteSourceRange(_)))
            .unwrap();
        assert!(frontend < removed);
        assert!(state.source_ranges.is_empty());
    }

    #[test]
    fn terminating_backends_stay_without_slots_and_local_is_flagged() {
        let mut state = DatapathState::default();
        let v4 = fe("198.19.0.10", 80);
        let mut web = spec(&[("198.18.2.2", 8080), ("198.18.3.2", 8080)]);
        web.backends[0].node_local = true;
        converge(&mut state, &BTreeMap::from([(v4, web.clone())]));
        let terminating = web.backends.remove(1);
        web.terminating = vec![terminating];
        converge(&mut state, &BTreeMap::from([(v4, web.clone())]));
        assert_eq!(state.frontends[&v4].slots.len(), 1);
        let flags: Vec<u8> = state.backends.values().map(|b| b.flags).collect();
        assert_eq!(flags, [backend_flags::LOCAL, backend_flags::TERMINATING]);
        // Gone from the slice: gone from the maps.
        web.terminating.clear();
        converge(&mut state, &BTreeMap::from([(v4, web)]));
        assert_eq!(state.backends.len(), 1);
    }

    #[test]
    fn allocator_moves_forward_and_wraps() {
        let mut alloc = IdAllocator::new([1, 2, 5], 6);
        assert_eq!(alloc.allocate(), Some(6));
        assert_eq!(alloc.allocate(), Some(3));
        assert_eq!(alloc.allocate(), Some(4));
        assert_eq!(alloc.allocate(), None);
    }

    #[test]
    fn new_ids_continue_after_the_highest_in_use() {
        let mut state = DatapathState::default();
        let a = fe("198.19.0.10", 80);
        let b = fe("198.19.0.11", 80);
        converge(&mut state, &BTreeMap::from([(a, spec(&[]))]));
        converge(&mut state, &BTreeMap::new());
        converge(&mut state, &BTreeMap::from([(b, spec(&[]))]));
        assert_eq!(state.frontends[&b].rev_nat_id, 1, "empty maps start at 1");
        converge(
            &mut state,
            &BTreeMap::from([(b, spec(&[])), (a, spec(&[]))]),
        );
        assert_eq!(state.frontends[&a].rev_nat_id, 2);
    }
    use crate::test_rng::Rng;

    /// One or two frontends added, changed or removed, from small pools, so that backends are shared,
    /// change flags, and addresses carry several frontends of both kinds.
    fn random_change(
        rng: &mut Rng,
        desired: &BTreeMap<Frontend, FrontendSpec>,
    ) -> BTreeMap<Frontend, FrontendSpec> {
        let addrs = ["198.19.0.1", "198.19.0.2", "fd00::1", "fd00::2"];
        let backends = [
            "198.18.2.1",
            "198.18.2.2",
            "198.18.2.3",
            "fd00:2::1",
            "fd00:2::2",
        ];
        let mut desired = desired.clone();
        for _ in 0..=rng.below(2) {
            let frontend = Frontend {
                addr: rng.pick(&addrs).parse().unwrap(),
                port: rng.pick(&[80, 443]),
                proto: rng.pick(&[Protocol::Tcp, Protocol::Udp]),
            };
            if rng.below(3) == 0 {
                desired.remove(&frontend);
                continue;
            }
            let pick_backends = |rng: &mut Rng| -> Vec<Backend> {
                let mut list: Vec<Backend> = (0..rng.below(4))
                    .map(|_| Backend {
                        addr: rng.pick(&backends).parse().unwrap(),
                        port: rng.pick(&[8080, 8443]),
                        node_local: rng.below(2) == 0,
                    })
                    .collect();
                list.sort_unstable();
                list.dedup_by(|a, b| a.addr == b.addr && a.port == b.port);
                list
            };
            let mut spec = spec(&[]);
            spec.backends = pick_backends(rng);
            spec.terminating = pick_backends(rng);
            spec.kind = rng.pick(&[FrontendKind::ClusterIp, FrontendKind::LoadBalancer]);
            spec.affinity_timeout_s = rng.pick(&[0, 30]);
            if spec.kind.is_external() && rng.below(2) == 0 {
                spec.source_ranges = vec![(frontend.addr, rng.pick(&[8, 16]))];
            }
            desired.insert(frontend, spec);
        }
        desired
    }

    /// A plan over only the changed frontends leaves the maps exactly as a
    /// plan over everything does, ids included, through random changes.
    #[test]
    fn diff_of_changes_matches_full_diff() {
        for seed in 1..200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut state = DatapathState::default();
            let mut desired = BTreeMap::new();
            let mut index = PlanIndex::new(&state, &desired);
            for step in 0..40 {
                let next = random_change(&mut rng, &desired);
                let mut changes = FrontendChanges::new();
                for (frontend, spec) in &desired {
                    if next.get(frontend) != Some(spec) {
                        changes.insert(*frontend, Some(spec.clone()));
                    }
                }
                for frontend in next.keys() {
                    if !desired.contains_key(frontend) {
                        changes.insert(*frontend, None);
                    }
                }
                let full = diff(&state, &next);
                let mut expected = state.clone();
                apply_to_state(&mut expected, &full.ops);

                let scoped = diff_changes(&state, &mut index, &next, &changes);
                assert!(scoped.problems.is_empty());
                let mut got = state.clone();
                apply_to_state(&mut got, &scoped.ops);
                assert_eq!(got, expected, "seed {seed} step {step}: {:?}", scoped.ops);
                index.note_applied(&state, &scoped.ops);
                state = got;
                desired = next;
                assert_eq!(
                    index.backend_ids,
                    PlanIndex::new(&state, &desired).backend_ids,
                    "seed {seed} step {step}"
                );
            }
        }
    }
}
