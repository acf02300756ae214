//! Datapath tests (root): the real TC program run with `BPF_PROG_TEST_RUN` on
//! crafted IPv4/IPv6 TCP/UDP frames (see `support::prog_test` and
//! `support::frames`).
//!
//! This file: how long a flow lives as its endpoints change. A frontend
//! without endpoints for new flows refuses new flows only; a readiness flap
//! keeps TCP flows where they are and moves UDP flows off an endpoint that
//! no longer serves; a flow or an affinity entry is valid only while its
//! backend is one of that frontend's, whatever other frontends share it;
//! session affinity is shared by the frontends of a Service port.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use aya::maps::{HashMap as AyaHashMap, Map, MapData};
use lb_common::{EndpointKey, backend_flags, limits::BACKEND_ID_V6, map_names};
use lb_userspace::datapath::{loader, maps::Maps};

use lb_userspace::model::{Backend, Frontend, FrontendKind, FrontendSpec, Protocol};
use lb_userspace::plan;

use support::frames::{Frame, SCTP_DATA, SCTP_INIT, TCP_ACK, TCP_PSH, TCP_SYN, verify_checksums};
use support::prog_test::{
    BACKENDS4, BACKENDS6, Fixture, NODE4, NODE6, TC_ACT_OK, TC_ACT_SHOT, VIP4, VIP6, addrs,
    frontend, node_config, refused, spec, translated,
};

/// The families: service address, client address, backends.
const FAMILIES: [(&str, &str, [&str; 3]); 2] = [
    (VIP4, "198.18.1.2", BACKENDS4),
    (VIP6, "fd00:1::2", BACKENDS6),
];

fn be(addr: SocketAddr) -> Backend {
    Backend {
        addr: addr.ip(),
        port: addr.port(),
        node_local: false,
    }
}

/// A `ClusterIP` spec taking new flows to `active`, draining `draining`
/// (terminating), of which `not_serving` serve no more.
fn draining_spec(
    active: &[SocketAddr],
    draining: &[SocketAddr],
    not_serving: &[SocketAddr],
) -> FrontendSpec {
    let mut web = spec(FrontendKind::ClusterIp, active);
    web.terminating = draining.iter().copied().map(be).collect();
    web.not_serving = not_serving.iter().copied().map(be).collect();
    web
}

/// A `ClusterIP` spec taking new flows to `active`, with `not_ready`
/// endpoints (not terminating) of which `not_serving` serve no more.
fn flapping_spec(
    active: &[SocketAddr],
    not_ready: &[SocketAddr],
    not_serving: &[SocketAddr],
) -> FrontendSpec {
    let mut web = spec(FrontendKind::ClusterIp, active);
    web.not_ready = not_ready.iter().copied().map(be).collect();
    web.not_serving = not_serving.iter().copied().map(be).collect();
    web
}

/// A packet from `client:sport` to `frontend`: a SYN (`first`) or an
/// ACK+PSH for TCP, a datagram for UDP.
fn packet(client: &str, sport: u16, frontend: &Frontend, first: bool) -> Frame {
    let src = SocketAddr::new(client.parse().unwrap(), sport).to_string();
    let dst = SocketAddr::new(frontend.addr, frontend.port).to_string();
    match frontend.proto {
        Protocol::Tcp if first => Frame::tcp(&src, &dst, TCP_SYN),
        Protocol::Tcp => Frame::tcp(&src, &dst, TCP_ACK | TCP_PSH),
        Protocol::Udp => Frame::udp(&src, &dst),
        Protocol::Sctp if first => Frame::sctp(&src, &dst, SCTP_INIT),
        Protocol::Sctp => Frame::sctp(&src, &dst, SCTP_DATA),
    }
}

