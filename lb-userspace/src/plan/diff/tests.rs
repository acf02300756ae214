//! Tests of the full plan: op order, stable ids, flags, markers, source
//! ranges and terminating backends.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use lb_common::limits::INLINE_SLOTS;
use lb_common::{backend_flags, svc_flags};

use crate::model::FrontendKind;
use crate::plan::test_fixtures::{backend, converge, fe, spec};
use crate::plan::{DatapathState, FrontendWrite, InlineSlots, Op, diff};

/// `count` backends 198.18.<2..>.2:8080.
fn backends(count: usize) -> Vec<(String, u16)> {
    (0..count)
        .map(|index| (format!("198.18.{}.2", index + 2), 8080))
        .collect()
}

/// A spec of BACKENDS (as `backends` makes them).
fn spec_of(backends: &[(String, u16)]) -> crate::model::FrontendSpec {
    let pairs: Vec<(&str, u16)> = backends.iter().map(|(a, p)| (a.as_str(), *p)).collect();
    spec(&pairs)
}

fn kinds(ops: &[Op]) -> Vec<&'static str> {
    ops.iter()
        .map(|op| match op {
            Op::PutRevNat { .. } => "revnat",
            Op::PutBackend { .. } => "backend",
            Op::PutSlot { .. } => "slot",
            Op::PutFrontend(_) => "frontend",
            Op::PutMarker { .. } => "marker",
            _ => "other",
        })
        .collect()
}

/// A frontend's first slots are in its own entry: a small Service is its
/// backends, then one write of the frontend naming them.
#[test]
fn new_small_service_writes_backends_then_the_frontend_with_its_slots() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    let desired = BTreeMap::from([(v4, spec_of(&backends(2)))]);
    let ops = converge(&mut state, &desired);
    assert_eq!(
        kinds(&ops),
        ["revnat", "backend", "backend", "frontend", "marker"]
    );
    let slots = &state.frontends[&v4].slots;
    assert!(
        ops.iter().any(
            |op| matches!(op, Op::PutFrontend(write) if write.count == 2 && *write.inline == **slots)
        ),
        "{ops:?}"
    );
}

/// Slots after the inline ones have entries of their own, written before
/// the frontend that counts them.
#[test]
fn new_large_service_writes_backends_then_its_other_slots_then_frontend() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    let desired = BTreeMap::from([(v4, spec_of(&backends(INLINE_SLOTS + 2)))]);
    let ops = converge(&mut state, &desired);
    let mut want = vec!["revnat"];
    want.extend(["backend"; INLINE_SLOTS + 2]);
    want.extend(["slot", "slot", "frontend", "marker"]);
    assert_eq!(kinds(&ops), want);
    let slot_numbers: Vec<u16> = ops
        .iter()
        .filter_map(|op| match op {
            Op::PutSlot { slot, .. } => Some(*slot),
            _ => None,
        })
        .collect();
    let first_own = u16::try_from(INLINE_SLOTS).unwrap() + 1;
    assert_eq!(slot_numbers, [first_own, first_own + 1]);
    assert!(
        ops.iter()
            .any(|op| matches!(op, Op::PutFrontend(write) if write.inline.len() == INLINE_SLOTS))
    );
}

