//! Backend and rev-NAT id allocation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use super::BackendEntry;
use crate::fast_hash::FastHashSet;

/// The ids in use before a plan: a set, or the keys of a state's map.
#[derive(Debug)]
pub(super) enum IdsInUse<'a> {
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

    /// How many ids are in use, when all are in the allocator's range (a
    /// state's backends are both families', each family's ids a range of
    /// their own).
    fn len_in_range(&self) -> Option<usize> {
        match self {
            Self::Set(set) => Some(set.len()),
            Self::Backends(_) => None,
            Self::RevNats(map) => Some(map.len()),
        }
    }

    /// The highest id in use in `range`.
    fn last_in(&self, range: RangeInclusive<u32>) -> Option<u32> {
        match self {
            Self::Set(set) => set.range(range).next_back().copied(),
            Self::Backends(map) => map.range(range).next_back().map(|(id, _)| *id),
            Self::RevNats(map) => map.range(range).next_back().map(|(id, _)| *id),
        }
    }
}

/// Hands out ids of a range that are not in use, starting after the
/// highest id in use (or at a given floor, see
/// `DatapathState::next_backend_id`) and moving forward, wrapping at the
/// range's end, so that ids freed are not handed out again soon (stale
/// conntrack and affinity entries may still name them).
#[derive(Debug)]
pub(super) struct IdAllocator<'a> {
    in_use: IdsInUse<'a>,
    /// Handed out by this allocator.
    taken: IdSet,
    next: u32,
    range: RangeInclusive<u32>,
    /// A whole pass over the range found no free id.
    exhausted: bool,
}

impl<'a> IdAllocator<'a> {
    pub(super) fn new(in_use: impl IntoIterator<Item = u32>, max: u32) -> Self {
        Self::over(IdsInUse::Set(in_use.into_iter().collect()), max)
    }

    /// Ids `1..=max`.
    pub(super) fn over(in_use: IdsInUse<'a>, max: u32) -> Self {
        Self::starting_at(in_use, 0, 1..=max)
    }

    /// Ids of `range`, handing out nothing below `floor` before it wraps.
    pub(super) fn starting_at(
        in_use: IdsInUse<'a>,
        floor: u32,
        range: RangeInclusive<u32>,
    ) -> Self {
        let next = in_use
            .last_in(range.clone())
            .map_or(*range.start(), |last| last.saturating_add(1))
            .max(floor);
        Self {
            in_use,
            taken: IdSet::default(),
            next,
            range,
            exhausted: false,
        }
    }

    pub(super) fn allocate(&mut self) -> Option<u32> {
        let (first, last) = (*self.range.start(), *self.range.end());
        let span = usize::try_from(last.checked_sub(first)?)
            .ok()?
            .saturating_add(1);
        let known_full = self
            .in_use
            .len_in_range()
            .is_some_and(|len| len + self.taken.len() >= span);
        if self.exhausted || known_full {
            return None;
        }
        for _ in 0..span {
            if !self.range.contains(&self.next) {
                self.next = first;
            }
            let candidate = self.next;
            self.next = self.next.wrapping_add(1);
            if !self.in_use.contains(candidate) && self.taken.insert(candidate) {
                return Some(candidate);
            }
        }
        self.exhausted = true;
        None
    }
}

/// A set of ids (backend or rev-NAT), one bit each: the ids are dense,
/// from 1 up to a map's capacity in each family, so the 2M backend ids of
/// a first plan at 100k Services take 512 KiB here; as a `HashSet` they
/// were ~20 MiB at the plan's memory peak and their `SipHash` a few
/// percent of its CPU (as a `BTreeSet`, more). Ids whose index is above
/// [`IdSet::BITS`] (not handed out by the allocators at the default
/// capacities, but a pinned map may hold anything) go to a hash set, so
/// that no id makes the bits huge.
#[derive(Debug, Default)]
pub(super) struct IdSet {
    words: Vec<u64>,
    high: FastHashSet<u32>,
    len: usize,
}

impl IdSet {
    /// Ids whose index is below this are bits (4 MiB of them at most).
    const BITS: u32 = 1 << 24;

    /// Adds `id`; true when it was not there yet.
    pub(super) fn insert(&mut self, id: u32) -> bool {
        let new = if Self::in_bits(id) {
            let (word, bit) = Self::place(id);
            if word >= self.words.len() {
                self.words.resize(word + 1, 0);
            }
            let new = self.words[word] & bit == 0;
            self.words[word] |= bit;
            new
        } else {
            self.high.insert(id)
        };
        self.len += usize::from(new);
        new
    }

    pub(super) fn contains(&self, id: u32) -> bool {
        if Self::in_bits(id) {
            let (word, bit) = Self::place(id);
            self.words.get(word).is_some_and(|word| word & bit != 0)
        } else {
            self.high.contains(&id)
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The word and bit of an id whose index is below [`IdSet::BITS`]:
    /// an IPv6 backend id's family bit (`limits::BACKEND_ID_V6`) is the
    /// lowest bit of its place, so both families' ids are dense here.
    fn place(id: u32) -> (usize, u64) {
        let dense = (lb_common::backend_index(id) << 1) | (id >> 31);
        ((dense / 64) as usize, 1 << (dense % 64))
    }

    /// Whether `id`'s index is below [`IdSet::BITS`].
    fn in_bits(id: u32) -> bool {
        lb_common::backend_index(id) < Self::BITS
    }
}

#[cfg(test)]
mod tests;
