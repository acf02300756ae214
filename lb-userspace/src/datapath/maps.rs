//! Typed access to the datapath maps: read them back as a `DatapathState`,
//! apply a plan, list conntrack entries and counters.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{
    Ct4Key, Ct6Key, CtEntry, Lb4Backend, Lb4Key, Lb4RevNat, Lb6Backend, Lb6Key, Lb6RevNat,
    LbConfig, LbService, LbStats, SourceRange4, SourceRange6, ct_dir, map_names, reason, scope,
    svc_flags,
};

use super::batch::batch_of;
use crate::{
    model::{Frontend, Protocol},
    plan::{BackendEntry, BackendKey, DatapathState, FrontendState, Op, SourceRange},
};

mod next_id;

/// A map could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The object has no map of that name (object and agent out of step).
    #[error("map {0} missing from the eBPF object")]
    Missing(&'static str),
    /// A pinned map could not be opened.
    #[error("cannot open pinned map {path}")]
    OpenPin {
        /// Pin path.
        path: String,
        /// Underlying error.
        #[source]
        source: MapError,
    },
    /// A map has another type or layout than this agent expects.
    #[error("map {name} has an unexpected type or layout")]
    Layout {
        /// Map name.
        name: &'static str,
        /// Underlying error.
        #[source]
        source: MapError,
    },
    /// A write found its map full: what did not fit, named in the error.
    #[error("{what}: map {map} is full")]
    Full {
        /// The full map.
        map: &'static str,
        /// What was being written.
        what: String,
    },
    /// A write was left out because what it refers to could not be written
    /// (its backend, its rev-NAT entry or an earlier slot of its frontend):
    /// writing it would leave a frontend pointing at nothing.
    #[error("{what}: not written, {because}")]
    Unwritable {
        /// What was left out.
        what: String,
        /// Which earlier write failed.
        because: String,
    },
    /// A read or write failed.
    #[error("{what}")]
    Access {
        /// What was being done.
        what: String,
        /// Underlying error.
        #[source]
        source: MapError,
    },
}

/// Every datapath map, typed.
pub struct Maps {
    services4: HashMap<MapData, Lb4Key, LbService>,
    services6: HashMap<MapData, Lb6Key, LbService>,
    backends4: HashMap<MapData, u32, Lb4Backend>,
    backends6: HashMap<MapData, u32, Lb6Backend>,
    rev_nat4: HashMap<MapData, u32, Lb4RevNat>,
    rev_nat6: HashMap<MapData, u32, Lb6RevNat>,
    ct4: HashMap<MapData, Ct4Key, CtEntry>,
    ct6: HashMap<MapData, Ct6Key, CtEntry>,
    svc_stats: PerCpuArray<MapData, LbStats>,
    reasons: PerCpuArray<MapData, u64>,
    ranges4: LpmTrie<MapData, SourceRange4, u8>,
    ranges6: LpmTrie<MapData, SourceRange6, u8>,
    config: Array<MapData, LbConfig>,
}

/// One conntrack entry, decoded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CtRecord {
    /// "service" (client -> VIP) or "reply" (backend -> client).
    pub direction: &'static str,
    /// Protocol name.
    pub protocol: &'static str,
    /// Source address and port of packets in this direction.
    pub source: std::net::SocketAddr,
    /// Destination address and port of packets in this direction.
    pub destination: std::net::SocketAddr,
    /// Backend chosen for the flow.
    pub backend_id: u32,
    /// Frontend of the flow.
    pub rev_nat_id: u32,
    /// Seconds since the last refresh (at most one second stale).
    pub idle_seconds: u64,
    /// TCP FIN or RST seen.
    pub closing: bool,
}

fn typed<T>(
    name: &'static str,
    map: Option<Map>,
    convert: impl FnOnce(Map) -> Result<T, MapError>,
) -> Result<T, MapsError> {
    let map = map.ok_or(MapsError::Missing(name))?;
    convert(map).map_err(|source| MapsError::Layout { name, source })
}

fn access(what: impl Into<String>) -> impl FnOnce(MapError) -> MapsError {
    let what = what.into();
    move |source| MapsError::Access { what, source }
}

/// [`access`] for a write into `map`: a full map (`E2BIG` from a hash map,
/// `ENOSPC` from an LPM trie) is [`MapsError::Full`].
fn write_to(map: &'static str, what: impl Into<String>) -> impl FnOnce(MapError) -> MapsError {
    let what = what.into();
    move |source| match &source {
        MapError::SyscallError(error)
            if matches!(
                error.io_error.raw_os_error(),
                Some(libc::E2BIG | libc::ENOSPC)
            ) =>
        {
            MapsError::Full { map, what }
        }
        _ => MapsError::Access { what, source },
    }
}

