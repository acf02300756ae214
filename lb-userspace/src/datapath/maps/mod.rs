//! Typed access to the datapath maps: read them back as a `DatapathState`,
//! apply a plan, list conntrack entries and counters.
//!
//! `family` holds the per-family maps, written once for IPv4 and IPv6;
//! `write` applies a plan (ordering, batches, writes left out after a
//! failure); this file opens the maps and holds what both families share.

mod backend_array;
mod family;
mod next_id;
pub(crate) use next_id::BACKEND_RECORDS;
mod write;

use std::{net::IpAddr, path::Path};

use aya::{
    Ebpf,
    maps::{Array, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use lb_common::{CtEntry, LbConfig, LbStats, ct_dir, event, map_names, reason};

use crate::{
    model::{Frontend, Protocol},
    plan::{DatapathState, FrontendState, Op},
};
use family::{FamilyMaps, FamilyOps, ServiceEntries, V4, V6};
use write::service_write;

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
    /// A backend array is not the mappable array of entries this agent
    /// expects.
    #[error("map {name}: {what}")]
    Shape {
        /// Map name.
        name: &'static str,
        /// What is unexpected about it.
        what: &'static str,
    },
    /// A backend array could not be mapped into memory.
    #[error("cannot map {name} into memory")]
    Mmap {
        /// Map name.
        name: &'static str,
        /// Underlying error.
        #[source]
        source: std::io::Error,
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

/// Every datapath map, typed: the per-family ones in a [`FamilyMaps`] each.
pub struct Maps {
    v4: FamilyMaps<V4>,
    v6: FamilyMaps<V6>,
    svc_stats: PerCpuArray<MapData, LbStats>,
    reasons: PerCpuArray<MapData, u64>,
    /// `None`: the pins of an agent from before the map (a CLI run
    /// during an upgrade).
    events: Option<PerCpuArray<MapData, u64>>,
    config: Array<MapData, LbConfig>,
    maglev: super::maglev::MaglevMaps,
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
    /// The backend has answered: the entry is in the main conntrack map
    /// (else in the map of new flows, with the short lifetimes).
    pub answered: bool,
}

fn typed<T>(
    name: &'static str,
    map: Option<Map>,
    convert: impl FnOnce(Map) -> Result<T, MapError>,
) -> Result<T, MapsError> {
    let map = map.ok_or(MapsError::Missing(name))?;
    convert(map).map_err(|source| MapsError::Layout { name, source })
}

/// The per-CPU counters of `map`, one per name in `names` (by index),
/// each summed over the CPUs; `kind` names them in errors.
fn summed_counters(
    map: &PerCpuArray<MapData, u64>,
    names: &[&'static str],
    kind: &str,
) -> Result<Vec<(&'static str, u64)>, MapsError> {
    let mut out = Vec::with_capacity(names.len());
    for (index, &name) in (0u32..).zip(names) {
        let values = map
            .get(&index, 0)
            .map_err(access(format!("read {kind} counter {name}")))?;
        out.push((name, values.iter().sum()));
    }
    Ok(out)
}

/// The count named `name` in `counts`, as [`Maps::reason_counts`] and
/// [`Maps::event_counts`] give them.
#[must_use]
pub fn named_count(counts: &[(&str, u64)], name: &str) -> Option<u64> {
    counts
        .iter()
        .find(|(counted, _)| *counted == name)
        .map(|(_, count)| *count)
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
            v4: FamilyMaps::build(&mut take)?,
            v6: FamilyMaps::build(&mut take)?,
            svc_stats: typed(n::SVC_STATS, take(n::SVC_STATS)?, PerCpuArray::try_from)?,
            reasons: typed(n::REASONS, take(n::REASONS)?, PerCpuArray::try_from)?,
            // A missing pin is tolerated (an agent from before the map);
            // any other failure is not.
            events: match take(n::EVENTS) {
                Err(MapsError::OpenPin { .. }) => None,
                map => Some(typed(n::EVENTS, map?, PerCpuArray::try_from)?),
            },
            config: typed(n::CONFIG, take(n::CONFIG)?, Array::try_from)?,
            maglev: super::maglev::MaglevMaps::new(
                typed(n::MAGLEV_REFS, take(n::MAGLEV_REFS)?, Array::try_from)?,
                typed(n::MAGLEV_TABLES, take(n::MAGLEV_TABLES)?, Array::try_from)?,
            ),
        })
    }

    /// The maps of `ip`'s family: the one place an address picks them.
    fn family(&mut self, ip: IpAddr) -> &mut dyn FamilyOps {
        match ip {
            IpAddr::V4(_) => &mut self.v4,
            IpAddr::V6(_) => &mut self.v6,
        }
    }

    /// The Maglev tables and references.
    pub fn maglev(&mut self) -> &mut super::maglev::MaglevMaps {
        &mut self.maglev
    }

    /// Both families' maps.
    fn families(&self) -> [&dyn FamilyOps; 2] {
        [&self.v4, &self.v6]
    }

    /// (map name, entries it holds at most) of the maps sized by flags, as
    /// the kernel has them (a pinned map keeps its size).
    #[must_use]
    pub fn capacities(&self) -> Vec<(&'static str, u32)> {
        self.families()
            .iter()
            .flat_map(|family| family.capacities())
            .collect()
    }

    /// Reads services, backends and rev-NAT entries back.
    ///
    /// # Errors
    /// A map could not be iterated.
    pub fn read_state(&self) -> Result<DatapathState, MapsError> {
        use aya::maps::IterableMap as _;
        let mut state = DatapathState::default();
        let mut entries = ServiceEntries::default();
        for family in self.families() {
            family.read_into(&mut state, &mut entries)?;
        }
        state.next_backend_id = self.next_backend_ids(&state.backends);
        // Backend ids index the backend arrays, sized at load.
        state.backend_index_max = self
            .v4
            .backends
            .entries()
            .min(self.v6.backends.entries())
            .saturating_sub(BACKEND_RECORDS);
        // Rev-NAT ids index the per-service stats, sized at load.
        state.rev_nat_id_max = self
            .svc_stats
            .map()
            .info()
            .map_or(0, |info| info.max_entries().saturating_sub(1));
        let ServiceEntries { heads, mut slots } = entries;
        for (frontend, head) in heads {
            let known = slots.remove(&frontend).unwrap_or_default();
            // Slots beyond the count are leftovers of an interrupted apply:
            // leaving them out of the state makes the next diff delete them.
            let slots = (1..=head.count)
                .map(|slot| {
                    head.inline_slot(slot)
                        .unwrap_or_else(|| known.get(&slot).copied().unwrap_or(0))
                })
                .collect();
            state.frontends.insert(
                frontend,
                FrontendState {
                    rev_nat_id: head.rev_nat_id,
                    slots,
                    flags: head.flags,
                    affinity_timeout_s: head.affinity_timeout_s,
                    affinity_group: head.backend_id,
                },
            );
        }
        Ok(state)
    }

    /// Writes one plan step.
    ///
    /// # Errors
    /// The map rejected the write (full, or gone).
    pub fn apply_op(&mut self, op: &Op) -> Result<(), MapsError> {
        if let Op::PutRevNat { id, .. } = *op {
            self.reset_stats(id)?;
        }
        if let Some((frontend, slot, value)) = service_write(op) {
            return self
                .family(frontend.addr)
                .put_service(&frontend, slot, value);
        }
        match *op {
            Op::PutBackend { id, backend } => {
                self.family(backend.key.addr).put_backend(id, backend)
            }
            Op::PutRevNat { id, frontend } => self.family(frontend.addr).put_rev_nat(id, frontend),
            Op::PutSourceRange(range) => self.family(range.1).source_range(range, true),
            Op::DeleteSourceRange(range) => self.family(range.1).source_range(range, false),
            Op::DeleteSlot { frontend, slot } => {
                self.family(frontend.addr).delete_service(&frontend, slot)
            }
            Op::DeleteFrontend { frontend } => {
                self.family(frontend.addr).delete_service(&frontend, 0)
            }
            Op::DeleteMarker { addr } => self.family(addr).delete_service(&marker(addr), 0),
            Op::DeleteRevNat { id, addr } => self.family(addr).delete_rev_nat(id),
            Op::DeleteBackend { id, addr } => self.family(addr).delete_backend(id),
            // Written above: `service_write` covers the three.
            Op::PutSlot { .. } | Op::PutFrontend(_) | Op::PutMarker { .. } => Ok(()),
        }
    }

    /// Writes the node configuration (SNAT and hairpin source addresses).
    /// `config.snat_seed` is ignored: the pinned map's seed is kept (a
    /// flow's SNAT port candidates must not change under it when the agent
    /// restarts), or a random one is chosen when it has none yet.
    ///
    /// # Errors
    /// The config map rejected the write.
    pub fn write_config(&mut self, config: &LbConfig) -> Result<(), MapsError> {
        let pinned = self
            .config
            .get(&0, 0)
            .map_or(0, |current| current.snat_seed);
        let snat_seed = if pinned == 0 { random_seed() } else { pinned };
        let config = LbConfig {
            snat_seed,
            ..*config
        };
        self.config
            .set(0, &config, 0)
            .map_err(access("write node configuration"))
    }

    /// Writes the cluster CIDRs (`--cluster-cidr`) the datapath tells
    /// off-cluster clients of a `ClusterIP` by (with
    /// `config_flags::CLUSTER_CIDR` in the configuration), replacing those
    /// written before.
    ///
    /// # Errors
    /// A map refused a write or a delete.
    pub fn write_cluster_cidrs(&mut self, cidrs: &[(IpAddr, u8)]) -> Result<(), MapsError> {
        self.v4.set_cluster_cidrs(cidrs)?;
        self.v6.set_cluster_cidrs(cidrs)
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

    /// Zeroes the counters of the rev-NAT ids of `run` in one batch; false
    /// if the kernel refused (the writes then go one by one, each with its
    /// own reset).
    fn reset_stats_batch(&self, run: &[&Op]) -> bool {
        use aya::maps::IterableMap as _;
        let Ok(cpus) = aya::util::nr_cpus() else {
            return false;
        };
        let ids: Vec<u32> = run
            .iter()
            .filter_map(|op| match **op {
                Op::PutRevNat { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        // A per-CPU value is one `LbStats` (16 bytes, 8-aligned) per
        // possible CPU.
        let zeros = vec![LbStats::default(); ids.len() * cpus.get() as usize];
        super::batch::update_batch_raw(
            self.svc_stats.map(),
            ids.as_ptr().cast(),
            zeros.as_ptr().cast(),
            ids.len(),
        ) == ids.len()
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
        summed_counters(&self.reasons, &reason::NAMES, "reason")
    }

    /// The datapath's event counters (summed over CPUs), by name; none
    /// when the pins have no events map.
    ///
    /// # Errors
    /// The events map could not be read.
    pub fn event_counts(&self) -> Result<Vec<(&'static str, u64)>, MapsError> {
        match &self.events {
            Some(events) => summed_counters(events, &event::NAMES, "event"),
            None => Ok(Vec::new()),
        }
    }

    /// Every conntrack entry of both families.
    ///
    /// # Errors
    /// A conntrack map could not be iterated.
    pub fn conntrack(&self) -> Result<Vec<CtRecord>, MapsError> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for family in self.families() {
            family.conntrack_into(&mut out, now)?;
        }
        out.sort_by_key(|record| (record.source, record.destination));
        Ok(out)
    }

    /// Number of conntrack entries per family (v4, v6), answered and not
    /// yet answered (in the map of new flows) together.
    ///
    /// # Errors
    /// Never today (kept for callers that may read them otherwise).
    pub fn conntrack_len(&self) -> Result<(usize, usize), MapsError> {
        let total = |(answered, new): (usize, usize)| answered + new;
        Ok((
            total(self.v4.conntrack_len()),
            total(self.v6.conntrack_len()),
        ))
    }

    /// Number of entries of flows not answered yet, both families.
    ///
    /// # Errors
    /// Never today (kept for callers that may read them otherwise).
    pub fn conntrack_unanswered_len(&self) -> Result<usize, MapsError> {
        Ok(self.v4.conntrack_len().1 + self.v6.conntrack_len().1)
    }
}

/// A conntrack key's direction, protocol and ends (addresses, ports in
/// network order).
#[derive(Clone, Copy)]
struct CtKeyView {
    dir: u8,
    proto: u8,
    source: (IpAddr, u16),
    destination: (IpAddr, u16),
}

fn ct_record(key: &CtKeyView, entry: &CtEntry, answered: bool, now: u64) -> CtRecord {
    let CtKeyView {
        dir,
        proto,
        source,
        destination,
    } = *key;
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
        answered,
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

fn protocol(number: u8) -> Option<Protocol> {
    match number {
        lb_common::proto::TCP => Some(Protocol::Tcp),
        lb_common::proto::UDP => Some(Protocol::Udp),
        lb_common::proto::SCTP => Some(Protocol::Sctp),
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

/// A random non-zero seed (`getrandom`; the clock if that fails).
fn random_seed() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: writes at most `bytes.len()` bytes into `bytes`.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let seed = if got == 4 {
        u32::from_ne_bytes(bytes)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |elapsed| elapsed.subsec_nanos())
    };
    seed.max(1)
}
