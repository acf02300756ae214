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
//! Ids are stable: a frontend keeps its rev-NAT id and a backend keeps its
//! backend id for as long as they exist, also across agent restarts (the
//! state is read back from the pinned maps).
//!
//! A backend entry belongs to one frontend (its rev-NAT id is part of the
//! entry), so that the datapath accepts a flow or an affinity entry only
//! while its backend is one of *that* frontend's: an endpoint behind two
//! frontends has two entries, two ids. A backend id is its entry's index
//! in its family's backend array (an IPv6 id with
//! `limits::BACKEND_ID_V6` set). Ids only move forward
//! ([`DatapathState::next_backend_id`]), wrapping at the array's end: an
//! id freed is handed out again only after all the others, and a stale
//! conntrack or affinity entry naming it then is refused by the
//! datapath unless the new backend is of the same frontend.
//!
//! Where each part lives: this file holds the state and op types and
//! [`apply_to_state`]; `diff` plans over all frontends ([`diff()`]),
//! `incremental` over the changed ones only ([`diff_changes`]), and `ids`
//! allocates backend and rev-NAT ids.

mod diff;
mod ids;
mod incremental;
#[cfg(test)]
mod test_fixtures;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{Frontend, Protocol, REPACK_MIN, repack_if_grown};

pub use diff::{diff, diff_in_pieces};
pub use incremental::{PlanIndex, diff_changes};

/// A backend as stored in the backend maps: one endpoint of one frontend.
/// Ordered by frontend first, so that a frontend's backends are a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// Rev-NAT id of the frontend the entry belongs to.
    pub rev_nat_id: u32,
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
    /// Session-affinity group (slot 0's `backend_id`): the same for every
    /// frontend of a Service port and family; 0 without affinity.
    pub affinity_group: u32,
}

/// A source-range entry: frontend rev-NAT id, prefix address, prefix length.
pub type SourceRange = (u32, IpAddr, u8);

/// What the maps hold, in userspace terms.
#[derive(Clone, Debug, Default)]
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
    /// Per family, backend ids below this were handed out already: new
    /// ones start here (0: after the family's highest id in `backends`). Read back from the maps it
    /// is what `Maps::apply_ops` recorded there (or the highest id + 1
    /// without a record); should a record be lost, the datapath's
    /// per-frontend check still keeps a stale entry naming an id handed out
    /// again off every other frontend's backends. Not an entry of the
    /// maps' frontends or backends: equality leaves it out.
    pub next_backend_id: BackendIdFloors,
    /// Largest backend index the backend arrays hold (`--max-backends`;
    /// index 0 is a record, see `datapath::maps`); 0: the default
    /// (`limits::DEFAULT_BACKENDS`). Not an entry: equality leaves it out.
    pub backend_index_max: u32,
    /// Largest rev-NAT id the maps can count (the per-service stats map is
    /// sized from `--max-services`, see `loader::Capacities`); 0: the whole
    /// id space (`limits::MAX_FRONTENDS - 1`). Not an entry: equality
    /// leaves it out.
    pub rev_nat_id_max: u32,
}

/// Per family, the backend id new ones start from
/// (`DatapathState::next_backend_id`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendIdFloors {
    /// IPv4 ids.
    pub v4: u32,
    /// IPv6 ids (`limits::BACKEND_ID_V6` set).
    pub v6: u32,
}

impl BackendIdFloors {
    /// The floor of `id`'s family.
    pub fn of_mut(&mut self, id: u32) -> &mut u32 {
        if id & lb_common::limits::BACKEND_ID_V6 == 0 {
            &mut self.v4
        } else {
            &mut self.v6
        }
    }
}

impl DatapathState {
    /// No entry of any map: what a cold start's freshly made maps hold.
    #[must_use]
    pub fn has_no_entries(&self) -> bool {
        self.frontends.is_empty()
            && self.backends.is_empty()
            && self.rev_nats.is_empty()
            && self.markers.is_empty()
            && self.source_ranges.is_empty()
    }

    /// Largest backend index to hand out in each family.
    #[must_use]
    pub fn backend_index_limit(&self) -> u32 {
        if self.backend_index_max == 0 {
            lb_common::limits::DEFAULT_BACKENDS
        } else {
            self.backend_index_max
        }
    }