/// Issue 9, item 1: a frontend whose only endpoint terminates refuses new
/// flows, but its established flows go on until the endpoint leaves the
/// slice (kube-proxy rejects `ct state new` only).
#[test]
fn without_endpoints_for_new_flows_only_new_flows_are_refused() {
    let Some(mut fx) = Fixture::new("without_endpoints_for_new_flows_only_new_flows_are_refused")
    else {
        return;
    };
    for (vip, client, list) in FAMILIES {
        let only = addrs(&list)[0];
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let fe = frontend(vip, 80, proto);
            let what = format!("{vip} {proto}");
            fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &[only]))]);
            let first = packet(client, 40000, &fe, true);
            assert_eq!(translated(&mut fx, &first, &what), only);
            let follow = packet(client, 40000, &fe, false);

            // Terminating and not serving: nothing takes new flows.
            for not_serving in [&[][..], &[only][..]] {
                fx.set_specs(&[(fe, draining_spec(&[], &[only], not_serving))]);
                let established = fx.reason("nat_established");
                let got = translated(&mut fx, &follow, &format!("{what}: established"));
                assert_eq!(got, only, "{what}: established flow moved");
                assert_eq!(fx.reason("nat_established"), established + 1);
                let other = packet(client, 40001, &fe, true);
                refused(&mut fx, &other, &format!("{what}: new flow"));
            }

            // Gone from the slice: the established flow is refused too.
            fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &[]))]);
            refused(&mut fx, &follow, &format!("{what}: endpoint gone"));
            fx.set_specs(&[]);
        }
    }
}

/// Issue 9, item 2: an endpoint that turns not ready (and not serving)
/// without terminating takes no new flows; its TCP flows go on, its UDP
/// flows move to a serving endpoint on their next datagram. A not ready
/// endpoint that still serves keeps its UDP flows.
#[test]
fn readiness_flap_keeps_tcp_and_moves_udp_off_endpoints_not_serving() {
    let Some(mut fx) = Fixture::new("readiness_flap_keeps_tcp_and_moves_udp") else {
        return;
    };
    for (vip, client, list) in FAMILIES {
        let all = addrs(&list);
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let fe = frontend(vip, 80, proto);
            let what = format!("{vip} {proto}");
            fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &all))]);
            let first = packet(client, 41000, &fe, true);
            let flapping = translated(&mut fx, &first, &what);
            let others: Vec<SocketAddr> = all.iter().copied().filter(|b| *b != flapping).collect();
            let follow = packet(client, 41000, &fe, false);

            // Not ready but serving: the flow stays, for both protocols.
            fx.set_specs(&[(fe, flapping_spec(&others, &[flapping], &[]))]);
            let got = translated(&mut fx, &follow, &format!("{what}: not ready, serving"));
            assert_eq!(got, flapping, "{what}: flow moved off a serving endpoint");

            // Not serving either: TCP stays, UDP moves and sticks there.
            fx.set_specs(&[(fe, flapping_spec(&others, &[flapping], &[flapping]))]);
            let got = translated(&mut fx, &follow, &format!("{what}: not serving"));
            if proto == Protocol::Tcp {
                assert_eq!(got, flapping, "{what}: TCP flow cut by a readiness flap");
            } else {
                assert!(others.contains(&got), "{what}: UDP flow not moved: {got}");
                let again = translated(&mut fx, &follow, &format!("{what}: moved"));
                assert_eq!(again, got, "{what}: moved UDP flow does not stick");
            }
            // No new flow goes to it.
            for sport in 41100..41140 {
                let new = packet(client, sport, &fe, true);
                let got = translated(&mut fx, &new, &format!("{what}: new flow"));
                assert_ne!(got, flapping, "{what}: new flow to a not ready endpoint");
            }
            // Ready again: new flows may go to it, the flow is where it was.
            fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &all))]);
            let got = translated(&mut fx, &follow, &format!("{what}: ready again"));
            if proto == Protocol::Tcp {
                assert_eq!(got, flapping, "{what}: TCP flow moved");
            }
            fx.set_specs(&[]);
        }
    }
}