impl Maps {
    /// Takes the maps out of a loaded object.
    ///
    /// # Errors
    /// A map is missing or has another layout.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::build(|name| Ok(ebpf.take_map(name)))
    }

    /// Opens the maps pinned under `dir`.
    ///
    /// # Errors
    /// A pin is missing or has another layout.
    pub fn open_pinned(dir: &Path) -> Result<Self, MapsError> {
        Self::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| MapsError::OpenPin {
                path: path.display().to_string(),
                source,
            })?;
            let map =
                Map::from_map_data(data).map_err(|source| MapsError::Layout { name, source })?;
            Ok(Some(map))
        })
    }

    fn build(
        mut take: impl FnMut(&'static str) -> Result<Option<Map>, MapsError>,
    ) -> Result<Self, MapsError> {
        use map_names as n;
        Ok(Self {
            services4: typed(n::SERVICES4, take(n::SERVICES4)?, HashMap::try_from)?,
            services6: typed(n::SERVICES6, take(n::SERVICES6)?, HashMap::try_from)?,
            backends4: typed(n::BACKENDS4, take(n::BACKENDS4)?, HashMap::try_from)?,
            backends6: typed(n::BACKENDS6, take(n::BACKENDS6)?, HashMap::try_from)?,
            rev_nat4: typed(n::REVNAT4, take(n::REVNAT4)?, HashMap::try_from)?,
            rev_nat6: typed(n::REVNAT6, take(n::REVNAT6)?, HashMap::try_from)?,
            ct4: typed(n::CT4, take(n::CT4)?, HashMap::try_from)?,
            ct6: typed(n::CT6, take(n::CT6)?, HashMap::try_from)?,
            svc_stats: typed(n::SVC_STATS, take(n::SVC_STATS)?, PerCpuArray::try_from)?,
            reasons: typed(n::REASONS, take(n::REASONS)?, PerCpuArray::try_from)?,
            ranges4: typed(n::SRC_RANGES4, take(n::SRC_RANGES4)?, LpmTrie::try_from)?,
            ranges6: typed(n::SRC_RANGES6, take(n::SRC_RANGES6)?, LpmTrie::try_from)?,
            config: typed(n::CONFIG, take(n::CONFIG)?, Array::try_from)?,
        })
    }

    /// (map name, entries it holds at most) of the maps sized by flags, as
    /// the kernel has them (a pinned map keeps its size).
    #[must_use]
    pub fn capacities(&self) -> Vec<(&'static str, u32)> {
        use aya::maps::IterableMap as _;
        use map_names as n;
        [
            (n::SERVICES4, self.services4.map()),
            (n::SERVICES6, self.services6.map()),
            (n::BACKENDS4, self.backends4.map()),
            (n::BACKENDS6, self.backends6.map()),
            (n::REVNAT4, self.rev_nat4.map()),
            (n::REVNAT6, self.rev_nat6.map()),
            (n::CT4, self.ct4.map()),
            (n::CT6, self.ct6.map()),
        ]
        .into_iter()
        .filter_map(|(name, map)| Some((name, map.info().ok()?.max_entries())))
        .collect()
    }

    /// Reads services, backends and rev-NAT entries back.
    ///
    /// # Errors
    /// A map could not be iterated.
    pub fn read_state(&self) -> Result<DatapathState, MapsError> {
        let mut state = DatapathState::default();
        let mut slots: BTreeMap<Frontend, BTreeMap<u16, u32>> = BTreeMap::new();
        let mut heads: BTreeMap<Frontend, LbService> = BTreeMap::new();
        let mut add = |frontend: Frontend, slot: u16, value: LbService| {
            if slot == 0 {
                heads.insert(frontend, value);
            } else {
                slots
                    .entry(frontend)
                    .or_default()
                    .insert(slot, value.backend_id);
            }
        };
        for item in &self.services4 {
            let (key, value) = item.map_err(access("iterate IPv4 services"))?;
            if value.flags & svc_flags::ADDRESS_MARKER != 0 {
                state.markers.insert(IpAddr::V4(Ipv4Addr::from(key.addr)));
            } else if let Some(proto) = protocol(key.proto) {
                let frontend = Frontend {
                    addr: IpAddr::V4(Ipv4Addr::from(key.addr)),
                    port: u16::from_be(key.dport_be),
                    proto,
                };
                add(frontend, key.backend_slot, value);
            }
        }
        for item in &self.services6 {
            let (key, value) = item.map_err(access("iterate IPv6 services"))?;
            if value.flags & svc_flags::ADDRESS_MARKER != 0 {
                state.markers.insert(IpAddr::V6(Ipv6Addr::from(key.addr)));
            } else if let Some(proto) = protocol(key.proto) {
                let frontend = Frontend {
                    addr: IpAddr::V6(Ipv6Addr::from(key.addr)),
                    port: u16::from_be(key.dport_be),
                    proto,
                };
                add(frontend, key.backend_slot, value);
            }
        }
        for (frontend, head) in heads {
            let known = slots.remove(&frontend).unwrap_or_default();
            // Slots beyond the count are leftovers of an interrupted apply:
            // leaving them out of the state makes the next diff delete them.
            let slots = (1..=head.count)
                .map(|slot| known.get(&slot).copied().unwrap_or(0))
                .collect();
            state.frontends.insert(
                frontend,
                FrontendState {
                    rev_nat_id: head.rev_nat_id,
                    slots,
                    flags: head.flags,
                    affinity_timeout_s: head.affinity_timeout_s,
                },
            );
        }
        self.read_ranges(&mut state)?;
        self.read_backends(&mut state)?;
        for item in &self.rev_nat4 {
            let (id, value) = item.map_err(access("iterate IPv4 rev-NAT"))?;
            let addr = IpAddr::V4(Ipv4Addr::from(value.addr));
            state
                .rev_nats
                .insert(id, (addr, u16::from_be(value.port_be)));
        }
        for item in &self.rev_nat6 {
            let (id, value) = item.map_err(access("iterate IPv6 rev-NAT"))?;
            let addr = IpAddr::V6(Ipv6Addr::from(value.addr));
            state
                .rev_nats
                .insert(id, (addr, u16::from_be(value.port_be)));
        }
        Ok(state)
    }

    fn read_ranges(&self, state: &mut DatapathState) -> Result<(), MapsError> {
        for item in self.ranges4.keys() {
            let key = item.map_err(access("iterate IPv4 source ranges"))?;
            let data = key.data();
            let prefix = u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(0);
            state.source_ranges.insert((
                u32::from_be(data.rev_nat_id_be),
                IpAddr::V4(Ipv4Addr::from(data.addr)),
                prefix,
            ));
        }
        for item in self.ranges6.keys() {
            let key = item.map_err(access("iterate IPv6 source ranges"))?;
            let data = key.data();
            let prefix = u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(0);
            state.source_ranges.insert((
                u32::from_be(data.rev_nat_id_be),
                IpAddr::V6(Ipv6Addr::from(data.addr)),
                prefix,
            ));
        }
        Ok(())
    }

    fn read_backends(&self, state: &mut DatapathState) -> Result<(), MapsError> {
        for item in &self.backends4 {
            let (id, value) = item.map_err(access("iterate IPv4 backends"))?;
            if let Some(proto) = protocol(value.proto) {
                let addr = IpAddr::V4(Ipv4Addr::from(value.addr));
                let port = u16::from_be(value.port_be);
                let rev_nat_id = value.rev_nat_id;
                let key = BackendKey {
                    rev_nat_id,
                    addr,
                    port,
                    proto,
                };
                let flags = value.flags;
                state.backends.insert(id, BackendEntry { key, flags });
            }
        }
        for item in &self.backends6 {
            let (id, value) = item.map_err(access("iterate IPv6 backends"))?;
            if let Some(proto) = protocol(value.proto) {
                let addr = IpAddr::V6(Ipv6Addr::from(value.addr));
                let port = u16::from_be(value.port_be);
                let rev_nat_id = value.rev_nat_id;
                let key = BackendKey {
                    rev_nat_id,
                    addr,
                    port,
                    proto,
                };
                let flags = value.flags;
                state.backends.insert(id, BackendEntry { key, flags });
            }
        }
        state.next_backend_id = state
            .backends
            .last_key_value()
            .map_or(0, |(id, _)| id.saturating_add(1))
            .max(self.recorded_next_backend_id());
        Ok(())
    }

    /// Applies `ops` in order, telling `on_result` how each went.
    ///
    /// Writes to the service and backend maps go to the kernel as
    /// `BPF_MAP_UPDATE_BATCH`es (aya 0.16 has none), which makes a first
    /// sync of 10k Services several times faster. Where a batch fails, the
    /// rest of it is written one by one, so that every failure is reported
    /// with its op. The plan's order is kept where it matters: a run of new
    /// backends, rev-NAT entries and source ranges (independent of each
    /// other) may be written in any order; a run of slot, frontend and
    /// marker writes keeps its order per family (each family has its own
    /// map). Large runs write each map that has writes on its own thread
    /// (the IPv4 and the IPv6 map of a run in parallel).
    ///
    /// A write that refers to one that failed (a slot to its backend, a
    /// frontend to its rev-NAT entry or to its slots) is left out and
    /// reported as [`MapsError::Unwritable`]: when a map is full, the
    /// frontends that do not fit stay out whole, and a frontend already
    /// there keeps its last complete entry.
    pub fn apply_ops(&mut self, ops: &[Op], on_result: &mut dyn FnMut(&Op, Result<(), MapsError>)) {
        let mut outcomes = Outcomes {
            failed: Failed::default(),
            on_result,
        };
        let on_result = &mut outcomes;
        let mut start = 0;
        while start < ops.len() {
            let class = RunClass::of(&ops[start]);
            let end = start
                + ops[start..]
                    .iter()
                    .take_while(|op| RunClass::of(op) == class)
                    .count();
            let run = &ops[start..end];
            if class == RunClass::Single {
                for op in run {
                    self.apply_one(op, on_result);
                }
            } else {
                self.apply_run(run, on_result);
            }
            start = end;
        }
        self.record_next_backend_id(ops);
    }

    /// Writes a run of reorderable ops: batches per map (in parallel when
    /// large), then what cannot be batched and what a batch left, one by one.
    fn apply_run(&mut self, run: &[Op], on_result: &mut Outcomes<'_>) {
        const PARALLEL_FROM: usize = 4096;
        let mut groups: [Vec<&Op>; 4] = Default::default();
        let mut singles = Vec::new();
        for op in run {
            if let Some(error) = on_result.failed.blocks(op) {
                on_result.report(op, Err(error));
                continue;
            }
            match BatchTarget::of(op) {
                Some(target) => groups[target as usize].push(op),
                None => singles.push(op),
            }
        }
        let mut written = [0usize; 4];
        let this = &*self;
        if run.len() >= PARALLEL_FROM {
            // One thread per map that has writes (a run holds one kind of
            // map, so in practice the IPv4 and the IPv6 one).
            std::thread::scope(|scope| {
                let handles: Vec<_> = BatchTarget::ALL
                    .iter()
                    .zip(&groups)
                    .map(|(target, group)| {
                        (!group.is_empty())
                            .then(|| scope.spawn(move || this.update_batch(*target, group)))
                    })
                    .collect();
                for (slot, handle) in written.iter_mut().zip(handles) {
                    *slot = handle.map_or(0, |handle| handle.join().unwrap_or(0));
                }
            });
        } else {
            for ((slot, target), group) in written.iter_mut().zip(BatchTarget::ALL).zip(&groups) {
                *slot = this.update_batch(target, group);
            }
        }
        for (group, written) in groups.iter().zip(written) {
            for op in &group[..written] {
                on_result.report(op, Ok(()));
            }
            for op in &group[written..] {
                self.apply_one(op, on_result);
            }
        }
        for op in singles {
            self.apply_one(op, on_result);
        }
    }

    /// Writes `op` unless it refers to a write that failed.
    fn apply_one(&mut self, op: &Op, on_result: &mut Outcomes<'_>) {
        let result = match on_result.failed.blocks(op) {
            Some(error) => Err(error),
            None => self.apply_op(op),
        };
        on_result.report(op, result);
    }

    /// Writes a run of ops to `target` as one batch; returns how many the
    /// kernel wrote (all, or those before the one that failed).
    fn update_batch(&self, target: BatchTarget, run: &[&Op]) -> usize {
        use aya::maps::IterableMap as _;
        if run.len() < 2 {
            return 0;
        }
        match target {
            BatchTarget::Services4 => batch_of(self.services4.map(), run, |op| {
                let (frontend, slot, value) = service_write(op)?;
                let IpAddr::V4(addr) = frontend.addr else {
                    return None;
                };
                Some((key4(addr, &frontend, slot), value))
            }),
            BatchTarget::Services6 => batch_of(self.services6.map(), run, |op| {
                let (frontend, slot, value) = service_write(op)?;
                let IpAddr::V6(addr) = frontend.addr else {
                    return None;
                };
                Some((key6(addr, &frontend, slot), value))
            }),
            BatchTarget::Backends4 => batch_of(self.backends4.map(), run, |op| match *op {
                Op::PutBackend { id, backend } => match backend.key.addr {
                    IpAddr::V4(addr) => Some((id, backend4(addr, backend))),
                    IpAddr::V6(_) => None,
                },
                _ => None,
            }),
            BatchTarget::Backends6 => batch_of(self.backends6.map(), run, |op| match *op {
                Op::PutBackend { id, backend } => match backend.key.addr {
                    IpAddr::V6(addr) => Some((id, backend6(addr, backend))),
                    IpAddr::V4(_) => None,
                },
                _ => None,
            }),
        }
    }

    /// Writes one plan step.
    ///
    /// # Errors
    /// The map rejected the write (full, or gone).
    pub fn apply_op(&mut self, op: &Op) -> Result<(), MapsError> {
        match *op {
            Op::PutBackend { id, backend } => self.put_backend(id, backend),
            Op::PutRevNat { id, frontend } => self.put_rev_nat(id, frontend),
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
            } => self.put_service(
                &frontend,
                slot,
                LbService {
                    backend_id,
                    ..LbService::default()
                },
            ),
            Op::PutFrontend {
                frontend,
                count,
                rev_nat_id,
                flags,
                affinity_timeout_s,
            } => self.put_service(
                &frontend,
                0,
                LbService {
                    count,
                    flags,
                    rev_nat_id,
                    affinity_timeout_s,
                    ..LbService::default()
                },
            ),
            Op::PutMarker { addr } => self.put_service(
                &marker(addr),
                0,
                LbService {
                    flags: svc_flags::ADDRESS_MARKER,
                    ..LbService::default()
                },
            ),
            Op::DeleteMarker { addr } => self.delete_service(&marker(addr), 0),
            Op::PutSourceRange(range) => self.source_range(range, true),
            Op::DeleteSourceRange(range) => self.source_range(range, false),
            Op::DeleteSlot { frontend, slot } => self.delete_service(&frontend, slot),
            Op::DeleteFrontend { frontend } => self.delete_service(&frontend, 0),
            Op::DeleteRevNat { id, addr } => ignore_missing(match addr {
                IpAddr::V4(_) => self.rev_nat4.remove(&id),
                IpAddr::V6(_) => self.rev_nat6.remove(&id),
            })
            .map_err(access(format!("delete rev-NAT {id}"))),
            Op::DeleteBackend { id, addr } => ignore_missing(match addr {
                IpAddr::V4(_) => self.backends4.remove(&id),
                IpAddr::V6(_) => self.backends6.remove(&id),
            })
            .map_err(access(format!("delete backend {id}"))),
        }
    }

    fn put_service(
        &mut self,
        frontend: &Frontend,
        slot: u16,
        value: LbService,
    ) -> Result<(), MapsError> {
        let what = format!("write slot {slot} of {frontend}");
        match frontend.addr {
            IpAddr::V4(addr) => self
                .services4
                .insert(&key4(addr, frontend, slot), &value, 0)
                .map_err(write_to(map_names::SERVICES4, what)),
            IpAddr::V6(addr) => self
                .services6
                .insert(&key6(addr, frontend, slot), &value, 0)
                .map_err(write_to(map_names::SERVICES6, what)),
        }
    }

    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), MapsError> {
        let BackendEntry { key, flags } = backend;
        let what = format!(
            "write backend {id} ({})",
            SocketAddr::new(key.addr, key.port)
        );
        let map = if key.addr.is_ipv4() {
            map_names::BACKENDS4
        } else {
            map_names::BACKENDS6
        };
        match key.addr {
            IpAddr::V4(addr) => self.backends4.insert(
                &id,
                &Lb4Backend {
                    addr: addr.octets(),
                    port_be: key.port.to_be(),
                    proto: key.proto.number(),
                    flags,
                    rev_nat_id: key.rev_nat_id,
                },
                0,
            ),
            IpAddr::V6(addr) => self.backends6.insert(
                &id,
                &Lb6Backend {
                    addr: addr.octets(),
                    port_be: key.port.to_be(),
                    proto: key.proto.number(),
                    flags,
                    rev_nat_id: key.rev_nat_id,
                },
                0,
            ),
        }
        .map_err(write_to(map, what))
    }

    fn put_rev_nat(&mut self, id: u32, frontend: Frontend) -> Result<(), MapsError> {
        self.reset_stats(id)?;
        let what = format!("write rev-NAT {id} of {frontend}");
        let map = if frontend.addr.is_ipv4() {
            map_names::REVNAT4
        } else {
            map_names::REVNAT6
        };
        match frontend.addr {
            IpAddr::V4(addr) => self.rev_nat4.insert(
                &id,
                &Lb4RevNat {
                    addr: addr.octets(),
                    port_be: frontend.port.to_be(),
                    _pad: 0,
                },
                0,
            ),
            IpAddr::V6(addr) => self.rev_nat6.insert(
                &id,
                &Lb6RevNat {
                    addr: addr.octets(),
                    port_be: frontend.port.to_be(),
                    _pad: 0,
                },
                0,
            ),
        }
        .map_err(write_to(map, what))
    }

    fn source_range(&mut self, range: SourceRange, insert: bool) -> Result<(), MapsError> {
        let (rev_nat_id, addr, prefix) = range;
        let what = format!(
            "{} source range {addr}/{prefix} of rev-NAT {rev_nat_id}",
            if insert { "write" } else { "delete" }
        );
        let prefix_len = 32 + u32::from(prefix);
        let result = match addr {
            IpAddr::V4(addr) => {
                let key = Key::new(
                    prefix_len,
                    SourceRange4 {
                        rev_nat_id_be: rev_nat_id.to_be(),
                        addr: addr.octets(),
                    },
                );
                if insert {
                    self.ranges4.insert(&key, &1, 0)
                } else {
                    ignore_missing(self.ranges4.remove(&key))
                }
            }
            IpAddr::V6(addr) => {
                let key = Key::new(
                    prefix_len,
                    SourceRange6 {
                        rev_nat_id_be: rev_nat_id.to_be(),
                        addr: addr.octets(),
                    },
                );
                if insert {
                    self.ranges6.insert(&key, &1, 0)
                } else {
                    ignore_missing(self.ranges6.remove(&key))
                }
            }
        };
        let map = if addr.is_ipv4() {
            map_names::SRC_RANGES4
        } else {
            map_names::SRC_RANGES6
        };
        result.map_err(write_to(map, what))
    }

    /// Writes the node configuration (SNAT and hairpin source addresses).
    ///
    /// # Errors
    /// The config map rejected the write.
    pub fn write_config(&mut self, config: &LbConfig) -> Result<(), MapsError> {
        self.config
            .set(0, config, 0)
            .map_err(access("write node configuration"))
    }

    fn delete_service(&mut self, frontend: &Frontend, slot: u16) -> Result<(), MapsError> {
        let result = match frontend.addr {
            IpAddr::V4(addr) => self.services4.remove(&key4(addr, frontend, slot)),
            IpAddr::V6(addr) => self.services6.remove(&key6(addr, frontend, slot)),
        };
        ignore_missing(result).map_err(access(format!("delete slot {slot} of {frontend}")))
    }

    fn reset_stats(&mut self, rev_nat_id: u32) -> Result<(), MapsError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, io)| MapsError::Access {
            what: "count CPUs".into(),
            source: MapError::IoError(io),
        })?;
        let zeros = PerCpuValues::try_from(vec![LbStats::default(); cpus.get() as usize])
            .map_err(|io| access("zero service counters")(MapError::IoError(io)))?;
        self.svc_stats
            .set(rev_nat_id, zeros, 0)
            .map_err(access(format!("zero counters of rev-NAT {rev_nat_id}")))
    }

    /// Packets and bytes per rev-NAT id, summed over CPUs.
    ///
    /// # Errors
    /// The stats map could not be read.
    pub fn service_stats(&self, rev_nat_id: u32) -> Result<LbStats, MapsError> {
        let values = self
            .svc_stats
            .get(&rev_nat_id, 0)
            .map_err(access(format!("read counters of rev-NAT {rev_nat_id}")))?;
        Ok(values.iter().fold(LbStats::default(), |sum, cpu| LbStats {
            packets: sum.packets + cpu.packets,
            bytes: sum.bytes + cpu.bytes,
        }))
    }

    /// Packets per verdict reason, summed over CPUs, as (name, count).
    ///
    /// # Errors
    /// The reasons map could not be read.
    pub fn reason_counts(&self) -> Result<Vec<(&'static str, u64)>, MapsError> {
        let mut out = Vec::with_capacity(reason::NAMES.len());
        for (index, name) in (0u32..).zip(reason::NAMES) {
            let values = self
                .reasons
                .get(&index, 0)
                .map_err(access(format!("read reason counter {name}")))?;
            out.push((name, values.iter().sum()));
        }
        Ok(out)
    }

    /// Every conntrack entry of both families.
    ///
    /// # Errors
    /// A conntrack map could not be iterated.
    pub fn conntrack(&self) -> Result<Vec<CtRecord>, MapsError> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for item in &self.ct4 {
            let (key, entry) = item.map_err(access("iterate IPv4 conntrack"))?;
            out.push(ct_record(
                key.dir,
                key.proto,
                (IpAddr::V4(key.saddr.into()), key.sport_be),
                (IpAddr::V4(key.daddr.into()), key.dport_be),
                &entry,
                now,
            ));
        }
        for item in &self.ct6 {
            let (key, entry) = item.map_err(access("iterate IPv6 conntrack"))?;
            out.push(ct_record(
                key.dir,
                key.proto,
                (IpAddr::V6(key.saddr.into()), key.sport_be),
                (IpAddr::V6(key.daddr.into()), key.dport_be),
                &entry,
                now,
            ));
        }
        out.sort_by_key(|record| (record.source, record.destination));
        Ok(out)
    }

    /// Number of conntrack entries per family (v4, v6).
    ///
    /// # Errors
    /// A conntrack map could not be iterated.
    pub fn conntrack_len(&self) -> Result<(usize, usize), MapsError> {
        Ok((self.ct4.keys().count(), self.ct6.keys().count()))
    }
}

