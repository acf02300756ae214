//! The record of the next backend id of each family in the pinned maps, so
//! that ids keep moving forward across agent restarts.

use std::collections::BTreeMap;

use lb_common::{Backend, MapAddr, limits::BACKEND_ID_V6};

use super::{Maps, backend_array::BackendArray};
use crate::plan::{BackendEntry, BackendIdFloors, Op};

/// Index 0 of a backend array is never a backend (id 0 means "none" to the
/// datapath): it records the family's next backend id instead, in the
/// first four bytes of its address (big-endian); protocol 0 keeps it out
/// of the state read back, rev-NAT id 0 out of every frontend's backends.
const NEXT_BACKEND_ID_RECORD: u32 = 0;

/// Entries of each backend array that are records, not backends: the
/// loader makes the arrays this much larger than `--max-backends`, and
/// their capacity is reported without them.
pub(crate) const BACKEND_RECORDS: u32 = 1;

/// The id recorded in `array` (0: none).
fn recorded<A: MapAddr>(array: &BackendArray<A>) -> u32 {
    array
        .raw(NEXT_BACKEND_ID_RECORD)
        .ok()
        .flatten()
        .map_or(0, |record| {
            let bytes = record.addr.as_ref();
            u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
        })
}

/// Records `next` in `array` when it is above the record.
fn record<A: MapAddr>(array: &BackendArray<A>, next: u32) {
    if next <= recorded(array) {
        return;
    }
    let mut addr = A::default();
    addr.as_mut()[..4].copy_from_slice(&next.to_be_bytes());
    let record = Backend {
        addr,
        port_be: 0,
        proto: 0,
        flags: 0,
        rev_nat_id: 0,
    };
    if let Err(error) = array.set(NEXT_BACKEND_ID_RECORD, &record) {
        tracing::warn!(
            error = %crate::error::Causes(&error),
            next,
            "could not record the next backend id: after a restart, ids freed above the \
             highest one in use may be handed out again"
        );
    }
}

impl Maps {
    /// Per family, the id after the highest in `backends` or the record,
    /// whichever is higher.
    pub(super) fn next_backend_ids(
        &self,
        backends: &BTreeMap<u32, BackendEntry>,
    ) -> BackendIdFloors {
        let after_highest = |range: std::ops::Range<u32>| {
            backends
                .range(range)
                .next_back()
                .map_or(0, |(id, _)| id.saturating_add(1))
        };
        BackendIdFloors {
            v4: after_highest(0..BACKEND_ID_V6).max(recorded(&self.v4.backends)),
            v6: after_highest(BACKEND_ID_V6..u32::MAX).max(recorded(&self.v6.backends)),
        }
    }

    /// Records, per family, the id after the highest one `ops` writes, when
    /// it is above the record, so that ids keep moving forward across agent
    /// restarts (best effort: without the record an agent starts after the
    /// highest id in use).
    pub(super) fn record_next_backend_id(&mut self, ops: &[Op]) {
        let mut next = BackendIdFloors::default();
        // Ids past an array's end are never written (see `plan`'s
        // `BackendAllocator`): not recorded.
        let capacity = self.v4.backends.entries().min(self.v6.backends.entries());
        for op in ops {
            if let Op::PutBackend { id, .. } = op
                && lb_common::backend_index(*id) < capacity
            {
                let floor = next.of_mut(*id);
                *floor = (*floor).max(id.saturating_add(1));
            }
        }
        record(&self.v4.backends, next.v4);
        record(&self.v6.backends, next.v6);
    }
}
