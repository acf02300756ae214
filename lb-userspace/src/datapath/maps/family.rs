//! The maps of one address family, written once for both: `FamilyMaps<F>`
//! with `F` = [`V4`] or [`V6`], as the eBPF side's `Family` trait does for
//! the datapath. `Maps` holds one of each and picks by the address.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{
    HashMap, Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use lb_common::{
    Addr4, Addr6, Backend, CtEntry, CtKey, EndpointKey, LbKey, LbService, MapAddr, RevNat,
    SourceRange, backend_flags, limits::BACKEND_ID_V6, map_names, scope, svc_flags,
};

use super::{
    CtRecord, MapsError, access,
    backend_array::BackendArray,
    ct_record, ignore_missing, protocol, typed,
    write::{BatchKind, service_write},
    write_to,
};
use crate::{
    datapath::batch::batch_of,
    model::Frontend,
    plan::{BackendEntry, BackendKey, DatapathState, Op, SourceRange as PlanSourceRange},
};

/// An address family as the maps see it.
pub(crate) trait MapFamily {
    /// The maps' address type.
    type Addr: MapAddr + Into<IpAddr>;
    /// `IPv4` or `IPv6`, for messages.
    const NAME: &'static str;
    /// The family bit of its backend ids (`limits::BACKEND_ID_V6`).
    const BACKEND_ID_BIT: u32;
    /// The family's map names.
    const SERVICES: &'static str;
    const BACKENDS: &'static str;
    const REVNAT: &'static str;
    const CT: &'static str;
    /// The map of flows not answered yet.
    const CT_NEW: &'static str;
    const SRC_RANGES: &'static str;
    /// The endpoint index (`lb_common::EndpointKey`).
    const ENDPOINTS: &'static str;
    /// `ip` in the maps' form; `None` for an address of the other family.
    fn addr(ip: IpAddr) -> Option<Self::Addr>;
}

/// IPv4.
pub(crate) struct V4;
/// IPv6.
pub(crate) struct V6;

impl MapFamily for V4 {
    type Addr = Addr4;
    const NAME: &'static str = "IPv4";
    const BACKEND_ID_BIT: u32 = 0;
    const SERVICES: &'static str = map_names::SERVICES4;
    const BACKENDS: &'static str = map_names::BACKENDS4;
    const REVNAT: &'static str = map_names::REVNAT4;
    const CT: &'static str = map_names::CT4;
    const CT_NEW: &'static str = map_names::CT_NEW4;
    const SRC_RANGES: &'static str = map_names::SRC_RANGES4;
    const ENDPOINTS: &'static str = map_names::ENDPOINTS4;
    fn addr(ip: IpAddr) -> Option<Addr4> {
        match ip {
            IpAddr::V4(ip) => Some(ip.octets()),
            IpAddr::V6(_) => None,
        }
    }
}

impl MapFamily for V6 {
    type Addr = Addr6;
    const NAME: &'static str = "IPv6";
    const BACKEND_ID_BIT: u32 = lb_common::limits::BACKEND_ID_V6;
    const SERVICES: &'static str = map_names::SERVICES6;
    const BACKENDS: &'static str = map_names::BACKENDS6;
    const REVNAT: &'static str = map_names::REVNAT6;
    const CT: &'static str = map_names::CT6;
    const CT_NEW: &'static str = map_names::CT_NEW6;
    const SRC_RANGES: &'static str = map_names::SRC_RANGES6;
    const ENDPOINTS: &'static str = map_names::ENDPOINTS6;
    fn addr(ip: IpAddr) -> Option<Addr6> {
        match ip {
            IpAddr::V6(ip) => Some(ip.octets()),
            IpAddr::V4(_) => None,
        }
    }
}

/// The per-family maps of one family.
pub(crate) struct FamilyMaps<F: MapFamily> {
    pub(super) services: HashMap<MapData, LbKey<F::Addr>, LbService>,
    /// Indexed by the backend id without its family bit; entry 0 is a
    /// record (see `next_id`).
    pub(super) backends: BackendArray<F::Addr>,
    pub(super) rev_nat: HashMap<MapData, u32, RevNat<F::Addr>>,
    pub(super) ct: HashMap<MapData, CtKey<F::Addr>, CtEntry>,
    /// Flows not answered yet (`map_names::CT_NEW4`).
    pub(super) ct_new: HashMap<MapData, CtKey<F::Addr>, CtEntry>,
    ranges: LpmTrie<MapData, SourceRange<F::Addr>, u8>,
    /// (frontend, endpoint) -> backend id, one entry per backend entry:
    /// written and removed with it (see `lb_common::EndpointKey`).
    endpoints: HashMap<MapData, EndpointKey<F::Addr>, u32>,
}

