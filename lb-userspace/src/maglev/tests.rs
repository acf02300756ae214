#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "counts and table sizes of a few thousand"
)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    BadTableSize, DEFAULT_TABLE_SIZE, Fnv, MaglevBackend, TABLE_SIZES, build_table, seed_for,
    table_size,
};
use crate::model::{Protocol, ServiceRef};
use crate::test_rng::Rng;

fn backend(i: u32, weight: u32) -> MaglevBackend {
    let [a, b] = u16::try_from(i).unwrap().to_be_bytes();
    MaglevBackend {
        addr: IpAddr::V4(Ipv4Addr::new(10, 1, a, b)),
        port: 8080,
        proto: Protocol::Tcp,
        weight,
        id: 100 + i,
    }
}

fn backends(n: u32) -> Vec<MaglevBackend> {
    (0..n).map(|i| backend(i, 1)).collect()
}

/// Slots per id.
fn counts(table: &[u32]) -> BTreeMap<u32, u64> {
    let mut counts = BTreeMap::new();
    for id in table {
        *counts.entry(*id).or_insert(0) += 1;
    }
    counts
}

#[test]
fn sizes_are_primes_and_only_they_pass() {
    for m in TABLE_SIZES {
        assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m}");
        assert_eq!(table_size(m).unwrap(), m);
    }
    assert!(TABLE_SIZES.contains(&DEFAULT_TABLE_SIZE));
    for bad in [0, 1, 16384, 65537, 16383] {
        let error: BadTableSize = table_size(bad).unwrap_err();
        assert!(error.to_string().contains(&bad.to_string()));
    }
}

/// The hash is FNV-1a: with seed 0 and no finaliser it gives the published
/// value, so two builds (or two nodes) cannot disagree on it.
#[test]
fn fnv_known_answer() {
    let mut hash = Fnv::new(0);
    hash.bytes(b"a");
    assert_eq!(hash.0, 0xaf63_dc4c_8601_ec8c);
}

#[test]
fn same_inputs_same_table_in_any_order() {
    let mut rng = Rng(0x5eed);
    for n in [1, 2, 3, 10, 57] {
        let list = backends(n);
        let table = build_table(42, &list, 1021);
        assert_eq!(table.len(), 1021);
        assert_eq!(table, build_table(42, &list, 1021));
        let mut shuffled = list.clone();
        for i in (1..shuffled.len()).rev() {
            let j = usize::try_from(rng.below(i as u64 + 1)).unwrap();
            shuffled.swap(i, j);
        }
        assert_eq!(table, build_table(42, &shuffled, 1021), "n={n}");
        // Every entry is one of the backends.
        assert!(table.iter().all(|id| list.iter().any(|b| b.id == *id)));
        if n > 1 {
            assert_ne!(table, build_table(43, &list, 1021), "the seed matters");
        }
    }
}

/// Two nodes number the same backends differently: their tables name the
/// same endpoint in every slot.
#[test]
fn nodes_with_other_ids_pick_the_same_endpoints() {
    let node_a = backends(20);
    let node_b: Vec<MaglevBackend> = node_a
        .iter()
        .rev()
        .map(|b| MaglevBackend {
            id: 9000 - b.id,
            ..*b
        })
        .collect();
    let endpoint = |list: &[MaglevBackend], id: u32| {
        let b = list.iter().find(|b| b.id == id).unwrap();
        (b.addr, b.port)
    };
    let table_a = build_table(7, &node_a, 4093);
    let table_b = build_table(7, &node_b, 4093);
    for (a, b) in table_a.iter().zip(&table_b) {
        assert_eq!(endpoint(&node_a, *a), endpoint(&node_b, *b));
    }
}

#[test]
fn equal_weights_within_one_slot_of_m_over_n() {
    for n in [1, 2, 3, 7, 10, 100, 1000] {
        for m in [251, 16381] {
            let table = build_table(1, &backends(n), m);
            let counts = counts(&table);
            assert_eq!(counts.len() as u32, n.min(m), "every backend has a slot");
            let ideal = f64::from(m) / f64::from(n);
            for (id, count) in counts {
                assert!(
                    (count as f64 - ideal).abs() <= 1.0,
                    "n={n} m={m} id={id} count={count} ideal={ideal}"
                );
            }
        }
    }
}