#[test]
fn ids_are_stable_across_changes() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    let v6 = fe("fd00:96::10", 80);
    let mut desired = BTreeMap::from([
        (v4, spec(&[("198.18.2.2", 8080), ("198.18.3.2", 8080)])),
        (v6, spec(&[("fd00:2::2", 8080)])),
    ]);
    converge(&mut state, &desired);
    let rev_v4 = state.frontends[&v4].rev_nat_id;
    let rev_v6 = state.frontends[&v6].rev_nat_id;
    let be_id = state.frontends[&v4].slots[1];

    desired.insert(v4, spec(&[("198.18.3.2", 8080), ("198.18.4.2", 8080)]));
    let ops = converge(&mut state, &desired);
    assert_eq!(state.frontends[&v4].rev_nat_id, rev_v4);
    assert_eq!(state.frontends[&v6].rev_nat_id, rev_v6);
    assert_eq!(state.frontends[&v4].slots[0], be_id, "kept backend id");
    // The removed backend goes last, after every slot write.
    let last = ops.last().unwrap();
    assert!(matches!(last, Op::DeleteBackend { .. }), "{ops:?}");
    // Its slots are inline: the frontend is rewritten naming the new ones,
    // and the untouched frontend is not.
    let slots = &state.frontends[&v4].slots;
    let rewritten: Vec<_> = ops
        .iter()
        .filter_map(|op| match op {
            Op::PutFrontend(write) => Some((write.frontend, write.inline.to_vec())),
            _ => None,
        })
        .collect();
    assert_eq!(rewritten, [(v4, slots.clone())], "{ops:?}");
    assert!(!ops.iter().any(|op| matches!(op, Op::PutSlot { .. })));
}

/// Past the inline slots, a changed backend is one slot write, and the
/// frontend (same count, same inline slots) is not rewritten.
#[test]
fn a_changed_slot_past_the_inline_ones_is_one_slot_write() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    let mut list = backends(INLINE_SLOTS + 2);
    converge(&mut state, &BTreeMap::from([(v4, spec_of(&list))]));
    list[INLINE_SLOTS + 1] = ("198.18.200.2".to_owned(), 8080);
    let ops = converge(&mut state, &BTreeMap::from([(v4, spec_of(&list))]));
    assert_eq!(kinds(&ops), ["backend", "slot", "other"], "{ops:?}");
    assert!(matches!(ops[1], Op::PutSlot { slot, .. } if usize::from(slot) == INLINE_SLOTS + 2));
}

#[test]
fn shrinking_writes_count_before_deleting_slots() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    let list = backends(INLINE_SLOTS + 3);
    let mut desired = BTreeMap::from([(v4, spec_of(&list))]);
    converge(&mut state, &desired);
    desired.insert(v4, spec_of(&list[..=INLINE_SLOTS]));
    let ops = converge(&mut state, &desired);
    let frontend_at = ops
        .iter()
        .position(|op| matches!(op, Op::PutFrontend(write) if usize::from(write.count) == INLINE_SLOTS + 1))
        .unwrap();
    let deleted: Vec<(usize, u16)> = ops
        .iter()
        .enumerate()
        .filter_map(|(at, op)| match op {
            Op::DeleteSlot { slot, .. } => Some((at, *slot)),
            _ => None,
        })
        .collect();
    // Slots INLINE + 2 and + 3 had entries of their own; the inline ones
    // never do.
    let first_gone = u16::try_from(INLINE_SLOTS).unwrap() + 2;
    assert_eq!(
        deleted.iter().map(|(_, slot)| *slot).collect::<Vec<_>>(),
        [first_gone, first_gone + 1]
    );
    assert!(deleted.iter().all(|(at, _)| frontend_at < *at), "{ops:?}");
    // Down to the inline slots: the last slot entry goes; within them,
    // no slot entry is deleted.
    desired.insert(v4, spec_of(&list[..INLINE_SLOTS]));
    let ops = converge(&mut state, &desired);
    let deleted: Vec<&Op> = ops
        .iter()
        .filter(|op| matches!(op, Op::DeleteSlot { .. }))
        .collect();
    assert!(
        matches!(deleted[..], [Op::DeleteSlot { slot, .. }] if usize::from(*slot) == INLINE_SLOTS + 1),
        "{ops:?}"
    );
    desired.insert(v4, spec_of(&list[..1]));
    let ops = converge(&mut state, &desired);
    assert!(
        !ops.iter().any(|op| matches!(op, Op::DeleteSlot { .. })),
        "{ops:?}"
    );
}