fn ct_record(
    dir: u8,
    proto: u8,
    source: (IpAddr, u16),
    destination: (IpAddr, u16),
    entry: &CtEntry,
    now: u64,
) -> CtRecord {
    CtRecord {
        direction: if dir == ct_dir::SERVICE {
            "service"
        } else {
            "reply"
        },
        protocol: protocol(proto).map_or("?", Protocol::name),
        source: std::net::SocketAddr::new(source.0, u16::from_be(source.1)),
        destination: std::net::SocketAddr::new(destination.0, u16::from_be(destination.1)),
        backend_id: entry.backend_id,
        rev_nat_id: entry.rev_nat_id,
        idle_seconds: now.saturating_sub(entry.last_seen_ns) / 1_000_000_000,
        closing: entry.flags & lb_common::ct_flags::CLOSING != 0,
    }
}

/// The marker "frontend" of a service address: port 0, protocol 0.
fn marker(addr: IpAddr) -> Frontend {
    Frontend {
        addr,
        port: 0,
        proto: Protocol::Tcp,
    }
}

/// The results of one `apply_ops`, and what failed so far.
struct Outcomes<'a> {
    failed: Failed,
    on_result: &'a mut dyn FnMut(&Op, Result<(), MapsError>),
}

impl Outcomes<'_> {
    fn report(&mut self, op: &Op, result: Result<(), MapsError>) {
        if result.is_err() {
            self.failed.note(op);
        }
        (self.on_result)(op, result);
    }
}

