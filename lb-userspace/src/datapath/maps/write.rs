//! Applying a plan to the maps: in the plan's order where it matters, in
//! `BPF_MAP_UPDATE_BATCH`es where it does not, and never a write that refers
//! to one that failed.

use lb_common::{LbService, limits, svc_flags};

use super::{Maps, MapsError, family::FamilyOps, marker};
use crate::{
    fast_hash::FastHashSet,
    model::Frontend,
    plan::{FrontendWrite, Op},
};

impl Maps {
    /// Applies `ops` in order, telling `on_result` how each went.
    ///
    /// Writes to the service and backend maps go to the kernel as
    /// `BPF_MAP_UPDATE_BATCH`es (aya 0.16 has none), which makes a first
    /// sync of 10k Services several times faster. Where a batch fails, the
    /// rest of it is written one by one, so that every failure is reported
    /// with its op. The plan's order is kept where it matters: a run of new
    /// backends, rev-NAT entries and source ranges (independent of each
    /// other) may be written in any order; a run of slot, frontend and
    /// marker writes keeps its order per family (each family has its own
    /// map). Large runs write each map that has writes on its own thread
    /// (the IPv4 and the IPv6 map of a run in parallel).
    ///
    /// A write that refers to one that failed (a slot to its backend, a
    /// frontend to its rev-NAT entry or to its slots) is left out and
    /// reported as [`MapsError::Unwritable`]: when a map is full, the
    /// frontends that do not fit stay out whole, and a frontend already
    /// there keeps its last complete entry.
    pub fn apply_ops(&mut self, ops: &[Op], on_result: &mut dyn FnMut(&Op, Result<(), MapsError>)) {
        self.apply_ops_on(Threads::PerMap, ops, on_result);
    }

    /// [`apply_ops`](Self::apply_ops) on the calling thread alone: for a
    /// caller that keeps the other core busy itself (a cold start's plan,
    /// written in pieces while the rest is planned).
    pub fn apply_ops_on_this_thread(
        &mut self,
        ops: &[Op],
        on_result: &mut dyn FnMut(&Op, Result<(), MapsError>),
    ) {
        self.apply_ops_on(Threads::This, ops, on_result);
    }

    fn apply_ops_on(
        &mut self,
        threads: Threads,
        ops: &[Op],
        on_result: &mut dyn FnMut(&Op, Result<(), MapsError>),
    ) {
        // First, so that the record has its entry before the backends fill
        // the map, and an id is recorded as used before any entry names it.
        self.record_next_backend_id(ops);
        let mut outcomes = Outcomes {
            failed: Failed::default(),
            on_result,
        };
        let on_result = &mut outcomes;
        let mut start = 0;
        while start < ops.len() {
            let class = RunClass::of(&ops[start]);
            let end = start
                + ops[start..]
                    .iter()
                    .take_while(|op| RunClass::of(op) == class)
                    .count();
            let run = &ops[start..end];
            if class == RunClass::Single {
                for op in run {
                    self.apply_one(op, on_result);
                }
            } else {
                self.apply_run(run, threads, on_result);
            }
            start = end;
        }
    }