#[test]
fn removed_frontend_deletes_slot_zero_first_and_frees_everything() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    let desired = BTreeMap::from([(v4, spec(&[("198.18.2.2", 8080)]))]);
    converge(&mut state, &desired);
    let ops = converge(&mut state, &BTreeMap::new());
    assert!(matches!(ops[0], Op::DeleteFrontend { .. }), "{ops:?}");
    assert_eq!(state, DatapathState::default());
}

/// Membership is per frontend: one endpoint behind two frontends has an
/// entry (and an id) in each, naming its frontend, so that a flow of one
/// never passes the datapath's check for the other.
#[test]
fn same_endpoint_in_two_frontends_has_an_entry_in_each() {
    let mut state = DatapathState::default();
    let (a, b) = (fe("198.19.0.10", 80), fe("198.19.0.11", 80));
    let desired = BTreeMap::from([
        (a, spec(&[("198.18.2.2", 8080)])),
        (b, spec(&[("198.18.2.2", 8080)])),
    ]);
    converge(&mut state, &desired);
    assert_eq!(state.backends.len(), 2);
    for frontend in [a, b] {
        let got = &state.frontends[&frontend];
        let backend = state.backends[&got.slots[0]];
        assert_eq!(backend.key.rev_nat_id, got.rev_nat_id, "{frontend}");
    }
    // Removed from one frontend only: that frontend's entry goes.
    let desired = BTreeMap::from([(a, spec(&[])), (b, spec(&[("198.18.2.2", 8080)]))]);
    converge(&mut state, &desired);
    assert_eq!(state.backends.len(), 1);
    let kept = state.backends.values().next().unwrap();
    assert_eq!(kept.key.rev_nat_id, state.frontends[&b].rev_nat_id);
}

/// A freed backend id is not handed out again, even the highest one.
#[test]
fn backend_ids_are_never_reused() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    converge(
        &mut state,
        &BTreeMap::from([(v4, spec(&[("198.18.2.2", 8080)]))]),
    );
    let first = state.frontends[&v4].slots[0];
    converge(&mut state, &BTreeMap::from([(v4, spec(&[]))]));
    assert!(state.backends.is_empty());
    converge(
        &mut state,
        &BTreeMap::from([(v4, spec(&[("198.18.2.3", 8080)]))]),
    );
    assert!(state.frontends[&v4].slots[0] > first);
    // Back in the slice: a new id as well.
    let second = state.frontends[&v4].slots[0];
    converge(
        &mut state,
        &BTreeMap::from([(v4, spec(&[("198.18.2.2", 8080)]))]),
    );
    assert!(state.frontends[&v4].slots[0] > second);
}

/// Not ready endpoints stay as draining entries (TCP flows go on); those
/// not serving either are flagged so that their UDP flows move.
#[test]
fn not_ready_endpoints_drain_and_not_serving_is_flagged() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    let mut web = spec(&[("198.18.2.2", 8080)]);
    web.not_ready = vec![backend("198.18.3.2", 8080)];
    web.terminating = vec![backend("198.18.4.2", 8080)];
    converge(&mut state, &BTreeMap::from([(v4, web.clone())]));
    let flags: Vec<u8> = state.backends.values().map(|b| b.flags).collect();
    assert_eq!(
        flags,
        [0, backend_flags::TERMINATING, backend_flags::TERMINATING]
    );
    web.not_serving = web.not_ready.clone();
    converge(&mut state, &BTreeMap::from([(v4, web)]));
    let flags: Vec<u8> = state.backends.values().map(|b| b.flags).collect();
    assert_eq!(
        flags,
        [
            0,
            backend_flags::TERMINATING,
            backend_flags::TERMINATING | backend_flags::NOT_SERVING
        ]
    );
}

