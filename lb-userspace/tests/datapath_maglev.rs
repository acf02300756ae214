//! Maglev in the datapath (root): the real TC program under
//! `BPF_PROG_TEST_RUN` with tables written by the agent's own `MaglevSync`.
//!
//! - a new flow goes to `table[flow_hash % M]`, the table the pure builder
//!   makes from the backends' identities (so every node, whatever its
//!   backend ids, picks the same endpoint; the hash has a fixed seed);
//! - which frontends get a table, and the cap;
//! - an established flow keeps its backend across a table change;
//! - tables swapped while packets run: every packet lands on the table
//!   before or after the swap, never on a stale row or on the slots.

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::svc_flags;
use lb_userspace::{
    datapath::{
        loader::Capacities,
        maglev::{LbAlgorithm, MaglevConfig, MaglevSync},
        maps::Maps,
    },
    maglev::{self, MaglevBackend},
    model::{Frontend, FrontendKind, FrontendSpec, Protocol},
    plan::{BackendEntry, BackendKey, DatapathState, FrontendState, Op},
};

use support::frames::{Frame, TCP_ACK, TCP_SYN, verify_checksums};
use support::prog_test::{Fixture, TC_ACT_OK, VIP4, VIP6, addrs, flow_hash, frontend, spec};

/// A small table keeps the tests quick; any listed prime works the same.
const M: u32 = 251;

fn config(algorithm: LbAlgorithm, max_tables: u32) -> MaglevConfig {
    MaglevConfig {
        algorithm,
        external: true,
        table_size: M,
        max_tables,
        seed: 0,
    }
}

fn fixture(what: &str, config: MaglevConfig) -> Option<Fixture> {
    Fixture::with_capacities(
        what,
        &Capacities {
            maglev: config,
            ..Capacities::default()
        },
    )
}

/// The replica (`support::prog_test::flow_hash`) gives the datapath's own
/// known answer (`hash.rs`).
#[test]
fn flow_hash_replica_matches_the_datapath() {
    let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let dst: SocketAddr = "10.96.0.10:80".parse().unwrap();
    assert_eq!(flow_hash(src, dst, 6), 0x7515_dddd);
}

/// Tables as the maps and the model have them after a sync.
fn sync(fx: &mut Fixture, maglev: &mut MaglevSync, specs: &[(Frontend, FrontendSpec)]) -> u64 {
    let state = fx.maps.read_state().expect("read state");
    let specs: BTreeMap<Frontend, FrontendSpec> = specs.iter().cloned().collect();
    let outcome = maglev.sync(&state, &specs, fx.maps.maglev());
    assert_eq!(outcome.failures, 0);
    outcome.tables_written
}

/// The table the pure builder makes for `frontend` from what the maps
/// hold, as endpoints.
fn expected_table(fx: &Fixture, frontend: &Frontend, spec: &FrontendSpec) -> Vec<SocketAddr> {
    let state = fx.maps.read_state().expect("read state");
    let fstate = &state.frontends[frontend];
    let backends: Vec<MaglevBackend> = fstate
        .slots
        .iter()
        .map(|id| {
            let key = state.backends[id].key;
            MaglevBackend {
                addr: key.addr,
                port: key.port,
                proto: key.proto,
                weight: 1,
                id: *id,
            }
        })
        .collect();
    let seed = maglev::seed_for(0, &spec.service, frontend.addr.is_ipv6());
    maglev::build_table(seed, &backends, M)
        .into_iter()
        .map(|id| {
            let key = state.backends[&id].key;
            SocketAddr::new(key.addr, key.port)
        })
        .collect()
}

fn rev_nat_id(fx: &Fixture, frontend: &Frontend) -> u32 {
    fx.maps.read_state().expect("read state").frontends[frontend].rev_nat_id
}

