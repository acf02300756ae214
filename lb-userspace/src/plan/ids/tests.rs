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