#[test]
fn empty_service_has_zero_count() {
    let mut state = DatapathState::default();
    let desired = BTreeMap::from([(fe("198.19.0.10", 80), spec(&[]))]);
    let ops = converge(&mut state, &desired);
    assert!(ops.contains(&Op::PutFrontend(Box::new(FrontendWrite {
        frontend: fe("198.19.0.10", 80),
        count: 0,
        rev_nat_id: 1,
        flags: svc_flags::CLUSTER_IP,
        affinity_timeout_s: 0,
        affinity_group: 0,
        inline: InlineSlots::default(),
    }))));
}

#[test]
fn cluster_ips_are_marked_after_their_frontends_but_node_ports_are_not() {
    let mut state = DatapathState::default();
    let mut node_port = spec(&[("198.18.2.2", 8080)]);
    node_port.kind = FrontendKind::NodePort;
    let desired = BTreeMap::from([
        (fe("198.19.0.10", 80), spec(&[("198.18.2.2", 8080)])),
        (fe("198.18.0.1", 30080), node_port),
    ]);
    let ops = converge(&mut state, &desired);
    let marker = ops
        .iter()
        .position(|op| matches!(op, Op::PutMarker { .. }))
        .unwrap();
    let last_frontend = ops
        .iter()
        .rposition(|op| matches!(op, Op::PutFrontend(_)))
        .unwrap();
    assert!(marker > last_frontend, "{ops:?}");
    assert_eq!(
        state.markers,
        BTreeSet::from(["198.19.0.10".parse::<IpAddr>().unwrap()])
    );
    converge(&mut state, &BTreeMap::new());
    assert!(state.markers.is_empty());
}

/// Affinity on rewrites the frontend, and its backend with `INDEXED` (an
/// endpoint-index entry, which only affinity reads); off, both without.
#[test]
fn flags_and_affinity_changes_rewrite_the_frontend() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    let mut web = spec(&[("198.18.2.2", 8080)]);
    converge(&mut state, &BTreeMap::from([(v4, web.clone())]));
    let backend_flags_of =
        |state: &DatapathState| -> Vec<u8> { state.backends.values().map(|b| b.flags).collect() };
    assert_eq!(backend_flags_of(&state), [0], "no index without affinity");
    web.affinity_timeout_s = 30;
    let ops = converge(&mut state, &BTreeMap::from([(v4, web.clone())]));
    assert!(matches!(
        ops[0],
        Op::PutBackend { backend, .. } if backend.flags == backend_flags::INDEXED
    ));
    assert_eq!(backend_flags_of(&state), [backend_flags::INDEXED]);
    assert_eq!(
        ops[1..],
        [Op::PutFrontend(Box::new(FrontendWrite {
            frontend: v4,
            count: 1,
            rev_nat_id: 1,
            flags: svc_flags::CLUSTER_IP | svc_flags::AFFINITY,
            affinity_timeout_s: 30,
            affinity_group: state.frontends[&v4].affinity_group,
            inline: state.frontends[&v4].slots[..].into(),
        }))]
    );
    assert_ne!(state.frontends[&v4].affinity_group, 0);
    web.affinity_timeout_s = 0;
    let ops = converge(&mut state, &BTreeMap::from([(v4, web)]));
    assert!(matches!(
        ops[..],
        [
            Op::PutBackend { backend, .. },
            Op::PutFrontend(ref write)
        ] if backend.flags == 0 && write.flags == svc_flags::CLUSTER_IP
    ));
    assert_eq!(backend_flags_of(&state), [0]);
}