/// Writes that failed, as what later writes may refer to.
#[derive(Default)]
struct Failed {
    /// New backends not in the backend map.
    backend_ids: std::collections::HashSet<u32>,
    /// Frontends with a failed slot or rev-NAT write.
    frontends: std::collections::HashSet<Frontend>,
}

impl Failed {
    fn note(&mut self, op: &Op) {
        match *op {
            Op::PutBackend { id, .. } => {
                self.backend_ids.insert(id);
            }
            Op::PutRevNat { frontend, .. } | Op::PutSlot { frontend, .. } => {
                self.frontends.insert(frontend);
            }
            _ => {}
        }
    }

    /// Why `op` must not be written, if it must not.
    fn blocks(&self, op: &Op) -> Option<MapsError> {
        if self.backend_ids.is_empty() && self.frontends.is_empty() {
            return None;
        }
        let (what, because) = match *op {
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
            } => {
                let what = format!("write slot {slot} of {frontend}");
                if self.backend_ids.contains(&backend_id) {
                    (what, format!("backend {backend_id} could not be written"))
                } else if self.frontends.contains(&frontend) {
                    (what, format!("an earlier write of {frontend} failed"))
                } else {
                    return None;
                }
            }
            Op::PutFrontend { frontend, .. } if self.frontends.contains(&frontend) => (
                format!("write slot 0 of {frontend}"),
                "its rev-NAT entry or one of its slots could not be written".to_owned(),
            ),
            _ => return None,
        };
        Some(MapsError::Unwritable { what, because })
    }
}