/// Issue 9, item 3: one endpoint behind two frontends, removed from one:
/// that frontend's UDP flow moves off it and its affinity client is sent
/// to the frontend's current backends, while the other frontend's flow
/// stays.
#[test]
fn membership_is_per_frontend_for_flows_and_affinity() {
    let Some(mut fx) = Fixture::new("membership_is_per_frontend_for_flows_and_affinity") else {
        return;
    };
    for (vip, client, list) in FAMILIES {
        let [shared, own, _] = [0, 1, 2].map(|i| addrs(&list)[i]);
        let what = vip;

        // UDP: A and B both have `shared`; then A loses it.
        let (a, b) = (
            frontend(vip, 53, Protocol::Udp),
            frontend(vip, 54, Protocol::Udp),
        );
        let both = |a_backends: &[SocketAddr]| {
            [
                (a, spec(FrontendKind::ClusterIp, a_backends)),
                (b, spec(FrontendKind::ClusterIp, &[shared])),
            ]
        };
        fx.set_specs(&both(&[shared]));
        // Two client ports: from one port the two flows' reply tuples would
        // clash (see `two_frontends_one_client_port_coexist`).
        let to_a = packet(client, 42000, &a, true);
        let to_b = packet(client, 42001, &b, true);
        assert_eq!(translated(&mut fx, &to_a, what), shared);
        assert_eq!(translated(&mut fx, &to_b, what), shared);
        fx.set_specs(&both(&[own]));
        let got = translated(&mut fx, &to_a, &format!("{what}: A after removal"));
        assert_eq!(
            got, own,
            "{what}: A's UDP flow kept an endpoint A no longer has"
        );
        let got = translated(&mut fx, &to_b, &format!("{what}: B"));
        assert_eq!(got, shared, "{what}: B's flow moved");

        // Affinity (TCP): the client of A is not sent to `shared` any more.
        let (a, b) = (
            frontend(vip, 80, Protocol::Tcp),
            frontend(vip, 81, Protocol::Tcp),
        );
        let both = |a_backends: &[SocketAddr]| {
            let mut sticky = spec(FrontendKind::ClusterIp, a_backends);
            sticky.affinity_timeout_s = 600;
            [(a, sticky), (b, spec(FrontendKind::ClusterIp, &[shared]))]
        };
        fx.set_specs(&both(&[shared]));
        let first = packet(client, 43000, &a, true);
        assert_eq!(translated(&mut fx, &first, what), shared);
        fx.set_specs(&both(&[own]));
        for sport in 43001..43005 {
            let new = packet(client, sport, &a, true);
            let got = translated(&mut fx, &new, &format!("{what}: affinity"));
            assert_eq!(
                got, own,
                "{what}: affinity kept an endpoint A no longer has"
            );
        }
        fx.set_specs(&[]);
    }
}

/// Issue 9, item 3, the datapath's own check: the fixture reads the state
/// back from the maps before every change and writes op by op
/// (`Maps::apply_op`, which keeps no record of the next id), so an id freed
/// at the top is handed out again, as after a restart that lost the
/// record. A stale conntrack or affinity entry of frontend A naming that
/// id, now frontend B's backend, must not send A's client to B's endpoint.
#[test]
fn stale_entry_never_lands_on_another_frontends_backend() {
    let Some(mut fx) = Fixture::new("stale_entry_never_lands_on_another_frontends_backend") else {
        return;
    };
    for (vip, client, list) in FAMILIES {
        let [gone, own, other] = [0, 1, 2].map(|i| addrs(&list)[i]);
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let what = format!("{vip} {proto}");
            // B sorts before A, so its new backend is given the id first.
            let (b, a) = (frontend(vip, 70, proto), frontend(vip, 80, proto));
            let a_spec = |backends: &[SocketAddr]| {
                let mut sticky = spec(FrontendKind::ClusterIp, backends);
                sticky.affinity_timeout_s = 600;
                sticky
            };
            fx.set_specs(&[(a, a_spec(&[gone]))]);
            let first = packet(client, 44000, &a, true);
            assert_eq!(translated(&mut fx, &first, &what), gone);
            let gone_id = fx
                .conntrack()
                .iter()
                .find(|r| {
                    r.direction == "service"
                        && r.protocol == proto.name()
                        && (r.source, r.destination) == (first.src, first.dst)
                })
                .expect("the flow's service entry")
                .backend_id;
            // A loses its endpoint (its id is freed, the highest), then B
            // comes with a new one and A gets another.
            fx.set_specs(&[(a, a_spec(&[]))]);
            fx.set_specs(&[
                (b, spec(FrontendKind::ClusterIp, &[other])),
                (a, a_spec(&[own])),
            ]);
            let state = fx.maps.read_state().expect("state");
            let b_slot = state.frontends[&b].slots[0];
            assert_eq!(
                b_slot, gone_id,
                "{what}: the fixture no longer reuses the id"
            );
            // A's stale conntrack entry (UDP; TCP: the follow-up) and its
            // client's affinity entry both name B's backend now. The UDP
            // flow moves to A's endpoint; the TCP segment cannot open a
            // connection there, so it is refused (a reset, no state).
            let follow = packet(client, 44000, &a, false);
            if proto == Protocol::Udp {
                let got = translated(&mut fx, &follow, &format!("{what}: stale flow"));
                assert_eq!(got, own, "{what}: A's flow landed on B's endpoint");
            } else {
                refused(&mut fx, &follow, &format!("{what}: stale flow"));
            }
            let new = packet(client, 44001, &a, true);
            let got = translated(&mut fx, &new, &format!("{what}: stale affinity"));
            assert_eq!(got, own, "{what}: A's affinity client sent to B's endpoint");
            fx.set_specs(&[]);
        }
    }
}