    /// Writes a run of reorderable ops: batches per map (in parallel when
    /// large), then what cannot be batched and what a batch left, one by one.
    fn apply_run(&mut self, run: &[Op], threads: Threads, on_result: &mut Outcomes<'_>) {
        const PARALLEL_FROM: usize = 4096;
        let mut groups: [Vec<&Op>; BatchTarget::ALL.len()] = Default::default();
        let mut singles = Vec::new();
        for op in run {
            if let Some(error) = on_result.failed.blocks(op) {
                on_result.report(op, Err(error));
                continue;
            }
            match BatchTarget::of(op) {
                Some(target) => groups[target.index()].push(op),
                None => singles.push(op),
            }
        }
        let mut written = [0usize; BatchTarget::ALL.len()];
        let this = &*self;
        if threads == Threads::PerMap && run.len() >= PARALLEL_FROM {
            // One thread per map that has writes (a run holds one kind of
            // map, so in practice the IPv4 and the IPv6 one).
            std::thread::scope(|scope| {
                let handles: Vec<_> = BatchTarget::ALL
                    .iter()
                    .zip(&groups)
                    .map(|(target, group)| {
                        (!group.is_empty())
                            .then(|| scope.spawn(move || this.update_batch(*target, group)))
                    })
                    .collect();
                for (slot, handle) in written.iter_mut().zip(handles) {
                    *slot = handle.map_or(0, |handle| handle.join().unwrap_or(0));
                }
            });
        } else {
            for ((slot, target), group) in written.iter_mut().zip(BatchTarget::ALL).zip(&groups) {
                *slot = this.update_batch(target, group);
            }
        }
        for (group, written) in groups.iter().zip(written) {
            for op in &group[..written] {
                on_result.report(op, Ok(()));
            }
            for op in &group[written..] {
                self.apply_one(op, on_result);
            }
        }
        for op in singles {
            self.apply_one(op, on_result);
        }
    }

    /// Writes `op` unless it refers to a write that failed.
    fn apply_one(&mut self, op: &Op, on_result: &mut Outcomes<'_>) {
        let result = match on_result.failed.blocks(op) {
            Some(error) => Err(error),
            None => self.apply_op(op),
        };
        on_result.report(op, result);
    }

    /// Writes a run of ops to `target` as one batch; returns how many the
    /// kernel wrote (all, or those before the one that failed).
    fn update_batch(&self, target: BatchTarget, run: &[&Op]) -> usize {
        if run.len() < 2 {
            return 0;
        }
        // A rev-NAT id starts with zeroed counters (see `Maps::apply_op`);
        // when they cannot be zeroed in one batch, the writes go one by one,
        // each with its own reset.
        if target.kind == BatchKind::RevNats && !self.reset_stats_batch(run) {
            return 0;
        }
        let family = if target.v4 {
            &self.v4 as &dyn FamilyOps
        } else {
            &self.v6
        };
        family.update_batch(target.kind, run)
    }
}

/// Where the batches of a large run are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Threads {
    /// Each map's on a thread of its own.
    PerMap,
    /// All on the calling thread.
    This,
}

/// The results of one `apply_ops`, and what failed so far.
struct Outcomes<'a> {
    failed: Failed,
    on_result: &'a mut dyn FnMut(&Op, Result<(), MapsError>),
}

impl Outcomes<'_> {
    fn report(&mut self, op: &Op, result: Result<(), MapsError>) {
        if result.is_err() {
            self.failed.note(op);
        }
        (self.on_result)(op, result);
    }
}

/// Writes that failed, as what later writes may refer to.
#[derive(Default)]
struct Failed {
    /// New backends not in the backend map.
    backend_ids: FastHashSet<u32>,
    /// Frontends with a failed slot or rev-NAT write.
    frontends: FastHashSet<Frontend>,
}

impl Failed {
    fn note(&mut self, op: &Op) {
        match *op {
            Op::PutBackend { id, .. } => {
                self.backend_ids.insert(id);
            }
            Op::PutRevNat { frontend, .. } | Op::PutSlot { frontend, .. } => {
                self.frontends.insert(frontend);
            }
            _ => {}
        }
    }

    /// Why `op` must not be written, if it must not.
    fn blocks(&self, op: &Op) -> Option<MapsError> {
        if self.backend_ids.is_empty() && self.frontends.is_empty() {
            return None;
        }
        let (what, because) = match *op {
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
            } => {
                let what = format!("write slot {slot} of {frontend}");
                if self.backend_ids.contains(&backend_id) {
                    (what, format!("backend {backend_id} could not be written"))
                } else if self.frontends.contains(&frontend) {
                    (what, format!("an earlier write of {frontend} failed"))
                } else {
                    return None;
                }
            }
            Op::PutFrontend(ref write) if self.frontends.contains(&write.frontend) => (
                format!("write slot 0 of {}", write.frontend),
                "its rev-NAT entry or one of its slots could not be written".to_owned(),
            ),
            Op::PutFrontend(ref write) => {
                let backend_id = write
                    .inline
                    .iter()
                    .find(|id| self.backend_ids.contains(id))?;
                (
                    format!("write slot 0 of {}", write.frontend),
                    format!("backend {backend_id} could not be written"),
                )
            }
            _ => return None,
        };
        Some(MapsError::Unwritable { what, because })
    }
}