#[test]
fn source_ranges_go_in_before_the_flag_and_out_after_it() {
    let mut state = DatapathState::default();
    let lb = fe("198.19.1.1", 80);
    let mut spec_lb = spec(&[("198.18.2.2", 8080)]);
    spec_lb.kind = FrontendKind::LoadBalancer;
    spec_lb.source_ranges = vec![("198.18.1.0".parse().unwrap(), 24)];
    let ops = converge(&mut state, &BTreeMap::from([(lb, spec_lb.clone())]));
    let range = ops
        .iter()
        .position(|op| matches!(op, Op::PutSourceRange(_)))
        .unwrap();
    let frontend = ops
        .iter()
        .position(|op| matches!(op, Op::PutFrontend(write) if write.flags & svc_flags::SOURCE_RANGES != 0))
        .unwrap();
    assert!(range < frontend);
    spec_lb.source_ranges.clear();
    let ops = converge(&mut state, &BTreeMap::from([(lb, spec_lb)]));
    let frontend = ops
        .iter()
        .position(|op| matches!(op, Op::PutFrontend(_)))
        .unwrap();
    let removed = ops
        .iter()
        .position(|op| matches!(op, Op::DeleteSourceRange(_)))
        .unwrap();
    assert!(frontend < removed);
    assert!(state.source_ranges.is_empty());
}

#[test]
fn terminating_backends_stay_without_slots_and_local_is_flagged() {
    let mut state = DatapathState::default();
    let v4 = fe("198.19.0.10", 80);
    let mut web = spec(&[("198.18.2.2", 8080), ("198.18.3.2", 8080)]);
    web.backends[0].node_local = true;
    converge(&mut state, &BTreeMap::from([(v4, web.clone())]));
    let terminating = web.backends.remove(1);
    web.terminating = vec![terminating];
    converge(&mut state, &BTreeMap::from([(v4, web.clone())]));
    assert_eq!(state.frontends[&v4].slots.len(), 1);
    let flags: Vec<u8> = state.backends.values().map(|b| b.flags).collect();
    assert_eq!(flags, [backend_flags::LOCAL, backend_flags::TERMINATING]);
    // Gone from the slice: gone from the maps.
    web.terminating.clear();
    converge(&mut state, &BTreeMap::from([(v4, web)]));
    assert_eq!(state.backends.len(), 1);
}

#[test]
fn frontends_of_a_service_port_and_family_share_one_affinity_group() {
    let mut state = DatapathState::default();
    let mut web = spec(&[("198.18.2.2", 8080)]);
    web.affinity_timeout_s = 30;
    let mut node_port = web.clone();
    node_port.kind = FrontendKind::NodePort;
    let mut other_port = web.clone();
    other_port.service.port_name = "metrics".into();
    let mut other_service = web.clone();
    other_service.service.name = "api".into();
    let (cluster_ip, np, v6) = (
        fe("198.19.0.10", 80),
        fe("198.18.0.1", 30080),
        fe("fd00::10", 80),
    );
    let (metrics, api) = (fe("198.19.0.10", 9090), fe("198.19.0.11", 80));
    let mut udp = fe("198.19.0.10", 80);
    udp.proto = crate::model::Protocol::Udp;
    let desired = BTreeMap::from([
        (cluster_ip, web.clone()),
        (np, node_port),
        (v6, web.clone()),
        (metrics, other_port),
        (api, other_service),
        (udp, web),
    ]);
    converge(&mut state, &desired);
    let group = |f| state.frontends[&f].affinity_group;
    assert_ne!(group(cluster_ip), 0);
    assert_eq!(group(cluster_ip), group(np));
    let others = [group(v6), group(metrics), group(api), group(udp)];
    assert!(
        others.iter().all(|g| *g != group(cluster_ip) && *g != 0),
        "{others:?}"
    );
    // Read back from the maps' state, the group is kept: nothing to write.
    assert!(diff(&state, &desired).ops.is_empty());
}

/// `count` addresses of both families, each with a frontend of 1 to
/// `INLINE_SLOTS + 3` backends (every third a load balancer's, with a
/// terminating backend and a source range) and a `NodePort` one.
fn varied(count: usize) -> BTreeMap<crate::model::Frontend, crate::model::FrontendSpec> {
    (0..count)
        .flat_map(|index| {
            let addr = if index % 2 == 0 {
                format!("198.19.1.{index}")
            } else {
                format!("fd00::1:{index:x}")
            };
            let mut web = spec_of(&backends(1 + index % (INLINE_SLOTS + 3)));
            if index % 3 == 0 {
                web.terminating = vec![backend("198.18.200.2", 8080)];
                web.kind = FrontendKind::LoadBalancer;
                let range = if index % 2 == 0 {
                    "198.18.1.0"
                } else {
                    "fd00::"
                };
                web.source_ranges = vec![(range.parse().unwrap(), 24)];
            }
            let mut other = spec_of(&backends(2));
            other.kind = FrontendKind::NodePort;
            [(fe(&addr, 80), web), (fe(&addr, 8443), other)]
        })
        .collect()
}