/// Issue 9, item 3: backend ids written by the agent's path
/// (`Maps::apply_ops`) keep moving forward across a restart (the state read
/// back from the pins), also past an id freed at the top, in each family's
/// range of its own (an IPv6 id has `limits::BACKEND_ID_V6`; each
/// family's backend array keeps its own record of the next id).
#[test]
fn backend_ids_keep_moving_forward_across_a_restart() {
    let Some(mut fx) = Fixture::new("backend_ids_keep_moving_forward_across_a_restart") else {
        return;
    };
    let maps = &mut fx.maps;
    for (vip, _, list) in FAMILIES {
        let fe = frontend(vip, 80, Protocol::Tcp);
        let mut sync = |backends: &[SocketAddr]| {
            let desired = BTreeMap::from([(fe, spec(FrontendKind::ClusterIp, backends))]);
            // A fresh read each time: what an agent starts from after a
            // restart.
            let state = maps.read_state().expect("read state");
            let plan = plan::diff(&state, &desired);
            maps.apply_ops(&plan.ops, &mut |op, result| {
                result.unwrap_or_else(|error| panic!("{op:?}: {error}"));
            });
            let state = maps.read_state().expect("read state");
            state.frontends[&fe].slots.clone()
        };
        let [b0, b1, b2] = [0, 1, 2].map(|i| addrs(&list)[i]);
        let ids = sync(&[b0, b1]);
        let family_bit = if b0.is_ipv6() { BACKEND_ID_V6 } else { 0 };
        assert!(
            ids.iter().all(|id| id & BACKEND_ID_V6 == family_bit),
            "{vip}: {ids:x?}"
        );
        let highest = *ids.iter().max().unwrap();
        // The highest id is freed, then a new endpoint comes.
        sync(&[b0]);
        let ids = sync(&[b0, b2]);
        assert!(
            ids.iter().max().unwrap() > &highest,
            "{vip}: an id freed at the top was handed out again: {ids:?} (highest was {highest})"
        );
        // Back in the slice: another new id, not its old one.
        let before = *ids.iter().max().unwrap();
        sync(&[b0]);
        let ids = sync(&[b0, b1]);
        assert!(ids.iter().max().unwrap() > &before, "{vip}: {ids:?}");
        sync(&[]);
    }
    // The records are not backends of any frontend.
    let state = maps.read_state().expect("read state");
    assert!(!state.backends.contains_key(&0) && !state.backends.contains_key(&BACKEND_ID_V6));
}

