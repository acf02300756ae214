//! The real TC program under `BPF_PROG_TEST_RUN`: a private copy of the
//! object with its own pinned maps (removed on drop), written through the
//! agent's own diff/apply path, and the frontends and backends the
//! datapath tests use.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{HashMap as AyaHashMap, Map, MapData};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use lb_common::{Addr4, Addr6, CtEntry, CtKey, LbConfig, SNAT_PORT_COUNT, SNAT_PORT_MIN};
use lb_userspace::{
    datapath::{
        loader,
        maps::{CtRecord, Maps},
        xdp,
    },
    model::{Backend, Frontend, FrontendKind, FrontendSpec, Protocol, ServiceRef},
    plan,
};

use super::frames::{Frame, assert_port_unreachable, assert_tcp_reset, verify_checksums};
use super::pins::require_privileged;

pub(crate) const TC_ACT_OK: u32 = 0;
pub(crate) const TC_ACT_SHOT: u32 = 2;
pub(crate) const TC_ACT_REDIRECT: u32 = 7;

pub(crate) const VIP4: &str = "198.19.0.10";
pub(crate) const VIP6: &str = "fd00:96::10";
pub(crate) const BACKENDS4: [&str; 3] = ["198.18.2.2:8080", "198.18.3.2:8080", "198.18.4.2:8080"];
pub(crate) const BACKENDS6: [&str; 3] =
    ["[fd00:2::2]:8080", "[fd00:3::2]:8080", "[fd00:4::2]:8080"];
/// The node addresses of `node_config`.
pub(crate) const NODE4: &str = "198.18.0.1";
pub(crate) const NODE6: &str = "fd00::1";

/// A frontend spec of `kind` with remote (not node-local) `backends`.
pub(crate) fn spec(kind: FrontendKind, backends: &[SocketAddr]) -> FrontendSpec {
    let mut backends: Vec<Backend> = backends
        .iter()
        .map(|b| Backend {
            addr: b.ip(),
            port: b.port(),
            node_local: false,
        })
        .collect();
    backends.sort();
    FrontendSpec {
        service: ServiceRef {
            namespace: "default".into(),
            name: "web".into(),
            port_name: "".into(),
        },
        kind,
        backends,
        terminating: Vec::new(),
        not_ready: Vec::new(),
        not_serving: Vec::new(),
        external_local: false,
        internal_local: false,
        no_local_endpoints: false,
        affinity_timeout_s: 0,
        source_ranges: Vec::new(),
    }
}

/// A private copy of the object with its own pinned maps.
pub(crate) struct Fixture {
    pub(crate) ebpf: Ebpf,
    pub(crate) maps: Maps,
    pub(crate) pin_path: PathBuf,
}

impl Fixture {
    pub(crate) fn new(what: &str) -> Option<Self> {
        Self::with_capacities(what, &loader::Capacities::default())
    }

