//! A cold start's sync, written while it is planned: the plan over every
//! frontend goes to the maps in pieces (`plan::diff_in_pieces`), written
//! on a thread of their own while the agent's loop plans the next piece
//! and applies the written ones to its state.
//!
//! Why: at 100k Services a first sync planned (~0.35 s), then wrote (~0.5
//! s on both cores), then applied the plan to the state (~0.45 s), one
//! after the other, with a core idle through the planning and the state's
//! bookkeeping. Only onto maps with no entries (a fresh start), whose
//! state the planner can read from a copy that costs nothing while the
//! loop changes the real one: a restart onto pinned maps plans and writes
//! as any other sync.

use std::collections::BTreeMap;
use std::sync::mpsc;

use super::reconcile::{Applied, changes_backends, read_back};
use crate::{
    datapath::maps::{Maps, MapsError},
    model::{Frontend, FrontendSpec},
    plan::{self, DatapathState, Op, PieceApplier, Plan},
};

/// Ops per piece: ~2.5 MiB of them, ~5k frontends of 10 endpoints.
const PIECE_OPS: usize = 1 << 16;

/// A written piece, back from the writes' thread.
struct WrittenPiece {
    ops: Vec<Op>,
    writes: u64,
    /// The ops the maps refused (rare: a copy of each), with why.
    failed: Vec<(Op, MapsError)>,
}

/// Whether a plan over everything against `state` goes in pieces: maps
/// with no entries.
pub(super) fn suits(state: &DatapathState) -> bool {
    state.has_no_entries()
}

/// The loop's side: the written pieces taken back, counted and applied.
struct TakenBack<'a> {
    on_failure: &'a mut dyn FnMut(&Op, &MapsError),
    to_state: PieceApplier,
    applied: Applied,
    /// The ops of the pieces from the first with a failure on.
    kept: Vec<Op>,
    /// Pieces sent to the writes' thread, and taken back from it.
    sent: usize,
    returned: usize,
    /// The last piece sent puts backends.
    last_puts_backends: bool,
}

impl TakenBack<'_> {
    fn take(&mut self, piece: WrittenPiece, state: &mut DatapathState) {
        self.returned += 1;
        self.applied.writes += piece.writes;
        for (op, error) in &piece.failed {
            (self.on_failure)(op, error);
        }
        self.applied.failures += piece.failed.len() as u64;
        if self.applied.failures == 0 {
            self.to_state.apply(state, &piece.ops);
        } else {
            // The state is read back; these name what did not fit.
            self.kept.extend(piece.ops);
        }
    }
}

/// Plans `desired` against `state` (which [`suits`]) and writes it piece
/// by piece, as `reconcile::apply_plan` writes a plan: `on_failure` is
/// told of each failed write; when all were written the state is what the
/// maps now hold (the grown maps repacked by the caller with the sizes
/// returned), else it is read back from them. The plan returned holds the
/// problems, and the ops of the pieces from the first with a failure on
/// (what did not fit is named from them). `None`, with nothing written or
/// changed, when no thread could be started for the writes.
pub(super) fn plan_and_write(
    state: &mut DatapathState,
    desired: &BTreeMap<Frontend, FrontendSpec>,
    maps: &mut Maps,
    on_failure: &mut dyn FnMut(&Op, &MapsError),
) -> Option<(Plan, Applied)> {
    // No entries: the copy is the limits and empty maps.
    let planned_against = state.clone();
    let backend_puts = desired
        .values()
        .map(|spec| spec.backends.len() + spec.terminating.len() + spec.not_ready.len())
        .sum();
    let mut back = TakenBack {
        on_failure,
        to_state: PieceApplier::new(state, backend_puts),
        applied: Applied::default(),
        kept: Vec::new(),
        sent: 0,
        returned: 0,
        last_puts_backends: false,
    };
    let problems = std::thread::scope(|scope| {
        // One piece queued while one is written.
        let (to_writes, pieces) = mpsc::sync_channel::<Vec<Op>>(1);
        let (to_loop, written) = mpsc::channel::<WrittenPiece>();
        let maps = &mut *maps;
        let writes = std::thread::Builder::new()
            .name("lb-first-writes".to_owned())
            .spawn_scoped(scope, move || {
                for ops in pieces {
                    let mut piece = WrittenPiece {
                        ops: Vec::new(),
                        writes: 0,
                        failed: Vec::new(),
                    };
                    maps.apply_ops_on_this_thread(&ops, &mut |op, result| match result {
                        Ok(()) => piece.writes += 1,
                        Err(error) => piece.failed.push((op.clone(), error)),
                    });
                    piece.ops = ops;
                    if to_loop.send(piece).is_err() {
                        break;
                    }
                }
            });
        if let Err(error) = writes {
            tracing::warn!(%error, "cannot start a thread for the first sync's writes: written after the plan");
            return None;
        }
        let problems = plan::diff_in_pieces(&planned_against, desired, PIECE_OPS, &mut |ops| {
            back.sent += 1;
            back.applied.had_ops = true;
            back.last_puts_backends = ops.iter().any(|op| matches!(op, Op::PutBackend { .. }));
            back.applied.backends_changed |= changes_backends(&ops);
            let mut ops = ops;
            loop {
                match to_writes.try_send(ops) {
                    Ok(()) => break,
                    // Both places taken: apply a written piece meanwhile.
                    Err(mpsc::TrySendError::Full(unsent)) => {
                        ops = unsent;
                        match written.recv() {
                            Ok(piece) => back.take(piece, state),
                            // The thread is gone (a panic, which the scope
                            // raises again).
                            Err(mpsc::RecvError) => return,
                        }
                    }
                    Err(mpsc::TrySendError::Disconnected(_)) => return,
                }
            }
            while let Ok(piece) = written.try_recv() {
                back.take(piece, state);
            }
        });
        drop(to_writes);
        // The last piece is the markers when there are any (and the
        // removals, none on empty maps): the backends' B-tree is built
        // while it is written. Not before a last piece that puts backends
        // (no `ClusterIP`s): they would go into the tree one by one.
        while back.returned + 1 < back.sent {
            let Ok(piece) = written.recv() else { break };
            back.take(piece, state);
        }
        if !back.last_puts_backends {
            back.to_state.build_backends(state);
        }
        for piece in written {
            back.take(piece, state);
        }
        Some(problems)
    })?;
    let TakenBack {
        to_state,
        mut applied,
        kept,
        ..
    } = back;
    // Also after a failure: should the maps not be read back, the state
    // still holds the backends its frontends name.
    let sizes = to_state.finish(state);
    if applied.failures == 0 {
        applied.sizes = Some(sizes);
    } else {
        read_back(maps, state);
    }
    Some((
        Plan {
            ops: kept,
            problems,
        },
        applied,
    ))
}
