//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4):
//! the lookup table of one frontend, built from its backends alone, so that
//! every node builds the same table for the same Service and a flow that a
//! router moves to another node still reaches the same backend.
//!
//! Pure: no maps here. The datapath picks `table[flow_hash % M]` for a new
//! flow (`lb-ebpf/src/lb.rs`); `datapath/maglev.rs` writes the tables.
//!
//! Each backend has a permutation of the table slots, `offset + j * skip
//! (mod M)`, from two hashes of its identity (address, port, protocol) and
//! the frontend's seed; M prime makes every permutation visit every slot.
//! Backends take turns claiming their next free preferred slot until the
//! table is full. Backends are sorted by identity first, so the table does
//! not depend on the order they come in, nor on the node's backend ids.
//!
//! Weights: a backend of weight `w` takes a turn in `floor(r * w / w_max)`
//! of the first `r` rounds (Cilium's and Katran's approach, written anew),
//! so it ends with `count = M * w / W + e`, `|e| < 1 + N * w / W` for `N`
//! backends of total weight `W`: with equal weights within +-1 of `M / N`
//! (the paper's bound), with unequal ones a little wider (tested).

#[cfg(test)]
mod tests;

use std::net::IpAddr;

use crate::model::Protocol;

/// Table sizes `--maglev-table-size` accepts: primes, each about twice
/// the one before, so the table can grow with the backend set. Measured
/// (tests): removing one of N backends moves 1.5-3.7% of the others'
/// slots at M ~ 100 N, under 1% from M ~ 1600 N.
pub const TABLE_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071,
];

/// The default table size: up to about 160 backends at M >= 100 N.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// A table size that is not one of [`TABLE_SIZES`].
#[derive(Debug, thiserror::Error)]
#[error("maglev table size {0} is not one of the supported primes {TABLE_SIZES:?}")]
pub struct BadTableSize(pub u32);

/// Checks `size` against [`TABLE_SIZES`].
///
/// # Errors
/// Not a listed prime.
pub fn table_size(size: u32) -> Result<u32, BadTableSize> {
    if TABLE_SIZES.contains(&size) {
        Ok(size)
    } else {
        Err(BadTableSize(size))
    }
}

/// One backend as Maglev sees it: its identity (which decides its
/// permutation, the same on every node), its weight, and the id the
/// table holds for it (the node's own backend id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Backend address.
    pub addr: IpAddr,
    /// Backend port.
    pub port: u16,
    /// Backend protocol.
    pub proto: Protocol,
    /// Relative share of the table; 0: none.
    pub weight: u32,
    /// What the table holds for this backend.
    pub id: u32,
}

impl MaglevBackend {
    /// The bytes that name the backend, whatever node builds the table.
    fn identity(&self) -> ([u8; 16], u16, u8) {
        let addr = match self.addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        (addr, self.port, self.proto.number())
    }
}

/// The seed of a frontend's table: a stable hash of `cluster_seed`
/// (`--maglev-seed`) and the Service port it serves, so that every node
/// (and every frontend of one Service port and family: its `NodePort` on
/// each node address, its load-balancer IPs) builds the same table.
#[must_use]
pub fn seed_for(cluster_seed: u64, service: &crate::model::ServiceRef, ipv6: bool) -> u64 {
    let mut hash = Fnv::new(cluster_seed);
    for part in [&service.namespace, &service.name, &service.port_name] {
        hash.bytes(part.as_bytes());
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        hash.bytes(&[0xff]);
    }
    hash.bytes(&[u8::from(ipv6)]);
    hash.finish()
}

/// Builds the table of `size` (a prime, see [`TABLE_SIZES`]) slots for
/// `backends` under `seed`. Backends of weight 0 get no slot; without any
/// weighted backend the table is empty (the datapath then keeps its
/// per-node choice).
///
/// # Panics
/// `size` below 2 (not a table).
#[must_use]
pub fn build_table(seed: u64, backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    assert!(size >= 2, "a maglev table has at least 2 slots");
    let mut sorted: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if sorted.is_empty() {
        return Vec::new();
    }
    sorted.sort_by_key(|b| (b.identity(), b.id));
    let m = u64::from(size);
    let max_weight = sorted
        .iter()
        .map(|b| u64::from(b.weight))
        .max()
        .unwrap_or(1);
    let mut cursors: Vec<Cursor> = sorted
        .iter()
        .map(|b| Cursor::new(seed, &b.identity(), m))
        .collect();
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    let mut round = 0u64;
    while filled < m {
        for (backend, cursor) in sorted.iter().zip(&mut cursors) {
            let w = u64::from(backend.weight);
            // A turn in this round when floor(r * w / w_max) steps up.
            if (round + 1) * w / max_weight == round * w / max_weight {
                continue;
            }
            let slot = cursor.next_free(&table, m);
            table[slot] = backend.id;
            filled += 1;
            if filled == m {
                break;
            }
        }
        round += 1;
    }
    table
}

/// A backend's walk through its permutation.
struct Cursor {
    /// The slot it looks at next.
    position: u64,
    /// Its step (1..M-1: with M prime every slot is visited once in M steps).
    skip: u64,
}

impl Cursor {
    fn new(seed: u64, identity: &([u8; 16], u16, u8), m: u64) -> Self {
        let (addr, port, proto) = identity;
        let mut offset = Fnv::new(seed);
        offset.bytes(addr);
        offset.bytes(&port.to_be_bytes());
        offset.bytes(&[*proto]);
        // The second hash: the same bytes under another seed.
        let mut skip = Fnv::new(seed ^ 0x9e37_79b9_7f4a_7c15);
        skip.bytes(addr);
        skip.bytes(&port.to_be_bytes());
        skip.bytes(&[*proto]);
        Self {
            position: offset.finish() % m,
            skip: skip.finish() % (m - 1) + 1,
        }
    }

    /// The next slot of the permutation not taken yet; the cursor moves
    /// past it. The caller knows one is free.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "positions are below the table size, a u32"
    )]
    fn next_free(&mut self, table: &[u32], m: u64) -> usize {
        loop {
            let slot = self.position as usize;
            // Both below m: a subtraction, not a division, per probe.
            self.position += self.skip;
            if self.position >= m {
                self.position -= m;
            }
            if table[slot] == u32::MAX {
                return slot;
            }
        }
    }
}

/// FNV-1a over 64 bits with a murmur3 `fmix64` at the end: fixed by this
/// file (never `std`'s per-process random hasher), so every node agrees.
struct Fnv(u64);

impl Fnv {
    fn new(seed: u64) -> Self {
        Self(0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x0100_0000_01b3))
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}