/// The index in family `F`'s backend array of backend `id`, or an error
/// naming what was being done when `id` is the other family's.
fn backend_index<F: MapFamily>(id: u32, what: &str) -> Result<u32, MapsError> {
    if id & BACKEND_ID_V6 == F::BACKEND_ID_BIT {
        Ok(lb_common::backend_index(id))
    } else {
        Err(MapsError::Unwritable {
            what: what.to_owned(),
            because: format!("backend id {id:#x} is not an {} id", F::NAME),
        })
    }
}

/// The address of `ip` for family `F`, or an error naming what was being
/// done (an op routed to the wrong family is a bug, not a panic).
fn family_addr<F: MapFamily>(ip: IpAddr, what: &str) -> Result<F::Addr, MapsError> {
    F::addr(ip).ok_or_else(|| MapsError::Unwritable {
        what: what.to_owned(),
        because: format!("{ip} is not an {} address", F::NAME),
    })
}

/// Protocol number in a key; the marker (port 0) has protocol 0.
fn key_proto(frontend: &Frontend) -> u8 {
    if frontend.port == 0 {
        0
    } else {
        frontend.proto.number()
    }
}

/// The service-map key of `slot` of `frontend`.
pub(super) fn service_key<A: MapAddr>(addr: A, frontend: &Frontend, slot: u16) -> LbKey<A> {
    LbKey {
        addr,
        dport_be: frontend.port.to_be(),
        backend_slot: slot,
        proto: key_proto(frontend),
        scope: scope::INTERNAL,
        _pad: [0; 2],
    }
}

/// The backend-map value of `backend` at `addr`.
pub(super) fn backend_value<A: MapAddr>(addr: A, backend: BackendEntry) -> Backend<A> {
    Backend {
        addr,
        port_be: backend.key.port.to_be(),
        proto: backend.key.proto.number(),
        flags: backend.flags,
        rev_nat_id: backend.key.rev_nat_id,
    }
}

/// The endpoint-index key of a backend entry.
pub(super) fn endpoint_key<A: MapAddr>(backend: &Backend<A>) -> EndpointKey<A> {
    EndpointKey {
        rev_nat_id: backend.rev_nat_id,
        addr: backend.addr,
        port_be: backend.port_be,
        proto: backend.proto,
        _pad: 0,
    }
}

/// The rev-NAT-map value of a frontend at `addr`:`port`.
fn rev_nat_value<A: MapAddr>(addr: A, port: u16) -> RevNat<A> {
    RevNat {
        addr,
        port_be: port.to_be(),
        _pad: 0,
    }
}

/// Slot 0 and the other slots of the frontends read so far.
#[derive(Default)]
pub(super) struct ServiceEntries {
    pub(super) heads: BTreeMap<Frontend, LbService>,
    pub(super) slots: BTreeMap<Frontend, BTreeMap<u16, u32>>,
}

/// What `Maps` asks of the maps of one family, whichever it is: the one
/// place where an address picks its family is `Maps::family`.
pub(crate) trait FamilyOps: Send + Sync {
    /// (map name, entries it holds at most) of the maps sized by flags.
    fn capacities(&self) -> Vec<(&'static str, u32)>;
    /// Reads this family's services (into `entries`), markers, source
    /// ranges, backends and rev-NAT entries.
    fn read_into(
        &self,
        state: &mut DatapathState,
        entries: &mut ServiceEntries,
    ) -> Result<(), MapsError>;
    /// Writes `value` into `slot` of `frontend`.
    fn put_service(
        &mut self,
        frontend: &Frontend,
        slot: u16,
        value: LbService,
    ) -> Result<(), MapsError>;
    /// Removes `slot` of `frontend` (gone already is fine).
    fn delete_service(&mut self, frontend: &Frontend, slot: u16) -> Result<(), MapsError>;
    /// Writes backend `id`.
    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), MapsError>;
    /// Removes backend `id` (gone already is fine).
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError>;
    /// Writes rev-NAT `id` of `frontend`.
    fn put_rev_nat(&mut self, id: u32, frontend: Frontend) -> Result<(), MapsError>;
    /// Removes rev-NAT `id` (gone already is fine).
    fn delete_rev_nat(&mut self, id: u32) -> Result<(), MapsError>;
    /// Inserts (or removes) a client prefix of a frontend.
    fn source_range(&mut self, range: PlanSourceRange, insert: bool) -> Result<(), MapsError>;
    /// Writes the ops of `run` that go to this family's map of `kind` as
    /// one batch; returns how many the kernel wrote.
    fn update_batch(&self, kind: BatchKind, run: &[&Op]) -> usize;
    /// Appends this family's conntrack entries to `out`.
    fn conntrack_into(&self, out: &mut Vec<CtRecord>, now: u64) -> Result<(), MapsError>;
    /// Number of this family's conntrack entries: (answered, not yet).
    fn conntrack_len(&self) -> (usize, usize);
}