/// A new TCP flow from `src` to `vip`; the backend it was sent to.
fn new_flow(fx: &mut Fixture, src: SocketAddr, vip: SocketAddr) -> SocketAddr {
    let frame = Frame::tcp(&src.to_string(), &vip.to_string(), TCP_SYN);
    let (verdict, out) = fx.run(&frame.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    verify_checksums(&out).1
}

#[test]
fn new_flows_take_the_table_entry_of_their_hash() {
    let Some(mut fx) = fixture("maglev choice", config(LbAlgorithm::Maglev, 4)) else {
        return;
    };
    let backends4 = addrs(&[
        "198.18.2.2:8080",
        "198.18.3.2:8080",
        "198.18.4.2:8080",
        "198.18.5.2:8080",
        "198.18.6.2:8080",
    ]);
    let backends6 = addrs(&["[fd00:2::2]:8080", "[fd00:3::2]:8080", "[fd00:4::2]:8080"]);
    let fe4 = frontend(VIP4, 80, Protocol::Tcp);
    let fe6 = frontend(VIP6, 80, Protocol::Tcp);
    let specs = [
        (fe4, spec(FrontendKind::ClusterIp, &backends4)),
        (fe6, spec(FrontendKind::ClusterIp, &backends6)),
    ];
    fx.set_specs(&specs);
    let mut maglev = MaglevSync::new(config(LbAlgorithm::Maglev, 4));
    assert_eq!(sync(&mut fx, &mut maglev, &specs), 2);
    assert_eq!(sync(&mut fx, &mut maglev, &specs), 0, "unchanged: no write");
    for (fe, spec, client) in [
        (fe4, &specs[0].1, "10.0.0.1"),
        (fe6, &specs[1].1, "fd00:1::1"),
    ] {
        let table = expected_table(&fx, &fe, spec);
        let vip = SocketAddr::new(fe.addr, fe.port);
        let mut used = std::collections::BTreeSet::new();
        for port in 0..200u16 {
            let src = SocketAddr::new(client.parse().unwrap(), 20_000 + port);
            let want = table[(flow_hash(src, vip, 6) % M) as usize];
            assert_eq!(new_flow(&mut fx, src, vip), want, "flow {src}");
            used.insert(want);
        }
        assert!(used.len() > 1, "flows spread over the backends: {used:?}");
    }
}

#[test]
fn north_south_frontends_get_tables_up_to_the_cap() {
    let cfg = MaglevConfig {
        algorithm: LbAlgorithm::Random,
        ..config(LbAlgorithm::Random, 1)
    };
    let Some(mut fx) = fixture("maglev cap", cfg) else {
        return;
    };
    assert_eq!(fx.maps.maglev().table_capacity(M), 1);
    let backends = addrs(&["198.18.2.2:8080", "198.18.3.2:8080"]);
    let cluster = frontend(VIP4, 80, Protocol::Tcp);
    let external_a = frontend("198.19.0.20", 80, Protocol::Tcp);
    let external_b = frontend("198.19.0.21", 80, Protocol::Tcp);
    let specs = [
        (cluster, spec(FrontendKind::ClusterIp, &backends)),
        (external_a, spec(FrontendKind::ExternalIp, &backends)),
        (external_b, spec(FrontendKind::ExternalIp, &backends)),
    ];
    fx.set_specs(&specs);
    let state = fx.maps.read_state().unwrap();
    let specs_map: BTreeMap<Frontend, FrontendSpec> = specs.iter().cloned().collect();
    let mut maglev = MaglevSync::new(cfg);
    let outcome = maglev.sync(&state, &specs_map, fx.maps.maglev());
    assert_eq!(outcome.tables_written, 1);
    assert_eq!(outcome.without_table.len(), 1, "the cap of 1 is reported");
    let refs = |fx: &mut Fixture, fe: &Frontend| {
        let id = rev_nat_id(fx, fe);
        fx.maps.maglev().get_ref(id).unwrap()
    };
    assert_eq!(refs(&mut fx, &cluster), 0, "random ClusterIP: no table");
    let with_table = [external_a, external_b]
        .iter()
        .filter(|fe| refs(&mut fx, fe) != 0)
        .count();
    assert_eq!(with_table, 1);
    // One external frontend goes: the other one takes the freed table.
    let specs = [specs[0].clone(), specs[2].clone()];
    fx.set_specs(&specs);
    let state = fx.maps.read_state().unwrap();
    let specs_map: BTreeMap<Frontend, FrontendSpec> = specs.iter().cloned().collect();
    maglev.sync(&state, &specs_map, fx.maps.maglev());
    let outcome = maglev.sync(&state, &specs_map, fx.maps.maglev());
    assert!(outcome.without_table.is_empty());
    assert_ne!(refs(&mut fx, &external_b), 0);
}

#[test]
fn established_flows_keep_their_backend_across_a_table_change() {
    let Some(mut fx) = fixture("maglev conntrack", config(LbAlgorithm::Maglev, 4)) else {
        return;
    };
    let fe = frontend(VIP4, 80, Protocol::Tcp);
    let vip = SocketAddr::new(fe.addr, fe.port);
    let before = addrs(&["198.18.2.2:8080", "198.18.3.2:8080", "198.18.4.2:8080"]);
    let mut after = before.clone();
    after.extend(addrs(&["198.18.5.2:8080", "198.18.6.2:8080"]));
    let specs_before = [(fe, spec(FrontendKind::ClusterIp, &before))];
    let specs_after = [(fe, spec(FrontendKind::ClusterIp, &after))];
    let mut maglev = MaglevSync::new(config(LbAlgorithm::Maglev, 4));
    fx.set_specs(&specs_before);
    sync(&mut fx, &mut maglev, &specs_before);
    let old_table = expected_table(&fx, &fe, &specs_before[0].1);
    // The new table as it will be (ids of the old backends stay).
    fx.set_specs(&specs_after);
    let new_table = expected_table(&fx, &fe, &specs_after[0].1);
    fx.set_specs(&specs_before);
    sync(&mut fx, &mut maglev, &specs_before);
    // A flow the new table sends elsewhere.
    let src = (1..5000u16)
        .map(|port| SocketAddr::new("10.0.0.7".parse().unwrap(), 30_000 + port))
        .find(|src| {
            let slot = (flow_hash(*src, vip, 6) % M) as usize;
            old_table[slot] != new_table[slot]
        })
        .expect("a flow the change moves");
    let first = new_flow(&mut fx, src, vip);
    assert_eq!(first, old_table[(flow_hash(src, vip, 6) % M) as usize]);

    fx.set_specs(&specs_after);
    assert_eq!(sync(&mut fx, &mut maglev, &specs_after), 1);
    assert_eq!(expected_table(&fx, &fe, &specs_after[0].1), new_table);
    let follow = Frame::tcp(&src.to_string(), &vip.to_string(), TCP_ACK);
    let (verdict, out) = fx.run(&follow.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        verify_checksums(&out).1,
        first,
        "conntrack keeps the backend"
    );
    // The same client on a new port: the new table.
    let fresh = SocketAddr::new(src.ip(), 1234);
    let want = new_table[(flow_hash(fresh, vip, 6) % M) as usize];
    assert_eq!(new_flow(&mut fx, fresh, vip), want);
}

/// Three disjoint backend sets take turns as the frontend's table while
/// packets run. A packet may see the table before or after a swap; a
/// stale row (written before its reference moved, or reused too early)
/// shows up as the set of two swaps ago, a missing table as the slot.
#[test]
fn tables_swapped_under_traffic_are_never_seen_half_written() {
    let cfg = config(LbAlgorithm::Maglev, 4);
    let Some(mut fx) = fixture("maglev swap", cfg) else {
        return;
    };
    let fe = frontend(VIP4, 80, Protocol::Tcp);
    let vip = SocketAddr::new(fe.addr, fe.port);
    let slot_backend: SocketAddr = "198.18.9.2:8080".parse().unwrap();
    let fe_spec = spec(FrontendKind::ClusterIp, &[slot_backend]);
    fx.set_specs(&[(fe, fe_spec.clone())]);
    let rev_nat = rev_nat_id(&fx, &fe);
    // Backends of the frontend outside its slots, in three sets.
    let sets: Vec<Vec<(u32, SocketAddr)>> = (0..3u32)
        .map(|set| {
            (0..3u32)
                .map(|i| {
                    let addr = format!("198.18.{}.{}:8080", 20 + set, 2 + i);
                    (1_000_000 + set * 10 + i, addr.parse().unwrap())
                })
                .collect()
        })
        .collect();
    let mut backends = BTreeMap::new();
    for (id, addr) in sets.iter().flatten() {
        let entry = BackendEntry {
            key: BackendKey {
                rev_nat_id: rev_nat,
                addr: addr.ip(),
                port: addr.port(),
                proto: Protocol::Tcp,
            },
            flags: 0,
        };
        fx.maps
            .apply_op(&Op::PutBackend {
                id: *id,
                backend: entry,
            })
            .unwrap();
        backends.insert(*id, entry);
    }
    let generation = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = spawn_swapper(Swapper {
        generation: Arc::clone(&generation),
        stop: Arc::clone(&stop),
        sets: sets.clone(),
        pin_path: fx.pin_path.clone(),
        frontend: (fe, fe_spec.clone(), rev_nat),
        backends,
        config: cfg,
    });
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut checked, mut packets) = (0u64, 0u32);
    while Instant::now() < deadline && packets < 60_000 {
        // (address, port) pairs repeat after 60000 packets: new flows.
        let src = SocketAddr::new(
            format!("10.0.0.{}", packets % 200 + 1).parse().unwrap(),
            u16::try_from(1024 + packets).unwrap(),
        );
        packets += 1;
        let before = generation.load(Ordering::SeqCst);
        let backend = new_flow(&mut fx, src, vip);
        let after = generation.load(Ordering::SeqCst);
        if before == 0 {
            continue; // no table yet: the slot
        }
        assert_ne!(backend, slot_backend, "no table seen (generation {before})");
        if after + 1 - before >= 2 {
            // No table yet, or every set was current at some point.
            continue;
        }
        let allowed: Vec<SocketAddr> = (before..=after + 1)
            .flat_map(|g| sets[(g % 3) as usize].iter().map(|(_, a)| *a))
            .collect();
        assert!(
            allowed.contains(&backend),
            "{backend} is from a stale table (generations {before}..={after})"
        );
        checked += 1;
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().expect("swapper");
    let swaps = generation.load(Ordering::SeqCst);
    eprintln!("{packets} packets, {checked} checked, {swaps} swaps");
    assert!(swaps >= 20, "too few swaps under traffic: {swaps}");
    assert!(checked >= 1000, "too few packets checked: {checked}");
}

/// What the swapping thread needs.
struct Swapper {
    generation: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    sets: Vec<Vec<(u32, SocketAddr)>>,
    pin_path: std::path::PathBuf,
    frontend: (Frontend, FrontendSpec, u32),
    backends: BTreeMap<u32, BackendEntry>,
    config: MaglevConfig,
}

/// Makes set `g % 3` the frontend's table for g = 1, 2, ... through the
/// agent's `MaglevSync` (its own handle on the pinned maps), publishing g
/// once the swap is done.
fn spawn_swapper(s: Swapper) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut maps = Maps::open_pinned(&s.pin_path).expect("open pins");
        let mut maglev = MaglevSync::new(s.config);
        let (fe, spec, rev_nat) = s.frontend;
        let specs = BTreeMap::from([(fe, spec)]);
        let mut next = 1u32;
        while !s.stop.load(Ordering::Relaxed) && next < 100_000 {
            let set = &s.sets[(next % 3) as usize];
            let state = DatapathState {
                frontends: BTreeMap::from([(
                    fe,
                    FrontendState {
                        rev_nat_id: rev_nat,
                        slots: set.iter().map(|(id, _)| *id).collect(),
                        flags: svc_flags::CLUSTER_IP,
                        affinity_timeout_s: 0,
                        affinity_group: 0,
                    },
                )]),
                backends: s.backends.clone(),
                ..DatapathState::default()
            };
            let outcome = maglev.sync(&state, &specs, maps.maglev());
            assert_eq!((outcome.tables_written, outcome.failures), (1, 0));
            s.generation.store(next, Ordering::SeqCst);
            next += 1;
        }
    })
}
