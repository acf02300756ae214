//! Read-only lookups in the pinned maps, one key at a time (the maps may
//! hold millions of entries): the frontend a packet is addressed to, its
//! backends, and the reply entry a backend's packet matches. Nothing here
//! writes.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{Array, HashMap, MapData, MapError};
use lb_common::{
    Addr4, Addr6, Backend, CtEntry, CtKey, LbKey, LbService, MapAddr, RevNat, backend_flags,
    ct_dir, map_names, scope,
};

use super::{BackendView, ExplainError};

/// An address type of the maps, with its maps' names.
pub(super) trait MapFamily: MapAddr {
    const SERVICES: &'static str;
    const BACKENDS: &'static str;
    const REVNAT: &'static str;
    const CT: &'static str;
    const CT_NEW: &'static str;
    /// The family bit of its backend ids (`limits::BACKEND_ID_V6`).
    const BACKEND_ID_BIT: u32;
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
}

impl MapFamily for Addr4 {
    const SERVICES: &'static str = map_names::SERVICES4;
    const BACKENDS: &'static str = map_names::BACKENDS4;
    const REVNAT: &'static str = map_names::REVNAT4;
    const CT: &'static str = map_names::CT4;
    const CT_NEW: &'static str = map_names::CT_NEW4;
    const BACKEND_ID_BIT: u32 = 0;
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::from(self)
    }
}

impl MapFamily for Addr6 {
    const SERVICES: &'static str = map_names::SERVICES6;
    const BACKENDS: &'static str = map_names::BACKENDS6;
    const REVNAT: &'static str = map_names::REVNAT6;
    const CT: &'static str = map_names::CT6;
    const CT_NEW: &'static str = map_names::CT_NEW6;
    const BACKEND_ID_BIT: u32 = lb_common::limits::BACKEND_ID_V6;
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::from(self)
    }
}

/// One family's maps, opened from their pins (handles of our own).
pub(super) struct Tables<A: MapFamily> {
    services: HashMap<MapData, LbKey<A>, LbService>,
    /// Indexed by the backend id without its family bit.
    backends: Array<MapData, Backend<A>>,
    rev_nat: HashMap<MapData, u32, RevNat<A>>,
    ct: HashMap<MapData, CtKey<A>, CtEntry>,
    /// Flows the backend has not answered yet.
    ct_new: HashMap<MapData, CtKey<A>, CtEntry>,
}

fn open<M: TryFrom<aya::maps::Map, Error = MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<M, ExplainError> {
    let path = dir.join(name);
    let failed = |source: MapError| ExplainError::Map {
        map: name,
        path: dir.to_owned(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(failed)?;
    let map = aya::maps::Map::from_map_data(data).map_err(failed)?;
    M::try_from(map).map_err(failed)
}

/// `get`, with "no such key" as `None` and every other failure an error.
fn get<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<Option<V>, ExplainError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(ExplainError::Read { map: name, source }),
    }
}

/// A frontend as the maps hold it.
pub(super) struct FrontendEntry {
    pub(super) value: LbService,
    pub(super) backends: Vec<BackendView>,
}

impl<A: MapFamily> Tables<A> {
    pub(super) fn open(dir: &Path) -> Result<Self, ExplainError> {
        Ok(Self {
            services: open(dir, A::SERVICES)?,
            backends: open(dir, A::BACKENDS)?,
            rev_nat: open(dir, A::REVNAT)?,
            ct: open(dir, A::CT)?,
            ct_new: open(dir, A::CT_NEW)?,
        })
    }

    /// The frontend serving `addr:port/l4_proto`, with the backends in its
    /// slots (new flows) and, from the backend map, the draining ones of
    /// the same frontend that established flows may still use.
    pub(super) fn frontend(
        &self,
        addr: SocketAddr,
        l4_proto: u8,
    ) -> Result<Option<FrontendEntry>, ExplainError> {
        let Some(vip) = A::from_ip(addr.ip()) else {
            return Ok(None);
        };
        let key = |slot: u16| LbKey {
            addr: vip,
            dport_be: addr.port().to_be(),
            backend_slot: slot,
            proto: l4_proto,
            scope: scope::INTERNAL,
            _pad: [0; 2],
        };
        let Some(value) = get(&self.services, &key(0), A::SERVICES)? else {
            return Ok(None);
        };
        let mut backends = Vec::with_capacity(usize::from(value.count));
        for slot in 1..=value.count {
            // The first slots are in the frontend's own entry.
            let id = match value.inline_slot(slot) {
                Some(id) => id,
                None => match get(&self.services, &key(slot), A::SERVICES)? {
                    Some(slot_value) => slot_value.backend_id,
                    None => continue,
                },
            };
            if backends.iter().any(|b: &BackendView| b.id == id) {
                continue;
            }
            if let Some(backend) = self.backend(id)? {
                backends.push(backend);
            }
        }
        Ok(Some(FrontendEntry { value, backends }))
    }

    /// The reply entry a packet from `src` to `dst` matches, and the
    /// frontend (address and port) its flow was addressed to.
    pub(super) fn reply(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        l4_proto: u8,
    ) -> Result<Option<(CtEntry, SocketAddr)>, ExplainError> {
        let (Some(saddr), Some(daddr)) = (A::from_ip(src.ip()), A::from_ip(dst.ip())) else {
            return Ok(None);
        };
        let key = CtKey {
            saddr,
            daddr,
            sport_be: src.port().to_be(),
            dport_be: dst.port().to_be(),
            proto: l4_proto,
            dir: ct_dir::REPLY,
            _pad: [0; 2],
        };
        let entry = match get(&self.ct, &key, A::CT)? {
            Some(entry) => Some(entry),
            None => get(&self.ct_new, &key, A::CT_NEW)?,
        };
        let Some(entry) = entry else {
            return Ok(None);
        };
        let Some(rev_nat) = get(&self.rev_nat, &entry.rev_nat_id, A::REVNAT)? else {
            return Ok(None);
        };
        let frontend = SocketAddr::new(rev_nat.addr.to_ip(), u16::from_be(rev_nat.port_be));
        Ok(Some((entry, frontend)))
    }

    /// The backend of id `id`, if the array has it (a cleared entry, rev-NAT
    /// id 0, is none).
    pub(super) fn backend(&self, id: u32) -> Result<Option<BackendView>, ExplainError> {
        if id & lb_common::limits::BACKEND_ID_V6 != A::BACKEND_ID_BIT {
            return Ok(None);
        }
        match self.backends.get(&lb_common::backend_index(id), 0) {
            Ok(backend) if backend.rev_nat_id != 0 => Ok(Some(view(id, &backend))),
            Ok(_) | Err(MapError::OutOfBounds { .. }) => Ok(None),
            Err(source) => Err(ExplainError::Read {
                map: A::BACKENDS,
                source,
            }),
        }
    }
}

fn view<A: MapFamily>(id: u32, backend: &Backend<A>) -> BackendView {
    BackendView {
        id,
        address: SocketAddr::new(backend.addr.to_ip(), u16::from_be(backend.port_be)),
        state: if backend.flags & backend_flags::TERMINATING == 0 {
            "active"
        } else {
            "draining"
        },
        local: backend.flags & backend_flags::LOCAL != 0,
    }
}
