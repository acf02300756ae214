//! Maglev tables in the maps: which frontends get one, which rows they
//! use, and the swap that a packet never sees half done.
//!
//! Memory: a table is M x 4 bytes (64 KiB at M = 16381) and each frontend
//! with one has two rows (the active one and the next), preallocated by
//! the kernel for `--max-maglev-tables` at load: 256 tables at M = 16381
//! are 32 MiB. At 100k frontends a table each would be 12.5 GiB, so only
//! north-south frontends (and, with `--lb-algorithm=maglev`, the others)
//! get one, up to the cap; the rest keep the per-node slot choice and are
//! named in an error.
//!
//! The swap: a new table is written into the frontend's inactive row, then
//! the frontend's reference (one `u32` array entry) is pointed at it. A
//! packet reads the reference once: it sees the old row or the new, each
//! complete. A row is overwritten only by the change after next, a whole
//! sync later, while a packet reads a row for microseconds; and should a
//! row be reused under a packet anyway (or name a backend removed since),
//! the datapath checks the entry is a backend of that frontend taking new
//! flows and otherwise falls back to a slot.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use aya::maps::{Array, IterableMap as _, MapData};
use lb_common::{backend_flags, maglev::ROWS_PER_TABLE, map_names, svc_flags};

use super::maps::MapsError;
use crate::{
    maglev::{self, MaglevBackend},
    model::{Frontend, FrontendSpec},
    plan::DatapathState,
};

/// Which frontends use Maglev (`--lb-algorithm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LbAlgorithm {
    /// A per-node choice among the slots (today's behaviour); north-south
    /// frontends still get Maglev when [`MaglevConfig::external`] is set.
    #[default]
    Random,
    /// Maglev for every frontend (up to the table cap).
    Maglev,
}

/// Maglev settings: the agent's `--lb-algorithm`, `--maglev-*` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevConfig {
    /// The algorithm of `ClusterIP` frontends.
    pub algorithm: LbAlgorithm,
    /// Maglev for north-south frontends (`NodePort`, load-balancer IPs,
    /// external IPs): `--maglev-external`, implied by `algorithm`.
    pub external: bool,
    /// Table size M, one of [`maglev::TABLE_SIZES`].
    pub table_size: u32,
    /// Frontends that can have a table (`--max-maglev-tables`).
    pub max_tables: u32,
    /// `--maglev-seed`: mixed into every frontend's seed.
    pub seed: u64,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        Self {
            algorithm: LbAlgorithm::Random,
            external: false,
            table_size: maglev::DEFAULT_TABLE_SIZE,
            max_tables: DEFAULT_MAX_TABLES,
            seed: 0,
        }
    }
}

/// Default `--max-maglev-tables`: 32 MiB of rows at the default M.
pub const DEFAULT_MAX_TABLES: u32 = 256;

impl MaglevConfig {
    /// Whether any frontend can get a table (the maps are sized for it).
    #[must_use]
    pub fn enabled(&self) -> bool {
        (self.external || self.algorithm == LbAlgorithm::Maglev) && self.max_tables > 0
    }

    /// Whether a frontend with these `svc_flags` gets a table.
    #[must_use]
    pub fn wants(&self, flags: u16) -> bool {
        self.enabled()
            && (self.algorithm == LbAlgorithm::Maglev
                || (self.external && flags & svc_flags::EXTERNAL != 0))
    }

    /// (map name, entries) of the Maglev maps: one entry each when off.
    #[must_use]
    pub fn map_sizes(&self) -> [(&'static str, u32); 2] {
        if !self.enabled() {
            return [(map_names::MAGLEV_REFS, 1), (map_names::MAGLEV_TABLES, 1)];
        }
        let rows = u64::from(self.max_tables) * u64::from(ROWS_PER_TABLE);
        let entries = (rows * u64::from(self.table_size)).min(u64::from(u32::MAX));
        [
            (map_names::MAGLEV_REFS, lb_common::limits::MAX_FRONTENDS),
            (
                map_names::MAGLEV_TABLES,
                u32::try_from(entries).unwrap_or(u32::MAX),
            ),
        ]
    }

    /// Bytes of table rows the kernel allocates at load.
    #[must_use]
    pub fn table_bytes(&self) -> u64 {
        if self.enabled() {
            u64::from(self.max_tables) * u64::from(ROWS_PER_TABLE) * u64::from(self.table_size) * 4
        } else {
            0
        }
    }
}

/// The two Maglev maps.
pub struct MaglevMaps {
    refs: Array<MapData, u32>,
    tables: Array<MapData, u32>,
}

impl MaglevMaps {
    /// Wraps the two maps.
    #[must_use]
    pub fn new(refs: Array<MapData, u32>, tables: Array<MapData, u32>) -> Self {
        Self { refs, tables }
    }