    /// [`Fixture::new`] with the maps sized (and Maglev set) by `capacities`.
    pub(crate) fn with_capacities(what: &str, capacities: &loader::Capacities) -> Option<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        if !require_privileged(what) {
            return None;
        }
        // BPF_PROG_TEST_RUN runs in the caller's network namespace, and the
        // program's forwarding step asks that namespace's FIB. A fresh one
        // (this test thread only) has no routes and forwarding off, so the
        // translated packet is handed back, whatever the host's settings.
        // SAFETY: unshare affects only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let pin_path = PathBuf::from(format!(
            "/sys/fs/bpf/lb-dp-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let loaded = loader::load_with(&pin_path, capacities).and_then(|mut ebpf| {
            xdp::load(&mut ebpf)?;
            Ok(ebpf)
        });
        let mut ebpf = match loaded {
            Ok(ebpf) => ebpf,
            Err(error) => {
                let _ = loader::cleanup(&pin_path, &[]);
                panic!("loading the eBPF object failed: {error:?}");
            }
        };
        let maps = Maps::from_ebpf(&mut ebpf).expect("maps");
        Some(Self {
            ebpf,
            maps,
            pin_path,
        })
    }

    pub(crate) fn program(&mut self) -> &mut SchedClassifier {
        loader::program(&mut self.ebpf).expect("program")
    }

    /// Writes `ClusterIP` `services` through the real diff/apply path.
    pub(crate) fn set_services(&mut self, services: &[(Frontend, &[SocketAddr])]) {
        let specs: Vec<(Frontend, FrontendSpec)> = services
            .iter()
            .map(|(frontend, backends)| (*frontend, spec(FrontendKind::ClusterIp, backends)))
            .collect();
        self.set_specs(&specs);
    }

    /// Writes `specs` through the real diff/apply path.
    pub(crate) fn set_specs(&mut self, specs: &[(Frontend, FrontendSpec)]) {
        let desired: BTreeMap<Frontend, FrontendSpec> = specs.iter().cloned().collect();
        let state = self.maps.read_state().expect("read state");
        let plan = plan::diff(&state, &desired);
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        for op in &plan.ops {
            self.maps.apply_op(op).expect("apply");
        }
    }

    /// Runs the TC program once on `frame`; returns the verdict and the
    /// frame as the program left it.
    pub(crate) fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = self.program().test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs the TC program NAME (`prog_names::*`) once on `frame`.
    pub(crate) fn run_named(&mut self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_with_ctx(name, frame, None)
    }

    /// Runs the TC program NAME once on `frame` as if it had entered
    /// through the device with index `ingress_ifindex` (`skb->skb_iif`; the
    /// test run gives `pkt_type` from the frame's destination MAC against
    /// the loopback device's all-zero one).
    pub(crate) fn run_received(
        &mut self,
        name: &str,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> (u32, Vec<u8>) {
        // `struct __sk_buff` (192 bytes); `ingress_ifindex` is its tenth
        // 32-bit field, one the test run accepts as input.
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        self.run_with_ctx(name, frame, Some(&ctx))
    }

    /// Runs `lb_tc` once on `frame` as a GSO packet of segments of
    /// `gso_size` bytes (as BIG TCP's are).
    pub(crate) fn run_gso(&mut self, frame: &[u8], gso_size: u32) -> (u32, Vec<u8>) {
        // `gso_segs` and `gso_size` are the 32-bit fields at offsets 164
        // and 176 of `struct __sk_buff`, ones the test run accepts as input.
        let mut ctx = [0u8; 192];
        ctx[164..168].copy_from_slice(&1_u32.to_ne_bytes());
        ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        self.run_with_ctx(lb_common::prog_names::TC_LB, frame, Some(&ctx))
    }

    /// Runs `lb_tc` once on `frame` as a dry run (`skb->mark` is
    /// `lb_common::probe::MARK`, as `lb explain` sends it): every step but
    /// the map writes.
    pub(crate) fn run_dry(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        // `mark` is the third 32-bit field of `struct __sk_buff`.
        let mut ctx = [0u8; 192];
        ctx[8..12].copy_from_slice(&lb_common::probe::MARK.to_ne_bytes());
        self.run_with_ctx(lb_common::prog_names::TC_LB, frame, Some(&ctx))
    }

    fn run_with_ctx(&mut self, name: &str, frame: &[u8], ctx: Option<&[u8]>) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx,
            ..TestRunOptions::default()
        };
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no program {name}"))
            .try_into()
            .expect("a TC program");
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    pub(crate) fn reason(&self, name: &str) -> u64 {
        self.maps
            .reason_counts()
            .expect("reasons")
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, count)| count)
            .expect("known reason")
    }

    /// Sets the node's SNAT seed (which `Maps::write_config` otherwise
    /// keeps or draws at random), so that a test knows a flow's source
    /// port candidates.
    pub(crate) fn set_snat_seed(&mut self, seed: u32) {
        let pin = self.pin_path.join(lb_common::map_names::CONFIG);
        let data = MapData::from_pin(&pin).expect("open the pinned config map");
        let mut config: aya::maps::Array<MapData, LbConfig> =
            aya::maps::Array::try_from(Map::Array(data)).expect("an array of LbConfig");
        let mut value = config.get(&0, 0).expect("the config");
        value.snat_seed = seed;
        config.set(0, &value, 0).expect("config write");
    }

    pub(crate) fn conntrack(&self) -> Vec<CtRecord> {
        self.maps.conntrack().expect("conntrack")
    }

    /// Rewrites every conntrack entry of every conntrack map of this
    /// fixture (those the loaded object has) whose key `pick` accepts:
    /// `edit` gets the entry and returns it changed, or `None` to delete
    /// it. Returns how many entries were picked. This is how a test moves
    /// time (`last_seen_ns`) or evicts an entry.
    pub(crate) fn edit_conntrack(
        &self,
        pick: &dyn Fn(&CtView) -> bool,
        edit: &dyn Fn(CtEntry) -> Option<CtEntry>,
    ) -> usize {
        use lb_common::map_names as n;
        let mut picked = 0;
        for name in [n::CT4, n::CT_NEW4] {
            picked += edit_map::<Addr4>(&self.pin_path.join(name), pick, edit);
        }
        for name in [n::CT6, n::CT_NEW6] {
            picked += edit_map::<Addr6>(&self.pin_path.join(name), pick, edit);
        }
        picked
    }

    /// Moves the clock of every entry `pick` accepts `seconds` back.
    pub(crate) fn age_conntrack(&self, pick: &dyn Fn(&CtView) -> bool, seconds: u64) -> usize {
        self.edit_conntrack(pick, &|mut entry| {
            entry.last_seen_ns = entry.last_seen_ns.saturating_sub(seconds * 1_000_000_000);
            entry.created_ns = entry.created_ns.saturating_sub(seconds * 1_000_000_000);
            Some(entry)
        })
    }
}

