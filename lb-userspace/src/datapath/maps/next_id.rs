//! The record of the next backend id in the pinned maps, so that ids keep
//! moving forward across agent restarts.

use lb_common::Lb4Backend;

use super::Maps;
use crate::plan::Op;

/// Backend id 0 is never a backend (0 means "none" to the datapath). The
/// IPv4 backend map's entry 0 records the next backend id instead, in its
/// address (big-endian); protocol 0 keeps it out of the state read back,
/// rev-NAT id 0 out of every frontend's backends.
const NEXT_BACKEND_ID_RECORD: u32 = 0;

/// Entries of the IPv4 backend map that are records, not backends: the
/// loader makes the map this much larger than `--max-backends`, and its
/// capacity is reported without them.
pub(crate) const BACKEND_RECORDS4: u32 = 1;

impl Maps {
    /// The next backend id as recorded by `record_next_backend_id` (0:
    /// none).
    pub(super) fn recorded_next_backend_id(&self) -> u32 {
        self.v4
            .backends
            .get(&NEXT_BACKEND_ID_RECORD, 0)
            .map_or(0, |record| u32::from_be_bytes(record.addr))
    }

    /// Records the id after the highest one `ops` writes, when it is above
    /// the record, so that ids keep moving forward across agent restarts
    /// (best effort: without the record an agent starts after the highest
    /// id in use).
    pub(super) fn record_next_backend_id(&mut self, ops: &[Op]) {
        let highest = ops
            .iter()
            .filter_map(|op| match op {
                Op::PutBackend { id, .. } => Some(*id),
                _ => None,
            })
            .max();
        let Some(next) = highest.map(|id| id.saturating_add(1)) else {
            return;
        };
        if next <= self.recorded_next_backend_id() {
            return;
        }
        let record = Lb4Backend {
            addr: next.to_be_bytes(),
            port_be: 0,
            proto: 0,
            flags: 0,
            rev_nat_id: 0,
        };
        if let Err(error) = self.v4.backends.insert(&NEXT_BACKEND_ID_RECORD, &record, 0) {
            tracing::warn!(
                %error,
                next,
                "could not record the next backend id: after a restart, ids freed above the \
                 highest one in use may be handed out again"
            );
        }
    }
}
