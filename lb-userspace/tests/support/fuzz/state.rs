//! The state the program grows: conntrack and affinity entries, counted
//! and emptied between epochs so that each epoch's growth can be held to
//! what its frames may create, and so that counting stays cheap.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use lb_common::{Affinity4Key, Affinity6Key, AffinityEntry, Ct4Key, Ct6Key, CtEntry, map_names};

/// The per-family conntrack and affinity maps of a fixture, opened from
/// their pins.
pub(crate) struct GrownMaps {
    ct4: HashMap<MapData, Ct4Key, CtEntry>,
    ct6: HashMap<MapData, Ct6Key, CtEntry>,
    aff4: HashMap<MapData, Affinity4Key, AffinityEntry>,
    aff6: HashMap<MapData, Affinity6Key, AffinityEntry>,
}

fn open<K: aya::Pod, V: aya::Pod>(pins: &Path, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(pins.join(name)).unwrap_or_else(|e| panic!("pin {name}: {e}"));
    let map = Map::from_map_data(data).unwrap_or_else(|e| panic!("map {name}: {e}"));
    HashMap::try_from(map).unwrap_or_else(|e| panic!("map {name} layout: {e}"))
}

/// Entries counted in one epoch.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Grown {
    pub(crate) conntrack: usize,
    pub(crate) affinity: usize,
}

impl GrownMaps {
    pub(crate) fn open(pins: &Path) -> Self {
        Self {
            ct4: open(pins, map_names::CT4),
            ct6: open(pins, map_names::CT6),
            aff4: open(pins, map_names::AFFINITY4),
            aff6: open(pins, map_names::AFFINITY6),
        }
    }

    /// Counts the entries, then removes them all.
    pub(crate) fn count_and_clear(&mut self) -> Grown {
        Grown {
            conntrack: drain(&mut self.ct4) + drain(&mut self.ct6),
            affinity: drain(&mut self.aff4) + drain(&mut self.aff6),
        }
    }
}

fn drain<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>) -> usize {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for key in &keys {
        // An entry the LRU evicted meanwhile is gone already.
        let _ = map.remove(key);
    }
    keys.len()
}
