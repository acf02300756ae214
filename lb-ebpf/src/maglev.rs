//! Maglev: the backend of a new flow from the frontend's consistent-hash
//! table (built by the agent, `lb-userspace/src/maglev.rs`), so that every
//! node sends a flow to the same backend. A frontend without a table, a
//! table entry that is not one of the frontend's backends taking new flows
//! (a row being reused, a table older than the slots), or Maglev off: no
//! answer, and the caller picks a slot as before.

use lb_common::{Backend, LbService, backend_flags};

use crate::{
    family::{Family, Tuple},
    lb::member_of,
    maps::{LB_MGLV_REF_V1, LB_MGLV_TBL_V1},
};

/// The table size M, set by the loader (`lb_common::maglev::
/// TABLE_SIZE_GLOBAL`); 0: Maglev off. Read-only after load, so the
/// verifier knows it and a program with Maglev off skips the lookups.
#[unsafe(no_mangle)]
static MAGLEV_TABLE_SIZE: u32 = 0;

/// The frontend's table entry for this flow: `table[flow_hash % M]` of its
/// active row. The flow hash has a fixed seed, so every node computes the
/// same one for the same 5-tuple.
#[inline(always)]
pub(crate) fn pick<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
) -> Option<(u32, Backend<F::Addr>)> {
    // SAFETY: a plain read of a global the loader set before load.
    let size = unsafe { core::ptr::read_volatile(&raw const MAGLEV_TABLE_SIZE) };
    if size == 0 {
        return None;
    }
    // The reference is the active row + 1, written after the row (a u32
    // store: a packet sees the old row or the new one, both complete).
    let row_plus_one = *LB_MGLV_REF_V1.get(frontend.rev_nat_id)?;
    if row_plus_one == 0 {
        return None;
    }
    let index =
        u64::from(row_plus_one - 1) * u64::from(size) + u64::from(F::flow_hash(tuple) % size);
    let backend_id = *LB_MGLV_TBL_V1.get(u32::try_from(index).ok()?)?;
    let backend = F::backend(backend_id)?;
    if !member_of(backend, frontend) || backend.flags & backend_flags::TERMINATING != 0 {
        return None;
    }
    Some((backend_id, *backend))
}
