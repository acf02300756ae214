//! Hash maps for the agent's large indexes (slices by name, backends by
//! address, frontends, the kube source's versions), hashed with `foldhash`
//! instead of std's `SipHash`.
//!
//! At 100k Services a start hashes millions of keys; with `SipHash` that
//! was ~7% of the agent's CPU, and the sync's share of it is on the start's
//! critical path. `foldhash` seeds each map at random too, but from the
//! process's address-space layout rather than the OS, and does not claim
//! `SipHash`'s resistance to chosen collisions. The keys are names and
//! addresses that only someone allowed to create Services or
//! `EndpointSlice`s chooses, and colliding keys would slow a sync, not
//! change what it writes.

/// A `HashMap` with the fast hasher.
pub type FastHashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A `HashSet` with the fast hasher.
pub type FastHashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// An empty map with room for CAPACITY entries.
#[must_use]
pub fn map_with_capacity<K, V>(capacity: usize) -> FastHashMap<K, V> {
    FastHashMap::with_capacity_and_hasher(capacity, foldhash::fast::RandomState::default())
}