    /// Largest rev-NAT id to hand out.
    #[must_use]
    pub fn rev_nat_id_limit(&self) -> u32 {
        if self.rev_nat_id_max == 0 {
            lb_common::limits::MAX_FRONTENDS - 1
        } else {
            self.rev_nat_id_max
        }
    }
}

impl PartialEq for DatapathState {
    fn eq(&self, other: &Self) -> bool {
        self.frontends == other.frontends
            && self.backends == other.backends
            && self.rev_nats == other.rev_nats
            && self.markers == other.markers
            && self.source_ranges == other.source_ranges
    }
}

impl Eq for DatapathState {}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Insert or overwrite backend `id`.
    PutBackend { id: u32, backend: BackendEntry },
    /// Insert rev-NAT `id` for `frontend` (and zero its counters).
    PutRevNat { id: u32, frontend: Frontend },
    /// Point `slot` (> `lb_common::limits::INLINE_SLOTS`) of `frontend` at
    /// `backend_id`.
    PutSlot {
        frontend: Frontend,
        slot: u16,
        backend_id: u32,
    },
    /// Write slot 0 of a frontend. Boxed: the largest op, one in 13 of a
    /// first sync's plan, would make every op its size (56 bytes instead
    /// of 40, for 2.6M ops at 100k Services).
    PutFrontend(Box<FrontendWrite>),
    /// Allow a client prefix into a frontend.
    PutSourceRange(SourceRange),
    /// Mark `addr` as a service address (unserved ports are rejected).
    PutMarker { addr: IpAddr },
    /// Remove a client prefix of a frontend.
    DeleteSourceRange(SourceRange),
    /// Remove the service-address mark of `addr`.
    DeleteMarker { addr: IpAddr },
    /// Remove `slot` (> `lb_common::limits::INLINE_SLOTS`) of `frontend`.
    DeleteSlot { frontend: Frontend, slot: u16 },
    /// Remove slot 0 of `frontend`.
    DeleteFrontend { frontend: Frontend },
    /// Remove rev-NAT `id` of the family of `addr`.
    DeleteRevNat { id: u32, addr: IpAddr },
    /// Remove backend `id` of the family of `addr`.
    DeleteBackend { id: u32, addr: IpAddr },
}

/// Slot 0 of a frontend as [`Op::PutFrontend`] writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendWrite {
    /// The frontend.
    pub frontend: Frontend,
    /// Its number of slots.
    pub count: u16,
    /// Its rev-NAT id.
    pub rev_nat_id: u32,
    /// `lb_common::svc_flags` bits.
    pub flags: u16,
    /// Session-affinity timeout (0: none).
    pub affinity_timeout_s: u32,
    /// See `FrontendState::affinity_group`.
    pub affinity_group: u32,
    /// The backend ids of its first slots, up to
    /// `lb_common::limits::INLINE_SLOTS` (`count` of them at most): they
    /// are in slot 0's entry, slots after them have their own.
    pub inline: InlineSlots,
}

/// Up to `lb_common::limits::INLINE_SLOTS` backend ids, held in place: a
/// first sync writes every frontend, and an allocation of its own for
/// each list was 200k more at 100k Services. Reads as a slice. The ids
/// past `len` are always 0 (only `From` and `Default` make one), so the
/// derived equality is the slices'.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct InlineSlots {
    ids: [u32; lb_common::limits::INLINE_SLOTS],
    len: u8,
}

const _: () = assert!(lb_common::limits::INLINE_SLOTS <= u8::MAX as usize);