/// A conntrack key as `Fixture::edit_conntrack` shows it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CtView {
    /// `ct_dir::SERVICE` or `ct_dir::REPLY`.
    pub(crate) dir: u8,
    pub(crate) source: SocketAddr,
    pub(crate) destination: SocketAddr,
}

fn edit_map<A>(
    pin: &std::path::Path,
    pick: &dyn Fn(&CtView) -> bool,
    edit: &dyn Fn(CtEntry) -> Option<CtEntry>,
) -> usize
where
    A: lb_common::MapAddr + Into<std::net::IpAddr>,
{
    if !pin.exists() {
        return 0;
    }
    let data = MapData::from_pin(pin).expect("open a pinned conntrack map");
    let mut map: AyaHashMap<MapData, CtKey<A>, CtEntry> =
        AyaHashMap::try_from(Map::LruHashMap(data)).expect("a conntrack map");
    let keys: Vec<CtKey<A>> = map.keys().map(|key| key.expect("key")).collect();
    let mut picked = 0;
    for key in keys {
        let view = CtView {
            dir: key.dir,
            source: SocketAddr::new(key.saddr.into(), u16::from_be(key.sport_be)),
            destination: SocketAddr::new(key.daddr.into(), u16::from_be(key.dport_be)),
        };
        if !pick(&view) {
            continue;
        }
        let Ok(entry) = map.get(&key, 0) else {
            continue;
        };
        picked += 1;
        match edit(entry) {
            Some(changed) => map.insert(&key, &changed, 0).expect("rewrite an entry"),
            None => map.remove(&key).expect("delete an entry"),
        }
    }
    picked
}

/// Runs `frame`; asserts it was translated (only its destination, to a
/// backend) and returns its backend.
pub(crate) fn translated(fx: &mut Fixture, frame: &Frame, what: &str) -> SocketAddr {
    let (verdict, out) = fx.run(&frame.bytes());
    assert_eq!(verdict, TC_ACT_OK, "{what}: not translated");
    let (_, backend) = verify_checksums(&out);
    assert_eq!(out, frame.with_dst(backend).bytes(), "{what}: DNAT bytes");
    backend
}

/// Runs `frame`; asserts it was refused (a reset for TCP, a port
/// unreachable for UDP).
pub(crate) fn refused(fx: &mut Fixture, frame: &Frame, what: &str) {
    let input = frame.bytes();
    let (verdict, out) = fx.run(&input);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: not refused");
    match frame.proto {
        Protocol::Tcp => assert_tcp_reset(&out, &input),
        Protocol::Udp | Protocol::Sctp => assert_port_unreachable(&out, &input),
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.pin_path, &[]);
    }
}

pub(crate) fn frontend(addr: &str, port: u16, proto: Protocol) -> Frontend {
    Frontend {
        addr: addr.parse().unwrap(),
        port,
        proto,
    }
}

pub(crate) fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

/// The node's addresses and the hairpin (loopback) source addresses.
pub(crate) fn node_config() -> LbConfig {
    LbConfig {
        node_addr4: NODE4.parse::<std::net::Ipv4Addr>().unwrap().octets(),
        loopback4: [169, 254, 42, 1],
        node_addr6: NODE6.parse::<std::net::Ipv6Addr>().unwrap().octets(),
        loopback6: "100::6c62:1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        flags: 0,
        // Kept or chosen by `Maps::write_config`.
        snat_seed: 0,
    }
}

/// The datapath's flow hash (`lb-ebpf/src/hash.rs`), written out again:
/// murmur3 steps over the address words, the ports, the protocol.
pub(crate) fn flow_hash(src: SocketAddr, dst: SocketAddr, proto: u8) -> u32 {
    fn mix(h: u32, word: u32) -> u32 {
        let k = word
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    fn finish(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
    let octets = |addr: SocketAddr| match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let (s, d) = (octets(src), octets(dst));
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let mut h = 0x5f1b_6c3d;
    for i in (0..s.len()).step_by(4) {
        h = mix(h, word(&s[i..]));
        h = mix(h, word(&d[i..]));
    }
    let ports = (u32::from(src.port().to_be()) << 16) | u32::from(dst.port().to_be());
    finish(mix(mix(h, ports), u32::from(proto)))
}

/// Source NAT candidate `attempt` (from 0) of the TCP flow `client` ->
/// `frontend` under `seed`, as `lb-ebpf/src/snat.rs` probes them.
pub(crate) fn snat_candidate(
    seed: u32,
    client: SocketAddr,
    frontend: SocketAddr,
    attempt: u32,
) -> u16 {
    let start = flow_hash(client, frontend, 6).wrapping_add(seed);
    let offset = start.wrapping_add(attempt.wrapping_mul(7919)) % u32::from(SNAT_PORT_COUNT);
    SNAT_PORT_MIN + u16::try_from(offset).expect("below SNAT_PORT_COUNT")
}