/// The frontend an op writes for, by the rev-NAT ids of `state`'s.
fn written_for(op: &Op, state: &DatapathState) -> Option<crate::model::Frontend> {
    let by_id = |id: u32| {
        state
            .frontends
            .iter()
            .find(|(_, entry)| entry.rev_nat_id == id)
            .map(|(frontend, _)| *frontend)
    };
    match op {
        Op::PutRevNat { frontend, .. } | Op::PutSlot { frontend, .. } => Some(*frontend),
        Op::PutFrontend(write) => Some(write.frontend),
        Op::PutBackend { backend, .. } => by_id(backend.key.rev_nat_id),
        Op::PutSourceRange((id, _, _)) => by_id(*id),
        _ => None,
    }
}

/// A first sync's plan in pieces: the plan's writes, each frontend's in
/// one piece and in their order, and the same state once all are applied.
#[test]
fn pieces_hold_the_plans_writes_with_each_frontend_whole() {
    let desired = varied(40);
    let empty = DatapathState::default();
    let whole = diff(&empty, &desired);
    let mut pieces = Vec::new();
    let problems = crate::plan::diff_in_pieces(&empty, &desired, 9, &mut |piece| {
        pieces.push(piece);
    });
    assert_eq!(problems, whole.problems);
    assert!(pieces.len() > 10, "{} pieces", pieces.len());
    // All but the frontends' last and the markers.
    for piece in &pieces[..pieces.len() - 2] {
        assert!(piece.len() >= 9, "a piece of {}", piece.len());
    }
    let debug = |ops: &[Op]| {
        let mut ops: Vec<String> = ops.iter().map(|op| format!("{op:?}")).collect();
        ops.sort();
        ops
    };
    assert_eq!(debug(&pieces.concat()), debug(&whole.ops));

    let mut applier = crate::plan::PieceApplier::new(&empty, 0);
    let mut state = empty.clone();
    for piece in &pieces {
        applier.apply(&mut state, piece);
    }
    applier.finish(&mut state).repack_grown(&mut state);
    let mut want = empty.clone();
    crate::plan::apply_to_state(&mut want, &whole.ops);
    assert_eq!(state, want);
    assert_eq!(state.next_backend_id, want.next_backend_id);

    // Each frontend's writes in one piece, in their order: its rev-NAT
    // entry and the backends its slots name before them, its frontend
    // entry last.
    let mut piece_of = BTreeMap::new();
    for (at, piece) in pieces.iter().enumerate() {
        let mut done = BTreeSet::new();
        let mut put = BTreeSet::new();
        for op in piece {
            let Some(frontend) = written_for(op, &state) else {
                continue;
            };
            assert_eq!(*piece_of.entry(frontend).or_insert(at), at, "{op:?}");
            assert!(!done.contains(&frontend), "{op:?} after its frontend");
            match op {
                Op::PutBackend { id, .. } => {
                    put.insert(*id);
                }
                Op::PutSlot { backend_id, .. } => assert!(put.contains(backend_id), "{op:?}"),
                Op::PutFrontend(write) => {
                    assert!(write.inline.iter().all(|id| put.contains(id)), "{op:?}");
                    assert!(
                        piece.iter().any(|other| matches!(
                            other,
                            Op::PutRevNat { id, .. } if *id == write.rev_nat_id
                        )),
                        "{op:?}"
                    );
                    done.insert(frontend);
                }
                _ => {}
            }
        }
    }
    assert_eq!(piece_of.len(), desired.len());

    // The markers last, on their own, as in the plan: every frontend gets
    // the service map's room before them.
    let (last, frontends) = pieces.split_last().unwrap();
    assert!(
        last.iter().all(|op| matches!(op, Op::PutMarker { .. })),
        "{last:?}"
    );
    assert!(
        frontends
            .concat()
            .iter()
            .all(|op| !matches!(op, Op::PutMarker { .. }))
    );
    let marked: BTreeSet<IpAddr> = last
        .iter()
        .filter_map(|op| match op {
            Op::PutMarker { addr } => Some(*addr),
            _ => None,
        })
        .collect();
    let cluster_ips: BTreeSet<IpAddr> = desired
        .iter()
        .filter(|(_, spec)| spec.kind == FrontendKind::ClusterIp)
        .map(|(frontend, _)| frontend.addr)
        .collect();
    assert_eq!(marked, cluster_ips);
}

