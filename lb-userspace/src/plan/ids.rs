//! Backend and rev-NAT id allocation.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use super::BackendEntry;

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
/// (or at a given floor, see `DatapathState::next_backend_id`) and moving
/// forward, wrapping at `max`, so that ids freed are not handed out again
/// soon (stale conntrack and affinity entries may still name them).
#[derive(Debug)]
pub(super) struct IdAllocator<'a> {
    in_use: IdsInUse<'a>,
    /// Handed out by this allocator.
    taken: IdSet,
    next: u32,
    max: u32,
}

impl<'a> IdAllocator<'a> {
    pub(super) fn new(in_use: impl IntoIterator<Item = u32>, max: u32) -> Self {
        Self::over(IdsInUse::Set(in_use.into_iter().collect()), max)
    }

    pub(super) fn over(in_use: IdsInUse<'a>, max: u32) -> Self {
        Self::starting_at(in_use, 0, max)
    }

    /// As `over`, handing out nothing below `floor` before it wraps.
    pub(super) fn starting_at(in_use: IdsInUse<'a>, floor: u32, max: u32) -> Self {
        let next = in_use
            .last()
            .map_or(1, |last| last.saturating_add(1))
            .max(floor);
        Self {
            in_use,
            taken: IdSet::default(),
            next,
            max,
        }
    }

    pub(super) fn allocate(&mut self) -> Option<u32> {
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

/// A set of ids (backend or rev-NAT), one bit each: the ids are dense,
/// from 1 up to a map's capacity, so the 2M backend ids of a first plan
/// at 100k Services take 256 KiB here; as a `HashSet` they were ~20 MiB
/// at the plan's memory peak and their `SipHash` a few percent of its CPU
/// (as a `BTreeSet`, more). Ids above [`IdSet::BITS`] (not handed out by
/// the allocators at the default capacities, but a pinned map may hold
/// anything) go to a hash set, so that no id makes the bits huge.
#[derive(Debug, Default)]
pub(super) struct IdSet {
    words: Vec<u64>,
    high: HashSet<u32>,
    len: usize,
}

impl IdSet {
    /// Ids below this are bits (2 MiB of them at most).
    const BITS: u32 = 1 << 24;

    /// Adds `id`; true when it was not there yet.
    pub(super) fn insert(&mut self, id: u32) -> bool {
        let new = if id < Self::BITS {
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
        if id < Self::BITS {
            let (word, bit) = Self::place(id);
            self.words.get(word).is_some_and(|word| word & bit != 0)
        } else {
            self.high.contains(&id)
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The word and bit of an id below [`IdSet::BITS`].
    fn place(id: u32) -> (usize, u64) {
        ((id / 64) as usize, 1 << (id % 64))
    }
}

#[cfg(test)]
mod tests;