impl<F: MapFamily> FamilyMaps<F> {
    /// Makes the cluster CIDRs of this family (`CLUSTER_CIDR_REV_NAT` in
    /// the source-range map) exactly `cidrs` (CIDRs of the other family
    /// are skipped).
    pub(super) fn set_cluster_cidrs(&mut self, cidrs: &[(IpAddr, u8)]) -> Result<(), MapsError> {
        let family = F::NAME;
        let mut stale = Vec::new();
        for item in self.ranges.keys() {
            let key = item.map_err(access(format!("iterate {family} source ranges")))?;
            if u32::from_be(key.data().rev_nat_id_be) == lb_common::CLUSTER_CIDR_REV_NAT {
                stale.push(key);
            }
        }
        for key in stale {
            ignore_missing(self.ranges.remove(&key)).map_err(write_to(
                F::SRC_RANGES,
                format!("delete a {family} cluster CIDR"),
            ))?;
        }
        for &(ip, prefix) in cidrs {
            let Some(addr) = F::addr(ip) else {
                continue;
            };
            let key = Key::new(
                32 + u32::from(prefix),
                SourceRange {
                    rev_nat_id_be: lb_common::CLUSTER_CIDR_REV_NAT.to_be(),
                    addr,
                },
            );
            self.ranges.insert(&key, &1, 0).map_err(write_to(
                F::SRC_RANGES,
                format!("write cluster CIDR {ip}/{prefix}"),
            ))?;
        }
        Ok(())
    }