/// A backend entry is cleared in place (its rev-NAT id only: the address
/// stays in the array, see `datapath::maps`). A slot left naming it (as
/// an apply interrupted between the slot's write and the backend's
/// removal leaves one) must send nothing to the old address: the
/// conntrack entry of the flow it served no longer holds, and a new flow
/// finds no backend (`drop_backend_missing`).
#[test]
fn a_cleared_backend_entry_is_never_used() {
    let Some(mut fx) = Fixture::new("a_cleared_backend_entry_is_never_used") else {
        return;
    };
    for (vip, client, list) in FAMILIES {
        let gone = addrs(&list)[0];
        for (proto, sport) in [(Protocol::Tcp, 45000), (Protocol::Udp, 45100)] {
            let what = format!("{vip} {proto}");
            let fe = frontend(vip, 80, proto);
            fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &[gone]))]);
            let first = packet(client, sport, &fe, true);
            assert_eq!(translated(&mut fx, &first, &what), gone);
            let id = fx.maps.read_state().expect("state").frontends[&fe].slots[0];
            let delete = [plan::Op::DeleteBackend {
                id,
                addr: gone.ip(),
            }];
            fx.maps.apply_ops(&delete, &mut |op, result| {
                result.unwrap_or_else(|error| panic!("{op:?}: {error}"));
            });
            let state = fx.maps.read_state().expect("state");
            assert_eq!(state.frontends[&fe].slots, [id], "{what}: the slot stays");
            assert!(
                !state.backends.contains_key(&id),
                "{what}: read back as gone"
            );
            let missing = fx.reason("drop_backend_missing");
            // The established flow: its conntrack entry no longer holds. A
            // TCP segment that cannot open a connection is refused (a
            // reset, as without any entry); a UDP datagram is a new flow,
            // which finds no backend.
            let follow = packet(client, sport, &fe, false);
            if proto == Protocol::Tcp {
                refused(&mut fx, &follow, &format!("{what}: the established flow"));
            }
            let new_flows = if proto == Protocol::Tcp {
                vec![packet(client, sport + 1, &fe, true)]
            } else {
                vec![follow, packet(client, sport + 1, &fe, true)]
            };
            for frame in &new_flows {
                let (verdict, out) = fx.run(&frame.bytes());
                assert_eq!(
                    (verdict, out),
                    (TC_ACT_SHOT, frame.bytes()),
                    "{what}: a new flow was not dropped untouched"
                );
            }
            assert_eq!(
                fx.reason("drop_backend_missing"),
                missing + new_flows.len() as u64,
                "{what}"
            );
            fx.set_specs(&[]);
        }
    }
}

/// The backend a new TCP flow from `client:sport` to `frontend` is sent to
/// (its source may be translated too: external frontends to remote
/// endpoints source-NAT).
fn backend_of(fx: &mut Fixture, client: &str, sport: u16, frontend: &Frontend) -> SocketAddr {
    let (verdict, out) = fx.run(&packet(client, sport, frontend, true).bytes());
    assert_eq!(verdict, TC_ACT_OK, "{frontend}: not translated");
    verify_checksums(&out).1
}

/// The frontends of one Service port (default/web, TCP) with
/// `ClientIP` affinity: the `ClusterIP`, a `NodePort` and a load-balancer
/// IP. With `local`, `externalTrafficPolicy: Local`: the external ones
/// have only that (node-local) endpoint.
fn sticky_port(
    (vip, node, lb_ip): (&str, &str, &str),
    endpoints: &[SocketAddr],
    local: Option<SocketAddr>,
) -> [(Frontend, FrontendSpec); 3] {
    let sticky = |kind| {
        let mut web = spec(kind, endpoints);
        web.affinity_timeout_s = 600;
        for endpoint in &mut web.backends {
            endpoint.node_local = Some(SocketAddr::new(endpoint.addr, endpoint.port)) == local;
        }
        if kind != FrontendKind::ClusterIp && local.is_some() {
            web.external_local = true;
            web.backends.retain(|endpoint| endpoint.node_local);
        }
        web
    };
    [
        (
            frontend(vip, 80, Protocol::Tcp),
            sticky(FrontendKind::ClusterIp),
        ),
        (
            frontend(node, 30080, Protocol::Tcp),
            sticky(FrontendKind::NodePort),
        ),
        (
            frontend(lb_ip, 80, Protocol::Tcp),
            sticky(FrontendKind::LoadBalancer),
        ),
    ]
}