impl std::ops::Deref for InlineSlots {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        &self.ids[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for InlineSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl From<&[u32]> for InlineSlots {
    /// The first `INLINE_SLOTS` of `ids` (the rest are not inline).
    fn from(ids: &[u32]) -> Self {
        let mut slots = Self::default();
        let len = ids.len().min(slots.ids.len());
        slots.ids[..len].copy_from_slice(&ids[..len]);
        slots.len = u8::try_from(len).unwrap_or(u8::MAX);
        slots
    }
}

/// The plan, and what could not be planned.
#[derive(Debug, Default)]
pub struct Plan {
    /// Map writes in the order they must happen.
    pub ops: Vec<Op>,
    /// Frontends left out, with the reason (id space or slot limit).
    pub problems: Vec<String>,
}

/// Applies `plan` to `state` the way the maps would change: used by tests
/// and as the agent's cache of what it wrote.
pub fn apply_to_state(state: &mut DatapathState, ops: &[Op]) {
    let mut applier = PieceApplier::new(state, backend_puts(ops));
    applier.apply(state, ops);
    applier.finish(state).repack_grown(state);
}

/// [`apply_to_state`] for the agent, which has written `ops` and no longer
/// needs them: they are freed as they are applied (a plan over everything
/// is ~180 MiB at 100k Services, and the state grows
/// by about as much), and the grown maps are not repacked: the caller does
/// that with the sizes returned, once the rest of the plan is gone (a
/// repack copies a map's entries once more).
#[must_use = "repack the grown maps with StateSizes::repack_grown"]
pub fn apply_owned_to_state(state: &mut DatapathState, ops: Vec<Op>) -> StateSizes {
    // 10 MiB of ops applied between two frees of the applied ones.
    apply_owned_in_chunks(state, ops, 1 << 18)
}

/// [`apply_owned_to_state`], freeing the applied ops every `chunk` ops.
#[must_use]
pub(crate) fn apply_owned_in_chunks(
    state: &mut DatapathState,
    mut ops: Vec<Op>,
    chunk: usize,
) -> StateSizes {
    let mut applier = PieceApplier::new(state, backend_puts(&ops));
    // Last op first, so that the applied ones are cut off the end.
    ops.reverse();
    while !ops.is_empty() {
        let done = ops.split_off(ops.len().saturating_sub(chunk.max(1)));
        ops.shrink_to_fit();
        applier.apply(state, done.iter().rev());
    }
    applier.finish(state)
}

/// How many backends `ops` put.
fn backend_puts(ops: &[Op]) -> usize {
    ops.iter()
        .filter(|op| matches!(op, Op::PutBackend { .. }))
        .count()
}

/// Applies a plan to the state piece after piece, each as it is written:
/// the pieces one after another change the state as [`apply_to_state`]
/// changes it with them all (a first sync's pieces come back from the
/// writes while the rest is planned, see [`diff_in_pieces`]). The grown
/// maps are not repacked: the caller does that with the sizes `finish`
/// returns, once the pieces are gone.
#[derive(Debug)]
pub struct PieceApplier {
    /// The state's sizes before the first piece.
    sizes: StateSizes,
    /// New backends, collected while the state had none.
    new_backends: NewBackends,
}

impl PieceApplier {
    /// Before the first piece applied to `state`; `backend_puts` is about
    /// how many backends the pieces put (room is made for them).
    #[must_use]
    pub fn new(state: &DatapathState, backend_puts: usize) -> Self {
        Self {
            sizes: StateSizes::of(state),
            new_backends: NewBackends::for_state(state, backend_puts),
        }
    }

    /// Applies the next piece.
    pub fn apply<'a>(&mut self, state: &mut DatapathState, ops: impl IntoIterator<Item = &'a Op>) {
        apply_ops(state, ops, &mut self.new_backends);
    }

    /// Makes the new backends collected so far the state's map now (those
    /// of later pieces are inserted into it one by one): for a caller
    /// waiting for a last piece that puts none, the markers and removals.
    pub fn build_backends(&mut self, state: &mut DatapathState) {
        self.new_backends.flush(&mut state.backends);
    }

    /// After the last piece: the sizes to repack `state` with.
    #[must_use = "repack the grown maps with StateSizes::repack_grown"]
    pub fn finish(mut self, state: &mut DatapathState) -> StateSizes {
        self.new_backends.finish(state, &mut self.sizes);
        self.sizes
    }
}

/// The backends put into a state that had none (a first sync), collected
/// and made into its map at once. Their ids come in ascending order, and a
/// B-tree built from sorted entries has full nodes in one pass; inserted
/// one by one, the 2M backends of 100k Services left every node half
/// full, and the repack that rebuilt them ran on the agent's loop after
/// the sync (~0.2 s there, before the next change could be taken).
#[derive(Debug)]
struct NewBackends {
    /// The backends put so far, while the state's map is empty.
    collected: Option<Vec<(u32, BackendEntry)>>,
    /// Whether the state's map was made of them.
    built: bool,
}

impl NewBackends {
    /// Collecting when `state` has no backends yet, with room for `puts`.
    fn for_state(state: &DatapathState, puts: usize) -> Self {
        let collected = state.backends.is_empty().then(|| Vec::with_capacity(puts));
        Self {
            collected,
            built: false,
        }
    }