/// Which of a family's maps a batch goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BatchKind {
    Services,
    Backends,
    RevNats,
}

/// The map a batched write goes to: its family and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BatchTarget {
    v4: bool,
    kind: BatchKind,
}

/// How a run of consecutive ops may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunClass {
    /// New backends, rev-NAT entries, source ranges: any order.
    IndependentPuts,
    /// Slots, frontends, markers: in order within each family.
    ServiceWrites,
    /// Removals: one by one, in order.
    Single,
}

impl RunClass {
    fn of(op: &Op) -> Self {
        match op {
            Op::PutBackend { .. } | Op::PutRevNat { .. } | Op::PutSourceRange(_) => {
                Self::IndependentPuts
            }
            Op::PutSlot { .. } | Op::PutFrontend(_) | Op::PutMarker { .. } => Self::ServiceWrites,
            _ => Self::Single,
        }
    }
}

impl BatchTarget {
    /// Every target, in the order of `apply_run`'s groups.
    const ALL: [Self; 6] = [
        Self::new(true, BatchKind::Services),
        Self::new(false, BatchKind::Services),
        Self::new(true, BatchKind::Backends),
        Self::new(false, BatchKind::Backends),
        Self::new(true, BatchKind::RevNats),
        Self::new(false, BatchKind::RevNats),
    ];

    const fn new(v4: bool, kind: BatchKind) -> Self {
        Self { v4, kind }
    }

    /// Where `op` goes as part of a batch, if it can be batched.
    fn of(op: &Op) -> Option<Self> {
        match op {
            Op::PutSlot { frontend, .. } => {
                Some(Self::new(frontend.addr.is_ipv4(), BatchKind::Services))
            }
            Op::PutFrontend(write) => Some(Self::new(
                write.frontend.addr.is_ipv4(),
                BatchKind::Services,
            )),
            Op::PutMarker { addr } => Some(Self::new(addr.is_ipv4(), BatchKind::Services)),
            Op::PutBackend { backend, .. } => {
                Some(Self::new(backend.key.addr.is_ipv4(), BatchKind::Backends))
            }
            Op::PutRevNat { frontend, .. } => {
                Some(Self::new(frontend.addr.is_ipv4(), BatchKind::RevNats))
            }
            _ => None,
        }
    }

    /// Index of this target's group in `apply_run`.
    fn index(self) -> usize {
        Self::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// The service-map write an op makes: key parts and value.
pub(super) fn service_write(op: &Op) -> Option<(Frontend, u16, LbService)> {
    match *op {
        Op::PutSlot {
            frontend,
            slot,
            backend_id,
        } => Some((
            frontend,
            slot,
            LbService {
                backend_id,
                ..LbService::default()
            },
        )),
        Op::PutFrontend(ref write) => {
            let FrontendWrite {
                frontend,
                count,
                rev_nat_id,
                flags,
                affinity_timeout_s,
                affinity_group,
                ref inline,
            } = **write;
            let mut slots = [0; limits::INLINE_SLOTS];
            for (slot, id) in slots.iter_mut().zip(inline.iter()) {
                *slot = *id;
            }
            Some((
                frontend,
                0,
                LbService {
                    // Slot 0's `backend_id` is the frontend's affinity group.
                    backend_id: affinity_group,
                    count,
                    flags,
                    rev_nat_id,
                    affinity_timeout_s,
                    slots,
                },
            ))
        }
        Op::PutMarker { addr } => Some((
            marker(addr),
            0,
            LbService {
                flags: svc_flags::ADDRESS_MARKER,
                ..LbService::default()
            },
        )),
        _ => None,
    }
}