/// The maps whose writes are batched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BatchTarget {
    Services4 = 0,
    Services6 = 1,
    Backends4 = 2,
    Backends6 = 3,
}

/// How a run of consecutive ops may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunClass {
    /// New backends, rev-NAT entries, source ranges: any order.
    IndependentPuts,
    /// Slots, frontends, markers: in order within each family.
    ServiceWrites,
    /// Removals: one by one, in order.
    Single,
}

impl RunClass {
    fn of(op: &Op) -> Self {
        match op {
            Op::PutBackend { .. } | Op::PutRevNat { .. } | Op::PutSourceRange(_) => {
                Self::IndependentPuts
            }
            Op::PutSlot { .. } | Op::PutFrontend { .. } | Op::PutMarker { .. } => {
                Self::ServiceWrites
            }
            _ => Self::Single,
        }
    }
}

impl BatchTarget {
    const ALL: [Self; 4] = [
        Self::Services4,
        Self::Services6,
        Self::Backends4,
        Self::Backends6,
    ];

    fn of(op: &Op) -> Option<Self> {
        let v4 = |addr: IpAddr| addr.is_ipv4();
        match op {
            Op::PutSlot { frontend, .. } | Op::PutFrontend { frontend, .. } => {
                Some(if v4(frontend.addr) {
                    Self::Services4
                } else {
                    Self::Services6
                })
            }
            Op::PutMarker { addr } => Some(if v4(*addr) {
                Self::Services4
            } else {
                Self::Services6
            }),
            Op::PutBackend { backend, .. } => Some(if v4(backend.key.addr) {
                Self::Backends4
            } else {
                Self::Backends6
            }),
            _ => None,
        }
    }
}