    /// Tables of `size` entries the table map holds (a pinned map keeps
    /// the size it was made with).
    #[must_use]
    pub fn table_capacity(&self, size: u32) -> u32 {
        self.tables.len() / size / ROWS_PER_TABLE
    }

    /// Writes `table` into `row` in one batch (one by one if the kernel
    /// refuses the batch).
    ///
    /// # Errors
    /// The row is outside the map, or a write failed.
    pub fn write_row(&mut self, row: u32, table: &[u32]) -> Result<(), MapsError> {
        let size = u32::try_from(table.len()).unwrap_or(u32::MAX);
        let start = row.checked_mul(size).filter(|start| {
            start
                .checked_add(size)
                .is_some_and(|end| end <= self.tables.len())
        });
        let Some(start) = start else {
            return Err(MapsError::Full {
                map: map_names::MAGLEV_TABLES,
                what: format!("maglev row {row}"),
            });
        };
        let keys: Vec<u32> = (start..start + size).collect();
        let written = super::batch::update_batch_raw(
            self.tables.map(),
            keys.as_ptr().cast(),
            table.as_ptr().cast(),
            keys.len(),
        );
        for (key, value) in keys.iter().zip(table).skip(written) {
            self.tables
                .set(*key, value, 0)
                .map_err(|source| MapsError::Access {
                    what: format!("write maglev row {row}"),
                    source,
                })?;
        }
        Ok(())
    }

    /// Points frontend `rev_nat_id` at `row` (`None`: no table).
    ///
    /// # Errors
    /// The id is outside the map, or the write failed.
    pub fn set_ref(&mut self, rev_nat_id: u32, row: Option<u32>) -> Result<(), MapsError> {
        let value = row.map_or(0, |row| row + 1);
        self.refs
            .set(rev_nat_id, &value, 0)
            .map_err(|source| MapsError::Access {
                what: format!("point rev-NAT {rev_nat_id} at maglev row {row:?}"),
                source,
            })
    }

    /// The row + 1 frontend `rev_nat_id` points at (0: none).
    ///
    /// # Errors
    /// The read failed.
    pub fn get_ref(&self, rev_nat_id: u32) -> Result<u32, MapsError> {
        self.refs
            .get(&rev_nat_id, 0)
            .map_err(|source| MapsError::Access {
                what: format!("read maglev reference of rev-NAT {rev_nat_id}"),
                source,
            })
    }

    /// Zeroes every reference but those of `keep`, in one batch: after a
    /// start, references an earlier agent left must not outlive it.
    fn clear_refs_except(&mut self, keep: &BTreeSet<u32>) -> Result<(), MapsError> {
        let keys: Vec<u32> = (0..self.refs.len())
            .filter(|id| !keep.contains(id))
            .collect();
        let zeros = vec![0u32; keys.len()];
        let written = super::batch::update_batch_raw(
            self.refs.map(),
            keys.as_ptr().cast(),
            zeros.as_ptr().cast(),
            keys.len(),
        );
        for key in keys.iter().skip(written) {
            self.set_ref(*key, None)?;
        }
        Ok(())
    }
}

/// What one Maglev sync did.
#[derive(Debug, Default)]
pub struct MaglevOutcome {
    /// Tables written (each followed by its reference).
    pub tables_written: u64,
    /// Frontends that want a table but found all in use: they keep the
    /// per-node slot choice.
    pub without_table: Vec<Frontend>,
    /// Writes that failed (logged).
    pub failures: u64,
}

/// A frontend's table: where it lives and what it was built from.
#[derive(Debug)]
struct Assigned {
    /// Table number: rows `2 t` and `2 t + 1`.
    table: u32,
    /// The row the reference points at.
    active: u32,
    /// (seed, backends) the active row was built from.
    inputs: (u64, Vec<(IpAddr, u16, u32)>),
}

/// The agent's Maglev state: tables by rev-NAT id, free table numbers.
#[derive(Debug)]
pub struct MaglevSync {
    config: MaglevConfig,
    assigned: BTreeMap<u32, Assigned>,
    free: Vec<u32>,
    next_table: u32,
    /// False until the first sync cleared references it did not write.
    started: bool,
}

impl MaglevSync {
    /// No tables yet.
    #[must_use]
    pub fn new(config: MaglevConfig) -> Self {
        Self {
            config,
            assigned: BTreeMap::new(),
            free: Vec::new(),
            next_table: 0,
            started: false,
        }
    }