/// Issue 10: one set of affinity clients per Service port and family, as
/// kube-proxy's per-endpoint affinity sets in the port's chain, which
/// every frontend of the port jumps to. A client stuck to an endpoint
/// through the `ClusterIP` gets it through the `NodePort` and the
/// load-balancer IP too: 3 endpoints and 20 new flows (20 source ports)
/// per frontend, so a choice by the flow hash would show. With
/// `externalTrafficPolicy: Local`, the external frontends have only the
/// node-local endpoint and do not use a remote sticky one (kube-proxy's
/// external chain for Local jumps to local endpoints' chains only); the
/// client is then stuck to the local endpoint, which the `ClusterIP` has
/// too (kube-proxy: the client is in both endpoints' sets and the first
/// one listed wins; here the last choice does).
#[test]
fn affinity_is_shared_by_a_service_ports_frontends() {
    let Some(mut fx) = Fixture::new("affinity_is_shared_by_a_service_ports_frontends") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    let addresses = [(NODE4, "198.19.1.1"), (NODE6, "fd00:19::1")];
    for ((vip, client, list), (node, lb_ip)) in FAMILIES.into_iter().zip(addresses) {
        let endpoints = addrs(&list);
        let port = (vip, node, lb_ip);
        let [cluster_ip, node_port, lb] = sticky_port(port, &endpoints, None).map(|(f, _)| f);
        fx.set_specs(&sticky_port(port, &endpoints, None));
        let mut sport = 40000u16;
        let mut next_backend = |fx: &mut Fixture, frontend: &Frontend| {
            sport += 1;
            backend_of(fx, client, sport, frontend)
        };
        let first = next_backend(&mut fx, &cluster_ip);
        for frontend in [&cluster_ip, &node_port, &lb] {
            let got: Vec<SocketAddr> = (0..20).map(|_| next_backend(&mut fx, frontend)).collect();
            assert!(
                got.iter().all(|b| *b == first),
                "{frontend}: not the endpoint the client is stuck to ({first}): {got:?}"
            );
        }

        // externalTrafficPolicy: Local, the node-local endpoint another one.
        let local = *endpoints.iter().find(|e| **e != first).unwrap();
        fx.set_specs(&sticky_port(port, &endpoints, Some(local)));
        assert_eq!(
            next_backend(&mut fx, &cluster_ip),
            first,
            "ClusterIP kept it"
        );
        for frontend in [&node_port, &lb, &cluster_ip] {
            for _ in 0..20 {
                let got = next_backend(&mut fx, frontend);
                assert_eq!(got, local, "{frontend}: a remote sticky endpoint at Local");
            }
        }
        fx.set_specs(&[]);
    }
}

/// Removes every entry of the pinned endpoint index `name`.
fn clear<A: lb_common::MapAddr>(fx: &Fixture, name: &str) {
    let data = MapData::from_pin(fx.pin_path.join(name)).unwrap();
    let mut map: AyaHashMap<MapData, EndpointKey<A>, u32> =
        AyaHashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let keys: Vec<_> = map.keys().map(Result::unwrap).collect();
    for key in keys {
        map.remove(&key).unwrap();
    }
}

/// The endpoint index as pinned, both families: (frontend, endpoint
/// address, port, protocol) -> backend id.
fn endpoint_index(fx: &Fixture) -> BTreeMap<(u32, IpAddr, u16, u8), u32> {
    fn read<A: lb_common::MapAddr + Into<IpAddr>>(
        fx: &Fixture,
        name: &str,
        out: &mut BTreeMap<(u32, IpAddr, u16, u8), u32>,
    ) {
        let data = MapData::from_pin(fx.pin_path.join(name)).unwrap();
        let map: AyaHashMap<MapData, EndpointKey<A>, u32> =
            AyaHashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
        for item in &map {
            let (key, id) = item.unwrap();
            let endpoint = (key.rev_nat_id, key.addr.into(), u16::from_be(key.port_be));
            out.insert((endpoint.0, endpoint.1, endpoint.2, key.proto), id);
        }
    }
    let mut out = BTreeMap::new();
    read::<[u8; 4]>(fx, map_names::ENDPOINTS4, &mut out);
    read::<[u8; 16]>(fx, map_names::ENDPOINTS6, &mut out);
    out
}