    /// Takes this family's maps out of `take` (by name).
    pub(super) fn build(
        take: &mut impl FnMut(&'static str) -> Result<Option<Map>, MapsError>,
    ) -> Result<Self, MapsError> {
        Ok(Self {
            services: typed(F::SERVICES, take(F::SERVICES)?, HashMap::try_from)?,
            backends: BackendArray::new(F::BACKENDS, take(F::BACKENDS)?)?,
            rev_nat: typed(F::REVNAT, take(F::REVNAT)?, HashMap::try_from)?,
            ct: typed(F::CT, take(F::CT)?, HashMap::try_from)?,
            ct_new: typed(F::CT_NEW, take(F::CT_NEW)?, HashMap::try_from)?,
            ranges: typed(F::SRC_RANGES, take(F::SRC_RANGES)?, LpmTrie::try_from)?,
            endpoints: typed(F::ENDPOINTS, take(F::ENDPOINTS)?, HashMap::try_from)?,
        })
    }
}

impl<F: MapFamily> FamilyOps for FamilyMaps<F>
where
    FamilyMaps<F>: Send + Sync,
{
    fn capacities(&self) -> Vec<(&'static str, u32)> {
        use aya::maps::IterableMap as _;
        [
            (F::SERVICES, self.services.map()),
            (F::BACKENDS, self.backends.map()),
            (F::REVNAT, self.rev_nat.map()),
            (F::CT, self.ct.map()),
            (F::CT_NEW, self.ct_new.map()),
        ]
        .into_iter()
        .filter_map(|(name, map)| {
            let entries = map.info().ok()?.max_entries();
            let records = if name == F::BACKENDS {
                super::BACKEND_RECORDS
            } else {
                0
            };
            Some((name, entries.saturating_sub(records)))
        })
        .collect()
    }

    fn read_into(
        &self,
        state: &mut DatapathState,
        entries: &mut ServiceEntries,
    ) -> Result<(), MapsError> {
        let family = F::NAME;
        for item in &self.services {
            let (key, value) = item.map_err(access(format!("iterate {family} services")))?;
            let addr: IpAddr = key.addr.into();
            if value.flags & svc_flags::ADDRESS_MARKER != 0 {
                state.markers.insert(addr);
            } else if let Some(proto) = protocol(key.proto) {
                let frontend = Frontend {
                    addr,
                    port: u16::from_be(key.dport_be),
                    proto,
                };
                if key.backend_slot == 0 {
                    entries.heads.insert(frontend, value);
                } else {
                    entries
                        .slots
                        .entry(frontend)
                        .or_default()
                        .insert(key.backend_slot, value.backend_id);
                }
            }
        }
        for item in self.ranges.keys() {
            let key = item.map_err(access(format!("iterate {family} source ranges")))?;
            let data = key.data();
            // The cluster CIDRs are the agent's, not a frontend's.
            if u32::from_be(data.rev_nat_id_be) == lb_common::CLUSTER_CIDR_REV_NAT {
                continue;
            }
            let prefix = u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(0);
            state.source_ranges.insert((
                u32::from_be(data.rev_nat_id_be),
                data.addr.into(),
                prefix,
            ));
        }
        self.backends.for_each(|index, value| {
            let id = index | F::BACKEND_ID_BIT;
            if let Some(proto) = protocol(value.proto) {
                let key = BackendKey {
                    rev_nat_id: value.rev_nat_id,
                    addr: value.addr.into(),
                    port: u16::from_be(value.port_be),
                    proto,
                };
                let flags = value.flags;
                state.backends.insert(id, BackendEntry { key, flags });
            }
        })?;
        for item in &self.rev_nat {
            let (id, value) = item.map_err(access(format!("iterate {family} rev-NAT")))?;
            state
                .rev_nats
                .insert(id, (value.addr.into(), u16::from_be(value.port_be)));
        }
        Ok(())
    }

    fn put_service(
        &mut self,
        frontend: &Frontend,
        slot: u16,
        value: LbService,
    ) -> Result<(), MapsError> {
        let what = format!("write slot {slot} of {frontend}");
        let addr = family_addr::<F>(frontend.addr, &what)?;
        self.services
            .insert(&service_key(addr, frontend, slot), &value, 0)
            .map_err(write_to(F::SERVICES, what))
    }

    fn delete_service(&mut self, frontend: &Frontend, slot: u16) -> Result<(), MapsError> {
        let what = format!("delete slot {slot} of {frontend}");
        let addr = family_addr::<F>(frontend.addr, &what)?;
        ignore_missing(self.services.remove(&service_key(addr, frontend, slot)))
            .map_err(access(what))
    }

    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), MapsError> {
        let what = format!(
            "write backend {id} ({})",
            std::net::SocketAddr::new(backend.key.addr, backend.key.port)
        );
        let addr = family_addr::<F>(backend.key.addr, &what)?;
        let value = backend_value(addr, backend);
        // The backend first: a full map is then named as the map
        // `--max-backends` sizes. The index is sized alike and holds at
        // most one entry per backend, so it has room when the backend had;
        // until it is written, affinity through another frontend of the
        // port just chooses afresh. Only backends of affinity frontends
        // are indexed (`backend_flags::INDEXED`); an entry left by
        // affinity turned off is never looked up, and goes with its
        // backend.
        let index = backend_index::<F>(id, &what)?;
        if !self.backends.set(index, &value)? {
            return Err(MapsError::Full {
                map: F::BACKENDS,
                what,
            });
        }
        if value.flags & backend_flags::INDEXED == 0 {
            return Ok(());
        }
        self.endpoints
            .insert(&endpoint_key(&value), &id, 0)
            .map_err(write_to(F::ENDPOINTS, what))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        let what = format!("delete backend {id}");
        let index = backend_index::<F>(id, &what)?;
        if let Some(value) = self.backends.get(index)? {
            let key = endpoint_key(&value);
            // Only this backend's own entry: a newer backend of the same
            // frontend and endpoint may have taken it over (written before
            // this one is removed).
            if self.endpoints.get(&key, 0).ok() == Some(id) {
                ignore_missing(self.endpoints.remove(&key)).map_err(access(what.clone()))?;
            }
        }
        self.backends.clear(index)
    }