    /// Makes the tables follow `state` (what the maps hold after the
    /// sync's plan): builds the table of every frontend that wants one and
    /// whose backends changed, swaps it in, and drops the tables of
    /// frontends gone or without backends.
    pub fn sync(
        &mut self,
        state: &DatapathState,
        specs: &BTreeMap<Frontend, FrontendSpec>,
        maps: &mut MaglevMaps,
    ) -> MaglevOutcome {
        let mut outcome = MaglevOutcome::default();
        if !self.config.enabled() {
            return outcome;
        }
        let size = self.config.table_size;
        let capacity = maps.table_capacity(size).min(self.config.max_tables);
        let mut wanted = BTreeSet::new();
        for (frontend, fstate) in &state.frontends {
            if !self.config.wants(fstate.flags) {
                continue;
            }
            let Some(spec) = specs.get(frontend) else {
                continue;
            };
            let backends: Vec<MaglevBackend> = fstate
                .slots
                .iter()
                .filter_map(|id| {
                    let entry = state.backends.get(id)?;
                    (entry.flags & backend_flags::TERMINATING == 0).then_some(MaglevBackend {
                        addr: entry.key.addr,
                        port: entry.key.port,
                        proto: entry.key.proto,
                        weight: 1,
                        id: *id,
                    })
                })
                .collect();
            if backends.is_empty() {
                continue;
            }
            let seed = maglev::seed_for(self.config.seed, &spec.service, frontend.addr.is_ipv6());
            let mut inputs: Vec<(IpAddr, u16, u32)> =
                backends.iter().map(|b| (b.addr, b.port, b.id)).collect();
            inputs.sort_unstable();
            let inputs = (seed, inputs);
            let rev_nat_id = fstate.rev_nat_id;
            wanted.insert(rev_nat_id);
            if self
                .assigned
                .get(&rev_nat_id)
                .is_some_and(|a| a.inputs == inputs)
            {
                continue;
            }
            // The inactive row of the frontend's table, or a new table.
            let row = if let Some(a) = self.assigned.get(&rev_nat_id) {
                a.table * ROWS_PER_TABLE + (a.active + 1) % ROWS_PER_TABLE
            } else if let Some(table) = self.take_table(capacity) {
                table * ROWS_PER_TABLE
            } else {
                wanted.remove(&rev_nat_id);
                outcome.without_table.push(*frontend);
                continue;
            };
            let table = maglev::build_table(seed, &backends, size);
            let written = maps
                .write_row(row, &table)
                .and_then(|()| maps.set_ref(rev_nat_id, Some(row)));
            match written {
                Ok(()) => {
                    outcome.tables_written += 1;
                    self.assigned.insert(
                        rev_nat_id,
                        Assigned {
                            table: row / ROWS_PER_TABLE,
                            active: row,
                            inputs,
                        },
                    );
                }
                Err(error) => {
                    outcome.failures += 1;
                    tracing::error!(error = %crate::error::Causes(&error), %frontend, "maglev table not written; the frontend keeps its current choice");
                    if !self.assigned.contains_key(&rev_nat_id) {
                        self.free.push(row / ROWS_PER_TABLE);
                    }
                }
            }
        }
        self.drop_unwanted(&wanted, maps, &mut outcome);
        if !self.started {
            match maps.clear_refs_except(&wanted) {
                Ok(()) => self.started = true,
                Err(error) => {
                    outcome.failures += 1;
                    tracing::error!(error = %crate::error::Causes(&error), "cannot clear the maglev references of an earlier agent");
                }
            }
        }
        if !outcome.without_table.is_empty() {
            tracing::error!(
                frontends = outcome.without_table.len(),
                first = %outcome.without_table[0],
                max = self.config.max_tables,
                "maglev tables full (--max-maglev-tables): these frontends keep the per-node backend choice"
            );
        }
        outcome
    }

    /// Frees the tables of frontends that no longer want one (their
    /// reference first, so no packet reads a row about to be reused).
    fn drop_unwanted(
        &mut self,
        wanted: &BTreeSet<u32>,
        maps: &mut MaglevMaps,
        outcome: &mut MaglevOutcome,
    ) {
        let gone: Vec<u32> = self
            .assigned
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        for rev_nat_id in gone {
            if let Err(error) = maps.set_ref(rev_nat_id, None) {
                outcome.failures += 1;
                tracing::error!(error = %crate::error::Causes(&error), rev_nat_id, "cannot drop a maglev reference");
                continue;
            }
            if let Some(assigned) = self.assigned.remove(&rev_nat_id) {
                self.free.push(assigned.table);
            }
        }
    }

    /// A free table number below `capacity`.
    fn take_table(&mut self, capacity: u32) -> Option<u32> {
        if let Some(table) = self.free.pop() {
            return Some(table);
        }
        (self.next_table < capacity).then(|| {
            self.next_table += 1;
            self.next_table - 1
        })
    }

    /// Frontends with a table now.
    #[must_use]
    pub fn tables_in_use(&self) -> usize {
        self.assigned.len()
    }
}