/// Against a state that holds entries, the removals come in the last piece,
/// and the pieces still bring the state where the plan brings it.
#[test]
fn pieces_end_with_the_removals() {
    let mut state = DatapathState::default();
    converge(&mut state, &varied(12));
    let mut desired = varied(20);
    desired.retain(|frontend, _| frontend.addr.is_ipv4());
    let whole = diff(&state, &desired);
    let mut pieces = Vec::new();
    let _ = crate::plan::diff_in_pieces(&state, &desired, 4, &mut |piece| pieces.push(piece));
    let last = pieces.last().unwrap();
    let removals = |ops: &[Op]| {
        ops.iter()
            .filter(|op| {
                matches!(
                    op,
                    Op::DeleteFrontend { .. }
                        | Op::DeleteSlot { .. }
                        | Op::DeleteBackend { .. }
                        | Op::DeleteRevNat { .. }
                        | Op::DeleteSourceRange(_)
                        | Op::DeleteMarker { .. }
                )
            })
            .count()
    };
    assert!(removals(last) > 0);
    assert_eq!(removals(&pieces.concat()), removals(last));
    assert_eq!(removals(&whole.ops), removals(last));
    let mut applier = crate::plan::PieceApplier::new(&state, 0);
    let mut by_pieces = state.clone();
    for piece in &pieces {
        applier.apply(&mut by_pieces, piece);
    }
    applier.finish(&mut by_pieces).repack_grown(&mut by_pieces);
    crate::plan::apply_to_state(&mut state, &whole.ops);
    assert_eq!(by_pieces, state);
}

/// The backends' B-tree built before the last piece (as the agent does
/// while the markers are written) leaves the state the plan would, also
/// when that piece puts backends (no `ClusterIP`, so no markers).
#[test]
fn backends_built_before_the_last_piece_give_the_plans_state() {
    let mut without_markers = varied(10);
    for spec in without_markers.values_mut() {
        if spec.kind == FrontendKind::ClusterIp {
            spec.kind = FrontendKind::NodePort;
        }
    }
    for desired in [varied(10), without_markers] {
        let empty = DatapathState::default();
        let mut pieces = Vec::new();
        let _ = crate::plan::diff_in_pieces(&empty, &desired, 9, &mut |piece| pieces.push(piece));
        let (last, before) = pieces.split_last().unwrap();
        let mut applier = crate::plan::PieceApplier::new(&empty, 0);
        let mut state = empty.clone();
        for piece in before {
            applier.apply(&mut state, piece);
        }
        applier.build_backends(&mut state);
        applier.apply(&mut state, last);
        applier.finish(&mut state).repack_grown(&mut state);
        let mut want = empty.clone();
        crate::plan::apply_to_state(&mut want, &diff(&empty, &desired).ops);
        assert_eq!(state, want);
        assert_eq!(state.next_backend_id, want.next_backend_id);
    }
}
