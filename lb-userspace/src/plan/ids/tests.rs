//! Tests of id allocation.

use std::collections::BTreeMap;

use super::IdAllocator;
use crate::plan::DatapathState;
use crate::plan::test_fixtures::{converge, fe, spec};

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

#[test]
fn id_set_counts_each_id_once_at_any_size() {
    let mut set = super::IdSet::default();
    assert!(!set.contains(0) && !set.contains(u32::MAX));
    for id in [
        0,
        1,
        63,
        64,
        2_000_000,
        super::IdSet::BITS - 1,
        super::IdSet::BITS,
        u32::MAX,
    ] {
        assert!(set.insert(id), "{id} is new");
        assert!(!set.insert(id), "{id} again");
        assert!(set.contains(id), "{id}");
    }
    assert_eq!(set.len(), 8);
    assert!(!set.contains(2) && !set.contains(65) && !set.contains(super::IdSet::BITS + 1));
}

#[test]
fn each_family_hands_out_backend_ids_of_its_own_range() {
    let v6 = lb_common::limits::BACKEND_ID_V6;
    let mut state = DatapathState {
        backend_index_max: 3,
        ..DatapathState::default()
    };
    let web4 = fe("198.19.0.10", 80);
    let web6 = fe("fd00:19::10", 80);
    let desired = BTreeMap::from([
        (web4, spec(&[("198.18.2.1", 80), ("198.18.2.2", 80)])),
        (web6, spec(&[("fd00:18::1", 80), ("fd00:18::2", 80)])),
    ]);
    converge(&mut state, &desired);
    assert_eq!(state.frontends[&web4].slots, [1, 2]);
    assert_eq!(state.frontends[&web6].slots, [v6 | 1, v6 | 2]);
    assert_eq!(state.next_backend_id.v4, 3);
    assert_eq!(state.next_backend_id.v6, v6 | 3);
    // With index 1 freed, each family wraps at the arrays' end (index 3),
    // within its range.
    let desired = BTreeMap::from([
        (web4, spec(&[("198.18.2.2", 80)])),
        (web6, spec(&[("fd00:18::2", 80)])),
    ]);
    converge(&mut state, &desired);
    let desired = BTreeMap::from([
        (
            web4,
            spec(&[("198.18.2.2", 80), ("198.18.2.3", 80), ("198.18.2.4", 80)]),
        ),
        (
            web6,
            spec(&[("fd00:18::2", 80), ("fd00:18::3", 80), ("fd00:18::4", 80)]),
        ),
    ]);
    converge(&mut state, &desired);
    assert_eq!(state.frontends[&web4].slots, [2, 3, 1]);
    assert_eq!(state.frontends[&web6].slots, [v6 | 2, v6 | 3, v6 | 1]);
}

/// A family whose array is full gets ids past its end, which the maps
/// refuse as a full map's (naming the Services left out), rather than no
/// id, which would leave the frontend served in part.
#[test]
fn a_full_family_gets_ids_past_its_arrays_end() {
    let state = DatapathState {
        backend_index_max: 2,
        ..DatapathState::default()
    };
    let web4 = fe("198.19.0.10", 80);
    let web6 = fe("fd00:19::10", 80);
    let desired = BTreeMap::from([
        (
            web4,
            spec(&[("198.18.2.1", 80), ("198.18.2.2", 80), ("198.18.2.3", 80)]),
        ),
        (web6, spec(&[("fd00:18::1", 80)])),
    ]);
    let plan = crate::plan::diff(&state, &desired);
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
    let mut ids: Vec<u32> = plan
        .ops
        .iter()
        .filter_map(|op| match op {
            crate::plan::Op::PutBackend { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    let v6 = lb_common::limits::BACKEND_ID_V6;
    assert_eq!(ids, [1, 2, 3, v6 | 1], "index 3 is past the end");
}

#[test]
fn an_ipv6_backend_id_takes_a_bit_of_its_own() {
    let v6 = lb_common::limits::BACKEND_ID_V6;
    let mut set = super::IdSet::default();
    assert!(set.insert(5) && set.insert(v6 | 5));
    assert!(set.contains(5) && set.contains(v6 | 5) && !set.contains(v6 | 4));
    assert_eq!(set.len(), 2);
    assert!(set.high.is_empty(), "both families' ids are bits");
}