/// With weights the turns come in proportion but the last round is cut
/// wherever the table fills: `|count - M w / W| < 1 + N w / W` (module
/// docs); checked for random weights, and the share stays close.
#[test]
fn weighted_counts_within_the_bound() {
    let mut rng = Rng(0xbeef);
    for case in 0..40u32 {
        let n = 2 + u32::try_from(rng.below(30)).unwrap();
        let list: Vec<MaglevBackend> = (0..n)
            .map(|i| backend(i, 1 + u32::try_from(rng.below(10)).unwrap()))
            .collect();
        let total: u32 = list.iter().map(|b| b.weight).sum();
        let m = rng.pick(&[4093u32, 16381]);
        let counts = counts(&build_table(u64::from(case), &list, m));
        for b in &list {
            let count = counts.get(&b.id).copied().unwrap_or(0) as f64;
            let share = f64::from(b.weight) / f64::from(total);
            let ideal = f64::from(m) * share;
            let bound = 1.0 + f64::from(n) * share;
            assert!(
                (count - ideal).abs() < bound,
                "case {case}: weight {} count {count} ideal {ideal} bound {bound}",
                b.weight
            );
        }
    }
}

#[test]
fn zero_weights_get_nothing_and_none_left_is_empty() {
    let mut list = backends(4);
    list[1].weight = 0;
    let table = build_table(3, &list, 251);
    assert!(!table.contains(&list[1].id));
    assert_eq!(counts(&table).len(), 3);
    for b in &mut list {
        b.weight = 0;
    }
    assert!(build_table(3, &list, 251).is_empty());
    assert!(build_table(3, &[], 251).is_empty());
}

/// Removing one of N backends: the survivors keep most of their slots
/// (the paper's "minimal disruption"; a per-node `hash % N` choice moves
/// (N-1)/N of them). Maglev does not bound this: measured here, M >= 100 N
/// moves 1.5-3.7% of the survivors' slots on average (5.2% at worst, N =
/// 5), and it takes M >= ~1600 N to stay under 1% (README, Known
/// deviations). Both measured bounds are asserted over every table size.
#[test]
fn removing_one_backend_moves_few_of_the_rest() {
    for n in [3u32, 5, 10, 20, 40, 100, 160] {
        let list = backends(n);
        for m in TABLE_SIZES.into_iter().filter(|m| *m >= 100 * n) {
            let before = build_table(9, &list, m);
            for gone in 0..n.min(5) as usize {
                let gone_id = list[gone].id;
                let mut rest = list.clone();
                rest.remove(gone);
                let after = build_table(9, &rest, m);
                // The removed backend's slots all went to survivors.
                assert!(!after.contains(&gone_id));
                let survivors = before.iter().filter(|id| **id != gone_id).count();
                let moved = before
                    .iter()
                    .zip(&after)
                    .filter(|(old, new)| **old != gone_id && old != new)
                    .count();
                let fraction = moved as f64 / survivors as f64;
                let bound = if m >= 1600 * n { 0.01 } else { 0.06 };
                assert!(
                    fraction < bound,
                    "n={n} m={m}: {moved} of {survivors} moved, bound {bound}"
                );
            }
        }
    }
}

#[test]
fn seeds_are_per_service_port_and_family() {
    let service = |ns: &str, name: &str, port: &str| ServiceRef {
        namespace: ns.into(),
        name: name.into(),
        port_name: port.into(),
    };
    let a = seed_for(0, &service("default", "web", "http"), false);
    assert_eq!(a, seed_for(0, &service("default", "web", "http"), false));
    assert_ne!(a, seed_for(0, &service("default", "web", "http"), true));
    assert_ne!(a, seed_for(1, &service("default", "web", "http"), false));
    assert_ne!(a, seed_for(0, &service("default", "web", "https"), false));
    assert_ne!(
        seed_for(0, &service("ab", "c", ""), false),
        seed_for(0, &service("a", "bc", ""), false)
    );
}

#[test]
fn ipv6_backends_build_tables_too() {
    let list: Vec<MaglevBackend> = (0..5u16)
        .map(|i| MaglevBackend {
            addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i)),
            port: 53,
            proto: Protocol::Udp,
            weight: 1,
            id: u32::from(i) + 1,
        })
        .collect();
    let counts = counts(&build_table(5, &list, 509));
    assert_eq!(counts.len(), 5);
    assert!(counts.values().all(|c| (101..=102).contains(c)));
}