/// What the index must hold: one entry per backend entry of an affinity
/// frontend (`backend_flags::INDEXED`).
fn expected_index(fx: &Fixture) -> BTreeMap<(u32, IpAddr, u16, u8), u32> {
    let state = fx.maps.read_state().expect("read state");
    state
        .backends
        .iter()
        .filter(|(_, b)| b.flags & backend_flags::INDEXED != 0)
        .map(|(id, b)| {
            let k = b.key;
            ((k.rev_nat_id, k.addr, k.port, k.proto.number()), *id)
        })
        .collect()
}

/// The endpoint index (affinity across a port's frontends) follows the
/// backend entries of affinity frontends through the agent's batched
/// writes and removals; a frontend without affinity has none (at 100k
/// Services the index of every backend was a third of the first sync's
/// map writes); and the pinned backends of an agent that indexed nothing
/// (an upgrade) are rewritten and indexed by the next sync.
#[test]
fn endpoint_index_follows_the_backend_entries() {
    let Some(mut fx) = Fixture::new("endpoint_index_follows_the_backend_entries") else {
        return;
    };
    let sync = |fx: &mut Fixture, keep: usize| {
        let mut desired = BTreeMap::new();
        for ((vip, _, list), node) in FAMILIES.into_iter().zip([NODE4, NODE6]) {
            let endpoints = &addrs(&list)[..keep];
            // The ClusterIP and the NodePort.
            desired.extend(
                sticky_port((vip, node, vip), endpoints, None)
                    .into_iter()
                    .take(2),
            );
            // A Service port without affinity on the same endpoints.
            desired.insert(
                frontend(vip, 81, Protocol::Tcp),
                spec(FrontendKind::ClusterIp, endpoints),
            );
        }
        let state = fx.maps.read_state().expect("read state");
        let plan = plan::diff(&state, &desired);
        fx.maps.apply_ops(&plan.ops, &mut |op, result| {
            result.unwrap_or_else(|error| panic!("{op:?}: {error}"));
        });
    };
    sync(&mut fx, 3);
    let full = expected_index(&fx);
    assert_eq!(
        full.len(),
        12,
        "2 families x 2 affinity frontends x 3 endpoints"
    );
    assert_eq!(fx.maps.read_state().unwrap().backends.len(), 18);
    assert_eq!(endpoint_index(&fx), full);
    sync(&mut fx, 1);
    assert_eq!(endpoint_index(&fx), expected_index(&fx));
    assert_eq!(endpoint_index(&fx).len(), 4);
    sync(&mut fx, 3);
    assert_eq!(endpoint_index(&fx), expected_index(&fx));

    // An agent that indexed nothing: no index, no INDEXED bit. The next
    // load leaves the maps as they are; the next sync rewrites the
    // affinity frontends' backends, and indexes them.
    clear::<[u8; 4]>(&fx, map_names::ENDPOINTS4);
    clear::<[u8; 16]>(&fx, map_names::ENDPOINTS6);
    unmark_indexed(&mut fx);
    let mut again = loader::load_with(&fx.pin_path, &loader::Capacities::default()).unwrap();
    let _maps = Maps::from_ebpf(&mut again).unwrap();
    assert!(endpoint_index(&fx).is_empty());
    sync(&mut fx, 3);
    let rebuilt = endpoint_index(&fx);
    assert_eq!(rebuilt.len(), 12);
    assert_eq!(rebuilt, expected_index(&fx));
}

/// Clears `backend_flags::INDEXED` in every backend entry (as an agent
/// from before the bit wrote them), through the agent's own writes.
fn unmark_indexed(fx: &mut Fixture) {
    let state = fx.maps.read_state().unwrap();
    let ops: Vec<plan::Op> = state
        .backends
        .iter()
        .map(|(id, entry)| plan::Op::PutBackend {
            id: *id,
            backend: plan::BackendEntry {
                flags: entry.flags & !backend_flags::INDEXED,
                ..*entry
            },
        })
        .collect();
    fx.maps.apply_ops(&ops, &mut |op, result| {
        result.unwrap_or_else(|error| panic!("{op:?}: {error}"));
    });
    assert!(
        fx.maps
            .read_state()
            .unwrap()
            .backends
            .values()
            .all(|entry| entry.flags & backend_flags::INDEXED == 0)
    );
}