    fn put_rev_nat(&mut self, id: u32, frontend: Frontend) -> Result<(), MapsError> {
        let what = format!("write rev-NAT {id} of {frontend}");
        let addr = family_addr::<F>(frontend.addr, &what)?;
        let value = rev_nat_value(addr, frontend.port);
        self.rev_nat
            .insert(&id, &value, 0)
            .map_err(write_to(F::REVNAT, what))
    }

    fn delete_rev_nat(&mut self, id: u32) -> Result<(), MapsError> {
        ignore_missing(self.rev_nat.remove(&id)).map_err(access(format!("delete rev-NAT {id}")))
    }

    fn source_range(&mut self, range: PlanSourceRange, insert: bool) -> Result<(), MapsError> {
        let (rev_nat_id, ip, prefix) = range;
        let what = format!(
            "{} source range {ip}/{prefix} of rev-NAT {rev_nat_id}",
            if insert { "write" } else { "delete" }
        );
        let addr = family_addr::<F>(ip, &what)?;
        // The rev-NAT id (32 bits) comes first in the key, then the prefix.
        let key = Key::new(
            32 + u32::from(prefix),
            SourceRange {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr,
            },
        );
        let result = if insert {
            self.ranges.insert(&key, &1, 0)
        } else {
            ignore_missing(self.ranges.remove(&key))
        };
        result.map_err(write_to(F::SRC_RANGES, what))
    }

    fn update_batch(&self, kind: BatchKind, run: &[&Op]) -> usize {
        use aya::maps::IterableMap as _;
        match kind {
            BatchKind::Services => batch_of(self.services.map(), run, |op| {
                let (frontend, slot, value) = service_write(op)?;
                Some((service_key(F::addr(frontend.addr)?, &frontend, slot), value))
            }),
            BatchKind::Backends => {
                let value = |op: &Op| match *op {
                    Op::PutBackend { id, backend } => {
                        Some((id, backend_value(F::addr(backend.key.addr)?, backend)))
                    }
                    _ => None,
                };
                // The backends first (stored in place, up to the first
                // that is not this family's or is past the array's end),
                // then the index entries of those written that have one
                // (see `put_backend`); the rest go one by one.
                let written = self
                    .backends
                    .set_all(run, |op| {
                        value(op)
                            .filter(|(id, _)| id & BACKEND_ID_V6 == F::BACKEND_ID_BIT)
                            .map(|(id, backend)| (lb_common::backend_index(id), backend))
                    })
                    .unwrap_or(0);
                let (at, to_index): (Vec<usize>, Vec<&Op>) = run[..written]
                    .iter()
                    .enumerate()
                    .filter(|(_, op)| {
                        value(op).is_some_and(|(_, b)| b.flags & backend_flags::INDEXED != 0)
                    })
                    .map(|(i, op)| (i, *op))
                    .unzip();
                let indexed = batch_of(self.endpoints.map(), &to_index, |op| {
                    value(op).map(|(id, backend)| (endpoint_key(&backend), id))
                });
                // The one-by-one path rewrites the backend, then its index,
                // from the first whose index entry was not written.
                at.get(indexed).copied().unwrap_or(written)
            }
            BatchKind::RevNats => batch_of(self.rev_nat.map(), run, |op| match *op {
                Op::PutRevNat { id, frontend } => {
                    Some((id, rev_nat_value(F::addr(frontend.addr)?, frontend.port)))
                }
                _ => None,
            }),
        }
    }

    fn conntrack_into(&self, out: &mut Vec<CtRecord>, now: u64) -> Result<(), MapsError> {
        for (map, answered) in [(&self.ct, true), (&self.ct_new, false)] {
            for item in map {
                let (key, entry) =
                    item.map_err(access(format!("iterate {} conntrack", F::NAME)))?;
                out.push(ct_record(&key_view(&key), &entry, answered, now));
            }
        }
        Ok(())
    }

    fn conntrack_len(&self) -> (usize, usize) {
        (self.ct.keys().count(), self.ct_new.keys().count())
    }
}

/// The parts of a conntrack key `ct_record` shows.
fn key_view<A: Copy + Into<IpAddr>>(key: &CtKey<A>) -> super::CtKeyView {
    super::CtKeyView {
        dir: key.dir,
        proto: key.proto,
        source: (key.saddr.into(), key.sport_be),
        destination: (key.daddr.into(), key.dport_be),
    }
}