    /// Makes what was collected the map `backends`, empty until then (a
    /// later entry of an id wins, as an insert does).
    fn flush(&mut self, backends: &mut BTreeMap<u32, BackendEntry>) {
        if let Some(collected) = self.collected.take() {
            debug_assert!(backends.is_empty());
            *backends = collected.into_iter().collect();
            self.built = true;
        }
    }

    /// Flushes into `state`; a map made here needs no repack.
    fn finish(mut self, state: &mut DatapathState, sizes: &mut StateSizes) {
        self.flush(&mut state.backends);
        if self.built {
            sizes.backends = state.backends.len();
        }
    }
}

/// How many entries a state's maps held before an apply.
#[derive(Clone, Copy, Debug)]
pub struct StateSizes {
    frontends: usize,
    backends: usize,
    rev_nats: usize,
    markers: usize,
}

impl StateSizes {
    fn of(state: &DatapathState) -> Self {
        Self {
            frontends: state.frontends.len(),
            backends: state.backends.len(),
            rev_nats: state.rev_nats.len(),
            markers: state.markers.len(),
        }
    }

    /// Rebuilds with full nodes the maps of `state` that more than doubled
    /// since these sizes.
    pub fn repack_grown(self, state: &mut DatapathState) {
        repack_if_grown(&mut state.frontends, self.frontends);
        repack_if_grown(&mut state.backends, self.backends);
        repack_if_grown(&mut state.rev_nats, self.rev_nats);
        if state.markers.len() > 2 * self.markers + REPACK_MIN {
            state.markers = std::mem::take(&mut state.markers).into_iter().collect();
        }
    }
}

fn apply_ops<'a>(
    state: &mut DatapathState,
    ops: impl IntoIterator<Item = &'a Op>,
    new_backends: &mut NewBackends,
) {
    // The frontend the last slot op went to: a frontend's slot ops come
    // one after another, and looking its entry up again for each was a
    // third of a first sync's apply at 100k Services. The ops that change
    // the frontends otherwise let it go first.
    let mut current: Option<(Frontend, &mut FrontendState)> = None;
    for op in ops {
        match op {
            Op::PutBackend { id, backend } => {
                match &mut new_backends.collected {
                    Some(collected) => collected.push((*id, *backend)),
                    None => {
                        state.backends.insert(*id, *backend);
                    }
                }
                let floor = state.next_backend_id.of_mut(*id);
                *floor = (*floor).max(id.saturating_add(1));
            }
            Op::PutRevNat { id, frontend } => {
                state.rev_nats.insert(*id, (frontend.addr, frontend.port));
            }
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
            } => {
                let entry = match current.take() {
                    Some((known, entry)) if known == *frontend => entry,
                    _ => state.frontends.entry(*frontend).or_default(),
                };
                let index = usize::from(*slot) - 1;
                if entry.slots.len() <= index {
                    entry.slots.resize(index + 1, 0);
                }
                entry.slots[index] = *backend_id;
                current = Some((*frontend, entry));
            }
            Op::PutFrontend(write) => {
                current = None;
                let entry = state.frontends.entry(write.frontend).or_default();
                entry.rev_nat_id = write.rev_nat_id;
                entry.flags = write.flags;
                entry.affinity_timeout_s = write.affinity_timeout_s;
                entry.affinity_group = write.affinity_group;
                entry.slots.resize(usize::from(write.count), 0);
                let inline = write.inline.len().min(entry.slots.len());
                entry.slots[..inline].copy_from_slice(&write.inline[..inline]);
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
                current = None;
                if let Some(entry) = state.frontends.get_mut(frontend) {
                    entry.slots.truncate(usize::from(*slot) - 1);
                }
            }
            Op::DeleteFrontend { frontend } => {
                current = None;
                state.frontends.remove(frontend);
            }
            Op::DeleteRevNat { id, .. } => {
                state.rev_nats.remove(id);
            }
            Op::DeleteBackend { id, .. } => {
                // Not in a first sync's plan; should one come, what was
                // collected goes into the map first.
                new_backends.flush(&mut state.backends);
                state.backends.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod size {
    /// A first sync's plan holds 2.6M ops at 100k Services: a variant that
    /// grows past a backend write's size makes them all larger.
    #[test]
    fn an_op_is_no_larger_than_40_bytes() {
        assert!(size_of::<super::Op>() <= 40, "{}", size_of::<super::Op>());
    }
}
