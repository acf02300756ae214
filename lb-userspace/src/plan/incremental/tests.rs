//! The property test of the plan over changes against the full plan.

use std::collections::BTreeMap;

use crate::model::{Backend, Frontend, FrontendChanges, FrontendKind, FrontendSpec, Protocol};
use crate::plan::test_fixtures::spec;
use crate::plan::{
    DatapathState, PlanIndex, apply_owned_in_chunks, apply_to_state, diff, diff_changes,
};
use crate::test_rng::Rng;

/// One or two frontends added, changed or removed, from small pools, so that backends are shared,
/// change flags, and addresses carry several frontends of both kinds.
fn random_change(
    rng: &mut Rng,
    desired: &BTreeMap<Frontend, FrontendSpec>,
) -> BTreeMap<Frontend, FrontendSpec> {
    let addrs = ["198.19.0.1", "198.19.0.2", "fd00::1", "fd00::2"];
    let backends = [
        "198.18.2.1",
        "198.18.2.2",
        "198.18.2.3",
        "fd00:2::1",
        "fd00:2::2",
    ];
    let mut desired = desired.clone();
    for _ in 0..=rng.below(2) {
        let frontend = Frontend {
            addr: rng.pick(&addrs).parse().unwrap(),
            port: rng.pick(&[80, 443]),
            proto: rng.pick(&[Protocol::Tcp, Protocol::Udp]),
        };
        if rng.below(3) == 0 {
            desired.remove(&frontend);
            continue;
        }
        let pick_backends = |rng: &mut Rng| -> Vec<Backend> {
            let mut list: Vec<Backend> = (0..rng.below(4))
                .map(|_| Backend {
                    addr: rng.pick(&backends).parse().unwrap(),
                    port: rng.pick(&[8080, 8443]),
                    node_local: rng.below(2) == 0,
                })
                .collect();
            list.sort_unstable();
            list.dedup_by(|a, b| a.addr == b.addr && a.port == b.port);
            list
        };
        let mut spec = spec(&[]);
        spec.backends = pick_backends(rng);
        spec.terminating = pick_backends(rng);
        spec.kind = rng.pick(&[FrontendKind::ClusterIp, FrontendKind::LoadBalancer]);
        spec.affinity_timeout_s = rng.pick(&[0, 30]);
        if spec.kind.is_external() && rng.below(2) == 0 {
            spec.source_ranges = vec![(frontend.addr, rng.pick(&[8, 16]))];
        }
        desired.insert(frontend, spec);
    }
    desired
}

/// A plan over only the changed frontends leaves the maps exactly as a
/// plan over everything does, ids included, through random changes.
#[test]
fn diff_of_changes_matches_full_diff() {
    for seed in 1..200u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut state = DatapathState::default();
        let mut desired = BTreeMap::new();
        let mut index = PlanIndex::new(&state, &desired);
        for step in 0..40 {
            let next = random_change(&mut rng, &desired);
            let mut changes = FrontendChanges::new();
            for (frontend, spec) in &desired {
                if next.get(frontend) != Some(spec) {
                    changes.insert(*frontend, Some(spec.clone()));
                }
            }
            for frontend in next.keys() {
                if !desired.contains_key(frontend) {
                    changes.insert(*frontend, None);
                }
            }
            let full = diff(&state, &next);
            let mut expected = state.clone();
            apply_to_state(&mut expected, &full.ops);
            // The agent's way: the ops used up in chunks as they are applied.
            let mut owned = state.clone();
            apply_owned_in_chunks(&mut owned, full.ops.clone(), 3).repack_grown(&mut owned);
            assert_eq!(owned, expected, "seed {seed} step {step}");

            let scoped = diff_changes(&state, &mut index, &next, &changes);
            assert!(scoped.problems.is_empty());
            let mut got = state.clone();
            apply_to_state(&mut got, &scoped.ops);
            assert_eq!(got, expected, "seed {seed} step {step}: {:?}", scoped.ops);
            index.note_applied(&state, &scoped.ops);
            state = got;
            desired = next;
            assert_eq!(
                index.entries(),
                PlanIndex::new(&state, &desired).entries(),
                "seed {seed} step {step}"
            );
        }
    }
}

/// Backends put into an empty state are collected and built at once:
/// the result is the map one insert per op makes, with an id put twice
/// (the later entry wins) and a delete among the puts, in one go and in
/// chunks; the index over it names each frontend's ids.
#[test]
fn backends_put_into_an_empty_state_are_the_map_inserts_make() {
    use crate::plan::{BackendEntry, BackendKey, Op};
    let entry = |rev_nat_id: u32, last_octet: u8, flags: u8| BackendEntry {
        key: BackendKey {
            rev_nat_id,
            addr: [198, 18, 2, last_octet].into(),
            port: 8080,
            proto: Protocol::Tcp,
        },
        flags,
    };
    let v4 = "198.18.2.1".parse().unwrap();
    let ops = vec![
        Op::PutBackend {
            id: 3,
            backend: entry(1, 3, 0),
        },
        Op::PutBackend {
            id: 1,
            backend: entry(1, 1, 0),
        },
        Op::PutBackend {
            id: 4,
            backend: entry(2, 4, 0),
        },
        Op::PutBackend {
            id: 3,
            backend: entry(1, 3, 1),
        },
        Op::DeleteBackend { id: 1, addr: v4 },
        Op::PutBackend {
            id: 7,
            backend: entry(1, 7, 0),
        },
    ];
    let expected: BTreeMap<u32, BackendEntry> = [
        (3, entry(1, 3, 1)),
        (4, entry(2, 4, 0)),
        (7, entry(1, 7, 0)),
    ]
    .into();
    let mut whole = DatapathState::default();
    apply_to_state(&mut whole, &ops);
    assert_eq!(whole.backends, expected);
    assert_eq!(whole.next_backend_id.v4, 8);
    for chunk in 1..=ops.len() {
        let mut chunked = DatapathState::default();
        apply_owned_in_chunks(&mut chunked, ops.clone(), chunk).repack_grown(&mut chunked);
        assert_eq!(chunked.backends, expected, "chunks of {chunk}");
    }
    // Without the delete: only puts, the first sync's case.
    let puts: Vec<Op> = ops
        .iter()
        .filter(|op| matches!(op, Op::PutBackend { .. }))
        .cloned()
        .collect();
    let mut fresh = DatapathState::default();
    apply_to_state(&mut fresh, &puts);
    let mut with_one = expected.clone();
    with_one.insert(1, entry(1, 1, 0));
    assert_eq!(fresh.backends, with_one);
    let index = PlanIndex::new(&fresh, &BTreeMap::new());
    assert_eq!(
        index.entries(),
        BTreeMap::from([(1, vec![1, 3, 7]), (2, vec![4])])
    );
}