/// The service-map write an op makes: key parts and value.
fn service_write(op: &Op) -> Option<(Frontend, u16, LbService)> {
    match *op {
        Op::PutSlot {
            frontend,
            slot,
            backend_id,
        } => Some((
            frontend,
            slot,
            LbService {
                backend_id,
                ..LbService::default()
            },
        )),
        Op::PutFrontend {
            frontend,
            count,
            rev_nat_id,
            flags,
            affinity_timeout_s,
        } => Some((
            frontend,
            0,
            LbService {
                count,
                flags,
                rev_nat_id,
                affinity_timeout_s,
                ..LbService::default()
            },
        )),
        Op::PutMarker { addr } => Some((
            marker(addr),
            0,
            LbService {
                flags: svc_flags::ADDRESS_MARKER,
                ..LbService::default()
            },
        )),
        _ => None,
    }
}

fn backend4(addr: Ipv4Addr, backend: BackendEntry) -> Lb4Backend {
    Lb4Backend {
        addr: addr.octets(),
        port_be: backend.key.port.to_be(),
        proto: backend.key.proto.number(),
        flags: backend.flags,
        rev_nat_id: backend.key.rev_nat_id,
    }
}

fn backend6(addr: Ipv6Addr, backend: BackendEntry) -> Lb6Backend {
    Lb6Backend {
        addr: addr.octets(),
        port_be: backend.key.port.to_be(),
        proto: backend.key.proto.number(),
        flags: backend.flags,
        rev_nat_id: backend.key.rev_nat_id,
    }
}

/// Protocol number in a key; the marker (port 0) has protocol 0.
fn key_proto(frontend: &Frontend) -> u8 {
    if frontend.port == 0 {
        0
    } else {
        frontend.proto.number()
    }
}

fn key4(addr: Ipv4Addr, frontend: &Frontend, slot: u16) -> Lb4Key {
    Lb4Key {
        addr: addr.octets(),
        dport_be: frontend.port.to_be(),
        backend_slot: slot,
        proto: key_proto(frontend),
        scope: scope::INTERNAL,
        _pad: [0; 2],
    }
}

fn key6(addr: Ipv6Addr, frontend: &Frontend, slot: u16) -> Lb6Key {
    Lb6Key {
        addr: addr.octets(),
        dport_be: frontend.port.to_be(),
        backend_slot: slot,
        proto: key_proto(frontend),
        scope: scope::INTERNAL,
        _pad: [0; 2],
    }
}

fn protocol(number: u8) -> Option<Protocol> {
    match number {
        lb_common::proto::TCP => Some(Protocol::Tcp),
        lb_common::proto::UDP => Some(Protocol::Udp),
        _ => None,
    }
}

/// A delete of something already gone is a success.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock `bpf_ktime_get_coarse_ns`
/// reads (conntrack timestamps).
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
